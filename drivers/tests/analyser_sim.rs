//! The sorption-analyser driver against the simulated analyser, both as separate clients of a
//! real MQTT broker: the embedded rumqttd and Mosquitto (from `PPU_TEST_MOSQUITTO`, or a
//! process of the test's own; skipped with a notice only outside CI when it is not installed).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ppu_drivers::analyser::schema::{IsothermPoint, IsothermResult};
use ppu_drivers::analyser::sorption::{BridgeLiveness, FAULTY_ALARM};
use ppu_drivers::analyser::{SorptionAnalyser, SorptionConfig};
use ppu_drivers::transport::mqtt::{BrokerUrl, MqttConfig, MqttTransport, Qos};
use ppu_drivers::{Clock, Device, DeviceError, StepCommand, StepContext, StepUpdate};
use ppu_sim::analyser::{Material, SimAnalyser, SimAnalyserConfig};
use ppu_sim::broker::{EmbeddedBroker, MosquittoForTest, mosquitto_for_test, mosquitto_required};
use ppu_sim::world::World;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const SCALE: f64 = 2000.0;
const DEADLINE: Duration = Duration::from_secs(60);
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const PRESSURES: [f64; 10] = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.4, 0.6, 0.8, 1.0];

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A broker a test can stop and start.
enum Broker {
    Embedded(EmbeddedBroker),
    Mosquitto(MosquittoForTest),
}

impl Broker {
    fn url(&self) -> String {
        match self {
            Broker::Embedded(b) => b.url(),
            Broker::Mosquitto(MosquittoForTest::Shared(url)) => url.clone(),
            Broker::Mosquitto(MosquittoForTest::Owned(m)) => m.url(),
            Broker::Mosquitto(MosquittoForTest::Unavailable(_)) => unreachable!(),
        }
    }

    async fn stop(&self) {
        match self {
            Broker::Embedded(b) => b.go_down().await,
            Broker::Mosquitto(MosquittoForTest::Owned(m)) => m.kill(),
            _ => panic!("this broker cannot be stopped by the test"),
        }
    }

