//! Submission-time safety: every recipe is checked against the configured devices'
//! capabilities and declared limits before anything is stored. Drivers check each command again
//! before it goes on the wire; this is the first of the two gates.
//!
//! Every refusal names the field path (`experiments[0].steps[1].furnace.segments[0].ramp.
//! temperature_c`), the value and the limit, so a planner can fix its recipe without guessing.

use pb::{furnace_segment, step};
use ppu_drivers::device::Segment;
use ppu_drivers::{DeviceError, StepCommand};
use ppu_proto::v1 as pb;

use crate::devices::Devices;
pub use crate::error::{Rejection, RejectionKind};
use crate::limits::Limits;

/// Largest batch accepted in one call.
pub const MAX_BATCH: usize = 10_000;

fn finite(path: &str, v: f64) -> Result<f64, Rejection> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Rejection::invalid(
            path,
            format!("{v} is not a finite number"),
        ))
    }
}

fn positive(path: &str, v: f64) -> Result<f64, Rejection> {
    if finite(path, v)? > 0.0 {
        Ok(v)
    } else {
        Err(Rejection::invalid(
            path,
            format!("{v} must be greater than 0"),
        ))
    }
}

fn non_negative(path: &str, v: f64) -> Result<f64, Rejection> {
    if finite(path, v)? >= 0.0 {
        Ok(v)
    } else {
        Err(Rejection::invalid(
            path,
            format!("{v} must not be negative"),
        ))
    }
}

