//! The tonic load generator: connections, the calls it makes, and what it records. Every loop is
//! bounded by a call count and a deadline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proxy_broker_client::pb::proxy_broker_client::ProxyBrokerClient;
use proxy_broker_client::pb::{ConnectionType, ProxyFeedback, ProxyRequest, ProxySource};
use tokio::sync::Semaphore;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// One call the generator can make.
#[derive(Debug, Clone)]
pub enum Rpc {
    /// `ProxyBroker/RequestProxy`.
    RequestProxy(ProxyRequest),
    /// `ProxyBroker/RequestProxy` made as cheaply as the generator can: the request encoded once
    /// and the answer decoded down to its `source` (the other fields skipped unread). The broker
    /// sees the same call as [`Rpc::RequestProxy`]; the generator's own work per call is then
    /// about a health check's, so that a throughput ratio measures the broker and not the
    /// generator's decoding of a larger answer (`hit-vs-health`).
    LeanRequestProxy(LeanRequest),
    /// `grpc.health.v1.Health/Check` for the whole server.
    HealthCheck,
    /// `ProxyBroker/ReportFeedback`.
    ReportFeedback(ProxyFeedback),
}

/// A `ProxyRequest` as its encoded fields (`exchange_id`, `connection_type`, `client_id`):
/// strings sent from shared bytes, so a call clones no string.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeanRequest {
    #[prost(bytes = "bytes", tag = "1")]
    pub exchange_id: bytes::Bytes,
    #[prost(int32, tag = "2")]
    pub connection_type: i32,
    #[prost(bytes = "bytes", tag = "4")]
    pub client_id: bytes::Bytes,
}

/// The one field of a `ProxyResponse` the lean call reads; prost skips the others.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeanAnswer {
    #[prost(int32, tag = "6")]
    pub source: i32,
}

impl Rpc {
    /// [`Rpc::LeanRequestProxy`] for a WebSocket connection to `exchange` (the same request as
    /// [`Rpc::request_proxy`] makes).
    pub fn lean_request_proxy(exchange: &str) -> Self {
        Rpc::LeanRequestProxy(LeanRequest {
            exchange_id: bytes::Bytes::copy_from_slice(exchange.as_bytes()),
            connection_type: ConnectionType::Websocket as i32,
            client_id: bytes::Bytes::from_static(b"proxy-broker-bench"),
        })
    }

    /// RequestProxy for a WebSocket connection to `exchange`.
    pub fn request_proxy(exchange: impl Into<String>) -> Self {
        Rpc::RequestProxy(ProxyRequest {
            exchange_id: exchange.into(),
            connection_type: ConnectionType::Websocket as i32,
            client_id: "proxy-broker-bench".into(),
            ..ProxyRequest::default()
        })
    }

    /// A ReportFeedback about `proxy_url`.
    pub fn feedback(proxy_url: impl Into<String>, exchange: impl Into<String>, success: bool) -> Self {
        Rpc::ReportFeedback(ProxyFeedback {
            proxy_url: proxy_url.into(),
            exchange_id: exchange.into(),
            connection_type: ConnectionType::Websocket as i32,
            success,
            latency_ms: success.then_some(12),
            error_details: (!success).then(|| "bench: connect failed".to_owned()),
            client_id: "proxy-broker-bench".into(),
            ..ProxyFeedback::default()
        })
    }
}

/// What a successful call answered (RequestProxy only; the others carry nothing of interest).
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// `source` of a RequestProxy answer.
    pub source: Option<ProxySource>,
    /// `upstream_endpoint` of a RequestProxy answer.
    pub endpoint: String,
    /// `proxy_url` of a RequestProxy answer.
    pub proxy_url: String,
}

/// The clients on one connection.
#[derive(Debug, Clone)]
pub struct Stub {
    broker: ProxyBrokerClient<Channel>,
    health: HealthClient<Channel>,
    lean: tonic::client::Grpc<Channel>,
}

impl Stub {
    /// Clients on `channel` (cheap: the connection is shared).
    pub fn new(channel: Channel) -> Self {
        Self {
            broker: ProxyBrokerClient::new(channel.clone()),
            health: HealthClient::new(channel.clone()),
            lean: tonic::client::Grpc::new(channel),
        }
    }

    /// Makes `rpc` with a deadline of `timeout`.
    pub async fn call(&mut self, rpc: &Rpc, timeout: Duration) -> Result<Answer, tonic::Status> {
        fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
            let mut request = tonic::Request::new(message);
            request.set_timeout(timeout);
            request
        }
        match rpc {
            Rpc::RequestProxy(message) => {
                let answer = self
                    .broker
                    .request_proxy(with_timeout(message.clone(), timeout))
                    .await?
                    .into_inner();
                Ok(Answer {
                    source: ProxySource::try_from(answer.source).ok(),
                    endpoint: answer.upstream_endpoint,
                    proxy_url: answer.proxy_url,
                })
            }
            Rpc::LeanRequestProxy(message) => {
                self.lean
                    .ready()
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/proxybroker.v1.ProxyBroker/RequestProxy",
                );
                let codec = tonic_prost::ProstCodec::<LeanRequest, LeanAnswer>::default();
                let answer = self
                    .lean
                    .unary(with_timeout(message.clone(), timeout), path, codec)
                    .await?
                    .into_inner();
                Ok(Answer {
                    source: ProxySource::try_from(answer.source).ok(),
                    ..Answer::default()
                })
            }
            Rpc::HealthCheck => {
                self.health
                    .check(with_timeout(HealthCheckRequest::default(), timeout))
                    .await?;
                Ok(Answer::default())
            }
            Rpc::ReportFeedback(message) => {
                self.broker
                    .report_feedback(with_timeout(message.clone(), timeout))
                    .await?;
                Ok(Answer::default())
            }
        }
    }
}

