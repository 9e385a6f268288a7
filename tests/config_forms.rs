mod common;

// Every configuration form of `embedded-config.md`, loaded through the real layered loader and
// answered by the real broker over gRPC on loopback.

use std::collections::BTreeMap;
use std::path::Path;

use common::TestBroker;
use prost_types::value::Kind;
use proxy_broker::BrokerConfig;
use proxy_broker::pb::{
    ConnectionType, FallbackPolicy, GetEffectiveConfigRequest, ProxyFeedback, ProxyResponse, ProxySource,
};

const HTTP: ConnectionType = ConnectionType::Http;
const WS: ConnectionType = ConnectionType::Websocket;

/// The YAML example of `embedded-config.md`, verbatim.
const DESIGN_EXAMPLE: &str = r#"
proxy:
  enabled: true
  default:
    http: { url: "socks5://proxy.example.com:1080", timeout_seconds: 30 }
    websocket: { url: "socks5://proxy.example.com:1081" }
  exchanges:
    binance:
      http: { url: "http://binance-proxy:8080", timeout_seconds: 15 }
      websocket:
        pool:
          strategy: round_robin
          proxies:
            - url: "socks5://de-1:1080"
            - url: "socks5://nl-1:1080"
              weight: 2
"#;

/// Starts the broker from environment variables only (no YAML file at all).
async fn start_env(env: &[(&str, &str)]) -> TestBroker {
    TestBroker::start(common::load(None, env).expect("configuration loads")).await
}

/// `metadata.timeout_seconds` of an answer, if present.
fn timeout_of(r: &ProxyResponse) -> Option<f64> {
    match r.metadata.as_ref()?.fields.get("timeout_seconds")?.kind {
        Some(Kind::NumberValue(n)) => Some(n),
        _ => None,
    }
}

/// The broker's effective configuration, from the admin GetEffectiveConfig RPC.
async fn effective_config(broker: &TestBroker) -> serde_json::Value {
    let json = broker
        .admin()
        .get_effective_config(GetEffectiveConfigRequest {})
        .await
        .expect("GetEffectiveConfig answers")
        .into_inner()
        .config_json;
    serde_json::from_str(&json).expect("config_json is JSON")
}

/// `n` answers for one exchange / connection type, proxy URLs only.
async fn urls(broker: &TestBroker, exchange: &str, ct: ConnectionType, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(broker.ask(exchange, ct).await.proxy_url);
    }
    out
}

async fn report_failure(broker: &TestBroker, exchange: &str, ct: ConnectionType, url: &str) {
    let accepted = broker
        .client()
        .report_feedback(ProxyFeedback {
            proxy_url: url.into(),
            exchange_id: exchange.into(),
            connection_type: ct.into(),
            success: false,
            error_details: Some("connect refused".into()),
            ..Default::default()
        })
        .await
        .expect("ReportFeedback answers")
        .into_inner()
        .accepted;
    assert!(accepted);
}

async fn report_success(broker: &TestBroker, exchange: &str, ct: ConnectionType, url: &str) {
    let accepted = broker
        .client()
        .report_feedback(ProxyFeedback {
            proxy_url: url.into(),
            exchange_id: exchange.into(),
            connection_type: ct.into(),
            success: true,
            latency_ms: Some(12),
            ..Default::default()
        })
        .await
        .expect("ReportFeedback answers")
        .into_inner()
        .accepted;
    assert!(accepted);
}

fn assert_direct(r: &ProxyResponse, what: &str) {
    assert_eq!(r.proxy_url, "", "{what}: proxy_url");
    assert_eq!(r.source(), ProxySource::Direct, "{what}: source");
    assert_eq!(r.strategy, "direct", "{what}: strategy");
    assert_eq!(
        r.fallback_policy(),
        FallbackPolicy::DirectConnection,
        "{what}: fallback"
    );
    assert_eq!(timeout_of(r), None, "{what}: no timeout for direct answers");
}

fn assert_embedded(r: &ProxyResponse, url: &str, strategy: &str, timeout: f64, ttl: u32) {
    assert_eq!(r.proxy_url, url);
    assert_eq!(r.strategy, strategy, "strategy of {url}");
    assert_eq!(r.source(), ProxySource::Embedded, "source of {url}");
    assert_eq!(
        r.fallback_policy(),
        FallbackPolicy::EmbeddedFallback,
        "fallback of {url}"
    );
    assert_eq!(r.ttl_seconds, ttl, "ttl of {url}");
    assert_eq!(timeout_of(r), Some(timeout), "metadata.timeout_seconds of {url}");
    assert_eq!(r.upstream_endpoint, "", "embedded answers name no upstream");
}

// --- Sources: env only, YAML only, env over YAML -------------------------------------------------

