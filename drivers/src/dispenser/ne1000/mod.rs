//! New Era NE-1000 / NE-4000 syringe pump over RS-232 — the `ne1000` driver.
//!
//! One pump holds one syringe of one reagent (see [`crate::dispenser`] for how pumps and the
//! station's balance compose). A dispense:
//!
//! 1. checks the step against the declared limits and the syringe's tracked fill;
//! 2. with the station lock held (where a balance serves the station) tares the balance;
//! 3. reads `DIS` (anything unaccounted goes to the fill ledger), clears it (`CLD`), and sends
//!    `DIA`, `DIR INF`, `RAT` (in whichever unit keeps four digits and the most precision),
//!    `VOL`, then `RUN`;
//! 4. polls `DIS` until the pump stops, streaming progress; an alarm (stall `A?S`, reset `A?R`,
//!    watchdog `A?T`) or an overrun stops the pump and fails the step;
//! 5. reads the delivered volume from `DIS`, updates the fill, weighs, and fails the step when
//!    |measured − expected| / expected exceeds the configured tolerance.
//!
//! # Fill ledger
//!
//! The pump's `DIS` counters only grow until cleared, so the driver records which part of them
//! it has already booked: any later `DIS` read (a status poll, a step, the safe state after a
//! crash) books only the difference. The ledger is what [`Device::saved_state`] returns; after a
//! daemon crash mid-dispense the restored ledger plus the pump's counters still give the right
//! fill. A counter that went down means the pump reset it (power cycle) and is booked whole.
//!
//! # Alarms
//!
//! An alarm replaces the status in the reply to the next command, once, and the command it
//! answers is not carried out. The driver records it (it shows in [`Device::status`] until the
//! next step starts), resends idempotent commands, redoes the whole configuration after a reset
//! (`A?R`: the pump lost its settings), and fails a running step.
//!
//! # Safe mode
//!
//! With `safe_mode_watchdog_s` set, the driver enters safe mode (`SAF n`) on first use: every
//! frame is then length-prefixed and CRC-16-CCITT checked, and a keep-alive task polls the pump
//! whenever no command went out for a third of the watchdog, so an idle pump does not raise
//! `A?T`. If the daemon dies the pump stops by itself within the watchdog. The watchdog and
//! keep-alive run in real time, like every protocol timeout.

/// Its `[[devices]]` entry (`driver = "ne1000"`).
pub mod config;
pub mod protocol;

use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::StepKind;
use super::schema::{DispenseResult, RefillResult};
use crate::balance::sics::{SicsBalance, SicsError};
use crate::device::{
    Device, DeviceError, DeviceInfo, DeviceStatus, Limits, Reading, StepCommand, StepContext,
    StepOutput, StepUpdate,
};
use crate::transport::serial::{Frame, RequestOptions, SerialConfig, SerialTransport};
use protocol::{
    Alarm, Command, Direction, Dispensed, PumpError, Reply, ReplyBody, Status, VolumeUnit,
};

/// Volumes closer than this (mL) are equal: the pump prints at most four digits.
const VOLUME_EPS_ML: f64 = 1e-6;
/// Largest relative rounding a volume or rate may suffer from the four-digit rule.
const MAX_ROUNDING: f64 = 1e-3;
/// Pause between attempts while riding out a link outage during a step (real time).
const OUTAGE_PAUSE: Duration = Duration::from_millis(100);
/// A run counts as overdue only after this much real time too, so that a fast clock cannot
/// turn command latency into a false "did not finish".
const MIN_REAL_OVERRUN: Duration = Duration::from_secs(2);
/// Tag of the persisted ledger format.
const STATE_TAG: &str = "ppu-ne1000-ledger v1";

/// Configuration of one pump and the syringe it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Ne1000Config {
    pub id: String,
    /// Framing must be [`Framing::Ne1000`](crate::transport::serial::Framing::Ne1000).
    pub serial: SerialConfig,
    /// Pump address on the line, 0–99.
    pub address: u8,
    /// The reagent in the syringe; dispense and refill steps name it.
    pub reagent: String,
    pub density_g_per_ml: f64,
    pub syringe_inner_diameter_mm: f64,
    pub syringe_volume_ml: f64,
    /// Fill when the daemon has no saved state for this pump (first start), mL.
    pub fill_ml: f64,
    /// `max_rate_ml_per_min` and `max_volume_ml` (per dispense; never more than the syringe).
    pub limits: Limits,
    /// Largest |measured − expected| / expected a gravimetric check accepts.
    pub tolerance: f64,
    /// Withdraw rate of a refill that names none, mL/min.
    pub refill_rate_ml_per_min: f64,
    /// Safe mode with this watchdog (1–255 s, real time); `None` = basic mode.
    pub safe_mode_watchdog_s: Option<u8>,
    /// Physical seconds between polls while the pump runs.
    pub poll_interval_s: f64,
    /// Real-time floor between polls beyond the protocol's own: a poll never follows the
    /// previous one sooner than that exchange took (the link is never more than half busy,
    /// whatever the clock's scale), nor sooner than this. Zero by default.
    pub min_poll: Duration,
    /// Physical seconds a run may take beyond volume / rate before it counts as stuck.
    pub finish_grace_s: f64,
    /// Real time a running step rides out link failures before failing.
    pub transient_grace: Duration,
    /// Real time the balance may take to settle for the tare and the weighing.
    pub weigh_timeout: Duration,
}

impl Ne1000Config {
    /// Defaults for a 10 mL syringe (14.43 mm, BD plastic) of a water-like reagent: 2 %
    /// tolerance, 10 mL/min refills, basic mode, a poll every 2 s physical (no floor beyond
    /// the exchange's own round trip),
    /// 30 s grace, 10 s transient grace and weighing timeout.
    pub fn new(id: impl Into<String>, serial: SerialConfig, reagent: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            serial,
            address: 0,
            reagent: reagent.into(),
            density_g_per_ml: 1.0,
            syringe_inner_diameter_mm: 14.43,
            syringe_volume_ml: 10.0,
            fill_ml: 10.0,
            limits: Limits::default(),
            tolerance: 0.02,
            refill_rate_ml_per_min: 10.0,
            safe_mode_watchdog_s: None,
            poll_interval_s: 2.0,
            min_poll: Duration::ZERO,
            finish_grace_s: 30.0,
            transient_grace: Duration::from_secs(10),
            weigh_timeout: Duration::from_secs(10),
        }
    }

    /// The volume unit the pump uses for this syringe.
    pub fn volume_unit(&self) -> VolumeUnit {
        VolumeUnit::for_diameter(self.syringe_inner_diameter_mm)
    }

    /// Largest volume of one dispense: the declared limit, never more than the syringe.
    pub fn max_dispense_ml(&self) -> f64 {
        self.limits
            .get("max_volume_ml")
            .map_or(self.syringe_volume_ml, |m| m.min(self.syringe_volume_ml))
    }

    /// Problems that make this configuration unusable, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let positive = |name: &str, v: f64, out: &mut Vec<String>| {
            if !(v.is_finite() && v > 0.0) {
                out.push(format!("{name}: {v} must be a positive number"));
            }
        };
        if self.reagent.is_empty() {
            out.push("reagent: must not be empty".to_owned());
        }
        if self.address > protocol::MAX_ADDRESS {
            out.push(format!("address: {} is more than 99", self.address));
        }
        positive("density_g_per_ml", self.density_g_per_ml, &mut out);
        positive("syringe_volume_ml", self.syringe_volume_ml, &mut out);
        positive("tolerance", self.tolerance, &mut out);
        positive(
            "refill_rate_ml_per_min",
            self.refill_rate_ml_per_min,
            &mut out,
        );
        let (lo, hi) = protocol::DIAMETER_RANGE_MM;
        let d = self.syringe_inner_diameter_mm;
        if !(d.is_finite() && (lo..=hi).contains(&d)) {
            out.push(format!(
                "syringe_inner_diameter_mm: {d} is outside the pump's {lo}–{hi} mm"
            ));
        }
        if !(self.fill_ml.is_finite()
            && self.fill_ml >= 0.0
            && self.fill_ml <= self.syringe_volume_ml)
        {
            out.push(format!(
                "fill_ml: {} must be between 0 and syringe_volume_ml {}",
                self.fill_ml, self.syringe_volume_ml
            ));
        }
        if self.safe_mode_watchdog_s == Some(0) {
            out.push("safe_mode_watchdog_s: must be 1–255 (omit it for basic mode)".to_owned());
        }
        out
    }
}

