//! SiLA values as plain data, converted to and from the framework-wrapped dynamic messages,
//! and checked against a data type's constraints (the `sila2` driver checks parameters before
//! submission; ppud checks what an orchestrator sends).

use prost_reflect::{DynamicMessage, MessageDescriptor};

use crate::fdl::{DataType, Feature};

/// One SiLA value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    Integer(i64),
    Real(f64),
    Boolean(bool),
    Binary(Vec<u8>),
    /// `(year, month, day, timezone offset minutes)`.
    Date {
        year: u32,
        month: u32,
        day: u32,
        tz_minutes: i32,
    },
    Time {
        hour: u32,
        minute: u32,
        second: u32,
        millisecond: u32,
        tz_minutes: i32,
    },
    Timestamp {
        year: u32,
        month: u32,
        day: u32,
        hour: u32,
        minute: u32,
        second: u32,
        millisecond: u32,
        tz_minutes: i32,
    },
    /// `Any`: the type as FDL XML and the payload bytes.
    Any {
        type_xml: String,
        payload: Vec<u8>,
    },
    List(Vec<Value>),
    /// A structure's elements in FDL order.
    Structure(Vec<(String, Value)>),
}

/// A value that does not fit its type or breaks a constraint; `path` names the element
/// (`Segments[2].Temperature`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ValueError {
    pub path: String,
    pub reason: String,
}

/// Checks `value` against `data_type` and its constraints (data type identifiers resolve in
/// `feature`).
pub fn check(
    feature: &Feature,
    data_type: &DataType,
    value: &Value,
    path: &str,
) -> Result<(), ValueError> {
    let _ = (feature, data_type, value, path);
    todo!("ppu-sila: constraint check")
}

/// The message of a `Parameters`/`Responses`/`IntermediateResponses`/property message
/// (`descriptor`) holding `values` by element identifier.
pub fn to_message(
    descriptor: &MessageDescriptor,
    values: &[(String, Value)],
) -> Result<DynamicMessage, ValueError> {
    let _ = (descriptor, values);
    todo!("ppu-sila: values to message")
}

/// The element values of such a message, in field order.
pub fn from_message(message: &DynamicMessage) -> Result<Vec<(String, Value)>, ValueError> {
    let _ = message;
    todo!("ppu-sila: message to values")
}
