//! Figure 1, durable submit throughput: `SubmitBatch` over gRPC against a real daemon, one
//! client, batches of 1, 100 and 1,000 experiments, each call returning only after its commit
//! (fsync). The bare baseline is redb alone committing the same number of rows of the same size
//! per durable transaction, in rounds alternating with the daemon's, on the same disk.
//!
//! Two more figures from the same daemon:
//! - `submit.single_p50`: the latency of one single-experiment `SubmitBatch`, against its floor
//!   "one durable commit + one gRPC round trip": the bare 1-row redb commit above plus a bare
//!   unary gRPC call on loopback (a tonic health check against a server doing nothing else);
//! - `submit.concurrent`: 16 planners (one connection each) submitting single experiments at
//!   once, against 16 threads doing 1-row durable redb commits on one database. redb takes one
//!   writer at a time, so the bare figure is one fsync per row; the daemon can only pass it by
//!   sharing one durable transaction between concurrent submits (group commit).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use pb::experiment_service_client::ExperimentServiceClient;
use pb::queue_service_client::QueueServiceClient;
use ppu_proto::v1 as pb;
use prost::Message;
use redb::{Database, TableDefinition};
use tonic::transport::Channel;

use crate::figure::Figure;
use crate::lab::{Lab, LabConfig};
use crate::latency::Summary;
use crate::workload;

/// One tier: `batches` sequential `SubmitBatch` calls of `size` experiments.
#[derive(Debug, Clone, Copy)]
pub struct Tier {
    pub size: usize,
    pub batches: usize,
}

/// The sizes of the submit figures.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub tiers: Vec<Tier>,
    /// Concurrent single-experiment submitters of `submit.concurrent`.
    pub clients: usize,
    /// Calls each of them makes.
    pub calls_per_client: usize,
}

/// The goals: batches of 1,000 at 110k exp/s and a quarter of redb's bare rate; a
/// single submit within 0.5 ms (p50); 16 concurrent single submitters at 5k exp/s.
const GOAL_BATCH_RATE: f64 = 110_000.0;
const GOAL_BATCH_VS_BARE: f64 = 0.25;
const GOAL_SINGLE_P50_MS: f64 = 0.5;
const GOAL_CONCURRENT_RATE: f64 = 5000.0;

const BARE: TableDefinition<&str, &[u8]> = TableDefinition::new("bare");

pub async fn run(sizes: &Sizes, work: &Path) -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir_in(work)?;
    let lab = Lab::start(
        &dir.path().join("daemon"),
        LabConfig {
            time_scale: 1.0,
            furnaces: 1,
            full: false,
            transfer_delay: Duration::ZERO,
        },
    )
    .await?;
    let result = measure(&lab, sizes, dir.path()).await;
    lab.stop().await;
    result
}

