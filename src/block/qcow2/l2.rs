//! L1/L2 entry formats and the L2 table cache. The cache is write-back:
//! changed tables stay dirty in memory until the driver writes them back
//! after the refcounts they depend on (see mod.rs).
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
/// Standard clusters only, and never with extended L2 entries.
pub const ZERO: u64 = 1;
/// Extended L2: every subcluster reads as zeroes, none allocated.
pub const ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
pub const SUBCLUSTERS: u32 = 32;

/// What one guest range (a cluster or a run of subclusters) maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Map {
    /// Data at this host offset (of the first byte of the range).
    Data(u64),
    /// Reads as zeroes.
    Zero,
    /// Not allocated here: the backing file, or zeroes without one.
    Unalloc,
    /// A compressed cluster: the raw L2 entry.
    Compressed(u64),
}

/// One L2 table: `entries` L2 entries, each followed by its subcluster
/// bitmap when extended L2 entries are on.
pub struct Table {
    words: Vec<AtomicU64>,
    ext: bool,
}

impl Table {
    pub fn from_bytes(b: &[u8], ext: bool) -> Table {
        let words = b
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                AtomicU64::new(u64::from_be_bytes(a))
            })
            .collect();
        Table { words, ext }
    }
    /// (entry, bitmap) at `i`; the bitmap is 0 without extended entries.
    pub fn get(&self, i: usize) -> (u64, u64) {
        if self.ext {
            let e = self
                .words
                .get(2 * i)
                .map_or(0, |w| w.load(Ordering::Acquire));
            let b = self
                .words
                .get(2 * i + 1)
                .map_or(0, |w| w.load(Ordering::Acquire));
            (e, b)
        } else {
            (
                self.words.get(i).map_or(0, |w| w.load(Ordering::Acquire)),
                0,
            )
        }
    }
    /// Sets entry `i` (and its bitmap) in memory.
    pub fn set(&self, i: usize, entry: u64, bitmap: u64) {
        let at = if self.ext { 2 * i } else { i };
        if let Some(w) = self.words.get(at) {
            w.store(entry, Ordering::Release);
        }
        if self.ext {
            if let Some(w) = self.words.get(at + 1) {
                w.store(bitmap, Ordering::Release);
            }
        }
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_be_bytes())
            .collect()
    }
}

/// Hashes cluster offsets with one multiply: the keys are not chosen by
/// an attacker in a way that could hurt (they are bounded by the file),
/// and SipHash showed up in profiles of the read path.
#[derive(Default, Clone, Copy)]
pub struct OffsetHasher(u64);

impl std::hash::Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type Build = std::hash::BuildHasherDefault<OffsetHasher>;

/// One cached table: dirty tables differ from the file and stay cached
/// until they are written back; `used` marks tables looked at since the
/// last cache-clean-interval tick.
struct Slot {
    table: Arc<Table>,
    dirty: bool,
    used: bool,
}

/// Tables by host offset, and their offsets in load order.
struct Tables {
    map: HashMap<u64, Slot, Build>,
    order: VecDeque<u64>,
    dirty: usize,
}

/// L2 tables by host offset, bounded; the oldest loaded clean table goes
/// first. Dirty tables are never evicted here: the metadata lock's holder
/// writes them back (in dependency order) when the cache is over its
/// size, on flush, and on the cache-clean-interval tick.
///
/// Changing a table: `mark_dirty` first (under the metadata lock), then
/// the entries. That makes the changed instance the cached one before any
/// entry changes, so a reader that loads the table afterwards finds it
/// instead of the (older) copy in the file.
pub struct Cache {
    inner: Mutex<Tables>,
    capacity: usize,
}

