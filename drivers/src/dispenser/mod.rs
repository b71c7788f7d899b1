//! Dispensers: syringe pumps that deliver named reagents, gravimetrically checked where a
//! balance serves their station.
//!
//! # How pumps and balances compose
//!
//! A *station* is a vessel position served by one or more pumps and, optionally, one balance.
//!
//! - Each pump is its own [`Device`](crate::Device) with the `dispense` capability and exactly
//!   one reagent (one syringe). Its [`check`](crate::Device::check) accepts only dispense and
//!   refill steps for that reagent, so the scheduler's rule "the first device with the capability
//!   whose check accepts the step" routes every reagent to its pump without a routing table, and
//!   a reagent no pump holds is refused at submission.
//! - The balance is a separate device ([`SicsBalance`](crate::balance::sics::SicsBalance), the
//!   `weigh` capability), so a recipe can also weigh on its own. The pumps of its station hold an
//!   `Arc` of the same driver object and take its station lock for tare → dispense → weigh, so a
//!   weighing always covers exactly one pump's delivery.
//! - A pump tracks its syringe's fill (a ledger of what `DIS` reported) and hands it to the
//!   daemon through [`Device::saved_state`](crate::Device::saved_state) after every step, so the
//!   fill survives restarts; a dispense that would run the syringe dry fails before anything
//!   moves, and a refill step withdraws from the reservoir.

/// The family's schema (`dispenser.proto`): its command, result and intermediate messages.
pub mod schema {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/ppu.devices.dispenser.v1.rs"));
}

pub mod ne1000;

/// This family's drivers, as the registry builds them from `[[devices]]` tables.
pub static DRIVERS: &[&dyn crate::registry::DriverFactory] = &[&ne1000::config::Factory];

use crate::device::{DeviceError, StepCommand};

/// A command of this family, as the driver runs it (0 = "pump default" made `None`).
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    Dispense {
        reagent: String,
        volume_ml: f64,
        rate_ml_per_min: f64,
    },
    Refill {
        reagent: String,
        volume_ml: Option<f64>,
        rate_ml_per_min: Option<f64>,
    },
}

fn given(v: f64) -> Option<f64> {
    (v != 0.0).then_some(v)
}

impl StepKind {
    /// Decodes one of this family's commands; `Unsupported` for anything else.
    pub fn of(step: &StepCommand, device: &str) -> Result<Self, DeviceError> {
        if let Some(d) = step.decode::<schema::Dispense>() {
            let d = d?;
            return Ok(StepKind::Dispense {
                reagent: d.reagent,
                volume_ml: d.volume_ml,
                rate_ml_per_min: d.rate_ml_per_min,
            });
        }
        if let Some(r) = step.decode::<schema::Refill>() {
            let r = r?;
            return Ok(StepKind::Refill {
                reagent: r.reagent,
                volume_ml: given(r.volume_ml),
                rate_ml_per_min: given(r.rate_ml_per_min),
            });
        }
        Err(step.unsupported(device))
    }

    /// The command packed for the wire (tests and tools).
    pub fn pack(&self) -> StepCommand {
        match self {
            StepKind::Dispense {
                reagent,
                volume_ml,
                rate_ml_per_min,
            } => StepCommand::pack(&schema::Dispense {
                reagent: reagent.clone(),
                volume_ml: *volume_ml,
                rate_ml_per_min: *rate_ml_per_min,
            }),
            StepKind::Refill {
                reagent,
                volume_ml,
                rate_ml_per_min,
            } => StepCommand::pack(&schema::Refill {
                reagent: reagent.clone(),
                volume_ml: volume_ml.unwrap_or(0.0),
                rate_ml_per_min: rate_ml_per_min.unwrap_or(0.0),
            }),
        }
    }
}
