//! Write-back of the metadata caches, in dependency order, and the
//! bookkeeping of allocations in flight.
//!
//! Order: dirty refcount blocks are written first; then, before any
//! dirty L2 table, a sync if refcounts (or refcount table entries) were
//! written since the last one, or data that the tables will point at
//! (copy-on-write content, reused clusters) is not yet stable. With lazy
//! refcounts the dirty bit is set (and synced) instead of the refcount
//! sync, and cleared again on close. A crash anywhere leaves every L2
//! entry on disk pointing at a cluster whose refcount is on disk too.
use std::sync::atomic::Ordering;

use super::refcount::Refcounts;
use super::{header, Image};
use crate::block::driver::WriteFlags;
use crate::block::error::BlockResult;

impl Image {
    /// Syncs the file (and the data file first): everything written
    /// before is stable.
    pub(super) async fn sync(&self, meta: &mut Refcounts) -> BlockResult<()> {
        if self.external {
            self.data.flush().await?;
        }
        self.file.flush().await?;
        meta.unsynced = false;
        meta.data_unsynced = false;
        Ok(())
    }

    /// Sets or clears the dirty bit in the header (lazy refcounts), and
    /// makes it stable.
    async fn set_dirty_bit(&self, meta: &mut Refcounts, on: bool) -> BlockResult<()> {
        let bits = match self.header.lock() {
            Ok(mut h) => {
                if on {
                    h.incompatible |= header::INCOMPAT_DIRTY;
                } else {
                    h.incompatible &= !header::INCOMPAT_DIRTY;
                }
                h.incompatible
            }
            Err(_) => return Ok(()),
        };
        if on {
            // Whatever the tables will point at is stable with the bit.
            meta.write_dirty().await?;
        }
        self.file
            .write(
                header::OFF_INCOMPAT,
                &bits.to_be_bytes(),
                WriteFlags::default(),
            )
            .await?;
        self.sync(meta).await?;
        meta.dirty_bit = on;
        Ok(())
    }

    /// Writes every dirty refcount block and L2 table, in order. Nothing
    /// is synced after the L2 tables: a flush does that.
    pub(super) async fn writeback(&self, meta: &mut Refcounts) -> BlockResult<()> {
        let tables = self.cache.dirty();
        if tables.is_empty() {
            return meta.write_dirty().await;
        }
        if self.lazy && !meta.dirty_bit {
            self.set_dirty_bit(meta, true).await?;
        }
        meta.write_dirty().await?;
        if meta.data_unsynced || (meta.unsynced && !self.lazy) {
            self.sync(meta).await?;
        }
        for (off, t) in tables {
            self.file
                .write(off, &t.to_bytes(), WriteFlags::default())
                .await?;
            self.cache.set_clean(off, &t);
        }
        Ok(())
    }

    /// After a change under the metadata lock: an L2 cache over its size
    /// (every table in it dirty) is written back and trimmed.
    pub(super) async fn after_change(&self, meta: &mut Refcounts) -> BlockResult<()> {
        if self.cache.over() {
            self.writeback(meta).await?;
            self.cache.trim();
        }
        Ok(())
    }

    pub(super) fn writable(&self) -> bool {
        !self.read_only.load(Ordering::Acquire) && !self.corrupt.load(Ordering::Acquire)
    }

    /// Flush: metadata written back, then everything synced.
    pub(super) async fn flush_all(&self) -> BlockResult<()> {
        let mut gen = self.meta_gen.load(Ordering::Acquire);
        if self.writable() {
            let mut meta = self.meta.lock().await;
            gen = self.meta_gen.load(Ordering::Acquire);
            self.writeback(&mut meta).await?;
        }
        if self.external {
            self.data.flush().await?;
        }
        self.file.flush().await?;
        self.synced_gen.fetch_max(gen, Ordering::AcqRel);
        Ok(())
    }

    /// Close (or a switch to read-only): everything written back and
    /// synced, and the dirty bit cleared (QEMU's qcow2_inactivate).
    pub(super) async fn close_image(&self) -> BlockResult<()> {
        if !self.writable() {
            return Ok(());
        }
        let mut meta = self.meta.lock().await;
        self.writeback(&mut meta).await?;
        self.sync(&mut meta).await?;
        if meta.dirty_bit {
            self.set_dirty_bit(&mut meta, false).await?;
        }
        let end = meta.end << self.bits;
        if self.grown.swap(false, Ordering::AcqRel) && self.file.size() > end {
            self.file.truncate(end).await?;
        }
        Ok(())
    }

    /// Something may still need writing back (no waiting: for Drop).
    pub(super) fn maybe_dirty(&self) -> bool {
        if !self.writable() {
            return false;
        }
        if self.cache.has_dirty() {
            return true;
        }
        match self.meta.try_lock() {
            Ok(m) => m.has_dirty() || m.dirty_bit,
            Err(_) => true,
        }
    }

    /// The cache-clean-interval tick: dirty metadata written back, then
    /// what nobody used since the last tick dropped.
    pub(super) async fn clean_tick(&self) {
        let mut meta = self.meta.lock().await;
        if self.writable() && self.writeback(&mut meta).await.is_err() {
            // Left dirty; the next flush reports the error.
            return;
        }
        self.cache.clean_unused();
        meta.clean_unused();
    }

    /// A future that resolves once some allocation in flight is linked
    /// (or given up); take it before looking at `inflight`.
    pub(super) fn alloc_done(&self) -> tokio::sync::futures::Notified<'_> {
        self.alloc_done.notified()
    }

    /// An allocation of guest cluster `ci` is in flight.
    pub(super) fn in_flight(&self, ci: u64) -> bool {
        self.inflight.lock().is_ok_and(|s| s.contains(&ci))
    }

    /// Some allocation in flight touches guest clusters `first..=last`.
    pub(super) fn in_flight_range(&self, first: u64, last: u64) -> bool {
        self.inflight
            .lock()
            .is_ok_and(|s| s.iter().any(|c| (first..=last).contains(c)))
    }
}

/// The guest clusters one request has in flight; dropping it (the
/// request finished, failed or was dropped) takes them off the list and
/// wakes whoever waits.
pub(super) struct InFlight<'a> {
    img: &'a Image,
    clusters: Vec<u64>,
}

impl<'a> InFlight<'a> {
    pub(super) fn new(img: &'a Image) -> InFlight<'a> {
        InFlight {
            img,
            clusters: Vec::new(),
        }
    }
    pub(super) fn add(&mut self, ci: u64) {
        if let Ok(mut s) = self.img.inflight.lock() {
            s.insert(ci);
        }
        self.clusters.push(ci);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.clusters.is_empty() {
            return;
        }
        if let Ok(mut s) = self.img.inflight.lock() {
            for c in &self.clusters {
                s.remove(c);
            }
        }
        self.img.alloc_done.notify_waiters();
    }
}
