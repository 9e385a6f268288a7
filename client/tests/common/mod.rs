//! Real servers on loopback for the client's tests: SOCKS5 (with and without username/password),
//! SOCKS4/4a, an HTTP proxy (CONNECT and forward), WebSocket echo servers (plain and TLS with a
//! throw-away CA), an HTTP server, a fake upstream proxy service for the broker, and the real
//! broker in-process. Every server records what it saw, so tests can prove where traffic went.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use proxy_broker::BrokerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// Polls `check` until it returns `Some`, failing the test after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Proxies
// ---------------------------------------------------------------------------------------------

/// The address form a client asked the proxy to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// A host name (SOCKS5 ATYP 3, SOCKS4a, or an HTTP authority with a name).
    Domain(String, u16),
    /// An address (SOCKS5 ATYP 1/4, SOCKS4, or an HTTP authority with an IP).
    Ip(SocketAddr),
}

/// One tunnel the proxy opened.
#[derive(Debug, Clone)]
pub struct Tunnel {
    /// What the client asked for.
    pub asked: Asked,
    /// The proxy's own address on its connection to the target: what the target sees.
    pub outbound: SocketAddr,
    /// The user the client authenticated as (SOCKS5 user, SOCKS4 user id, HTTP Basic user).
    pub user: Option<String>,
    /// `SOCKS5`, `SOCKS4`, `SOCKS4A`, `CONNECT` or `FORWARD`.
    pub how: &'static str,
}

/// What kind of proxy to run.
#[derive(Debug, Clone)]
pub enum ProxyKind {
    /// SOCKS5, optionally requiring username/password.
    Socks5 { auth: Option<(String, String)> },
    /// SOCKS4 and SOCKS4a, optionally requiring a user id.
    Socks4 { user_id: Option<String> },
    /// HTTP proxy (CONNECT, and absolute-form forwarding), optionally requiring Basic auth.
    Http { auth: Option<(String, String)> },
    /// HTTP proxy spoken to over TLS (`https://` proxy URLs), optionally requiring Basic auth.
    Https {
        auth: Option<(String, String)>,
        tls: Arc<rustls::ServerConfig>,
    },
    /// Speaks SOCKS5 but refuses every CONNECT (reply 0x05, connection refused).
    Socks5Refusing,
}

#[derive(Debug, Default)]
pub struct ProxyLog {
    pub tunnels: Mutex<Vec<Tunnel>>,
    /// Client connections accepted (handshake attempts).
    pub accepted: AtomicUsize,
    /// Protocol violations and refused handshakes, described.
    pub problems: Mutex<Vec<String>>,
}

/// A proxy on 127.0.0.1.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub log: Arc<ProxyLog>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestProxy {
    pub async fn start(kind: ProxyKind) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(ProxyLog::default());
        let task = {
            let log = log.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    log.accepted.fetch_add(1, Ordering::SeqCst);
                    let (kind, log) = (kind.clone(), log.clone());
                    tokio::spawn(async move {
                        let result = match &kind {
                            ProxyKind::Socks5 { auth } => socks5(client, auth.as_ref(), false, &log).await,
                            ProxyKind::Socks5Refusing => socks5(client, None, true, &log).await,
                            ProxyKind::Socks4 { user_id } => socks4(client, user_id.as_deref(), &log).await,
                            ProxyKind::Http { auth } => http_proxy(client, auth.as_ref(), &log).await,
                            ProxyKind::Https { auth, tls } => {
                                match tokio_rustls::TlsAcceptor::from(tls.clone()).accept(client).await {
                                    Ok(stream) => http_proxy(stream, auth.as_ref(), &log).await,
                                    Err(e) => Err(format!("https proxy: TLS handshake: {e}")),
                                }
                            }
                        };
                        if let Err(e) = result {
                            log.problems.lock().unwrap().push(e);
                        }
                    });
                }
            })
        };
        Self { addr, log, task }
    }

    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.log.tunnels.lock().unwrap().clone()
    }

    pub fn problems(&self) -> Vec<String> {
        self.log.problems.lock().unwrap().clone()
    }

    pub fn accepted(&self) -> usize {
        self.log.accepted.load(Ordering::SeqCst)
    }

    /// The proxy's URL with this scheme and optional credentials.
    pub fn url(&self, scheme: &str, credentials: Option<(&str, &str)>) -> String {
        match credentials {
            Some((u, p)) => format!("{scheme}://{u}:{p}@{}", self.addr),
            None => format!("{scheme}://{}", self.addr),
        }
    }

    /// Whether `peer` (as seen by a target) is one of this proxy's outbound connections.
    pub fn carried(&self, peer: SocketAddr) -> bool {
        self.tunnels().iter().any(|t| t.outbound == peer)
    }
}