async fn measure(lab: &Lab, sizes: &Sizes, dir: &Path) -> Result<Vec<Figure>> {
    let tiers = &sizes.tiers;
    let channel = lab.channel().await?;
    // Nothing may start running: the figure is the submit path alone.
    QueueServiceClient::new(channel.clone())
        .pause_queue(pb::PauseQueueRequest {
            reason: "ppu-bench: submit throughput".into(),
        })
        .await?;
    let mut client = ExperimentServiceClient::new(channel);
    // Warm-up: connection, first table pages, allocator.
    client
        .submit_batch(workload::batch_request("warm-up".into(), 0, 10))
        .await?;
    let row_len = pb::Experiment {
        id: "01J0000000000000000000000".into(),
        spec: Some(workload::calcination(0)),
        ..Default::default()
    }
    .encoded_len();
    let mut figures = Vec::new();
    let mut next = 10;
    for (t, tier) in tiers.iter().enumerate() {
        // Built before the clock starts: the figure is the daemon's, not the request builder's.
        let requests: Vec<_> = (0..tier.batches)
            .map(|b| {
                let first = next + b * tier.size;
                workload::batch_request(format!("bench-{t}-{b}"), first, tier.size)
            })
            .collect();
        next += tier.batches * tier.size;
        let mut bare = Bare::open(&dir.join(format!("bare-{t}.redb")), row_len)?;
        // Daemon and bare redb alternate in rounds, so a busy disk slows both alike.
        let rounds = tier.batches.clamp(1, 10);
        let per_round = tier.batches.div_ceil(rounds);
        let mut calls = Vec::with_capacity(tier.batches);
        let mut daemon_time = Duration::ZERO;
        let mut requests = requests.into_iter();
        loop {
            let chunk: Vec<_> = requests.by_ref().take(per_round).collect();
            if chunk.is_empty() {
                break;
            }
            let n = chunk.len();
            for req in chunk {
                let t0 = Instant::now();
                let resp = client.submit_batch(req).await?.into_inner();
                let took = t0.elapsed();
                daemon_time += took;
                calls.push(took.as_secs_f64() * 1e3);
                let stored = resp.batch.map_or(0, |b| b.experiment_ids.len());
                ensure!(
                    !resp.duplicate && stored == tier.size,
                    "submit returned duplicate={} with {stored} experiments",
                    resp.duplicate
                );
            }
            bare.commits(tier.size, n)?;
        }
        let rate = (tier.size * tier.batches) as f64 / daemon_time.as_secs_f64();
        let bare_rate = bare.rows_per_s();
        let calls = Summary::of(&mut calls);
        let mut f = Figure::new("submit.throughput", rate, "exp/s")
            .param("batch", tier.size)
            .param("batches", tier.batches)
            .param("clients", 1)
            .num("call_p50_ms", calls.p50)
            .num("call_p99_ms", calls.p99)
            .num("bare_redb_rows_per_s", bare_rate)
            .num("vs_bare", rate / bare_rate);
        if tier.size == 1000 {
            let vs_bare = rate / bare_rate;
            f = f
                .param("target_vs_bare", format!(">={GOAL_BATCH_VS_BARE}"))
                .goal(
                    format!(">={GOAL_BATCH_RATE}"),
                    rate >= GOAL_BATCH_RATE && vs_bare >= GOAL_BATCH_VS_BARE,
                );
        }
        f.emit();
        figures.push(f);
        if tier.size == 1 {
            let f = single(&calls, &bare, lab, tier.batches).await?;
            f.emit();
            figures.push(f);
        }
    }
    let f = concurrent(lab, sizes, dir, row_len, next).await?;
    f.emit();
    figures.push(f);
    Ok(figures)
}

/// `submit.single_p50`: the single-experiment tier's median call against one durable 1-row
/// commit (`bare`, that tier's baseline) plus one bare gRPC round trip measured now.
async fn single(calls: &Summary, bare: &Bare, lab: &Lab, n: usize) -> Result<Figure> {
    let mut commits = bare.commits_ms.clone();
    let commit = Summary::of(&mut commits);
    let rtt = grpc_round_trip(n.max(10)).await?;
    // Keeps the daemon's connection and runtime warm for what follows.
    drop(lab.channel().await?);
    let floor = commit.p50 + rtt.p50;
    Ok(Figure::new("submit.single_p50", calls.p50, "ms")
        .param("batch", 1)
        .param("calls", calls.n)
        .num("p99_ms", calls.p99)
        .num("bare_commit_p50_ms", commit.p50)
        .num("bare_grpc_rtt_p50_ms", rtt.p50)
        .num("bare_p50_ms", floor)
        .num("vs_bare", calls.p50 / floor)
        .target(true, GOAL_SINGLE_P50_MS))
}

/// Median of `n` unary gRPC calls on loopback to a server that does nothing else (tonic's
/// health service): the transport's share of any call, ms.
async fn grpc_round_trip(n: usize) -> Result<Summary> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (_reporter, service) = tonic_health::server::health_reporter();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = {
        let stop = stop.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                ),
        )
    };
    let result = async {
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let mut client = HealthClient::new(channel);
        let request = || HealthCheckRequest {
            service: String::new(),
        };
        for _ in 0..10 {
            client.check(request()).await?;
        }
        let mut calls = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            client.check(request()).await?;
            calls.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok::<_, anyhow::Error>(Summary::of(&mut calls))
    }
    .await;
    stop.cancel();
    let _ = server.await;
    result
}

