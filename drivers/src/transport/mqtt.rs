//! MQTT client transport (MQTT 3.1.1 on rumqttc, which any 3.1.1 or 5 broker accepts) with a
//! stable client id, a persistent session, a last will, automatic reconnects with backoff and
//! resubscription, and request/acknowledgement exchanges with a real-time timeout.
//!
//! rumqttc only makes progress while its event loop is polled, so [`MqttTransport::start`]
//! spawns one task that polls it for the transport's lifetime: it fans incoming publishes out
//! to every [`MqttTransport::messages`] receiver, tracks the link in a [`LinkState`], sleeps
//! with exponential backoff after a failure (rumqttc reconnects on the next poll) and, after
//! every CONNACK, subscribes again to every filter. Resubscribing unconditionally is cheap and
//! covers a broker that restarted without persistence (session lost) as well as one that kept
//! the session.
//!
//! QoS 1 delivery is at least once, so everything built on this transport must tolerate
//! duplicates: [`MqttTransport::request`] re-sends the *same* payload (the same request id) when
//! no acknowledgement arrives in time, and the peer is expected to recognise the repeat.

use std::fmt;
use std::io::BufReader;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Packet, QoS,
    SubscribeFilter, TlsConfiguration, Transport,
};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::device::DeviceError;

/// Capacity of the channel between the client handle and the event loop.
const REQUEST_CAPACITY: usize = 256;
/// Incoming messages buffered per receiver before a slow receiver starts losing them.
const INCOMING_CAPACITY: usize = 1024;
/// Longest time a graceful shutdown waits for the DISCONNECT to go out.
const SHUTDOWN_FLUSH: Duration = Duration::from_millis(500);

/// Where the broker is: `mqtt://HOST:PORT` (plain TCP, default port 1883) or
/// `mqtts://HOST:PORT` (TLS, default port 8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// A broker URL that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker URL {input:?}: {reason}")]
pub struct ParseBrokerUrlError {
    pub input: String,
    pub reason: String,
}

