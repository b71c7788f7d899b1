//! The real `ppuctl` binary against the real daemon: `ppud`'s `Daemon` started in-process with a
//! simulated lab (simulated Eurotherm furnaces behind Modbus TCP, reached through the real
//! drivers), on an ephemeral port and a temporary data directory.
//!
//! These tests live in the ppuctl package (not tests/) because only here does Cargo hand us the
//! freshly built `ppuctl` binary (`CARGO_BIN_EXE_ppuctl`). Nothing waits on a sleep: every wait
//! reads process output or events, bounded by [`DEADLINE`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ppu_daemon::app::Daemon;
use ppu_daemon::config::Policies;
use ppu_daemon::dev::DevLab;
use ppu_daemon::devices::PollSettings;
use ppu_daemon::security::Security;
use ppu_drivers::Clock;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

/// Physical seconds per real second: a 2-hour program takes ~3.6 s.
const TIME_SCALE: f64 = 2000.0;
/// Upper bound on any wait (real time).
const DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The lab: a real daemon with simulated devices, as `ppud dev` runs it.
// ---------------------------------------------------------------------------------------------

struct Lab {
    daemon: Daemon,
    devlab: DevLab,
}

impl Lab {
    /// Starts one simulated furnace and the daemon on `data_dir`, listening on `listen`.
    async fn start(data_dir: &Path, listen: SocketAddr) -> Lab {
        Lab::start_secured(data_dir, listen, Security::default()).await
    }

    /// [`Lab::start`] with `security` (e.g. a metrics endpoint).
    async fn start_secured(data_dir: &Path, listen: SocketAddr, security: Security) -> Lab {
        let clock = Clock::new(TIME_SCALE);
        let devlab = DevLab::start(clock, 1).await.expect("simulated lab");
        let poll = PollSettings {
            poll_interval: Duration::from_millis(100),
            reading_log_interval: Duration::from_secs(1),
        };
        let daemon = devlab
            .start_secured_daemon(listen, data_dir, poll, &Policies::default(), security)
            .await
            .expect("daemon starts");
        Lab { daemon, devlab }
    }

    /// A fresh lab on an ephemeral port.
    async fn fresh(data_dir: &Path) -> Lab {
        Lab::start(data_dir, "127.0.0.1:0".parse().unwrap()).await
    }

    fn url(&self) -> String {
        format!("http://{}", self.daemon.addr())
    }

    /// Graceful shutdown of the daemon, then of the simulators.
    async fn stop(self) {
        tokio::time::timeout(DEADLINE, self.daemon.shutdown())
            .await
            .expect("the daemon shuts down within the deadline");
        self.devlab.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Running ppuctl.
// ---------------------------------------------------------------------------------------------

/// What one ppuctl run produced.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts success and returns stdout.
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "ppuctl failed: {self:#?}");
        &self.stdout
    }

    /// Asserts success and parses stdout as one JSON document.
    fn json(&self) -> Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

fn ppuctl_command(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ppuctl"));
    cmd.arg("--addr")
        .arg(url)
        .args(args)
        .env_remove("PPU_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs `ppuctl --addr URL ARGS…` to completion (within the deadline).
async fn ppuctl(url: &str, args: &[&str]) -> Run {
    ppuctl_stdin(url, args, None).await
}

/// Runs ppuctl with `stdin` (if any) piped to it.
async fn ppuctl_stdin(url: &str, args: &[&str], stdin: Option<&str>) -> Run {
    let mut cmd = ppuctl_command(url, args);
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn ppuctl");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).await.expect("write stdin");
        drop(pipe);
    }
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

/// A running `ppuctl --json watch`, read line by line.
struct Watch {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: JoinHandle<String>,
    /// Each stderr line as it is written.
    stderr_lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every event printed so far, in order.
    events: Vec<Value>,
}

impl Watch {
    async fn spawn(url: &str, args: &[&str]) -> Watch {
        let mut argv = vec!["--json", "watch"];
        argv.extend_from_slice(args);
        let mut child = ppuctl_command(url, &argv)
            .spawn()
            .expect("spawn ppuctl watch");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let (tx, stderr_lines) = tokio::sync::mpsc::unbounded_channel();
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            while let Ok(Some(line)) = err.next_line().await {
                s.push_str(&line);
                s.push('\n');
                let _ = tx.send(line);
            }
            s
        });
        Watch {
            child,
            lines,
            stderr,
            stderr_lines,
            events: Vec::new(),
        }
    }

    /// The next line ppuctl writes to stderr (within the deadline).
    async fn stderr_line(&mut self) -> String {
        tokio::time::timeout(DEADLINE, self.stderr_lines.recv())
            .await
            .expect("a stderr line within the deadline")
            .expect("ppuctl watch exited before writing to stderr")
    }

    /// Waits until a default (tail) watch has its stream open; returns the sequence it
    /// follows after.
    async fn tail_start(&mut self) -> u64 {
        let line = self.stderr_line().await;
        line.strip_prefix("watch: new events after sequence ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not the tail's start line: {line}"))
    }

    /// Reads events until `done(events)` holds; fails at the deadline or if ppuctl exits.
    async fn read_until(&mut self, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !done(&self.events) {
            match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    let event: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("watch printed a non-JSON line ({e}): {line}"));
                    self.events.push(event);
                }
                Ok(Ok(None)) => panic!(
                    "ppuctl watch exited after {} events, waiting for {what}",
                    self.events.len()
                ),
                Ok(Err(e)) => panic!("reading ppuctl watch: {e}"),
                Err(_) => panic!(
                    "deadline passed after {} events, waiting for {what}; last: {:?}",
                    self.events.len(),
                    self.events.last()
                ),
            }
        }
    }

    /// Kills ppuctl and returns what it wrote to stderr.
    async fn kill(mut self) -> String {
        self.child.kill().await.expect("kill ppuctl watch");
        tokio::time::timeout(DEADLINE, self.stderr)
            .await
            .expect("stderr closes")
            .expect("stderr task")
    }
}

