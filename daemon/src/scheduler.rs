//! The scheduler: accepts batches, starts queued experiments, runs their steps on devices,
//! and records every transition durably before anyone can observe it.
//!
//! This foundation runs one experiment at a time, steps in order, each on its pinned device or
//! the first connected device with the capability. Every state change is a store transaction
//! that also appends the matching event, so the log and the records never disagree.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pb::event::Kind;
use ppu_drivers::device::{FurnaceResult, StepOutput};
use ppu_drivers::{Clock, DeviceError, StepContext, StepUpdate};
use ppu_proto::v1 as pb;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::devices::{DeviceHandle, Devices};
use crate::queue::QueueIndex;
use crate::safety::{self, Rejection};
use crate::state::State;
use crate::store::{Store, StoreError, WriteTx, now_timestamp};

/// Least real time between two logged progress events of one step.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_millis(500);
/// How long `CancelExperiment` waits for a running step to stop and its device to be safe.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        warn!(error = %e, "store failure");
        Status::internal(e.to_string())
    }
}

/// Why a running experiment is being stopped.
#[derive(Debug, Clone)]
enum StopReason {
    Cancel(String),
    Shutdown,
}

struct Running {
    token: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
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
    queue: Mutex<QueueIndex>,
    running: Mutex<HashMap<String, Running>>,
    ids: Mutex<ulid::Generator>,
    wake: Notify,
    stop: CancellationToken,
}

fn set_state(
    e: &mut pb::Experiment,
    to: State,
    reason: &str,
    w: &mut WriteTx<'_>,
) -> Result<(), Rejection> {
    let from = State::from_proto(e.state).ok_or_else(|| Rejection {
        code: Code::Internal,
        field: String::new(),
        reason: format!("experiment {} has no valid state", e.id),
    })?;
    from.transition(to).map_err(|t| Rejection {
        code: Code::FailedPrecondition,
        field: String::new(),
        reason: t.to_string(),
    })?;
    e.state = to.to_proto() as i32;
    e.updated_at = Some(now_timestamp());
    if !reason.is_empty() {
        e.message = reason.to_owned();
    }
    w.emit(
        &e.id,
        &e.batch_id,
        "",
        Kind::ExperimentStateChanged(pb::ExperimentStateChanged {
            from: from.to_proto() as i32,
            to: to.to_proto() as i32,
            reason: reason.to_owned(),
        }),
    );
    Ok(())
}

/// A write whose closure can refuse with a gRPC-shaped reason.
enum Outcome<T> {
    Done(T),
    Refused(Rejection),
}

