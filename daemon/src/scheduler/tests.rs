//! Deterministic scheduler tests on tokio's paused clock.
//!
//! The scheduler's contract is the `Device` trait, so these tests drive it through in-process
//! devices that implement the trait and whose steps take a known physical time on the injected
//! clock. That is a legitimate scheduler-level test double: every reservation, transfer,
//! journal, retry and recovery path of the scheduler runs for real against a real store; the
//! real drivers behind real protocols are covered by `tests/` and `daemon/tests/crash.rs`.
//! With the clock paused, time only advances when every task waits, so schedules are exact.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use async_trait::async_trait;
use pb::event::Kind;
use ppu_drivers::analyser::schema::{DegasResult, IsothermResult};
use ppu_drivers::balance::schema::WeighResult;
use ppu_drivers::device::StepOutput;
use ppu_drivers::device::{DeviceInfo, DeviceStatus, Limits};
use ppu_drivers::dispenser::schema::{DispenseResult, RefillResult};
use ppu_drivers::furnace::Segment;
use ppu_drivers::furnace::schema::FurnaceResult;
use ppu_drivers::{Device, DeviceError, StepCommand, StepContext};
use tempfile::TempDir;

use super::*;
use crate::recovery::{AdoptPolicy, OnRestart};

/// Physical seconds a step takes on a [`TestDevice`].
fn step_seconds(cmd: &StepCommand) -> f64 {
    use ppu_drivers::{analyser, balance, dispenser, furnace};
    if let Ok(segments) = furnace::program(cmd, "test") {
        return segments
            .iter()
            .map(|s| match s {
                Segment::Hold { duration_s } => *duration_s,
                _ => 0.0,
            })
            .sum();
    }
    if balance::weigh(cmd, "test").is_ok() {
        return 10.0;
    }
    match dispenser::StepKind::of(cmd, "test") {
        Ok(dispenser::StepKind::Dispense {
            volume_ml,
            rate_ml_per_min,
            ..
        }) => return volume_ml / rate_ml_per_min * 60.0,
        Ok(dispenser::StepKind::Refill { .. }) => return 60.0,
        Err(_) => {}
    }
    match analyser::StepKind::of(cmd, "test") {
        Ok(analyser::StepKind::Degas { duration_s, .. }) => duration_s,
        Ok(analyser::StepKind::Isotherm {
            pressures_bar,
            equilibration_interval_s,
            ..
        }) => pressures_bar.len() as f64 * equilibration_interval_s.unwrap_or(10.0),
        Err(_) => 0.0,
    }
}

fn output(cmd: &StepCommand) -> StepOutput {
    use ppu_drivers::{analyser, balance, dispenser, furnace};
    if furnace::program(cmd, "test").is_ok() {
        return StepOutput::pack(&FurnaceResult::default());
    }
    if balance::weigh(cmd, "test").is_ok() {
        return StepOutput::pack(&WeighResult::default());
    }
    match dispenser::StepKind::of(cmd, "test") {
        Ok(dispenser::StepKind::Dispense {
            reagent, volume_ml, ..
        }) => {
            return StepOutput::pack(&DispenseResult {
                reagent,
                requested_volume_ml: volume_ml,
                pump_volume_ml: volume_ml,
                ..Default::default()
            });
        }
        Ok(dispenser::StepKind::Refill { .. }) => {
            return StepOutput::pack(&RefillResult::default());
        }
        Err(_) => {}
    }
    match analyser::StepKind::of(cmd, "test") {
        Ok(analyser::StepKind::Degas { .. }) => StepOutput::pack(&DegasResult::default()),
        _ => StepOutput::pack(&IsothermResult::default()),
    }
}

/// A device whose steps take `step_seconds` of physical time; it records every step it ran
/// (start and end on the clock) and every safe-state call.
struct TestDevice {
    info: DeviceInfo,
    clock: Clock,
    active: AtomicBool,
    safe_calls: AtomicU32,
    /// Transient failures the next safe-state calls return before one succeeds.
    safe_failures: AtomicU32,
    /// Every step fails with this fault while set.
    fault: Mutex<Option<String>>,
    /// Whether `adopt` is supported.
    adoptable: bool,
    adopted: AtomicU32,
    runs: Mutex<Vec<(f64, f64)>>,
}

impl TestDevice {
    fn new(id: &str, family: String, cap: String, clock: Clock) -> Arc<Self> {
        let adoptable = family == "furnace";
        Arc::new(Self {
            info: DeviceInfo {
                id: id.into(),
                family,
                driver: "test".into(),
                transport: "in-process".into(),
                capabilities: vec![cap],
                limits: Limits::default(),
            },
            clock,
            active: AtomicBool::new(false),
            safe_calls: AtomicU32::new(0),
            safe_failures: AtomicU32::new(0),
            fault: Mutex::new(None),
            adoptable,
            adopted: AtomicU32::new(0),
            runs: Mutex::new(Vec::new()),
        })
    }

