//! Resumable event streams.
//!
//! A stream subscribes to the live broadcast *first*, then replays from the requested sequence
//! up to the newest committed event (from the shared ring of recent events where it still
//! holds them, else from the log), then follows the broadcast, dropping anything at or below
//! the last sequence it passed. A subscriber that lags behind the broadcast, or sees a gap,
//! catches up the same way. So a client that reconnects with the last sequence it saw gets
//! exactly the events after it: no gap, no duplicate. Events travel as their logged encoding
//! ([`crate::bus::Published::encoded`]): nothing is decoded or encoded per subscriber.

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock};

use futures_util::Stream;
use ppu_proto::v1::Event;
use ppu_proto::v1::event::Kind;
use prost::Message;
use prost::bytes::Bytes;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
use tokio::sync::broadcast;

use crate::bus::{Published, Recent};
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

/// Events (or log entries, or ring entries) looked at per catch-up round.
const CATCH_UP_CHUNK: usize = REPLAY_CHUNK;

/// Every event after `from` that matches `filter`, then the live tail, as the encoded
/// `ppu.v1.Event`s (the bytes in the log), until the store shuts down. Ends with an error if
/// the log cannot be read.
///
/// Subscribes to the live broadcast at once (before any replay), then catches up from the
/// shared ring of recent events or, for what the ring no longer holds, from the log; then
/// follows the broadcast, dropping anything at or below the last sequence it passed. A gap or
/// a lag sends it back to catching up. The stream is polled by its consumer (the gRPC
/// response): there is no task or channel between the bus and the socket.
pub fn follow(
    store: Arc<Store>,
    from: u64,
    filter: Filter,
) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
    let live = store.subscribe();
    let follower = Follower {
        store,
        live,
        last: from,
        filter: Arc::new(EncodedFilter::new(filter)),
        pending: VecDeque::new(),
        live_mode: false,
        lagged: false,
        done: false,
    };
    futures_util::stream::unfold(follower, |mut f| async move {
        if f.done {
            return None;
        }
        match f.next().await {
            Ok(Some(bytes)) => Some((Ok(bytes), f)),
            Ok(None) => None,
            Err(e) => {
                f.done = true;
                Some((Err(e), f))
            }
        }
    })
}

struct Follower {
    store: Arc<Store>,
    live: broadcast::Receiver<Arc<Published>>,
    /// The last sequence passed (sent or filtered out).
    last: u64,
    filter: Arc<EncodedFilter>,
    /// Caught-up events to send before looking further.
    pending: VecDeque<Bytes>,
    /// Following the broadcast (else catching up).
    live_mode: bool,
    /// Catching up because the broadcast outran this stream (not for the initial replay).
    lagged: bool,
    done: bool,
}

impl Follower {
    /// The next matching event; `None` when the bus closes.
    async fn next(&mut self) -> Result<Option<Bytes>, StoreError> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Ok(Some(b));
            }
            if self.live_mode {
                match self.live.recv().await {
                    Ok(e) if e.sequence <= self.last => {}
                    Ok(e) if e.sequence == self.last + 1 => {
                        self.last = e.sequence;
                        if self.filter.filter.matches(&e) {
                            return Ok(Some(e.encoded().clone()));
                        }
                    }
                    // A gap or a lag: catch up from the ring, else the log.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.live_mode = false;
                        self.lagged = true;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(None),
                }
                continue;
            }
            let filter = &self.filter.filter;
            let pending = &mut self.pending;
            let recent = self.store.recent_after(self.last, CATCH_UP_CHUNK, |e| {
                if filter.matches(e) {
                    pending.push_back(e.encoded().clone());
                }
            });
            match recent {
                Recent::UpToDate => self.live_mode = true,
                Recent::Served(last) => self.last = last,
                Recent::Missing => {
                    if std::mem::take(&mut self.lagged) {
                        self.store.count_log_fallback();
                    }
                    match replay(&self.store, self.last, &self.filter).await? {
                        Some((last, matching)) => {
                            self.last = last;
                            self.pending.extend(matching);
                        }
                        // The log ends here: the rest comes live.
                        None => self.live_mode = true,
                    }
                }
            }
        }
    }
}

