//! Device transports: how bytes reach a device, with real-time timeouts, retries and reconnects.
//!
//! A transport hides *how* a device is reached (TCP, a serial line, a gateway) from the driver,
//! so the same driver code runs against real hardware and the simulator. Transports map every
//! wire failure onto [`DeviceError`](crate::DeviceError) and keep reconnecting on their own.

pub mod modbus;
pub mod mqtt;
pub mod serial;

use std::sync::OnceLock;

/// Counts a link reopened after having been up, in `ppu_transport_reconnects_total`, under the
/// device the driver named (`set_metrics_device`) or, until it did, the peer.
pub(crate) fn count_reconnect(
    transport: &'static str,
    device: &OnceLock<String>,
    peer: impl FnOnce() -> String,
) {
    let device = device.get().cloned().unwrap_or_else(peer);
    metrics::counter!(
        "ppu_transport_reconnects_total",
        "transport" => transport,
        "device" => device
    )
    .increment(1);
}
