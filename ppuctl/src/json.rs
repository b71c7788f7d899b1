//! `--json` output: any ppu.v1 message as JSON, read through its descriptor.
//!
//! Conventions (close to the proto3 JSON mapping, made friendlier for `jq`): keys are the proto
//! field names (snake_case); enums are their full proto names (`EXPERIMENT_STATE_RUNNING`), or
//! the number if unknown to this client; timestamps are RFC 3339 strings (null if unset); 64-bit
//! integers are JSON numbers; every field is present, including defaults (an unset message or
//! optional field is null); a oneof appears as the single key of the variant that is set (as in
//! batch files), so an experiment's `spec` has the batch-file shape and can be pasted into a
//! batch file. A family's command or result carried as `google.protobuf.Any` (`Step.command`,
//! `StepResult.output`) is decoded through the daemon's schema and keyed by its command's step
//! name (`gas_flow`), like the typed ones; any other Any is its message with an `@type` key.
//! Two lists read better as objects: a reading's values (name → value) and a device's
//! accepted values (parameter → list).

use ppu_proto::v1 as pb;
use ppu_schema::prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MapKey, ReflectMessage, Value as PValue,
};
use ppu_schema::{Schema, type_name};
use prost::Message;
use prost_types::Timestamp;
use serde_json::{Map, Number, Value, json};

use crate::families;

/// `message` (of proto type `full_name`) as JSON, through the schema's descriptors.
fn message<M: Message>(full_name: &str, message: &M) -> Value {
    let schema = families::get();
    match schema.decode(full_name, &message.encode_to_vec()) {
        Ok(m) => dynamic(schema, &m),
        Err(e) => json!({ "error": e }),
    }
}

/// A dynamic message as JSON (see the module's conventions).
pub fn dynamic(schema: &Schema, m: &DynamicMessage) -> Value {
    let desc = m.descriptor();
    match desc.full_name() {
        "google.protobuf.Timestamp" => return timestamp(m),
        "google.protobuf.Any" => return any(schema, m).1,
        _ => {}
    }
    let mut o = Map::new();
    for f in desc.fields() {
        let in_oneof = f.containing_oneof().is_some_and(|o| !o.is_synthetic());
        let set = m.has_field(&f);
        if in_oneof && !set {
            continue;
        }
        if !set && f.supports_presence() {
            o.insert(f.name().to_owned(), Value::Null);
            continue;
        }
        let v = m.get_field(&f);
        if let (true, Kind::Message(k), PValue::Message(inner)) = (in_oneof, f.kind(), &*v)
            && k.full_name() == "google.protobuf.Any"
        {
            let (key, body) = any(schema, inner);
            o.insert(key.unwrap_or_else(|| f.name().to_owned()), body);
            continue;
        }
        o.insert(f.name().to_owned(), field(schema, &f, &v));
    }
    Value::Object(o)
}

fn field(schema: &Schema, f: &FieldDescriptor, v: &PValue) -> Value {
    match (f.full_name(), v) {
        // Name → value, far easier to use than the proto's list of pairs.
        ("ppu.v1.DeviceReading.values", PValue::List(items)) => {
            let mut o = Map::new();
            for item in items {
                if let PValue::Message(r) = item {
                    let name = r
                        .get_field_by_name("name")
                        .and_then(|n| n.as_str().map(str::to_owned));
                    let value = r
                        .get_field_by_name("value")
                        .map(|v| single(schema, &f.kind(), &v));
                    if let (Some(n), Some(v)) = (name, value) {
                        o.insert(n, v);
                    }
                }
            }
            Value::Object(o)
        }
        // Parameter → accepted values, e.g. {"adsorptive": ["CO2", "N2"]}.
        ("ppu.v1.DeviceLimits.accepted", PValue::Map(entries)) => {
            let mut o = Map::new();
            for (k, v) in entries {
                let values = match v {
                    PValue::Message(a) => a
                        .get_field_by_name("values")
                        .map_or(Value::Null, |v| single(schema, &Kind::String, &v)),
                    _ => Value::Null,
                };
                o.insert(map_key(k), values);
            }
            Value::Object(o)
        }
        (_, PValue::Map(entries)) => {
            let value_kind = match f.kind() {
                Kind::Message(entry) => entry.map_entry_value_field().kind(),
                k => k,
            };
            Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (map_key(k), single(schema, &value_kind, v)))
                    .collect(),
            )
        }
        _ => single(schema, &f.kind(), v),
    }
}

