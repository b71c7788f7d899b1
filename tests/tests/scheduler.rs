//! Scheduling and queue control end to end: the generated gRPC clients against the daemon, the
//! real Eurotherm driver and simulated furnaces behind real Modbus TCP sockets, and the
//! simulated lab's robot confirming transfers (or a test confirming them itself).

use pb::event::Kind;
use ppu_proto::v1 as pb;
use ppu_tests::*;
use tonic::Code;

/// Safe-state register values of the simulated furnaces (1 decimal place): target SP 25.0 °C,
/// rate limit off, auto mode.
const SAFE_TARGET_RAW: u16 = 250;

fn long(name: &str) -> pb::ExperimentSpec {
    furnace_experiment(name, vec![ramp(200.0, 20.0), hold(36_000.0)])
}

fn short(name: &str) -> pb::ExperimentSpec {
    furnace_experiment(name, vec![step_to(40.0)])
}

fn pin(mut e: pb::ExperimentSpec, device: &str) -> pb::ExperimentSpec {
    for s in &mut e.steps {
        s.device_id = device.into();
    }
    e
}

/// The furnace's registers say safe: target SP at the safe value, rate limit off, auto mode.
fn assert_furnace_safe(lab: &Lab, index: usize) {
    let sim = &lab.devlab.furnaces[index].sim;
    let read = |reg: u16| sim.read_registers(reg, 1).expect("register")[0];
    assert_eq!(
        read(2),
        SAFE_TARGET_RAW,
        "{} target SP register",
        lab.devlab.furnaces[index].id
    );
    assert_eq!(read(35), 0, "rate limit register");
    assert_eq!(read(273), 0, "auto/manual register");
}

async fn submit(lab: &Lab, key: &str, specs: Vec<pb::ExperimentSpec>) -> Vec<String> {
    lab.experiments()
        .await
        .submit_batch(batch(key, specs))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .experiment_ids
}

