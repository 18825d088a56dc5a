//! Writes: in place where clusters are owned, else allocation and
//! copy-on-write under the metadata lock, in crash-safe order; metadata
//! overlap checks and fatal corruption reports.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::l2::{self, Map, Table, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::refcount::{corrupt, Refcounts};
use super::writeback::InFlight;
use super::{header, overlap, Image};
use crate::block::driver::{IoFuture, WriteFlags};
use crate::block::error::{BlockError, BlockResult};
use serde_json::json;

/// One cluster of an allocating write, planned under the metadata lock.
pub(super) struct Alloc {
    /// Guest offset of the write's first byte in the cluster, where that
    /// byte is in the request's buffer, and the write's length here.
    g: u64,
    at: usize,
    len: usize,
    /// The cluster's old L2 entry and bitmap.
    e: u64,
    bm: u64,
    /// The new host cluster, and whether it reads as zeroes until
    /// written (never used since open, past the old end of the file).
    new: u64,
    fresh: bool,
    /// The new bitmap (extended L2).
    nbm: u64,
    /// Around the write the cluster reads as zeroes (no copy-on-write).
    plain: bool,
}

/// Bytes to write: a range of the request's buffer, or built here.
enum Src {
    Guest(usize, usize),
    Owned(Vec<u8>),
}

impl Image {
    /// After fatal corruption the node takes no more I/O (QEMU ejects
    /// its medium).
    pub(super) fn check_usable(&self) -> BlockResult<()> {
        if self.corrupt.load(Ordering::Acquire) {
            return Err(BlockError::new(nix::libc::ENOMEDIUM, "No medium found"));
        }
        Ok(())
    }

    /// Marks the image corrupt (header bit, BLOCK_IMAGE_CORRUPTED, once)
    /// and returns the error for the request that found it.
    pub(super) async fn signal_corruption(
        &self,
        at: Option<(u64, u64)>,
        msg: String,
    ) -> BlockError {
        if !self.corrupt.swap(true, Ordering::AcqRel) {
            eprintln!(
                "qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed"
            );
            let bits = match self.header.lock() {
                Ok(mut h) => {
                    h.incompatible |= header::INCOMPAT_CORRUPT;
                    h.incompatible
                }
                Err(_) => header::INCOMPAT_CORRUPT,
            };
            let _ = self
                .file
                .write(
                    header::OFF_INCOMPAT,
                    &bits.to_be_bytes(),
                    WriteFlags::default(),
                )
                .await;
            let _ = self.file.flush().await;
            if let Some(ev) = &self.events {
                let mut d = serde_json::Map::new();
                d.insert("device".into(), json!(""));
                d.insert("node-name".into(), json!(self.node_name));
                d.insert("msg".into(), json!(msg));
                if let Some((offset, size)) = at {
                    d.insert("offset".into(), json!(offset));
                    d.insert("size".into(), json!(size));
                }
                d.insert("fatal".into(), json!(true));
                ev("BLOCK_IMAGE_CORRUPTED", d);
            }
        }
        BlockError::new(nix::libc::EIO, msg)
    }

    /// The driver's boundary: metadata found inconsistent at run time is
    /// fatal corruption (reported once, then EIO), as in QEMU.
    pub(super) async fn fatal<T>(&self, r: BlockResult<T>) -> BlockResult<T> {
        match r {
            Err(e) if e.errno == nix::libc::EUCLEAN => {
                Err(self.signal_corruption(None, e.msg).await)
            }
            other => other,
        }
    }

