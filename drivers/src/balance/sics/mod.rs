//! Mettler Toledo balance over MT-SICS (RS-232, `\r\n` lines) — the `mt_sics` driver.
//!
//! A balance is a [`Device`] of its own with the `weigh` capability, and it is also the
//! gravimetric check of a dispensing station: the station's pumps hold an `Arc` of the same
//! [`SicsBalance`] and take its [station lock](SicsBalance::station) around tare → dispense →
//! weigh, so two pumps never interleave their weighings. The balance serialises its own link,
//! so the daemon's status polls can go on meanwhile.
//!
//! `S`, `T` and `Z` wait on the balance side until the weight is stable, up to the balance's
//! own timeout, and answer `S I` / `T I` / `Z I` when it ran out; the driver repeats them until
//! its own real-time stability timeout. Overload (`S +`) and underload (`S -`) are faults of a
//! weighing, not of the link.

/// Its `[[devices]]` entry (`driver = "mt_sics"`).
pub mod config;
pub mod protocol;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Mutex, MutexGuard};
use tokio::time::Instant;

use super::schema::WeighResult;
use crate::device::{
    Device, DeviceError, DeviceInfo, DeviceStatus, Limits, Reading, StepCommand, StepContext,
    StepOutput,
};
use crate::transport::serial::{Frame, RequestOptions, SerialConfig, SerialTransport};
use protocol::{Command, Reply, Weight};

/// Configuration of one balance.
#[derive(Debug, Clone, PartialEq)]
pub struct SicsConfig {
    pub id: String,
    /// Framing must be [`Framing::CrLf`](crate::transport::serial::Framing::CrLf).
    pub serial: SerialConfig,
    /// Real time a weighing may wait for a stable reading before it counts as unstable.
    pub stability_timeout: Duration,
    pub limits: Limits,
}

impl SicsConfig {
    /// 10 s stability timeout, no limits.
    pub fn new(id: impl Into<String>, serial: SerialConfig) -> Self {
        Self {
            id: id.into(),
            serial,
            stability_timeout: Duration::from_secs(10),
            limits: Limits::default(),
        }
    }
}

/// What went wrong in one MT-SICS exchange.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SicsError {
    /// `reply` is the line as received (`S I` answers both `S` and `SI`).
    #[error("balance cannot execute {command} now ({reply})")]
    NotExecutable { command: String, reply: String },
    #[error("balance overload ({reply} in answer to {command})")]
    Overload { command: String, reply: String },
    #[error("balance underload ({reply} in answer to {command})")]
    Underload { command: String, reply: String },
    #[error("balance rejected {command} as a logical error")]
    Logical { command: String },
    #[error("balance did not recognise {command} (ES)")]
    Syntax { command: String },
    #[error("balance reported a transmission error for {command} (ET)")]
    Transmission { command: String },
    #[error("no stable weight within {timeout_ms} ms (last reading {last_g:?} g)")]
    Unstable {
        timeout_ms: u64,
        last_g: Option<f64>,
    },
    #[error("unexpected reply to {command}: {reply}")]
    Unexpected { command: String, reply: String },
    #[error(transparent)]
    Link(#[from] DeviceError),
}

impl From<SicsError> for DeviceError {
    fn from(e: SicsError) -> Self {
        match e {
            SicsError::Link(inner) => inner,
            SicsError::Overload { .. } | SicsError::Underload { .. } => {
                DeviceError::Fault(e.to_string())
            }
            SicsError::Unstable { .. } => DeviceError::Fault(e.to_string()),
            SicsError::Unexpected { command, reply } => DeviceError::Corrupt {
                what: command,
                reason: reply,
            },
            other => DeviceError::Refused {
                what: "balance command".to_owned(),
                reason: other.to_string(),
            },
        }
    }
}

/// A balance speaking MT-SICS.
#[derive(Debug)]
pub struct SicsBalance {
    info: DeviceInfo,
    config: SicsConfig,
    transport: SerialTransport,
    station: Mutex<()>,
}

impl SicsBalance {
    /// Creates the driver; nothing is sent until the first request.
    pub fn new(config: SicsConfig) -> Self {
        let transport = SerialTransport::new(config.serial.clone());
        transport.set_metrics_device(config.id.clone());
        let info = DeviceInfo {
            id: config.id.clone(),
            family: "balance".into(),
            driver: "mt_sics".to_owned(),
            transport: transport.describe(),
            capabilities: vec!["weigh".into()],
            limits: config.limits.clone(),
        };
        Self {
            info,
            config,
            transport,
            station: Mutex::new(()),
        }
    }

