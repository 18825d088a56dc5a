//! The mirror job (blockdev-mirror, drive-mirror; active commit uses it
//! too): copies a source node to a target while the guest writes, then
//! switches the guest over.
//!
//! Guest writes reach the source through the `mirror_top` filter; a hook
//! on the source marks what they wrote in a dirty bitmap. The job copies
//! dirty runs (up to `buf_size` bytes in flight, at `speed` bytes per
//! second) until nothing is dirty: then it is READY and keeps copying
//! what the guest writes. On job-complete (or a soft cancel) it stops
//! the guest's I/O at the filter's edge, copies what is left, flushes
//! the target and, for a complete, re-points the filter's edge at the
//! target, so the guest's next request already goes there. The graph
//! (moving the filter's parents onto the target, dropping the filter)
//! is tidied by the control actor when the job ends.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::pace::Pace;
use super::{ErrorAction, JobFuture, OnError, Shared, Start, Status, CANCELED};
use crate::block::bitmap::DirtyBitmap;
use crate::block::buffers::{all_zero, Buffers};
use crate::block::driver::{WriteFlags, ZeroFlags};
use crate::block::error::BlockError;
use crate::block::hooks::{Hook, Request, Stage};
use crate::block::mirror_top::MirrorTop;
use crate::block::node::Node;

/// The largest run copied by one request (QEMU's MAX_IO_BYTES).
const MAX_CHUNK: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Everything the source reads as.
    Full,
    /// What the source's top layer holds (the target has its backing).
    Top,
    /// Only what the guest writes from now on.
    None,
    /// What the chain holds above the layer at this depth (1 is the
    /// source itself): active commit's copy into its base.
    Above(u32),
}

pub struct Mirror {
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    pub filter: MirrorTop,
    pub sync: SyncMode,
    pub granularity: u64,
    pub buf_size: u64,
    /// Zeroes in the source may be unmapped in the target.
    pub unmap: bool,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    /// The bitmap the source's dirty hook fills.
    pub dirty: Arc<DirtyBitmap>,
    /// The target reads as zeroes (just created): a full sync copies
    /// only what the source's chain holds.
    pub target_is_zero: bool,
}

/// Marks what the guest writes to the source.
pub struct DirtyHook {
    pub name: String,
    pub bitmap: Arc<DirtyBitmap>,
}

impl Hook for DirtyHook {
    fn name(&self) -> &str {
        &self.name
    }
    fn stage(&self) -> Stage {
        Stage::Observe
    }
    fn after(&self, req: &Request, _ok: bool) {
        // Failed writes too: their range may have changed in part.
        if req.op.changes() {
            self.bitmap.set(req.offset, req.len);
        }
    }
}

pub fn start(m: Mirror) -> Start {
    Box::new(move |sh: Arc<Shared>| {
        Box::pin(async move {
            let rest: JobFuture = Box::pin(run(sh, m));
            Ok(rest)
        })
    })
}

/// A failed copy: which side, and the error.
struct Failed {
    op: &'static str,
    err: BlockError,
}

type Copied = (u64, u64, Result<(), Failed>);

async fn copy(
    src: Arc<Node>,
    dst: Arc<Node>,
    bufs: Buffers,
    (off, len): (u64, u64),
    unmap: bool,
) -> Copied {
    let r = async {
        // A run the source knows reads as zeroes needs no read.
        let known_zero = src
            .block_status(off, len)
            .await
            .is_ok_and(|e| e.zero && !e.data && e.len >= len);
        if known_zero {
            let zf = ZeroFlags {
                fua: false,
                may_unmap: unmap,
                no_fallback: false,
            };
            return dst
                .write_zeroes(off, len, zf)
                .await
                .map_err(|err| Failed { op: "write", err });
        }
        let mut buf = bufs.take(len as usize);
        src.read(off, &mut buf)
            .await
            .map_err(|err| Failed { op: "read", err })?;
        let w = if all_zero(&buf) {
            let zf = ZeroFlags {
                fua: false,
                may_unmap: unmap,
                no_fallback: false,
            };
            dst.write_zeroes(off, len, zf).await
        } else {
            dst.write(off, &buf, WriteFlags::default()).await
        };
        w.map_err(|err| Failed { op: "write", err })
    }
    .await;
    (off, len, r)
}

use super::walk::strerror;

impl Mirror {
    /// Marks what the job must copy before it can be ready.
    async fn initial(&self) -> Result<(), String> {
        let size = self.source.size();
        let backed = self
            .source
            .driver
            .child_slot("backing")
            .and_then(|c| c.get())
            .is_some();
        match self.sync {
            SyncMode::None => {}
            SyncMode::Full | SyncMode::Top if !backed && !self.target_is_zero => {
                self.dirty.set(0, size)
            }
            SyncMode::Full if !self.target_is_zero => self.dirty.set(0, size),
            SyncMode::Full => self.mark_allocated(u32::MAX).await?,
            SyncMode::Top if !backed => self.mark_allocated(u32::MAX).await?,
            SyncMode::Top => self.mark_allocated(2).await?,
            SyncMode::Above(d) => self.mark_allocated(d).await?,
        }
        Ok(())
    }

    /// Marks what the layers above depth `below` hold (1 is the source).
    async fn mark_allocated(&self, below: u32) -> Result<(), String> {
        let size = self.source.size();
        let mut off = 0;
        while off < size {
            let e = self
                .source
                .block_status(off, size - off)
                .await
                .map_err(|e| strerror(&e))?;
            if e.depth >= 1 && e.depth < below {
                self.dirty.set(off, e.len);
            }
            off += e.len;
        }
        Ok(())
    }
}

