//! The systemd service notification protocol (sd_notify(3)), by hand: a datagram of
//! newline-separated `KEY=VALUE` assignments sent to the Unix socket named by `NOTIFY_SOCKET`
//! (a path, or `@name` in the abstract namespace). A few lines, so no libsystemd. Outside
//! systemd (`NOTIFY_SOCKET` unset) every call is a no-op.
//!
//! ppud sends `READY=1` once the store is open, the devices are configured and the gRPC
//! listener is bound (the unit's `Type=notify`), `WATCHDOG=1` every half `WatchdogSec` while a
//! liveness check passes, `RELOADING=1` … `READY=1` around a SIGHUP reload, and `STOPPING=1`
//! when it begins to shut down.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where notifications go. Cheap to clone; sending never blocks for long (a datagram).
#[derive(Debug, Clone)]
pub struct Notifier {
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier of this process's service manager: `NOTIFY_SOCKET`, if set.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => Notifier::new(&s.to_string_lossy()).map(Some),
        }
    }

    /// A notifier for the socket `NOTIFY_SOCKET` would name: an absolute path, or `@name`
    /// for Linux's abstract namespace.
    pub fn new(socket: &str) -> io::Result<Notifier> {
        let addr = if let Some(name) = socket.strip_prefix('@') {
            abstract_addr(name.as_bytes())?
        } else if socket.starts_with('/') {
            SocketAddr::from_pathname(socket)?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET {socket:?}: neither a path nor @abstract"),
            ));
        };
        Ok(Notifier { addr })
    }

    /// Sends one notification, e.g. `READY=1` or `STATUS=…\nREADY=1`.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let sent = socket.send_to_addr(state.as_bytes(), &self.addr)?;
        if sent != state.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "notification truncated",
            ));
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets are Linux only",
    ))
}

/// `RELOADING=1` with the `MONOTONIC_USEC` systemd wants beside it (sd_notify(3); required
/// under `Type=notify-reload`, harmless under `Type=notify`). Follow it with `READY=1` once
/// the reload is done.
pub fn reloading() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } == 0 {
        let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
        format!("RELOADING=1\nMONOTONIC_USEC={usec}")
    } else {
        "RELOADING=1".to_owned()
    }
}

/// The watchdog interval the service manager expects pings within (`WATCHDOG_USEC`), if it
/// is set for this process (`WATCHDOG_PID`, when present, names it).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_from(usec: Option<&str>, pid: Option<&str>, own: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn notifications_reach_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind");
        listener
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let n = Notifier::new(path.to_str().expect("utf-8")).expect("notifier");
        n.notify("READY=1\nSTATUS=serving").expect("sent");
        assert_eq!(receive(&listener), "READY=1\nSTATUS=serving");
        n.notify("STOPPING=1").expect("sent");
        assert_eq!(receive(&listener), "STOPPING=1");

        let name = format!("ppu-notify-test-{}", std::process::id());
        let addr = abstract_addr(name.as_bytes()).expect("abstract address");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        listener
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Notifier::new(&format!("@{name}"))
            .expect("notifier")
            .notify("WATCHDOG=1")
            .expect("sent");
        assert_eq!(receive(&listener), "WATCHDOG=1");

        assert!(Notifier::new("relative/path").is_err());
        // Nobody listening: an error to log, never a panic.
        drop(listener);
        let gone = Notifier::new(path.to_str().expect("utf-8")).expect("notifier");
        std::fs::remove_file(&path).expect("remove");
        assert!(gone.notify("READY=1").is_err());
    }

    #[test]
    fn the_watchdog_interval_is_for_this_process_only() {
        assert_eq!(
            watchdog_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_from(None, None, 7), None);
    }
}
