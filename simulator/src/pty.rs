//! Serving a simulated serial instrument on a real pseudo-terminal.
//!
//! [`PtyServer`] opens a pty pair (`tokio_serial::SerialStream::pair`), keeps the slave end
//! open for as long as the "device" is plugged in (a pty whose slave side has no open handle
//! makes reads on the master fail with `EIO`), and answers on the master end. The driver opens
//! the slave path — `/dev/pts/N`, or a stable symlink to it — exactly as it would open
//! `/dev/ttyUSB0`, with the same exclusive lock and the same termios calls.
//!
//! The server is protocol-agnostic: a [`SerialDevice`] splits incoming bytes into requests and
//! answers each one. Line-level faults live here, because they are properties of the cable and
//! the instrument's UART rather than of the protocol ([`LineFaults`]): seeded random dropped
//! bytes, garbage bursts and lost replies, one-shot switches for tests, a silent mode, optional
//! pacing at the baud rate's byte time and a fixed device latency. [`PtyServer::unplug`] and
//! [`PtyServer::plug`] make the device node vanish and come back (USB adapter pulled and
//! reinserted); with a symlink the path stays the same, like `/dev/serial/by-id/…`.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_serial::{SerialPort as _, SerialStream};

/// A boxed reply future.
pub type ReplyFuture = Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send + 'static>>;

/// How a request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Plain text (terminator stripped).
    Plain,
    /// Inside a checked frame (e.g. NE-1000 safe mode), check passed.
    Framed,
    /// A checked frame whose check failed.
    Corrupt,
}

/// One request, as the device's input framing delimited it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub bytes: Vec<u8>,
    pub kind: RequestKind,
}

/// A simulated instrument behind a serial line.
pub trait SerialDevice: Send + Sync + 'static {
    /// Bytes arrived from the host; returns the requests they complete, in order.
    fn receive(&self, bytes: &[u8]) -> Vec<Request>;
    /// Answers one request; `None` = no reply. May wait (a balance holding `S` until stable).
    fn answer(&self, request: Request) -> ReplyFuture;
    /// The line was (re)connected: forget partial input.
    fn reset_input(&self) {}
}

/// Seeded random line faults, applied to every reply.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    pub seed: u64,
    /// Probability that one byte of a reply is lost.
    pub drop_byte: f64,
    /// Probability that a burst of garbage precedes a reply.
    pub garbage: f64,
    /// Probability that a reply is not sent at all.
    pub no_reply: f64,
    /// Pace replies at this baud rate (10 bit times per byte, 8N1); `None` = as fast as the pty.
    pub baud_rate: Option<u32>,
    /// Fixed delay before each reply (the instrument's processing time).
    pub latency: Duration,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            drop_byte: 0.0,
            garbage: 0.0,
            no_reply: 0.0,
            baud_rate: None,
            latency: Duration::ZERO,
        }
    }
}

/// Live fault switches and counters of one line. Shared with tests through [`PtyServer::faults`].
#[derive(Debug)]
pub struct LineFaults {
    config: Mutex<FaultConfig>,
    rng: Mutex<u64>,
    silent: AtomicBool,
    garbage_next: AtomicUsize,
    drop_next: AtomicUsize,
    requests: AtomicU64,
    replies: AtomicU64,
}

