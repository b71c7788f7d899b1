//! Crash recovery of the real `ppud` binary: SIGKILL mid-run, restart on the same data dir.
//!
//! This test lives in the daemon package (not tests/) because only here does Cargo hand us the
//! freshly built `ppud` binary (`CARGO_BIN_EXE_ppud`).
//!
//! Kill points: mid-run under `ppud dev`; during a submission; during a furnace hold under each
//! furnace policy; during a dispense (under `on_restart = "interrupt"` and `"resume"`, plus a
//! graceful shutdown under `"resume"`); during an isotherm. For every device kill point the
//! simulated device runs in *this* process behind its real wire protocol — the Eurotherm on a
//! Modbus TCP socket, the NE-1000 pumps and the MT-SICS balance on ptys, the analyser bridge as
//! its own client of an MQTT broker (Mosquitto — the one named by `PPU_TEST_MOSQUITTO`, or a
//! process of the test's own — and the embedded rumqttd) — and `ppud serve --config` drives it, so the device outlives the
//! killed daemon exactly as hardware would, and the simulator's state tells what recovery did.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use pb::event::Kind;
use pb::event_service_client::EventServiceClient;
use pb::experiment_service_client::ExperimentServiceClient;
use ppu_daemon::dev::{DEV_REAGENTS, dev_station_spec, station_config};
use ppu_drivers::Clock;
use ppu_drivers::transport::mqtt::BrokerUrl;
use ppu_proto::v1 as pb;
use ppu_sim::analyser::{SimAnalyser, SimAnalyserConfig};
use ppu_sim::broker::{EmbeddedBroker, MosquittoForTest, mosquitto_for_test, mosquitto_required};
use ppu_sim::dispenser::SimStation;
use ppu_sim::furnace::{FurnaceConfig, SimFurnace};
use ppu_sim::modbus::{ServerHandle, serve_tcp};
use ppu_sim::world::World;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(60);
/// Physical seconds per real second for the furnace-hold tests (daemon and simulator alike).
const HOLD_TIME_SCALE: f64 = 600.0;
/// Target SP register (2) values, 1 decimal place.
const SAFE_RAW: u16 = 250;
const HOLD_RAW: u16 = 1500;

/// Starts `ppud ARGS…` and returns it with its gRPC endpoint, once it listens. Its log filter
/// is `PPU_CRASH_RUST_LOG` (default `warn`), for debugging a failure.
async fn spawn(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ppud"))
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("PPU_CRASH_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ppud");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(a) = line.strip_prefix("listening on ") {
                return a.trim().to_owned();
            }
        }
        panic!("ppud exited before listening");
    })
    .await
    .expect("ppud listens within the deadline");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("http://{addr}"))
}

/// Starts `ppud dev` (one furnace) on a free port.
async fn spawn_ppud(data_dir: &Path) -> (Child, String) {
    let dir = data_dir.to_str().expect("utf-8 path");
    spawn(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--sila-listen",
        "127.0.0.1:0",
        "--time-scale",
        "100",
        "--furnaces",
        "1",
        "--analysers",
        "0",
        "--transfer-delay-ms",
        "20",
        "--data-dir",
        dir,
    ])
    .await
}

/// The access table every config written here carries: these tests are about recovery, not
/// about who may call the API.
const AUTH: &str = "\n[auth]\nopen = true\n";

/// Writes a `ppud serve` config for `data_dir` (its store inside it) with the given time
/// scale, recovery policy and `[[devices]]` tables, and starts the daemon on it.
async fn spawn_serve(
    data_dir: &Path,
    time_scale: f64,
    on_restart: &str,
    furnace_policy: &str,
    devices: &str,
) -> (Child, String) {
    let config = data_dir.join("ppud.toml");
    let text = format!(
        r#"listen = "127.0.0.1:0"
data_dir = "{}"
time_scale = {time_scale:?}

[poll]
interval_ms = 100
reading_log_interval_s = 1.0

[recovery]
on_restart = "{on_restart}"
furnace = "{furnace_policy}"
{AUTH}
{devices}"#,
        data_dir.join("store").display()
    );
    std::fs::write(&config, text).expect("write config");
    spawn(&["serve", "--config", config.to_str().expect("utf-8 path")]).await
}

/// The `[[devices]]` table of a Eurotherm at `furnace`.
fn furnace_devices(furnace: SocketAddr) -> String {
    format!(
        r#"[[devices]]
driver = "eurotherm"
id = "furnace-1"
endpoint = "modbus-tcp://{furnace}"

[devices.limits]
max_temperature_c = 1100.0
max_rate_c_per_min = 20.0
"#
    )
}