    async fn start_again(&self) {
        match self {
            Broker::Embedded(b) => b.come_up().await.expect("relay rebinds"),
            Broker::Mosquitto(MosquittoForTest::Owned(m)) => {
                m.restart().await.expect("mosquitto restarts")
            }
            _ => panic!("this broker cannot be restarted by the test"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Embedded,
    Mosquitto,
}

async fn broker(kind: Kind, needs_restart: bool) -> Option<Broker> {
    match kind {
        Kind::Embedded => Some(Broker::Embedded(
            EmbeddedBroker::start("127.0.0.1:0".parse().unwrap())
                .await
                .expect("embedded broker"),
        )),
        Kind::Mosquitto => match mosquitto_for_test(needs_restart).await {
            MosquittoForTest::Unavailable(why) => {
                assert!(!mosquitto_required(), "Mosquitto is required here: {why}");
                eprintln!("NOTICE: skipping the Mosquitto variant: {why}");
                None
            }
            m => Some(Broker::Mosquitto(m)),
        },
    }
}

struct Rig {
    broker: Broker,
    sim: std::sync::Arc<SimAnalyser>,
    driver: SorptionAnalyser,
    world: World,
    clock: Clock,
    url: BrokerUrl,
    prefix: String,
}

/// A driver of the rig's bridge (`asap-1` under `prefix`) with its own MQTT client id.
fn driver(url: &BrokerUrl, prefix: &str, client_id: String) -> SorptionAnalyser {
    let mut mqtt = MqttConfig::new(url.clone(), client_id);
    mqtt.reconnect_max = Duration::from_millis(500);
    mqtt.ack_timeout = Duration::from_secs(2);
    let mut dc = SorptionConfig::new("analyser-1", mqtt);
    dc.topic_prefix = prefix.to_owned();
    dc.bridge_id = "asap-1".into();
    dc.malformed_limit = 5;
    SorptionAnalyser::new(dc)
}

async fn rig(kind: Kind, needs_restart: bool) -> Option<Rig> {
    rig_at(kind, needs_restart, SCALE).await
}

async fn rig_at(kind: Kind, needs_restart: bool, scale: f64) -> Option<Rig> {
    let broker = broker(kind, needs_restart).await?;
    let url: BrokerUrl = broker.url().parse().expect("broker url");
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let prefix = format!("test/{}/{n}", std::process::id());
    let clock = Clock::new(scale);
    let world = World::new(42);
    let mut sc = SimAnalyserConfig::new(url.host.clone(), url.port, "asap-1");
    sc.topic_prefix = prefix.clone();
    sc.client_id = format!("sim-{}-{n}", std::process::id());
    sc.keep_alive = KEEP_ALIVE;
    sc.telemetry_interval = Duration::from_millis(100);
    let sim = SimAnalyser::start(sc, world.clone(), clock);
    let driver = driver(&url, &prefix, format!("ppud-{}-{n}", std::process::id()));
    let rig = Rig {
        broker,
        sim,
        driver,
        world,
        clock,
        url,
        prefix,
    };
    rig.wait_online().await;
    Some(rig)
}

impl Rig {
    async fn wait_online(&self) {
        wait_for("the bridge online", || async {
            self.driver.status().await.is_ok()
        })
        .await;
    }

    fn ctx(&self, sample: &str) -> (StepContext, mpsc::UnboundedReceiver<StepUpdate>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            StepContext {
                clock: self.clock,
                updates: tx,
                cancel: CancellationToken::new(),
                sample_id: sample.to_owned(),
                experiment_id: "01TESTEXPERIMENT".to_owned(),
            },
            rx,
        )
    }
}

/// Polls `cond` (each poll is a real exchange or state read) until true, at most DEADLINE.
async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn isotherm(pressures: &[f64], max_equilibration_s: f64) -> StepCommand {
    isotherm_of("CO2", 25.0, pressures, max_equilibration_s)
}

fn isotherm_of(
    adsorptive: &str,
    temperature_c: f64,
    pressures: &[f64],
    max_equilibration_s: f64,
) -> StepCommand {
    ppu_drivers::analyser::StepKind::Isotherm {
        adsorptive: adsorptive.into(),
        temperature_c,
        pressures_bar: pressures.to_vec(),
        equilibration_interval_s: Some(10.0),
        max_equilibration_s: Some(max_equilibration_s),
        sample_mass_g: Some(0.1),
    }
    .pack()
}

/// The isotherm point an update carries, if it is one.
fn point_of(u: &StepUpdate) -> Option<(u32, IsothermPoint)> {
    match u {
        StepUpdate::Intermediate { index, value } => {
            Some((*index, prost::Message::decode(value.value.as_slice()).ok()?))
        }
        _ => None,
    }
}

fn drain_points(rx: &mut mpsc::UnboundedReceiver<StepUpdate>) -> Vec<(u32, IsothermPoint)> {
    let mut points = Vec::new();
    while let Ok(u) = rx.try_recv() {
        if let Some((index, point)) = point_of(&u) {
            points.push((index, point));
        }
    }
    points
}

fn assert_in_order(points: &[(u32, IsothermPoint)], result: &IsothermResult) {
    let indices: Vec<u32> = points.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        indices,
        (0..PRESSURES.len() as u32).collect::<Vec<_>>(),
        "one event per point, in order"
    );
    for ((_, streamed), kept) in points.iter().zip(&result.points) {
        assert_eq!(streamed, kept, "streamed points are the result's points");
    }
}

/// The driver's default tolerance: `max(5 % of target, 0.005 bar)`.
fn tolerance(target: f64) -> f64 {
    (0.05 * target).max(0.005)
}

/// Every point lies within the tolerance of its target, on both sides.
fn assert_within_tolerance(targets: &[f64], result: &IsothermResult) {
    assert_eq!(result.points.len(), targets.len());
    for (p, &target) in result.points.iter().zip(targets) {
        assert!(
            (p.pressure_bar - target).abs() <= tolerance(target),
            "{} bar for the target {target} ± {} bar",
            p.pressure_bar,
            tolerance(target)
        );
    }
}

/// Measured points sit on the material's isotherm: the volumetric mass balance (measured free
/// space, noisy pressures, several doses) recovers the equilibrium uptake within 2 %.
fn assert_on_isotherm(material: &Material, result: &IsothermResult) {
    assert_within_tolerance(&PRESSURES, result);
    for (k, p) in result.points.iter().enumerate() {
        let expected = material.co2.uptake(p.pressure_bar, 298.15);
        let rel = (p.amount_mmol_per_g - expected) / expected;
        assert!(
            rel.abs() < 0.02,
            "point {k}: {} vs {expected} mmol/g at {} bar",
            p.amount_mmol_per_g,
            p.pressure_bar
        );
        assert!(p.p0_bar > 60.0, "CO2 at 25 °C has p0 ≈ 64 bar");
    }
}

async fn ten_point_isotherm(kind: Kind) {
    let Some(rig) = rig(kind, false).await else {
        return;
    };
    let degas = ppu_drivers::analyser::StepKind::Degas {
        temperature_c: 300.0,
        duration_s: 2.0 * 3600.0,
    }
    .pack();
    let (ctx, _rx) = rig.ctx("ref-13X-1");
    let out = rig.driver.execute(&degas, ctx).await.expect("degas");
    let Some(d) = (out).decode::<ppu_drivers::analyser::schema::DegasResult>() else {
        panic!("{out:?}")
    };
    assert!(d.final_pressure_bar < 1.3e-5, "good vacuum: {d:?}");

    let (ctx, mut rx) = rig.ctx("ref-13X-1");
    let out = tokio::time::timeout(
        DEADLINE,
        rig.driver.execute(&isotherm(&PRESSURES, 3600.0), ctx),
    )
    .await
    .expect("isotherm finishes")
    .expect("isotherm succeeds");
    let Some(result) = (out).decode::<ppu_drivers::analyser::schema::IsothermResult>() else {
        panic!("{out:?}")
    };
    assert_eq!(result.points.len(), 10);
    assert_eq!(
        (result.adsorptive.as_str(), result.sample_mass_g),
        ("CO2", 0.1)
    );
    assert_eq!(
        (result.degas_temperature_c, result.degas_duration_s),
        (300.0, 7200.0)
    );
    assert!(!result.instrument.is_empty());
    assert_in_order(&drain_points(&mut rx), &result);
    assert_on_isotherm(&Material::zeolite_13x(), &result);
    // Free space, degas and the isotherm: three operations, none run twice.
    assert_eq!(rig.sim.operations_started(), 3);
    let _ = rig.world;
    rig.driver.shutdown().await;
    rig.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_point_isotherm_embedded_broker() {
    ten_point_isotherm(Kind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_point_isotherm_mosquitto() {
    ten_point_isotherm(Kind::Mosquitto).await;
}

/// Acceptance of issue 13: isotherm points land within the tolerance of their targets at
/// 0.05 bar as at 1 bar, for CO₂ at 25 °C and N₂ at −196 °C (a near-rectangular isotherm, the
/// hardest to dose), on the reference materials.
async fn points_land_within_tolerance(kind: Kind) {
    let Some(rig) = rig(kind, false).await else {
        return;
    };
    let targets = [0.05, 0.1, 0.15, 1.0];
    for (sample, adsorptive, temperature_c) in [
        ("ref-13X-tol", "CO2", 25.0),
        ("ref-MOF-74-tol", "CO2", 25.0),
        ("ref-HKUST-1-tol", "CO2", 25.0),
        ("ref-13X-tol-n2", "N2", -196.0),
        ("ref-MOF-74-tol-n2", "N2", -196.0),
    ] {
        let (ctx, mut rx) = rig.ctx(sample);
        let step = isotherm_of(adsorptive, temperature_c, &targets, 3600.0);
        let out = tokio::time::timeout(DEADLINE, rig.driver.execute(&step, ctx))
            .await
            .expect("isotherm finishes")
            .unwrap_or_else(|e| panic!("{sample} {adsorptive}: {e}"));
        let Some(result) = (out).decode::<ppu_drivers::analyser::schema::IsothermResult>() else {
            panic!("{out:?}")
        };
        assert_within_tolerance(&targets, &result);
        let streamed = drain_points(&mut rx);
        assert_eq!(streamed.len(), targets.len(), "{sample}");
        // Cumulative uptake never falls on an adsorption branch (beyond the noise of a
        // saturated sample).
        for w in result.points.windows(2) {
            assert!(
                w[1].amount_mmol_per_g > w[0].amount_mmol_per_g * 0.999,
                "{sample}: {w:?}"
            );
        }
    }
    rig.driver.shutdown().await;
    rig.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_land_within_tolerance_embedded_broker() {
    points_land_within_tolerance(Kind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_land_within_tolerance_mosquitto() {
    points_land_within_tolerance(Kind::Mosquitto).await;
}

/// A bridge whose dosing is broken reports a point far above its target (the 0.229 bar for
/// 0.05 bar of issue 13): the driver refuses it, says why, and aborts the measurement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_outside_the_tolerance_fails_the_step_with_the_reason() {
    let rig = rig(Kind::Embedded, false).await.expect("embedded broker");
    rig.sim.set_overdosing(true);
    let (ctx, mut rx) = rig.ctx("ref-13X-overdosed");
    let err = tokio::time::timeout(
        DEADLINE,
        rig.driver
            .execute(&isotherm(&[0.05, 0.1, 0.15], 3600.0), ctx),
    )
    .await
    .expect("finishes")
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DeviceError::Fault(_)), "{err:?}");
    for part in [
        "point 1/3 refused",
        "target 0.05 bar",
        "±0.0050 bar",
        "above",
    ] {
        assert!(text.contains(part), "{part:?} missing from {text}");
    }
    assert!(
        drain_points(&mut rx).is_empty(),
        "the refused point was not passed on"
    );
    wait_for("the instrument to be idle", || async { !rig.sim.is_busy() }).await;
    rig.sim.shutdown().await;
}

/// Equilibrium is judged in physical time: at 100 000× (a 3600 s point in 36 ms of wall
/// time) isotherms succeed exactly as at 2000×; the time scale changes the wall time only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_time_scale_changes_the_wall_time_only() {
    let rig = rig_at(Kind::Embedded, false, 100_000.0)
        .await
        .expect("embedded broker");
    let targets = [0.05, 0.1, 0.15, 0.4, 1.0];
    for k in 0..8 {
        let sample = ["ref-13X-fast", "ref-MOF-74-fast", "ref-HKUST-1-fast"][k % 3];
        let (ctx, _rx) = rig.ctx(&format!("{sample}-{k}"));
        let out = tokio::time::timeout(
            DEADLINE,
            rig.driver.execute(&isotherm(&targets, 3600.0), ctx),
        )
        .await
        .expect("isotherm finishes")
        .unwrap_or_else(|e| panic!("isotherm {k} at 100 000×: {e}"));
        let Some(result) = (out).decode::<ppu_drivers::analyser::schema::IsothermResult>() else {
            panic!("{out:?}")
        };
        assert_within_tolerance(&targets, &result);
        for p in &result.points {
            assert!(p.equilibration_time_s < 3600.0, "{p:?}");
        }
    }
    rig.driver.shutdown().await;
    rig.sim.shutdown().await;
}

/// Files the synthesis of the campaign's sorbent (ppu-bench's campaign experiment) for
/// `sample` in the world: 0.04 mL each of reagents A and B, calcined 25 → 350 °C at
/// 20 °C/min, held 30 min, cooled to 60 °C, degassed at 250 °C for 2 h.
fn synthesise(world: &World, sample: &str) {
    world.record_dispense(sample, "A", 0.04);
    world.record_dispense(sample, "B", 0.04);
    world.place(sample, "furnace-1");
    let (ramp_up, hold, ramp_down) = (975.0, 1800.0, 870.0);
    let mut t = 0.0;
    while t <= ramp_up + hold + ramp_down {
        let c = if t < ramp_up {
            25.0 + 20.0 * t / 60.0
        } else if t < ramp_up + hold {
            350.0
        } else {
            350.0 - 20.0 * (t - ramp_up - hold) / 60.0
        };
        world.record_temperature("furnace-1", t, c);
        t += 5.0;
    }
    world.record_degas(sample, 250.0, 7200.0);
}

/// The outcome of an isotherm is the physics', never the wall clock's: the same synthesised
/// sample measured at 1,000× and at 1,000,000× (a 3600 s point in 3.6 ms of wall time) gives
/// the same points — the same pressures, amounts and equilibration times, bit for bit. Only
/// the wall time differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_scale_changes_the_wall_time_never_the_points() {
    let targets = [0.01, 0.05, 0.15, 1.0];
    let mut outcomes = Vec::new();
    for scale in [1_000.0, 1_000_000.0] {
        let rig = rig_at(Kind::Embedded, false, scale)
            .await
            .expect("embedded broker");
        synthesise(&rig.world, "C-0001");
        let (ctx, _rx) = rig.ctx("C-0001");
        let out = tokio::time::timeout(
            DEADLINE,
            rig.driver.execute(&isotherm(&targets, 3600.0), ctx),
        )
        .await
        .expect("isotherm finishes")
        .unwrap_or_else(|e| panic!("isotherm at {scale}×: {e}"));
        let Some(result) = (out).decode::<ppu_drivers::analyser::schema::IsothermResult>() else {
            panic!("{out:?}")
        };
        assert_within_tolerance(&targets, &result);
        outcomes.push(result.points);
        rig.driver.shutdown().await;
        rig.sim.shutdown().await;
    }
    assert_eq!(outcomes[0], outcomes[1], "1,000× against 1,000,000×");
}

async fn broker_restart_mid_isotherm(kind: Kind) {
    let Some(rig) = rig(kind, true).await else {
        return;
    };
    rig.world.set_material("S-restart", Material::mg_mof_74());
    let (ctx, mut rx) = rig.ctx("S-restart");
    let step = isotherm(&PRESSURES, 3600.0);
    let run = rig.driver.execute(&step, ctx);
    tokio::pin!(run);
    // Let a few points through, then take the broker away and bring it back.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while seen.len() < 3 {
        tokio::select! {
            out = &mut run => panic!("isotherm ended before the outage: {out:?}"),
            Some(u) = rx.recv() => if let Some(p) = point_of(&u) { seen.push(p); },
            _ = tokio::time::sleep_until(deadline) => panic!("no points before the outage"),
        }
    }
    rig.broker.stop().await;
    // Keep driving the step while the broker is down, until the driver has noticed.
    let noticed = async {
        wait_for("the driver to notice the outage", || async {
            rig.driver.status().await.is_err()
        })
        .await;
    };
    tokio::select! {
        out = &mut run => panic!("isotherm ended during the outage: {out:?}"),
        () = noticed => {}
    }
    rig.broker.start_again().await;
    let out = tokio::time::timeout(DEADLINE, &mut run)
        .await
        .expect("the measurement ends without hanging");
    match out.map(|o| o.decode::<IsothermResult>()) {
        Ok(Some(result)) => {
            seen.extend(drain_points(&mut rx));
            assert_in_order(&seen, &result);
            assert_on_isotherm(&Material::mg_mof_74(), &result);
            // The replay after the outage reused the request id: nothing was measured twice.
            assert_eq!(
                rig.sim.operations_started(),
                2,
                "free space + isotherm, each once"
            );
        }
        Err(e) => {
            // Allowed by the contract, but only with a reason that says what happened.
            let text = e.to_string();
            assert!(
                text.contains("broker") || text.contains("bridge"),
                "unclear failure: {text}"
            );
            panic!("measurement failed after a short outage: {text}");
        }
        Ok(other) => panic!("{other:?}"),
    }
    rig.driver.shutdown().await;
    rig.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_isotherm_embedded_broker() {
    broker_restart_mid_isotherm(Kind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_isotherm_mosquitto() {
    broker_restart_mid_isotherm(Kind::Mosquitto).await;
}

async fn bridge_offline(kind: Kind) {
    let Some(rig) = rig(kind, false).await else {
        return;
    };
    assert!(rig.driver.status().await.is_ok());
    rig.sim.go_offline();
    let started = tokio::time::Instant::now();
    // The will fires when the broker loses the bridge: the device is disconnected well
    // within the keep-alive time.
    loop {
        match rig.driver.status().await {
            Err(DeviceError::Disconnected(reason)) => {
                assert!(reason.contains("offline"), "{reason}");
                break;
            }
            other => assert!(
                started.elapsed() < KEEP_ALIVE,
                "still {other:?} after the keep-alive time"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(
        rig.driver.bridge(),
        BridgeLiveness::Offline { .. }
    ));
    // Commands are refused while it is away, with the reason.
    let (ctx, _rx) = rig.ctx("S");
    let err = rig
        .driver
        .execute(&isotherm(&[0.1], 600.0), ctx)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DeviceError::Disconnected(r) if r.contains("offline")),
        "{err:?}"
    );
    rig.sim.come_online();
    rig.wait_online().await;
    rig.driver.shutdown().await;
    rig.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_offline_embedded_broker() {
    bridge_offline(Kind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_offline_mosquitto() {
    bridge_offline(Kind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_that_never_equilibrates_times_out_with_a_clear_reason() {
    let rig = rig(Kind::Embedded, false).await.expect("embedded broker");
    rig.sim.set_never_equilibrates(true);
    let (ctx, _rx) = rig.ctx("ref-HKUST-1");
    let err = tokio::time::timeout(
        DEADLINE,
        rig.driver.execute(&isotherm(&[0.1, 0.2], 600.0), ctx),
    )
    .await
    .expect("the driver gives up by itself")
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DeviceError::Fault(_)), "{err:?}");
    assert!(
        text.contains("point 1/2") && text.contains("did not equilibrate"),
        "{text}"
    );
    // The driver aborted the stuck measurement.
    wait_for("the instrument to be idle", || async { !rig.sim.is_busy() }).await;
    rig.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leak_fails_the_point_with_the_bridges_reason() {
    let rig = rig(Kind::Embedded, false).await.expect("embedded broker");
    rig.sim.set_leak(1e-4);
    let (ctx, _rx) = rig.ctx("ref-13X-leak");
    let err = tokio::time::timeout(
        DEADLINE,
        rig.driver.execute(&isotherm(&[0.05, 0.1], 900.0), ctx),
    )
    .await
    .expect("finishes")
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("did not equilibrate") && text.contains("leak suspected"),
        "{text}"
    );
    rig.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_counted_and_a_persistent_offender_is_marked_faulty() {
    let rig = rig(Kind::Embedded, false).await.expect("embedded broker");
    // A couple of bad messages: logged, counted, ignored.
    assert!(rig.sim.publish_raw("telemetry", b"{oops"));
    assert!(
        rig.sim
            .publish_raw("result", br#"{"schema":1,"kind":"point"}"#)
    );
    wait_for("two malformed payloads counted", || async {
        rig.driver.malformed_count() >= 2
    })
    .await;
    let status = rig.driver.status().await.expect("still usable");
    assert!(
        !status.alarms.iter().any(|a| a == FAULTY_ALARM),
        "{status:?}"
    );
    let count = status
        .readings
        .iter()
        .find(|r| r.name == "malformed_payloads")
        .expect("counted");
    assert!(count.value >= 2.0);
    // A bridge that keeps sending garbage is marked faulty and refuses work.
    rig.sim.set_malformed_telemetry(true);
    wait_for("the device marked faulty", || async {
        rig.driver.faulty().is_some()
    })
    .await;
    let status = rig.driver.status().await.expect("status still answers");
    assert!(
        status.alarms.iter().any(|a| a == FAULTY_ALARM),
        "{status:?}"
    );
    let (ctx, _rx) = rig.ctx("S");
    let err = rig
        .driver
        .execute(&isotherm(&[0.1], 600.0), ctx)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DeviceError::Fault(r) if r.contains("faulty")),
        "{err:?}"
    );
    // A restarted bridge is trusted again.
    rig.sim.set_malformed_telemetry(false);
    rig.sim.go_offline();
    wait_for("offline", || async { rig.driver.status().await.is_err() }).await;
    rig.sim.come_online();
    rig.wait_online().await;
    assert!(rig.driver.faulty().is_none());
    rig.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_aborts_the_measurement_on_the_instrument() {
    let rig = rig(Kind::Embedded, false).await.expect("embedded broker");
    let (ctx, mut rx) = rig.ctx("ref-13X-2");
    let cancel = ctx.cancel.clone();
    let step = isotherm(&PRESSURES, 3600.0);
    let run = rig.driver.execute(&step, ctx);
    tokio::pin!(run);
    loop {
        tokio::select! {
            out = &mut run => panic!("ended early: {out:?}"),
            Some(u) = rx.recv() => if point_of(&u).is_some() { break },
        }
    }
    cancel.cancel();
    let out = tokio::time::timeout(DEADLINE, run).await.expect("stops");
    assert_eq!(out.unwrap_err(), DeviceError::Aborted);
    wait_for("the instrument to be idle", || async { !rig.sim.is_busy() }).await;
    // Safe state is an abort too, and idempotent.
    rig.driver.safe_state().await.expect("abort acknowledged");
    rig.driver
        .safe_state()
        .await
        .expect("abort acknowledged again");
    rig.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_results_are_replayed_by_request_id_without_measuring_twice() {
    let rig = rig(Kind::Embedded, false).await.expect("embedded broker");
    let (ctx, mut rx) = rig.ctx("ref-13X-lost");
    let step = isotherm(&PRESSURES, 3600.0);
    let run = rig.driver.execute(&step, ctx);
    tokio::pin!(run);
    // Let two points through, then lose the next two results in transit.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        tokio::select! {
            out = &mut run => panic!("ended early: {out:?}"),
            Some(u) = rx.recv() => if let Some(p) = point_of(&u) { seen.push(p); },
        }
    }
    rig.sim.drop_next_results(2);
    let out = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("finishes")
        .expect("the gap is filled by a replay");
    let Some(result) = (out).decode::<ppu_drivers::analyser::schema::IsothermResult>() else {
        panic!("{out:?}")
    };
    seen.extend(drain_points(&mut rx));
    assert_in_order(&seen, &result);
    assert!(rig.sim.commands_received() >= 3, "the command was repeated");
    assert_eq!(
        rig.sim.operations_started(),
        2,
        "free space + isotherm, each once"
    );
    rig.sim.shutdown().await;
}

// --- No retained status: the driver asks the bridge -------------------------------------

/// A plain MQTT client of the rig's broker, subscribed to `topic` under the bridge's base.
async fn probe(
    rig: &Rig,
    topic: &str,
) -> (
    MqttTransport,
    tokio::sync::broadcast::Receiver<ppu_drivers::transport::mqtt::Message>,
    String,
) {
    let topic = format!("{}/{topic}", rig.sim.base_topic());
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let mut config = MqttConfig::new(rig.url.clone(), format!("probe-{}-{n}", std::process::id()));
    config.clean_session = true;
    let probe = MqttTransport::start(config, vec![topic.clone()]).expect("probe configuration");
    let rx = probe.messages();
    probe
        .wait_connected(DEADLINE)
        .await
        .expect("probe connects");
    (probe, rx, topic)
}

/// Waits for a message on `topic` whose payload `accept`s.
async fn next_on(
    rx: &mut tokio::sync::broadcast::Receiver<ppu_drivers::transport::mqtt::Message>,
    topic: &str,
    what: &str,
    accept: impl Fn(&[u8]) -> bool,
) {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let m = rx.recv().await.expect("probe receives");
            if m.topic == topic && accept(&m.payload) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// Deletes the bridge's retained status (an empty retained publish) and returns once the
/// broker has forwarded that publish, i.e. processed it. The bridge stays connected and idle,
/// so it publishes no new status.
async fn clear_retained_status(rig: &Rig) {
    let (probe, mut rx, topic) = probe(rig, "status").await;
    probe
        .publish(&topic, Vec::new(), Qos::AtLeastOnce, true)
        .expect("clearing publish queued");
    next_on(&mut rx, &topic, "the clearing publish", <[u8]>::is_empty).await;
    probe.shutdown().await;
}

async fn no_retained_status(kind: Kind) {
    let Some(rig) = rig(kind, false).await else {
        return;
    };
    clear_retained_status(&rig).await;
    let pid = std::process::id();
    // A fresh driver: its broker has no retained status to deliver.
    let asked = rig.sim.commands_received();
    let fresh = driver(
        &rig.url,
        &rig.prefix,
        format!("ppud-fresh-{pid}-{}", NEXT.fetch_add(1, Ordering::SeqCst)),
    );
    let status = fresh.status().await.expect("ready by asking the bridge");
    assert!(!status.active, "{status:?}");
    assert!(
        matches!(fresh.bridge(), BridgeLiveness::Online { instrument, .. } if !instrument.is_empty()),
        "{:?}",
        fresh.bridge()
    );
    assert!(
        rig.sim.commands_received() > asked,
        "the driver sent the bridge a status command"
    );
    // A command path that starts without a status (safe state at start-up) asks as well.
    let asked = rig.sim.commands_received();
    let other = driver(
        &rig.url,
        &rig.prefix,
        format!("ppud-other-{pid}-{}", NEXT.fetch_add(1, Ordering::SeqCst)),
    );
    other.safe_state().await.expect("abort acknowledged");
    assert!(
        rig.sim.commands_received() >= asked + 2,
        "a status command, then the abort"
    );
    fresh.shutdown().await;
    other.shutdown().await;
    rig.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_retained_status_the_driver_asks_the_bridge_embedded_broker() {
    no_retained_status(Kind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_retained_status_the_driver_asks_the_bridge_mosquitto() {
    no_retained_status(Kind::Mosquitto).await;
}

/// What a SIGKILLed ppud meets on restart: the same client id resumes its persistent session,
/// and rumqttd does not deliver retained messages to a resumed session (bytebeamio/rumqtt#1069).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_on_rumqttd_becomes_ready() {
    let rig = rig(Kind::Embedded, false).await.expect("embedded broker");
    let client_id = format!("ppud-resumed-{}", std::process::id());
    let (probe, mut controller, topic) = probe(&rig, "controller").await;
    let first = driver(&rig.url, &rig.prefix, client_id.clone());
    first.status().await.expect("the first session is ready");
    // The client vanishes without a DISCONNECT; the broker keeps its session and publishes
    // its will.
    drop(first);
    next_on(&mut controller, &topic, "the first session's will", |p| {
        String::from_utf8_lossy(p).contains("offline")
    })
    .await;
    probe.shutdown().await;
    let second = driver(&rig.url, &rig.prefix, client_id);
    let status = second.status().await.expect("ready on the resumed session");
    assert!(!status.active, "{status:?}");
    assert!(matches!(second.bridge(), BridgeLiveness::Online { .. }));
    second.shutdown().await;
    rig.sim.shutdown().await;
}
