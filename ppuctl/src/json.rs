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
                "equilibration_interval_s": i.equilibration_interval_s,
                "max_equilibration_s": i.max_equilibration_s,
                "sample_mass_g": i.sample_mass_g,
            }),
        ),
        Some(Kind::Refill(r)) => (
            "refill",
            json!({
                "reagent": r.reagent,
                "volume_ml": r.volume_ml,
                "rate_ml_per_min": r.rate_ml_per_min,
            }),
        ),
        Some(Kind::Transfer(t)) => (
            "transfer",
            json!({
                "sample_id": t.sample_id,
                "from_device_id": t.from_device_id,
                "to_device_id": t.to_device_id,
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
        "held": e.held,
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
    use pb::step_result::Result as R;
    let (key, body) = match &r.result {
        Some(R::Furnace(f)) => ("furnace", furnace_result(f)),
        Some(R::Dispense(d)) => (
            "dispense",
            json!({
                "reagent": d.reagent,
                "requested_volume_ml": d.requested_volume_ml,
                "pump_volume_ml": d.pump_volume_ml,
                // Null without a balance.
                "measured_mass_g": d.measured_mass_g,
                "expected_mass_g": d.expected_mass_g,
                "relative_deviation": d.relative_deviation,
                "remaining_ml": d.remaining_ml,
            }),
        ),
        Some(R::Weigh(w)) => ("weigh", json!({ "mass_g": w.mass_g, "stable": w.stable })),
        Some(R::Degas(d)) => (
            "degas",
            json!({
                "temperature_c": d.temperature_c,
                "duration_s": d.duration_s,
                "final_pressure_bar": d.final_pressure_bar,
            }),
        ),
        Some(R::Isotherm(i)) => (
            "isotherm",
            json!({
                "adsorptive": i.adsorptive,
                "temperature_c": i.temperature_c,
                "sample_mass_g": i.sample_mass_g,
                "degas_temperature_c": i.degas_temperature_c,
                "degas_duration_s": i.degas_duration_s,
                "points": i.points.iter().map(isotherm_point).collect::<Vec<_>>(),
                "instrument": i.instrument,
            }),
        ),
        Some(R::Refill(r)) => (
            "refill",
            json!({ "reagent": r.reagent, "volume_ml": r.volume_ml, "fill_ml": r.fill_ml }),
        ),
        Some(R::Transfer(t)) => ("transfer", json!({ "confirmed_by": t.confirmed_by })),
        None => return v,
    };
    v[key] = body;
    v
}

fn isotherm_point(p: &pb::IsothermPoint) -> Value {
    json!({
        "pressure_bar": p.pressure_bar,
        "p0_bar": p.p0_bar,
        "amount_mmol_per_g": p.amount_mmol_per_g,
        "equilibration_time_s": p.equilibration_time_s,
    })
}

pub fn pending_transfer(t: &pb::PendingTransfer) -> Value {
    json!({
        "id": t.id,
        "experiment_id": t.experiment_id,
        "step_index": t.step_index,
        "sample_id": t.sample_id,
        "from_device_id": t.from_device_id,
        "to_device_id": t.to_device_id,
        "requested_at": time(t.requested_at.as_ref()),
    })
}

pub fn active_alarm(a: &pb::ActiveAlarm) -> Value {
    json!({
        "device_id": a.device_id,
        "code": a.code,
        "message": a.message,
        "severity": enum_name(a.severity, pb::AlarmSeverity::as_str_name),
        "raised_at": time(a.raised_at.as_ref()),
        "cleared": a.cleared,
        "acknowledged": a.acknowledged,
        "acknowledged_by": a.acknowledged_by,
        "acknowledged_at": time(a.acknowledged_at.as_ref()),
    })
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
        "held_ids": q.held_ids,
    })
}

pub fn device(d: &pb::Device) -> Value {
    let l = d.limits.clone().unwrap_or_default();
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
            // Accepted values by parameter name, e.g. {"adsorptive": ["CO2", "N2"]}.
            "accepted": l.accepted.iter()
                .map(|(k, v)| (k.clone(), json!(v.values)))
                .collect::<Map<_, _>>(),
        },
        "latest": d.latest.as_ref().map_or(Value::Null, reading),
        "connection_error": d.connection_error,
        "maintenance": d.maintenance,
        "maintenance_reason": d.maintenance_reason,
        "unsafe": d.r#unsafe,
        "unsafe_reason": d.unsafe_reason,
        "holds_sample_id": d.holds_sample_id,
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
        Some(Kind::IsothermPointMeasured(m)) => (
            "isotherm_point_measured",
            json!({
                "step_index": m.step_index,
                "point_index": m.point_index,
                "point": m.point.as_ref().map_or(Value::Null, isotherm_point),
            }),
        ),
        Some(Kind::DeviceReserved(r)) => ("device_reserved", json!({ "step_index": r.step_index })),
        Some(Kind::DeviceReleased(r)) => ("device_released", json!({ "step_index": r.step_index })),
        Some(Kind::TransferRequested(t)) => (
            "transfer_requested",
            json!({ "transfer": t.transfer.as_ref().map_or(Value::Null, pending_transfer) }),
        ),
        Some(Kind::TransferConfirmed(c)) => (
            "transfer_confirmed",
            json!({
                "transfer": c.transfer.as_ref().map_or(Value::Null, pending_transfer),
                "confirmed_by": c.confirmed_by,
            }),
        ),
        Some(Kind::RecoveryDecision(r)) => (
            "recovery_decision",
            json!({ "action": r.action, "step_index": r.step_index, "detail": r.detail }),
        ),
        Some(Kind::MaintenanceChanged(m)) => (
            "maintenance_changed",
            json!({ "maintenance": m.maintenance, "reason": m.reason }),
        ),
        Some(Kind::AlarmAcknowledged(a)) => (
            "alarm_acknowledged",
            json!({ "code": a.code, "acknowledged_by": a.acknowledged_by }),
        ),
        Some(Kind::ExperimentHeld(h)) => (
            "experiment_held",
            json!({ "held": h.held, "reason": h.reason }),
        ),
        Some(Kind::ExperimentMoved(m)) => (
            "experiment_moved",
            json!({ "position": m.position, "priority": m.priority }),
        ),
        Some(Kind::Audit(a)) => (
            "audit",
            json!({
                "principal": a.principal,
                "role": a.role,
                "method": a.method,
                "request_id": a.request_id,
                "code": a.code,
                "message": a.message,
                "target": a.target,
                "transport": a.transport,
            }),
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
        let text = include_str!("../../examples/batch.toml");
        let batch = batch_file::parse(text.as_bytes(), batch_file::Format::Toml).unwrap();
        let doc = json!({ "experiments": batch.experiments.iter().map(spec).collect::<Vec<_>>() });
        let again =
            batch_file::parse(doc.to_string().as_bytes(), batch_file::Format::Json).unwrap();
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
        let batch = batch_file::parse(text.as_bytes(), batch_file::Format::Toml).unwrap();
        let doc = json!({ "experiments": batch.experiments.iter().map(spec).collect::<Vec<_>>() });
        assert_eq!(
            doc["experiments"][0]["steps"][0]["refill"]["volume_ml"],
            5.0
        );
        assert_eq!(
            doc["experiments"][0]["steps"][1]["isotherm"]["sample_mass_g"],
            0.12
        );
        let again =
            batch_file::parse(doc.to_string().as_bytes(), batch_file::Format::Json).unwrap();
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
