//! The durable store: experiments, batches, idempotency keys, queue flags and the event log, in
//! one redb file; plus the scheduler's durable working state: the intent journal of in-flight
//! steps, device reservations, sample custody, pending transfers, maintenance flags, queue ranks
//! and deferred cancels. Each of these changes in the same transaction as the events that
//! describe it, so the log and the records never disagree.
//!
//! Every mutation goes through [`Store::write`], which runs in one redb write transaction,
//! assigns the next global sequence numbers to the events appended in it, commits with
//! `Durability::Immediate` (fsync) and only then publishes those events to live subscribers.
//! A commit lock spans commit *and* publish, so subscribers see events in sequence order and
//! never an event that is not on disk. Concurrent writers are grouped: they share one
//! transaction and one fsync, each still getting its own outcome (see [`Store::write`]).
//!
//! A write that fails with an I/O error (a full disk, a failing device) puts the store into a
//! *fault*: redb refuses every later operation on that handle ("Previous I/O error occurred"),
//! so the database is closed and reopened (all access goes through one swappable holder), reads
//! go on, writes are refused at once with [`StoreError::Unavailable`] naming the reason, and
//! [`Store::supervise`] retries with backoff until a write commits again. A failed transaction
//! changes nothing, in memory either: no sequence number, no count.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime};

use ppu_proto::v1::{self as pb, Batch, Event, Experiment, PendingTransfer, event};
use prost::Message;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use tokio::sync::{broadcast, watch};

use crate::bus::{Bus, Published, Recent};
use tracing::{info, warn};

use crate::journal::JournalEntry;
use crate::state::State;

const EXPERIMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("experiments");
const BATCHES: TableDefinition<&str, &[u8]> = TableDefinition::new("batches");
/// idempotency key → (batch id, sha-256 of the batch content, hex).
const IDEMPOTENCY: TableDefinition<&str, (&str, &str)> = TableDefinition::new("idempotency");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// device id → the driver's opaque saved state (`Device::saved_state`).
const DEVICE_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("device_state");

/// device id → the step in flight on it (`journal::JournalEntry`), written before actuation.
const JOURNAL: TableDefinition<&str, &[u8]> = TableDefinition::new("journal");
/// device id → (experiment id, step index) holding its reservation.
const RESERVATIONS: TableDefinition<&str, (&str, u32)> = TableDefinition::new("reservations");
/// sample id → device id that holds it.
const CUSTODY: TableDefinition<&str, &str> = TableDefinition::new("custody");
/// transfer id → `PendingTransfer` awaiting confirmation.
const TRANSFERS: TableDefinition<&str, &[u8]> = TableDefinition::new("transfers");
/// device id → maintenance reason, for devices in maintenance.
const MAINTENANCE: TableDefinition<&str, &str> = TableDefinition::new("maintenance");
/// experiment id → rank within its priority (start order; see `queue`).
const RANKS: TableDefinition<&str, i64> = TableDefinition::new("ranks");
/// experiment id → reason, for RUNNING experiments to cancel once their current step ends.
const CANCEL_AFTER: TableDefinition<&str, &str> = TableDefinition::new("cancel_after_step");
/// device id → the alarms the daemon tracks for it (`ListAlarmsResponse`: active, or cleared
/// but not yet acknowledged), so a restart neither re-raises nor forgets an acknowledgement.
const ALARMS: TableDefinition<&str, &[u8]> = TableDefinition::new("alarms");

const META_QUEUE_PAUSED: &str = "queue_paused";
/// Prefix of the keys of [`WriteTx::put_setting`] in the meta table.
const SETTING_PREFIX: &str = "setting.";
/// Bytes of the event log's keys and values (u64, little-endian), updated with every commit
/// that appends events, so opening a long log need not measure it. Events are never removed;
/// anything that ever removes some must lower this in the same transaction.
const META_EVENT_LOG_BYTES: &str = "event_log_bytes";

/// redb's page cache (read cache and write buffer together; the write buffer takes at most
/// half). Its default (1 GiB) grows with whatever is read, e.g. every client replaying the
/// event log or the start-up scan of the queue, and never shrinks. 16 MiB holds the hot pages
/// (the tables' upper levels, the log's tail) and a batch's writes; the operating system's page
/// cache serves the rest. Measured in docs/BENCHMARKS.md ("RSS with 100k queued"): with
/// 100k queued and 1M events, 64 MiB cost ~30 MB at start-up and ~35 MB more after one log
/// read, with no gain in submit throughput.
pub const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// The device id under which the daemon's own alarms (storage faults) are listed and logged.
pub const DAEMON_ALARM_SOURCE: &str = "ppud";
/// Free space the supervisor wants to see (a probe file of this size is written, synced and
/// removed) before it tries a real commit after a fault, so a disk with a few bytes free does
/// not flap between serving and not serving.
const HEADROOM_PROBE_BYTES: usize = 1 << 20;
/// First and longest wait between two recovery attempts after a storage fault.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A store failure. Carries no request data; the gRPC layer maps it (`server`):
/// `Unavailable` to UNAVAILABLE, the rest to INTERNAL or DATA_LOSS.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot write (see [`Fault`]); reads still answer. Retry later.
    #[error("storage unavailable: {0}; retrying")]
    Unavailable(String),
    #[error("storage: {0}")]
    Db(#[from] redb::Error),
    #[error("corrupt record in {table}: {reason}")]
    Corrupt { table: &'static str, reason: String },
    #[error("storage task failed: {0}")]
    Task(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The `state` field of a stored `Experiment` alone (tag 4 in `experiment.proto`): decoding it
/// skips every other field, so keeping [`Store::experiment_counts`] in step costs no full decode.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredState {
    #[prost(int32, tag = "4")]
    state: i32,
}

/// What the scheduler's queue needs of a stored experiment (the tags of `Experiment` and
/// `ExperimentSpec` in `experiment.proto`): decoding it skips the name, labels, results and
/// timestamps without allocating them. See [`Store::for_each_in`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueueView {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "3")]
    pub spec: Option<QueueSpecView>,
    #[prost(int32, tag = "4")]
    pub state: i32,
    #[prost(uint32, tag = "5")]
    pub current_step: u32,
    #[prost(bool, tag = "10")]
    pub held: bool,
}

/// The part of `ExperimentSpec` in a [`QueueView`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueueSpecView {
    #[prost(string, tag = "2")]
    pub sample_id: String,
    #[prost(int32, tag = "4")]
    pub priority: i32,
    #[prost(message, repeated, tag = "5")]
    pub steps: Vec<pb::Step>,
}

/// Position of a valid state of a stored experiment in [`State::ALL`].
fn state_slot(bytes: &[u8]) -> Option<usize> {
    let raw = StoredState::decode(bytes).ok()?.state;
    let state = State::from_proto(raw)?;
    State::ALL.iter().position(|s| *s == state)
}

/// Wall-clock time as a protobuf timestamp.
pub fn now_timestamp() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

fn decode<M: Message + Default>(table: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

/// Why the store cannot write, since when. Published on [`Store::health`].
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// The I/O error, e.g. "ENOSPC: No space left on device (os error 28)".
    pub reason: String,
    pub since: prost_types::Timestamp,
    /// Stable alarm code: `enospc` for a full disk, `storage_io_error` otherwise.
    pub code: &'static str,
}

impl Fault {
    /// The daemon-level alarm this fault raises, as `ListAlarms` shows it.
    pub fn alarm(&self) -> pb::ActiveAlarm {
        pb::ActiveAlarm {
            device_id: DAEMON_ALARM_SOURCE.to_owned(),
            code: self.code.to_owned(),
            message: format!("storage unavailable: {}", self.reason),
            severity: pb::AlarmSeverity::Critical as i32,
            raised_at: Some(self.since),
            ..Default::default()
        }
    }
}

impl StoreError {
    /// The same failure for another writer of a group that shared the failed commit.
    fn replica(&self) -> StoreError {
        match self {
            StoreError::Unavailable(r) => StoreError::Unavailable(r.clone()),
            StoreError::Corrupt { table, reason } => StoreError::Corrupt {
                table,
                reason: reason.clone(),
            },
            StoreError::Task(r) => StoreError::Task(r.clone()),
            StoreError::Db(e) => StoreError::Task(format!("the shared commit failed: {e}")),
        }
    }
}

/// The I/O failure behind `e`, if it is one that needs the database reopened: (reason, code).
fn io_failure(e: &StoreError) -> Option<(String, &'static str)> {
    match e {
        StoreError::Db(redb::Error::Io(io)) => {
            let full =
                io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28);
            Some(if full {
                (format!("ENOSPC: {io}"), "enospc")
            } else {
                (io.to_string(), "storage_io_error")
            })
        }
        StoreError::Db(e @ (redb::Error::PreviousIo | redb::Error::DatabaseClosed)) => {
            Some((e.to_string(), "storage_io_error"))
        }
        _ => None,
    }
}

