//! The `nbd` block driver: a node whose data is another server's NBD
//! export (rsd's own, QSD's, qemu-nbd's), so a mirror or backup can
//! target another host.
//!
//! One connection, fixed newstyle, NBD_OPT_GO, simple replies; with
//! `tls-creds`, NBD_OPT_STARTTLS first and the rest over TLS. Requests
//! are pipelined: each writes its request under the writer's lock and
//! waits for its reply, which a reader task hands over by cookie. When
//! the connection breaks, the requests in flight fail with EIO and the
//! next request connects again; with `reconnect-delay`, requests wait up
//! to that long for the server to come back (QEMU's option), and those
//! that were in flight are sent again on the new connection, as QEMU
//! does (every NBD request can be repeated: reads, writes, zeroes,
//! trims and flushes leave the same result when done twice).
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, Mutex};

use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::drivers::{OpenCtx, Opened};
use super::error::{BlockError, BlockResult};
use crate::nbd::link::Sock;
use crate::nbd::proto::*;

#[derive(Clone, Debug)]
enum Addr {
    Unix(String),
    Inet(String, String),
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;
type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// A reply: the error (0: none) and, for reads, the data.
type Reply = (u32, Vec<u8>);

/// The "error" of a request whose reply will not come because the
/// connection ended (not an NBD error value).
const LOST: u32 = u32::MAX;

struct Conn {
    writer: Mutex<Writer>,
    /// Cookie -> (bytes of data the reply carries, where to send it).
    pending: StdMutex<HashMap<u64, (u32, oneshot::Sender<Reply>)>>,
    /// Set when the reader saw the connection end.
    dead: std::sync::atomic::AtomicBool,
}

/// The client's TLS: from a client-endpoint tls-creds-x509 object.
struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    verify_peer: bool,
    /// tls-hostname, or the host connected to; None for a UNIX socket.
    hostname: Option<String>,
}

pub struct NbdClient {
    addr: Addr,
    tls: Option<ClientTls>,
    export: String,
    size: u64,
    flags: u16,
    reconnect_delay: Duration,
    rt: Handle,
    conn: Mutex<Option<Arc<Conn>>>,
    cookie: AtomicU64,
}

fn eio(msg: impl Into<String>) -> BlockError {
    BlockError::new(nix::libc::EIO, msg)
}

async fn connect(addr: &Addr) -> std::io::Result<Sock> {
    match addr {
        Addr::Unix(p) => Ok(Sock::Unix(tokio::net::UnixStream::connect(p).await?)),
        Addr::Inet(h, p) => {
            let s = tokio::net::TcpStream::connect(format!("{h}:{p}")).await?;
            s.set_nodelay(true)?;
            Ok(Sock::Tcp(s))
        }
    }
}

/// An I/O failure in QEMU's words, on a TLS channel or a socket.
fn io_text(e: &std::io::Error, reading: bool, tls: bool) -> String {
    if tls {
        crate::tls::session::io_failure(e, reading)
    } else if reading {
        format!("Unable to read from socket: {}", crate::util::os_msg(e))
    } else {
        format!("Unable to write to socket: {}", crate::util::os_msg(e))
    }
}

/// One option request.
fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend(IHAVEOPT.to_be_bytes());
    b.extend(opt.to_be_bytes());
    b.extend((data.len() as u32).to_be_bytes());
    b.extend(data);
    b
}

/// One option reply: (type, data).
async fn option_reply<S: AsyncRead + Unpin>(
    r: &mut S,
    tls: bool,
) -> Result<(u32, Vec<u8>), String> {
    let rerr =
        |e: std::io::Error| format!("Failed to read option reply: {}", io_text(&e, true, tls));
    if r.read_u64().await.map_err(rerr)? != REPLY_MAGIC {
        return Err("Unexpected option reply magic".into());
    }
    let _opt = r.read_u32().await.map_err(rerr)?;
    let kind = r.read_u32().await.map_err(rerr)?;
    let len = r.read_u32().await.map_err(rerr)?;
    if len > 1 << 20 {
        return Err("Option reply too long".into());
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data).await.map_err(rerr)?;
    Ok((kind, data))
}

