//! MQTT brokers for the simulated lab and its tests.
//!
//! - [`EmbeddedBroker`]: rumqttd in-process on loopback, for `ppud dev` and tests, so nothing
//!   external is needed. rumqttd's `Broker::start` blocks forever on its own threads and has no
//!   shutdown API, so the broker runs on a dedicated thread on an internal port, and clients
//!   reach it through a small TCP relay on the public port. The relay is what an outage
//!   switches off ([`EmbeddedBroker::go_down`]): every connection is cut and the port refuses
//!   connections until [`EmbeddedBroker::come_up`] rebinds it — to clients exactly a broker
//!   restart, with its sessions and retained messages kept (like a broker that persists them).
//! - [`Mosquitto`]: a Mosquitto process (Debian's `mosquitto` binary) on a loopback port, with
//!   no persistence, that tests can kill and restart on the same port.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long start-up waits for a broker to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// rumqttd behind a cuttable relay; see the module docs.
pub struct EmbeddedBroker {
    public: SocketAddr,
    internal: SocketAddr,
    relay: Mutex<Option<Relay>>,
}

struct Relay {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("public", &self.public)
            .field("internal", &self.internal)
            .finish_non_exhaustive()
    }
}

impl EmbeddedBroker {
    /// Starts rumqttd (MQTT 3.1.1 listener) on an internal loopback port and the relay on
    /// `listen` (port 0 picks a free one; see [`EmbeddedBroker::addr`]).
    pub async fn start(listen: SocketAddr) -> io::Result<EmbeddedBroker> {
        let internal = free_loopback_port()?;
        let config = rumqttd_config(internal);
        std::thread::Builder::new()
            .name(format!("rumqttd-{}", internal.port()))
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded MQTT broker stopped");
                }
            })?;
        wait_until_answering(internal).await?;
        let listener = TcpListener::bind(listen).await?;
        let public = listener.local_addr()?;
        let broker = EmbeddedBroker {
            public,
            internal,
            relay: Mutex::new(Some(Relay::spawn(listener, internal))),
        };
        tracing::info!(addr = %public, "embedded MQTT broker listening");
        Ok(broker)
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.public
    }

    /// `mqtt://IP:PORT` of [`EmbeddedBroker::addr`].
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.public)
    }

    /// Outage: cuts every client connection and refuses new ones.
    pub async fn go_down(&self) {
        let relay = self.relay.lock().ok().and_then(|mut r| r.take());
        if let Some(relay) = relay {
            relay.stop.cancel();
            let _ = relay.task.await;
            tracing::info!(addr = %self.public, "embedded MQTT broker down");
        }
    }

    /// Ends an outage: listens on the same port again.
    pub async fn come_up(&self) -> io::Result<()> {
        if self.relay.lock().map(|r| r.is_some()).unwrap_or(false) {
            return Ok(());
        }
        let listener = TcpListener::bind(self.public).await?;
        if let Ok(mut r) = self.relay.lock() {
            *r = Some(Relay::spawn(listener, self.internal));
        }
        tracing::info!(addr = %self.public, "embedded MQTT broker up");
        Ok(())
    }

    /// Stops serving clients. (rumqttd itself has no shutdown; its thread idles until the
    /// process exits.)
    pub async fn shutdown(&self) {
        self.go_down().await;
    }
}

impl Relay {
    fn spawn(listener: TcpListener, internal: SocketAddr) -> Relay {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((client, _)) = accepted else {
                    continue;
                };
                let conn_stop = token.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(internal).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let (mut client_rx, client_tx) = client.into_split();
                    let (upstream_rx, mut upstream_tx) = upstream.into_split();
                    tokio::select! {
                        _ = conn_stop.cancelled() => {}
                        _ = tokio::io::copy(&mut client_rx, &mut upstream_tx) => {}
                        _ = from_broker(upstream_rx, client_tx) => {}
                    }
                });
            }
        });
        Relay { stop, task }
    }
}

/// Forwards what rumqttd sends to the client, acknowledging each read at once.
///
/// rumqttd does not set `TCP_NODELAY` on the sockets it accepts, so a second small packet it
/// writes (a PUBLISH right after a PUBACK, say) waits under Nagle's algorithm until the first
/// is acknowledged, and the relay's kernel would hold that acknowledgement for its delayed-ACK
/// time (40 ms on Linux). Quick ACKs on the relay's side take that wait away; the kernel
/// clears the flag by itself, so it is set again after every read. (`TCP_QUICKACK` is
/// Linux's; elsewhere the relay forwards as before.)
async fn from_broker(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        #[cfg(target_os = "linux")]
        let _ = socket2::SockRef::from(from.as_ref()).set_tcp_quickack(true);
        to.write_all(&buf[..n]).await?;
    }
}

