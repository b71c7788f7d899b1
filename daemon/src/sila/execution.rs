//! Command executions are experiments. The CommandExecutionUUID of an observable command IS its
//! experiment's ULID written as a UUID (the same 128 bits), so it survives a restart; its
//! ExecutionInfo follows the experiment through the event log's live broadcast (state changes,
//! step progress), its intermediate responses are the step's `StepIntermediate` events, its
//! result the step's stored `StepResult`.

use std::sync::Arc;

use ppu_proto::v1 as pb;
use ppu_schema::{Schema, wire};
use ppu_sila::framework::{self as fw, execution_info::CommandStatus};
use prost::Message;
use tokio::sync::broadcast::error::RecvError;

use crate::state::State;
use crate::store::{Store, StoreError};

/// The UUID form of an experiment id (a ULID): the same 128 bits, 8-4-4-4-12 lower-case hex.
pub(crate) fn uuid_of(experiment_id: &str) -> Option<String> {
    let n = ulid::Ulid::from_string(experiment_id).ok()?.0;
    Some(format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        n >> 96,
        (n >> 80) & 0xffff,
        (n >> 64) & 0xffff,
        (n >> 48) & 0xffff,
        n & 0xffff_ffff_ffff
    ))
}

/// The experiment id a CommandExecutionUUID names; `None` if it is not a UUID.
pub(crate) fn experiment_of(uuid: &str) -> Option<String> {
    let hex: String = uuid.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || uuid.len() != 36 {
        return None;
    }
    let n = u128::from_str_radix(&hex, 16).ok()?;
    Some(ulid::Ulid(n).to_string())
}

pub(crate) fn state_of(e: &pb::Experiment) -> Option<State> {
    State::from_proto(e.state)
}

/// The state's name as ppu.v1 spells it without its prefix (`RUNNING`).
pub(crate) fn state_name(e: &pb::Experiment) -> String {
    pb::ExperimentState::try_from(e.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("EXPERIMENT_STATE_")
                .to_owned()
        })
        .unwrap_or_default()
}

/// The latest progress of the experiment's current step, as its events report it.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepProgress {
    pub step_index: u32,
    pub fraction: f64,
    /// Physical seconds; negative when unknown.
    pub remaining_s: f64,
}

/// The ExecutionInfo of `e`: waiting while queued, running with the experiment's progress
/// (finished steps and the current step's fraction) and the current step's estimated remaining
/// time in real seconds (`scale`: physical seconds per real second), then finished.
/// `ended_ok` decides what an ended experiment is (FollowExperiment finishes successfully
/// whatever the experiment came to).
pub(crate) fn info(
    e: &pb::Experiment,
    progress: Option<&StepProgress>,
    scale: f64,
    ended_ok: impl Fn(State) -> bool,
) -> fw::ExecutionInfo {
    let steps = e.spec.as_ref().map_or(0, |s| s.steps.len()).max(1) as f64;
    let state = state_of(e).unwrap_or(State::Queued);
    let current = progress.filter(|p| p.step_index == e.current_step);
    let (status, fraction) = match state {
        State::Queued => (CommandStatus::Waiting, f64::from(e.current_step) / steps),
        State::Running => (
            CommandStatus::Running,
            (f64::from(e.current_step) + current.map_or(0.0, |p| p.fraction.clamp(0.0, 1.0)))
                / steps,
        ),
        s if ended_ok(s) => (CommandStatus::FinishedSuccessfully, 1.0),
        _ => (
            CommandStatus::FinishedWithError,
            f64::from(e.current_step) / steps,
        ),
    };
    let remaining = match (status, current) {
        (CommandStatus::Running, Some(p)) if p.remaining_s >= 0.0 && scale > 0.0 => {
            Some(duration(p.remaining_s / scale))
        }
        (CommandStatus::FinishedSuccessfully | CommandStatus::FinishedWithError, _) => {
            Some(duration(0.0))
        }
        _ => None,
    };
    fw::ExecutionInfo {
        command_status: status as i32,
        progress_info: Some(fw::Real {
            value: fraction.clamp(0.0, 1.0),
        }),
        estimated_remaining_time: remaining,
        updated_lifetime_of_execution: None,
    }
}

fn duration(seconds: f64) -> fw::Duration {
    let seconds = seconds.max(0.0);
    fw::Duration {
        seconds: seconds.trunc() as i64,
        nanos: (seconds.fract() * 1e9) as i32,
    }
}

/// What a follower sees of an experiment.
pub(crate) enum Seen {
    /// Its record now (after a state change, or first).
    Record(Box<pb::Experiment>),
    Progress(StepProgress),
    /// Another event of the experiment (intermediate responses, step boundaries).
    Event(Arc<crate::bus::Published>),
}

/// Follows one experiment: its record first, then everything that happens to it, until it has
/// ended (after its final record) or the store shuts down. Subscribes to the live log before
/// reading the record, so nothing falls between; a follower that lags re-reads the record.
pub(crate) struct Follower {
    store: Arc<Store>,
    id: String,
    live: tokio::sync::broadcast::Receiver<Arc<crate::bus::Published>>,
    started: bool,
    ended: bool,
}

impl Follower {
    pub(crate) fn new(store: Arc<Store>, id: String) -> Follower {
        let live = store.subscribe();
        Follower {
            store,
            id,
            live,
            started: false,
            ended: false,
        }
    }

    /// The record now; marks the follower ended when the experiment has.
    fn record(&mut self) -> Result<Option<Seen>, StoreError> {
        match self.store.get_experiment(&self.id)? {
            Some(e) => {
                self.ended = state_of(&e).is_some_and(State::is_terminal);
                Ok(Some(Seen::Record(Box::new(e))))
            }
            None => {
                self.ended = true;
                Ok(None)
            }
        }
    }

