//! The `store:` block: where brokering state lives — in this process (`memory`, the default) or in
//! Redis shared by every replica (`redis`, fleet mode). Environment form
//! `PROXY_BROKER_STORE__<KEY>` (see [`crate::config::STORE_ENV_PREFIX`]), e.g.
//! `PROXY_BROKER_STORE__BACKEND=redis`, `PROXY_BROKER_STORE__REDIS__URL=redis://redis:6379/0`,
//! `PROXY_BROKER_STORE__REDIS__URLS='["redis://a:6379","redis://b:6379"]'`.
//!
//! ```yaml
//! store:
//!   backend: redis                # memory (default) | redis
//!   redis:
//!     url: redis://redis:6379/0   # or rediss:// (TLS); a cluster: `urls:` (seed nodes) + `cluster: true`
//!     password_file: /etc/proxy-broker/redis/password   # optional
//!     key_prefix: "proxy-broker:"
//!     operation_timeout_ms: 50    # 1..=10000
//! ```
//!
//! The password (from `password_file`, or inside a URL) is a secret: `Debug` masks URL userinfo,
//! errors never show it, and the effective configuration (`GetEffectiveConfig`) masks it like
//! every URL's userinfo. The block is read at start-up only: changing it needs a restart.

use std::sync::Arc;
use std::time::Duration;

use proxy_broker_core::load::{Problems, Validate};
use proxy_broker_core::redact::{DebugUrls, redact_text, redact_url};
use proxy_broker_core::validate::check_range;
use proxy_broker_core::{ConfigError, Problem};
use serde::{Deserialize, Serialize};

use super::MemoryStore;
use super::Store;
use super::memory::DEFAULT_MAX_ENTRIES;
use super::redis::{RedisStore, Target};
use super::resilient::{ResilientStore, StoreStatus};
use crate::clock::Clock;

/// Allowed `store.redis.operation_timeout_ms`.
pub const OPERATION_TIMEOUT_MS_RANGE: (i64, i64) = (1, 10_000);
/// Longest `store.redis.key_prefix`.
pub const MAX_KEY_PREFIX_LEN: usize = 128;
/// Most `store.redis.urls` seed nodes.
pub const MAX_SEED_URLS: usize = 64;
/// Longest Redis URL.
pub const MAX_REDIS_URL_LEN: usize = 2048;
/// Default `store.redis.key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "proxy-broker:";

/// `store.backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// In this process: nothing to run, nothing shared.
    #[default]
    Memory,
    /// In Redis, shared by every replica (fleet mode).
    Redis,
}

proxy_broker_core::string_enum!(Backend { "memory" => Memory, "redis" => Redis });

/// The `store:` block.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `memory` (default) or `redis`.
    pub backend: Backend,
    /// The Redis connection (used when `backend` is `redis`).
    pub redis: RedisConfig,
}

/// `store.redis`. `Debug` masks the userinfo of every URL.
#[derive(derive_more::Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// One server: `redis://host:port/db` or `rediss://` (TLS).
    #[debug("{:?}", url.as_deref().map(redact_url))]
    pub url: Option<String>,
    /// A Redis Cluster's seed nodes (with `cluster: true`).
    #[debug("{:?}", DebugUrls(urls))]
    pub urls: Vec<String>,
    /// Connect to a Redis Cluster (seed nodes in `urls`, or `url` alone).
    pub cluster: bool,
    /// File holding the password (trailing newlines ignored); keeps it out of the URL.
    pub password_file: Option<String>,
    /// Starts every key and channel name, so several brokers (or other apps) can share a Redis.
    pub key_prefix: String,
    /// Longest a Redis operation may take before the replica answers from local state, 1..=10000.
    pub operation_timeout_ms: i64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            urls: Vec::new(),
            cluster: false,
            password_file: None,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            operation_timeout_ms: 50,
        }
    }
}