/// What a pump command can fail with, typed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Ne1000Error {
    /// The pump refused the command (`?`, `?NA`, `?OOR`, `?COM`, `?IGN`).
    #[error("pump refused {command}: {error}")]
    Pump { command: String, error: PumpError },
    /// An alarm answered the command (which was not carried out).
    #[error("{alarm} in reply to {command}")]
    Alarm { command: String, alarm: Alarm },
    /// A well-framed reply that does not answer the command.
    #[error("unexpected reply to {command}: {reason}")]
    Reply { command: String, reason: String },
    #[error(transparent)]
    Link(#[from] DeviceError),
}

impl From<Ne1000Error> for DeviceError {
    fn from(e: Ne1000Error) -> Self {
        match e {
            Ne1000Error::Link(inner) => inner,
            Ne1000Error::Pump { command, error } => DeviceError::Refused {
                what: command,
                reason: error.to_string(),
            },
            Ne1000Error::Alarm { alarm, .. } => DeviceError::Fault(alarm.to_string()),
            Ne1000Error::Reply { command, reason } => DeviceError::Corrupt {
                what: command,
                reason,
            },
        }
    }
}

/// The syringe's fill and how much of the pump's `DIS` counters is already booked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ledger {
    pub fill_ml: f64,
    pub booked_infused_ml: f64,
    pub booked_withdrawn_ml: f64,
}

impl Ledger {
    pub fn new(fill_ml: f64) -> Self {
        Self {
            fill_ml,
            booked_infused_ml: 0.0,
            booked_withdrawn_ml: 0.0,
        }
    }

    /// Books what the counters show beyond what was booked; returns (infused, withdrawn) mL
    /// newly booked. A reading below what was booked is a garbled reply (counters only grow
    /// until cleared, and a power cycle is announced by `A?R`, see [`Ledger::cleared`]), so it
    /// books nothing.
    pub fn book(&mut self, dispensed: &Dispensed) -> (f64, f64) {
        let (inf, wdr) = (dispensed.infused_ml(), dispensed.withdrawn_ml());
        if inf + VOLUME_EPS_ML < self.booked_infused_ml
            || wdr + VOLUME_EPS_ML < self.booked_withdrawn_ml
        {
            return (0.0, 0.0);
        }
        let infused = (inf - self.booked_infused_ml).max(0.0);
        let withdrawn = (wdr - self.booked_withdrawn_ml).max(0.0);
        self.fill_ml = (self.fill_ml - infused + withdrawn).max(0.0);
        self.booked_infused_ml = self.booked_infused_ml.max(inf);
        self.booked_withdrawn_ml = self.booked_withdrawn_ml.max(wdr);
        (infused, withdrawn)
    }

    /// The pump's counters were cleared (by `CLD`, or by a power cycle: `A?R`).
    pub fn cleared(&mut self) {
        self.booked_infused_ml = 0.0;
        self.booked_withdrawn_ml = 0.0;
    }

    pub fn encode(&self, reagent: &str) -> Vec<u8> {
        format!(
            "{STATE_TAG}\nreagent={reagent}\nfill_ml={}\nbooked_infused_ml={}\nbooked_withdrawn_ml={}\n",
            self.fill_ml, self.booked_infused_ml, self.booked_withdrawn_ml
        )
        .into_bytes()
    }

    /// Parses [`Ledger::encode`]'s output; returns the reagent too.
    pub fn decode(bytes: &[u8]) -> Result<(String, Ledger), String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
        let mut lines = text.lines();
        if lines.next() != Some(STATE_TAG) {
            return Err(format!("not a {STATE_TAG} record"));
        }
        let (mut reagent, mut fill, mut inf, mut wdr) = (None, None, None, None);
        for line in lines {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("bad line {line:?}"))?;
            let number = || {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| format!("{key}: bad value {value:?}"))
            };
            match key {
                "reagent" => reagent = Some(value.to_owned()),
                "fill_ml" => fill = Some(number()?),
                "booked_infused_ml" => inf = Some(number()?),
                "booked_withdrawn_ml" => wdr = Some(number()?),
                other => return Err(format!("unknown key {other:?}")),
            }
        }
        match (reagent, fill, inf, wdr) {
            (Some(r), Some(fill_ml), Some(i), Some(w)) => Ok((
                r,
                Ledger {
                    fill_ml,
                    booked_infused_ml: i,
                    booked_withdrawn_ml: w,
                },
            )),
            _ => Err("missing keys".to_owned()),
        }
    }
}

struct PumpState {
    ledger: Ledger,
    /// The last alarm seen; shown in the status until the next step starts.
    alarm: Option<Alarm>,
    /// True once the pump acknowledged `SAF n` (reset by `A?R` and by silence).
    safe_active: bool,
    last_status: Option<Status>,
}

struct Inner {
    info: DeviceInfo,
    config: Ne1000Config,
    transport: SerialTransport,
    balance: Option<Arc<SicsBalance>>,
    state: Mutex<PumpState>,
    /// Held by a running step; the safe state books counters only when no step runs.
    step: tokio::sync::Mutex<()>,
    last_command: Mutex<Option<Instant>>,
    keepalive: Mutex<Option<JoinHandle<()>>>,
}

/// A NE-1000 pump driving one syringe.
pub struct Ne1000Pump {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ne1000Pump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ne1000Pump")
            .field("id", &self.inner.info.id)
            .field("reagent", &self.inner.config.reagent)
            .field("fill_ml", &self.fill_ml())
            .finish_non_exhaustive()
    }
}

