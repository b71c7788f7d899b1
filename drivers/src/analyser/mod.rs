//! Gas-sorption analysers (CO₂/N₂ isotherms), reached over MQTT through a bridge that runs
//! beside the vendor software on the instrument PC.
//!
//! - [`protocol`]: the topic names and JSON payloads of the contract in docs/mqtt-contract.md.
//! - [`sorption`]: the [`sorption::SorptionAnalyser`] driver: degas,
//!   free-space measurement and isotherms, streamed point by point, with declared limits,
//!   liveness from the bridge's retained status and will, and recovery after broker restarts.

/// The family's schema (`analyser.proto`): its command, result and intermediate messages.
pub mod schema {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/ppu.devices.analyser.v1.rs"));
}

pub mod protocol;
pub mod sorption;

pub use sorption::{SorptionAnalyser, SorptionConfig};

/// This family's drivers, as the registry builds them from `[[devices]]` tables.
pub static DRIVERS: &[&dyn crate::registry::DriverFactory] = &[&sorption::config::Factory];

use crate::device::{DeviceError, StepCommand};

/// A command of this family, as the driver runs it (0 = "device default" made `None`).
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    Degas {
        temperature_c: f64,
        duration_s: f64,
    },
    Isotherm {
        adsorptive: String,
        temperature_c: f64,
        pressures_bar: Vec<f64>,
        equilibration_interval_s: Option<f64>,
        max_equilibration_s: Option<f64>,
        sample_mass_g: Option<f64>,
    },
}

fn given(v: f64) -> Option<f64> {
    (v != 0.0).then_some(v)
}

impl StepKind {
    /// Decodes one of this family's commands; `Unsupported` for anything else.
    pub fn of(step: &StepCommand, device: &str) -> Result<Self, DeviceError> {
        if let Some(d) = step.decode::<schema::Degas>() {
            let d = d?;
            return Ok(StepKind::Degas {
                temperature_c: d.temperature_c,
                duration_s: d.duration_s,
            });
        }
        if let Some(i) = step.decode::<schema::Isotherm>() {
            let i = i?;
            return Ok(StepKind::Isotherm {
                adsorptive: i.adsorptive,
                temperature_c: i.temperature_c,
                pressures_bar: i.pressure_bar,
                equilibration_interval_s: given(i.equilibration_interval_s),
                max_equilibration_s: given(i.max_equilibration_s),
                sample_mass_g: given(i.sample_mass_g),
            });
        }
        Err(step.unsupported(device))
    }

    /// The command packed for the wire (tests and tools).
    pub fn pack(&self) -> StepCommand {
        match self {
            StepKind::Degas {
                temperature_c,
                duration_s,
            } => StepCommand::pack(&schema::Degas {
                temperature_c: *temperature_c,
                duration_s: *duration_s,
            }),
            StepKind::Isotherm {
                adsorptive,
                temperature_c,
                pressures_bar,
                equilibration_interval_s,
                max_equilibration_s,
                sample_mass_g,
            } => StepCommand::pack(&schema::Isotherm {
                adsorptive: adsorptive.clone(),
                temperature_c: *temperature_c,
                pressure_bar: pressures_bar.clone(),
                equilibration_interval_s: equilibration_interval_s.unwrap_or(0.0),
                max_equilibration_s: max_equilibration_s.unwrap_or(0.0),
                sample_mass_g: sample_mass_g.unwrap_or(0.0),
            }),
        }
    }
}
