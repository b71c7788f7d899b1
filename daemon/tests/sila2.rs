//! A SiLA 2 instrument as a ppu device, end to end: `ppud serve` drives the simulated shaker
//! (served by the third-party `sila2` Python package, a process of this test, so it outlives a
//! killed daemon as an instrument would) through the `sila2` driver family. A Call runs as a
//! batch step with its progress and intermediate responses in the event stream (what
//! `ppuctl watch` shows); a bad parameter is refused at submission naming it; SIGKILL of ppud
//! mid-command is recovered by policy (the shaker stopped by its safe command and read back,
//! the experiment interrupted); an outage of the instrument mid-command raises the alarms and
//! the safe state follows its return. Skipped, with a notice, without a Python that has
//! `sila2` (`PPU_SILA_PYTHON`, else `python3`).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use pb::event::Kind;
use ppu_drivers::Device;
use ppu_drivers::sila2::schema::{Call, CallIntermediate, CallResult};
use ppu_proto::v1 as pb;
use ppu_sim::sila2::{RunningShaker, free_port, python};
use prost::Message;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(60);
/// Physical seconds per real second, daemon and instrument alike.
const TIME_SCALE: f64 = 20.0;

async fn start_shaker(port: u16) -> Option<RunningShaker> {
    match python() {
        Ok(p) => Some(
            RunningShaker::start(&p, port, TIME_SCALE)
                .await
                .expect("the shaker starts"),
        ),
        Err(why) => {
            eprintln!("SKIPPED: no Python with sila2 ({why})");
            None
        }
    }
}

/// Starts `ppud serve` on a config for `data_dir` with the shaker at `port`.
async fn serve(data_dir: &Path, port: u16) -> (Child, String) {
    let config = data_dir.join("ppud.toml");
    let text = format!(
        r#"listen = "127.0.0.1:0"
data_dir = "{}"
time_scale = {TIME_SCALE:?}

[poll]
interval_ms = 100
reading_log_interval_s = 1.0

[auth]
open = true

[[devices]]
driver = "sila2"
id = "shaker-1"
address = "127.0.0.1:{port}"
insecure = true
safe_command = "ShakerController/Stop"
safe_property = "ShakerController/CurrentSpeed"
safe_max = 1.0
timeout_ms = 2000
poll_interval_ms = 100
outage_grace_s = 1.0
"#,
        data_dir.join("store").display()
    );
    std::fs::write(&config, text).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ppud"))
        .args(["serve", "--config", config.to_str().expect("utf-8 path")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ppud");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.strip_prefix("listening on ") {
                return a.trim().to_owned();
            }
        }
        panic!("ppud exited before listening");
    })
    .await
    .expect("ppud listens within the deadline");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("http://{addr}"))
}

/// A Call as `Step.command`: this client was built with the family's message only.
fn call(feature: &str, command: &str, parameters: &str) -> pb::Step {
    let c = Call {
        feature: feature.into(),
        command: command.into(),
        parameters: parameters.into(),
    };
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Command(prost_types::Any {
            type_url: "type.googleapis.com/ppu.devices.sila2.v1.Call".into(),
            value: c.encode_to_vec(),
        })),
    }
}

async fn submit(endpoint: &str, key: &str, step: pb::Step) -> Result<String, tonic::Status> {
    pb::experiment_service_client::ExperimentServiceClient::connect(endpoint.to_owned())
        .await
        .expect("connect")
        .submit_batch(pb::SubmitBatchRequest {
            idempotency_key: key.into(),
            experiments: vec![pb::ExperimentSpec {
                name: key.into(),
                steps: vec![step],
                ..Default::default()
            }],
        })
        .await
        .map(|r| r.into_inner().batch.expect("batch").experiment_ids[0].clone())
}

async fn device(endpoint: &str) -> pb::Device {
    pb::device_service_client::DeviceServiceClient::connect(endpoint.to_owned())
        .await
        .expect("connect")
        .get_device(pb::GetDeviceRequest {
            id: "shaker-1".into(),
        })
        .await
        .expect("device")
        .into_inner()
}

async fn alarms(endpoint: &str) -> Vec<pb::ActiveAlarm> {
    pb::device_service_client::DeviceServiceClient::connect(endpoint.to_owned())
        .await
        .expect("connect")
        .list_alarms(pb::ListAlarmsRequest {
            device_id: "shaker-1".into(),
        })
        .await
        .expect("alarms")
        .into_inner()
        .alarms
}

/// Polls `probe` until it holds, with the deadline.
async fn until<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !probe().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The device has read the instrument's features and reports its readings.
async fn connected(endpoint: &str) {
    until("shaker-1 to report readings", || async {
        let d = device(endpoint).await;
        d.connection == pb::ConnectionState::Connected as i32
            && d.latest
                .is_some_and(|r| r.values.iter().any(|v| v.name == "CurrentSpeed"))
    })
    .await;
}

