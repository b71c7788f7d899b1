//! The experiment lifecycle: one enum, and every allowed transition in one place.

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
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, Interrupted)
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

#[cfg(test)]
mod tests {
    use super::State::*;
    use super::*;

    const ALLOWED: [(State, State); 6] = [
        (Queued, Running),
        (Queued, Cancelled),
        (Running, Succeeded),
        (Running, Failed),
        (Running, Cancelled),
        (Running, Interrupted),
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
