//! The security tables of the config file: `[auth]`, `[tls]`, `[local]`, `[metrics]`, `[log]`,
//! `[limits]`, `[sila]` (the SiLA 2 endpoint: a listener under the same rules) and the
//! top-level `insecure_plaintext`. [`SecurityConfig::resolve`] reads the
//! files they name (token file, certificates) and returns the daemon's [`Security`], or every
//! problem found, so `ppud check-config` can report them all at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::auth::{Authenticator, Mode, Role, Tokens};
use crate::limits::Limits;
use crate::security::{
    DEFAULT_SILA_LISTEN, DEFAULT_SILA_SERVER_NAME, LocalSocket, Security, SilaSettings, TlsFiles,
    TlsPem, check_listen,
};

/// The security tables. Relative file paths resolve against the config file's directory.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SecurityConfig {
    /// Allow plain-text gRPC on a non-loopback address (also `ppud serve --insecure-plaintext`).
    #[serde(default)]
    pub insecure_plaintext: bool,
    pub auth: Option<AuthConfig>,
    pub tls: Option<TlsConfig>,
    pub local: Option<LocalConfig>,
    pub metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub limits: Limits,
    pub sila: Option<SilaConfig>,
    /// Directory of the config file, for relative paths.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// TOML file of `[[token]]` entries (principal, role, sha256).
    pub tokens_file: Option<PathBuf>,
    /// Run without authentication (loopback only).
    #[serde(default)]
    pub open: bool,
    #[serde(default = "yes")]
    pub protect_health: bool,
    #[serde(default = "yes")]
    pub protect_reflection: bool,
}

fn yes() -> bool {
    true
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CA of client certificates: set it for mutual TLS.
    pub client_ca_file: Option<PathBuf>,
}

/// `[local]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    pub socket: PathBuf,
    /// Octal file mode of the socket.
    #[serde(default = "mode_660")]
    pub mode: String,
    #[serde(default = "technician")]
    pub role: Role,
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
}

fn mode_660() -> String {
    "0660".into()
}

fn technician() -> Role {
    Role::Technician
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// `[sila]`: ppud as a SiLA 2 server, on its own listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilaConfig {
    /// Serve it; a present table is on unless it says `enabled = false`.
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_sila_listen")]
    pub listen: SocketAddr,
    /// SiLAService.ServerName until a client sets another (SetServerName, persisted).
    #[serde(default = "default_sila_server_name")]
    pub server_name: String,
    /// Advertise `_sila._tcp.local.` over mDNS.
    #[serde(default)]
    pub mdns: bool,
}

fn default_sila_listen() -> SocketAddr {
    DEFAULT_SILA_LISTEN
        .parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 50052)))
}

fn default_sila_server_name() -> String {
    DEFAULT_SILA_SERVER_NAME.to_owned()
}

