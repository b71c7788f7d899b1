//! Eurotherm 2000/3000-series temperature controller over Modbus (TCP or RTU).
//!
//! The driver runs a furnace program with its own ramp/hold logic on top of the controller's
//! target setpoint (register 2) and setpoint rate limit (35), rather than the 2400 programmer:
//! that works on every model in the family, and the controller still enforces the ramp rate
//! itself, so a daemon crash mid-ramp cannot make the furnace jump. Physical durations (ramps,
//! holds, settle time, sample interval) run on the step's [`Clock`](crate::Clock); protocol
//! timeouts and poll floors are real time.
//!
//! Values in the integer register region are signed 16-bit integers scaled by the configured
//! number of decimal places (`value = raw as i16 / 10^dp`).
//!
//! The driver reads the instrument ident (register 122) before the first exchange on every new
//! transport connection and after any exchange the controller did not answer, and again after
//! an exchange during which the transport reconnected; it refuses to go on unless the ident is
//! one of [`EurothermConfig::ident`]'s values. So a misaddressed instrument is never written to,
//! and a controller unplugged and replaced by another is noticed before the next command.
//!
//! During a step, an outage is measured from the last exchange the controller answered, and
//! between trace samples the controller is read at least every third of the grace of real
//! time, so a silent controller fails the step within its grace whatever the time scale.

use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::Segment;
use super::schema::{FurnaceResult, FurnaceSample, TargetReached};
use crate::device::{
    Device, DeviceError, DeviceInfo, DeviceStatus, Limits, Reading, StepCommand, StepContext,
    StepOutput, StepUpdate,
};
use crate::transport::modbus::{ModbusConfig, ModbusTransport};

/// Register addresses (2000-series numbering).
/// Its `[[devices]]` entry (`driver = "eurotherm"`).
pub mod config;

pub mod registers {
    /// Process value (measured temperature).
    pub const PV: u16 = 1;
    /// Target setpoint.
    pub const TARGET_SP: u16 = 2;
    /// Output power, %.
    pub const OUTPUT: u16 = 3;
    /// Working setpoint: follows the target at the rate limit. Read-only.
    pub const WORKING_SP: u16 = 5;
    /// Setpoint rate limit, units per minute; 0 = off.
    pub const SP_RATE_LIMIT: u16 = 35;
    /// Instrument status bits.
    pub const STATUS: u16 = 75;
    /// Instrument ident, `0x2ABC`: series, model and size digits (see [`super::KNOWN_IDENTS`]).
    pub const IDENT: u16 = 122;
    /// Auto (0) / manual (1).
    pub const AUTO_MANUAL: u16 = 273;
    /// Write to acknowledge all alarms.
    pub const ACK_ALARMS: u16 = 274;
}

/// Ident register values of the models this driver is written for, with their names. The
/// 2000-series handbook gives the ident as hex `>ABCD`: A = 2 (series 2000), B = the range
/// (4 = 2400), C = the DIN size (4 = 1/4, 8 = 1/8), D = 0 for a PID controller (2 would be a
/// valve positioner, which this driver does not drive).
pub const KNOWN_IDENTS: [(u16, &str); 2] = [(0x2440, "2404"), (0x2480, "2408")];

/// Which instruments the driver accepts at the configured address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentCheck {
    /// Register 122 must read one of these values.
    OneOf(Vec<u16>),
    /// Do not read register 122 (a compatible controller without it).
    Skip,
}

impl Default for IdentCheck {
    /// The models of [`KNOWN_IDENTS`].
    fn default() -> Self {
        IdentCheck::OneOf(KNOWN_IDENTS.iter().map(|(ident, _)| *ident).collect())
    }
}

/// "0x2440 (2404)" for a known model, else "0x2440".
fn describe_ident(ident: u16) -> String {
    match KNOWN_IDENTS.iter().find(|(known, _)| *known == ident) {
        Some((_, model)) => format!("0x{ident:04X} ({model})"),
        None => format!("0x{ident:04X}"),
    }
}

/// Status-register bits reported as alarms, with their human names.
const ALARM_BITS: [(u16, &str); 10] = [
    (0, "alarm 1"),
    (1, "alarm 2"),
    (2, "alarm 3"),
    (3, "alarm 4"),
    (5, "sensor break"),
    (6, "loop break"),
    (7, "heater fail"),
    (8, "load fail"),
    (10, "PV out of range"),
    (14, "remote SP fail"),
];

/// Status bits that stop a running program: with any of them the controller can no longer
/// follow the setpoint, so waiting for the target would only waste the settle timeout.
const FAULT_BITS: [(u16, &str); 3] = [(5, "sensor break"), (6, "loop break"), (7, "heater fail")];

/// Pause between attempts while riding out a transport outage during a step (real time).
const OUTAGE_PAUSE: Duration = Duration::from_millis(200);

/// Minimum physical time between periodic progress updates (boundaries always send one).
const PROGRESS_INTERVAL_S: f64 = 60.0;

/// Configuration of one Eurotherm controller.
#[derive(Debug, Clone, PartialEq)]
pub struct EurothermConfig {
    pub id: String,
    pub modbus: ModbusConfig,
    /// Decimal places of temperatures and the rate limit in the integer region (the
    /// controller's configured display resolution).
    pub decimal_places: u8,
    /// Decimal places of output power %: a per-parameter resolution on Eurotherm controllers,
    /// 0.1 % independent of the temperature resolution.
    pub output_decimal_places: u8,
    pub limits: Limits,
    /// Setpoint the furnace is left at when idle, aborted or faulted, °C.
    pub safe_setpoint_c: f64,
    /// |PV − target| at or below which a target counts as reached, °C.
    pub tolerance_c: f64,
    /// Physical seconds between trace samples.
    pub sample_interval_s: f64,
    /// Real-time floor between polls beyond the protocol's own: a poll never follows the
    /// previous one sooner than that exchange took (so the link is never more than half
    /// busy, whatever the clock's scale), nor sooner than this. Zero by default: the
    /// exchange is the floor, not a sleep.
    pub min_poll: Duration,
    /// Physical seconds allowed beyond the expected ramp time for PV to reach a target.
    pub settle_timeout_s: f64,
    /// Real time a running step tolerates the controller not answering, counted from the last
    /// exchange it answered: the controller keeps regulating on its own, so a short outage need
    /// not abort a long program, but a longer one must not leave it unsupervised.
    pub transient_grace: Duration,
    /// The instrument idents accepted at the configured address (register 122).
    pub ident: IdentCheck,
}

