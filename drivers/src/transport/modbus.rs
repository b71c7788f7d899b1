//! Modbus client transport (TCP, or RTU over a serial line) with timeouts, retries and
//! reconnects.
//!
//! tokio-modbus has no timeouts of its own and a dead peer can leave a call pending forever, so
//! every connect and every request here runs under a real-time [`tokio::time::timeout`]. After a
//! timeout, an IO error or a framing error, the connection is dropped rather than reused: a late
//! reply to an abandoned request would otherwise be read as the answer to the next one. A Modbus
//! exception is the device's considered answer, so it is returned at once and never retried.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::slave::SlaveContext as _;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};

use crate::device::DeviceError;

/// First pause before a retry; doubled per attempt up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// Retries stay snappy: a long outage is the caller's to tolerate, not the transport's.
const MAX_BACKOFF: Duration = Duration::from_millis(400);

/// Where a Modbus device is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModbusEndpoint {
    /// Modbus TCP, directly or through a TCP-to-RTU gateway.
    Tcp(SocketAddr),
    /// Modbus RTU over a serial line (8 data bits, no parity, 1 stop bit).
    Rtu { path: String, baud_rate: u32 },
}

impl fmt::Display for ModbusEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModbusEndpoint::Tcp(addr) => write!(f, "modbus-tcp://{addr}"),
            ModbusEndpoint::Rtu { path, baud_rate } => write!(f, "modbus-rtu://{path}@{baud_rate}"),
        }
    }
}

/// An endpoint string that is not `modbus-tcp://IP:PORT` or `modbus-rtu://PATH@BAUD`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Modbus endpoint {input:?}: {reason}")]
pub struct ParseEndpointError {
    pub input: String,
    pub reason: String,
}

impl FromStr for ModbusEndpoint {
    type Err = ParseEndpointError;

    /// Parses the [`Display`](fmt::Display) form back, so endpoints can live in config files.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ParseEndpointError {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = s.strip_prefix("modbus-tcp://") {
            let addr = rest
                .parse::<SocketAddr>()
                .map_err(|_| err("expected an IP address and port, e.g. 127.0.0.1:502"))?;
            Ok(ModbusEndpoint::Tcp(addr))
        } else if let Some(rest) = s.strip_prefix("modbus-rtu://") {
            let (path, baud) = rest
                .rsplit_once('@')
                .ok_or_else(|| err("expected PATH@BAUD, e.g. /dev/ttyUSB0@9600"))?;
            if path.is_empty() {
                return Err(err("empty serial device path"));
            }
            let baud_rate = baud
                .parse::<u32>()
                .ok()
                .filter(|b| *b > 0)
                .ok_or_else(|| err("baud rate must be a positive integer"))?;
            Ok(ModbusEndpoint::Rtu {
                path: path.to_owned(),
                baud_rate,
            })
        } else {
            Err(err("expected modbus-tcp:// or modbus-rtu://"))
        }
    }
}

/// How to reach one Modbus device.
#[derive(Debug, Clone, PartialEq)]
pub struct ModbusConfig {
    pub endpoint: ModbusEndpoint,
    /// Slave address (RTU) or unit identifier (TCP).
    pub unit_id: u8,
    /// Real-time limit for one connect or one request/reply exchange.
    pub timeout: Duration,
    /// Extra attempts after a timeout or link failure (not after a Modbus exception).
    pub retries: u32,
}

impl ModbusConfig {
    /// Unit 1, 1 s timeout, 2 retries: a 2-register read at 9600 baud takes ~20 ms on the wire
    /// plus tens of ms of device latency, so 1 s is generous but still detects a dead line fast.
    pub fn new(endpoint: ModbusEndpoint) -> Self {
        Self {
            endpoint,
            unit_id: 1,
            timeout: Duration::from_secs(1),
            retries: 2,
        }
    }
}

/// RTU inter-frame silence (Modbus over Serial Line V1.02, §2.5.1.1): at least 3.5 character
/// times between frames, a character being 10 bits at 8N1; above 19200 baud the spec fixes it at
/// 1.75 ms. TCP has no such silence.
pub fn rtu_silence(baud_rate: u32) -> Duration {
    if baud_rate > 19_200 {
        Duration::from_micros(1750)
    } else {
        Duration::from_secs_f64(3.5 * 10.0 / f64::from(baud_rate.max(1)))
    }
}

