//! Prometheus metrics: the process-wide recorder, the names and labels of every series, the
//! helpers the rest of the daemon records through, and the `GET /metrics` endpoint.
//!
//! The `metrics` facade needs one global recorder, installed the first time an endpoint binds
//! (no endpoint configured: no recorder, and every recording is a no-op). Counters and
//! histograms are therefore per process. Gauges that are *state* (queue depth, experiments by
//! state, event log size) are set from the scraped daemon's scheduler and store right before
//! rendering, under one lock, so a process running several daemons (the tests) still answers
//! each scrape with that daemon's state.
//!
//! The endpoint is hyper's HTTP/1.1 server (already in the tree through the gRPC stack): one request per
//! connection, a head of at most [`MAX_HEAD`] bytes read under a real-time deadline, `200` for
//! `GET`/`HEAD /metrics`, an error status for anything else, then close. It has no
//! authentication: keep it on loopback or a management network.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use ppu_drivers::DeviceError;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::state::State;
use crate::store::Store;

/// QUEUED experiments waiting to start (held ones included), as the dispatcher sees them.
pub const QUEUE_DEPTH: &str = "ppu_queue_depth";
/// Experiments by lifecycle state; label `state`.
pub const EXPERIMENTS: &str = "ppu_experiments";
/// Real time a step spent on its device; label `family`.
pub const STEP_DURATION: &str = "ppu_step_duration_seconds";
/// Round trip of one device status read; label `device`.
pub const DEVICE_REQUEST_DURATION: &str = "ppu_device_request_duration_seconds";
/// Failed device requests; labels `device`, `kind`.
pub const DEVICE_ERRORS: &str = "ppu_device_errors_total";
/// Links reopened after having been lost; labels `transport`, `device` (recorded by the
/// drivers' transports under this literal name).
pub const TRANSPORT_RECONNECTS: &str = "ppu_transport_reconnects_total";
/// 1 while a device's safe state is not confirmed by read-back (the device is unsafe), else
/// 0; label `device`.
pub const DEVICE_UNSAFE: &str = "ppu_device_unsafe";
/// Events in the durable log.
pub const EVENT_LOG_EVENTS: &str = "ppu_event_log_events";
/// Bytes of the durable log's keys and values.
pub const EVENT_LOG_BYTES: &str = "ppu_event_log_bytes";
/// Open server streams; label `kind`.
pub const ACTIVE_STREAMS: &str = "ppu_active_streams";
/// Finished gRPC calls; labels `method`, `code`.
pub const GRPC_REQUESTS: &str = "ppu_grpc_requests_total";
/// Requests whose body did not decode (answered INVALID_ARGUMENT); label `method`.
pub const GRPC_DECODE_ERRORS: &str = "ppu_grpc_decode_errors_total";

/// Events the fleet outbox published to JetStream and saw acknowledged (issue 18).
pub const FLEET_EVENTS_PUBLISHED: &str = "ppu_fleet_events_published_total";
/// Events in the log that JetStream has not acknowledged yet (the outbox's lag).
pub const FLEET_OUTBOX_LAG: &str = "ppu_fleet_outbox_lag_events";
/// Fleet work messages taken (committed locally and claimed by this lab).
pub const FLEET_WORK_TAKEN: &str = "ppu_fleet_work_taken_total";
/// Fleet work messages refused (terminated, the reason published).
pub const FLEET_WORK_REFUSED: &str = "ppu_fleet_work_refused_total";

/// Always 1; labels `version` (the crate's) and `git_commit` (at build time, empty if unknown).
pub const BUILD_INFO: &str = "ppu_build_info";
/// 1 while the last exchange with a device succeeded, else 0; label `device`.
pub const DEVICE_UP: &str = "ppu_device_up";
/// Alarms not yet cleared (the daemon's own included); label `severity` (`warning`,
/// `critical`).
pub const ALARMS_ACTIVE: &str = "ppu_alarms_active";
/// Real time from a gRPC call's arrival to its reply's headers (for a stream: until it opens),
/// refusals included; label `method`.
pub const GRPC_REQUEST_DURATION: &str = "ppu_grpc_request_duration_seconds";