    fn runs(&self) -> Vec<(f64, f64)> {
        self.runs.lock().unwrap().clone()
    }

    async fn run_for(&self, seconds: f64, ctx: &StepContext) -> Result<(), DeviceError> {
        let start = self.clock.now_s();
        self.active.store(true, Ordering::SeqCst);
        let r = tokio::select! {
            _ = ctx.cancel.cancelled() => Err(DeviceError::Aborted),
            _ = self.clock.sleep(seconds) => Ok(()),
        };
        self.runs.lock().unwrap().push((start, self.clock.now_s()));
        if r.is_ok() {
            self.active.store(false, Ordering::SeqCst);
        }
        r
    }
}

#[async_trait]
impl Device for TestDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn check(&self, step: &StepCommand) -> Result<(), DeviceError> {
        let cap = crate::schema::capability_of(step).unwrap_or_default();
        if self.info.has(cap) {
            Ok(())
        } else {
            Err(DeviceError::Unsupported(cap.to_owned()))
        }
    }

    async fn execute(
        &self,
        step: &StepCommand,
        ctx: StepContext,
    ) -> Result<StepOutput, DeviceError> {
        self.check(step)?;
        if let Some(f) = self.fault.lock().unwrap().clone() {
            self.active.store(true, Ordering::SeqCst);
            return Err(DeviceError::Fault(f));
        }
        self.run_for(step_seconds(step), &ctx).await?;
        Ok(output(step))
    }

    async fn status(&self) -> Result<DeviceStatus, DeviceError> {
        Ok(DeviceStatus {
            readings: Vec::new(),
            alarms: Vec::new(),
            active: self.active.load(Ordering::SeqCst),
        })
    }

    async fn safe_state(&self) -> Result<(), DeviceError> {
        self.safe_calls.fetch_add(1, Ordering::SeqCst);
        if self
            .safe_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(DeviceError::Timeout {
                what: "safe state".into(),
                timeout_ms: 10,
            });
        }
        self.active.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Safe when nothing runs: the read-back of `active`.
    async fn confirm_safe(&self) -> Result<ppu_drivers::SafeCheck, DeviceError> {
        Ok(if self.active.load(Ordering::SeqCst) {
            ppu_drivers::SafeCheck::NotSafe(vec!["still active".into()])
        } else {
            ppu_drivers::SafeCheck::Safe
        })
    }

    async fn adopt(
        &self,
        step: &StepCommand,
        elapsed_s: f64,
        ctx: StepContext,
    ) -> Result<StepOutput, DeviceError> {
        if !self.adoptable {
            return Err(DeviceError::Unsupported("no adoption".into()));
        }
        self.adopted.fetch_add(1, Ordering::SeqCst);
        self.run_for((step_seconds(step) - elapsed_s).max(0.0), &ctx)
            .await?;
        Ok(output(step))
    }
}

/// The scheduler on a fresh store with the given devices, plus a robot that confirms every
/// transfer `transfer_s` physical seconds after it is requested, through `confirm_transfer`.
struct Rig {
    sched: Scheduler,
    task: Option<JoinHandle<()>>,
    devices: HashMap<String, Arc<TestDevice>>,
    robot: JoinHandle<()>,
    _dir: TempDir,
}

/// 2 furnaces, 1 analyser, 2 pumps.
fn lab(clock: Clock) -> Vec<Arc<TestDevice>> {
    vec![
        TestDevice::new(
            "pump-1",
            "dispenser".to_owned(),
            "dispense".to_owned(),
            clock,
        ),
        TestDevice::new(
            "pump-2",
            "dispenser".to_owned(),
            "dispense".to_owned(),
            clock,
        ),
        TestDevice::new(
            "furnace-1",
            "furnace".to_owned(),
            "furnace_program".to_owned(),
            clock,
        ),
        TestDevice::new(
            "furnace-2",
            "furnace".to_owned(),
            "furnace_program".to_owned(),
            clock,
        ),
        TestDevice::new(
            "analyser-1",
            "analyser".to_owned(),
            "isotherm".to_owned(),
            clock,
        ),
    ]
}

impl Rig {
    async fn start(devices: Vec<Arc<TestDevice>>, clock: Clock, transfer_s: f64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        Self::start_on(
            dir,
            store,
            devices,
            clock,
            transfer_s,
            RecoveryPolicy::default(),
        )
        .await
    }

