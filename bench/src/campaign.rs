//! Figure 5, a simulated campaign: the wall time for N experiments submitted as one batch to
//! the in-process daemon on `ppud dev`'s simulated lab (two furnaces, the dispensing station,
//! one sorption analyser, the transfer robot), physical time running at the given scale, from
//! the `SubmitBatch` call to the last experiment's terminal event. Each experiment dispenses,
//! calcines, degasses and measures an isotherm ([`workload::campaign_experiment`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pb::event_service_client::EventServiceClient;
use pb::experiment_service_client::ExperimentServiceClient;
use ppu_proto::v1 as pb;
use ppu_sim::analyser::{DEGAS_RAMP_C_PER_MIN, FREE_SPACE_S};

use crate::figure::{Figure, note};
use crate::lab::{Lab, LabConfig};
use crate::workload;

#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub experiments: usize,
    pub time_scale: f64,
    pub furnaces: usize,
    /// Physical time the simulated robot takes per transfer.
    pub transfer_delay: Duration,
    /// Longest the campaign may take (real time) before the figure is abandoned.
    pub deadline: Duration,
}

pub async fn run(sizes: Sizes, work: &Path) -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir_in(work)?;
    let lab = Lab::start(
        dir.path(),
        LabConfig {
            time_scale: sizes.time_scale,
            furnaces: sizes.furnaces,
            full: true,
            transfer_delay: sizes.transfer_delay,
        },
    )
    .await?;
    let result = measure(&lab, sizes).await;
    lab.stop().await;
    result
}

/// The goal: 100 experiments in at most 15 s, all succeeding, at 100,000x.
const GOAL_TIME_SCALE: f64 = 100_000.0;
const GOAL_WALL_S: f64 = 15.0;

/// Ambient temperature a furnace program or a degas starts from, °C.
const AMBIENT_C: f64 = 25.0;

/// Physical seconds a step needs by its physics alone: a furnace program's ramps and holds
/// (from ambient), a degas's heating (at the simulated port's rate) and hold, an isotherm's
/// free-space measurement (each campaign sample is new to the analyser) and equilibration
/// times as measured, a dispense's volume at its rate. Steps of other kinds count 0.
fn physical_s(step: &pb::Step, result: &pb::StepResult) -> f64 {
    use pb::furnace_segment::Kind as Seg;
    match &step.kind {
        Some(pb::step::Kind::Furnace(p)) => {
            let mut t = AMBIENT_C;
            let mut s = 0.0;
            for seg in &p.segments {
                match &seg.kind {
                    Some(Seg::Ramp(r)) if r.rate_c_per_min > 0.0 => {
                        s += (r.temperature_c - t).abs() / r.rate_c_per_min * 60.0;
                        t = r.temperature_c;
                    }
                    Some(Seg::Hold(h)) => s += h.duration_s,
                    _ => {}
                }
            }
            s
        }
        Some(pb::step::Kind::Degas(d)) => {
            (d.temperature_c - AMBIENT_C).max(0.0) / DEGAS_RAMP_C_PER_MIN * 60.0 + d.duration_s
        }
        Some(pb::step::Kind::Isotherm(_)) => match &result.result {
            Some(pb::step_result::Result::Isotherm(i)) => {
                FREE_SPACE_S + i.points.iter().map(|p| p.equilibration_time_s).sum::<f64>()
            }
            _ => 0.0,
        },
        Some(pb::step::Kind::Dispense(d)) if d.rate_ml_per_min > 0.0 => {
            d.volume_ml / d.rate_ml_per_min * 60.0
        }
        _ => 0.0,
    }
}

fn step_kind(step: &pb::Step) -> &'static str {
    use pb::step::Kind;
    match &step.kind {
        Some(Kind::Transfer(_)) => "transfer",
        Some(Kind::Dispense(_)) => "dispense",
        Some(Kind::Furnace(_)) => "furnace",
        Some(Kind::Degas(_)) => "degas",
        Some(Kind::Isotherm(_)) => "isotherm",
        _ => "other",
    }
}

