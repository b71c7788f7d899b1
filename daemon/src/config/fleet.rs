//! `[fleet]`: this lab as one of a fleet on NATS JetStream (issue 18, docs/fleet.md). Without
//! the table nothing NATS-related starts. Credentials are read from files or the table and are
//! never printed: `Debug` redacts the password.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default heartbeat of the lab registry, seconds.
const DEFAULT_HEARTBEAT_S: f64 = 2.0;
/// Default replicas of the fleet's streams and buckets (a 3-node cluster).
const DEFAULT_REPLICAS: usize = 3;
/// JetStream allows at most 5 replicas.
const MAX_REPLICAS: usize = 5;

/// The `[fleet]` table as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// NATS servers, `nats://host:port` (or `tls://`); a client reconnects to any of them.
    pub servers: Vec<String>,
    /// This lab's id in subjects and the registry; default the host name (its first label).
    pub lab: Option<String>,
    /// NATS user/password authentication.
    pub user: Option<String>,
    pub password: Option<String>,
    /// An nkey seed file (`SU…`): nkey authentication.
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT and seed): decentralised (operator) authentication.
    pub creds_file: Option<PathBuf>,
    pub tls: Option<FleetTlsConfig>,
    /// Replicas of the streams and buckets this lab creates when they do not exist yet.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Fleet experiments this lab holds at once (queued + running); default its device count.
    pub capacity: Option<usize>,
    /// Real seconds between registry heartbeats; the entry expires after three.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_s: f64,
}

/// `[fleet.tls]`: TLS to the NATS servers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetTlsConfig {
    /// CA that signed the servers' certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for servers that verify clients.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

fn default_replicas() -> usize {
    DEFAULT_REPLICAS
}

fn default_heartbeat() -> f64 {
    DEFAULT_HEARTBEAT_S
}

impl fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetConfig")
            .field("servers", &redacted_servers(&self.servers))
            .field("lab", &self.lab)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .field("tls", &self.tls)
            .field("replicas", &self.replicas)
            .field("capacity", &self.capacity)
            .field("heartbeat_s", &self.heartbeat_s)
            .finish()
    }
}

/// How the lab authenticates to NATS.
#[derive(Clone, PartialEq, Eq)]
pub enum FleetAuth {
    None,
    UserPassword { user: String, password: String },
    NkeySeedFile(PathBuf),
    CredsFile(PathBuf),
}

impl fmt::Debug for FleetAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FleetAuth::None => f.write_str("None"),
            FleetAuth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            FleetAuth::NkeySeedFile(p) => f.debug_tuple("NkeySeedFile").field(p).finish(),
            FleetAuth::CredsFile(p) => f.debug_tuple("CredsFile").field(p).finish(),
        }
    }
}

/// TLS to NATS, paths resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetTls {
    pub ca_file: Option<PathBuf>,
    pub client: Option<(PathBuf, PathBuf)>,
}

/// The fleet settings the daemon runs with ([`FleetConfig::resolve`], or `ppud dev --fleet`).
/// `Debug` redacts credentials, also those in a server URL.
#[derive(Clone)]
pub struct FleetSettings {
    pub servers: Vec<String>,
    pub lab: String,
    pub auth: FleetAuth,
    pub tls: Option<FleetTls>,
    pub replicas: usize,
    /// `None`: the number of devices.
    pub capacity: Option<usize>,
    pub heartbeat: Duration,
}

impl fmt::Debug for FleetSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetSettings")
            .field("servers", &redacted_servers(&self.servers))
            .field("lab", &self.lab)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("replicas", &self.replicas)
            .field("capacity", &self.capacity)
            .field("heartbeat", &self.heartbeat)
            .finish()
    }
}

impl FleetSettings {
    /// Settings for `servers` with every default (the host's lab id, no credentials).
    pub fn new(servers: Vec<String>) -> FleetSettings {
        FleetSettings {
            servers,
            lab: default_lab_id(),
            auth: FleetAuth::None,
            tls: None,
            replicas: DEFAULT_REPLICAS,
            capacity: None,
            heartbeat: Duration::from_secs_f64(DEFAULT_HEARTBEAT_S),
        }
    }
}

