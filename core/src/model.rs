//! The configuration model: cryptofeed's `proxy:` block plus the design's `external_service` block.
//!
//! Field names, aliases (`rest` = `http`, `ws` = `websocket`) and shorthands (a bare string in place
//! of an object) follow cryptofeed exactly, so existing YAML and `CRYPTOFEED_PROXY_*` variables load
//! unchanged. Unknown keys are rejected everywhere. Numbers are read as wide integers and checked by
//! [`crate::validate`], so an out-of-range value gets a message naming the rule instead of a bare
//! type error.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::redact::{DebugCredentials, DebugUrls, redact_url};

/// The `proxy:` block: embedded proxy settings plus upstream delegation.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// When false every answer is "connect directly" (unless upstream delegation answers).
    #[serde(default)]
    pub enabled: bool,
    /// Proxies for every exchange without an override.
    #[serde(default)]
    pub default: Option<ConnectionProxies>,
    /// Per-exchange overrides, keyed by exchange id (case-insensitive).
    #[serde(default)]
    pub exchanges: BTreeMap<String, ConnectionProxies>,
    /// Delegation to upstream proxy services.
    #[serde(default)]
    pub external_service: ExternalServiceConfig,
}

/// The proxies of one scope (default or one exchange), per connection type.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConnectionProxies {
    /// Proxy for REST/HTTP connections (alias `rest`).
    pub http: Option<ProxyConfig>,
    /// Proxy for WebSocket connections (alias `ws`).
    pub websocket: Option<ProxyConfig>,
}

/// One proxy entry: a single URL or a pool.
#[derive(derive_more::Debug, Clone, PartialEq, Serialize)]
pub struct ProxyConfig {
    /// `scheme://[user:pass@]host:port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[debug("{:?}", url.as_deref().map(redact_url))]
    pub url: Option<String>,
    /// Connect timeout the feed should use, 1..=300 seconds.
    pub timeout_seconds: i64,
    /// A pool of proxies to pick from per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolConfig>,
}

/// Default for [`ProxyConfig::timeout_seconds`].
pub const DEFAULT_PROXY_TIMEOUT_SECONDS: i64 = 30;

impl ProxyConfig {
    /// A plain entry with one URL and the default timeout.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            timeout_seconds: DEFAULT_PROXY_TIMEOUT_SECONDS,
            pool: None,
        }
    }
}

/// A pool of proxies and how to pick one.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The members; at least one, and at least one enabled.
    pub proxies: Vec<PoolMember>,
    /// How a member is picked per request.
    #[serde(default)]
    pub strategy: Strategy,
}

/// One member of a pool.
#[derive(derive_more::Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMember {
    /// The member's proxy URL.
    #[debug("{:?}", redact_url(url))]
    pub url: String,
    /// Relative weight for the `random` strategy, 0.1..=10.0.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Disabled members are never picked.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_weight() -> f64 {
    1.0
}

fn default_true() -> bool {
    true
}

/// How a pool picks a member.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Members in configured order, one per request.
    #[default]
    RoundRobin,
    /// Members at random, in proportion to their weight.
    Random,
    /// The member with the fewest live leases.
    LeastConnections,
}

impl Strategy {
    /// The configuration spelling, also reported to feeds as `strategy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
            Strategy::LeastConnections => "least_connections",
        }
    }
}

/// How the broker authenticates to upstream proxy services.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// `Authorization: Bearer {token}`.
    #[default]
    BearerToken,
    /// `X-API-Key: {api_key}`.
    ApiKey,
    /// Client certificate (`cert_file`, `key_file`), server checked against `ca_file`.
    MutualTls,
}

/// Implements `Deserialize` for a unit-only enum from its string spellings. Enums are read as
/// strings (environment values are strings too) so that a bad value gets serde's
/// "unknown variant `x`, expected one of ..." message rather than the `config` crate's own.
#[macro_export]
macro_rules! string_enum {
    ($ty:ident { $($text:literal => $variant:ident),+ $(,)? }) => {
        impl<'de> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                const VARIANTS: &[&str] = &[$($text),+];
                let text = <String as ::serde::Deserialize>::deserialize(deserializer)?;
                match text.as_str() {
                    $($text => Ok($ty::$variant),)+
                    other => Err(::serde::de::Error::unknown_variant(other, VARIANTS)),
                }
            }
        }
    };
}

string_enum!(Strategy { "round_robin" => RoundRobin, "random" => Random, "least_connections" => LeastConnections });
string_enum!(AuthMethod { "bearer_token" => BearerToken, "api_key" => ApiKey, "mutual_tls" => MutualTls });

