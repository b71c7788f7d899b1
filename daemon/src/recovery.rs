//! Start-up recovery: what to do with work the last run of the daemon left in flight.
//!
//! Every step that may still be acting on a device is in the intent journal (`journal`). For
//! each one, recovery queries the device, then acts by family and policy: a furnace still
//! running a program ppud started is adopted (`furnace = "adopt"`) or driven to its safe state
//! (`furnace = "safe"`); any other device is driven to its safe state (a pump stops, an analyser
//! aborts its measurement). Then every experiment that was RUNNING is resumed from its
//! interrupted step or marked INTERRUPTED (`on_restart`); under `interrupt`, one stopped between
//! steps with nothing in flight (no journaled step, no pending transfer of its sample, no cancel
//! pending) goes back to the queue at its place instead (`requeued`): nothing physical was cut
//! short, so a person has nothing to decide. Stale reservations are released and
//! pending transfers re-requested or dropped. Every decision is a `RecoveryDecision` event,
//! committed with the records it changes.
//!
//! # Steps that cannot run again
//!
//! `on_restart = "resume"` runs the interrupted step again from its beginning. That is right
//! for a furnace program, an isotherm or a transfer, but not for a dispense: the liquid the
//! pump delivered before the crash stays in the vessel, so running the step again would add
//! its whole volume on top. Resuming only the remainder is not safe either: after a crash the
//! pump's counter does not say which part of it belongs to the interrupted step (the crash may
//! come before the driver cleared it, a power cycle clears it), and the balance's tare, taken
//! before the run, is lost, so the remainder could not be checked gravimetrically against the
//! whole. So a dispense that was in flight is never resumed ([`not_rerunnable`]): its pump is
//! stopped as always, and the experiment is marked INTERRUPTED even under `resume`, with a
//! `RecoveryDecision` (`interrupted`) that says why; a person checks the vessel and resubmits
//! what is missing. The same holds for a dispense aborted by a graceful shutdown. Experiments
//! stopped between steps, or in any other kind of step, resume as configured.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use pb::event::Kind;
use ppu_drivers::DeviceStatus;
use ppu_proto::v1 as pb;
use serde::Deserialize;
use tracing::info;

use crate::command::{self, Resolved};
use crate::devices::Devices;
use crate::journal::JournalEntry;
use crate::lifecycle::set_state;
use crate::state::State;
use crate::store::{Store, StoreError, WriteTx, now_timestamp};

/// What happens to experiments that were RUNNING when the daemon stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRestart {
    /// Mark them INTERRUPTED (a person decides what to redo) — except one stopped between
    /// steps with nothing in flight, which goes back to the queue at its place.
    #[default]
    Interrupt,
    /// Resume them from the interrupted step, which runs again from its start — except a
    /// step that cannot run twice ([`not_rerunnable`]: a dispense), whose experiment is
    /// marked INTERRUPTED instead.
    Resume,
}

/// What happens to a device found still running a step ppud started, for a family whose
/// commands can be re-attached to (`adoptable` in its schema, e.g. a furnace program).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdoptPolicy {
    /// Drive it to its safe state.
    #[default]
    Safe,
    /// Re-attach to the step and supervise it to its end.
    Adopt,
}

/// The `[recovery]` table of the config file: `on_restart`, and per family (by its schema
/// name, e.g. `furnace = "adopt"`) what to do with a step found still running.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct RecoveryPolicy {
    pub on_restart: OnRestart,
    #[serde(flatten)]
    pub families: BTreeMap<String, AdoptPolicy>,
}

impl RecoveryPolicy {
    /// The policy for steps found running on a device of `family`.
    pub fn for_family(&self, family: &str) -> AdoptPolicy {
        self.families.get(family).copied().unwrap_or_default()
    }

    /// Sets the policy for `family`.
    pub fn with_family(mut self, family: &str, policy: AdoptPolicy) -> Self {
        self.families.insert(family.to_owned(), policy);
        self
    }

