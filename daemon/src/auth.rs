//! Who may call what: bearer tokens mapped to a principal and a role, Unix-socket peers
//! identified by their credentials, and the one table that says which role may call which RPC.
//!
//! [`AuthLayer`] wraps the whole gRPC router (health and reflection included), so no handler
//! can be reached without passing it and a new RPC is denied until the table names it. For
//! every call it also assigns a request id (carried in the log span and the reply's
//! `x-request-id`), counts the call for metrics, and writes the audit trail: every mutating
//! call — and every refused attempt by an authenticated caller — becomes an
//! [`AuditRecord`](ppu_proto::v1::AuditRecord) event in the durable log before the reply goes
//! out. Tokens are stored and compared only as SHA-256 hashes and never logged.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use ppu_proto::v1 as pb;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::{Code, Status};
use tracing::{Instrument, info, warn};

use crate::store::Store;

/// The roles of the API, from least to most trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads everything, changes nothing.
    Viewer,
    /// A compute planner: submits batches and cancels its own experiments.
    Planner,
    /// A lab technician: runs the queue and the devices, cancels anything; does not submit.
    Technician,
    /// Everything.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Planner, Role::Technician, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Planner => "planner",
            Role::Technician => "technician",
            Role::Admin => "admin",
        }
    }

    /// The authorisation table: whether this role may make calls of kind `access`.
    /// (A planner's cancel is further limited to its own batches by the handler.)
    pub fn allows(self, access: Access) -> bool {
        use Access::*;
        match self {
            Role::Admin => true,
            Role::Technician => matches!(access, Read | Cancel | Operate),
            Role::Planner => matches!(access, Read | Submit | Cancel),
            Role::Viewer => matches!(access, Read),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?} (viewer, planner, technician or admin)"))
    }
}

/// What kind of call a method is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads state or streams it.
    Read,
    /// Adds work to the queue.
    Submit,
    /// Cancels an experiment.
    Cancel,
    /// Runs the lab: queue control, maintenance, alarms, transfers.
    Operate,
    /// Changes the daemon's own identity (SiLA's SetServerName): admin only.
    Administer,
    /// Not in the table: admin only (and then usually UNIMPLEMENTED).
    Unlisted,
}

impl Access {
    /// Mutating calls are audited.
    pub fn mutates(self) -> bool {
        !matches!(self, Access::Read)
    }
}

/// Which part of the API a method belongs to, for the health/reflection switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Api,
    Health,
    Reflection,
    /// Reads a SiLA 2 client makes without metadata, as the standard has it: SiLAService's
    /// properties and feature definitions (before it can send a token at all), which calls
    /// the AccessToken affects, and the follow-up calls of a command execution (`_Info`,
    /// `_Intermediate`, `_Result`, named by the execution's UUID; the token went with the
    /// command). A caller without credentials is an anonymous viewer; one with credentials is
    /// identified as anywhere else.
    TokenOptional,
}

/// Where an audit record of a mutating call is filed besides the log: the experiment or the
/// batch its target names, so a filtered event stream shows who acted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditTarget {
    Experiment,
    Batch,
    Neither,
}

