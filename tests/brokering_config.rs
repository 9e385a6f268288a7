//! The `brokering:` configuration block: YAML and environment forms (`PROXY_BROKER_BROKERING__*`),
//! precedence, defaults, every rule (key path, value and rule in the message), unknown keys, the
//! shipped example, `GetEffectiveConfig`, `--check-config` and hot reload.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/upstream.rs"]
mod upstream;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use common::TestBroker;
use proxy_broker::BrokerConfig;
use proxy_broker::broker::Broker;
use proxy_broker::brokering::config::{AttemptBudget, BrokeringConfig, ExchangeLimits, OutageConfig};
use proxy_broker::pb::{ConnectionType, GetEffectiveConfigRequest, ProxySource};
use upstream::Upstream;

const EXAMPLE: &str = include_str!("../examples/broker-brokering.yaml");

/// The block of the issue, verbatim.
const ISSUE_BLOCK: &str = r#"
brokering:
  exchanges:
    binance:
      websocket: { attempts: 300, per_seconds: 300 }   # connection-attempt budget per proxy
      http: { attempts: 1200, per_seconds: 60 }
      ban_seconds: 120          # 418/403 without retry_after_seconds
  known_exchange_limits: true   # built-in budgets for exchanges with documented limits
  penalty_seconds: 30           # 429 without retry_after_seconds
  outage: { failing_fraction: 0.5, window_seconds: 60, min_proxies: 2 }
  lease_jitter_percent: 20
  max_candidates_per_key: 32
"#;

fn budget(attempts: i64, per_seconds: i64) -> Option<AttemptBudget> {
    Some(AttemptBudget {
        attempts,
        per_seconds,
    })
}

/// What [`ISSUE_BLOCK`] means.
fn issue_block() -> BrokeringConfig {
    BrokeringConfig {
        exchanges: BTreeMap::from([(
            "binance".to_owned(),
            ExchangeLimits {
                websocket: budget(300, 300),
                http: budget(1200, 60),
                ban_seconds: Some(120),
            },
        )]),
        known_exchange_limits: true,
        penalty_seconds: 30,
        outage: OutageConfig {
            failing_fraction: 0.5,
            window_seconds: 60,
            min_proxies: 2,
        },
        lease_jitter_percent: 20,
        max_candidates_per_key: 32,
    }
}

fn loaded(yaml: Option<&str>, env: &[(&str, &str)]) -> BrokerConfig {
    common::load(yaml, env).unwrap_or_else(|e| panic!("configuration must load: {e}\n{yaml:?}\n{env:?}"))
}

/// The error text of a configuration that must be refused.
fn refused(yaml: Option<&str>, env: &[(&str, &str)]) -> String {
    match common::load(yaml, env) {
        Ok(config) => panic!(
            "configuration must be refused but loaded: {}\n{yaml:?}\n{env:?}",
            config.redacted_json()
        ),
        Err(e) => e.to_string(),
    }
}

async fn effective_config(broker: &TestBroker) -> serde_json::Value {
    let json = broker
        .admin()
        .get_effective_config(GetEffectiveConfigRequest {})
        .await
        .unwrap()
        .into_inner()
        .config_json;
    serde_json::from_str(&json).unwrap()
}

// --- Forms, precedence, defaults -------------------------------------------------------------

#[test]
fn the_issue_block_loads_as_written() {
    assert_eq!(loaded(Some(ISSUE_BLOCK), &[]).brokering, issue_block());
}

#[test]
fn defaults_apply_when_the_block_or_its_keys_are_absent() {
    let cases: &[(&str, Option<&str>, BrokeringConfig)] = &[
        ("no file", None, BrokeringConfig::default()),
        ("no block", Some("proxy: {}\n"), BrokeringConfig::default()),
        ("empty block", Some("brokering: {}\n"), BrokeringConfig::default()),
        (
            "one outage key",
            Some("brokering:\n  outage: { min_proxies: 5 }\n"),
            BrokeringConfig {
                outage: OutageConfig {
                    min_proxies: 5,
                    ..Default::default()
                },
                ..Default::default()
            },
        ),
    ];
    for (name, yaml, want) in cases {
        assert_eq!(&loaded(*yaml, &[]).brokering, want, "{name}");
    }
    let d = BrokeringConfig::default();
    assert!(d.exchanges.is_empty());
    assert!(d.known_exchange_limits);
    assert_eq!(
        (
            d.penalty_seconds,
            d.lease_jitter_percent,
            d.max_candidates_per_key
        ),
        (30, 20, 32)
    );
    assert_eq!(d.outage, issue_block().outage);
}

