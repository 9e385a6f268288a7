//! Push migration (`WatchProxy`) against the real broker over gRPC: the first answer at once, a
//! ban reported by another feed moving the watcher, a lease end and a reload bringing a new
//! assignment, only the affected watchers being woken, and closed streams leaving the registry.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/upstream.rs"]
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use common::TestBroker;
use proxy_broker::broker::Broker;
use proxy_broker::pb::{ConnectionType, ProxyFeedback, ProxyRequest, ProxyResponse, ProxySource};
use tonic::{Code, Streaming};
use upstream::eventually;

/// How long anything the broker should do "within a second" may take before a test fails: the
/// machine is shared and slow, so this is generous; no test asserts an upper bound tighter than it.
const DEADLINE: Duration = Duration::from_secs(10);
/// How long a watcher that should hear nothing is listened to.
const QUIET: Duration = Duration::from_millis(300);

const POOLS: &str = r#"
proxy:
  enabled: true
  exchanges:
    binance:
      http: "http://binance-rest:8080"
      websocket:
        pool:
          strategy: round_robin
          proxies: [{ url: "socks5://a:1080" }, { url: "socks5://b:1080" }]
    kraken:
      http: "http://kraken-rest:8080"
      websocket:
        pool:
          strategy: round_robin
          proxies: [{ url: "socks5://a:1080" }, { url: "socks5://b:1080" }]
"#;

struct Running {
    broker: Arc<Broker>,
    server: TestBroker,
}

async fn start(yaml: &str) -> Running {
    let broker = Arc::new(Broker::new(common::load(Some(yaml), &[]).unwrap()).unwrap());
    let server = TestBroker::start_broker(broker.clone()).await;
    Running { broker, server }
}

fn ask(exchange: &str, connection_type: ConnectionType) -> ProxyRequest {
    ProxyRequest {
        exchange_id: exchange.into(),
        connection_type: connection_type.into(),
        ..Default::default()
    }
}

async fn watch(r: &Running, request: ProxyRequest) -> Streaming<ProxyResponse> {
    r.server.client().watch_proxy(request).await.unwrap().into_inner()
}

/// The next assignment, which must come before [`DEADLINE`].
async fn next(stream: &mut Streaming<ProxyResponse>) -> ProxyResponse {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("an assignment before the deadline")
        .expect("an assignment, not a status")
        .expect("the stream goes on")
}

/// Fails if `stream` yields anything within [`QUIET`].
async fn assert_quiet(what: &str, stream: &mut Streaming<ProxyResponse>) {
    if let Ok(got) = tokio::time::timeout(QUIET, stream.message()).await {
        panic!("{what}: expected nothing, got {got:?}");
    }
}

