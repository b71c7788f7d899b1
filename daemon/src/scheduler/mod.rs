//! The scheduler: accepts batches, starts experiments as devices become free, runs their steps
//! concurrently across devices, moves samples between devices, and records every transition
//! durably before anyone can observe it.
//!
//! Two kinds of task do the work. One *dispatcher* matches waiting steps to free devices
//! ([`Board::decide`]: priority, rank, submission order; devices in maintenance or disconnected
//! are skipped, held experiments wait, nothing is granted while the queue is paused). One
//! *runner* per RUNNING experiment then owns that experiment: it commits the reservation
//! (`DeviceReserved`), inserts a TRANSFER step when the sample is on another device and waits
//! for its confirmation, journals its intent, executes the step through the `Device` trait,
//! drives the device to its safe state after a failure or abort, and commits the result, the
//! journal removal and the release (`DeviceReleased`) in one transaction. A device is reserved
//! for one step (a transfer into it and the step it carries the sample to count as one).
//!
//! Every state change is a `Store::write` transaction that also appends its events, so the log
//! and the records never disagree; the in-memory board follows the commit.

mod control;
mod dispatch;
mod runner;
mod step;
mod submit;
mod transfer;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::board::{Board, Need, Running};
use crate::devices::Devices;
use crate::error::{Error, Rejection, RejectionKind};
use crate::journal::JournalEntry;
use crate::lifecycle::set_state;
use crate::metrics;
use crate::queue::OrderKey;
use crate::recovery::{self, RecoveryPolicy};
use crate::safety::{self, FirstStep};
use crate::state::{State, StepPhase};
use crate::store::{QueueView, Store, StoreError, WriteTx};

/// Least real time between two logged progress events of one step.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_millis(500);
/// How long `CancelExperiment` and `AbortQueue` wait for running steps to stop and their
/// devices to be safe.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// Dispatch rounds whose decision time is kept for [`Scheduler::stats`].
const MAX_ROUND_SAMPLES: usize = 100_000;

/// What the dispatcher spent deciding (real time), for benchmarks and diagnostics.
#[derive(Debug, Clone, Default)]
pub struct DispatchStats {
    /// Dispatch rounds run.
    pub rounds: u64,
    /// Devices granted.
    pub grants: u64,
    /// Total time in [`Board::decide`].
    pub decide_total: Duration,
    /// Decision time of each round that granted something, with its number of grants.
    pub granting_rounds: Vec<(Duration, usize)>,
}

/// How a runner starts.
enum Start {
    /// The dispatcher granted this device to a QUEUED experiment.
    Granted(String),
    /// A RUNNING experiment recovered at start-up: continue from its current step.
    Resume,
    /// Recovery adopted this journaled step, still running on its device.
    Adopt(JournalEntry),
}

/// Where a runner goes after a step.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Next,
    Done,
}

/// A committed reservation.
struct Reservation {
    /// The transfer inserted (or re-requested) for it, if the sample must move first.
    transfer: Option<pb::PendingTransfer>,
}

/// Shared state of the scheduler; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    devices: Devices,
    clock: Clock,
    policy: RecoveryPolicy,
    board: Mutex<Board>,
    ids: Mutex<ulid::Generator>,
    wake: Notify,
    stop: CancellationToken,
    runners: TaskTracker,
    /// Serialises moves: a move plans against the current order.
    move_lock: tokio::sync::Mutex<()>,
    stats: Mutex<DispatchStats>,
    /// Runners whose bookkeeping waits for the store to write again (a storage fault).
    waiting_on_store: std::sync::atomic::AtomicUsize,
}

/// Checks the steps a QUEUED experiment still has to run against the configured devices (the
/// same check a submission gets): a device removed or a limit tightened since it was accepted
/// makes it unrunnable, and left queued it would wait forever. Returns its next step resolved
/// (unless that step is a transfer), or the first problem. A requeued experiment has finished
/// steps and inserted transfers behind it: those are not checked.
fn check_queued(
    steps: &[pb::Step],
    current: u32,
    checks: &mut StepChecks,
) -> Result<Option<Arc<FirstStep>>, String> {
    let mut next = None;
    for (i, step) in steps.iter().enumerate().skip(current as usize) {
        if matches!(step.kind, Some(pb::step::Kind::Transfer(_))) {
            continue;
        }
        let cmd = checks.check(i, step)?;
        if i == current as usize {
            next = Some(cmd);
        }
    }
    Ok(next)
}