/// The git commit ppud was built from (`daemon/build.rs`), empty when unknown.
pub const GIT_COMMIT: &str = match option_env!("PPU_GIT_COMMIT") {
    Some(c) => c,
    None => "",
};

/// Largest request head the endpoint reads (hyper's smallest buffer limit); a longer one is
/// answered 431.
pub const MAX_HEAD: usize = 8 * 1024;
/// Real-time limit for a client to send its request head; the connection is closed after it.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Real-time limit for a whole connection (head, rendering, writing to a slow reader).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// How often histogram samples are folded into their buckets between scrapes, so memory stays
/// bounded when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Upper bounds (seconds) of the step duration buckets: seconds (dispenses, weighings) to a day
/// (long furnace programs).
const STEP_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
    86400.0,
];
/// Upper bounds (seconds) of the device round-trip buckets: a loopback Modbus read takes
/// ~0.1 ms, a 9600-baud serial exchange ~25 ms, a timeout seconds.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds (seconds) of the gRPC latency buckets: a read answers in well under a
/// millisecond, a submission commits to disk (a few ms), a slow disk or a large batch seconds.
const RPC_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Every value of the `severity` label of [`ALARMS_ACTIVE`].
pub const ALARM_SEVERITIES: [&str; 2] = ["warning", "critical"];

/// Every value of the `kind` label of [`DEVICE_ERRORS`].
pub const DEVICE_ERROR_KINDS: [&str; 8] = [
    "timeout",
    "disconnected",
    "refused",
    "corrupt",
    "limit",
    "fault",
    "aborted",
    "unsupported",
];

/// The `kind` label of a device error.
pub fn error_kind(e: &DeviceError) -> &'static str {
    match e {
        DeviceError::Timeout { .. } => "timeout",
        DeviceError::Disconnected(_) => "disconnected",
        DeviceError::Refused { .. } => "refused",
        DeviceError::Corrupt { .. } => "corrupt",
        DeviceError::Limit { .. } => "limit",
        DeviceError::Fault(_) => "fault",
        DeviceError::Aborted => "aborted",
        DeviceError::Unsupported(_) => "unsupported",
    }
}

/// The `state` label of an experiment state.
pub fn state_label(s: State) -> &'static str {
    match s {
        State::Queued => "queued",
        State::Running => "running",
        State::Succeeded => "succeeded",
        State::Failed => "failed",
        State::Cancelled => "cancelled",
        State::Interrupted => "interrupted",
    }
}

/// The `transport` label for a device's transport description (`DeviceInfo::transport`), as
/// the drivers' transports record it.
fn transport_label(described: &str) -> &'static str {
    if described.starts_with("modbus") {
        "modbus"
    } else if described.starts_with("serial") {
        "serial"
    } else if described.starts_with("mqtt") {
        "mqtt"
    } else {
        "other"
    }
}

// ---------------------------------------------------------------------------------------------
// Recording (cheap no-ops until a recorder is installed)
// ---------------------------------------------------------------------------------------------

/// A step finished on a device of `family` after `elapsed` real time.
pub fn step_finished(family: &str, elapsed: Duration) {
    histogram!(STEP_DURATION, "family" => family.to_owned()).record(elapsed.as_secs_f64());
}

/// One status read of `device` took `elapsed` (successful or not).
pub fn device_request(device: &str, elapsed: Duration) {
    histogram!(DEVICE_REQUEST_DURATION, "device" => device.to_owned())
        .record(elapsed.as_secs_f64());
}

/// A request to `device` failed with `e`.
pub fn device_error(device: &str, e: &DeviceError) {
    counter!(DEVICE_ERRORS, "device" => device.to_owned(), "kind" => error_kind(e)).increment(1);
}

