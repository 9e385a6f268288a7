//! Latency percentiles and number formatting for the tables.
//!
//! Percentiles are exact (nearest rank over the sorted samples) rather than from a histogram
//! crate: every load loop here is bounded in count, so the samples fit in memory, and the tree has
//! no histogram crate to reuse.

use std::time::Duration;

/// Latency of a set of calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest sample.
    pub max: Duration,
}

/// The nearest-rank percentile `q` (0.0..=1.0) of ascending `sorted`; `None` when empty.
pub fn percentile(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let q = q.clamp(0.0, 1.0);
    // Nearest rank: the smallest sample with at least q·n samples at or below it.
    let rank = (q * sorted.len() as f64).ceil() as usize;
    let index = rank.saturating_sub(1).min(sorted.len() - 1);
    sorted.get(index).copied()
}

/// Sorts `micros` in place and summarizes it.
pub fn summarize(micros: &mut [u32]) -> Summary {
    micros.sort_unstable();
    let at = |q| Duration::from_micros(u64::from(percentile(micros, q).unwrap_or(0)));
    Summary {
        count: micros.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: at(1.0),
    }
}

/// The median of `values` (mean of the middle two for an even count); 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A duration in milliseconds with a precision that suits its size ("0.084 ms", "12.3 ms", "1003 ms").
pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        format!("{ms:.3} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// An integer with thousands separators ("10,000").
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// KiB as MiB with one decimal ("14.5 MiB").
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// A signed KiB difference as MiB ("+57.0 MiB").
pub fn mib_delta(before_kib: u64, after_kib: u64) -> String {
    let delta = after_kib as f64 - before_kib as f64;
    format!("{:+.1} MiB", delta / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_the_nearest_rank() {
        let hundred: Vec<u32> = (1..=100).collect();
        let cases: &[(&str, &[u32], f64, Option<u32>)] = &[
            ("empty", &[], 0.5, None),
            ("one sample is every percentile", &[7], 0.99, Some(7)),
            ("median of odd count", &[1, 2, 3], 0.5, Some(2)),
            (
                "median of even count is the lower middle",
                &[1, 2, 3, 4],
                0.5,
                Some(2),
            ),
            ("p99 of 1..=100", &hundred, 0.99, Some(99)),
            ("p100 is the max", &hundred, 1.0, Some(100)),
            ("p0 is the min", &hundred, 0.0, Some(1)),
            ("q above 1 is clamped", &[1, 2], 3.0, Some(2)),
            ("p99 of two samples is the larger", &[10, 20], 0.99, Some(20)),
        ];
        for (name, sorted, q, want) in cases {
            assert_eq!(percentile(sorted, *q), *want, "case {name}");
        }
    }

    #[test]
    fn summarize_sorts_and_reports_p50_p99_max() {
        let mut samples: Vec<u32> = (1..=1000).rev().collect();
        let s = summarize(&mut samples);
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50, Duration::from_micros(500));
        assert_eq!(s.p99, Duration::from_micros(990));
        assert_eq!(s.max, Duration::from_micros(1000));
        assert_eq!(summarize(&mut []), Summary::default());
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        let cases: &[(&[f64], f64)] = &[
            (&[], 0.0),
            (&[3.0, 1.0, 2.0], 2.0),
            (&[4.0, 1.0, 3.0, 2.0], 2.5),
            (&[f64::NAN, 5.0], 5.0),
        ];
        for (values, want) in cases {
            assert_eq!(median(values), *want, "median of {values:?}");
        }
    }

    #[test]
    fn numbers_are_formatted_for_tables() {
        let cases = [
            (count(0), "0"),
            (count(999), "999"),
            (count(10_000), "10,000"),
            (count(1_234_567), "1,234,567"),
            (ms(Duration::from_micros(84)), "0.084 ms"),
            (ms(Duration::from_micros(12_345)), "12.3 ms"),
            (ms(Duration::from_millis(1003)), "1003 ms"),
            (mib(14_848), "14.5 MiB"),
            (mib_delta(1024, 59_392), "+57.0 MiB"),
            (mib_delta(2048, 1024), "-1.0 MiB"),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }
}