#[tokio::test]
async fn env_only_configuration_answers_without_any_yaml_file() {
    let broker = start_env(&[
        ("CRYPTOFEED_PROXY_ENABLED", "true"),
        ("CRYPTOFEED_PROXY_DEFAULT__HTTP__URL", "socks5://env-default:1080"),
        ("CRYPTOFEED_PROXY_DEFAULT__HTTP__TIMEOUT_SECONDS", "42"),
        (
            "CRYPTOFEED_PROXY_DEFAULT__WEBSOCKET__URL",
            "socks5://env-default:1081",
        ),
        (
            "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__HTTP__URL",
            "http://env-binance:8080",
        ),
    ])
    .await;
    assert_embedded(
        &broker.ask("binance", HTTP).await,
        "http://env-binance:8080",
        "static",
        30.0,
        300,
    );
    assert_embedded(
        &broker.ask("binance", WS).await,
        "socks5://env-default:1081",
        "static",
        30.0,
        300,
    );
    assert_embedded(
        &broker.ask("kraken", HTTP).await,
        "socks5://env-default:1080",
        "static",
        42.0,
        300,
    );
    broker.stop().await;
}

#[tokio::test]
async fn env_only_configuration_without_enabled_answers_direct() {
    // `enabled` defaults to false: proxies configured only through the environment stay unused.
    let broker = start_env(&[("CRYPTOFEED_PROXY_DEFAULT__HTTP__URL", "socks5://env-default:1080")]).await;
    assert_direct(&broker.ask("kraken", HTTP).await, "kraken/http");
    broker.stop().await;
}

#[tokio::test]
async fn yaml_only_configuration_answers_from_the_file() {
    let yaml = r#"
proxy:
  enabled: true
  default:
    websocket: { url: "socks5://yaml-default:1081", timeout_seconds: 20 }
  exchanges:
    okx:
      http: { url: "https://okx-proxy:8443", timeout_seconds: 9 }
"#;
    let broker = TestBroker::start_yaml(yaml, &[]).await;
    assert_embedded(
        &broker.ask("okx", HTTP).await,
        "https://okx-proxy:8443",
        "static",
        9.0,
        300,
    );
    assert_embedded(
        &broker.ask("okx", WS).await,
        "socks5://yaml-default:1081",
        "static",
        20.0,
        300,
    );
    assert_direct(
        &broker.ask("kraken", HTTP).await,
        "kraken/http has no entry anywhere",
    );
    broker.stop().await;
}

#[tokio::test]
async fn env_wins_over_yaml_for_the_same_key() {
    let yaml = r#"
proxy:
  enabled: true
  default:
    http: { url: "socks5://yaml-default:1080", timeout_seconds: 25 }
    websocket: { url: "socks5://yaml-default:1081" }
  exchanges:
    binance:
      http: { url: "http://yaml-binance:8080", timeout_seconds: 15 }
"#;
    let broker = TestBroker::start_yaml(
        yaml,
        &[
            ("CRYPTOFEED_PROXY_DEFAULT__HTTP__URL", "socks5://env-default:1080"),
            ("CRYPTOFEED_PROXY_EXCHANGES__BINANCE__HTTP__TIMEOUT_SECONDS", "5"),
        ],
    )
    .await;
    // The env url replaces the YAML url; the YAML timeout of that entry stays.
    assert_embedded(
        &broker.ask("kraken", HTTP).await,
        "socks5://env-default:1080",
        "static",
        25.0,
        300,
    );
    // The env timeout replaces the YAML timeout; the YAML url of that entry stays.
    assert_embedded(
        &broker.ask("binance", HTTP).await,
        "http://yaml-binance:8080",
        "static",
        5.0,
        300,
    );
    // Keys the environment does not mention keep their YAML values.
    assert_eq!(
        broker.ask("kraken", WS).await.proxy_url,
        "socks5://yaml-default:1081"
    );
    broker.stop().await;
}

#[tokio::test]
async fn env_enabled_false_overrides_yaml_enabled_true() {
    let broker = TestBroker::start_yaml(DESIGN_EXAMPLE, &[("CRYPTOFEED_PROXY_ENABLED", "false")]).await;
    assert_direct(&broker.ask("binance", HTTP).await, "binance/http");
    assert_direct(&broker.ask("kraken", WS).await, "kraken/websocket");
    broker.stop().await;
}

#[tokio::test]
async fn env_and_yaml_merge_for_one_exchange_spelled_differently_in_each() {
    let yaml = r#"
proxy:
  enabled: true
  default:
    websocket: "socks5://default-ws:1081"
  exchanges:
    Binance:
      http: { url: "http://yaml-binance:8080", timeout_seconds: 15 }
"#;
    let broker = TestBroker::start_yaml(
        yaml,
        &[(
            "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__WEBSOCKET__URL",
            "socks5://env-binance:1080",
        )],
    )
    .await;
    for spelling in ["binance", "BINANCE", "Binance"] {
        assert_eq!(
            broker.ask(spelling, HTTP).await.proxy_url,
            "http://yaml-binance:8080",
            "{spelling}/http comes from YAML"
        );
        assert_eq!(
            broker.ask(spelling, WS).await.proxy_url,
            "socks5://env-binance:1080",
            "{spelling}/websocket comes from env"
        );
    }
    let config = effective_config(&broker).await;
    let exchanges = config["proxy"]["exchanges"].as_object().expect("exchanges map");
    assert_eq!(
        exchanges.keys().collect::<Vec<_>>(),
        ["binance"],
        "one exchange, not two"
    );
    broker.stop().await;
}

