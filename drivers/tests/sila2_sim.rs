//! The `sila2` driver against a real SiLA 2 server: the simulated shaker served by the
//! third-party `sila2` Python package (`simulator/sila/shaker.py`), over gRPC on loopback.
//! The server's Part B encoding, ExecutionInfo, errors and constraint checks are that
//! package's, not ours. Skipped, with a notice, when no Python with `sila2` is found
//! (`PPU_SILA_PYTHON`, else `python3`).

use std::sync::Arc;
use std::time::Duration;

use ppu_drivers::sila2::schema::{Call, CallIntermediate, CallResult};
use ppu_drivers::{Clock, Device, DeviceError, StepCommand, StepContext, StepUpdate};
use ppu_sim::sila2::{RunningShaker, free_port, python};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);
const TIME_SCALE: f64 = 100.0;

async fn shaker() -> Option<(RunningShaker, Arc<dyn Device>)> {
    shaker_with(&[], &[]).await
}

/// The shaker, and a device on it configured by the dev table without `without` keys.
async fn shaker_with(without: &[&str], args: &[&str]) -> Option<(RunningShaker, Arc<dyn Device>)> {
    let python = match python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIPPED: no Python with sila2 ({why})");
            return None;
        }
    };
    let port = free_port(None).expect("a free port");
    let shaker = RunningShaker::start_with(&python, port, TIME_SCALE, args)
        .await
        .expect("the shaker starts");
    let mut table = shaker.device_table("shaker-1");
    table.remove("driver");
    for key in without {
        table.remove(*key);
    }
    let spec = ppu_drivers::registry::driver("sila2")
        .expect("registered")
        .parse(table)
        .expect("the dev table parses");
    assert!(spec.problems().is_empty(), "{:?}", spec.problems());
    let device = spec
        .build(&mut ppu_drivers::registry::BuildContext::new())
        .expect("builds");
    Some((shaker, device))
}

fn call(feature: &str, command: &str, parameters: &str) -> StepCommand {
    StepCommand::pack(&Call {
        feature: feature.into(),
        command: command.into(),
        parameters: parameters.into(),
    })
}

fn context() -> (StepContext, mpsc::UnboundedReceiver<StepUpdate>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        StepContext {
            clock: Clock::new(TIME_SCALE),
            updates: tx,
            cancel: CancellationToken::new(),
            sample_id: String::new(),
            experiment_id: "test".into(),
        },
        rx,
    )
}