/// A furnace simulated in this process, surviving every daemon kill.
async fn outside_furnace() -> (SimFurnace, ServerHandle) {
    let sim = SimFurnace::new(FurnaceConfig::default(), Clock::new(HOLD_TIME_SCALE));
    let server = serve_tcp(SocketAddr::from(([127, 0, 0, 1], 0)), sim.clone())
        .await
        .expect("simulated furnace");
    (sim, server)
}

fn target_raw(sim: &SimFurnace) -> u16 {
    sim.read_registers(2, 1).expect("target SP register")[0]
}

fn furnace(name: &str, segments: Vec<pb::furnace_segment::Kind>) -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: name.into(),
        steps: vec![pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
                segments: segments
                    .into_iter()
                    .map(|k| pb::FurnaceSegment { kind: Some(k) })
                    .collect(),
            })),
        }],
        ..Default::default()
    }
}

fn ramp(temperature_c: f64, rate_c_per_min: f64) -> pb::furnace_segment::Kind {
    pb::furnace_segment::Kind::Ramp(pb::Ramp {
        temperature_c,
        rate_c_per_min,
    })
}

fn hold(duration_s: f64) -> pb::furnace_segment::Kind {
    pb::furnace_segment::Kind::Hold(pb::Hold { duration_s })
}

async fn read_until(
    s: &mut tonic::Streaming<pb::Event>,
    out: &mut Vec<pb::Event>,
    done: impl Fn(&[pb::Event]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !done(out) {
        match tokio::time::timeout_at(deadline, s.message()).await {
            Ok(Ok(Some(e))) => out.push(e),
            other => panic!("event stream stopped after {} events: {other:?}", out.len()),
        }
    }
}

async fn stream_all(endpoint: &str) -> tonic::Streaming<pb::Event> {
    EventServiceClient::connect(endpoint.to_owned())
        .await
        .unwrap()
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
}

fn holding(ev: &[pb::Event], id: &str) -> bool {
    ev.iter().any(|e| {
        e.experiment_id == id
            && matches!(&e.kind, Some(Kind::StepProgress(p)) if p.message.contains("hold"))
    })
}

fn decision<'a>(ev: &'a [pb::Event], action: &str) -> Option<&'a pb::Event> {
    ev.iter()
        .find(|e| matches!(&e.kind, Some(Kind::RecoveryDecision(d)) if d.action == action))
}

fn terminal(ev: &[pb::Event], id: &str) -> Option<i32> {
    ev.iter().rev().find_map(|e| match &e.kind {
        Some(Kind::ExperimentStateChanged(c))
            if e.experiment_id == id
                && c.to != pb::ExperimentState::Queued as i32
                && c.to != pb::ExperimentState::Running as i32 =>
        {
            Some(c.to)
        }
        _ => None,
    })
}

/// The log after a restart: gapless from 1, continuing past what was seen before the kill,
/// with everything seen before unchanged.
fn assert_log_continues(before: &[pb::Event], after: &[pb::Event]) {
    let seqs: Vec<u64> = after.iter().map(|e| e.sequence).collect();
    assert_eq!(
        seqs,
        (1..=*seqs.last().unwrap()).collect::<Vec<_>>(),
        "log has no gap across the crash"
    );
    assert!(
        *seqs.last().unwrap() > before.last().unwrap().sequence,
        "sequences continue after the last one seen"
    );
    assert_eq!(
        &after[..before.len()],
        before,
        "the log before the kill is unchanged"
    );
}

