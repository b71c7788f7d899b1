//! The simulated bridge's reading of the MQTT analyser contract against the golden transcripts
//! of `tests/transcripts/analyser-mqtt.toml` (docs/mqtt-contract.md §11, each exchange citing
//! its section). The requests go to the bridge over a real broker from a plain MQTT client,
//! and its replies and own publications must have the transcript's shape: every field the
//! transcript shows, with the same JSON type, and the same value where the contract fixes it
//! (schema, kinds, ids, ops, codes, states, indices, flags). Measured numbers are the
//! simulator's own. The driver is tested against the same file separately
//! (drivers/tests/analyser_transcripts.rs); neither imports the other's protocol code.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ppu_drivers::Clock;
use ppu_sim::analyser::{SimAnalyser, SimAnalyserConfig};
use ppu_sim::broker::EmbeddedBroker;
use ppu_sim::world::World;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;
use serde_json::Value;

const TRANSCRIPT: &str = include_str!("../../tests/transcripts/analyser-mqtt.toml");
const DEADLINE: Duration = Duration::from_secs(30);
const BASE: &str = "lab/ppu/analyser/asap-1";

/// Fields whose value the contract fixes (compared exactly); all others by type only.
const EXACT: [&str; 15] = [
    "schema",
    "kind",
    "request_id",
    "op",
    "code",
    "state",
    "index",
    "accepted",
    "duplicate",
    "points",
    "adsorptive",
    "target_pressure_bar",
    "active",
    "sample_id",
    "severity",
];

#[derive(Debug, Deserialize)]
struct Transcript {
    exchange: Vec<Exchange>,
}

#[derive(Debug, Deserialize)]
struct Exchange {
    name: String,
    section: String,
    request_topic: Option<String>,
    request: Option<String>,
    reply_topic: Option<String>,
    reply: Option<String>,
}

struct Exchanges(Vec<Exchange>);

impl Exchanges {
    fn load() -> Self {
        let t: Transcript = toml::from_str(TRANSCRIPT).expect("the transcript is valid TOML");
        for e in &t.exchange {
            assert!(
                e.section.starts_with("docs/mqtt-contract.md §"),
                "{}",
                e.name
            );
        }
        Self(t.exchange)
    }

    fn get(&self, name: &str) -> &Exchange {
        self.0
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no exchange {name} in the transcript"))
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).expect("the transcript's JSON")
}

/// `actual` has every field of `expected`, of the same type, and the same value for the
/// fields in [`EXACT`]; objects recurse.
fn conforms(expected: &Value, actual: &Value, path: &str) -> Result<(), String> {
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    if kind(expected) != kind(actual) {
        return Err(format!("{path}: {actual} is not a {}", kind(expected)));
    }
    if let (Value::Object(e), Value::Object(a)) = (expected, actual) {
        for (k, v) in e {
            let at = format!("{path}.{k}");
            let Some(w) = a.get(k) else {
                return Err(format!("{at} missing"));
            };
            conforms(v, w, &at)?;
            let same = match (v.as_f64(), w.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                _ => v == w,
            };
            if EXACT.contains(&k.as_str()) && !same {
                return Err(format!("{at} is {w}, the transcript says {v}"));
            }
        }
    }
    Ok(())
}