/// The servers for a log line: a password in a URL (`nats://user:pass@host`) is redacted.
pub fn redacted_servers(servers: &[String]) -> String {
    servers
        .iter()
        .map(|s| redact_url(s))
        .collect::<Vec<_>>()
        .join(",")
}

/// `url` with the password of its user info (if any) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    let user = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        // A bare token or user name may be a secret too.
        None => "***".to_owned(),
    };
    let sep = if scheme.is_empty() { "" } else { "://" };
    format!("{scheme}{sep}{user}@{host}")
}

/// The lab id from the host name: its first label, reduced to what a NATS subject token and a
/// KV key allow.
pub fn default_lab_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let first = host.trim().split('.').next().unwrap_or_default();
    let id: String = first
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if id.is_empty() { "lab".to_owned() } else { id }
}

/// Why `id` cannot be a lab id, if it cannot: it is a subject token (`ppu.<lab>.events…`) and
/// a KV key, and `work` is the work queue's token.
pub fn lab_id_problem(id: &str) -> Option<String> {
    if id.is_empty() {
        return Some("must not be empty".to_owned());
    }
    if id.len() > 64 {
        return Some(format!("{id:?} is longer than 64 characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Some(format!(
            "{id:?} has {c:?}; a lab id is letters, digits, '-' and '_' (it is a NATS subject \
             token and a registry key)"
        ));
    }
    if id == "work" {
        return Some("\"work\" is the work queue's subject token".to_owned());
    }
    None
}

/// Why `url` cannot be a NATS server address, if it cannot.
pub fn server_problem(url: &str) -> Option<String> {
    let rest = ["nats://", "tls://"]
        .iter()
        .find_map(|s| url.strip_prefix(s))
        .or_else(|| (!url.contains("://")).then_some(url));
    let Some(rest) = rest else {
        return Some(format!(
            "{url:?}: expected nats://HOST:PORT or tls://HOST:PORT"
        ));
    };
    let host_port = rest.rsplit('@').next().unwrap_or(rest);
    match host_port.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => None,
        _ if !host_port.is_empty() && !host_port.contains(':') => None,
        _ => Some(format!("{url:?}: expected nats://HOST:PORT")),
    }
}