fn rumqttd_config(listen: SocketAddr) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: 1 << 20,
        max_inflight_count: 200,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v4-loopback".to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    // RouterConfig::default() has zero sizes, which makes a broker that accepts nothing.
    let router = rumqttd::RouterConfig {
        max_connections: 1024,
        max_outgoing_packet_count: 200,
        max_segment_size: 1 << 20,
        max_segment_count: 10,
        ..rumqttd::RouterConfig::default()
    };
    let mut v4 = HashMap::new();
    v4.insert("1".to_owned(), server);
    rumqttd::Config {
        id: 0,
        router,
        v4: Some(v4),
        ..rumqttd::Config::default()
    }
}

/// A loopback address with a port that was free a moment ago (for servers that cannot bind
/// port 0 and report it back).
pub fn free_loopback_port() -> io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.local_addr()
}

/// Waits until an MQTT broker at `addr` answers a CONNECT with a CONNACK. The probe then
/// closes its socket: a bare TCP connect, or an MQTT DISCONNECT, makes rumqttd log an ERROR
/// (a connect packet that never came; "router-drop"), a closed socket only an INFO.
async fn wait_until_answering(addr: SocketAddr) -> io::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        let mut options = MqttOptions::new(
            format!("ppu-sim-ready-probe-{}", std::process::id()),
            addr.ip().to_string(),
            addr.port(),
        );
        options.set_clean_session(true);
        let (_client, mut eventloop) = AsyncClient::new(options, 1);
        let outcome = tokio::time::timeout_at(deadline, eventloop.poll()).await;
        let error = match outcome {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(other)) => format!("unexpected first packet {other:?}"),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no CONNACK".to_owned(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("MQTT broker at {addr} not answering within {READY_TIMEOUT:?}: {error}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Mosquitto binary, if installed (`PATH`, then Debian's `/usr/sbin`).
pub fn mosquitto_binary() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("mosquitto"))
            .find(|p| p.is_file())
    });
    from_path.or_else(|| {
        let p = PathBuf::from("/usr/sbin/mosquitto");
        p.is_file().then_some(p)
    })
}

/// A Mosquitto broker process on a loopback port, without persistence: killing it loses every
/// session and retained message, as a crashed broker does.
pub struct Mosquitto {
    binary: PathBuf,
    addr: SocketAddr,
    dir: PathBuf,
    child: Arc<Mutex<Option<Child>>>,
}

impl std::fmt::Debug for Mosquitto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mosquitto")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Mosquitto {
    /// Starts `binary` on a free loopback port.
    pub async fn start(binary: PathBuf) -> io::Result<Mosquitto> {
        let addr = free_loopback_port()?;
        let dir = std::env::temp_dir().join(format!(
            "ppu-mosquitto-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&dir)?;
        let conf = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n",
            addr.port()
        );
        std::fs::write(dir.join("mosquitto.conf"), conf)?;
        let m = Mosquitto {
            binary,
            addr,
            dir,
            child: Arc::new(Mutex::new(None)),
        };
        m.spawn().await?;
        Ok(m)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    async fn spawn(&self) -> io::Result<()> {
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        if let Ok(mut slot) = self.child.lock() {
            *slot = Some(child);
        }
        wait_until_answering(self.addr).await
    }

    /// Kills the broker (SIGKILL: no clean goodbye to clients).
    pub fn kill(&self) {
        let child = self.child.lock().ok().and_then(|mut c| c.take());
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&self) -> io::Result<()> {
        self.kill();
        self.spawn().await
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Environment variable naming a Mosquitto broker started for the tests (by `.ci/run`), e.g.
/// `mqtt://127.0.0.1:18830`.
pub const TEST_MOSQUITTO_ENV: &str = "PPU_TEST_MOSQUITTO";

/// The Mosquitto a test can use.
#[derive(Debug)]
pub enum MosquittoForTest {
    /// The broker named by [`TEST_MOSQUITTO_ENV`] (shared; never stopped by a test).
    Shared(String),
    /// A broker process owned by the test (it may kill and restart it).
    Owned(Mosquitto),
    /// None available, with the notice to print.
    Unavailable(String),
}

/// Finds Mosquitto for a test: the shared one from [`TEST_MOSQUITTO_ENV`] unless the test needs
/// to restart it, else a process of its own if the binary is installed.
pub async fn mosquitto_for_test(needs_restart: bool) -> MosquittoForTest {
    if !needs_restart
        && let Ok(url) = std::env::var(TEST_MOSQUITTO_ENV)
        && !url.is_empty()
    {
        return MosquittoForTest::Shared(url);
    }
    match mosquitto_binary() {
        Some(binary) => match Mosquitto::start(binary).await {
            Ok(m) => MosquittoForTest::Owned(m),
            Err(e) => MosquittoForTest::Unavailable(format!("mosquitto failed to start: {e}")),
        },
        None => MosquittoForTest::Unavailable(
            "mosquitto is not installed (apt-get install mosquitto); .ci/run installs it"
                .to_owned(),
        ),
    }
}

/// True when a missing Mosquitto must fail the test instead of skipping it: in CI (`CI` set),
/// or when [`TEST_MOSQUITTO_ENV`] says one was provided.
pub fn mosquitto_required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
        || std::env::var_os(TEST_MOSQUITTO_ENV).is_some()
}
