//! A scriptable upstream proxy service on 127.0.0.1:0 (plain HTTP or HTTPS, optionally requiring
//! client certificates), for driving the broker's delegation over real sockets.
//!
//! It records every request (path, headers, body) and answers `/api/v1/proxy/request` and
//! `/api/v1/proxy/feedback` from a per-path script: a queue of [`Reply`]s consumed one per request,
//! then a default. Each connection is served by hyper-util in its own task, so a reply can also
//! cut the connection without answering ([`Reply::Reset`]).
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// Where the broker asks for a proxy.
pub const REQUEST_PATH: &str = "/api/v1/proxy/request";
/// Where the broker sends feedback.
pub const FEEDBACK_PATH: &str = "/api/v1/proxy/feedback";

static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How the upstream answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status with this JSON body.
    Json(u16, Value),
    /// This status with a short text body.
    Status(u16),
    /// Never answers (the connection stays open).
    Hang,
    /// Closes the connection (TCP reset) without answering.
    Reset,
    /// 200 with a body that is not JSON.
    Garbage,
    /// Waits, then answers as the inner reply.
    Slow(Duration, Box<Reply>),
    /// A redirect (e.g. 307) to `location`, with a short body.
    Redirect(u16, String),
    /// Waits for a permit of the gate (the test adds them), then answers as the inner reply.
    Gated(Arc<tokio::sync::Semaphore>, Box<Reply>),
    /// 200 with a JSON-looking body of `bytes` bytes, streamed in 64 KiB chunks without keeping
    /// it in memory; with `declared`, `Content-Length` announces the size up front.
    Huge { bytes: usize, declared: bool },
}

impl Reply {
    /// 200 with a valid answer for `proxy_url` (ttl 300, strategy "test").
    pub fn proxy(proxy_url: &str) -> Self {
        Reply::Json(
            200,
            json!({"proxy_url": proxy_url, "strategy": "test", "ttl_seconds": 300}),
        )
    }

    /// 200 with `body`.
    pub fn ok(body: Value) -> Self {
        Reply::Json(200, body)
    }

    /// `self`, after `delay`.
    pub fn after(self, delay: Duration) -> Self {
        Reply::Slow(delay, Box::new(self))
    }
}

/// One request the upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Arrival order across every upstream in the process.
    pub seq: u64,
    /// When it arrived.
    pub at: std::time::Instant,
    /// The client's address (one per TCP connection).
    pub peer: SocketAddr,
    pub path: String,
    /// HTTP/1.1 or HTTP/2.
    pub version: axum::http::Version,
    pub headers: HeaderMap,
    pub raw: Bytes,
    /// The body as JSON (`Null` when it is not JSON).
    pub body: Value,
}

impl Recorded {
    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

#[derive(Debug)]
struct Script {
    queue: VecDeque<Reply>,
    default: Reply,
}

impl Script {
    fn new(default: Reply) -> Mutex<Self> {
        Mutex::new(Self {
            queue: VecDeque::new(),
            default,
        })
    }

