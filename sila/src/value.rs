//! SiLA values as plain data, converted to and from the framework-wrapped dynamic messages,
//! and checked against a data type's constraints (the `sila2` driver checks parameters before
//! submission; ppud checks what an orchestrator sends).

use prost::Message;
use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage, Value as ReflectValue,
};

use crate::error::SilaError;
use crate::fdl::{Basic, Command, Constraints, DataType, Feature};
use crate::framework;

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
///
/// `Unit` is informative (the value is in that unit; nothing to check), `ContentType` and
/// `Schema` are not checked. `Pattern` is an XSD regular expression matched against the whole
/// string; XSD's `\i`/`\c` classes are translated, character-class subtraction is not
/// supported (such a pattern is reported as unsupported rather than silently passed).
pub fn check(
    feature: &Feature,
    data_type: &DataType,
    value: &Value,
    path: &str,
) -> Result<(), ValueError> {
    check_depth(feature, data_type, value, path, 0)
}

/// Checks a command's parameters and names the first bad one as the standard wants: a
/// validation error whose `parameter` is its fully qualified identifier.
pub fn check_parameters(
    feature: &Feature,
    command: &Command,
    values: &[(String, Value)],
) -> Result<(), SilaError> {
    let fqi = |p: &str| {
        format!(
            "{}/Command/{}/Parameter/{p}",
            feature.fully_qualified_identifier(),
            command.identifier
        )
    };
    for (name, _) in values {
        if !command.parameters.iter().any(|p| &p.identifier == name) {
            return Err(SilaError::Validation {
                parameter: fqi(name),
                message: format!("{name}: no such parameter of {}", command.identifier),
            });
        }
    }
    for p in &command.parameters {
        let value = values
            .iter()
            .find(|(name, _)| name == &p.identifier)
            .map(|(_, v)| v)
            .ok_or_else(|| SilaError::Validation {
                parameter: fqi(&p.identifier),
                message: format!("{}: missing", p.identifier),
            })?;
        check(feature, &p.data_type, value, &p.identifier).map_err(|e| SilaError::Validation {
            parameter: fqi(&p.identifier),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

fn fail(path: &str, reason: impl Into<String>) -> ValueError {
    ValueError {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Data type definitions may refer to each other; a cycle must not recurse forever.
const MAX_DEPTH: usize = 64;

fn check_depth(
    feature: &Feature,
    data_type: &DataType,
    value: &Value,
    path: &str,
    depth: usize,
) -> Result<(), ValueError> {
    if depth > MAX_DEPTH {
        return Err(fail(path, "data types nest too deep (a cycle?)"));
    }
    match (data_type, value) {
        (DataType::Identifier(id), _) => {
            let definition = feature
                .data_type_definition(id)
                .ok_or_else(|| fail(path, format!("unknown data type {id}")))?;
            check_depth(feature, &definition.data_type, value, path, depth + 1)
        }
        (DataType::Constrained(inner, constraints), _) => {
            check_depth(feature, inner, value, path, depth + 1)?;
            check_constraints(constraints, value, path)
        }
        (DataType::List(inner), Value::List(items)) => {
            for (i, item) in items.iter().enumerate() {
                check_depth(feature, inner, item, &format!("{path}[{i}]"), depth + 1)?;
            }
            Ok(())
        }
        (DataType::Structure(elements), Value::Structure(values)) => {
            for (name, _) in values {
                if !elements.iter().any(|e| &e.identifier == name) {
                    return Err(fail(&format!("{path}.{name}"), "no such element"));
                }
            }
            for e in elements {
                let p = format!("{path}.{}", e.identifier);
                let v = values
                    .iter()
                    .find(|(name, _)| name == &e.identifier)
                    .map(|(_, v)| v)
                    .ok_or_else(|| fail(&p, "missing"))?;
                check_depth(feature, &e.data_type, v, &p, depth + 1)?;
            }
            Ok(())
        }
        (DataType::Basic(b), v) if basic_matches(*b, v) => Ok(()),
        (expected, v) => Err(fail(
            path,
            format!("expected {}, got {}", type_name(expected), v.kind()),
        )),
    }
}

fn basic_matches(b: Basic, v: &Value) -> bool {
    matches!(
        (b, v),
        (Basic::String, Value::String(_))
            | (Basic::Integer, Value::Integer(_))
            | (Basic::Real, Value::Real(_) | Value::Integer(_))
            | (Basic::Boolean, Value::Boolean(_))
            | (Basic::Binary, Value::Binary(_))
            | (Basic::Date, Value::Date { .. })
            | (Basic::Time, Value::Time { .. })
            | (Basic::Timestamp, Value::Timestamp { .. })
            | (Basic::Any, Value::Any { .. })
    )
}

fn type_name(t: &DataType) -> String {
    match t {
        DataType::Basic(b) => b.name().to_owned(),
        DataType::List(_) => "a list".into(),
        DataType::Structure(_) => "a structure".into(),
        DataType::Constrained(inner, _) => type_name(inner),
        DataType::Identifier(id) => id.clone(),
    }
}

impl Value {
    /// What kind of value this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::String(_) => "a String",
            Value::Integer(_) => "an Integer",
            Value::Real(_) => "a Real",
            Value::Boolean(_) => "a Boolean",
            Value::Binary(_) => "a Binary",
            Value::Date { .. } => "a Date",
            Value::Time { .. } => "a Time",
            Value::Timestamp { .. } => "a Timestamp",
            Value::Any { .. } => "an Any",
            Value::List(_) => "a list",
            Value::Structure(_) => "a structure",
        }
    }

    /// A number for bound checks: Integer and Real as `f64`; Date, Time and Timestamp as
    /// milliseconds in UTC (Date from 0000-01-01, Time from midnight).
    fn ordinal(&self) -> Option<f64> {
        match *self {
            Value::Integer(i) => Some(i as f64),
            Value::Real(r) => Some(r),
            Value::Date {
                year,
                month,
                day,
                tz_minutes,
            } => Some(
                (days(year, month, day) as f64) * 86_400_000.0 - f64::from(tz_minutes) * 60_000.0,
            ),
            Value::Time {
                hour,
                minute,
                second,
                millisecond,
                tz_minutes,
            } => Some(
                f64::from(((hour * 60 + minute) * 60 + second) * 1000 + millisecond)
                    - f64::from(tz_minutes) * 60_000.0,
            ),
            Value::Timestamp {
                year,
                month,
                day,
                hour,
                minute,
                second,
                millisecond,
                tz_minutes,
            } => Some(
                (days(year, month, day) as f64) * 86_400_000.0
                    + f64::from(((hour * 60 + minute) * 60 + second) * 1000 + millisecond)
                    - f64::from(tz_minutes) * 60_000.0,
            ),
            _ => None,
        }
    }
}

/// Days since 0000-03-01 of the proleptic Gregorian calendar (only differences matter).
fn days(year: u32, month: u32, day: u32) -> i64 {
    let (y, m) = if month <= 2 {
        (i64::from(year) - 1, i64::from(month) + 9)
    } else {
        (i64::from(year), i64::from(month) - 3)
    };
    365 * y + y / 4 - y / 100 + y / 400 + (153 * m + 2) / 5 + i64::from(day) - 1
}

/// A bound or set member as written in the FDL, read as the type of `like`.
fn parse_like(like: &Value, text: &str) -> Option<Value> {
    let text = text.trim();
    match like {
        Value::Integer(_) | Value::Real(_) => text.parse::<f64>().ok().map(Value::Real),
        Value::Date { .. } => Value::parse_temporal(Basic::Date, text),
        Value::Time { .. } => Value::parse_temporal(Basic::Time, text),
        Value::Timestamp { .. } => Value::parse_temporal(Basic::Timestamp, text),
        Value::String(_) => Some(Value::String(text.to_owned())),
        Value::Boolean(_) => match text {
            "true" | "1" => Some(Value::Boolean(true)),
            "false" | "0" => Some(Value::Boolean(false)),
            _ => None,
        },
        _ => None,
    }
}

impl Value {
    /// A Date, Time or Timestamp written as ISO 8601 text (`2026-12-06`, `13:05:00[.250]`,
    /// `2026-12-06T13:05:00[.250]`, each ending `Z`, `±hh:mm` or with no zone, taken as UTC),
    /// read as `basic`: how FDL constraints and planners' JSON write them. `None` if the text
    /// is malformed or `basic` is not temporal.
    pub fn parse_temporal(basic: Basic, text: &str) -> Option<Value> {
        let (text, tz) = split_tz(text.trim());
        let tz_minutes = tz?;
        match basic {
            Basic::Date => {
                let (year, month, day) = parse_date(text)?;
                Some(Value::Date {
                    year,
                    month,
                    day,
                    tz_minutes,
                })
            }
            Basic::Time => {
                let (hour, minute, second, millisecond) = parse_time(text)?;
                Some(Value::Time {
                    hour,
                    minute,
                    second,
                    millisecond,
                    tz_minutes,
                })
            }
            Basic::Timestamp => {
                let (date, time) = text.split_once('T')?;
                let (year, month, day) = parse_date(date)?;
                let (hour, minute, second, millisecond) = parse_time(time)?;
                Some(Value::Timestamp {
                    year,
                    month,
                    day,
                    hour,
                    minute,
                    second,
                    millisecond,
                    tz_minutes,
                })
            }
            _ => None,
        }
    }

    /// The ISO 8601 text of a Date, Time or Timestamp (what [`Value::parse_temporal`] reads);
    /// `None` for other values.
    pub fn temporal_text(&self) -> Option<String> {
        let zone = |minutes: i32| {
            if minutes == 0 {
                "Z".to_owned()
            } else {
                let sign = if minutes < 0 { '-' } else { '+' };
                let m = minutes.unsigned_abs();
                format!("{sign}{:02}:{:02}", m / 60, m % 60)
            }
        };
        match *self {
            Value::Date {
                year,
                month,
                day,
                tz_minutes,
            } => Some(format!("{year:04}-{month:02}-{day:02}{}", zone(tz_minutes))),
            Value::Time {
                hour,
                minute,
                second,
                millisecond,
                tz_minutes,
            } => Some(format!(
                "{hour:02}:{minute:02}:{second:02}.{millisecond:03}{}",
                zone(tz_minutes)
            )),
            Value::Timestamp {
                year,
                month,
                day,
                hour,
                minute,
                second,
                millisecond,
                tz_minutes,
            } => Some(format!(
                "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millisecond:03}{}",
                zone(tz_minutes)
            )),
            _ => None,
        }
    }
}

/// `…Z`, `…+hh:mm`, `…-hh:mm` or no zone (taken as UTC); `None` for a malformed zone.
fn split_tz(text: &str) -> (&str, Option<i32>) {
    if let Some(rest) = text.strip_suffix('Z') {
        return (rest, Some(0));
    }
    if text.len() > 6 {
        let (rest, zone) = text.split_at(text.len() - 6);
        let sign = match zone.as_bytes()[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return (text, Some(0)),
        };
        let minutes = zone[1..]
            .split_once(':')
            .and_then(|(h, m)| Some(h.parse::<i32>().ok()? * 60 + m.parse::<i32>().ok()?));
        return (rest, minutes.map(|m| sign * m));
    }
    (text, Some(0))
}

fn parse_date(text: &str) -> Option<(u32, u32, u32)> {
    let mut parts = text.splitn(3, '-');
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}

fn parse_time(text: &str) -> Option<(u32, u32, u32, u32)> {
    let mut parts = text.splitn(3, ':');
    let hour = parts.next()?.parse().ok()?;
    let minute = parts.next()?.parse().ok()?;
    let seconds = parts.next()?;
    let (second, fraction) = seconds.split_once('.').unwrap_or((seconds, "0"));
    let millisecond = format!("{fraction:0<3}").get(..3)?.parse().ok()?;
    Some((hour, minute, second.parse().ok()?, millisecond))
}

fn check_constraints(c: &Constraints, value: &Value, path: &str) -> Result<(), ValueError> {
    // Lengths count characters of a String and bytes of a Binary.
    let length = match value {
        Value::String(s) => Some(s.chars().count() as u64),
        Value::Binary(b) => Some(b.len() as u64),
        _ => None,
    };
    if let Some(len) = length {
        if let Some(l) = c.length
            && len != l
        {
            return Err(fail(path, format!("length {len} is not {l}")));
        }
        if let Some(l) = c.minimal_length
            && len < l
        {
            return Err(fail(path, format!("length {len} is below the minimum {l}")));
        }
        if let Some(l) = c.maximal_length
            && len > l
        {
            return Err(fail(path, format!("length {len} is above the maximum {l}")));
        }
    }
    if let Value::List(items) = value {
        let n = items.len() as u64;
        if let Some(l) = c.element_count
            && n != l
        {
            return Err(fail(path, format!("{n} elements, not {l}")));
        }
        if let Some(l) = c.minimal_element_count
            && n < l
        {
            return Err(fail(
                path,
                format!("{n} elements, fewer than the minimum {l}"),
            ));
        }
        if let Some(l) = c.maximal_element_count
            && n > l
        {
            return Err(fail(
                path,
                format!("{n} elements, more than the maximum {l}"),
            ));
        }
    }
    if !c.set.is_empty() {
        let member = c.set.iter().any(|s| match parse_like(value, s) {
            Some(Value::Real(r)) => value.ordinal() == Some(r),
            Some(Value::String(s)) => matches!(value, Value::String(v) if *v == s),
            Some(other) if value.ordinal().is_some() => other.ordinal() == value.ordinal(),
            Some(other) => &other == value,
            None => false,
        });
        if !member {
            return Err(fail(
                path,
                format!("{} is not one of {}", display(value), c.set.join(", ")),
            ));
        }
    }
    if let Some(pattern) = &c.pattern
        && let Value::String(s) = value
    {
        let re = xsd_regex(pattern).map_err(|reason| fail(path, reason))?;
        if !re.is_match(s) {
            return Err(fail(
                path,
                format!("{s:?} does not match the pattern {pattern}"),
            ));
        }
    }
    if let Some(x) = value.ordinal() {
        let bounds = [
            (&c.minimal_inclusive, "below the minimum", 0),
            (&c.minimal_exclusive, "not above", 1),
            (&c.maximal_inclusive, "above the maximum", 2),
            (&c.maximal_exclusive, "not below", 3),
        ];
        for (bound, words, kind) in bounds {
            let Some(text) = bound else { continue };
            let limit = parse_like(value, text)
                .and_then(|v| v.ordinal())
                .ok_or_else(|| fail(path, format!("bound {text:?} does not fit the type")))?;
            let broken = match kind {
                0 => x < limit,
                1 => x <= limit,
                2 => x > limit,
                _ => x >= limit,
            };
            if broken {
                return Err(fail(
                    path,
                    format!("{} is {words} {}", display(value), text.trim()),
                ));
            }
        }
    }
    if !c.allowed_types.is_empty()
        && let Value::Any { type_xml, .. } = value
    {
        let t = DataType::from_xml(type_xml)
            .map_err(|e| fail(path, format!("the Any's type is not readable: {e}")))?;
        if !c.allowed_types.contains(&t) {
            return Err(fail(path, "the Any's type is not one of the allowed types"));
        }
    }
    if let Some(kind) = &c.fully_qualified_identifier
        && let Value::String(s) = value
        && !fully_qualified(kind, s)
    {
        return Err(fail(path, format!("{s:?} is not a fully qualified {kind}")));
    }
    Ok(())
}

fn display(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => r.to_string(),
        Value::Boolean(b) => b.to_string(),
        other => other.kind().to_owned(),
    }
}

/// The shape of a fully qualified identifier of `kind` (Part A): a feature identifier
/// `originator/category/Feature/vN`, then `/Command/X`, `/Command/X/Parameter/Y`, ….
fn fully_qualified(kind: &str, s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() < 4 {
        return false;
    }
    let lower = |p: &str| {
        p.starts_with(|c: char| c.is_ascii_lowercase())
            && p.chars().all(|c| c.is_ascii_lowercase() || c == '.')
    };
    let ident = |p: &str| {
        p.starts_with(|c: char| c.is_ascii_uppercase())
            && p.chars().all(|c| c.is_ascii_alphanumeric())
    };
    let feature = lower(parts[0])
        && lower(parts[1])
        && ident(parts[2])
        && parts[3]
            .strip_prefix('v')
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
    if !feature {
        return false;
    }
    let rest = &parts[4..];
    let shape: &[&str] = match kind {
        "FeatureIdentifier" => &[],
        "CommandIdentifier" => &["Command"],
        "CommandParameterIdentifier" => &["Command", "Parameter"],
        "CommandResponseIdentifier" => &["Command", "Response"],
        "IntermediateCommandResponseIdentifier" => &["Command", "IntermediateResponse"],
        "DefinedExecutionErrorIdentifier" => &["DefinedExecutionError"],
        "PropertyIdentifier" => &["Property"],
        "TypeIdentifier" => &["DataType"],
        "MetadataIdentifier" => &["Metadata"],
        _ => return true,
    };
    rest.len() == shape.len() * 2
        && rest
            .chunks(2)
            .zip(shape)
            .all(|(pair, word)| pair[0] == *word && ident(pair[1]))
}

/// An XSD pattern as a Rust regex, anchored (XSD patterns match the whole value).
fn xsd_regex(pattern: &str) -> Result<regex::Regex, String> {
    if pattern.contains("-[") {
        return Err(format!(
            "pattern {pattern}: XSD character-class subtraction is not supported"
        ));
    }
    let translated = pattern
        .replace("\\i", "[_:A-Za-z]")
        .replace("\\I", "[^_:A-Za-z]")
        .replace("\\c", "[-._:A-Za-z0-9]")
        .replace("\\C", "[^-._:A-Za-z0-9]");
    regex::Regex::new(&format!("^(?:{translated})$"))
        .map_err(|e| format!("pattern {pattern} is not supported: {e}"))
}

/// The message of a `Parameters`/`Responses`/`IntermediateResponses`/property message
/// (`descriptor`) holding `values` by element identifier.
pub fn to_message(
    descriptor: &MessageDescriptor,
    values: &[(String, Value)],
) -> Result<DynamicMessage, ValueError> {
    to_message_at(descriptor, values, "")
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn to_message_at(
    descriptor: &MessageDescriptor,
    values: &[(String, Value)],
    path: &str,
) -> Result<DynamicMessage, ValueError> {
    let mut message = DynamicMessage::new(descriptor.clone());
    for (name, value) in values {
        let p = join(path, name);
        let field = descriptor
            .get_field_by_name(name)
            .ok_or_else(|| fail(&p, format!("no such element in {}", descriptor.name())))?;
        message.set_field(&field, field_value(&field, value, &p)?);
    }
    Ok(message)
}

fn field_value(
    field: &FieldDescriptor,
    value: &Value,
    path: &str,
) -> Result<ReflectValue, ValueError> {
    let Kind::Message(kind) = field.kind() else {
        return Err(fail(path, "not a SiLA message field"));
    };
    if field.is_list() {
        let Value::List(items) = value else {
            return Err(fail(path, format!("expected a list, got {}", value.kind())));
        };
        let items = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                encode(&kind, item, &format!("{path}[{i}]")).map(ReflectValue::Message)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ReflectValue::List(items))
    } else {
        Ok(ReflectValue::Message(encode(&kind, value, path)?))
    }
}

/// Whether a message is a framework basic type, and which.
fn framework_basic(message: &MessageDescriptor) -> Option<Basic> {
    if message.package_name() != framework::PACKAGE {
        return None;
    }
    Basic::from_name(message.name())
}

/// `DataType_<Id>` messages wrap the definition's value in their one field.
fn is_data_type_message(message: &MessageDescriptor) -> bool {
    message.parent_message().is_none() && message.name().starts_with("DataType_")
}

fn encode(
    kind: &MessageDescriptor,
    value: &Value,
    path: &str,
) -> Result<DynamicMessage, ValueError> {
    if let Some(basic) = framework_basic(kind) {
        return encode_basic(kind, basic, value, path);
    }
    if is_data_type_message(kind) {
        let mut message = DynamicMessage::new(kind.clone());
        let field = kind
            .fields()
            .next()
            .ok_or_else(|| fail(path, format!("{} has no field", kind.name())))?;
        message.set_field(&field, field_value(&field, value, path)?);
        return Ok(message);
    }
    match value {
        Value::Structure(elements) => to_message_at(kind, elements, path),
        other => Err(fail(
            path,
            format!("expected a structure, got {}", other.kind()),
        )),
    }
}

fn timezone(tz_minutes: i32) -> framework::Timezone {
    framework::Timezone {
        hours: tz_minutes / 60,
        minutes: (tz_minutes % 60).unsigned_abs(),
    }
}

fn tz_minutes(tz: Option<&framework::Timezone>) -> i32 {
    match tz {
        None => 0,
        Some(tz) => {
            let minutes = i32::try_from(tz.minutes).unwrap_or(0);
            tz.hours * 60 + if tz.hours < 0 { -minutes } else { minutes }
        }
    }
}

fn encode_basic(
    kind: &MessageDescriptor,
    basic: Basic,
    value: &Value,
    path: &str,
) -> Result<DynamicMessage, ValueError> {
    let mut message = DynamicMessage::new(kind.clone());
    let bytes = match (basic, value) {
        (Basic::String, Value::String(s)) => framework::String { value: s.clone() }.encode_to_vec(),
        (Basic::Integer, Value::Integer(i)) => framework::Integer { value: *i }.encode_to_vec(),
        (Basic::Real, Value::Real(r)) => framework::Real { value: *r }.encode_to_vec(),
        (Basic::Real, Value::Integer(i)) => framework::Real { value: *i as f64 }.encode_to_vec(),
        (Basic::Boolean, Value::Boolean(b)) => framework::Boolean { value: *b }.encode_to_vec(),
        (Basic::Binary, Value::Binary(b)) => framework::Binary {
            union: Some(framework::binary::Union::Value(b.clone())),
        }
        .encode_to_vec(),
        (
            Basic::Date,
            Value::Date {
                year,
                month,
                day,
                tz_minutes,
            },
        ) => framework::Date {
            day: *day,
            month: *month,
            year: *year,
            timezone: Some(timezone(*tz_minutes)),
        }
        .encode_to_vec(),
        (
            Basic::Time,
            Value::Time {
                hour,
                minute,
                second,
                millisecond,
                tz_minutes,
            },
        ) => framework::Time {
            second: *second,
            minute: *minute,
            hour: *hour,
            timezone: Some(timezone(*tz_minutes)),
            millisecond: *millisecond,
        }
        .encode_to_vec(),
        (
            Basic::Timestamp,
            Value::Timestamp {
                year,
                month,
                day,
                hour,
                minute,
                second,
                millisecond,
                tz_minutes,
            },
        ) => framework::Timestamp {
            second: *second,
            minute: *minute,
            hour: *hour,
            day: *day,
            month: *month,
            year: *year,
            timezone: Some(timezone(*tz_minutes)),
            millisecond: *millisecond,
        }
        .encode_to_vec(),
        (Basic::Any, Value::Any { type_xml, payload }) => framework::Any {
            r#type: type_xml.clone(),
            payload: payload.clone(),
        }
        .encode_to_vec(),
        (basic, other) => {
            return Err(fail(
                path,
                format!("expected {}, got {}", basic.name(), other.kind()),
            ));
        }
    };
    message
        .merge(bytes.as_slice())
        .map_err(|e| fail(path, format!("not a framework {}: {e}", basic.name())))?;
    Ok(message)
}

/// The element values of such a message, in field order.
pub fn from_message(message: &DynamicMessage) -> Result<Vec<(String, Value)>, ValueError> {
    from_message_at(message, "")
}

fn from_message_at(
    message: &DynamicMessage,
    path: &str,
) -> Result<Vec<(String, Value)>, ValueError> {
    message
        .descriptor()
        .fields()
        .map(|field| {
            let p = join(path, field.name());
            let value = message.get_field(&field);
            Ok((field.name().to_owned(), decode_field(&value, &p)?))
        })
        .collect()
}

fn decode_field(value: &ReflectValue, path: &str) -> Result<Value, ValueError> {
    match value {
        ReflectValue::List(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| decode_field(item, &format!("{path}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::List),
        ReflectValue::Message(m) => decode(m, path),
        _ => Err(fail(path, "not a SiLA message field")),
    }
}

fn decode(message: &DynamicMessage, path: &str) -> Result<Value, ValueError> {
    let kind = message.descriptor();
    if let Some(basic) = framework_basic(&kind) {
        return decode_basic(message, basic, path);
    }
    if is_data_type_message(&kind) {
        let field = kind
            .fields()
            .next()
            .ok_or_else(|| fail(path, format!("{} has no field", kind.name())))?;
        return decode_field(&message.get_field(&field), path);
    }
    from_message_at(message, path).map(Value::Structure)
}

fn decode_basic(message: &DynamicMessage, basic: Basic, path: &str) -> Result<Value, ValueError> {
    let bytes = message.encode_to_vec();
    let bad = |e: prost::DecodeError| fail(path, format!("not a framework {}: {e}", basic.name()));
    Ok(match basic {
        Basic::String => Value::String(
            framework::String::decode(bytes.as_slice())
                .map_err(bad)?
                .value,
        ),
        Basic::Integer => Value::Integer(
            framework::Integer::decode(bytes.as_slice())
                .map_err(bad)?
                .value,
        ),
        Basic::Real => Value::Real(
            framework::Real::decode(bytes.as_slice())
                .map_err(bad)?
                .value,
        ),
        Basic::Boolean => Value::Boolean(
            framework::Boolean::decode(bytes.as_slice())
                .map_err(bad)?
                .value,
        ),
        Basic::Binary => match framework::Binary::decode(bytes.as_slice())
            .map_err(bad)?
            .union
        {
            Some(framework::binary::Union::Value(b)) => Value::Binary(b),
            Some(framework::binary::Union::BinaryTransferUuid(_)) => {
                return Err(fail(
                    path,
                    "binary transfer (large binaries) is not supported",
                ));
            }
            None => Value::Binary(Vec::new()),
        },
        Basic::Date => {
            let d = framework::Date::decode(bytes.as_slice()).map_err(bad)?;
            Value::Date {
                year: d.year,
                month: d.month,
                day: d.day,
                tz_minutes: tz_minutes(d.timezone.as_ref()),
            }
        }
        Basic::Time => {
            let t = framework::Time::decode(bytes.as_slice()).map_err(bad)?;
            Value::Time {
                hour: t.hour,
                minute: t.minute,
                second: t.second,
                millisecond: t.millisecond,
                tz_minutes: tz_minutes(t.timezone.as_ref()),
            }
        }
        Basic::Timestamp => {
            let t = framework::Timestamp::decode(bytes.as_slice()).map_err(bad)?;
            Value::Timestamp {
                year: t.year,
                month: t.month,
                day: t.day,
                hour: t.hour,
                minute: t.minute,
                second: t.second,
                millisecond: t.millisecond,
                tz_minutes: tz_minutes(t.timezone.as_ref()),
            }
        }
        Basic::Any => {
            let a = framework::Any::decode(bytes.as_slice()).map_err(bad)?;
            Value::Any {
                type_xml: a.r#type,
                payload: a.payload,
            }
        }
    })
}