impl FleetConfig {
    /// The settings, relative paths resolved against `base_dir`; or every problem, each
    /// starting with its key path (`fleet.servers[1]: …`).
    pub fn resolve(&self, base_dir: &Path) -> Result<FleetSettings, Vec<String>> {
        let mut out = Vec::new();
        if self.servers.is_empty() {
            out.push("fleet.servers: name at least one NATS server (nats://HOST:PORT)".to_owned());
        }
        for (i, s) in self.servers.iter().enumerate() {
            if let Some(p) = server_problem(s) {
                out.push(format!("fleet.servers[{i}]: {p}"));
            }
        }
        let lab = self.lab.clone().unwrap_or_else(default_lab_id);
        if let Some(p) = lab_id_problem(&lab) {
            out.push(format!("fleet.lab: {p}"));
        }
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            out.push(format!(
                "fleet.replicas: {} is not between 1 and {MAX_REPLICAS}",
                self.replicas
            ));
        }
        if self.capacity == Some(0) {
            out.push(
                "fleet.capacity: must be at least 1 (leave it out for the device count)".to_owned(),
            );
        }
        if !(self.heartbeat_s.is_finite() && (0.1..=60.0).contains(&self.heartbeat_s)) {
            out.push(format!(
                "fleet.heartbeat_s: {} is not between 0.1 and 60",
                self.heartbeat_s
            ));
        }
        let file = |key: &str, p: &Path, out: &mut Vec<String>| {
            let path = base_dir.join(p);
            if let Err(e) = std::fs::metadata(&path) {
                out.push(format!("fleet.{key}: {}: {e}", path.display()));
            }
            path
        };
        let mut ways = Vec::new();
        if self.user.is_some() || self.password.is_some() {
            ways.push("user/password");
        }
        if self.nkey_seed_file.is_some() {
            ways.push("nkey_seed_file");
        }
        if self.creds_file.is_some() {
            ways.push("creds_file");
        }
        if ways.len() > 1 {
            out.push(format!(
                "fleet.{}: choose one way to authenticate, not {}",
                ways[1].split('/').next().unwrap_or(ways[1]),
                ways.join(" and ")
            ));
        }
        let auth = match (
            &self.user,
            &self.password,
            &self.nkey_seed_file,
            &self.creds_file,
        ) {
            (Some(user), Some(password), _, _) => FleetAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            },
            (Some(_), None, _, _) => {
                out.push("fleet.password: user is set without a password".to_owned());
                FleetAuth::None
            }
            (None, Some(_), _, _) => {
                out.push("fleet.user: password is set without a user".to_owned());
                FleetAuth::None
            }
            (None, None, Some(seed), _) => {
                FleetAuth::NkeySeedFile(file("nkey_seed_file", seed, &mut out))
            }
            (None, None, None, Some(creds)) => {
                FleetAuth::CredsFile(file("creds_file", creds, &mut out))
            }
            (None, None, None, None) => FleetAuth::None,
        };
        let tls = self.tls.as_ref().map(|t| {
            let ca_file = t.ca_file.as_ref().map(|p| file("tls.ca_file", p, &mut out));
            let client = match (&t.cert_file, &t.key_file) {
                (Some(c), Some(k)) => Some((
                    file("tls.cert_file", c, &mut out),
                    file("tls.key_file", k, &mut out),
                )),
                (Some(_), None) => {
                    out.push("fleet.tls.key_file: cert_file is set without key_file".to_owned());
                    None
                }
                (None, Some(_)) => {
                    out.push("fleet.tls.cert_file: key_file is set without cert_file".to_owned());
                    None
                }
                (None, None) => None,
            };
            FleetTls { ca_file, client }
        });
        if !out.is_empty() {
            return Err(out);
        }
        Ok(FleetSettings {
            servers: self.servers.clone(),
            lab,
            auth,
            tls,
            replicas: self.replicas,
            capacity: self.capacity,
            heartbeat: Duration::from_secs_f64(self.heartbeat_s),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> FleetConfig {
        toml::from_str(text).expect("parses")
    }

    #[test]
    fn the_password_is_never_printed() {
        let c =
            parse("servers = [\"nats://127.0.0.1:4222\"]\nuser = \"lab\"\npassword = \"s3cret\"\n");
        assert!(!format!("{c:?}").contains("s3cret"));
        let s = c.resolve(Path::new(".")).expect("valid");
        assert!(!format!("{s:?}").contains("s3cret"), "{s:?}");
        assert!(format!("{s:?}").contains("<redacted>"));
    }

    #[test]
    fn problems_name_the_key() {
        let c = parse(
            "servers = [\"http://x\", \"nats://h:4222\"]\nlab = \"a.b\"\nreplicas = 7\n\
             capacity = 0\nuser = \"u\"\ncreds_file = \"/nonexistent.creds\"\n",
        );
        let p = c.resolve(Path::new(".")).expect_err("invalid");
        for key in [
            "fleet.servers[0]:",
            "fleet.lab:",
            "fleet.replicas:",
            "fleet.capacity:",
            "fleet.password:",
            "fleet.creds_file: choose one way",
        ] {
            assert!(p.iter().any(|m| m.starts_with(key)), "{key} in {p:?}");
        }
    }

    #[test]
    fn passwords_in_server_urls_are_redacted() {
        assert_eq!(
            redact_url("nats://lab:s3cret@10.0.0.1:4222"),
            "nats://lab:***@10.0.0.1:4222"
        );
        assert_eq!(redact_url("nats://tok@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn defaults_apply() {
        let s = parse("servers = [\"nats://127.0.0.1:4222\"]\n")
            .resolve(Path::new("."))
            .expect("valid");
        assert_eq!(s.replicas, 3);
        assert_eq!(s.capacity, None);
        assert_eq!(s.heartbeat, Duration::from_secs(2));
        assert_eq!(lab_id_problem(&s.lab), None, "{}", s.lab);
        assert_eq!(s.auth, FleetAuth::None);
    }
}
