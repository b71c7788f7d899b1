//! The intent journal: before ppud actuates a device it records, durably, which device, which
//! experiment and step, the step's parameters and when it started. The entry is removed in the
//! same transaction as the step's result. So after a crash every entry left over names a step
//! that may still be acting on a device, and start-up recovery (`recovery`) knows exactly what
//! to query and what to make safe or adopt.

use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use std::time::SystemTime;

/// One in-flight step. Stored in the store's `journal` table, keyed by device id (a device runs
/// at most one step at a time).
#[derive(Clone, PartialEq, prost::Message)]
pub struct JournalEntry {
    /// The device the step runs on.
    #[prost(string, tag = "1")]
    pub device_id: String,
    /// The experiment and its batch.
    #[prost(string, tag = "2")]
    pub experiment_id: String,
    #[prost(string, tag = "3")]
    pub batch_id: String,
    /// Index of the step in the experiment's `spec.steps`.
    #[prost(uint32, tag = "4")]
    pub step_index: u32,
    /// The step with every parameter, as it was sent to the driver.
    #[prost(message, optional, tag = "5")]
    pub step: Option<pb::Step>,
    /// Wall-clock time the step started.
    #[prost(message, optional, tag = "6")]
    pub started_at: Option<prost_types::Timestamp>,
}

impl JournalEntry {
    /// Physical seconds since the step started, on `clock`'s scale (wall-clock time survives a
    /// restart; the clock's origin does not).
    pub fn elapsed_s(&self, clock: &Clock) -> f64 {
        let Some(ts) = self.started_at else {
            return 0.0;
        };
        let Ok(started) = SystemTime::try_from(ts) else {
            return 0.0;
        };
        SystemTime::now()
            .duration_since(started)
            .map(|d| d.as_secs_f64() * clock.scale())
            .unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn round_trips_and_measures_elapsed_physical_time() {
        let started = SystemTime::now() - std::time::Duration::from_secs(10);
        let e = JournalEntry {
            device_id: "furnace-1".into(),
            experiment_id: "E".into(),
            batch_id: "B".into(),
            step_index: 2,
            step: Some(pb::Step {
                device_id: "furnace-1".into(),
                kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram::default())),
            }),
            started_at: Some(started.into()),
        };
        let back = JournalEntry::decode(e.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, e);
        let elapsed = back.elapsed_s(&Clock::new(100.0));
        assert!((1000.0..1100.0).contains(&elapsed), "{elapsed}");
    }
}
