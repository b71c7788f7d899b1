//! Scheduler bench (not a test): decision time per step and makespan efficiency on a synthetic
//! 100-experiment workload.
//!
//! The real scheduler and store (redb on a temporary directory, fsync on every commit) run
//! against synthetic devices implementing the `Device` trait whose steps take a known physical
//! time, on tokio's paused clock: the physical schedule is exact and machine-independent, while
//! decision times and commit costs are real. Each experiment is dispense (pump) → furnace
//! program → isotherm (analyser), durations and priorities drawn from a fixed seed, and every
//! move between devices is a 5-minute transfer that holds its destination.
//!
//! Run: `cargo bench -p ppu-daemon --bench scheduler`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ppu_daemon::devices::{Devices, RetryPolicy};
use ppu_daemon::recovery::RecoveryPolicy;
use ppu_daemon::scheduler::Scheduler;
use ppu_daemon::store::Store;
use ppu_drivers::analyser::schema::IsothermResult;
use ppu_drivers::device::{DeviceInfo, DeviceStatus, Limits};
use ppu_drivers::dispenser::schema::DispenseResult;
use ppu_drivers::furnace::Segment;
use ppu_drivers::furnace::schema::FurnaceResult;
use ppu_drivers::{Clock, Device, DeviceError, StepCommand, StepContext, StepOutput};
use ppu_proto::v1 as pb;

const EXPERIMENTS: usize = 100;
const TRANSFER_S: f64 = 300.0;
const SEED: u64 = 0x5eed_2026;

/// A device whose steps take their nominal physical time on the clock.
struct Synthetic {
    info: DeviceInfo,
    clock: Clock,
    active: AtomicBool,
}

impl Synthetic {
    fn device(id: String, family: String, cap: String, clock: Clock) -> Arc<dyn Device> {
        Arc::new(Self {
            info: DeviceInfo {
                id,
                family,
                driver: "synthetic".into(),
                transport: "in-process".into(),
                capabilities: vec![cap],
                limits: Limits::default(),
            },
            clock,
            active: AtomicBool::new(false),
        })
    }
}

fn seconds(cmd: &StepCommand) -> f64 {
    use ppu_drivers::{analyser, dispenser, furnace};
    if let Ok(segments) = furnace::program(cmd, "bench") {
        return segments
            .iter()
            .map(|s| match s {
                Segment::Hold { duration_s } => *duration_s,
                _ => 0.0,
            })
            .sum();
    }
    if let Ok(dispenser::StepKind::Dispense {
        volume_ml,
        rate_ml_per_min,
        ..
    }) = dispenser::StepKind::of(cmd, "bench")
    {
        return volume_ml / rate_ml_per_min * 60.0;
    }
    match analyser::StepKind::of(cmd, "bench") {
        Ok(analyser::StepKind::Isotherm {
            pressures_bar,
            equilibration_interval_s,
            ..
        }) => pressures_bar.len() as f64 * equilibration_interval_s.unwrap_or(10.0),
        _ => 0.0,
    }
}

/// The capability that runs `cmd`, as the schema says.
fn capability(cmd: &StepCommand) -> &'static str {
    ppu_daemon::schema::capability_of(cmd).unwrap_or_default()
}

#[async_trait]
impl Device for Synthetic {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn check(&self, step: &StepCommand) -> Result<(), DeviceError> {
        if self.info.has(capability(step)) {
            Ok(())
        } else {
            Err(DeviceError::Unsupported(capability(step).to_owned()))
        }
    }

    async fn execute(
        &self,
        step: &StepCommand,
        ctx: StepContext,
    ) -> Result<StepOutput, DeviceError> {
        self.active.store(true, Ordering::SeqCst);
        tokio::select! {
            _ = ctx.cancel.cancelled() => return Err(DeviceError::Aborted),
            _ = self.clock.sleep(seconds(step)) => {}
        }
        self.active.store(false, Ordering::SeqCst);
        Ok(match capability(step) {
            "dispense" => StepOutput::pack(&DispenseResult::default()),
            "isotherm" => StepOutput::pack(&IsothermResult::default()),
            _ => StepOutput::pack(&FurnaceResult::default()),
        })
    }

    async fn status(&self) -> Result<DeviceStatus, DeviceError> {
        Ok(DeviceStatus {
            active: self.active.load(Ordering::SeqCst),
            ..Default::default()
        })
    }

    async fn safe_state(&self) -> Result<(), DeviceError> {
        self.active.store(false, Ordering::SeqCst);
        Ok(())
    }

    async fn confirm_safe(&self) -> Result<ppu_drivers::SafeCheck, DeviceError> {
        Ok(ppu_drivers::SafeCheck::Safe)
    }
}

