//! Submission-time safety: every recipe is checked against the configured devices'
//! capabilities and declared limits before anything is stored. Drivers check each command again
//! before it goes on the wire; this is the first of the two gates.
//!
//! Generic over families: a step's command is resolved and checked against its family's schema
//! ([`crate::command`]), then against each candidate device's declared limits and accepted
//! values ([`ppu_schema::validate::device`]), then by the driver itself ([`Device::check`]).
//! Every refusal names the field path (`experiments[0].steps[1].furnace.segments[0].ramp.
//! temperature_c`), the value and the limit, so a planner can fix its recipe without guessing.
//!
//! [`Device::check`]: ppu_drivers::Device::check

use std::collections::HashMap;

use ppu_drivers::DeviceError;
use ppu_proto::v1 as pb;
use ppu_schema::validate::{self, DeviceRefusal};

use crate::command::{self, Command, Resolved};
use crate::devices::Devices;
pub use crate::error::{Rejection, RejectionKind};
use crate::limits::Limits;

/// Largest batch accepted in one call.
pub const MAX_BATCH: usize = 10_000;

/// The command of a submitted step, resolved against the schema and checked for what needs no
/// device; `path` is the step's path for error messages. A transfer is refused: the scheduler
/// inserts those.
pub fn step_command(s: &pb::Step, path: &str) -> Result<Command, Rejection> {
    match command::resolve_checked(crate::schema::schema(), s, path)? {
        Resolved::Command(c) => Ok(c),
        Resolved::Transfer(_) => Err(Rejection::invalid(
            format!("{path}.transfer"),
            "transfer steps are inserted by the scheduler, not submitted",
        )),
    }
}

fn limit_rejection(step_path: &str, cmd: &Command, device: &str, e: DeviceError) -> Rejection {
    match e {
        DeviceError::Limit {
            field,
            value,
            limit,
        } => Rejection::invalid(
            format!("{step_path}.{}.{field}", cmd.name),
            format!("{value} exceeds {limit} of device {device}"),
        ),
        other => Rejection::invalid(step_path, format!("refused by device {device}: {other}")),
    }
}

