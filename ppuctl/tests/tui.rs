//! The real `ppuctl tui` binary in a real pseudo-terminal (a tmux pane, 80×24), driven with
//! keystrokes against the real daemon with its simulated lab, started in-process on an
//! ephemeral port and a temporary data directory (as in `ppuctl.rs`).
//!
//! What the screen shows is read with `tmux capture-pane`; what the daemon recorded is read
//! over gRPC. Every wait polls a condition against a deadline; nothing waits on a fixed sleep.
//! Needs `tmux` on the PATH (`.ci/run` installs it).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ppu_daemon::app::Daemon;
use ppu_daemon::config::Policies;
use ppu_daemon::dev::DevLab;
use ppu_daemon::devices::PollSettings;
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use ppu_proto::v1::device_service_client::DeviceServiceClient;
use ppu_proto::v1::event_service_client::EventServiceClient;
use ppu_proto::v1::experiment_service_client::ExperimentServiceClient;
use ppu_proto::v1::queue_service_client::QueueServiceClient;
use tokio::process::Command;
use tokio::time::Instant;
use tonic::transport::Channel;

/// Physical seconds per real second.
const TIME_SCALE: f64 = 2000.0;
/// Upper bound on any wait (real time).
const DEADLINE: Duration = Duration::from_secs(60);
/// How soon the TUI must show a lost daemon (the requirement).
const DISCONNECT_SHOWN_WITHIN: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// The lab: a real daemon with simulated devices, as `ppud dev` runs it.
// ---------------------------------------------------------------------------------------------

struct Lab {
    daemon: Daemon,
    devlab: DevLab,
}

impl Lab {
    async fn start(data_dir: &Path, listen: SocketAddr) -> Lab {
        Lab::with_furnaces(data_dir, listen, 1).await
    }

    async fn with_furnaces(data_dir: &Path, listen: SocketAddr, furnaces: usize) -> Lab {
        let clock = Clock::new(TIME_SCALE);
        let devlab = DevLab::start(clock, furnaces).await.expect("simulated lab");
        let poll = PollSettings {
            poll_interval: Duration::from_millis(100),
            reading_log_interval: Duration::from_secs(1),
        };
        let daemon = devlab
            .start_daemon(listen, data_dir, poll, &Policies::default())
            .await
            .expect("daemon starts");
        Lab { daemon, devlab }
    }

    fn url(&self) -> String {
        format!("http://{}", self.daemon.addr())
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    async fn stop(self) {
        tokio::time::timeout(DEADLINE, self.daemon.shutdown())
            .await
            .expect("the daemon shuts down within the deadline");
        self.devlab.shutdown().await;
    }
}

/// Submits one furnace experiment the way a planner does; returns its id.
async fn submit(ch: Channel, key: &str, name: &str, sample: &str, hold_s: f64) -> String {
    use pb::furnace_segment::Kind as S;
    let segments = [
        S::Ramp(pb::Ramp {
            temperature_c: 150.0,
            rate_c_per_min: 20.0,
        }),
        S::Hold(pb::Hold { duration_s: hold_s }),
    ];
    let spec = pb::ExperimentSpec {
        name: name.into(),
        sample_id: sample.into(),
        priority: 7,
        steps: vec![pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
                segments: segments
                    .into_iter()
                    .map(|k| pb::FurnaceSegment { kind: Some(k) })
                    .collect(),
            })),
        }],
        ..Default::default()
    };
    let reply = ExperimentServiceClient::new(ch)
        .submit_batch(pb::SubmitBatchRequest {
            idempotency_key: key.into(),
            experiments: vec![spec],
        })
        .await
        .expect("submit")
        .into_inner();
    reply.batch.expect("batch").experiment_ids[0].clone()
}

