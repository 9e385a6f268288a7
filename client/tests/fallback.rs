//! Fallback policies on a failed connect, and the broker being down: local embedded configuration,
//! fail closed without one, direct only when the caller allows it.

mod common;

use std::time::Duration;

use common::*;
use proxy_broker_client::{ConnectionType, Error, FallbackPolicy, Source};

#[tokio::test]
async fn direct_connection_policy_retries_without_the_proxy() {
    let refusing = TestProxy::start(ProxyKind::Socks5Refusing).await;
    let upstream = Upstream::start(&refusing.url("socks5", None), "direct_connection").await;
    let broker = TestBroker::delegating(&upstream).await;
    let ws = WsServer::start(None).await;
    let client = client(&broker.url()).build().unwrap();

    let mut socket = client
        .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
        .await
        .unwrap();
    let route = socket.get_ref().route().clone();
    assert!(route.proxy.is_none());
    assert_eq!(route.fallback, Some(FallbackPolicy::DirectConnection));
    let local = socket.get_ref().local_addr().unwrap();
    assert_eq!(
        greet_and_echo(&mut socket).await,
        local,
        "the target sees the client directly"
    );
    assert_eq!(refusing.accepted(), 1, "the proxy was tried once first");

    // Both attempts are reported: the proxy's failure and the direct connection's success.
    upstream
        .wait_feedback("proxy failure", |f| f["success"] == false && f["proxy_url"] != "")
        .await;
    upstream
        .wait_feedback("direct success", |f| f["success"] == true && f["proxy_url"] == "")
        .await;
}

#[tokio::test]
async fn embedded_fallback_policy_retries_once_via_the_local_configuration() {
    let refusing = TestProxy::start(ProxyKind::Socks5Refusing).await;
    let local_proxy = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let upstream = Upstream::start(&refusing.url("socks5", None), "embedded_fallback").await;
    let broker = TestBroker::delegating(&upstream).await;
    let ws = WsServer::start(None).await;
    let client = client(&broker.url())
        .local_config(local_env(&local_proxy.url("socks5h", None)))
        .build()
        .unwrap();

    let mut socket = client
        .connect_websocket(&ws.url("ws", "localhost"), "binance")
        .await
        .unwrap();
    let route = socket.get_ref().route().clone();
    assert_eq!(route.source, Source::Local);
    assert_eq!(route.fallback, Some(FallbackPolicy::EmbeddedFallback));
    assert!(local_proxy.carried(greet_and_echo(&mut socket).await));
    assert_eq!(refusing.accepted(), 1);
}

#[tokio::test]
async fn embedded_fallback_retries_only_once() {
    let refusing = TestProxy::start(ProxyKind::Socks5Refusing).await;
    let also_refusing = TestProxy::start(ProxyKind::Socks5Refusing).await;
    let upstream = Upstream::start(&refusing.url("socks5", None), "embedded_fallback").await;
    let broker = TestBroker::delegating(&upstream).await;
    let ws = WsServer::start(None).await;
    let client = client(&broker.url())
        .local_config(local_env(&also_refusing.url("socks5", None)))
        .allow_direct_fallback(true)
        .build()
        .unwrap();

    let err = client
        .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::FallbackFailed {
                policy: "embedded_fallback",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!((refusing.accepted(), also_refusing.accepted()), (1, 1));
    assert!(ws.peers().is_empty(), "no direct connection");
}

#[tokio::test]
async fn embedded_fallback_without_a_local_configuration_returns_the_error() {
    let refusing = TestProxy::start(ProxyKind::Socks5Refusing).await;
    let upstream = Upstream::start(&refusing.url("socks5", None), "embedded_fallback").await;
    let broker = TestBroker::delegating(&upstream).await;
    let ws = WsServer::start(None).await;
    let client = client(&broker.url()).build().unwrap();
    let err = client
        .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(ws.peers().is_empty());
}

#[tokio::test]
async fn fail_policy_returns_the_error_and_tries_nothing_else() {
    let refusing = TestProxy::start(ProxyKind::Socks5Refusing).await;
    let local_proxy = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let upstream = Upstream::start(&refusing.url("socks5", None), "fail").await;
    let broker = TestBroker::delegating(&upstream).await;
    let ws = WsServer::start(None).await;
    let http = HttpServer::start().await;
    let client = client(&broker.url())
        .local_config(local_env(&local_proxy.url("socks5", None)))
        .allow_direct_fallback(true)
        .build()
        .unwrap();

    let err = client
        .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Connect { message, .. } if message.contains("socks5 handshake")),
        "{err}"
    );
    let err = client
        .http_get("binance", &http.url("127.0.0.1"))
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::Http { connect: true, .. }), "{err}");
    assert_eq!(local_proxy.accepted(), 0, "no fallback proxy");
    assert!(
        ws.peers().is_empty() && http.peers().is_empty(),
        "no direct connection"
    );
    assert_eq!(refusing.accepted(), 2);
}

