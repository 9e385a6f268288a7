//! gRPC glue for `proxybroker.v1.ProxyBrokerAdmin`.

use std::sync::Arc;

use proxy_broker_core::redact::redact_url;
use tonic::{Request, Response, Status};

use proxy_broker_core::ConnectionType;

use crate::breaker::Kind;
use crate::broker::Broker;
use crate::brokering::Budget;
use crate::brokering::settings::{BudgetSource, Resolved};
use crate::cache::ConnectionTypeKey;
use crate::clock::wall_time;
use crate::error::Error;
use crate::pb;
use crate::pb::proxy_broker_admin_server::ProxyBrokerAdmin;
use crate::store::{Standing, StoreError};

/// Largest `ListCache` page.
pub const MAX_PAGE_SIZE: usize = 1000;

/// `ListCache` page tokens: the last key of the previous page, as hex of its JSON form (opaque to
/// callers; checked on the way back in).
mod page_token {
    use crate::cache::{CacheKey, ConnectionTypeKey};

    pub fn encode(key: &CacheKey) -> String {
        let kind = match key.connection_type {
            ConnectionTypeKey::Http => "http",
            ConnectionTypeKey::Websocket => "websocket",
        };
        let json = serde_json::json!([key.exchange, kind, key.region]).to_string();
        json.bytes().map(|b| format!("{b:02x}")).collect()
    }

