//! The experiment lifecycle as recorded: the one place an experiment's state changes, checked
//! against [`State::transition`] and written with its `ExperimentStateChanged` event in the same
//! transaction. The scheduler and start-up recovery both move experiments through it.

use pb::event::Kind;
use ppu_proto::v1 as pb;

use crate::error::{Rejection, RejectionKind};
use crate::state::State;
use crate::store::{WriteTx, now_timestamp};

/// Moves an experiment to `to` in `w`, with its event. The single place experiment states
/// change.
pub fn set_state(
    e: &mut pb::Experiment,
    to: State,
    reason: &str,
    w: &mut WriteTx<'_>,
) -> Result<(), Rejection> {
    let from = State::from_proto(e.state).ok_or_else(|| Rejection {
        kind: RejectionKind::Inconsistent,
        field: String::new(),
        reason: format!("experiment {} has no valid state", e.id),
    })?;
    from.transition(to).map_err(|t| Rejection {
        kind: RejectionKind::Precondition,
        field: String::new(),
        reason: t.to_string(),
    })?;
    e.state = to.to_proto() as i32;
    e.updated_at = Some(now_timestamp());
    if !reason.is_empty() {
        e.message = reason.to_owned();
    }
    if to != State::Queued {
        e.held = false;
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
