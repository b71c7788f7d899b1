//! The device registry: every configured driver, its link state, latest reading, alarms,
//! maintenance flag and retry policy.
//!
//! A poll task per device reads its status on a real-time interval, so the API shows live
//! readings even when no step runs. Link changes and alarms go to the durable event log; a
//! reading goes to the log at most once per `reading_log_interval`, and to live watchers
//! every time. Alarms are tracked here from raised to cleared and acknowledged
//! (`ListAlarms`, `AcknowledgeAlarm`). Status reads and safe-state commands made on the
//! scheduler's behalf go through [`DeviceHandle::status`] and [`DeviceHandle::secure`], which
//! retry transient link errors with the device's bounded backoff.
//!
//! **Safe state that survives outages.** [`DeviceHandle::secure`] drives a device to its safe
//! state and confirms it by reading it back ([`Device::confirm_safe`]). Until confirmed the
//! device is *unsafe*: the daemon's own alarm [`SAFE_STATE_PENDING`] is active (durable in the
//! alarms table, so a restart knows), the device takes no new reservations, and its poll task
//! tries again on every reconnect and, while connected, with the device's retry backoff. A
//! link lost while a step runs raises [`LINK_LOST`], cleared by the first good exchange. Both
//! are tracked, listed and acknowledged like the alarms devices report themselves
//! (docs/device-safety.md).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pb::event::Kind;
use ppu_drivers::device::{DeviceStatus, SafeCheck};
use ppu_drivers::{Device, DeviceError};
use ppu_proto::v1 as pb;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics;
use crate::store::{Store, StoreError, now_timestamp};

/// Longest single backoff between two attempts, whatever the policy says.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The daemon's alarm for a link lost while the device runs a step (warning: the device may
/// ride it out on its own; the step fails if the outage outlasts the driver's grace).
pub const LINK_LOST: &str = "link_lost";
/// The daemon's alarm for a device whose safe state failed or is not confirmed by read-back
/// (critical: a furnace may still be heating). While it is active the device is unsafe.
pub const SAFE_STATE_PENDING: &str = "safe_state_pending";

/// True for the alarm codes the daemon raises itself, as opposed to those a device reports.
fn is_daemon_alarm(code: &str) -> bool {
    code == LINK_LOST || code == SAFE_STATE_PENDING
}