async fn connect_target(asked: &Asked) -> std::io::Result<TcpStream> {
    match asked {
        Asked::Domain(host, port) => TcpStream::connect((host.as_str(), *port)).await,
        Asked::Ip(addr) => TcpStream::connect(addr).await,
    }
}

async fn splice<C, T>(mut client: C, mut target: T)
where
    C: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::io::copy_bidirectional(&mut client, &mut target).await;
}

async fn read_u16(s: &mut TcpStream) -> Result<u16, String> {
    s.read_u16().await.map_err(|e| e.to_string())
}

async fn socks5(
    mut c: TcpStream,
    auth: Option<&(String, String)>,
    refuse: bool,
    log: &ProxyLog,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("socks5: {e}");
    let ver = c.read_u8().await.map_err(io)?;
    if ver != 5 {
        return Err(format!("socks5: version byte {ver}, expected 5"));
    }
    let n = c.read_u8().await.map_err(io)?;
    let mut methods = vec![0; n as usize];
    c.read_exact(&mut methods).await.map_err(io)?;
    let mut user = None;
    match auth {
        Some((want_user, want_pass)) => {
            if !methods.contains(&2) {
                c.write_all(&[5, 0xff]).await.map_err(io)?;
                return Err(format!(
                    "socks5: client offered methods {methods:?} without username/password"
                ));
            }
            c.write_all(&[5, 2]).await.map_err(io)?;
            let sub = c.read_u8().await.map_err(io)?;
            if sub != 1 {
                return Err(format!("socks5: auth sub-negotiation version {sub}"));
            }
            let ulen = c.read_u8().await.map_err(io)?;
            let mut u = vec![0; ulen as usize];
            c.read_exact(&mut u).await.map_err(io)?;
            let plen = c.read_u8().await.map_err(io)?;
            let mut p = vec![0; plen as usize];
            c.read_exact(&mut p).await.map_err(io)?;
            let (u, p) = (
                String::from_utf8_lossy(&u).into_owned(),
                String::from_utf8_lossy(&p).into_owned(),
            );
            if &u != want_user || &p != want_pass {
                c.write_all(&[1, 1]).await.map_err(io)?;
                return Err(format!("socks5: wrong credentials for user {u:?}"));
            }
            c.write_all(&[1, 0]).await.map_err(io)?;
            user = Some(u);
        }
        None => {
            if !methods.contains(&0) {
                c.write_all(&[5, 0xff]).await.map_err(io)?;
                return Err(format!(
                    "socks5: client offered methods {methods:?} without no-auth"
                ));
            }
            c.write_all(&[5, 0]).await.map_err(io)?;
        }
    }
    let mut head = [0u8; 4];
    c.read_exact(&mut head).await.map_err(io)?;
    if head[0] != 5 || head[1] != 1 || head[2] != 0 {
        return Err(format!("socks5: request header {head:?}, expected CONNECT"));
    }
    let asked = match head[3] {
        1 => {
            let mut ip = [0u8; 4];
            c.read_exact(&mut ip).await.map_err(io)?;
            Asked::Ip(SocketAddr::from((ip, read_u16(&mut c).await?)))
        }
        4 => {
            let mut ip = [0u8; 16];
            c.read_exact(&mut ip).await.map_err(io)?;
            Asked::Ip(SocketAddr::from((ip, read_u16(&mut c).await?)))
        }
        3 => {
            let len = c.read_u8().await.map_err(io)?;
            let mut name = vec![0; len as usize];
            c.read_exact(&mut name).await.map_err(io)?;
            Asked::Domain(
                String::from_utf8_lossy(&name).into_owned(),
                read_u16(&mut c).await?,
            )
        }
        t => return Err(format!("socks5: address type {t}")),
    };
    if refuse {
        c.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await.map_err(io)?;
        return Ok(());
    }
    let target = match connect_target(&asked).await {
        Ok(t) => t,
        Err(e) => {
            c.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await.map_err(io)?;
            return Err(format!("socks5: target {asked:?} unreachable: {e}"));
        }
    };
    let outbound = target.local_addr().map_err(io)?;
    c.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await.map_err(io)?;
    log.tunnels.lock().unwrap().push(Tunnel {
        asked,
        outbound,
        user,
        how: "SOCKS5",
    });
    splice(c, target).await;
    Ok(())
}

