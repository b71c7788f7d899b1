//! Safety chaos: a device fails mid-step in the ways real ones do (a frozen controller, a
//! controller power-cycled to its power-up setpoint, a pump unplugged mid-dispense, the MQTT
//! broker restarted mid-isotherm). After each the step's outcome says what happened, the device
//! ends in its safe state as the SIMULATOR reads it (registers, snapshot, bridge state), the
//! daemon's alarms were raised and recorded, and nothing was lost (every submitted experiment
//! is listed, the event log is gapless from 1). The link cut mid-hold is in `safety.rs`.

use ppu_daemon::config::DeviceConfig;
use ppu_drivers::analyser::sorption::config::SorptionMqttEntry;
use ppu_proto::v1 as pb;
use ppu_tests::*;

/// Target setpoint register of a Eurotherm 2000 (one decimal place).
const TARGET_SP_REGISTER: u16 = 2;
/// Setpoint rate limit register; 0 is off.
const RATE_LIMIT_REGISTER: u16 = 35;
/// Auto (0) / manual (1) register.
const AUTO_MANUAL_REGISTER: u16 = 273;
/// The safe setpoint ppud's furnaces are configured with, °C.
const SAFE_SETPOINT_C: f64 = 25.0;
/// How far the simulated furnace's PV may overshoot a ramp's end, °C: the model's own bound
/// (`simulator/src/furnace/tests.rs`, `ramps_from_1_to_20_per_min_overshoot_little`). The
/// driver reports the hold as soon as PV is within its tolerance, which can be at the peak.
const RAMP_END_OVERSHOOT_C: f64 = 5.0;

/// The experiment `id` once it is terminal, with the events up to then in `events`.
async fn finished_experiment(
    lab: &Lab,
    stream: &mut tonic::Streaming<pb::Event>,
    events: &mut Vec<pb::Event>,
    id: &str,
) -> pb::Experiment {
    read_until(stream, events, |ev| finished(ev).iter().any(|f| f == id)).await;
    lab.experiments()
        .await
        .get_experiment(pb::GetExperimentRequest { id: id.to_owned() })
        .await
        .expect("get")
        .into_inner()
}

/// Asserts the experiment failed in its first step; returns that step's message.
fn failed_step_message(e: &pb::Experiment) -> String {
    assert_eq!(e.state, pb::ExperimentState::Failed as i32, "{}", e.message);
    let step = e.results.first().expect("a step result");
    assert_eq!(
        step.outcome,
        pb::StepOutcome::Failed as i32,
        "{}",
        step.message
    );
    step.message.clone()
}

/// Asserts nothing was lost: `ids` are listed and `events` (read from the start) are gapless.
async fn assert_nothing_lost(lab: &Lab, ids: &[&str], events: &[pb::Event]) {
    let listed = lab.all_experiments().await;
    for id in ids {
        assert!(listed.contains_key(*id), "experiment {id} is not listed");
    }
    assert_gapless(events);
}

/// Reads until `device`'s daemon alarms `codes` were raised and then cleared, in that order.
async fn read_until_alarms_cleared(
    stream: &mut tonic::Streaming<pb::Event>,
    events: &mut Vec<pb::Event>,
    device: &str,
    codes: &[&str],
) {
    read_until(stream, events, |ev| {
        let a = alarm_events(ev, device);
        codes.iter().all(|code| {
            let raised = a.iter().position(|(c, cl, _)| c == code && !cl);
            let cleared = a.iter().rposition(|(c, cl, _)| c == code && *cl);
            matches!((raised, cleared), (Some(r), Some(c)) if r < c)
        })
    })
    .await;
}

/// A furnace program holding at 150 °C far longer than any scenario (~70 s real at 2000×).
fn long_hold() -> pb::ExperimentSpec {
    furnace_experiment("hold", vec![ramp(150.0, 20.0), hold(40.0 * 3600.0)])
}