impl FromStr for BrokerUrl {
    type Err = ParseBrokerUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ParseBrokerUrlError {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (tls, rest) = if let Some(rest) = s.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            (false, rest)
        } else if let Some(rest) = s.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = s.strip_prefix("ssl://") {
            (true, rest)
        } else {
            return Err(err("expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('@') {
            return Err(err(
                "no path or user in the URL; credentials are separate keys",
            ));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| err("unclosed [ in an IPv6 host"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => parse_port(p).ok_or_else(|| err("port must be 1-65535"))?,
                None if after.is_empty() => default_port,
                None => return Err(err("unexpected text after the IPv6 host")),
            };
            (host.to_owned(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    parse_port(p).ok_or_else(|| err("port must be 1-65535"))?,
                ),
                None => (rest.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            return Err(err("empty host"));
        }
        Ok(BrokerUrl { host, port, tls })
    }
}

fn parse_port(p: &str) -> Option<u16> {
    p.parse::<u16>().ok().filter(|p| *p > 0)
}

/// TLS settings; with no CA file the platform's root certificates are trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttTls {
    /// PEM file with the CA certificate(s) the broker's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for brokers that require client certificates.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key_file: Option<PathBuf>,
}

/// The message the broker publishes for this client when it vanishes without a DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// A broker password. Its `Debug` prints `<redacted>`, so no log line or error that formats a
/// config can carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How to reach one broker.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub broker: BrokerUrl,
    /// Stable across restarts: with a persistent session the broker keeps this client's
    /// subscriptions and queued QoS 1 messages under this id.
    pub client_id: String,
    /// Username and password, if the broker requires them.
    pub credentials: Option<(String, Password)>,
    /// TLS settings; required when the URL is `mqtts://`, ignored otherwise.
    pub tls: Option<MqttTls>,
    /// Keep-alive interval (whole seconds, at least 1 s): the broker declares this client
    /// gone, and publishes its will, after 1.5 times this without traffic.
    pub keep_alive: Duration,
    /// False (the default): a persistent session, so messages published while this client
    /// reconnects are queued for it by the broker.
    pub clean_session: bool,
    pub will: Option<Will>,
    /// Published after every connect (retained if so marked): the counterpart of the will,
    /// so peers see this client come back (Sparkplug's "birth").
    pub birth: Option<Will>,
    /// Real-time limit for one connect attempt.
    pub connect_timeout: Duration,
    /// Real-time wait for an acknowledgement before a request is re-sent.
    pub ack_timeout: Duration,
    /// Re-sends of a request after the first attempt.
    pub request_retries: u32,
    /// First pause after a failed connection; doubled per failure up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl MqttConfig {
    /// Defaults: persistent session, 5 s keep-alive, 5 s connect timeout, 3 s acknowledgement
    /// timeout with 2 re-sends, reconnect backoff 100 ms doubling to 5 s.
    pub fn new(broker: BrokerUrl, client_id: impl Into<String>) -> Self {
        Self {
            broker,
            client_id: client_id.into(),
            credentials: None,
            tls: None,
            keep_alive: Duration::from_secs(5),
            clean_session: false,
            will: None,
            birth: None,
            connect_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(3),
            request_retries: 2,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqttConfigError {
    #[error("client_id: must not be empty with a persistent session")]
    EmptyClientId,
    #[error("tls: {0}")]
    Tls(String),
}

/// The state of the link to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected yet since start.
    Connecting,
    /// CONNACK received; `session_present` tells whether the broker kept the session.
    Connected { session_present: bool },
    /// The last connection failed or was lost; reconnecting with backoff.
    Down { reason: String },
}

/// One message received on a subscribed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    /// True when the broker delivered it from its retained store (a value published earlier).
    pub retain: bool,
}

/// Quality of service of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// At most once: telemetry.
    AtMostOnce,
    /// At least once: commands, acknowledgements, results, status.
    AtLeastOnce,
}

impl From<Qos> for QoS {
    fn from(q: Qos) -> QoS {
        match q {
            Qos::AtMostOnce => QoS::AtMostOnce,
            Qos::AtLeastOnce => QoS::AtLeastOnce,
        }
    }
}

/// An MQTT client whose event loop runs on its own task until [`MqttTransport::shutdown`] (or
/// drop). Cheap to share behind an `Arc`.
pub struct MqttTransport {
    client: AsyncClient,
    config: MqttConfig,
    link: watch::Receiver<LinkState>,
    incoming: broadcast::Sender<Message>,
    /// The receiver made with the channel, before the event loop started: handed to the first
    /// caller of [`Self::messages`], so a retained message delivered right after connect (the
    /// bridge's status) cannot slip past the driver while it is still setting up.
    first: Mutex<Option<broadcast::Receiver<Message>>>,
    subscriptions: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    /// The `device` label of `ppu_transport_reconnects_total` (see [`Self::set_metrics_device`]),
    /// shared with the event loop task.
    metrics_device: Arc<OnceLock<String>>,
}

impl fmt::Debug for MqttTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttTransport")
            .field("broker", &self.config.broker.to_string())
            .field("client_id", &self.config.client_id)
            .field("link", &*self.link.borrow())
            .finish_non_exhaustive()
    }
}

