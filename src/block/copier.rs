//! Block copy (QEMU's block-copy): keeps a point-in-time view of a
//! source node in a target node. A bitmap marks the clusters whose old
//! contents are not yet in the target; copy-before-write copies a
//! cluster before a write changes it; a background copier (the backup
//! job) copies the rest. The backup job's hook and the
//! `copy-before-write` filter share it, and `snapshot-access` reads the
//! point-in-time view through it.
//!
//! Every copy enters its clusters in a range tracker as a serialising
//! request and checks the bitmap inside, so a cluster is copied once and
//! never after a guest write changed it. Readers of the view enter as
//! plain requests: a copy (and so the guest write behind it) waits for
//! them, so what they read from the source is still the old contents.
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use super::bitmap::DirtyBitmap;
use super::buffers::{all_zero, Buffers};
use super::driver::{WriteFlags, ZeroFlags};
use super::error::{BlockError, BlockResult};
use super::node::Node;
use super::serial::Tracker;

/// The largest copy in one request when nothing else limits it.
pub const DEFAULT_CHUNK: u64 = 1 << 20;

pub struct Copier {
    pub source: Weak<Node>,
    pub target: Arc<Node>,
    /// Clusters whose old contents are not yet in the target.
    pub todo: Arc<DirtyBitmap>,
    /// Clusters the view no longer holds (snapshot-access discarded them).
    pub gone: DirtyBitmap,
    pub tracker: Arc<Tracker>,
    /// Bytes copied, by copy-before-write and the background.
    pub done: AtomicU64,
    /// Woken after each copy (a job showing its progress).
    pub copied: tokio::sync::Notify,
    /// Largest copy request.
    pub chunk: u64,
    /// Discard a cluster in the source once it is copied (backup's
    /// discard-source).
    pub discard_source: bool,
    /// Write the copied data as compressed clusters (backup's `compress`;
    /// runs known to be zero are still written as zeroes, as in QEMU).
    pub compress: bool,
    /// The view is no longer whole (a copy failed and the filter let the
    /// guest write through): its errno, 0 while whole.
    broken: AtomicI32,
    bufs: Buffers,
}

impl Copier {
    /// A copier over the whole source with nothing marked to copy yet.
    pub fn new(source: &Arc<Node>, target: Arc<Node>, cluster: u64, chunk: u64) -> Copier {
        let size = source.size();
        Copier {
            source: Arc::downgrade(source),
            target,
            todo: Arc::new(DirtyBitmap::new(size, cluster)),
            gone: DirtyBitmap::new(size, cluster),
            tracker: Arc::new(Tracker::default()),
            done: AtomicU64::new(0),
            copied: tokio::sync::Notify::new(),
            chunk: chunk.max(cluster),
            discard_source: false,
            compress: false,
            broken: AtomicI32::new(0),
            bufs: Buffers::new(chunk.max(cluster) as usize),
        }
    }

    pub fn cluster(&self) -> u64 {
        self.todo.granularity()
    }

    /// The cluster-aligned range around `off..off+len`.
    pub fn aligned(&self, off: u64, len: u64) -> (u64, u64) {
        let g = self.cluster();
        (off / g * g, off.saturating_add(len).div_ceil(g) * g)
    }

    /// Copies the clusters of `off..end` still to copy; the caller holds
    /// the range in the tracker as a serialising request.
    pub async fn copy(&self, off: u64, end: u64) -> Result<(), (&'static str, BlockError)> {
        let Some(src) = self.source.upgrade() else {
            return Ok(());
        };
        let mut pos = off;
        while pos < end {
            let Some((run, len)) = self.todo.next_run(pos, self.chunk) else {
                return Ok(());
            };
            if run < pos || run >= end {
                return Ok(());
            }
            let len = len.min(end - run).min(src.size().saturating_sub(run));
            if len == 0 {
                return Ok(());
            }
            // A run the source knows reads as zeroes is written as zeroes
            // without a read (whole granules only: the rest of a granule
            // must still be read), as QEMU's block-copy does.
            let g = self.todo.granularity();
            let zero = src
                .block_status(run, len)
                .await
                .ok()
                .filter(|e| e.zero && !e.data)
                .map(|e| e.len.min(len) / g * g)
                .filter(|z| *z > 0);
            if let Some(z) = zero {
                self.target
                    .write_zeroes(run, z, ZeroFlags::default())
                    .await
                    .map_err(|e| ("write", e))?;
                self.todo.clear(run, z);
                self.done.fetch_add(z, Ordering::Relaxed);
                self.copied.notify_waiters();
                pos = run + z;
                continue;
            }
            let mut buf = self.bufs.take(len as usize);
            src.read(run, &mut buf).await.map_err(|e| ("read", e))?;
            let w = if all_zero(&buf) {
                self.target
                    .write_zeroes(run, len, ZeroFlags::default())
                    .await
            } else {
                let flags = WriteFlags {
                    compressed: self.compress,
                    ..Default::default()
                };
                self.target.write(run, &buf, flags).await
            };
            w.map_err(|e| ("write", e))?;
            self.todo.clear(run, len);
            self.done.fetch_add(len, Ordering::Relaxed);
            self.copied.notify_waiters();
            if self.discard_source {
                // Only an optimisation: the cluster is safe in the target.
                let _ = src.discard(run, len).await;
            }
            pos = run + len;
        }
        Ok(())
    }

