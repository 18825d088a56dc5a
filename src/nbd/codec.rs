//! The NBD transmission codec: request headers and payloads in, simple
//! and structured (or extended) replies out. Pure framing: no I/O on
//! nodes, so it is unit-tested on bytes.
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::handshake::Session;
use super::proto::*;

/// A reply: the first `len` bytes of `buf` (a read reuses a pooled
/// buffer that may be longer, so it is never zeroed again).
pub(super) struct Reply {
    pub(super) buf: Vec<u8>,
    /// Where the reply starts in `buf` (a read's data is page-aligned,
    /// its header just before it).
    pub(super) start: usize,
    pub(super) len: usize,
    /// An error reply (counted as such on the export).
    pub(super) error: bool,
}

impl From<Vec<u8>> for Reply {
    fn from(buf: Vec<u8>) -> Reply {
        let len = buf.len();
        Reply {
            buf,
            start: 0,
            len,
            error: false,
        }
    }
}

impl Reply {
    pub(super) fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// A read's data starts on a page boundary in its reply buffer: the
/// kernel copies into memory 16 bytes into a cache line (where malloc
/// puts a large block) at a third of the speed (see block::buffers).
pub(super) const READ_ALIGN: usize = 4096;
/// Reads longer than this are aligned (and their buffers pooled).
pub(super) const ALIGN_READS_OVER: usize = 64 << 10;

/// Read buffers kept per connection for reuse.
#[derive(Clone, Default)]
pub(super) struct BufPool(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl BufPool {
    pub(super) fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default()
    }
    pub(super) fn give(&self, b: Vec<u8>) {
        if b.len() > ALIGN_READS_OVER && b.len() <= MAX_PAYLOAD as usize + READ_ALIGN + 64 {
            if let Ok(mut p) = self.0.lock() {
                if p.len() < 16 {
                    p.push(b);
                }
            }
        }
    }
}

pub(super) struct Request {
    pub(super) flags: u16,
    pub(super) kind: u16,
    pub(super) cookie: u64,
    pub(super) offset: u64,
    pub(super) len: u64,
    /// A WRITE's data is `payload[payload_start..]`.
    pub(super) payload: Vec<u8>,
    pub(super) payload_start: usize,
    /// A pooled buffer for a READ's reply.
    pub(super) buf: Vec<u8>,
    /// BLOCK_STATUS with a payload: the contexts asked for (None = all).
    pub(super) contexts: Option<Vec<u32>>,
    /// The request's payload was malformed (answered with EINVAL).
    pub(super) invalid: bool,
    /// Its share of the connection's data budget (see `data_budget`),
    /// held until its reply is written.
    pub(super) held: Option<OwnedSemaphorePermit>,
}

/// The data one connection's requests may hold at once, write payloads
/// and read replies together: 64 MiB, two requests of the largest size.
/// Without it a client that pipelines 32 MiB reads and never reads the
/// replies made rsd hold 64 of them (2 GiB) per connection.
pub(super) const DATA_BUDGET: u64 = 2 * MAX_PAYLOAD as u64;
/// The budget's unit (a semaphore permit): 1 KiB.
const BUDGET_UNIT: u64 = 1 << 10;

/// A connection's data budget, in units.
pub(super) fn data_budget() -> Arc<Semaphore> {
    Arc::new(Semaphore::new((DATA_BUDGET / BUDGET_UNIT) as usize))
}

/// The data a request holds while it runs: a write's payload or a
/// read's reply (requests too large to run hold nothing).
fn held_units(kind: u16, len: u64) -> u32 {
    let bytes = match kind {
        CMD_READ | CMD_WRITE if len <= MAX_PAYLOAD as u64 => len,
        _ => 0,
    };
    (bytes.div_ceil(BUDGET_UNIT)) as u32
}

/// Reads and drops `len` bytes of a payload rsd will refuse.
pub(super) async fn drain(rd: &mut (impl AsyncRead + Unpin), len: u64) -> std::io::Result<()> {
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
pub(super) fn header_len(extended: bool) -> usize {
    if extended {
        32
    } else {
        28
    }
}

/// A request header's fields.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) flags: u16,
    pub(super) kind: u16,
    pub(super) cookie: u64,
    pub(super) offset: u64,
    pub(super) len: u64,
}

/// Parses a compact (28-byte) or extended (32-byte) request header.
pub(super) fn parse_header(h: &[u8], extended: bool) -> std::io::Result<Header> {
    if h.len() < header_len(extended) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let be32 = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let be64 = |i: usize| u64::from_be_bytes(h[i..i + 8].try_into().unwrap_or_default());
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if be32(0) != magic {
        return Err(std::io::Error::other("bad request magic"));
    }
    Ok(Header {
        flags: u16::from_be_bytes([h[4], h[5]]),
        kind: u16::from_be_bytes([h[6], h[7]]),
        cookie: be64(8),
        offset: be64(16),
        len: if extended {
            be64(24)
        } else {
            u64::from(be32(24))
        },
    })
}

/// Ok(None) on EOF; Err on a bad magic or a broken stream.
pub(super) async fn read_request(
    rd: &mut (impl AsyncRead + Unpin),
    extended: bool,
    pool: &BufPool,
    budget: &Arc<Semaphore>,
) -> std::io::Result<Option<Request>> {
    let mut h = [0u8; 32];
    let h = &mut h[..header_len(extended)];
    match rd.read_exact(h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let Header {
        flags,
        kind,
        cookie,
        offset,
        len,
    } = parse_header(h, extended)?;
    // Waits, before reading a payload or running a read, until the
    // requests before it leave room.
    let held = match held_units(kind, len) {
        0 => None,
        n => Some(
            budget
                .clone()
                .acquire_many_owned(n)
                .await
                .map_err(std::io::Error::other)?,
        ),
    };
    let mut payload = Vec::new();
    let mut payload_start = 0;
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
            // payloads reuse pooled buffers (no page faults per request)
            // and start on a page boundary (as read replies do), behind
            // `payload_start` bytes of padding.
            if len as usize > ALIGN_READS_OVER {
                payload = pool.take();
                payload.clear();
                payload.reserve_exact(len as usize + READ_ALIGN);
                // The vector does not move from here on (it stays within
                // its capacity).
                payload_start = payload.as_ptr().align_offset(READ_ALIGN).min(READ_ALIGN);
                payload.resize(payload_start, 0);
            }
            let end = payload_start + len as usize;
            payload.reserve_exact(end - payload.len());
            while payload.len() < end {
                let want = (end - payload.len()) as u64;
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
        payload_start,
        buf: Vec::new(),
        contexts,
        invalid,
        held,
    }))
}