/// The driver command for a submitted step, after checking the step's own numbers (finite,
/// signs, order); `path` is the step's path for error messages.
pub fn step_command(s: &pb::Step, path: &str) -> Result<StepCommand, Rejection> {
    let Some(kind) = &s.kind else {
        return Err(Rejection::invalid(
            path,
            "no step kind set (one of dispense, weigh, furnace, degas, isotherm, refill)",
        ));
    };
    let optional = |field: &str, v: f64| -> Result<Option<f64>, Rejection> {
        Ok((non_negative(field, v)? > 0.0).then_some(v))
    };
    Ok(match kind {
        step::Kind::Furnace(p) => {
            let base = format!("{path}.furnace");
            if p.segments.is_empty() {
                return Err(Rejection::invalid(
                    format!("{base}.segments"),
                    "a furnace program needs at least one segment",
                ));
            }
            let mut segments = Vec::with_capacity(p.segments.len());
            for (k, seg) in p.segments.iter().enumerate() {
                let sp = format!("{base}.segments[{k}]");
                segments.push(match &seg.kind {
                    Some(furnace_segment::Kind::Ramp(r)) => Segment::Ramp {
                        temperature_c: finite(
                            &format!("{sp}.ramp.temperature_c"),
                            r.temperature_c,
                        )?,
                        rate_c_per_min: positive(
                            &format!("{sp}.ramp.rate_c_per_min"),
                            r.rate_c_per_min,
                        )?,
                    },
                    Some(furnace_segment::Kind::Hold(h)) => Segment::Hold {
                        duration_s: non_negative(&format!("{sp}.hold.duration_s"), h.duration_s)?,
                    },
                    Some(furnace_segment::Kind::Step(t)) => Segment::StepTo {
                        temperature_c: finite(
                            &format!("{sp}.step.temperature_c"),
                            t.temperature_c,
                        )?,
                    },
                    None => {
                        return Err(Rejection::invalid(
                            sp,
                            "no segment kind set (one of ramp, hold, step)",
                        ));
                    }
                });
            }
            StepCommand::FurnaceProgram { segments }
        }
        step::Kind::Dispense(d) => {
            let base = format!("{path}.dispense");
            if d.reagent.is_empty() {
                return Err(Rejection::invalid(
                    format!("{base}.reagent"),
                    "reagent is required",
                ));
            }
            StepCommand::Dispense {
                reagent: d.reagent.clone(),
                volume_ml: positive(&format!("{base}.volume_ml"), d.volume_ml)?,
                rate_ml_per_min: positive(&format!("{base}.rate_ml_per_min"), d.rate_ml_per_min)?,
            }
        }
        step::Kind::Refill(r) => {
            let base = format!("{path}.refill");
            if r.reagent.is_empty() {
                return Err(Rejection::invalid(
                    format!("{base}.reagent"),
                    "reagent is required",
                ));
            }
            StepCommand::Refill {
                reagent: r.reagent.clone(),
                volume_ml: optional(&format!("{base}.volume_ml"), r.volume_ml)?,
                rate_ml_per_min: optional(&format!("{base}.rate_ml_per_min"), r.rate_ml_per_min)?,
            }
        }
        step::Kind::Weigh(w) => StepCommand::Weigh {
            stability_timeout_s: optional(
                &format!("{path}.weigh.stability_timeout_s"),
                w.stability_timeout_s,
            )?,
        },
        step::Kind::Degas(d) => StepCommand::Degas {
            temperature_c: finite(&format!("{path}.degas.temperature_c"), d.temperature_c)?,
            duration_s: non_negative(&format!("{path}.degas.duration_s"), d.duration_s)?,
        },
        step::Kind::Isotherm(i) => {
            let base = format!("{path}.isotherm");
            if i.adsorptive.is_empty() {
                return Err(Rejection::invalid(
                    format!("{base}.adsorptive"),
                    "adsorptive is required, e.g. \"CO2\"",
                ));
            }
            if i.pressure_bar.is_empty() {
                return Err(Rejection::invalid(
                    format!("{base}.pressure_bar"),
                    "at least one pressure is required",
                ));
            }
            for (k, p) in i.pressure_bar.iter().enumerate() {
                let field = format!("{base}.pressure_bar[{k}]");
                positive(&field, *p)?;
                if k > 0 && *p <= i.pressure_bar[k - 1] {
                    return Err(Rejection::invalid(
                        field,
                        format!(
                            "{p} is not above the previous pressure {}: an adsorption branch must increase",
                            i.pressure_bar[k - 1]
                        ),
                    ));
                }
            }
            StepCommand::Isotherm {
                adsorptive: i.adsorptive.clone(),
                temperature_c: finite(&format!("{base}.temperature_c"), i.temperature_c)?,
                pressures_bar: i.pressure_bar.clone(),
                equilibration_interval_s: optional(
                    &format!("{base}.equilibration_interval_s"),
                    i.equilibration_interval_s,
                )?,
                max_equilibration_s: optional(
                    &format!("{base}.max_equilibration_s"),
                    i.max_equilibration_s,
                )?,
                sample_mass_g: optional(&format!("{base}.sample_mass_g"), i.sample_mass_g)?,
            }
        }
        step::Kind::Transfer(_) => {
            return Err(Rejection::invalid(
                format!("{path}.transfer"),
                "transfer steps are inserted by the scheduler, not submitted",
            ));
        }
    })
}

/// Sub-path of a step kind, to prefix driver-reported field names.
fn kind_prefix(cmd: &StepCommand) -> &'static str {
    match cmd {
        StepCommand::FurnaceProgram { .. } => "furnace",
        StepCommand::Dispense { .. } => "dispense",
        StepCommand::Refill { .. } => "refill",
        StepCommand::Weigh { .. } => "weigh",
        StepCommand::Degas { .. } => "degas",
        StepCommand::Isotherm { .. } => "isotherm",
    }
}

fn limit_rejection(step_path: &str, cmd: &StepCommand, device: &str, e: DeviceError) -> Rejection {
    match e {
        DeviceError::Limit {
            field,
            value,
            limit,
        } => Rejection::invalid(
            format!("{step_path}.{}.{field}", kind_prefix(cmd)),
            format!("{value} exceeds {limit} of device {device}"),
        ),
        other => Rejection::invalid(step_path, format!("refused by device {device}: {other}")),
    }
}