async fn read_cstr(c: &mut TcpStream) -> Result<String, String> {
    let mut out = Vec::new();
    loop {
        let b = c.read_u8().await.map_err(|e| format!("socks4: {e}"))?;
        if b == 0 {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.push(b);
        if out.len() > 255 {
            return Err("socks4: string too long".into());
        }
    }
}

async fn socks4(mut c: TcpStream, want_user: Option<&str>, log: &ProxyLog) -> Result<(), String> {
    let io = |e: std::io::Error| format!("socks4: {e}");
    let ver = c.read_u8().await.map_err(io)?;
    let cmd = c.read_u8().await.map_err(io)?;
    if ver != 4 || cmd != 1 {
        return Err(format!(
            "socks4: version {ver} command {cmd}, expected 4 / CONNECT"
        ));
    }
    let port = read_u16(&mut c).await?;
    let mut ip = [0u8; 4];
    c.read_exact(&mut ip).await.map_err(io)?;
    let user = read_cstr(&mut c).await?;
    // SOCKS4a: 0.0.0.x with x != 0 means "a host name follows the user id".
    let (asked, how) = if ip[..3] == [0, 0, 0] && ip[3] != 0 {
        (Asked::Domain(read_cstr(&mut c).await?, port), "SOCKS4A")
    } else {
        (Asked::Ip(SocketAddr::from((ip, port))), "SOCKS4")
    };
    if let Some(want) = want_user
        && user != want
    {
        c.write_all(&[0, 0x5d, 0, 0, 0, 0, 0, 0]).await.map_err(io)?;
        return Err(format!("socks4: user id {user:?}, expected {want:?}"));
    }
    let target = match connect_target(&asked).await {
        Ok(t) => t,
        Err(e) => {
            c.write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]).await.map_err(io)?;
            return Err(format!("socks4: target {asked:?} unreachable: {e}"));
        }
    };
    let outbound = target.local_addr().map_err(io)?;
    c.write_all(&[0, 0x5a, 0, 0, 0, 0, 0, 0]).await.map_err(io)?;
    log.tunnels.lock().unwrap().push(Tunnel {
        asked,
        outbound,
        user: (!user.is_empty()).then_some(user),
        how,
    });
    splice(c, target).await;
    Ok(())
}

fn parse_authority(authority: &str) -> Result<Asked, String> {
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return Ok(Asked::Ip(addr));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("authority {authority:?} has no port"))?;
    let port = port.parse().map_err(|_| format!("bad port in {authority:?}"))?;
    Ok(Asked::Domain(host.to_owned(), port))
}

