//! The cache hit's own path: a `RequestProxy` whose answer is at hand is answered here, without
//! tonic's generic unary machinery; every other call goes to the generated server unchanged.
//!
//! A cache hit's answer is bytes ready to send (`crate::wire`). tonic's generic unary path
//! would still take it through a message decoder with its own 8 KiB buffer, the boxed handler
//! future, `MetadataMap` conversions and a stream-based encoder that frames the message and builds
//! the trailers: in instructions about a seventh of a whole call, more than a hit's own work
//! (BENCHMARKS "Session 13"). So [`HitPath`], in front of the generated server, reads the
//! request's one message, and if the broker answers it at once ([`Broker::answer_now`]) sends
//! that answer as one gRPC frame and `grpc-status: 0`, what tonic would send for it byte for byte
//! (`tests/hit_path.rs` compares the two).
//!
//! Only the plainest call is taken: a `RequestProxy` with no `grpc-encoding`, one uncompressed
//! message of at most `server.max_message_bytes` and then the end of the body, no trailers, while
//! no per-RPC span is wanted and upstream delegation is on (without it nothing is cached). Anything
//! else, and every call the broker cannot answer at once (a miss, an invalid request, a budgeted
//! exchange: tonic then decodes the message a second time, about 700 instructions beside the
//! lookup or the store's count such a call makes), goes to the generated server with the body as
//! it arrived (the bytes read so far, then the rest), so tonic decides its status exactly as it
//! does without this path. The body timeout of every `RequestProxy` is applied here
//! ([`TimedBody`], unboxed when this path reads the body). tonic has no hook for a handler that
//! answers from bytes (its `Grpc` always encodes through a codec and a stream), hence the
//! hand-written framing here.
//!
//! [`Broker::answer_now`]: crate::broker::Broker::answer_now

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::Either;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

use crate::limits::{REQUEST_PROXY_PATH, TimedBody, timed};
use crate::service::BrokerService;

/// The request header that names a compression: a call that has it is left to tonic.
static GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
/// The trailer that carries a call's status.
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// A gRPC message's prefix: the compressed flag and the length (big-endian `u32`).
const PREFIX: usize = 5;

/// The generated `ProxyBroker` server `S`, with cache hits answered in front of it (see the module
/// docs). Cloned for every call (tonic's router does): one reference count.
#[derive(Debug)]
pub struct HitPath<S>(Arc<Shared<S>>);

impl<S> Clone for HitPath<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

#[derive(Debug)]
struct Shared<S> {
    inner: S,
    service: BrokerService,
    max_message: usize,
    body_timeout: Duration,
    enabled: bool,
}

impl<S> HitPath<S> {
    /// `inner` (the generated server of `service` behind its auth check), taking requests of
    /// at most `max_message` bytes, as `inner` does (`max_decoding_message_size`). A
    /// `RequestProxy` body must arrive within `body_timeout` ([`crate::limits::TimedBody`]: the
    /// body timeout layer leaves this call to this service, enabled or not). Not `enabled`
    /// (`server.fast_cache_hits: false`): every call goes to `inner`.
    pub fn new(
        inner: S,
        service: BrokerService,
        max_message: usize,
        body_timeout: Duration,
        enabled: bool,
    ) -> Self {
        Self(Arc::new(Shared {
            inner,
            service,
            max_message,
            body_timeout,
            enabled,
        }))
    }
}

impl<S: NamedService> NamedService for HitPath<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S> Service<http::Request<Body>> for HitPath<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Oneshot<S, http::Request<Body>>, BoxFuture<Self::Response, S::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call that reaches `inner` readies a clone of it (`oneshot`); a hit needs nothing.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let shared = &*self.0;
        let pass = |request| Either::Left(shared.inner.clone().oneshot(request));
        if request.uri().path() != REQUEST_PROXY_PATH {
            return pass(request);
        }
        let timeout = shared.body_timeout;
        if !shared.enabled
            || request.headers().contains_key(&GRPC_ENCODING)
            || crate::service::rpc_spans_wanted()
        {
            return pass(request.map(|body| timed(body, timeout, false)));
        }
        // The one state load of the call: its auth check and its answer.
        let state = shared.service.state();
        // Without delegation nothing is cached: every answer is the embedded configuration's,
        // made on tonic's path. A refused token gets `inner`'s own check and status.
        if state.delegation.is_none() || crate::auth::check_tokens(&state.tokens, request.headers()).is_err()
        {
            return pass(request.map(|body| timed(body, timeout, false)));
        }
        let shared = self.0.clone();
        Either::Right(Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = TimedBody::new(body, timeout, false);
            let body = match read_message(body, shared.max_message).await {
                Read::Message(message) => {
                    let started = tokio::time::Instant::now();
                    let answer = shared.service.answer_at_once(&state, &message[PREFIX..], started);
                    if let Some(answer) = answer {
                        return Ok(answered(answer));
                    }
                    // The body has ended: nothing left to time.
                    Body::new(http_body_util::Full::new(message))
                }
                Read::Other(replay) => Body::new(replay),
            };
            drop(state);
            let request = http::Request::from_parts(parts, body);
            shared.inner.clone().oneshot(request).await
        }))
    }
}