/// The greeting, the client's flags and, with TLS, STARTTLS and the TLS
/// handshake; then GO. Gives the connection's halves, the export's size
/// and its transmission flags.
async fn handshake(
    mut sock: Sock,
    export: &str,
    tls: Option<&ClientTls>,
) -> Result<(Reader, Writer, u64, u16), String> {
    let io =
        |e: std::io::Error| format!("Failed to read initial magic: {}", crate::util::os_msg(&e));
    if sock.read_u64().await.map_err(io)? != NBDMAGIC
        || sock.read_u64().await.map_err(io)? != IHAVEOPT
    {
        return Err("Server does not support fixed newstyle negotiation".into());
    }
    let hs = sock.read_u16().await.map_err(io)?;
    if hs & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("Server does not support fixed newstyle negotiation".into());
    }
    let zeroes = hs & FLAG_NO_ZEROES;
    let flags = (u32::from(FLAG_FIXED_NEWSTYLE) | u32::from(zeroes)).to_be_bytes();
    let werr = |e: std::io::Error| format!("Failed to send option: {}", crate::util::os_msg(&e));
    let Some(tls) = tls else {
        sock.write_all(&flags).await.map_err(werr)?;
        let (size, tflags) = go(&mut sock, export, false).await?;
        // A socket's own halves: no lock between reader and writer.
        let (r, w): (Reader, Writer) = match sock {
            Sock::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Sock::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Sock::Detached => return Err("Connection closed".into()),
        };
        return Ok((r, w, size, tflags));
    };
    let mut first = flags.to_vec();
    first.extend(option(OPT_STARTTLS, &[]));
    sock.write_all(&first).await.map_err(werr)?;
    match option_reply(&mut sock, false).await? {
        (REP_ACK, _) => {}
        (REP_ERR_POLICY, _) => return Err("Denied by server for option 5 (starttls)".into()),
        (k, _) if k & (1 << 31) != 0 => {
            return Err("Server rejected request to start TLS".into());
        }
        (k, _) => return Err(format!("Unexpected option reply type {k}")),
    }
    let mut t =
        crate::tls::session::connect(&tls.config, tls.verify_peer, tls.hostname.as_deref(), sock)
            .await?;
    let (size, tflags) = go(&mut t, export, true).await?;
    let (r, w) = tokio::io::split(t);
    Ok((Box::new(r), Box::new(w), size, tflags))
}

/// NBD_OPT_GO for `export`: (export size, transmission flags).
async fn go<S>(s: &mut S, export: &str, tls: bool) -> Result<(u64, u16), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let werr = |e: std::io::Error| format!("Failed to send option: {}", io_text(&e, false, tls));
    let mut data = Vec::with_capacity(6 + export.len());
    data.extend((export.len() as u32).to_be_bytes());
    data.extend(export.as_bytes());
    data.extend(0u16.to_be_bytes());
    s.write_all(&option(OPT_GO, &data)).await.map_err(werr)?;
    s.flush().await.map_err(werr)?;
    let mut info = None;
    loop {
        let (kind, data) = option_reply(s, tls).await?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                let flags = u16::from_be_bytes([data[10], data[11]]);
                info = Some((size, flags));
            }
            REP_INFO => {}
            REP_ERR_TLS_REQD => {
                return Err("TLS negotiation required before option 7 (go)".into());
            }
            k if k & (1 << 31) != 0 => {
                let text = String::from_utf8_lossy(&data).to_string();
                return Err(if text.is_empty() {
                    "Requested export not available".to_string()
                } else {
                    format!("Requested export not available: {text}")
                });
            }
            _ => return Err(format!("Unexpected option reply type {kind}")),
        }
    }
    info.ok_or_else(|| "Server did not send the export's size".into())
}

/// Hands each reply to its request until the connection ends.
async fn read_replies(mut r: Reader, conn: Arc<Conn>) {
    loop {
        let head = async {
            let magic = r.read_u32().await?;
            let err = r.read_u32().await?;
            let cookie = r.read_u64().await?;
            Ok::<_, std::io::Error>((magic, err, cookie))
        };
        let Ok((magic, err, cookie)) = head.await else {
            break;
        };
        if magic != SIMPLE_REPLY_MAGIC {
            break;
        }
        let entry = conn.pending.lock().ok().and_then(|mut p| p.remove(&cookie));
        let Some((want, tx)) = entry else {
            break;
        };
        let mut data = Vec::new();
        if err == 0 && want > 0 {
            data = vec![0u8; want as usize];
            if r.read_exact(&mut data).await.is_err() {
                let _ = tx.send((LOST, Vec::new()));
                break;
            }
        }
        let _ = tx.send((err, data));
    }
    conn.dead.store(true, Ordering::Release);
    // Requests in flight fail: their replies will not come.
    if let Ok(mut p) = conn.pending.lock() {
        for (_, (_, tx)) in p.drain() {
            let _ = tx.send((LOST, Vec::new()));
        }
    }
}

/// Why a request got no good reply.
enum Sent {
    /// The connection ended before the reply: worth sending again.
    Lost(BlockError),
    /// The server's error, or no connection within the delay.
    Failed(BlockError),
}

