//! The simulated bridge: MQTT client, command handling and the measurement procedures.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ppu_drivers::Clock;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::SimAnalyserConfig;
use super::dosing::{Dosing, IsothermPlan, IsothermRun, Step, StepFaults, Tolerance};
use super::physics::{Cell, KELVIN, Noise, capacity_mmol_per_bar, saturation_pressure_bar};
use crate::world::World;

const SCHEMA: u64 = 1;
/// Requests remembered for idempotency and replay.
const MAX_RECORDS: usize = 256;
/// Base vacuum after a good degas, bar (≈ 1.5 µmHg).
const BASE_VACUUM_BAR: f64 = 2e-6;
/// Degas vacuum worse than this raises a leak alarm, bar (≈ 10 µmHg).
const VACUUM_ALARM_BAR: f64 = 1.3e-5;
/// Heating rate of the degas port, °C/min: a degas heats from 25 °C at this rate, then holds.
pub const DEGAS_RAMP_C_PER_MIN: f64 = 10.0;
/// Physical duration of a helium free-space measurement, s (once per sample, before its first
/// isotherm).
pub const FREE_SPACE_S: f64 = 900.0;

/// One remembered request: what was published for it, for replay.
#[derive(Debug, Clone)]
struct Record {
    /// Result payloads in publish order.
    results: Vec<Vec<u8>>,
    done: bool,
    acked: bool,
    order: u64,
}

#[derive(Debug)]
struct Running {
    request_id: String,
    op: String,
    sample_id: String,
    cancel: CancellationToken,
}

#[derive(Debug, Default)]
struct Core {
    running: Option<Running>,
    records: HashMap<String, Record>,
    next_order: u64,
    /// Measured (warm, cold) free space per sample, cm³.
    free_space: HashMap<String, (f64, f64)>,
    pressure_bar: f64,
    sample_temperature_c: f64,
    alarms: HashMap<String, String>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    /// Result messages still to be lost in transit (kept for replay, never published).
    drop_results: u32,
    leak_mmol_per_s: f64,
    never_equilibrates: bool,
    malformed_telemetry: bool,
    overdose: bool,
}

struct Shared {
    config: SimAnalyserConfig,
    world: World,
    clock: Clock,
    base: String,
    client: Mutex<Option<AsyncClient>>,
    core: Mutex<Core>,
    faults: Mutex<Faults>,
    noise: Mutex<Noise>,
    commands: AtomicU64,
    operations_started: AtomicU64,
    stop: CancellationToken,
}