/// A gRPC call finished; `method` is the full path, e.g. `/ppu.v1.QueueService/PauseQueue`.
/// `code` is the status code's canonical name, e.g. `PERMISSION_DENIED`.
pub fn grpc_request(method: &str, code: &'static str) {
    counter!(GRPC_REQUESTS, "method" => method.to_owned(), "code" => code).increment(1);
}

/// A gRPC call to `method` (full path) got its reply's headers `elapsed` after it arrived.
pub fn grpc_latency(method: &str, elapsed: Duration) {
    histogram!(GRPC_REQUEST_DURATION, "method" => method.to_owned()).record(elapsed.as_secs_f64());
}

/// A request to `method` (full path) did not decode.
pub fn grpc_decode_error(method: &str) {
    counter!(GRPC_DECODE_ERRORS, "method" => method.to_owned()).increment(1);
}

/// The fleet outbox saw `n` more events acknowledged; `lag` are still unacknowledged.
pub fn fleet_published(n: u64, lag: u64) {
    counter!(FLEET_EVENTS_PUBLISHED).increment(n);
    gauge!(FLEET_OUTBOX_LAG).set(lag as f64);
}

/// A fleet work message was taken (`true`) or refused.
pub fn fleet_work(taken: bool) {
    if taken {
        counter!(FLEET_WORK_TAKEN).increment(1);
    } else {
        counter!(FLEET_WORK_REFUSED).increment(1);
    }
}

/// The kinds of server stream counted by [`ACTIVE_STREAMS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `EventService/StreamEvents`.
    Events,
    /// `DeviceService/WatchDevice`.
    WatchDevice,
}

impl StreamKind {
    pub const ALL: [StreamKind; 2] = [StreamKind::Events, StreamKind::WatchDevice];

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            StreamKind::Events => "events",
            StreamKind::WatchDevice => "watch_device",
        }
    }
}

/// Counts one open stream in [`ACTIVE_STREAMS`] for as long as it lives.
#[derive(Debug)]
pub struct ActiveStream {
    kind: StreamKind,
    /// Whether the opening was counted: a stream opened before the recorder was installed
    /// must not be subtracted when it closes after.
    counted: bool,
}

