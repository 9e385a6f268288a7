//! The decision: which proxy a feed gets.
//!
//! With `proxy.enabled` and `external_service.enabled`: fresh cache entry → upstreams (one call per
//! key however many feeds ask at once) → stale cache entry (stale-if-error) → embedded
//! configuration if `fallback_to_embedded`, else UNAVAILABLE listing each endpoint's failure.
//! Otherwise the embedded configuration answers (DIRECT when it names no proxy). The rule is the
//! same for HTTP and WebSocket.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use proxy_broker_core::{EmbeddedResolver, Resolution};
use tokio::time::Instant;

use crate::cache::{AnswerCache, CacheKey, Cached};
use crate::clock::{Clock, SystemClock};
use crate::coalesce::Coalescer;
use crate::config::BrokerConfig;
use crate::error::Error;
use crate::feedback::{FeedbackQueue, Outgoing};
use crate::json::{json_to_struct, json_to_value};
use crate::pb;
use crate::request::{Feedback, Lookup};
use crate::upstream::{Answer, Failure, Upstreams};

/// TTL handed out with a stale answer (at most; less when the stale window ends sooner).
pub const STALE_ANSWER_TTL: u64 = 60;

/// The result of one coalesced upstream lookup, shared by every waiter: the entry, and whether
/// it was already in the cache (filled by a flight that finished just before this one started).
type Fetched = Result<(Arc<Cached>, bool), Arc<Vec<Failure>>>;

/// Upstream delegation state (present when `external_service` is on).
#[derive(Debug)]
pub struct Delegation {
    /// The endpoints.
    pub upstreams: Arc<Upstreams>,
    /// Cached upstream answers.
    pub cache: AnswerCache,
    coalescer: Coalescer<CacheKey, Fetched>,
    /// Which endpoint handed out each proxy URL (for routing feedback).
    served_by: moka::sync::Cache<String, usize>,
    /// Feedback forwarding.
    pub feedback: FeedbackQueue,
}

