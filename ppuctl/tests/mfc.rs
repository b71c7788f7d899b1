//! The mass-flow controller family end to end through the real `ppuctl` binary and the real
//! daemon: a family added as a plugin (its driver and simulator folders and one registration
//! line each) is submitted from TOML and JSON batch files, refused out of range with the field
//! named, shown, watched and exported, with no MFC-specific code in ppuctl or the daemon.
//!
//! The simulated controller runs in this process on a real pty (`ppu_sim::mfc`, added to the
//! dev lab through the simulator's plugin registry) and the real `alicat` driver talks to it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use ppu_daemon::app::Daemon;
use ppu_daemon::config::Policies;
use ppu_daemon::dev::DevLab;
use ppu_daemon::devices::PollSettings;
use ppu_drivers::Clock;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Physical seconds per real second: the 120 s gas flows take 0.1 s.
const TIME_SCALE: f64 = 1200.0;
/// Upper bound on any wait (real time).
const DEADLINE: Duration = Duration::from_secs(60);

struct Lab {
    daemon: Daemon,
    devlab: DevLab,
}

impl Lab {
    /// The dev lab's plugin families only (the MFC), and the daemon.
    async fn start(data_dir: &Path) -> Lab {
        let mut devlab = DevLab::start(Clock::new(TIME_SCALE), 0)
            .await
            .expect("simulated lab");
        devlab
            .add_plugin_families()
            .await
            .expect("the plugin families' simulated devices");
        let poll = PollSettings {
            poll_interval: Duration::from_millis(100),
            reading_log_interval: Duration::from_secs(1),
        };
        let daemon = devlab
            .start_daemon(
                "127.0.0.1:0".parse().expect("address"),
                data_dir,
                poll,
                &Policies::default(),
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
}

async fn ppuctl(url: &str, args: &[&str], stdin: Option<&str>) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ppuctl"));
    cmd.arg("--addr")
        .arg(url)
        .args(args)
        .env_remove("PPU_ADDR")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn ppuctl");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).await.expect("write stdin");
        drop(pipe);
    }
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("ppuctl finishes within the deadline")
        .expect("ppuctl runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `ppuctl --json watch --experiment ID` until a line contains `until`; returns all it
/// printed.
async fn watch_until(url: &str, id: &str, until: &str) -> String {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_ppuctl"))
        .args([
            "--addr",
            url,
            "--json",
            "watch",
            "--from-start",
            "--experiment",
            id,
        ])
        .env_remove("PPU_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ppuctl watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(until) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {until} within the deadline:\n{seen}"));
    let _ = child.kill().await;
    seen
}

/// The experiment ids of a `--json submit`.
fn submitted(run: &Run) -> Vec<String> {
    let json = run.json();
    json["batch"]["experiment_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no experiment ids: {json:#}"))
        .iter()
        .map(|v| v.as_str().expect("id").to_owned())
        .collect()
}

