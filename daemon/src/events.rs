//! Resumable event streams.
//!
//! A stream subscribes to the live broadcast *first*, then replays the log from the requested
//! sequence up to the newest committed event, then follows the broadcast, dropping anything at
//! or below the last sequence it sent. A subscriber that lags behind the broadcast, or sees a
//! gap, goes back to the log. So a client that reconnects with the last sequence it saw gets
//! exactly the events after it: no gap, no duplicate.

use std::sync::{Arc, LazyLock};

use ppu_proto::v1::Event;
use ppu_proto::v1::event::Kind;
use prost::Message;
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

/// The `Event.kind` oneof fields of ppu.v1 as (field number, name), read from the compiled
/// descriptors: the names clients filter by, and no kind (nor a family's typed alias among
/// them) is spelt out in the core.
static KINDS: LazyLock<Vec<(u32, String)>> = LazyLock::new(|| {
    let Ok(set) = prost_types::FileDescriptorSet::decode(ppu_proto::v1::FILE_DESCRIPTOR_SET) else {
        return Vec::new();
    };
    let Some(event) = set
        .file
        .iter()
        .filter(|f| f.package() == "ppu.v1")
        .flat_map(|f| &f.message_type)
        .find(|m| m.name() == "Event")
    else {
        return Vec::new();
    };
    let Some(kind) = event.oneof_decl.iter().position(|o| o.name() == "kind") else {
        return Vec::new();
    };
    event
        .field
        .iter()
        .filter(|f| f.oneof_index == i32::try_from(kind).ok())
        .filter_map(|f| Some((u32::try_from(f.number()).ok()?, f.name().to_owned())))
        .collect()
});

/// Every event kind's name, in field order.
pub fn kind_names() -> impl Iterator<Item = &'static str> {
    KINDS.iter().map(|(_, name)| name.as_str())
}

/// The name of an event's kind: its oneof field's name in `events.proto`.
pub fn kind_name(kind: &Kind) -> &'static str {
    // The oneof's encoding starts with its field's tag.
    let mut bytes = Vec::with_capacity(kind.encoded_len());
    kind.encode(&mut bytes);
    let number = prost::encoding::decode_varint(&mut bytes.as_slice()).map_or(0, |tag| tag >> 3);
    KINDS
        .iter()
        .find(|(n, _)| u64::from(*n) == number)
        .map_or("", |(_, name)| name.as_str())
}

/// The known kind name equal to `name`, or `None`.
pub fn known_kind(name: &str) -> Option<&'static str> {
    kind_names().find(|k| *k == name)
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
    fn every_kind_has_its_oneof_field_name() {
        let names: Vec<&str> = kind_names().collect();
        assert!(names.len() >= 20, "{names:?}");
        assert_eq!(names[0], "experiment_state_changed");
        assert!(names.contains(&"audit") && names.contains(&"step_intermediate"));
        assert_eq!(
            kind_name(&Kind::ExperimentStateChanged(Default::default())),
            "experiment_state_changed"
        );
        assert_eq!(
            kind_name(&Kind::StepProgress(Default::default())),
            "step_progress"
        );
        assert_eq!(kind_name(&Kind::Audit(Default::default())), "audit");
        assert_eq!(known_kind("alarm"), Some("alarm"));
        assert_eq!(known_kind("alarms"), None);
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
