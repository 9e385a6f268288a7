//! Prometheus metrics: real traffic (embedded, direct, invalid, upstream, cache, coalesced,
//! feedback, ejection, breaker trips, reloads) against a loopback upstream, then `GET /metrics`
//! scraped over HTTP and parsed, every metric of the contract checked by name, labels and value.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::ops::{
    ConfigDir, Exposition, LocalBroker, PROMPT, Reply, Upstream, dead_endpoint, eventually, proxy_for, scrape,
};
use proxy_broker::BrokerConfig;
use proxy_broker::pb::{ConnectionType, ListUpstreamsRequest, ProxyFeedback, ProxyRequest, ProxySource};
use tonic::Code;

/// Every metric family of the contract and its type.
const FAMILIES: &[(&str, &str)] = &[
    ("proxy_broker_requests", "counter"),
    ("proxy_broker_request_duration_seconds", "histogram"),
    ("proxy_broker_upstream_requests", "counter"),
    ("proxy_broker_upstream_duration_seconds", "histogram"),
    ("proxy_broker_circuit_state", "gauge"),
    ("proxy_broker_cache_entries", "gauge"),
    ("proxy_broker_cache_hits", "counter"),
    ("proxy_broker_coalesced", "counter"),
    ("proxy_broker_feedback", "counter"),
    ("proxy_broker_feedback_dropped", "counter"),
    ("proxy_broker_ejections", "counter"),
    ("proxy_broker_config_reloads", "counter"),
];

#[track_caller]
fn assert_every_family_declared(metrics: &Exposition) {
    for (family, kind) in FAMILIES {
        assert_eq!(
            metrics.types.get(*family).map(String::as_str),
            Some(*kind),
            "# TYPE {family} {kind} is missing:\n{}",
            metrics.text
        );
    }
}

fn request(exchange: &str, connection_type: ConnectionType) -> ProxyRequest {
    ProxyRequest {
        exchange_id: exchange.into(),
        connection_type: connection_type.into(),
        ..Default::default()
    }
}

fn feedback(proxy_url: &str, exchange: &str, success: bool) -> ProxyFeedback {
    ProxyFeedback {
        proxy_url: proxy_url.into(),
        exchange_id: exchange.into(),
        connection_type: ConnectionType::Http.into(),
        success,
        ..Default::default()
    }
}

/// Delegation to `endpoints` (in order), an embedded default for HTTP only (so WebSocket falls
/// back to DIRECT), breakers that open after two failures.
fn delegating_yaml(endpoints: &[String], extra_exchange: &str) -> String {
    format!(
        r#"
server:
  listen: "127.0.0.1:0"
  metrics_listen: "127.0.0.1:0"
proxy:
  enabled: true
  default:
    http: "socks5://embedded-default:1080"
  exchanges:
    {extra_exchange}: {{ http: "socks5://override:1080" }}
  external_service:
    enabled: true
    endpoints: {endpoints:?}
    auth_credentials: {{ token: "upstream-token" }}
    failure_threshold: 2
    eject_after_failures: 3
"#
    )
}

