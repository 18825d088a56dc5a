//! QMP: JSON wire format, monitor sessions, request checking.
pub mod json;
pub mod monitor;
pub mod outbox;
pub mod request;

use serde_json::Value;

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