/// How often, and how patiently, transient link errors (timeouts, disconnects) are retried
/// around status reads and safe-state commands. Steps themselves are not retried: a driver
/// cannot tell whether a failed step already moved something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Extra attempts after the first.
    pub retries: u32,
    /// Real-time wait before the first retry; doubles per retry, capped at 5 s.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retries: 2,
            backoff: Duration::from_millis(200),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.backoff.saturating_mul(factor).min(MAX_BACKOFF)
    }

    /// Runs `op`, retrying transient errors per the policy.
    pub async fn run<T, F, Fut>(
        &self,
        what: &str,
        device: &str,
        mut op: F,
    ) -> Result<T, DeviceError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, DeviceError>>,
    {
        let mut attempt = 0;
        loop {
            let out = op().await;
            match &out {
                // A device without the optional operation (e.g. alarm acknowledgement) did not
                // fail.
                Err(DeviceError::Unsupported(_)) | Ok(_) => {}
                Err(e) => metrics::device_error(device, e),
            }
            match out {
                Err(e) if e.is_transient() && attempt < self.retries => {
                    attempt += 1;
                    let wait = self.delay(attempt);
                    warn!(device, error = %e, attempt, wait_ms = wait.as_millis() as u64, "{what} failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }
}

/// An alarm as the daemon tracks it.
#[derive(Debug, Clone, PartialEq)]
struct TrackedAlarm {
    code: String,
    message: String,
    severity: pb::AlarmSeverity,
    raised_at: prost_types::Timestamp,
    cleared: bool,
    acknowledged: Option<(String, prost_types::Timestamp)>,
}

impl TrackedAlarm {
    fn from_proto(a: pb::ActiveAlarm) -> TrackedAlarm {
        TrackedAlarm {
            severity: match pb::AlarmSeverity::try_from(a.severity) {
                Ok(pb::AlarmSeverity::Unspecified) | Err(_) => pb::AlarmSeverity::Critical,
                Ok(s) => s,
            },
            code: a.code,
            message: a.message,
            raised_at: a.raised_at.unwrap_or_default(),
            cleared: a.cleared,
            acknowledged: a
                .acknowledged
                .then(|| (a.acknowledged_by, a.acknowledged_at.unwrap_or_default())),
        }
    }

    fn to_proto(&self, device_id: &str) -> pb::ActiveAlarm {
        pb::ActiveAlarm {
            device_id: device_id.to_owned(),
            code: self.code.clone(),
            message: self.message.clone(),
            severity: self.severity as i32,
            raised_at: Some(self.raised_at),
            cleared: self.cleared,
            acknowledged: self.acknowledged.is_some(),
            acknowledged_by: self
                .acknowledged
                .as_ref()
                .map(|(by, _)| by.clone())
                .unwrap_or_default(),
            acknowledged_at: self.acknowledged.as_ref().map(|(_, at)| *at),
        }
    }
}

/// Why an alarm could not be acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    #[error("no device \"{0}\"")]
    UnknownDevice(String),
    #[error("device {device} has no alarm \"{code}\" to acknowledge")]
    UnknownAlarm { device: String, code: String },
    #[error("device {device} refused the acknowledgement: {error}")]
    Device { device: String, error: DeviceError },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Stable code of an alarm text, e.g. "sensor break" → "sensor_break".
pub fn alarm_code(text: &str) -> String {
    text.replace(' ', "_")
}

/// How often devices are polled and readings logged.
#[derive(Debug, Clone, Copy)]
pub struct PollSettings {
    pub poll_interval: Duration,
    pub reading_log_interval: Duration,
}

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            reading_log_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Default)]
struct Live {
    connected: Option<bool>,
    error: String,
    latest: Option<pb::DeviceReading>,
    /// Alarm texts active at the last poll.
    alarms: Vec<String>,
    /// Alarms active, or cleared but not yet acknowledged.
    tracked: Vec<TrackedAlarm>,
    /// `Some(reason)` while in maintenance.
    maintenance: Option<String>,
    /// Steps running on the device now (0 or 1 in practice): a link lost meanwhile alarms.
    stepping: u32,
    /// Failed attempts to make the device safe since it was last confirmed safe.
    safe_attempts: u32,
    /// Earliest time of the next periodic attempt while unsafe and connected.
    next_safe_attempt: Option<Instant>,
}

impl Live {
    /// The active (not cleared) daemon or device alarm with `code`.
    fn active(&self, code: &str) -> Option<&TrackedAlarm> {
        self.tracked.iter().find(|a| a.code == code && !a.cleared)
    }

    /// `Some(reason)` while the safe state is pending: the device is unsafe.
    fn unsafe_reason(&self) -> Option<String> {
        self.active(SAFE_STATE_PENDING).map(|a| a.message.clone())
    }

    /// Raises a daemon alarm; returns its event, or `None` when it is already active (its
    /// message is then brought up to date, so the listing shows the latest reason).
    fn raise(
        &mut self,
        code: &str,
        message: String,
        severity: pb::AlarmSeverity,
        stamp: prost_types::Timestamp,
    ) -> Option<Kind> {
        if let Some(a) = self
            .tracked
            .iter_mut()
            .find(|a| a.code == code && !a.cleared)
        {
            a.message = message;
            return None;
        }
        // A cleared, unacknowledged earlier instance is replaced by the new one.
        self.tracked.retain(|a| a.code != code);
        self.tracked.push(TrackedAlarm {
            code: code.to_owned(),
            message: message.clone(),
            severity,
            raised_at: stamp,
            cleared: false,
            acknowledged: None,
        });
        Some(Kind::Alarm(pb::Alarm {
            code: code.to_owned(),
            message,
            severity: severity as i32,
            cleared: false,
        }))
    }

    /// Clears a daemon alarm; returns its event, or `None` when it was not active. A cleared
    /// alarm stays listed until acknowledged (dropped at once if it already was).
    fn clear(&mut self, code: &str, message: String) -> Option<Kind> {
        let a = self
            .tracked
            .iter_mut()
            .find(|a| a.code == code && !a.cleared)?;
        a.cleared = true;
        let severity = a.severity;
        self.tracked
            .retain(|t| !(t.cleared && t.acknowledged.is_some()));
        Some(Kind::Alarm(pb::Alarm {
            code: code.to_owned(),
            message,
            severity: severity as i32,
            cleared: true,
        }))
    }
}

/// Held while a step runs on a device ([`DeviceHandle::stepping`]).
pub struct StepGuard<'a>(&'a DeviceHandle);

impl Drop for StepGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut l) = self.0.live.lock() {
            l.stepping = l.stepping.saturating_sub(1);
        }
    }
}

/// One configured device and what the daemon knows about it.
pub struct DeviceHandle {
    pub driver: Arc<dyn Device>,
    retry: RetryPolicy,
    live: Mutex<Live>,
    readings: broadcast::Sender<pb::DeviceReading>,
    /// Shared with the registry: woken when availability changes (link, maintenance).
    changed: Arc<Notify>,
}

impl DeviceHandle {
    fn new(driver: Arc<dyn Device>, retry: RetryPolicy, changed: Arc<Notify>) -> Self {
        let (readings, _) = broadcast::channel(64);
        Self {
            driver,
            retry,
            live: Mutex::new(Live::default()),
            readings,
            changed,
        }
    }