#[test]
fn the_environment_form_loads_the_same_block_as_yaml() {
    let env = [
        (
            "PROXY_BROKER_BROKERING__EXCHANGES__BINANCE__WEBSOCKET__ATTEMPTS",
            "300",
        ),
        (
            "PROXY_BROKER_BROKERING__EXCHANGES__BINANCE__WEBSOCKET__PER_SECONDS",
            "300",
        ),
        (
            "PROXY_BROKER_BROKERING__EXCHANGES__BINANCE__HTTP",
            r#"{"attempts":1200,"per_seconds":60}"#,
        ),
        ("PROXY_BROKER_BROKERING__EXCHANGES__BINANCE__BAN_SECONDS", "120"),
        ("PROXY_BROKER_BROKERING__KNOWN_EXCHANGE_LIMITS", "true"),
        ("PROXY_BROKER_BROKERING__PENALTY_SECONDS", "30"),
        ("PROXY_BROKER_BROKERING__OUTAGE__FAILING_FRACTION", "0.5"),
        ("PROXY_BROKER_BROKERING__OUTAGE__WINDOW_SECONDS", "60"),
        ("proxy_broker_brokering__outage__min_proxies", "2"),
        ("PROXY_BROKER_BROKERING__LEASE_JITTER_PERCENT", "20"),
        ("PROXY_BROKER_BROKERING__MAX_CANDIDATES_PER_KEY", "32"),
    ];
    assert_eq!(loaded(None, &env).brokering, issue_block());
}

/// (name, variable, value, what the loaded block must satisfy).
type EnvCase = (
    &'static str,
    &'static str,
    &'static str,
    fn(&BrokeringConfig) -> bool,
);

#[test]
fn environment_values_of_every_type_are_read_from_text() {
    let cases: &[EnvCase] = &[
        (
            "float",
            "PROXY_BROKER_BROKERING__OUTAGE__FAILING_FRACTION",
            "0.25",
            |b| (b.outage.failing_fraction - 0.25).abs() < 1e-12,
        ),
        (
            "float written as an integer",
            "PROXY_BROKER_BROKERING__OUTAGE__FAILING_FRACTION",
            "1",
            |b| (b.outage.failing_fraction - 1.0).abs() < 1e-12,
        ),
        (
            "bool",
            "PROXY_BROKER_BROKERING__KNOWN_EXCHANGE_LIMITS",
            "false",
            |b| !b.known_exchange_limits,
        ),
        (
            "integer",
            "PROXY_BROKER_BROKERING__LEASE_JITTER_PERCENT",
            "0",
            |b| b.lease_jitter_percent == 0,
        ),
        (
            "JSON object",
            "PROXY_BROKER_BROKERING__OUTAGE",
            r#"{"window_seconds": 5}"#,
            |b| b.outage.window_seconds == 5 && b.outage.min_proxies == 2,
        ),
        (
            "exchange id with underscores",
            "PROXY_BROKER_BROKERING__EXCHANGES__BINANCE_FUTURES__BAN_SECONDS",
            "60",
            |b| b.exchanges["binance_futures"].ban_seconds == Some(60),
        ),
    ];
    for (name, var, value, check) in cases {
        let config = loaded(None, &[(var, value)]);
        assert!(check(&config.brokering), "{name}: {:?}", config.brokering);
    }
}

#[test]
fn environment_wins_over_yaml_key_by_key_and_exchange_ids_fold_case() {
    let yaml = r#"
brokering:
  exchanges:
    Binance:
      websocket: { attempts: 300, per_seconds: 300 }
      ban_seconds: 120
  penalty_seconds: 30
  outage: { failing_fraction: 0.5, window_seconds: 60 }
"#;
    let env = [
        (
            "PROXY_BROKER_BROKERING__EXCHANGES__BINANCE__WEBSOCKET__ATTEMPTS",
            "100",
        ),
        ("PROXY_BROKER_BROKERING__OUTAGE__FAILING_FRACTION", "0.75"),
        ("PROXY_BROKER_BROKERING__PENALTY_SECONDS", "45"),
    ];
    let b = loaded(Some(yaml), &env).brokering;
    assert_eq!(
        b.exchanges.keys().collect::<Vec<_>>(),
        ["binance"],
        "one exchange, lower-cased"
    );
    let binance = &b.exchanges["binance"];
    assert_eq!(
        binance.websocket,
        budget(100, 300),
        "attempts from env, per_seconds from YAML"
    );
    assert_eq!(binance.ban_seconds, Some(120), "untouched YAML key stays");
    assert_eq!(b.penalty_seconds, 45);
    assert!((b.outage.failing_fraction - 0.75).abs() < 1e-12);
    assert_eq!(b.outage.window_seconds, 60);
}