    async fn start_on(
        dir: TempDir,
        store: Arc<Store>,
        devices: Vec<Arc<TestDevice>>,
        clock: Clock,
        transfer_s: f64,
        policy: RecoveryPolicy,
    ) -> Rig {
        let registry = Devices::with_retry(
            devices
                .iter()
                .map(|d| d.clone() as Arc<dyn Device>)
                .collect(),
            |_| crate::devices::RetryPolicy {
                retries: 3,
                backoff: Duration::from_millis(100),
            },
        );
        let (sched, task) = Scheduler::start_with(store, registry, clock, policy)
            .await
            .unwrap();
        let robot = tokio::spawn(robot(sched.clone(), clock, transfer_s));
        Rig {
            sched,
            task: Some(task),
            devices: devices
                .into_iter()
                .map(|d| (d.info.id.clone(), d))
                .collect(),
            robot,
            _dir: dir,
        }
    }

    async fn submit(&self, key: &str, specs: Vec<pb::ExperimentSpec>) -> Vec<String> {
        let (batch, _) = self
            .sched
            .submit(pb::SubmitBatchRequest {
                idempotency_key: key.into(),
                experiments: specs,
            })
            .await
            .unwrap();
        batch.experiment_ids
    }

    fn events(&self) -> Vec<pb::Event> {
        self.sched.store().events_after(0, usize::MAX).unwrap()
    }

    fn experiment(&self, id: &str) -> pb::Experiment {
        self.sched.store().get_experiment(id).unwrap().unwrap()
    }

    /// Waits (on the paused clock) until `done` holds for the log.
    async fn until(&self, what: &str, done: impl Fn(&[pb::Event]) -> bool) {
        let mut rx = self.sched.store().subscribe();
        loop {
            if done(&self.events()) {
                return;
            }
            // Paused time jumps straight to this deadline if nothing else can happen.
            match tokio::time::timeout(Duration::from_secs(100_000_000), rx.recv()).await {
                Err(_) => panic!("stuck waiting for {what}"),
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                    panic!("store closed waiting for {what}")
                }
                Ok(_) => {}
            }
        }
    }

    async fn until_terminal(&self, ids: &[String]) {
        self.until("experiments to finish", |_| {
            ids.iter().all(|id| is_terminal(&self.experiment(id)))
        })
        .await;
    }

    async fn stop(mut self) {
        self.robot.abort();
        if let Some(t) = self.task.take() {
            self.sched.shutdown(t).await;
        }
    }
}

async fn robot(sched: Scheduler, clock: Clock, transfer_s: f64) {
    let mut rx = sched.store().subscribe();
    loop {
        match rx.recv().await {
            Ok(e) => {
                if let Some(Kind::TransferRequested(t)) = &e.kind
                    && let Some(p) = t.transfer.clone()
                {
                    let s = sched.clone();
                    tokio::spawn(async move {
                        clock.sleep(transfer_s).await;
                        s.confirm_transfer(&p.id, "test-robot").await.unwrap();
                    });
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                panic!("test robot lagged")
            }
            Err(_) => return,
        }
    }
}

fn dispense(ml: f64) -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Dispense(pb::Dispense {
            reagent: "A".into(),
            volume_ml: ml,
            rate_ml_per_min: 1.0,
        })),
    }
}

fn furnace(hold_s: f64) -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
            segments: vec![pb::FurnaceSegment {
                kind: Some(pb::furnace_segment::Kind::Hold(pb::Hold {
                    duration_s: hold_s,
                })),
            }],
        })),
    }
}

fn pinned(mut s: pb::Step, device: &str) -> pb::Step {
    s.device_id = device.into();
    s
}

fn isotherm(points: usize, interval_s: f64) -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Isotherm(pb::Isotherm {
            adsorptive: "CO2".into(),
            temperature_c: 25.0,
            pressure_bar: (1..=points).map(|i| i as f64 * 0.1).collect(),
            equilibration_interval_s: interval_s,
            ..Default::default()
        })),
    }
}

fn spec(name: &str, priority: i32, steps: Vec<pb::Step>) -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: name.into(),
        sample_id: format!("S-{name}"),
        priority,
        steps,
        ..Default::default()
    }
}