/// `n` separate HTTP/2 connections to `addr` (a tonic `Channel` from `connect()` is one
/// connection).
pub async fn connect(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Latencies and outcomes of a set of calls.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    /// Latency of every call (successful or not), microseconds.
    pub micros: Vec<u32>,
    /// Calls by gRPC code name ("OK", "RESOURCE_EXHAUSTED", ...).
    pub codes: BTreeMap<&'static str, u64>,
    /// Successful RequestProxy answers by source.
    pub sources: BTreeMap<&'static str, u64>,
    /// Successful RequestProxy answers by upstream endpoint ("" for none).
    pub endpoints: BTreeMap<String, u64>,
}

impl Recorder {
    /// Records one call.
    pub fn record(&mut self, elapsed: Duration, result: &Result<Answer, tonic::Status>) {
        self.micros
            .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
        match result {
            Ok(answer) => {
                *self.codes.entry("OK").or_default() += 1;
                if let Some(source) = answer.source {
                    *self.sources.entry(source_name(source)).or_default() += 1;
                    *self.endpoints.entry(answer.endpoint.clone()).or_default() += 1;
                }
            }
            Err(status) => *self.codes.entry(code_name(status.code())).or_default() += 1,
        }
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: Recorder) {
        self.micros.extend(other.micros);
        for (k, v) in other.codes {
            *self.codes.entry(k).or_default() += v;
        }
        for (k, v) in other.sources {
            *self.sources.entry(k).or_default() += v;
        }
        for (k, v) in other.endpoints {
            *self.endpoints.entry(k).or_default() += v;
        }
    }

    /// Calls recorded.
    pub fn calls(&self) -> u64 {
        self.micros.len() as u64
    }

    /// Calls that succeeded.
    pub fn ok(&self) -> u64 {
        self.codes.get("OK").copied().unwrap_or(0)
    }

    /// Calls that failed.
    pub fn errors(&self) -> u64 {
        self.calls() - self.ok()
    }

    /// "OK 9,998, RESOURCE_EXHAUSTED 2" (every code seen).
    pub fn codes_text(&self) -> String {
        tally(&self.codes)
    }

    /// "CACHE 100, UPSTREAM 2" (every source seen).
    pub fn sources_text(&self) -> String {
        tally(&self.sources)
    }

    /// Failed calls by code, "none" when there are none.
    pub fn errors_text(&self) -> String {
        let errors: BTreeMap<&str, u64> = self
            .codes
            .iter()
            .filter(|(k, _)| **k != "OK")
            .map(|(k, v)| (*k, *v))
            .collect();
        if errors.is_empty() {
            "none".into()
        } else {
            tally(&errors)
        }
    }
}

/// "A 1, B 2" for a map of counts ("none" when empty).
pub fn tally<K: AsRef<str>>(counts: &BTreeMap<K, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{} {}", k.as_ref(), crate::stats::count(*v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The canonical gRPC name of `code`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn source_name(source: ProxySource) -> &'static str {
    match source {
        ProxySource::Unspecified => "UNSPECIFIED",
        ProxySource::Upstream => "UPSTREAM",
        ProxySource::Cache => "CACHE",
        ProxySource::Embedded => "EMBEDDED",
        ProxySource::Direct => "DIRECT",
    }
}

/// Closed loop: `streams` callers per connection, each making `rpc` back to back until
/// `duration` has passed or `max_calls` calls were started in all.
pub async fn closed_loop(
    channels: &[Channel],
    streams: usize,
    rpc: &Rpc,
    duration: Duration,
    max_calls: u64,
    timeout: Duration,
) -> Recorder {
    let deadline = Instant::now() + duration;
    let started = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for channel in channels {
        for _ in 0..streams.max(1) {
            let (mut stub, rpc, started) = (Stub::new(channel.clone()), rpc.clone(), started.clone());
            workers.push(tokio::spawn(async move {
                let mut recorder = Recorder::default();
                while Instant::now() < deadline && started.fetch_add(1, Ordering::Relaxed) < max_calls {
                    let t = Instant::now();
                    let result = stub.call(&rpc, timeout).await;
                    recorder.record(t.elapsed(), &result);
                }
                recorder
            }));
        }
    }
    let mut all = Recorder::default();
    for worker in workers {
        if let Ok(recorder) = worker.await {
            all.merge(recorder);
        }
    }
    all
}

/// Makes every call of `rpcs` once, at most `concurrency` in flight (all at once when it is at
/// least `rpcs.len()`), spread over `channels` round-robin.
pub async fn batch(channels: &[Channel], rpcs: Vec<Rpc>, concurrency: usize, timeout: Duration) -> Recorder {
    if channels.is_empty() {
        return Recorder::default();
    }
    let permits = Arc::new(Semaphore::new(concurrency.clamp(1, Semaphore::MAX_PERMITS)));
    let mut tasks = Vec::with_capacity(rpcs.len());
    for (i, rpc) in rpcs.into_iter().enumerate() {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let mut stub = Stub::new(channels[i % channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let result = stub.call(&rpc, timeout).await;
            drop(permit);
            (t.elapsed(), result)
        }));
    }
    let mut recorder = Recorder::default();
    for task in tasks {
        if let Ok((elapsed, result)) = task.await {
            recorder.record(elapsed, &result);
        }
    }
    recorder
}
