//! `ppu-soak`: the simulated lab under sustained abuse, for minutes, with `kill -9` on a timer.
//!
//! Not a pass/fail test: a bench-style tool that prints what happened. The simulated devices
//! (two Eurotherm furnaces on Modbus TCP, the dispensing station's NE-1000 pumps and MT-SICS
//! balance on ptys) run in this process and outlive every daemon, exactly as hardware would;
//! `ppud serve` drives them from a config file on a fixed loopback port. While it runs:
//! - submitters send small batches (furnace programs, refill + dispense), each under its own
//!   idempotency key, re-sent with the same key until acknowledged;
//! - a canceller cancels queued and running experiments;
//! - stream churn opens filtered `StreamEvents` and `WatchDevice` streams and drops them;
//! - an auditor follows the event log across restarts, resuming from the last sequence;
//! - the daemon is SIGKILLed every `--kill-every-s` and restarted on the same store.
//!
//! At the end it aborts the queue, stops the daemon gracefully, and prints: experiments
//! acknowledged and lost, event gaps and duplicates, devices left unsafe (read back from the
//! simulators' own state), restart times and the daemon's RSS range.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use pb::device_service_client::DeviceServiceClient;
use pb::event_service_client::EventServiceClient;
use pb::experiment_service_client::ExperimentServiceClient;
use pb::queue_service_client::QueueServiceClient;
use ppu_daemon::dev::{dev_station_spec, station_config};
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use ppu_sim::dispenser::SimStation;
use ppu_sim::furnace::{FurnaceConfig, SimFurnace};
use ppu_sim::modbus::{ServerHandle, serve_tcp};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::Code;

/// The furnaces' safe setpoint (the Eurotherm driver's default), as register 2 holds it.
const SAFE_SP_RAW: u16 = 250;

#[derive(Parser)]
#[command(
    version,
    about = "Soak ppud: the simulated lab with submitters, cancellers, stream churn and periodic \
             kill -9; prints what was lost (nothing, we hope) at the end."
)]
struct Args {
    /// How long to run, minutes.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// SIGKILL the daemon every this many seconds (real time).
    #[arg(long, default_value_t = 30.0)]
    kill_every_s: f64,
    /// The `ppud` binary (default: the one next to this binary).
    #[arg(long)]
    ppud: Option<PathBuf>,
    /// Concurrent submitters.
    #[arg(long, default_value_t = 2)]
    submitters: usize,
    /// Physical seconds per real second, for the daemon and the simulated devices alike.
    #[arg(long, default_value_t = 600.0)]
    time_scale: f64,
    /// Seed of the workload's choices (batch sizes, which experiment is cancelled).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for the store (default: a temporary one). Use a real disk.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// A small deterministic generator: the workload's choices, reproducible from `--seed`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What every worker reports into.
#[derive(Default)]
struct Tally {
    acknowledged: Mutex<BTreeSet<String>>,
    refused: AtomicU64,
    submit_retries: AtomicU64,
    cancelled: AtomicU64,
    streams_opened: AtomicU64,
    streams_refused: AtomicU64,
    events_seen: AtomicU64,
    gaps: AtomicU64,
    duplicates: AtomicU64,
    audit_resumes: AtomicU64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let ppud = match &args.ppud {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory of the current executable")?
            .join("ppud"),
    };
    if !ppud.exists() {
        bail!(
            "no ppud at {} (build it: cargo build --release --bin ppud, or pass --ppud)",
            ppud.display()
        );
    }
    let tmp;
    let dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let clock = Clock::new(args.time_scale);
    let mut furnaces = Vec::new();
    for _ in 0..2 {
        let sim = SimFurnace::new(FurnaceConfig::default(), clock);
        let server = serve_tcp(SocketAddr::from(([127, 0, 0, 1], 0)), sim.clone()).await?;
        furnaces.push((sim, server));
    }
    let station = SimStation::start(dev_station_spec(None), clock).await?;
    let port = free_port()?;
    let endpoint = format!("http://127.0.0.1:{port}");
    let config = write_config(&dir, port, args.time_scale, &furnaces, &station)?;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let rss = Arc::new(Mutex::new((u64::MAX, 0u64)));
    let mut restarts: Vec<Duration> = Vec::new();