impl ActiveStream {
    /// Counts a stream of `kind` as open until the returned guard is dropped.
    pub fn open(kind: StreamKind) -> ActiveStream {
        let counted = RECORDER.get().is_some_and(Result::is_ok);
        if counted {
            gauge!(ACTIVE_STREAMS, "kind" => kind.label()).increment(1.0);
        }
        ActiveStream { kind, counted }
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        if self.counted {
            gauge!(ACTIVE_STREAMS, "kind" => self.kind.label()).decrement(1.0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The recorder
// ---------------------------------------------------------------------------------------------

/// The installed recorder, or why it could not be installed (another recorder owns the
/// process).
static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
/// Held from refreshing the state gauges until the rendering is done (see the module docs).
static SCRAPE: Mutex<()> = Mutex::new(());

/// Installs the global recorder (once per process) and returns its handle.
pub fn install() -> Result<&'static PrometheusHandle, String> {
    RECORDER
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(STEP_DURATION.to_owned()), STEP_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(DEVICE_REQUEST_DURATION.to_owned()),
                        REQUEST_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(GRPC_REQUEST_DURATION.to_owned()),
                        RPC_BUCKETS,
                    )
                })
                .and_then(|b| b.install_recorder())
                .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
            describe_all();
            register_process_series();
            Ok(handle)
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn describe_all() {
    describe_counter!(
        FLEET_EVENTS_PUBLISHED,
        Unit::Count,
        "Events the fleet outbox published to JetStream, acknowledged."
    );
    describe_gauge!(
        FLEET_OUTBOX_LAG,
        Unit::Count,
        "Events in the log not yet acknowledged by JetStream (0 without [fleet])."
    );
    describe_counter!(
        FLEET_WORK_TAKEN,
        Unit::Count,
        "Fleet work messages committed and claimed by this lab."
    );
    describe_counter!(
        FLEET_WORK_REFUSED,
        Unit::Count,
        "Fleet work messages refused by this lab (terminated, reason published)."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "QUEUED experiments waiting to start, held ones included."
    );
    describe_gauge!(
        EXPERIMENTS,
        Unit::Count,
        "Stored experiments by lifecycle state."
    );
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Real time of each successful step on its device, by device family."
    );
    describe_histogram!(
        DEVICE_REQUEST_DURATION,
        Unit::Seconds,
        "Round trip of one device status read (real time), by device."
    );
    describe_counter!(
        DEVICE_ERRORS,
        Unit::Count,
        "Failed device requests (status reads, safe-state commands, alarm acknowledgements, steps), by device and error kind."
    );
    describe_counter!(
        TRANSPORT_RECONNECTS,
        Unit::Count,
        "Device links reopened after having been lost, by transport and device."
    );
    describe_gauge!(
        DEVICE_UNSAFE,
        Unit::Count,
        "1 while a device's safe state is not confirmed by read-back (unsafe), else 0, by device."
    );
    describe_gauge!(
        EVENT_LOG_EVENTS,
        Unit::Count,
        "Events in the durable event log."
    );
    describe_gauge!(
        EVENT_LOG_BYTES,
        Unit::Bytes,
        "Bytes of keys and values in the durable event log (without storage overhead)."
    );
    describe_gauge!(
        ACTIVE_STREAMS,
        Unit::Count,
        "Open server streams (StreamEvents, WatchDevice), by kind."
    );
    describe_counter!(
        GRPC_REQUESTS,
        Unit::Count,
        "Finished gRPC calls, by full method and status code."
    );
    describe_gauge!(
        BUILD_INFO,
        Unit::Count,
        "Always 1: the version of ppud and the git commit it was built from."
    );
    describe_gauge!(
        DEVICE_UP,
        Unit::Count,
        "1 while the last exchange with the device succeeded, else 0, by device."
    );
    describe_gauge!(
        ALARMS_ACTIVE,
        Unit::Count,
        "Alarms not yet cleared, the daemon's own included, by severity."
    );
    describe_histogram!(
        GRPC_REQUEST_DURATION,
        Unit::Seconds,
        "Real time from a gRPC call's arrival to its reply's headers (a stream: until it opens), refusals included, by full method."
    );
    describe_counter!(
        GRPC_DECODE_ERRORS,
        Unit::Count,
        "Requests whose body did not decode (bad framing, not the method's Protobuf message, invalid UTF-8), answered INVALID_ARGUMENT, by full method."
    );
}

/// Registers, at zero, the series whose labels the process knows up front, so each name is in
/// the very first scrape (a described name without a series is not rendered).
fn register_process_series() {
    gauge!(QUEUE_DEPTH).set(0.0);
    for s in State::ALL {
        gauge!(EXPERIMENTS, "state" => state_label(s)).set(0.0);
    }
    gauge!(EVENT_LOG_EVENTS).set(0.0);
    gauge!(EVENT_LOG_BYTES).set(0.0);
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "git_commit" => GIT_COMMIT).set(1.0);
    for severity in ALARM_SEVERITIES {
        gauge!(ALARMS_ACTIVE, "severity" => severity).set(0.0);
    }
    // Every family the daemon was built with, from the schema.
    for f in crate::schema::schema().families() {
        let _ = histogram!(STEP_DURATION, "family" => f.name().to_owned());
    }
    for k in StreamKind::ALL {
        gauge!(ACTIVE_STREAMS, "kind" => k.label()).increment(0.0);
    }
    for method in api_methods() {
        counter!(GRPC_DECODE_ERRORS, "method" => method.clone()).increment(0);
        let _ = histogram!(GRPC_REQUEST_DURATION, "method" => method.clone());
        counter!(GRPC_REQUESTS, "method" => method, "code" => "OK").increment(0);
    }
}