/// A tiny deterministic generator, so every run schedules the same workload.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next()
    }
}

/// One synthetic experiment: durations of its three steps (s) and its priority.
struct Work {
    dispense_s: f64,
    furnace_s: f64,
    isotherm_s: f64,
    priority: i32,
}

fn workload() -> Vec<Work> {
    let mut r = Lcg(SEED);
    (0..EXPERIMENTS)
        .map(|_| Work {
            // 2–8 mL at 0.5 mL/min.
            dispense_s: (r.range(2.0, 8.0) * 10.0).round() / 10.0 / 0.5 * 60.0,
            furnace_s: (r.range(30.0, 120.0)).round() * 60.0,
            // 5–10 points of 5 minutes.
            isotherm_s: (r.range(5.0, 10.99)).floor() * 300.0,
            priority: (r.range(0.0, 2.99)).floor() as i32,
        })
        .collect()
}

fn spec(i: usize, w: &Work) -> pb::ExperimentSpec {
    let step = |kind| pb::Step {
        device_id: String::new(),
        kind: Some(kind),
    };
    let points = (w.isotherm_s / 300.0).round() as usize;
    pb::ExperimentSpec {
        name: format!("bench-{i}"),
        sample_id: format!("S-{i}"),
        priority: w.priority,
        steps: vec![
            step(pb::step::Kind::Dispense(pb::Dispense {
                reagent: "A".into(),
                volume_ml: w.dispense_s / 60.0 * 0.5,
                rate_ml_per_min: 0.5,
            })),
            step(pb::step::Kind::Furnace(pb::FurnaceProgram {
                segments: vec![pb::FurnaceSegment {
                    kind: Some(pb::furnace_segment::Kind::Hold(pb::Hold {
                        duration_s: w.furnace_s,
                    })),
                }],
            })),
            step(pb::step::Kind::Isotherm(pb::Isotherm {
                adsorptive: "CO2".into(),
                temperature_c: 25.0,
                pressure_bar: (1..=points).map(|p| p as f64 * 0.1).collect(),
                equilibration_interval_s: 300.0,
                ..Default::default()
            })),
        ],
        ..Default::default()
    }
}

/// A lower bound on any schedule's makespan: the longest single chain, and for each device
/// class, the earliest any work can reach it + its work (steps and the transfers into it)
/// spread over its devices + the shortest tail after it.
fn lower_bound(work: &[Work], pumps: usize, furnaces: usize, analysers: usize) -> f64 {
    let t = TRANSFER_S;
    let min = |f: &dyn Fn(&Work) -> f64| work.iter().map(f).fold(f64::INFINITY, f64::min);
    let sum = |f: &dyn Fn(&Work) -> f64| work.iter().map(f).sum::<f64>();
    let chain = work
        .iter()
        .map(|w| w.dispense_s + t + w.furnace_s + t + w.isotherm_s)
        .fold(0.0, f64::max);
    let pump = sum(&|w| w.dispense_s) / pumps as f64 + min(&|w| t + w.furnace_s + t + w.isotherm_s);
    let furnace = min(&|w| w.dispense_s)
        + sum(&|w| t + w.furnace_s) / furnaces as f64
        + min(&|w| t + w.isotherm_s);
    let analyser =
        min(&|w| w.dispense_s + t + w.furnace_s) + sum(&|w| t + w.isotherm_s) / analysers as f64;
    chain.max(pump).max(furnace).max(analyser)
}

/// Mean real time of one durable commit with one event: the floor every step pays a few times.
fn bare_commit() -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("bare.redb")).expect("store");
    let n = 200;
    let t0 = Instant::now();
    for _ in 0..n {
        store
            .write(|w| {
                w.emit(
                    "x",
                    "",
                    "",
                    pb::event::Kind::QueueStateChanged(pb::QueueStateChanged::default()),
                );
                Ok(())
            })
            .expect("commit");
    }
    t0.elapsed() / n
}

struct Outcome {
    makespan_s: f64,
    real: Duration,
    stats: ppu_daemon::scheduler::DispatchStats,
    transfers: usize,
    commits: u64,
}

