//! The TUI's view model: what the daemon told us, built only from ppu.v1 replies and the event
//! stream (the same API a planner uses). Pure: no I/O and no clock reads; callers pass the time,
//! so the rendering tests can build a fixed state.
//!
//! Two feeds keep it current: the durable event stream (state changes, progress, alarms,
//! transfers, resumed after the last sequence on reconnect) and a short poll of the queue,
//! devices, alarms and transfers (live readings and a heartbeat). Either feed failing marks the
//! link down; the time since the last successful update is shown as staleness.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use ppu_proto::v1 as pb;
use ppu_proto::v1::event::Kind;
use ppu_schema::render as generic;

/// Events kept for the live tail.
pub const EVENT_TAIL: usize = 500;
/// Readings kept per device for its sparkline.
pub const HISTORY: usize = 120;
/// Events kept per experiment for its detail pane.
pub const RECENT_PER_EXPERIMENT: usize = 12;
/// Finished experiments kept in the queue view (newest first).
pub const FINISHED_KEPT: usize = 50;
/// A live link with no update for longer than this is shown as stale.
pub const STALE_AFTER: Duration = Duration::from_secs(2);
/// An event about an experiment this view has not seen is fetched only if it is this recent
/// (wall clock, seconds): replaying a long log must not fetch every experiment ever run.
const FETCH_RECENT_S: i64 = 600;

/// What the client task reports; applied with [`Model::apply`].
#[derive(Debug, Clone)]
pub enum Update {
    /// The event stream is open again, resuming after `resumed_after`.
    StreamUp { resumed_after: u64 },
    /// The event stream ended or could not be opened.
    StreamDown { reason: String },
    /// One round of the poll succeeded (the queue at least).
    Polled(Box<Polled>),
    /// The poll could not reach the daemon.
    PollFailed { reason: String },
    /// One event of the durable log.
    Event(Box<pb::Event>),
    /// Experiments read from the daemon (a snapshot after a (re)connect, or one asked for).
    /// `as_of` is the last event sequence handed to the app before the read was sent: the
    /// snapshot reflects every event up to it, but events after it may have been applied
    /// while the reply was on its way, and must not be undone by it.
    Experiments {
        experiments: Vec<pb::Experiment>,
        as_of: u64,
    },
    /// An experiment asked for could not be fetched; it may be asked for again.
    NotFetched(String),
}

/// One round of the poll. The queue is the heartbeat; the rest may fail on its own (e.g. an
/// older daemon answering UNIMPLEMENTED) and is then reported as a notice.
#[derive(Debug, Clone)]
pub struct Polled {
    /// The last event sequence handed to the app before the poll was sent (as for
    /// [`Update::Experiments`]): a part of the lab an event after it has changed since is
    /// newer in the model than in this reply, and is not overwritten by it.
    pub as_of: u64,
    pub queue: pb::Queue,
    pub devices: Result<Vec<pb::Device>, String>,
    pub alarms: Result<Vec<pb::ActiveAlarm>, String>,
    pub transfers: Result<Vec<pb::PendingTransfer>, String>,
}

impl Default for Polled {
    fn default() -> Self {
        Polled {
            as_of: 0,
            queue: pb::Queue::default(),
            devices: Ok(Vec::new()),
            alarms: Ok(Vec::new()),
            transfers: Ok(Vec::new()),
        }
    }
}

/// The link to the daemon as shown in the header.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkView {
    /// Never reached the daemon yet.
    Connecting,
    /// Both feeds up and updated within [`STALE_AFTER`].
    Live { age: Duration },
    /// Both feeds up but nothing new for longer than [`STALE_AFTER`].
    Stale { age: Duration },
    /// A feed failed; `age` since the last update, if there ever was one.
    Disconnected {
        reason: String,
        age: Option<Duration>,
    },
}

/// The queue's start state as last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueStatus {
    #[default]
    Unknown,
    Running,
    Paused,
}

/// One experiment as the queue view shows it.
#[derive(Debug, Clone, Default)]
pub struct ExperimentRow {
    /// The experiment, kept current from events; `spec` is empty until fetched.
    pub exp: pb::Experiment,
    /// True once fetched (name, steps, priority known).
    pub fetched: bool,
    /// The latest progress of the running step.
    pub progress: Option<pb::StepProgress>,
    /// Recent events about it (progress excluded), oldest first.
    pub recent: VecDeque<pb::Event>,
    /// Sequence of the last event that changed `exp` (state, step, result, hold, priority):
    /// a snapshot read before it is older than what this row shows.
    pub changed_at: u64,
}

impl ExperimentRow {
    pub fn state(&self) -> pb::ExperimentState {
        pb::ExperimentState::try_from(self.exp.state).unwrap_or(pb::ExperimentState::Unspecified)
    }

    pub fn is_active(&self) -> bool {
        matches!(
            self.state(),
            pb::ExperimentState::Queued | pb::ExperimentState::Running
        )
    }

    pub fn name(&self) -> &str {
        self.exp.spec.as_ref().map_or("", |s| s.name.as_str())
    }

    pub fn sample(&self) -> &str {
        self.exp.spec.as_ref().map_or("", |s| s.sample_id.as_str())
    }

    pub fn priority(&self) -> i32 {
        self.exp.spec.as_ref().map_or(0, |s| s.priority)
    }

    /// Whether `needle` (lower case) occurs in its id, name, sample, state or labels.
    pub fn matches(&self, needle: &str) -> bool {
        if needle.is_empty() {
            return true;
        }
        let state = crate::render::experiment_state(self.exp.state);
        let mut hay = vec![
            self.exp.id.as_str(),
            self.name(),
            self.sample(),
            state.as_str(),
        ];
        if let Some(spec) = &self.exp.spec {
            hay.extend(spec.labels.values().map(String::as_str));
            hay.extend(spec.labels.keys().map(String::as_str));
        }
        hay.iter().any(|h| h.to_lowercase().contains(needle))
    }
}

/// One device as the devices view shows it.
#[derive(Debug, Clone, Default)]
pub struct DeviceRow {
    pub device: pb::Device,
    /// Recent values of its key reading (see [`key_value`]), oldest first.
    pub history: VecDeque<f64>,
    /// Time of the last reading added to `history`, to add each reading once.
    last_reading: Option<prost_types::Timestamp>,
    /// The experiment and step it is reserved for, from the event log.
    pub reserved: Option<(String, u32)>,
    /// Sequence of the last event that changed its connection or maintenance.
    changed_at: u64,
}

impl DeviceRow {
    pub fn new(device: pb::Device) -> DeviceRow {
        let mut row = DeviceRow {
            device: pb::Device::default(),
            ..DeviceRow::default()
        };
        row.update(device);
        row
    }

