//! Talking to upstream proxy services: endpoints in failover order, hedging, authentication,
//! per-attempt timeouts, in-flight limits, answer validation, and per-endpoint statistics.
//!
//! Each endpoint has its own reqwest client (its own connection pool, reused; HTTP/1.1, or HTTP/2
//! when the server offers it over TLS), its own circuit breaker, its own in-flight limit and its
//! own recent latencies. System proxy variables are ignored and redirects are not followed: the
//! broker talks to its upstreams directly.
//!
//! A lookup ([`Upstreams::request`]) is a small race. The first endpoint whose breaker admits is
//! asked; when it fails the next is asked at once (sequential failover); when it has not
//! answered within its hedge delay (see [`hedge`]) the next is asked *as well*, and the first
//! valid answer wins. Each attempt runs on its own task:
//! - a hedge that lost the race is cancelled (its request dropped) with no verdict on its
//!   endpoint;
//! - an attempt that was hedged because it was slow is left to finish in the background, within
//!   its own timeout, so a black-holed endpoint still times out, counts failures and trips its
//!   breaker (and a merely slow one records its real latency, which raises its hedge delay).
//!
//! Submodules: `answer` (reading and validating answers within limits), [`hedge`] (hedge
//! delays), `race` (one lookup's attempts), `series` (per-endpoint metric handles), `wire`
//! (the JSON sent upstream).

mod answer;
pub mod hedge;
mod race;
mod series;
mod wire;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Bytes;
use proxy_broker_core::model::{AuthMethod, ExternalServiceConfig, HedgeDelay};
use proxy_broker_core::redact::{redact_text, redact_url};
use proxy_broker_core::{ConfigError, Problem};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

pub use answer::{
    Answer, MAX_ANSWER_BYTES, MAX_ANSWER_METADATA_BYTES, MAX_ANSWER_METADATA_DEPTH, MAX_STRATEGY_LEN,
    MIN_ANSWER_TTL, parse_answer,
};
pub use series::Outcome;
pub use wire::WireFeedback;

use crate::breaker::{Breaker, Policy};
use crate::clock::Clock;
use crate::request::{Feedback, Lookup};
use race::{Job, Race};
use series::Series;
use wire::WireRequest;

/// How long a lookup may spend on upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// When to stop waiting for upstreams (leaving time to answer with a fallback).
    pub until: Instant,
    /// Set by the caller's own (shorter) gRPC deadline rather than by the broker's
    /// `server.request_timeout_seconds`. An attempt cut short by the caller says nothing about
    /// the endpoint; one cut short by the broker's own limit counts as that endpoint's timeout.
    pub set_by_caller: bool,
}

/// Why one endpoint did not produce an answer.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The endpoint (credentials redacted).
    pub endpoint: Arc<str>,
    /// What went wrong (no secrets).
    pub reason: String,
}

/// Counters for admin output.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Requests sent.
    pub total_requests: u64,
    /// Requests that failed.
    pub total_failures: u64,
    /// The last failure.
    pub last_error: String,
    /// Duration of the last request.
    pub last_latency: Option<Duration>,
}

/// One upstream endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// Base URL as configured (credentials redacted), used in answers and admin output.
    pub name: Arc<str>,
    request_url: reqwest::Url,
    feedback_url: reqwest::Url,
    client: reqwest::Client,
    /// This endpoint's circuit breaker.
    pub breaker: Breaker,
    stats: Mutex<Stats>,
    /// `upstream_max_in_flight` permits.
    in_flight: Semaphore,
    max_in_flight: usize,
    latencies: Mutex<hedge::Latencies>,
    series: Series,
}

impl Endpoint {
    /// A copy of the counters.
    pub fn stats(&self) -> Stats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Upstream requests of this endpoint in flight now (lookups and their background tails).
    pub fn in_flight(&self) -> usize {
        self.max_in_flight
            .saturating_sub(self.in_flight.available_permits())
    }