impl Drop for Ne1000Pump {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.inner.keepalive).take() {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded data stays consistent between statements, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The outcome of a run: what the counters showed when the pump stopped.
struct RunEnd {
    dispensed: Dispensed,
}

impl Ne1000Pump {
    /// Creates the driver; `balance` is the station's balance, if one serves it. Nothing is sent
    /// until the first request.
    pub fn new(config: Ne1000Config, balance: Option<Arc<SicsBalance>>) -> Self {
        let transport = SerialTransport::new(config.serial.clone());
        Self::with_transport(config, transport, balance)
    }

    /// Creates the driver on `transport`, e.g. a handle onto a daisy chain of pumps
    /// ([`SerialBus::device`](crate::transport::serial::SerialBus::device)); the pump is told
    /// apart from its neighbours by `config.address`, in its commands and in their replies.
    pub fn with_transport(
        config: Ne1000Config,
        transport: SerialTransport,
        balance: Option<Arc<SicsBalance>>,
    ) -> Self {
        transport.set_metrics_device(config.id.clone());
        let limits = config
            .limits
            .clone()
            .with("max_volume_ml", config.max_dispense_ml());
        let mut transport_text = format!("{} address {}", transport.describe(), config.address);
        if let Some(b) = &balance {
            transport_text.push_str(&format!(", weighed by {}", b.info().id));
        }
        let info = DeviceInfo {
            id: config.id.clone(),
            family: "dispenser".into(),
            driver: "ne1000".to_owned(),
            transport: transport_text,
            capabilities: vec!["dispense".into()],
            limits,
        };
        let ledger = Ledger::new(config.fill_ml);
        Self {
            inner: Arc::new(Inner {
                info,
                config,
                transport,
                balance,
                state: Mutex::new(PumpState {
                    ledger,
                    alarm: None,
                    safe_active: false,
                    last_status: None,
                }),
                step: tokio::sync::Mutex::new(()),
                last_command: Mutex::new(None),
                keepalive: Mutex::new(None),
            }),
        }
    }

    pub fn config(&self) -> &Ne1000Config {
        &self.inner.config
    }

    pub fn transport(&self) -> &SerialTransport {
        &self.inner.transport
    }

    /// The syringe's tracked fill, mL.
    pub fn fill_ml(&self) -> f64 {
        lock(&self.inner.state).ledger.fill_ml
    }

    pub fn ledger(&self) -> Ledger {
        lock(&self.inner.state).ledger
    }

    /// The last alarm the pump reported, until the next step starts.
    pub fn last_alarm(&self) -> Option<Alarm> {
        lock(&self.inner.state).alarm
    }

    /// Sends one command and returns the status and data of its reply (typed errors for `?…`
    /// and alarms). Enters safe mode first when it is configured.
    pub async fn command(&self, command: &Command) -> Result<(Status, String), Ne1000Error> {
        self.inner.exec(command).await
    }

    /// The firmware version (`VER`).
    pub async fn version(&self) -> Result<String, Ne1000Error> {
        self.inner
            .exec_resending(&Command::Version)
            .await
            .map(|(_, data)| data)
    }

    /// Reads `DIS` and books it; returns the status and the counters.
    pub async fn read_dispensed(&self) -> Result<(Status, Dispensed), Ne1000Error> {
        self.inner.read_dispensed().await
    }
}

impl Inner {
    fn id(&self) -> &str {
        &self.info.id
    }

    fn safe_wanted(&self) -> Option<u8> {
        self.config.safe_mode_watchdog_s.filter(|n| *n > 0)
    }

    /// One exchange, framed for the current mode; returns the decoded reply.
    async fn raw(
        &self,
        command: &Command,
        safe: bool,
        options: RequestOptions,
    ) -> Result<Reply, DeviceError> {
        let address = self.config.address;
        let bytes = if safe {
            command
                .encode_safe(address)
                .map_err(|e| DeviceError::Refused {
                    what: command.to_string(),
                    reason: e.to_string(),
                })?
        } else {
            command.encode_basic(address)
        };
        let what = format!("{command} (pump {})", self.id());
        let max_ml = self.config.syringe_volume_ml * 1.5;
        let reply = self
            .transport
            .request_with(&bytes, &what, options, |frame: &Frame| {
                let reply = protocol::parse_reply(&frame.payload).map_err(|e| e.to_string())?;
                if reply.address != address {
                    return Err(format!("reply from address {}", reply.address));
                }
                validate_reply(command, &reply, max_ml)?;
                Ok(reply)
            })
            .await;
        *lock(&self.last_command) = Some(Instant::now());
        reply
    }

    /// Switches the pump to safe mode: `SAF n` in basic framing (a pump fresh from power-up),
    /// else in safe framing (a pump that is in safe mode already).
    async fn enter_safe_mode(self: &Arc<Self>, watchdog_s: u8) -> Result<(), Ne1000Error> {
        let command = Command::SafeMode(watchdog_s);
        let quick = RequestOptions {
            timeout: None,
            retries: Some(0),
        };
        let mut reply = self.raw(&command, false, quick).await;
        if matches!(reply, Err(DeviceError::Timeout { .. })) {
            reply = self.raw(&command, true, RequestOptions::default()).await;
        }
        let reply = reply?;
        if let ReplyBody::Alarm(alarm) = reply.body {
            // The alarm answered instead of SAF: note it and switch once more.
            self.note_alarm(alarm);
            let again = self.raw(&command, false, RequestOptions::default()).await?;
            self.interpret(&command, again)?;
        } else {
            self.interpret(&command, reply)?;
        }
        lock(&self.state).safe_active = true;
        tracing::info!(device = %self.id(), watchdog_s, "pump in safe mode");
        self.start_keepalive(watchdog_s);
        Ok(())
    }

    fn start_keepalive(self: &Arc<Self>, watchdog_s: u8) {
        let mut slot = lock(&self.keepalive);
        if slot.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let period =
            (Duration::from_secs(u64::from(watchdog_s)) / 3).max(Duration::from_millis(100));
        let weak: Weak<Inner> = Arc::downgrade(self);
        *slot = Some(handle.spawn(keepalive(weak, period)));
    }

    fn note_alarm(&self, alarm: Alarm) {
        tracing::warn!(device = %self.id(), %alarm, "pump alarm");
        let mut state = lock(&self.state);
        state.alarm = Some(alarm);
        if alarm == Alarm::Reset {
            // A power cycle leaves the pump in basic mode with its counters cleared.
            state.safe_active = false;
            state.ledger.cleared();
        }
    }

    fn interpret(&self, command: &Command, reply: Reply) -> Result<(Status, String), Ne1000Error> {
        match reply.body {
            ReplyBody::Status { status, data } => {
                lock(&self.state).last_status = Some(status);
                Ok((status, data))
            }
            ReplyBody::Error { status, error } => {
                lock(&self.state).last_status = Some(status);
                Err(Ne1000Error::Pump {
                    command: command.to_string(),
                    error,
                })
            }
            ReplyBody::Alarm(alarm) => {
                self.note_alarm(alarm);
                Err(Ne1000Error::Alarm {
                    command: command.to_string(),
                    alarm,
                })
            }
        }
    }