/// What [`read_message`] found.
enum Read {
    /// One uncompressed message of at most the limit, with its prefix, and the end of the body.
    Message(Bytes),
    /// Anything else, to be read again from the start.
    Other(Replay),
}

/// Reads the body until it ends, as long as it can still be one uncompressed message of at most
/// `max_message` bytes with nothing after it.
async fn read_message(mut body: TimedBody, max_message: usize) -> Read {
    let mut read = Bytes::new();
    let mut more: Option<BytesMut> = None;
    let stop = loop {
        // Stop as soon as it can no longer be one message within the limit.
        let buffered = more.as_deref().unwrap_or(&read);
        match expected_len(buffered, max_message) {
            Some(expected) if buffered.len() > expected => break None,
            None if buffered.len() >= PREFIX => break None,
            _ => {}
        }
        match body.frame().await {
            None => break None,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => match &mut more {
                    Some(more) => more.put(data),
                    None if read.is_empty() => read = data,
                    None => {
                        let mut joined = BytesMut::with_capacity(read.len() + data.len());
                        joined.put(std::mem::take(&mut read));
                        joined.put(data);
                        more = Some(joined);
                    }
                },
                Err(frame) => break Some(Ok(frame)),
            },
            Some(Err(status)) => break Some(Err(status)),
        }
        // The usual message comes in one frame that ends the stream: known here without
        // polling the body again (in hyper, one more look for data and one for trailers).
        if body.is_end_stream() {
            break None;
        }
    };
    let read = more.map_or(read, BytesMut::freeze);
    match (&stop, expected_len(&read, max_message)) {
        (None, Some(expected)) if expected == read.len() && body.is_end_stream() => Read::Message(read),
        _ => Read::Other(Replay::new(read, stop, body)),
    }
}

/// The length of the one message `bytes` starts with, prefix included: `None` when the prefix is
/// not all there yet, says compressed, or gives a length over `max_message`.
fn expected_len(bytes: &[u8], max_message: usize) -> Option<usize> {
    let prefix: [u8; PREFIX] = bytes.get(..PREFIX)?.try_into().ok()?;
    let [0, length @ ..] = prefix else { return None };
    let length = usize::try_from(u32::from_be_bytes(length)).ok()?;
    (length <= max_message).then_some(length + PREFIX)
}

/// A request body read again: the bytes read, then the frame or error that stopped the reading,
/// then the rest of the body.
struct Replay {
    read: Option<Bytes>,
    stop: Option<Result<Frame<Bytes>, Status>>,
    rest: TimedBody,
}

impl Replay {
    fn new(read: Bytes, stop: Option<Result<Frame<Bytes>, Status>>, rest: TimedBody) -> Self {
        Self {
            read: (!read.is_empty()).then_some(read),
            stop,
            rest,
        }
    }
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(read) = self.read.take() {
            return Poll::Ready(Some(Ok(Frame::data(read))));
        }
        if let Some(stop) = self.stop.take() {
            return Poll::Ready(Some(stop));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_none() && self.stop.is_none() && self.rest.is_end_stream()
    }
}

/// The response tonic sends for `answer`: `content-type: application/grpc`, the message as one
/// frame, and `grpc-status: 0` as the trailers.
fn answered(answer: crate::wire::ProxyAnswer) -> http::Response<Body> {
    use prost::Message;
    let length = answer.encoded_len();
    let Ok(prefix_length) = u32::try_from(length) else {
        // tonic's status for a message it cannot frame. Not reached: an answer is a few hundred
        // bytes (URLs, strategy and metadata are capped far below).
        return Status::resource_exhausted(format!(
            "Cannot return body with more than 4GB of data but got {length} bytes"
        ))
        .into_http();
    };
    let mut frame = BytesMut::with_capacity(PREFIX + length);
    frame.put_u8(0);
    frame.put_u32(prefix_length);
    answer.encode_raw(&mut frame);
    let mut response = http::Response::new(Body::new(Answered {
        message: Some(frame.freeze()),
        ended: false,
    }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A successful unary response's body: the message, then `grpc-status: 0`.
struct Answered {
    message: Option<Bytes>,
    ended: bool,
}

impl HttpBody for Answered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(message) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        self.ended = true;
        let mut trailers = HeaderMap::with_capacity(1);
        trailers.insert(GRPC_STATUS.clone(), HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}
