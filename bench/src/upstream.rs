//! Loopback upstream proxy services, in process: they answer the broker's upstream contract
//! (`POST /api/v1/proxy/request` → `{"proxy_url", "strategy", "ttl_seconds"}`, and
//! `POST /api/v1/proxy/feedback`) with a configurable latency, an oversized or trickled body, and
//! count what they receive. [`BlackHole`] accepts TCP and never answers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

/// Where the broker asks for a proxy.
pub const REQUEST_PATH: &str = "/api/v1/proxy/request";
/// Where the broker sends feedback.
pub const FEEDBACK_PATH: &str = "/api/v1/proxy/feedback";
/// Largest request body the upstream reads (the broker's are a few hundred bytes).
const MAX_REQUEST_BODY: usize = 1 << 20;

/// What a proxy request is answered with.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A valid answer naming `socks5://{exchange_id}.proxy.test:1080`.
    Valid,
    /// A valid answer naming the next of `proxies` proxies on every request
    /// (`socks5://rotating-{i}.proxy.test:1080`), ignoring `exclude_proxies`, as a rotating
    /// upstream does.
    Rotating { proxies: usize },
    /// A body of `bytes` bytes at once: a valid answer padded with a huge `metadata.pad` string
    /// when `json`, else `bytes` of `x` (not JSON).
    Huge { bytes: usize, json: bool },
    /// A valid-JSON prefix, then `chunk` bytes of padding every `every`, up to `total` bytes
    /// (a slow body; the broker should give up at its timeout).
    Trickle {
        chunk: usize,
        every: Duration,
        total: usize,
    },
}

/// How an upstream behaves.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// Wait before answering a proxy request.
    pub request_delay: Duration,
    /// Wait before answering a feedback report.
    pub feedback_delay: Duration,
    /// The proxy request answer.
    pub answer: Answer,
    /// `ttl_seconds` of valid answers.
    pub ttl_seconds: u32,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            request_delay: Duration::ZERO,
            feedback_delay: Duration::ZERO,
            answer: Answer::Valid,
            ttl_seconds: 3600,
        }
    }
}

/// What an upstream has received.
#[derive(Debug, Default)]
pub struct Counters {
    /// Proxy requests.
    pub requests: AtomicU64,
    /// Feedback reports.
    pub feedback: AtomicU64,
    /// TCP connections accepted.
    pub connections: AtomicU64,
}

impl Counters {
    /// Proxy requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Feedback reports received so far.
    pub fn feedback(&self) -> u64 {
        self.feedback.load(Ordering::Relaxed)
    }
    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct State {
    options: UpstreamOptions,
    counters: Arc<Counters>,
    /// Built once: every huge answer shares these bytes.
    huge: Option<Bytes>,
}

/// A running loopback upstream (HTTP/1.1 on 127.0.0.1). Stops accepting when dropped.
#[derive(Debug)]
pub struct Upstream {
    /// Base URL, `http://127.0.0.1:port`.
    pub url: String,
    /// What it has received.
    pub counters: Arc<Counters>,
    accept: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Upstream {
    /// Binds 127.0.0.1:0 and serves until dropped.
    pub async fn start(options: UpstreamOptions) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the loopback upstream")?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let huge = match options.answer {
            Answer::Huge { bytes, json } => Some(huge_body(bytes, json)),
            _ => None,
        };
        let state = Arc::new(State {
            options,
            counters: counters.clone(),
            huge,
        });
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                state.counters.connections.fetch_add(1, Ordering::Relaxed);
                let _ = tcp.set_nodelay(true);
                tokio::spawn(serve_connection(tcp, state.clone()));
            }
        });
        Ok(Self {
            url: format!("http://{addr}"),
            counters,
            accept,
        })
    }
}

