//! Serial-line transport (RS-232 through tokio-serial) for ASCII request/reply instruments: the
//! NE-1000 syringe pump family and MT-SICS balances.
//!
//! This module owns everything between "send these bytes, give me the reply" and the wire:
//!
//! - **Framing** ([`Framing`], [`FrameDecoder`]): NE-1000 replies are `STX … ETX` in basic mode
//!   and `STX len payload CRC ETX` in safe mode; MT-SICS replies are `\r\n`-terminated lines. The
//!   decoder is a pure byte-level state machine that skips garbage and abandons partial frames,
//!   so a burst of power-up noise or a reply with a dropped byte costs at most one command.
//! - **Resynchronisation**: before each command the OS input queue is flushed (stale bytes from
//!   an abandoned exchange can never be taken as this reply); every decoded frame is offered to
//!   the caller's parser and one that does not parse is discarded as noise while reading goes on
//!   until the deadline; after a timeout the line is drained until quiet before the retry.
//! - **Timeouts and bounded retries**: every exchange runs under a real-time deadline; a timeout,
//!   an I/O error or a vanished port is retried `retries` times with a short backoff, never more.
//! - **Exclusive open**: the port is opened with `TIOCEXCL` plus an exclusive `flock` (the
//!   serialport defaults), so a second opener — another ppud, a terminal program — fails with a
//!   clear "busy" error instead of silently stealing half the replies.
//! - **Reconnects**: a port that disappears (USB adapter unplugged: `EIO`, end of file, or the
//!   device node gone) is closed and reopened by path on the next attempt, so a stable name such
//!   as `/dev/serial/by-id/…` keeps working when the adapter comes back.
//! - **Inter-command gap**: a configurable minimum silence between the end of one exchange and
//!   the next command, for instruments that drop commands arriving too soon after a reply.
//!
//! Protocol timeouts here are real time ([`tokio::time`]), never the physical [`Clock`](crate::Clock).

use std::fmt;
use std::io::ErrorKind as IoKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_serial::{SerialPort as _, SerialPortBuilderExt as _, SerialStream};

use crate::device::DeviceError;

/// Start of a NE-1000 reply frame.
pub const STX: u8 = 0x02;
/// End of a NE-1000 reply frame.
pub const ETX: u8 = 0x03;
/// Longest payload of a safe-mode frame. Keeping it below 45 also keeps the length byte
/// (`payload + 4`) below the ASCII digits, which is how a decoder tells a safe-mode frame from
/// a basic one (whose second byte is the first digit of the address).
pub const MAX_SAFE_PAYLOAD: usize = 40;
/// Longest basic `STX … ETX` payload accepted; anything longer is noise.
const MAX_BASIC_PAYLOAD: usize = 64;
/// Longest `\r\n` line accepted; anything longer is noise.
const MAX_LINE: usize = 256;

/// First pause before a retry; doubled per attempt up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(200);
/// After a timeout, the line counts as quiet once nothing arrived for this long…
const DRAIN_QUIET: Duration = Duration::from_millis(20);
/// …and draining gives up after this long (a device that keeps talking is noise anyway).
const DRAIN_MAX: Duration = Duration::from_millis(200);

/// CRC-16-CCITT as the NE-1000 safe mode uses it: polynomial 0x1021, initial value 0x0000,
/// no reflection, no final XOR (the "XMODEM" parameter set). `"123456789"` gives `0x31C3`.
pub fn crc16_ccitt(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A payload too long for one safe-mode frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("safe-mode payload of {0} bytes exceeds {MAX_SAFE_PAYLOAD}")]
pub struct PayloadTooLong(pub usize);

/// Wraps `payload` in a NE-1000 safe-mode frame: `STX`, length byte (`payload + 4`), payload,
/// CRC-16-CCITT of the payload (high byte first), `ETX`.
pub fn encode_safe_frame(payload: &[u8]) -> Result<Vec<u8>, PayloadTooLong> {
    if payload.len() > MAX_SAFE_PAYLOAD {
        return Err(PayloadTooLong(payload.len()));
    }
    let crc = crc16_ccitt(payload);
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(STX);
    // Bounded by MAX_SAFE_PAYLOAD above.
    out.push((payload.len() + 4) as u8);
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc.to_be_bytes());
    out.push(ETX);
    Ok(out)
}

