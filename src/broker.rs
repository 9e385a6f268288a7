//! The decision: which proxy a feed gets.
//!
//! With `proxy.enabled` and `external_service.enabled`: fresh cache entry → upstreams (one call per
//! key however many feeds ask at once, on a task of its own under the broker's budget; each caller
//! waits for it until its own deadline) → stale cache entry (stale-if-error) → embedded
//! configuration if `fallback_to_embedded`, else UNAVAILABLE listing each endpoint's failure
//! (RESOURCE_EXHAUSTED with a retry hint when the lookup could not even start because
//! `upstream_max_in_flight_total` lookups were running).
//! Otherwise the embedded configuration answers (DIRECT when it names no proxy). The rule is the
//! same for HTTP and WebSocket.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use proxy_broker_core::{EmbeddedResolver, Resolution};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Instrument;

use crate::cache::{AnswerCache, CacheKey, Cached};
use crate::clock::{Clock, SystemClock};
use crate::config::BrokerConfig;
use crate::error::Error;
use crate::feedback::{FeedbackQueue, Outgoing};
use crate::flight::{Flights, Missed};
use crate::json::json_to_value;
use crate::metrics::Metrics;
use crate::pb;
use crate::request::{Feedback, Lookup};
use crate::upstream::{Budget, Failure, Upstreams};

pub use crate::cache::STALE_ANSWER_TTL;

/// The result of one upstream lookup, shared by every waiter: the entry, and whether it was
/// already in the cache (filled by a flight that finished just before this one started).
type Fetched = Result<(Arc<Cached>, bool), Arc<Vec<Failure>>>;

/// Most bytes of proxy URLs with failure counts (outlier detection).
const FAILURE_COUNT_BYTES: u64 = 8 << 20;
/// How long a failure count is kept without a new report.
const FAILURE_COUNT_TTL: Duration = Duration::from_secs(3600);
/// Retry hint sent when too many upstream lookups are in flight.
const FLIGHTS_FULL_RETRY: Duration = Duration::from_secs(1);

/// Upstream delegation state (present when `external_service` is on). `Debug` shows sizes,
/// never the proxy URLs it holds.
pub struct Delegation {
    /// The endpoints.
    pub upstreams: Arc<Upstreams>,
    /// Cached upstream answers.
    pub cache: AnswerCache,
    flights: Arc<Flights<CacheKey, Fetched>>,
    /// One permit per upstream lookup in flight (`upstream_max_in_flight_total`).
    flight_permits: Arc<Semaphore>,
    flight_permits_total: i64,
    /// The budget of one detached lookup (the broker's own per-call limit).
    flight_timeout: Duration,
    /// Feedback forwarding.
    pub feedback: FeedbackQueue,
    /// The `external_service` block and credential-file contents this was built from.
    built_from: (proxy_broker_core::ExternalServiceConfig, u64),
}

/// Shared state behind both gRPC services. Configuration-derived parts live in a [`State`] that
/// [`Broker::reload`] swaps atomically; counters and metrics outlive reloads. `Debug` prints no
/// secret: no token, and no proxy URL (they may carry credentials).
pub struct Broker {
    state: ArcSwap<State>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Consecutive failure reports per proxy URL (outlier detection): bounded in bytes and
    /// expiring, since the URLs come from callers.
    failures: moka::sync::Cache<String, u32>,
}

/// Everything built from one configuration.
pub struct State {
    /// The configuration in force.
    pub config: Arc<BrokerConfig>,
    embedded: Arc<EmbeddedResolver>,
    delegation: Option<Arc<Delegation>>,
    /// Bearer tokens accepted from callers (empty: no auth).
    pub tokens: Arc<Vec<String>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("state", &**self.state.load())
            .field("failure_counts", &self.failures.entry_count())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("config", &self.config)
            .field("embedded", &self.embedded)
            .field("delegation", &self.delegation)
            .field("tokens", &format_args!("{} (not shown)", self.tokens.len()))
            .finish()
    }
}

