//! `ppud` — the ppu lab daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ppu_daemon::app::{Daemon, Options};
use ppu_daemon::config::{Config, DEFAULT_LISTEN};
use ppu_daemon::dev::DevLab;
use ppu_daemon::devices::PollSettings;
use ppu_drivers::Clock;
use tracing_subscriber::EnvFilter;

/// The ppu lab daemon: a durable experiment queue that runs recipes on lab devices
/// (furnaces, pumps, balances, sorption analysers) and streams results to planners over gRPC.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter, e.g. `info`, `debug`, `ppu_daemon=debug,info` (also read from RUST_LOG).
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    log: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon together with a simulated lab in one process: simulated Eurotherm furnaces
    /// behind real Modbus TCP sockets on loopback, driven by the real drivers. Physical time runs
    /// --time-scale times faster, so a 2-hour furnace program takes about 12 s by default.
    ///
    /// Example: `ppud dev` then, in another terminal, `ppuctl submit examples/batch.toml`.
    Dev {
        /// gRPC listen address (port 0 picks a free port; the address is printed).
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Where the store lives. Kept across runs, so queued work survives a restart.
        #[arg(long, default_value = "ppu-dev-data")]
        data_dir: PathBuf,
        /// Physical seconds per real second for holds, ramps and the simulated physics.
        #[arg(long, default_value_t = 600.0)]
        time_scale: f64,
        /// Number of simulated furnaces (furnace-1, furnace-2, …).
        #[arg(long, default_value_t = 2)]
        furnaces: usize,
    },
    /// Run the daemon against the real devices a TOML config names.
    /// See deploy/ppud.example.toml for every key.
    Serve {
        /// Path of the TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print every problem found; exits non-zero if there are any.
    CheckConfig {
        /// Path of the TOML config.
        file: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Dev {
            listen,
            data_dir,
            time_scale,
            furnaces,
        } => {
            anyhow::ensure!(
                time_scale.is_finite() && time_scale > 0.0,
                "--time-scale must be a positive number"
            );
            let clock = Clock::new(time_scale);
            let lab = DevLab::start(clock, furnaces)
                .await
                .context("starting the simulated lab")?;
            let config = Config {
                listen,
                data_dir,
                time_scale,
                poll: Default::default(),
                devices: lab.device_configs(),
            };
            let poll = PollSettings {
                poll_interval: Duration::from_millis(250),
                reading_log_interval: Duration::from_secs(5),
            };
            println!(
                "ppud dev: simulated lab at time scale {time_scale}x, data in {}",
                config.data_dir.display()
            );
            for f in &lab.furnaces {
                println!(
                    "  device {}: simulated Eurotherm at modbus-tcp://{}",
                    f.id,
                    f.server.local_addr()
                );
            }
            run(config, poll, clock).await?;
            lab.shutdown().await;
            Ok(())
        }
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            let clock = Clock::new(config.time_scale);
            let poll = config.poll.settings();
            for d in &config.devices {
                println!("  device {}", d.id());
            }
            run(config, poll, clock).await
        }
        Command::CheckConfig { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let config: Config =
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let problems = config.problems();
            if problems.is_empty() {
                println!("{}: ok ({} devices)", file.display(), config.devices.len());
                Ok(())
            } else {
                for p in &problems {
                    println!("{}: {p}", file.display());
                }
                anyhow::bail!("{} problem(s) in {}", problems.len(), file.display())
            }
        }
    }
}

async fn run(config: Config, poll: PollSettings, clock: Clock) -> Result<()> {
    let drivers = config.drivers().map_err(anyhow::Error::msg)?;
    let daemon = Daemon::start(
        Options {
            listen: config.listen,
            data_dir: config.data_dir.clone(),
            clock,
            poll,
        },
        drivers,
    )
    .await?;
    // One line on stdout that scripts and tests can wait for.
    println!("listening on {}", daemon.addr());
    println!("  grpc: http://{}", daemon.addr());
    shutdown_signal().await;
    daemon.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
