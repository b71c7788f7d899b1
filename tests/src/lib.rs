//! End-to-end test support: a `ppud dev`-style lab (simulated devices behind real sockets, the
//! real drivers, the real daemon and gRPC server) started in-process on ephemeral ports, plus
//! helpers to build recipes and to wait on event streams with deadlines instead of sleeps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pb::device_service_client::DeviceServiceClient;
use pb::event_service_client::EventServiceClient;
use pb::experiment_service_client::ExperimentServiceClient;
use pb::queue_service_client::QueueServiceClient;
use ppu_daemon::app::Daemon;
use ppu_daemon::config::{DeviceConfig, Policies};
use ppu_daemon::dev::{DevLab, TransferRobot};
use ppu_daemon::devices::PollSettings;
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use tonic::transport::Channel;

/// Physical seconds per real second in these tests: a 2-hour program takes ~3.6 s.
pub const TEST_TIME_SCALE: f64 = 2000.0;
/// Device polling in these tests: fast, so readings and link changes show up quickly.
pub const TEST_POLL: PollSettings = PollSettings {
    poll_interval: Duration::from_millis(100),
    reading_log_interval: Duration::from_secs(1),
};
/// Upper bound on any wait in these tests (real time).
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Real-time delay of the test lab's transfer robot.
pub const TEST_TRANSFER_DELAY: Duration = Duration::from_millis(50);

/// How to build a [`Lab`].
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Simulated furnaces (furnace-1, …).
    pub furnaces: usize,
    /// The simulated robot's delay before it confirms a transfer; `None`: no robot, transfers
    /// wait for `ConfirmTransfer`.
    pub transfer_delay: Option<Duration>,
    /// Recovery and retry policies.
    pub policies: Policies,
    /// Add the simulated dispensing station (pump-a, pump-b, balance-1 on ptys).
    pub dispensing: bool,
    /// `Some(baud)`: the daemon reaches every furnace through one simulated Modbus RTU line
    /// (a pty paced at that baud rate) as one bus, instead of a TCP socket per furnace.
    pub furnace_line: Option<u32>,
    /// Simulated sorption analysers (analyser-1, …) behind the embedded MQTT broker.
    pub analysers: usize,
    /// Physical seconds per real second; [`TEST_TIME_SCALE`] unless a test needs a device to
    /// stay busy for longer (a dispense still running when its pump is plugged back).
    pub time_scale: f64,
    /// Changes the daemon's device entries (e.g. a shorter outage grace) before it starts.
    pub adjust_device: fn(&mut DeviceConfig),
}

impl LabOptions {
    pub fn furnaces(furnaces: usize) -> Self {
        Self {
            furnaces,
            transfer_delay: Some(TEST_TRANSFER_DELAY),
            policies: Policies::default(),
            dispensing: false,
            furnace_line: None,
            analysers: 0,
            time_scale: TEST_TIME_SCALE,
            adjust_device: |_| {},
        }
    }
}

/// A running daemon with its simulated lab and, unless disabled, the simulated robot that
/// confirms transfers.
pub struct Lab {
    pub daemon: Option<Daemon>,
    pub devlab: Arc<DevLab>,
    pub data_dir: PathBuf,
    robot: Option<TransferRobot>,
    adjust_device: fn(&mut DeviceConfig),
    _tmp: Option<tempfile::TempDir>,
}

impl Lab {
    /// A fresh lab with `furnaces` simulated furnaces on a new temporary data dir.
    pub async fn start(furnaces: usize) -> Lab {
        Lab::start_with(LabOptions::furnaces(furnaces)).await
    }

    /// A fresh lab built from `opts` on a new temporary data dir.
    pub async fn start_with(opts: LabOptions) -> Lab {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut lab = Lab::start_in_with(tmp.path(), opts).await;
        lab._tmp = Some(tmp);
        lab
    }

    /// A lab on an existing data dir (to test restarts).
    pub async fn start_in(data_dir: &Path, furnaces: usize) -> Lab {
        Lab::start_in_with(data_dir, LabOptions::furnaces(furnaces)).await
    }