/// How replies are delimited on a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// NE-1000 family: basic `STX payload ETX` frames and safe-mode
    /// `STX len payload CRC ETX` frames, told apart by the byte after `STX`.
    Ne1000,
    /// ASCII lines terminated by `\r\n` (MT-SICS).
    CrLf,
    /// ASCII lines terminated by a lone `\r` (Alicat flow controllers); a `\n` after the `\r`
    /// is tolerated and dropped.
    Cr,
}

/// One reply, as the decoder delimited it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The bytes between the delimiters (no `STX`/`ETX`, length, CRC or `\r\n`).
    pub payload: Vec<u8>,
    /// True for a CRC-checked NE-1000 safe-mode frame.
    pub safe: bool,
}

/// What the decoder found at one candidate start position.
enum Attempt {
    /// A complete frame ending just before this index.
    Frame {
        payload: Vec<u8>,
        safe: bool,
        end: usize,
    },
    /// Not a frame: skip this start position.
    Invalid,
    /// Could still become a frame when more bytes arrive.
    Incomplete,
}

/// Splits a byte stream into frames, skipping noise and partial frames.
///
/// Pure and synchronous, so it can be fed arbitrary bytes in tests: it never panics and its
/// buffer stays bounded.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    framing: Framing,
    buf: Vec<u8>,
    discarded: usize,
}

impl FrameDecoder {
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            buf: Vec::new(),
            discarded: 0,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes thrown away as noise or partial frames since creation or [`FrameDecoder::clear`].
    pub fn discarded(&self) -> usize {
        self.discarded
    }

    /// Bytes held waiting for the rest of a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Forgets everything buffered.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.discarded = 0;
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Option<Frame> {
        match self.framing {
            Framing::Ne1000 => self.next_ne1000(),
            Framing::CrLf => self.next_line(),
            Framing::Cr => self.next_cr_line(),
        }
    }

    fn drop_front(&mut self, n: usize) {
        let n = n.min(self.buf.len());
        self.discarded += n;
        self.buf.drain(..n);
    }

    fn next_ne1000(&mut self) -> Option<Frame> {
        // The earliest complete frame wins; an earlier incomplete candidate that a complete one
        // follows was noise that happened to contain STX.
        let mut first_incomplete = None;
        let mut found = None;
        for start in 0..self.buf.len() {
            if self.buf[start] != STX {
                continue;
            }
            match ne1000_at(&self.buf, start) {
                Attempt::Frame { payload, safe, end } => {
                    found = Some((start, end, Frame { payload, safe }));
                    break;
                }
                Attempt::Incomplete => {
                    first_incomplete.get_or_insert(start);
                }
                Attempt::Invalid => {}
            }
        }
        if let Some((start, end, frame)) = found {
            self.drop_front(start);
            self.buf.drain(..end - start);
            return Some(frame);
        }
        match first_incomplete {
            Some(start) => self.drop_front(start),
            None => self.drop_front(self.buf.len()),
        }
        None
    }

    fn next_line(&mut self) -> Option<Frame> {
        loop {
            // Garbage (a non-printable byte, a lone CR or LF) ends whatever line was building.
            let mut bad = None;
            let mut crlf = None;
            for (i, &b) in self.buf.iter().enumerate() {
                match b {
                    b'\r' => match self.buf.get(i + 1) {
                        Some(b'\n') => {
                            crlf = Some(i);
                            break;
                        }
                        Some(_) => {
                            bad = Some(i);
                            break;
                        }
                        None => break,
                    },
                    0x20..=0x7E => {}
                    _ => {
                        bad = Some(i);
                        break;
                    }
                }
                if i >= MAX_LINE {
                    bad = Some(i);
                    break;
                }
            }
            if let Some(i) = bad {
                self.drop_front(i + 1);
                continue;
            }
            let i = crlf?;
            let payload = self.buf[..i].to_vec();
            self.buf.drain(..i + 2);
            if payload.iter().all(|b| *b == b' ') {
                continue;
            }
            return Some(Frame {
                payload,
                safe: false,
            });
        }
    }
}

impl FrameDecoder {
    fn next_cr_line(&mut self) -> Option<Frame> {
        loop {
            // A `\n` (the tail of a CRLF) between lines is dropped, not counted as noise.
            while self.buf.first() == Some(&b'\n') {
                self.buf.remove(0);
            }
            let mut end = None;
            let mut bad = None;
            for (i, &b) in self.buf.iter().enumerate() {
                match b {
                    b'\r' => {
                        end = Some(i);
                        break;
                    }
                    0x20..=0x7E if i < MAX_LINE => {}
                    _ => {
                        bad = Some(i);
                        break;
                    }
                }
            }
            if let Some(i) = bad {
                self.drop_front(i + 1);
                continue;
            }
            let i = end?;
            let payload = self.buf[..i].to_vec();
            self.buf.drain(..=i);
            if payload.iter().all(|b| *b == b' ') {
                continue;
            }
            return Some(Frame {
                payload,
                safe: false,
            });
        }
    }
}