#[tokio::test]
async fn metrics_after_real_traffic_report_every_source_outcome_breaker_cache_feedback_and_reload() {
    let upstream = Upstream::start_with(Arc::new(|body: &serde_json::Value| {
        let exchange = body["exchange_id"].as_str().unwrap_or_default();
        if exchange.starts_with("fail-") {
            Reply::status(503)
        } else if exchange == "slowex" {
            // Slow enough that concurrent callers join the one in-flight lookup.
            Reply::answer(&proxy_for(exchange)).after(Duration::from_millis(800))
        } else {
            Reply::answer(&proxy_for(exchange))
        }
    }))
    .await;
    let dead = dead_endpoint();
    let good = upstream.url();
    let config = ConfigDir::new(&delegating_yaml(&[dead.clone(), good.clone()], "bitstamp"));
    let broker = LocalBroker::start(BrokerConfig::load(Some(&config.path)).unwrap()).await;
    let mut client = broker.client();

    // 1. An invalid request (no connection type).
    let status = client
        .request_proxy(request("binance", ConnectionType::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // 2. Upstream (the dead endpoint fails first: failure 1 of 2), then the same key from cache.
    let first = client
        .request_proxy(request("binance", ConnectionType::Http))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (first.source(), first.upstream_endpoint.as_str()),
        (ProxySource::Upstream, good.as_str())
    );
    let again = client
        .request_proxy(request("binance", ConnectionType::Http))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.source(), ProxySource::Cache);

    // 3. Five concurrent lookups of one key against a slow upstream: one upstream call. The dead
    //    endpoint fails for the leader (failure 2 of 2): its breaker opens.
    let leader = {
        let mut c = broker.client();
        tokio::spawn(async move { c.request_proxy(request("slowex", ConnectionType::Http)).await })
    };
    eventually("the slow lookup to reach the upstream", PROMPT, || async {
        (upstream.requests_for("slowex") == 1).then_some(())
    })
    .await;
    let followers: Vec<_> = (0..4)
        .map(|_| {
            let mut c = broker.client();
            tokio::spawn(async move { c.request_proxy(request("slowex", ConnectionType::Http)).await })
        })
        .collect();
    for call in std::iter::once(leader).chain(followers) {
        let answer = call.await.unwrap().unwrap().into_inner();
        assert_eq!(answer.proxy_url, proxy_for("slowex"));
        assert_eq!(answer.source(), ProxySource::Upstream);
    }
    assert_eq!(upstream.requests_for("slowex"), 1, "the lookups were coalesced");

    // 4. Every upstream fails → embedded fallback (HTTP has a default) ...
    let embedded = client
        .request_proxy(request("fail-embedded", ConnectionType::Http))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(embedded.source(), ProxySource::Embedded);
    // ... a success in between keeps the good endpoint's breaker closed ...
    let kraken = client
        .request_proxy(request("kraken", ConnectionType::Http))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kraken.source(), ProxySource::Upstream);
    // ... and DIRECT when the embedded configuration names no proxy (no WebSocket default).
    let direct = client
        .request_proxy(request("fail-direct", ConnectionType::Websocket))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(direct.source(), ProxySource::Direct);

    // 5. Feedback: one success, three failures for binance's proxy → ejected for binance.
    client
        .report_feedback(feedback(&proxy_for("kraken"), "kraken", true))
        .await
        .unwrap();
    for _ in 0..3 {
        client
            .report_feedback(feedback(&proxy_for("binance"), "binance", false))
            .await
            .unwrap();
    }
    eventually("four feedback reports delivered upstream", PROMPT, || async {
        (upstream.feedback_done().len() == 4).then_some(())
    })
    .await;

    // 6. Reloads: a valid embedded-only change, then an invalid file.
    common::ops::write_atomic(
        &config.path,
        &delegating_yaml(&[dead.clone(), good.clone()], "gemini"),
    );
    assert!(proxy_broker::reload::reload_now(&broker.broker, &config.path));
    common::ops::write_atomic(
        &config.path,
        &delegating_yaml(&[dead.clone(), good.clone()], "gemini").replace(
            r#"http: "socks5://override:1080""#,
            r#"http: { url: "socks5://override:1080", timeout_seconds: 0 }"#,
        ),
    );
    assert!(!proxy_broker::reload::reload_now(&broker.broker, &config.path));

    // --- Scrape and check --------------------------------------------------------------------
    let metrics = broker.scrape().await;
    assert!(
        metrics.text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    assert_every_family_declared(&metrics);
    assert!(
        !metrics.text.contains("secretpw") && !metrics.text.contains("upstream-token"),
        "a secret leaked into the metrics:\n{}",
        metrics.text
    );

    // Requests by source (lower case), connection type and code.
    let requests = "proxy_broker_requests_total";
    for (source, connection_type, code, want) in [
        ("upstream", "http", "ok", 7.0), // binance, 5 × slowex, kraken
        ("cache", "http", "ok", 1.0),
        ("embedded", "http", "ok", 1.0),
        ("direct", "websocket", "ok", 1.0),
        ("none", "invalid", "invalid_argument", 1.0),
    ] {
        assert_eq!(
            metrics.value(
                requests,
                &[
                    ("source", source),
                    ("connection_type", connection_type),
                    ("code", code)
                ]
            ),
            want,
            "{requests}{{source={source},connection_type={connection_type},code={code}}}"
        );
    }
    assert_eq!(
        metrics.sum(requests, &[]),
        11.0,
        "{:?}",
        metrics.matching(requests, &[])
    );
    for sample in metrics.matching(requests, &[]) {
        let keys: Vec<_> = sample.labels.keys().map(String::as_str).collect();
        assert_eq!(keys, ["code", "connection_type", "source"]);
        assert_eq!(sample.labels["source"], sample.labels["source"].to_lowercase());
    }
    assert_eq!(
        metrics.histogram_count("proxy_broker_request_duration_seconds", &[]),
        11.0
    );

    // Upstream calls by endpoint and outcome; durations per endpoint (none for skipped calls).
    let upstream_requests = "proxy_broker_upstream_requests_total";
    for (endpoint, outcome, want) in [
        (dead.as_str(), "error", 2.0),
        (dead.as_str(), "circuit_open", 3.0),
        (good.as_str(), "success", 3.0),
        (good.as_str(), "error", 2.0),
    ] {
        assert_eq!(
            metrics.value(upstream_requests, &[("endpoint", endpoint), ("outcome", outcome)]),
            want,
            "{upstream_requests}{{endpoint={endpoint},outcome={outcome}}}"
        );
    }
    assert_eq!(metrics.sum(upstream_requests, &[]), 10.0);
    let duration = "proxy_broker_upstream_duration_seconds";
    assert_eq!(metrics.histogram_count(duration, &[("endpoint", &dead)]), 2.0);
    assert_eq!(metrics.histogram_count(duration, &[("endpoint", &good)]), 5.0);
    assert!(
        metrics.value(&format!("{duration}_sum"), &[("endpoint", &good)]) >= 0.8,
        "the slow upstream's 800 ms are in the sum"
    );

    // Breakers: the dead endpoint open (1), the good one closed (0).
    assert_eq!(
        metrics.value("proxy_broker_circuit_state", &[("endpoint", &dead)]),
        1.0
    );
    assert_eq!(
        metrics.value("proxy_broker_circuit_state", &[("endpoint", &good)]),
        0.0
    );

    // Cache: binance, slowex and kraken were cached (the ejection is binance's proxy's state for
    // binance: the entry stays, and is not handed out for binance).
    assert_eq!(metrics.value("proxy_broker_cache_entries", &[]), 3.0);
    assert_eq!(metrics.value("proxy_broker_cache_hits_total", &[]), 1.0);
    assert_eq!(metrics.value("proxy_broker_coalesced_total", &[]), 4.0);

    // Feedback, drops, ejections.
    assert_eq!(
        metrics.value("proxy_broker_feedback_total", &[("success", "true")]),
        1.0
    );
    assert_eq!(
        metrics.value("proxy_broker_feedback_total", &[("success", "false")]),
        3.0
    );
    assert_eq!(metrics.value("proxy_broker_feedback_dropped_total", &[]), 0.0);
    assert_eq!(metrics.value("proxy_broker_ejections_total", &[]), 1.0);

    // Reloads by result.
    assert_eq!(
        metrics.value("proxy_broker_config_reloads_total", &[("result", "success")]),
        1.0
    );
    assert_eq!(
        metrics.value("proxy_broker_config_reloads_total", &[("result", "failure")]),
        1.0
    );

    broker.stop().await;
}

