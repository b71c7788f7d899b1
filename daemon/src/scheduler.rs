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

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pb::event::Kind;
use ppu_drivers::device::StepOutput;
use ppu_drivers::{Clock, DeviceError, StepCommand, StepContext, StepUpdate};
use ppu_proto::v1 as pb;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::board::{Board, Need, Running, StopReason};
use crate::devices::{DeviceHandle, Devices};
use crate::error::{Error, Rejection, RejectionKind};
use crate::journal::JournalEntry;
use crate::lifecycle::set_state;
use crate::metrics;
use crate::queue::{OrderKey, priority};
use crate::recovery::{self, OnRestart, RecoveryPolicy, safe_action};
use crate::results;
use crate::safety;
use crate::state::{State, StepPhase};
use crate::store::{Store, StoreError, WriteTx, now_timestamp};

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

/// Separates the QUEUED experiments that the configured devices can no longer run — a device
/// removed or a limit tightened since they were accepted — from the rest, with the first
/// problem of each (the same check a submission gets). Left queued they would wait forever.
fn split_unrunnable(
    experiments: Vec<pb::Experiment>,
    devices: &Devices,
) -> (Vec<pb::Experiment>, Vec<(pb::Experiment, String)>) {
    let mut keep = Vec::with_capacity(experiments.len());
    let mut unrunnable = Vec::new();
    for e in experiments {
        let problem = (State::from_proto(e.state) == Some(State::Queued))
            .then(|| {
                e.spec.as_ref().and_then(|spec| {
                    // The steps still to run: one requeued by recovery has finished steps
                    // and inserted transfers behind it.
                    spec.steps
                        .iter()
                        .enumerate()
                        .skip(e.current_step as usize)
                        .filter(|(_, step)| !matches!(step.kind, Some(pb::step::Kind::Transfer(_))))
                        .find_map(|(i, step)| {
                            safety::check_step(step, &format!("steps[{i}]"), devices)
                                .err()
                                .map(|r| format!("{}: {}", r.field, r.reason))
                        })
                })
            })
            .flatten();
        match problem {
            Some(p) => unrunnable.push((e, p)),
            None => keep.push(e),
        }
    }
    (keep, unrunnable)
}