    pub(super) fn boundary<'a, T: Send + 'a>(
        &'a self,
        f: impl std::future::Future<Output = BlockResult<T>> + Send + 'a,
    ) -> IoFuture<'a, T> {
        Box::pin(async move { self.fatal(f.await).await })
    }

    /// Writes guest data (at guest offset `guest`) at a host offset,
    /// encrypted in an encrypted image (whole sectors there), at most
    /// 1 MiB at a time through a bounce buffer.
    pub(super) async fn write_data(
        &self,
        host: u64,
        guest: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> BlockResult<()> {
        let Some(c) = &self.crypt else {
            return self.write_host(host, buf, flags).await;
        };
        const BOUNCE: usize = 1 << 20;
        let mut bounce = vec![0u8; buf.len().min(BOUNCE)];
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(BOUNCE);
            let b = &mut bounce[..n];
            b.copy_from_slice(&buf[done..done + n]);
            c.encrypt(host + done as u64, guest + done as u64, b);
            self.write_host(host + done as u64, b, flags).await?;
            done += n;
        }
        Ok(())
    }

    /// Writes bytes as they are at a host offset, unless that would
    /// overwrite metadata.
    pub(super) async fn write_host(
        &self,
        host: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> BlockResult<()> {
        if !self.external {
            if let Some(kind) = self.overlap.check(host, buf.len() as u64) {
                let msg = format!("Preventing invalid write on metadata (overlaps with {kind})");
                return Err(self
                    .signal_corruption(Some((host, buf.len() as u64)), msg)
                    .await);
            }
        }
        self.data.write(host, buf, flags).await
    }

    /// Host runs for a write that can go in place: every touched cluster
    /// (or subcluster) is allocated, not shared, not compressed.
    pub(super) async fn in_place(
        &self,
        offset: u64,
        len: u64,
    ) -> BlockResult<Option<Vec<(u64, u64, u64)>>> {
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        let mut pos = 0;
        while pos < len {
            let g = offset + pos;
            let p = self.piece(g, offset + len).await?;
            let e = p.entry;
            if e & COPIED == 0 || e & COMPRESSED != 0 || (!self.ext && e & ZERO != 0) {
                return Ok(None);
            }
            let Map::Data(h) = p.map else { return Ok(None) };
            let n = p.len;
            if n < p.room {
                return Ok(None);
            }
            match out.last_mut() {
                Some((_, l, h0)) if *h0 + *l == h => *l += n,
                _ => out.push((g, n, h)),
            }
            pos += n;
        }
        Ok(Some(out))
    }

    pub(super) async fn write_impl(
        &self,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> BlockResult<()> {
        self.check_usable()?;
        {
            let guard = self.free_guard.read().await;
            if let Some(runs) = self.in_place(offset, buf.len() as u64).await? {
                // FUA: the data alone is enough when the mapping just
                // used is stable already; otherwise a whole flush (the
                // entries that lead to the data may still be cached).
                let gen = self.meta_gen.load(Ordering::Acquire);
                let flush = flags.fua && self.synced_gen.load(Ordering::Acquire) < gen;
                let wf = if flush { WriteFlags::default() } else { flags };
                for (g, n, h) in runs {
                    let at = (g - offset) as usize;
                    self.write_data(h, g, &buf[at..at + n as usize], wf).await?;
                }
                drop(guard);
                if flush {
                    self.flush_all().await?;
                }
                return Ok(());
            }
        }
        // A request of a client that has gone stops here, before it
        // allocates anything.
        let mut meta = crate::block::cancel::before_start(self.meta.lock()).await?;
        let mut inflight = InFlight::new(self);
        let mut allocs: Vec<Alloc> = Vec::new();
        let mut released = Vec::new();
        let mut failed = None;
        let mut pos = 0;
        while pos < buf.len() {
            let g = offset + pos as u64;
            let in_off = (g & (self.cs() - 1)) as usize;
            let n = (self.cs() as usize - in_off).min(buf.len() - pos);
            // Another request is allocating this cluster: its entry
            // changes when it links; wait for that. (Requests take their
            // clusters in ascending order, so waits cannot form a cycle.)
            let done = self.alloc_done();
            if self.in_flight(g >> self.bits) {
                drop(meta);
                done.await;
                meta = self.meta.lock().await;
                continue;
            }
            match self
                .plan_cluster(&mut meta, g, &buf[pos..pos + n], &mut released)
                .await
            {
                Ok(Some(mut a)) => {
                    a.at = pos;
                    inflight.add(g >> self.bits);
                    allocs.push(a);
                }
                Ok(None) => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            pos += n;
        }
        if let Some(e) = failed {
            self.give_up(&mut meta, &allocs).await;
            return Err(e);
        }
        if !allocs.is_empty() {
            self.grow_ahead(&allocs).await;
            // The data goes to the new clusters without the lock: nobody
            // else uses them, and the guest clusters are in flight.
            drop(meta);
            let r = self.fill(buf, &allocs).await;
            meta = self.meta.lock().await;
            if let Err(e) = r {
                self.give_up(&mut meta, &allocs).await;
                return Err(e);
            }
            self.link(&mut meta, &allocs, &mut released).await?;
        }
        drop(inflight);
        self.release(&mut meta, released, false).await?;
        self.after_change(&mut meta).await?;
        drop(meta);
        if flags.fua {
            self.flush_all().await?;
        }
        Ok(())
    }

    /// New clusters past the end of the file: the file grows ahead of
    /// them in large steps (an eighth of its size, 1 to 64 MiB), so the
    /// data writes land inside the file (writes that extend a file one by
    /// one cost the filesystem far more). The part never used is cut
    /// again on close. Advisory: a file that cannot grow is written as it
    /// is.
    async fn grow_ahead(&self, allocs: &[Alloc]) {
        let cs = self.cs();
        let Some(need) = allocs.iter().filter(|a| a.fresh).map(|a| a.new + cs).max() else {
            return;
        };
        let size = self.file.size();
        // A preallocate filter below grows the file its own way (and
        // would take a truncation for data).
        if need <= size || self.file.driver.name() == "preallocate" {
            return;
        }
        let step = (size / 8).clamp(1 << 20, 64 << 20).next_multiple_of(cs);
        let target = need.next_multiple_of(step);
        let z = crate::block::driver::ZeroFlags {
            fua: false,
            may_unmap: false,
            no_fallback: true,
        };
        // With O_DIRECT, writes into holes take the filesystem's slow
        // path (ext4 allocates under the exclusive inode lock): the space
        // is reserved (as zeroes) instead. Buffered writes fill holes
        // cheaply, and holes cost no disk space.
        let grown = (self.file.opts.cache_direct
            && self.file.write_zeroes(size, target - size, z).await.is_ok())
            || self.file.truncate(target).await.is_ok();
        if grown {
            self.grown.store(true, Ordering::Release);
        }
    }

    /// A failed allocating write: its new clusters are free again (no
    /// entry points at them).
    async fn give_up(&self, meta: &mut Refcounts, allocs: &[Alloc]) {
        if self.external {
            return;
        }
        for a in allocs {
            let _ = meta.change(a.new >> self.bits, -1).await;
        }
    }

    /// Writes the new clusters' contents: the request's bytes straight
    /// from its buffer where they need nothing around them (contiguous
    /// host runs in one write), copy-on-write content otherwise.
    async fn fill(&self, buf: &[u8], allocs: &[Alloc]) -> BlockResult<()> {
        let mut runs: Vec<(u64, u64, Src)> = Vec::new();
        for a in allocs {
            let (host, guest, src) = self.content(buf, a).await?;
            if let (Some((h0, _, Src::Guest(s0, e0))), Src::Guest(s, e)) = (runs.last_mut(), &src) {
                if *h0 + (*e0 - *s0) as u64 == host && *e0 == *s {
                    *e0 = *e;
                    continue;
                }
            }
            runs.push((host, guest, src));
        }
        for (host, guest, src) in &runs {
            let bytes = match src {
                Src::Guest(s, e) => &buf[*s..*e],
                Src::Owned(v) => &v[..],
            };
            self.write_data(*host, *guest, bytes, WriteFlags::default())
                .await?;
        }
        Ok(())
    }

    /// What to write for one allocation, and where: (host offset, guest
    /// offset, bytes).
    async fn content(&self, buf: &[u8], a: &Alloc) -> BlockResult<(u64, u64, Src)> {
        let cs = self.cs();
        let ci = a.g >> self.bits;
        let base = ci << self.bits;
        let in_off = a.g - base;
        let end = in_off + a.len as u64;
        let data = &buf[a.at..a.at + a.len];
        let guest = Src::Guest(a.at, a.at + a.len);
        if a.len as u64 == cs {
            return Ok((a.new, a.g, guest));
        }
        if a.fresh && a.plain {
            // The rest of the cluster reads as zeroes as it is.
            return Ok((a.new + in_off, a.g, guest));
        }
        let host = a.e & OFFSET_MASK;
        if !self.ext || a.e & COMPRESSED != 0 || host != 0 {
            // The whole cluster moves: old content with the write on top.
            let mut c = self.cluster_content(ci, a.e, a.bm).await?;
            c[in_off as usize..end as usize].copy_from_slice(data);
            return Ok((a.new, base, Src::Owned(c)));
        }
        // Only the touched subclusters get data; the rest keep their
        // zero or unallocated state.
        let (first, last) = (
            (in_off >> self.sc_bits) as u32,
            ((end - 1) >> self.sc_bits) as u32,
        );
        let s0 = u64::from(first) << self.sc_bits;
        let s1 = (u64::from(last) + 1) << self.sc_bits;
        if s0 == in_off && s1 == end {
            return Ok((a.new + s0, a.g, guest));
        }
        let mut c = vec![0u8; (s1 - s0) as usize];
        c[(in_off - s0) as usize..(end - s0) as usize].copy_from_slice(data);
        if in_off > s0 {
            let st = Self::sc_state(a.bm, first)?;
            self.sc_fill(st, base + s0, &mut c[..(in_off - s0) as usize])
                .await?;
        }
        if end < s1 {
            let st = Self::sc_state(a.bm, last)?;
            let at = (end - s0) as usize;
            self.sc_fill(st, base + end, &mut c[at..]).await?;
        }
        Ok((a.new + s0, base + s0, Src::Owned(c)))
    }

    /// Points the L2 entries at the new clusters (in the cache: they
    /// reach the file at write-back, after their refcounts).
    async fn link(
        &self,
        meta: &mut Refcounts,
        allocs: &[Alloc],
        released: &mut Vec<u64>,
    ) -> BlockResult<()> {
        for a in allocs {
            let (t, t_off, i) = self.writable_table(meta, a.g, released).await?;
            self.set_entry(&t, t_off, i, a.new | COPIED, a.nbm).await?;
            released.extend(self.held_clusters(a.e));
            if !(a.fresh && a.plain) {
                // Copy-on-write content, or a reused cluster's old bytes
                // under the write: stable before the entry.
                meta.data_unsynced = true;
            }
        }
        Ok(())
    }

    /// The L2 table for guest offset `g`, allocated or copied so that it
    /// belongs to the active L1 alone. Returns (table, its offset, index).
    /// A new table is written whole and synced with its refcount before
    /// the L1 entry (written through) names it.
    pub(super) async fn writable_table(
        &self,
        meta: &mut Refcounts,
        g: u64,
        released: &mut Vec<u64>,
    ) -> BlockResult<(Arc<Table>, u64, usize)> {
        let ci = g >> self.bits;
        let l1i = ci >> self.l2_bits;
        let l2i = (ci & ((1 << self.l2_bits) - 1)) as usize;
        if l1i as usize >= self.l1.read().map(|l| l.len()).unwrap_or(0) {
            return Err(corrupt("guest offset beyond the L1 table"));
        }
        let l1e = self.l1_entry(l1i);
        let old = l1e & OFFSET_MASK;
        if old != 0 && l1e & COPIED != 0 {
            return Ok((self.table(old).await?, old, l2i));
        }
        let content = if old != 0 {
            self.table(old).await?.to_bytes()
        } else {
            vec![0u8; self.cs() as usize]
        };
        let new = meta.alloc(1).await?;
        self.file
            .write(new, &content, WriteFlags::default())
            .await?;
        meta.write_dirty().await?;
        self.sync(meta).await?;
        let e = new | COPIED;
        self.file
            .write(
                self.l1_offset.load(Ordering::Acquire) + l1i * 8,
                &e.to_be_bytes(),
                WriteFlags::default(),
            )
            .await?;
        if let Ok(mut l) = self.l1.write() {
            l[l1i as usize] = e;
        }
        self.meta_gen.fetch_add(1, Ordering::AcqRel);
        let t = self
            .cache
            .put(new, Arc::new(Table::from_bytes(&content, self.ext)));
        self.overlap.add_cluster(overlap::ACTIVE_L2, new);
        if old != 0 {
            self.cache.remove(old);
            self.overlap.remove_cluster(old);
            released.push(old);
        }
        Ok((t, new, l2i))
    }

    /// Sets an L2 entry in the cached table, which becomes dirty.
    pub(super) async fn set_entry(
        &self,
        t: &Arc<Table>,
        t_off: u64,
        i: usize,
        e: u64,
        bm: u64,
    ) -> BlockResult<()> {
        // A hostile L1 entry can name other metadata as an L2 table
        // (with COPIED set, so it is written in place).
        let len = (if self.ext { 16 } else { 8 }) as u64;
        let at = t_off + ((i as u64) * len);
        if let Some(kind) = self
            .overlap
            .check_ignoring(at, len, Some(overlap::ACTIVE_L2))
        {
            let msg = format!("Preventing invalid write on metadata (overlaps with {kind})");
            return Err(self.signal_corruption(Some((at, len)), msg).await);
        }
        self.cache.mark_dirty(t_off, t);
        self.meta_gen.fetch_add(1, Ordering::AcqRel);
        t.set(i, e, bm);
        Ok(())
    }

    /// Host clusters the entry holds (to release when it is replaced).
    pub(super) fn held_clusters(&self, e: u64) -> Vec<u64> {
        if e & COMPRESSED != 0 {
            let c = l2::compressed(e, self.bits);
            let first = c.offset & !(self.cs() - 1);
            let last = (c.offset + c.len - 1) & !(self.cs() - 1);
            return (0..=(last - first) >> self.bits)
                .map(|k| first + (k << self.bits))
                .collect();
        }
        let host = e & OFFSET_MASK;
        if host == 0 || self.external {
            return Vec::new();
        }
        vec![host]
    }

    /// Drops one reference from each cluster, after making the pointers
    /// that replaced them stable (written back and synced).
    /// `punch`: clusters that become free are also discarded in the
    /// file, so the host gets the space back (pass-discard-*).
    pub(super) async fn release(
        &self,
        meta: &mut Refcounts,
        clusters: Vec<u64>,
        punch: bool,
    ) -> BlockResult<()> {
        if clusters.is_empty() {
            return Ok(());
        }
        self.writeback(meta).await?;
        self.sync(meta).await?;
        let _g = self.free_guard.write().await;
        for c in clusters {
            if meta.change(c >> self.bits, -1).await? == 0 && punch {
                // Advisory, as in QEMU: a file that cannot discard keeps it.
                let _ = self.file.driver.discard(c, self.cs()).await;
            }
        }
        Ok(())
    }

    /// Fill for the part of a subcluster a write does not cover: zeroes,
    /// or the backing file's data.
    pub(super) async fn sc_fill(&self, state: u8, g: u64, buf: &mut [u8]) -> BlockResult<()> {
        if state == 1 {
            buf.fill(0);
            Ok(())
        } else {
            self.read_backing(g, buf).await
        }
    }

    /// A write of `data` (inside one cluster) at guest offset `g`: done
    /// here (under the lock) when the cluster is owned; otherwise a new
    /// cluster is allocated and returned, to be filled without the lock
    /// and linked after.
    pub(super) async fn plan_cluster(
        &self,
        meta: &mut Refcounts,
        g: u64,
        data: &[u8],
        released: &mut Vec<u64>,
    ) -> BlockResult<Option<Alloc>> {
        let cs = self.cs();
        let ci = g >> self.bits;
        let base = ci << self.bits;
        let in_off = g - base;
        let end = in_off + data.len() as u64;
        let (t, t_off, i) = self.writable_table(meta, g, released).await?;
        let (e, bm) = t.get(i);
        let host = e & OFFSET_MASK;
        let compressed = e & COMPRESSED != 0;
        let owned = !compressed && e & COPIED != 0 && (host != 0 || self.external);
        // Subclusters the write touches, as a bitmap.
        let (sc_first, sc_last) = (
            (in_off >> self.sc_bits) as u32,
            ((end - 1) >> self.sc_bits) as u32,
        );
        let touched: u64 = if self.ext {
            (sc_first..=sc_last).fold(0, |m, s| m | 1 << s)
        } else {
            0
        };
        if owned {
            if !self.ext {
                if e & ZERO != 0 {
                    // A preallocated zero cluster becomes data: zero the rest.
                    let mut c = vec![0u8; cs as usize];
                    c[in_off as usize..end as usize].copy_from_slice(data);
                    self.write_data(host, base, &c, WriteFlags::default())
                        .await?;
                    // The zeroes are stable before the entry loses its
                    // zero flag.
                    meta.data_unsynced = true;
                    self.set_entry(&t, t_off, i, host | COPIED, 0).await?;
                    return Ok(None);
                }
                self.write_data(host + in_off, g, data, WriteFlags::default())
                    .await?;
                return Ok(None);
            }
            self.write_data(host + in_off, g, data, WriteFlags::default())
                .await?;
            self.fill_partial_subclusters(bm, base, host, in_off, end)
                .await?;
            let nbm = (bm | touched) & !(touched << 32);
            if nbm != bm {
                // Likewise the fill of newly allocated subclusters.
                meta.data_unsynced = true;
                self.set_entry(&t, t_off, i, e, nbm).await?;
            }
            return Ok(None);
        }
        let no_backing = self.backing.get().is_none();
        let whole = !self.ext || compressed || host != 0;
        let (nbm, plain) = if whole {
            let nbm = if !self.ext {
                0
            } else if compressed {
                0xffff_ffff
            } else {
                (bm | touched) & !(touched << 32)
            };
            // The old content reads as zeroes (or none is left).
            let zero = host == 0 && !compressed && (e & ZERO != 0 || no_backing);
            (nbm, zero || data.len() as u64 == cs)
        } else {
            let zero_fill = |s: u32| -> BlockResult<bool> {
                let st = Self::sc_state(bm, s)?;
                Ok(st == 1 || (st == 2 && no_backing))
            };
            let s0 = u64::from(sc_first) << self.sc_bits;
            let s1 = (u64::from(sc_last) + 1) << self.sc_bits;
            let plain =
                (in_off == s0 || zero_fill(sc_first)?) && (end == s1 || zero_fill(sc_last)?);
            (touched | ((bm >> 32) & !touched) << 32, plain)
        };
        // Encrypted, what a fresh cluster holds around the write does not
        // decrypt to zeroes: its zeroes are written, encrypted.
        let plain = plain && self.crypt.is_none();
        let (new, fresh) = if self.external {
            (base, false)
        } else {
            meta.alloc_fresh(1).await?
        };
        Ok(Some(Alloc {
            g,
            at: 0,
            len: data.len(),
            e,
            bm,
            new,
            fresh,
            nbm,
            plain,
        }))
    }

    /// After an in-place write into an owned extended cluster: the parts
    /// of newly allocated subclusters outside the write get their old
    /// content (zeroes or the backing file's).
    pub(super) async fn fill_partial_subclusters(
        &self,
        bm: u64,
        base: u64,
        host: u64,
        in_off: u64,
        end: u64,
    ) -> BlockResult<()> {
        let sc = 1u64 << self.sc_bits;
        let first = (in_off >> self.sc_bits) as u32;
        let last = ((end - 1) >> self.sc_bits) as u32;
        let s0 = u64::from(first) * sc;
        if in_off > s0 && Self::sc_state(bm, first)? != 0 {
            let mut c = vec![0u8; (in_off - s0) as usize];
            self.sc_fill(Self::sc_state(bm, first)?, base + s0, &mut c)
                .await?;
            self.write_data(host + s0, base + s0, &c, WriteFlags::default())
                .await?;
        }
        let s1 = (u64::from(last) + 1) * sc;
        if end < s1 && Self::sc_state(bm, last)? != 0 {
            let mut c = vec![0u8; (s1 - end) as usize];
            self.sc_fill(Self::sc_state(bm, last)?, base + end, &mut c)
                .await?;
            self.write_data(host + end, base + end, &c, WriteFlags::default())
                .await?;
        }
        Ok(())
    }
}
