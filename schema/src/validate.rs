//! Generic validation of a command against its schema: one walker for every family.
//!
//! Two passes, because they answer different questions. [`structure`] needs no device: numbers
//! are finite and within their static bounds, required text is present, lists have their
//! items, a oneof has a member, and lists stay within the daemon's size limits. [`device`]
//! compares the values with one device's declared [`Limits`](crate::Limits) and accepted
//! values. Every refusal names the field path below the step (`furnace.segments[0].ramp.
//! temperature_c`) and a reason a planner can act on.

use prost_reflect::{DynamicMessage, Kind, ReflectMessage, Value};

use crate::{Limits, Schema};

/// A refused field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// Path below the caller's prefix, e.g. `segments[0].ramp.temperature_c`.
    pub path: String,
    pub reason: String,
}

/// Why a device refuses a command's value.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceRefusal {
    /// Beyond a declared numeric limit.
    Limit {
        path: String,
        value: f64,
        /// `max_temperature_c 400`.
        limit: String,
    },
    /// A text value the device does not accept.
    Value {
        path: String,
        value: String,
        accepted: Vec<String>,
    },
}

/// Where the walk is, below the caller's prefix: kept as parts and formatted only when a value
/// is refused (a submission checks every field of every step; most are fine).
struct Path<'p> {
    prefix: &'p str,
    parts: Vec<Part>,
}

enum Part {
    Field(prost_reflect::FieldDescriptor),
    Index(usize),
}

impl<'p> Path<'p> {
    fn new(prefix: &'p str) -> Self {
        Self {
            prefix,
            parts: Vec::with_capacity(8),
        }
    }

    /// `prefix.field[i].field`.
    fn render(&self) -> String {
        let mut out = self.prefix.to_owned();
        for part in &self.parts {
            match part {
                Part::Field(f) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(f.name());
                }
                Part::Index(i) => {
                    out.push('[');
                    out.push_str(&i.to_string());
                    out.push(']');
                }
            }
        }
        out
    }

    /// The path of `field` below this one.
    fn with(&self, field: &prost_reflect::FieldDescriptor) -> String {
        let mut out = self.render();
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(field.name());
        out
    }
}

fn is_number(kind: &Kind) -> bool {
    matches!(
        kind,
        Kind::Double
            | Kind::Float
            | Kind::Int32
            | Kind::Int64
            | Kind::Uint32
            | Kind::Uint64
            | Kind::Sint32
            | Kind::Sint64
            | Kind::Fixed32
            | Kind::Fixed64
            | Kind::Sfixed32
            | Kind::Sfixed64
    )
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::F64(x) => Some(*x),
        Value::F32(x) => Some(f64::from(*x)),
        Value::I32(x) => Some(f64::from(*x)),
        Value::I64(x) => Some(*x as f64),
        Value::U32(x) => Some(f64::from(*x)),
        Value::U64(x) => Some(*x as f64),
        _ => None,
    }
}