/// Every RPC of the ppu.v1 API as a full path (`/ppu.v1.Service/Method`), from the compiled
/// descriptor set.
fn api_methods() -> Vec<String> {
    let Ok(set) = prost_types::FileDescriptorSet::decode(ppu_proto::v1::FILE_DESCRIPTOR_SET) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for file in &set.file {
        let package = file.package();
        for service in &file.service {
            for method in &service.method {
                out.push(format!("/{package}.{}/{}", service.name(), method.name()));
            }
        }
    }
    out
}

/// Registers, at zero, the series of one daemon's devices.
fn register_device_series(lab: &dyn Scraped) {
    for d in lab.device_gauges() {
        let id = d.id;
        let _ = histogram!(DEVICE_REQUEST_DURATION, "device" => id.clone());
        for kind in DEVICE_ERROR_KINDS {
            counter!(DEVICE_ERRORS, "device" => id.clone(), "kind" => kind).increment(0);
        }
        let transport = transport_label(&d.transport);
        counter!(TRANSPORT_RECONNECTS, "transport" => transport, "device" => id.clone())
            .increment(0);
        gauge!(DEVICE_UP, "device" => id.clone()).set(0.0);
        gauge!(DEVICE_UNSAFE, "device" => id).set(0.0);
    }
}

/// One device as a scrape sees it.
#[derive(Debug, Clone)]
pub struct DeviceGauge {
    pub id: String,
    /// The driver's transport description, e.g. `serial /dev/ttyUSB0`.
    pub transport: String,
    /// Not confirmed in its safe state.
    pub unsafe_now: bool,
    /// The last exchange with it succeeded.
    pub up: bool,
}

/// What a scrape reads from the daemon. The scheduler implements it, so this module (which the
/// scheduler and devices record into) never reaches back into them.
pub trait Scraped: Send + Sync + 'static {
    /// How many experiments are QUEUED; O(1).
    fn queue_depth(&self) -> usize;
    fn store(&self) -> &Store;
    fn device_gauges(&self) -> Vec<DeviceGauge>;
    /// Alarms not yet cleared, the daemon's own included.
    fn active_alarms(&self) -> Vec<ppu_proto::v1::ActiveAlarm>;
}

