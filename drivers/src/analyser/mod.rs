//! Gas-sorption analysers (CO₂/N₂ isotherms), reached over MQTT through a bridge that runs
//! beside the vendor software on the instrument PC.
//!
//! - [`protocol`]: the topic names and JSON payloads of the contract in docs/mqtt-contract.md.
//! - [`sorption`]: the [`sorption::SorptionAnalyser`] driver: degas,
//!   free-space measurement and isotherms, streamed point by point, with declared limits,
//!   liveness from the bridge's retained status and will, and recovery after broker restarts.

pub mod protocol;
pub mod sorption;

pub use sorption::{SorptionAnalyser, SorptionConfig};
