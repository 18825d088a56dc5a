//! One NBD client's transmission phase: pipelined requests completing
//! out of order. Each request runs straight on the node (no actor hop);
//! the framing is `codec`, the handshake before it `handshake`.
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::codec::*;
use super::handshake::{Session, CTX_BASE, CTX_BITMAP, CTX_DEPTH};
use super::proto::*;
use crate::block::cancel::Cancel;
use crate::block::driver::{WriteFlags, ZeroFlags};
use crate::block::node::Node;
use crate::exports::stats::Op as ExportOp;

/// Requests in flight per connection; the reader waits beyond this.
const MAX_IN_FLIGHT: usize = 64;
/// Writes at least this large are copied on a blocking-pool thread.
const OFFLOAD_WRITE: u64 = 256 << 10;

pub type Reader = std::pin::Pin<Box<dyn AsyncRead + Send>>;
pub type Writer = std::pin::Pin<Box<dyn AsyncWrite + Send>>;

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
    let budget = data_budget();
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
            r = read_request(&mut rd, s.extended, &pool, &budget) => r,
            _ = closing.wait_for(|c| *c) => break,
        };
        let Ok(Some(mut req)) = req else {
            gone.cancel();
            break;
        };
        if req.kind == CMD_READ
            && req.len > ALIGN_READS_OVER as u64
            && req.len <= MAX_PAYLOAD as u64
        {
            req.buf = pool.take();
        }
        if req.kind == CMD_DISC {
            break;
        }
        // Released once the reply is written (or copied into `out`).
        let held = req.held.take();
        let s2 = s.clone();
        let offload = req.kind == CMD_WRITE && req.len >= OFFLOAD_WRITE;
        let (cookie, offset) = (req.cookie, req.offset);
        let payload = std::mem::take(&mut req.payload);
        let payload_start = req.payload_start;
        let pool2 = pool.clone();
        let mut fut: std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>> =
            Box::pin(gone.scope(async move {
                let reply = handle(&s2, req, &payload[payload_start..]).await;
                pool2.give(payload);
                reply
            }));
        if offload {
            // A large write is copied on another thread while this one
            // reads the next payload from the socket: both cores work.
            let rt = tokio::runtime::Handle::current();
            let span = conn_span(&s);
            let job = tokio::task::spawn_blocking(move || {
                let _in = span.enter();
                rt.block_on(fut)
            });
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
                drop(held);
            }
            std::task::Poll::Pending => {
                let (wr, pool, gone) = (wr.clone(), pool.clone(), gone.clone());
                let task = async move {
                    let reply = fut.await;
                    if wr.lock().await.write_all(reply.bytes()).await.is_err() {
                        gone.cancel();
                    }
                    pool.give(reply.buf);
                    drop(held);
                    drop(permit);
                };
                tokio::spawn(task.instrument(conn_span(&s)));
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
    if let Some(t) = &s.trace {
        t.finish();
    }
    tracing::info!(
        target: "nbd_client_disconnect",
        export = %s.export.name,
        "NBD client disconnected"
    );
    let failed = s.node_errors.load(std::sync::atomic::Ordering::Relaxed);
    if failed > 1 {
        eprintln!(
            "rsd: NBD export '{}': a client left after {failed} failed requests",
            s.export.name
        );
    }
    // Its buffers (and its requests' buffers) are gone.
    crate::util::trim_memory_soon();
}

/// The connection's span, for requests that run elsewhere (a disabled
/// one, free to clone and enter, while traces are off).
fn conn_span(s: &Session) -> tracing::Span {
    s.trace
        .as_ref()
        .map_or_else(tracing::Span::none, |t| t.span.clone())
}

/// Runs one request and counts it on the export.
async fn handle(s: &Session, r: Request, payload: &[u8]) -> Reply {
    let op = match r.kind {
        CMD_READ => ExportOp::Read,
        CMD_WRITE => ExportOp::Write,
        CMD_FLUSH => ExportOp::Flush,
        CMD_TRIM => ExportOp::Discard,
        CMD_WRITE_ZEROES => ExportOp::WriteZeroes,
        CMD_BLOCK_STATUS => ExportOp::BlockStatus,
        _ => ExportOp::Other,
    };
    let moved = if matches!(op, ExportOp::Read | ExportOp::Write) {
        r.len
    } else {
        0
    };
    let reply = run(s, r, payload).await;
    s.export.stats.request(op, moved, !reply.error);
    if let Some(t) = &s.trace {
        t.count(op, moved);
    }
    reply
}

async fn run(s: &Session, r: Request, payload: &[u8]) -> Reply {
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
        CMD_WRITE => {
            node.write(
                r.offset,
                payload,
                WriteFlags {
                    fua,
                    ..Default::default()
                },
            )
            .await
        }
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
        Err(e) => error_reply(s, r.cookie, r.offset, node_failed(s, r.kind, r.offset, &e)),
    }
}

