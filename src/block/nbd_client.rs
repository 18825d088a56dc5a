//! The `nbd` block driver: a node whose data is another server's NBD
//! export (rsd's own, QSD's, qemu-nbd's), so a mirror or backup can
//! target another host.
//!
//! One connection, fixed newstyle, NBD_OPT_GO, simple replies. Requests
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

pub struct NbdClient {
    addr: Addr,
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

async fn connect(addr: &Addr) -> std::io::Result<(Reader, Writer)> {
    match addr {
        Addr::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p).await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Addr::Inet(h, p) => {
            let s = tokio::net::TcpStream::connect(format!("{h}:{p}")).await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}

/// The handshake up to transmission: (export size, transmission flags).
async fn handshake(r: &mut Reader, w: &mut Writer, export: &str) -> Result<(u64, u16), String> {
    let io =
        |e: std::io::Error| format!("Failed to read initial magic: {}", crate::util::os_msg(&e));
    if r.read_u64().await.map_err(io)? != NBDMAGIC || r.read_u64().await.map_err(io)? != IHAVEOPT {
        return Err("Server does not support fixed newstyle negotiation".into());
    }
    let hs = r.read_u16().await.map_err(io)?;
    if hs & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("Server does not support fixed newstyle negotiation".into());
    }
    let zeroes = hs & FLAG_NO_ZEROES;
    let werr = |e: std::io::Error| format!("Failed to send option: {}", crate::util::os_msg(&e));
    let mut opt = Vec::new();
    opt.extend(IHAVEOPT.to_be_bytes());
    opt.extend(OPT_GO.to_be_bytes());
    opt.extend(((4 + export.len() + 2) as u32).to_be_bytes());
    opt.extend((export.len() as u32).to_be_bytes());
    opt.extend(export.as_bytes());
    opt.extend(0u16.to_be_bytes());
    let mut first = (u32::from(FLAG_FIXED_NEWSTYLE) | u32::from(zeroes))
        .to_be_bytes()
        .to_vec();
    first.extend(opt);
    w.write_all(&first).await.map_err(werr)?;
    w.flush().await.map_err(werr)?;
    let mut info = None;
    loop {
        let rerr =
            |e: std::io::Error| format!("Failed to read option reply: {}", crate::util::os_msg(&e));
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
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                let flags = u16::from_be_bytes([data[10], data[11]]);
                info = Some((size, flags));
            }
            REP_INFO => {}
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
        let (mut r, mut w) = connect(&self.addr).await.map_err(|e| {
            format!(
                "Failed to connect to '{}': {}",
                self.addr_text(),
                crate::util::os_msg(&e)
            )
        })?;
        let (size, flags) = handshake(&mut r, &mut w, &self.export).await?;
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
    if opts.contains_key("tls-creds") {
        return Err("rsd's nbd driver does not support TLS yet".into());
    }
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
