//! Who may connect and how, as the daemon runs with it: the resolved `[auth]`, `[tls]`,
//! `[local]`, `[limits]` and `[metrics]` tables and the listening rules. The config edge builds
//! it (`config::security`); the app serves by it.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::auth::{Authenticator, Mode, Role};
use crate::limits::Limits;

/// The listening rules behind [`Security::check_listen`], on the facts they need.
pub fn check_listen(
    listen: SocketAddr,
    open: bool,
    tls: bool,
    insecure_plaintext: bool,
) -> Result<(), String> {
    if listen.ip().is_loopback() {
        return Ok(());
    }
    if open {
        return Err(format!(
            "{listen} is not a loopback address and authentication is off: anyone on the \
             network could drive the lab. Configure [auth] tokens_file, or listen on 127.0.0.1"
        ));
    }
    if !tls && !insecure_plaintext {
        return Err(format!(
            "{listen} is not a loopback address and no [tls] is configured: tokens and lab data \
             would cross the network in clear text. Configure [tls] cert_file and key_file, \
             listen on 127.0.0.1, or pass --insecure-plaintext (config: insecure_plaintext = \
             true) to accept the risk"
        ));
    }
    Ok(())
}

/// Server certificate and key, and for mutual TLS the CA that signs client certificates (PEM).
#[derive(Debug, Clone)]
pub struct TlsPem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

/// Where the TLS PEM files are, so a reload (SIGHUP) can read them again.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads the three files; an error names the one that failed.
    pub fn read(&self) -> Result<TlsPem, String> {
        let read = |key: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| format!("{key}: cannot read {}: {e}", p.display()))
        };
        Ok(TlsPem {
            cert: read("tls.cert_file", &self.cert)?,
            key: read("tls.key_file", &self.key)?,
            client_ca: match &self.client_ca {
                Some(p) => Some(read("tls.client_ca_file", p)?),
                None => None,
            },
        })
    }
}

/// The Unix socket for tools on this host.
#[derive(Debug, Clone)]
pub struct LocalSocket {
    pub path: PathBuf,
    /// File mode of the socket, e.g. 0o660.
    pub mode: u32,
    /// Role of a peer that connects without a token (own uid and root: admin).
    pub role: Role,
    /// Admitted peer uids besides the daemon's and root; empty admits any.
    pub allowed_uids: Vec<u32>,
}

/// Who may connect and how (config `[auth]`, `[tls]`, `[local]`, `[limits]`, `[metrics]`).
/// The default is what `ppud dev` runs with: open, plain text, loopback only.
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub auth: Authenticator,
    pub tls: Option<TlsPem>,
    /// Where `tls` was read from, for a reload; none when it was given as bytes.
    pub tls_files: Option<TlsFiles>,
    /// Allow plain-text gRPC on a non-loopback address.
    pub insecure_plaintext: bool,
    pub local: Option<LocalSocket>,
    pub limits: Limits,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The SiLA 2 endpoint (`[sila]`), if served.
    pub sila: Option<SilaSettings>,
}

/// Default address of the SiLA 2 endpoint: loopback only.
pub const DEFAULT_SILA_LISTEN: &str = "127.0.0.1:50052";

/// Default SiLAService.ServerName until a client sets one (SetServerName, persisted).
pub const DEFAULT_SILA_SERVER_NAME: &str = "ppud";

/// The SiLA 2 endpoint: its own listener, under the same listening rules, tokens, roles and
/// TLS as ppu.v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SilaSettings {
    pub listen: SocketAddr,
    /// SiLAService.ServerName until a client sets another with SetServerName (persisted in
    /// the store, which then wins).
    pub server_name: String,
    /// Advertise the server as `_sila._tcp.local.` over mDNS (SiLA 2 discovery).
    pub mdns: bool,
}

impl SilaSettings {
    /// The endpoint at `listen` with the default server name.
    pub fn at(listen: SocketAddr) -> SilaSettings {
        SilaSettings {
            listen,
            server_name: DEFAULT_SILA_SERVER_NAME.to_owned(),
            mdns: false,
        }
    }
}

impl Security {
    /// The listening rules: off loopback, plain text needs an explicit opt-in and an open
    /// daemon is never allowed. Returns the reason for a refusal.
    pub fn check_listen(&self, listen: SocketAddr) -> Result<(), String> {
        check_listen(
            listen,
            matches!(self.auth.mode, Mode::Open),
            self.tls.is_some(),
            self.insecure_plaintext,
        )
    }
}