    /// Sends a command in the configured mode; alarms and `?…` come back typed. A `?COM` (the
    /// pump got a corrupt frame) is resent like a lost reply.
    async fn exec(self: &Arc<Self>, command: &Command) -> Result<(Status, String), Ne1000Error> {
        let mut com_errors = 0;
        let mut renegotiated = false;
        loop {
            let safe = match self.safe_wanted() {
                Some(n) => {
                    if !lock(&self.state).safe_active {
                        self.enter_safe_mode(n).await?;
                    }
                    true
                }
                None => false,
            };
            let reply = match self.raw(command, safe, RequestOptions::default()).await {
                Ok(reply) => reply,
                // Silence in safe mode may mean the pump power-cycled back to basic mode.
                Err(DeviceError::Timeout { .. }) if safe && !renegotiated => {
                    renegotiated = true;
                    lock(&self.state).safe_active = false;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match self.interpret(command, reply) {
                Err(Ne1000Error::Pump {
                    error: PumpError::Communication,
                    ..
                }) if com_errors < self.config.serial.retries => {
                    com_errors += 1;
                    tracing::warn!(device = %self.id(), %command, "pump reported ?COM; resending");
                }
                other => return other,
            }
        }
    }

    /// [`Inner::exec`] for idempotent commands: an alarm is recorded and the command sent again
    /// (the alarm is reported once, and the command it answered was not carried out).
    async fn exec_resending(
        self: &Arc<Self>,
        command: &Command,
    ) -> Result<(Status, String), Ne1000Error> {
        match self.exec(command).await {
            Err(Ne1000Error::Alarm { .. }) => self.exec(command).await,
            other => other,
        }
    }

    async fn read_dispensed(self: &Arc<Self>) -> Result<(Status, Dispensed), Ne1000Error> {
        let (status, data) = self.exec_resending(&Command::QueryDispensed).await?;
        let dispensed = self.book(&data)?;
        Ok((status, dispensed))
    }

    /// Reads `DIS` until two consecutive readings agree (at most four reads) and books it: a
    /// basic-mode reply carries no checksum, so a volume that goes into the books is read twice.
    async fn read_dispensed_confirmed(
        self: &Arc<Self>,
    ) -> Result<(Status, Dispensed), Ne1000Error> {
        let mut last: Option<(Status, Dispensed)> = None;
        for _ in 0..4 {
            let (status, data) = self.exec_resending(&Command::QueryDispensed).await?;
            let dispensed = protocol::parse_dispensed(&data).map_err(|e| Ne1000Error::Reply {
                command: "DIS".to_owned(),
                reason: e.to_string(),
            })?;
            if last.is_some_and(|(s, d)| s == status && d == dispensed) {
                lock(&self.state).ledger.book(&dispensed);
                return Ok((status, dispensed));
            }
            last = Some((status, dispensed));
        }
        Err(Ne1000Error::Reply {
            command: "DIS".to_owned(),
            reason: "four readings of the dispensed volume disagreed".to_owned(),
        })
    }

    fn book(&self, data: &str) -> Result<Dispensed, Ne1000Error> {
        let dispensed = protocol::parse_dispensed(data).map_err(|e| Ne1000Error::Reply {
            command: "DIS".to_owned(),
            reason: e.to_string(),
        })?;
        lock(&self.state).ledger.book(&dispensed);
        Ok(dispensed)
    }

    /// Books and clears the counters, then sets diameter, direction, rate and volume. Starts
    /// over once if the pump reports a reset half-way (its earlier settings are gone).
    async fn configure(
        self: &Arc<Self>,
        direction: Direction,
        rate: &protocol::Rate,
        volume_text: &str,
    ) -> Result<(), Ne1000Error> {
        let diameter =
            protocol::format_number(self.config.syringe_inner_diameter_mm).map_err(|e| {
                Ne1000Error::Reply {
                    command: "DIA".to_owned(),
                    reason: e.to_string(),
                }
            })?;
        let commands = [
            Command::SetDiameter(diameter),
            Command::SetDirection(direction),
            Command::SetRate(rate.text.clone(), rate.unit),
            Command::SetVolume(volume_text.to_owned()),
        ];
        let mut resets = 0;
        'again: loop {
            self.read_dispensed_confirmed().await?;
            for clear in [Direction::Infuse, Direction::Withdraw] {
                self.exec_resending(&Command::ClearDispensed(clear)).await?;
            }
            lock(&self.state).ledger.cleared();
            for command in &commands {
                match self.exec(command).await {
                    Ok(_) => {}
                    Err(Ne1000Error::Alarm {
                        alarm: Alarm::Reset,
                        ..
                    }) if resets == 0 => {
                        resets += 1;
                        continue 'again;
                    }
                    Err(Ne1000Error::Alarm { .. }) => {
                        self.exec(command).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
            return Ok(());
        }
    }

    /// Sends `RUN`. A lost reply is not retried blindly: the status decides whether the pump
    /// already runs.
    async fn start(self: &Arc<Self>) -> Result<(), Ne1000Error> {
        let once = RequestOptions {
            timeout: None,
            retries: Some(0),
        };
        let safe = lock(&self.state).safe_active && self.safe_wanted().is_some();
        let first = self.raw(&Command::Run, safe, once).await;
        match first {
            Ok(reply) => match self.interpret(&Command::Run, reply) {
                Ok(_) => Ok(()),
                Err(Ne1000Error::Pump {
                    error: PumpError::Communication,
                    ..
                }) => self.exec(&Command::Run).await.map(|_| ()),
                Err(e) => Err(e),
            },
            Err(e) if e.is_transient() => {
                tracing::warn!(device = %self.id(), error = %e, "no reply to RUN; checking whether the pump runs");
                let (status, _) = self.exec(&Command::Poll).await?;
                if status.is_moving() {
                    Ok(())
                } else {
                    self.exec(&Command::Run).await.map(|_| ())
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `STP` until the pump confirms it stopped.
    async fn stop(self: &Arc<Self>) -> Result<(), Ne1000Error> {
        self.exec_resending(&Command::Stop).await.map(|_| ())
    }

    /// Forgets alarms raised before the pump was (re)configured for this step: the
    /// configuration already dealt with them (a reset is redone, a stall is over).
    fn clear_old_alarm(&self) {
        if let Some(alarm) = self.take_alarm() {
            tracing::info!(device = %self.id(), %alarm, "alarm from before this step cleared");
        }
    }

    fn take_alarm(&self) -> Option<Alarm> {
        lock(&self.state).alarm.take()
    }

    fn status_of(&self, status: Option<Status>, dispensed: Option<&Dispensed>) -> DeviceStatus {
        let state = lock(&self.state);
        let mut readings = vec![Reading::new("fill_ml", state.ledger.fill_ml)];
        if let Some(d) = dispensed {
            readings.push(Reading::new("infused_ml", d.infused_ml()));
            readings.push(Reading::new("withdrawn_ml", d.withdrawn_ml()));
        }
        let moving = status.is_some_and(Status::is_moving);
        readings.push(Reading::new("pumping", if moving { 1.0 } else { 0.0 }));
        DeviceStatus {
            readings,
            alarms: state.alarm.iter().map(ToString::to_string).collect(),
            active: moving,
        }
    }

    /// Runs `op`, riding out transient link failures for up to `transient_grace`; returns
    /// [`DeviceError::Aborted`] as soon as the step is cancelled.
    async fn tolerant<T, F, Fut>(&self, ctx: &StepContext, mut op: F) -> Result<T, Ne1000Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Ne1000Error>>,
    {
        let mut outage_since: Option<Instant> = None;
        loop {
            let outcome = tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => return Err(DeviceError::Aborted.into()),
                outcome = op() => outcome,
            };
            match outcome {
                Err(Ne1000Error::Link(e)) if e.is_transient() => {
                    let since = *outage_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.config.transient_grace {
                        return Err(e.into());
                    }
                    tracing::warn!(device = %self.id(), error = %e, "pump link failed during step; retrying");
                    pause(ctx, OUTAGE_PAUSE).await?;
                }
                other => return other,
            }
        }
    }

    /// Polls until the pump stops; fails on an alarm, on cancellation and when overdue.
    async fn wait_for_stop(
        self: &Arc<Self>,
        ctx: &StepContext,
        verb: &str,
        volume_ml: f64,
        rate_ml_per_min: f64,
    ) -> Result<RunEnd, DeviceError> {
        let clock = ctx.clock;
        let expected_s = volume_ml / rate_ml_per_min * 60.0;
        let start_s = clock.now_s();
        let started = Instant::now();
        let deadline_s = start_s + expected_s * 1.1 + self.config.finish_grace_s;
        let withdraw = verb == "refill";
        loop {
            let asked = Instant::now();
            let (status, dispensed) = self
                .tolerant(ctx, || async {
                    let (status, data) = self.exec(&Command::QueryDispensed).await?;
                    Ok((status, self.book(&data)?))
                })
                .await
                .map_err(|e| self.alarm_to_fault(e, verb, None, volume_ml))?;
            let exchange = asked.elapsed();
            let done_ml = if withdraw {
                dispensed.withdrawn_ml()
            } else {
                dispensed.infused_ml()
            };
            ctx.send(StepUpdate::Reading(
                self.status_of(Some(status), Some(&dispensed)),
            ));
            let now = clock.now_s();
            let remaining = ((volume_ml - done_ml) / rate_ml_per_min * 60.0).max(0.0);
            ctx.send(StepUpdate::Progress {
                fraction: (done_ml / volume_ml).clamp(0.0, 1.0),
                message: format!(
                    "{verb} {done_ml:.3} of {volume_ml:.3} mL of {}",
                    self.config.reagent
                ),
                remaining_s: Some(remaining),
            });
            if !status.is_moving() {
                let (_, dispensed) = self
                    .tolerant(ctx, || self.read_dispensed_confirmed())
                    .await
                    .map_err(|e| self.alarm_to_fault(e, verb, None, volume_ml))?;
                return Ok(RunEnd { dispensed });
            }
            if now > deadline_s && started.elapsed() > MIN_REAL_OVERRUN {
                return Err(DeviceError::Fault(format!(
                    "pump {} did not finish: {done_ml:.3} of {volume_ml:.3} mL after {:.0} s \
                     (expected {expected_s:.0} s)",
                    self.id(),
                    now - start_s
                )));
            }
            let next_s = self.config.poll_interval_s.min(remaining.max(0.0));
            let wait = clock
                .to_real(next_s)
                .max(self.config.min_poll)
                .max(exchange);
            pause(ctx, wait).await?;
        }
    }

    /// Turns an alarm during a run into a step failure that names it and the progress.
    fn alarm_to_fault(
        &self,
        e: Ne1000Error,
        verb: &str,
        done_ml: Option<f64>,
        volume_ml: f64,
    ) -> DeviceError {
        match e {
            Ne1000Error::Alarm { alarm, .. } => {
                let done = done_ml.map_or_else(String::new, |d| format!(" after {d:.3} mL"));
                DeviceError::Fault(format!(
                    "{alarm} during {verb} of {volume_ml:.3} mL on pump {}{done}",
                    self.id()
                ))
            }
            other => other.into(),
        }
    }

    /// After a failed or aborted run: stop the pump and book what it delivered.
    async fn stop_and_book(self: &Arc<Self>) -> Option<Dispensed> {
        if let Err(e) = self.stop().await {
            tracing::error!(device = %self.id(), error = %e, "could not stop the pump");
        }
        match self.read_dispensed_confirmed().await {
            Ok((_, d)) => Some(d),
            Err(e) => {
                tracing::error!(device = %self.id(), error = %e, "could not read the dispensed volume; fill may be wrong");
                None
            }
        }
    }

    fn check_reagent(&self, reagent: &str) -> Result<(), DeviceError> {
        if reagent == self.config.reagent {
            Ok(())
        } else {
            Err(DeviceError::Unsupported(format!(
                "pump {} holds reagent \"{}\", not \"{reagent}\"",
                self.id(),
                self.config.reagent
            )))
        }
    }

    fn check_rate(&self, rate: f64) -> Result<protocol::Rate, DeviceError> {
        let violation = |limit: String| DeviceError::Limit {
            field: "rate_ml_per_min".to_owned(),
            value: rate,
            limit,
        };
        if !(rate.is_finite() && rate > 0.0) {
            return Err(violation("a positive, finite rate".to_owned()));
        }
        if let Some(max) = self.config.limits.get("max_rate_ml_per_min")
            && rate > max
        {
            return Err(violation(format!("max_rate_ml_per_min {max}")));
        }
        let encoded = protocol::encode_rate(rate)
            .map_err(|_| violation("the pump's four-digit rate range".to_owned()))?;
        if (encoded.ml_per_min - rate).abs() / rate > MAX_ROUNDING {
            return Err(violation(format!(
                "the pump's resolution (would run at {} mL/min)",
                encoded.ml_per_min
            )));
        }
        Ok(encoded)
    }

    /// Checks a volume against the per-dispense limit and the pump's number format; returns
    /// the `VOL` text and the volume the pump will deliver, mL.
    fn check_volume(&self, volume: f64, max_ml: f64) -> Result<(String, f64), DeviceError> {
        let violation = |limit: String| DeviceError::Limit {
            field: "volume_ml".to_owned(),
            value: volume,
            limit,
        };
        if !(volume.is_finite() && volume > 0.0) {
            return Err(violation("a positive, finite volume".to_owned()));
        }
        if volume > max_ml + VOLUME_EPS_ML {
            return Err(violation(if max_ml < self.config.syringe_volume_ml {
                format!("max_volume_ml {max_ml}")
            } else {
                format!("the syringe volume {max_ml} mL")
            }));
        }
        let unit = self.config.volume_unit();
        let in_unit = unit.from_ml(volume);
        let text = protocol::format_number(in_unit)
            .map_err(|_| violation(format!("the pump's four-digit range in {}", unit.code())))?;
        let sent = unit.to_ml(protocol::parse_number(&text).unwrap_or(0.0));
        if (sent - volume).abs() / volume > MAX_ROUNDING {
            return Err(violation(format!(
                "the pump's resolution in {} (would deliver {sent} mL)",
                unit.code()
            )));
        }
        Ok((text, sent))
    }

    fn check_step(&self, step: &StepCommand) -> Result<(), DeviceError> {
        match StepKind::of(step, &self.info.id)? {
            StepKind::Dispense {
                reagent,
                volume_ml,
                rate_ml_per_min,
            } => {
                self.check_reagent(&reagent)?;
                self.check_volume(volume_ml, self.config.max_dispense_ml())?;
                self.check_rate(rate_ml_per_min)?;
                Ok(())
            }
            StepKind::Refill {
                reagent,
                volume_ml,
                rate_ml_per_min,
            } => {
                self.check_reagent(&reagent)?;
                if let Some(v) = volume_ml {
                    self.check_volume(v, self.config.syringe_volume_ml)?;
                }
                self.check_rate(rate_ml_per_min.unwrap_or(self.config.refill_rate_ml_per_min))?;
                Ok(())
            }
        }
    }

    async fn dispense(
        self: &Arc<Self>,
        reagent: &str,
        volume_ml: f64,
        rate_ml_per_min: f64,
        ctx: &StepContext,
    ) -> Result<DispenseResult, DeviceError> {
        let (volume_text, volume_sent) =
            self.check_volume(volume_ml, self.config.max_dispense_ml())?;
        let rate = self.check_rate(rate_ml_per_min)?;
        // Book anything the pump delivered since the last step before judging the fill.
        self.tolerant(ctx, || self.read_dispensed_confirmed())
            .await?;
        let fill = lock(&self.state).ledger.fill_ml;
        if volume_sent > fill + VOLUME_EPS_ML {
            return Err(DeviceError::Limit {
                field: "volume_ml".to_owned(),
                value: volume_ml,
                limit: format!(
                    "the {fill:.3} mL of {reagent} left in the syringe of pump {} (refill first)",
                    self.id()
                ),
            });
        }
        let _station = match &self.balance {
            Some(b) => Some(b.station().await),
            None => None,
        };
        self.tolerant(ctx, || {
            self.configure(Direction::Infuse, &rate, &volume_text)
        })
        .await?;
        self.clear_old_alarm();
        let tare = match &self.balance {
            Some(b) => Some(
                b.tare(self.config.weigh_timeout)
                    .await
                    .map_err(|e| weigh_fault("taring", b, e))?,
            ),
            None => None,
        };
        tracing::info!(device = %self.id(), reagent, volume_ml, rate = %format!("{}{}", rate.text, rate.unit.code()), ?tare, "dispensing");
        let run = async {
            self.start().await?;
            self.wait_for_stop(ctx, "dispense", volume_sent, rate.ml_per_min)
                .await
        };
        let end = match run.await {
            Ok(end) => end,
            Err(e) => {
                let delivered = self.stop_and_book().await;
                let e = match (e, delivered) {
                    (DeviceError::Fault(msg), Some(d)) => DeviceError::Fault(format!(
                        "{msg}; {:.3} of {volume_ml:.3} mL delivered, pump stopped",
                        d.infused_ml()
                    )),
                    (e, _) => e,
                };
                return Err(e);
            }
        };
        if let Some(alarm) = self.take_alarm() {
            return Err(DeviceError::Fault(format!(
                "{alarm} during dispense on pump {}; {:.3} of {volume_ml:.3} mL delivered",
                self.id(),
                end.dispensed.infused_ml()
            )));
        }
        let pumped = end.dispensed.infused_ml();
        let remaining_ml = lock(&self.state).ledger.fill_ml;
        if (pumped - volume_sent).abs()
            > (self.config.tolerance * volume_sent).max(2.0 * VOLUME_EPS_ML)
        {
            return Err(DeviceError::Fault(format!(
                "pump {} stopped after {pumped:.3} of {volume_ml:.3} mL",
                self.id()
            )));
        }
        let expected_mass_g = volume_ml * self.config.density_g_per_ml;
        let mut result = DispenseResult {
            reagent: reagent.to_owned(),
            requested_volume_ml: volume_ml,
            pump_volume_ml: pumped,
            measured_mass_g: None,
            expected_mass_g,
            relative_deviation: None,
            remaining_ml,
        };
        if let Some(b) = &self.balance {
            let weight = b
                .weigh_stable(self.config.weigh_timeout)
                .await
                .map_err(|e| weigh_fault("weighing", b, e))?;
            let measured = weight.grams();
            let deviation = (measured - expected_mass_g) / expected_mass_g;
            result.measured_mass_g = Some(measured);
            result.relative_deviation = Some(deviation);
            if deviation.abs() > self.config.tolerance {
                return Err(DeviceError::Fault(format!(
                    "gravimetric check failed for {reagent}: measured {measured:.4} g, expected \
                     {expected_mass_g:.4} g ({volume_ml} mL × {} g/mL), deviation {:+.2} % \
                     exceeds the tolerance of {:.2} % (pump reported {pumped:.3} mL)",
                    self.config.density_g_per_ml,
                    deviation * 100.0,
                    self.config.tolerance * 100.0
                )));
            }
        }
        ctx.send(StepUpdate::Progress {
            fraction: 1.0,
            message: format!("dispensed {pumped:.3} mL of {reagent}"),
            remaining_s: Some(0.0),
        });
        Ok(result)
    }

    async fn refill(
        self: &Arc<Self>,
        reagent: &str,
        volume_ml: Option<f64>,
        rate_ml_per_min: Option<f64>,
        ctx: &StepContext,
    ) -> Result<RefillResult, DeviceError> {
        let rate =
            self.check_rate(rate_ml_per_min.unwrap_or(self.config.refill_rate_ml_per_min))?;
        self.tolerant(ctx, || self.read_dispensed_confirmed())
            .await?;
        let fill = lock(&self.state).ledger.fill_ml;
        let space = (self.config.syringe_volume_ml - fill).max(0.0);
        // Fill up by default, rounded down to what the pump can represent: withdrawing past
        // the syringe's end would stall the motor.
        let unit = self.config.volume_unit();
        let wanted =
            volume_ml.unwrap_or_else(|| unit.to_ml(floor_representable(unit.from_ml(space))));
        if wanted <= VOLUME_EPS_ML {
            return Ok(RefillResult {
                reagent: reagent.to_owned(),
                volume_ml: 0.0,
                fill_ml: fill,
            });
        }
        if wanted > space + VOLUME_EPS_ML {
            return Err(DeviceError::Limit {
                field: "volume_ml".to_owned(),
                value: wanted,
                limit: format!(
                    "the {space:.3} mL free in the syringe of pump {} ({fill:.3} of {} mL filled)",
                    self.id(),
                    self.config.syringe_volume_ml
                ),
            });
        }
        let (volume_text, volume_sent) =
            self.check_volume(wanted, self.config.syringe_volume_ml)?;
        self.tolerant(ctx, || {
            self.configure(Direction::Withdraw, &rate, &volume_text)
        })
        .await?;
        self.clear_old_alarm();
        tracing::info!(device = %self.id(), reagent, volume_ml = volume_sent, "refilling");
        let run = async {
            self.start().await?;
            self.wait_for_stop(ctx, "refill", volume_sent, rate.ml_per_min)
                .await
        };
        let end = match run.await {
            Ok(end) => end,
            Err(e) => {
                self.stop_and_book().await;
                return Err(e);
            }
        };
        if let Some(alarm) = self.take_alarm() {
            return Err(DeviceError::Fault(format!(
                "{alarm} during refill on pump {}; {:.3} of {volume_sent:.3} mL withdrawn",
                self.id(),
                end.dispensed.withdrawn_ml()
            )));
        }
        Ok(RefillResult {
            reagent: reagent.to_owned(),
            volume_ml: end.dispensed.withdrawn_ml(),
            fill_ml: lock(&self.state).ledger.fill_ml,
        })
    }
}

/// Rejects replies whose data cannot answer `command` (a garbled basic-mode reply: no
/// checksum protects it), so the transport treats them as noise and reads or asks again.
fn validate_reply(command: &Command, reply: &Reply, max_ml: f64) -> Result<(), String> {
    let ReplyBody::Status { data, .. } = &reply.body else {
        return Ok(());
    };
    let text = |e: protocol::ParseError| e.to_string();
    match command {
        Command::QueryDispensed => {
            let d = protocol::parse_dispensed(data).map_err(text)?;
            if d.infused_ml() > max_ml || d.withdrawn_ml() > max_ml {
                return Err(format!("implausible dispensed volume {data:?}"));
            }
        }
        Command::QueryDiameter => {
            let d = protocol::parse_diameter(data).map_err(text)?;
            let (lo, hi) = protocol::DIAMETER_RANGE_MM;
            if !(lo..=hi).contains(&d) {
                return Err(format!("implausible diameter {data:?}"));
            }
        }
        Command::QueryRate => {
            protocol::parse_rate(data).map_err(text)?;
        }
        Command::QueryVolume => {
            protocol::parse_volume(data).map_err(text)?;
        }
        Command::QueryDirection => {
            protocol::parse_direction(data).map_err(text)?;
        }
        Command::Version => {
            if data.is_empty() {
                return Err("empty version".to_owned());
            }
        }
        _ => {
            if !data.is_empty() {
                return Err(format!("unexpected data {data:?} in reply to {command}"));
            }
        }
    }
    Ok(())
}

/// The largest four-digit number not above `value` (0 when nothing fits).
fn floor_representable(value: f64) -> f64 {
    let Ok(text) = protocol::format_number(value) else {
        return if value >= 9999.0 { 9999.0 } else { 0.0 };
    };
    let decimals = text.split_once('.').map_or(0, |(_, d)| d.len());
    let factor = 10f64.powi(i32::try_from(decimals).unwrap_or(0));
    ((value * factor + 1e-9).floor() / factor).max(0.0)
}

fn weigh_fault(what: &str, balance: &SicsBalance, e: SicsError) -> DeviceError {
    match e {
        SicsError::Link(inner) => inner,
        other => DeviceError::Fault(format!("{what} on balance {}: {other}", balance.info().id)),
    }
}

/// Polls the pump whenever nothing else talked to it for `period`, so the safe-mode watchdog
/// never fires while the daemon runs. Ends when the driver is dropped.
async fn keepalive(inner: Weak<Inner>, period: Duration) {
    loop {
        let wait = {
            let Some(inner) = inner.upgrade() else { return };
            let last = *lock(&inner.last_command);
            match last {
                Some(t) if t.elapsed() < period => period - t.elapsed(),
                _ => {
                    if let Err(e) = inner.exec(&Command::Poll).await {
                        tracing::debug!(device = %inner.id(), error = %e, "keep-alive poll failed");
                    }
                    period
                }
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Sleeps for `real`, returning [`DeviceError::Aborted`] if the step is cancelled meanwhile.
async fn pause(ctx: &StepContext, real: Duration) -> Result<(), DeviceError> {
    tokio::select! {
        biased;
        _ = ctx.cancel.cancelled() => Err(DeviceError::Aborted),
        _ = tokio::time::sleep(real) => Ok(()),
    }
}

#[async_trait]
impl Device for Ne1000Pump {
    fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    fn check(&self, step: &StepCommand) -> Result<(), DeviceError> {
        self.inner.check_step(step)
    }

    async fn execute(
        &self,
        step: &StepCommand,
        ctx: StepContext,
    ) -> Result<StepOutput, DeviceError> {
        self.check(step)?;
        let inner = &self.inner;
        let _step = inner.step.lock().await;
        match StepKind::of(step, &inner.info.id)? {
            StepKind::Dispense {
                reagent,
                volume_ml,
                rate_ml_per_min,
            } => inner
                .dispense(&reagent, volume_ml, rate_ml_per_min, &ctx)
                .await
                .map(|r| StepOutput::pack(&r)),
            StepKind::Refill {
                reagent,
                volume_ml,
                rate_ml_per_min,
            } => inner
                .refill(&reagent, volume_ml, rate_ml_per_min, &ctx)
                .await
                .map(|r| StepOutput::pack(&r)),
        }
    }

    async fn status(&self) -> Result<DeviceStatus, DeviceError> {
        let (status, dispensed) = self.inner.read_dispensed().await?;
        Ok(self.inner.status_of(Some(status), Some(&dispensed)))
    }

    /// `STP`, then (when no step is running) books whatever the pump delivered, so a dispense
    /// cut short by a crash is still subtracted from the fill.
    async fn safe_state(&self) -> Result<(), DeviceError> {
        let inner = &self.inner;
        inner.stop().await?;
        if let Ok(_step) = inner.step.try_lock() {
            inner.read_dispensed_confirmed().await?;
        }
        Ok(())
    }

    /// The pump answers the empty command (a status poll) with its status character; only
    /// `S` (stopped) is safe. A paused pump (`P`, `T`) or one waiting for a trigger (`U`)
    /// would move again on its own, so it is not.
    async fn confirm_safe(&self) -> Result<crate::device::SafeCheck, DeviceError> {
        let (status, _) = self.inner.exec_resending(&Command::Poll).await?;
        Ok(crate::device::SafeCheck::from_deviations(
            if status == Status::Stopped {
                Vec::new()
            } else {
                vec![format!(
                    "pump status reads '{}', expected 'S' (stopped)",
                    status.code()
                )]
            },
        ))
    }

    fn saved_state(&self) -> Option<Vec<u8>> {
        Some(self.ledger().encode(&self.inner.config.reagent))
    }

    fn restore_state(&self, state: &[u8]) -> Result<(), DeviceError> {
        let (reagent, ledger) = Ledger::decode(state).map_err(|reason| DeviceError::Corrupt {
            what: "saved pump state".to_owned(),
            reason,
        })?;
        let config = &self.inner.config;
        if reagent != config.reagent {
            return Err(DeviceError::Refused {
                what: "saved pump state".to_owned(),
                reason: format!(
                    "it is for reagent \"{reagent}\" but the pump now holds \"{}\"; using fill_ml {} from the config",
                    config.reagent, config.fill_ml
                ),
            });
        }
        if ledger.fill_ml > config.syringe_volume_ml + VOLUME_EPS_ML {
            return Err(DeviceError::Refused {
                what: "saved pump state".to_owned(),
                reason: format!(
                    "fill {} mL exceeds the syringe's {} mL",
                    ledger.fill_ml, config.syringe_volume_ml
                ),
            });
        }
        lock(&self.inner.state).ledger = ledger;
        tracing::info!(device = %self.inner.info.id, fill_ml = ledger.fill_ml, "restored syringe fill");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::serial::Framing;

    fn pump(limits: Limits) -> Ne1000Pump {
        let serial = SerialConfig::new("/dev/null-pump", Framing::Ne1000);
        let mut c = Ne1000Config::new("pump-a", serial, "A");
        c.limits = limits;
        c.fill_ml = 5.0;
        Ne1000Pump::new(c, None)
    }

    fn dispense(reagent: &str, volume_ml: f64, rate_ml_per_min: f64) -> StepCommand {
        crate::dispenser::StepKind::Dispense {
            reagent: reagent.into(),
            volume_ml,
            rate_ml_per_min,
        }
        .pack()
    }

    fn limit(err: DeviceError) -> (String, String) {
        match err {
            DeviceError::Limit { field, limit, .. } => (field, limit),
            other => panic!("expected a limit error, got {other:?}"),
        }
    }

    #[test]
    fn check_accepts_own_reagent_within_limits() {
        let p = pump(
            Limits::default()
                .with("max_rate_ml_per_min", 20.0)
                .with("max_volume_ml", 5.0),
        );
        assert_eq!(p.check(&dispense("A", 2.5, 1.0)), Ok(()));
        assert_eq!(p.info().limits.get("max_volume_ml"), Some(5.0));
        let err = p.check(&dispense("B", 2.5, 1.0)).unwrap_err();
        assert!(
            matches!(&err, DeviceError::Unsupported(m) if m.contains("\"A\"")),
            "{err}"
        );
        assert_eq!(
            limit(p.check(&dispense("A", 2.5, 25.0)).unwrap_err()),
            ("rate_ml_per_min".into(), "max_rate_ml_per_min 20".into())
        );
        assert_eq!(
            limit(p.check(&dispense("A", 6.0, 1.0)).unwrap_err()),
            ("volume_ml".into(), "max_volume_ml 5".into())
        );
        let (field, _) = limit(p.check(&dispense("A", f64::NAN, 1.0)).unwrap_err());
        assert_eq!(field, "volume_ml");
        // Below the pump's resolution in mL units (a 14.43 mm syringe counts in mL).
        let (field, lim) = limit(p.check(&dispense("A", 0.0004, 1.0)).unwrap_err());
        assert_eq!(field, "volume_ml");
        assert!(lim.contains("resolution"), "{lim}");
        let err = p.check(&crate::balance::weigh_command(None)).unwrap_err();
        assert!(matches!(err, DeviceError::Unsupported(_)));
    }

    #[test]
    fn the_syringe_caps_the_declared_volume_limit() {
        let p = pump(Limits::default().with("max_volume_ml", 50.0));
        assert_eq!(p.info().limits.get("max_volume_ml"), Some(10.0));
        let (_, lim) = limit(p.check(&dispense("A", 12.0, 1.0)).unwrap_err());
        assert_eq!(lim, "the syringe volume 10 mL");
        let refill = crate::dispenser::StepKind::Refill {
            reagent: "A".into(),
            volume_ml: Some(11.0),
            rate_ml_per_min: None,
        }
        .pack();
        assert!(p.check(&refill).is_err());
    }

    #[test]
    fn ledger_books_only_new_counts() {
        let mut l = Ledger::new(10.0);
        let d = |i: f64, w: f64| Dispensed {
            infused: i,
            withdrawn: w,
            unit: VolumeUnit::Millilitre,
        };
        assert_eq!(l.book(&d(1.0, 0.0)), (1.0, 0.0));
        assert_eq!(l.book(&d(2.5, 0.0)), (1.5, 0.0));
        assert_eq!(l.book(&d(2.5, 0.0)), (0.0, 0.0));
        assert!((l.fill_ml - 7.5).abs() < 1e-12);
        // A lower reading without a reset is a garbled reply: nothing booked.
        assert_eq!(l.book(&d(0.5, 1.0)), (0.0, 0.0));
        assert!((l.fill_ml - 7.5).abs() < 1e-12);
        // After a reset (A?R) or CLD, counting starts again from zero.
        l.cleared();
        assert_eq!(l.book(&d(0.5, 1.0)), (0.5, 1.0));
        assert!((l.fill_ml - 8.0).abs() < 1e-12);
        let bytes = l.encode("A");
        assert_eq!(Ledger::decode(&bytes), Ok(("A".to_owned(), l)));
        assert!(Ledger::decode(b"garbage").is_err());
        assert!(Ledger::decode(format!("{STATE_TAG}\nfill_ml=-1\n").as_bytes()).is_err());
    }

    #[test]
    fn saved_state_round_trips_and_refuses_another_reagent() {
        let p = pump(Limits::default());
        let saved = p.saved_state().unwrap();
        assert_eq!(p.restore_state(&saved), Ok(()));
        let mut other = Ledger::new(3.0);
        other.booked_infused_ml = 1.0;
        assert!(p.restore_state(&other.encode("B")).is_err());
        assert_eq!(p.restore_state(&other.encode("A")), Ok(()));
        assert_eq!(p.fill_ml(), 3.0);
        assert!(p.restore_state(&Ledger::new(11.0).encode("A")).is_err());
    }

    #[test]
    fn config_problems_are_named() {
        let serial = SerialConfig::new("/dev/x", Framing::Ne1000);
        let mut c = Ne1000Config::new("p", serial, "");
        c.syringe_inner_diameter_mm = 90.0;
        c.fill_ml = 12.0;
        c.safe_mode_watchdog_s = Some(0);
        let problems = c.problems().join("\n");
        for key in [
            "reagent",
            "syringe_inner_diameter_mm",
            "fill_ml",
            "safe_mode_watchdog_s",
        ] {
            assert!(problems.contains(key), "{problems}");
        }
    }
}
