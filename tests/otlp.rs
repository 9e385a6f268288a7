//! OpenTelemetry traces: the real binary exports spans over OTLP/gRPC (configured only through the
//! standard `OTEL_*` variables) to a collector started in the test; the caller's W3C
//! `traceparent` becomes the RPC span's parent and travels on to the upstream HTTP request.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::ops::{BrokerProcess, ConfigDir, PROMPT, Upstream, eventually, proxy_for};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use proxy_broker::pb::proxy_broker_client::ProxyBrokerClient;
use proxy_broker::pb::{ConnectionType, ProxyRequest, ProxySource};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// An OTLP trace receiver on loopback that keeps every export.
#[derive(Clone, Default)]
struct Collector {
    exports: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.exports.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A received span with the resource it came from.
#[derive(Debug, Clone)]
struct Received {
    span: Span,
    service_name: Option<String>,
}

impl Received {
    fn attributes(&self) -> BTreeMap<String, AnyValue> {
        self.span
            .attributes
            .iter()
            .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?.value?)))
            .collect()
    }
}

impl Collector {
    async fn start() -> (Self, String) {
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        (collector, format!("http://{addr}"))
    }

    fn spans(&self) -> Vec<Received> {
        let mut out = Vec::new();
        for export in self.exports.lock().unwrap().iter() {
            for resource_spans in &export.resource_spans {
                let service_name = resource_spans.resource.as_ref().and_then(|r| {
                    r.attributes
                        .iter()
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                            AnyValue::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                });
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        out.push(Received {
                            span: span.clone(),
                            service_name: service_name.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// RequestProxy spans received so far.
    fn rpc_spans(&self) -> Vec<Received> {
        self.spans()
            .into_iter()
            .filter(|r| r.span.name == "RequestProxy")
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn string(value: &AnyValue) -> &str {
    match value {
        AnyValue::StringValue(s) => s,
        other => panic!("not a string attribute: {other:?}"),
    }
}

/// A config delegating to `upstream`.
fn config_for(upstream: &Upstream) -> ConfigDir {
    ConfigDir::new(&format!(
        r#"
proxy:
  enabled: true
  external_service:
    enabled: true
    endpoints: ["{}"]
    auth_credentials: {{ token: "upstream-token" }}
"#,
        upstream.url()
    ))
}

fn binance() -> ProxyRequest {
    ProxyRequest {
        exchange_id: "binance".into(),
        connection_type: ConnectionType::Http.into(),
        ..Default::default()
    }
}

fn with_traceparent(message: ProxyRequest) -> tonic::Request<ProxyRequest> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01").parse().unwrap(),
    );
    request
}

/// `(trace id, parent id, flags)` of a `traceparent` header value.
fn parse_traceparent(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {value:?}");
    assert_eq!(parts[0], "00", "traceparent version in {value:?}");
    (parts[1].to_owned(), parts[2].to_owned(), parts[3].to_owned())
}

#[tokio::test]
async fn request_proxy_span_is_exported_with_the_callers_trace_and_its_context_reaches_the_upstream() {
    let (collector, endpoint) = Collector::start().await;
    let upstream = Upstream::start().await;
    let config = config_for(&upstream);
    let mut process = BrokerProcess::spawn(
        Some(&config.path),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", "proxy-broker-under-test"),
        ],
    );
    let mut client = ProxyBrokerClient::new(process.wait_serving().await);

    // Upstream answer, inside the caller's trace.
    let answer = client
        .request_proxy(with_traceparent(binance()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.source(), ProxySource::Upstream);
    assert_eq!(answer.proxy_url, proxy_for("binance"));
    // Cache hit, no trace context: a new root trace.
    let cached = client.request_proxy(binance()).await.unwrap().into_inner();
    assert_eq!(cached.source(), ProxySource::Cache);

    let spans = eventually("both RequestProxy spans exported over OTLP", PROMPT, || async {
        let spans = collector.rpc_spans();
        (spans.len() >= 2).then_some(spans)
    })
    .await;
    let (traced, rooted): (Vec<_>, Vec<_>) = spans.iter().partition(|r| hex(&r.span.trace_id) == TRACE_ID);
    assert_eq!(traced.len(), 1, "one span in the caller's trace: {spans:#?}");
    let rpc = traced[0];
    assert_eq!(
        hex(&rpc.span.parent_span_id),
        PARENT_SPAN_ID,
        "the caller's span is the parent"
    );
    assert_eq!(rpc.span.kind(), SpanKind::Server);
    assert_eq!(rpc.service_name.as_deref(), Some("proxy-broker-under-test"));
    let attributes = rpc.attributes();
    for (key, want) in [
        ("exchange", "binance"),
        ("connection_type", "http"),
        ("source", "upstream"),
        ("upstream_endpoint", upstream.url().as_str()),
        ("outcome", "ok"),
    ] {
        let got = attributes
            .get(key)
            .unwrap_or_else(|| panic!("no attribute {key}: {attributes:?}"));
        assert_eq!(string(got), want, "attribute {key}");
    }
    assert_eq!(attributes.get("cache_hit"), Some(&AnyValue::BoolValue(false)));

    // The upstream request carried the same trace, with the RPC span as its parent.
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1, "the second call was a cache hit");
    let header = seen[0]
        .header("traceparent")
        .expect("the upstream request carries traceparent");
    let (trace_id, parent, flags) = parse_traceparent(&header);
    assert_eq!(trace_id, TRACE_ID);
    assert_eq!(
        parent,
        hex(&rpc.span.span_id),
        "the upstream call's parent is the RPC span"
    );
    assert_eq!(flags, "01", "sampled");

    // The cache hit started its own trace and says so.
    assert_eq!(rooted.len(), 1, "{spans:#?}");
    let root = rooted[0];
    assert!(
        root.span.parent_span_id.is_empty(),
        "no caller context: a root span"
    );
    let attributes = root.attributes();
    assert_eq!(string(&attributes["source"]), "cache");
    assert_eq!(attributes.get("cache_hit"), Some(&AnyValue::BoolValue(true)));

    let (status, log) = process.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{log}");
}

#[tokio::test]
async fn spans_still_batched_at_sigterm_are_flushed_before_the_process_exits() {
    let (collector, endpoint) = Collector::start().await;
    let upstream = Upstream::start().await;
    let config = config_for(&upstream);
    let mut process = BrokerProcess::spawn(
        Some(&config.path),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            // Nothing is exported on schedule during this test: only the shutdown flush can.
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ],
    );
    let mut client = ProxyBrokerClient::new(process.wait_serving().await);
    client.request_proxy(with_traceparent(binance())).await.unwrap();
    drop(client);
    assert!(collector.rpc_spans().is_empty(), "exported before SIGTERM");

    let (status, log) = process.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    let spans = collector.rpc_spans();
    assert_eq!(spans.len(), 1, "the batched span was flushed on shutdown:\n{log}");
    assert_eq!(hex(&spans[0].span.trace_id), TRACE_ID);
    assert_eq!(
        spans[0].service_name.as_deref(),
        Some("proxy-broker"),
        "the default service name"
    );
}
