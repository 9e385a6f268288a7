//! Prometheus metrics (prometheus-client: one registry per broker, no global state, so tests can
//! run several brokers in one process) and the `/metrics` HTTP endpoint.
//!
//! Label values never carry secrets: endpoints are shown with their credentials redacted and
//! proxy URLs are not used as labels at all.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Label sets: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

fn duration_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the broker exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `proxy_broker_requests_total{source,connection_type,code}`.
    pub requests: RequestCounters,
    /// `proxy_broker_request_duration_seconds` (lock-free: observed on every call).
    pub request_duration: Arc<AtomicHistogram>,
    /// `proxy_broker_upstream_requests_total{endpoint,outcome}`.
    pub upstream_requests: Family<Labels, Counter>,
    /// `proxy_broker_upstream_duration_seconds{endpoint}`.
    pub upstream_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// `proxy_broker_circuit_state{endpoint}`: 0 closed, 1 open, 2 half-open.
    pub circuit_state: Family<Labels, Gauge>,
    /// `proxy_broker_cache_entries`.
    pub cache_entries: Gauge,
    /// `proxy_broker_cache_hits_total`.
    pub cache_hits: Counter,
    /// `proxy_broker_coalesced_total`: lookups that waited for another caller's upstream call.
    pub coalesced: Counter,
    /// `proxy_broker_feedback_total{success}`.
    pub feedback: Family<Labels, Counter>,
    /// Its two series (false, true), resolved on first use: a report then costs one atomic add,
    /// without building a label set (see [`Metrics::count_feedback`]).
    feedback_series: [std::sync::OnceLock<Counter>; 2],
    /// `proxy_broker_feedback_dropped_total`: reports dropped because the queue was full.
    pub feedback_dropped: Counter,
    /// `proxy_broker_ejections_total`.
    pub ejections: Counter,
    /// `proxy_broker_config_reloads_total{result}`.
    pub config_reloads: Family<Labels, Counter>,
    /// `proxy_broker_exchange_outage{exchange}`: 1 while the exchange is in an outage (most
    /// proxies reporting for it fail), else 0; for exchanges with a budget or recent reports.
    pub exchange_outage: Family<Labels, Gauge>,
    /// `proxy_broker_store_up`: 1 while the brokering state store is in use (always with the
    /// memory backend), 0 while a shared one (Redis) is unreachable and this replica runs on
    /// local state. Refresh it from [`crate::store::StoreStatus::gauge_value`] before rendering.
    pub store_up: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Counts one feedback report in `proxy_broker_feedback_total{success}`.
    pub fn count_feedback(&self, success: bool) {
        self.feedback_series[usize::from(success)]
            .get_or_init(|| {
                self.feedback
                    .get_or_create(&vec![("success", success.to_string())])
                    .clone()
            })
            .inc();
    }

    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            requests: RequestCounters::new(Family::default()),
            request_duration: Arc::new(AtomicHistogram::durations()),
            upstream_requests: Family::default(),
            upstream_duration: Family::new_with_constructor(duration_histogram),
            circuit_state: Family::default(),
            cache_entries: Gauge::default(),
            cache_hits: Counter::default(),
            coalesced: Counter::default(),
            feedback: Family::default(),
            feedback_series: Default::default(),
            feedback_dropped: Counter::default(),
            ejections: Counter::default(),
            config_reloads: Family::default(),
            exchange_outage: Family::default(),
            store_up: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "proxy_broker_requests",
            "RequestProxy calls by answer source, connection type and gRPC code",
            m.requests.family.clone(),
        );
        registry.register(
            "proxy_broker_request_duration_seconds",
            "RequestProxy latency",
            RequestDuration(m.request_duration.clone()),
        );
        registry.register(
            "proxy_broker_upstream_requests",
            "Requests to upstream proxy services by outcome",
            m.upstream_requests.clone(),
        );
        registry.register(
            "proxy_broker_upstream_duration_seconds",
            "Upstream request latency",
            m.upstream_duration.clone(),
        );
        registry.register(
            "proxy_broker_circuit_state",
            "Circuit breaker state per endpoint (0 closed, 1 open, 2 half-open)",
            m.circuit_state.clone(),
        );
        registry.register(
            "proxy_broker_cache_entries",
            "Cached upstream answers (fresh or kept for stale-if-error)",
            m.cache_entries.clone(),
        );
        registry.register(
            "proxy_broker_cache_hits",
            "RequestProxy calls answered from a fresh cache entry",
            m.cache_hits.clone(),
        );
        registry.register(
            "proxy_broker_coalesced",
            "Lookups that shared another caller's upstream call",
            m.coalesced.clone(),
        );
        registry.register(
            "proxy_broker_feedback",
            "Feedback reports accepted, by success",
            m.feedback.clone(),
        );
        registry.register(
            "proxy_broker_feedback_dropped",
            "Feedback reports dropped because the forwarding queue was full",
            m.feedback_dropped.clone(),
        );
        registry.register(
            "proxy_broker_ejections",
            "Proxy URLs ejected after repeated failure reports",
            m.ejections.clone(),
        );
        registry.register(
            "proxy_broker_config_reloads",
            "Configuration reloads by result",
            m.config_reloads.clone(),
        );
        registry.register(
            "proxy_broker_exchange_outage",
            "1 while most proxies reporting for the exchange fail (an exchange outage: failures stop ejecting), else 0",
            m.exchange_outage.clone(),
        );
        registry.register(
            "proxy_broker_store_up",
            "Whether the brokering state store is reachable (0: a shared store is down and this replica serves from local state)",
            m.store_up.clone(),
        );
        m.store_up.set(1);
        // Series whose label values are known up front start at 0, so that `rate()` and
        // `increase()` see the first failed reload or failure report (a series that appears
        // with value 1 has no increase).
        for result in ["success", "failure"] {
            let _ = m
                .config_reloads
                .get_or_create(&vec![("result", result.to_owned())]);
        }
        for success in ["true", "false"] {
            let _ = m.feedback.get_or_create(&vec![("success", success.to_owned())]);
        }
        Self { registry, ..m }
    }

    /// Sets `proxy_broker_exchange_outage` to exactly these exchanges (others are dropped).
    pub fn set_exchange_outages<'a>(&self, exchanges: impl IntoIterator<Item = (&'a str, bool)>) {
        self.exchange_outage.clear();
        for (exchange, in_outage) in exchanges {
            self.exchange_outage
                .get_or_create(&vec![("exchange", exchange.to_owned())])
                .set(i64::from(in_outage));
        }
    }

    /// The exposition text (OpenMetrics).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The wait after a failed accept: 10 ms doubling to 1 s, back to 10 ms after a success.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    /// The wait before the next attempt (and one more failure counted).
    pub fn next_wait(&mut self) -> Duration {
        let wait = Duration::from_millis(10u64 << self.failures.min(7)).min(Duration::from_secs(1));
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// An accept worked.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes; `render` produces the text
/// (it refreshes gauges from live state first).
pub async fn serve_metrics<R, T>(listener: TcpListener, render: R, shutdown: impl Future<Output = ()>)
where
    R: Fn() -> T + Clone + Send + Sync + 'static,
    T: Future<Output = String> + Send + 'static,
{
    tokio::pin!(shutdown);
    let mut backoff = AcceptBackoff::default();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff.reset();
                    a
                }
                Err(error) => {
                    // Out of file descriptors (EMFILE) and the like fail again at once: wait
                    // before the next accept instead of spinning on a core and flooding the log.
                    let wait = backoff.next_wait();
                    tracing::warn!(%error, retry_in_ms = wait.as_millis(), "metrics listener accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => continue,
                        () = &mut shutdown => return,
                    }
                }
            },
            () = &mut shutdown => return,
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move {
                    let response = if req.uri().path() == "/metrics" && req.method() == hyper::Method::GET {
                        Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(render().await)))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    Ok::<_, Infallible>(response.unwrap_or_default())
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%error, "metrics connection ended with an error");
            }
        });
    }
}

