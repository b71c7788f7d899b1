//! The operator's side of the `ppud` binary: `ppud check-config` reports, `ppud token`, JSON
//! logs with a request id on every line of a call and no secret in any line, and the loud
//! warning of an open daemon. Each test runs the real binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pb::queue_service_client::QueueServiceClient;
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use ppu_sim::furnace::{FurnaceConfig, SimFurnace};
use ppu_sim::modbus::serve_tcp;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(60);

fn ppud() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ppud"));
    c.env_remove("RUST_LOG")
        .env_remove("PPU_LOG_FORMAT")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    c.kill_on_drop(true);
    c
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

#[tokio::test]
async fn check_config_passes_the_example_and_names_every_problem_of_a_broken_one() {
    let example = repo_root().join("deploy/ppud.example.toml");
    let out = ppud()
        .arg("check-config")
        .arg(&example)
        .output()
        .await
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(": ok"), "{stdout}");

    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        r#"listen = "0.0.0.0:50051"
time_scale = -1.0

[auth]
tokens_file = "missing-tokens.toml"

[tls]
cert_file = "nope.crt"
key_file = "nope.key"

[local]
socket = "/tmp/ppud-test.sock"
mode = "0777"

[limits]
max_streams = 0

[[devices]]
driver = "eurotherm"
id = "furnace-1"
endpoint = "carrier-pigeon://loft"
"#,
    )
    .expect("write");
    let out = ppud()
        .arg("check-config")
        .arg(&broken)
        .output()
        .await
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a broken config fails: {stdout}");
    for problem in [
        "time_scale",
        "auth.tokens_file: cannot read",
        "tls.cert_file: cannot read",
        "tls.key_file: cannot read",
        "local.mode",
        "limits.max_streams",
        "devices[0].endpoint",
    ] {
        assert!(
            stdout.contains(problem),
            "{problem:?} not reported in:\n{stdout}"
        );
    }
    // Every line names the file, and the line of the key it is about.
    for line in stdout.lines() {
        assert!(line.starts_with(&broken.display().to_string()), "{line}");
    }
    for at in [
        ":2: time_scale",
        ":5: auth.tokens_file",
        ":8: tls.cert_file",
        ":13: local.mode",
        ":16: limits.max_streams",
        ":21: devices[0].endpoint",
    ] {
        let expected = format!("{}{at}", broken.display());
        assert!(
            stdout.lines().any(|l| l.starts_with(&expected)),
            "{expected:?} not in:\n{stdout}"
        );
    }
    // A typo'd key: its path and line, on stdout like any problem.
    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        "[auth]\nopen = true\n\n[[devices]]\ndriver = \"eurotherm\"\nid = \"f\"\n\
         endpoint = \"modbus-tcp://127.0.0.1:502\"\n[devices.limits]\nmax_temprature_c = 900.0\n",
    )
    .expect("write");
    let out = ppud()
        .arg("check-config")
        .arg(&typo)
        .output()
        .await
        .expect("runs");
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!(
            "{}:9: devices[0].limits.max_temprature_c: ",
            typo.display()
        )),
        "{stdout}"
    );

    // A config without [auth] is refused by `serve` and reported by `check-config`.
    let no_auth = dir.path().join("no-auth.toml");
    std::fs::write(&no_auth, "listen = \"127.0.0.1:0\"\n").expect("write");
    let out = ppud()
        .arg("check-config")
        .arg(&no_auth)
        .output()
        .await
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("missing [auth] table"));
}

/// Runs `ppud token` and returns (token, the [[token]] entry).
async fn make_token(principal: &str, role: &str) -> (String, String) {
    let out = ppud()
        .args(["token", "--principal", principal, "--role", role])
        .output()
        .await
        .expect("runs");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let token = stdout
        .lines()
        .find(|l| l.starts_with("ppu_"))
        .expect("token line")
        .to_owned();
    let entry = stdout[stdout.find("[[token]]").expect("entry")..].to_owned();
    assert!(!entry.contains(&token), "the entry holds only the hash");
    (token, entry)
}

