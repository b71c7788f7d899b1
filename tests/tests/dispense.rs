//! Dispensing end to end: planner → gRPC → daemon → NE-1000 and MT-SICS drivers → simulated
//! pumps and balance on real pseudo-terminals, with the simulated robot moving the sample.

use ppu_proto::v1 as pb;
use ppu_tests::*;
use tonic::Code;

fn lab_options() -> LabOptions {
    LabOptions {
        dispensing: true,
        ..LabOptions::furnaces(1)
    }
}

fn dispense(reagent: &str, volume_ml: f64, rate_ml_per_min: f64) -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Dispense(pb::Dispense {
            reagent: reagent.to_owned(),
            volume_ml,
            rate_ml_per_min,
        })),
    }
}

fn refill(reagent: &str) -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Refill(pb::Refill {
            reagent: reagent.to_owned(),
            volume_ml: 0.0,
            rate_ml_per_min: 0.0,
        })),
    }
}

fn experiment(name: &str, steps: Vec<pb::Step>) -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: name.to_owned(),
        sample_id: format!("S-{name}"),
        steps,
        ..Default::default()
    }
}

/// Submits and waits until every experiment is terminal; returns them in submission order.
async fn run_batch(lab: &Lab, key: &str, specs: Vec<pb::ExperimentSpec>) -> Vec<pb::Experiment> {
    let mut exps = lab.experiments().await;
    let mut stream = lab
        .events()
        .await
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids = exps
        .submit_batch(batch(key, specs))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .experiment_ids;
    let mut events = Vec::new();
    read_until(&mut stream, &mut events, |ev| {
        ids.iter().all(|id| finished(ev).contains(id))
    })
    .await;
    let mut out = Vec::new();
    for id in ids {
        out.push(
            exps.get_experiment(pb::GetExperimentRequest { id })
                .await
                .unwrap()
                .into_inner(),
        );
    }
    out
}

