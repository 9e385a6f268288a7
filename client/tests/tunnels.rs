//! Traffic goes through the proxy the broker hands out, for ws, wss and http, per scheme. The
//! proof is on both sides: the proxy logs each tunnel with the address form it was asked for and
//! its own outbound address, and the target reports the peer it saw, which must be one of them.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proxy_broker_client::{BrokerClient, Source};

struct Seen {
    tunnels: Vec<Tunnel>,
}

/// Opens ws, wss (TLS inside the tunnel, throw-away CA trusted by the client) and two HTTP
/// requests (`http_get` and `http_client`) to targets named `host`, through the broker's choice
/// `proxy_url` served by `proxy`; checks each target saw the proxy.
async fn ws_wss_http_through(proxy: &TestProxy, proxy_url: &str, host: &str) -> Seen {
    let ca = TestCa::new();
    let ws = WsServer::start(None).await;
    let wss = WsServer::start(Some(ca.server_config.clone())).await;
    let http = HttpServer::start().await;
    let broker = TestBroker::embedded(proxy_url).await;
    let client: BrokerClient = client(&broker.url())
        .root_ca_pem(ca.ca_pem.clone())
        .build()
        .unwrap();

    for (server, scheme) in [(&ws, "ws"), (&wss, "wss")] {
        let mut socket = client
            .connect_websocket(&server.url(scheme, host), "binance")
            .await
            .unwrap_or_else(|e| panic!("{scheme} via {proxy_url}: {e}"));
        let conn = socket.get_ref();
        assert_eq!(conn.route().proxy.as_ref().unwrap().as_str(), proxy_url);
        assert_eq!(conn.route().source, Source::Embedded);
        assert_eq!(
            conn.peer_addr(),
            Some(proxy.addr),
            "the TCP connection goes to the proxy"
        );
        let peer = greet_and_echo(&mut socket).await;
        assert!(
            proxy.carried(peer),
            "{scheme}: target saw {peer}, not the proxy: {:?}",
            proxy.tunnels()
        );
        assert_eq!(server.peers(), vec![peer]);
    }

    let body = client
        .http_get("binance", &http.url(host))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let peer = greeted_peer(&body);
    assert!(
        proxy.carried(peer),
        "http_get: target saw {peer}: {:?}",
        proxy.tunnels()
    );

    let reqwest_client = client.http_client("binance").await.unwrap();
    let body = reqwest_client
        .get(http.url(host))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let peer = greeted_peer(&body);
    assert!(
        proxy.carried(peer),
        "http_client: target saw {peer}: {:?}",
        proxy.tunnels()
    );

    assert_eq!(http.peers().len(), 2);
    assert!(proxy.problems().is_empty(), "{:?}", proxy.problems());
    // Every connection a target accepted came out of a tunnel, and every tunnel reached a target
    // (the two HTTP requests may share one pooled connection).
    let mut target_peers: Vec<_> = ws
        .peers()
        .into_iter()
        .chain(wss.peers())
        .chain(http.peers())
        .collect();
    target_peers.sort();
    target_peers.dedup();
    let tunnels = proxy.tunnels();
    assert_eq!(
        tunnels.len(),
        target_peers.len(),
        "one tunnel per target connection: {tunnels:?}"
    );
    assert!(target_peers.iter().all(|p| proxy.carried(*p)));
    broker.stop().await;
    Seen { tunnels }
}

#[tokio::test]
async fn socks5_resolves_names_locally_for_ws_wss_and_http() {
    let proxy = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let seen = ws_wss_http_through(&proxy, &proxy.url("socks5", None), "localhost").await;
    for t in &seen.tunnels {
        assert!(
            matches!(t.asked, Asked::Ip(a) if a.ip().is_loopback()),
            "socks5 sends addresses: {t:?}"
        );
        assert_eq!(t.how, "SOCKS5");
        assert_eq!(t.user, None);
    }
}

#[tokio::test]
async fn socks5h_lets_the_proxy_resolve_names() {
    let proxy = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let seen = ws_wss_http_through(&proxy, &proxy.url("socks5h", None), "localhost").await;
    for t in &seen.tunnels {
        assert!(
            matches!(&t.asked, Asked::Domain(h, _) if h == "localhost"),
            "socks5h sends the name: {t:?}"
        );
    }
}

#[tokio::test]
async fn socks5_username_and_password_come_from_the_proxy_url() {
    let proxy = TestProxy::start(ProxyKind::Socks5 {
        auth: Some(("feed".into(), "s3cr:et".into())),
    })
    .await;
    // The password is percent-encoded in the URL and must reach the proxy decoded.
    let seen = ws_wss_http_through(
        &proxy,
        &proxy.url("socks5h", Some(("feed", "s3cr%3Aet"))),
        "localhost",
    )
    .await;
    assert!(
        seen.tunnels.iter().all(|t| t.user.as_deref() == Some("feed")),
        "{:?}",
        seen.tunnels
    );
}

#[tokio::test]
async fn socks5_wrong_password_fails_without_a_tunnel_and_the_error_hides_it() {
    let proxy = TestProxy::start(ProxyKind::Socks5 {
        auth: Some(("feed".into(), "right".into())),
    })
    .await;
    let ws = WsServer::start(None).await;
    let broker = TestBroker::embedded(&proxy.url("socks5", Some(("feed", "wrong-pw")))).await;
    let client = client(&broker.url()).build().unwrap();
    let err = client
        .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("socks5 handshake"), "{err}");
    assert!(!err.contains("wrong-pw"), "password leaked: {err}");
    assert!(proxy.tunnels().is_empty());
    assert!(ws.peers().is_empty(), "no connection may reach the target");
    assert!(proxy.problems().iter().any(|p| p.contains("wrong credentials")));
}