/// The committed counters a reopened database must agree with.
struct Counters {
    last: u64,
    state_counts: [u64; State::ALL.len()],
    event_bytes: Option<u64>,
}

fn read_counters(db: &Database) -> Result<Counters, StoreError> {
    let r = db.begin_read()?;
    let last = r
        .open_table(EVENTS)?
        .last()?
        .map(|(k, _)| k.value())
        .unwrap_or(0);
    let mut state_counts = [0u64; State::ALL.len()];
    for item in r.open_table(EXPERIMENTS)?.iter()? {
        let (_, v) = item?;
        if let Some(slot) = state_slot(v.value()) {
            state_counts[slot] += 1;
        }
    }
    let event_bytes = r
        .open_table(META)?
        .get(META_EVENT_LOG_BYTES)?
        .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
        .map(u64::from_le_bytes);
    Ok(Counters {
        last,
        state_counts,
        event_bytes,
    })
}

/// Writes, syncs and removes a probe file next to `path`: is there room again?
fn probe_headroom(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut probe = path.as_os_str().to_owned();
    probe.push(".space-probe");
    let probe = PathBuf::from(probe);
    let result = (|| {
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(&vec![0u8; HEADROOM_PROBE_BYTES])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    result
}

/// The open store. Share it as `Arc<Store>`.
pub struct Store {
    path: PathBuf,
    /// The database; `None` only while a reopen after a fault has failed. Swapped, never
    /// shared outside: every access goes through [`Store::read`] or [`Store::write`].
    db: RwLock<Option<Database>>,
    /// True when the handle in `db` has seen an I/O error and must be closed and reopened.
    broken: AtomicBool,
    /// `Some` while writes are refused; see [`Store::supervise`].
    health: watch::Sender<Option<Fault>>,
    /// Next sequence number to assign; guarded so that commit and publish are one step.
    next_seq: Mutex<u64>,
    /// Group commit: who leads, the open shared transaction, who waits (see [`Store::write`]).
    group: Mutex<Group>,
    /// Signalled whenever [`Group`] changes.
    group_changed: Condvar,
    /// Committed events, live and recent ([`crate::bus`]).
    bus: Bus,
    /// Experiments per state ([`State::ALL`] order), counted once at open and then adjusted at
    /// each commit, so metrics read them in O(states) instead of scanning every experiment.
    state_counts: Mutex<[u64; State::ALL.len()]>,
    /// Bytes of the event log's keys and values, as last committed (`META_EVENT_LOG_BYTES`).
    event_bytes: AtomicU64,
}

/// Most writers one shared transaction takes: a bound on the work (and the latency) of one
/// commit under a flood of concurrent writers; the rest wait for the next one.
const GROUP_MAX_MEMBERS: usize = 256;

/// Group commit state (see [`Store::write`]), guarded by `Store::group`.
#[derive(Default)]
struct Group {
    /// A leader is gathering, committing or publishing a group (or the supervisor heals).
    leading: bool,
    /// The gathering group's shared transaction, while it takes members.
    open: Option<Open>,
    /// Writers that asked to write and have neither joined a group nor left.
    waiting: usize,
    next_ticket: u64,
    /// Outcomes for members that have not collected theirs, by ticket.
    done: HashMap<u64, Result<Vec<Arc<Published>>, StoreError>>,
}

/// A shared transaction being filled by the writers of one group, in order.
struct Open {
    tx: WriteTransaction,
    /// Each successful member's ticket and events, in the order they wrote.
    members: Vec<(u64, Vec<Event>)>,
    state_delta: [i64; State::ALL.len()],
    /// Set when a member failed in a way its undo cannot repair (a storage error): the
    /// transaction must not commit.
    poisoned: Option<String>,
}

type BytesTable = TableDefinition<'static, &'static str, &'static [u8]>;
type TextTable = TableDefinition<'static, &'static str, &'static str>;

/// What one change of a group member replaced, to put back if that member fails (see
/// [`Store::write`]): the key and its previous value (`None`: the key was absent).
enum Undo {
    Bytes(BytesTable, String, Option<Vec<u8>>),
    Text(TextTable, String, Option<String>),
    Idempotency(String, Option<(String, String)>),
    Reservation(String, Option<(String, u32)>),
    Rank(String, Option<i64>),
}

impl Undo {
    fn apply(self, tx: &WriteTransaction) -> Result<(), StoreError> {
        match self {
            Undo::Bytes(def, k, old) => {
                let mut t = tx.open_table(def)?;
                match old {
                    Some(v) => drop(t.insert(k.as_str(), v.as_slice())?),
                    None => drop(t.remove(k.as_str())?),
                }
            }
            Undo::Text(def, k, old) => {
                let mut t = tx.open_table(def)?;
                match old {
                    Some(v) => drop(t.insert(k.as_str(), v.as_str())?),
                    None => drop(t.remove(k.as_str())?),
                }
            }
            Undo::Idempotency(k, old) => {
                let mut t = tx.open_table(IDEMPOTENCY)?;
                match old {
                    Some((b, h)) => drop(t.insert(k.as_str(), (b.as_str(), h.as_str()))?),
                    None => drop(t.remove(k.as_str())?),
                }
            }
            Undo::Reservation(k, old) => {
                let mut t = tx.open_table(RESERVATIONS)?;
                match old {
                    Some((e, s)) => drop(t.insert(k.as_str(), (e.as_str(), s))?),
                    None => drop(t.remove(k.as_str())?),
                }
            }
            Undo::Rank(k, old) => {
                let mut t = tx.open_table(RANKS)?;
                match old {
                    Some(v) => drop(t.insert(k.as_str(), v)?),
                    None => drop(t.remove(k.as_str())?),
                }
            }
        }
        Ok(())
    }
}

/// One write transaction, or one writer's part of a shared one (group commit). Events
/// appended here get their sequence numbers at commit.
pub struct WriteTx<'a> {
    tx: &'a WriteTransaction,
    events: Vec<Event>,
    /// Change in experiments per state ([`State::ALL`] order), applied once committed.
    state_delta: [i64; State::ALL.len()],
    /// For a writer that joined a transaction others have written in: what its changes
    /// replaced, newest last, so that its failure can take them back out. `None` for the
    /// first writer of a transaction, whose failure aborts the whole transaction instead.
    undo: Option<Vec<Undo>>,
}

impl<'a> WriteTx<'a> {
    fn new(tx: &'a WriteTransaction, undoable: bool) -> Self {
        Self {
            tx,
            events: Vec::new(),
            state_delta: [0; State::ALL.len()],
            undo: undoable.then(Vec::new),
        }
    }

    fn remember(&mut self, undo: impl FnOnce() -> Undo) {
        if let Some(log) = &mut self.undo {
            log.push(undo());
        }
    }

    /// Takes this writer's changes back out of the shared transaction, newest first.
    fn roll_back(self) -> Result<(), StoreError> {
        let tx = self.tx;
        for u in self.undo.into_iter().flatten().rev() {
            u.apply(tx)?;
        }
        Ok(())
    }

    fn put_bytes(&mut self, def: BytesTable, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(def)?;
        let old = t.insert(key, value)?;
        let old = self.undo.is_some().then(|| old.map(|v| v.value().to_vec()));
        drop(t);
        self.remember(|| Undo::Bytes(def, key.to_owned(), old.flatten()));
        Ok(())
    }

    fn set_text(
        &mut self,
        def: TextTable,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(def)?;
        let old = match value {
            Some(v) => t.insert(key, v)?,
            None => t.remove(key)?,
        };
        let old = old.map(|v| v.value().to_owned());
        drop(t);
        self.remember(|| Undo::Text(def, key.to_owned(), old));
        Ok(())
    }

    pub fn put_experiment(&mut self, e: &Experiment) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(EXPERIMENTS)?;
        let old = t.insert(e.id.as_str(), e.encode_to_vec().as_slice())?;
        if let Some(slot) = old.as_ref().and_then(|v| state_slot(v.value())) {
            self.state_delta[slot] -= 1;
        }
        let old = self.undo.is_some().then(|| old.map(|v| v.value().to_vec()));
        drop(t);
        self.remember(|| Undo::Bytes(EXPERIMENTS, e.id.clone(), old.flatten()));
        if let Some(slot) =
            State::from_proto(e.state).and_then(|s| State::ALL.iter().position(|a| *a == s))
        {
            self.state_delta[slot] += 1;
        }
        Ok(())
    }

    /// [`WriteTx::put_experiment`] and [`WriteTx::set_rank`] for many experiments (a submitted
    /// batch), each table opened once and one encoding buffer reused.
    pub fn put_experiments_ranked<'e>(
        &mut self,
        items: impl IntoIterator<Item = (&'e Experiment, i64)>,
    ) -> Result<(), StoreError> {
        let mut experiments = self.tx.open_table(EXPERIMENTS)?;
        let mut ranks = self.tx.open_table(RANKS)?;
        let mut buf = Vec::new();
        for (e, rank) in items {
            buf.clear();
            e.encode(&mut buf)
                .map_err(|err| StoreError::Task(err.to_string()))?;
            let old = experiments.insert(e.id.as_str(), buf.as_slice())?;
            if let Some(slot) = old.as_ref().and_then(|v| state_slot(v.value())) {
                self.state_delta[slot] -= 1;
            }
            if let Some(slot) =
                State::from_proto(e.state).and_then(|s| State::ALL.iter().position(|a| *a == s))
            {
                self.state_delta[slot] += 1;
            }
            let old_rank = ranks.insert(e.id.as_str(), rank)?.map(|v| v.value());
            if let Some(log) = &mut self.undo {
                log.push(Undo::Bytes(
                    EXPERIMENTS,
                    e.id.clone(),
                    old.map(|v| v.value().to_vec()),
                ));
                log.push(Undo::Rank(e.id.clone(), old_rank));
            }
        }
        Ok(())
    }

    pub fn get_experiment(&self, id: &str) -> Result<Option<Experiment>, StoreError> {
        let t = self.tx.open_table(EXPERIMENTS)?;
        let v = t.get(id)?;
        v.map(|v| decode("experiments", v.value())).transpose()
    }

    pub fn put_batch(&mut self, b: &Batch, content_hash: &str) -> Result<(), StoreError> {
        self.put_bytes(BATCHES, &b.id, &b.encode_to_vec())?;
        let mut k = self.tx.open_table(IDEMPOTENCY)?;
        let old = k.insert(b.idempotency_key.as_str(), (b.id.as_str(), content_hash))?;
        let old = old.map(|v| {
            let (b, h) = v.value();
            (b.to_owned(), h.to_owned())
        });
        drop(k);
        self.remember(|| Undo::Idempotency(b.idempotency_key.clone(), old));
        Ok(())
    }

    /// The batch id stored for an idempotency key, seen from inside this transaction.
    pub fn find_idempotency_key(&self, key: &str) -> Result<Option<(String, String)>, StoreError> {
        let t = self.tx.open_table(IDEMPOTENCY)?;
        let v = t.get(key)?;
        Ok(v.map(|v| {
            let (b, h) = v.value();
            (b.to_owned(), h.to_owned())
        }))
    }

    /// Every experiment in `state`, in id order, seen from inside this transaction.
    pub fn experiments_in(&self, state: State) -> Result<Vec<Experiment>, StoreError> {
        let t = self.tx.open_table(EXPERIMENTS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (_, v) = item?;
            let e: Experiment = decode("experiments", v.value())?;
            if State::from_proto(e.state) == Some(state) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Sets a daemon-wide value by key (e.g. the SiLA server's UUID and name); the keys are the
    /// callers' own and never collide with the store's.
    pub fn put_setting(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put_bytes(META, &format!("{SETTING_PREFIX}{key}"), value)
    }

    pub fn set_queue_paused(&mut self, paused: bool) -> Result<(), StoreError> {
        self.put_bytes(META, META_QUEUE_PAUSED, &[u8::from(paused)])
    }

    /// Saves a driver's opaque state (see `Device::saved_state`).
    pub fn put_device_state(&mut self, device_id: &str, state: &[u8]) -> Result<(), StoreError> {
        self.put_bytes(DEVICE_STATE, device_id, state)
    }

    /// Records a step about to actuate its device (the intent journal).
    pub fn put_journal(&mut self, e: &JournalEntry) -> Result<(), StoreError> {
        self.put_bytes(JOURNAL, &e.device_id, &e.encode_to_vec())
    }

    /// Removes the journal entry of `device_id`, returning it if there was one.
    pub fn take_journal(&mut self, device_id: &str) -> Result<Option<JournalEntry>, StoreError> {
        self.take_bytes(JOURNAL, device_id)?
            .map(|v| decode("journal", &v))
            .transpose()
    }

    fn take_bytes(&mut self, def: BytesTable, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut t = self.tx.open_table(def)?;
        let old = t.remove(key)?.map(|v| v.value().to_vec());
        drop(t);
        if old.is_some() {
            self.remember(|| Undo::Bytes(def, key.to_owned(), old.clone()));
        }
        Ok(old)
    }

    /// Every journaled step, by device id.
    pub fn journal(&self) -> Result<Vec<JournalEntry>, StoreError> {
        let t = self.tx.open_table(JOURNAL)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (_, v) = item?;
            out.push(decode("journal", v.value())?);
        }
        Ok(out)
    }

    /// Records that `device_id` is reserved for one step of an experiment.
    pub fn put_reservation(
        &mut self,
        device_id: &str,
        experiment_id: &str,
        step_index: u32,
    ) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(RESERVATIONS)?;
        let old = t.insert(device_id, (experiment_id, step_index))?.map(|v| {
            let (e, s) = v.value();
            (e.to_owned(), s)
        });
        drop(t);
        self.remember(|| Undo::Reservation(device_id.to_owned(), old));
        Ok(())
    }

    /// Drops a reservation; returns (experiment id, step index) if there was one.
    pub fn remove_reservation(
        &mut self,
        device_id: &str,
    ) -> Result<Option<(String, u32)>, StoreError> {
        let mut t = self.tx.open_table(RESERVATIONS)?;
        let old = t.remove(device_id)?.map(|v| {
            let (e, s) = v.value();
            (e.to_owned(), s)
        });
        drop(t);
        if old.is_some() {
            self.remember(|| Undo::Reservation(device_id.to_owned(), old.clone()));
        }
        Ok(old)
    }

    /// Every reservation: (device id, experiment id, step index).
    pub fn reservations(&self) -> Result<Vec<(String, String, u32)>, StoreError> {
        let t = self.tx.open_table(RESERVATIONS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let (e, s) = v.value();
            out.push((k.value().to_owned(), e.to_owned(), s));
        }
        Ok(out)
    }

    /// Records where a sample is; `None` when its location is no longer known.
    pub fn set_custody(
        &mut self,
        sample_id: &str,
        device_id: Option<&str>,
    ) -> Result<(), StoreError> {
        self.set_text(CUSTODY, sample_id, device_id)
    }

    /// The device that holds `sample_id`, if known.
    pub fn custody_of(&self, sample_id: &str) -> Result<Option<String>, StoreError> {
        let t = self.tx.open_table(CUSTODY)?;
        let v = t.get(sample_id)?;
        Ok(v.map(|v| v.value().to_owned()))
    }

    pub fn put_transfer(&mut self, p: &PendingTransfer) -> Result<(), StoreError> {
        self.put_bytes(TRANSFERS, &p.id, &p.encode_to_vec())
    }

    /// Removes a pending transfer, returning it if it was pending.
    pub fn take_transfer(&mut self, id: &str) -> Result<Option<PendingTransfer>, StoreError> {
        self.take_bytes(TRANSFERS, id)?
            .map(|v| decode("transfers", &v))
            .transpose()
    }

    /// Every pending transfer, by id.
    pub fn transfers(&self) -> Result<Vec<PendingTransfer>, StoreError> {
        let t = self.tx.open_table(TRANSFERS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (_, v) = item?;
            out.push(decode("transfers", v.value())?);
        }
        Ok(out)
    }

    /// Puts a device into maintenance with a reason (`Some`), or takes it out (`None`).
    pub fn set_maintenance(
        &mut self,
        device_id: &str,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        self.set_text(MAINTENANCE, device_id, reason)
    }

    /// Sets an experiment's rank within its priority.
    pub fn set_rank(&mut self, experiment_id: &str, rank: i64) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(RANKS)?;
        let old = t.insert(experiment_id, rank)?.map(|v| v.value());
        drop(t);
        self.remember(|| Undo::Rank(experiment_id.to_owned(), old));
        Ok(())
    }

    /// Replaces the tracked alarms of a device (none: the entry is removed).
    pub fn put_alarms(
        &mut self,
        device_id: &str,
        alarms: Vec<pb::ActiveAlarm>,
    ) -> Result<(), StoreError> {
        if alarms.is_empty() {
            self.take_bytes(ALARMS, device_id)?;
            Ok(())
        } else {
            let bytes = pb::ListAlarmsResponse { alarms }.encode_to_vec();
            self.put_bytes(ALARMS, device_id, &bytes)
        }
    }

    /// Marks a RUNNING experiment to be cancelled after its current step (`Some(reason)`), or
    /// clears the mark.
    pub fn set_cancel_after(
        &mut self,
        experiment_id: &str,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        self.set_text(CANCEL_AFTER, experiment_id, reason)
    }

    /// Appends an event; its sequence and time are set at commit.
    pub fn append(&mut self, event: Event) {
        self.events.push(event);
    }

    /// Appends an event built from its parts.
    pub fn emit(
        &mut self,
        experiment_id: &str,
        batch_id: &str,
        device_id: &str,
        kind: event::Kind,
    ) {
        self.append(Event {
            experiment_id: experiment_id.to_owned(),
            batch_id: batch_id.to_owned(),
            device_id: device_id.to_owned(),
            kind: Some(kind),
            ..Default::default()
        });
    }
}

