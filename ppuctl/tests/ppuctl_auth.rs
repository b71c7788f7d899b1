//! The real `ppuctl` binary against a secured daemon (in-process, one simulated furnace behind
//! Modbus TCP) whose tokens come from a tokens file: the token from --token-file or PPU_TOKEN
//! on every call and on streams, the hints for refused calls, the Unix socket, TLS and mutual
//! TLS. The daemon's own role × RPC matrix is tested in daemon/tests/security.rs; this file
//! tests the client.
//!
//! Nothing waits on a sleep: every wait reads process output, bounded by [`DEADLINE`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ppu_daemon::app::{Daemon, LocalSocket, Security, TlsPem};
use ppu_daemon::auth::{Authenticator, Mode, Role, Tokens, hash_token, hex};
use ppu_daemon::config::Policies;
use ppu_daemon::dev::DevLab;
use ppu_daemon::devices::PollSettings;
use ppu_drivers::Clock;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

/// Upper bound on any wait (real time).
const DEADLINE: Duration = Duration::from_secs(60);

const VIEWER: &str = "ppu_8f1c0d5e7a9b3c2d4e6f8a0b1c3d5e7f9a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7d";
const TECHNICIAN: &str = "ppu_1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b";

/// The tokens file ppud reads: SHA-256 hashes only.
fn write_tokens_file(dir: &Path) -> PathBuf {
    let entry = |principal: &str, role: &str, token: &str| {
        format!(
            "[[token]]\nprincipal = \"{principal}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n\n",
            hex(&hash_token(token))
        )
    };
    let path = dir.join("tokens.toml");
    let text = entry("dash", "viewer", VIEWER) + &entry("tech-ana", "technician", TECHNICIAN);
    std::fs::write(&path, text).expect("write tokens file");
    path
}

/// A file holding one token, as an operator would keep it (with a trailing newline).
fn write_token(dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).expect("write token file");
    path
}

/// Token authentication from the tokens file in `dir`.
fn secured(dir: &Path) -> Security {
    let tokens = Tokens::load(&write_tokens_file(dir)).expect("tokens file loads");
    Security {
        auth: Authenticator {
            mode: Mode::Tokens(tokens),
            ..Authenticator::default()
        },
        ..Security::default()
    }
}

struct Lab {
    daemon: Daemon,
    devlab: DevLab,
}

impl Lab {
    async fn start(data_dir: &Path, security: Security) -> Lab {
        let devlab = DevLab::start(Clock::new(2000.0), 1)
            .await
            .expect("simulated furnace");
        let poll = PollSettings {
            poll_interval: Duration::from_millis(100),
            reading_log_interval: Duration::from_secs(1),
        };
        let daemon = devlab
            .start_secured_daemon(
                "127.0.0.1:0".parse().expect("addr"),
                data_dir,
                poll,
                &Policies::default(),
                security,
            )
            .await
            .expect("daemon starts");
        Lab { daemon, devlab }
    }

    fn url(&self) -> String {
        format!("http://{}", self.daemon.addr())
    }

    async fn stop(self) {
        tokio::time::timeout(DEADLINE, self.daemon.shutdown())
            .await
            .expect("the daemon shuts down within the deadline");
        self.devlab.shutdown().await;
    }
}

/// What one ppuctl run produced.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "ppuctl failed: {self:#?}");
        &self.stdout
    }

    fn json(&self) -> Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// Asserts failure with exit code 1 and returns stderr.
    fn failed(&self) -> &str {
        assert_eq!(self.code, Some(1), "expected exit code 1: {self:#?}");
        &self.stderr
    }
}

