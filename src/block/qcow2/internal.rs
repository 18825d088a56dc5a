//! Internal snapshots: made and deleted as QEMU does it, with the image
//! held still (no allocation in flight, no write in place).
//!
//! Making one: every cluster the active tables reach gains a reference
//! and loses its COPIED flag (so the next write to it copies), a copy of
//! the active L1 table is written, and a new snapshot table naming it
//! replaces the old one. Deleting one: the table without it first, then
//! its references go, then the active tables get COPIED back wherever a
//! cluster is theirs alone again. Refcounts reach the disk before the
//! tables that rely on them, so a crash leaves leaked clusters and, if
//! it falls between the refcounts and the L2 tables, COPIED flags that
//! disagree with them (`qemu-img check` errors that `-r all` repairs;
//! no order of the two writes avoids it, and QEMU leaves the same).
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::l2::{COMPRESSED, COPIED, OFFSET_MASK};
use super::refcount::{corrupt, Refcounts};
use super::snapshot::{Entry, EXTRA_LEN};
use super::{overlap, Image};
use crate::block::driver::WriteFlags;
use crate::block::error::{BlockError, BlockResult};

type Still<'a> = (
    tokio::sync::MutexGuard<'a, Refcounts>,
    tokio::sync::RwLockWriteGuard<'a, ()>,
);