    fn update(&mut self, device: pb::Device) {
        if let Some(r) = &device.latest
            && self.last_reading.as_ref() != r.time.as_ref()
        {
            if let Some(v) = key_value(&device, r) {
                self.history.push_back(v);
                while self.history.len() > HISTORY {
                    self.history.pop_front();
                }
            }
            self.last_reading = r.time;
        }
        self.device = device;
    }

    pub fn connected(&self) -> bool {
        self.device.connection == pb::ConnectionState::Connected as i32
    }

    /// `offline`, `fault`, `busy`, `maintenance` or `idle`.
    pub fn activity(&self) -> &'static str {
        if !self.connected() {
            "offline"
        } else if self
            .device
            .latest
            .as_ref()
            .is_some_and(|r| !r.alarms.is_empty())
        {
            "fault"
        } else if self.reserved.is_some() {
            "busy"
        } else if self.device.maintenance {
            "maintenance"
        } else {
            "idle"
        }
    }

    fn value(&self, name: &str) -> Option<f64> {
        let r = self.device.latest.as_ref()?;
        r.values.iter().find(|v| v.name == name).map(|v| v.value)
    }

    /// The reading a technician looks at first, as the device's family declares it
    /// (`FamilyOptions.key_reading`); a device of a family that declares none shows its first
    /// readings.
    pub fn key_reading(&self) -> String {
        let Some(latest) = self.device.latest.as_ref() else {
            return "no reading yet".to_owned();
        };
        let schema = crate::families::get();
        let value = |name: &str| self.value(name);
        let line = family_of(&self.device).and_then(|family| {
            let readings = generic::Readings {
                family,
                value: &value,
                activity: self.activity(),
            };
            generic::key_reading(schema, &readings)
        });
        line.unwrap_or_else(|| crate::render::reading_values(latest, 3))
    }
}

/// The schema's family of a device (by its family name, else its v1 family).
fn family_of(device: &pb::Device) -> Option<&'static ppu_schema::Family> {
    let family = u32::try_from(device.family).unwrap_or_default();
    crate::families::get().device_family(&device.family_name, family)
}

/// The value a device's sparkline follows: the reading its family names as its `trend`, else
/// its first reading.
pub fn key_value(device: &pb::Device, r: &pb::DeviceReading) -> Option<f64> {
    let Some((name, _)) = family_of(device).and_then(generic::trend) else {
        return r.values.first().map(|v| v.value);
    };
    r.values
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.value)
        .filter(|v| v.is_finite())
}

/// The smallest change of [`key_value`] its family's display format shows (`~4` → 0.0001):
/// a trend moving less than that is drawn flat, as its number would read.
pub fn key_value_resolution(device: &pb::Device) -> Option<f64> {
    let family = family_of(device)?;
    let (name, _) = generic::trend(family)?;
    let format = &family
        .options
        .readings
        .iter()
        .find(|r| r.name == name)?
        .format;
    let digits = format.strip_prefix('~').or(format.strip_prefix('.'))?;
    let decimals: i32 = digits.parse().ok()?;
    Some(10f64.powi(-decimals))
}

/// Name and unit of [`key_value`], for the sparkline's caption.
pub fn key_value_label(device: &pb::Device) -> String {
    family_of(device)
        .and_then(generic::trend)
        .map_or_else(|| "first value".to_owned(), |(_, caption)| caption)
}

/// Everything the TUI knows about the lab.
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// True while the event stream is open.
    pub stream_up: bool,
    /// True while the last poll reached the daemon.
    pub poll_up: bool,
    /// Why the link is down, as last reported.
    pub down_reason: Option<String>,
    /// When the daemon last told us anything (event or poll).
    pub last_update: Option<Instant>,
    /// True once the daemon was reached.
    pub ever_connected: bool,
    /// Times the event stream was reopened after being up.
    pub reconnects: u32,
    /// The sequence the stream last resumed after, on a reconnect.
    pub resumed_after: Option<u64>,
    /// The last event sequence seen.
    pub last_sequence: u64,
    pub queue_status: QueueStatus,
    pub running_ids: Vec<String>,
    pub queued_ids: Vec<String>,
    pub held_ids: Vec<String>,
    pub experiments: HashMap<String, ExperimentRow>,
    /// Experiments asked for and not yet fetched.
    pub fetching: HashSet<String>,
    pub devices: Vec<DeviceRow>,
    /// Alarms active or not yet acknowledged (ListAlarms, kept current from events).
    pub alarms: Vec<pb::ActiveAlarm>,
    /// Transfers waiting for confirmation (ListTransfers, kept current from events).
    pub transfers: Vec<pb::PendingTransfer>,
    /// The live tail of the event log (device readings left out), oldest first.
    pub tail: VecDeque<pb::Event>,
    /// Per-feature problems (e.g. `alarms` → "UNIMPLEMENTED: …"), shown in the status line.
    pub notices: Vec<(&'static str, String)>,
    /// Sequence of the last event that changed the queue (its state, running/queued/held ids),
    /// the alarms and the transfers: a poll sent before it must not undo it.
    queue_changed_at: u64,
    alarms_changed_at: u64,
    transfers_changed_at: u64,
    /// The daemon's time scale as seen in step progress (see [`Model::sim_scale`]).
    pace: Pace,
}

/// How fast step ETAs (physical time, on the daemon's scaled clock) fall against the wall
/// clock of the events reporting them: under `ppud dev --time-scale 600` an hour of ETA passes
/// in six seconds, and an ETA shown without saying so misleads. The daemon does not report its
/// scale, so it is measured: each pair of progress events of one step segment gives
/// (fall in remaining s) / (wall s between them); the median of the last few is the scale.
#[derive(Debug, Clone, Default)]
struct Pace {
    /// Per experiment: the last progress (step, message, remaining s, wall time s).
    last: HashMap<String, (u32, String, f64, f64)>,
    /// The latest ratios, oldest first.
    ratios: VecDeque<f64>,
}

/// Ratios kept for [`Pace`]'s median.
const PACE_SAMPLES: usize = 9;
/// Wall seconds two progress events must be apart to give a ratio (timestamps are exact, but
/// events logged in one burst say nothing about pace).
const PACE_MIN_WALL_S: f64 = 0.05;

impl Pace {
    fn observe(&mut self, e: &pb::Event, p: &pb::StepProgress) {
        let Some(t) = e.time.as_ref() else { return };
        let wall = t.seconds as f64 + f64::from(t.nanos) * 1e-9;
        let now = (p.step_index, p.message.clone(), p.remaining_s, wall);
        if let Some((step, message, remaining, at)) = self.last.insert(e.experiment_id.clone(), now)
        {
            let (fell, took) = (remaining - p.remaining_s, wall - at);
            if step == p.step_index
                && message == p.message
                && remaining >= 0.0
                && p.remaining_s >= 0.0
                && fell > 0.0
                && took >= PACE_MIN_WALL_S
            {
                self.ratios.push_back(fell / took);
                while self.ratios.len() > PACE_SAMPLES {
                    self.ratios.pop_front();
                }
            }
        }
    }