/// Submits one experiment whose sample must move between its two steps: a short program on
/// furnace-1, then a long hold on furnace-2. The scheduler inserts a TRANSFER step between
/// them when the second starts (no robot in this lab: it waits for a confirmation).
async fn submit_moving(ch: Channel, key: &str, name: &str, sample: &str) -> String {
    use pb::furnace_segment::Kind as S;
    let program = |hold_s: f64| {
        pb::step::Kind::Furnace(pb::FurnaceProgram {
            segments: [
                S::Ramp(pb::Ramp {
                    temperature_c: 60.0,
                    rate_c_per_min: 20.0,
                }),
                S::Hold(pb::Hold { duration_s: hold_s }),
            ]
            .into_iter()
            .map(|k| pb::FurnaceSegment { kind: Some(k) })
            .collect(),
        })
    };
    let spec = pb::ExperimentSpec {
        name: name.into(),
        sample_id: sample.into(),
        steps: vec![
            pb::Step {
                device_id: "furnace-1".into(),
                kind: Some(program(60.0)),
            },
            // Long enough (about 80 s real at TIME_SCALE) to be seen running.
            pb::Step {
                device_id: "furnace-2".into(),
                kind: Some(program(160_000.0)),
            },
        ],
        ..Default::default()
    };
    let reply = ExperimentServiceClient::new(ch)
        .submit_batch(pb::SubmitBatchRequest {
            idempotency_key: key.into(),
            experiments: vec![spec],
        })
        .await
        .expect("submit")
        .into_inner();
    reply.batch.expect("batch").experiment_ids[0].clone()
}