/// One Modbus link — a TCP connection (to a device or to a TCP-to-RTU gateway) or one RS-485
/// line — shared by every unit on it.
///
/// A serial port opens exclusively and an RS-485 line carries one exchange at a time, so the
/// bus, not the device, owns the connection: each device gets a cheap [`ModbusTransport`]
/// handle ([`ModbusBus::unit`]) with its own unit id, timeout and retries. Exchanges are
/// serialised one *attempt* at a time, so a dead unit holds the line for at most its own
/// timeout per attempt and its neighbours are served between its retries. A unit that does not
/// answer is that unit's outage ([`ModbusTransport::is_connected`] turns false for it alone);
/// only a failure of the link itself (connect refused, EIO, port gone) takes the bus down.
pub struct ModbusBus {
    endpoint: ModbusEndpoint,
    link: Mutex<Link>,
    /// False after a link-level failure, until a connect succeeds.
    up: AtomicBool,
    /// Connections made so far (see [`ModbusTransport::connections`]).
    connections: AtomicU64,
}

struct Link {
    /// `None` until connected, and again after any failure that may have desynchronised the
    /// link. An attempt takes the context out while it runs, so an attempt dropped
    /// mid-exchange (e.g. on cancellation) leaves no half-used connection behind.
    ctx: Option<Context>,
    /// When the last exchange on the line ended (reply, error or timeout), for the RTU silence.
    last_io: Option<Instant>,
    /// True once a connection has been made, to count reconnects apart from the first connect.
    ever_connected: bool,
    /// The last connection ended in a link-level failure (not a unit's silence).
    lost: bool,
}

impl fmt::Debug for ModbusBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModbusBus")
            .field("endpoint", &self.endpoint)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl ModbusBus {
    /// Creates the bus without connecting; the first request of any unit connects.
    pub fn new(endpoint: ModbusEndpoint) -> Arc<Self> {
        Arc::new(Self {
            endpoint,
            link: Mutex::new(Link {
                ctx: None,
                last_io: None,
                ever_connected: false,
                lost: false,
            }),
            up: AtomicBool::new(false),
            connections: AtomicU64::new(0),
        })
    }

    pub fn endpoint(&self) -> &ModbusEndpoint {
        &self.endpoint
    }

    /// A handle for the unit at `unit_id`, with its own real-time `timeout` per exchange and
    /// `retries` after a timeout or link failure.
    pub fn unit(self: &Arc<Self>, unit_id: u8, timeout: Duration, retries: u32) -> ModbusTransport {
        ModbusTransport::on_bus(
            Arc::clone(self),
            ModbusConfig {
                endpoint: self.endpoint.clone(),
                unit_id,
                timeout,
                retries,
            },
        )
    }

    /// Best effort: false after a link-level failure, until the next successful connect.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Least silence between the end of one exchange and the next request.
    fn silence(&self) -> Duration {
        match &self.endpoint {
            ModbusEndpoint::Tcp(_) => Duration::ZERO,
            ModbusEndpoint::Rtu { baud_rate, .. } => rtu_silence(*baud_rate),
        }
    }

    async fn connect(&self, slave: Slave) -> std::io::Result<Context> {
        match &self.endpoint {
            ModbusEndpoint::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(*addr).await?;
                // One small request, one small reply: never hold a request back for Nagle.
                stream.set_nodelay(true)?;
                Ok(tokio_modbus::client::tcp::attach_slave(stream, slave))
            }
            ModbusEndpoint::Rtu { path, baud_rate } => {
                use tokio_serial::SerialPortBuilderExt as _;
                let port = tokio_serial::new(path.as_str(), *baud_rate)
                    .data_bits(tokio_serial::DataBits::Eight)
                    .parity(tokio_serial::Parity::None)
                    .stop_bits(tokio_serial::StopBits::One)
                    .open_native_async()
                    .map_err(std::io::Error::from)?;
                // Whatever waits in the input queue answers an abandoned exchange.
                tokio_serial::SerialPort::clear(&port, tokio_serial::ClearBuffer::Input)
                    .map_err(std::io::Error::from)?;
                Ok(tokio_modbus::client::rtu::attach_slave(port, slave))
            }
        }
    }
}