impl Cache {
    pub fn new(capacity: usize) -> Cache {
        Cache {
            inner: Mutex::new(Tables {
                map: HashMap::default(),
                order: VecDeque::new(),
                dirty: 0,
            }),
            capacity: capacity.max(2),
        }
    }
    pub fn get(&self, offset: u64) -> Option<Arc<Table>> {
        let mut g = self.inner.lock().ok()?;
        let s = g.map.get_mut(&offset)?;
        s.used = true;
        Some(s.table.clone())
    }
    /// Drops the oldest clean table; false if every table is dirty.
    fn evict_one(g: &mut Tables) -> bool {
        for _ in 0..g.order.len() {
            let Some(old) = g.order.pop_front() else {
                return false;
            };
            if g.map.get(&old).is_some_and(|s| s.dirty) {
                g.order.push_back(old);
                continue;
            }
            g.map.remove(&old);
            return true;
        }
        false
    }
    pub fn insert(&self, offset: u64, t: Arc<Table>) -> Arc<Table> {
        let Ok(mut g) = self.inner.lock() else {
            return t;
        };
        if let Some(have) = g.map.get(&offset) {
            return have.table.clone();
        }
        while g.map.len() >= self.capacity && Self::evict_one(&mut g) {}
        g.map.insert(
            offset,
            Slot {
                table: t.clone(),
                dirty: false,
                used: true,
            },
        );
        g.order.push_back(offset);
        t
    }
    /// A new table at `offset` (just written): it replaces whatever a
    /// reader may have cached there (a table freed earlier).
    pub fn put(&self, offset: u64, t: Arc<Table>) -> Arc<Table> {
        let Ok(mut g) = self.inner.lock() else {
            return t;
        };
        let g = &mut *g;
        if let Some(s) = g.map.get_mut(&offset) {
            if s.dirty {
                s.dirty = false;
                g.dirty -= 1;
            }
            s.table = t.clone();
            s.used = true;
            return t;
        }
        while g.map.len() >= self.capacity && Self::evict_one(g) {}
        g.map.insert(
            offset,
            Slot {
                table: t.clone(),
                dirty: false,
                used: true,
            },
        );
        g.order.push_back(offset);
        t
    }
    /// Marks `t` (the table at `offset`) dirty, making it the cached
    /// instance if it was evicted meanwhile (it was clean then, so equal
    /// to any copy loaded since).
    pub fn mark_dirty(&self, offset: u64, t: &Arc<Table>) {
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        let g = &mut *g;
        match g.map.get_mut(&offset) {
            Some(s) => {
                if !Arc::ptr_eq(&s.table, t) {
                    s.table = t.clone();
                }
                if !s.dirty {
                    s.dirty = true;
                    g.dirty += 1;
                }
                s.used = true;
            }
            None => {
                g.map.insert(
                    offset,
                    Slot {
                        table: t.clone(),
                        dirty: true,
                        used: true,
                    },
                );
                g.order.push_back(offset);
                g.dirty += 1;
            }
        }
    }
    /// The dirty tables, by offset.
    pub fn dirty(&self) -> Vec<(u64, Arc<Table>)> {
        let Ok(g) = self.inner.lock() else {
            return Vec::new();
        };
        if g.dirty == 0 {
            return Vec::new();
        }
        let mut v: Vec<(u64, Arc<Table>)> = g
            .map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(o, s)| (*o, s.table.clone()))
            .collect();
        v.sort_unstable_by_key(|(o, _)| *o);
        v
    }
    pub fn has_dirty(&self) -> bool {
        self.inner.lock().is_ok_and(|g| g.dirty > 0)
    }
    /// After `t` was written back (under the metadata lock, so it did not
    /// change meanwhile).
    pub fn set_clean(&self, offset: u64, t: &Arc<Table>) {
        if let Ok(mut g) = self.inner.lock() {
            let g = &mut *g;
            if let Some(s) = g.map.get_mut(&offset) {
                if s.dirty && Arc::ptr_eq(&s.table, t) {
                    s.dirty = false;
                    g.dirty -= 1;
                }
            }
        }
    }
    /// More tables than the cache's size (every one of them dirty): the
    /// caller should write them back, then `trim`.
    pub fn over(&self) -> bool {
        self.inner.lock().is_ok_and(|g| g.map.len() > self.capacity)
    }
    /// Evicts clean tables down to the cache's size.
    pub fn trim(&self) {
        if let Ok(mut g) = self.inner.lock() {
            while g.map.len() > self.capacity && Self::evict_one(&mut g) {}
        }
    }
    /// Drops every table (the image was changed by another process; the
    /// caller wrote the dirty ones back first).
    pub fn clear(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.map.clear();
            g.order.clear();
            g.dirty = 0;
        }
    }
    /// A table no longer in use (freed): its changes do not matter.
    pub fn remove(&self, offset: u64) {
        if let Ok(mut g) = self.inner.lock() {
            if g.map.remove(&offset).is_some_and(|s| s.dirty) {
                g.dirty -= 1;
            }
            g.order.retain(|o| *o != offset);
        }
    }
    /// cache-clean-interval: drops the clean tables nobody looked at
    /// since the last call.
    pub fn clean_unused(&self) {
        if let Ok(mut g) = self.inner.lock() {
            let g = &mut *g;
            g.map.retain(|_, s| {
                let keep = s.dirty || s.used;
                s.used = false;
                keep
            });
            let map = &g.map;
            g.order.retain(|o| map.contains_key(o));
        }
    }
}

/// The bits of a compressed cluster descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compressed {
    pub offset: u64,
    /// Bytes of compressed data from `offset` (may run into the next
    /// host cluster).
    pub len: u64,
}

/// The L2 entry of a compressed cluster whose `len` bytes start at host
/// offset `offset`: the offset, and the sectors it runs into after the
/// first (docs/interop/qcow2.txt; compressed entries never have COPIED).
pub fn compressed_entry(offset: u64, len: u64, cluster_bits: u32) -> u64 {
    let shift = 62 - (cluster_bits - 8);
    let more = ((offset + len - 1) >> 9) - (offset >> 9);
    COMPRESSED | (more << shift) | offset
}

pub fn compressed(entry: u64, cluster_bits: u32) -> Compressed {
    let shift = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    Compressed {
        offset,
        len: sectors * 512 - (offset & 511),
    }
}
