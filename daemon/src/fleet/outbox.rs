//! The outbox: the event log, in sequence order, into `PPU_EVENTS`. A window of publishes is
//! in flight at once; acks are awaited in order, so what is persisted (META setting
//! [`ACKED_KEY`]) is always a contiguous acknowledged prefix. After a restart or an outage it
//! resumes after that prefix; events resent past it carry the same `Nats-Msg-Id` and
//! JetStream drops them within its duplicate window. Within a lab: no gap, no duplicate.

use std::collections::{HashMap, VecDeque};
use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::{self, message::PublishMessage};
use prost::Message;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{BATCH_LABEL, Backoff, FleetSettings, MSG_ID_LABEL, Shared, event_kind};
use crate::scheduler::Scheduler;
use crate::store::Store;

/// The store setting holding the last sequence JetStream acknowledged (u64, little-endian).
pub const ACKED_KEY: &str = "fleet.outbox.acked";
/// Publishes in flight at once.
const WINDOW: usize = 256;
/// Longest wait for one publish ack.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Persist the acknowledged prefix at least this often while acks keep coming.
const PERSIST_EVERY: u64 = 512;

/// The persisted acknowledged sequence (0: nothing yet).
pub fn acked(store: &Store) -> u64 {
    store
        .setting(ACKED_KEY)
        .ok()
        .flatten()
        .and_then(|v| v.try_into().ok().map(u64::from_le_bytes))
        .unwrap_or(0)
}

pub(super) async fn run(
    js: jetstream::Context,
    settings: Arc<FleetSettings>,
    scheduler: Scheduler,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let store = scheduler.store().clone();
    let mut backoff = Backoff::default();
    loop {
        match publish_from_log(&js, &settings.lab, &store, &shared, &stop, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                warn!(error = %e, "fleet outbox: publishing paused; resuming from the log");
                if !backoff.wait(&stop).await {
                    return;
                }
            }
        }
    }
}

/// Publishes from the persisted prefix on, then follows the log; `Ok` when stopped.
async fn publish_from_log(
    js: &jetstream::Context,
    lab: &str,
    store: &Arc<Store>,
    shared: &Shared,
    stop: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let mut bus = store.subscribe();
    let s = store.clone();
    let mut acked = tokio::task::spawn_blocking(move || acked(&s))
        .await
        .map_err(|e| e.to_string())?;
    shared.published.store(acked, Ordering::Relaxed);
    let mut persisted = acked;
    let mut sent = acked;
    let mut inflight: VecDeque<(u64, PublishAckFuture)> = VecDeque::new();
    let mut origins = Origins::default();
    let result = loop {
        if stop.is_cancelled() {
            break Ok(());
        }
        // Fill the window from the log.
        if inflight.len() < WINDOW {
            let (s, after, limit) = (store.clone(), sent, WINDOW - inflight.len());
            let events = tokio::task::spawn_blocking(move || s.events_after(after, limit))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("reading the event log: {e}"))?;
            let mut failed = None;
            for e in events {
                if e.sequence != sent + 1 {
                    // The log never skips a sequence; refuse to publish a gap.
                    break;
                }
                let subject = format!("ppu.{lab}.events.{}", event_kind(e.kind.as_ref()));
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("{lab}:{}", e.sequence).as_str());
                headers.insert("Ppu-Lab", lab);
                headers.insert("Ppu-Sequence", e.sequence.to_string().as_str());
                if let Some((msg_id, batch)) = origins.of(store, &e.experiment_id) {
                    headers.insert("Ppu-Msg-Id", msg_id.as_str());
                    if !batch.is_empty() {
                        headers.insert("Ppu-Batch", batch.as_str());
                    }
                }
                let publish = PublishMessage::build()
                    .payload(e.encode_to_vec().into())
                    .headers(headers);
                match js.send_publish(subject, publish).await {
                    Ok(ack) => inflight.push_back((e.sequence, ack)),
                    Err(err) => {
                        failed = Some(format!("publish of event {}: {err}", e.sequence));
                        break;
                    }
                }
                sent = e.sequence;
            }
            if let Some(err) = failed {
                break Err(err);
            }
        }
        match inflight.pop_front() {
            Some((seq, ack)) => {
                match tokio::time::timeout(ACK_TIMEOUT, ack.into_future()).await {
                    Ok(Ok(_)) => {
                        let n = seq - acked;
                        acked = seq;
                        backoff.reset();
                        shared.published.store(acked, Ordering::Relaxed);
                        crate::metrics::fleet_published(
                            n,
                            store.last_sequence().saturating_sub(acked),
                        );
                    }
                    Ok(Err(e)) => break Err(format!("publish of event {seq}: {e}")),
                    Err(_) => break Err(format!("no ack for event {seq} in {ACK_TIMEOUT:?}")),
                }
                if inflight.is_empty() || acked - persisted >= PERSIST_EVERY {
                    persist(store, acked).await?;
                    persisted = acked;
                }
            }
            None => {
                // Caught up: wait for the next commit (any event wakes a log read; a lagged
                // receiver only means there is more to read).
                tokio::select! {
                    _ = stop.cancelled() => break Ok(()),
                    r = bus.recv() => {
                        if matches!(r, Err(RecvError::Closed)) {
                            break Ok(());
                        }
                    }
                }
            }
        }
    };
    if acked > persisted {
        persist(store, acked).await?;
    }
    debug!(acked, "fleet outbox stopped");
    result
}

/// Which fleet work message each experiment came from (its `fleet.msg_id` and `fleet.batch`
/// labels), cached by experiment id: a planner correlates the lab's events with its
/// submissions through the `Ppu-Msg-Id` header.
#[derive(Default)]
struct Origins(HashMap<String, Option<(String, String)>>);

/// Experiments remembered at most; the cache starts over past it.
const ORIGINS_MAX: usize = 10_000;

impl Origins {
    fn of(&mut self, store: &Store, experiment_id: &str) -> Option<(String, String)> {
        if experiment_id.is_empty() {
            return None;
        }
        if let Some(o) = self.0.get(experiment_id) {
            return o.clone();
        }
        let labels = store
            .get_experiment(experiment_id)
            .ok()
            .flatten()
            .and_then(|e| e.spec)
            .map(|s| s.labels)
            .unwrap_or_default();
        let origin = labels.get(MSG_ID_LABEL).map(|m| {
            (
                m.clone(),
                labels.get(BATCH_LABEL).cloned().unwrap_or_default(),
            )
        });
        if self.0.len() >= ORIGINS_MAX {
            self.0.clear();
        }
        self.0.insert(experiment_id.to_owned(), origin.clone());
        origin
    }
}

/// Persists the acknowledged prefix.
async fn persist(store: &Arc<Store>, acked: u64) -> Result<(), String> {
    store
        .write_async(move |w| w.put_setting(ACKED_KEY, &acked.to_le_bytes()))
        .await
        .map(drop)
        .map_err(|e| format!("persisting the outbox position: {e}"))
}
