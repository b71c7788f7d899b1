//! `ppu-sim mfc`: simulated mass-flow controllers on pseudo-terminals, standalone. Lives here,
//! beside the simulator; the family's plugin registration (`plugin.rs`) makes it a subcommand.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ppu_drivers::Clock;

use super::{MfcConfig, RunningMfc};
use crate::pty::FaultConfig;

/// Simulated Alicat-style mass-flow controllers, each on its own pseudo-terminal.
///
/// Point a driver or a terminal program at the printed paths (CR line endings). `A\r` polls
/// the data frame (`A +014.70 +025.00 +000.00 +000.00 +000.00 CO2`), `AS 50.0\r` sets the
/// setpoint, `AG8\r` selects gas 8 (N2). Prints `ID PATH` per controller, then runs until
/// Ctrl-C.
///
/// Example: ppu-sim mfc --count 2 --full-scale 500 --link-dir /tmp/ppu-tty
#[derive(clap::Args, Debug)]
pub struct MfcArgs {
    /// Number of controllers (mfc-1, mfc-2, …), each unit A on its own pty.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Full scale, SCCM.
    #[arg(long, default_value_t = 500.0)]
    pub full_scale: f64,
    /// Time constant of the flow response, physical s.
    #[arg(long, default_value_t = 0.5)]
    pub tau_s: f64,
    /// Flow reading noise, fraction of full scale.
    #[arg(long, default_value_t = 0.001)]
    pub noise: f64,
    /// Physical seconds per real second.
    #[arg(long, default_value_t = 1.0, env = "PPU_SIM_TIME_SCALE")]
    pub time_scale: f64,
    /// Create stable symlinks DIR/<id> to the ptys.
    #[arg(long)]
    pub link_dir: Option<PathBuf>,
    /// Instrument latency before each reply, ms.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Probability that a reply is lost (0–1).
    #[arg(long, default_value_t = 0.0)]
    pub no_reply: f64,
    /// Seed of the reading noise and the line faults.
    #[arg(long, default_value_t = 11)]
    pub seed: u64,
}

/// Runs the controllers until Ctrl-C.
pub async fn run(args: MfcArgs) -> Result<()> {
    if !(args.time_scale.is_finite() && args.time_scale > 0.0) {
        bail!("--time-scale must be a positive number");
    }
    if !(args.full_scale.is_finite() && args.full_scale > 0.0) {
        bail!("--full-scale must be a positive number of SCCM");
    }
    if !(0.0..=1.0).contains(&args.no_reply) {
        bail!("--no-reply must be a probability between 0 and 1");
    }
    if let Some(dir) = &args.link_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let clock = Clock::new(args.time_scale);
    let mut running = Vec::new();
    for i in 0..args.count {
        let seed = args.seed.wrapping_add(i as u64);
        let cfg = MfcConfig {
            full_scale: args.full_scale,
            tau_s: args.tau_s,
            noise_fs: args.noise,
            seed,
            ..MfcConfig::default()
        };
        let faults = FaultConfig {
            seed,
            no_reply: args.no_reply,
            latency: Duration::from_millis(args.latency_ms),
            ..FaultConfig::default()
        };
        let mfc = RunningMfc::start(
            format!("mfc-{}", i + 1),
            cfg,
            faults,
            args.link_dir.clone(),
            clock,
        )
        .await
        .context("opening a pseudo-terminal")?;
        println!("{} {}", mfc.id, mfc.path());
        running.push(mfc);
    }
    tracing::info!(
        count = running.len(),
        time_scale = args.time_scale,
        "mass-flow controllers running; Ctrl-C to stop"
    );
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    for mfc in running {
        mfc.shutdown().await;
    }
    Ok(())
}
