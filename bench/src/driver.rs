//! Figure 3, driver overhead: a Modbus TCP holding-register read through the whole driver path
//! (`ModbusTransport::read_holding`: request serialisation, timeout, retry bookkeeping, reply
//! checks) against a bare tokio-modbus client reading the same registers of the same simulated
//! controller in the same run, as a ratio of medians. Also `Eurotherm::status` (three reads and
//! decoding) against three bare reads. Rounds of the two alternate so drift hits both alike.
//!
//! It runs twice: as a task on the multi-threaded runtime (as the daemon runs its drivers; the
//! client and the simulator may sit on different CPUs) and on a single-threaded runtime (no
//! cross-CPU wake-ups, so the smallest round trip and the largest relative overhead).

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use ppu_drivers::Clock;
use ppu_drivers::Device;
use ppu_drivers::furnace::eurotherm::{Eurotherm, EurothermConfig, registers};
use ppu_drivers::transport::modbus::{ModbusConfig, ModbusEndpoint, ModbusTransport};
use ppu_sim::furnace::{FurnaceConfig, SimFurnace};
use ppu_sim::modbus::serve_tcp;
use tokio_modbus::Slave;
use tokio_modbus::client::Context as ModbusContext;
use tokio_modbus::client::Reader as _;

use crate::figure::Figure;
use crate::latency::Summary;

#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub rounds: usize,
    pub per_round: usize,
}

/// Registers 1..=5 (PV, target SP, output, working output, working SP): the driver's main read.
const FIRST: u16 = registers::PV;
const COUNT: u16 = 5;

/// Medians and tails of one comparison, µs.
struct Comparison {
    bare: Summary,
    driver: Summary,
}

impl Comparison {
    fn ratio(&self) -> f64 {
        self.driver.p50 / self.bare.p50
    }
}

struct Results {
    read: Comparison,
    status: Comparison,
}

pub async fn run(sizes: Sizes) -> Result<Vec<Figure>> {
    let mt = tokio::spawn(measure(sizes))
        .await
        .context("driver benchmark task")??;
    let ct = std::thread::spawn(move || -> Result<Results> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(measure(sizes))
    })
    .join()
    .map_err(|_| anyhow!("single-threaded driver benchmark panicked"))??;
    let reads = sizes.rounds * sizes.per_round;
    let read = Figure::new("driver.read_overhead", mt.read.ratio(), "x")
        .param("registers", COUNT)
        .param("reads", reads)
        .num("driver_p50_us", mt.read.driver.p50)
        .num("bare_p50_us", mt.read.bare.p50)
        .num("driver_p99_us", mt.read.driver.p99)
        .num("bare_p99_us", mt.read.bare.p99)
        .param("runtime", "multi_thread")
        .num("ct_ratio", ct.read.ratio())
        .num("ct_driver_p50_us", ct.read.driver.p50)
        .num("ct_bare_p50_us", ct.read.bare.p50)
        .target(true, 1.2);
    let status = Figure::new("driver.status_overhead", mt.status.ratio(), "x")
        .param("vs", "3_bare_reads")
        .param("calls", reads / 3)
        .num("driver_p50_us", mt.status.driver.p50)
        .num("bare_p50_us", mt.status.bare.p50)
        .param("runtime", "multi_thread")
        .num("ct_ratio", ct.status.ratio())
        .target(true, 1.2);
    read.emit();
    status.emit();
    Ok(vec![read, status])
}

async fn bare_read(ctx: &mut ModbusContext, addr: u16, count: u16) -> Result<Vec<u16>> {
    ctx.read_holding_registers(addr, count)
        .await?
        .map_err(|e| anyhow!("exception {e:?}"))
}

/// Runs the expression `n` times, appending each duration in µs.
macro_rules! time_n {
    ($n:expr, $out:expr, $op:expr) => {
        for _ in 0..$n {
            let t0 = Instant::now();
            $op;
            $out.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    };
}

async fn measure(sizes: Sizes) -> Result<Results> {
    let sim = SimFurnace::new(FurnaceConfig::default(), Clock::real());
    let server = serve_tcp(SocketAddr::from(([127, 0, 0, 1], 0)), sim.clone()).await?;
    let addr = server.local_addr();
    let mut modbus = ModbusConfig::new(ModbusEndpoint::Tcp(addr));
    modbus.unit_id = sim.unit_id();
    let transport = ModbusTransport::new(modbus.clone());
    let furnace = Eurotherm::new(EurothermConfig::new("furnace-1", modbus));
    let mut bare = tokio_modbus::client::tcp::connect_slave(addr, Slave(sim.unit_id())).await?;

    let (mut bare_reads, mut driver_reads) = (Vec::new(), Vec::new());
    let (mut bare_status, mut driver_status) = (Vec::new(), Vec::new());
    // Warm-up: connections (the driver connects on first use), caches, branch predictors.
    for _ in 0..50 {
        bare_read(&mut bare, FIRST, COUNT).await?;
        transport.read_holding(FIRST, COUNT).await?;
        furnace.status().await?;
    }
    let status_n = (sizes.per_round / 3).max(1);
    for round in 0..sizes.rounds {
        for side in [round % 2, 1 - round % 2] {
            if side == 0 {
                time_n!(
                    sizes.per_round,
                    bare_reads,
                    bare_read(&mut bare, FIRST, COUNT).await?
                );
            } else {
                time_n!(
                    sizes.per_round,
                    driver_reads,
                    transport.read_holding(FIRST, COUNT).await?
                );
            }
        }
        for side in [round % 2, 1 - round % 2] {
            if side == 0 {
                // What `status` reads: registers 1..=5, the status word and the rate limit.
                time_n!(status_n, bare_status, {
                    bare_read(&mut bare, FIRST, COUNT).await?;
                    bare_read(&mut bare, registers::STATUS, 1).await?;
                    bare_read(&mut bare, registers::SP_RATE_LIMIT, 1).await?
                });
            } else {
                time_n!(status_n, driver_status, furnace.status().await?);
            }
        }
    }
    drop(bare);
    drop(transport);
    drop(furnace);
    server.shutdown().await;
    Ok(Results {
        read: Comparison {
            bare: Summary::of(&mut bare_reads),
            driver: Summary::of(&mut driver_reads),
        },
        status: Comparison {
            bare: Summary::of(&mut bare_status),
            driver: Summary::of(&mut driver_status),
        },
    })
}