impl EurothermConfig {
    /// Defaults: 1 decimal place (temperatures and output), no limits beyond the register range, safe setpoint 25 °C,
    /// tolerance 2 °C, a sample every 10 s physical, no poll floor beyond the exchange's own
    /// round trip, 3600 s settle time,
    /// 10 s transient grace, the idents of [`KNOWN_IDENTS`].
    pub fn new(id: impl Into<String>, modbus: ModbusConfig) -> Self {
        Self {
            id: id.into(),
            modbus,
            decimal_places: 1,
            output_decimal_places: 1,
            limits: Limits::default(),
            safe_setpoint_c: 25.0,
            tolerance_c: 2.0,
            sample_interval_s: 10.0,
            min_poll: Duration::ZERO,
            settle_timeout_s: 3600.0,
            transient_grace: Duration::from_secs(10),
            ident: IdentCheck::default(),
        }
    }
}

/// One coherent read of the controller's main values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub pv_c: f64,
    pub target_sp_c: f64,
    pub output_pct: f64,
    pub working_sp_c: f64,
    pub status_bits: u16,
}

impl Snapshot {
    /// Human names of the alarms active in the status bits.
    pub fn alarms(&self) -> Vec<String> {
        names_of(self.status_bits, &ALARM_BITS)
    }

    fn to_status(self, rate_limit_c_per_min: Option<f64>, active: bool) -> DeviceStatus {
        let mut readings = vec![
            Reading::new("pv_c", self.pv_c),
            Reading::new("target_sp_c", self.target_sp_c),
            Reading::new("working_sp_c", self.working_sp_c),
            Reading::new("output_pct", self.output_pct),
        ];
        if let Some(rate) = rate_limit_c_per_min {
            readings.push(Reading::new("rate_limit_c_per_min", rate));
        }
        DeviceStatus {
            readings,
            alarms: self.alarms(),
            active,
        }
    }
}

