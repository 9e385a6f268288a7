//! Feedback to the broker, fire-and-forget: [`FeedbackQueue::send`] puts the report in a bounded
//! queue and returns at once; a background task delivers it with `ReportFeedback`, or, when
//! several are waiting, up to [`MAX_BATCH`] of them on one `ReportFeedbackStream` call (a broker
//! without that RPC answers UNIMPLEMENTED, and the task goes back to single calls for good). A
//! full queue drops the new report and counts it; a failed delivery is logged and counted (a
//! failed stream counts its reports the broker did not confirm). Neither ever reaches the caller.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use proxy_broker_core::ConnectionType;
use proxy_broker_core::redact::redact_text;
use tokio::sync::mpsc;

use crate::grpc::Grpc;
use crate::pb;
use crate::proxy::shown;

/// Most queued reports sent on one `ReportFeedbackStream` call.
pub const MAX_BATCH: usize = 256;

/// Longest `error_details` the broker accepts, in bytes.
pub use proxy_broker_core::validate::MAX_ERROR_DETAILS_LEN;

/// How a proxy (or a direct connection) worked. Its `Debug` masks the proxy's credentials.
#[derive(Clone)]
pub struct Feedback {
    /// The proxy as it was handed out; `None` for a direct connection.
    pub proxy_url: Option<String>,
    /// The exchange.
    pub exchange_id: String,
    /// HTTP or WebSocket.
    pub connection_type: ConnectionType,
    /// Whether the connection worked.
    pub success: bool,
    /// How long connecting took, when measured.
    pub latency: Option<Duration>,
    /// What went wrong (passwords are redacted and the text cut to 4 KiB before sending).
    pub error: Option<String>,
    /// The exchange's HTTP status, when the failure was an HTTP answer (100..=599): 418 and 403
    /// ban the proxy for this exchange, 451 for a day, 429 penalises it (see the broker's README,
    /// "Feed-aware brokering").
    pub http_status: Option<u16>,
    /// The exchange's `Retry-After`, when it sent one (sent in whole seconds, rounded up).
    pub retry_after: Option<Duration>,
}

impl fmt::Debug for Feedback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Feedback")
            .field("proxy_url", &self.proxy_url.as_deref().map(shown))
            .field("exchange_id", &self.exchange_id)
            .field("connection_type", &self.connection_type)
            .field("success", &self.success)
            .field("latency", &self.latency)
            .field("error", &self.error.as_deref().map(redact_text))
            .field("http_status", &self.http_status)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

/// The wire report, with the proxy URL's credentials masked.
impl fmt::Debug for pb::ProxyFeedback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyFeedback")
            .field("proxy_url", &shown(&self.proxy_url))
            .field("exchange_id", &self.exchange_id)
            .field("connection_type", &self.connection_type)
            .field("success", &self.success)
            .field("latency_ms", &self.latency_ms)
            .field("error_details", &self.error_details.as_deref().map(redact_text))
            .field("timestamp", &self.timestamp)
            .field("client_id", &self.client_id)
            .field("http_status", &self.http_status)
            .field("retry_after_seconds", &self.retry_after_seconds)
            .finish_non_exhaustive()
    }
}

impl Feedback {
    /// The wire form, stamped with `client_id` and the current time.
    pub(crate) fn to_pb(&self, client_id: &str) -> pb::ProxyFeedback {
        pb::ProxyFeedback {
            proxy_url: self.proxy_url.clone().unwrap_or_default(),
            exchange_id: self.exchange_id.clone(),
            connection_type: pb_connection_type(self.connection_type).into(),
            success: self.success,
            latency_ms: self
                .latency
                .map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
            error_details: self
                .error
                .as_deref()
                .map(|e| truncate(&redact_text(e), MAX_ERROR_DETAILS_LEN)),
            timestamp: Some(prost_types::Timestamp::from(SystemTime::now())),
            client_id: client_id.to_owned(),
            http_status: self.http_status.map(u32::from),
            retry_after_seconds: self.retry_after.map(|d| {
                let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                u32::try_from(secs).unwrap_or(u32::MAX)
            }),
        }
    }
}

