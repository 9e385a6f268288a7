//! Secrets never leak: the real binary at `RUST_LOG=debug` (text, and JSON logs), with server
//! tokens, upstream credentials and proxy passwords in play on every path that talks about them
//! (upstream answers, failing and unreachable endpoints, invalid answers, feedback and ejection,
//! rejected reloads, wrong client tokens). Every secret contains `S3CR3T`; none may appear in the
//! log, in gRPC error messages, in admin output or in the metrics.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::ops::{
    BrokerProcess, ConfigDir, Exposition, PROMPT, Reply, Upstream, bearer, eventually, scrape, write_atomic,
};
use proxy_broker::pb::proxy_broker_admin_client::ProxyBrokerAdminClient;
use proxy_broker::pb::proxy_broker_client::ProxyBrokerClient;
use proxy_broker::pb::{
    ConnectionType, GetEffectiveConfigRequest, ListCacheRequest, ListUpstreamsRequest, ProxyFeedback,
    ProxyRequest, ProxySource,
};
use tonic::transport::Channel;

const MARK: &str = "S3CR3T";
const SERVER_TOKEN: &str = "srvtok-S3CR3T-a1";
const FILE_TOKEN: &str = "srvtok-S3CR3T-f2";
const UPSTREAM_TOKEN: &str = "uptok-S3CR3T-b3";
const API_KEY: &str = "apikey-S3CR3T-c4";
const WRONG_TOKEN: &str = "wrongtok-S3CR3T-j0";

fn embedded_proxy() -> String {
    "socks5://embuser:embpw-S3CR3T-d5@emb-proxy:1080".into()
}

fn upstream_proxy(exchange: &str) -> String {
    format!("socks5://upuser:uppw-S3CR3T-e6@{exchange}-proxy:1080")
}

/// How one run is set up.
struct Scenario {
    json_logs: bool,
    auth_method: &'static str,
    fallback_to_embedded: bool,
}

fn config_yaml(
    scenario: &Scenario,
    tokens_file: &std::path::Path,
    endpoints: &[String],
    embedded: &str,
) -> String {
    format!(
        r#"
server:
  auth_tokens: ["{SERVER_TOKEN}"]
  auth_tokens_file: "{tokens}"
proxy:
  enabled: true
  default:
    http: "{embedded}"
  external_service:
    enabled: true
    endpoints: {endpoints:?}
    auth_method: {method}
    auth_credentials: {{ token: "{UPSTREAM_TOKEN}", api_key: "{API_KEY}" }}
    fallback_to_embedded: {fallback}
    eject_after_failures: 2
    failure_threshold: 100
"#,
        tokens = tokens_file.display(),
        method = scenario.auth_method,
        fallback = scenario.fallback_to_embedded,
    )
}

fn lookup(exchange: &str) -> ProxyRequest {
    ProxyRequest {
        exchange_id: exchange.into(),
        connection_type: ConnectionType::Http.into(),
        ..Default::default()
    }
}

/// User names in proxy and endpoint URLs: secrets too (providers put API keys there).
const USERS: &[&str] = &["embuser", "upuser", "deaduser", "failuser"];

#[track_caller]
fn assert_clean(what: &str, text: &str) {
    let found = std::iter::once(MARK)
        .chain(USERS.iter().copied())
        .find_map(|secret| text.find(secret));
    if let Some(at) = found {
        let start = text[..at].char_indices().rev().nth(120).map_or(0, |(i, _)| i);
        let end = (at + 80).min(text.len());
        panic!(
            "a secret leaked into {what}: ...{}...",
            text.get(start..end).unwrap_or(text)
        );
    }
}

