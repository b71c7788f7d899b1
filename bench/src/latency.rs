//! Percentiles of a latency sample, computed from a sorted `Vec` (nearest rank): exact, and no
//! histogram dependency for sample sizes in the millions.

/// Summary of one latency sample, in the unit the samples were given in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
    pub max: f64,
}

impl Summary {
    /// Sorts `samples` in place. An empty sample gives NaN percentiles, which print as `NaN`
    /// rather than a misleading zero.
    pub fn of(samples: &mut [f64]) -> Summary {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        if n == 0 {
            return Summary {
                n,
                p50: f64::NAN,
                p99: f64::NAN,
                mean: f64::NAN,
                max: f64::NAN,
            };
        }
        Summary {
            n,
            p50: percentile(samples, 0.50),
            p99: percentile(samples, 0.99),
            mean: samples.iter().sum::<f64>() / n as f64,
            max: samples[n - 1],
        }
    }
}

/// Nearest-rank percentile of sorted, non-empty `sorted`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = Summary::of(&mut v);
        assert_eq!((s.n, s.p50, s.p99, s.max), (100, 50.0, 99.0, 100.0));
        assert_eq!(s.mean, 50.5);
        let one = Summary::of(&mut [7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert!(Summary::of(&mut []).p99.is_nan());
    }
}