/// The methods one gRPC surface serves: what kind of call each is, and where a caller's token
/// travels besides `authorization: Bearer`. ppu.v1 (with health and reflection) is
/// [`V1Methods`]; the SiLA 2 endpoint has its own table, built from the features it serves.
/// The layer, the principal resolution and the audit trail are the same for both.
pub trait MethodTable: Send + Sync + 'static {
    /// The kind of call `path` (`/package.Service/Method`) is; [`Access::Unlisted`] if unknown.
    fn access(&self, path: &str) -> Access;
    /// Which part of the API `path` belongs to (health and reflection may be left open).
    fn surface(&self, path: &str) -> Surface {
        let _ = path;
        Surface::Api
    }
    /// Where the audit record of a mutating call of `path` is filed.
    fn audit_target(&self, path: &str) -> AuditTarget {
        let _ = path;
        AuditTarget::Neither
    }
    /// The audit record's message for a call's status message (the SiLA endpoint's errors
    /// travel encoded; the record keeps them readable).
    fn audit_message(&self, message: &str) -> String {
        message.to_owned()
    }
    /// Request headers other than `authorization` that carry a credential (SiLA's AccessToken
    /// metadata): the layer removes them before the handler runs, like `authorization`.
    fn credential_headers(&self) -> &[&'static str] {
        &[]
    }
    /// The caller's token from those headers: `Ok(None)` when there is none, `Err(())` when
    /// one is there but malformed. Asked only when there is no `authorization` header.
    #[allow(clippy::result_unit_err)]
    fn token(&self, headers: &http::HeaderMap) -> Result<Option<String>, ()> {
        let _ = headers;
        Ok(None)
    }
}

/// The ppu.v1 API with grpc.health.v1 and server reflection: [`access_of`].
#[derive(Debug, Clone, Copy, Default)]
pub struct V1Methods;

impl MethodTable for V1Methods {
    fn access(&self, path: &str) -> Access {
        access_of(path)
    }

    fn surface(&self, path: &str) -> Surface {
        surface_of(path)
    }

    fn audit_target(&self, method: &str) -> AuditTarget {
        if method.ends_with("/SubmitBatch") {
            AuditTarget::Batch
        } else if method.starts_with("/ppu.v1.ExperimentService/")
            || method.ends_with("/MoveExperiment")
            || method.ends_with("/HoldExperiment")
            || method.ends_with("/ReleaseExperiment")
        {
            AuditTarget::Experiment
        } else {
            AuditTarget::Neither
        }
    }
}

/// The method table. Every RPC of ppu.v1, health and reflection is named here; anything else
/// is [`Access::Unlisted`].
pub fn access_of(path: &str) -> Access {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Access::Unlisted;
    };
    match (service, method) {
        ("grpc.health.v1.Health", "Check" | "Watch") => Access::Read,
        (
            "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection",
            "ServerReflectionInfo",
        ) => Access::Read,
        ("ppu.v1.ExperimentService", m) => match m {
            "SubmitBatch" => Access::Submit,
            "CancelExperiment" => Access::Cancel,
            "GetBatch" | "GetExperiment" | "ListExperiments" => Access::Read,
            _ => Access::Unlisted,
        },
        ("ppu.v1.QueueService", m) => match m {
            "GetQueue" | "ListTransfers" => Access::Read,
            "PauseQueue" | "ResumeQueue" | "AbortQueue" | "MoveExperiment" | "HoldExperiment"
            | "ReleaseExperiment" | "ConfirmTransfer" => Access::Operate,
            _ => Access::Unlisted,
        },
        ("ppu.v1.EventService", "StreamEvents") => Access::Read,
        ("ppu.v1.DeviceService", m) => match m {
            "ListDevices" | "GetDevice" | "WatchDevice" | "ListAlarms" | "GetSchema" => {
                Access::Read
            }
            "SetMaintenance" | "AcknowledgeAlarm" => Access::Operate,
            _ => Access::Unlisted,
        },
        _ => Access::Unlisted,
    }
}

fn surface_of(path: &str) -> Surface {
    if path.starts_with("/grpc.health.") {
        Surface::Health
    } else if path.starts_with("/grpc.reflection.") {
        Surface::Reflection
    } else {
        Surface::Api
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens.
// ---------------------------------------------------------------------------------------------

/// Prefix of every token `ppud token` makes: recognisable in a leaked-secret scan.
pub const TOKEN_PREFIX: &str = "ppu_";

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// One entry of the token file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    principal: String,
    role: Role,
    /// Hex SHA-256 of the token.
    sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// A principal and its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub principal: String,
    pub role: Role,
}

/// Identities by the SHA-256 of their token.
type ByHash = HashMap<[u8; 32], Identity>;

/// The known tokens, by the SHA-256 of the token. Clones share one set: [`Tokens::reload`]
/// (ppud's SIGHUP) swaps it for every clone at once, so the serving layer sees a changed token
/// file from its next call on, without a restart and without touching running work.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_hash: Arc<std::sync::RwLock<Arc<ByHash>>>,
    /// The file they were loaded from, for [`Tokens::reload`].
    source: Option<std::path::PathBuf>,
}

