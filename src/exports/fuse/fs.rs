//! The file operations: how the export answers each request, as QSD does.
//! Reads and writes go to the node through the export's edge; a write
//! past the end fails unless the export is growable (one crossing the end
//! is cut short); truncate resizes the node through its actor; fallocate
//! allocates at the end, punches holes and zeroes ranges; SEEK_DATA and
//! SEEK_HOLE come from block status.
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::libc;

use super::abi::{self, Attr, Op, SetAttr};
use super::pool::Pool;
use super::{MAX_READ, MAX_WRITE};
use crate::block::child::Child;
use crate::block::driver::{WriteFlags, ZeroFlags};
use crate::block::error::BlockError;
use crate::exports::stats::{ExportStats, Op as ExportOp};

/// Reads up to this size get a buffer of their own; larger ones one
/// from the pool.
const SMALL: usize = 64 << 10;

/// The file's owner and mode, which chmod and chown change.
pub struct Attrs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The filesystem the kernel talks to.
pub struct Fs {
    pub edge: Arc<Child>,
    pub writable: bool,
    pub growable: bool,
    pub allow_other: bool,
    pub attrs: Mutex<Attrs>,
    pub pool: Arc<Pool>,
    pub stats: Arc<ExportStats>,
}

/// A write's data: `len` bytes at `at` in `buf` (the request as read,
/// or a copy of a small write's data).
pub struct WriteData {
    pub buf: Vec<u8>,
    pub at: usize,
    pub len: usize,
}

/// What goes back to the kernel for one request.
pub enum Reply {
    /// Nothing (FORGET and the like).
    None,
    /// Success with this body (possibly empty).
    Ok(Vec<u8>),
    /// Read data: the first `len` bytes of `buf`.
    Data { buf: Vec<u8>, len: usize },
    /// Failure with this errno.
    Err(i32),
}

type R<T> = Result<T, i32>;

fn errno(e: BlockError) -> i32 {
    if e.errno > 0 {
        e.errno
    } else {
        libc::EIO
    }
}