    /// The median latency of its recent successful requests.
    pub fn median_latency(&self) -> Option<Duration> {
        self.latencies.lock().unwrap_or_else(|e| e.into_inner()).median()
    }

    fn record(&self, latency: Option<Duration>, error: Option<&str>) {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.total_requests += 1;
        if latency.is_some() {
            s.last_latency = latency;
        }
        if let Some(e) = error {
            s.total_failures += 1;
            e.clone_into(&mut s.last_error);
        }
    }

    fn failure(&self, reason: String) -> Failure {
        Failure {
            endpoint: self.name.clone(),
            reason,
        }
    }
}

/// The configured upstream services.
#[derive(Debug)]
pub struct Upstreams {
    endpoints: Vec<Arc<Endpoint>>,
    headers: HeaderMap,
    timeout: Duration,
    default_ttl: u32,
    hedge_delay: HedgeDelay,
    broker_client_id: String,
    metrics: Arc<crate::metrics::Metrics>,
    flights: Arc<Semaphore>,
}

/// How a feedback delivery went.
#[derive(Debug)]
pub enum DeliveryError {
    /// Worth retrying: connection error, timeout, 429 or 5xx.
    Transient(String),
    /// Not worth retrying (e.g. 400, 401, a redirect).
    Permanent(String),
}

fn config_error(path: &str, message: String) -> ConfigError {
    ConfigError {
        problems: vec![Problem {
            path: path.to_owned(),
            message,
        }],
    }
}

fn read_secret_file(key: &str, path: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        config_error(
            &format!("proxy.external_service.auth_credentials.{key}"),
            format!("cannot read '{path}': {e}"),
        )
    })?;
    let trimmed = text.trim().to_owned();
    if trimmed.is_empty() {
        return Err(config_error(
            &format!("proxy.external_service.auth_credentials.{key}"),
            format!("'{path}' is empty"),
        ));
    }
    Ok(trimmed)
}

fn read_file(key: &str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        config_error(
            &format!("proxy.external_service.auth_credentials.{key}"),
            format!("cannot read '{path}': {e}"),
        )
    })
}

