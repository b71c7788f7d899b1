//! ppu-sim owns the hardware-in-the-loop simulators: simulated instruments with their physics,
//! served behind the same wire protocol as the real hardware, so the drivers in `ppu-drivers`
//! talk to them exactly as they would to a lab instrument (no simulator special cases anywhere).
//!
//! - [`furnace`]: a Eurotherm 2000/3000-series temperature controller (register map, status bits,
//!   rate limit, PID with anti-windup) driving a thermal plant (heater, conductive and radiative
//!   losses, thermocouple lag), plus fault injection (sensor break, heater failure, silence).
//! - [`modbus`]: a real Modbus TCP server (tokio-modbus) that exposes one or more furnaces by
//!   unit id.
//!
//! Physical time comes from [`ppu_drivers::Clock`]; the plant is advanced lazily on every access,
//! on a fixed time grid, so a simulation is deterministic for a given sequence of (time, write)
//! events and needs no background task.

pub mod furnace;
pub mod modbus;
