//! The one trait every device driver implements, and the plain domain types it speaks.
//!
//! A driver declares what it can do ([`Capability`]) and within which [`Limits`]; the daemon
//! checks recipes against those limits before queueing, and the driver checks every command
//! again before it goes on the wire ([`Device::check`]). A driver executes one step at a time,
//! streams progress and readings through [`StepContext`], honours cancellation at safe points,
//! and can always be sent to its safe state.

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;

/// A capability a device declares (`furnace_program`, `dispense`, `gas_flow`): the name its
/// family's schema gives the commands it runs.
pub type Capability = String;

pub use ppu_schema::Limits;

/// Static description of a configured device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// Unique id from the configuration.
    pub id: String,
    /// The family's name in its schema (`furnace`, `mfc`).
    pub family: String,
    /// Driver name, e.g. `eurotherm`.
    pub driver: String,
    /// Human-readable transport, e.g. `modbus-tcp://127.0.0.1:5020 unit 1`.
    pub transport: String,
    pub capabilities: Vec<Capability>,
    pub limits: Limits,
}

impl DeviceInfo {
    /// True if the device declares `capability`.
    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

/// A step, as a driver sees it: one of its family's command messages, packed as a
/// `google.protobuf.Any`. The daemon has already checked it against the family's schema and the
/// device's limits; the driver decodes it into its own type ([`StepCommand::decode`]) and
/// checks again what only it knows.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCommand(pub prost_types::Any);

impl StepCommand {
    /// Packs a family's command message.
    pub fn pack<M: prost::Name>(message: &M) -> Self {
        Self(pack(message))
    }

    /// The command's message name, e.g. `ppu.devices.furnace.v1.FurnaceProgram`.
    pub fn type_name(&self) -> &str {
        ppu_schema::type_name(&self.0.type_url)
    }

    /// True if the command is a `M`.
    pub fn is<M: prost::Name>(&self) -> bool {
        self.type_name() == M::full_name()
    }

    /// The command as a `M`, or `None` if it is another command.
    pub fn decode<M: prost::Name + Default>(&self) -> Option<Result<M, DeviceError>> {
        self.is::<M>().then(|| {
            M::decode(self.0.value.as_slice()).map_err(|e| {
                DeviceError::Unsupported(format!("{} does not decode: {e}", M::full_name()))
            })
        })
    }

    /// The error a driver returns for a command of another family.
    pub fn unsupported(&self, device: &str) -> DeviceError {
        DeviceError::Unsupported(format!("device {device} cannot run {}", self.type_name()))
    }
}

/// Packs a message as a `google.protobuf.Any`.
pub fn pack<M: prost::Name>(message: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// The typed result of a successful step: the family's result message, packed.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput(pub prost_types::Any);

impl StepOutput {
    pub fn pack<M: prost::Name>(message: &M) -> Self {
        Self(pack(message))
    }

    /// The result as a `M`, or `None` if it is another message.
    pub fn decode<M: prost::Name + Default>(&self) -> Option<M> {
        (ppu_schema::type_name(&self.0.type_url) == M::full_name())
            .then(|| M::decode(self.0.value.as_slice()).ok())
            .flatten()
    }
}

/// A named value read from a device, the unit as a suffix of the name (`pv_c`).
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub name: String,
    pub value: f64,
}

impl Reading {
    pub fn new(name: impl Into<String>, value: f64) -> Self {
        Self {
            name: name.into(),
            value,
        }
    }
}

/// A snapshot of a device's state.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceStatus {
    pub readings: Vec<Reading>,
    /// Active alarms, human-readable (e.g. "sensor break").
    pub alarms: Vec<String>,
    /// True if the device is actively doing something (heating to a setpoint above ambient,
    /// pumping, measuring) — used to decide whether it needs to be made safe.
    pub active: bool,
}

/// What a running step tells the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum StepUpdate {
    /// Estimated progress.
    Progress {
        /// 0..1.
        fraction: f64,
        message: String,
        /// Estimated physical seconds remaining, if known.
        remaining_s: Option<f64>,
    },
    /// A fresh reading taken while the step runs.
    Reading(DeviceStatus),
    /// An intermediate response (an isotherm point), as soon as it is measured: the command's
    /// `intermediate` message, packed; the daemon logs each one durably.
    Intermediate { index: u32, value: prost_types::Any },
}

/// Everything a step needs from the daemon while it runs.
#[derive(Debug, Clone)]
pub struct StepContext {
    /// Physical time for holds and ramps.
    pub clock: Clock,
    /// Progress and readings go here; a closed receiver is not an error.
    pub updates: mpsc::UnboundedSender<StepUpdate>,
    /// Cancelled when the step must stop; the driver returns [`DeviceError::Aborted`] at the
    /// next safe point. The daemon then calls [`Device::safe_state`].
    pub cancel: CancellationToken,
    /// The sample this step handles (from the experiment), as a real instrument's software
    /// would be told; empty if the experiment names none.
    pub sample_id: String,
    /// The experiment this step belongs to, for device-side logs and idempotent requests.
    pub experiment_id: String,
}