fn ban(proxy_url: &str, exchange: &str) -> ProxyFeedback {
    ProxyFeedback {
        proxy_url: proxy_url.into(),
        exchange_id: exchange.into(),
        connection_type: ConnectionType::Websocket.into(),
        success: false,
        http_status: Some(418),
        retry_after_seconds: Some(120),
        client_id: "another-feed".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_first_assignment_arrives_at_once_with_its_lease() {
    let r = start(POOLS).await;
    let mut stream = watch(&r, ask("BINANCE", ConnectionType::Http)).await;
    let first = next(&mut stream).await;
    assert_eq!(first.proxy_url, "http://binance-rest:8080");
    assert_eq!(first.source(), ProxySource::Embedded);
    assert!(first.lease_expires_at.is_some(), "{first:?}");
    assert_eq!(r.broker.watchers().stats().watchers, 1);
    r.server.stop().await;
}

#[tokio::test]
async fn a_ban_reported_by_another_feed_moves_the_watcher_to_another_proxy() {
    let r = start(POOLS).await;
    let mut stream = watch(&r, ask("binance", ConnectionType::Websocket)).await;
    let first = next(&mut stream).await;
    r.server
        .client()
        .report_feedback(ban(&first.proxy_url, "binance"))
        .await
        .unwrap();
    let moved = next(&mut stream).await;
    assert_ne!(moved.proxy_url, first.proxy_url, "{moved:?}");
    assert!(["socks5://a:1080", "socks5://b:1080"].contains(&moved.proxy_url.as_str()));
    r.server.stop().await;
}

#[tokio::test]
async fn only_the_watchers_of_the_banned_proxy_and_exchange_are_woken() {
    let r = start(POOLS).await;
    // Round robin: watchers alternate between a and b, on both exchanges.
    let mut binance = Vec::new();
    let mut kraken = Vec::new();
    for _ in 0..4 {
        let mut s = watch(&r, ask("binance", ConnectionType::Websocket)).await;
        let first = next(&mut s).await;
        binance.push((first.proxy_url, s));
        let mut s = watch(&r, ask("kraken", ConnectionType::Websocket)).await;
        let first = next(&mut s).await;
        kraken.push((first.proxy_url, s));
    }
    let on_a = binance.iter().filter(|(p, _)| p == "socks5://a:1080").count();
    assert!(
        on_a > 0 && on_a < 4,
        "round robin spreads the watchers: {on_a} of 4 on a"
    );
    let wakes = r.broker.watchers().stats().wakes;
    r.server
        .client()
        .report_feedback(ban("socks5://a:1080", "binance"))
        .await
        .unwrap();
    for (proxy, stream) in &mut binance {
        if proxy == "socks5://a:1080" {
            assert_eq!(next(stream).await.proxy_url, "socks5://b:1080");
        }
    }
    for (proxy, stream) in &mut binance {
        if proxy == "socks5://b:1080" {
            assert_quiet("a binance watcher on b", stream).await;
        }
    }
    for (proxy, stream) in &mut kraken {
        assert_quiet(&format!("a kraken watcher on {proxy}"), stream).await;
    }
    assert_eq!(
        r.broker.watchers().stats().wakes,
        wakes + on_a as u64,
        "exactly the binance watchers on a were woken"
    );
    r.server.stop().await;
}

/// TTLs are at least 60 s (`cache_ttl_seconds`, upstream answers), so this runs on tokio's paused
/// clock: the idle runtime jumps to the watcher's lease end (the server, the client and their
/// loopback sockets all run on this test's runtime, and never wait on each other idle).
#[tokio::test(start_paused = true)]
async fn a_lease_end_brings_a_new_assignment() {
    let r = start(POOLS).await;
    let mut stream = watch(&r, ask("binance", ConnectionType::Websocket)).await;
    let first = next(&mut stream).await;
    let started = tokio::time::Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(3600), stream.message())
        .await
        .expect("a new assignment within the hour")
        .unwrap()
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(30),
        "not before the lease ends: {waited:?}"
    );
    assert!(["socks5://a:1080", "socks5://b:1080"].contains(&second.proxy_url.as_str()));
    // A new lease (on the paused clock the wall clock barely moved, so it is not later).
    assert!(
        first.lease_expires_at.is_some() && second.lease_expires_at.is_some(),
        "{second:?}"
    );
    r.server.stop().await;
}

#[tokio::test]
async fn a_reload_that_changes_an_answer_pushes_it_and_no_other() {
    let r = start(POOLS).await;
    let mut changed = watch(&r, ask("binance", ConnectionType::Http)).await;
    let mut unchanged = watch(&r, ask("kraken", ConnectionType::Http)).await;
    assert_eq!(next(&mut changed).await.proxy_url, "http://binance-rest:8080");
    assert_eq!(next(&mut unchanged).await.proxy_url, "http://kraken-rest:8080");
    let reloaded = POOLS.replace("http://binance-rest:8080", "http://binance-rest-2:8080");
    r.broker
        .reload(common::load(Some(&reloaded), &[]).unwrap())
        .unwrap();
    assert_eq!(next(&mut changed).await.proxy_url, "http://binance-rest-2:8080");
    assert_quiet("the kraken watcher, whose answer did not change", &mut unchanged).await;
    r.server.stop().await;
}

