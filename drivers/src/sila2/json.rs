//! A call's parameters and a command's responses as JSON text, typed by the feature's FDL:
//! Real and Integer are numbers, String is text, Boolean is true/false, a List an array, a
//! Structure an object by element identifier, Date/Time/Timestamp ISO 8601 text
//! (`2026-12-06`, `13:05:00.250`, `2026-12-06T13:05:00Z`, with an optional `+hh:mm` offset),
//! Binary base64 is not offered (refused with its path). Planners write the JSON; ppuctl
//! shows it.

use ppu_sila::fdl::{Basic, DataType, Element, Feature};
use ppu_sila::value::Value;
use serde_json::Value as Json;

/// Why a JSON value does not fit its type: `path` names the element (`Speed`,
/// `Plate.Wells[2]`).
#[derive(Debug, Clone, PartialEq)]
pub struct JsonError {
    pub path: String,
    pub reason: String,
}

fn err(path: &str, reason: impl Into<String>) -> JsonError {
    JsonError {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The data type behind identifiers (a `DataTypeDefinition`) and constraints.
pub fn resolve<'a>(feature: &'a Feature, data_type: &'a DataType) -> &'a DataType {
    let mut t = data_type;
    for _ in 0..16 {
        match t {
            DataType::Constrained(inner, _) => t = inner,
            DataType::Identifier(id) => match feature.data_types.iter().find(|d| &d.identifier == id)
            {
                Some(d) => t = &d.data_type,
                None => return t,
            },
            _ => return t,
        }
    }
    t
}

/// Reads `elements` (a command's parameters) from a JSON object: every element must be there,
/// nothing else may be.
pub fn elements_from_json(
    feature: &Feature,
    elements: &[Element],
    json: &Json,
    prefix: &str,
) -> Result<Vec<(String, Value)>, JsonError> {
    let Json::Object(map) = json else {
        return Err(err(prefix, "must be a JSON object by identifier"));
    };
    let at = |id: &str| {
        if prefix.is_empty() {
            id.to_owned()
        } else {
            format!("{prefix}.{id}")
        }
    };
    if let Some(extra) = map
        .keys()
        .find(|k| !elements.iter().any(|e| &e.identifier == *k))
    {
        let known: Vec<&str> = elements.iter().map(|e| e.identifier.as_str()).collect();
        return Err(err(
            &at(extra),
            format!(
                "unknown (expected {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        ));
    }
    elements
        .iter()
        .map(|e| {
            let path = at(&e.identifier);
            let v = map
                .get(&e.identifier)
                .ok_or_else(|| err(&path, "missing"))?;
            Ok((e.identifier.clone(), from_json(feature, &e.data_type, v, &path)?))
        })
        .collect()
}

/// One value of `data_type` from JSON.
pub fn from_json(
    feature: &Feature,
    data_type: &DataType,
    json: &Json,
    path: &str,
) -> Result<Value, JsonError> {
    match resolve(feature, data_type) {
        DataType::Basic(b) => basic_from_json(*b, json, path),
        DataType::List(item) => match json {
            Json::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| from_json(feature, item, v, &format!("{path}[{i}]")))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::List),
            _ => Err(err(path, "must be a JSON array")),
        },
        DataType::Structure(elements) => {
            elements_from_json(feature, elements, json, path).map(Value::Structure)
        }
        DataType::Identifier(id) => Err(err(path, format!("unknown data type {id}"))),
        DataType::Constrained(..) => Err(err(path, "constraints nested too deep")),
    }
}

fn basic_from_json(b: Basic, json: &Json, path: &str) -> Result<Value, JsonError> {
    match (b, json) {
        (Basic::String, Json::String(s)) => Ok(Value::String(s.clone())),
        (Basic::Integer, Json::Number(n)) => n
            .as_i64()
            .map(Value::Integer)
            .ok_or_else(|| err(path, format!("{n} is not an integer"))),
        (Basic::Real, Json::Number(n)) => n
            .as_f64()
            .map(Value::Real)
            .ok_or_else(|| err(path, format!("{n} is not a number"))),
        (Basic::Boolean, Json::Bool(v)) => Ok(Value::Boolean(*v)),
        (Basic::Date | Basic::Time | Basic::Timestamp, Json::String(s)) => {
            Value::parse_temporal(b, s).ok_or_else(|| err(path, format!("{s:?} is not an ISO 8601 {b:?}")))
        }
        (Basic::Binary | Basic::Any, _) => Err(err(
            path,
            format!("{b:?} parameters cannot be given as JSON"),
        )),
        (_, other) => Err(err(
            path,
            format!("{other} is not a {}", basic_name(b)),
        )),
    }
}

fn basic_name(b: Basic) -> &'static str {
    match b {
        Basic::String => "string",
        Basic::Integer => "integer",
        Basic::Real => "number",
        Basic::Boolean => "boolean (true/false)",
        Basic::Binary => "binary",
        Basic::Date => "date",
        Basic::Time => "time",
        Basic::Timestamp => "timestamp",
        Basic::Any => "any",
    }
}

/// A value as JSON (the inverse of [`from_json`]; Binary and Any as base64-free summaries).
pub fn to_json(value: &Value) -> Json {
    match value {
        Value::String(s) => Json::String(s.clone()),
        Value::Integer(i) => Json::from(*i),
        Value::Real(r) => serde_json::Number::from_f64(*r).map_or(Json::Null, Json::Number),
        Value::Boolean(b) => Json::Bool(*b),
        Value::Binary(b) => Json::String(format!("<{} bytes>", b.len())),
        Value::Date { .. } | Value::Time { .. } | Value::Timestamp { .. } => {
            value.temporal_text().map_or(Json::Null, Json::String)
        }
        Value::Any { payload, .. } => Json::String(format!("<any, {} bytes>", payload.len())),
        Value::List(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Structure(elements) => elements_to_json(elements),
    }
}

/// Named values (responses) as a JSON object.
pub fn elements_to_json(elements: &[(String, Value)]) -> Json {
    Json::Object(
        elements
            .iter()
            .map(|(k, v)| (k.clone(), to_json(v)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature() -> Feature {
        Feature {
            sila2_version: "1.0".into(),
            feature_version: "1.0".into(),
            maturity_level: "Draft".into(),
            originator: "org.ppu".into(),
            category: "test".into(),
            locale: "en-us".into(),
            identifier: "T".into(),
            display_name: "T".into(),
            description: String::new(),
            commands: Vec::new(),
            properties: Vec::new(),
            metadata: Vec::new(),
            errors: Vec::new(),
            data_types: vec![ppu_sila::fdl::DataTypeDefinition {
                identifier: "Rpm".into(),
                display_name: "Rpm".into(),
                description: String::new(),
                data_type: DataType::Constrained(
                    Box::new(DataType::Basic(Basic::Real)),
                    Box::default(),
                ),
            }],
        }
    }

    fn element(id: &str, t: DataType) -> Element {
        Element {
            identifier: id.into(),
            display_name: id.into(),
            description: String::new(),
            data_type: t,
        }
    }

    #[test]
    fn parameters_read_by_type_and_name_what_is_wrong() {
        let f = feature();
        let params = vec![
            element("Speed", DataType::Identifier("Rpm".into())),
            element("Count", DataType::Basic(Basic::Integer)),
            element(
                "Tags",
                DataType::List(Box::new(DataType::Basic(Basic::String))),
            ),
            element("When", DataType::Basic(Basic::Timestamp)),
        ];
        let ok: Json = serde_json::from_str(
            r#"{"Speed": 600, "Count": 3, "Tags": ["a"], "When": "2026-12-06T13:05:00.25+01:00"}"#,
        )
        .unwrap();
        let values = elements_from_json(&f, &params, &ok, "").expect("valid");
        assert_eq!(values[0], ("Speed".into(), Value::Real(600.0)));
        assert_eq!(
            values[3].1,
            Value::Timestamp {
                year: 2026,
                month: 12,
                day: 6,
                hour: 13,
                minute: 5,
                second: 0,
                millisecond: 250,
                tz_minutes: 60
            }
        );
        assert_eq!(
            to_json(&values[3].1),
            Json::String("2026-12-06T13:05:00.250+01:00".into())
        );
        let cases = [
            (r#"{"Count": 3, "Tags": [], "When": "2026-01-01T00:00:00"}"#, "Speed", "missing"),
            (
                r#"{"Speed": 1, "Count": 3.5, "Tags": [], "When": "2026-01-01T00:00:00"}"#,
                "Count",
                "3.5 is not an integer",
            ),
            (
                r#"{"Speed": 1, "Count": 3, "Tags": [1], "When": "2026-01-01T00:00:00"}"#,
                "Tags[0]",
                "1 is not a string",
            ),
            (
                r#"{"Speed": 1, "Count": 3, "Tags": [], "When": "2026-01-01T00:00:00", "Spin": 1}"#,
                "Spin",
                "unknown (expected Speed, Count, Tags, When)",
            ),
        ];
        for (json, path, reason) in cases {
            let e = elements_from_json(&f, &params, &serde_json::from_str(json).unwrap(), "")
                .expect_err(path);
            assert_eq!((e.path.as_str(), e.reason.as_str()), (path, reason));
        }
    }
}
