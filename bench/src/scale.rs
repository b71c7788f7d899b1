//! Figure 4, scale: a daemon holding a large queue. A store is pre-filled with N QUEUED
//! experiments and a log of M events (queue paused, so nothing runs), then a *separate daemon
//! process* is started on it — this binary re-executed as `ppu-bench daemon`, which runs
//! `Daemon::start` exactly as `ppud serve` does with no devices — so its resident memory is the
//! daemon's alone. Measured:
//!
//! - start-up: `Daemon::start` in the child (store open, recovery scan, queue rebuild, gRPC
//!   up), plus `Store::open` alone timed in this process;
//! - `ListExperiments` first page (100 experiments), through gRPC, many calls;
//! - the child's VmRSS (right after start-up, after those calls, and after one client read the
//!   whole event log: `scale.rss_after_log_read`) and VmHWM (peak) from /proc.
//!
//! The same is done on a small store (1,000 experiments) in the same run as the baseline.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use pb::event_service_client::EventServiceClient;
use pb::experiment_service_client::ExperimentServiceClient;
use ppu_daemon::app::{Daemon, Options, STORE_FILE};
use ppu_daemon::config::Policies;
use ppu_daemon::dev::DevLab;
use ppu_daemon::devices::PollSettings;
use ppu_daemon::state::State;
use ppu_daemon::store::Store;
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use tonic::transport::Channel;

use crate::figure::{Figure, note};
use crate::latency::Summary;
use crate::workload;

#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub experiments: usize,
    pub events: u64,
    pub list_calls: usize,
}

/// The baseline store: one stored batch of 1,000.
const BASELINE_EXPERIMENTS: usize = 1000;
const BASELINE_EVENTS: u64 = 10_000;
const PAGE: u32 = 100;

/// The goals for 100k queued experiments and 1M events: resident memory, after a full
/// log read, and the daemon's start-up (whose floor is `store_open_ms`, the store's open).
const GOAL_RSS_MB: f64 = 100.0;
const GOAL_RSS_AFTER_READ_MB: f64 = 120.0;
const GOAL_START_MS: f64 = 500.0;

/// What one daemon process reported and showed.
struct Observed {
    start_ms: f64,
    open_ms: f64,
    /// One `Store::experiments_in(&[Queued])` (a full scan decoding every experiment).
    scan_ms: f64,
    list: Summary,
    rss_mb: f64,
    hwm_mb: f64,
    /// VmRSS right after start-up, before any request.
    start_rss_mb: f64,
    /// VmRSS after one client read the whole event log.
    replay_rss_mb: f64,
}

pub async fn run(sizes: Sizes, work: &Path) -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir_in(work)?;
    let big = dir.path().join("big");
    let small = dir.path().join("small");
    let (e, n) = (sizes.experiments, sizes.events);
    let filled = {
        let big = big.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&big)?;
            workload::fill(&big.join(STORE_FILE), e, n)
        })
        .await??
    };
    let file_mb = std::fs::metadata(big.join(STORE_FILE))?.len() as f64 / 1e6;
    note(format!(
        "scale: filled {} experiments and {} events ({file_mb:.0} MB) in {:.1} s",
        filled.experiments,
        filled.events,
        filled.took.as_secs_f64()
    ));
    {
        let small = small.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&small)?;
            workload::fill(
                &small.join(STORE_FILE),
                BASELINE_EXPERIMENTS,
                BASELINE_EVENTS,
            )
        })
        .await??;
    }
    let base = observe(&small, sizes.list_calls, BASELINE_EVENTS).await?;
    let big_obs = observe(&big, sizes.list_calls, filled.events).await?;

    let rss = Figure::new("scale.rss", big_obs.rss_mb, "MB")
        .param("experiments", filled.experiments)
        .param("events", filled.events)
        .param("process", "child_daemon")
        .num("peak_mb", big_obs.hwm_mb)
        .num("after_start_mb", big_obs.start_rss_mb)
        .num("after_log_replay_mb", big_obs.replay_rss_mb)
        .num("baseline_mb", base.rss_mb)
        .param("baseline_experiments", BASELINE_EXPERIMENTS)
        .num("store_file_mb", file_mb)
        .target(true, GOAL_RSS_MB);
    // After one client read the whole log: what the replay path and the store's cache keep.
    let replay = Figure::new("scale.rss_after_log_read", big_obs.replay_rss_mb, "MB")
        .param("experiments", filled.experiments)
        .param("events", filled.events)
        .param("process", "child_daemon")
        .num("before_read_mb", big_obs.rss_mb)
        .num("baseline_mb", base.replay_rss_mb)
        .param("baseline_experiments", BASELINE_EXPERIMENTS)
        .param("baseline_events", BASELINE_EVENTS)
        .target(true, GOAL_RSS_AFTER_READ_MB);
    let list = Figure::new("scale.list_first_page", big_obs.list.p50, "ms")
        .param("experiments", filled.experiments)
        .param("page_size", PAGE)
        .param("calls", big_obs.list.n)
        .num("p99_ms", big_obs.list.p99)
        .num("baseline_p50_ms", base.list.p50)
        .num("vs_baseline", big_obs.list.p50 / base.list.p50);
    let startup = Figure::new("startup.daemon_start", big_obs.start_ms, "ms")
        .param("experiments", filled.experiments)
        .param("events", filled.events)
        .num("store_open_ms", big_obs.open_ms)
        .num("full_scan_ms", big_obs.scan_ms)
        .num("baseline_ms", base.start_ms)
        .num("vs_store_open", big_obs.start_ms / big_obs.open_ms)
        .param("page_cache", "warm")
        .target(true, GOAL_START_MS);
    rss.emit();
    replay.emit();
    list.emit();
    startup.emit();
    Ok(vec![rss, replay, list, startup])
}

