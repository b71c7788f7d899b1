//! A hostile or unlucky client against a real daemon (in-process, one simulated furnace behind
//! Modbus TCP): stream slots that must come back when clients go away, inputs beyond the
//! configured bounds, and request bodies that do not decode (sent as raw gRPC frames).
//!
//! Every wait is a condition polled with a deadline (the `ppu_active_streams` gauge on the
//! daemon's own Prometheus endpoint); nothing waits on a fixed sleep. This binary's tests are
//! the only ones in their process that open streams, so the process-wide gauge is theirs.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use pb::event_service_client::EventServiceClient;
use pb::experiment_service_client::ExperimentServiceClient;
use ppu_daemon::app::{Daemon, Security};
use ppu_daemon::config::Policies;
use ppu_daemon::dev::DevLab;
use ppu_daemon::devices::PollSettings;
use ppu_daemon::server::Limits;
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

const DEADLINE: Duration = Duration::from_secs(60);

struct Lab {
    daemon: Daemon,
    devlab: DevLab,
}

impl Lab {
    async fn start(dir: &Path, limits: Limits) -> Lab {
        let devlab = DevLab::start(Clock::new(2000.0), 1)
            .await
            .expect("simulated furnace");
        let poll = PollSettings {
            poll_interval: Duration::from_millis(100),
            reading_log_interval: Duration::from_secs(1),
        };
        let security = Security {
            limits,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..Security::default()
        };
        let daemon = devlab
            .start_secured_daemon(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                dir,
                poll,
                &Policies::default(),
                security,
            )
            .await
            .expect("daemon starts");
        Lab { daemon, devlab }
    }

    fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.daemon.addr()))
            .expect("url")
            .connect_lazy()
    }

    /// The value of `name{label}` in a fresh scrape of the daemon's `/metrics`; 0 if absent.
    async fn metric(&self, name: &str, label: &str) -> f64 {
        let addr = self.daemon.metrics_addr().expect("metrics endpoint");
        let mut s = TcpStream::connect(addr).await.expect("connect to /metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: ppud\r\n\r\n")
            .await
            .expect("send request");
        let mut raw = String::new();
        tokio::time::timeout(DEADLINE, s.read_to_string(&mut raw))
            .await
            .expect("the endpoint answers in time")
            .expect("read response");
        let series = format!("{name}{{{label}}} ");
        raw.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map(|v| v.parse().expect("a numeric sample"))
            .unwrap_or(0.0)
    }

    /// Waits until the daemon counts `n` open event streams.
    async fn open_event_streams(&self, n: f64) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let open = self.metric("ppu_active_streams", "kind=\"events\"").await;
            if open == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{open} event streams still open, expected {n}: slots leak"
            );
            tokio::task::yield_now().await;
        }
    }

    async fn stop(self) {
        tokio::time::timeout(DEADLINE, self.daemon.shutdown())
            .await
            .expect("shutdown within the deadline");
        self.devlab.shutdown().await;
    }
}

/// A stream whose filter matches nothing: it never sends, so only watching for the client's
/// departure can free its slot. A well-formed id no experiment has: a full id is taken as
/// given (a shorter string would be a prefix, refused NOT_FOUND when nothing starts with it).
fn filtered() -> pb::StreamEventsRequest {
    pb::StreamEventsRequest {
        experiment_id: "01ARZ3NDEKTSV4RRFFQ69G5FAV".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cancelled_filtered_streams_leave_every_slot_free() {
    const MAX_STREAMS: usize = 32;
    const ROUND: usize = 25;
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(
        dir.path(),
        Limits {
            max_streams: MAX_STREAMS,
            ..Limits::default()
        },
    )
    .await;
    let mut ev = EventServiceClient::new(lab.channel());
    lab.open_event_streams(0.0).await;

    // 1,000 streams opened and cancelled by their clients, in rounds that fit under the limit;
    // after each round every slot must come back.
    for _ in 0..1000 / ROUND {
        let mut open = Vec::with_capacity(ROUND);
        for _ in 0..ROUND {
            open.push(ev.stream_events(filtered()).await.expect("a slot is free"));
        }
        lab.open_event_streams(ROUND as f64).await;
        drop(open);
        lab.open_event_streams(0.0).await;
    }

    // The daemon still holds max_streams live streams, and refuses the next.
    let mut live = Vec::with_capacity(MAX_STREAMS);
    for i in 0..MAX_STREAMS {
        live.push(
            ev.stream_events(filtered())
                .await
                .unwrap_or_else(|e| panic!("stream {i} of {MAX_STREAMS}: {e:?}")),
        );
    }
    let err = ev
        .stream_events(filtered())
        .await
        .expect_err("one stream over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limits.max_streams"), "{err:?}");
    drop(live);
    lab.open_event_streams(0.0).await;
    ev.stream_events(filtered())
        .await
        .expect("a slot after the live streams closed");
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500000_segment_program_is_refused_naming_the_field_and_the_limit() {
    use pb::furnace_segment::Kind as S;
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(dir.path(), Limits::default()).await;
    let mut ex = ExperimentServiceClient::new(lab.channel());
    let segment = pb::FurnaceSegment {
        kind: Some(S::Hold(pb::Hold { duration_s: 1.0 })),
    };
    let spec = pb::ExperimentSpec {
        name: "huge".into(),
        sample_id: "s-huge".into(),
        steps: vec![pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
                segments: vec![segment; 500_000],
            })),
        }],
        ..Default::default()
    };
    let err = ex
        .submit_batch(pb::SubmitBatchRequest {
            idempotency_key: "huge".into(),
            experiments: vec![spec],
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        err.metadata()
            .get("ppu-field-path")
            .and_then(|v| v.to_str().ok()),
        Some("experiments[0].steps[0].furnace.segments"),
        "{err:?}"
    );
    assert!(
        err.message()
            .contains("500000 segments, at most 1000 (limits.max_program_segments)"),
        "{err:?}"
    );
    // Nothing of it was stored.
    let listed = ex
        .list_experiments(pb::ListExperimentsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.experiments.is_empty(), "{listed:?}");
    lab.stop().await;
}