impl NbdClient {
    /// Connects and negotiates: the connection, the export's size and
    /// its transmission flags.
    async fn open_conn(&self) -> Result<(Arc<Conn>, u64, u16), String> {
        let sock = connect(&self.addr).await.map_err(|e| {
            format!(
                "Failed to connect to '{}': {}",
                self.addr_text(),
                crate::util::os_msg(&e)
            )
        })?;
        let (r, w, size, flags) = handshake(sock, &self.export, self.tls.as_ref()).await?;
        let conn = Arc::new(Conn {
            writer: Mutex::new(w),
            pending: StdMutex::new(HashMap::new()),
            dead: Default::default(),
        });
        self.rt.spawn(read_replies(r, conn.clone()));
        Ok((conn, size, flags))
    }

    /// [`NbdClient::open_conn`], tried again every 100 ms until `within`
    /// has passed (open-timeout, reconnect-delay).
    async fn connect_within(&self, within: Duration) -> BlockResult<(Arc<Conn>, u64, u16)> {
        let until = Instant::now() + within;
        loop {
            match self.open_conn().await {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() >= until => return Err(eio(e)),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn addr_text(&self) -> String {
        match &self.addr {
            Addr::Unix(p) => p.clone(),
            Addr::Inet(h, p) => format!("{h}:{p}"),
        }
    }

    /// The live connection, connecting again (for up to the reconnect
    /// delay) if it broke.
    async fn conn(&self) -> BlockResult<Arc<Conn>> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.dead.load(Ordering::Acquire)) {
            return Ok(c.clone());
        }
        *slot = None;
        let (c, size, _) = self.connect_within(self.reconnect_delay).await?;
        if size != self.size {
            return Err(eio("Cannot reconnect: the export's size changed"));
        }
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Sends one request and waits for its reply; a request the
    /// connection lost is sent again on the next one while the reconnect
    /// delay has not passed.
    async fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> BlockResult<Vec<u8>> {
        let until = Instant::now() + self.reconnect_delay;
        loop {
            match self.send_once(kind, flags, offset, len, payload).await {
                Err(Sent::Lost(_)) if Instant::now() < until => continue,
                Err(Sent::Lost(e)) | Err(Sent::Failed(e)) => return Err(e),
                Ok(data) => return Ok(data),
            }
        }
    }

    async fn send_once(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, Sent> {
        let conn = self.conn().await.map_err(Sent::Failed)?;
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let want = if kind == CMD_READ { len } else { 0 };
        if let Ok(mut p) = conn.pending.lock() {
            p.insert(cookie, (want, tx));
        }
        let mut head = Vec::with_capacity(28 + payload.len());
        head.extend(REQUEST_MAGIC.to_be_bytes());
        head.extend(flags.to_be_bytes());
        head.extend(kind.to_be_bytes());
        head.extend(cookie.to_be_bytes());
        head.extend(offset.to_be_bytes());
        head.extend(len.to_be_bytes());
        head.extend(payload);
        {
            let mut w = conn.writer.lock().await;
            let sent = async {
                w.write_all(&head).await?;
                w.flush().await
            }
            .await;
            if let Err(e) = sent {
                conn.dead.store(true, Ordering::Release);
                if let Ok(mut p) = conn.pending.lock() {
                    p.remove(&cookie);
                }
                return Err(Sent::Lost(BlockError::io(&e, "NBD request")));
            }
        }
        let lost = || Sent::Lost(eio("Connection closed"));
        let (err, data) = rx.await.map_err(|_| lost())?;
        match err {
            0 => Ok(data),
            LOST => Err(lost()),
            _ => Err(Sent::Failed(BlockError::new(
                err as i32,
                crate::util::os_msg(&std::io::Error::from_raw_os_error(err as i32)),
            ))),
        }
    }
}

impl Driver for NbdClient {
    fn name(&self) -> &'static str {
        "nbd"
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn limits(&self) -> Limits {
        Limits {
            request_alignment: 1,
            max_transfer: 32 << 20,
        }
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let data = self
                .request(CMD_READ, 0, offset, buf.len() as u32, &[])
                .await?;
            if data.len() != buf.len() {
                return Err(eio("short NBD read"));
            }
            buf.copy_from_slice(&data);
            Ok(())
        })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let f = if flags.fua && self.flags & FLAG_SEND_FUA != 0 {
                CMD_FLAG_FUA
            } else {
                0
            };
            self.request(CMD_WRITE, f, offset, buf.len() as u32, buf)
                .await
                .map(|_| ())
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.flags & FLAG_SEND_FLUSH == 0 {
                return Ok(());
            }
            self.request(CMD_FLUSH, 0, 0, 0, &[]).await.map(|_| ())
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.flags & FLAG_SEND_TRIM == 0 {
                return Ok(());
            }
            self.request(CMD_TRIM, 0, offset, len as u32, &[])
                .await
                .map(|_| ())
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.flags & FLAG_SEND_WRITE_ZEROES != 0 {
                let mut f = if flags.may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
                if flags.fua && self.flags & FLAG_SEND_FUA != 0 {
                    f |= CMD_FLAG_FUA;
                }
                let mut pos = offset;
                while pos < offset + len {
                    let n = (offset + len - pos).min(1 << 30);
                    self.request(CMD_WRITE_ZEROES, f, pos, n as u32, &[])
                        .await?;
                    pos += n;
                }
                return Ok(());
            }
            // Without the command: zeroes written as data.
            let chunk = vec![0u8; (len.min(1 << 20)) as usize];
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(chunk.len() as u64) as usize;
                self.request(CMD_WRITE, 0, pos, n as u32, &chunk[..n])
                    .await?;
                pos += n as u64;
            }
            Ok(())
        })
    }
    fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, Extent> {
        // Without structured replies: everything is data.
        Box::pin(async move {
            Ok(Extent {
                len,
                data: true,
                zero: false,
                depth: 1,
            })
        })
    }
    fn truncate(&self, _size: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(BlockError::unsupported("Cannot resize NBD nodes")) })
    }
    fn has_image_info(&self) -> bool {
        false
    }
}

