//! Giving freed heap back to the operating system after a burst.
//!
//! glibc's malloc keeps memory freed by a burst (thousands of decoded experiments in a
//! `SubmitBatch`, hundreds of streams replaying the log at once, each on its own blocking
//! thread and so often its own arena) for reuse, and returns it only when the top of an arena
//! is free, which fragmentation rarely allows. Resident memory then only grows. So a task
//! looks now and then at the resident size and, when it grew by more than a threshold since
//! the last look, asks malloc to release its free pages (`malloc_trim`, which `madvise`s them
//! away; live data is untouched). Measured in docs/BENCHMARKS.md ("Memory after bursts").

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the trimmer looks.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(2);
/// Growth of the resident size that makes the trimmer act.
pub const TRIM_GROWTH_BYTES: usize = 8 * 1024 * 1024;

/// Starts the trimmer; it ends with `stop`. A no-op where the allocator is not glibc's.
pub fn spawn_trimmer(stop: CancellationToken) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(async move {
        let mut trimmer = Trimmer::new(TRIM_GROWTH_BYTES);
        let mut tick = tokio::time::interval(TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            // malloc_trim walks every arena under its lock: off the async workers.
            match tokio::task::spawn_blocking(move || {
                trimmer.look();
                trimmer
            })
            .await
            {
                Ok(t) => trimmer = t,
                Err(_) => return,
            }
        }
    });
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    drop(stop);
}

/// Trims when the resident size grew by `growth` bytes since the last trim (or the lowest size
/// seen since).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[derive(Debug, Clone, Copy)]
pub struct Trimmer {
    growth: usize,
    baseline: usize,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
impl Trimmer {
    pub fn new(growth: usize) -> Trimmer {
        Trimmer {
            growth,
            baseline: resident_bytes().unwrap_or(0),
        }
    }

    /// Trims if due; returns whether it did.
    pub fn look(&mut self) -> bool {
        let Some(rss) = resident_bytes() else {
            return false;
        };
        if rss <= self.baseline.saturating_add(self.growth) {
            self.baseline = self.baseline.min(rss);
            return false;
        }
        // SAFETY: malloc_trim only returns free pages; 0 keeps no extra padding at the top.
        unsafe { libc::malloc_trim(0) };
        self.baseline = resident_bytes().unwrap_or(rss);
        true
    }
}

/// This process's resident size (`/proc/self/statm`), bytes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn resident_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).ok().map(|p| pages * p)
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn fragmented_free_memory_goes_back_and_a_steady_process_is_left_alone() {
        let mut t = Trimmer::new(32 * 1024 * 1024);
        assert!(!t.look(), "nothing grew yet");
        // 128 MB in small blocks, then keep every 64th: the rest is free but fragmented, so
        // it cannot go back by shrinking the heap's top.
        let blocks: Vec<Vec<u8>> = (0..256 * 1024).map(|i| vec![i as u8; 512]).collect();
        let kept: Vec<Vec<u8>> = blocks.into_iter().step_by(64).collect();
        let before = resident_bytes().expect("statm");
        assert!(t.look(), "grew by ~128 MB, must trim");
        let after = resident_bytes().expect("statm");
        assert!(
            after + 64 * 1024 * 1024 < before,
            "trim returned too little: {before} -> {after} bytes"
        );
        assert!(!t.look(), "nothing grew since the trim");
        assert_eq!(kept.len(), 4096);
    }
}