/// Reads one chunk of the log after `last`: the new `last` and the matching events' stored
/// bytes (never decoded), or `None` if the log has nothing after `last`.
async fn replay(
    store: &Arc<Store>,
    last: u64,
    filter: &Arc<EncodedFilter>,
) -> Result<Option<(u64, Vec<Bytes>)>, StoreError> {
    let s = store.clone();
    let filter = filter.clone();
    let _turn = REPLAY_READS
        .acquire()
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let mut newest = last;
        let mut matching = Vec::new();
        let n = s.visit_events_after(last, REPLAY_CHUNK, |seq, bytes| {
            newest = seq;
            if filter.matches(bytes) {
                matching.push(Bytes::copy_from_slice(bytes));
            }
            Ok(())
        })?;
        Ok((n > 0).then_some((newest, matching)))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}

/// A [`Filter`] that also judges an event from its encoding, reading only the fields it needs.
struct EncodedFilter {
    filter: Filter,
    /// The `kind` field numbers of `filter.kinds`.
    kind_fields: Vec<u32>,
}

impl EncodedFilter {
    fn new(filter: Filter) -> Self {
        let kind_fields = KINDS
            .iter()
            .filter(|(_, name)| filter.kinds.contains(&name.as_str()))
            .map(|(n, _)| *n)
            .collect();
        Self {
            filter,
            kind_fields,
        }
    }

    fn is_all(&self) -> bool {
        let f = &self.filter;
        f.batch_id.is_none()
            && f.experiment_id.is_none()
            && f.device_id.is_none()
            && f.kinds.is_empty()
    }

    /// Whether an encoded `ppu.v1.Event` matches. Undecodable bytes match (the client then
    /// sees what the log holds, as before).
    fn matches(&self, mut bytes: &[u8]) -> bool {
        if self.is_all() {
            return true;
        }
        let (mut experiment, mut batch, mut device, mut kind) = ("", "", "", 0u32);
        while !bytes.is_empty() {
            let Ok((field, wire)) = decode_key(&mut bytes) else {
                return true;
            };
            match (field, wire) {
                (3..=5, WireType::LengthDelimited) => {
                    let Ok(len) = decode_varint(&mut bytes) else {
                        return true;
                    };
                    let Some(len) = usize::try_from(len).ok().filter(|l| *l <= bytes.len()) else {
                        return true;
                    };
                    let (text, rest) = bytes.split_at(len);
                    bytes = rest;
                    let text = std::str::from_utf8(text).unwrap_or_default();
                    match field {
                        3 => experiment = text,
                        4 => batch = text,
                        _ => device = text,
                    }
                }
                _ => {
                    if KINDS.iter().any(|(n, _)| *n == field) {
                        kind = field;
                    }
                    if skip_field(wire, field, &mut bytes, DecodeContext::default()).is_err() {
                        return true;
                    }
                }
            }
        }
        let f = &self.filter;
        f.batch_id.as_ref().is_none_or(|b| batch == b)
            && f.experiment_id.as_ref().is_none_or(|x| experiment == x)
            && f.device_id.as_ref().is_none_or(|d| device == d)
            && (f.kinds.is_empty() || self.kind_fields.contains(&kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use ppu_proto::v1::ExperimentStateChanged;
    use tokio::sync::mpsc;

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

    /// Follows on a task of its own (so writes race with it), handing decoded events over a
    /// channel of `capacity` (a small one keeps the subscriber behind).
    fn spawn_follow(
        store: &Arc<Store>,
        from: u64,
        filter: Filter,
        capacity: usize,
    ) -> (mpsc::Receiver<Event>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity);
        let stream = follow(store.clone(), from, filter);
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                let e = Event::decode(item.expect("log readable")).expect("an encoded Event");
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        });
        (rx, task)
    }

    async fn take(rx: &mut mpsc::Receiver<Event>, n: usize) -> Vec<u64> {
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
        let (mut rx, task) = spawn_follow(&store, 2, Filter::default(), 4);
        // Writes race with the replay: whatever interleaving happens, order must hold.
        for _ in 0..20 {
            emit(&store, 3, "a");
        }
        let got = take(&mut rx, 63).await;
        assert_eq!(got, (3..=65).collect::<Vec<u64>>());
        drop(rx);
        emit(&store, 1, "a");
        tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("the stream ends with its receiver")
            .unwrap();
    }