    /// Copy-before-write for a request about to change `off..off+len`
    /// of the source: returns once the old contents are in the target.
    pub async fn before_write(&self, off: u64, len: u64) -> BlockResult<()> {
        // Nothing left to copy there (the common case once a cluster was
        // written, and the copier's own discard-source).
        if !self.todo.any_set(off, len) {
            return Ok(());
        }
        let (start, end) = self.aligned(off, len);
        let _held = self.tracker.enter_owned(start, end, true).await;
        self.copy(start, end).await.map_err(|(_, e)| e)
    }

    /// The view loses its guarantee (break-snapshot): its reads fail from
    /// now on.
    pub fn break_view(&self, errno: i32) {
        let _ = self
            .broken
            .compare_exchange(0, errno.max(1), Ordering::AcqRel, Ordering::Acquire);
    }

    fn check_view(&self) -> BlockResult<()> {
        match self.broken.load(Ordering::Acquire) {
            0 => Ok(()),
            _ => Err(BlockError::new(nix::libc::EACCES, "Permission denied")),
        }
    }

    /// Reads the point-in-time view: a cluster not copied yet from the
    /// source, a copied one from the target.
    pub async fn read_view(&self, off: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.check_view()?;
        let Some(src) = self.source.upgrade() else {
            return Err(BlockError::new(nix::libc::ENOMEDIUM, "No medium found"));
        };
        let len = buf.len() as u64;
        let (start, end) = self.aligned(off, len);
        let _held = self.tracker.enter_owned(start, end, false).await;
        let g = self.cluster();
        let mut pos = off;
        while pos < off + len {
            let in_source = self.todo.is_set(pos);
            if self.gone.is_set(pos) {
                return Err(BlockError::new(nix::libc::EACCES, "Permission denied"));
            }
            // A run of clusters on the same side.
            let mut next = (pos / g + 1) * g;
            while next < off + len && self.todo.is_set(next) == in_source && !self.gone.is_set(next)
            {
                next += g;
            }
            let next = next.min(off + len);
            let part = &mut buf[(pos - off) as usize..(next - off) as usize];
            if in_source {
                src.read(pos, part).await?;
            } else {
                self.target.read(pos, part).await?;
            }
            pos = next;
        }
        self.check_view()
    }

    /// How much of `off..off+len` the view can still read from `off` on
    /// (block status of the view); fails where it cannot.
    pub fn view_extent(&self, off: u64, len: u64) -> BlockResult<u64> {
        self.check_view()?;
        if self.gone.is_set(off) {
            return Err(BlockError::new(nix::libc::EACCES, "Permission denied"));
        }
        let g = self.cluster();
        let end = off.saturating_add(len);
        let mut next = (off / g + 1) * g;
        while next < end && !self.gone.is_set(next) {
            next += g;
        }
        Ok(next.min(end) - off)
    }

    /// The view no longer needs the clusters wholly inside
    /// `off..off+len`: they are not copied any more and the target may
    /// drop them.
    pub async fn discard_view(&self, off: u64, len: u64) -> BlockResult<()> {
        let g = self.cluster();
        let start = off.div_ceil(g) * g;
        let end = off.saturating_add(len) / g * g;
        if start >= end {
            return Ok(());
        }
        let _held = self.tracker.enter_owned(start, end, true).await;
        self.gone.set(start, end - start);
        self.todo.clear(start, end - start);
        let end = end.min(self.target.size());
        if start < end {
            let _ = self.target.discard(start, end - start).await;
        }
        Ok(())
    }

    /// The dirty bitmaps QEMU shows on a copy-before-write node, newest
    /// first: what the view can still read, what was copied, and what
    /// is left to copy.
    pub fn bitmaps_info(&self, size: u64) -> Vec<serde_json::Value> {
        let g = self.cluster();
        let info = |count: u64| {
            serde_json::json!({"recording": false, "persistent": false, "busy": false,
                "granularity": g, "count": count})
        };
        let whole = size.div_ceil(g) * g;
        vec![
            info(whole.saturating_sub(self.gone.dirty_bytes())),
            info(self.done.load(Ordering::Relaxed)),
            info(self.todo.dirty_bytes()),
        ]
    }
}