async fn listed_ids(endpoint: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token = String::new();
    let mut exps = ExperimentServiceClient::connect(endpoint.to_owned())
        .await
        .unwrap();
    loop {
        let page = exps
            .list_experiments(pb::ListExperimentsRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.experiments.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_nothing_and_marks_the_running_experiment_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, endpoint) = spawn_ppud(dir.path()).await;
    let mut exps = ExperimentServiceClient::connect(endpoint.clone())
        .await
        .unwrap();
    let long = furnace("long", vec![ramp(150.0, 20.0), hold(36_000.0)]);
    let short = furnace(
        "short",
        vec![pb::furnace_segment::Kind::Step(pb::StepTo {
            temperature_c: 60.0,
        })],
    );
    let ids = exps
        .submit_batch(pb::SubmitBatchRequest {
            idempotency_key: "crash".into(),
            experiments: vec![long, short],
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .experiment_ids;

    let mut before = Vec::new();
    let mut s = stream_all(&endpoint).await;
    read_until(&mut s, &mut before, |ev| holding(ev, &ids[0])).await;
    child.kill().await.expect("SIGKILL");

    let (mut child, endpoint) = spawn_ppud(dir.path()).await;
    let mut exps = ExperimentServiceClient::connect(endpoint.clone())
        .await
        .unwrap();
    let listed = exps
        .list_experiments(pb::ListExperimentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .experiments;
    assert_eq!(
        listed.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        ids,
        "every accepted experiment survives"
    );
    let long = &listed[0];
    assert_eq!(
        long.state,
        pb::ExperimentState::Interrupted as i32,
        "{long:?}"
    );
    assert!(long.message.contains("daemon stopped"), "{}", long.message);

    let mut after = Vec::new();
    let mut s = stream_all(&endpoint).await;
    read_until(&mut s, &mut after, |ev| {
        ev.iter().any(|e| {
            e.experiment_id == ids[0]
                && matches!(&e.kind, Some(Kind::ExperimentStateChanged(c)) if c.to == pb::ExperimentState::Interrupted as i32)
        })
    })
    .await;
    assert!(decision(&after, "furnace_safe_state").is_some());
    assert!(decision(&after, "interrupted").is_some());
    assert_log_continues(&before, &after);
    child.kill().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_submissions_keeps_every_acknowledged_batch_and_no_partial_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, endpoint) = spawn_ppud(dir.path()).await;
    let mut s = stream_all(&endpoint).await;
    // Nothing runs: only submission is under test.
    pb::queue_service_client::QueueServiceClient::connect(endpoint.clone())
        .await
        .unwrap()
        .pause_queue(pb::PauseQueueRequest::default())
        .await
        .unwrap();
    fn batch(k: usize) -> pb::SubmitBatchRequest {
        pb::SubmitBatchRequest {
            idempotency_key: format!("sub-{k}"),
            experiments: (0..25)
                .map(|i| furnace(&format!("s{i}"), vec![ramp(100.0, 10.0)]))
                .collect(),
        }
    }
    // Four submitters in a loop; the kill lands while some submissions are in flight.
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut submitters = Vec::new();
    for w in 0..4 {
        let (endpoint, acked_tx) = (endpoint.clone(), acked_tx.clone());
        submitters.push(tokio::spawn(async move {
            let Ok(mut exps) = ExperimentServiceClient::connect(endpoint).await else {
                return;
            };
            for n in 0.. {
                let k = w * 1000 + n;
                match exps.submit_batch(batch(k)).await {
                    Ok(r) => {
                        let _ = acked_tx.send((k, r.into_inner().batch.unwrap()));
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    drop(acked_tx);
    let mut acked = Vec::new();
    while acked.len() < 12 {
        acked.push(acked_rx.recv().await.expect("submissions acknowledged"));
    }
    child.kill().await.expect("SIGKILL");
    for t in submitters {
        let _ = t.await;
    }
    while let Ok(a) = acked_rx.try_recv() {
        acked.push(a);
    }
    let mut before = Vec::new();
    while let Ok(Ok(Some(e))) = tokio::time::timeout(Duration::from_millis(200), s.message()).await
    {
        before.push(e);
    }

    let (mut child, endpoint) = spawn_ppud(dir.path()).await;
    let listed = listed_ids(&endpoint).await;
    for (_, b) in &acked {
        for id in &b.experiment_ids {
            assert!(listed.contains(id), "acknowledged experiment {id} lost");
        }
    }
    // Every key either committed whole or not at all; a retry with the same key tells which.
    let mut exps = ExperimentServiceClient::connect(endpoint.clone())
        .await
        .unwrap();
    let max_key = acked.iter().map(|(k, _)| *k).max().unwrap_or(0);
    let mut stored = 0;
    for w in 0..4 {
        for n in 0..=(max_key % 1000) + 2 {
            let k = w * 1000 + n;
            let r = exps.submit_batch(batch(k)).await.unwrap().into_inner();
            let b = r.batch.unwrap();
            if r.duplicate {
                stored += b.experiment_ids.len();
                if let Some((_, a)) = acked.iter().find(|(ak, _)| *ak == k) {
                    assert_eq!(&b, a, "a retried key returns the acknowledged batch");
                }
            } else {
                assert!(
                    acked.iter().all(|(ak, _)| *ak != k),
                    "acknowledged key {k} was not stored"
                );
            }
        }
    }
    assert_eq!(stored, listed.len(), "no experiment outside a whole batch");
    let mut after = Vec::new();
    let mut s = stream_all(&endpoint).await;
    let last = before.last().map_or(0, |e| e.sequence);
    read_until(&mut s, &mut after, |ev| {
        ev.last().is_some_and(|e| e.sequence > last)
    })
    .await;
    if !before.is_empty() {
        assert_log_continues(&before, &after);
    }
    child.kill().await.ok();
}

/// Runs a furnace program into its hold, kills the daemon, and restarts it under `policy`.
/// Returns the experiment id, the events seen before the kill and the restarted daemon.
async fn kill_during_hold(
    dir: &Path,
    sim: &SimFurnace,
    furnace_addr: SocketAddr,
    on_restart: &str,
    policy: &str,
) -> (String, Vec<pb::Event>, Child, String) {
    let devices = furnace_devices(furnace_addr);
    let (mut child, endpoint) =
        spawn_serve(dir, HOLD_TIME_SCALE, on_restart, policy, &devices).await;
    let mut exps = ExperimentServiceClient::connect(endpoint.clone())
        .await
        .unwrap();
    let id = exps
        .submit_batch(pb::SubmitBatchRequest {
            idempotency_key: "hold".into(),
            experiments: vec![furnace("calcine", vec![ramp(150.0, 20.0), hold(3000.0)])],
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .experiment_ids[0]
        .clone();
    let mut before = Vec::new();
    let mut s = stream_all(&endpoint).await;
    read_until(&mut s, &mut before, |ev| holding(ev, &id)).await;
    child.kill().await.expect("SIGKILL");
    // The controller holds its last setpoint on its own: the furnace is still hot.
    assert_eq!(
        target_raw(sim),
        HOLD_RAW,
        "furnace left heating by the killed daemon"
    );
    let (child, endpoint) = spawn_serve(dir, HOLD_TIME_SCALE, on_restart, policy, &devices).await;
    (id, before, child, endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_furnace_hold_under_furnace_safe_makes_the_furnace_safe() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, server) = outside_furnace().await;
    let (id, before, mut child, endpoint) =
        kill_during_hold(dir.path(), &sim, server.local_addr(), "interrupt", "safe").await;
    // Recovery ran before the daemon listened.
    assert_eq!(
        target_raw(&sim),
        SAFE_RAW,
        "recovery drove the furnace to its safe state"
    );
    assert_eq!(sim.read_registers(35, 1).unwrap()[0], 0, "rate limit off");
    assert_eq!(
        listed_ids(&endpoint).await,
        std::slice::from_ref(&id),
        "no accepted experiment lost"
    );
    let mut after = Vec::new();
    let mut s = stream_all(&endpoint).await;
    read_until(&mut s, &mut after, |ev| terminal(ev, &id).is_some()).await;
    assert_eq!(
        terminal(&after, &id),
        Some(pb::ExperimentState::Interrupted as i32)
    );
    let d = decision(&after, "furnace_safe_state").expect("recovery decision logged");
    assert_eq!(d.device_id, "furnace-1");
    assert_eq!(d.experiment_id, id);
    let Some(Kind::RecoveryDecision(rd)) = &d.kind else {
        unreachable!()
    };
    assert!(rd.detail.contains("furnace = safe"), "{}", rd.detail);
    assert!(decision(&after, "interrupted").is_some());
    assert_log_continues(&before, &after);
    child.kill().await.ok();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_furnace_hold_under_furnace_adopt_finishes_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, server) = outside_furnace().await;
    let (id, before, mut child, endpoint) =
        kill_during_hold(dir.path(), &sim, server.local_addr(), "interrupt", "adopt").await;
    let mut after = Vec::new();
    let mut s = stream_all(&endpoint).await;
    read_until(&mut s, &mut after, |ev| {
        decision(ev, "furnace_adopted").is_some()
    })
    .await;
    // Adopted: the program keeps its setpoint instead of being cut short.
    assert_eq!(
        target_raw(&sim),
        HOLD_RAW,
        "the adopted program still holds"
    );
    assert_eq!(
        listed_ids(&endpoint).await,
        std::slice::from_ref(&id),
        "no accepted experiment lost"
    );
    read_until(&mut s, &mut after, |ev| terminal(ev, &id).is_some()).await;
    assert_eq!(
        terminal(&after, &id),
        Some(pb::ExperimentState::Succeeded as i32)
    );
    assert!(decision(&after, "furnace_safe_state").is_none());
    let e = ExperimentServiceClient::connect(endpoint.clone())
        .await
        .unwrap()
        .get_experiment(pb::GetExperimentRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::step_result::Result::Furnace(f)) = &e.results[0].result else {
        panic!("no furnace result: {e:?}")
    };
    // The adopted run's trace is on program time: it starts where the hold was, not at zero.
    assert!(
        f.trace.first().unwrap().t_s > 300.0,
        "{:?}",
        f.trace.first()
    );
    assert!(
        f.trace.last().unwrap().t_s >= 3000.0,
        "{:?}",
        f.trace.last()
    );
    // The program ended, so the furnace is safe again.
    assert_eq!(target_raw(&sim), SAFE_RAW);
    assert_log_continues(&before, &after);
    child.kill().await.ok();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_furnace_hold_under_on_restart_resume_reruns_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, server) = outside_furnace().await;
    let (id, before, mut child, endpoint) =
        kill_during_hold(dir.path(), &sim, server.local_addr(), "resume", "safe").await;
    let mut after = Vec::new();
    let mut s = stream_all(&endpoint).await;
    read_until(&mut s, &mut after, |ev| terminal(ev, &id).is_some()).await;
    assert!(decision(&after, "furnace_safe_state").is_some());
    assert!(decision(&after, "resumed").is_some());
    assert_eq!(
        terminal(&after, &id),
        Some(pb::ExperimentState::Succeeded as i32)
    );
    assert_eq!(target_raw(&sim), SAFE_RAW);
    assert_log_continues(&before, &after);
    child.kill().await.ok();
    server.shutdown().await;
}

/// Waits, with the test's deadline, until `cond` holds (it reads the simulator's state).
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn submit(endpoint: &str, key: &str, spec: pb::ExperimentSpec) -> String {
    ExperimentServiceClient::connect(endpoint.to_owned())
        .await
        .unwrap()
        .submit_batch(pb::SubmitBatchRequest {
            idempotency_key: key.into(),
            experiments: vec![spec],
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .experiment_ids[0]
        .clone()
}

fn detail(e: &pb::Event) -> &str {
    match &e.kind {
        Some(Kind::RecoveryDecision(d)) => &d.detail,
        _ => "",
    }
}

// --- Dispensing station --------------------------------------------------------------------

/// Physical seconds per real second for the dispense tests (daemon and simulator alike): the
/// 8 mL dispense at 2 mL/min takes 240 physical s, 24 real s, so it is still running long
/// after the daemon has restarted.
const DISPENSE_TIME_SCALE: f64 = 10.0;
const LONG_DISPENSE_ML: f64 = 8.0;
/// A follow-up dispense after the restart; the pump's delivery error scales it.
const SHORT_DISPENSE_ML: f64 = 0.5;

/// The dispensing station of `ppud dev` (pump-a with reagent A, pump-b with B, balance-1 under
/// both), simulated in this process on ptys, surviving every daemon kill.
async fn outside_station() -> SimStation {
    SimStation::start(dev_station_spec(None), Clock::new(DISPENSE_TIME_SCALE))
        .await
        .expect("simulated dispensing station")
}

/// True (after a notice) when this process cannot run the dispense kill points. The driver
/// opens serial ports with `TIOCEXCL`; a real port loses that flag when the last process
/// holding it closes it, but a simulated port stays open in the simulator, so after the daemon
/// goes away the flag stays and only root (`CAP_SYS_ADMIN`) may open the pty again. In CI
/// (`CI` set) this is a failure, not a skip.
fn cannot_reopen_ptys(test: &str) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|ids| ids.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if root {
        return false;
    }
    let why = "a pty a stopped daemon opened exclusively can only be reopened by root";
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    assert!(!ci, "{test} needs root: {why}");
    eprintln!("NOTICE: skipping {test}: {why}");
    true
}

fn pump_a(station: &SimStation) -> &ppu_sim::dispenser::RunningPump {
    station.pump("pump-a").expect("pump-a")
}

fn dispense(sample: &str, volume_ml: f64, rate_ml_per_min: f64) -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: format!("dispense {volume_ml} mL"),
        sample_id: sample.into(),
        steps: vec![pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Dispense(pb::Dispense {
                reagent: "A".into(),
                volume_ml,
                rate_ml_per_min,
            })),
        }],
        ..Default::default()
    }
}

/// The experiment's dispense has delivered something: the pump is pumping.
fn pumping(ev: &[pb::Event], id: &str) -> bool {
    ev.iter().any(|e| {
        e.experiment_id == id
            && e.device_id == "pump-a"
            && matches!(&e.kind, Some(Kind::StepProgress(p)) if p.fraction > 0.0)
    })
}

/// Starts the daemon on the station, submits a long dispense on pump-a and waits until the
/// pump is pumping. Returns the experiment id, the events seen and the daemon.
async fn start_long_dispense(
    dir: &Path,
    station: &SimStation,
    on_restart: &str,
) -> (String, Vec<pb::Event>, Child) {
    let devices = station_config(station);
    let (child, endpoint) =
        spawn_serve(dir, DISPENSE_TIME_SCALE, on_restart, "safe", &devices).await;
    let mut s = stream_all(&endpoint).await;
    let id = submit(&endpoint, "long", dispense("S-D", LONG_DISPENSE_ML, 2.0)).await;
    let mut before = Vec::new();
    read_until(&mut s, &mut before, |ev| pumping(ev, &id)).await;
    (id, before, child)
}

/// Kills the daemon mid-dispense, checks the pump runs on without it (basic mode has no
/// watchdog), and restarts the daemon under `on_restart`.
async fn kill_during_dispense(
    dir: &Path,
    station: &SimStation,
    on_restart: &str,
) -> (String, Vec<pb::Event>, Child, String) {
    let (id, before, mut child) = start_long_dispense(dir, station, on_restart).await;
    child.kill().await.expect("SIGKILL");
    assert!(
        pump_a(station).sim.snapshot().running,
        "the killed daemon left the pump pumping"
    );
    let devices = station_config(station);
    let (child, endpoint) =
        spawn_serve(dir, DISPENSE_TIME_SCALE, on_restart, "safe", &devices).await;
    (id, before, child, endpoint)
}

/// The pump is stopped short of the long dispense's volume, and stays stopped: the restarted
/// daemon polls it a few more times and the delivered volume does not grow. Returns it, mL.
async fn assert_pump_stopped(station: &SimStation) -> f64 {
    let pump = pump_a(station);
    let stopped = pump.sim.snapshot();
    assert!(!stopped.running, "recovery stopped the pump: {stopped:?}");
    assert!(
        stopped.delivered_ml > 0.0 && stopped.delivered_ml < LONG_DISPENSE_ML - 0.1,
        "the dispense was cut short: {stopped:?}"
    );
    let seen = pump.port.faults().requests();
    wait_for("three more status polls of pump-a", || {
        pump.port.faults().requests() >= seen + 3
    })
    .await;
    let later = pump.sim.snapshot();
    assert!(!later.running, "{later:?}");
    assert_eq!(
        later.delivered_ml, stopped.delivered_ml,
        "nothing more delivered"
    );
    stopped.delivered_ml
}

/// Under `on_restart = "resume"`, the cut-short dispense `id` is not run again: a short
/// dispense submitted now on the same pump succeeds (the dispatcher serves resumed RUNNING
/// experiments before queued ones, so a resumed dispense would have run first), and the pump
/// delivered exactly that one on top of `stopped_ml`.
async fn assert_not_rerun(endpoint: &str, station: &SimStation, id: &str, stopped_ml: f64) {
    let mut s = stream_all(endpoint).await;
    let next = submit(endpoint, "next", dispense("S-E", SHORT_DISPENSE_ML, 10.0)).await;
    let mut after = Vec::new();
    read_until(&mut s, &mut after, |ev| terminal(ev, &next).is_some()).await;
    assert_eq!(
        terminal(&after, &next),
        Some(pb::ExperimentState::Succeeded as i32),
        "the pump works after recovery"
    );
    assert_eq!(
        terminal(&after, id),
        Some(pb::ExperimentState::Interrupted as i32)
    );
    let recovered_at = after
        .iter()
        .position(|e| matches!(&e.kind, Some(Kind::RecoveryDecision(_))))
        .expect("recovery logged");
    assert!(
        !after[recovered_at..]
            .iter()
            .any(|e| e.experiment_id == id && matches!(&e.kind, Some(Kind::StepStarted(_)))),
        "the interrupted dispense never started again"
    );
    let pump = pump_a(station).sim.snapshot();
    assert!(!pump.running, "{pump:?}");
    let (_, _, density, error) = DEV_REAGENTS[0];
    let expected = SHORT_DISPENSE_ML * (1.0 + error);
    let added = pump.delivered_ml - stopped_ml;
    assert!(
        (added - expected).abs() < 0.01,
        "after recovery the pump delivered {added} mL, expected only the follow-up's {expected} mL ({} g)",
        expected * density
    );
    assert_eq!(
        listed_ids(endpoint).await,
        [id.to_owned(), next],
        "no accepted experiment lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_dispense_stops_the_pump_on_restart() {
    if cannot_reopen_ptys("sigkill_during_a_dispense_stops_the_pump_on_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let station = outside_station().await;
    let (id, before, mut child, endpoint) =
        kill_during_dispense(dir.path(), &station, "interrupt").await;
    // Recovery ran before the daemon listened.
    assert_pump_stopped(&station).await;
    assert_eq!(
        listed_ids(&endpoint).await,
        std::slice::from_ref(&id),
        "no accepted experiment lost"
    );
    let mut after = Vec::new();
    let mut s = stream_all(&endpoint).await;
    read_until(&mut s, &mut after, |ev| terminal(ev, &id).is_some()).await;
    assert_eq!(
        terminal(&after, &id),
        Some(pb::ExperimentState::Interrupted as i32)
    );
    let d = decision(&after, "pump_stopped").expect("recovery decision logged");
    assert_eq!(d.device_id, "pump-a");
    assert_eq!(d.experiment_id, id);
    // Recovery found the pump still pumping, and stopped it.
    assert!(detail(d).contains("device reports active"), "{}", detail(d));
    assert!(
        detail(d).contains("device sent to its safe state"),
        "{}",
        detail(d)
    );
    assert!(decision(&after, "interrupted").is_some());
    assert_log_continues(&before, &after);
    child.kill().await.ok();
    station.shutdown().await;
}

/// The RecoveryDecision that refused to resume `id`'s dispense.
fn assert_resume_refused(after: &[pb::Event], id: &str) {
    assert!(
        decision(after, "resumed").is_none(),
        "a dispense is never resumed"
    );
    let d = decision(after, "interrupted").expect("interrupted decision logged");
    assert_eq!(d.experiment_id, id);
    let text = detail(d);
    assert!(
        text.contains("on_restart = resume") && text.contains("cannot run again"),
        "{text}"
    );
    assert!(text.contains("dispense"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_dispense_under_on_restart_resume_does_not_dispense_again() {
    if cannot_reopen_ptys(
        "sigkill_during_a_dispense_under_on_restart_resume_does_not_dispense_again",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let station = outside_station().await;
    let (id, before, mut child, endpoint) =
        kill_during_dispense(dir.path(), &station, "resume").await;
    let stopped_ml = assert_pump_stopped(&station).await;
    let mut after = Vec::new();
    let mut s = stream_all(&endpoint).await;
    read_until(&mut s, &mut after, |ev| terminal(ev, &id).is_some()).await;
    assert!(decision(&after, "pump_stopped").is_some());
    assert_resume_refused(&after, &id);
    let e = ExperimentServiceClient::connect(endpoint.clone())
        .await
        .unwrap()
        .get_experiment(pb::GetExperimentRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.state, pb::ExperimentState::Interrupted as i32);
    assert!(e.message.contains("dispense"), "{}", e.message);
    assert_eq!(e.results.len(), 1, "{:?}", e.results);
    assert_eq!(e.results[0].outcome, pb::StepOutcome::Aborted as i32);
    assert_not_rerun(&endpoint, &station, &id, stopped_ml).await;
    assert_log_continues(&before, &after);
    child.kill().await.ok();
    station.shutdown().await;
}

/// SIGTERM: the daemon's graceful shutdown.
async fn terminate(child: &mut Child) {
    let pid = child.id().expect("ppud is running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
    let exit = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("ppud exits within the deadline")
        .expect("wait for ppud");
    assert!(exit.success(), "graceful shutdown exits cleanly: {exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_mid_dispense_under_on_restart_resume_does_not_dispense_again() {
    if cannot_reopen_ptys(
        "a_graceful_shutdown_mid_dispense_under_on_restart_resume_does_not_dispense_again",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let station = outside_station().await;
    let (id, before, mut child) = start_long_dispense(dir.path(), &station, "resume").await;
    terminate(&mut child).await;
    // The daemon stopped the pump on its way down.
    let stopped_ml = assert_pump_stopped_now(&station);
    let devices = station_config(&station);
    let (mut child, endpoint) =
        spawn_serve(dir.path(), DISPENSE_TIME_SCALE, "resume", "safe", &devices).await;
    let mut after = Vec::new();
    let mut s = stream_all(&endpoint).await;
    read_until(&mut s, &mut after, |ev| terminal(ev, &id).is_some()).await;
    assert_resume_refused(&after, &id);
    assert_not_rerun(&endpoint, &station, &id, stopped_ml).await;
    assert_log_continues(&before, &after);
    child.kill().await.ok();
    station.shutdown().await;
}

fn assert_pump_stopped_now(station: &SimStation) -> f64 {
    let p = pump_a(station).sim.snapshot();
    assert!(!p.running, "{p:?}");
    assert!(p.delivered_ml < LONG_DISPENSE_ML - 0.1, "{p:?}");
    p.delivered_ml
}

// --- Sorption analyser ---------------------------------------------------------------------

/// Physical seconds per real second for the isotherm test: its free-space measurement takes
/// 0.9 real s, each point at least 11 readings 60 physical s apart, 0.66 real s, so the
/// isotherm is still measuring long after the daemon has restarted.
const ISOTHERM_TIME_SCALE: f64 = 1000.0;

/// The MQTT broker of an isotherm test, outside the daemon.
enum OutsideBroker {
    /// Mosquitto: the shared one named by `PPU_TEST_MOSQUITTO` (as `.ci/run` provides) or a
    /// process of the test's own.
    Mosquitto(MosquittoForTest),
    /// The simulator's embedded rumqttd.
    Embedded(EmbeddedBroker),
}

impl OutsideBroker {
    fn url(&self) -> String {
        match self {
            OutsideBroker::Mosquitto(MosquittoForTest::Shared(url)) => url.clone(),
            OutsideBroker::Mosquitto(MosquittoForTest::Owned(m)) => m.url(),
            OutsideBroker::Mosquitto(MosquittoForTest::Unavailable(_)) => unreachable!(),
            OutsideBroker::Embedded(b) => b.url(),
        }
    }
}

/// The simulated analyser's bridge, its own client of the broker at `url`, with topics and
/// client ids of this test run only (a shared broker may serve other tests).
fn outside_analyser(url: &str, prefix: &str) -> Arc<SimAnalyser> {
    let url: BrokerUrl = url.parse().expect("broker url");
    let mut config = SimAnalyserConfig::new(url.host, url.port, "analyser-1");
    config.topic_prefix = prefix.to_owned();
    config.client_id = format!("ppu-sim-crash-{}", std::process::id());
    SimAnalyser::start(
        config,
        World::new(ppu_daemon::dev::WORLD_SEED),
        Clock::new(ISOTHERM_TIME_SCALE),
    )
}

fn analyser_devices(url: &str, prefix: &str) -> String {
    format!(
        r#"[[devices]]
driver = "sorption_mqtt"
id = "analyser-1"
broker = "{url}"
client_id = "ppud-crash-{}"
topic_prefix = "{prefix}"
reconnect_max_ms = 1000
"#,
        std::process::id()
    )
}

fn isotherm() -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: "isotherm".into(),
        sample_id: "S-I".into(),
        steps: vec![pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Isotherm(pb::Isotherm {
                adsorptive: "CO2".into(),
                temperature_c: 25.0,
                pressure_bar: vec![0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                equilibration_interval_s: 60.0,
                // The analyser now doses toward each target within its tolerance; at 60 s
                // between readings the first, low-pressure point takes several doses, more
                // than the default hour of physical time on this sample.
                max_equilibration_s: 36_000.0,
                ..Default::default()
            })),
        }],
        ..Default::default()
    }
}

/// Runs an isotherm on the simulated analyser through `broker`, kills the daemon after its
/// first point, restarts it and checks the recovery: the analyser aborted (checked on the
/// simulated bridge), the decision logged, the experiment INTERRUPTED, nothing lost, no gap.
async fn kill_during_isotherm(broker: OutsideBroker) {
    let dir = tempfile::tempdir().unwrap();
    let url = broker.url();
    let prefix = format!("test/crash/{}", std::process::id());
    let sim = outside_analyser(&url, &prefix);
    let devices = analyser_devices(&url, &prefix);
    let (mut child, endpoint) = spawn_serve(
        dir.path(),
        ISOTHERM_TIME_SCALE,
        "interrupt",
        "safe",
        &devices,
    )
    .await;
    let mut s = stream_all(&endpoint).await;
    let id = submit(&endpoint, "isotherm", isotherm()).await;
    let mut before = Vec::new();
    read_until(&mut s, &mut before, |ev| {
        ev.iter().any(|e| {
            e.experiment_id == id && matches!(&e.kind, Some(Kind::IsothermPointMeasured(_)))
        })
    })
    .await;
    child.kill().await.expect("SIGKILL");
    assert!(sim.is_busy(), "the isotherm runs on without the daemon");
    let started = sim.operations_started();

    let (mut child, endpoint) = spawn_serve(
        dir.path(),
        ISOTHERM_TIME_SCALE,
        "interrupt",
        "safe",
        &devices,
    )
    .await;
    // Recovery sent the abort before the daemon listened; the bridge winds the run down.
    wait_for("the analyser to abort its isotherm", || !sim.is_busy()).await;
    assert_eq!(
        listed_ids(&endpoint).await,
        std::slice::from_ref(&id),
        "no accepted experiment lost"
    );
    let mut after = Vec::new();
    let mut s = stream_all(&endpoint).await;
    read_until(&mut s, &mut after, |ev| terminal(ev, &id).is_some()).await;
    assert_eq!(
        terminal(&after, &id),
        Some(pb::ExperimentState::Interrupted as i32)
    );
    let d = decision(&after, "analyser_aborted").expect("recovery decision logged");
    assert_eq!(d.device_id, "analyser-1");
    assert_eq!(d.experiment_id, id);
    assert!(detail(d).contains("device reports active"), "{}", detail(d));
    assert!(
        detail(d).contains("device sent to its safe state"),
        "{}",
        detail(d)
    );
    assert!(decision(&after, "interrupted").is_some());
    assert_eq!(sim.operations_started(), started, "nothing measured again");
    assert!(!sim.is_busy());
    assert_log_continues(&before, &after);
    child.kill().await.ok();
    sim.shutdown().await;
    if let OutsideBroker::Embedded(b) = broker {
        b.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_an_isotherm_aborts_the_analyser_on_restart() {
    match mosquitto_for_test(false).await {
        MosquittoForTest::Unavailable(why) => {
            assert!(!mosquitto_required(), "Mosquitto is required here: {why}");
            eprintln!("NOTICE: skipping the isotherm kill point: {why}");
        }
        m => kill_during_isotherm(OutsideBroker::Mosquitto(m)).await,
    }
}

/// The same kill point on the embedded rumqttd. rumqttd does not send retained messages again
/// when a client resumes its persistent session (bytebeamio/rumqtt#1069), so the restarted
/// daemon gets no retained status from the bridge: its driver asks with the contract's
/// `status` command, and recovery reaches the analyser as on Mosquitto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_an_isotherm_on_rumqttd_aborts_the_analyser_on_restart() {
    let broker = EmbeddedBroker::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("embedded MQTT broker");
    kill_during_isotherm(OutsideBroker::Embedded(broker)).await;
}
