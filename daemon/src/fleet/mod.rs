//! This lab as one of a fleet on NATS JetStream (issue 18; the contract in docs/fleet.md).
//! Started only when the config has `[fleet]` (`ppud dev --fleet`): without it nothing here
//! runs and no connection is attempted.
//!
//! Three tasks share one NATS connection, each retrying on its own through an outage (the
//! client reconnects underneath):
//! - `outbox`: the event log, in order, into stream `PPU_EVENTS` as `ppu.<lab>.events.<kind>`
//!   with `Nats-Msg-Id: <lab>:<sequence>`; the acknowledged prefix is kept in the store, so a
//!   restart or an outage resumes from it (the log is the buffer; JetStream's duplicate window
//!   absorbs the few resent after a crash).
//! - `work`: pulls experiments from the work queue `PPU_WORK` (one durable consumer per
//!   capability set, bound when this lab has every capability) one at a time while it has
//!   capacity, commits each HELD under the message id as idempotency key, claims it in KV
//!   `PPU_CLAIMS` (create-only), releases it, then acknowledges. A committed experiment whose
//!   claim another lab won is cancelled ("taken by lab X"), so an experiment runs once, in one
//!   lab.
//! - `registry`: the lab's heartbeat in KV `PPU_LABS` (devices, capabilities, load, sequences),
//!   expiring after three missed beats.

mod jetstream;
mod outbox;
mod registry;
mod work;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ppu_proto::v1 as pb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::config::{FleetSettings, redact_url, redacted_servers};
use crate::scheduler::Scheduler;

pub use outbox::{ACKED_KEY, acked as published_sequence};
pub use work::{CLAIM_HOLD_REASON, consumer_name};

pub use jetstream::{
    CLAIMS_BUCKET, EVENTS_STREAM, LABS_BUCKET, WORK_PREFIX, WORK_STREAM, WORK_SUBJECTS, connect,
    ensure_objects,
};

/// The label a fleet experiment carries: its work message's `Nats-Msg-Id`.
pub const MSG_ID_LABEL: &str = "fleet.msg_id";
/// The label carrying the planner's batch id (`Ppu-Batch`), when it sent one.
pub const BATCH_LABEL: &str = "fleet.batch";
/// The principal fleet submissions are recorded under (`Batch.submitted_by`).
pub const PRINCIPAL: &str = "fleet";

/// Shortest and longest wait before a failed NATS operation is tried again.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the tasks share: the published sequence, for the heartbeat.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    published: AtomicU64,
}

impl Shared {
    fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

/// The running fleet tasks.
pub struct Fleet {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Fleet {
    /// Starts the fleet tasks for `scheduler`'s lab. Returns at once: connecting, creating the
    /// JetStream objects and everything after it retries in the background until [`stop`].
    ///
    /// [`stop`]: Fleet::stop
    pub fn start(settings: FleetSettings, scheduler: Scheduler) -> Fleet {
        let stop = CancellationToken::new();
        info!(
            lab = %settings.lab,
            servers = %redacted_servers(&settings.servers),
            "fleet: joining"
        );
        let task = tokio::spawn(run(settings, scheduler, stop.clone()));
        Fleet { stop, task }
    }

    /// Stops the tasks (an unacknowledged publish is resent after the next start).
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            warn!(error = %e, "fleet task failed");
        }
    }
}

async fn run(settings: FleetSettings, scheduler: Scheduler, stop: CancellationToken) {
    let client = tokio::select! {
        _ = stop.cancelled() => return,
        c = connect(&settings) => match c {
            Ok(c) => c,
            Err(e) => {
                // A settings problem (a missing creds file): retrying cannot fix it.
                tracing::error!(error = %e, "fleet: cannot connect to NATS; the lab works on alone");
                return;
            }
        },
    };
    let js = async_nats::jetstream::new(client.clone());
    let mut backoff = Backoff::default();
    let objects = loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = ensure_objects(&js, &settings) => match r {
                Ok(o) => break o,
                Err(e) => {
                    warn!(error = %e, "fleet: JetStream not ready; retrying");
                    if !backoff.wait(&stop).await {
                        return;
                    }
                }
            },
        }
    };
    info!(lab = %settings.lab, "fleet: streams and buckets ready");
    let shared = Arc::new(Shared::default());
    let settings = Arc::new(settings);
    let tasks = [
        tokio::spawn(outbox::run(
            js.clone(),
            settings.clone(),
            scheduler.clone(),
            shared.clone(),
            stop.clone(),
        )),
        tokio::spawn(work::run(
            js.clone(),
            objects.clone(),
            settings.clone(),
            scheduler.clone(),
            stop.clone(),
        )),
        tokio::spawn(registry::run(
            objects.labs.clone(),
            settings.clone(),
            scheduler,
            shared,
            stop.clone(),
        )),
    ];
    for t in tasks {
        let _ = t.await;
    }
    // Let the last publishes and acks out before the connection closes.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
}