    /// A lab built from `opts` on an existing data dir.
    pub async fn start_in_with(data_dir: &Path, lab_opts: LabOptions) -> Lab {
        let clock = Clock::new(lab_opts.time_scale);
        let mut devlab = DevLab::start(clock, lab_opts.furnaces)
            .await
            .expect("simulated lab");
        if let Some(baud) = lab_opts.furnace_line {
            devlab
                .add_furnace_line(baud)
                .await
                .expect("simulated RS-485 line of furnaces");
        }
        if lab_opts.dispensing {
            devlab
                .add_dispensing_station()
                .await
                .expect("simulated dispensing station");
        }
        if lab_opts.analysers > 0 {
            devlab
                .add_analysers(lab_opts.analysers)
                .await
                .expect("simulated analysers");
        }
        let daemon = start_daemon(
            &devlab,
            data_dir,
            &lab_opts.policies,
            lab_opts.adjust_device,
        )
        .await;
        let devlab = Arc::new(devlab);
        let robot = lab_opts
            .transfer_delay
            .map(|delay| TransferRobot::start(devlab.clone(), daemon.scheduler().clone(), delay));
        Lab {
            daemon: Some(daemon),
            devlab,
            data_dir: data_dir.to_owned(),
            robot,
            adjust_device: lab_opts.adjust_device,
            _tmp: None,
        }
    }

    pub fn endpoint(&self) -> String {
        format!(
            "http://{}",
            self.daemon.as_ref().expect("daemon running").addr()
        )
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn experiments(&self) -> ExperimentServiceClient<Channel> {
        ExperimentServiceClient::new(self.channel().await)
    }

    pub async fn events(&self) -> EventServiceClient<Channel> {
        EventServiceClient::new(self.channel().await)
    }

    pub async fn queue(&self) -> QueueServiceClient<Channel> {
        QueueServiceClient::new(self.channel().await)
    }

    pub async fn devices(&self) -> DeviceServiceClient<Channel> {
        DeviceServiceClient::new(self.channel().await)
    }

    /// Restarts only the daemon (default policies) on the same data dir and the same simulated
    /// devices, as after a daemon upgrade: the devices keep their state, the daemon restores
    /// its own from the store. The robot, if one ran, is restarted with the new daemon.
    pub async fn restart_daemon(&mut self) {
        let had_robot = self.robot.is_some();
        if let Some(r) = self.robot.take() {
            r.stop().await;
        }
        if let Some(d) = self.daemon.take() {
            d.shutdown().await;
        }
        // Same lab, same clock: the simulators keep their physical time across the restart.
        let daemon = start_daemon(
            &self.devlab,
            &self.data_dir,
            &Policies::default(),
            self.adjust_device,
        )
        .await;
        if had_robot {
            self.robot = Some(TransferRobot::start(
                self.devlab.clone(),
                daemon.scheduler().clone(),
                TEST_TRANSFER_DELAY,
            ));
        }
        self.daemon = Some(daemon);
    }

    /// Graceful shutdown of robot, daemon and simulators.
    pub async fn stop(mut self) {
        if let Some(r) = self.robot.take() {
            r.stop().await;
        }
        if let Some(d) = self.daemon.take() {
            d.shutdown().await;
        }
        if let Ok(devlab) = Arc::try_unwrap(self.devlab) {
            devlab.shutdown().await;
        }
    }
}

/// The daemon on `devlab`'s devices, their entries changed by `adjust`, on a free port.
async fn start_daemon(
    devlab: &DevLab,
    data_dir: &Path,
    policies: &Policies,
    adjust: fn(&mut DeviceConfig),
) -> Daemon {
    let mut devices = devlab.device_configs();
    devices.iter_mut().for_each(adjust);
    devlab
        .start_daemon_with_devices(
            "127.0.0.1:0".parse().expect("addr"),
            data_dir,
            TEST_POLL,
            policies,
            devices,
        )
        .await
        .expect("daemon starts")
}

/// A furnace step from segments.
pub fn furnace_step(segments: Vec<pb::furnace_segment::Kind>) -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
            segments: segments
                .into_iter()
                .map(|k| pb::FurnaceSegment { kind: Some(k) })
                .collect(),
        })),
    }
}

pub fn ramp(temperature_c: f64, rate_c_per_min: f64) -> pb::furnace_segment::Kind {
    pb::furnace_segment::Kind::Ramp(pb::Ramp {
        temperature_c,
        rate_c_per_min,
    })
}

pub fn hold(duration_s: f64) -> pb::furnace_segment::Kind {
    pb::furnace_segment::Kind::Hold(pb::Hold { duration_s })
}

pub fn step_to(temperature_c: f64) -> pb::furnace_segment::Kind {
    pb::furnace_segment::Kind::Step(pb::StepTo { temperature_c })
}

/// An experiment with one furnace step.
pub fn furnace_experiment(
    name: &str,
    segments: Vec<pb::furnace_segment::Kind>,
) -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: name.to_owned(),
        sample_id: format!("S-{name}"),
        steps: vec![furnace_step(segments)],
        ..Default::default()
    }
}

