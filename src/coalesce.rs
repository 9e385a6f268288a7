//! Request coalescing ("single flight"): concurrent lookups of one key share one upstream call.
//!
//! moka's `try_get_with` coalesces too, but only for keys that are absent; the broker must also
//! refresh keys whose entry is present but expired (kept for stale-if-error), so coalescing is its
//! own small piece built on `tokio::sync::OnceCell`: the first caller runs the work, the others
//! wait on the same cell and clone its result. If the running caller is cancelled (its client went
//! away), the cell stays empty and the next waiter runs the work instead.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

/// In-flight work, by key.
#[derive(Debug)]
pub struct Coalescer<K, V> {
    inflight: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K, V> Default for Coalescer<K, V> {
    fn default() -> Self {
        Self {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Coalescer<K, V> {
    /// Runs `work` for `key` unless another caller already is, and returns its result, with `true`
    /// when this caller did the work and `false` when it waited for another's.
    pub async fn run<F, Fut>(&self, key: &K, work: F) -> (V, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let mut led = false;
        let value = cell
            .get_or_init(|| {
                led = true;
                work()
            })
            .await
            .clone();
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|current| Arc::ptr_eq(current, &cell)) {
            map.remove(key);
        }
        (value, led)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_run_and_later_callers_run_again() {
        let c = Arc::new(Coalescer::<&'static str, usize>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (c, runs) = (c.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                c.run(&"k", || async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    runs.fetch_add(1, Ordering::SeqCst) + 1
                })
                .await
            }));
        }
        let mut leaders = 0;
        for t in tasks {
            let (v, led) = t.await.unwrap();
            assert_eq!(v, 1);
            leaders += usize::from(led);
        }
        assert_eq!((runs.load(Ordering::SeqCst), leaders), (1, 1));
        let (v, led) = c.run(&"k", || async { 7 }).await;
        assert_eq!((v, led), (7, true), "finished work is not reused");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_leader_hands_the_work_to_a_waiter() {
        let c = Arc::new(Coalescer::<u8, u8>::default());
        let c2 = c.clone();
        let leader = tokio::spawn(async move { c2.run(&1, std::future::pending::<u8>).await });
        tokio::task::yield_now().await;
        let c3 = c.clone();
        let waiter = tokio::spawn(async move { c3.run(&1, || async { 9 }).await });
        tokio::task::yield_now().await;
        leader.abort();
        assert_eq!(waiter.await.unwrap(), (9, true));
    }
}
