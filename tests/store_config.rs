//! The `store:` configuration block: YAML and environment forms (`PROXY_BROKER_STORE__*`),
//! defaults, every rule (key path, value and rule in the message), unknown keys, and the store
//! password kept out of `Debug`, errors and `GetEffectiveConfig`; `build_store` against a real
//! `redis-server` with `--requirepass`.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestBroker;
use common::redis::RedisServer;
use proxy_broker::BrokerConfig;
use proxy_broker::clock::SystemClock;
use proxy_broker::pb::GetEffectiveConfigRequest;
use proxy_broker::store::config::{Backend, RedisConfig};
use proxy_broker::store::{BanLength, StateKey, Store, StoreConfig, build_store};

/// The block of the issue, verbatim (the password file path aside).
const ISSUE_BLOCK: &str = r#"
store:
  backend: memory          # default: in-process, nothing to run; `redis` shares state across replicas
  redis:
    url: redis://redis:6379/0     # or rediss:// (TLS); for a cluster, `urls:` with seed nodes and `cluster: true`
    password_file: /etc/proxy-broker/redis-password       # optional; never in the URL in the chart
    key_prefix: "proxy-broker:"
    operation_timeout_ms: 50
"#;

fn load(yaml: Option<&str>, env: &[(&str, &str)]) -> Result<BrokerConfig, String> {
    let mut loader =
        BrokerConfig::loader(None).env_vars(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    if let Some(y) = yaml {
        loader = loader.yaml_text("test.yaml", y);
    }
    loader.load().map_err(|e| e.to_string())
}

#[test]
fn the_issues_block_loads_and_the_defaults_are_memory_with_a_50_ms_timeout() {
    let config = load(Some(ISSUE_BLOCK), &[]).unwrap();
    assert_eq!(
        config.store,
        StoreConfig {
            backend: Backend::Memory,
            redis: RedisConfig {
                url: Some("redis://redis:6379/0".into()),
                password_file: Some("/etc/proxy-broker/redis-password".into()),
                ..RedisConfig::default()
            },
        }
    );
    let defaults = load(None, &[]).unwrap().store;
    assert_eq!(defaults.backend, Backend::Memory);
    assert_eq!(defaults.redis.key_prefix, "proxy-broker:");
    assert_eq!(defaults.redis.operation_timeout_ms, 50);
    assert!(!defaults.redis.cluster);
}

#[test]
fn the_environment_form_sets_every_key_and_wins_over_the_file() {
    let single = load(
        Some(ISSUE_BLOCK),
        &[
            ("PROXY_BROKER_STORE__BACKEND", "redis"),
            ("PROXY_BROKER_STORE__REDIS__URL", "rediss://redis.internal:6380/2"),
            ("PROXY_BROKER_STORE__REDIS__KEY_PREFIX", "pb-eu:"),
            ("PROXY_BROKER_STORE__REDIS__OPERATION_TIMEOUT_MS", "120"),
            ("PROXY_BROKER_STORE__REDIS__PASSWORD_FILE", "/run/secrets/redis"),
        ],
    )
    .unwrap()
    .store;
    assert_eq!(single.backend, Backend::Redis);
    assert_eq!(
        single.redis.url.as_deref(),
        Some("rediss://redis.internal:6380/2")
    );
    assert_eq!(single.redis.key_prefix, "pb-eu:");
    assert_eq!(single.redis.operation_timeout_ms, 120);
    assert_eq!(single.redis.password_file.as_deref(), Some("/run/secrets/redis"));

    for urls in [
        vec![(
            "PROXY_BROKER_STORE__REDIS__URLS",
            r#"["redis://a:6379","redis://b:6379"]"#,
        )],
        vec![
            ("PROXY_BROKER_STORE__REDIS__URLS__0", "redis://a:6379"),
            ("PROXY_BROKER_STORE__REDIS__URLS__1", "redis://b:6379"),
        ],
    ] {
        let mut env = vec![
            ("PROXY_BROKER_STORE__BACKEND", "redis"),
            ("PROXY_BROKER_STORE__REDIS__CLUSTER", "true"),
        ];
        env.extend(urls);
        let cluster = load(None, &env).unwrap().store;
        assert!(cluster.redis.cluster);
        assert_eq!(cluster.redis.urls, ["redis://a:6379", "redis://b:6379"]);
    }
}

#[test]
fn store_variables_are_store_keys_not_server_keys() {
    let message = load(None, &[("PROXY_BROKER_STORE__HOST", "redis")]).unwrap_err();
    assert!(message.contains("store"), "{message}");
    assert!(message.contains("unknown field `host`"), "{message}");
    assert!(!message.contains("server.store"), "{message}");
}

#[test]
fn bad_values_are_refused_naming_key_value_and_rule() {
    // (row, YAML under `store:`, what the message must contain)
    let rows: &[(&str, &str, &[&str])] = &[
        (
            "redis without a url",
            "{ backend: redis }",
            &["store.redis.url: is required when store.backend is redis"],
        ),
        (
            "a cluster without seeds",
            "{ backend: redis, redis: { cluster: true } }",
            &["store.redis.urls: is required when store.backend is redis"],
        ),
        (
            "an unknown backend",
            "{ backend: etcd }",
            &["store.backend", "etcd", "memory", "redis"],
        ),
        (
            "a wrong scheme",
            "{ backend: redis, redis: { url: 'http://redis:6379' } }",
            &["store.redis.url: 'http://redis:6379' has scheme 'http' (allowed: redis, rediss)"],
        ),
        (
            "not a URL",
            "{ backend: redis, redis: { url: 'redis:6379' } }",
            &["store.redis.url: 'redis:6379'"],
        ),
        (
            "a database that is not a number",
            "{ redis: { url: 'redis://r:6379/zero' } }",
            &["store.redis.url: 'redis://r:6379/zero' has path '/zero' (the path is a database number"],
        ),
        (
            "a cluster database other than 0",
            "{ backend: redis, redis: { cluster: true, urls: ['redis://a:1/3'] } }",
            &[
                "store.redis.urls[0]: 'redis://a:1/3' selects database 3 (a Redis Cluster has only database 0)",
            ],
        ),
        (
            "seed nodes without cluster",
            "{ backend: redis, redis: { urls: ['redis://a:1'] } }",
            &[
                "store.redis.urls: lists seed nodes, which are for a Redis Cluster (set store.redis.cluster: true",
            ],
        ),
        (
            "url and urls",
            "{ backend: redis, redis: { cluster: true, url: 'redis://a:1', urls: ['redis://b:1'] } }",
            &["store.redis.urls: is set together with store.redis.url"],
        ),
        (
            "timeout 0",
            "{ redis: { operation_timeout_ms: 0 } }",
            &["store.redis.operation_timeout_ms: 0 is out of range (allowed 1..=10000)"],
        ),
        (
            "timeout too long",
            "{ redis: { operation_timeout_ms: 10001 } }",
            &["store.redis.operation_timeout_ms: 10001 is out of range (allowed 1..=10000)"],
        ),
        (
            "an empty prefix",
            "{ redis: { key_prefix: '' } }",
            &["store.redis.key_prefix: '' is not 1..=128 printable ASCII characters"],
        ),
        (
            "a prefix with a hash tag",
            "{ redis: { key_prefix: 'pb{x}:' } }",
            &["store.redis.key_prefix: 'pb{x}:' is not", "braces"],
        ),
        (
            "a prefix with a space",
            "{ redis: { key_prefix: 'pb x' } }",
            &["store.redis.key_prefix: 'pb x' is not", "whitespace"],
        ),
        (
            "an empty password file path",
            "{ redis: { password_file: ' ' } }",
            &["store.redis.password_file: is empty"],
        ),
        (
            "an unknown key",
            "{ redis: { hosts: ['a'] } }",
            &["store.redis", "unknown field `hosts`"],
        ),
        (
            "a list instead of a mapping",
            "{ redis: ['redis://a:1'] }",
            &["store.redis", "expected a mapping"],
        ),
    ];
    for (row, yaml, needles) in rows {
        let message = load(Some(&format!("store: {yaml}\n")), &[]).unwrap_err();
        for needle in *needles {
            assert!(message.contains(needle), "row {row}: {needle:?} not in {message}");
        }
    }
}

const PASSWORD: &str = "s3cr3t-Store-PW-0042";

#[tokio::test]
async fn the_store_password_is_never_in_debug_errors_or_the_effective_config() {
    let in_url = format!("redis://:{PASSWORD}@redis:6379/0");
    let yaml = format!("store:\n  redis:\n    url: '{in_url}'\n");
    let config = load(Some(&yaml), &[]).unwrap();
    for shown in [
        format!("{config:?}"),
        format!("{:#?}", config.store),
        config.redacted_json(),
    ] {
        assert!(!shown.contains(PASSWORD), "{shown}");
    }
    assert!(config.redacted_json().contains("redis://***@redis:6379/0"));
    // Refused configurations do not echo it either.
    let bad = [
        format!("store: {{ redis: {{ url: 'http://:{PASSWORD}@redis:6379' }} }}"),
        format!("store: {{ redis: {{ url: 'redis://:{PASSWORD}@r:1', password_file: /x }} }}"),
        format!(
            "store: {{ backend: redis, redis: {{ cluster: true, urls: ['redis://:{PASSWORD}@r:1/4'] }} }}"
        ),
    ];
    for yaml in bad {
        let message = load(Some(&yaml), &[]).unwrap_err();
        assert!(!message.contains(PASSWORD), "{message}");
        assert!(message.contains("***"), "{message}");
    }
    // GetEffectiveConfig of a running broker.
    let broker = TestBroker::start(config).await;
    let json = broker
        .admin()
        .get_effective_config(GetEffectiveConfigRequest {})
        .await
        .unwrap()
        .into_inner()
        .config_json;
    assert!(!json.contains(PASSWORD), "{json}");
    assert!(json.contains("\"store\""), "{json}");
}

fn redis_config(url: String, password_file: Option<String>) -> StoreConfig {
    StoreConfig {
        backend: Backend::Redis,
        redis: RedisConfig {
            url: Some(url),
            password_file,
            key_prefix: "pwtest:".into(),
            operation_timeout_ms: 2000,
            ..RedisConfig::default()
        },
    }
}

#[tokio::test]
async fn build_store_reads_the_password_file_and_shares_state_through_a_protected_redis() {
    let server = RedisServer::start_with_password(PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let config = redis_config(server.url_without_password(), Some(file.display().to_string()));
    let a = build_store(&config, Arc::new(SystemClock)).unwrap();
    let b = build_store(&config, Arc::new(SystemClock)).unwrap();
    for shown in [format!("{a:?}"), format!("{config:?}")] {
        assert!(!shown.contains(PASSWORD), "{shown}");
    }
    let key = StateKey {
        proxy: "http://p:1",
        exchange: "binance",
    };
    a.store
        .ban(key, BanLength::Exactly(Duration::from_secs(60)), true)
        .await
        .unwrap();
    let seen = b.store.state(key).await.unwrap().and_then(|s| s.banned_until);
    assert!(seen.is_some(), "the other replica sees the ban through Redis");
    // The change feed's own connection authenticates too: a ban on one replica reaches the
    // other's feed (retried until its subscription is up).
    let mut feed = b.store.subscribe();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    'heard: for i in 0.. {
        assert!(
            std::time::Instant::now() < deadline,
            "the other replica's feed heard nothing"
        );
        let proxy = format!("http://q{i}:1");
        let key = StateKey {
            proxy: &proxy,
            exchange: "okx",
        };
        a.store
            .ban(key, BanLength::Exactly(Duration::from_secs(60)), true)
            .await
            .unwrap();
        while let Ok(Ok(change)) = tokio::time::timeout(Duration::from_millis(200), feed.recv()).await {
            if &*change.proxy == proxy.as_str() {
                break 'heard;
            }
        }
    }
    assert!(a.status.is_up() && b.status.is_up());
}

#[tokio::test]
async fn an_unreadable_or_empty_password_file_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    // (row, password_file, what the message must contain)
    let rows = [
        (
            "missing",
            dir.path().join("nope").display().to_string(),
            "cannot read",
        ),
        (
            "empty",
            empty.display().to_string(),
            "is empty (it must hold the password)",
        ),
    ];
    for (row, file, needle) in rows {
        let config = redis_config("redis://127.0.0.1:1/0".into(), Some(file.clone()));
        let message = build_store(&config, Arc::new(SystemClock))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("store.redis.password_file"),
            "row {row}: {message}"
        );
        assert!(
            message.contains(&file) && message.contains(needle),
            "row {row}: {message}"
        );
    }
}

