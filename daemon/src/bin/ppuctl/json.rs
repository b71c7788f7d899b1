//! `--json` output: explicit serde_json renderings of ppu.v1 messages.
//!
//! Conventions (close to the proto3 JSON mapping, made friendlier for `jq`): keys are the proto
//! field names (snake_case); enums are their full proto names (`EXPERIMENT_STATE_RUNNING`), or
//! the number if unknown to this client; timestamps are RFC 3339 strings (null if unset); 64-bit
//! integers are JSON numbers; every field is present, including defaults; a oneof appears as
//! the single key of the variant that is set (as in batch files), so an experiment's `spec` has
//! the batch-file shape and can be pasted into a batch file.

use ppu_proto::v1 as pb;
use prost_types::Timestamp;
use serde_json::{Map, Value, json};

fn enum_name<E: TryFrom<i32>>(v: i32, name: impl Fn(&E) -> &'static str) -> Value {
    match E::try_from(v) {
        Ok(e) => Value::from(name(&e)),
        Err(_) => Value::from(v),
    }
}

fn time(ts: Option<&Timestamp>) -> Value {
    ts.map_or(Value::Null, |t| {
        let mut t = *t;
        t.normalize();
        Value::from(t.to_string())
    })
}

fn labels<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> Value {
    let map: Map<String, Value> = labels
        .into_iter()
        .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
        .collect();
    Value::Object(map)
}

pub fn experiment_state(v: i32) -> Value {
    enum_name(v, pb::ExperimentState::as_str_name)
}

pub fn spec(s: &pb::ExperimentSpec) -> Value {
    json!({
        "name": s.name,
        "sample_id": s.sample_id,
        "labels": labels(&s.labels),
        "priority": s.priority,
        "steps": s.steps.iter().map(step).collect::<Vec<_>>(),
    })
}

pub fn step(s: &pb::Step) -> Value {
    use pb::step::Kind;
    let mut o = Map::new();
    o.insert("device_id".into(), Value::from(s.device_id.as_str()));
    let (key, body) = match &s.kind {
        Some(Kind::Dispense(d)) => (
            "dispense",
            json!({
                "reagent": d.reagent,
                "volume_ml": d.volume_ml,
                "rate_ml_per_min": d.rate_ml_per_min,
            }),
        ),
        Some(Kind::Weigh(w)) => (
            "weigh",
            json!({ "stability_timeout_s": w.stability_timeout_s }),
        ),
        Some(Kind::Furnace(f)) => (
            "furnace",
            json!({ "segments": f.segments.iter().map(segment).collect::<Vec<_>>() }),
        ),
        Some(Kind::Degas(d)) => (
            "degas",
            json!({ "temperature_c": d.temperature_c, "duration_s": d.duration_s }),
        ),
        Some(Kind::Isotherm(i)) => (
            "isotherm",
            json!({
                "adsorptive": i.adsorptive,
                "temperature_c": i.temperature_c,
                "pressure_bar": i.pressure_bar,
            }),
        ),
        None => return Value::Object(o),
    };
    o.insert(key.into(), body);
    Value::Object(o)
}

fn segment(s: &pb::FurnaceSegment) -> Value {
    use pb::furnace_segment::Kind;
    match &s.kind {
        Some(Kind::Ramp(r)) => json!({
            "ramp": { "temperature_c": r.temperature_c, "rate_c_per_min": r.rate_c_per_min }
        }),
        Some(Kind::Hold(h)) => json!({ "hold": { "duration_s": h.duration_s } }),
        Some(Kind::Step(t)) => json!({ "step": { "temperature_c": t.temperature_c } }),
        None => json!({}),
    }
}

pub fn batch(b: &pb::Batch) -> Value {
    json!({
        "id": b.id,
        "idempotency_key": b.idempotency_key,
        "experiment_ids": b.experiment_ids,
        "created_at": time(b.created_at.as_ref()),
    })
}

pub fn submit_response(r: &pb::SubmitBatchResponse) -> Value {
    json!({
        "batch": r.batch.as_ref().map_or(Value::Null, batch),
        "duplicate": r.duplicate,
    })
}

pub fn experiment(e: &pb::Experiment) -> Value {
    json!({
        "id": e.id,
        "batch_id": e.batch_id,
        "spec": e.spec.as_ref().map_or(Value::Null, spec),
        "state": experiment_state(e.state),
        "current_step": e.current_step,
        "results": e.results.iter().map(step_result).collect::<Vec<_>>(),
        "message": e.message,
        "created_at": time(e.created_at.as_ref()),
        "updated_at": time(e.updated_at.as_ref()),
    })
}

pub fn step_result(r: &pb::StepResult) -> Value {
    let mut v = json!({
        "step_index": r.step_index,
        "device_id": r.device_id,
        "outcome": enum_name(r.outcome, pb::StepOutcome::as_str_name),
        "message": r.message,
        "started_at": time(r.started_at.as_ref()),
        "finished_at": time(r.finished_at.as_ref()),
    });
    if let Some(pb::step_result::Result::Furnace(f)) = &r.result {
        v["furnace"] = furnace_result(f);
    }
    v
}