    #[tokio::test]
    async fn a_lagging_subscriber_catches_up_from_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (mut rx, _task) = spawn_follow(&store, 0, Filter::default(), 1);
        // Far more than the broadcast holds, while the subscriber is blocked on a full channel:
        // the ring of recent events still holds them all.
        for _ in 0..50 {
            emit(&store, 200, "a");
        }
        let got = take(&mut rx, 10_000).await;
        assert_eq!(got, (1..=10_000).collect::<Vec<u64>>());
        assert_eq!(store.stream_log_fallbacks(), 0);
    }

    #[tokio::test]
    async fn a_subscriber_lagging_past_the_ring_recovers_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (mut rx, _task) = spawn_follow(&store, 0, Filter::default(), 1);
        // Wait until the stream follows live, then outrun the ring while it is blocked.
        emit(&store, 1, "a");
        assert_eq!(take(&mut rx, 1).await, vec![1]);
        let batches = crate::bus::RECENT_EVENTS / 5_000 + 1;
        for _ in 0..batches {
            emit(&store, 5_000, "a");
        }
        let got = take(&mut rx, batches * 5_000).await;
        assert_eq!(got, (2..=1 + batches as u64 * 5_000).collect::<Vec<u64>>());
        assert!(store.stream_log_fallbacks() >= 1);
    }

    #[tokio::test]
    async fn filter_keeps_only_the_experiment() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        emit(&store, 2, "a");
        emit(&store, 2, "b");
        emit(&store, 1, "a");
        let filter = Filter {
            experiment_id: Some("a".into()),
            ..Default::default()
        };
        let (mut rx, _task) = spawn_follow(&store, 0, filter, 16);
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
        let filter = Filter {
            device_id: Some("furnace-1".into()),
            ..Default::default()
        };
        let (mut rx, _task) = spawn_follow(&store, 0, filter, 16);
        assert_eq!(take(&mut rx, 2).await, vec![1, 3]);
        let filter = Filter {
            kinds: vec!["alarm", "experiment_state_changed"],
            ..Default::default()
        };
        let (mut rx, _task) = spawn_follow(&store, 0, filter, 16);
        assert_eq!(take(&mut rx, 3).await, vec![1, 2, 4]);
    }

    /// The log path judges events from their bytes: it must agree with the decoded filter.
    #[tokio::test]
    async fn replay_from_the_log_filters_the_stored_bytes_like_the_decoded_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let events = [
            (
                "x",
                "b1",
                "",
                Kind::ExperimentStateChanged(Default::default()),
            ),
            (
                "y",
                "b1",
                "furnace-1",
                Kind::StepProgress(Default::default()),
            ),
            ("", "", "furnace-1", Kind::Alarm(Default::default())),
            ("x", "b2", "furnace-2", Kind::Audit(Default::default())),
            ("y", "", "", Kind::StepIntermediate(Default::default())),
        ];
        {
            let store = Store::open(&path).unwrap();
            store
                .write(|w| {
                    for (x, b, d, k) in events.clone() {
                        w.emit(x, b, d, k);
                    }
                    Ok(())
                })
                .unwrap();
        }
        // Reopened: the ring is empty, so every stream replays from the log.
        let store = Store::open(&path).unwrap();
        let logged = store.events_after(0, 100).unwrap();
        let filters = [
            Filter::default(),
            Filter {
                experiment_id: Some("x".into()),
                ..Default::default()
            },
            Filter {
                batch_id: Some("b1".into()),
                ..Default::default()
            },
            Filter {
                device_id: Some("furnace-1".into()),
                kinds: vec!["alarm"],
                ..Default::default()
            },
            Filter {
                kinds: vec!["step_intermediate", "audit", "step_progress"],
                ..Default::default()
            },
            Filter {
                experiment_id: Some("nobody".into()),
                ..Default::default()
            },
        ];
        for filter in filters {
            let want: Vec<u64> = logged
                .iter()
                .filter(|e| filter.matches(e))
                .map(|e| e.sequence)
                .collect();
            let encoded = EncodedFilter::new(filter.clone());
            for e in &logged {
                assert_eq!(
                    encoded.matches(&e.encode_to_vec()),
                    filter.matches(e),
                    "{filter:?} on {e:?}"
                );
            }
            let (mut rx, task) = spawn_follow(&store, 0, filter, 16);
            let got = take(&mut rx, want.len()).await;
            assert_eq!(got, want);
            drop(rx);
            task.abort();
        }
        assert_eq!(store.stream_log_fallbacks(), 0);
    }
}