fn seconds(t: &Option<prost_types::Timestamp>) -> Option<f64> {
    t.map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

async fn measure(lab: &Lab, sizes: Sizes) -> Result<Vec<Figure>> {
    let channel = lab.channel().await?;
    let mut events = EventServiceClient::new(channel.clone())
        .stream_events(pb::StreamEventsRequest::default())
        .await?
        .into_inner();
    let mut client = ExperimentServiceClient::new(channel);
    let request = pb::SubmitBatchRequest {
        idempotency_key: "campaign".into(),
        experiments: (0..sizes.experiments)
            .map(workload::campaign_experiment)
            .collect(),
    };
    let t0 = Instant::now();
    let batch = client
        .submit_batch(request)
        .await?
        .into_inner()
        .batch
        .context("no batch in the reply")?;
    let deadline = tokio::time::Instant::now() + sizes.deadline;
    let (mut finished, mut succeeded) = (0, 0);
    while finished < sizes.experiments {
        let e = match tokio::time::timeout_at(deadline, events.message()).await {
            Ok(Ok(Some(e))) => e,
            Ok(Ok(None)) => bail!("event stream ended"),
            Ok(Err(s)) => bail!("event stream failed: {s}"),
            Err(_) => bail!(
                "campaign not finished after {:?}: {finished} of {} done",
                sizes.deadline,
                sizes.experiments
            ),
        };
        if e.batch_id != batch.id {
            continue;
        }
        if let Some(pb::event::Kind::ExperimentStateChanged(c)) = &e.kind {
            use pb::ExperimentState as S;
            let to = S::try_from(c.to).unwrap_or(S::Unspecified);
            if matches!(to, S::Succeeded | S::Failed | S::Cancelled | S::Interrupted) {
                finished += 1;
                succeeded += usize::from(to == S::Succeeded);
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();

    // Time each device spent executing steps, from the stored step results.
    let mut busy: BTreeMap<String, f64> = BTreeMap::new();
    // Physical seconds each device had to spend, whatever the time scale.
    let mut physical: BTreeMap<String, f64> = BTreeMap::new();
    // Where the seconds go: real time per step kind and device, summed over the campaign.
    let mut by_kind: BTreeMap<(String, &'static str), (f64, usize)> = BTreeMap::new();
    let mut first_failure = None;
    let mut token = String::new();
    loop {
        let page = client
            .list_experiments(pb::ListExperimentsRequest {
                batch_id: batch.id.clone(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        for e in &page.experiments {
            if e.state != pb::ExperimentState::Succeeded as i32 && first_failure.is_none() {
                first_failure = Some(format!("{}: {}", e.id, e.message));
            }
            for r in &e.results {
                if let (Some(a), Some(b)) = (seconds(&r.started_at), seconds(&r.finished_at)) {
                    *busy.entry(r.device_id.clone()).or_default() += b - a;
                    let kind = e
                        .spec
                        .as_ref()
                        .and_then(|s| s.steps.get(r.step_index as usize))
                        .map_or("?", step_kind);
                    let k = by_kind.entry((r.device_id.clone(), kind)).or_default();
                    k.0 += b - a;
                    k.1 += 1;
                }
                let step = e
                    .spec
                    .as_ref()
                    .and_then(|s| s.steps.get(r.step_index as usize));
                if let Some(step) = step {
                    *physical.entry(r.device_id.clone()).or_default() += physical_s(step, r);
                }
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if let Some(f) = first_failure {
        note(format!(
            "campaign: not every experiment succeeded, e.g. {f}"
        ));
    }
    for ((device, kind), (s, n)) in &by_kind {
        note(format!(
            "campaign: {device} {kind}: {n} steps, {:.1} ms each, {:.2} s in all",
            s / *n as f64 * 1e3,
            s
        ));
    }
    let (bottleneck, bottleneck_s) = busy
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(d, s)| (d.clone(), *s))
        .unwrap_or_default();
    let n = sizes.experiments as f64;
    let (floor_device, floor_s) = physical
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(d, s)| (d.clone(), *s / sizes.time_scale))
        .unwrap_or_default();
    let all_succeeded = succeeded == sizes.experiments;
    let mut f = Figure::new("campaign.wall_time", wall, "s")
        .param("experiments", sizes.experiments)
        .param("succeeded", format!("{succeeded}/{}", sizes.experiments))
        .param("steps", "dispense,dispense,furnace,degas,isotherm")
        .num("time_scale", sizes.time_scale)
        .param("furnaces", sizes.furnaces)
        .param("analysers", 1)
        .num("transfer_s", sizes.transfer_delay.as_secs_f64())
        .num("per_experiment_ms", wall / n * 1e3)
        // The device that spent the most time executing steps, and its share of the wall time.
        .param("busiest", bottleneck)
        .num("busiest_pct", 100.0 * bottleneck_s / wall)
        // The physics-only lower bound: the device with the most physical time to spend
        // (degas heating and hold, free space and isotherm equilibration, furnace ramps and
        // holds, dispensing) at this time scale, with no protocol, transfer or scheduling
        // time at all.
        .num("physics_floor_s", floor_s)
        .param("floor_device", floor_device)
        .num("vs_physics", wall / floor_s);
    if sizes.time_scale >= GOAL_TIME_SCALE {
        f = f.goal(
            format!("<={GOAL_WALL_S}_with_100%_success"),
            wall <= GOAL_WALL_S && all_succeeded,
        );
    }
    f.emit();
    Ok(vec![f])
}