/// A running simulated analyser. See the [module docs](super).
pub struct SimAnalyser {
    shared: Arc<Shared>,
    connection: Mutex<Option<JoinHandle<()>>>,
    telemetry: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for SimAnalyser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimAnalyser")
            .field("bridge_id", &self.shared.config.bridge_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimAnalyser {
    /// Connects the bridge and starts serving (needs a Tokio runtime).
    pub fn start(config: SimAnalyserConfig, world: World, clock: Clock) -> Arc<SimAnalyser> {
        let prefix = config.topic_prefix.trim_end_matches('/');
        let base = if prefix.is_empty() {
            config.bridge_id.clone()
        } else {
            format!("{prefix}/{}", config.bridge_id)
        };
        let seed = config.seed;
        let shared = Arc::new(Shared {
            config,
            world,
            clock,
            base,
            client: Mutex::new(None),
            core: Mutex::new(Core {
                sample_temperature_c: 25.0,
                ..Core::default()
            }),
            faults: Mutex::new(Faults::default()),
            noise: Mutex::new(Noise::new(seed)),
            commands: AtomicU64::new(0),
            operations_started: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        Arc::new(SimAnalyser {
            connection: Mutex::new(Some(tokio::spawn(connection(shared.clone())))),
            telemetry: Mutex::new(Some(tokio::spawn(telemetry(shared.clone())))),
            shared,
        })
    }

    /// `{prefix}/{bridge_id}`.
    pub fn base_topic(&self) -> &str {
        &self.shared.base
    }

    /// Fault: the bridge PC drops off the network. Its connection closes without a
    /// DISCONNECT, so the broker publishes its will (status `offline`). Measurements keep
    /// running on the instrument; their results wait for replay.
    pub fn go_offline(&self) {
        if let Some(task) = lock(&self.connection).take() {
            task.abort();
        }
        lock(&self.shared.client).take();
    }

    /// Ends [`SimAnalyser::go_offline`]: reconnects and announces itself online.
    pub fn come_online(&self) {
        let mut slot = lock(&self.connection);
        if slot.is_none() {
            *slot = Some(tokio::spawn(connection(self.shared.clone())));
        }
    }

    /// Fault: gas leaks into the sample cell at `mmol_per_s` (0 = tight).
    pub fn set_leak(&self, mmol_per_s: f64) {
        lock(&self.shared.faults).leak_mmol_per_s = mmol_per_s.max(0.0);
    }

    /// Fault: no point ever meets the equilibrium criterion, and the bridge never gives up.
    pub fn set_never_equilibrates(&self, on: bool) {
        lock(&self.shared.faults).never_equilibrates = on;
    }

    /// Fault: broken dosing. Every dose of the next isotherms fills the full manifold and
    /// each point is reported wherever it lands, however far from its target.
    pub fn set_overdosing(&self, on: bool) {
        lock(&self.shared.faults).overdose = on;
    }

    /// Fault: the next `count` result messages are lost in transit (the bridge still keeps them
    /// and replays them when the command is repeated).
    pub fn drop_next_results(&self, count: u32) {
        lock(&self.shared.faults).drop_results = count;
    }

    /// Fault: every telemetry message is malformed.
    pub fn set_malformed_telemetry(&self, on: bool) {
        lock(&self.shared.faults).malformed_telemetry = on;
    }

    /// Publishes raw bytes on `{base}/{suffix}` (QoS 1, not retained), e.g. a malformed
    /// payload. False if the bridge is offline.
    pub fn publish_raw(&self, suffix: &str, payload: &[u8]) -> bool {
        self.shared.publish(
            &format!("{}/{suffix}", self.shared.base),
            payload.to_vec(),
            QoS::AtLeastOnce,
            false,
        )
    }

    /// Commands received (including duplicates).
    pub fn commands_received(&self) -> u64 {
        self.shared.commands.load(Ordering::SeqCst)
    }

    /// Operations actually started (a duplicate command starts none).
    pub fn operations_started(&self) -> u64 {
        self.shared.operations_started.load(Ordering::SeqCst)
    }

    /// True while an operation runs.
    pub fn is_busy(&self) -> bool {
        lock(&self.shared.core).running.is_some()
    }

    /// Stops the bridge: aborts any operation, publishes `offline` and disconnects.
    pub async fn shutdown(&self) {
        if let Some(r) = lock(&self.shared.core).running.take() {
            r.cancel.cancel();
        }
        let client = lock(&self.shared.client).clone();
        if let Some(client) = client {
            let _ = client.try_publish(
                self.shared.topic("status"),
                QoS::AtLeastOnce,
                true,
                offline_payload("bridge shut down"),
            );
            let _ = client.try_disconnect();
            // Give the event loop a moment to flush the goodbye.
            let task = lock(&self.connection).take();
            if let Some(task) = task {
                let _ = tokio::time::timeout(Duration::from_millis(500), task).await;
            }
        }
        self.shared.stop.cancel();
        if let Some(task) = lock(&self.connection).take() {
            task.abort();
        }
        if let Some(task) = lock(&self.telemetry).take() {
            task.abort();
        }
    }
}

impl Drop for SimAnalyser {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        if let Some(task) = lock(&self.connection).take() {
            task.abort();
        }
        if let Some(task) = lock(&self.telemetry).take() {
            task.abort();
        }
    }
}

/// A transducer reading of the true pressure `p`.
fn read_pressure(config: &SimAnalyserConfig, noise: &mut Noise, p: f64) -> f64 {
    (p * (1.0 + config.pressure_noise_rel * noise.gauss())
        + config.pressure_noise_abs_bar * noise.gauss())
    .max(0.0)
}

fn offline_payload(reason: &str) -> Vec<u8> {
    json!({"schema": SCHEMA, "state": "offline", "reason": reason})
        .to_string()
        .into_bytes()
}

impl Shared {
    fn topic(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.base)
    }

    fn publish(&self, topic: &str, payload: Vec<u8>, qos: QoS, retain: bool) -> bool {
        let client = lock(&self.client).clone();
        match client {
            Some(c) => c.try_publish(topic, qos, retain, payload).is_ok(),
            None => false,
        }
    }

    fn publish_json(&self, suffix: &str, value: &Value, qos: QoS, retain: bool) -> bool {
        self.publish(
            &self.topic(suffix),
            value.to_string().into_bytes(),
            qos,
            retain,
        )
    }

    fn status_payload(&self) -> Value {
        let core = lock(&self.core);
        let (state, request_id, sample_id) = match &core.running {
            Some(r) => (
                "busy",
                Some(r.request_id.clone()),
                Some(r.sample_id.clone()),
            ),
            None => ("idle", None, None),
        };
        json!({
            "schema": SCHEMA,
            "state": state,
            "instrument": self.config.instrument,
            "request_id": request_id,
            "sample_id": sample_id,
        })
    }

    fn publish_status(&self) {
        let status = self.status_payload();
        self.publish_json("status", &status, QoS::AtLeastOnce, true);
    }

    fn ack(&self, request_id: &str, accepted: bool, duplicate: bool, code: &str, reason: &str) {
        self.publish_json(
            "cmd/ack",
            &json!({
                "schema": SCHEMA,
                "request_id": request_id,
                "accepted": accepted,
                "duplicate": duplicate,
                "code": code,
                "reason": reason,
            }),
            QoS::AtLeastOnce,
            false,
        );
    }

    /// Publishes a result of `request_id` and keeps it for replay.
    fn result(&self, request_id: &str, value: Value) {
        let payload = value.to_string().into_bytes();
        if let Some(r) = lock(&self.core).records.get_mut(request_id) {
            r.results.push(payload.clone());
        }
        {
            let mut faults = lock(&self.faults);
            if faults.drop_results > 0 {
                faults.drop_results -= 1;
                return;
            }
        }
        self.publish(&self.topic("result"), payload, QoS::AtLeastOnce, false);
    }

    fn progress(&self, request_id: &str, fraction: f64, message: String) {
        self.publish_json(
            "event",
            &json!({"schema": SCHEMA, "kind": "progress", "request_id": request_id,
                    "fraction": fraction.clamp(0.0, 1.0), "message": message}),
            QoS::AtLeastOnce,
            false,
        );
    }

    fn alarm(&self, code: &str, message: &str, active: bool) {
        {
            let mut core = lock(&self.core);
            if active {
                core.alarms.insert(code.to_owned(), message.to_owned());
            } else {
                core.alarms.remove(code);
            }
        }
        self.publish_json(
            "event",
            &json!({"schema": SCHEMA, "kind": "alarm", "code": code, "message": message,
                    "severity": "warning", "active": active}),
            QoS::AtLeastOnce,
            false,
        );
    }

    /// A telemetry reading of the true pressure `p` (the telemetry's own noise stream).
    fn read_pressure(&self, p: f64) -> f64 {
        read_pressure(&self.config, &mut lock(&self.noise), p)
    }

    /// The noise of the `ordinal`-th operation started, on `sample`: a stream of its own,
    /// seeded from the configuration's seed, so what an operation measures never depends on
    /// how many telemetry readings (a real-time cadence) were taken meanwhile, and therefore
    /// not on the time scale.
    fn operation_noise(&self, sample: &str, ordinal: u64) -> Noise {
        // FNV-1a over the sample id, mixed with the seed and the ordinal.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in sample.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
        Noise::new(
            h ^ self.config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ ordinal.wrapping_mul(0xD1B5_4A32_D192_ED03),
        )
    }

    /// Handles one command payload.
    fn on_command(self: &Arc<Self>, payload: &[u8]) {
        self.commands.fetch_add(1, Ordering::SeqCst);
        let Ok(cmd) = serde_json::from_slice::<Value>(payload) else {
            tracing::warn!(bridge = %self.config.bridge_id, "command is not JSON; ignored");
            return;
        };
        let Some(request_id) = cmd
            .get("request_id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
        else {
            tracing::warn!(bridge = %self.config.bridge_id, "command without request_id; ignored");
            return;
        };
        if cmd.get("schema").and_then(Value::as_u64) != Some(SCHEMA) {
            self.ack(
                &request_id,
                false,
                false,
                "schema",
                "unsupported schema (expected 1)",
            );
            return;
        }
        let op = cmd
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let sample_id = cmd
            .get("sample_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let params = cmd.get("params").cloned().unwrap_or(json!({}));

        // Idempotency: a request id seen before is answered again, never run again.
        let replay = lock(&self.core)
            .records
            .get(&request_id)
            .map(|r| r.results.clone());
        if let Some(results) = replay {
            self.ack(&request_id, true, true, "", "");
            for r in results {
                self.publish(&self.topic("result"), r, QoS::AtLeastOnce, false);
            }
            return;
        }
        match op.as_str() {
            "status" => {
                let status = self.status_payload();
                self.publish_json(
                    "cmd/ack",
                    &json!({"schema": SCHEMA, "request_id": request_id, "accepted": true,
                            "duplicate": false, "status": status}),
                    QoS::AtLeastOnce,
                    false,
                );
            }
            "abort" => {
                let target = params.get("target_request_id").and_then(Value::as_str);
                let core = lock(&self.core);
                if let Some(r) = &core.running
                    && target.is_none_or(|t| t == r.request_id)
                {
                    r.cancel.cancel();
                }
                drop(core);
                self.ack(&request_id, true, false, "", "");
            }
            "degas" | "free_space" | "isotherm" => {
                let plan = match self.validate(&op, &sample_id, &params) {
                    Ok(plan) => plan,
                    Err((code, reason)) => {
                        self.ack(&request_id, false, false, code, &reason);
                        return;
                    }
                };
                let cancel = CancellationToken::new();
                {
                    let mut core = lock(&self.core);
                    if let Some(r) = &core.running {
                        let reason = format!("busy with {} {}", r.op, r.request_id);
                        drop(core);
                        self.ack(&request_id, false, false, "busy", &reason);
                        return;
                    }
                    core.running = Some(Running {
                        request_id: request_id.clone(),
                        op: op.clone(),
                        sample_id: plan.sample_id.clone(),
                        cancel: cancel.clone(),
                    });
                    let order = core.next_order;
                    core.next_order += 1;
                    core.records.insert(
                        request_id.clone(),
                        Record {
                            results: Vec::new(),
                            done: false,
                            acked: false,
                            order,
                        },
                    );
                    evict(&mut core.records);
                }
                let ordinal = self.operations_started.fetch_add(1, Ordering::SeqCst);
                let noise = self.operation_noise(&plan.sample_id, ordinal);
                self.ack(&request_id, true, false, "", "");
                self.publish_status();
                tokio::spawn(run_operation(self.clone(), request_id, plan, cancel, noise));
            }
            other => {
                self.ack(
                    &request_id,
                    false,
                    false,
                    "unsupported",
                    &format!("unknown op {other:?}"),
                );
            }
        }
    }

    fn on_result_ack(&self, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        if let Some(id) = v.get("request_id").and_then(Value::as_str)
            && let Some(r) = lock(&self.core).records.get_mut(id)
        {
            r.acked = true;
        }
    }

    /// Checks a measurement command; `Err((code, reason))` refuses it.
    fn validate(
        &self,
        op: &str,
        sample_id: &str,
        params: &Value,
    ) -> Result<Plan, (&'static str, String)> {
        let num = |name: &str| params.get(name).and_then(Value::as_f64);
        let need = |name: &str| {
            num(name)
                .filter(|v| v.is_finite())
                .ok_or(("invalid", format!("params.{name} must be a number")))
        };
        let sample_id = if sample_id.is_empty() {
            self.world
                .sample_at(&self.config.device_id)
                .unwrap_or_default()
        } else {
            sample_id.to_owned()
        };
        let kind = match op {
            "degas" => {
                let t = need("temperature_c")?;
                let d = need("duration_s")?;
                if t > self.config.max_degas_temperature_c || t < 0.0 {
                    return Err((
                        "limit",
                        format!(
                            "degas temperature {t} °C outside 0..{} °C",
                            self.config.max_degas_temperature_c
                        ),
                    ));
                }
                if d < 0.0 {
                    return Err(("invalid", "params.duration_s is negative".to_owned()));
                }
                PlanKind::Degas {
                    temperature_c: t,
                    duration_s: d,
                }
            }
            "free_space" => PlanKind::FreeSpace {
                temperature_c: num("temperature_c").unwrap_or(25.0),
            },
            _ => {
                let adsorptive = params
                    .get("adsorptive")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let material = self
                    .world
                    .material_of(&sample_id)
                    .unwrap_or_else(|| self.config.default_material.clone());
                let Some(model) = material.isotherm_for(&adsorptive) else {
                    return Err((
                        "unsupported",
                        format!("adsorptive {adsorptive:?} not supported (CO2, N2)"),
                    ));
                };
                let pressures: Vec<f64> = params
                    .get("pressures_bar")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default();
                if pressures.is_empty() {
                    return Err((
                        "invalid",
                        "params.pressures_bar must be a non-empty list".to_owned(),
                    ));
                }
                for (i, p) in pressures.iter().enumerate() {
                    if !(p.is_finite() && *p > 0.0) || (i > 0 && *p <= pressures[i - 1]) {
                        return Err((
                            "invalid",
                            format!(
                                "params.pressures_bar[{i}] = {p}: pressures must be positive and increasing"
                            ),
                        ));
                    }
                    if *p > self.config.max_pressure_bar {
                        return Err((
                            "limit",
                            format!(
                                "params.pressures_bar[{i}] = {p} bar exceeds the transducer's {} bar",
                                self.config.max_pressure_bar
                            ),
                        ));
                    }
                }
                let temperature_c = need("temperature_c")?;
                let interval = num("equilibration_interval_s")
                    .filter(|v| *v > 0.0)
                    .unwrap_or(10.0);
                let max_eq = num("max_equilibration_s")
                    .filter(|v| *v > 0.0)
                    .unwrap_or(3600.0);
                let mass = num("sample_mass_g")
                    .filter(|v| *v > 0.0 && v.is_finite())
                    .unwrap_or(0.1);
                // Optional (contract §5.1): the pressure tolerance of every point.
                let mut tolerance = self.config.tolerance;
                for (name, slot) in [
                    ("tolerance_bar", &mut tolerance.absolute_bar),
                    ("tolerance_relative", &mut tolerance.relative),
                ] {
                    match params.get(name) {
                        None | Some(Value::Null) => {}
                        Some(v) => match v.as_f64().filter(|x| x.is_finite() && *x >= 0.0) {
                            Some(x) => *slot = x,
                            None => {
                                return Err((
                                    "invalid",
                                    format!("params.{name} must be a number ≥ 0, not {v}"),
                                ));
                            }
                        },
                    }
                }
                if tolerance.absolute_bar <= 0.0 && tolerance.relative <= 0.0 {
                    return Err((
                        "invalid",
                        "params.tolerance_bar and params.tolerance_relative are both 0: no \
                         measured pressure can equal a target exactly"
                            .to_owned(),
                    ));
                }
                PlanKind::Isotherm {
                    tolerance,
                    adsorptive,
                    temperature_c,
                    pressures,
                    interval_s: interval,
                    max_equilibration_s: max_eq,
                    sample_mass_g: mass,
                    model,
                    ldf_k_per_s: material.ldf_k_per_s,
                }
            }
        };
        Ok(Plan { sample_id, kind })
    }
}

fn evict(records: &mut HashMap<String, Record>) {
    while records.len() > MAX_RECORDS {
        // Drop the oldest acknowledged record, else the oldest finished one.
        let victim = records
            .iter()
            .filter(|(_, r)| r.done)
            .min_by_key(|(_, r)| (!r.acked, r.order))
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => {
                records.remove(&k);
            }
            None => return,
        }
    }
}

struct Plan {
    sample_id: String,
    kind: PlanKind,
}

enum PlanKind {
    Degas {
        temperature_c: f64,
        duration_s: f64,
    },
    FreeSpace {
        temperature_c: f64,
    },
    Isotherm {
        tolerance: Tolerance,
        adsorptive: String,
        temperature_c: f64,
        pressures: Vec<f64>,
        interval_s: f64,
        max_equilibration_s: f64,
        sample_mass_g: f64,
        model: super::physics::IsothermModel,
        ldf_k_per_s: f64,
    },
}

/// Why an operation ended early.
enum Stop {
    Aborted,
    Failed { code: &'static str, reason: String },
}

async fn run_operation(
    shared: Arc<Shared>,
    request_id: String,
    plan: Plan,
    cancel: CancellationToken,
    mut noise: Noise,
) {
    let op = match &plan.kind {
        PlanKind::Degas { .. } => "degas",
        PlanKind::FreeSpace { .. } => "free_space",
        PlanKind::Isotherm { .. } => "isotherm",
    };
    let outcome = match &plan.kind {
        PlanKind::Degas {
            temperature_c,
            duration_s,
        } => {
            degas(
                &shared,
                &request_id,
                &plan.sample_id,
                *temperature_c,
                *duration_s,
                &cancel,
                &mut noise,
            )
            .await
        }
        PlanKind::FreeSpace { temperature_c } => free_space(
            &shared,
            &request_id,
            &plan.sample_id,
            *temperature_c,
            &cancel,
            &mut noise,
        )
        .await
        .map(|(w, c)| json!({"warm_free_space_cm3": w, "cold_free_space_cm3": c})),
        PlanKind::Isotherm { .. } => {
            isotherm(&shared, &request_id, &plan, &cancel, &mut noise).await
        }
    };
    let last = match outcome {
        Ok(mut body) => {
            if let Some(obj) = body.as_object_mut() {
                obj.insert("schema".into(), json!(SCHEMA));
                obj.insert("kind".into(), json!("complete"));
                obj.insert("request_id".into(), json!(request_id));
                obj.insert("op".into(), json!(op));
                obj.insert("instrument".into(), json!(shared.config.instrument));
            }
            body
        }
        Err(Stop::Aborted) => json!({"schema": SCHEMA, "kind": "failed", "request_id": request_id,
                                      "op": op, "code": "aborted", "reason": "aborted by request"}),
        Err(Stop::Failed { code, reason }) => json!({"schema": SCHEMA, "kind": "failed",
                                      "request_id": request_id, "op": op, "code": code, "reason": reason}),
    };
    shared.result(&request_id, last);
    {
        let mut core = lock(&shared.core);
        if let Some(r) = core.records.get_mut(&request_id) {
            r.done = true;
        }
        if core
            .running
            .as_ref()
            .is_some_and(|r| r.request_id == request_id)
        {
            core.running = None;
        }
        core.pressure_bar = 0.0;
        core.sample_temperature_c = 25.0;
    }
    shared.publish_status();
}

/// Sleeps `physical_s`, failing with [`Stop::Aborted`] on cancellation.
async fn wait(shared: &Shared, physical_s: f64, cancel: &CancellationToken) -> Result<(), Stop> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Stop::Aborted),
        _ = shared.clock.sleep(physical_s) => Ok(()),
    }
}

/// Sleeps until the physical instant `t_s` of the clock, failing with [`Stop::Aborted`] on
/// cancellation.
async fn wait_until(shared: &Shared, t_s: f64, cancel: &CancellationToken) -> Result<(), Stop> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Stop::Aborted),
        _ = shared.clock.sleep_until(t_s) => Ok(()),
    }
}

