//! L1/L2 entry formats and the L2 table cache. Tables are written through
//! on every change (an entry at a time), so the cache only ever holds
//! clean tables and eviction costs nothing.
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
    /// Sets entry `i` in memory and returns its bytes and their offset
    /// within the table, for writing through.
    pub fn set(&self, i: usize, entry: u64, bitmap: u64) -> (u64, Vec<u8>) {
        let width = if self.ext { 2 } else { 1 };
        let at = i * width;
        let mut bytes = entry.to_be_bytes().to_vec();
        if let Some(w) = self.words.get(at) {
            w.store(entry, Ordering::Release);
        }
        if self.ext {
            if let Some(w) = self.words.get(at + 1) {
                w.store(bitmap, Ordering::Release);
            }
            bytes.extend_from_slice(&bitmap.to_be_bytes());
        }
        ((at * 8) as u64, bytes)
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

/// Tables by host offset, and their offsets in load order.
type Tables = (HashMap<u64, Arc<Table>, Build>, VecDeque<u64>);

/// L2 tables by host offset, bounded; the oldest loaded goes first.
pub struct Cache {
    inner: Mutex<Tables>,
    capacity: usize,
}

impl Cache {
    pub fn new(capacity: usize) -> Cache {
        Cache {
            inner: Mutex::new((HashMap::default(), VecDeque::new())),
            capacity: capacity.max(2),
        }
    }
    pub fn get(&self, offset: u64) -> Option<Arc<Table>> {
        self.inner.lock().ok()?.0.get(&offset).cloned()
    }
    pub fn insert(&self, offset: u64, t: Arc<Table>) -> Arc<Table> {
        let Ok(mut g) = self.inner.lock() else {
            return t;
        };
        if let Some(have) = g.0.get(&offset) {
            return have.clone();
        }
        while g.0.len() >= self.capacity {
            match g.1.pop_front() {
                Some(old) => {
                    g.0.remove(&old);
                }
                None => break,
            }
        }
        g.0.insert(offset, t.clone());
        g.1.push_back(offset);
        t
    }
    pub fn remove(&self, offset: u64) {
        if let Ok(mut g) = self.inner.lock() {
            g.0.remove(&offset);
            g.1.retain(|o| *o != offset);
        }
    }
    pub fn clear(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.0.clear();
            g.1.clear();
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

pub fn compressed(entry: u64, cluster_bits: u32) -> Compressed {
    let shift = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    Compressed {
        offset,
        len: sectors * 512 - (offset & 511),
    }
}