impl MqttTransport {
    /// Starts the client and its event loop (needs a Tokio runtime). It connects in the
    /// background and subscribes to `subscriptions` (QoS 1) after every connect.
    pub fn start(
        config: MqttConfig,
        subscriptions: Vec<String>,
    ) -> Result<MqttTransport, MqttConfigError> {
        let options = mqtt_options(&config)?;
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        eventloop
            .network_options
            .set_connection_timeout(config.connect_timeout.as_secs().max(1));
        // Commands, acknowledgements and results are small messages in a request-reply
        // rhythm: with Nagle's algorithm each can wait out the peer's delayed ACK (40 ms on
        // Linux).
        eventloop.network_options.set_tcp_nodelay(true);
        let (link_tx, link) = watch::channel(LinkState::Connecting);
        let (incoming, first) = broadcast::channel(INCOMING_CAPACITY);
        let subscriptions = Arc::new(Mutex::new(subscriptions));
        let stop = CancellationToken::new();
        let metrics_device = Arc::new(OnceLock::new());
        let task = tokio::spawn(run_event_loop(EventLoopTask {
            eventloop,
            client: client.clone(),
            link: link_tx,
            incoming: incoming.clone(),
            subscriptions: subscriptions.clone(),
            stop: stop.clone(),
            describe: describe(&config),
            metrics_device: metrics_device.clone(),
            birth: config.birth.clone(),
            reconnect_min: config.reconnect_min,
            reconnect_max: config.reconnect_max,
        }));
        Ok(MqttTransport {
            client,
            config,
            link,
            incoming,
            first: Mutex::new(Some(first)),
            subscriptions,
            stop,
            task: Mutex::new(Some(task)),
            metrics_device,
        })
    }

    /// Names the device this link serves in the `ppu_transport_reconnects_total` metric (the
    /// driver knows its device id, the transport does not). Only the first call counts; until
    /// one, the label is the peer ([`Self::describe`]).
    pub fn set_metrics_device(&self, device: impl Into<String>) {
        let _ = self.metrics_device.set(device.into());
    }

    pub fn config(&self) -> &MqttConfig {
        &self.config
    }

    /// Human-readable peer, e.g. `mqtt://127.0.0.1:1883 as ppud-asap-1`.
    pub fn describe(&self) -> String {
        describe(&self.config)
    }

    pub fn link_state(&self) -> LinkState {
        self.link.borrow().clone()
    }

    pub fn is_connected(&self) -> bool {
        matches!(*self.link.borrow(), LinkState::Connected { .. })
    }

    /// Follows link changes.
    pub fn watch_link(&self) -> watch::Receiver<LinkState> {
        self.link.clone()
    }

    /// Messages on any subscribed topic: for the first caller, every message since
    /// [`Self::start`]; for later callers, those received from now on.
    pub fn messages(&self) -> broadcast::Receiver<Message> {
        self.first
            .lock()
            .ok()
            .and_then(|mut f| f.take())
            .unwrap_or_else(|| self.incoming.subscribe())
    }

    /// Adds a subscription (QoS 1), kept across reconnects.
    pub fn subscribe(&self, filter: impl Into<String>) -> Result<(), DeviceError> {
        let filter = filter.into();
        if let Ok(mut subs) = self.subscriptions.lock()
            && !subs.contains(&filter)
        {
            subs.push(filter.clone());
        }
        if self.is_connected() {
            self.client
                .try_subscribe(filter.clone(), QoS::AtLeastOnce)
                .map_err(|e| {
                    DeviceError::Disconnected(format!(
                        "{}: cannot subscribe to {filter}: {e}",
                        self.describe()
                    ))
                })?;
        }
        Ok(())
    }