/// The devices' verdict on a step: its own check (limits), then the values it declares it
/// accepts ([`ppu_drivers::Limits::accepted`]), generic over every family.
fn device_check(
    d: &crate::devices::DeviceHandle,
    cmd: &StepCommand,
    path: &str,
) -> Result<(), Refusal> {
    d.driver.check(cmd).map_err(|e| match e {
        DeviceError::Unsupported(why) => Refusal::Unsupported {
            device: d.id().to_owned(),
            why,
        },
        e => Refusal::Limit(limit_rejection(path, cmd, d.id(), e)),
    })?;
    match d.driver.info().limits.refused_value(cmd) {
        None => Ok(()),
        Some(r) => Err(Refusal::Value {
            field: format!("{path}.{}.{}", kind_prefix(cmd), r.parameter),
            value: r.value.to_owned(),
            accepted: format!("{} accepts {}", d.id(), r.accepted.join(", ")),
        }),
    }
}

/// Why one device refuses a step.
enum Refusal {
    /// Over a declared limit: the rejection to report.
    Limit(Rejection),
    /// A text parameter names a value the device does not accept.
    Value {
        field: String,
        value: String,
        /// "DEVICE accepts A, B".
        accepted: String,
    },
    /// Not this device's kind of step (e.g. another pump's reagent).
    Unsupported { device: String, why: String },
}

/// Checks one step against the devices: a pinned device must exist, have the capability and
/// accept the step; an unpinned step must fit at least one device with the capability.
pub fn check_step(s: &pb::Step, path: &str, devices: &Devices) -> Result<(), Rejection> {
    let cmd = step_command(s, path)?;
    let cap = cmd.capability();
    if !s.device_id.is_empty() {
        let dev_path = format!("{path}.device_id");
        let Some(d) = devices.get(&s.device_id) else {
            return Err(Rejection::invalid(
                dev_path,
                format!("unknown device \"{}\"", s.device_id),
            ));
        };
        if !d.has(cap) {
            return Err(Rejection::invalid(
                dev_path,
                format!("device \"{}\" has no capability {cap}", s.device_id),
            ));
        }
        return device_check(d, &cmd, path).map_err(|r| match r {
            Refusal::Limit(r) => r,
            Refusal::Value {
                field,
                value,
                accepted,
            } => Rejection::invalid(field, format!("{value:?} is not accepted ({accepted})")),
            Refusal::Unsupported { device, why } => {
                limit_rejection(path, &cmd, &device, DeviceError::Unsupported(why))
            }
        });
    }
    // A device that would take this kind of step but for a limit explains the refusal best;
    // then a value no device accepts (an unknown adsorptive), with what each accepts; "not my
    // reagent" from every pump means the step names something no device holds.
    let mut limit_refusal = None;
    let mut value_refusal: Option<(String, String)> = None;
    let mut accepted = Vec::new();
    let mut unsupported = Vec::new();
    for d in devices.with(cap) {
        match device_check(d, &cmd, path) {
            Ok(()) => return Ok(()),
            Err(Refusal::Unsupported { device, why }) => {
                unsupported.push(format!("{device}: {why}"))
            }
            Err(Refusal::Value {
                field,
                value,
                accepted: a,
            }) => {
                value_refusal.get_or_insert((field, value));
                accepted.push(a);
            }
            Err(Refusal::Limit(r)) => {
                limit_refusal.get_or_insert(r);
            }
        }
    }
    if let Some(r) = limit_refusal {
        return Err(r);
    }
    if let Some((field, value)) = value_refusal {
        return Err(Rejection::invalid(
            field,
            format!(
                "{value:?} is not accepted by any device with capability {cap} ({})",
                accepted.join("; ")
            ),
        ));
    }
    if unsupported.is_empty() {
        return Err(Rejection {
            kind: RejectionKind::Precondition,
            field: path.to_owned(),
            reason: format!("no device with capability {cap}"),
        });
    }
    let field = match &cmd {
        StepCommand::Dispense { .. } | StepCommand::Refill { .. } => {
            format!("{path}.{}.reagent", kind_prefix(&cmd))
        }
        _ => path.to_owned(),
    };
    Err(Rejection::invalid(
        field,
        format!(
            "no device with capability {cap} accepts it ({})",
            unsupported.join("; ")
        ),
    ))
}

