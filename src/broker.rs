//! The decision: which proxy a feed gets. Today the embedded configuration answers; upstream
//! delegation plugs in ahead of it.

use std::sync::Arc;
use std::time::Duration;

use proxy_broker_core::{EmbeddedResolver, Resolution};

use crate::config::BrokerConfig;
use crate::error::Error;
use crate::pb;
use crate::request::{Feedback, Lookup};

/// Shared state behind both gRPC services.
#[derive(Debug)]
pub struct Broker {
    config: Arc<BrokerConfig>,
    embedded: EmbeddedResolver,
}

impl Broker {
    /// A broker for a validated configuration.
    pub fn new(config: BrokerConfig) -> Self {
        let ttl = Duration::from_secs(config.proxy.external_service.cache_ttl_seconds.unsigned_abs());
        let embedded = EmbeddedResolver::new(&config.proxy, ttl);
        Self {
            config: Arc::new(config),
            embedded,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Answers one validated request.
    pub async fn request_proxy(&self, lookup: &Lookup) -> Result<pb::ProxyResponse, Error> {
        Ok(self.embedded_answer(lookup))
    }

    /// The embedded configuration's answer: EMBEDDED with a proxy, DIRECT without.
    fn embedded_answer(&self, lookup: &Lookup) -> pb::ProxyResponse {
        let Resolution {
            proxy_url,
            strategy,
            timeout_seconds,
        } = self.embedded.resolve(&lookup.exchange_id, lookup.connection_type);
        let ttl_seconds = u32::try_from(self.config.proxy.external_service.cache_ttl_seconds).unwrap_or(300);
        let mut metadata = prost_types::Struct::default();
        if let Some(timeout) = timeout_seconds {
            metadata
                .fields
                .insert("timeout_seconds".into(), number(timeout as f64));
        }
        let (source, fallback_policy) = match proxy_url {
            Some(_) => (pb::ProxySource::Embedded, pb::FallbackPolicy::EmbeddedFallback),
            None => (pb::ProxySource::Direct, pb::FallbackPolicy::DirectConnection),
        };
        pb::ProxyResponse {
            proxy_url: proxy_url.unwrap_or_default(),
            strategy: strategy.to_owned(),
            ttl_seconds,
            fallback_policy: fallback_policy.into(),
            metadata: Some(metadata),
            source: source.into(),
            upstream_endpoint: String::new(),
        }
    }

    /// Takes a validated feedback report. A failure ends one lease on that proxy so that
    /// `least_connections` pools stop counting the broken connection.
    pub fn report_feedback(&self, feedback: &Feedback) {
        if let (false, Some(url)) = (feedback.success, &feedback.proxy_url) {
            self.embedded.release(url);
        }
    }
}

fn number(n: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(n)),
    }
}
