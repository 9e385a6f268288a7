//! Forwarding feedback upstream in the background.
//!
//! `ReportFeedback` only enqueues; a worker delivers each report to the endpoint that served that
//! proxy (else the first healthy one), retrying transient failures (connection errors, timeouts,
//! 429, 5xx) with exponential backoff. The queue is a `tokio::sync::broadcast` channel used as a
//! bounded ring: when it is full the oldest report is overwritten, and the worker learns how many
//! it missed (`Lagged`) and counts them as dropped. Enqueueing never blocks, so feedback never
//! slows `RequestProxy`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use tokio::sync::{Semaphore, broadcast};

use crate::upstream::{DeliveryError, Upstreams, WireFeedback};

/// Deliveries in flight at once.
const CONCURRENCY: usize = 16;
/// Attempts per report (first try included).
const ATTEMPTS: u32 = 4;
/// First retry delay; doubles per retry.
const BACKOFF: Duration = Duration::from_millis(200);

/// Counters, shared with admin output (`dropped` is also the exported metric).
#[derive(Debug, Default)]
pub struct FeedbackStats {
    /// Reports accepted into the queue.
    pub enqueued: Counter,
    /// Reports delivered upstream.
    pub forwarded: Counter,
    /// Reports given up on after retries or a permanent error.
    pub failed: Counter,
    /// Reports dropped because the queue was full (oldest first).
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

/// The sending side, held by the broker.
#[derive(Debug)]
pub struct FeedbackQueue {
    tx: broadcast::Sender<Arc<Outgoing>>,
    /// Reports enqueued and not yet delivered, given up on or dropped (what a flush waits for).
    outstanding: Arc<AtomicUsize>,
    /// Counters.
    pub stats: Arc<FeedbackStats>,
}

impl FeedbackQueue {
    /// Starts the worker; the queue holds at most `capacity` reports.
    pub fn start(upstreams: Arc<Upstreams>, capacity: usize, dropped: Counter) -> Self {
        let (tx, rx) = broadcast::channel(capacity.max(1));
        let stats = Arc::new(FeedbackStats {
            dropped,
            ..Default::default()
        });
        let outstanding = Arc::new(AtomicUsize::new(0));
        tokio::spawn(worker(upstreams, rx, stats.clone(), outstanding.clone()));
        Self {
            tx,
            outstanding,
            stats,
        }
    }

    /// Queues a report; never blocks.
    pub fn enqueue(&self, outgoing: Outgoing) {
        self.stats.enqueued.inc();
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(Arc::new(outgoing)).is_err() {
            // The worker is gone (runtime shutting down).
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
            self.stats.dropped.inc();
        }
    }

    /// Waits up to `timeout` for queued and in-flight reports to be delivered (shutdown).
    /// Returns how many were still pending.
    pub async fn flush(&self, timeout: Duration) -> usize {
        // Not the delivery slots in use: the idle worker holds one while it waits for a report.
        let pending = || self.outstanding.load(Ordering::SeqCst);
        let until = tokio::time::Instant::now() + timeout;
        while pending() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pending()
    }

    /// Reports waiting in the queue.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }
}

async fn worker(
    upstreams: Arc<Upstreams>,
    mut rx: broadcast::Receiver<Arc<Outgoing>>,
    stats: Arc<FeedbackStats>,
    outstanding: Arc<AtomicUsize>,
) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    loop {
        // Wait for a free delivery slot first, so that a slow upstream backs reports up in the
        // bounded queue (where overflow is counted) rather than in unbounded tasks.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let outgoing = match rx.recv().await {
            Ok(o) => o,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                stats.dropped.inc_by(n);
                outstanding.fetch_sub(usize::try_from(n).unwrap_or(usize::MAX), Ordering::SeqCst);
                tracing::warn!(dropped = n, "feedback queue full: oldest reports dropped");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let (upstreams, stats, outstanding) = (upstreams.clone(), stats.clone(), outstanding.clone());
        tokio::spawn(async move {
            deliver(&upstreams, &outgoing, &stats).await;
            outstanding.fetch_sub(1, Ordering::SeqCst);
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
