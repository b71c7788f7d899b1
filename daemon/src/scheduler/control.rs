//! Queue control and views: pause/resume, abort, cancel, hold/release, move, the queue as the
//! API shows it, and taking devices in and out of maintenance.

use std::sync::Arc;

use pb::event::Kind;
use ppu_proto::v1 as pb;
use tokio::time::Instant;
use tracing::info;

use crate::board::StopReason;
use crate::devices::DeviceHandle;
use crate::error::{Error, Rejection, RejectionKind};
use crate::lifecycle::set_state;
use crate::queue::OrderKey;
use crate::state::{State, StepPhase};
use crate::store::{StoreError, now_timestamp};

use super::{Outcome, STOP_WAIT, Scheduler, is_terminal, not_found, not_queued};

impl Scheduler {
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
        keys.into_iter().map(|k| k.id.to_string()).collect()
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
        events: &mut tokio::sync::broadcast::Receiver<Arc<crate::bus::Published>>,
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

    pub(super) fn stop_reason(&self, id: &str) -> StopReason {
        self.lock()
            .running
            .get(id)
            .and_then(|r| r.stop.clone())
            .unwrap_or(StopReason::Shutdown)
    }

    pub(super) fn cancel_after(&self, id: &str) -> Option<String> {
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
}
