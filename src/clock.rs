//! Where the broker's notion of "now" comes from, for the cache and the circuit breakers.
//!
//! Production uses [`SystemClock`] (tokio's `Instant`, so unit tests can pause it). Integration
//! tests run the real server over real sockets, where tokio's paused clock would also fire I/O
//! timeouts early; they use [`ManualClock`] instead, which only moves when the test says so.

use std::fmt::Debug;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A source of the current instant.
pub trait Clock: Send + Sync + Debug + 'static {
    /// Now.
    fn now(&self) -> Instant;

    /// This clock's time when tokio's clock read `reading` (a moment ago): [`Clock::now`] for a
    /// caller that has just read tokio's clock, without reading it again. The default, for a
    /// clock that does not follow tokio's, is [`Clock::now`].
    fn at(&self, reading: Instant) -> Instant {
        let _ = reading;
        self.now()
    }
}

/// The real clock (tokio's, so `#[tokio::test(start_paused = true)]` controls it).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn at(&self, reading: Instant) -> Instant {
        reading
    }
}

/// A clock that moves only when told: real time plus an offset the test advances.
#[derive(Debug, Default)]
pub struct ManualClock {
    offset: Mutex<Duration>,
}

impl ManualClock {
    /// A clock at real time.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.at(Instant::now())
    }

    fn at(&self, reading: Instant) -> Instant {
        reading + *self.offset.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `at` as a wall-clock timestamp, given that the same clock reads `now` at this moment
/// (never a panic: an instant the system clock cannot express gives now).
pub fn wall_time(now: Instant, at: Instant) -> prost_types::Timestamp {
    let wall = std::time::SystemTime::now();
    let t = if at >= now {
        wall.checked_add(at - now)
    } else {
        wall.checked_sub(now - at)
    };
    prost_types::Timestamp::from(t.unwrap_or(wall))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_is_now_for_a_reading_just_taken() {
        let reading = Instant::now();
        assert_eq!(SystemClock.at(reading), reading);
        let manual = ManualClock::new();
        manual.advance(Duration::from_secs(90));
        assert_eq!(manual.at(reading), reading + Duration::from_secs(90));
        // `now` is `at` of a fresh reading: never behind the earlier reading's time.
        assert!(manual.now() >= manual.at(reading));
    }
}
