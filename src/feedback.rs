//! Forwarding feedback upstream in the background.
//!
//! `ReportFeedback` only enqueues; a worker delivers each report to the endpoint that served that
//! proxy (else the first healthy one), retrying transient failures (connection errors, timeouts,
//! 429, 5xx) with exponential backoff. The queue is a bounded ring of exactly
//! `feedback_queue_size` reports: when it is full, enqueueing drops the oldest report and counts it
//! at once (so a stuck upstream shows up in `dropped` immediately). Enqueueing never blocks, so
//! feedback never slows `RequestProxy`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Notify, Semaphore};

use crate::upstream::{DeliveryError, Upstreams, WireFeedback};

/// Deliveries in flight at once.
const CONCURRENCY: usize = 16;
/// Attempts per report (first try included).
const ATTEMPTS: u32 = 4;
/// First retry delay; doubles per retry.
const BACKOFF: Duration = Duration::from_millis(200);

/// Counters, shared with admin output.
#[derive(Debug, Default)]
pub struct FeedbackStats {
    /// Reports accepted into the queue.
    pub enqueued: Counter,
    /// Reports delivered upstream.
    pub forwarded: Counter,
    /// Reports given up on after retries or a permanent error.
    pub failed: Counter,
    /// Reports dropped because the queue was full (oldest first); also the exported metric.
    pub dropped: Counter,
}

/// One report on its way upstream.
#[derive(Debug)]
pub struct Outgoing {
    /// The endpoint that served the proxy, if known.
    pub served_by: Option<usize>,
    /// The body.
    pub body: WireFeedback,
}

/// The bounded ring shared by the broker and the worker.
#[derive(Debug)]
struct Ring {
    items: Mutex<VecDeque<Outgoing>>,
    capacity: usize,
    /// Signalled on every enqueue and on close (single consumer: a stored permit is never lost).
    ready: Notify,
    closed: AtomicBool,
    /// Reports taken from the queue whose delivery has not ended yet.
    in_flight: AtomicUsize,
}

impl Ring {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Outgoing>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The oldest report, waiting for one; `None` once the queue is closed.
    async fn pop(&self) -> Option<Outgoing> {
        loop {
            {
                let mut items = self.lock();
                if let Some(o) = items.pop_front() {
                    // Counted under the lock, so a flush never sees the report in neither place.
                    self.in_flight.fetch_add(1, Ordering::SeqCst);
                    return Some(o);
                }
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            self.ready.notified().await;
        }
    }
}

/// The sending side, held by the broker. Dropping it stops the worker.
#[derive(Debug)]
pub struct FeedbackQueue {
    ring: Arc<Ring>,
    /// Counters.
    pub stats: Arc<FeedbackStats>,
}

impl FeedbackQueue {
    /// Starts the worker; the queue holds at most `capacity` reports.
    pub fn start(upstreams: Arc<Upstreams>, capacity: usize, dropped: Counter) -> Self {
        let capacity = capacity.max(1);
        let ring = Arc::new(Ring {
            items: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity,
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        });
        let stats = Arc::new(FeedbackStats {
            dropped,
            ..Default::default()
        });
        tokio::spawn(worker(upstreams, ring.clone(), stats.clone()));
        Self { ring, stats }
    }

    /// Queues a report, dropping (and counting) the oldest when the queue is full; never blocks.
    pub fn enqueue(&self, outgoing: Outgoing) {
        self.stats.enqueued.inc();
        let dropped = {
            let mut items = self.ring.lock();
            let dropped = if items.len() >= self.ring.capacity {
                items.pop_front().is_some()
            } else {
                false
            };
            items.push_back(outgoing);
            dropped
        };
        if dropped {
            let total = self.stats.dropped.inc() + 1;
            // Logarithmic logging: a stuck upstream must not flood the log.
            if total.is_power_of_two() {
                tracing::warn!(
                    dropped_total = total,
                    "feedback queue full: oldest reports dropped"
                );
            }
        }
        self.ring.ready.notify_one();
    }

    /// Waits up to `timeout` for queued and in-flight reports to be delivered (shutdown).
    /// Returns how many were still pending.
    pub async fn flush(&self, timeout: Duration) -> usize {
        // Queued plus in delivery (not the delivery slots in use: the idle worker holds one while
        // it waits for a report).
        let pending = || {
            let items = self.ring.lock();
            items.len() + self.ring.in_flight.load(Ordering::SeqCst)
        };
        let until = tokio::time::Instant::now() + timeout;
        while pending() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pending()
    }

    /// Reports waiting in the queue.
    pub fn queued(&self) -> usize {
        self.ring.lock().len()
    }
}

impl Drop for FeedbackQueue {
    fn drop(&mut self) {
        self.ring.closed.store(true, Ordering::Release);
        self.ring.ready.notify_one();
    }
}

async fn worker(upstreams: Arc<Upstreams>, ring: Arc<Ring>, stats: Arc<FeedbackStats>) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    loop {
        // Wait for a free delivery slot first, so that a slow upstream backs reports up in the
        // bounded queue (where overflow is counted) rather than in unbounded tasks.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(outgoing) = ring.pop().await else {
            return;
        };
        let (upstreams, stats, ring) = (upstreams.clone(), stats.clone(), ring.clone());
        tokio::spawn(async move {
            deliver(&upstreams, &outgoing, &stats).await;
            ring.in_flight.fetch_sub(1, Ordering::SeqCst);
            drop(slot);
        });
    }
}

async fn deliver(upstreams: &Upstreams, outgoing: &Outgoing, stats: &FeedbackStats) {
    let Some(index) = upstreams.feedback_target(outgoing.served_by) else {
        stats.failed.inc();
        return;
    };
    for attempt in 0..ATTEMPTS {
        match upstreams.deliver_feedback(index, &outgoing.body).await {
            Ok(()) => {
                stats.forwarded.inc();
                return;
            }
            Err(DeliveryError::Transient(reason)) if attempt + 1 < ATTEMPTS => {
                tracing::debug!(%reason, attempt, "feedback delivery failed; retrying");
                tokio::time::sleep(BACKOFF * 2u32.pow(attempt)).await;
            }
            Err(DeliveryError::Transient(reason) | DeliveryError::Permanent(reason)) => {
                tracing::warn!(%reason, "feedback delivery given up");
                stats.failed.inc();
                return;
            }
        }
    }
}
