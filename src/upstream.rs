//! Talking to upstream proxy services: endpoints in failover order, authentication, per-attempt
//! timeouts, answer validation, and per-endpoint statistics.
//!
//! Each endpoint has its own reqwest client (its own connection pool; HTTP/1.1, or HTTP/2 when the
//! server offers it over TLS) and its own circuit breaker. System proxy variables are ignored: the
//! broker talks to its upstreams directly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxy_broker_core::model::{AuthMethod, ExternalServiceConfig};
use proxy_broker_core::redact::redact_url;
use proxy_broker_core::validate::check_proxy_url;
use proxy_broker_core::{ConfigError, Problem};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::breaker::{Breaker, Policy};
use crate::clock::Clock;
use crate::pb::FallbackPolicy;
use crate::request::{Feedback, Lookup};

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

/// Shortest TTL an upstream may give.
pub const MIN_ANSWER_TTL: i64 = 60;

/// A validated upstream answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The proxy (allowed scheme, host and port checked).
    pub proxy_url: String,
    /// How the upstream chose it.
    pub strategy: String,
    /// How long it may be cached (≥ 60; the configured default when the upstream gave none).
    pub ttl_seconds: u32,
    /// What the feed should do when the proxy fails.
    pub fallback_policy: FallbackPolicy,
    /// Whatever else the upstream attached.
    pub metadata: Map<String, Value>,
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
}

impl Endpoint {
    /// A copy of the counters.
    pub fn stats(&self) -> Stats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, latency: Duration, error: Option<&str>) {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.total_requests += 1;
        s.last_latency = Some(latency);
        if let Some(e) = error {
            s.total_failures += 1;
            s.last_error = e.to_owned();
        }
    }
}

/// The configured upstream services.
#[derive(Debug)]
pub struct Upstreams {
    endpoints: Vec<Endpoint>,
    headers: HeaderMap,
    timeout: Duration,
    default_ttl: u32,
    broker_client_id: String,
    metrics: Arc<crate::metrics::Metrics>,
}

/// The design's ProxyRequest, as sent upstream.
#[derive(Debug, Serialize)]
struct WireRequest<'a> {
    exchange_id: &'a str,
    connection_type: &'a str,
    region: Option<&'a str>,
    client_id: &'a str,
    metadata: Map<String, Value>,
}

/// The design's ProxyFeedback, as sent upstream.
#[derive(Debug, Serialize)]
pub struct WireFeedback {
    proxy_url: String,
    exchange_id: String,
    connection_type: &'static str,
    success: bool,
    latency_ms: Option<u32>,
    error_details: Option<String>,
    timestamp: String,
    client_id: String,
}