#[tokio::test]
async fn socks4_sends_ipv4_addresses() {
    let proxy = TestProxy::start(ProxyKind::Socks4 { user_id: None }).await;
    let seen = ws_wss_http_through(&proxy, &proxy.url("socks4", None), "localhost").await;
    for t in &seen.tunnels {
        assert_eq!(t.how, "SOCKS4", "{t:?}");
        assert!(matches!(t.asked, Asked::Ip(a) if a.is_ipv4()), "{t:?}");
    }
}

#[tokio::test]
async fn socks4a_sends_the_host_name() {
    let proxy = TestProxy::start(ProxyKind::Socks4 { user_id: None }).await;
    let seen = ws_wss_http_through(&proxy, &proxy.url("socks4a", None), "localhost").await;
    for t in &seen.tunnels {
        assert_eq!(t.how, "SOCKS4A", "{t:?}");
        assert!(
            matches!(&t.asked, Asked::Domain(h, _) if h == "localhost"),
            "{t:?}"
        );
    }
}

#[tokio::test]
async fn socks4_user_id_comes_from_the_proxy_url() {
    let proxy = TestProxy::start(ProxyKind::Socks4 {
        user_id: Some("feed-7".into()),
    })
    .await;
    let ws = WsServer::start(None).await;
    let broker = TestBroker::embedded(&proxy.url("socks4a", Some(("feed-7", "")))).await;
    let client = client(&broker.url()).build().unwrap();
    let mut socket = client
        .connect_websocket(&ws.url("ws", "localhost"), "kraken")
        .await
        .unwrap();
    let peer = greet_and_echo(&mut socket).await;
    assert!(proxy.carried(peer));
    assert_eq!(proxy.tunnels()[0].user.as_deref(), Some("feed-7"));
}

#[tokio::test]
async fn http_proxy_tunnels_websockets_with_connect_and_basic_auth() {
    let proxy = TestProxy::start(ProxyKind::Http {
        auth: Some(("feed".into(), "pa ss".into())),
    })
    .await;
    let seen = ws_wss_http_through(&proxy, &proxy.url("http", Some(("feed", "pa%20ss"))), "localhost").await;
    // WebSockets use CONNECT (name resolved by the proxy); reqwest forwards plain http requests.
    let hows: Vec<_> = seen.tunnels.iter().map(|t| t.how).collect();
    assert_eq!(hows, ["CONNECT", "CONNECT", "FORWARD", "FORWARD"]);
    assert!(seen.tunnels.iter().all(|t| t.user.as_deref() == Some("feed")));
    assert!(matches!(&seen.tunnels[0].asked, Asked::Domain(h, _) if h == "localhost"));
}

#[tokio::test]
async fn https_proxy_speaks_tls_to_the_proxy_then_connect() {
    // The proxy's certificate comes from the same throw-away CA the client is told to trust.
    let ca = TestCa::new();
    let proxy = TestProxy::start(ProxyKind::Https {
        auth: Some(("feed".into(), "pw".into())),
        tls: ca.server_config.clone(),
    })
    .await;
    let proxy_url = format!("https://feed:pw@localhost:{}", proxy.addr.port());
    let ws = WsServer::start(None).await;
    let wss = WsServer::start(Some(ca.server_config.clone())).await;
    let http = HttpServer::start().await;
    let broker = TestBroker::embedded(&proxy_url).await;
    let client = client(&broker.url())
        .root_ca_pem(ca.ca_pem.clone())
        .build()
        .unwrap();

    for (server, scheme) in [(&ws, "ws"), (&wss, "wss")] {
        let mut socket = client
            .connect_websocket(&server.url(scheme, "localhost"), "binance")
            .await
            .unwrap_or_else(|e| panic!("{scheme}: {e}"));
        let peer = greet_and_echo(&mut socket).await;
        assert!(proxy.carried(peer), "{scheme}: {peer} {:?}", proxy.tunnels());
    }
    let body = client
        .http_get("binance", &http.url("localhost"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(proxy.carried(greeted_peer(&body)), "{body} {:?}", proxy.tunnels());
    assert!(proxy.problems().is_empty(), "{:?}", proxy.problems());
    assert!(proxy.tunnels().iter().all(|t| t.user.as_deref() == Some("feed")));
}

#[tokio::test]
async fn http_proxy_without_credentials_is_refused_with_407() {
    let proxy = TestProxy::start(ProxyKind::Http {
        auth: Some(("feed".into(), "pw".into())),
    })
    .await;
    let ws = WsServer::start(None).await;
    let broker = TestBroker::embedded(&proxy.url("http", None)).await;
    let client = client(&broker.url()).build().unwrap();
    let err = client
        .connect_websocket(&ws.url("ws", "localhost"), "binance")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("407"), "{err}");
    assert!(ws.peers().is_empty());
}

#[tokio::test]
async fn direct_answers_connect_directly() {
    let ws = WsServer::start(None).await;
    // proxy.enabled false: the broker answers DIRECT.
    let broker = TestBroker::start("proxy:\n  enabled: false\n").await;
    let client = client(&broker.url()).build().unwrap();
    let mut socket = client
        .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
        .await
        .unwrap();
    assert_eq!(socket.get_ref().route().source, Source::Direct);
    assert!(socket.get_ref().route().proxy.is_none());
    let local = socket.get_ref().local_addr().unwrap();
    assert_eq!(
        greet_and_echo(&mut socket).await,
        local,
        "the target sees the client itself"
    );
}