/// Checks one Redis URL; the error shows it with its userinfo masked.
fn check_redis_url(raw: &str, cluster: bool) -> Result<url::Url, String> {
    if raw.len() > MAX_REDIS_URL_LEN {
        return Err(format!(
            "is {} bytes long (at most {MAX_REDIS_URL_LEN}; value not shown)",
            raw.len()
        ));
    }
    let shown = redact_url(raw);
    let form = "redis://[user:password@]host[:port][/db] or rediss://...";
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "'{shown}' contains whitespace or control characters ({form})"
        ));
    }
    let url = url::Url::parse(raw).map_err(|e| format!("'{shown}' is not a valid URL ({e}; {form})"))?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(format!(
            "'{shown}' has scheme '{}' (allowed: redis, rediss)",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("'{shown}' has no host ({form})"));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() {
        match db.parse::<u32>() {
            Ok(0) => {}
            Ok(_) if cluster => {
                return Err(format!(
                    "'{shown}' selects database {db} (a Redis Cluster has only database 0)"
                ));
            }
            Ok(_) => {}
            Err(_) => {
                return Err(format!(
                    "'{shown}' has path '/{db}' (the path is a database number, e.g. /0)"
                ));
            }
        }
    }
    if url.fragment().is_some() {
        return Err(format!("'{shown}' has a fragment ({form})"));
    }
    Ok(url)
}

impl StoreConfig {
    /// The URLs in use and the key path each came from (`url`, or `urls[i]`).
    fn urls(&self) -> Vec<(String, &str)> {
        let r = &self.redis;
        let mut out: Vec<(String, &str)> = r.url.iter().map(|u| ("url".to_owned(), u.as_str())).collect();
        out.extend(
            r.urls
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("urls[{i}]"), u.as_str())),
        );
        out
    }
}

impl Validate for StoreConfig {
    fn validate(&self, path: &str, problems: &mut Problems) {
        let r = &self.redis;
        let at = |key: &str| format!("{path}.redis.{key}");
        for (key, url) in self.urls() {
            match check_redis_url(url, r.cluster) {
                Ok(parsed) => {
                    if parsed.password().is_some() && r.password_file.is_some() {
                        problems.push(
                            at(&key),
                            format!(
                                "'{}' holds a password and store.redis.password_file is set too (use one)",
                                redact_url(url)
                            ),
                        );
                    }
                }
                Err(rule) => problems.push(at(&key), rule),
            }
        }
        if r.url.is_some() && !r.urls.is_empty() {
            problems.push(
                at("urls"),
                "is set together with store.redis.url (one server: url; a cluster's seed nodes: urls with cluster: true)",
            );
        }
        if !r.urls.is_empty() && !r.cluster {
            problems.push(
                at("urls"),
                "lists seed nodes, which are for a Redis Cluster (set store.redis.cluster: true, or use store.redis.url for one server)",
            );
        }
        if r.urls.len() > MAX_SEED_URLS {
            problems.push(
                at("urls"),
                format!("has {} entries (at most {MAX_SEED_URLS})", r.urls.len()),
            );
        }
        if self.backend == Backend::Redis && r.url.is_none() && r.urls.is_empty() {
            problems.push(
                at(if r.cluster { "urls" } else { "url" }),
                "is required when store.backend is redis (e.g. redis://redis:6379/0)",
            );
        }
        if let Some(file) = &r.password_file
            && file.trim().is_empty()
        {
            problems.push(
                at("password_file"),
                "is empty (a path to a file holding the password)",
            );
        }
        let prefix = &r.key_prefix;
        let prefix_rule = format!(
            "1..={MAX_KEY_PREFIX_LEN} printable ASCII characters without whitespace or braces ({{}} would break Redis Cluster hash tags)"
        );
        let bad_char = prefix
            .chars()
            .find(|c| !c.is_ascii_graphic() || matches!(c, '{' | '}'));
        if prefix.is_empty() || prefix.len() > MAX_KEY_PREFIX_LEN || bad_char.is_some() {
            let shown: String = prefix.chars().take(MAX_KEY_PREFIX_LEN).collect();
            problems.push(
                at("key_prefix"),
                format!("'{}' is not {prefix_rule}", shown.escape_debug()),
            );
        }
        let (min, max) = OPERATION_TIMEOUT_MS_RANGE;
        check_range(
            problems,
            at("operation_timeout_ms"),
            r.operation_timeout_ms,
            min,
            max,
        );
    }
}