    fn forget(&mut self, experiment_id: &str) {
        self.last.remove(experiment_id);
    }

    fn median(&self) -> Option<f64> {
        let mut r: Vec<f64> = self.ratios.iter().copied().collect();
        if r.is_empty() {
            return None;
        }
        r.sort_by(f64::total_cmp);
        Some(r[r.len() / 2])
    }
}

impl Model {
    /// How the link looks at `now`.
    pub fn link(&self, now: Instant) -> LinkView {
        let age = self.last_update.map(|t| now.saturating_duration_since(t));
        if !self.ever_connected && self.down_reason.is_none() {
            return LinkView::Connecting;
        }
        if self.stream_up && self.poll_up {
            let age = age.unwrap_or_default();
            if age > STALE_AFTER {
                LinkView::Stale { age }
            } else {
                LinkView::Live { age }
            }
        } else if let Some(reason) = &self.down_reason {
            LinkView::Disconnected {
                reason: reason.clone(),
                age,
            }
        } else {
            LinkView::Connecting
        }
    }

    /// Applies one update. Returns the experiment ids worth fetching (unknown, and current).
    /// `now_s` is the wall clock in Unix seconds, to tell a replayed event from a live one.
    pub fn apply(&mut self, update: Update, now: Instant, now_s: i64) -> Vec<String> {
        let mut fetch = Vec::new();
        match update {
            Update::StreamUp { resumed_after } => {
                if self.ever_connected {
                    self.reconnects += 1;
                    self.resumed_after = Some(resumed_after);
                }
                self.stream_up = true;
                self.mark_contact(now);
            }
            Update::StreamDown { reason } => {
                self.stream_up = false;
                self.down_reason = Some(reason);
            }
            Update::PollFailed { reason } => {
                self.poll_up = false;
                self.down_reason = Some(reason);
            }
            Update::Polled(p) => {
                self.poll_up = true;
                self.mark_contact(now);
                fetch = self.apply_poll(*p);
            }
            Update::Event(e) => {
                self.mark_contact(now);
                fetch = self.apply_event(*e, now_s);
            }
            Update::Experiments { experiments, as_of } => {
                self.mark_contact(now);
                for mut e in experiments {
                    self.fetching.remove(&e.id);
                    let row = self.experiments.entry(e.id.clone()).or_default();
                    if row.changed_at > as_of {
                        // Read before an event this row has applied (the reply was overtaken
                        // by the stream): it would undo that event, and no later event repeats
                        // it. Keep what events said, take the rest, and read it again.
                        keep_event_fields(&mut e, &row.exp);
                        fetch.push(e.id.clone());
                    }
                    row.exp = e;
                    row.fetched = true;
                    if !row.is_active() {
                        row.progress = None;
                    }
                }
                self.prune_finished();
            }
            Update::NotFetched(id) => {
                self.fetching.remove(&id);
            }
        }
        fetch.retain(|id| self.fetching.insert(id.clone()));
        fetch
    }

    fn mark_contact(&mut self, now: Instant) {
        self.last_update = Some(now);
        self.ever_connected = true;
        if self.stream_up && self.poll_up {
            self.down_reason = None;
        }
    }

    fn set_notice(&mut self, key: &'static str, problem: Option<String>) {
        self.notices.retain(|(k, _)| *k != key);
        if let Some(p) = problem {
            self.notices.push((key, p));
        }
    }

    /// Applies one poll round. Each part an event newer than the poll has changed since is
    /// left as the events made it (the next round, sent after that event, brings it); device
    /// readings, which only the poll brings, are always taken.
    fn apply_poll(&mut self, p: Polled) -> Vec<String> {
        let as_of = p.as_of;
        // The daemon's active experiments not read yet (from the reply, not from lists events
        // may be rebuilding while a long log replays).
        let fetch: Vec<String> = p
            .queue
            .running_ids
            .iter()
            .chain(&p.queue.queued_ids)
            .filter(|id| !self.experiments.get(*id).is_some_and(|r| r.fetched))
            .cloned()
            .collect();
        if self.queue_changed_at <= as_of {
            self.queue_status = match pb::QueueState::try_from(p.queue.state) {
                Ok(pb::QueueState::Paused) => QueueStatus::Paused,
                Ok(pb::QueueState::Running) => QueueStatus::Running,
                _ => QueueStatus::Unknown,
            };
            self.running_ids = p.queue.running_ids;
            self.queued_ids = p.queue.queued_ids;
            self.held_ids = p.queue.held_ids;
        }
        match p.devices {
            Ok(devices) => {
                let mut old: HashMap<String, DeviceRow> = self
                    .devices
                    .drain(..)
                    .map(|d| (d.device.id.clone(), d))
                    .collect();
                self.devices = devices
                    .into_iter()
                    .map(|mut d| match old.remove(&d.id) {
                        Some(mut row) => {
                            if row.changed_at > as_of {
                                let shown = &row.device;
                                d.connection = shown.connection;
                                d.connection_error.clone_from(&shown.connection_error);
                                d.maintenance = shown.maintenance;
                                d.maintenance_reason.clone_from(&shown.maintenance_reason);
                            }
                            row.update(d);
                            row
                        }
                        None => DeviceRow::new(d),
                    })
                    .collect();
                self.set_notice("devices", None);
            }
            Err(e) => self.set_notice("devices", Some(format!("devices: {e}"))),
        }
        match p.alarms {
            Ok(alarms) => {
                if self.alarms_changed_at <= as_of {
                    self.alarms = alarms;
                }
                self.set_notice("alarms", None);
            }
            Err(e) => self.set_notice("alarms", Some(format!("alarms: {e}"))),
        }
        match p.transfers {
            Ok(transfers) => {
                if self.transfers_changed_at <= as_of {
                    self.transfers = transfers;
                }
                self.set_notice("transfers", None);
            }
            Err(e) => self.set_notice("transfers", Some(format!("transfers: {e}"))),
        }
        fetch
    }