impl std::fmt::Debug for Delegation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delegation")
            .field("upstreams", &self.upstreams.endpoint_names())
            .field("cache_entries", &self.cache.len())
            .field("flights", &self.flights.len())
            .field("flight_permits_total", &self.flight_permits_total)
            .finish_non_exhaustive()
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadSummary {
    /// The embedded configuration changed (pool state restarted).
    pub embedded_changed: bool,
    /// Upstream settings or credential files changed (cache dropped, breakers reset).
    pub upstreams_changed: bool,
    /// `server.*` settings that only take effect on restart changed.
    pub restart_needed: bool,
}

impl Broker {
    /// A broker for a validated configuration, on the real clock. Must run inside a Tokio runtime
    /// (the feedback worker is spawned). Fails when credential files cannot be read.
    pub fn new(config: BrokerConfig) -> Result<Self, proxy_broker_core::ConfigError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// As [`Broker::new`], with the cache and breakers on `clock`.
    pub fn with_clock(
        config: BrokerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, proxy_broker_core::ConfigError> {
        let metrics = Arc::new(Metrics::new());
        let state = build_state(config, None, &clock, &metrics)?;
        Ok(Self {
            state: ArcSwap::from_pointee(state),
            clock,
            metrics,
            failures: moka::sync::Cache::builder()
                .weigher(|url: &String, _: &u32| weight(url))
                .max_capacity(FAILURE_COUNT_BYTES)
                .time_to_idle(FAILURE_COUNT_TTL)
                .build(),
        })
    }

    /// The state in force (cheap: an `Arc` load).
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// The state in force, borrowed for a short while (no reference count touched).
    pub fn state_guard(&self) -> arc_swap::Guard<Arc<State>> {
        self.state.load()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<BrokerConfig> {
        self.state.load().config.clone()
    }

    /// Upstream delegation state, when enabled.
    pub fn delegation(&self) -> Option<Arc<Delegation>> {
        self.state.load().delegation.clone()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Proxy URLs ejected so far.
    pub fn ejections(&self) -> u64 {
        self.metrics.ejections.get()
    }

    /// Applies a new, validated configuration. Parts that did not change keep their state: an
    /// unchanged embedded configuration keeps its pool rotation, leases and ejections; unchanged
    /// upstream settings (and credential files) keep the cache, breakers and feedback queue.
    /// Cache entries are dropped only when the upstream settings change. On error nothing changes.
    pub fn reload(&self, config: BrokerConfig) -> Result<ReloadSummary, proxy_broker_core::ConfigError> {
        let current = self.state.load_full();
        let old = &current.config;
        let summary = ReloadSummary {
            embedded_changed: embedded_part(&old.proxy) != embedded_part(&config.proxy),
            upstreams_changed: false,
            restart_needed: old.server.listen != config.server.listen
                || old.server.metrics_listen != config.server.metrics_listen
                || old.server.tls != config.server.tls
                || old.server.max_message_bytes != config.server.max_message_bytes
                || old.server.max_concurrent_requests != config.server.max_concurrent_requests
                || old.server.max_concurrent_streams != config.server.max_concurrent_streams
                || old.server.http2_keepalive_interval_seconds
                    != config.server.http2_keepalive_interval_seconds
                || old.server.http2_keepalive_timeout_seconds
                    != config.server.http2_keepalive_timeout_seconds
                || old.server.request_body_timeout_seconds != config.server.request_body_timeout_seconds
                || old.server.request_timeout_seconds != config.server.request_timeout_seconds
                || old.server.reflection != config.server.reflection,
        };
        let next = build_state(config, Some(&current), &self.clock, &self.metrics)?;
        let upstreams_changed = match (&current.delegation, &next.delegation) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, None) => false,
            _ => true,
        };
        if upstreams_changed && let Some(old) = &current.delegation {
            // Endpoints no longer configured stop being exported (those still configured keep
            // their series, now fed by the new upstreams).
            let kept: std::collections::HashSet<String> = next
                .delegation
                .iter()
                .flat_map(|d| d.upstreams.endpoints().iter().map(|e| e.name.to_string()))
                .collect();
            old.upstreams.retire_metrics(&kept);
        }
        self.state.store(Arc::new(next));
        Ok(ReloadSummary {
            upstreams_changed,
            ..summary
        })
    }

    /// Refreshes gauges from live state, then renders the metrics text.
    pub fn render_metrics(&self) -> String {
        let state = self.state.load();
        let mut entries = 0;
        if let Some(d) = &state.delegation {
            entries = d.cache.len();
            d.upstreams.refresh_circuit_metrics();
        }
        self.metrics
            .cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.metrics.render()
    }

    /// Answers one validated request, waiting for upstreams until `wait_until` at most (the
    /// caller's deadline or the server's per-call limit, whichever is earlier, less a margin to
    /// answer with a fallback). The upstream lookup itself is not bound by it.
    pub async fn request_proxy(
        &self,
        lookup: &Lookup,
        wait_until: Option<Instant>,
    ) -> Result<pb::ProxyResponse, Error> {
        let state = self.state.load();
        let Some(d) = &state.delegation else {
            return Ok(state.embedded_answer(lookup));
        };
        let key = CacheKey::new(
            &lookup.exchange_id,
            lookup.connection_type,
            lookup.region.as_deref(),
        );
        let now = d.cache.now();
        if let Some(hit) = d.cache.fresh_at(&key, now) {
            self.metrics.cache_hits.inc();
            return Ok(hit.fresh_response(now));
        }
        let ticket = d.flights.join(&key, || {
            let permit = d.flight_permits.clone().try_acquire_owned().ok()?;
            let (d, key, lookup) = (d.clone(), key.clone(), lookup.clone());
            // The lookup stays in the trace of the call that started it (its upstream requests
            // carry that call's traceparent), though it outlives the call if need be.
            let span = tracing::Span::current();
            Some(
                async move {
                    let fetched = d.fetch(key, &lookup).await;
                    drop(permit);
                    fetched
                }
                .instrument(span),
            )
        });
        let failures: Arc<Vec<Failure>> = match ticket {
            None => {
                let limit = d.flight_permits_total;
                if let Some(answer) = self.fallback(&state, d, &key, lookup, None) {
                    return Ok(answer);
                }
                return Err(Error::ResourceExhausted {
                    message: format!(
                        "{limit} upstream lookups are in flight (proxy.external_service.upstream_max_in_flight_total) and fallback_to_embedded is false: retry shortly"
                    ),
                    retry_after: FLIGHTS_FULL_RETRY,
                });
            }
            Some(ticket) => {
                if !ticket.led {
                    self.metrics.coalesced.inc();
                }
                match ticket.wait(wait_until).await {
                    Ok(Ok((cached, false))) => return Ok(cached.upstream_response()),
                    Ok(Ok((hit, true))) => return Ok(hit.fresh_response(d.cache.now())),
                    Ok(Err(failures)) => failures,
                    Err(Missed::Deadline) => Arc::new(vec![Failure {
                        endpoint: Arc::from("*"),
                        reason: "the caller's deadline came before the upstream lookup ended (it goes on and fills the cache)".into(),
                    }]),
                    Err(Missed::Lost) => Arc::new(vec![Failure {
                        endpoint: Arc::from("*"),
                        reason: "the upstream lookup ended without an answer".into(),
                    }]),
                }
            }
        };
        if let Some(answer) = self.fallback(&state, d, &key, lookup, Some(&failures)) {
            return Ok(answer);
        }
        Err(Error::Unavailable(format!(
            "every upstream proxy service failed and fallback_to_embedded is false: {}",
            summarise(&failures)
        )))
    }

    /// What a caller gets when upstreams did not answer: a stale entry, else the embedded
    /// configuration when `fallback_to_embedded`, else nothing.
    fn fallback(
        &self,
        state: &State,
        d: &Delegation,
        key: &CacheKey,
        lookup: &Lookup,
        failures: Option<&[Failure]>,
    ) -> Option<pb::ProxyResponse> {
        let why = failures.map_or_else(|| "too many upstream lookups in flight".to_owned(), summarise);
        if let Some(stale) = d.cache.stale(key) {
            tracing::warn!(exchange = %key.exchange, failures = %why, "no upstream answer: serving a stale cached answer");
            return Some(stale.stale_response(d.cache.now()));
        }
        if state.config.proxy.external_service.fallback_to_embedded {
            tracing::warn!(exchange = %key.exchange, failures = %why, "no upstream answer: answering from the embedded configuration");
            return Some(state.embedded_answer(lookup));
        }
        None
    }

    /// Takes a validated feedback report: queues it for upstream, ends a `least_connections`
    /// lease on failure, and ejects a proxy URL after `eject_after_failures` consecutive failure
    /// reports (evicting cached answers that hold it and skipping it in embedded pools).
    pub fn report_feedback(&self, feedback: &Feedback) {
        let state = self.state.load_full();
        self.metrics.count_feedback(feedback.success);
        if let Some(d) = &state.delegation {
            let served_by = feedback.proxy_url.as_ref().and_then(|u| d.cache.served_by(u));
            d.feedback.enqueue(Outgoing {
                served_by,
                body: d.upstreams.wire_feedback(feedback),
            });
        }
        let Some(url) = &feedback.proxy_url else { return };
        if feedback.success {
            // A lookup first: most successes have no count to clear, and removal costs more.
            if self.failures.contains_key(url.as_str()) {
                self.failures.invalidate(url.as_str());
            }
            return;
        }
        state.embedded.release(url);
        let ext = &state.config.proxy.external_service;
        let threshold = u32::try_from(ext.eject_after_failures).unwrap_or(3);
        let reached = {
            let counted = self
                .failures
                .entry_by_ref(url.as_str())
                .and_upsert_with(|count| count.map_or(1, |c| c.into_value().saturating_add(1)));
            if *counted.value() >= threshold {
                self.failures.invalidate(url.as_str());
                true
            } else {
                false
            }
        };
        if reached {
            let evicted = state.delegation.as_ref().map_or(0, |d| d.cache.evict_proxy(url));
            let pools = state
                .embedded
                .eject(url, u8::try_from(ext.max_ejection_percent).unwrap_or(50));
            let proxy = proxy_broker_core::redact::redact_url(url);
            if evicted > 0 || pools > 0 {
                self.metrics.ejections.inc();
                tracing::warn!(
                    %proxy,
                    evicted_cache_entries = evicted,
                    ejected_from_pools = pools,
                    "proxy ejected after repeated failure reports"
                );
            } else {
                // Not cached, and its pools are at max_ejection_percent (or it is in none).
                tracing::info!(%proxy, "repeated failure reports, but nothing to eject");
            }
        }
    }
}

impl State {
    /// The embedded configuration's answer: EMBEDDED with a proxy, DIRECT without.
    fn embedded_answer(&self, lookup: &Lookup) -> pb::ProxyResponse {
        let Resolution {
            proxy_url,
            strategy,
            timeout_seconds,
        } = self.embedded.resolve(&lookup.exchange_id, lookup.connection_type);
        let ttl_seconds = u32::try_from(self.config.proxy.external_service.cache_ttl_seconds).unwrap_or(300);
        let mut metadata = prost_types::Struct::default();
        if let Some(timeout) = timeout_seconds {
            metadata
                .fields
                .insert("timeout_seconds".into(), json_to_value(&timeout.into()));
        }
        let (source, fallback_policy) = match proxy_url {
            Some(_) => (pb::ProxySource::Embedded, pb::FallbackPolicy::EmbeddedFallback),
            None => (pb::ProxySource::Direct, pb::FallbackPolicy::DirectConnection),
        };
        pb::ProxyResponse {
            proxy_url: proxy_url.unwrap_or_default(),
            strategy: strategy.to_owned(),
            ttl_seconds,
            fallback_policy: fallback_policy.into(),
            metadata: Some(metadata),
            source: source.into(),
            upstream_endpoint: String::new(),
            lease_expires_at: None,
        }
    }
}

/// The proxy settings without `external_service`: what the embedded resolver is built from.
fn embedded_part(p: &proxy_broker_core::ProxySettings) -> proxy_broker_core::ProxySettings {
    proxy_broker_core::ProxySettings {
        external_service: Default::default(),
        ..p.clone()
    }
}

/// A fingerprint of the credential files `ext` names (their contents), so that a rotated secret
/// counts as a change.
fn credential_fingerprint(ext: &proxy_broker_core::ExternalServiceConfig) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (key, path) in &ext.auth_credentials {
        if key.ends_with("_file") {
            key.hash(&mut h);
            std::fs::read(path).unwrap_or_default().hash(&mut h);
        }
    }
    h.finish()
}

