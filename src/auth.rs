//! Client authentication: `authorization: Bearer <token>` checked against `server.auth_tokens`
//! (and `auth_tokens_file`) in constant time. No configured token means no authentication.
//!
//! Applied as a tonic interceptor to `ProxyBroker`, `ProxyBrokerAdmin` and, when
//! `server.reflection: authenticated`, to reflection. Health stays open for probes.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

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

/// Whether `presented` equals one of `accepted`, comparing every candidate in constant time.
pub fn token_matches(accepted: &[String], presented: &[u8]) -> bool {
    accepted
        .iter()
        .fold(subtle::Choice::from(0), |found, token| {
            found | token.as_bytes().ct_eq(presented)
        })
        .into()
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let state = self.broker.state_guard();
        if state.tokens.is_empty() {
            return Ok(request);
        }
        let Some(value) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata",
            ));
        };
        let presented = value.as_bytes();
        let token = presented
            .strip_prefix(b"Bearer ")
            .or_else(|| presented.strip_prefix(b"bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization metadata is not `Bearer <token>`"))?;
        if token_matches(&state.tokens, token) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
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
        assert!(token_matches(&accepted, b"second-token-0123456"));
        assert!(!token_matches(&accepted, b"second-token-012345"));
        assert!(!token_matches(&accepted, b""));
        assert!(!token_matches(&[], b"anything"));
    }
}
