//! Figure 1, durable submit throughput: `SubmitBatch` over gRPC against a real daemon, one
//! client, batches of 1, 100 and 1,000 experiments, each call returning only after its commit
//! (fsync). The bare baseline is redb alone committing the same number of rows of the same size
//! per durable transaction, in rounds alternating with the daemon's, on the same disk.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use pb::experiment_service_client::ExperimentServiceClient;
use pb::queue_service_client::QueueServiceClient;
use ppu_proto::v1 as pb;
use prost::Message;
use redb::{Database, TableDefinition};

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

const BARE: TableDefinition<&str, &[u8]> = TableDefinition::new("bare");

pub async fn run(tiers: &[Tier], work: &Path) -> Result<Vec<Figure>> {
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
    let result = measure(&lab, tiers, dir.path()).await;
    lab.stop().await;
    result
}

async fn measure(lab: &Lab, tiers: &[Tier], dir: &Path) -> Result<Vec<Figure>> {
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
            f = f.target(false, 5000.0);
        }
        f.emit();
        figures.push(f);
    }
    Ok(figures)
}

/// redb alone, committing rows of the daemon's experiment size durably: the floor under
/// `SubmitBatch`.
struct Bare {
    db: Database,
    payload: Vec<u8>,
    ids: ulid::Generator,
    rows: usize,
    took: Duration,
}

impl Bare {
    fn open(path: &Path, row_len: usize) -> Result<Bare> {
        Ok(Bare {
            db: Database::create(path).context("bare redb")?,
            payload: vec![0x5a_u8; row_len],
            ids: ulid::Generator::new(),
            rows: 0,
            took: Duration::ZERO,
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
            self.took += t0.elapsed();
            self.rows += rows;
        }
        Ok(())
    }

    fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.took.as_secs_f64()
    }
}