    /// Queues a publish. With QoS 1 the client keeps it across a reconnect; the peer's
    /// acknowledgement, not this call, confirms delivery.
    pub fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        qos: Qos,
        retain: bool,
    ) -> Result<(), DeviceError> {
        self.client
            .try_publish(topic, qos.into(), retain, payload)
            .map_err(|e| {
                DeviceError::Disconnected(format!(
                    "{}: cannot queue publish to {topic}: {e}",
                    self.describe()
                ))
            })
    }

    /// Waits until connected, at most `timeout` (real time).
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), DeviceError> {
        let mut link = self.link.clone();
        let connected = tokio::time::timeout(
            timeout,
            link.wait_for(|s| matches!(s, LinkState::Connected { .. })),
        )
        .await;
        match connected {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(DeviceError::Disconnected(format!(
                "{}: transport stopped",
                self.describe()
            ))),
            Err(_) => Err(DeviceError::Disconnected(format!(
                "{}: not connected within {} ms ({})",
                self.describe(),
                timeout.as_millis(),
                link_reason(&self.link_state())
            ))),
        }
    }

    /// Publishes `payload` on `topic` (QoS 1) and waits for the first incoming message that
    /// `matcher` accepts, re-sending the same payload after each [`MqttConfig::ack_timeout`]
    /// (at most [`MqttConfig::request_retries`] times). The payload must carry a request id,
    /// so that the peer can recognise a re-send and answer it without acting twice.
    pub async fn request<R>(
        &self,
        topic: &str,
        payload: &[u8],
        what: &str,
        mut matcher: impl FnMut(&Message) -> Option<R>,
    ) -> Result<R, DeviceError> {
        // Subscribe to the fan-out before publishing, so a fast answer cannot be missed.
        let mut rx = self.incoming.subscribe();
        let timeout = self.config.ack_timeout;
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut last_error = None;
        for attempt in 0..=self.config.request_retries {
            if let Err(e) = self.wait_connected(timeout).await {
                last_error = Some(e);
                continue;
            }
            if attempt > 0 {
                tracing::warn!(peer = %self.describe(), attempt, "no acknowledgement of {what}; re-sending");
            }
            self.publish(topic, payload.to_vec(), Qos::AtLeastOnce, false)?;
            let deadline = Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Ok(message)) => {
                        if let Some(found) = matcher(&message) {
                            return Ok(found);
                        }
                    }
                    Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                        tracing::warn!(peer = %self.describe(), lost = n, "incoming messages lost while waiting for {what}");
                    }
                    Ok(Err(broadcast::error::RecvError::Closed)) => {
                        return Err(DeviceError::Disconnected(format!(
                            "{}: transport stopped",
                            self.describe()
                        )));
                    }
                    Err(_) => {
                        last_error = Some(DeviceError::Timeout {
                            what: what.to_owned(),
                            timeout_ms,
                        });
                        break;
                    }
                }
            }
        }
        Err(last_error.unwrap_or_else(|| DeviceError::Timeout {
            what: what.to_owned(),
            timeout_ms,
        }))
    }

    /// Graceful stop: publishes the will's payload itself (a DISCONNECT suppresses the will,
    /// but peers must still learn that this client left), disconnects and ends the event loop.
    pub async fn shutdown(&self) {
        if self.is_connected() {
            if let Some(will) = &self.config.will {
                let _ = self.publish(
                    &will.topic,
                    will.payload.clone(),
                    Qos::AtLeastOnce,
                    will.retain,
                );
            }
            let _ = self.client.try_disconnect();
            let mut link = self.link.clone();
            let _ = tokio::time::timeout(
                SHUTDOWN_FLUSH,
                link.wait_for(|s| !matches!(s, LinkState::Connected { .. })),
            )
            .await;
        }
        self.stop.cancel();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for MqttTransport {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn describe(config: &MqttConfig) -> String {
    format!("{} as {}", config.broker, config.client_id)
}

fn link_reason(state: &LinkState) -> String {
    match state {
        LinkState::Connecting => "still connecting".to_owned(),
        LinkState::Connected { .. } => "connected".to_owned(),
        LinkState::Down { reason } => reason.clone(),
    }
}

fn mqtt_options(config: &MqttConfig) -> Result<MqttOptions, MqttConfigError> {
    if config.client_id.is_empty() && !config.clean_session {
        return Err(MqttConfigError::EmptyClientId);
    }
    let mut o = MqttOptions::new(
        config.client_id.clone(),
        config.broker.host.clone(),
        config.broker.port,
    );
    // rumqttc panics below 1 s; whole seconds are what goes on the wire anyway.
    let keep_alive = Duration::from_secs(config.keep_alive.as_secs().max(1));
    o.set_keep_alive(keep_alive);
    o.set_clean_session(config.clean_session);
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((user, password)) = &config.credentials {
        o.set_credentials(user.clone(), password.0.clone());
    }
    if let Some(will) = &config.will {
        o.set_last_will(LastWill::new(
            will.topic.clone(),
            will.payload.clone(),
            QoS::AtLeastOnce,
            will.retain,
        ));
    }
    if config.broker.tls {
        let tls = config.tls.clone().unwrap_or_default();
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(rustls_config(&tls)?),
        )));
    }
    Ok(o)
}

