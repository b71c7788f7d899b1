//! ppud as a SiLA 2 server (the "out" direction of SiLA support). Owns the SiLA endpoint: its
//! own listener (`[sila]`, `ppud dev`: 127.0.0.1:50052), served with the daemon's TLS under the
//! same listening rules as ppu.v1; the features it serves (`features`: SiLAService,
//! AuthorizationService, one generated feature per device family, ExperimentQueue) and their
//! handlers (`server_info`, `family`, `queue`); command executions as experiments
//! (`execution`); the one mapping of the core's errors to SiLA errors (`errors`); and mDNS
//! discovery (`mdns`).
//!
//! It is an edge like `server`: the same scheduler calls (a command is an experiment submitted
//! through `Scheduler::submit_as`, checked, journaled and recovered like any), behind the same
//! [`AuthLayer`] (tokens from `authorization: Bearer` or the AccessToken metadata, the same
//! roles, the same audit trail). What is SiLA-specific (FDL, Part B descriptors, framework
//! messages, the family mapping) lives in the `ppu-sila` crate.

mod codec;
mod endpoint;
mod errors;
mod execution;
mod family;
mod features;
mod mdns;
mod queue;
mod server_info;
mod values;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use family::SILA_COMMAND_LABEL;
pub use server_info::SERVER_TYPE;

use crate::auth::AuthLayer;
use crate::limits::{Limits, SubmitRate};
use crate::scheduler::Scheduler;
use crate::security::SilaSettings;
use endpoint::{Ctx, Endpoint};
use features::{Features, SilaMethods};
use server_info::Identity;

/// The running SiLA endpoint.
pub struct Serving {
    pub addr: SocketAddr,
    pub task: JoinHandle<Result<(), tonic::transport::Error>>,
    /// The mDNS advertisement, withdrawn when dropped.
    pub mdns: Option<mdns::Advert>,
}

/// What the endpoint serves with.
pub struct Setup {
    pub settings: SilaSettings,
    pub scheduler: Scheduler,
    /// Cancelled at shutdown: the server stops taking calls and every stream ends.
    pub stop: CancellationToken,
    /// ppu.v1's layer: its authenticator and store, with the endpoint's own method table.
    pub auth: AuthLayer,
    pub tls: Option<crate::tls::ReloadableTls>,
    pub limits: Limits,
    /// ppu.v1's submission buckets and open-stream slots: one `[limits]` over both edges.
    pub rate: Arc<SubmitRate>,
    pub streams: Arc<Semaphore>,
}

/// Serves SiLA 2 on `listener` until `setup.stop`.
pub async fn serve(listener: TcpListener, setup: Setup) -> Result<Serving, String> {
    let addr = listener
        .local_addr()
        .map_err(|e| format!("SiLA listener: {e}"))?;
    let features = Features::build(crate::schema::schema())?;
    let table = Arc::new(SilaMethods::new(&features));
    let identity = Identity::load(setup.scheduler.store(), &setup.settings.server_name)
        .await
        .map_err(|e| format!("SiLA server identity: {e}"))?;
    let feature_count = features.served.len();
    let ctx = Arc::new(Ctx {
        scheduler: setup.scheduler,
        stop: setup.stop.clone(),
        features,
        identity,
        limits: setup.limits,
        rate: setup.rate,
        streams: setup.streams,
        schema: crate::schema::schema(),
    });
    let name = ctx.identity.name();
    let uuid = ctx.identity.uuid.clone();
    let routes = tonic::service::Routes::from(
        tonic::service::Routes::default()
            .into_axum_router()
            .fallback_service(Endpoint { ctx }),
    );
    let secure = setup.tls.is_some();
    let router = tonic::transport::Server::builder()
        .layer(setup.auth.for_table(table))
        .add_routes(routes);
    let shutdown = setup.stop.clone();
    // TLS, when configured, is the daemon's reloadable acceptor (`crate::tls`): a SIGHUP
    // renews the SiLA endpoint's certificate along with ppu.v1's.
    let task = match setup.tls {
        Some(tls) => {
            let incoming = tls.incoming(listener, setup.stop.clone());
            tokio::spawn(async move {
                router
                    .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                    .await
            })
        }
        None => tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown.cancelled_owned(),
                )
                .await
        }),
    };
    info!(%addr, tls = secure, features = feature_count, server_uuid = %uuid, "serving SiLA 2");
    let mdns = if setup.settings.mdns {
        match mdns::Advert::start(&uuid, &name, addr) {
            Ok(a) => Some(a),
            Err(e) => {
                warn!(error = %e, "mDNS: could not advertise the SiLA server; serving without discovery");
                None
            }
        }
    } else {
        None
    };
    Ok(Serving { addr, task, mdns })
}