/// Fails if any device ever has two steps open at once, or two reservations at once, in the
/// order the log records them.
fn assert_one_step_per_device(events: &[pb::Event]) {
    let mut running: HashMap<&str, u32> = HashMap::new();
    let mut reserved: HashMap<&str, &str> = HashMap::new();
    for e in events {
        let d = e.device_id.as_str();
        match &e.kind {
            Some(Kind::StepStarted(s)) => {
                if let Some(open) = running.insert(d, s.step_index) {
                    panic!(
                        "{d} started a step while step {open} was running (seq {})",
                        e.sequence
                    );
                }
            }
            Some(Kind::StepFinished(_)) => {
                assert!(
                    running.remove(d).is_some(),
                    "{d} finished a step it never started (seq {})",
                    e.sequence
                );
            }
            Some(Kind::DeviceReserved(_)) => {
                if let Some(holder) = reserved.insert(d, &e.experiment_id) {
                    panic!(
                        "{d} reserved for {} while held by {holder} (seq {})",
                        e.experiment_id, e.sequence
                    );
                }
            }
            Some(Kind::DeviceReleased(_)) => {
                assert_eq!(
                    reserved.remove(d),
                    Some(e.experiment_id.as_str()),
                    "seq {}",
                    e.sequence
                );
            }
            _ => {}
        }
    }
    assert!(running.is_empty(), "steps left open: {running:?}");
    assert!(reserved.is_empty(), "reservations left: {reserved:?}");
}

fn count(events: &[pb::Event], f: impl Fn(&Kind) -> bool) -> usize {
    events
        .iter()
        .filter(|e| e.kind.as_ref().is_some_and(&f))
        .count()
}

