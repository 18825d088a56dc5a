//! An NBD client connection in traces and in the operator's log. While
//! traces are on each connection has a span from accept to close, with
//! the handshake as a child span and, at the end, the bytes the client
//! read and wrote (counted per connection only then: with traces off a
//! request pays nothing here).
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tracing::Span;

use crate::exports::stats::Op;

/// A connection's span and byte counts (traces on only).
pub struct ConnTrace {
    pub span: Span,
    read: AtomicU64,
    written: AtomicU64,
    requests: AtomicU64,
}

/// The span of a client just accepted; disabled while traces are off.
pub fn connection_span(peer: &str) -> Span {
    if !observability::traces::enabled() {
        return Span::none();
    }
    tracing::info_span!(
        "nbd connection",
        otel.kind = "server",
        network.peer.address = %peer,
        nbd.export = tracing::field::Empty,
        nbd.structured_replies = tracing::field::Empty,
        nbd.extended_headers = tracing::field::Empty,
        nbd.requests = tracing::field::Empty,
        nbd.bytes_read = tracing::field::Empty,
        nbd.bytes_written = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    )
}

/// The handshake's span, a child of the connection's.
pub fn handshake_span(conn: &Span) -> Span {
    if conn.is_none() {
        return Span::none();
    }
    tracing::info_span!(
        parent: conn,
        "nbd handshake",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    )
}

/// Marks a span failed with QSD's description of why.
pub fn failed(span: &Span, why: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", why);
}

impl ConnTrace {
    /// The handshake chose `export`: the connection's span says so.
    pub fn new(span: Span, export: &str, structured: bool, extended: bool) -> ConnTrace {
        span.record("nbd.export", export);
        span.record("nbd.structured_replies", structured);
        span.record("nbd.extended_headers", extended);
        ConnTrace {
            span,
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    /// One request done, moving `bytes` of payload.
    pub fn count(&self, op: Op, bytes: u64) {
        self.requests.fetch_add(1, Relaxed);
        match op {
            Op::Read => self.read.fetch_add(bytes, Relaxed),
            Op::Write => self.written.fetch_add(bytes, Relaxed),
            _ => 0,
        };
    }

    /// The client has gone: the totals go on the span, which ends when
    /// the last handle of it drops.
    pub fn finish(&self) {
        self.span
            .record("nbd.requests", self.requests.load(Relaxed));
        self.span.record("nbd.bytes_read", self.read.load(Relaxed));
        self.span
            .record("nbd.bytes_written", self.written.load(Relaxed));
    }
}
