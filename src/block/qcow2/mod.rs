//! The qcow2 format driver (docs/interop/qcow2.txt in QEMU).
//!
//! - Reads walk L1 -> L2 (cached, see l2.rs) and go to the data file, the
//!   backing node, zeroes or the decompressor, one run of like clusters
//!   at a time; contiguous host data is read in one request.
//! - Writes to clusters that are allocated and not shared go straight to
//!   the data file with no lock but a shared "nothing is being freed"
//!   guard. Everything else (allocation, copy-on-write of shared or
//!   compressed clusters, zeroing, discard) runs under the metadata lock.
//! - Metadata is written through and ordered: new refcounts, then the new
//!   clusters' contents, a flush, then the L1/L2 entries that point at
//!   them; old clusters are released only after a flush that made the new
//!   pointers stable. A crash can leak clusters, never corrupt the image.
pub mod compress;
pub mod create;
pub mod header;
pub mod l2;
pub mod overlap;
pub mod refcount;
mod repair;
mod snapshot;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde_json::{json, Value};

use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::error::{BlockError, BlockResult};
use super::node::Node;
use super::perm::Perm;
use header::Header;
use l2::{Map, Table, ALL_ZEROES, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use refcount::{corrupt, Refcounts};

/// QMP events a block driver raises: (name, data).
pub type BlockEvents = crate::events::EventSink;

/// Options of the qcow2 driver that change behaviour, and what it needs
/// to report corruption.
#[derive(Clone, Default)]
pub struct Qcow2Options {
    pub node_name: String,
    pub events: Option<BlockEvents>,
    pub l2_cache_size: Option<u64>,
    /// The header's backing file name resolved against the image's
    /// directory (full-backing-filename).
    pub backing_full: Option<String>,
}

pub struct Qcow2 {
    file: Arc<Node>,
    /// Where guest data lives: `file`, or the external data file.
    data: Arc<Node>,
    external: bool,
    backing: Option<Arc<Node>>,
    header: std::sync::Mutex<Header>,
    bits: u32,
    /// log2 of the entries per L2 table.
    l2_bits: u32,
    ext: bool,
    /// log2 of the subcluster size (the cluster size without extended L2).
    sc_bits: u32,
    size: AtomicU64,
    l1: RwLock<Vec<u64>>,
    l1_offset: AtomicU64,
    cache: l2::Cache,
    meta: tokio::sync::Mutex<Refcounts>,
    /// Writes in place hold it shared; releasing clusters holds it alone,
    /// so no in-place write can land in a cluster after it is freed.
    free_guard: tokio::sync::RwLock<()>,
    read_only: bool,
    corrupt: AtomicBool,
    backing_full: Option<String>,
    overlap: Arc<overlap::Overlap>,
    node_name: String,
    events: Option<BlockEvents>,
}

/// One piece of a request: the L2 entry of its cluster, what its first
/// byte maps to and for how long (`len`), within `room` bytes.
struct Piece {
    entry: u64,
    map: Map,
    len: u64,
    room: u64,
}

fn be64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

/// The header of the image on `file`.
pub async fn read_header(file: &Node) -> BlockResult<Header> {
    let fsize = file.size();
    let mut first = vec![0u8; fsize.min(104) as usize];
    file.read(0, &mut first).await?;
    if first.len() < 24 || first[..4] != header::MAGIC.to_be_bytes() {
        return Err(BlockError::inval("Image is not in qcow2 format"));
    }
    let bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
        return Header::parse(&first);
    }
    let mut cluster = vec![0u8; fsize.min(1 << bits) as usize];
    file.read(0, &mut cluster).await?;
    Header::parse(&cluster)
}

/// The format of a backing file named without one: qcow2 by its magic,
/// raw otherwise (QEMU probes the same way for these two).
pub fn probe(path: &str) -> String {
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == header::MAGIC.to_be_bytes();
    if is_qcow2 { "qcow2" } else { "raw" }.to_string()
}