#[test]
fn brokering_and_store_variables_are_not_server_keys() {
    let config = loaded(
        None,
        &[
            ("PROXY_BROKER_BROKERING__PENALTY_SECONDS", "5"),
            ("PROXY_BROKER_LISTEN", "127.0.0.1:7000"),
        ],
    );
    assert_eq!(config.brokering.penalty_seconds, 5);
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:7000");

    // `store:` variables map onto the `store:` block (tests/store_config.rs), not `server.store`.
    let message = refused(None, &[("PROXY_BROKER_STORE__URL", "redis://127.0.0.1:6379")]);
    assert!(message.contains("unknown field `url`"), "{message}");
    assert!(!message.contains("server.store"), "{message}");
}

// --- Rules -------------------------------------------------------------------------------------

/// One refused configuration: its YAML (under `brokering:`) or environment, and what the message
/// must contain (key path, value, rule).
struct Refused {
    name: &'static str,
    yaml: Option<&'static str>,
    env: &'static [(&'static str, &'static str)],
    needles: &'static [&'static str],
}

const fn yaml(name: &'static str, yaml: &'static str, needles: &'static [&'static str]) -> Refused {
    Refused {
        name,
        yaml: Some(yaml),
        env: &[],
        needles,
    }
}

const fn env(
    name: &'static str,
    env: &'static [(&'static str, &'static str)],
    needles: &'static [&'static str],
) -> Refused {
    Refused {
        name,
        yaml: None,
        env,
        needles,
    }
}

