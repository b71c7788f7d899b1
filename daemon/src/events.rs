//! Resumable event streams.
//!
//! A stream subscribes to the live broadcast *first*, then replays the log from the requested
//! sequence up to the newest committed event, then follows the broadcast, dropping anything at
//! or below the last sequence it sent. A subscriber that lags behind the broadcast, or sees a
//! gap, goes back to the log. So a client that reconnects with the last sequence it saw gets
//! exactly the events after it: no gap, no duplicate.

use std::sync::Arc;

use ppu_proto::v1::Event;
use ppu_proto::v1::event::Kind;
use tokio::sync::{broadcast, mpsc};

use crate::store::{Store, StoreError};

/// Events read from the log per replay round trip.
const REPLAY_CHUNK: usize = 1024;

/// Chunks read from the log at once, across all streams. Hundreds of clients catching up
/// together would otherwise each decode a chunk on its own blocking thread at the same time,
/// and the daemon's memory would peak with their number (docs/BENCHMARKS.md, "Memory after
/// bursts"); queued here they wait their turn, in order, on a couple of cores anyway.
static REPLAY_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Which events a subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub batch_id: Option<String>,
    pub experiment_id: Option<String>,
    pub device_id: Option<String>,
    /// Kind names ([`kind_name`]); empty for every kind.
    pub kinds: Vec<&'static str>,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        self.batch_id.as_ref().is_none_or(|b| &e.batch_id == b)
            && self
                .experiment_id
                .as_ref()
                .is_none_or(|x| &e.experiment_id == x)
            && self.device_id.as_ref().is_none_or(|d| &e.device_id == d)
            && (self.kinds.is_empty()
                || e.kind
                    .as_ref()
                    .is_some_and(|k| self.kinds.contains(&kind_name(k))))
    }
}

/// Every event kind's name: the `Event.kind` oneof field names of ppu.v1, in field order.
pub const KIND_NAMES: &[&str] = &[
    "experiment_state_changed",
    "step_started",
    "step_progress",
    "step_finished",
    "device_reading",
    "device_connection_changed",
    "alarm",
    "queue_state_changed",
    "isotherm_point_measured",
    "device_reserved",
    "device_released",
    "transfer_requested",
    "transfer_confirmed",
    "recovery_decision",
    "maintenance_changed",
    "alarm_acknowledged",
    "experiment_held",
    "experiment_moved",
    "audit",
    "step_intermediate",
];

/// The name of an event's kind, as its oneof field is named in `events.proto`.
pub fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::ExperimentStateChanged(_) => "experiment_state_changed",
        Kind::StepStarted(_) => "step_started",
        Kind::StepProgress(_) => "step_progress",
        Kind::StepFinished(_) => "step_finished",
        Kind::DeviceReading(_) => "device_reading",
        Kind::DeviceConnectionChanged(_) => "device_connection_changed",
        Kind::Alarm(_) => "alarm",
        Kind::QueueStateChanged(_) => "queue_state_changed",
        Kind::IsothermPointMeasured(_) => "isotherm_point_measured",
        Kind::DeviceReserved(_) => "device_reserved",
        Kind::DeviceReleased(_) => "device_released",
        Kind::TransferRequested(_) => "transfer_requested",
        Kind::TransferConfirmed(_) => "transfer_confirmed",
        Kind::RecoveryDecision(_) => "recovery_decision",
        Kind::MaintenanceChanged(_) => "maintenance_changed",
        Kind::AlarmAcknowledged(_) => "alarm_acknowledged",
        Kind::ExperimentHeld(_) => "experiment_held",
        Kind::ExperimentMoved(_) => "experiment_moved",
        Kind::Audit(_) => "audit",
        Kind::StepIntermediate(_) => "step_intermediate",
    }
}