    /// Keys naming no family whose commands can be re-attached to, one line each.
    pub fn problems(&self) -> Vec<String> {
        let schema = crate::schema::schema();
        let adoptable: Vec<&str> = schema
            .commands()
            .iter()
            .filter(|c| c.options.adoptable)
            .map(|c| c.family.as_str())
            .collect();
        self.families
            .keys()
            .filter(|k| !adoptable.contains(&k.as_str()))
            .map(|k| {
                format!(
                    "recovery.{k}: not a device family whose running steps can be re-attached to \
                     (one of: {})",
                    adoptable.join(", ")
                )
            })
            .collect()
    }
}

/// A policy value that is not one of the allowed words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{value}\" is not one of {allowed}")]
pub struct BadPolicy {
    pub value: String,
    pub allowed: &'static str,
}

impl FromStr for OnRestart {
    type Err = BadPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "interrupt" => Ok(OnRestart::Interrupt),
            "resume" => Ok(OnRestart::Resume),
            _ => Err(BadPolicy {
                value: s.to_owned(),
                allowed: "interrupt, resume",
            }),
        }
    }
}

impl FromStr for AdoptPolicy {
    type Err = BadPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "safe" => Ok(AdoptPolicy::Safe),
            "adopt" => Ok(AdoptPolicy::Adopt),
            _ => Err(BadPolicy {
                value: s.to_owned(),
                allowed: "safe, adopt",
            }),
        }
    }
}

impl fmt::Display for OnRestart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnRestart::Interrupt => "interrupt",
            OnRestart::Resume => "resume",
        })
    }
}

impl fmt::Display for AdoptPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdoptPolicy::Safe => "safe",
            AdoptPolicy::Adopt => "adopt",
        })
    }
}

/// Why `step`, cut short while it ran, must not run again from its beginning, or `None` if
/// it may: its family's schema says so (`not_rerunnable`, e.g. a dispense may already have
/// delivered part of its volume, which cannot be taken back; see the module docs).
pub fn not_rerunnable(step: &pb::Step) -> Option<String> {
    let schema = crate::schema::schema();
    let Ok(Resolved::Command(c)) = command::resolve(schema, step, "") else {
        return None;
    };
    let why = c.not_rerunnable?;
    Some(format!(
        "{} was cut short: {why}",
        ppu_schema::render::summary(schema, &c.message)
    ))
}

/// What recovery left for the scheduler to run.
#[derive(Debug, Default)]
pub struct Recovered {
    /// RUNNING experiments to resume from their current step.
    pub resume: Vec<String>,
    /// Journaled steps re-attached to, still running on their devices.
    pub adopt: Vec<JournalEntry>,
}

/// One journaled step and what was decided about it.
struct Decision {
    entry: JournalEntry,
    action: String,
    detail: String,
    adopted: bool,
}

fn describe(status: &Result<DeviceStatus, ppu_drivers::DeviceError>) -> String {
    match status {
        Ok(s) => {
            let values: Vec<String> = s
                .readings
                .iter()
                .map(|r| format!("{} {}", r.name, r.value))
                .collect();
            let mut out = format!(
                "device reports {} ({})",
                if s.active { "active" } else { "idle" },
                values.join(", ")
            );
            if !s.alarms.is_empty() {
                out.push_str(&format!(", alarms: {}", s.alarms.join(", ")));
            }
            out
        }
        Err(e) => format!("device status unavailable: {e}"),
    }
}

