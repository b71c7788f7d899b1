//! The sorption-analyser driver: one instrument behind an MQTT bridge (docs/mqtt-contract.md).
//!
//! The driver keeps a background monitor of the bridge's retained status, telemetry and alarms
//! (so [`Device::status`] needs no round trip and a bridge whose will fired shows as
//! disconnected at once); when no retained status arrives, it asks the bridge with a `status`
//! command (see `SorptionAnalyser::await_status`). It runs each step as one or two bridge
//! operations: a degas, or a free-space measurement followed by the isotherm. Every command
//! carries a fresh request id and is re-sent with the same id when its acknowledgement is late
//! or after the link comes back, so the bridge never runs an operation twice and replays what
//! was lost. Points are passed on in index order, each exactly once, as soon as the prefix
//! before it is complete.
//!
//! Physical waits (a point's equilibration, a degas) are judged on the step's
//! [`Clock`](crate::Clock); acknowledgements, outages and reconnects on real time.

/// Its `[[devices]]` entry (`driver = "sorption_mqtt"`).
pub mod config;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::{OnceCell, broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::StepKind;
use super::protocol::{
    self, Ack, BridgeState, Command, Complete, Event, Inbound, IsothermParams, Op, ResultMsg,
    Topics,
};
use super::schema::{DegasResult, IsothermPoint, IsothermResult};
use crate::device::{
    Device, DeviceError, DeviceInfo, DeviceStatus, Limits, Reading, StepCommand, StepContext,
    StepOutput, StepUpdate,
};
use crate::transport::mqtt::{LinkState, Message, MqttConfig, MqttTransport, Qos, Will};

/// How often a running operation checks its deadlines and the link (real time).
const WATCH_TICK: Duration = Duration::from_millis(100);
/// Alarm text while the device is marked faulty (stable, so the alarm does not flap).
pub const FAULTY_ALARM: &str = "malformed payloads from bridge";
/// Replays asked for one operation before a gap in its points counts as corruption.
const MAX_REPLAYS: u32 = 5;
/// Longest isotherm accepted, in points.
const MAX_POINTS: usize = 1000;
/// Adsorptives declared unless the configuration lists the gases plumbed to the instrument:
/// CO₂ (the capture isotherms) and N₂ (77 K surface area, and the CO₂/N₂ selectivity).
pub const DEFAULT_ADSORPTIVES: [&str; 2] = ["CO2", "N2"];
/// The share (1/n) of the wait for a first status spent waiting for the retained one before
/// the driver asks the bridge; a retained status normally arrives with the SUBACK.
const RETAINED_STATUS_SHARE: u32 = 4;

/// Configuration of one analyser.
#[derive(Debug, Clone, PartialEq)]
pub struct SorptionConfig {
    /// Device id in ppu.
    pub id: String,
    pub mqtt: MqttConfig,
    /// Topic prefix, e.g. `lab/site-a/analyser`; the bridge's topics are
    /// `{topic_prefix}/{bridge_id}/...`.
    pub topic_prefix: String,
    /// The bridge's id in its topics.
    pub bridge_id: String,
    /// Declared limits: `max_pressure_bar` (isotherm targets), `max_temperature_c` and
    /// `min_temperature_c` (degas temperature), `max_hold_s` (degas duration), and under
    /// `accepted` the `adsorptive`s the instrument has gas for.
    pub limits: Limits,
    /// Isotherm (bath) temperatures accepted, °C.
    pub min_isotherm_temperature_c: f64,
    pub max_isotherm_temperature_c: f64,
    /// Sample mass sent when the step names none, g.
    pub default_sample_mass_g: f64,
    /// Equilibration interval when the step names none, physical s.
    pub default_equilibration_interval_s: f64,
    /// Longest wait for one point when the step names none, physical s.
    pub default_max_equilibration_s: f64,
    /// Measure the free space (helium) before every isotherm.
    pub measure_free_space: bool,
    /// Pressure tolerance of an isotherm point, sent with every isotherm command and checked
    /// on every point: a point is accepted when `|P_eq − target| ≤ max(tolerance_relative ·
    /// target, tolerance_bar)` (docs/mqtt-contract.md §5.1, §6.1); any other point fails the
    /// step.
    pub tolerance_bar: f64,
    pub tolerance_relative: f64,
    /// Real time a running operation tolerates the broker or the bridge being unreachable.
    pub outage_grace: Duration,
    /// Malformed payloads within [`SorptionConfig::malformed_window`] that mark the device
    /// faulty.
    pub malformed_limit: u32,
    pub malformed_window: Duration,
}

impl SorptionConfig {
    /// Defaults: prefix `lab/ppu/analyser`, bridge id = device id, up to 1.1 bar, adsorptives
    /// CO2 and N2, degas up to 400 °C for up to 24 h, isotherms between −200 and 100 °C, 0.1 g
    /// samples, 10 s equilibration interval, 3600 s per point, free space before each
    /// isotherm, points within `max(5 % of target, 0.005 bar)` of their targets, 30 s outage
    /// grace, faulty after 5 malformed payloads within 60 s.
    pub fn new(id: impl Into<String>, mqtt: MqttConfig) -> Self {
        let id = id.into();
        Self {
            bridge_id: id.clone(),
            id,
            mqtt,
            topic_prefix: "lab/ppu/analyser".to_owned(),
            limits: Limits::default()
                .with("max_pressure_bar", 1.1)
                .with("max_temperature_c", 400.0)
                .with("min_temperature_c", 20.0)
                .with("max_hold_s", 24.0 * 3600.0)
                .accepting("adsorptive", DEFAULT_ADSORPTIVES),
            min_isotherm_temperature_c: -200.0,
            max_isotherm_temperature_c: 100.0,
            default_sample_mass_g: 0.1,
            default_equilibration_interval_s: 10.0,
            default_max_equilibration_s: 3600.0,
            measure_free_space: true,
            tolerance_bar: 0.005,
            tolerance_relative: 0.05,
            outage_grace: Duration::from_secs(30),
            malformed_limit: 5,
            malformed_window: Duration::from_secs(60),
        }
    }
}

/// What the driver knows about the bridge's liveness.
#[derive(Debug, Clone, PartialEq)]
pub enum BridgeLiveness {
    /// No status seen yet.
    Unknown,
    /// The bridge's last status.
    Online {
        state: BridgeState,
        instrument: String,
    },
    /// The bridge said it is offline, or its will fired.
    Offline { reason: String },
}

/// The monitor's view of the bridge, updated from every message.
#[derive(Debug, Clone)]
struct Monitor {
    bridge: BridgeLiveness,
    readings: Vec<Reading>,
    /// Active bridge alarms by code.
    alarms: BTreeMap<String, String>,
    malformed_total: u64,
    recent_malformed: VecDeque<Instant>,
    /// Set once too many malformed payloads arrived; cleared when the bridge comes back
    /// online after being offline (a restarted bridge).
    faulty: Option<String>,
}

impl Monitor {
    fn new() -> Self {
        Self {
            bridge: BridgeLiveness::Unknown,
            readings: Vec::new(),
            alarms: BTreeMap::new(),
            malformed_total: 0,
            recent_malformed: VecDeque::new(),
            faulty: None,
        }
    }