async fn degas(
    shared: &Arc<Shared>,
    id: &str,
    sample: &str,
    temperature_c: f64,
    duration_s: f64,
    cancel: &CancellationToken,
    noise: &mut Noise,
) -> Result<Value, Stop> {
    let ramp_s = ((temperature_c - 25.0).max(0.0) / DEGAS_RAMP_C_PER_MIN) * 60.0;
    let total = ramp_s + duration_s;
    let steps = 20;
    // Progress at fixed physical instants from the start: each wait ends at its instant, so
    // the timer's rounding of one wait is not added to the next.
    let origin = shared.clock.now_s();
    for i in 1..=steps {
        let t = total * i as f64 / steps as f64;
        wait_until(shared, origin + t, cancel).await?;
        let temp = if t < ramp_s {
            25.0 + (temperature_c - 25.0) * t / ramp_s
        } else {
            temperature_c
        };
        {
            let mut core = lock(&shared.core);
            core.sample_temperature_c = temp;
            core.pressure_bar = BASE_VACUUM_BAR * 10.0;
        }
        let phase = if t < ramp_s { "heating" } else { "holding" };
        shared.progress(
            id,
            i as f64 / steps as f64,
            format!("degas: {phase} at {temp:.0} °C under vacuum"),
        );
    }
    let leak = lock(&shared.faults).leak_mmol_per_s;
    // A leak feeds gas faster than the pump removes it: the vacuum floor rises.
    let final_p = BASE_VACUUM_BAR * (1.0 + 0.05 * noise.gauss().abs()) + leak * 10.0;
    if final_p > VACUUM_ALARM_BAR {
        shared.alarm(
            "leak_suspected",
            &format!(
                "degas vacuum {:.1} µmHg, expected below 10 µmHg: leak suspected",
                final_p / 1.333_22e-6
            ),
            true,
        );
    } else {
        shared.alarm("leak_suspected", "", false);
    }
    shared.world.record_degas(sample, temperature_c, duration_s);
    Ok(
        json!({"temperature_c": temperature_c, "duration_s": duration_s, "final_pressure_bar": final_p}),
    )
}

