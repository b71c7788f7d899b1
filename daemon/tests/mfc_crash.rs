//! Crash recovery of a plugin family: `ppud serve` drives a simulated mass-flow controller
//! (`ppu_sim::mfc`, in this process on a real pty, so it outlives the daemon as hardware
//! would) through the real `alicat` driver; the daemon is killed with SIGKILL mid gas flow,
//! leaving gas flowing; the restarted daemon drives the controller to its safe state
//! (setpoint 0), confirms it by reading it back, and logs the decision. Nothing in the
//! daemon names the family: the safe state, its audit action and the refusal to resume come
//! from the family's driver and schema.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use pb::event::Kind;
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use ppu_sim::mfc::{MfcConfig, RunningMfc};
use ppu_sim::pty::FaultConfig;
use prost::Message;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(60);
/// Physical seconds per real second (daemon and simulator alike): the 1-hour gas flow is still
/// running long after the daemon has restarted.
const TIME_SCALE: f64 = 10.0;

/// Starts `ppud serve` on a config for `data_dir` with one `alicat` controller at `port`.
async fn serve(data_dir: &Path, port: &str) -> (Child, String) {
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
driver = "alicat"
id = "mfc-1"
port = "{port}"
full_scale_sccm = 500.0
gases = ["CO2", "N2"]
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

/// Waits, with the deadline, until `cond` holds (it reads the simulator's state).
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A gas flow of `ppu.devices.mfc.v1.GasFlow`, sent as `Step.command`: the daemon was built
/// with the family, this client only with its message.
fn gas_flow(gas: &str, flow_sccm: f64, duration_s: f64) -> pb::Step {
    let command = ppu_drivers::mfc::schema::GasFlow {
        gas: gas.into(),
        flow_sccm,
        duration_s,
    };
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Command(prost_types::Any {
            type_url: "type.googleapis.com/ppu.devices.mfc.v1.GasFlow".into(),
            value: command.encode_to_vec(),
        })),
    }
}

async fn events(endpoint: &str) -> Vec<pb::Event> {
    let mut stream = pb::event_service_client::EventServiceClient::connect(endpoint.to_owned())
        .await
        .expect("connect")
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .expect("stream")
        .into_inner();
    let mut out = Vec::new();
    // The log so far: read until the stream has nothing more within a short real time.
    while let Ok(Ok(Some(e))) =
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await
    {
        out.push(e);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_gas_flow_leaves_the_controller_at_setpoint_0_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::new(TIME_SCALE);
    let mfc = RunningMfc::start(
        "mfc-1",
        MfcConfig::default(),
        FaultConfig::default(),
        None,
        clock,
    )
    .await
    .expect("simulated controller");
    let port = mfc.path();

    let (mut child, endpoint) = serve(dir.path(), &port).await;
    let id = pb::experiment_service_client::ExperimentServiceClient::connect(endpoint.clone())
        .await
        .expect("connect")
        .submit_batch(pb::SubmitBatchRequest {
            idempotency_key: "purge".into(),
            experiments: vec![pb::ExperimentSpec {
                name: "CO2 purge".into(),
                steps: vec![gas_flow("CO2", 120.0, 3600.0)],
                ..Default::default()
            }],
        })
        .await
        .expect("a gas flow is accepted")
        .into_inner()
        .batch
        .expect("batch")
        .experiment_ids[0]
        .clone();
    // Server reflection serves the family's descriptors, so grpcurl and SDKs built without
    // the family can decode its messages.
    let channel = tonic::transport::Channel::from_shared(endpoint.clone())
        .expect("uri")
        .connect()
        .await
        .expect("connect reflection");
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let ask = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "ppu.devices.mfc.v1.GasFlowResult".into(),
        )),
    };
    let reply = reflection
        .server_reflection_info(tokio_stream::iter(vec![ask]))
        .await
        .expect("reflection")
        .into_inner()
        .message()
        .await
        .expect("a reply")
        .expect("a reply");
    let Some(MessageResponse::FileDescriptorResponse(files)) = reply.message_response else {
        panic!("no descriptor for the family's result: {reply:?}");
    };
    let names: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .filter_map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).ok())
        .map(|f| f.name().to_owned())
        .collect();
    assert!(names.iter().any(|n| n == "mfc/mfc.proto"), "{names:?}");

    wait_for("the controller to flow CO2 at 120 sccm", || {
        mfc.sim.setpoint() > 100.0 && mfc.sim.gas() == "CO2"
    })
    .await;

    child.kill().await.expect("SIGKILL");
    child.wait().await.ok();
    // The daemon is gone and the gas still flows: exactly the hazard recovery must end.
    assert!(mfc.sim.setpoint() > 100.0, "still flowing after the kill");

    let (mut child, endpoint) = serve(dir.path(), &port).await;
    wait_for("recovery to set the setpoint to 0", || {
        mfc.sim.setpoint() == 0.0
    })
    .await;
    let log = events(&endpoint).await;
    let decision = log
        .iter()
        .find_map(|e| match &e.kind {
            Some(Kind::RecoveryDecision(d)) if e.experiment_id == id => Some(d.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no recovery decision for {id}: {log:#?}"));
    assert_eq!(decision.action, "flow_stopped", "{decision:?}");
    assert!(
        decision.detail.contains("confirmed by read-back"),
        "{decision:?}"
    );
    let state = log.iter().rev().find_map(|e| match &e.kind {
        Some(Kind::ExperimentStateChanged(c)) if e.experiment_id == id => Some(c.to),
        _ => None,
    });
    assert_eq!(
        state,
        Some(pb::ExperimentState::Interrupted as i32),
        "the running experiment is INTERRUPTED, not resumed: {log:#?}"
    );
    let device = pb::device_service_client::DeviceServiceClient::connect(endpoint)
        .await
        .expect("connect")
        .get_device(pb::GetDeviceRequest { id: "mfc-1".into() })
        .await
        .expect("device")
        .into_inner();
    assert!(!device.r#unsafe, "{device:?}");

    child.kill().await.ok();
    mfc.shutdown().await;
}
