//! The fleet figures (issue 18): one campaign of furnace programs published to the fleet work
//! queue (`PPU_WORK`) and run by 1, 2 and 3 labs, and the submit-to-first-event latency through
//! the fleet against a direct `ppu.v1` submit.
//!
//! Each lab is the real in-process daemon on its own simulated lab (one furnace behind a real
//! Modbus TCP socket) with `[fleet]` set, against one real `nats-server -js` on a free loopback
//! port (Debian's package). Every lab count gets a fresh server, store directory and labs, so a
//! run never sees another's messages. When `nats-server` is not installed the section is
//! skipped with a note.
//!
//! The campaign parallelises by construction: every experiment needs only `furnace_program`,
//! every lab has one furnace, and a program takes about a second of real time at the chosen
//! time scale, so the wall time is bounded by device (physical) time, not by the CPU.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use pb::event_service_client::EventServiceClient;
use pb::experiment_service_client::ExperimentServiceClient;
use ppu_daemon::config::{FleetConfig, Policies};
use ppu_daemon::fleet;
use ppu_daemon::state::State;
use ppu_proto::v1 as pb;
use prost::Message as _;
use tokio::sync::{Notify, mpsc};
use tokio_stream::StreamExt;

use crate::figure::{Figure, note};
use crate::lab::{Lab, LabConfig};
use crate::latency::Summary;

#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Experiments in the campaign (the same campaign for every lab count).
    pub experiments: usize,
    /// Physical seconds per real second.
    pub time_scale: f64,
    /// The furnace program's hold, physical seconds (after a 25 → 120 °C ramp at 20 °C/min).
    pub hold_s: f64,
    /// The most labs the campaign runs on (1, 2, … up to this).
    pub max_labs: usize,
    /// Submit-to-first-event samples, each on an idle lab, per path.
    pub latency_samples: usize,
    /// Longest a campaign or a sample may take (real time) before the figure is abandoned.
    pub deadline: Duration,
}

/// Lab ids, in the order labs join.
const LAB_IDS: [&str; 3] = ["bench-a", "bench-b", "bench-c"];
/// Fleet experiments a lab holds at once: one running on its furnace and one queued behind
/// it, so the furnace never waits for the lab's next look at the queue.
const CAPACITY: usize = 2;
/// Goals of issue 18: throughput on 2 and 3 labs against 1.
const GOAL_RATIO_2: f64 = 1.8;
const GOAL_RATIO_3: f64 = 2.5;
/// Longest wait for nats-server to listen and for the labs to join.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How often start-up conditions are looked at (poll with a deadline).
const POLL: Duration = Duration::from_millis(20);
/// The ramp every program starts with: to 120 °C at 20 °C/min.
const RAMP_TO_C: f64 = 120.0;
const RAMP_C_PER_MIN: f64 = 20.0;
/// Hold of the latency samples' programs, physical seconds (the sample waits for the end).
const SAMPLE_HOLD_S: f64 = 10.0;

pub async fn run(sizes: Sizes, work: &Path) -> Result<Vec<Figure>> {
    let Some(bin) = ppu_daemon::dev::nats_server_binary() else {
        note("fleet: skipped, nats-server is not installed (apt-get install nats-server)");
        return Ok(Vec::new());
    };
    let run_id = ulid::Ulid::new().to_string();
    let mut figures = Vec::new();
    let mut base: Option<Campaign> = None;
    for labs in 1..=sizes.max_labs.clamp(1, LAB_IDS.len()) {
        let c = campaign(&bin, work, sizes, labs, &run_id).await?;
        let f = c.figure(sizes);
        f.emit();
        figures.push(f);
        if labs == 1 {
            base = Some(c);
        } else if let Some(b) = &base {
            let ratio = b.wall_s / c.wall_s;
            let goal = if labs == 2 {
                GOAL_RATIO_2
            } else {
                GOAL_RATIO_3
            };
            let exactly_once = b.exactly_once && c.exactly_once;
            let f = Figure::new("fleet.throughput_ratio", ratio, "x")
                .param("labs", labs)
                .param("vs_labs", 1)
                .param("experiments", sizes.experiments)
                .num("exp_per_s", c.exp_per_s())
                .num("base_exp_per_s", b.exp_per_s())
                .param("exactly_once", exactly_once)
                .goal(
                    format!(">={}_with_exactly_once", crate::figure::num(goal)),
                    ratio >= goal && exactly_once,
                );
            f.emit();
            figures.push(f);
        }
    }
    figures.extend(latency(&bin, work, sizes, &run_id).await?);
    Ok(figures)
}