async fn free_space(
    shared: &Arc<Shared>,
    id: &str,
    sample: &str,
    temperature_c: f64,
    cancel: &CancellationToken,
    noise: &mut Noise,
) -> Result<(f64, f64), Stop> {
    shared.progress(
        id,
        0.0,
        format!("free space: helium expansion at {temperature_c} °C"),
    );
    wait(shared, FREE_SPACE_S, cancel).await?;
    let g = shared.config.geometry;
    let e = shared.config.free_space_error_rel;
    let warm = g.warm_cm3 * (1.0 + e * noise.gauss());
    let cold = g.cold_cm3 * (1.0 + e * noise.gauss());
    lock(&shared.core)
        .free_space
        .insert(sample.to_owned(), (warm, cold));
    Ok((warm, cold))
}

async fn isotherm(
    shared: &Arc<Shared>,
    id: &str,
    plan: &Plan,
    cancel: &CancellationToken,
    noise: &mut Noise,
) -> Result<Value, Stop> {
    let PlanKind::Isotherm {
        tolerance,
        adsorptive,
        temperature_c,
        pressures,
        interval_s,
        max_equilibration_s,
        sample_mass_g,
        model,
        ldf_k_per_s,
    } = &plan.kind
    else {
        return Err(Stop::Failed {
            code: "internal",
            reason: "not an isotherm".into(),
        });
    };
    let sample = &plan.sample_id;
    let known = lock(&shared.core).free_space.get(sample).copied();
    let (warm, cold) = match known {
        Some(fs) => fs,
        None => free_space(shared, id, sample, *temperature_c, cancel, noise).await?,
    };
    let cfg = &shared.config;
    let bath_k = temperature_c + KELVIN;
    let g = cfg.geometry;
    // What the instrument believes (measured free space) versus the true cell.
    let dosing = Dosing {
        manifold_capacity: g.manifold_capacity(),
        cell_capacity: capacity_mmol_per_bar(warm, g.ambient_k)
            + capacity_mmol_per_bar(cold, bath_k),
        max_dose_bar: cfg.max_dose_bar,
        max_doses_per_point: cfg.max_doses_per_point,
        tolerance: *tolerance,
        overdose: lock(&shared.faults).overdose,
    };
    let cell = Cell::new(g, bath_k, *sample_mass_g, *model, *ldf_k_per_s);
    let mut run = IsothermRun::new(
        cell,
        dosing,
        IsothermPlan {
            targets_bar: pressures.clone(),
            interval_s: *interval_s,
            max_equilibration_s: *max_equilibration_s,
        },
    );
    let p0 = saturation_pressure_bar(adsorptive, bath_k);
    let n = pressures.len();
    lock(&shared.core).sample_temperature_c = *temperature_c;
    // The run lives in physical time of its own, one equilibration interval per reading; the
    // bridge only paces it against the clock (and catches up when it fell behind), so the
    // outcome never depends on the time scale.
    let origin = shared.clock.now_s();
    let mut read = |p: f64| read_pressure(cfg, noise, p);
    loop {
        let f = *lock(&shared.faults);
        let faults = StepFaults {
            leak_mmol_per_s: f.leak_mmol_per_s,
            never_equilibrates: f.never_equilibrates,
        };
        match run.step(faults, &mut read) {
            Step::Dosed {
                index,
                dose,
                dose_bar,
                target_bar,
            } => shared.progress(
                id,
                0.0,
                format!(
                    "point {}/{n}: dose {dose} to {dose_bar:.4} bar (target {target_bar} bar)",
                    index + 1
                ),
            ),
            Step::Reading { pressure_bar } => {
                lock(&shared.core).pressure_bar = pressure_bar;
                let behind = origin + run.time_s - shared.clock.now_s();
                if behind > 0.0 {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return Err(Stop::Aborted),
                        _ = shared.clock.sleep(behind) => {}
                    }
                } else if cancel.is_cancelled() {
                    return Err(Stop::Aborted);
                } else {
                    tokio::task::yield_now().await;
                }
            }
            Step::Point(p) => {
                lock(&shared.core).pressure_bar = p.pressure_bar;
                shared.result(
                    id,
                    json!({"schema": SCHEMA, "kind": "point", "request_id": id, "index": p.index,
                           "pressure_bar": p.pressure_bar, "p0_bar": p0,
                           "amount_mmol_per_g": p.amount_mmol / sample_mass_g,
                           "equilibration_time_s": p.equilibration_time_s,
                           "target_pressure_bar": p.target_bar,
                           "tolerance_bar": p.tolerance_bar, "doses": p.doses}),
                );
                shared.progress(id, 1.0, format!("point {}/{n} measured", p.index + 1));
            }
            Step::Failed { code, reason } => return Err(Stop::Failed { code, reason }),
            Step::Done => break,
        }
    }
    let degas = shared.world.history(sample).and_then(|h| h.degas);
    Ok(json!({
        "points": n,
        "adsorptive": adsorptive,
        "temperature_c": temperature_c,
        "sample_mass_g": sample_mass_g,
        "sample_id": sample,
        "degas_temperature_c": degas.map(|d| d.0),
        "degas_duration_s": degas.map(|d| d.1),
        "warm_free_space_cm3": warm,
        "cold_free_space_cm3": cold,
    }))
}

