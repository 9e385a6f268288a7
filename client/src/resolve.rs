//! What a resolution says (the broker's `ProxyResponse`, or the local configuration's answer) and
//! the small cache that honours its TTL.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use proxy_broker_core::ConnectionType;
use tokio::time::Instant;

use crate::error::Error;
use crate::pb;
use crate::proxy::{ProxyUrl, shown};

/// What the feed should do when the proxy it was given does not work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackPolicy {
    /// Retry without a proxy.
    DirectConnection,
    /// Resolve from the local embedded configuration and retry once.
    EmbeddedFallback,
    /// Give up and return the error.
    Fail,
}

impl FallbackPolicy {
    /// The design's spelling (`direct_connection`, `embedded_fallback`, `fail`).
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackPolicy::DirectConnection => "direct_connection",
            FallbackPolicy::EmbeddedFallback => "embedded_fallback",
            FallbackPolicy::Fail => "fail",
        }
    }

    /// From the wire; an unset policy means the design's default, `embedded_fallback`.
    pub fn from_pb(raw: i32) -> Self {
        match pb::FallbackPolicy::try_from(raw) {
            Ok(pb::FallbackPolicy::DirectConnection) => FallbackPolicy::DirectConnection,
            Ok(pb::FallbackPolicy::Fail) => FallbackPolicy::Fail,
            _ => FallbackPolicy::EmbeddedFallback,
        }
    }
}

/// Where a resolution came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The broker, fresh from an upstream proxy service.
    Upstream,
    /// The broker, an upstream answer from its cache.
    BrokerCache,
    /// The broker's embedded configuration.
    Embedded,
    /// The broker: nothing is configured, connect directly.
    Direct,
    /// This process's own embedded configuration (`CRYPTOFEED_PROXY_*`, YAML): the broker was
    /// unavailable, or the broker's `embedded_fallback` policy applied.
    Local,
    /// The broker was unavailable, there is no local configuration, and the caller allowed direct
    /// connections in that case.
    AllowedDirect,
}

impl Source {
    fn from_pb(raw: i32) -> Self {
        match pb::ProxySource::try_from(raw) {
            Ok(pb::ProxySource::Upstream) => Source::Upstream,
            Ok(pb::ProxySource::Cache) => Source::BrokerCache,
            Ok(pb::ProxySource::Embedded) => Source::Embedded,
            _ => Source::Direct,
        }
    }

    /// Whether the broker gave this answer.
    pub fn is_broker(self) -> bool {
        matches!(
            self,
            Source::Upstream | Source::BrokerCache | Source::Embedded | Source::Direct
        )
    }
}

/// Longest TTL taken from an answer: a broker may say up to `u32::MAX` seconds (136 years), which
/// would overflow deadlines computed from it.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Which proxy to use for one exchange and connection type, and for how long. Its `Debug` masks
/// the proxy's credentials.
#[derive(Clone)]
pub struct Resolved {
    /// The proxy; `None` means connect directly.
    pub proxy: Option<ProxyUrl>,
    /// How it was chosen (`direct`, `static`, a pool strategy, or the upstream's word).
    pub strategy: String,
    /// How long it may be reused before asking again (at most [`MAX_TTL`]).
    pub ttl: Duration,
    /// What to do if the proxy fails.
    pub fallback_policy: FallbackPolicy,
    /// Where it came from.
    pub source: Source,
    /// The upstream service that produced it (broker `Upstream` / `BrokerCache` answers).
    pub upstream_endpoint: Option<String>,
    /// The connect timeout configured for the proxy (`metadata.timeout_seconds`), if any.
    pub connect_timeout: Option<Duration>,
    /// Everything else the answer carried.
    pub metadata: prost_types::Struct,
    /// When to stop opening new connections through this proxy and ask again (the broker's
    /// `lease_expires_at`; `None` from older brokers and for local answers: use `ttl`).
    pub lease_expires_at: Option<std::time::SystemTime>,
}

