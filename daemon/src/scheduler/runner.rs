//! The runner: owns one RUNNING experiment from grant to terminal state; reserves devices
//! (inserting transfers when the sample is elsewhere), waits for grants, requeues and concludes.

use pb::event::Kind;
use ppu_proto::v1 as pb;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::board::{Need, StopReason};
use crate::lifecycle::set_state;
use crate::recovery::OnRestart;
use crate::state::{State, StepPhase};
use crate::store::{StoreError, WriteTx, now_timestamp};

use super::{Flow, Reservation, Scheduler, Start, sample_key, transfer_id};

impl Scheduler {
    /// Runs one experiment from `start` to a terminal state (or until shutdown).
    pub(super) async fn drive(
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

    pub(super) fn advance(&self, id: &str, to: StepPhase) {
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
    pub(super) async fn conclude(
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
}