/// A rustls client config on the ring provider (no process-wide default is installed, so
/// this works whichever other TLS users share the process).
fn rustls_config(tls: &MqttTls) -> Result<rustls::ClientConfig, MqttConfigError> {
    use rustls::RootCertStore;
    let bad = |what: &str, e: &dyn fmt::Display| MqttConfigError::Tls(format!("{what}: {e}"));
    let read_pem = |path: &PathBuf| -> Result<BufReader<std::fs::File>, MqttConfigError> {
        std::fs::File::open(path)
            .map(BufReader::new)
            .map_err(|e| bad(&format!("cannot read {}", path.display()), &e))
    };
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let mut reader = read_pem(path)?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut reader) {
                let cert = cert.map_err(|e| bad(&format!("{}", path.display()), &e))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(&format!("{}", path.display()), &e))?;
                added += 1;
            }
            if added == 0 {
                return Err(MqttConfigError::Tls(format!(
                    "ca_file {}: no PEM certificate found",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(MqttConfigError::Tls(
                    "no ca_file given and no platform root certificates found".to_owned(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", &e))?
        .with_root_certificates(roots);
    match (&tls.client_cert_file, &tls.client_key_file) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert_path), Some(key_path)) => {
            let certs = rustls_pemfile::certs(&mut read_pem(cert_path)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(&format!("{}", cert_path.display()), &e))?;
            let key = rustls_pemfile::private_key(&mut read_pem(key_path)?)
                .map_err(|e| bad(&format!("{}", key_path.display()), &e))?
                .ok_or_else(|| {
                    MqttConfigError::Tls(format!(
                        "client_key_file {}: no private key found",
                        key_path.display()
                    ))
                })?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| bad("client certificate", &e))
        }
        _ => Err(MqttConfigError::Tls(
            "client_cert_file and client_key_file go together".to_owned(),
        )),
    }
}

struct EventLoopTask {
    eventloop: EventLoop,
    client: AsyncClient,
    link: watch::Sender<LinkState>,
    incoming: broadcast::Sender<Message>,
    subscriptions: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    describe: String,
    metrics_device: Arc<OnceLock<String>>,
    birth: Option<Will>,
    reconnect_min: Duration,
    reconnect_max: Duration,
}

async fn run_event_loop(mut t: EventLoopTask) {
    let mut backoff = t.reconnect_min;
    let mut ever_connected = false;
    let mut outage_logged = false;
    loop {
        let event = tokio::select! {
            biased;
            _ = t.stop.cancelled() => return,
            event = t.eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = t.reconnect_min;
                outage_logged = false;
                if ever_connected {
                    tracing::info!(peer = %t.describe, session_present = ack.session_present, "mqtt reconnected");
                    super::count_reconnect("mqtt", &t.metrics_device, || t.describe.clone());
                } else {
                    tracing::debug!(peer = %t.describe, session_present = ack.session_present, "mqtt connected");
                }
                ever_connected = true;
                let filters: Vec<SubscribeFilter> = t
                    .subscriptions
                    .lock()
                    .map(|s| s.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|path| SubscribeFilter::new(path, QoS::AtLeastOnce))
                    .collect();
                if !filters.is_empty()
                    && let Err(e) = t.client.try_subscribe_many(filters)
                {
                    tracing::warn!(peer = %t.describe, error = %e, "cannot queue resubscription");
                }
                if let Some(birth) = &t.birth
                    && let Err(e) = t.client.try_publish(
                        birth.topic.clone(),
                        QoS::AtLeastOnce,
                        birth.retain,
                        birth.payload.clone(),
                    )
                {
                    tracing::warn!(peer = %t.describe, error = %e, "cannot queue birth message");
                }
                t.link.send_replace(LinkState::Connected {
                    session_present: ack.session_present,
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = t.incoming.send(Message {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                    retain: p.retain,
                });
            }
            Ok(Event::Incoming(Packet::Disconnect)) => {
                t.link.send_replace(LinkState::Down {
                    reason: "broker sent DISCONNECT".to_owned(),
                });
            }
            Ok(_) => {}
            Err(e) => {
                let reason = connection_error(&e);
                t.link.send_replace(LinkState::Down {
                    reason: reason.clone(),
                });
                if matches!(e, ConnectionError::RequestsDone) {
                    // Every client handle is gone: nobody can use this transport any more.
                    return;
                }
                if !outage_logged {
                    tracing::warn!(peer = %t.describe, error = %reason, "mqtt link down; reconnecting");
                    outage_logged = true;
                } else {
                    tracing::debug!(peer = %t.describe, error = %reason, retry_in_ms = backoff.as_millis() as u64, "mqtt connect failed");
                }
                tokio::select! {
                    _ = t.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(t.reconnect_max);
            }
        }
    }
}

fn connection_error(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection: {code:?}")
        }
        ConnectionError::NetworkTimeout => "connect timed out".to_owned(),
        ConnectionError::Io(io) => format!("I/O: {io}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_never_prints_its_password() {
        let mut config = MqttConfig::new(
            BrokerUrl {
                host: "broker".into(),
                port: 1883,
                tls: false,
            },
            "t",
        );
        config.credentials = Some(("ppud".into(), Password("hunter2".into())));
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn broker_urls_parse_with_default_ports() {
        let u: BrokerUrl = "mqtt://127.0.0.1:1884".parse().unwrap();
        assert_eq!(
            u,
            BrokerUrl {
                host: "127.0.0.1".into(),
                port: 1884,
                tls: false
            }
        );
        assert_eq!(u.to_string(), "mqtt://127.0.0.1:1884");
        let u: BrokerUrl = "mqtts://broker.lab".parse().unwrap();
        assert_eq!((u.port, u.tls), (8883, true));
        let u: BrokerUrl = "tcp://[::1]".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 1883));
        assert_eq!(u.to_string(), "mqtt://[::1]:1883");
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://u:p@h",
            "mqtt://h/t",
        ] {
            assert!(bad.parse::<BrokerUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_problems_are_named() {
        let tls = MqttTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..MqttTls::default()
        };
        let e = rustls_config(&tls).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let tls = MqttTls {
            ca_file: None,
            client_cert_file: Some("/x.pem".into()),
            client_key_file: None,
        };
        // Either the platform has no roots or the half-configured client auth is refused.
        assert!(rustls_config(&tls).is_err());
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_reported_and_requests_fail_without_hanging() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut config = MqttConfig::new(
            BrokerUrl {
                host: "127.0.0.1".into(),
                port,
                tls: false,
            },
            "t-unreachable",
        );
        config.ack_timeout = Duration::from_millis(100);
        config.request_retries = 1;
        let t = MqttTransport::start(config, vec!["a/#".into()]).unwrap();
        let err = t
            .request("a/cmd", b"{}", "test request", |_| Some(()))
            .await
            .unwrap_err();
        assert!(matches!(err, DeviceError::Disconnected(_)), "{err:?}");
        assert!(!t.is_connected());
        t.shutdown().await;
    }
}