/// Polls `check` until it holds; at the deadline fails with what `tui` shows and how its
/// process is doing, so a flake can be diagnosed from the log alone.
async fn eventually<F, Fut>(tui: &Tui, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        if Instant::now() >= deadline {
            panic!(
                "timed out waiting for {what} within {DEADLINE:?}\n{}",
                tui.diagnosis().await
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The TUI in a tmux pane.
// ---------------------------------------------------------------------------------------------

/// A private tmux server (its own socket) running one `ppuctl tui` pane; killed on drop.
struct Tui {
    socket: String,
    _conf: tempfile::NamedTempFile,
}

impl Tui {
    async fn start(url: &str) -> Tui {
        static N: AtomicUsize = AtomicUsize::new(0);
        let socket = format!(
            "ppu-tui-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        // Keep the pane after ppuctl exits, so a crash leaves its last screen to read.
        let conf = tempfile::NamedTempFile::new().expect("tmux conf");
        std::fs::write(conf.path(), "set -g remain-on-exit on\n").expect("write tmux conf");
        let tui = Tui {
            socket,
            _conf: conf,
        };
        let conf_path = tui._conf.path().to_str().expect("utf-8 path").to_owned();
        let bin = env!("CARGO_BIN_EXE_ppuctl");
        let status = Command::new("tmux")
            .args(["-L", &tui.socket, "-f", &conf_path])
            .args(["new-session", "-d", "-s", "tui", "-x", "80", "-y", "24"])
            .args(["-e", "NO_COLOR=1"])
            .args([bin, "--addr", url, "tui", "--by", "tester"])
            .status()
            .await
            .expect("tmux must be installed to run this test (apt-get install tmux)");
        assert!(status.success(), "tmux new-session failed: {status}");
        tui
    }

    async fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .await
            .expect("run tmux");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The screen as text.
    async fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "tui"]).await
    }

    /// Types keys (tmux key names, e.g. "p", "Enter", "Escape").
    async fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "tui"];
        args.extend_from_slice(keys);
        self.tmux(&args).await;
    }

    /// Waits until the screen satisfies `ok` within `within`; returns that screen.
    async fn wait_within(&self, within: Duration, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        let deadline = start + within;
        // Screens seen this long into the wait (the first after each mark), to show on failure
        // how the TUI got where it is, not only where it ended.
        const MARKS_S: [u64; 5] = [0, 1, 5, 15, 30];
        let mut earlier: Vec<(Duration, String)> = Vec::new();
        loop {
            let screen = self.screen().await;
            if ok(&screen) {
                return screen;
            }
            if Instant::now() >= deadline {
                let mut history = String::new();
                for (at, earlier) in &earlier {
                    history.push_str(&format!("screen {at:.2?} into the wait:\n{earlier}\n"));
                }
                panic!(
                    "the TUI did not show {what} within {within:?}\n{history}{}",
                    self.diagnosis().await
                );
            }
            let elapsed = start.elapsed();
            if let Some(mark) = MARKS_S.get(earlier.len())
                && elapsed >= Duration::from_secs(*mark)
            {
                earlier.push((elapsed, screen));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        self.wait_within(DEADLINE, what, ok).await
    }

    /// The last screen, the pane's state and, while ppuctl runs, what each of its threads is
    /// blocked in: everything a failure message needs to tell a stuck TUI from a slow one.
    async fn diagnosis(&self) -> String {
        let mut out = String::new();
        let screen = self.screen().await;
        out.push_str(&format!("last screen:\n{screen}\n"));
        let pane = self
            .tmux(&[
                "display-message",
                "-p",
                "-t",
                "tui",
                "dead=#{pane_dead} status=#{pane_dead_status} pid=#{pane_pid} server=#{pid}",
            ])
            .await;
        out.push_str(&format!("pane: {pane}"));
        let pid = pane
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))
            .unwrap_or_default()
            .to_owned();
        if !pid.is_empty() {
            out.push_str(&process_state(&pid));
        }
        out
    }

    /// Makes tmux reap an exited ppuctl whose exit it missed. Debian's tmux (libutempter) sets
    /// SIGCHLD to its default while a helper deregisters a closed pane's pty; a ppuctl that
    /// closes its terminal and exits in that moment sends a SIGCHLD that is discarded, and
    /// stays a zombie with no exit status until another SIGCHLD, since tmux waits for its
    /// children only on that signal (tmux issue #311, on a loaded machine about one run in
    /// ten). Sending one is harmless when nothing is to be reaped.
    async fn nudge_reaper(&self) {
        let server = self
            .tmux(&["display-message", "-p", "-t", "tui", "#{pid}"])
            .await;
        eprintln!(
            "pane dead, no exit status yet: SIGCHLD to tmux (pid {})",
            server.trim()
        );
        let status = Command::new("kill")
            .args(["-s", "CHLD", server.trim()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -s CHLD {server}: {status}");
    }

    /// Whether ppuctl has exited, and its exit status once tmux has it.
    async fn pane_dead(&self) -> (bool, String) {
        let out = self
            .tmux(&[
                "display-message",
                "-p",
                "-t",
                "tui",
                "#{pane_dead} #{pane_dead_status}",
            ])
            .await;
        let mut parts = out.split_whitespace();
        let dead = parts.next() == Some("1");
        (dead, parts.next().unwrap_or_default().to_owned())
    }
}

impl Drop for Tui {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// From /proc: process `pid`'s state and signal masks, its parent's (tmux, which must reap it),
/// and each of its threads with the kernel function it waits in.
fn process_state(pid: &str) -> String {
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("process {pid}: gone\n");
    };
    let status = read(format!("/proc/{pid}/status"));
    for line in status.lines() {
        if ["PPid", "State", "Sig", "Shd"]
            .iter()
            .any(|k| line.starts_with(k))
        {
            out.push_str(&format!("process {pid} {line}\n"));
        }
    }
    if let Some(ppid) = status.lines().find_map(|l| l.strip_prefix("PPid:")) {
        let ppid = ppid.trim();
        let pstatus = read(format!("/proc/{ppid}/status"));
        for line in pstatus.lines() {
            if ["Name", "State", "Sig", "Shd"]
                .iter()
                .any(|k| line.starts_with(k))
            {
                out.push_str(&format!("parent {ppid} {line}\n"));
            }
        }
        out.push_str(&format!(
            "parent wchan {}\n",
            read(format!("/proc/{ppid}/wchan"))
        ));
    }
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let base = format!("/proc/{pid}/task/{tid}");
        let comm = read(format!("{base}/comm"));
        let stat = read(format!("{base}/stat"));
        // The state is the field after the parenthesised command name.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?");
        let wchan = read(format!("{base}/wchan"));
        out.push_str(&format!(
            "thread {tid} {}: state {state}, waiting in {wchan}\n",
            comm.trim()
        ));
    }
    out
}

