//! Everything the broker builds from one configuration ([`State`]), how a reload is diffed
//! against the state in force ([`ReloadSummary`]), and the gauges refreshed from it before the
//! metrics are rendered. The decision itself is [`crate::broker`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use proxy_broker_core::{ConfigError, ExternalServiceConfig, ProxySettings};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::brokering::Ejection;
use crate::brokering::settings::BrokeringSettings;
use crate::cache::{AnswerCache, CacheKey, Cached};
use crate::clock::Clock;
use crate::config::BrokerConfig;
use crate::feedback::FeedbackQueue;
use crate::flight::Flights;
use crate::metrics::Metrics;
use crate::request::Lookup;
use crate::store::{FLIGHT_POLL_INTERVAL, Store};
use crate::upstream::{Answer, Budget, Failure, Upstreams, parse_answer};

/// The result of one upstream lookup, shared by every caller waiting for it.
pub type Fetched = Result<Arc<Cached>, Arc<Vec<Failure>>>;

/// Upstream delegation state (present when `external_service` is on). `Debug` shows sizes,
/// never the proxy URLs it holds.
pub struct Delegation {
    /// The endpoints.
    pub upstreams: Arc<Upstreams>,
    /// The latest upstream answer per key (stale-if-error, `ListCache`).
    pub cache: AnswerCache,
    /// One upstream lookup per key at a time, on a task of its own.
    pub flights: Arc<Flights<CacheKey, Fetched>>,
    /// One permit per upstream lookup in flight (`upstream_max_in_flight_total`).
    pub flight_permits: Arc<Semaphore>,
    /// `upstream_max_in_flight_total`, for messages.
    pub flight_permits_total: i64,
    /// The budget of one detached lookup (the broker's own per-call limit).
    flight_timeout: Duration,
    /// Feedback forwarding.
    pub feedback: FeedbackQueue,
    /// The `external_service` block and credential-file contents this was built from.
    built_from: (ExternalServiceConfig, u64),
}

/// Everything built from one configuration.
pub struct State {
    /// The configuration in force.
    pub config: Arc<BrokerConfig>,
    /// Upstream delegation, when `proxy.enabled` and `external_service.enabled`.
    pub delegation: Option<Arc<Delegation>>,
    /// Bearer tokens accepted from callers (empty: no auth).
    pub tokens: Arc<Vec<String>>,
    /// The `brokering:` block's settings ([`BrokeringSettings::shared`]), the same `Arc` the
    /// engine holds: a cache hit reads them from the one state it loads.
    pub brokering: Arc<BrokeringSettings>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("config", &self.config)
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
    /// The embedded configuration changed (pool rotation restarted; per-proxy state is kept).
    pub embedded_changed: bool,
    /// Upstream settings or credential files changed (cache and candidates dropped, breakers
    /// reset).
    pub upstreams_changed: bool,
    /// `server.*` settings (or the `store:` block) that only take effect on restart changed.
    pub restart_needed: bool,
}

impl ReloadSummary {
    /// What changes between the state in force and `next`, built from it by [`State::build`].
    pub fn between(current: &State, next: &State) -> Self {
        let (old, new) = (&current.config, &next.config);
        let (a, b) = (&old.server, &new.server);
        Self {
            embedded_changed: embedded_part(&old.proxy) != embedded_part(&new.proxy),
            upstreams_changed: match (&current.delegation, &next.delegation) {
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                (None, None) => false,
                _ => true,
            },
            restart_needed: a.listen != b.listen
                || a.metrics_listen != b.metrics_listen
                || a.tls != b.tls
                || a.max_message_bytes != b.max_message_bytes
                || a.max_concurrent_requests != b.max_concurrent_requests
                || a.max_concurrent_streams != b.max_concurrent_streams
                || a.http2_keepalive_interval_seconds != b.http2_keepalive_interval_seconds
                || a.http2_keepalive_timeout_seconds != b.http2_keepalive_timeout_seconds
                || a.request_body_timeout_seconds != b.request_body_timeout_seconds
                || a.request_timeout_seconds != b.request_timeout_seconds
                || a.reflection != b.reflection
                || a.fast_cache_hits != b.fast_cache_hits
                || old.store != new.store,
        }
    }
}