/// Builds the state for `config`, reusing parts of `previous` that did not change.
fn build_state(
    config: BrokerConfig,
    previous: Option<&State>,
    clock: &Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
) -> Result<State, proxy_broker_core::ConfigError> {
    let tokens = Arc::new(config.accepted_tokens()?);
    let ext = &config.proxy.external_service;
    let embedded = match previous {
        Some(p)
            if embedded_part(&p.config.proxy) == embedded_part(&config.proxy)
                && p.config.proxy.external_service.cache_ttl_seconds == ext.cache_ttl_seconds =>
        {
            p.embedded.clone()
        }
        _ => Arc::new(EmbeddedResolver::new(
            &config.proxy,
            Duration::from_secs(ext.cache_ttl_seconds.unsigned_abs()),
        )),
    };
    let delegation = if config.proxy.enabled && ext.enabled {
        let built_from = (ext.clone(), credential_fingerprint(ext));
        match previous.and_then(|p| p.delegation.as_ref()) {
            Some(d) if d.built_from == built_from => Some(d.clone()),
            _ => {
                let upstreams = Arc::new(Upstreams::new(ext, clock.clone(), metrics.clone())?);

                Some(Arc::new(Delegation {
                    cache: AnswerCache::new(
                        ext.cache_max_entries.unsigned_abs(),
                        Duration::from_secs(ext.stale_if_error_seconds.unsigned_abs()),
                        clock.clone(),
                    ),
                    flights: Arc::new(Flights::default()),
                    flight_permits: upstreams.flight_permits().clone(),
                    flight_permits_total: ext.upstream_max_in_flight_total,
                    flight_timeout: {
                        let limit = Duration::from_secs(config.server.request_timeout_seconds.unsigned_abs());
                        limit - limit / 10
                    },
                    feedback: FeedbackQueue::start(
                        upstreams.clone(),
                        usize::try_from(ext.feedback_queue_size).unwrap_or(10_000),
                        metrics.feedback_dropped.clone(),
                    ),
                    upstreams,
                    built_from,
                }))
            }
        }
    } else {
        None
    };
    Ok(State {
        config: Arc::new(config),
        embedded,
        delegation,
        tokens,
    })
}

