//! A simulated volumetric gas-sorption analyser behind its MQTT bridge.
//!
//! The simulator is a *separate MQTT client* on the same broker as ppud, exactly as a lab's
//! bridge on the instrument PC would be, and it speaks the contract of docs/mqtt-contract.md
//! from its own reading of that document (it shares no code with the driver):
//!
//! - [`physics`]: isotherm models (Langmuir, dual-site Langmuir, Sips, Toth) with `K =
//!   K0·exp(E/RT)`, the CO₂ reference materials (zeolite 13X, Mg-MOF-74, HKUST-1), saturation
//!   pressures, and the volumetric cell: manifold doses expanding into warm and cold free
//!   space, LDF uptake `dq/dt = k·(q*(P) − q)`, leaks.
//! - [`material`]: the hidden, seeded map from a sample's synthesis history (in the shared
//!   [`World`](crate::world::World)) to its isotherm.
//! - the bridge (private): commands, acknowledgements, idempotency by request id with replay,
//!   retained status with a last will, telemetry, alarms, and the measurement procedures —
//!   degas, helium free space, and isotherms dosed point by point until the Micromeritics-style
//!   equilibrium criterion holds (11 readings at the equilibration interval, drift below
//!   0.01 % of the mean per interval). The reported amount comes from the mass balance of the
//!   *measured* pressures and free space, as on a real instrument.
//! - [`dosing`]: the isotherm procedure as a state machine in physical time — doses sized from
//!   the measured free space and the uptake measured so far, capped so that no dose can
//!   overshoot its target beyond the pressure tolerance, topped up until the point lands
//!   within `max(5 % of target, 0.005 bar)` (or the tolerance the command names).
//!
//! Fault switches: the bridge going offline (its connection dropped without a DISCONNECT, so
//! the broker publishes its will), a point that never equilibrates (and a bridge that never
//! gives up on it), a leak (pressure drifts upward), broken dosing (every dose a full manifold,
//! points reported wherever they land), and malformed payloads.

mod bridge;
pub mod dosing;
pub mod material;
pub mod physics;

use std::sync::Arc;
use std::time::Duration;

use ppu_drivers::Clock;

use crate::world::World;
pub use bridge::{DEGAS_RAMP_C_PER_MIN, FREE_SPACE_S, SimAnalyser};
pub use dosing::Tolerance;
pub use physics::{CellGeometry, Material};

/// Configuration of one simulated analyser and its bridge.
#[derive(Debug, Clone, PartialEq)]
pub struct SimAnalyserConfig {
    /// Broker host and port.
    pub broker_host: String,
    pub broker_port: u16,
    /// Topics are `{topic_prefix}/{bridge_id}/...`.
    pub topic_prefix: String,
    pub bridge_id: String,
    /// MQTT client id of the bridge (stable: persistent session).
    pub client_id: String,
    /// The bridge's keep-alive: the broker fires its will within 1.5× this after it falls
    /// silent.
    pub keep_alive: Duration,
    /// The ppu device id this instrument serves, to find the sample placed at it in the world.
    pub device_id: String,
    /// Instrument description reported in status and results.
    pub instrument: String,
    pub geometry: CellGeometry,
    /// Highest target pressure accepted, bar (the transducer's range).
    pub max_pressure_bar: f64,
    /// Highest pressure the manifold is filled to for a dose, bar.
    pub max_dose_bar: f64,
    /// Highest degas temperature accepted, °C.
    pub max_degas_temperature_c: f64,
    /// Relative and absolute standard deviation of pressure readings.
    pub pressure_noise_rel: f64,
    pub pressure_noise_abs_bar: f64,
    /// Relative standard deviation of a free-space measurement.
    pub free_space_error_rel: f64,
    /// Pressure tolerance of a point when the isotherm command names none: accepted when
    /// `|P_eq − target| ≤ max(relative·target, absolute_bar)`; short of it, dose again.
    pub tolerance: Tolerance,
    pub max_doses_per_point: u32,
    /// Material of a sample the world knows nothing about.
    pub default_material: Material,
    /// Real time between telemetry messages.
    pub telemetry_interval: Duration,
    /// Seed of the measurement noise.
    pub seed: u64,
}

impl SimAnalyserConfig {
    /// A simulated instrument for `bridge_id` on the broker at `host:port`, with the default
    /// prefix `lab/ppu/analyser`, a 5 s keep-alive, a 1.2 bar transducer, 450 °C degas, and
    /// zeolite 13X for unknown samples.
    pub fn new(
        broker_host: impl Into<String>,
        broker_port: u16,
        bridge_id: impl Into<String>,
    ) -> Self {
        let bridge_id = bridge_id.into();
        Self {
            broker_host: broker_host.into(),
            broker_port,
            topic_prefix: "lab/ppu/analyser".to_owned(),
            client_id: format!("ppu-sim-bridge-{bridge_id}"),
            device_id: bridge_id.clone(),
            bridge_id,
            keep_alive: Duration::from_secs(5),
            instrument: "ppu-sim volumetric sorption analyser (simulated bridge)".to_owned(),
            geometry: CellGeometry::default(),
            max_pressure_bar: 1.2,
            max_dose_bar: 1.33,
            max_degas_temperature_c: 450.0,
            pressure_noise_rel: 2e-5,
            pressure_noise_abs_bar: 1e-7,
            free_space_error_rel: 1e-3,
            tolerance: Tolerance::default(),
            max_doses_per_point: 60,
            default_material: Material::zeolite_13x(),
            telemetry_interval: Duration::from_millis(500),
            seed: 1,
        }
    }
}

/// Starts a simulated analyser: connects its bridge to the broker and serves commands.
pub fn start(config: SimAnalyserConfig, world: World, clock: Clock) -> Arc<SimAnalyser> {
    SimAnalyser::start(config, world, clock)
}
