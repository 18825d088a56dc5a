//! OpenTelemetry traces: the daemon's `tracing` spans go out as OTLP
//! (HTTP/protobuf) when the standard `OTEL_*` variables ask for it, and
//! nothing of this exists otherwise: no exporter, no layer, no thread,
//! and the data path's only check is one relaxed load (`slow_ns`).
//!
//! Traces are on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, or `OTEL_TRACES_EXPORTER` names
//! `otlp`; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keep
//! them off. The SDK reads the rest of the standard set itself
//! (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`
//! and its argument, `OTEL_EXPORTER_OTLP_*_HEADERS`, `OTEL_BSP_*`).
//! `RSD_SLOW_REQUEST_MS` (default 100) is the time above which a node
//! request becomes a span of its own.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The tracer while traces are on.
static TRACER: OnceLock<(SdkTracerProvider, SdkTracer)> = OnceLock::new();

/// Node requests that take longer than this (nanoseconds) become spans;
/// `u64::MAX` while traces are off, so the check never passes.
static SLOW_NS: AtomicU64 = AtomicU64::new(u64::MAX);

const DEFAULT_SLOW_MS: u64 = 100;

/// Traces are on (an exporter runs).
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// The slow-request threshold in nanoseconds (`u64::MAX`: off).
#[inline]
pub fn slow_ns() -> u64 {
    SLOW_NS.load(Ordering::Relaxed)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether the environment asks for traces.
pub fn wanted() -> bool {
    wanted_by(env)
}

fn wanted_by(env: impl Fn(&str) -> Option<String>) -> bool {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return false;
    }
    if let Some(e) = env("OTEL_TRACES_EXPORTER") {
        if e.split(',').any(|x| x.trim() == "none") {
            return false;
        }
        if e.split(',').any(|x| x.trim() == "otlp") {
            return true;
        }
    }
    env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
}

fn timeout() -> Duration {
    env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis)
}

/// Starts the exporter and returns the tracer for the `tracing` layer,
/// or None when traces are off or cannot start (said on stderr). Must
/// run after any fork: the SDK's batch exporter is a thread.
pub(crate) fn start() -> Option<SdkTracer> {
    if !wanted() {
        return None;
    }
    let protocol =
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    if let Some(p) = protocol.filter(|p| p.trim() != "http/protobuf") {
        eprintln!("rsd: OTLP protocol '{p}' is not supported; traces are sent as http/protobuf");
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(crate::otlp_http::Client::new(timeout()))
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("rsd: traces are off: {e}");
            return None;
        }
    };
    // The SDK's default service name is "unknown_service".
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name("rsd");
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("rsd");
    let slow_ms = match env("RSD_SLOW_REQUEST_MS") {
        None => DEFAULT_SLOW_MS,
        Some(v) => v.trim().parse::<u64>().unwrap_or_else(|_| {
            eprintln!(
                "rsd: RSD_SLOW_REQUEST_MS='{v}' is not a number of milliseconds; using {DEFAULT_SLOW_MS}"
            );
            DEFAULT_SLOW_MS
        }),
    };
    if TRACER.set((provider, tracer.clone())).is_err() {
        return None;
    }
    SLOW_NS.store(slow_ms.saturating_mul(1_000_000), Ordering::Relaxed);
    Some(tracer)
}

/// Sends what is buffered and stops the exporter (at exit).
pub fn shutdown() {
    if let Some((provider, _)) = TRACER.get() {
        SLOW_NS.store(u64::MAX, Ordering::Relaxed);
        let _ = provider.shutdown();
    }
}

/// Makes `span` a child of a W3C `traceparent`
/// (`00-<trace id>-<parent id>-<flags>`) a client sent. A malformed
/// value is ignored, as the W3C rules say: the span starts a trace.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) -> bool {
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    let cx = TraceContextPropagator::new().extract(&carrier);
    if !cx.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

/// A node request that took `ns` nanoseconds (past the threshold), as a
/// span of its own under the current span (the NBD connection or job
/// whose request it was), with its real start and end times.
pub fn slow_request(node: &str, op: &'static str, offset: u64, len: u64, ns: u64, ok: bool) {
    let Some((_, tracer)) = TRACER.get() else {
        return;
    };
    let end = SystemTime::now();
    let start = end.checked_sub(Duration::from_nanos(ns)).unwrap_or(end);
    let parent = tracing::Span::current().context();
    let mut span = tracer
        .span_builder(format!("slow {op}"))
        .with_start_time(start)
        .with_attributes(vec![
            KeyValue::new("rsd.node", node.to_string()),
            KeyValue::new("rsd.operation", op),
            KeyValue::new("rsd.offset", offset as i64),
            KeyValue::new("rsd.length", len as i64),
            KeyValue::new("rsd.duration_ms", ns as f64 / 1e6),
        ])
        .start_with_context(tracer, &parent);
    if !ok {
        span.set_status(opentelemetry::trace::Status::error("request failed"));
    }
    span.end_with_timestamp(end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_variables_turn_traces_on() {
        let with = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            wanted_by(|name| {
                vars.iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .filter(|v| !v.trim().is_empty())
            })
        };
        assert!(!with(&[]));
        assert!(!with(&[("OTEL_SERVICE_NAME", "x")]));
        assert!(with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:4318")]));
        assert!(with(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://h:4318/v1/traces"
        )]));
        assert!(with(&[("OTEL_TRACES_EXPORTER", "otlp")]));
        assert!(!with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]));
        assert!(!with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:4318"),
            ("OTEL_TRACES_EXPORTER", "none")
        ]));
        assert!(!with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:4318"),
            ("OTEL_SDK_DISABLED", "TRUE")
        ]));
        // Off until started: the data path's check never passes.
        assert!(!enabled());
        assert_eq!(slow_ns(), u64::MAX);
    }
}
