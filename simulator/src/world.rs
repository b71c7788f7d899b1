//! The simulated lab's shared "world": where each sample is and what happened to it.
//!
//! Real instruments only see the sample in front of them; the simulated ones need the sample's
//! whole synthesis history to decide what it *is*. The world records, per sample id: the
//! reagents dispensed into it and how much, the temperatures of every furnace it sat in (as a
//! trace), and its degas. The analyser simulator turns that history into isotherm parameters
//! through [`crate::analyser::material`].
//!
//! Devices learn which sample is where through [`World::place`] (the daemon's transfer
//! confirmations in `ppud dev`); a furnace reports its temperature through the observer from
//! [`World::furnace_observer`], which files it under whichever sample is placed at that furnace.
//! Clones share the same world.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::furnace::FurnaceObserver;

/// Longest furnace trace kept per sample; older points are thinned out beyond it.
const MAX_TRACE: usize = 20_000;
/// A furnace sample is stored only if the temperature moved this much since the last one…
const TRACE_MIN_DELTA_C: f64 = 0.5;
/// …or this much physical time passed.
const TRACE_MAX_GAP_S: f64 = 300.0;

/// Everything the world knows about one sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleHistory {
    /// Reagent → total volume dispensed into the sample, mL.
    pub dispensed_ml: BTreeMap<String, f64>,
    /// (physical s, °C) while the sample sat in a furnace, in time order.
    pub thermal: Vec<(f64, f64)>,
    /// Last degas: (temperature °C, duration s).
    pub degas: Option<(f64, f64)>,
}

impl SampleHistory {
    /// True when nothing was done to the sample (no synthesis record).
    pub fn is_empty(&self) -> bool {
        self.dispensed_ml.is_empty() && self.thermal.is_empty()
    }

    /// Highest furnace temperature seen, °C (`None` without furnace history).
    pub fn peak_c(&self) -> Option<f64> {
        self.thermal.iter().map(|(_, t)| *t).reduce(f64::max)
    }

    /// Physical seconds spent at or above `threshold_c` (trapezoid over the trace).
    pub fn time_above_s(&self, threshold_c: f64) -> f64 {
        self.thermal
            .windows(2)
            .filter(|w| w[0].1 >= threshold_c && w[1].1 >= threshold_c)
            .map(|w| (w[1].0 - w[0].0).max(0.0))
            .sum()
    }
}

#[derive(Debug, Default)]
struct State {
    samples: HashMap<String, SampleHistory>,
    /// device id → sample id.
    at_device: HashMap<String, String>,
    /// sample id → device id.
    location: HashMap<String, String>,
    /// Explicit materials (tests, reference samples), by sample id.
    materials: HashMap<String, crate::analyser::physics::Material>,
}

/// The shared simulated world. Cheap to clone.
#[derive(Debug, Clone)]
pub struct World {
    seed: u64,
    state: Arc<Mutex<State>>,
}

