//! Span export over OTLP/HTTP (JSON encoding) when `log.otlp_endpoint` is set, nothing when it
//! is not: the `tracing` spans of a request (request, cache read, coalesce wait, provider
//! attempt, cache write, replication) become OpenTelemetry spans under the trace the request
//! arrived with (`traceparent`), and the edge's spans from its usage records go out under
//! service `gateway-edge` (`edge_span`). Owns the exporters' lifetime; decides nothing about
//! requests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gateway_common::traceparent::TraceContext;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;

/// Why the exporter could not be set up (a start-up error).
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct TelemetryError(String);

/// Set while an exporter is installed: without one, the hit path builds no span beyond the
/// request's own (which carries the trace id into the log lines), because a span costs the
/// log layer a formatting pass and the registry a slot even when nobody exports it.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (`log.otlp_endpoint` is set). Spans that only an exporter
/// reads are created when this is true.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The service name the edge's spans are exported under.
pub const EDGE_SERVICE: &str = "gateway-edge";

/// The running exporters (the origin's spans, the edge's). Flushes what is buffered when
/// dropped.
pub struct Telemetry {
    provider: SdkTracerProvider,
    edge: SdkTracerProvider,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Telemetry")
    }
}

impl Telemetry {
    /// An exporter posting JSON to `<endpoint>/v1/traces` (OTLP/HTTP), batched in the
    /// background, and the `tracing` layer that feeds it. Also installs the edge spans'
    /// exporter (`edge_span::install`), removed again when this is dropped.
    pub fn otlp<S>(
        endpoint: &str,
        service_name: &str,
    ) -> Result<(Telemetry, impl tracing_subscriber::Layer<S>), TelemetryError>
    where
        S: Subscriber + for<'span> LookupSpan<'span>,
    {
        let provider = batched(endpoint, service_name)?;
        let edge = batched(endpoint, EDGE_SERVICE)?;
        crate::edge_span::install(Some(edge.tracer("gateway-edge")));
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("gateway-origin"));
        EXPORTING.store(true, Ordering::Relaxed);
        Ok((Telemetry { provider, edge }, layer))
    }

    /// Exports every finished span now (tests; shutdown).
    pub fn flush(&self) {
        for provider in [&self.provider, &self.edge] {
            if let Err(error) = provider.force_flush() {
                tracing::warn!(%error, "span export failed");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        EXPORTING.store(false, Ordering::Relaxed);
        crate::edge_span::install(None);
        let _ = self.provider.shutdown();
        let _ = self.edge.shutdown();
    }
}

/// A provider exporting to `<endpoint>/v1/traces` in batches, under `service_name`.
fn batched(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(url)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TelemetryError(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build())
}

/// Makes `span` a child of the remote span named by `trace` (the edge's, or a client's), so
/// the exported spans join that trace. Without an exporter this only records the context.
pub fn adopt(span: &tracing::Span, trace: &TraceContext) {
    let remote = SpanContext::new(
        TraceId::from_bytes(trace.trace_id),
        SpanId::from_bytes(trace.parent_id),
        TraceFlags::new(trace.flags),
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The exported span id of `span`, when spans are exported (the provider's `traceparent`
/// names the attempt span as its parent); `None` otherwise.
pub fn span_id(span: &tracing::Span) -> Option<[u8; 8]> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.span_id().to_bytes())
}