async fn run(sh: Arc<Shared>, m: Mirror) -> Result<(), String> {
    if m.source.size() != m.target.size() {
        return Err("Source and target image have different sizes".into());
    }
    m.initial().await?;
    let size = m.source.size();
    let mut copies: JoinSet<Copied> = JoinSet::new();
    let mut in_flight = 0u64;
    let mut copied = 0u64;
    let mut cursor = 0u64;
    let mut pace = Pace::spread(m.buf_size, MAX_CHUNK);
    let bufs = Buffers::new(MAX_CHUNK as usize);
    let progress = |copied: u64, in_flight: u64| {
        let remaining = m.dirty.dirty_bytes().min(size) + in_flight;
        sh.set_progress(copied, copied + remaining);
    };
    progress(0, 0);
    loop {
        // Registered before anything is looked at, so no wake-up is lost.
        let dirtied = m.dirty.changed.notified();
        let verb = sh.verb_arrived();
        tokio::pin!(dirtied, verb);
        sh.pause_point().await?;
        sh.crash_point();
        while let Some(done) = copies.try_join_next() {
            let (off, len, r) = done.map_err(|e| format!("internal error: {e}"))?;
            in_flight -= len;
            match r {
                Ok(()) => copied += len,
                Err(f) => handle_error(&sh, &m, off, len, f)?,
            }
        }
        progress(copied, in_flight);
        let ready = matches!(sh.status(), Status::Ready | Status::Standby);
        if sh.should_finish() && ready {
            break;
        }
        let write_blocking = sh
            .block
            .as_ref()
            .is_some_and(|b| b.write_blocking.load(Ordering::Acquire));
        m.filter
            .set_active(write_blocking.then(|| m.target.clone()));
        let mut wait_for: Option<Duration> = None;
        if in_flight < m.buf_size {
            if let Some((off, len)) = m.dirty.next_run(cursor, MAX_CHUNK) {
                match pace.delay(sh.speed()) {
                    Some(d) => wait_for = Some(d),
                    None => {
                        let len = len.min(size.saturating_sub(off));
                        m.dirty.clear(off, len);
                        cursor = off + len;
                        pace.account(len);
                        in_flight += len;
                        sh.set_busy(true);
                        copies.spawn(copy(
                            m.source.clone(),
                            m.target.clone(),
                            bufs.clone(),
                            (off, len),
                            m.unmap,
                        ));
                        continue;
                    }
                }
            }
        }
        // Like QEMU, which sleeps off its rate limit before it looks
        // again, a paced job is not ready while it owes time.
        let owed = match wait_for {
            Some(_) => true,
            None => pace
                .owed(sh.speed())
                .inspect(|d| wait_for = Some(*d))
                .is_some(),
        };
        if copies.is_empty() && m.dirty.dirty_bytes() == 0 && !owed {
            sh.set_busy(false);
            if let Some(b) = &sh.block {
                b.actively_synced.store(write_blocking, Ordering::Release);
            }
            sh.set_ready();
            if sh.should_finish() {
                continue;
            }
        }
        let pause = async {
            match wait_for {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(done) = copies.join_next(), if !copies.is_empty() => {
                let (off, len, r) = done.map_err(|e| format!("internal error: {e}"))?;
                in_flight -= len;
                match r {
                    Ok(()) => copied += len,
                    Err(f) => handle_error(&sh, &m, off, len, f)?,
                }
            }
            _ = &mut dirtied => {}
            _ = &mut verb => {}
            _ = pause => {}
        }
    }
    // Finish: the copies in flight, then the rest with the guest held.
    while let Some(done) = copies.join_next().await {
        let (off, len, r) = done.map_err(|e| format!("internal error: {e}"))?;
        match r {
            Ok(()) => copied += len,
            Err(f) => {
                m.dirty.set(off, len);
                return Err(strerror(&f.err));
            }
        }
    }
    let edge = m.filter.edge();
    let held = edge.quiesce().await;
    while let Some((off, len)) = m.dirty.next_run(0, MAX_CHUNK) {
        if sh.cancelled() {
            return Err(CANCELED.into());
        }
        let len = len.min(size.saturating_sub(off));
        m.dirty.clear(off, len);
        let (_, _, r) = copy(
            m.source.clone(),
            m.target.clone(),
            bufs.clone(),
            (off, len),
            m.unmap,
        )
        .await;
        if let Err(f) = r {
            m.dirty.set(off, len);
            return Err(strerror(&f.err));
        }
        copied += len;
    }
    sh.set_progress(copied, copied);
    m.target.flush().await.map_err(|e| strerror(&e))?;
    m.filter.set_active(None);
    if sh.completing() {
        // The pivot of the data path: the guest's next request, held
        // at this edge until now, goes to the target.
        edge.set(Some(m.target.clone()));
    }
    drop(held);
    Ok(())
}

/// A failed copy under the job's error policy: report ends the job;
/// ignore and stop copy the run again later (stop after a resume).
fn handle_error(sh: &Shared, m: &Mirror, off: u64, len: u64, f: Failed) -> Result<(), String> {
    let policy = if f.op == "read" {
        m.on_source_error
    } else {
        m.on_target_error
    };
    m.dirty.set(off, len);
    match sh.io_error(f.op, policy, f.err.errno) {
        ErrorAction::Report => Err(strerror(&f.err)),
        ErrorAction::Ignore | ErrorAction::Stop => Ok(()),
    }
}