async fn serve_connection(tcp: TcpStream, state: Arc<State>) {
    let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
    // A connection the broker drops mid-answer just ends here.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tcp), service)
        .await;
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(full(StatusCode::PAYLOAD_TOO_LARGE, "{}")),
    };
    let options = &state.options;
    match path.as_str() {
        REQUEST_PATH => {
            state.counters.requests.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(options.request_delay).await;
            Ok(match &options.answer {
                Answer::Valid => {
                    let exchange = serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| v["exchange_id"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| "unknown".into());
                    full(
                        StatusCode::OK,
                        valid_answer(&exchange, options.ttl_seconds).to_string(),
                    )
                }
                Answer::Rotating { proxies } => {
                    let i = state.counters.requests() % (*proxies).max(1) as u64;
                    let url = format!("socks5://rotating-{i}.proxy.test:1080");
                    let answer =
                        json!({"proxy_url": url, "strategy": "rotating", "ttl_seconds": options.ttl_seconds});
                    full(StatusCode::OK, answer.to_string())
                }
                Answer::Huge { .. } => full(StatusCode::OK, state.huge.clone().unwrap_or_default()),
                Answer::Trickle { chunk, every, total } => trickle(*chunk, *every, *total),
            })
        }
        FEEDBACK_PATH => {
            state.counters.feedback.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(options.feedback_delay).await;
            Ok(full(StatusCode::OK, r#"{"ok":true}"#))
        }
        _ => Ok(full(StatusCode::NOT_FOUND, "{}")),
    }
}

/// The answer for `exchange`: a proxy URL unique to the exchange.
pub fn valid_answer(exchange: &str, ttl_seconds: u32) -> Value {
    json!({
        "proxy_url": format!("socks5://{exchange}.proxy.test:1080"),
        "strategy": "bench",
        "ttl_seconds": ttl_seconds,
    })
}

/// A body of exactly `bytes` bytes (at least the valid prefix when `json`).
pub fn huge_body(bytes: usize, json: bool) -> Bytes {
    if !json {
        return Bytes::from(vec![b'x'; bytes]);
    }
    let head = br#"{"proxy_url":"socks5://big.proxy.test:1080","strategy":"big","ttl_seconds":300,"metadata":{"pad":""#;
    let tail = br#""}}"#;
    let pad = bytes.saturating_sub(head.len() + tail.len());
    let mut body = Vec::with_capacity(head.len() + pad + tail.len());
    body.extend_from_slice(head);
    body.resize(head.len() + pad, b'x');
    body.extend_from_slice(tail);
    Bytes::from(body)
}

/// A chunked body that sends `chunk` bytes every `every`, `total` bytes at most; it stops early
/// when the broker hangs up.
fn trickle(chunk: usize, every: Duration, total: usize) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    tokio::spawn(async move {
        let head = Bytes::from_static(br#"{"proxy_url":"socks5://slow.proxy.test:1080","metadata":{"pad":""#);
        let mut sent = head.len();
        if tx.send(Ok(Frame::data(head))).await.is_err() {
            return;
        }
        let piece = Bytes::from(vec![b'x'; chunk.max(1)]);
        while sent < total {
            tokio::time::sleep(every).await;
            sent += piece.len();
            if tx.send(Ok(Frame::data(piece.clone()))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(Frame::data(Bytes::from_static(br#""}}"#)))).await;
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Accepts TCP connections on 127.0.0.1 and never reads or answers (a hung upstream).
#[derive(Debug)]
pub struct BlackHole {
    /// Base URL, `http://127.0.0.1:port`.
    pub url: String,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl BlackHole {
    /// Most connections held open at once; older ones are closed (bounded state).
    const MAX_HELD: usize = 4096;

    /// Binds 127.0.0.1:0; connections are held until dropped.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the black-hole upstream")?;
        let addr: SocketAddr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let accept = tokio::spawn(async move {
            let mut held = std::collections::VecDeque::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                held.push_back(tcp);
                if held.len() > Self::MAX_HELD {
                    held.pop_front();
                }
            }
        });
        Ok(Self {
            url: format!("http://{addr}"),
            accepted,
            accept,
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_bodies_have_the_exact_size_and_the_json_one_parses() {
        for bytes in [200, 4096, 1 << 20] {
            let body = huge_body(bytes, true);
            assert_eq!(body.len(), bytes);
            let value: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(value["proxy_url"], "socks5://big.proxy.test:1080");
            let garbage = huge_body(bytes, false);
            assert_eq!(garbage.len(), bytes);
            assert!(serde_json::from_slice::<Value>(&garbage).is_err());
        }
    }
}