pub fn batch(key: &str, experiments: Vec<pb::ExperimentSpec>) -> pb::SubmitBatchRequest {
    pb::SubmitBatchRequest {
        idempotency_key: key.to_owned(),
        experiments,
    }
}

/// True for the four terminal states.
pub fn is_terminal(state: i32) -> bool {
    use pb::ExperimentState as S;
    [S::Succeeded, S::Failed, S::Cancelled, S::Interrupted]
        .iter()
        .any(|s| *s as i32 == state)
}

/// Reads events from `stream` until `done` says so, or fails at the deadline.
pub async fn read_until(
    stream: &mut tonic::Streaming<pb::Event>,
    out: &mut Vec<pb::Event>,
    mut done: impl FnMut(&[pb::Event]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !done(out) {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(e))) => out.push(e),
            Ok(Ok(None)) => panic!("event stream ended early after {} events", out.len()),
            Ok(Err(s)) => panic!("event stream failed: {s}"),
            Err(_) => panic!("deadline passed after {} events", out.len()),
        }
    }
}

/// The experiment ids that reached a terminal state in `events`.
pub fn finished(events: &[pb::Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::event::Kind::ExperimentStateChanged(c)) if is_terminal(c.to) => {
                Some(e.experiment_id.clone())
            }
            _ => None,
        })
        .collect()
}

/// Waits until `check` returns true, polling the lab state; for conditions with no event.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Lab {
    /// The device `id` as `GetDevice` shows it.
    pub async fn device(&self, id: &str) -> pb::Device {
        self.devices()
            .await
            .get_device(pb::GetDeviceRequest { id: id.to_owned() })
            .await
            .expect("GetDevice")
            .into_inner()
    }

    /// The alarms of device `id` as `ListAlarms` shows them (active and unacknowledged).
    pub async fn alarms(&self, id: &str) -> Vec<pb::ActiveAlarm> {
        self.devices()
            .await
            .list_alarms(pb::ListAlarmsRequest {
                device_id: id.to_owned(),
            })
            .await
            .expect("ListAlarms")
            .into_inner()
            .alarms
    }

    /// Every experiment the daemon lists, with its state (all pages).
    pub async fn all_experiments(&self) -> std::collections::BTreeMap<String, i32> {
        let mut client = self.experiments().await;
        let mut out = std::collections::BTreeMap::new();
        let mut token = String::new();
        loop {
            let page = client
                .list_experiments(pb::ListExperimentsRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .expect("ListExperiments")
                .into_inner();
            for e in page.experiments {
                out.insert(e.id, e.state);
            }
            if page.next_page_token.is_empty() {
                return out;
            }
            token = page.next_page_token;
        }
    }

    /// Submits `spec` alone in a batch; returns the new experiment's id.
    pub async fn submit(&self, key: &str, spec: pb::ExperimentSpec) -> String {
        self.experiments()
            .await
            .submit_batch(batch(key, vec![spec]))
            .await
            .expect("submit")
            .into_inner()
            .batch
            .expect("batch")
            .experiment_ids
            .into_iter()
            .next()
            .expect("one id")
    }

    /// The whole durable event log so far, from sequence 1.
    pub async fn event_stream(&self) -> tonic::Streaming<pb::Event> {
        self.events()
            .await
            .stream_events(pb::StreamEventsRequest::default())
            .await
            .expect("stream")
            .into_inner()
    }
}

/// The isotherm result among `e`'s step results, if any.
pub fn isotherm_result(e: &pb::Experiment) -> Option<pb::IsothermResult> {
    e.results.iter().find_map(|r| match &r.result {
        Some(pb::step_result::Result::Isotherm(i)) => Some(i.clone()),
        _ => None,
    })
}

/// The device alarm events in `events` as (code, cleared, severity).
pub fn alarm_events(events: &[pb::Event], device: &str) -> Vec<(String, bool, i32)> {
    events
        .iter()
        .filter(|e| e.device_id == device)
        .filter_map(|e| match &e.kind {
            Some(pb::event::Kind::Alarm(a)) => Some((a.code.clone(), a.cleared, a.severity)),
            _ => None,
        })
        .collect()
}

/// True when `alarms` (from [`alarm_events`]) has `code` raised (`cleared` false) or cleared.
pub fn has_alarm(alarms: &[(String, bool, i32)], code: &str, cleared: bool) -> bool {
    alarms.iter().any(|(c, cl, _)| c == code && *cl == cleared)
}

/// Asserts that `events`, read from the start of the log, are numbered 1, 2, 3, … without a gap.
pub fn assert_gapless(events: &[pb::Event]) {
    assert!(!events.is_empty(), "no events");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.sequence, i as u64 + 1, "no gap in the event log");
    }
}
