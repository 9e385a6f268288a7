//! Keeping health checks out of the load limits.
//!
//! The limit stack (load shedding, concurrency limit, timeout) wraps the whole tonic router, so
//! that its errors become gRPC statuses in one place. Health checks must not be shed, though:
//! a liveness probe answered RESOURCE_EXHAUSTED would restart a pod exactly when it is busy.
//! [`BypassLayer`] sends `/grpc.health.v1.Health/*` around the stack and everything else through it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{BoxError, Layer, Service, ServiceExt};

/// Path prefix of the calls that skip the limits.
pub const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// Applies `L` to every call except health checks.
#[derive(Debug, Clone)]
pub struct BypassLayer<L> {
    limits: L,
}

impl<L> BypassLayer<L> {
    /// Wraps the limit stack `limits`.
    pub fn new(limits: L) -> Self {
        Self { limits }
    }
}

impl<S: Clone, L: Layer<S>> Layer<S> for BypassLayer<L> {
    type Service = Bypass<S, L::Service>;

    fn layer(&self, inner: S) -> Self::Service {
        Bypass {
            plain: inner.clone(),
            limited: self.limits.layer(inner),
        }
    }
}

/// See [`BypassLayer`].
#[derive(Debug, Clone)]
pub struct Bypass<S, T> {
    plain: S,
    limited: T,
}

impl<S, T, B, R> Service<http::Request<B>> for Bypass<S, T>
where
    S: Service<http::Request<B>, Response = R> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    T: Service<http::Request<B>, Response = R> + Clone + Send + 'static,
    T::Error: Into<BoxError>,
    T::Future: Send + 'static,
    B: Send + 'static,
    R: 'static,
{
    type Response = R;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is decided per call below (on a clone), because which side serves the call
        // depends on its path; the limited side sheds load itself when it is not ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            let plain = self.plain.clone();
            Box::pin(async move { plain.oneshot(request).await.map_err(Into::into) })
        } else {
            let limited = self.limited.clone();
            Box::pin(async move { limited.oneshot(request).await.map_err(Into::into) })
        }
    }
}
