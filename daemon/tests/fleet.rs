//! The fleet (issue 18) against a real `nats-server` with JetStream, started by the test on a
//! free loopback port, and a real daemon with its simulated lab, in-process: the outbox, the
//! fleet queue (taken, refused, deduplicated, taken elsewhere) and the registry.
//!
//! Skipped with a notice when `nats-server` is not installed (CI installs Debian's package).
//! Every wait is on a condition with a deadline; nothing waits on a fixed sleep.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures_util::StreamExt;
use ppu_daemon::app::Daemon;
use ppu_daemon::config::{FleetConfig, Policies};
use ppu_daemon::dev::DevLab;
use ppu_daemon::devices::PollSettings;
use ppu_daemon::fleet;
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use prost::Message;

/// Physical seconds per real second.
const TIME_SCALE: f64 = 2000.0;
/// Upper bound on any wait (real time).
const DEADLINE: Duration = Duration::from_secs(60);
const LAB: &str = "lab-a";

/// A single JetStream-enabled `nats-server` on loopback, restartable on the same port and
/// store directory (an outage and its end).
struct Nats {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    /// Extra server arguments (authentication).
    args: Vec<String>,
    child: Option<Child>,
}

impl Nats {
    /// Starts one, or `None` (with a notice) when nats-server is not installed.
    fn start() -> Option<Nats> {
        Self::start_with(&[])
    }