/// The wire answer, with the proxy URL's and endpoint's credentials masked.
impl fmt::Debug for pb::ProxyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyResponse")
            .field("proxy_url", &shown(&self.proxy_url))
            .field("strategy", &self.strategy)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("fallback_policy", &self.fallback_policy)
            .field("metadata", &self.metadata)
            .field("source", &self.source)
            .field("upstream_endpoint", &shown(&self.upstream_endpoint))
            .field("lease_expires_at", &self.lease_expires_at)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolved")
            .field("proxy", &self.proxy)
            .field("strategy", &self.strategy)
            .field("ttl", &self.ttl)
            .field("fallback_policy", &self.fallback_policy)
            .field("source", &self.source)
            .field("upstream_endpoint", &self.upstream_endpoint.as_deref().map(shown))
            .field("connect_timeout", &self.connect_timeout)
            .field("metadata", &self.metadata)
            .field("lease_expires_at", &self.lease_expires_at)
            .finish()
    }
}

impl Resolved {
    /// Converts the broker's answer, checking its proxy URL.
    pub(crate) fn from_pb(response: pb::ProxyResponse) -> Result<Self, Error> {
        let proxy = match response.proxy_url.as_str() {
            "" => None,
            url => Some(ProxyUrl::parse(url)?),
        };
        let metadata = response.metadata.unwrap_or_default();
        // An out-of-range timestamp is no lease, not a panic.
        let lease_expires_at = response
            .lease_expires_at
            .and_then(|ts| std::time::SystemTime::try_from(ts).ok());
        let connect_timeout = metadata.fields.get("timeout_seconds").and_then(|v| match v.kind {
            Some(prost_types::value::Kind::NumberValue(n)) if (1.0..=3600.0).contains(&n) => {
                Some(Duration::from_secs_f64(n))
            }
            _ => None,
        });
        Ok(Self {
            proxy,
            strategy: response.strategy,
            ttl: Duration::from_secs(response.ttl_seconds.into()).min(MAX_TTL),
            fallback_policy: FallbackPolicy::from_pb(response.fallback_policy),
            source: Source::from_pb(response.source),
            upstream_endpoint: (!response.upstream_endpoint.is_empty()).then_some(response.upstream_endpoint),
            connect_timeout,
            metadata,
            lease_expires_at,
        })
    }

    /// The answer of the local embedded configuration.
    pub(crate) fn local(resolution: proxy_broker_core::Resolution, ttl: Duration) -> Result<Self, Error> {
        let ttl = ttl.min(MAX_TTL);
        let proxy = resolution.proxy_url.as_deref().map(ProxyUrl::parse).transpose()?;
        let fallback_policy = if proxy.is_some() {
            FallbackPolicy::EmbeddedFallback
        } else {
            FallbackPolicy::DirectConnection
        };
        Ok(Self {
            proxy,
            strategy: resolution.strategy.to_owned(),
            ttl,
            fallback_policy,
            source: Source::Local,
            upstream_endpoint: None,
            connect_timeout: resolution
                .timeout_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
            metadata: prost_types::Struct::default(),
            lease_expires_at: None,
        })
    }

    /// Connect directly because the caller allowed it when nothing else answers.
    pub(crate) fn allowed_direct() -> Self {
        Self {
            proxy: None,
            strategy: "direct".to_owned(),
            ttl: Duration::ZERO,
            fallback_policy: FallbackPolicy::Fail,
            source: Source::AllowedDirect,
            upstream_endpoint: None,
            connect_timeout: None,
            metadata: prost_types::Struct::default(),
            lease_expires_at: None,
        }
    }

    /// Whether `other` routes connections the same way (the same proxy, or both direct): a
    /// watcher reconnects only when it does not. A renewed lease on the same proxy does.
    pub fn same_route(&self, other: &Resolved) -> bool {
        self.proxy == other.proxy
    }
}

/// Cache key: exchange (lower-cased), connection type, region.
pub(crate) type Key = (String, ConnectionType, Option<String>);

/// Broker answers, each kept for its TTL (never longer than `max_ttl`).
pub(crate) struct ResolveCache {
    entries: Mutex<HashMap<Key, (Resolved, Instant)>>,
    max_ttl: Duration,
    max_entries: usize,
}

impl fmt::Debug for ResolveCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolveCache")
            .field("entries", &self.lock().len())
            .field("max_ttl", &self.max_ttl)
            .field("max_entries", &self.max_entries)
            .finish()
    }
}