/// One unit's view of a Modbus link: connects lazily, times out every exchange and reconnects
/// after failures. Safe to share: requests are serialised on the [`ModbusBus`], as a Modbus
/// link requires. A device with a link of its own is a bus of one ([`ModbusTransport::new`]).
pub struct ModbusTransport {
    bus: Arc<ModbusBus>,
    config: ModbusConfig,
    /// This unit's last exchange got an answer (a reply or a Modbus exception).
    connected: AtomicBool,
    /// The `device` label of `ppu_transport_reconnects_total` (see [`Self::set_metrics_device`]).
    metrics_device: OnceLock<String>,
}

impl fmt::Debug for ModbusTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModbusTransport")
            .field("config", &self.config)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// How one attempt ended without a reply.
enum AttemptError {
    /// The device's considered answer (a Modbus exception): never retried.
    Final(DeviceError),
    /// A timeout or a link failure: retried.
    Retry(DeviceError),
}

impl ModbusTransport {
    /// Creates a transport with a link of its own (a bus of one) without connecting; the
    /// first request connects.
    pub fn new(config: ModbusConfig) -> Self {
        let bus = ModbusBus::new(config.endpoint.clone());
        Self::on_bus(bus, config)
    }

    /// A handle onto a shared `bus`; `config.endpoint` should be the bus's (the bus decides).
    pub fn on_bus(bus: Arc<ModbusBus>, config: ModbusConfig) -> Self {
        Self {
            bus,
            config,
            connected: AtomicBool::new(false),
            metrics_device: OnceLock::new(),
        }
    }

    /// Names the device this link serves in the `ppu_transport_reconnects_total` metric (the
    /// driver knows its device id, the transport does not). Only the first call counts; until
    /// one, the label is the peer ([`Self::describe`]).
    pub fn set_metrics_device(&self, device: impl Into<String>) {
        let _ = self.metrics_device.set(device.into());
    }

    pub fn config(&self) -> &ModbusConfig {
        &self.config
    }

    /// The link this unit is on.
    pub fn bus(&self) -> &Arc<ModbusBus> {
        &self.bus
    }

    /// Human-readable peer, e.g. `modbus-tcp://127.0.0.1:5020 unit 1`.
    pub fn describe(&self) -> String {
        format!("{} unit {}", self.bus.endpoint, self.config.unit_id)
    }

