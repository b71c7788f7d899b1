//! The experiment lifecycle and the lifecycle of the step a RUNNING experiment is on (its device
//! reservation): one enum each, and every allowed transition in one place.

use ppu_proto::v1::ExperimentState as Proto;

/// Where an experiment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Interrupted,
}

/// A transition the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("experiment cannot go from {from} to {to}")]
pub struct IllegalTransition {
    pub from: State,
    pub to: State,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Queued,
        State::Running,
        State::Succeeded,
        State::Failed,
        State::Cancelled,
        State::Interrupted,
    ];

    /// The allowed transitions. Terminal states have none.
    pub fn can_become(self, to: State) -> bool {
        use State::*;
        matches!(
            (self, to),
            (Queued, Running)
                | (Queued, Cancelled)
                // Only at start-up: the configuration changed and no device can run it.
                | (Queued, Failed)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, Interrupted)
                // Only at start-up: stopped between steps, nothing in flight (recovery).
                | (Running, Queued)
        )
    }

    /// `to`, if the transition is allowed.
    pub fn transition(self, to: State) -> Result<State, IllegalTransition> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }

    /// No transition leaves a terminal state.
    pub fn is_terminal(self) -> bool {
        State::ALL.iter().all(|&to| !self.can_become(to))
    }

    pub fn to_proto(self) -> Proto {
        match self {
            State::Queued => Proto::Queued,
            State::Running => Proto::Running,
            State::Succeeded => Proto::Succeeded,
            State::Failed => Proto::Failed,
            State::Cancelled => Proto::Cancelled,
            State::Interrupted => Proto::Interrupted,
        }
    }

    /// `None` for UNSPECIFIED or an unknown wire value.
    pub fn from_proto(raw: i32) -> Option<State> {
        match Proto::try_from(raw).ok()? {
            Proto::Unspecified => None,
            Proto::Queued => Some(State::Queued),
            Proto::Running => Some(State::Running),
            Proto::Succeeded => Some(State::Succeeded),
            Proto::Failed => Some(State::Failed),
            Proto::Cancelled => Some(State::Cancelled),
            Proto::Interrupted => Some(State::Interrupted),
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Queued => "QUEUED",
            State::Running => "RUNNING",
            State::Succeeded => "SUCCEEDED",
            State::Failed => "FAILED",
            State::Cancelled => "CANCELLED",
            State::Interrupted => "INTERRUPTED",
        })
    }
}

/// Where the current step of a RUNNING experiment is, from waiting for a device to releasing
/// it. A device is reserved from `Reserved` until `Released`, for this one step only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepPhase {
    /// Waiting for the dispatcher to grant a device (queue order, availability, maintenance).
    Waiting,
    /// A device is reserved for the step; nothing is actuated yet.
    Reserved,
    /// The sample is being moved to the reserved device; waits for `ConfirmTransfer`.
    Transferring,
    /// The step runs on the device; its intent is journaled.
    Executing,
    /// The step was aborted or failed; the device is being driven to its safe state.
    Stopping,
    /// The step is over and the device released.
    Released,
}

/// A step-phase change the scheduler does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("step cannot go from {from:?} to {to:?}")]
pub struct IllegalPhase {
    pub from: StepPhase,
    pub to: StepPhase,
}

impl StepPhase {
    pub const ALL: [StepPhase; 6] = [
        StepPhase::Waiting,
        StepPhase::Reserved,
        StepPhase::Transferring,
        StepPhase::Executing,
        StepPhase::Stopping,
        StepPhase::Released,
    ];

    /// The allowed changes. A transfer hands the same reservation back to `Reserved` for the
    /// step it carried the sample to; any phase that holds no running step may give up its
    /// reservation directly (cancel, abort, shutdown); a released step waits for the next one.
    pub fn can_become(self, to: StepPhase) -> bool {
        use StepPhase::*;
        matches!(
            (self, to),
            (Released, Waiting)
                | (Waiting, Reserved)
                | (Waiting, Released)
                | (Reserved, Transferring)
                | (Reserved, Executing)
                | (Reserved, Released)
                | (Transferring, Reserved)
                | (Transferring, Released)
                | (Executing, Stopping)
                | (Executing, Released)
                | (Stopping, Released)
        )
    }

    /// `to`, if the change is allowed.
    pub fn advance(self, to: StepPhase) -> Result<StepPhase, IllegalPhase> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(IllegalPhase { from: self, to })
        }
    }

    /// True while the step holds a device reservation.
    pub fn holds_device(self) -> bool {
        matches!(
            self,
            StepPhase::Reserved
                | StepPhase::Transferring
                | StepPhase::Executing
                | StepPhase::Stopping
        )
    }
}

#[cfg(test)]
mod tests {
    use super::State::*;
    use super::*;

    #[test]
    fn exactly_the_documented_step_phases_are_allowed() {
        use StepPhase as P;
        const ALLOWED: [(P, P); 11] = [
            (P::Released, P::Waiting),
            (P::Waiting, P::Reserved),
            (P::Waiting, P::Released),
            (P::Reserved, P::Transferring),
            (P::Reserved, P::Executing),
            (P::Reserved, P::Released),
            (P::Transferring, P::Reserved),
            (P::Transferring, P::Released),
            (P::Executing, P::Stopping),
            (P::Executing, P::Released),
            (P::Stopping, P::Released),
        ];
        for from in P::ALL {
            for to in P::ALL {
                let expected = ALLOWED.contains(&(from, to));
                assert_eq!(from.can_become(to), expected, "{from:?} -> {to:?}");
                assert_eq!(from.advance(to).is_ok(), expected, "{from:?} -> {to:?}");
            }
        }
        // Nothing executes without a reservation, and a running step never returns to waiting
        // without releasing its device first.
        assert!(!P::Waiting.can_become(P::Executing));
        assert!(!P::Executing.can_become(P::Waiting));
        let held: Vec<P> = P::ALL.into_iter().filter(|p| p.holds_device()).collect();
        assert_eq!(
            held,
            [P::Reserved, P::Transferring, P::Executing, P::Stopping]
        );
    }

    const ALLOWED: [(State, State); 8] = [
        (Queued, Running),
        (Queued, Cancelled),
        (Queued, Failed),
        (Running, Succeeded),
        (Running, Failed),
        (Running, Cancelled),
        (Running, Interrupted),
        (Running, Queued),
    ];

    #[test]
    fn exactly_the_documented_transitions_are_allowed() {
        for from in State::ALL {
            for to in State::ALL {
                let expected = ALLOWED.contains(&(from, to));
                assert_eq!(from.can_become(to), expected, "{from:?} -> {to:?}");
                assert_eq!(from.transition(to).is_ok(), expected, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn illegal_transition_names_both_states() {
        let err = Succeeded.transition(Running).unwrap_err();
        assert_eq!(
            err,
            IllegalTransition {
                from: Succeeded,
                to: Running
            }
        );
        assert_eq!(
            err.to_string(),
            "experiment cannot go from SUCCEEDED to RUNNING"
        );
    }

    #[test]
    fn terminal_states_are_the_four_outcomes() {
        let terminal: Vec<State> = State::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal, vec![Succeeded, Failed, Cancelled, Interrupted]);
    }

    #[test]
    fn proto_round_trip() {
        for s in State::ALL {
            assert_eq!(State::from_proto(s.to_proto() as i32), Some(s));
        }
        assert_eq!(State::from_proto(0), None);
        assert_eq!(State::from_proto(99), None);
    }
}