/// A running `ppud serve`: the child, its gRPC address, the rest of its start-up banner, and
/// its stderr as it is read (read all along, so a chatty log never blocks the daemon on a full
/// pipe).
struct Served {
    child: Child,
    addr: String,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
}

/// Starts `ppud serve` and returns it once it listens.
async fn serve(config: &Path, log: &str, format: &str) -> Served {
    serve_env(config, log, format, &[]).await
}

/// [`serve`] with extra environment variables.
async fn serve_env(config: &Path, log: &str, format: &str, env: &[(&str, &str)]) -> Served {
    let mut child = ppud()
        .envs(env.iter().copied())
        .args(["serve", "--config"])
        .arg(config)
        .args(["--log", log, "--log-format", format])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ppud");
    let mut err = child.stderr.take().expect("stderr");
    let stderr = tokio::spawn(async move {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s).await;
        s
    });
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.strip_prefix("listening on ") {
                return a.trim().to_owned();
            }
        }
        panic!("ppud exited before listening");
    })
    .await
    .expect("listens within the deadline");
    Served {
        child,
        addr,
        stdout: lines,
        stderr,
    }
}

/// SIGTERM, then everything it wrote on stderr.
async fn stop(served: Served) -> String {
    let Served {
        mut child, stderr, ..
    } = served;
    let pid = child.id().expect("running");
    // kill(1) rather than a libc dependency for one signal.
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .expect("kill");
    assert!(status.success());
    tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits within the deadline")
        .expect("wait");
    tokio::time::timeout(DEADLINE, stderr)
        .await
        .expect("stderr closes")
        .expect("reader task")
}

#[tokio::test]
async fn json_logs_carry_the_request_id_and_never_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (token, entry) = make_token("tech-ana", "technician").await;
    std::fs::write(dir.path().join("tokens.toml"), entry).expect("write tokens");
    let config = dir.path().join("ppud.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n\n[auth]\ntokens_file = \"tokens.toml\"\n",
            dir.path().join("data")
        ),
    )
    .expect("write config");
    // Everything at debug, the transport crates included: the header must not leak there either.
    let served = serve(&config, "debug", "json").await;
    let mut q = QueueServiceClient::connect(format!("http://{}", served.addr))
        .await
        .expect("connects");
    let mut pause = tonic::Request::new(pb::PauseQueueRequest {
        reason: "coffee".into(),
    });
    pause.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    pause
        .metadata_mut()
        .insert("x-request-id", "req-from-client-42".parse().expect("ascii"));
    let reply = q.pause_queue(pause).await.expect("technician pauses");
    assert_eq!(
        reply
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("req-from-client-42")
    );
    let wrong = format!("{token}x");
    let mut bad = tonic::Request::new(pb::GetQueueRequest::default());
    bad.metadata_mut().insert(
        "authorization",
        format!("Bearer {wrong}").parse().expect("ascii"),
    );
    assert_eq!(
        q.get_queue(bad).await.expect_err("unknown token").code(),
        tonic::Code::Unauthenticated
    );
    drop(q);
    let stderr = stop(served).await;

    assert!(!stderr.contains(&token), "a token is in the log");
    assert!(
        !stderr.contains(&token[4..20]),
        "part of a token is in the log"
    );
    let mut call_lines = 0;
    for line in stderr.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        if v["span"]["request_id"] == "req-from-client-42" {
            assert_eq!(
                v["span"]["method"], "/ppu.v1.QueueService/PauseQueue",
                "{line}"
            );
            assert_eq!(v["span"]["principal"], "tech-ana", "{line}");
            call_lines += 1;
        }
    }
    assert!(
        call_lines >= 1,
        "no line of the call carries its request id:\n{stderr}"
    );
    assert!(
        stderr.contains("refused: unauthenticated"),
        "the refused call is logged:\n{stderr}"
    );
}

#[tokio::test]
async fn an_open_daemon_says_so_loudly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ppud.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n\n[auth]\nopen = true\n",
            dir.path().join("data")
        ),
    )
    .expect("write config");
    let mut served = serve(&config, "info", "text").await;
    let banner = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = served.stdout.next_line().await {
            if line.contains("auth:") {
                return line;
            }
        }
        String::new()
    })
    .await
    .expect("banner");
    assert!(banner.contains("auth: OPEN"), "banner: {banner:?}");
    let stderr = stop(served).await;
    assert!(stderr.contains("AUTHENTICATION IS OFF"), "{stderr}");
}

