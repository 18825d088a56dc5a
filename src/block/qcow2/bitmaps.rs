//! Persistent dirty bitmaps: the qcow2 bitmaps extension (qcow2 spec,
//! "Bitmaps"). The header extension points at a bitmap directory; each
//! entry names a bitmap and its bitmap table, whose entries point at
//! clusters of serialized bits (0: all zeroes, 1: all ones).
//!
//! As QEMU does: bitmaps are loaded on open; a read-write open marks
//! them in-use on disk (a crash leaves them inconsistent); close writes
//! every consistent persistent bitmap anew (data, tables, directory),
//! switches the header to the new directory, then frees the old
//! clusters. Bitmaps found in-use are inconsistent: kept as they are
//! on disk, never recorded into, until removed.
use std::sync::Arc;

use super::header::{self, BitmapsExt, Header};
use super::refcount::Refcounts;
use super::Image;
use crate::block::bitmap::DirtyBitmap;
use crate::block::dirty::NamedBitmap;
use crate::block::driver::{BitmapStoreError, WriteFlags};
use crate::block::error::{BlockError, BlockResult};
use crate::block::node::Node;

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const TYPE_DIRTY_TRACKING: u8 = 1;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
const MAX_NAME: usize = 1023;
/// QEMU's BME_MAX_TABLE_SIZE and BME_MAX_PHYS_SIZE.
const MAX_TABLE_SIZE: u64 = 0x800_0000;
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Bits 9-55 of a bitmap table entry: the data cluster's offset.
const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// One bitmap directory entry, as on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub granularity_bits: u8,
    pub name: String,
    /// Extra data (only with the extra-data-compatible flag), kept.
    pub extra: Vec<u8>,
}

impl DirEntry {
    fn len(&self) -> usize {
        (24 + self.extra.len() + self.name.len()).next_multiple_of(8)
    }
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn bad(msg: impl Into<String>) -> BlockError {
    BlockError::inval(msg)
}

/// Bitmap table entries a bitmap of `size` bytes needs.
fn table_entries(size: u64, granularity: u64, cs: u64) -> u64 {
    size.div_ceil(granularity).div_ceil(8).div_ceil(cs)
}

/// Parses `n` directory entries, with the checks QEMU makes; every
/// table must lie inside the file (`file_size`).
pub fn parse_dir(
    b: &[u8],
    n: u32,
    cs: u64,
    disk_size: u64,
    file_size: u64,
) -> BlockResult<Vec<DirEntry>> {
    let mut out: Vec<DirEntry> = Vec::new();
    let mut at = 0usize;
    for _ in 0..n {
        if at + 24 > b.len() {
            return Err(bad("Bitmap directory is broken"));
        }
        let name_size = u16::from_be_bytes([b[at + 18], b[at + 19]]) as usize;
        let extra_size = be32(b, at + 20) as usize;
        let end = at + 24 + extra_size + name_size;
        if end > b.len() || name_size > MAX_NAME {
            return Err(bad("Bitmap directory is broken"));
        }
        let e = DirEntry {
            table_offset: be64(b, at),
            table_size: be32(b, at + 8),
            flags: be32(b, at + 12),
            granularity_bits: b[at + 17],
            extra: b[at + 24..at + 24 + extra_size].to_vec(),
            name: String::from_utf8_lossy(&b[at + 24 + extra_size..end]).into_owned(),
        };
        let kind = b[at + 16];
        if kind != TYPE_DIRTY_TRACKING
            || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits)
            || !e.table_offset.is_multiple_of(cs)
            || e.table_offset == 0
            || u64::from(e.table_size) > MAX_TABLE_SIZE
            || (e.flags & FLAG_IN_USE == 0
                && u64::from(e.table_size) != table_entries(disk_size, e.granularity(), cs))
            || (extra_size > 0 && e.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0)
            || e.flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE) != 0
            || e.table_offset.saturating_add(u64::from(e.table_size) * 8) > file_size
            || e.name.is_empty()
            || out.iter().any(|o| o.name == e.name)
        {
            return Err(bad(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                e.name
            )));
        }
        at += e.len();
        out.push(e);
    }
    Ok(out)
}