impl LineFaults {
    pub fn new(config: FaultConfig) -> Self {
        Self {
            rng: Mutex::new(config.seed),
            config: Mutex::new(config),
            silent: AtomicBool::new(false),
            garbage_next: AtomicUsize::new(0),
            drop_next: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            replies: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> FaultConfig {
        lock(&self.config).clone()
    }

    pub fn set_config(&self, config: FaultConfig) {
        *lock(&self.rng) = config.seed;
        *lock(&self.config) = config;
    }

    /// While true, requests are received (and counted) but never answered.
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }

    /// The next `n` replies are preceded by a garbage burst.
    pub fn garbage_next(&self, n: usize) {
        self.garbage_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` replies each lose their last byte (a partial frame: the `ETX` or `\n`).
    pub fn truncate_next(&self, n: usize) {
        self.drop_next.store(n, Ordering::SeqCst);
    }

    /// Requests received since start.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Replies sent since start.
    pub fn replies(&self) -> u64 {
        self.replies.load(Ordering::SeqCst)
    }

    fn take_one(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// splitmix64, uniform in [0, 1).
    fn uniform(&self) -> f64 {
        let mut state = lock(&self.rng);
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn index(&self, len: usize) -> usize {
        ((self.uniform() * len as f64) as usize).min(len.saturating_sub(1))
    }

    /// Line noise as an instrument emits it at power-up or on a bad cable: stray bit patterns,
    /// an STX that starts nothing, a partial status line, a lone CR.
    fn garbage(&self) -> Vec<u8> {
        const NOISE: [u8; 14] = [
            0x00, 0xFF, 0xF8, 0x80, 0xFE, 0x02, b'0', b'1', b'S', b'D', b' ', b'.', b'\r', 0x7F,
        ];
        let n = 3 + self.index(10);
        (0..n).map(|_| NOISE[self.index(NOISE.len())]).collect()
    }

    /// Applies the faults to a reply; `None` = the reply is lost.
    fn apply(&self, mut reply: Vec<u8>) -> Option<Vec<u8>> {
        let config = self.config();
        if self.silent.load(Ordering::SeqCst) {
            return None;
        }
        if config.no_reply > 0.0 && self.uniform() < config.no_reply {
            tracing::debug!("fault: reply lost");
            return None;
        }
        if !reply.is_empty() && Self::take_one(&self.drop_next) {
            tracing::debug!("fault: reply truncated");
            reply.pop();
        } else if !reply.is_empty() && config.drop_byte > 0.0 && self.uniform() < config.drop_byte {
            let i = self.index(reply.len());
            tracing::debug!(index = i, "fault: byte dropped");
            reply.remove(i);
        }
        if Self::take_one(&self.garbage_next)
            || (config.garbage > 0.0 && self.uniform() < config.garbage)
        {
            let mut noisy = self.garbage();
            tracing::debug!(bytes = noisy.len(), "fault: garbage before reply");
            noisy.extend_from_slice(&reply);
            reply = noisy;
        }
        Some(reply)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One plugged-in incarnation of the device node.
struct Plugged {
    slave_path: String,
    /// Kept open for the device's lifetime; see the module docs.
    _slave: SerialStream,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A simulated instrument served on a pty.
pub struct PtyServer {
    device: Arc<dyn SerialDevice>,
    faults: Arc<LineFaults>,
    link: Option<PathBuf>,
    plugged: tokio::sync::Mutex<Option<Plugged>>,
    slave_path: Mutex<Option<String>>,
}

impl std::fmt::Debug for PtyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtyServer")
            .field("path", &self.path())
            .finish_non_exhaustive()
    }
}

impl PtyServer {
    /// Plugs `device` in on a new pty. With `link`, a symlink at that path points to the pty
    /// (replaced if it exists), and [`PtyServer::path`] returns it.
    pub async fn start(
        device: Arc<dyn SerialDevice>,
        faults: FaultConfig,
        link: Option<PathBuf>,
    ) -> io::Result<PtyServer> {
        let server = PtyServer {
            device,
            faults: Arc::new(LineFaults::new(faults)),
            link,
            plugged: tokio::sync::Mutex::new(None),
            slave_path: Mutex::new(None),
        };
        server.plug().await?;
        Ok(server)
    }

    /// The path a driver opens: the symlink if there is one, else the pty slave.
    pub fn path(&self) -> String {
        match &self.link {
            Some(link) => link.display().to_string(),
            None => self.slave_path().unwrap_or_default(),
        }
    }

    /// The current pty slave, e.g. `/dev/pts/7`; `None` while unplugged.
    pub fn slave_path(&self) -> Option<String> {
        lock(&self.slave_path).clone()
    }

    pub fn faults(&self) -> &Arc<LineFaults> {
        &self.faults
    }

    /// Makes the device node vanish: the pty is closed (the driver's reads and writes fail)
    /// and the symlink removed.
    pub async fn unplug(&self) {
        let mut slot = self.plugged.lock().await;
        if let Some(p) = slot.take() {
            let _ = p.stop.send(());
            if let Err(e) = p.task.await {
                tracing::warn!(error = %e, "pty task ended abnormally");
            }
            tracing::info!(path = %p.slave_path, "pty unplugged");
        }
        *lock(&self.slave_path) = None;
        if let Some(link) = &self.link {
            let _ = std::fs::remove_file(link);
        }
    }

    /// Plugs the device in on a fresh pty (a no-op if it is plugged in).
    pub async fn plug(&self) -> io::Result<()> {
        let mut slot = self.plugged.lock().await;
        if slot.is_some() {
            return Ok(());
        }
        let (master, slave) = SerialStream::pair().map_err(io::Error::from)?;
        let slave_path = slave
            .name()
            .ok_or_else(|| io::Error::other("pty slave has no name"))?;
        if let Some(link) = &self.link {
            replace_symlink(Path::new(&slave_path), link)?;
        }
        self.device.reset_input();
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(serve(
            master,
            Arc::clone(&self.device),
            Arc::clone(&self.faults),
            stop_rx,
        ));
        tracing::info!(path = %slave_path, link = ?self.link, "pty plugged in");
        *lock(&self.slave_path) = Some(slave_path.clone());
        *slot = Some(Plugged {
            slave_path,
            _slave: slave,
            stop,
            task,
        });
        Ok(())
    }

    /// Stops serving and closes the pty.
    pub async fn shutdown(self) {
        self.unplug().await;
    }
}

/// Points `link` at `target`, atomically replacing an existing link.
fn replace_symlink(target: &Path, link: &Path) -> io::Result<()> {
    let tmp = link.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

async fn serve(
    mut master: SerialStream,
    device: Arc<dyn SerialDevice>,
    faults: Arc<LineFaults>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut buf = [0u8; 512];
    loop {
        let n = tokio::select! {
            _ = &mut stop => return,
            r = master.read(&mut buf) => match r {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "pty read failed; device stops serving");
                    return;
                }
            },
        };
        for request in device.receive(&buf[..n]) {
            faults.requests.fetch_add(1, Ordering::SeqCst);
            let reply = tokio::select! {
                _ = &mut stop => return,
                r = device.answer(request) => r,
            };
            let Some(reply) = reply.and_then(|r| faults.apply(r)) else {
                continue;
            };
            let config = faults.config();
            if !config.latency.is_zero() {
                tokio::time::sleep(config.latency).await;
            }
            let written = match config.baud_rate.filter(|b| *b > 0) {
                None => master.write_all(&reply).await,
                Some(baud) => write_paced(&mut master, &reply, baud).await,
            };
            if let Err(e) = written.and(master.flush().await) {
                tracing::debug!(error = %e, "pty write failed");
                continue;
            }
            faults.replies.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Writes at the line's byte rate: 10 bit times per byte (start, 8 data, stop).
async fn write_paced(port: &mut SerialStream, bytes: &[u8], baud: u32) -> io::Result<()> {
    let byte_time = Duration::from_secs_f64(10.0 / f64::from(baud));
    let start = tokio::time::Instant::now();
    for (i, b) in bytes.iter().enumerate() {
        tokio::time::sleep_until(start + byte_time * u32::try_from(i).unwrap_or(u32::MAX)).await;
        port.write_all(std::slice::from_ref(b)).await?;
    }
    tokio::time::sleep_until(start + byte_time * u32::try_from(bytes.len()).unwrap_or(u32::MAX))
        .await;
    Ok(())
}
