//! gRPC glue for `proxybroker.v1.ProxyBroker`: validate, call the [`Broker`], map errors.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::broker::Broker;
use crate::brokering::settings::normalise_exchange;
use crate::brokering::watch;
use crate::pb;
use crate::pb::wire::proxy_broker_server::ProxyBroker;
use crate::request::{Feedback, Lookup};
use crate::state::State;
use crate::wire::{ProxyAnswer, ProxyQuery};

/// `WatchProxy`'s stream of assignments (boxed: the watcher implementation is free to change).
pub type WatchStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ProxyAnswer, Status>> + Send + 'static>>;

/// The feed-facing service.
#[derive(Debug, Clone)]
pub struct BrokerService {
    broker: Arc<Broker>,
    /// `server.request_timeout_seconds` as it was when serving started (like the timeout layer
    /// that enforces it, it changes only on restart).
    call_timeout: std::time::Duration,
}

impl BrokerService {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        let call_timeout =
            std::time::Duration::from_secs(broker.config().server.request_timeout_seconds.unsigned_abs());
        Self { broker, call_timeout }
    }

    /// `RequestProxy` when the answer was not at hand. How long this caller waits for
    /// upstreams: the earlier of its deadline and the server's own per-call limit, less a margin
    /// to answer with the fallback instead of DEADLINE_EXCEEDED. The upstream lookup itself runs
    /// under the server's budget.
    async fn answer_later(
        &self,
        started: tokio::time::Instant,
        metadata: &tonic::metadata::MetadataMap,
        lookup: &Lookup,
    ) -> Result<ProxyAnswer, crate::error::Error> {
        let server_deadline = deadline_after(started, self.call_timeout);
        let wait_until = match grpc_deadline(started, metadata) {
            Some(caller) if caller < server_deadline => caller,
            _ => server_deadline,
        };
        // `answer_now` came up empty just before: not asked again.
        self.broker.answer_later(lookup, Some(wait_until)).await
    }

    /// The broker's state in force (one load: [`crate::hit::HitPath`] checks auth and answers
    /// with it).
    pub fn state(&self) -> Arc<State> {
        self.broker.state()
    }

    /// `RequestProxy` for [`crate::hit::HitPath`]: the answer, on `state`, to the request
    /// encoded in `message` when the broker has it at hand (counted as `request_proxy` counts it), else
    /// `None` (the call then goes through tonic and `request_proxy`, which decides everything
    /// else: a request that does not decode or is invalid, a miss).
    pub fn answer_at_once(
        &self,
        state: &State,
        message: &[u8],
        started: tokio::time::Instant,
    ) -> Option<ProxyAnswer> {
        use prost::Message;
        let query = ProxyQuery::decode(message).ok()?;
        let connection_type = query.connection_type;
        let lookup = Lookup::try_from(query).ok()?;
        let answer = self.broker.answer_now_in(state, &lookup, started)?;
        tracing::debug!("answered");
        let answered = Ok(answer);
        self.count(&answered, connection_type, started);
        answered.ok()
    }

    /// The request counter and duration histogram for one `RequestProxy`.
    fn count(
        &self,
        result: &Result<ProxyAnswer, Status>,
        connection_type: i32,
        started: tokio::time::Instant,
    ) {
        // Counters resolved once per label set and a lock-free histogram: nothing allocated here.
        let metrics = self.broker.metrics();
        let (source, code) = match result {
            Ok(answer) => (source_index(answer.source()), 0),
            Err(status) => (crate::metrics::SOURCES.len() - 1, status.code() as usize),
        };
        metrics
            .requests
            .get(source, connection_type_index(connection_type), code)
            .inc();
        metrics.request_duration.observe(started.elapsed());
    }
}

/// Records `result` on the RPC's span (only called when someone listens).
fn record(span: &tracing::Span, result: &Result<ProxyAnswer, crate::error::Error>) {
    match result {
        Ok(answer) => {
            span.record("source", source_label(answer.source()));
            span.record("upstream_endpoint", answer.upstream_endpoint());
            span.record("cache_hit", answer.source() == pb::ProxySource::Cache);
            span.record("outcome", "ok");
        }
        Err(e) => {
            span.record("outcome", tracing::field::display(e));
        }
    }
    tracing::debug!("answered");
}

