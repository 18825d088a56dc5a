//! The HTTP/1.1 client the OTLP exporter posts its batches with: one
//! connection per request (`Connection: close`), plain `http://` only,
//! bounded in time and in the size of the answer. The exporter calls it
//! from the SDK's batch thread, so blocking I/O here holds nobody up.
//! A small client of our own keeps a TLS stack and a second async
//! runtime out of the daemon.
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};

/// Answers beyond this are refused (a collector answers in bytes).
const MAX_RESPONSE: usize = 4 << 20;

#[derive(Debug)]
pub struct Client {
    /// Connect, write and read timeout, each.
    pub timeout: Duration,
    /// A failed export is said once on stderr, not once per batch.
    warned: AtomicBool,
}

impl Client {
    pub fn new(timeout: Duration) -> Client {
        Client {
            timeout,
            warned: AtomicBool::new(false),
        }
    }

    fn say_once(&self, uri: &str, e: &str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            eprintln!("rsd: cannot send traces to {uri}: {e}");
        }
    }
}

fn err(msg: impl Into<String>) -> HttpError {
    Box::new(std::io::Error::other(msg.into()))
}

/// `host:port` and the path of an `http://` URI.
fn target(uri: &opentelemetry_http::Request<Bytes>) -> Result<(String, u16, String), HttpError> {
    let u = uri.uri();
    if u.scheme_str() != Some("http") {
        return Err(err(format!(
            "only http:// endpoints are supported, not '{u}'"
        )));
    }
    let host = u.host().ok_or_else(|| err(format!("no host in '{u}'")))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = u.port_u16().unwrap_or(80);
    let path = u
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    Ok((host, port, path))
}

fn send(client: &Client, req: &Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
    let (host, port, path) = target(req)?;
    let addrs = (host.as_str(), port).to_socket_addrs()?;
    let mut last = None;
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, client.timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut s = match (stream, last) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(Box::new(e)),
        (None, None) => return Err(err(format!("'{host}' has no address"))),
    };
    s.set_read_timeout(Some(client.timeout))?;
    s.set_write_timeout(Some(client.timeout))?;
    let body = req.body();
    let mut head = format!(
        "{} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        req.method(),
        req.uri().authority().map(|a| a.as_str()).unwrap_or(&host),
        body.len()
    );
    for (k, v) in req.headers() {
        if let Ok(v) = v.to_str() {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut answer = Vec::new();
    s.take(MAX_RESPONSE as u64 + 1).read_to_end(&mut answer)?;
    if answer.len() > MAX_RESPONSE {
        return Err(err("the collector's answer is too large"));
    }
    parse_response(&answer)
}

/// Status, headers and body of a whole HTTP/1.1 answer (the server
/// closed the connection after it).
fn parse_response(raw: &[u8]) -> Result<Response<Bytes>, HttpError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| err("the collector's answer has no header end"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| err("answer head not text"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| err(format!("bad status line '{status_line}'")))?;
    let mut builder = Response::builder().status(status);
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k.eq_ignore_ascii_case("content-length") {
            length = v.parse::<usize>().ok();
        }
        builder = builder.header(k, v);
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest[..length.unwrap_or(rest.len()).min(rest.len())].to_vec()
    };
    builder
        .body(Bytes::from(body))
        .map_err(|e| err(e.to_string()))
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    loop {
        let nl = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| err("truncated chunk"))?;
        let size_text = std::str::from_utf8(&raw[..nl]).map_err(|_| err("bad chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| err("bad chunk size"))?;
        raw = &raw[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size {
            return Err(err("truncated chunk"));
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or_default();
    }
}

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let r = send(self, &request);
        match &r {
            Err(e) => self.say_once(&request.uri().to_string(), &e.to_string()),
            Ok(resp) if !resp.status().is_success() => self.say_once(
                &request.uri().to_string(),
                &format!("the collector answered {}", resp.status()),
            ),
            Ok(_) => {}
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(&r.body()[..], b"abc");
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(&r.body()[..], b"abcde");
        let r = parse_response(b"HTTP/1.0 503 Busy\r\n\r\n").unwrap();
        assert_eq!(r.status(), 503);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }
}