fn map_key(k: &MapKey) -> String {
    match k {
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(n) => n.to_string(),
        MapKey::I64(n) => n.to_string(),
        MapKey::U32(n) => n.to_string(),
        MapKey::U64(n) => n.to_string(),
        MapKey::String(s) => s.clone(),
    }
}

fn single(schema: &Schema, kind: &Kind, v: &PValue) -> Value {
    match v {
        PValue::Bool(b) => Value::Bool(*b),
        PValue::I32(n) => Value::from(*n),
        PValue::I64(n) => Value::from(*n),
        PValue::U32(n) => Value::from(*n),
        PValue::U64(n) => Value::from(*n),
        PValue::F32(x) => float(f64::from(*x)),
        PValue::F64(x) => float(*x),
        PValue::String(s) => Value::from(s.as_str()),
        PValue::Bytes(b) => Value::from(b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
        PValue::EnumNumber(n) => match kind {
            Kind::Enum(e) => e
                .get_value(*n)
                .map_or(Value::from(*n), |ev| Value::from(ev.name())),
            _ => Value::from(*n),
        },
        PValue::Message(m) => dynamic(schema, m),
        PValue::List(items) => {
            Value::Array(items.iter().map(|i| single(schema, kind, i)).collect())
        }
        PValue::Map(_) => Value::Null,
    }
}

/// A float as a JSON number; NaN and infinities (not JSON numbers) as null.
fn float(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn timestamp(m: &DynamicMessage) -> Value {
    let get = |name: &str| m.get_field_by_name(name);
    let seconds = get("seconds").and_then(|v| v.as_i64()).unwrap_or(0);
    let nanos = get("nanos").and_then(|v| v.as_i32()).unwrap_or(0);
    let mut t = Timestamp { seconds, nanos };
    t.normalize();
    Value::from(t.to_string())
}

/// An Any: the step name of the command its message is (or is the result of), if the schema
/// knows it, and its message as JSON (`@type` added where it is not a command's).
fn any(schema: &Schema, m: &DynamicMessage) -> (Option<String>, Value) {
    let url = m
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let bytes = m
        .get_field_by_name("value")
        .and_then(|v| v.as_bytes().map(|b| b.to_vec()))
        .unwrap_or_default();
    let name = schema
        .command(&url)
        .or_else(|| schema.command_by_result(&url))
        .filter(|c| {
            let t = type_name(&url);
            c.full_name() == t || c.result.as_ref().is_some_and(|r| r.full_name() == t)
        })
        .map(|c| c.name().to_owned());
    match schema.decode(&url, &bytes) {
        Ok(inner) => {
            let mut body = dynamic(schema, &inner);
            if name.is_none()
                && let Value::Object(o) = &mut body
            {
                o.insert("@type".into(), Value::from(url));
            }
            (name, body)
        }
        // A type this daemon's schema does not declare: shown, not dropped.
        Err(_) => (
            name,
            json!({ "@type": url, "value": single(schema, &Kind::Bytes, &PValue::Bytes(bytes.into())) }),
        ),
    }
}

#[cfg(test)]
pub fn spec(s: &pb::ExperimentSpec) -> Value {
    message("ppu.v1.ExperimentSpec", s)
}

pub fn submit_response(r: &pb::SubmitBatchResponse) -> Value {
    message("ppu.v1.SubmitBatchResponse", r)
}

pub fn experiment(e: &pb::Experiment) -> Value {
    message("ppu.v1.Experiment", e)
}

#[cfg(test)]
pub fn step_result(r: &pb::StepResult) -> Value {
    message("ppu.v1.StepResult", r)
}

pub fn pending_transfer(t: &pb::PendingTransfer) -> Value {
    message("ppu.v1.PendingTransfer", t)
}

pub fn active_alarm(a: &pb::ActiveAlarm) -> Value {
    message("ppu.v1.ActiveAlarm", a)
}

pub fn queue(q: &pb::Queue) -> Value {
    message("ppu.v1.Queue", q)
}

pub fn device(d: &pb::Device) -> Value {
    message("ppu.v1.Device", d)
}

pub fn reading(r: &pb::DeviceReading) -> Value {
    message("ppu.v1.DeviceReading", r)
}

pub fn event(e: &pb::Event) -> Value {
    message("ppu.v1.Event", e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch_file;

    /// An experiment's `spec` in JSON has the batch-file shape: it parses back to the same spec.
    #[test]
    fn spec_json_round_trips_through_the_batch_format() {
        let text = include_str!("../../examples/batch.toml");
        let batch =
            batch_file::parse(text.as_bytes(), batch_file::Format::Toml, families::get()).unwrap();
        let doc = json!({ "experiments": batch.experiments.iter().map(spec).collect::<Vec<_>>() });
        let again = batch_file::parse(
            doc.to_string().as_bytes(),
            batch_file::Format::Json,
            families::get(),
        )
        .unwrap();
        assert_eq!(again.experiments, batch.experiments);
    }

    /// The new step kinds and isotherm keys survive the JSON → batch file round trip.
    #[test]
    fn refill_and_isotherm_options_round_trip_through_the_batch_format() {
        let text = r#"
[[experiments]]
name = "sorption"
[[experiments.steps]]
refill = { reagent = "ethanol", volume_ml = 5.0, rate_ml_per_min = 2.0 }
[[experiments.steps]]
isotherm = { adsorptive = "CO2", temperature_c = 25.0, pressure_bar = [0.1, 1.0], equilibration_interval_s = 15.0, max_equilibration_s = 1800.0, sample_mass_g = 0.12 }
"#;
        let batch =
            batch_file::parse(text.as_bytes(), batch_file::Format::Toml, families::get()).unwrap();
        let doc = json!({ "experiments": batch.experiments.iter().map(spec).collect::<Vec<_>>() });
        assert_eq!(
            doc["experiments"][0]["steps"][0]["refill"]["volume_ml"],
            5.0
        );
        assert_eq!(
            doc["experiments"][0]["steps"][1]["isotherm"]["sample_mass_g"],
            0.12
        );
        let again = batch_file::parse(
            doc.to_string().as_bytes(),
            batch_file::Format::Json,
            families::get(),
        )
        .unwrap();
        assert_eq!(again.experiments, batch.experiments);
    }

    #[test]
    fn new_result_kinds_have_their_kind_as_a_key() {
        use pb::step_result::Result as R;
        let with = |result| pb::StepResult {
            step_index: 0,
            device_id: "d".into(),
            outcome: pb::StepOutcome::Succeeded as i32,
            message: String::new(),
            started_at: None,
            finished_at: None,
            result: Some(result),
        };
        let v = step_result(&with(R::Dispense(pb::DispenseResult {
            reagent: "A".into(),
            requested_volume_ml: 2.5,
            pump_volume_ml: 2.498,
            measured_mass_g: None,
            expected_mass_g: 1.973,
            relative_deviation: None,
            remaining_ml: 7.5,
        })));
        assert_eq!(v["dispense"]["pump_volume_ml"], 2.498);
        assert_eq!(v["dispense"]["measured_mass_g"], Value::Null);
        assert_eq!(v["dispense"]["relative_deviation"], Value::Null);

        let v = step_result(&with(R::Isotherm(pb::IsothermResult {
            adsorptive: "N2".into(),
            temperature_c: -196.15,
            sample_mass_g: 0.1,
            degas_temperature_c: 150.0,
            degas_duration_s: 7200.0,
            points: vec![pb::IsothermPoint {
                pressure_bar: 0.05,
                p0_bar: 1.013,
                amount_mmol_per_g: 4.5,
                equilibration_time_s: 90.0,
            }],
            instrument: "bridge".into(),
        })));
        assert_eq!(v["isotherm"]["points"][0]["amount_mmol_per_g"], 4.5);
        assert_eq!(v["isotherm"]["degas_duration_s"], 7200.0);
        assert!(v.get("furnace").is_none(), "{v:#}");

        let v = step_result(&with(R::Weigh(pb::WeighResult {
            mass_g: 0.1,
            stable: true,
        })));
        assert_eq!(v["weigh"], json!({ "mass_g": 0.1, "stable": true }));
        let v = step_result(&with(R::Transfer(pb::TransferResult {
            confirmed_by: "robot-2".into(),
        })));
        assert_eq!(v["transfer"]["confirmed_by"], "robot-2");
    }

    #[test]
    fn new_event_kinds_and_fields_are_rendered() {
        let e = pb::Event {
            sequence: 9,
            time: None,
            experiment_id: "E".into(),
            batch_id: String::new(),
            device_id: String::new(),
            kind: Some(pb::event::Kind::TransferConfirmed(pb::TransferConfirmed {
                transfer: Some(pb::PendingTransfer {
                    id: "T1".into(),
                    experiment_id: "E".into(),
                    step_index: 1,
                    sample_id: "S".into(),
                    from_device_id: "a".into(),
                    to_device_id: "b".into(),
                    requested_at: None,
                }),
                confirmed_by: "alice".into(),
            })),
        };
        let v = event(&e);
        assert_eq!(v["transfer_confirmed"]["transfer"]["to_device_id"], "b");
        assert_eq!(v["transfer_confirmed"]["confirmed_by"], "alice");

        let q = queue(&pb::Queue {
            state: pb::QueueState::Running as i32,
            running_ids: vec![],
            queued_ids: vec!["E".into()],
            held_ids: vec!["E".into()],
        });
        assert_eq!(q["held_ids"], json!(["E"]));

        let d = device(&pb::Device {
            id: "pump-1".into(),
            maintenance: true,
            maintenance_reason: "new seal".into(),
            holds_sample_id: "S".into(),
            ..Default::default()
        });
        assert_eq!(d["maintenance"], true);
        assert_eq!(d["maintenance_reason"], "new seal");
        assert_eq!(d["holds_sample_id"], "S");

        let a = active_alarm(&pb::ActiveAlarm {
            device_id: "furnace-1".into(),
            code: "sensor_break".into(),
            severity: pb::AlarmSeverity::Critical as i32,
            acknowledged: true,
            acknowledged_by: "alice".into(),
            ..Default::default()
        });
        assert_eq!(a["severity"], "ALARM_SEVERITY_CRITICAL");
        assert_eq!(a["acknowledged_at"], Value::Null);
    }

    #[test]
    fn event_has_its_kind_as_a_key() {
        let e = pb::Event {
            sequence: 7,
            time: None,
            experiment_id: "E".into(),
            batch_id: String::new(),
            device_id: String::new(),
            kind: Some(pb::event::Kind::ExperimentStateChanged(
                pb::ExperimentStateChanged {
                    from: pb::ExperimentState::Queued as i32,
                    to: pb::ExperimentState::Running as i32,
                    reason: String::new(),
                },
            )),
        };
        let v = event(&e);
        assert_eq!(v["sequence"], 7);
        assert_eq!(
            v["experiment_state_changed"]["to"],
            "EXPERIMENT_STATE_RUNNING"
        );
    }
}
