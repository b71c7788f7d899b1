//! The standard Prometheus process collector (`process_*` series), read from `/proc/self` by
//! hand: a crate for six numbers would pull in more than it saves. Only `/proc/self` is read,
//! so it works under the unit's `ProcSubset=pid` (which hides `/proc/stat` and its boot time:
//! the start time is derived from `CLOCK_BOOTTIME` instead).

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// The process's own figures; `None` where the system would not say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Process {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
    pub start_time_seconds: Option<f64>,
}

impl Process {
    /// Reads the current process's figures.
    pub fn read() -> Process {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        // Fields after the command name (which may hold spaces and parentheses); index 0 is
        // field 3 (`state`) of proc(5).
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(") "))
            .map(|(_, rest)| rest.split_ascii_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        let ticks_ok = ticks > 0.0;
        let cpu_seconds = match (field(14), field(15)) {
            (Some(u), Some(s)) if ticks_ok => Some((u + s) / ticks),
            _ => None,
        };
        let start_time_seconds = field(22)
            .filter(|_| ticks_ok)
            .and_then(|start| Some(now()? - (boot_time()? - start / ticks)));
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count().saturating_sub(1) as f64); // less read_dir's own descriptor
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a valid, writable rlimit.
        let max_fds = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0)
            .then_some(limit.rlim_cur as f64);
        Process {
            cpu_seconds,
            resident_bytes: field(24).filter(|_| page > 0.0).map(|p| p * page),
            virtual_bytes: field(23),
            open_fds,
            max_fds,
            start_time_seconds,
        }
    }
}

/// Wall-clock seconds since the Unix epoch.
fn now() -> Option<f64> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64())
}

/// Seconds since boot, suspend included (the clock `/proc/self/stat`'s start time counts in).
fn boot_time() -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    (unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == 0)
        .then(|| ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

/// Appends the `process_*` series in the Prometheus text format (the names and help of the
/// official client libraries' process collector).
pub fn render(out: &mut String) {
    let p = Process::read();
    let series = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            p.cpu_seconds,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            p.resident_bytes,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            p.virtual_bytes,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            p.open_fds,
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            p.max_fds,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            p.start_time_seconds,
        ),
    ];
    for (name, kind, help, value) in series {
        if let Some(v) = value {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n\n"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reads_itself() {
        let p = Process::read();
        let rss = p.resident_bytes.expect("rss");
        assert!(rss > 1024.0 * 1024.0, "{rss}");
        assert!(p.virtual_bytes.expect("vsize") >= rss);
        // Other tests open files concurrently: only that this one counts.
        let _file = std::fs::File::open("/proc/self/stat").expect("open");
        let open = Process::read().open_fds.expect("fds");
        assert!(open >= 1.0 && p.max_fds.expect("limit") >= open, "{open}");
        let started = p.start_time_seconds.expect("start time");
        let now = now().expect("clock");
        // Started before now, and not before this test binary could have been built.
        assert!(
            started <= now + 1.0 && started > now - 24.0 * 3600.0,
            "{started} vs {now}"
        );
        assert!(p.cpu_seconds.expect("cpu") >= 0.0);
        let mut text = String::new();
        render(&mut text);
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{text}"
        );
        assert!(text.contains("\nprocess_open_fds "), "{text}");
    }
}