impl Tokens {
    fn with(by_hash: ByHash) -> Tokens {
        Tokens {
            by_hash: Arc::new(std::sync::RwLock::new(Arc::new(by_hash))),
            source: None,
        }
    }

    /// Reads a token file (`[[token]]` entries with principal, role and sha256).
    pub fn load(path: &Path) -> Result<Tokens, TokenFileError> {
        let mut tokens = Tokens::read(path)?;
        tokens.source = Some(path.to_owned());
        Ok(tokens)
    }

    fn read(path: &Path) -> Result<Tokens, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Tokens::parse(&text).map_err(|problems| TokenFileError::Invalid {
            path: path.display().to_string(),
            message: problems.join("; "),
        })
    }

    /// Re-reads the file these tokens were loaded from and, if it is valid and not empty,
    /// replaces the set for every clone: calls from then on are checked against the new file
    /// (a removed token is refused, an added one admitted); calls already admitted run on.
    /// On any problem the old set stays. Returns the number of tokens now known.
    pub fn reload(&self) -> Result<usize, TokenFileError> {
        let Some(path) = &self.source else {
            return Ok(self.len());
        };
        let fresh = Tokens::read(path)?;
        let map = fresh.snapshot();
        if map.is_empty() {
            return Err(TokenFileError::Invalid {
                path: path.display().to_string(),
                message: "no [[token]] entries: nobody could call the daemon; keeping the \
                          tokens loaded before"
                    .to_owned(),
            });
        }
        let n = map.len();
        match self.by_hash.write() {
            Ok(mut g) => *g = map,
            Err(poisoned) => *poisoned.into_inner() = map,
        }
        Ok(n)
    }

    /// The file the tokens were loaded from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    fn snapshot(&self) -> Arc<ByHash> {
        match self.by_hash.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Parses a token file; on failure returns every problem found.
    pub fn parse(text: &str) -> Result<Tokens, Vec<String>> {
        let file: TokenFile = toml::from_str(text).map_err(|e| vec![e.message().to_owned()])?;
        let mut problems = Vec::new();
        let mut by_hash = HashMap::new();
        for (i, t) in file.token.iter().enumerate() {
            let at = format!("token[{i}]");
            if t.principal.trim().is_empty() {
                problems.push(format!("{at}.principal: required"));
            }
            match parse_hash(&t.sha256) {
                Some(h) => {
                    let id = Identity {
                        principal: t.principal.clone(),
                        role: t.role,
                    };
                    if by_hash.insert(h, id).is_some() {
                        problems.push(format!("{at}.sha256: the same token is listed twice"));
                    }
                }
                None => problems.push(format!(
                    "{at}.sha256: expected 64 hex characters (the SHA-256 of the token; \
                     `ppud token` prints the entry)"
                )),
            }
        }
        if problems.is_empty() {
            Ok(Tokens::with(by_hash))
        } else {
            Err(problems)
        }
    }

    /// A token set from `(token, principal, role)` triples, for tests and `ppud dev --token`.
    pub fn from_plain<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str, Role)>) -> Tokens {
        Tokens::with(
            entries
                .into_iter()
                .map(|(t, p, role)| {
                    (
                        hash_token(t),
                        Identity {
                            principal: p.to_owned(),
                            role,
                        },
                    )
                })
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, token: &str) -> Option<Identity> {
        self.snapshot().get(&hash_token(token)).cloned()
    }
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// SHA-256 of a token.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random token: [`TOKEN_PREFIX`] and 32 bytes from the OS's random source, in hex.
pub fn generate_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("{TOKEN_PREFIX}{}", hex(&bytes)))
}

