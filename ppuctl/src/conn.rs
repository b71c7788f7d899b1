//! How ppuctl reaches ppud: the address forms (`host:port`, `http://`, `https://` with TLS or
//! mTLS, `unix:/path` for the local socket), and the bearer token that rides on every call.
//!
//! Everything is resolved once, up front ([`ConnArgs::resolve`]): files are read and checked
//! there, so a wrong path or an empty token file is reported as a caller mistake before any
//! RPC. The token comes from a file or the environment, never from a flag value (that would
//! show in `ps`), and is never printed: [`BearerToken`] redacts itself and marks the header
//! sensitive so HTTP/2 does not index it.

use std::ffi::OsString;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tonic::codegen::http::Uri;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::InputError;

/// The channel every ppuctl client uses: a tonic channel whose every request — unary or
/// stream — carries the bearer token (if one was given).
pub type Channel = InterceptedService<tonic::transport::Channel, BearerToken>;

/// Environment variable holding the token itself (there is deliberately no flag for it).
pub const TOKEN_ENV: &str = "PPU_TOKEN";

/// The connection options, shared by every command (flattened into the top-level CLI).
#[derive(Debug, Args)]
pub struct ConnArgs {
    /// Address of ppud: `host:port` (short for `http://host:port`), `http://host:port`,
    /// `https://host:port` (TLS; needs --tls-ca) or `unix:/path/to/ppud.sock` (the daemon's
    /// local socket).
    #[arg(
        long,
        global = true,
        env = "PPU_ADDR",
        default_value = "http://127.0.0.1:50051",
        value_name = "URL"
    )]
    pub addr: String,

    /// File holding the bearer token (surrounding whitespace is ignored). Without it the token
    /// is taken from the PPU_TOKEN environment variable; there is no flag for the token itself,
    /// so it never shows in `ps`. Tokens are made with `ppud token`.
    #[arg(long, global = true, env = "PPU_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM file with the CA certificate(s) that signed ppud's certificate (https:// only).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// PEM certificate chain presenting this client to a daemon that requires client
    /// certificates (mTLS); needs --tls-key.
    #[arg(long, global = true, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, global = true, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Name to verify in ppud's certificate instead of the host in --addr (e.g. when connecting
    /// by IP address or through a tunnel).
    #[arg(long, global = true, value_name = "NAME")]
    pub tls_domain: Option<String>,
}

/// Where the bearer token came from: named in hints, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    File(PathBuf),
    Env,
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::File(p) => write!(f, "token file {}", p.display()),
            TokenSource::Env => write!(f, "{TOKEN_ENV}"),
        }
    }
}

/// The `authorization: Bearer …` header added to every request; empty when no token was given.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// Checks that `token` can travel in a header. Errors never repeat the token.
    fn new(token: &str, source: &TokenSource) -> Result<BearerToken, InputError> {
        if token.is_empty() {
            return Err(InputError(format!("{source} is empty")));
        }
        if token.chars().any(char::is_whitespace) {
            return Err(InputError(format!(
                "{source} holds more than one word; it must hold only the token (a tokens file \
                 of ppud's is not a token)"
            )));
        }
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            InputError(format!(
                "{source}: the token has characters a header cannot carry (only visible ASCII)"
            ))
        })?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(_) => f.write_str("BearerToken(<redacted>)"),
            None => f.write_str("BearerToken(none)"),
        }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Channel settings that differ between one-shot commands and the live TUI.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub connect_timeout: Duration,
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
}

impl Tuning {
    /// One-shot commands and `watch`: patient connect; keep-alives detect a silently dead
    /// daemon during long streams.
    pub const CLI: Tuning = Tuning {
        connect_timeout: Duration::from_secs(5),
        keep_alive_interval: Duration::from_secs(30),
        keep_alive_timeout: Duration::from_secs(10),
    };
}

/// The resolved address form.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// `http://` or `https://` URL (`tls` for the latter).
    Tcp { url: String, tls: bool },
    /// Path of ppud's Unix socket.
    Unix(PathBuf),
}