pub(super) fn simple_reply(cookie: u64, error: u32, data_len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data_len);
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header, or an extended one (which also
/// carries the request's offset and a 64-bit payload length).
pub(super) fn chunk_header(
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

pub(super) fn error_reply(s: &Session, cookie: u64, offset: u64, error: u32) -> Reply {
    let mut r: Reply = error_bytes(s, cookie, offset, error).into();
    r.error = true;
    r
}

fn error_bytes(s: &Session, cookie: u64, offset: u64, error: u32) -> Vec<u8> {
    if !s.structured {
        return simple_reply(cookie, error, 0);
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
    b
}

pub(super) fn ok_reply(s: &Session, cookie: u64, offset: u64) -> Reply {
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
pub(super) fn allowed_flags(kind: u16, s: &Session) -> u16 {
    match kind {
        CMD_READ if s.structured => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS if s.extended => CMD_FLAG_REQ_ONE | CMD_FLAG_PAYLOAD_LEN,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: u32, flags: u16, kind: u16, cookie: u64, offset: u64, len: &[u8]) -> Vec<u8> {
        let mut h = magic.to_be_bytes().to_vec();
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(len);
        h
    }

    #[test]
    fn request_headers_compact_and_extended() {
        let compact = header(REQUEST_MAGIC, 1, CMD_WRITE, 7, 4096, &512u32.to_be_bytes());
        let want = Header {
            flags: 1,
            kind: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            len: 512,
        };
        assert_eq!(parse_header(&compact, false).expect("compact"), want);
        // The same header is no extended one (wrong magic, too short).
        assert!(parse_header(&compact, true).is_err());
        let ext = header(
            EXTENDED_REQUEST_MAGIC,
            0,
            CMD_READ,
            9,
            1 << 40,
            &(5u64 << 32).to_be_bytes(),
        );
        let h = parse_header(&ext, true).expect("extended");
        assert_eq!(
            (h.kind, h.cookie, h.offset, h.len),
            (CMD_READ, 9, 1 << 40, 5 << 32)
        );
        assert!(
            parse_header(&ext[..28], false).is_err(),
            "magic of the other form"
        );
        assert!(parse_header(&compact[..20], false).is_err(), "short");
    }

    #[tokio::test]
    async fn write_payloads_start_on_a_page_and_keep_their_bytes() {
        let pool = BufPool::default();
        let budget = data_budget();
        for len in [512usize, (64 << 10) + 1, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut wire = header(
                REQUEST_MAGIC,
                0,
                CMD_WRITE,
                3,
                0,
                &(len as u32).to_be_bytes(),
            );
            wire.extend_from_slice(&data);
            // Twice: the second payload reuses the first one's buffer.
            for _ in 0..2 {
                let mut rd = &wire[..];
                let r = read_request(&mut rd, false, &pool, &budget)
                    .await
                    .expect("read")
                    .expect("a request");
                let got = &r.payload[r.payload_start..];
                assert_eq!(got, &data[..], "len {len}");
                if len > ALIGN_READS_OVER {
                    assert_eq!(got.as_ptr() as usize % READ_ALIGN, 0, "len {len}");
                }
                pool.give(r.payload);
            }
        }
    }

    #[test]
    fn simple_reply_layout() {
        let b = simple_reply(5, 22, 0);
        assert_eq!(&b[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&b[4..8], &22u32.to_be_bytes());
        assert_eq!(&b[8..16], &5u64.to_be_bytes());
        assert_eq!(b.len(), 16);
    }
}