pub fn dir_bytes(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let start = out.len();
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(TYPE_DIRTY_TRACKING);
        out.push(e.granularity_bits);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&e.extra);
        out.extend_from_slice(e.name.as_bytes());
        out.resize(start + e.len(), 0);
    }
    out
}

fn table_from(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

/// What an open found: the directory as on disk (after marking in-use)
/// and the bitmaps for the node.
pub struct Loaded {
    pub dir: Vec<DirEntry>,
    pub bitmaps: Vec<NamedBitmap>,
}

/// Loads the bitmaps of the image on `file` (QEMU's
/// qcow2_load_dirty_bitmaps); on a read-write open the consistent ones
/// are then marked in-use on disk, in place.
pub async fn load(
    file: &Arc<Node>,
    h: &Header,
    disk_size: u64,
    read_only: bool,
) -> BlockResult<Loaded> {
    let Some(ext) = h.bitmaps else {
        return Ok(Loaded {
            dir: Vec::new(),
            bitmaps: Vec::new(),
        });
    };
    let cs = h.cluster_size();
    let mut raw = vec![0u8; ext.dir_size as usize];
    file.read(ext.dir_offset, &mut raw).await?;
    let mut dir = parse_dir(&raw, ext.nb_bitmaps, cs, disk_size, file.size())?;
    let mut bitmaps = Vec::new();
    for e in &dir {
        let bits = Arc::new(DirtyBitmap::new(disk_size, e.granularity()));
        let in_use = e.flags & FLAG_IN_USE != 0;
        if !in_use {
            read_bits(file, e, &bits, cs).await?;
        }
        bitmaps.push(NamedBitmap::loaded(
            &e.name,
            bits,
            e.flags & FLAG_AUTO != 0,
            in_use,
            read_only,
        ));
    }
    if !read_only && dir.iter().any(|e| e.flags & FLAG_IN_USE == 0) {
        for e in dir.iter_mut() {
            e.flags |= FLAG_IN_USE;
        }
        file.write(ext.dir_offset, &dir_bytes(&dir), WriteFlags::default())
            .await?;
        file.flush().await?;
    }
    Ok(Loaded { dir, bitmaps })
}

async fn read_bits(file: &Node, e: &DirEntry, bits: &DirtyBitmap, cs: u64) -> BlockResult<()> {
    let mut raw = vec![0u8; e.table_size as usize * 8];
    file.read(e.table_offset, &mut raw).await?;
    let per_cluster = cs * 8; // granules one data cluster holds
    let mut buf = vec![0u8; cs as usize];
    for (i, entry) in table_from(&raw).into_iter().enumerate() {
        let first = i as u64 * per_cluster;
        let off = entry & ENTRY_OFFSET_MASK;
        if off == 0 {
            if entry & 1 != 0 {
                bits.set(first * e.granularity(), per_cluster * e.granularity());
            }
            continue;
        }
        if entry & 0x1ff != 0 || entry & !ENTRY_OFFSET_MASK & !0x1ff != 0 {
            return Err(bad(format!("Bitmap '{}' has a broken table", e.name)));
        }
        file.read(off, &mut buf).await?;
        bits.or_le_bytes(first, &buf);
    }
    Ok(())
}

/// QEMU's checks before a bitmap is made persistent in a qcow2 image.
pub fn can_store(
    h: &Header,
    disk_size: u64,
    name: &str,
    granularity: u64,
    stored: &[String],
) -> Result<(), BitmapStoreError> {
    let invalid = |m: &str| Err(BitmapStoreError::Invalid(m.to_string()));
    if h.version < 3 {
        return invalid("Cannot store dirty bitmaps in qcow2 v2 files");
    }
    let gbits = granularity.trailing_zeros();
    if gbits > u32::from(MAX_GRANULARITY_BITS) {
        return invalid("Granularity exceeds maximum (2147483648 bytes)");
    }
    if gbits < u32::from(MIN_GRANULARITY_BITS) {
        return invalid("Granularity is under minimum (512 bytes)");
    }
    let bytes = disk_size.div_ceil(granularity).div_ceil(8);
    if bytes > MAX_PHYS_SIZE || bytes.div_ceil(h.cluster_size()) > MAX_TABLE_SIZE {
        return invalid("Too much space will be occupied by the bitmap. Use larger granularity");
    }
    if name.len() > MAX_NAME {
        return invalid("Name length exceeds maximum (1023 characters)");
    }
    if stored.len() >= header::MAX_BITMAPS as usize {
        return invalid("Maximum number of persistent bitmaps is already reached");
    }
    let dir: u64 = stored
        .iter()
        .chain(std::iter::once(&name.to_string()))
        .map(|n| (24 + n.len() as u64).next_multiple_of(8))
        .sum();
    if dir > header::MAX_BITMAP_DIRECTORY_SIZE {
        return invalid("Not enough space in the bitmap directory");
    }
    Ok(())
}

/// The clusters an entry owns: its table and its data clusters.
async fn owned_clusters(file: &Node, e: &DirEntry, cs: u64) -> BlockResult<Vec<u64>> {
    let mut raw = vec![0u8; e.table_size as usize * 8];
    file.read(e.table_offset, &mut raw).await?;
    let mut out: Vec<u64> = table_from(&raw)
        .into_iter()
        .map(|x| x & ENTRY_OFFSET_MASK)
        .filter(|o| *o != 0)
        .collect();
    let table_clusters = (u64::from(e.table_size) * 8).div_ceil(cs).max(1);
    out.extend((0..table_clusters).map(|i| e.table_offset + i * cs));
    Ok(out)
}

impl Image {
    /// Writes one bitmap's data clusters and table; returns its entry.
    async fn write_bitmap(
        &self,
        meta: &mut Refcounts,
        b: &NamedBitmap,
        cs: u64,
    ) -> BlockResult<DirEntry> {
        let g = b.bits.granularity();
        let n = table_entries(b.bits.size(), g, cs).max(1);
        let bytes = b.bits.to_le_bytes();
        let mut table = Vec::with_capacity(n as usize);
        for i in 0..n {
            let start = (i * cs) as usize;
            let chunk = bytes.get(start..(start + cs as usize).min(bytes.len()));
            match chunk {
                Some(c) if c.iter().any(|x| *x != 0) => {
                    let off = meta.alloc(1).await?;
                    let mut buf = c.to_vec();
                    buf.resize(cs as usize, 0);
                    self.file.write(off, &buf, WriteFlags::default()).await?;
                    table.push(off);
                }
                _ => table.push(0),
            }
        }
        let table_bytes: Vec<u8> = table.iter().flat_map(|x| x.to_be_bytes()).collect();
        let clusters = (table_bytes.len() as u64).div_ceil(cs).max(1);
        let at = meta.alloc(clusters).await?;
        let mut buf = table_bytes;
        buf.resize((clusters * cs) as usize, 0);
        self.file.write(at, &buf, WriteFlags::default()).await?;
        Ok(DirEntry {
            table_offset: at,
            table_size: n as u32,
            flags: if b.enabled() { FLAG_AUTO } else { 0 },
            granularity_bits: g.trailing_zeros() as u8,
            name: b.name.clone(),
            extra: Vec::new(),
        })
    }

    /// Stores the node's persistent bitmaps on close (QEMU's
    /// qcow2_store_persistent_dirty_bitmaps): new clusters for every
    /// consistent one, inconsistent ones kept as they are on disk, then
    /// the header switched to the new directory in one write, then the
    /// old clusters freed. Bitmaps no longer in `list` leave the image.
    pub(super) async fn store_bitmaps(&self, list: &[Arc<NamedBitmap>]) -> BlockResult<()> {
        if !self.writable() {
            return Ok(());
        }
        let old = self
            .bitmap_dir
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        let persistent: Vec<&Arc<NamedBitmap>> = list.iter().filter(|b| b.persistent()).collect();
        if old.is_empty() && persistent.is_empty() {
            return Ok(());
        }
        let cs = self.cs();
        let mut meta = self.meta.lock().await;
        let mut dir = Vec::new();
        let mut kept = Vec::new();
        // Directory order: oldest first (the node lists newest first).
        for b in persistent.iter().rev() {
            if b.inconsistent {
                if let Some(e) = old.iter().find(|e| e.name == b.name) {
                    kept.push(e.name.clone());
                    dir.push(e.clone());
                }
                continue;
            }
            dir.push(self.write_bitmap(&mut meta, b, cs).await?);
        }
        let mut freed = Vec::new();
        for e in old.iter().filter(|e| !kept.contains(&e.name)) {
            freed.extend(owned_clusters(&self.file, e, cs).await?);
        }
        self.switch_dir(&mut meta, dir, freed).await
    }

    /// The image became writable: its bitmaps are marked in use on
    /// disk, in place, as on a read-write open.
    pub(super) async fn mark_bitmaps_in_use(&self) -> BlockResult<()> {
        if !self.writable() {
            return Ok(());
        }
        let _meta = self.meta.lock().await;
        let Some(ext) = self.header().bitmaps else {
            return Ok(());
        };
        let mut dir = self
            .bitmap_dir
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        if dir.iter().all(|e| e.flags & FLAG_IN_USE != 0) {
            return Ok(());
        }
        for e in dir.iter_mut() {
            e.flags |= FLAG_IN_USE;
        }
        self.file
            .write(ext.dir_offset, &dir_bytes(&dir), WriteFlags::default())
            .await?;
        self.file.flush().await?;
        if let Ok(mut d) = self.bitmap_dir.lock() {
            *d = dir;
        }
        Ok(())
    }

    /// Takes a stored bitmap out of the image at once, as QEMU's
    /// block-dirty-bitmap-remove does (nothing if it is not stored yet).
    pub(super) async fn remove_stored_bitmap(&self, name: &str) -> BlockResult<()> {
        if !self.writable() {
            return Ok(());
        }
        let mut meta = self.meta.lock().await;
        let old = self
            .bitmap_dir
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        let Some(gone) = old.iter().find(|e| e.name == name) else {
            return Ok(());
        };
        let freed = owned_clusters(&self.file, gone, self.cs()).await?;
        let dir = old.iter().filter(|e| e.name != name).cloned().collect();
        self.switch_dir(&mut meta, dir, freed).await
    }

    /// Writes `dir` as the new directory, makes everything stable, points
    /// the header at it, then frees `freed` and the old directory.
    async fn switch_dir(
        &self,
        meta: &mut Refcounts,
        dir: Vec<DirEntry>,
        mut freed: Vec<u64>,
    ) -> BlockResult<()> {
        let cs = self.cs();
        let ext = if dir.is_empty() {
            None
        } else {
            let raw = dir_bytes(&dir);
            let clusters = (raw.len() as u64).div_ceil(cs);
            let at = meta.alloc(clusters).await?;
            let mut buf = raw.clone();
            buf.resize((clusters * cs) as usize, 0);
            self.file.write(at, &buf, WriteFlags::default()).await?;
            Some(BitmapsExt {
                nb_bitmaps: dir.len() as u32,
                dir_size: raw.len() as u64,
                dir_offset: at,
            })
        };
        if let Some(e) = self.header().bitmaps {
            let clusters = e.dir_size.div_ceil(cs).max(1);
            freed.extend((0..clusters).map(|i| e.dir_offset + i * cs));
        }
        // Everything the new header names is stable before it does.
        self.writeback(meta).await?;
        self.sync(meta).await?;
        self.set_bitmaps_ext(ext).await?;
        let (at, len) = ext.map_or((0, 0), |e| (e.dir_offset, e.dir_size));
        self.overlap
            .set_range(super::overlap::BITMAP_DIRECTORY, at, len);
        for off in freed {
            meta.change(off / cs, -1).await?;
        }
        self.writeback(meta).await?;
        self.sync(meta).await?;
        if let Ok(mut d) = self.bitmap_dir.lock() {
            *d = dir;
        }
        Ok(())
    }

    /// Rewrites the first cluster with the bitmaps extension `ext` (and
    /// the autoclear bit that makes QEMU trust it), synced.
    pub(super) async fn set_bitmaps_ext(&self, ext: Option<BitmapsExt>) -> BlockResult<()> {
        let mut h = self.header();
        let mut first = vec![0u8; h.cluster_size() as usize];
        self.file.read(0, &mut first).await?;
        let mut new = header::with_bitmaps(&first, &h, ext).map_err(BlockError::inval)?;
        if ext.is_some() {
            h.autoclear |= header::AUTOCLEAR_BITMAPS;
        } else {
            h.autoclear &= !header::AUTOCLEAR_BITMAPS;
        }
        if h.version >= 3 {
            new[header::OFF_AUTOCLEAR as usize..header::OFF_AUTOCLEAR as usize + 8]
                .copy_from_slice(&h.autoclear.to_be_bytes());
        }
        self.file.write(0, &new, WriteFlags::default()).await?;
        self.file.flush().await?;
        if let Ok(mut hh) = self.header.lock() {
            hh.autoclear = h.autoclear;
            hh.bitmaps = ext;
            hh.has_bitmaps = ext.is_some();
            hh.backing_file_offset = u64::from_be_bytes(new[8..16].try_into().unwrap_or([0; 8]));
        }
        Ok(())
    }

    /// Qcow2BitmapInfo of the directory, for format-specific.
    pub(super) fn bitmap_infos(&self) -> Vec<serde_json::Value> {
        let dir = self
            .bitmap_dir
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        dir.iter()
            .map(|e| {
                let mut flags = Vec::new();
                if e.flags & FLAG_IN_USE != 0 {
                    flags.push("in-use");
                }
                if e.flags & FLAG_AUTO != 0 {
                    flags.push("auto");
                }
                serde_json::json!({"flags": flags, "name": e.name, "granularity": e.granularity()})
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_round_trips_and_is_checked() {
        let cs = 65536;
        let e = DirEntry {
            table_offset: 3 * cs,
            table_size: 1,
            flags: FLAG_AUTO,
            granularity_bits: 16,
            name: "b1".into(),
            extra: Vec::new(),
        };
        let f = DirEntry {
            name: "second".into(),
            flags: FLAG_IN_USE,
            table_size: 7,
            ..e.clone()
        };
        let raw = dir_bytes(&[e.clone(), f.clone()]);
        assert_eq!(raw.len(), 32 + 32);
        assert_eq!(
            parse_dir(&raw, 2, cs, 1 << 20, 1 << 30).expect("valid"),
            vec![e.clone(), f]
        );
        // A consistent entry's table must fit the disk.
        assert!(parse_dir(&raw, 1, cs, 1 << 40, 1 << 30).is_err());
        // A table past the end of the file.
        assert!(parse_dir(&raw, 1, cs, 1 << 20, 3 * cs).is_err());
        // Unknown flags.
        let mut flags = raw.clone();
        flags[12] = 0x80;
        assert!(parse_dir(&flags, 1, cs, 1 << 20, 1 << 30).is_err());
        // Truncated, or more entries than bytes.
        assert!(parse_dir(&raw[..40], 2, cs, 1 << 20, 1 << 30).is_err());
        let mut bad_type = raw.clone();
        bad_type[16] = 2;
        assert!(parse_dir(&bad_type, 1, cs, 1 << 20, 1 << 30).is_err());
        let dup = dir_bytes(&[e.clone(), e]);
        assert!(parse_dir(&dup, 2, cs, 1 << 20, 1 << 30).is_err());
    }

    /// Random mutations of a directory never panic the parser.
    #[test]
    fn mutated_directories_never_panic() {
        let cs = 65536;
        let e = DirEntry {
            table_offset: 3 * cs,
            table_size: 1,
            flags: FLAG_AUTO,
            granularity_bits: 16,
            name: "bitmap".into(),
            extra: Vec::new(),
        };
        let base = dir_bytes(&[e.clone(), e]);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20000 {
            let mut b = base.clone();
            for _ in 0..(next() % 6 + 1) {
                let at = (next() % b.len() as u64) as usize;
                b[at] = next() as u8;
            }
            let cut = (next() % (b.len() as u64 + 1)) as usize;
            let n = (next() % 4) as u32;
            if let Ok(d) = parse_dir(&b[..cut], n, cs, 1 << 20, 1 << 30) {
                assert_eq!(d.len(), n as usize);
                assert!(d.iter().all(|x| x.table_offset % cs == 0));
            }
        }
    }
}