/// The id the broker sends upstream when the feed sent none: `proxy-broker-{hostname}-{pid}`.
pub fn broker_client_id() -> String {
    format!(
        "proxy-broker-{}-{}",
        gethostname::gethostname().to_string_lossy(),
        std::process::id()
    )
}
impl Upstreams {
    /// Builds clients for every endpoint, reading credential files now so that a missing or
    /// unreadable one stops start-up with the key named.
    pub fn new(
        cfg: &ExternalServiceConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Self, ConfigError> {
        let max_in_flight = usize::try_from(cfg.upstream_max_in_flight).unwrap_or(64).max(1);
        let creds = &cfg.auth_credentials;
        let cred = |key: &str, file_key: &str| -> Result<Option<String>, ConfigError> {
            match (creds.get(key), creds.get(file_key)) {
                (Some(v), _) if !v.is_empty() => Ok(Some(v.clone())),
                (_, Some(path)) if !path.is_empty() => read_secret_file(file_key, path).map(Some),
                _ => Ok(None),
            }
        };
        let mut headers = HeaderMap::new();
        let secret_header = |name: &'static str,
                             value: String|
         -> Result<(HeaderName, HeaderValue), ConfigError> {
            let mut v = HeaderValue::from_str(&value).map_err(|_| {
                config_error(
                    "proxy.external_service.auth_credentials",
                    "credential contains characters not allowed in an HTTP header (value not shown)".into(),
                )
            })?;
            v.set_sensitive(true);
            Ok((HeaderName::from_static(name), v))
        };
        match cfg.auth_method {
            AuthMethod::BearerToken => {
                if let Some(token) = cred("token", "token_file")? {
                    let (k, v) = secret_header("authorization", format!("Bearer {token}"))?;
                    headers.insert(k, v);
                }
            }
            AuthMethod::ApiKey => {
                if let Some(key) = cred("api_key", "api_key_file")? {
                    let (k, v) = secret_header("x-api-key", key)?;
                    headers.insert(k, v);
                }
            }
            AuthMethod::MutualTls => {}
        }
        // Certificates are read and parsed once; each endpoint gets its own client (its own
        // connection pool) built from them.
        let trust = match creds.get("ca_file").filter(|p| !p.is_empty()) {
            Some(ca) => {
                let pem = read_file("ca_file", ca)?;
                Some(reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    config_error(
                        "proxy.external_service.auth_credentials.ca_file",
                        format!("'{ca}' is not PEM certificates: {e}"),
                    )
                })?)
            }
            None => None,
        };
        let identity = if cfg.auth_method == AuthMethod::MutualTls {
            let cert = creds.get("cert_file").map(String::as_str).unwrap_or_default();
            let key = creds.get("key_file").map(String::as_str).unwrap_or_default();
            let mut pem = read_file("cert_file", cert)?;
            pem.push(b'\n');
            pem.extend(read_file("key_file", key)?);
            Some(reqwest::Identity::from_pem(&pem).map_err(|e| {
                config_error(
                    "proxy.external_service.auth_credentials.cert_file",
                    format!("'{cert}' and key '{key}' do not form a PEM client identity: {e}"),
                )
            })?)
        } else {
            None
        };
        let builder_template = || {
            let mut b = reqwest::Client::builder()
                .no_proxy()
                .connect_timeout(Duration::from_secs(cfg.timeout_seconds.unsigned_abs()))
                .pool_idle_timeout(Duration::from_secs(90))
                // Connections are reused: at most `upstream_max_in_flight` requests run at once,
                // and as many idle connections are kept, so a miss storm does not open (and
                // close) a connection per concurrent miss.
                .pool_max_idle_per_host(max_in_flight)
                // A redirect could send the credentials elsewhere and hand a stranger's answer
                // to a feed: a 3xx is that endpoint's failure.
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("proxy-broker/", env!("CARGO_PKG_VERSION")));
            if let Some(certs) = &trust {
                b = b.tls_certs_only(certs.clone());
            }
            if let Some(identity) = &identity {
                b = b.identity(identity.clone());
            }
            b
        };
        let policy = cfg.circuit_breaker_enabled.then(|| Policy {
            failure_threshold: u32::try_from(cfg.failure_threshold).unwrap_or(5),
            open: Duration::from_secs(cfg.open_seconds.unsigned_abs()),
            max_open: Duration::from_secs(cfg.max_open_seconds.unsigned_abs()),
            probe_timeout: Duration::from_secs(cfg.timeout_seconds.unsigned_abs()),
        });
        let mut endpoints = Vec::new();
        for (i, raw) in cfg.endpoints.iter().enumerate() {
            let path = format!("proxy.external_service.endpoints[{i}]");
            let base = raw.trim_end_matches('/');
            let parse = |suffix: &str| {
                reqwest::Url::parse(&format!("{base}{suffix}")).map_err(|e| {
                    config_error(&path, format!("'{}' is not a valid URL ({e})", redact_url(raw)))
                })
            };
            let client = builder_template()
                .build()
                .map_err(|e| config_error(&path, format!("cannot build an HTTP client: {e}")))?;
            let name: Arc<str> = Arc::from(redact_url(base));
            endpoints.push(Arc::new(Endpoint {
                series: Series::resolve(&metrics, &name),
                name,
                request_url: parse("/api/v1/proxy/request")?,
                feedback_url: parse("/api/v1/proxy/feedback")?,
                client,
                breaker: Breaker::new(policy, clock.clone()),
                stats: Mutex::default(),
                in_flight: Semaphore::new(max_in_flight),
                max_in_flight,
                latencies: Mutex::default(),
            }));
        }
        Ok(Self {
            endpoints,
            headers,
            timeout: Duration::from_secs(cfg.timeout_seconds.unsigned_abs()),
            default_ttl: u32::try_from(cfg.cache_ttl_seconds).unwrap_or(300),
            hedge_delay: cfg.hedge_delay_ms,
            broker_client_id: broker_client_id(),
            metrics,
            flights: Arc::new(Semaphore::new(
                usize::try_from(cfg.upstream_max_in_flight_total)
                    .unwrap_or(1024)
                    .clamp(1, Semaphore::MAX_PERMITS),
            )),
        })
    }

    /// The endpoints, in failover order.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The id sent upstream for feeds that sent none.
    pub fn broker_client_id(&self) -> &str {
        &self.broker_client_id
    }

    /// `upstream_max_in_flight_total` permits: one per lookup (single flight) in flight, taken
    /// by the caller of [`Upstreams::request`] (e.g. with `try_acquire_owned`) so that a storm of
    /// distinct misses is bounded overall.
    pub fn flight_permits(&self) -> &Arc<Semaphore> {
        &self.flights
    }

    /// The names of the endpoints (for [`Upstreams::retire_metrics`] after a reload).
    pub fn endpoint_names(&self) -> HashSet<String> {
        self.endpoints.iter().map(|e| e.name.to_string()).collect()
    }

    /// Removes the metric series (`upstream_requests`, `upstream_duration`, `circuit_state`) of
    /// every endpoint whose name is not in `still_configured`; called on the old upstreams after
    /// a reload so that removed endpoints stop being exported.
    pub fn retire_metrics(&self, still_configured: &HashSet<String>) {
        for e in &self.endpoints {
            if !still_configured.contains(&*e.name) {
                Series::retire(&self.metrics, &e.name);
            }
        }
    }

    /// Sets each endpoint's `proxy_broker_circuit_state` gauge from its breaker (before a scrape).
    pub fn refresh_circuit_metrics(&self) {
        for e in &self.endpoints {
            e.series.set_circuit(e.breaker.snapshot().kind.gauge_value());
        }
    }

    /// The hedge delay for `endpoint` now; `None`: hedging is off.
    pub fn hedge_delay(&self, endpoint: &Endpoint) -> Option<Duration> {
        hedge::delay(self.hedge_delay, endpoint.median_latency(), self.timeout)
    }

    /// Asks the endpoints in order until one gives a valid answer, hedging slow ones (see the
    /// module docs). Open breakers are skipped without waiting; each attempt is bounded by
    /// `timeout_seconds` and by `budget`. The answer comes with the index of its endpoint.
    pub async fn request(
        &self,
        lookup: &Lookup,
        budget: Option<Budget>,
    ) -> Result<(Answer, usize), Vec<Failure>> {
        let wire = WireRequest {
            exchange_id: &lookup.exchange_id.to_lowercase(),
            connection_type: lookup.connection_type.as_str(),
            region: lookup.region.as_deref(),
            client_id: if lookup.client_id.is_empty() {
                &self.broker_client_id
            } else {
                &lookup.client_id
            },
            metadata: lookup
                .metadata
                .as_ref()
                .map(crate::json::struct_to_json)
                .unwrap_or_default(),
        };
        let body = match serde_json::to_vec(&wire) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                return Err(self
                    .endpoints
                    .iter()
                    .map(|ep| ep.failure(format!("cannot encode the request ({e})")))
                    .collect());
            }
        };
        let mut headers = self.headers.clone();
        crate::telemetry::inject_current(&mut headers);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let job = Arc::new(Job {
            body,
            headers,
            timeout: self.timeout,
            default_ttl: self.default_ttl,
            budget,
        });

        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut race = Race::new(self, job, tx);
        loop {
            if race.outstanding() == 0 && !race.launch() {
                return Err(race.take_failures());
            }
            let timer = race.hedge_at();
            tokio::select! {
                report = rx.recv() => {
                    // The race holds a sender, so the channel cannot close; if it did, give up.
                    let Some((id, report)) = report else {
                        return Err(race.take_failures());
                    };
                    if let Some(won) = race.finished(id, report) {
                        return Ok(won);
                    }
                }
                () = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                    race.hedge();
                }
            }
        }
    }

    /// The endpoint feedback for `proxy_url` should go to: `served_by` if given, else the first
    /// endpoint whose breaker is not open, else the first.
    pub fn feedback_target(&self, served_by: Option<usize>) -> Option<usize> {
        if let Some(i) = served_by.filter(|&i| i < self.endpoints.len()) {
            return Some(i);
        }
        use crate::breaker::Kind;
        self.endpoints
            .iter()
            .position(|e| matches!(e.breaker.snapshot().kind, Kind::Closed | Kind::Disabled))
            .or((!self.endpoints.is_empty()).then_some(0))
    }

    /// The wire form of a feedback report: `error_details` redacted (a feed's error text may
    /// quote a proxy URL with its password), the timestamp written for any time.
    pub fn wire_feedback(&self, fb: &Feedback) -> WireFeedback {
        WireFeedback {
            proxy_url: fb.proxy_url.clone().unwrap_or_default(),
            exchange_id: fb.exchange_id.to_lowercase(),
            connection_type: fb.connection_type.as_str(),
            success: fb.success,
            latency_ms: fb.latency_ms,
            error_details: fb.error_details.as_deref().map(redact_text),
            timestamp: wire::rfc3339_millis(fb.timestamp),
            client_id: if fb.client_id.is_empty() {
                self.broker_client_id.clone()
            } else {
                fb.client_id.clone()
            },
            http_status: fb.http_status,
            retry_after_seconds: fb.retry_after.map(|d| d.as_secs()),
        }
    }

    /// Sends one feedback report to endpoint `index`.
    pub async fn deliver_feedback(&self, index: usize, body: &WireFeedback) -> Result<(), DeliveryError> {
        let Some(endpoint) = self.endpoints.get(index) else {
            return Err(DeliveryError::Permanent(format!("no endpoint #{index}")));
        };
        let send = endpoint
            .client
            .post(endpoint.feedback_url.clone())
            .headers(self.headers.clone())
            .json(body)
            .send();
        let response = match tokio::time::timeout(self.timeout, send).await {
            Err(_) => return Err(DeliveryError::Transient("timed out".into())),
            Ok(Err(e)) => return Err(DeliveryError::Transient(describe_reqwest_error(&e))),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Err(DeliveryError::Transient(format!("HTTP {status}")))
        } else if status.is_redirection() {
            Err(DeliveryError::Permanent(format!(
                "HTTP {status}: redirect (not followed)"
            )))
        } else {
            Err(DeliveryError::Permanent(format!("HTTP {status}")))
        }
    }
}

