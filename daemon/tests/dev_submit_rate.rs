//! `ppud dev --submit-per-minute N` reaches the daemon's submission rate limit: with a tiny
//! limit the N+1-th SubmitBatch of one principal is refused with RESOURCE_EXHAUSTED naming the
//! limit; with the default, a planner submitting 2,000 single experiments back to back is never
//! refused (limits stop abuse, not normal use). Runs the real binary.

use std::process::Stdio;
use std::time::Duration;

use pb::experiment_service_client::ExperimentServiceClient;
use pb::queue_service_client::QueueServiceClient;
use ppu_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(60);

/// A running `ppud dev` (killed on drop) and a channel to it, its queue paused so nothing that
/// is submitted runs.
struct Dev {
    _child: Child,
    _dir: tempfile::TempDir,
    channel: Channel,
}

async fn start_dev(extra: &[&str]) -> Dev {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ppud"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--no-sila",
            "--furnaces",
            "1",
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ppud dev");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.strip_prefix("listening on ") {
                return a.trim().to_owned();
            }
        }
        panic!("ppud dev exited before listening");
    })
    .await
    .expect("listens within the deadline");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connects");
    QueueServiceClient::new(channel.clone())
        .pause_queue(pb::PauseQueueRequest {
            reason: "test: submissions only".into(),
        })
        .await
        .expect("PauseQueue");
    Dev {
        _child: child,
        _dir: dir,
        channel,
    }
}

fn single(key: String) -> pb::SubmitBatchRequest {
    pb::SubmitBatchRequest {
        idempotency_key: key.clone(),
        experiments: vec![pb::ExperimentSpec {
            name: key,
            steps: vec![pb::Step {
                device_id: "furnace-1".into(),
                kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
                    segments: vec![pb::FurnaceSegment {
                        kind: Some(pb::furnace_segment::Kind::Hold(pb::Hold {
                            duration_s: 60.0,
                        })),
                    }],
                })),
            }],
            ..Default::default()
        }],
    }
}

#[tokio::test]
async fn the_dev_flag_sets_the_limit_and_the_default_lets_a_planner_burst_through() {
    // Both daemons start at once: the test waits for one start-up, not two.
    let (tiny, default) = tokio::join!(start_dev(&["--submit-per-minute", "3"]), start_dev(&[]));

    let mut client = ExperimentServiceClient::new(tiny.channel.clone());
    for i in 0..3 {
        client
            .submit_batch(single(format!("within-{i}")))
            .await
            .unwrap_or_else(|e| panic!("call {} of 3 is within the limit: {e:?}", i + 1));
    }
    let err = client
        .submit_batch(single("over".into()))
        .await
        .expect_err("the 4th call in a minute is over a limit of 3");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("3 SubmitBatch calls per minute"),
        "the refusal names the limit: {err:?}"
    );

    // 2,000 single submissions, 16 in flight, as fast as the daemon takes them.
    let client = ExperimentServiceClient::new(default.channel.clone());
    let mut calls = JoinSet::new();
    let mut refused = Vec::new();
    for i in 0..2000 {
        if calls.len() >= 16
            && let Some(r) = calls.join_next().await
            && let Err(e) = r.expect("submit task")
        {
            refused.push(e);
        }
        let mut c = client.clone();
        calls.spawn(async move { c.submit_batch(single(format!("burst-{i}"))).await.map(drop) });
    }
    while let Some(r) = calls.join_next().await {
        if let Err(e) = r.expect("submit task") {
            refused.push(e);
        }
    }
    assert!(
        refused.is_empty(),
        "the default limit refused {} of 2,000 single submissions, e.g. {:?}",
        refused.len(),
        refused.first()
    );
}