/// The wire enum for a connection type.
pub(crate) fn pb_connection_type(connection_type: ConnectionType) -> pb::ConnectionType {
    match connection_type {
        ConnectionType::Http => pb::ConnectionType::Http,
        ConnectionType::Websocket => pb::ConnectionType::Websocket,
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// What happened to the reports handed to [`crate::BrokerClient::report`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FeedbackStats {
    /// Accepted by the broker.
    pub delivered: u64,
    /// Not delivered: the broker was unreachable or refused them.
    pub failed: u64,
    /// Dropped because the queue was full.
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// The sending side; the worker stops when the last client clone is dropped.
#[derive(Debug)]
pub(crate) struct FeedbackQueue {
    tx: mpsc::Sender<pb::ProxyFeedback>,
    counters: Arc<Counters>,
}

impl FeedbackQueue {
    /// Starts the worker (needs a Tokio runtime); at most `capacity` reports wait.
    pub(crate) fn start(grpc: Grpc, capacity: usize, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let counters = Arc::new(Counters::default());
        tokio::spawn(worker(grpc, rx, counters.clone(), timeout));
        Self { tx, counters }
    }

    /// Queues a report; never blocks, never fails.
    pub(crate) fn send(&self, report: pb::ProxyFeedback) {
        if self.tx.try_send(report).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("feedback queue full: report dropped");
        }
    }

    pub(crate) fn stats(&self) -> FeedbackStats {
        FeedbackStats {
            delivered: self.counters.delivered.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
        }
    }
}

async fn worker(
    grpc: Grpc,
    mut rx: mpsc::Receiver<pb::ProxyFeedback>,
    counters: Arc<Counters>,
    timeout: Duration,
) {
    let mut streams = true;
    while let Some(report) = rx.recv().await {
        let mut batch = vec![report];
        while streams && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        if batch.len() > 1 {
            match send_stream(&grpc, &batch, timeout).await {
                Ok(accepted) => {
                    let accepted = usize::try_from(accepted).unwrap_or(usize::MAX).min(batch.len());
                    counters.delivered.fetch_add(accepted as u64, Ordering::Relaxed);
                    counters
                        .failed
                        .fetch_add((batch.len() - accepted) as u64, Ordering::Relaxed);
                    continue;
                }
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::debug!("the broker has no ReportFeedbackStream: single reports from now on");
                    streams = false;
                }
                Err(status) => {
                    counters.failed.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tracing::warn!(code = ?status.code(), message = %status.message(), reports = batch.len(), "feedback not delivered");
                    continue;
                }
            }
        }
        for report in batch {
            send_one(&grpc, report, &counters, timeout).await;
        }
    }
}

/// `batch` on one `ReportFeedbackStream` call: how many the broker took.
async fn send_stream(
    grpc: &Grpc,
    batch: &[pb::ProxyFeedback],
    timeout: Duration,
) -> Result<u64, tonic::Status> {
    let mut client = grpc.broker();
    let mut request = tonic::Request::new(tokio_stream::iter(batch.to_vec()));
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.report_feedback_stream(request)).await {
        Ok(answer) => answer.map(|a| a.into_inner().accepted),
        Err(_) => Err(tonic::Status::deadline_exceeded(
            "the broker did not answer in time",
        )),
    }
}

async fn send_one(grpc: &Grpc, report: pb::ProxyFeedback, counters: &Counters, timeout: Duration) {
    let mut client = grpc.broker();
    let mut request = tonic::Request::new(report);
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.report_feedback(request)).await {
        Ok(Ok(_)) => {
            counters.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Err(status)) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(code = ?status.code(), message = %status.message(), "feedback not delivered");
        }
        Err(_) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("feedback not delivered: the broker did not answer in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_details_are_redacted_and_cut_on_a_char_boundary() {
        let fb = Feedback {
            proxy_url: Some("socks5://u:secret@p:1080".into()),
            exchange_id: "binance".into(),
            connection_type: ConnectionType::Websocket,
            success: false,
            latency: None,
            error: Some(format!("via socks5://u:secret@p:1080: {}", "é".repeat(3000))),
            http_status: None,
            retry_after: None,
        };
        let wire = fb.to_pb("me");
        let details = wire.error_details.clone().unwrap();
        assert!(!details.contains("secret"));
        assert!(details.len() <= MAX_ERROR_DETAILS_LEN);
        assert_eq!(
            wire.proxy_url, "socks5://u:secret@p:1080",
            "the URL itself is sent as handed out"
        );
        assert_eq!(wire.client_id, "me");
        let shown = format!("{wire:?}");
        assert!(!shown.contains("secret") && shown.contains("@p:1080"), "{shown}");
    }
}