    let (mut child, first) = spawn(&ppud, &config).await?;
    println!(
        "ppu-soak: ppud up in {first:?} on {endpoint}; running {} min",
        args.minutes
    );
    let pid = Arc::new(AtomicU64::new(u64::from(child.id().unwrap_or(0))));

    let mut workers = Vec::new();
    for w in 0..args.submitters {
        workers.push(tokio::spawn(submitter(
            w,
            endpoint.clone(),
            tally.clone(),
            stop.clone(),
            Rng(args.seed.wrapping_add(w as u64 + 1) | 1),
        )));
    }
    workers.push(tokio::spawn(canceller(
        endpoint.clone(),
        tally.clone(),
        stop.clone(),
        Rng(args.seed.wrapping_mul(31) | 1),
    )));
    workers.push(tokio::spawn(churn(
        endpoint.clone(),
        tally.clone(),
        stop.clone(),
    )));
    workers.push(tokio::spawn(auditor(
        endpoint.clone(),
        tally.clone(),
        stop.clone(),
    )));
    workers.push(tokio::spawn(rss_sampler(
        pid.clone(),
        rss.clone(),
        stop.clone(),
    )));

    let end = Instant::now() + Duration::from_secs_f64(args.minutes * 60.0);
    let kill_every = Duration::from_secs_f64(args.kill_every_s.max(1.0));
    while Instant::now() + kill_every < end {
        tokio::time::sleep(kill_every).await;
        child.kill().await.context("SIGKILL ppud")?;
        let (next, took) = spawn(&ppud, &config).await?;
        child = next;
        pid.store(u64::from(child.id().unwrap_or(0)), Ordering::SeqCst);
        restarts.push(took);
        println!(
            "ppu-soak: kill -9 #{}: restarted in {took:?}; {} acknowledged so far",
            restarts.len(),
            lock(&tally.acknowledged).len()
        );
    }
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.await;
    }

    // Wind down: abort everything, wait until nothing runs, then judge the devices physically.
    let mut queue = QueueServiceClient::connect(endpoint.clone()).await?;
    queue
        .abort_queue(pb::AbortQueueRequest {
            reason: "soak finished".into(),
        })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while running_count(&endpoint).await? > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = listed_ids(&endpoint).await?;
    let unsafe_listed = unsafe_devices(&endpoint).await?;
    let log = full_log(&endpoint).await?;
    terminate(&mut child).await;
    let mut unsafe_devices = unsafe_listed;
    for (i, (sim, _)) in furnaces.iter().enumerate() {
        let sp = sim.read_registers(2, 1).map(|r| r[0]).unwrap_or(u16::MAX);
        if sp > SAFE_SP_RAW {
            unsafe_devices.insert(format!("furnace-{} (target SP raw {sp})", i + 1));
        }
    }
    for p in &station.pumps {
        if p.sim.snapshot().running {
            unsafe_devices.insert(format!("{} (still pumping)", p.id));
        }
    }