/// `tls-creds` (a client-endpoint tls-creds-x509 object) and
/// `tls-hostname` (by default the host connected to), checked as QEMU
/// checks them when the node opens.
fn client_tls(
    ctx: &OpenCtx<'_>,
    opts: &Map<String, Value>,
    addr: &Addr,
) -> Result<Option<ClientTls>, String> {
    let Some(id) = opts.get("tls-creds").and_then(Value::as_str) else {
        return Ok(None);
    };
    let creds = match ctx.object(id) {
        None => return Err(format!("No TLS credentials with id '{id}'")),
        Some(o) => o
            .tls_creds()
            .ok_or_else(|| format!("Object with id '{id}' is not TLS credentials"))?,
    };
    let crate::tls::Loaded::Client(config) = &creds.loaded else {
        return Err("Expected TLS credentials for a client endpoint".into());
    };
    let hostname = match (opts.get("tls-hostname").and_then(Value::as_str), addr) {
        (Some(h), _) => Some(h.to_string()),
        (None, Addr::Inet(h, _)) => Some(h.clone()),
        (None, Addr::Unix(_)) => None,
    };
    Ok(Some(ClientTls {
        config: config.clone(),
        verify_peer: creds.verify_peer,
        hostname,
    }))
}

/// The registry's open function (BlockdevOptionsNbd).
pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    let server = opts
        .get("server")
        .and_then(Value::as_object)
        .ok_or("Parameter 'server' is missing")?;
    let addr = match server.get("type").and_then(Value::as_str) {
        Some("unix") => Addr::Unix(
            server
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        ),
        Some("inet") => Addr::Inet(
            server
                .get("host")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            server
                .get("port")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        ),
        Some(other) => {
            return Err(format!(
                "rsd's nbd driver cannot connect to '{other}' addresses"
            ))
        }
        None => return Err("Parameter 'server.type' is missing".into()),
    };
    let tls = client_tls(ctx, opts, &addr)?;
    let export = opts
        .get("export")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let reconnect_delay = Duration::from_secs(
        opts.get("reconnect-delay")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    );
    let open_timeout = opts
        .get("open-timeout")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let rt = Handle::try_current().map_err(|_| "no runtime for the NBD connection".to_string())?;
    let mut client = NbdClient {
        addr: addr.clone(),
        tls,
        export: export.clone(),
        size: 0,
        flags: 0,
        reconnect_delay,
        rt: rt.clone(),
        conn: Mutex::new(None),
        cookie: AtomicU64::new(1),
    };
    // The first connection tells the size and flags.
    let (conn, size, flags) =
        super::wait::wait(client.connect_within(Duration::from_secs(open_timeout)))
            .map_err(|e| e.msg)?;
    client.size = size;
    client.flags = flags;
    if flags & FLAG_READ_ONLY != 0 && !ctx.common.read_only {
        ctx.common.read_only = true;
        if !ctx.common.auto_read_only {
            return Err("Block node is read-only".into());
        }
    }
    client.conn = Mutex::new(Some(conn));
    let mut srv = Map::new();
    for (k, v) in server {
        srv.insert(k.clone(), v.clone());
    }
    let mut j = Map::new();
    j.insert("driver".into(), json!("nbd"));
    j.insert("server".into(), Value::Object(srv));
    if !export.is_empty() {
        j.insert("export".into(), json!(export));
    }
    let plain = match &addr {
        Addr::Unix(p) => Some(if export.is_empty() {
            format!("nbd+unix://?socket={p}")
        } else {
            format!("nbd+unix:///{export}?socket={p}")
        }),
        Addr::Inet(h, p) => Some(format!("nbd://{h}:{p}/{export}")),
    };
    Ok(Opened {
        driver: Box::new(client),
        json: Value::Object(j),
        plain,
        children: Vec::new(),
    })
}