/// Decides about every journaled step (querying and, unless adopted, making safe its
/// device), then resumes or interrupts every RUNNING experiment, releases reservations nobody
/// holds any more and drops pending transfers (a resumed experiment requests its transfer
/// again, under the same id). Every decision is logged as a `RecoveryDecision`.
pub async fn recover(
    store: &Arc<Store>,
    devices: &Devices,
    policy: RecoveryPolicy,
) -> Result<Recovered, StoreError> {
    let s = store.clone();
    let (journal, running) = tokio::task::spawn_blocking(move || {
        Ok::<_, StoreError>((s.journal()?, s.experiments_in(&[State::Running])?))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))??;
    let running_ids: Vec<String> = running.iter().map(|e| e.id.clone()).collect();
    let mut decisions = Vec::new();
    for entry in journal {
        let is_running = running_ids.contains(&entry.experiment_id);
        let Some(dev) = devices.get(&entry.device_id).cloned() else {
            decisions.push(Decision {
                detail: format!(
                    "device {} is no longer configured; it could not be queried or made safe",
                    entry.device_id
                ),
                entry,
                action: "device_missing".to_owned(),
                adopted: false,
            });
            continue;
        };
        let status = dev.status().await;
        let reading = describe(&status);
        let family = dev.family().to_owned();
        let adoptable = entry.step.as_ref().is_some_and(|s| {
            matches!(
                command::resolve(crate::schema::schema(), s, ""),
                Ok(Resolved::Command(c)) if c.adoptable
            )
        });
        let adopt = policy.for_family(&family) == AdoptPolicy::Adopt;
        let active = status.as_ref().is_ok_and(|s| s.active);
        if adoptable && adopt && is_running && active {
            info!(device = %entry.device_id, experiment = %entry.experiment_id, family, "adopting the running step");
            decisions.push(Decision {
                detail: format!(
                    "{reading}; policy {family} = adopt: re-attached to the running program"
                ),
                entry,
                action: format!("{family}_adopted"),
                adopted: true,
            });
            continue;
        }
        let why = if !adoptable {
            "the step cannot be resumed on the device".to_owned()
        } else if !adopt {
            format!("policy {family} = safe")
        } else if !active {
            format!("policy {family} = adopt, but no program is running any more")
        } else {
            format!("policy {family} = adopt, but the experiment is no longer running")
        };
        let safe = if dev.secure(store).await {
            "device sent to its safe state (confirmed by read-back)".to_owned()
        } else {
            let why = dev.unsafe_reason().unwrap_or_default();
            format!("device UNSAFE ({why}); retried on every reconnect")
        };
        decisions.push(Decision {
            detail: format!("{reading}; {why}; {safe}"),
            entry,
            action: safe_action(dev.family()).to_owned(),
            adopted: false,
        });
    }

    let adopted: Vec<JournalEntry> = decisions
        .iter()
        .filter(|d| d.adopted)
        .map(|d| d.entry.clone())
        .collect();
    // Experiments whose interrupted step must not run again: INTERRUPTED even under resume.
    let refused: HashMap<String, String> = if policy.on_restart == OnRestart::Resume {
        decisions
            .iter()
            .filter(|d| !d.adopted)
            .filter_map(|d| {
                let why = not_rerunnable(d.entry.step.as_ref()?)?;
                Some((d.entry.experiment_id.clone(), why))
            })
            .collect()
    } else {
        HashMap::new()
    };
    let resume: Vec<String> = if policy.on_restart == OnRestart::Resume {
        running_ids
            .iter()
            .filter(|id| !adopted.iter().any(|a| &a.experiment_id == *id))
            .filter(|id| !refused.contains_key(*id))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let out = Recovered {
        resume: resume.clone(),
        adopt: adopted.clone(),
    };
    if decisions.is_empty() && running.is_empty() {
        // Still release reservations and drop transfers a clean stop may have left.
        store
            .write_async(|w| {
                release_stale(w, &[])?;
                for p in w.transfers()? {
                    w.take_transfer(&p.id)?;
                }
                Ok(())
            })
            .await?;
        return Ok(out);
    }
    let n_decisions = decisions.len();
    // Experiments asked to cancel after their current step: never requeued.
    let s = store.clone();
    let cancel_after: Vec<String> = tokio::task::spawn_blocking(move || s.cancel_after())
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let (interrupted, _) = store
        .write_async(move |w| {
            // Whether a RUNNING experiment ends INTERRUPTED (not resumed, not adopted).
            let interrupts = |id: &str| {
                policy.on_restart == OnRestart::Interrupt || refused.contains_key(id)
            };
            let mut experiments: HashMap<String, pb::Experiment> = HashMap::new();
            for e in running {
                experiments.insert(e.id.clone(), e);
            }
            // Journaled steps: the decision, and for those made safe the aborted step.
            let mut safe_stated: HashMap<String, u32> = HashMap::new();
            for d in &decisions {
                let e = &d.entry;
                w.emit(
                    &e.experiment_id,
                    &e.batch_id,
                    &e.device_id,
                    Kind::RecoveryDecision(pb::RecoveryDecision {
                        action: d.action.to_owned(),
                        step_index: e.step_index,
                        detail: d.detail.clone(),
                    }),
                );
                if d.adopted {
                    continue;
                }
                w.take_journal(&e.device_id)?;
                let result = pb::StepResult {
                    step_index: e.step_index,
                    device_id: e.device_id.clone(),
                    outcome: pb::StepOutcome::Aborted as i32,
                    message: format!("daemon stopped mid-step; on restart: {}", d.detail),
                    started_at: e.started_at,
                    finished_at: Some(now_timestamp()),
                    ..Default::default()
                };
                if interrupts(&e.experiment_id)
                    && let Some(x) = experiments.get_mut(&e.experiment_id)
                {
                    x.results.push(result.clone());
                }
                w.emit(
                    &e.experiment_id,
                    &e.batch_id,
                    &e.device_id,
                    Kind::StepFinished(pb::StepFinished {
                        result: Some(result),
                    }),
                );
                safe_stated.insert(e.experiment_id.clone(), e.step_index);
            }
            let keep: Vec<String> = adopted.iter().map(|a| a.device_id.clone()).collect();
            release_stale(w, &keep)?;
            // Experiments whose sample was being moved: where it is now is uncertain.
            let mut transferring: Vec<String> = Vec::new();
            // Pending transfers: interrupted experiments close theirs; resumed ones ask again.
            for p in w.transfers()? {
                w.take_transfer(&p.id)?;
                transferring.push(p.experiment_id.clone());
                if interrupts(&p.experiment_id)
                    && let Some(x) = experiments.get_mut(&p.experiment_id)
                {
                    let result = pb::StepResult {
                        step_index: p.step_index,
                        device_id: p.to_device_id.clone(),
                        outcome: pb::StepOutcome::Aborted as i32,
                        message: "daemon stopped before the transfer was confirmed".into(),
                        started_at: p.requested_at,
                        finished_at: Some(now_timestamp()),
                        ..Default::default()
                    };
                    x.results.push(result.clone());
                    w.emit(
                        &x.id,
                        &x.batch_id,
                        &p.to_device_id,
                        Kind::StepFinished(pb::StepFinished {
                            result: Some(result),
                        }),
                    );
                }
            }
            let mut interrupted = 0;
            let mut requeued = 0;
            let mut ids: Vec<String> = experiments.keys().cloned().collect();
            ids.sort();
            for id in ids {
                let Some(mut e) = experiments.remove(&id) else {
                    continue;
                };
                if adopted.iter().any(|a| a.experiment_id == id) {
                    continue;
                }
                let step = e.current_step;
                if !interrupts(&id) {
                    w.emit(
                        &e.id,
                        &e.batch_id,
                        "",
                        Kind::RecoveryDecision(pb::RecoveryDecision {
                            action: "resumed".into(),
                            step_index: step,
                            detail: format!(
                                "policy on_restart = resume: continuing from step {step}"
                            ),
                        }),
                    );
                    w.put_experiment(&e)?;
                    continue;
                }
                // Stopped between steps with nothing in flight: no device touched the sample
                // since its last step ended and it is where custody says, so nothing is lost
                // by running the rest. Back to the queue at its place (priority, rank, id).
                if !safe_stated.contains_key(&id)
                    && !transferring.contains(&id)
                    && !cancel_after.contains(&id)
                {
                    let reason = format!(
                        "daemon stopped between steps, before step {step}, with nothing in \
                         flight: back to the queue at its place"
                    );
                    w.emit(
                        &e.id,
                        &e.batch_id,
                        "",
                        Kind::RecoveryDecision(pb::RecoveryDecision {
                            action: "requeued".into(),
                            step_index: step,
                            detail: reason.clone(),
                        }),
                    );
                    if set_state(&mut e, State::Queued, &reason, w).is_ok() {
                        requeued += 1;
                    }
                    w.put_experiment(&e)?;
                    continue;
                }
                let mut reason = if safe_stated.contains_key(&id) {
                    format!(
                        "daemon stopped while step {step} was running; the device was sent to its safe state on restart"
                    )
                } else if transferring.contains(&id) {
                    format!(
                        "daemon stopped while the sample was being moved before step {step}; \
                         where it is now is uncertain"
                    )
                } else {
                    format!(
                        "daemon stopped between steps, before step {step}, with a cancel after \
                         the current step pending"
                    )
                };
                let detail = match refused.get(&id) {
                    Some(why) => {
                        reason.push_str(&format!("; {why}"));
                        format!("policy on_restart = resume, but step {step} cannot run again: {reason}")
                    }
                    None => format!("policy on_restart = interrupt: {reason}"),
                };
                w.emit(
                    &e.id,
                    &e.batch_id,
                    "",
                    Kind::RecoveryDecision(pb::RecoveryDecision {
                        action: "interrupted".into(),
                        step_index: step,
                        detail,
                    }),
                );
                if set_state(&mut e, State::Interrupted, &reason, w).is_ok() {
                    interrupted += 1;
                }
                w.set_cancel_after(&e.id, None)?;
                w.put_experiment(&e)?;
            }
            Ok((interrupted, requeued))
        })
        .await?;
    let (interrupted, requeued) = interrupted;
    info!(
        journaled = n_decisions,
        adopted = out.adopt.len(),
        resumed = resume.len(),
        interrupted,
        requeued,
        "recovered in-flight work"
    );
    Ok(out)
}

/// Releases every reservation except those of `keep` (adopted devices), with its event.
fn release_stale(w: &mut WriteTx<'_>, keep: &[String]) -> Result<(), StoreError> {
    for (device, experiment, step) in w.reservations()? {
        if keep.contains(&device) {
            continue;
        }
        w.remove_reservation(&device)?;
        let batch = w
            .get_experiment(&experiment)?
            .map(|e| e.batch_id)
            .unwrap_or_default();
        w.emit(
            &experiment,
            &batch,
            &device,
            Kind::DeviceReleased(pb::DeviceReleased { step_index: step }),
        );
    }
    Ok(())
}

/// The RecoveryDecision action for driving a device of `family` to its safe state, as its
/// schema names it (`furnace_safe_state`, `pump_stopped`).
pub(crate) fn safe_action(family: &str) -> String {
    crate::schema::safe_action(family)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(kind: pb::step::Kind) -> pb::Step {
        pb::Step {
            device_id: String::new(),
            kind: Some(kind),
        }
    }

    #[test]
    fn only_a_dispense_is_not_rerunnable() {
        let dispense = step(pb::step::Kind::Dispense(pb::Dispense {
            reagent: "A".into(),
            volume_ml: 8.0,
            rate_ml_per_min: 2.0,
        }));
        let why = not_rerunnable(&dispense).expect("a dispense cannot run twice");
        assert!(why.contains("8 mL of A"), "{why}");
        for kind in [
            pb::step::Kind::Furnace(pb::FurnaceProgram::default()),
            pb::step::Kind::Isotherm(pb::Isotherm::default()),
            pb::step::Kind::Refill(pb::Refill::default()),
        ] {
            assert_eq!(not_rerunnable(&step(kind.clone())), None, "{kind:?}");
        }
    }
}
