//! QMP: JSON wire format, monitor sessions, request checking.
pub mod json;
pub mod monitor;
pub mod outbox;
pub mod request;

use serde_json::{Map, Value};

/// Runs a validated command and gives its result and the sequence number
/// of its reply (monitors depend on this handle, not on who runs it).
/// The span is the command's (disabled while traces are off): the work
/// runs inside it, so a job the command creates is its child.
pub type Dispatch = std::sync::Arc<
    dyn Fn(
            String,
            Map<String, Value>,
            tracing::Span,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = (Result<Value, crate::qapi::QmpError>, u64)>
                    + Send,
            >,
        > + Send
        + Sync,
>;

/// One server-to-client message: the JSON text with every newline as CRLF
/// and a final CRLF, as QEMU's monitor writes it.
pub fn frame(v: &Value, pretty: bool) -> String {
    let mut s = json::to_qmp_string(v, pretty);
    s.push('\n');
    s.replace('\n', "\r\n")
}

/// Parses one complete JSON text (a JSON command-line option value).
pub fn parse_whole(text: &str) -> Result<Value, String> {
    let mut s = json::JsonStreamer::new();
    let mut msgs = s.feed(text.as_bytes());
    msgs.extend(s.feed(b"\n"));
    match msgs.into_iter().next() {
        Some(r) => r,
        None => Err("JSON parse error, premature EOI".into()),
    }
}