/// Reads until the driver reports the hold of [`long_hold`] (so the ramp is done), and checks
/// that the simulated furnace is there.
async fn read_until_holding(
    stream: &mut tonic::Streaming<pb::Event>,
    events: &mut Vec<pb::Event>,
    furnace: &ppu_sim::furnace::SimFurnace,
) {
    read_until(stream, events, |ev| {
        ev.iter().any(|e| {
            matches!(&e.kind, Some(pb::event::Kind::StepProgress(p))
                if p.message.starts_with("segment 2/2: hold"))
        })
    })
    .await;
    let s = furnace.snapshot();
    assert_eq!(s.target_sp_c, 150.0);
    assert!(
        (s.pv_c - 150.0).abs() < RAMP_END_OVERSHOOT_C,
        "PV {}",
        s.pv_c
    );
}

/// The furnace's safe state as its registers hold it: target setpoint at the safe value,
/// rate limit off, automatic mode.
fn assert_furnace_safe(furnace: &ppu_sim::furnace::SimFurnace) {
    let word = |reg| furnace.read_registers(reg, 1).expect("register")[0];
    assert_eq!(
        f64::from(word(TARGET_SP_REGISTER) as i16) / 10.0,
        SAFE_SETPOINT_C,
        "target setpoint register"
    );
    assert_eq!(word(RATE_LIMIT_REGISTER), 0, "rate limit register");
    assert_eq!(word(AUTO_MANUAL_REGISTER), 0, "auto/manual register");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_frozen_mid_hold_fails_the_step_naming_the_outage_and_is_made_safe_when_it_thaws()
 {
    let lab = Lab::start(1).await;
    let furnace = lab.devlab.furnaces[0].sim.clone();
    let mut stream = lab.event_stream().await;
    let mut events = Vec::new();
    let id = lab.submit("frozen", long_hold()).await;
    read_until_holding(&mut stream, &mut events, &furnace).await;

    // Frozen: the connection stays open, nothing answers; it keeps regulating on its own.
    furnace.set_silent(true);
    let e = finished_experiment(&lab, &mut stream, &mut events, &id).await;
    let why = failed_step_message(&e);
    assert!(
        why.contains("unreachable for") && why.contains("(grace 10 s) during segment 2 (hold)"),
        "the failure names the outage, its length and where: {why}"
    );
    eventually("furnace-1 unsafe while frozen", || async {
        lab.device("furnace-1").await.r#unsafe
    })
    .await;
    assert_eq!(furnace.snapshot().target_sp_c, 150.0, "still holding");

    furnace.set_silent(false);
    read_until_alarms_cleared(
        &mut stream,
        &mut events,
        "furnace-1",
        &["link_lost", "safe_state_pending"],
    )
    .await;
    assert_furnace_safe(&furnace);
    assert!(!lab.device("furnace-1").await.r#unsafe);
    assert!(lab.alarms("furnace-1").await.iter().all(|a| a.cleared));
    assert_nothing_lost(&lab, &[&id], &events).await;
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restarted_mid_hold_fails_the_step_instead_of_holding_its_power_up_setpoint() {
    let lab = Lab::start(1).await;
    let furnace = lab.devlab.furnaces[0].sim.clone();
    let mut stream = lab.event_stream().await;
    let mut events = Vec::new();
    let id = lab.submit("restarted", long_hold()).await;
    read_until_holding(&mut stream, &mut events, &furnace).await;
    // Leave the controller in a state its safe state must undo: manual mode is not a
    // power-up value, but a rate limit is kept in its configuration.
    furnace
        .write_register(RATE_LIMIT_REGISTER, 200)
        .expect("rate limit");

    furnace.power_cycle();
    assert_eq!(furnace.snapshot().target_sp_c, 25.0, "power-up setpoint");
    let e = finished_experiment(&lab, &mut stream, &mut events, &id).await;
    let why = failed_step_message(&e);
    assert!(
        why.contains(
            "controller restarted or overridden: target setpoint is 25.0 °C, \
             the program holds 150.0 °C"
        ),
        "{why}"
    );
    // The scheduler drove it safe and read it back: nothing unsafe.
    eventually("furnace-1 safe after the restart", || async {
        let word = furnace.read_registers(RATE_LIMIT_REGISTER, 1).expect("reg");
        word[0] == 0 && !lab.device("furnace-1").await.r#unsafe
    })
    .await;
    assert_furnace_safe(&furnace);
    assert!(
        lab.alarms("furnace-1")
            .await
            .iter()
            .all(|a| a.cleared || a.code != "safe_state_pending")
    );
    // The controller has no status bit for a restart: the driver reports the dropped setpoint
    // as an alarm, listed and logged until a technician acknowledges it.
    eventually("the setpoint_overridden alarm listed", || async {
        lab.alarms("furnace-1")
            .await
            .iter()
            .any(|a| a.code == "setpoint_overridden" && !a.acknowledged)
    })
    .await;
    let mut stream = lab.event_stream().await;
    let mut logged = Vec::new();
    read_until(&mut stream, &mut logged, |ev| {
        has_alarm(&alarm_events(ev, "furnace-1"), "setpoint_overridden", false)
    })
    .await;
    assert_nothing_lost(&lab, &[&id], &events).await;
    lab.stop().await;
}

fn dispense(reagent: &str, volume_ml: f64, rate_ml_per_min: f64) -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: "dispense".into(),
        sample_id: "S-dispense".into(),
        steps: vec![pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Dispense(pb::Dispense {
                reagent: reagent.to_owned(),
                volume_ml,
                rate_ml_per_min,
            })),
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pump_unplugged_mid_dispense_fails_the_step_and_is_stopped_when_plugged_back() {
    // Real time: the 5 mL dispense at 1 mL/min would run for 5 minutes, so the pump is still
    // pumping on its own when it is plugged back, and only ppud's STP stops it.
    let lab = Lab::start_with(LabOptions {
        dispensing: true,
        time_scale: 1.0,
        ..LabOptions::furnaces(0)
    })
    .await;
    let station = lab.devlab.dispensing.as_ref().expect("station");
    let pump = station.pump("pump-a").expect("pump-a");
    let mut stream = lab.event_stream().await;
    let mut events = Vec::new();
    let id = lab.submit("unplugged", dispense("A", 5.0, 1.0)).await;
    eventually("pump-a dispensing", || async {
        pump.sim.snapshot().running
    })
    .await;

    pump.set_unplugged(true);
    let e = finished_experiment(&lab, &mut stream, &mut events, &id).await;
    let why = failed_step_message(&e).to_lowercase();
    assert!(
        ["timeout", "timed out", "no reply", "link", "unreachable"]
            .iter()
            .any(|w| why.contains(w)),
        "the failure does not say the link was lost: {why}"
    );
    read_until(&mut stream, &mut events, |ev| {
        let a = alarm_events(ev, "pump-a");
        has_alarm(&a, "link_lost", false) && has_alarm(&a, "safe_state_pending", false)
    })
    .await;
    assert!(pump.sim.snapshot().running, "unplugged, it pumps on");
    assert!(lab.device("pump-a").await.r#unsafe);

    pump.set_unplugged(false);
    read_until_alarms_cleared(
        &mut stream,
        &mut events,
        "pump-a",
        &["link_lost", "safe_state_pending"],
    )
    .await;
    let s = pump.sim.snapshot();
    assert!(!s.running, "the pump is stopped: {s:?}");
    assert!(
        s.delivered_ml < 5.0,
        "stopped by ppud, not by the end: {s:?}"
    );
    assert!(!lab.device("pump-a").await.r#unsafe);
    assert_nothing_lost(&lab, &[&id], &events).await;
    lab.stop().await;
}

/// The analyser's outage grace in the broker test, s: short, so the outage outlasts it quickly.
const ANALYSER_GRACE_S: u64 = 2;

fn short_analyser_grace(d: &mut DeviceConfig) {
    if let Some(e) = d.downcast_mut::<SorptionMqttEntry>() {
        e.outage_grace_s = ANALYSER_GRACE_S;
    }
}

/// Reads until the first isotherm point: the bridge accepted the run and the driver follows it.
async fn read_until_first_point(
    stream: &mut tonic::Streaming<pb::Event>,
    events: &mut Vec<pb::Event>,
) {
    read_until(stream, events, |ev| {
        ev.iter()
            .any(|e| matches!(e.kind, Some(pb::event::Kind::IsothermPointMeasured(_))))
    })
    .await;
}

fn isotherm(points: u32) -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: "isotherm".into(),
        sample_id: "S-isotherm".into(),
        steps: vec![pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Isotherm(pb::Isotherm {
                adsorptive: "CO2".into(),
                temperature_c: 25.0,
                pressure_bar: (1..=points)
                    .map(|i| f64::from(i) / f64::from(points))
                    .collect(),
                equilibration_interval_s: 10.0,
                max_equilibration_s: 3600.0,
                sample_mass_g: 0.1,
            })),
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_mid_isotherm_for_longer_than_the_grace_fails_the_step_and_aborts_the_run() {
    // 200× real time: the isotherm outlasts the outage, so only ppud's abort ends it.
    let lab = Lab::start_with(LabOptions {
        analysers: 1,
        time_scale: 200.0,
        adjust_device: short_analyser_grace,
        ..LabOptions::furnaces(0)
    })
    .await;
    let analyser = lab.devlab.analysers[0].sim.clone();
    let broker = lab.devlab.broker.as_ref().expect("broker");
    let mut stream = lab.event_stream().await;
    let mut events = Vec::new();
    // Many points, so the run outlasts the outage by far.
    let id = lab.submit("broker", isotherm(40)).await;
    read_until_first_point(&mut stream, &mut events).await;
    assert!(analyser.is_busy());

    broker.go_down().await;
    let e = finished_experiment(&lab, &mut stream, &mut events, &id).await;
    let why = failed_step_message(&e);
    assert!(
        why.contains(&format!(
            "broker unreachable (I/O: Connection refused (os error 111)) for {ANALYSER_GRACE_S} s \
             during isotherm"
        )),
        "the failure names the outage and the grace: {why}"
    );
    read_until(&mut stream, &mut events, |ev| {
        let a = alarm_events(ev, "analyser-1");
        has_alarm(&a, "link_lost", false) && has_alarm(&a, "safe_state_pending", false)
    })
    .await;
    assert!(analyser.is_busy(), "cut off, the bridge measures on");

    broker.come_up().await.expect("broker back");
    read_until_alarms_cleared(
        &mut stream,
        &mut events,
        "analyser-1",
        &["link_lost", "safe_state_pending"],
    )
    .await;
    assert!(!analyser.is_busy(), "the bridge aborted the run");
    assert!(!lab.device("analyser-1").await.r#unsafe);
    assert_nothing_lost(&lab, &[&id], &events).await;
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_isotherm_within_the_grace_is_ridden_out_and_loses_no_point() {
    let lab = Lab::start_with(LabOptions {
        analysers: 1,
        ..LabOptions::furnaces(0)
    })
    .await;
    let broker = lab.devlab.broker.as_ref().expect("broker");
    let mut stream = lab.event_stream().await;
    let mut events = Vec::new();
    let id = lab.submit("broker-restart", isotherm(10)).await;
    read_until_first_point(&mut stream, &mut events).await;

    // Down until the daemon has noticed (its alarm is the proof), then straight back up:
    // well within the default 30 s grace.
    broker.go_down().await;
    read_until(&mut stream, &mut events, |ev| {
        has_alarm(&alarm_events(ev, "analyser-1"), "link_lost", false)
    })
    .await;
    broker.come_up().await.expect("broker back");
    let e = finished_experiment(&lab, &mut stream, &mut events, &id).await;
    assert_eq!(
        e.state,
        pb::ExperimentState::Succeeded as i32,
        "{}",
        e.message
    );
    let iso = isotherm_result(&e).expect("an isotherm result");
    assert_eq!(
        iso.points.len(),
        10,
        "every point, replayed after the outage"
    );
    read_until_alarms_cleared(&mut stream, &mut events, "analyser-1", &["link_lost"]).await;
    let a = alarm_events(&events, "analyser-1");
    assert!(
        !has_alarm(&a, "safe_state_pending", false),
        "no safe state was needed: {a:?}"
    );
    assert!(!lab.devlab.analysers[0].sim.is_busy());
    assert_nothing_lost(&lab, &[&id], &events).await;
    lab.stop().await;
}
