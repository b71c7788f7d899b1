//! Simulated device families as plugins. A family registers with one line in `lib.rs`'s
//! family list and so gets its `ppu-sim` subcommand and its place in `ppud dev`'s lab: the
//! binary and the dev lab iterate over [`families`] and never name a family.

use futures_util::future::BoxFuture;
use ppu_drivers::Clock;

/// A simulated family.
pub trait SimFamily: Sync {
    /// The family's name (its `ppu-sim` subcommand).
    fn name(&self) -> &'static str;

    /// The `ppu-sim <name>` subcommand, with its arguments and help.
    fn command(&self) -> clap::Command;

    /// Runs the subcommand until Ctrl-C.
    fn run(&self, args: clap::ArgMatches) -> BoxFuture<'static, anyhow::Result<()>>;

    /// Starts the family's contribution to `ppud dev`'s lab on `clock`: its simulated devices,
    /// each with the `[[devices]]` table that points the real driver at it.
    fn start_dev(&self, clock: Clock) -> BoxFuture<'static, std::io::Result<Vec<DevDevice>>>;
}

/// One simulated device of the dev lab.
pub struct DevDevice {
    /// Its `[[devices]]` table, `driver` key included, as a ppud.toml would hold it.
    pub config: toml::Table,
    /// One line for `ppud dev`'s start-up listing ("simulated … on /dev/pts/7").
    pub description: String,
    /// The running simulation, stopped with the lab.
    pub running: Box<dyn Running>,
}

/// A running simulated device.
pub trait Running: Send + Sync {
    /// Stops it.
    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// Every registered simulated family, in registration order.
pub fn families() -> impl Iterator<Item = &'static dyn SimFamily> {
    crate::SIM_FAMILIES.iter().copied()
}

/// The registered family `name`.
pub fn family(name: &str) -> Option<&'static dyn SimFamily> {
    families().find(|f| f.name() == name)
}
