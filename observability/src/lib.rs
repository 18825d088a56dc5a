//! Tracing set-up for rsd. `-T/--trace` patterns (QEMU's trace-event globs,
//! e.g. `qmp_*` or `monitor_*`) enable TRACE-level output for events whose
//! target's last path segment or span/event name matches a pattern. Without
//! patterns only warnings and errors are printed, to stderr. RSD_LOG (an
//! EnvFilter directive) overrides everything, for developers.
//!
//! `metrics` holds the Prometheus primitives (the data path's latency
//! histogram, metric-family builders, the text encoding) and `http` the
//! responder of the metrics listener (/metrics, /healthz, /readyz).
//! OpenTelemetry traces will live beside them (their own module).
pub mod http;
pub mod metrics;

use std::sync::{Arc, Mutex};

use tracing::Metadata;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::prelude::*;

/// The trace-point groups rsd emits; `-T help` lists them.
pub const TRACE_POINTS: &[&str] = &[
    "chardev_accept",
    "nbd_accept",
    "nbd_handshake",
    "monitor_session_close",
    "monitor_session_open",
    "qmp_command",
    "qmp_event",
    "supervisor_child_removed",
    "supervisor_child_restart",
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

/// Installs the global subscriber. Safe to call once; later calls are ignored.
pub fn init(opts: &[TraceOpt]) {
    let patterns: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(
        opts.iter().flat_map(|o| o.patterns.clone()).collect(),
    ));
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
    let writer: Box<dyn Fn() -> Box<dyn std::io::Write> + Send + Sync> = match file {
        Some(f) => {
            let f = Arc::new(f);
            Box::new(move || Box::new(SharedFile(f.clone())) as Box<dyn std::io::Write>)
        }
        None => Box::new(|| Box::new(std::io::stderr()) as Box<dyn std::io::Write>),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(writer);
    if let Ok(env) = std::env::var("RSD_LOG") {
        let _ = tracing_subscriber::registry()
            .with(fmt.with_filter(EnvFilter::new(env)))
            .try_init();
        return;
    }
    let pats = patterns.clone();
    let filter = filter_fn(move |meta| {
        if *meta.level() <= tracing::Level::WARN {
            return true;
        }
        let name = point_name(meta);
        let pats = pats.lock().map(|p| p.clone()).unwrap_or_default();
        pats.iter()
            .any(|p| glob_match(p, &name) || glob_match(p, meta.name()))
    });
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
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
