//! A minimal HTTP/1.1 responder for the metrics listener: GET (or HEAD)
//! of `/metrics`, `/healthz` and `/readyz`, 404 for other paths, one
//! request per connection. The request head is bounded in size and in
//! time, so a slow or hostile client costs one task and nothing else;
//! the caller runs each connection on a task of its own.
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8 << 10;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A health check's outcome: 200 when `ok`, else 503; `detail` is the
/// body (one line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub ok: bool,
    pub detail: String,
}

/// What the listener serves.
pub trait Endpoints: Send + Sync + 'static {
    /// The metrics in the Prometheus text format.
    fn metrics(&self) -> BoxFuture<'_, Result<String, String>>;
    /// Liveness: the process and its control plane answer.
    fn healthz(&self) -> BoxFuture<'_, Health>;
    /// Readiness: start-up is complete and everything is serving.
    fn readyz(&self) -> BoxFuture<'_, Health>;
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestLine<'a> {
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
}

/// Parses `METHOD SP TARGET SP HTTP/1.x` (the head's first line).
pub fn parse_request_line(head: &[u8]) -> Option<RequestLine<'_>> {
    let end = head.iter().position(|b| *b == b'\n')?;
    let line = std::str::from_utf8(&head[..end]).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
        || !matches!(version, "HTTP/1.0" | "HTTP/1.1")
    {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Some(RequestLine { method, path })
}

/// Where the head ends (after the blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

/// Reads the request head; Err(status) when it is too large or the
/// client hung up or stalled before its end.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            if head_end(&buf).is_some() {
                return Ok(());
            }
            if buf.len() >= MAX_HEAD {
                return Err(431);
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err(0),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    match tokio::time::timeout(HEAD_TIMEOUT, read).await {
        Ok(Ok(())) => Ok(buf),
        Ok(Err(code)) => Err(code),
        Err(_) => Err(408),
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

struct Response {
    code: u16,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(code: u16, body: impl Into<String>) -> Response {
        Response {
            code,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

async fn respond(ep: &dyn Endpoints, head: &[u8]) -> (Response, bool) {
    let Some(req) = parse_request_line(head) else {
        return (Response::text(400, "bad request\n"), false);
    };
    let head_only = req.method == "HEAD";
    if req.method != "GET" && !head_only {
        return (Response::text(405, "only GET and HEAD\n"), false);
    }
    let r = match req.path {
        "/metrics" => match ep.metrics().await {
            Ok(body) => Response {
                code: 200,
                content_type: crate::metrics::TEXT_CONTENT_TYPE,
                body,
            },
            Err(e) => Response::text(500, format!("{e}\n")),
        },
        "/healthz" | "/readyz" => {
            let h = if req.path == "/healthz" {
                ep.healthz().await
            } else {
                ep.readyz().await
            };
            Response::text(if h.ok { 200 } else { 503 }, format!("{}\n", h.detail))
        }
        _ => Response::text(404, "not found\n"),
    };
    (r, head_only)
}

/// Serves one request on a connection, then closes it.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, ep: &dyn Endpoints) {
    let (r, head_only) = match read_head(&mut s).await {
        Ok(head) => respond(ep, &head).await,
        Err(0) => return,
        Err(code) => (Response::text(code, format!("{}\n", reason(code))), false),
    };
    let mut out =
        format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        r.code,
        reason(r.code),
        r.content_type,
        r.body.len(),
        if r.code == 405 { "Allow: GET, HEAD\r\n" } else { "" },
    )
        .into_bytes();
    if !head_only {
        out.extend_from_slice(r.body.as_bytes());
    }
    // A client that stops reading must not hold the task forever.
    let write = async {
        s.write_all(&out).await?;
        s.shutdown().await
    };
    let _ = tokio::time::timeout(HEAD_TIMEOUT, write).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        let r = parse_request_line(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            r,
            Some(RequestLine {
                method: "GET",
                path: "/metrics"
            })
        );
        assert!(parse_request_line(b"GET /metrics\r\n\r\n").is_none());
        assert!(parse_request_line(b"GET metrics HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_request_line(b"get / HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_request_line(b"GET / HTTP/2.0\r\n\r\n").is_none());
        assert!(parse_request_line(b"GET /  HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_request_line(&[0xff, b' ', b'/', b'\n']).is_none());
    }

    struct Fixed;
    impl Endpoints for Fixed {
        fn metrics(&self) -> BoxFuture<'_, Result<String, String>> {
            Box::pin(async { Ok("m 1\n".to_string()) })
        }
        fn healthz(&self) -> BoxFuture<'_, Health> {
            Box::pin(async {
                Health {
                    ok: true,
                    detail: "ok".into(),
                }
            })
        }
        fn readyz(&self) -> BoxFuture<'_, Health> {
            Box::pin(async {
                Health {
                    ok: false,
                    detail: "starting".into(),
                }
            })
        }
    }

    async fn exchange(req: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let task = tokio::spawn(async move { serve_connection(server, &Fixed).await });
        client.write_all(req).await.expect("write");
        let mut out = String::new();
        client.read_to_string(&mut out).await.expect("read");
        task.await.expect("task");
        out
    }

    #[tokio::test]
    async fn answers() {
        let r = exchange(b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Length: 4\r\n") && r.ends_with("\r\n\r\nm 1\n"));
        let r = exchange(b"GET /healthz HTTP/1.0\n\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("ok\n"),
            "{r}"
        );
        let r = exchange(b"GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 503 ") && r.ends_with("starting\n"),
            "{r}"
        );
        let r = exchange(b"GET /other HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
        let r = exchange(b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 405 ") && r.contains("Allow: GET, HEAD"));
        let r = exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            r.contains("Content-Length: 4\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        let r = exchange(b"nonsense\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    }

    #[tokio::test]
    async fn oversized_head_is_refused() {
        let mut req = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        let r = exchange(&req).await;
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    }
}