    let acknowledged = lock(&tally.acknowledged).clone();
    let listed: BTreeSet<String> = listed.into_iter().collect();
    let lost = acknowledged.difference(&listed).count();
    let log_gaps = log.windows(2).filter(|w| w[1] != w[0] + 1).count()
        + usize::from(log.first().is_some_and(|&s| s != 1));
    restarts.sort();
    let (rss_min, rss_max) = *lock(&rss);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ppu-soak: {} min, kill -9 every {} s",
        args.minutes, args.kill_every_s
    );
    let _ = writeln!(out, "  experiments acknowledged   {}", acknowledged.len());
    let _ = writeln!(out, "  experiments lost           {lost}");
    let _ = writeln!(
        out,
        "  refused / retried submits  {} / {}",
        tally.refused.load(Ordering::SeqCst),
        tally.submit_retries.load(Ordering::SeqCst)
    );
    let _ = writeln!(
        out,
        "  cancelled                  {}",
        tally.cancelled.load(Ordering::SeqCst)
    );
    let _ = writeln!(
        out,
        "  streams opened / refused   {} / {}",
        tally.streams_opened.load(Ordering::SeqCst),
        tally.streams_refused.load(Ordering::SeqCst)
    );
    let _ = writeln!(
        out,
        "  events followed live       {} ({} resumes)",
        tally.events_seen.load(Ordering::SeqCst),
        tally.audit_resumes.load(Ordering::SeqCst)
    );
    let _ = writeln!(
        out,
        "  event gaps (live / log)    {} / {log_gaps}",
        tally.gaps.load(Ordering::SeqCst)
    );
    let _ = writeln!(
        out,
        "  event duplicates (live)    {}",
        tally.duplicates.load(Ordering::SeqCst)
    );
    let _ = writeln!(out, "  log length                 {}", log.len());
    let _ = writeln!(out, "  devices left unsafe        {}", unsafe_devices.len());
    for d in &unsafe_devices {
        let _ = writeln!(out, "    {d}");
    }
    if restarts.is_empty() {
        let _ = writeln!(out, "  restarts                   0");
    } else {
        let _ = writeln!(
            out,
            "  restarts                   {} (min {:?} / median {:?} / max {:?})",
            restarts.len(),
            restarts[0],
            restarts[restarts.len() / 2],
            restarts[restarts.len() - 1]
        );
    }
    if rss_max > 0 {
        let _ = writeln!(
            out,
            "  ppud RSS                   min {:.1} MB / max {:.1} MB",
            rss_min as f64 / 1024.0,
            rss_max as f64 / 1024.0
        );
    }
    print!("{out}");
    for (_, server) in furnaces {
        server.shutdown().await;
    }
    station.shutdown().await;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A `ppud serve` config for the lab: the furnaces by address, the station by pty path.
fn write_config(
    dir: &Path,
    port: u16,
    time_scale: f64,
    furnaces: &[(SimFurnace, ServerHandle)],
    station: &SimStation,
) -> Result<PathBuf> {
    let mut text = format!(
        "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\ntime_scale = {time_scale:?}\n\n\
         [poll]\ninterval_ms = 200\nreading_log_interval_s = 5.0\n\n\
         [recovery]\non_restart = \"resume\"\nfurnace = \"safe\"\n\n\
         [auth]\nopen = true\n\n\
         [limits]\nsubmit_per_minute = 1000000\nmax_streams = 256\n\n",
        dir.join("store").display()
    );
    for (i, (_, server)) in furnaces.iter().enumerate() {
        let _ = write!(
            text,
            "[[devices]]\ndriver = \"eurotherm\"\nid = \"furnace-{}\"\n\
             endpoint = \"modbus-tcp://{}\"\n\n[devices.limits]\n\
             max_temperature_c = 1100.0\nmax_rate_c_per_min = 20.0\n\n",
            i + 1,
            server.local_addr()
        );
    }
    text.push_str(&station_config(station));
    let path = dir.join("ppud.toml");
    std::fs::create_dir_all(dir)?;
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Starts `ppud serve` and waits until it listens; returns it and how long that took.
async fn spawn(ppud: &Path, config: &Path) -> Result<(Child, Duration)> {
    let started = Instant::now();
    let mut child = Command::new(ppud)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("PPU_SOAK_RUST_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {}", ppud.display()))?;
    let stdout = child.stdout.take().context("ppud stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let listening = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("listening on ") {
                return true;
            }
        }
        false
    })
    .await;
    if !matches!(listening, Ok(true)) {
        bail!("ppud did not start listening within 60 s");
    }
    let took = started.elapsed();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, took))
}

/// SIGTERM, then wait (bounded) for a graceful exit.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill").arg(pid.to_string()).status().await;
        if tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

