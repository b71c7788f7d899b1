//! The MFC family as a simulator plugin: its `ppu-sim mfc` subcommand and its place in
//! `ppud dev`'s lab (one controller, `mfc-1`, configured for the real `alicat` driver).

use clap::{Args, FromArgMatches};
use futures_util::future::BoxFuture;
use ppu_drivers::Clock;

use super::cli::{self, MfcArgs};
use super::{MfcConfig, RunningMfc};
use crate::pty::FaultConfig;
use crate::registry::{DevDevice, Running, SimFamily};

/// The registration (`simulator/src/lib.rs`'s family list).
pub struct MfcFamily;

/// Id of `ppud dev`'s controller.
pub const DEV_MFC: &str = "mfc-1";

/// Gases `ppud dev`'s controller is plumbed for.
pub const DEV_GASES: [&str; 3] = ["CO2", "N2", "Ar"];

impl SimFamily for MfcFamily {
    fn name(&self) -> &'static str {
        "mfc"
    }

    fn command(&self) -> clap::Command {
        MfcArgs::augment_args(clap::Command::new("mfc").about(
            "Simulated Alicat-style mass-flow controllers, each on its own pseudo-terminal",
        ))
    }

    fn run(&self, args: clap::ArgMatches) -> BoxFuture<'static, anyhow::Result<()>> {
        Box::pin(async move { cli::run(MfcArgs::from_arg_matches(&args)?).await })
    }

    fn start_dev(&self, clock: Clock) -> BoxFuture<'static, std::io::Result<Vec<DevDevice>>> {
        Box::pin(async move {
            let cfg = MfcConfig {
                noise_fs: 0.001,
                ..MfcConfig::default()
            };
            let full_scale = cfg.full_scale;
            let mfc = RunningMfc::start(DEV_MFC, cfg, FaultConfig::default(), None, clock).await?;
            let mut config = toml::Table::new();
            config.insert("driver".into(), "alicat".into());
            config.insert("id".into(), DEV_MFC.into());
            config.insert("port".into(), mfc.path().into());
            config.insert("full_scale_sccm".into(), full_scale.into());
            config.insert(
                "gases".into(),
                toml::Value::Array(DEV_GASES.iter().map(|g| (*g).into()).collect()),
            );
            let description = format!(
                "simulated Alicat mass-flow controller ({full_scale} sccm, {}) on {}",
                DEV_GASES.join("/"),
                mfc.path()
            );
            Ok(vec![DevDevice {
                config,
                description,
                running: Box::new(mfc),
            }])
        })
    }
}

impl Running for RunningMfc {
    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { RunningMfc::shutdown(*self).await })
    }
}