/// Times `Store::open` here, then starts a daemon process on `data_dir`, measures it, and
/// stops it.
async fn observe(data_dir: &Path, list_calls: usize, events: u64) -> Result<Observed> {
    let path = data_dir.join(STORE_FILE);
    let (open_ms, scan_ms) = tokio::task::spawn_blocking(move || -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let store = Store::open(&path)?;
        let open = t0.elapsed().as_secs_f64() * 1e3;
        let t0 = Instant::now();
        let queued = store.experiments_in(&[State::Queued])?;
        let scan = t0.elapsed().as_secs_f64() * 1e3;
        drop(queued);
        drop(store);
        Ok((open, scan))
    })
    .await??;
    let dir = data_dir.to_owned();
    let mut child = tokio::task::spawn_blocking(move || ChildDaemon::spawn(&dir)).await??;
    let result = async {
        let channel = Channel::from_shared(format!("http://{}", child.addr))?
            .connect()
            .await?;
        let (start_rss_mb, _) = memory_mb(child.pid())?;
        let mut client = ExperimentServiceClient::new(channel.clone());
        let request = || pb::ListExperimentsRequest {
            page_size: PAGE,
            ..Default::default()
        };
        for _ in 0..10 {
            client.list_experiments(request()).await?;
        }
        let mut calls = Vec::with_capacity(list_calls);
        for _ in 0..list_calls {
            let t0 = Instant::now();
            let page = client.list_experiments(request()).await?.into_inner();
            calls.push(t0.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(
                page.experiments.len() == PAGE as usize,
                "first page held {} experiments",
                page.experiments.len()
            );
        }
        let (rss_mb, hwm_mb) = memory_mb(child.pid())?;
        // A client reading the whole log (e.g. a planner catching up from sequence 0): the
        // store's page cache grows with what is read.
        let mut stream = EventServiceClient::new(channel)
            .stream_events(pb::StreamEventsRequest::default())
            .await?
            .into_inner();
        let mut replayed = 0;
        while replayed < events {
            match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
                Ok(Ok(Some(e))) => replayed = e.sequence,
                _ => bail!("replay of the event log stalled at {replayed} of {events}"),
            }
        }
        drop(stream);
        let (replay_rss_mb, _) = memory_mb(child.pid())?;
        Ok(Observed {
            start_ms: child.start_ms,
            open_ms,
            scan_ms,
            list: Summary::of(&mut calls),
            rss_mb,
            hwm_mb,
            start_rss_mb,
            replay_rss_mb,
        })
    }
    .await;
    tokio::task::spawn_blocking(move || child.stop()).await??;
    result
}

/// VmRSS and VmHWM of a process, MB.
pub fn memory_mb(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading /proc/PID/status (Linux only)")?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow!("{name} missing from /proc/{pid}/status"))?;
        let kb: f64 = line
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| anyhow!("malformed {name} line"))?
            .parse()?;
        Ok(kb * 1024.0 / 1e6)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// A daemon in its own process: this executable, `daemon --data-dir DIR`.
pub struct ChildDaemon {
    child: Child,
    stdin: Option<ChildStdin>,
    pub addr: String,
    start_ms: f64,
}

/// What the child daemon runs with besides its data dir.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChildOptions {
    /// Simulated furnaces started in the child (0: no devices, nothing can be submitted).
    pub furnaces: usize,
    /// `limits.max_streams`; `None` for the default.
    pub max_streams: Option<usize>,
}