fn furnace_spec(rng: &mut Rng, i: u64) -> pb::ExperimentSpec {
    let target = 80.0 + rng.below(120) as f64;
    pb::ExperimentSpec {
        name: format!("soak furnace {i}"),
        sample_id: format!("SOAK-F-{i}"),
        steps: vec![pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
                segments: vec![
                    pb::FurnaceSegment {
                        kind: Some(pb::furnace_segment::Kind::Ramp(pb::Ramp {
                            temperature_c: target,
                            rate_c_per_min: 20.0,
                        })),
                    },
                    pb::FurnaceSegment {
                        kind: Some(pb::furnace_segment::Kind::Hold(pb::Hold {
                            duration_s: 60.0 + rng.below(600) as f64,
                        })),
                    },
                ],
            })),
        }],
        ..Default::default()
    }
}

fn dispense_spec(rng: &mut Rng, i: u64) -> pb::ExperimentSpec {
    let reagent = if rng.below(2) == 0 { "A" } else { "B" };
    pb::ExperimentSpec {
        name: format!("soak dispense {i}"),
        sample_id: format!("SOAK-D-{i}"),
        steps: vec![
            pb::Step {
                device_id: String::new(),
                kind: Some(pb::step::Kind::Refill(pb::Refill {
                    reagent: reagent.into(),
                    volume_ml: 0.0,
                    rate_ml_per_min: 0.0,
                })),
            },
            pb::Step {
                device_id: String::new(),
                kind: Some(pb::step::Kind::Dispense(pb::Dispense {
                    reagent: reagent.into(),
                    volume_ml: 0.2 + rng.below(5) as f64 * 0.1,
                    rate_ml_per_min: 5.0,
                })),
            },
        ],
        ..Default::default()
    }
}

/// Submits batches of one to five experiments; a batch is re-sent under its key until the
/// daemon acknowledges it (a kill may eat the reply), so "acknowledged" means acknowledged.
async fn submitter(
    worker: usize,
    endpoint: String,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let size = 1 + rng.below(5);
        let experiments = (0..size)
            .map(|k| {
                let i = n * 10 + k;
                if rng.below(10) < 7 {
                    furnace_spec(&mut rng, i)
                } else {
                    dispense_spec(&mut rng, i)
                }
            })
            .collect();
        let request = pb::SubmitBatchRequest {
            idempotency_key: format!("soak-{worker}-{n}"),
            experiments,
        };
        loop {
            let reply = async {
                ExperimentServiceClient::connect(endpoint.clone())
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?
                    .submit_batch(request.clone())
                    .await
            }
            .await;
            match reply {
                Ok(r) => {
                    if let Some(b) = r.into_inner().batch {
                        lock(&tally.acknowledged).extend(b.experiment_ids);
                    }
                    break;
                }
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled
                    ) =>
                {
                    tally.submit_retries.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) if s.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(_) => {
                    tally.refused.fetch_add(1, Ordering::SeqCst);
                    break;
                }
            }
        }
        // Keep the queue from growing without bound: the lab runs a few experiments a second.
        tokio::time::sleep(Duration::from_millis(150 + rng.below(300))).await;
    }
}

