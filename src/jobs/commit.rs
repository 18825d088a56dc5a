//! The intermediate commit job (block-commit with a top below the
//! active layer): copies what the layers from `top` down to above `base`
//! hold into the base. The guest writes to the active layer above, so
//! nothing it does touches these layers meanwhile. The control actor
//! then points the top's overlay at the base. An active commit (the top
//! is the active layer) is a mirror into the base instead.
use std::sync::Arc;

use super::pace::Pace;
use super::{ErrorAction, JobFuture, OnError, Shared, Start};
use crate::block::driver::{WriteFlags, ZeroFlags};
use crate::block::error::BlockError;
use crate::block::node::Node;

/// QEMU's COMMIT_BUFFER_SIZE.
const CHUNK: u64 = 512 << 10;

pub struct Commit {
    pub top: Arc<Node>,
    pub base: Arc<Node>,
    /// The base's depth below the top as block status counts it (the
    /// top is 1).
    pub base_depth: u32,
    pub on_error: OnError,
}

pub fn start(c: Commit) -> Start {
    Box::new(move |sh: Arc<Shared>| {
        Box::pin(async move {
            let rest: JobFuture = Box::pin(run(sh, c));
            Ok(rest)
        })
    })
}

fn strerror(e: &BlockError) -> String {
    crate::util::os_msg(&std::io::Error::from_raw_os_error(e.errno))
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
                let mut buf = vec![0u8; n as usize];
                self.top
                    .read(pos, &mut buf)
                    .await
                    .map_err(|e| ("read", e))?;
                let w = if buf.iter().all(|b| *b == 0) {
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
    sh.set_progress(0, size);
    let mut pace = Pace::new(CHUNK);
    let mut off = 0;
    while off < size {
        let verb = sh.verb_arrived();
        tokio::pin!(verb);
        sh.pause_point().await?;
        sh.crash_point();
        if let Some(d) = pace.delay(sh.speed()) {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = &mut verb => {}
            }
            continue;
        }
        let len = CHUNK.min(size - off);
        sh.set_busy(true);
        match c.copy(off, len).await {
            Ok(copied) => {
                pace.account(copied);
                off += len;
                sh.set_progress(off, size);
            }
            Err((op, e)) => match sh.io_error(op, c.on_error, e.errno) {
                ErrorAction::Report => return Err(strerror(&e)),
                ErrorAction::Ignore => off += len,
                ErrorAction::Stop => {}
            },
        }
        sh.set_busy(false);
    }
    c.base.flush().await.map_err(|e| strerror(&e))
}
