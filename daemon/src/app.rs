//! Starting and stopping the daemon: open the store, recover, start device pollers and the
//! scheduler, serve gRPC; on shutdown stop in the reverse order and leave every device safe.
//! Recovery of in-flight work follows the configured policies (`config::Policies`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ppu_drivers::{Clock, Device};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Policies;
use crate::devices::{Devices, PollSettings};
use crate::scheduler::Scheduler;
use crate::server::{self, Api};
use crate::store::{Store, StoreError};

/// Longest wait at shutdown for background tasks to release the store.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// File name of the store inside the data directory.
pub const STORE_FILE: &str = "ppu.redb";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC setup: {0}")]
    Server(String),
    #[error("device configuration: {0}")]
    Drivers(String),
}

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub clock: Clock,
    pub poll: PollSettings,
}

/// A started daemon. Drop without [`Daemon::shutdown`] only to simulate a crash in tests.
pub struct Daemon {
    addr: SocketAddr,
    stop: CancellationToken,
    scheduler: Scheduler,
    scheduler_task: JoinHandle<()>,
    server_task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Daemon {
    /// Opens the store, recovers interrupted work under the default policies, and starts
    /// serving.
    pub async fn start(opts: Options, drivers: Vec<Arc<dyn Device>>) -> Result<Daemon, StartError> {
        Self::start_with(opts, &Policies::default(), drivers).await
    }

    /// [`Daemon::start`] with the config file's policies (recovery, retries).
    pub async fn start_with(
        opts: Options,
        policies: &Policies,
        drivers: Vec<Arc<dyn Device>>,
    ) -> Result<Daemon, StartError> {
        std::fs::create_dir_all(&opts.data_dir).map_err(|source| StartError::DataDir {
            path: opts.data_dir.clone(),
            source,
        })?;
        let path = opts.data_dir.join(STORE_FILE);
        let store = tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        info!(data_dir = %opts.data_dir.display(), last_sequence = store.last_sequence(), "store open");
        for (id, state) in store.device_states()? {
            match drivers.iter().find(|d| d.info().id == id) {
                Some(d) => {
                    if let Err(e) = d.restore_state(&state) {
                        warn!(device = %id, error = %e, "could not restore the device's saved state");
                    }
                }
                None => info!(device = %id, "saved state for a device no longer configured"),
            }
        }
        let retry = policies.retry.clone();
        let devices = Devices::with_retry(drivers, |id| retry.policy(id));
        let (scheduler, scheduler_task) = Scheduler::start_with(
            store.clone(),
            devices.clone(),
            opts.clock,
            policies.recovery,
        )
        .await?;
        let stop = CancellationToken::new();
        devices.spawn_pollers(store, opts.poll, stop.clone());

        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: opts.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: opts.listen,
            source,
        })?;
        let router = server::router(Api {
            scheduler: scheduler.clone(),
            stop: stop.clone(),
        })
        .await
        .map_err(|e| StartError::Server(e.to_string()))?;
        let shutdown = stop.clone();
        let server_task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(
                    // tonic ignores its own tcp_nodelay for an incoming stream; without it a
                    // reply written in two pieces waits ~40 ms for the client's delayed ACK.
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown.cancelled_owned(),
                )
                .await
        });
        info!(%addr, "serving gRPC");
        Ok(Daemon {
            addr,
            stop,
            scheduler,
            scheduler_task,
            server_task,
        })
    }

    /// The bound gRPC address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The scheduler, for in-process collaborators such as the simulated lab's transfer robot.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Graceful stop: no new requests, running steps aborted and their experiments marked
    /// INTERRUPTED, every device driven to its safe state.
    pub async fn shutdown(self) {
        info!("shutting down");
        self.stop.cancel();
        self.scheduler.shutdown(self.scheduler_task).await;
        self.scheduler.devices().all_safe().await;
        match self.server_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "gRPC server error"),
            Err(e) => error!(error = %e, "gRPC server task failed"),
        }
        // Pollers and stream tasks end on `stop` but may still be unwinding. redb allows one
        // open per file, so wait (bounded) until they have released the store: the data dir
        // can then be reopened at once, by a restart in the same process.
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        while !self.scheduler.is_sole_owner() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        info!("stopped");
    }
}