#[tokio::test]
async fn env_var_names_are_case_insensitive() {
    let broker = start_env(&[
        ("cryptofeed_proxy_enabled", "true"),
        (
            "Cryptofeed_Proxy_Exchanges__bitmex__Http__Url",
            "http://bitmex-proxy:8080",
        ),
    ])
    .await;
    assert_eq!(
        broker.ask("bitmex", HTTP).await.proxy_url,
        "http://bitmex-proxy:8080"
    );
    broker.stop().await;
}

// --- JSON values and numeric indexes in the environment ------------------------------------------

#[tokio::test]
async fn env_json_list_sets_the_members_of_a_pool() {
    let broker = start_env(&[
        ("CRYPTOFEED_PROXY_ENABLED", "true"),
        (
            "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__WEBSOCKET__POOL__PROXIES",
            r#"[{"url":"socks5://p1:1080"},{"url":"socks5://p2:1080","weight":2.5},{"url":"socks5://p3:1080","enabled":false}]"#,
        ),
    ])
    .await;
    assert_eq!(
        urls(&broker, "binance", WS, 4).await,
        [
            "socks5://p1:1080",
            "socks5://p2:1080",
            "socks5://p1:1080",
            "socks5://p2:1080"
        ]
    );
    let config = effective_config(&broker).await;
    let proxies = &config["proxy"]["exchanges"]["binance"]["websocket"]["pool"]["proxies"];
    assert_eq!(proxies[1]["weight"], 2.5);
    assert_eq!(proxies[2]["enabled"], false);
    broker.stop().await;
}

#[tokio::test]
async fn env_json_list_sets_external_service_endpoints() {
    let env = [(
        "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__ENDPOINTS",
        r#"["https://a:8080", "https://b:8080"]"#,
    )];
    let loaded = common::load(None, &env).expect("configuration loads");
    assert_eq!(
        loaded.proxy.external_service.endpoints,
        ["https://a:8080", "https://b:8080"]
    );
    let broker = TestBroker::start(loaded).await;
    let config = effective_config(&broker).await;
    assert_eq!(
        config["proxy"]["external_service"]["endpoints"],
        serde_json::json!(["https://a:8080", "https://b:8080"])
    );
    broker.stop().await;
}

#[tokio::test]
async fn env_json_list_replaces_the_yaml_list() {
    let yaml = r#"
proxy:
  enabled: true
  default:
    websocket:
      pool:
        proxies: [{url: "socks5://y1:1"}, {url: "socks5://y2:1"}, {url: "socks5://y3:1"}]
"#;
    let broker = TestBroker::start_yaml(
        yaml,
        &[(
            "CRYPTOFEED_PROXY_DEFAULT__WEBSOCKET__POOL__PROXIES",
            r#"[{"url":"socks5://e1:1"}]"#,
        )],
    )
    .await;
    assert_eq!(
        urls(&broker, "kraken", WS, 3).await,
        ["socks5://e1:1", "socks5://e1:1", "socks5://e1:1"]
    );
    broker.stop().await;
}

#[tokio::test]
async fn env_json_object_sets_a_whole_connection_proxies_block_with_aliases_and_shorthands() {
    let broker = start_env(&[
        ("CRYPTOFEED_PROXY_ENABLED", "true"),
        (
            "CRYPTOFEED_PROXY_DEFAULT",
            r#"{"rest": "http://j-http:3128", "ws": {"url": "socks5://j-ws:1080", "timeout_seconds": 7}}"#,
        ),
    ])
    .await;
    assert_embedded(
        &broker.ask("kraken", HTTP).await,
        "http://j-http:3128",
        "static",
        30.0,
        300,
    );
    assert_embedded(
        &broker.ask("kraken", WS).await,
        "socks5://j-ws:1080",
        "static",
        7.0,
        300,
    );
    broker.stop().await;
}

#[tokio::test]
async fn numeric_index_env_vars_build_pool_members_element_by_element() {
    let broker = start_env(&[
        ("CRYPTOFEED_PROXY_ENABLED", "true"),
        (
            "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__WEBSOCKET__POOL__PROXIES__0__URL",
            "socks5://p1:1080",
        ),
        (
            "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__WEBSOCKET__POOL__PROXIES__1__URL",
            "socks5://p2:1080",
        ),
        (
            "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__WEBSOCKET__POOL__PROXIES__1__WEIGHT",
            "3",
        ),
    ])
    .await;
    assert_eq!(
        urls(&broker, "binance", WS, 3).await,
        ["socks5://p1:1080", "socks5://p2:1080", "socks5://p1:1080"]
    );
    let config = effective_config(&broker).await;
    let proxies = &config["proxy"]["exchanges"]["binance"]["websocket"]["pool"]["proxies"];
    assert_eq!(
        proxies,
        &serde_json::json!([
            {"url": "socks5://p1:1080", "weight": 1.0, "enabled": true},
            {"url": "socks5://p2:1080", "weight": 3.0, "enabled": true},
        ])
    );
    broker.stop().await;
}

