//! The cache hit's own path (`proxy_broker::hit`), against real servers over loopback with a raw
//! HTTP/2 client: a hit is answered exactly as tonic answers it, only the plainest call skips
//! tonic, and every other request gets tonic's own status.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/upstream.rs"]
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use common::TestBroker;
use http::HeaderMap;
use prost::Message;
use proxy_broker::broker::Broker;
use proxy_broker::hit::HitPath;
use proxy_broker::pb::wire::proxy_broker_server::ProxyBrokerServer;
use proxy_broker::pb::{ConnectionType, ProxyResponse, ProxySource};
use proxy_broker::service::BrokerService;
use tonic::body::Body;
use tonic::server::NamedService;
use upstream::{Reply, Upstream, request};

const PATH: &str = "/proxybroker.v1.ProxyBroker/RequestProxy";
const PROXY: &str = "socks5://user:pw@hit.test:1080";

/// A `RequestProxy` message for `exchange` over WebSocket.
fn query(exchange: &str) -> Vec<u8> {
    request(exchange, ConnectionType::Websocket, None).encode_to_vec()
}

/// `message` as one gRPC frame: flag, length, bytes.
fn frame(flag: u8, message: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(flag);
    out.put_u32(u32::try_from(message.len()).unwrap());
    out.put_slice(message);
    out.freeze()
}

