//! Forwarding feedback upstream in the background.
//!
//! `ReportFeedback` only enqueues; a worker delivers each report to the endpoint that served that
//! proxy (else the first healthy one), retrying transient failures (connection errors, timeouts,
//! 429, 5xx) with exponential backoff. The queue is a bounded ring of at most
//! `feedback_queue_size` reports and at most [`MAX_QUEUED_BYTES`] of them: when either is
//! passed, enqueueing drops the oldest reports and counts them at once (so a stuck upstream shows
//! up in `dropped` immediately). Enqueueing never blocks, so feedback never slows `RequestProxy`.

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
/// Most memory the queued reports may hold (see [`WireFeedback::approx_bytes`]), whatever
/// `feedback_queue_size` says: a firehose of large reports drops the oldest instead of growing.
pub const MAX_QUEUED_BYTES: usize = 16 * 1024 * 1024;

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

/// The queued reports, bounded in count and in bytes.
#[derive(Debug)]
struct Queue {
    /// Each report with its size.
    items: VecDeque<(Outgoing, usize)>,
    bytes: usize,
    capacity: usize,
    max_bytes: usize,
}

impl Queue {
    fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            items: VecDeque::with_capacity(capacity.min(1024)),
            bytes: 0,
            capacity: capacity.max(1),
            max_bytes,
        }
    }

    /// Appends a report; returns how many of the oldest were dropped to stay within the bounds
    /// (the newest is always kept).
    fn push(&mut self, outgoing: Outgoing) -> u64 {
        let size = outgoing.body.approx_bytes();
        self.items.push_back((outgoing, size));
        self.bytes += size;
        let mut dropped = 0;
        while self.items.len() > 1 && (self.items.len() > self.capacity || self.bytes > self.max_bytes) {
            if let Some((_, size)) = self.items.pop_front() {
                self.bytes -= size;
                dropped += 1;
            }
        }
        dropped
    }

    fn pop(&mut self) -> Option<Outgoing> {
        let (outgoing, size) = self.items.pop_front()?;
        self.bytes -= size;
        Some(outgoing)
    }

    fn len(&self) -> usize {
        self.items.len()
    }
}

/// The bounded ring shared by the broker and the worker.
#[derive(Debug)]
struct Ring {
    items: Mutex<Queue>,
    /// Signalled on every enqueue and on close (single consumer: a stored permit is never lost).
    ready: Notify,
    closed: AtomicBool,
    /// Reports taken from the queue whose delivery has not ended yet.
    in_flight: AtomicUsize,
}

impl Ring {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The oldest report, waiting for one; `None` once the queue is closed.
    async fn pop(&self) -> Option<Outgoing> {
        loop {
            {
                let mut items = self.lock();
                if let Some(o) = items.pop() {
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
    /// Starts the worker; the queue holds at most `capacity` reports and [`MAX_QUEUED_BYTES`].
    pub fn start(upstreams: Arc<Upstreams>, capacity: usize, dropped: Counter) -> Self {
        let ring = Arc::new(Ring {
            items: Mutex::new(Queue::new(capacity, MAX_QUEUED_BYTES)),
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
        let dropped = self.ring.lock().push(outgoing);
        if dropped > 0 {
            let before = self.stats.dropped.inc_by(dropped);
            let total = before + dropped;
            // Logarithmic logging: a stuck upstream must not flood the log.
            if (before + 1..=total).any(u64::is_power_of_two) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use proxy_broker_core::model::ExternalServiceConfig;

    fn upstreams() -> Upstreams {
        let cfg = ExternalServiceConfig {
            enabled: true,
            endpoints: vec!["http://127.0.0.1:9".into()],
            ..Default::default()
        };
        Upstreams::new(&cfg, Arc::new(SystemClock), Arc::default()).unwrap()
    }

    fn report(upstreams: &Upstreams, client_id: String, details_len: usize) -> Outgoing {
        Outgoing {
            served_by: None,
            body: upstreams.wire_feedback(&crate::request::Feedback {
                proxy_url: Some("socks5://p:1080".into()),
                exchange_id: "binance".into(),
                connection_type: proxy_broker_core::ConnectionType::Http,
                success: false,
                latency_ms: None,
                error_details: Some("e".repeat(details_len)),
                timestamp: std::time::SystemTime::now(),
                client_id,
                http_status: None,
                retry_after: None,
            }),
        }
    }

    #[test]
    fn the_queue_is_bounded_in_count_and_in_bytes_dropping_the_oldest() {
        let u = upstreams();
        let size = report(&u, "feed-000".into(), 1000).body.approx_bytes();
        // (name, capacity, byte limit, reports pushed, kept, dropped)
        let cases = [
            ("within both bounds", 10, 10 * size, 5, 5, 0),
            ("count bound", 3, 100 * size, 5, 3, 2),
            ("byte bound", 100, 4 * size, 10, 4, 6),
            (
                "byte bound below one report keeps the newest",
                100,
                size / 2,
                3,
                1,
                2,
            ),
        ];
        for (name, capacity, max_bytes, pushed, kept, dropped) in cases {
            let mut q = Queue::new(capacity, max_bytes);
            let total: u64 = (0..pushed)
                .map(|i| q.push(report(&u, format!("feed-{i:03}"), 1000)))
                .sum();
            assert_eq!((q.len(), total), (kept, dropped), "{name}");
            assert!(q.bytes <= max_bytes.max(size), "{name}: {} bytes", q.bytes);
            let oldest_kept = q.pop().unwrap();
            assert_eq!(
                oldest_kept.body.client_id(),
                format!("feed-{:03}", pushed - kept),
                "{name}: the newest are kept"
            );
            while q.pop().is_some() {}
            assert_eq!(q.bytes, 0, "{name}: bytes are given back");
        }
    }

    #[test]
    fn a_firehose_of_large_reports_stays_within_the_byte_bound() {
        let u = upstreams();
        let mut q = Queue::new(1_000_000, MAX_QUEUED_BYTES);
        let mut dropped = 0;
        for i in 0..5000 {
            dropped += q.push(report(&u, format!("feed-{i}"), 8 * 1024));
        }
        assert!(q.bytes <= MAX_QUEUED_BYTES, "{} bytes", q.bytes);
        assert_eq!(dropped + q.len() as u64, 5000);
        assert!(dropped > 0, "16 MiB cannot hold 5000 reports of 8 KiB");
    }
}
