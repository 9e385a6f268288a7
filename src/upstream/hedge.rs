//! When to hedge: the delay after which an endpoint that has not answered gets company.
//!
//! `hedge_delay_ms: auto` is 3 × the endpoint's median latency over its last
//! [`LATENCY_SAMPLES`] successful requests, at least [`MIN_HEDGE_DELAY`] and at most half of
//! `timeout_seconds`. An endpoint with no successes yet (new, or black-holed: it never answers)
//! has no median, so the floor applies: a dead first endpoint costs each miss about 50 ms.

use std::time::Duration;

use proxy_broker_core::model::HedgeDelay;

/// Successful requests whose latency an endpoint remembers.
pub const LATENCY_SAMPLES: usize = 32;
/// Shortest automatic hedge delay.
pub const MIN_HEDGE_DELAY: Duration = Duration::from_millis(50);
/// The multiple of the median latency an endpoint may take before it is hedged.
const MEDIAN_FACTOR: u32 = 3;

/// The last [`LATENCY_SAMPLES`] latencies of successful requests (a ring).
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    samples: [Duration; LATENCY_SAMPLES],
    len: usize,
    next: usize,
}

impl Latencies {
    /// Remembers one latency, forgetting the oldest when full.
    pub fn record(&mut self, latency: Duration) {
        self.samples[self.next] = latency;
        self.next = (self.next + 1) % LATENCY_SAMPLES;
        self.len = (self.len + 1).min(LATENCY_SAMPLES);
    }

    /// The median (the upper one of an even count); `None` without samples.
    pub fn median(&self) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let mut sorted = self.samples;
        let sorted = &mut sorted[..self.len];
        let middle = self.len / 2;
        let (_, median, _) = sorted.select_nth_unstable(middle);
        Some(*median)
    }
}

/// The hedge delay for an endpoint with `median` latency; `None` means hedging is off.
pub fn delay(setting: HedgeDelay, median: Option<Duration>, timeout: Duration) -> Option<Duration> {
    match setting {
        HedgeDelay::Fixed(ms) if ms <= 0 => None,
        HedgeDelay::Fixed(ms) => Some(Duration::from_millis(ms.unsigned_abs())),
        HedgeDelay::Auto => {
            let adaptive = median.map_or(MIN_HEDGE_DELAY, |m| m.saturating_mul(MEDIAN_FACTOR));
            Some(adaptive.max(MIN_HEDGE_DELAY).min(timeout / 2))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn median_of_the_last_samples() {
        let mut l = Latencies::default();
        assert_eq!(l.median(), None);
        l.record(ms(30));
        assert_eq!(l.median(), Some(ms(30)));
        l.record(ms(10));
        l.record(ms(20));
        assert_eq!(l.median(), Some(ms(20)));
        // 32 fast samples push the slow ones out.
        for _ in 0..LATENCY_SAMPLES {
            l.record(ms(2));
        }
        assert_eq!(l.median(), Some(ms(2)));
        // One outlier does not move the median.
        l.record(ms(5000));
        assert_eq!(l.median(), Some(ms(2)));
    }

    #[test]
    fn hedge_delay_follows_the_setting() {
        let timeout = Duration::from_secs(1);
        let cases = [
            (
                "auto without history: the floor",
                HedgeDelay::Auto,
                None,
                Some(ms(50)),
            ),
            (
                "auto, fast endpoint: the floor",
                HedgeDelay::Auto,
                Some(ms(5)),
                Some(ms(50)),
            ),
            ("auto: 3 × median", HedgeDelay::Auto, Some(ms(100)), Some(ms(300))),
            (
                "auto: at most half the timeout",
                HedgeDelay::Auto,
                Some(ms(400)),
                Some(ms(500)),
            ),
            ("fixed", HedgeDelay::Fixed(120), Some(ms(400)), Some(ms(120))),
            ("fixed below the floor", HedgeDelay::Fixed(10), None, Some(ms(10))),
            ("0 turns hedging off", HedgeDelay::Fixed(0), Some(ms(5)), None),
        ];
        for (name, setting, median, want) in cases {
            assert_eq!(delay(setting, median, timeout), want, "{name}");
        }
    }
}
