//! Starting and stopping the daemon: open the store, recover, start device pollers and the
//! scheduler, serve gRPC; on shutdown stop in the reverse order and leave every device safe.
//! Recovery of in-flight work follows the configured policies (`config::Policies`).
//!
//! Listening follows [`Security`]: gRPC on TCP (TLS, optionally mutual, when configured;
//! plain text only on loopback unless explicitly allowed), optionally a Unix socket for local
//! tools, optionally a Prometheus endpoint, optionally the SiLA 2 endpoint (`crate::sila`, its
//! own listener under the same rules and TLS). The listening rules are checked before the store is
//! opened, so a refused configuration changes nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ppu_drivers::{Clock, Device};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::auth::{AuthLayer, LocalPolicy, Mode};
use crate::config::Policies;
use crate::devices::{Devices, PollSettings};
use crate::scheduler::Scheduler;
pub use crate::security::{LocalSocket, Security, TlsFiles, TlsPem, check_listen};
use crate::server::{self, Api};
use crate::store::{Store, StoreError};
use crate::tls::ReloadableTls;

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
    #[error("refusing to start: {0}")]
    Refused(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("local socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("SiLA 2 endpoint: {0}")]
    Sila(String),
}

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub clock: Clock,
    pub poll: PollSettings,
    pub security: Security,
}

/// A started daemon. Drop without [`Daemon::shutdown`] only to simulate a crash in tests.
pub struct Daemon {
    addr: SocketAddr,
    stop: CancellationToken,
    scheduler: Scheduler,
    scheduler_task: JoinHandle<()>,
    server_task: JoinHandle<Result<(), tonic::transport::Error>>,
    local_task: Option<(PathBuf, JoinHandle<Result<(), tonic::transport::Error>>)>,
    metrics_addr: Option<SocketAddr>,
    sila: Option<crate::sila::Serving>,
    liveness: Liveness,
    /// The token set the auth layer checks, shared with it: [`Daemon::reload`] swaps it.
    tokens: Option<crate::auth::Tokens>,
    /// The TLS configuration new connections get, shared with the acceptor: likewise.
    tls: Option<ReloadableTls>,
    /// The fleet tasks, only with a `[fleet]` section (nothing NATS-related runs without).
    fleet: Option<crate::fleet::Fleet>,
}