/// A request the node failed: the client gets the errno; the operator
/// sees the first failure of each connection on stderr (QSD prints one
/// when it drops a client over a failed read) and how many there were
/// when the client leaves, never a line per request.
fn node_failed(s: &Session, kind: u16, offset: u64, e: &crate::block::error::BlockError) -> u32 {
    use std::sync::atomic::Ordering;
    if s.node_errors.fetch_add(1, Ordering::Relaxed) == 0 {
        let what = match kind {
            CMD_READ => "read",
            CMD_WRITE => "write",
            CMD_FLUSH => "flush",
            CMD_TRIM => "discard",
            CMD_WRITE_ZEROES => "write zeroes",
            CMD_BLOCK_STATUS => "block status",
            _ => "request",
        };
        eprintln!(
            "rsd: NBD export '{}': {what} at offset {offset} failed: {}",
            s.export.name, e.msg
        );
    }
    e.nbd_error()
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
    // Only large reads are page-aligned: for a small one the extra page
    // (allocated and zeroed per read) costs more than the slower copy.
    let align = if len > ALIGN_READS_OVER {
        READ_ALIGN
    } else {
        1
    };
    let need = head.len() + len + align - 1;
    if b.len() < need {
        b.resize(need, 0);
    }
    // The data on the first aligned address after room for the header
    // (the vector does not move from here on).
    let base = b.as_ptr() as usize;
    let data = (base + head.len()).next_multiple_of(align) - base;
    let start = data - head.len();
    b[start..data].copy_from_slice(&head);
    match node.read(r.offset, &mut b[data..data + len]).await {
        Ok(()) => Reply {
            buf: b,
            start,
            len: head.len() + len,
            error: false,
        },
        Err(e) => error_reply(s, r.cookie, r.offset, node_failed(s, r.kind, r.offset, &e)),
    }
}

/// Extents per reply at most, to bound reply sizes.
const MAX_EXTENTS: usize = 1024;

/// A dirty bitmap's extents over `from..end`: alternating clean (0) and
/// dirty (NBD_STATE_DIRTY, 1) runs, at most MAX_EXTENTS (one with
/// REQ_ONE).
fn dirty_extents(
    bits: &crate::block::bitmap::DirtyBitmap,
    from: u64,
    end: u64,
    one: bool,
) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut pos = from;
    let push = |len: u64, flags: u32, out: &mut Vec<(u64, u32)>| {
        if len > 0 {
            out.push((len, flags));
        }
    };
    for (d, len) in bits.dirty_ranges(from, end - from) {
        let (ds, de) = (d.max(from), (d + len).min(end));
        if de <= ds {
            continue;
        }
        push(ds - pos, 0, &mut out);
        push(de - ds, 1, &mut out);
        pos = de;
    }
    push(end - pos, 0, &mut out);
    out.truncate(if one { 1 } else { MAX_EXTENTS });
    out
}

async fn block_status(s: &Session, node: &Node, r: &Request) -> Reply {
    if !s.structured || s.contexts.is_empty() || r.len == 0 {
        return error_reply(s, r.cookie, r.offset, EINVAL);
    }
    let one = r.flags & CMD_FLAG_REQ_ONE != 0;
    let end = r.offset + r.len;
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
    // The node's status, when a context reports it.
    let mut extents = Vec::new();
    let mut off = r.offset;
    while wanted.iter().any(|c| *c < CTX_BITMAP) && off < end && extents.len() < MAX_EXTENTS {
        match node.block_status(off, end - off).await {
            Ok(e) => {
                extents.push(e);
                off += e.len;
            }
            Err(e) => {
                return error_reply(s, r.cookie, r.offset, node_failed(s, r.kind, r.offset, &e))
            }
        }
        if one {
            break;
        }
    }
    // (length, flags) per context.
    let per_ctx: Vec<Vec<(u64, u32)>> = wanted
        .iter()
        .map(|ctx| match *ctx {
            CTX_BASE => extents
                .iter()
                .map(|e| {
                    let f = (if e.data { 0 } else { STATE_HOLE })
                        | (if e.zero { STATE_ZERO } else { 0 });
                    (e.len, f)
                })
                .collect(),
            CTX_DEPTH => extents.iter().map(|e| (e.len, e.depth)).collect(),
            id => s
                .export
                .bitmaps
                .get((id - CTX_BITMAP) as usize)
                .map(|b| dirty_extents(&b.bits, r.offset, end, one))
                .unwrap_or_default(),
        })
        .collect();
    let mut b = Vec::new();
    for (i, (ctx, extents)) in wanted.iter().zip(&per_ctx).enumerate() {
        let last = i + 1 == wanted.len();
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
            for (len, flags) in extents {
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&u64::from(*flags).to_be_bytes());
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
            for (len, flags) in extents {
                b.extend_from_slice(&((*len).min(u32::MAX as u64) as u32).to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
            }
        }
    }
    b.into()
}
