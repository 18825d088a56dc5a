//! Tracing set-up for rsd: the operator's log and OpenTelemetry traces.
//!
//! The log: `-T/--trace` patterns (QEMU's trace-event globs, e.g.
//! `qmp_*` or `export_*`) enable output for events whose target's last
//! path segment or span/event name matches a pattern. Without patterns
//! only warnings and errors are printed, to stderr, so the happy path is
//! as quiet as QSD's. RSD_LOG (an EnvFilter directive such as `info`)
//! overrides the patterns. Lines are plain text, or JSON objects one per
//! line with RSD_LOG_FORMAT=json.
//!
//! `traces` exports spans over OTLP when the OTEL_* variables ask for it
//! (`otlp_http` is the HTTP client it posts with). `metrics` holds the
//! Prometheus primitives (the data path's latency histogram,
//! metric-family builders, the text encoding) and `http` the responder
//! of the metrics listener (/metrics, /healthz, /readyz).
pub mod http;
pub mod metrics;
mod otlp_http;
pub mod traces;

use std::sync::Arc;

use tracing::subscriber::Interest;
use tracing::Metadata;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::prelude::*;

/// The trace-point groups rsd emits; `-T help` lists them.
pub const TRACE_POINTS: &[&str] = &[
    "chardev_accept",
    "daemon_start",
    "daemon_stop",
    "export_add",
    "export_del",
    "job_status_change",
    "monitor_session_close",
    "monitor_session_open",
    "nbd_accept",
    "nbd_client_connect",
    "nbd_client_disconnect",
    "nbd_handshake",
    "qmp_command",
    "qmp_event",
    "supervisor_child_escalate",
    "supervisor_child_removed",
    "supervisor_child_restart",
    "vhost_user_connect",
    "vhost_user_disconnect",
];

/// One `-T/--trace` option, parsed: `[enable=]PATTERN[,events=FILE][,file=FILE]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceOpt {
    pub patterns: Vec<String>,
    pub file: Option<String>,
}

/// Matches QEMU's simple trace globs: `*` any run, `?` one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn rec(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| rec(rest, &t[i..])),
            Some((b'?', rest)) => !t.is_empty() && rec(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && rec(rest, &t[1..]),
        }
    }
    rec(pattern.as_bytes(), text.as_bytes())
}

fn point_name(meta: &Metadata<'_>) -> String {
    meta.target().replace("::", "_")
}

/// The trace file, shared by every event (`&File` writes are atomic
/// appends of each formatted event).
struct SharedFile(Arc<std::fs::File>);
impl std::io::Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the log prints without RSD_LOG: warnings and errors, and what
/// the -T patterns name. The patterns are fixed at start-up, so the
/// answer is decided once per call site and a disabled event or span
/// costs nothing after its first use.
struct PointFilter {
    patterns: Vec<String>,
}

impl PointFilter {
    fn accepts(&self, meta: &Metadata<'_>) -> bool {
        if *meta.level() <= tracing::Level::WARN {
            return true;
        }
        if self.patterns.is_empty() {
            return false;
        }
        let name = point_name(meta);
        self.patterns
            .iter()
            .any(|p| glob_match(p, &name) || glob_match(p, meta.name()))
    }
}

impl<S> Filter<S> for PointFilter {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        self.accepts(meta)
    }
    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.accepts(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }
}

/// What goes into traces: rsd's own spans at INFO and above, and the
/// events inside them (which become span events).
struct TraceFilter;

impl TraceFilter {
    fn accepts(meta: &Metadata<'_>) -> bool {
        *meta.level() <= tracing::Level::INFO
            && (meta.is_event() || meta.target().starts_with("rsd"))
    }
}

impl<S> Filter<S> for TraceFilter {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        Self::accepts(meta)
    }
    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::accepts(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }
}

type Writer = Box<dyn Fn() -> Box<dyn std::io::Write> + Send + Sync>;

/// The log's line format: RSD_LOG_FORMAT=json for JSON lines, else text.
fn json_lines() -> bool {
    match std::env::var("RSD_LOG_FORMAT") {
        Err(_) => false,
        Ok(v) if v.eq_ignore_ascii_case("json") => true,
        Ok(v) if v.is_empty() || v.eq_ignore_ascii_case("text") => false,
        Ok(v) => {
            eprintln!("rsd: RSD_LOG_FORMAT='{v}' is neither 'text' nor 'json'; using text");
            false
        }
    }
}

/// Installs the global subscriber: the log, and the trace exporter when
/// the OTEL_* variables ask for one. Call once, after any fork (the
/// exporter is a thread); later calls are ignored. Call
/// `traces::shutdown` before exiting so buffered spans are sent.
pub fn init(opts: &[TraceOpt]) {
    let patterns: Vec<String> = opts.iter().flat_map(|o| o.patterns.clone()).collect();
    let file = opts.iter().rev().find_map(|o| o.file.clone());
    // The trace file is opened once; events append to it (QEMU keeps
    // it open too). One that cannot be opened sends them to stderr.
    let file = file.and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| eprintln!("rsd: -T file={path}: {e}; tracing to stderr"))
            .ok()
    });
    let writer: Writer = match file {
        Some(f) => {
            let f = Arc::new(f);
            Box::new(move || Box::new(SharedFile(f.clone())) as Box<dyn std::io::Write>)
        }
        None => Box::new(|| Box::new(std::io::stderr()) as Box<dyn std::io::Write>),
    };
    let env = std::env::var("RSD_LOG").ok();
    let filter = || -> Box<dyn Filter<tracing_subscriber::Registry> + Send + Sync> {
        match &env {
            Some(directive) => Box::new(EnvFilter::new(directive)),
            None => Box::new(PointFilter {
                patterns: patterns.clone(),
            }),
        }
    };
    let log = if json_lines() {
        // One flat object per event: the actors' own spans (ractor's)
        // would add nested, repetitive context to every line.
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(filter())
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(writer)
            .with_filter(filter())
            .boxed()
    };
    let traces = traces::start().map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_level(false)
            .with_tracked_inactivity(false)
            .with_filter(TraceFilter)
    });
    let _ = tracing_subscriber::registry()
        .with(log)
        .with(traces)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("rsd_*", "rsd_monitor"));
        assert!(glob_match("*monitor", "rsd_monitor"));
        assert!(glob_match("rsd_m?nitor", "rsd_monitor"));
        assert!(!glob_match("nbd_*", "rsd_monitor"));
        assert!(glob_match("*", ""));
    }
}