    /// What happened next; `None` once the experiment has ended (or does not exist) or the
    /// daemon is stopping.
    pub(crate) async fn next(&mut self) -> Result<Option<Seen>, StoreError> {
        if self.ended {
            return Ok(None);
        }
        if !self.started {
            self.started = true;
            return self.record();
        }
        loop {
            let event = match self.live.recv().await {
                Ok(ev) => ev,
                Err(RecvError::Lagged(_)) => return self.record(),
                Err(RecvError::Closed) => return Ok(None),
            };
            if event.experiment_id != self.id {
                continue;
            }
            return match &event.kind {
                Some(pb::event::Kind::ExperimentStateChanged(_)) => self.record(),
                Some(pb::event::Kind::StepProgress(p)) => Ok(Some(Seen::Progress(StepProgress {
                    step_index: p.step_index,
                    fraction: p.fraction,
                    remaining_s: p.remaining_s,
                }))),
                Some(pb::event::Kind::StepStarted(s)) => Ok(Some(Seen::Progress(StepProgress {
                    step_index: s.step_index,
                    fraction: 0.0,
                    remaining_s: -1.0,
                }))),
                _ => Ok(Some(Seen::Event(event.clone()))),
            };
        }
    }
}

/// The intermediate response an event carries, packed as its family's intermediate message:
/// a `StepIntermediate`, or a typed v1 alias event (`IsothermPointMeasured`: { step_index = 1,
/// index = 2, message = 3 }) re-read generically through the schema's `v1_intermediate_event`.
pub(crate) fn intermediate_of(schema: &Schema, e: &pb::Event) -> Option<prost_types::Any> {
    match &e.kind {
        Some(pb::event::Kind::StepIntermediate(s)) => return s.value.clone(),
        None
        | Some(
            pb::event::Kind::ExperimentStateChanged(_)
            | pb::event::Kind::StepStarted(_)
            | pb::event::Kind::StepProgress(_)
            | pb::event::Kind::StepFinished(_)
            | pb::event::Kind::Audit(_),
        ) => return None,
        Some(_) => {}
    }
    let bytes = e.encode_to_vec();
    let fields = wire::len_fields(&bytes)?;
    schema.commands().iter().find_map(|c| {
        let number = c.options.v1_intermediate_event;
        let message = c.intermediate.as_ref()?;
        if number == 0 {
            return None;
        }
        let alias = fields.iter().find(|f| f.number == number)?;
        let inner = wire::len_fields(alias.payload)?;
        let value = inner.iter().find(|f| f.number == 3)?;
        Some(prost_types::Any {
            type_url: ppu_schema::type_url(message.full_name()),
            value: value.payload.to_vec(),
        })
    })
}

/// A stored step result's output, packed as its family's result message: `StepResult.output`,
/// or a typed v1 alias (`StepResult.furnace`) re-read through the schema's `v1_result_field`.
pub(crate) fn output_of(schema: &Schema, r: &pb::StepResult) -> Option<prost_types::Any> {
    match &r.result {
        None => None,
        Some(pb::step_result::Result::Output(any)) => Some(any.clone()),
        Some(_) => {
            let bytes = r.encode_to_vec();
            let fields = wire::len_fields(&bytes)?;
            schema.commands().iter().find_map(|c| {
                let number = c.options.v1_result_field;
                let message = c.result.as_ref()?;
                if number == 0 {
                    return None;
                }
                let alias = fields.iter().find(|f| f.number == number)?;
                Some(prost_types::Any {
                    type_url: ppu_schema::type_url(message.full_name()),
                    value: alias.payload.to_vec(),
                })
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uuid_is_the_experiment_ulid_and_back() {
        let id = ulid::Ulid::new().to_string();
        let uuid = uuid_of(&id).expect("a ULID");
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid.matches('-').count(), 4);
        assert!(uuid.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        assert_eq!(uuid, uuid.to_lowercase());
        assert_eq!(experiment_of(&uuid).as_deref(), Some(id.as_str()));
        assert_eq!(
            uuid_of("01ARZ3NDEKTSV4RRFFQ69G5FAV").as_deref(),
            Some("01563e3a-b5d3-d676-4c61-efb99302bd5b")
        );
        assert_eq!(experiment_of("not-a-uuid"), None);
        assert_eq!(uuid_of("nope"), None);
    }

    fn experiment(state: State, current_step: u32, steps: usize) -> pb::Experiment {
        pb::Experiment {
            state: state.to_proto() as i32,
            current_step,
            spec: Some(pb::ExperimentSpec {
                steps: vec![pb::Step::default(); steps],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn execution_info_follows_the_experiment() {
        let ok = |s: State| s == State::Succeeded;
        let queued = info(&experiment(State::Queued, 0, 1), None, 1.0, ok);
        assert_eq!(queued.command_status, CommandStatus::Waiting as i32);
        let p = StepProgress {
            step_index: 1,
            fraction: 0.5,
            remaining_s: 600.0,
        };
        let running = info(&experiment(State::Running, 1, 2), Some(&p), 60.0, ok);
        assert_eq!(running.command_status, CommandStatus::Running as i32);
        assert_eq!(running.progress_info.map(|r| r.value), Some(0.75));
        assert_eq!(
            running.estimated_remaining_time.map(|d| d.seconds),
            Some(10)
        );
        let done = info(&experiment(State::Succeeded, 1, 2), None, 1.0, ok);
        assert_eq!(
            done.command_status,
            CommandStatus::FinishedSuccessfully as i32
        );
        let failed = info(&experiment(State::Failed, 0, 1), None, 1.0, ok);
        assert_eq!(
            failed.command_status,
            CommandStatus::FinishedWithError as i32
        );
    }
}