/// Sets the state gauges from `lab` and renders every series. Blocking (a store read); holds
/// [`SCRAPE`] throughout.
fn scrape(handle: &PrometheusHandle, lab: &dyn Scraped) -> String {
    let _one_at_a_time = SCRAPE.lock().unwrap_or_else(|p| p.into_inner());
    let store = lab.store();
    gauge!(QUEUE_DEPTH).set(lab.queue_depth() as f64);
    for (state, n) in store.experiment_counts() {
        gauge!(EXPERIMENTS, "state" => state_label(state)).set(n as f64);
    }
    match store.event_count() {
        Ok(n) => gauge!(EVENT_LOG_EVENTS).set(n as f64),
        Err(e) => warn!(error = %e, "metrics: cannot count the event log"),
    }
    gauge!(EVENT_LOG_BYTES).set(store.event_log_bytes() as f64);
    for d in lab.device_gauges() {
        let unsafe_now = if d.unsafe_now { 1.0 } else { 0.0 };
        gauge!(DEVICE_UP, "device" => d.id.clone()).set(if d.up { 1.0 } else { 0.0 });
        gauge!(DEVICE_UNSAFE, "device" => d.id).set(unsafe_now);
    }
    let mut by_severity = [0usize; ALARM_SEVERITIES.len()];
    for a in lab.active_alarms().iter().filter(|a| !a.cleared) {
        let critical = a.severity == ppu_proto::v1::AlarmSeverity::Critical as i32;
        by_severity[usize::from(critical)] += 1;
    }
    for (severity, n) in ALARM_SEVERITIES.iter().zip(by_severity) {
        gauge!(ALARMS_ACTIVE, "severity" => *severity).set(n as f64);
    }
    let mut out = handle.render();
    crate::process::render(&mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// The endpoint
// ---------------------------------------------------------------------------------------------

/// Renders the scrape body; run on the blocking pool.
type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Real-time limits of a connection (shortened in tests).
#[derive(Debug, Clone, Copy)]
struct Limits {
    head_timeout: Duration,
    connection_timeout: Duration,
}

const LIMITS: Limits = Limits {
    head_timeout: HEAD_TIMEOUT,
    connection_timeout: CONNECTION_TIMEOUT,
};

/// hyper's HTTP/1.1 server as the endpoint uses it: one request per connection, a bounded head
/// read under a deadline, header names in the usual title case.
fn http_server(limits: Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        // A client may half-close once its request is sent and still read the answer.
        .half_close(true)
        .title_case_headers(true);
    builder
}

/// A bound `GET /metrics` endpoint; [`MetricsEndpoint::spawn`] starts serving it.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
    addr: SocketAddr,
    handle: &'static PrometheusHandle,
}

impl MetricsEndpoint {
    /// Installs the process's recorder (first call only) and binds `addr`.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<MetricsEndpoint> {
        let handle = install().map_err(std::io::Error::other)?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(MetricsEndpoint {
            listener,
            addr,
            handle,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves scrapes of `lab` (a daemon's scheduler) until `stop`. The task ends once every
    /// open connection has closed, so awaiting it means no clone of `lab` is left here.
    pub fn spawn(self, lab: impl Scraped, stop: CancellationToken) -> JoinHandle<()> {
        register_device_series(&lab);
        let handle = self.handle;
        let render: Render = Arc::new(move || scrape(handle, &lab));
        debug!(addr = %self.addr, "metrics endpoint serving");
        tokio::spawn(async move {
            let upkeep = tokio::spawn(upkeep(handle, stop.clone()));
            serve(self.listener, render, stop, LIMITS).await;
            let _ = upkeep.await;
        })
    }
}

async fn upkeep(handle: &'static PrometheusHandle, stop: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

/// Accepts connections until `stop`, serving each on its own task (at most
/// [`MAX_CONNECTIONS`] at once); returns when every connection task has ended.
async fn serve(listener: TcpListener, render: Render, stop: CancellationToken, limits: Limits) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tasks = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Per-connection failures (reset before accept, out of descriptors): keep
                    // serving, after a pause so a persistent one does not spin.
                    warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (render, stop) = (render.clone(), stop.clone());
        tasks.spawn(async move {
            let service = service_fn(move |req| respond(req, render.clone()));
            let connection = http_server(limits).serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                served = tokio::time::timeout(limits.connection_timeout, connection) => {
                    match served {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => debug!(%peer, error = %e, "metrics: connection failed"),
                        Err(_) => debug!(%peer, "metrics: connection took too long, closed"),
                    }
                }
            }
            drop(permit);
            debug!(%peer, "metrics connection closed");
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// Answers one request: the scrape for `GET`/`HEAD /metrics`, an error status otherwise.
async fn respond(req: Request<Incoming>, render: Render) -> Result<Response<String>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(error_response(StatusCode::NOT_FOUND));
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut response = error_response(StatusCode::METHOD_NOT_ALLOWED);
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    // hyper leaves the body out of the answer to HEAD itself.
    Ok(match tokio::task::spawn_blocking(move || render()).await {
        Ok(body) => {
            let mut response = Response::new(body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        Err(e) => {
            warn!(error = %e, "metrics: rendering failed");
            error_response(StatusCode::INTERNAL_SERVER_ERROR)
        }
    })
}

/// A plain-text error response whose body is its status line, e.g. `404 Not Found`.
fn error_response(status: StatusCode) -> Response<String> {
    let reason = status.canonical_reason().unwrap_or_default();
    let mut response = Response::new(format!("{} {reason}\n", status.as_u16()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[test]
    fn every_error_kind_and_state_has_a_label() {
        let kinds: Vec<&str> = [
            DeviceError::Timeout {
                what: String::new(),
                timeout_ms: 1,
            },
            DeviceError::Disconnected(String::new()),
            DeviceError::Refused {
                what: String::new(),
                reason: String::new(),
            },
            DeviceError::Corrupt {
                what: String::new(),
                reason: String::new(),
            },
            DeviceError::Limit {
                field: String::new(),
                value: 0.0,
                limit: String::new(),
            },
            DeviceError::Fault(String::new()),
            DeviceError::Aborted,
            DeviceError::Unsupported(String::new()),
        ]
        .iter()
        .map(error_kind)
        .collect();
        assert_eq!(kinds, DEVICE_ERROR_KINDS);
        assert_eq!(
            transport_label("modbus-tcp://127.0.0.1:502 unit 1"),
            "modbus"
        );
        assert_eq!(transport_label("serial:///dev/ttyUSB0@9600"), "serial");
        assert_eq!(
            transport_label("mqtts://broker:8883 topics lab/x/#"),
            "mqtt"
        );
        assert!(api_methods().contains(&"/ppu.v1.QueueService/PauseQueue".to_owned()));
    }

    /// Sends `request` on a fresh connection, half-closes, and reads the whole response.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may answer (and stop reading) before all of an oversized request is sent.
        let _ = s.write_all(request).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    fn status_line(response: &str) -> &str {
        response.lines().next().unwrap_or_default()
    }

    #[tokio::test]
    async fn garbage_and_oversized_requests_get_errors_and_the_endpoint_keeps_serving() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let render: Render = Arc::new(|| "ppu_test_series 1\n".to_owned());
        let limits = Limits {
            head_timeout: Duration::from_millis(300),
            connection_timeout: Duration::from_secs(5),
        };
        let server = tokio::spawn(serve(listener, render, stop.clone(), limits));
        let deadline = Duration::from_secs(20);
        let run = async {
            // Binary garbage with a head terminator.
            let mut garbage: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
            garbage.extend_from_slice(b"\r\n\r\n");
            assert_eq!(
                status_line(&exchange(addr, &garbage).await),
                "HTTP/1.1 400 Bad Request"
            );
            // A head larger than the limit, never terminated.
            let big = vec![b'a'; 4 * MAX_HEAD];
            assert_eq!(
                status_line(&exchange(addr, &big).await),
                "HTTP/1.1 431 Request Header Fields Too Large"
            );
            let long_header = format!(
                "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
                "b".repeat(MAX_HEAD)
            );
            assert_eq!(
                status_line(&exchange(addr, long_header.as_bytes()).await),
                "HTTP/1.1 431 Request Header Fields Too Large"
            );
            // A truncated head, then the client half-closes: closed without an answer.
            assert_eq!(exchange(addr, b"GET /metr").await, "");
            // A client that connects and says nothing is closed after the head timeout.
            let mut idle = TcpStream::connect(addr).await.unwrap();
            let mut out = Vec::new();
            idle.read_to_end(&mut out).await.unwrap();
            assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
            // Connecting and leaving at once.
            drop(TcpStream::connect(addr).await.unwrap());
            let delete = exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").await;
            assert_eq!(status_line(&delete), "HTTP/1.1 405 Method Not Allowed");
            assert!(delete.contains("\r\nAllow: GET, HEAD\r\n"), "{delete}");
            assert_eq!(
                status_line(&exchange(addr, b"GET /other HTTP/1.1\r\n\r\n").await),
                "HTTP/1.1 404 Not Found"
            );
            // Still serving.
            let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert_eq!(status_line(&ok), "HTTP/1.1 200 OK");
            assert!(
                ok.contains("Content-Type: text/plain; version=0.0.4"),
                "{ok}"
            );
            assert!(ok.ends_with("\r\n\r\nppu_test_series 1\n"), "{ok}");
            let head = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
            assert_eq!(status_line(&head), "HTTP/1.1 200 OK");
            assert!(head.ends_with("\r\n\r\n"), "{head}");
            assert!(head.contains("\r\nContent-Length: 18\r\n"), "{head}");
        };
        tokio::time::timeout(deadline, run)
            .await
            .expect("every exchange finishes in time");
        stop.cancel();
        tokio::time::timeout(deadline, server)
            .await
            .expect("the endpoint stops")
            .expect("the endpoint task did not panic");
    }
}