    fn next(&mut self) -> Reply {
        self.queue.pop_front().unwrap_or_else(|| self.default.clone())
    }
}

#[derive(Debug)]
struct Inner {
    requests: Mutex<Script>,
    feedback: Mutex<Script>,
    recorded: Mutex<Vec<Recorded>>,
    /// Requests being answered now, and the most at once.
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
}

#[derive(Clone)]
struct ConnState {
    inner: Arc<Inner>,
    kill: Arc<Notify>,
    peer: SocketAddr,
}

/// Counts a request as in flight while it lives.
struct InFlight(Arc<Inner>);

impl InFlight {
    fn new(inner: Arc<Inner>) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let now = inner.in_flight.fetch_add(1, SeqCst) + 1;
        inner.max_in_flight.fetch_max(now, SeqCst);
        Self(inner)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A running scriptable upstream. Stops accepting when dropped.
#[derive(Debug)]
pub struct Upstream {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
    /// Base URL (`http://127.0.0.1:port` or `https://localhost:port`).
    pub url: String,
    proxy: String,
    accept: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Upstream {
    /// Plain HTTP. Answers every proxy request with [`Upstream::proxy_url`], feedback with 200.
    pub async fn start() -> Self {
        Self::start_inner(None).await
    }

    /// HTTPS with a certificate from `pki` (HTTP/2 and HTTP/1.1 offered); with
    /// `require_client_cert`, clients must present a certificate signed by `pki`'s CA.
    pub async fn start_tls(pki: &Pki, require_client_cert: bool) -> Self {
        Self::start_inner(Some(pki.server_config(require_client_cert))).await
    }

    async fn start_inner(tls: Option<rustls::ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = format!("socks5://u{}.proxy.test:1080", addr.port());
        let inner = Arc::new(Inner {
            requests: Script::new(Reply::proxy(&proxy)),
            feedback: Script::new(Reply::ok(json!({"ok": true}))),
            recorded: Mutex::new(Vec::new()),
            in_flight: Default::default(),
            max_in_flight: Default::default(),
        });
        let url = match tls {
            Some(_) => format!("https://localhost:{}", addr.port()),
            None => format!("http://127.0.0.1:{}", addr.port()),
        };
        let acceptor = tls.map(|c| TlsAcceptor::from(Arc::new(c)));
        let state = inner.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                // Dropping the socket then sends a reset instead of a clean close.
                let _ = tcp.set_zero_linger();
                let (state, acceptor) = (state.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor {
                        None => serve_connection(tcp, state, peer).await,
                        Some(acceptor) => {
                            // A failed handshake (e.g. no client certificate) just ends here.
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                serve_connection(tls, state, peer).await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            inner,
            addr,
            url,
            proxy,
            accept,
        }
    }

    /// The proxy URL this upstream hands out by default (unique per upstream).
    pub fn proxy_url(&self) -> &str {
        &self.proxy
    }

    /// Sets the reply for proxy requests once the queue is empty.
    pub fn default_request(&self, reply: Reply) {
        self.inner.requests.lock().unwrap().default = reply;
    }

    /// Queues replies for the next proxy requests.
    pub fn queue_requests(&self, replies: impl IntoIterator<Item = Reply>) {
        self.inner.requests.lock().unwrap().queue.extend(replies);
    }

    /// Sets the reply for feedback once the queue is empty.
    pub fn default_feedback(&self, reply: Reply) {
        self.inner.feedback.lock().unwrap().default = reply;
    }

    /// Queues replies for the next feedback reports.
    pub fn queue_feedback(&self, replies: impl IntoIterator<Item = Reply>) {
        self.inner.feedback.lock().unwrap().queue.extend(replies);
    }

    /// Every request received so far, in arrival order.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.inner.recorded.lock().unwrap().clone()
    }

    fn on_path(&self, path: &str) -> Vec<Recorded> {
        self.recorded().into_iter().filter(|r| r.path == path).collect()
    }

    /// Proxy requests received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.on_path(REQUEST_PATH)
    }

    /// Feedback reports received so far.
    pub fn feedback(&self) -> Vec<Recorded> {
        self.on_path(FEEDBACK_PATH)
    }

    /// How many proxy requests arrived.
    pub fn request_count(&self) -> usize {
        self.requests().len()
    }

    /// The most proxy or feedback requests this upstream was answering at once.
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Distinct TCP connections that carried proxy requests.
    pub fn request_connections(&self) -> usize {
        let peers: std::collections::HashSet<_> = self.requests().iter().map(|r| r.peer).collect();
        peers.len()
    }

    /// How many feedback reports arrived.
    pub fn feedback_count(&self) -> usize {
        self.feedback().len()
    }

    /// Waits (polling, up to 10 s) until at least `n` feedback reports arrived; returns them all.
    pub async fn wait_feedback(&self, n: usize) -> Vec<Recorded> {
        let upstream = self;
        eventually("feedback reports to arrive", || {
            let got = upstream.feedback();
            (got.len() >= n).then_some(got)
        })
        .await
    }

    /// Waits (polling, up to 10 s) until at least `n` proxy requests arrived; returns them all.
    pub async fn wait_requests(&self, n: usize) -> Vec<Recorded> {
        let upstream = self;
        eventually("proxy requests to arrive", || {
            let got = upstream.requests();
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

/// Polls `check` every 10 ms until it gives a value; panics after 10 s naming `what`.
pub async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// As [`eventually`], with an async check (e.g. an admin RPC).
pub async fn eventually_async<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn serve_connection<I>(io: I, inner: Arc<Inner>, peer: SocketAddr)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let kill = Arc::new(Notify::new());
    let router = axum::Router::new().fallback(handle).with_state(ConnState {
        inner,
        kill: kill.clone(),
        peer,
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(router));
    tokio::select! {
        _ = conn => {}
        () = kill.notified() => {} // drops the connection: the client sees a reset
    }
}

async fn handle(State(state): State<ConnState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let raw = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let _in_flight = InFlight::new(state.inner.clone());
    state.inner.recorded.lock().unwrap().push(Recorded {
        seq: next_seq(),
        at: std::time::Instant::now(),
        peer: state.peer,
        path: path.clone(),
        version: parts.version,
        headers: parts.headers,
        body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
        raw,
    });
    let reply = match path.as_str() {
        REQUEST_PATH => state.inner.requests.lock().unwrap().next(),
        FEEDBACK_PATH => state.inner.feedback.lock().unwrap().next(),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    respond(reply, &state.kill).await
}

async fn respond(mut reply: Reply, kill: &Notify) -> Response {
    loop {
        return match reply {
            Reply::Slow(delay, inner) => {
                tokio::time::sleep(delay).await;
                reply = *inner;
                continue;
            }
            Reply::Json(status, body) => (
                StatusCode::from_u16(status).unwrap(),
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response(),
            Reply::Status(status) => (
                StatusCode::from_u16(status).unwrap(),
                format!("scripted status {status}"),
            )
                .into_response(),
            Reply::Garbage => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                Body::from("<html>definitely {not json"),
            )
                .into_response(),
            Reply::Gated(gate, inner) => {
                gate.acquire().await.unwrap().forget();
                reply = *inner;
                continue;
            }
            Reply::Redirect(status, location) => (
                StatusCode::from_u16(status).unwrap(),
                [(header::LOCATION, location)],
                "redirecting",
            )
                .into_response(),
            Reply::Huge { bytes, declared } => huge_body(bytes, declared),
            Reply::Hang => std::future::pending().await,
            Reply::Reset => {
                kill.notify_one();
                std::future::pending().await
            }
        };
    }
}

fn huge_body(bytes: usize, declared: bool) -> Response {
    const CHUNK: usize = 64 * 1024;
    let head = Bytes::from_static(br#"{"proxy_url":"socks5://huge.test:1080","strategy":""#);
    let filler = Bytes::from(vec![b'a'; CHUNK]);
    let tail = Bytes::from_static(br#""}"#);
    let middle = bytes.saturating_sub(head.len() + tail.len());
    let total = head.len() + middle + tail.len();
    let chunks = std::iter::once(head)
        .chain((0..middle / CHUNK).map(move |_| filler.clone()))
        .chain(std::iter::once(Bytes::from(vec![b'a'; middle % CHUNK])))
        .chain(std::iter::once(tail))
        .map(Ok::<_, std::convert::Infallible>);
    let mut response = Response::new(Body::from_stream(tokio_stream::iter(chunks)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    if declared {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, total.into());
    }
    response
}

/// A black-holed endpoint: accepts TCP connections, reads whatever arrives and never answers.
/// It counts connections and sees when the client gives up (closes its side).
#[derive(Debug)]
pub struct BlackHole {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port`.
    pub url: String,
    state: Arc<BlackHoleState>,
    accept: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct BlackHoleState {
    /// Process-wide sequence numbers (as [`Recorded::seq`]) and arrival times of each
    /// connection's first bytes.
    requests: Mutex<Vec<(u64, std::time::Instant)>>,
    /// Sequence numbers of the moments clients closed their connections.
    closed: Mutex<Vec<u64>>,
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl BlackHole {
    pub async fn start() -> Self {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BlackHoleState::default());
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut seen = false;
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) if !seen => {
                                seen = true;
                                let at = std::time::Instant::now();
                                state.requests.lock().unwrap().push((next_seq(), at));
                            }
                            Ok(_) => {}
                        }
                    }
                    if seen {
                        state.closed.lock().unwrap().push(next_seq());
                    }
                });
            }
        });
        Self {
            addr,
            url: format!("http://{addr}"),
            state,
            accept,
        }
    }

    /// Connections that sent a request so far.
    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Connections with a request that the client closed (gave up on or cancelled).
    pub fn closed_count(&self) -> usize {
        self.state.closed.lock().unwrap().len()
    }

    /// Sequence numbers of requests arriving.
    pub fn request_seqs(&self) -> Vec<u64> {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|(seq, _)| *seq)
            .collect()
    }

    /// When requests arrived.
    pub fn request_times(&self) -> Vec<std::time::Instant> {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|(_, at)| *at)
            .collect()
    }

    /// Sequence numbers of clients closing.
    pub fn closed_seqs(&self) -> Vec<u64> {
        self.state.closed.lock().unwrap().clone()
    }
}

/// The next process-wide event number (shared by every upstream and black hole).
pub fn next_seq() -> u64 {
    SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
}

/// Drives `upstream` through `phases` (reply, how long) `rounds` times, then leaves `last` as its
/// default reply: a flapping endpoint.
pub fn flap(
    upstream: &Upstream,
    phases: Vec<(Reply, Duration)>,
    rounds: usize,
    last: Reply,
) -> JoinHandle<()> {
    let inner = upstream.inner.clone();
    tokio::spawn(async move {
        for _ in 0..rounds {
            for (reply, period) in &phases {
                inner.requests.lock().unwrap().default = reply.clone();
                tokio::time::sleep(*period).await;
            }
        }
        inner.requests.lock().unwrap().default = last;
    })
}

/// A private CA with a server certificate (`localhost`, `127.0.0.1`) and a client certificate,
/// all generated with rcgen, written as PEM files into a temporary directory.
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    server_der: rustls::pki_types::CertificateDer<'static>,
    server_key_der: Vec<u8>,
}

impl Pki {
    pub fn generate() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "proxy-broker test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let mut server_params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        server_params
            .distinguished_name
            .push(DnType::CommonName, "upstream.test");
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().unwrap();
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, "proxy-broker");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().unwrap();
        let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("client.pem"), client_cert.pem()).unwrap();
        std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();
        Self {
            dir,
            ca_der: ca_cert.der().clone(),
            server_der: server_cert.der().clone(),
            server_key_der: server_key.serialize_der(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// The client certificate (PEM file).
    pub fn cert_file(&self) -> PathBuf {
        self.path("client.pem")
    }

    /// The client key (PKCS#8 PEM file).
    pub fn key_file(&self) -> PathBuf {
        self.path("client.key")
    }

    /// The temporary directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn server_config(&self, require_client_cert: bool) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.server_key_der.clone().into());
        let mut config = builder
            .with_single_cert(vec![self.server_der.clone()], key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }
}

// --- Shared helpers for the delegation test suites ---------------------------------------------

/// The bearer token the default configuration sends (a secret: must never be printed).
pub const TOKEN: &str = "tok-S3CRET-bearer-7f3a91";

/// `text` with its common indentation removed and every line indented by `indent` spaces.
fn reindent(text: &str, indent: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let common = lines
        .iter()
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|l| format!("{}{}\n", " ".repeat(indent), &l[common..]))
        .collect()
}

/// A broker configuration delegating to `endpoints` (in order). `settings` are extra
/// `external_service` keys (YAML, any indentation); unless they set `auth_method` or
/// `auth_credentials`, bearer_token auth with [`TOKEN`] is used. `embedded` is extra YAML under `proxy:` (e.g. a `default:` block).
pub fn config_yaml(endpoints: &[&str], settings: &str, embedded: &str) -> String {
    let mut yaml =
        String::from("proxy:\n  enabled: true\n  external_service:\n    enabled: true\n    endpoints:\n");
    for e in endpoints {
        yaml += &format!("      - \"{e}\"\n");
    }
    if !settings.contains("auth_method") && !settings.contains("auth_credentials") {
        yaml += &format!("    auth_method: bearer_token\n    auth_credentials:\n      token: \"{TOKEN}\"\n");
    }
    yaml += &reindent(settings, 4);
    yaml += &reindent(embedded, 2);
    yaml
}

/// The loaded configuration for [`config_yaml`].
pub fn config(endpoints: &[&str], settings: &str, embedded: &str) -> proxy_broker::BrokerConfig {
    let yaml = config_yaml(endpoints, settings, embedded);
    crate::common::load(Some(&yaml), &[]).unwrap_or_else(|e| panic!("{e}\n--- config ---\n{yaml}"))
}

/// A `RequestProxy` request.
pub fn request(
    exchange: &str,
    connection_type: proxy_broker::pb::ConnectionType,
    region: Option<&str>,
) -> proxy_broker::pb::ProxyRequest {
    proxy_broker::pb::ProxyRequest {
        exchange_id: exchange.into(),
        connection_type: connection_type.into(),
        region: region.map(str::to_owned),
        ..Default::default()
    }
}

/// `ListUpstreams`.
pub async fn list_upstreams(broker: &crate::common::TestBroker) -> proxy_broker::pb::ListUpstreamsResponse {
    broker
        .admin()
        .list_upstreams(proxy_broker::pb::ListUpstreamsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The status of the endpoint with base URL `url`.
pub async fn upstream_status(
    broker: &crate::common::TestBroker,
    url: &str,
) -> proxy_broker::pb::UpstreamStatus {
    let all = list_upstreams(broker).await.upstreams;
    all.iter()
        .find(|u| u.endpoint == url)
        .unwrap_or_else(|| panic!("no endpoint {url} in {all:?}"))
        .clone()
}

/// `ListCache` (all exchanges).
pub async fn list_cache(broker: &crate::common::TestBroker) -> Vec<proxy_broker::pb::CacheEntry> {
    broker
        .admin()
        .list_cache(proxy_broker::pb::ListCacheRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// A `metadata` field of an answer, as JSON.
pub fn metadata_field(response: &proxy_broker::pb::ProxyResponse, key: &str) -> Option<Value> {
    let map = proxy_broker::json::struct_to_json(response.metadata.as_ref()?);
    map.get(key).cloned()
}

/// Everything the broker logs (at debug and above, whatever RUST_LOG says) while the guard from
/// [`Logs::capture`] lives on this thread. Use with a current-thread runtime so that every task
/// (server, client connections, feedback worker) logs through it.
#[derive(Debug, Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Starts capturing on this thread.
    pub fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