// ---------------------------------------------------------------------------------------------
// Reading output.
// ---------------------------------------------------------------------------------------------

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// The human output of `ppuctl submit`.
#[derive(Debug, PartialEq)]
struct Submitted {
    batch: String,
    duplicate: bool,
    experiments: Vec<String>,
}

fn parse_submit(stdout: &str) -> Submitted {
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name:?} line in:\n{stdout}"))
            .trim()
            .to_owned()
    };
    let batch = field("batch:");
    let duplicate = field("duplicate:");
    let count: usize = field("experiments:").parse().expect("experiment count");
    let experiments: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(experiments.len(), count, "{stdout}");
    assert!(!batch.is_empty(), "{stdout}");
    Submitted {
        batch,
        duplicate: duplicate.starts_with("yes"),
        experiments,
    }
}

/// The experiment ids of `ppuctl --json list` output, in order.
fn listed_ids(list: &Value) -> Vec<String> {
    list["experiments"]
        .as_array()
        .expect("experiments array")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect()
}

/// The state an event moved `experiment` to, if it is a state change of that experiment.
fn moved_to<'a>(event: &'a Value, experiment: &str) -> Option<&'a str> {
    if event["experiment_id"] != experiment {
        return None;
    }
    event["experiment_state_changed"]["to"].as_str()
}

fn is_terminal(state: &str) -> bool {
    [
        "EXPERIMENT_STATE_SUCCEEDED",
        "EXPERIMENT_STATE_FAILED",
        "EXPERIMENT_STATE_CANCELLED",
        "EXPERIMENT_STATE_INTERRUPTED",
    ]
    .contains(&state)
}