/// Longest a liveness check waits for a store read.
const LIVENESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the service watchdog checks before each ping (`ppud`'s `WATCHDOG=1`): the gRPC server
/// still serves and the store answers a read in time. That the check runs at all shows the
/// async runtime is not wedged. Holds no strong reference, so it never keeps the store open.
#[derive(Debug, Clone)]
pub struct Liveness {
    store: std::sync::Weak<Store>,
    server_ended: CancellationToken,
    stop: CancellationToken,
}

impl Liveness {
    /// `Ok` when the daemon is alive; else why not. While shutting down it is alive as long as
    /// the check runs: the stop may take minutes to leave every device safe.
    pub async fn check(&self) -> Result<(), String> {
        if self.stop.is_cancelled() {
            return Ok(());
        }
        if self.server_ended.is_cancelled() {
            return Err("the gRPC server has stopped".to_owned());
        }
        let Some(store) = self.store.upgrade() else {
            return Err("the store is closed".to_owned());
        };
        let read = tokio::task::spawn_blocking(move || store.event_count().map(|_| ()));
        match tokio::time::timeout(LIVENESS_TIMEOUT, read).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("the store cannot be read: {e}")),
            Ok(Err(e)) => Err(format!("the store read failed: {e}")),
            Err(_) => Err(format!(
                "a store read did not finish within {} s",
                LIVENESS_TIMEOUT.as_secs()
            )),
        }
    }
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
        opts.security
            .check_listen(opts.listen)
            .map_err(StartError::Refused)?;
        let fleet = policies
            .fleet_settings()
            .transpose()
            .map_err(|problems| StartError::Refused(problems.join("; ")))?;
        if let Some(sila) = &opts.security.sila {
            opts.security
                .check_listen(sila.listen)
                .map_err(|why| StartError::Refused(format!("[sila] listen: {why}")))?;
        }
        if matches!(opts.security.auth.mode, Mode::Open) {
            warn!(
                "AUTHENTICATION IS OFF: every caller is an admin. Fine for `ppud dev` on \
                 loopback; never on a lab network (configure [auth] tokens_file)"
            );
        }
        let tls = match &opts.security.tls {
            Some(pem) => Some(
                ReloadableTls::new(pem, opts.security.tls_files.clone())
                    .map_err(StartError::Tls)?,
            ),
            None => None,
        };
        std::fs::create_dir_all(&opts.data_dir).map_err(|source| StartError::DataDir {
            path: opts.data_dir.clone(),
            source,
        })?;
        let path = opts.data_dir.join(STORE_FILE);
        let store = tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        info!(data_dir = %opts.data_dir.display(), last_sequence = store.last_sequence(), "store open");
        // Reopens the store after an I/O error (a full disk) and clears the fault once writes
        // commit again; health follows it (`server::follow_storage_health`).
        store.supervise();
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
        for (id, alarms) in store.alarms()? {
            if let Some(d) = devices.get(&id) {
                d.restore_alarms(alarms);
            }
        }
        let (scheduler, scheduler_task) = Scheduler::start_with(
            store.clone(),
            devices.clone(),
            opts.clock,
            policies.recovery.clone(),
        )
        .await?;
        let stop = CancellationToken::new();
        devices.spawn_pollers(store, opts.poll, stop.clone());
        crate::allocator::spawn_trimmer(stop.clone());

        let server_ended = CancellationToken::new();
        let serving = match serve(&opts, &scheduler, &stop, tls.clone(), server_ended.clone()).await
        {
            Ok(serving) => serving,
            Err(e) => {
                // A failed start leaves nothing running: no task may keep the store open or
                // a device away from its safe state.
                stop.cancel();
                scheduler.shutdown(scheduler_task).await;
                scheduler.devices().all_safe(scheduler.store()).await;
                wait_for_release(&scheduler).await;
                return Err(e);
            }
        };
        let tokens = match &opts.security.auth.mode {
            Mode::Tokens(t) => Some(t.clone()),
            Mode::Open => None,
        };
        let fleet = fleet.map(|settings| crate::fleet::Fleet::start(settings, scheduler.clone()));
        let liveness = Liveness {
            store: Arc::downgrade(scheduler.store()),
            server_ended,
            stop: stop.clone(),
        };
        Ok(Daemon {
            addr: serving.addr,
            stop,
            scheduler,
            scheduler_task,
            server_task: serving.server_task,
            local_task: serving.local_task,
            metrics_addr: serving.metrics_addr,
            sila: serving.sila,
            liveness,
            tokens,
            tls,
            fleet,
        })
    }

    /// Whether the fleet tasks run (only with a `[fleet]` section).
    pub fn fleet_started(&self) -> bool {
        self.fleet.is_some()
    }

    /// Re-reads what may change without a restart (ppud's SIGHUP): the token file, and the
    /// TLS certificate, key and client CA. Calls from then on are checked against the new
    /// tokens and new connections get the new certificate; running steps, open streams,
    /// established connections and calls already admitted are not touched. Each is replaced
    /// only if its files are valid (the other may still be): returns what was reloaded, or
    /// with `Err` what was reloaded and every problem.
    pub fn reload(&self) -> Result<Vec<String>, (Vec<String>, String)> {
        let mut done = Vec::new();
        let mut problems = Vec::new();
        if let Some(tokens) = &self.tokens {
            match tokens.reload() {
                Ok(n) => {
                    if let Some(path) = tokens.source() {
                        done.push(format!("{n} tokens from {}", path.display()));
                    }
                }
                Err(e) => problems.push(format!("tokens: {e}")),
            }
        }
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(Some(what)) => done.push(what),
                Ok(None) => {}
                Err(e) => problems.push(format!("TLS: {e}")),
            }
        }
        if problems.is_empty() {
            Ok(done)
        } else {
            Err((done, problems.join("; ")))
        }
    }

    /// The check the service watchdog runs before each ping.
    pub fn liveness(&self) -> Liveness {
        self.liveness.clone()
    }

    /// Where SiLA 2 is served, when configured (useful with port 0).
    pub fn sila_addr(&self) -> Option<SocketAddr> {
        self.sila.as_ref().map(|s| s.addr)
    }

    /// Where Prometheus metrics are served, when configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
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
        // No new fleet work; what the log holds is published after the next start.
        if let Some(fleet) = self.fleet {
            fleet.stop().await;
        }
        self.stop.cancel();
        self.scheduler.shutdown(self.scheduler_task).await;
        self.scheduler
            .devices()
            .all_safe(self.scheduler.store())
            .await;
        match self.server_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "gRPC server error"),
            Err(e) => error!(error = %e, "gRPC server task failed"),
        }
        if let Some(sila) = self.sila {
            drop(sila.mdns);
            match sila.task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "SiLA server error"),
                Err(e) => error!(error = %e, "SiLA server task failed"),
            }
        }
        if let Some((path, task)) = self.local_task {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "local socket server error"),
                Err(e) => error!(error = %e, "local socket server task failed"),
            }
            let _ = std::fs::remove_file(&path);
        }
        // Pollers and stream tasks end on `stop` but may still be unwinding. redb allows one
        // open per file, so wait (bounded) until they have released the store: the data dir
        // can then be reopened at once, by a restart in the same process.
        wait_for_release(&self.scheduler).await;
        info!("stopped");
    }
}

