//! Admission: what each kind of call is limited by.
//!
//! Limits follow cost, not call counts:
//! - **Health checks** (`/grpc.health.v1.Health/*`) skip every limit: a liveness probe answered
//!   RESOURCE_EXHAUSTED would restart a pod exactly when it is busy.
//! - **Feed calls** (`/proxybroker.v1.ProxyBroker/*`) are never shed. A cache hit or a caller that
//!   joins an in-flight lookup costs almost nothing, and the reconnect storm the broker exists for
//!   is exactly many such calls at once. What they can cost is bounded where it arises: upstream
//!   lookups in flight (`upstream_max_in_flight`, per endpoint and overall, in `broker` and
//!   `upstream`), feedback bytes queued (`feedback`), streams per connection and bytes buffered
//!   per connection (HTTP/2 settings in `server`), and how long a request body may take to arrive
//!   ([`BodyTimeoutLayer`]; `RequestProxy`'s body is read and timed by [`crate::hit::HitPath`]),
//!   so a stalled stream holds nothing shared.
//! - **Everything else** (admin, reflection) goes through load shedding and the global
//!   `max_concurrent_requests` limit: an admin listing can be expensive, and operators can retry.
//!
//! Admin and reflection calls have the per-call timeout (`request_timeout_seconds`). Feed calls
//! do not need it: `RequestProxy` stops waiting for upstreams at 90 % of it by itself (the
//! lookup it shares is bounded the same way, on its own task), `ReportFeedback` never waits, and a
//! stalled request body is ended by [`BodyTimeoutLayer`]; leaving the layer out saves a timer per
//! call on the hot path. `ReportFeedbackStream` may stream for as long as it keeps sending: its
//! body timeout is the longest silence between two messages.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tower::{BoxError, Layer, Service, ServiceExt};

/// Path prefix of the calls that skip the limits.
pub const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
/// Path prefix of the feed calls, which are never shed.
pub const FEED_PREFIX: &str = "/proxybroker.v1.ProxyBroker/";
/// The call whose body [`crate::hit::HitPath`] reads, and times, itself.
pub const REQUEST_PROXY_PATH: &str = "/proxybroker.v1.ProxyBroker/RequestProxy";
/// The client-streaming feedback call, whose body timeout counts silence, not the whole stream.
pub const FEEDBACK_STREAM_PATH: &str = "/proxybroker.v1.ProxyBroker/ReportFeedbackStream";

/// Sends each call through the stack for its kind (see the module docs).
#[derive(Debug, Clone)]
pub struct AdmissionLayer<F, O> {
    feed: F,
    other: O,
}

impl<F, O> AdmissionLayer<F, O> {
    /// Feed calls go through `feed`, admin and reflection through `other`, health through neither.
    pub fn new(feed: F, other: O) -> Self {
        Self { feed, other }
    }
}

impl<S: Clone, F: Layer<S>, O: Layer<S>> Layer<S> for AdmissionLayer<F, O> {
    type Service = Admission<S, F::Service, O::Service>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            plain: inner.clone(),
            feed: self.feed.layer(inner.clone()),
            other: self.other.layer(inner),
        }
    }
}

/// See [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub struct Admission<S, F, O> {
    plain: S,
    feed: F,
    other: O,
}

type BoxFuture<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

fn route<T, B, R>(service: &T, request: http::Request<B>) -> BoxFuture<R>
where
    T: Service<http::Request<B>, Response = R> + Clone + Send + 'static,
    T::Error: Into<BoxError>,
    T::Future: Send + 'static,
    B: Send + 'static,
    R: 'static,
{
    let service = service.clone();
    Box::pin(async move { service.oneshot(request).await.map_err(Into::into) })
}

