//! The Prometheus endpoint against a real daemon with its simulated lab (a furnace behind a real
//! Modbus TCP socket), started in-process; scraped over a real TCP connection.
//!
//! Every wait is on an event from the daemon's log or a condition with a deadline; nothing
//! waits on a fixed sleep.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ppu_daemon::app::Daemon;
use ppu_daemon::bus::Published;
use ppu_daemon::config::Policies;
use ppu_daemon::dev::DevLab;
use ppu_daemon::devices::PollSettings;
use ppu_daemon::metrics::MetricsEndpoint;
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use ppu_proto::v1::experiment_service_client::ExperimentServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Physical seconds per real second.
const TIME_SCALE: f64 = 2000.0;
/// Upper bound on any wait (real time).
const DEADLINE: Duration = Duration::from_secs(60);

/// Every series the design names.
const SERIES: [&str; 23] = [
    "ppu_queue_depth",
    "ppu_experiments",
    "ppu_step_duration_seconds",
    "ppu_device_request_duration_seconds",
    "ppu_device_errors_total",
    "ppu_transport_reconnects_total",
    "ppu_device_unsafe",
    "ppu_event_log_events",
    "ppu_event_log_bytes",
    "ppu_active_streams",
    "ppu_stream_log_fallbacks_total",
    "ppu_grpc_requests_total",
    "ppu_grpc_decode_errors_total",
    "ppu_build_info",
    "ppu_device_up",
    "ppu_alarms_active",
    "ppu_grpc_request_duration_seconds",
    // The process collector.
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

/// A sample's labels.
type Labels = BTreeMap<String, String>;

/// One scrape: the samples by series name, each with its labels.
struct Scrape {
    text: String,
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut samples: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line.rsplit_once(' ').expect("a sample line has a value");
            let value: f64 = value.parse().expect("a sample value is a number");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels end with }");
                    let labels = body
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect("label is k=\"v\"");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            samples
                .entry(name.to_owned())
                .or_default()
                .push((labels, value));
        }
        Scrape { text, samples }
    }

    /// The value of the sample of `name` whose labels include `labels`; the sum if several.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .get(name)?
            .iter()
            .filter(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in the scrape:\n{}", self.text))
    }

    /// True if `name` (a histogram's base name included) has at least one sample.
    fn has(&self, name: &str) -> bool {
        [
            name.to_owned(),
            format!("{name}_bucket"),
            format!("{name}_count"),
        ]
        .iter()
        .any(|n| self.samples.contains_key(n))
    }
}

/// `GET /metrics` over a fresh TCP connection; checks the status and content type.
async fn scrape(addr: SocketAddr) -> Scrape {
    let mut s = TcpStream::connect(addr).await.expect("connect to /metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: ppud\r\nAccept: text/plain\r\n\r\n")
        .await
        .expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut raw))
        .await
        .expect("the endpoint answers in time")
        .expect("read response");
    let raw = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("a Content-Length")
        .parse()
        .expect("a numeric Content-Length");
    assert_eq!(length, body.len());
    Scrape::parse(body.to_owned())
}