    fn start_with(args: &[&str]) -> Option<Nats> {
        let bin = ppu_daemon::dev::nats_server_binary();
        let Some(bin) = bin else {
            eprintln!("SKIPPED: nats-server is not installed (apt-get install nats-server)");
            return None;
        };
        // nats-server 2.9 needs an explicit port: take a free one.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut nats = Nats {
            bin,
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        nats.up();
        Some(nats)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    fn up(&mut self) {
        let child = Command::new(&self.bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL): an outage.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn policies(nats: &Nats) -> Policies {
    Policies {
        fleet: Some(FleetConfig {
            servers: vec![nats.url()],
            lab: Some(LAB.to_owned()),
            user: None,
            password: None,
            nkey_seed_file: None,
            creds_file: None,
            tls: None,
            replicas: 1,
            capacity: Some(2),
            heartbeat_s: 0.5,
        }),
        ..Policies::default()
    }
}

fn poll() -> PollSettings {
    PollSettings {
        poll_interval: Duration::from_millis(100),
        reading_log_interval: Duration::from_secs(1),
    }
}

async fn start(lab: &DevLab, data: &Path, policies: &Policies) -> Daemon {
    // The fleet's log lines (why a publish or a claim waits) show in a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("ppu_daemon::fleet=debug")
        .with_test_writer()
        .try_init();
    lab.start_daemon(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        data,
        poll(),
        policies,
    )
    .await
    .expect("daemon starts")
}

fn furnace_spec(name: &str, hold_s: f64) -> pb::ExperimentSpec {
    use pb::furnace_segment::Kind as S;
    let segments = [
        S::Ramp(pb::Ramp {
            temperature_c: 120.0,
            rate_c_per_min: 20.0,
        }),
        S::Hold(pb::Hold { duration_s: hold_s }),
    ];
    pb::ExperimentSpec {
        name: name.into(),
        sample_id: format!("s-{name}"),
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

/// Polls `cond` until it holds; panics with `what` at the deadline.
async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn all_terminal(daemon: &Daemon) -> bool {
    daemon.scheduler().queued_ids().is_empty() && daemon.scheduler().running_ids().is_empty()
}

/// Every published event of `LAB` in stream order: (sequence header, decoded event).
async fn published(js: &jetstream::Context) -> Vec<(u64, pb::Event)> {
    let mut s = js
        .get_stream(fleet::EVENTS_STREAM)
        .await
        .expect("events stream");
    let last = s.info().await.expect("stream info").state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(m) = s.get_raw_message(seq).await else {
            continue;
        };
        if !m.subject.starts_with(&format!("ppu.{LAB}.events.")) {
            continue;
        }
        let header: u64 = m
            .headers
            .get("Ppu-Sequence")
            .expect("Ppu-Sequence header")
            .as_str()
            .parse()
            .expect("a number");
        assert_eq!(
            m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()),
            Some(format!("{LAB}:{header}"))
        );
        let kind = fleet::event_kind(&m.payload);
        let e = pb::Event::decode(m.payload).expect("an Event");
        assert_eq!(e.sequence, header);
        assert_eq!(m.subject.as_str(), format!("ppu.{LAB}.events.{kind}"));
        out.push((header, e));
    }
    out
}

/// Asserts the stream holds the lab's events 1..=last exactly once, in order.
async fn assert_consecutive(js: &jetstream::Context, last: u64) {
    let seqs: Vec<u64> = published(js).await.into_iter().map(|(s, _)| s).collect();
    let want: Vec<u64> = (1..=last).collect();
    assert_eq!(seqs, want, "published sequences");
}

async fn caught_up(daemon: &Daemon) -> bool {
    let store = daemon.scheduler().store();
    fleet::published_sequence(store) == store.last_sequence() && store.last_sequence() > 0
}

async fn client(nats: &Nats) -> jetstream::Context {
    let c = async_nats::connect(nats.url()).await.expect("test client");
    jetstream::new(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_without_fleet_starts_nothing_nats_related() {
    let data = tempfile::tempdir().expect("temp dir");
    let lab = DevLab::start(Clock::new(TIME_SCALE), 1).await.expect("lab");
    let daemon = start(&lab, data.path(), &Policies::default()).await;
    assert!(!daemon.fleet_started());
    let store = daemon.scheduler().store().clone();
    assert_eq!(store.setting(fleet::ACKED_KEY).expect("read"), None);
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_publishes_every_event_once_in_order_through_an_outage_and_a_restart() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let data = tempfile::tempdir().expect("temp dir");
    let lab = DevLab::start(Clock::new(TIME_SCALE), 1).await.expect("lab");
    let pol = policies(&nats);
    let daemon = start(&lab, data.path(), &pol).await;
    assert!(daemon.fleet_started());
    let submit = |d: &Daemon, key: &str| {
        let s = d.scheduler().clone();
        let key = key.to_owned();
        async move {
            s.submit(pb::SubmitBatchRequest {
                idempotency_key: key.clone(),
                experiments: vec![
                    furnace_spec(&key, 30.0),
                    furnace_spec(&format!("{key}b"), 30.0),
                ],
            })
            .await
            .expect("accepted");
        }
    };
    submit(&daemon, "first").await;
    wait_for("the first batch to finish", || async {
        all_terminal(&daemon)
    })
    .await;
    wait_for("the outbox to catch up", || caught_up(&daemon)).await;
    let js = client(&nats).await;
    assert_consecutive(&js, daemon.scheduler().store().last_sequence()).await;

    // An outage: the lab works on, its log is the buffer.
    nats.kill();
    let before = daemon.scheduler().store().last_sequence();
    submit(&daemon, "during-outage").await;
    wait_for("the batch to finish during the outage", || async {
        all_terminal(&daemon)
    })
    .await;
    assert!(daemon.scheduler().store().last_sequence() > before);
    assert!(fleet::published_sequence(daemon.scheduler().store()) <= before);
    nats.up();
    wait_for("the outbox to catch up after the outage", || {
        caught_up(&daemon)
    })
    .await;
    let js = client(&nats).await;
    assert_consecutive(&js, daemon.scheduler().store().last_sequence()).await;

    // A restart resumes after the persisted prefix.
    daemon.shutdown().await;
    let daemon = start(&lab, data.path(), &pol).await;
    submit(&daemon, "after-restart").await;
    wait_for("the batch to finish after a restart", || async {
        all_terminal(&daemon)
    })
    .await;
    wait_for("the outbox to catch up after a restart", || {
        caught_up(&daemon)
    })
    .await;
    assert_consecutive(&js, daemon.scheduler().store().last_sequence()).await;

    // The registry shows the lab.
    let labs = js
        .get_key_value(fleet::LABS_BUCKET)
        .await
        .expect("registry");
    wait_for("the lab's heartbeat", || async {
        labs.get(LAB).await.ok().flatten().is_some()
    })
    .await;
    let entry: serde_json::Value =
        serde_json::from_slice(&labs.get(LAB).await.expect("get").expect("entry")).expect("json");
    assert_eq!(entry["lab"], LAB);
    assert_eq!(entry["capacity"], 2);
    assert!(
        entry["capabilities"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "furnace_program")),
        "{entry}"
    );
    assert!(
        entry["devices"].as_array().is_some_and(|d| !d.is_empty()),
        "{entry}"
    );
    assert!(
        entry["last_event_sequence"].as_u64().is_some_and(|s| s > 0),
        "{entry}"
    );
    daemon.shutdown().await;
}

/// Publishes `spec` to the work queue under `msg_id`.
async fn publish_work(js: &jetstream::Context, spec: &pb::ExperimentSpec, msg_id: &str) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    headers.insert("Ppu-Batch", "planner-batch-1");
    js.publish_with_headers(
        fleet::work_subject(spec),
        headers,
        spec.encode_to_vec().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
}

/// The lab's experiments carrying `msg_id`.
fn with_msg_id(daemon: &Daemon, msg_id: &str) -> Vec<pb::Experiment> {
    let store = daemon.scheduler().store();
    let states = ppu_daemon::state::State::ALL;
    store
        .experiments_in(&states)
        .expect("read")
        .into_iter()
        .filter(|e| {
            e.spec
                .as_ref()
                .and_then(|s| s.labels.get(fleet::MSG_ID_LABEL))
                .is_some_and(|m| m == msg_id)
        })
        .collect()
}

fn succeeded(e: &pb::Experiment) -> bool {
    e.state == pb::ExperimentState::Succeeded as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_work_is_taken_once_refused_with_its_reason_and_settled_after_a_restart() {
    let Some(nats) = Nats::start() else {
        return;
    };
    let data = tempfile::tempdir().expect("temp dir");
    let lab = DevLab::start(Clock::new(TIME_SCALE), 1).await.expect("lab");
    let pol = policies(&nats);
    let js = client(&nats).await;

    // Before the lab joins: one committed-but-unclaimed delivery of m-dup (a crash after the
    // commit), and one of m-taken whose claim another lab won.
    {
        let daemon = start(&lab, data.path(), &Policies::default()).await;
        for id in ["m-dup", "m-taken"] {
            let mut spec = furnace_spec(id, 30.0);
            spec.labels.insert(fleet::MSG_ID_LABEL.into(), id.into());
            spec.labels
                .insert(fleet::BATCH_LABEL.into(), "planner-batch-1".into());
            daemon
                .scheduler()
                .submit_held_as(
                    pb::SubmitBatchRequest {
                        idempotency_key: id.into(),
                        experiments: vec![spec],
                    },
                    fleet::PRINCIPAL,
                    fleet::CLAIM_HOLD_REASON,
                )
                .await
                .expect("committed");
        }
        daemon.shutdown().await;
    }
    let daemon = start(&lab, data.path(), &pol).await;
    let claims = {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(kv) = js.get_key_value(fleet::CLAIMS_BUCKET).await {
                break kv;
            }
            assert!(Instant::now() < deadline, "the claims bucket appears");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // Another lab won m-taken: this lab must cancel its copy. (The claim may race the lab's
    // own start-up claim; the test only counts when it was there first.)
    let other_first = claims.create("m-taken", "lab-b".into()).await.is_ok();

    // A valid experiment, a refused one, and the redelivery of m-dup.
    let mut refusals = js
        .get_stream(fleet::EVENTS_STREAM)
        .await
        .expect("events stream")
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: format!("ppu.{LAB}.refused"),
            ..Default::default()
        })
        .await
        .expect("refusal consumer")
        .messages()
        .await
        .expect("messages");
    publish_work(&js, &furnace_spec("m-ok", 30.0), "m-ok").await;
    publish_work(&js, &furnace_spec("m-bad", -5.0), "m-bad").await;
    publish_work(&js, &furnace_spec("m-dup", 30.0), "m-dup").await;

    wait_for("m-ok and m-dup to run", || async {
        let ok = with_msg_id(&daemon, "m-ok");
        let dup = with_msg_id(&daemon, "m-dup");
        ok.len() == 1 && succeeded(&ok[0]) && dup.len() == 1 && succeeded(&dup[0])
    })
    .await;
    let ok = &with_msg_id(&daemon, "m-ok")[0];
    let labels = &ok.spec.as_ref().expect("spec").labels;
    assert_eq!(
        labels.get(fleet::BATCH_LABEL).map(String::as_str),
        Some("planner-batch-1")
    );
    // Its events carry the work message's id and the planner's batch, for correlation.
    let ok_id = ok.id.clone();
    wait_for("m-ok's events to be published", || caught_up(&daemon)).await;
    let events = js
        .get_stream(fleet::EVENTS_STREAM)
        .await
        .expect("events stream");
    let mut tagged = 0;
    for seq in 1..=events.cached_info().state.last_sequence.max(1) {
        let Ok(m) = events.get_raw_message(seq).await else {
            continue;
        };
        let Ok(e) = pb::Event::decode(m.payload.clone()) else {
            continue;
        };
        if e.experiment_id == ok_id {
            let h = |n: &str| m.headers.get(n).map(|v| v.as_str().to_owned());
            assert_eq!(h("Ppu-Msg-Id").as_deref(), Some("m-ok"));
            assert_eq!(h("Ppu-Batch").as_deref(), Some("planner-batch-1"));
            tagged += 1;
        }
    }
    assert!(tagged > 0, "no event of m-ok was published");
    for id in ["m-ok", "m-dup"] {
        let owner = claims.get(id).await.expect("read claim").expect("claimed");
        assert_eq!(&owner[..], LAB.as_bytes(), "{id}");
    }
    let taken = with_msg_id(&daemon, "m-taken");
    assert_eq!(taken.len(), 1);
    if other_first {
        wait_for("m-taken to be cancelled", || async {
            with_msg_id(&daemon, "m-taken")[0].state == pb::ExperimentState::Cancelled as i32
        })
        .await;
        let events = daemon
            .scheduler()
            .store()
            .events_after(0, 100_000)
            .expect("log");
        assert!(events.iter().any(|e| e.experiment_id == taken[0].id
            && matches!(&e.kind, Some(pb::event::Kind::ExperimentStateChanged(c)) if c.reason == "taken by lab lab-b")));
    }

    // The refusal names the field and the reason, and the message is gone from the queue.
    let m = tokio::time::timeout(DEADLINE, refusals.next())
        .await
        .expect("a refusal in time")
        .expect("a message")
        .expect("no error");
    let refusal: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
    assert_eq!(refusal["msg_id"], "m-bad");
    assert_eq!(refusal["batch_id"], "planner-batch-1");
    assert!(
        refusal["field"]
            .as_str()
            .is_some_and(|f| f.starts_with("steps[0]")),
        "{refusal}"
    );
    assert!(
        refusal["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{refusal}"
    );
    assert!(with_msg_id(&daemon, "m-bad").is_empty());
    wait_for("the work queue to drain", || {
        let js = js.clone();
        async move {
            let Ok(mut work) = js.get_stream(fleet::WORK_STREAM).await else {
                return false;
            };
            work.info().await.is_ok_and(|i| i.state.messages == 0)
        }
    })
    .await;
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_authenticates_with_the_credentials_in_its_server_url() {
    let Some(nats) = Nats::start_with(&["--user", "lab-a", "--pass", "s3cret"]) else {
        return;
    };
    let data = tempfile::tempdir().expect("temp dir");
    let lab = DevLab::start(Clock::new(TIME_SCALE), 1).await.expect("lab");
    let mut pol = policies(&nats);
    if let Some(f) = pol.fleet.as_mut() {
        f.servers = vec![format!("nats://lab-a:s3cret@127.0.0.1:{}", nats.port)];
    }
    let settings = pol.fleet_settings().expect("a [fleet]").expect("valid");
    assert!(!format!("{settings:?}").contains("s3cret"), "{settings:?}");
    let daemon = start(&lab, data.path(), &pol).await;
    daemon
        .scheduler()
        .submit(pb::SubmitBatchRequest {
            idempotency_key: "auth".into(),
            experiments: vec![furnace_spec("auth", 30.0)],
        })
        .await
        .expect("accepted");
    wait_for(
        "the outbox to publish through the authenticated connection",
        || caught_up(&daemon),
    )
    .await;
    daemon.shutdown().await;
}

fn weigh_spec(name: &str) -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: name.into(),
        sample_id: format!("s-{name}"),
        steps: vec![pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Weigh(pb::Weigh::default())),
        }],
        ..Default::default()
    }
}

/// A lab busy with one kind of work still takes the other kinds it can run: every work
/// subject gets its turn, whatever its place in the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_busy_with_furnace_work_still_takes_weighing_work() {
    let Some(nats) = Nats::start() else {
        return;
    };
    let data = tempfile::tempdir().expect("temp dir");
    let mut lab = DevLab::start(Clock::new(TIME_SCALE), 1).await.expect("lab");
    lab.add_dispensing_station().await.expect("balance");
    let js = client(&nats).await;
    let pol = policies(&nats);
    let settings = pol.fleet_settings().expect("a [fleet]").expect("valid");
    fleet::ensure_objects(&js, &settings)
        .await
        .expect("the streams");
    // Queued before the lab looks: a dozen furnace programs (about 2 s each in real time,
    // so the one furnace and the capacity of 2 stay busy with them), and one weighing.
    const FURNACE: usize = 12;
    for i in 0..FURNACE {
        publish_work(
            &js,
            &furnace_spec(&format!("f-{i}"), 3600.0),
            &format!("f-{i}"),
        )
        .await;
    }
    publish_work(&js, &weigh_spec("w-0"), "w-0").await;

    let daemon = start(&lab, data.path(), &pol).await;
    wait_for("the weighing to be taken", || async {
        !with_msg_id(&daemon, "w-0").is_empty()
    })
    .await;
    let furnace_taken = (0..FURNACE)
        .filter(|i| !with_msg_id(&daemon, &format!("f-{i}")).is_empty())
        .count();
    // Round-robin: the weighing is taken at the first free slot after the first furnace
    // program, not after all of them.
    assert!(
        furnace_taken <= 3,
        "the weighing waited for {furnace_taken} furnace programs"
    );
    daemon.shutdown().await;
}

/// A CA's PEM, and a server certificate and key for 127.0.0.1 it signed.
fn server_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fleet test CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("server cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// `[fleet]` with TLS (the CA in `tls.ca_file`) and an nkey (`nkey_seed_file`), against a
/// nats-server that requires both: the lab publishes its events. Without the right CA or
/// without the nkey, JetStream is out of reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_joins_over_tls_with_an_nkey() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = server_pki();
    let path = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let ca_file = path("ca.pem", &ca);
    let cert_file = path("server.pem", &cert);
    let key_file = path("server.key", &key);
    let user = nkeys::KeyPair::new_user();
    let seed_file = path("lab.nk", &user.seed().expect("seed"));
    let conf = path(
        "server.conf",
        &format!(
            "tls {{ cert_file: {cert_file:?}, key_file: {key_file:?} }}\n\
             authorization {{ users: [ {{ nkey: {:?} }} ] }}\n",
            user.public_key()
        ),
    );
    let conf = conf.to_string_lossy().into_owned();
    let Some(nats) = Nats::start_with(&["-c", &conf]) else {
        return;
    };
    let fleet_config = |ca_file: PathBuf| {
        let mut pol = policies(&nats);
        if let Some(f) = pol.fleet.as_mut() {
            f.servers = vec![format!("tls://127.0.0.1:{}", nats.port)];
            f.nkey_seed_file = Some(seed_file.clone());
            f.tls = Some(ppu_daemon::config::FleetTlsConfig {
                ca_file: Some(ca_file),
                cert_file: None,
                key_file: None,
            });
        }
        pol
    };

    // Neither a CA that did not sign the server's certificate nor a missing nkey gets in.
    let (other_ca, _, _) = server_pki();
    let untrusting = fleet_config(path("other-ca.pem", &other_ca));
    let mut anonymous = fleet_config(ca_file.clone());
    if let Some(f) = anonymous.fleet.as_mut() {
        f.nkey_seed_file = None;
    }
    for (what, pol) in [("an untrusted server", untrusting), ("no nkey", anonymous)] {
        let settings = pol.fleet_settings().expect("a [fleet]").expect("valid");
        // The client connects in the background; JetStream never answers through it.
        let client = fleet::connect(&settings).await.expect("a client");
        let js = jetstream::new(client);
        let reached = tokio::time::timeout(
            Duration::from_secs(3),
            fleet::ensure_objects(&js, &settings),
        )
        .await;
        assert!(
            !matches!(reached, Ok(Ok(_))),
            "reached JetStream with {what}"
        );
    }

    let lab = DevLab::start(Clock::new(TIME_SCALE), 1).await.expect("lab");
    let data = tempfile::tempdir().expect("temp dir");
    let pol = fleet_config(ca_file);
    let settings = pol.fleet_settings().expect("a [fleet]").expect("valid");
    assert!(
        !format!("{settings:?}").contains(&user.seed().expect("seed")),
        "{settings:?}"
    );
    let daemon = start(&lab, data.path(), &pol).await;
    daemon
        .scheduler()
        .submit(pb::SubmitBatchRequest {
            idempotency_key: "tls".into(),
            experiments: vec![furnace_spec("tls", 30.0)],
        })
        .await
        .expect("accepted");
    wait_for("the outbox to publish over TLS with the nkey", || {
        caught_up(&daemon)
    })
    .await;
    daemon.shutdown().await;
}