/// The events of `experiment` from the log, until it ends in a terminal state.
async fn follow(endpoint: &str, experiment: &str) -> Vec<pb::Event> {
    let mut stream = pb::event_service_client::EventServiceClient::connect(endpoint.to_owned())
        .await
        .expect("connect")
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .expect("stream")
        .into_inner();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(e)) = stream.message().await {
            let done = e.experiment_id == experiment
                && matches!(&e.kind, Some(Kind::ExperimentStateChanged(c))
                    if c.to != pb::ExperimentState::Queued as i32
                        && c.to != pb::ExperimentState::Running as i32);
            out.push(e);
            if done {
                return;
            }
        }
    })
    .await
    .expect("the experiment ends within the deadline");
    out
}

/// The whole log so far.
async fn log(endpoint: &str) -> Vec<pb::Event> {
    let mut stream = pb::event_service_client::EventServiceClient::connect(endpoint.to_owned())
        .await
        .expect("connect")
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .expect("stream")
        .into_inner();
    let mut out = Vec::new();
    while let Ok(Ok(Some(e))) =
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await
    {
        out.push(e);
    }
    out
}

/// The shaker's speed, read by a client of our own (a fresh driver instance).
fn probe(port: u16) -> Arc<dyn Device> {
    let mut t = toml::Table::new();
    t.insert("id".into(), "probe".into());
    t.insert("address".into(), format!("127.0.0.1:{port}").into());
    t.insert("insecure".into(), true.into());
    ppu_drivers::registry::driver("sila2")
        .expect("registered")
        .parse(t)
        .expect("parses")
        .build(&mut ppu_drivers::registry::BuildContext::new())
        .expect("builds")
}

