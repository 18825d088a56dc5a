//! Reference counts: the refcount table and its blocks, and the cluster
//! allocator. Lives inside the driver's metadata lock. Refcount blocks
//! are cached write-back: a change marks its block dirty, and dirty
//! blocks are written (and synced) before any L2 table that points at the
//! clusters they count (mod.rs), so a crash can leak clusters but never
//! leave a reference to a cluster counted as free. Counts only ever go
//! down after the pointers that held them are stable, so a refcount block
//! may be written back at any time.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use super::super::driver::WriteFlags;
use super::super::error::{BlockError, BlockResult};
use super::super::node::Node;
use super::header::OFF_REFCOUNT_TABLE;
use super::overlap::{Overlap, REFCOUNT_BLOCK, REFCOUNT_TABLE};

pub struct Refcounts {
    overlap: Arc<Overlap>,
    file: Arc<Node>,
    cluster_bits: u32,
    order: u32,
    pub table_offset: u64,
    pub table: Vec<u64>,
    /// Refcount blocks by host offset.
    blocks: HashMap<u64, Block>,
    /// Cached blocks in load order, for eviction.
    lru: VecDeque<u64>,
    /// Blocks kept cached (refcount-cache-size).
    capacity: usize,
    /// Refcount blocks (or refcount table entries) were written since
    /// the last sync: L2 tables must wait for one.
    pub unsynced: bool,
    /// Data that an L2 table will point at was written since the last
    /// sync and must be stable before it (copy-on-write content, reused
    /// clusters).
    pub data_unsynced: bool,
    /// The header's dirty bit is set in the file (lazy refcounts).
    pub dirty_bit: bool,
    /// No free cluster below this index.
    free_hint: u64,
    /// Clusters at or past this index are free and beyond every
    /// allocation so far (file end at open, then grown).
    pub end: u64,
    /// Where the next compressed cluster's bytes go (0: a new host
    /// cluster), packed after the previous one as QEMU packs them.
    free_byte: u64,
}

/// One cached refcount block; `dirty` is the byte range that differs
/// from the file.
struct Block {
    data: Vec<u8>,
    dirty: Option<(usize, usize)>,
    used: bool,
}

/// QEMU's minimum (and default) refcount cache: 4 blocks.
pub const MIN_CACHED_BLOCKS: usize = 4;

/// Long CPU loops over metadata yield to the runtime this often.
pub const YIELD_EVERY: u64 = 1 << 16;

/// Counts one step of a long loop; yields every `YIELD_EVERY` steps.
pub async fn tick(steps: &mut u64) {
    *steps += 1;
    if (*steps).is_multiple_of(YIELD_EVERY) {
        tokio::task::yield_now().await;
    }
}

/// Metadata found inconsistent. EUCLEAN marks it inside the driver, which
/// turns it into a fatal corruption report and EIO at its boundary.
pub fn corrupt(msg: impl Into<String>) -> BlockError {
    BlockError::new(nix::libc::EUCLEAN, msg)
}