// ---------------------------------------------------------------------------------------------
// Authentication.
// ---------------------------------------------------------------------------------------------

/// How callers without a valid token are treated.
#[derive(Debug, Clone)]
pub enum Mode {
    /// No authentication: every caller is `anonymous` with the admin role (dev only).
    Open,
    /// Bearer tokens.
    Tokens(Tokens),
}

/// Who may use the local Unix socket without a token.
#[derive(Debug, Clone)]
pub struct LocalPolicy {
    /// Role of an admitted peer. Peers with the daemon's own uid or root are admins.
    pub role: Role,
    /// Admitted uids besides the daemon's own and root; empty admits any peer the socket's
    /// file mode lets in.
    pub allowed_uids: Vec<u32>,
    /// The daemon's effective uid.
    pub own_uid: u32,
}

/// The authentication settings of one daemon.
#[derive(Debug, Clone)]
pub struct Authenticator {
    pub mode: Mode,
    /// Whether grpc.health.v1 needs a token too.
    pub protect_health: bool,
    /// Whether server reflection needs a token too.
    pub protect_reflection: bool,
    /// Token-less access over the Unix socket.
    pub local: Option<LocalPolicy>,
}

impl Default for Authenticator {
    /// Open: what `ppud dev` and in-process tests run with unless they configure tokens.
    fn default() -> Self {
        Authenticator {
            mode: Mode::Open,
            protect_health: true,
            protect_reflection: true,
            local: None,
        }
    }
}

/// Why a call was refused before it reached a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Missing,
    Malformed,
    Unknown,
    PeerNotAllowed,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "no bearer token",
            Refusal::Malformed => "malformed authorization header",
            Refusal::Unknown => "unknown token",
            Refusal::PeerNotAllowed => "local peer uid not admitted",
        }
    }
}

/// How the caller reached the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    Mtls,
    Unix,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Mtls => "mtls",
            Transport::Unix => "unix",
        }
    }
}

/// The caller of one RPC, put in the request's extensions for handlers.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: String,
    pub role: Role,
    pub request_id: String,
    pub transport: Transport,
    /// What the call acted on, set by the handler for the audit record.
    target: Arc<Mutex<String>>,
    /// The method called, as the audit record names it; empty outside the layer.
    method: Arc<str>,
    /// Set by a handler that committed the call's success audit record together with its
    /// effects ([`Caller::success_audit`]): the layer then writes none of its own.
    audited: Arc<std::sync::atomic::AtomicBool>,
}

impl Caller {
    /// The caller of a request that did not come through [`AuthLayer`] (in-process use).
    pub fn internal() -> Caller {
        Caller {
            principal: "internal".into(),
            role: Role::Admin,
            request_id: String::new(),
            transport: Transport::Unix,
            target: Arc::default(),
            method: Arc::from(""),
            audited: Arc::default(),
        }
    }

    /// The audit record of this call succeeding on `target`, for a handler that commits it in
    /// the same transaction as the call's effects (one durable commit instead of two; the
    /// record is still on disk before the reply). `None` outside the layer. A handler that
    /// commits it calls [`Caller::mark_audited`].
    pub fn success_audit(&self, target: &str) -> Option<pb::AuditRecord> {
        if self.method.is_empty() {
            return None;
        }
        Some(pb::AuditRecord {
            principal: self.principal.clone(),
            role: self.role.as_str().to_owned(),
            method: self.method.to_string(),
            request_id: self.request_id.clone(),
            code: code_label(Code::Ok).to_owned(),
            message: String::new(),
            target: target.to_owned(),
            transport: self.transport.as_str().to_owned(),
        })
    }

    /// Says the success audit record was committed with the call's effects.
    pub fn mark_audited(&self) {
        self.audited
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn audited(&self) -> bool {
        self.audited.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The caller of `req`; [`Caller::internal`] when the layer did not run.
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::internal)
    }

