//! SiLA values inside dynamic messages, by the framework type of the field that holds them
//! (`sila2.org.silastandard.String`, `.Integer`, `.Real`): what the handlers need
//! to read parameters and fill responses of any feature.

use ppu_schema::prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value};
use prost::Message;

/// A plain value for a framework-typed field.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Basic {
    String(String),
    Integer(i64),
    Real(f64),
}

/// The framework message `field` holds (one item of it, for a list), wrapping `value`.
fn wrap(field: &FieldDescriptor, value: Basic) -> Option<Value> {
    let Kind::Message(wrapper) = field.kind() else {
        return None;
    };
    wrapped(&wrapper, value).map(Value::Message)
}

/// `value` in the framework message `wrapper` (its field `value`).
pub(crate) fn wrapped(wrapper: &MessageDescriptor, value: Basic) -> Option<DynamicMessage> {
    let inner = match value {
        Basic::String(s) => Value::String(s),
        Basic::Integer(i) => Value::I64(i),
        Basic::Real(r) => Value::F64(r),
    };
    let mut m = DynamicMessage::new(wrapper.clone());
    m.try_set_field_by_name("value", inner).ok()?;
    Some(m)
}

/// A message of type `desc` with the given element values (lists as repeated fields), encoded.
pub(crate) fn encode(desc: &MessageDescriptor, fields: Vec<(&str, Field)>) -> Vec<u8> {
    message(desc, fields).encode_to_vec()
}

/// One element's value: a single basic value, a list of them, or a built message (a
/// structure, a list of structures).
#[derive(Debug, Clone)]
pub(crate) enum Field {
    One(Basic),
    List(Vec<Basic>),
    Raw(Value),
}

/// A message of type `desc` with the given element values; elements the type lacks are
/// dropped (the descriptors come from our own FDL, so that is a defect the tests catch).
pub(crate) fn message(desc: &MessageDescriptor, fields: Vec<(&str, Field)>) -> DynamicMessage {
    let mut m = DynamicMessage::new(desc.clone());
    for (name, value) in fields {
        let Some(field) = desc.get_field_by_name(name) else {
            tracing::warn!(
                message = desc.full_name(),
                field = name,
                "no such SiLA element"
            );
            continue;
        };
        let v = match value {
            Field::One(b) => wrap(&field, b),
            Field::List(items) => Some(Value::List(
                items.into_iter().filter_map(|b| wrap(&field, b)).collect(),
            )),
            Field::Raw(v) => Some(v),
        };
        if let Some(v) = v {
            let _ = m.try_set_field(&field, v);
        }
    }
    m
}

/// The text of the String element `name` of `msg`.
pub(crate) fn string(msg: &DynamicMessage, name: &str) -> Option<String> {
    let field = msg.get_field_by_name(name)?;
    let wrapper = field.as_message()?;
    let value = wrapper.get_field_by_name("value")?;
    value.as_str().map(str::to_owned)
}