/// A refusal of `path` for holding `n` `what` where `limit` (the `[limits]` key) allows `max`.
fn too_many(path: String, n: usize, what: &str, max: usize, limit: &str) -> Rejection {
    Rejection::invalid(path, format!("{n} {what}, at most {max} (limits.{limit})"))
}

fn text(path: impl FnOnce() -> String, v: &str, max: usize, limit: &str) -> Result<(), Rejection> {
    if v.len() > max {
        Err(too_many(path(), v.len(), "bytes", max, limit))
    } else {
        Ok(())
    }
}

/// Checks a submission against the size bounds of `[limits]`: counts (steps, segments, points,
/// labels), string lengths and the encoded size of each experiment, so that nothing stored,
/// listed or carried by an event can grow without bound. Runs before anything else looks at
/// the batch; every refusal names the field path and the `[limits]` key.
pub fn check_bounds(req: &pb::SubmitBatchRequest, l: &Limits) -> Result<(), Rejection> {
    for (i, e) in req.experiments.iter().enumerate() {
        let path = format!("experiments[{i}]");
        text(
            || format!("{path}.name"),
            &e.name,
            l.max_text_bytes,
            "max_text_bytes",
        )?;
        text(
            || format!("{path}.sample_id"),
            &e.sample_id,
            l.max_text_bytes,
            "max_text_bytes",
        )?;
        if e.labels.len() > l.max_labels {
            return Err(too_many(
                format!("{path}.labels"),
                e.labels.len(),
                "labels",
                l.max_labels,
                "max_labels",
            ));
        }
        for (k, v) in &e.labels {
            if k.len() > l.max_label_key_bytes {
                return Err(Rejection::invalid(
                    format!("{path}.labels"),
                    format!(
                        "a key of {} bytes, at most {} (limits.max_label_key_bytes)",
                        k.len(),
                        l.max_label_key_bytes
                    ),
                ));
            }
            if v.len() > l.max_label_value_bytes {
                return Err(Rejection::invalid(
                    format!("{path}.labels"),
                    format!(
                        "the value of {k:?} has {} bytes, at most {} \
                         (limits.max_label_value_bytes)",
                        v.len(),
                        l.max_label_value_bytes
                    ),
                ));
            }
        }
        if e.steps.len() > l.max_experiment_steps {
            return Err(too_many(
                format!("{path}.steps"),
                e.steps.len(),
                "steps",
                l.max_experiment_steps,
                "max_experiment_steps",
            ));
        }
        for (j, s) in e.steps.iter().enumerate() {
            let sp = format!("{path}.steps[{j}]");
            let t = l.max_text_bytes;
            text(
                || format!("{sp}.device_id"),
                &s.device_id,
                t,
                "max_text_bytes",
            )?;
            match &s.kind {
                Some(step::Kind::Furnace(p)) if p.segments.len() > l.max_program_segments => {
                    return Err(too_many(
                        format!("{sp}.furnace.segments"),
                        p.segments.len(),
                        "segments",
                        l.max_program_segments,
                        "max_program_segments",
                    ));
                }
                Some(step::Kind::Dispense(d)) => {
                    text(
                        || format!("{sp}.dispense.reagent"),
                        &d.reagent,
                        t,
                        "max_text_bytes",
                    )?;
                }
                Some(step::Kind::Refill(r)) => {
                    text(
                        || format!("{sp}.refill.reagent"),
                        &r.reagent,
                        t,
                        "max_text_bytes",
                    )?;
                }
                Some(step::Kind::Isotherm(iso)) => {
                    text(
                        || format!("{sp}.isotherm.adsorptive"),
                        &iso.adsorptive,
                        t,
                        "max_text_bytes",
                    )?;
                    if iso.pressure_bar.len() > l.max_isotherm_points {
                        return Err(too_many(
                            format!("{sp}.isotherm.pressure_bar"),
                            iso.pressure_bar.len(),
                            "points",
                            l.max_isotherm_points,
                            "max_isotherm_points",
                        ));
                    }
                }
                _ => {}
            }
        }
        let size = prost::Message::encoded_len(e);
        if size > l.max_experiment_bytes {
            return Err(too_many(
                path,
                size,
                "bytes encoded",
                l.max_experiment_bytes,
                "max_experiment_bytes",
            ));
        }
    }
    Ok(())
}