async fn speed(probe: &Arc<dyn Device>) -> Option<f64> {
    probe.status().await.ok().and_then(|s| {
        s.readings
            .iter()
            .find(|r| r.name == "CurrentSpeed")
            .map(|r| r.value)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_runs_as_a_step_with_progress_and_a_bad_parameter_is_refused_naming_it() {
    let port = free_port(None).expect("port");
    let Some(shaker) = start_shaker(port).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, endpoint) = serve(dir.path(), port).await;
    connected(&endpoint).await;

    // Refused at submission, naming the parameter, the FDL's bound and the device.
    let e = submit(
        &endpoint,
        "too-fast",
        call(
            "ShakerController",
            "Shake",
            r#"{"Speed": 2000, "Duration": 60}"#,
        ),
    )
    .await
    .expect_err("over the FDL's 1500 rpm");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let field = e
        .metadata()
        .get("ppu-field-path")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert_eq!(
        field, "experiments[0].steps[0].sila_call.parameters.Speed",
        "{e:?}"
    );
    assert!(
        e.message().contains("1500") && e.message().contains("shaker-1"),
        "{e:?}"
    );
    let e = submit(
        &endpoint,
        "no-duration",
        call("ShakerController", "Shake", r#"{"Speed": 200}"#),
    )
    .await
    .expect_err("a missing parameter");
    assert!(e.message().contains("parameters.Duration"), "{e:?}");
    let e = submit(&endpoint, "incubate", call("Incubator", "Open", ""))
        .await
        .expect_err("a feature no device has");
    let field = e
        .metadata()
        .get("ppu-field-path")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert_eq!(field, "experiments[0].steps[0].sila_call.feature", "{e:?}");

    // A 2-minute shake (6 s real): progress, remaining time and intermediate responses are
    // events of the log, the responses the step's result.
    let id = submit(
        &endpoint,
        "shake",
        call(
            "ShakerController",
            "Shake",
            r#"{"Speed": 600, "Duration": 120}"#,
        ),
    )
    .await
    .expect("a valid Call is accepted");
    let events = follow(&endpoint, &id).await;
    let mine = |e: &&pb::Event| e.experiment_id == id;
    let progress: Vec<&pb::StepProgress> = events
        .iter()
        .filter(mine)
        .filter_map(|e| match &e.kind {
            Some(Kind::StepProgress(p)) => Some(p),
            _ => None,
        })
        .collect();
    assert!(
        progress
            .iter()
            .any(|p| p.fraction > 0.0 && p.fraction < 1.0 && p.remaining_s > 0.0),
        "{progress:?}"
    );
    let intermediates: Vec<String> = events
        .iter()
        .filter(mine)
        .filter_map(|e| match &e.kind {
            Some(Kind::StepIntermediate(i)) => i.value.as_ref().map(|v| {
                CallIntermediate::decode(v.value.as_slice())
                    .expect("a CallIntermediate")
                    .responses
            }),
            _ => None,
        })
        .collect();
    assert!(
        intermediates.iter().any(|r| r.starts_with("{\"Speed\":")),
        "{intermediates:?}"
    );
    let result = events
        .iter()
        .filter(mine)
        .find_map(|e| match &e.kind {
            Some(Kind::StepFinished(f)) => f.result.clone(),
            _ => None,
        })
        .expect("a step result");
    let Some(pb::step_result::Result::Output(any)) = result.result else {
        panic!("no output: {result:?}");
    };
    let r = CallResult::decode(any.value.as_slice()).expect("a CallResult");
    let responses: serde_json::Value = serde_json::from_str(&r.responses).expect("JSON");
    assert_eq!(responses["ShakenFor"], serde_json::json!(120.0), "{r:?}");
    let state = events
        .iter()
        .rfind(|e| e.experiment_id == id)
        .and_then(|e| match &e.kind {
            Some(Kind::ExperimentStateChanged(c)) => Some(c.to),
            _ => None,
        });
    assert_eq!(
        state,
        Some(pb::ExperimentState::Succeeded as i32),
        "{events:#?}"
    );

    child.kill().await.ok();
    shaker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_shake_is_recovered_by_stopping_the_shaker() {
    let port = free_port(None).expect("port");
    let Some(shaker) = start_shaker(port).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, endpoint) = serve(dir.path(), port).await;
    connected(&endpoint).await;
    let id = submit(
        &endpoint,
        "long-shake",
        call(
            "ShakerController",
            "Shake",
            r#"{"Speed": 900, "Duration": 36000}"#,
        ),
    )
    .await
    .expect("accepted");
    let probe = probe(port);
    until("the shaker to run at speed", || async {
        speed(&probe).await.is_some_and(|v| v > 800.0)
    })
    .await;

    child.kill().await.expect("SIGKILL");
    child.wait().await.ok();
    // The daemon is gone and the shaker still runs: what recovery must end.
    assert!(speed(&probe).await.is_some_and(|v| v > 800.0));

    let (mut child, endpoint) = serve(dir.path(), port).await;
    until("recovery to stop the shaker", || async {
        speed(&probe).await.is_some_and(|v| v <= 1.0)
    })
    .await;
    until("the device to be confirmed safe", || async {
        !device(&endpoint).await.r#unsafe
    })
    .await;
    let log = log(&endpoint).await;
    let decision = log
        .iter()
        .find_map(|e| match &e.kind {
            Some(Kind::RecoveryDecision(d)) if e.experiment_id == id => Some(d.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no recovery decision for {id}: {log:#?}"));
    assert_eq!(decision.action, "sila_safe_state", "{decision:?}");
    let state = log.iter().rev().find_map(|e| match &e.kind {
        Some(Kind::ExperimentStateChanged(c)) if e.experiment_id == id => Some(c.to),
        _ => None,
    });
    assert_eq!(
        state,
        Some(pb::ExperimentState::Interrupted as i32),
        "a SiLA command is not run twice: {log:#?}"
    );

    child.kill().await.ok();
    shaker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instrument_outage_mid_command_alarms_and_its_return_brings_the_safe_state() {
    let port = free_port(None).expect("port");
    let Some(mut shaker) = start_shaker(port).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, endpoint) = serve(dir.path(), port).await;
    connected(&endpoint).await;
    let id = submit(
        &endpoint,
        "outage",
        call(
            "ShakerController",
            "Shake",
            r#"{"Speed": 500, "Duration": 36000}"#,
        ),
    )
    .await
    .expect("accepted");
    until("the step to run", || async {
        device(&endpoint).await.latest.is_some_and(|r| {
            r.values
                .iter()
                .any(|v| v.name == "CurrentSpeed" && v.value > 100.0)
        })
    })
    .await;

    shaker.kill().await;
    until("the link_lost and safe_state_pending alarms", || async {
        let a = alarms(&endpoint).await;
        let active = |code: &str| a.iter().any(|x| x.code == code && !x.cleared);
        active("link_lost") && active("safe_state_pending")
    })
    .await;
    let d = device(&endpoint).await;
    assert!(d.r#unsafe, "{d:?}");
    assert_eq!(
        d.connection,
        pb::ConnectionState::Disconnected as i32,
        "{d:?}"
    );
    let events = follow(&endpoint, &id).await;
    assert!(
        matches!(events.last().and_then(|e| e.kind.as_ref()),
            Some(Kind::ExperimentStateChanged(c)) if c.to == pb::ExperimentState::Failed as i32),
        "{events:#?}"
    );

    // The instrument comes back (power restored: at rest): the daemon reconnects, drives it
    // to its safe state, reads it back and clears the alarm.
    let shaker = start_shaker(port).await.expect("restarts");
    until("the safe state to be confirmed", || async {
        let a = alarms(&endpoint).await;
        !device(&endpoint).await.r#unsafe
            && !a
                .iter()
                .any(|x| x.code == "safe_state_pending" && !x.cleared)
    })
    .await;

    child.kill().await.ok();
    shaker.shutdown().await;
}