#[test]
fn out_of_range_values_are_refused_naming_key_value_and_rule() {
    let cases = [
        yaml(
            "attempts 0",
            "exchanges: { binance: { websocket: { attempts: 0, per_seconds: 300 } } }",
            &["brokering.exchanges.binance.websocket.attempts: 0 is out of range (allowed 1..=1000000)"],
        ),
        yaml(
            "attempts too many",
            "exchanges: { binance: { http: { attempts: 1000001, per_seconds: 60 } } }",
            &["brokering.exchanges.binance.http.attempts: 1000001 is out of range (allowed 1..=1000000)"],
        ),
        yaml(
            "per_seconds 0",
            "exchanges: { okx: { websocket: { attempts: 3, per_seconds: 0 } } }",
            &["brokering.exchanges.okx.websocket.per_seconds: 0 is out of range (allowed 1..=86400)"],
        ),
        yaml(
            "per_seconds over a day",
            "exchanges: { okx: { websocket: { attempts: 3, per_seconds: 86401 } } }",
            &["brokering.exchanges.okx.websocket.per_seconds: 86401 is out of range (allowed 1..=86400)"],
        ),
        yaml(
            "ban_seconds 0",
            "exchanges: { bybit: { ban_seconds: 0 } }",
            &["brokering.exchanges.bybit.ban_seconds: 0 is out of range (allowed 1..=86400)"],
        ),
        yaml(
            "ban_seconds negative",
            "exchanges: { bybit: { ban_seconds: -5 } }",
            &["brokering.exchanges.bybit.ban_seconds: -5 is out of range (allowed 1..=86400)"],
        ),
        yaml(
            "penalty_seconds 0",
            "penalty_seconds: 0",
            &["brokering.penalty_seconds: 0 is out of range (allowed 1..=86400)"],
        ),
        yaml(
            "penalty_seconds over a day",
            "penalty_seconds: 86401",
            &["brokering.penalty_seconds: 86401 is out of range (allowed 1..=86400)"],
        ),
        yaml(
            "failing_fraction 0",
            "outage: { failing_fraction: 0 }",
            &["brokering.outage.failing_fraction: 0 is out of range (allowed above 0 and at most 1"],
        ),
        yaml(
            "failing_fraction above 1",
            "outage: { failing_fraction: 1.5 }",
            &["brokering.outage.failing_fraction: 1.5 is out of range"],
        ),
        yaml(
            "failing_fraction negative",
            "outage: { failing_fraction: -0.1 }",
            &["brokering.outage.failing_fraction: -0.1 is out of range"],
        ),
        env(
            "failing_fraction NaN",
            &[("PROXY_BROKER_BROKERING__OUTAGE__FAILING_FRACTION", "NaN")],
            &["brokering.outage.failing_fraction: NaN is out of range"],
        ),
        env(
            "failing_fraction infinite",
            &[("PROXY_BROKER_BROKERING__OUTAGE__FAILING_FRACTION", "inf")],
            &["brokering.outage.failing_fraction: inf is out of range"],
        ),
        yaml(
            "window_seconds 0",
            "outage: { window_seconds: 0 }",
            &["brokering.outage.window_seconds: 0 is out of range (allowed 1..=3600)"],
        ),
        yaml(
            "window_seconds over an hour",
            "outage: { window_seconds: 3601 }",
            &["brokering.outage.window_seconds: 3601 is out of range (allowed 1..=3600)"],
        ),
        yaml(
            "min_proxies 0",
            "outage: { min_proxies: 0 }",
            &["brokering.outage.min_proxies: 0 is out of range (allowed 1..=10000)"],
        ),
        yaml(
            "min_proxies too many",
            "outage: { min_proxies: 10001 }",
            &["brokering.outage.min_proxies: 10001 is out of range (allowed 1..=10000)"],
        ),
        yaml(
            "lease_jitter_percent negative",
            "lease_jitter_percent: -1",
            &["brokering.lease_jitter_percent: -1 is out of range (allowed 0..=90)"],
        ),
        yaml(
            "lease_jitter_percent above 90",
            "lease_jitter_percent: 91",
            &["brokering.lease_jitter_percent: 91 is out of range (allowed 0..=90)"],
        ),
        yaml(
            "max_candidates_per_key 0",
            "max_candidates_per_key: 0",
            &["brokering.max_candidates_per_key: 0 is out of range (allowed 1..=1024)"],
        ),
        yaml(
            "max_candidates_per_key too many",
            "max_candidates_per_key: 1025",
            &["brokering.max_candidates_per_key: 1025 is out of range (allowed 1..=1024)"],
        ),
        env(
            "attempts 0 from the environment",
            &[
                (
                    "PROXY_BROKER_BROKERING__EXCHANGES__BINANCE__WEBSOCKET__ATTEMPTS",
                    "0",
                ),
                (
                    "PROXY_BROKER_BROKERING__EXCHANGES__BINANCE__WEBSOCKET__PER_SECONDS",
                    "300",
                ),
            ],
            &["brokering.exchanges.binance.websocket.attempts: 0 is out of range (allowed 1..=1000000)"],
        ),
        env(
            "failing_fraction from the environment",
            &[("PROXY_BROKER_BROKERING__OUTAGE__FAILING_FRACTION", "2.5")],
            &["brokering.outage.failing_fraction: 2.5 is out of range"],
        ),
    ];
    check_refused(&cases);
}

