//! End to end, as `ppud dev` runs it: the daemon, a simulated furnace (Modbus TCP) and a
//! simulated sorption analyser whose bridge is a separate client of the embedded MQTT broker,
//! with the simulated robot carrying the sample between them.

use std::sync::Arc;
use std::time::Duration;

use pb::event::Kind;
use ppu_daemon::app::Daemon;
use ppu_daemon::config::Policies;
use ppu_daemon::dev::{DevLab, TransferRobot};
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use ppu_tests::{
    DEADLINE, TEST_POLL, TEST_TIME_SCALE, batch, eventually, furnace_step, hold, ramp, read_until,
};
use tonic::Code;

const PRESSURES: [f64; 10] = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.4, 0.6, 0.8, 1.0];

struct AnalyserLab {
    daemon: Option<Daemon>,
    devlab: Arc<DevLab>,
    robot: Option<TransferRobot>,
    _tmp: tempfile::TempDir,
}

impl AnalyserLab {
    async fn start() -> AnalyserLab {
        let tmp = tempfile::tempdir().expect("tempdir");
        let clock = Clock::new(TEST_TIME_SCALE);
        let mut devlab = DevLab::start(clock, 1).await.expect("simulated lab");
        devlab
            .add_dispensing_station()
            .await
            .expect("simulated dispensing station");
        devlab.add_analysers(1).await.expect("simulated analyser");
        let daemon = devlab
            .start_daemon(
                "127.0.0.1:0".parse().expect("addr"),
                tmp.path(),
                TEST_POLL,
                &Policies::default(),
            )
            .await
            .expect("daemon starts");
        let devlab = Arc::new(devlab);
        let robot = TransferRobot::start(
            devlab.clone(),
            daemon.scheduler().clone(),
            Duration::from_millis(20),
        );
        AnalyserLab {
            daemon: Some(daemon),
            devlab,
            robot: Some(robot),
            _tmp: tmp,
        }
    }

    async fn channel(&self) -> tonic::transport::Channel {
        let addr = self.daemon.as_ref().expect("running").addr();
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    async fn stop(mut self) {
        if let Some(r) = self.robot.take() {
            r.stop().await;
        }
        if let Some(d) = self.daemon.take() {
            d.shutdown().await;
        }
        for a in &self.devlab.analysers {
            a.sim.shutdown().await;
        }
    }
}

fn isotherm_step(pressures: &[f64]) -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Isotherm(pb::Isotherm {
            adsorptive: "CO2".into(),
            temperature_c: 25.0,
            pressure_bar: pressures.to_vec(),
            equilibration_interval_s: 10.0,
            max_equilibration_s: 3600.0,
            sample_mass_g: 0.1,
        })),
    }
}

fn degas_step() -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Degas(pb::Degas {
            temperature_c: 250.0,
            duration_s: 2.0 * 3600.0,
        })),
    }
}