    /// The device's family name (`furnace`, `mfc`).
    pub fn family(&self) -> &str {
        &self.driver.info().family
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// Reads the device's status, retrying transient errors per the device's policy.
    pub async fn status(&self) -> Result<DeviceStatus, DeviceError> {
        self.retry
            .run("status read", self.id(), || self.timed_status())
            .await
    }

    /// One status read, its round trip recorded in the metrics.
    async fn timed_status(&self) -> Result<DeviceStatus, DeviceError> {
        let t0 = std::time::Instant::now();
        let out = self.driver.status().await;
        metrics::device_request(self.id(), t0.elapsed());
        out
    }

    /// Drives the device to its safe state and reads it back, retrying transient errors per
    /// its policy. `Err` says why the safe state is not confirmed. A write that failed but a
    /// read-back that shows the device safe counts as safe (the read-back is the proof); a
    /// write that failed on the link is not followed by a read-back that would only wait out
    /// the same outage. A read-back that disagrees is tried again, writes included, with the
    /// same policy: some devices settle (an analyser's abort ends its operation a moment after
    /// the bridge acknowledges it).
    pub async fn make_safe(&self) -> Result<(), String> {
        let mut attempt = 0;
        loop {
            match self.drive_and_confirm().await {
                Ok(()) => return Ok(()),
                Err((reason, true)) if attempt < self.retry.retries => {
                    attempt += 1;
                    let wait = self.retry.delay(attempt);
                    warn!(device = self.id(), %reason, attempt, wait_ms = wait.as_millis() as u64, "safe state not confirmed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err((reason, _)) => return Err(reason),
            }
        }
    }

    /// One round of [`DeviceHandle::make_safe`]; the flag says whether the device answered
    /// but read back not safe (worth another round).
    async fn drive_and_confirm(&self) -> Result<(), (String, bool)> {
        let id = self.id();
        let drive = self
            .retry
            .run("safe state", id, || self.driver.safe_state())
            .await;
        if let Err(e) = &drive
            && e.is_transient()
        {
            return Err((format!("safe state failed: {e}"), false));
        }
        let check = self
            .retry
            .run("safe-state read-back", id, || self.driver.confirm_safe())
            .await;
        match (drive, check) {
            (drive, Ok(SafeCheck::Safe)) => {
                if let Err(e) = drive {
                    warn!(device = id, error = %e, "a safe-state write failed, but the read-back shows the device safe");
                }
                Ok(())
            }
            (Ok(()), Ok(SafeCheck::NotSafe(d))) => Err((
                format!("safe state written but not confirmed: {}", d.join("; ")),
                true,
            )),
            (Err(e), Ok(SafeCheck::NotSafe(d))) => Err((
                format!("safe state failed: {e}; read back: {}", d.join("; ")),
                true,
            )),
            (Ok(()), Err(e)) => Err((
                format!("safe state written but the read-back failed: {e}"),
                false,
            )),
            (Err(e), Err(read)) => Err((
                format!("safe state failed: {e}; the read-back failed too: {read}"),
                false,
            )),
        }
    }

    /// Makes the device safe ([`DeviceHandle::make_safe`]) and records the outcome durably:
    /// unconfirmed raises (or keeps) [`SAFE_STATE_PENDING`] and the device is unsafe;
    /// confirmed clears it. Returns whether the safe state is confirmed.
    pub async fn secure(&self, store: &Arc<Store>) -> bool {
        let outcome = self.make_safe().await;
        let event = self.note_safe_outcome(&outcome);
        match &outcome {
            Ok(()) => info!(
                device = self.id(),
                "device in safe state (confirmed by read-back)"
            ),
            Err(reason) => warn!(device = self.id(), reason = %reason, "device is UNSAFE"),
        }
        if let Some(k) = event {
            self.commit(store, vec![k]).await;
        }
        outcome.is_ok()
    }

    /// Applies a safe-state outcome to the live state; returns the alarm event it causes.
    fn note_safe_outcome(&self, outcome: &Result<(), String>) -> Option<Kind> {
        let mut l = self.live.lock().ok()?;
        let was_unsafe = l.unsafe_reason().is_some();
        let event = match outcome {
            Ok(()) => {
                l.safe_attempts = 0;
                l.next_safe_attempt = None;
                l.clear(
                    SAFE_STATE_PENDING,
                    "safe state confirmed by read-back".to_owned(),
                )
            }
            Err(reason) => {
                l.safe_attempts = l.safe_attempts.saturating_add(1);
                l.next_safe_attempt = Some(Instant::now() + self.retry.delay(l.safe_attempts));
                l.raise(
                    SAFE_STATE_PENDING,
                    format!("safe state pending: {reason}"),
                    pb::AlarmSeverity::Critical,
                    now_timestamp(),
                )
            }
        };
        if was_unsafe != l.unsafe_reason().is_some() {
            self.changed.notify_one();
        }
        event
    }

    /// Raises [`LINK_LOST`] (if not already active) after a step failed on the link; the poll
    /// task clears it at the first good exchange.
    pub async fn link_lost(&self, store: &Arc<Store>, error: &DeviceError) {
        let event = self.live.lock().ok().and_then(|mut l| {
            l.raise(
                LINK_LOST,
                format!("link lost while running a step: {error}"),
                pb::AlarmSeverity::Warning,
                now_timestamp(),
            )
        });
        if let Some(k) = event {
            self.commit(store, vec![k]).await;
        }
    }

    /// Whether the poll task should try the safe state now: the device is unsafe, no step
    /// runs on it, and the link just came back or the backoff since the last try is over.
    fn safe_attempt_due(&self, reconnected: bool) -> bool {
        self.live.lock().is_ok_and(|l| {
            l.unsafe_reason().is_some()
                && l.stepping == 0
                && (reconnected || l.next_safe_attempt.is_none_or(|t| Instant::now() >= t))
        })
    }

    /// Clears [`LINK_LOST`] after a good exchange; returns its event if it was active.
    fn link_back(&self) -> Option<Kind> {
        self.live
            .lock()
            .ok()?
            .clear(LINK_LOST, "link restored".to_owned())
    }

    /// Raises [`LINK_LOST`] when the link failed while a step runs on the device.
    fn link_lost_while_stepping(&self, error: &DeviceError) -> Option<Kind> {
        let mut l = self.live.lock().ok()?;
        if l.stepping == 0 {
            return None;
        }
        l.raise(
            LINK_LOST,
            format!("link lost while running a step: {error}"),
            pb::AlarmSeverity::Warning,
            now_timestamp(),
        )
    }

    /// Marks a step as running on the device until the guard drops.
    pub fn stepping(&self) -> StepGuard<'_> {
        if let Ok(mut l) = self.live.lock() {
            l.stepping += 1;
        }
        StepGuard(self)
    }

    /// `Some(reason)` while the device's safe state is not confirmed.
    pub fn unsafe_reason(&self) -> Option<String> {
        self.live.lock().ok().and_then(|l| l.unsafe_reason())
    }

    /// Logs `events` with the tracked alarms, in one transaction.
    async fn commit(&self, store: &Arc<Store>, events: Vec<Kind>) {
        let id = self.id().to_owned();
        let alarms = self.alarm_snapshot();
        if let Err(e) = store
            .write_async(move |w| {
                for k in events {
                    w.emit("", "", &id, k);
                }
                w.put_alarms(&id, alarms)?;
                Ok(())
            })
            .await
        {
            warn!(device = self.id(), error = %e, "could not log device alarms");
        }
    }

    /// `Some(reason)` while the device is in maintenance.
    pub fn maintenance(&self) -> Option<String> {
        self.live.lock().ok().and_then(|l| l.maintenance.clone())
    }

    /// Sets the in-memory maintenance flag (the scheduler persists it first).
    pub fn set_maintenance(&self, reason: Option<String>) {
        if let Ok(mut l) = self.live.lock() {
            l.maintenance = reason;
        }
        self.changed.notify_one();
    }

    /// True if the scheduler may reserve the device for a new step: connected (or not yet
    /// polled), not in maintenance, and not unsafe (a device whose safe state is not
    /// confirmed must not be given new work: it may still be heating or pumping).
    pub fn is_available(&self) -> bool {
        self.live
            .lock()
            .map(|l| {
                l.connected != Some(false) && l.maintenance.is_none() && l.unsafe_reason().is_none()
            })
            .unwrap_or(false)
    }

    /// Alarms that are active or not yet acknowledged.
    pub fn alarms(&self) -> Vec<pb::ActiveAlarm> {
        self.live
            .lock()
            .map(|l| l.tracked.iter().map(|a| a.to_proto(self.id())).collect())
            .unwrap_or_default()
    }

    /// Acknowledges one alarm: on the device first (where the driver supports it), then
    /// durably in the log. A cleared alarm that is acknowledged is no longer listed.
    pub async fn acknowledge_alarm(
        &self,
        store: &Arc<Store>,
        code: &str,
        by: &str,
    ) -> Result<pb::ActiveAlarm, AckError> {
        let known = self
            .live
            .lock()
            .map(|l| l.tracked.iter().any(|a| a.code == code))
            .unwrap_or(false);
        if !known {
            return Err(AckError::UnknownAlarm {
                device: self.id().to_owned(),
                code: code.to_owned(),
            });
        }
        match self
            .retry
            .run("alarm acknowledge", self.id(), || {
                self.driver.acknowledge_alarms()
            })
            .await
        {
            Ok(()) | Err(DeviceError::Unsupported(_)) => {}
            Err(error) => {
                return Err(AckError::Device {
                    device: self.id().to_owned(),
                    error,
                });
            }
        }
        let unknown = || AckError::UnknownAlarm {
            device: self.id().to_owned(),
            code: code.to_owned(),
        };
        // The acknowledged list is computed first and committed with the event, so the
        // acknowledgement survives a restart; memory follows the commit.
        let now = now_timestamp();
        let (tracked, out) = {
            let l = self.live.lock().map_err(|_| unknown())?;
            let mut tracked = l.tracked.clone();
            let mut out = None;
            for a in tracked.iter_mut().filter(|a| a.code == code) {
                a.acknowledged = Some((by.to_owned(), now));
                out = Some(a.to_proto(self.id()));
            }
            tracked.retain(|a| !(a.cleared && a.acknowledged.is_some()));
            (tracked, out.ok_or_else(unknown)?)
        };
        let snapshot: Vec<pb::ActiveAlarm> =
            tracked.iter().map(|a| a.to_proto(self.id())).collect();
        let (id, c, who) = (self.id().to_owned(), code.to_owned(), by.to_owned());
        store
            .write_async(move |w| {
                w.emit(
                    "",
                    "",
                    &id,
                    Kind::AlarmAcknowledged(pb::AlarmAcknowledged {
                        code: c,
                        acknowledged_by: who,
                    }),
                );
                w.put_alarms(&id, snapshot)?;
                Ok(())
            })
            .await?;
        let mut l = self.live.lock().map_err(|_| unknown())?;
        for a in l.tracked.iter_mut().filter(|a| a.code == code) {
            a.acknowledged = Some((by.to_owned(), now));
        }
        l.tracked
            .retain(|a| !(a.cleared && a.acknowledged.is_some()));
        Ok(out)
    }

    /// Restores the alarms tracked before a restart: still-active ones are not raised again
    /// (the first poll clears those that went away), acknowledgements are kept.
    pub fn restore_alarms(&self, alarms: Vec<pb::ActiveAlarm>) {
        if let Ok(mut l) = self.live.lock() {
            l.tracked = alarms.into_iter().map(TrackedAlarm::from_proto).collect();
            // Only device-reported alarms are compared with the next poll; the daemon's own
            // ones (an unsafe device, a lost link) clear when their condition ends.
            l.alarms = l
                .tracked
                .iter()
                .filter(|a| !a.cleared && !is_daemon_alarm(&a.code))
                .map(|a| a.message.clone())
                .collect();
        }
    }

    /// The tracked alarms, as stored.
    fn alarm_snapshot(&self) -> Vec<pb::ActiveAlarm> {
        self.live
            .lock()
            .map(|l| l.tracked.iter().map(|a| a.to_proto(self.id())).collect())
            .unwrap_or_default()
    }

    pub fn id(&self) -> &str {
        &self.driver.info().id
    }

    pub fn has(&self, cap: &str) -> bool {
        self.driver.info().has(cap)
    }

    /// False only when the last exchange failed.
    pub fn is_connected(&self) -> bool {
        self.live
            .lock()
            .map(|l| l.connected != Some(false))
            .unwrap_or(false)
    }

    /// Live readings from now on.
    pub fn watch(&self) -> broadcast::Receiver<pb::DeviceReading> {
        self.readings.subscribe()
    }

    pub fn latest(&self) -> Option<pb::DeviceReading> {
        self.live.lock().ok().and_then(|l| l.latest.clone())
    }

    /// Records a fresh status (from polling or from a running step) and tells watchers.
    pub fn record(&self, status: &DeviceStatus) -> pb::DeviceReading {
        let reading = pb::DeviceReading {
            device_id: self.id().to_owned(),
            time: Some(now_timestamp()),
            values: status
                .readings
                .iter()
                .map(|r| pb::Reading {
                    name: r.name.clone(),
                    value: r.value,
                })
                .collect(),
            alarms: status.alarms.clone(),
        };
        if let Ok(mut l) = self.live.lock() {
            l.latest = Some(reading.clone());
        }
        let _ = self.readings.send(reading.clone());
        reading
    }

    /// The API view of this device.
    pub fn to_proto(&self) -> pb::Device {
        let info = self.driver.info();
        let (connection, connection_error, latest, unsafe_reason) = match self.live.lock() {
            Ok(l) => (
                match l.connected {
                    Some(false) => pb::ConnectionState::Disconnected,
                    Some(true) => pb::ConnectionState::Connected,
                    None => pb::ConnectionState::Unspecified,
                },
                l.error.clone(),
                l.latest.clone(),
                l.unsafe_reason(),
            ),
            Err(_) => (pb::ConnectionState::Unspecified, String::new(), None, None),
        };
        pb::Device {
            id: info.id.clone(),
            family: crate::schema::v1_family(&info.family),
            family_name: info.family.clone(),
            driver: info.driver.clone(),
            transport: info.transport.clone(),
            connection: connection as i32,
            capabilities: info
                .capabilities
                .iter()
                .filter_map(|c| crate::schema::v1_capability(c))
                .collect(),
            capability_names: info.capabilities.clone(),
            limits: Some(crate::schema::v1_limits(&info.limits)),
            latest,
            connection_error,
            maintenance: self.maintenance().is_some(),
            maintenance_reason: self.maintenance().unwrap_or_default(),
            r#unsafe: unsafe_reason.is_some(),
            unsafe_reason: unsafe_reason.unwrap_or_default(),
            ..Default::default()
        }
    }

    /// Updates the link state; returns the event to log if it changed.
    fn set_connected(&self, ok: bool, error: String) -> Option<Kind> {
        let mut l = self.live.lock().ok()?;
        let changed = l.connected != Some(ok);
        l.connected = Some(ok);
        l.error = if ok { String::new() } else { error.clone() };
        if changed {
            self.changed.notify_one();
        }
        let state = if ok {
            pb::ConnectionState::Connected
        } else {
            pb::ConnectionState::Disconnected
        };
        changed.then_some(Kind::DeviceConnectionChanged(pb::DeviceConnectionChanged {
            state: state as i32,
            reason: error,
        }))
    }

    /// Compares active alarms with the last set; returns raise/clear events and updates the
    /// tracked alarms (raised → cleared → acknowledged; an acknowledged alarm that clears, or
    /// a cleared one that is acknowledged, is dropped).
    fn diff_alarms(&self, now: &[String]) -> Vec<Kind> {
        let Ok(mut l) = self.live.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let raised: Vec<String> = now
            .iter()
            .filter(|a| !l.alarms.contains(a))
            .cloned()
            .collect();
        let cleared: Vec<String> = l
            .alarms
            .iter()
            .filter(|a| !now.contains(a))
            .cloned()
            .collect();
        let stamp = now_timestamp();
        for a in &raised {
            out.push(alarm(a, false));
            let code = alarm_code(a);
            l.tracked.retain(|t| t.code != code);
            l.tracked.push(TrackedAlarm {
                code,
                message: a.clone(),
                severity: pb::AlarmSeverity::Critical,
                raised_at: stamp,
                cleared: false,
                acknowledged: None,
            });
        }
        for a in &cleared {
            out.push(alarm(a, true));
            let code = alarm_code(a);
            for t in l.tracked.iter_mut().filter(|t| t.code == code) {
                t.cleared = true;
            }
        }
        l.tracked
            .retain(|t| !(t.cleared && t.acknowledged.is_some()));
        l.alarms = now.to_vec();
        out
    }
}

fn alarm(text: &str, cleared: bool) -> Kind {
    Kind::Alarm(pb::Alarm {
        code: alarm_code(text),
        message: text.to_owned(),
        severity: pb::AlarmSeverity::Critical as i32,
        cleared,
    })
}

/// All configured devices, by id.
#[derive(Clone, Default)]
pub struct Devices {
    map: Arc<BTreeMap<String, Arc<DeviceHandle>>>,
    changed: Arc<Notify>,
}

impl Devices {
    /// Every driver with the default retry policy.
    pub fn new(drivers: Vec<Arc<dyn Device>>) -> Self {
        Self::with_retry(drivers, |_| RetryPolicy::default())
    }

    /// Every driver with the retry policy `policy(device id)`.
    pub fn with_retry(drivers: Vec<Arc<dyn Device>>, policy: impl Fn(&str) -> RetryPolicy) -> Self {
        let changed = Arc::new(Notify::new());
        let map = drivers
            .into_iter()
            .map(|d| {
                let id = d.info().id.clone();
                let retry = policy(&id);
                (id, Arc::new(DeviceHandle::new(d, retry, changed.clone())))
            })
            .collect();
        Self {
            map: Arc::new(map),
            changed,
        }
    }

    /// Woken whenever a device's availability changes (link up/down, maintenance).
    pub fn changed(&self) -> &Arc<Notify> {
        &self.changed
    }

    pub fn get(&self, id: &str) -> Option<&Arc<DeviceHandle>> {
        self.map.get(id)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<DeviceHandle>> {
        self.map.values()
    }

    /// Devices that can run `cap`, in id order.
    pub fn with<'a>(&'a self, cap: &'a str) -> impl Iterator<Item = &'a Arc<DeviceHandle>> {
        self.map.values().filter(move |d| d.has(cap))
    }

    /// Drives every device to its safe state and confirms it by read-back
    /// ([`DeviceHandle::secure`]: an unconfirmed one is marked unsafe, durably). Used at
    /// start-up (after a crash nothing may be left heating) and at shutdown.
    pub async fn all_safe(&self, store: &Arc<Store>) {
        self.all_safe_except(store, &HashSet::new()).await;
    }

    /// [`Devices::all_safe`] for every device not in `skip` (devices whose running program
    /// recovery adopted).
    pub async fn all_safe_except(&self, store: &Arc<Store>, skip: &HashSet<String>) {
        for d in self.all().filter(|d| !skip.contains(d.id())) {
            d.secure(store).await;
        }
    }

    /// Starts one poll task per device; they stop when `stop` is cancelled.
    pub fn spawn_pollers(
        &self,
        store: Arc<Store>,
        settings: PollSettings,
        stop: CancellationToken,
    ) {
        for d in self.all() {
            tokio::spawn(poll(d.clone(), store.clone(), settings, stop.clone()));
        }
    }
}

async fn poll(dev: Arc<DeviceHandle>, store: Arc<Store>, s: PollSettings, stop: CancellationToken) {
    let mut tick = tokio::time::interval(s.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_logged: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut events = Vec::new();
        let mut alarms = false;
        let mut make_safe = false;
        match dev.timed_status().await {
            Ok(status) => {
                let reconnected = dev.set_connected(true, String::new());
                make_safe = dev.safe_attempt_due(reconnected.is_some());
                events.extend(reconnected);
                if let Some(k) = dev.link_back() {
                    alarms = true;
                    events.push(k);
                }
                let changes = dev.diff_alarms(&status.alarms);
                if !changes.is_empty() {
                    alarms = true;
                }
                events.extend(changes);
                let reading = dev.record(&status);
                if last_logged.is_none_or(|t| t.elapsed() >= s.reading_log_interval) {
                    last_logged = Some(Instant::now());
                    events.push(Kind::DeviceReading(reading));
                }
            }
            Err(e) => {
                metrics::device_error(dev.id(), &e);
                if let Some(k) = dev.set_connected(false, e.to_string()) {
                    warn!(device = dev.id(), error = %e, "device link down");
                    events.push(k);
                }
                if let Some(k) = dev.link_lost_while_stepping(&e) {
                    alarms = true;
                    events.push(k);
                }
            }
        }
        if !events.is_empty() {
            log_events(&dev, &store, events, alarms).await;
        }
        // After the reading is logged: on a reconnect, the link's return comes first in the
        // log, then the safe state's outcome.
        if make_safe {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = dev.secure(&store) => {}
            }
        }
    }
}

/// Logs a poll's events (and the tracked alarms when they changed) in one transaction.
async fn log_events(dev: &DeviceHandle, store: &Arc<Store>, events: Vec<Kind>, alarms: bool) {
    let alarms = alarms.then(|| dev.alarm_snapshot());
    let id = dev.id().to_owned();
    if let Err(e) = store
        .write_async(move |w| {
            for k in events {
                w.emit("", "", &id, k);
            }
            if let Some(a) = alarms {
                w.put_alarms(&id, a)?;
            }
            Ok(())
        })
        .await
    {
        warn!(device = dev.id(), error = %e, "could not log device events");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        }
    }

    fn alarm_of(k: Option<Kind>) -> pb::Alarm {
        match k {
            Some(Kind::Alarm(a)) => a,
            other => panic!("expected an alarm event, got {other:?}"),
        }
    }

    #[test]
    fn a_daemon_alarm_is_raised_once_cleared_once_and_makes_the_device_unsafe_meanwhile() {
        let mut l = Live::default();
        assert_eq!(l.unsafe_reason(), None);
        let a = alarm_of(l.raise(
            SAFE_STATE_PENDING,
            "safe state pending: timeout".into(),
            pb::AlarmSeverity::Critical,
            stamp(),
        ));
        assert_eq!(
            (a.code.as_str(), a.cleared, a.severity),
            (
                SAFE_STATE_PENDING,
                false,
                pb::AlarmSeverity::Critical as i32
            )
        );
        assert_eq!(
            l.unsafe_reason().as_deref(),
            Some("safe state pending: timeout")
        );
        // Raised again while active: no second event, the reason is brought up to date.
        assert_eq!(
            l.raise(
                SAFE_STATE_PENDING,
                "safe state pending: read back 150 °C".into(),
                pb::AlarmSeverity::Critical,
                stamp(),
            ),
            None
        );
        assert_eq!(
            l.unsafe_reason().as_deref(),
            Some("safe state pending: read back 150 °C")
        );
        let c = alarm_of(l.clear(SAFE_STATE_PENDING, "confirmed".into()));
        assert!(c.cleared);
        assert_eq!(l.unsafe_reason(), None);
        assert_eq!(l.clear(SAFE_STATE_PENDING, "confirmed".into()), None);
        // Cleared but unacknowledged: still listed, until acknowledged.
        assert_eq!(l.tracked.len(), 1);
        assert!(l.tracked[0].cleared);
    }

    #[test]
    fn a_new_outage_replaces_a_cleared_unacknowledged_alarm_and_an_acknowledged_one_drops_on_clear()
    {
        let mut l = Live::default();
        let raise = |l: &mut Live| {
            l.raise(
                LINK_LOST,
                "link lost".into(),
                pb::AlarmSeverity::Warning,
                stamp(),
            )
        };
        assert!(raise(&mut l).is_some());
        assert!(l.clear(LINK_LOST, "back".into()).is_some());
        assert!(raise(&mut l).is_some());
        assert_eq!(l.tracked.len(), 1, "one instance per code");
        assert!(!l.tracked[0].cleared);
        assert_eq!(l.tracked[0].severity, pb::AlarmSeverity::Warning);
        l.tracked[0].acknowledged = Some(("op".into(), stamp()));
        assert!(l.clear(LINK_LOST, "back".into()).is_some());
        assert!(l.tracked.is_empty(), "acknowledged and cleared: gone");
    }

    /// A device whose safe state and read-back are scripted.
    struct Scripted {
        info: ppu_drivers::DeviceInfo,
        drive: Mutex<Result<(), DeviceError>>,
        check: Mutex<Result<SafeCheck, DeviceError>>,
        /// Read-backs that answer "busy" before `check` applies (a device still settling).
        settling: std::sync::atomic::AtomicU32,
    }

    #[async_trait::async_trait]
    impl Device for Scripted {
        fn info(&self) -> &ppu_drivers::DeviceInfo {
            &self.info
        }
        fn check(&self, _: &ppu_drivers::StepCommand) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn execute(
            &self,
            _: &ppu_drivers::StepCommand,
            _: ppu_drivers::StepContext,
        ) -> Result<ppu_drivers::StepOutput, DeviceError> {
            Err(DeviceError::Unsupported("scripted".into()))
        }
        async fn status(&self) -> Result<DeviceStatus, DeviceError> {
            Ok(DeviceStatus::default())
        }
        async fn safe_state(&self) -> Result<(), DeviceError> {
            self.drive.lock().unwrap().clone()
        }
        async fn confirm_safe(&self) -> Result<SafeCheck, DeviceError> {
            use std::sync::atomic::Ordering::SeqCst;
            if self
                .settling
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Ok(SafeCheck::NotSafe(vec!["busy".into()]));
            }
            self.check.lock().unwrap().clone()
        }
    }