    /// Best effort: true if this unit's last exchange was answered and the link is up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed) && self.bus.is_up()
    }

    /// How many connections this unit's link has opened. Every failure drops the connection, so
    /// a change means the peer may have been swapped: drivers re-check its identity. On a shared
    /// bus a neighbour's reconnect counts too, which only makes the check more frequent.
    pub fn connections(&self) -> u64 {
        self.bus.connections.load(Ordering::Relaxed)
    }

    /// Reads `count` holding registers starting at `addr` (function 03).
    pub async fn read_holding(&self, addr: u16, count: u16) -> Result<Vec<u16>, DeviceError> {
        let what = describe_read(addr, count);
        // A Modbus reply holds at most 125 registers; refuse before touching the wire.
        if !(1..=125).contains(&count) {
            return Err(DeviceError::Refused {
                what,
                reason: "a Modbus read covers 1 to 125 registers".to_owned(),
            });
        }
        let response = self
            .call(
                Request::ReadHoldingRegisters(addr, count),
                &what,
                addr,
                count,
            )
            .await?;
        match response {
            Response::ReadHoldingRegisters(words) if words.len() == usize::from(count) => Ok(words),
            Response::ReadHoldingRegisters(words) => Err(DeviceError::Corrupt {
                what,
                reason: format!("expected {count} registers, got {}", words.len()),
            }),
            other => Err(unexpected(what, &other)),
        }
    }

    /// Writes one holding register (function 06) and checks the echo.
    pub async fn write_single(&self, addr: u16, value: u16) -> Result<(), DeviceError> {
        let what = format!("write of {value} to register {addr}");
        let response = self
            .call(Request::WriteSingleRegister(addr, value), &what, addr, 1)
            .await?;
        match response {
            Response::WriteSingleRegister(a, v) if a == addr && v == value => Ok(()),
            Response::WriteSingleRegister(a, v) => Err(DeviceError::Corrupt {
                what,
                reason: format!("echo was {v} to register {a}"),
            }),
            other => Err(unexpected(what, &other)),
        }
    }

    /// Writes consecutive holding registers (function 16) and checks the echo.
    pub async fn write_multiple(&self, addr: u16, values: &[u16]) -> Result<(), DeviceError> {
        let what = format!("write of {} registers at {addr}", values.len());
        // A Modbus PDU holds at most 123 registers; refuse before touching the wire.
        let count = u16::try_from(values.len())
            .ok()
            .filter(|n| (1..=123).contains(n))
            .ok_or_else(|| DeviceError::Refused {
                what: what.clone(),
                reason: "a Modbus write carries 1 to 123 registers".to_owned(),
            })?;
        let request = Request::WriteMultipleRegisters(addr, Cow::Borrowed(values));
        let response = self.call(request, &what, addr, count).await?;
        match response {
            Response::WriteMultipleRegisters(a, n) if a == addr && n == count => Ok(()),
            Response::WriteMultipleRegisters(a, n) => Err(DeviceError::Corrupt {
                what,
                reason: format!("echo was {n} registers at {a}"),
            }),
            other => Err(unexpected(what, &other)),
        }
    }

    /// Runs one request with connect-on-demand, timeouts and bounded retries. The line is
    /// held for one attempt at a time: between attempts (during the backoff) the other units
    /// on the bus get their turn.
    async fn call(
        &self,
        request: Request<'_>,
        what: &str,
        addr: u16,
        count: u16,
    ) -> Result<Response, DeviceError> {
        let mut backoff = INITIAL_BACKOFF;
        let mut last_error = None;
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            match self.attempt(&request, what, addr, count).await {
                Ok(response) => {
                    self.connected.store(true, Ordering::Relaxed);
                    return Ok(response);
                }
                Err(AttemptError::Final(e)) => {
                    self.connected.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                Err(AttemptError::Retry(e)) => {
                    tracing::warn!(
                        peer = %self.describe(),
                        attempt,
                        retries = self.config.retries,
                        error = %e,
                        "modbus request failed"
                    );
                    self.connected.store(false, Ordering::Relaxed);
                    last_error = Some(e);
                }
            }
        }
        self.connected.store(false, Ordering::Relaxed);
        Err(last_error.unwrap_or_else(|| {
            DeviceError::Disconnected(format!("{}: no attempt made", self.describe()))
        }))
    }

    /// One exchange with the line held: connect if needed, keep the inter-frame silence,
    /// send, wait for the reply under this unit's timeout.
    async fn attempt(
        &self,
        request: &Request<'_>,
        what: &str,
        addr: u16,
        count: u16,
    ) -> Result<Response, AttemptError> {
        let timeout = self.config.timeout;
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let slave = Slave(self.config.unit_id);
        let bus = &self.bus;
        let mut link = bus.link.lock().await;
        let mut ctx = match link.ctx.take() {
            Some(ctx) => ctx,
            None => match tokio::time::timeout(timeout, bus.connect(slave)).await {
                Ok(Ok(ctx)) => {
                    // Every reopen counts, also one after a unit's timeout (the connection was
                    // dropped then too); only one after a link failure is news in the log.
                    if link.ever_connected {
                        if link.lost {
                            tracing::info!(peer = %self.describe(), "modbus reconnected");
                        } else {
                            tracing::debug!(peer = %self.describe(), "modbus reopened");
                        }
                        super::count_reconnect("modbus", &self.metrics_device, || self.describe());
                    } else {
                        tracing::debug!(peer = %self.describe(), "modbus connected");
                    }
                    link.ever_connected = true;
                    link.lost = false;
                    bus.connections.fetch_add(1, Ordering::Relaxed);
                    bus.up.store(true, Ordering::Relaxed);
                    ctx
                }
                Ok(Err(e)) => {
                    link.lost = true;
                    bus.up.store(false, Ordering::Relaxed);
                    return Err(AttemptError::Retry(DeviceError::Disconnected(format!(
                        "{}: {e}",
                        self.describe()
                    ))));
                }
                Err(_) => {
                    link.lost = true;
                    bus.up.store(false, Ordering::Relaxed);
                    return Err(AttemptError::Retry(DeviceError::Timeout {
                        what: format!("connect to {}", self.describe()),
                        timeout_ms,
                    }));
                }
            },
        };
        ctx.set_slave(slave);
        // Only sleep while the silence still runs: even a zero sleep waits for a timer tick.
        if let Some(last) = link.last_io {
            let free = last + bus.silence();
            if Instant::now() < free {
                tokio::time::sleep_until(free).await;
            }
        }
        let result = tokio::time::timeout(timeout, ctx.call(request.clone())).await;
        link.last_io = Some(Instant::now());
        // On every failure below `ctx` is dropped instead of being put back: the next attempt
        // (of any unit) opens a fresh connection, so a late or partial reply can never be read
        // as the answer to the next request.
        let error = match result {
            Ok(Ok(Ok(response))) => {
                link.ctx = Some(ctx);
                return Ok(response);
            }
            Ok(Ok(Err(exception))) => {
                link.ctx = Some(ctx);
                return Err(AttemptError::Final(DeviceError::Refused {
                    what: what.to_owned(),
                    reason: exception_reason(exception, addr, count),
                }));
            }
            // The link itself failed: the whole bus is down until a reconnect.
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                link.lost = true;
                bus.up.store(false, Ordering::Relaxed);
                // tokio-modbus reports a closed stream as the last OS error, often "os error 0".
                if e.raw_os_error() == Some(0) {
                    DeviceError::Disconnected(format!("{}: connection closed", self.describe()))
                } else {
                    DeviceError::Disconnected(format!("{}: {e}", self.describe()))
                }
            }
            // A garbled reply or one from another unit: this exchange's problem.
            Ok(Err(tokio_modbus::Error::Protocol(e))) => DeviceError::Corrupt {
                what: what.to_owned(),
                reason: e.to_string(),
            },
            // No answer from this unit: its outage, not the bus's.
            Err(_) => DeviceError::Timeout {
                what: format!("reply to {what} from {}", self.describe()),
                timeout_ms,
            },
        };
        Err(AttemptError::Retry(error))
    }
}