#[tonic::async_trait]
impl ProxyBroker for BrokerService {
    async fn request_proxy(&self, request: Request<ProxyQuery>) -> Result<Response<ProxyAnswer>, Status> {
        let started = tokio::time::Instant::now();
        let span = rpc_span(&request);
        let (metadata, _, req) = request.into_parts();
        let connection_type = req.connection_type;
        let result = match Lookup::try_from(req) {
            Err(e) => Err(e),
            // A cache hit is answered at once: no deadline worked out, no future built for it.
            Ok(lookup) => match span.in_scope(|| self.broker.answer_now(&lookup, started)) {
                Some(answer) => Ok(answer),
                // Boxed: the waiting path's state stays out of every call's future.
                None => {
                    Box::pin(
                        self.answer_later(started, &metadata, &lookup)
                            .instrument(span.clone()),
                    )
                    .await
                }
            },
        };
        if !span.is_none() {
            span.in_scope(|| record(&span, &result));
        } else {
            tracing::debug!("answered");
        }
        let result = result.map_err(Status::from);
        self.count(&result, connection_type, started);
        result.map(Response::new)
    }

    async fn report_feedback(
        &self,
        request: Request<pb::ProxyFeedback>,
    ) -> Result<Response<pb::ReportFeedbackResponse>, Status> {
        let feedback = Feedback::try_from(request.into_inner())?;
        tracing::debug!(
            exchange = %feedback.exchange_id,
            connection_type = %feedback.connection_type,
            success = feedback.success,
            "feedback"
        );
        self.broker.report_feedback(&feedback).await;
        Ok(Response::new(pb::ReportFeedbackResponse { accepted: true }))
    }

    /// Each message as [`Self::report_feedback`] takes it, in order; the first invalid one ends
    /// the call (INVALID_ARGUMENT with its position); a stream silent for
    /// `request_body_timeout_seconds` is ended (see [`crate::limits`]: tonic reads the body's
    /// CANCELLED as the end of the stream, so the caller gets the count taken). One report is taken at a time, so
    /// a fast sender is held back by HTTP/2 flow control, not buffered.
    async fn report_feedback_stream(
        &self,
        request: Request<tonic::Streaming<pb::ProxyFeedback>>,
    ) -> Result<Response<pb::ReportFeedbackStreamResponse>, Status> {
        let mut stream = request.into_inner();
        let mut accepted: u64 = 0;
        while let Some(message) = stream.message().await? {
            let feedback = Feedback::try_from(message).map_err(|e| {
                Status::invalid_argument(format!("message {accepted} of the stream (counting from 0): {e}"))
            })?;
            self.broker.report_feedback(&feedback).await;
            accepted += 1;
        }
        tracing::debug!(accepted, "feedback stream ended");
        Ok(Response::new(pb::ReportFeedbackStreamResponse { accepted }))
    }

    type WatchProxyStream = WatchStream;