/// The kinds of stored record a client names by id (see `ids::resolve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSpace {
    Experiment,
    Batch,
    /// Pending transfers only: a confirmed transfer is no longer stored by id.
    Transfer,
}

impl IdSpace {
    /// The table keyed by ids of this space.
    fn table(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            IdSpace::Experiment => EXPERIMENTS,
            IdSpace::Batch => BATCHES,
            IdSpace::Transfer => TRANSFERS,
        }
    }
}

/// A page of experiments plus the token of the next one.
pub struct Page {
    pub experiments: Vec<Experiment>,
    pub next: Option<String>,
}

impl Store {
    /// Opens (or creates) the store at `path`. redb repairs a file left by a crash on open.
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)?;
        // Create every table up front so readers never meet a missing table.
        let tx = db.begin_write()?;
        {
            tx.open_table(EXPERIMENTS)?;
            tx.open_table(BATCHES)?;
            tx.open_table(IDEMPOTENCY)?;
            tx.open_table(EVENTS)?;
            tx.open_table(META)?;
            tx.open_table(DEVICE_STATE)?;
            tx.open_table(JOURNAL)?;
            tx.open_table(RESERVATIONS)?;
            tx.open_table(CUSTODY)?;
            tx.open_table(TRANSFERS)?;
            tx.open_table(MAINTENANCE)?;
            tx.open_table(RANKS)?;
            tx.open_table(CANCEL_AFTER)?;
            tx.open_table(ALARMS)?;
        }
        let event_bytes = {
            let mut meta = tx.open_table(META)?;
            let stored = meta
                .get(META_EVENT_LOG_BYTES)?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                .map(u64::from_le_bytes);
            match stored {
                Some(bytes) => bytes,
                None => {
                    // A store from before the counter: measure the log once (O(pages)).
                    let bytes = tx.open_table(EVENTS)?.stats()?.stored_bytes();
                    meta.insert(META_EVENT_LOG_BYTES, bytes.to_le_bytes().as_slice())?;
                    bytes
                }
            }
        };
        tx.commit()?;
        let c = read_counters(&db)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            db: RwLock::new(Some(db)),
            broken: AtomicBool::new(false),
            health: watch::Sender::new(None),
            next_seq: Mutex::new(c.last + 1),
            group: Mutex::new(Group::default()),
            group_changed: Condvar::new(),
            bus: Bus::new(c.last),
            state_counts: Mutex::new(c.state_counts),
            event_bytes: AtomicU64::new(event_bytes),
        }))
    }

    /// Runs `f` on the database (a read). A read that meets an I/O error faults the store.
    fn read<R>(&self, f: impl FnOnce(&Database) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let r = {
            let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
            match db.as_ref() {
                Some(db) => f(db),
                None => return Err(self.refusal()),
            }
        };
        r.map_err(|e| self.classify(e))
    }

    /// Turns an I/O failure into a fault (and [`StoreError::Unavailable`]); others pass.
    fn classify(&self, e: StoreError) -> StoreError {
        let Some((reason, code)) = io_failure(&e) else {
            return e;
        };
        self.broken.store(true, Ordering::Release);
        self.health.send_if_modified(|f| {
            if f.is_some() {
                return false;
            }
            warn!(reason = %reason, "storage fault: writes refused until the store recovers");
            *f = Some(Fault {
                reason,
                since: now_timestamp(),
                code,
            });
            true
        });
        self.refusal()
    }

    /// The error for a write refused (or a read impossible) during a fault.
    fn refusal(&self) -> StoreError {
        let reason = self.health.borrow().as_ref().map_or_else(
            || "the database is being reopened".to_owned(),
            |f| f.reason.clone(),
        );
        StoreError::Unavailable(reason)
    }

    /// The current storage fault, if writes are refused.
    pub fn fault(&self) -> Option<Fault> {
        self.health.borrow().clone()
    }

    /// Follows the store's health: `Some(fault)` while writes are refused, `None` when it
    /// writes. Holds no reference to the store.
    pub fn health(&self) -> watch::Receiver<Option<Fault>> {
        self.health.subscribe()
    }

    /// The daemon's own alarms (device id [`DAEMON_ALARM_SOURCE`]) active now.
    pub fn alarms_now(&self) -> Vec<pb::ActiveAlarm> {
        self.fault().map(|f| f.alarm()).into_iter().collect()
    }

    /// Starts the storage supervisor: after a fault it reopens the database and retries with
    /// backoff (50 ms doubling to 2 s) until a write commits, then logs the fault's alarm,
    /// raised and cleared, and clears the fault. The task holds no reference to the store and
    /// ends when it is dropped.
    pub fn supervise(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Store> = Arc::downgrade(self);
        let mut rx = self.health();
        tokio::spawn(async move {
            loop {
                if rx.wait_for(Option::is_some).await.is_err() {
                    return;
                }
                let mut delay = RETRY_FIRST;
                loop {
                    let Some(store) = weak.upgrade() else { return };
                    let healed = tokio::task::spawn_blocking(move || store.try_heal())
                        .await
                        .unwrap_or(false);
                    if healed {
                        break;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        })
    }

    /// One recovery attempt (blocking): reopen a broken handle, check for room, then commit
    /// the fault's alarm. True when the store writes again.
    fn try_heal(&self) -> bool {
        let Some(fault) = self.fault() else {
            return true;
        };
        // Lead, so that no group transaction is open while the handle is swapped.
        {
            let mut g = self.lock_group();
            while g.leading {
                g = self.wait_group(g);
            }
            g.leading = true;
        }
        let healed = self.heal(&fault);
        self.step_down();
        healed
    }

    fn heal(&self, fault: &Fault) -> bool {
        let mut next = self.lock_seq();
        if self.broken.load(Ordering::Acquire)
            && let Err(e) = self.reopen(&mut next)
        {
            warn!(error = %e, "storage: reopen failed; retrying");
            return false;
        }
        if let Err(e) = probe_headroom(&self.path) {
            warn!(error = %e, "storage: still no room; retrying");
            return false;
        }
        let raised = fault.alarm();
        let committed = self.write_locked(&mut next, |w| {
            for cleared in [false, true] {
                w.emit(
                    "",
                    "",
                    DAEMON_ALARM_SOURCE,
                    event::Kind::Alarm(pb::Alarm {
                        code: raised.code.clone(),
                        message: raised.message.clone(),
                        severity: raised.severity,
                        cleared,
                    }),
                );
            }
            Ok(())
        });
        match committed {
            Ok(_) => {
                self.health.send_replace(None);
                info!(fault = %fault.reason, "storage recovered: writes accepted again");
                true
            }
            Err(e) => {
                warn!(error = %e, "storage: commit still failing; retrying");
                false
            }
        }
    }

    /// Closes the broken handle and opens the file again (redb repairs it); the counters are
    /// re-read so memory follows what is on disk. Called with the commit lock held.
    fn reopen(&self, next: &mut u64) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // Close first: redb allows one open handle per file.
        *db = None;
        // With the same bounded cache as at open (redb's default is 1 GiB).
        let fresh = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&self.path)?;
        let c = read_counters(&fresh)?;
        *db = Some(fresh);
        self.broken.store(false, Ordering::Release);
        if c.last + 1 != *next {
            warn!(
                on_disk = c.last,
                in_memory = *next - 1,
                "storage: last sequence differs after reopen; following the disk"
            );
        }
        *next = c.last + 1;
        if let Some(bytes) = c.event_bytes {
            self.event_bytes.store(bytes, Ordering::Relaxed);
        }
        if let Ok(mut counts) = self.state_counts.lock() {
            *counts = c.state_counts;
        }
        info!("storage: database reopened");
        Ok(())
    }

    fn lock_seq(&self) -> MutexGuard<'_, u64> {
        // The guarded value is only replaced after a commit: a panic cannot leave it torn.
        self.next_seq.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_group(&self) -> MutexGuard<'_, Group> {
        // Closures run under this lock only inside `catch_unwind`: a poisoned lock holds
        // nothing torn.
        self.group.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_group<'g>(&self, g: MutexGuard<'g, Group>) -> MutexGuard<'g, Group> {
        self.group_changed
            .wait(g)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` in a write transaction, commits durably, then publishes the appended events.
    /// Returns `f`'s value and the committed events. If `f` fails nothing of it is written.
    ///
    /// Group commit: concurrent writers share one transaction and one durable commit. The
    /// first writer to find no group in progress leads: it runs its `f` in a new transaction,
    /// then lets every writer waiting meanwhile run its own `f` in the same transaction, one
    /// after another on its own thread (the order of their sequence numbers), commits once,
    /// publishes all their events in sequence order and hands each writer its outcome. A
    /// member whose `f` fails takes its changes back out (an undo log kept by [`WriteTx`]:
    /// redb's savepoints cannot be taken in a transaction already written to) and the others
    /// still commit; a storage error fails the whole group. So a lone writer pays one
    /// commit, as before, and sixteen concurrent ones pay about one between them.
    ///
    /// Blocking (fsync): call from `spawn_blocking` or use [`Store::write_async`].
    /// During a fault it is refused at once with [`StoreError::Unavailable`]; an I/O error in
    /// it starts a fault.
    pub fn write<R>(
        &self,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<R, StoreError>,
    ) -> Result<(R, Vec<Arc<Published>>), StoreError> {
        let mut g = self.lock_group();
        let ticket = g.next_ticket;
        g.next_ticket += 1;
        g.waiting += 1;
        loop {
            if self.fault().is_some() {
                g.waiting -= 1;
                self.group_changed.notify_all();
                return Err(self.refusal());
            }
            if !g.leading {
                g.waiting -= 1;
                g.leading = true;
                drop(g);
                return self.lead(ticket, f);
            }
            if g.open
                .as_ref()
                .is_some_and(|o| o.members.len() < GROUP_MAX_MEMBERS)
            {
                g.waiting -= 1;
                return self.join(g, ticket, f);
            }
            g = self.wait_group(g);
        }
    }

    /// Writers waiting to join a group (tests observe group commit with it).
    #[cfg(test)]
    fn waiting_writers(&self) -> usize {
        self.lock_group().waiting
    }

    /// Ends a leadership: the next waiting writer may lead.
    fn step_down(&self) {
        self.lock_group().leading = false;
        self.group_changed.notify_all();
    }

    /// Leads a group (see [`Store::write`]); `self.group.leading` is set for us.
    fn lead<R>(
        &self,
        ticket: u64,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<R, StoreError>,
    ) -> Result<(R, Vec<Arc<Published>>), StoreError> {
        let began = self.read_db(|db| Ok(db.begin_write()?));
        let tx = match began {
            Ok(tx) => tx,
            Err(e) => {
                self.step_down();
                return Err(self.classify(e));
            }
        };
        let mut w = WriteTx::new(&tx, false);
        let out = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut w))) {
            Ok(Ok(out)) => out,
            // Nothing else is in the transaction yet: dropping it aborts just this writer.
            Ok(Err(e)) => {
                drop(w);
                drop(tx);
                self.step_down();
                return Err(self.classify(e));
            }
            Err(panic) => {
                drop(w);
                drop(tx);
                self.step_down();
                std::panic::resume_unwind(panic);
            }
        };
        let WriteTx {
            events,
            state_delta,
            ..
        } = w;
        let mut g = self.lock_group();
        g.open = Some(Open {
            tx,
            members: vec![(ticket, events)],
            state_delta,
            poisoned: None,
        });
        self.group_changed.notify_all();
        while g.waiting > 0
            && g.open
                .as_ref()
                .is_some_and(|o| o.members.len() < GROUP_MAX_MEMBERS)
        {
            g = self.wait_group(g);
        }
        let Some(open) = g.open.take() else {
            unreachable!("only the leader closes its group")
        };
        drop(g);
        let tickets: Vec<u64> = open.members.iter().map(|(t, _)| *t).collect();
        let outcome = {
            let mut next = self.lock_seq();
            self.commit_group(&mut next, open)
        };
        let mut g = self.lock_group();
        let mine = match outcome {
            Ok(per_member) => {
                let mut per_member = per_member.into_iter();
                let mine = per_member.next().unwrap_or_default();
                for (t, events) in tickets[1..].iter().zip(per_member) {
                    g.done.insert(*t, Ok(events));
                }
                Ok(mine)
            }
            Err(e) => {
                let e = self.classify(e);
                for t in &tickets[1..] {
                    g.done.insert(*t, Err(e.replica()));
                }
                Err(e)
            }
        };
        g.leading = false;
        self.group_changed.notify_all();
        drop(g);
        mine.map(|events| (out, events))
    }

    /// Runs `f` as a member of the open group and waits for its commit.
    fn join<R>(
        &self,
        mut g: MutexGuard<'_, Group>,
        ticket: u64,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<R, StoreError>,
    ) -> Result<(R, Vec<Arc<Published>>), StoreError> {
        let Some(open) = g.open.as_mut() else {
            unreachable!("joined only while a group is open")
        };
        let mut w = WriteTx::new(&open.tx, true);
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut w)));
        let out = match ran {
            Ok(Ok(out)) => {
                let WriteTx {
                    events,
                    state_delta,
                    ..
                } = w;
                open.members.push((ticket, events));
                for (d, m) in open.state_delta.iter_mut().zip(state_delta) {
                    *d += m;
                }
                out
            }
            failed => {
                let undone = w.roll_back();
                let (error, panic) = match failed {
                    Ok(Err(e)) => (Some(self.classify(e)), None),
                    Err(panic) => (None, Some(panic)),
                    Ok(Ok(_)) => unreachable!("matched above"),
                };
                // A storage failure (this member's, or its undo's) leaves the shared
                // transaction in doubt: the group must not commit. Classified before the
                // leader can look, so the others see the fault too.
                if let Some(StoreError::Unavailable(reason)) = &error {
                    open.poisoned.get_or_insert(reason.clone());
                }
                if let Err(e) = undone {
                    open.poisoned.get_or_insert(self.classify(e).to_string());
                }
                self.group_changed.notify_all();
                drop(g);
                if let Some(panic) = panic {
                    std::panic::resume_unwind(panic);
                }
                return Err(error.unwrap_or_else(|| StoreError::Task("writer panicked".into())));
            }
        };
        self.group_changed.notify_all();
        loop {
            if let Some(outcome) = g.done.remove(&ticket) {
                return outcome.map(|events| (out, events));
            }
            g = self.wait_group(g);
        }
    }

    /// Runs `f` on the open database handle, or refuses during a fault.
    fn read_db<R>(
        &self,
        f: impl FnOnce(&Database) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match db.as_ref() {
            Some(db) => f(db),
            None => Err(self.refusal()),
        }
    }

    /// A write on its own with the commit lock held (`next`: the next sequence to assign), by
    /// the supervisor, which holds the group leadership meanwhile.
    fn write_locked<R>(
        &self,
        next: &mut u64,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<R, StoreError>,
    ) -> Result<(R, Vec<Arc<Published>>), StoreError> {
        let tx = self
            .read_db(|db| Ok(db.begin_write()?))
            .map_err(|e| self.classify(e))?;
        let mut w = WriteTx::new(&tx, false);
        let out = f(&mut w).map_err(|e| self.classify(e))?;
        let WriteTx {
            events,
            state_delta,
            ..
        } = w;
        let open = Open {
            tx,
            members: vec![(0, events)],
            state_delta,
            poisoned: None,
        };
        let mut per_member = self
            .commit_group(next, open)
            .map_err(|e| self.classify(e))?;
        Ok((out, per_member.pop().unwrap_or_default()))
    }

    /// Assigns sequences to the group's events in member order, commits durably, then
    /// publishes them in sequence order (under the commit lock, `next`). Returns each
    /// member's committed events.
    fn commit_group(
        &self,
        next: &mut u64,
        open: Open,
    ) -> Result<Vec<Vec<Arc<Published>>>, StoreError> {
        let Open {
            tx,
            members,
            state_delta,
            poisoned,
        } = open;
        if let Some(reason) = poisoned {
            // Dropping the transaction aborts it.
            drop(tx);
            if self.fault().is_some() {
                return Err(self.refusal());
            }
            return Err(StoreError::Task(format!(
                "a writer sharing this commit failed: {reason}"
            )));
        }
        let time = now_timestamp();
        let mut seq = *next;
        let mut added = 0u64;
        let any_events = members.iter().any(|(_, m)| !m.is_empty());
        let mut published: Vec<Vec<Arc<Published>>> = Vec::with_capacity(members.len());
        {
            let mut t = if any_events {
                Some(tx.open_table(EVENTS)?)
            } else {
                None
            };
            for (_, events) in members {
                let mut mine = Vec::with_capacity(events.len());
                for mut e in events {
                    let Some(t) = t.as_mut() else { break };
                    e.sequence = seq;
                    e.time = Some(time);
                    // Encoded once: these bytes are logged and streamed to every subscriber.
                    let p = Published::new(e);
                    // As redb's `stored_bytes` counts it: the 8-byte key plus the value.
                    added += 8 + p.encoded().len() as u64;
                    t.insert(seq, p.encoded().as_ref())?;
                    mine.push(Arc::new(p));
                    seq += 1;
                }
                published.push(mine);
            }
        }
        // The commit lock serialises commits, so the total read here is the committed one.
        let total = self.event_bytes.load(Ordering::Relaxed) + added;
        if any_events {
            let mut meta = tx.open_table(META)?;
            meta.insert(META_EVENT_LOG_BYTES, total.to_le_bytes().as_slice())?;
        }
        tx.commit()?;
        // Only a committed transaction consumes sequence numbers.
        *next = seq;
        // Still under the commit lock: the counts follow commits in order.
        self.event_bytes.store(total, Ordering::Relaxed);
        if state_delta.iter().any(|d| *d != 0)
            && let Ok(mut counts) = self.state_counts.lock()
        {
            for (c, d) in counts.iter_mut().zip(state_delta) {
                *c = c.saturating_add_signed(d);
            }
        }
        self.bus.publish(&published.concat());
        Ok(published)
    }

    /// [`Store::write`] on the blocking pool.
    pub async fn write_async<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<(R, Vec<Arc<Published>>), StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write(f))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Live events committed from now on. Subscribe *before* replaying from the log.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.bus.subscribe()
    }

    /// Visits up to `limit` recently published events after `after` from the shared ring
    /// (see [`crate::bus`]), oldest first; says when only the log has the next one.
    pub fn recent_after(
        &self,
        after: u64,
        limit: usize,
        visit: impl FnMut(&Arc<Published>),
    ) -> Recent {
        self.bus.recent_after(after, limit, visit)
    }

    /// Counts a stream that lagged past the ring of recent events and read the log again.
    pub fn count_log_fallback(&self) {
        self.bus.count_log_fallback();
    }

    /// Streams that lagged past the ring of recent events and read the log again, since open
    /// (`ppu_stream_log_fallbacks_total`).
    pub fn stream_log_fallbacks(&self) -> u64 {
        self.bus.log_fallbacks()
    }

    /// The sequence of the newest committed event (0 if none).
    pub fn last_sequence(&self) -> u64 {
        *self.lock_seq() - 1
    }

    /// Up to `limit` events with sequence > `after`, oldest first.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        self.visit_events_after(after, limit, |_, bytes| {
            out.push(decode("events", bytes)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Visits up to `limit` logged events with sequence > `after`, oldest first, as their
    /// stored encoding (a `ppu.v1.Event`), without decoding or collecting them. Returns how
    /// many were visited.
    pub fn visit_events_after(
        &self,
        after: u64,
        limit: usize,
        mut visit: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
    ) -> Result<usize, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(EVENTS)?;
            let mut n = 0;
            for item in t.range(after.saturating_add(1)..)?.take(limit) {
                let (k, v) = item?;
                visit(k.value(), v.value())?;
                n += 1;
            }
            Ok(n)
        })
    }

    /// Number of events in the log.
    pub fn event_count(&self) -> Result<u64, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            Ok(r.open_table(EVENTS)?.len()?)
        })
    }

    /// Bytes of the event log's keys and values as committed (as redb's `stored_bytes` counts
    /// them, without page overhead); O(1).
    pub fn event_log_bytes(&self) -> u64 {
        self.event_bytes.load(Ordering::Relaxed)
    }

    /// How many experiments are in each state, in [`State::ALL`] order; O(states).
    pub fn experiment_counts(&self) -> [(State, u64); State::ALL.len()] {
        let counts = self
            .state_counts
            .lock()
            .map(|c| *c)
            .unwrap_or_else(|poisoned| *poisoned.into_inner());
        std::array::from_fn(|i| (State::ALL[i], counts[i]))
    }

    pub fn get_experiment(&self, id: &str) -> Result<Option<Experiment>, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(EXPERIMENTS)?;
            let v = t.get(id)?;
            v.map(|v| decode("experiments", v.value())).transpose()
        })
    }

    pub fn get_batch(&self, id: &str) -> Result<Option<Batch>, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(BATCHES)?;
            let v = t.get(id)?;
            v.map(|v| decode("batches", v.value())).transpose()
        })
    }

    /// Up to `limit` ids of `space` that start with `prefix` (compared byte for byte: ids are
    /// stored upper case, callers normalise), in id order. See `ids::resolve`.
    pub fn ids_with_prefix(
        &self,
        space: IdSpace,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(space.table())?;
            let mut out = Vec::new();
            for item in t.range::<&str>(prefix..)? {
                let (k, _) = item?;
                let id = k.value();
                if !id.starts_with(prefix) || out.len() == limit {
                    break;
                }
                out.push(id.to_owned());
            }
            Ok(out)
        })
    }

    /// Up to `limit` ids of `space` that end with `suffix`, newest first. A full scan of the
    /// table's keys (no index by suffix): only for ids typed by people, the way the TUI shows
    /// ids of one batch that share all but their last characters. See `ids::resolve`.
    pub fn ids_with_suffix(
        &self,
        space: IdSpace,
        suffix: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(space.table())?;
            let mut out = Vec::new();
            for item in t.iter()?.rev() {
                let (k, _) = item?;
                let id = k.value();
                if id.ends_with(suffix) {
                    if out.len() == limit {
                        break;
                    }
                    out.push(id.to_owned());
                }
            }
            Ok(out)
        })
    }

    /// The batch id and content hash stored for an idempotency key.
    pub fn find_idempotency_key(&self, key: &str) -> Result<Option<(String, String)>, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(IDEMPOTENCY)?;
            let v = t.get(key)?;
            Ok(v.map(|v| {
                let (b, h) = v.value();
                (b.to_owned(), h.to_owned())
            }))
        })
    }

    /// Every driver's saved state, by device id.
    pub fn device_states(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(DEVICE_STATE)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// Every journaled (in-flight) step.
    pub fn journal(&self) -> Result<Vec<JournalEntry>, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(JOURNAL)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (_, v) = item?;
                out.push(decode("journal", v.value())?);
            }
            Ok(out)
        })
    }

    /// Sample custody: (sample id, device id).
    pub fn custody(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.string_pairs(CUSTODY)
    }

    /// Devices in maintenance: (device id, reason).
    pub fn maintenance(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.string_pairs(MAINTENANCE)
    }

    /// Experiments to cancel after their current step: (experiment id, reason).
    /// The tracked alarms of every device, by device id.
    pub fn alarms(&self) -> Result<Vec<(String, Vec<pb::ActiveAlarm>)>, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(ALARMS)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                let list =
                    pb::ListAlarmsResponse::decode(v.value()).map_err(|e| StoreError::Corrupt {
                        table: "alarms",
                        reason: e.to_string(),
                    })?;
                out.push((k.value().to_owned(), list.alarms));
            }
            Ok(out)
        })
    }

    pub fn cancel_after(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.string_pairs(CANCEL_AFTER)
    }

    fn string_pairs(
        &self,
        def: TableDefinition<&str, &str>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(def)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                out.push((k.value().to_owned(), v.value().to_owned()));
            }
            Ok(out)
        })
    }

    /// Queue ranks: (experiment id, rank).
    pub fn ranks(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(RANKS)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                out.push((k.value().to_owned(), v.value()));
            }
            Ok(out)
        })
    }

    /// Every pending transfer, by id.
    pub fn transfers(&self) -> Result<Vec<PendingTransfer>, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(TRANSFERS)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (_, v) = item?;
                out.push(decode("transfers", v.value())?);
            }
            Ok(out)
        })
    }

    /// A value set with [`WriteTx::put_setting`].
    pub fn setting(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(META)?;
            let key = format!("{SETTING_PREFIX}{key}");
            Ok(t.get(key.as_str())?.map(|v| v.value().to_vec()))
        })
    }

    pub fn queue_paused(&self) -> Result<bool, StoreError> {
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(META)?;
            let v = t.get(META_QUEUE_PAUSED)?;
            Ok(v.is_some_and(|v| v.value().first() == Some(&1)))
        })
    }

    /// Experiments in id order, starting after `after` (exclusive), that satisfy `keep`,
    /// at most `limit` of them.
    pub fn list_experiments(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: impl FnMut(&Experiment) -> bool,
    ) -> Result<Page, StoreError> {
        self.list_experiments_in_order(after, limit, false, keep)
    }

    /// [`Store::list_experiments`], newest first (descending id) when `newest_first`: then
    /// `after` is the last id of the previous page and the page holds the ids below it.
    pub fn list_experiments_in_order(
        &self,
        after: Option<&str>,
        limit: usize,
        newest_first: bool,
        mut keep: impl FnMut(&Experiment) -> bool,
    ) -> Result<Page, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(EXPERIMENTS)?;
            let range = match (after, newest_first) {
                (Some(a), false) => t.range::<&str>((Excluded(a), Unbounded))?,
                (Some(a), true) => t.range::<&str>((Unbounded, Excluded(a)))?,
                (None, _) => t.range::<&str>(..)?,
            };
            let iter: Box<dyn Iterator<Item = _>> = if newest_first {
                Box::new(range.rev())
            } else {
                Box::new(range)
            };
            let mut experiments = Vec::new();
            let mut next = None;
            for item in iter {
                let (_, v) = item?;
                let e: Experiment = decode("experiments", v.value())?;
                if !keep(&e) {
                    continue;
                }
                if experiments.len() == limit {
                    next = experiments.last().map(|e: &Experiment| e.id.clone());
                    break;
                }
                experiments.push(e);
            }
            Ok(Page { experiments, next })
        })
    }

    /// Every experiment in one of `states`, in id order. Only those are decoded (the state
    /// alone is read of the others).
    pub fn experiments_in(&self, states: &[State]) -> Result<Vec<Experiment>, StoreError> {
        let mut out = Vec::new();
        self.for_each_in::<Experiment>(states, |e| {
            out.push(e);
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with every experiment in one of `states`, in id order, decoded as `M` (an
    /// [`Experiment`], or a view such as [`QueueView`] that prost fills without allocating what
    /// it skips). Streams the table in one read transaction: nothing but the current record is
    /// held, so memory does not grow with the table. The state alone is read of experiments in
    /// other states.
    pub fn for_each_in<M: Message + Default>(
        &self,
        states: &[State],
        mut f: impl FnMut(M) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.scan_in(states, false, |e, _| f(e))
    }

    /// [`Store::for_each_in`] with each experiment's queue rank (0 if it has none), read from
    /// the ranks table in the same pass (both are in id order), as start-up rebuilds the queue.
    pub fn for_each_ranked<M: Message + Default>(
        &self,
        states: &[State],
        f: impl FnMut(M, i64) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.scan_in(states, true, f)
    }

    fn scan_in<M: Message + Default>(
        &self,
        states: &[State],
        with_ranks: bool,
        mut f: impl FnMut(M, i64) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let slots: Vec<usize> = states
            .iter()
            .filter_map(|s| State::ALL.iter().position(|a| a == s))
            .collect();
        self.read(|db| {
            let r = db.begin_read()?;
            let t = r.open_table(EXPERIMENTS)?;
            let ranks_table = r.open_table(RANKS)?;
            let mut ranks = if with_ranks {
                Some(ranks_table.iter()?.peekable())
            } else {
                None
            };
            for item in t.iter()? {
                let (k, v) = item?;
                let bytes = v.value();
                if !state_slot(bytes).is_some_and(|slot| slots.contains(&slot)) {
                    continue;
                }
                let id = k.value();
                let mut rank = 0;
                if let Some(ranks) = ranks.as_mut() {
                    // Skip the ranks of ids before this one (experiments in other states).
                    while ranks
                        .next_if(|r| r.as_ref().is_ok_and(|(k, _)| k.value() < id))
                        .is_some()
                    {}
                    match ranks.next_if(|r| r.as_ref().map_or(true, |(k, _)| k.value() == id)) {
                        Some(Ok((_, v))) => rank = v.value(),
                        Some(Err(e)) => return Err(e.into()),
                        None => {}
                    }
                }
                f(decode("experiments", bytes)?, rank)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppu_proto::v1::{ExperimentStateChanged, event::Kind};

    fn state_event(id: &str) -> Kind {
        let _ = id;
        Kind::ExperimentStateChanged(ExperimentStateChanged::default())
    }

    #[test]
    fn sequences_continue_across_reopen_and_failed_writes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ppu.redb");
        {
            let s = Store::open(&path).unwrap();
            let (_, ev) = s
                .write(|w| {
                    w.put_experiment(&Experiment {
                        id: "a".into(),
                        ..Default::default()
                    })?;
                    w.emit("a", "", "", state_event("a"));
                    w.emit("a", "", "", state_event("a"));
                    Ok(())
                })
                .unwrap();
            assert_eq!(
                ev.iter().map(|e| e.sequence).collect::<Vec<_>>(),
                vec![1, 2]
            );
            let r: Result<((), _), _> = s.write(|w| {
                w.put_experiment(&Experiment {
                    id: "b".into(),
                    ..Default::default()
                })?;
                w.emit("b", "", "", state_event("b"));
                Err(StoreError::Task("refused".into()))
            });
            assert!(r.is_err());
            assert!(s.get_experiment("b").unwrap().is_none());
            assert_eq!(s.last_sequence(), 2);
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.last_sequence(), 2);
        let (_, ev) = s
            .write(|w| {
                w.emit("a", "", "", state_event("a"));
                Ok(())
            })
            .unwrap();
        assert_eq!(ev[0].sequence, 3);
        let all = s.events_after(0, 100).unwrap();
        assert_eq!(
            all.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(s.events_after(2, 100).unwrap().len(), 1);
    }

    #[test]
    fn a_fault_refuses_writes_keeps_reads_and_heals_by_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ppu.redb")).unwrap();
        s.write(|w| {
            w.put_experiment(&Experiment {
                id: "a".into(),
                state: State::Queued.to_proto() as i32,
                ..Default::default()
            })?;
            w.emit("a", "", "", state_event("a"));
            Ok(())
        })
        .unwrap();
        let mut health = s.health();
        assert!(health.borrow_and_update().is_none());
        // What redb reports when the disk is full.
        let enospc = std::io::Error::from_raw_os_error(28);
        let e = s.classify(StoreError::Db(redb::Error::Io(enospc)));
        assert!(
            matches!(&e, StoreError::Unavailable(r) if r.starts_with("ENOSPC: ")),
            "{e}"
        );
        assert!(health.has_changed().unwrap());
        let fault = s.fault().expect("faulted");
        assert_eq!(fault.code, "enospc");
        let alarms = s.alarms_now();
        assert_eq!(alarms.len(), 1);
        assert_eq!(alarms[0].device_id, DAEMON_ALARM_SOURCE);
        assert!(alarms[0].message.contains("No space left on device"));
        // A later PreviousIo keeps the first reason.
        let e = s.classify(StoreError::Db(redb::Error::PreviousIo));
        assert!(e.to_string().contains("ENOSPC"), "{e}");
        // Writes are refused without touching the file and consume nothing.
        let r = s.write(|w| {
            w.emit("a", "", "", state_event("a"));
            Ok(())
        });
        assert!(matches!(r, Err(StoreError::Unavailable(_))));
        assert_eq!(s.last_sequence(), 1);
        // Reads answer.
        assert!(s.get_experiment("a").unwrap().is_some());
        // The supervisor's step: reopen, probe, commit the alarm raised and cleared.
        assert!(s.try_heal());
        assert!(s.fault().is_none());
        assert!(s.alarms_now().is_empty());
        let log = s.events_after(0, 10).unwrap();
        let alarm: Vec<(u64, &str, bool)> = log
            .iter()
            .filter_map(|e| match &e.kind {
                Some(Kind::Alarm(a)) => Some((e.sequence, e.device_id.as_str(), a.cleared)),
                _ => None,
            })
            .collect();
        assert_eq!(alarm, [(2, "ppud", false), (3, "ppud", true)]);
        let (_, ev) = s
            .write(|w| {
                w.emit("a", "", "", state_event("a"));
                Ok(())
            })
            .unwrap();
        assert_eq!(ev[0].sequence, 4);
        assert_eq!(count_of(&s, State::Queued), 1);
    }

    #[test]
    fn listing_pages_in_id_order_with_a_filter() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ppu.redb")).unwrap();
        s.write(|w| {
            for i in 0..10 {
                w.put_experiment(&Experiment {
                    id: format!("e{i:02}"),
                    current_step: i % 2,
                    ..Default::default()
                })?;
            }
            Ok(())
        })
        .unwrap();
        let odd = |e: &Experiment| e.current_step == 1;
        let p1 = s.list_experiments(None, 3, odd).unwrap();
        let ids: Vec<_> = p1.experiments.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["e01", "e03", "e05"]);
        let p2 = s.list_experiments(p1.next.as_deref(), 3, odd).unwrap();
        let ids: Vec<_> = p2.experiments.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["e07", "e09"]);
        assert!(p2.next.is_none());
    }

    fn count_of(s: &Store, state: State) -> u64 {
        s.experiment_counts()
            .iter()
            .find(|(st, _)| *st == state)
            .map(|(_, n)| *n)
            .unwrap()
    }

    #[test]
    fn state_counts_and_log_bytes_follow_commits_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ppu.redb");
        let exp = |id: &str, state: State| Experiment {
            id: id.into(),
            state: state.to_proto() as i32,
            message: "x".repeat(300),
            ..Default::default()
        };
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(s.event_log_bytes(), 0);
            s.write(|w| {
                for i in 0..5 {
                    w.put_experiment(&exp(&format!("e{i}"), State::Queued))?;
                }
                w.emit("e0", "", "", state_event("e0"));
                Ok(())
            })
            .unwrap();
            assert_eq!(count_of(&s, State::Queued), 5);
            // Two puts of one experiment in one transaction count once, in its last state.
            s.write(|w| {
                w.put_experiment(&exp("e0", State::Running))?;
                w.put_experiment(&exp("e0", State::Succeeded))?;
                w.put_experiment(&exp("e1", State::Cancelled))?;
                Ok(())
            })
            .unwrap();
            // A failed write changes nothing.
            let r: Result<((), _), _> = s.write(|w| {
                w.put_experiment(&exp("e2", State::Running))?;
                Err(StoreError::Task("refused".into()))
            });
            assert!(r.is_err());
            let counts: Vec<u64> = s.experiment_counts().iter().map(|(_, n)| *n).collect();
            // Queued, Running, Succeeded, Failed, Cancelled, Interrupted.
            assert_eq!(counts, [3, 0, 1, 0, 1, 0]);
            assert!(s.event_log_bytes() > 8);
        }
        let s = Store::open(&path).unwrap();
        let counts: Vec<u64> = s.experiment_counts().iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, [3, 0, 1, 0, 1, 0]);
        let measured = s.event_log_bytes();
        s.write(|w| {
            w.emit("e3", "", "", state_event("e3"));
            Ok(())
        })
        .unwrap();
        let grown = s.event_log_bytes();
        assert!(grown > measured);
        // The running total is what redb itself measures.
        let stored = |s: &Store| {
            s.read(|db| Ok(db.begin_read()?.open_table(EVENTS)?.stats()?.stored_bytes()))
                .unwrap()
        };
        assert_eq!(grown, stored(&s));
        // A store from before the counter: measured once at open.
        s.write(|w| {
            let mut meta = w.tx.open_table(META)?;
            meta.remove(META_EVENT_LOG_BYTES)?;
            Ok(())
        })
        .unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.event_log_bytes(), grown);
        assert_eq!(count_of(&s, State::Queued), 3);
    }

    #[test]
    fn a_ranked_scan_pairs_each_experiment_with_its_rank_and_skips_other_states() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        let exp = |id: &str, state: State| Experiment {
            id: id.into(),
            state: state.to_proto() as i32,
            spec: Some(pb::ExperimentSpec {
                priority: 3,
                sample_id: format!("S-{id}"),
                labels: [("k".to_owned(), "v".to_owned())].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        s.write(|w| {
            // Ranks of ids in other states come before, between and after the scanned ones.
            for (id, state, rank) in [
                ("a", State::Succeeded, Some(1)),
                ("b", State::Queued, Some(20)),
                ("c", State::Queued, None),
                ("d", State::Cancelled, Some(4)),
                ("e", State::Running, Some(50)),
                ("f", State::Failed, Some(6)),
            ] {
                w.put_experiment(&exp(id, state))?;
                if let Some(r) = rank {
                    w.set_rank(id, r)?;
                }
            }
            w.set_rank("zz", 7)
        })
        .unwrap();
        let mut seen = Vec::new();
        s.for_each_ranked::<QueueView>(&[State::Queued, State::Running], |e, rank| {
            let spec = e.spec.unwrap_or_default();
            seen.push((e.id, rank, spec.priority, spec.sample_id));
            Ok(())
        })
        .unwrap();
        let want = |id: &str, rank| (id.to_owned(), rank, 3, format!("S-{id}"));
        assert_eq!(seen, [want("b", 20), want("c", 0), want("e", 50)]);
        let running = s.experiments_in(&[State::Running]).unwrap();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].spec.as_ref().unwrap().labels["k"], "v");
    }

    /// One writer's closure, as the group tests run them.
    type Writer = Box<dyn FnOnce(&mut WriteTx<'_>) -> Result<(), StoreError> + Send>;

    /// Runs a leader whose write holds the group open until `followers` writers wait, and
    /// the followers (each a closure on its own thread); returns every outcome, leader first.
    fn group_of(
        s: &Arc<Store>,
        leader: impl FnOnce(&mut WriteTx<'_>) -> Result<(), StoreError> + Send + 'static,
        followers: Vec<Writer>,
    ) -> Vec<Result<Vec<Arc<Published>>, StoreError>> {
        let n = followers.len();
        let (started_tx, started) = std::sync::mpsc::channel();
        let st = s.clone();
        let lead = std::thread::spawn(move || {
            st.write(|w| {
                started_tx.send(()).unwrap();
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while st.waiting_writers() < n {
                    assert!(std::time::Instant::now() < deadline, "followers never came");
                    std::thread::yield_now();
                }
                leader(w)
            })
            .map(|(_, ev)| ev)
        });
        started.recv().unwrap();
        let threads: Vec<_> = followers
            .into_iter()
            .map(|f| {
                let st = s.clone();
                std::thread::spawn(move || st.write(f).map(|(_, ev)| ev))
            })
            .collect();
        let mut out = vec![lead.join().unwrap()];
        out.extend(threads.into_iter().map(|t| t.join().unwrap()));
        out
    }

    fn queued(id: &str) -> Experiment {
        Experiment {
            id: id.into(),
            state: State::Queued.to_proto() as i32,
            ..Default::default()
        }
    }

    #[test]
    fn concurrent_writers_share_one_commit_and_a_failing_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ppu.redb")).unwrap();
        let mut sub = s.subscribe();
        let ok = |id: &'static str, events: usize| -> Writer {
            Box::new(move |w| {
                w.put_experiment(&queued(id))?;
                w.set_rank(id, 1)?;
                for _ in 0..events {
                    w.emit(id, "", "", state_event(id));
                }
                Ok(())
            })
        };
        let failing: Writer = Box::new(|w| {
            // Overwrites the leader's experiment, adds its own, then refuses.
            w.put_experiment(&Experiment {
                state: State::Running.to_proto() as i32,
                ..queued("a")
            })?;
            w.put_experiment(&queued("c"))?;
            w.set_rank("c", 7)?;
            w.put_batch(
                &Batch {
                    id: "B".into(),
                    idempotency_key: "key".into(),
                    ..Default::default()
                },
                "hash",
            )?;
            w.set_custody("sample", Some("dev"))?;
            w.emit("c", "", "", state_event("c"));
            Err(StoreError::Task("refused".into()))
        });
        let out = group_of(&s, ok("a", 1), vec![ok("b", 2), failing, ok("d", 1)]);
        let committed: Vec<&Vec<Arc<Published>>> =
            out.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(committed.len(), 3, "{out:?}");
        assert!(matches!(&out[2], Err(StoreError::Task(r)) if r == "refused"));
        // One commit: one time for every event; sequences gap-free, each writer's contiguous.
        let all: Vec<&Arc<Published>> = committed.iter().copied().flatten().collect();
        assert_eq!(all.len(), 4);
        assert!(all.iter().all(|e| e.time == all[0].time));
        let mut seqs: Vec<u64> = all.iter().map(|e| e.sequence).collect();
        for evs in &committed {
            for pair in evs.windows(2) {
                assert_eq!(pair[1].sequence, pair[0].sequence + 1);
            }
        }
        seqs.sort_unstable();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert_eq!(
            out[0].as_ref().unwrap()[0].sequence,
            1,
            "the leader writes first"
        );
        // Published in sequence order, and the log agrees.
        let published: Vec<u64> = (0..4).map(|_| sub.try_recv().unwrap().sequence).collect();
        assert_eq!(published, [1, 2, 3, 4]);
        let log = s.events_after(0, 10).unwrap();
        assert_eq!(
            log.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert!(log.iter().all(|e| e.experiment_id != "c"));
        // Nothing of the failed writer: not its own records, not its overwrite.
        assert_eq!(
            s.get_experiment("a").unwrap().unwrap().state,
            State::Queued.to_proto() as i32
        );
        assert!(s.get_experiment("c").unwrap().is_none());
        assert!(s.get_batch("B").unwrap().is_none());
        assert!(s.find_idempotency_key("key").unwrap().is_none());
        assert!(s.custody().unwrap().is_empty());
        let ranks = s.ranks().unwrap();
        assert_eq!(
            ranks.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ["a", "b", "d"]
        );
        assert_eq!(count_of(&s, State::Queued), 3);
        assert_eq!(count_of(&s, State::Running), 0);
        let stored = s
            .read(|db| Ok(db.begin_read()?.open_table(EVENTS)?.stats()?.stored_bytes()))
            .unwrap();
        assert_eq!(s.event_log_bytes(), stored);
        assert_eq!(s.last_sequence(), 4);
    }

    #[test]
    fn a_storage_failure_in_a_group_refuses_every_writer_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("ppu.redb")).unwrap();
        let ok = |id: &'static str| -> Writer {
            Box::new(move |w| {
                w.put_experiment(&queued(id))?;
                w.emit(id, "", "", state_event(id));
                Ok(())
            })
        };
        let broken: Writer = Box::new(|w| {
            w.put_experiment(&queued("x"))?;
            Err(StoreError::Db(redb::Error::Io(
                std::io::Error::from_raw_os_error(28),
            )))
        });
        let out = group_of(&s, ok("a"), vec![ok("b"), broken, ok("d")]);
        for r in &out {
            assert!(
                matches!(r, Err(StoreError::Unavailable(reason)) if reason.starts_with("ENOSPC")),
                "{r:?}"
            );
        }
        assert_eq!(s.fault().map(|f| f.code), Some("enospc"));
        assert_eq!(s.last_sequence(), 0);
        assert_eq!(count_of(&s, State::Queued), 0);
        for id in ["a", "b", "d", "x"] {
            assert!(s.get_experiment(id).unwrap().is_none(), "{id}");
        }
        // Healing commits again, from sequence 1.
        assert!(s.try_heal());
        let (_, ev) = s
            .write(|w| {
                w.emit("a", "", "", state_event("a"));
                Ok(())
            })
            .unwrap();
        assert_eq!(
            ev[0].sequence, 3,
            "after the fault's alarm, raised and cleared"
        );
    }
}
