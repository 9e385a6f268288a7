//! Detached single flight: concurrent lookups of one key share one upstream call, which runs on
//! its own task under the broker's own budget.
//!
//! The shape is Go's `singleflight.DoChan`: the first caller of a key starts the work on a
//! spawned task and every caller, the first included, waits for its result on a channel with its
//! own deadline. A caller whose deadline passes (or who goes away) stops waiting and falls back on
//! its own; the work goes on for the others and still fills the cache. The in-flight entry is
//! removed by the task when the work ends (by a guard, so also if it panics), never by a caller,
//! so cancelled callers leave nothing behind. How many flights may run at once is bounded by the
//! caller of [`Flights::join`] (it passes a permit with the work).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;

/// In-flight work, by key.
#[derive(Debug)]
pub struct Flights<K, V> {
    inflight: Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Self {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

/// A caller's place in a flight.
#[derive(Debug)]
pub struct Ticket<V> {
    rx: watch::Receiver<Option<V>>,
    /// Whether this caller started the flight.
    pub led: bool,
}

/// Why waiting for a flight ended without its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// The caller's own deadline passed first.
    Deadline,
    /// The work ended without a result (its task panicked or was aborted).
    Lost,
}

impl<V: Clone> Ticket<V> {
    /// Waits for the flight's result until `deadline`.
    pub async fn wait(mut self, deadline: Option<Instant>) -> Result<V, Missed> {
        let wait = self.rx.wait_for(Option::is_some);
        let result = match deadline {
            Some(d) => match tokio::time::timeout_at(d, wait).await {
                Ok(r) => r,
                Err(_) => return Err(Missed::Deadline),
            },
            None => wait.await,
        };
        match result {
            Ok(value) => value.as_ref().cloned().ok_or(Missed::Lost),
            Err(_) => Err(Missed::Lost),
        }
    }
}

impl<K, V> Flights<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Joins the flight for `key`, or starts one: `start` is called (under the map's lock, so it
    /// must be quick) only when no flight for `key` runs, and returns the work to spawn, or `None`
    /// when no flight may start now (the caller's limit is reached). Returns `None` in that case.
    pub fn join<F, Fut>(self: &Arc<Self>, key: &K, start: F) -> Option<Ticket<V>>
    where
        F: FnOnce() -> Option<Fut>,
        Fut: Future<Output = V> + Send + 'static,
    {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = map.get(key) {
            return Some(Ticket {
                rx: rx.clone(),
                led: false,
            });
        }
        let work = start()?;
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), rx.clone());
        drop(map);
        let guard = Landing {
            flights: self.clone(),
            key: key.clone(),
        };
        tokio::spawn(async move {
            let value = work.await;
            // The entry goes before the result is published: a caller arriving from now on
            // finds the cache filled (the work's last step) or starts afresh.
            drop(guard);
            let _ = tx.send(Some(value));
        });
        Some(Ticket { rx, led: true })
    }

    /// Flights running now.
    pub fn len(&self) -> usize {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no flight runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes a flight's entry when its task ends, however it ends.
struct Landing<K: Eq + Hash, V> {
    flights: Arc<Flights<K, V>>,
    key: K,
}

impl<K: Eq + Hash, V> Drop for Landing<K, V> {
    fn drop(&mut self) {
        self.flights
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    fn work(runs: &Arc<AtomicUsize>, took: Duration) -> impl Future<Output = usize> + Send + 'static {
        let runs = runs.clone();
        async move {
            tokio::time::sleep(took).await;
            runs.fetch_add(1, Ordering::SeqCst) + 1
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_run_and_later_callers_run_again() {
        let f = Arc::new(Flights::<&'static str, usize>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (f, runs) = (f.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                let t = f
                    .join(&"k", || Some(work(&runs, Duration::from_millis(50))))
                    .unwrap();
                let led = t.led;
                (t.wait(None).await.unwrap(), led)
            }));
        }
        let mut leaders = 0;
        for t in tasks {
            let (v, led) = t.await.unwrap();
            assert_eq!(v, 1);
            leaders += usize::from(led);
        }
        assert_eq!((runs.load(Ordering::SeqCst), leaders), (1, 1));
        assert!(f.is_empty(), "a finished flight leaves no entry");
        let t = f.join(&"k", || Some(async { 7 })).unwrap();
        assert!(t.led, "finished work is not reused");
        assert_eq!(t.wait(None).await, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn an_impatient_leader_does_not_spoil_the_flight_for_patient_waiters() {
        let f = Arc::new(Flights::<u8, usize>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let leader = f
            .join(&1, || Some(work(&runs, Duration::from_millis(300))))
            .unwrap();
        let start = Instant::now();
        assert_eq!(
            leader.wait(Some(start + Duration::from_millis(50))).await,
            Err(Missed::Deadline)
        );
        let waiters: Vec<_> = (0..50)
            .map(|_| f.join(&1, || -> Option<std::future::Ready<usize>> { None }))
            .collect();
        for w in waiters {
            let w = w.expect("joins the running flight without starting one");
            assert!(!w.led);
            assert_eq!(w.wait(Some(start + Duration::from_secs(5))).await, Ok(1));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_callers_leave_nothing_behind() {
        let f = Arc::new(Flights::<u8, usize>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let caller = {
            let (f, runs) = (f.clone(), runs.clone());
            tokio::spawn(async move {
                let t = f
                    .join(&1, || Some(work(&runs, Duration::from_millis(100))))
                    .unwrap();
                t.wait(None).await
            })
        };
        tokio::task::yield_now().await;
        caller.abort();
        assert_eq!(f.len(), 1, "the flight goes on without its caller");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(f.is_empty());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_start_stores_nothing_and_a_panicking_flight_is_lost_not_stuck() {
        let f = Arc::new(Flights::<u8, usize>::default());
        assert!(
            f.join(&1, || -> Option<std::future::Ready<usize>> { None })
                .is_none()
        );
        assert!(f.is_empty());
        let t = f
            .join(&2, || {
                Some(async {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    panic!("boom")
                })
            })
            .unwrap();
        assert_eq!(t.wait(None).await, Err(Missed::Lost));
        assert!(f.is_empty());
    }
}
