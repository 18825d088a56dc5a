//! Writes: in place where clusters are owned, else allocation and
//! copy-on-write under the metadata lock, in crash-safe order; metadata
//! overlap checks and fatal corruption reports.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::l2::{self, Map, Table, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::refcount::{corrupt, Refcounts};
use super::{header, overlap, Qcow2};
use crate::block::driver::{IoFuture, WriteFlags};
use crate::block::error::{BlockError, BlockResult};
use serde_json::json;

impl Qcow2 {
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

    /// Writes guest data at a host offset, unless that would overwrite
    /// metadata.
    pub(super) async fn write_data(
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
            let _g = self.free_guard.read().await;
            if let Some(runs) = self.in_place(offset, buf.len() as u64).await? {
                for (g, n, h) in runs {
                    let at = (g - offset) as usize;
                    self.write_data(h, &buf[at..at + n as usize], flags).await?;
                }
                return Ok(());
            }
        }
        // A request of a client that has gone stops here, before it
        // allocates anything.
        let mut meta = crate::block::cancel::before_start(self.meta.lock()).await?;
        let mut released = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            let g = offset + pos as u64;
            let in_off = (g & (self.cs() - 1)) as usize;
            let n = (self.cs() as usize - in_off).min(buf.len() - pos);
            self.write_cluster(&mut meta, g, &buf[pos..pos + n], &mut released)
                .await?;
            pos += n;
        }
        self.release(&mut meta, released, false).await?;
        drop(meta);
        if flags.fua {
            self.flush_all().await?;
        }
        Ok(())
    }

    /// The L2 table for guest offset `g`, allocated or copied so that it
    /// belongs to the active L1 alone. Returns (table, its offset, index).
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
        self.file.flush().await?;
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
        let t = self
            .cache
            .insert(new, Arc::new(Table::from_bytes(&content, self.ext)));
        self.overlap.add_cluster(overlap::ACTIVE_L2, new);
        if old != 0 {
            self.cache.remove(old);
            self.overlap.remove_cluster(old);
            released.push(old);
        }
        Ok((t, new, l2i))
    }

    pub(super) async fn set_entry(
        &self,
        t: &Table,
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
        let (at, bytes) = t.set(i, e, bm);
        self.file
            .write(t_off + at, &bytes, WriteFlags::default())
            .await
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
    /// that replaced them stable.
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
        self.file.flush().await?;
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

    /// Writes `data` (inside one cluster) at guest offset `g`, allocating
    /// or copying the cluster as needed.
    pub(super) async fn write_cluster(
        &self,
        meta: &mut Refcounts,
        g: u64,
        data: &[u8],
        released: &mut Vec<u64>,
    ) -> BlockResult<()> {
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
                    self.write_data(host, &c, WriteFlags::default()).await?;
                    return self.set_entry(&t, t_off, i, host | COPIED, 0).await;
                }
                return self
                    .write_data(host + in_off, data, WriteFlags::default())
                    .await;
            }
            self.write_data(host + in_off, data, WriteFlags::default())
                .await?;
            self.fill_partial_subclusters(bm, base, host, in_off, end)
                .await?;
            let nbm = (bm | touched) & !(touched << 32);
            if nbm != bm {
                self.set_entry(&t, t_off, i, e, nbm).await?;
            }
            return Ok(());
        }
        let new = if self.external {
            base
        } else {
            meta.alloc(1).await?
        };
        let nbm;
        if !self.ext || compressed || host != 0 {
            // The whole cluster moves: old content with the write on top.
            if data.len() as u64 == cs {
                self.write_data(new, data, WriteFlags::default()).await?;
            } else {
                let mut c = self.cluster_content(ci, e, bm).await?;
                c[in_off as usize..end as usize].copy_from_slice(data);
                self.write_data(new, &c, WriteFlags::default()).await?;
            }
            nbm = if !self.ext {
                0
            } else if compressed {
                0xffff_ffff
            } else {
                (bm | touched) & !(touched << 32)
            };
        } else {
            // Only the touched subclusters get data; the rest keep their
            // zero or unallocated state.
            let s0 = (sc_first as u64) << self.sc_bits;
            let s1 = ((sc_last as u64) + 1) << self.sc_bits;
            let mut c = vec![0u8; (s1 - s0) as usize];
            c[(in_off - s0) as usize..(end - s0) as usize].copy_from_slice(data);
            if in_off > s0 {
                let st = Self::sc_state(bm, sc_first)?;
                self.sc_fill(st, base + s0, &mut c[..(in_off - s0) as usize])
                    .await?;
            }
            if end < s1 {
                let st = Self::sc_state(bm, sc_last)?;
                let at = (end - s0) as usize;
                self.sc_fill(st, base + end, &mut c[at..]).await?;
            }
            self.write_data(new + s0, &c, WriteFlags::default()).await?;
            nbm = touched | ((bm >> 32) & !touched) << 32;
        }
        self.file.flush().await?;
        if self.external {
            self.data.flush().await?;
        }
        self.set_entry(&t, t_off, i, new | COPIED, nbm).await?;
        released.extend(self.held_clusters(e));
        Ok(())
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
            self.write_data(host + s0, &c, WriteFlags::default())
                .await?;
        }
        let s1 = (u64::from(last) + 1) * sc;
        if end < s1 && Self::sc_state(bm, last)? != 0 {
            let mut c = vec![0u8; (s1 - end) as usize];
            self.sc_fill(Self::sc_state(bm, last)?, base + end, &mut c)
                .await?;
            self.write_data(host + end, &c, WriteFlags::default())
                .await?;
        }
        Ok(())
    }

    pub(super) async fn flush_all(&self) -> BlockResult<()> {
        if self.external {
            self.data.flush().await?;
        }
        self.file.flush().await
    }
}
