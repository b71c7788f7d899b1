//! Crash recovery of the real `ppud` binary: SIGKILL mid-run, restart on the same data dir.
//!
//! This test lives in the daemon package (not tests/) because only here does Cargo hand us the
//! freshly built `ppud` binary (`CARGO_BIN_EXE_ppud`).
//!
//! Kill points: mid-run under `ppud dev`; during a submission; during a furnace hold under each
//! furnace policy. For the hold, the simulated furnace runs in *this* process behind a real
//! Modbus TCP socket and `ppud serve --config` drives it, so the furnace outlives the killed
//! daemon exactly as hardware would, and its registers tell what recovery did.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use pb::event::Kind;
use pb::event_service_client::EventServiceClient;
use pb::experiment_service_client::ExperimentServiceClient;
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use ppu_sim::furnace::{FurnaceConfig, SimFurnace};
use ppu_sim::modbus::{ServerHandle, serve_tcp};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(60);
/// Physical seconds per real second for the furnace-hold tests (daemon and simulator alike).
const HOLD_TIME_SCALE: f64 = 600.0;
/// Target SP register (2) values, 1 decimal place.
const SAFE_RAW: u16 = 250;
const HOLD_RAW: u16 = 1500;

/// Starts `ppud ARGS…` and returns it with its gRPC endpoint, once it listens.
async fn spawn(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ppud"))
        .args(args)
        .env("RUST_LOG", "warn")
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

/// Starts `ppud dev` on a free port.
async fn spawn_ppud(data_dir: &Path) -> (Child, String) {
    spawn_dev(data_dir, 0).await
}

/// Starts `ppud dev` with one furnace and `analysers` analysers on a free port.
async fn spawn_dev(data_dir: &Path, analysers: usize) -> (Child, String) {
    let dir = data_dir.to_str().expect("utf-8 path");
    let analysers = analysers.to_string();
    spawn(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--time-scale",
        "100",
        "--furnaces",
        "1",
        "--analysers",
        &analysers,
        "--transfer-delay-ms",
        "20",
        "--data-dir",
        dir,
    ])
    .await
}

/// Starts `ppud serve` on a config that points at `furnace` with the given recovery policy.
async fn spawn_serve(
    data_dir: &Path,
    furnace: SocketAddr,
    on_restart: &str,
    policy: &str,
) -> (Child, String) {
    let config = data_dir.join("ppud.toml");
    let text = format!(
        r#"listen = "127.0.0.1:0"
data_dir = "{}"
time_scale = {HOLD_TIME_SCALE}

[poll]
interval_ms = 100
reading_log_interval_s = 1.0

[recovery]
on_restart = "{on_restart}"
furnace = "{policy}"

[[devices]]
driver = "eurotherm"
id = "furnace-1"
endpoint = "modbus-tcp://{furnace}"

[devices.limits]
max_temperature_c = 1100.0
max_rate_c_per_min = 20.0
"#,
        data_dir.join("store").display()
    );
    std::fs::write(&config, text).expect("write config");
    spawn(&["serve", "--config", config.to_str().expect("utf-8 path")]).await
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
    let (mut child, endpoint) = spawn_serve(dir, furnace_addr, on_restart, policy).await;
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
    let (child, endpoint) = spawn_serve(dir, furnace_addr, on_restart, policy).await;
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

/// Submits `spec` to `ppud dev`, kills the daemon as soon as a step of the experiment starts on
/// `device`, restarts it, and checks the recovery: `action` logged for that device, the
/// experiment INTERRUPTED, nothing lost, the log gapless. (`ppud dev`'s simulators restart
/// with it, so their state after the restart says nothing; the furnace-hold tests above check
/// a simulator that outlives the daemon.)
async fn kill_when_started_on(device: &str, spec: pb::ExperimentSpec, action: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, endpoint) = spawn_dev(dir.path(), 1).await;
    let mut s = stream_all(&endpoint).await;
    let id = ExperimentServiceClient::connect(endpoint.clone())
        .await
        .unwrap()
        .submit_batch(pb::SubmitBatchRequest {
            idempotency_key: format!("kill-{device}"),
            experiments: vec![spec],
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .experiment_ids[0]
        .clone();
    let mut before = Vec::new();
    read_until(&mut s, &mut before, |ev| {
        ev.iter().any(|e| {
            e.experiment_id == id
                && e.device_id == device
                && matches!(&e.kind, Some(Kind::StepStarted(st)) if !matches!(st.step.as_ref().and_then(|s| s.kind.as_ref()), Some(pb::step::Kind::Transfer(_))))
        })
    })
    .await;
    child.kill().await.expect("SIGKILL");
    let (mut child, endpoint) = spawn_dev(dir.path(), 1).await;
    assert_eq!(
        listed_ids(&endpoint).await,
        std::slice::from_ref(&id),
        "no accepted experiment lost"
    );
    let mut after = Vec::new();
    let mut s = stream_all(&endpoint).await;
    read_until(&mut s, &mut after, |ev| terminal(ev, &id).is_some()).await;
    let d = decision(&after, action).unwrap_or_else(|| panic!("no {action} decision"));
    assert_eq!(d.device_id, device);
    assert_eq!(
        terminal(&after, &id),
        Some(pb::ExperimentState::Interrupted as i32)
    );
    assert_log_continues(&before, &after);
    child.kill().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_dispense_stops_the_pump_on_restart() {
    let spec = pb::ExperimentSpec {
        name: "dispense".into(),
        sample_id: "S-D".into(),
        steps: vec![pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Dispense(pb::Dispense {
                reagent: "A".into(),
                volume_ml: 8.0,
                rate_ml_per_min: 1.0,
            })),
        }],
        ..Default::default()
    };
    kill_when_started_on("pump-a", spec, "pump_stopped").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_an_isotherm_aborts_the_analyser_on_restart() {
    let spec = pb::ExperimentSpec {
        name: "isotherm".into(),
        sample_id: "S-I".into(),
        steps: vec![
            pb::Step {
                device_id: String::new(),
                kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
                    segments: vec![pb::FurnaceSegment {
                        kind: Some(pb::furnace_segment::Kind::Step(pb::StepTo {
                            temperature_c: 35.0,
                        })),
                    }],
                })),
            },
            pb::Step {
                device_id: String::new(),
                kind: Some(pb::step::Kind::Isotherm(pb::Isotherm {
                    adsorptive: "CO2".into(),
                    temperature_c: 25.0,
                    pressure_bar: vec![0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0],
                    ..Default::default()
                })),
            },
        ],
        ..Default::default()
    };
    kill_when_started_on("analyser-1", spec, "analyser_aborted").await;
}