/// Validates a whole submission. Structural and numeric errors (INVALID_ARGUMENT) are
/// reported before missing capabilities (FAILED_PRECONDITION), so a planner fixes its own
/// mistakes first.
pub fn check_batch(req: &pb::SubmitBatchRequest, devices: &Devices) -> Result<(), Rejection> {
    if req.idempotency_key.is_empty() {
        return Err(Rejection::invalid(
            "idempotency_key",
            "an idempotency key is required",
        ));
    }
    if req.idempotency_key.len() > 128 {
        return Err(Rejection::invalid(
            "idempotency_key",
            "longer than 128 bytes",
        ));
    }
    if req.experiments.is_empty() {
        return Err(Rejection::invalid(
            "experiments",
            "a batch needs at least one experiment",
        ));
    }
    if req.experiments.len() > MAX_BATCH {
        return Err(Rejection::invalid(
            "experiments",
            format!(
                "{} experiments exceed the limit of {MAX_BATCH} per batch",
                req.experiments.len()
            ),
        ));
    }
    for (i, e) in req.experiments.iter().enumerate() {
        let path = format!("experiments[{i}]");
        if e.steps.is_empty() {
            return Err(Rejection::invalid(
                format!("{path}.steps"),
                "an experiment needs at least one step",
            ));
        }
        for (j, s) in e.steps.iter().enumerate() {
            step_command(s, &format!("{path}.steps[{j}]"))?;
        }
    }
    let mut precondition = None;
    for (i, e) in req.experiments.iter().enumerate() {
        for (j, s) in e.steps.iter().enumerate() {
            match check_step(s, &format!("experiments[{i}].steps[{j}]"), devices) {
                Ok(()) => {}
                Err(r) if r.kind == RejectionKind::Precondition => {
                    precondition.get_or_insert(r);
                }
                Err(r) => return Err(r),
            }
        }
    }
    precondition.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use ppu_drivers::device::{
        Capability, DeviceInfo, DeviceStatus, Family, Limits as DeviceLimits, StepContext,
        StepOutput,
    };

    use super::*;

    /// An analyser that declares the adsorptives it accepts; `check` accepts anything else
    /// (the daemon's own check must be generic over the declaration).
    struct Declaring(DeviceInfo);

    #[async_trait::async_trait]
    impl ppu_drivers::Device for Declaring {
        fn info(&self) -> &DeviceInfo {
            &self.0
        }
        fn check(&self, _: &StepCommand) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn execute(
            &self,
            _: &StepCommand,
            _: StepContext,
        ) -> Result<StepOutput, DeviceError> {
            Err(DeviceError::Unsupported("not in this test".into()))
        }
        async fn status(&self) -> Result<DeviceStatus, DeviceError> {
            Ok(DeviceStatus::default())
        }
        async fn safe_state(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn confirm_safe(&self) -> Result<ppu_drivers::SafeCheck, DeviceError> {
            Ok(ppu_drivers::SafeCheck::Safe)
        }
    }

    fn analyser(id: &str, adsorptives: &[&str]) -> Arc<dyn ppu_drivers::Device> {
        Arc::new(Declaring(DeviceInfo {
            id: id.into(),
            family: Family::Analyser,
            driver: "test".into(),
            transport: "in-process".into(),
            capabilities: vec![Capability::Isotherm],
            limits: DeviceLimits {
                accepted: BTreeMap::from([(
                    "adsorptive".to_owned(),
                    adsorptives.iter().map(|a| (*a).to_owned()).collect(),
                )]),
                ..DeviceLimits::default()
            },
        }))
    }

    fn devices(list: Vec<Arc<dyn ppu_drivers::Device>>) -> Devices {
        Devices::with_retry(list, |_| crate::devices::RetryPolicy::default())
    }

    #[test]
    fn a_value_no_device_declares_is_refused_at_submission_naming_field_and_accepted_set() {
        let lab = devices(vec![
            analyser("analyser-1", &["CO2", "N2"]),
            analyser("analyser-2", &["Ar"]),
        ]);
        let req = |adsorptive: &str, device: &str| pb::SubmitBatchRequest {
            idempotency_key: "k".into(),
            experiments: vec![pb::ExperimentSpec {
                steps: vec![
                    furnace(1),
                    furnace(1),
                    pb::Step {
                        device_id: device.into(),
                        ..isotherm(adsorptive, 3)
                    },
                ],
                ..Default::default()
            }],
        };
        let field = "experiments[0].steps[2].isotherm.adsorptive";
        // Furnace steps have no device here: that is a FAILED_PRECONDITION, reported after
        // the adsorptive's INVALID_ARGUMENT.
        let r = check_batch(&req("XENON-999", ""), &lab).expect_err("unknown gas");
        assert_eq!(r.kind, RejectionKind::Invalid, "{r:?}");
        assert_eq!(r.field, field);
        assert!(r.reason.contains("\"XENON-999\""), "{r:?}");
        assert!(r.reason.contains("analyser-1 accepts CO2, N2"), "{r:?}");
        assert!(r.reason.contains("analyser-2 accepts Ar"), "{r:?}");

        let r = check_batch(&req("Ar", "analyser-1"), &lab).expect_err("not on this one");
        assert_eq!(r.kind, RejectionKind::Invalid, "{r:?}");
        assert_eq!(r.field, field);
        assert!(r.reason.contains("analyser-1 accepts CO2, N2"), "{r:?}");

        // Declared values pass, whatever their ASCII case; the pinned device's own set counts.
        for (gas, device) in [
            ("co2", ""),
            ("N2", "analyser-1"),
            ("Ar", ""),
            ("AR", "analyser-2"),
        ] {
            let r = check_batch(&req(gas, device), &lab).expect_err("no furnace");
            assert_eq!(
                r.kind,
                RejectionKind::Precondition,
                "{gas} on {device:?}: {r:?}"
            );
            assert_eq!(r.field, "experiments[0].steps[0]");
        }
    }

    fn furnace(segments: usize) -> pb::Step {
        pb::Step {
            device_id: String::new(),
            kind: Some(step::Kind::Furnace(pb::FurnaceProgram {
                segments: vec![
                    pb::FurnaceSegment {
                        kind: Some(furnace_segment::Kind::Hold(pb::Hold { duration_s: 1.0 })),
                    };
                    segments
                ],
            })),
        }
    }

    fn isotherm(adsorptive: &str, points: usize) -> pb::Step {
        pb::Step {
            device_id: String::new(),
            kind: Some(step::Kind::Isotherm(pb::Isotherm {
                adsorptive: adsorptive.into(),
                temperature_c: 25.0,
                pressure_bar: (1..=points).map(|k| k as f64 / 1000.0).collect(),
                ..Default::default()
            })),
        }
    }

    fn dispense(reagent: &str) -> pb::Step {
        pb::Step {
            device_id: String::new(),
            kind: Some(step::Kind::Dispense(pb::Dispense {
                reagent: reagent.into(),
                volume_ml: 1.0,
                rate_ml_per_min: 1.0,
            })),
        }
    }

    fn batch(e: pb::ExperimentSpec) -> pb::SubmitBatchRequest {
        let fine = pb::ExperimentSpec {
            name: "fine".into(),
            steps: vec![furnace(3)],
            ..Default::default()
        };
        pb::SubmitBatchRequest {
            idempotency_key: "k".into(),
            experiments: vec![fine, e],
        }
    }

    fn spec(steps: Vec<pb::Step>) -> pb::ExperimentSpec {
        pb::ExperimentSpec {
            name: "x".into(),
            steps,
            ..Default::default()
        }
    }

    #[test]
    fn each_bound_refuses_naming_its_field_path_and_limit() {
        let long = |n: usize| "x".repeat(n);
        let l = Limits::default();
        let labels = |n: usize, key: usize, value: usize| {
            (0..n)
                .map(|k| (format!("{k}{}", long(key)), long(value)))
                .collect()
        };
        let cases: Vec<(pb::ExperimentSpec, &str, &str)> = vec![
            (
                spec(vec![furnace(500_000)]),
                "experiments[1].steps[0].furnace.segments",
                "max_program_segments",
            ),
            (
                spec(vec![furnace(1); 1001]),
                "experiments[1].steps",
                "max_experiment_steps",
            ),
            (
                spec(vec![furnace(1), isotherm("CO2", 1001)]),
                "experiments[1].steps[1].isotherm.pressure_bar",
                "max_isotherm_points",
            ),
            (
                spec(vec![isotherm(&long(257), 3)]),
                "experiments[1].steps[0].isotherm.adsorptive",
                "max_text_bytes",
            ),
            (
                spec(vec![dispense(&long(257))]),
                "experiments[1].steps[0].dispense.reagent",
                "max_text_bytes",
            ),
            (
                spec(vec![pb::Step {
                    device_id: long(257),
                    ..furnace(1)
                }]),
                "experiments[1].steps[0].device_id",
                "max_text_bytes",
            ),
            (
                pb::ExperimentSpec {
                    name: long(257),
                    ..spec(vec![furnace(1)])
                },
                "experiments[1].name",
                "max_text_bytes",
            ),
            (
                pb::ExperimentSpec {
                    sample_id: long(257),
                    ..spec(vec![furnace(1)])
                },
                "experiments[1].sample_id",
                "max_text_bytes",
            ),
            (
                pb::ExperimentSpec {
                    labels: labels(65, 0, 1),
                    ..spec(vec![furnace(1)])
                },
                "experiments[1].labels",
                "max_labels",
            ),
            (
                pb::ExperimentSpec {
                    labels: labels(1, 128, 1),
                    ..spec(vec![furnace(1)])
                },
                "experiments[1].labels",
                "max_label_key_bytes",
            ),
            (
                pb::ExperimentSpec {
                    labels: labels(1, 3, 100_000),
                    ..spec(vec![furnace(1)])
                },
                "experiments[1].labels",
                "max_label_value_bytes",
            ),
            (
                // Every count within its bound, the whole too large.
                spec(vec![furnace(1000); 11]),
                "experiments[1]",
                "max_experiment_bytes",
            ),
        ];
        for (e, field, limit) in cases {
            let r = check_bounds(&batch(e), &l).expect_err(field);
            assert_eq!(r.kind, RejectionKind::Invalid, "{r:?}");
            assert_eq!(r.field, field, "{r:?}");
            assert!(r.reason.contains(&format!("(limits.{limit})")), "{r:?}");
        }
    }

    #[test]
    fn a_recipe_at_every_bound_passes_and_bounds_follow_the_config() {
        let l = Limits::default();
        let mut e = spec(vec![furnace(1000), isotherm("CO2", 1000)]);
        e.name = "n".repeat(256);
        e.labels = (0..64)
            .map(|k| (format!("{k:0>128}"), "v".repeat(10)))
            .collect();
        check_bounds(&batch(e.clone()), &l).expect("at the bounds");
        let tight = Limits {
            max_program_segments: 999,
            ..Limits::default()
        };
        let r = check_bounds(&batch(e), &tight).expect_err("one segment over");
        assert_eq!(r.field, "experiments[1].steps[0].furnace.segments");
        assert_eq!(
            r.reason,
            "1000 segments, at most 999 (limits.max_program_segments)"
        );
    }
}
