//! Mass-flow controllers: gas into a rig at a set mass flow, for gas-sorption and breakthrough
//! runs.
//!
//! - [`alicat`]: Alicat-style controllers over serial ASCII (`A\r` polls a data frame,
//!   `AS 50.0\r` sets the setpoint, `AG4\r` selects a gas).
//!
//! The family's step is a *gas flow* ([`schema::GasFlow`], `mfc.proto`): select a gas, hold a
//! mass-flow setpoint for a duration of physical time, and return the sampled trace. Its safe
//! state is setpoint 0, confirmed by reading the setpoint back.

pub mod alicat;

/// The family's schema (`mfc.proto`): its command and result messages.
pub mod schema {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/ppu.devices.mfc.v1.rs"));
}

/// This family's drivers, as the registry builds them from `[[devices]]` tables.
pub static DRIVERS: &[&dyn crate::registry::DriverFactory] = &[&alicat::config::Factory];
