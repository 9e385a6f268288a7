//! Embedded resolution: cryptofeed's `get_proxy(exchange, connection_type)` with proxy pools.
//!
//! Order: disabled → direct; the exchange's entry for the connection type; the default's entry;
//! direct. Exchange ids are matched case-insensitively. A pool yields one enabled member per request:
//!
//! - `round_robin`: members in configured order, wrapping around;
//! - `random`: at random, in proportion to `weight`;
//! - `least_connections`: the member with the fewest live *leases* (ties: configured order).
//!
//! A **lease** is granted to the member each time it is handed out by a `least_connections` pool.
//! It lives until the answer's TTL passes (the TTL a feed is told to cache the answer for), or until
//! failure feedback for that proxy URL arrives ([`EmbeddedResolver::release`], oldest lease first),
//! whichever is first. Weights do not affect `least_connections`. A member holds at most
//! [`MAX_LEASES_PER_MEMBER`] live leases; past that its oldest lease is dropped. A pick costs
//! O(members), whatever the number of live leases: each member keeps its lease expiries in a queue
//! ordered by expiry, and expired leases are dropped from its front.
//!
//! **Ejection** (outlier detection driven by feedback, see [`EmbeddedResolver::eject`]): an ejected
//! member is skipped for 30 s × the number of times it has been ejected (at most 300 s). At most
//! `max_ejection_percent` of a pool's members are ejected at once, so a pool never empties.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use tokio::time::Instant;

use crate::model::{ConnectionProxies, ProxyConfig, ProxySettings, Strategy};
use crate::redact::{DebugUrls, redact_url};

/// The two kinds of connection a feed makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionType {
    /// REST / HTTP requests.
    Http,
    /// WebSocket streams.
    Websocket,
}

impl ConnectionType {
    /// The wire spelling used in configuration and upstream JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionType::Http => "http",
            ConnectionType::Websocket => "websocket",
        }
    }
}

impl fmt::Display for ConnectionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the embedded configuration says for one request. `Debug` masks the proxy's userinfo.
#[derive(derive_more::Debug, Clone, PartialEq)]
pub struct Resolution {
    /// The proxy to use; `None` means connect directly.
    #[debug("{:?}", proxy_url.as_deref().map(redact_url))]
    pub proxy_url: Option<String>,
    /// `direct`, `static` (a plain url entry) or the pool's strategy.
    pub strategy: &'static str,
    /// The entry's `timeout_seconds` (absent for direct answers).
    pub timeout_seconds: Option<i64>,
}

impl Resolution {
    fn direct() -> Self {
        Self {
            proxy_url: None,
            strategy: "direct",
            timeout_seconds: None,
        }
    }
}

/// Resolves requests against a loaded [`ProxySettings`]; pool state (rotation, leases) lives here.
#[derive(Debug)]
pub struct EmbeddedResolver {
    enabled: bool,
    default: Scope,
    exchanges: HashMap<String, Scope>,
    pools: Vec<std::sync::Arc<Pool>>,
    lease_ttl: Duration,
}

#[derive(Debug, Default)]
struct Scope {
    http: Option<Entry>,
    websocket: Option<Entry>,
}

#[derive(derive_more::Debug)]
enum Entry {
    Url {
        #[debug("{:?}", redact_url(url))]
        url: String,
        timeout_seconds: i64,
    },
    Pool(std::sync::Arc<Pool>),
}

#[derive(derive_more::Debug)]
struct Pool {
    strategy: Strategy,
    timeout_seconds: i64,
    /// Enabled members only, in configured order.
    #[debug("{:?}", DebugUrls(urls))]
    urls: Vec<String>,
    weights: Vec<f64>,
    next: AtomicUsize,
    state: Mutex<PoolState>,
}

#[derive(derive_more::Debug)]
struct PoolState {
    /// Per member: expiry instants of its leases, oldest (soonest to expire) first. Every lease of a
    /// resolver lives the same `lease_ttl` and time does not go back, so appending `now + ttl`
    /// keeps each queue sorted; expired leases are popped from the front (amortised O(1) each).
    #[debug("{:?}", leases.iter().map(VecDeque::len).collect::<Vec<_>>())]
    leases: Vec<VecDeque<Instant>>,
    /// Per member: ejected until (if ever) and how many times.
    ejections: Vec<Ejection>,
}