/// What [`walk`] calls on each scalar: its field's options, its path and its value.
type Visit<'a, E> =
    dyn FnMut(&crate::options::FieldOptions, &Path<'_>, &Value) -> Result<(), E> + 'a;

/// Calls `f` on every set scalar of `msg` (list items one by one) with its path, recursing
/// into nested messages.
fn walk<E>(
    schema: &Schema,
    msg: &DynamicMessage,
    path: &mut Path<'_>,
    f: &mut Visit<'_, E>,
) -> Result<(), E> {
    for (field, value) in msg.fields() {
        let opts = schema.field_options(&field);
        path.parts.push(Part::Field(field.clone()));
        let r = match value {
            Value::List(items) => items.iter().enumerate().try_for_each(|(i, item)| {
                path.parts.push(Part::Index(i));
                let r = match item {
                    Value::Message(m) => walk(schema, m, path, f),
                    v => f(opts, path, v),
                };
                path.parts.pop();
                r
            }),
            Value::Message(m) => walk(schema, m, path, f),
            v => f(opts, path, v),
        };
        path.parts.pop();
        r?;
    }
    Ok(())
}

/// Checks sizes against the daemon's `[limits]`, which `limit` resolves by key: each list
/// within its field's `max_items_limit`, each text within `max_text_bytes`. Run first on
/// anything received, so nothing stored can grow without bound.
pub fn bounds(
    schema: &Schema,
    msg: &DynamicMessage,
    prefix: &str,
    limit: &dyn Fn(&str) -> Option<usize>,
) -> Result<(), FieldError> {
    let mut path = Path::new(prefix);
    lists_within(schema, msg, &mut path, limit)?;
    let max_text = limit("max_text_bytes");
    walk(
        schema,
        msg,
        &mut path,
        &mut |_, path, value| match (value.as_str(), max_text) {
            (Some(text), Some(max)) if text.len() > max => Err(FieldError {
                path: path.render(),
                reason: format!(
                    "{} bytes, at most {max} (limits.max_text_bytes)",
                    text.len()
                ),
            }),
            _ => Ok(()),
        },
    )
}

fn lists_within(
    schema: &Schema,
    msg: &DynamicMessage,
    path: &mut Path<'_>,
    limit: &dyn Fn(&str) -> Option<usize>,
) -> Result<(), FieldError> {
    for (field, value) in msg.fields() {
        let opts = schema.field_options(&field);
        if let Value::List(items) = value
            && !opts.max_items_limit.is_empty()
            && let Some(max) = limit(&opts.max_items_limit)
            && items.len() > max
        {
            return Err(FieldError {
                path: path.with(&field),
                reason: format!(
                    "{} {}, at most {max} (limits.{})",
                    items.len(),
                    field.name(),
                    opts.max_items_limit
                ),
            });
        }
        path.parts.push(Part::Field(field.clone()));
        let r = match value {
            Value::Message(m) => lists_within(schema, m, path, limit),
            Value::List(items) => items.iter().enumerate().try_for_each(|(i, item)| {
                let Value::Message(m) = item else {
                    return Ok(());
                };
                path.parts.push(Part::Index(i));
                let r = lists_within(schema, m, path, limit);
                path.parts.pop();
                r
            }),
            _ => Ok(()),
        };
        path.parts.pop();
        r?;
    }
    Ok(())
}

/// Checks what needs no device: numbers finite and within static bounds, required text
/// present, lists with their least number of items (and increasing where declared), a oneof
/// member set.
pub fn structure(schema: &Schema, msg: &DynamicMessage, prefix: &str) -> Result<(), FieldError> {
    let mut path = Path::new(prefix);
    presence(schema, msg, &mut path)?;
    // Values: finite, static bounds.
    walk(schema, msg, &mut path, &mut |opts, path, value| {
        let Some(v) = number(value) else {
            return Ok(());
        };
        let err = |reason: String| {
            Err(FieldError {
                path: path.render(),
                reason,
            })
        };
        if !v.is_finite() {
            return err(format!("{v} is not a finite number"));
        }
        if opts.zero_is_default && v == 0.0 {
            return Ok(());
        }
        if let Some(min) = opts.min {
            if opts.exclusive_min && v <= min {
                return err(if min == 0.0 {
                    format!("{v} must be greater than 0")
                } else {
                    format!("{v} must be greater than {min}")
                });
            }
            if v < min {
                return err(if min == 0.0 {
                    format!("{v} must not be negative")
                } else {
                    format!("{v} is below the minimum {min}")
                });
            }
        }
        if let Some(max) = opts.max
            && v > max
        {
            return err(format!("{v} exceeds the maximum {max}"));
        }
        Ok(())
    })?;
    order(schema, msg, &mut path)
}

/// Presence, in `msg` and every message below it: required text, least list lengths, oneofs;
/// these look at unset fields too.
fn presence(schema: &Schema, msg: &DynamicMessage, path: &mut Path<'_>) -> Result<(), FieldError> {
    let desc = msg.descriptor();
    // Presence: required text, list lengths, oneofs; these look at unset fields too.
    for oneof in desc.oneofs() {
        if oneof.is_synthetic() {
            continue;
        }
        if !oneof.fields().any(|f| msg.has_field(&f)) {
            let names: Vec<String> = oneof.fields().map(|f| f.name().to_owned()).collect();
            return Err(FieldError {
                path: path.render(),
                reason: format!("no {} set (one of {})", oneof.name(), names.join(", ")),
            });
        }
    }
    for field in desc.fields() {
        let opts = schema.field_options(&field);
        if field.is_list() {
            let n = match &*msg.get_field(&field) {
                Value::List(items) => items.len(),
                _ => 0,
            };
            if n < opts.min_items as usize {
                return Err(FieldError {
                    path: path.with(&field),
                    reason: if opts.min_items == 1 {
                        format!("at least one {} is required", singular(field.name()))
                    } else {
                        format!("at least {} items are required", opts.min_items)
                    },
                });
            }
        } else if let Some(min) = opts.min
            && !opts.zero_is_default
            && !msg.has_field(&field)
            && field.containing_oneof().is_none()
            && is_number(&field.kind())
            && (min > 0.0 || (opts.exclusive_min && min >= 0.0))
        {
            // Unset on the wire is 0 in proto3: a bound that refuses 0 refuses it.
            return Err(FieldError {
                path: path.with(&field),
                reason: if opts.exclusive_min && min == 0.0 {
                    "0 must be greater than 0".to_owned()
                } else {
                    format!("0 is below the minimum {min}")
                },
            });
        } else if opts.required
            && matches!(field.kind(), Kind::String)
            && msg
                .get_field(&field)
                .as_str()
                .is_none_or(|s| s.trim().is_empty())
        {
            let example = if opts.example.is_empty() {
                String::new()
            } else {
                format!(", e.g. {:?}", opts.example)
            };
            return Err(FieldError {
                path: path.with(&field),
                reason: format!("{} is required{example}", field.name()),
            });
        }
    }
    // Nested messages (and list items) get the same checks.
    for (field, value) in msg.fields() {
        path.parts.push(Part::Field(field.clone()));
        let r = match value {
            Value::Message(m) => presence(schema, m, path),
            Value::List(items) => items.iter().enumerate().try_for_each(|(i, item)| {
                let Value::Message(m) = item else {
                    return Ok(());
                };
                path.parts.push(Part::Index(i));
                let r = presence(schema, m, path);
                path.parts.pop();
                r
            }),
            _ => Ok(()),
        };
        path.parts.pop();
        r?;
    }
    Ok(())
}

/// Order, once every value is known to be valid on its own: lists declared `increasing`.
fn order(schema: &Schema, msg: &DynamicMessage, path: &mut Path<'_>) -> Result<(), FieldError> {
    for field in msg.descriptor().fields() {
        let opts = schema.field_options(&field);
        if opts.increasing
            && let Value::List(items) = &*msg.get_field(&field)
        {
            let values: Vec<f64> = items.iter().filter_map(number).collect();
            for (k, pair) in values.windows(2).enumerate() {
                if pair[1] <= pair[0] {
                    return Err(FieldError {
                        path: format!("{}[{}]", path.with(&field), k + 1),
                        reason: format!(
                            "{} is not above the previous value {}: the values must increase",
                            pair[1], pair[0]
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// `segments` → `segment`, `pressure_bar` → `pressure_bar`: enough for messages.
fn singular(name: &str) -> String {
    name.strip_suffix('s').unwrap_or(name).to_owned()
}

/// Checks the values against one device's limits and accepted values.
pub fn device(
    schema: &Schema,
    msg: &DynamicMessage,
    prefix: &str,
    limits: &Limits,
) -> Result<(), DeviceRefusal> {
    walk(
        schema,
        msg,
        &mut Path::new(prefix),
        &mut |opts, path, value| {
            if !opts.accepted.is_empty()
                && let Some(text) = value.as_str()
                && !limits.accepts(&opts.accepted, text)
            {
                return Err(DeviceRefusal::Value {
                    path: path.render(),
                    value: text.to_owned(),
                    accepted: limits
                        .accepted
                        .get(&opts.accepted)
                        .cloned()
                        .unwrap_or_default(),
                });
            }
            let Some(v) = number(value) else {
                return Ok(());
            };
            if opts.zero_is_default && v == 0.0 {
                return Ok(());
            }
            let limit = |name: &str| (!name.is_empty()).then(|| limits.get(name)).flatten();
            if let Some(max) = limit(&opts.max_limit)
                && v > max
            {
                return Err(DeviceRefusal::Limit {
                    path: path.render(),
                    value: v,
                    limit: format!("{} {max}", opts.max_limit),
                });
            }
            if let Some(min) = limit(&opts.min_limit)
                && v < min
            {
                return Err(DeviceRefusal::Limit {
                    path: path.render(),
                    value: v,
                    limit: format!("{} {min}", opts.min_limit),
                });
            }
            Ok(())
        },
    )
}

/// The limit names a family's commands refer to (`max_limit`, `min_limit`), for checking a
/// device's configuration.
pub fn limit_names(schema: &Schema, family: &str) -> Vec<String> {
    family_names(schema, family, |o| {
        [o.max_limit.as_str(), o.min_limit.as_str()]
    })
}

/// The accepted-value parameter names a family's commands refer to (`reagent`, `gas`).
pub fn accepted_names(schema: &Schema, family: &str) -> Vec<String> {
    family_names(schema, family, |o| [o.accepted.as_str(), ""])
}

/// The non-empty names `pick` reads from the field options of a family's commands and every
/// message below them, once each, in order.
fn family_names(
    schema: &Schema,
    family: &str,
    pick: impl Fn(&crate::options::FieldOptions) -> [&str; 2],
) -> Vec<String> {
    fn visit(
        schema: &Schema,
        desc: &prost_reflect::MessageDescriptor,
        pick: &dyn Fn(&crate::options::FieldOptions) -> [&str; 2],
        out: &mut Vec<String>,
        seen: &mut std::collections::HashSet<String>,
    ) {
        if !seen.insert(desc.full_name().to_owned()) {
            return;
        }
        for field in desc.fields() {
            for name in pick(schema.field_options(&field)) {
                if !name.is_empty() && !out.iter().any(|n| n == name) {
                    out.push(name.to_owned());
                }
            }
            if let Kind::Message(m) = field.kind() {
                visit(schema, &m, pick, out, seen);
            }
        }
    }
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for c in schema.commands().iter().filter(|c| c.family == family) {
        visit(schema, &c.message, &pick, &mut out, &mut seen);
    }
    out
}