/// Shared state behind both gRPC services.
#[derive(Debug)]
pub struct Broker {
    config: Arc<BrokerConfig>,
    embedded: EmbeddedResolver,
    delegation: Option<Delegation>,
    /// Consecutive failure reports per proxy URL (outlier detection).
    failures: DashMap<String, u32>,
    ejections: std::sync::atomic::AtomicU64,
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
        let ext = &config.proxy.external_service;
        let ttl = Duration::from_secs(ext.cache_ttl_seconds.unsigned_abs());
        let embedded = EmbeddedResolver::new(&config.proxy, ttl);
        let delegation = if config.proxy.enabled && ext.enabled {
            let upstreams = Arc::new(Upstreams::new(ext, clock.clone())?);
            Some(Delegation {
                cache: AnswerCache::new(
                    ext.cache_max_entries.unsigned_abs(),
                    Duration::from_secs(ext.stale_if_error_seconds.unsigned_abs()),
                    clock,
                ),
                coalescer: Coalescer::default(),
                served_by: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(Duration::from_secs(7200))
                    .build(),
                feedback: FeedbackQueue::start(
                    upstreams.clone(),
                    usize::try_from(ext.feedback_queue_size).unwrap_or(10_000),
                ),
                upstreams,
            })
        } else {
            None
        };
        Ok(Self {
            config: Arc::new(config),
            embedded,
            delegation,
            failures: DashMap::new(),
            ejections: Default::default(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Upstream delegation state, when enabled.
    pub fn delegation(&self) -> Option<&Delegation> {
        self.delegation.as_ref()
    }

    /// Proxy URLs ejected so far.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Answers one validated request; `deadline` is the caller's gRPC deadline, if any.
    pub async fn request_proxy(
        &self,
        lookup: &Lookup,
        deadline: Option<Instant>,
    ) -> Result<pb::ProxyResponse, Error> {
        let Some(d) = &self.delegation else {
            return Ok(self.embedded_answer(lookup));
        };
        let key = CacheKey::new(
            &lookup.exchange_id,
            lookup.connection_type,
            lookup.region.as_deref(),
        );
        if let Some(hit) = d.cache.fresh(&key) {
            return Ok(cached_answer(&hit, d.cache.now(), false));
        }
        let (fetched, _led) = d
            .coalescer
            .run(&key, || async {
                // Between this caller's cache miss and its joining the flight, another flight for
                // the key may have filled the entry and finished: use it rather than ask again.
                if let Some(hit) = d.cache.fresh(&key) {
                    return Ok((hit, true));
                }
                match d.upstreams.request(lookup, deadline).await {
                    Ok((answer, index)) => {
                        let endpoint = d.upstreams.endpoints()[index].name.clone();
                        d.served_by.insert(answer.proxy_url.clone(), index);
                        Ok((d.cache.insert(key.clone(), answer, endpoint), false))
                    }
                    Err(failures) => Err(Arc::new(failures)),
                }
            })
            .await;
        let failures = match fetched {
            Ok((cached, false)) => return Ok(upstream_answer(&cached.answer, &cached.endpoint)),
            Ok((hit, true)) => return Ok(cached_answer(&hit, d.cache.now(), false)),
            Err(failures) => failures,
        };
        if let Some(stale) = d.cache.stale(&key) {
            tracing::warn!(exchange = %key.exchange, "every upstream failed: serving a stale cached answer");
            return Ok(cached_answer(&stale, d.cache.now(), true));
        }
        let summary = failures
            .iter()
            .map(|f| format!("{}: {}", f.endpoint, f.reason))
            .collect::<Vec<_>>()
            .join("; ");
        if self.config.proxy.external_service.fallback_to_embedded {
            tracing::warn!(failures = %summary, "every upstream failed: answering from the embedded configuration");
            Ok(self.embedded_answer(lookup))
        } else {
            Err(Error::Unavailable(format!(
                "every upstream proxy service failed and fallback_to_embedded is false: {summary}"
            )))
        }
    }

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
        }
    }

    /// Takes a validated feedback report: queues it for upstream, ends a `least_connections`
    /// lease on failure, and ejects a proxy URL after `eject_after_failures` consecutive failure
    /// reports (evicting cached answers that hold it and skipping it in embedded pools).
    pub fn report_feedback(&self, feedback: &Feedback) {
        if let Some(d) = &self.delegation {
            let served_by = feedback.proxy_url.as_ref().and_then(|u| d.served_by.get(u));
            d.feedback.enqueue(Outgoing {
                served_by,
                body: d.upstreams.wire_feedback(feedback),
            });
        }
        let Some(url) = &feedback.proxy_url else { return };
        if feedback.success {
            self.failures.remove(url);
            return;
        }
        self.embedded.release(url);
        let ext = &self.config.proxy.external_service;
        let threshold = u32::try_from(ext.eject_after_failures).unwrap_or(3);
        let reached = {
            let mut count = self.failures.entry(url.clone()).or_insert(0);
            *count += 1;
            if *count >= threshold {
                *count = 0;
                true
            } else {
                false
            }
        };
        if reached {
            let evicted = self.delegation.as_ref().map_or(0, |d| d.cache.evict_proxy(url));
            let pools = self
                .embedded
                .eject(url, u8::try_from(ext.max_ejection_percent).unwrap_or(50));
            let proxy = proxy_broker_core::redact::redact_url(url);
            if evicted > 0 || pools > 0 {
                self.ejections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

fn upstream_answer(answer: &Answer, endpoint: &str) -> pb::ProxyResponse {
    pb::ProxyResponse {
        proxy_url: answer.proxy_url.clone(),
        strategy: answer.strategy.clone(),
        ttl_seconds: answer.ttl_seconds.min(crate::cache::MAX_TTL.as_secs() as u32),
        fallback_policy: answer.fallback_policy.into(),
        metadata: Some(json_to_struct(&answer.metadata)),
        source: pb::ProxySource::Upstream.into(),
        upstream_endpoint: endpoint.to_owned(),
    }
}

fn cached_answer(cached: &Cached, now: Instant, stale: bool) -> pb::ProxyResponse {
    let mut response = upstream_answer(&cached.answer, &cached.endpoint);
    response.source = pb::ProxySource::Cache.into();
    // A stale answer is a stopgap: the feed should ask again soon, but not hammer the broker.
    response.ttl_seconds = if stale {
        let left = cached.stale_until.saturating_duration_since(now).as_secs();
        u32::try_from(left.clamp(1, STALE_ANSWER_TTL)).unwrap_or(1)
    } else {
        // The entry may live up to 10 % past the answer's TTL (jitter); the feed is never told
        // more than the upstream (or the 3600 s cap) allowed.
        cached.remaining_ttl(now).min(response.ttl_seconds)
    };
    if let Some(m) = response.metadata.as_mut() {
        m.fields.insert("stale".into(), json_to_value(&stale.into()));
    }
    response
}