    pub fn config(&self) -> &SicsConfig {
        &self.config
    }

    pub fn transport(&self) -> &SerialTransport {
        &self.transport
    }

    /// Exclusive use of the station this balance serves, for a tare → dispense → weigh cycle.
    pub async fn station(&self) -> MutexGuard<'_, ()> {
        self.station.lock().await
    }

    /// Sends one command and returns its reply; `extra` lengthens the timeout for commands the
    /// balance holds until stable. A transmission error (`ET`) is retried like a lost reply.
    ///
    /// Replies are matched to the command by the exchange, not by their identifier (`S` and
    /// `SI` are both answered with `S`): the transport runs one exchange at a time and drops
    /// whatever was pending before it sends, and a line the manual does not define as an
    /// answer to this command is discarded.
    pub async fn send(&self, command: Command, extra: Duration) -> Result<Reply, SicsError> {
        let what = command.text();
        let options = RequestOptions {
            timeout: Some(self.config.serial.timeout + extra),
            retries: None,
        };
        let mut attempts = 0;
        loop {
            let reply = self
                .transport
                .request_with(&command.encode(), &what, options, |frame: &Frame| {
                    let reply = protocol::parse_reply(&frame.payload).map_err(|e| e.to_string())?;
                    if command.accepts(&reply) {
                        Ok(reply)
                    } else {
                        Err(format!("{:?} is no answer to {what}", reply.line()))
                    }
                })
                .await?;
            let command_name = || what.clone();
            return match reply {
                Reply::TransmissionError if attempts < self.config.serial.retries => {
                    attempts += 1;
                    tracing::warn!(device = %self.info.id, command = %what, "balance reported ET; resending");
                    continue;
                }
                Reply::TransmissionError => Err(SicsError::Transmission {
                    command: command_name(),
                }),
                Reply::SyntaxError => Err(SicsError::Syntax {
                    command: command_name(),
                }),
                Reply::LogicalError | Reply::Logical { .. } => Err(SicsError::Logical {
                    command: command_name(),
                }),
                Reply::NotExecutable { .. } => Err(SicsError::NotExecutable {
                    command: command_name(),
                    reply: reply.line(),
                }),
                Reply::Overload { .. } => Err(SicsError::Overload {
                    command: command_name(),
                    reply: reply.line(),
                }),
                Reply::Underload { .. } => Err(SicsError::Underload {
                    command: command_name(),
                    reply: reply.line(),
                }),
                other => Ok(other),
            };
        }
    }

    /// Repeats a command the balance holds until stable (`S`, `T`, `Z`) until it succeeds or
    /// `timeout` of real time passed.
    async fn until_stable(&self, command: Command, timeout: Duration) -> Result<Reply, SicsError> {
        let deadline = Instant::now() + timeout;
        let mut last_g = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.send(command, remaining).await {
                Err(SicsError::NotExecutable { .. }) if Instant::now() < deadline => {
                    // The balance's own stability timeout ran out; look at the weight meanwhile.
                    if let Ok(w) = self.weigh_immediate().await {
                        last_g = Some(w.grams());
                    }
                }
                Err(SicsError::NotExecutable { .. }) => {
                    return Err(SicsError::Unstable {
                        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                        last_g,
                    });
                }
                other => return other,
            }
        }
    }

    /// A stable weight (`S`), net of the tare, waiting up to `timeout` for stability.
    pub async fn weigh_stable(&self, timeout: Duration) -> Result<Weight, SicsError> {
        match self.until_stable(Command::Weigh, timeout).await? {
            Reply::Weight { weight, .. } => Ok(weight),
            other => Err(unexpected(Command::Weigh, &other)),
        }
    }

    /// The current weight, stable or not (`SI`).
    pub async fn weigh_immediate(&self) -> Result<Weight, SicsError> {
        match self.send(Command::WeighImmediate, Duration::ZERO).await? {
            Reply::Weight { weight, .. } => Ok(weight),
            other => Err(unexpected(Command::WeighImmediate, &other)),
        }
    }

    /// Tares with the current stable weight (`T`); returns the tare, g.
    pub async fn tare(&self, timeout: Duration) -> Result<f64, SicsError> {
        match self.until_stable(Command::Tare, timeout).await? {
            Reply::Weight { weight, .. } => Ok(weight.grams()),
            other => Err(unexpected(Command::Tare, &other)),
        }
    }

    /// Zeroes the balance with a stable weight (`Z`).
    pub async fn zero(&self, timeout: Duration) -> Result<(), SicsError> {
        match self.until_stable(Command::Zero, timeout).await? {
            Reply::Done { .. } => Ok(()),
            other => Err(unexpected(Command::Zero, &other)),
        }
    }

    /// Clears the tare (`TAC`).
    pub async fn clear_tare(&self) -> Result<(), SicsError> {
        match self.send(Command::ClearTare, Duration::ZERO).await? {
            Reply::Done { .. } => Ok(()),
            other => Err(unexpected(Command::ClearTare, &other)),
        }
    }

    /// The tare in force (`TA`), g.
    pub async fn tare_value(&self) -> Result<f64, SicsError> {
        match self.send(Command::TareValue, Duration::ZERO).await? {
            Reply::Weight { weight, .. } => Ok(weight.grams()),
            other => Err(unexpected(Command::TareValue, &other)),
        }
    }

    /// The balance's serial number (`I4`).
    pub async fn serial_number(&self) -> Result<String, SicsError> {
        match self.send(Command::Info(4), Duration::ZERO).await? {
            Reply::Info { text, .. } => Ok(text),
            other => Err(unexpected(Command::Info(4), &other)),
        }
    }

    fn check_weigh(&self, stability_timeout_s: Option<f64>) -> Result<(), DeviceError> {
        if let Some(t) = stability_timeout_s
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(DeviceError::Limit {
                field: "stability_timeout_s".to_owned(),
                value: t,
                limit: "a finite, non-negative number of seconds".to_owned(),
            });
        }
        Ok(())
    }
}

