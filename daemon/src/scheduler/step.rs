//! One step on its device: journal the intent, execute through the driver (or adopt a step
//! recovery re-attached to), drive the device safe after a failure or abort, and commit the
//! result, the journal removal and the release together.

use std::sync::Arc;

use pb::event::Kind;
use ppu_drivers::device::StepOutput;
use ppu_drivers::{DeviceError, StepCommand, StepContext, StepUpdate};
use ppu_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::board::StopReason;
use crate::command::{self, Resolved};
use crate::devices::DeviceHandle;
use crate::journal::JournalEntry;
use crate::lifecycle::set_state;
use crate::recovery::{OnRestart, safe_action};
use crate::state::{State, StepPhase};
use crate::store::{StoreError, now_timestamp};
use crate::{metrics, recovery, results};

use super::{Flow, PROGRESS_LOG_INTERVAL, Scheduler, sample_key};

impl Scheduler {
    /// Runs step `j` on `device` (already reserved and logged), or — with `adopt` — finishes
    /// a step recovery re-attached to. Journals the intent before actuating; after a failure
    /// or abort always drives the device to its safe state; commits the result, the journal
    /// removal and the release in one transaction.
    pub(super) async fn run_step(
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
        // Checked at submission; resolving only decodes it.
        let outcome = match command::resolve(crate::schema::schema(), &step, &path) {
            Ok(Resolved::Command(cmd)) => {
                let cmd = cmd.step;
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
            Ok(Resolved::Transfer(_)) => Err(DeviceError::Unsupported(format!(
                "{path}: a transfer is not run on a device"
            ))),
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
                result.result = Some(results::to_proto(crate::schema::schema(), out));
                let to = if j + 1 >= total {
                    Some((State::Succeeded, String::new()))
                } else if let Some(r) = self.cancel_after(id) {
                    Some((State::Cancelled, r))
                } else if adopting && on_restart == OnRestart::Interrupt {
                    let why = format!(
                        "daemon stopped while step {j} was running; the step was adopted and finished, and on_restart = interrupt stops the experiment here"
                    );
                    decision = Some(("interrupted".to_owned(), why.clone()));
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
                                "interrupted".to_owned(),
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
                        action: action.clone(),
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
    pub(super) async fn execute(
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
                    let mut batch = Vec::new();
                    while let Ok(update) = rx.try_recv() {
                        batch.extend(self.on_update(dev, step_index, update, &mut last_logged));
                    }
                    self.log_updates(exp, dev, batch).await;
                    return out;
                }
                Some(update) = rx.recv() => {
                    // Everything the driver sent meanwhile goes into the same transaction: one
                    // commit for a burst (a fast clock makes a whole isotherm's doses and
                    // points a burst), not one per update, so the log keeps up with the
                    // physics instead of pacing it.
                    let mut batch: Vec<Kind> =
                        self.on_update(dev, step_index, update, &mut last_logged).into_iter().collect();
                    while let Ok(update) = rx.try_recv() {
                        batch.extend(self.on_update(dev, step_index, update, &mut last_logged));
                    }
                    self.log_updates(exp, dev, batch).await;
                }
            }
        }
    }

    /// Turns one update of a running step into a device reading (recorded at once) or the
    /// event to log; progress is throttled, isotherm points are logged every one.
    fn on_update(
        &self,
        dev: &Arc<DeviceHandle>,
        step_index: u32,
        update: StepUpdate,
        last_logged: &mut Option<(Instant, String)>,
    ) -> Option<Kind> {
        Some(match update {
            StepUpdate::Reading(status) => {
                dev.record(&status);
                return None;
            }
            StepUpdate::Intermediate { index, value } => {
                // Each response is durable as soon as it arrives: a crash mid-isotherm keeps
                // the points measured.
                results::intermediate(crate::schema::schema(), step_index, index, value)
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
                    return None;
                }
                *last_logged = Some((Instant::now(), message.clone()));
                Kind::StepProgress(pb::StepProgress {
                    step_index,
                    fraction: fraction.clamp(0.0, 1.0),
                    message,
                    remaining_s: remaining_s.unwrap_or(-1.0),
                })
            }
        })
    }

    /// Logs the events of a running step, in order, in one durable commit.
    async fn log_updates(&self, exp: &pb::Experiment, dev: &Arc<DeviceHandle>, batch: Vec<Kind>) {
        if batch.is_empty() {
            return;
        }
        let (eid, bid, did) = (exp.id.clone(), exp.batch_id.clone(), dev.id().to_owned());
        if let Err(e) = self
            .inner
            .store
            .write_async(move |w| {
                for kind in batch {
                    w.emit(&eid, &bid, &did, kind);
                }
                Ok(())
            })
            .await
        {
            warn!(error = %e, "could not log a step update");
        }
    }
}