/// Tries to decode a NE-1000 frame starting at `buf[start] == STX`.
fn ne1000_at(buf: &[u8], start: usize) -> Attempt {
    let Some(&second) = buf.get(start + 1) else {
        return Attempt::Incomplete;
    };
    if second.is_ascii_digit() {
        // Basic mode: printable ASCII up to ETX.
        for (k, &b) in buf[start + 1..].iter().enumerate() {
            if b == ETX {
                let payload = &buf[start + 1..start + 1 + k];
                // Address (two digits) and a status character at least.
                return if payload.len() >= 3 {
                    Attempt::Frame {
                        payload: payload.to_vec(),
                        safe: false,
                        end: start + 2 + k,
                    }
                } else {
                    Attempt::Invalid
                };
            }
            if !(0x20..=0x7E).contains(&b) || k >= MAX_BASIC_PAYLOAD {
                return Attempt::Invalid;
            }
        }
        return Attempt::Incomplete;
    }
    let len = usize::from(second);
    // Safe mode: the length byte counts itself, the payload, two CRC bytes and ETX.
    if !(4..=MAX_SAFE_PAYLOAD + 4).contains(&len) {
        return Attempt::Invalid;
    }
    let end = start + 1 + len;
    if buf.len() < end {
        return Attempt::Incomplete;
    }
    if buf[end - 1] != ETX {
        return Attempt::Invalid;
    }
    let payload = &buf[start + 2..end - 3];
    let crc = u16::from_be_bytes([buf[end - 3], buf[end - 2]]);
    if crc16_ccitt(payload) != crc {
        return Attempt::Invalid;
    }
    Attempt::Frame {
        payload: payload.to_vec(),
        safe: true,
        end,
    }
}

/// How to reach one serial instrument.
#[derive(Debug, Clone, PartialEq)]
pub struct SerialConfig {
    /// Device path, e.g. `/dev/ttyUSB0`, `/dev/serial/by-id/…` or a pty such as `/dev/pts/3`.
    pub path: String,
    /// Line speed; always 8 data bits, no parity, 1 stop bit, no flow control.
    pub baud_rate: u32,
    pub framing: Framing,
    /// Real-time limit for one command's reply.
    pub timeout: Duration,
    /// Extra attempts after a timeout or a link failure.
    pub retries: u32,
    /// Least silence between the end of one exchange and the next command.
    pub gap: Duration,
}

impl SerialConfig {
    /// 9600 baud, 500 ms timeout, 2 retries, no gap. A short command and its reply take
    /// ~25 ms on the wire at 9600 baud, so 500 ms still detects a dead line quickly.
    pub fn new(path: impl Into<String>, framing: Framing) -> Self {
        Self {
            path: path.into(),
            baud_rate: 9600,
            framing,
            timeout: Duration::from_millis(500),
            retries: 2,
            gap: Duration::ZERO,
        }
    }

    /// Human-readable, e.g. `serial:///dev/ttyUSB0@9600`.
    pub fn describe(&self) -> String {
        format!("serial://{}@{}", self.path, self.baud_rate)
    }
}

/// Per-request overrides of the configured timeout and retries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestOptions {
    pub timeout: Option<Duration>,
    pub retries: Option<u32>,
}

/// Why a port could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Another process (or another handle in this one) holds the port.
    #[error("serial port {path} is busy: another program has it open (ports open exclusively)")]
    Busy { path: String },
    /// No such device: unplugged, or the wrong path.
    #[error("serial port {path} not found (unplugged?)")]
    NotFound { path: String },
    #[error("cannot open serial port {path}: {reason}")]
    Other { path: String, reason: String },
}

impl From<OpenError> for DeviceError {
    fn from(e: OpenError) -> Self {
        DeviceError::Disconnected(e.to_string())
    }
}

