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
use tonic::{Code, Status};

use crate::devices::Devices;

/// Largest batch accepted in one call.
pub const MAX_BATCH: usize = 10_000;
/// Longest idempotency key, name or label.
pub const MAX_TEXT: usize = 256;
/// Metadata key carrying the offending field path in an error status.
pub const FIELD_PATH_METADATA: &str = "ppu-field-path";

/// Why a submission was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub code: Code,
    /// Path of the offending field; empty when the whole request is at fault.
    pub field: String,
    pub reason: String,
}

impl Rejection {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            code: Code::InvalidArgument,
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<Rejection> for Status {
    fn from(r: Rejection) -> Status {
        let msg = if r.field.is_empty() {
            r.reason
        } else {
            format!("{}: {}", r.field, r.reason)
        };
        let mut s = Status::new(r.code, msg);
        if let Ok(v) = r.field.parse() {
            s.metadata_mut().insert(FIELD_PATH_METADATA, v);
        }
        s
    }
}

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
        return d
            .driver
            .check(&cmd)
            .map_err(|e| limit_rejection(path, &cmd, d.id(), e));
    }
    // A device that would take this kind of step but for a limit explains the refusal best;
    // "not my reagent" from every pump means the step names something no device holds.
    let mut limit_refusal = None;
    let mut unsupported = Vec::new();
    for d in devices.with(cap) {
        match d.driver.check(&cmd) {
            Ok(()) => return Ok(()),
            Err(DeviceError::Unsupported(why)) => unsupported.push(format!("{}: {why}", d.id())),
            Err(e) => {
                limit_refusal.get_or_insert_with(|| limit_rejection(path, &cmd, d.id(), e));
            }
        }
    }
    if let Some(r) = limit_refusal {
        return Err(r);
    }
    if unsupported.is_empty() {
        return Err(Rejection {
            code: Code::FailedPrecondition,
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
        if e.name.len() > MAX_TEXT {
            return Err(Rejection::invalid(
                format!("{path}.name"),
                format!("longer than {MAX_TEXT} bytes"),
            ));
        }
        if e.sample_id.len() > MAX_TEXT {
            return Err(Rejection::invalid(
                format!("{path}.sample_id"),
                format!("longer than {MAX_TEXT} bytes"),
            ));
        }
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
                Err(r) if r.code == Code::FailedPrecondition => {
                    precondition.get_or_insert(r);
                }
                Err(r) => return Err(r),
            }
        }
    }
    precondition.map_or(Ok(()), Err)
}
