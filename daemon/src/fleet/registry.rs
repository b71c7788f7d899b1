//! The lab's entry in the registry bucket `PPU_LABS`, put every heartbeat; the bucket's
//! max age (three heartbeats) drops a lab that stopped beating.

use std::sync::Arc;

use async_nats::jetstream::kv;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{FleetSettings, Shared};
use crate::scheduler::Scheduler;

/// One device as the registry shows it.
#[derive(Debug, Serialize)]
pub struct DeviceEntry {
    pub id: String,
    pub family: String,
    pub capabilities: Vec<String>,
    /// `ready`, `disconnected`, `maintenance` or `unsafe`.
    pub state: String,
}

/// A lab's registry value (JSON).
#[derive(Debug, Serialize)]
pub struct LabEntry {
    pub lab: String,
    pub devices: Vec<DeviceEntry>,
    pub capabilities: Vec<String>,
    pub queue_depth: usize,
    pub running: usize,
    pub capacity: usize,
    /// RFC 3339.
    pub heartbeat: String,
    pub last_event_sequence: u64,
    pub published_sequence: u64,
}

/// This lab's capabilities: every capability of its devices, sorted, unique.
pub fn lab_capabilities(scheduler: &Scheduler) -> Vec<String> {
    let mut caps: Vec<String> = scheduler
        .devices()
        .all()
        .flat_map(|d| d.driver.info().capabilities.clone())
        .collect();
    caps.sort();
    caps.dedup();
    caps
}

/// How many fleet experiments this lab holds at once.
pub fn capacity(settings: &FleetSettings, scheduler: &Scheduler) -> usize {
    settings
        .capacity
        .unwrap_or_else(|| scheduler.devices().all().count())
        .max(1)
}

fn entry(settings: &FleetSettings, scheduler: &Scheduler, shared: &Shared) -> LabEntry {
    let devices = scheduler
        .devices()
        .all()
        .map(|d| {
            let info = d.driver.info();
            let state = if d.maintenance().is_some() {
                "maintenance"
            } else if d.unsafe_reason().is_some() {
                "unsafe"
            } else if d.is_connected() {
                "ready"
            } else {
                "disconnected"
            };
            DeviceEntry {
                id: info.id.clone(),
                family: info.family.clone(),
                capabilities: info.capabilities.clone(),
                state: state.to_owned(),
            }
        })
        .collect();
    LabEntry {
        lab: settings.lab.clone(),
        devices,
        capabilities: lab_capabilities(scheduler),
        queue_depth: scheduler.queue_depth(),
        running: scheduler.running_ids().len(),
        capacity: capacity(settings, scheduler),
        heartbeat: crate::store::now_timestamp().to_string(),
        last_event_sequence: scheduler.store().last_sequence(),
        published_sequence: shared.published(),
    }
}

pub(super) async fn run(
    labs: kv::Store,
    settings: Arc<FleetSettings>,
    scheduler: Scheduler,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let value = match serde_json::to_vec(&entry(&settings, &scheduler, &shared)) {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "fleet registry: cannot encode the entry");
                continue;
            }
        };
        match tokio::time::timeout(
            settings.heartbeat * 2,
            labs.put(&settings.lab, value.into()),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => debug!(error = %e, "fleet registry: heartbeat not stored"),
            Err(_) => debug!("fleet registry: heartbeat timed out"),
        }
    }
    // Leave the registry at once on a clean stop rather than after the TTL.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        labs.delete(&settings.lab),
    )
    .await;
}
