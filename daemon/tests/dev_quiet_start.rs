//! A fresh `ppud dev`, started and stopped as a new user would (default log level, no
//! RUST_LOG): stderr holds no ERROR line and no INFO line of a third-party crate (the embedded
//! MQTT broker, HTTP/2, ...), no device raises an alarm (the simulated pumps are already
//! powered: no "pump reset (power-up)"), and gRPC reflection answers as v1 and v1alpha.
//! Runs the real binary.

use std::process::Stdio;
use std::time::Duration;

use pb::device_service_client::DeviceServiceClient;
use ppu_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

const DEADLINE: Duration = Duration::from_secs(60);

/// The crates whose INFO lines a default start may show: ppu's own.
fn is_ppu_target(target: &str) -> bool {
    let krate = target.split("::").next().unwrap_or(target);
    krate == "ppud" || krate.starts_with("ppu_")
}

/// Level and target of a text-format log line (`<time> <LEVEL> [span{..}:]* target: message`);
/// None for a line that is not a log line (e.g. a panic message).
fn level_and_target(line: &str) -> Option<(&str, &str)> {
    let mut rest = line.split_once(' ')?.1.trim_start();
    let (level, after) = rest.split_once(' ')?;
    if !matches!(level, "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR") {
        return None;
    }
    rest = after.trim_start();
    // Skip span prefixes: `name{fields}:` (fields may hold spaces) or `name:`.
    loop {
        let word_end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        match rest[word_end..].chars().next() {
            Some('{') => {
                let close = rest.find("}:")?;
                rest = rest[close + 2..].trim_start();
            }
            _ => {
                let (target, _) = rest.split_once(": ")?;
                return Some((level, target));
            }
        }
    }
}

#[test]
fn the_line_parser_finds_level_and_target_behind_spans() {
    let plain = "2026-12-06T21:17:48.222211Z  INFO ppu_sim::broker: embedded MQTT broker listening";
    assert_eq!(level_and_target(plain), Some(("INFO", "ppu_sim::broker")));
    let span = "2026-12-06T21:17:48.2Z  INFO remote_link{tenant_id=None client_id=\"a b\"}: \
                rumqttd::server::broker: disconnected";
    assert_eq!(
        level_and_target(span),
        Some(("INFO", "rumqttd::server::broker"))
    );
    let odd = "2026-12-06T21:17:48.2Z  INFO run:[>] incoming{connection_id=0}: \
               rumqttd::router::routing: Client connection registered";
    // Not parsed cleanly, but not taken for one of ppu's lines either.
    assert!(level_and_target(odd).is_none_or(|(_, t)| !is_ppu_target(t)));
    assert_eq!(level_and_target("thread 'main' panicked at x"), None);
}

#[tokio::test]
async fn a_fresh_dev_lab_starts_and_stops_quietly_and_raises_no_alarm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ppud"))
        .env_remove("RUST_LOG")
        .env_remove("PPU_LOG_FORMAT")
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--sila-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ppud dev");
    let mut err = child.stderr.take().expect("stderr");
    let stderr = tokio::spawn(async move {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s).await;
        s
    });
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.strip_prefix("listening on ") {
                return a.trim().to_owned();
            }
        }
        panic!("ppud dev exited before listening");
    })
    .await
    .expect("listens within the deadline");
    // Keep draining stdout so the daemon never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = format!("http://{addr}");

    // Wait until every device has been polled once: a power-up alarm would be raised by then.
    let mut devices = DeviceServiceClient::connect(url.clone())
        .await
        .expect("connects");
    let listed = tokio::time::timeout(DEADLINE, async {
        loop {
            let list = devices
                .list_devices(pb::ListDevicesRequest {})
                .await
                .expect("ListDevices")
                .into_inner()
                .devices;
            if list.iter().all(|d| d.latest.is_some()) {
                return list;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every device polled within the deadline");
    assert!(
        list_has(&listed, "pump-a") && list_has(&listed, "pump-b"),
        "the dev lab has its pumps: {:?}",
        listed.iter().map(|d| &d.id).collect::<Vec<_>>()
    );
    for d in &listed {
        let alarms = d
            .latest
            .as_ref()
            .map(|r| r.alarms.clone())
            .unwrap_or_default();
        assert!(alarms.is_empty(), "{} reports alarms {alarms:?}", d.id);
    }
    let alarms = devices
        .list_alarms(pb::ListAlarmsRequest::default())
        .await
        .expect("ListAlarms")
        .into_inner()
        .alarms;
    assert!(
        alarms.is_empty(),
        "a fresh dev lab raised alarms: {alarms:?}"
    );

    reflection_answers_as_v1_and_v1alpha(&url).await;

    // Stop it as Ctrl-C would (SIGINT), then read everything it logged.
    let pid = child.id().expect("running");
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .await
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits within the deadline")
        .expect("wait");
    let log = tokio::time::timeout(DEADLINE, stderr)
        .await
        .expect("stderr closes")
        .expect("reader task");
    assert!(exit.success(), "ppud dev exited with {exit}; log:\n{log}");
    assert!(
        log.contains("ppu_daemon::app: stopped"),
        "the stop is in the log:\n{log}"
    );
    let noisy: Vec<&str> = log
        .lines()
        .filter(|line| match level_and_target(line) {
            Some(("ERROR", _)) => true,
            Some(("INFO" | "DEBUG" | "TRACE", target)) => !is_ppu_target(target),
            Some(_) => false,
            // Lines that are not log lines (the parser could not read them) are suspect too.
            None => !line.trim().is_empty(),
        })
        .collect();
    assert!(
        noisy.is_empty(),
        "a default start and stop must log no ERROR and no third-party INFO; got:\n{}",
        noisy.join("\n")
    );
}

fn list_has(devices: &[pb::Device], id: &str) -> bool {
    devices.iter().any(|d| d.id == id)
}

/// ListServices over both reflection versions names ppu.v1's services and both reflection
/// services (older grpcurl, grpcui, Postman and grpc-python's client ask v1alpha).
async fn reflection_answers_as_v1_and_v1alpha(url: &str) {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connects");
    let v1 = {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let first = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let reply = ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter(vec![first]))
            .await
            .expect("v1 reflection")
            .into_inner()
            .message()
            .await
            .expect("v1 reply")
            .expect("one reply");
        match reply.message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("v1 ListServices answered {other:?}"),
        }
    };
    let v1alpha = {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let first = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let reply = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter(vec![first]))
            .await
            .expect("v1alpha reflection")
            .into_inner()
            .message()
            .await
            .expect("v1alpha reply")
            .expect("one reply");
        match reply.message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("v1alpha ListServices answered {other:?}"),
        }
    };
    for names in [&v1, &v1alpha] {
        for wanted in [
            "ppu.v1.ExperimentService",
            "ppu.v1.DeviceService",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                names.iter().any(|n| n == wanted),
                "{wanted} not in {names:?}"
            );
        }
    }
}