    fn scripted() -> (Arc<Scripted>, Arc<DeviceHandle>) {
        let d = Arc::new(Scripted {
            info: ppu_drivers::DeviceInfo {
                id: "furnace-1".into(),
                family: "furnace".to_owned(),
                driver: "scripted".into(),
                transport: String::new(),
                capabilities: vec!["furnace_program".to_owned()],
                limits: Default::default(),
            },
            drive: Mutex::new(Ok(())),
            check: Mutex::new(Ok(SafeCheck::Safe)),
            settling: Default::default(),
        });
        let policy = RetryPolicy {
            retries: 1,
            backoff: Duration::from_millis(1),
        };
        let h = Arc::new(DeviceHandle::new(
            d.clone(),
            policy,
            Arc::new(Notify::new()),
        ));
        (d, h)
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_read_back_confirms_the_safe_state() {
        let (d, h) = scripted();
        assert_eq!(h.make_safe().await, Ok(()));
        // A device still settling after the write is read back again (policy: 1 retry).
        d.settling.store(1, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(h.make_safe().await, Ok(()));
        d.settling.store(2, std::sync::atomic::Ordering::SeqCst);
        let e = h.make_safe().await.unwrap_err();
        assert!(e.contains("busy"), "{e}");
        d.settling.store(0, std::sync::atomic::Ordering::SeqCst);
        // Written, but the controller reads back hot.
        *d.check.lock().unwrap() = Ok(SafeCheck::NotSafe(vec!["target 150 °C".into()]));
        let e = h.make_safe().await.unwrap_err();
        assert!(
            e.contains("not confirmed") && e.contains("target 150 °C"),
            "{e}"
        );
        // The read-back itself fails.
        *d.check.lock().unwrap() = Err(DeviceError::Corrupt {
            what: "read".into(),
            reason: "short".into(),
        });
        let e = h.make_safe().await.unwrap_err();
        assert!(e.contains("read-back failed"), "{e}");
        // The link is down: no read-back is tried, the write's error is the reason.
        *d.drive.lock().unwrap() = Err(DeviceError::Disconnected("refused".into()));
        let e = h.make_safe().await.unwrap_err();
        assert!(e.contains("refused"), "{e}");
        // A refused write but a read-back that shows it safe: safe.
        *d.drive.lock().unwrap() = Err(DeviceError::Refused {
            what: "write".into(),
            reason: "read-only".into(),
        });
        *d.check.lock().unwrap() = Ok(SafeCheck::Safe);
        assert_eq!(h.make_safe().await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unsafe_device_is_unavailable_retried_on_reconnect_and_survives_a_restart() {
        let (_, h) = scripted();
        assert!(h.is_available());
        let ev = h.note_safe_outcome(&Err("safe state failed: timeout".into()));
        assert!(matches!(ev, Some(Kind::Alarm(ref a)) if !a.cleared));
        assert!(!h.is_available());
        assert!(h.to_proto().r#unsafe);
        // Backoff after a failure: not due at once, due on a reconnect or after the wait.
        assert!(!h.safe_attempt_due(false));
        assert!(h.safe_attempt_due(true));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(h.safe_attempt_due(false));
        // Never while a step runs on the device.
        {
            let _step = h.stepping();
            assert!(!h.safe_attempt_due(true));
        }
        // A restart restores the unsafe flag from the stored alarms; the next poll does not
        // clear it as if the device had stopped reporting it.
        let (_, restarted) = scripted();
        restarted.restore_alarms(h.alarm_snapshot());
        assert!(restarted.unsafe_reason().is_some());
        assert!(restarted.diff_alarms(&[]).is_empty());
        assert!(restarted.unsafe_reason().is_some());
        // Confirmed: cleared, available again.
        let ev = restarted.note_safe_outcome(&Ok(()));
        assert!(matches!(ev, Some(Kind::Alarm(ref a)) if a.cleared));
        assert!(restarted.is_available());
    }

    #[test]
    fn a_link_loss_alarms_only_while_a_step_runs_and_clears_when_the_link_returns() {
        let (_, h) = scripted();
        let e = DeviceError::Timeout {
            what: "read".into(),
            timeout_ms: 1000,
        };
        assert_eq!(h.link_lost_while_stepping(&e), None);
        let step = h.stepping();
        let a = alarm_of(h.link_lost_while_stepping(&e));
        assert_eq!(a.code, LINK_LOST);
        assert_eq!(a.severity, pb::AlarmSeverity::Warning as i32);
        assert_eq!(h.link_lost_while_stepping(&e), None, "raised once");
        drop(step);
        assert!(h.link_back().is_some_and(|k| alarm_of(Some(k)).cleared));
        assert_eq!(h.link_back(), None);
    }
}
