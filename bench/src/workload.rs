//! What the benchmarks submit and store: realistic furnace experiments, and a store pre-filled
//! with a large queue and a long event log, written straight through [`Store`] (far faster than
//! submitting 100k experiments over gRPC, and the records are the ones `SubmitBatch` writes).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pb::event::Kind;
use pb::furnace_segment::Kind as Seg;
use ppu_daemon::store::{Store, now_timestamp};
use ppu_proto::v1 as pb;

/// Experiments per stored batch and per commit when pre-filling, like large `SubmitBatch`es.
const FILL_BATCH: usize = 1000;
/// Events per commit when pre-filling the log.
const FILL_EVENTS_PER_COMMIT: usize = 10_000;

fn furnace_step(segments: Vec<Seg>) -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
            segments: segments
                .into_iter()
                .map(|k| pb::FurnaceSegment { kind: Some(k) })
                .collect(),
        })),
    }
}

fn ramp(temperature_c: f64, rate_c_per_min: f64) -> Seg {
    Seg::Ramp(pb::Ramp {
        temperature_c,
        rate_c_per_min,
    })
}

fn hold(duration_s: f64) -> Seg {
    Seg::Hold(pb::Hold { duration_s })
}

fn labels<M: FromIterator<(String, String)>>(i: usize) -> M {
    [
        ("campaign".to_owned(), "bench".to_owned()),
        ("precursor".to_owned(), format!("P{:03}", i % 997)),
    ]
    .into_iter()
    .collect()
}

/// A typical calcination recipe as a planner would queue it: ramp, long hold, ramp, hold.
/// Used where the experiment is stored but never run (submit, scale).
pub fn calcination(i: usize) -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: format!("calcine-{i:06}"),
        sample_id: format!("S-{i:06}"),
        labels: labels(i),
        priority: 0,
        steps: vec![furnace_step(vec![
            ramp(450.0, 10.0),
            hold(3600.0),
            ramp(800.0, 5.0),
            hold(7200.0),
        ])],
    }
}

/// Reagent volume per dispense in the campaign: 100 experiments × 2 steps stay within the
/// simulated station's 10 mL syringes, so no refill step is needed.
pub const CAMPAIGN_DISPENSE_ML: f64 = 0.04;

/// Pressures of the campaign's CO2 isotherm, bar.
pub const CAMPAIGN_PRESSURES: [f64; 10] = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.4, 0.6, 0.8, 1.0];

fn dispense(reagent: &str) -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Dispense(pb::Dispense {
            reagent: reagent.to_owned(),
            volume_ml: CAMPAIGN_DISPENSE_ML,
            rate_ml_per_min: 5.0,
        })),
    }
}

/// One experiment of the campaign figure, the closed loop of a sorbent screen: dispense
/// reagents A and B, calcine (25 → 350 °C at 20 °C/min, hold 30 min, down to 60 °C at
/// 20 °C/min), degas (250 °C, 2 h), then a 10-point CO2 isotherm at 25 °C. The robot carries
/// the sample between the stations.
pub fn campaign_experiment(i: usize) -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: format!("screen-{i:04}"),
        sample_id: format!("C-{i:04}"),
        labels: labels(i),
        priority: 0,
        steps: vec![
            dispense("A"),
            dispense("B"),
            furnace_step(vec![ramp(350.0, 20.0), hold(1800.0), ramp(60.0, 20.0)]),
            pb::Step {
                device_id: String::new(),
                kind: Some(pb::step::Kind::Degas(pb::Degas {
                    temperature_c: 250.0,
                    duration_s: 2.0 * 3600.0,
                })),
            },
            pb::Step {
                device_id: String::new(),
                kind: Some(pb::step::Kind::Isotherm(pb::Isotherm {
                    adsorptive: "CO2".into(),
                    temperature_c: 25.0,
                    pressure_bar: CAMPAIGN_PRESSURES.to_vec(),
                    equilibration_interval_s: 10.0,
                    max_equilibration_s: 3600.0,
                    sample_mass_g: 0.1,
                })),
            },
        ],
    }
}

