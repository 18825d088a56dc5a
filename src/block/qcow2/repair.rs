//! Repairs the refcounts of a dirty image (lazy refcounts: QEMU skipped
//! refcount updates and set the dirty bit). Counts every reference the
//! metadata makes, as `qemu-img check` does, and rewrites the refcounts
//! that differ; then the dirty bit is cleared.
//!
//! The metadata is hostile input: every table is checked to lie inside
//! the file before it is read, each L2 table is read once however many
//! L1 entries share it, only the counted clusters and the entries of the
//! existing refcount blocks are visited, and long loops yield.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::super::driver::WriteFlags;
use super::super::error::BlockResult;
use super::super::node::Node;
use super::header::{Header, OFF_INCOMPAT};
use super::l2::{compressed, COMPRESSED, OFFSET_MASK};
use super::refcount::{corrupt, tick, Refcounts};

struct Counter {
    bits: u32,
    counts: BTreeMap<u64, u64>,
    steps: u64,
}

impl Counter {
    /// `n` references to each cluster of `len` bytes at `off` (callers
    /// bound `len`: at most a table's size).
    async fn add(&mut self, off: u64, len: u64, n: u64) -> BlockResult<()> {
        if len == 0 {
            return Ok(());
        }
        let Some(last) = off.checked_add(len - 1) else {
            return Err(corrupt(format!(
                "Metadata at {off:#x} of {len} bytes lies beyond the end of the image file"
            )));
        };
        for c in off >> self.bits..=last >> self.bits {
            let v = self.counts.entry(c).or_insert(0);
            *v = v.saturating_add(n);
            tick(&mut self.steps).await;
        }
        Ok(())
    }
}

async fn read_u64s(file: &Node, off: u64, n: u64) -> BlockResult<Vec<u64>> {
    if off.saturating_add(n.saturating_mul(8)) > file.size() {
        return Err(corrupt("table beyond the end of the image file"));
    }
    let mut b = vec![0u8; (n * 8) as usize];
    file.read(off, &mut b).await?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// Counts the references one L1 table makes to itself and to its L2
/// tables; notes in `l2s` how often each L2 table is referenced.
async fn count_l1(
    file: &Node,
    h: &Header,
    c: &mut Counter,
    l2s: &mut HashMap<u64, u64>,
    l1_off: u64,
    l1_size: u64,
) -> BlockResult<()> {
    let cs = h.cluster_size();
    let l1 = read_u64s(file, l1_off, l1_size).await?;
    c.add(l1_off, l1_size * 8, 1).await?;
    for e in l1 {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if !l2.is_multiple_of(cs) || l2.saturating_add(cs) > file.size() {
            return Err(corrupt(format!("L2 table offset {l2:#x} is invalid")));
        }
        *l2s.entry(l2).or_insert(0) += 1;
        tick(&mut c.steps).await;
    }
    Ok(())
}

/// Counts the references of each distinct L2 table, read once: its own
/// cluster and its data, once per L1 entry that points at it (as QEMU
/// counts them).
async fn count_l2s(
    file: &Node,
    h: &Header,
    c: &mut Counter,
    l2s: &HashMap<u64, u64>,
    external: bool,
) -> BlockResult<()> {
    let cs = h.cluster_size();
    let fsize = file.size();
    let step = if h.extended_l2() { 2 } else { 1 };
    for (&l2, &n) in l2s {
        c.add(l2, cs, n).await?;
        let words = read_u64s(file, l2, cs / 8).await?;
        for w in words.iter().step_by(step) {
            let (off, len) = if w & COMPRESSED != 0 {
                let z = compressed(*w, h.cluster_bits);
                (z.offset, z.len)
            } else if w & OFFSET_MASK != 0 && !external {
                (w & OFFSET_MASK, cs)
            } else {
                continue;
            };
            if off >= fsize {
                return Err(corrupt(format!(
                    "Cluster at {off:#x} (L2 table at {l2:#x}) lies beyond the end of the image file"
                )));
            }
            c.add(off, len, n).await?;
        }
    }
    Ok(())
}

/// The bitmap directory, the bitmap tables and their data clusters
/// (qemu-img check counts them too).
async fn count_bitmaps(file: &Arc<Node>, h: &Header, c: &mut Counter) -> BlockResult<()> {
    let Some(ext) = h.bitmaps else {
        return Ok(());
    };
    let cs = h.cluster_size();
    if ext.dir_offset.saturating_add(ext.dir_size) > file.size() {
        return Err(corrupt("bitmap directory beyond the end of the image file"));
    }
    let mut raw = vec![0u8; ext.dir_size as usize];
    file.read(ext.dir_offset, &mut raw).await?;
    c.add(ext.dir_offset, ext.dir_size.max(1), 1).await?;
    let dir = super::bitmaps::parse_dir(&raw, ext.nb_bitmaps, cs, h.size & !511, file.size())?;
    for e in dir {
        let n = u64::from(e.table_size);
        c.add(e.table_offset, (n * 8).max(1), 1).await?;
        for entry in read_u64s(file, e.table_offset, n).await? {
            let off = entry & 0x00ff_ffff_ffff_fe00;
            if off != 0 {
                c.add(off, cs, 1).await?;
            }
        }
    }
    Ok(())
}

pub async fn repair(file: &Arc<Node>, h: &mut Header, refs: &mut Refcounts) -> BlockResult<()> {
    let cs = h.cluster_size();
    let mut c = Counter {
        bits: h.cluster_bits,
        counts: BTreeMap::new(),
        steps: 0,
    };
    c.add(0, cs, 1).await?;
    let external = h.has_data_file();
    let mut l2s = HashMap::new();
    count_l1(
        file,
        h,
        &mut c,
        &mut l2s,
        h.l1_table_offset,
        u64::from(h.l1_size),
    )
    .await?;
    c.add(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        1,
    )
    .await?;
    for bi in refs.existing_blocks() {
        let b = refs.table[bi as usize];
        c.add(b, cs, 1).await?;
    }
    // The snapshot table and each snapshot's L1 table, once their bounds
    // are known to be sane.
    let snaps = super::snapshot::read(file, h).await?;
    snaps.check_l1()?;
    for (l1_off, l1_size) in &snaps.l1_tables {
        count_l1(file, h, &mut c, &mut l2s, *l1_off, *l1_size).await?;
    }
    count_l2s(file, h, &mut c, &l2s, external).await?;
    c.add(h.snapshots_offset, snaps.table_len, 1).await?;
    count_bitmaps(file, h, &mut c).await?;
    // Rewrite what differs, over every cluster counted or refcounted.
    // New refcount blocks would need a free cluster, and nothing is known
    // free before the repair is done: leave such images to qemu-img.
    let end = refs.end.max(c.counts.keys().last().map_or(0, |k| k + 1));
    for &cl in c.counts.keys() {
        if !refs.covers(cl) {
            return Err(corrupt(
                "qcow2: the dirty image needs new refcount blocks; repair it with 'qemu-img check -r all'",
            ));
        }
    }
    let mut steps = 0;
    for bi in refs.existing_blocks() {
        refs.rewrite_block(bi, end, &c.counts, &mut steps).await?;
    }
    refs.end = end;
    file.flush().await?;
    h.incompatible &= !super::header::INCOMPAT_DIRTY;
    file.write(
        OFF_INCOMPAT,
        &h.incompatible.to_be_bytes(),
        WriteFlags::default(),
    )
    .await?;
    file.flush().await
}
