//! A full disk is survivable: on a small tmpfs the data dir fills up, writes are refused with
//! UNAVAILABLE naming ENOSPC, health goes NOT_SERVING, reads keep answering and agree with the
//! store; once space is freed the daemon reopens its store by itself, health returns to
//! SERVING, queued work runs, nothing acknowledged is lost and the event log has no gap.
//!
//! Needs root to mount the tmpfs: skipped with a notice otherwise, except under `CI=true`,
//! where a failed mount fails the test.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use ppu_proto::v1 as pb;
use ppu_tests::{
    DEADLINE, Lab, batch, eventually, finished, furnace_experiment, hold, is_terminal, read_until,
    step_to,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// Size of the data dir's filesystem.
const FS_SIZE: &str = "size=6m";

/// A tmpfs mounted on a temporary directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one, or says why not: `None` (skip) unless in CI, where it panics.
    fn mount() -> Option<Tmpfs> {
        let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let refuse = |why: String| {
            assert!(!in_ci, "CI=true and the tmpfs cannot be mounted: {why}");
            eprintln!("NOTICE: storage fault test skipped: {why}");
            None
        };
        let uid = Command::new("id").arg("-u").output();
        match uid {
            Ok(out) if String::from_utf8_lossy(&out.stdout).trim() == "0" => {}
            Ok(_) => return refuse("not running as root (a tmpfs mount needs root)".into()),
            Err(e) => return refuse(format!("cannot run `id -u`: {e}")),
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", FS_SIZE, "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs { dir }),
            Ok(s) => refuse(format!("mount -t tmpfs failed ({s})")),
            Err(e) => refuse(format!("cannot run mount: {e}")),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a task still unwinding may hold a file open.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes a filler file until the filesystem is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create filler");
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
            assert_eq!(e.raw_os_error(), Some(28), "filler stopped by {e}");
            // Byte by byte into the last partial page.
            while f.write_all(&[0]).and_then(|()| f.flush()).is_ok() {}
            return path;
        }
    }
}

async fn health(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check answers")
        .into_inner()
        .status
}

/// Waits on the health Watch stream (with a deadline) until it reports `want`.
async fn watch_until(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
    want: ServingStatus,
) {
    let mut stream = client
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let next: Option<HealthCheckResponse> = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("health of {service:?} not {want:?} within the deadline"))
            .expect("health watch stream");
        if next.expect("watch open").status == want as i32 {
            return;
        }
    }
}

/// A small experiment made bulky with labels, so the store grows quickly.
fn bulky(name: &str) -> pb::ExperimentSpec {
    let mut e = furnace_experiment(name, vec![step_to(40.0), hold(30.0)]);
    for i in 0..8 {
        e.labels
            .insert(format!("note{i}"), format!("{name}:{i}:").repeat(20));
    }
    e
}