/// The design's `ExternalProxyServiceConfig`. `Debug` masks credential values and the userinfo of
/// endpoint URLs.
#[derive(derive_more::Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExternalServiceConfig {
    /// Delegate to upstream proxy services.
    pub enabled: bool,
    /// Upstream base URLs (http or https), tried in order.
    #[debug("{:?}", DebugUrls(endpoints))]
    pub endpoints: Vec<String>,
    /// How to authenticate to the upstreams.
    pub auth_method: AuthMethod,
    /// Credentials for `auth_method` (secret: never printed): `token` or `token_file`
    /// (bearer_token), `api_key` or `api_key_file` (api_key), `cert_file` + `key_file` + `ca_file`
    /// (mutual_tls); `ca_file` may be given with any method to trust a private CA.
    #[debug("{:?}", DebugCredentials(auth_credentials))]
    pub auth_credentials: BTreeMap<String, String>,
    /// Per-attempt upstream timeout, 1..=60 seconds.
    pub timeout_seconds: i64,
    /// TTL for answers without one, and the TTL of embedded answers, 60..=3600 seconds.
    pub cache_ttl_seconds: i64,
    /// Trip a circuit breaker per endpoint.
    pub circuit_breaker_enabled: bool,
    /// When every upstream fails, answer from the embedded configuration (else fail).
    pub fallback_to_embedded: bool,
    /// Consecutive failures that open an endpoint's breaker, 1..=100.
    pub failure_threshold: i64,
    /// First open period of a tripped breaker, 1..=300 seconds; doubles on each re-trip.
    pub open_seconds: i64,
    /// Longest open period after repeated re-trips, `open_seconds`..=3600 seconds.
    pub max_open_seconds: i64,
    /// How long past its TTL a cached answer may still be served when every upstream fails,
    /// 0..=86400 seconds (0 disables stale-if-error).
    pub stale_if_error_seconds: i64,
    /// Most cached upstream answers kept, 1..=10000000.
    pub cache_max_entries: i64,
    /// Feedback reports waiting to be forwarded upstream, 1..=1000000; overflow drops the oldest.
    pub feedback_queue_size: i64,
    /// Consecutive failure reports for one proxy URL that eject it, 1..=100.
    pub eject_after_failures: i64,
    /// Most of one embedded pool that may be ejected at once, 0..=100 percent.
    pub max_ejection_percent: i64,
    /// When to ask the next endpoint in parallel while one has not answered: `auto` or
    /// 0..=60000 ms (0 turns hedging off).
    pub hedge_delay_ms: HedgeDelay,
    /// Upstream requests in flight per endpoint, 1..=10000.
    pub upstream_max_in_flight: i64,
    /// Upstream lookups (single flights) in flight overall, 1..=100000.
    pub upstream_max_in_flight_total: i64,
}

/// `external_service.hedge_delay_ms`: `"auto"` or a whole number of milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HedgeDelay {
    /// 3 × the endpoint's recent median latency, at least 50 ms, at most half of `timeout_seconds`.
    #[default]
    Auto,
    /// This many milliseconds (0 turns hedging off); checked to be 0..=60000 by validation.
    Fixed(i64),
}

impl Serialize for HedgeDelay {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            HedgeDelay::Auto => serializer.serialize_str("auto"),
            HedgeDelay::Fixed(ms) => serializer.serialize_i64(*ms),
        }
    }
}

impl<'de> Deserialize<'de> for HedgeDelay {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HedgeDelay;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\" or a whole number of milliseconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(HedgeDelay::Fixed(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(HedgeDelay::Fixed(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            // Environment values are strings: "auto" or digits.
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v.trim() {
                    "auto" => Ok(HedgeDelay::Auto),
                    digits => digits
                        .parse()
                        .map(HedgeDelay::Fixed)
                        .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl Default for ExternalServiceConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoints: Vec::new(),
            auth_method: AuthMethod::BearerToken,
            auth_credentials: BTreeMap::new(),
            timeout_seconds: 10,
            cache_ttl_seconds: 300,
            circuit_breaker_enabled: true,
            fallback_to_embedded: true,
            failure_threshold: 5,
            open_seconds: 30,
            max_open_seconds: 300,
            stale_if_error_seconds: 600,
            cache_max_entries: 100_000,
            feedback_queue_size: 10_000,
            eject_after_failures: 3,
            max_ejection_percent: 50,
            hedge_delay_ms: HedgeDelay::Auto,
            upstream_max_in_flight: 64,
            upstream_max_in_flight_total: 1024,
        }
    }
}

impl ConnectionProxies {
    /// The entry for one connection type.
    pub fn get(&self, connection_type: crate::ConnectionType) -> Option<&ProxyConfig> {
        match connection_type {
            crate::ConnectionType::Http => self.http.as_ref(),
            crate::ConnectionType::Websocket => self.websocket.as_ref(),
        }
    }
}

// --- Deserialization with cryptofeed's shorthands -------------------------------------------

/// The object form of [`ConnectionProxies`]; a bare string is `{http: <string>}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionProxiesObject {
    #[serde(default, alias = "rest")]
    http: Option<ProxyConfig>,
    #[serde(default, alias = "ws")]
    websocket: Option<ProxyConfig>,
}

impl<'de> Deserialize<'de> for ConnectionProxies {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ConnectionProxies;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object with `http`/`rest` and `websocket`/`ws`, or a proxy URL string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ConnectionProxies {
                    http: Some(ProxyConfig::from_url(v)),
                    websocket: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let o = ConnectionProxiesObject::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ConnectionProxies {
                    http: o.http,
                    websocket: o.websocket,
                })
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The object form of [`ProxyConfig`]; a bare string is `{url: <string>}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyConfigObject {
    #[serde(default)]
    url: Option<String>,
    #[serde(default = "default_timeout")]
    timeout_seconds: i64,
    #[serde(default)]
    pool: Option<PoolConfig>,
}

fn default_timeout() -> i64 {
    DEFAULT_PROXY_TIMEOUT_SECONDS
}

impl<'de> Deserialize<'de> for ProxyConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ProxyConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object with `url`, `timeout_seconds`, `pool`, or a proxy URL string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ProxyConfig::from_url(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let o = ProxyConfigObject::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ProxyConfig {
                    url: o.url,
                    timeout_seconds: o.timeout_seconds,
                    pool: o.pool,
                })
            }
        }
        deserializer.deserialize_any(V)
    }
}
