//! Figure 6, memory after bursts: does a daemon give memory back once a burst is over? A
//! separate daemon process (this binary as `ppu-bench daemon`, with one simulated furnace so
//! experiments can be submitted; queue paused so nothing runs) goes through:
//!
//! 1. a cancel burst: N experiments submitted in batches of 1,000, then each cancelled with
//!    `CancelExperiment` (16 calls in flight);
//! 2. stream bursts, a few rounds: M streams opened at once over M/50 connections, half
//!    `StreamEvents` filtered on one cancelled experiment from sequence 0 (each replays the
//!    whole log and then never sends again), half `WatchDevice`; each waits for its first
//!    message, then all are dropped.
//!
//! Before the bursts, its idle VmRSS (`memory.idle_rss`) is read beside the baseline's: this
//! binary as `ppu-bench bare-grpc`, a tonic server with nothing but the health service, started
//! and settled alongside.
//!
//! For each burst the child's VmRSS (/proc) is read before, sampled every 20 ms during (peak),
//! and read again after a settling pause with no client activity (after). A memory leak or a
//! cache without bound shows as `after` growing from burst to burst. The child inherits this
//! process's environment, so allocator settings (`MALLOC_ARENA_MAX=2`, ...) can be compared by
//! setting them on the `ppu-bench` command line; the figure line names them.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pb::device_service_client::DeviceServiceClient;
use pb::event_service_client::EventServiceClient;
use pb::experiment_service_client::ExperimentServiceClient;
use pb::queue_service_client::QueueServiceClient;
use ppu_daemon::app::STORE_FILE;
use ppu_proto::v1 as pb;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::figure::Figure;
use crate::scale::{ChildDaemon, ChildOptions, memory_mb};
use crate::workload;

#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Experiments submitted then cancelled.
    pub experiments: usize,
    /// Streams open at once in one stream burst.
    pub streams: usize,
    pub stream_rounds: usize,
    /// Idle time after a burst before `after` is read.
    pub settle: Duration,
}

const SUBMIT_BATCH: usize = 1000;
const CANCELS_IN_FLIGHT: usize = 16;
const STREAMS_PER_CONNECTION: usize = 50;
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// The furnace `DevLab` names first.
const DEVICE: &str = "furnace-1";

pub async fn run(sizes: Sizes, work: &Path) -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir_in(work)?;
    let data = dir.path().join("daemon");
    std::fs::create_dir_all(&data)?;
    let opts = ChildOptions {
        furnaces: 1,
        // Room for every stream of every round even if finished streams kept their slots:
        // the figure measures memory, not the stream limit.
        max_streams: Some(sizes.streams * (sizes.stream_rounds + 1)),
    };
    let mut child = {
        let data = data.clone();
        tokio::task::spawn_blocking(move || ChildDaemon::spawn_with(&data, opts)).await??
    };
    let mut bare = match tokio::task::spawn_blocking(ChildDaemon::spawn_bare_grpc).await? {
        Ok(b) => b,
        Err(e) => {
            tokio::task::spawn_blocking(move || child.stop()).await??;
            return Err(e);
        }
    };
    let result = measure(&child, &bare, sizes, &data).await;
    let stopped = tokio::task::spawn_blocking(move || (child.stop(), bare.stop())).await?;
    stopped.0?;
    stopped.1?;
    result
}