#[tokio::test]
async fn every_websocket_resolve_asks_the_broker_so_a_failed_proxy_is_not_reused() {
    // Round robin over [refusing, working]: each WebSocket resolve is one RequestProxy (one
    // counted connection attempt), so the next connect after a failure gets the other member.
    let refusing = TestProxy::start(ProxyKind::Socks5Refusing).await;
    let working = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let broker = TestBroker::start(&format!(
        "proxy:\n  enabled: true\n  default:\n    websocket:\n      pool:\n        strategy: round_robin\n        proxies:\n          - url: \"{}\"\n          - url: \"{}\"\n",
        refusing.url("socks5", None),
        working.url("socks5", None)
    ))
    .await;
    let ws = WsServer::start(None).await;
    let client = client(&broker.url()).build().unwrap();

    // No cached answer is reused for WebSocket while the broker answers: the members alternate.
    let a = client
        .resolve("binance", ConnectionType::Websocket, None)
        .await
        .unwrap();
    let b = client
        .resolve("binance", ConnectionType::Websocket, None)
        .await
        .unwrap();
    assert_eq!(a.proxy.as_ref().unwrap().as_str(), refusing.url("socks5", None));
    assert_eq!(b.proxy.as_ref().unwrap().as_str(), working.url("socks5", None));

    assert!(
        client
            .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
            .await
            .is_err()
    );
    let mut socket = client
        .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
        .await
        .unwrap();
    assert!(working.carried(greet_and_echo(&mut socket).await));
}

#[tokio::test]
async fn without_the_cache_every_resolve_asks_the_broker() {
    let broker = TestBroker::start(
        "proxy:\n  enabled: true\n  default:\n    http:\n      pool:\n        strategy: round_robin\n        proxies:\n          - url: \"socks5://127.0.0.1:1\"\n          - url: \"socks5://127.0.0.1:2\"\n",
    )
    .await;
    let client = client(&broker.url())
        .max_cache_ttl(Duration::ZERO)
        .build()
        .unwrap();
    let mut ports = Vec::new();
    for _ in 0..4 {
        let r = client
            .resolve("binance", ConnectionType::Http, None)
            .await
            .unwrap();
        assert_eq!(r.source, Source::Embedded);
        assert_eq!(r.ttl, Duration::from_secs(300));
        ports.push(r.proxy.unwrap().port());
    }
    assert_eq!(ports, [1, 2, 1, 2]);
}

