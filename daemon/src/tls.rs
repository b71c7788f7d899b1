//! TLS on the gRPC port with a certificate that can be replaced while serving (ppud's SIGHUP):
//! each new connection is accepted with the configuration current at its arrival, so a renewed
//! certificate (or client CA) applies to new connections at once while established ones run on
//! with the one they were accepted under. The gRPC server's own TLS fixes its configuration
//! when it starts, so the handshake happens here (with the same rustls) and the server (`app`)
//! serves the resulting streams, whose connection info names the peer's certificates as
//! before.

use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::security::{TlsFiles, TlsPem};

/// Real-time limit for a client to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const BACKLOG: usize = 64;

/// The rustls configuration for `pem`: its certificate chain and key, HTTP/2 by ALPN, and,
/// with a client CA, mutual TLS that requires a client certificate signed by it.
pub fn server_config(pem: &TlsPem) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.cert.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if certs.is_empty() {
        return Err("certificate: no CERTIFICATE in the PEM".to_owned());
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.key.as_slice())
        .map_err(|e| format!("key: {e}"))?
        .ok_or("key: no PRIVATE KEY in the PEM")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &pem.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
                let cert = cert.map_err(|e| format!("client CA: {e}"))?;
                roots.add(cert).map_err(|e| format!("client CA: {e}"))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS configuration new connections are accepted with, replaceable while serving. Clones
/// share it.
#[derive(Clone)]
pub struct ReloadableTls {
    current: Arc<RwLock<Arc<ServerConfig>>>,
    /// Where it was read from, for [`ReloadableTls::reload`]; none when given as bytes.
    files: Option<TlsFiles>,
}

impl std::fmt::Debug for ReloadableTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadableTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadableTls {
    pub fn new(pem: &TlsPem, files: Option<TlsFiles>) -> Result<ReloadableTls, String> {
        Ok(ReloadableTls {
            current: Arc::new(RwLock::new(server_config(pem)?)),
            files,
        })
    }

    /// Re-reads the files and, if they make a valid configuration, accepts new connections
    /// with it; on any problem the old one stays. Returns what was loaded (`None` without
    /// files).
    pub fn reload(&self) -> Result<Option<String>, String> {
        let Some(files) = &self.files else {
            return Ok(None);
        };
        let config = server_config(&files.read()?)?;
        match self.current.write() {
            Ok(mut g) => *g = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        Ok(Some(format!(
            "TLS certificate from {}",
            files.cert.display()
        )))
    }

    fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        TlsAcceptor::from(config)
    }

    /// TLS connections accepted on `listener` until `stop`, each handshaken on its own task
    /// (a slow client holds up nobody) under the configuration current when it arrived.
    pub fn incoming(
        &self,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = mpsc::channel(BACKLOG);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Per-connection failures (reset before accept, out of
                            // descriptors): keep serving, after a pause so a persistent one
                            // does not spin.
                            warn!(error = %e, "gRPC: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                // Without it a reply written in two pieces waits ~40 ms for the client's
                // delayed ACK.
                let _ = stream.set_nodelay(true);
                let acceptor = tls.acceptor();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}