/// The order experiments started their first step in.
fn start_order(events: &[pb::Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| matches!(&e.kind, Some(Kind::ExperimentStateChanged(c)) if c.to == pb::ExperimentState::Running as i32))
        .map(|e| e.experiment_id.clone())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn six_experiments_pipeline_across_pumps_furnaces_and_the_analyser() {
    let clock = Clock::new(1.0);
    let rig = Rig::start(lab(clock), clock, 300.0).await;
    let t0 = clock.now_s();
    // Each: dispense 10 min (pump) → furnace 60 min → isotherm 30 min (analyser); every move
    // between devices is a 5-minute transfer that holds the destination.
    let specs = (1..=6)
        .map(|i| {
            spec(
                &format!("e{i}"),
                0,
                vec![dispense(10.0), furnace(3600.0), isotherm(3, 600.0)],
            )
        })
        .collect();
    let ids = rig.submit("six", specs).await;
    rig.until_terminal(&ids).await;
    for id in &ids {
        let e = rig.experiment(id);
        assert_eq!(
            e.state,
            pb::ExperimentState::Succeeded as i32,
            "{id}: {}",
            e.message
        );
        // Two transfers were inserted: pump → furnace, furnace → analyser.
        let kinds: Vec<&str> = e
            .spec
            .as_ref()
            .unwrap()
            .steps
            .iter()
            .map(|s| match &s.kind {
                Some(pb::step::Kind::Dispense(_)) => "dispense",
                Some(pb::step::Kind::Transfer(_)) => "transfer",
                Some(pb::step::Kind::Furnace(_)) => "furnace",
                Some(pb::step::Kind::Isotherm(_)) => "isotherm",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            ["dispense", "transfer", "furnace", "transfer", "isotherm"]
        );
        assert_eq!(e.results.len(), 5);
    }
    let end = rig
        .devices
        .values()
        .flat_map(|d| d.runs())
        .map(|(_, end)| end)
        .fold(0.0, f64::max);
    // The analyser is the bottleneck: the first sample reaches it after 10 + 5 + 60 min, then
    // it is busy with six (5 min transfer + 30 min isotherm) back to back: 75 + 6 × 35 = 285
    // minutes, against 660 for one experiment at a time.
    assert!(
        ((end - t0) - 285.0 * 60.0).abs() < 1e-6,
        "makespan {} min",
        (end - t0) / 60.0
    );
    let analyser = rig.devices["analyser-1"].runs();
    assert_eq!(analyser.len(), 6);
    let events = rig.events();
    assert_one_step_per_device(&events);
    assert_eq!(
        count(&events, |k| matches!(k, Kind::TransferRequested(_))),
        12
    );
    assert_eq!(
        count(&events, |k| matches!(k, Kind::TransferConfirmed(_))),
        12
    );
    assert_eq!(count(&events, |k| matches!(k, Kind::DeviceReserved(_))), 18);
    // Runs on each device never overlap in physical time either.
    for (id, d) in &rig.devices {
        let mut runs = d.runs();
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        for w in runs.windows(2) {
            assert!(w[1].0 >= w[0].1, "{id} overlaps: {w:?}");
        }
    }
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn higher_priority_starts_first_then_submission_order() {
    let clock = Clock::new(1.0);
    let rig = Rig::start(lab(clock), clock, 60.0).await;
    rig.sched.set_paused(true, "loading".into()).await.unwrap();
    let one = |name: &str, p: i32| spec(name, p, vec![pinned(furnace(100.0), "furnace-1")]);
    let ids = rig
        .submit(
            "prio",
            vec![
                one("a", 0),
                one("b", 5),
                one("c", 0),
                one("d", 9),
                one("e", 5),
            ],
        )
        .await;
    assert_eq!(
        rig.sched.queued_ids(),
        [
            ids[3].clone(),
            ids[1].clone(),
            ids[4].clone(),
            ids[0].clone(),
            ids[2].clone()
        ]
    );
    rig.sched.set_paused(false, String::new()).await.unwrap();
    rig.until_terminal(&ids).await;
    assert_eq!(
        start_order(&rig.events()),
        [
            ids[3].clone(),
            ids[1].clone(),
            ids[4].clone(),
            ids[0].clone(),
            ids[2].clone()
        ]
    );
    assert_one_step_per_device(&rig.events());
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_paused_queue_starts_no_new_step_while_running_steps_finish() {
    let clock = Clock::new(1.0);
    let rig = Rig::start(lab(clock), clock, 60.0).await;
    let two = |name: &str| spec(name, 0, vec![furnace(1000.0), furnace(1000.0)]);
    let ids = rig
        .submit("pause", vec![two("a"), two("b"), two("c"), two("d")])
        .await;
    rig.until("both furnaces busy", |ev| {
        count(ev, |k| matches!(k, Kind::StepStarted(_))) == 2
    })
    .await;
    rig.sched
        .set_paused(true, "hands off".into())
        .await
        .unwrap();
    let paused_at = rig.sched.store().last_sequence();
    // Let a long physical time pass: the running steps end, nothing new begins.
    clock.sleep(20_000.0).await;
    let after: Vec<pb::Event> = rig
        .events()
        .into_iter()
        .filter(|e| e.sequence > paused_at)
        .collect();
    assert_eq!(count(&after, |k| matches!(k, Kind::StepFinished(_))), 2);
    assert_eq!(
        count(&after, |k| matches!(k, Kind::StepStarted(_))),
        0,
        "{after:#?}"
    );
    assert_eq!(count(&after, |k| matches!(k, Kind::DeviceReserved(_))), 0);
    assert_eq!(rig.sched.running_ids(), ids[..2]);
    assert_eq!(rig.sched.queued_ids(), ids[2..]);
    rig.sched.set_paused(false, String::new()).await.unwrap();
    rig.until_terminal(&ids).await;
    for id in &ids {
        assert_eq!(
            rig.experiment(id).state,
            pb::ExperimentState::Succeeded as i32
        );
    }
    assert_one_step_per_device(&rig.events());
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_device_fault_fails_only_its_step_frees_the_device_and_safe_state_is_retried() {
    let clock = Clock::new(1.0);
    let rig = Rig::start(lab(clock), clock, 60.0).await;
    let f1 = rig.devices["furnace-1"].clone();
    *f1.fault.lock().unwrap() = Some("heater fail".into());
    f1.safe_failures.store(2, Ordering::SeqCst);
    // Start-up made every device safe once already.
    let before = f1.safe_calls.load(Ordering::SeqCst);
    let ids = rig
        .submit(
            "fault",
            vec![
                spec(
                    "bad",
                    0,
                    vec![pinned(furnace(100.0), "furnace-1"), furnace(100.0)],
                ),
                spec("other", 0, vec![pinned(furnace(100.0), "furnace-2")]),
            ],
        )
        .await;
    rig.until_terminal(&ids).await;
    let bad = rig.experiment(&ids[0]);
    assert_eq!(bad.state, pb::ExperimentState::Failed as i32);
    assert!(bad.message.contains("heater fail"), "{}", bad.message);
    assert!(bad.message.contains("furnace-1"), "{}", bad.message);
    assert_eq!(
        rig.experiment(&ids[1]).state,
        pb::ExperimentState::Succeeded as i32
    );
    // Two transient failures, then success: the safe state was retried, not given up.
    assert_eq!(f1.safe_calls.load(Ordering::SeqCst) - before, 3);
    assert!(!f1.active.load(Ordering::SeqCst));
    // The device was released: the next experiment gets it.
    *f1.fault.lock().unwrap() = None;
    let next = rig
        .submit(
            "after",
            vec![spec("next", 0, vec![pinned(furnace(10.0), "furnace-1")])],
        )
        .await;
    rig.until_terminal(&next).await;
    assert_eq!(
        rig.experiment(&next[0]).state,
        pb::ExperimentState::Succeeded as i32
    );
    assert_one_step_per_device(&rig.events());
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unconfirmed_safe_state_leaves_the_device_unsafe_and_ungranted_until_confirmed() {
    let clock = Clock::new(1.0);
    let rig = Rig::start(lab(clock), clock, 60.0).await;
    let f1 = rig.devices["furnace-1"].clone();
    *f1.fault.lock().unwrap() = Some("heater fail".into());
    // More transient failures than the retry policy's 3 retries: the safe state fails.
    f1.safe_failures.store(4, Ordering::SeqCst);
    let ids = rig
        .submit(
            "unsafe",
            vec![spec("bad", 0, vec![pinned(furnace(100.0), "furnace-1")])],
        )
        .await;
    rig.until_terminal(&ids).await;
    let handle = rig.sched.devices().get("furnace-1").unwrap().clone();
    let reason = handle.unsafe_reason().expect("furnace-1 unsafe");
    assert!(reason.contains("safe state failed"), "{reason}");
    assert!(!handle.is_available());
    let shown = handle.to_proto();
    assert!(shown.r#unsafe);
    assert_eq!(shown.unsafe_reason, reason);
    let raised = |ev: &[pb::Event], cleared: bool| {
        ev.iter().any(|e| {
            e.device_id == "furnace-1"
                && matches!(&e.kind, Some(Kind::Alarm(a))
                    if a.code == crate::devices::SAFE_STATE_PENDING
                        && a.cleared == cleared
                        && a.severity == pb::AlarmSeverity::Critical as i32)
        })
    };
    assert!(raised(&rig.events(), false));
    // Durable: the alarms table has it, so a restart knows the device is unsafe.
    let stored = rig.sched.store().alarms().unwrap();
    assert!(stored.iter().any(|(id, alarms)| {
        id == "furnace-1"
            && alarms
                .iter()
                .any(|a| a.code == crate::devices::SAFE_STATE_PENDING && !a.cleared)
    }));

    // New work pinned to it waits: an unsafe device takes no reservation.
    *f1.fault.lock().unwrap() = None;
    let next = rig
        .submit(
            "after",
            vec![spec("next", 0, vec![pinned(furnace(10.0), "furnace-1")])],
        )
        .await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        rig.experiment(&next[0]).state,
        pb::ExperimentState::Queued as i32
    );
    // Confirmed safe (what the poll task does on a reconnect): the alarm clears and the
    // waiting experiment runs.
    assert!(handle.secure(rig.sched.store()).await);
    assert_eq!(handle.unsafe_reason(), None);
    assert!(raised(&rig.events(), true));
    rig.until_terminal(&next).await;
    assert_eq!(
        rig.experiment(&next[0]).state,
        pb::ExperimentState::Succeeded as i32
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cancel_after_the_current_step_lets_it_finish_and_runs_no_more() {
    let clock = Clock::new(1.0);
    let rig = Rig::start(lab(clock), clock, 60.0).await;
    let ids = rig
        .submit(
            "later",
            vec![spec(
                "two",
                0,
                vec![
                    pinned(furnace(500.0), "furnace-1"),
                    pinned(furnace(500.0), "furnace-1"),
                ],
            )],
        )
        .await;
    rig.until("the first step running", |ev| {
        count(ev, |k| matches!(k, Kind::StepStarted(_))) == 1
    })
    .await;
    let e = rig
        .sched
        .cancel(&ids[0], "enough".into(), true)
        .await
        .unwrap();
    assert_eq!(e.state, pb::ExperimentState::Running as i32);
    rig.until_terminal(&ids).await;
    let e = rig.experiment(&ids[0]);
    assert_eq!(e.state, pb::ExperimentState::Cancelled as i32);
    assert_eq!(e.message, "enough");
    assert_eq!(e.results.len(), 1);
    assert_eq!(e.results[0].outcome, pb::StepOutcome::Succeeded as i32);
    assert_eq!(rig.devices["furnace-1"].runs().len(), 1);
    rig.stop().await;
}

/// A store left as a crash mid-step leaves it: a RUNNING experiment whose step `step` on
/// `device` is journaled and reserved, started `elapsed_s` ago.
fn crashed_store(
    dir: &TempDir,
    device: &str,
    step: pb::Step,
    elapsed_s: u64,
) -> (Arc<Store>, String) {
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let id = "01CRASHED".to_owned();
    let e = pb::Experiment {
        id: id.clone(),
        batch_id: "B".into(),
        spec: Some(pb::ExperimentSpec {
            sample_id: "S".into(),
            steps: vec![step.clone()],
            ..Default::default()
        }),
        state: pb::ExperimentState::Running as i32,
        ..Default::default()
    };
    let started = std::time::SystemTime::now() - Duration::from_secs(elapsed_s);
    let d = device.to_owned();
    store
        .write(move |w| {
            w.put_experiment(&e)?;
            w.put_reservation(&d, &e.id, 0)?;
            w.put_journal(&JournalEntry {
                device_id: d.clone(),
                experiment_id: e.id.clone(),
                batch_id: "B".into(),
                step_index: 0,
                step: Some(step),
                started_at: Some(started.into()),
            })?;
            Ok(())
        })
        .unwrap();
    (store, id)
}

fn decisions(events: &[pb::Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::RecoveryDecision(d)) => Some((e.device_id.clone(), d.action.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn recovery_makes_each_family_safe_and_interrupts_by_default() {
    for (device, step, action) in [
        ("furnace-1", furnace(1000.0), "furnace_safe_state"),
        ("pump-1", dispense(5.0), "pump_stopped"),
        ("analyser-1", isotherm(2, 100.0), "analyser_aborted"),
    ] {
        let clock = Clock::new(1.0);
        let dir = tempfile::tempdir().unwrap();
        let (store, id) = crashed_store(&dir, device, pinned(step, device), 10);
        let devices = lab(clock);
        let dev = devices
            .iter()
            .find(|d| d.info.id == device)
            .unwrap()
            .clone();
        dev.active.store(true, Ordering::SeqCst);
        let rig = Rig::start_on(dir, store, devices, clock, 1.0, RecoveryPolicy::default()).await;
        let e = rig.experiment(&id);
        assert_eq!(e.state, pb::ExperimentState::Interrupted as i32, "{device}");
        assert!(e.message.contains("daemon stopped"), "{}", e.message);
        assert!(!dev.active.load(Ordering::SeqCst), "{device} left active");
        let events = rig.events();
        assert_eq!(
            decisions(&events),
            [
                (device.to_owned(), action.to_owned()),
                (String::new(), "interrupted".to_owned())
            ]
        );
        assert!(rig.sched.store().journal().unwrap().is_empty());
        assert_eq!(
            count(&events, |k| matches!(k, Kind::DeviceReleased(_))),
            1,
            "{device}"
        );
        rig.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn recovery_resumes_from_the_interrupted_step_under_on_restart_resume() {
    let clock = Clock::new(1.0);
    let dir = tempfile::tempdir().unwrap();
    let (store, id) = crashed_store(&dir, "furnace-1", pinned(furnace(1000.0), "furnace-1"), 10);
    let policy = RecoveryPolicy {
        on_restart: OnRestart::Resume,
        ..RecoveryPolicy::default()
    }
    .with_family("furnace", AdoptPolicy::Safe);
    let rig = Rig::start_on(dir, store, lab(clock), clock, 1.0, policy).await;
    rig.until_terminal(std::slice::from_ref(&id)).await;
    let e = rig.experiment(&id);
    assert_eq!(
        e.state,
        pb::ExperimentState::Succeeded as i32,
        "{}",
        e.message
    );
    assert_eq!(e.results.len(), 1, "one result per step");
    // The step ran again from its start.
    assert_eq!(rig.devices["furnace-1"].runs(), [(0.0, 1000.0)]);
    let events = rig.events();
    assert_eq!(
        decisions(&events),
        [
            ("furnace-1".to_owned(), "furnace_safe_state".to_owned()),
            (String::new(), "resumed".to_owned())
        ]
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn recovery_adopts_a_running_furnace_program_under_furnace_adopt() {
    let clock = Clock::new(1.0);
    let dir = tempfile::tempdir().unwrap();
    // Started 400 s ago (wall clock, scale 1): 600 s of the hold remain.
    let (store, id) = crashed_store(&dir, "furnace-1", pinned(furnace(1000.0), "furnace-1"), 400);
    let devices = lab(clock);
    devices[2].active.store(true, Ordering::SeqCst);
    let policy = RecoveryPolicy {
        on_restart: OnRestart::Interrupt,
        ..RecoveryPolicy::default()
    }
    .with_family("furnace", AdoptPolicy::Adopt);
    let rig = Rig::start_on(dir, store, devices, clock, 1.0, policy).await;
    let f1 = rig.devices["furnace-1"].clone();
    assert_eq!(
        f1.safe_calls.load(Ordering::SeqCst),
        0,
        "an adopted furnace is not made safe"
    );
    rig.until_terminal(std::slice::from_ref(&id)).await;
    let e = rig.experiment(&id);
    assert_eq!(
        e.state,
        pb::ExperimentState::Succeeded as i32,
        "{}",
        e.message
    );
    assert_eq!(f1.adopted.load(Ordering::SeqCst), 1);
    let runs = f1.runs();
    assert_eq!(runs.len(), 1);
    assert!((runs[0].1 - runs[0].0 - 600.0).abs() < 2.0, "{runs:?}");
    let events = rig.events();
    assert_eq!(
        decisions(&events),
        [("furnace-1".to_owned(), "furnace_adopted".to_owned())]
    );
    // The reservation made before the crash is released once, after the adopted step.
    assert_eq!(count(&events, |k| matches!(k, Kind::DeviceReleased(_))), 1);
    assert!(rig.sched.store().journal().unwrap().is_empty());
    rig.stop().await;
}

/// A store left as a crash between steps leaves it: experiment `id` RUNNING with step 0
/// finished on `furnace-1` (where its sample now is), step 1 not started, nothing journaled;
/// `transferring` adds a pending move of its sample (custody uncertain).
fn between_steps(store: &Arc<Store>, id: &str, transferring: bool) {
    let e = pb::Experiment {
        id: id.to_owned(),
        batch_id: "B".into(),
        spec: Some(spec(id, 0, vec![furnace(100.0), furnace(100.0)])),
        state: pb::ExperimentState::Running as i32,
        current_step: 1,
        results: vec![pb::StepResult {
            step_index: 0,
            device_id: "furnace-1".into(),
            outcome: pb::StepOutcome::Succeeded as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    let sample = format!("S-{id}");
    store
        .write(move |w| {
            w.put_experiment(&e)?;
            w.set_rank(&e.id, 0)?;
            w.set_custody(&sample, Some("furnace-1"))?;
            if transferring {
                w.put_transfer(&pb::PendingTransfer {
                    id: format!("{}/1", e.id),
                    experiment_id: e.id.clone(),
                    step_index: 1,
                    sample_id: sample.clone(),
                    from_device_id: "furnace-1".into(),
                    to_device_id: "furnace-2".into(),
                    ..Default::default()
                })?;
            }
            Ok(())
        })
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn recovery_requeues_work_stopped_between_steps_at_its_place_unless_custody_is_uncertain() {
    let clock = Clock::new(1.0);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    // Ids sort in submission order: A was submitted before the QUEUED one, B, and C.
    between_steps(&store, "01A", false);
    between_steps(&store, "01C", true);
    let b = pb::Experiment {
        id: "01B".into(),
        batch_id: "B".into(),
        spec: Some(spec("01B", 0, vec![furnace(100.0)])),
        state: pb::ExperimentState::Queued as i32,
        ..Default::default()
    };
    store
        .write(move |w| {
            w.put_experiment(&b)?;
            w.set_rank(&b.id, 0)
        })
        .unwrap();
    // One furnace: A and B compete for it, and A must keep its place ahead of B.
    let devices = vec![TestDevice::new(
        "furnace-1",
        "furnace".to_owned(),
        "furnace_program".to_owned(),
        clock,
    )];
    let rig = Rig::start_on(dir, store, devices, clock, 1.0, RecoveryPolicy::default()).await;
    let ids = ["01A".to_owned(), "01B".to_owned(), "01C".to_owned()];
    rig.until_terminal(&ids).await;

    let events = rig.events();
    let decided: Vec<(String, String, u32)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::RecoveryDecision(d)) => {
                Some((e.experiment_id.clone(), d.action.clone(), d.step_index))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        decided,
        [
            ("01A".to_owned(), "requeued".to_owned(), 1),
            ("01C".to_owned(), "interrupted".to_owned(), 1),
        ]
    );
    // A went RUNNING → QUEUED → RUNNING and ran only its second step, before B.
    let a = rig.experiment("01A");
    assert_eq!(
        a.state,
        pb::ExperimentState::Succeeded as i32,
        "{}",
        a.message
    );
    assert_eq!(
        a.results.iter().map(|r| r.step_index).collect::<Vec<_>>(),
        [0, 1]
    );
    let transitions: Vec<(String, i32, i32)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::ExperimentStateChanged(c)) => Some((e.experiment_id.clone(), c.from, c.to)),
            _ => None,
        })
        .collect();
    let (q, r) = (
        pb::ExperimentState::Queued as i32,
        pb::ExperimentState::Running as i32,
    );
    assert_eq!(transitions[0], ("01A".to_owned(), r, q));
    let started: Vec<&str> = transitions
        .iter()
        .filter(|(_, from, to)| *from == q && *to == r)
        .map(|(id, _, _)| id.as_str())
        .collect();
    assert_eq!(started, ["01A", "01B"]);
    assert_eq!(rig.devices["furnace-1"].runs().len(), 2, "A's step 1 and B");
    assert_eq!(
        rig.experiment("01B").state,
        pb::ExperimentState::Succeeded as i32
    );
    // C's sample was being moved: where it is is uncertain, so a person decides.
    let c = rig.experiment("01C");
    assert_eq!(c.state, pb::ExperimentState::Interrupted as i32);
    assert!(c.message.contains("uncertain"), "{}", c.message);
    rig.stop().await;
}