/// A JetStream-enabled `nats-server` on a free loopback port with its own store directory,
/// killed when dropped (on every path, errors included).
struct Nats {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nats {
    async fn start(bin: &Path, work: &Path) -> Result<Nats> {
        let dir = tempfile::tempdir_in(work)?;
        // nats-server 2.9 needs an explicit port: take a free one.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut nats = Nats {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + START_DEADLINE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(status) = nats.child.try_wait()? {
                bail!("nats-server exited at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("nats-server did not listen on port {port} within {START_DEADLINE:?}");
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(nats)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh server and `labs` fleet labs joined to it, with a JetStream client.
struct Fleet {
    labs: Vec<Lab>,
    js: jetstream::Context,
    _dirs: Vec<tempfile::TempDir>,
    // Dropped last: the labs stop first (see `stop`).
    _nats: Nats,
}

impl Fleet {
    async fn start(bin: &Path, work: &Path, sizes: Sizes, labs: usize) -> Result<Fleet> {
        let nats = Nats::start(bin, work).await?;
        let mut dirs = Vec::new();
        let mut started = Vec::new();
        for id in &LAB_IDS[..labs] {
            let dir = tempfile::tempdir_in(work)?;
            let policies = Policies {
                fleet: Some(FleetConfig {
                    servers: vec![nats.url()],
                    lab: Some((*id).to_owned()),
                    user: None,
                    password: None,
                    nkey_seed_file: None,
                    creds_file: None,
                    tls: None,
                    replicas: 1,
                    capacity: Some(CAPACITY),
                    heartbeat_s: 1.0,
                }),
                ..Policies::default()
            };
            let config = LabConfig {
                time_scale: sizes.time_scale,
                furnaces: 1,
                full: false,
                transfer_delay: Duration::ZERO,
            };
            match Lab::start_with(dir.path(), config, &policies).await {
                Ok(lab) => started.push(lab),
                Err(e) => {
                    for lab in started {
                        lab.stop().await;
                    }
                    return Err(e.context(format!("starting lab {id}")));
                }
            }
            dirs.push(dir);
        }
        let fleet = match async_nats::connect(nats.url()).await {
            Ok(c) => Fleet {
                labs: started,
                js: jetstream::new(c),
                _dirs: dirs,
                _nats: nats,
            },
            Err(e) => {
                for lab in started {
                    lab.stop().await;
                }
                return Err(anyhow::Error::new(e).context("connecting the bench's NATS client"));
            }
        };
        let ready = async {
            fleet.joined(labs).await?;
            fleet.warm_up(sizes).await
        };
        if let Err(e) = ready.await {
            fleet.stop().await;
            return Err(e);
        }
        Ok(fleet)
    }

    /// Runs one program on every lab directly (not through the fleet) and waits until the
    /// labs are idle: every measured program then starts from the same hot furnace, where the
    /// first one of a cold lab would ramp from ambient (a cost one lab pays once and three
    /// labs three times).
    async fn warm_up(&self, sizes: Sizes) -> Result<()> {
        for (i, lab) in self.labs.iter().enumerate() {
            lab.scheduler()?
                .submit(pb::SubmitBatchRequest {
                    idempotency_key: format!("warm-up-{i}"),
                    experiments: vec![program(format!("warm-up-{i}"), SAMPLE_HOLD_S)],
                })
                .await
                .map_err(|e| anyhow::anyhow!("warm-up refused: {e}"))?;
        }
        let deadline = Instant::now() + sizes.deadline;
        for lab in &self.labs {
            let s = lab.scheduler()?;
            while !(s.queued_ids().is_empty() && s.running_ids().is_empty()) {
                if Instant::now() > deadline {
                    bail!(
                        "the warm-up program did not finish within {:?}",
                        sizes.deadline
                    );
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }

    /// Waits until every lab's registry entry is in `PPU_LABS`: its streams, buckets and
    /// work loop are up (the registry starts after them).
    async fn joined(&self, labs: usize) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(kv) = self.js.get_key_value(fleet::LABS_BUCKET).await {
                let mut all = true;
                for id in &LAB_IDS[..labs] {
                    all &= kv.get(*id).await.ok().flatten().is_some();
                }
                if all {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the labs did not join the fleet within {START_DEADLINE:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn stop(self) {
        for lab in self.labs {
            lab.stop().await;
        }
    }
}

/// A furnace-only experiment: ramp 25 → 120 °C at 20 °C/min, then hold.
fn program(name: String, hold_s: f64) -> pb::ExperimentSpec {
    use pb::furnace_segment::Kind as S;
    let segments = [
        S::Ramp(pb::Ramp {
            temperature_c: RAMP_TO_C,
            rate_c_per_min: RAMP_C_PER_MIN,
        }),
        S::Hold(pb::Hold { duration_s: hold_s }),
    ];
    pb::ExperimentSpec {
        sample_id: format!("s-{name}"),
        name,
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

fn seconds(t: &Option<prost_types::Timestamp>) -> Option<f64> {
    t.map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

/// Physical seconds of [`program`] from ambient.
fn program_physical_s(hold_s: f64) -> f64 {
    (RAMP_TO_C - 25.0) / RAMP_C_PER_MIN * 60.0 + hold_s
}

/// Publishes one work message for `spec` (does not wait for JetStream's ack).
async fn publish(
    js: &jetstream::Context,
    spec: &pb::ExperimentSpec,
    msg_id: &str,
    batch: &str,
) -> Result<jetstream::context::PublishAckFuture> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    headers.insert("Ppu-Batch", batch);
    js.publish_with_headers(
        fleet::work_subject(spec),
        headers,
        spec.encode_to_vec().into(),
    )
    .await
    .with_context(|| format!("publishing {msg_id}"))
}

fn is_terminal(state: i32) -> bool {
    use pb::ExperimentState as S;
    matches!(
        S::try_from(state).unwrap_or(S::Unspecified),
        S::Succeeded | S::Failed | S::Cancelled | S::Interrupted
    )
}

/// One campaign on `labs` labs.
struct Campaign {
    labs: usize,
    experiments: usize,
    wall_s: f64,
    succeeded: usize,
    /// Every message id ran in exactly one experiment across the labs.
    exactly_once: bool,
    /// Experiments run per lab.
    per_lab: Vec<usize>,
    /// Real seconds each lab's furnace spent executing the campaign's steps.
    busy_s: Vec<f64>,
}

impl Campaign {
    fn exp_per_s(&self) -> f64 {
        self.experiments as f64 / self.wall_s
    }

    fn figure(&self, sizes: Sizes) -> Figure {
        // The busiest furnace's time executing steps: the figure is device-bound when it is
        // close to the wall time.
        let busiest_s = self.busy_s.iter().copied().fold(0.0, f64::max);
        Figure::new("fleet.campaign", self.wall_s, "s")
            .param("labs", self.labs)
            .param("experiments", self.experiments)
            .num("exp_per_s", self.exp_per_s())
            .param(
                "per_lab",
                self.per_lab
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("/"),
            )
            .param(
                "succeeded",
                format!("{}/{}", self.succeeded, self.experiments),
            )
            .param("exactly_once", self.exactly_once)
            .param("steps", "furnace")
            .num("time_scale", sizes.time_scale)
            .num("program_physical_s", program_physical_s(sizes.hold_s))
            .param("capacity", CAPACITY)
            .num("busiest_furnace_s", busiest_s)
            .num("busiest_pct", 100.0 * busiest_s / self.wall_s)
    }
}

/// The experiments of this campaign in every lab: (lab index, experiment) by message id.
fn accounted(
    fleet: &Fleet,
    prefix: &str,
) -> Result<BTreeMap<String, Vec<(usize, pb::Experiment)>>> {
    let mut out: BTreeMap<String, Vec<(usize, pb::Experiment)>> = BTreeMap::new();
    for (i, lab) in fleet.labs.iter().enumerate() {
        for e in lab.scheduler()?.store().experiments_in(&State::ALL)? {
            let Some(id) = e
                .spec
                .as_ref()
                .and_then(|s| s.labels.get(fleet::MSG_ID_LABEL))
                .filter(|id| id.starts_with(prefix))
                .cloned()
            else {
                continue;
            };
            out.entry(id).or_default().push((i, e));
        }
    }
    Ok(out)
}

/// Whether `e` ran (a copy cancelled before it started, the loser of a claim, did not).
fn ran(e: &pb::Experiment) -> bool {
    e.state != pb::ExperimentState::Cancelled as i32
        && e.state != pb::ExperimentState::Queued as i32
}

async fn campaign(
    bin: &Path,
    work: &Path,
    sizes: Sizes,
    labs: usize,
    run_id: &str,
) -> Result<Campaign> {
    let fleet = Fleet::start(bin, work, sizes, labs).await?;
    let result = measure_campaign(&fleet, sizes, run_id).await;
    fleet.stop().await;
    result
}

async fn measure_campaign(fleet: &Fleet, sizes: Sizes, run_id: &str) -> Result<Campaign> {
    let labs = fleet.labs.len();
    let batch = format!("{run_id}.labs{labs}");
    let prefix = format!("{batch}.");
    // Wakes the wait below on every terminal state change in any lab (or a lag of the bus).
    let changed = Arc::new(Notify::new());
    let mut watchers = Vec::new();
    for lab in &fleet.labs {
        let mut bus = lab.scheduler()?.store().subscribe();
        let changed = changed.clone();
        watchers.push(tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match bus.recv().await {
                    Ok(p) => {
                        if let Some(pb::event::Kind::ExperimentStateChanged(c)) = &p.event().kind
                            && is_terminal(c.to)
                        {
                            changed.notify_one();
                        }
                    }
                    Err(RecvError::Lagged(_)) => changed.notify_one(),
                    Err(RecvError::Closed) => break,
                }
            }
        }));
    }
    let specs: Vec<_> = (0..sizes.experiments)
        .map(|i| program(format!("fleet-{i:03}"), sizes.hold_s))
        .collect();
    let t0 = Instant::now();
    let mut acks = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        acks.push(publish(&fleet.js, spec, &format!("{prefix}{i}"), &batch).await?);
    }
    for a in acks {
        a.await.context("JetStream did not store a work message")?;
    }
    let published_s = t0.elapsed().as_secs_f64();
    let deadline = tokio::time::Instant::now() + sizes.deadline;
    let finished = loop {
        let found = accounted(fleet, &prefix)?;
        let done = found
            .values()
            .filter(|v| v.iter().any(|(_, e)| ran(e) && is_terminal(e.state)))
            .count();
        if done >= sizes.experiments {
            break (t0.elapsed(), found);
        }
        if tokio::time::timeout_at(deadline, changed.notified())
            .await
            .is_err()
        {
            for w in &watchers {
                w.abort();
            }
            bail!(
                "fleet campaign on {labs} labs not finished after {:?}: {done} of {} done",
                sizes.deadline,
                sizes.experiments
            );
        }
    };
    for w in &watchers {
        w.abort();
    }
    let (wall, found) = finished;
    let mut per_lab = vec![0; labs];
    let mut busy_s = vec![0.0; labs];
    let mut succeeded = 0;
    let mut exactly_once = found.len() == sizes.experiments;
    for (id, copies) in &found {
        let runs: Vec<_> = copies.iter().filter(|(_, e)| ran(e)).collect();
        if runs.len() != 1 {
            exactly_once = false;
            note(format!(
                "fleet: {id} ran {} times (labs {:?})",
                runs.len(),
                runs.iter().map(|(l, _)| LAB_IDS[*l]).collect::<Vec<_>>()
            ));
        }
        for (l, e) in runs {
            per_lab[*l] += 1;
            for r in &e.results {
                if let (Some(a), Some(b)) = (seconds(&r.started_at), seconds(&r.finished_at)) {
                    busy_s[*l] += b - a;
                }
            }
            succeeded += usize::from(e.state == pb::ExperimentState::Succeeded as i32);
        }
    }
    if found.len() != sizes.experiments {
        note(format!(
            "fleet: {} of {} message ids found in the labs",
            found.len(),
            sizes.experiments
        ));
    }
    note(format!(
        "fleet: {labs} labs: {} work messages published and stored in {:.3} s",
        sizes.experiments, published_s
    ));
    Ok(Campaign {
        labs,
        experiments: sizes.experiments,
        wall_s: wall.as_secs_f64(),
        succeeded,
        exactly_once,
        per_lab,
        busy_s,
    })
}

/// Submit-to-first-event latency, one sample at a time on an idle lab: directly (`SubmitBatch`
/// to the lab's gRPC, first event of the batch on its `StreamEvents`) and through the fleet
/// (publish to `PPU_WORK`, first event with that `Ppu-Msg-Id` on a consumer of `PPU_EVENTS`,
/// as a planner follows results).
async fn latency(bin: &Path, work: &Path, sizes: Sizes, run_id: &str) -> Result<Vec<Figure>> {
    let fleet = Fleet::start(bin, work, sizes, 1).await?;
    let result = measure_latency(&fleet, sizes, run_id).await;
    fleet.stop().await;
    let (mut direct, mut via_fleet, mut at_lab) = result?;
    let d = Summary::of(&mut direct);
    let f = Summary::of(&mut via_fleet);
    let l = Summary::of(&mut at_lab);
    let common = |fig: Figure| {
        fig.param("samples", sizes.latency_samples)
            .param("lab", "idle")
            .num("time_scale", sizes.time_scale)
    };
    let figures = vec![
        common(Figure::new(
            "fleet.direct_first_event_p50",
            d.p50 * 1e3,
            "ms",
        ))
        .num("p99_ms", d.p99 * 1e3)
        .num("max_ms", d.max * 1e3)
        .param("path", "SubmitBatch->StreamEvents"),
        common(Figure::new("fleet.first_event_p50", f.p50 * 1e3, "ms"))
            .num("direct_p50_ms", d.p50 * 1e3)
            .num("vs_direct", f.p50 / d.p50)
            .num("at_lab_p50_ms", l.p50 * 1e3)
            .param("path", "publish_PPU_WORK->PPU_EVENTS_consumer"),
        common(Figure::new("fleet.first_event_p99", f.p99 * 1e3, "ms"))
            .num("direct_p99_ms", d.p99 * 1e3)
            .num("vs_direct", f.p99 / d.p99)
            .num("at_lab_p99_ms", l.p99 * 1e3)
            .num("max_ms", f.max * 1e3)
            .param("path", "publish_PPU_WORK->PPU_EVENTS_consumer"),
    ];
    for f in &figures {
        f.emit();
    }
    Ok(figures)
}

/// Waits for the next item of `rx` matching `pick` before `deadline`.
async fn next_matching<T>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    deadline: tokio::time::Instant,
    what: &str,
    mut pick: impl FnMut(&T) -> bool,
) -> Result<T> {
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) if pick(&item) => return Ok(item),
            Ok(Some(_)) => {}
            Ok(None) => bail!("{what}: the event stream ended"),
            Err(_) => bail!("{what}: not seen in time"),
        }
    }
}

async fn measure_latency(
    fleet: &Fleet,
    sizes: Sizes,
    run_id: &str,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let lab = fleet.labs.first().context("no lab")?;
    let channel = lab.channel().await?;

    // Direct: every event of the lab's StreamEvents, stamped on arrival.
    let mut events = EventServiceClient::new(channel.clone())
        .stream_events(pb::StreamEventsRequest::default())
        .await?
        .into_inner();
    let (tx, mut direct_rx) = mpsc::unbounded_channel();
    let direct_task = tokio::spawn(async move {
        while let Ok(Some(e)) = events.message().await {
            if tx.send((Instant::now(), e)).is_err() {
                break;
            }
        }
    });
    // Through the fleet: every event published to PPU_EVENTS from now on, stamped on arrival.
    let mut messages = fleet
        .js
        .get_stream(fleet::EVENTS_STREAM)
        .await?
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::None,
            filter_subject: "ppu.*.events.>".into(),
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let (tx, mut fleet_rx) = mpsc::unbounded_channel();
    let fleet_task = tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            let msg_id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Ppu-Msg-Id"))
                .map(|v| v.as_str().to_owned());
            let event = pb::Event::decode(m.payload.clone()).ok();
            if tx.send((Instant::now(), msg_id, event)).is_err() {
                break;
            }
        }
    });
    // The same event committed at the lab (its event bus), by sequence: splits the fleet's
    // latency into taking the work (pull, commit) and publishing the event (outbox).
    let mut bus = lab.scheduler()?.store().subscribe();
    let (tx, mut bus_rx) = mpsc::unbounded_channel();
    let bus_task = tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match bus.recv().await {
                Ok(p) => {
                    if tx.send((Instant::now(), p.event().sequence)).is_err() {
                        break;
                    }
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break,
            }
        }
    });
    let result = async {
        let mut client = ExperimentServiceClient::new(channel);
        let mut direct = Vec::new();
        let mut via_fleet = Vec::new();
        let mut at_lab = Vec::new();
        for i in 0..sizes.latency_samples {
            let deadline = tokio::time::Instant::now() + sizes.deadline;
            // Direct.
            let spec = program(format!("direct-{i}"), SAMPLE_HOLD_S);
            let t0 = Instant::now();
            let batch = client
                .submit_batch(pb::SubmitBatchRequest {
                    idempotency_key: format!("{run_id}.direct.{i}"),
                    experiments: vec![spec],
                })
                .await?
                .into_inner()
                .batch
                .context("no batch in the reply")?;
            let (at, _) = next_matching(&mut direct_rx, deadline, "direct first event", |(_, e)| {
                e.batch_id == batch.id
            })
            .await?;
            direct.push(at.duration_since(t0).as_secs_f64());
            next_matching(&mut direct_rx, deadline, "direct sample's end", |(_, e)| {
                e.batch_id == batch.id
                    && matches!(&e.kind, Some(pb::event::Kind::ExperimentStateChanged(c)) if is_terminal(c.to))
            })
            .await?;

            // Through the fleet.
            let msg_id = format!("{run_id}.latency.{i}");
            let spec = program(format!("fleet-{i}"), SAMPLE_HOLD_S);
            let t0 = Instant::now();
            let ack = publish(&fleet.js, &spec, &msg_id, &format!("{run_id}.latency")).await?;
            ack.await.context("JetStream did not store a work message")?;
            let (at, _, first) =
                next_matching(&mut fleet_rx, deadline, "fleet first event", |(_, m, _)| {
                    m.as_deref() == Some(msg_id.as_str())
                })
                .await?;
            via_fleet.push(at.duration_since(t0).as_secs_f64());
            let sequence = first.map(|e| e.sequence).context("an undecodable event")?;
            let (committed, _) =
                next_matching(&mut bus_rx, deadline, "fleet first event at the lab", |(_, s)| {
                    *s >= sequence
                })
                .await?;
            at_lab.push(committed.duration_since(t0).as_secs_f64());
            next_matching(&mut fleet_rx, deadline, "fleet sample's end", |(_, m, e)| {
                m.as_deref() == Some(msg_id.as_str())
                    && matches!(e, Some(pb::Event { kind: Some(pb::event::Kind::ExperimentStateChanged(c)), .. }) if is_terminal(c.to))
            })
            .await?;
        }
        Ok::<_, anyhow::Error>((direct, via_fleet, at_lab))
    }
    .await;
    direct_task.abort();
    fleet_task.abort();
    bus_task.abort();
    result
}
