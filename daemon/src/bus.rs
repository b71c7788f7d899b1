//! The live event bus: what a commit publishes, and the shared ring of recent events.
//!
//! An event is encoded once, at commit: the bytes written to the log are the bytes every
//! subscriber streams ([`Published::encoded`]), so a delivery to a gRPC client is a refcount
//! and a socket write, never a clone or an encode per subscriber.
//!
//! A subscriber that falls behind the broadcast (or sees a gap) catches up from the ring of
//! recent events, shared by all subscribers, before it goes back to the log. The log stays the
//! source of truth: the ring only saves re-reading and decoding it while subscribers keep up.
//! Every fall back to the log after a lag is counted ([`Bus::log_fallbacks`]).

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use ppu_proto::v1::Event;
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::broadcast;

/// Capacity of the live broadcast. A subscriber that falls further behind than this catches up
/// from the ring, then from the log.
const BROADCAST_CAPACITY: usize = 4096;

/// Most events kept in the ring: ~6.5 s at 10k events/s.
pub const RECENT_EVENTS: usize = 65_536;

/// Most encoded bytes kept in the ring, so large events cannot hold much memory.
pub const RECENT_BYTES: usize = 16 * 1024 * 1024;

/// A committed event and its Protobuf encoding (the bytes in the log).
#[derive(Debug)]
pub struct Published {
    event: Event,
    encoded: Bytes,
}

impl Published {
    /// Encodes `event` (sequence and time already assigned).
    pub fn new(event: Event) -> Self {
        let encoded = Bytes::from(event.encode_to_vec());
        Self { event, encoded }
    }

    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The `ppu.v1.Event` encoding, exactly as logged and as streamed.
    pub fn encoded(&self) -> &Bytes {
        &self.encoded
    }
}

impl Deref for Published {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.event
    }
}

/// What the ring holds after a sequence.
#[derive(Debug, PartialEq, Eq)]
pub enum Recent {
    /// Nothing was published after it: follow the broadcast.
    UpToDate,
    /// Events after it were visited, up to and including this sequence.
    Served(u64),
    /// The ring no longer holds the next event: read the log.
    Missing,
}

struct Ring {
    events: VecDeque<Arc<Published>>,
    bytes: usize,
    /// Sequence of the newest published event (the newest logged one at open).
    newest: u64,
}

/// The broadcast of committed events and the ring of recent ones.
pub struct Bus {
    live: broadcast::Sender<Arc<Published>>,
    ring: Mutex<Ring>,
    log_fallbacks: AtomicU64,
}

impl Bus {
    /// A bus whose log ends at sequence `newest`.
    pub fn new(newest: u64) -> Self {
        let (live, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            live,
            ring: Mutex::new(Ring {
                events: VecDeque::new(),
                bytes: 0,
                newest,
            }),
            log_fallbacks: AtomicU64::new(0),
        }
    }

    /// Live events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.live.subscribe()
    }

    /// Publishes committed events, in sequence order (the caller holds the commit lock).
    pub fn publish(&self, events: &[Arc<Published>]) {
        if events.is_empty() {
            return;
        }
        {
            let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
            for e in events {
                // The ring is contiguous; after a reopen that rewound the sequence, start over.
                if e.sequence != ring.newest + 1 {
                    ring.events.clear();
                    ring.bytes = 0;
                }
                ring.newest = e.sequence;
                ring.bytes += e.encoded.len();
                ring.events.push_back(e.clone());
                while ring.events.len() > RECENT_EVENTS || ring.bytes > RECENT_BYTES {
                    match ring.events.pop_front() {
                        Some(old) => ring.bytes -= old.encoded.len(),
                        None => break,
                    }
                }
            }
        }
        for e in events {
            // No subscribers is fine: the log is the source of truth.
            let _ = self.live.send(e.clone());
        }
    }

    /// Visits up to `limit` events after sequence `after` from the ring, oldest first.
    pub fn recent_after(
        &self,
        after: u64,
        limit: usize,
        mut visit: impl FnMut(&Arc<Published>),
    ) -> Recent {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        if after >= ring.newest {
            return Recent::UpToDate;
        }
        let Some(first) = ring.events.front().map(|e| e.sequence) else {
            return Recent::Missing;
        };
        if first > after + 1 {
            return Recent::Missing;
        }
        let skip = usize::try_from(after + 1 - first).unwrap_or(usize::MAX);
        let mut last = after;
        for e in ring.events.iter().skip(skip).take(limit.max(1)) {
            visit(e);
            last = e.sequence;
        }
        Recent::Served(last)
    }

    /// Counts a subscriber that lagged past the ring and went back to the log.
    pub fn count_log_fallback(&self) {
        self.log_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Subscribers that lagged past the ring and read the log, since open.
    pub fn log_fallbacks(&self) -> u64 {
        self.log_fallbacks.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(sequence: u64) -> Arc<Published> {
        Arc::new(Published::new(Event {
            sequence,
            ..Default::default()
        }))
    }

    fn seen(bus: &Bus, after: u64, limit: usize) -> (Recent, Vec<u64>) {
        let mut got = Vec::new();
        let r = bus.recent_after(after, limit, |e| got.push(e.sequence));
        (r, got)
    }

    #[test]
    fn encodes_once_as_the_event() {
        let p = published(7);
        assert_eq!(p.encoded().as_ref(), p.event().encode_to_vec().as_slice());
        assert_eq!(Event::decode(p.encoded().clone()).unwrap().sequence, 7);
    }

    #[test]
    fn the_ring_serves_what_it_holds_and_sends_older_readers_to_the_log() {
        let bus = Bus::new(10);
        assert_eq!(seen(&bus, 10, 100), (Recent::UpToDate, vec![]));
        // Logged before open: only the log has it.
        assert_eq!(seen(&bus, 3, 100), (Recent::Missing, vec![]));
        let events: Vec<_> = (11..=15).map(published).collect();
        bus.publish(&events);
        assert_eq!(
            seen(&bus, 10, 100),
            (Recent::Served(15), vec![11, 12, 13, 14, 15])
        );
        assert_eq!(seen(&bus, 12, 2), (Recent::Served(14), vec![13, 14]));
        assert_eq!(seen(&bus, 15, 100), (Recent::UpToDate, vec![]));
        assert_eq!(seen(&bus, 9, 100), (Recent::Missing, vec![]));
    }

    #[test]
    fn the_ring_keeps_the_newest_events_only() {
        let bus = Bus::new(0);
        let n = RECENT_EVENTS as u64 + 10;
        let events: Vec<_> = (1..=n).map(published).collect();
        bus.publish(&events);
        assert_eq!(seen(&bus, 9, 1).0, Recent::Missing);
        assert_eq!(seen(&bus, 10, 1), (Recent::Served(11), vec![11]));
        assert_eq!(seen(&bus, n - 1, 9), (Recent::Served(n), vec![n]));
    }

    #[test]
    fn a_rewound_sequence_starts_the_ring_over() {
        let bus = Bus::new(0);
        bus.publish(&(1..=5).map(published).collect::<Vec<_>>());
        bus.publish(&[published(4)]);
        assert_eq!(seen(&bus, 3, 10), (Recent::Served(4), vec![4]));
        assert_eq!(seen(&bus, 1, 10), (Recent::Missing, vec![]));
    }
}