impl World {
    /// An empty world; `seed` fixes the hidden material model and its noise.
    pub fn new(seed: u64) -> World {
        World {
            seed,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `sample_id` is now at `device_id` (and no longer where it was).
    pub fn place(&self, sample_id: &str, device_id: &str) {
        if sample_id.is_empty() || device_id.is_empty() {
            return;
        }
        let mut s = self.lock();
        if let Some(old) = s
            .location
            .insert(sample_id.to_owned(), device_id.to_owned())
            && s.at_device.get(&old).is_some_and(|x| x == sample_id)
        {
            s.at_device.remove(&old);
        }
        if let Some(previous) = s
            .at_device
            .insert(device_id.to_owned(), sample_id.to_owned())
            && previous != sample_id
        {
            s.location.remove(&previous);
        }
        s.samples.entry(sample_id.to_owned()).or_default();
    }

    /// The sample at a device, if any.
    pub fn sample_at(&self, device_id: &str) -> Option<String> {
        self.lock().at_device.get(device_id).cloned()
    }

    /// Where a sample is, if known.
    pub fn location_of(&self, sample_id: &str) -> Option<String> {
        self.lock().location.get(sample_id).cloned()
    }

    /// Records `volume_ml` of `reagent` dispensed into `sample_id`.
    pub fn record_dispense(&self, sample_id: &str, reagent: &str, volume_ml: f64) {
        if sample_id.is_empty() || !(volume_ml.is_finite() && volume_ml > 0.0) {
            return;
        }
        let mut s = self.lock();
        *s.samples
            .entry(sample_id.to_owned())
            .or_default()
            .dispensed_ml
            .entry(reagent.to_owned())
            .or_insert(0.0) += volume_ml;
    }

    /// Records a dispense into whichever sample is placed at `device_id` (a dispensing
    /// station); returns the sample, or `None` (and records nothing) if none is placed there.
    pub fn record_dispense_at(
        &self,
        device_id: &str,
        reagent: &str,
        volume_ml: f64,
    ) -> Option<String> {
        let sample = self.sample_at(device_id)?;
        self.record_dispense(&sample, reagent, volume_ml);
        Some(sample)
    }

    /// Records a furnace temperature at physical time `t_s` for whichever sample is placed at
    /// `device_id`.
    pub fn record_temperature(&self, device_id: &str, t_s: f64, temp_c: f64) {
        if !(t_s.is_finite() && temp_c.is_finite()) {
            return;
        }
        let mut s = self.lock();
        let Some(sample) = s.at_device.get(device_id).cloned() else {
            return;
        };
        let trace = &mut s.samples.entry(sample).or_default().thermal;
        if let Some(&(t_last, c_last)) = trace.last() {
            if t_s <= t_last {
                return;
            }
            if (temp_c - c_last).abs() < TRACE_MIN_DELTA_C && t_s - t_last < TRACE_MAX_GAP_S {
                return;
            }
        }
        trace.push((t_s, temp_c));
        if trace.len() > MAX_TRACE {
            // Keep the shape: drop every other point of the older half.
            let half = trace.len() / 2;
            let mut kept: Vec<(f64, f64)> = trace[..half].iter().step_by(2).copied().collect();
            kept.extend_from_slice(&trace[half..]);
            *trace = kept;
        }
    }

    /// Records a degas of `sample_id`.
    pub fn record_degas(&self, sample_id: &str, temperature_c: f64, duration_s: f64) {
        if sample_id.is_empty() {
            return;
        }
        self.lock()
            .samples
            .entry(sample_id.to_owned())
            .or_default()
            .degas = Some((temperature_c, duration_s));
    }

    /// Pins the material of a sample, bypassing the synthesis model (reference samples,
    /// tests).
    pub fn set_material(&self, sample_id: &str, material: crate::analyser::physics::Material) {
        self.lock().materials.insert(sample_id.to_owned(), material);
    }

    /// What the world knows about a sample.
    pub fn history(&self, sample_id: &str) -> Option<SampleHistory> {
        self.lock().samples.get(sample_id).cloned()
    }

    /// The material a sample is: a pinned one, else the synthesis model's answer for its
    /// history, else a reference material named in its id, else `None`.
    pub fn material_of(&self, sample_id: &str) -> Option<crate::analyser::physics::Material> {
        let (pinned, history) = {
            let s = self.lock();
            (
                s.materials.get(sample_id).cloned(),
                s.samples.get(sample_id).cloned(),
            )
        };
        if pinned.is_some() {
            return pinned;
        }
        if let Some(h) = history.filter(|h| !h.is_empty()) {
            return Some(crate::analyser::material::synthesised(
                self.seed, sample_id, &h,
            ));
        }
        crate::analyser::physics::Material::reference_for(sample_id)
    }

    /// An observer for the simulated furnace serving as `device_id`.
    pub fn furnace_observer(&self, device_id: &str) -> Arc<dyn FurnaceObserver> {
        Arc::new(FurnaceRecorder {
            world: self.clone(),
            device_id: device_id.to_owned(),
        })
    }
}

/// Files furnace temperatures under the sample placed at the furnace.
struct FurnaceRecorder {
    world: World,
    device_id: String,
}

impl FurnaceObserver for FurnaceRecorder {
    fn observe(&self, t_s: f64, temp_c: f64) {
        self.world.record_temperature(&self.device_id, t_s, temp_c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_moves_samples_and_files_history_under_them() {
        let w = World::new(1);
        w.place("S1", "furnace-1");
        w.record_temperature("furnace-1", 0.0, 25.0);
        w.record_temperature("furnace-1", 100.0, 300.0);
        w.record_temperature("furnace-1", 100.5, 300.1); // too close: thinned
        w.record_temperature("furnace-1", 900.0, 301.0);
        w.place("S2", "furnace-1");
        assert_eq!(w.location_of("S1"), None, "displaced by S2");
        w.record_temperature("furnace-1", 1000.0, 500.0);
        w.place("S1", "analyser-1");
        assert_eq!(w.sample_at("analyser-1").as_deref(), Some("S1"));
        let h = w.history("S1").unwrap();
        assert_eq!(h.thermal.len(), 3);
        assert_eq!(h.peak_c(), Some(301.0));
        assert!((h.time_above_s(250.0) - 800.0).abs() < 1e-9);
        assert_eq!(w.history("S2").unwrap().peak_c(), Some(500.0));
        assert_eq!(w.record_dispense_at("nowhere", "A", 1.0), None);
        w.record_dispense("S1", "A", 1.0);
        w.record_dispense("S1", "A", 0.5);
        assert_eq!(w.history("S1").unwrap().dispensed_ml["A"], 1.5);
    }

    #[test]
    fn materials_come_from_pins_history_or_names() {
        let w = World::new(7);
        assert!(w.material_of("unknown").is_none());
        assert_eq!(w.material_of("ref-13X-a").unwrap().name, "zeolite 13X");
        w.record_dispense("S1", "A", 1.0);
        assert!(w.material_of("S1").unwrap().name.starts_with("synthesised"));
        w.set_material("S1", crate::analyser::physics::Material::hkust_1());
        assert_eq!(w.material_of("S1").unwrap().name, "HKUST-1");
    }
}