/// What a raw call got back.
#[derive(Debug)]
struct Answer {
    status: http::StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Answer {
    /// `grpc-status` and `grpc-message`, from the trailers or (trailers-only) the headers.
    fn grpc(&self) -> (String, String) {
        let from = self.trailers.as_ref().unwrap_or(&self.headers);
        let text = |name: &str| {
            from.get(name)
                .or_else(|| self.headers.get(name))
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        (text("grpc-status"), text("grpc-message"))
    }

    /// The one message of a successful answer, decoded; its framing checked.
    fn response(&self) -> ProxyResponse {
        assert_eq!(self.grpc(), ("0".to_owned(), String::new()), "{self:?}");
        assert!(self.body.len() >= 5, "{self:?}");
        assert_eq!(self.body[0], 0, "uncompressed");
        let length = u32::from_be_bytes(self.body[1..5].try_into().unwrap());
        assert_eq!(
            usize::try_from(length).unwrap(),
            self.body.len() - 5,
            "one whole message"
        );
        ProxyResponse::decode(&self.body[5..]).unwrap()
    }
}

/// How a raw call's request goes out.
#[derive(Clone, Default)]
struct Out {
    headers: Vec<(&'static str, String)>,
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    /// Leave the request open after `data` (a stalled body).
    stall: bool,
}

impl Out {
    fn message(message: &[u8]) -> Self {
        Self {
            data: vec![frame(0, message)],
            ..Self::default()
        }
    }
}

/// One `RequestProxy` on a new HTTP/2 connection to `addr`, sent as `send` says.
async fn call(addr: SocketAddr, send: Out) -> Answer {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let mut builder = http::Request::post(format!("http://{addr}{PATH}")).header("te", "trailers");
    if !send.headers.iter().any(|(name, _)| *name == "content-type") {
        builder = builder.header("content-type", "application/grpc");
    }
    for (name, value) in &send.headers {
        builder = builder.header(*name, value.as_str());
    }
    let ends_now = send.data.is_empty() && send.trailers.is_none() && !send.stall;
    let (response, mut stream) = h2.send_request(builder.body(()).unwrap(), ends_now).unwrap();
    let count = send.data.len();
    for (i, data) in send.data.into_iter().enumerate() {
        let last = i + 1 == count && send.trailers.is_none() && !send.stall;
        stream.send_data(data, last).unwrap();
    }
    if let Some(trailers) = send.trailers {
        stream.send_trailers(trailers).unwrap();
    }
    let response = response.await.unwrap();
    let (parts, mut body) = response.into_parts();
    let mut bytes = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.put(chunk);
    }
    let trailers = body.trailers().await.unwrap();
    drop(stream);
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: bytes.freeze(),
        trailers,
    }
}

/// Brokers with the hit path on and off, on one upstream that answers [`PROXY`], each with the
/// `kucoin` answer cached (asked with `headers`).
async fn brokers(settings: &str, headers: &[(&'static str, String)]) -> (Upstream, TestBroker, TestBroker) {
    let up = Upstream::start().await;
    up.default_request(Reply::proxy(PROXY));
    let start = |fast: bool| {
        let yaml = upstream::config_yaml(&[up.url.as_str()], "", "")
            + &format!("server:\n  fast_cache_hits: {fast}\n{settings}");
        async move { TestBroker::start_yaml(&yaml, &[]).await }
    };
    let (fast, slow) = (start(true).await, start(false).await);
    for b in [&fast, &slow] {
        let first = call(
            b.addr,
            Out {
                headers: headers.to_vec(),
                ..Out::message(&query("kucoin"))
            },
        )
        .await;
        assert_eq!(first.response().source(), ProxySource::Upstream);
    }
    (up, fast, slow)
}

/// `response` without the fields written per call (the TTL left and the lease's end), after
/// checking they are there.
fn without_per_call_fields(mut response: ProxyResponse) -> ProxyResponse {
    assert!(response.ttl_seconds > 0, "{response:?}");
    assert!(response.lease_expires_at.is_some(), "{response:?}");
    response.ttl_seconds = 0;
    response.lease_expires_at = None;
    response
}

#[tokio::test]
async fn a_cache_hit_is_answered_byte_for_byte_as_tonic_answers_it() {
    let (_up, fast, slow) = brokers("", &[]).await;
    let send = Out::message(&query("kucoin"));
    let (a, b) = (call(fast.addr, send.clone()).await, call(slow.addr, send).await);
    assert_eq!(a.status, b.status);
    // Every header but hyper's `date` (the two calls may fall in different seconds).
    let headers = |h: &HeaderMap| {
        let mut h = h.clone();
        assert!(h.remove("date").is_some());
        h
    };
    assert_eq!(headers(&a.headers), headers(&b.headers), "response headers");
    assert_eq!(a.trailers, b.trailers, "trailers");
    let (ra, rb) = (a.response(), b.response());
    assert_eq!(ra.source(), ProxySource::Cache);
    assert_eq!(ra.proxy_url, PROXY);
    // Field for field (the per-call fields differ between two calls anyway)...
    assert_eq!(without_per_call_fields(ra.clone()), without_per_call_fields(rb));
    // ...and the bytes are the message's own encoding.
    assert_eq!(a.body.len() - 5, ra.encoded_len());
    // Both count the hit alike.
    for b in [&fast, &slow] {
        let metrics = b.broker().render_metrics().await;
        assert!(
            metrics.contains(
                "proxy_broker_requests_total{source=\"cache\",connection_type=\"websocket\",code=\"ok\"} 1"
            ),
            "{metrics}"
        );
    }
}

/// Requests the hit path does not take, or that are not plain: each must get from the broker with
/// the hit path what it gets without it.
fn unusual_requests() -> Vec<(&'static str, Out)> {
    let message = query("kucoin");
    let mut trailers = HeaderMap::new();
    trailers.insert("x-request-trailer", "1".parse().unwrap());
    let whole = frame(0, &message);
    vec![
        ("no message", Out::default()),
        (
            "compressed flag without grpc-encoding",
            Out {
                data: vec![frame(1, &message)],
                ..Out::default()
            },
        ),
        (
            "two messages",
            Out {
                data: vec![whole.clone(), whole.clone()],
                ..Out::default()
            },
        ),
        (
            "two messages in one frame",
            Out {
                data: vec![[whole.clone(), whole.clone()].concat().into()],
                ..Out::default()
            },
        ),
        (
            "a message and request trailers",
            Out {
                data: vec![whole.clone()],
                trailers: Some(trailers),
                ..Out::default()
            },
        ),
        (
            "a message over max_message_bytes",
            Out::message(&vec![0x2a; 2_000]),
        ),
        (
            "a message cut short",
            Out {
                data: vec![whole.slice(..whole.len() - 3)],
                ..Out::default()
            },
        ),
        (
            "a prefix cut short",
            Out {
                data: vec![whole.slice(..3)],
                ..Out::default()
            },
        ),
        ("bytes that do not decode", Out::message(&[0x0a, 0x40, b'x'])),
        ("an invalid exchange", Out::message(&query("bad exchange!"))),
        ("an empty exchange", Out::message(&query(""))),
        (
            "grpc-encoding: identity",
            Out {
                headers: vec![("grpc-encoding", "identity".into())],
                ..Out::message(&message)
            },
        ),
        (
            "grpc-encoding: gzip",
            Out {
                headers: vec![("grpc-encoding", "gzip".into())],
                ..Out::message(&message)
            },
        ),
        (
            "the message split over frames",
            Out {
                data: vec![whole.slice(..2), whole.slice(2..9), whole.slice(9..)],
                ..Out::default()
            },
        ),
        (
            "content-type: application/grpc+proto",
            Out {
                headers: vec![("content-type", "application/grpc+proto".into())],
                ..Out::message(&message)
            },
        ),
        (
            "content-type: application/json",
            Out {
                headers: vec![("content-type", "application/json".into())],
                ..Out::message(&message)
            },
        ),
    ]
}

#[tokio::test]
async fn every_other_request_gets_the_status_tonic_gives_it() {
    let (_up, fast, slow) = brokers("  max_message_bytes: 1024\n", &[]).await;
    for (what, send) in unusual_requests() {
        let (a, b) = (call(fast.addr, send.clone()).await, call(slow.addr, send).await);
        assert_eq!(a.status, b.status, "{what}");
        assert_eq!(a.grpc(), b.grpc(), "{what}: {a:?} / {b:?}");
        if a.grpc().0 == "0" {
            let (ra, rb) = (a.response(), b.response());
            assert_eq!(without_per_call_fields(ra), without_per_call_fields(rb), "{what}");
        }
    }
}

/// The generated server behind a hit path, counting the calls that reach it.
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    calls: Arc<AtomicUsize>,
}

impl<S: NamedService> NamedService for Counted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for Counted<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.call(request)
    }
}