fn furnace_result(f: &pb::FurnaceResult) -> Value {
    json!({
        "trace": f.trace.iter().map(|s| json!({
            "t_s": s.t_s,
            "pv_c": s.pv_c,
            "working_sp_c": s.working_sp_c,
            "output_pct": s.output_pct,
        })).collect::<Vec<_>>(),
        "max_overshoot_c": f.max_overshoot_c,
        "targets": f.targets.iter().map(|t| json!({
            "segment_index": t.segment_index,
            "temperature_c": t.temperature_c,
            "reached_at_s": t.reached_at_s,
            "tolerance_c": t.tolerance_c,
        })).collect::<Vec<_>>(),
    })
}

pub fn queue(q: &pb::Queue) -> Value {
    json!({
        "state": enum_name(q.state, pb::QueueState::as_str_name),
        "running_ids": q.running_ids,
        "queued_ids": q.queued_ids,
    })
}

pub fn device(d: &pb::Device) -> Value {
    let l = d.limits.unwrap_or_default();
    json!({
        "id": d.id,
        "family": enum_name(d.family, pb::DeviceFamily::as_str_name),
        "driver": d.driver,
        "transport": d.transport,
        "connection": enum_name(d.connection, pb::ConnectionState::as_str_name),
        "capabilities": d.capabilities.iter()
            .map(|c| enum_name(*c, pb::Capability::as_str_name))
            .collect::<Vec<_>>(),
        // Unset limits are null ("no limit of this kind").
        "limits": {
            "max_temperature_c": l.max_temperature_c,
            "min_temperature_c": l.min_temperature_c,
            "max_rate_c_per_min": l.max_rate_c_per_min,
            "max_hold_s": l.max_hold_s,
            "max_volume_ml": l.max_volume_ml,
            "max_rate_ml_per_min": l.max_rate_ml_per_min,
            "max_pressure_bar": l.max_pressure_bar,
        },
        "latest": d.latest.as_ref().map_or(Value::Null, reading),
        "connection_error": d.connection_error,
    })
}

pub fn reading(r: &pb::DeviceReading) -> Value {
    let values: Map<String, Value> = r
        .values
        .iter()
        .map(|v| (v.name.clone(), Value::from(v.value)))
        .collect();
    json!({
        "device_id": r.device_id,
        "time": time(r.time.as_ref()),
        // A name → value object is far easier to use than the proto's list of pairs.
        "values": values,
        "alarms": r.alarms,
    })
}

pub fn event(e: &pb::Event) -> Value {
    use pb::event::Kind;
    let mut v = json!({
        "sequence": e.sequence,
        "time": time(e.time.as_ref()),
        "experiment_id": e.experiment_id,
        "batch_id": e.batch_id,
        "device_id": e.device_id,
    });
    let (key, body) = match &e.kind {
        Some(Kind::ExperimentStateChanged(c)) => (
            "experiment_state_changed",
            json!({
                "from": experiment_state(c.from),
                "to": experiment_state(c.to),
                "reason": c.reason,
            }),
        ),
        Some(Kind::StepStarted(s)) => (
            "step_started",
            json!({
                "step_index": s.step_index,
                "step": s.step.as_ref().map_or(Value::Null, step),
            }),
        ),
        Some(Kind::StepProgress(p)) => (
            "step_progress",
            json!({
                "step_index": p.step_index,
                "fraction": p.fraction,
                "message": p.message,
                "remaining_s": p.remaining_s,
            }),
        ),
        Some(Kind::StepFinished(f)) => (
            "step_finished",
            json!({ "result": f.result.as_ref().map_or(Value::Null, step_result) }),
        ),
        Some(Kind::DeviceReading(r)) => ("device_reading", reading(r)),
        Some(Kind::DeviceConnectionChanged(c)) => (
            "device_connection_changed",
            json!({
                "state": enum_name(c.state, pb::ConnectionState::as_str_name),
                "reason": c.reason,
            }),
        ),
        Some(Kind::Alarm(a)) => (
            "alarm",
            json!({
                "code": a.code,
                "message": a.message,
                "severity": enum_name(a.severity, pb::AlarmSeverity::as_str_name),
                "cleared": a.cleared,
            }),
        ),
        Some(Kind::QueueStateChanged(q)) => (
            "queue_state_changed",
            json!({ "paused": q.paused, "reason": q.reason }),
        ),
        None => return v,
    };
    v[key] = body;
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch_file;

    /// An experiment's `spec` in JSON has the batch-file shape: it parses back to the same spec.
    #[test]
    fn spec_json_round_trips_through_the_batch_format() {
        let text = include_str!("../../../../examples/batch.toml");
        let batch = batch_file::parse(text.as_bytes(), batch_file::Format::Toml).unwrap();
        let doc = json!({ "experiments": batch.experiments.iter().map(spec).collect::<Vec<_>>() });
        let again =
            batch_file::parse(doc.to_string().as_bytes(), batch_file::Format::Json).unwrap();
        assert_eq!(again.experiments, batch.experiments);
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