/// Opens `config.path` exclusively, 8N1, no flow control.
pub fn open_port(config: &SerialConfig) -> Result<SerialStream, OpenError> {
    let path = config.path.clone();
    let port = tokio_serial::new(config.path.as_str(), config.baud_rate)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(tokio_serial::Parity::None)
        .stop_bits(tokio_serial::StopBits::One)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
        .map_err(|e| match e.kind() {
            // serialport reports both EBUSY (TIOCEXCL) and a held flock as NoDevice.
            tokio_serial::ErrorKind::NoDevice => OpenError::Busy { path: path.clone() },
            tokio_serial::ErrorKind::Io(IoKind::NotFound) => {
                OpenError::NotFound { path: path.clone() }
            }
            _ => OpenError::Other {
                path: path.clone(),
                reason: e.to_string(),
            },
        })?;
    Ok(port)
}

struct PortSlot {
    port: Option<SerialStream>,
    /// When the last exchange ended, for the inter-command gap.
    last_io: Option<Instant>,
    decoder: FrameDecoder,
}

/// One serial port shared by the instruments on it: an RS-232 daisy chain of addressed
/// NE-1000 pumps, or a single instrument (a bus of one).
///
/// A port opens exclusively, so the bus, not the device, owns it; each device gets a
/// [`SerialTransport`] handle ([`SerialBus::device`]) with its own timeout and retries, and
/// picks its own replies by address in its `accept` function. Exchanges are serialised one
/// *attempt* at a time, so a silent pump holds the line for at most its own timeout per
/// attempt and its neighbours are served between its retries. A device that does not answer
/// is that device's outage; only a port-level failure (EIO, end of file, the device node gone)
/// takes the bus down, and the port is then reopened by path on the next attempt.
pub struct SerialBus {
    /// Path, baud rate, framing and gap of the line (its timeout and retries are unused).
    config: SerialConfig,
    slot: Mutex<PortSlot>,
    /// False after a port-level failure, until the port is open again.
    up: AtomicBool,
    ever_connected: AtomicBool,
}

impl fmt::Debug for SerialBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialBus")
            .field("port", &self.config.describe())
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl SerialBus {
    /// Creates the bus without opening the port; the first request of any device opens it.
    /// `config.timeout` and `config.retries` are the defaults of [`SerialBus::device`] handles
    /// made by [`SerialTransport::new`]; each handle has its own.
    pub fn new(config: SerialConfig) -> Arc<Self> {
        let decoder = FrameDecoder::new(config.framing);
        Arc::new(Self {
            config,
            slot: Mutex::new(PortSlot {
                port: None,
                last_io: None,
                decoder,
            }),
            up: AtomicBool::new(false),
            ever_connected: AtomicBool::new(false),
        })
    }

    /// A handle for one device on this line, with its own real-time `timeout` per reply and
    /// `retries` after a timeout or a port failure.
    pub fn device(self: &Arc<Self>, timeout: Duration, retries: u32) -> SerialTransport {
        let mut config = self.config.clone();
        config.timeout = timeout;
        config.retries = retries;
        SerialTransport::on_bus(Arc::clone(self), config)
    }

    pub fn config(&self) -> &SerialConfig {
        &self.config
    }

    /// Best effort: false after a port-level failure, until the port is open again.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn describe(&self) -> String {
        self.config.describe()
    }
}

/// One device's view of a serial line: opens lazily, times out every exchange, retries a
/// bounded number of times and reopens the port after it vanished. Safe to share: exchanges
/// are serialised on the [`SerialBus`], as a half-duplex line requires. A device with a port
/// of its own is a bus of one ([`SerialTransport::new`]).
pub struct SerialTransport {
    bus: Arc<SerialBus>,
    /// The bus's line settings with this device's timeout and retries.
    config: SerialConfig,
    /// This device's last exchange was answered.
    connected: AtomicBool,
    /// The `device` label of `ppu_transport_reconnects_total` (see [`Self::set_metrics_device`]).
    metrics_device: OnceLock<String>,
}

impl fmt::Debug for SerialTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialTransport")
            .field("config", &self.config)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// How one attempt ended without an accepted reply.
enum AttemptError {
    /// The port is unusable; drop it and reopen.
    Link(DeviceError),
    /// No acceptable reply in time; the port stays open.
    Timeout(DeviceError),
}

impl SerialTransport {
    /// Creates a transport with a port of its own (a bus of one) without opening it; the
    /// first request opens it.
    pub fn new(config: SerialConfig) -> Self {
        Self::on_bus(SerialBus::new(config.clone()), config)
    }

