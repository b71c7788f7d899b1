//! The one mapping of the core's domain errors to SiLA errors, as ppu.v1's is `server.rs`'s
//! `From<…> for Status`: a SiLA error travels as the base64 `SiLAError` message of an ABORTED
//! status. Refusals name the fully qualified parameter and keep ppu.v1's field path and reason
//! in the message; what a command comes to at run time maps to the family features' defined
//! execution errors `DeviceFault`, `Aborted` and `Refused`.

use ppu_proto::v1 as pb;
use ppu_sila::error::{FrameworkErrorKind, SilaError};
use tonic::Status;

use crate::error::{Error, Rejection, RejectionKind};
use crate::state::State;

/// The status that carries `e`.
pub(crate) fn status(e: SilaError) -> Status {
    Status::aborted(e.to_details())
}

pub(crate) fn framework(kind: FrameworkErrorKind, message: impl Into<String>) -> Status {
    status(SilaError::Framework {
        kind,
        message: message.into(),
    })
}

pub(crate) fn undefined(message: impl Into<String>) -> Status {
    status(SilaError::UndefinedExecution {
        message: message.into(),
    })
}

/// A defined execution error of the feature `feature` (fully qualified identifier).
pub(crate) fn defined(feature: &str, error: &str, message: impl Into<String>) -> Status {
    status(SilaError::DefinedExecution {
        identifier: format!("{feature}/DefinedExecutionError/{error}"),
        message: message.into(),
    })
}

/// Where a submission's refusals point: the command whose parameters became the experiment's
/// one step.
pub(crate) struct Submitted<'a> {
    /// The command's fully qualified identifier (`ppu/devices/Furnace/v1/Command/FurnaceProgram`).
    pub command: String,
    /// The feature's fully qualified identifier, for its defined errors.
    pub feature: String,
    /// The parameter every refusal names when no finer one is known (ExperimentQueue's
    /// `Experiment`); `None`: find it from the field path.
    pub whole: Option<&'a str>,
    /// The step name in refusal paths (`furnace`), after `experiments[0].steps[0].`.
    pub step_name: &'a str,
    /// The command's parameter identifiers.
    pub parameters: Vec<String>,
}

/// Refusal paths start here: the batch's one experiment, its one step.
const STEP_PATH: &str = "experiments[0].steps[0].";
const EXPERIMENT_PATH: &str = "experiments[0].";

impl Submitted<'_> {
    fn parameter(&self, identifier: &str) -> String {
        format!("{}/Parameter/{identifier}", self.command)
    }

    /// The parameter a refusal's field path names: `device_id` is `Device`; otherwise the
    /// family message's field the path starts with, matched to the parameter whose
    /// identifier spells it (`temperature_c` ↔ `TemperatureC`).
    fn parameter_of(&self, field: &str) -> String {
        if let Some(p) = self.whole {
            return self.parameter(p);
        }
        let rest = field.strip_prefix(STEP_PATH).unwrap_or(field);
        let rest = rest
            .strip_prefix(self.step_name)
            .map(|r| r.trim_start_matches('.'))
            .unwrap_or(rest);
        let head = rest
            .split(['.', '['])
            .next()
            .unwrap_or_default()
            .replace('_', "")
            .to_lowercase();
        let head = if head == "deviceid" {
            "device".to_owned()
        } else {
            head
        };
        let found = self
            .parameters
            .iter()
            .find(|p| p.to_lowercase() == head)
            .or_else(|| self.parameters.first());
        self.parameter(found.map_or("Device", String::as_str))
    }

    /// The refusal's message: ppu.v1's `field: reason`, without the batch's own path.
    fn message(&self, r: &Rejection) -> String {
        let field = if self.whole.is_some() {
            r.field.strip_prefix(EXPERIMENT_PATH).unwrap_or(&r.field)
        } else {
            r.field.strip_prefix(STEP_PATH).unwrap_or(&r.field)
        };
        if field.is_empty() {
            r.reason.clone()
        } else {
            format!("{field}: {}", r.reason)
        }
    }

    /// The SiLA error of a refused submission.
    pub(crate) fn refused(&self, e: Error) -> Status {
        match e {
            Error::Refused(r) => self.rejection(&r),
            Error::NotFound(m) | Error::Conflict(m) => defined(&self.feature, "Refused", m),
            other => undefined(other.to_string()),
        }
    }

    pub(crate) fn rejection(&self, r: &Rejection) -> Status {
        let message = self.message(r);
        match r.kind {
            RejectionKind::Invalid => status(SilaError::Validation {
                parameter: self.parameter_of(&r.field),
                message,
            }),
            RejectionKind::Precondition
                if r.field.ends_with("device_id") && self.whole.is_none() =>
            {
                status(SilaError::Validation {
                    parameter: self.parameter("Device"),
                    message,
                })
            }
            RejectionKind::NotFound | RejectionKind::Precondition => {
                defined(&self.feature, "Refused", message)
            }
            RejectionKind::Inconsistent => undefined(message),
        }
    }
}