impl Qcow2 {
    /// Opens the image on `file`. `data` is the external data file node
    /// when the image has one; `backing` the backing node if any.
    pub async fn open(
        file: Arc<Node>,
        data: Option<Arc<Node>>,
        backing: Option<Arc<Node>>,
        read_only: bool,
        opts: &Qcow2Options,
    ) -> BlockResult<Qcow2> {
        let fsize = file.size();
        let mut h = read_header(&file).await?;
        if h.incompatible & header::INCOMPAT_CORRUPT != 0 && !read_only {
            return Err(BlockError::new(
                nix::libc::EACCES,
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        if h.has_data_file() && data.is_none() {
            return Err(BlockError::inval("'data-file' is required for this image"));
        }
        let bits = h.cluster_bits;
        let ext = h.extended_l2();
        let l2_bits = bits - 3 - u32::from(ext);
        let l1_bytes = u64::from(h.l1_size) * 8;
        if h.l1_size > 0 && h.l1_table_offset.saturating_add(l1_bytes) > fsize {
            return Err(corrupt("L1 table lies beyond the end of the image file"));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read(h.l1_table_offset, &mut raw).await?;
        let l1 = be64s(&raw);
        let ov = Arc::new(overlap::Overlap::new(bits));
        let mut refs = Refcounts::load(
            ov.clone(),
            file.clone(),
            bits,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )
        .await?;
        if h.incompatible & header::INCOMPAT_DIRTY != 0 && !read_only {
            // Lazy refcounts left unfinished by a crash: count again.
            repair::repair(&file, &mut h, &mut refs).await?;
        }
        // What data writes must never touch.
        ov.add_range(overlap::HEADER, 0, 1 << bits);
        ov.set_range(overlap::ACTIVE_L1, h.l1_table_offset, l1_bytes);
        for e in &l1 {
            if e & OFFSET_MASK != 0 {
                ov.add_cluster(overlap::ACTIVE_L2, e & OFFSET_MASK);
            }
        }
        let snaps = snapshot::read(&file, &h).await?;
        ov.add_range(overlap::SNAPSHOT_TABLE, h.snapshots_offset, snaps.table_len);
        for (off, n) in snaps.l1_tables {
            ov.add_range(overlap::INACTIVE_L1, off, n * 8);
        }
        // Default: enough L2 tables for the whole disk, at most 32 MiB.
        let need = h.size.div_ceil(1 << (bits + l2_bits)) << bits;
        let cache_bytes = opts.l2_cache_size.unwrap_or(need.min(32 << 20));
        let cache = l2::Cache::new((cache_bytes >> bits) as usize);
        // rsd keeps no bitmaps: clear the auto-clear bits it does not
        // know before writing, as the spec asks.
        let keep = header::AUTOCLEAR_DATA_FILE_RAW;
        if !read_only && h.autoclear & !keep != 0 {
            h.autoclear &= keep;
            file.write(
                header::OFF_AUTOCLEAR,
                &h.autoclear.to_be_bytes(),
                WriteFlags::default(),
            )
            .await?;
            file.flush().await?;
        }
        Ok(Qcow2 {
            external: data.is_some(),
            data: data.unwrap_or_else(|| file.clone()),
            file,
            backing,
            bits,
            l2_bits,
            ext,
            sc_bits: if ext { bits - 5 } else { bits },
            size: AtomicU64::new(h.size),
            l1_offset: AtomicU64::new(h.l1_table_offset),
            l1: RwLock::new(l1),
            header: std::sync::Mutex::new(h),
            cache,
            meta: tokio::sync::Mutex::new(refs),
            free_guard: tokio::sync::RwLock::new(()),
            read_only,
            corrupt: AtomicBool::new(false),
            backing_full: opts.backing_full.clone(),
            overlap: ov,
            node_name: opts.node_name.clone(),
            events: opts.events.clone(),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.bits
    }

    pub fn header(&self) -> Header {
        self.header.lock().map(|h| h.clone()).unwrap_or_default()
    }

    pub fn backing(&self) -> Option<&Arc<Node>> {
        self.backing.as_ref()
    }

    fn l1_entry(&self, l1i: u64) -> u64 {
        self.l1
            .read()
            .ok()
            .and_then(|l| l.get(l1i as usize).copied())
            .unwrap_or(0)
    }

    /// A metadata cluster's offset must be aligned and inside the file.
    fn check_meta(&self, off: u64, what: &str) -> BlockResult<()> {
        if !off.is_multiple_of(self.cs())
            || off == 0
            || off.saturating_add(self.cs()) > self.file.size()
        {
            return Err(corrupt(format!("{what} offset {off:#x} is invalid")));
        }
        Ok(())
    }

    async fn table(&self, off: u64) -> BlockResult<Arc<Table>> {
        if let Some(t) = self.cache.get(off) {
            return Ok(t);
        }
        self.check_meta(off, "L2 table")?;
        let mut b = vec![0u8; self.cs() as usize];
        self.file.read(off, &mut b).await?;
        Ok(self
            .cache
            .insert(off, Arc::new(Table::from_bytes(&b, self.ext))))
    }

    /// The L2 entry and bitmap of the cluster holding guest offset `g`.
    async fn entry(&self, g: u64) -> BlockResult<(u64, u64)> {
        let ci = g >> self.bits;
        let l1i = ci >> self.l2_bits;
        let l2_off = self.l1_entry(l1i) & OFFSET_MASK;
        if l2_off == 0 {
            return Ok((0, 0));
        }
        if !l2_off.is_multiple_of(self.cs()) {
            return Err(corrupt(format!(
                "L2 table offset {l2_off:#x} unaligned (L1 index: {l1i:#x})"
            )));
        }
        let t = self.table(l2_off).await?;
        let i = ci & ((1 << self.l2_bits) - 1);
        let (e, bm) = t.get(i as usize);
        let host = e & OFFSET_MASK;
        if e & COMPRESSED == 0 && !host.is_multiple_of(self.cs()) {
            return Err(corrupt(format!(
                "Cluster allocation offset {host:#x} unaligned (L2 offset: {l2_off:#x}, L2 index: {i:#x})"
            )));
        }
        Ok((e, bm))
    }

    /// Subcluster state: 0 allocated, 1 zero, 2 unallocated.
    fn sc_state(bitmap: u64, i: u32) -> BlockResult<u8> {
        let alloc = bitmap >> i & 1 != 0;
        let zero = bitmap >> (32 + i) & 1 != 0;
        match (alloc, zero) {
            (true, true) => Err(corrupt("subcluster both allocated and zero")),
            (true, false) => Ok(0),
            (false, true) => Ok(1),
            (false, false) => Ok(2),
        }
    }

    /// What the cluster entry says about `in_off..in_off+max` (inside one
    /// cluster): the mapping of the first byte and how far it holds.
    fn classify(&self, e: u64, bm: u64, in_off: u64, max: u64) -> BlockResult<(Map, u64)> {
        if e & COMPRESSED != 0 {
            return Ok((Map::Compressed(e), max));
        }
        let host = e & OFFSET_MASK;
        let has_host = host != 0 || (self.external && e & COPIED != 0);
        if has_host && !host.is_multiple_of(self.cs()) {
            return Err(corrupt(format!(
                "Cluster allocation offset {host:#x} unaligned"
            )));
        }
        if !self.ext {
            if e & ZERO != 0 {
                return Ok((Map::Zero, max));
            }
            if has_host {
                return Ok((Map::Data(host + in_off), max));
            }
            return Ok((Map::Unalloc, max));
        }
        let first = (in_off >> self.sc_bits) as u32;
        let s0 = Self::sc_state(bm, first)?;
        let mut i = first + 1;
        while i < l2::SUBCLUSTERS && Self::sc_state(bm, i)? == s0 {
            i += 1;
        }
        let n = ((u64::from(i) << self.sc_bits) - in_off).min(max);
        match s0 {
            0 if has_host => Ok((Map::Data(host + in_off), n)),
            0 => Err(corrupt("allocated subcluster without a host cluster")),
            1 => Ok((Map::Zero, n)),
            _ => Ok((Map::Unalloc, n)),
        }
    }

    /// The mapping of guest data from `g` on, up to `end` and within
    /// `g`'s cluster.
    async fn piece(&self, g: u64, end: u64) -> BlockResult<Piece> {
        let in_off = g & (self.cs() - 1);
        let room = (self.cs() - in_off).min(end - g);
        let (entry, bm) = self.entry(g).await?;
        let (map, len) = self.classify(entry, bm, in_off, room)?;
        Ok(Piece {
            entry,
            map,
            len,
            room,
        })
    }

    /// The guest range split into runs of one mapping each; contiguous
    /// host data and adjacent zero or unallocated runs are merged.
    async fn runs(&self, offset: u64, len: u64) -> BlockResult<Vec<(u64, u64, Map)>> {
        let mut out: Vec<(u64, u64, Map)> = Vec::new();
        let mut pos = 0;
        while pos < len {
            let g = offset + pos;
            let p = self.piece(g, offset + len).await?;
            let (m, n) = (p.map, p.len);
            let merged = match (out.last_mut(), m) {
                (Some((_, l, Map::Data(h))), Map::Data(h2)) if *h + *l == h2 => {
                    *l += n;
                    true
                }
                (Some((_, l, Map::Zero)), Map::Zero)
                | (Some((_, l, Map::Unalloc)), Map::Unalloc) => {
                    *l += n;
                    true
                }
                _ => false,
            };
            if !merged {
                out.push((g, n, m));
            }
            pos += n;
        }
        Ok(out)
    }

    /// Reads the backing node's view of `g..` (zeroes past its end).
    async fn read_backing(&self, g: u64, buf: &mut [u8]) -> BlockResult<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let n = if g >= bsize {
            0
        } else {
            ((bsize - g) as usize).min(buf.len())
        };
        if n > 0 {
            b.read(g, &mut buf[..n]).await?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// A compressed cluster's content.
    async fn decompress(&self, e: u64) -> BlockResult<Vec<u8>> {
        let c = l2::compressed(e, self.bits);
        let fsize = self.file.size();
        if c.offset >= fsize {
            return Err(corrupt(format!(
                "Compressed cluster at {:#x} lies beyond the end of the image file",
                c.offset
            )));
        }
        let len = c.len.min(fsize - c.offset);
        let mut src = vec![0u8; len as usize];
        self.file.read(c.offset, &mut src).await?;
        let kind = self.header().compression_type;
        compress::decompress(kind, &src, self.cs() as usize)
    }

    async fn read_runs(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.check_usable()?;
        for (g, n, m) in self.runs(offset, buf.len() as u64).await? {
            let at = (g - offset) as usize;
            let dst = &mut buf[at..at + n as usize];
            match m {
                Map::Data(h) => self.data.read(h, dst).await?,
                Map::Zero => dst.fill(0),
                Map::Unalloc => self.read_backing(g, dst).await?,
                Map::Compressed(e) => {
                    let c = self.decompress(e).await?;
                    let in_off = (g & (self.cs() - 1)) as usize;
                    dst.copy_from_slice(&c[in_off..in_off + dst.len()]);
                }
            }
        }
        Ok(())
    }

    /// The guest view of one whole cluster given its (old) entry.
    async fn cluster_content(&self, ci: u64, e: u64, bm: u64) -> BlockResult<Vec<u8>> {
        let mut c = vec![0u8; self.cs() as usize];
        let base = ci << self.bits;
        let mut pos = 0;
        while pos < self.cs() {
            let (m, n) = self.classify(e, bm, pos, self.cs() - pos)?;
            let dst = &mut c[pos as usize..(pos + n) as usize];
            match m {
                Map::Data(h) => self.data.read(h, dst).await?,
                Map::Zero => {}
                Map::Unalloc => self.read_backing(base + pos, dst).await?,
                Map::Compressed(e) => dst
                    .copy_from_slice(&self.decompress(e).await?[pos as usize..(pos + n) as usize]),
            }
            pos += n;
        }
        Ok(c)
    }

    /// After fatal corruption the node takes no more I/O (QEMU ejects
    /// its medium).
    fn check_usable(&self) -> BlockResult<()> {
        if self.corrupt.load(Ordering::Acquire) {
            return Err(BlockError::new(nix::libc::ENOMEDIUM, "No medium found"));
        }
        Ok(())
    }

    fn check_writable(&self) -> BlockResult<()> {
        self.check_usable()
    }

    /// Marks the image corrupt (header bit, BLOCK_IMAGE_CORRUPTED, once)
    /// and returns the error for the request that found it.
    async fn signal_corruption(&self, at: Option<(u64, u64)>, msg: String) -> BlockError {
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
    async fn fatal<T>(&self, r: BlockResult<T>) -> BlockResult<T> {
        match r {
            Err(e) if e.errno == nix::libc::EUCLEAN => {
                Err(self.signal_corruption(None, e.msg).await)
            }
            other => other,
        }
    }

    fn boundary<'a, T: Send + 'a>(
        &'a self,
        f: impl std::future::Future<Output = BlockResult<T>> + Send + 'a,
    ) -> IoFuture<'a, T> {
        Box::pin(async move { self.fatal(f.await).await })
    }

    /// Writes guest data at a host offset, unless that would overwrite
    /// metadata.
    async fn write_data(&self, host: u64, buf: &[u8], flags: WriteFlags) -> BlockResult<()> {
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
    async fn in_place(&self, offset: u64, len: u64) -> BlockResult<Option<Vec<(u64, u64, u64)>>> {
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

    async fn write_impl(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> BlockResult<()> {
        self.check_writable()?;
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
        let mut meta = self.meta.lock().await;
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
        self.release(&mut meta, released).await?;
        drop(meta);
        if flags.fua {
            self.flush_all().await?;
        }
        Ok(())
    }

    /// The L2 table for guest offset `g`, allocated or copied so that it
    /// belongs to the active L1 alone. Returns (table, its offset, index).
    async fn writable_table(
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

    async fn set_entry(&self, t: &Table, t_off: u64, i: usize, e: u64, bm: u64) -> BlockResult<()> {
        let (at, bytes) = t.set(i, e, bm);
        self.file
            .write(t_off + at, &bytes, WriteFlags::default())
            .await
    }

    /// Host clusters the entry holds (to release when it is replaced).
    fn held_clusters(&self, e: u64) -> Vec<u64> {
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
    async fn release(&self, meta: &mut Refcounts, clusters: Vec<u64>) -> BlockResult<()> {
        if clusters.is_empty() {
            return Ok(());
        }
        self.file.flush().await?;
        let _g = self.free_guard.write().await;
        for c in clusters {
            meta.change(c >> self.bits, -1).await?;
        }
        Ok(())
    }

    /// Fill for the part of a subcluster a write does not cover: zeroes,
    /// or the backing file's data.
    async fn sc_fill(&self, state: u8, g: u64, buf: &mut [u8]) -> BlockResult<()> {
        if state == 1 {
            buf.fill(0);
            Ok(())
        } else {
            self.read_backing(g, buf).await
        }
    }

    /// Writes `data` (inside one cluster) at guest offset `g`, allocating
    /// or copying the cluster as needed.
    async fn write_cluster(
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
    async fn fill_partial_subclusters(
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

    async fn flush_all(&self) -> BlockResult<()> {
        if self.external {
            self.data.flush().await?;
        }
        self.file.flush().await
    }

    /// Zeroes or discards whole clusters (whole subclusters with extended
    /// L2) in metadata. `discard`: QEMU's rules for a discarded cluster;
    /// otherwise the range must read as zeroes afterwards.
    async fn zero_clusters(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        discard: bool,
        full: bool,
    ) -> BlockResult<()> {
        let v3 = self.header().version >= 3;
        let mut meta = self.meta.lock().await;
        let mut released = Vec::new();
        let unit = 1u64 << self.sc_bits;
        let mut g = offset;
        let end = offset + len;
        while g < end {
            let base = g & !(self.cs() - 1);
            let stop = end.min(base + self.cs());
            // The image's last cluster may be partial.
            let whole = g == base && (stop == base + self.cs() || stop == self.size());
            let (e, bm) = self.entry(g).await?;
            let allocated =
                e & (COMPRESSED | OFFSET_MASK) != 0 || (self.external && e & COPIED != 0);
            if discard
                && !full
                && !allocated
                && self.backing.is_none()
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
                let ne = if discard && self.backing.is_none() && !allocated {
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
        self.release(&mut meta, released).await
    }

    /// Shrinks the disk as QEMU does: the clusters past the new end are
    /// dropped (so are L2 tables no longer needed), then the file is cut
    /// after its last used cluster.
    async fn shrink(&self, size: u64) -> BlockResult<()> {
        if self.header().nb_snapshots > 0 {
            return Err(BlockError::unsupported(
                "Can't resize an image which has snapshots",
            ));
        }
        let start = size.next_multiple_of(self.cs());
        if start < self.size() {
            self.zero_clusters(start, self.size() - start, true, true, true)
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
        self.release(&mut meta, released).await?;
        self.file
            .write(header::OFF_SIZE, &size.to_be_bytes(), WriteFlags::default())
            .await?;
        self.file.flush().await?;
        self.size.store(size, Ordering::Release);
        if let Ok(mut h) = self.header.lock() {
            h.size = size;
        }
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
    pub async fn preallocate(&self, mode: &str, sh: &crate::jobs::Shared) -> BlockResult<()> {
        let size = self.size();
        let cs = self.cs();
        let mut meta = self.meta.lock().await;
        let mut released = Vec::new();
        let mut end = 0;
        let mut g = 0;
        while g < size {
            if sh.cancelled() {
                return Err(BlockError::new(nix::libc::ECANCELED, crate::jobs::CANCELED));
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
        }
        drop(meta);
        // Metadata preallocation only extends the file.
        if !self.external && self.file.size() < end {
            self.file.truncate(end).await?;
        }
        self.flush_all().await
    }

    fn v2_zero_needs_data(&self) -> bool {
        self.header().version < 3 && self.backing.is_some()
    }
}

impl Driver for Qcow2 {
    fn name(&self) -> &'static str {
        "qcow2"
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn limits(&self) -> Limits {
        Limits {
            request_alignment: 1,
            max_transfer: 32 << 20,
        }
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        self.boundary(self.read_runs(offset, buf))
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        self.boundary(self.write_impl(offset, buf, flags))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.boundary(self.flush_all())
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.boundary(async move {
            self.check_writable()?;
            // Only whole clusters are discarded; the rest is advisory.
            let start = offset.next_multiple_of(self.cs());
            let end = ((offset + len) & !(self.cs() - 1)).max(start);
            let end = if offset + len == self.size() {
                offset + len
            } else {
                end
            };
            if end > start {
                self.zero_clusters(start, end - start, true, true, false)
                    .await?;
            }
            Ok(())
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        self.boundary(async move {
            self.check_writable()?;
            let unit = 1u64 << self.sc_bits;
            let size = self.size();
            let start = offset.next_multiple_of(unit).min(offset + len);
            let mut end = (offset + len) & !(unit - 1);
            if offset + len == size {
                end = offset + len; // the image's last, partial unit
            }
            let end = end.max(start);
            let meta_ok = !self.v2_zero_needs_data() && self.header().version >= 3;
            if !meta_ok || (start == end) {
                if flags.no_fallback {
                    return Err(BlockError::unsupported("write zeroes needs a data write"));
                }
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut g = offset;
                while g < offset + len {
                    let n = ((offset + len - g) as usize).min(zeros.len());
                    self.write_impl(g, &zeros[..n], WriteFlags { fua: false })
                        .await?;
                    g += n as u64;
                }
            } else {
                if flags.no_fallback && (start > offset || end < offset + len) {
                    return Err(BlockError::unsupported("write zeroes needs a data write"));
                }
                let zeros = vec![0u8; unit as usize];
                if start > offset {
                    self.write_impl(
                        offset,
                        &zeros[..(start - offset) as usize],
                        WriteFlags::default(),
                    )
                    .await?;
                }
                self.zero_clusters(start, end - start, flags.may_unmap, false, false)
                    .await?;
                if offset + len > end {
                    self.write_impl(
                        end,
                        &zeros[..(offset + len - end) as usize],
                        WriteFlags::default(),
                    )
                    .await?;
                }
            }
            if flags.fua {
                self.flush_all().await?;
            }
            Ok(())
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        self.boundary(async move {
            let len = len.min(1 << 30);
            let mut run = 0u64;
            let mut kind = None;
            while run < len {
                let p = self.piece(offset + run, offset + len).await?;
                let (m, n) = (p.map, p.len);
                let k = match m {
                    Map::Data(_) | Map::Compressed(_) => 0,
                    Map::Zero => 1,
                    Map::Unalloc => 2,
                };
                if kind.is_some_and(|k0| k0 != k) {
                    break;
                }
                kind = Some(k);
                run += n;
            }
            match kind {
                Some(0) => Ok(Extent {
                    len: run,
                    data: true,
                    zero: false,
                    depth: 1,
                }),
                Some(1) => Ok(Extent {
                    len: run,
                    data: false,
                    zero: true,
                    depth: 1,
                }),
                _ => {
                    let Some(b) = &self.backing else {
                        return Ok(Extent {
                            len: run,
                            data: false,
                            zero: true,
                            depth: 0,
                        });
                    };
                    if offset >= b.size() {
                        return Ok(Extent {
                            len: run,
                            data: false,
                            zero: true,
                            depth: 0,
                        });
                    }
                    let mut x = b.block_status(offset, run.min(b.size() - offset)).await?;
                    x.depth = if x.depth == 0 { 0 } else { x.depth + 1 };
                    Ok(x)
                }
            }
        })
    }
    fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        self.boundary(async move {
            self.check_writable()?;
            let old = self.size();
            if !size.is_multiple_of(512) {
                return Err(BlockError::inval("The new size must be a multiple of 512"));
            }
            if size < old {
                return self.shrink(size).await;
            }
            let mut meta = self.meta.lock().await;
            let need = size.div_ceil(1 << (self.bits + self.l2_bits));
            let have = self.l1.read().map(|l| l.len() as u64).unwrap_or(0);
            if need > have {
                let mut l1 = self.l1.read().map(|l| l.clone()).unwrap_or_default();
                l1.resize(need as usize, 0);
                let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
                let n = (bytes.len() as u64).div_ceil(self.cs());
                let new = meta.alloc(n).await?;
                // Only the table's bytes, as QEMU writes it (the rest of
                // its clusters reads as zeroes).
                self.file.write(new, &bytes, WriteFlags::default()).await?;
                self.file.flush().await?;
                let mut hdr = (need as u32).to_be_bytes().to_vec();
                hdr.extend_from_slice(&new.to_be_bytes());
                self.file
                    .write(header::OFF_L1_SIZE, &hdr, WriteFlags::default())
                    .await?;
                self.file.flush().await?;
                let old_off = self.l1_offset.swap(new, Ordering::AcqRel);
                let old_n = (have * 8).div_ceil(self.cs());
                if let Ok(mut l) = self.l1.write() {
                    *l = l1;
                }
                if let Ok(mut h) = self.header.lock() {
                    h.l1_size = need as u32;
                    h.l1_table_offset = new;
                }
                self.overlap.set_range(overlap::ACTIVE_L1, new, need * 8);
                if old_off != 0 {
                    let _g = self.free_guard.write().await;
                    for k in 0..old_n {
                        meta.change((old_off >> self.bits) + k, -1).await?;
                    }
                }
            }
            self.file
                .write(header::OFF_SIZE, &size.to_be_bytes(), WriteFlags::default())
                .await?;
            self.file.flush().await?;
            self.size.store(size, Ordering::Release);
            if let Ok(mut h) = self.header.lock() {
                h.size = size;
            }
            Ok(())
        })
    }
    fn allocated_size(&self) -> Option<u64> {
        // QEMU sums the storage children: the file and a data file.
        let data = if self.external {
            self.data.allocated_size()?
        } else {
            0
        };
        Some(self.file.allocated_size()? + data)
    }
    /// QEMU's default permissions for a format's children.
    fn child_perms(&self, role: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        if role == "backing" {
            // Only read, and only consistently if the parent needs it.
            let sh = if shared.contains(Perm::WRITE) {
                Perm::WRITE.union(Perm::RESIZE)
            } else {
                Perm::NONE
            };
            let sh = sh.union(Perm::CONSISTENT_READ).union(Perm::WRITE_UNCHANGED);
            return (perm.intersect(Perm::CONSISTENT_READ), sh);
        }
        let (mut p, mut sh) = (perm, shared);
        if role == "file" {
            // Metadata: written even when the guest does not write, and
            // nobody else may write or resize it.
            if !self.read_only {
                p = p.union(Perm::WRITE).union(Perm::RESIZE);
            }
            p = p.union(Perm::CONSISTENT_READ);
            sh = sh.without(Perm::WRITE).without(Perm::RESIZE);
        }
        if role == "data-file" || (role == "file" && !self.external) {
            sh = sh.without(Perm::RESIZE);
            if p.contains(Perm::WRITE_UNCHANGED) {
                p = p.union(Perm::WRITE);
            }
            if p.contains(Perm::WRITE) {
                p = p.union(Perm::RESIZE);
            }
        }
        (p, sh)
    }
    fn format_specific(&self) -> Option<Value> {
        Some(format_specific(self))
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.cs())
    }
    fn backing_file(&self) -> Option<(String, Option<String>, String)> {
        let h = self.header();
        let name = h.backing_file?;
        let full = self.backing_full.clone().unwrap_or_else(|| name.clone());
        Some((name, h.backing_format, full))
    }
}

/// format-specific for query-named-block-nodes / query-block, as QEMU
/// reports it for qcow2.
pub fn format_specific(q: &Qcow2) -> Value {
    let h = q.header();
    let mut data = serde_json::Map::new();
    if h.version >= 3 {
        data.insert("compat".into(), json!("1.1"));
        data.insert(
            "compression-type".into(),
            json!(if h.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            }),
        );
        data.insert(
            "lazy-refcounts".into(),
            json!(h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0),
        );
        data.insert("refcount-bits".into(), json!(h.refcount_bits()));
        data.insert(
            "corrupt".into(),
            json!(
                h.incompatible & header::INCOMPAT_CORRUPT != 0 || q.corrupt.load(Ordering::Acquire)
            ),
        );
        data.insert("extended-l2".into(), json!(h.extended_l2()));
        if let Some(f) = &h.data_file {
            data.insert("data-file".into(), json!(f));
        }
        if h.has_data_file() {
            data.insert(
                "data-file-raw".into(),
                json!(h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0),
            );
        }
    } else {
        data.insert("compat".into(), json!("0.10"));
        data.insert("compression-type".into(), json!("zlib"));
        data.insert("refcount-bits".into(), json!(h.refcount_bits()));
    }
    json!({"type": "qcow2", "data": Value::Object(data)})
}

#[cfg(test)]
mod tests;
