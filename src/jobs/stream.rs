//! The stream job (block-stream): copies into the top image what its
//! backing chain holds above `base` (everything, without a base), so
//! the layers in between can go. The control actor then points the top
//! image at the base (header and graph) when the job succeeds.
//!
//! A guest write to the top may race with a copy of the same range: the
//! copy read the old backing data, the guest wrote new data, and the
//! copy's write would undo it. So guest writes pass a hook that enters
//! them in a range tracker, and each copy holds its range serialising
//! (no guest write in it) from the moment it checks that the range is
//! still not in the top until its write is done (QEMU's copy-on-read
//! filter with serialising requests does the same).
use std::sync::Arc;

use super::walk::strerror;
use super::{JobFuture, OnError, Shared, Start};
use crate::block::buffers::{all_zero, Buffers};
use crate::block::driver::{IoFuture, WriteFlags, ZeroFlags};
use crate::block::error::BlockError;
use crate::block::hooks::{Guard, Hook, Request, Stage};
use crate::block::node::Node;
use crate::block::serial::Tracker;

/// QEMU's STREAM_CHUNK.
pub const CHUNK: u64 = 512 << 10;

pub struct Stream {
    pub top: Arc<Node>,
    /// The base's depth in the chain as block status counts it (1 is
    /// the top); data there and below stays. None: stream everything.
    pub base_depth: Option<u32>,
    pub tracker: Arc<Tracker>,
    pub on_error: OnError,
    /// Its copy buffers (`Buffers::new(CHUNK)`).
    pub bufs: Buffers,
}

/// Enters guest writes to the top in the tracker.
pub struct GuestWrites {
    pub name: String,
    pub tracker: Arc<Tracker>,
}

impl Hook for GuestWrites {
    fn name(&self) -> &str {
        &self.name
    }
    fn stage(&self) -> Stage {
        Stage::Intercept
    }
    fn before<'a>(&'a self, req: &'a Request) -> Option<IoFuture<'a, Option<Guard>>> {
        if !req.op.changes() {
            return None;
        }
        Some(Box::pin(async move {
            let end = req.offset.saturating_add(req.len);
            let g = self.tracker.enter_owned(req.offset, end, false).await;
            Ok(Some(Box::new(g) as Guard))
        }))
    }
}

pub fn start(s: Stream) -> Start {
    Box::new(move |sh: Arc<Shared>| {
        Box::pin(async move {
            let rest: JobFuture = Box::pin(run(sh, s));
            Ok(rest)
        })
    })
}

impl Stream {
    /// Whether a range at this depth holds data to copy up.
    fn wanted(&self, depth: u32) -> bool {
        depth >= 2 && self.base_depth.is_none_or(|b| depth < b)
    }

    /// Copies what the chain holds at `off..off+len` into the top, one
    /// extent at a time; returns the bytes copied.
    async fn copy(&self, off: u64, len: u64) -> Result<u64, (&'static str, BlockError)> {
        let mut copied = 0;
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let e = self
                .top
                .block_status(pos, end - pos)
                .await
                .map_err(|e| ("read", e))?;
            let n = e.len.min(end - pos);
            if self.wanted(e.depth) {
                let _held = self.tracker.enter(pos, pos + n, true).await;
                // A guest write may have filled it meanwhile.
                let now = self
                    .top
                    .block_status(pos, n)
                    .await
                    .map_err(|e| ("read", e))?;
                let n = now.len.min(n);
                if self.wanted(now.depth) {
                    let mut buf = self.bufs.take(n as usize);
                    self.top
                        .read(pos, &mut buf)
                        .await
                        .map_err(|e| ("read", e))?;
                    // Past the hooks: the tracker already holds the range.
                    let w = if all_zero(&buf) {
                        self.top
                            .driver
                            .write_zeroes(pos, n, ZeroFlags::default())
                            .await
                    } else {
                        self.top
                            .driver
                            .write(pos, &buf, WriteFlags::default())
                            .await
                    };
                    w.map_err(|e| ("write", e))?;
                    copied += n;
                }
                pos += n;
                continue;
            }
            pos += n;
        }
        Ok(copied)
    }
}

async fn run(sh: Arc<Shared>, s: Stream) -> Result<(), String> {
    let size = s.top.size();
    super::walk::chunks(
        &sh,
        size,
        CHUNK,
        s.on_error,
        super::walk::Ignored::SkipThenFail,
        |off, len| s.copy(off, len),
    )
    .await?;
    s.top.flush().await.map_err(|e| strerror(&e))
}