/// Everything needed to open channels to ppud, resolved and checked. Its `Debug` shows neither
/// the token nor the TLS material (tonic's own `Debug` would print the private key's bytes).
pub struct Conn {
    /// The address as the user gave it (for messages; it holds no secret).
    pub addr: String,
    target: Target,
    tls: Option<ClientTlsConfig>,
    /// Whether a client certificate is presented (mTLS).
    identity: bool,
    token: BearerToken,
    /// Where the token came from, `None` without one.
    pub token_source: Option<TokenSource>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("tls", &self.tls.is_some())
            .field("identity", &self.identity)
            .field("token", &self.token)
            .field("token_source", &self.token_source)
            .finish()
    }
}

impl ConnArgs {
    /// Parses the address, reads the token and the TLS files. The token comes from
    /// --token-file / PPU_TOKEN_FILE if given, else from PPU_TOKEN.
    pub fn resolve(&self) -> Result<Conn, InputError> {
        self.resolve_with(std::env::var_os(TOKEN_ENV))
    }

    /// [`ConnArgs::resolve`] with the value of PPU_TOKEN passed in (tests).
    fn resolve_with(&self, env_token: Option<OsString>) -> Result<Conn, InputError> {
        let target = parse_addr(&self.addr)?;
        let tls = match &target {
            Target::Tcp { tls: true, .. } => Some(self.tls_config()?),
            _ => {
                if let Some(flag) = self.tls_flag() {
                    let hint = match target {
                        Target::Unix(_) => "the local socket does not use TLS",
                        Target::Tcp { .. } => "use an https:// address for TLS",
                    };
                    return Err(InputError(format!(
                        "{flag} needs an https:// --addr (got {:?}); {hint}",
                        self.addr
                    )));
                }
                None
            }
        };
        let (token, token_source) = match (&self.token_file, env_token) {
            (Some(path), _) => {
                let source = TokenSource::File(path.clone());
                let text = std::fs::read_to_string(path).map_err(|e| {
                    InputError(format!("cannot read token file {}: {e}", path.display()))
                })?;
                (BearerToken::new(text.trim(), &source)?, Some(source))
            }
            (None, Some(value)) => {
                let source = TokenSource::Env;
                let text = value.into_string().map_err(|_| {
                    InputError(format!(
                        "{TOKEN_ENV} is not valid UTF-8 (only visible ASCII)"
                    ))
                })?;
                (BearerToken::new(text.trim(), &source)?, Some(source))
            }
            (None, None) => (BearerToken::default(), None),
        };
        Ok(Conn {
            addr: self.addr.clone(),
            target,
            tls,
            identity: self.tls_cert.is_some(),
            token,
            token_source,
        })
    }

    /// The first TLS option given, for the error when the address is not https://.
    fn tls_flag(&self) -> Option<&'static str> {
        if self.tls_ca.is_some() {
            Some("--tls-ca")
        } else if self.tls_cert.is_some() {
            Some("--tls-cert")
        } else if self.tls_key.is_some() {
            Some("--tls-key")
        } else if self.tls_domain.is_some() {
            Some("--tls-domain")
        } else {
            None
        }
    }

    /// The TLS settings for an https:// address. ppuctl carries no built-in root store (a lab
    /// names its own CA), so --tls-ca is required.
    fn tls_config(&self) -> Result<ClientTlsConfig, InputError> {
        let Some(ca) = &self.tls_ca else {
            return Err(InputError(format!(
                "--addr {:?} uses TLS: pass --tls-ca FILE, the PEM certificate of the CA that \
                 signed ppud's certificate",
                self.addr
            )));
        };
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(
            "--tls-ca",
            ca,
            PemKind::Certificate,
        )?));
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let cert = read_pem("--tls-cert", cert, PemKind::Certificate)?;
            let key = read_pem("--tls-key", key, PemKind::PrivateKey)?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.tls_domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

/// What a PEM file passed to ppuctl must contain.
#[derive(Debug, Clone, Copy)]
enum PemKind {
    Certificate,
    PrivateKey,
}

