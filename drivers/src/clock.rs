//! Physical time with a scale factor.
//!
//! Holds, ramps and equilibration run on a [`Clock`]: with `scale = 600`, one real second is ten
//! physical minutes, so CI can run a six-hour furnace program in seconds. Protocol timeouts and
//! keep-alives never use this clock; they stay in real time (`tokio::time`).

use std::time::Duration;
use tokio::time::Instant;

/// A clock whose physical time runs `scale` times faster than real time.
///
/// Cheap to clone; clones share the same origin, so the daemon and an in-process simulator
/// built from one clock agree on "now".
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    scale: f64,
}

impl Clock {
    /// A clock starting now. `scale` must be finite and > 0; anything else is treated as 1.
    pub fn new(scale: f64) -> Self {
        let scale = if scale.is_finite() && scale > 0.0 {
            scale
        } else {
            1.0
        };
        Self {
            origin: Instant::now(),
            scale,
        }
    }

    /// Real time (scale 1).
    pub fn real() -> Self {
        Self::new(1.0)
    }

    /// Physical seconds per real second.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Physical time elapsed since the clock was created, in seconds.
    pub fn now_s(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * self.scale
    }

    /// The real duration that `physical_s` seconds of physical time take.
    pub fn to_real(&self, physical_s: f64) -> Duration {
        let real = (physical_s / self.scale).max(0.0);
        Duration::try_from_secs_f64(real).unwrap_or(Duration::MAX)
    }

    /// Sleeps for `physical_s` seconds of physical time.
    pub async fn sleep(&self, physical_s: f64) {
        tokio::time::sleep(self.to_real(physical_s)).await;
    }

    /// Sleeps until the physical time `deadline_s` (as returned by [`Clock::now_s`]).
    pub async fn sleep_until(&self, deadline_s: f64) {
        let remaining = deadline_s - self.now_s();
        if remaining > 0.0 {
            self.sleep(remaining).await;
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::real()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_scale_falls_back_to_real_time() {
        assert_eq!(Clock::new(f64::NAN).scale(), 1.0);
        assert_eq!(Clock::new(-3.0).scale(), 1.0);
        assert_eq!(Clock::new(0.0).scale(), 1.0);
    }

    #[test]
    fn physical_durations_shrink_by_the_scale() {
        let c = Clock::new(600.0);
        assert_eq!(c.to_real(7200.0), Duration::from_secs(12));
        assert_eq!(c.to_real(-5.0), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_advances_physical_time_by_the_scale() {
        let c = Clock::new(100.0);
        c.sleep(500.0).await;
        let now = c.now_s();
        assert!((500.0..501.0).contains(&now), "now = {now}");
    }
}
