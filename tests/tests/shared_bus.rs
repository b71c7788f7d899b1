//! Two furnaces on one Modbus RTU line, end to end: planner → gRPC → daemon → one shared bus →
//! simulated controllers (units 1 and 2) on one pty at 19200 baud. One controller is unplugged
//! mid-program: only its experiment fails and only it shows disconnected, while its neighbour's
//! program completes over the same line.

use ppu_proto::v1 as pb;
use ppu_tests::*;

use pb::event::Kind;

fn on(device: &str, name: &str, hold_s: f64) -> pb::ExperimentSpec {
    let mut e = furnace_experiment(name, vec![step_to(60.0), hold(hold_s)]);
    for s in &mut e.steps {
        s.device_id = device.into();
    }
    e
}

fn holding(ev: &[pb::Event], id: &str) -> bool {
    ev.iter().any(|e| {
        e.experiment_id == id
            && matches!(&e.kind, Some(Kind::StepProgress(p)) if p.message.contains("hold"))
    })
}

fn went_down(ev: &[pb::Event], device: &str) -> bool {
    ev.iter().any(|e| {
        e.device_id == device
            && matches!(&e.kind, Some(Kind::DeviceConnectionChanged(c))
                if c.state == pb::ConnectionState::Disconnected as i32)
    })
}

async fn connection(lab: &Lab, id: &str) -> i32 {
    lab.devices()
        .await
        .get_device(pb::GetDeviceRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .connection
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplugging_one_furnace_on_a_shared_rtu_line_fails_only_its_experiment() {
    let lab = Lab::start_with(LabOptions {
        furnace_line: Some(19_200),
        ..LabOptions::furnaces(2)
    })
    .await;
    // Both furnaces are reached through the one bus.
    let devices = lab
        .devices()
        .await
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    for (id, unit) in [("furnace-1", 1), ("furnace-2", 2)] {
        let d = devices.iter().find(|d| d.id == id).expect("configured");
        assert!(
            d.transport.starts_with("modbus-rtu://")
                && d.transport.ends_with(&format!("unit {unit}")),
            "{}",
            d.transport
        );
    }

    let mut stream = lab
        .events()
        .await
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // At 2000x: furnace-1 holds 3 s real; furnace-2's hold would take 50 s, far beyond the
    // unplug and the driver's outage grace.
    let ids = lab
        .experiments()
        .await
        .submit_batch(batch(
            "shared-line",
            vec![
                on("furnace-1", "stays", 6000.0),
                on("furnace-2", "unplugged", 100_000.0),
            ],
        ))
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .experiment_ids;
    let mut ev = Vec::new();
    read_until(&mut stream, &mut ev, |ev| {
        holding(ev, &ids[0]) && holding(ev, &ids[1])
    })
    .await;

    // Unit 2 stops answering on the line; unit 1 and the line itself stay.
    lab.devlab.furnaces[1].sim.set_silent(true);
    read_until(&mut stream, &mut ev, |ev| {
        let done = finished(ev);
        done.contains(&ids[0]) && done.contains(&ids[1])
    })
    .await;

    let get = |id: String| {
        let lab = &lab;
        async move {
            lab.experiments()
                .await
                .get_experiment(pb::GetExperimentRequest { id })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let stays = get(ids[0].clone()).await;
    let unplugged = get(ids[1].clone()).await;
    assert_eq!(
        stays.state,
        pb::ExperimentState::Succeeded as i32,
        "{stays:?}"
    );
    assert_eq!(
        unplugged.state,
        pb::ExperimentState::Failed as i32,
        "{unplugged:?}"
    );
    // The failure names the unit that went silent, not the line.
    let step_failure = ev
        .iter()
        .find_map(|e| match &e.kind {
            Some(Kind::StepFinished(f)) if e.experiment_id == ids[1] => f.result.clone(),
            _ => None,
        })
        .expect("furnace-2's step finished");
    assert!(step_failure.message.contains("unit 2"), "{step_failure:?}");

    // Only furnace-2 went down; furnace-1 stayed connected all along and still is.
    eventually("furnace-2 shows disconnected", || async {
        connection(&lab, "furnace-2").await == pb::ConnectionState::Disconnected as i32
    })
    .await;
    assert!(
        went_down(&ev, "furnace-2")
            || connection(&lab, "furnace-2").await != pb::ConnectionState::Connected as i32
    );
    assert!(!went_down(&ev, "furnace-1"), "furnace-1 never went down");
    assert_eq!(
        connection(&lab, "furnace-1").await,
        pb::ConnectionState::Connected as i32
    );
    // No alarm was raised for furnace-1.
    assert!(
        !ev.iter()
            .any(|e| e.device_id == "furnace-1" && matches!(e.kind, Some(Kind::Alarm(_)))),
        "no alarm for furnace-1"
    );
    // Only furnace-2, whose link was lost mid-step, was alarmed.
    let alarms = alarm_events(&ev, "furnace-2");
    assert!(has_alarm(&alarms, "link_lost", false), "{alarms:?}");
    // furnace-1 ended its program in its safe state, over the shared line.
    let snap = lab.devlab.furnaces[0].sim.snapshot();
    assert_eq!(snap.target_sp_c, 25.0, "{snap:?}");

    // Plugged back in, furnace-2 comes back on the same line.
    lab.devlab.furnaces[1].sim.set_silent(false);
    eventually("furnace-2 reconnects", || async {
        connection(&lab, "furnace-2").await == pb::ConnectionState::Connected as i32
    })
    .await;
    lab.stop().await;
}