/// A submit request of `n` calcination experiments.
pub fn batch_request(key: String, first: usize, n: usize) -> pb::SubmitBatchRequest {
    pb::SubmitBatchRequest {
        idempotency_key: key,
        experiments: (first..first + n).map(calcination).collect(),
    }
}

/// A progress event as the scheduler logs it while a step runs (~100 bytes encoded).
pub fn progress_event(experiment_id: &str, batch_id: &str, i: u64) -> pb::Event {
    pb::Event {
        experiment_id: experiment_id.to_owned(),
        batch_id: batch_id.to_owned(),
        device_id: "furnace-1".to_owned(),
        kind: Some(Kind::StepProgress(pb::StepProgress {
            step_index: 0,
            fraction: (i % 1000) as f64 / 1000.0,
            message: format!(
                "segment 2/4: hold 450 °C for 3600 s (PV {:.1} °C)",
                449.0 + (i % 20) as f64 / 10.0
            ),
            remaining_s: 3600.0 - (i % 3600) as f64,
        })),
        ..Default::default()
    }
}

/// What [`fill`] wrote.
#[derive(Debug, Clone, Copy)]
pub struct Filled {
    pub experiments: usize,
    pub events: u64,
    pub took: Duration,
}

/// Creates a store at `path` holding `experiments` QUEUED experiments (in stored batches of
/// 1,000, each with its idempotency key and one state event per experiment, as `SubmitBatch`
/// writes them), then progress events until the log holds `events` in total. The queue is left
/// paused, so a daemon started on it holds the queue without running anything.
pub fn fill(path: &Path, experiments: usize, events: u64) -> Result<Filled> {
    let started = Instant::now();
    let store = Store::open(path).context("opening the store to fill")?;
    store.write(|w| w.set_queue_paused(true))?;
    let mut ids = ulid::Generator::new();
    let mut next_id = || -> Result<String> { Ok(ids.generate()?.to_string()) };
    let mut sample = None;
    let mut done = 0;
    while done < experiments {
        let n = FILL_BATCH.min(experiments - done);
        let batch_id = next_id()?;
        let now = now_timestamp();
        let mut list = Vec::with_capacity(n);
        for i in done..done + n {
            list.push(pb::Experiment {
                id: next_id()?,
                batch_id: batch_id.clone(),
                spec: Some(calcination(i)),
                state: pb::ExperimentState::Queued as i32,
                created_at: Some(now),
                updated_at: Some(now),
                ..Default::default()
            });
        }
        let batch = pb::Batch {
            id: batch_id.clone(),
            idempotency_key: format!("fill-{batch_id}"),
            experiment_ids: list.iter().map(|e| e.id.clone()).collect(),
            created_at: Some(now),
            submitted_by: "ppu-bench".into(),
        };
        sample.get_or_insert_with(|| (list[0].id.clone(), batch_id.clone()));
        store.write(move |w| {
            for e in &list {
                w.put_experiment(e)?;
                w.emit(
                    &e.id,
                    &e.batch_id,
                    "",
                    Kind::ExperimentStateChanged(pb::ExperimentStateChanged {
                        from: pb::ExperimentState::Unspecified as i32,
                        to: pb::ExperimentState::Queued as i32,
                        reason: String::new(),
                    }),
                );
            }
            w.put_batch(&batch, "bench-fill")
        })?;
        done += n;
    }
    let (eid, bid) = sample.unwrap_or_default();
    let mut logged = store.last_sequence();
    while logged < events {
        let n = (events - logged).min(FILL_EVENTS_PER_COMMIT as u64);
        let (eid, bid) = (eid.clone(), bid.clone());
        store.write(move |w| {
            for i in 0..n {
                w.append(progress_event(&eid, &bid, logged + i));
            }
            Ok(())
        })?;
        logged = store.last_sequence();
    }
    Ok(Filled {
        experiments,
        events: logged,
        took: started.elapsed(),
    })
}