/// Reads a PEM file and checks it holds the expected kind of block, so a swapped or empty file
/// is named here instead of failing later as an opaque handshake error. The contents (a key!)
/// are never echoed.
fn read_pem(flag: &str, path: &Path, kind: PemKind) -> Result<Vec<u8>, InputError> {
    let bytes = std::fs::read(path)
        .map_err(|e| InputError(format!("{flag}: cannot read {}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text.lines().any(|line| {
        let Some(label) = line
            .trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
        else {
            return false;
        };
        match kind {
            PemKind::Certificate => label == "CERTIFICATE",
            PemKind::PrivateKey => label.ends_with("PRIVATE KEY"),
        }
    });
    if !found {
        let what = match kind {
            PemKind::Certificate => "a PEM certificate (-----BEGIN CERTIFICATE-----)",
            PemKind::PrivateKey => "a PEM private key (-----BEGIN … PRIVATE KEY-----)",
        };
        return Err(InputError(format!(
            "{flag}: {} does not hold {what}",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Accepts `host:port`, `http://…`, `https://…` and `unix:PATH` (also `unix://PATH`).
fn parse_addr(addr: &str) -> Result<Target, InputError> {
    if let Some(rest) = addr.strip_prefix("unix:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.is_empty() {
            return Err(InputError(format!(
                "invalid --addr {addr:?}: a unix: address needs a socket path, e.g. \
                 unix:/run/ppu/ppud.sock"
            )));
        }
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| InputError(format!("invalid --addr {addr:?}: {e}")))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(InputError(format!(
                "invalid --addr {addr:?}: use host:port, http://, https:// or unix:"
            )));
        }
    };
    if uri.host().is_none_or(str::is_empty) {
        return Err(InputError(format!("invalid --addr {addr:?}: no host")));
    }
    Ok(Target::Tcp { url, tls })
}

impl Conn {
    /// Opens a lazily connecting channel (the first RPC connects; a lost daemon is reconnected
    /// on the next call). Fails only on TLS material tonic cannot use.
    pub fn channel(&self, tuning: Tuning) -> Result<Channel, InputError> {
        let endpoint = match &self.target {
            Target::Tcp { url, .. } => Endpoint::from_shared(url.clone())
                .map_err(|e| InputError(format!("invalid --addr {:?}: {e}", self.addr)))?,
            // tonic's own Unix-socket connector (a `UnixStream` per connection); the URI the
            // requests carry is a placeholder.
            Target::Unix(path) => Endpoint::from_shared(format!("unix:{}", path.display()))
                .map_err(|e| InputError(format!("invalid --addr {:?}: {e}", self.addr)))?,
        };
        let mut endpoint = endpoint
            .connect_timeout(tuning.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(tuning.keep_alive_interval)
            .keep_alive_timeout(tuning.keep_alive_timeout)
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| InputError(format!("TLS settings: {}", error_chain(&e))))?;
        }
        Ok(InterceptedService::new(
            endpoint.connect_lazy(),
            self.token.clone(),
        ))
    }

    /// Whether this is TLS without a client certificate (for the hint when a daemon that
    /// requires one drops the connection).
    pub fn tls_without_identity(&self) -> bool {
        self.tls.is_some() && !self.identity
    }

    /// Asks a plain-text TCP address in HTTP/1.1 what it is, after a gRPC call failed at the
    /// transport: an HTTP/1 server (ppud's metrics port, a web server) answers with a status
    /// line, which is returned; a gRPC server (HTTP/2 only) never does. `None` for TLS and
    /// Unix-socket addresses, or when nothing answers within a second or two.
    pub async fn http1_status_line(&self) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Target::Tcp { url, tls: false } = &self.target else {
            return None;
        };
        let uri: Uri = url.parse().ok()?;
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16()?;
        let limit = Duration::from_secs(2);
        let probe = async {
            let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
            let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            s.write_all(request.as_bytes()).await.ok()?;
            let mut reply = vec![0u8; 128];
            let n = s.read(&mut reply).await.ok()?;
            let text = String::from_utf8_lossy(&reply[..n]).into_owned();
            text.starts_with("HTTP/1.")
                .then(|| text.lines().next().unwrap_or_default().trim().to_owned())
        };
        tokio::time::timeout(limit, probe).await.ok().flatten()
    }

    /// A warning to print before connecting, if the token would cross the network in clear
    /// text (ppud refuses plain text off loopback unless told otherwise, but a proxy might not).
    pub fn plaintext_warning(&self) -> Option<String> {
        let Target::Tcp { url, tls: false } = &self.target else {
            return None;
        };
        self.token_source.as_ref()?;
        let uri: Uri = url.parse().ok()?;
        let host = uri.host()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback =
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        (!loopback).then(|| {
            format!(
                "warning: sending the bearer token unencrypted to {host}; use an https:// \
                 address (or unix: on the daemon's machine)"
            )
        })
    }
}

/// An error and its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e.source())
}