fn describe_read(addr: u16, count: u16) -> String {
    format!("read of {}", describe_span(addr, count))
}

/// "register 7" or "registers 1..=5".
fn describe_span(addr: u16, count: u16) -> String {
    if count <= 1 {
        format!("register {addr}")
    } else {
        let last = u32::from(addr) + u32::from(count) - 1;
        format!("registers {addr}..={last}")
    }
}

fn unexpected(what: String, response: &Response) -> DeviceError {
    DeviceError::Corrupt {
        what,
        reason: format!("unexpected response {response:?}"),
    }
}

/// E.g. "illegal data address (exception 02) at register 9999".
fn exception_reason(exception: ExceptionCode, addr: u16, count: u16) -> String {
    let name = match exception {
        ExceptionCode::IllegalFunction => "illegal function",
        ExceptionCode::IllegalDataAddress => "illegal data address",
        ExceptionCode::IllegalDataValue => "illegal data value",
        ExceptionCode::ServerDeviceFailure => "server device failure",
        ExceptionCode::Acknowledge => "acknowledge",
        ExceptionCode::ServerDeviceBusy => "server device busy",
        ExceptionCode::MemoryParityError => "memory parity error",
        ExceptionCode::GatewayPathUnavailable => "gateway path unavailable",
        ExceptionCode::GatewayTargetDevice => "gateway target device failed to respond",
        ExceptionCode::Custom(_) => "unknown exception",
    };
    let code = u8::from(exception);
    format!(
        "{name} (exception {code:02X}) at {}",
        describe_span(addr, count)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_display_round_trips() {
        let tcp = ModbusEndpoint::Tcp("127.0.0.1:5020".parse().unwrap());
        assert_eq!(tcp.to_string(), "modbus-tcp://127.0.0.1:5020");
        let rtu = ModbusEndpoint::Rtu {
            path: "/dev/ttyUSB0".into(),
            baud_rate: 9600,
        };
        assert_eq!(rtu.to_string(), "modbus-rtu:///dev/ttyUSB0@9600");
        for e in [tcp, rtu] {
            assert_eq!(e.to_string().parse::<ModbusEndpoint>().unwrap(), e);
        }
    }

    #[test]
    fn bad_endpoints_are_rejected() {
        for s in [
            "tcp://1.2.3.4:5",
            "modbus-tcp://localhost",
            "modbus-rtu:///dev/ttyS0",
            "modbus-rtu://@9600",
            "modbus-rtu:///dev/ttyS0@0",
        ] {
            assert!(s.parse::<ModbusEndpoint>().is_err(), "{s}");
        }
    }

    #[test]
    fn exception_reason_names_register_and_code() {
        assert_eq!(
            exception_reason(ExceptionCode::IllegalDataAddress, 9999, 1),
            "illegal data address (exception 02) at register 9999"
        );
        assert_eq!(
            exception_reason(ExceptionCode::Custom(0x0C), 1, 5),
            "unknown exception (exception 0C) at registers 1..=5"
        );
    }

    #[tokio::test]
    async fn unreachable_peer_is_disconnected_after_retries() {
        // Bind then drop a listener to get a local port that refuses connections.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let mut config = ModbusConfig::new(ModbusEndpoint::Tcp(addr));
        config.retries = 1;
        let transport = ModbusTransport::new(config);
        let err = transport.read_holding(1, 1).await.unwrap_err();
        assert!(matches!(err, DeviceError::Disconnected(_)), "{err:?}");
        assert!(!transport.is_connected());
    }

    /// A deliberately broken device: every read answers two registers, every single write
    /// echoes a different value, register 7 raises exception 02.
    struct Broken;

    impl tokio_modbus::server::Service for Broken {
        type Request = Request<'static>;
        type Response = Response;
        type Exception = ExceptionCode;
        type Future = std::future::Ready<Result<Response, ExceptionCode>>;

        fn call(&self, req: Self::Request) -> Self::Future {
            std::future::ready(match req {
                Request::ReadHoldingRegisters(7, _) => Err(ExceptionCode::IllegalDataAddress),
                Request::ReadHoldingRegisters(..) => Ok(Response::ReadHoldingRegisters(vec![1, 2])),
                Request::WriteSingleRegister(a, v) => {
                    Ok(Response::WriteSingleRegister(a, v.wrapping_add(1)))
                }
                _ => Err(ExceptionCode::IllegalFunction),
            })
        }
    }

    async fn serve_broken() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio_modbus::server::tcp::Server::new(listener);
        tokio::spawn(async move {
            let on_connected = |stream, _| async move { Ok(Some((Broken, stream))) };
            let _ = server.serve(&on_connected, |_| {}).await;
        });
        addr
    }

    #[tokio::test]
    async fn malformed_replies_are_corrupt_and_exceptions_refused() {
        let addr = serve_broken().await;
        let transport = ModbusTransport::new(ModbusConfig::new(ModbusEndpoint::Tcp(addr)));

        assert_eq!(transport.read_holding(1, 2).await, Ok(vec![1, 2]));
        let err = transport.read_holding(1, 5).await.unwrap_err();
        assert!(
            matches!(&err, DeviceError::Corrupt { reason, .. } if reason.contains("expected 5")),
            "{err:?}"
        );
        let err = transport.write_single(2, 100).await.unwrap_err();
        assert!(matches!(err, DeviceError::Corrupt { .. }), "{err:?}");
        let err = transport.read_holding(7, 1).await.unwrap_err();
        assert_eq!(
            err,
            DeviceError::Refused {
                what: "read of register 7".into(),
                reason: "illegal data address (exception 02) at register 7".into(),
            }
        );
        let err = transport.write_multiple(2, &[1, 2]).await.unwrap_err();
        assert!(
            matches!(&err, DeviceError::Refused { reason, .. } if reason.contains("exception 01")),
            "{err:?}"
        );
        let err = transport.read_holding(1, 0).await.unwrap_err();
        assert!(matches!(err, DeviceError::Refused { .. }), "{err:?}");
        // None of that broke the link.
        assert!(transport.is_connected());
    }
}
