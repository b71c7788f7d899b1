//! The one trait every device driver implements, and the plain domain types it speaks.
//!
//! A driver declares what it can do ([`Capability`]) and within which [`Limits`]; the daemon
//! checks recipes against those limits before queueing, and the driver checks every command
//! again before it goes on the wire ([`Device::check`]). A driver executes one step at a time,
//! streams progress and readings through [`StepContext`], honours cancellation at safe points,
//! and can always be sent to its safe state.

use std::collections::BTreeMap;
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
    /// The values the device accepts for a text parameter of a step, by the parameter's name
    /// in [`StepCommand::text_parameters`] (e.g. `adsorptive` → `["CO2", "N2"]`), compared
    /// without regard to ASCII case. A parameter not named here takes any value. The daemon
    /// refuses any other value at submission, so a recipe the instrument would refuse hours
    /// later never enters the queue.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accepted: BTreeMap<String, Vec<String>>,
}

/// A text parameter whose value the device does not accept ([`Limits::refused_value`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedValue<'a> {
    /// The parameter's name, e.g. `adsorptive`.
    pub parameter: &'static str,
    /// The value the step names.
    pub value: &'a str,
    /// What the device accepts instead.
    pub accepted: &'a [String],
}

impl Limits {
    /// The first text parameter of `step` whose value is not among the accepted values
    /// declared for it, if any.
    pub fn refused_value<'a>(&'a self, step: &'a StepCommand) -> Option<RefusedValue<'a>> {
        step.text_parameters()
            .into_iter()
            .find_map(|(parameter, value)| {
                let accepted = self.accepted.get(parameter)?;
                let known = accepted
                    .iter()
                    .any(|a| a.trim().eq_ignore_ascii_case(value.trim()));
                (!known).then_some(RefusedValue {
                    parameter,
                    value,
                    accepted,
                })
            })
    }
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
    FurnaceProgram {
        segments: Vec<Segment>,
    },
    /// Dispense `volume_ml` of `reagent` at `rate_ml_per_min`.
    Dispense {
        reagent: String,
        volume_ml: f64,
        rate_ml_per_min: f64,
    },
    /// Withdraw into the syringe from the reservoir; `None` = the driver's choice
    /// (fill the syringe, default rate).
    Refill {
        reagent: String,
        volume_ml: Option<f64>,
        rate_ml_per_min: Option<f64>,
    },
    /// Read a stable weight; `None` = the device's default stability timeout (real time).
    Weigh {
        stability_timeout_s: Option<f64>,
    },
    Degas {
        temperature_c: f64,
        duration_s: f64,
    },
    Isotherm {
        adsorptive: String,
        temperature_c: f64,
        pressures_bar: Vec<f64>,
        /// Physical seconds between the readings the equilibrium criterion is judged on.
        equilibration_interval_s: Option<f64>,
        /// Longest physical wait for one point.
        max_equilibration_s: Option<f64>,
        /// Sample mass to normalise to, g; `None` = the device default.
        sample_mass_g: Option<f64>,
    },
}

impl StepCommand {
    /// The capability a device needs to run this step.
    pub fn capability(&self) -> Capability {
        match self {
            StepCommand::FurnaceProgram { .. } => Capability::FurnaceProgram,
            StepCommand::Dispense { .. } | StepCommand::Refill { .. } => Capability::Dispense,
            StepCommand::Weigh { .. } => Capability::Weigh,
            StepCommand::Degas { .. } => Capability::Degas,
            StepCommand::Isotherm { .. } => Capability::Isotherm,
        }
    }

    /// The step's text parameters that name something the device must know (a reagent, an
    /// adsorptive), by name: what [`Limits::accepted`] is keyed by.
    pub fn text_parameters(&self) -> Vec<(&'static str, &str)> {
        match self {
            StepCommand::Dispense { reagent, .. } | StepCommand::Refill { reagent, .. } => {
                vec![("reagent", reagent.as_str())]
            }
            StepCommand::Isotherm { adsorptive, .. } => vec![("adsorptive", adsorptive.as_str())],
            StepCommand::FurnaceProgram { .. }
            | StepCommand::Weigh { .. }
            | StepCommand::Degas { .. } => Vec::new(),
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

/// What a dispense delivered.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DispenseResult {
    pub reagent: String,
    pub requested_volume_ml: f64,
    pub pump_volume_ml: f64,
    /// `None` where no balance serves the station.
    pub measured_mass_g: Option<f64>,
    pub expected_mass_g: f64,
    /// (measured − expected) / expected; `None` without a balance.
    pub relative_deviation: Option<f64>,
    pub remaining_ml: f64,
}

/// A weighing.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WeighResult {
    pub mass_g: f64,
    pub stable: bool,
}

/// A refill.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RefillResult {
    pub reagent: String,
    pub volume_ml: f64,
    pub fill_ml: f64,
}

/// A degas as performed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DegasResult {
    pub temperature_c: f64,
    pub duration_s: f64,
    pub final_pressure_bar: f64,
}

/// One equilibrium point.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct IsothermPoint {
    pub pressure_bar: f64,
    /// 0 where not applicable (supercritical).
    pub p0_bar: f64,
    pub amount_mmol_per_g: f64,
    pub equilibration_time_s: f64,
}

/// A measured isotherm.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IsothermResult {
    pub adsorptive: String,
    pub temperature_c: f64,
    pub sample_mass_g: f64,
    pub degas_temperature_c: f64,
    pub degas_duration_s: f64,
    pub points: Vec<IsothermPoint>,
    pub instrument: String,
}

/// The typed result of a successful step.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    Furnace(FurnaceResult),
    Dispense(DispenseResult),
    Refill(RefillResult),
    Weigh(WeighResult),
    Degas(DegasResult),
    Isotherm(IsothermResult),
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
    /// One isotherm point, as soon as it is measured (logged durably by the daemon).
    IsothermPoint { index: u32, point: IsothermPoint },
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
