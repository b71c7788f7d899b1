//! The daemon core's domain errors: what went wrong, in the core's own words. The core (store,
//! scheduler, safety, devices) never names a transport; the server edge maps each variant to a
//! gRPC code and metadata in one place (the `From` impls for `Status` in `server.rs`), and a
//! SiLA edge can map them again.

use crate::store::StoreError;

/// What a [`Rejection`] is about; the edge maps each kind to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionKind {
    /// The request itself is wrong (a value out of range, a malformed field).
    Invalid,
    /// The request names something that does not exist.
    NotFound,
    /// The request is well-formed but the lab or queue is not in a state that allows it now.
    Precondition,
    /// The daemon's own records disagree with themselves.
    Inconsistent,
}

/// A refusal naming the offending field path (empty when the whole request is at fault) and
/// the reason, so a planner can fix its request without guessing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.message())]
pub struct Rejection {
    pub kind: RejectionKind,
    /// Path of the offending field; empty when the whole request is at fault.
    pub field: String,
    pub reason: String,
}

impl Rejection {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            kind: RejectionKind::Invalid,
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// `field: reason`, or the reason alone when no field is at fault.
    pub fn message(&self) -> String {
        if self.field.is_empty() {
            self.reason.clone()
        } else {
            format!("{}: {}", self.field, self.reason)
        }
    }
}

/// Why a core operation (submit, queue control, transfers, device queries) did not complete.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request was refused, naming the field and the reason.
    #[error(transparent)]
    Refused(#[from] Rejection),
    /// The store failed (see [`StoreError`]: unavailable, corrupt, internal).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The named object does not exist; the message names the field.
    #[error("{0}")]
    NotFound(String),
    /// An object with this key already exists with different content.
    #[error("{0}")]
    Conflict(String),
    /// A wait for the lab to reach a state ran out of time.
    #[error("{0}")]
    TimedOut(String),
    /// The daemon is stopping and takes no more work.
    #[error("daemon shutting down")]
    ShuttingDown,
    /// No more ids can be made right now (the generator's sequence overflowed); retry.
    #[error("{0}")]
    IdsExhausted(String),
    /// A broken invariant inside the daemon.
    #[error("{0}")]
    Internal(String),
}
