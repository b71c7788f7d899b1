//! `ppu-sim`: run simulated lab instruments behind their real wire protocols.

use std::io::IsTerminal;
use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ppu_drivers::Clock;
use ppu_sim::furnace::{FurnaceConfig, SimFurnace};
use ppu_sim::modbus::{ServerHandle, serve_tcp};
use tracing_subscriber::EnvFilter;

/// Hardware-in-the-loop simulators for ppu.
///
/// Each simulated instrument speaks its real protocol on a real socket, so drivers (and ppud)
/// talk to it exactly as they would to the hardware. Logs go to stderr; set RUST_LOG (e.g.
/// RUST_LOG=ppu_sim=debug) for more detail.
#[derive(Parser, Debug)]
#[command(name = "ppu-sim", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Simulated Eurotherm 2000/3000-series furnace controllers on Modbus TCP.
    ///
    /// Each furnace is a box furnace (3 kW, limit 1200 °C, ambient 25 °C) behind its own Modbus
    /// TCP socket, answering only for its unit id (other unit ids get no reply, as on an RS-485
    /// bus). Register map: PV 1, target SP 2, output 3, working SP 5, rate limit 35, status 75,
    /// ident 122 (0x2BCD), auto/manual 273; temperatures scaled by 10^dp. Prints each listening
    /// address on stdout, one per line, then runs until Ctrl-C.
    ///
    /// Example: ppu-sim furnace --listen 127.0.0.1:5020 --time-scale 600 --count 2
    Furnace(FurnaceArgs),
}

#[derive(clap::Args, Debug)]
struct FurnaceArgs {
    /// Address of the first furnace; further furnaces use the following ports. Port 0 lets
    /// the OS pick a free port for each.
    #[arg(long, default_value = "127.0.0.1:5020", env = "PPU_SIM_LISTEN")]
    listen: SocketAddr,

    /// Physical seconds per real second (600: one real second is ten furnace minutes).
    #[arg(long, default_value_t = 1.0, env = "PPU_SIM_TIME_SCALE")]
    time_scale: f64,

    /// Modbus unit (slave) id of every furnace, 1-247.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=247))]
    unit: u8,

    /// Number of furnaces, on consecutive ports.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    count: u16,

    /// Decimal places of temperatures in the integer registers (0-3).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=3))]
    decimal_places: u8,

    /// Ambient (and initial) temperature, °C.
    #[arg(long, default_value_t = 25.0, allow_negative_numbers = true)]
    ambient: f64,

    /// Standard deviation of the PV noise, °C (0 = none).
    #[arg(long, default_value_t = 0.0)]
    noise: f64,

    /// Seed of the PV noise (each furnace adds its index).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let cli = Cli::parse();
    match cli.command {
        Command::Furnace(args) => run_furnaces(args).await,
    }
}

async fn run_furnaces(args: FurnaceArgs) -> Result<()> {
    if !(args.time_scale.is_finite() && args.time_scale > 0.0) {
        bail!("--time-scale must be a positive number");
    }
    if !(args.noise.is_finite() && args.noise >= 0.0) {
        bail!("--noise must be a non-negative number");
    }
    let clock = Clock::new(args.time_scale);
    let mut servers: Vec<ServerHandle> = Vec::new();
    for i in 0..args.count {
        let mut addr = args.listen;
        if addr.port() != 0 {
            let port = addr
                .port()
                .checked_add(i)
                .context("port range exceeds 65535")?;
            addr.set_port(port);
        }
        let config = FurnaceConfig {
            unit_id: args.unit,
            decimal_places: args.decimal_places,
            ambient_c: args.ambient,
            initial_sp_c: args.ambient.max(0.0),
            pv_noise_c: args.noise,
            seed: args.seed.wrapping_add(u64::from(i)),
            ..FurnaceConfig::default()
        };
        let furnace = SimFurnace::new(config, clock);
        let server = serve_tcp(addr, furnace)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("{}", server.local_addr());
        servers.push(server);
    }
    tracing::info!(
        count = servers.len(),
        unit = args.unit,
        time_scale = args.time_scale,
        "furnaces running; Ctrl-C to stop"
    );
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    tracing::info!("stopping");
    for server in servers {
        server.shutdown().await;
    }
    Ok(())
}