impl StepContext {
    /// Sends an update, ignoring a receiver that has gone away.
    pub fn send(&self, update: StepUpdate) {
        let _ = self.updates.send(update);
    }
}

/// What reading a device back says about its safe state ([`Device::confirm_safe`]).
#[derive(Debug, Clone, PartialEq)]
pub enum SafeCheck {
    /// Every quantity that matters for safety reads back at its safe value.
    Safe,
    /// The device answered, but is not safe; each entry names what was read and what was
    /// expected, e.g. "target setpoint 150 °C is above the safe 25 °C".
    NotSafe(Vec<String>),
}

impl SafeCheck {
    /// `Safe` when `deviations` is empty.
    pub fn from_deviations(deviations: Vec<String>) -> Self {
        if deviations.is_empty() {
            SafeCheck::Safe
        } else {
            SafeCheck::NotSafe(deviations)
        }
    }

    pub fn is_safe(&self) -> bool {
        matches!(self, SafeCheck::Safe)
    }
}

/// Why a device operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    /// No reply within the protocol timeout (real time).
    #[error("timeout after {timeout_ms} ms waiting for {what}")]
    Timeout { what: String, timeout_ms: u64 },
    /// The link is down (refused, reset, closed); the transport keeps reconnecting.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// The device answered with a protocol-level error (e.g. a Modbus exception).
    #[error("device refused {what}: {reason}")]
    Refused { what: String, reason: String },
    /// A reply that does not parse or does not fit the request.
    #[error("corrupt reply to {what}: {reason}")]
    Corrupt { what: String, reason: String },
    /// A command that would break a declared limit; it was not sent.
    #[error("limit violated: {field} = {value} exceeds {limit}")]
    Limit {
        field: String,
        value: f64,
        limit: String,
    },
    /// The device reports a fault (alarm) that stops the step.
    #[error("device fault: {0}")]
    Fault(String),
    /// The step was cancelled.
    #[error("aborted")]
    Aborted,
    /// The device cannot run this kind of step.
    #[error("unsupported step: {0}")]
    Unsupported(String),
}

impl DeviceError {
    /// True if the link, not the device, failed: worth a reconnect and retry.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DeviceError::Timeout { .. } | DeviceError::Disconnected(_)
        )
    }
}

/// A device driver.
///
/// Implementations must be cheap to share (`Arc<dyn Device>`) and safe to call concurrently:
/// the daemon polls [`Device::status`] while [`Device::execute`] runs, so a driver serialises
/// access to its transport internally.
#[async_trait]
pub trait Device: Send + Sync + 'static {
    /// Static description: id, family, capabilities, limits.
    fn info(&self) -> &DeviceInfo;

    /// Checks a step against this device's limits without touching the device. The daemon
    /// calls it at submission; drivers call it again before sending commands.
    fn check(&self, step: &StepCommand) -> Result<(), DeviceError>;

    /// Runs one step to completion, streaming progress through `ctx`.
    async fn execute(
        &self,
        step: &StepCommand,
        ctx: StepContext,
    ) -> Result<StepOutput, DeviceError>;

    /// Reads the device's current state.
    async fn status(&self) -> Result<DeviceStatus, DeviceError>;

    /// Drives the device to its safe state (furnace: setpoint to the safe value, no heating).
    /// Must be idempotent and must be attempted even after a failed step.
    async fn safe_state(&self) -> Result<(), DeviceError>;

    /// Reads back whether the device *is* in its safe state, without changing anything: a
    /// write that was acknowledged is not proof (a controller can be power-cycled to its
    /// power-up setpoint, a link can drop between two writes). The daemon calls it after
    /// [`Device::safe_state`] and treats the device as unsafe until it answers
    /// [`SafeCheck::Safe`]. Required, so that no driver is trivially "safe" by omission.
    async fn confirm_safe(&self) -> Result<SafeCheck, DeviceError>;

    /// State the daemon must keep for this driver across restarts (e.g. a syringe's fill),
    /// opaque to the daemon. It is read after every step and committed in the same transaction
    /// as the step's result, then handed back through [`Device::restore_state`] at start-up.
    fn saved_state(&self) -> Option<Vec<u8>> {
        None
    }

    /// Restores what [`Device::saved_state`] returned in an earlier run.
    fn restore_state(&self, _state: &[u8]) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Re-attaches to `step`, which an earlier run of the daemon started `elapsed_s` physical
    /// seconds ago and which may still be running on the device (crash recovery), and
    /// supervises it to completion as [`Device::execute`] would have. A driver that cannot
    /// tell its own program apart from anything else must refuse; the default refuses with
    /// [`DeviceError::Unsupported`], and the daemon then drives the device to its safe state.
    async fn adopt(
        &self,
        _step: &StepCommand,
        _elapsed_s: f64,
        _ctx: StepContext,
    ) -> Result<StepOutput, DeviceError> {
        Err(DeviceError::Unsupported(format!(
            "device {} cannot adopt a running step",
            self.info().id
        )))
    }

    /// Acknowledges latched alarms on the device itself, where it has such a command; the
    /// default does nothing (the daemon still records the acknowledgement).
    async fn acknowledge_alarms(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}