impl State {
    /// Builds the state for `config`, reusing the delegation of `previous` when its upstream
    /// settings (and credential files) did not change. Fails when credential files cannot be
    /// read or tokens are invalid.
    pub fn build(
        config: BrokerConfig,
        previous: Option<&State>,
        clock: &Arc<dyn Clock>,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let tokens = Arc::new(config.accepted_tokens()?);
        let ext = &config.proxy.external_service;
        let delegation = if config.proxy.enabled && ext.enabled {
            let built_from = (ext.clone(), credential_fingerprint(ext));
            match previous.and_then(|p| p.delegation.as_ref()) {
                Some(d) if d.built_from == built_from => Some(d.clone()),
                _ => Some(Arc::new(Delegation::new(&config, built_from, clock, metrics)?)),
            }
        } else {
            None
        };
        let brokering = config.brokering.settings().shared();
        Ok(State {
            config: Arc::new(config),
            delegation,
            tokens,
            brokering,
        })
    }

    /// The TTL answers from the embedded configuration carry (`cache_ttl_seconds`).
    pub fn embedded_ttl(&self) -> Duration {
        Duration::from_secs(
            self.config
                .proxy
                .external_service
                .cache_ttl_seconds
                .unsigned_abs(),
        )
    }

    /// The outlier-detection settings the brokering engine applies per (proxy, exchange).
    pub fn ejection(&self) -> Ejection {
        ejection(&self.config.proxy)
    }

    /// Stops exporting the metric series of endpoints `next` no longer configures (those still
    /// configured keep their series, now fed by the new upstreams).
    pub fn retire_endpoint_metrics(&self, next: &State) {
        if let Some(old) = &self.delegation {
            let kept: HashSet<String> = next
                .delegation
                .iter()
                .flat_map(|d| d.upstreams.endpoints().iter().map(|e| e.name.to_string()))
                .collect();
            old.upstreams.retire_metrics(&kept);
        }
    }

    /// Refreshes the gauges that mirror this state (cache size, circuit states).
    pub fn refresh_gauges(&self, metrics: &Metrics) {
        let mut entries = 0;
        if let Some(d) = &self.delegation {
            entries = d.cache.len();
            d.upstreams.refresh_circuit_metrics();
        }
        metrics
            .cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }
}

/// The outlier-detection settings of a `proxy:` block.
pub fn ejection(proxy: &ProxySettings) -> Ejection {
    let ext = &proxy.external_service;
    Ejection {
        after_failures: u32::try_from(ext.eject_after_failures).unwrap_or(3),
        max_percent: u8::try_from(ext.max_ejection_percent).unwrap_or(50),
    }
}

impl Delegation {
    fn new(
        config: &BrokerConfig,
        built_from: (ExternalServiceConfig, u64),
        clock: &Arc<dyn Clock>,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let ext = &config.proxy.external_service;
        let upstreams = Arc::new(Upstreams::new(ext, clock.clone(), metrics.clone())?);
        let stale_window = Duration::from_secs(ext.stale_if_error_seconds.unsigned_abs());
        let limit = Duration::from_secs(config.server.request_timeout_seconds.unsigned_abs());
        Ok(Self {
            cache: AnswerCache::new(ext.cache_max_entries.unsigned_abs(), stale_window, clock.clone()),
            flights: Arc::new(Flights::default()),
            flight_permits: upstreams.flight_permits().clone(),
            flight_permits_total: ext.upstream_max_in_flight_total,
            flight_timeout: limit - limit / 10,
            feedback: FeedbackQueue::start(
                upstreams.clone(),
                usize::try_from(ext.feedback_queue_size).unwrap_or(10_000),
                metrics.feedback_dropped.clone(),
            ),
            upstreams,
            built_from,
        })
    }

    /// The endpoint that handed out `proxy_url`, while an answer naming it is cached.
    pub fn served_by(&self, proxy_url: &str) -> Option<usize> {
        self.cache.served_by(proxy_url)
    }

    /// One upstream lookup for `key`, run on its own task: asks the endpoints under the broker's
    /// own budget and caches the answer. Always asks (the brokering engine calls it when no
    /// candidate has headroom, so a fresh cached answer is not what it needs); `lookup` carries
    /// the `exclude_proxies` the engine sent.
    pub async fn fetch(&self, key: CacheKey, lookup: &Lookup) -> Fetched {
        self.fetch_answer(lookup)
            .await
            .map(|(answer, endpoint, index)| self.cache.insert(key, &answer, endpoint, index))
    }