/// The screen row that mentions `needle`.
fn row_with<'a>(screen: &'a str, needle: &str) -> Option<&'a str> {
    screen.lines().find(|l| l.contains(needle))
}

// ---------------------------------------------------------------------------------------------
// The test.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tui_shows_the_lab_acts_on_it_and_survives_a_daemon_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(dir.path(), "127.0.0.1:0".parse().expect("addr")).await;
    let addr = lab.daemon.addr();
    let url = lab.url();
    let tui = Tui::start(&url).await;
    tui.wait("the live link and the furnace", |s| {
        s.contains("● LIVE") && s.contains("queue RUNNING")
    })
    .await;

    // A planner submits work: it shows in the queue, running on the furnace.
    let long = submit(lab.channel().await, "tui-1", "tui-long", "S-017", 36_000.0).await;
    let screen = tui
        .wait("the submitted experiment running", |s| {
            row_with(s, "tui-long").is_some_and(|r| r.contains("RUNNING"))
        })
        .await;
    assert!(
        screen.contains(&long),
        "its id in the detail pane:\n{screen}"
    );
    tui.keys(&["2"]).await;
    tui.wait("the furnace with its reading", |s| {
        row_with(s, "furnace-1").is_some_and(|r| r.contains("PV ") && r.contains(" up "))
    })
    .await;

    // Pause: asked first, then the daemon's queue is paused.
    let mut queue = QueueServiceClient::new(lab.channel().await);
    tui.keys(&["p"]).await;
    tui.wait("the pause confirmation", |s| s.contains("Pause the queue?"))
        .await;
    let state = queue
        .get_queue(pb::GetQueueRequest {})
        .await
        .expect("queue");
    assert_eq!(
        state.into_inner().state,
        pb::QueueState::Running as i32,
        "nothing happens before the confirmation"
    );
    tui.keys(&["y"]).await;
    eventually(&tui, "the daemon's queue to be paused", || {
        let mut q = queue.clone();
        async move {
            q.get_queue(pb::GetQueueRequest {})
                .await
                .is_ok_and(|r| r.into_inner().state == pb::QueueState::Paused as i32)
        }
    })
    .await;
    tui.wait("the paused queue", |s| s.contains("queue PAUSED"))
        .await;

    // The simulated furnace loses its thermocouple: the alarm shows, unacknowledged.
    lab.devlab.furnaces[0].sim.set_sensor_break(true);
    tui.keys(&["3"]).await;
    tui.wait("the unacknowledged sensor break", |s| {
        row_with(s, "sensor_break").is_some_and(|r| r.contains("UNACK"))
    })
    .await;
    tui.keys(&["a"]).await;
    tui.wait("the acknowledge confirmation", |s| {
        s.contains("Acknowledge alarm sensor_break on furnace-1?")
    })
    .await;
    tui.keys(&["y"]).await;
    let devices = DeviceServiceClient::new(lab.channel().await);
    eventually(&tui, "the daemon to record the acknowledgement", || {
        let mut d = devices.clone();
        async move {
            d.list_alarms(pb::ListAlarmsRequest::default())
                .await
                .is_ok_and(|r| {
                    r.into_inner().alarms.iter().any(|a| {
                        a.device_id == "furnace-1"
                            && a.code == "sensor_break"
                            && a.acknowledged
                            && a.acknowledged_by == "tester"
                    })
                })
        }
    })
    .await;
    tui.wait("the acknowledged alarm", |s| {
        row_with(s, "sensor_break").is_some_and(|r| r.contains("ack tester"))
    })
    .await;
    // The acknowledgement is in the durable log too.
    let mut events = EventServiceClient::new(lab.channel().await)
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .expect("stream")
        .into_inner();
    let acked = tokio::time::timeout(DEADLINE, async {
        while let Some(e) = events.message().await.expect("event") {
            if let Some(pb::event::Kind::AlarmAcknowledged(a)) = &e.kind {
                return Some((e.device_id.clone(), a.clone()));
            }
        }
        None
    })
    .await
    .expect("the acknowledgement event within the deadline")
    .expect("an AlarmAcknowledged event");
    assert_eq!(acked.0, "furnace-1");
    assert_eq!(acked.1.code, "sensor_break");
    assert_eq!(acked.1.acknowledged_by, "tester");
    lab.devlab.furnaces[0].sim.set_sensor_break(false);
    drop(events);

    // The daemon stops: the TUI says so within two seconds.
    let before_stop = tui.screen().await;
    assert!(before_stop.contains("● LIVE"), "{before_stop}");
    lab.stop().await;
    let screen = tui
        .wait_within(DISCONNECT_SHOWN_WITHIN, "the lost daemon within 2 s", |s| {
            s.contains("DISCONNECTED") || s.contains("STALE")
        })
        .await;
    assert!(!screen.contains("● LIVE"), "{screen}");

    // The daemon returns on the same port and data dir: the TUI recovers on its own and
    // resumes the event stream where it left off.
    let lab = Lab::start(dir.path(), addr).await;
    let screen = tui
        .wait("the link back, the stream resumed", |s| {
            s.contains("● LIVE") && s.contains("resumed after sequence")
        })
        .await;
    let resumed_after: u64 = screen
        .split("resumed after sequence ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a sequence number:\n{screen}"));
    assert!(resumed_after > 0, "{screen}");
    tui.wait("the durable pause after the restart", |s| {
        s.contains("queue PAUSED")
    })
    .await;
    // New work after the restart shows too; the old experiment is no longer running (the
    // sensor break failed it, or the stop interrupted it).
    tui.keys(&["1"]).await;
    submit(lab.channel().await, "tui-2", "tui-after", "S-018", 60.0).await;
    tui.wait("the experiment submitted after the restart", |s| {
        row_with(s, "tui-after").is_some_and(|r| r.contains("QUEUED"))
            && row_with(s, "tui-long").is_some_and(|r| !r.contains("RUNNING"))
    })
    .await;

    // Resume from the TUI, and the queued experiment runs.
    tui.keys(&["p"]).await;
    tui.wait("the resume confirmation", |s| {
        s.contains("Resume the queue?")
    })
    .await;
    tui.keys(&["y"]).await;
    tui.wait("the experiment after the restart to finish", |s| {
        row_with(s, "tui-after").is_some_and(|r| r.contains("SUCCEEDED"))
    })
    .await;

    // `?` shows the keys; `q` quits cleanly.
    tui.keys(&["?"]).await;
    tui.wait("the help", |s| {
        s.contains(" Keys ") && s.contains("acknowledge the selected alarm")
    })
    .await;
    // (Escape and the next key sent together would read as Alt+key.)
    tui.keys(&["Escape"]).await;
    tui.wait("the help closed", |s| !s.contains(" Keys ")).await;
    tui.keys(&["q"]).await;
    // tmux notes the pane's end (pty closed) and the exit status (child reaped) separately,
    // and may never note the second by itself (see `nudge_reaper`).
    eventually(&tui, "ppuctl tui to exit", || async {
        let (dead, status) = tui.pane_dead().await;
        if dead && status.is_empty() {
            tui.nudge_reaper().await;
        }
        dead && !status.is_empty()
    })
    .await;
    assert_eq!(tui.pane_dead().await.1, "0", "exit status");

    lab.stop().await;
}