impl ResolveCache {
    pub(crate) fn new(max_ttl: Duration, max_entries: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            max_ttl,
            max_entries,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (Resolved, Instant)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A fresh answer for `key`, if any.
    pub(crate) fn get(&self, key: &Key) -> Option<Resolved> {
        let mut entries = self.lock();
        match entries.get(key) {
            Some((resolved, until)) if Instant::now() < *until => Some(resolved.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `resolved` for its TTL (capped at `max_ttl` and [`MAX_TTL`]; zero means not at all).
    pub(crate) fn insert(&self, key: Key, resolved: &Resolved) {
        let ttl = resolved.ttl.min(self.max_ttl).min(MAX_TTL);
        let now = Instant::now();
        // No deadline this clock can represent: do not cache rather than panic.
        let Some(until) = now.checked_add(ttl).filter(|_| !ttl.is_zero()) else {
            return;
        };
        let mut entries = self.lock();
        if entries.len() >= self.max_entries && !entries.contains_key(&key) {
            entries.retain(|_, (_, until)| now < *until);
            if entries.len() >= self.max_entries {
                return;
            }
        }
        entries.insert(key, (resolved.clone(), until));
    }

    /// Forgets the answer for `key` if it still names `proxy` (it just failed).
    pub(crate) fn forget(&self, key: &Key, proxy: Option<&ProxyUrl>) {
        let mut entries = self.lock();
        if entries.get(key).is_some_and(|(r, _)| r.proxy.as_ref() == proxy) {
            entries.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(url: &str, ttl: u32) -> Resolved {
        Resolved::from_pb(pb::ProxyResponse {
            proxy_url: url.into(),
            strategy: "static".into(),
            ttl_seconds: ttl,
            fallback_policy: pb::FallbackPolicy::Fail.into(),
            metadata: None,
            source: pb::ProxySource::Upstream.into(),
            upstream_endpoint: String::new(),
            lease_expires_at: None,
        })
        .unwrap()
    }

    fn key() -> Key {
        ("binance".into(), ConnectionType::Websocket, None)
    }

    #[tokio::test(start_paused = true)]
    async fn answers_live_for_their_ttl_and_no_longer() {
        let cache = ResolveCache::new(Duration::from_secs(3600), 16);
        cache.insert(key(), &answer("socks5://p:1080", 60));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(cache.get(&key()).is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(cache.get(&key()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn max_ttl_caps_and_zero_disables() {
        let cache = ResolveCache::new(Duration::from_secs(10), 16);
        cache.insert(key(), &answer("socks5://p:1080", 300));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(cache.get(&key()).is_none());
        let off = ResolveCache::new(Duration::ZERO, 16);
        off.insert(key(), &answer("socks5://p:1080", 300));
        assert!(off.get(&key()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_proxy_is_forgotten_but_a_newer_answer_is_kept() {
        let cache = ResolveCache::new(Duration::from_secs(3600), 16);
        let a = answer("socks5://a:1080", 300);
        cache.insert(key(), &a);
        cache.forget(&key(), ProxyUrl::parse("socks5://b:1080").ok().as_ref());
        assert!(cache.get(&key()).is_some());
        cache.forget(&key(), a.proxy.as_ref());
        assert!(cache.get(&key()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_ttl_of_u32_max_seconds_is_cut_to_max_ttl() {
        let huge = answer("socks5://p:1080", u32::MAX);
        assert_eq!(huge.ttl, MAX_TTL);
        let cache = ResolveCache::new(Duration::MAX, 16);
        cache.insert(key(), &huge);
        tokio::time::advance(MAX_TTL - Duration::from_secs(1)).await;
        assert!(cache.get(&key()).is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(cache.get(&key()).is_none());
    }

    #[test]
    fn unset_policy_means_embedded_fallback() {
        assert_eq!(FallbackPolicy::from_pb(0), FallbackPolicy::EmbeddedFallback);
        assert_eq!(FallbackPolicy::from_pb(99), FallbackPolicy::EmbeddedFallback);
        assert_eq!(FallbackPolicy::from_pb(3), FallbackPolicy::Fail);
    }
}