    pub fn decode(token: &str) -> Option<CacheKey> {
        if !token.len().is_multiple_of(2) || token.len() > 1024 {
            return None;
        }
        let bytes: Vec<u8> = (0..token.len())
            .step_by(2)
            .map(|i| token.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<_>>()?;
        let (exchange, kind, region): (String, String, Option<String>) =
            serde_json::from_slice(&bytes).ok()?;
        let connection_type = match kind.as_str() {
            "http" => ConnectionTypeKey::Http,
            "websocket" => ConnectionTypeKey::Websocket,
            _ => return None,
        };
        Some(CacheKey {
            exchange,
            connection_type,
            region,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn tokens_round_trip_and_garbage_is_refused() {
            let key = CacheKey {
                exchange: "binance".into(),
                connection_type: ConnectionTypeKey::Websocket,
                region: Some("eu \"1\"".into()),
            };
            assert_eq!(decode(&encode(&key)), Some(key));
            for bad in ["zz", "abc", "00", "5b5d", &"a".repeat(2000)] {
                assert_eq!(decode(bad), None, "{bad}");
            }
        }
    }
}

/// The operator-facing service.
#[derive(Debug, Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
}

impl AdminService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

#[tonic::async_trait]
impl ProxyBrokerAdmin for AdminService {
    async fn list_upstreams(
        &self,
        _request: Request<pb::ListUpstreamsRequest>,
    ) -> Result<Response<pb::ListUpstreamsResponse>, Status> {
        let Some(d) = self.broker.delegation() else {
            return Ok(Response::new(pb::ListUpstreamsResponse {
                upstreams: Vec::new(),
                feedback: Some(pb::FeedbackStats {
                    ejections: self.broker.ejections(),
                    ..Default::default()
                }),
                delegation_enabled: false,
            }));
        };
        let upstreams = d
            .upstreams
            .endpoints()
            .iter()
            .map(|e| {
                let snap = e.breaker.snapshot();
                let stats = e.stats();
                pb::UpstreamStatus {
                    endpoint: e.name.to_string(),
                    breaker_state: match snap.kind {
                        Kind::Closed => pb::BreakerState::Closed,
                        Kind::Open => pb::BreakerState::Open,
                        Kind::HalfOpen => pb::BreakerState::HalfOpen,
                        Kind::Disabled => pb::BreakerState::Disabled,
                    }
                    .into(),
                    consecutive_failures: snap.consecutive_failures,
                    total_requests: stats.total_requests,
                    total_failures: stats.total_failures,
                    last_error: stats.last_error,
                    last_latency_ms: stats
                        .last_latency
                        .map(|l| u32::try_from(l.as_millis()).unwrap_or(u32::MAX)),
                    seconds_until_probe: snap
                        .until_probe
                        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
                }
            })
            .collect();
        let s = &d.feedback.stats;
        let feedback = pb::FeedbackStats {
            enqueued: s.enqueued.get(),
            forwarded: s.forwarded.get(),
            failed: s.failed.get(),
            dropped: s.dropped.get(),
            queued: d.feedback.queued() as u64,
            ejections: self.broker.ejections(),
        };
        Ok(Response::new(pb::ListUpstreamsResponse {
            upstreams,
            feedback: Some(feedback),
            delegation_enabled: true,
        }))
    }

    async fn list_cache(
        &self,
        request: Request<pb::ListCacheRequest>,
    ) -> Result<Response<pb::ListCacheResponse>, Status> {
        let request = request.into_inner();
        let filter = request.exchange_id.to_lowercase();
        let limit = match request.page_size {
            0 => MAX_PAGE_SIZE,
            n if n as usize > MAX_PAGE_SIZE => {
                return Err(Error::invalid(
                    "page_size",
                    format!("is {n} (at most {MAX_PAGE_SIZE}; 0 means {MAX_PAGE_SIZE})"),
                )
                .into());
            }
            n => n as usize,
        };
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(
                page_token::decode(token)
                    .ok_or_else(|| Error::invalid("page_token", "is not a token this broker gave out"))?,
            ),
        };
        let Some(d) = self.broker.delegation() else {
            return Ok(Response::new(pb::ListCacheResponse::default()));
        };
        let now = d.cache.now();
        let (page, more) = d.cache.list_page(&filter, after.as_ref(), limit);
        let next_page_token = match page.last() {
            Some((last, _)) if more => page_token::encode(last),
            _ => String::new(),
        };
        let entries = page
            .into_iter()
            .map(|(k, c)| {
                let expiry = if now < c.fresh_until {
                    i64::try_from((c.fresh_until - now).as_secs()).unwrap_or(i64::MAX)
                } else {
                    -i64::try_from((now - c.fresh_until).as_secs()).unwrap_or(i64::MAX)
                };
                pb::CacheEntry {
                    exchange_id: k.exchange,
                    connection_type: match k.connection_type {
                        ConnectionTypeKey::Http => pb::ConnectionType::Http,
                        ConnectionTypeKey::Websocket => pb::ConnectionType::Websocket,
                    }
                    .into(),
                    region: k.region.unwrap_or_default(),
                    proxy_url: redact_url(c.proxy_url()),
                    upstream_endpoint: c.endpoint.to_string(),
                    seconds_to_expiry: expiry,
                    stale: now >= c.fresh_until,
                }
            })
            .collect();
        Ok(Response::new(pb::ListCacheResponse {
            entries,
            next_page_token,
        }))
    }

    async fn invalidate_cache(
        &self,
        request: Request<pb::InvalidateCacheRequest>,
    ) -> Result<Response<pb::InvalidateCacheResponse>, Status> {
        use pb::invalidate_cache_request::Target;
        let target = request.into_inner().target;
        let removed = match (target, self.broker.delegation()) {
            (None, _) => return Err(Error::invalid("target", "set `exchange_id` or `all: true`").into()),
            (Some(Target::All(false)), _) => {
                return Err(Error::invalid("all", "must be true to drop every entry").into());
            }
            (Some(Target::ExchangeId(id)), _) if id.is_empty() => {
                return Err(Error::invalid(
                    "exchange_id",
                    "must not be empty (use `all: true` for everything)",
                )
                .into());
            }
            (Some(_), None) => 0,
            (Some(Target::All(true)), Some(d)) => {
                self.broker.brokering().clear_upstream_candidates_of(None);
                d.cache.invalidate_all()
            }
            (Some(Target::ExchangeId(id)), Some(d)) => {
                self.broker.brokering().clear_upstream_candidates_of(Some(&id));
                d.cache.invalidate_exchange(&id)
            }
        };
        tracing::info!(removed, "cache invalidated by admin request");
        Ok(Response::new(pb::InvalidateCacheResponse {
            removed: u32::try_from(removed).unwrap_or(u32::MAX),
        }))
    }

    async fn get_effective_config(
        &self,
        _request: Request<pb::GetEffectiveConfigRequest>,
    ) -> Result<Response<pb::GetEffectiveConfigResponse>, Status> {
        Ok(Response::new(pb::GetEffectiveConfigResponse {
            config_json: self.broker.config().redacted_json(),
        }))
    }

    async fn list_proxies(
        &self,
        request: Request<pb::ListProxiesRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        let request = request.into_inner();
        let page_size = page_size(request.page_size)?;
        let exchange = Some(request.exchange_id.as_str()).filter(|x| !x.is_empty());
        let token = Some(request.page_token.as_str()).filter(|t| !t.is_empty());
        let brokering = self.broker.brokering();
        let page = brokering
            .list_proxies(exchange, token, page_size)
            .await
            .map_err(|e| match e {
                StoreError::BadPageToken(_) => Status::from(Error::invalid(
                    "page_token",
                    "is not a token this broker gave out",
                )),
                StoreError::Unavailable(why) => Status::unavailable(why),
            })?;
        let now = self.broker.now();
        let proxies = page
            .entries
            .into_iter()
            .map(|row| {
                let (state, until) = match row.state.standing(now) {
                    Standing::Banned(t) => (pb::ProxyState::Banned, Some(t)),
                    Standing::Ejected(t) => (pb::ProxyState::Ejected, Some(t)),
                    Standing::Penalised(t) => (pb::ProxyState::Penalised, Some(t)),
                    Standing::Ok => (pb::ProxyState::Ok, None),
                };
                let usage = |connection_type| {
                    let budget = brokering.budget(&row.exchange, connection_type);
                    let used = row.state.window(connection_type).map_or(0, |w| w.used);
                    Some(pb::AttemptUsage {
                        used,
                        budget: budget.map(attempt_budget),
                    })
                };
                pb::ProxyStatus {
                    proxy_url: redact_url(&row.proxy),
                    exchange_id: row.exchange.to_string(),
                    state: state.into(),
                    until: until.map(|t| wall_time(now, t)),
                    websocket: usage(ConnectionType::Websocket),
                    http: usage(ConnectionType::Http),
                    hand_outs: row.state.hand_outs,
                    consecutive_failures: row.state.consecutive_failures,
                    live_leases: row.state.live_leases,
                }
            })
            .collect();
        Ok(Response::new(pb::ListProxiesResponse {
            proxies,
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn list_exchanges(
        &self,
        request: Request<pb::ListExchangesRequest>,
    ) -> Result<Response<pb::ListExchangesResponse>, Status> {
        let request = request.into_inner();
        let page_size = page_size(request.page_size)?;
        let filter = request.exchange_id.to_ascii_lowercase();
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(
                hex_decode(token)
                    .ok_or_else(|| Error::invalid("page_token", "is not a token this broker gave out"))?,
            ),
        };
        let now = self.broker.now();
        let mut rows = self
            .broker
            .brokering()
            .exchanges()
            .await
            .into_iter()
            .filter(|x| filter.is_empty() || x.exchange == filter)
            .filter(|x| after.as_ref().is_none_or(|a| x.exchange > *a))
            .peekable();
        let mut exchanges = Vec::new();
        while exchanges.len() < page_size
            && let Some(x) = rows.next()
        {
            let budget = |r: Option<Resolved>| {
                Some(pb::BudgetInForce {
                    budget: r.map(|r| attempt_budget(r.budget)),
                    origin: match r.map(|r| r.source) {
                        None => pb::BudgetOrigin::None,
                        Some(BudgetSource::BuiltIn) => pb::BudgetOrigin::BuiltIn,
                        Some(BudgetSource::Configured) => pb::BudgetOrigin::Configured,
                    }
                    .into(),
                })
            };
            let since = x.outage.and_then(|o| o.since);
            exchanges.push(pb::ExchangeStatus {
                websocket: budget(x.websocket),
                http: budget(x.http),
                ban_seconds: u32::try_from(x.ban.as_secs()).unwrap_or(u32::MAX),
                outage: since.is_some(),
                outage_since: since.map(|t| wall_time(now, t)),
                reporting_proxies: x
                    .outage
                    .map_or(0, |o| u32::try_from(o.reporters).unwrap_or(u32::MAX)),
                failing_proxies: x
                    .outage
                    .map_or(0, |o| u32::try_from(o.failing).unwrap_or(u32::MAX)),
                exchange_id: x.exchange,
            });
        }
        let next_page_token = match exchanges.last() {
            Some(last) if rows.peek().is_some() => hex_encode(&last.exchange_id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListExchangesResponse {
            exchanges,
            next_page_token,
        }))
    }
}

/// A page size of `ListProxies` / `ListExchanges`: 0 means the largest.
fn page_size(requested: u32) -> Result<usize, Status> {
    match requested {
        0 => Ok(MAX_PAGE_SIZE),
        n if n as usize > MAX_PAGE_SIZE => Err(Error::invalid(
            "page_size",
            format!("is {n} (at most {MAX_PAGE_SIZE}; 0 means {MAX_PAGE_SIZE})"),
        )
        .into()),
        n => Ok(n as usize),
    }
}

fn attempt_budget(b: Budget) -> pb::AttemptBudget {
    pb::AttemptBudget {
        attempts: b.attempts,
        per_seconds: u32::try_from(b.per.as_secs()).unwrap_or(u32::MAX),
    }
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) || token.len() > 512 {
        return None;
    }
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| token.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<_>>()?;
    String::from_utf8(bytes).ok()
}