#[tokio::test]
async fn numeric_index_env_var_replaces_one_element_of_a_yaml_list() {
    let yaml = r#"
proxy:
  enabled: true
  exchanges:
    binance:
      websocket:
        pool:
          proxies: [{url: "socks5://a:1080"}, {url: "socks5://b:1080"}]
"#;
    let broker = TestBroker::start_yaml(
        yaml,
        &[(
            "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__WEBSOCKET__POOL__PROXIES__1__URL",
            "socks5://c:1080",
        )],
    )
    .await;
    assert_eq!(
        urls(&broker, "binance", WS, 4).await,
        [
            "socks5://a:1080",
            "socks5://c:1080",
            "socks5://a:1080",
            "socks5://c:1080"
        ]
    );
    broker.stop().await;
}

#[test]
fn numeric_index_env_var_refines_a_json_list_from_the_environment() {
    let config = common::load(
        None,
        &[
            (
                "CRYPTOFEED_PROXY_DEFAULT__HTTP__POOL__PROXIES",
                r#"[{"url":"socks5://p1:1080"},{"url":"socks5://p2:1080"}]"#,
            ),
            ("CRYPTOFEED_PROXY_DEFAULT__HTTP__POOL__PROXIES__1__WEIGHT", "3"),
        ],
    )
    .expect("configuration loads");
    let pool = config
        .proxy
        .default
        .and_then(|d| d.http)
        .and_then(|h| h.pool)
        .expect("default http pool");
    let members: Vec<_> = pool.proxies.iter().map(|m| (m.url.as_str(), m.weight)).collect();
    assert_eq!(members, [("socks5://p1:1080", 1.0), ("socks5://p2:1080", 3.0)]);
}

#[test]
fn numeric_index_env_vars_build_external_service_endpoints() {
    let config = common::load(
        None,
        &[
            (
                "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__ENDPOINTS__0",
                "https://a:8080",
            ),
            (
                "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__ENDPOINTS__1",
                "https://b:8080",
            ),
        ],
    )
    .expect("configuration loads");
    assert_eq!(
        config.proxy.external_service.endpoints,
        ["https://a:8080", "https://b:8080"]
    );
}

#[tokio::test]
async fn exchange_ids_with_single_underscores_work_in_env_var_names() {
    let broker = start_env(&[
        ("CRYPTOFEED_PROXY_ENABLED", "true"),
        (
            "CRYPTOFEED_PROXY_EXCHANGES__BINANCE_FUTURES__WEBSOCKET__URL",
            "socks5://futures-proxy:1080",
        ),
        (
            "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__WEBSOCKET__URL",
            "socks5://spot-proxy:1080",
        ),
    ])
    .await;
    for spelling in ["binance_futures", "BINANCE_FUTURES", "Binance_Futures"] {
        assert_eq!(
            broker.ask(spelling, WS).await.proxy_url,
            "socks5://futures-proxy:1080",
            "{spelling}"
        );
    }
    assert_eq!(
        broker.ask("binance", WS).await.proxy_url,
        "socks5://spot-proxy:1080"
    );
    assert_direct(&broker.ask("binance_futures", HTTP).await, "binance_futures/http");
    broker.stop().await;
}

// --- Aliases and shorthands ---------------------------------------------------------------------

#[tokio::test]
async fn rest_and_ws_aliases_mean_http_and_websocket() {
    let yaml = r#"
proxy:
  enabled: true
  default:
    rest: { url: "http://default-rest:3128", timeout_seconds: 11 }
    ws: { url: "socks5://default-ws:1080", timeout_seconds: 12 }
"#;
    let broker = TestBroker::start_yaml(
        yaml,
        &[
            (
                "CRYPTOFEED_PROXY_EXCHANGES__KRAKEN__REST__URL",
                "http://kraken-rest:3128",
            ),
            (
                "CRYPTOFEED_PROXY_EXCHANGES__KRAKEN__WS",
                "socks5://kraken-ws:1080",
            ),
        ],
    )
    .await;
    assert_embedded(
        &broker.ask("coinbase", HTTP).await,
        "http://default-rest:3128",
        "static",
        11.0,
        300,
    );
    assert_embedded(
        &broker.ask("coinbase", WS).await,
        "socks5://default-ws:1080",
        "static",
        12.0,
        300,
    );
    assert_eq!(
        broker.ask("kraken", HTTP).await.proxy_url,
        "http://kraken-rest:3128"
    );
    assert_eq!(
        broker.ask("kraken", WS).await.proxy_url,
        "socks5://kraken-ws:1080"
    );
    broker.stop().await;
}

#[tokio::test]
async fn bare_string_connection_proxies_means_http_only() {
    let yaml = r#"
proxy:
  enabled: true
  default:
    websocket: "socks5://default-ws:1081"
  exchanges:
    kraken: "http://kraken-proxy:3128"
"#;
    let broker = TestBroker::start_yaml(
        yaml,
        &[("CRYPTOFEED_PROXY_EXCHANGES__BITFINEX", "http://bfx:3128")],
    )
    .await;
    assert_embedded(
        &broker.ask("kraken", HTTP).await,
        "http://kraken-proxy:3128",
        "static",
        30.0,
        300,
    );
    // The shorthand sets no websocket entry, so the default's applies.
    assert_eq!(
        broker.ask("kraken", WS).await.proxy_url,
        "socks5://default-ws:1081"
    );
    // The same shorthand from the environment.
    assert_eq!(broker.ask("bitfinex", HTTP).await.proxy_url, "http://bfx:3128");
    assert_eq!(
        broker.ask("bitfinex", WS).await.proxy_url,
        "socks5://default-ws:1081"
    );
    broker.stop().await;
}

