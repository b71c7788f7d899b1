//! ppu-drivers owns everything between the daemon and a device's wire: the [`Device`] trait that
//! every driver implements, the physical-time [`Clock`], the transports (Modbus TCP/RTU,
//! serial, MQTT) and the device families, each a folder with its schema (`<family>.proto`),
//! its drivers and their configuration.
//!
//! Drivers speak the real protocol and know nothing of gRPC, the store or the simulator: a
//! step reaches them as their family's own command message ([`StepCommand`]).

pub mod clock;
pub mod device;
pub mod registry;
pub mod transport;

/// Declares the device families, one line each: `pub mod <family>;` and the family's drivers
/// (its `DRIVERS`) in [`registry::drivers`]. A family's `.proto` is found by `build.rs`.
macro_rules! families {
    ($($family:ident),* $(,)?) => {
        $(pub mod $family;)*

        /// Every registered family's driver factories, in registration order.
        pub(crate) static FAMILY_DRIVERS: &[&[&dyn registry::DriverFactory]] = &[$($family::DRIVERS),*];
    };
}

families! {
    furnace,
    analyser,
    dispenser,
    balance,
    mfc,
    sila2,
}

pub use clock::Clock;
pub use device::{
    Capability, Device, DeviceError, DeviceInfo, DeviceStatus, Limits, SafeCheck, StepCommand,
    StepContext, StepOutput, StepUpdate,
};