fn now() -> (u64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn done(r: R<()>) -> Reply {
    match r {
        Ok(()) => Reply::Ok(Vec::new()),
        Err(e) => Reply::Err(e),
    }
}

fn body(r: R<Vec<u8>>) -> Reply {
    match r {
        Ok(b) => Reply::Ok(b),
        Err(e) => Reply::Err(e),
    }
}

impl Fs {
    /// Answers one decoded request (INIT, DESTROY and write data are the
    /// session's).
    pub async fn serve(&self, op: Op, data: Option<WriteData>) -> Reply {
        let (kind, moved) = match &op {
            Op::NoReply | Op::Destroy | Op::Init { .. } => return self.answer(op, data).await,
            Op::Read { size, .. } => (ExportOp::Read, u64::from(*size)),
            Op::Write { .. } => (ExportOp::Write, data.as_ref().map_or(0, |d| d.len as u64)),
            Op::Fsync | Op::Flush => (ExportOp::Flush, 0),
            Op::Fallocate { mode, .. } if *mode as i32 & libc::FALLOC_FL_PUNCH_HOLE != 0 => {
                (ExportOp::Discard, 0)
            }
            Op::Fallocate { .. } => (ExportOp::WriteZeroes, 0),
            Op::Lseek { .. } => (ExportOp::BlockStatus, 0),
            _ => (ExportOp::Other, 0),
        };
        let reply = self.answer(op, data).await;
        let moved = match &reply {
            Reply::Data { len, .. } => *len as u64,
            _ => moved,
        };
        self.stats
            .request(kind, moved, !matches!(reply, Reply::Err(_)));
        reply
    }

    async fn answer(&self, op: Op, data: Option<WriteData>) -> Reply {
        match op {
            Op::Lookup => Reply::Err(libc::ENOENT),
            Op::GetAttr => body(self.stat().await),
            Op::SetAttr(set) => body(self.setattr(set).await),
            Op::Open => Reply::Ok(abi::open_out()),
            Op::Read { offset, size } => self.read(offset, size).await,
            Op::Write { offset, .. } => match data {
                Some(d) => {
                    let r = self.write(offset, &d.buf[d.at..d.at + d.len]).await;
                    self.pool.give(d.buf);
                    body(r.map(abi::write_out))
                }
                None => Reply::Err(libc::EINVAL),
            },
            Op::Statfs => Reply::Ok(abi::statfs_out()),
            Op::Release => Reply::Ok(Vec::new()),
            // close() flushes, as fsync and fdatasync do.
            Op::Fsync | Op::Flush => done(self.flush().await),
            Op::Fallocate {
                offset,
                length,
                mode,
            } => done(self.fallocate(offset, length, mode).await),
            Op::Lseek { offset, whence } => {
                body(self.lseek(offset, whence).await.map(abi::lseek_out))
            }
            Op::NoReply | Op::Destroy => Reply::None,
            Op::Init { .. } | Op::Unsupported => Reply::Err(libc::ENOSYS),
        }
    }

    async fn size(&self) -> R<u64> {
        let n = self.edge.enter().await.ok_or(libc::ENOMEDIUM)?;
        Ok(n.size())
    }

    fn attr(&self, size: u64, allocated: Option<u64>, blksize: u32) -> Vec<u8> {
        let (mode, uid, gid) = self
            .attrs
            .lock()
            .map(|a| (a.mode, a.uid, a.gid))
            .unwrap_or((libc::S_IFREG | libc::S_IRUSR, 0, 0));
        let blocks = match allocated {
            Some(a) if a > 0 => a.div_ceil(512),
            _ => size.div_ceil(512),
        };
        abi::attr_out(&Attr {
            size,
            blocks,
            time: now(),
            mode: libc::S_IFREG | (mode & 0o7777),
            uid,
            gid,
            blksize,
        })
    }

    async fn stat(&self) -> R<Vec<u8>> {
        let n = self.edge.enter().await.ok_or(libc::ENOMEDIUM)?;
        let blksize = n.limits().request_alignment.max(1) as u32;
        Ok(self.attr(n.size(), n.allocated_size(), blksize))
    }

    async fn setattr(&self, set: SetAttr) -> R<Vec<u8>> {
        // Only size, mode and (with allow_other) owner, as QEMU; the
        // kernel's own time updates are taken and ignored.
        if !self.allow_other && (set.uid.is_some() || set.gid.is_some()) {
            return Err(libc::ENOTSUP);
        }
        if let Some(mode) = set.mode {
            if !self.allow_other && mode & (libc::S_IRWXG | libc::S_IRWXO) != 0 {
                return Err(libc::EPERM);
            }
            if !self.writable && mode & (libc::S_IWUSR | libc::S_IWGRP | libc::S_IWOTH) != 0 {
                return Err(libc::EROFS);
            }
        }
        if let Some(size) = set.size {
            if !self.writable {
                return Err(libc::EACCES);
            }
            self.resize(size).await?;
        }
        if let Ok(mut a) = self.attrs.lock() {
            if let Some(mode) = set.mode {
                a.mode = (mode & 0o7777) | libc::S_IFREG;
            }
            if let Some(uid) = set.uid {
                a.uid = uid;
            }
            if let Some(gid) = set.gid {
                a.gid = gid;
            }
        }
        self.stat().await
    }

    /// Resizes the node through its actor (resizes of a node run one at
    /// a time there).
    async fn resize(&self, size: u64) -> R<()> {
        let Some(name) = self.edge.get().map(|n| n.name.clone()) else {
            return Err(libc::ENOMEDIUM);
        };
        match crate::block::actor::resize(&name, size).await {
            Ok(r) => r.map_err(errno),
            Err(_) => Err(libc::EIO),
        }
    }

    async fn read(&self, offset: u64, size: u32) -> Reply {
        if size > MAX_READ {
            return Reply::Err(libc::EINVAL);
        }
        let n = match self.edge.enter().await {
            Some(n) => n,
            None => return Reply::Err(libc::ENOMEDIUM),
        };
        // Short reads at the end, as a file gives them.
        let len = u64::from(size).min(n.size().saturating_sub(offset)) as usize;
        let mut buf = if len > SMALL && len <= self.pool.size() {
            self.pool.take()
        } else {
            vec![0u8; len]
        };
        if len > 0 {
            if let Err(e) = n.read(offset, &mut buf[..len]).await {
                self.pool.give(buf);
                return Reply::Err(errno(e));
            }
        }
        Reply::Data { buf, len }
    }

    async fn write(&self, offset: u64, data: &[u8]) -> R<u32> {
        if !self.writable {
            return Err(libc::EACCES);
        }
        if data.len() > MAX_WRITE as usize {
            return Err(libc::EINVAL);
        }
        let size = self.size().await?;
        let end = offset.saturating_add(data.len() as u64);
        let mut len = data.len() as u64;
        if end > size {
            if self.growable {
                self.resize(end).await?;
            } else {
                // Cut short at the end (nothing at all past it: EIO).
                len = size.saturating_sub(offset);
                if len == 0 {
                    return Err(libc::EIO);
                }
            }
        }
        let n = self.edge.enter().await.ok_or(libc::ENOMEDIUM)?;
        n.write(offset, &data[..len as usize], WriteFlags::default())
            .await
            .map_err(errno)?;
        Ok(len as u32)
    }

    async fn flush(&self) -> R<()> {
        let n = self.edge.enter().await.ok_or(libc::ENOMEDIUM)?;
        n.flush().await.map_err(errno)
    }

    async fn zero(&self, mut offset: u64, mut len: u64, flags: ZeroFlags) -> R<()> {
        let n = self.edge.enter().await.ok_or(libc::ENOMEDIUM)?;
        while len > 0 {
            let step = len.min(1 << 30);
            n.write_zeroes(offset, step, flags).await.map_err(|e| {
                if e.errno == libc::ENOTSUP {
                    libc::EOPNOTSUPP
                } else {
                    errno(e)
                }
            })?;
            offset += step;
            len -= step;
        }
        Ok(())
    }

    async fn fallocate(&self, offset: u64, length: u64, mode: u32) -> R<()> {
        if !self.writable {
            return Err(libc::EACCES);
        }
        let size = self.size().await?;
        let mode = mode as i32;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let length = if keep {
            length.min(size.saturating_sub(offset))
        } else {
            length
        };
        if mode == 0 {
            // Only at the end, by growing the node.
            if offset < size {
                return Err(libc::EOPNOTSUPP);
            }
            return self.resize(offset.saturating_add(length)).await;
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            if !keep {
                return Err(libc::EINVAL);
            }
            let flags = ZeroFlags {
                fua: false,
                may_unmap: true,
                no_fallback: true,
            };
            return self.zero(offset, length, flags).await;
        }
        if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            let end = offset.saturating_add(length);
            if !keep && end > size {
                self.resize(end).await?;
            }
            return self.zero(offset, length, ZeroFlags::default()).await;
        }
        Err(libc::EOPNOTSUPP)
    }

    async fn lseek(&self, offset: u64, whence: u32) -> R<u64> {
        let whence = whence as i32;
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Err(libc::EINVAL);
        }
        let n = self.edge.enter().await.ok_or(libc::ENOMEDIUM)?;
        let size = n.size();
        let mut at = offset;
        loop {
            if at >= size {
                // The end is a hole; there is no data past it.
                return if at > size || whence == libc::SEEK_DATA {
                    Err(libc::ENXIO)
                } else {
                    Ok(at)
                };
            }
            let e = n.block_status(at, size - at).await.map_err(errno)?;
            if e.data == (whence == libc::SEEK_DATA) {
                return Ok(at);
            }
            at += e.len.max(1);
        }
    }
}
