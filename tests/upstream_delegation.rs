//! Upstream delegation over real sockets: the request sent upstream, failover and every failure
//! kind, per-endpoint circuit breakers, the answer cache (hits, key, expiry, coalescing,
//! stale-if-error), fallback, and the admin RPCs. The upstreams are scriptable HTTP servers on
//! 127.0.0.1:0; cache and breaker time is a ManualClock the tests move forward.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/upstream.rs"]
mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestBroker;
use proxy_broker::clock::ManualClock;
use proxy_broker::pb::invalidate_cache_request::Target;
use proxy_broker::pb::{
    BreakerState, ConnectionType, FallbackPolicy, GetEffectiveConfigRequest, InvalidateCacheRequest,
    ListCacheRequest, ProxyResponse, ProxySource,
};
use serde_json::{Value, json};
use tonic::Code;
use upstream::{Reply, Upstream, list_cache, list_upstreams, metadata_field, request, upstream_status};

const HTTP: ConnectionType = ConnectionType::Http;
const WS: ConnectionType = ConnectionType::Websocket;

fn urls<'a>(endpoints: &[&'a Upstream]) -> Vec<&'a str> {
    endpoints.iter().map(|u| u.url.as_str()).collect()
}

async fn broker(endpoints: &[&Upstream], settings: &str, embedded: &str) -> TestBroker {
    TestBroker::start(upstream::config(&urls(endpoints), settings, embedded)).await
}

async fn broker_with_clock(
    endpoints: &[&Upstream],
    settings: &str,
    embedded: &str,
) -> (TestBroker, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let config = upstream::config(&urls(endpoints), settings, embedded);
    (TestBroker::start_with_clock(config, clock.clone()).await, clock)
}

async fn ask(b: &TestBroker, exchange: &str, ct: ConnectionType, region: Option<&str>) -> ProxyResponse {
    b.client()
        .request_proxy(request(exchange, ct, region))
        .await
        .unwrap_or_else(|s| panic!("RequestProxy {exchange}: {s:?}"))
        .into_inner()
}

async fn ask_status(b: &TestBroker, exchange: &str, ct: ConnectionType) -> tonic::Status {
    match b.client().request_proxy(request(exchange, ct, None)).await {
        Ok(r) => panic!("expected an error, got {:?}", r.into_inner()),
        Err(s) => s,
    }
}

fn answer(proxy_url: &str, ttl: Option<u64>) -> Reply {
    let mut body = json!({"proxy_url": proxy_url, "strategy": "geo"});
    if let Some(ttl) = ttl {
        body["ttl_seconds"] = ttl.into();
    }
    Reply::ok(body)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// --- What is sent upstream ------------------------------------------------------------------

#[tokio::test]
async fn request_body_carries_exchange_connection_type_region_client_id_and_metadata() {
    let up = Upstream::start().await;
    let b = broker(&[&up], "", "").await;

    let mut req = request("binance", HTTP, Some("eu-west"));
    req.client_id = "cryptofeed-host1-4242".into();
    req.metadata = Some(proxy_broker::json::json_to_struct(
        json!({"feed": "trades", "depth": 3, "tags": ["a", "b"]})
            .as_object()
            .unwrap(),
    ));
    let r = b.client().request_proxy(req).await.unwrap().into_inner();
    assert_eq!(r.source(), ProxySource::Upstream);
    assert_eq!(r.proxy_url, up.proxy_url());

    // Without region, client id or metadata: region null, the broker's own id, an empty object.
    let r = ask(&b, "kraken", WS, None).await;
    assert_eq!(r.source(), ProxySource::Upstream);

    let sent = up.requests();
    assert_eq!(sent.len(), 2);
    for s in &sent {
        assert_eq!(s.path, upstream::REQUEST_PATH);
        assert!(s.header("content-type").starts_with("application/json"), "{s:?}");
        let keys: Vec<&String> = s.body.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "client_id",
                "connection_type",
                "exchange_id",
                "metadata",
                "region"
            ],
            "exactly the design's ProxyRequest fields"
        );
    }
    let first = &sent[0].body;
    assert_eq!(first["exchange_id"], "binance");
    assert_eq!(first["connection_type"], "http");
    assert_eq!(first["region"], "eu-west");
    assert_eq!(first["client_id"], "cryptofeed-host1-4242");
    assert_eq!(first["metadata"]["feed"], "trades");
    assert_eq!(first["metadata"]["depth"].as_f64(), Some(3.0));
    assert_eq!(first["metadata"]["tags"], json!(["a", "b"]));

    let second = &sent[1].body;
    assert_eq!(second["exchange_id"], "kraken");
    assert_eq!(second["connection_type"], "websocket");
    assert_eq!(second["region"], Value::Null);
    assert_eq!(second["metadata"], json!({}));
    let own_id = format!(
        "proxy-broker-{}-{}",
        gethostname::gethostname().to_string_lossy(),
        std::process::id()
    );
    assert_eq!(second["client_id"], own_id.as_str());
}

#[tokio::test]
async fn empty_region_is_sent_as_null() {
    let up = Upstream::start().await;
    let b = broker(&[&up], "", "").await;
    ask(&b, "binance", HTTP, Some("")).await;
    assert_eq!(up.requests()[0].body["region"], Value::Null);
}

// --- Failover and failure kinds ---------------------------------------------------------------

