//! One NBD client: the fixed-newstyle handshake, option haggling, then
//! transmission with pipelined requests completing out of order. Each
//! request runs on its own task straight on the node (no actor hop);
//! replies go to one writer task.
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::export::{Export, Exports};
use super::proto::*;
use crate::block::cancel::Cancel;
use crate::block::driver::{WriteFlags, ZeroFlags};
use crate::block::node::Node;

/// Requests in flight per connection; the reader waits beyond this.
const MAX_IN_FLIGHT: usize = 64;
/// Writes at least this large are copied on a blocking-pool thread.
const OFFLOAD_WRITE: u64 = 256 << 10;
/// Option payloads beyond this end the connection (QEMU's limit).
const MAX_OPTION_LEN: u32 = 32 << 20;
/// Option payloads beyond this are read and dropped, not kept: no valid
/// option of rsd's is this long.
const KEPT_OPTION_LEN: u32 = 64 << 10;
/// The longest export name (the spec's, and QEMU's, string limit).
const MAX_NAME_LEN: usize = 4096;

const CTX_BASE: u32 = 1;
const CTX_DEPTH: u32 = 2;

pub type Reader = std::pin::Pin<Box<dyn AsyncRead + Send>>;
pub type Writer = std::pin::Pin<Box<dyn AsyncWrite + Send>>;

/// The handshake: greeting, client flags and option haggling, up to the
/// export the client chose (None when it left or chose none). It reads
/// exactly what the client sent for it, so the stream can then move to
/// the thread that serves transmission.
pub async fn handshake<R, W>(rd: &mut R, wr: &mut W, exports: &Exports) -> Option<Session>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&hello).await.ok()?;
    let client_flags = rd.read_u32().await.ok()?;
    let no_zeroes = client_flags & FLAG_NO_ZEROES as u32 != 0;
    negotiate(rd, wr, exports, no_zeroes).await.ok().flatten()
}

/// What option haggling settled.
pub struct Session {
    export: Arc<Export>,
    structured: bool,
    /// Extended headers: 64-bit lengths, 32-byte requests and replies.
    extended: bool,
    contexts: Vec<u32>,
    /// Counts this client on its export, from before the handshake's
    /// last reply (so a client that finished haggling is always "in use").
    _client: super::export::ClientGuard,
}

async fn opt_reply(
    wr: &mut (impl AsyncWrite + Unpin),
    opt: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    wr.write_all(&b).await
}

fn transmission_flags(e: &Export, extended: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_DF
        | FLAG_CAN_MULTI_CONN
        | FLAG_SEND_CACHE;
    if e.writable {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    } else {
        f |= FLAG_READ_ONLY;
    }
    if extended {
        // BLOCK_STATUS may carry a payload (a length and context ids).
        f |= FLAG_BLOCK_STAT_PAYLOAD;
    }
    f
}