    fn is_online(&self) -> bool {
        matches!(self.bridge, BridgeLiveness::Online { .. })
    }

    fn instrument(&self) -> String {
        match &self.bridge {
            BridgeLiveness::Online { instrument, .. } => instrument.clone(),
            _ => String::new(),
        }
    }
}

/// The started MQTT side: transport plus monitor task.
struct Link {
    transport: MqttTransport,
    monitor_task: JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.monitor_task.abort();
    }
}

/// A sorption analyser behind an MQTT bridge.
pub struct SorptionAnalyser {
    info: DeviceInfo,
    config: SorptionConfig,
    topics: Topics,
    link: OnceCell<Link>,
    monitor_tx: watch::Sender<Monitor>,
    /// Degas conditions this driver ran, by sample id, for isotherm results whose bridge does
    /// not report them.
    degassed: Mutex<HashMap<String, (f64, f64)>>,
    counter: AtomicU64,
}

impl std::fmt::Debug for SorptionAnalyser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SorptionAnalyser")
            .field("id", &self.info.id)
            .field("topics", &self.topics.base())
            .finish_non_exhaustive()
    }
}

impl SorptionAnalyser {
    /// Creates the driver; the MQTT client starts on first use (it needs a Tokio runtime).
    pub fn new(config: SorptionConfig) -> Self {
        let topics = Topics::new(&config.topic_prefix, &config.bridge_id);
        let info = DeviceInfo {
            id: config.id.clone(),
            family: "analyser".into(),
            driver: "sorption_mqtt".to_owned(),
            transport: format!("{} topics {}/#", config.mqtt.broker, topics.base()),
            capabilities: vec!["degas".into(), "isotherm".into()],
            limits: config.limits.clone(),
        };
        let (monitor_tx, _) = watch::channel(Monitor::new());
        Self {
            info,
            config,
            topics,
            link: OnceCell::new(),
            monitor_tx,
            degassed: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &SorptionConfig {
        &self.config
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// What the driver currently knows about the bridge.
    pub fn bridge(&self) -> BridgeLiveness {
        self.monitor_tx.borrow().bridge.clone()
    }

    /// Malformed payloads received so far.
    pub fn malformed_count(&self) -> u64 {
        self.monitor_tx.borrow().malformed_total
    }

    /// Why the device is marked faulty, if it is.
    pub fn faulty(&self) -> Option<String> {
        self.monitor_tx.borrow().faulty.clone()
    }

    /// Starts the MQTT client and the monitor (idempotent).
    pub async fn connect(&self) -> Result<(), DeviceError> {
        self.link().await.map(|_| ())
    }

    /// Graceful stop: publishes ppu's offline status and disconnects.
    pub async fn shutdown(&self) {
        if let Some(link) = self.link.get() {
            link.transport.shutdown().await;
        }
    }

    async fn link(&self) -> Result<&Link, DeviceError> {
        self.link
            .get_or_try_init(|| async {
                let mut mqtt = self.config.mqtt.clone();
                mqtt.will = Some(Will {
                    topic: self.topics.controller(),
                    payload: protocol::controller_status("offline"),
                    retain: true,
                });
                mqtt.birth = Some(Will {
                    topic: self.topics.controller(),
                    payload: protocol::controller_status("online"),
                    retain: true,
                });
                let transport =
                    MqttTransport::start(mqtt, self.topics.subscriptions()).map_err(|e| {
                        DeviceError::Refused {
                            what: "MQTT configuration".to_owned(),
                            reason: e.to_string(),
                        }
                    })?;
                transport.set_metrics_device(self.config.id.clone());
                let monitor_task = tokio::spawn(run_monitor(
                    transport.messages(),
                    self.topics.clone(),
                    self.monitor_tx.clone(),
                    self.config.id.clone(),
                    self.config.malformed_limit,
                    self.config.malformed_window,
                ));
                Ok(Link {
                    transport,
                    monitor_task,
                })
            })
            .await
    }

    /// Waits (at most the acknowledgement timeout) for the link and a first bridge status,
    /// then reports whether the bridge can take commands.
    async fn ready(&self, link: &Link) -> Result<(), DeviceError> {
        let wait = self.config.mqtt.ack_timeout;
        link.transport.wait_connected(wait).await?;
        self.await_status(link, wait).await;
        let m = self.monitor_tx.borrow().clone();
        match &m.bridge {
            BridgeLiveness::Unknown => Err(DeviceError::Disconnected(format!(
                "no status from bridge {} within {} ms (none retained on {}, and no answer to \
                 a status command)",
                self.config.bridge_id,
                wait.as_millis(),
                self.topics.status()
            ))),
            BridgeLiveness::Offline { reason } => Err(DeviceError::Disconnected(format!(
                "bridge {} is offline: {reason}",
                self.config.bridge_id
            ))),
            BridgeLiveness::Online { .. } => Ok(()),
        }
    }

    /// Waits (at most `wait`, real time) until the monitor knows the bridge's status.
    ///
    /// The status is retained, so the broker normally delivers it right after subscribing.
    /// Not every broker does: rumqttd never re-sends retained messages to a resumed
    /// (clean-session-off) session (bytebeamio/rumqtt#1069), so a ppud restarted after a crash
    /// would never learn that the bridge is alive. So after a short part of the wait the
    /// driver sends the contract's `status` command; the monitor applies the status in its
    /// acknowledgement exactly as a retained one, in the order the bridge's messages arrive.
    /// Never calls [`Self::ready`] (the query goes straight through [`Self::command`]).
    async fn await_status(&self, link: &Link, wait: Duration) {
        let known = |m: &Monitor| !matches!(m.bridge, BridgeLiveness::Unknown);
        let mut rx = self.monitor_tx.subscribe();
        let deadline = Instant::now() + wait;
        let retained_wait = wait / RETAINED_STATUS_SHARE;
        if tokio::time::timeout(retained_wait, rx.wait_for(known))
            .await
            .is_ok()
        {
            return;
        }
        tracing::info!(
            device = %self.info.id,
            bridge = %self.config.bridge_id,
            waited_ms = retained_wait.as_millis() as u64,
            "no retained status; asked the bridge"
        );
        let query = async {
            if let Err(e) = self.query_status(link).await {
                tracing::warn!(device = %self.info.id, error = %e, "status command failed");
            }
            // The monitor applies the answer; keep waiting for it (or any status) below.
            std::future::pending::<()>().await
        };
        let _ = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                _ = rx.wait_for(known) => {}
                _ = query => {}
            }
        })
        .await;
    }