async fn http_proxy<S: AsyncRead + AsyncWrite + Unpin>(
    mut c: S,
    auth: Option<&(String, String)>,
    log: &ProxyLog,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("http proxy: {e}");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(c.read_u8().await.map_err(io)?);
        if head.len() > 16 * 1024 {
            return Err("http proxy: head too long".into());
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut user = None;
    if let Some((want_user, want_pass)) = auth {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{want_user}:{want_pass}"))
        );
        let got = headers
            .iter()
            .find(|(k, _)| k == "proxy-authorization")
            .map(|(_, v)| v.clone());
        if got.as_deref() != Some(expected.as_str()) {
            c.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n")
                .await
                .map_err(io)?;
            return Err(format!(
                "http proxy: Proxy-Authorization {got:?} is not Basic for {want_user}"
            ));
        }
        user = Some(want_user.clone());
    }
    let mut parts = request_line.split_whitespace();
    let (method, target_text, version) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default(),
    );
    if !version.starts_with("HTTP/1.") {
        return Err(format!("http proxy: request line {request_line:?}"));
    }
    if method == "CONNECT" {
        let host_header = headers.iter().find(|(k, _)| k == "host").map(|(_, v)| v.clone());
        if host_header.as_deref() != Some(target_text.as_str()) {
            return Err(format!(
                "http proxy: CONNECT {target_text} with Host {host_header:?}"
            ));
        }
        let asked = parse_authority(&target_text)?;
        let target = connect_target(&asked)
            .await
            .map_err(|e| format!("http proxy: target {asked:?}: {e}"))?;
        let outbound = target.local_addr().map_err(io)?;
        c.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .map_err(io)?;
        log.tunnels.lock().unwrap().push(Tunnel {
            asked,
            outbound,
            user,
            how: "CONNECT",
        });
        splice(c, target).await;
        return Ok(());
    }
    // Forward proxying: `GET http://host:port/path HTTP/1.1`.
    let rest = target_text
        .strip_prefix("http://")
        .ok_or_else(|| format!("http proxy: {method} {target_text} is neither CONNECT nor absolute-form"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let asked = parse_authority(authority)?;
    let mut target = connect_target(&asked)
        .await
        .map_err(|e| format!("http proxy: target {asked:?}: {e}"))?;
    let outbound = target.local_addr().map_err(io)?;
    let mut forwarded = format!("{method} {path} {version}\r\n");
    for (k, v) in &headers {
        if k != "proxy-authorization" && k != "proxy-connection" && k != "connection" {
            forwarded.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    forwarded.push_str("connection: close\r\n\r\n");
    target.write_all(forwarded.as_bytes()).await.map_err(io)?;
    log.tunnels.lock().unwrap().push(Tunnel {
        asked,
        outbound,
        user,
        how: "FORWARD",
    });
    splice(c, target).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------------------------

/// A throw-away CA and a certificate for `localhost` / 127.0.0.1 signed by it.
pub struct TestCa {
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

impl TestCa {
    pub fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "proxy-broker-client test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
        Self {
            ca_pem: ca.pem(),
            server_config: Arc::new(server_config),
        }
    }
}

/// A WebSocket server: greets each connection with `hello <peer address>`, then echoes.
pub struct WsServer {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WsServer {
    /// Plain `ws://`, or `wss://` when `tls` is given.
    pub async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let peers = peers.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, peer)) = listener.accept().await else {
                        return;
                    };
                    peers.lock().unwrap().push(peer);
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        match tls {
                            None => serve_ws(tcp, peer).await,
                            Some(config) => {
                                if let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                                {
                                    serve_ws(stream, peer).await;
                                }
                            }
                        }
                    });
                }
            })
        };
        Self { addr, peers, task }
    }

    pub fn url(&self, scheme: &str, host: &str) -> String {
        format!("{scheme}://{host}:{}/stream", self.addr.port())
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

async fn serve_ws<S: AsyncRead + AsyncWrite + Unpin>(stream: S, peer: SocketAddr) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    if ws.send(Message::text(format!("hello {peer}"))).await.is_err() {
        return;
    }
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

/// Reads the greeting and checks the echo; returns the peer address the server saw.
pub async fn greet_and_echo<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
) -> SocketAddr {
    let greeting = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("greeting in time")
        .expect("a message")
        .expect("not an error");
    let peer = greeting
        .to_text()
        .unwrap()
        .strip_prefix("hello ")
        .expect("greeting")
        .parse()
        .unwrap();
    ws.send(Message::text("ping 42")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo in time")
        .unwrap()
        .unwrap();
    assert_eq!(echo.to_text().unwrap(), "ping 42");
    peer
}

/// An HTTP server answering every `GET /` with `hello <peer address>`.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpServer {
    pub async fn start() -> Self {
        use axum::extract::{ConnectInfo, State};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route(
                "/",
                axum::routing::get(
                    |State(peers): State<Arc<Mutex<Vec<SocketAddr>>>>,
                     ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                        peers.lock().unwrap().push(peer);
                        format!("hello {peer}")
                    },
                ),
            )
            .with_state(peers.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await;
        });
        Self { addr, peers, task }
    }

    pub fn url(&self, host: &str) -> String {
        format!("http://{host}:{}/", self.addr.port())
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

/// Parses `hello <peer>` from a response body.
pub fn greeted_peer(body: &str) -> SocketAddr {
    body.strip_prefix("hello ")
        .expect("greeting body")
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Upstream proxy service (what the broker delegates to) and the broker
// ---------------------------------------------------------------------------------------------

/// A fake upstream proxy service: answers every request with `answer`, records feedback.
pub struct Upstream {
    pub addr: SocketAddr,
    pub answer: Arc<Mutex<serde_json::Value>>,
    pub requests: Arc<AtomicUsize>,
    pub feedback: Arc<Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct UpstreamState {
    answer: Arc<Mutex<serde_json::Value>>,
    requests: Arc<AtomicUsize>,
    feedback: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Upstream {
    /// Hands out `proxy_url` with `fallback_policy`.
    pub async fn start(proxy_url: &str, fallback_policy: &str) -> Self {
        use axum::Json;
        use axum::extract::State;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = UpstreamState {
            answer: Arc::new(Mutex::new(serde_json::json!({
                "proxy_url": proxy_url,
                "strategy": "test-upstream",
                "ttl_seconds": 300,
                "fallback_policy": fallback_policy,
            }))),
            requests: Arc::new(AtomicUsize::new(0)),
            feedback: Arc::new(Mutex::new(Vec::new())),
        };
        let app = axum::Router::new()
            .route(
                "/api/v1/proxy/request",
                axum::routing::post(|State(s): State<UpstreamState>| async move {
                    s.requests.fetch_add(1, Ordering::SeqCst);
                    Json(s.answer.lock().unwrap().clone())
                }),
            )
            .route(
                "/api/v1/proxy/feedback",
                axum::routing::post(
                    |State(s): State<UpstreamState>, Json(body): Json<serde_json::Value>| async move {
                        s.feedback.lock().unwrap().push(body);
                        Json(serde_json::json!({"ok": true}))
                    },
                ),
            )
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            answer: state.answer,
            requests: state.requests,
            feedback: state.feedback,
            task,
        }
    }

    pub fn feedback(&self) -> Vec<serde_json::Value> {
        self.feedback.lock().unwrap().clone()
    }

    /// Waits for a feedback report matching `pred`.
    pub async fn wait_feedback(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually(what, Duration::from_secs(10), || {
            let found = self.feedback().into_iter().find(|f| pred(f));
            async move { found }
        })
        .await
    }
}

/// The real broker, in this process, on 127.0.0.1.
pub struct TestBroker {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), proxy_broker::server::ServeError>>>,
}

impl TestBroker {
    /// Starts the broker with a configuration given as YAML text (validated like a real file).
    pub async fn start(yaml: &str) -> Self {
        let mut file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        std::io::Write::write_all(&mut file, yaml.as_bytes()).unwrap();
        let config = BrokerConfig::loader(Some(file.path()))
            .env_vars(Vec::<(String, String)>::new())
            .load::<BrokerConfig>()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy_broker::run(listener, config, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Embedded configuration: every exchange's websocket and http go through `proxy_url`.
    pub async fn embedded(proxy_url: &str) -> Self {
        Self::start(&format!(
            "server:\n  shutdown_grace_seconds: 0\nproxy:\n  enabled: true\n  default:\n    websocket: \"{proxy_url}\"\n    http: \"{proxy_url}\"\n"
        ))
        .await
    }

    /// Delegation to `upstream` (no embedded fallback entries).
    pub async fn delegating(upstream: &Upstream) -> Self {
        Self::start(&format!(
            "server:\n  shutdown_grace_seconds: 0\nproxy:\n  enabled: true\n  external_service:\n    enabled: true\n    endpoints: [\"http://{}\"]\n    auth_method: bearer_token\n    auth_credentials: {{ token: test-token }}\n",
            upstream.addr
        ))
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the broker and waits until it has stopped.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A loopback address nothing listens on (bound, then released).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A client for `broker` with no local configuration unless given, and short timeouts.
pub fn client(broker_url: &str) -> proxy_broker_client::ClientBuilder {
    proxy_broker_client::BrokerClient::builder(broker_url)
        .local_config(proxy_broker_client::LocalConfig::None)
        .broker_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(10))
        .broker_retry_after(Duration::ZERO)
}

/// A local configuration (as `CRYPTOFEED_PROXY_*` variables) sending everything through `proxy_url`.
pub fn local_env(proxy_url: &str) -> proxy_broker_client::LocalConfig {
    proxy_broker_client::LocalConfig::EnvVars(vec![
        ("CRYPTOFEED_PROXY_ENABLED".into(), "true".into()),
        (
            "CRYPTOFEED_PROXY_DEFAULT__WEBSOCKET__URL".into(),
            proxy_url.into(),
        ),
        ("CRYPTOFEED_PROXY_DEFAULT__HTTP__URL".into(), proxy_url.into()),
    ])
}

// ---------------------------------------------------------------------------------------------
// A scripted broker: a real tonic server implementing the contract, answering what the test says
// ---------------------------------------------------------------------------------------------

/// What the scripted broker answers to `RequestProxy`.
#[derive(Debug, Clone)]
pub enum Script {
    /// This answer.
    Answer(proxy_broker::pb::ProxyResponse),
    /// This status.
    Status(tonic::Code, String),
}

#[derive(Clone)]
struct ScriptedService {
    script: Arc<Mutex<Script>>,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl proxy_broker::pb::proxy_broker_server::ProxyBroker for ScriptedService {
    async fn request_proxy(
        &self,
        _request: tonic::Request<proxy_broker::pb::ProxyRequest>,
    ) -> Result<tonic::Response<proxy_broker::pb::ProxyResponse>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.script.lock().unwrap().clone() {
            Script::Answer(answer) => Ok(tonic::Response::new(answer)),
            Script::Status(code, message) => Err(tonic::Status::new(code, message)),
        }
    }

    async fn report_feedback(
        &self,
        _request: tonic::Request<proxy_broker::pb::ProxyFeedback>,
    ) -> Result<tonic::Response<proxy_broker::pb::ReportFeedbackResponse>, tonic::Status> {
        Ok(tonic::Response::new(Default::default()))
    }

    type WatchProxyStream = std::pin::Pin<
        Box<
            dyn tokio_stream::Stream<Item = Result<proxy_broker::pb::ProxyResponse, tonic::Status>>
                + Send
                + 'static,
        >,
    >;

    async fn watch_proxy(
        &self,
        _request: tonic::Request<proxy_broker::pb::ProxyRequest>,
    ) -> Result<tonic::Response<Self::WatchProxyStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("the scripted broker does not watch"))
    }

    async fn report_feedback_stream(
        &self,
        _request: tonic::Request<tonic::Streaming<proxy_broker::pb::ProxyFeedback>>,
    ) -> Result<tonic::Response<proxy_broker::pb::ReportFeedbackStreamResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the scripted broker takes single reports only",
        ))
    }
}