fn content_hash(experiments: &[pb::ExperimentSpec]) -> String {
    let mut h = Sha256::new();
    for e in experiments {
        h.update(e.encode_length_delimited_to_vec());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Scheduler {
    /// Recovers from whatever the last run left: RUNNING experiments become INTERRUPTED (their
    /// process died mid-step) and every device is driven to its safe state.
    pub async fn start(
        store: Arc<Store>,
        devices: Devices,
        clock: Clock,
    ) -> Result<(Self, JoinHandle<()>), StoreError> {
        let (interrupted, _) = store
            .write_async(|w| {
                let running = w.experiments_in(State::Running)?;
                for mut e in running.iter().cloned() {
                    let reason = format!(
                        "daemon stopped while step {} was running; the device was sent to its safe state on restart",
                        e.current_step
                    );
                    if set_state(&mut e, State::Interrupted, &reason, w).is_ok() {
                        w.put_experiment(&e)?;
                    }
                }
                Ok(running.len())
            })
            .await?;
        if interrupted > 0 {
            warn!(
                interrupted,
                "experiments were running when the daemon last stopped; marked INTERRUPTED"
            );
        }
        devices.all_safe().await;
        let mut queue = QueueIndex::default();
        let s = store.clone();
        let queued = tokio::task::spawn_blocking(move || s.experiments_in(&[State::Queued]))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        for e in &queued {
            queue.insert(e);
        }
        let this = Scheduler {
            inner: Arc::new(Inner {
                store,
                devices,
                clock,
                queue: Mutex::new(queue),
                running: Mutex::new(HashMap::new()),
                ids: Mutex::new(ulid::Generator::new()),
                wake: Notify::new(),
                stop: CancellationToken::new(),
            }),
        };
        let task = tokio::spawn(this.clone().run());
        Ok((this, task))
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    pub fn devices(&self) -> &Devices {
        &self.inner.devices
    }

    fn next_id(&self) -> Result<String, Status> {
        let mut g = self
            .inner
            .ids
            .lock()
            .map_err(|_| Status::internal("id generator poisoned"))?;
        g.generate()
            .map(|u| u.to_string())
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    /// Validates, stores and enqueues a batch; see `SubmitBatch` in the API.
    pub async fn submit(&self, req: pb::SubmitBatchRequest) -> Result<(pb::Batch, bool), Status> {
        safety::check_batch(&req, &self.inner.devices)?;
        let hash = content_hash(&req.experiments);
        if let Some(found) = self.existing_batch(&req.idempotency_key, &hash)? {
            return Ok((found, true));
        }
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
        let batch = pb::Batch {
            id: batch_id,
            idempotency_key: req.idempotency_key.clone(),
            experiment_ids: experiments.iter().map(|e| e.id.clone()).collect(),
            created_at: Some(now),
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
                for e in &experiments {
                    w.put_experiment(e)?;
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
                Ok(Ok((batch, experiments)))
            })
            .await?;
        match stored {
            Ok((batch, experiments)) => {
                if let Ok(mut q) = self.inner.queue.lock() {
                    for e in &experiments {
                        q.insert(e);
                    }
                }
                info!(batch = %batch.id, experiments = experiments.len(), "batch accepted");
                self.inner.wake.notify_one();
                Ok((batch, false))
            }
            Err(id) => {
                let b = self
                    .inner
                    .store
                    .get_batch(&id)?
                    .ok_or_else(|| Status::internal("batch vanished"))?;
                Ok((b, true))
            }
        }
    }

    fn existing_batch(&self, key: &str, hash: &str) -> Result<Option<pb::Batch>, Status> {
        let Some((id, stored_hash)) = self.inner.store.find_idempotency_key(key)? else {
            return Ok(None);
        };
        if stored_hash != hash {
            return Err(Status::already_exists(format!(
                "idempotency_key: \"{key}\" was already used for a batch with different content (batch {id})"
            )));
        }
        Ok(self.inner.store.get_batch(&id)?)
    }

    /// QUEUED experiments in start order.
    pub fn queued_ids(&self) -> Vec<String> {
        self.inner
            .queue
            .lock()
            .map(|q| q.ids().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    pub fn running_ids(&self) -> Vec<String> {
        self.inner
            .running
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Pauses or resumes the queue, durably, logging the change.
    pub async fn set_paused(&self, paused: bool, reason: String) -> Result<(), Status> {
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
        self.inner.wake.notify_one();
        Ok(())
    }

    pub fn is_paused(&self) -> Result<bool, Status> {
        Ok(self.inner.store.queue_paused()?)
    }

    /// Cancels an experiment; see `CancelExperiment` in the API.
    pub async fn cancel(&self, id: &str, reason: String) -> Result<pb::Experiment, Status> {
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
                    return Ok(Outcome::Refused(Rejection {
                        code: Code::NotFound,
                        field: "id".into(),
                        reason: format!("no experiment \"{id_owned}\""),
                    }));
                };
                match State::from_proto(e.state) {
                    Some(State::Queued) => match set_state(&mut e, State::Cancelled, &r, w) {
                        Ok(()) => {
                            w.put_experiment(&e)?;
                            Ok(Outcome::Done(Some(e)))
                        }
                        Err(rej) => Ok(Outcome::Refused(rej)),
                    },
                    Some(State::Running) => Ok(Outcome::Done(None)),
                    Some(done) => Ok(Outcome::Refused(Rejection {
                        code: Code::FailedPrecondition,
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
                if let Ok(mut q) = self.inner.queue.lock() {
                    q.remove(&e);
                }
                Ok(e)
            }
            Outcome::Done(None) => {
                self.stop_running(id, StopReason::Cancel(reason));
                let deadline = Instant::now() + CANCEL_WAIT;
                loop {
                    if let Some(e) = self.inner.store.get_experiment(id)?
                        && State::from_proto(e.state).is_some_and(State::is_terminal)
                    {
                        return Ok(e);
                    }
                    match tokio::time::timeout_at(deadline, events.recv()).await {
                        Err(_) => {
                            return Err(Status::deadline_exceeded(format!(
                                "experiment {id} is still stopping; watch its events"
                            )));
                        }
                        Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                            return Err(Status::unavailable("daemon shutting down"));
                        }
                        Ok(_) => {}
                    }
                }
            }
        }
    }

    fn stop_running(&self, id: &str, why: StopReason) {
        if let Ok(r) = self.inner.running.lock()
            && let Some(run) = r.get(id)
        {
            if let Ok(mut slot) = run.reason.lock() {
                slot.get_or_insert(why);
            }
            run.token.cancel();
        }
    }

    /// Stops starting work, aborts running steps (devices to safe state, experiments
    /// INTERRUPTED) and waits for the run loop to finish.
    pub async fn shutdown(&self, task: JoinHandle<()>) {
        self.inner.stop.cancel();
        let ids = self.running_ids();
        for id in ids {
            self.stop_running(&id, StopReason::Shutdown);
        }
        let _ = task.await;
    }

    async fn run(self) {
        loop {
            if self.inner.stop.is_cancelled() {
                return;
            }
            let next = match self.inner.store.queue_paused() {
                Ok(false) => self
                    .inner
                    .queue
                    .lock()
                    .ok()
                    .and_then(|q| q.first().map(str::to_owned)),
                Ok(true) => None,
                Err(e) => {
                    warn!(error = %e, "cannot read queue state");
                    None
                }
            };
            match next {
                Some(id) => self.run_experiment(&id).await,
                None => {
                    tokio::select! {
                        _ = self.inner.wake.notified() => {}
                        _ = self.inner.stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Moves an experiment QUEUED → RUNNING, then runs its steps.
    async fn run_experiment(&self, id: &str) {
        // A child of the stop token: a shutdown that races with this start still aborts it.
        let token = self.inner.stop.child_token();
        let reason = Arc::new(Mutex::new(None));
        if let Ok(mut r) = self.inner.running.lock() {
            r.insert(
                id.to_owned(),
                Running {
                    token: token.clone(),
                    reason: reason.clone(),
                },
            );
        }
        let id_owned = id.to_owned();
        let started = self
            .inner
            .store
            .write_async(move |w| {
                let Some(mut e) = w.get_experiment(&id_owned)? else {
                    return Ok(None);
                };
                if set_state(&mut e, State::Running, "", w).is_err() {
                    return Ok(Some(Err(e)));
                }
                w.put_experiment(&e)?;
                Ok(Some(Ok(e)))
            })
            .await;
        let exp = match started {
            Ok((Some(Ok(e)), _)) => Some(e),
            Ok((Some(Err(e)), _)) => {
                // Cancelled between being picked and being started: just drop it from the queue.
                if let Ok(mut q) = self.inner.queue.lock() {
                    q.remove(&e);
                }
                None
            }
            Ok((None, _)) => None,
            Err(e) => {
                warn!(experiment = id, error = %e, "could not start experiment");
                None
            }
        };
        if let Some(mut exp) = exp {
            if let Ok(mut q) = self.inner.queue.lock() {
                q.remove(&exp);
            }
            info!(experiment = id, "experiment started");
            if let Err(e) = self.run_steps(&mut exp, &token, &reason).await {
                warn!(experiment = id, error = %e, "experiment bookkeeping failed");
            }
        } else if let Ok(mut q) = self.inner.queue.lock() {
            // Unknown id: never pick it again.
            q.remove(&pb::Experiment {
                id: id.to_owned(),
                ..Default::default()
            });
        }
        if let Ok(mut r) = self.inner.running.lock() {
            r.remove(id);
        }
    }

    async fn run_steps(
        &self,
        exp: &mut pb::Experiment,
        token: &CancellationToken,
        reason: &Arc<Mutex<Option<StopReason>>>,
    ) -> Result<(), StoreError> {
        let steps = exp
            .spec
            .as_ref()
            .map(|s| s.steps.clone())
            .unwrap_or_default();
        for (j, step) in steps.iter().enumerate().skip(exp.current_step as usize) {
            let path = format!("steps[{j}]");
            let (cap, cmd) = match safety::step_command(step, &path) {
                Ok((cap, Some(cmd))) => (cap, cmd),
                Ok((cap, None)) => {
                    return self
                        .finish(
                            exp,
                            State::Failed,
                            format!("{path}: no device with capability {cap}"),
                        )
                        .await;
                }
                Err(r) => {
                    return self
                        .finish(exp, State::Failed, format!("{}: {}", r.field, r.reason))
                        .await;
                }
            };
            let Some(dev) = self.pick_device(step, cap) else {
                return self
                    .finish(
                        exp,
                        State::Failed,
                        format!("{path}: no device with capability {cap}"),
                    )
                    .await;
            };
            let started_at = now_timestamp();
            let (eid, bid, did, st) = (
                exp.id.clone(),
                exp.batch_id.clone(),
                dev.id().to_owned(),
                step.clone(),
            );
            self.inner
                .store
                .write_async(move |w| {
                    w.emit(
                        &eid,
                        &bid,
                        &did,
                        Kind::StepStarted(pb::StepStarted {
                            step_index: j as u32,
                            step: Some(st),
                        }),
                    );
                    Ok(())
                })
                .await?;
            let outcome = self.execute(exp, j as u32, &dev, &cmd, token).await;
            let mut result = pb::StepResult {
                step_index: j as u32,
                device_id: dev.id().to_owned(),
                started_at: Some(started_at),
                ..Default::default()
            };
            let next_state = match outcome {
                Ok(StepOutput::Furnace(f)) => {
                    result.outcome = pb::StepOutcome::Succeeded as i32;
                    result.result = Some(pb::step_result::Result::Furnace(furnace_to_proto(f)));
                    None
                }
                Err(DeviceError::Aborted) => {
                    result.outcome = pb::StepOutcome::Aborted as i32;
                    let why = reason.lock().ok().and_then(|r| r.clone());
                    Some(match why {
                        Some(StopReason::Cancel(r)) => {
                            result.message = format!("aborted: {r}");
                            (State::Cancelled, r)
                        }
                        _ => {
                            result.message = "aborted: daemon shutting down".into();
                            (
                                State::Interrupted,
                                "daemon shut down while the step was running".into(),
                            )
                        }
                    })
                }
                Err(e) => {
                    result.outcome = pb::StepOutcome::Failed as i32;
                    result.message = e.to_string();
                    Some((State::Failed, format!("{path} on {}: {e}", dev.id())))
                }
            };
            if next_state.is_some()
                && let Err(e) = dev.driver.safe_state().await
            {
                warn!(device = dev.id(), error = %e, "safe state failed after step");
            }
            result.finished_at = Some(now_timestamp());
            exp.results.push(result.clone());
            if next_state.is_none() {
                exp.current_step = j as u32 + 1;
            }
            let (snapshot, did) = (exp.clone(), dev.id().to_owned());
            self.inner
                .store
                .write_async(move |w| {
                    w.put_experiment(&snapshot)?;
                    w.emit(
                        &snapshot.id,
                        &snapshot.batch_id,
                        &did,
                        Kind::StepFinished(pb::StepFinished {
                            result: Some(result),
                        }),
                    );
                    Ok(())
                })
                .await?;
            if let Some((state, why)) = next_state {
                return self.finish(exp, state, why).await;
            }
        }
        self.finish(exp, State::Succeeded, String::new()).await
    }

    async fn finish(
        &self,
        exp: &mut pb::Experiment,
        to: State,
        reason: String,
    ) -> Result<(), StoreError> {
        let id = exp.id.clone();
        let (done, _) = self
            .inner
            .store
            .write_async(move |w| {
                let Some(mut e) = w.get_experiment(&id)? else {
                    return Ok(None);
                };
                if set_state(&mut e, to, &reason, w).is_err() {
                    return Ok(None);
                }
                w.put_experiment(&e)?;
                Ok(Some(e))
            })
            .await?;
        if let Some(e) = done {
            info!(experiment = %e.id, state = ?to, message = %e.message, "experiment finished");
            *exp = e;
        }
        Ok(())
    }

    /// The pinned device, or the first connected device with the capability (falling back to
    /// any with the capability, so a momentary link drop fails the step loudly, not silently).
    fn pick_device(
        &self,
        step: &pb::Step,
        cap: ppu_drivers::Capability,
    ) -> Option<Arc<DeviceHandle>> {
        let d = &self.inner.devices;
        if !step.device_id.is_empty() {
            return d.get(&step.device_id).cloned();
        }
        d.with(cap)
            .find(|h| h.is_connected())
            .or_else(|| d.with(cap).next())
            .cloned()
    }

    /// Runs one step, turning its updates into device readings and (throttled) progress events.
    async fn execute(
        &self,
        exp: &pb::Experiment,
        step_index: u32,
        dev: &Arc<DeviceHandle>,
        cmd: &ppu_drivers::StepCommand,
        token: &CancellationToken,
    ) -> Result<StepOutput, DeviceError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let ctx = StepContext {
            clock: self.inner.clock,
            updates: tx,
            cancel: token.child_token(),
        };
        let run = dev.driver.execute(cmd, ctx);
        tokio::pin!(run);
        let mut last_logged: Option<(Instant, String)> = None;
        loop {
            tokio::select! {
                out = &mut run => return out,
                Some(update) = rx.recv() => match update {
                    StepUpdate::Reading(status) => { dev.record(&status); }
                    StepUpdate::Progress { fraction, message, remaining_s } => {
                        let due = last_logged.as_ref().is_none_or(|(t, m)| *m != message || t.elapsed() >= PROGRESS_LOG_INTERVAL);
                        if !due { continue; }
                        last_logged = Some((Instant::now(), message.clone()));
                        let (eid, bid, did) = (exp.id.clone(), exp.batch_id.clone(), dev.id().to_owned());
                        let kind = Kind::StepProgress(pb::StepProgress {
                            step_index,
                            fraction: fraction.clamp(0.0, 1.0),
                            message,
                            remaining_s: remaining_s.unwrap_or(-1.0),
                        });
                        if let Err(e) = self.inner.store.write_async(move |w| { w.emit(&eid, &bid, &did, kind); Ok(()) }).await {
                            warn!(error = %e, "could not log progress");
                        }
                    }
                },
            }
        }
    }
}

fn furnace_to_proto(f: FurnaceResult) -> pb::FurnaceResult {
    pb::FurnaceResult {
        trace: f
            .trace
            .into_iter()
            .map(|s| pb::FurnaceSample {
                t_s: s.t_s,
                pv_c: s.pv_c,
                working_sp_c: s.working_sp_c,
                output_pct: s.output_pct,
            })
            .collect(),
        max_overshoot_c: f.max_overshoot_c,
        targets: f
            .targets
            .into_iter()
            .map(|t| pb::TargetReached {
                segment_index: t.segment_index,
                temperature_c: t.temperature_c,
                reached_at_s: t.reached_at_s,
                tolerance_c: t.tolerance_c,
            })
            .collect(),
    }
}