/// The devices' verdict on a step: the schema's bounds tied to its declared limits, the values
/// it declares it accepts, then the driver's own check; generic over every family.
fn device_check(
    d: &crate::devices::DeviceHandle,
    cmd: &Command,
    path: &str,
) -> Result<(), Refusal> {
    let info = d.driver.info();
    let prefix = format!("{path}.{}", cmd.name);
    match validate::device(crate::schema::schema(), &cmd.message, &prefix, &info.limits) {
        Ok(()) => {}
        Err(DeviceRefusal::Limit { path, value, limit }) => {
            return Err(Refusal::Limit(Rejection::invalid(
                path,
                format!("{value} exceeds {limit} of device {}", d.id()),
            )));
        }
        Err(DeviceRefusal::Value {
            path,
            value,
            accepted,
        }) => {
            return Err(Refusal::Value {
                field: path,
                value,
                accepted: format!("{} accepts {}", d.id(), accepted.join(", ")),
            });
        }
    }
    d.driver.check(&cmd.step).map_err(|e| match e {
        DeviceError::Unsupported(why) => Refusal::Unsupported {
            device: d.id().to_owned(),
            why,
        },
        e => Refusal::Limit(limit_rejection(path, cmd, d.id(), e)),
    })
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
pub fn check_step(s: &pb::Step, path: &str, devices: &Devices) -> Result<Command, Rejection> {
    let cmd = step_command(s, path)?;
    check_command(&cmd, &s.device_id, path, devices)?;
    Ok(cmd)
}

/// Checks a resolved command against the devices (see [`check_step`]).
pub fn check_command(
    cmd: &Command,
    device_id: &str,
    path: &str,
    devices: &Devices,
) -> Result<(), Rejection> {
    let cap = cmd.capability;
    if !device_id.is_empty() {
        let dev_path = format!("{path}.device_id");
        let Some(d) = devices.get(device_id) else {
            return Err(Rejection::invalid(
                dev_path,
                format!("unknown device \"{device_id}\""),
            ));
        };
        if !d.has(cap) {
            return Err(Rejection::invalid(
                dev_path,
                format!("device \"{device_id}\" has no capability {cap}"),
            ));
        }
        return device_check(d, cmd, path).map_err(|r| match r {
            Refusal::Limit(r) => r,
            Refusal::Value {
                field,
                value,
                accepted,
            } => Rejection::invalid(field, format!("{value:?} is not accepted ({accepted})")),
            Refusal::Unsupported { device, why } => {
                limit_rejection(path, cmd, &device, DeviceError::Unsupported(why))
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
        match device_check(d, cmd, path) {
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
    // Every device refused it as not its own: name the field that selects the device (the
    // schema's accepted-value field, e.g. a pump's reagent), else the step.
    let field = selecting_field(cmd)
        .map(|f| format!("{path}.{}.{f}", cmd.name))
        .unwrap_or_else(|| path.to_owned());
    Err(Rejection::invalid(
        field,
        format!(
            "no device with capability {cap} accepts it ({})",
            unsupported.join("; ")
        ),
    ))
}

/// The command's first top-level field whose value must be one a device accepts.
fn selecting_field(cmd: &Command) -> Option<String> {
    use ppu_schema::prost_reflect::ReflectMessage;
    let schema = crate::schema::schema();
    cmd.message
        .descriptor()
        .fields()
        .find(|f| !schema.field_options(f).accepted.is_empty())
        .map(|f| f.name().to_owned())
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
            // A transfer is refused later, with its reason; an unresolvable step too.
            if !matches!(s.kind, Some(pb::step::Kind::Transfer(_))) {
                command::check_bounds(crate::schema::schema(), s, &sp, &|k| l.get(k))?;
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
/// On success, each experiment's first command, checked once here, to be carried to the
/// queue (parse once).
pub fn check_batch(
    req: &pb::SubmitBatchRequest,
    devices: &Devices,
) -> Result<Vec<FirstStep>, Rejection> {
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
    // A batch repeats its recipes (a campaign runs the same program on many samples): a step
    // identical on the wire to one already checked, device pin included, has the same
    // verdict, so each distinct step is resolved and checked once. Only passing steps are
    // ever looked up again: the first refusal ends the check.
    let mut distinct: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut commands: Vec<Command> = Vec::new();
    let mut steps: Vec<Vec<usize>> = Vec::with_capacity(req.experiments.len());
    for (i, e) in req.experiments.iter().enumerate() {
        let path = format!("experiments[{i}]");
        if e.steps.is_empty() {
            return Err(Rejection::invalid(
                format!("{path}.steps"),
                "an experiment needs at least one step",
            ));
        }
        let mut of_experiment = Vec::with_capacity(e.steps.len());
        for (j, s) in e.steps.iter().enumerate() {
            let key = prost::Message::encode_to_vec(s);
            let k = match distinct.get(&key) {
                Some(k) => *k,
                None => {
                    commands.push(step_command(s, &format!("{path}.steps[{j}]"))?);
                    distinct.insert(key, commands.len() - 1);
                    commands.len() - 1
                }
            };
            of_experiment.push(k);
        }
        steps.push(of_experiment);
    }
    let mut precondition = None;
    let mut checked = vec![false; commands.len()];
    for (i, e) in req.experiments.iter().enumerate() {
        for (j, s) in e.steps.iter().enumerate() {
            let k = steps[i][j];
            if checked[k] {
                continue;
            }
            checked[k] = true;
            let path = format!("experiments[{i}].steps[{j}]");
            match check_command(&commands[k], &s.device_id, &path, devices) {
                Ok(()) => {}
                Err(r) if r.kind == RejectionKind::Precondition => {
                    precondition.get_or_insert(r);
                }
                Err(r) => return Err(r),
            }
        }
    }
    match precondition {
        Some(r) => Err(r),
        None => Ok(steps
            .iter()
            .filter_map(|of| of.first())
            .map(|k| FirstStep::from(&commands[*k]))
            .collect()),
    }
}

/// What the queue keeps of a checked step: the capability that runs it and the command its
/// driver gets (not its decoded form, which only the checks need).
#[derive(Debug, Clone, PartialEq)]
pub struct FirstStep {
    pub capability: &'static str,
    pub step: ppu_drivers::StepCommand,
}

impl From<&Command> for FirstStep {
    fn from(c: &Command) -> Self {
        Self {
            capability: c.capability,
            step: c.step.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pb::{furnace_segment, step};
    use ppu_drivers::StepCommand;
    use ppu_drivers::device::{
        DeviceInfo, DeviceStatus, Limits as DeviceLimits, StepContext, StepOutput,
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
            family: "analyser".to_owned(),
            driver: "test".into(),
            transport: "in-process".into(),
            capabilities: vec!["isotherm".to_owned()],
            limits: DeviceLimits::default().accepting("adsorptive", adsorptives.iter().copied()),
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

    /// Identical steps are checked once per batch, but a step differing only in its device pin
    /// is another step: its refusal names its own path.
    #[test]
    fn repeated_steps_are_checked_once_and_a_different_pin_is_checked_on_its_own() {
        let lab = devices(vec![analyser("analyser-1", &["CO2"])]);
        let same = |n: usize| pb::SubmitBatchRequest {
            idempotency_key: "k".into(),
            experiments: (0..n)
                .map(|_| pb::ExperimentSpec {
                    name: "x".into(),
                    steps: vec![isotherm("CO2", 3)],
                    ..Default::default()
                })
                .collect(),
        };
        let firsts = check_batch(&same(3), &lab).expect("three identical isotherms pass");
        assert_eq!(firsts.len(), 3);
        assert!(firsts.iter().all(|f| f.capability == "isotherm"));
        let mut req = same(3);
        req.experiments[2].steps[0].device_id = "analyser-9".into();
        let r = check_batch(&req, &lab).expect_err("unknown device");
        assert_eq!(r.field, "experiments[2].steps[0].device_id", "{r:?}");
        let mut req = same(2);
        req.experiments[1].steps[0] = isotherm("XENON", 3);
        let r = check_batch(&req, &lab).expect_err("unknown gas");
        assert_eq!(
            r.field, "experiments[1].steps[0].isotherm.adsorptive",
            "{r:?}"
        );
    }
}