fn dispense_results(e: &pb::Experiment) -> Vec<pb::DispenseResult> {
    e.results
        .iter()
        .filter_map(|r| match &r.result {
            Some(pb::step_result::Result::Dispense(d)) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

async fn submit_err(lab: &Lab, key: &str, steps: Vec<pb::Step>) -> tonic::Status {
    lab.experiments()
        .await
        .submit_batch(batch(key, vec![experiment(key, steps)]))
        .await
        .expect_err("submission refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispense_a_and_b_then_a_furnace_program_succeeds_with_every_result_field() {
    let lab = Lab::start_with(lab_options()).await;
    let spec = experiment(
        "synthesis",
        vec![
            dispense("A", 2.5, 1.0),
            dispense("B", 1.5, 2.0),
            furnace_step(vec![ramp(120.0, 10.0), hold(600.0)]),
        ],
    );
    let e = run_batch(&lab, "synthesis", vec![spec]).await.remove(0);
    assert_eq!(
        e.state,
        pb::ExperimentState::Succeeded as i32,
        "{}",
        e.message
    );
    let d = dispense_results(&e);
    assert_eq!(d.len(), 2, "{:?}", e.results);
    for (r, (reagent, volume, density, remaining)) in
        d.iter().zip([("A", 2.5, 1.0, 7.5), ("B", 1.5, 0.789, 8.5)])
    {
        assert_eq!(r.reagent, reagent);
        assert_eq!(r.requested_volume_ml, volume);
        assert!((r.pump_volume_ml - volume).abs() <= 0.001, "{r:?}");
        let expected = volume * density;
        assert!((r.expected_mass_g - expected).abs() < 1e-9, "{r:?}");
        let measured = r.measured_mass_g.expect("weighed");
        // The simulated syringes are off by +0.3 % and −0.2 %; the balance sees it.
        assert!((measured - expected).abs() / expected < 0.01, "{r:?}");
        let deviation = r.relative_deviation.expect("deviation");
        assert!((deviation - (measured - expected) / expected).abs() < 1e-9);
        assert!(deviation.abs() > 1e-4, "the syringe error shows: {r:?}");
        assert!((r.remaining_ml - remaining).abs() < 1e-6, "{r:?}");
    }
    let furnace = e
        .results
        .iter()
        .find_map(|r| match &r.result {
            Some(pb::step_result::Result::Furnace(f)) => Some(f.clone()),
            _ => None,
        })
        .expect("furnace result");
    assert!(!furnace.targets.is_empty());

    // The simulated syringes moved what the results say.
    let station = lab.devlab.dispensing.as_ref().unwrap();
    let a = station.pump("pump-a").unwrap().sim.snapshot();
    assert!((a.contents_ml - (10.0 - 2.5 * 1.003)).abs() < 1e-6, "{a:?}");
    // The world files B under the sample (the robot placed it at pump-b).
    let history = lab
        .devlab
        .world
        .history("S-synthesis")
        .expect("sample known");
    let b_ml = history.dispensed_ml.get("B").copied().unwrap_or(0.0);
    assert!((b_ml - 1.5 * 0.998).abs() < 1e-6, "{history:?}");

    // The daemon shows the tracked fill as a live reading of each pump.
    let mut devices = lab.devices().await;
    eventually("pump-a reports its fill", || {
        let mut devices = devices.clone();
        async move {
            let d = devices
                .get_device(pb::GetDeviceRequest {
                    id: "pump-a".into(),
                })
                .await
                .unwrap()
                .into_inner();
            d.latest.is_some_and(|r| {
                r.values
                    .iter()
                    .any(|v| v.name == "fill_ml" && (v.value - 7.5).abs() < 1e-6)
            })
        }
    })
    .await;
    let list = devices
        .list_devices(pb::ListDevicesRequest {})
        .await
        .unwrap()
        .into_inner();
    let drivers: Vec<_> = list.devices.iter().map(|d| d.driver.as_str()).collect();
    for driver in ["ne1000", "mt_sics", "eurotherm"] {
        assert!(drivers.contains(&driver), "{drivers:?}");
    }
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_unknown_reagents_are_refused_at_submission() {
    let lab = Lab::start_with(lab_options()).await;
    let status = submit_err(&lab, "fast", vec![dispense("A", 1.0, 25.0)]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("dispense.rate_ml_per_min")
            && status.message().contains("max_rate_ml_per_min 20"),
        "{}",
        status.message()
    );
    let status = submit_err(&lab, "big", vec![dispense("A", 12.0, 5.0)]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("dispense.volume_ml") && status.message().contains("10"),
        "{}",
        status.message()
    );
    // Over the limit of pump-b (the second pump): refused as well.
    let status = submit_err(&lab, "fast-b", vec![dispense("B", 1.0, 25.0)]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = submit_err(&lab, "unknown", vec![dispense("C", 1.0, 1.0)]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("\"C\""), "{}", status.message());
    // A pump pinned for another pump's reagent.
    let mut pinned = dispense("B", 1.0, 1.0);
    pinned.device_id = "pump-a".into();
    let status = submit_err(&lab, "pinned", vec![pinned]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // A refill larger than the syringe.
    let mut big_refill = refill("A");
    if let Some(pb::step::Kind::Refill(r)) = &mut big_refill.kind {
        r.volume_ml = 11.0;
    }
    let status = submit_err(&lab, "refill", vec![big_refill]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Nothing was stored.
    let listed = lab
        .experiments()
        .await
        .list_experiments(pb::ListExperimentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.experiments.is_empty(), "{listed:?}");
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_the_syringe_dry_fails_clearly_a_refill_recovers_and_the_fill_survives_restarts() {
    let mut lab = Lab::start_with(lab_options()).await;
    // Each fits the 10 mL syringe alone; together they do not. Which one comes second is known
    // only at run time, so the second fails as a step, before anything moves.
    let done = run_batch(
        &lab,
        "dry",
        vec![
            experiment("dry-1", vec![dispense("A", 6.0, 20.0)]),
            experiment("dry-2", vec![dispense("A", 6.0, 20.0)]),
        ],
    )
    .await;
    assert_eq!(
        done[0].state,
        pb::ExperimentState::Succeeded as i32,
        "{}",
        done[0].message
    );
    assert_eq!(done[1].state, pb::ExperimentState::Failed as i32);
    let msg = &done[1].message;
    assert!(
        msg.contains("volume_ml")
            && msg.contains("4.000 mL of A left")
            && msg.contains("refill first"),
        "{msg}"
    );
    let station = lab.devlab.dispensing.as_ref().unwrap();
    let sim = station.pump("pump-a").unwrap().sim.clone();
    assert!(
        (sim.snapshot().infused_ml - 6.0).abs() < 1e-6,
        "the failed step moved nothing"
    );

    // The fill is persisted: a restarted daemon still knows 4 mL are left.
    lab.restart_daemon().await;
    let devices = lab.devices().await;
    eventually("the restarted daemon reports the persisted fill", || {
        let mut devices = devices.clone();
        async move {
            let d = devices
                .get_device(pb::GetDeviceRequest {
                    id: "pump-a".into(),
                })
                .await
                .unwrap()
                .into_inner();
            d.latest.is_some_and(|r| {
                r.values
                    .iter()
                    .any(|v| v.name == "fill_ml" && (v.value - 4.0).abs() < 1e-6)
            })
        }
    })
    .await;
    let after = run_batch(
        &lab,
        "still-dry",
        vec![experiment("still-dry", vec![dispense("A", 6.0, 20.0)])],
    )
    .await;
    assert_eq!(after[0].state, pb::ExperimentState::Failed as i32);
    assert!(
        after[0].message.contains("refill first"),
        "{}",
        after[0].message
    );

    // A refill (default: fill the syringe) lets the campaign go on.
    let refilled = run_batch(
        &lab,
        "refill",
        vec![experiment(
            "refill",
            vec![refill("A"), dispense("A", 6.0, 20.0)],
        )],
    )
    .await;
    let e = &refilled[0];
    assert_eq!(
        e.state,
        pb::ExperimentState::Succeeded as i32,
        "{}",
        e.message
    );
    let r = e
        .results
        .iter()
        .find_map(|r| match &r.result {
            Some(pb::step_result::Result::Refill(r)) => Some(r.clone()),
            _ => None,
        })
        .expect("refill result");
    assert_eq!(r.reagent, "A");
    assert!(
        (r.volume_ml - 6.0).abs() < 1e-6 && (r.fill_ml - 10.0).abs() < 1e-6,
        "{r:?}"
    );
    let d = dispense_results(e);
    assert!((d[0].remaining_ml - 4.0).abs() < 1e-6, "{d:?}");
    lab.stop().await;
}

/// `ppud dev` killed and started again on its data dir: the new process's simulated syringes
/// hold what the daemon recorded (as real ones would have kept it), not a fresh full syringe.
/// Before, the driver restored 9.5 mL while the simulator started at 10 mL, and the next
/// refill stalled against the end of the syringe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_dev_lab_fills_its_simulated_syringes_to_the_recorded_level() {
    let dir = tempfile::tempdir().expect("temp dir");
    let lab = Lab::start_in_with(dir.path(), lab_options()).await;
    let done = run_batch(
        &lab,
        "before",
        vec![experiment("before", vec![dispense("A", 0.5, 20.0)])],
    )
    .await;
    assert_eq!(done[0].state, pb::ExperimentState::Succeeded as i32);
    lab.stop().await;

    // A new simulated lab, as a new `ppud dev` process has, on the same data dir.
    let lab = Lab::start_in_with(dir.path(), lab_options()).await;
    let station = lab.devlab.dispensing.as_ref().expect("station");
    let contents = station
        .pump("pump-a")
        .expect("pump-a")
        .sim
        .snapshot()
        .contents_ml;
    assert!(
        (contents - 9.5).abs() < 0.05,
        "simulated syringe holds {contents} mL"
    );
    let after = run_batch(
        &lab,
        "after",
        vec![experiment(
            "after",
            vec![refill("A"), dispense("A", 0.5, 20.0)],
        )],
    )
    .await;
    assert_eq!(
        after[0].state,
        pb::ExperimentState::Succeeded as i32,
        "{}",
        after[0].message
    );
    lab.stop().await;
}