/// Issue 17: after a transfer the scheduler inserted is confirmed, the TUI shows the daemon's
/// step list (`3/3`, the transfer done, the furnace-2 step running), not the list it read at
/// submission (where the transfer's result landed on the furnace-2 step, `2/2`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tui_shows_the_step_list_after_a_transfer_the_scheduler_inserted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::with_furnaces(dir.path(), "127.0.0.1:0".parse().expect("addr"), 2).await;
    let tui = Tui::start(&lab.url()).await;
    tui.wait("the live link", |s| s.contains("● LIVE")).await;

    let id = submit_moving(lab.channel().await, "tui-move", "tui-move", "S-MOVE").await;
    // The first step runs on furnace-1; then the sample must go to furnace-2.
    let screen = tui
        .wait("the transfer waiting for confirmation", |s| {
            s.contains("⇄ TRANSFER")
                && row_with(s, "tui-move").is_some_and(|r| r.contains("wait transfer"))
        })
        .await;
    assert!(screen.contains(&id), "its id in the detail pane:\n{screen}");
    let screen = tui
        .wait("the inserted transfer step in the detail pane", |s| {
            row_with(s, "2. transfer sample S-MOVE from furnace-1 to furnace-2")
                .is_some_and(|r| r.contains('▶'))
        })
        .await;
    assert!(
        row_with(&screen, "3. furnace").is_some(),
        "the furnace-2 step comes third:\n{screen}"
    );

    tui.keys(&["t"]).await;
    tui.wait("the transfer confirmation", |s| {
        s.contains("Confirm transfer: move sample S-MOVE to furnace-2?")
    })
    .await;
    tui.keys(&["y"]).await;

    // The daemon runs step 3 of 3 ...
    let mut experiments = ExperimentServiceClient::new(lab.channel().await);
    eventually(&tui, "the daemon to run step 3/3", || {
        let mut c = experiments.clone();
        let id = id.clone();
        async move {
            c.get_experiment(pb::GetExperimentRequest { id })
                .await
                .is_ok_and(|r| {
                    let e = r.into_inner();
                    e.state == pb::ExperimentState::Running as i32
                        && e.current_step == 2
                        && e.spec.is_some_and(|s| s.steps.len() == 3)
                })
        }
    })
    .await;
    // ... and so does the TUI: the transfer done, the furnace-2 step running, no stale row.
    let screen = tui
        .wait("step 3/3 running, as the daemon says", |s| {
            row_with(s, "tui-move").is_some_and(|r| r.contains("RUNNING") && r.contains("3/3"))
                && row_with(s, "2. transfer sample S-MOVE").is_some_and(|r| r.contains('✓'))
                && row_with(s, "3. furnace").is_some_and(|r| r.contains('▶'))
        })
        .await;
    assert!(!screen.contains("⇄ TRANSFER"), "{screen}");
    // The daemon's own account agrees.
    let e = experiments
        .get_experiment(pb::GetExperimentRequest { id: id.clone() })
        .await
        .expect("experiment")
        .into_inner();
    let results: Vec<u32> = e.results.iter().map(|r| r.step_index).collect();
    assert_eq!(results, [0, 1], "{e:?}");
    // The hold runs faster than real time: its ETA says so.
    tui.wait("the ETA marked as simulated time", |s| s.contains("(sim ×"))
        .await;

    // Hold and release from the TUI (keys the CLI's `queue hold`/`release` have), on a queued
    // experiment: the queue is paused so that it stays queued.
    QueueServiceClient::new(lab.channel().await)
        .pause_queue(pb::PauseQueueRequest::default())
        .await
        .expect("pause");
    let queued = submit(lab.channel().await, "tui-q", "tui-queued", "S-Q", 60.0).await;
    tui.wait("the queued experiment", |s| {
        row_with(s, "tui-queued").is_some_and(|r| r.contains("QUEUED"))
    })
    .await;
    tui.keys(&["j"]).await;
    tui.wait("it selected", |s| s.contains(&queued)).await;
    tui.keys(&["h"]).await;
    tui.wait("the hold confirmation", |s| {
        s.contains("Hold \"tui-queued\"?")
    })
    .await;
    tui.keys(&["y"]).await;
    tui.wait("it held", |s| {
        row_with(s, "tui-queued").is_some_and(|r| r.contains("QUEUED/HELD"))
    })
    .await;
    let e = experiments
        .get_experiment(pb::GetExperimentRequest { id: queued.clone() })
        .await
        .expect("experiment")
        .into_inner();
    assert!(e.held, "the daemon holds it");
    tui.keys(&["h"]).await;
    tui.wait("the release confirmation", |s| {
        s.contains("Release \"tui-queued\"?")
    })
    .await;
    tui.keys(&["y"]).await;
    tui.wait("it released", |s| {
        row_with(s, "tui-queued").is_some_and(|r| r.contains("QUEUED") && !r.contains("HELD"))
    })
    .await;

    lab.stop().await;
}