/// Checks of queued steps at start-up, each distinct step (by its position and encoding)
/// checked once: a queue is mostly a few recipes repeated, and the check (the schema's
/// validation, then the devices') is most of start-up's work. Equal steps also share one
/// resolved command in the board. Bounded: forgets everything past [`StepChecks::MAX`].
struct StepChecks<'a> {
    devices: &'a Devices,
    seen: std::collections::HashMap<(usize, Vec<u8>), Result<Arc<FirstStep>, String>>,
}

impl<'a> StepChecks<'a> {
    const MAX: usize = 4096;

    fn new(devices: &'a Devices) -> Self {
        Self {
            devices,
            seen: Default::default(),
        }
    }

    fn check(&mut self, i: usize, step: &pb::Step) -> Result<Arc<FirstStep>, String> {
        use prost::Message as _;
        let key = (i, step.encode_to_vec());
        if let Some(r) = self.seen.get(&key) {
            return r.clone();
        }
        let r = safety::check_step(step, &format!("steps[{i}]"), self.devices)
            .map(|cmd| Arc::new(FirstStep::from(&cmd)))
            .map_err(|r| format!("{}: {}", r.field, r.reason));
        if self.seen.len() >= Self::MAX {
            self.seen.clear();
        }
        self.seen.insert(key, r.clone());
        r
    }
}

/// The key sample custody is tracked under (see [`sample_key`]), from a [`QueueView`].
fn view_sample_key(e: &QueueView) -> String {
    match e.spec.as_ref().map(|s| s.sample_id.as_str()) {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => e.id.clone(),
    }
}

/// What start-up read from the store: the board of QUEUED experiments, and the RUNNING and
/// unrunnable ones still to be dealt with.
struct Loaded {
    board: Board,
    /// RUNNING experiments with their ranks.
    running: Vec<(QueueView, i64)>,
    /// QUEUED experiments the devices can no longer run: (id, problem).
    unrunnable: Vec<(String, String)>,
    cancel_after: std::collections::HashMap<String, String>,
}

/// Builds the board by streaming the experiments table once: each QUEUED experiment is decoded
/// as a [`QueueView`], checked, and kept only as its compact [`Queued`](crate::board::Queued)
/// entry, so start-up holds no list of every experiment.
fn load_board(store: &Store, devices: &Devices) -> Result<Loaded, StoreError> {
    let mut board = Board::default();
    board.paused = store.queue_paused()?;
    for (sample, device) in store.custody()? {
        board.place(&sample, &device);
    }
    let mut running = Vec::new();
    let mut unrunnable = Vec::new();
    let mut checks = StepChecks::new(devices);
    store.for_each_ranked(&[State::Queued, State::Running], |e: QueueView, rank| {
        match State::from_proto(e.state) {
            Some(State::Queued) => {
                let spec = e.spec.unwrap_or_default();
                match check_queued(&spec.steps, e.current_step, &mut checks) {
                    Ok(next) => board.enqueue_entry(
                        OrderKey::new(spec.priority, rank, e.id),
                        crate::board::Queued {
                            need: Need::at(&spec.steps, e.current_step, next),
                            sample: spec.sample_id.into(),
                            held: e.held,
                        },
                    ),
                    Err(problem) => unrunnable.push((e.id, problem)),
                }
            }
            Some(State::Running) => running.push((e, rank)),
            _ => {}
        }
        Ok(())
    })?;
    Ok(Loaded {
        board,
        running,
        unrunnable,
        cancel_after: store.cancel_after()?.into_iter().collect(),
    })
}

/// Marks experiments found unrunnable at start-up FAILED, with the reason, in one commit.
async fn fail_unrunnable(
    store: &Arc<Store>,
    unrunnable: Vec<(String, String)>,
) -> Result<(), StoreError> {
    for (id, problem) in &unrunnable {
        warn!(experiment = %id, %problem, "queued experiment can no longer run: failed");
    }
    store
        .write_async(move |w| {
            for (id, problem) in unrunnable {
                let Some(mut e) = w.get_experiment(&id)? else {
                    continue;
                };
                let reason = format!(
                    "can no longer run with the configured devices: {problem} (the \
                     configuration changed after it was accepted)"
                );
                if State::from_proto(e.state) == Some(State::Queued)
                    && set_state(&mut e, State::Failed, &reason, w).is_ok()
                {
                    w.put_experiment(&e)?;
                }
            }
            Ok(())
        })
        .await
        .map(drop)
}