/// `ppuctl ARGS…` with a clean environment plus `env`.
fn ppuctl_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ppuctl"));
    cmd.args(args)
        .env_remove("PPU_ADDR")
        .env_remove("PPU_TOKEN")
        .env_remove("PPU_TOKEN_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn ppuctl(args: &[&str], env: &[(&str, &str)]) -> Run {
    let child = ppuctl_command(args, env).spawn().expect("spawn ppuctl");
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("ppuctl {args:?} did not finish within the deadline"))
        .expect("ppuctl output");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("utf-8 stderr"),
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test]
async fn without_a_valid_token_ppuctl_fails_with_the_hint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(&dir.path().join("data"), secured(dir.path())).await;
    let url = lab.url();

    let run = ppuctl(&["--addr", &url, "list"], &[]).await;
    let stderr = run.failed();
    assert!(stderr.contains("error: UNAUTHENTICATED: "), "{stderr}");
    assert!(
        stderr.contains("set PPU_TOKEN or --token-file"),
        "no hint: {stderr}"
    );

    // A token the daemon does not know: the hint names where it came from, never the token.
    let wrong = "ppu_0000000000000000000000000000000000000000000000000000000000000000";
    let run = ppuctl(&["--addr", &url, "list"], &[("PPU_TOKEN", wrong)]).await;
    let stderr = run.failed();
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    assert!(
        stderr.contains("did not accept the token from PPU_TOKEN"),
        "{stderr}"
    );
    assert!(!stderr.contains(wrong), "the token was printed: {stderr}");

    // A stream is refused the same way and is not retried forever.
    let run = ppuctl(&["--addr", &url, "watch"], &[]).await;
    assert!(
        run.failed().contains("set PPU_TOKEN or --token-file"),
        "{run:#?}"
    );

    // An empty token file is the caller's mistake, caught before any call.
    let empty = write_token(dir.path(), "empty", "  ");
    let run = ppuctl(
        &["--addr", &url, "--token-file", path_str(&empty), "list"],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.contains("is empty"), "{run:#?}");
    lab.stop().await;
}

#[tokio::test]
async fn a_viewer_token_lists_but_may_not_pause_the_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(&dir.path().join("data"), secured(dir.path())).await;
    let url = lab.url();
    let viewer_file = write_token(dir.path(), "viewer.token", VIEWER);
    let viewer = ["--addr", &url, "--token-file", path_str(&viewer_file)];

    let run = ppuctl(&[&viewer[..], &["--json", "list"]].concat(), &[]).await;
    assert_eq!(run.json()["experiments"], Value::Array(vec![]));

    let run = ppuctl(&[&viewer[..], &["queue", "pause"]].concat(), &[]).await;
    let stderr = run.failed();
    assert!(stderr.contains("error: PERMISSION_DENIED: "), "{stderr}");
    assert!(stderr.contains("role viewer may not call"), "{stderr}");
    assert!(stderr.contains("QueueService/PauseQueue"), "{stderr}");
    assert!(!stderr.contains(VIEWER), "the token was printed: {stderr}");

    // PPU_TOKEN_FILE works like --token-file, and PPU_TOKEN carries a token by value.
    let tech_file = write_token(dir.path(), "tech.token", TECHNICIAN);
    let run = ppuctl(
        &[
            "--addr",
            &url,
            "--json",
            "queue",
            "pause",
            "--reason",
            "auth test",
        ],
        &[("PPU_TOKEN_FILE", path_str(&tech_file))],
    )
    .await;
    assert_eq!(run.json()["state"], "QUEUE_STATE_PAUSED");
    let run = ppuctl(
        &["--addr", &url, "--json", "queue", "resume"],
        &[("PPU_TOKEN", TECHNICIAN)],
    )
    .await;
    assert_eq!(run.json()["state"], "QUEUE_STATE_RUNNING");
    // --token-file wins over PPU_TOKEN.
    let run = ppuctl(
        &[&viewer[..], &["queue", "pause"]].concat(),
        &[("PPU_TOKEN", TECHNICIAN)],
    )
    .await;
    assert!(run.failed().contains("PERMISSION_DENIED"), "{run:#?}");
    lab.stop().await;
}

#[tokio::test]
async fn watch_sends_the_token_on_its_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(&dir.path().join("data"), secured(dir.path())).await;
    let url = lab.url();
    ppuctl(
        &["--addr", &url, "queue", "pause", "--reason", "for the log"],
        &[("PPU_TOKEN", TECHNICIAN)],
    )
    .await
    .ok();

    let mut child = ppuctl_command(
        &["--addr", &url, "--json", "watch", "--from-start"],
        &[("PPU_TOKEN", VIEWER)],
    )
    .spawn()
    .expect("spawn ppuctl watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut stderr = child.stderr.take().expect("stderr");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => {
                let mut err = String::new();
                let _ = stderr.read_to_string(&mut err).await;
                panic!("watch ended before the pause event ({other:?}); stderr: {err}");
            }
        };
        let event: Value = serde_json::from_str(&line).expect("JSON event");
        if event["queue_state_changed"].is_object() {
            break;
        }
    }
    child.kill().await.expect("kill ppuctl watch");
    lab.stop().await;
}

