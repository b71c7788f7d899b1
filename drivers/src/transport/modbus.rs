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
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_modbus::client::{Client, Context};
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

/// A Modbus client that connects lazily, times out every exchange and reconnects after
/// failures. Safe to share: requests are serialised, as a Modbus link requires.
pub struct ModbusTransport {
    config: ModbusConfig,
    /// `None` until connected, and again after any failure that may have desynchronised the
    /// link. A call takes the context out while it runs, so a call future dropped mid-exchange
    /// (e.g. on cancellation) leaves no half-used connection behind.
    ctx: Mutex<Option<Context>>,
    connected: AtomicBool,
    /// True once a connection has been made, to log reconnects differently from the first connect.
    ever_connected: AtomicBool,
    /// Connections made so far (see [`Self::connections`]).
    connections: AtomicU64,
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

impl ModbusTransport {
    /// Creates the transport without connecting; the first request connects.
    pub fn new(config: ModbusConfig) -> Self {
        Self {
            config,
            ctx: Mutex::new(None),
            connected: AtomicBool::new(false),
            ever_connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
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

    /// Human-readable peer, e.g. `modbus-tcp://127.0.0.1:5020 unit 1`.
    pub fn describe(&self) -> String {
        format!("{} unit {}", self.config.endpoint, self.config.unit_id)
    }

    /// Best effort: true if the last exchange left an open connection.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// How many connections this transport has opened. Every failure drops the connection, so a
    /// change means the peer may have been swapped: drivers re-check its identity.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
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

    /// Runs one request with connect-on-demand, timeouts and bounded retries.
    async fn call(
        &self,
        request: Request<'_>,
        what: &str,
        addr: u16,
        count: u16,
    ) -> Result<Response, DeviceError> {
        let timeout = self.config.timeout;
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut slot = self.ctx.lock().await;
        let mut backoff = INITIAL_BACKOFF;
        let mut last_error = None;

        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }

            let mut ctx = match slot.take() {
                Some(ctx) => ctx,
                None => match tokio::time::timeout(timeout, self.connect()).await {
                    Ok(Ok(ctx)) => {
                        self.connections.fetch_add(1, Ordering::Relaxed);
                        if self.ever_connected.swap(true, Ordering::Relaxed) {
                            tracing::info!(peer = %self.describe(), "modbus reconnected");
                            super::count_reconnect("modbus", &self.metrics_device, || {
                                self.describe()
                            });
                        } else {
                            tracing::debug!(peer = %self.describe(), "modbus connected");
                        }
                        ctx
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %self.describe(), attempt, error = %e, "modbus connect failed");
                        last_error = Some(DeviceError::Disconnected(format!(
                            "{}: {e}",
                            self.describe()
                        )));
                        continue;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %self.describe(), attempt, "modbus connect timed out");
                        last_error = Some(DeviceError::Timeout {
                            what: format!("connect to {}", self.describe()),
                            timeout_ms,
                        });
                        continue;
                    }
                },
            };
            self.connected.store(true, Ordering::Relaxed);

            // On every failure below `ctx` is dropped instead of being put back: the next
            // attempt opens a fresh connection.
            let error = match tokio::time::timeout(timeout, ctx.call(request.clone())).await {
                Ok(Ok(Ok(response))) => {
                    *slot = Some(ctx);
                    return Ok(response);
                }
                Ok(Ok(Err(exception))) => {
                    *slot = Some(ctx);
                    return Err(DeviceError::Refused {
                        what: what.to_owned(),
                        reason: exception_reason(exception, addr, count),
                    });
                }
                // tokio-modbus reports a closed stream as the last OS error, often "os error 0".
                Ok(Err(tokio_modbus::Error::Transport(e))) if e.raw_os_error() == Some(0) => {
                    DeviceError::Disconnected(format!("{}: connection closed", self.describe()))
                }
                Ok(Err(tokio_modbus::Error::Transport(e))) => {
                    DeviceError::Disconnected(format!("{}: {e}", self.describe()))
                }
                Ok(Err(tokio_modbus::Error::Protocol(e))) => DeviceError::Corrupt {
                    what: what.to_owned(),
                    reason: e.to_string(),
                },
                Err(_) => DeviceError::Timeout {
                    what: format!("reply to {what} from {}", self.describe()),
                    timeout_ms,
                },
            };
            self.connected.store(false, Ordering::Relaxed);
            tracing::warn!(
                peer = %self.describe(),
                attempt,
                retries = self.config.retries,
                error = %error,
                "modbus request failed; dropping connection"
            );
            last_error = Some(error);
        }

        self.connected.store(false, Ordering::Relaxed);
        Err(last_error.unwrap_or_else(|| {
            DeviceError::Disconnected(format!("{}: no attempt made", self.describe()))
        }))
    }

    async fn connect(&self) -> std::io::Result<Context> {
        let slave = Slave(self.config.unit_id);
        match &self.config.endpoint {
            ModbusEndpoint::Tcp(addr) => {
                tokio_modbus::client::tcp::connect_slave(*addr, slave).await
            }
            ModbusEndpoint::Rtu { path, baud_rate } => {
                use tokio_serial::SerialPortBuilderExt as _;
                let port = tokio_serial::new(path.as_str(), *baud_rate)
                    .data_bits(tokio_serial::DataBits::Eight)
                    .parity(tokio_serial::Parity::None)
                    .stop_bits(tokio_serial::StopBits::One)
                    .open_native_async()
                    .map_err(std::io::Error::from)?;
                Ok(tokio_modbus::client::rtu::attach_slave(port, slave))
            }
        }
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