/// `submit.concurrent`: `clients` planners, one connection each, each making
/// `calls_per_client` single-experiment submits back to back, all at once; then as many
/// threads doing as many 1-row durable commits on one bare redb.
async fn concurrent(
    lab: &Lab,
    sizes: &Sizes,
    dir: &Path,
    row_len: usize,
    first: usize,
) -> Result<Figure> {
    let (clients, per) = (sizes.clients.max(1), sizes.calls_per_client.max(1));
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut c = ExperimentServiceClient::new(lab.channel().await?);
        c.submit_batch(workload::batch_request(
            format!("concurrent-warm-{}", connections.len()),
            first + connections.len(),
            1,
        ))
        .await?;
        connections.push(c);
    }
    let first = first + clients;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for (c, mut client) in connections.into_iter().enumerate() {
        let start = start.clone();
        let requests: Vec<_> = (0..per)
            .map(|i| {
                let n = first + c * per + i;
                workload::batch_request(format!("concurrent-{c}-{i}"), n, 1)
            })
            .collect();
        tasks.spawn(async move {
            start.wait().await;
            let mut calls = Vec::with_capacity(requests.len());
            for req in requests {
                let t0 = Instant::now();
                let resp = client.submit_batch(req).await?.into_inner();
                calls.push(t0.elapsed().as_secs_f64() * 1e3);
                ensure!(
                    !resp.duplicate && resp.batch.is_some_and(|b| b.experiment_ids.len() == 1),
                    "a concurrent submit stored something else than one experiment"
                );
            }
            Ok::<_, anyhow::Error>(calls)
        });
    }
    start.wait().await;
    let t0 = Instant::now();
    let mut calls = Vec::with_capacity(clients * per);
    while let Some(r) = tasks.join_next().await {
        calls.extend(r.context("submitter task")??);
    }
    let wall = t0.elapsed();
    let rate = (clients * per) as f64 / wall.as_secs_f64();
    let bare_rate = {
        let path = dir.join("bare-concurrent.redb");
        tokio::task::spawn_blocking(move || bare_concurrent(&path, row_len, clients, per)).await??
    };
    let calls = Summary::of(&mut calls);
    Ok(Figure::new("submit.concurrent", rate, "exp/s")
        .param("batch", 1)
        .param("clients", clients)
        .param("calls", calls.n)
        .num("call_p50_ms", calls.p50)
        .num("call_p99_ms", calls.p99)
        .num("bare_redb_rows_per_s", bare_rate)
        .param(
            "bare",
            format!("{clients}_threads_1-row_commits_no_group_commit"),
        )
        .num("vs_bare", rate / bare_rate)
        .target(false, GOAL_CONCURRENT_RATE))
}

/// `threads` threads each making `per` 1-row durable commits on one redb database: rows/s.
fn bare_concurrent(path: &Path, row_len: usize, threads: usize, per: usize) -> Result<f64> {
    let db = Database::create(path).context("bare redb")?;
    let payload = vec![0x5a_u8; row_len];
    let t0 = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (db, payload) = (&db, &payload);
                scope.spawn(move || -> Result<()> {
                    let mut ids = ulid::Generator::new();
                    for _ in 0..per {
                        let key = ids.generate()?.to_string();
                        let tx = db.begin_write()?;
                        {
                            let mut t = tx.open_table(BARE)?;
                            t.insert(key.as_str(), payload.as_slice())?;
                        }
                        tx.commit()?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("bare commit thread panicked"))??;
        }
        Ok(())
    })?;
    Ok((threads * per) as f64 / t0.elapsed().as_secs_f64())
}

/// redb alone, committing rows of the daemon's experiment size durably: the floor under
/// `SubmitBatch`.
struct Bare {
    db: Database,
    payload: Vec<u8>,
    ids: ulid::Generator,
    rows: usize,
    took: Duration,
    /// Duration of each durable transaction, ms.
    commits_ms: Vec<f64>,
}

impl Bare {
    fn open(path: &Path, row_len: usize) -> Result<Bare> {
        Ok(Bare {
            db: Database::create(path).context("bare redb")?,
            payload: vec![0x5a_u8; row_len],
            ids: ulid::Generator::new(),
            rows: 0,
            took: Duration::ZERO,
            commits_ms: Vec::new(),
        })
    }

    /// `commits` durable transactions of `rows` rows each.
    fn commits(&mut self, rows: usize, commits: usize) -> Result<()> {
        for _ in 0..commits {
            let keys: Vec<String> = (0..rows)
                .map(|_| self.ids.generate().map(|u| u.to_string()))
                .collect::<Result<_, _>>()?;
            let t0 = Instant::now();
            let tx = self.db.begin_write()?;
            {
                let mut t = tx.open_table(BARE)?;
                for k in &keys {
                    t.insert(k.as_str(), self.payload.as_slice())?;
                }
            }
            tx.commit()?;
            let took = t0.elapsed();
            self.took += took;
            self.commits_ms.push(took.as_secs_f64() * 1e3);
            self.rows += rows;
        }
        Ok(())
    }

    fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.took.as_secs_f64()
    }
}