async fn run(scenario: Scenario) {
    // Upstreams: one that answers (with a password in the proxy URL, or an invalid answer), one
    // that fails with 500, and one that is not there at all. Both failing ones carry credentials
    // in their URL.
    let good = Upstream::start_with(Arc::new(|body: &serde_json::Value| {
        match body["exchange_id"].as_str().unwrap_or_default() {
            "badanswer" => Reply {
                status: 200,
                body: r#"{"proxy_url":"ftp://upuser:badpw-S3CR3T-h8@h:21","strategy":"s"}"#.into(),
                delay: Duration::ZERO,
            },
            exchange => Reply::answer(&upstream_proxy(exchange)),
        }
    }))
    .await;
    let failing = Upstream::start_with(Arc::new(|_: &serde_json::Value| Reply::status(500))).await;
    let dead_port = common::ops::free_ports().0;
    let endpoints = vec![
        format!("http://deaduser:deadpw-S3CR3T-k1@127.0.0.1:{dead_port}"),
        format!("http://failuser:failpw-S3CR3T-g7@{}", failing.addr),
        good.url(),
    ];
    let config = ConfigDir::new("");
    let tokens = config.file("tokens", &format!("# feeds\n{FILE_TOKEN}\n"));
    write_atomic(
        &config.path,
        &config_yaml(&scenario, &tokens, &endpoints, &embedded_proxy()),
    );

    let mut env = vec![("RUST_LOG", "debug")];
    if scenario.json_logs {
        env.push(("PROXY_BROKER_LOG_FORMAT", "json"));
    }
    let mut process = BrokerProcess::spawn(Some(&config.path), &env);
    let channel: Channel = process.wait_serving().await;
    let mut client = ProxyBrokerClient::new(channel.clone());
    let mut admin = ProxyBrokerAdminClient::new(channel.clone());
    let mut errors = Vec::new();

    // A wrong client token.
    let status = client
        .request_proxy(bearer(lookup("binance"), WRONG_TOKEN))
        .await
        .unwrap_err();
    errors.push(status.message().to_owned());

    // An upstream answer after two failing endpoints; then a cache hit.
    let answer = client
        .request_proxy(bearer(lookup("binance"), SERVER_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.source(), ProxySource::Upstream);
    // The feed itself gets the password: it has to use the proxy.
    assert_eq!(answer.proxy_url, upstream_proxy("binance"));
    let cached = client
        .request_proxy(bearer(lookup("binance"), FILE_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.source(), ProxySource::Cache);

    // Every endpoint fails, one with an invalid answer that holds a password.
    match client
        .request_proxy(bearer(lookup("badanswer"), SERVER_TOKEN))
        .await
    {
        Ok(answer) => {
            assert!(scenario.fallback_to_embedded);
            assert_eq!(answer.get_ref().source(), ProxySource::Embedded);
            assert_eq!(answer.get_ref().proxy_url, embedded_proxy());
        }
        Err(status) => {
            assert!(!scenario.fallback_to_embedded, "{status:?}");
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(status.message().contains("invalid answer"), "{status:?}");
            assert!(status.message().contains("ftp://***@h:21"), "{status:?}");
            errors.push(status.message().to_owned());
        }
    }

    // Feedback naming the proxy (with its password): two failures eject it.
    for _ in 0..2 {
        client
            .report_feedback(bearer(
                ProxyFeedback {
                    proxy_url: upstream_proxy("binance"),
                    exchange_id: "binance".into(),
                    connection_type: ConnectionType::Http.into(),
                    success: false,
                    error_details: Some("connect refused".into()),
                    ..Default::default()
                },
                SERVER_TOKEN,
            ))
            .await
            .unwrap();
    }
    eventually("the feedback forwarded upstream", PROMPT, || async {
        (good.feedback_done().len() + failing.feedback_done().len() >= 2).then_some(())
    })
    .await;
    // Cache it again for ListCache.
    client
        .request_proxy(bearer(lookup("kraken"), SERVER_TOKEN))
        .await
        .unwrap();

    // A feedback report that breaks a rule, with a password in the URL.
    let status = client
        .report_feedback(bearer(
            ProxyFeedback {
                proxy_url: "gopher://upuser:gopherpw-S3CR3T-m2@h:70".into(),
                exchange_id: "binance".into(),
                connection_type: ConnectionType::Http.into(),
                success: false,
                ..Default::default()
            },
            SERVER_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    errors.push(status.message().to_owned());

    // Rejected reloads: a password in an invalid proxy URL, and a token where a list belongs.
    write_atomic(
        &config.path,
        &config_yaml(
            &scenario,
            &tokens,
            &endpoints,
            "ftp://embuser:rldpw-S3CR3T-i9@h:21",
        ),
    );
    eventually("the first rejected reload", PROMPT, || async {
        let metrics = Exposition::parse(&scrape(process.metrics_addr).await);
        (metrics.value("proxy_broker_config_reloads_total", &[("result", "failure")]) >= 1.0).then_some(())
    })
    .await;
    write_atomic(
        &config.path,
        &config_yaml(&scenario, &tokens, &endpoints, &embedded_proxy()).replace(
            &format!(r#"auth_tokens: ["{SERVER_TOKEN}"]"#),
            &format!(r#"auth_tokens: {{ first: "{SERVER_TOKEN}" }}"#),
        ),
    );
    eventually("the second rejected reload", PROMPT, || async {
        let metrics = Exposition::parse(&scrape(process.metrics_addr).await);
        (metrics.value("proxy_broker_config_reloads_total", &[("result", "failure")]) >= 2.0).then_some(())
    })
    .await;

    // Admin output.
    let config_json = admin
        .get_effective_config(bearer(GetEffectiveConfigRequest {}, SERVER_TOKEN))
        .await
        .unwrap()
        .into_inner()
        .config_json;
    assert!(config_json.contains("socks5://***@emb-proxy"), "{config_json}");
    assert!(
        config_json.contains(&format!("http://***@127.0.0.1:{dead_port}")),
        "{config_json}"
    );
    assert_clean("GetEffectiveConfig", &config_json);
    let cache = format!(
        "{:?}",
        admin
            .list_cache(bearer(ListCacheRequest::default(), SERVER_TOKEN))
            .await
            .unwrap()
            .into_inner()
    );
    assert!(cache.contains("***@kraken-proxy"), "{cache}");
    assert_clean("ListCache", &cache);
    let upstreams = admin
        .list_upstreams(bearer(ListUpstreamsRequest {}, SERVER_TOKEN))
        .await
        .unwrap()
        .into_inner();
    let last_errors: Vec<_> = upstreams
        .upstreams
        .iter()
        .map(|u| u.last_error.as_str())
        .collect();
    assert!(
        last_errors.iter().all(|e| !e.is_empty()),
        "every endpoint failed once: {last_errors:?}"
    );
    assert_clean("ListUpstreams", &format!("{upstreams:?}"));

    let metrics = scrape(process.metrics_addr).await;
    assert!(
        metrics.contains(&format!("http://***@{}", failing.addr)),
        "endpoints are labels:\n{metrics}"
    );
    assert_clean("the metrics", &metrics);
    for error in &errors {
        assert_clean("a gRPC error message", error);
    }

    // The upstream really got the credentials (they were in play).
    let auth = good.requests()[0].headers.clone();
    match scenario.auth_method {
        "bearer_token" => assert_eq!(
            auth.get("authorization").and_then(|v| v.to_str().ok()),
            Some(format!("Bearer {UPSTREAM_TOKEN}").as_str())
        ),
        _ => assert_eq!(auth.get("x-api-key").and_then(|v| v.to_str().ok()), Some(API_KEY)),
    }

    let (status, log) = process.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    // The log did talk about everything above, just without the secrets.
    for expected in [
        "upstream failed",
        "HTTP 500",
        "Connection refused",
        "invalid answer",
        "proxy ejected",
        "configuration reload rejected",
        "proxy.default.http.url",
        "server.auth_tokens",
    ] {
        assert!(log.contains(expected), "the log mentions {expected:?}:\n{log}");
    }
    assert!(
        log.contains("***@h:21"),
        "the rejected URL is shown redacted:\n{log}"
    );
    assert!(
        log.contains(&format!("***@127.0.0.1:{dead_port}")),
        "endpoints are shown redacted:\n{log}"
    );
    assert!(
        log.contains("***@binance-proxy:1080"),
        "the ejected proxy is shown redacted:\n{log}"
    );
    assert!(log.contains("DEBUG"), "debug logging is on:\n{log}");
    assert_clean("the log", &log);
    if scenario.json_logs {
        let mut lines = 0;
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(
                value.get("level").is_some() && value.get("fields").is_some(),
                "a JSON log record: {line}"
            );
            lines += 1;
        }
        assert!(lines > 10, "{lines} JSON lines");
    }
}

#[tokio::test]
async fn no_secret_reaches_debug_text_logs_errors_admin_output_or_metrics() {
    run(Scenario {
        json_logs: false,
        auth_method: "bearer_token",
        fallback_to_embedded: true,
    })
    .await;
}

#[tokio::test]
async fn no_secret_reaches_debug_json_logs_errors_admin_output_or_metrics() {
    run(Scenario {
        json_logs: true,
        auth_method: "api_key",
        fallback_to_embedded: false,
    })
    .await;
}