#[tokio::test]
async fn the_configured_metrics_endpoint_serves_every_named_series() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One simulated Eurotherm on a real Modbus socket in this process, so the per-device
    // series exist.
    let sim = SimFurnace::new(FurnaceConfig::default(), Clock::new(1.0));
    let furnace = serve_tcp(SocketAddr::from(([127, 0, 0, 1], 0)), sim)
        .await
        .expect("simulated furnace");
    let config = dir.path().join("ppud.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n\n[auth]\nopen = true\n\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\n[[devices]]\ndriver = \"eurotherm\"\n\
             id = \"furnace-1\"\nendpoint = \"modbus-tcp://{}\"\n",
            dir.path().join("data"),
            furnace.local_addr()
        ),
    )
    .expect("write config");
    let mut served = serve(&config, "info", "text").await;
    let metrics = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = served.stdout.next_line().await {
            if let Some(url) = line.trim().strip_prefix("metrics: http://") {
                return url.trim_end_matches("/metrics").to_owned();
            }
        }
        panic!("no metrics line in the banner");
    })
    .await
    .expect("banner");
    // One gRPC call, so the request counter has moved.
    let mut q = QueueServiceClient::connect(format!("http://{}", served.addr))
        .await
        .expect("connects");
    q.get_queue(pb::GetQueueRequest::default())
        .await
        .expect("get queue");
    let mut conn = tokio::net::TcpStream::connect(&metrics)
        .await
        .expect("metrics endpoint");
    tokio::io::AsyncWriteExt::write_all(
        &mut conn,
        b"GET /metrics HTTP/1.1\r\nHost: ppud\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("request");
    let mut body = String::new();
    tokio::time::timeout(DEADLINE, conn.read_to_string(&mut body))
        .await
        .expect("scrape within the deadline")
        .expect("read");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for series in [
        "ppu_queue_depth",
        "ppu_experiments{",
        "ppu_step_duration_seconds",
        "ppu_device_request_duration_seconds",
        "ppu_device_errors_total",
        "ppu_transport_reconnects_total",
        "ppu_event_log_events",
        "ppu_event_log_bytes",
        "ppu_active_streams{",
        "ppu_grpc_requests_total{",
        "ppu_grpc_request_duration_seconds_bucket{",
        "ppu_build_info{",
        "ppu_device_up{device=\"furnace-1\"}",
        "ppu_device_unsafe{device=\"furnace-1\"}",
        "ppu_alarms_active{severity=\"critical\"}",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(
            body.contains(series),
            "{series} missing from the scrape:\n{body}"
        );
    }
    assert!(
        body.contains(
            "ppu_grpc_requests_total{method=\"/ppu.v1.QueueService/GetQueue\",code=\"OK\"} 1"
        ),
        "the call is counted:\n{body}"
    );
    assert!(
        body.contains("ppu_device_errors_total{device=\"furnace-1\",kind=\"timeout\"}"),
        "per-device series carry the device id:\n{body}"
    );
    drop(q);
    stop(served).await;
    furnace.shutdown().await;
}

/// Sends `signal` (e.g. `-HUP`) to the daemon.
async fn signal(served: &Served, signal: &str) {
    let pid = served.child.id().expect("running");
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .await
        .expect("kill");
    assert!(status.success());
}

/// The next notification on `socket`, within the deadline.
async fn notification(socket: &tokio::net::UnixDatagram) -> String {
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, socket.recv(&mut buf))
        .await
        .expect("a notification within the deadline")
        .expect("recv");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `Type=notify` as systemd runs it: a real datagram socket as NOTIFY_SOCKET, a watchdog
