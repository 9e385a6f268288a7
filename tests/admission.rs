//! Admission by cost, against the real server over loopback: the reconnect storm is never shed,
//! the shared upstream lookup is detached from the callers that started it, a connection full of
//! stalled streams holds nothing another client needs, and `ListCache` pages.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/upstream.rs"]
mod upstream;

use std::collections::HashSet;
use std::time::Duration;

use common::TestBroker;
use proxy_broker::pb::proxy_broker_client::ProxyBrokerClient;
use proxy_broker::pb::{ConnectionType, ListCacheRequest, ProxySource};
use tonic::Code;
use upstream::{Reply, Upstream, eventually, request};

const HTTP: ConnectionType = ConnectionType::Http;

async fn broker(up: &Upstream, settings: &str, embedded: &str) -> TestBroker {
    TestBroker::start(upstream::config(&[up.url.as_str()], settings, embedded)).await
}

async fn channels(b: &TestBroker, n: usize) -> Vec<tonic::transport::Channel> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            tonic::transport::Endpoint::from_shared(format!("http://{}", b.addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    out
}

/// A request with a gRPC deadline of `timeout`.
fn with_deadline(exchange: &str, timeout: Duration) -> tonic::Request<proxy_broker::pb::ProxyRequest> {
    let mut r = tonic::Request::new(request(exchange, HTTP, None));
    r.set_timeout(timeout);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_storm_over_many_keys_is_never_shed_and_makes_one_upstream_call_per_key() {
    let up = Upstream::start().await;
    up.default_request(Reply::proxy("socks5://storm.test:1080").after(Duration::from_millis(50)));
    // Default server settings; no embedded fallback, so a shed or failed lookup would show.
    let b = broker(&up, "fallback_to_embedded: false", "").await;
    let channels = channels(&b, 8).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..2_000 {
        let channel = channels[i % channels.len()].clone();
        calls.spawn(async move {
            ProxyBrokerClient::new(channel)
                .request_proxy(request(&format!("ex{}", i % 20), HTTP, None))
                .await
                .map(|r| r.into_inner().source())
                .map_err(|s| s.code())
        });
    }
    let mut errors = Vec::new();
    let mut answered = 0;
    while let Some(r) = calls.join_next().await {
        match r.unwrap() {
            Ok(source) => {
                assert!(matches!(source, ProxySource::Upstream | ProxySource::Cache));
                answered += 1;
            }
            Err(code) => errors.push(code),
        }
    }
    assert_eq!((answered, errors), (2_000, vec![]), "no call is shed or fails");
    assert_eq!(up.request_count(), 20, "one upstream call per key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impatient_caller_that_starts_a_lookup_does_not_spoil_it_for_patient_ones() {
    let up = Upstream::start().await;
    up.default_request(Reply::proxy("socks5://patient.test:1080").after(Duration::from_millis(300)));
    let b = broker(&up, "fallback_to_embedded: false", "").await;
    let impatient = {
        let client = b.client();
        tokio::spawn(async move {
            client
                .clone()
                .request_proxy(with_deadline("binance", Duration::from_millis(50)))
                .await
        })
    };
    eventually("the impatient caller's lookup to reach the upstream", || {
        (up.request_count() == 1).then_some(())
    })
    .await;
    let mut patient = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let mut client = b.client();
        patient.spawn(async move {
            client
                .request_proxy(with_deadline("binance", Duration::from_secs(5)))
                .await
                .map(|r| r.into_inner().proxy_url)
        });
    }
    while let Some(r) = patient.join_next().await {
        assert_eq!(r.unwrap().unwrap(), "socks5://patient.test:1080");
    }
    let first = impatient.await.unwrap();
    assert!(
        // UNAVAILABLE from the broker (no fallback allowed), or the caller's own deadline firing
        // first on a loaded machine (CANCELLED / DEADLINE_EXCEEDED on the client side).
        matches!(&first, Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled)),
        "the impatient caller gets no answer, on its own: {first:?}"
    );
    assert_eq!(up.request_count(), 1, "the 51 callers shared one lookup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_caller_leaves_its_lookup_running_and_nothing_behind() {
    let up = Upstream::start().await;
    up.default_request(Reply::proxy("socks5://detached.test:1080").after(Duration::from_millis(300)));
    let b = broker(&up, "fallback_to_embedded: false", "").await;
    let caller = {
        let mut client = b.client();
        tokio::spawn(async move { client.request_proxy(request("kraken", HTTP, None)).await })
    };
    eventually("the lookup to reach the upstream", || {
        (up.request_count() == 1).then_some(())
    })
    .await;
    caller.abort();
    // The lookup goes on without its caller and fills the cache.
    let source = upstream::eventually_async("the detached lookup to fill the cache", || {
        let b = &b;
        async move {
            let r = b.ask("kraken", HTTP).await;
            (r.source() == ProxySource::Cache).then_some(r.proxy_url)
        }
    })
    .await;
    assert_eq!(source, "socks5://detached.test:1080");
    assert_eq!(up.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_full_of_stalled_streams_does_not_starve_another_client() {
    let up = Upstream::start().await;
    up.default_request(Reply::proxy("socks5://other.test:1080"));
    let b = TestBroker::start_yaml(
        &(upstream::config_yaml(&[up.url.as_str()], "", "") + "server:\n  request_body_timeout_seconds: 2\n"),
        &[],
    )
    .await;
    // A raw HTTP/2 connection that opens 2,000 RequestProxy streams: headers, never a body.
    let tcp = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut stalled = Vec::new();
    for _ in 0..2_000 {
        let req = http::Request::post(format!(
            "http://{}/proxybroker.v1.ProxyBroker/RequestProxy",
            b.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
        // The server allows `max_concurrent_streams` (256) at once: past that the client waits
        // for a free stream, which is the limit doing its work.
        match tokio::time::timeout(Duration::from_millis(500), h2.clone().ready()).await {
            Ok(Ok(mut ready)) => match ready.send_request(req, false) {
                Ok(stream) => stalled.push(stream),
                Err(_) => break,
            },
            _ => break,
        }
    }
    assert!(stalled.len() >= 256, "{} streams opened", stalled.len());
    // Another client is answered normally meanwhile.
    for exchange in ["binance", "okx", "bybit"] {
        let r = b.ask(exchange, HTTP).await;
        assert_eq!(r.proxy_url, "socks5://other.test:1080");
    }
    // The stalled streams end once their bodies are overdue (poll, no upper bound asserted).
    let (response, _body) = stalled.swap_remove(0);
    let response = response.await.unwrap();
    let mut status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    if status.is_none() {
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let _ = chunk;
        }
        let trailers = body.trailers().await.unwrap().unwrap_or_default();
        status = trailers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned());
    }
    assert!(
        status.as_deref().is_some_and(|s| s != "0"),
        "a stalled stream ends with an error status: {status:?}"
    );
}

#[tokio::test]
async fn list_cache_pages_through_every_entry_in_key_order() {
    let up = Upstream::start().await;
    up.default_request(Reply::proxy("socks5://paged.test:1080"));
    let b = broker(&up, "", "").await;
    for i in 0..25 {
        b.ask(&format!("ex{i:02}"), HTTP).await;
    }
    let mut admin = b.admin();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .list_cache(ListCacheRequest {
                page_size: 10,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.entries.len() <= 10);
        seen.extend(page.entries.into_iter().map(|e| e.exchange_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 10, "pagination ends");
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = (0..25).map(|i| format!("ex{i:02}")).collect();
    assert_eq!(seen, want, "every entry once, in key order");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 25);

    for (request, field) in [
        (
            ListCacheRequest {
                page_size: 1001,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListCacheRequest {
                page_token: "not-a-token".into(),
                ..Default::default()
            },
            "page_token",
        ),
    ] {
        let e = admin.list_cache(request).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }
}

#[tokio::test]
async fn an_ejected_proxy_is_replaced_for_that_exchange_and_kept_for_the_others() {
    let up = Upstream::start().await;
    up.default_request(Reply::proxy("socks5://ejected.test:1080"));
    let b = broker(&up, "eject_after_failures: 1", "").await;
    for i in 0..5 {
        b.ask(&format!("ex{i}"), HTTP).await;
    }
    assert_eq!(upstream::list_cache(&b).await.len(), 5);
    let mut client = b.client();
    client
        .report_feedback(proxy_broker::pb::ProxyFeedback {
            proxy_url: "socks5://ejected.test:1080".into(),
            exchange_id: "ex0".into(),
            connection_type: HTTP.into(),
            success: false,
            ..Default::default()
        })
        .await
        .unwrap();
    up.queue_requests([Reply::proxy("socks5://fresh.test:1080")]);
    let r = b.ask("ex0", HTTP).await;
    assert_eq!(
        (r.proxy_url.as_str(), r.source()),
        ("socks5://fresh.test:1080", ProxySource::Upstream),
        "asked afresh for ex0"
    );
    let r = b.ask("ex3", HTTP).await;
    assert_eq!(
        (r.proxy_url.as_str(), r.source()),
        ("socks5://ejected.test:1080", ProxySource::Cache),
        "ejected for ex0 only"
    );
    assert_eq!(up.request_count(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_concurrent_requests_admin_calls_are_shed_with_a_retry_hint_and_feed_calls_are_not() {
    let up = Upstream::start().await;
    up.default_request(Reply::proxy("socks5://admin.test:1080"));
    let b = TestBroker::start_yaml(
        &(upstream::config_yaml(&[up.url.as_str()], "", "")
            + "server:\n  max_concurrent_requests: 1\n  request_body_timeout_seconds: 30\n"),
        &[],
    )
    .await;
    // An admin call that sends its headers and not its body holds the only admin slot. Now and
    // then (about one run in three on this machine) the held call does not take the slot before
    // the probes give up; each attempt holds a fresh call, and one of three must see the shed.
    let mut shed = None;
    let mut holds = Vec::new();
    for _ in 0..3 {
        holds.push(hold_admin_slot(&b).await);
        if let Some(status) = probe_until_shed(&b).await {
            shed = Some(status);
            break;
        }
    }
    let shed = shed.expect("an admin call shed while another holds the only slot");
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("max_concurrent_requests"), "{shed:?}");
    let retry = tonic_types::StatusExt::get_details_retry_info(&shed).expect("a RetryInfo detail");
    assert!(retry.retry_delay.is_some_and(|d| !d.is_zero()), "{retry:?}");
    // Feed calls are not counted against the admin limit.
    for exchange in ["binance", "okx"] {
        assert_eq!(b.ask(exchange, HTTP).await.proxy_url, "socks5://admin.test:1080");
    }
}

/// Opens an admin call that sends its headers and never its body; the returned handles keep it
/// open.
async fn hold_admin_slot(
    b: &TestBroker,
) -> (
    h2::client::ResponseFuture,
    h2::SendStream<bytes::Bytes>,
    h2::client::SendRequest<bytes::Bytes>,
) {
    let tcp = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::post(format!(
        "http://{}/proxybroker.v1.ProxyBrokerAdmin/ListUpstreams",
        b.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, stream) = h2.send_request(req, false).unwrap();
    (response, stream, h2)
}

/// Admin calls until one is shed, for at most 5 s (bounded in time).
async fn probe_until_shed(b: &TestBroker) -> Option<tonic::Status> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        if let Err(status) = b
            .admin()
            .list_upstreams(proxy_broker::pb::ListUpstreamsRequest::default())
            .await
        {
            return Some(status);
        }
        // Poll interval; the deadline above bounds the loop.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}
