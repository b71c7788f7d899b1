//! The device registry: every configured driver, its link state and latest reading.
//!
//! A poll task per device reads its status on a real-time interval, so the API shows live
//! readings even when no step runs. Link changes and alarms go to the durable event log; a
//! reading goes to the log at most once per `reading_log_interval`, and to live watchers
//! every time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pb::event::Kind;
use ppu_drivers::device::{DeviceStatus, Family};
use ppu_drivers::{Capability, Device};
use ppu_proto::v1 as pb;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::{Store, now_timestamp};

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
    alarms: Vec<String>,
}

/// One configured device and what the daemon knows about it.
pub struct DeviceHandle {
    pub driver: Arc<dyn Device>,
    live: Mutex<Live>,
    readings: broadcast::Sender<pb::DeviceReading>,
}

impl DeviceHandle {
    fn new(driver: Arc<dyn Device>) -> Self {
        let (readings, _) = broadcast::channel(64);
        Self {
            driver,
            live: Mutex::new(Live::default()),
            readings,
        }
    }

    pub fn id(&self) -> &str {
        &self.driver.info().id
    }

    pub fn has(&self, cap: Capability) -> bool {
        self.driver.info().capabilities.contains(&cap)
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
        let (connection, connection_error, latest) = match self.live.lock() {
            Ok(l) => (
                match l.connected {
                    Some(false) => pb::ConnectionState::Disconnected,
                    Some(true) => pb::ConnectionState::Connected,
                    None => pb::ConnectionState::Unspecified,
                },
                l.error.clone(),
                l.latest.clone(),
            ),
            Err(_) => (pb::ConnectionState::Unspecified, String::new(), None),
        };
        let l = &info.limits;
        pb::Device {
            id: info.id.clone(),
            family: family_to_proto(info.family) as i32,
            driver: info.driver.clone(),
            transport: info.transport.clone(),
            connection: connection as i32,
            capabilities: info
                .capabilities
                .iter()
                .map(|c| capability_to_proto(*c) as i32)
                .collect(),
            limits: Some(pb::DeviceLimits {
                max_temperature_c: l.max_temperature_c,
                min_temperature_c: l.min_temperature_c,
                max_rate_c_per_min: l.max_rate_c_per_min,
                max_hold_s: l.max_hold_s,
                max_volume_ml: l.max_volume_ml,
                max_rate_ml_per_min: l.max_rate_ml_per_min,
                max_pressure_bar: l.max_pressure_bar,
            }),
            latest,
            connection_error,
        }
    }

    /// Updates the link state; returns the event to log if it changed.
    fn set_connected(&self, ok: bool, error: String) -> Option<Kind> {
        let mut l = self.live.lock().ok()?;
        let changed = l.connected != Some(ok);
        l.connected = Some(ok);
        l.error = if ok { String::new() } else { error.clone() };
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

    /// Compares active alarms with the last set; returns raise/clear events.
    fn diff_alarms(&self, now: &[String]) -> Vec<Kind> {
        let Ok(mut l) = self.live.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for a in now.iter().filter(|a| !l.alarms.contains(a)) {
            out.push(alarm(a, false));
        }
        for a in l.alarms.iter().filter(|a| !now.contains(a)) {
            out.push(alarm(a, true));
        }
        l.alarms = now.to_vec();
        out
    }
}

fn alarm(text: &str, cleared: bool) -> Kind {
    Kind::Alarm(pb::Alarm {
        code: text.replace(' ', "_"),
        message: text.to_owned(),
        severity: pb::AlarmSeverity::Critical as i32,
        cleared,
    })
}

pub fn family_to_proto(f: Family) -> pb::DeviceFamily {
    match f {
        Family::Furnace => pb::DeviceFamily::Furnace,
        Family::Dispenser => pb::DeviceFamily::Dispenser,
        Family::Balance => pb::DeviceFamily::Balance,
        Family::Analyser => pb::DeviceFamily::Analyser,
    }
}

pub fn capability_to_proto(c: Capability) -> pb::Capability {
    match c {
        Capability::Dispense => pb::Capability::Dispense,
        Capability::Weigh => pb::Capability::Weigh,
        Capability::FurnaceProgram => pb::Capability::FurnaceProgram,
        Capability::Degas => pb::Capability::Degas,
        Capability::Isotherm => pb::Capability::Isotherm,
    }
}

/// All configured devices, by id.
#[derive(Clone, Default)]
pub struct Devices {
    map: Arc<BTreeMap<String, Arc<DeviceHandle>>>,
}

impl Devices {
    pub fn new(drivers: Vec<Arc<dyn Device>>) -> Self {
        let map = drivers
            .into_iter()
            .map(|d| (d.info().id.clone(), Arc::new(DeviceHandle::new(d))))
            .collect();
        Self { map: Arc::new(map) }
    }

    pub fn get(&self, id: &str) -> Option<&Arc<DeviceHandle>> {
        self.map.get(id)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<DeviceHandle>> {
        self.map.values()
    }

    /// Devices that can run `cap`, in id order.
    pub fn with(&self, cap: Capability) -> impl Iterator<Item = &Arc<DeviceHandle>> {
        self.map.values().filter(move |d| d.has(cap))
    }

    /// Drives every device to its safe state, logging failures. Used at start-up (after a
    /// crash nothing may be left heating) and at shutdown.
    pub async fn all_safe(&self) {
        for d in self.all() {
            match d.driver.safe_state().await {
                Ok(()) => info!(device = d.id(), "device in safe state"),
                Err(e) => {
                    warn!(device = d.id(), error = %e, "could not drive device to safe state")
                }
            }
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
        match dev.driver.status().await {
            Ok(status) => {
                events.extend(dev.set_connected(true, String::new()));
                events.extend(dev.diff_alarms(&status.alarms));
                let reading = dev.record(&status);
                if last_logged.is_none_or(|t| t.elapsed() >= s.reading_log_interval) {
                    last_logged = Some(Instant::now());
                    events.push(Kind::DeviceReading(reading));
                }
            }
            Err(e) => {
                if let Some(k) = dev.set_connected(false, e.to_string()) {
                    warn!(device = dev.id(), error = %e, "device link down");
                    events.push(k);
                }
            }
        }
        if events.is_empty() {
            continue;
        }
        let id = dev.id().to_owned();
        if let Err(e) = store
            .write_async(move |w| {
                for k in events {
                    w.emit("", "", &id, k);
                }
                Ok(())
            })
            .await
        {
            warn!(device = dev.id(), error = %e, "could not log device events");
        }
    }
}
