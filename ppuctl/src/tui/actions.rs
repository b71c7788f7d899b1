//! The actions a technician takes from the TUI. Each is described to the user and confirmed
//! before it runs, then performed with one ppu.v1 RPC (the same ones `ppuctl` and a planner
//! use). A failure (e.g. UNIMPLEMENTED from an older daemon) comes back as text for the status
//! line.

use std::time::Duration;

use ppu_proto::v1 as pb;
use ppu_proto::v1::device_service_client::DeviceServiceClient;
use ppu_proto::v1::experiment_service_client::ExperimentServiceClient;
use ppu_proto::v1::queue_service_client::QueueServiceClient;
use tonic::Status;

use crate::conn::Channel;

/// How long an action may take: aborting waits for devices to reach their safe state.
const ACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// One confirmable action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    PauseQueue,
    ResumeQueue,
    AbortQueue,
    Cancel {
        id: String,
        name: String,
    },
    /// Hold a queued experiment in its place (`ppuctl queue hold`).
    Hold {
        id: String,
        name: String,
    },
    /// Release a held one (`ppuctl queue release`).
    Release {
        id: String,
        name: String,
    },
    /// Move a queued experiment in the start order, positions 0 = next (`ppuctl queue move`).
    Move {
        id: String,
        name: String,
        from: u32,
        to: u32,
    },
    SetMaintenance {
        device: String,
        on: bool,
    },
    AcknowledgeAlarm {
        device: String,
        code: String,
    },
    ConfirmTransfer {
        id: String,
        sample: String,
        from: String,
        to: String,
    },
}

impl Action {
    /// The question asked before running it.
    pub fn prompt(&self) -> String {
        match self {
            Action::PauseQueue => "Pause the queue?".to_owned(),
            Action::ResumeQueue => "Resume the queue?".to_owned(),
            Action::AbortQueue => "ABORT the queue?".to_owned(),
            Action::Cancel { id, name } if name.is_empty() => format!("Cancel experiment {id}?"),
            Action::Cancel { name, .. } => format!("Cancel experiment \"{name}\"?"),
            Action::Hold { id, name } => format!("Hold {}?", experiment(id, name)),
            Action::Release { id, name } => format!("Release {}?", experiment(id, name)),
            Action::Move { id, name, from, to } => format!(
                "Move {} from position {} to {} in the start order?",
                experiment(id, name),
                from + 1,
                to + 1
            ),
            Action::SetMaintenance { device, on: true } => {
                format!("Take {device} out of service (maintenance)?")
            }
            Action::SetMaintenance { device, on: false } => {
                format!("Return {device} to service?")
            }
            Action::AcknowledgeAlarm { device, code } => {
                format!("Acknowledge alarm {code} on {device}?")
            }
            Action::ConfirmTransfer { sample, to, .. } => {
                let sample = if sample.is_empty() {
                    "(unnamed)"
                } else {
                    sample
                };
                format!("Confirm transfer: move sample {sample} to {to}?")
            }
        }
    }

    /// What it does, in one or two lines under the question.
    pub fn consequence(&self) -> String {
        match self {
            Action::PauseQueue => {
                "No new experiment starts; running ones finish. Durable across restarts.".to_owned()
            }
            Action::ResumeQueue => "Queued experiments start again as devices free up.".to_owned(),
            Action::AbortQueue => "Pauses the queue and aborts every running step: devices go \
                                   to their safe state, running experiments are CANCELLED."
                .to_owned(),
            Action::Cancel { id, .. } => format!(
                "{id}: if running, its step is aborted and its device sent to its safe state."
            ),
            Action::Hold { id, .. } => {
                format!("{id} keeps its place in the queue but does not start until released.")
            }
            Action::Release { id, .. } => {
                format!("{id} starts in its turn again as devices free up.")
            }
            Action::Move { id, .. } => {
                format!("{id}: its priority becomes that of its new neighbours.")
            }
            Action::SetMaintenance { on: true, .. } => {
                "It takes no new work; a step already running on it finishes.".to_owned()
            }
            Action::SetMaintenance { on: false, .. } => {
                "The scheduler may reserve it for new steps again.".to_owned()
            }
            Action::AcknowledgeAlarm { .. } => {
                "Recorded in the event log under your name (and on the device).".to_owned()
            }
            Action::ConfirmTransfer { id, from, .. } => {
                let from = if from.is_empty() {
                    "(no location)"
                } else {
                    from
                };
                format!(
                    "Only once it is there (from {from}). Transfer {id}: the waiting step \
                     completes and the experiment goes on."
                )
            }
        }
    }

    /// What is happening, for the status line while it runs.
    pub fn doing(&self) -> String {
        match self {
            Action::PauseQueue => "pausing the queue…".to_owned(),
            Action::ResumeQueue => "resuming the queue…".to_owned(),
            Action::AbortQueue => "aborting the queue…".to_owned(),
            Action::Cancel { id, .. } => format!("cancelling {id}…"),
            Action::Hold { id, .. } => format!("holding {id}…"),
            Action::Release { id, .. } => format!("releasing {id}…"),
            Action::Move { id, to, .. } => format!("moving {id} to position {}…", to + 1),
            Action::SetMaintenance { device, on } => {
                let what = if *on { "into" } else { "out of" };
                format!("taking {device} {what} maintenance…")
            }
            Action::AcknowledgeAlarm { device, code } => {
                format!("acknowledging {code} on {device}…")
            }
            Action::ConfirmTransfer { id, .. } => format!("confirming transfer {id}…"),
        }
    }