    /// A handle onto a shared `bus` with `config`'s timeout and retries (the bus's path, baud
    /// rate, framing and gap apply).
    pub fn on_bus(bus: Arc<SerialBus>, config: SerialConfig) -> Self {
        let config = SerialConfig {
            timeout: config.timeout,
            retries: config.retries,
            ..bus.config.clone()
        };
        Self {
            bus,
            config,
            connected: AtomicBool::new(false),
            metrics_device: OnceLock::new(),
        }
    }

    /// Names the device this link serves in the `ppu_transport_reconnects_total` metric (the
    /// driver knows its device id, the transport does not). Only the first call counts; until
    /// one, the label is the port ([`Self::describe`]).
    pub fn set_metrics_device(&self, device: impl Into<String>) {
        let _ = self.metrics_device.set(device.into());
    }

    pub fn config(&self) -> &SerialConfig {
        &self.config
    }

    /// The line this device is on.
    pub fn bus(&self) -> &Arc<SerialBus> {
        &self.bus
    }

    pub fn describe(&self) -> String {
        self.config.describe()
    }

    /// Best effort: true if this device's last exchange was answered and the port is open.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed) && self.bus.is_up()
    }

    /// Opens the port now (if it is not open), reporting why it cannot be.
    pub async fn connect(&self) -> Result<(), OpenError> {
        let mut slot = self.bus.slot.lock().await;
        if slot.port.is_none() {
            slot.port = Some(self.open()?);
        }
        Ok(())
    }

    /// Closes the port (for every device on the bus; the next request reopens it).
    pub async fn disconnect(&self) {
        let mut slot = self.bus.slot.lock().await;
        slot.port = None;
        self.bus.up.store(false, Ordering::Relaxed);
        self.connected.store(false, Ordering::Relaxed);
    }

    fn open(&self) -> Result<SerialStream, OpenError> {
        let bus = &self.bus;
        let port =
            open_port(&bus.config).inspect_err(|_| bus.up.store(false, Ordering::Relaxed))?;
        bus.up.store(true, Ordering::Relaxed);
        if bus.ever_connected.swap(true, Ordering::Relaxed) {
            tracing::info!(port = %self.describe(), "serial port reopened");
            super::count_reconnect("serial", &self.metrics_device, || self.describe());
        } else {
            tracing::debug!(port = %self.describe(), "serial port opened");
        }
        Ok(port)
    }

    /// Sends `command` and returns the first reply frame that `accept` takes, retrying with the
    /// configured timeout and retries. `accept` sees every decoded frame; one it refuses (with a
    /// reason) is noise and reading goes on. `what` names the command in errors.
    pub async fn request<T>(
        &self,
        command: &[u8],
        what: &str,
        accept: impl FnMut(&Frame) -> Result<T, String>,
    ) -> Result<T, DeviceError> {
        self.request_with(command, what, RequestOptions::default(), accept)
            .await
    }

    /// [`SerialTransport::request`] with per-request timeout and retries.
    pub async fn request_with<T>(
        &self,
        command: &[u8],
        what: &str,
        options: RequestOptions,
        mut accept: impl FnMut(&Frame) -> Result<T, String>,
    ) -> Result<T, DeviceError> {
        let timeout = options.timeout.unwrap_or(self.config.timeout);
        let retries = options.retries.unwrap_or(self.config.retries);
        let mut backoff = INITIAL_BACKOFF;
        let mut last_error = None;
        for attempt in 0..=retries {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            // The line is held for one attempt: during the backoff the neighbours get a turn.
            let mut slot = self.bus.slot.lock().await;
            if slot.port.is_none() {
                match self.open() {
                    Ok(port) => slot.port = Some(port),
                    Err(e) => {
                        tracing::debug!(port = %self.describe(), attempt, error = %e, "serial open failed");
                        self.connected.store(false, Ordering::Relaxed);
                        last_error = Some(DeviceError::from(e));
                        continue;
                    }
                }
            }
            match self
                .attempt(&mut slot, command, what, timeout, &mut accept)
                .await
            {
                Ok(value) => {
                    self.connected.store(true, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(AttemptError::Link(e)) => {
                    tracing::warn!(port = %self.describe(), attempt, retries, error = %e, "serial link failed; reopening");
                    slot.port = None;
                    self.bus.up.store(false, Ordering::Relaxed);
                    self.connected.store(false, Ordering::Relaxed);
                    last_error = Some(e);
                }
                Err(AttemptError::Timeout(e)) => {
                    // This device's silence, not the port's: the bus stays up.
                    tracing::warn!(port = %self.describe(), attempt, retries, error = %e, "serial request timed out");
                    self.connected.store(false, Ordering::Relaxed);
                    last_error = Some(e);
                    if let Some(port) = slot.port.as_mut()
                        && drain(port).await.is_err()
                    {
                        slot.port = None;
                        self.bus.up.store(false, Ordering::Relaxed);
                    }
                    slot.last_io = Some(Instant::now());
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            DeviceError::Disconnected(format!("{}: no attempt made", self.describe()))
        }))
    }

    async fn attempt<T>(
        &self,
        slot: &mut PortSlot,
        command: &[u8],
        what: &str,
        timeout: Duration,
        accept: &mut impl FnMut(&Frame) -> Result<T, String>,
    ) -> Result<T, AttemptError> {
        // Only sleep when the gap is still running: even a zero sleep waits for the timer's
        // next tick (~1 ms), which would dominate a pty round trip.
        if let Some(last) = slot.last_io
            && Instant::now() < last + self.config.gap
        {
            tokio::time::sleep_until(last + self.config.gap).await;
        }
        let link = |e: std::io::Error| {
            AttemptError::Link(DeviceError::Disconnected(format!(
                "{}: {e}",
                self.describe()
            )))
        };
        let PortSlot {
            port,
            decoder,
            last_io,
        } = slot;
        let Some(port) = port.as_mut() else {
            return Err(link(std::io::Error::from(IoKind::NotConnected)));
        };
        // Whatever is waiting now answers an earlier, abandoned exchange (or is noise).
        port.clear(tokio_serial::ClearBuffer::Input)
            .map_err(|e| link(std::io::Error::other(e.to_string())))?;
        decoder.clear();
        port.write_all(command).await.map_err(link)?;
        port.flush().await.map_err(link)?;

        let deadline = Instant::now() + timeout;
        let mut rejected: Option<String> = None;
        let mut buf = [0u8; 256];
        let outcome = loop {
            let n = match tokio::time::timeout_at(deadline, port.read(&mut buf)).await {
                Err(_) => break None,
                Ok(Ok(0)) => {
                    return Err(link(std::io::Error::new(
                        IoKind::UnexpectedEof,
                        "port closed (device gone)",
                    )));
                }
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == IoKind::Interrupted => continue,
                Ok(Err(e)) => return Err(link(e)),
            };
            decoder.push(&buf[..n]);
            let mut accepted = None;
            while let Some(frame) = decoder.next_frame() {
                match accept(&frame) {
                    Ok(value) => {
                        accepted = Some(value);
                        break;
                    }
                    Err(reason) => {
                        tracing::debug!(port = %self.describe(), what, reason = %reason, frame = ?String::from_utf8_lossy(&frame.payload), "discarding unexpected frame");
                        rejected = Some(reason);
                    }
                }
            }
            if let Some(value) = accepted {
                break Some(value);
            }
        };
        *last_io = Some(Instant::now());
        if let Some(value) = outcome {
            if decoder.discarded() > 0 || rejected.is_some() {
                tracing::info!(port = %self.describe(), what, discarded = decoder.discarded(), "resynchronised after noise");
            }
            return Ok(value);
        }
        let mut detail = String::new();
        if decoder.discarded() > 0 {
            detail.push_str(&format!(
                "; discarded {} bytes of noise",
                decoder.discarded()
            ));
        }
        if decoder.pending() > 0 {
            detail.push_str(&format!("; {} bytes of a partial frame", decoder.pending()));
        }
        if let Some(reason) = rejected {
            detail.push_str(&format!("; last unexpected reply: {reason}"));
        }
        Err(AttemptError::Timeout(DeviceError::Timeout {
            what: format!("reply to {what} from {}{detail}", self.describe()),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }))
    }
}

/// Reads and discards until the line has been quiet for [`DRAIN_QUIET`] (or [`DRAIN_MAX`]
/// passed), so a late reply to the abandoned command cannot answer the retry.
async fn drain(port: &mut SerialStream) -> std::io::Result<()> {
    let end = Instant::now() + DRAIN_MAX;
    let mut buf = [0u8; 256];
    loop {
        let quiet = (Instant::now() + DRAIN_QUIET).min(end);
        match tokio::time::timeout_at(quiet, port.read(&mut buf)).await {
            Err(_) => return Ok(()),
            Ok(Ok(0)) => return Err(std::io::Error::from(IoKind::UnexpectedEof)),
            Ok(Ok(_)) => {
                if Instant::now() >= end {
                    return Ok(());
                }
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(framing: Framing, bytes: &[u8]) -> Vec<Frame> {
        let mut d = FrameDecoder::new(framing);
        d.push(bytes);
        std::iter::from_fn(|| d.next_frame()).collect()
    }

    fn payloads(framing: Framing, bytes: &[u8]) -> Vec<String> {
        frames(framing, bytes)
            .into_iter()
            .map(|f| String::from_utf8_lossy(&f.payload).into_owned())
            .collect()
    }

    #[test]
    fn crc16_ccitt_matches_known_vectors() {
        // XMODEM parameter set: poly 0x1021, init 0, no reflection, no final XOR.
        assert_eq!(crc16_ccitt(b""), 0x0000);
        assert_eq!(crc16_ccitt(b"123456789"), 0x31C3);
        assert_eq!(crc16_ccitt(b"A"), 0x58E5);
        assert_eq!(crc16_ccitt(&[0x00]), 0x0000);
        assert_eq!(crc16_ccitt(&[0xFF]), 0x1EF0);
        assert_eq!(crc16_ccitt(b"\x01\x02\x03\x04"), 0x0D03);
    }

    #[test]
    fn safe_frames_round_trip() {
        let frame = encode_safe_frame(b"00S").unwrap();
        assert_eq!(frame[0], STX);
        assert_eq!(frame[1], 7);
        assert_eq!(&frame[2..5], b"00S");
        let crc = crc16_ccitt(b"00S").to_be_bytes();
        assert_eq!(&frame[5..7], &crc);
        assert_eq!(frame[7], ETX);
        let decoded = frames(Framing::Ne1000, &frame);
        assert_eq!(
            decoded,
            vec![Frame {
                payload: b"00S".to_vec(),
                safe: true
            }]
        );
        assert_eq!(
            encode_safe_frame(&[b'x'; 41]).unwrap_err(),
            PayloadTooLong(41)
        );
        // The longest payload still has a length byte below the ASCII digits.
        let long = encode_safe_frame(&[b'1'; MAX_SAFE_PAYLOAD]).unwrap();
        assert!(!long[1].is_ascii_digit());
        assert_eq!(frames(Framing::Ne1000, &long).len(), 1);
    }

    #[test]
    fn basic_frames_skip_noise_and_partial_frames() {
        assert_eq!(payloads(Framing::Ne1000, b"\x0200S\x03"), ["00S"]);
        // Power-up noise, a truncated frame cut by a new STX, then the real reply.
        assert_eq!(
            payloads(Framing::Ne1000, b"\x00\xff\x13\x0200I1.2\x0200S\x03"),
            ["00S"]
        );
        // A frame too short to hold an address and status is noise.
        assert_eq!(payloads(Framing::Ne1000, b"\x020\x03\x0201W\x03"), ["01W"]);
        // Two replies in one read.
        assert_eq!(
            payloads(Framing::Ne1000, b"\x0200S\x03\x0200I\x03"),
            ["00S", "00I"]
        );
        // A safe frame with a bad CRC is skipped, the basic frame after it is taken.
        let mut bad = encode_safe_frame(b"00S").unwrap();
        bad[5] ^= 0xFF;
        bad.extend_from_slice(b"\x0200P\x03");
        assert_eq!(payloads(Framing::Ne1000, &bad), ["00P"]);
    }

    #[test]
    fn partial_frames_wait_for_the_rest() {
        let mut d = FrameDecoder::new(Framing::Ne1000);
        d.push(b"junk\x0200SI2.5");
        assert_eq!(d.next_frame(), None);
        assert_eq!(d.discarded(), 4);
        d.push(b"00W0.000ML\x03");
        assert_eq!(d.next_frame().unwrap().payload, b"00SI2.500W0.000ML");
        assert_eq!(d.pending(), 0);

        let frame = encode_safe_frame(b"00I").unwrap();
        let mut d = FrameDecoder::new(Framing::Ne1000);
        for b in &frame[..frame.len() - 1] {
            d.push(&[*b]);
            assert_eq!(d.next_frame(), None);
        }
        d.push(&frame[frame.len() - 1..]);
        assert!(d.next_frame().unwrap().safe);
    }

    #[test]
    fn a_complete_frame_after_an_incomplete_noise_candidate_wins() {
        // Noise "STX 0x2A" claims a 43-byte safe frame; the real reply follows right away.
        assert_eq!(payloads(Framing::Ne1000, b"\x02\x2a\x0200S\x03"), ["00S"]);
    }

    #[test]
    fn lines_skip_noise() {
        assert_eq!(
            payloads(Framing::CrLf, b"S S     100.00 g\r\n"),
            ["S S     100.00 g"]
        );
        assert_eq!(
            payloads(Framing::CrLf, b"\xff\x00garb\x01S D 1.0 g\r\nZ A\r\n"),
            ["S D 1.0 g", "Z A"]
        );
        // A lone CR or LF ends a corrupt line; blank lines are skipped.
        assert_eq!(payloads(Framing::CrLf, b"S S\rX\n\r\nT A\r\n"), ["T A"]);
        let mut d = FrameDecoder::new(Framing::CrLf);
        d.push(b"S S 1 g\r");
        assert_eq!(d.next_frame(), None);
        d.push(b"\n");
        assert_eq!(d.next_frame().unwrap().payload, b"S S 1 g");
        // An endless line is dropped instead of growing the buffer.
        let mut d = FrameDecoder::new(Framing::CrLf);
        d.push(&[b'x'; 1000]);
        assert_eq!(d.next_frame(), None);
        assert!(d.pending() <= MAX_LINE + 1);
    }

    #[test]
    fn cr_lines_skip_noise() {
        assert_eq!(
            payloads(Framing::Cr, b"A +014.70 +025.00 CO2\r"),
            ["A +014.70 +025.00 CO2"]
        );
        // Noise up to a stray CR is a line of its own (the caller's parser rejects it); a
        // non-printable byte ends whatever line was building; CRLF is tolerated.
        assert_eq!(
            payloads(Framing::Cr, b"\xff\x00ga\rA ?\r\n\r\nA +1 N2\r"),
            ["ga", "A ?", "A +1 N2"]
        );
        let mut d = FrameDecoder::new(Framing::Cr);
        d.push(b"A +014.70");
        assert_eq!(d.next_frame(), None);
        d.push(b" N2\r");
        assert_eq!(d.next_frame().unwrap().payload, b"A +014.70 N2");
        let mut d = FrameDecoder::new(Framing::Cr);
        d.push(&[b'x'; 1000]);
        assert_eq!(d.next_frame(), None);
        assert!(d.pending() <= MAX_LINE + 1);
    }

    #[test]
    fn ne1000_buffer_stays_bounded_on_noise() {
        let mut d = FrameDecoder::new(Framing::Ne1000);
        d.push(&[b'7'; 5000]);
        assert_eq!(d.next_frame(), None);
        assert_eq!(d.pending(), 0);
        d.push(b"\x0201");
        d.push(&[b'7'; 500]);
        assert_eq!(d.next_frame(), None);
        assert_eq!(d.pending(), 0);
    }

    #[tokio::test]
    async fn missing_port_is_a_clear_disconnect() {
        let mut config = SerialConfig::new("/dev/ppu-no-such-port", Framing::CrLf);
        config.retries = 1;
        let t = SerialTransport::new(config);
        let err = t
            .request(b"S\r\n", "S", |_| Ok::<_, String>(()))
            .await
            .unwrap_err();
        let DeviceError::Disconnected(msg) = &err else {
            panic!("{err:?}");
        };
        assert!(msg.contains("not found"), "{msg}");
        assert!(!t.is_connected());
    }

    proptest::proptest! {
        #[test]
        fn decoders_survive_arbitrary_bytes_in_arbitrary_chunks(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            cut in 1usize..64,
        ) {
            for framing in [Framing::Ne1000, Framing::CrLf, Framing::Cr] {
                let mut d = FrameDecoder::new(framing);
                for chunk in bytes.chunks(cut) {
                    d.push(chunk);
                    while let Some(frame) = d.next_frame() {
                        proptest::prop_assert!(frame.payload.len() <= MAX_LINE.max(MAX_BASIC_PAYLOAD));
                    }
                    // Never more than one unfinished frame is kept.
                    proptest::prop_assert!(d.pending() <= MAX_LINE + 2);
                }
            }
        }

        #[test]
        fn a_reply_after_noise_is_always_found(
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
        ) {
            // Noise followed by a quiet gap (the driver's drain), then the reply.
            let mut d = FrameDecoder::new(Framing::Ne1000);
            d.push(&noise);
            while d.next_frame().is_some() {}
            d.clear();
            d.push(b"\x0200S\x03");
            proptest::prop_assert_eq!(d.next_frame().map(|f| f.payload), Some(b"00S".to_vec()));
        }
    }
}