fn dispense_step(reagent: &str, volume_ml: f64) -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Dispense(pb::Dispense {
            reagent: reagent.into(),
            volume_ml,
            rate_ml_per_min: 5.0,
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispense_furnace_then_isotherm_ends_with_an_isotherm_result_in_the_record_and_the_stream()
{
    let lab = AnalyserLab::start().await;
    let ch = lab.channel().await;
    let mut experiments = pb::experiment_service_client::ExperimentServiceClient::new(ch.clone());
    let mut events = pb::event_service_client::EventServiceClient::new(ch.clone());
    let mut stream = events
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .expect("stream")
        .into_inner();
    let spec = pb::ExperimentSpec {
        name: "calcine and measure".into(),
        sample_id: "S-e2e-1".into(),
        steps: vec![
            dispense_step("A", 1.0),
            dispense_step("B", 2.0),
            furnace_step(vec![ramp(350.0, 20.0), hold(3600.0), ramp(60.0, 20.0)]),
            degas_step(),
            isotherm_step(&PRESSURES),
        ],
        ..Default::default()
    };
    let b = experiments
        .submit_batch(batch("isotherm-e2e", vec![spec]))
        .await
        .expect("accepted")
        .into_inner()
        .batch
        .expect("batch");
    let id = b.experiment_ids[0].clone();
    let mut seen = Vec::new();
    read_until(&mut stream, &mut seen, |ev| {
        ev.iter().any(|e| {
            e.experiment_id == id
                && matches!(&e.kind, Some(Kind::ExperimentStateChanged(c)) if ppu_tests::is_terminal(c.to))
        })
    })
    .await;
    let e = experiments
        .get_experiment(pb::GetExperimentRequest { id: id.clone() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        e.state,
        pb::ExperimentState::Succeeded as i32,
        "{}",
        e.message
    );

    // The record holds the typed result.
    let iso = ppu_tests::isotherm_result(&e).expect("an isotherm result");
    assert_eq!(iso.points.len(), PRESSURES.len());
    assert_eq!((iso.adsorptive.as_str(), iso.sample_mass_g), ("CO2", 0.1));
    assert_eq!(
        (iso.degas_temperature_c, iso.degas_duration_s),
        (250.0, 7200.0)
    );
    assert!(
        iso.points
            .windows(2)
            .all(|w| w[1].pressure_bar > w[0].pressure_bar)
    );
    assert!(
        iso.points
            .windows(2)
            .all(|w| w[1].amount_mmol_per_g > w[0].amount_mmol_per_g)
    );

    // The stream carried each point as it was measured, in order, then the same result.
    let points: Vec<(u32, pb::IsothermPoint)> = seen
        .iter()
        .filter(|ev| ev.experiment_id == id)
        .filter_map(|ev| match &ev.kind {
            Some(Kind::IsothermPointMeasured(p)) => Some((p.point_index, p.point.expect("point"))),
            _ => None,
        })
        .collect();
    assert_eq!(
        points.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..PRESSURES.len() as u32).collect::<Vec<_>>()
    );
    assert!(points.iter().zip(&iso.points).all(|((_, a), b)| a == b));
    let streamed = seen
        .iter()
        .filter(|ev| ev.experiment_id == id)
        .find_map(|ev| match &ev.kind {
            Some(Kind::StepFinished(f)) => {
                match f.result.as_ref().and_then(|r| r.result.as_ref()) {
                    Some(pb::step_result::Result::Isotherm(i)) => Some(i.clone()),
                    _ => None,
                }
            }
            _ => None,
        })
        .expect("StepFinished with the isotherm");
    assert_eq!(streamed, iso);

    // The world saw the sample's synthesis (the robot carried it to pump-b and into the
    // furnace), so the material model had something to work with. (The first step needs no
    // transfer, so nothing tells the world where the sample starts: pump-a's dispense is not
    // attributed to it.)
    let history = lab
        .devlab
        .world
        .history("S-e2e-1")
        .expect("sample known to the world");
    assert!(
        history.peak_c().is_some_and(|t| t > 300.0),
        "{:?}",
        history.peak_c()
    );
    assert_eq!(history.degas, Some((250.0, 7200.0)));
    let b = history.dispensed_ml.get("B").copied().unwrap_or(0.0);
    assert!((b - 2.0).abs() < 0.05, "{:?}", history.dispensed_ml);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_isotherm_pressures_are_invalid_arguments_naming_the_field() {
    let lab = AnalyserLab::start().await;
    let mut experiments =
        pb::experiment_service_client::ExperimentServiceClient::new(lab.channel().await);
    for (pressures, field, why) in [
        (vec![0.1, 0.05, 0.2], "pressure_bar[1]", "previous"),
        (vec![0.1, -0.2], "pressure_bar[1]", "greater than 0"),
        (
            vec![0.1, 0.5, 2.0],
            "pressure_bar[2]",
            "max_pressure_bar 1.1",
        ),
    ] {
        let spec = pb::ExperimentSpec {
            name: "bad".into(),
            sample_id: "S-bad".into(),
            steps: vec![isotherm_step(&pressures)],
            ..Default::default()
        };
        let err = experiments
            .submit_batch(batch(&format!("bad-{field}-{why}"), vec![spec]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message()
                .contains(&format!("experiments[0].steps[0].isotherm.{field}"))
                && err.message().contains(why),
            "{}",
            err.message()
        );
    }
    lab.stop().await;
}

/// What the bridge would refuse hours into a run (an adsorptive it has no gas for, a bath
/// temperature out of range) is refused at submission, naming the field and what is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_the_analyser_would_refuse_are_refused_at_submission() {
    let lab = AnalyserLab::start().await;
    let ch = lab.channel().await;
    let mut experiments = pb::experiment_service_client::ExperimentServiceClient::new(ch.clone());
    let isotherm = |adsorptive: &str, temperature_c: f64| {
        let mut step = isotherm_step(&PRESSURES);
        if let Some(pb::step::Kind::Isotherm(i)) = &mut step.kind {
            i.adsorptive = adsorptive.into();
            i.temperature_c = temperature_c;
        }
        step
    };
    for (step, field, why) in [
        (
            isotherm("XENON-999", 25.0),
            "experiments[0].steps[1].isotherm.adsorptive",
            "\"XENON-999\" is not accepted by any device with capability isotherm \
             (analyser-1 accepts CO2, N2)",
        ),
        (
            isotherm("CO2", 500.0),
            "experiments[0].steps[1].isotherm.temperature_c",
            "max_isotherm_temperature_c 100",
        ),
    ] {
        let spec = pb::ExperimentSpec {
            name: "refused".into(),
            sample_id: "S-refused".into(),
            steps: vec![degas_step(), step],
            ..Default::default()
        };
        let err = experiments
            .submit_batch(batch(&format!("refused-{field}"), vec![spec]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(
            err.metadata()
                .get("ppu-field-path")
                .and_then(|v| v.to_str().ok()),
            Some(field),
            "{err:?}"
        );
        assert!(err.message().contains(why), "{}", err.message());
    }
    // The declaration is visible to clients.
    let list = pb::device_service_client::DeviceServiceClient::new(ch)
        .list_devices(pb::ListDevicesRequest {})
        .await
        .expect("list")
        .into_inner();
    let analyser = list
        .devices
        .iter()
        .find(|d| d.id == "analyser-1")
        .expect("analyser-1 listed");
    let accepted = analyser
        .limits
        .as_ref()
        .and_then(|l| l.accepted.get("adsorptive"))
        .map(|a| a.values.clone());
    assert_eq!(accepted, Some(vec!["CO2".to_owned(), "N2".to_owned()]));
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analyser_shows_disconnected_when_its_bridge_goes_and_faulty_when_it_babbles() {
    let lab = AnalyserLab::start().await;
    let ch = lab.channel().await;
    let mut devices = pb::device_service_client::DeviceServiceClient::new(ch.clone());
    let state = |d: &pb::Device| d.connection;
    let analyser = |list: pb::ListDevicesResponse| {
        list.devices
            .into_iter()
            .find(|d| d.id == "analyser-1")
            .expect("analyser-1 listed")
    };
    let d = analyser(
        devices
            .list_devices(pb::ListDevicesRequest {})
            .await
            .expect("list")
            .into_inner(),
    );
    assert_eq!(d.family, pb::DeviceFamily::Analyser as i32);
    assert_eq!(d.driver, "sorption_mqtt");
    assert_eq!(
        d.limits.as_ref().and_then(|l| l.max_pressure_bar),
        Some(1.1)
    );

    let sim = lab.devlab.analysers[0].sim.clone();
    eventually("analyser connected", || {
        let mut devices = devices.clone();
        async move {
            let d = analyser(
                devices
                    .list_devices(pb::ListDevicesRequest {})
                    .await
                    .expect("list")
                    .into_inner(),
            );
            state(&d) == pb::ConnectionState::Connected as i32
        }
    })
    .await;
    sim.go_offline();
    eventually("analyser disconnected", || {
        let mut devices = devices.clone();
        async move {
            let d = analyser(
                devices
                    .list_devices(pb::ListDevicesRequest {})
                    .await
                    .expect("list")
                    .into_inner(),
            );
            state(&d) == pb::ConnectionState::Disconnected as i32
                && d.connection_error.contains("offline")
        }
    })
    .await;
    sim.come_online();

    // A bridge that keeps sending garbage raises a durable alarm on the device.
    let mut events = pb::event_service_client::EventServiceClient::new(ch.clone());
    let mut stream = events
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .expect("stream")
        .into_inner();
    sim.set_malformed_telemetry(true);
    let mut seen = Vec::new();
    read_until(&mut stream, &mut seen, |ev| {
        ev.iter().any(|e| {
            e.device_id == "analyser-1"
                && matches!(&e.kind, Some(Kind::Alarm(a)) if a.message == ppu_drivers::analyser::sorption::FAULTY_ALARM && !a.cleared)
        })
    })
    .await;
    let _ = DEADLINE;
    sim.set_malformed_telemetry(false);
    lab.stop().await;
}
