//! Guest offsets to host data: L1/L2 lookups (through the L2 cache),
//! entry classification, and reads from data, zeroes, the backing node
//! or the decompressor.
use std::sync::Arc;

use super::l2::{self, Map, Table, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::refcount::corrupt;
use super::{Header, Image, Piece};
use crate::block::error::BlockResult;

impl Image {
    pub(super) fn cs(&self) -> u64 {
        1 << self.bits
    }

    pub fn header(&self) -> Header {
        self.header.lock().map(|h| h.clone()).unwrap_or_default()
    }

    pub(super) fn l1_entry(&self, l1i: u64) -> u64 {
        self.l1
            .read()
            .ok()
            .and_then(|l| l.get(l1i as usize).copied())
            .unwrap_or(0)
    }

    /// A metadata cluster's offset must be aligned and inside the file.
    pub(super) fn check_meta(&self, off: u64, what: &str) -> BlockResult<()> {
        if !off.is_multiple_of(self.cs())
            || off == 0
            || off.saturating_add(self.cs()) > self.file.size()
        {
            return Err(corrupt(format!("{what} offset {off:#x} is invalid")));
        }
        Ok(())
    }

    pub(super) async fn table(&self, off: u64) -> BlockResult<Arc<Table>> {
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
    pub(super) async fn entry(&self, g: u64) -> BlockResult<(u64, u64)> {
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
    pub(super) fn sc_state(bitmap: u64, i: u32) -> BlockResult<u8> {
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
    pub(super) fn classify(
        &self,
        e: u64,
        bm: u64,
        in_off: u64,
        max: u64,
    ) -> BlockResult<(Map, u64)> {
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
    pub(super) async fn piece(&self, g: u64, end: u64) -> BlockResult<Piece> {
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
    pub(super) async fn runs(&self, offset: u64, len: u64) -> BlockResult<Vec<(u64, u64, Map)>> {
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
    pub(super) async fn read_backing(&self, g: u64, buf: &mut [u8]) -> BlockResult<()> {
        let Some(b) = self.backing.enter().await else {
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

    /// Guest data (at guest offset `g`) from host offset `h`, decrypted
    /// in an encrypted image (whole sectors there: see `Qcow2::read`).
    pub(super) async fn read_data(&self, h: u64, g: u64, dst: &mut [u8]) -> BlockResult<()> {
        self.data.read(h, dst).await?;
        if let Some(c) = &self.crypt {
            c.decrypt(h, g, dst);
        }
        Ok(())
    }

    /// A compressed cluster's content.
    pub(super) async fn decompress(&self, e: u64) -> BlockResult<Vec<u8>> {
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
        super::compress::decompress(kind, &src, self.cs() as usize)
    }

    pub(super) async fn read_runs(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.check_usable()?;
        for (g, n, m) in self.runs(offset, buf.len() as u64).await? {
            let at = (g - offset) as usize;
            let dst = &mut buf[at..at + n as usize];
            match m {
                Map::Data(h) => self.read_data(h, g, dst).await?,
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
    pub(super) async fn cluster_content(&self, ci: u64, e: u64, bm: u64) -> BlockResult<Vec<u8>> {
        let mut c = vec![0u8; self.cs() as usize];
        let base = ci << self.bits;
        let mut pos = 0;
        while pos < self.cs() {
            let (m, n) = self.classify(e, bm, pos, self.cs() - pos)?;
            let dst = &mut c[pos as usize..(pos + n) as usize];
            match m {
                Map::Data(h) => self.read_data(h, base + pos, dst).await?,
                Map::Zero => {}
                Map::Unalloc => self.read_backing(base + pos, dst).await?,
                Map::Compressed(e) => dst
                    .copy_from_slice(&self.decompress(e).await?[pos as usize..(pos + n) as usize]),
            }
            pos += n;
        }
        Ok(c)
    }
}