/// Waits (bounded by [`RELEASE_WAIT`]) until background tasks ending on `stop` have released
/// the store: redb allows one open per file, so the data dir can then be reopened at once.
async fn wait_for_release(scheduler: &Scheduler) {
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    while !scheduler.is_sole_owner() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// What [`serve`] started.
struct Serving {
    addr: SocketAddr,
    server_task: JoinHandle<Result<(), tonic::transport::Error>>,
    local_task: Option<(PathBuf, JoinHandle<Result<(), tonic::transport::Error>>)>,
    metrics_addr: Option<SocketAddr>,
    sila: Option<crate::sila::Serving>,
}

/// Binds and serves gRPC on TCP (and the local socket, and metrics, when configured) until
/// `stop`.
async fn serve(
    opts: &Options,
    scheduler: &Scheduler,
    stop: &CancellationToken,
    tls: Option<ReloadableTls>,
    ended: CancellationToken,
) -> Result<Serving, StartError> {
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
    let sila_listener = match &opts.security.sila {
        Some(s) => Some(TcpListener::bind(s.listen).await.map_err(|source| {
            // Say which listener: a second `ppud dev` on one machine meets this first.
            StartError::Sila(format!(
                "cannot listen on {}: {source} ([sila] listen; ppud dev: --sila-listen ADDR \
                     or --no-sila)",
                s.listen
            ))
        })?),
        None => None,
    };
    let metrics_addr = match opts.security.metrics_listen {
        Some(addr) => {
            let endpoint = crate::metrics::MetricsEndpoint::bind(addr)
                .await
                .map_err(|source| StartError::Metrics { addr, source })?;
            let bound = endpoint.local_addr();
            endpoint.spawn(scheduler.clone(), stop.clone());
            info!(addr = %bound, "serving Prometheus metrics at /metrics");
            Some(bound)
        }
        None => None,
    };
    let api = Api::new(
        scheduler.clone(),
        stop.clone(),
        opts.security.limits.clone(),
    );
    let mut auth = opts.security.auth.clone();
    let local = match &opts.security.local {
        Some(local) => {
            let (listener, own_uid) = bind_local(local)?;
            auth.local = Some(LocalPolicy {
                role: local.role,
                allowed_uids: local.allowed_uids.clone(),
                own_uid,
            });
            Some((local.path.clone(), listener))
        }
        None => None,
    };
    let auth = AuthLayer::new(Arc::new(auth), scheduler.store().clone());
    // Both routers are built before either serves, so a bad certificate fails the start
    // with nothing listening.
    let secure = tls.is_some();
    let sila_tls = tls.clone();
    // TLS, when configured, is ours (`crate::tls`, reloadable): tonic serves its streams.
    let router = server::router(api.clone(), auth.clone(), None)
        .await
        .map_err(|e| StartError::Server(e.to_string()))?;
    let sila = match (sila_listener, &opts.security.sila) {
        (Some(listener), Some(settings)) => Some(
            crate::sila::serve(
                listener,
                crate::sila::Setup {
                    settings: settings.clone(),
                    scheduler: scheduler.clone(),
                    stop: stop.clone(),
                    auth: auth.clone(),
                    tls: sila_tls,
                    limits: opts.security.limits.clone(),
                    rate: api.shared_limits().0,
                    streams: api.shared_limits().1,
                },
            )
            .await
            .map_err(StartError::Sila)?,
        ),
        _ => None,
    };
    let local_task = match local {
        Some((path, listener)) => {
            let router = server::router(api.clone(), auth.clone(), None)
                .await
                .map_err(|e| StartError::Server(e.to_string()))?;
            let shutdown = stop.clone();
            info!(path = %path.display(), "serving gRPC on the local socket");
            Some((
                path,
                tokio::spawn(async move {
                    router
                        .serve_with_incoming_shutdown(
                            tokio_stream::wrappers::UnixListenerStream::new(listener),
                            shutdown.cancelled_owned(),
                        )
                        .await
                }),
            ))
        }
        None => None,
    };
    let shutdown = stop.clone();
    let shutdown = shutdown.cancelled_owned();
    let server_task = match tls {
        Some(tls) => {
            let incoming = tls.incoming(listener, stop.clone());
            tokio::spawn(async move {
                let served = router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await;
                ended.cancel();
                served
            })
        }
        None => tokio::spawn(async move {
            let served = router
                .serve_with_incoming_shutdown(
                    // tonic ignores its own tcp_nodelay for an incoming stream; without it a
                    // reply written in two pieces waits ~40 ms for the client's delayed ACK.
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown,
                )
                .await;
            ended.cancel();
            served
        }),
    };
    info!(%addr, tls = secure, "serving gRPC");
    Ok(Serving {
        addr,
        server_task,
        local_task,
        metrics_addr,
        sila,
    })
}

/// Binds the Unix socket with its file mode; returns it with the daemon's uid (the socket
/// file's owner). A stale socket left by a killed daemon is replaced; any other file at the
/// path is an error, never deleted.
fn bind_local(local: &LocalSocket) -> Result<(tokio::net::UnixListener, u32), StartError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let err = |source| StartError::Socket {
        path: local.path.clone(),
        source,
    };
    match std::fs::symlink_metadata(&local.path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(&local.path).map_err(err)?,
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; not touching it",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = tokio::net::UnixListener::bind(&local.path).map_err(err)?;
    std::fs::set_permissions(&local.path, std::fs::Permissions::from_mode(local.mode))
        .map_err(err)?;
    let uid = std::fs::metadata(&local.path).map_err(err)?.uid();
    Ok((listener, uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn liveness_fails_when_the_server_ends_or_the_store_is_gone_but_not_while_stopping() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join(STORE_FILE)).expect("store");
        let live = Liveness {
            store: Arc::downgrade(&store),
            server_ended: CancellationToken::new(),
            stop: CancellationToken::new(),
        };
        assert_eq!(live.check().await, Ok(()));
        live.server_ended.cancel();
        let why = live.check().await.expect_err("the server ended");
        assert!(why.contains("gRPC server"), "{why}");
        let live = Liveness {
            server_ended: CancellationToken::new(),
            ..live
        };
        drop(store);
        let why = live.check().await.expect_err("the store is gone");
        assert!(why.contains("store"), "{why}");
        // A stop in progress is alive for as long as the check runs.
        live.stop.cancel();
        assert_eq!(live.check().await, Ok(()));
    }
}