/// Marks experiments found unrunnable at start-up FAILED, with the reason, in one commit.
async fn fail_unrunnable(
    store: &Arc<Store>,
    unrunnable: Vec<(pb::Experiment, String)>,
) -> Result<(), StoreError> {
    for (e, problem) in &unrunnable {
        warn!(experiment = %e.id, %problem, "queued experiment can no longer run: failed");
    }
    store
        .write_async(move |w| {
            for (mut e, problem) in unrunnable {
                let reason = format!(
                    "can no longer run with the configured devices: {problem} (the \
                     configuration changed after it was accepted)"
                );
                if set_state(&mut e, State::Failed, &reason, w).is_ok() {
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

/// A write whose closure can refuse with a gRPC-shaped reason.
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

fn content_hash(experiments: &[pb::ExperimentSpec]) -> String {
    let mut h = Sha256::new();
    for e in experiments {
        h.update(e.encode_length_delimited_to_vec());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
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
        let recovered = recovery::recover(&store, &devices, policy).await?;
        let adopted = recovered
            .adopt
            .iter()
            .map(|e| e.device_id.clone())
            .collect();
        devices.all_safe_except(&store, &adopted).await;

        let s = store.clone();
        let loaded = blocking(move || {
            Ok((
                s.experiments_in(&[State::Queued, State::Running])?,
                s.ranks()?,
                s.custody()?,
                s.cancel_after()?,
                s.queue_paused()?,
            ))
        })
        .await?;
        let (experiments, ranks, custody, cancel_after, paused) = loaded;
        let (experiments, unrunnable) = split_unrunnable(experiments, &devices);
        if !unrunnable.is_empty() {
            fail_unrunnable(&store, unrunnable).await?;
        }
        let ranks: std::collections::HashMap<String, i64> = ranks.into_iter().collect();
        let cancel_after: std::collections::HashMap<String, String> =
            cancel_after.into_iter().collect();
        let stop = CancellationToken::new();
        let mut board = Board::default();
        board.paused = paused;
        for (sample, device) in &custody {
            board.place(sample, device);
        }
        let mut starts = Vec::new();
        for e in &experiments {
            let rank = ranks.get(&e.id).copied().unwrap_or(0);
            match State::from_proto(e.state) {
                Some(State::Queued) => board.enqueue(e, rank),
                Some(State::Running) => {
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
                    board.running.insert(
                        e.id.clone(),
                        Running {
                            key: OrderKey::new(priority(e), rank, e.id.clone()),
                            sample: sample_key(e),
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
                        e.id.clone(),
                        match adopt {
                            Some(j) => Start::Adopt(j),
                            None => Start::Resume,
                        },
                    ));
                }
                _ => {}
            }
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

    pub fn policy(&self) -> RecoveryPolicy {
        self.inner.policy
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

    // -----------------------------------------------------------------------------------------
    // Submission and queue control
    // -----------------------------------------------------------------------------------------

    /// Validates, stores and enqueues a batch; see `SubmitBatch` in the API.
    pub async fn submit(&self, req: pb::SubmitBatchRequest) -> Result<(pb::Batch, bool), Error> {
        self.submit_as(req, "").await
    }

    /// [`Scheduler::submit`] on behalf of `principal`, stored as the batch's `submitted_by`.
    pub async fn submit_as(
        &self,
        req: pb::SubmitBatchRequest,
        principal: &str,
    ) -> Result<(pb::Batch, bool), Error> {
        safety::check_batch(&req, &self.inner.devices)?;
        let hash = content_hash(&req.experiments);
        if let Some(found) = self.existing_batch(&req.idempotency_key, &hash)? {
            return Ok((found, true));
        }
        self.check_maintenance(&req)?;
        let batch_id = self.next_id()?;
        let mut experiments = Vec::with_capacity(req.experiments.len());
        let now = now_timestamp();
        for spec in req.experiments {
            experiments.push(pb::Experiment {
                id: self.next_id()?,
                batch_id: batch_id.clone(),
                spec: Some(spec),
                state: State::Queued.to_proto() as i32,
                created_at: Some(now),
                updated_at: Some(now),
                ..Default::default()
            });
        }
        let ranks: Vec<i64> = {
            let mut b = self.lock();
            experiments.iter().map(|_| b.queue.alloc_rank()).collect()
        };
        let batch = pb::Batch {
            id: batch_id,
            idempotency_key: req.idempotency_key.clone(),
            experiment_ids: experiments.iter().map(|e| e.id.clone()).collect(),
            created_at: Some(now),
            submitted_by: principal.to_owned(),
        };
        let key = req.idempotency_key;
        let (stored, _) = self
            .inner
            .store
            .write_async(move |w| {
                // A concurrent submission with the same key may have won the race.
                if let Some((id, _)) = w.find_idempotency_key(&key)? {
                    return Ok(Err(id));
                }
                for (e, rank) in experiments.iter().zip(&ranks) {
                    w.put_experiment(e)?;
                    w.set_rank(&e.id, *rank)?;
                    w.emit(
                        &e.id,
                        &e.batch_id,
                        "",
                        Kind::ExperimentStateChanged(pb::ExperimentStateChanged {
                            from: pb::ExperimentState::Unspecified as i32,
                            to: pb::ExperimentState::Queued as i32,
                            reason: String::new(),
                        }),
                    );
                }
                w.put_batch(&batch, &hash)?;
                Ok(Ok((batch, experiments, ranks)))
            })
            .await?;
        match stored {
            Ok((batch, experiments, ranks)) => {
                {
                    let mut b = self.lock();
                    for (e, rank) in experiments.iter().zip(ranks) {
                        b.enqueue(e, rank);
                    }
                }
                info!(batch = %batch.id, experiments = experiments.len(), "batch accepted");
                self.wake();
                Ok((batch, false))
            }
            Err(id) => {
                let b = self
                    .inner
                    .store
                    .get_batch(&id)?
                    .ok_or_else(|| Error::Internal("batch vanished".into()))?;
                Ok((b, true))
            }
        }
    }

    fn existing_batch(&self, key: &str, hash: &str) -> Result<Option<pb::Batch>, Error> {
        let Some((id, stored_hash)) = self.inner.store.find_idempotency_key(key)? else {
            return Ok(None);
        };
        if stored_hash != hash {
            return Err(Error::Conflict(format!(
                "idempotency_key: \"{key}\" was already used for a batch with different content (batch {id})"
            )));
        }
        Ok(self.inner.store.get_batch(&id)?)
    }

    /// A step pinned to a device in maintenance could never be reserved: refuse it now.
    fn check_maintenance(&self, req: &pb::SubmitBatchRequest) -> Result<(), Rejection> {
        for (i, e) in req.experiments.iter().enumerate() {
            for (j, s) in e.steps.iter().enumerate() {
                if s.device_id.is_empty() {
                    continue;
                }
                if let Some(reason) = self
                    .inner
                    .devices
                    .get(&s.device_id)
                    .and_then(|d| d.maintenance())
                {
                    return Err(Rejection {
                        kind: RejectionKind::Precondition,
                        field: format!("experiments[{i}].steps[{j}].device_id"),
                        reason: format!(
                            "device \"{}\" is in maintenance ({reason}) and takes no new reservations",
                            s.device_id
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// How many experiments are QUEUED (held ones included); O(1), for metrics.
    pub fn queue_depth(&self) -> usize {
        self.lock().queue.len()
    }

    /// QUEUED experiments in start order, held ones included.
    pub fn queued_ids(&self) -> Vec<String> {
        self.lock().queue.ids().map(str::to_owned).collect()
    }

    /// QUEUED experiments that are held, in start order.
    pub fn held_ids(&self) -> Vec<String> {
        let b = self.lock();
        b.queue
            .ids()
            .filter(|id| b.queued.get(*id).is_some_and(|q| q.held))
            .map(str::to_owned)
            .collect()
    }

    /// RUNNING experiments, in start order.
    pub fn running_ids(&self) -> Vec<String> {
        let b = self.lock();
        let mut keys: Vec<&OrderKey> = b.running.values().map(|r| &r.key).collect();
        keys.sort();
        keys.into_iter().map(|k| k.id.clone()).collect()
    }

    /// The queue as the API shows it.
    pub fn queue(&self) -> Result<pb::Queue, Error> {
        let paused = self.is_paused()?;
        Ok(pb::Queue {
            state: if paused {
                pb::QueueState::Paused
            } else {
                pb::QueueState::Running
            } as i32,
            running_ids: self.running_ids_in_store()?,
            queued_ids: self.queued_ids(),
            held_ids: self.held_ids(),
        })
    }

    /// Running experiments as the store records them: a runner that has committed its
    /// terminal state but not yet left the board no longer counts.
    fn running_ids_in_store(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for id in self.running_ids() {
            if self
                .inner
                .store
                .get_experiment(&id)?
                .is_some_and(|e| e.state == pb::ExperimentState::Running as i32)
            {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Pauses or resumes the queue, durably, logging the change. Paused, no device is
    /// reserved for any new step; steps already holding a device finish.
    pub async fn set_paused(&self, paused: bool, reason: String) -> Result<(), Error> {
        let store = self.inner.store.clone();
        let was = store.queue_paused()?;
        if was != paused {
            store
                .write_async(move |w| {
                    w.set_queue_paused(paused)?;
                    w.emit(
                        "",
                        "",
                        "",
                        Kind::QueueStateChanged(pb::QueueStateChanged { paused, reason }),
                    );
                    Ok(())
                })
                .await?;
            info!(paused, "queue state changed");
        }
        self.lock().paused = paused;
        self.wake();
        Ok(())
    }

    pub fn is_paused(&self) -> Result<bool, Error> {
        Ok(self.inner.store.queue_paused()?)
    }

    /// Pauses the queue and aborts every running experiment: running steps stop, their
    /// devices go to their safe state, the experiments become CANCELLED with `reason`.
    pub async fn abort_queue(&self, reason: String) -> Result<pb::Queue, Error> {
        let reason = if reason.is_empty() {
            "queue aborted".to_owned()
        } else {
            reason
        };
        self.set_paused(true, reason.clone()).await?;
        let ids = self.running_ids();
        let mut events = self.inner.store.subscribe();
        for id in &ids {
            self.stop_running(id, StopReason::Cancel(reason.clone()));
        }
        self.wait_terminal(&ids, &mut events).await?;
        self.queue()
    }

    /// Cancels an experiment; see `CancelExperiment` in the API.
    pub async fn cancel(
        &self,
        id: &str,
        reason: String,
        after_current_step: bool,
    ) -> Result<pb::Experiment, Error> {
        let reason = if reason.is_empty() {
            "cancelled by client".to_owned()
        } else {
            reason
        };
        let mut events = self.inner.store.subscribe();
        let (id_owned, r) = (id.to_owned(), reason.clone());
        let (outcome, _) = self
            .inner
            .store
            .write_async(move |w| {
                let Some(mut e) = w.get_experiment(&id_owned)? else {
                    return Ok(Outcome::Refused(not_found(&id_owned)));
                };
                match State::from_proto(e.state) {
                    Some(State::Queued) => match set_state(&mut e, State::Cancelled, &r, w) {
                        Ok(()) => {
                            w.put_experiment(&e)?;
                            Ok(Outcome::Done(Some(e)))
                        }
                        Err(rej) => Ok(Outcome::Refused(rej)),
                    },
                    Some(State::Running) => {
                        if after_current_step {
                            w.set_cancel_after(&id_owned, Some(&r))?;
                        }
                        Ok(Outcome::Done(None))
                    }
                    Some(done) => Ok(Outcome::Refused(Rejection {
                        kind: RejectionKind::Precondition,
                        field: "id".into(),
                        reason: format!("experiment {id_owned} has already finished ({done})"),
                    })),
                    None => Err(StoreError::Corrupt {
                        table: "experiments",
                        reason: format!("experiment {id_owned} has no valid state"),
                    }),
                }
            })
            .await?;
        match outcome {
            Outcome::Refused(r) => Err(r.into()),
            Outcome::Done(Some(e)) => {
                self.lock().dequeue(id);
                Ok(e)
            }
            Outcome::Done(None) => {
                let now = if after_current_step {
                    let mut b = self.lock();
                    match b.running.get_mut(id) {
                        // Between steps there is no current step to let finish.
                        Some(run)
                            if matches!(run.phase, StepPhase::Waiting | StepPhase::Released) =>
                        {
                            true
                        }
                        Some(run) => {
                            run.cancel_after = Some(reason.clone());
                            false
                        }
                        None => false,
                    }
                } else {
                    true
                };
                if !now {
                    return self
                        .inner
                        .store
                        .get_experiment(id)?
                        .ok_or_else(|| Error::NotFound(format!("id: no experiment \"{id}\"")));
                }
                self.stop_running(id, StopReason::Cancel(reason));
                let ids = [id.to_owned()];
                self.wait_terminal(&ids, &mut events).await?;
                self.inner
                    .store
                    .get_experiment(id)?
                    .ok_or_else(|| Error::NotFound(format!("id: no experiment \"{id}\"")))
            }
        }
    }

    /// Waits until every experiment in `ids` is terminal (or no longer running here).
    async fn wait_terminal(
        &self,
        ids: &[String],
        events: &mut tokio::sync::broadcast::Receiver<Arc<pb::Event>>,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + STOP_WAIT;
        loop {
            let mut pending = None;
            for id in ids {
                let e = self.inner.store.get_experiment(id)?;
                let stopped = e.as_ref().is_none_or(is_terminal)
                    || (!self.lock().running.contains_key(id)
                        && e.is_some_and(|e| e.state == pb::ExperimentState::Running as i32));
                if !stopped {
                    pending = Some(id.clone());
                    break;
                }
            }
            let Some(id) = pending else {
                return Ok(());
            };
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => {
                    return Err(Error::TimedOut(format!(
                        "experiment {id} is still stopping; watch its events"
                    )));
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                    return Err(Error::ShuttingDown);
                }
                Ok(_) => {}
            }
        }
    }

    fn stop_running(&self, id: &str, why: StopReason) {
        let mut b = self.lock();
        if let Some(run) = b.running.get_mut(id) {
            run.stop.get_or_insert(why);
            run.token.cancel();
        }
    }

    fn stop_reason(&self, id: &str) -> StopReason {
        self.lock()
            .running
            .get(id)
            .and_then(|r| r.stop.clone())
            .unwrap_or(StopReason::Shutdown)
    }

    fn cancel_after(&self, id: &str) -> Option<String> {
        self.lock()
            .running
            .get(id)
            .and_then(|r| r.cancel_after.clone())
    }

    /// Holds (`hold`) or releases a QUEUED experiment; idempotent.
    pub async fn set_held(
        &self,
        id: &str,
        hold: bool,
        reason: String,
    ) -> Result<pb::Experiment, Error> {
        let id_owned = id.to_owned();
        let (outcome, _) = self
            .inner
            .store
            .write_async(move |w| {
                let Some(mut e) = w.get_experiment(&id_owned)? else {
                    return Ok(Outcome::Refused(not_found(&id_owned)));
                };
                let state = State::from_proto(e.state);
                if state != Some(State::Queued) {
                    let what = if hold { "held" } else { "released" };
                    return Ok(Outcome::Refused(not_queued(&id_owned, state, what)));
                }
                if e.held != hold {
                    e.held = hold;
                    e.updated_at = Some(now_timestamp());
                    w.put_experiment(&e)?;
                    w.emit(
                        &e.id,
                        &e.batch_id,
                        "",
                        Kind::ExperimentHeld(pb::ExperimentHeld { held: hold, reason }),
                    );
                }
                Ok(Outcome::Done(e))
            })
            .await?;
        match outcome {
            Outcome::Refused(r) => Err(r.into()),
            Outcome::Done(e) => {
                if let Some(q) = self.lock().queued.get_mut(id) {
                    q.held = hold;
                }
                self.wake();
                Ok(e)
            }
        }
    }

    /// Moves a QUEUED experiment to `position` in the start order; see `MoveExperiment`.
    pub async fn move_experiment(&self, id: &str, position: u32) -> Result<pb::Queue, Error> {
        let _serial = self.inner.move_lock.lock().await;
        let Some(e) = self.inner.store.get_experiment(id)? else {
            return Err(not_found(id).into());
        };
        let state = State::from_proto(e.state);
        if state != Some(State::Queued) {
            return Err(not_queued(id, state, "moved").into());
        }
        let (plan, landed) = {
            let mut b = self.lock();
            let len = b.queue.len();
            let Some(plan) = b.queue.plan_move(id, position as usize) else {
                return Err(not_queued(id, Some(State::Running), "moved").into());
            };
            (plan, (position as usize).min(len.saturating_sub(1)) as u32)
        };
        let (p, id_owned) = (plan.clone(), id.to_owned());
        let (outcome, _) = self
            .inner
            .store
            .write_async(move |w| {
                let Some(mut e) = w.get_experiment(&id_owned)? else {
                    return Ok(Outcome::Refused(not_found(&id_owned)));
                };
                let state = State::from_proto(e.state);
                if state != Some(State::Queued) {
                    return Ok(Outcome::Refused(not_queued(&id_owned, state, "moved")));
                }
                for (member, rank) in &p.ranks {
                    w.set_rank(member, *rank)?;
                }
                e.spec.get_or_insert_default().priority = p.priority;
                e.updated_at = Some(now_timestamp());
                w.put_experiment(&e)?;
                w.emit(
                    &e.id,
                    &e.batch_id,
                    "",
                    Kind::ExperimentMoved(pb::ExperimentMoved {
                        position: landed,
                        priority: p.priority,
                    }),
                );
                Ok(Outcome::Done(()))
            })
            .await?;
        if let Outcome::Refused(r) = outcome {
            return Err(r.into());
        }
        self.lock().queue.apply_move(&plan);
        self.wake();
        self.queue()
    }

    // -----------------------------------------------------------------------------------------
    // Transfers and devices
    // -----------------------------------------------------------------------------------------

    /// Transfers waiting for confirmation.
    pub fn list_transfers(&self) -> Result<Vec<pb::PendingTransfer>, Error> {
        Ok(self.inner.store.transfers()?)
    }

    /// Confirms a transfer: the sample is now on its destination device and the experiment's
    /// TRANSFER step completes. The one path for operators, robots and the simulated lab.
    pub async fn confirm_transfer(
        &self,
        transfer_id: &str,
        confirmed_by: &str,
    ) -> Result<pb::PendingTransfer, Error> {
        let (tid, by) = (transfer_id.to_owned(), confirmed_by.to_owned());
        let (outcome, _) = self
            .inner
            .store
            .write_async(move |w| {
                let Some(p) = w.take_transfer(&tid)? else {
                    return Ok(Outcome::Refused(Rejection {
                        kind: RejectionKind::NotFound,
                        field: "transfer_id".into(),
                        reason: format!("no pending transfer \"{tid}\""),
                    }));
                };
                let Some(mut e) = w.get_experiment(&p.experiment_id)? else {
                    return Err(StoreError::Corrupt {
                        table: "transfers",
                        reason: format!("transfer {tid} names unknown experiment"),
                    });
                };
                let now = now_timestamp();
                let result = pb::StepResult {
                    step_index: p.step_index,
                    device_id: p.to_device_id.clone(),
                    outcome: pb::StepOutcome::Succeeded as i32,
                    started_at: p.requested_at,
                    finished_at: Some(now),
                    result: Some(pb::step_result::Result::Transfer(pb::TransferResult {
                        confirmed_by: by.clone(),
                    })),
                    ..Default::default()
                };
                e.results.push(result.clone());
                e.current_step = p.step_index + 1;
                e.updated_at = Some(now);
                w.put_experiment(&e)?;
                w.set_custody(&p.sample_id, Some(&p.to_device_id))?;
                w.emit(
                    &e.id,
                    &e.batch_id,
                    &p.to_device_id,
                    Kind::TransferConfirmed(pb::TransferConfirmed {
                        transfer: Some(p.clone()),
                        confirmed_by: by,
                    }),
                );
                w.emit(
                    &e.id,
                    &e.batch_id,
                    &p.to_device_id,
                    Kind::StepFinished(pb::StepFinished {
                        result: Some(result),
                    }),
                );
                Ok(Outcome::Done(p))
            })
            .await?;
        match outcome {
            Outcome::Refused(r) => Err(r.into()),
            Outcome::Done(p) => {
                let mut b = self.lock();
                b.place(&p.sample_id, &p.to_device_id);
                if let Some(signal) = b
                    .running
                    .get_mut(&p.experiment_id)
                    .and_then(|r| r.transfer.take())
                {
                    let _ = signal.send(());
                }
                info!(transfer = %p.id, sample = %p.sample_id, to = %p.to_device_id, "transfer confirmed");
                Ok(p)
            }
        }
    }

    /// A device as the API shows it, with the sample it holds.
    pub fn device_proto(&self, d: &DeviceHandle) -> pb::Device {
        let mut out = d.to_proto();
        out.holds_sample_id = self
            .lock()
            .sample_on(d.id())
            .map(str::to_owned)
            .unwrap_or_default();
        out
    }

    /// Takes a device into or out of maintenance, durably; see `SetMaintenance`.
    pub async fn set_maintenance(
        &self,
        device_id: &str,
        maintenance: bool,
        reason: String,
    ) -> Result<pb::Device, Error> {
        let Some(d) = self.inner.devices.get(device_id).cloned() else {
            return Err(Error::NotFound(format!("id: no device \"{device_id}\"")));
        };
        let new = maintenance.then(|| {
            if reason.is_empty() {
                "maintenance".to_owned()
            } else {
                reason.clone()
            }
        });
        if d.maintenance() != new {
            let (id, n) = (device_id.to_owned(), new.clone());
            self.inner
                .store
                .write_async(move |w| {
                    w.set_maintenance(&id, n.as_deref())?;
                    w.emit(
                        "",
                        "",
                        &id,
                        Kind::MaintenanceChanged(pb::MaintenanceChanged {
                            maintenance,
                            reason,
                        }),
                    );
                    Ok(())
                })
                .await?;
            info!(device = device_id, maintenance, "maintenance changed");
            d.set_maintenance(new);
        }
        self.wake();
        Ok(self.device_proto(&d))
    }

    // -----------------------------------------------------------------------------------------
    // Shutdown
    // -----------------------------------------------------------------------------------------

    /// Stops dispatching, aborts running steps (devices to safe state; experiments INTERRUPTED,
    /// or left RUNNING to resume under `on_restart = "resume"`) and waits for every runner.
    pub async fn shutdown(&self, task: JoinHandle<()>) {
        self.inner.stop.cancel();
        let _ = task.await;
        self.inner.runners.close();
        self.inner.runners.wait().await;
    }

    // -----------------------------------------------------------------------------------------
    // Dispatcher
    // -----------------------------------------------------------------------------------------

    async fn dispatch(self) {
        let mut storage = self.inner.store.health();
        loop {
            if self.inner.stop.is_cancelled() {
                return;
            }
            // Nothing starts while the store cannot record it: the grant would only be given
            // back. The dispatcher wakes again when the store recovers.
            let writable = storage.borrow_and_update().is_none();
            let starts = if !writable {
                Vec::new()
            } else {
                let mut b = self.lock();
                let t0 = std::time::Instant::now();
                let plan = b.decide(&self.inner.devices);
                let took = t0.elapsed();
                let mut starts = Vec::new();
                for a in &plan {
                    if b.grant(a, || self.inner.stop.child_token()) && a.starts {
                        starts.push(a.clone());
                    }
                }
                drop(b);
                if let Ok(mut s) = self.inner.stats.lock() {
                    s.rounds += 1;
                    s.grants += plan.len() as u64;
                    s.decide_total += took;
                    if !plan.is_empty() && s.granting_rounds.len() < MAX_ROUND_SAMPLES {
                        s.granting_rounds.push((took, plan.len()));
                    }
                }
                starts
            };
            for a in starts {
                self.spawn_runner(a.experiment_id, Start::Granted(a.device_id));
            }
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = self.inner.devices.changed().notified() => {}
                r = storage.changed() => if r.is_err() { return },
                _ = self.inner.stop.cancelled() => return,
            }
        }
    }

    fn spawn_runner(&self, id: String, start: Start) {
        let this = self.clone();
        self.inner.runners.spawn(async move {
            let token = this.lock().running.get(&id).map(|r| r.token.clone());
            if let Some(token) = token
                && let Err(e) = this.drive(&id, start, &token).await
            {
                warn!(experiment = %id, error = %e, "experiment bookkeeping failed");
            }
            this.lock().finish(&id);
            this.wake();
        });
    }

    // -----------------------------------------------------------------------------------------
    // Runner
    // -----------------------------------------------------------------------------------------

    /// Runs one experiment from `start` to a terminal state (or until shutdown).
    async fn drive(
        &self,
        id: &str,
        start: Start,
        token: &CancellationToken,
    ) -> Result<(), StoreError> {
        // A device reserved and logged, carried into the next step (after a transfer).
        let mut held: Option<String> = None;
        let mut pending: Option<(pb::PendingTransfer, oneshot::Receiver<()>)> = None;
        let mut adopt = None;
        match start {
            Start::Granted(device) => {
                if token.is_cancelled() {
                    // Stopped between the grant and the start: a cancel (AbortQueue) cancels
                    // it; a shutdown leaves it QUEUED for the next run.
                    return match self.stop_reason(id) {
                        StopReason::Cancel(reason) => self.cancel_unstarted(id, reason).await,
                        StopReason::Shutdown => self.requeue(id).await,
                    };
                }
                let signal = self.arm_transfer(id);
                let reserved = match self.reserve(id, &device, true).await {
                    // The start was not recorded, so it did not happen: back to the queue.
                    Err(StoreError::Unavailable(_)) => return self.requeue(id).await,
                    r => r?,
                };
                match reserved {
                    None => return self.requeue(id).await,
                    Some(r) => {
                        info!(experiment = id, device = %device, "experiment started");
                        pending = r.transfer.map(|p| (p, signal));
                        held = Some(device);
                    }
                }
            }
            Start::Resume => info!(experiment = id, "experiment resumed"),
            Start::Adopt(entry) => {
                held = Some(entry.device_id.clone());
                adopt = Some(entry);
            }
        }
        loop {
            if let Some(entry) = adopt.take() {
                let device = held.take().unwrap_or_else(|| entry.device_id.clone());
                let j = entry.step_index as usize;
                if self.run_step(id, j, device, token, Some(entry)).await? == Flow::Done {
                    return Ok(());
                }
                continue;
            }
            if let Some((p, signal)) = pending.take() {
                if self.wait_transfer(id, signal, token).await {
                    // The confirmation advanced the experiment; the reservation carries on.
                    continue;
                }
                return self.conclude(id, held.take(), Some(p), None).await;
            }
            let Some(exp) = self.inner.store.get_experiment(id)? else {
                return Ok(());
            };
            if State::from_proto(exp.state) != Some(State::Running) {
                return self.conclude(id, held.take(), None, None).await;
            }
            let steps = exp.spec.as_ref().map(|s| s.steps.len()).unwrap_or(0);
            let j = exp.current_step as usize;
            if j >= steps {
                return self
                    .conclude(
                        id,
                        held.take(),
                        None,
                        Some((State::Succeeded, String::new())),
                    )
                    .await;
            }
            if token.is_cancelled() {
                return self.conclude(id, held.take(), None, None).await;
            }
            if let Some(reason) = self.cancel_after(id) {
                return self
                    .conclude(id, held.take(), None, Some((State::Cancelled, reason)))
                    .await;
            }
            let device = match held.take() {
                Some(d) => d,
                None => {
                    let step = exp
                        .spec
                        .as_ref()
                        .and_then(|s| s.steps.get(j))
                        .cloned()
                        .unwrap_or_default();
                    let need = match Need::of(&step, &format!("steps[{j}]")) {
                        Ok(n) => n,
                        Err(why) => {
                            return self
                                .conclude(id, None, None, Some((State::Failed, why)))
                                .await;
                        }
                    };
                    if !self.inner.devices.all().any(|d| need.fits(d)) {
                        let why = format!("steps[{j}]: no configured device can run this step");
                        return self
                            .conclude(id, None, None, Some((State::Failed, why)))
                            .await;
                    }
                    let Some(d) = self.wait_grant(id, j as u32, need, token).await else {
                        return self.conclude(id, None, None, None).await;
                    };
                    let signal = self.arm_transfer(id);
                    match self.reserve(id, &d, false).await? {
                        None => {
                            self.lock().release(id);
                            return Ok(());
                        }
                        Some(r) => {
                            if let Some(p) = r.transfer {
                                pending = Some((p, signal));
                                held = Some(d);
                                continue;
                            }
                            d
                        }
                    }
                }
            };
            if self.run_step(id, j, device, token, None).await? == Flow::Done {
                return Ok(());
            }
        }
    }

    /// Puts a granted experiment that did not start (held meanwhile) back into the queue with
    /// its place; one that was cancelled meanwhile is simply forgotten.
    async fn requeue(&self, id: &str) -> Result<(), StoreError> {
        let e = loop {
            match self.inner.store.get_experiment(id) {
                Err(StoreError::Unavailable(_)) if self.wait_store().await => continue,
                r => break r?,
            }
        };
        let Some(e) = e else {
            return Ok(());
        };
        if State::from_proto(e.state) == Some(State::Queued) {
            let mut b = self.lock();
            let rank = b.running.get(id).map_or(0, |r| r.key.rank);
            b.finish(id);
            b.enqueue(&e, rank);
        }
        Ok(())
    }

    /// Cancels a granted experiment that is still QUEUED (it never held its device).
    async fn cancel_unstarted(&self, id: &str, reason: String) -> Result<(), StoreError> {
        let id_owned = id.to_owned();
        self.commit(move |w| {
            if let Some(mut e) = w.get_experiment(&id_owned)?
                && State::from_proto(e.state) == Some(State::Queued)
                && set_state(&mut e, State::Cancelled, &reason, w).is_ok()
            {
                w.put_experiment(&e)?;
            }
            Ok(())
        })
        .await?;
        self.requeue(id).await
    }

    /// Registers where a confirmation of this experiment's next transfer is signalled. Done
    /// before the transfer is committed, so a confirmation can never arrive unheard.
    fn arm_transfer(&self, id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if let Some(r) = self.lock().running.get_mut(id) {
            r.transfer = Some(tx);
        }
        rx
    }

    /// Announces the step's need and waits for the dispatcher's grant, or for a stop.
    async fn wait_grant(
        &self,
        id: &str,
        step_index: u32,
        need: Need,
        token: &CancellationToken,
    ) -> Option<String> {
        let rx = {
            let mut b = self.lock();
            let r = b.running.get_mut(id)?;
            match r.phase.advance(StepPhase::Waiting) {
                Ok(p) => r.phase = p,
                Err(e) => warn!(experiment = id, error = %e, "unexpected step phase"),
            }
            r.step_index = step_index;
            r.need = Some(need);
            let (tx, rx) = oneshot::channel();
            r.grant = Some(tx);
            rx
        };
        self.wake();
        tokio::select! {
            biased;
            _ = token.cancelled() => {
                // A grant that raced the stop is given back; nothing was logged for it yet.
                self.lock().release(id);
                self.wake();
                None
            }
            d = rx => d.ok(),
        }
    }

    /// Waits for the pending transfer's confirmation; false if stopped first.
    async fn wait_transfer(
        &self,
        id: &str,
        signal: oneshot::Receiver<()>,
        token: &CancellationToken,
    ) -> bool {
        self.advance(id, StepPhase::Transferring);
        let confirmed = tokio::select! {
            r = signal => r.is_ok(),
            _ = token.cancelled() => false,
        };
        if confirmed {
            self.advance(id, StepPhase::Reserved);
        }
        confirmed
    }

    fn advance(&self, id: &str, to: StepPhase) {
        if let Err(e) = self.lock().advance(id, to) {
            warn!(experiment = id, error = %e, "unexpected step phase");
        }
    }

    /// Commits the reservation of `device` for the experiment's current step, starting a
    /// QUEUED experiment if `starts`. When the sample is on another device it inserts a
    /// TRANSFER step (sample, from, to) before the step and requests the move; a TRANSFER step
    /// already current (after a restart) is requested again. `None` if the experiment is no
    /// longer in the expected state.
    async fn reserve(
        &self,
        id: &str,
        device: &str,
        starts: bool,
    ) -> Result<Option<Reservation>, StoreError> {
        let (id_owned, dev) = (id.to_owned(), device.to_owned());
        let reserve = move |w: &mut WriteTx<'_>| {
            let Some(mut e) = w.get_experiment(&id_owned)? else {
                return Ok(None);
            };
            let want = if starts {
                State::Queued
            } else {
                State::Running
            };
            // A hold that landed between the grant and this commit wins.
            if State::from_proto(e.state) != Some(want) || (starts && e.held) {
                return Ok(None);
            }
            if starts && set_state(&mut e, State::Running, "", w).is_err() {
                return Ok(None);
            }
            let j = e.current_step;
            let sample = sample_key(&e);
            let here = w.custody_of(&sample)?;
            let steps = &mut e.spec.get_or_insert_default().steps;
            let Some(step) = steps.get(j as usize).cloned() else {
                return Ok(None);
            };
            let transfer = match step.kind {
                Some(pb::step::Kind::Transfer(t)) => Some(t),
                _ => match here {
                    Some(from) if from != dev => {
                        let t = pb::Transfer {
                            sample_id: sample.clone(),
                            from_device_id: from,
                            to_device_id: dev.clone(),
                        };
                        steps.insert(
                            j as usize,
                            pb::Step {
                                device_id: dev.clone(),
                                kind: Some(pb::step::Kind::Transfer(t.clone())),
                            },
                        );
                        Some(t)
                    }
                    _ => None,
                },
            };
            let real = if transfer.is_some() { j + 1 } else { j };
            w.put_reservation(&dev, &e.id, real)?;
            w.emit(
                &e.id,
                &e.batch_id,
                &dev,
                Kind::DeviceReserved(pb::DeviceReserved { step_index: real }),
            );
            let pending = match transfer {
                None => None,
                Some(t) => {
                    let p = pb::PendingTransfer {
                        id: transfer_id(&e.id, j),
                        experiment_id: e.id.clone(),
                        step_index: j,
                        sample_id: t.sample_id.clone(),
                        from_device_id: t.from_device_id.clone(),
                        to_device_id: t.to_device_id.clone(),
                        requested_at: Some(now_timestamp()),
                    };
                    w.put_transfer(&p)?;
                    w.emit(
                        &e.id,
                        &e.batch_id,
                        &dev,
                        Kind::StepStarted(pb::StepStarted {
                            step_index: j,
                            step: steps.get(j as usize).cloned(),
                        }),
                    );
                    w.emit(
                        &e.id,
                        &e.batch_id,
                        &dev,
                        Kind::TransferRequested(pb::TransferRequested {
                            transfer: Some(p.clone()),
                        }),
                    );
                    Some(p)
                }
            };
            e.updated_at = Some(now_timestamp());
            w.put_experiment(&e)?;
            Ok(Some(Reservation { transfer: pending }))
        };
        // A start that cannot be recorded is given back (the caller requeues); a RUNNING
        // experiment keeps its grant and waits for the store.
        let r = if starts {
            self.inner.store.write_async(reserve).await?.0
        } else {
            self.commit(reserve).await?
        };
        if let Some(r) = &r
            && let Some(p) = &r.transfer
        {
            info!(experiment = id, transfer = %p.id, from = %p.from_device_id, to = %p.to_device_id, "transfer requested");
        }
        Ok(r)
    }

    /// Ends the experiment's run without a step in flight: gives back the reservation it
    /// holds (`held`), closes a pending transfer, and moves the experiment to `to` — or, when
    /// `to` is `None`, to what its stop reason says (cancel: CANCELLED; shutdown: INTERRUPTED,
    /// or left RUNNING under `on_restart = "resume"`).
    async fn conclude(
        &self,
        id: &str,
        held: Option<String>,
        pending: Option<pb::PendingTransfer>,
        to: Option<(State, String)>,
    ) -> Result<(), StoreError> {
        let to = match to {
            Some(t) => Some(t),
            None => match self.stop_reason(id) {
                StopReason::Cancel(r) => Some((State::Cancelled, r)),
                StopReason::Shutdown if self.inner.policy.on_restart == OnRestart::Resume => None,
                StopReason::Shutdown => Some((
                    State::Interrupted,
                    "daemon shut down between steps".to_owned(),
                )),
            },
        };
        let id_owned = id.to_owned();
        self.commit(move |w| {
            let Some(mut e) = w.get_experiment(&id_owned)? else {
                return Ok(());
            };
            // A transfer left pending on resume is requested again by the next run.
            if let Some(p) = pending.as_ref().filter(|_| to.is_some())
                && w.take_transfer(&p.id)?.is_some()
            {
                let result = pb::StepResult {
                    step_index: p.step_index,
                    device_id: p.to_device_id.clone(),
                    outcome: pb::StepOutcome::Aborted as i32,
                    message: "aborted before the transfer was confirmed".into(),
                    started_at: p.requested_at,
                    finished_at: Some(now_timestamp()),
                    ..Default::default()
                };
                e.results.push(result.clone());
                w.emit(
                    &e.id,
                    &e.batch_id,
                    &p.to_device_id,
                    Kind::StepFinished(pb::StepFinished {
                        result: Some(result),
                    }),
                );
            }
            if let Some(d) = &held
                && let Some((_, step)) = w.remove_reservation(d)?
            {
                w.emit(
                    &e.id,
                    &e.batch_id,
                    d,
                    Kind::DeviceReleased(pb::DeviceReleased { step_index: step }),
                );
            }
            if let Some((state, reason)) = &to
                && set_state(&mut e, *state, reason, w).is_ok()
            {
                w.set_cancel_after(&e.id, None)?;
            }
            w.put_experiment(&e)?;
            Ok(())
        })
        .await?;
        self.lock().release(id);
        self.wake();
        Ok(())
    }

    /// Runs step `j` on `device` (already reserved and logged), or — with `adopt` — finishes
    /// a step recovery re-attached to. Journals the intent before actuating; after a failure
    /// or abort always drives the device to its safe state; commits the result, the journal
    /// removal and the release in one transaction.
    async fn run_step(
        &self,
        id: &str,
        j: usize,
        device: String,
        token: &CancellationToken,
        adopt: Option<JournalEntry>,
    ) -> Result<Flow, StoreError> {
        let Some(dev) = self.inner.devices.get(&device).cloned() else {
            let why = format!("steps[{j}]: device {device} is not configured");
            self.conclude(id, Some(device), None, Some((State::Failed, why)))
                .await?;
            return Ok(Flow::Done);
        };
        let adopting = adopt.is_some();
        let (exp, step, started_at, elapsed) = match adopt {
            Some(entry) => {
                let Some(exp) = self.inner.store.get_experiment(id)? else {
                    return Ok(Flow::Done);
                };
                let elapsed = entry.elapsed_s(&self.inner.clock);
                (
                    exp,
                    entry.step.unwrap_or_default(),
                    entry.started_at.unwrap_or_else(now_timestamp),
                    Some(elapsed),
                )
            }
            None => {
                let (id_owned, d) = (id.to_owned(), device.clone());
                let started = self
                    .commit(move |w| {
                        let Some(e) = w.get_experiment(&id_owned)? else {
                            return Ok(None);
                        };
                        let Some(step) = e.spec.as_ref().and_then(|s| s.steps.get(j)).cloned()
                        else {
                            return Ok(None);
                        };
                        let now = now_timestamp();
                        // Intent first: a crash from here on leaves this entry for recovery.
                        w.put_journal(&JournalEntry {
                            device_id: d.clone(),
                            experiment_id: e.id.clone(),
                            batch_id: e.batch_id.clone(),
                            step_index: j as u32,
                            step: Some(step.clone()),
                            started_at: Some(now),
                        })?;
                        // A sample with no known place is loaded where its first step runs.
                        let sample = sample_key(&e);
                        let placed = if w.custody_of(&sample)?.is_none() {
                            w.set_custody(&sample, Some(&d))?;
                            Some(sample)
                        } else {
                            None
                        };
                        w.emit(
                            &e.id,
                            &e.batch_id,
                            &d,
                            Kind::StepStarted(pb::StepStarted {
                                step_index: j as u32,
                                step: Some(step.clone()),
                            }),
                        );
                        Ok(Some((e, step, now, placed)))
                    })
                    .await?;
                let Some((exp, step, now, placed)) = started else {
                    self.conclude(id, Some(device), None, None).await?;
                    return Ok(Flow::Done);
                };
                {
                    let mut b = self.lock();
                    if let Err(e) = b.advance(id, StepPhase::Executing) {
                        warn!(experiment = id, error = %e, "unexpected step phase");
                    }
                    if let Some(r) = b.running.get_mut(id) {
                        r.step_index = j as u32;
                    }
                    if let Some(s) = placed {
                        b.place(&s, &device);
                    }
                }
                (exp, step, now, None)
            }
        };
        let path = format!("steps[{j}]");
        let outcome = match safety::step_command(&step, &path) {
            Ok(cmd) => {
                let t0 = std::time::Instant::now();
                // While the guard lives, a link lost to the device raises `link_lost`.
                let stepping = dev.stepping();
                let out = self
                    .execute(&exp, j as u32, &dev, &cmd, token, elapsed)
                    .await;
                drop(stepping);
                match &out {
                    // An adopted step ran partly before this process: its time here says
                    // nothing about the step.
                    Ok(_) if !adopting => metrics::step_finished(dev.family(), t0.elapsed()),
                    Ok(_) | Err(DeviceError::Aborted) => {}
                    Err(e) => metrics::device_error(&device, e),
                }
                out
            }
            Err(r) => Err(DeviceError::Unsupported(format!(
                "{}: {}",
                r.field, r.reason
            ))),
        };
        if let Err(e) = &outcome {
            if e.is_transient() {
                dev.link_lost(self.store(), e).await;
            }
            // Safe state is always attempted after a failed or aborted step, even if the
            // driver already tried, with the device's retries, and confirmed by read-back;
            // unconfirmed, the device is marked unsafe (and alarmed) before it is released, so
            // nothing is granted it until its poll task confirms the safe state.
            self.advance(id, StepPhase::Stopping);
            if !dev.secure(self.store()).await {
                warn!(device = %device, "safe state not confirmed after step");
            }
        }
        let total = exp.spec.as_ref().map(|s| s.steps.len()).unwrap_or(0);
        let mut result = pb::StepResult {
            step_index: j as u32,
            device_id: device.clone(),
            started_at: Some(started_at),
            finished_at: Some(now_timestamp()),
            ..Default::default()
        };
        let on_restart = self.inner.policy.on_restart;
        let mut decision = None;
        // (keep the result on the experiment, advance past the step, terminal state)
        let (keep, advance, to) = match outcome {
            Ok(out) => {
                result.outcome = pb::StepOutcome::Succeeded as i32;
                result.result = Some(results::to_proto(out));
                let to = if j + 1 >= total {
                    Some((State::Succeeded, String::new()))
                } else if let Some(r) = self.cancel_after(id) {
                    Some((State::Cancelled, r))
                } else if adopting && on_restart == OnRestart::Interrupt {
                    let why = format!(
                        "daemon stopped while step {j} was running; the step was adopted and finished, and on_restart = interrupt stops the experiment here"
                    );
                    decision = Some(("interrupted", why.clone()));
                    Some((State::Interrupted, why))
                } else {
                    None
                };
                (true, true, to)
            }
            Err(DeviceError::Aborted) => {
                result.outcome = pb::StepOutcome::Aborted as i32;
                match self.stop_reason(id) {
                    StopReason::Cancel(r) => {
                        result.message = format!("aborted: {r}");
                        (true, false, Some((State::Cancelled, r)))
                    }
                    StopReason::Shutdown => {
                        result.message = "aborted: daemon shutting down".into();
                        let rerun = recovery::not_rerunnable(&step);
                        if on_restart == OnRestart::Resume
                            && let Some(why) = rerun
                        {
                            // Resuming would run it again from its start: see `recovery`.
                            let why = format!("daemon shut down while step {j} was running; {why}");
                            decision = Some((
                                "interrupted",
                                format!(
                                    "policy on_restart = resume, but step {j} cannot run again: {why}"
                                ),
                            ));
                            (true, false, Some((State::Interrupted, why)))
                        } else if on_restart == OnRestart::Resume {
                            (false, false, None)
                        } else {
                            let why = "daemon shut down while the step was running".to_owned();
                            (true, false, Some((State::Interrupted, why)))
                        }
                    }
                }
            }
            Err(e) if adopting && !matches!(e, DeviceError::Fault(_)) => {
                // The driver would not (or could not) take the program over: it is safe now,
                // and the experiment goes on as if recovery had made it safe.
                result.outcome = pb::StepOutcome::Aborted as i32;
                result.message = format!("could not adopt the running step: {e}");
                decision = Some((
                    safe_action(dev.family()),
                    format!("could not adopt: {e}; device sent to its safe state"),
                ));
                if on_restart == OnRestart::Resume {
                    (false, false, None)
                } else {
                    let why = format!(
                        "daemon stopped while step {j} was running; could not adopt it ({e}); the device was sent to its safe state"
                    );
                    (true, false, Some((State::Interrupted, why)))
                }
            }
            Err(e) => {
                result.outcome = pb::StepOutcome::Failed as i32;
                result.message = e.to_string();
                (
                    true,
                    false,
                    Some((State::Failed, format!("{path} on {device}: {e}"))),
                )
            }
        };
        let done = to.is_some();
        let saved = dev.driver.saved_state();
        let (id_owned, d) = (id.to_owned(), device.clone());
        // The device is already released or safe; the result is kept until the store takes
        // it (retried through a storage fault), and the experiment stays RUNNING meanwhile.
        self.commit(move |w| {
            w.take_journal(&d)?;
            let reserved = w.remove_reservation(&d)?;
            let Some(mut e) = w.get_experiment(&id_owned)? else {
                return Ok(());
            };
            if keep {
                e.results.push(result.clone());
            }
            if advance {
                e.current_step = j as u32 + 1;
            }
            e.updated_at = Some(now_timestamp());
            if let Some(state) = &saved {
                w.put_device_state(&d, state)?;
            }
            w.emit(
                &e.id,
                &e.batch_id,
                &d,
                Kind::StepFinished(pb::StepFinished {
                    result: Some(result.clone()),
                }),
            );
            w.emit(
                &e.id,
                &e.batch_id,
                &d,
                Kind::DeviceReleased(pb::DeviceReleased {
                    step_index: reserved.map_or(j as u32, |(_, s)| s),
                }),
            );
            if let Some((action, detail)) = &decision {
                w.emit(
                    &e.id,
                    &e.batch_id,
                    &d,
                    Kind::RecoveryDecision(pb::RecoveryDecision {
                        action: (*action).to_owned(),
                        step_index: j as u32,
                        detail: detail.clone(),
                    }),
                );
            }
            if let Some((state, reason)) = &to
                && set_state(&mut e, *state, reason, w).is_ok()
            {
                w.set_cancel_after(&e.id, None)?;
            }
            w.put_experiment(&e)?;
            Ok(())
        })
        .await?;
        self.lock().release(id);
        self.wake();
        if done {
            info!(experiment = id, "experiment finished");
            Ok(Flow::Done)
        } else {
            Ok(Flow::Next)
        }
    }

    /// Runs one step on its driver (or adopts it, given the elapsed physical time), turning
    /// its updates into device readings and (throttled) progress events.
    async fn execute(
        &self,
        exp: &pb::Experiment,
        step_index: u32,
        dev: &Arc<DeviceHandle>,
        cmd: &StepCommand,
        token: &CancellationToken,
        adopt_elapsed_s: Option<f64>,
    ) -> Result<StepOutput, DeviceError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let ctx = StepContext {
            clock: self.inner.clock,
            updates: tx,
            cancel: token.child_token(),
            sample_id: exp
                .spec
                .as_ref()
                .map(|s| s.sample_id.clone())
                .unwrap_or_default(),
            experiment_id: exp.id.clone(),
        };
        let run = match adopt_elapsed_s {
            Some(elapsed) => dev.driver.adopt(cmd, elapsed, ctx),
            None => dev.driver.execute(cmd, ctx),
        };
        tokio::pin!(run);
        let mut last_logged: Option<(Instant, String)> = None;
        loop {
            tokio::select! {
                out = &mut run => {
                    // Updates sent just before the driver returned are still queued: the last
                    // isotherm point must reach the log too.
                    while let Ok(update) = rx.try_recv() {
                        self.on_update(exp, step_index, dev, update, &mut last_logged).await;
                    }
                    return out;
                }
                Some(update) = rx.recv() => {
                    self.on_update(exp, step_index, dev, update, &mut last_logged).await;
                }
            }
        }
    }

    /// Turns one update of a running step into a device reading or a logged event; progress
    /// is throttled, isotherm points are logged every one.
    async fn on_update(
        &self,
        exp: &pb::Experiment,
        step_index: u32,
        dev: &Arc<DeviceHandle>,
        update: StepUpdate,
        last_logged: &mut Option<(Instant, String)>,
    ) {
        let kind = match update {
            StepUpdate::Reading(status) => {
                dev.record(&status);
                return;
            }
            StepUpdate::IsothermPoint { index, point } => {
                // Each point is durable as soon as it arrives: a crash mid-isotherm keeps it.
                Kind::IsothermPointMeasured(pb::IsothermPointMeasured {
                    step_index,
                    point_index: index,
                    point: Some(results::isotherm_point(point)),
                })
            }
            StepUpdate::Progress {
                fraction,
                message,
                remaining_s,
            } => {
                let due = last_logged
                    .as_ref()
                    .is_none_or(|(t, m)| *m != message || t.elapsed() >= PROGRESS_LOG_INTERVAL);
                if !due {
                    return;
                }
                *last_logged = Some((Instant::now(), message.clone()));
                Kind::StepProgress(pb::StepProgress {
                    step_index,
                    fraction: fraction.clamp(0.0, 1.0),
                    message,
                    remaining_s: remaining_s.unwrap_or(-1.0),
                })
            }
        };
        let (eid, bid, did) = (exp.id.clone(), exp.batch_id.clone(), dev.id().to_owned());
        if let Err(e) = self
            .inner
            .store
            .write_async(move |w| {
                w.emit(&eid, &bid, &did, kind);
                Ok(())
            })
            .await
        {
            warn!(error = %e, "could not log a step update");
        }
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
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
