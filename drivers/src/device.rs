//! The one trait every device driver implements, and the plain domain types it speaks.
//!
//! A driver declares what it can do ([`Capability`]) and within which [`Limits`]; the daemon
//! checks recipes against those limits before queueing, and the driver checks every command
//! again before it goes on the wire ([`Device::check`]). A driver executes one step at a time,
//! streams progress and readings through [`StepContext`], honours cancellation at safe points,
//! and can always be sent to its safe state.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;

/// What kind of device this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Furnace,
    Dispenser,
    Balance,
    Analyser,
}

/// A kind of step a device can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Dispense,
    Weigh,
    FurnaceProgram,
    Degas,
    Isotherm,
}

impl Capability {
    /// Lower-case name used in messages and config, e.g. `furnace_program`.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Dispense => "dispense",
            Capability::Weigh => "weigh",
            Capability::FurnaceProgram => "furnace_program",
            Capability::Degas => "degas",
            Capability::Isotherm => "isotherm",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Limits a driver declares. `None` means "no limit of this kind".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_temperature_c: Option<f64>,
    pub min_temperature_c: Option<f64>,
    pub max_rate_c_per_min: Option<f64>,
    pub max_hold_s: Option<f64>,
    pub max_volume_ml: Option<f64>,
    pub max_rate_ml_per_min: Option<f64>,
    pub max_pressure_bar: Option<f64>,
}

/// Static description of a configured device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// Unique id from the configuration.
    pub id: String,
    pub family: Family,
    /// Driver name, e.g. `eurotherm`.
    pub driver: String,
    /// Human-readable transport, e.g. `modbus-tcp://127.0.0.1:5020 unit 1`.
    pub transport: String,
    pub capabilities: Vec<Capability>,
    pub limits: Limits,
}

/// One segment of a furnace program.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Segment {
    /// Ramp the setpoint to `temperature_c` at `rate_c_per_min`; ends when PV reaches it.
    Ramp {
        temperature_c: f64,
        rate_c_per_min: f64,
    },
    /// Hold the current setpoint for `duration_s` of physical time.
    Hold { duration_s: f64 },
    /// Jump the setpoint to `temperature_c`; ends when PV reaches it.
    StepTo { temperature_c: f64 },
}

impl Segment {
    /// The temperature this segment drives towards, if it has one.
    pub fn target_c(&self) -> Option<f64> {
        match *self {
            Segment::Ramp { temperature_c, .. } | Segment::StepTo { temperature_c } => {
                Some(temperature_c)
            }
            Segment::Hold { .. } => None,
        }
    }
}

/// A step, as a driver sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum StepCommand {
    FurnaceProgram { segments: Vec<Segment> },
}

impl StepCommand {
    /// The capability a device needs to run this step.
    pub fn capability(&self) -> Capability {
        match self {
            StepCommand::FurnaceProgram { .. } => Capability::FurnaceProgram,
        }
    }
}

/// One sample of a furnace run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FurnaceSample {
    /// Physical seconds since the program started.
    pub t_s: f64,
    pub pv_c: f64,
    pub working_sp_c: f64,
    pub output_pct: f64,
}

/// When a segment's target was reached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetReached {
    pub segment_index: u32,
    pub temperature_c: f64,
    pub reached_at_s: f64,
    pub tolerance_c: f64,
}

/// What a furnace did during a program.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FurnaceResult {
    pub trace: Vec<FurnaceSample>,
    pub max_overshoot_c: f64,
    pub targets: Vec<TargetReached>,
}

/// The typed result of a successful step.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    Furnace(FurnaceResult),
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
}

impl StepContext {
    /// Sends an update, ignoring a receiver that has gone away.
    pub fn send(&self, update: StepUpdate) {
        let _ = self.updates.send(update);
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
}