#[tokio::test]
async fn failover_tries_endpoints_in_configured_order() {
    let first = Upstream::start().await;
    let second = Upstream::start().await;
    first.default_request(Reply::Status(500));
    let b = broker(&[&first, &second], "", "").await;

    let r = ask(&b, "binance", HTTP, None).await;
    assert_eq!(r.source(), ProxySource::Upstream);
    assert_eq!(r.upstream_endpoint, second.url);
    assert_eq!(r.proxy_url, second.proxy_url());
    assert_eq!((first.request_count(), second.request_count()), (1, 1));
    assert!(
        first.requests()[0].seq < second.requests()[0].seq,
        "the first endpoint is asked first"
    );

    // A healthy first endpoint answers alone.
    first.default_request(Reply::proxy("socks5://first.test:1080"));
    let r = ask(&b, "kraken", HTTP, None).await;
    assert_eq!(r.upstream_endpoint, first.url);
    assert_eq!(r.proxy_url, "socks5://first.test:1080");
    assert_eq!((first.request_count(), second.request_count()), (2, 1));
}

/// Endpoint 1 answers with `bad`, endpoint 2 is healthy: the answer comes from endpoint 2, and
/// endpoint 1 has one failure recorded whose text contains `error`. Returns the call's duration.
async fn assert_fails_over(bad: Reply, settings: &str, error: &str) -> Duration {
    let first = Upstream::start().await;
    let second = Upstream::start().await;
    first.default_request(bad);
    let b = broker(&[&first, &second], settings, "").await;

    let started = Instant::now();
    let r = ask(&b, "binance", HTTP, None).await;
    let took = started.elapsed();
    assert_eq!(r.source(), ProxySource::Upstream);
    assert_eq!(r.upstream_endpoint, second.url);
    assert_eq!(r.proxy_url, second.proxy_url());
    assert_eq!(first.request_count(), 1);
    assert_eq!(second.request_count(), 1);
    assert!(first.requests()[0].seq < second.requests()[0].seq);

    let s = upstream_status(&b, &first.url).await;
    assert_eq!(
        (s.total_requests, s.total_failures, s.consecutive_failures),
        (1, 1, 1),
        "{s:?}"
    );
    assert!(
        s.last_error.contains(error),
        "last_error {:?} should contain {error:?}",
        s.last_error
    );
    let s = upstream_status(&b, &second.url).await;
    assert_eq!((s.total_requests, s.total_failures), (1, 0), "{s:?}");

    // Only the good answer is cached.
    let cache = list_cache(&b).await;
    assert_eq!(cache.len(), 1, "{cache:?}");
    assert_eq!(cache[0].upstream_endpoint, second.url);
    assert_eq!(cache[0].proxy_url, second.proxy_url());
    took
}

#[tokio::test]
async fn http_500_counts_as_a_failure_and_the_next_endpoint_answers() {
    assert_fails_over(Reply::Status(500), "", "500").await;
}

#[tokio::test]
async fn http_429_counts_as_a_failure_and_the_next_endpoint_answers() {
    assert_fails_over(Reply::Status(429), "", "429").await;
}

#[tokio::test]
async fn http_401_counts_as_a_failure_and_the_next_endpoint_answers() {
    assert_fails_over(Reply::Status(401), "", "401").await;
}

#[tokio::test]
async fn timeout_counts_as_a_failure_and_the_next_endpoint_answers() {
    // Hedging off: the sequential failover after a timeout (hedging is tests/upstream_hardening.rs).
    let took = assert_fails_over(Reply::Hang, "timeout_seconds: 1\nhedge_delay_ms: 0", "timed out").await;
    assert!(
        took >= Duration::from_millis(900) && took < secs(5),
        "bounded by timeout_seconds: {took:?}"
    );
}

#[tokio::test]
async fn connection_reset_counts_as_a_failure_and_the_next_endpoint_answers() {
    assert_fails_over(Reply::Reset, "", "reset").await;
}

#[tokio::test]
async fn garbage_body_counts_as_a_failure_and_the_next_endpoint_answers() {
    assert_fails_over(Reply::Garbage, "", "invalid answer").await;
}

#[tokio::test]
async fn answer_with_a_bad_scheme_counts_as_a_failure_and_the_next_endpoint_answers() {
    let bad = answer("ftp://bad-scheme.test:21", Some(300));
    assert_fails_over(bad, "", "scheme").await;
}

#[tokio::test]
async fn answer_without_a_port_counts_as_a_failure_and_the_next_endpoint_answers() {
    let bad = answer("socks5://no-port.test", Some(300));
    assert_fails_over(bad, "", "port").await;
}

#[tokio::test]
async fn answer_with_ttl_5_counts_as_a_failure_and_the_next_endpoint_answers() {
    let bad = answer("socks5://short-ttl.test:1080", Some(5));
    assert_fails_over(bad, "", "ttl_seconds").await;
}

#[tokio::test]
async fn answer_without_proxy_url_counts_as_a_failure_and_the_next_endpoint_answers() {
    let bad = Reply::ok(json!({"strategy": "geo", "ttl_seconds": 300}));
    assert_fails_over(bad, "", "proxy_url").await;
}