async fn run(work: &[Work], pumps: usize, furnaces: usize, analysers: usize) -> Outcome {
    let clock = Clock::new(1.0);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("bench.redb")).expect("store");
    let mut drivers = Vec::new();
    for i in 1..=pumps {
        drivers.push(Synthetic::device(
            format!("pump-{i}"),
            "dispenser".to_owned(),
            "dispense".to_owned(),
            clock,
        ));
    }
    for i in 1..=furnaces {
        drivers.push(Synthetic::device(
            format!("furnace-{i}"),
            "furnace".to_owned(),
            "furnace_program".to_owned(),
            clock,
        ));
    }
    for i in 1..=analysers {
        drivers.push(Synthetic::device(
            format!("analyser-{i}"),
            "analyser".to_owned(),
            "isotherm".to_owned(),
            clock,
        ));
    }
    let devices = Devices::with_retry(drivers, |_| RetryPolicy::default());
    let (sched, task) =
        Scheduler::start_with(store.clone(), devices, clock, RecoveryPolicy::default())
            .await
            .expect("scheduler");
    let mut events = store.subscribe();
    let before = store.last_sequence();
    let t_real = Instant::now();
    let t0 = clock.now_s();
    let ids = sched
        .submit(pb::SubmitBatchRequest {
            idempotency_key: "bench".into(),
            experiments: work.iter().enumerate().map(|(i, w)| spec(i, w)).collect(),
        })
        .await
        .expect("submit")
        .0
        .experiment_ids;
    let mut done = 0;
    let mut transfers = 0;
    let mut end = t0;
    while done < ids.len() {
        let e = match events.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                panic!("bench lagged by {n} events")
            }
            Err(e) => panic!("event bus: {e}"),
        };
        match &e.kind {
            Some(pb::event::Kind::TransferRequested(t)) => {
                transfers += 1;
                let (s, p) = (sched.clone(), t.transfer.clone().expect("transfer"));
                tokio::spawn(async move {
                    clock.sleep(TRANSFER_S).await;
                    s.confirm_transfer(&p.id, "bench-robot")
                        .await
                        .expect("confirm");
                });
            }
            Some(pb::event::Kind::ExperimentStateChanged(c))
                if c.to == pb::ExperimentState::Succeeded as i32 =>
            {
                done += 1;
                end = clock.now_s();
            }
            Some(pb::event::Kind::ExperimentStateChanged(c))
                if c.to > pb::ExperimentState::Succeeded as i32 =>
            {
                panic!("experiment {} ended in state {}", e.experiment_id, c.to)
            }
            _ => {}
        }
    }
    let real = t_real.elapsed();
    let commits = store.last_sequence() - before;
    let stats = sched.stats();
    sched.shutdown(task).await;
    Outcome {
        makespan_s: end - t0,
        real,
        stats,
        transfers,
        commits,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn main() {
    let work = workload();
    let floor = bare_commit();
    println!(
        "scheduler bench: {EXPERIMENTS} experiments, each dispense (4–16 min) → furnace (30–120 min) → isotherm (25–50 min),"
    );
    println!(
        "priorities 0–2, 5-min transfers holding their destination; paused clock, real store (fsync)"
    );
    println!(
        "bare durable commit (1 event): {:.3} ms",
        floor.as_secs_f64() * 1e3
    );
    for (name, pumps, furnaces, analysers) in [
        ("2 pumps, 2 furnaces, 1 analyser", 2, 2, 1),
        ("2 pumps, 4 furnaces, 2 analysers", 2, 4, 2),
        ("3 pumps, 8 furnaces, 4 analysers", 3, 8, 4),
    ] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let out = rt.block_on(run(&work, pumps, furnaces, analysers));
        let steps = EXPERIMENTS * 3 + out.transfers;
        let grants = out.stats.grants.max(1);
        let mut rounds: Vec<Duration> = out.stats.granting_rounds.iter().map(|(d, _)| *d).collect();
        rounds.sort();
        let lb = lower_bound(&work, pumps, furnaces, analysers);
        let per_step = out.real / steps as u32;
        println!();
        println!("lab: {name}");
        println!(
            "  decision time per granted reservation: {:.1} µs mean over {} grants; per round p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs ({} rounds)",
            out.stats.decide_total.as_secs_f64() * 1e6 / grants as f64,
            out.stats.grants,
            percentile(&rounds, 0.5).as_secs_f64() * 1e6,
            percentile(&rounds, 0.99).as_secs_f64() * 1e6,
            rounds.last().copied().unwrap_or_default().as_secs_f64() * 1e6,
            out.stats.rounds,
        );
        println!(
            "  makespan {:.2} h physical; lower bound {:.2} h; efficiency (bound / achieved) {:.3}",
            out.makespan_s / 3600.0,
            lb / 3600.0,
            lb / out.makespan_s
        );
        println!(
            "  real time {:.2} s for {steps} steps ({} transfers), {} events: {:.2} ms per step = {:.1}× a bare commit",
            out.real.as_secs_f64(),
            out.transfers,
            out.commits,
            per_step.as_secs_f64() * 1e3,
            per_step.as_secs_f64() / floor.as_secs_f64()
        );
    }
}
