//! `ppu-bench`: the figures that show ppu is fast, measured against a real daemon — durable
//! submit throughput, event fan-out latency, driver overhead, memory and start-up at scale, a
//! simulated campaign, and the fleet on NATS JetStream (1–3 labs, submit-to-first-event). Each figure prints as one line, `NAME VALUE UNIT key=value ...`, with its
//! bare baseline from the same run where one exists (see docs/BENCHMARKS.md).
//!
//! `--quick` runs every figure in under two minutes on a 2-core machine; `--smoke` runs a tiny
//! configuration (CI uses it so the harness cannot rot; its numbers mean nothing).

mod campaign;
mod driver;
mod fanout;
mod figure;
mod fleet;
mod lab;
mod latency;
mod memory;
mod scale;
mod submit;
mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use crate::figure::note;
use crate::submit::Tier;

#[derive(Parser)]
#[command(
    version,
    about = "Benchmarks of ppud: one line per figure (name value unit params)."
)]
struct Cli {
    /// Smaller sizes: every figure in under 2 minutes on a 2-core machine.
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// Tiny sizes for CI: proves the harness runs; the numbers mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Only these figures (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Directory for the benchmark stores (default: the system temp dir). Use a real disk:
    /// on tmpfs an fsync is free and the durable figures mean nothing.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Subscriber counts of the events figure (comma-separated; default 1,10,100).
    #[arg(long, value_delimiter = ',')]
    subscribers: Vec<usize>,
    /// Physical seconds per real second for the campaign figure (default: 100000 and 200000
    /// in a full run, 100000 with --quick or --smoke).
    #[arg(long)]
    time_scale: Option<f64>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Internal: run a daemon (no devices) on DATA_DIR until stdin closes; used by the scale
    /// figure to measure a daemon process on its own.
    #[command(hide = true)]
    Daemon {
        #[arg(long)]
        data_dir: PathBuf,
        /// Simulated furnaces to start in the daemon's process (the memory figure submits).
        #[arg(long, default_value_t = 0)]
        furnaces: usize,
        /// `limits.max_streams` (default: the daemon's default).
        #[arg(long)]
        max_streams: Option<usize>,
    },
    /// Internal: a gRPC server with only the health service, until stdin closes; the memory
    /// figure's baseline for a daemon's idle memory.
    #[command(hide = true)]
    BareGrpc,
    /// Pre-fill a store in DATA_DIR as the scale figure does (queue paused), to profile the
    /// daemon's start-up on it: `valgrind --tool=callgrind ppu-bench daemon --data-dir DIR
    /// </dev/null` starts, then stops at once (see docs/BENCHMARKS.md).
    Fill {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        experiments: usize,
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    Submit,
    Events,
    Driver,
    Scale,
    Campaign,
    Memory,
    Fleet,
}

/// Idle time before the memory figure reads `after`: longer than tokio's keep-alive of idle
/// blocking threads (10 s), whose stacks count as resident until they exit.
const MEMORY_SETTLE: Duration = Duration::from_secs(12);

/// The sizes of one run.
struct Plan {
    label: &'static str,
    submit: submit::Sizes,
    fanout: fanout::Sizes,
    driver: driver::Sizes,
    scale: scale::Sizes,
    campaign: campaign::Sizes,
    /// Time scales the campaign runs at, one figure each.
    campaign_scales: Vec<f64>,
    memory: memory::Sizes,
    fleet: fleet::Sizes,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            label: "full",
            submit: submit::Sizes {
                tiers: vec![
                    Tier {
                        size: 1,
                        batches: 1000,
                    },
                    Tier {
                        size: 100,
                        batches: 100,
                    },
                    Tier {
                        size: 1000,
                        batches: 30,
                    },
                ],
                clients: 16,
                calls_per_client: 200,
            },
            fanout: fanout::Sizes {
                subscribers: vec![1, 10, 100],
                rate: 10_000.0,
                max_per_commit: 1000,
                warmup: Duration::from_secs(1),
                measure: Duration::from_secs(5),
                drain: Duration::from_secs(120),
            },
            driver: driver::Sizes {
                rounds: 20,
                per_round: 500,
            },
            scale: scale::Sizes {
                experiments: 100_000,
                events: 1_000_000,
                list_calls: 300,
            },
            campaign: campaign::Sizes {
                experiments: 100,
                // The outcome does not depend on the scale (equilibrium, thermal histories and
                // transfers are physical time); at 200,000x the analyser's ~4 physical hours
                // per sample take ~60 ms, the rest is the protocols' round trips and commits.
                time_scale: 200_000.0,
                furnaces: 2,
                // A robot arm's move, physical time.
                transfer_delay: Duration::from_secs(30),
                deadline: Duration::from_secs(600),
            },
            // 100,000x, where 12 % of isotherms once failed (docs/BENCHMARKS.md), and 200,000x:
            // a higher time scale may change the wall time only, never the outcome.
            campaign_scales: vec![100_000.0, 200_000.0],
            memory: memory::Sizes {
                experiments: 10_000,
                streams: 500,
                stream_rounds: 3,
                settle: MEMORY_SETTLE,
            },
            fleet: fleet::Sizes {
                // 18 programs of ~1 s (2,000 physical s at 2,000x): ~18 s on one lab, the
                // same count on every lab (18 divides by 2 and 3).
                experiments: 18,
                time_scale: 2000.0,
                hold_s: 1715.0,
                max_labs: 3,
                latency_samples: 20,
                deadline: Duration::from_secs(120),
            },
        }
    }

    fn quick() -> Plan {
        let full = Plan::full();
        Plan {
            label: "quick",
            submit: submit::Sizes {
                tiers: vec![
                    Tier {
                        size: 1,
                        batches: 300,
                    },
                    Tier {
                        size: 100,
                        batches: 30,
                    },
                    Tier {
                        size: 1000,
                        batches: 10,
                    },
                ],
                clients: 16,
                calls_per_client: 60,
            },
            fanout: fanout::Sizes {
                warmup: Duration::from_millis(500),
                measure: Duration::from_secs(2),
                drain: Duration::from_secs(60),
                ..full.fanout
            },
            driver: driver::Sizes {
                rounds: 10,
                per_round: 200,
            },
            scale: scale::Sizes {
                experiments: 50_000,
                events: 500_000,
                list_calls: 100,
            },
            campaign: campaign::Sizes {
                experiments: 40,
                ..full.campaign
            },
            campaign_scales: vec![100_000.0],
            memory: memory::Sizes {
                experiments: 2000,
                streams: 200,
                stream_rounds: 2,
                settle: MEMORY_SETTLE,
            },
            fleet: fleet::Sizes {
                experiments: 6,
                latency_samples: 10,
                ..full.fleet
            },
        }
    }

    fn smoke() -> Plan {
        let full = Plan::full();
        Plan {
            label: "smoke",
            submit: submit::Sizes {
                tiers: vec![
                    Tier {
                        size: 1,
                        batches: 3,
                    },
                    Tier {
                        size: 100,
                        batches: 2,
                    },
                    Tier {
                        size: 1000,
                        batches: 1,
                    },
                ],
                clients: 16,
                calls_per_client: 2,
            },
            fanout: fanout::Sizes {
                rate: 1000.0,
                warmup: Duration::from_millis(100),
                measure: Duration::from_millis(300),
                drain: Duration::from_secs(60),
                ..full.fanout
            },
            driver: driver::Sizes {
                rounds: 2,
                per_round: 20,
            },
            scale: scale::Sizes {
                experiments: 2000,
                events: 20_000,
                list_calls: 10,
            },
            campaign: campaign::Sizes {
                experiments: 2,
                deadline: Duration::from_secs(120),
                ..full.campaign
            },
            campaign_scales: vec![100_000.0],
            memory: memory::Sizes {
                experiments: 100,
                streams: 20,
                stream_rounds: 1,
                settle: Duration::from_millis(500),
            },
            fleet: fleet::Sizes {
                experiments: 3,
                hold_s: 100.0,
                latency_samples: 2,
                ..full.fleet
            },
        }
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Daemon {
            data_dir,
            furnaces,
            max_streams,
        }) => return scale::child_main(data_dir, furnaces, max_streams).await,
        Some(Command::BareGrpc) => return scale::bare_grpc_main().await,
        Some(Command::Fill {
            data_dir,
            experiments,
            events,
        }) => {
            std::fs::create_dir_all(&data_dir)?;
            let path = data_dir.join(ppu_daemon::app::STORE_FILE);
            let filled =
                tokio::task::spawn_blocking(move || workload::fill(&path, experiments, events))
                    .await??;
            note(format!(
                "filled {} experiments and {} events in {:.1} s",
                filled.experiments,
                filled.events,
                filled.took.as_secs_f64()
            ));
            return Ok(());
        }
        None => {}
    }
    let mut plan = if cli.smoke {
        Plan::smoke()
    } else if cli.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(s) = cli.time_scale {
        anyhow::ensure!(s.is_finite() && s > 0.0, "--time-scale must be positive");
        plan.campaign_scales = vec![s];
    }
    if !cli.subscribers.is_empty() {
        plan.fanout.subscribers = cli.subscribers.clone();
    }
    let work = cli.work_dir.unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&work)?;
    let wants = |s: Section| cli.only.is_empty() || cli.only.contains(&s);
    note(format!(
        "ppu-bench {} run on {}, stores under {}",
        plan.label,
        machine(),
        work.display()
    ));
    let started = Instant::now();
    if wants(Section::Submit) {
        submit::run(&plan.submit, &work).await?;
    }
    if wants(Section::Events) {
        fanout::run(&plan.fanout, &work).await?;
    }
    if wants(Section::Driver) {
        driver::run(plan.driver).await?;
    }
    if wants(Section::Scale) {
        scale::run(plan.scale, &work).await?;
    }
    if wants(Section::Campaign) {
        for &time_scale in &plan.campaign_scales {
            let sizes = campaign::Sizes {
                time_scale,
                ..plan.campaign
            };
            campaign::run(sizes, &work).await?;
        }
    }
    if wants(Section::Memory) {
        memory::run(plan.memory, &work).await?;
    }
    if wants(Section::Fleet) {
        fleet::run(plan.fleet, &work).await?;
    }
    note(format!("done in {:.1} s", started.elapsed().as_secs_f64()));
    Ok(())
}