    /// Sends the contract's `status` command. Its acknowledgement reaches the monitor like
    /// every message, which applies the status object it carries (see [`run_monitor`]).
    async fn query_status(&self, link: &Link) -> Result<(), DeviceError> {
        let cmd = Command::new(
            self.new_request_id("", Op::Status),
            Op::Status,
            String::new(),
            json!({}),
        );
        let ack = self.command(link, &cmd).await?;
        if ack.status.is_none() {
            return Err(DeviceError::Corrupt {
                what: format!("acknowledgement of status command {}", cmd.request_id),
                reason: "no status object".to_owned(),
            });
        }
        Ok(())
    }

    fn new_request_id(&self, ctx_experiment: &str, op: Op) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let scope: String = ctx_experiment
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(40)
            .collect();
        let scope = if scope.is_empty() { "manual" } else { &scope };
        format!("{scope}-{}-{nanos:x}-{n}", op.name())
    }

    /// The least real time without progress before the stall watchdog may fire, whatever the
    /// time scale: at 100 000× a 5300 s physical limit is 53 ms of real time, less than a
    /// message may take to cross the broker on a busy machine. Equilibrium itself is judged
    /// by the bridge in physical time; this only keeps the backstop from firing on transit.
    fn stall_real_floor(&self) -> Duration {
        self.config.mqtt.ack_timeout * 2
    }

    /// Sends a command and waits for its acknowledgement; a refusal is an error.
    async fn command(&self, link: &Link, cmd: &Command) -> Result<Ack, DeviceError> {
        let what = format!(
            "acknowledgement of {} command {}",
            cmd.op.name(),
            cmd.request_id
        );
        let topics = &self.topics;
        let request_id = cmd.request_id.clone();
        let ack = link
            .transport
            .request(
                &topics.cmd(),
                &cmd.to_json(),
                &what,
                |m| match protocol::parse(topics, m) {
                    Ok(Some(Inbound::Ack(ack))) if ack.request_id == request_id => Some(ack),
                    _ => None,
                },
            )
            .await?;
        if ack.accepted {
            Ok(ack)
        } else {
            let code = if ack.code.is_empty() {
                String::new()
            } else {
                format!(" ({})", ack.code)
            };
            Err(DeviceError::Refused {
                what: format!("{} command", cmd.op.name()),
                reason: format!("{}{code}", ack.reason),
            })
        }
    }

    /// Asks the bridge to abort (its current operation, or `target`), waiting for the
    /// acknowledgement.
    async fn abort(&self, link: &Link, target: Option<&str>) -> Result<(), DeviceError> {
        let cmd = Command::new(
            self.new_request_id("", Op::Abort),
            Op::Abort,
            String::new(),
            protocol::abort_params(target),
        );
        self.command(link, &cmd).await.map(|_| ())
    }

    async fn abort_best_effort(&self, link: &Link, target: &str) {
        if let Err(e) = self.abort(link, Some(target)).await {
            tracing::warn!(device = %self.info.id, request = target, error = %e, "abort not acknowledged");
        }
    }

    fn check_degas(&self, temperature_c: f64, duration_s: f64) -> Result<(), DeviceError> {
        let l = &self.config.limits;
        let min = l.get("min_temperature_c").unwrap_or(0.0);
        check_value(
            "temperature_c",
            temperature_c,
            Some(min),
            l.get("max_temperature_c"),
            "min_temperature_c",
            "max_temperature_c",
        )?;
        check_value(
            "duration_s",
            duration_s,
            Some(0.0),
            l.get("max_hold_s"),
            "min_duration_s",
            "max_hold_s",
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn check_isotherm(
        &self,
        adsorptive: &str,
        temperature_c: f64,
        pressures_bar: &[f64],
        equilibration_interval_s: Option<f64>,
        max_equilibration_s: Option<f64>,
        sample_mass_g: Option<f64>,
    ) -> Result<(), DeviceError> {
        if adsorptive.trim().is_empty() {
            return Err(DeviceError::Limit {
                field: "adsorptive".to_owned(),
                value: 0.0,
                limit: "a named adsorptive, e.g. CO2".to_owned(),
            });
        }
        check_value(
            "temperature_c",
            temperature_c,
            Some(self.config.min_isotherm_temperature_c),
            Some(self.config.max_isotherm_temperature_c),
            "min_isotherm_temperature_c",
            "max_isotherm_temperature_c",
        )?;
        if pressures_bar.is_empty() || pressures_bar.len() > MAX_POINTS {
            return Err(DeviceError::Limit {
                field: "pressure_bar".to_owned(),
                value: pressures_bar.len() as f64,
                limit: format!("1 to {MAX_POINTS} points"),
            });
        }
        let max = self.config.limits.get("max_pressure_bar");
        for (k, &p) in pressures_bar.iter().enumerate() {
            let field = format!("pressure_bar[{k}]");
            if !(p.is_finite() && p > 0.0) {
                return Err(DeviceError::Limit {
                    field,
                    value: p,
                    limit: "pressures > 0".to_owned(),
                });
            }
            if let Some(max) = max
                && p > max
            {
                return Err(DeviceError::Limit {
                    field,
                    value: p,
                    limit: format!("max_pressure_bar {max}"),
                });
            }
            if k > 0 && p <= pressures_bar[k - 1] {
                return Err(DeviceError::Limit {
                    field,
                    value: p,
                    limit: format!(
                        "strictly increasing pressures (previous {})",
                        pressures_bar[k - 1]
                    ),
                });
            }
        }
        for (field, v) in [
            ("equilibration_interval_s", equilibration_interval_s),
            ("max_equilibration_s", max_equilibration_s),
            ("sample_mass_g", sample_mass_g),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0)
            {
                return Err(DeviceError::Limit {
                    field: field.to_owned(),
                    value: v,
                    limit: "a positive number".to_owned(),
                });
            }
        }
        Ok(())
    }

    async fn degas(
        &self,
        link: &Link,
        ctx: &StepContext,
        temperature_c: f64,
        duration_s: f64,
    ) -> Result<DegasResult, DeviceError> {
        let cmd = Command::new(
            self.new_request_id(&ctx.experiment_id, Op::Degas),
            Op::Degas,
            ctx.sample_id.clone(),
            protocol::degas_params(temperature_c, duration_s),
        );
        // Heating at a few °C/min and cooling back take hours on a real degas port.
        let allowance_s = duration_s + (temperature_c - 20.0).max(0.0) / 2.0 * 60.0 * 2.0 + 3600.0;
        let plan = OpPlan::without_points(
            allowance_s,
            format!(
                "degas at {temperature_c} °C for {duration_s} s did not finish within {allowance_s:.0} s of physical time"
            ),
        );
        let (complete, _) = self.run_op(link, ctx, &cmd, plan).await?;
        if let Ok(mut d) = self.degassed.lock() {
            d.insert(ctx.sample_id.clone(), (temperature_c, duration_s));
        }
        Ok(DegasResult {
            temperature_c,
            duration_s: complete.duration_s.unwrap_or(duration_s),
            final_pressure_bar: complete.final_pressure_bar.unwrap_or(0.0),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn isotherm(
        &self,
        link: &Link,
        ctx: &StepContext,
        adsorptive: &str,
        temperature_c: f64,
        pressures_bar: &[f64],
        equilibration_interval_s: Option<f64>,
        max_equilibration_s: Option<f64>,
        sample_mass_g: Option<f64>,
    ) -> Result<IsothermResult, DeviceError> {
        let mass = sample_mass_g.unwrap_or(self.config.default_sample_mass_g);
        let interval =
            equilibration_interval_s.unwrap_or(self.config.default_equilibration_interval_s);
        let max_eq = max_equilibration_s.unwrap_or(self.config.default_max_equilibration_s);
        if self.config.measure_free_space {
            ctx.send(StepUpdate::Progress {
                fraction: 0.0,
                message: "measuring free space (helium)".to_owned(),
                remaining_s: None,
            });
            let cmd = Command::new(
                self.new_request_id(&ctx.experiment_id, Op::FreeSpace),
                Op::FreeSpace,
                ctx.sample_id.clone(),
                protocol::free_space_params(temperature_c),
            );
            let plan = OpPlan::without_points(
                2.0 * 3600.0,
                "free-space measurement did not finish within 7200 s of physical time".to_owned(),
            );
            let (fs, _) = self.run_op(link, ctx, &cmd, plan).await?;
            tracing::info!(
                device = %self.info.id,
                warm_cm3 = fs.warm_free_space_cm3.unwrap_or(f64::NAN),
                cold_cm3 = fs.cold_free_space_cm3.unwrap_or(f64::NAN),
                "free space measured"
            );
        }
        let cmd = Command::new(
            self.new_request_id(&ctx.experiment_id, Op::Isotherm),
            Op::Isotherm,
            ctx.sample_id.clone(),
            IsothermParams {
                adsorptive: adsorptive.to_owned(),
                temperature_c,
                pressures_bar: pressures_bar.to_vec(),
                equilibration_interval_s: interval,
                max_equilibration_s: max_eq,
                sample_mass_g: mass,
                tolerance_bar: self.config.tolerance_bar,
                tolerance_relative: self.config.tolerance_relative,
            }
            .to_value(),
        );
        // The bridge enforces max_equilibration_s itself and says why; this is the backstop
        // for a bridge that never answers (dosing, evacuation and bath settling take time).
        let stall = max_eq * 1.25 + 20.0 * interval + 600.0;
        let plan = OpPlan {
            expected_points: pressures_bar.len(),
            stall_limit_s: stall,
            stall_what: String::new(),
            pressures: pressures_bar.to_vec(),
            tolerance_bar: self.config.tolerance_bar,
            tolerance_relative: self.config.tolerance_relative,
        };
        let (complete, points) = self.run_op(link, ctx, &cmd, plan).await?;
        let (degas_t, degas_s) = match (complete.degas_temperature_c, complete.degas_duration_s) {
            (Some(t), Some(s)) => (t, s),
            _ => self
                .degassed
                .lock()
                .ok()
                .and_then(|d| d.get(&ctx.sample_id).copied())
                .unwrap_or((0.0, 0.0)),
        };
        let instrument = complete
            .instrument
            .clone()
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| {
                let i = self.monitor_tx.borrow().instrument();
                if i.is_empty() {
                    format!("bridge {}", self.config.bridge_id)
                } else {
                    i
                }
            });
        Ok(IsothermResult {
            adsorptive: complete
                .adsorptive
                .clone()
                .unwrap_or_else(|| adsorptive.to_owned()),
            temperature_c: complete.temperature_c.unwrap_or(temperature_c),
            sample_mass_g: complete.sample_mass_g.unwrap_or(mass),
            degas_temperature_c: degas_t,
            degas_duration_s: degas_s,
            points,
            instrument,
        })
    }

    /// Runs one bridge operation to its final result: sends the command, follows points and
    /// progress, replays after outages and gaps, enforces the physical stall limit, honours
    /// cancellation, and acknowledges the result end to end.
    async fn run_op(
        &self,
        link: &Link,
        ctx: &StepContext,
        cmd: &Command,
        plan: OpPlan,
    ) -> Result<(Complete, Vec<IsothermPoint>), DeviceError> {
        let transport = &link.transport;
        let op = cmd.op.name();
        let id = cmd.request_id.clone();
        // Subscribe before sending: nothing the bridge answers can be missed.
        let mut rx = transport.messages();
        let mut link_rx = transport.watch_link();
        let ack = tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => return Err(DeviceError::Aborted),
            ack = self.command(link, cmd) => ack?,
        };
        tracing::info!(device = %self.info.id, request = %id, op, duplicate = ack.duplicate, "bridge accepted command");
        let mut run = OpRun {
            points: BTreeMap::new(),
            emitted: 0,
            last_progress_s: ctx.clock.now_s(),
            last_progress_at: Instant::now(),
            abort_on_error: false,
            outage: None,
            need_replay: false,
            replay_sent: None,
            replays: 0,
        };
        let mut tick = tokio::time::interval(WATCH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => {
                    self.abort_best_effort(link, &id).await;
                    return Err(DeviceError::Aborted);
                }
                received = rx.recv() => match received {
                    Ok(message) => {
                        let handled = self.on_message(ctx, &message, &id, op, &plan, &mut run);
                        let handled = match handled {
                            Err(e) if run.abort_on_error => {
                                self.abort_best_effort(link, &id).await;
                                return Err(e);
                            }
                            other => other?,
                        };
                        if let Some(done) = handled {
                            let _ = transport.publish(&self.topics.result_ack(), protocol::result_ack(&id), Qos::AtLeastOnce, false);
                            let points = run.points.into_values().collect();
                            return Ok((done, points));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(device = %self.info.id, lost = n, "messages lost during {op}; asking for a replay");
                        run.need_replay = true;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(DeviceError::Disconnected(format!("{}: transport stopped", transport.describe())));
                    }
                },
                changed = link_rx.changed() => {
                    if changed.is_err() {
                        return Err(DeviceError::Disconnected(format!("{}: transport stopped", transport.describe())));
                    }
                }
                _ = tick.tick() => {
                    let reachable = transport.is_connected() && self.monitor_tx.borrow().is_online();
                    if !reachable {
                        let since = *run.outage.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.config.outage_grace {
                            let why = match transport.link_state() {
                                LinkState::Connected { .. } => match self.bridge() {
                                    BridgeLiveness::Offline { reason } => format!("bridge {} offline ({reason})", self.config.bridge_id),
                                    _ => format!("no status from bridge {}", self.config.bridge_id),
                                },
                                LinkState::Down { reason } => format!("broker unreachable ({reason})"),
                                LinkState::Connecting => "broker not connected yet".to_owned(),
                            };
                            return Err(DeviceError::Disconnected(format!(
                                "{why} for {} s during {op} {id}; the instrument may still be running it — \
                                 check the bridge before retrying",
                                self.config.outage_grace.as_secs()
                            )));
                        }
                        continue;
                    }
                    if let Some(since) = run.outage.take() {
                        tracing::info!(device = %self.info.id, request = %id, outage_ms = since.elapsed().as_millis() as u64, "link to bridge restored; asking for a replay");
                        run.need_replay = true;
                        // Physical time ran on during the outage; the watchdog restarts.
                        run.last_progress_s = ctx.clock.now_s();
                        run.last_progress_at = Instant::now();
                    }
                    // A replay request the bridge has not acknowledged (it may have come back
                        // after the broker and missed it) is sent again.
                    if run
                        .replay_sent
                        .is_some_and(|t| t.elapsed() >= self.config.mqtt.ack_timeout)
                    {
                        run.need_replay = true;
                    }
                    if run.need_replay {
                        run.need_replay = false;
                        run.replay_sent = Some(Instant::now());
                        run.replays += 1;
                        // The same request id: the bridge answers `duplicate` and re-publishes
                        // every point and the final result it has, without measuring again.
                        if let Err(e) = transport.publish(&self.topics.cmd(), cmd.to_json(), Qos::AtLeastOnce, false) {
                            tracing::warn!(device = %self.info.id, error = %e, "replay request not queued");
                            run.need_replay = true;
                        }
                    }
                    let now = ctx.clock.now_s();
                    if now - run.last_progress_s > plan.stall_limit_s
                        && run.last_progress_at.elapsed() >= self.stall_real_floor()
                    {
                        self.abort_best_effort(link, &id).await;
                        return Err(DeviceError::Fault(plan.stall_reason(run.emitted)));
                    }
                }
            }
        }
    }

    /// Handles one message during an operation; `Some` when the operation completed.
    fn on_message(
        &self,
        ctx: &StepContext,
        message: &Message,
        id: &str,
        op: &str,
        plan: &OpPlan,
        run: &mut OpRun,
    ) -> Result<Option<Complete>, DeviceError> {
        // Malformed payloads are counted by the monitor, which sees every message.
        let Ok(Some(inbound)) = protocol::parse(&self.topics, message) else {
            return Ok(None);
        };
        match inbound {
            Inbound::Ack(ack) if ack.request_id == id => {
                if run.replay_sent.take().is_some() && !ack.duplicate {
                    tracing::warn!(device = %self.info.id, request = id, "bridge did not recognise the repeated command; it restarted the operation");
                }
                Ok(None)
            }
            Inbound::Result(r) if r.request_id() == id => match r {
                ResultMsg::Point {
                    index,
                    point,
                    target_pressure_bar,
                    ..
                } => {
                    let i = index as usize;
                    if i >= plan.expected_points {
                        tracing::warn!(device = %self.info.id, index, expected = plan.expected_points, "point index out of range; ignored");
                        return Ok(None);
                    }
                    if let Err(e) = plan.check_point(i, point.pressure_bar, target_pressure_bar) {
                        run.abort_on_error = true;
                        return Err(e);
                    }
                    if run.points.insert(index, point).is_none() && i > run.emitted {
                        // A gap: an earlier point was lost (e.g. while the broker restarted).
                        run.need_replay = true;
                    }
                    while let Some(p) = run.points.get(&(run.emitted as u32)).copied() {
                        let n = run.emitted;
                        ctx.send(StepUpdate::Intermediate {
                            index: n as u32,
                            value: crate::device::pack(&p),
                        });
                        run.emitted += 1;
                        run.last_progress_s = ctx.clock.now_s();
                        run.last_progress_at = Instant::now();
                        ctx.send(StepUpdate::Progress {
                            fraction: run.emitted as f64 / plan.expected_points as f64,
                            message: format!(
                                "point {}/{}: {:.4} bar, {:.3} mmol/g after {:.0} s",
                                n + 1,
                                plan.expected_points,
                                p.pressure_bar,
                                p.amount_mmol_per_g,
                                p.equilibration_time_s
                            ),
                            remaining_s: None,
                        });
                    }
                    Ok(None)
                }
                ResultMsg::Complete(c) => {
                    let expected = plan.expected_points;
                    if expected > 0 {
                        let announced = c.points.map(|n| n as usize).unwrap_or(expected);
                        if announced != expected {
                            return Err(DeviceError::Corrupt {
                                what: format!("result of {op} {id}"),
                                reason: format!(
                                    "{announced} points for {expected} target pressures"
                                ),
                            });
                        }
                        if run.emitted < expected {
                            if run.replays >= MAX_REPLAYS {
                                return Err(DeviceError::Corrupt {
                                    what: format!("result of {op} {id}"),
                                    reason: format!(
                                        "only {} of {expected} points received after {} replays",
                                        run.emitted, run.replays
                                    ),
                                });
                            }
                            run.need_replay = true;
                            return Ok(None);
                        }
                    }
                    Ok(Some(c))
                }
                ResultMsg::Failed { code, reason, .. } => {
                    let _ = self.link.get().map(|l| {
                        l.transport.publish(
                            &self.topics.result_ack(),
                            protocol::result_ack(id),
                            Qos::AtLeastOnce,
                            false,
                        )
                    });
                    let code = if code.is_empty() {
                        String::new()
                    } else {
                        format!(" [{code}]")
                    };
                    Err(DeviceError::Fault(format!(
                        "{op} failed on the instrument: {reason}{code}"
                    )))
                }
            },
            Inbound::Event(Event::Progress {
                request_id,
                fraction,
                message,
            }) if request_id == id => {
                if plan.expected_points == 0 {
                    run.last_progress_s = ctx.clock.now_s().max(run.last_progress_s);
                    run.last_progress_at = Instant::now();
                }
                ctx.send(StepUpdate::Progress {
                    fraction: if plan.expected_points == 0 {
                        fraction.clamp(0.0, 1.0)
                    } else {
                        ((run.emitted as f64 + fraction.clamp(0.0, 1.0))
                            / plan.expected_points as f64)
                            .clamp(0.0, 1.0)
                    },
                    message,
                    remaining_s: None,
                });
                Ok(None)
            }
            Inbound::Telemetry(readings) => {
                let m = self.monitor_tx.borrow();
                ctx.send(StepUpdate::Reading(DeviceStatus {
                    readings,
                    alarms: m.alarms.values().cloned().collect(),
                    active: true,
                }));
                Ok(None)
            }
            _ => Ok(None),
        }
    }
}

/// What an operation is expected to produce.
struct OpPlan {
    expected_points: usize,
    /// Physical seconds allowed without progress (a new point, or any progress for an
    /// operation without points).
    stall_limit_s: f64,
    stall_what: String,
    pressures: Vec<f64>,
    /// Pressure tolerance of the points: `max(relative·target, bar)`.
    tolerance_bar: f64,
    tolerance_relative: f64,
}

impl OpPlan {
    /// An operation without points.
    fn without_points(stall_limit_s: f64, stall_what: String) -> Self {
        Self {
            expected_points: 0,
            stall_limit_s,
            stall_what,
            pressures: Vec::new(),
            tolerance_bar: 0.0,
            tolerance_relative: 0.0,
        }
    }

    /// Refuses point `index` unless its equilibrium pressure lies within the tolerance of its
    /// target (and the bridge, if it names the target, dosed toward the right one).
    fn check_point(
        &self,
        index: usize,
        pressure_bar: f64,
        reported_target: Option<f64>,
    ) -> Result<(), DeviceError> {
        let Some(&target) = self.pressures.get(index) else {
            return Ok(());
        };
        let n = self.expected_points;
        if let Some(reported) = reported_target
            && (reported - target).abs() > 1e-9 * target.abs().max(1.0)
        {
            return Err(DeviceError::Corrupt {
                what: format!("point {}/{n}", index + 1),
                reason: format!(
                    "the bridge reports target {reported} bar, the command asked for {target} bar"
                ),
            });
        }
        if protocol::within_tolerance(
            pressure_bar,
            target,
            self.tolerance_bar,
            self.tolerance_relative,
        ) {
            return Ok(());
        }
        let tolerance = (self.tolerance_relative * target).max(self.tolerance_bar);
        let side = if pressure_bar > target {
            "above"
        } else {
            "below"
        };
        Err(DeviceError::Fault(format!(
            "point {}/{n} refused: measured at {pressure_bar:.4} bar, {side} its target \
             {target} bar by more than the tolerance ±{tolerance:.4} bar (max({} % of target, \
             {} bar)); the measurement was aborted",
            index + 1,
            self.tolerance_relative * 100.0,
            self.tolerance_bar
        )))
    }

    fn stall_reason(&self, emitted: usize) -> String {
        if self.expected_points == 0 {
            return format!("{}; aborted", self.stall_what);
        }
        let target = self
            .pressures
            .get(emitted)
            .map(|p| format!(" (target {p} bar)"))
            .unwrap_or_default();
        format!(
            "point {}/{}{target} did not equilibrate within {:.0} s of physical time; \
             the measurement was aborted",
            emitted + 1,
            self.expected_points,
            self.stall_limit_s
        )
    }
}

struct OpRun {
    points: BTreeMap<u32, IsothermPoint>,
    /// Points passed on so far (always a prefix).
    emitted: usize,
    last_progress_s: f64,
    /// Real time of the last progress: the stall watchdog also waits at least
    /// [`stall_real_floor`] of real time, since messages take real time to arrive.
    last_progress_at: Instant,
    /// The operation still runs on the instrument after an error (e.g. a refused point).
    abort_on_error: bool,
    outage: Option<Instant>,
    need_replay: bool,
    /// When the last replay request went out, until the bridge acknowledges it.
    replay_sent: Option<Instant>,
    replays: u32,
}

fn check_value(
    field: &str,
    value: f64,
    min: Option<f64>,
    max: Option<f64>,
    min_name: &str,
    max_name: &str,
) -> Result<(), DeviceError> {
    let violation = |limit: String| DeviceError::Limit {
        field: field.to_owned(),
        value,
        limit,
    };
    if !value.is_finite() {
        return Err(violation("finite values".to_owned()));
    }
    if let Some(min) = min
        && value < min
    {
        return Err(violation(format!("{min_name} {min}")));
    }
    if let Some(max) = max
        && value > max
    {
        return Err(violation(format!("{max_name} {max}")));
    }
    Ok(())
}

/// Follows every message of the bridge: liveness, readings, alarms and malformed payloads.
async fn run_monitor(
    mut rx: broadcast::Receiver<Message>,
    topics: Topics,
    monitor: watch::Sender<Monitor>,
    device: String,
    malformed_limit: u32,
    malformed_window: Duration,
) {
    loop {
        let message = match rx.recv().await {
            Ok(m) => m,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(device = %device, lost = n, "monitor lagged behind the bridge's messages");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let parsed = match protocol::parse(&topics, &message) {
            // The answer to a status command (see `SorptionAnalyser::await_status`) counts
            // as the bridge's status, parsed and applied like the retained one.
            Ok(Some(Inbound::Ack(ack))) => match protocol::ack_status(&topics, &ack) {
                Some(status) => status.map(|s| Some(Inbound::Status(s))),
                None => Ok(None),
            },
            other => other,
        };
        match parsed {
            Ok(None) => {}
            Ok(Some(inbound)) => monitor.send_modify(|m| apply(m, inbound, &device)),
            Err(e) => {
                tracing::warn!(device = %device, error = %e, "ignoring malformed payload from bridge");
                monitor.send_modify(|m| {
                    count_malformed(m, &e, &device, malformed_limit, malformed_window)
                });
            }
        }
    }
}

/// Counts one malformed payload and marks the bridge faulty when too many came too fast.
fn count_malformed(
    m: &mut Monitor,
    e: &protocol::Malformed,
    device: &str,
    malformed_limit: u32,
    malformed_window: Duration,
) {
    m.malformed_total += 1;
    let now = Instant::now();
    m.recent_malformed.push_back(now);
    while m
        .recent_malformed
        .front()
        .is_some_and(|t| now.duration_since(*t) > malformed_window)
    {
        m.recent_malformed.pop_front();
    }
    if m.faulty.is_none() && m.recent_malformed.len() >= malformed_limit.max(1) as usize {
        let why = format!(
            "{} malformed payloads within {} s (last: {e})",
            m.recent_malformed.len(),
            malformed_window.as_secs()
        );
        tracing::error!(device = %device, reason = %why, "bridge marked faulty");
        m.faulty = Some(why);
    }
}

fn apply(m: &mut Monitor, inbound: Inbound, device: &str) {
    match inbound {
        Inbound::Status(s) => {
            let next = if s.state == BridgeState::Offline {
                BridgeLiveness::Offline {
                    reason: if s.reason.is_empty() {
                        "status offline (last will)".to_owned()
                    } else {
                        s.reason
                    },
                }
            } else {
                BridgeLiveness::Online {
                    state: s.state,
                    instrument: s.instrument,
                }
            };
            let restarted = matches!(m.bridge, BridgeLiveness::Offline { .. })
                && matches!(next, BridgeLiveness::Online { .. });
            if restarted && m.faulty.take().is_some() {
                tracing::info!(device = %device, "bridge came back online; faulty mark cleared");
                m.recent_malformed.clear();
            }
            if m.bridge != next {
                tracing::info!(device = %device, bridge = ?next, "bridge status");
            }
            if matches!(next, BridgeLiveness::Offline { .. }) {
                m.readings.clear();
            }
            m.bridge = next;
        }
        Inbound::Telemetry(readings) => m.readings = readings,
        Inbound::Event(Event::Alarm {
            code,
            message,
            active,
            ..
        }) => {
            if active {
                let text = if message.is_empty() {
                    code.clone()
                } else {
                    message
                };
                m.alarms.insert(code, text);
            } else {
                m.alarms.remove(&code);
            }
        }
        Inbound::Event(Event::Progress { .. }) | Inbound::Ack(_) | Inbound::Result(_) => {}
    }
}

#[async_trait]
impl Device for SorptionAnalyser {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn check(&self, step: &StepCommand) -> Result<(), DeviceError> {
        match StepKind::of(step, &self.info.id)? {
            StepKind::Degas {
                temperature_c,
                duration_s,
            } => self.check_degas(temperature_c, duration_s),
            StepKind::Isotherm {
                adsorptive,
                temperature_c,
                pressures_bar,
                equilibration_interval_s,
                max_equilibration_s,
                sample_mass_g,
            } => self.check_isotherm(
                &adsorptive,
                temperature_c,
                &pressures_bar,
                equilibration_interval_s,
                max_equilibration_s,
                sample_mass_g,
            ),
        }
    }

    async fn execute(
        &self,
        step: &StepCommand,
        ctx: StepContext,
    ) -> Result<StepOutput, DeviceError> {
        // Never send a command that breaks a limit, whatever the daemon checked before.
        self.check(step)?;
        let link = self.link().await?;
        self.ready(link).await?;
        if let Some(why) = self.faulty() {
            return Err(DeviceError::Fault(format!(
                "bridge {} is marked faulty: {why}",
                self.config.bridge_id
            )));
        }
        match StepKind::of(step, &self.info.id)? {
            StepKind::Degas {
                temperature_c,
                duration_s,
            } => self
                .degas(link, &ctx, temperature_c, duration_s)
                .await
                .map(|r| StepOutput::pack(&r)),
            StepKind::Isotherm {
                adsorptive,
                temperature_c,
                pressures_bar,
                equilibration_interval_s,
                max_equilibration_s,
                sample_mass_g,
            } => self
                .isotherm(
                    link,
                    &ctx,
                    &adsorptive,
                    temperature_c,
                    &pressures_bar,
                    equilibration_interval_s,
                    max_equilibration_s,
                    sample_mass_g,
                )
                .await
                .map(|r| StepOutput::pack(&r)),
        }
    }

    async fn status(&self) -> Result<DeviceStatus, DeviceError> {
        let link = self.link().await?;
        if !link.transport.is_connected() {
            // Give a freshly started client its first connect before calling it down.
            link.transport
                .wait_connected(self.config.mqtt.connect_timeout.min(Duration::from_secs(1)))
                .await?;
        }
        if matches!(self.bridge(), BridgeLiveness::Unknown) {
            self.await_status(link, self.config.mqtt.ack_timeout).await;
        }
        let m = self.monitor_tx.borrow().clone();
        let state = match &m.bridge {
            BridgeLiveness::Unknown => {
                return Err(DeviceError::Disconnected(format!(
                    "no status from bridge {} (none retained on {}, and no answer to a status \
                     command)",
                    self.config.bridge_id,
                    self.topics.status()
                )));
            }
            BridgeLiveness::Offline { reason } => {
                return Err(DeviceError::Disconnected(format!(
                    "bridge {} is offline: {reason}",
                    self.config.bridge_id
                )));
            }
            BridgeLiveness::Online { state, .. } => *state,
        };
        let mut readings = m.readings.clone();
        readings.push(Reading::new("malformed_payloads", m.malformed_total as f64));
        let mut alarms: Vec<String> = m.alarms.values().cloned().collect();
        if m.faulty.is_some() {
            alarms.push(FAULTY_ALARM.to_owned());
        }
        if state == BridgeState::Fault {
            alarms.push("bridge reports a fault".to_owned());
        }
        Ok(DeviceStatus {
            readings,
            alarms,
            active: state == BridgeState::Busy,
        })
    }

    /// Aborts whatever the instrument is doing (dosing stops, the sample is left under
    /// vacuum or isolated, heaters off), as the bridge defines its abort.
    async fn safe_state(&self) -> Result<(), DeviceError> {
        let link = self.link().await?;
        self.ready(link).await?;
        self.abort(link, None).await
    }

    /// Asks the bridge for its status (the contract's `status` command) and reads the state
    /// its acknowledgement carries: `idle` (nothing running, or aborted) and `fault` (the
    /// bridge stopped on its own) are safe; `busy` means it is still dosing or heating.
    async fn confirm_safe(&self) -> Result<crate::device::SafeCheck, DeviceError> {
        let link = self.link().await?;
        self.ready(link).await?;
        let cmd = Command::new(
            self.new_request_id("", Op::Status),
            Op::Status,
            String::new(),
            json!({}),
        );
        let ack = self.command(link, &cmd).await?;
        let what = || format!("acknowledgement of status command {}", cmd.request_id);
        let status = match protocol::ack_status(&self.topics, &ack) {
            Some(Ok(status)) => status,
            Some(Err(e)) => {
                return Err(DeviceError::Corrupt {
                    what: what(),
                    reason: e.to_string(),
                });
            }
            None => {
                return Err(DeviceError::Corrupt {
                    what: what(),
                    reason: "no status object".to_owned(),
                });
            }
        };
        Ok(crate::device::SafeCheck::from_deviations(
            match status.state {
                BridgeState::Idle | BridgeState::Fault => Vec::new(),
                BridgeState::Busy => vec![format!(
                    "bridge {} reports busy after the abort",
                    self.config.bridge_id
                )],
                BridgeState::Offline => {
                    return Err(DeviceError::Disconnected(format!(
                        "bridge {} reports itself offline",
                        self.config.bridge_id
                    )));
                }
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::mqtt::BrokerUrl;

    fn driver() -> SorptionAnalyser {
        let broker: BrokerUrl = "mqtt://127.0.0.1:1883".parse().unwrap();
        SorptionAnalyser::new(SorptionConfig::new(
            "asap-1",
            MqttConfig::new(broker, "ppud-asap-1"),
        ))
    }

    fn isotherm(pressures: Vec<f64>) -> StepCommand {
        crate::analyser::StepKind::Isotherm {
            adsorptive: "CO2".into(),
            temperature_c: 25.0,
            pressures_bar: pressures,
            equilibration_interval_s: None,
            max_equilibration_s: None,
            sample_mass_g: None,
        }
        .pack()
    }

    fn field(e: DeviceError) -> (String, String) {
        match e {
            DeviceError::Limit { field, limit, .. } => (field, limit),
            other => panic!("expected a limit error, got {other:?}"),
        }
    }

    #[test]
    fn pressures_are_checked_against_order_sign_and_limit() {
        let d = driver();
        assert!(d.check(&isotherm(vec![0.01, 0.15, 1.0])).is_ok());
        let (f, l) = field(d.check(&isotherm(vec![0.1, 1.5])).unwrap_err());
        assert_eq!(f, "pressure_bar[1]");
        assert!(l.contains("max_pressure_bar 1.1"), "{l}");
        let (f, l) = field(d.check(&isotherm(vec![0.1, 0.05])).unwrap_err());
        assert_eq!(f, "pressure_bar[1]");
        assert!(l.contains("increasing"), "{l}");
        let (f, _) = field(d.check(&isotherm(vec![-0.1])).unwrap_err());
        assert_eq!(f, "pressure_bar[0]");
        let (f, _) = field(d.check(&isotherm(vec![])).unwrap_err());
        assert_eq!(f, "pressure_bar");
    }

    fn isotherm_plan(pressures: &[f64]) -> OpPlan {
        OpPlan {
            expected_points: pressures.len(),
            stall_limit_s: 1.0,
            stall_what: String::new(),
            pressures: pressures.to_vec(),
            tolerance_bar: 0.005,
            tolerance_relative: 0.05,
        }
    }

    #[test]
    fn points_outside_the_tolerance_of_their_target_are_refused() {
        let plan = isotherm_plan(&[0.05, 0.15, 1.0]);
        // Inside: absolute at low pressure, relative at high pressure.
        for (i, p) in [
            (0, 0.0451),
            (0, 0.0549),
            (1, 0.1451),
            (2, 0.951),
            (2, 1.049),
        ] {
            assert!(plan.check_point(i, p, None).is_ok(), "{i} {p}");
        }
        // The overshoot of issue 13: 0.229 bar for a 0.05 bar target.
        let Err(DeviceError::Fault(why)) = plan.check_point(0, 0.229, Some(0.05)) else {
            panic!("an overshoot must be refused");
        };
        for part in [
            "point 1/3",
            "0.2290 bar",
            "above",
            "target 0.05 bar",
            "±0.0050 bar",
        ] {
            assert!(why.contains(part), "{part:?} missing from {why}");
        }
        let Err(DeviceError::Fault(why)) = plan.check_point(2, 0.9, None) else {
            panic!("a short point must be refused");
        };
        assert!(
            why.contains("below") && why.contains("±0.0500 bar"),
            "{why}"
        );
        // A bridge that dosed toward another target is corrupt, whatever it measured.
        assert!(matches!(
            plan.check_point(1, 0.15, Some(0.1)),
            Err(DeviceError::Corrupt { .. })
        ));
    }

    #[test]
    fn degas_and_other_steps_are_checked() {
        let d = driver();
        assert!(
            d.check(
                &crate::analyser::StepKind::Degas {
                    temperature_c: 150.0,
                    duration_s: 3600.0
                }
                .pack()
            )
            .is_ok()
        );
        let (f, l) = field(
            d.check(
                &crate::analyser::StepKind::Degas {
                    temperature_c: 450.0,
                    duration_s: 3600.0,
                }
                .pack(),
            )
            .unwrap_err(),
        );
        assert_eq!(
            (f.as_str(), l.as_str()),
            ("temperature_c", "max_temperature_c 400")
        );
        let (f, _) = field(
            d.check(
                &crate::analyser::StepKind::Degas {
                    temperature_c: 150.0,
                    duration_s: 1e9,
                }
                .pack(),
            )
            .unwrap_err(),
        );
        assert_eq!(f, "duration_s");
        assert!(matches!(
            d.check(&crate::balance::weigh_command(None)),
            Err(DeviceError::Unsupported(_))
        ));
    }

    #[test]
    fn malformed_payloads_mark_the_bridge_faulty_until_it_restarts() {
        let topics = Topics::new("p", "b");
        let (tx, _) = watch::channel(Monitor::new());
        let online = Inbound::Status(protocol::Status {
            state: BridgeState::Idle,
            instrument: "sim".into(),
            request_id: None,
            sample_id: None,
            reason: String::new(),
        });
        tx.send_modify(|m| apply(m, online.clone(), "d"));
        assert!(tx.borrow().is_online());
        let _ = topics;
        tx.send_modify(|m| m.faulty = Some("x".into()));
        tx.send_modify(|m| {
            apply(
                m,
                Inbound::Status(protocol::Status {
                    state: BridgeState::Offline,
                    instrument: String::new(),
                    request_id: None,
                    sample_id: None,
                    reason: String::new(),
                }),
                "d",
            )
        });
        assert!(tx.borrow().faulty.is_some());
        tx.send_modify(|m| apply(m, online, "d"));
        assert!(tx.borrow().faulty.is_none());
    }
}