fn names_of(bits: u16, table: &[(u16, &str)]) -> Vec<String> {
    table
        .iter()
        .filter(|(bit, _)| bits & (1 << bit) != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect()
}

/// Decodes a scaled integer register: the raw word is a two's-complement i16.
fn decode(raw: u16, decimal_places: u8) -> f64 {
    f64::from(raw as i16) / scale(decimal_places)
}

/// Encodes a value as a scaled integer register, or `None` if it does not fit an i16.
fn encode(value: f64, decimal_places: u8) -> Option<u16> {
    let scaled = (value * scale(decimal_places)).round();
    if scaled.is_finite() && scaled >= f64::from(i16::MIN) && scaled <= f64::from(i16::MAX) {
        Some(scaled as i16 as u16)
    } else {
        None
    }
}

/// The driver's reading of a scaled integer register word (public so that the golden
/// transcript tests can hold it against the manual).
pub fn decode_scaled(raw: u16, decimal_places: u8) -> f64 {
    decode(raw, decimal_places)
}

/// The word the driver writes for `value`, or `None` if it does not fit an i16.
pub fn encode_scaled(value: f64, decimal_places: u8) -> Option<u16> {
    encode(value, decimal_places)
}

fn scale(decimal_places: u8) -> f64 {
    10f64.powi(i32::from(decimal_places))
}

/// What the driver knows about its link, shared by steps and status polls.
#[derive(Debug, Default)]
struct LinkState {
    /// Real instant of the last exchange the controller answered (a reply or an exception).
    last_answer: Option<Instant>,
    /// The transport connection (see [`ModbusTransport::connections`]) on which the
    /// instrument ident was last found as expected.
    verified_on: Option<u64>,
    /// A program found the controller no longer holding its setpoint (it restarted, or was
    /// changed at its front panel): reported as the alarm [`SETPOINT_OVERRIDDEN`] until
    /// acknowledged, since the controller itself has no status bit for it.
    overridden: bool,
}

/// The alarm a controller that dropped a program's setpoint raises (see [`LinkState`]).
pub const SETPOINT_OVERRIDDEN: &str = "setpoint overridden";

/// A Eurotherm controller driving a furnace.
#[derive(Debug)]
pub struct Eurotherm {
    info: DeviceInfo,
    config: EurothermConfig,
    transport: ModbusTransport,
    link: Mutex<LinkState>,
}

impl Eurotherm {
    /// Creates the driver with a Modbus link of its own; nothing is sent until the first request.
    pub fn new(config: EurothermConfig) -> Self {
        let transport = ModbusTransport::new(config.modbus.clone());
        Self::with_transport(config, transport)
    }

    /// Creates the driver on `transport`, e.g. a unit handle onto a shared RS-485 line
    /// ([`ModbusBus::unit`](crate::transport::modbus::ModbusBus::unit)).
    pub fn with_transport(config: EurothermConfig, transport: ModbusTransport) -> Self {
        transport.set_metrics_device(config.id.clone());
        let info = DeviceInfo {
            id: config.id.clone(),
            family: "furnace".into(),
            driver: "eurotherm".to_owned(),
            transport: transport.describe(),
            capabilities: vec!["furnace_program".into()],
            limits: config.limits.clone(),
        };
        Self {
            info,
            config,
            transport,
            link: Mutex::new(LinkState::default()),
        }
    }

    pub fn config(&self) -> &EurothermConfig {
        &self.config
    }

    pub fn transport(&self) -> &ModbusTransport {
        &self.transport
    }

    /// Acknowledges all latched alarms (register 274).
    pub async fn acknowledge_alarms(&self) -> Result<(), DeviceError> {
        self.exchange(self.transport.write_single(registers::ACK_ALARMS, 1))
            .await?;
        self.link().overridden = false;
        Ok(())
    }

    /// Fails the step when the controller no longer holds the program's setpoint, and
    /// remembers it as an alarm for the technician (see [`SETPOINT_OVERRIDDEN`]).
    fn holds_setpoint(&self, snap: &Snapshot, program_c: f64) -> Result<(), DeviceError> {
        let held = check_setpoint(snap, program_c, self.config.tolerance_c);
        if held.is_err() {
            self.link().overridden = true;
        }
        held
    }

    /// Reads the instrument ident (register 122) as it is, without judging it.
    pub async fn identify(&self) -> Result<u16, DeviceError> {
        let words = self.transport.read_holding(registers::IDENT, 1).await?;
        first_word(&words, "read of register 122")
    }

    /// Real instant of the last exchange the controller answered, if any.
    pub fn last_answer(&self) -> Option<Instant> {
        self.link().last_answer
    }

    fn link(&self) -> MutexGuard<'_, LinkState> {
        // Two plain fields: a panic elsewhere cannot leave them inconsistent.
        self.link
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records an answer: a reply, or a Modbus exception (the controller is there).
    fn note_answer<T>(&self, outcome: &Result<T, DeviceError>) {
        if matches!(outcome, Ok(_) | Err(DeviceError::Refused { .. })) {
            self.link().last_answer = Some(Instant::now());
        }
    }

    /// Runs one exchange with the controller: checks the instrument's identity first if this
    /// connection has not been checked yet, records the answer, and checks the identity again
    /// if the transport reconnected meanwhile (whoever answered may be another instrument).
    async fn exchange<T>(
        &self,
        op: impl Future<Output = Result<T, DeviceError>>,
    ) -> Result<T, DeviceError> {
        self.verify_identity().await?;
        let connection = self.transport.connections();
        let outcome = op.await;
        self.note_answer(&outcome);
        if matches!(&outcome, Err(e) if e.is_transient()) {
            // The controller did not answer: whoever answers next is checked again, even on a
            // link that stays open (a shared RS-485 line, a gateway).
            self.link().verified_on = None;
        }
        if self.transport.connections() != connection {
            self.verify_identity().await?;
        }
        outcome
    }

    /// Reads register 122 unless it was already found as expected on the current connection;
    /// fails with a [`DeviceError::Fault`] naming the value read and the values expected.
    async fn verify_identity(&self) -> Result<(), DeviceError> {
        let IdentCheck::OneOf(expected) = &self.config.ident else {
            return Ok(());
        };
        let connection = self.transport.connections();
        if connection != 0 && self.link().verified_on == Some(connection) {
            return Ok(());
        }
        let outcome = self.identify().await;
        self.note_answer(&outcome);
        let expected_text = || {
            let names: Vec<String> = expected.iter().map(|i| describe_ident(*i)).collect();
            names.join(" or ")
        };
        let ident = match outcome {
            Ok(ident) => ident,
            Err(DeviceError::Refused { reason, .. }) => {
                self.link().verified_on = None;
                return Err(DeviceError::Fault(format!(
                    "{} at {} has no instrument ident (register 122: {reason}), expected {}: \
                     not a Eurotherm 2000-series controller",
                    self.info.id,
                    self.transport.describe(),
                    expected_text()
                )));
            }
            // A failed read leaves the identity unverified: it is asked again next time.
            Err(e) => return Err(e),
        };
        if !expected.contains(&ident) {
            self.link().verified_on = None;
            return Err(DeviceError::Fault(format!(
                "{} at {}: instrument ident (register 122) reads 0x{ident:04X}, expected {}: \
                 a different instrument or unit id; for a compatible model add 0x{ident:04X} to \
                 expected_ident",
                self.info.id,
                self.transport.describe(),
                expected_text()
            )));
        }
        self.link().verified_on = Some(self.transport.connections());
        Ok(())
    }

    /// Reads PV, setpoints, output and status bits.
    pub async fn read_snapshot(&self) -> Result<Snapshot, DeviceError> {
        let dp = self.config.decimal_places;
        let span = registers::WORKING_SP - registers::PV + 1;
        let words = self
            .exchange(self.transport.read_holding(registers::PV, span))
            .await?;
        let [pv, target, output, _working_output, working] = words[..] else {
            return Err(DeviceError::Corrupt {
                what: "read of registers 1..=5".to_owned(),
                reason: format!("expected 5 registers, got {}", words.len()),
            });
        };
        let status = self
            .exchange(self.transport.read_holding(registers::STATUS, 1))
            .await?;
        Ok(Snapshot {
            pv_c: decode(pv, dp),
            target_sp_c: decode(target, dp),
            output_pct: decode(output, self.config.output_decimal_places),
            working_sp_c: decode(working, dp),
            status_bits: first_word(&status, "read of register 75")?,
        })
    }

    /// Reads the setpoint rate limit, °C/min (0 = off).
    pub async fn read_rate_limit(&self) -> Result<f64, DeviceError> {
        let words = self
            .exchange(self.transport.read_holding(registers::SP_RATE_LIMIT, 1))
            .await?;
        Ok(decode(
            first_word(&words, "read of register 35")?,
            self.config.decimal_places,
        ))
    }

    /// Writes a scaled value; `field` names it in the error if it cannot be represented.
    async fn write_scaled(&self, reg: u16, field: &str, value: f64) -> Result<(), DeviceError> {
        let raw = encode(value, self.config.decimal_places).ok_or_else(|| DeviceError::Limit {
            field: field.to_owned(),
            value,
            limit: self.register_range(),
        })?;
        self.transport.write_single(reg, raw).await
    }

    fn register_range(&self) -> String {
        let max = f64::from(i16::MAX) / scale(self.config.decimal_places);
        format!(
            "register range ±{max} ({} decimal places)",
            self.config.decimal_places
        )
    }

    fn is_active(&self, target_sp_c: f64) -> bool {
        target_sp_c > self.config.safe_setpoint_c + self.config.tolerance_c
    }

    fn check_temperature(&self, field: String, value: f64) -> Result<(), DeviceError> {
        let limits = &self.config.limits;
        let violation = |limit: String| DeviceError::Limit {
            field: field.clone(),
            value,
            limit,
        };
        if !value.is_finite() {
            return Err(violation("finite values".to_owned()));
        }
        // A furnace cannot cool below ambient; a negative target is a typo unless the
        // configuration explicitly allows it.
        let min = limits.get("min_temperature_c").unwrap_or(0.0);
        if value < min {
            return Err(violation(format!("min_temperature_c {min}")));
        }
        if let Some(max) = limits.get("max_temperature_c")
            && value > max
        {
            return Err(violation(format!("max_temperature_c {max}")));
        }
        if encode(value, self.config.decimal_places).is_none() {
            return Err(violation(self.register_range()));
        }
        Ok(())
    }

    fn check_rate(&self, field: String, value: f64) -> Result<(), DeviceError> {
        let violation = |limit: String| DeviceError::Limit {
            field: field.clone(),
            value,
            limit,
        };
        if !value.is_finite() {
            return Err(violation("finite values".to_owned()));
        }
        // Rate 0 means "no rate limit" to the controller: a ramp would become a step.
        if value <= 0.0 {
            return Err(violation("min_rate_c_per_min > 0".to_owned()));
        }
        if let Some(max) = self.config.limits.get("max_rate_c_per_min")
            && value > max
        {
            return Err(violation(format!("max_rate_c_per_min {max}")));
        }
        if encode(value, self.config.decimal_places).is_none() {
            return Err(violation(self.register_range()));
        }
        Ok(())
    }

    fn check_hold(&self, field: String, value: f64) -> Result<(), DeviceError> {
        let violation = |limit: String| DeviceError::Limit {
            field: field.clone(),
            value,
            limit,
        };
        if !value.is_finite() {
            return Err(violation("finite values".to_owned()));
        }
        if value < 0.0 {
            return Err(violation("min_duration_s 0".to_owned()));
        }
        if let Some(max) = self.config.limits.get("max_hold_s")
            && value > max
        {
            return Err(violation(format!("max_hold_s {max}")));
        }
        Ok(())
    }

    fn check_segments(&self, segments: &[Segment]) -> Result<(), DeviceError> {
        for (i, segment) in segments.iter().enumerate() {
            match *segment {
                Segment::Ramp {
                    temperature_c,
                    rate_c_per_min,
                } => {
                    self.check_temperature(
                        format!("segments[{i}].ramp.temperature_c"),
                        temperature_c,
                    )?;
                    self.check_rate(format!("segments[{i}].ramp.rate_c_per_min"), rate_c_per_min)?;
                }
                Segment::Hold { duration_s } => {
                    self.check_hold(format!("segments[{i}].hold.duration_s"), duration_s)?;
                }
                Segment::StepTo { temperature_c } => {
                    self.check_temperature(
                        format!("segments[{i}].step.temperature_c"),
                        temperature_c,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Fails with the named fault if the status bits report one.
    fn check_faults(&self, status_bits: u16) -> Result<(), DeviceError> {
        let faults = names_of(status_bits, &FAULT_BITS);
        if faults.is_empty() {
            Ok(())
        } else {
            Err(DeviceError::Fault(format!(
                "{} reported by the controller (status 0x{status_bits:04X})",
                faults.join(", ")
            )))
        }
    }

    async fn run_program(
        &self,
        segments: &[Segment],
        ctx: &StepContext,
    ) -> Result<FurnaceResult, DeviceError> {
        let mut run = ProgramRun::new(self, ctx, segments);
        run.run().await?;
        Ok(run.result)
    }

    async fn adopt_program(
        &self,
        segments: &[Segment],
        elapsed_s: f64,
        ctx: &StepContext,
    ) -> Result<FurnaceResult, DeviceError> {
        let mut run = ProgramRun::new(self, ctx, segments);
        run.adopt(elapsed_s).await?;
        Ok(run.result)
    }

    /// Leaves the furnace safe after a program ends by any path, reporting the program's
    /// outcome unless making it safe failed after a success.
    async fn finish_program(
        &self,
        outcome: Result<FurnaceResult, DeviceError>,
    ) -> Result<StepOutput, DeviceError> {
        let safe = self.safe_state().await;
        match (outcome, safe) {
            (Ok(result), Ok(())) => Ok(StepOutput::pack(&result)),
            (Ok(_), Err(e)) => {
                tracing::error!(device = %self.info.id, error = %e, "program finished but the furnace could not be made safe");
                Err(e)
            }
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(safe_error)) => {
                tracing::error!(device = %self.info.id, step_error = %e, error = %safe_error, "could not make the furnace safe after a failed step");
                Err(e)
            }
        }
    }
}

/// Sleeps for `real`, returning [`DeviceError::Aborted`] if the step is cancelled meanwhile.
/// Fails the step when the controller no longer holds the program's setpoint: a controller
/// that restarted comes back at its power-up setpoint (and one changed at its front panel at
/// another), and silently continuing would report a program the sample never saw.
fn check_setpoint(snap: &Snapshot, program_c: f64, tolerance_c: f64) -> Result<(), DeviceError> {
    if (snap.target_sp_c - program_c).abs() <= tolerance_c {
        return Ok(());
    }
    Err(DeviceError::Fault(format!(
        "controller restarted or overridden: target setpoint is {:.1} °C, \
         the program holds {program_c:.1} °C",
        snap.target_sp_c
    )))
}

async fn pause(ctx: &StepContext, real: Duration) -> Result<(), DeviceError> {
    tokio::select! {
        biased;
        _ = ctx.cancel.cancelled() => Err(DeviceError::Aborted),
        _ = tokio::time::sleep(real) => Ok(()),
    }
}

fn first_word(words: &[u16], what: &str) -> Result<u16, DeviceError> {
    words.first().copied().ok_or_else(|| DeviceError::Corrupt {
        what: what.to_owned(),
        reason: "empty reply".to_owned(),
    })
}

/// The state of one program run: the trace being recorded and the progress bookkeeping.
struct ProgramRun<'a> {
    dev: &'a Eurotherm,
    ctx: &'a StepContext,
    segments: &'a [Segment],
    /// Expected physical duration of each segment, for progress and deadlines.
    expected_s: Vec<f64>,
    total_expected_s: f64,
    /// Physical time the program started.
    t0: f64,
    last_progress_s: f64,
    /// Real instant the step started: an outage is never counted from before it.
    started: Instant,
    /// Where the program is, for outage reasons: "program start", "segment 2 (hold)".
    phase: String,
    /// Last rate limit written, reported with readings.
    rate_limit: Option<f64>,
    /// PV of the latest sample.
    last_pv: f64,
    /// Program time of the latest sample, s.
    last_t_s: f64,
    /// Real time the latest sample's exchange took: the floor of the wait to the next one.
    last_exchange: Duration,
    result: FurnaceResult,
}

impl<'a> ProgramRun<'a> {
    fn new(dev: &'a Eurotherm, ctx: &'a StepContext, segments: &'a [Segment]) -> Self {
        Self {
            dev,
            ctx,
            segments,
            expected_s: Vec::new(),
            total_expected_s: 0.0,
            t0: ctx.clock.now_s(),
            last_progress_s: f64::NEG_INFINITY,
            started: Instant::now(),
            phase: "program start".to_owned(),
            rate_limit: None,
            last_pv: f64::NAN,
            last_t_s: 0.0,
            last_exchange: Duration::ZERO,
            result: FurnaceResult::default(),
        }
    }

    /// Runs `op`, riding out transient transport failures while the controller has been
    /// silent for at most `transient_grace` of real time, counted from the last exchange it
    /// answered (or the step's start). The same limit applies when an exchange succeeds only
    /// after the transport had to reconnect: the controller was unsupervised meanwhile either
    /// way. Returns [`DeviceError::Aborted`] as soon as the step is cancelled.
    async fn tolerant<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, DeviceError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, DeviceError>>,
    {
        let dev = self.dev;
        let grace = dev.config.transient_grace;
        let mut failed = false;
        loop {
            if self.ctx.cancel.is_cancelled() {
                return Err(DeviceError::Aborted);
            }
            let last_answer = dev.last_answer();
            let connection = dev.transport.connections();
            // Dropping an in-flight request is safe: the transport then discards the connection.
            let outcome = tokio::select! {
                biased;
                _ = self.ctx.cancel.cancelled() => return Err(DeviceError::Aborted),
                outcome = op() => outcome,
            };
            let transient = matches!(&outcome, Err(e) if e.is_transient());
            failed |= transient;
            // A reconnect inside the transport means some attempt failed, even if a retry
            // then succeeded.
            if transient || dev.transport.connections() != connection {
                let since = last_answer.map_or(self.started, |t| t.max(self.started));
                let silent = since.elapsed();
                if silent > grace {
                    let cause = match &outcome {
                        Err(e) => format!("{what}: {e}"),
                        Ok(_) => format!("{what} succeeded only after that"),
                    };
                    return Err(DeviceError::Disconnected(format!(
                        "{} unreachable for {:.1} s (grace {} s) during {}; {cause}",
                        dev.info.id,
                        silent.as_secs_f64(),
                        grace.as_secs_f64(),
                        self.phase
                    )));
                }
            }
            match outcome {
                Ok(value) => {
                    if failed {
                        tracing::info!(device = %dev.info.id, phase = %self.phase, "link recovered during step");
                    }
                    return Ok(value);
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(device = %dev.info.id, error = %e, "{what} failed; retrying");
                    pause(self.ctx, OUTAGE_PAUSE).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes one scaled register, tolerating a short outage.
    async fn write_during_step(
        &self,
        reg: u16,
        field: &str,
        value: f64,
    ) -> Result<(), DeviceError> {
        let dev = self.dev;
        let what = format!("writing {field}");
        self.tolerant(&what, move || {
            dev.exchange(dev.write_scaled(reg, field, value))
        })
        .await
    }

    async fn run(&mut self) -> Result<(), DeviceError> {
        let dev = self.dev;
        // Read (and fault-check) before sending anything.
        let first = self.poll(None).await?;
        self.plan(first.pv_c);
        self.progress(0, 0.0, "starting furnace program".to_owned(), true);
        self.tolerant("selecting auto mode", move || {
            dev.exchange(dev.transport.write_single(registers::AUTO_MANUAL, 0))
        })
        .await?;

        // A leading hold holds whatever the controller is already set to.
        let mut setpoint = first.target_sp_c;
        for i in 0..self.segments.len() {
            setpoint = self.run_segment(i, setpoint).await?;
        }
        self.send_progress(1.0, "furnace program complete".to_owned(), Some(0.0));
        Ok(())
    }

    /// Runs segment `i` from its start with the controller at `setpoint`; returns the
    /// setpoint afterwards.
    async fn run_segment(&mut self, i: usize, setpoint: f64) -> Result<f64, DeviceError> {
        let dev = self.dev;
        let n = self.segments.len();
        let Some(segment) = self.segments.get(i).copied() else {
            return Ok(setpoint);
        };
        self.enter(i, &segment);
        match segment {
            Segment::Ramp {
                temperature_c,
                rate_c_per_min,
            } => {
                let message = format!(
                    "segment {}/{n}: ramp to {temperature_c} °C at {rate_c_per_min} °C/min",
                    i + 1
                );
                self.progress(i, 0.0, message.clone(), true);
                // Rate first, so the new target is approached at the rate from the start.
                self.write_during_step(
                    registers::SP_RATE_LIMIT,
                    "rate_limit_c_per_min",
                    rate_c_per_min,
                )
                .await?;
                self.rate_limit = Some(rate_c_per_min);
                self.write_during_step(registers::TARGET_SP, "target_sp_c", temperature_c)
                    .await?;
                self.reach(i, temperature_c, Some(rate_c_per_min), &message)
                    .await?;
                Ok(temperature_c)
            }
            Segment::StepTo { temperature_c } => {
                let message = format!("segment {}/{n}: step to {temperature_c} °C", i + 1);
                self.progress(i, 0.0, message.clone(), true);
                // "As fast as allowed": with a declared ramp limit the controller itself
                // holds the step to it, so a step can never outrun the furnace's limit.
                let rate = step_rate(&dev.config.limits);
                self.write_during_step(
                    registers::SP_RATE_LIMIT,
                    "rate_limit_c_per_min",
                    rate.unwrap_or(0.0),
                )
                .await?;
                self.rate_limit = Some(rate.unwrap_or(0.0));
                self.write_during_step(registers::TARGET_SP, "target_sp_c", temperature_c)
                    .await?;
                self.reach(i, temperature_c, rate, &message).await?;
                Ok(temperature_c)
            }
            Segment::Hold { duration_s } => {
                let message = format!(
                    "segment {}/{n}: hold {setpoint} °C for {duration_s} s",
                    i + 1
                );
                self.progress(i, 0.0, message.clone(), true);
                self.hold(i, duration_s, setpoint, &message).await?;
                Ok(setpoint)
            }
        }
    }

    /// Re-attaches to this program, started `elapsed_s` physical seconds ago by an earlier
    /// run of the daemon (crash recovery). The controller kept regulating on its own, holding
    /// the last target ppud wrote. Finds the segment the program should be in from the
    /// planned durations, refuses unless the controller's target is that segment's target (so
    /// a furnace someone else reprogrammed is never taken over), then finishes the segment —
    /// a hold for its remaining time, a ramp or step by waiting for its target without
    /// rewriting it — and runs the remaining segments as usual.
    async fn adopt(&mut self, elapsed_s: f64) -> Result<(), DeviceError> {
        let clock = self.ctx.clock;
        let first = self.poll(None).await?;
        // Program time continues from when the program really started.
        let elapsed_s = elapsed_s.max(0.0);
        self.t0 = clock.now_s() - elapsed_s;
        if let Some(last) = self.result.trace.last_mut() {
            last.t_s = elapsed_s;
        }
        self.last_t_s = elapsed_s;
        // The program started from the idle furnace, at its safe setpoint.
        self.plan(self.dev.config.safe_setpoint_c);
        let n = self.segments.len();
        let mut start = 0.0;
        let mut index = n;
        for (i, expected) in self.expected_s.iter().enumerate() {
            if elapsed_s < start + expected || i + 1 == n {
                index = i;
                break;
            }
            start += expected;
        }
        let into_s = (elapsed_s - start).max(0.0);
        let upto = (index + 1).min(n);
        let expected_target = self.segments[..upto]
            .iter()
            .rev()
            .find_map(Segment::target_c);
        let tolerance = 10f64.powi(-i32::from(self.dev.config.decimal_places));
        if let Some(target) = expected_target
            && (first.target_sp_c - target).abs() > tolerance
        {
            return Err(DeviceError::Refused {
                what: "adopting the furnace program".to_owned(),
                reason: format!(
                    "the controller's target setpoint is {} °C, not the program's {target} °C: \
                     not the program this daemon started",
                    first.target_sp_c
                ),
            });
        }
        let Some(segment) = self.segments.get(index).copied() else {
            return Ok(());
        };
        self.enter(index, &segment);
        let mut setpoint = expected_target.unwrap_or(first.target_sp_c);
        self.progress(
            index,
            into_s,
            format!(
                "adopted running program at segment {}/{n}, {elapsed_s:.0} s in",
                index + 1
            ),
            true,
        );
        match segment {
            Segment::Ramp {
                temperature_c,
                rate_c_per_min,
            } => {
                self.rate_limit = Some(rate_c_per_min);
                let message = format!(
                    "segment {}/{n}: ramp to {temperature_c} °C at {rate_c_per_min} °C/min (adopted)",
                    index + 1
                );
                self.reach(index, temperature_c, Some(rate_c_per_min), &message)
                    .await?;
                setpoint = temperature_c;
            }
            Segment::StepTo { temperature_c } => {
                let rate = step_rate(&self.dev.config.limits);
                self.rate_limit = rate.or(Some(0.0));
                let message = format!(
                    "segment {}/{n}: step to {temperature_c} °C (adopted)",
                    index + 1
                );
                self.reach(index, temperature_c, rate, &message).await?;
                setpoint = temperature_c;
            }
            Segment::Hold { duration_s } => {
                let remaining = (duration_s - into_s).max(0.0);
                let message = format!(
                    "segment {}/{n}: hold {setpoint} °C for {duration_s} s (adopted, {remaining:.0} s left)",
                    index + 1
                );
                self.hold(index, remaining, setpoint, &message).await?;
            }
        }
        for i in index + 1..n {
            setpoint = self.run_segment(i, setpoint).await?;
        }
        self.send_progress(1.0, "furnace program complete".to_owned(), Some(0.0));
        Ok(())
    }

    /// Names segment `index` (0-based) as the current phase, for outage reasons.
    fn enter(&mut self, index: usize, segment: &Segment) {
        let kind = match segment {
            Segment::Ramp { .. } => "ramp",
            Segment::Hold { .. } => "hold",
            Segment::StepTo { .. } => "step",
        };
        self.phase = format!("segment {} ({kind})", index + 1);
    }

    /// Expected physical duration of each segment: ramps at their rate from the previous
    /// target, holds for their duration, steps as instantaneous (their length is the plant's).
    fn plan(&mut self, start_c: f64) {
        let mut from = start_c;
        self.expected_s = self
            .segments
            .iter()
            .map(|segment| {
                let expected = match *segment {
                    Segment::Ramp {
                        temperature_c,
                        rate_c_per_min,
                    } => (temperature_c - from).abs() / rate_c_per_min * 60.0,
                    Segment::Hold { duration_s } => duration_s,
                    Segment::StepTo { temperature_c } => step_rate(&self.dev.config.limits)
                        .map_or(0.0, |rate| (temperature_c - from).abs() / rate * 60.0),
                };
                if let Some(target) = segment.target_c() {
                    from = target;
                }
                expected
            })
            .collect();
        self.total_expected_s = self.expected_s.iter().sum();
    }

    /// Drives PV to `target` (the setpoint is already written), sampling until it is within
    /// tolerance or the segment's deadline passes.
    async fn reach(
        &mut self,
        index: usize,
        target: f64,
        rate_c_per_min: Option<f64>,
        message: &str,
    ) -> Result<(), DeviceError> {
        let clock = self.ctx.clock;
        let config = &self.dev.config;
        let start_s = clock.now_s();
        // Judge direction and ramp time from where PV actually is (the last sample); overshoot
        // only means something while heating.
        let start_pv = self.last_pv;
        let heating = target >= start_pv - config.tolerance_c;
        let expected_s = match rate_c_per_min {
            Some(rate) => (target - start_pv).abs() / rate * 60.0,
            None => 0.0,
        };
        loop {
            // The sample is judged at the physical time it was asked for. An exchange slowed
            // in real time (a loaded host, a slow link) moves the clock on by its delay times
            // the scale; judged after it, a PV read before the deadline would fail the
            // segment at a high scale only, and the outcome would depend on the time scale.
            let asked_s = clock.now_s();
            let snap = self.poll(heating.then_some(target)).await?;
            self.dev.holds_setpoint(&snap, target)?;
            let now = clock.now_s();
            if (snap.pv_c - target).abs() <= config.tolerance_c {
                self.result.targets.push(TargetReached {
                    segment_index: u32::try_from(index).unwrap_or(u32::MAX),
                    temperature_c: target,
                    reached_at_s: self.last_t_s,
                    tolerance_c: config.tolerance_c,
                });
                return Ok(());
            }
            let allowed_s = expected_s + config.settle_timeout_s;
            if asked_s - start_s > allowed_s {
                return Err(DeviceError::Fault(format!(
                    "furnace did not reach {target} °C within {allowed_s:.0} s \
                     (expected {expected_s:.0} s + settle {:.0} s); PV {:.1} °C",
                    config.settle_timeout_s, snap.pv_c
                )));
            }
            let elapsed = (now - start_s).min(self.expected_s.get(index).copied().unwrap_or(0.0));
            self.progress(
                index,
                elapsed,
                format!("{message} (PV {:.1} °C)", snap.pv_c),
                false,
            );
            self.wait_until(now + config.sample_interval_s).await?;
        }
    }

    /// Keeps sampling for `duration_s` of physical time while the controller holds `setpoint`.
    async fn hold(
        &mut self,
        index: usize,
        duration_s: f64,
        setpoint: f64,
        message: &str,
    ) -> Result<(), DeviceError> {
        let clock = self.ctx.clock;
        let end_s = clock.now_s() + duration_s;
        loop {
            let snap = self.poll(Some(setpoint)).await?;
            self.dev.holds_setpoint(&snap, setpoint)?;
            let now = clock.now_s();
            if now >= end_s {
                return Ok(());
            }
            let elapsed = duration_s - (end_s - now);
            self.progress(
                index,
                elapsed,
                format!("{message} (PV {:.1} °C)", snap.pv_c),
                false,
            );
            let next = (now + self.dev.config.sample_interval_s).min(end_s);
            self.wait_until(next).await?;
        }
    }

    /// Takes one sample: reads the controller, fails on a fault, records the trace point and
    /// the overshoot above `overshoot_target`, and streams the reading.
    async fn poll(&mut self, overshoot_target: Option<f64>) -> Result<Snapshot, DeviceError> {
        let dev = self.dev;
        let asked = Instant::now();
        let snap = self
            .tolerant("reading the controller", move || dev.read_snapshot())
            .await?;
        self.last_exchange = asked.elapsed();
        let t_s = self.ctx.clock.now_s() - self.t0;
        self.last_pv = snap.pv_c;
        self.last_t_s = t_s;
        self.result.trace.push(FurnaceSample {
            t_s,
            pv_c: snap.pv_c,
            working_sp_c: snap.working_sp_c,
            output_pct: snap.output_pct,
        });
        if let Some(target) = overshoot_target {
            self.result.max_overshoot_c = self.result.max_overshoot_c.max(snap.pv_c - target);
        }
        let active = dev.is_active(snap.target_sp_c);
        self.ctx
            .send(StepUpdate::Reading(snap.to_status(self.rate_limit, active)));
        dev.check_faults(snap.status_bits)?;
        Ok(snap)
    }

    /// Waits until physical time `t_s`, but at least as long as the latest exchange took
    /// (the protocol's floor: a fast clock cannot flood the link) and `min_poll`. A wait
    /// longer than a third of the grace is cut into pieces with a supervising read in
    /// between, so a silent or faulted controller is noticed within the grace even between
    /// trace samples.
    async fn wait_until(&self, t_s: f64) -> Result<(), DeviceError> {
        let dev = self.dev;
        let clock = self.ctx.clock;
        let floor = dev.config.min_poll.max(self.last_exchange);
        let piece = (dev.config.transient_grace / 3).max(floor);
        let mut real = clock.to_real(t_s - clock.now_s()).max(floor);
        while real > piece {
            pause(self.ctx, piece).await?;
            let snap = self
                .tolerant("supervising the controller", move || dev.read_snapshot())
                .await?;
            dev.check_faults(snap.status_bits)?;
            real = clock.to_real(t_s - clock.now_s());
        }
        pause(self.ctx, real).await
    }

    /// Sends progress for segment `index` with `elapsed_s` of it done; periodic updates are
    /// throttled to one per [`PROGRESS_INTERVAL_S`] of physical time.
    fn progress(&mut self, index: usize, elapsed_s: f64, message: String, force: bool) {
        let now = self.ctx.clock.now_s();
        if !force && now - self.last_progress_s < PROGRESS_INTERVAL_S {
            return;
        }
        self.last_progress_s = now;
        let done: f64 = self.expected_s.iter().take(index).sum::<f64>() + elapsed_s.max(0.0);
        let total = self.total_expected_s;
        let fraction = if total > 0.0 {
            (done / total).clamp(0.0, 1.0)
        } else {
            let n = self.segments.len().max(1) as f64;
            (index as f64 / n).clamp(0.0, 1.0)
        };
        let remaining = (total - done).max(0.0);
        self.send_progress(fraction, message, Some(remaining));
    }

    fn send_progress(&self, fraction: f64, message: String, remaining_s: Option<f64>) {
        self.ctx.send(StepUpdate::Progress {
            fraction,
            message,
            remaining_s,
        });
    }
}

#[async_trait]
impl Device for Eurotherm {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn check(&self, step: &StepCommand) -> Result<(), DeviceError> {
        self.check_segments(&super::program(step, &self.info.id)?)
    }

    async fn execute(
        &self,
        step: &StepCommand,
        ctx: StepContext,
    ) -> Result<StepOutput, DeviceError> {
        // Never send a command that breaks a limit, whatever the daemon checked before.
        let segments = super::program(step, &self.info.id)?;
        self.check_segments(&segments)?;
        let outcome = self.run_program(&segments, &ctx).await;
        // Every exit leaves the furnace safe: a finished program must not keep heating either.
        self.finish_program(outcome).await
    }

    async fn adopt(
        &self,
        step: &StepCommand,
        elapsed_s: f64,
        ctx: StepContext,
    ) -> Result<StepOutput, DeviceError> {
        let segments = super::program(step, &self.info.id)?;
        self.check_segments(&segments)?;
        let outcome = self.adopt_program(&segments, elapsed_s, &ctx).await;
        // Adopted or refused, the furnace ends safe, exactly as after `execute`.
        self.finish_program(outcome).await
    }

    async fn acknowledge_alarms(&self) -> Result<(), DeviceError> {
        Eurotherm::acknowledge_alarms(self).await
    }

    async fn status(&self) -> Result<DeviceStatus, DeviceError> {
        let snap = self.read_snapshot().await?;
        let rate = self.read_rate_limit().await?;
        let mut status = snap.to_status(Some(rate), self.is_active(snap.target_sp_c));
        if self.link().overridden {
            status.alarms.push(SETPOINT_OVERRIDDEN.to_owned());
        }
        Ok(status)
    }

    /// Target setpoint to the safe value first (so no later failure can leave a high target
    /// in force), then rate limit off (working SP jumps down to it), then auto mode (so a
    /// manual output level stops heating). If the link is down, stops after the first failed
    /// write instead of waiting out each one.
    async fn safe_state(&self) -> Result<(), DeviceError> {
        let mut first_error = None;
        let safe = self.config.safe_setpoint_c;
        let writes: [(u16, &str, f64); 3] = [
            (registers::TARGET_SP, "target_sp_c", safe),
            (registers::SP_RATE_LIMIT, "rate_limit_c_per_min", 0.0),
            (registers::AUTO_MANUAL, "auto_manual", 0.0),
        ];
        for (reg, field, value) in writes {
            let result = if reg == registers::AUTO_MANUAL {
                self.transport.write_single(reg, 0).await
            } else {
                self.write_scaled(reg, field, value).await
            };
            if let Err(e) = result {
                tracing::warn!(device = %self.info.id, register = reg, error = %e, "safe-state write failed");
                let transient = e.is_transient();
                first_error.get_or_insert(e);
                if transient {
                    break;
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Reads back what [`Device::safe_state`] writes: target setpoint at or below the safe
    /// value (within one count of the display resolution), rate limit off, auto mode.
    async fn confirm_safe(&self) -> Result<crate::device::SafeCheck, DeviceError> {
        let dp = self.config.decimal_places;
        let safe = self.config.safe_setpoint_c;
        let read = |reg: u16| async move {
            let words = self.transport.read_holding(reg, 1).await?;
            first_word(&words, &format!("read of register {reg}"))
        };
        let target = decode(read(registers::TARGET_SP).await?, dp);
        let rate = decode(read(registers::SP_RATE_LIMIT).await?, dp);
        let mode = read(registers::AUTO_MANUAL).await?;
        let mut deviations = Vec::new();
        if target > safe + 0.5 / scale(dp) {
            deviations.push(format!(
                "target setpoint (register {}) reads {target} °C, above the safe {safe} °C",
                registers::TARGET_SP
            ));
        }
        if rate != 0.0 {
            deviations.push(format!(
                "setpoint rate limit (register {}) reads {rate} °C/min, expected 0 (off)",
                registers::SP_RATE_LIMIT
            ));
        }
        if mode != 0 {
            deviations.push(format!(
                "auto/manual (register {}) reads {mode}, expected 0 (auto)",
                registers::AUTO_MANUAL
            ));
        }
        Ok(crate::device::SafeCheck::from_deviations(deviations))
    }
}

/// The rate limit a step segment runs at: the declared maximum, or none (rate limit off).
fn step_rate(limits: &Limits) -> Option<f64> {
    limits
        .get("max_rate_c_per_min")
        .filter(|r| r.is_finite() && *r > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::modbus::ModbusEndpoint;

    fn driver(limits: Limits) -> Eurotherm {
        let modbus = ModbusConfig::new(ModbusEndpoint::Tcp("127.0.0.1:5020".parse().unwrap()));
        let mut config = EurothermConfig::new("furnace-1", modbus);
        config.limits = limits;
        Eurotherm::new(config)
    }

    fn limits() -> Limits {
        Limits::default()
            .with("max_temperature_c", 1100.0)
            .with("max_rate_c_per_min", 20.0)
            .with("max_hold_s", 86400.0)
    }

    fn program(segments: Vec<Segment>) -> StepCommand {
        crate::furnace::program_command(&segments)
    }

    fn limit_field(err: DeviceError) -> (String, String) {
        match err {
            DeviceError::Limit { field, limit, .. } => (field, limit),
            other => panic!("expected a limit error, got {other:?}"),
        }
    }

    #[test]
    fn scaling_handles_negative_values_as_i16() {
        assert_eq!(decode(1234, 1), 123.4);
        assert_eq!(decode(0xFFFF, 1), -0.1);
        assert_eq!(decode((-2005i16) as u16, 1), -200.5);
        assert_eq!(decode(250, 0), 250.0);
        assert_eq!(decode(12345, 2), 123.45);
        assert_eq!(encode(123.4, 1), Some(1234));
        assert_eq!(encode(-0.1, 1), Some(0xFFFF));
        assert_eq!(encode(-200.5, 1), Some((-2005i16) as u16));
        assert_eq!(encode(3276.7, 1), Some(32767));
        assert_eq!(encode(3276.8, 1), None);
        assert_eq!(encode(-3276.8, 1), Some(0x8000));
        assert_eq!(encode(f64::NAN, 1), None);
        for v in [-40.0, 0.0, 25.0, 1100.0, 1234.5] {
            assert_eq!(encode(v, 1).map(|raw| decode(raw, 1)), Some(v));
        }
    }

    #[test]
    fn info_describes_the_transport() {
        let d = driver(limits());
        let info = d.info();
        assert_eq!(info.family, "furnace");
        assert_eq!(info.driver, "eurotherm");
        assert_eq!(info.transport, "modbus-tcp://127.0.0.1:5020 unit 1");
        assert_eq!(info.capabilities, vec!["furnace_program".to_owned()]);
        assert_eq!(info.limits, limits());
    }

    #[test]
    fn a_setpoint_away_from_the_program_fails_naming_both() {
        let snap = |target_sp_c| Snapshot {
            pv_c: 149.0,
            target_sp_c,
            output_pct: 10.0,
            working_sp_c: target_sp_c,
            status_bits: 0,
        };
        assert!(check_setpoint(&snap(150.0), 150.0, 2.0).is_ok());
        assert!(check_setpoint(&snap(151.5), 150.0, 2.0).is_ok());
        let err = check_setpoint(&snap(25.0), 150.0, 2.0).unwrap_err();
        assert!(matches!(err, DeviceError::Fault(_)), "{err:?}");
        assert!(
            err.to_string().contains(
                "controller restarted or overridden: target setpoint is 25.0 °C, \
                 the program holds 150.0 °C"
            ),
            "{err}"
        );
    }

    #[test]
    fn valid_program_passes() {
        let d = driver(limits());
        let step = program(vec![
            Segment::Ramp {
                temperature_c: 1100.0,
                rate_c_per_min: 20.0,
            },
            Segment::Hold { duration_s: 3600.0 },
            Segment::StepTo {
                temperature_c: 25.0,
            },
        ]);
        assert_eq!(d.check(&step), Ok(()));
    }

    #[test]
    fn limit_errors_name_the_field() {
        let d = driver(limits());
        let cases = [
            (
                Segment::Ramp {
                    temperature_c: 1200.0,
                    rate_c_per_min: 5.0,
                },
                "segments[1].ramp.temperature_c",
                "max_temperature_c 1100",
            ),
            (
                Segment::Ramp {
                    temperature_c: 500.0,
                    rate_c_per_min: 25.0,
                },
                "segments[1].ramp.rate_c_per_min",
                "max_rate_c_per_min 20",
            ),
            (
                Segment::Ramp {
                    temperature_c: 500.0,
                    rate_c_per_min: 0.0,
                },
                "segments[1].ramp.rate_c_per_min",
                "min_rate_c_per_min > 0",
            ),
            (
                Segment::Ramp {
                    temperature_c: f64::NAN,
                    rate_c_per_min: 5.0,
                },
                "segments[1].ramp.temperature_c",
                "finite values",
            ),
            (
                Segment::Hold {
                    duration_s: 90000.0,
                },
                "segments[1].hold.duration_s",
                "max_hold_s 86400",
            ),
            (
                Segment::Hold { duration_s: -1.0 },
                "segments[1].hold.duration_s",
                "min_duration_s 0",
            ),
            (
                Segment::Hold {
                    duration_s: f64::INFINITY,
                },
                "segments[1].hold.duration_s",
                "finite values",
            ),
            (
                Segment::StepTo {
                    temperature_c: -10.0,
                },
                "segments[1].step.temperature_c",
                "min_temperature_c 0",
            ),
        ];
        for (bad, field, limit) in cases {
            let step = program(vec![Segment::Hold { duration_s: 1.0 }, bad]);
            let (got_field, got_limit) = limit_field(d.check(&step).unwrap_err());
            assert_eq!(got_field, field, "{bad:?}");
            assert_eq!(got_limit, limit, "{bad:?}");
        }
    }

    #[test]
    fn unlimited_driver_still_rejects_unrepresentable_values() {
        let d = driver(Limits::default());
        let step = program(vec![Segment::StepTo {
            temperature_c: 5000.0,
        }]);
        let (field, limit) = limit_field(d.check(&step).unwrap_err());
        assert_eq!(field, "segments[0].step.temperature_c");
        assert!(limit.starts_with("register range"), "{limit}");
    }

    #[test]
    fn status_bits_become_alarm_names_and_faults() {
        let snap = Snapshot {
            pv_c: 20.0,
            target_sp_c: 25.0,
            output_pct: 0.0,
            working_sp_c: 25.0,
            status_bits: (1 << 0) | (1 << 7) | (1 << 13),
        };
        assert_eq!(snap.alarms(), vec!["alarm 1", "heater fail"]);
        let d = driver(limits());
        let DeviceError::Fault(msg) = d.check_faults(snap.status_bits).unwrap_err() else {
            panic!("expected fault");
        };
        assert!(msg.contains("heater fail"), "{msg}");
        assert_eq!(d.check_faults(1 << 13), Ok(()));
        assert!(d.check_faults(1 << 5).is_err());
        assert!(d.check_faults(1 << 6).is_err());
    }

    #[test]
    fn status_reports_all_readings() {
        let snap = Snapshot {
            pv_c: 200.0,
            target_sp_c: 200.0,
            output_pct: 40.0,
            working_sp_c: 199.0,
            status_bits: 0,
        };
        let status = snap.to_status(Some(10.0), true);
        let names: Vec<_> = status.readings.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "pv_c",
                "target_sp_c",
                "working_sp_c",
                "output_pct",
                "rate_limit_c_per_min"
            ]
        );
        assert!(status.active);
        let d = driver(limits());
        assert!(d.is_active(200.0));
        assert!(!d.is_active(26.0));
    }
}
