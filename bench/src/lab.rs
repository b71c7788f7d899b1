//! The in-process daemon the submit and campaign figures run against: the real `Daemon` (store,
//! scheduler, gRPC server) on `ppud dev`'s simulated lab — furnaces behind real Modbus TCP
//! sockets and, for a full lab, the dispensing station on real pseudo-terminals, a sorption
//! analyser behind an MQTT broker and the transfer robot — reached through the real drivers,
//! started the way `ppud dev` and the end-to-end tests start it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ppu_daemon::app::{Daemon, Security};
use ppu_daemon::config::Policies;
use ppu_daemon::dev::{DevLab, TransferRobot};
use ppu_daemon::devices::PollSettings;
use ppu_daemon::scheduler::Scheduler;
use ppu_drivers::Clock;
use tonic::transport::Channel;

/// Which simulated lab to start.
#[derive(Debug, Clone, Copy)]
pub struct LabConfig {
    /// Physical seconds per real second.
    pub time_scale: f64,
    pub furnaces: usize,
    /// Adds the dispensing station, one sorption analyser and the robot that carries samples.
    pub full: bool,
    /// Time the robot takes per transfer, physical (on the lab's clock, like every move in
    /// the lab: a fixed real-time delay would be the campaign's floor at a high time scale).
    pub transfer_delay: Duration,
}

/// The security settings of every daemon the bench starts (in-process or as a child process),
/// set explicitly rather than left to the defaults: open loopback, no TLS, and the limits
/// below. The bench measures throughput, not abuse, so there is no per-principal submission
/// rate limit (`submit_per_minute = 0`); the full run once failed at its first figure when a
/// default limit came in after the bench. `max_streams`: `None` leaves room for the events
/// figure's 100 subscribers and more.
pub fn bench_security(max_streams: Option<usize>) -> Security {
    let mut security = Security::default();
    security.limits.submit_per_minute = 0; // 0: no limit
    security.limits.max_streams = max_streams.unwrap_or(BENCH_MAX_STREAMS);
    security.limits.max_batch_experiments = 10_000;
    security
}

/// `max_streams` of the bench's daemons unless a figure sets its own.
const BENCH_MAX_STREAMS: usize = 1024;

pub struct Lab {
    daemon: Option<Daemon>,
    devlab: Arc<DevLab>,
    robot: Option<TransferRobot>,
}

impl Lab {
    pub async fn start(data_dir: &Path, config: LabConfig) -> Result<Lab> {
        Self::start_with(data_dir, config, &Policies::default()).await
    }

    /// [`Lab::start`] with the daemon's policies (the fleet figures set `[fleet]`).
    pub async fn start_with(
        data_dir: &Path,
        config: LabConfig,
        policies: &Policies,
    ) -> Result<Lab> {
        let clock = Clock::new(config.time_scale);
        let mut devlab = DevLab::start(clock, config.furnaces)
            .await
            .context("starting the simulated furnaces")?;
        if config.full {
            devlab
                .add_analysers(1)
                .await
                .context("starting the simulated analyser and its MQTT broker")?;
            devlab
                .add_dispensing_station()
                .await
                .context("starting the simulated dispensing station")?;
        }
        // ppud dev's polling: status reads keep running during the figures, as in a lab.
        let poll = PollSettings {
            poll_interval: Duration::from_millis(250),
            reading_log_interval: Duration::from_secs(5),
        };
        let daemon = devlab
            .start_secured_daemon(
                "127.0.0.1:0".parse()?,
                data_dir,
                poll,
                policies,
                bench_security(None),
            )
            .await
            .context("starting the daemon")?;
        let devlab = Arc::new(devlab);
        let robot = config.full.then(|| {
            TransferRobot::start_physical(
                devlab.clone(),
                daemon.scheduler().clone(),
                config.transfer_delay.as_secs_f64(),
            )
        });
        Ok(Lab {
            daemon: Some(daemon),
            devlab,
            robot,
        })
    }

    /// A new gRPC connection to the daemon.
    pub async fn channel(&self) -> Result<Channel> {
        let addr = self
            .daemon
            .as_ref()
            .map(Daemon::addr)
            .context("daemon stopped")?;
        Ok(Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?)
    }

    /// The daemon's scheduler (and through it, its store).
    pub fn scheduler(&self) -> Result<&Scheduler> {
        self.daemon
            .as_ref()
            .map(Daemon::scheduler)
            .context("daemon stopped")
    }

    /// Graceful shutdown: robot, daemon (devices to safe state), then the simulators.
    pub async fn stop(mut self) {
        if let Some(r) = self.robot.take() {
            r.stop().await;
        }
        if let Some(d) = self.daemon.take() {
            d.shutdown().await;
        }
        if let Ok(devlab) = Arc::try_unwrap(self.devlab) {
            devlab.shutdown().await;
        }
    }
}