    fn apply_event(&mut self, e: pb::Event, now_s: i64) -> Vec<String> {
        if e.sequence <= self.last_sequence && e.sequence != 0 {
            return Vec::new();
        }
        self.last_sequence = self.last_sequence.max(e.sequence);
        let mut fetch = Vec::new();
        let recent = e
            .time
            .as_ref()
            .is_some_and(|t| (now_s - t.seconds).abs() <= FETCH_RECENT_S);
        let Some(kind) = &e.kind else {
            self.push_tail(e);
            return fetch;
        };
        match kind {
            Kind::ExperimentStateChanged(c) => {
                let known = self.experiments.contains_key(&e.experiment_id);
                if known || recent {
                    let row = self.experiments.entry(e.experiment_id.clone()).or_default();
                    if !known {
                        row.exp.id = e.experiment_id.clone();
                        row.exp.batch_id = e.batch_id.clone();
                        row.exp.created_at = e.time;
                        fetch.push(e.experiment_id.clone());
                    }
                    row.exp.state = c.to;
                    row.exp.updated_at = e.time;
                    row.changed_at = e.sequence;
                    if !c.reason.is_empty() {
                        row.exp.message = c.reason.clone();
                    }
                    if !row.is_active() {
                        row.progress = None;
                    }
                }
                // The queue's lists follow at once (the order of queued ones comes with the
                // next poll), and a poll read before this event must not put it back.
                let id = &e.experiment_id;
                match pb::ExperimentState::try_from(c.to) {
                    Ok(pb::ExperimentState::Running) => {
                        self.queued_ids.retain(|x| x != id);
                        if !self.running_ids.contains(id) {
                            self.running_ids.push(id.clone());
                        }
                    }
                    Ok(pb::ExperimentState::Queued) => {
                        self.running_ids.retain(|x| x != id);
                        if !self.queued_ids.contains(id) {
                            self.queued_ids.push(id.clone());
                        }
                    }
                    _ => {
                        self.running_ids.retain(|x| x != id);
                        self.queued_ids.retain(|x| x != id);
                        self.held_ids.retain(|x| x != id);
                        self.pace.forget(id);
                    }
                }
                self.queue_changed_at = e.sequence;
                self.prune_finished();
            }
            Kind::StepStarted(s) => {
                if let Some(row) = self.experiments.get_mut(&e.experiment_id) {
                    row.exp.current_step = s.step_index;
                    row.changed_at = e.sequence;
                    row.progress = None;
                    if row.fetched
                        && let Some(step) = &s.step
                        && insert_started_step(&mut row.exp, s.step_index, step)
                    {
                        fetch.push(e.experiment_id.clone());
                    }
                }
            }
            Kind::StepProgress(p) => {
                self.pace.observe(&e, p);
                if let Some(row) = self.experiments.get_mut(&e.experiment_id) {
                    row.exp.current_step = p.step_index;
                    row.progress = Some(p.clone());
                }
                // Progress is frequent: it updates the row, not the tail.
                return fetch;
            }
            Kind::StepFinished(f) => {
                if let (Some(row), Some(r)) =
                    (self.experiments.get_mut(&e.experiment_id), &f.result)
                {
                    row.exp.results.retain(|x| x.step_index != r.step_index);
                    row.exp.results.push(r.clone());
                    row.exp.results.sort_by_key(|x| x.step_index);
                    row.changed_at = e.sequence;
                    row.progress = None;
                    // A result past the steps shown: the list shown is not the daemon's.
                    let steps = row.exp.spec.as_ref().map_or(0, |s| s.steps.len());
                    if row.fetched && r.step_index as usize >= steps {
                        fetch.push(e.experiment_id.clone());
                    }
                }
            }
            Kind::ExperimentHeld(h) => {
                if let Some(row) = self.experiments.get_mut(&e.experiment_id) {
                    row.exp.held = h.held;
                    row.changed_at = e.sequence;
                }
                let id = &e.experiment_id;
                self.held_ids.retain(|x| x != id);
                if h.held {
                    self.held_ids.push(id.clone());
                }
                self.queue_changed_at = e.sequence;
            }
            // The audit trail is for the log, not the live view.
            Kind::Audit(_) => {}
            Kind::ExperimentMoved(m) => {
                if let Some(row) = self.experiments.get_mut(&e.experiment_id) {
                    if let Some(spec) = row.exp.spec.as_mut() {
                        spec.priority = m.priority;
                    }
                    row.changed_at = e.sequence;
                }
                // The new order comes with the next poll; an older one must not stand.
                self.queue_changed_at = e.sequence;
            }
            Kind::QueueStateChanged(q) => {
                self.queue_status = if q.paused {
                    QueueStatus::Paused
                } else {
                    QueueStatus::Running
                };
                self.queue_changed_at = e.sequence;
            }
            Kind::DeviceReading(_) => {
                // Readings come from the poll; the log's copies would flood the tail.
                return fetch;
            }
            Kind::DeviceConnectionChanged(c) => {
                if let Some(d) = self.device_mut(&e.device_id) {
                    d.device.connection = c.state;
                    d.device.connection_error = c.reason.clone();
                    d.changed_at = e.sequence;
                }
            }
            Kind::MaintenanceChanged(m) => {
                if let Some(d) = self.device_mut(&e.device_id) {
                    d.device.maintenance = m.maintenance;
                    d.device.maintenance_reason = m.reason.clone();
                    d.changed_at = e.sequence;
                }
            }
            Kind::DeviceReserved(r) => {
                let exp = e.experiment_id.clone();
                if let Some(d) = self.device_mut(&e.device_id) {
                    d.reserved = Some((exp, r.step_index));
                }
            }
            Kind::DeviceReleased(_) => {
                if let Some(d) = self.device_mut(&e.device_id) {
                    d.reserved = None;
                }
            }
            Kind::Alarm(a) => {
                self.apply_alarm(&e, a);
                self.alarms_changed_at = e.sequence;
            }
            Kind::AlarmAcknowledged(a) => {
                self.alarms_changed_at = e.sequence;
                if let Some(x) = self
                    .alarms
                    .iter_mut()
                    .find(|x| x.device_id == e.device_id && x.code == a.code)
                {
                    x.acknowledged = true;
                    x.acknowledged_by = a.acknowledged_by.clone();
                    x.acknowledged_at = e.time;
                }
                // Acknowledged and cleared: no longer listed (as ListAlarms does).
                self.alarms.retain(|x| !(x.acknowledged && x.cleared));
            }
            Kind::TransferRequested(t) => {
                self.transfers_changed_at = e.sequence;
                if let Some(t) = &t.transfer
                    && !self.transfers.iter().any(|x| x.id == t.id)
                {
                    self.transfers.push(t.clone());
                }
            }
            Kind::TransferConfirmed(c) => {
                self.transfers_changed_at = e.sequence;
                if let Some(t) = &c.transfer {
                    self.transfers.retain(|x| x.id != t.id);
                }
            }
            // Intermediate responses (typed v1 aliases or not) and recovery decisions change
            // no state here; they are shown in the experiment's recent events below.
            _ => {}
        }
        if let Some(row) = self.experiments.get_mut(&e.experiment_id) {
            row.recent.push_back(e.clone());
            while row.recent.len() > RECENT_PER_EXPERIMENT {
                row.recent.pop_front();
            }
        }
        self.push_tail(e);
        fetch
    }

