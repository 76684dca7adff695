//! Latency percentiles for the reports.

use std::time::Duration;

use serde::Serialize;

/// Percentiles of a set of durations in milliseconds, by the nearest-rank method (the
/// smallest sample with at least p% of the samples at or below it). All `None` when
/// there is no sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl Percentiles {
    pub fn of(samples: &[Duration]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let at = |percent: f64| nearest_rank(&sorted, percent).map(millis);
        Self { count: sorted.len(), p50: at(50.0), p90: at(90.0), p99: at(99.0), max: sorted.last().copied().map(millis) }
    }
}

/// Returns the nearest-rank percentile of sorted samples.
fn nearest_rank(sorted: &[Duration], percent: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (percent / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Milliseconds rounded to a tenth.
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 10_000.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|v| Duration::from_millis(*v)).collect()
    }

    #[test]
    fn percentiles_nearest_rank() {
        // 1..=100 ms, shuffled: p50 is the 50th sample, p90 the 90th, p99 the 99th.
        let mut samples: Vec<u64> = (1..=100).rev().collect();
        samples.swap(3, 70);
        let p = Percentiles::of(&ms(&samples));
        assert_eq!(p.count, 100);
        assert_eq!(p.p50, Some(50.0));
        assert_eq!(p.p90, Some(90.0));
        assert_eq!(p.p99, Some(99.0));
        assert_eq!(p.max, Some(100.0));
    }

    #[test]
    fn percentiles_small_sets() {
        let one = Percentiles::of(&ms(&[7]));
        assert_eq!((one.p50, one.p99, one.max), (Some(7.0), Some(7.0), Some(7.0)));

        let three = Percentiles::of(&ms(&[30, 10, 20]));
        assert_eq!(three.p50, Some(20.0));
        assert_eq!(three.p90, Some(30.0));
    }

    #[test]
    fn percentiles_empty_are_none() {
        let empty = Percentiles::of(&[]);
        assert_eq!(empty.count, 0);
        assert_eq!(empty.p50, None);
        assert_eq!(empty.max, None);
    }

    #[test]
    fn millis_keep_one_decimal() {
        let p = Percentiles::of(&[Duration::from_micros(1_234_567)]);
        assert_eq!(p.max, Some(1234.6));
    }
}