/// `[log]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl SecurityConfig {
    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }

    fn read(&self, key: &str, p: &Path, problems: &mut Vec<String>) -> Option<Vec<u8>> {
        let full = self.path(p);
        match std::fs::read(&full) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                problems.push(format!("{key}: cannot read {}: {e}", full.display()));
                None
            }
        }
    }

    /// Reads every file the tables name and builds the daemon's [`Security`] for a daemon
    /// listening on `listen`; on failure, every problem found.
    pub fn resolve(&self, listen: SocketAddr) -> Result<Security, Vec<String>> {
        let mut problems = Vec::new();
        let mut auth = Authenticator::default();
        match &self.auth {
            None => problems.push(
                "auth: missing [auth] table: set tokens_file (see `ppud token`), or open = true \
                 for a loopback-only setup without authentication"
                    .to_owned(),
            ),
            Some(a) => {
                auth.protect_health = a.protect_health;
                auth.protect_reflection = a.protect_reflection;
                match (&a.tokens_file, a.open) {
                    (Some(_), true) => problems.push(
                        "auth: tokens_file and open = true contradict each other; choose one"
                            .to_owned(),
                    ),
                    (None, false) => problems
                        .push("auth: set tokens_file, or open = true (loopback only)".to_owned()),
                    (None, true) => auth.mode = Mode::Open,
                    (Some(file), false) => {
                        let full = self.path(file);
                        match Tokens::load(&full) {
                            Ok(t) if t.is_empty() => problems.push(format!(
                                "auth.tokens_file: {} has no [[token]] entries: nobody could \
                                 call the daemon",
                                full.display()
                            )),
                            Ok(t) => auth.mode = Mode::Tokens(t),
                            Err(e) => problems.push(format!("auth.tokens_file: {e}")),
                        }
                    }
                }
            }
        }
        let tls = self.tls.as_ref().and_then(|t| {
            let cert = self.read("tls.cert_file", &t.cert_file, &mut problems);
            let key = self.read("tls.key_file", &t.key_file, &mut problems);
            let client_ca = match &t.client_ca_file {
                Some(p) => Some(self.read("tls.client_ca_file", p, &mut problems)?),
                None => None,
            };
            Some(TlsPem {
                cert: cert?,
                key: key?,
                client_ca,
            })
        });
        if let Some(t) = &tls {
            for (key, pem, marker) in [
                ("tls.cert_file", &t.cert, "-----BEGIN CERTIFICATE-----"),
                ("tls.key_file", &t.key, "PRIVATE KEY-----"),
            ] {
                if !String::from_utf8_lossy(pem).contains(marker) {
                    problems.push(format!("{key}: not a PEM file (no `{marker}`)"));
                }
            }
        }
        let local = self.local.as_ref().and_then(|l| {
            match u32::from_str_radix(l.mode.trim_start_matches("0o"), 8) {
                Ok(mode) if mode <= 0o777 => Some(LocalSocket {
                    path: l.socket.clone(),
                    mode,
                    role: l.role,
                    allowed_uids: l.allowed_uids.clone(),
                }),
                _ => {
                    problems.push(format!(
                        "local.mode: {:?} is not an octal file mode such as \"0660\"",
                        l.mode
                    ));
                    None
                }
            }
        });
        if let Some(l) = &local
            && l.mode & 0o002 != 0
        {
            problems.push(
                "local.mode: world-writable: any user could connect; use 0660 and a group"
                    .to_owned(),
            );
        }
        problems.extend(self.limits.problems());
        let sila = self
            .sila
            .as_ref()
            .filter(|s| s.enabled)
            .map(|s| SilaSettings {
                listen: s.listen,
                server_name: s.server_name.clone(),
                mdns: s.mdns,
            });
        if let Some(s) = &sila {
            // SiLAService.ServerName is at most 255 characters (the standard's constraint).
            if s.server_name.trim().is_empty() || s.server_name.chars().count() > 255 {
                problems.push(
                    "sila.server_name: must be 1 to 255 characters (SiLAService.ServerName)"
                        .to_owned(),
                );
            }
        }
        let tls_files = self.tls.as_ref().map(|t| TlsFiles {
            cert: self.path(&t.cert_file),
            key: self.path(&t.key_file),
            client_ca: t.client_ca_file.as_deref().map(|p| self.path(p)),
        });
        let security = Security {
            auth,
            tls,
            tls_files,
            insecure_plaintext: self.insecure_plaintext,
            local,
            limits: self.limits.clone(),
            metrics_listen: self.metrics.as_ref().map(|m| m.listen),
            sila,
        };
        let open = self.auth.as_ref().is_some_and(|a| a.open);
        if let Err(why) = check_listen(listen, open, self.tls.is_some(), self.insecure_plaintext) {
            problems.push(format!("listen: {why}"));
        }
        if let Some(s) = &security.sila
            && let Err(why) =
                check_listen(s.listen, open, self.tls.is_some(), self.insecure_plaintext)
        {
            problems.push(format!("sila.listen: {why}"));
        }
        if problems.is_empty() {
            Ok(security)
        } else {
            Err(problems)
        }
    }
}