#[tokio::test]
async fn bare_string_proxy_config_means_url_with_the_default_timeout() {
    let yaml = r#"
proxy:
  enabled: true
  default:
    http: "socks5://bare:1080"
"#;
    let broker = TestBroker::start_yaml(
        yaml,
        &[("CRYPTOFEED_PROXY_DEFAULT__WEBSOCKET", "socks5://bare-env:1081")],
    )
    .await;
    assert_embedded(
        &broker.ask("kraken", HTTP).await,
        "socks5://bare:1080",
        "static",
        30.0,
        300,
    );
    assert_embedded(
        &broker.ask("kraken", WS).await,
        "socks5://bare-env:1081",
        "static",
        30.0,
        300,
    );
    broker.stop().await;
}

// --- Resolution ---------------------------------------------------------------------------------

#[tokio::test]
async fn exchange_ids_in_requests_are_case_insensitive() {
    let yaml = r#"
proxy:
  enabled: true
  exchanges:
    BiNaNcE:
      http: "http://binance-proxy:8080"
"#;
    let broker = TestBroker::start_yaml(yaml, &[]).await;
    for spelling in ["binance", "BINANCE", "Binance", "bInAnCe"] {
        assert_eq!(
            broker.ask(spelling, HTTP).await.proxy_url,
            "http://binance-proxy:8080",
            "{spelling}"
        );
    }
    broker.stop().await;
}

#[tokio::test]
async fn enabled_false_answers_direct_for_every_exchange_and_connection_type() {
    let yaml = r#"
proxy:
  enabled: false
  default:
    http: "socks5://default:1080"
    websocket:
      pool:
        strategy: least_connections
        proxies: [{url: "socks5://pool-a:1080"}, {url: "socks5://pool-b:1080"}]
  exchanges:
    binance:
      http: "http://binance-proxy:8080"
      websocket:
        pool:
          strategy: random
          proxies: [{url: "socks5://de-1:1080"}]
"#;
    let broker = TestBroker::start_yaml(yaml, &[]).await;
    for exchange in ["binance", "BINANCE", "kraken"] {
        for ct in [HTTP, WS] {
            let r = broker.ask(exchange, ct).await;
            assert_direct(&r, &format!("{exchange}/{ct:?}"));
            assert_eq!(r.ttl_seconds, 300);
        }
    }
    broker.stop().await;
}

#[tokio::test]
async fn exchange_entry_then_default_entry_then_direct() {
    let yaml = r#"
proxy:
  enabled: true
  default:
    websocket: { url: "socks5://default-ws:1081", timeout_seconds: 21 }
  exchanges:
    binance:
      http: { url: "http://binance-proxy:8080", timeout_seconds: 15 }
    kraken:
      websocket: { url: "socks5://kraken-ws:1080", timeout_seconds: 16 }
"#;
    let broker = TestBroker::start_yaml(yaml, &[]).await;
    // 1. The exchange's own entry for that connection type.
    assert_embedded(
        &broker.ask("binance", HTTP).await,
        "http://binance-proxy:8080",
        "static",
        15.0,
        300,
    );
    assert_embedded(
        &broker.ask("kraken", WS).await,
        "socks5://kraken-ws:1080",
        "static",
        16.0,
        300,
    );
    // 2. The exchange has only http: websocket falls back to the default's websocket.
    assert_embedded(
        &broker.ask("binance", WS).await,
        "socks5://default-ws:1081",
        "static",
        21.0,
        300,
    );
    // 3. Neither the exchange nor the default has http: direct.
    assert_direct(&broker.ask("kraken", HTTP).await, "kraken/http");
    assert_direct(&broker.ask("unknown-exchange", HTTP).await, "unknown/http");
    assert_embedded(
        &broker.ask("unknown-exchange", WS).await,
        "socks5://default-ws:1081",
        "static",
        21.0,
        300,
    );
    broker.stop().await;
}

#[tokio::test]
async fn design_example_gives_the_four_stated_answers() {
    let broker = TestBroker::start_yaml(DESIGN_EXAMPLE, &[]).await;
    // binance/http → http://binance-proxy:8080
    assert_embedded(
        &broker.ask("binance", HTTP).await,
        "http://binance-proxy:8080",
        "static",
        15.0,
        300,
    );
    // binance/websocket → the pool's members in turn
    let first = broker.ask("binance", WS).await;
    assert_embedded(&first, "socks5://de-1:1080", "round_robin", 30.0, 300);
    assert_eq!(
        urls(&broker, "binance", WS, 3).await,
        ["socks5://nl-1:1080", "socks5://de-1:1080", "socks5://nl-1:1080"]
    );
    // kraken/websocket → the default's websocket
    assert_embedded(
        &broker.ask("kraken", WS).await,
        "socks5://proxy.example.com:1081",
        "static",
        30.0,
        300,
    );
    broker.stop().await;

    // with `enabled: false` → direct for all
    let disabled = DESIGN_EXAMPLE.replace("enabled: true", "enabled: false");
    assert_ne!(disabled, DESIGN_EXAMPLE);
    let broker = TestBroker::start_yaml(&disabled, &[]).await;
    for (exchange, ct) in [
        ("binance", HTTP),
        ("binance", WS),
        ("kraken", WS),
        ("kraken", HTTP),
    ] {
        assert_direct(&broker.ask(exchange, ct).await, &format!("{exchange}/{ct:?}"));
    }
    broker.stop().await;
}