async fn get(lab: &Lab, id: &str) -> pb::Experiment {
    lab.experiments()
        .await
        .get_experiment(pb::GetExperimentRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn queue(lab: &Lab) -> pb::Queue {
    lab.queue()
        .await
        .get_queue(pb::GetQueueRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn stream(lab: &Lab) -> tonic::Streaming<pb::Event> {
    lab.events()
        .await
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
}

fn is(kind: &Option<Kind>, f: impl Fn(&Kind) -> bool) -> bool {
    kind.as_ref().is_some_and(f)
}

fn holding(ev: &[pb::Event], id: &str) -> bool {
    ev.iter().any(|e| {
        e.experiment_id == id
            && is(
                &e.kind,
                |k| matches!(k, Kind::StepProgress(p) if p.message.contains("hold")),
            )
    })
}

fn state_change(e: &pb::Event, id: &str, to: pb::ExperimentState) -> bool {
    e.experiment_id == id
        && is(
            &e.kind,
            |k| matches!(k, Kind::ExperimentStateChanged(c) if c.to == to as i32),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_back_new_work_while_the_running_step_finishes_and_resume_releases_it() {
    let lab = Lab::start(1).await;
    let ids = submit(
        &lab,
        "pause",
        // One furnace: b can only follow a. The hold (1.8 s real at the test's time scale) is
        // the window in which the pause must land; it is wide so that a loaded machine still
        // pauses before a finishes.
        vec![
            furnace_experiment("a", vec![step_to(80.0), hold(3600.0)]),
            short("b"),
        ],
    )
    .await;
    let mut s = stream(&lab).await;
    let mut ev = Vec::new();
    read_until(&mut s, &mut ev, |ev| holding(ev, &ids[0])).await;
    let q = lab
        .queue()
        .await
        .pause_queue(pb::PauseQueueRequest {
            reason: "door open".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.state, pb::QueueState::Paused as i32);
    assert_eq!(q.running_ids, [ids[0].clone()]);
    // The running step finishes; the next experiment does not start.
    read_until(&mut s, &mut ev, |ev| {
        ev.iter()
            .any(|e| state_change(e, &ids[0], pb::ExperimentState::Succeeded))
    })
    .await;
    assert_eq!(
        get(&lab, &ids[1]).await.state,
        pb::ExperimentState::Queued as i32
    );
    let q = queue(&lab).await;
    assert!(q.running_ids.is_empty());
    assert_eq!(q.queued_ids, [ids[1].clone()]);
    lab.queue()
        .await
        .resume_queue(pb::ResumeQueueRequest {})
        .await
        .unwrap();
    read_until(&mut s, &mut ev, |ev| finished(ev).contains(&ids[1])).await;
    // b started only after the resume.
    let resumed = ev
        .iter()
        .position(|e| {
            is(
                &e.kind,
                |k| matches!(k, Kind::QueueStateChanged(q) if !q.paused),
            )
        })
        .expect("resume logged");
    let started = ev
        .iter()
        .position(|e| state_change(e, &ids[1], pb::ExperimentState::Running))
        .expect("b started");
    assert!(started > resumed);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_step_after_a_transfer_leaves_the_furnace_safe_on_its_registers() {
    let lab = Lab::start(2).await;
    // Calcine on furnace-1, then anneal on furnace-2: the robot moves the sample in between.
    let spec = pb::ExperimentSpec {
        name: "two-furnaces".into(),
        sample_id: "S-2F".into(),
        steps: vec![
            pb::Step {
                device_id: "furnace-1".into(),
                ..furnace_step(vec![step_to(60.0)])
            },
            pb::Step {
                device_id: "furnace-2".into(),
                ..furnace_step(vec![ramp(300.0, 20.0), hold(36_000.0)])
            },
        ],
        ..Default::default()
    };
    let ids = submit(&lab, "cancel", vec![spec]).await;
    let mut s = stream(&lab).await;
    let mut ev = Vec::new();
    read_until(&mut s, &mut ev, |ev| holding(ev, &ids[0])).await;
    let transfer = ev
        .iter()
        .find_map(|e| match &e.kind {
            Some(Kind::TransferConfirmed(t)) => Some(t.clone()),
            _ => None,
        })
        .expect("the sample was moved");
    let t = transfer.transfer.unwrap();
    assert_eq!(
        (
            t.sample_id.as_str(),
            t.from_device_id.as_str(),
            t.to_device_id.as_str()
        ),
        ("S-2F", "furnace-1", "furnace-2")
    );
    assert_eq!(transfer.confirmed_by, ppu_daemon::dev::ROBOT_NAME);
    let sim = &lab.devlab.furnaces[1].sim;
    assert_eq!(
        sim.read_registers(2, 1).unwrap()[0],
        3000,
        "furnace-2 is heating to 300 °C"
    );
    let c = lab
        .experiments()
        .await
        .cancel_experiment(pb::CancelExperimentRequest {
            id: ids[0].clone(),
            reason: "operator".into(),
            after_current_step: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        c.state,
        pb::ExperimentState::Cancelled as i32,
        "{}",
        c.message
    );
    // Results: furnace-1 program, the transfer, the aborted furnace-2 program.
    let outcomes: Vec<i32> = c.results.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [
            pb::StepOutcome::Succeeded as i32,
            pb::StepOutcome::Succeeded as i32,
            pb::StepOutcome::Aborted as i32
        ]
    );
    assert!(matches!(
        c.results[1].result,
        Some(pb::step_result::Result::Transfer(_))
    ));
    assert_furnace_safe(&lab, 1);
    assert_furnace_safe(&lab, 0);
    let dev = lab
        .devices()
        .await
        .get_device(pb::GetDeviceRequest {
            id: "furnace-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dev.holds_sample_id, "S-2F");
    read_until(&mut s, &mut ev, |ev| {
        ev.iter().any(|e| {
            e.device_id == "furnace-2" && is(&e.kind, |k| matches!(k, Kind::DeviceReleased(_)))
        })
    })
    .await;
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_after_the_current_step_lets_it_finish_and_starts_no_next_step() {
    let lab = Lab::start(1).await;
    let spec = pb::ExperimentSpec {
        name: "two".into(),
        sample_id: "S-two".into(),
        steps: vec![
            furnace_step(vec![step_to(60.0), hold(1200.0)]),
            furnace_step(vec![step_to(80.0)]),
        ],
        ..Default::default()
    };
    let ids = submit(&lab, "after", vec![spec]).await;
    let mut s = stream(&lab).await;
    let mut ev = Vec::new();
    read_until(&mut s, &mut ev, |ev| holding(ev, &ids[0])).await;
    let c = lab
        .experiments()
        .await
        .cancel_experiment(pb::CancelExperimentRequest {
            id: ids[0].clone(),
            reason: "enough".into(),
            after_current_step: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        c.state,
        pb::ExperimentState::Running as i32,
        "returns while the step runs"
    );
    read_until(&mut s, &mut ev, |ev| finished(ev).contains(&ids[0])).await;
    let e = get(&lab, &ids[0]).await;
    assert_eq!(e.state, pb::ExperimentState::Cancelled as i32);
    assert_eq!(e.results.len(), 1);
    assert_eq!(e.results[0].outcome, pb::StepOutcome::Succeeded as i32);
    let started = ev
        .iter()
        .filter(|e| is(&e.kind, |k| matches!(k, Kind::StepStarted(_))))
        .count();
    assert_eq!(started, 1, "the second step never started");
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_queue_cancels_every_running_step_makes_the_furnaces_safe_and_pauses() {
    let lab = Lab::start(2).await;
    let ids = submit(&lab, "abort", vec![long("a"), long("b"), short("c")]).await;
    let mut s = stream(&lab).await;
    let mut ev = Vec::new();
    read_until(&mut s, &mut ev, |ev| {
        holding(ev, &ids[0]) && holding(ev, &ids[1])
    })
    .await;
    let q = lab
        .queue()
        .await
        .abort_queue(pb::AbortQueueRequest {
            reason: "power cut".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.state, pb::QueueState::Paused as i32);
    assert!(q.running_ids.is_empty());
    assert_eq!(q.queued_ids, [ids[2].clone()], "queued work stays queued");
    for id in &ids[..2] {
        let e = get(&lab, id).await;
        assert_eq!(e.state, pb::ExperimentState::Cancelled as i32);
        assert_eq!(e.message, "power cut");
        assert_eq!(e.results[0].outcome, pb::StepOutcome::Aborted as i32);
    }
    assert_furnace_safe(&lab, 0);
    assert_furnace_safe(&lab, 1);
    read_until(&mut s, &mut ev, |ev| {
        ev.iter()
            .filter(|e| is(&e.kind, |k| matches!(k, Kind::DeviceReleased(_))))
            .count()
            == 2
    })
    .await;
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_reorders_the_queue_and_the_start_order_follows() {
    let lab = Lab::start(1).await;
    lab.queue()
        .await
        .pause_queue(pb::PauseQueueRequest::default())
        .await
        .unwrap();
    let mut specs: Vec<pb::ExperimentSpec> =
        ["a", "b", "c", "d"].iter().map(|n| short(n)).collect();
    specs[0].priority = 5;
    let ids = submit(&lab, "move", specs).await;
    // d to the front: it takes a's priority.
    let q = lab
        .queue()
        .await
        .move_experiment(pb::MoveExperimentRequest {
            id: ids[3].clone(),
            position: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        q.queued_ids,
        [&ids[3], &ids[0], &ids[1], &ids[2]].map(String::clone)
    );
    assert_eq!(get(&lab, &ids[3]).await.spec.unwrap().priority, 5);
    // a between b and c.
    let q = lab
        .queue()
        .await
        .move_experiment(pb::MoveExperimentRequest {
            id: ids[0].clone(),
            position: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        q.queued_ids,
        [&ids[3], &ids[1], &ids[0], &ids[2]].map(String::clone)
    );
    let mut s = stream(&lab).await;
    let mut ev = Vec::new();
    lab.queue()
        .await
        .resume_queue(pb::ResumeQueueRequest {})
        .await
        .unwrap();
    read_until(&mut s, &mut ev, |ev| {
        ids.iter().all(|id| finished(ev).contains(id))
    })
    .await;
    let order: Vec<String> = ev
        .iter()
        .filter(|e| is(&e.kind, |k| matches!(k, Kind::ExperimentStateChanged(c) if c.to == pb::ExperimentState::Running as i32)))
        .map(|e| e.experiment_id.clone())
        .collect();
    assert_eq!(
        order,
        [&ids[3], &ids[1], &ids[0], &ids[2]].map(String::clone)
    );
    let moved: Vec<(String, u32)> = ev
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::ExperimentMoved(m)) => Some((e.experiment_id.clone(), m.position)),
            _ => None,
        })
        .collect();
    assert_eq!(moved, [(ids[3].clone(), 0), (ids[0].clone(), 2)]);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_experiment_keeps_its_place_and_starts_only_when_released() {
    let lab = Lab::start(1).await;
    lab.queue()
        .await
        .pause_queue(pb::PauseQueueRequest::default())
        .await
        .unwrap();
    let ids = submit(&lab, "hold", vec![short("a"), short("b"), short("c")]).await;
    let held = lab
        .queue()
        .await
        .hold_experiment(pb::HoldExperimentRequest {
            id: ids[0].clone(),
            reason: "waiting for precursor".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(held.held);
    let q = queue(&lab).await;
    assert_eq!(q.queued_ids, ids, "held experiments keep their place");
    assert_eq!(q.held_ids, [ids[0].clone()]);
    let mut s = stream(&lab).await;
    let mut ev = Vec::new();
    lab.queue()
        .await
        .resume_queue(pb::ResumeQueueRequest {})
        .await
        .unwrap();
    read_until(&mut s, &mut ev, |ev| {
        finished(ev).contains(&ids[1]) && finished(ev).contains(&ids[2])
    })
    .await;
    assert_eq!(
        get(&lab, &ids[0]).await.state,
        pb::ExperimentState::Queued as i32
    );
    let released = lab
        .queue()
        .await
        .release_experiment(pb::ReleaseExperimentRequest { id: ids[0].clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(!released.held);
    read_until(&mut s, &mut ev, |ev| finished(ev).contains(&ids[0])).await;
    assert_eq!(
        get(&lab, &ids[0]).await.state,
        pb::ExperimentState::Succeeded as i32
    );
    let held_events: Vec<bool> = ev
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::ExperimentHeld(h)) if e.experiment_id == ids[0] => Some(h.held),
            _ => None,
        })
        .collect();
    assert_eq!(held_events, [true, false]);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queue_requests_get_a_clear_status_and_change_nothing() {
    let lab = Lab::start(2).await;
    let mut q = lab.queue().await;
    let mut devs = lab.devices().await;
    let mut exps = lab.experiments().await;
    q.pause_queue(pb::PauseQueueRequest::default())
        .await
        .unwrap();
    let ids = submit(&lab, "bad", vec![short("a"), short("b")]).await;
    let before = queue(&lab).await;

    let err = q
        .move_experiment(pb::MoveExperimentRequest {
            id: "no-such-experiment".into(),
            position: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("no-such-experiment"),
        "{}",
        err.message()
    );
    assert_eq!(queue(&lab).await, before);

    // Finish one, then try to hold it.
    exps.cancel_experiment(pb::CancelExperimentRequest {
        id: ids[1].clone(),
        reason: "done with it".into(),
        after_current_step: false,
    })
    .await
    .unwrap();
    let err = q
        .hold_experiment(pb::HoldExperimentRequest {
            id: ids[1].clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("CANCELLED"), "{}", err.message());
    let e = get(&lab, &ids[1]).await;
    assert!(!e.held);
    assert_eq!(e.state, pb::ExperimentState::Cancelled as i32);
    let err = q
        .move_experiment(pb::MoveExperimentRequest {
            id: ids[1].clone(),
            position: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Reserving a device in maintenance: a step pinned to it is refused at submission.
    let d = devs
        .set_maintenance(pb::SetMaintenanceRequest {
            id: "furnace-2".into(),
            maintenance: true,
            reason: "thermocouple swap".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.maintenance);
    assert_eq!(d.maintenance_reason, "thermocouple swap");
    let listed_before = exps
        .list_experiments(pb::ListExperimentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .experiments
        .len();
    let err = exps
        .submit_batch(batch("bad-pin", vec![pin(short("p"), "furnace-2")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("furnace-2"), "{}", err.message());
    assert!(err.message().contains("maintenance"), "{}", err.message());
    assert_eq!(
        err.metadata()
            .get("ppu-field-path")
            .and_then(|v| v.to_str().ok()),
        Some("experiments[0].steps[0].device_id")
    );
    let listed_after = exps
        .list_experiments(pb::ListExperimentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .experiments
        .len();
    assert_eq!(listed_after, listed_before, "nothing stored");
    let err = devs
        .set_maintenance(pb::SetMaintenanceRequest {
            id: "oven".into(),
            maintenance: true,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = q
        .confirm_transfer(pb::ConfirmTransferRequest {
            transfer_id: "nope/1".into(),
            confirmed_by: "me".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(queue(&lab).await.queued_ids, [ids[0].clone()]);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_and_a_disconnected_device_are_skipped_by_unpinned_steps() {
    let lab = Lab::start(2).await;
    let mut devs = lab.devices().await;
    devs.set_maintenance(pb::SetMaintenanceRequest {
        id: "furnace-1".into(),
        maintenance: true,
        reason: "cleaning".into(),
    })
    .await
    .unwrap();
    let ids = submit(&lab, "maint", vec![short("m")]).await;
    let mut s = stream(&lab).await;
    let mut ev = Vec::new();
    read_until(&mut s, &mut ev, |ev| finished(ev).contains(&ids[0])).await;
    let ran_on: Vec<&str> = ev
        .iter()
        .filter(|e| is(&e.kind, |k| matches!(k, Kind::StepStarted(_))))
        .map(|e| e.device_id.as_str())
        .collect();
    assert_eq!(ran_on, ["furnace-2"]);
    assert!(ev.iter().any(|e| e.device_id == "furnace-1"
        && is(
            &e.kind,
            |k| matches!(k, Kind::MaintenanceChanged(m) if m.maintenance && m.reason == "cleaning")
        )));
    devs.set_maintenance(pb::SetMaintenanceRequest {
        id: "furnace-1".into(),
        maintenance: false,
        reason: "clean".into(),
    })
    .await
    .unwrap();

    // furnace-2 stops answering: the poller marks it disconnected and work goes to furnace-1.
    lab.devlab.furnaces[1].sim.set_silent(true);
    eventually("furnace-2 disconnected", || async {
        lab.devices()
            .await
            .get_device(pb::GetDeviceRequest {
                id: "furnace-2".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .connection
            == pb::ConnectionState::Disconnected as i32
    })
    .await;
    let ids = submit(&lab, "disc", vec![short("d")]).await;
    read_until(&mut s, &mut ev, |ev| finished(ev).contains(&ids[0])).await;
    let started = ev
        .iter()
        .rev()
        .find(|e| e.experiment_id == ids[0] && is(&e.kind, |k| matches!(k, Kind::StepStarted(_))))
        .expect("started");
    assert_eq!(started.device_id, "furnace-1");
    assert_eq!(
        get(&lab, &ids[0]).await.state,
        pb::ExperimentState::Succeeded as i32
    );
    lab.devlab.furnaces[1].sim.set_silent(false);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_waits_for_confirm_transfer_and_is_logged() {
    let lab = Lab::start_with(LabOptions {
        transfer_delay: None,
        ..LabOptions::furnaces(2)
    })
    .await;
    let spec = pb::ExperimentSpec {
        name: "move me".into(),
        sample_id: "S-MOVE".into(),
        steps: vec![
            pb::Step {
                device_id: "furnace-1".into(),
                ..furnace_step(vec![step_to(50.0)])
            },
            pb::Step {
                device_id: "furnace-2".into(),
                ..furnace_step(vec![step_to(50.0)])
            },
        ],
        ..Default::default()
    };
    let ids = submit(&lab, "transfer", vec![spec]).await;
    let mut s = stream(&lab).await;
    let mut ev = Vec::new();
    read_until(&mut s, &mut ev, |ev| {
        ev.iter()
            .any(|e| is(&e.kind, |k| matches!(k, Kind::TransferRequested(_))))
    })
    .await;
    let mut q = lab.queue().await;
    let pending = q
        .list_transfers(pb::ListTransfersRequest {})
        .await
        .unwrap()
        .into_inner()
        .transfers;
    assert_eq!(pending.len(), 1);
    let t = &pending[0];
    assert_eq!(t.experiment_id, ids[0]);
    assert_eq!(t.step_index, 1);
    assert_eq!(
        (
            t.sample_id.as_str(),
            t.from_device_id.as_str(),
            t.to_device_id.as_str()
        ),
        ("S-MOVE", "furnace-1", "furnace-2")
    );
    let e = get(&lab, &ids[0]).await;
    assert_eq!(e.current_step, 1);
    assert!(matches!(
        e.spec.unwrap().steps[1].kind,
        Some(pb::step::Kind::Transfer(_))
    ));
    let confirmed = q
        .confirm_transfer(pb::ConfirmTransferRequest {
            transfer_id: t.id.clone(),
            confirmed_by: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&confirmed, t);
    read_until(&mut s, &mut ev, |ev| finished(ev).contains(&ids[0])).await;
    let e = get(&lab, &ids[0]).await;
    assert_eq!(
        e.state,
        pb::ExperimentState::Succeeded as i32,
        "{}",
        e.message
    );
    let Some(pb::step_result::Result::Transfer(r)) = &e.results[1].result else {
        panic!("no transfer result: {:?}", e.results)
    };
    assert_eq!(r.confirmed_by, "alice");
    assert!(
        q.list_transfers(pb::ListTransfersRequest {})
            .await
            .unwrap()
            .into_inner()
            .transfers
            .is_empty()
    );
    // The log tells the sample's story: reserved, moved, run, released.
    let story: Vec<(&str, &str)> = ev
        .iter()
        .filter(|e| e.experiment_id == ids[0])
        .filter_map(|e| {
            let k = match e.kind.as_ref()? {
                Kind::DeviceReserved(_) => "reserved",
                Kind::DeviceReleased(_) => "released",
                Kind::StepStarted(_) => "started",
                Kind::StepFinished(_) => "finished",
                Kind::TransferRequested(_) => "requested",
                Kind::TransferConfirmed(_) => "confirmed",
                _ => return None,
            };
            Some((e.device_id.as_str(), k))
        })
        .collect();
    assert_eq!(
        story,
        [
            ("furnace-1", "reserved"),
            ("furnace-1", "started"),
            ("furnace-1", "finished"),
            ("furnace-1", "released"),
            ("furnace-2", "reserved"),
            ("furnace-2", "started"),
            ("furnace-2", "requested"),
            ("furnace-2", "confirmed"),
            ("furnace-2", "finished"),
            ("furnace-2", "started"),
            ("furnace-2", "finished"),
            ("furnace-2", "released"),
        ]
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_are_listed_until_cleared_and_acknowledged() {
    let lab = Lab::start(1).await;
    let mut devs = lab.devices().await;
    lab.devlab.furnaces[0].sim.set_sensor_break(true);
    eventually("sensor break alarm listed", || async {
        lab.devices()
            .await
            .list_alarms(pb::ListAlarmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .alarms
            .iter()
            .any(|a| a.code == "sensor_break" && !a.cleared)
    })
    .await;
    let err = devs
        .acknowledge_alarm(pb::AcknowledgeAlarmRequest {
            device_id: "furnace-1".into(),
            code: "no_such_alarm".into(),
            acknowledged_by: "bob".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let a = devs
        .acknowledge_alarm(pb::AcknowledgeAlarmRequest {
            device_id: "furnace-1".into(),
            code: "sensor_break".into(),
            acknowledged_by: "bob".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(a.acknowledged);
    assert_eq!(a.acknowledged_by, "bob");
    // Acknowledged but still active: still listed.
    let listed = devs
        .list_alarms(pb::ListAlarmsRequest {
            device_id: "furnace-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .alarms;
    assert!(
        listed
            .iter()
            .any(|a| a.code == "sensor_break" && a.acknowledged)
    );
    lab.devlab.furnaces[0].sim.set_sensor_break(false);
    eventually("cleared and acknowledged alarm gone", || async {
        !lab.devices()
            .await
            .list_alarms(pb::ListAlarmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .alarms
            .iter()
            .any(|a| a.code == "sensor_break")
    })
    .await;
    let mut s = stream(&lab).await;
    let mut ev = Vec::new();
    read_until(&mut s, &mut ev, |ev| {
        ev.iter().any(|e| is(&e.kind, |k| matches!(k, Kind::AlarmAcknowledged(a) if a.code == "sensor_break" && a.acknowledged_by == "bob")))
    })
    .await;
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_alarm_stays_acknowledged_across_a_restart_and_is_not_raised_again() {
    let mut lab = Lab::start(1).await;
    lab.devlab.furnaces[0].sim.set_sensor_break(true);
    eventually("sensor break alarm listed", || async {
        lab.devices()
            .await
            .list_alarms(pb::ListAlarmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .alarms
            .iter()
            .any(|a| a.code == "sensor_break" && !a.cleared)
    })
    .await;
    lab.devices()
        .await
        .acknowledge_alarm(pb::AcknowledgeAlarmRequest {
            device_id: "furnace-1".into(),
            code: "sensor_break".into(),
            acknowledged_by: "bob".into(),
        })
        .await
        .unwrap();
    lab.restart_daemon().await;
    // Still active, still acknowledged by bob, after the restart.
    let listed = lab
        .devices()
        .await
        .list_alarms(pb::ListAlarmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .alarms;
    let a = listed
        .iter()
        .find(|a| a.code == "sensor_break")
        .expect("still listed");
    assert!(
        a.acknowledged && a.acknowledged_by == "bob" && !a.cleared,
        "{a:?}"
    );
    // The restarted daemon's pollers see the alarm still active and raise nothing: the next
    // event about it is its clearing, once the sensor is fixed.
    lab.devlab.furnaces[0].sim.set_sensor_break(false);
    let mut s = stream(&lab).await;
    let mut ev = Vec::new();
    read_until(&mut s, &mut ev, |ev| {
        ev.iter().any(|e| {
            is(
                &e.kind,
                |k| matches!(k, Kind::Alarm(a) if a.code == "sensor_break" && a.cleared),
            )
        })
    })
    .await;
    let raises = ev
        .iter()
        .filter(|e| {
            is(
                &e.kind,
                |k| matches!(k, Kind::Alarm(a) if a.code == "sensor_break" && !a.cleared),
            )
        })
        .count();
    assert_eq!(raises, 1, "raised once, before the restart only");
    eventually("cleared and acknowledged alarm gone", || async {
        lab.devices()
            .await
            .list_alarms(pb::ListAlarmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .alarms
            .is_empty()
    })
    .await;
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_work_no_configured_device_can_run_any_more_fails_at_start_up_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start_in(dir.path(), 2).await;
    lab.queue()
        .await
        .pause_queue(pb::PauseQueueRequest {
            reason: "reconfiguring".into(),
        })
        .await
        .unwrap();
    let ids = submit(
        &lab,
        "reconfigured",
        vec![
            pin(short("on-2"), "furnace-2"),
            pin(short("on-1"), "furnace-1"),
        ],
    )
    .await;
    lab.stop().await;
    // The lab comes back with one furnace: furnace-2 is gone from the configuration.
    let lab = Lab::start_in(dir.path(), 1).await;
    let gone = get(&lab, &ids[0]).await;
    assert_eq!(gone.state, pb::ExperimentState::Failed as i32, "{gone:?}");
    assert!(
        gone.message.contains("steps[0].device_id") && gone.message.contains("furnace-2"),
        "{}",
        gone.message
    );
    assert_eq!(
        get(&lab, &ids[1]).await.state,
        pb::ExperimentState::Queued as i32,
        "runnable work stays queued"
    );
    let q = queue(&lab).await;
    assert_eq!(q.queued_ids, [ids[1].clone()]);
    let mut s = stream(&lab).await;
    let mut ev = Vec::new();
    read_until(&mut s, &mut ev, |ev| {
        ev.iter()
            .any(|e| state_change(e, &ids[0], pb::ExperimentState::Failed))
    })
    .await;
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_furnace_fault_fails_its_step_with_the_reason_and_frees_the_furnace() {
    let lab = Lab::start(1).await;
    let mut ids = submit(&lab, "fault", vec![long("doomed")]).await;
    let mut s = stream(&lab).await;
    let mut ev = Vec::new();
    read_until(&mut s, &mut ev, |ev| holding(ev, &ids[0])).await;
    lab.devlab.furnaces[0].sim.set_heater_fail(true);
    read_until(&mut s, &mut ev, |ev| finished(ev).contains(&ids[0])).await;
    let e = get(&lab, &ids[0]).await;
    assert_eq!(e.state, pb::ExperimentState::Failed as i32);
    assert!(e.message.contains("heater fail"), "{}", e.message);
    assert_furnace_safe(&lab, 0);
    // Repaired: the freed furnace takes the next experiment.
    lab.devlab.furnaces[0].sim.set_heater_fail(false);
    ids.extend(submit(&lab, "fault-next", vec![short("next")]).await);
    read_until(&mut s, &mut ev, |ev| finished(ev).contains(&ids[1])).await;
    assert_eq!(
        get(&lab, &ids[1]).await.state,
        pb::ExperimentState::Succeeded as i32
    );
    lab.stop().await;
}