impl<S, F, O, B, R> Service<http::Request<B>> for Admission<S, F, O>
where
    S: Service<http::Request<B>, Response = R> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    F: Service<http::Request<B>, Response = R> + Clone + Send + 'static,
    F::Error: Into<BoxError>,
    F::Future: Send + 'static,
    O: Service<http::Request<B>, Response = R> + Clone + Send + 'static,
    O::Error: Into<BoxError>,
    O::Future: Send + 'static,
    B: Send + 'static,
    R: 'static,
{
    type Response = R;
    type Error = BoxError;
    type Future = BoxFuture<R>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is decided per call below (on a clone), because which stack serves the call
        // depends on its path; the shedding stack refuses by itself when it is not ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if path.starts_with(HEALTH_PREFIX) {
            route(&self.plain, request)
        } else if path.starts_with(FEED_PREFIX) {
            route(&self.feed, request)
        } else {
            route(&self.other, request)
        }
    }
}

/// Fails a call whose request body has not fully arrived within `timeout` of its headers, so a
/// stream that sends headers and never a body ends instead of waiting for the call timeout.
/// `RequestProxy` is left to [`crate::hit::HitPath`], which reads that body itself and applies the
/// same [`TimedBody`] to it without boxing it.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeoutLayer {
    timeout: Duration,
}

impl BodyTimeoutLayer {
    /// Request bodies must arrive within `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for BodyTimeoutLayer {
    type Service = BodyTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// See [`BodyTimeoutLayer`].
#[derive(Debug, Clone)]
pub struct BodyTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Service<http::Request<Body>> for BodyTimeout<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if path == REQUEST_PROXY_PATH {
            // `hit::HitPath` reads this body itself and times it there, unboxed.
            return self.inner.call(request);
        }
        // A client stream of many messages may take as long as it likes in all, but not
        // `timeout` between two of them.
        let idle = path == FEEDBACK_STREAM_PATH;
        let timeout = self.timeout;
        self.inner.call(request.map(|body| timed(body, timeout, idle)))
    }
}

/// `body` failing as [`TimedBody`] says, as a tonic body: boxed as tonic's own boxed body, which
/// `Body::new` takes as it is (any other body it would wrap once more to convert its errors: one
/// more layer on every poll and drop).
pub fn timed(body: Body, timeout: Duration, idle: bool) -> Body {
    Body::new(http_body_util::BodyExt::boxed_unsync(TimedBody::new(
        body, timeout, idle,
    )))
}

/// A request body that fails when it has not ended `timeout` after it first kept the call
/// waiting. The timer starts only then: a request whose message came with its headers (the usual
/// case) costs no timer and no clock read. With `idle`, every frame that arrives restarts it (a
/// client stream: the limit is on the silence between messages).
pub struct TimedBody<B = Body> {
    inner: B,
    timeout: Duration,
    idle: bool,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    ended: bool,
}

impl<B> std::fmt::Debug for TimedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedBody")
            .field("timeout", &self.timeout)
            .field("idle", &self.idle)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl<B> TimedBody<B> {
    /// `inner`, failing when it has not ended `timeout` after it first kept its reader waiting
    /// (with `idle`: `timeout` after the last frame).
    pub fn new(inner: B, timeout: Duration, idle: bool) -> Self {
        Self {
            inner,
            timeout,
            idle,
            sleep: None,
            ended: false,
        }
    }
}

impl<B: HttpBody<Data = Bytes, Error = tonic::Status> + Unpin> HttpBody for TimedBody<B> {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => {
                if this.idle
                    && let Some(sleep) = this.sleep.as_mut()
                {
                    let now = tokio::time::Instant::now();
                    // Saturating, as `tokio::time::sleep` is: a huge timeout means about never.
                    let at = now
                        .checked_add(this.timeout)
                        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
                    sleep.as_mut().reset(at);
                }
                Poll::Ready(Some(frame))
            }
            Poll::Pending if this.ended => Poll::Pending,
            Poll::Pending => match this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(this.timeout)))
                .as_mut()
                .poll(cx)
            {
                Poll::Ready(()) => {
                    this.ended = true;
                    Poll::Ready(Some(Err(tonic::Status::cancelled(
                        "the request message did not arrive within server.request_body_timeout_seconds",
                    ))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
