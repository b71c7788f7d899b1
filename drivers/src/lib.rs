//! ppu-drivers owns everything between the daemon and a device's wire: the [`Device`] trait that
//! every driver implements, the physical-time [`Clock`], the transports (Modbus TCP/RTU now;
//! serial and MQTT later) and the drivers for each device family.
//!
//! Drivers speak the real protocol and know nothing of gRPC, the store or the simulator: the
//! daemon converts its API types to the plain domain types in [`device`].

pub mod analyser;
pub mod balance;
pub mod clock;
pub mod device;
pub mod dispenser;
pub mod furnace;
pub mod registry;
pub mod transport;

pub use clock::Clock;
pub use device::{
    Capability, Device, DeviceError, DeviceInfo, DeviceStatus, Limits, SafeCheck, StepCommand,
    StepContext, StepOutput, StepUpdate,
};