impl ChildDaemon {
    /// The scale figure's daemon: one simulated furnace, so the filled store's furnace
    /// programs stay QUEUED (with no device that can run them, start-up would fail them all
    /// and the figure would measure an empty queue).
    fn spawn(data_dir: &Path) -> Result<ChildDaemon> {
        Self::spawn_with(
            data_dir,
            ChildOptions {
                furnaces: 1,
                ..ChildOptions::default()
            },
        )
    }

    pub fn spawn_with(data_dir: &Path, opts: ChildOptions) -> Result<ChildDaemon> {
        let exe = std::env::current_exe().context("locating ppu-bench")?;
        let mut command = Command::new(exe);
        command
            .arg("daemon")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--furnaces")
            .arg(opts.furnaces.to_string());
        if let Some(n) = opts.max_streams {
            command.arg("--max-streams").arg(n.to_string());
        }
        Self::spawn_command(command)
    }

    /// The idle-memory baseline: this executable as `bare-grpc`, a gRPC server doing nothing
    /// but answer health checks ([`bare_grpc_main`]).
    pub fn spawn_bare_grpc() -> Result<ChildDaemon> {
        let exe = std::env::current_exe().context("locating ppu-bench")?;
        let mut command = Command::new(exe);
        command.arg("bare-grpc");
        Self::spawn_command(command)
    }

    fn spawn_command(mut command: Command) -> Result<ChildDaemon> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the daemon process")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("daemon stdout")?;
        // The child prints one line once it serves (or exits on failure, closing stdout).
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let mut addr = None;
        let mut start_ms = None;
        for kv in line.split_whitespace() {
            match kv.split_once('=') {
                Some(("addr", v)) => addr = Some(v.to_owned()),
                Some(("start_ms", v)) => start_ms = v.parse().ok(),
                _ => {}
            }
        }
        match (addr, start_ms) {
            (Some(addr), Some(start_ms)) => Ok(ChildDaemon {
                child,
                stdin,
                addr,
                start_ms,
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("daemon process did not start: {line:?}")
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closing stdin asks for a graceful shutdown; waits for the exit.
    pub fn stop(&mut self) -> Result<()> {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(status.success(), "daemon process exited with {status}");
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("daemon process did not stop within 30 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The `daemon` subcommand: `Daemon::start` on `data_dir` (with `furnaces` simulated furnaces
/// in this process when asked, started as `ppud dev` starts them), reporting how long it took;
/// runs until stdin closes, then shuts down gracefully.
pub async fn child_main(
    data_dir: PathBuf,
    furnaces: usize,
    max_streams: Option<usize>,
) -> Result<()> {
    let security = crate::lab::bench_security(max_streams);
    let poll = PollSettings {
        poll_interval: Duration::from_secs(1),
        reading_log_interval: Duration::from_secs(10),
    };
    let t0 = Instant::now();
    let (daemon, lab) = if furnaces == 0 {
        let daemon = Daemon::start(
            Options {
                listen: "127.0.0.1:0".parse()?,
                data_dir,
                clock: Clock::real(),
                poll,
                security,
            },
            Vec::new(),
        )
        .await?;
        (daemon, None)
    } else {
        let lab = DevLab::start(Clock::real(), furnaces).await?;
        let daemon = lab
            .start_secured_daemon(
                "127.0.0.1:0".parse()?,
                &data_dir,
                poll,
                &Policies::default(),
                security,
            )
            .await?;
        (daemon, Some(lab))
    };
    let start_ms = t0.elapsed().as_secs_f64() * 1e3;
    println!("ready addr={} start_ms={start_ms:.3}", daemon.addr());
    std::io::Write::flush(&mut std::io::stdout())?;
    wait_for_stdin_to_close().await?;
    daemon.shutdown().await;
    if let Some(lab) = lab {
        lab.shutdown().await;
    }
    Ok(())
}

/// The `bare-grpc` subcommand: a tonic server on loopback with only the health service, the
/// floor under any gRPC daemon's idle memory; prints its address, runs until stdin closes.
pub async fn bare_grpc_main() -> Result<()> {
    let t0 = Instant::now();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (_reporter, service) = tonic_health::server::health_reporter();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let start_ms = t0.elapsed().as_secs_f64() * 1e3;
    println!("ready addr={addr} start_ms={start_ms:.3}");
    std::io::Write::flush(&mut std::io::stdout())?;
    wait_for_stdin_to_close().await?;
    stop.cancel();
    server.await??;
    Ok(())
}

/// Returns once this process's stdin is closed (the parent's way to ask for a stop).
async fn wait_for_stdin_to_close() -> Result<()> {
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        let stdin = std::io::stdin();
        while stdin
            .lock()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            sink.clear();
        }
    })
    .await?;
    Ok(())
}