fn invalid_answers() -> Vec<(Reply, &'static str)> {
    vec![
        (answer("ftp://bad-scheme.test:21", Some(300)), "bad-scheme.test"),
        (answer("socks5://no-port.test", Some(300)), "no-port.test"),
        (answer("socks5://short-ttl.test:1080", Some(5)), "short-ttl.test"),
        (
            Reply::ok(json!({"strategy": "geo", "url": "socks5://no-proxy-url.test:1080"})),
            "no-proxy-url.test",
        ),
        (
            answer("socks5://bad-policy.test:1080", Some(300)).with_policy("retry"),
            "bad-policy.test",
        ),
    ]
}

trait WithPolicy {
    fn with_policy(self, policy: &str) -> Self;
}

impl WithPolicy for Reply {
    fn with_policy(self, policy: &str) -> Self {
        match self {
            Reply::Json(status, mut body) => {
                body["fallback_policy"] = policy.into();
                Reply::Json(status, body)
            }
            other => other,
        }
    }
}

#[tokio::test]
async fn an_invalid_answer_is_never_handed_to_the_feed() {
    let up = Upstream::start().await;
    let with_fallback = broker(&[&up], "circuit_breaker_enabled: false", "").await;
    let without_fallback = broker(
        &[&up],
        "circuit_breaker_enabled: false\nfallback_to_embedded: false",
        "",
    )
    .await;
    for (i, (reply, marker)) in invalid_answers().into_iter().enumerate() {
        up.default_request(reply);
        for ct in [HTTP, WS] {
            let exchange = format!("ex{i}");
            let r = ask(&with_fallback, &exchange, ct, None).await;
            assert_eq!(r.source(), ProxySource::Direct, "{marker}: {r:?}");
            assert_eq!(r.proxy_url, "", "{marker}");
            let s = ask_status(&without_fallback, &exchange, ct).await;
            assert_eq!(s.code(), Code::Unavailable, "{marker}: {s:?}");
            assert!(
                s.message().contains("invalid answer"),
                "{marker}: {}",
                s.message()
            );
        }
    }
    assert_eq!(up.request_count(), invalid_answers().len() * 4);
    assert!(list_cache(&with_fallback).await.is_empty());
    assert!(list_cache(&without_fallback).await.is_empty());
}

#[tokio::test]
async fn the_callers_grpc_deadline_bounds_the_upstream_attempt() {
    let up = Upstream::start().await;
    up.default_request(Reply::Hang);
    let b = broker(&[&up], "timeout_seconds: 30\nfailure_threshold: 1", "").await;
    let mut req = tonic::Request::new(request("binance", HTTP, None));
    req.set_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let r = b.client().request_proxy(req).await.unwrap().into_inner();
    let took = started.elapsed();
    assert_eq!(
        r.source(),
        ProxySource::Direct,
        "answered by the fallback in time"
    );
    assert!(took < Duration::from_millis(1000), "{took:?}");
    assert_eq!(up.request_count(), 1);
    let s = upstream_status(&b, &up.url).await;
    assert_eq!(
        (s.breaker_state(), s.consecutive_failures),
        (BreakerState::Closed, 0),
        "the caller's deadline is no verdict on the endpoint"
    );
}

// --- Circuit breakers -------------------------------------------------------------------------

const BREAKER: &str = "failure_threshold: 2\nopen_seconds: 30";

