//! Generic rendering: any family's message as text with units, and its one-line summary.

use prost_reflect::{DynamicMessage, ReflectMessage, Value};

use crate::Schema;

/// A value with its unit (`150 °C`), or as text.
pub fn value(v: &Value, unit: &str) -> String {
    let text = match v {
        Value::F64(x) => trim(*x),
        Value::F32(x) => trim(f64::from(*x)),
        Value::Bool(b) => b.to_string(),
        Value::I32(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::String(s) => s.clone(),
        Value::EnumNumber(n) => n.to_string(),
        Value::Bytes(b) => format!("{} bytes", b.len()),
        Value::List(items) => {
            let parts: Vec<String> = items.iter().map(|i| value(i, "")).collect();
            return if unit.is_empty() {
                format!("[{}]", parts.join(", "))
            } else {
                format!("[{}] {unit}", parts.join(", "))
            };
        }
        Value::Message(m) => inline(m),
        Value::Map(m) => format!("{} entries", m.len()),
    };
    if unit.is_empty() {
        text
    } else {
        format!("{text} {unit}")
    }
}

/// A number without a trailing `.0` where it is whole, else up to 6 significant decimals.
fn trim(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else {
        let s = format!("{x:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// `ramp{temperature_c=150, rate_c_per_min=5}`-style one-line form of a nested message.
fn inline(m: &DynamicMessage) -> String {
    let parts: Vec<String> = m
        .fields()
        .map(|(f, v)| format!("{}={}", f.name(), value(v, "")))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// The set fields of `msg` as `(path, text with unit)` rows, nested messages flattened with
/// dotted paths and lists indexed.
pub fn rows(schema: &Schema, msg: &DynamicMessage) -> Vec<(String, String)> {
    let mut out = Vec::new();
    collect(schema, msg, "", &mut out);
    out
}

fn collect(schema: &Schema, msg: &DynamicMessage, prefix: &str, out: &mut Vec<(String, String)>) {
    for (field, v) in msg.fields() {
        let path = if prefix.is_empty() {
            field.name().to_owned()
        } else {
            format!("{prefix}.{}", field.name())
        };
        let unit = schema.field_options(&field).unit;
        match v {
            Value::Message(m) => collect(schema, m, &path, out),
            Value::List(items) if items.iter().all(|i| matches!(i, Value::Message(_))) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Message(m) = item {
                        collect(schema, m, &format!("{path}[{i}]"), out);
                    }
                }
            }
            v => out.push((path, value(v, &unit))),
        }
    }
}

/// The one-line summary of a command or result: its command's `summary` template filled in,
/// or its fields inline.
pub fn summary(schema: &Schema, msg: &DynamicMessage) -> String {
    let template = schema
        .command(msg.descriptor().full_name())
        .map(|c| c.options.summary.clone())
        .unwrap_or_default();
    if template.is_empty() {
        return rows(schema, msg)
            .into_iter()
            .filter(|(p, _)| !p.contains('['))
            .map(|(p, v)| format!("{p}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
    }
    fill(schema, msg, &template)
}

fn fill(schema: &Schema, msg: &DynamicMessage, template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let key = &rest[start + 1..start + end];
        let (name, count) = match key.strip_suffix(".count") {
            Some(n) => (n, true),
            None => (key, false),
        };
        let desc = msg.descriptor();
        if let Some(field) = desc.get_field_by_name(name) {
            let v = msg.get_field(&field);
            if count {
                let n = match &*v {
                    Value::List(items) => items.len(),
                    _ => 0,
                };
                out.push_str(&n.to_string());
            } else {
                out.push_str(&value(&v, &schema.field_options(&field).unit));
            }
        } else {
            out.push_str(&rest[start..start + end + 1]);
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}