/// What an experiment that ran a family command came to, when it did not succeed: a device
/// fault (its step failed), `Aborted` (cancelled, interrupted), `Refused` (it failed without
/// a step failing: refused at run time or at a restart).
pub(crate) fn ended(feature: &str, e: &pb::Experiment) -> Status {
    let state = State::from_proto(e.state);
    let message = if e.message.is_empty() {
        format!("experiment {} ended {:?}", e.id, state)
    } else {
        format!("experiment {}: {}", e.id, e.message)
    };
    match state {
        Some(State::Cancelled | State::Interrupted) => defined(feature, "Aborted", message),
        Some(State::Failed)
            if e.results
                .iter()
                .any(|r| r.outcome == pb::StepOutcome::Failed as i32) =>
        {
            defined(feature, "DeviceFault", message)
        }
        Some(State::Failed) => defined(feature, "Refused", message),
        _ => undefined(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(s: &Status) -> SilaError {
        assert_eq!(s.code(), tonic::Code::Aborted);
        SilaError::from_details(s.message().as_bytes()).expect("a SiLA error")
    }

    #[test]
    fn a_refused_field_names_its_parameter() {
        let at = Submitted {
            command: "ppu/devices/Furnace/v1/Command/FurnaceProgram".into(),
            feature: "ppu/devices/Furnace/v1".into(),
            whole: None,
            step_name: "furnace",
            parameters: vec!["Device".into(), "Segments".into()],
        };
        let r = Rejection {
            kind: RejectionKind::Invalid,
            field: "experiments[0].steps[0].furnace.segments[0].ramp.temperature_c".into(),
            reason: "2000 exceeds 1200".into(),
        };
        match decoded(&at.rejection(&r)) {
            SilaError::Validation { parameter, message } => {
                assert_eq!(
                    parameter,
                    "ppu/devices/Furnace/v1/Command/FurnaceProgram/Parameter/Segments"
                );
                assert_eq!(
                    message,
                    "furnace.segments[0].ramp.temperature_c: 2000 exceeds 1200"
                );
            }
            other => panic!("{other:?}"),
        }
        let pinned = Rejection {
            kind: RejectionKind::Precondition,
            field: "experiments[0].steps[0].device_id".into(),
            reason: "in maintenance".into(),
        };
        assert!(matches!(
            decoded(&at.rejection(&pinned)),
            SilaError::Validation { parameter, .. } if parameter.ends_with("/Parameter/Device")
        ));
    }

    #[test]
    fn an_ended_experiment_maps_to_the_defined_errors() {
        let mut e = pb::Experiment {
            id: "x".into(),
            state: State::Cancelled.to_proto() as i32,
            ..Default::default()
        };
        let id = |s: &Status| match decoded(s) {
            SilaError::DefinedExecution { identifier, .. } => identifier,
            other => panic!("{other:?}"),
        };
        assert_eq!(id(&ended("f/v1", &e)), "f/v1/DefinedExecutionError/Aborted");
        e.state = State::Failed.to_proto() as i32;
        assert_eq!(id(&ended("f/v1", &e)), "f/v1/DefinedExecutionError/Refused");
        e.results.push(pb::StepResult {
            outcome: pb::StepOutcome::Failed as i32,
            ..Default::default()
        });
        assert_eq!(
            id(&ended("f/v1", &e)),
            "f/v1/DefinedExecutionError/DeviceFault"
        );
    }
}