/// The store the broker runs on, and its `proxy_broker_store_up` status.
#[derive(Debug, Clone)]
pub struct BuiltStore {
    /// Hand it to the brokering engine (and use it for shared answers and flights).
    pub store: Arc<dyn Store>,
    /// `proxy_broker_store_up`: always up for the memory backend.
    pub status: StoreStatus,
}

fn problem(path: &str, message: String) -> ConfigError {
    ConfigError {
        problems: vec![Problem {
            path: path.to_owned(),
            message,
        }],
    }
}

/// The password from `password_file` (trailing newlines dropped), if one is configured.
fn read_password(config: &RedisConfig) -> Result<Option<String>, ConfigError> {
    let Some(file) = &config.password_file else {
        return Ok(None);
    };
    let path = "store.redis.password_file";
    let text =
        std::fs::read_to_string(file).map_err(|e| problem(path, format!("cannot read '{file}': {e}")))?;
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(problem(
            path,
            format!("'{file}' is empty (it must hold the password)"),
        ));
    }
    Ok(Some(password.to_owned()))
}

/// A client's connection settings for `url`, with `password` if given. Errors never show the
/// URL's userinfo or the password.
fn connection_info(
    key: &str,
    url: &str,
    password: Option<&str>,
) -> Result<::redis::ConnectionInfo, ConfigError> {
    use ::redis::IntoConnectionInfo;
    let info = url.into_connection_info().map_err(|e| {
        problem(
            &format!("store.redis.{key}"),
            format!(
                "'{}' is not usable: {}",
                redact_url(url),
                redact_text(&e.to_string())
            ),
        )
    })?;
    Ok(match password {
        Some(p) => {
            let settings = info.redis_settings().clone().set_password(p);
            info.set_redis_settings(settings)
        }
        None => info,
    })
}

/// Builds the configured store: the memory store, or for `redis` the [`ResilientStore`] around a
/// [`RedisStore`] (connections are made lazily: an unreachable Redis at start is an outage, not an
/// error). Errors name the key (an unreadable `password_file`, an unusable URL). Must be called
/// inside a Tokio runtime for the `redis` backend (it starts the store's tasks).
pub fn build_store(config: &StoreConfig, clock: Arc<dyn Clock>) -> Result<BuiltStore, ConfigError> {
    if config.backend == Backend::Memory {
        return Ok(BuiltStore {
            store: Arc::new(MemoryStore::new(DEFAULT_MAX_ENTRIES, clock)),
            status: StoreStatus::up(),
        });
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(problem(
            "store.backend",
            "the redis backend must be started inside the broker's Tokio runtime".to_owned(),
        ));
    }
    let r = &config.redis;
    let password = read_password(r)?;
    let urls = config.urls();
    let target = if r.cluster {
        let mut infos = Vec::with_capacity(urls.len());
        let mut seeds = Vec::with_capacity(urls.len());
        for (key, url) in &urls {
            let info = connection_info(key, url, password.as_deref())?;
            let seed = ::redis::Client::open(info.clone())
                .map_err(|e| problem(&format!("store.redis.{key}"), redact_text(&e.to_string())))?;
            seeds.push(seed);
            infos.push(info);
        }
        let client = ::redis::cluster::ClusterClientBuilder::new(infos)
            .build()
            .map_err(|e| problem("store.redis.urls", redact_text(&e.to_string())))?;
        Target::Cluster { client, seeds }
    } else {
        let Some((key, url)) = urls.first() else {
            return Err(problem(
                "store.redis.url",
                "is required when store.backend is redis".to_owned(),
            ));
        };
        let info = connection_info(key, url, password.as_deref())?;
        let client = ::redis::Client::open(info)
            .map_err(|e| problem(&format!("store.redis.{key}"), redact_text(&e.to_string())))?;
        Target::Single(client)
    };
    let timeout = Duration::from_millis(u64::try_from(r.operation_timeout_ms.max(1)).unwrap_or(50));
    let remote = RedisStore::new(target, &r.key_prefix, timeout, clock.clone())
        .map_err(|e| problem("store.redis", e.to_string()))?;
    let store = ResilientStore::new(remote, timeout, clock);
    let status = store.status();
    Ok(BuiltStore {
        store: Arc::new(store),
        status,
    })
}
