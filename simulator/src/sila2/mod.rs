//! The SiLA 2 instrument family as a simulator plugin: a simulated orbital shaker served by the
//! third-party `sila2` Python package (`simulator/sila/shaker.py`, its feature
//! `simulator/sila/ShakerController.sila.xml`), run as a child process on a loopback port.
//! The instrument is not written in Rust on purpose: the `sila2` driver family meets another
//! implementation of SiLA 2 than its own.
//!
//! `ppud dev` gets it as device `shaker-1` (instrument port 50053, or a free one when that is
//! taken) when a Python with `sila2` is found (`PPU_SILA_PYTHON`, else `python3`); otherwise
//! it logs one line and leaves the device out.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use clap::{Arg, ArgAction};
use futures_util::future::BoxFuture;
use ppu_drivers::Clock;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::registry::{DevDevice, Running, SimFamily};

/// The registration (`simulator/src/lib.rs`'s family list).
pub struct Sila2Family;

/// The registered family.
pub static SIM: Sila2Family = Sila2Family;

/// Id of `ppud dev`'s shaker.
pub const DEV_SHAKER: &str = "shaker-1";
/// The instrument port of `ppud dev`'s shaker.
pub const DEV_PORT: u16 = 50053;
/// Real time the instrument may take to start (importing `sila2` takes a second or two).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The instrument's script.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sila/shaker.py")
}

/// A Python that can `import sila2`: `PPU_SILA_PYTHON` if set, else `python3`; `Err` says
/// why there is none.
pub fn python() -> Result<PathBuf, String> {
    let candidate = std::env::var_os("PPU_SILA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"));
    match std::process::Command::new(&candidate)
        .args(["-c", "import sila2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(candidate),
        Ok(_) => Err(format!(
            "{} cannot import sila2 (set PPU_SILA_PYTHON to a Python with `pip install sila2`)",
            candidate.display()
        )),
        Err(e) => Err(format!("{}: {e}", candidate.display())),
    }
}

/// A free loopback port (`preferred` when it is free).
pub fn free_port(preferred: Option<u16>) -> std::io::Result<u16> {
    if let Some(p) = preferred
        && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
    {
        return Ok(p);
    }
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// A running simulated shaker process.
pub struct RunningShaker {
    child: Child,
    pub port: u16,
}

impl RunningShaker {
    /// Starts the shaker on `port` with `python`, physical time `time_scale` times real time,
    /// and waits until it listens. It exits with this process (its stdin is a pipe from us).
    pub async fn start(python: &std::path::Path, port: u16, time_scale: f64) -> std::io::Result<Self> {
        Self::start_with(python, port, time_scale, &[]).await
    }

    /// [`RunningShaker::start`] with more arguments of `shaker.py` (`--no-cancel-controller`).
    pub async fn start_with(
        python: &std::path::Path,
        port: u16,
        time_scale: f64,
        args: &[&str],
    ) -> std::io::Result<Self> {
        let mut child = Command::new(python)
            .arg(script())
            .args(args)
            .args(["--port", &port.to_string()])
            .args(["--time-scale", &time_scale.to_string()])
            .arg("--exit-with-stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: a Ctrl-C at the terminal reaches ppud alone, which drives
            // the shaker safe before it closes our stdin; the instrument must outlive that.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let listening = tokio::time::timeout(START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("listening on") {
                    return true;
                }
            }
            false
        })
        .await;
        if listening != Ok(true) {
            let _ = child.kill().await;
            return Err(std::io::Error::other(format!(
                "the SiLA 2 shaker did not start on port {port} within {START_TIMEOUT:?}"
            )));
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, port })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the process (SIGKILL): an instrument that vanishes.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Stops it.
    pub async fn shutdown(mut self) {
        // Closing stdin asks it to leave; kill if it does not.
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    /// The `[[devices]]` table that points the real `sila2` driver at it.
    pub fn device_table(&self, id: &str) -> toml::Table {
        let mut t = toml::Table::new();
        t.insert("driver".into(), "sila2".into());
        t.insert("id".into(), id.into());
        t.insert("address".into(), format!("127.0.0.1:{}", self.port).into());
        t.insert("insecure".into(), true.into());
        t.insert("safe_command".into(), "ShakerController/Stop".into());
        t.insert("safe_property".into(), "ShakerController/CurrentSpeed".into());
        t.insert("safe_max".into(), 1.0.into());
        t
    }
}

impl Running for RunningShaker {
    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { RunningShaker::shutdown(*self).await })
    }
}

impl SimFamily for Sila2Family {
    fn name(&self) -> &'static str {
        "sila2"
    }

    fn command(&self) -> clap::Command {
        clap::Command::new("sila2")
            .about("A simulated SiLA 2 shaker (the sila2 Python package) on a loopback port")
            .arg(
                Arg::new("port")
                    .long("port")
                    .help("Loopback port to serve on (0: a free one, printed)")
                    .default_value("50053")
                    .value_parser(clap::value_parser!(u16)),
            )
            .arg(
                Arg::new("time_scale")
                    .long("time-scale")
                    .help("Physical seconds per real second")
                    .default_value("1")
                    .value_parser(clap::value_parser!(f64))
                    .action(ArgAction::Set),
            )
    }

    fn run(&self, args: clap::ArgMatches) -> BoxFuture<'static, anyhow::Result<()>> {
        Box::pin(async move {
            let port = match args.get_one::<u16>("port").copied().unwrap_or(DEV_PORT) {
                0 => free_port(None)?,
                p => p,
            };
            let scale = args.get_one::<f64>("time_scale").copied().unwrap_or(1.0);
            let python = python().map_err(anyhow::Error::msg)?;
            let shaker = RunningShaker::start(&python, port, scale).await?;
            println!("simulated SiLA 2 shaker on 127.0.0.1:{}", shaker.port);
            tokio::signal::ctrl_c().await?;
            shaker.shutdown().await;
            Ok(())
        })
    }

    fn start_dev(&self, clock: Clock) -> BoxFuture<'static, std::io::Result<Vec<DevDevice>>> {
        Box::pin(async move {
            let python = match python() {
                Ok(p) => p,
                Err(why) => {
                    tracing::warn!("no SiLA 2 shaker in the dev lab: {why}");
                    return Ok(Vec::new());
                }
            };
            let port = free_port(Some(DEV_PORT))?;
            let shaker = RunningShaker::start(&python, port, clock.scale()).await?;
            let description = format!(
                "simulated SiLA 2 shaker (sila2 Python package) on 127.0.0.1:{port}, plaintext"
            );
            Ok(vec![DevDevice {
                config: shaker.device_table(DEV_SHAKER),
                description,
                running: Box::new(shaker),
            }])
        })
    }
}