/// A JSON batch file of furnace experiments, each a single jump to `temperature_c`.
fn furnace_batch(key: &str, names: &[&str], temperature_c: f64) -> String {
    let experiments: Vec<Value> = names
        .iter()
        .map(|name| {
            serde_json::json!({
                "name": name,
                "steps": [{ "furnace": { "segments": [
                    { "step": { "temperature_c": temperature_c } }
                ]}}],
            })
        })
        .collect();
    serde_json::json!({ "idempotency_key": key, "experiments": experiments }).to_string()
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_is_idempotent_and_a_new_key_makes_a_new_batch() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::fresh(dir.path()).await;
    let url = lab.url();

    // Paused, nothing starts: every experiment stays queued while we look.
    let paused = ppuctl(&url, &["queue", "pause", "--reason", "ppuctl test"]).await;
    assert!(paused.ok().starts_with("queue: PAUSED\n"), "{paused:#?}");

    let toml = example("batch.toml");
    let toml = toml.to_str().unwrap();
    let first = parse_submit(ppuctl(&url, &["submit", toml]).await.ok());
    assert!(!first.duplicate, "{first:?}");
    assert_eq!(first.experiments.len(), 3, "{first:?}");

    // The human output names each experiment after its id.
    let again = ppuctl(&url, &["submit", toml]).await;
    let text = again.ok();
    for (id, name) in first.experiments.iter().zip([
        "HKUST-1 activation 170 C",
        "Mg-Al LDH calcination 450 C",
        "SBA-15 template removal 550 C",
    ]) {
        assert!(text.contains(&format!("  {id}  {name}\n")), "{text}");
    }
    assert!(
        text.contains("key:         calcination-round-1\n"),
        "{text}"
    );

    // The same file again: a duplicate, with the same batch and experiment ids.
    let second = parse_submit(text);
    assert!(second.duplicate, "{text}");
    assert_eq!(second.batch, first.batch);
    assert_eq!(second.experiments, first.experiments);

    // The JSON file holds the same batch under the same key: also a duplicate.
    let json = example("batch.json");
    let from_json = ppuctl(&url, &["--json", "submit", json.to_str().unwrap()])
        .await
        .json();
    assert_eq!(from_json["duplicate"], true, "{from_json}");
    assert_eq!(from_json["batch"]["id"], first.batch.as_str());
    assert_eq!(
        from_json["batch"]["experiment_ids"],
        serde_json::json!(first.experiments)
    );

    // Another key: a new batch with new experiments.
    let third = parse_submit(ppuctl(&url, &["submit", toml, "--key", "other"]).await.ok());
    assert!(!third.duplicate, "{third:?}");
    assert_ne!(third.batch, first.batch);
    assert_eq!(third.experiments.len(), 3);
    assert!(
        third
            .experiments
            .iter()
            .all(|id| !first.experiments.contains(id)),
        "{first:?} {third:?}"
    );

    // The original key with other content is refused: exit 2, ALREADY_EXISTS.
    let clash = furnace_batch("calcination-round-1", &["different"], 60.0);
    let refused = ppuctl_stdin(&url, &["submit", "-"], Some(&clash)).await;
    assert_eq!(refused.code, Some(2), "{refused:#?}");
    assert!(
        refused.stderr.starts_with("error: ALREADY_EXISTS: "),
        "{refused:#?}"
    );

    // Exactly the six experiments of the two batches exist, all still queued.
    let list = ppuctl(&url, &["--json", "list", "--all", "--sort", "oldest"])
        .await
        .json();
    let all: Vec<String> = first
        .experiments
        .iter()
        .chain(&third.experiments)
        .cloned()
        .collect();
    assert_eq!(listed_ids(&list), all, "{list:#}");
    for e in list["experiments"].as_array().unwrap() {
        assert_eq!(e["state"], "EXPERIMENT_STATE_QUEUED", "{e:#}");
    }
    let batch_list = ppuctl(
        &url,
        &[
            "--json",
            "list",
            "--sort",
            "oldest",
            "--batch",
            &third.batch,
        ],
    )
    .await
    .json();
    assert_eq!(listed_ids(&batch_list), third.experiments);

    // The queue is paused and holds them in start order: priority 10 first, then submission
    // order.
    let (a, b) = (&first.experiments, &third.experiments);
    let start_order = [&a[1], &b[1], &a[0], &a[2], &b[0], &b[2]];
    let queue = ppuctl(&url, &["--json", "queue"]).await.json();
    assert_eq!(queue["state"], "QUEUE_STATE_PAUSED", "{queue:#}");
    assert_eq!(queue["running_ids"], serde_json::json!([]), "{queue:#}");
    assert_eq!(
        queue["queued_ids"],
        serde_json::json!(start_order),
        "{queue:#}"
    );
    let human = ppuctl(&url, &["queue"]).await;
    let mut expected = "queue: PAUSED\nrunning (0):\nqueued (6), in start order:\n".to_owned();
    for id in start_order {
        expected.push_str(&format!("  {id}\n"));
    }
    assert_eq!(human.ok(), expected);

    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_all_follows_page_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::fresh(dir.path()).await;
    let url = lab.url();
    ppuctl(&url, &["queue", "pause"]).await.ok();

    let names = ["p1", "p2", "p3", "p4", "p5"];
    let batch = furnace_batch("paging", &names, 40.0);
    let submitted = parse_submit(
        ppuctl_stdin(&url, &["submit", "-"], Some(&batch))
            .await
            .ok(),
    );
    assert_eq!(submitted.experiments.len(), 5);

    let oldest_first = submitted.experiments.clone();
    let newest_first: Vec<String> = oldest_first.iter().rev().cloned().collect();

    // One page only without --all, with a token for the rest: newest first by default.
    let page = ppuctl(&url, &["--json", "list", "--limit", "2"])
        .await
        .json();
    assert_eq!(listed_ids(&page), newest_first[..2]);
    assert_ne!(page["next_page_token"], "", "{page:#}");
    let page = ppuctl(
        &url,
        &["--json", "list", "--limit", "2", "--sort", "oldest"],
    )
    .await
    .json();
    assert_eq!(listed_ids(&page), oldest_first[..2]);
    let human = ppuctl(&url, &["list", "--limit", "2"]).await;
    assert!(
        human.stderr.contains("pass --all to list every page"),
        "{human:#?}"
    );
    assert_eq!(
        human.ok().lines().count(),
        3,
        "header and two rows: {human:#?}"
    );

    // --all follows the tokens to the end: every experiment once, in order, either order.
    for limit in ["1", "2", "4", "5", "1000"] {
        for (sort, expected) in [("newest", &newest_first), ("oldest", &oldest_first)] {
            let all = ppuctl(
                &url,
                &["--json", "list", "--all", "--limit", limit, "--sort", sort],
            )
            .await
            .json();
            assert_eq!(
                &listed_ids(&all),
                expected,
                "--limit {limit} --sort {sort}: {all:#}"
            );
            assert_eq!(all["next_page_token"], "", "--limit {limit}: {all:#}");
        }
    }
    let human = ppuctl(&url, &["list", "--all", "--limit", "2"]).await;
    let text = human.ok();
    for id in &submitted.experiments {
        assert_eq!(text.matches(id.as_str()).count(), 1, "{text}");
    }
    assert!(!human.stderr.contains("more experiments"), "{human:#?}");

    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_a_daemon_restart_with_no_gap_and_no_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::fresh(dir.path()).await;
    let addr = lab.daemon.addr();
    let url = lab.url();

    let mut watch = Watch::spawn(&url, &["--from-start"]).await;

    // A long program: still running when the daemon stops, so it is interrupted by the stop.
    let long = serde_json::json!({
        "idempotency_key": "before-restart",
        "experiments": [{
            "name": "long",
            "steps": [{ "furnace": { "segments": [
                { "ramp": { "temperature_c": 150.0, "rate_c_per_min": 20.0 } },
                { "hold": { "duration_s": 36000.0 } },
            ]}}],
        }],
    })
    .to_string();
    let before = parse_submit(ppuctl_stdin(&url, &["submit", "-"], Some(&long)).await.ok());
    let long_id = before.experiments[0].clone();
    watch
        .read_until("the long program to make progress", |events| {
            events
                .iter()
                .any(|e| e["experiment_id"] == long_id.as_str() && e.get("step_progress").is_some())
        })
        .await;
    let seen_before_restart = watch.events.len();

    // Graceful stop, then a new daemon on the same data dir and the same port.
    lab.stop().await;
    let lab = Lab::start(dir.path(), addr).await;
    assert_eq!(lab.daemon.addr(), addr);

    // Something that can only happen after the restart.
    let after = parse_submit(
        ppuctl_stdin(
            &url,
            &["submit", "-"],
            Some(&furnace_batch("after-restart", &["short"], 40.0)),
        )
        .await
        .ok(),
    );
    let short_id = after.experiments[0].clone();
    watch
        .read_until(
            "the experiment submitted after the restart to finish",
            |events| {
                events
                    .iter()
                    .any(|e| moved_to(e, &short_id).is_some_and(is_terminal))
            },
        )
        .await;
    let events = std::mem::take(&mut watch.events);
    let stderr = watch.kill().await;
    assert!(
        stderr.contains("watch: reconnected, resuming after sequence"),
        "the watch reconnected: {stderr}"
    );

    // Every sequence exactly once, in order: no gap, no duplicate.
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["sequence"].as_u64().expect("sequence"))
        .collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "sequences printed by watch"
    );
    assert!(seqs.len() > seen_before_restart);

    // The stop interrupted the long program; that change is printed exactly once (whether the
    // watch saw it before the stream ended or on resuming). The new one succeeded.
    let long_changes: Vec<&str> = events
        .iter()
        .filter_map(|e| moved_to(e, &long_id))
        .collect();
    assert_eq!(
        long_changes,
        [
            "EXPERIMENT_STATE_QUEUED",
            "EXPERIMENT_STATE_RUNNING",
            "EXPERIMENT_STATE_INTERRUPTED"
        ],
        "state changes of the long experiment"
    );
    let short_changes: Vec<&str> = events
        .iter()
        .filter_map(|e| moved_to(e, &short_id))
        .collect();
    assert_eq!(
        short_changes,
        [
            "EXPERIMENT_STATE_QUEUED",
            "EXPERIMENT_STATE_RUNNING",
            "EXPERIMENT_STATE_SUCCEEDED"
        ],
        "state changes of the short experiment"
    );

    // What the watch printed is the start of the durable log, event for event.
    let mut replay = Watch::spawn(&url, &["--from-start"]).await;
    let n = events.len();
    replay
        .read_until("the replayed log", |replayed| replayed.len() >= n)
        .await;
    assert_eq!(replay.events[..n], events[..]);
    replay.kill().await;

    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_exit_2_and_an_unreachable_daemon_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::fresh(dir.path()).await;
    let url = lab.url();

    // Unknown id.
    let run = ppuctl(&url, &["show", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.starts_with("error: NOT_FOUND: "), "{run:#?}");
    assert!(run.stdout.is_empty(), "{run:#?}");

    // A ramp beyond the furnace's 1100 °C limit: refused by the daemon, path named.
    let hot = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(
        hot.path(),
        "[[experiments]]\nname = \"too hot\"\n\n[[experiments.steps]]\n\
         [experiments.steps.furnace]\n\
         segments = [{ ramp = { temperature_c = 5000.0, rate_c_per_min = 10.0 } }]\n",
    )
    .unwrap();
    let run = ppuctl(&url, &["submit", hot.path().to_str().unwrap()]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.starts_with("error: INVALID_ARGUMENT: "),
        "{run:#?}"
    );
    assert!(
        run.stderr
            .contains("experiments[0].steps[0].furnace.segments[0].ramp.temperature_c"),
        "{run:#?}"
    );
    let list = ppuctl(&url, &["--json", "list", "--all"]).await.json();
    assert_eq!(listed_ids(&list), Vec::<String>::new(), "nothing stored");

    // A finished experiment cannot be cancelled.
    let done = parse_submit(
        ppuctl_stdin(
            &url,
            &["submit", "-"],
            Some(&furnace_batch("finish", &["quick"], 40.0)),
        )
        .await
        .ok(),
    );
    let id = done.experiments[0].clone();
    let mut watch = Watch::spawn(&url, &["--from-start", "--experiment", &id]).await;
    watch
        .read_until("the experiment to finish", |events| {
            events
                .iter()
                .any(|e| moved_to(e, &id).is_some_and(is_terminal))
        })
        .await;
    assert!(
        watch
            .events
            .iter()
            .all(|e| e["experiment_id"] == id.as_str()),
        "--experiment filters"
    );
    watch.kill().await;
    let shown = ppuctl(&url, &["--json", "show", &id]).await.json();
    assert_eq!(shown["state"], "EXPERIMENT_STATE_SUCCEEDED", "{shown:#}");
    let run = ppuctl(&url, &["cancel", &id, "--reason", "too late"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.starts_with("error: FAILED_PRECONDITION: "),
        "{run:#?}"
    );
    let shown = ppuctl(&url, &["--json", "show", &id]).await.json();
    assert_eq!(shown["state"], "EXPERIMENT_STATE_SUCCEEDED", "unchanged");

    // Nothing listens on port 1.
    let run = ppuctl("http://127.0.0.1:1", &["devices"]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stderr.starts_with("error: UNAVAILABLE: "), "{run:#?}");
    assert!(
        run.stderr
            .contains("is ppud running at http://127.0.0.1:1?"),
        "{run:#?}"
    );

    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_lists_the_furnace_and_its_driver() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::fresh(dir.path()).await;
    let url = lab.url();

    let run = ppuctl(&url, &["devices"]).await;
    let text = run.ok();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(header[..3], ["ID", "FAMILY", "DRIVER"], "{text}");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 1, "{text}");
    assert_eq!(
        rows[0][..3],
        ["furnace-1", "furnace", "eurotherm"],
        "{text}"
    );

    let json = ppuctl(&url, &["--json", "devices"]).await.json();
    let devices = json.as_array().expect("array");
    assert_eq!(devices.len(), 1, "{json:#}");
    assert_eq!(devices[0]["id"], "furnace-1");
    assert_eq!(devices[0]["driver"], "eurotherm");
    assert_eq!(devices[0]["limits"]["max_temperature_c"], 1100.0);

    let one = ppuctl(&url, &["--json", "device", "furnace-1"])
        .await
        .json();
    assert_eq!(one["driver"], "eurotherm", "{one:#}");
    let run = ppuctl(&url, &["device", "furnace-9"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.starts_with("error: NOT_FOUND: "), "{run:#?}");

    lab.stop().await;
}

/// The shortest prefix of `ids[i]` that no other id starts with.
fn unique_prefix(ids: &[String], i: usize) -> String {
    let own = &ids[i];
    let shared = ids
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, other)| common_prefix(own, other).len())
        .max()
        .unwrap_or(0);
    own[..shared + 1].to_owned()
}

fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    &a[..n]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_starts_at_the_tail_filters_and_refuses_a_start_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::fresh(dir.path()).await;
    let url = lab.url();
    ppuctl(&url, &["queue", "pause"]).await.ok();
    let toml = example("batch.toml");
    let submitted = parse_submit(ppuctl(&url, &["submit", toml.to_str().unwrap()]).await.ok());

    // By default only what happens from now on: the submission's events are not replayed.
    let mut tail = Watch::spawn(&url, &[]).await;
    let start = tail.tail_start().await;
    assert!(start > 0, "the log already holds the submission");
    ppuctl(&url, &["queue", "resume"]).await.ok();
    tail.read_until("the queue to resume", |events| {
        events.iter().any(|e| e["queue_state_changed"].is_object())
    })
    .await;
    let seqs: Vec<u64> = tail
        .events
        .iter()
        .map(|e| e["sequence"].as_u64().expect("sequence"))
        .collect();
    assert_eq!(
        seqs,
        (start + 1..=start + seqs.len() as u64).collect::<Vec<_>>(),
        "the tail starts right after sequence {start}, with no gap"
    );
    tail.kill().await;

    // --from N replays from there.
    let mut from = Watch::spawn(&url, &["--from", &start.to_string()]).await;
    from.read_until("one event", |events| !events.is_empty())
        .await;
    assert_eq!(from.events[0]["sequence"], start + 1);
    from.kill().await;

    // Past the end of the log: refused by the daemon, naming the newest sequence; exit 2.
    let run = ppuctl(&url, &["watch", "--from", "999999999"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    let newest: u64 = run
        .stderr
        .strip_prefix(
            "error: OUT_OF_RANGE: from_sequence: 999999999 is past the end of the event log \
             (the newest event is sequence ",
        )
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{run:#?}"));
    assert!(newest >= start, "{run:#?}");
    let run = ppuctl(&url, &["watch", "--from", "3", "--from-start"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.contains("cannot be used with"), "{run:#?}");

    // Filters: one experiment (by a lower-case id prefix) and one kind.
    let first = &submitted.experiments[1]; // priority 10: starts first
    let prefix = unique_prefix(&submitted.experiments, 1).to_lowercase();
    let mut one = Watch::spawn(
        &url,
        &[
            "--from-start",
            "--experiment",
            &prefix,
            "--kind",
            "experiment_state_changed",
        ],
    )
    .await;
    one.read_until("the first experiment to start", |events| {
        events
            .iter()
            .any(|e| moved_to(e, first) == Some("EXPERIMENT_STATE_RUNNING"))
    })
    .await;
    for e in &one.events {
        assert_eq!(e["experiment_id"], first.as_str(), "{e:#}");
        assert!(e["experiment_state_changed"].is_object(), "{e:#}");
    }
    one.kill().await;

    // One device, two kinds given with a comma.
    let mut device = Watch::spawn(
        &url,
        &[
            "--from-start",
            "--device",
            "furnace-1",
            "--kind",
            "device_reading,alarm",
        ],
    )
    .await;
    device
        .read_until("two readings", |events| events.len() >= 2)
        .await;
    for e in &device.events {
        assert_eq!(e["device_id"], "furnace-1", "{e:#}");
        assert!(
            e["device_reading"].is_object() || e["alarm"].is_object(),
            "{e:#}"
        );
    }
    device.kill().await;

    // An unknown kind is refused with the list of known ones.
    let run = ppuctl(&url, &["watch", "--kind", "step_progres"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.starts_with(
            "error: INVALID_ARGUMENT: kinds[0]: unknown event kind \"step_progres\"; known kinds: "
        ) && run.stderr.contains("step_progress"),
        "{run:#?}"
    );

    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_resolve_from_any_unique_prefix_in_either_case() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::fresh(dir.path()).await;
    let url = lab.url();
    ppuctl(&url, &["queue", "pause"]).await.ok();
    let toml = example("batch.toml");
    let submitted = parse_submit(ppuctl(&url, &["submit", toml.to_str().unwrap()]).await.ok());
    let ids = &submitted.experiments;

    // The full id in lower case, and the shortest unique prefix in lower case.
    for given in [ids[0].to_lowercase(), unique_prefix(ids, 0).to_lowercase()] {
        let shown = ppuctl(&url, &["--json", "show", &given]).await.json();
        assert_eq!(shown["id"], ids[0].as_str(), "{given}: {shown:#}");
    }
    // The batch's ids share all but their last characters: the TUI shows `…` and the last 8,
    // which resolve too.
    let tail = format!("…{}", &ids[1][ids[1].len() - 8..]).to_lowercase();
    let shown = ppuctl(&url, &["--json", "show", &tail]).await.json();
    assert_eq!(shown["id"], ids[1].as_str(), "{tail}: {shown:#}");

    // A prefix two ids share: refused, naming both.
    let shared = common_prefix(&ids[0], &ids[1]).to_lowercase();
    let run = ppuctl(&url, &["show", &shared]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.starts_with(&format!(
            "error: INVALID_ARGUMENT: id: \"{shared}\" is ambiguous: it starts the experiment ids "
        )),
        "{run:#?}"
    );
    assert!(
        run.stderr.contains(&ids[0]) && run.stderr.contains(&ids[1]),
        "{run:#?}"
    );

    // A prefix nothing starts with: NOT_FOUND naming it.
    let run = ppuctl(&url, &["show", "01zzz"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert_eq!(
        run.stderr.lines().next(),
        Some("error: NOT_FOUND: id: no experiment id starts with \"01zzz\""),
        "{run:#?}"
    );

    // Acting on a prefix acts on the full id, and the audit trail records the full id.
    let hold = unique_prefix(ids, 2).to_lowercase();
    let held = ppuctl(&url, &["--json", "queue", "hold", &hold, "--reason", "r"])
        .await
        .json();
    assert_eq!(held["id"], ids[2].as_str(), "{held:#}");
    assert_eq!(held["held"], true, "{held:#}");
    let mut audit = Watch::spawn(&url, &["--from-start", "--kind", "audit"]).await;
    audit
        .read_until("the hold's audit record", |events| {
            events.iter().any(|e| {
                e["audit"]["method"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("HoldExperiment"))
            })
        })
        .await;
    let record = audit
        .events
        .iter()
        .find(|e| {
            e["audit"]["method"]
                .as_str()
                .is_some_and(|m| m.ends_with("HoldExperiment"))
        })
        .expect("hold audited");
    assert_eq!(record["audit"]["target"], ids[2].as_str(), "{record:#}");
    audit.kill().await;
    let cancelled = ppuctl(&url, &["--json", "cancel", &hold]).await.json();
    assert_eq!(cancelled["id"], ids[2].as_str(), "{cancelled:#}");
    assert_eq!(cancelled["state"], "EXPERIMENT_STATE_CANCELLED");

    // A batch filter takes a prefix too.
    let batch = submitted.batch[..12].to_lowercase();
    let listed = ppuctl(
        &url,
        &["--json", "list", "--sort", "oldest", "--batch", &batch],
    )
    .await
    .json();
    assert_eq!(&listed_ids(&listed), ids, "{listed:#}");

    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_state_label_and_since() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::fresh(dir.path()).await;
    let url = lab.url();
    ppuctl(&url, &["queue", "pause"]).await.ok();
    let toml = example("batch.toml");
    let first = parse_submit(ppuctl(&url, &["submit", toml.to_str().unwrap()]).await.ok());
    let later = parse_submit(
        ppuctl_stdin(
            &url,
            &["submit", "-"],
            Some(&furnace_batch("later", &["later"], 40.0)),
        )
        .await
        .ok(),
    );
    let later_id = later.experiments[0].clone();
    let list = |args: &'static [&'static str]| {
        let url = url.clone();
        async move {
            let mut argv = vec!["--json", "list"];
            argv.extend_from_slice(args);
            listed_ids(&ppuctl(&url, &argv).await.json())
        }
    };

    let mut newest_first = first.experiments.clone();
    newest_first.push(later_id.clone());
    newest_first.reverse();
    assert_eq!(list(&[]).await, newest_first);
    assert_eq!(list(&["--state", "queued"]).await, newest_first);
    assert_eq!(
        list(&["--label", "material=SBA-15"]).await,
        [first.experiments[2].clone()]
    );
    assert_eq!(
        list(&["--label", "campaign=co2-sorbents", "--sort", "oldest"]).await,
        first.experiments
    );
    ppuctl(&url, &["cancel", &first.experiments[0]]).await.ok();
    assert_eq!(
        list(&["--state", "cancelled"]).await,
        [first.experiments[0].clone()]
    );

    // --since: a time (the later experiment's creation), an age, a date in the future.
    let shown = ppuctl(&url, &["--json", "show", &later_id]).await.json();
    let created = shown["created_at"].as_str().expect("created_at").to_owned();
    let since = ppuctl(&url, &["--json", "list", "--since", &created])
        .await
        .json();
    assert_eq!(listed_ids(&since), [later_id], "--since {created}");
    assert_eq!(list(&["--since", "1h"]).await, newest_first);
    assert!(list(&["--since", "2999-01-01"]).await.is_empty());
    let human = ppuctl(&url, &["list", "--since", "2999-01-01"]).await;
    assert_eq!(human.code, Some(0), "{human:#?}");
    assert!(human.stderr.contains("no experiments match"), "{human:#?}");
    let bad = ppuctl(&url, &["list", "--since", "yesterday"]).await;
    assert_eq!(bad.code, Some(2), "{bad:#?}");
    assert!(bad.stderr.contains("expected an RFC 3339 time"), "{bad:#?}");

    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_is_named_as_not_a_grpc_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let security = Security {
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    let lab = Lab::start_secured(dir.path(), "127.0.0.1:0".parse().unwrap(), security).await;
    let metrics = format!(
        "http://{}",
        lab.daemon.metrics_addr().expect("metrics served")
    );
    let expected = format!("error: {metrics} is not a gRPC endpoint (");
    for args in [&["devices"][..], &["watch"][..]] {
        let run = ppuctl(&metrics, args).await;
        assert_eq!(run.code, Some(1), "{args:?}: {run:#?}");
        assert!(run.stderr.starts_with(&expected), "{args:?}: {run:#?}");
        assert!(run.stderr.contains("metrics port"), "{args:?}: {run:#?}");
        assert!(!run.stderr.contains("reconnecting"), "{args:?}: {run:#?}");
    }
    // The gRPC port itself still answers.
    ppuctl(&lab.url(), &["devices"]).await.ok();
    lab.stop().await;
}

#[tokio::test]
async fn completions_and_the_man_page_are_generated_without_a_daemon() {
    // Nothing listens there: these commands must not connect.
    let nowhere = "http://127.0.0.1:1";
    for (shell, marker) in [
        ("bash", "complete -F _ppuctl"),
        ("zsh", "#compdef ppuctl"),
        ("fish", "complete -c ppuctl"),
    ] {
        let run = ppuctl(nowhere, &["completions", shell]).await;
        let script = run.ok();
        assert!(script.contains(marker), "{shell}: {script}");
        // fish spells long options `-l from-start`.
        for word in ["watch", "from-start", "completions", "sort"] {
            assert!(script.contains(word), "{shell} lacks {word}");
        }
    }
    let bad = ppuctl(nowhere, &["completions", "tcsh"]).await;
    assert_eq!(bad.code, Some(2), "{bad:#?}");

    // The main page and every subcommand's, each rendered by groff (man's formatter) with no
    // warning, and with the sections man readers expect.
    let listed = ppuctl(nowhere, &["man", "--list"]).await;
    let subcommands: Vec<&str> = listed.ok().lines().collect();
    assert!(subcommands.contains(&"watch"), "{subcommands:?}");
    assert!(subcommands.contains(&"completions"), "{subcommands:?}");
    let mut pages = vec![(String::from("ppuctl"), Vec::<&str>::new())];
    for sub in &subcommands {
        pages.push((format!("ppuctl-{sub}"), vec![*sub]));
    }
    for (name, sub) in pages {
        let mut args = vec!["man"];
        args.extend(sub);
        let roff = ppuctl(nowhere, &args).await.ok().to_owned();
        assert!(roff.contains(&format!(".TH {name} 1")), "{roff}");
        let text = groff(&roff).await;
        for section in ["NAME", "SYNOPSIS", "DESCRIPTION"] {
            assert!(text.contains(section), "{name}: no {section} in:\n{text}");
        }
        if name == "ppuctl" {
            assert!(text.contains("SUBCOMMANDS"), "{text}");
            assert!(text.contains("ppuctl-watch(1)"), "{text}");
        }
        if name == "ppuctl-watch" {
            assert!(text.contains("--from-start"), "{text}");
        }
    }
    let run = ppuctl(nowhere, &["man", "nonesuch"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.contains("ppuctl man --list"), "{run:#?}");
}

/// `roff` formatted by groff as plain text; fails on any groff warning.
async fn groff(roff: &str) -> String {
    let mut child = Command::new("groff")
        // -k: through preconv, as man does, so UTF-8 help text is read as such.
        .args(["-k", "-man", "-Tutf8", "-P-cbou", "-ww"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("groff (man's formatter) is installed");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(roff.as_bytes()).await.expect("feed groff");
    drop(stdin);
    let out = child.wait_with_output().await.expect("groff runs");
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "groff warnings: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}