    /// Names what the call acts on, for its audit record.
    pub fn set_target(&self, target: impl Into<String>) {
        if let Ok(mut t) = self.target.lock() {
            *t = target.into();
        }
    }

    fn target(&self) -> String {
        self.target.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// What the connection told us about the peer.
struct Peer {
    transport: Transport,
    uid: Option<u32>,
}

fn peer_of(req: &http::Request<Body>) -> Peer {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
    let ext = req.extensions();
    if let Some(uds) = ext.get::<UdsConnectInfo>() {
        return Peer {
            transport: Transport::Unix,
            uid: uds.peer_cred.map(|c| c.uid()),
        };
    }
    if let Some(tls) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() {
        let mtls = tls.peer_certs().is_some_and(|c| !c.is_empty());
        return Peer {
            transport: if mtls {
                Transport::Mtls
            } else {
                Transport::Tls
            },
            uid: None,
        };
    }
    Peer {
        transport: Transport::Tcp,
        uid: None,
    }
}

/// The bearer token of a request: `Ok(None)` when there is no authorization header.
fn bearer(req: &http::Request<Body>) -> Result<Option<&str>, Refusal> {
    let Some(value) = req.headers().get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| Refusal::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(Refusal::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(Refusal::Malformed);
    }
    Ok(Some(token))
}

/// The caller's token: `authorization: Bearer`, else what the surface's table finds in its own
/// credential headers.
fn token_of(req: &http::Request<Body>, table: &dyn MethodTable) -> Result<Option<String>, Refusal> {
    match bearer(req)? {
        Some(t) => Ok(Some(t.to_owned())),
        None => table.token(req.headers()).map_err(|()| Refusal::Malformed),
    }
}

impl Authenticator {
    /// Identifies the caller presenting `token` (see [`token_of`]) over `peer`, or says why
    /// not. Never looks at the method.
    fn identify(
        &self,
        token: Result<Option<String>, Refusal>,
        peer: &Peer,
    ) -> Result<Identity, Refusal> {
        if let Mode::Open = self.mode {
            return Ok(Identity {
                principal: "anonymous".into(),
                role: Role::Admin,
            });
        }
        let Mode::Tokens(tokens) = &self.mode else {
            return Err(Refusal::Unknown);
        };
        match token? {
            Some(token) => tokens.lookup(&token).ok_or(Refusal::Unknown),
            None => match (&self.local, peer.transport, peer.uid) {
                (Some(local), Transport::Unix, Some(uid)) => {
                    let role = if uid == 0 || uid == local.own_uid {
                        Role::Admin
                    } else if local.allowed_uids.is_empty() || local.allowed_uids.contains(&uid) {
                        local.role
                    } else {
                        return Err(Refusal::PeerNotAllowed);
                    };
                    Ok(Identity {
                        principal: format!("uid:{uid}"),
                        role,
                    })
                }
                _ => Err(Refusal::Missing),
            },
        }
    }

    fn needs_auth(&self, surface: Surface) -> bool {
        match surface {
            Surface::Api => true,
            Surface::Health => self.protect_health,
            Surface::Reflection => self.protect_reflection,
            Surface::TokenOptional => true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The layer.
// ---------------------------------------------------------------------------------------------

/// Header carrying the request id, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// Wraps the router: authenticate, authorise, trace, count, audit.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
    store: Arc<Store>,
    table: Arc<dyn MethodTable>,
}

impl AuthLayer {
    /// The layer of the ppu.v1 router ([`V1Methods`]).
    pub fn new(auth: Arc<Authenticator>, store: Arc<Store>) -> Self {
        Self::with_table(auth, store, Arc::new(V1Methods))
    }

    /// The same layer for another surface (the SiLA 2 endpoint): same tokens, roles and
    /// audit trail, that surface's method table.
    pub fn with_table(
        auth: Arc<Authenticator>,
        store: Arc<Store>,
        table: Arc<dyn MethodTable>,
    ) -> Self {
        AuthLayer { auth, store, table }
    }

    /// The same authenticator and store with another method table.
    pub fn for_table(&self, table: Arc<dyn MethodTable>) -> Self {
        Self::with_table(self.auth.clone(), self.store.clone(), table)
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower_service::Service<http::Request<Body>> for AuthService<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone that was made ready is the one that must serve this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        let started = std::time::Instant::now();
        let path = req.uri().path().to_owned();
        let request_id = req
            .headers()
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| valid_request_id(v))
            .map(str::to_owned)
            .unwrap_or_else(|| ulid::Ulid::new().to_string());
        let access = layer.table.access(&path);
        let surface = layer.table.surface(&path);
        let peer = peer_of(&req);
        let token = token_of(&req, layer.table.as_ref());
        let anonymous = || {
            Ok(Identity {
                principal: "anonymous".into(),
                role: Role::Viewer,
            })
        };
        let identity = match surface {
            Surface::TokenOptional if matches!(token, Ok(None)) => anonymous(),
            s if layer.auth.needs_auth(s) => layer.auth.identify(token, &peer),
            _ => anonymous(),
        };
        // Nothing downstream needs the credential; drop it so no later layer can log it.
        req.headers_mut().remove(http::header::AUTHORIZATION);
        for h in layer.table.credential_headers() {
            req.headers_mut().remove(*h);
        }
        let span = tracing::info_span!(
            "rpc",
            request_id = %request_id,
            method = %path,
            principal = tracing::field::Empty,
        );
        let fut = async move {
            let identity = match identity {
                Ok(id) => id,
                Err(why) => {
                    warn!(
                        transport = peer.transport.as_str(),
                        reason = why.as_str(),
                        "refused: unauthenticated"
                    );
                    let status = Status::unauthenticated(
                        "missing or invalid credentials: send `authorization: Bearer <token>`",
                    );
                    return Ok(finish(status.into_http(), &path, &request_id, started));
                }
            };
            tracing::Span::current().record("principal", identity.principal.as_str());
            let caller = Caller {
                principal: identity.principal.clone(),
                role: identity.role,
                request_id: request_id.clone(),
                transport: peer.transport,
                target: Arc::default(),
                method: Arc::from(path.as_str()),
                audited: Arc::default(),
            };
            if !identity.role.allows(access) {
                let status = Status::permission_denied(format!(
                    "role {} may not call {path}",
                    identity.role
                ));
                warn!(role = %identity.role, "refused: permission denied");
                if access.mutates() {
                    audit(
                        &layer.store,
                        &caller,
                        &path,
                        layer.table.audit_target(&path),
                        Code::PermissionDenied,
                        status.message(),
                    )
                    .await;
                }
                return Ok(finish(status.into_http(), &path, &request_id, started));
            }
            req.extensions_mut().insert(caller.clone());
            let resp = undecodable_is_invalid_argument(
                oversized_is_resource_exhausted(inner.call(req).await?),
                &path,
            );
            if access.mutates() {
                // A handler's error travels as a trailers-only reply: grpc-status in the
                // headers. A success puts grpc-status 0 in the trailers, after the body.
                let (code, message) = match Status::from_header_map(resp.headers()) {
                    Some(s) => (s.code(), s.message().to_owned()),
                    None => (Code::Ok, String::new()),
                };
                if code == Code::Ok && caller.audited() {
                    info!(code = code_label(code), role = %identity.role, "mutating call");
                    return Ok(finish(resp, &path, &request_id, started));
                }
                audit(
                    &layer.store,
                    &caller,
                    &path,
                    layer.table.audit_target(&path),
                    code,
                    &layer.table.audit_message(&message),
                )
                .await;
                info!(code = code_label(code), role = %identity.role, "mutating call");
            }
            Ok(finish(resp, &path, &request_id, started))
        };
        Box::pin(fut.instrument(span))
    }
}

/// tonic reports a message over the size limit as OUT_OF_RANGE; gRPC's own implementations
/// (and the API's contract) say RESOURCE_EXHAUSTED, which clients treat as "too big, don't
/// retry as is".
fn oversized_is_resource_exhausted(resp: http::Response<Body>) -> http::Response<Body> {
    match Status::from_header_map(resp.headers()) {
        Some(s) if s.code() == Code::OutOfRange && s.message().contains("length too large") => {
            Status::resource_exhausted(format!("{} (limits.max_message_bytes)", s.message()))
                .into_http()
        }
        _ => resp,
    }
}

/// What tonic says, as INTERNAL, when a request body does not decode: Protobuf errors (prost's
/// `DecodeError`, field path included: invalid UTF-8, truncation, nesting too deep), bad gRPC
/// framing, a truncated frame, a missing message, a body that does not decompress. No handler
/// of this daemon reports INTERNAL with these words.
const DECODE_FAILURES: [&str; 5] = [
    "failed to decode Protobuf message",
    "protocol error: received message with",
    "Unexpected EOF decoding stream",
    "Missing request message",
    "Error decompressing",
];

/// A request that does not decode is the client's error: INVALID_ARGUMENT with a short reason,
/// counted in `ppu_grpc_decode_errors_total{method}`, instead of tonic's INTERNAL (a server
/// fault clients would retry). Decoding happens before the handler runs, so the status is
/// always a trailers-only reply, in the headers.
fn undecodable_is_invalid_argument(resp: http::Response<Body>, path: &str) -> http::Response<Body> {
    match Status::from_header_map(resp.headers()) {
        Some(s)
            if s.code() == Code::Internal
                && DECODE_FAILURES.iter().any(|p| s.message().starts_with(p)) =>
        {
            crate::metrics::grpc_decode_error(path);
            let why = s
                .message()
                .trim_start_matches("failed to decode Protobuf message: ")
                .trim_end_matches(", while sending request");
            let why: String = why.chars().take(200).collect();
            Status::invalid_argument(format!("undecodable request: {why}")).into_http()
        }
        _ => resp,
    }
}

/// Request ids a client may choose: short, visible ASCII, no spaces (they go into logs).
fn valid_request_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic())
}

fn finish(
    mut resp: http::Response<Body>,
    path: &str,
    request_id: &str,
    started: std::time::Instant,
) -> http::Response<Body> {
    let code = Status::from_header_map(resp.headers())
        .map(|s| s.code())
        .unwrap_or(Code::Ok);
    crate::metrics::grpc_request(path, code_label(code));
    // Unlisted paths are anyone's choice: one series for all of them, not one each.
    let method = match access_of(path) {
        Access::Unlisted => "unlisted",
        _ => path,
    };
    crate::metrics::grpc_latency(method, started.elapsed());
    if let Ok(v) = http::HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// Writes the audit record. A store failure is logged, not turned into the call's outcome:
/// the call's own effects are already committed.
async fn audit(
    store: &Arc<Store>,
    caller: &Caller,
    method: &str,
    filed: AuditTarget,
    code: Code,
    message: &str,
) {
    let target = caller.target();
    let record = pb::AuditRecord {
        principal: caller.principal.clone(),
        role: caller.role.as_str().to_owned(),
        method: method.to_owned(),
        request_id: caller.request_id.clone(),
        code: code_label(code).to_owned(),
        message: message.to_owned(),
        target: target.clone(),
        transport: caller.transport.as_str().to_owned(),
    };
    // Put the experiment/batch id on the envelope too, so a filtered stream shows who acted.
    let (experiment_id, batch_id) = match filed {
        AuditTarget::Batch => (String::new(), target),
        AuditTarget::Experiment => (target, String::new()),
        AuditTarget::Neither => (String::new(), String::new()),
    };
    let result = store
        .write_async(move |w| {
            w.emit(
                &experiment_id,
                &batch_id,
                "",
                pb::event::Kind::Audit(record),
            );
            Ok(())
        })
        .await;
    if let Err(e) = result {
        warn!(error = %e, "could not write the audit record");
    }
}

/// The canonical gRPC name of a status code, e.g. `PERMISSION_DENIED`: the `code` label of
/// `ppu_grpc_requests_total` (and the name the audit records use).
pub fn code_label(code: Code) -> &'static str {
    use Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_table() {
        use Access::*;
        let expect = [
            (Role::Viewer, [true, false, false, false, false, false]),
            (Role::Planner, [true, true, true, false, false, false]),
            (Role::Technician, [true, false, true, true, false, false]),
            (Role::Admin, [true, true, true, true, true, true]),
        ];
        for (role, row) in expect {
            for (access, allowed) in [Read, Submit, Cancel, Operate, Administer, Unlisted]
                .into_iter()
                .zip(row)
            {
                assert_eq!(role.allows(access), allowed, "{role} {access:?}");
            }
        }
    }

    #[test]
    fn every_listed_method_is_known_and_unknown_ones_are_unlisted() {
        assert_eq!(
            access_of("/ppu.v1.ExperimentService/SubmitBatch"),
            Access::Submit
        );
        assert_eq!(
            access_of("/ppu.v1.QueueService/PauseQueue"),
            Access::Operate
        );
        assert_eq!(access_of("/grpc.health.v1.Health/Check"), Access::Read);
        assert_eq!(
            access_of("/ppu.v1.QueueService/DropTables"),
            Access::Unlisted
        );
        assert_eq!(access_of("garbage"), Access::Unlisted);
    }

    #[test]
    fn token_file_round_trip_and_problems() {
        let token = "ppu_secret";
        let text = format!(
            "[[token]]\nprincipal = \"gp\"\nrole = \"planner\"\nsha256 = \"{}\"\n",
            hex(&hash_token(token))
        );
        let tokens = Tokens::parse(&text).expect("valid file");
        assert_eq!(
            tokens.lookup(token),
            Some(Identity {
                principal: "gp".into(),
                role: Role::Planner
            })
        );
        assert!(tokens.lookup("ppu_other").is_none());
        let bad = "[[token]]\nprincipal = \"\"\nrole = \"planner\"\nsha256 = \"zz\"\n";
        let problems = Tokens::parse(bad).expect_err("invalid");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            Tokens::parse("[[token]]\nprincipal = \"x\"\nrole = \"root\"\nsha256 = \"\"").is_err()
        );
    }

