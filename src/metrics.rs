//! Prometheus metrics (prometheus-client: one registry per broker, no global state, so tests can
//! run several brokers in one process) and the `/metrics` HTTP endpoint.
//!
//! Label values never carry secrets: endpoints are shown with their credentials redacted and
//! proxy URLs are not used as labels at all.

use std::convert::Infallible;
use std::future::Future;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
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
    pub requests: Family<Labels, Counter>,
    /// `proxy_broker_request_duration_seconds`.
    pub request_duration: Histogram,
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
    /// `proxy_broker_feedback_dropped_total`: reports dropped because the queue was full.
    pub feedback_dropped: Counter,
    /// `proxy_broker_ejections_total`.
    pub ejections: Counter,
    /// `proxy_broker_config_reloads_total{result}`.
    pub config_reloads: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            requests: Family::default(),
            request_duration: duration_histogram(),
            upstream_requests: Family::default(),
            upstream_duration: Family::new_with_constructor(duration_histogram),
            circuit_state: Family::default(),
            cache_entries: Gauge::default(),
            cache_hits: Counter::default(),
            coalesced: Counter::default(),
            feedback: Family::default(),
            feedback_dropped: Counter::default(),
            ejections: Counter::default(),
            config_reloads: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "proxy_broker_requests",
            "RequestProxy calls by answer source, connection type and gRPC code",
            m.requests.clone(),
        );
        registry.register(
            "proxy_broker_request_duration_seconds",
            "RequestProxy latency",
            m.request_duration.clone(),
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

    /// The exposition text (OpenMetrics).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes; `render` produces the text
/// (it refreshes gauges from live state first).
pub async fn serve_metrics<R>(listener: TcpListener, render: R, shutdown: impl Future<Output = ()>)
where
    R: Fn() -> String + Clone + Send + Sync + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener accept failed");
                    continue;
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
                            .body(Full::new(Bytes::from(render())))
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