/// `text` followed by each cause in the chain from `source` that it does not already say.
/// tonic and hyper repeat themselves (`tcp connect error: transport error: tcp connect error`)
/// and wrap everything in a bare "transport error"; those add nothing.
pub fn with_causes(mut text: String, mut source: Option<&dyn std::error::Error>) -> String {
    while let Some(s) = source {
        let s_text = s.to_string();
        if s_text != "transport error" && !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn args(addr: &str) -> ConnArgs {
        ConnArgs {
            addr: addr.to_owned(),
            token_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_domain: None,
        }
    }

    const SECRET: &str = "ppu_ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFGHIJKLMNOPQRST";

    fn file_with(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn header_of(conn: &Conn) -> Option<String> {
        let mut token = conn.token.clone();
        let request = token.call(Request::new(())).unwrap();
        request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn address_forms() {
        let tcp = |url: &str, tls| Target::Tcp {
            url: url.to_owned(),
            tls,
        };
        assert_eq!(
            parse_addr("lab-pc:50051").unwrap(),
            tcp("http://lab-pc:50051", false)
        );
        assert_eq!(
            parse_addr("http://10.0.0.5:50051").unwrap(),
            tcp("http://10.0.0.5:50051", false)
        );
        assert_eq!(
            parse_addr("https://lab-pc:50051").unwrap(),
            tcp("https://lab-pc:50051", true)
        );
        assert_eq!(
            parse_addr("unix:/run/ppu/ppud.sock").unwrap(),
            Target::Unix("/run/ppu/ppud.sock".into())
        );
        assert_eq!(
            parse_addr("unix:///run/ppu/ppud.sock").unwrap(),
            Target::Unix("/run/ppu/ppud.sock".into())
        );
        assert_eq!(
            parse_addr("unix:ppud.sock").unwrap(),
            Target::Unix("ppud.sock".into())
        );
        for bad in ["unix:", "ftp://lab-pc:21", "http://", "lab pc:1"] {
            let e = parse_addr(bad).unwrap_err();
            assert!(e.0.contains("invalid --addr"), "{bad}: {e}");
        }
    }

    #[test]
    fn token_from_file_is_trimmed_and_wins_over_the_environment() {
        let f = file_with(&format!("\n  {SECRET}\n\n"));
        let mut a = args("127.0.0.1:50051");
        a.token_file = Some(f.path().to_owned());
        let conn = a.resolve_with(Some("ppu_other".into())).unwrap();
        assert_eq!(header_of(&conn).unwrap(), format!("Bearer {SECRET}"));
        assert_eq!(
            conn.token_source,
            Some(TokenSource::File(f.path().to_owned()))
        );
    }

    #[test]
    fn token_from_the_environment_or_none() {
        let conn = args("127.0.0.1:50051")
            .resolve_with(Some(format!(" {SECRET}\n").into()))
            .unwrap();
        assert_eq!(header_of(&conn).unwrap(), format!("Bearer {SECRET}"));
        assert_eq!(conn.token_source, Some(TokenSource::Env));

        let conn = args("127.0.0.1:50051").resolve_with(None).unwrap();
        assert_eq!(header_of(&conn), None);
        assert_eq!(conn.token_source, None);
    }

    #[test]
    fn bad_tokens_are_refused_without_echoing_them() {
        let cases = [
            ("  \n", "is empty"),
            (
                "[[token]]\nprincipal = \"x\"\nsha256 = \"ppu_secret\"\n",
                "more than one word",
            ),
            ("ppu_secret\u{7f}", "characters a header cannot carry"),
        ];
        for (text, expected) in cases {
            let f = file_with(text);
            let mut a = args("127.0.0.1:50051");
            a.token_file = Some(f.path().to_owned());
            let e = a.resolve_with(None).unwrap_err();
            assert!(e.0.contains(expected), "{text:?}: {e}");
            assert!(e.0.contains("token file"), "{e}");
            assert!(!e.0.contains("ppu_secret"), "the token leaked: {e}");
        }
        let e = args("127.0.0.1:50051")
            .resolve_with(Some("".into()))
            .unwrap_err();
        assert!(e.0.contains("PPU_TOKEN is empty"), "{e}");

        let mut a = args("127.0.0.1:50051");
        a.token_file = Some("/nonexistent/ppu-token".into());
        let e = a.resolve_with(None).unwrap_err();
        assert!(e.0.contains("cannot read token file /nonexistent/ppu-token"));
    }

    #[tokio::test]
    async fn secrets_never_show_in_debug_output() {
        let conn = args("127.0.0.1:50051")
            .resolve_with(Some(SECRET.into()))
            .unwrap();
        let debug = format!("{conn:?} {:?}", conn.channel(Tuning::CLI));
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(debug.contains("BearerToken(<redacted>)"), "{debug}");

        // The header value itself is marked sensitive (not HPACK-indexed, redacted by `http`).
        let mut token = conn.token.clone();
        let request = token.call(Request::new(())).unwrap();
        let value = request.metadata().get("authorization").unwrap();
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains(SECRET));

        // Nor the client key of mTLS.
        let ca = file_with("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
        let key = file_with("-----BEGIN PRIVATE KEY-----\nKEYBYTES\n-----END PRIVATE KEY-----\n");
        let mut a = args("https://lab-pc:50051");
        a.tls_ca = Some(ca.path().to_owned());
        a.tls_cert = Some(ca.path().to_owned());
        a.tls_key = Some(key.path().to_owned());
        let conn = a.resolve_with(None).unwrap();
        let debug = format!("{conn:?}");
        assert!(
            !debug.contains("KEYBYTES") && !debug.contains("75, 69, 89"),
            "{debug}"
        );
        assert!(!conn.tls_without_identity() && debug.contains("identity: true"));
    }

    #[test]
    fn tls_options_need_an_https_address_and_a_ca() {
        let ca = file_with("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
        let mut a = args("http://lab-pc:50051");
        a.tls_ca = Some(ca.path().to_owned());
        let e = a.resolve_with(None).unwrap_err();
        assert!(e.0.contains("--tls-ca needs an https:// --addr"), "{e}");

        let mut a = args("unix:/run/ppu/ppud.sock");
        a.tls_domain = Some("ppud".into());
        let e = a.resolve_with(None).unwrap_err();
        assert!(e.0.contains("the local socket does not use TLS"), "{e}");

        let e = args("https://lab-pc:50051").resolve_with(None).unwrap_err();
        assert!(e.0.contains("pass --tls-ca FILE"), "{e}");
    }

    #[test]
    fn pem_files_are_checked_for_what_they_hold() {
        let cert = file_with("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
        let key = file_with("-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n");
        let ec_key =
            file_with("-----BEGIN EC PRIVATE KEY-----\nsecret\n-----END EC PRIVATE KEY-----\n");
        let p = |f: &tempfile::NamedTempFile| f.path().to_owned();
        assert!(read_pem("--tls-ca", &p(&cert), PemKind::Certificate).is_ok());
        assert!(read_pem("--tls-key", &p(&key), PemKind::PrivateKey).is_ok());
        assert!(read_pem("--tls-key", &p(&ec_key), PemKind::PrivateKey).is_ok());
        // Swapped: the key given as the certificate and the other way round.
        let e = read_pem("--tls-cert", &p(&key), PemKind::Certificate).unwrap_err();
        assert!(e.0.starts_with("--tls-cert: ") && e.0.contains("does not hold a PEM cert"));
        assert!(!e.0.contains("secret"), "{e}");
        let e = read_pem("--tls-key", &p(&cert), PemKind::PrivateKey).unwrap_err();
        assert!(e.0.contains("does not hold a PEM private key"), "{e}");
        let e = read_pem(
            "--tls-ca",
            Path::new("/nonexistent/ca.crt"),
            PemKind::Certificate,
        )
        .unwrap_err();
        assert!(
            e.0.contains("--tls-ca: cannot read /nonexistent/ca.crt"),
            "{e}"
        );
    }

    #[test]
    fn plaintext_warning_only_for_a_token_off_loopback() {
        let warn = |addr: &str, token: Option<&str>| {
            args(addr)
                .resolve_with(token.map(Into::into))
                .unwrap()
                .plaintext_warning()
        };
        assert!(warn("lab-pc:50051", Some(SECRET)).is_some());
        assert!(warn("http://10.1.2.3:50051", Some(SECRET)).is_some());
        assert!(warn("lab-pc:50051", None).is_none());
        assert!(warn("127.0.0.1:50051", Some(SECRET)).is_none());
        assert!(warn("http://[::1]:50051", Some(SECRET)).is_none());
        assert!(warn("localhost:50051", Some(SECRET)).is_none());
        assert!(warn("unix:/run/ppu/ppud.sock", Some(SECRET)).is_none());
    }
}
