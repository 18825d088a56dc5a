//! Zeroing, discard, shrinking and preallocation: changes that drop or
//! add whole clusters.
use std::sync::atomic::Ordering;

use super::l2::{ALL_ZEROES, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::refcount::tick;
use super::{header, Image};
use crate::block::driver::{WriteFlags, ZeroFlags};
use crate::block::error::{BlockError, BlockResult};

impl Image {
    /// Zeroes or discards whole clusters (whole subclusters with extended
    /// L2) in metadata. `discard`: QEMU's rules for a discarded cluster;
    /// otherwise the range must read as zeroes afterwards.
    pub(super) async fn zero_clusters(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        discard: bool,
        full: bool,
    ) -> BlockResult<()> {
        let v3 = self.header().version >= 3;
        let mut meta = crate::block::cancel::before_start(self.meta.lock()).await?;
        // Allocations in flight in the range link first.
        if len > 0 {
            let (first, last) = (offset >> self.bits, (offset + len - 1) >> self.bits);
            loop {
                let done = self.alloc_done();
                if !self.in_flight_range(first, last) {
                    break;
                }
                drop(meta);
                done.await;
                meta = self.meta.lock().await;
            }
        }
        let mut released = Vec::new();
        let unit = 1u64 << self.sc_bits;
        let mut g = offset;
        let end = offset + len;
        let span = 1u64 << (self.bits + self.l2_bits);
        let mut steps = 0u64;
        while g < end {
            tick(&mut steps).await;
            let base = g & !(self.cs() - 1);
            let stop = end.min(base + self.cs());
            // No L2 table: the whole span is unallocated. When nothing is
            // to be written for it, skip it at once instead of cluster by
            // cluster: discarded with no backing file to show through, or
            // dropped for good (shrink) as a whole span, which would only
            // get a table to free it. (A span the new end cuts keeps the
            // table QEMU gives it.)
            let no_table = self.l1_entry(g >> (self.bits + self.l2_bits)) & OFFSET_MASK == 0;
            let whole_span = full && g.is_multiple_of(span);
            if no_table && (whole_span || (discard && !full && self.backing.get().is_none())) {
                g = end.min((g / span + 1) * span);
                continue;
            }
            // The image's last cluster may be partial.
            let whole = g == base && (stop == base + self.cs() || stop == self.disk_size());
            let (e, bm) = self.entry(g).await?;
            let allocated =
                e & (COMPRESSED | OFFSET_MASK) != 0 || (self.external && e & COPIED != 0);
            if discard
                && !full
                && !allocated
                && self.backing.get().is_none()
                && (e & ZERO != 0 || bm & ALL_ZEROES == ALL_ZEROES || (e == 0 && bm == 0))
            {
                g = stop;
                continue;
            }
            if !whole && (!self.ext || e & COMPRESSED != 0) {
                g = stop;
                continue;
            }
            let (t, t_off, i) = self.writable_table(&mut meta, g, &mut released).await?;
            let (e, bm) = t.get(i);
            let host_bits = e & (OFFSET_MASK | COPIED);
            if full {
                // Gone for good (shrink): nothing, not even zeroes, is left.
                if (e, bm) != (0, 0) {
                    released.extend(self.held_clusters(e));
                    self.set_entry(&t, t_off, i, 0, 0).await?;
                }
            } else if self.ext {
                let first = ((g - base) / unit) as u32;
                let last = ((stop - base) / unit) as u32; // exclusive
                let mask: u64 = (first..last).fold(0, |m, s| m | 1 << s);
                let mut nbm = (bm & !mask) | (mask << 32);
                let mut ne = e;
                if e & COMPRESSED != 0 || (unmap && nbm & 0xffff_ffff == 0) {
                    // Nothing allocated is left: drop the host cluster.
                    released.extend(self.held_clusters(e));
                    ne = 0;
                    nbm = if e & COMPRESSED != 0 { ALL_ZEROES } else { nbm };
                }
                if (ne, nbm) != (e, bm) {
                    self.set_entry(&t, t_off, i, ne, nbm).await?;
                }
            } else if v3 {
                let owned = e & COPIED != 0 && e & COMPRESSED == 0;
                let ne = if discard && self.backing.get().is_none() && !allocated {
                    e
                } else if !unmap && owned {
                    host_bits | ZERO
                } else {
                    released.extend(self.held_clusters(e));
                    ZERO
                };
                if ne != e {
                    self.set_entry(&t, t_off, i, ne, 0).await?;
                }
            } else {
                // v2 has no zero flag: only an unallocated cluster with no
                // backing reads as zeroes; discard may still expose the
                // backing file, as in QEMU.
                if e != 0 {
                    released.extend(self.held_clusters(e));
                    self.set_entry(&t, t_off, i, 0, 0).await?;
                }
            }
            g = stop;
        }
        let punch = self.pass_discard && (discard || unmap);
        self.release(&mut meta, released, punch).await?;
        self.after_change(&mut meta).await
    }

    /// Records a new disk size in the header and in memory.
    pub(super) async fn set_size(&self, size: u64) -> BlockResult<()> {
        self.file
            .write(header::OFF_SIZE, &size.to_be_bytes(), WriteFlags::default())
            .await?;
        self.file.flush().await?;
        self.size.store(size, Ordering::Release);
        if let Ok(mut h) = self.header.lock() {
            h.size = size;
        }
        Ok(())
    }

    /// Shrinks the disk as QEMU does: the clusters past the new end are
    /// dropped (so are L2 tables no longer needed), then the file is cut
    /// after its last used cluster.
    pub(super) async fn shrink(&self, size: u64) -> BlockResult<()> {
        if self.header().nb_snapshots > 0 {
            return Err(BlockError::unsupported(
                "Can't resize an image which has snapshots",
            ));
        }
        let start = size.next_multiple_of(self.cs());
        if start < self.disk_size() {
            self.zero_clusters(start, self.disk_size() - start, true, true, true)
                .await?;
        }
        let mut meta = self.meta.lock().await;
        let keep = size.div_ceil(1 << (self.bits + self.l2_bits)) as usize;
        let tables: Vec<(usize, u64)> = self
            .l1
            .read()
            .map(|l| l.iter().copied().enumerate().skip(keep).collect())
            .unwrap_or_default();
        let mut released = Vec::new();
        for (i, e) in tables {
            let t = e & OFFSET_MASK;
            if t == 0 {
                continue;
            }
            let at = self.l1_offset.load(Ordering::Acquire) + i as u64 * 8;
            self.file
                .write(at, &0u64.to_be_bytes(), WriteFlags::default())
                .await?;
            if let Ok(mut l) = self.l1.write() {
                l[i] = 0;
            }
            self.cache.remove(t);
            self.overlap.remove_cluster(t);
            released.push(t);
        }
        self.release(&mut meta, released, true).await?;
        self.set_size(size).await?;
        // The freed counts are stable before the file is cut.
        self.writeback(&mut meta).await?;
        self.sync(&mut meta).await?;
        let end = meta.last_used().await? + 1;
        if (end << self.bits) < self.file.size() {
            self.file.truncate(end << self.bits).await?;
            meta.end = end;
        }
        Ok(())
    }

    /// blockdev-create's preallocation: every guest cluster gets a host
    /// cluster and an L2 entry ("metadata"); "falloc" also reserves the
    /// data's space in the file, "full" writes its zeroes (reporting
    /// progress in bytes).
    pub async fn preallocate(
        &self,
        mode: &str,
        sh: &dyn crate::block::progress::Progress,
    ) -> BlockResult<()> {
        let size = self.disk_size();
        let cs = self.cs();
        let mut meta = self.meta.lock().await;
        let mut released = Vec::new();
        let mut end = 0;
        let mut g = 0;
        while g < size {
            if sh.cancelled() {
                return Err(BlockError::new(
                    nix::libc::ECANCELED,
                    crate::block::progress::CANCELED,
                ));
            }
            let (t, t_off, i) = self.writable_table(&mut meta, g, &mut released).await?;
            let host = if self.external {
                g
            } else {
                meta.alloc(1).await?
            };
            let bm = if self.ext { 0xffff_ffff } else { 0 };
            self.set_entry(&t, t_off, i, host | COPIED, bm).await?;
            let n = cs.min(size - g);
            match mode {
                "full" => {
                    let zeros = vec![0u8; n as usize];
                    self.data.write(host, &zeros, WriteFlags::default()).await?;
                    sh.set_progress(g + n, size);
                }
                "falloc" => {
                    let z = ZeroFlags {
                        fua: false,
                        may_unmap: false,
                        no_fallback: false,
                    };
                    self.data.write_zeroes(host, n, z).await?;
                }
                _ => {}
            }
            end = end.max(host + cs);
            g += cs;
            self.after_change(&mut meta).await?;
        }
        drop(meta);
        // Metadata preallocation only extends the file.
        if !self.external && self.file.size() < end {
            self.file.truncate(end).await?;
        }
        self.flush_all().await
    }
}