/// A reqwest error without the URL (which could carry credentials) and with its cause chain.
fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "reading the body failed"
    } else {
        "request failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    let detail = proxy_broker_core::redact::redact_text(&detail);
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    fn upstreams(endpoints: &[&str]) -> (Upstreams, Arc<crate::metrics::Metrics>) {
        let cfg = ExternalServiceConfig {
            enabled: true,
            endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
            auth_credentials: [("token".to_owned(), "t0ken-value-1234".to_owned())].into(),
            ..Default::default()
        };
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let u = Upstreams::new(&cfg, Arc::new(SystemClock), metrics.clone()).unwrap();
        (u, metrics)
    }

    #[test]
    fn every_series_of_an_endpoint_exists_from_the_start() {
        let (_u, metrics) = upstreams(&["http://127.0.0.1:9"]);
        let text = metrics.render();
        for o in Outcome::ALL {
            let series = format!(
                "proxy_broker_upstream_requests_total{{endpoint=\"http://127.0.0.1:9\",outcome=\"{}\"}} 0",
                o.label()
            );
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
        assert!(
            text.contains("proxy_broker_upstream_duration_seconds_count{endpoint=\"http://127.0.0.1:9\"} 0")
        );
        assert!(text.contains("proxy_broker_circuit_state{endpoint=\"http://127.0.0.1:9\"} 0"));
    }

    #[test]
    fn retire_metrics_removes_the_series_of_endpoints_no_longer_configured() {
        let (old, metrics) = upstreams(&["http://127.0.0.1:9", "http://127.0.0.1:10"]);
        old.endpoints[0]
            .series
            .count(Outcome::Success, Some(Duration::from_millis(3)));
        old.endpoints[1]
            .series
            .count(Outcome::Timeout, Some(Duration::from_millis(3)));
        // After a reload only :10 remains (the new upstreams share its series).
        let new = Upstreams::new(
            &ExternalServiceConfig {
                enabled: true,
                endpoints: vec!["http://127.0.0.1:10".into()],
                ..Default::default()
            },
            Arc::new(SystemClock),
            metrics.clone(),
        )
        .unwrap();
        old.retire_metrics(&new.endpoint_names());
        let text = metrics.render();
        assert!(
            !text.contains("127.0.0.1:9\""),
            "removed endpoint still exported:\n{text}"
        );
        assert!(
            text.contains(
                "proxy_broker_upstream_requests_total{endpoint=\"http://127.0.0.1:10\",outcome=\"timeout\"} 1"
            ),
            "kept endpoint keeps its counts:\n{text}"
        );
        new.endpoints[0].series.count(Outcome::Success, None);
        assert!(metrics.render().contains(
            "proxy_broker_upstream_requests_total{endpoint=\"http://127.0.0.1:10\",outcome=\"success\"} 1"
        ));
        // Retiring with everything still configured removes nothing.
        new.retire_metrics(&new.endpoint_names());
        assert!(metrics.render().contains("127.0.0.1:10"));
    }

    #[test]
    fn the_flight_semaphore_has_upstream_max_in_flight_total_permits() {
        let cfg = ExternalServiceConfig {
            enabled: true,
            endpoints: vec!["http://127.0.0.1:9".into()],
            upstream_max_in_flight_total: 3,
            upstream_max_in_flight: 2,
            ..Default::default()
        };
        let u = Upstreams::new(&cfg, Arc::new(SystemClock), Arc::default()).unwrap();
        assert_eq!(u.flight_permits().available_permits(), 3);
        assert_eq!(u.endpoints()[0].in_flight(), 0);
        assert_eq!(u.endpoints()[0].in_flight.available_permits(), 2);
    }

    fn feedback(error_details: &str, timestamp: std::time::SystemTime) -> Feedback {
        Feedback {
            proxy_url: Some("socks5://p:1080".into()),
            exchange_id: "Binance".into(),
            connection_type: proxy_broker_core::ConnectionType::Http,
            success: false,
            latency_ms: Some(5),
            error_details: Some(error_details.into()),
            timestamp,
            client_id: String::new(),
            http_status: None,
            retry_after: None,
        }
    }

    #[test]
    fn wire_feedback_redacts_error_details_and_never_panics_on_timestamps() {
        let (u, _) = upstreams(&["http://127.0.0.1:9"]);
        let before_1970 = std::time::UNIX_EPOCH - Duration::from_secs(1_000_000);
        let wire = u.wire_feedback(&feedback(
            "connect to http://alice:hunter2@proxy:8080 failed",
            before_1970,
        ));
        let details = wire.error_details.as_deref().unwrap();
        assert!(!details.contains("hunter2"), "{details}");
        assert!(details.contains("proxy:8080"), "{details}");
        assert_eq!(wire.timestamp, "1970-01-01T00:00:00.000Z");
        assert_eq!(wire.exchange_id, "binance");
        assert_eq!(wire.client_id, u.broker_client_id());
    }
}
