//! The edge's own span, exported by the origin: the edge has no OTLP client, so its span of a
//! request arrives in the usage record (ids, start, duration, what answered) and is exported
//! here as an `edge` span (kind server, the edge's ids and timing) under service
//! `gateway-edge`. Nothing is exported unless [`install`] was called (an endpoint is set).

use std::sync::{PoisonError, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use gateway_common::usage::UsageRecord;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;

/// The tracer edge spans go through; `None` when spans are not exported. A process-wide seam
/// because the exporter is set up in `main`, before and apart from the application.
static TRACER: RwLock<Option<SdkTracer>> = RwLock::new(None);

/// Export edge spans through `tracer` from now on (`None`: stop).
pub fn install(tracer: Option<SdkTracer>) {
    *TRACER.write().unwrap_or_else(PoisonError::into_inner) = tracer;
}

/// Exports the edge span `record` carries, if it carries one, spans are exported and the
/// trace is sampled; otherwise does nothing. Never fails: a span is not worth a record.
pub fn export(record: &UsageRecord) {
    let Some(span) = &record.span else {
        return;
    };
    let Some(ids) = span.ids() else {
        return;
    };
    let (trace_id, span_id, parent) = (ids.trace, ids.span, ids.parent);
    if !span.sampled {
        return;
    }
    let guard = TRACER.read().unwrap_or_else(PoisonError::into_inner);
    let Some(tracer) = guard.as_ref() else {
        return;
    };
    let start = UNIX_EPOCH + Duration::from_nanos(span.start_unix_ns);
    // `total_ms` is checked finite and within a day by `parse_line`.
    let end = start + Duration::from_secs_f64(record.total_ms / 1000.0);
    let mut attributes = vec![
        KeyValue::new("tenant", record.tenant.clone()),
        KeyValue::new("route", record.route.clone()),
        KeyValue::new("cache", record.outcome.as_str()),
        KeyValue::new("layer", record.layer.as_str()),
        KeyValue::new("http.response.status_code", i64::from(record.status)),
    ];
    if !record.pop.is_empty() {
        attributes.push(KeyValue::new("pop", record.pop.clone()));
    }
    if !record.region.is_empty() {
        attributes.push(KeyValue::new("region", record.region.clone()));
    }
    let builder = tracer
        .span_builder("edge")
        .with_kind(SpanKind::Server)
        .with_trace_id(TraceId::from_bytes(trace_id))
        .with_span_id(SpanId::from_bytes(span_id))
        .with_start_time(start)
        .with_attributes(attributes);
    let builder = if record.status >= 500 {
        builder.with_status(Status::error(format!("status {}", record.status)))
    } else {
        builder
    };
    // The client's span is the parent when it sent one; otherwise the edge span is the root
    // and the SDK takes the trace id from the builder.
    let parent = match parent {
        Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(trace_id),
            SpanId::from_bytes(parent),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        )),
        None => Context::new(),
    };
    let mut exported = tracer.build_with_context(builder, &parent);
    exported.end_with_timestamp(end);
}
