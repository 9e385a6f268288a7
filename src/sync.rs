//! One poison-tolerant lock for every std mutex of the broker.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the guard even if another thread panicked while holding it: every mutex
/// here guards data that a single insert, remove or update leaves consistent, and a panic on one
/// request must not turn every later one into a panic too.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
