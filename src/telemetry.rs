//! Logs and traces.
//!
//! - Logs: `tracing` to stderr, text by default or JSON with `PROXY_BROKER_LOG_FORMAT=json`, level
//!   from `RUST_LOG` (default `info`).
//! - Traces: when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set,
//!   spans are exported over OTLP/gRPC; the other standard `OTEL_*` variables (service name,
//!   headers, timeouts, sampler) are read by the OpenTelemetry SDK itself.
//! - Context: W3C `traceparent`/`tracestate` is taken from incoming gRPC metadata (the RPC span's
//!   parent) and injected into upstream HTTP requests.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Whether RPC spans are exported (set once by [`init`] when OTLP export starts).
static RPC_SPANS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether per-RPC spans have a listener that wants them (OTLP export). Logs alone do not: their
/// lines carry their own fields, and a span per cache hit would cost more than the hit.
pub fn rpc_spans_wanted() -> bool {
    RPC_SPANS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Turns per-RPC spans on or off (for embedding the broker with a subscriber of one's own).
pub fn set_rpc_spans(on: bool) {
    RPC_SPANS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Whether the standard OTLP variables ask for trace export.
pub fn otlp_requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
        && !std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Builds the OTLP tracer provider from the standard environment. Must run inside Tokio.
pub fn otlp_provider() -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "proxy-broker".into());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build())
}

/// Installs the global subscriber (logs, and traces when requested) and the W3C propagator.
/// Must run inside Tokio when OTLP export is requested.
pub fn init() -> Telemetry {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("PROXY_BROKER_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (provider, otel_error) = if otlp_requested() {
        match otlp_provider() {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    set_rpc_spans(provider.is_some());
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("proxy-broker")));
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .init();
    }
    if let Some(error) = otel_error {
        tracing::error!(%error, "OTLP trace export requested but could not start; continuing without it");
    }
    Telemetry { provider }
}

impl Telemetry {
    /// Flushes and stops trace export.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "trace exporter shutdown failed");
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Makes the W3C trace context in `metadata` (if any) the parent of `span`.
pub fn adopt_remote_parent(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    // Without an OpenTelemetry layer there is nothing to attach to; that is fine.
    let _ = span.set_parent(parent);
}

struct HeaderInjector<'a>(&'a mut reqwest::header::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(key.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Adds the current span's W3C trace context to outgoing HTTP headers.
pub fn inject_current(headers: &mut reqwest::header::HeaderMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(headers)));
}
