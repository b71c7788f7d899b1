//! Device transports: how bytes reach a device, with real-time timeouts, retries and reconnects.
//!
//! A transport hides *how* a device is reached (TCP, a serial line, a gateway) from the driver,
//! so the same driver code runs against real hardware and the simulator. Transports map every
//! wire failure onto [`DeviceError`](crate::DeviceError) and keep reconnecting on their own.

pub mod modbus;
pub mod mqtt;
pub mod serial;
