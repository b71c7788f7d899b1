//! Furnace drivers.

/// The family's schema (`furnace.proto`): its command, result and intermediate messages.
pub mod schema {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/ppu.devices.furnace.v1.rs"));
}

pub mod eurotherm;

/// This family's drivers, as the registry builds them from `[[devices]]` tables.
pub static DRIVERS: &[&dyn crate::registry::DriverFactory] = &[&eurotherm::config::Factory];

use crate::device::{DeviceError, StepCommand};

/// One segment of a furnace program, as the driver runs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Segment {
    /// Ramp the setpoint to `temperature_c` at `rate_c_per_min`; ends when PV reaches it.
    Ramp {
        temperature_c: f64,
        rate_c_per_min: f64,
    },
    /// Hold the current setpoint for `duration_s` of physical time.
    Hold { duration_s: f64 },
    /// Jump the setpoint to `temperature_c`; ends when PV reaches it.
    StepTo { temperature_c: f64 },
}

impl Segment {
    /// The temperature this segment drives towards, if it has one.
    pub fn target_c(&self) -> Option<f64> {
        match *self {
            Segment::Ramp { temperature_c, .. } | Segment::StepTo { temperature_c } => {
                Some(temperature_c)
            }
            Segment::Hold { .. } => None,
        }
    }
}

/// The segments of a `FurnaceProgram` command; `Unsupported` for another family's command.
pub fn program(step: &StepCommand, device: &str) -> Result<Vec<Segment>, DeviceError> {
    let program: schema::FurnaceProgram =
        step.decode().ok_or_else(|| step.unsupported(device))??;
    program
        .segments
        .iter()
        .enumerate()
        .map(|(i, s)| {
            use schema::furnace_segment::Kind;
            match &s.kind {
                Some(Kind::Ramp(r)) => Ok(Segment::Ramp {
                    temperature_c: r.temperature_c,
                    rate_c_per_min: r.rate_c_per_min,
                }),
                Some(Kind::Hold(h)) => Ok(Segment::Hold {
                    duration_s: h.duration_s,
                }),
                Some(Kind::Step(t)) => Ok(Segment::StepTo {
                    temperature_c: t.temperature_c,
                }),
                None => Err(DeviceError::Unsupported(format!(
                    "segment {i} has no kind (one of ramp, hold, step)"
                ))),
            }
        })
        .collect()
}

/// A furnace program command (for tests and tools).
pub fn program_command(segments: &[Segment]) -> StepCommand {
    use schema::furnace_segment::Kind;
    let segments = segments
        .iter()
        .map(|s| schema::FurnaceSegment {
            kind: Some(match *s {
                Segment::Ramp {
                    temperature_c,
                    rate_c_per_min,
                } => Kind::Ramp(schema::Ramp {
                    temperature_c,
                    rate_c_per_min,
                }),
                Segment::Hold { duration_s } => Kind::Hold(schema::Hold { duration_s }),
                Segment::StepTo { temperature_c } => Kind::Step(schema::StepTo { temperature_c }),
            }),
        })
        .collect();
    StepCommand::pack(&schema::FurnaceProgram { segments })
}