#[test]
fn malformed_values_are_refused_naming_key_and_value() {
    let cases = [
        yaml(
            "attempts not a number",
            "exchanges: { binance: { websocket: { attempts: lots, per_seconds: 300 } } }",
            &["brokering.exchanges.binance.websocket.attempts", "lots"],
        ),
        yaml(
            "budget without per_seconds",
            "exchanges: { binance: { websocket: { attempts: 300 } } }",
            &["brokering.exchanges.binance.websocket: missing", "per_seconds"],
        ),
        yaml(
            "budget as a list",
            "exchanges: { binance: { websocket: [300, 300] } }",
            &["brokering.exchanges.binance.websocket", "expected a mapping"],
        ),
        yaml(
            "exchange entry as a string",
            "exchanges: { binance: fast }",
            &["brokering.exchanges.binance", "'fast'", "expected a mapping"],
        ),
        yaml(
            "exchanges as a list",
            "exchanges: [binance]",
            &["brokering.exchanges", "expected a mapping"],
        ),
        yaml(
            "block without a value (as for proxy: and server:)",
            "",
            &["brokering: invalid type: unit value"],
        ),
        yaml(
            "outage as a number",
            "outage: 5",
            &["brokering.outage", "'5'", "expected a mapping"],
        ),
        yaml(
            "known_exchange_limits not a bool",
            "known_exchange_limits: maybe",
            &["brokering.known_exchange_limits", "maybe"],
        ),
        yaml(
            "failing_fraction not a number",
            "outage: { failing_fraction: half }",
            &["brokering.outage.failing_fraction", "half"],
        ),
        yaml(
            "exchange id with a space",
            "exchanges: { 'bin ance': { ban_seconds: 60 } }",
            &[
                "brokering.exchanges.bin ance",
                "exchange id 'bin ance' contains ' '",
            ],
        ),
        yaml(
            "exchange id too long",
            "exchanges: { aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa: { ban_seconds: 60 } }",
            &["is 65 characters long (1..=64 characters of [A-Za-z0-9._-])"],
        ),
        yaml(
            "one exchange spelled twice",
            "exchanges: { Binance: { ban_seconds: 60 }, binance: { ban_seconds: 90 } }",
            &[
                "brokering.exchanges",
                "'Binance'",
                "'binance'",
                "case-insensitive",
            ],
        ),
        env(
            "block as a scalar from the environment",
            &[("PROXY_BROKER_BROKERING__OUTAGE", "5")],
            &["brokering.outage", "expected a mapping"],
        ),
        env(
            "bad number from the environment names the variable",
            &[("PROXY_BROKER_BROKERING__PENALTY_SECONDS", "soon")],
            &[
                "brokering.penalty_seconds",
                "soon",
                "PROXY_BROKER_BROKERING__PENALTY_SECONDS",
            ],
        ),
    ];
    check_refused(&cases);
}

#[test]
fn unknown_keys_are_refused_with_their_path() {
    let cases = [
        yaml(
            "in the block",
            "penalty: 30",
            &["brokering", "unknown field `penalty`", "penalty_seconds"],
        ),
        yaml(
            "in an exchange",
            "exchanges: { binance: { ws: { attempts: 1, per_seconds: 1 } } }",
            &["brokering.exchanges.binance", "unknown field `ws`", "websocket"],
        ),
        yaml(
            "in a budget",
            "exchanges: { binance: { websocket: { attempts: 1, per_seconds: 1, burst: 2 } } }",
            &["brokering.exchanges.binance.websocket", "unknown field `burst`"],
        ),
        yaml(
            "in outage",
            "outage: { failing_percent: 50 }",
            &[
                "brokering.outage",
                "unknown field `failing_percent`",
                "failing_fraction",
            ],
        ),
        env(
            "from the environment",
            &[("PROXY_BROKER_BROKERING__JITTER", "5")],
            &[
                "brokering",
                "unknown field `jitter`",
                "PROXY_BROKER_BROKERING__JITTER",
            ],
        ),
    ];
    check_refused(&cases);
}

/// Each row must be refused with every needle in the message.
fn check_refused(cases: &[Refused]) {
    for case in cases {
        let doc = case.yaml.map(|y| format!("brokering:\n  {y}\n"));
        let message = refused(doc.as_deref(), case.env);
        assert!(
            message.starts_with("invalid configuration"),
            "{}: unexpected message: {message}",
            case.name
        );
        for needle in case.needles {
            assert!(
                message.contains(needle),
                "{}: message lacks {needle:?}: {message}",
                case.name
            );
        }
    }
}

// --- The shipped example, effective configuration, --check-config, reload ---------------------

#[test]
fn the_shipped_example_loads_with_its_brokering_block() {
    let config = loaded(Some(EXAMPLE), &[]);
    let b = &config.brokering;
    assert_eq!(b.exchanges["binance"], issue_block().exchanges["binance"]);
    assert_eq!(b.exchanges["deribit"].websocket, budget(60, 60));
    assert_eq!(b.exchanges["bybit"].ban_seconds, Some(600));
    assert_eq!(
        b.exchanges["bybit"].websocket, None,
        "the built-in budget stays in force"
    );
    assert_eq!(
        BrokeringConfig {
            exchanges: issue_block().exchanges,
            ..b.clone()
        },
        issue_block(),
        "every other key as in the issue"
    );
    assert!(config.proxy.external_service.enabled, "the example delegates");
}