/// A tonic server on 127.0.0.1 implementing `ProxyBroker` that answers every `RequestProxy` with
/// its script: a broker whose answers (statuses, TTLs, URLs) the test chooses.
pub struct ScriptedBroker {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedBroker {
    pub async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = ScriptedService {
            script: Arc::new(Mutex::new(script)),
            calls: Arc::new(AtomicUsize::new(0)),
        };
        let (script, calls) = (service.script.clone(), service.calls.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(proxy_broker::pb::proxy_broker_server::ProxyBrokerServer::new(
                    service,
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Self {
            addr,
            script,
            calls,
            task,
        }
    }

    /// Answers `status` with `message` from now on.
    pub async fn status(code: tonic::Code, message: &str) -> Self {
        Self::start(Script::Status(code, message.to_owned())).await
    }

    pub fn set(&self, script: Script) {
        *self.script.lock().unwrap() = script;
    }

    /// `RequestProxy` calls received.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A broker answer handing out `proxy_url` for `ttl_seconds`.
pub fn answer(proxy_url: &str, ttl_seconds: u32) -> proxy_broker::pb::ProxyResponse {
    proxy_broker::pb::ProxyResponse {
        proxy_url: proxy_url.to_owned(),
        strategy: "scripted".to_owned(),
        ttl_seconds,
        fallback_policy: proxy_broker::pb::FallbackPolicy::Fail.into(),
        metadata: None,
        source: proxy_broker::pb::ProxySource::Upstream.into(),
        upstream_endpoint: String::new(),
        lease_expires_at: None,
    }
}
