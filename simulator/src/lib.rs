//! ppu-sim owns the hardware-in-the-loop simulators: simulated instruments with their physics,
//! served behind the same wire protocol as the real hardware, so the drivers in `ppu-drivers`
//! talk to them exactly as they would to a lab instrument (no simulator special cases anywhere).
//!
//! - [`furnace`]: a Eurotherm 2000/3000-series temperature controller (register map, status bits,
//!   rate limit, PID with anti-windup) driving a thermal plant (heater, conductive and radiative
//!   losses, thermocouple lag), plus fault injection (sensor break, heater failure, silence).
//! - [`modbus`]: a real Modbus TCP server (tokio-modbus) that exposes one or more furnaces by
//!   unit id.
//! - [`rtu`]: several furnaces on one Modbus RTU line (RS-485 multi-drop) on one pty.
//! - [`analyser`]: a volumetric gas-sorption analyser (isotherm models, dosing, LDF kinetics,
//!   equilibrium criterion) behind its MQTT bridge, a separate client on the broker.
//! - [`broker`]: an embedded MQTT broker (rumqttd) with switchable outages, and a Mosquitto
//!   process helper for tests.
//! - [`dispenser`]: NE-1000 syringe pumps and an MT-SICS balance sharing a vessel, each on a
//!   real pseudo-terminal served by [`pty`] (with seeded line faults).
//! - [`world`]: the shared simulated lab: where each sample is and its synthesis history,
//!   which the analyser's hidden material model turns into isotherms.
//!
//! Physical time comes from [`ppu_drivers::Clock`]; the plant is advanced lazily on every access,
//! on a fixed time grid, so a simulation is deterministic for a given sequence of (time, write)
//! events and needs no background task.

pub mod analyser;
pub mod broker;
pub mod dispenser;
pub mod furnace;
pub mod modbus;
pub mod pty;
pub mod registry;
pub mod rtu;
pub mod world;

/// Declares the simulated families that are plugins, one line each: `pub mod <family>;` and
/// its [`registry::SimFamily`] (`<family>::SIM`), so `ppu-sim` and `ppud dev` pick it up.
macro_rules! sim_families {
    ($($family:ident),* $(,)?) => {
        $(pub mod $family;)*

        pub(crate) static SIM_FAMILIES: &[&dyn registry::SimFamily] = &[$(&$family::SIM),*];
    };
}

sim_families! {
    // One line per simulated family that is a plugin.
    mfc,
    sila2,
}