/// A cursor over an option's payload.
struct Payload<'a>(&'a [u8]);
impl<'a> Payload<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_first_chunk::<2>()?;
        self.0 = t;
        Some(u16::from_be_bytes(*h))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_first_chunk::<4>()?;
        self.0 = t;
        Some(u32::from_be_bytes(*h))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        self.bytes(n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

/// The export an option's payload names. Replies ERR_INVALID to a
/// malformed payload and ERR_UNKNOWN to an unknown name, then gives None.
async fn named_export<T>(
    wr: &mut (impl AsyncWrite + Unpin),
    opt: u32,
    exports: &Exports,
    parsed: Option<(String, T)>,
) -> std::io::Result<Option<(Arc<Export>, String, T)>> {
    let Some((name, rest)) = parsed else {
        opt_reply(wr, opt, REP_ERR_INVALID, &[]).await?;
        return Ok(None);
    };
    if name.len() > MAX_NAME_LEN {
        let msg = format!("Invalid name length: {}", name.len());
        opt_reply(wr, opt, REP_ERR_INVALID, msg.as_bytes()).await?;
        return Ok(None);
    }
    match exports.find(&name) {
        Some(e) => Ok(Some((e, name, rest))),
        None => {
            // As QEMU: a long name is cut to 80 characters in the message.
            let shown = match name.char_indices().nth(80) {
                Some((at, _)) => format!("{}...", &name[..at]),
                None => name,
            };
            let msg = format!("export '{shown}' not present");
            opt_reply(wr, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
            Ok(None)
        }
    }
}

/// The meta contexts an export offers that match `query`.
fn match_contexts(e: &Export, query: &str) -> Vec<(u32, &'static str)> {
    let mut all = vec![(CTX_BASE, "base:allocation")];
    if e.allocation_depth {
        all.push((CTX_DEPTH, "qemu:allocation-depth"));
    }
    all.into_iter()
        .filter(|(_, name)| match query {
            "" => true,
            "base:" | "qemu:" => name.starts_with(query),
            q => *name == q,
        })
        .collect()
}

async fn negotiate(
    rd: &mut (impl AsyncRead + Unpin),
    wr: &mut (impl AsyncWrite + Unpin),
    exports: &Exports,
    no_zeroes: bool,
) -> std::io::Result<Option<Session>> {
    let mut structured = false;
    let mut extended = false;
    let mut contexts: Vec<u32> = Vec::new();
    let mut ctx_export: Option<String> = None;
    loop {
        if rd.read_u64().await? != IHAVEOPT {
            return Ok(None);
        }
        let opt = rd.read_u32().await?;
        let len = rd.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Ok(None);
        }
        if len > KEPT_OPTION_LEN {
            drain(rd, u64::from(len)).await?;
            if opt == OPT_EXPORT_NAME {
                return Ok(None);
            }
            let kind = match opt {
                OPT_ABORT
                | OPT_LIST
                | OPT_STRUCTURED_REPLY
                | OPT_EXTENDED_HEADERS
                | OPT_INFO
                | OPT_GO
                | OPT_LIST_META_CONTEXT
                | OPT_SET_META_CONTEXT => REP_ERR_INVALID,
                _ => REP_ERR_UNSUP,
            };
            opt_reply(wr, opt, kind, &[]).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME if data.len() > MAX_NAME_LEN => return Ok(None),
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some((export, node)) = exports
                    .find(&name)
                    .and_then(|e| e.node.get().map(|n| (e, n)))
                else {
                    return Ok(None);
                };
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&node.size().to_be_bytes());
                b.extend_from_slice(&transmission_flags(&export, extended).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                let client = export.attach();
                wr.write_all(&b).await?;
                return Ok(Some(Session {
                    _client: client,
                    export,
                    structured,
                    extended,
                    contexts: if ctx_export.as_deref() == Some(&name) {
                        contexts
                    } else {
                        vec![]
                    },
                }));
            }
            OPT_ABORT => {
                let _ = opt_reply(wr, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if len != 0 {
                    opt_reply(wr, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                for e in exports.list() {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    if let Some(desc) = &e.description {
                        d.extend_from_slice(desc.as_bytes());
                    }
                    opt_reply(wr, opt, REP_SERVER, &d).await?;
                }
                opt_reply(wr, opt, REP_ACK, &[]).await?;
            }
            OPT_EXTENDED_HEADERS => {
                if len != 0 {
                    opt_reply(wr, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                extended = true;
                structured = true;
                opt_reply(wr, opt, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    opt_reply(wr, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                structured = true;
                opt_reply(wr, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let mut p = Payload(&data);
                let parsed = (|| {
                    let name = p.string()?;
                    let n = p.u16()? as usize;
                    let reqs: Option<Vec<u16>> = (0..n).map(|_| p.u16()).collect();
                    p.0.is_empty().then_some((name, reqs?))
                })();
                let Some((export, name, reqs)) = named_export(wr, opt, exports, parsed).await?
                else {
                    continue;
                };
                if reqs.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    opt_reply(wr, opt, REP_INFO, &d).await?;
                }
                if reqs.contains(&INFO_DESCRIPTION) {
                    if let Some(desc) = &export.description {
                        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        d.extend_from_slice(desc.as_bytes());
                        opt_reply(wr, opt, REP_INFO, &d).await?;
                    }
                }
                let Some(node) = export.node.get() else {
                    opt_reply(wr, opt, REP_ERR_UNKNOWN, &[]).await?;
                    continue;
                };
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                let min = node.limits().request_alignment;
                d.extend_from_slice(&min.to_be_bytes());
                d.extend_from_slice(&4096u32.max(min).to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                opt_reply(wr, opt, REP_INFO, &d).await?;
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&node.size().to_be_bytes());
                d.extend_from_slice(&transmission_flags(&export, extended).to_be_bytes());
                opt_reply(wr, opt, REP_INFO, &d).await?;
                let client = (opt == OPT_GO).then(|| export.attach());
                opt_reply(wr, opt, REP_ACK, &[]).await?;
                if let Some(client) = client {
                    return Ok(Some(Session {
                        _client: client,
                        contexts: if ctx_export.as_deref() == Some(&name) {
                            contexts
                        } else {
                            vec![]
                        },
                        export,
                        structured,
                        extended,
                    }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set && !structured {
                    opt_reply(wr, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                let mut p = Payload(&data);
                let parsed = (|| {
                    let name = p.string()?;
                    let n = p.u32()? as usize;
                    let qs: Option<Vec<String>> = (0..n).map(|_| p.string()).collect();
                    p.0.is_empty().then_some((name, qs?))
                })();
                let Some((export, name, queries)) = named_export(wr, opt, exports, parsed).await?
                else {
                    continue;
                };
                let mut found: Vec<(u32, &'static str)> = Vec::new();
                let queries = if queries.is_empty() && !set {
                    vec![String::new()]
                } else {
                    queries
                };
                for q in &queries {
                    for c in match_contexts(&export, q) {
                        if !found.contains(&c) {
                            found.push(c);
                        }
                    }
                }
                for (id, cname) in &found {
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(cname.as_bytes());
                    opt_reply(wr, opt, REP_META_CONTEXT, &d).await?;
                }
                if set {
                    contexts = found.iter().map(|(id, _)| *id).collect();
                    ctx_export = Some(name);
                }
                opt_reply(wr, opt, REP_ACK, &[]).await?;
            }
            _ => {
                opt_reply(wr, opt, REP_ERR_UNSUP, &[]).await?;
            }
        }
    }
}

/// A reply: the first `len` bytes of `buf` (a read reuses a pooled
/// buffer that may be longer, so it is never zeroed again).
struct Reply {
    buf: Vec<u8>,
    len: usize,
}

impl From<Vec<u8>> for Reply {
    fn from(buf: Vec<u8>) -> Reply {
        let len = buf.len();
        Reply { buf, len }
    }
}

impl Reply {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Read buffers kept per connection for reuse.
#[derive(Clone, Default)]
struct BufPool(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl BufPool {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default()
    }
    fn give(&self, b: Vec<u8>) {
        if b.len() > 64 << 10 && b.len() <= MAX_PAYLOAD as usize + 64 {
            if let Ok(mut p) = self.0.lock() {
                if p.len() < 16 {
                    p.push(b);
                }
            }
        }
    }
}

struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u64,
    payload: Vec<u8>,
    /// A pooled buffer for a READ's reply.
    buf: Vec<u8>,
    /// BLOCK_STATUS with a payload: the contexts asked for (None = all).
    contexts: Option<Vec<u32>>,
    /// The request's payload was malformed (answered with EINVAL).
    invalid: bool,
}

/// Reads requests until DISC, EOF, a bad magic or the export closing.
///
/// Each request's future is polled once right away: on tmpfs or a warm
/// page cache it completes then, and the reply is written by this task
/// with no hand-off to another thread (a cross-CPU wake-up costs more
/// than the I/O). A request that has to wait moves to its own task, so
/// pipelined requests still complete out of order.
pub async fn transmission(
    rd: Reader,
    wr: Writer,
    s: Session,
    may_spin: Arc<std::sync::atomic::AtomicBool>,
) {
    let s = Arc::new(s);
    let mut closing = s.export.closing();
    let mut rd = tokio::io::BufReader::with_capacity(128 << 10, rd);
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut out: Vec<u8> = Vec::new();
    let pool = BufPool::default();
    // Set once the client is known to be gone (EOF or an error without
    // DISC, or a reply that cannot be sent): requests it left queued
    // stop before they start (`block::cancel`), and no more are read.
    let gone = Cancel::default();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        if gone.is_cancelled() {
            break;
        }
        // Nothing in flight but this read, and every reply written: the
        // client has what it asked for and its next request is the only
        // thing to wait for.
        let idle = slots.available_permits() == MAX_IN_FLIGHT - 1 && out.is_empty();
        may_spin.store(idle, std::sync::atomic::Ordering::Relaxed);
        let req = tokio::select! {
            r = read_request(&mut rd, s.extended, &pool) => r,
            _ = closing.wait_for(|c| *c) => break,
        };
        let Ok(Some(mut req)) = req else {
            gone.cancel();
            break;
        };
        if req.kind == CMD_READ && req.len > 64 << 10 && req.len <= MAX_PAYLOAD as u64 {
            req.buf = pool.take();
        }
        if req.kind == CMD_DISC {
            break;
        }
        let s2 = s.clone();
        let offload = req.kind == CMD_WRITE && req.len >= OFFLOAD_WRITE;
        let (cookie, offset) = (req.cookie, req.offset);
        let payload = std::mem::take(&mut req.payload);
        let pool2 = pool.clone();
        let mut fut: std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>> =
            Box::pin(gone.scope(async move {
                let reply = handle(&s2, req, &payload).await;
                pool2.give(payload);
                reply
            }));
        if offload {
            // A large write is copied on another thread while this one
            // reads the next payload from the socket: both cores work.
            let rt = tokio::runtime::Handle::current();
            let job = tokio::task::spawn_blocking(move || rt.block_on(fut));
            let s3 = s.clone();
            fut = Box::pin(async move {
                match job.await {
                    Ok(reply) => reply,
                    Err(_) => error_reply(&s3, cookie, offset, EIO),
                }
            });
        }
        let first = {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            fut.as_mut().poll(&mut cx)
        };
        match first {
            std::task::Poll::Ready(reply) => {
                drop(permit);
                if reply.len > 64 << 10 {
                    // Large data: write it as it is instead of copying it.
                    let mut w = wr.lock().await;
                    if w.write_all(&std::mem::take(&mut out)).await.is_err()
                        || w.write_all(reply.bytes()).await.is_err()
                    {
                        gone.cancel();
                        break;
                    }
                } else {
                    out.extend_from_slice(reply.bytes());
                }
                pool.give(reply.buf);
            }
            std::task::Poll::Pending => {
                let (wr, pool, gone) = (wr.clone(), pool.clone(), gone.clone());
                tokio::spawn(async move {
                    let reply = fut.await;
                    if wr.lock().await.write_all(reply.bytes()).await.is_err() {
                        gone.cancel();
                    }
                    pool.give(reply.buf);
                    drop(permit);
                });
            }
        }
        // Batch replies while the next request is already buffered (one
        // write for a burst of pipelined requests); never sit on a reply
        // while waiting for the client.
        if !out.is_empty()
            && (rd.buffer().len() < header_len(s.extended) || out.len() >= 256 << 10)
            && wr
                .lock()
                .await
                .write_all(&std::mem::take(&mut out))
                .await
                .is_err()
        {
            gone.cancel();
            break;
        }
    }
    // Let requests in flight finish, then close.
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    let mut w = wr.lock().await;
    let _ = w.write_all(&out).await;
    let _ = w.shutdown().await;
}

/// Reads and drops `len` bytes of a payload rsd will refuse.
async fn drain(rd: &mut (impl AsyncRead + Unpin), len: u64) -> std::io::Result<()> {
    let mut left = len;
    let mut sink = vec![0u8; 1 << 16];
    while left > 0 {
        let n = left.min(sink.len() as u64) as usize;
        rd.read_exact(&mut sink[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// The size of a request header.
fn header_len(extended: bool) -> usize {
    if extended {
        32
    } else {
        28
    }
}

/// Ok(None) on EOF; Err on a bad magic or a broken stream.
async fn read_request(
    rd: &mut (impl AsyncRead + Unpin),
    extended: bool,
    pool: &BufPool,
) -> std::io::Result<Option<Request>> {
    let mut h = [0u8; 32];
    let h = &mut h[..header_len(extended)];
    match rd.read_exact(h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let be32 = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if be32(0) != magic {
        return Err(std::io::Error::other("bad request magic"));
    }
    let flags = u16::from_be_bytes([h[4], h[5]]);
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
    let offset = u64::from_be_bytes(h[16..24].try_into().unwrap_or_default());
    let len = if extended {
        u64::from_be_bytes(h[24..32].try_into().unwrap_or_default())
    } else {
        be32(24) as u64
    };
    let mut payload = Vec::new();
    let mut len = len;
    let mut contexts = None;
    let mut invalid = false;
    if kind == CMD_BLOCK_STATUS && flags & CMD_FLAG_PAYLOAD_LEN != 0 {
        // The payload: the length of interest, then the context ids.
        if !(8..=4096).contains(&len) || !(len - 8).is_multiple_of(4) {
            drain(rd, len).await?;
            invalid = true;
        } else {
            let mut p = vec![0u8; len as usize];
            rd.read_exact(&mut p).await?;
            let ids = p[8..]
                .chunks_exact(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            len = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
            contexts = Some(ids);
        }
    } else if kind == CMD_WRITE {
        if len <= MAX_PAYLOAD as u64 {
            // Filled straight from the socket: no zeroing first. Large
            // payloads reuse pooled buffers (no page faults per request).
            if len > 64 << 10 {
                payload = pool.take();
                payload.clear();
            }
            payload.reserve_exact(len as usize);
            while payload.len() < len as usize {
                let want = (len as usize - payload.len()) as u64;
                if (&mut *rd).take(want).read_buf(&mut payload).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        } else {
            // Too big to accept: drain it so the stream stays in sync.
            drain(rd, len).await?;
        }
    }
    Ok(Some(Request {
        flags,
        kind,
        cookie,
        offset,
        len,
        payload,
        buf: Vec::new(),
        contexts,
        invalid,
    }))
}

fn simple_reply(cookie: u64, error: u32, data_len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data_len);
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header, or an extended one (which also
/// carries the request's offset and a 64-bit payload length).
fn chunk_header(
    s: &Session,
    b: &mut Vec<u8>,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) {
    let magic = if s.extended {
        EXTENDED_REPLY_MAGIC
    } else {
        STRUCTURED_REPLY_MAGIC
    };
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    if s.extended {
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
    } else {
        b.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

fn error_reply(s: &Session, cookie: u64, offset: u64, error: u32) -> Reply {
    if !s.structured {
        return simple_reply(cookie, error, 0).into();
    }
    let mut b = Vec::with_capacity(26);
    chunk_header(
        s,
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        offset,
        6,
    );
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.into()
}

fn ok_reply(s: &Session, cookie: u64, offset: u64) -> Reply {
    if !s.structured {
        return simple_reply(cookie, 0, 0).into();
    }
    let mut b = Vec::with_capacity(20);
    chunk_header(
        s,
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_NONE,
        cookie,
        offset,
        0,
    );
    b.into()
}

/// Which command flags each command may carry.
fn allowed_flags(kind: u16, s: &Session) -> u16 {
    match kind {
        CMD_READ if s.structured => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS if s.extended => CMD_FLAG_REQ_ONE | CMD_FLAG_PAYLOAD_LEN,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

async fn handle(s: &Session, r: Request, payload: &[u8]) -> Reply {
    // Counted on the export's edge: a graph change (a snapshot) waits
    // for it, and the next request goes to the new node.
    let Some(node) = s.export.node.enter().await else {
        return error_reply(s, r.cookie, r.offset, EIO);
    };
    let node: &Node = &node;
    let known = matches!(
        r.kind,
        CMD_READ
            | CMD_WRITE
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    );
    if r.invalid || !known || r.flags & !allowed_flags(r.kind, s) != 0 {
        return error_reply(s, r.cookie, r.offset, EINVAL);
    }
    if matches!(r.kind, CMD_READ | CMD_WRITE) && r.len > MAX_PAYLOAD as u64 {
        return error_reply(s, r.cookie, r.offset, EINVAL);
    }
    let ranged = r.kind != CMD_FLUSH;
    if ranged
        && r.offset
            .checked_add(r.len)
            .is_none_or(|end| end > node.size())
    {
        return error_reply(s, r.cookie, r.offset, EINVAL);
    }
    let writes = matches!(r.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && !s.export.writable {
        return error_reply(s, r.cookie, r.offset, EPERM);
    }
    if r.kind == CMD_READ {
        return read(s, node, r).await;
    }
    let fua = r.flags & CMD_FLAG_FUA != 0 || s.export.writethrough;
    let result = match r.kind {
        CMD_BLOCK_STATUS => return block_status(s, node, &r).await,
        CMD_WRITE => node.write(r.offset, payload, WriteFlags { fua }).await,
        CMD_FLUSH => node.flush().await,
        CMD_TRIM => {
            let r2 = node.discard(r.offset, r.len).await;
            match (r2, fua) {
                (Ok(()), true) => node.flush().await,
                (other, _) => other,
            }
        }
        CMD_WRITE_ZEROES => {
            node.write_zeroes(
                r.offset,
                r.len,
                ZeroFlags {
                    fua,
                    may_unmap: r.flags & CMD_FLAG_NO_HOLE == 0,
                    no_fallback: r.flags & CMD_FLAG_FAST_ZERO != 0,
                },
            )
            .await
        }
        // CACHE: the page cache is warmed by reading; nothing to return.
        _ => {
            let mut buf = vec![0u8; r.len.min(1 << 20) as usize];
            let mut off = r.offset;
            let end = r.offset + r.len;
            let mut res = Ok(());
            while off < end && res.is_ok() {
                let n = ((end - off) as usize).min(buf.len());
                res = node.read(off, &mut buf[..n]).await;
                off += n as u64;
            }
            res
        }
    };
    match result {
        Ok(()) => ok_reply(s, r.cookie, r.offset),
        Err(e) => error_reply(s, r.cookie, r.offset, nbd_errno(e.errno)),
    }
}

async fn read(s: &Session, node: &Node, mut r: Request) -> Reply {
    // handle() has bounded the length by MAX_PAYLOAD.
    let len = r.len as usize;
    if s.structured && len > 0 && node.driver.known_zero(r.offset, r.len) {
        // A range the driver knows (cheaply) to read as zeroes goes out
        // as a hole chunk.
        let mut b = Vec::with_capacity(44);
        chunk_header(
            s,
            &mut b,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_HOLE,
            r.cookie,
            r.offset,
            12,
        );
        b.extend_from_slice(&r.offset.to_be_bytes());
        b.extend_from_slice(&(r.len as u32).to_be_bytes());
        return b.into();
    }
    let mut head = Vec::with_capacity(40);
    if s.structured {
        chunk_header(
            s,
            &mut head,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            r.cookie,
            r.offset,
            8 + r.len,
        );
        head.extend_from_slice(&r.offset.to_be_bytes());
    } else {
        head = simple_reply(r.cookie, 0, 0);
    }
    // The data goes straight into the (pooled) reply buffer after the header.
    let mut b = std::mem::take(&mut r.buf);
    let need = head.len() + len;
    if b.len() < need {
        b.resize(need, 0);
    }
    b[..head.len()].copy_from_slice(&head);
    match node.read(r.offset, &mut b[head.len()..need]).await {
        Ok(()) => Reply { buf: b, len: need },
        Err(e) => error_reply(s, r.cookie, r.offset, nbd_errno(e.errno)),
    }
}

/// Extents per reply at most, to bound reply sizes.
const MAX_EXTENTS: usize = 1024;

async fn block_status(s: &Session, node: &Node, r: &Request) -> Reply {
    if !s.structured || s.contexts.is_empty() || r.len == 0 {
        return error_reply(s, r.cookie, r.offset, EINVAL);
    }
    let one = r.flags & CMD_FLAG_REQ_ONE != 0;
    let mut extents = Vec::new();
    let mut off = r.offset;
    let end = r.offset + r.len;
    while off < end && extents.len() < MAX_EXTENTS {
        match node.block_status(off, end - off).await {
            Ok(e) => {
                extents.push(e);
                off += e.len;
            }
            Err(e) => return error_reply(s, r.cookie, r.offset, nbd_errno(e.errno)),
        }
        if one {
            break;
        }
    }
    // A payload may narrow the contexts to report, among those selected.
    let mut wanted: Vec<u32> = Vec::new();
    for id in r.contexts.as_deref().unwrap_or(&s.contexts) {
        if !s.contexts.contains(id) {
            return error_reply(s, r.cookie, r.offset, EINVAL);
        }
        if !wanted.contains(id) {
            wanted.push(*id);
        }
    }
    if wanted.is_empty() {
        return error_reply(s, r.cookie, r.offset, EINVAL);
    }
    let mut b = Vec::new();
    for (i, ctx) in wanted.iter().enumerate() {
        let last = i + 1 == wanted.len();
        let flags_of = |e: &crate::block::driver::Extent| match *ctx {
            CTX_BASE => {
                (if e.data { 0 } else { STATE_HOLE }) | (if e.zero { STATE_ZERO } else { 0 })
            }
            _ => e.depth,
        };
        let done = if last { REPLY_FLAG_DONE } else { 0 };
        if s.extended {
            // 64-bit descriptors, as extended headers require.
            let len = 8 + 16 * extents.len() as u64;
            chunk_header(
                s,
                &mut b,
                done,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                r.cookie,
                r.offset,
                len,
            );
            b.extend_from_slice(&ctx.to_be_bytes());
            b.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for e in &extents {
                b.extend_from_slice(&e.len.to_be_bytes());
                b.extend_from_slice(&(flags_of(e) as u64).to_be_bytes());
            }
        } else {
            let len = 4 + 8 * extents.len() as u64;
            chunk_header(
                s,
                &mut b,
                done,
                REPLY_TYPE_BLOCK_STATUS,
                r.cookie,
                r.offset,
                len,
            );
            b.extend_from_slice(&ctx.to_be_bytes());
            for e in &extents {
                b.extend_from_slice(&(e.len.min(u32::MAX as u64) as u32).to_be_bytes());
                b.extend_from_slice(&flags_of(e).to_be_bytes());
            }
        }
    }
    b.into()
}