/// Cancels a queued or running experiment now and then.
async fn canceller(endpoint: String, tally: Arc<Tally>, stop: Arc<AtomicBool>, mut rng: Rng) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1000))).await;
        let Ok(mut c) = ExperimentServiceClient::connect(endpoint.clone()).await else {
            continue;
        };
        let state = if rng.below(2) == 0 {
            pb::ExperimentState::Queued
        } else {
            pb::ExperimentState::Running
        };
        let Ok(page) = c
            .list_experiments(pb::ListExperimentsRequest {
                state: state as i32,
                page_size: 50,
                ..Default::default()
            })
            .await
        else {
            continue;
        };
        let page = page.into_inner().experiments;
        if page.is_empty() {
            continue;
        }
        let victim = &page[rng.below(page.len() as u64) as usize];
        if c.cancel_experiment(pb::CancelExperimentRequest {
            id: victim.id.clone(),
            reason: "soak canceller".into(),
            after_current_step: rng.below(2) == 0,
        })
        .await
        .is_ok()
        {
            tally.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Opens filtered event streams and device watches and drops them after a moment.
async fn churn(endpoint: String, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut k = 0u64;
    while !stop.load(Ordering::SeqCst) {
        k += 1;
        let opened = if k.is_multiple_of(2) {
            match EventServiceClient::connect(endpoint.clone()).await {
                Ok(mut c) => c
                    .stream_events(pb::StreamEventsRequest {
                        from_sequence: u64::MAX / 2,
                        experiment_id: format!("01NOSUCHEXPERIMENT{k:08}"),
                        ..Default::default()
                    })
                    .await
                    .map(|s| drop(s.into_inner())),
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            }
        } else {
            match DeviceServiceClient::connect(endpoint.clone()).await {
                Ok(mut c) => c
                    .watch_device(pb::WatchDeviceRequest {
                        id: "furnace-1".into(),
                    })
                    .await
                    .map(|s| drop(s.into_inner())),
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            }
        };
        match opened {
            Ok(()) => tally.streams_opened.fetch_add(1, Ordering::SeqCst),
            Err(_) => tally.streams_refused.fetch_add(1, Ordering::SeqCst),
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Follows the whole log across restarts, resuming after the last sequence it saw: every
/// sequence must be the previous one plus one.
async fn auditor(endpoint: String, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut last = 0u64;
    let mut first = true;
    while !stop.load(Ordering::SeqCst) {
        let stream = async {
            EventServiceClient::connect(endpoint.clone())
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?
                .stream_events(pb::StreamEventsRequest {
                    from_sequence: last,
                    ..Default::default()
                })
                .await
        }
        .await;
        let Ok(stream) = stream else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if !first {
            tally.audit_resumes.fetch_add(1, Ordering::SeqCst);
        }
        first = false;
        let mut stream = stream.into_inner();
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
            match next {
                Ok(Ok(Some(e))) => {
                    if e.sequence <= last {
                        tally.duplicates.fetch_add(1, Ordering::SeqCst);
                    } else {
                        if e.sequence != last + 1 {
                            tally.gaps.fetch_add(1, Ordering::SeqCst);
                        }
                        last = e.sequence;
                        tally.events_seen.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(_) => break,
                Err(_) if stop.load(Ordering::SeqCst) => return,
                Err(_) => {}
            }
        }
    }
}

/// Samples the daemon's resident set every half second (whichever process is current).
async fn rss_sampler(pid: Arc<AtomicU64>, rss: Arc<Mutex<(u64, u64)>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let p = pid.load(Ordering::SeqCst);
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            let kb = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(kb) = kb {
                let mut r = lock(&rss);
                r.0 = r.0.min(kb);
                r.1 = r.1.max(kb);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn running_count(endpoint: &str) -> Result<usize> {
    let page = ExperimentServiceClient::connect(endpoint.to_owned())
        .await?
        .list_experiments(pb::ListExperimentsRequest {
            state: pb::ExperimentState::Running as i32,
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(page.experiments.len())
}

async fn listed_ids(endpoint: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut token = String::new();
    let mut c = ExperimentServiceClient::connect(endpoint.to_owned()).await?;
    loop {
        let page = c
            .list_experiments(pb::ListExperimentsRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        ids.extend(page.experiments.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            return Ok(ids);
        }
        token = page.next_page_token;
    }
}

/// Devices the daemon itself reports as not confirmed safe.
async fn unsafe_devices(endpoint: &str) -> Result<BTreeSet<String>> {
    let devices = DeviceServiceClient::connect(endpoint.to_owned())
        .await?
        .list_devices(pb::ListDevicesRequest {})
        .await?
        .into_inner()
        .devices;
    Ok(devices
        .into_iter()
        .filter_map(|d| {
            if d.r#unsafe {
                Some(format!("{} (unsafe: {})", d.id, d.unsafe_reason))
            } else if d.connection != pb::ConnectionState::Connected as i32 {
                Some(format!("{} (not connected)", d.id))
            } else {
                None
            }
        })
        .collect())
}

/// Every sequence in the log, replayed from the start.
async fn full_log(endpoint: &str) -> Result<Vec<u64>> {
    let mut s = EventServiceClient::connect(endpoint.to_owned())
        .await?
        .stream_events(pb::StreamEventsRequest::default())
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Ok(Ok(Some(e))) = tokio::time::timeout(Duration::from_secs(2), s.message()).await {
        out.push(e.sequence);
    }
    Ok(out)
}