/// Bucket bounds of [`AtomicHistogram::durations`]: 0.5 ms doubling to ~16 s (as the other
/// duration histograms).
const DURATION_BUCKETS: usize = 16;

/// A histogram observed without a lock: one atomic counter per bucket and atomic sum and count.
///
/// prometheus-client's own `Histogram` takes a mutex per observation, shared by every request of
/// the process; on the cache-hit path that lock was measurable. This is what the hot path uses;
/// the rarely observed upstream histograms keep prometheus-client's type. Rendering reads the
/// atomics one by one, so a scrape concurrent with observations may see a count one ahead of a
/// bucket, which Prometheus tolerates (the same holds for most client libraries).
#[derive(Debug)]
pub struct AtomicHistogram {
    bounds: [f64; DURATION_BUCKETS],
    buckets: [AtomicU64; DURATION_BUCKETS + 1],
    count: AtomicU64,
    /// The sum in nanoseconds (exact, no float CAS loop).
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    /// Request durations: 0.5 ms .. ~16 s, doubling.
    pub fn durations() -> Self {
        let mut bounds = [0.0; DURATION_BUCKETS];
        let mut b = 0.0005;
        for slot in &mut bounds {
            *slot = b;
            b *= 2.0;
        }
        Self {
            bounds,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(DURATION_BUCKETS);
        if let Some(bucket) = self.buckets.get(i) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // Per-bucket counts: the encoder accumulates them itself.
        let mut count = 0;
        let mut buckets = Vec::with_capacity(DURATION_BUCKETS + 1);
        for (i, bucket) in self.buckets.iter().enumerate() {
            let n = bucket.load(Ordering::Relaxed);
            count += n;
            let bound = self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, n));
        }
        let sum = Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)).as_secs_f64();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The registry's handle on the shared [`AtomicHistogram`].