async fn measure(
    child: &ChildDaemon,
    bare: &ChildDaemon,
    sizes: Sizes,
    data: &Path,
) -> Result<Vec<Figure>> {
    let pid = child.pid();
    let endpoint = Channel::from_shared(format!("http://{}", child.addr))?;
    let connect = || endpoint.connect();
    let channel = connect().await?;
    QueueServiceClient::new(channel.clone())
        .pause_queue(pb::PauseQueueRequest {
            reason: "ppu-bench: memory after bursts".into(),
        })
        .await?;
    let allocator = std::env::var("MALLOC_ARENA_MAX")
        .map(|v| format!("glibc_arena_max_{v}"))
        .unwrap_or_else(|_| "glibc_default".into());
    let mut figures = Vec::new();
    // The baseline answers one call too, so its HTTP/2 path is resident like the daemon's.
    let bare_channel = Channel::from_shared(format!("http://{}", bare.addr))?
        .connect()
        .await?;
    tonic_health::pb::health_client::HealthClient::new(bare_channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?;
    drop(bare_channel);
    let start_mb = settle(pid, sizes.settle).await?;
    let bare_mb = memory_mb(bare.pid())?.0;
    let f = Figure::new("memory.idle_rss", start_mb, "MB")
        .param("process", "child_daemon")
        .param("devices", "1_simulated_furnace_in_process")
        .param("allocator", &allocator)
        .num("bare_grpc_process_mb", bare_mb)
        .num("vs_bare_mb", start_mb - bare_mb)
        .num("settle_s", sizes.settle.as_secs_f64());
    f.emit();
    figures.push(f);

    // 1. Submit and cancel.
    let before = start_mb;
    let sampler = Sampler::start(pid);
    let mut client = ExperimentServiceClient::new(channel.clone());
    let mut ids = Vec::with_capacity(sizes.experiments);
    let mut first = 0;
    while first < sizes.experiments {
        let n = SUBMIT_BATCH.min(sizes.experiments - first);
        let resp = client
            .submit_batch(workload::batch_request(format!("memory-{first}"), first, n))
            .await?
            .into_inner();
        ids.extend(resp.batch.map(|b| b.experiment_ids).unwrap_or_default());
        first += n;
    }
    anyhow::ensure!(
        ids.len() == sizes.experiments,
        "submitted {} experiments, stored {}",
        sizes.experiments,
        ids.len()
    );
    let t0 = Instant::now();
    let mut calls = JoinSet::new();
    for id in ids.iter().cloned() {
        if calls.len() >= CANCELS_IN_FLIGHT {
            calls.join_next().await.context("cancel task")???;
        }
        let mut c = client.clone();
        calls.spawn(async move {
            c.cancel_experiment(pb::CancelExperimentRequest {
                id,
                reason: "ppu-bench: memory".into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from)
        });
    }
    while let Some(r) = calls.join_next().await {
        r??;
    }
    let cancel_s = t0.elapsed().as_secs_f64();
    let peak = sampler.stop().await;
    let after = settle(pid, sizes.settle).await?;
    let store_mb = std::fs::metadata(data.join(STORE_FILE))?.len() as f64 / 1e6;
    let f = Figure::new("memory.cancel_burst", after, "MB")
        .param("experiments", sizes.experiments)
        .param("process", "child_daemon")
        .param("allocator", &allocator)
        .num("before_mb", before)
        .num("peak_mb", peak.max(before).max(after))
        .num("after_mb", after)
        .num("kept_mb", after - before)
        .num("cancel_s", cancel_s)
        .num("settle_s", sizes.settle.as_secs_f64())
        .num("store_file_mb", store_mb);
    f.emit();
    figures.push(f);

    // 2. Stream bursts.
    let mut before = after;
    for round in 1..=sizes.stream_rounds {
        let sampler = Sampler::start(pid);
        let connections = sizes.streams.div_ceil(STREAMS_PER_CONNECTION).max(1);
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            channels.push(connect().await?);
        }
        let mut opened = JoinSet::new();
        for i in 0..sizes.streams {
            let ch = channels[i % connections].clone();
            let id = ids[(round * 7919 + i) % ids.len()].clone();
            opened.spawn(open_stream(ch, i % 2 == 0, id));
        }
        let mut streams = Vec::with_capacity(sizes.streams);
        let mut refused = 0;
        while let Some(r) = opened.join_next().await {
            match r? {
                Ok(s) => streams.push(s),
                Err(e) if is_refused(&e) => refused += 1,
                Err(e) => return Err(e),
            }
        }
        drop(streams);
        drop(channels);
        let peak = sampler.stop().await;
        let after = settle(pid, sizes.settle).await?;
        let f = Figure::new("memory.stream_burst", after, "MB")
            .param("round", round)
            .param("streams", sizes.streams)
            .param("connections", connections)
            .param("refused", refused)
            .param("process", "child_daemon")
            .param("allocator", &allocator)
            .num("before_mb", before)
            .num("peak_mb", peak.max(before).max(after))
            .num("after_mb", after)
            .num("kept_mb", after - before)
            .num("vs_start_mb", after - start_mb)
            .num("settle_s", sizes.settle.as_secs_f64());
        f.emit();
        figures.push(f);
        before = after;
    }
    Ok(figures)
}

/// A stream held open until dropped.
enum Open {
    Events {
        _stream: tonic::Streaming<pb::Event>,
    },
    Watch {
        _stream: tonic::Streaming<pb::DeviceReading>,
    },
}

/// Opens one stream and waits for its first message.
async fn open_stream(channel: Channel, events: bool, experiment_id: String) -> Result<Open> {
    const FIRST: Duration = Duration::from_secs(120);
    if events {
        let mut s = EventServiceClient::new(channel)
            .stream_events(pb::StreamEventsRequest {
                from_sequence: 0,
                experiment_id,
                ..Default::default()
            })
            .await?
            .into_inner();
        match tokio::time::timeout(FIRST, s.message()).await {
            Ok(Ok(Some(_))) => Ok(Open::Events { _stream: s }),
            Ok(Err(e)) => Err(e.into()),
            _ => bail!("an event stream sent nothing within {FIRST:?}"),
        }
    } else {
        let mut s = DeviceServiceClient::new(channel)
            .watch_device(pb::WatchDeviceRequest { id: DEVICE.into() })
            .await?
            .into_inner();
        match tokio::time::timeout(FIRST, s.message()).await {
            Ok(Ok(Some(_))) => Ok(Open::Watch { _stream: s }),
            Ok(Err(e)) => Err(e.into()),
            _ => bail!("a device watch sent nothing within {FIRST:?}"),
        }
    }
}

fn is_refused(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tonic::Status>()
        .is_some_and(|s| s.code() == tonic::Code::ResourceExhausted)
}

/// Waits `idle` with no client activity, then reads VmRSS.
async fn settle(pid: u32, idle: Duration) -> Result<f64> {
    tokio::time::sleep(idle).await;
    Ok(memory_mb(pid)?.0)
}

/// Samples a process's VmRSS until stopped; reports the largest.
struct Sampler {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
    peak_kb: Arc<AtomicU64>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = tokio_util::sync::CancellationToken::new();
        let peak_kb = Arc::new(AtomicU64::new(0));
        let task = {
            let (stop, peak_kb) = (stop.clone(), peak_kb.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SAMPLE_EVERY);
                loop {
                    if let Ok((rss, _)) = memory_mb(pid) {
                        peak_kb.fetch_max((rss * 1e3) as u64, Ordering::Relaxed);
                    }
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return,
                    }
                }
            })
        };
        Sampler {
            stop,
            task,
            peak_kb,
        }
    }

    /// The peak, MB.
    async fn stop(self) -> f64 {
        self.stop.cancel();
        let _ = self.task.await;
        self.peak_kb.load(Ordering::Relaxed) as f64 / 1e3
    }
}