    /// Runs it against the daemon as operator `by`; the reply as a one-line summary.
    pub async fn run(&self, ch: Channel, by: &str) -> Result<String, Status> {
        let by_text = if by.is_empty() {
            "ppuctl tui".to_owned()
        } else {
            format!("ppuctl tui ({by})")
        };
        match self {
            Action::PauseQueue => {
                let reason = format!("paused from {by_text}");
                let q =
                    call(QueueServiceClient::new(ch).pause_queue(pb::PauseQueueRequest { reason }))
                        .await?;
                Ok(format!("queue {}", crate::render::queue_state(q.state)))
            }
            Action::ResumeQueue => {
                let q = call(QueueServiceClient::new(ch).resume_queue(pb::ResumeQueueRequest {}))
                    .await?;
                Ok(format!("queue {}", crate::render::queue_state(q.state)))
            }
            Action::AbortQueue => {
                let reason = format!("aborted from {by_text}");
                let q =
                    call(QueueServiceClient::new(ch).abort_queue(pb::AbortQueueRequest { reason }))
                        .await?;
                Ok(format!(
                    "queue aborted: {}",
                    crate::render::queue_state(q.state)
                ))
            }
            Action::Cancel { id, .. } => {
                let e = call(ExperimentServiceClient::new(ch).cancel_experiment(
                    pb::CancelExperimentRequest {
                        id: id.clone(),
                        reason: format!("cancelled from {by_text}"),
                        after_current_step: false,
                    },
                ))
                .await?;
                Ok(format!(
                    "experiment {}: {}",
                    e.id,
                    crate::render::experiment_state(e.state)
                ))
            }
            Action::Hold { id, .. } => {
                let e = call(QueueServiceClient::new(ch).hold_experiment(
                    pb::HoldExperimentRequest {
                        id: id.clone(),
                        reason: format!("held from {by_text}"),
                    },
                ))
                .await?;
                Ok(format!("experiment {} is held", e.id))
            }
            Action::Release { id, .. } => {
                let e = call(
                    QueueServiceClient::new(ch)
                        .release_experiment(pb::ReleaseExperimentRequest { id: id.clone() }),
                )
                .await?;
                Ok(format!("experiment {} is released", e.id))
            }
            Action::Move { id, to, .. } => {
                let q = call(QueueServiceClient::new(ch).move_experiment(
                    pb::MoveExperimentRequest {
                        id: id.clone(),
                        position: *to,
                    },
                ))
                .await?;
                let at = q.queued_ids.iter().position(|x| x == id).map_or_else(
                    || "its new place".to_owned(),
                    |i| format!("position {}", i + 1),
                );
                Ok(format!("experiment {id} moved to {at}"))
            }
            Action::SetMaintenance { device, on } => {
                let d = call(DeviceServiceClient::new(ch).set_maintenance(
                    pb::SetMaintenanceRequest {
                        id: device.clone(),
                        maintenance: *on,
                        reason: format!("set from {by_text}"),
                    },
                ))
                .await?;
                let state = if d.maintenance {
                    "in maintenance"
                } else {
                    "in service"
                };
                Ok(format!("{} is {state}", d.id))
            }
            Action::AcknowledgeAlarm { device, code } => {
                let a = call(DeviceServiceClient::new(ch).acknowledge_alarm(
                    pb::AcknowledgeAlarmRequest {
                        device_id: device.clone(),
                        code: code.clone(),
                        acknowledged_by: by.to_owned(),
                    },
                ))
                .await?;
                Ok(format!("alarm {} on {} acknowledged", a.code, a.device_id))
            }
            Action::ConfirmTransfer { id, .. } => {
                let t = call(QueueServiceClient::new(ch).confirm_transfer(
                    pb::ConfirmTransferRequest {
                        transfer_id: id.clone(),
                        confirmed_by: by.to_owned(),
                    },
                ))
                .await?;
                Ok(format!(
                    "transfer {} confirmed: {}",
                    t.id,
                    crate::render::transfer_move(&t)
                ))
            }
        }
    }
}

/// `"name"` in a question, or the id when it has none.
fn experiment(id: &str, name: &str) -> String {
    if name.is_empty() {
        format!("experiment {id}")
    } else {
        format!("\"{name}\"")
    }
}

/// Awaits a unary RPC with [`ACTION_TIMEOUT`].
async fn call<T>(
    rpc: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(ACTION_TIMEOUT, rpc).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no reply from ppud within {} s",
            ACTION_TIMEOUT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_prompt_names_the_sample_and_the_destination() {
        let a = Action::ConfirmTransfer {
            id: "T1".into(),
            sample: "S-017".into(),
            from: "furnace-1".into(),
            to: "analyser-1".into(),
        };
        assert_eq!(
            a.prompt(),
            "Confirm transfer: move sample S-017 to analyser-1?"
        );
        assert!(a.consequence().contains("T1"));
        assert!(a.consequence().contains("from furnace-1"));
    }
}