#[tokio::test]
async fn a_reload_that_leaves_proxy_and_brokering_alone_spends_no_attempt() {
    let r = start(POOLS).await;
    let mut stream = watch(&r, ask("binance", ConnectionType::Websocket)).await;
    let first = next(&mut stream).await;
    let hand_outs = || async {
        let rows = r
            .broker
            .brokering()
            .list_proxies(Some("binance"), None, 100)
            .await
            .unwrap()
            .entries;
        rows.iter()
            .find(|row| *row.proxy == *first.proxy_url)
            .map(|row| row.state.hand_outs)
    };
    let before = hand_outs().await;
    let reloaded = format!("server:\n  shutdown_grace_seconds: 7\n{POOLS}");
    r.broker
        .reload(common::load(Some(&reloaded), &[]).unwrap())
        .unwrap();
    assert_quiet("the watcher after a reload of server settings", &mut stream).await;
    assert_eq!(hand_outs().await, before, "no re-ask, so no attempt counted");
    r.server.stop().await;
}

#[tokio::test]
async fn closed_streams_leave_the_registry() {
    let r = start(POOLS).await;
    let mut streams = Vec::new();
    for exchange in ["binance", "kraken"] {
        for _ in 0..10 {
            let mut s = watch(&r, ask(exchange, ConnectionType::Websocket)).await;
            next(&mut s).await;
            streams.push(s);
        }
    }
    let stats = r.broker.watchers().stats();
    assert_eq!((stats.watchers, stats.pairs), (20, 4), "{stats:?}");
    drop(streams);
    eventually("the registry to empty", || {
        let s = r.broker.watchers().stats();
        (s.watchers == 0 && s.pairs == 0).then_some(())
    })
    .await;
    r.server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_watch_streams_with_unavailable_at_once() {
    // A long grace period: the stream must end when shutdown starts, not when the grace ends.
    let yaml = format!("server:\n  shutdown_grace_seconds: 300\n{POOLS}");
    let r = start(&yaml).await;
    let mut stream = watch(&r, ask("binance", ConnectionType::Websocket)).await;
    next(&mut stream).await;
    let stopping = tokio::spawn(r.server.stop());
    let end = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("the stream ends before the deadline");
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    drop(stream);
    tokio::time::timeout(DEADLINE, stopping).await.unwrap().unwrap();
}

#[tokio::test]
async fn watch_proxy_is_authenticated_and_validated_like_request_proxy() {
    let yaml = format!("server:\n  auth_tokens: [\"feed-token-0123456789\"]\n{POOLS}");
    let r = start(&yaml).await;
    let with_token = |mut request: tonic::Request<ProxyRequest>, token: &str| {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    // (row, request, expected code)
    let rows = [
        (
            "no token",
            tonic::Request::new(ask("binance", ConnectionType::Http)),
            Code::Unauthenticated,
        ),
        (
            "wrong token",
            with_token(tonic::Request::new(ask("binance", ConnectionType::Http)), "nope"),
            Code::Unauthenticated,
        ),
        (
            "no connection type",
            with_token(
                tonic::Request::new(ask("binance", ConnectionType::Unspecified)),
                "feed-token-0123456789",
            ),
            Code::InvalidArgument,
        ),
        (
            "bad exchange id",
            with_token(
                tonic::Request::new(ask("bin ance", ConnectionType::Http)),
                "feed-token-0123456789",
            ),
            Code::InvalidArgument,
        ),
    ];
    for (row, request, code) in rows {
        let status = r.server.client().watch_proxy(request).await.expect_err(row);
        assert_eq!(status.code(), code, "{row}: {status:?}");
    }
    let request = with_token(
        tonic::Request::new(ask("binance", ConnectionType::Http)),
        "feed-token-0123456789",
    );
    let mut stream = r.server.client().watch_proxy(request).await.unwrap().into_inner();
    assert_eq!(next(&mut stream).await.proxy_url, "http://binance-rest:8080");
    assert_eq!(
        r.broker.watchers().stats().watchers,
        1,
        "refused calls hold no place"
    );
    r.server.stop().await;
}