    async fn fetch_answer(&self, lookup: &Lookup) -> Result<(Answer, Arc<str>, usize), Arc<Vec<Failure>>> {
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
                Ok((answer, endpoint, index))
            }
            Err(failures) => Err(Arc::new(failures)),
        }
    }

    /// As [`Delegation::fetch`], once for the whole fleet when `store` is shared: the broker that
    /// takes the key's flight lock asks upstream and publishes the answer; the others wait for
    /// it (until this lookup's budget) and take it from the store. A published answer naming a
    /// proxy in `exclude` does not help a broker that needs another: it takes one of the key's
    /// shared candidates not in `exclude` ([`Delegation::shared_candidate`]) if the fleet holds
    /// one, else asks upstream itself. When the store fails, each broker asks on its own (as with
    /// one broker).
    pub async fn fetch_shared(
        &self,
        store: &dyn Store,
        key: CacheKey,
        lookup: &Lookup,
        exclude: &[Arc<str>],
        budget: Option<crate::brokering::settings::Budget>,
    ) -> Fetched {
        let name = flight_name(lookup);
        let until = Instant::now() + self.flight_timeout;
        let lock_ttl = FLIGHT_LOCK_TTL.min(self.flight_timeout);
        let mut ended = store.flights();
        loop {
            if Instant::now() >= until {
                return self.fetch(key, lookup).await;
            }
            match store.lead_flight(&name, lock_ttl).await {
                Ok(false) => {
                    // Another broker asks upstream: take its answer once published. The lock is
                    // tried again at every look, so a leader that died (or could not publish)
                    // holds its followers up for the lock's short TTL at most.
                    if let Some(hit) = self.shared_candidate(store, &key, lookup, exclude, budget).await {
                        return Ok(hit);
                    }
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => {}
                        m = ended.recv() => {
                            if matches!(m, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                                // No announcements any more: poll.
                                tokio::time::sleep(FLIGHT_POLL_INTERVAL).await;
                            }
                        }
                        () = tokio::time::sleep(FLIGHT_POLL_INTERVAL) => {}
                    }
                }
                Ok(true) | Err(_) => {
                    // The previous leader may have published and let go just before this broker
                    // took the lock, or another replica added a candidate this one lacks: look
                    // once more before asking upstream.
                    if let Some(hit) = self.shared_candidate(store, &key, lookup, exclude, budget).await {
                        let _ = store.end_flight(&name).await;
                        return Ok(hit);
                    }
                    let fetched = self.fetch_answer(lookup).await;
                    let result = match fetched {
                        Ok((answer, endpoint, index)) => {
                            let bytes = shared_form(&answer, &endpoint);
                            let ttl = Duration::from_secs(u64::from(answer.ttl_seconds));
                            let (latest, candidate) = tokio::join!(
                                store.put_answer(&name, &bytes, ttl),
                                store.add_answer(&name, &answer.proxy_url, &bytes, ttl),
                            );
                            if let Err(e) = latest.and(candidate) {
                                tracing::debug!(error = %e, "upstream answer not shared");
                            }
                            Ok(self.cache.insert(key, &answer, endpoint, index))
                        }
                        Err(failures) => Err(failures),
                    };
                    let _ = store.end_flight(&name).await;
                    return result;
                }
            }
        }
    }

    /// One of the fleet's shared candidates for `key` whose proxy is not in `exclude` and may be
    /// handed out now (not banned, ejected or penalised for the exchange, and with headroom under
    /// `budget`, as the store says fleet-wide; the longest-lived first), validated as an upstream
    /// answer is (an invalid entry is skipped) and cached here, so the engine makes it a local
    /// candidate. Without one in the set (a fleet of earlier versions shares only the latest
    /// answer), the latest answer if it is not in `exclude`. `None` when the fleet holds nothing
    /// this broker may use (it then asks upstream), or the store fails.
    pub async fn shared_candidate(
        &self,
        store: &dyn Store,
        key: &CacheKey,
        lookup: &Lookup,
        exclude: &[Arc<str>],
        budget: Option<crate::brokering::settings::Budget>,
    ) -> Option<Arc<Cached>> {
        let name = flight_name(lookup);
        let excluded = |url: &str| exclude.iter().any(|u| **u == *url);
        let answers = store.get_answers(&name).await.ok()?;
        if answers.is_empty() {
            let (bytes, left) = store.get_answer(&name).await.ok()??;
            let (answer, endpoint) = from_shared_form(&bytes, left)?;
            return (!excluded(&answer.proxy_url)).then(|| self.keep_shared(key, &answer, endpoint));
        }
        let valid: Vec<(Answer, Arc<str>)> = answers
            .iter()
            .filter_map(|(bytes, left)| from_shared_form(bytes, *left))
            .filter(|(answer, _)| !excluded(&answer.proxy_url))
            .collect();
        if valid.is_empty() {
            return None;
        }
        // A candidate the fleet has used up helps no more than none: it would take one of the
        // engine's few refills per call, and then ask upstream anyway.
        let exchange = lookup.exchange_id.to_ascii_lowercase();
        let urls: Vec<&str> = valid.iter().map(|(a, _)| a.proxy_url.as_str()).collect();
        let states = store.states(&exchange, &urls).await.ok()?;
        let now = self.cache.now();
        let usable = |state: &Option<crate::store::ProxyState>| {
            state.as_ref().is_none_or(|st| {
                st.standing(now) == crate::store::Standing::Ok
                    && budget.is_none_or(|b| {
                        st.window(lookup.connection_type)
                            .is_none_or(|w| w.has_headroom(b))
                    })
            })
        };
        let (answer, endpoint) = valid
            .into_iter()
            .zip(&states)
            .find(|(_, state)| usable(state))
            .map(|(found, _)| found)?;
        Some(self.keep_shared(key, &answer, endpoint))
    }

    /// A validated shared answer, in this replica's cache.
    fn keep_shared(&self, key: &CacheKey, answer: &Answer, endpoint: Arc<str>) -> Arc<Cached> {
        // Feedback about it goes to the same endpoint here, when this replica has it too.
        let index = self
            .upstreams
            .endpoints()
            .iter()
            .position(|e| *e.name == *endpoint)
            .unwrap_or(usize::MAX);
        self.cache.insert(key.clone(), answer, endpoint, index)
    }
}