/// interval in WATCHDOG_USEC. READY=1 comes once gRPC answers, WATCHDOG=1 keeps coming,
/// SIGHUP is RELOADING=1 then READY=1, SIGTERM STOPPING=1, and the exit is clean.
#[tokio::test]
async fn systemd_hears_ready_watchdog_reload_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    let config = dir.path().join("ppud.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n\n[auth]\nopen = true\n",
            dir.path().join("data")
        ),
    )
    .expect("write config");
    let served = serve_env(
        &config,
        "info",
        "text",
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().expect("utf-8")),
            // Pings every 100 ms.
            ("WATCHDOG_USEC", "200000"),
        ],
    )
    .await;
    let ready = notification(&socket).await;
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(ready.contains(&format!("STATUS=serving gRPC on {}", served.addr)));
    // Ready means serving.
    let mut q = QueueServiceClient::connect(format!("http://{}", served.addr))
        .await
        .expect("connects");
    q.get_queue(pb::GetQueueRequest::default())
        .await
        .expect("answers once ready");
    for _ in 0..3 {
        assert_eq!(notification(&socket).await, "WATCHDOG=1");
    }
    signal(&served, "-HUP").await;
    let mut next = notification(&socket).await;
    while next == "WATCHDOG=1" {
        next = notification(&socket).await;
    }
    assert!(next.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{next:?}");
    let mut next = notification(&socket).await;
    while next == "WATCHDOG=1" {
        next = notification(&socket).await;
    }
    assert_eq!(next, "READY=1");
    // Still serving after the reload.
    q.get_queue(pb::GetQueueRequest::default())
        .await
        .expect("answers after the reload");
    drop(q);
    let Served {
        mut child, stderr, ..
    } = served;
    let pid = child.id().expect("running").to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill")
            .success()
    );
    let mut next = notification(&socket).await;
    while next == "WATCHDOG=1" {
        next = notification(&socket).await;
    }
    assert!(next.starts_with("STOPPING=1"), "{next:?}");
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits within the deadline")
        .expect("wait");
    let stderr = stderr.await.expect("stderr");
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("reloaded on SIGHUP"), "{stderr}");
}

/// A long furnace program (an hour's hold at time scale 1).
fn long_furnace_spec() -> pb::ExperimentSpec {
    use pb::furnace_segment::Kind as S;
    pb::ExperimentSpec {
        name: "long".into(),
        sample_id: "s-long".into(),
        steps: vec![pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
                segments: [S::Hold(pb::Hold { duration_s: 3600.0 })]
                    .into_iter()
                    .map(|k| pb::FurnaceSegment { kind: Some(k) })
                    .collect(),
            })),
        }],
        ..Default::default()
    }
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

