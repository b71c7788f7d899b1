//! Crash recovery of the real `ppud` binary: SIGKILL mid-run, restart on the same data dir.
//!
//! This test lives in the daemon package (not tests/) because only here does Cargo hand us the
//! freshly built `ppud` binary (`CARGO_BIN_EXE_ppud`).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use pb::event_service_client::EventServiceClient;
use pb::experiment_service_client::ExperimentServiceClient;
use ppu_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(60);

/// Starts `ppud dev` on a free port and returns it with its gRPC endpoint.
async fn spawn_ppud(data_dir: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ppud"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--time-scale",
            "100",
            "--furnaces",
            "1",
            "--data-dir",
        ])
        .arg(data_dir)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_nothing_and_marks_the_running_experiment_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, endpoint) = spawn_ppud(dir.path()).await;
    let mut exps = ExperimentServiceClient::connect(endpoint.clone())
        .await
        .unwrap();
    let long = furnace(
        "long",
        vec![
            pb::furnace_segment::Kind::Ramp(pb::Ramp {
                temperature_c: 150.0,
                rate_c_per_min: 20.0,
            }),
            pb::furnace_segment::Kind::Hold(pb::Hold {
                duration_s: 36_000.0,
            }),
        ],
    );
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
    let mut s = EventServiceClient::connect(endpoint)
        .await
        .unwrap()
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    read_until(&mut s, &mut before, |ev| {
        ev.iter().any(|e| e.experiment_id == ids[0] && matches!(&e.kind, Some(pb::event::Kind::StepProgress(p)) if p.message.contains("hold")))
    })
    .await;
    child.kill().await.expect("SIGKILL");
    let last_before = before.last().unwrap().sequence;

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
    let mut s = EventServiceClient::connect(endpoint)
        .await
        .unwrap()
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    read_until(&mut s, &mut after, |ev| {
        ev.iter().any(|e| {
            e.experiment_id == ids[0]
                && matches!(&e.kind, Some(pb::event::Kind::ExperimentStateChanged(c)) if c.to == pb::ExperimentState::Interrupted as i32)
        })
    })
    .await;
    let seqs: Vec<u64> = after.iter().map(|e| e.sequence).collect();
    assert_eq!(
        seqs,
        (1..=*seqs.last().unwrap()).collect::<Vec<_>>(),
        "log has no gap across the crash"
    );
    assert!(
        *seqs.last().unwrap() > last_before,
        "sequences continue after the last one seen"
    );
    // Everything seen before the kill is still in the log, unchanged.
    assert_eq!(&after[..before.len()], &before[..]);
    child.kill().await.ok();
}