/// Polls the device's status until it answers (the first status connects and reads the FDL).
async fn connected(device: &Arc<dyn Device>) -> ppu_drivers::DeviceStatus {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match device.status().await {
            Ok(s) => return s,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "never connected: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_the_features_and_checks_calls_against_the_servers_fdl() {
    let Some((_shaker, device)) = shaker().await else {
        return;
    };
    assert_eq!(device.info().capabilities, ["sila_call"]);
    // Before the first connection there is no FDL to judge by.
    assert_eq!(device.check(&call("Nope", "X", "")), Ok(()));
    let status = connected(&device).await;
    let names: Vec<&str> = status.readings.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["CurrentSpeed", "Temperature"], "{status:?}");
    assert!(!status.active);

    let ok = call(
        "ShakerController",
        "Shake",
        r#"{"Speed": 600, "Duration": 60}"#,
    );
    assert_eq!(device.check(&ok), Ok(()));
    let fq = call("org.ppu/simulation/ShakerController/v1", "Stop", "");
    assert_eq!(device.check(&fq), Ok(()));

    match device.check(&call(
        "ShakerController",
        "Shake",
        r#"{"Speed": 2000, "Duration": 60}"#,
    )) {
        Err(DeviceError::Limit {
            field,
            value,
            limit,
        }) => {
            assert_eq!((field.as_str(), value), ("parameters.Speed", 2000.0));
            assert!(limit.contains("1500"), "{limit}");
        }
        other => panic!("over the FDL's maximum: {other:?}"),
    }
    match device.check(&call(
        "ShakerController",
        "Shake",
        r#"{"Speed": 100, "Duration": 0}"#,
    )) {
        Err(DeviceError::Limit { field, .. }) => assert_eq!(field, "parameters.Duration"),
        other => panic!("a zero duration: {other:?}"),
    }
    let refused = |p: &str| match device.check(&call("ShakerController", "Shake", p)) {
        Err(DeviceError::Refused { what, reason }) => (what, reason),
        other => panic!("{p}: {other:?}"),
    };
    assert_eq!(refused(r#"{"Speed": 100}"#).0, "parameters.Duration");
    assert_eq!(
        refused(r#"{"Speed": "fast", "Duration": 1}"#).0,
        "parameters.Speed"
    );
    let (what, reason) = refused(r#"{"Speed": 1, "Duration": 1, "Spin": 1}"#);
    assert_eq!(what, "parameters.Spin");
    assert!(reason.contains("Speed, Duration"), "{reason}");
    assert_eq!(refused("[1]").0, "parameters");
    assert_eq!(refused("{").0, "parameters");
    match device.check(&call("ShakerController", "Spin", "")) {
        Err(DeviceError::Refused { what, reason }) => {
            assert!(
                what.contains("Spin") && reason.contains("Shake, Stop"),
                "{what}: {reason}"
            )
        }
        other => panic!("unknown command: {other:?}"),
    }
    // A feature the server lacks is "not this device's": the daemon routes elsewhere.
    assert!(matches!(
        device.check(&call("Incubator", "Open", "")),
        Err(DeviceError::Unsupported(why)) if why.contains("ShakerController")
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observable_command_runs_with_progress_intermediates_and_its_result() {
    let Some((_shaker, device)) = shaker().await else {
        return;
    };
    connected(&device).await;
    let (ctx, mut updates) = context();
    // 30 s of physical time, 0.3 s of real time.
    let out = tokio::time::timeout(
        DEADLINE,
        device.execute(
            &call(
                "ShakerController",
                "Shake",
                r#"{"Speed": 600, "Duration": 30}"#,
            ),
            ctx,
        ),
    )
    .await
    .expect("the shake ends within the deadline")
    .expect("the shake succeeds");
    let result: CallResult = out.decode().expect("a CallResult");
    assert_eq!(result.feature, "org.ppu/simulation/ShakerController/v1");
    assert_eq!(result.command, "Shake");
    assert!(!result.execution_uuid.is_empty());
    let responses: serde_json::Value = serde_json::from_str(&result.responses).expect("JSON");
    assert_eq!(
        responses["ShakenFor"],
        serde_json::json!(30.0),
        "{responses}"
    );
    assert!(
        responses["MeanSpeed"]
            .as_f64()
            .is_some_and(|v| v > 0.0 && v <= 600.0)
    );

    let mut progress = Vec::new();
    let mut intermediates = Vec::new();
    while let Ok(u) = updates.try_recv() {
        match u {
            StepUpdate::Progress {
                fraction,
                remaining_s,
                ..
            } => progress.push((fraction, remaining_s)),
            StepUpdate::Intermediate { index, value } => {
                let i = CallIntermediate::decode(value.value.as_slice()).expect("intermediate");
                intermediates.push((index, i.responses));
            }
            StepUpdate::Reading(_) => {}
        }
    }
    assert!(
        progress
            .iter()
            .any(|(f, r)| *f > 0.0 && *f < 1.0 && r.is_some_and(|r| r > 0.0)),
        "{progress:?}"
    );
    assert_eq!(progress.last().map(|p| p.0), Some(1.0), "{progress:?}");
    assert!(!intermediates.is_empty());
    for (k, (index, json)) in intermediates.iter().enumerate() {
        assert_eq!(*index as usize, k);
        assert!(json.starts_with("{\"Speed\":"), "{json}");
    }

    // An unobservable command is one call.
    let (ctx, _) = context();
    let out = device
        .execute(&call("ShakerController", "Stop", "{}"), ctx)
        .await
        .expect("stop");
    let r: CallResult = out.decode().expect("result");
    assert_eq!((r.command.as_str(), r.responses.as_str()), ("Stop", "{}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_command_is_stopped_by_the_safe_command_and_read_back() {
    let Some((_shaker, device)) = shaker().await else {
        return;
    };
    connected(&device).await;
    let (ctx, mut updates) = context();
    let cancel = ctx.cancel.clone();
    let d = Arc::clone(&device);
    let run = tokio::spawn(async move {
        d.execute(
            &call(
                "ShakerController",
                "Shake",
                r#"{"Speed": 900, "Duration": 36000}"#,
            ),
            ctx,
        )
        .await
    });
    // Wait until it runs at speed.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let u = tokio::time::timeout_at(deadline, updates.recv())
            .await
            .expect("progress within the deadline")
            .expect("updates");
        if let StepUpdate::Reading(s) = u
            && s.readings
                .iter()
                .any(|r| r.name == "CurrentSpeed" && r.value > 800.0)
        {
            break;
        }
    }
    assert!(device.status().await.expect("status").active);
    assert!(!device.confirm_safe().await.expect("read back").is_safe());
    cancel.cancel();
    assert_eq!(run.await.expect("joins"), Err(DeviceError::Aborted));
    device.safe_state().await.expect("Stop");
    // The shaker spins down (a lag of seconds of physical time): read back until safe.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if device.confirm_safe().await.expect("read back").is_safe() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never spun down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!device.status().await.expect("status").active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_server_is_a_link_failure_and_a_running_step_fails_after_the_grace() {
    let Some((mut shaker, device)) = shaker().await else {
        return;
    };
    connected(&device).await;
    let (ctx, _updates) = context();
    let d = Arc::clone(&device);
    let run = tokio::spawn(async move {
        d.execute(
            &call(
                "ShakerController",
                "Shake",
                r#"{"Speed": 300, "Duration": 36000}"#,
            ),
            ctx,
        )
        .await
    });
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !device.status().await.is_ok_and(|s| s.active) {
        assert!(tokio::time::Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shaker.kill().await;
    let e = device.status().await.expect_err("nobody answers");
    assert!(e.is_transient(), "{e:?}");
    let outcome = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("the step ends within the grace")
        .expect("joins");
    assert!(
        matches!(&outcome, Err(e) if e.is_transient()),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_safe_command_the_running_command_is_cancelled_through_cancel_controller() {
    let Some((_shaker, device)) = shaker_with(&["safe_command", "safe_property"], &[]).await else {
        return;
    };
    connected(&device).await;
    // Nothing of ppu's runs: safe, and nothing to cancel.
    device.safe_state().await.expect("nothing to do");
    assert!(device.confirm_safe().await.expect("read back").is_safe());

    let (ctx, mut updates) = context();
    let cancel = ctx.cancel.clone();
    let d = Arc::clone(&device);
    let run = tokio::spawn(async move {
        d.execute(
            &call(
                "ShakerController",
                "Shake",
                r#"{"Speed": 700, "Duration": 36000}"#,
            ),
            ctx,
        )
        .await
    });
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !matches!(
        tokio::time::timeout_at(deadline, updates.recv()).await,
        Ok(Some(StepUpdate::Progress { .. }))
    ) {
        assert!(tokio::time::Instant::now() < deadline, "never ran");
    }
    cancel.cancel();
    assert_eq!(run.await.expect("joins"), Err(DeviceError::Aborted));
    // The command still runs on the instrument until it is cancelled.
    assert!(!device.confirm_safe().await.expect("read back").is_safe());
    device.safe_state().await.expect("CancelCommand");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !device.confirm_safe().await.expect("read back").is_safe() {
        assert!(tokio::time::Instant::now() < deadline, "never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!device.status().await.expect("status").active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_neither_a_safe_command_nor_cancel_controller_the_safe_state_is_refused_not_faked() {
    let Some((_shaker, device)) = shaker_with(
        &["safe_command", "safe_property"],
        &["--no-cancel-controller"],
    )
    .await
    else {
        return;
    };
    connected(&device).await;
    let (ctx, mut updates) = context();
    let cancel = ctx.cancel.clone();
    let d = Arc::clone(&device);
    let run = tokio::spawn(async move {
        d.execute(
            &call(
                "ShakerController",
                "Shake",
                r#"{"Speed": 400, "Duration": 36000}"#,
            ),
            ctx,
        )
        .await
    });
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !matches!(
        tokio::time::timeout_at(deadline, updates.recv()).await,
        Ok(Some(StepUpdate::Progress { .. }))
    ) {
        assert!(tokio::time::Instant::now() < deadline, "never ran");
    }
    cancel.cancel();
    assert_eq!(run.await.expect("joins"), Err(DeviceError::Aborted));
    match device.safe_state().await {
        Err(DeviceError::Unsupported(why)) => {
            assert!(
                why.contains("CancelController") && why.contains("Shake"),
                "{why}"
            )
        }
        other => panic!("the safe state cannot be reached: {other:?}"),
    }
    match device.confirm_safe().await.expect("read back") {
        ppu_drivers::SafeCheck::NotSafe(d) => {
            assert!(d.iter().any(|x| x.contains("still running")), "{d:?}")
        }
        ppu_drivers::SafeCheck::Safe => panic!("the shaker still runs"),
    }
}