/// The bridge's MQTT connection: connect, announce, serve commands; reconnect on failure.
async fn connection(shared: Arc<Shared>) {
    let cfg = &shared.config;
    let mut options = MqttOptions::new(
        cfg.client_id.clone(),
        cfg.broker_host.clone(),
        cfg.broker_port,
    );
    options.set_keep_alive(Duration::from_secs(cfg.keep_alive.as_secs().max(1)));
    options.set_clean_session(false);
    options.set_last_will(LastWill::new(
        shared.topic("status"),
        offline_payload("connection lost (last will)"),
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    // Acks, points and progress are small replies: without this each may wait out the
    // driver's delayed ACK (40 ms on Linux) behind Nagle's algorithm.
    eventloop.network_options.set_tcp_nodelay(true);
    let cmd_topic = shared.topic("cmd");
    let result_ack_topic = shared.topic("result/ack");
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            _ = shared.stop.cancelled() => return,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                let _ = client.try_subscribe(cmd_topic.clone(), QoS::AtLeastOnce);
                let _ = client.try_subscribe(result_ack_topic.clone(), QoS::AtLeastOnce);
                *lock(&shared.client) = Some(client.clone());
                shared.publish_status();
                tracing::debug!(bridge = %cfg.bridge_id, "simulated bridge connected");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic == cmd_topic {
                    shared.on_command(&p.payload);
                } else if p.topic == result_ack_topic {
                    shared.on_result_ack(&p.payload);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(bridge = %cfg.bridge_id, error = %e, "simulated bridge link down");
                tokio::select! {
                    _ = shared.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Publishes readings while the bridge is connected.
async fn telemetry(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.telemetry_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut garbage = VecDeque::from([
        b"\x00\x01 not json".to_vec(),
        br#"{"schema":1,"readings":{"pressure_bar":"high"}}"#.to_vec(),
        br#"{"schema":99,"readings":{}}"#.to_vec(),
        br#"{"readings":{"pressure_bar":0.1}}"#.to_vec(),
    ]);
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if lock(&shared.client).is_none() {
            continue;
        }
        if lock(&shared.faults).malformed_telemetry {
            if let Some(bad) = garbage.pop_front() {
                shared.publish(
                    &shared.topic("telemetry"),
                    bad.clone(),
                    QoS::AtMostOnce,
                    false,
                );
                garbage.push_back(bad);
            }
            continue;
        }
        let (p, t) = {
            let core = lock(&shared.core);
            (core.pressure_bar, core.sample_temperature_c)
        };
        let reading = json!({"schema": SCHEMA, "readings": {
            "pressure_bar": shared.read_pressure(p),
            "sample_temperature_c": t,
            "manifold_temperature_c": shared.config.geometry.manifold_k - KELVIN,
        }});
        shared.publish_json("telemetry", &reading, QoS::AtMostOnce, false);
    }
}