/// How long a broker's flight lock holds other brokers back. Short, so that a leader that dies
/// (or cannot publish) strands nobody for long; the cost is that an upstream answering slower
/// than this may be asked once more by another broker.
const FLIGHT_LOCK_TTL: Duration = Duration::from_secs(3);

/// The key of a lookup's shared answer and flight: exchange, connection type and region (no
/// caller input beyond what the cache key holds, so nothing secret).
fn flight_name(lookup: &Lookup) -> String {
    format!(
        "{}/{}/{}",
        lookup.exchange_id.to_ascii_lowercase(),
        lookup.connection_type,
        lookup.region.as_deref().unwrap_or("")
    )
}

/// An answer as other brokers read it: the upstream contract's JSON without `ttl_seconds` (the
/// store keeps the TTL), plus the endpoint that gave it.
fn shared_form(answer: &Answer, endpoint: &str) -> Vec<u8> {
    let policy = match answer.fallback_policy {
        crate::pb::FallbackPolicy::DirectConnection => "direct_connection",
        crate::pb::FallbackPolicy::Fail => "fail",
        _ => "embedded_fallback",
    };
    serde_json::json!({
        "answer": {
            "proxy_url": answer.proxy_url,
            "strategy": answer.strategy,
            "fallback_policy": policy,
            "metadata": answer.metadata,
        },
        "endpoint": endpoint,
    })
    .to_string()
    .into_bytes()
}

/// A shared answer, checked by the same rules as an upstream's (the store could hold anything).
fn from_shared_form(bytes: &[u8], left: Duration) -> Option<(Answer, Arc<str>)> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let endpoint = value.get("endpoint")?.as_str()?;
    // An endpoint name is a configured URL; anything longer is not one of ours.
    let endpoint: Arc<str> = Arc::from(endpoint.get(..endpoint.len().min(2048))?);
    let body = serde_json::to_vec(value.get("answer")?).ok()?;
    let ttl = u32::try_from(left.as_secs().max(1)).unwrap_or(u32::MAX);
    let answer = parse_answer(&body, ttl).ok()?;
    Some((answer, endpoint))
}

/// The proxy settings without `external_service`: what the embedded candidates are built from.
fn embedded_part(p: &ProxySettings) -> ProxySettings {
    ProxySettings {
        external_service: Default::default(),
        ..p.clone()
    }
}

/// A fingerprint of the credential files `ext` names (their contents), so that a rotated secret
/// counts as a change.
fn credential_fingerprint(ext: &ExternalServiceConfig) -> u64 {
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