/// The known kind name equal to `name`, or `None`.
pub fn known_kind(name: &str) -> Option<&'static str> {
    KIND_NAMES.iter().copied().find(|k| *k == name)
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamEnd {
    /// The receiver went away (client disconnected).
    #[error("subscriber gone")]
    Closed,
    /// The daemon is shutting down.
    #[error("event bus closed")]
    Shutdown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Feeds `tx` with every event after `from` that matches `filter`, then the live tail, until
/// the receiver is dropped or the store shuts down.
pub async fn follow(
    store: Arc<Store>,
    from: u64,
    filter: Filter,
    tx: mpsc::Sender<Arc<Event>>,
) -> Result<(), StreamEnd> {
    let mut live = store.subscribe();
    let mut last = from;
    loop {
        last = replay(&store, last, &filter, &tx).await?;
        loop {
            match live.recv().await {
                Ok(e) if e.sequence <= last => continue,
                Ok(e) if e.sequence == last + 1 => {
                    last = e.sequence;
                    if filter.matches(&e) {
                        tx.send(e).await.map_err(|_| StreamEnd::Closed)?;
                    }
                }
                // A gap means the broadcast skipped something: re-read the log.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return Err(StreamEnd::Shutdown),
            }
        }
    }
}

/// Sends logged events after `last` until the log is exhausted; returns the new `last`.
async fn replay(
    store: &Arc<Store>,
    mut last: u64,
    filter: &Filter,
    tx: &mpsc::Sender<Arc<Event>>,
) -> Result<u64, StreamEnd> {
    loop {
        let s = store.clone();
        let chunk = {
            let _turn = REPLAY_READS
                .acquire()
                .await
                .map_err(|e| StoreError::Task(e.to_string()))?;
            tokio::task::spawn_blocking(move || s.events_after(last, REPLAY_CHUNK))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))??
        };
        if chunk.is_empty() {
            return Ok(last);
        }
        for e in chunk {
            last = e.sequence;
            if filter.matches(&e) {
                tx.send(Arc::new(e)).await.map_err(|_| StreamEnd::Closed)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppu_proto::v1::ExperimentStateChanged;

    fn emit(store: &Store, n: usize, exp: &str) {
        store
            .write(|w| {
                for _ in 0..n {
                    w.emit(
                        exp,
                        "",
                        "",
                        Kind::ExperimentStateChanged(ExperimentStateChanged::default()),
                    );
                }
                Ok(())
            })
            .unwrap();
    }

    async fn take(rx: &mut mpsc::Receiver<Arc<Event>>, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        while out.len() < n {
            let e = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
                .await
                .expect("event within deadline")
                .expect("stream open");
            out.push(e.sequence);
        }
        out
    }

    #[tokio::test]
    async fn replays_then_follows_without_gaps_or_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        emit(&store, 5, "a");
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(follow(store.clone(), 2, Filter::default(), tx));
        // Writes race with the replay: whatever interleaving happens, order must hold.
        for _ in 0..20 {
            emit(&store, 3, "a");
        }
        let got = take(&mut rx, 63).await;
        assert_eq!(got, (3..=65).collect::<Vec<u64>>());
        drop(rx);
        emit(&store, 1, "a");
        assert!(matches!(task.await.unwrap(), Err(StreamEnd::Closed)));
    }

    #[tokio::test]
    async fn a_lagging_subscriber_recovers_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        tokio::spawn(follow(store.clone(), 0, Filter::default(), tx));
        // Far more than the broadcast holds, while the subscriber is blocked on a full channel.
        for _ in 0..50 {
            emit(&store, 200, "a");
        }
        let got = take(&mut rx, 10_000).await;
        assert_eq!(got, (1..=10_000).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn filter_keeps_only_the_experiment() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        emit(&store, 2, "a");
        emit(&store, 2, "b");
        emit(&store, 1, "a");
        let (tx, mut rx) = mpsc::channel(16);
        let filter = Filter {
            experiment_id: Some("a".into()),
            ..Default::default()
        };
        tokio::spawn(follow(store.clone(), 0, filter, tx));
        assert_eq!(take(&mut rx, 3).await, vec![1, 2, 5]);
    }

    #[test]
    fn kind_names_are_the_oneof_fields_of_event() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(ppu_proto::v1::FILE_DESCRIPTOR_SET)
            .expect("ppu.v1 descriptors");
        let event = set
            .file
            .iter()
            .filter(|f| f.package() == "ppu.v1")
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == "Event")
            .expect("ppu.v1.Event");
        let kind = event
            .oneof_decl
            .iter()
            .position(|o| o.name() == "kind")
            .expect("oneof kind") as i32;
        let names: Vec<&str> = event
            .field
            .iter()
            .filter(|f| f.oneof_index == Some(kind))
            .map(|f| f.name())
            .collect();
        assert_eq!(names, KIND_NAMES);
    }

    #[tokio::test]
    async fn filter_keeps_only_the_device_and_kinds_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        store
            .write(|w| {
                w.emit("", "", "furnace-1", Kind::Alarm(Default::default()));
                w.emit("", "", "furnace-2", Kind::Alarm(Default::default()));
                w.emit("", "", "furnace-1", Kind::StepProgress(Default::default()));
                w.emit(
                    "x",
                    "",
                    "",
                    Kind::ExperimentStateChanged(Default::default()),
                );
                Ok(())
            })
            .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let filter = Filter {
            device_id: Some("furnace-1".into()),
            ..Default::default()
        };
        tokio::spawn(follow(store.clone(), 0, filter, tx));
        assert_eq!(take(&mut rx, 2).await, vec![1, 3]);
        let (tx, mut rx) = mpsc::channel(16);
        let filter = Filter {
            kinds: vec!["alarm", "experiment_state_changed"],
            ..Default::default()
        };
        tokio::spawn(follow(store.clone(), 0, filter, tx));
        assert_eq!(take(&mut rx, 3).await, vec![1, 2, 4]);
    }
}