impl Image {
    /// The metadata lock with no allocation in flight, and no write in
    /// place running (the order `release` takes them in).
    async fn hold_still(&self) -> Still<'_> {
        loop {
            let done = self.alloc_done();
            let meta = self.meta.lock().await;
            if self.inflight.lock().map(|s| s.is_empty()).unwrap_or(true) {
                let g = self.free_guard.write().await;
                return (meta, g);
            }
            drop(meta);
            done.await;
        }
    }

    pub(super) fn snapshot_list(&self) -> Vec<Value> {
        self.snaps
            .lock()
            .map(|s| s.iter().map(Entry::info).collect())
            .unwrap_or_default()
    }

    fn check_snapshots_usable(&self) -> BlockResult<()> {
        self.check_usable()?;
        if self.external {
            return Err(BlockError::new(
                nix::libc::ENOTSUP,
                "Internal snapshots are not supported with an external data file",
            ));
        }
        if self.read_only.load(Ordering::Acquire) {
            return Err(BlockError::new(nix::libc::EROFS, "Read-only image"));
        }
        Ok(())
    }

    /// Makes snapshot `name` of the active tables.
    pub(super) async fn snapshot_create(&self, name: &str) -> BlockResult<()> {
        self.check_snapshots_usable()?;
        let (mut meta, _still) = self.hold_still().await;
        self.writeback(&mut meta).await?;
        self.sync(&mut meta).await?;
        let mut l1 = self.l1.read().map(|l| l.clone()).unwrap_or_default();
        for e in l1.iter_mut() {
            let off = *e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            self.check_meta(off, "L2 table")?;
            let t = self.table(off).await?;
            for j in 0..1usize << self.l2_bits {
                let (entry, bm) = t.get(j);
                for c in self.held_clusters(entry) {
                    meta.change(c >> self.bits, 1).await?;
                }
                if entry & COPIED != 0 {
                    self.cache.mark_dirty(off, &t);
                    t.set(j, entry & !COPIED, bm);
                }
            }
            meta.change(off >> self.bits, 1).await?;
            *e &= !COPIED;
        }
        let bytes = l1_bytes(&l1);
        let n = (bytes.len() as u64).div_ceil(self.cs()).max(1);
        let copy = meta.alloc(n).await?;
        self.file.write(copy, &bytes, WriteFlags::default()).await?;
        // Refcounts, a sync, the L2 tables; then the active L1.
        self.writeback(&mut meta).await?;
        self.set_active_l1(&l1).await?;
        self.sync(&mut meta).await?;
        self.overlap
            .add_range(overlap::INACTIVE_L1, copy, bytes.len() as u64);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut entries = self.snaps.lock().map(|s| s.clone()).unwrap_or_default();
        let id = entries
            .iter()
            .filter_map(|e| e.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let mut extra = Vec::with_capacity(EXTRA_LEN);
        extra.extend(0u64.to_be_bytes());
        extra.extend(self.size.load(Ordering::Acquire).to_be_bytes());
        extra.extend(u64::MAX.to_be_bytes());
        // QEMU's times have microseconds; with no guest, its VM clock is
        // the same moment.
        let nsec = now.subsec_micros() * 1000;
        entries.push(Entry {
            l1_offset: copy,
            l1_size: l1.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: nsec,
            vm_clock_nsec: now.as_secs() * 1_000_000_000 + u64::from(nsec),
            vm_state_size: 0,
            extra,
        });
        self.write_table(&mut meta, entries).await?;
        self.meta_gen.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Deletes the snapshot with this id and/or name; returns its
    /// SnapshotInfo.
    pub(super) async fn snapshot_delete(
        &self,
        id: Option<&str>,
        name: Option<&str>,
    ) -> BlockResult<Value> {
        self.check_snapshots_usable()?;
        let (mut meta, _still) = self.hold_still().await;
        let mut entries = self.snaps.lock().map(|s| s.clone()).unwrap_or_default();
        let Some(i) = entries
            .iter()
            .position(|e| id.is_none_or(|v| e.id == v) && name.is_none_or(|v| e.name == v))
        else {
            return Err(BlockError::new(nix::libc::ENOENT, "no such snapshot"));
        };
        self.writeback(&mut meta).await?;
        self.sync(&mut meta).await?;
        let gone = entries.remove(i);
        self.write_table(&mut meta, entries).await?;
        // Its references go.
        let len = gone.l1_size as usize * 8;
        let mut raw = vec![0u8; len];
        if len > 0 {
            self.check_meta(gone.l1_offset, "Snapshot L1 table")?;
            self.file.read(gone.l1_offset, &mut raw).await?;
        }
        for c in raw.chunks_exact(8) {
            let off =
                u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            self.check_meta(off, "L2 table")?;
            let t = self.table(off).await?;
            for j in 0..1usize << self.l2_bits {
                for c in self.held_clusters(t.get(j).0) {
                    meta.change(c >> self.bits, -1).await?;
                }
            }
            if meta.change(off >> self.bits, -1).await? == 0 {
                self.cache.remove(off);
            }
        }
        if len > 0 {
            let n = (len as u64).div_ceil(self.cs());
            for k in 0..n {
                meta.change((gone.l1_offset >> self.bits) + k, -1).await?;
            }
            self.overlap
                .remove_range(overlap::INACTIVE_L1, gone.l1_offset);
        }
        // COPIED again where the active tables are alone.
        let mut l1 = self.l1.read().map(|l| l.clone()).unwrap_or_default();
        for e in l1.iter_mut() {
            let off = *e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let t = self.table(off).await?;
            for j in 0..1usize << self.l2_bits {
                let (entry, bm) = t.get(j);
                let host = entry & OFFSET_MASK;
                if host == 0 || entry & COMPRESSED != 0 {
                    continue;
                }
                let alone = meta.get(host >> self.bits).await? == 1;
                let want = if alone {
                    entry | COPIED
                } else {
                    entry & !COPIED
                };
                if want != entry {
                    self.cache.mark_dirty(off, &t);
                    t.set(j, want, bm);
                }
            }
            if meta.get(off >> self.bits).await? == 1 {
                *e |= COPIED;
            } else {
                *e &= !COPIED;
            }
        }
        self.writeback(&mut meta).await?;
        self.set_active_l1(&l1).await?;
        self.sync(&mut meta).await?;
        self.meta_gen.fetch_add(1, Ordering::AcqRel);
        Ok(gone.info())
    }

    /// Writes the whole active L1 table and takes it as the one in use.
    async fn set_active_l1(&self, l1: &[u64]) -> BlockResult<()> {
        self.file
            .write(
                self.l1_offset.load(Ordering::Acquire),
                &l1_bytes(l1),
                WriteFlags::default(),
            )
            .await?;
        if let Ok(mut l) = self.l1.write() {
            l.copy_from_slice(l1);
        }
        Ok(())
    }

    /// Writes `entries` as a new snapshot table, points the header at it
    /// and frees the old one.
    async fn write_table(&self, meta: &mut Refcounts, entries: Vec<Entry>) -> BlockResult<()> {
        let bytes: Vec<u8> = entries.iter().flat_map(Entry::to_bytes).collect();
        let (old_off, old_n) = match self.header.lock() {
            Ok(h) => (h.snapshots_offset, h.nb_snapshots),
            Err(_) => return Err(corrupt("header lock poisoned")),
        };
        let old_len: u64 = self
            .snaps
            .lock()
            .map(|s| s.iter().map(|e| e.to_bytes().len() as u64).sum())
            .unwrap_or(0);
        let new_off = if bytes.is_empty() {
            0
        } else {
            let n = (bytes.len() as u64).div_ceil(self.cs());
            let at = meta.alloc(n).await?;
            self.file.write(at, &bytes, WriteFlags::default()).await?;
            meta.write_dirty().await?;
            self.sync(meta).await?;
            at
        };
        let mut field = Vec::with_capacity(12);
        field.extend((entries.len() as u32).to_be_bytes());
        field.extend(new_off.to_be_bytes());
        self.file
            .write(
                super::header::OFF_NB_SNAPSHOTS,
                &field,
                WriteFlags::default(),
            )
            .await?;
        self.sync(meta).await?;
        if let Ok(mut h) = self.header.lock() {
            h.nb_snapshots = entries.len() as u32;
            h.snapshots_offset = new_off;
        }
        if old_n > 0 && old_len > 0 {
            for k in 0..old_len.div_ceil(self.cs()) {
                meta.change((old_off >> self.bits) + k, -1).await?;
            }
            self.overlap.remove_range(overlap::SNAPSHOT_TABLE, old_off);
        }
        if new_off != 0 {
            self.overlap
                .add_range(overlap::SNAPSHOT_TABLE, new_off, bytes.len() as u64);
        }
        if let Ok(mut s) = self.snaps.lock() {
            *s = entries;
        }
        Ok(())
    }
}

fn l1_bytes(l1: &[u64]) -> Vec<u8> {
    l1.iter().flat_map(|e| e.to_be_bytes()).collect()
}