/// A plain MQTT client that records everything published under the bridge's base topic.
struct Probe {
    client: AsyncClient,
    log: Arc<Mutex<Vec<(String, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Probe {
    async fn start(broker: &EmbeddedBroker, id: &str) -> Probe {
        let addr = broker.addr();
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        client
            .subscribe(format!("{BASE}/#"), QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                            sink.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((p.topic.clone(), v));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, subscribed_rx)
            .await
            .expect("the probe subscribes")
            .expect("the probe runs");
        Probe { client, log, task }
    }

    async fn send(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .expect("publish queued");
    }

    /// Waits for a message on `topic` for which `pick` holds.
    async fn wait(&self, topic: &str, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|(t, v)| t == topic && pick(v))
                .map(|(_, v)| v.clone());
            if let Some(v) = found {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
                let recent: Vec<_> = log
                    .iter()
                    .filter(|(t, _)| !t.ends_with("/telemetry"))
                    .rev()
                    .take(12)
                    .collect();
                panic!("timed out waiting for {what} on {topic}; last seen: {recent:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends the exchange's request (if any) and checks the bridge's matching reply.
    async fn exchange(&self, e: &Exchange) -> Value {
        if let (Some(topic), Some(request)) = (&e.request_topic, &e.request) {
            self.send(topic, request).await;
        }
        let (Some(topic), Some(reply)) = (&e.reply_topic, &e.reply) else {
            return Value::Null;
        };
        let expected = json(reply);
        // The bridge's message this reply corresponds to: same topic, same identity fields.
        let key: Vec<(&str, Value)> = [
            "request_id",
            "kind",
            "code",
            "state",
            "index",
            "duplicate",
            "active",
            "op",
        ]
        .into_iter()
        .filter_map(|k| expected.get(k).map(|v| (k, v.clone())))
        .collect();
        let actual = self
            .wait(topic, &e.name, |v| {
                key.iter().all(|(k, want)| v.get(*k) == Some(want))
            })
            .await;
        if let Err(why) = conforms(&expected, &actual, "") {
            panic!(
                "{} ({}): {why}\n bridge: {actual}\n transcript: {expected}",
                e.name, e.section
            );
        }
        actual
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Bench {
    _broker: EmbeddedBroker,
    sim: Arc<SimAnalyser>,
    probe: Probe,
}

async fn bench(name: &str, scale: f64, configure: impl FnOnce(&mut SimAnalyserConfig)) -> Bench {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("embedded broker");
    let probe = Probe::start(&broker, &format!("probe-{name}-{}", std::process::id())).await;
    let addr = broker.addr();
    let mut config = SimAnalyserConfig::new(addr.ip().to_string(), addr.port(), "asap-1");
    config.client_id = format!("bridge-{name}-{}", std::process::id());
    config.instrument = "ASAP 2020 #2".to_owned();
    config.keep_alive = Duration::from_secs(1);
    config.telemetry_interval = Duration::from_millis(100);
    configure(&mut config);
    let sim = SimAnalyser::start(config, World::new(7), Clock::new(scale));
    // Online: its retained status arrives.
    probe
        .wait(&format!("{BASE}/status"), "the bridge online", |v| {
            v["state"] == "idle"
        })
        .await;
    Bench {
        _broker: broker,
        sim,
        probe,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_answers_the_transcripts_measurement_exchanges() {
    let x = Exchanges::load();
    let mut covered = BTreeSet::new();
    let b = bench("measure", 100_000.0, |_| {}).await;
    let p = &b.probe;
    for name in ["status-query", "telemetry"] {
        p.exchange(x.get(name)).await;
        covered.insert(name);
    }
    for name in [
        "refused-limit",
        "refused-invalid",
        "refused-unsupported",
        "refused-schema",
    ] {
        p.exchange(x.get(name)).await;
        covered.insert(name);
    }
    // A degas under a leak raises the alarm; a tight one clears it.
    b.sim.set_leak(1e-4);
    for name in [
        "degas",
        "degas-progress",
        "alarm-raised",
        "degas-complete",
        "result-ack",
    ] {
        p.exchange(x.get(name)).await;
        covered.insert(name);
    }
    b.sim.set_leak(0.0);
    p.send(
        &format!("{BASE}/cmd"),
        r#"{"schema":1,"request_id":"setup-degas","op":"degas","sample_id":"S-042","params":{"temperature_c":250.0,"duration_s":60.0}}"#,
    )
    .await;
    p.exchange(x.get("alarm-cleared")).await;
    covered.insert("alarm-cleared");
    for name in [
        "free-space",
        "free-space-complete",
        "isotherm",
        "status-busy",
        "isotherm-point",
        "isotherm-complete",
    ] {
        let reply = p.exchange(x.get(name)).await;
        if name == "isotherm-point" {
            // On target: within the tolerance the command asked for.
            let (pressure, target) = (
                reply["pressure_bar"].as_f64(),
                reply["target_pressure_bar"].as_f64(),
            );
            let (Some(pressure), Some(target)) = (pressure, target) else {
                panic!("{reply}");
            };
            assert!(
                (pressure - target).abs() <= (0.05 * target).max(0.005),
                "{reply}"
            );
        }
        covered.insert(name);
    }
    // The same command again: a duplicate, and every result replayed (the points again).
    let points = |log: &[(String, Value)]| {
        log.iter()
            .filter(|(t, v)| {
                t.ends_with("/result")
                    && v["kind"] == "point"
                    && v["request_id"] == "01JEXAMPLE-isotherm-4"
            })
            .count()
    };
    let before = points(&b.probe.log.lock().unwrap_or_else(|p| p.into_inner()));
    p.exchange(x.get("isotherm-duplicate")).await;
    covered.insert("isotherm-duplicate");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while points(&b.probe.log.lock().unwrap_or_else(|p| p.into_inner())) < before + 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the points were not replayed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        b.sim.operations_started(),
        4,
        "two degas, free space, isotherm; none twice"
    );
    b.sim.shutdown().await;

    // An instrument allowed one dose per point cannot reach a steep point's target.
    let c = bench("short", 100_000.0, |c| c.max_doses_per_point = 1).await;
    let isotherm = x.get("isotherm").request.clone().expect("request");
    c.probe
        .send(
            &format!("{BASE}/cmd"),
            &isotherm.replace("01JEXAMPLE-isotherm-4", "01JEXAMPLE-isotherm-13"),
        )
        .await;
    c.probe.exchange(x.get("target-not-reached")).await;
    covered.insert("target-not-reached");
    c.sim.shutdown().await;

    // The rest is covered by the test below.
    let rest = [
        "long-degas",
        "refused-busy",
        "abort",
        "aborted",
        "status-will",
    ];
    for e in &x.0 {
        assert!(
            covered.contains(e.name.as_str()) || rest.contains(&e.name.as_str()),
            "exchange {} is not checked against the bridge",
            e.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_answers_the_transcripts_busy_abort_and_will_exchanges() {
    let x = Exchanges::load();
    // Real time: the 12 h degas keeps the instrument busy for the whole test.
    let b = bench("busy", 1.0, |_| {}).await;
    for name in ["long-degas", "refused-busy", "abort", "aborted"] {
        b.probe.exchange(x.get(name)).await;
    }
    // The bridge drops off the network: the broker publishes its will.
    b.sim.go_offline();
    b.probe.exchange(x.get("status-will")).await;
}