/// How a feedback delivery went.
#[derive(Debug)]
pub enum DeliveryError {
    /// Worth retrying: connection error, timeout, 429 or 5xx.
    Transient(String),
    /// Not worth retrying (e.g. 400, 401).
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
            endpoints.push(Endpoint {
                name: Arc::from(redact_url(base)),
                request_url: parse("/api/v1/proxy/request")?,
                feedback_url: parse("/api/v1/proxy/feedback")?,
                client,
                breaker: Breaker::new(policy, clock.clone()),
                stats: Mutex::default(),
            });
        }
        Ok(Self {
            endpoints,
            headers,
            timeout: Duration::from_secs(cfg.timeout_seconds.unsigned_abs()),
            default_ttl: u32::try_from(cfg.cache_ttl_seconds).unwrap_or(300),
            broker_client_id: broker_client_id(),
            metrics,
        })
    }

    /// The endpoints, in failover order.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The id sent upstream for feeds that sent none.
    pub fn broker_client_id(&self) -> &str {
        &self.broker_client_id
    }

    /// Asks each endpoint in order until one gives a valid answer. Open breakers are skipped
    /// without waiting; each attempt is bounded by `timeout_seconds` and by `budget`.
    pub async fn request(
        &self,
        lookup: &Lookup,
        budget: Option<Budget>,
    ) -> Result<(Answer, usize), Vec<Failure>> {
        let body = WireRequest {
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
        let mut failures = Vec::new();
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            let Some(permit) = endpoint.breaker.try_acquire() else {
                self.count(endpoint, "circuit_open", None);
                failures.push(Failure {
                    endpoint: endpoint.name.clone(),
                    reason: "circuit breaker open (skipped)".into(),
                });
                continue;
            };
            let remaining = budget.map(|b| b.until.saturating_duration_since(Instant::now()));
            if remaining.is_some_and(|r| r.is_zero()) {
                failures.push(Failure {
                    endpoint: endpoint.name.clone(),
                    reason: "caller's deadline reached (not tried)".into(),
                });
                drop(permit);
                break;
            }
            let caller_bound =
                budget.is_some_and(|b| b.set_by_caller) && remaining.is_some_and(|r| r < self.timeout);
            let budget = remaining.map_or(self.timeout, |r| r.min(self.timeout));
            let started = std::time::Instant::now();
            let outcome = tokio::time::timeout(budget, self.attempt(endpoint, &body)).await;
            let latency = started.elapsed();
            match outcome {
                Ok(Ok(answer)) => {
                    self.count(endpoint, "success", Some(latency));
                    endpoint.record(latency, None);
                    permit.success();
                    return Ok((answer, index));
                }
                Ok(Err((outcome, reason))) => {
                    self.count(endpoint, outcome, Some(latency));
                    endpoint.record(latency, Some(&reason));
                    permit.failure();
                    tracing::warn!(endpoint = %endpoint.name, %reason, "upstream failed");
                    failures.push(Failure {
                        endpoint: endpoint.name.clone(),
                        reason,
                    });
                }
                Err(_) if caller_bound => {
                    // The caller's deadline, not the endpoint, ran out: no verdict on the endpoint.
                    self.count(endpoint, "deadline", Some(latency));
                    drop(permit);
                    failures.push(Failure {
                        endpoint: endpoint.name.clone(),
                        reason: format!("caller's deadline reached after {} ms", latency.as_millis()),
                    });
                    break;
                }
                Err(_) => {
                    self.count(endpoint, "timeout", Some(latency));
                    let reason = format!("timed out after {} s", budget.as_secs_f32());
                    endpoint.record(latency, Some(&reason));
                    permit.failure();
                    tracing::warn!(endpoint = %endpoint.name, %reason, "upstream failed");
                    failures.push(Failure {
                        endpoint: endpoint.name.clone(),
                        reason,
                    });
                }
            }
        }
        Err(failures)
    }

    fn count(&self, endpoint: &Endpoint, outcome: &'static str, latency: Option<Duration>) {
        let name = endpoint.name.to_string();
        self.metrics
            .upstream_requests
            .get_or_create(&vec![("endpoint", name.clone()), ("outcome", outcome.to_owned())])
            .inc();
        if let Some(l) = latency {
            self.metrics
                .upstream_duration
                .get_or_create(&vec![("endpoint", name)])
                .observe(l.as_secs_f64());
        }
    }

    async fn attempt(
        &self,
        endpoint: &Endpoint,
        body: &WireRequest<'_>,
    ) -> Result<Answer, (&'static str, String)> {
        let response = endpoint
            .client
            .post(endpoint.request_url.clone())
            .headers({
                let mut headers = self.headers.clone();
                crate::telemetry::inject_current(&mut headers);
                headers
            })
            .json(body)
            .send()
            .await
            .map_err(|e| ("error", describe_reqwest_error(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(("error", format!("HTTP {status}")));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ("error", describe_reqwest_error(&e)))?;
        parse_answer(&bytes, self.default_ttl).map_err(|e| ("invalid_answer", format!("invalid answer: {e}")))
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

    /// The wire form of a feedback report.
    pub fn wire_feedback(&self, fb: &Feedback) -> WireFeedback {
        WireFeedback {
            proxy_url: fb.proxy_url.clone().unwrap_or_default(),
            exchange_id: fb.exchange_id.to_lowercase(),
            connection_type: fb.connection_type.as_str(),
            success: fb.success,
            latency_ms: fb.latency_ms,
            error_details: fb.error_details.clone(),
            timestamp: humantime::format_rfc3339_millis(fb.timestamp).to_string(),
            client_id: if fb.client_id.is_empty() {
                self.broker_client_id.clone()
            } else {
                fb.client_id.clone()
            },
        }
    }

    /// Sends one feedback report to endpoint `index`.
    pub async fn deliver_feedback(&self, index: usize, body: &WireFeedback) -> Result<(), DeliveryError> {
        let endpoint = &self.endpoints[index];
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

/// Validates an upstream answer (the design's ProxyResponse). Unknown fields are ignored.
pub fn parse_answer(body: &[u8], default_ttl: u32) -> Result<Answer, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Object(mut obj) = value else {
        return Err("not a JSON object".into());
    };
    let proxy_url = match obj.remove("proxy_url") {
        Some(Value::String(s)) => s,
        Some(_) => return Err("proxy_url is not a string".into()),
        None => return Err("proxy_url is missing".into()),
    };
    check_proxy_url(&proxy_url).map_err(|rule| format!("proxy_url {rule}"))?;
    let strategy = match obj.remove("strategy") {
        Some(Value::String(s)) => s,
        Some(_) => return Err("strategy is not a string".into()),
        None => return Err("strategy is missing".into()),
    };
    let ttl_seconds = match obj.remove("ttl_seconds") {
        None | Some(Value::Null) => default_ttl,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(t) if t >= MIN_ANSWER_TTL => u32::try_from(t).unwrap_or(u32::MAX),
            Some(t) => return Err(format!("ttl_seconds {t} is below {MIN_ANSWER_TTL}")),
            None => return Err(format!("ttl_seconds {n} is not a whole number")),
        },
        Some(_) => return Err("ttl_seconds is not a number".into()),
    };
    let fallback_policy = match obj.remove("fallback_policy") {
        None | Some(Value::Null) => FallbackPolicy::EmbeddedFallback,
        Some(Value::String(s)) => match s.as_str() {
            "direct_connection" => FallbackPolicy::DirectConnection,
            "embedded_fallback" => FallbackPolicy::EmbeddedFallback,
            "fail" => FallbackPolicy::Fail,
            other => {
                return Err(format!(
                    "fallback_policy '{other}' is not one of direct_connection, embedded_fallback, fail"
                ));
            }
        },
        Some(_) => return Err("fallback_policy is not a string".into()),
    };
    let metadata = match obj.remove("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("metadata is not an object".into()),
    };
    Ok(Answer {
        proxy_url,
        strategy,
        ttl_seconds,
        fallback_policy,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_answers_parse_with_defaults_and_extra_fields_ignored() {
        let a = parse_answer(
            br#"{"proxy_url":"socks5://p:1080","strategy":"geo","extra":1}"#,
            300,
        )
        .unwrap();
        assert_eq!(a.ttl_seconds, 300);
        assert_eq!(a.fallback_policy, FallbackPolicy::EmbeddedFallback);
        let a = parse_answer(
            br#"{"proxy_url":"http://u:p@p:8080","strategy":"s","ttl_seconds":90,"fallback_policy":"fail","metadata":{"k":"v"}}"#,
            300,
        )
        .unwrap();
        assert_eq!((a.ttl_seconds, a.fallback_policy), (90, FallbackPolicy::Fail));
        assert_eq!(a.metadata["k"], "v");
    }

    #[test]
    fn invalid_answers_are_rejected_with_the_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"garbage", "not JSON"),
            (b"[]", "not a JSON object"),
            (br#"{"strategy":"s"}"#, "proxy_url is missing"),
            (br#"{"proxy_url":"ftp://p:1","strategy":"s"}"#, "scheme 'ftp'"),
            (br#"{"proxy_url":"socks5://p","strategy":"s"}"#, "no port"),
            (
                br#"{"proxy_url":"socks5://p:1","strategy":"s","ttl_seconds":5}"#,
                "below 60",
            ),
            (
                br#"{"proxy_url":"socks5://p:1","strategy":"s","fallback_policy":"retry"}"#,
                "fallback_policy 'retry'",
            ),
            (br#"{"proxy_url":"socks5://p:1"}"#, "strategy is missing"),
            (
                br#"{"proxy_url":"socks5://p:1","strategy":"s","metadata":[1]}"#,
                "metadata is not an object",
            ),
        ];
        for (body, want) in cases {
            let err = parse_answer(body, 300).unwrap_err();
            assert!(err.contains(want), "{err} should contain {want}");
        }
    }

    #[test]
    fn a_rejected_proxy_url_never_shows_its_password() {
        let err = parse_answer(br#"{"proxy_url":"ftp://u:hunter2@p:1","strategy":"s"}"#, 300).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