fn unexpected(command: Command, reply: &Reply) -> SicsError {
    SicsError::Unexpected {
        command: command.text(),
        reply: reply.line(),
    }
}

#[async_trait]
impl Device for SicsBalance {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn check(&self, step: &StepCommand) -> Result<(), DeviceError> {
        self.check_weigh(super::weigh(step, &self.info.id)?)
    }

    async fn execute(
        &self,
        step: &StepCommand,
        ctx: StepContext,
    ) -> Result<StepOutput, DeviceError> {
        let stability_timeout_s = super::weigh(step, &self.info.id)?;
        self.check_weigh(stability_timeout_s)?;
        let timeout = stability_timeout_s
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .unwrap_or(self.config.stability_timeout);
        let _station = self.station().await;
        let weighing = async {
            match self.weigh_stable(timeout).await {
                Ok(w) => Ok(WeighResult {
                    mass_g: w.grams(),
                    stable: true,
                }),
                // A weighing that never settles still has a value; the result says it is dynamic.
                Err(SicsError::Unstable { .. }) => {
                    let w = self.weigh_immediate().await?;
                    Ok(WeighResult {
                        mass_g: w.grams(),
                        stable: w.stable,
                    })
                }
                Err(e) => Err(DeviceError::from(e)),
            }
        };
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => Err(DeviceError::Aborted),
            r = weighing => r.map(|w| StepOutput::pack(&w)),
        }
    }

    async fn status(&self) -> Result<DeviceStatus, DeviceError> {
        match self.weigh_immediate().await {
            Ok(w) => Ok(DeviceStatus {
                readings: vec![
                    Reading::new("mass_g", w.grams()),
                    Reading::new("stable", if w.stable { 1.0 } else { 0.0 }),
                ],
                alarms: Vec::new(),
                active: false,
            }),
            Err(e @ (SicsError::Overload { .. } | SicsError::Underload { .. })) => {
                Ok(DeviceStatus {
                    readings: Vec::new(),
                    alarms: vec![e.to_string()],
                    active: false,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A balance has nothing to make safe.
    async fn safe_state(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// A balance only measures: it is always safe, whether or not it answers.
    async fn confirm_safe(&self) -> Result<crate::device::SafeCheck, DeviceError> {
        Ok(crate::device::SafeCheck::Safe)
    }
}