#[tokio::test]
async fn embedded_answers_use_cache_ttl_seconds_as_their_ttl() {
    let yaml = r#"
proxy:
  enabled: true
  default:
    http: { url: "socks5://default:1080", timeout_seconds: 45 }
    websocket:
      timeout_seconds: 60
      pool:
        strategy: least_connections
        proxies: [{url: "socks5://a:1080"}]
  external_service:
    cache_ttl_seconds: 120
"#;
    let broker = TestBroker::start_yaml(yaml, &[]).await;
    assert_embedded(
        &broker.ask("kraken", HTTP).await,
        "socks5://default:1080",
        "static",
        45.0,
        120,
    );
    assert_embedded(
        &broker.ask("kraken", WS).await,
        "socks5://a:1080",
        "least_connections",
        60.0,
        120,
    );
    broker.stop().await;

    // The same TTL set from the environment.
    let broker = TestBroker::start_yaml(
        yaml,
        &[("CRYPTOFEED_PROXY_EXTERNAL_SERVICE__CACHE_TTL_SECONDS", "3600")],
    )
    .await;
    assert_eq!(broker.ask("kraken", HTTP).await.ttl_seconds, 3600);
    broker.stop().await;
}

#[tokio::test]
async fn embedded_answers_default_to_a_300_second_ttl() {
    let broker = start_env(&[
        ("CRYPTOFEED_PROXY_ENABLED", "true"),
        ("CRYPTOFEED_PROXY_DEFAULT__HTTP", "socks5://default:1080"),
    ])
    .await;
    assert_embedded(
        &broker.ask("kraken", HTTP).await,
        "socks5://default:1080",
        "static",
        30.0,
        300,
    );
    broker.stop().await;
}

// --- The shipped examples -------------------------------------------------------------------------

fn load_example(name: &str) -> BrokerConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name);
    BrokerConfig::loader(Some(&path))
        .env_vars(Vec::<(String, String)>::new())
        .load()
        .unwrap_or_else(|e| panic!("{name} must load: {e}"))
}

#[tokio::test]
async fn shipped_example_broker_yaml_loads_and_answers() {
    let config = load_example("broker.yaml");
    assert!(config.proxy.enabled);
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:50051");
    assert_eq!(config.server.shutdown_grace_seconds, 10);
    assert!(!config.proxy.external_service.enabled);
    let broker = TestBroker::start(config).await;
    assert_embedded(
        &broker.ask("binance", HTTP).await,
        "http://binance-proxy:8080",
        "static",
        15.0,
        300,
    );
    // coinbase uses `rest` with a bare string and `ws` with a least_connections pool.
    assert_embedded(
        &broker.ask("coinbase", HTTP).await,
        "http://coinbase-proxy:3128",
        "static",
        30.0,
        300,
    );
    let ws = urls(&broker, "coinbase", WS, 4).await;
    assert_eq!(
        ws,
        [
            "socks5h://us-east-1:1080",
            "socks5h://us-west-1:1080",
            "socks5h://us-east-1:1080",
            "socks5h://us-west-1:1080"
        ],
        "least_connections over the two enabled members; `spare` is disabled"
    );
    assert_eq!(
        broker.ask("kraken", HTTP).await.proxy_url,
        "socks5://proxy.example.com:1080"
    );
    broker.stop().await;
}

#[tokio::test]
async fn shipped_example_broker_upstream_yaml_loads() {
    let config = load_example("broker-upstream.yaml");
    let ext = &config.proxy.external_service;
    assert!(ext.enabled);
    assert_eq!(
        ext.endpoints,
        ["https://proxy-service-1:8080", "https://proxy-service-2:8080"]
    );
    assert_eq!(ext.auth_method, proxy_broker_core::AuthMethod::BearerToken);
    assert_eq!(
        ext.auth_credentials.get("token").map(String::as_str),
        Some("replace-me")
    );
    assert_eq!((ext.timeout_seconds, ext.cache_ttl_seconds), (10, 300));
    assert!(ext.circuit_breaker_enabled && ext.fallback_to_embedded);
    let broker = TestBroker::start(config).await;
    let effective = effective_config(&broker).await;
    assert_eq!(
        effective["proxy"]["external_service"]["auth_credentials"]["token"],
        "***"
    );
    broker.stop().await;
}

// --- Pool strategies over gRPC ------------------------------------------------------------------

fn pool_yaml(strategy: &str, members: &[(&str, f64, bool)]) -> String {
    let mut yaml = format!(
        "proxy:\n  enabled: true\n  default:\n    websocket:\n      pool:\n        strategy: {strategy}\n        proxies:\n"
    );
    for (url, weight, enabled) in members {
        yaml.push_str(&format!(
            "          - {{url: \"{url}\", weight: {weight}, enabled: {enabled}}}\n"
        ));
    }
    yaml
}

