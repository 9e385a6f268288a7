//! Client authentication: `authorization: Bearer <token>` checked against `server.auth_tokens`
//! (and `auth_tokens_file`) in constant time. No configured token means no authentication.
//!
//! Applied as [`Authenticated`] to `ProxyBroker`, `ProxyBrokerAdmin` and, when
//! `server.reflection: authenticated`, to reflection. Health stays open for probes. It reads the
//! `authorization` header of the HTTP request itself rather than being a tonic interceptor: an
//! interceptor rebuilds every call's request (metadata, URI, extensions) to show it a
//! `tonic::Request`, which a cache hit paid for even with no token configured.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::server::NamedService;
use tower::Service;

use crate::broker::Broker;

/// The interceptor; reads the accepted tokens from the broker's current state, so a reload that
/// changes them takes effect at once.
#[derive(Debug, Clone)]
pub struct BearerAuth {
    broker: Arc<Broker>,
}

impl BearerAuth {
    /// Checks calls against `broker`'s configured tokens.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

/// Whether `presented` equals one of `accepted`, without leaking which one, how many bytes of it
/// matched, or how long the accepted tokens are.
///
/// Both sides are hashed to fixed-size SHA-256 digests first and the digests compared in constant
/// time (`subtle`), so a shorter or longer presented token takes exactly the same path as one of
/// the right length (a plain `ct_eq` on the raw bytes returns early on a length mismatch). Every
/// accepted token is compared, whether or not an earlier one matched.
pub fn token_matches<T: AsRef<[u8]>>(accepted: &[T], presented: &[u8]) -> bool {
    let presented = Sha256::digest(presented);
    accepted
        .iter()
        .fold(subtle::Choice::from(0), |found, token| {
            found | Sha256::digest(token.as_ref()).ct_eq(&presented)
        })
        .into()
}

impl BearerAuth {
    /// Admits a call with these headers, or says why not.
    pub fn check(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        check_tokens(&self.broker.state_guard().tokens, headers)
    }
}

/// Admits a call with these headers when `tokens` (a state's accepted tokens) is empty or holds
/// the bearer token they present, or says why not.
pub fn check_tokens(tokens: &[String], headers: &http::HeaderMap) -> Result<(), Status> {
    if tokens.is_empty() {
        return Ok(());
    }
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Err(Status::unauthenticated(
            "missing `authorization: Bearer <token>` metadata",
        ));
    };
    let presented = value.as_bytes();
    let token = presented
        .strip_prefix(b"Bearer ")
        .or_else(|| presented.strip_prefix(b"bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization metadata is not `Bearer <token>`"))?;
    if token_matches(tokens, token) {
        Ok(())
    } else {
        Err(Status::unauthenticated("invalid bearer token"))
    }
}

/// `S` behind [`BearerAuth`]: a refused call is answered UNAUTHENTICATED without reaching `S`.
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    auth: BearerAuth,
}

impl<S> Authenticated<S> {
    /// `inner`, for callers `auth` admits.
    pub fn new(inner: S, auth: BearerAuth) -> Self {
        Self { inner, auth }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, std::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.auth.check(request.headers()) {
            Ok(()) => Either::Left(self.inner.call(request)),
            Err(status) => Either::Right(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn only_exact_tokens_match() {
        let accepted = vec![
            "first-token-0123456".to_owned(),
            "second-token-0123456".to_owned(),
        ];
        // (name, presented, matches)
        let cases: &[(&str, &[u8], bool)] = &[
            ("second token", b"second-token-0123456", true),
            ("first token", b"first-token-0123456", true),
            ("one byte short", b"second-token-012345", false),
            ("one byte long", b"second-token-01234567", false),
            ("last byte differs", b"second-token-0123457", false),
            ("prefix of a token", b"first", false),
            ("empty", b"", false),
            ("much longer", &[b'x'; 4096], false),
            ("token with a trailing NUL", b"first-token-0123456\0", false),
        ];
        for (name, presented, want) in cases {
            assert_eq!(token_matches(&accepted, presented), *want, "{name}");
        }
        assert!(!token_matches::<String>(&[], b"anything"));
    }
}