/// Sends its bytes as the gRPC message as they are, and hands back the reply's bytes: a client
/// that can send what no generated client would.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

async fn raw_call(ch: &Channel, method: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(method),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Deterministic noise (a 64-bit LCG), so a failure can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_argument_and_counted() {
    const SUBMIT: &str = "/ppu.v1.ExperimentService/SubmitBatch";
    const GET: &str = "/ppu.v1.ExperimentService/GetExperiment";
    const STREAM: &str = "/ppu.v1.EventService/StreamEvents";
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start(dir.path(), Limits::default()).await;
    let ch = lab.channel();
    let counted = |method: &str| format!("method=\"{method}\"");
    let before = lab
        .metric("ppu_grpc_decode_errors_total", &counted(SUBMIT))
        .await;

    let valid = pb::SubmitBatchRequest {
        idempotency_key: "k".into(),
        experiments: vec![pb::ExperimentSpec {
            name: "a name long enough to cut".into(),
            ..Default::default()
        }],
    }
    .encode_to_vec();
    let mut bodies: Vec<(&str, &'static str, Vec<u8>)> = vec![
        (
            "truncated message",
            SUBMIT,
            valid[..valid.len() - 5].to_vec(),
        ),
        // idempotency_key (field 1, a string) holding 0xff 0xfe.
        ("invalid UTF-8", SUBMIT, vec![0x0a, 0x02, 0xff, 0xfe]),
    ];
    // Random bodies, each checked here not to decode by chance.
    for seed in 1..=20 {
        let body = noise(seed, 64);
        if pb::SubmitBatchRequest::decode(&body[..]).is_err() {
            bodies.push(("random bytes", SUBMIT, body));
        }
    }
    assert!(bodies.len() > 10, "the noise mostly fails to decode");
    let n_submit = bodies.len();
    let random = noise(99, 32);
    assert!(pb::GetExperimentRequest::decode(&random[..]).is_err());
    bodies.push(("random bytes", GET, random.clone()));
    bodies.push(("random bytes", STREAM, random));

    for (what, method, body) in bodies {
        let err = raw_call(&ch, method, body)
            .await
            .expect_err("an undecodable request is refused");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{what} to {method}: {err:?}"
        );
        assert!(
            err.message().starts_with("undecodable request: "),
            "{what} to {method}: {err:?}"
        );
    }
    let after = lab
        .metric("ppu_grpc_decode_errors_total", &counted(SUBMIT))
        .await;
    assert_eq!(after - before, n_submit as f64);
    assert!(
        lab.metric("ppu_grpc_decode_errors_total", &counted(STREAM))
            .await
            >= 1.0
    );

    // A well-formed request on the same path still reaches the handler.
    let reply = raw_call(
        &ch,
        GET,
        pb::GetExperimentRequest { id: "nope".into() }.encode_to_vec(),
    )
    .await
    .expect_err("unknown id");
    assert_eq!(reply.code(), Code::NotFound, "{reply:?}");
    lab.stop().await;
}