#[tokio::test]
async fn a_stopped_broker_falls_back_to_the_local_configuration() {
    let broker_proxy = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let local_proxy = TestProxy::start(ProxyKind::Socks4 { user_id: None }).await;
    let broker = TestBroker::embedded(&broker_proxy.url("socks5", None)).await;
    let ws = WsServer::start(None).await;
    let http = HttpServer::start().await;
    let client = client(&broker.url())
        .local_config(local_env(&local_proxy.url("socks4a", None)))
        .max_cache_ttl(Duration::ZERO)
        .build()
        .unwrap();

    let before = client
        .resolve("binance", ConnectionType::Websocket, None)
        .await
        .unwrap();
    assert_eq!(before.source, Source::Embedded);
    broker.stop().await;

    // The stopped broker's last connection drains (HTTP/2 GOAWAY) before the channel sees it gone.
    let after = eventually(
        "the client notices the broker is gone",
        Duration::from_secs(10),
        || async {
            let r = client
                .resolve("binance", ConnectionType::Websocket, None)
                .await
                .unwrap();
            (r.source != Source::Embedded).then_some(r)
        },
    )
    .await;
    assert_eq!(after.source, Source::Local);
    assert_eq!(after.proxy.unwrap().as_str(), local_proxy.url("socks4a", None));

    let mut socket = client
        .connect_websocket(&ws.url("ws", "localhost"), "binance")
        .await
        .unwrap();
    assert_eq!(socket.get_ref().route().source, Source::Local);
    assert!(local_proxy.carried(greet_and_echo(&mut socket).await));
    let body = client
        .http_get("binance", &http.url("localhost"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(local_proxy.carried(greeted_peer(&body)));
    assert!(broker_proxy.tunnels().is_empty());
}

#[tokio::test]
async fn a_stopped_broker_without_local_configuration_fails_closed() {
    let broker = TestBroker::embedded("socks5://127.0.0.1:1").await;
    let ws = WsServer::start(None).await;
    let http = HttpServer::start().await;
    let client = client(&broker.url()).build().unwrap();
    broker.stop().await;

    let err = client
        .resolve("binance", ConnectionType::Websocket, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoRoute { .. }), "{err}");
    let err = client
        .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refusing to connect directly"), "{err}");
    assert!(client.http_get("binance", &http.url("127.0.0.1")).await.is_err());
    assert!(
        ws.peers().is_empty() && http.peers().is_empty(),
        "no direct connection"
    );
}

#[tokio::test]
async fn a_stopped_broker_allows_direct_only_when_the_caller_said_so() {
    let broker = TestBroker::embedded("socks5://127.0.0.1:1").await;
    let ws = WsServer::start(None).await;
    let client = client(&broker.url()).allow_direct_fallback(true).build().unwrap();
    broker.stop().await;

    let mut socket = client
        .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
        .await
        .unwrap();
    assert_eq!(socket.get_ref().route().source, Source::AllowedDirect);
    let local = socket.get_ref().local_addr().unwrap();
    assert_eq!(greet_and_echo(&mut socket).await, local);
}

#[tokio::test]
async fn a_broker_that_does_not_answer_in_time_counts_as_down() {
    // Accepts connections and never speaks.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let local_proxy = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let client = client(&format!("http://{addr}"))
        .broker_timeout(Duration::from_millis(300))
        .local_config(local_env(&local_proxy.url("socks5", None)))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let r = client
        .resolve("binance", ConnectionType::Http, None)
        .await
        .unwrap();
    assert_eq!(r.source, Source::Local);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    holder.abort();
}

#[tokio::test]
async fn an_unavailable_answer_falls_back_to_the_local_configuration() {
    // The broker's only upstream is down and it may not fall back itself: it answers UNAVAILABLE.
    let dead = dead_addr().await;
    let broker = TestBroker::start(&format!(
        "proxy:\n  enabled: true\n  external_service:\n    enabled: true\n    endpoints: [\"http://{dead}\"]\n    auth_credentials: {{ token: t }}\n    fallback_to_embedded: false\n"
    ))
    .await;
    let mut raw = proxy_broker_client::BrokerClient::new(&broker.url())
        .unwrap()
        .raw();
    let status = raw
        .request_proxy(proxy_broker_client::pb::ProxyRequest {
            exchange_id: "binance".into(),
            connection_type: proxy_broker_client::pb::ConnectionType::Http.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "precondition: {status:?}"
    );

    let client = client(&broker.url())
        .local_config(local_env("http://127.0.0.1:3128"))
        .build()
        .unwrap();
    let r = client
        .resolve("binance", ConnectionType::Http, None)
        .await
        .unwrap();
    assert_eq!(r.source, Source::Local);
    assert_eq!(r.proxy.unwrap().as_str(), "http://127.0.0.1:3128");

    let strict = common::client(&broker.url()).build().unwrap();
    let err = strict
        .resolve("binance", ConnectionType::Http, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NoRoute { reason } if reason.contains("Unavailable")),
        "{err}"
    );
}

#[tokio::test]
async fn the_local_configuration_is_used_only_when_the_broker_is_down() {
    let broker_proxy = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let broker = TestBroker::embedded(&broker_proxy.url("socks5", None)).await;
    let client = client(&broker.url())
        .local_config(local_env("socks5://127.0.0.1:9"))
        .build()
        .unwrap();
    let r = client
        .resolve("binance", ConnectionType::Websocket, None)
        .await
        .unwrap();
    assert_eq!(r.source, Source::Embedded);
    assert_eq!(r.proxy.unwrap().as_str(), broker_proxy.url("socks5", None));
}