/// Exponential backoff between retries of a NATS operation.
#[derive(Debug)]
pub(crate) struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(BACKOFF_MIN)
    }
}

impl Backoff {
    /// Waits the current delay (doubling it for next time); false if stopped first.
    pub(crate) async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// The names of ppu.v1 `Event`'s `kind` fields by field number, read from the descriptors (the
/// core names no family, and some kinds are a family's v1 alias).
static KIND_NAMES: std::sync::LazyLock<std::collections::HashMap<u32, &'static str>> =
    std::sync::LazyLock::new(|| {
        let mut out = std::collections::HashMap::new();
        if let Some(event) = crate::schema::schema()
            .pool()
            .get_message_by_name("ppu.v1.Event")
            && let Some(kind) = event.oneofs().find(|o| o.name() == "kind")
        {
            for f in kind.fields() {
                out.insert(f.number(), &*String::leak(f.name().to_owned()));
            }
        }
        out
    });

/// The subject token of an event: the name of its `kind` field in ppu.v1's `Event`, found in
/// its encoding (`payload`).
pub fn event_kind(payload: &[u8]) -> &'static str {
    let mut buf = payload;
    while let Ok(key) = prost::encoding::decode_varint(&mut buf) {
        let number = (key >> 3) as u32;
        if let Some(name) = KIND_NAMES.get(&number) {
            return name;
        }
        let skipped = match key & 7 {
            0 => prost::encoding::decode_varint(&mut buf).map(drop).is_ok(),
            1 => skip(&mut buf, 8),
            2 => match prost::encoding::decode_varint(&mut buf) {
                Ok(len) => skip(&mut buf, len as usize),
                Err(_) => false,
            },
            5 => skip(&mut buf, 4),
            _ => false,
        };
        if !skipped {
            break;
        }
    }
    "unknown"
}

fn skip(buf: &mut &[u8], n: usize) -> bool {
    match buf.get(n..) {
        Some(rest) => {
            *buf = rest;
            true
        }
        None => false,
    }
}

/// The sorted, unique capabilities `spec`'s steps need (transfers need none).
pub fn capabilities_of(spec: &pb::ExperimentSpec) -> Vec<String> {
    let mut caps: Vec<String> = spec
        .steps
        .iter()
        .enumerate()
        .filter_map(|(i, step)| {
            match crate::command::resolve(crate::schema::schema(), step, &format!("steps[{i}]")) {
                Ok(crate::command::Resolved::Command(c)) => Some(c.capability.to_owned()),
                _ => None,
            }
        })
        .collect();
    caps.sort();
    caps.dedup();
    caps
}

/// The work-queue subject a planner publishes `spec` to: `ppu-work.<caps joined by '-'>`.
pub fn work_subject(spec: &pb::ExperimentSpec) -> String {
    format!("{WORK_PREFIX}{}", capabilities_of(spec).join("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_are_the_oneof_field_names() {
        use prost::Message;
        let event = |kind| pb::Event {
            sequence: 7,
            experiment_id: "e".into(),
            time: Some(crate::store::now_timestamp()),
            kind: Some(kind),
            ..Default::default()
        };
        let k = pb::event::Kind::ExperimentHeld(pb::ExperimentHeld {
            held: true,
            reason: "r".into(),
        });
        assert_eq!(event_kind(&event(k).encode_to_vec()), "experiment_held");
        let k = pb::event::Kind::Audit(Default::default());
        assert_eq!(event_kind(&event(k).encode_to_vec()), "audit");
        let k = pb::event::Kind::StepIntermediate(Default::default());
        assert_eq!(event_kind(&event(k).encode_to_vec()), "step_intermediate");
        assert_eq!(event_kind(&pb::Event::default().encode_to_vec()), "unknown");
    }
}