#[tokio::test]
async fn round_robin_visits_every_enabled_member_in_configured_order_and_wraps() {
    let yaml = pool_yaml(
        "round_robin",
        &[
            ("socks5://a:1080", 1.0, true),
            ("socks5://b:1080", 1.0, false),
            ("socks5://c:1080", 5.0, true),
            ("socks5://d:1080", 1.0, true),
        ],
    );
    let broker = TestBroker::start_yaml(&yaml, &[]).await;
    let first = broker.ask("kraken", WS).await;
    assert_embedded(&first, "socks5://a:1080", "round_robin", 30.0, 300);
    assert_eq!(
        urls(&broker, "kraken", WS, 6).await,
        [
            "socks5://c:1080",
            "socks5://d:1080",
            "socks5://a:1080",
            "socks5://c:1080",
            "socks5://d:1080",
            "socks5://a:1080"
        ]
    );
    broker.stop().await;
}

#[tokio::test]
async fn random_strategy_picks_members_in_proportion_to_their_weight() {
    const DRAWS: usize = 4000;
    let yaml = pool_yaml(
        "random",
        &[
            ("socks5://light:1080", 1.0, true),
            ("socks5://heavy:1080", 3.0, true),
        ],
    );
    let broker = TestBroker::start_yaml(&yaml, &[]).await;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    // kucoin has no built-in connection-attempt budget, so 4,000 draws are all answered.
    for _ in 0..DRAWS {
        let r = broker.ask("kucoin", WS).await;
        assert_eq!(r.strategy, "random");
        *counts.entry(r.proxy_url).or_default() += 1;
    }
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["socks5://heavy:1080", "socks5://light:1080"],
        "only the two members are answered"
    );
    // Expected share 3/4; binomial standard deviation sqrt(p(1-p)/n) ≈ 0.0068, so ±6σ ≈ ±0.041
    // (false failure rate ~1e-9) still tells weights 1:3 apart from 1:1 (0.5) or 1:2 (0.667).
    let p = 0.75_f64;
    let tolerance = 6.0 * (p * (1.0 - p) / DRAWS as f64).sqrt();
    assert!(tolerance < 0.05);
    let share = counts["socks5://heavy:1080"] as f64 / DRAWS as f64;
    assert!(
        (p - tolerance..=p + tolerance).contains(&share),
        "heavy share {share:.4} outside {:.3}..={:.3} ({counts:?})",
        p - tolerance,
        p + tolerance
    );
    broker.stop().await;
}

#[tokio::test]
async fn disabled_members_are_never_chosen_by_any_strategy() {
    for strategy in ["round_robin", "random", "least_connections"] {
        let yaml = pool_yaml(
            strategy,
            &[
                ("socks5://off-1:1080", 10.0, false),
                ("socks5://on-1:1080", 1.0, true),
                ("socks5://off-2:1080", 10.0, false),
                ("socks5://on-2:1080", 1.0, true),
            ],
        );
        let broker = TestBroker::start_yaml(&yaml, &[]).await;
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..300 {
            let r = broker.ask("kraken", WS).await;
            assert_eq!(r.strategy, strategy);
            *seen.entry(r.proxy_url).or_default() += 1;
        }
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            ["socks5://on-1:1080", "socks5://on-2:1080"],
            "{strategy}: {seen:?}"
        );
        broker.stop().await;
    }
}

#[tokio::test]
async fn least_connections_spreads_over_the_members_with_fewest_live_leases() {
    let yaml = pool_yaml(
        "least_connections",
        &[
            ("socks5://a:1080", 1.0, true),
            ("socks5://b:1080", 10.0, true),
            ("socks5://c:1080", 1.0, true),
        ],
    );
    let broker = TestBroker::start_yaml(&yaml, &[]).await;
    let first = broker.ask("kraken", WS).await;
    assert_embedded(&first, "socks5://a:1080", "least_connections", 30.0, 300);
    // Weights do not matter: each member gets one lease before any gets a second.
    assert_eq!(
        urls(&broker, "kraken", WS, 5).await,
        [
            "socks5://b:1080",
            "socks5://c:1080",
            "socks5://a:1080",
            "socks5://b:1080",
            "socks5://c:1080"
        ]
    );
    broker.stop().await;
}

#[tokio::test]
async fn failure_feedback_releases_a_least_connections_lease_so_that_member_is_picked_again() {
    let yaml = pool_yaml(
        "least_connections",
        &[("socks5://a:1080", 1.0, true), ("socks5://b:1080", 1.0, true)],
    );
    let broker = TestBroker::start_yaml(&yaml, &[]).await;
    assert_eq!(
        urls(&broker, "kraken", WS, 3).await,
        ["socks5://a:1080", "socks5://b:1080", "socks5://a:1080"]
    );
    // Leases: a=2, b=1. A failure on a ends one of a's leases: a=1, b=1, and ties go to a.
    report_failure(&broker, "kraken", WS, "socks5://a:1080").await;
    assert_eq!(broker.ask("kraken", WS).await.proxy_url, "socks5://a:1080");
    // a=2, b=1 → b; a=2, b=2. Two failures on b: a=2, b=0 → b twice.
    assert_eq!(broker.ask("kraken", WS).await.proxy_url, "socks5://b:1080");
    report_failure(&broker, "KRAKEN", WS, "socks5://b:1080").await;
    report_failure(&broker, "kraken", WS, "socks5://b:1080").await;
    assert_eq!(
        urls(&broker, "kraken", WS, 3).await,
        ["socks5://b:1080", "socks5://b:1080", "socks5://a:1080"]
    );
    broker.stop().await;
}