/// Serves `broker`'s feed service behind a hit path (`enabled` or not) on 127.0.0.1:0; the
/// counter counts the calls that reach the generated server.
async fn serve_counted(broker: Arc<Broker>, enabled: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let generated =
        ProxyBrokerServer::new(BrokerService::new(broker.clone())).max_decoding_message_size(1024);
    let service = HitPath::new(
        Counted {
            inner: generated,
            calls: calls.clone(),
        },
        BrokerService::new(broker),
        1024,
        std::time::Duration::from_secs(10),
        enabled,
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, calls)
}

#[tokio::test]
async fn only_a_plain_cache_hit_skips_tonic() {
    let up = Upstream::start().await;
    up.default_request(Reply::proxy(PROXY));
    let broker = Arc::new(Broker::new(upstream::config(&[up.url.as_str()], "", "")).unwrap());
    let (addr, calls) = serve_counted(broker.clone(), true).await;
    let message = query("kucoin");
    // A miss: asked upstream through tonic.
    let first = call(addr, Out::message(&message)).await.response();
    assert_eq!(first.source(), ProxySource::Upstream);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Hits, whole or split over frames, never reach tonic.
    let whole = frame(0, &message);
    for send in [
        Out::message(&message),
        Out {
            data: vec![whole.slice(..1), whole.slice(1..6), whole.slice(6..)],
            ..Out::default()
        },
    ] {
        let hit = call(addr, send).await.response();
        assert_eq!(hit.source(), ProxySource::Cache);
        assert_eq!(hit.proxy_url, PROXY);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Each unusual request reaches tonic, which answers it.
    let mut expected = 1;
    for (what, send) in unusual_requests() {
        // Taken: split frames are joined, and tonic does not look at the content type either.
        let plain = matches!(
            what,
            "the message split over frames"
                | "content-type: application/grpc+proto"
                | "content-type: application/json"
        );
        call(addr, send).await;
        if !plain {
            expected += 1;
        }
        assert_eq!(calls.load(Ordering::SeqCst), expected, "{what}");
    }
    // Turned off, every call reaches tonic, hits included.
    let (off, off_calls) = serve_counted(broker, false).await;
    let hit = call(off, Out::message(&message)).await.response();
    assert_eq!(hit.source(), ProxySource::Cache);
    assert_eq!(off_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_hit_is_still_refused_without_a_valid_token() {
    let token = "feed-token-0123456789";
    let bearer = vec![("authorization", format!("Bearer {token}"))];
    let (_up, fast, slow) = brokers(&format!("  auth_tokens: [\"{token}\"]\n"), &bearer).await;
    let message = query("kucoin");
    let sends = [
        ("no token", Out::message(&message)),
        (
            "a wrong token",
            Out {
                headers: vec![("authorization", "Bearer wrong-token-0123456789".into())],
                ..Out::message(&message)
            },
        ),
    ];
    for (what, send) in sends {
        let (a, b) = (call(fast.addr, send.clone()).await, call(slow.addr, send).await);
        assert_eq!(
            a.grpc().0,
            (tonic::Code::Unauthenticated as i32).to_string(),
            "{what}"
        );
        assert_eq!(a.grpc(), b.grpc(), "{what}");
    }
    let allowed = call(
        fast.addr,
        Out {
            headers: bearer,
            ..Out::message(&message)
        },
    )
    .await;
    assert_eq!(allowed.response().source(), ProxySource::Cache);
}

#[tokio::test]
async fn a_body_that_stalls_part_way_ends_after_the_body_timeout_as_without_the_hit_path() {
    let (_up, fast, slow) = brokers("  request_body_timeout_seconds: 1\n", &[]).await;
    let whole = frame(0, &query("kucoin"));
    let identity = vec![("grpc-encoding", "identity".to_owned())];
    // Read by the hit path (the first three), or passed on to tonic at once (the last: a call
    // with `grpc-encoding` is not taken), whose body is timed all the same.
    for (headers, data) in [
        (vec![], vec![]),
        (vec![], vec![whole.slice(..3)]),
        (vec![], vec![whole.slice(..whole.len() - 1)]),
        (identity, vec![whole.slice(..3)]),
    ] {
        let send = Out {
            headers,
            data,
            stall: true,
            ..Out::default()
        };
        // Both end, with the same status: tonic takes the body's CANCELLED as its end, so a unary
        // call is told its message is missing. (The bound only turns a call that never ends into
        // a failure instead of a hung test; the broker's 1 s timer decides.)
        let ends = |addr, send| async move {
            tokio::time::timeout(std::time::Duration::from_secs(60), call(addr, send))
                .await
                .expect("a stalled body must end the call")
        };
        let (a, b) = (ends(fast.addr, send.clone()).await, ends(slow.addr, send).await);
        assert_ne!(a.grpc().0, "0", "{a:?}");
        assert_eq!(a.grpc(), b.grpc());
    }
    // The broker still answers.
    let hit = call(fast.addr, Out::message(&query("kucoin"))).await.response();
    assert_eq!(hit.source(), ProxySource::Cache);
}

#[tokio::test]
async fn without_delegation_every_call_goes_through_tonic() {
    let yaml =
        "proxy:\n  enabled: true\n  default:\n    websocket:\n      url: \"socks5://embedded.test:1080\"\n";
    let broker = Arc::new(Broker::new(common::load(Some(yaml), &[]).unwrap()).unwrap());
    let (addr, calls) = serve_counted(broker, true).await;
    for n in 1..=3 {
        let answer = call(addr, Out::message(&query("kucoin"))).await.response();
        assert_eq!(answer.source(), ProxySource::Embedded);
        assert_eq!(answer.proxy_url, "socks5://embedded.test:1080");
        // Nothing is cached without delegation: every answer is made on tonic's path.
        assert_eq!(calls.load(Ordering::SeqCst), n);
    }
}