/// Polls `show` until the experiment's state is terminal (bounded by the deadline).
async fn finished(url: &str, id: &str) -> Value {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let shown = ppuctl(url, &["--json", "show", id], None).await.json();
        let state = shown["state"].as_str().unwrap_or_default().to_owned();
        if !matches!(
            state.as_str(),
            "EXPERIMENT_STATE_QUEUED" | "EXPERIMENT_STATE_RUNNING"
        ) {
            return shown;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{id} still {state}: {shown:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const TOML_BATCH: &str = r#"
idempotency_key = "mfc-toml"

[[experiments]]
name = "CO2 purge"
sample_id = "S-1"

[[experiments.steps]]
gas_flow = { gas = "CO2", flow_sccm = 50, duration_s = 120 }
"#;

const JSON_BATCH: &str = r#"{
  "idempotency_key": "mfc-json",
  "experiments": [
    {
      "name": "N2 sweep",
      "steps": [{ "device_id": "mfc-1", "gas_flow": { "gas": "N2", "flow_sccm": 200.0, "duration_s": 60 } }]
    }
  ]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_family_is_submitted_refused_shown_watched_and_exported_through_ppuctl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(dir.path()).await;
    let url = lab.url();

    // The daemon lists it like any other device, with its family's schema names.
    let devices = ppuctl(&url, &["--json", "devices"], None).await.json();
    let mfc = devices
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == "mfc-1"))
        .unwrap_or_else(|| panic!("no mfc-1 in {devices:#}"))
        .clone();
    assert_eq!(mfc["family_name"], "mfc", "{mfc:#}");
    assert_eq!(mfc["driver"], "alicat", "{mfc:#}");
    assert_eq!(mfc["capability_names"], serde_json::json!(["gas_flow"]));
    assert_eq!(mfc["limits"]["values"]["max_flow_sccm"], 500.0, "{mfc:#}");

    // Out of range: refused by the daemon against the declared limit, the field named.
    let over = TOML_BATCH
        .replace("mfc-toml", "mfc-over")
        .replace("flow_sccm = 50", "flow_sccm = 900");
    let file = dir.path().join("over.toml");
    std::fs::write(&file, over).expect("write batch");
    let run = ppuctl(&url, &["submit", file.to_str().expect("path")], None).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.starts_with("error: INVALID_ARGUMENT: "),
        "{run:#?}"
    );
    assert!(
        run.stderr
            .contains("experiments[0].steps[0].gas_flow.flow_sccm: 900 exceeds max_flow_sccm 500"),
        "{run:#?}"
    );
    // A gas the rig is not plumbed for: refused with what it accepts.
    std::fs::write(&file, TOML_BATCH.replace("\"CO2\"", "\"He\"")).expect("write batch");
    let run = ppuctl(&url, &["submit", file.to_str().expect("path")], None).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.contains("experiments[0].steps[0].gas_flow.gas")
            && run.stderr.contains("mfc-1 accepts CO2, N2, Ar"),
        "{run:#?}"
    );

    // From TOML and from JSON (stdin).
    let file = dir.path().join("batch.toml");
    std::fs::write(&file, TOML_BATCH).expect("write batch");
    let from_toml = submitted(
        &ppuctl(
            &url,
            &["--json", "submit", file.to_str().expect("path")],
            None,
        )
        .await,
    );
    let from_json = submitted(&ppuctl(&url, &["--json", "submit", "-"], Some(JSON_BATCH)).await);
    assert_eq!((from_toml.len(), from_json.len()), (1, 1));

    for (id, gas, setpoint) in [(&from_toml[0], "CO2", 50.0), (&from_json[0], "N2", 200.0)] {
        let shown = finished(&url, id).await;
        assert_eq!(shown["state"], "EXPERIMENT_STATE_SUCCEEDED", "{shown:#}");
        // The typed result, decoded through the daemon's schema, keyed by the step's name.
        let result = &shown["results"][0]["gas_flow"];
        assert_eq!(result["gas"], gas, "{shown:#}");
        assert_eq!(result["setpoint_sccm"], setpoint, "{shown:#}");
        let settled = result["settled_flow_sccm"].as_f64().expect("settled flow");
        assert!(
            (settled - setpoint).abs() < 0.02 * 500.0,
            "settled {settled} vs setpoint {setpoint}: {shown:#}"
        );
        assert!(
            result["trace"].as_array().is_some_and(|t| t.len() > 10),
            "{shown:#}"
        );

        // Human text from the family's display templates.
        let text = ppuctl(&url, &["show", id], None).await;
        let text = text.ok();
        assert!(
            text.contains(&format!("flow {gas} at {setpoint} sccm for 2 min"))
                || text.contains(&format!("flow {gas} at {setpoint} sccm for 1 min")),
            "{text}"
        );
        assert!(text.contains("settled"), "{text}");

        // Export: the trace as CSV rows, the result as JSON.
        let csv = ppuctl(&url, &["export", id, "--format", "csv"], None).await;
        let csv = csv.ok();
        let mut lines = csv.lines();
        let header = lines.next().unwrap_or_default();
        assert!(header.contains("mass_flow_sccm"), "{csv}");
        assert!(lines.count() > 10, "{csv}");
        let json: Value = serde_json::from_str(
            ppuctl(&url, &["export", id, "--format", "json"], None)
                .await
                .ok(),
        )
        .expect("export json");
        assert!(json.to_string().contains("settled_flow_sccm"), "{json:#}");
    }

    // The event log, as `watch` prints it: the gas flow's progress and its typed result.
    let seen = watch_until(&url, &from_toml[0], "\"step_finished\"").await;
    assert!(seen.contains("\"step_progress\""), "{seen}");
    assert!(seen.contains("sccm"), "{seen}");

    lab.stop().await;
}
