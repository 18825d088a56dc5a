//! The intermediate commit job (block-commit with a top below the
//! active layer): copies what the layers from `top` down to above `base`
//! hold into the base. The guest writes to the active layer above, so
//! nothing it does touches these layers meanwhile. The control actor
//! then points the top's overlay at the base. An active commit (the top
//! is the active layer) is a mirror into the base instead.
use std::sync::Arc;

use super::walk::strerror;
use super::{JobFuture, OnError, Shared, Start};
use crate::block::buffers::{all_zero, Buffers};
use crate::block::driver::{WriteFlags, ZeroFlags};
use crate::block::error::BlockError;
use crate::block::node::Node;

/// QEMU's COMMIT_BUFFER_SIZE.
pub const CHUNK: u64 = 512 << 10;

pub struct Commit {
    pub top: Arc<Node>,
    pub base: Arc<Node>,
    /// The base's depth below the top as block status counts it (the
    /// top is 1).
    pub base_depth: u32,
    pub on_error: OnError,
    /// Its copy buffers (`Buffers::new(CHUNK)`).
    pub bufs: Buffers,
}

pub fn start(c: Commit) -> Start {
    Box::new(move |sh: Arc<Shared>| {
        Box::pin(async move {
            let rest: JobFuture = Box::pin(run(sh, c));
            Ok(rest)
        })
    })
}

impl Commit {
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
            if e.depth >= 1 && e.depth < self.base_depth {
                let mut buf = self.bufs.take(n as usize);
                self.top
                    .read(pos, &mut buf)
                    .await
                    .map_err(|e| ("read", e))?;
                let w = if all_zero(&buf) {
                    self.base.write_zeroes(pos, n, ZeroFlags::default()).await
                } else {
                    self.base.write(pos, &buf, WriteFlags::default()).await
                };
                w.map_err(|e| ("write", e))?;
                copied += n;
            }
            pos += n;
        }
        Ok(copied)
    }
}

async fn run(sh: Arc<Shared>, c: Commit) -> Result<(), String> {
    let size = c.top.size();
    super::walk::chunks(
        &sh,
        size,
        CHUNK,
        c.on_error,
        super::walk::Ignored::Retry,
        |off, len| c.copy(off, len),
    )
    .await?;
    c.base.flush().await.map_err(|e| strerror(&e))
}