    fn apply_alarm(&mut self, e: &pb::Event, a: &pb::Alarm) {
        let pos = self
            .alarms
            .iter()
            .position(|x| x.device_id == e.device_id && x.code == a.code);
        if a.cleared {
            if let Some(i) = pos {
                self.alarms[i].cleared = true;
            }
            self.alarms.retain(|x| !(x.acknowledged && x.cleared));
            return;
        }
        let raised = pb::ActiveAlarm {
            device_id: e.device_id.clone(),
            code: a.code.clone(),
            message: a.message.clone(),
            severity: a.severity,
            raised_at: e.time,
            ..Default::default()
        };
        match pos {
            // Raised again: a new occurrence that needs its own acknowledgement.
            Some(i) => self.alarms[i] = raised,
            None => self.alarms.push(raised),
        }
    }

    fn push_tail(&mut self, e: pb::Event) {
        self.tail.push_back(e);
        while self.tail.len() > EVENT_TAIL {
            self.tail.pop_front();
        }
    }

    fn device_mut(&mut self, id: &str) -> Option<&mut DeviceRow> {
        self.devices.iter_mut().find(|d| d.device.id == id)
    }

    /// Drops the oldest finished experiments beyond [`FINISHED_KEPT`].
    fn prune_finished(&mut self) {
        let mut finished: Vec<String> = self
            .experiments
            .values()
            .filter(|r| !r.is_active())
            .map(|r| r.exp.id.clone())
            .collect();
        if finished.len() <= FINISHED_KEPT {
            return;
        }
        // ULIDs sort by creation time.
        finished.sort();
        let drop = finished.len() - FINISHED_KEPT;
        for id in finished.into_iter().take(drop) {
            self.experiments.remove(&id);
        }
    }

    /// The queue view's rows: running (queue order), queued (start order), other active ones,
    /// then finished ones newest first; only those matching `filter` (case-insensitive).
    pub fn queue_rows(&self, filter: &str) -> Vec<&ExperimentRow> {
        let needle = filter.to_lowercase();
        let mut rows: Vec<(u8, usize, &ExperimentRow)> = self
            .experiments
            .values()
            .filter(|r| r.matches(&needle))
            .map(|r| {
                let id = &r.exp.id;
                if let Some(i) = self.running_ids.iter().position(|x| x == id) {
                    (0, i, r)
                } else if let Some(i) = self.queued_ids.iter().position(|x| x == id) {
                    (1, i, r)
                } else if r.is_active() {
                    (2, 0, r)
                } else {
                    (3, 0, r)
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            (a.0, a.1).cmp(&(b.0, b.1)).then_with(|| {
                if a.0 == 3 {
                    b.2.exp.id.cmp(&a.2.exp.id)
                } else {
                    a.2.exp.id.cmp(&b.2.exp.id)
                }
            })
        });
        rows.into_iter().map(|(_, _, r)| r).collect()
    }

    pub fn is_held(&self, row: &ExperimentRow) -> bool {
        row.exp.held || self.held_ids.contains(&row.exp.id)
    }

    /// Alarms in display order: unacknowledged first, then by time raised.
    pub fn alarm_rows(&self) -> Vec<&pb::ActiveAlarm> {
        let mut rows: Vec<&pb::ActiveAlarm> = self.alarms.iter().collect();
        rows.sort_by(|a, b| {
            a.acknowledged.cmp(&b.acknowledged).then_with(|| {
                let t = |x: &pb::ActiveAlarm| x.raised_at.map(|t| (t.seconds, t.nanos));
                t(a).cmp(&t(b))
            })
        });
        rows
    }

    pub fn unacknowledged(&self) -> usize {
        self.alarms.iter().filter(|a| !a.acknowledged).count()
    }

    /// Whether an alarm event's alarm still waits for acknowledgement (to highlight it).
    pub fn is_unacknowledged(&self, device_id: &str, code: &str) -> bool {
        self.alarms
            .iter()
            .any(|a| a.device_id == device_id && a.code == code && !a.acknowledged)
    }

    /// The pending transfer of `experiment_id`, or else the oldest one.
    pub fn transfer_for(&self, experiment_id: Option<&str>) -> Option<&pb::PendingTransfer> {
        experiment_id
            .and_then(|id| self.transfers.iter().find(|t| t.experiment_id == id))
            .or_else(|| self.transfers.first())
    }

    /// The daemon's time scale (physical seconds per real second) as measured from step
    /// progress, when it runs faster than real time (ETAs are then simulated time).
    pub fn sim_scale(&self) -> Option<f64> {
        self.pace.median().filter(|x| *x >= 1.5).map(round_scale)
    }

    /// A short name for an experiment in one-line views: its name if known, else its id's tail.
    pub fn experiment_label(&self, id: &str) -> String {
        match self.experiments.get(id).map(ExperimentRow::name) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => short_id(id),
        }
    }
}

/// Makes the step list of `e` agree with a step the daemon started at `index`. The scheduler
/// inserts a TRANSFER step when the sample must move first: the list read before it lacks that
/// step, and would show the steps after it shifted (a transfer's result on the step behind it,
/// `2/2` while the daemon runs `3/3`). The transfer is inserted here at once; any disagreement
/// returns true, to read the daemon's list.
fn insert_started_step(e: &mut pb::Experiment, index: u32, step: &pb::Step) -> bool {
    let steps = &mut e.spec.get_or_insert_default().steps;
    let at = index as usize;
    if steps.get(at).is_some_and(|s| s.kind == step.kind) {
        return false;
    }
    if matches!(step.kind, Some(pb::step::Kind::Transfer(_))) && at <= steps.len() {
        steps.insert(at, step.clone());
    }
    true
}

/// Puts back into a snapshot `e` what events told about `shown` (the fields the event handlers
/// of [`Model::apply`] set), for a snapshot read before the last of those events.
fn keep_event_fields(e: &mut pb::Experiment, shown: &pb::Experiment) {
    e.state = shown.state;
    e.updated_at = shown.updated_at;
    e.message.clone_from(&shown.message);
    e.held = shown.held;
    e.current_step = shown.current_step;
    e.results.clone_from(&shown.results);
    if let (Some(spec), Some(known)) = (e.spec.as_mut(), shown.spec.as_ref()) {
        spec.priority = known.priority;
        // Steps are only ever inserted (transfers): a longer list was learnt from a later
        // event.
        if known.steps.len() > spec.steps.len() {
            spec.steps.clone_from(&known.steps);
        }
    }
}

/// A measured scale, rounded to what a person would have set: the nearest integer below 20,
/// else two significant digits (`600`, `2000`, `47`).
fn round_scale(x: f64) -> f64 {
    if x < 20.0 {
        x.round()
    } else {
        let unit = 10f64.powf(x.log10().floor() - 1.0);
        (x / unit).round() * unit
    }
}

