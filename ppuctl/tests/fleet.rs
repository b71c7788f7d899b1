//! `ppuctl fleet` against a real `nats-server` (JetStream, free loopback port) and a real
//! daemon in-process that joined it: the lab shows with its capabilities, in text and JSON.
//! Skipped with a notice when nats-server is not installed (CI installs it).

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ppu_daemon::config::{FleetConfig, Policies};
use ppu_daemon::dev::DevLab;
use ppu_daemon::devices::PollSettings;
use ppu_drivers::Clock;

const DEADLINE: Duration = Duration::from_secs(60);

struct Nats(Child);

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ppuctl_fleet(url: &str, json: bool) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ppuctl"));
    if json {
        cmd.arg("--json");
    }
    let out = cmd
        .args(["fleet", "--nats", url])
        .env_remove("PPU_NATS")
        .stdin(Stdio::null())
        .output()
        .expect("ppuctl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_lists_the_labs_of_the_registry() {
    let Some(bin) = ppu_daemon::dev::nats_server_binary() else {
        eprintln!("SKIPPED: nats-server is not installed (apt-get install nats-server)");
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let _nats = Nats(
        std::process::Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path().join("nats"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts"),
    );
    let url = format!("nats://127.0.0.1:{port}");
    let lab = DevLab::start(Clock::new(2000.0), 1).await.expect("lab");
    let policies = Policies {
        fleet: Some(FleetConfig {
            servers: vec![url.clone()],
            lab: Some("lab-x".into()),
            user: None,
            password: None,
            nkey_seed_file: None,
            creds_file: None,
            tls: None,
            replicas: 1,
            capacity: None,
            heartbeat_s: 0.5,
        }),
        ..Policies::default()
    };
    let daemon = lab
        .start_daemon(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &dir.path().join("data"),
            PollSettings {
                poll_interval: Duration::from_millis(100),
                reading_log_interval: Duration::from_secs(1),
            },
            &policies,
        )
        .await
        .expect("daemon starts");
    let deadline = Instant::now() + DEADLINE;
    let text = loop {
        let (ok, out, err) = tokio::task::block_in_place(|| ppuctl_fleet(&url, false));
        if ok && out.contains("lab-x") {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "the lab never showed: {out}{err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(text.contains("furnace_program"), "{text}");
    let (ok, out, err) = tokio::task::block_in_place(|| ppuctl_fleet(&url, true));
    assert!(ok, "{err}");
    let labs: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(labs[0]["lab"], "lab-x", "{labs}");
    assert_eq!(labs[0]["capacity"], 1, "{labs}");
    daemon.shutdown().await;
}