/// Waits for the first logged event that satisfies `pred` and returns it.
async fn wait_event(
    events: &mut broadcast::Receiver<Arc<Published>>,
    what: &str,
    pred: impl Fn(&pb::Event) -> bool,
) -> Arc<Published> {
    let found = tokio::time::timeout(DEADLINE, async {
        loop {
            match events.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("event log closed"),
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn link_changed(device: &str, state: pb::ConnectionState) -> impl Fn(&pb::Event) -> bool {
    move |e: &pb::Event| {
        e.device_id == device
            && matches!(&e.kind, Some(pb::event::Kind::DeviceConnectionChanged(c)) if c.state == state as i32)
    }
}

/// One furnace experiment: ramp to 150 °C and hold a minute (well under a second at 2000×).
fn furnace_spec() -> pb::ExperimentSpec {
    use pb::furnace_segment::Kind as S;
    let segments = [
        S::Ramp(pb::Ramp {
            temperature_c: 150.0,
            rate_c_per_min: 20.0,
        }),
        S::Hold(pb::Hold { duration_s: 60.0 }),
    ];
    pb::ExperimentSpec {
        name: "metrics".into(),
        sample_id: "s-metrics".into(),
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
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_every_series_and_follows_the_lab() {
    let data = tempfile::tempdir().expect("temp dir");
    let clock = Clock::new(TIME_SCALE);
    let lab = DevLab::start(clock, 1).await.expect("simulated lab");
    let poll = PollSettings {
        poll_interval: Duration::from_millis(100),
        reading_log_interval: Duration::from_secs(1),
    };
    let daemon: Daemon = lab
        .start_daemon(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            data.path(),
            poll,
            &Policies::default(),
        )
        .await
        .expect("daemon starts");
    let endpoint = MetricsEndpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind the metrics endpoint");
    let addr = endpoint.local_addr();
    let stop = CancellationToken::new();
    let served = endpoint.spawn(daemon.scheduler().clone(), stop.clone());
    let mut events = daemon.scheduler().store().subscribe();

    // A fresh daemon: every named series is in the scrape, the state gauges at zero.
    let fresh = scrape(addr).await;
    for name in SERIES {
        assert!(fresh.has(name), "{name} missing from:\n{}", fresh.text);
        assert!(
            fresh.text.contains(&format!("# TYPE {name} ")),
            "{name} has no TYPE line"
        );
    }
    assert_eq!(fresh.value("ppu_queue_depth", &[]), 0.0);
    for state in [
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "interrupted",
    ] {
        assert_eq!(fresh.value("ppu_experiments", &[("state", state)]), 0.0);
    }
    assert_eq!(
        fresh.value("ppu_step_duration_seconds_count", &[("family", "furnace")]),
        0.0
    );
    assert_eq!(
        fresh.value(
            "ppu_grpc_requests_total",
            &[
                ("method", "/ppu.v1.ExperimentService/SubmitBatch"),
                ("code", "OK")
            ]
        ),
        0.0
    );
    for kind in ["events", "watch_device"] {
        assert_eq!(fresh.value("ppu_active_streams", &[("kind", kind)]), 0.0);
    }
    assert_eq!(
        fresh.value(
            "ppu_device_errors_total",
            &[("device", "furnace-1"), ("kind", "timeout")]
        ),
        0.0
    );
    assert_eq!(
        fresh.value(
            "ppu_transport_reconnects_total",
            &[("transport", "modbus"), ("device", "furnace-1")]
        ),
        0.0
    );
    assert_eq!(
        fresh.value("ppu_device_unsafe", &[("device", "furnace-1")]),
        0.0
    );
    assert_eq!(
        fresh.value("ppu_device_up", &[("device", "furnace-1")]),
        1.0
    );
    assert_eq!(
        fresh.value("ppu_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );
    assert!(
        fresh.samples["ppu_build_info"][0]
            .0
            .contains_key("git_commit"),
        "{}",
        fresh.text
    );
    for severity in ["warning", "critical"] {
        assert_eq!(
            fresh.value("ppu_alarms_active", &[("severity", severity)]),
            0.0
        );
    }
    // This process: it holds memory and descriptors, and started before now.
    assert!(fresh.value("process_resident_memory_bytes", &[]) > 1e6);
    let fds = fresh.value("process_open_fds", &[]);
    assert!(
        fds >= 3.0 && fds <= fresh.value("process_max_fds", &[]),
        "{fds}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let started = fresh.value("process_start_time_seconds", &[]);
    assert!(
        started <= now + 1.0 && started > now - 86_400.0,
        "{started} vs {now}"
    );
    assert!(fresh.value("process_cpu_seconds_total", &[]) > 0.0);

    // One experiment through the lab.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", daemon.addr()))
        .expect("uri")
        .connect()
        .await
        .expect("connect gRPC");
    let reply = ExperimentServiceClient::new(channel)
        .submit_batch(pb::SubmitBatchRequest {
            idempotency_key: "metrics-1".into(),
            experiments: vec![furnace_spec()],
        })
        .await
        .expect("submit")
        .into_inner();
    let id = reply.batch.expect("batch").experiment_ids[0].clone();
    let submitted = scrape(addr).await;
    let submit = [("method", "/ppu.v1.ExperimentService/SubmitBatch")];
    assert_eq!(
        submitted.value("ppu_grpc_request_duration_seconds_count", &submit),
        1.0
    );
    assert!(submitted.value("ppu_grpc_request_duration_seconds_sum", &submit) > 0.0);
    assert_eq!(
        submitted.value(
            "ppu_grpc_request_duration_seconds_bucket",
            &[submit[0], ("le", "+Inf")]
        ),
        1.0
    );
    wait_event(&mut events, "the experiment to succeed", |e| {
        e.experiment_id == id
            && matches!(&e.kind, Some(pb::event::Kind::ExperimentStateChanged(c)) if c.to == pb::ExperimentState::Succeeded as i32)
    })
    .await;

    let after = scrape(addr).await;
    assert_eq!(
        after.value("ppu_experiments", &[("state", "succeeded")]),
        1.0
    );
    assert_eq!(after.value("ppu_experiments", &[("state", "queued")]), 0.0);
    assert_eq!(after.value("ppu_experiments", &[("state", "running")]), 0.0);
    assert_eq!(after.value("ppu_queue_depth", &[]), 0.0);
    let steps = after.value("ppu_step_duration_seconds_count", &[("family", "furnace")]);
    assert_eq!(steps, 1.0, "one furnace step finished");
    let step_time = after.value("ppu_step_duration_seconds_sum", &[("family", "furnace")]);
    assert!(step_time > 0.0, "the step took real time: {step_time}");
    assert_eq!(
        after.value(
            "ppu_step_duration_seconds_bucket",
            &[("family", "furnace"), ("le", "+Inf")]
        ),
        1.0
    );
    // The poller has been reading the furnace's status all along.
    let reads = after.value(
        "ppu_device_request_duration_seconds_count",
        &[("device", "furnace-1")],
    );
    assert!(reads >= 1.0, "status reads recorded: {reads}");
    assert!(
        after.value(
            "ppu_device_request_duration_seconds_sum",
            &[("device", "furnace-1")]
        ) > 0.0
    );
    // The log holds at least the submission, start and finish; its size is what the store says.
    let logged = after.value("ppu_event_log_events", &[]);
    assert!(logged >= 4.0, "events logged: {logged}");
    let bytes = after.value("ppu_event_log_bytes", &[]);
    assert!(
        bytes > logged * 8.0,
        "log bytes {bytes} for {logged} events"
    );

    // A sensor break: an active alarm, counted by its severity, until it clears.
    let furnace = &lab.furnaces[0];
    let alarm = |cleared: bool| {
        move |e: &pb::Event| {
            e.device_id == "furnace-1"
                && matches!(&e.kind, Some(pb::event::Kind::Alarm(a)) if a.cleared == cleared)
        }
    };
    furnace.sim.set_sensor_break(true);
    let raised = wait_event(&mut events, "a furnace-1 alarm", alarm(false)).await;
    let severity = match &raised.kind {
        Some(pb::event::Kind::Alarm(a)) if a.severity == pb::AlarmSeverity::Critical as i32 => {
            "critical"
        }
        _ => "warning",
    };
    let alarmed = scrape(addr).await;
    assert!(
        alarmed.value("ppu_alarms_active", &[("severity", severity)]) >= 1.0,
        "{}",
        alarmed.text
    );
    furnace.sim.set_sensor_break(false);
    wait_event(&mut events, "the furnace-1 alarm to clear", alarm(true)).await;
    let cleared = scrape(addr).await;
    assert_eq!(
        cleared.value("ppu_alarms_active", &[("severity", "warning")])
            + cleared.value("ppu_alarms_active", &[("severity", "critical")]),
        0.0,
        "{}",
        cleared.text
    );

    // A silent furnace: status reads time out, the link goes down; once it answers again the
    // transport has reconnected.
    furnace.sim.set_silent(true);
    wait_event(
        &mut events,
        "furnace-1 to be reported disconnected",
        link_changed("furnace-1", pb::ConnectionState::Disconnected),
    )
    .await;
    let outage = scrape(addr).await;
    assert_eq!(
        outage.value("ppu_device_up", &[("device", "furnace-1")]),
        0.0
    );
    let timeouts = outage.value(
        "ppu_device_errors_total",
        &[("device", "furnace-1"), ("kind", "timeout")],
    );
    assert!(timeouts >= 1.0, "timeouts counted: {timeouts}");
    furnace.sim.set_silent(false);
    wait_event(
        &mut events,
        "furnace-1 to be reported connected again",
        link_changed("furnace-1", pb::ConnectionState::Connected),
    )
    .await;
    let back = scrape(addr).await;
    assert_eq!(back.value("ppu_device_up", &[("device", "furnace-1")]), 1.0);
    // Until the drivers name their device to the transport, the label is the transport's peer.
    let reconnects = back.value("ppu_transport_reconnects_total", &[("transport", "modbus")]);
    assert!(reconnects >= 1.0, "reconnects counted: {reconnects}");
    assert_eq!(
        back.value("ppu_experiments", &[("state", "succeeded")]),
        1.0
    );

    stop.cancel();
    tokio::time::timeout(DEADLINE, served)
        .await
        .expect("the endpoint stops")
        .expect("the endpoint task did not panic");
    tokio::time::timeout(DEADLINE, daemon.shutdown())
        .await
        .expect("the daemon shuts down");
    lab.shutdown().await;
}