#[derive(Debug)]
struct RequestDuration(Arc<AtomicHistogram>);

impl EncodeMetric for RequestDuration {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// `proxy_broker_requests_total` counters resolved once per label set, so that counting a call
/// allocates nothing and takes no lock after the first call with that label set.
#[derive(Debug)]
pub struct RequestCounters {
    family: Family<Labels, Counter>,
    slots: Vec<OnceLock<Counter>>,
}

/// `source` label values, in slot order.
pub const SOURCES: [&str; 6] = ["upstream", "cache", "embedded", "direct", "unspecified", "none"];
/// `connection_type` label values, in slot order.
pub const CONNECTION_TYPES: [&str; 3] = ["http", "websocket", "invalid"];
/// `code` label values (gRPC codes 0..=16, `ok` for 0), in slot order.
pub const CODES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

impl RequestCounters {
    fn new(family: Family<Labels, Counter>) -> Self {
        let n = SOURCES.len() * CONNECTION_TYPES.len() * CODES.len();
        Self {
            family,
            slots: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The counter for (`source`, `connection_type`, `code`), each an index into [`SOURCES`],
    /// [`CONNECTION_TYPES`] and [`CODES`] (out-of-range indexes count under the last value).
    pub fn get(&self, source: usize, connection_type: usize, code: usize) -> &Counter {
        let s = source.min(SOURCES.len() - 1);
        let t = connection_type.min(CONNECTION_TYPES.len() - 1);
        let c = code.min(CODES.len() - 1);
        let i = (s * CONNECTION_TYPES.len() + t) * CODES.len() + c;
        // `i` is in range by construction; the fallback slot only keeps this total.
        let slot = self.slots.get(i).or_else(|| self.slots.last());
        match slot {
            Some(slot) => slot.get_or_init(|| {
                self.family
                    .get_or_create(&vec![
                        ("source", SOURCES[s].to_owned()),
                        ("connection_type", CONNECTION_TYPES[t].to_owned()),
                        ("code", CODES[c].to_owned()),
                    ])
                    .clone()
            }),
            None => unreachable_counter(),
        }
    }
}

fn unreachable_counter() -> &'static Counter {
    static SPARE: OnceLock<Counter> = OnceLock::new();
    SPARE.get_or_init(Counter::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<u128> = (0..10).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_wait().as_millis(), 10);
    }

    #[test]
    fn the_atomic_histogram_renders_cumulative_buckets_sum_and_count() {
        let h = AtomicHistogram::durations();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        assert_eq!(h.count(), 3);
        let mut registry = Registry::default();
        registry.register("d", "durations", RequestDuration(Arc::new(h)));
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        assert!(out.contains("d_bucket{le=\"0.0005\"} 1"), "{out}");
        assert!(out.contains("d_bucket{le=\"0.004\"} 2"), "{out}");
        assert!(out.contains("d_bucket{le=\"+Inf\"} 3"), "{out}");
        assert!(out.contains("d_count 3"), "{out}");
        assert!(out.contains("d_sum 100.0031"), "{out}");
    }

    #[test]
    fn request_counters_are_resolved_once_per_label_set() {
        let m = Metrics::new();
        m.requests.get(1, 1, 0).inc();
        m.requests.get(1, 1, 0).inc();
        m.requests.get(5, 0, 3).inc();
        let out = m.render();
        assert!(
            out.contains(
                "proxy_broker_requests_total{source=\"cache\",connection_type=\"websocket\",code=\"ok\"} 2"
            ),
            "{out}"
        );
        assert!(out.contains("code=\"invalid_argument\""), "{out}");
    }
}