/// The last 8 characters of a ULID, prefixed with `…`: unique enough on one screen.
pub fn short_id(id: &str) -> String {
    let n = id.chars().count();
    if n <= 10 {
        id.to_owned()
    } else {
        let tail: String = id.chars().skip(n - 8).collect();
        format!("…{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Timestamp;

    const NOW_S: i64 = 1_780_000_000;

    fn ts(s: i64) -> Option<Timestamp> {
        Some(Timestamp {
            seconds: s,
            nanos: 0,
        })
    }

    fn event(seq: u64, exp: &str, device: &str, kind: Kind) -> Update {
        Update::Event(Box::new(pb::Event {
            sequence: seq,
            time: ts(NOW_S),
            experiment_id: exp.to_owned(),
            batch_id: String::new(),
            device_id: device.to_owned(),
            kind: Some(kind),
        }))
    }

    fn state_change(seq: u64, exp: &str, to: pb::ExperimentState) -> Update {
        event(
            seq,
            exp,
            "",
            Kind::ExperimentStateChanged(pb::ExperimentStateChanged {
                from: 0,
                to: to as i32,
                reason: String::new(),
            }),
        )
    }

    #[test]
    fn a_live_experiment_is_fetched_once_and_follows_its_events() {
        let mut m = Model::default();
        let now = Instant::now();
        let f = m.apply(
            state_change(1, "E1", pb::ExperimentState::Queued),
            now,
            NOW_S,
        );
        assert_eq!(f, ["E1"]);
        // Asked for already: not again.
        let f = m.apply(
            state_change(2, "E1", pb::ExperimentState::Running),
            now,
            NOW_S,
        );
        assert!(f.is_empty());
        m.apply(
            event(
                3,
                "E1",
                "",
                Kind::StepProgress(pb::StepProgress {
                    step_index: 0,
                    fraction: 0.5,
                    message: "hold".into(),
                    remaining_s: 60.0,
                }),
            ),
            now,
            NOW_S,
        );
        let row = &m.experiments["E1"];
        assert_eq!(row.state(), pb::ExperimentState::Running);
        assert_eq!(row.progress.as_ref().map(|p| p.fraction), Some(0.5));
        // Progress does not flood the tail.
        assert_eq!(m.tail.len(), 2);
        assert_eq!(m.last_sequence, 3);
        m.apply(
            state_change(4, "E1", pb::ExperimentState::Succeeded),
            now,
            NOW_S,
        );
        assert!(m.experiments["E1"].progress.is_none());
    }

    #[test]
    fn a_reply_overtaken_by_the_stream_does_not_undo_its_events() {
        let mut m = Model::default();
        let now = Instant::now();
        let read = |state: pb::ExperimentState, as_of: u64| Update::Experiments {
            experiments: vec![pb::Experiment {
                id: "E1".into(),
                state: state as i32,
                held: true,
                spec: Some(pb::ExperimentSpec {
                    name: "tui-long".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            as_of,
        };
        // Accepted: shown and asked for (the read goes out after event 3).
        let f = m.apply(
            state_change(3, "E1", pb::ExperimentState::Queued),
            now,
            NOW_S,
        );
        assert_eq!(f, ["E1"]);
        // The daemon starts it; the event overtakes the reply read while it was QUEUED.
        m.apply(
            state_change(5, "E1", pb::ExperimentState::Running),
            now,
            NOW_S,
        );
        let f = m.apply(read(pb::ExperimentState::Queued, 3), now, NOW_S);
        let row = &m.experiments["E1"];
        assert_eq!(row.state(), pb::ExperimentState::Running, "not undone");
        assert_eq!(row.name(), "tui-long", "the rest is taken");
        assert_eq!(f, ["E1"], "and it is read again");
        // That read went out after event 5: taken whole, and not asked for again.
        let f = m.apply(read(pb::ExperimentState::Running, 5), now, NOW_S);
        assert!(f.is_empty());
        assert!(m.experiments["E1"].exp.held);
        // A read newer than the events applied is taken whole too (its events follow).
        let f = m.apply(read(pb::ExperimentState::Succeeded, 5), now, NOW_S);
        assert!(f.is_empty());
        assert_eq!(m.experiments["E1"].state(), pb::ExperimentState::Succeeded);
    }

    fn furnace_step(device: &str) -> pb::Step {
        pb::Step {
            device_id: device.into(),
            kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram::default())),
        }
    }

    fn transfer_step() -> pb::Step {
        pb::Step {
            device_id: "furnace-2".into(),
            kind: Some(pb::step::Kind::Transfer(pb::Transfer {
                sample_id: "S-1".into(),
                from_device_id: "furnace-1".into(),
                to_device_id: "furnace-2".into(),
            })),
        }
    }

    fn finished(seq: u64, exp: &str, step_index: u32) -> Update {
        event(
            seq,
            exp,
            "",
            Kind::StepFinished(pb::StepFinished {
                result: Some(pb::StepResult {
                    step_index,
                    outcome: pb::StepOutcome::Succeeded as i32,
                    ..Default::default()
                }),
            }),
        )
    }

    fn started(seq: u64, exp: &str, step_index: u32, step: pb::Step) -> Update {
        event(
            seq,
            exp,
            "",
            Kind::StepStarted(pb::StepStarted {
                step_index,
                step: Some(step),
            }),
        )
    }

    /// Issue 17: the step list read at submission lacks the transfer the scheduler inserts
    /// later; the transfer's result must not land on the step behind it.
    #[test]
    fn a_transfer_the_scheduler_inserts_shows_in_the_step_list_and_it_is_read_again() {
        let mut m = Model::default();
        let now = Instant::now();
        m.apply(
            Update::Experiments {
                experiments: vec![pb::Experiment {
                    id: "E1".into(),
                    state: pb::ExperimentState::Running as i32,
                    spec: Some(pb::ExperimentSpec {
                        steps: vec![furnace_step("furnace-1"), furnace_step("furnace-2")],
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                as_of: 0,
            },
            now,
            NOW_S,
        );
        let f = m.apply(started(1, "E1", 0, furnace_step("furnace-1")), now, NOW_S);
        assert!(f.is_empty(), "the step it knows: nothing to read");
        m.apply(finished(2, "E1", 0), now, NOW_S);
        let f = m.apply(started(3, "E1", 1, transfer_step()), now, NOW_S);
        assert_eq!(f, ["E1"], "read the daemon's list");
        let steps = &m.experiments["E1"].exp.spec.as_ref().unwrap().steps;
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[1], transfer_step());
        assert_eq!(steps[2], furnace_step("furnace-2"));
        // A read sent before the insert, answered after it: the inserted step stays shown.
        let before_insert = pb::Experiment {
            id: "E1".into(),
            state: pb::ExperimentState::Running as i32,
            spec: Some(pb::ExperimentSpec {
                steps: vec![furnace_step("furnace-1"), furnace_step("furnace-2")],
                ..Default::default()
            }),
            ..Default::default()
        };
        let f = m.apply(
            Update::Experiments {
                experiments: vec![before_insert],
                as_of: 2,
            },
            now,
            NOW_S,
        );
        assert_eq!(f, ["E1"], "and it is read again");
        let row = &m.experiments["E1"];
        assert_eq!(row.exp.spec.as_ref().unwrap().steps.len(), 3);
        assert_eq!(row.exp.current_step, 1);
        // The transfer is confirmed and the furnace-2 step starts: step 3 of 3, as the daemon
        // says, with no result on it.
        m.apply(finished(4, "E1", 1), now, NOW_S);
        m.apply(started(5, "E1", 2, furnace_step("furnace-2")), now, NOW_S);
        let row = &m.experiments["E1"];
        assert_eq!(crate::render::step_progress(&row.exp), "3/3");
        assert_eq!(row.exp.results.len(), 2);
        assert!(
            row.exp.results.iter().all(|r| r.step_index < 2),
            "the furnace-2 step has no result yet"
        );
    }

    #[test]
    fn a_result_past_the_steps_shown_reads_the_experiment_again() {
        let mut m = Model::default();
        let now = Instant::now();
        m.apply(
            Update::Experiments {
                experiments: vec![pb::Experiment {
                    id: "E1".into(),
                    state: pb::ExperimentState::Running as i32,
                    spec: Some(pb::ExperimentSpec {
                        steps: vec![furnace_step("furnace-1")],
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                as_of: 0,
            },
            now,
            NOW_S,
        );
        assert!(m.apply(finished(1, "E1", 0), now, NOW_S).is_empty());
        assert_eq!(m.apply(finished(2, "E1", 1), now, NOW_S), ["E1"]);
    }

    /// Issue 17: a poll read before an event and answered after it must not undo it.
    #[test]
    fn a_poll_older_than_the_stream_does_not_overwrite_it() {
        let mut m = Model::default();
        let now = Instant::now();
        let transfer = pb::PendingTransfer {
            id: "T1".into(),
            experiment_id: "E1".into(),
            ..Default::default()
        };
        let poll = |as_of: u64, paused: bool, transfers: Vec<pb::PendingTransfer>| {
            Update::Polled(Box::new(Polled {
                as_of,
                queue: pb::Queue {
                    state: if paused {
                        pb::QueueState::Paused
                    } else {
                        pb::QueueState::Running
                    } as i32,
                    running_ids: vec!["E1".into()],
                    ..Default::default()
                },
                devices: Ok(vec![pb::Device {
                    id: "furnace-1".into(),
                    connection: pb::ConnectionState::Connected as i32,
                    ..Default::default()
                }]),
                alarms: Ok(vec![]),
                transfers: Ok(transfers),
            }))
        };
        m.apply(poll(0, false, vec![transfer.clone()]), now, NOW_S);
        assert_eq!(m.transfers.len(), 1);
        // The stream: the transfer confirmed, the queue paused, the furnace lost, at 7..9.
        m.apply(
            event(
                7,
                "E1",
                "",
                Kind::TransferConfirmed(pb::TransferConfirmed {
                    transfer: Some(transfer.clone()),
                    confirmed_by: String::new(),
                }),
            ),
            now,
            NOW_S,
        );
        m.apply(
            event(
                8,
                "",
                "",
                Kind::QueueStateChanged(pb::QueueStateChanged {
                    paused: true,
                    reason: String::new(),
                }),
            ),
            now,
            NOW_S,
        );
        m.apply(
            event(
                9,
                "",
                "furnace-1",
                Kind::DeviceConnectionChanged(pb::DeviceConnectionChanged {
                    state: pb::ConnectionState::Disconnected as i32,
                    reason: "timeout".into(),
                }),
            ),
            now,
            NOW_S,
        );
        // A poll sent after event 6 answers with the old state: ignored where events are newer.
        m.apply(poll(6, false, vec![transfer.clone()]), now, NOW_S);
        assert!(m.transfers.is_empty(), "the confirmed transfer stays gone");
        assert_eq!(m.queue_status, QueueStatus::Paused);
        assert!(!m.devices[0].connected());
        // A poll sent after them all is taken whole.
        m.apply(poll(9, false, vec![]), now, NOW_S);
        assert_eq!(m.queue_status, QueueStatus::Running);
        assert!(m.devices[0].connected());
    }

    /// While a long log replays, the lists events rebuild hold experiments long finished: the
    /// poll asks only for those the daemon says are active.
    #[test]
    fn a_poll_during_a_replay_fetches_only_what_the_daemon_runs() {
        let mut m = Model::default();
        let now = Instant::now();
        let mut u = state_change(1, "OLD", pb::ExperimentState::Running);
        if let Update::Event(e) = &mut u {
            e.time = ts(NOW_S - 86_400);
        }
        assert!(m.apply(u, now, NOW_S).is_empty());
        assert_eq!(m.running_ids, ["OLD"]);
        let f = m.apply(
            Update::Polled(Box::new(Polled {
                as_of: 0,
                queue: pb::Queue {
                    running_ids: vec!["NOW".into()],
                    ..Default::default()
                },
                ..Default::default()
            })),
            now,
            NOW_S,
        );
        assert_eq!(f, ["NOW"]);
        assert_eq!(
            m.running_ids,
            ["OLD"],
            "older than the replayed event: not taken"
        );
    }

    #[test]
    fn step_progress_measures_the_time_scale() {
        let mut m = Model::default();
        let now = Instant::now();
        let progress = |seq: u64, wall_ms: i64, remaining_s: f64| {
            Update::Event(Box::new(pb::Event {
                sequence: seq,
                time: Some(Timestamp {
                    seconds: NOW_S + wall_ms / 1000,
                    nanos: ((wall_ms % 1000) * 1_000_000) as i32,
                }),
                experiment_id: "E1".into(),
                kind: Some(Kind::StepProgress(pb::StepProgress {
                    step_index: 0,
                    fraction: 0.5,
                    message: "segment 2/2: hold".into(),
                    remaining_s,
                })),
                ..Default::default()
            }))
        };
        assert_eq!(m.sim_scale(), None);
        // Real time: 1 s of ETA per second: no note.
        m.apply(progress(1, 0, 100.0), now, NOW_S);
        m.apply(progress(2, 500, 99.5), now, NOW_S);
        assert_eq!(m.sim_scale(), None);
        // 600×: 300 s of ETA every half second, with some jitter.
        let mut m = Model::default();
        let mut remaining = 36_000.0;
        for (i, jitter) in [0.0, 3.0, -2.0, 1.0, 0.0].into_iter().enumerate() {
            m.apply(
                progress(i as u64 + 1, 500 * i as i64, remaining),
                now,
                NOW_S,
            );
            remaining -= 300.0 + jitter;
        }
        assert_eq!(m.sim_scale(), Some(600.0));
    }

    #[test]
    fn replayed_history_of_unknown_experiments_is_not_fetched() {
        let mut m = Model::default();
        let mut u = state_change(1, "OLD", pb::ExperimentState::Queued);
        if let Update::Event(e) = &mut u {
            e.time = ts(NOW_S - 86_400);
        }
        assert!(m.apply(u, Instant::now(), NOW_S).is_empty());
        assert!(m.experiments.is_empty());
        assert_eq!(m.tail.len(), 1, "still in the tail");
    }

    #[test]
    fn duplicate_sequences_are_ignored() {
        let mut m = Model::default();
        let now = Instant::now();
        m.apply(
            state_change(5, "E1", pb::ExperimentState::Queued),
            now,
            NOW_S,
        );
        m.apply(
            state_change(5, "E1", pb::ExperimentState::Queued),
            now,
            NOW_S,
        );
        assert_eq!(m.tail.len(), 1);
    }

    #[test]
    fn alarms_stay_until_acknowledged_and_cleared() {
        let mut m = Model::default();
        let now = Instant::now();
        let raise = |seq, cleared| {
            event(
                seq,
                "",
                "furnace-1",
                Kind::Alarm(pb::Alarm {
                    code: "sensor_break".into(),
                    message: "sensor break".into(),
                    severity: pb::AlarmSeverity::Critical as i32,
                    cleared,
                }),
            )
        };
        m.apply(raise(1, false), now, NOW_S);
        assert!(m.is_unacknowledged("furnace-1", "sensor_break"));
        assert_eq!(m.unacknowledged(), 1);
        m.apply(raise(2, true), now, NOW_S);
        assert_eq!(m.alarms.len(), 1, "cleared but unacknowledged: still shown");
        m.apply(
            event(
                3,
                "",
                "furnace-1",
                Kind::AlarmAcknowledged(pb::AlarmAcknowledged {
                    code: "sensor_break".into(),
                    acknowledged_by: "alice".into(),
                }),
            ),
            now,
            NOW_S,
        );
        assert!(m.alarms.is_empty(), "cleared and acknowledged: gone");
        // Raised again, acknowledged while active: listed, not highlighted.
        m.apply(raise(4, false), now, NOW_S);
        m.apply(
            event(
                5,
                "",
                "furnace-1",
                Kind::AlarmAcknowledged(pb::AlarmAcknowledged {
                    code: "sensor_break".into(),
                    acknowledged_by: "bob".into(),
                }),
            ),
            now,
            NOW_S,
        );
        assert_eq!(m.alarms.len(), 1);
        assert!(!m.is_unacknowledged("furnace-1", "sensor_break"));
        assert_eq!(m.alarms[0].acknowledged_by, "bob");
    }

    #[test]
    fn link_goes_down_then_stale_free_when_both_feeds_return() {
        let mut m = Model::default();
        let t0 = Instant::now();
        assert_eq!(m.link(t0), LinkView::Connecting);
        m.apply(Update::StreamUp { resumed_after: 0 }, t0, NOW_S);
        m.apply(Update::Polled(Box::default()), t0, NOW_S);
        assert!(matches!(m.link(t0), LinkView::Live { .. }));
        assert!(matches!(
            m.link(t0 + Duration::from_secs(3)),
            LinkView::Stale { .. }
        ));
        m.apply(
            Update::StreamDown {
                reason: "gone".into(),
            },
            t0,
            NOW_S,
        );
        let LinkView::Disconnected { reason, age } = m.link(t0 + Duration::from_secs(1)) else {
            panic!("{:?}", m.link(t0));
        };
        assert_eq!(reason, "gone");
        assert_eq!(age, Some(Duration::from_secs(1)));
        // The poll alone does not make it live: the stream must be back too.
        let t1 = t0 + Duration::from_secs(2);
        m.apply(Update::Polled(Box::default()), t1, NOW_S);
        assert!(matches!(m.link(t1), LinkView::Disconnected { .. }));
        m.apply(Update::StreamUp { resumed_after: 7 }, t1, NOW_S);
        assert!(matches!(m.link(t1), LinkView::Live { .. }));
        assert_eq!(m.resumed_after, Some(7));
        assert_eq!(m.reconnects, 1);
    }

    #[test]
    fn queue_rows_order_and_filter() {
        let mut m = Model::default();
        let now = Instant::now();
        let spec = |name: &str| pb::ExperimentSpec {
            name: name.into(),
            sample_id: format!("S-{name}"),
            ..Default::default()
        };
        let exp = |id: &str, state: pb::ExperimentState, name: &str| pb::Experiment {
            id: id.into(),
            state: state as i32,
            spec: Some(spec(name)),
            ..Default::default()
        };
        m.apply(
            Update::Experiments {
                experiments: vec![
                    exp("A", pb::ExperimentState::Succeeded, "old"),
                    exp("B", pb::ExperimentState::Queued, "second"),
                    exp("C", pb::ExperimentState::Queued, "first"),
                    exp("D", pb::ExperimentState::Running, "running"),
                    exp("E", pb::ExperimentState::Failed, "newer"),
                ],
                as_of: 0,
            },
            now,
            NOW_S,
        );
        let f = m.apply(
            Update::Polled(Box::new(Polled {
                as_of: 0,
                queue: pb::Queue {
                    state: pb::QueueState::Running as i32,
                    running_ids: vec!["D".into()],
                    queued_ids: vec!["C".into(), "B".into(), "Z".into()],
                    held_ids: vec!["B".into()],
                },
                devices: Ok(vec![]),
                alarms: Err("UNIMPLEMENTED: not yet".into()),
                transfers: Ok(vec![]),
            })),
            now,
            NOW_S,
        );
        assert_eq!(f, ["Z"], "unknown queued id fetched");
        let ids: Vec<&str> = m.queue_rows("").iter().map(|r| r.exp.id.as_str()).collect();
        assert_eq!(ids, ["D", "C", "B", "E", "A"]);
        let ids: Vec<&str> = m
            .queue_rows("S-FIR")
            .iter()
            .map(|r| r.exp.id.as_str())
            .collect();
        assert_eq!(ids, ["C"]);
        assert!(m.is_held(&m.experiments["B"]));
        assert_eq!(
            m.notices,
            [("alarms", "alarms: UNIMPLEMENTED: not yet".into())]
        );
    }

    #[test]
    fn device_history_adds_each_reading_once() {
        let reading = |s: i64, pv: f64| pb::DeviceReading {
            device_id: "furnace-1".into(),
            time: ts(s),
            values: vec![pb::Reading {
                name: "pv_c".into(),
                value: pv,
            }],
            alarms: vec![],
        };
        let dev = |r| pb::Device {
            id: "furnace-1".into(),
            family: pb::DeviceFamily::Furnace as i32,
            latest: Some(r),
            ..Default::default()
        };
        let mut row = DeviceRow::new(dev(reading(1, 20.0)));
        row.update(dev(reading(1, 20.0)));
        row.update(dev(reading(2, 21.0)));
        assert_eq!(row.history, [20.0, 21.0]);
    }
}