impl Refcounts {
    pub async fn load(
        overlap: Arc<Overlap>,
        file: Arc<Node>,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
    ) -> BlockResult<Refcounts> {
        let mut raw = vec![0u8; (u64::from(table_clusters) << cluster_bits) as usize];
        let fsize = file.size();
        if table_offset.saturating_add(raw.len() as u64) > fsize {
            return Err(corrupt(
                "Reference count table lies beyond the end of the image file",
            ));
        }
        file.read(table_offset, &mut raw).await?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])) & !511)
            .collect();
        overlap.set_range(
            REFCOUNT_TABLE,
            table_offset,
            u64::from(table_clusters) << cluster_bits,
        );
        for b in &table {
            if *b != 0 {
                overlap.add_cluster(REFCOUNT_BLOCK, *b);
            }
        }
        Ok(Refcounts {
            overlap,
            end: fsize.div_ceil(1 << cluster_bits),
            file,
            cluster_bits,
            order,
            table_offset,
            table,
            blocks: HashMap::new(),
            lru: VecDeque::new(),
            capacity: MIN_CACHED_BLOCKS,
            unsynced: false,
            data_unsynced: false,
            dirty_bit: false,
            free_hint: 0,
            free_byte: 0,
        })
    }

    /// Before writing: every refcount table entry must name a refcount
    /// block of its own, aligned and inside the file (as `qemu-img check`
    /// requires). Aliased or far-off blocks would make the allocator and
    /// the repair walk the same block again and again or a huge sparse
    /// range.
    pub fn validate(&self) -> BlockResult<()> {
        let cs = self.cs();
        let fsize = self.file.size();
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for (i, &b) in self.table.iter().enumerate() {
            if b == 0 {
                continue;
            }
            if !b.is_multiple_of(cs) {
                return Err(corrupt(format!(
                    "Refblock offset {b:#x} unaligned (reftable index: {i:#x})"
                )));
            }
            if b.saturating_add(cs) > fsize {
                return Err(corrupt(format!(
                    "Refblock offset {b:#x} is outside the image file (reftable index: {i:#x})"
                )));
            }
            if let Some(j) = seen.insert(b, i) {
                return Err(corrupt(format!(
                    "Refblock offset {b:#x} used twice (reftable indexes {j:#x} and {i:#x})"
                )));
            }
        }
        Ok(())
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// refcount-cache-size, in blocks (at least QEMU's minimum).
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn set_capacity(&mut self, blocks: usize) {
        self.capacity = blocks.max(MIN_CACHED_BLOCKS);
    }

    pub fn has_dirty(&self) -> bool {
        self.blocks.values().any(|b| b.dirty.is_some())
    }

    /// Writes every dirty refcount block (the bytes that changed).
    pub async fn write_dirty(&mut self) -> BlockResult<()> {
        let mut dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty.is_some())
            .map(|(o, _)| *o)
            .collect();
        dirty.sort_unstable();
        for off in dirty {
            let Some(b) = self.blocks.get_mut(&off) else {
                continue;
            };
            let Some((lo, hi)) = b.dirty else {
                continue;
            };
            self.unsynced = true;
            self.file
                .write(off + lo as u64, &b.data[lo..hi], WriteFlags::default())
                .await?;
            b.dirty = None;
        }
        Ok(())
    }

    /// cache-clean-interval: drops the clean blocks nobody used since
    /// the last call.
    pub fn clean_unused(&mut self) {
        self.blocks.retain(|_, b| {
            let keep = b.dirty.is_some() || b.used;
            b.used = false;
            keep
        });
        let blocks = &self.blocks;
        self.lru.retain(|o| blocks.contains_key(o));
    }

    /// Makes room for one more block: the oldest clean block goes; when
    /// every block is dirty they are written back first.
    async fn make_room(&mut self) -> BlockResult<()> {
        while self.blocks.len() >= self.capacity {
            let mut evicted = false;
            for _ in 0..self.lru.len() {
                let Some(o) = self.lru.pop_front() else {
                    break;
                };
                if self.blocks.get(&o).is_some_and(|b| b.dirty.is_some()) {
                    self.lru.push_back(o);
                    continue;
                }
                self.blocks.remove(&o);
                evicted = true;
                break;
            }
            if !evicted {
                if !self.has_dirty() {
                    break;
                }
                self.write_dirty().await?;
            }
        }
        Ok(())
    }

    fn cache_block(&mut self, off: u64, data: Vec<u8>, dirty: Option<(usize, usize)>) {
        if self.blocks.contains_key(&off) {
            self.lru.retain(|o| *o != off);
        }
        self.blocks.insert(
            off,
            Block {
                data,
                dirty,
                used: true,
            },
        );
        self.lru.push_back(off);
    }

    /// Drops a clean block from the cache (after a look that must not
    /// fill it); a dirty one stays.
    fn uncache_clean(&mut self, off: u64) {
        if self.blocks.get(&off).is_some_and(|b| b.dirty.is_none()) {
            self.blocks.remove(&off);
            self.lru.retain(|o| *o != off);
        }
    }
    /// Refcount entries per block.
    fn per_block(&self) -> u64 {
        (self.cs() * 8) >> self.order
    }
    pub fn max(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }

    async fn block(&mut self, bi: u64) -> BlockResult<Option<u64>> {
        let off = match self.table.get(bi as usize) {
            Some(&o) if o != 0 => o,
            _ => return Ok(None),
        };
        if let Some(b) = self.blocks.get_mut(&off) {
            b.used = true;
            return Ok(Some(off));
        }
        if off % self.cs() != 0
            || off.saturating_add(self.cs()) > self.file.size().max(self.end << self.cluster_bits)
        {
            return Err(corrupt(format!(
                "Refcount block offset {off:#x} is invalid"
            )));
        }
        let mut b = vec![0u8; self.cs() as usize];
        self.file.read(off, &mut b).await?;
        self.make_room().await?;
        self.cache_block(off, b, None);
        Ok(Some(off))
    }

    fn decode(&self, b: &[u8], i: u64) -> u64 {
        let w = 1u64 << self.order;
        if w < 8 {
            let bit = i * w;
            let byte = b[(bit / 8) as usize];
            u64::from(byte >> (bit % 8)) & ((1 << w) - 1)
        } else {
            let n = (w / 8) as usize;
            let at = i as usize * n;
            b[at..at + n]
                .iter()
                .fold(0u64, |acc, x| (acc << 8) | u64::from(*x))
        }
    }

    /// Sets entry `i` and returns the byte range that changed.
    fn encode(&self, b: &mut [u8], i: u64, v: u64) -> (usize, usize) {
        encode(self.order, b, i, v)
    }

    pub async fn get(&mut self, cluster: u64) -> BlockResult<u64> {
        let per = self.per_block();
        match self.block(cluster / per).await? {
            Some(off) => Ok(self
                .blocks
                .get(&off)
                .map_or(0, |b| self.decode(&b.data, cluster % per))),
            None => Ok(0),
        }
    }

    /// Sets the refcounts of `n` clusters from `first` to `v` in the
    /// cached blocks, which become dirty.
    async fn set_range(&mut self, first: u64, n: u64, v: u64) -> BlockResult<()> {
        let per = self.per_block();
        let mut c = first;
        while c < first + n {
            let bi = c / per;
            let off = match self.block(bi).await? {
                Some(o) => o,
                None => return Err(corrupt("refcount block missing for an allocated cluster")),
            };
            let stop = (first + n).min((bi + 1) * per);
            let order = self.order;
            let Some(b) = self.blocks.get_mut(&off) else {
                return Err(corrupt("refcount block vanished"));
            };
            let (mut lo, mut hi) = b.dirty.unwrap_or((usize::MAX, 0));
            for x in c..stop {
                let (a, z) = encode(order, &mut b.data, x % per, v);
                lo = lo.min(a);
                hi = hi.max(z);
            }
            b.dirty = Some((lo, hi));
            c = stop;
        }
        Ok(())
    }

    /// The highest cluster in use (below `end`): the refcount table is
    /// walked backwards, block by block, skipping missing blocks.
    pub async fn last_used(&mut self) -> BlockResult<u64> {
        let per = self.per_block();
        let blocks = (self.table.len() as u64).min(self.end.div_ceil(per));
        let mut steps = 0u64;
        for bi in (0..blocks).rev() {
            let cached = self
                .table
                .get(bi as usize)
                .is_some_and(|o| self.blocks.contains_key(o));
            let Some(off) = self.block(bi).await? else {
                continue;
            };
            let Some(b) = self.blocks.get(&off).map(|b| &b.data) else {
                continue;
            };
            let stop = self.end.min((bi + 1) * per) - bi * per;
            let mut found = None;
            if b.iter().any(|x| *x != 0) {
                for i in (0..stop).rev() {
                    if self.decode(b, i) != 0 {
                        found = Some(bi * per + i);
                        break;
                    }
                }
            }
            if !cached {
                // Only looked at: a long walk must not fill the cache.
                self.uncache_clean(off);
            }
            if let Some(c) = found {
                return Ok(c);
            }
            tick(&mut steps).await;
        }
        Ok(0)
    }

    /// Distinct refcount blocks that exist, by table index.
    pub fn existing_blocks(&self) -> Vec<u64> {
        let mut seen = std::collections::HashSet::new();
        (0..self.table.len() as u64)
            .filter(|&i| {
                let o = self.table[i as usize];
                o != 0 && seen.insert(o)
            })
            .collect()
    }

    /// Repair: sets the refcounts of the clusters below `end` that block
    /// `bi` covers to their count in `want` (0 if absent), in one write
    /// of the bytes that differ. The block is not left in the cache.
    pub async fn rewrite_block(
        &mut self,
        bi: u64,
        end: u64,
        want: &BTreeMap<u64, u64>,
        steps: &mut u64,
    ) -> BlockResult<()> {
        let Some(off) = self.block(bi).await? else {
            return Ok(());
        };
        // Written now: the block must not also be dirty in the cache.
        self.write_dirty().await?;
        let Some(mut b) = self.blocks.remove(&off).map(|b| b.data) else {
            return Err(corrupt("refcount block vanished"));
        };
        self.lru.retain(|o| *o != off);
        let per = self.per_block();
        let first = bi * per;
        let (mut lo, mut hi) = (usize::MAX, 0);
        for cl in first..end.min(first + per) {
            tick(steps).await;
            let w = want.get(&cl).copied().unwrap_or(0);
            if w > self.max() {
                return Err(corrupt(format!("refcount {w} of cluster {cl} too large")));
            }
            if self.decode(&b, cl - first) != w {
                let (a, z) = self.encode(&mut b, cl - first, w);
                lo = lo.min(a);
                hi = hi.max(z);
                if w == 0 {
                    self.free_hint = self.free_hint.min(cl);
                }
            }
        }
        if lo < hi {
            self.file
                .write(off + lo as u64, &b[lo..hi], WriteFlags::default())
                .await?;
        }
        Ok(())
    }

    /// A refcount block exists for this cluster.
    pub fn covers(&self, cluster: u64) -> bool {
        self.table
            .get((cluster / self.per_block()) as usize)
            .is_some_and(|b| *b != 0)
    }

    /// Adds `delta` to one cluster's refcount; returns the new value.
    pub async fn change(&mut self, cluster: u64, delta: i64) -> BlockResult<u64> {
        let old = self.get(cluster).await?;
        let new = if delta >= 0 {
            old.checked_add(delta as u64).filter(|v| *v <= self.max())
        } else {
            old.checked_sub(delta.unsigned_abs())
        };
        let Some(new) = new else {
            return Err(corrupt(format!(
                "refcount of cluster {cluster} would {} (is {old})",
                if delta >= 0 {
                    "overflow"
                } else {
                    "drop below zero"
                }
            )));
        };
        self.set_range(cluster, 1, new).await?;
        if new == 0 {
            self.free_hint = self.free_hint.min(cluster);
            // A freed cluster may be handed out whole: compressed bytes
            // never go after what was there.
            if self.free_byte >> self.cluster_bits == cluster {
                self.free_byte = 0;
            }
        }
        Ok(new)
    }

    /// Room for `size` bytes of a compressed cluster (QEMU's
    /// qcow2_alloc_bytes): right after the previous compressed cluster
    /// while it fits in its host cluster, or runs on into a new cluster
    /// allocated just after it; else at the start of a new cluster. Every
    /// host cluster the bytes touch gets one more reference. Returns the
    /// host offset.
    pub async fn alloc_bytes(&mut self, size: u64) -> BlockResult<u64> {
        let cs = self.cs();
        debug_assert!(size > 0 && size <= cs);
        let mut at = self.free_byte;
        if at != 0 && self.get(at >> self.cluster_bits).await? >= self.max() {
            at = 0;
        }
        let room = if at == 0 { 0 } else { cs - (at & (cs - 1)) };
        if at != 0 && room >= size {
            self.change(at >> self.cluster_bits, 1).await?;
        } else {
            // A new cluster, with its one reference.
            let new = self.alloc(1).await?;
            if at != 0 && at.next_multiple_of(cs) == new {
                // Contiguous: the bytes start in the old cluster's tail.
                self.change(at >> self.cluster_bits, 1).await?;
            } else {
                at = new;
            }
        }
        self.free_byte = at + size;
        if self.free_byte & (cs - 1) == 0 {
            self.free_byte = 0;
        }
        Ok(at)
    }

    /// Refuses to hand out clusters that hold metadata: with a hostile
    /// image (a zeroed refcount entry) they can read as free, and writing
    /// there would destroy the image (QEMU's overlap check on allocation).
    fn check_free(&self, first: u64, n: u64) -> BlockResult<()> {
        match self
            .overlap
            .check(first << self.cluster_bits, n << self.cluster_bits)
        {
            Some(kind) => Err(corrupt(format!(
                "Preventing invalid write on metadata (overlaps with {kind})"
            ))),
            None => Ok(()),
        }
    }

    /// Allocates `n` contiguous clusters with refcount 1; returns the host
    /// offset of the first.
    pub async fn alloc(&mut self, n: u64) -> BlockResult<u64> {
        Ok(self.alloc_fresh(n).await?.0)
    }

    /// `alloc`, and whether the clusters lie past everything the file
    /// held or was written with since open (then they read as zeroes
    /// until written: a hole or past the end of the file).
    pub async fn alloc_fresh(&mut self, n: u64) -> BlockResult<(u64, bool)> {
        // Each retry creates a refcount block, which claims a table entry
        // for good: a retry that finds no new block made no progress.
        let mut blocks_made = 0u64;
        'search: loop {
            let mut start = self.free_hint;
            let mut first_free = None;
            let mut run = 0;
            let mut c = self.free_hint;
            let mut steps = 0u64;
            while run < n {
                tick(&mut steps).await;
                // Past the end every cluster is free, whatever a hostile
                // refcount says: the search always ends there.
                if c >= self.end || self.get(c).await? == 0 {
                    first_free.get_or_insert(c);
                    if run == 0 {
                        start = c;
                    }
                    run += 1;
                } else {
                    run = 0;
                }
                c += 1;
            }
            self.check_free(start, n)?;
            let per = self.per_block();
            for bi in start / per..=(start + n - 1) / per {
                if self.table.get(bi as usize).copied().unwrap_or(0) == 0 {
                    blocks_made += 1;
                    if blocks_made > 2 * (n / per) + 8 {
                        return Err(corrupt("Refcount allocation makes no progress"));
                    }
                    // Creating the block may take a cluster of the run.
                    self.ensure_block(bi).await?;
                    continue 'search;
                }
            }
            self.set_range(start, n, 1).await?;
            // Everything below the first free cluster seen is in use.
            self.free_hint = match first_free {
                Some(f) if f < start => f,
                _ => start + n,
            };
            let fresh = start >= self.end;
            self.end = self.end.max(start + n);
            return Ok((start << self.cluster_bits, fresh));
        }
    }

    /// Creates refcount block `bi` in the first cluster it covers (all of
    /// its clusters are free while it does not exist), growing the table
    /// first if it is too small.
    async fn ensure_block(&mut self, bi: u64) -> BlockResult<()> {
        if bi as usize >= self.table.len() {
            return self.grow_table(bi).await;
        }
        let per = self.per_block();
        let at = bi * per;
        self.check_free(at, 1)?;
        let off = at << self.cluster_bits;
        let mut b = vec![0u8; self.cs() as usize];
        self.encode(&mut b, 0, 1);
        self.file.write(off, &b, WriteFlags::default()).await?;
        self.file.flush().await?;
        self.file
            .write(
                self.table_offset + bi * 8,
                &off.to_be_bytes(),
                WriteFlags::default(),
            )
            .await?;
        self.table[bi as usize] = off;
        // The table entry is not synced yet.
        self.unsynced = true;
        self.overlap.add_cluster(REFCOUNT_BLOCK, off);
        self.make_room().await?;
        self.cache_block(off, b, None);
        self.end = self.end.max(at + 1);
        Ok(())
    }

    /// Moves the refcount table to a new area at the end of the image,
    /// large enough for block `bi`, together with the refcount blocks that
    /// the area itself needs; then switches the header over and frees the
    /// old table.
    async fn grow_table(&mut self, bi: u64) -> BlockResult<()> {
        let cs = self.cs();
        let per = self.per_block();
        let a = self.end;
        let mut entries = (bi + 1).max(self.table.len() as u64 * 2);
        let (mut nblocks, mut tclusters);
        loop {
            tclusters = (entries * 8).div_ceil(cs);
            nblocks = 0u64;
            loop {
                let area_end = a + nblocks + tclusters;
                let missing = (a / per..=(area_end - 1) / per)
                    .filter(|i| self.table.get(*i as usize).copied().unwrap_or(0) == 0)
                    .count() as u64;
                if missing == nblocks {
                    break;
                }
                nblocks = missing;
            }
            let last = (a + nblocks + tclusters - 1) / per;
            if last < entries {
                break;
            }
            entries = last + 1;
        }
        if tclusters * cs > (8 << 20) {
            return Err(BlockError::new(
                nix::libc::EFBIG,
                "Refcount table too large",
            ));
        }
        let area_end = a + nblocks + tclusters;
        self.check_free(a, area_end - a)?;
        let mut table = self.table.clone();
        table.resize((tclusters * cs / 8) as usize, 0);
        // The new blocks, in order, for the block indices that lack one.
        let mut new_blocks = Vec::new();
        let missing: Vec<u64> = (a / per..=(area_end - 1) / per)
            .filter(|i| self.table.get(*i as usize).copied().unwrap_or(0) == 0)
            .collect();
        for (k, &i) in missing.iter().enumerate() {
            let off = (a + k as u64) << self.cluster_bits;
            let mut b = vec![0u8; cs as usize];
            for c in a.max(i * per)..area_end.min((i + 1) * per) {
                self.encode(&mut b, c % per, 1);
            }
            self.file.write(off, &b, WriteFlags::default()).await?;
            table[i as usize] = off;
            self.overlap.add_cluster(REFCOUNT_BLOCK, off);
            new_blocks.push((off, b));
        }
        // Area clusters counted by blocks that already exist.
        for c in a..area_end {
            if self.table.get((c / per) as usize).copied().unwrap_or(0) != 0 {
                self.set_range(c, 1, 1).await?;
            }
        }
        let toff = (a + nblocks) << self.cluster_bits;
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.write(toff, &bytes, WriteFlags::default()).await?;
        // Everything the new table counts must be stable before the
        // header names it.
        self.write_dirty().await?;
        self.file.flush().await?;
        let mut hdr = toff.to_be_bytes().to_vec();
        hdr.extend_from_slice(&(tclusters as u32).to_be_bytes());
        self.file
            .write(OFF_REFCOUNT_TABLE, &hdr, WriteFlags::default())
            .await?;
        self.file.flush().await?;
        let (old_off, old_len) = (self.table_offset, self.table.len() as u64 * 8);
        self.table = table;
        for (off, b) in new_blocks {
            self.make_room().await?;
            self.cache_block(off, b, None);
        }
        self.table_offset = toff;
        self.overlap.set_range(REFCOUNT_TABLE, toff, tclusters * cs);
        self.end = self.end.max(area_end);
        for k in 0..old_len.div_ceil(cs) {
            self.change((old_off >> self.cluster_bits) + k, -1).await?;
        }
        Ok(())
    }
}

/// Sets refcount entry `i` of width 2^`order` bits in block `b` to `v`;
/// returns the byte range that changed.
fn encode(order: u32, b: &mut [u8], i: u64, v: u64) -> (usize, usize) {
    let w = 1u64 << order;
    if w < 8 {
        let bit = i * w;
        let at = (bit / 8) as usize;
        let mask = (((1u16 << w) - 1) << (bit % 8)) as u8;
        b[at] = (b[at] & !mask) | (((v << (bit % 8)) as u8) & mask);
        (at, at + 1)
    } else {
        let n = (w / 8) as usize;
        let at = i as usize * n;
        let be = v.to_be_bytes();
        b[at..at + n].copy_from_slice(&be[8 - n..]);
        (at, at + n)
    }
}