#[tokio::test]
async fn success_feedback_keeps_the_least_connections_lease() {
    let yaml = pool_yaml(
        "least_connections",
        &[("socks5://a:1080", 1.0, true), ("socks5://b:1080", 1.0, true)],
    );
    let broker = TestBroker::start_yaml(&yaml, &[]).await;
    assert_eq!(
        urls(&broker, "kraken", WS, 2).await,
        ["socks5://a:1080", "socks5://b:1080"]
    );
    // a=1, b=1. Success on b keeps its lease, so the tie still goes to a (a release would pick b).
    report_success(&broker, "kraken", WS, "socks5://b:1080").await;
    assert_eq!(broker.ask("kraken", WS).await.proxy_url, "socks5://a:1080");
    // a=2, b=1: b.
    assert_eq!(broker.ask("kraken", WS).await.proxy_url, "socks5://b:1080");
    broker.stop().await;
}

// --- Merges that lose or reject configuration (see the report) ------------------------------------

#[tokio::test]
async fn env_canonical_key_wins_over_a_yaml_alias_for_the_same_entry() {
    let yaml = r#"
proxy:
  enabled: true
  exchanges:
    binance:
      rest: "http://yaml-binance:8080"
      ws: "socks5://yaml-binance:1080"
"#;
    let config = common::load(
        Some(yaml),
        &[
            (
                "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__HTTP__URL",
                "http://env-binance:8080",
            ),
            (
                "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__WEBSOCKET__URL",
                "socks5://env-binance:1080",
            ),
        ],
    )
    .unwrap_or_else(|e| panic!("env over YAML must load: {e}"));
    let broker = TestBroker::start(config).await;
    assert_eq!(
        broker.ask("binance", HTTP).await.proxy_url,
        "http://env-binance:8080"
    );
    assert_eq!(
        broker.ask("binance", WS).await.proxy_url,
        "socks5://env-binance:1080"
    );
    broker.stop().await;
}

#[tokio::test]
async fn env_adds_to_a_yaml_bare_string_exchange_without_dropping_its_http_entry() {
    let yaml = r#"
proxy:
  enabled: true
  exchanges:
    binance: "http://yaml-binance:8080"
"#;
    let broker = TestBroker::start_yaml(
        yaml,
        &[(
            "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__WEBSOCKET__URL",
            "socks5://env-binance:1080",
        )],
    )
    .await;
    assert_eq!(
        broker.ask("binance", WS).await.proxy_url,
        "socks5://env-binance:1080"
    );
    assert_eq!(
        broker.ask("binance", HTTP).await.proxy_url,
        "http://yaml-binance:8080"
    );
    broker.stop().await;
}

#[tokio::test]
async fn env_timeout_refines_a_yaml_bare_string_proxy_config() {
    let yaml = r#"
proxy:
  enabled: true
  exchanges:
    binance:
      http: "http://yaml-binance:8080"
"#;
    let config = common::load(
        Some(yaml),
        &[("CRYPTOFEED_PROXY_EXCHANGES__BINANCE__HTTP__TIMEOUT_SECONDS", "5")],
    )
    .unwrap_or_else(|e| panic!("env over YAML must load: {e}"));
    let broker = TestBroker::start(config).await;
    assert_embedded(
        &broker.ask("binance", HTTP).await,
        "http://yaml-binance:8080",
        "static",
        5.0,
        300,
    );
    broker.stop().await;
}

#[tokio::test]
async fn env_json_exchange_ids_merge_case_insensitively_with_yaml() {
    let yaml = r#"
proxy:
  enabled: true
  exchanges:
    binance:
      websocket: "socks5://yaml-binance:1080"
"#;
    let config = common::load(
        Some(yaml),
        &[(
            "CRYPTOFEED_PROXY_EXCHANGES",
            r#"{"Binance": {"http": "http://env-binance:8080"}}"#,
        )],
    )
    .unwrap_or_else(|e| panic!("env over YAML must load: {e}"));
    let broker = TestBroker::start(config).await;
    assert_eq!(
        broker.ask("binance", HTTP).await.proxy_url,
        "http://env-binance:8080"
    );
    assert_eq!(
        broker.ask("binance", WS).await.proxy_url,
        "socks5://yaml-binance:1080"
    );
    broker.stop().await;
}

#[tokio::test]
async fn answered_proxy_urls_never_carry_surrounding_whitespace() {
    let env = [
        ("CRYPTOFEED_PROXY_ENABLED", "true"),
        ("CRYPTOFEED_PROXY_DEFAULT__HTTP__URL", "  http://p:3128  "),
    ];
    // Either the configuration is rejected, or the answer is the trimmed URL.
    if let Ok(config) = common::load(None, &env) {
        let broker = TestBroker::start(config).await;
        assert_eq!(broker.ask("kraken", HTTP).await.proxy_url, "http://p:3128");
        broker.stop().await;
    }
}