/// The key sample custody is tracked under: the experiment's sample id, or its own id when it
/// names no sample (its material still has to move between devices).
pub(crate) fn sample_key(e: &pb::Experiment) -> String {
    match e.spec.as_ref().map(|s| s.sample_id.as_str()) {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => e.id.clone(),
    }
}

/// Transfer ids are derived from the step they belong to, so they survive a restart.
pub(crate) fn transfer_id(experiment_id: &str, step_index: u32) -> String {
    format!("{experiment_id}/{step_index}")
}

/// A write whose closure can refuse, naming the field and the reason.
enum Outcome<T> {
    Done(T),
    Refused(Rejection),
}

fn not_found(id: &str) -> Rejection {
    Rejection {
        kind: RejectionKind::NotFound,
        field: "id".into(),
        reason: format!("no experiment \"{id}\""),
    }
}

fn not_queued(id: &str, state: Option<State>, what: &str) -> Rejection {
    let state = state.map_or("in no valid state".to_owned(), |s| s.to_string());
    Rejection {
        kind: RejectionKind::Precondition,
        field: "id".into(),
        reason: format!("experiment {id} is {state}: only a QUEUED experiment can be {what}"),
    }
}

fn is_terminal(e: &pb::Experiment) -> bool {
    State::from_proto(e.state).is_some_and(State::is_terminal)
}

impl Scheduler {
    /// [`Scheduler::start_with`] the default recovery policy.
    pub async fn start(
        store: Arc<Store>,
        devices: Devices,
        clock: Clock,
    ) -> Result<(Self, JoinHandle<()>), StoreError> {
        Self::start_with(store, devices, clock, RecoveryPolicy::default()).await
    }