/// Drops the expired leases at the front of one member's queue.
fn expire(leases: &mut VecDeque<Instant>, now: Instant) {
    while leases.front().is_some_and(|&until| until <= now) {
        leases.pop_front();
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Ejection {
    until: Option<Instant>,
    times: u32,
}

/// First ejection period; the n-th ejection lasts n times this.
pub const EJECTION_BASE: Duration = Duration::from_secs(30);
/// Longest ejection period.
pub const EJECTION_MAX: Duration = Duration::from_secs(300);
/// Most live leases one pool member holds; granting one more drops its oldest. Bounds the memory
/// a flood of requests can pin (16 bytes a lease) without changing who is least loaded in practice.
pub const MAX_LEASES_PER_MEMBER: usize = 100_000;
/// Longest lease lifetime; a longer `lease_ttl` is cut to this so that `now + ttl` cannot overflow.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(30 * 86_400);

impl EmbeddedResolver {
    /// Builds the resolver; `lease_ttl` is how long a `least_connections` lease lives without
    /// feedback (the TTL answers are given with). `settings` must have passed validation.
    pub fn new(settings: &ProxySettings, lease_ttl: Duration) -> Self {
        let mut pools = Vec::new();
        let default = settings
            .default
            .as_ref()
            .map(|c| Scope::new(c, &mut pools))
            .unwrap_or_default();
        let exchanges = settings
            .exchanges
            .iter()
            .map(|(id, c)| (id.to_lowercase(), Scope::new(c, &mut pools)))
            .collect();
        Self {
            enabled: settings.enabled,
            default,
            exchanges,
            pools,
            lease_ttl: lease_ttl.min(MAX_LEASE_TTL),
        }
    }

    /// The proxy for one request (see the module docs for the order and the strategies).
    pub fn resolve(&self, exchange_id: &str, connection_type: ConnectionType) -> Resolution {
        if !self.enabled {
            return Resolution::direct();
        }
        let entry = self
            .exchanges
            .get(&exchange_id.to_lowercase())
            .and_then(|s| s.get(connection_type))
            .or_else(|| self.default.get(connection_type));
        match entry {
            None => Resolution::direct(),
            Some(Entry::Url { url, timeout_seconds }) => Resolution {
                proxy_url: Some(url.clone()),
                strategy: "static",
                timeout_seconds: Some(*timeout_seconds),
            },
            Some(Entry::Pool(pool)) => Resolution {
                proxy_url: Some(pool.pick(self.lease_ttl)),
                strategy: pool.strategy.as_str(),
                timeout_seconds: Some(pool.timeout_seconds),
            },
        }
    }

    /// Ends the oldest live lease on `proxy_url` in every pool that has it (failure feedback).
    /// Returns how many leases ended.
    pub fn release(&self, proxy_url: &str) -> usize {
        let now = Instant::now();
        let mut released = 0;
        for pool in &self.pools {
            for (i, url) in pool.urls.iter().enumerate() {
                if url == proxy_url {
                    let mut state = pool.lock();
                    let Some(leases) = state.leases.get_mut(i) else {
                        continue;
                    };
                    expire(leases, now);
                    if leases.pop_front().is_some() {
                        released += 1;
                    }
                }
            }
        }
        released
    }

    /// Ejects `proxy_url` from every pool that has it (feedback says it keeps failing), unless that
    /// would eject more than `max_percent` of the pool. Returns the number of pools it was
    /// ejected from.
    pub fn eject(&self, proxy_url: &str, max_percent: u8) -> usize {
        let now = Instant::now();
        let mut ejected = 0;
        for pool in &self.pools {
            let Some(i) = pool.urls.iter().position(|u| u == proxy_url) else {
                continue;
            };
            let mut state = pool.lock();
            if state
                .ejections
                .get(i)
                .is_none_or(|e| e.until.is_some_and(|until| until > now))
            {
                continue;
            }
            let current = state
                .ejections
                .iter()
                .filter(|e| e.until.is_some_and(|u| u > now))
                .count();
            let allowed = pool.urls.len() * usize::from(max_percent.min(100)) / 100;
            if current + 1 > allowed {
                continue;
            }
            let Some(e) = state.ejections.get_mut(i) else {
                continue;
            };
            e.times = e.times.saturating_add(1);
            e.until = Some(now + EJECTION_BASE.saturating_mul(e.times).min(EJECTION_MAX));
            ejected += 1;
        }
        ejected
    }

    /// Whether `proxy_url` is currently ejected from any pool.
    pub fn is_ejected(&self, proxy_url: &str) -> bool {
        let now = Instant::now();
        self.pools.iter().any(|pool| {
            let state = pool.lock();
            pool.urls
                .iter()
                .zip(state.ejections.iter())
                .any(|(u, e)| u == proxy_url && e.until.is_some_and(|until| until > now))
        })
    }

    /// Live leases on `proxy_url`, summed over pools (for observability and tests).
    pub fn live_leases(&self, proxy_url: &str) -> usize {
        let now = Instant::now();
        self.pools
            .iter()
            .map(|pool| {
                let state = pool.lock();
                pool.urls
                    .iter()
                    .zip(state.leases.iter())
                    .filter(|(url, _)| *url == proxy_url)
                    .map(|(_, l)| l.len() - l.partition_point(|&until| until <= now))
                    .sum::<usize>()
            })
            .sum()
    }
}

impl Scope {
    fn new(c: &ConnectionProxies, pools: &mut Vec<std::sync::Arc<Pool>>) -> Self {
        Self {
            http: c.http.as_ref().and_then(|p| Entry::new(p, pools)),
            websocket: c.websocket.as_ref().and_then(|p| Entry::new(p, pools)),
        }
    }

    fn get(&self, connection_type: ConnectionType) -> Option<&Entry> {
        match connection_type {
            ConnectionType::Http => self.http.as_ref(),
            ConnectionType::Websocket => self.websocket.as_ref(),
        }
    }
}

impl Entry {
    fn new(config: &ProxyConfig, pools: &mut Vec<std::sync::Arc<Pool>>) -> Option<Self> {
        if let Some(pool) = &config.pool {
            let members: Vec<_> = pool.proxies.iter().filter(|m| m.enabled).collect();
            if members.is_empty() {
                return None;
            }
            let pool = std::sync::Arc::new(Pool {
                strategy: pool.strategy,
                timeout_seconds: config.timeout_seconds,
                urls: members.iter().map(|m| m.url.clone()).collect(),
                weights: members.iter().map(|m| m.weight).collect(),
                next: AtomicUsize::new(0),
                state: Mutex::new(PoolState {
                    leases: vec![VecDeque::new(); members.len()],
                    ejections: vec![Ejection::default(); members.len()],
                }),
            });
            pools.push(pool.clone());
            return Some(Entry::Pool(pool));
        }
        config.url.as_ref().map(|url| Entry::Url {
            url: url.clone(),
            timeout_seconds: config.timeout_seconds,
        })
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pick(&self, lease_ttl: Duration) -> String {
        let now = Instant::now();
        let mut state = self.lock();
        let n = self.urls.len();
        let eligible: Vec<bool> = state
            .ejections
            .iter()
            .map(|e| e.until.is_none_or(|until| until <= now))
            .collect();
        // Ejection never covers a whole pool, but if configuration makes it so, ignore it.
        let eligible = if eligible.iter().any(|&e| e) {
            eligible
        } else {
            vec![true; n]
        };
        let index = match self.strategy {
            Strategy::RoundRobin => {
                // Reduced first so that `base + k` cannot overflow when the counter wraps.
                let base = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
                (0..n)
                    .map(|k| (base + k) % n)
                    .find(|&i| eligible[i])
                    .unwrap_or(base)
            }
            Strategy::Random => {
                let weights = self
                    .weights
                    .iter()
                    .zip(&eligible)
                    .map(|(&w, &ok)| if ok { w } else { 0.0 });
                WeightedIndex::new(weights).map_or(0, |dist| dist.sample(&mut rand::rng()))
            }
            Strategy::LeastConnections => {
                let mut best: Option<(usize, usize)> = None;
                for (i, leases) in state.leases.iter_mut().enumerate() {
                    expire(leases, now);
                    if eligible[i] && best.is_none_or(|(_, fewest)| leases.len() < fewest) {
                        best = Some((i, leases.len()));
                    }
                }
                let index = best.map_or(0, |(i, _)| i);
                if let Some(leases) = state.leases.get_mut(index) {
                    if leases.len() >= MAX_LEASES_PER_MEMBER {
                        leases.pop_front();
                    }
                    leases.push_back(now + lease_ttl);
                }
                index
            }
        };
        self.urls
            .get(index)
            .or(self.urls.first())
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PoolConfig, PoolMember};

    fn member(url: &str, weight: f64, enabled: bool) -> PoolMember {
        PoolMember {
            url: url.into(),
            weight,
            enabled,
        }
    }

    fn pool_settings(strategy: Strategy, members: Vec<PoolMember>) -> ProxySettings {
        ProxySettings {
            enabled: true,
            default: Some(ConnectionProxies {
                http: None,
                websocket: Some(ProxyConfig {
                    url: None,
                    timeout_seconds: 30,
                    pool: Some(PoolConfig {
                        proxies: members,
                        strategy,
                    }),
                }),
            }),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn least_connections_leases_expire_with_the_ttl() {
        let settings = pool_settings(
            Strategy::LeastConnections,
            vec![
                member("socks5://a:1", 1.0, true),
                member("socks5://b:1", 1.0, true),
            ],
        );
        let r = EmbeddedResolver::new(&settings, Duration::from_secs(60));
        let pick = |r: &EmbeddedResolver| r.resolve("x", ConnectionType::Websocket).proxy_url.unwrap();
        assert_eq!(pick(&r), "socks5://a:1");
        assert_eq!(pick(&r), "socks5://b:1");
        assert_eq!(pick(&r), "socks5://a:1");
        assert_eq!(r.live_leases("socks5://a:1"), 2);
        // a has 2 leases, b has 1: b next.
        assert_eq!(pick(&r), "socks5://b:1");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(r.live_leases("socks5://a:1"), 0);
        assert_eq!(pick(&r), "socks5://a:1");
    }

    #[tokio::test(start_paused = true)]
    async fn failure_release_ends_a_lease() {
        let settings = pool_settings(
            Strategy::LeastConnections,
            vec![
                member("socks5://a:1", 1.0, true),
                member("socks5://b:1", 1.0, true),
            ],
        );
        let r = EmbeddedResolver::new(&settings, Duration::from_secs(300));
        let pick = |r: &EmbeddedResolver| r.resolve("x", ConnectionType::Websocket).proxy_url.unwrap();
        assert_eq!(pick(&r), "socks5://a:1");
        assert_eq!(pick(&r), "socks5://b:1");
        assert_eq!(r.release("socks5://b:1"), 1);
        assert_eq!(pick(&r), "socks5://b:1");
        assert_eq!(r.release("socks5://nowhere:1"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_members_are_skipped_until_the_period_ends_and_periods_grow() {
        let urls = ["socks5://a:1", "socks5://b:1", "socks5://c:1", "socks5://d:1"];
        let settings = pool_settings(
            Strategy::RoundRobin,
            urls.iter().map(|u| member(u, 1.0, true)).collect(),
        );
        let r = EmbeddedResolver::new(&settings, Duration::from_secs(60));
        let picks = |r: &EmbeddedResolver| -> Vec<String> {
            (0..8)
                .map(|_| r.resolve("x", ConnectionType::Websocket).proxy_url.unwrap())
                .collect()
        };
        assert_eq!(r.eject("socks5://b:1", 50), 1);
        assert!(picks(&r).iter().all(|u| u != "socks5://b:1"));
        // 50 % of 4 is 2: a second ejection is allowed, a third is refused.
        assert_eq!(r.eject("socks5://c:1", 50), 1);
        assert_eq!(r.eject("socks5://d:1", 50), 0);
        assert!(
            picks(&r)
                .iter()
                .all(|u| u == "socks5://a:1" || u == "socks5://d:1")
        );
        tokio::time::advance(EJECTION_BASE + Duration::from_millis(1)).await;
        assert!(!r.is_ejected("socks5://b:1"));
        assert!(picks(&r).contains(&"socks5://b:1".to_owned()));
        // Second ejection of b lasts twice as long.
        assert_eq!(r.eject("socks5://b:1", 50), 1);
        tokio::time::advance(EJECTION_BASE + Duration::from_secs(1)).await;
        assert!(r.is_ejected("socks5://b:1"));
        tokio::time::advance(EJECTION_BASE).await;
        assert!(!r.is_ejected("socks5://b:1"));
    }

    #[test]
    fn ejection_never_exceeds_the_percentage_even_for_tiny_pools() {
        let settings = pool_settings(Strategy::Random, vec![member("socks5://only:1", 1.0, true)]);
        let r = EmbeddedResolver::new(&settings, Duration::from_secs(60));
        assert_eq!(r.eject("socks5://only:1", 50), 0);
        assert_eq!(
            r.resolve("x", ConnectionType::Websocket).proxy_url.as_deref(),
            Some("socks5://only:1")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_holds_at_most_the_lease_cap_and_the_oldest_goes_first() {
        let settings = pool_settings(
            Strategy::LeastConnections,
            vec![member("socks5://only:1", 1.0, true)],
        );
        let r = EmbeddedResolver::new(&settings, Duration::from_secs(60));
        let pick = |r: &EmbeddedResolver| r.resolve("x", ConnectionType::Websocket);
        pick(&r);
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..MAX_LEASES_PER_MEMBER {
            pick(&r);
        }
        // One past the cap: the very first lease (granted 10 s earlier) was dropped.
        assert_eq!(r.live_leases("socks5://only:1"), MAX_LEASES_PER_MEMBER);
        tokio::time::advance(Duration::from_secs(55)).await;
        assert_eq!(r.live_leases("socks5://only:1"), MAX_LEASES_PER_MEMBER);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_release_ends_the_oldest_live_lease_not_an_expired_one() {
        let settings = pool_settings(
            Strategy::LeastConnections,
            vec![member("socks5://a:1", 1.0, true)],
        );
        let r = EmbeddedResolver::new(&settings, Duration::from_secs(60));
        let pick = |r: &EmbeddedResolver| r.resolve("x", ConnectionType::Websocket);
        pick(&r); // expires at 60 s
        tokio::time::advance(Duration::from_secs(30)).await;
        pick(&r); // expires at 90 s
        assert_eq!(r.release("socks5://a:1"), 1);
        // The 60 s lease was the one released: at 61 s the 90 s lease is still live.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(r.live_leases("socks5://a:1"), 1);
        // Once it has expired there is nothing left to release.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(r.release("socks5://a:1"), 0);
    }

    #[test]
    fn a_huge_lease_ttl_is_capped_instead_of_overflowing() {
        let settings = pool_settings(
            Strategy::LeastConnections,
            vec![member("socks5://a:1", 1.0, true)],
        );
        let r = EmbeddedResolver::new(&settings, Duration::MAX);
        assert!(r.resolve("x", ConnectionType::Websocket).proxy_url.is_some());
        assert_eq!(r.live_leases("socks5://a:1"), 1);
    }

    #[test]
    fn debug_of_the_resolver_and_its_answers_masks_proxy_userinfo() {
        let mut settings = pool_settings(
            Strategy::LeastConnections,
            vec![member("socks5://pooluser:poolpass@a:1", 1.0, true)],
        );
        settings.exchanges.insert(
            "kraken".into(),
            ConnectionProxies {
                http: Some(ProxyConfig::from_url("http://APIKEY123:@static:8011")),
                websocket: None,
            },
        );
        let r = EmbeddedResolver::new(&settings, Duration::from_secs(60));
        let answers = [
            r.resolve("x", ConnectionType::Websocket),
            r.resolve("kraken", ConnectionType::Http),
        ];
        let shown = format!("{r:?} {answers:?} {settings:?}");
        for secret in ["pooluser", "poolpass", "APIKEY123"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("socks5://***@a:1"), "{shown}");
    }

    #[test]
    fn round_robin_keeps_going_when_its_counter_wraps() {
        let settings = pool_settings(
            Strategy::RoundRobin,
            vec![
                member("socks5://a:1", 1.0, true),
                member("socks5://b:1", 1.0, true),
                member("socks5://c:1", 1.0, true),
            ],
        );
        let r = EmbeddedResolver::new(&settings, Duration::from_secs(60));
        r.pools[0].next.store(usize::MAX - 1, Ordering::Relaxed);
        // usize::MAX - 1 ≡ 2 and usize::MAX ≡ 0 (mod 3); then the counter wraps to 0 (one member
        // is repeated once every 2^64 picks) without overflowing.
        let picks: Vec<_> = (0..4)
            .map(|_| r.resolve("x", ConnectionType::Websocket).proxy_url.unwrap())
            .collect();
        assert_eq!(
            picks,
            ["socks5://c:1", "socks5://a:1", "socks5://a:1", "socks5://b:1"]
        );
        // Skipping ejected members from the counter's last value must not overflow either.
        assert_eq!(r.eject("socks5://a:1", 100) + r.eject("socks5://b:1", 100), 2);
        r.pools[0].next.store(usize::MAX, Ordering::Relaxed);
        assert_eq!(
            r.resolve("x", ConnectionType::Websocket).proxy_url.as_deref(),
            Some("socks5://c:1")
        );
    }

    #[test]
    fn disabled_members_are_never_picked() {
        for strategy in [Strategy::RoundRobin, Strategy::Random, Strategy::LeastConnections] {
            let settings = pool_settings(
                strategy,
                vec![
                    member("socks5://off:1", 10.0, false),
                    member("socks5://on:1", 0.1, true),
                ],
            );
            let r = EmbeddedResolver::new(&settings, Duration::from_secs(60));
            for _ in 0..200 {
                assert_eq!(
                    r.resolve("x", ConnectionType::Websocket).proxy_url.as_deref(),
                    Some("socks5://on:1")
                );
            }
        }
    }
}