    /// The current assignment at once, then a new one whenever its proxy is banned or ejected
    /// for the exchange, its lease ends, or a reload changes it (see [`crate::brokering::watch`]).
    /// Validated and answered like `RequestProxy` (same auth, same [`Lookup`]); a refusal of the
    /// first answer fails the call, a failed later one ends the stream with its status. No
    /// per-call timeout applies to the stream (each answer waits for upstreams at most as long
    /// as a `RequestProxy` would); HTTP/2 keepalive ends it when the peer is gone.
    async fn watch_proxy(
        &self,
        request: Request<ProxyQuery>,
    ) -> Result<Response<Self::WatchProxyStream>, Status> {
        let started = tokio::time::Instant::now();
        let server_deadline = deadline_after(started, self.call_timeout);
        let wait_until = match grpc_deadline(started, request.metadata()) {
            Some(caller) if caller < server_deadline => caller,
            _ => server_deadline,
        };
        let lookup = Lookup::try_from(request.into_inner())?;
        let registration = self.broker.watchers().register()?;
        let first = self.broker.request_proxy(&lookup, Some(wait_until)).await?;
        tracing::debug!(
            exchange = %lookup.exchange_id,
            connection_type = %lookup.connection_type,
            "watching"
        );
        let exchange = normalise_exchange(&lookup.exchange_id).into_owned();
        let (broker, call_timeout, lookup) = (self.broker.clone(), self.call_timeout, Arc::new(lookup));
        let ask = move || {
            let (broker, lookup) = (broker.clone(), lookup.clone());
            async move {
                let wait_until = deadline_after(tokio::time::Instant::now(), call_timeout);
                broker
                    .request_proxy(&lookup, Some(wait_until))
                    .await
                    .map_err(Status::from)
            }
        };
        let assignments = watch::assignments(registration, &exchange, first, ask);
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            assignments,
            |answer| answer.map(ProxyAnswer::from),
        ))))
    }
}

/// The RPC's span, only when someone listens: OTLP export is on, or the `proxy_broker::rpc`
/// target is enabled at DEBUG (e.g. `RUST_LOG=proxy_broker=debug`). Otherwise it is
/// `Span::none()`, and building it costs nothing on the cache-hit path.
fn rpc_span(request: &Request<ProxyQuery>) -> tracing::Span {
    if !rpc_spans_wanted() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: "proxy_broker::rpc",
        "RequestProxy",
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "proxybroker.v1.ProxyBroker",
        rpc.method = "RequestProxy",
        exchange = %request.get_ref().exchange_id,
        connection_type = connection_type_label(request.get_ref().connection_type),
        region = request.get_ref().region.as_deref().unwrap_or(""),
        source = tracing::field::Empty,
        upstream_endpoint = tracing::field::Empty,
        cache_hit = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    crate::telemetry::adopt_remote_parent(&span, request.metadata());
    span
}

/// Whether `RequestProxy` calls get a span: OTLP export is on, or the `proxy_broker::rpc` target
/// is enabled at DEBUG.
pub fn rpc_spans_wanted() -> bool {
    crate::telemetry::rpc_spans_wanted()
        || tracing::enabled!(target: "proxy_broker::rpc", tracing::Level::DEBUG)
}

/// `source` label values: lower case.
fn source_label(source: pb::ProxySource) -> &'static str {
    crate::metrics::SOURCES[source_index(source)]
}

/// Index of `source` in [`crate::metrics::SOURCES`].
fn source_index(source: pb::ProxySource) -> usize {
    match source {
        pb::ProxySource::Upstream => 0,
        pb::ProxySource::Cache => 1,
        pb::ProxySource::Embedded => 2,
        pb::ProxySource::Direct => 3,
        pb::ProxySource::Unspecified => 4,
    }
}

fn connection_type_label(raw: i32) -> &'static str {
    crate::metrics::CONNECTION_TYPES[connection_type_index(raw)]
}

/// Index of a raw connection type in [`crate::metrics::CONNECTION_TYPES`].
fn connection_type_index(raw: i32) -> usize {
    match pb::ConnectionType::try_from(raw) {
        Ok(pb::ConnectionType::Http) => 0,
        Ok(pb::ConnectionType::Websocket) => 1,
        _ => 2,
    }
}

/// The caller's deadline from the `grpc-timeout` header, less 10 % kept to answer with a fallback.
fn grpc_deadline(
    now: tokio::time::Instant,
    metadata: &tonic::metadata::MetadataMap,
) -> Option<tokio::time::Instant> {
    let timeout = parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)?;
    Some(deadline_after(now, timeout))
}

/// `timeout` after `now`, less 10 % kept to answer with a fallback (saturating: never panics).
fn deadline_after(now: tokio::time::Instant, timeout: std::time::Duration) -> tokio::time::Instant {
    let usable = timeout - timeout / 10;
    now.checked_add(usable)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(86_400 * 365))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_grpc_timeout;
    use std::time::Duration;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
