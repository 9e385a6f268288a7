//! Jittered leases: every answer's lease ends at `now + ttl × (1 − U(0, jitter))`, so feeds that
//! connected together (a reconnect storm) do not all rotate together one TTL later.
//!
//! The lease never outlasts the TTL (the feed is told to cache the answer that long at most) and
//! is at least `ttl × (1 − jitter)`.

use std::time::Duration;

use tokio::time::Instant;

/// The lease length for `ttl` with `jitter` (a fraction 0..=1, clamped) and `u` drawn from
/// [0, 1) (clamped; NaN counts as 0): `ttl × (1 − u × jitter)`.
pub fn jittered(ttl: Duration, jitter: f64, u: f64) -> Duration {
    let clamp = |x: f64| if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
    let cut = clamp(u) * clamp(jitter);
    // The cut in whole nanoseconds: a float-to-int cast saturates (it never panics, unlike
    // `Duration::mul_f64` past `Duration::MAX`) and costs a few instructions on every hand-out,
    // where `Duration::try_from_secs_f64` costs about eighty. A TTL past 584 years (u64
    // nanoseconds) is cut as if it were that long.
    let nanos = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
    let off = (nanos as f64 * cut) as u64;
    ttl.saturating_sub(Duration::from_nanos(off.min(nanos)))
}

/// A lease length for `ttl` with `jitter`, drawn at random.
pub fn random_lease(ttl: Duration, jitter: f64) -> Duration {
    jittered(ttl, jitter, fastrand::f64())
}

/// When a lease of `length` taken at `now` ends (`now` itself if that instant is unrepresentable).
pub fn lease_end(now: Instant, length: Duration) -> Instant {
    now.checked_add(length).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_the_ttl_less_up_to_the_jitter() {
        let ttl = Duration::from_secs(300);
        // (row, jitter, u, expected seconds)
        let rows = [
            ("no jitter", 0.0, 0.9, 300.0),
            ("u = 0", 0.2, 0.0, 300.0),
            ("u near 1", 0.2, 0.999_999, 240.0),
            ("half", 0.2, 0.5, 270.0),
            ("full jitter", 1.0, 0.5, 150.0),
            ("jitter over 1 clamps", 5.0, 0.5, 150.0),
            ("negative jitter clamps", -1.0, 0.5, 300.0),
            ("NaN u", 0.2, f64::NAN, 300.0),
            ("u over 1 clamps", 0.2, 7.0, 240.0),
        ];
        for (row, jitter, u, expected) in rows {
            let got = jittered(ttl, jitter, u).as_secs_f64();
            assert!((got - expected).abs() < 0.001, "row {row}: {got}");
        }
        assert_eq!(jittered(Duration::MAX, 0.0, 0.0), Duration::MAX);
        // The longest TTL cut in full: no overflow, never longer than the TTL.
        assert!(jittered(Duration::MAX, 1.0, 0.999_999) < Duration::MAX);
        assert_eq!(jittered(Duration::ZERO, 1.0, 0.5), Duration::ZERO);
    }

    #[test]
    fn random_leases_never_exceed_the_ttl_and_spread_over_the_jitter() {
        let ttl = Duration::from_secs(300);
        let leases: Vec<Duration> = (0..2000).map(|_| random_lease(ttl, 0.2)).collect();
        assert!(leases.iter().all(|l| *l <= ttl && *l >= Duration::from_secs(240)));
        // Spread: 2,000 draws over 60 s land in every 10 s bucket (a miss is ~(5/6)^2000 likely).
        let mut buckets = [0usize; 6];
        for l in &leases {
            let i = ((ttl - *l).as_secs_f64() / 10.0) as usize;
            buckets[i.min(5)] += 1;
        }
        assert!(buckets.iter().all(|&n| n > 0), "{buckets:?}");
        let distinct: std::collections::HashSet<_> = leases.iter().collect();
        assert!(
            distinct.len() > 1900,
            "leases line up: {} distinct",
            distinct.len()
        );
    }

    #[test]
    fn an_unrepresentable_lease_end_is_now() {
        let now = Instant::now();
        assert_eq!(lease_end(now, Duration::MAX), now);
        assert_eq!(
            lease_end(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }
}