#[tokio::test]
async fn a_wrong_password_is_an_outage_whose_errors_do_not_show_it() {
    let server = RedisServer::start_with_password(PASSWORD);
    let wrong = "wrong-Store-PW-7777";
    let client = ::redis::Client::open(format!("redis://:{wrong}@{}/0", server.addr)).unwrap();
    let store = proxy_broker::store::redis::RedisStore::new(
        proxy_broker::store::redis::Target::Single(client),
        "wrong:",
        Duration::from_secs(1),
        Arc::new(SystemClock),
    )
    .unwrap();
    let key = StateKey {
        proxy: "http://p:1",
        exchange: "binance",
    };
    let error = store.record_failure(key, true).await.unwrap_err().to_string();
    assert!(!error.contains(wrong) && !error.contains(PASSWORD), "{error}");
    assert!(error.contains("unavailable"), "{error}");
    assert!(!format!("{store:?}").contains(wrong));
}

#[tokio::test]
async fn cluster_true_with_seed_urls_shares_state_through_a_redis_cluster() {
    let cluster = common::redis::RedisCluster::start(3);
    let config = StoreConfig {
        backend: Backend::Redis,
        redis: RedisConfig {
            urls: cluster.urls(),
            cluster: true,
            // Generous: this test is about routing, not about a slow CI machine.
            operation_timeout_ms: 2000,
            ..RedisConfig::default()
        },
    };
    let a = build_store(&config, Arc::new(SystemClock)).unwrap();
    let b = build_store(&config, Arc::new(SystemClock)).unwrap();
    // Entries of many exchanges land on different nodes; each script stays in one slot.
    for exchange in ["binance", "bybit", "okx", "kraken", "coinbase"] {
        let key = StateKey {
            proxy: "http://p:1",
            exchange,
        };
        a.store
            .ban(key, BanLength::Exactly(Duration::from_secs(60)), true)
            .await
            .unwrap();
        let seen = b.store.state(key).await.unwrap().and_then(|s| s.banned_until);
        assert!(
            seen.is_some(),
            "{exchange}: the other replica sees the ban through the cluster"
        );
    }
    assert!(
        a.status.is_up() && b.status.is_up(),
        "no operation fell back to local state"
    );
}
