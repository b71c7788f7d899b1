//! Balances: the `weigh` capability, and the gravimetric check of dispensing stations (see
//! [`crate::dispenser`] for how the two compose).

/// The family's schema (`balance.proto`): its command, result and intermediate messages.
pub mod schema {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/ppu.devices.balance.v1.rs"));
}

pub mod sics;

/// This family's drivers, as the registry builds them from `[[devices]]` tables.
pub static DRIVERS: &[&dyn crate::registry::DriverFactory] = &[&sics::config::Factory];

use crate::device::{DeviceError, StepCommand};

/// The stability timeout of a `Weigh` command (`None` = the device default); `Unsupported`
/// for another family's command.
pub fn weigh(step: &StepCommand, device: &str) -> Result<Option<f64>, DeviceError> {
    let w: schema::Weigh = step.decode().ok_or_else(|| step.unsupported(device))??;
    Ok((w.stability_timeout_s != 0.0).then_some(w.stability_timeout_s))
}

/// A `Weigh` command (tests and tools).
pub fn weigh_command(stability_timeout_s: Option<f64>) -> StepCommand {
    StepCommand::pack(&schema::Weigh {
        stability_timeout_s: stability_timeout_s.unwrap_or(0.0),
    })
}