impl Delegation {
    /// One upstream lookup for `key`, run on its own task: asks the endpoints under the broker's
    /// own budget and caches the answer.
    async fn fetch(&self, key: CacheKey, lookup: &Lookup) -> Fetched {
        // Between a caller's cache miss and its starting this flight, another flight for the key
        // may have filled the entry and finished: use it rather than ask again.
        if let Some(hit) = self.cache.fresh(&key) {
            return Ok((hit, true));
        }
        let budget = Budget {
            until: Instant::now() + self.flight_timeout,
            set_by_caller: false,
        };
        match self.upstreams.request(lookup, Some(budget)).await {
            Ok((answer, index)) => {
                let endpoint = self
                    .upstreams
                    .endpoints()
                    .get(index)
                    .map_or_else(|| Arc::from("?"), |e| e.name.clone());
                Ok((self.cache.insert(key, &answer, endpoint, index), false))
            }
            Err(failures) => Err(Arc::new(failures)),
        }
    }
}

/// `endpoint: reason; ...` for logs and errors.
fn summarise(failures: &[Failure]) -> String {
    failures
        .iter()
        .map(|f| format!("{}: {}", f.endpoint, f.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The weight of a URL-keyed entry in a byte-bounded map (the key, plus a little for the entry).
fn weight(url: &str) -> u32 {
    u32::try_from(url.len().saturating_add(64)).unwrap_or(u32::MAX)
}