/// Trips the breaker of a failing single endpoint (threshold 2), checking it on the way.
async fn trip(b: &TestBroker, up: &Upstream) {
    let r = ask(b, "trip-1", HTTP, None).await;
    assert_eq!(r.source(), ProxySource::Direct);
    let s = upstream_status(b, &up.url).await;
    assert_eq!(
        (s.breaker_state(), s.consecutive_failures),
        (BreakerState::Closed, 1)
    );
    ask(b, "trip-2", HTTP, None).await;
    let s = upstream_status(b, &up.url).await;
    assert_eq!(s.breaker_state(), BreakerState::Open, "{s:?}");
    let until = s.seconds_until_probe.expect("open breaker says when it probes");
    assert!((25..=33).contains(&until), "open_seconds 30 ± 10 %: {until}");
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn breaker_opens_after_failure_threshold_and_the_endpoint_is_no_longer_called() {
    let up = Upstream::start().await;
    up.default_request(Reply::Status(500));
    let (b, _clock) = broker_with_clock(&[&up], BREAKER, "").await;
    trip(&b, &up).await;
    for i in 0..5 {
        let r = ask(&b, &format!("open-{i}"), HTTP, None).await;
        assert_eq!(r.source(), ProxySource::Direct);
    }
    assert_eq!(up.request_count(), 2, "an open endpoint is not called");
    let s = upstream_status(&b, &up.url).await;
    assert_eq!((s.breaker_state(), s.total_requests), (BreakerState::Open, 2));
}

#[tokio::test]
async fn half_open_probe_success_closes_the_breaker() {
    let up = Upstream::start().await;
    up.default_request(Reply::Status(500));
    let (b, clock) = broker_with_clock(&[&up], BREAKER, "").await;
    trip(&b, &up).await;

    clock.advance(secs(25));
    assert_eq!(
        upstream_status(&b, &up.url).await.breaker_state(),
        BreakerState::Open
    );
    clock.advance(secs(9)); // 34 s > 30 s × 1.1
    assert_eq!(
        upstream_status(&b, &up.url).await.breaker_state(),
        BreakerState::HalfOpen
    );

    up.default_request(Reply::proxy("socks5://recovered.test:1080"));
    let r = ask(&b, "probe", HTTP, None).await;
    assert_eq!(r.source(), ProxySource::Upstream);
    assert_eq!(r.proxy_url, "socks5://recovered.test:1080");
    assert_eq!(up.request_count(), 3, "exactly one probe went through");
    let s = upstream_status(&b, &up.url).await;
    assert_eq!(
        (s.breaker_state(), s.consecutive_failures),
        (BreakerState::Closed, 0)
    );

    ask(&b, "after-probe", HTTP, None).await;
    assert_eq!(up.request_count(), 4, "a closed breaker lets requests flow");
}

#[tokio::test]
async fn half_open_probe_failure_reopens_the_breaker_for_longer() {
    let up = Upstream::start().await;
    up.default_request(Reply::Status(500));
    let (b, clock) = broker_with_clock(&[&up], BREAKER, "").await;
    trip(&b, &up).await;

    clock.advance(secs(34));
    assert_eq!(
        upstream_status(&b, &up.url).await.breaker_state(),
        BreakerState::HalfOpen
    );
    let r = ask(&b, "probe-1", HTTP, None).await;
    assert_eq!(r.source(), ProxySource::Direct);
    assert_eq!(up.request_count(), 3, "one probe");
    let s = upstream_status(&b, &up.url).await;
    assert_eq!(s.breaker_state(), BreakerState::Open);
    let until = s.seconds_until_probe.unwrap();
    assert!(
        (50..=66).contains(&until),
        "re-opened for 2 × 30 s ± 10 %: {until}"
    );

    // The first period would be over by now; the doubled one is not.
    clock.advance(secs(34));
    assert_eq!(
        upstream_status(&b, &up.url).await.breaker_state(),
        BreakerState::Open
    );
    ask(&b, "still-open", HTTP, None).await;
    assert_eq!(up.request_count(), 3);

    clock.advance(secs(33)); // 67 s > 60 s × 1.1
    assert_eq!(
        upstream_status(&b, &up.url).await.breaker_state(),
        BreakerState::HalfOpen
    );
    ask(&b, "probe-2", HTTP, None).await;
    assert_eq!(up.request_count(), 4);
}

#[tokio::test]
async fn open_endpoint_is_skipped_without_waiting() {
    let hanging = Upstream::start().await;
    let healthy = Upstream::start().await;
    hanging.default_request(Reply::Hang);
    let b = broker(
        &[&hanging, &healthy],
        // Hedging off, so that the first lookup waits for the timeout that opens the breaker.
        "timeout_seconds: 1\nfailure_threshold: 1\nhedge_delay_ms: 0",
        "",
    )
    .await;
    let r = ask(&b, "binance", HTTP, None).await;
    assert_eq!(r.upstream_endpoint, healthy.url);
    assert_eq!(
        upstream_status(&b, &hanging.url).await.breaker_state(),
        BreakerState::Open
    );

    let started = Instant::now();
    let r = ask(&b, "kraken", HTTP, None).await;
    assert_eq!(r.upstream_endpoint, healthy.url);
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(hanging.request_count(), 1);
}

#[tokio::test]
async fn disabled_breaker_is_never_skipped() {
    let up = Upstream::start().await;
    up.default_request(Reply::Status(500));
    let (b, clock) =
        broker_with_clock(&[&up], "circuit_breaker_enabled: false\nfailure_threshold: 2", "").await;
    for i in 0..6 {
        ask(&b, &format!("ex{i}"), HTTP, None).await;
        clock.advance(secs(1));
    }
    assert_eq!(up.request_count(), 6, "every request reaches the endpoint");
    let s = upstream_status(&b, &up.url).await;
    assert_eq!(s.breaker_state(), BreakerState::Disabled);
    assert_eq!((s.consecutive_failures, s.total_failures), (6, 6));
    assert_eq!(s.seconds_until_probe, None);
}

// --- Cache ------------------------------------------------------------------------------------

#[tokio::test]
async fn second_identical_request_is_served_from_the_cache() {
    let up = Upstream::start().await;
    up.default_request(answer("socks5://cached.test:1080", Some(300)));
    let b = broker(&[&up], "", "").await;
    // Several keys, so that every jitter draw (±10 % per entry) gets a chance to show.
    for i in 0..20 {
        let exchange = format!("exchange-{i}");
        let first = ask(&b, &exchange, HTTP, None).await;
        assert_eq!(first.source(), ProxySource::Upstream);
        assert_eq!(first.ttl_seconds, 300);
        assert_eq!(metadata_field(&first, "stale"), None);
        let second = ask(&b, &exchange, HTTP, None).await;
        assert_eq!(second.source(), ProxySource::Cache);
        assert_eq!(second.proxy_url, "socks5://cached.test:1080");
        assert_eq!(second.upstream_endpoint, up.url);
        assert_eq!(second.strategy, "geo");
        assert_eq!(second.fallback_policy(), FallbackPolicy::EmbeddedFallback);
        assert_eq!(metadata_field(&second, "stale"), Some(json!(false)));
        assert!(
            (1..=300).contains(&second.ttl_seconds),
            "a cache hit never promises more than the upstream's ttl: {}",
            second.ttl_seconds
        );
        assert_eq!(up.request_count(), i + 1);
    }
}

#[tokio::test]
async fn region_and_connection_type_are_part_of_the_cache_key() {
    let up = Upstream::start().await;
    let b = broker(&[&up], "", "").await;
    for (region, ct, calls) in [
        (None, HTTP, 1),
        (None, HTTP, 1),
        (Some("eu"), HTTP, 2),
        (Some("eu"), HTTP, 2),
        (Some("us"), HTTP, 3),
        (Some("us"), WS, 4),
        (None, WS, 5),
        (Some("eu"), HTTP, 5),
    ] {
        ask(&b, "binance", ct, region).await;
        assert_eq!(up.request_count(), calls, "region {region:?} {ct:?}");
    }
    let regions: Vec<Value> = up.requests().iter().map(|r| r.body["region"].clone()).collect();
    assert_eq!(
        regions,
        [Value::Null, "eu".into(), "us".into(), "us".into(), Value::Null]
    );
    assert_eq!(list_cache(&b).await.len(), 5);
}

#[tokio::test]
async fn exchange_id_is_case_folded_in_the_cache_key() {
    let up = Upstream::start().await;
    let b = broker(&[&up], "", "").await;
    assert_eq!(
        ask(&b, "BINANCE", HTTP, None).await.source(),
        ProxySource::Upstream
    );
    assert_eq!(ask(&b, "binance", HTTP, None).await.source(), ProxySource::Cache);
    assert_eq!(ask(&b, "Binance", HTTP, None).await.source(), ProxySource::Cache);
    assert_eq!(up.request_count(), 1);
    let entries = list_cache(&b).await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].exchange_id, "binance");
}