#[tokio::test]
async fn feedback_overflowing_the_queue_is_counted_as_dropped() {
    let upstream = Upstream::start().await;
    let config = ConfigDir::new(&delegating_yaml(&[upstream.url()], "bitstamp").replace(
        "eject_after_failures: 3",
        "eject_after_failures: 3\n    feedback_queue_size: 1",
    ));
    let broker = LocalBroker::start(BrokerConfig::load(Some(&config.path)).unwrap()).await;
    let mut client = broker.client();
    upstream.hold();
    // The worker delivers up to 16 reports at once; with all 16 held upstream, it stops taking
    // reports from the queue (capacity 1).
    for i in 0..16 {
        client
            .report_feedback(feedback("", &format!("ex{i}"), true))
            .await
            .unwrap();
    }
    eventually("16 deliveries in flight", PROMPT, || async {
        (upstream.feedback_started().len() == 16).then_some(())
    })
    .await;
    // Four more into a queue of one: the three oldest are overwritten.
    for i in 16..20 {
        client
            .report_feedback(feedback("", &format!("ex{i}"), true))
            .await
            .unwrap();
    }
    upstream.release();
    let metrics = eventually("the drop to be counted", PROMPT, || async {
        let m = broker.scrape().await;
        (m.value("proxy_broker_feedback_dropped_total", &[]) > 0.0).then_some(m)
    })
    .await;
    assert_eq!(metrics.value("proxy_broker_feedback_dropped_total", &[]), 3.0);
    assert_eq!(
        metrics.value("proxy_broker_feedback_total", &[("success", "true")]),
        20.0
    );
    eventually("the surviving reports delivered", PROMPT, || async {
        (upstream.feedback_done().len() == 17).then_some(())
    })
    .await;
    let delivered: Vec<_> = upstream
        .feedback_done()
        .iter()
        .map(|s| s.body["exchange_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        delivered.contains(&"ex19".to_owned()),
        "the newest report survives: {delivered:?}"
    );
    for lost in ["ex16", "ex17", "ex18"] {
        assert!(
            !delivered.contains(&lost.to_owned()),
            "{lost} was dropped: {delivered:?}"
        );
    }
    let stats = broker
        .admin()
        .list_upstreams(ListUpstreamsRequest {})
        .await
        .unwrap()
        .into_inner()
        .feedback
        .unwrap();
    assert_eq!((stats.dropped, stats.enqueued), (3, 20));
    broker.stop().await;
}

#[tokio::test]
async fn binary_serves_parseable_metrics_on_metrics_listen() {
    let mut process = common::ops::BrokerProcess::spawn(
        Some(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/broker.yaml"
        ))),
        &[],
    );
    let channel = process.wait_serving().await;
    let mut client = proxy_broker::pb::proxy_broker_client::ProxyBrokerClient::new(channel);
    for _ in 0..2 {
        let answer = client
            .request_proxy(request("binance", ConnectionType::Http))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.source(), ProxySource::Embedded);
    }
    let answer = client
        .request_proxy(request("kraken", ConnectionType::Websocket))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.source(), ProxySource::Embedded);
    client
        .request_proxy(request("", ConnectionType::Http))
        .await
        .unwrap_err();

    let metrics = Exposition::parse(&scrape(process.metrics_addr).await);
    // Families whose series are per upstream endpoint have none without delegation (the
    // exposition leaves them out); every other family is there from the start.
    const PER_ENDPOINT: &[&str] = &[
        "proxy_broker_upstream_requests",
        "proxy_broker_upstream_duration_seconds",
        "proxy_broker_circuit_state",
    ];
    for (family, kind) in FAMILIES {
        let declared = metrics.types.get(*family).map(String::as_str);
        if PER_ENDPOINT.contains(family) {
            assert_eq!(declared, None, "{family} without endpoints:\n{}", metrics.text);
        } else {
            assert_eq!(declared, Some(*kind), "{family}:\n{}", metrics.text);
        }
    }
    // Known label values start at 0, so the first failure is an increase.
    for (name, labels) in [
        ("proxy_broker_config_reloads_total", [("result", "success")]),
        ("proxy_broker_config_reloads_total", [("result", "failure")]),
        ("proxy_broker_feedback_total", [("success", "true")]),
        ("proxy_broker_feedback_total", [("success", "false")]),
    ] {
        assert_eq!(metrics.value(name, &labels), 0.0, "{name}{labels:?}");
    }
    for name in [
        "proxy_broker_cache_hits_total",
        "proxy_broker_coalesced_total",
        "proxy_broker_feedback_dropped_total",
        "proxy_broker_ejections_total",
    ] {
        assert_eq!(metrics.value(name, &[]), 0.0, "{name}");
    }
    let requests = "proxy_broker_requests_total";
    assert_eq!(
        metrics.value(
            requests,
            &[
                ("source", "embedded"),
                ("connection_type", "http"),
                ("code", "ok")
            ]
        ),
        2.0
    );
    assert_eq!(
        metrics.value(
            requests,
            &[
                ("source", "embedded"),
                ("connection_type", "websocket"),
                ("code", "ok")
            ]
        ),
        1.0
    );
    assert_eq!(
        metrics.value(
            requests,
            &[
                ("source", "none"),
                ("connection_type", "http"),
                ("code", "invalid_argument")
            ]
        ),
        1.0
    );
    assert_eq!(
        metrics.histogram_count("proxy_broker_request_duration_seconds", &[]),
        4.0
    );
    // No delegation: nothing upstream, nothing cached.
    assert_eq!(metrics.value("proxy_broker_cache_entries", &[]), 0.0);
    assert!(
        metrics
            .matching("proxy_broker_upstream_requests_total", &[])
            .is_empty()
    );

    // Only GET /metrics is served.
    let other = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{}/", process.metrics_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);

    let (status, log) = process.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("serving Prometheus metrics"),
        "the log names the metrics endpoint:\n{log}"
    );
}