    #[test]
    fn a_reload_swaps_the_set_for_every_clone_and_a_bad_file_changes_nothing() {
        let entry = |t: &str, p: &str| {
            format!(
                "[[token]]\nprincipal = \"{p}\"\nrole = \"admin\"\nsha256 = \"{}\"\n",
                hex(&hash_token(t))
            )
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("tokens.toml");
        std::fs::write(&file, entry("ppu_a", "a")).expect("write");
        let tokens = Tokens::load(&file).expect("load");
        let serving = tokens.clone();
        assert!(serving.lookup("ppu_a").is_some() && serving.lookup("ppu_b").is_none());
        std::fs::write(&file, entry("ppu_b", "b")).expect("write");
        assert_eq!(tokens.reload().expect("reload"), 1);
        assert!(serving.lookup("ppu_a").is_none(), "removed: refused");
        assert_eq!(
            serving.lookup("ppu_b").map(|i| i.principal),
            Some("b".into())
        );
        for bad in ["", "[[token]]\nprincipal = \"x\"\n"] {
            std::fs::write(&file, bad).expect("write");
            assert!(tokens.reload().is_err(), "{bad:?}");
            assert!(serving.lookup("ppu_b").is_some(), "kept after {bad:?}");
        }
        std::fs::remove_file(&file).expect("remove");
        assert!(tokens.reload().is_err());
        assert!(serving.lookup("ppu_b").is_some());
    }

    #[test]
    fn generated_tokens_are_distinct_and_prefixed() {
        let a = generate_token().expect("urandom");
        let b = generate_token().expect("urandom");
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        assert_ne!(a, b);
    }
}