/// A token file for the example's `auth_credentials.token_file`.
fn token_file(dir: &Path) -> String {
    let path = dir.join("token");
    std::fs::write(&path, upstream::TOKEN).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn the_shipped_example_serves_and_shows_its_block_in_get_effective_config() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path());
    let endpoints = format!("[\"{}\"]", up.url);
    let config = loaded(
        Some(EXAMPLE),
        &[
            ("CRYPTOFEED_PROXY_EXTERNAL_SERVICE__ENDPOINTS", endpoints.as_str()),
            (
                "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__AUTH_CREDENTIALS__TOKEN_FILE",
                token.as_str(),
            ),
            ("PROXY_BROKER_BROKERING__PENALTY_SECONDS", "40"),
        ],
    );
    let broker = TestBroker::start(config).await;
    let answer = broker.ask("binance", ConnectionType::Websocket).await;
    assert_eq!(answer.source(), ProxySource::Upstream);
    assert_eq!(answer.proxy_url, up.proxy_url());

    let json = effective_config(&broker).await;
    let b = &json["brokering"];
    assert_eq!(b["penalty_seconds"], 40, "{b}");
    assert_eq!(
        b["exchanges"]["binance"]["websocket"],
        serde_json::json!({"attempts": 300, "per_seconds": 300})
    );
    assert_eq!(b["exchanges"]["binance"]["ban_seconds"], 120);
    assert_eq!(b["outage"]["failing_fraction"], 0.5);
    assert_eq!(b["known_exchange_limits"], true);
    assert_eq!(b["lease_jitter_percent"], 20);
    assert_eq!(b["max_candidates_per_key"], 32);
    broker.stop().await;
}

#[tokio::test]
async fn check_config_prints_the_brokering_block() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path());
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/broker-brokering.yaml");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_proxy-broker"))
        .arg("--check-config")
        .arg("--config")
        .arg(&example)
        .env_clear()
        .env(
            "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__AUTH_CREDENTIALS__TOKEN_FILE",
            &token,
        )
        .env("PROXY_BROKER_BROKERING__OUTAGE__FAILING_FRACTION", "0.5")
        .env("PROXY_BROKER_BROKERING__LEASE_JITTER_PERCENT", "10")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
        .await
        .expect("--check-config exits on its own")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["brokering"]["lease_jitter_percent"], 10);
    assert_eq!(json["brokering"]["outage"]["failing_fraction"], 0.5);
    assert_eq!(
        json["brokering"]["exchanges"]["deribit"]["websocket"]["attempts"],
        60
    );

    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_proxy-broker"))
        .arg("--check-config")
        .env_clear()
        .env("PROXY_BROKER_BROKERING__MAX_CANDIDATES_PER_KEY", "0")
        .kill_on_drop(true)
        .output();
    let bad = tokio::time::timeout(std::time::Duration::from_secs(60), bad)
        .await
        .expect("--check-config exits on its own")
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("brokering.max_candidates_per_key: 0 is out of range (allowed 1..=1024)"),
        "{stderr}"
    );
}

#[tokio::test]
async fn brokering_changes_apply_on_reload_without_a_restart() {
    let before = loaded(Some(ISSUE_BLOCK), &[]);
    let broker = Arc::new(Broker::new(before.clone()).unwrap());
    let served = TestBroker::start_broker(broker.clone()).await;

    let changed = r#"
brokering:
  exchanges:
    binance:
      websocket: { attempts: 50, per_seconds: 60 }
    kraken:
      ban_seconds: 900
  known_exchange_limits: false
  penalty_seconds: 10
  outage: { failing_fraction: 0.9, window_seconds: 30, min_proxies: 4 }
  lease_jitter_percent: 50
  max_candidates_per_key: 8
"#;
    let after = loaded(Some(changed), &[]);
    let summary = broker.reload(after.clone()).unwrap();
    assert!(
        !summary.restart_needed,
        "brokering is hot-reloadable: {summary:?}"
    );
    assert!(
        !summary.embedded_changed && !summary.upstreams_changed,
        "{summary:?}"
    );
    assert_eq!(broker.config().brokering, after.brokering);

    let json = effective_config(&served).await;
    assert_eq!(
        json["brokering"]["exchanges"]["binance"]["websocket"]["attempts"],
        50
    );
    assert_eq!(json["brokering"]["exchanges"]["kraken"]["ban_seconds"], 900);
    assert_eq!(json["brokering"]["known_exchange_limits"], false);
    assert_eq!(json["brokering"]["max_candidates_per_key"], 8);
    served.stop().await;
}