#[tokio::test]
async fn the_unix_socket_works_with_and_without_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("ppud.sock");
    let mut security = secured(dir.path());
    security.local = Some(LocalSocket {
        path: socket.clone(),
        mode: 0o660,
        role: Role::Viewer,
        allowed_uids: vec![],
    });
    let lab = Lab::start(&dir.path().join("data"), security).await;
    let addr = format!("unix:{}", socket.display());

    // This test runs as the daemon's own user: an admin on the socket without a token.
    let run = ppuctl(&["--addr", &addr, "--json", "queue", "pause"], &[]).await;
    assert_eq!(run.json()["state"], "QUEUE_STATE_PAUSED");
    // A token sent over the socket wins over the peer credentials.
    let run = ppuctl(
        &["--addr", &addr, "queue", "resume"],
        &[("PPU_TOKEN", VIEWER)],
    )
    .await;
    assert!(
        run.failed().contains("role viewer may not call"),
        "{run:#?}"
    );
    let run = ppuctl(
        &[
            "--addr",
            &format!("unix://{}", socket.display()),
            "--json",
            "queue",
        ],
        &[("PPU_TOKEN", VIEWER)],
    )
    .await;
    assert_eq!(run.json()["state"], "QUEUE_STATE_PAUSED");
    // A socket that is not there: a clear UNAVAILABLE.
    let missing = format!("unix:{}", dir.path().join("nope.sock").display());
    let stderr = ppuctl(&["--addr", &missing, "queue"], &[])
        .await
        .failed()
        .to_owned();
    assert!(
        stderr.contains("UNAVAILABLE") && stderr.contains("No such file"),
        "{stderr}"
    );
    lab.stop().await;
}

/// A CA, a server certificate for localhost and 127.0.0.1, and a client certificate (PEM).
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki(name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&server_key, &ca)
        .expect("server cert");
    let client_key = KeyPair::generate().expect("key");
    let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    client_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} client"));
    let client = client_params
        .signed_by(&client_key, &ca)
        .expect("client cert");
    Pki {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[tokio::test]
async fn tls_and_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pki("lab");
    let mut security = secured(dir.path());
    security.tls = Some(TlsPem {
        cert: p.server_cert.clone().into_bytes(),
        key: p.server_key.clone().into_bytes(),
        client_ca: Some(p.ca.clone().into_bytes()),
    });
    let lab = Lab::start(&dir.path().join("data"), security).await;
    let https = format!("https://{}", lab.daemon.addr());
    let ca = write(dir.path(), "ca.crt", &p.ca);
    let cert = write(dir.path(), "client.crt", &p.client_cert);
    let key = write(dir.path(), "client.key", &p.client_key);
    let tls = [
        "--addr",
        &https,
        "--tls-ca",
        path_str(&ca),
        "--tls-cert",
        path_str(&cert),
        "--tls-key",
        path_str(&key),
    ];
    let viewer = [("PPU_TOKEN", VIEWER)];

    let run = ppuctl(&[&tls[..], &["--json", "queue"]].concat(), &viewer).await;
    assert_eq!(run.json()["state"], "QUEUE_STATE_RUNNING");
    // Verified against another name: the certificate names localhost as well.
    let run = ppuctl(
        &[&tls[..], &["--tls-domain", "localhost", "--json", "queue"]].concat(),
        &viewer,
    )
    .await;
    assert_eq!(run.json()["state"], "QUEUE_STATE_RUNNING");
    // ... but not ppud.example.
    let run = ppuctl(
        &[&tls[..], &["--tls-domain", "ppud.example", "queue"]].concat(),
        &viewer,
    )
    .await;
    assert!(run.failed().contains("UNAVAILABLE"), "{run:#?}");
    // mTLS: no client certificate, no call (the daemon drops the connection after the
    // handshake), and a hint about the missing certificate.
    let run = ppuctl(&[&tls[..4], &["queue"]].concat(), &viewer).await;
    assert!(
        run.failed().contains("pass --tls-cert and --tls-key"),
        "{run:#?}"
    );
    // A CA that did not sign the server's certificate: the handshake fails, and says why.
    let other = write(dir.path(), "other-ca.crt", &pki("other").ca);
    let run = ppuctl(
        &[
            &["--addr", &https, "--tls-ca", path_str(&other)][..],
            &tls[4..],
            &["queue"],
        ]
        .concat(),
        &viewer,
    )
    .await;
    let stderr = run.failed();
    assert!(
        stderr.contains("UNAVAILABLE") && stderr.contains("certificate"),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint: the TLS handshake failed"),
        "{stderr}"
    );
    // TLS still needs the token.
    let run = ppuctl(&[&tls[..], &["queue"]].concat(), &[]).await;
    assert!(
        run.failed().contains("set PPU_TOKEN or --token-file"),
        "{run:#?}"
    );
    // Plain text to the TLS port fails.
    let plain = format!("http://{}", lab.daemon.addr());
    let run = ppuctl(&["--addr", &plain, "queue"], &viewer).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    lab.stop().await;
}
