//! Safe state that survives outages: a furnace must not be left heating after a link outage.
//!
//! The simulated Eurotherm keeps regulating at its setpoint while silent (as a real controller
//! does on its own), so only ppud writing the safe setpoint after the link returns, and reading
//! it back, brings the furnace down.

use ppu_proto::v1 as pb;
use ppu_tests::*;

/// Target setpoint register of a Eurotherm 2000 (one decimal place).
const TARGET_SP_REGISTER: u16 = 2;
/// The safe setpoint ppud's furnaces are configured with, °C.
const SAFE_SETPOINT_C: f64 = 25.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_mid_hold_leaves_the_furnace_unsafe_until_the_reconnect_confirms_it_safe() {
    let lab = Lab::start(1).await;
    let furnace = &lab.devlab.furnaces[0];
    let mut exps = lab.experiments().await;
    // 150 °C, then a hold far longer than the outage (40 h physical: ~70 s real at 2000×).
    let spec = furnace_experiment("hold", vec![ramp(150.0, 20.0), hold(40.0 * 3600.0)]);
    let id = exps
        .submit_batch(batch("outage", vec![spec]))
        .await
        .expect("submit")
        .into_inner()
        .batch
        .expect("batch")
        .experiment_ids[0]
        .clone();
    let mut stream = lab
        .events()
        .await
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .expect("stream")
        .into_inner();
    let mut events = Vec::new();

    // Mid-hold: the setpoint is at 150 °C and the furnace has reached it.
    eventually("the furnace holding at 150 °C", || async {
        let s = furnace.sim.snapshot();
        s.target_sp_c == 150.0 && (s.pv_c - 150.0).abs() < 3.0
    })
    .await;

    // Cut the link; the controller keeps its setpoint and keeps heating.
    furnace.sim.set_silent(true);
    read_until(&mut stream, &mut events, |ev| finished(ev).contains(&id)).await;
    let e = exps
        .get_experiment(pb::GetExperimentRequest { id: id.clone() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(e.state, pb::ExperimentState::Failed as i32, "{}", e.message);
    let step = &e.results[0];
    assert_eq!(step.outcome, pb::StepOutcome::Failed as i32);
    let why = step.message.to_lowercase();
    assert!(
        ["timeout", "disconnected", "unreachable", "outage"]
            .iter()
            .any(|w| why.contains(w)),
        "the step's failure does not name the outage: {}",
        step.message
    );

    // While the link is down the furnace is unsafe, visibly and in the metrics' source.
    eventually("furnace-1 listed unsafe", || async {
        lab.device("furnace-1").await.r#unsafe
    })
    .await;
    let d = lab.device("furnace-1").await;
    assert!(
        d.unsafe_reason.contains("safe state"),
        "unsafe reason: {}",
        d.unsafe_reason
    );
    assert_eq!(
        furnace.sim.snapshot().target_sp_c,
        150.0,
        "the silent controller keeps its setpoint"
    );
    let listed = lab.alarms("furnace-1").await;
    for code in ["link_lost", "safe_state_pending"] {
        assert!(
            listed.iter().any(|a| a.code == code && !a.cleared),
            "{code} not active in ListAlarms: {listed:?}"
        );
    }
    let pending = listed
        .iter()
        .find(|a| a.code == "safe_state_pending")
        .expect("listed");
    assert_eq!(pending.severity, pb::AlarmSeverity::Critical as i32);
    read_until(&mut stream, &mut events, |ev| {
        let a = alarm_events(ev, "furnace-1");
        has_alarm(&a, "link_lost", false) && has_alarm(&a, "safe_state_pending", false)
    })
    .await;

    // The link returns: within one reconnect ppud writes the safe setpoint, reads it back
    // and clears `unsafe` and both alarms.
    furnace.sim.set_silent(false);
    read_until(&mut stream, &mut events, |ev| {
        let a = alarm_events(ev, "furnace-1");
        has_alarm(&a, "link_lost", true) && has_alarm(&a, "safe_state_pending", true)
    })
    .await;
    let raw = furnace
        .sim
        .read_registers(TARGET_SP_REGISTER, 1)
        .expect("register 2");
    assert_eq!(
        f64::from(raw[0] as i16) / 10.0,
        SAFE_SETPOINT_C,
        "the controller's target setpoint after the reconnect"
    );
    let d = lab.device("furnace-1").await;
    assert!(!d.r#unsafe, "still unsafe: {}", d.unsafe_reason);
    assert_eq!(d.connection, pb::ConnectionState::Connected as i32);
    let listed = lab.alarms("furnace-1").await;
    assert!(
        listed.iter().all(|a| a.cleared),
        "alarms still active: {listed:?}"
    );
    // The alarms were raised before the device was confirmed safe, in the durable log order.
    let a = alarm_events(&events, "furnace-1");
    let raised = a
        .iter()
        .position(|(c, cl, _)| c == "safe_state_pending" && !cl)
        .expect("raised");
    let cleared = a
        .iter()
        .position(|(c, cl, _)| c == "safe_state_pending" && *cl)
        .expect("cleared");
    assert!(raised < cleared);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_furnace_stays_unsafe_across_a_restart_until_a_read_back_confirms_it() {
    let mut lab = Lab::start(1).await;
    let mut exps = lab.experiments().await;
    let spec = furnace_experiment("hold", vec![ramp(150.0, 20.0), hold(40.0 * 3600.0)]);
    let id = exps
        .submit_batch(batch("restart", vec![spec]))
        .await
        .expect("submit")
        .into_inner()
        .batch
        .expect("batch")
        .experiment_ids[0]
        .clone();
    let sim = lab.devlab.furnaces[0].sim.clone();
    eventually("the furnace holding at 150 °C", || async {
        let s = sim.snapshot();
        s.target_sp_c == 150.0 && (s.pv_c - 150.0).abs() < 3.0
    })
    .await;
    // Cut the link and abort: the safe state after the abort cannot reach the controller.
    sim.set_silent(true);
    exps.cancel_experiment(pb::CancelExperimentRequest {
        id: id.clone(),
        reason: "operator abort during an outage".into(),
        after_current_step: false,
    })
    .await
    .expect("cancel");
    eventually("furnace-1 unsafe after the abort", || async {
        lab.device("furnace-1").await.r#unsafe
    })
    .await;

    // Restart with the link still down: shutdown and start-up both try and cannot confirm.
    lab.restart_daemon().await;
    let d = lab.device("furnace-1").await;
    assert!(d.r#unsafe, "the restarted daemon forgot the unsafe furnace");
    assert!(!d.unsafe_reason.is_empty());
    assert_eq!(sim.snapshot().target_sp_c, 150.0);
    let pending: Vec<_> = lab
        .alarms("furnace-1")
        .await
        .into_iter()
        .filter(|a| a.code == "safe_state_pending")
        .collect();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert!(!pending[0].cleared);

    // The link returns: the restarted daemon's poll task confirms the safe state.
    sim.set_silent(false);
    eventually("furnace-1 confirmed safe", || async {
        !lab.device("furnace-1").await.r#unsafe
    })
    .await;
    assert_eq!(sim.snapshot().target_sp_c, SAFE_SETPOINT_C);
    assert!(
        lab.alarms("furnace-1")
            .await
            .iter()
            .all(|a| a.code != "safe_state_pending" || a.cleared)
    );
    lab.stop().await;
}