/// SIGHUP re-reads the token file: a token added to it is admitted, one removed from it is
/// refused, and the step running meanwhile runs on untouched.
#[tokio::test]
async fn sighup_reloads_tokens_without_interrupting_a_running_step() {
    use pb::experiment_service_client::ExperimentServiceClient;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = SimFurnace::new(FurnaceConfig::default(), Clock::new(1.0));
    let furnace = serve_tcp(SocketAddr::from(([127, 0, 0, 1], 0)), sim)
        .await
        .expect("simulated furnace");
    let (old, old_entry) = make_token("old-admin", "admin").await;
    let (new, new_entry) = make_token("new-admin", "admin").await;
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, &old_entry).expect("write tokens");
    let config = dir.path().join("ppud.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n\n[auth]\ntokens_file = \"tokens.toml\"\n\n\
             [[devices]]\ndriver = \"eurotherm\"\nid = \"furnace-1\"\nendpoint = \"modbus-tcp://{}\"\n",
            dir.path().join("data"),
            furnace.local_addr()
        ),
    )
    .expect("write config");
    let served = serve(&config, "info", "text").await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", served.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    let mut experiments = ExperimentServiceClient::new(channel);
    let batch = experiments
        .submit_batch(authed(
            pb::SubmitBatchRequest {
                idempotency_key: "reload-1".into(),
                experiments: vec![long_furnace_spec()],
            },
            &old,
        ))
        .await
        .expect("the old token submits")
        .into_inner();
    let id = batch.batch.expect("batch").experiment_ids[0].clone();
    let state = |token: String, id: String| {
        let mut experiments = experiments.clone();
        async move {
            experiments
                .get_experiment(authed(pb::GetExperimentRequest { id }, &token))
                .await
                .map(|r| r.into_inner().state)
        }
    };
    // Poll (with a deadline) until the step runs.
    tokio::time::timeout(DEADLINE, async {
        while state(old.clone(), id.clone()).await.expect("get")
            != pb::ExperimentState::Running as i32
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the experiment starts");
    assert_eq!(
        state(new.clone(), id.clone())
            .await
            .expect_err("not yet known")
            .code(),
        tonic::Code::Unauthenticated
    );

    // The new token replaces the old one in the file; SIGHUP.
    std::fs::write(&tokens, &new_entry).expect("rewrite tokens");
    signal(&served, "-HUP").await;
    tokio::time::timeout(DEADLINE, async {
        while state(new.clone(), id.clone()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the new token is admitted after SIGHUP");
    assert_eq!(
        state(old.clone(), id.clone())
            .await
            .expect_err("removed")
            .code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        state(new.clone(), id.clone()).await.expect("admitted"),
        pb::ExperimentState::Running as i32,
        "the running step is not interrupted by the reload"
    );
    let stderr = stop(served).await;
    assert!(stderr.contains("reloaded on SIGHUP"), "{stderr}");
    furnace.shutdown().await;
}

/// A CA's PEM and a server certificate and key for localhost/127.0.0.1 signed by it.
fn server_pki(name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("server cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// A new TLS connection to `addr` trusting only `ca`, and one call on it.
async fn tls_call(
    addr: &str,
    ca: &str,
) -> Result<QueueServiceClient<tonic::transport::Channel>, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut q = QueueServiceClient::new(channel);
    q.get_queue(pb::GetQueueRequest::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(q)
}

/// SIGHUP re-reads the certificate: new connections get the new one, a connection made
/// before keeps working, and a broken certificate file changes nothing.
#[tokio::test]
async fn sighup_gives_new_connections_the_renewed_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old_ca, old_cert, old_key) = server_pki("old");
    let (new_ca, new_cert, new_key) = server_pki("new");
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    std::fs::write(&cert, &old_cert).expect("write cert");
    std::fs::write(&key, &old_key).expect("write key");
    let config = dir.path().join("ppud.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n\n[auth]\nopen = true\n\n\
             [tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n",
            dir.path().join("data")
        ),
    )
    .expect("write config");
    // The notify socket says when a reload is done (READY=1 after RELOADING=1).
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    let served = serve_env(
        &config,
        "info",
        "text",
        &[("NOTIFY_SOCKET", socket_path.to_str().expect("utf-8"))],
    )
    .await;
    let reloaded = || async {
        while !notification(&socket).await.starts_with("RELOADING=1\n") {}
        assert_eq!(notification(&socket).await, "READY=1");
    };
    let mut before = tls_call(&served.addr, &old_ca)
        .await
        .expect("the old certificate");
    assert!(
        tls_call(&served.addr, &new_ca).await.is_err(),
        "not renewed yet"
    );

    std::fs::write(&cert, &new_cert).expect("renew cert");
    std::fs::write(&key, &new_key).expect("renew key");
    signal(&served, "-HUP").await;
    reloaded().await;
    tls_call(&served.addr, &new_ca)
        .await
        .expect("new connections get the new certificate after SIGHUP");
    assert!(
        tls_call(&served.addr, &old_ca).await.is_err(),
        "the old certificate is no longer served"
    );
    before
        .get_queue(pb::GetQueueRequest::default())
        .await
        .expect("a connection made before the reload keeps working");

    // A key that does not load: the renewed certificate stays.
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
    )
    .expect("break key");
    signal(&served, "-HUP").await;
    reloaded().await;
    tls_call(&served.addr, &new_ca)
        .await
        .expect("a broken key file changes nothing");

    let stderr = stop(served).await;
    assert!(stderr.contains("reloaded on SIGHUP"), "{stderr}");
    assert!(stderr.contains("TLS certificate from"), "{stderr}");
    assert!(stderr.contains("reload on SIGHUP failed"), "{stderr}");
}