    /// Recovers what the last run left in flight (see `recovery`), drives every device it did
    /// not adopt to its safe state, rebuilds the board from the store and starts dispatching.
    /// Returns the dispatcher task.
    pub async fn start_with(
        store: Arc<Store>,
        devices: Devices,
        clock: Clock,
        policy: RecoveryPolicy,
    ) -> Result<(Self, JoinHandle<()>), StoreError> {
        let s = store.clone();
        let maintenance = blocking(move || s.maintenance()).await?;
        for (id, reason) in maintenance {
            if let Some(d) = devices.get(&id) {
                d.set_maintenance(Some(reason));
            }
        }
        let recovered = recovery::recover(&store, &devices, policy.clone()).await?;
        let adopted = recovered
            .adopt
            .iter()
            .map(|e| e.device_id.clone())
            .collect();
        devices.all_safe_except(&store, &adopted).await;

        let (s, d) = (store.clone(), devices.clone());
        let Loaded {
            mut board,
            running,
            unrunnable,
            cancel_after,
        } = blocking(move || load_board(&s, &d)).await?;
        if !unrunnable.is_empty() {
            fail_unrunnable(&store, unrunnable).await?;
        }
        let stop = CancellationToken::new();
        let mut starts = Vec::new();
        for (e, rank) in running {
            let adopt = recovered
                .adopt
                .iter()
                .find(|j| j.experiment_id == e.id)
                .cloned();
            let resume = recovered.resume.contains(&e.id);
            if adopt.is_none() && !resume {
                continue;
            }
            let device = adopt.as_ref().map(|j| j.device_id.clone());
            if let Some(d) = &device {
                board.holders.insert(d.clone(), e.id.clone());
            }
            let priority = e.spec.as_ref().map_or(0, |s| s.priority);
            board.running.insert(
                e.id.clone(),
                Running {
                    key: OrderKey::new(priority, rank, e.id.as_str()),
                    sample: view_sample_key(&e),
                    phase: if adopt.is_some() {
                        StepPhase::Executing
                    } else {
                        StepPhase::Released
                    },
                    step_index: e.current_step,
                    need: None,
                    grant: None,
                    device,
                    token: stop.child_token(),
                    stop: None,
                    cancel_after: cancel_after.get(&e.id).cloned(),
                    transfer: None,
                },
            );
            starts.push((
                e.id,
                match adopt {
                    Some(j) => Start::Adopt(j),
                    None => Start::Resume,
                },
            ));
        }
        let this = Scheduler {
            inner: Arc::new(Inner {
                store,
                devices,
                clock,
                policy,
                board: Mutex::new(board),
                ids: Mutex::new(ulid::Generator::new()),
                wake: Notify::new(),
                stop,
                runners: TaskTracker::new(),
                move_lock: tokio::sync::Mutex::new(()),
                stats: Mutex::new(DispatchStats::default()),
                waiting_on_store: Default::default(),
            }),
        };
        for (id, start) in starts {
            this.spawn_runner(id, start);
        }
        let task = tokio::spawn(this.clone().dispatch());
        Ok((this, task))
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// True when this is the last handle on the scheduler and nothing else holds the store
    /// (pollers, stream tasks and gRPC handlers have all let go).
    pub fn is_sole_owner(&self) -> bool {
        Arc::strong_count(&self.inner) == 1 && Arc::strong_count(&self.inner.store) == 1
    }

    pub fn devices(&self) -> &Devices {
        &self.inner.devices
    }

    /// The physical-time clock steps run on (its scale turns physical seconds into real ones).
    pub fn clock(&self) -> Clock {
        self.inner.clock
    }

    pub fn policy(&self) -> RecoveryPolicy {
        self.inner.policy.clone()
    }

    /// How many runners hold a commit (a step result, a reservation, a conclusion) that waits
    /// for the store to write again; 0 unless there is a storage fault.
    pub fn waiting_on_store(&self) -> usize {
        self.inner
            .waiting_on_store
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decision-time statistics of the dispatcher so far.
    pub fn stats(&self) -> DispatchStats {
        self.inner
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Board> {
        // The board is plain data; a panic elsewhere cannot leave it half-updated in a way
        // that refusing all service would improve.
        self.inner
            .board
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake(&self) {
        self.inner.wake.notify_one();
    }

    fn next_id(&self) -> Result<String, Error> {
        let mut g = self
            .inner
            .ids
            .lock()
            .map_err(|_| Error::Internal("id generator poisoned".into()))?;
        g.generate()
            .map(|u| u.to_string())
            .map_err(|e| Error::IdsExhausted(e.to_string()))
    }

    /// Stops dispatching, aborts running steps (devices to safe state; experiments INTERRUPTED,
    /// or left RUNNING to resume under `on_restart = "resume"`) and waits for every runner.
    pub async fn shutdown(&self, task: JoinHandle<()>) {
        self.inner.stop.cancel();
        let _ = task.await;
        self.inner.runners.close();
        self.inner.runners.wait().await;
    }
}

impl Scheduler {
    /// Commits `f`, waiting through a storage fault and trying again once the store writes
    /// again; only a stop of the daemon ends the wait (with the fault's error). For a runner's
    /// bookkeeping, which must not be lost: the in-memory state stays where it was until the
    /// commit lands.
    async fn commit<R: Send + 'static>(
        &self,
        f: impl Fn(&mut WriteTx<'_>) -> Result<R, StoreError> + Send + Sync + 'static,
    ) -> Result<R, StoreError> {
        let f = Arc::new(f);
        loop {
            let g = f.clone();
            match self.inner.store.write_async(move |w| g(w)).await {
                Ok((r, _)) => return Ok(r),
                Err(StoreError::Unavailable(reason)) => {
                    warn!(%reason, "bookkeeping waits for the store");
                    use std::sync::atomic::Ordering::Relaxed;
                    self.inner.waiting_on_store.fetch_add(1, Relaxed);
                    let back = self.wait_store().await;
                    self.inner.waiting_on_store.fetch_sub(1, Relaxed);
                    if !back {
                        return Err(StoreError::Unavailable(reason));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until the store writes again; false if the daemon stops first.
    async fn wait_store(&self) -> bool {
        let mut health = self.inner.store.health();
        tokio::select! {
            r = health.wait_for(Option::is_none) => r.is_ok(),
            _ = self.inner.stop.cancelled() => false,
        }
    }
}

/// Runs a blocking store read on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

impl metrics::Scraped for Scheduler {
    fn queue_depth(&self) -> usize {
        Scheduler::queue_depth(self)
    }

    fn store(&self) -> &Store {
        Scheduler::store(self)
    }

    fn device_gauges(&self) -> Vec<metrics::DeviceGauge> {
        self.devices()
            .all()
            .map(|d| metrics::DeviceGauge {
                id: d.id().to_owned(),
                transport: d.driver.info().transport.clone(),
                unsafe_now: d.unsafe_reason().is_some(),
                up: d.is_connected(),
            })
            .collect()
    }

    fn active_alarms(&self) -> Vec<ppu_proto::v1::ActiveAlarm> {
        self.devices()
            .all()
            .flat_map(|d| d.alarms())
            .chain(self.store().alarms_now())
            .filter(|a| !a.cleared)
            .collect()
    }
}

#[cfg(test)]
mod tests;
