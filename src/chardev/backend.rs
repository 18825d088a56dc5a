//! Opening chardev endpoints from a validated `ChardevBackend` value.
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::pin::Pin;

use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

pub use crate::sockets::{listen, Listener};
use tokio::sync::{oneshot, Mutex};

use crate::util::os_msg;

/// One client connection handed to the frontend. Dropping it tells the
/// chardev that the client is gone, so it accepts the next one.
pub struct Conn {
    pub read: Pin<Box<dyn AsyncRead + Send>>,
    pub write: Pin<Box<dyn AsyncWrite + Send>>,
    pub done: oneshot::Sender<()>,
    /// The peer of a TCP client, shown by query-chardev.
    pub peer: Option<String>,
    /// The socket (owned by `read` and `write`), to see a hang-up while
    /// not reading.
    pub fd: Option<std::os::fd::RawFd>,
}

/// The client of `fd` closed its socket or the connection broke (a
/// client that only shut down its sending side still wants its replies).
/// `fd` must be a Conn's, polled while its `read` or `write` is alive.
pub fn hung_up(fd: Option<std::os::fd::RawFd>) -> bool {
    let Some(fd) = fd else {
        return false;
    };
    let mut p = nix::libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: polls one pollfd without waiting; the caller keeps `fd` open.
    let n = unsafe { nix::libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (nix::libc::POLLHUP | nix::libc::POLLERR) != 0
}

/// An opened endpoint.
pub enum Backend {
    /// A listening socket; `path` is unlinked when the chardev goes away.
    Server {
        listener: Listener,
        path: Option<PathBuf>,
        addr_text: String,
        /// A client accepted during creation (wait=on), served first.
        first: Mutex<Option<Conn>>,
    },
    /// A client socket connected at creation; served once.
    Client {
        conn: Mutex<Option<Conn>>,
        addr_text: String,
    },
    Stdio(Mutex<Option<Conn>>),
    Null,
    File(std::fs::File),
    /// A ringbuf chardev; the name is its kind ("ringbuf" or "memory").
    Ringbuf(super::ringbuf::Ringbuf, &'static str),
}

impl Backend {
    /// The `filename` of query-chardev; `connected` is Some(peer) while a
    /// client is connected (the peer text is empty for UNIX sockets).
    pub fn filename(&self, connected: Option<&str>) -> String {
        match self {
            Backend::Server { addr_text, .. } => match connected {
                None => format!("disconnected:{addr_text},server=on"),
                Some("") => format!("{addr_text},server=on"),
                Some(peer) => format!("{addr_text},server=on <-> {peer}"),
            },
            Backend::Client { addr_text, .. } => addr_text.clone(),
            Backend::Stdio(_) => "stdio".into(),
            Backend::Null => "null".into(),
            Backend::File(_) => "file".into(),
            Backend::Ringbuf(_, kind) => (*kind).into(),
        }
    }

    /// Unlinks a server socket's path (at removal and exit).
    pub fn cleanup(&self) {
        if let Backend::Server {
            path: Some(path), ..
        } = self
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn conn_from_unix(s: UnixStream) -> Conn {
    let fd = Some(s.as_raw_fd());
    let (r, w) = s.into_split();
    Conn {
        read: Box::pin(r),
        write: Box::pin(w),
        done: oneshot::channel().0,
        peer: None,
        fd,
    }
}

impl Listener {
    pub async fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Unix(l) => Ok(conn_from_unix(l.accept().await?.0)),
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                let fd = Some(s.as_raw_fd());
                let (r, w) = s.into_split();
                Ok(Conn {
                    read: Box::pin(r),
                    write: Box::pin(w),
                    done: oneshot::channel().0,
                    peer: Some(format!("{}:{}", peer.ip(), peer.port())),
                    fd,
                })
            }
        }
    }
}

fn get_bool(m: &Map<String, Value>, k: &str) -> Option<bool> {
    m.get(k).and_then(Value::as_bool)
}

fn get_str<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

/// Called while a `wait=on` server blocks start-up for its first client.
pub type WaitNotice<'a> = &'a (dyn Fn(&str) + Sync);

/// Opens the endpoint for a validated `ChardevBackend` (`{type, data}`).
/// Errors carry QEMU's message text.
pub async fn open(backend: &Map<String, Value>, notice: WaitNotice<'_>) -> Result<Backend, String> {
    let kind = get_str(backend, "type").unwrap_or_default();
    let empty = Map::new();
    let data = backend
        .get("data")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    match kind {
        "socket" => open_socket(data, notice).await,
        "null" => Ok(Backend::Null),
        "stdio" => {
            let conn = Conn {
                read: Box::pin(tokio::io::stdin()),
                write: Box::pin(tokio::io::stdout()),
                done: oneshot::channel().0,
                peer: None,
                fd: None,
            };
            Ok(Backend::Stdio(Mutex::new(Some(conn))))
        }
        "file" => {
            let out = get_str(data, "out").unwrap_or_default();
            let append = get_bool(data, "append").unwrap_or(false);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .append(append)
                .truncate(!append)
                .open(out)
                .map_err(|e| format!("Could not open '{out}': {}", os_msg(&e)))?;
            // As QEMU: the input file, opened after the output, must
            // exist (rsd's file chardevs only ever write).
            if let Some(input) = get_str(data, "in") {
                std::fs::File::open(input)
                    .map_err(|e| format!("Could not open '{input}': {}", os_msg(&e)))?;
            }
            Ok(Backend::File(file))
        }
        "ringbuf" | "memory" => {
            // A negative size is a huge one, as in QEMU (and not a power
            // of two).
            let size = data
                .get("size")
                .and_then(|v| v.as_u64().or_else(|| v.as_i64().map(|i| i as u64)))
                .unwrap_or(super::ringbuf::DEFAULT_SIZE);
            let kind = if kind == "memory" {
                "memory"
            } else {
                "ringbuf"
            };
            Ok(Backend::Ringbuf(super::ringbuf::Ringbuf::new(size)?, kind))
        }
        other => Err(format!("'{other}' is not a valid char driver name")),
    }
}

async fn open_socket(data: &Map<String, Value>, notice: WaitNotice<'_>) -> Result<Backend, String> {
    let server = get_bool(data, "server").unwrap_or(false);
    // QMP's default is wait=off; the command line turns it on for servers.
    let wait = get_bool(data, "wait").unwrap_or(false);
    let empty = Map::new();
    let addr = data
        .get("addr")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let atype = get_str(addr, "type").unwrap_or_default();
    let a = addr
        .get("data")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    if !server {
        return match atype {
            "unix" => {
                let path = get_str(a, "path").unwrap_or_default();
                let s = UnixStream::connect(path)
                    .await
                    .map_err(|e| format!("Failed to connect to '{path}': {}", os_msg(&e)))?;
                Ok(Backend::Client {
                    conn: Mutex::new(Some(conn_from_unix(s))),
                    addr_text: format!("unix:{path}"),
                })
            }
            "fd" => Err(format!(
                "Unable to parse FD number {}",
                get_str(a, "str").unwrap_or_default()
            )),
            _ => Err("rsd: only unix client sockets are supported".into()),
        };
    }
    let (listener, path, addr_text) = listen(atype, a).await?;
    let first = if wait {
        let text = format!("disconnected:{addr_text},server=on");
        notice(&format!("info: QEMU waiting for connection on: {text}"));
        let c = listener
            .accept()
            .await
            .map_err(|e| format!("Failed to accept: {}", os_msg(&e)))?;
        Some(c)
    } else {
        None
    };
    Ok(Backend::Server {
        listener,
        path,
        addr_text,
        first: Mutex::new(first),
    })
}