/// Every experiment in the store, by id, with its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_heals_without_restart_and_loses_nothing() {
    let Some(fs) = Tmpfs::mount() else { return };
    let data_dir = fs.path().join("data");
    let lab = Lab::start_in(&data_dir, 2).await;
    let mut experiments = lab.experiments().await;
    let mut queue = lab.queue().await;
    let mut health_client = HealthClient::new(lab.channel().await);
    assert_eq!(
        health(&mut health_client, "").await,
        ServingStatus::Serving as i32
    );

    // Work before the fault: two experiments run (their steps end during the fault, so their
    // results wait for the store), ten wait in the paused queue.
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    let running = |name: &str| {
        let mut e = bulky(name);
        e.steps = vec![ppu_tests::furnace_step(vec![step_to(40.0), hold(600.0)])];
        e
    };
    let first = experiments
        .submit_batch(batch("running", vec![running("run-a"), running("run-b")]))
        .await
        .expect("submit before the fault")
        .into_inner();
    acknowledged.extend(first.batch.expect("batch").experiment_ids);
    eventually("both experiments run", || {
        let mut queue = queue.clone();
        async move {
            let q = queue
                .get_queue(pb::GetQueueRequest {})
                .await
                .expect("queue");
            q.into_inner().running_ids.len() == 2
        }
    })
    .await;
    queue
        .pause_queue(pb::PauseQueueRequest {
            reason: "fill the disk".into(),
        })
        .await
        .expect("pause");
    let waiting = experiments
        .submit_batch(batch(
            "queued",
            (0..10).map(|i| bulky(&format!("queued-{i}"))).collect(),
        ))
        .await
        .expect("submit before the fault")
        .into_inner();
    acknowledged.extend(waiting.batch.expect("batch").experiment_ids);

    // Fill the disk, then submit until the store runs out of room.
    let filler = fill(fs.path());
    let mut refusal = None;
    for n in 0..2000 {
        let specs = (0..10).map(|i| bulky(&format!("b{n}-{i}"))).collect();
        match experiments
            .submit_batch(batch(&format!("fill-{n}"), specs))
            .await
        {
            Ok(r) => acknowledged.extend(r.into_inner().batch.expect("batch").experiment_ids),
            Err(s) => {
                refusal = Some(s);
                break;
            }
        }
    }
    let refusal = refusal.expect("a submission is refused once the disk is full");
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(
        refusal.message().contains("ENOSPC") && refusal.message().contains("No space left"),
        "the refusal names ENOSPC: {}",
        refusal.message()
    );

    // Health says so, for the daemon and its services.
    watch_until(&mut health_client, "", ServingStatus::NotServing).await;
    assert_eq!(
        health(&mut health_client, "ppu.v1.ExperimentService").await,
        ServingStatus::NotServing as i32
    );
    // Further writes are refused the same way, at once.
    let again = experiments
        .submit_batch(batch("during", vec![bulky("during")]))
        .await
        .expect_err("refused while the disk is full");
    assert_eq!(again.code(), Code::Unavailable);

    // Reads answer and agree with the store: nothing dropped from the queue.
    let stored = lab.all_experiments().await;
    for id in &acknowledged {
        assert!(stored.contains_key(id), "acknowledged {id} is in the store");
    }
    let q = queue
        .get_queue(pb::GetQueueRequest {})
        .await
        .expect("GetQueue answers during a storage fault")
        .into_inner();
    let ids_in = |state: pb::ExperimentState| -> BTreeSet<String> {
        stored
            .iter()
            .filter(|(_, s)| **s == state as i32)
            .map(|(id, _)| id.clone())
            .collect()
    };
    let queued: BTreeSet<String> = q.queued_ids.iter().cloned().collect();
    assert_eq!(
        queued,
        ids_in(pb::ExperimentState::Queued),
        "queue matches the store"
    );
    let running: BTreeSet<String> = q.running_ids.iter().cloned().collect();
    assert!(
        running.is_subset(&ids_in(pb::ExperimentState::Running)),
        "running {running:?} vs store"
    );
    assert!(!queued.is_empty(), "work is waiting");

    // The alarm names ENOSPC.
    let mut devices = lab.devices().await;
    let alarms = devices
        .list_alarms(pb::ListAlarmsRequest::default())
        .await
        .expect("ListAlarms")
        .into_inner()
        .alarms;
    assert!(
        alarms
            .iter()
            .any(|a| a.device_id == "ppud" && a.code == "enospc" && a.message.contains("ENOSPC")),
        "{alarms:?}"
    );

    // Both running steps end during the fault: their results wait for the store, in memory,
    // and the experiments stay RUNNING.
    let scheduler = lab.daemon.as_ref().expect("daemon").scheduler().clone();
    eventually("both step results wait for the store", || {
        let n = scheduler.waiting_on_store();
        async move { n == 2 }
    })
    .await;
    let q = queue
        .get_queue(pb::GetQueueRequest {})
        .await
        .expect("GetQueue")
        .into_inner();
    assert_eq!(
        q.running_ids.len(),
        2,
        "still RUNNING while the results wait"
    );

    // Free the space: the daemon heals by itself.
    std::fs::remove_file(&filler).expect("remove filler");
    watch_until(&mut health_client, "", ServingStatus::Serving).await;
    assert_eq!(
        health(&mut health_client, "ppu.v1.QueueService").await,
        ServingStatus::Serving as i32
    );
    let alarms = devices
        .list_alarms(pb::ListAlarmsRequest::default())
        .await
        .expect("ListAlarms")
        .into_inner()
        .alarms;
    assert!(alarms.iter().all(|a| a.device_id != "ppud"), "{alarms:?}");

    eventually("the waiting results are committed", || {
        let n = scheduler.waiting_on_store();
        async move { n == 0 }
    })
    .await;

    // Queued work runs, and a new submission is accepted.
    let after = experiments
        .submit_batch(batch("after", vec![bulky("after")]))
        .await
        .expect("submit after recovery")
        .into_inner();
    acknowledged.extend(after.batch.expect("batch").experiment_ids);
    queue
        .resume_queue(pb::ResumeQueueRequest {})
        .await
        .expect("resume");
    eventually("every acknowledged experiment finishes", || {
        let lab = &lab;
        async move {
            let all = lab.all_experiments().await;
            all.values().all(|s| is_terminal(*s))
        }
    })
    .await;
    let stored = lab.all_experiments().await;
    for id in &acknowledged {
        assert_eq!(
            stored.get(id).copied(),
            Some(pb::ExperimentState::Succeeded as i32),
            "acknowledged {id} succeeded"
        );
    }

    // One gapless log, with the fault's alarm raised and cleared in it.
    let mut events = lab.events().await;
    let mut stream = events
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .expect("stream")
        .into_inner();
    let mut last = Vec::new();
    read_until(&mut stream, &mut last, |seen| {
        let done: BTreeSet<String> = finished(seen).into_iter().collect();
        acknowledged.is_subset(&done)
    })
    .await;
    assert!(!last.is_empty());
    for (i, e) in last.iter().enumerate() {
        assert_eq!(e.sequence, i as u64 + 1, "no gap in the event log");
    }
    let alarm_events: Vec<bool> = last
        .iter()
        .filter(|e| e.device_id == "ppud")
        .filter_map(|e| match &e.kind {
            Some(pb::event::Kind::Alarm(a)) if a.code == "enospc" => Some(a.cleared),
            _ => None,
        })
        .collect();
    assert!(
        alarm_events.starts_with(&[false, true]),
        "the alarm is in the log, raised then cleared: {alarm_events:?}"
    );
    lab.stop().await;
    drop(fs);
}
