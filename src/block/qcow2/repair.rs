//! Repairs the refcounts of a dirty image (lazy refcounts: QEMU skipped
//! refcount updates and set the dirty bit). Counts every reference the
//! metadata makes, as `qemu-img check` does, and rewrites the refcounts
//! that differ; then the dirty bit is cleared.
use std::collections::BTreeMap;
use std::sync::Arc;

use super::super::driver::WriteFlags;
use super::super::error::BlockResult;
use super::super::node::Node;
use super::header::{Header, OFF_INCOMPAT};
use super::l2::{compressed, COMPRESSED, OFFSET_MASK};
use super::refcount::{corrupt, Refcounts};

struct Counter {
    bits: u32,
    counts: BTreeMap<u64, u64>,
}

impl Counter {
    /// One reference to each cluster of `len` bytes at `off`.
    fn add(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off >> self.bits;
        let last = (off + len - 1) >> self.bits;
        for c in first..=last {
            *self.counts.entry(c).or_insert(0) += 1;
        }
    }
}

async fn read_u64s(file: &Node, off: u64, n: u64) -> BlockResult<Vec<u64>> {
    if off.saturating_add(n * 8) > file.size() {
        return Err(corrupt("table beyond the end of the image file"));
    }
    let mut b = vec![0u8; (n * 8) as usize];
    file.read(off, &mut b).await?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// Counts the references one L1 table makes (its L2 tables, their data).
async fn count_l1(
    file: &Node,
    h: &Header,
    c: &mut Counter,
    l1_off: u64,
    l1_size: u64,
    external: bool,
) -> BlockResult<()> {
    let cs = h.cluster_size();
    c.add(l1_off, l1_size * 8);
    let ext = h.extended_l2();
    for e in read_u64s(file, l1_off, l1_size).await? {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        c.add(l2, cs);
        let words = read_u64s(file, l2, cs / 8).await?;
        let step = if ext { 2 } else { 1 };
        for w in words.iter().step_by(step) {
            if w & COMPRESSED != 0 {
                let z = compressed(*w, h.cluster_bits);
                c.add(z.offset, z.len);
            } else if w & OFFSET_MASK != 0 && !external {
                c.add(w & OFFSET_MASK, cs);
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
    };
    c.add(0, cs);
    let external = h.has_data_file();
    count_l1(
        file,
        h,
        &mut c,
        h.l1_table_offset,
        u64::from(h.l1_size),
        external,
    )
    .await?;
    c.add(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
    for b in refs.table.clone() {
        if b != 0 {
            c.add(b, cs);
        }
    }
    // The snapshot table and each snapshot's L1 table.
    let snaps = super::snapshot::read(file, h).await?;
    for (l1_off, l1_size) in &snaps.l1_tables {
        count_l1(file, h, &mut c, *l1_off, *l1_size, external).await?;
    }
    c.add(h.snapshots_offset, snaps.table_len);
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
    for cl in 0..end {
        let want = c.counts.get(&cl).copied().unwrap_or(0);
        let have = refs.get(cl).await?;
        if want != have {
            refs.set(cl, want).await?;
        }
    }
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