#[tokio::test]
async fn entry_expires_after_the_answers_ttl() {
    let up = Upstream::start().await;
    up.default_request(answer("socks5://short.test:1080", Some(120)));
    let (b, clock) = broker_with_clock(&[&up], "cache_ttl_seconds: 900", "").await;
    let r = ask(&b, "binance", HTTP, None).await;
    assert_eq!(r.ttl_seconds, 120, "the answer's ttl, not cache_ttl_seconds");
    clock.advance(secs(100)); // < 120 × 0.9
    let r = ask(&b, "binance", HTTP, None).await;
    assert_eq!(r.source(), ProxySource::Cache);
    assert!(r.ttl_seconds <= 32, "remaining ttl: {}", r.ttl_seconds);
    assert_eq!(up.request_count(), 1);
    clock.advance(secs(33)); // 133 s > 120 × 1.1
    let r = ask(&b, "binance", HTTP, None).await;
    assert_eq!(r.source(), ProxySource::Upstream);
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn answer_without_ttl_is_cached_for_cache_ttl_seconds() {
    let up = Upstream::start().await;
    up.default_request(answer("socks5://no-ttl.test:1080", None));
    let (b, clock) = broker_with_clock(&[&up], "cache_ttl_seconds: 200", "").await;
    let r = ask(&b, "binance", HTTP, None).await;
    assert_eq!((r.source(), r.ttl_seconds), (ProxySource::Upstream, 200));
    clock.advance(secs(175)); // < 200 × 0.9
    assert_eq!(ask(&b, "binance", HTTP, None).await.source(), ProxySource::Cache);
    clock.advance(secs(46)); // 221 s > 200 × 1.1
    assert_eq!(
        ask(&b, "binance", HTTP, None).await.source(),
        ProxySource::Upstream
    );
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn ttl_over_an_hour_is_capped_at_3600_seconds() {
    let up = Upstream::start().await;
    up.default_request(answer("socks5://long.test:1080", Some(86_400)));
    let (b, clock) = broker_with_clock(&[&up], "", "").await;
    let r = ask(&b, "binance", HTTP, None).await;
    assert_eq!(r.ttl_seconds, 3600);
    let hit = ask(&b, "binance", HTTP, None).await;
    assert_eq!(hit.source(), ProxySource::Cache);
    assert!(hit.ttl_seconds <= 3600, "{}", hit.ttl_seconds);
    clock.advance(secs(3200)); // < 3600 × 0.9
    assert_eq!(ask(&b, "binance", HTTP, None).await.source(), ProxySource::Cache);
    clock.advance(secs(761)); // 3961 s > 3600 × 1.1
    assert_eq!(
        ask(&b, "binance", HTTP, None).await.source(),
        ProxySource::Upstream
    );
    assert_eq!(up.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_misses_for_one_key_make_one_upstream_call() {
    let up = Upstream::start().await;
    up.default_request(answer("socks5://coalesced.test:1080", Some(300)).after(Duration::from_millis(1500)));
    let b = broker(&[&up], "", "").await;
    // Several connections, so the server's per-connection stream limit does not serialise calls.
    let mut channels = Vec::new();
    for _ in 0..5 {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{}", b.addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..500 {
        let channel = channels[i % channels.len()].clone();
        calls.spawn(async move {
            proxy_broker::pb::proxy_broker_client::ProxyBrokerClient::new(channel)
                .request_proxy(request("BinAnce", HTTP, Some("eu")))
                .await
                .unwrap()
                .into_inner()
        });
    }
    let mut answers = Vec::new();
    while let Some(r) = calls.join_next().await {
        answers.push(r.unwrap());
    }
    assert_eq!(answers.len(), 500);
    assert_eq!(
        up.request_count(),
        1,
        "one upstream call for 500 concurrent misses"
    );
    assert!(
        answers
            .iter()
            .all(|a| a.proxy_url == "socks5://coalesced.test:1080"
                && a.upstream_endpoint == up.url
                && matches!(a.source(), ProxySource::Upstream | ProxySource::Cache))
    );
    let shared = answers
        .iter()
        .filter(|a| a.source() == ProxySource::Upstream)
        .count();
    assert!(
        shared > 1,
        "waiters share the one upstream answer ({shared} UPSTREAM answers)"
    );
}

#[tokio::test]
async fn stale_entry_is_served_when_every_upstream_fails_until_the_stale_window_ends() {
    let up = Upstream::start().await;
    up.default_request(answer("socks5://stale.test:1080", Some(60)));
    let (b, clock) = broker_with_clock(
        &[&up],
        "stale_if_error_seconds: 120",
        r#"default: { http: "socks5://embedded.test:1080" }"#,
    )
    .await;
    assert_eq!(
        ask(&b, "binance", HTTP, None).await.source(),
        ProxySource::Upstream
    );

    up.default_request(Reply::Status(500));
    clock.advance(secs(67)); // past 60 s × 1.1
    let r = ask(&b, "binance", HTTP, None).await;
    assert_eq!(up.request_count(), 2, "upstream is asked before serving stale");
    assert_eq!(
        r.source(),
        ProxySource::Cache,
        "stale beats the embedded fallback: {r:?}"
    );
    assert_eq!(r.proxy_url, "socks5://stale.test:1080");
    assert_eq!(r.upstream_endpoint, up.url);
    assert_eq!(metadata_field(&r, "stale"), Some(json!(true)));
    assert!((1..=60).contains(&r.ttl_seconds), "{}", r.ttl_seconds);
    let entries = list_cache(&b).await;
    assert_eq!(entries.len(), 1);
    assert!(
        entries[0].stale && entries[0].seconds_to_expiry <= 0,
        "{entries:?}"
    );

    clock.advance(secs(130)); // 197 s > 66 s + 120 s
    let r = ask(&b, "binance", HTTP, None).await;
    assert_eq!(r.source(), ProxySource::Embedded, "{r:?}");
    assert_eq!(r.proxy_url, "socks5://embedded.test:1080");
    assert!(list_cache(&b).await.is_empty());
}

#[tokio::test]
async fn stale_entry_is_not_served_when_an_upstream_answers() {
    let up = Upstream::start().await;
    up.default_request(answer("socks5://old.test:1080", Some(60)));
    let (b, clock) = broker_with_clock(&[&up], "", "").await;
    ask(&b, "binance", HTTP, None).await;
    up.default_request(answer("socks5://new.test:1080", Some(60)));
    clock.advance(secs(67));
    let r = ask(&b, "binance", HTTP, None).await;
    assert_eq!(
        (r.source(), r.proxy_url.as_str()),
        (ProxySource::Upstream, "socks5://new.test:1080")
    );
}

#[tokio::test]
async fn embedded_answers_are_not_cached_and_the_pool_keeps_rotating() {
    let up = Upstream::start().await;
    up.default_request(Reply::Status(503));
    let b = broker(
        &[&up],
        "",
        r#"
        default:
          http:
            pool:
              strategy: round_robin
              proxies:
                - url: "socks5://pool-a.test:1080"
                - url: "socks5://pool-b.test:1080"
                - url: "socks5://pool-c.test:1080"
        "#,
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let r = ask(&b, "binance", HTTP, None).await;
        assert_eq!(r.source(), ProxySource::Embedded);
        got.push(r.proxy_url);
    }
    assert_eq!(
        got,
        [
            "socks5://pool-a.test:1080",
            "socks5://pool-b.test:1080",
            "socks5://pool-c.test:1080",
            "socks5://pool-a.test:1080"
        ]
    );
    assert!(list_cache(&b).await.is_empty());
}

// --- Fallback ---------------------------------------------------------------------------------

#[tokio::test]
async fn fallback_on_answers_from_the_embedded_configuration_for_http_and_websocket() {
    let up = Upstream::start().await;
    up.default_request(Reply::Status(500));
    let b = broker(
        &[&up],
        "fallback_to_embedded: true\ncircuit_breaker_enabled: false",
        r#"
        default:
          http: "socks5://embedded-http.test:1080"
          websocket: { url: "socks5://embedded-ws.test:1081", timeout_seconds: 12 }
        "#,
    )
    .await;
    let r = ask(&b, "binance", HTTP, None).await;
    assert_eq!(
        (r.source(), r.proxy_url.as_str(), r.upstream_endpoint.as_str()),
        (ProxySource::Embedded, "socks5://embedded-http.test:1080", "")
    );
    let r = ask(&b, "binance", WS, None).await;
    assert_eq!(
        (r.source(), r.proxy_url.as_str()),
        (ProxySource::Embedded, "socks5://embedded-ws.test:1081")
    );
    assert_eq!(
        metadata_field(&r, "timeout_seconds").and_then(|v| v.as_f64()),
        Some(12.0)
    );
    assert_eq!(up.request_count(), 2, "upstream was asked first each time");
}

#[tokio::test]
async fn fallback_on_with_nothing_embedded_answers_direct_for_http_and_websocket() {
    let up = Upstream::start().await;
    up.default_request(Reply::Status(500));
    let b = broker(&[&up], "fallback_to_embedded: true", "").await;
    for ct in [HTTP, WS] {
        let r = ask(&b, "binance", ct, None).await;
        assert_eq!(
            (r.source(), r.proxy_url.as_str()),
            (ProxySource::Direct, ""),
            "{ct:?}"
        );
        assert_eq!(r.fallback_policy(), FallbackPolicy::DirectConnection);
    }
}

#[tokio::test]
async fn fallback_off_is_unavailable_listing_each_endpoint_for_http_and_websocket() {
    let first = Upstream::start().await;
    let second = Upstream::start().await;
    first.default_request(Reply::Status(500));
    second.default_request(Reply::Garbage);
    let b = broker(
        &[&first, &second],
        "fallback_to_embedded: false\ncircuit_breaker_enabled: false",
        // An embedded proxy that must not be used.
        r#"default: { http: "socks5://embedded.test:1080", websocket: "socks5://embedded.test:1080" }"#,
    )
    .await;
    for ct in [HTTP, WS] {
        let s = ask_status(&b, "binance", ct).await;
        assert_eq!(s.code(), Code::Unavailable, "{ct:?}: {s:?}");
        let m = s.message();
        let (a, z) = (
            m.find(&first.url).unwrap_or_else(|| panic!("{m}")),
            m.find(&second.url).unwrap_or_else(|| panic!("{m}")),
        );
        assert!(a < z, "endpoints in order: {m}");
        assert!(m[a..z].contains("500"), "first endpoint's failure: {m}");
        assert!(
            m[z..].contains("invalid answer"),
            "second endpoint's failure: {m}"
        );
        assert!(!m.contains("embedded.test"), "{m}");
    }
    assert_eq!((first.request_count(), second.request_count()), (2, 2));
}

#[tokio::test]
async fn answer_fallback_policy_is_handed_to_the_feed_unchanged() {
    let up = Upstream::start().await;
    up.queue_requests([
        answer("socks5://a.test:1080", Some(300)).with_policy("direct_connection"),
        answer("socks5://b.test:1080", Some(300)).with_policy("fail"),
        answer("socks5://c.test:1080", Some(300)).with_policy("embedded_fallback"),
        answer("socks5://d.test:1080", Some(300)),
    ]);
    let b = broker(&[&up], "", "").await;
    let expected = [
        ("a", FallbackPolicy::DirectConnection),
        ("b", FallbackPolicy::Fail),
        ("c", FallbackPolicy::EmbeddedFallback),
        ("d", FallbackPolicy::EmbeddedFallback),
    ];
    for (exchange, policy) in expected {
        let r = ask(&b, exchange, HTTP, None).await;
        assert_eq!(
            (r.source(), r.fallback_policy()),
            (ProxySource::Upstream, policy),
            "{exchange}"
        );
    }
    for (exchange, policy) in expected {
        let r = ask(&b, exchange, HTTP, None).await;
        assert_eq!(
            (r.source(), r.fallback_policy()),
            (ProxySource::Cache, policy),
            "{exchange}"
        );
    }
}

#[tokio::test]
async fn answer_metadata_and_unknown_fields_are_handled() {
    let up = Upstream::start().await;
    up.default_request(Reply::ok(json!({
        "proxy_url": "socks5h://meta.test:1080",
        "strategy": "least_loaded",
        "ttl_seconds": 90,
        "metadata": {"pool": "eu-1", "score": 0.5},
        "unknown_extra_field": {"ignored": true}
    })));
    let b = broker(&[&up], "", "").await;
    let r = ask(&b, "binance", HTTP, None).await;
    assert_eq!(
        (r.source(), r.strategy.as_str(), r.ttl_seconds),
        (ProxySource::Upstream, "least_loaded", 90)
    );
    assert_eq!(metadata_field(&r, "pool"), Some(json!("eu-1")));
    assert_eq!(metadata_field(&r, "score"), Some(json!(0.5)));
}

// --- Admin RPCs -------------------------------------------------------------------------------

#[tokio::test]
async fn list_upstreams_reports_breaker_state_counters_last_error_and_latency() {
    let first = Upstream::start().await;
    let second = Upstream::start().await;
    first.default_request(Reply::Status(500));
    second.default_request(answer("socks5://s.test:1080", Some(300)).after(Duration::from_millis(50)));
    let b = broker(&[&first, &second], "", "").await;

    let before = list_upstreams(&b).await;
    assert!(before.delegation_enabled);
    let names: Vec<&str> = before.upstreams.iter().map(|u| u.endpoint.as_str()).collect();
    assert_eq!(
        names,
        [first.url.as_str(), second.url.as_str()],
        "configured order"
    );
    for u in &before.upstreams {
        assert_eq!(u.breaker_state(), BreakerState::Closed);
        assert_eq!(
            (u.total_requests, u.total_failures, u.consecutive_failures),
            (0, 0, 0)
        );
        assert_eq!((u.last_error.as_str(), u.last_latency_ms), ("", None));
    }

    ask(&b, "binance", HTTP, None).await;
    let s1 = upstream_status(&b, &first.url).await;
    assert_eq!(s1.breaker_state(), BreakerState::Closed);
    assert_eq!(
        (s1.consecutive_failures, s1.total_requests, s1.total_failures),
        (1, 1, 1)
    );
    assert!(s1.last_error.contains("500"), "{s1:?}");
    assert!(s1.last_latency_ms.is_some());
    let s2 = upstream_status(&b, &second.url).await;
    assert_eq!(
        (s2.consecutive_failures, s2.total_requests, s2.total_failures),
        (0, 1, 0)
    );
    assert_eq!(s2.last_error, "");
    assert!(s2.last_latency_ms.is_some_and(|ms| ms >= 50), "{s2:?}");

    second.default_request(Reply::Status(429));
    ask(&b, "kraken", HTTP, None).await;
    let s1 = upstream_status(&b, &first.url).await;
    assert_eq!(
        (s1.consecutive_failures, s1.total_requests, s1.total_failures),
        (2, 2, 2)
    );
    let s2 = upstream_status(&b, &second.url).await;
    assert_eq!(
        (s2.consecutive_failures, s2.total_requests, s2.total_failures),
        (1, 2, 1)
    );
    assert!(s2.last_error.contains("429"), "{s2:?}");

    let feedback = list_upstreams(&b).await.feedback.expect("feedback counters");
    assert_eq!(
        (feedback.enqueued, feedback.dropped, feedback.ejections),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn list_cache_shows_key_redacted_proxy_url_endpoint_and_expiry() {
    let up = Upstream::start().await;
    up.default_request(answer("http://alice:pa55-SECRET-word@px.test:8080", Some(600)));
    let b = broker(&[&up], "", "").await;
    let r = ask(&b, "Kraken", WS, Some("us-east")).await;
    assert_eq!(
        r.proxy_url, "http://alice:pa55-SECRET-word@px.test:8080",
        "the feed gets the real URL"
    );

    let entries = list_cache(&b).await;
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.exchange_id, "kraken");
    assert_eq!(e.connection_type(), WS);
    assert_eq!(e.region, "us-east");
    assert_eq!(e.proxy_url, "http://***@px.test:8080");
    assert_eq!(e.upstream_endpoint, up.url);
    assert!((539..=660).contains(&e.seconds_to_expiry), "{e:?}");
    assert!(!e.stale);

    let mut admin = b.admin();
    let only = |id: &str| ListCacheRequest {
        exchange_id: id.into(),
        ..Default::default()
    };
    let kraken = admin
        .list_cache(only("KRAKEN"))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(kraken.len(), 1);
    let binance = admin
        .list_cache(only("binance"))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(binance.is_empty());
}

#[tokio::test]
async fn invalidate_cache_by_exchange_and_all() {
    let up = Upstream::start().await;
    let b = broker(&[&up], "", "").await;
    ask(&b, "binance", HTTP, None).await;
    ask(&b, "binance", WS, Some("eu")).await;
    ask(&b, "kraken", HTTP, None).await;
    assert_eq!(list_cache(&b).await.len(), 3);

    let mut admin = b.admin();
    let removed = admin
        .invalidate_cache(InvalidateCacheRequest {
            target: Some(Target::ExchangeId("BINANCE".into())),
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 2);
    let left: Vec<String> = list_cache(&b).await.into_iter().map(|e| e.exchange_id).collect();
    assert_eq!(left, ["kraken"]);
    assert_eq!(
        ask(&b, "binance", HTTP, None).await.source(),
        ProxySource::Upstream
    );
    assert_eq!(ask(&b, "kraken", HTTP, None).await.source(), ProxySource::Cache);
    assert_eq!(up.request_count(), 4);

    let removed = admin
        .invalidate_cache(InvalidateCacheRequest {
            target: Some(Target::All(true)),
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 2);
    assert!(list_cache(&b).await.is_empty());
    assert_eq!(
        ask(&b, "kraken", HTTP, None).await.source(),
        ProxySource::Upstream
    );
    assert_eq!(up.request_count(), 5);
}

#[tokio::test]
async fn invalidate_cache_without_a_target_or_with_all_false_is_invalid_argument() {
    let up = Upstream::start().await;
    let b = broker(&[&up], "", "").await;
    ask(&b, "binance", HTTP, None).await;
    let mut admin = b.admin();
    for target in [
        None,
        Some(Target::All(false)),
        Some(Target::ExchangeId(String::new())),
    ] {
        let s = admin
            .invalidate_cache(InvalidateCacheRequest {
                target: target.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{target:?}: {s:?}");
    }
    assert_eq!(list_cache(&b).await.len(), 1, "nothing was dropped");
}

#[tokio::test]
async fn effective_config_shows_the_token_as_stars() {
    let up = Upstream::start().await;
    let b = broker(&[&up], "failure_threshold: 7", "").await;
    let text = b
        .admin()
        .get_effective_config(GetEffectiveConfigRequest {})
        .await
        .unwrap()
        .into_inner()
        .config_json;
    assert!(!text.contains(upstream::TOKEN), "{text}");
    let json: Value = serde_json::from_str(&text).unwrap();
    let ext = &json["proxy"]["external_service"];
    assert_eq!(ext["auth_credentials"]["token"], "***");
    assert_eq!(ext["endpoints"], json!([up.url]));
    assert_eq!(ext["failure_threshold"], 7);
    assert_eq!(ext["stale_if_error_seconds"], 600, "defaults are filled in");
}
