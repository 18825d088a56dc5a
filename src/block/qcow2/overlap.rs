//! Metadata overlap checks (QEMU's overlap-check=cached): a data write
//! that would land on the header, an L1/L2 table, the refcount table or
//! blocks, or the snapshot table is refused, and the image is marked
//! corrupt instead of being damaged further.
use std::collections::HashMap;
use std::sync::RwLock;

pub const HEADER: &str = "qcow2_header";
pub const ACTIVE_L1: &str = "active L1 table";
pub const ACTIVE_L2: &str = "active L2 table";
pub const REFCOUNT_TABLE: &str = "refcount table";
pub const REFCOUNT_BLOCK: &str = "refcount block";
pub const SNAPSHOT_TABLE: &str = "snapshot table";
pub const INACTIVE_L1: &str = "inactive L1 table";
pub const BITMAP_DIRECTORY: &str = "bitmap directory";

/// QEMU's order: the first kind a write overlaps is the one reported.
const ORDER: [&str; 8] = [
    HEADER,
    ACTIVE_L1,
    ACTIVE_L2,
    REFCOUNT_TABLE,
    REFCOUNT_BLOCK,
    SNAPSHOT_TABLE,
    INACTIVE_L1,
    BITMAP_DIRECTORY,
];

#[derive(Default)]
struct Map {
    /// Contiguous structures: (kind, start, length).
    ranges: Vec<(&'static str, u64, u64)>,
    /// One-cluster structures by cluster offset.
    clusters: HashMap<u64, &'static str>,
}

pub struct Overlap {
    bits: u32,
    map: RwLock<Map>,
}

impl Overlap {
    pub fn new(bits: u32) -> Overlap {
        Overlap {
            bits,
            map: RwLock::new(Map::default()),
        }
    }

    /// Adds a contiguous structure (several may share a kind).
    pub fn add_range(&self, kind: &'static str, start: u64, len: u64) {
        if let Ok(mut m) = self.map.write() {
            m.ranges.push((kind, start, len));
        }
    }

    /// Replaces the (only) contiguous structure of a kind.
    pub fn set_range(&self, kind: &'static str, start: u64, len: u64) {
        if let Ok(mut m) = self.map.write() {
            m.ranges.retain(|r| r.0 != kind);
            m.ranges.push((kind, start, len));
        }
    }

    /// Removes the contiguous structure of a kind that starts at `start`.
    pub fn remove_range(&self, kind: &'static str, start: u64) {
        if let Ok(mut m) = self.map.write() {
            m.ranges.retain(|r| !(r.0 == kind && r.1 == start));
        }
    }

    pub fn add_cluster(&self, kind: &'static str, off: u64) {
        if let Ok(mut m) = self.map.write() {
            m.clusters.insert(off, kind);
        }
    }

    pub fn remove_cluster(&self, off: u64) {
        if let Ok(mut m) = self.map.write() {
            m.clusters.remove(&off);
        }
    }

    /// The metadata a write of `len` bytes at host offset `off` would
    /// overwrite, if any.
    pub fn check(&self, off: u64, len: u64) -> Option<&'static str> {
        self.check_ignoring(off, len, None)
    }

    /// `check`, not counting structures of kind `ignore` (an L2 table
    /// update ignores active L2 tables, as QEMU's does).
    pub fn check_ignoring(&self, off: u64, len: u64, ignore: Option<&str>) -> Option<&'static str> {
        if len == 0 {
            return None;
        }
        let m = self.map.read().ok()?;
        // Whole clusters, as QEMU compares them.
        let cs = 1u64 << self.bits;
        let end = off.saturating_add(len).saturating_add(cs - 1) & !(cs - 1);
        let off = off & !(cs - 1);
        let mut hit: Option<usize> = None;
        let mut note = |kind: &str| {
            if Some(kind) == ignore {
                return;
            }
            if let Some(i) = ORDER.iter().position(|k| *k == kind) {
                hit = Some(hit.map_or(i, |h: usize| h.min(i)));
            }
        };
        for (kind, s, l) in &m.ranges {
            if off < s.saturating_add(*l) && *s < end {
                note(kind);
            }
        }
        let mut c = off;
        while c < end {
            if let Some(kind) = m.clusters.get(&c) {
                note(kind);
            }
            c += cs;
        }
        hit.map(|i| ORDER[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_first_kind_in_qemu_order() {
        let o = Overlap::new(16);
        o.add_range(HEADER, 0, 65536);
        o.set_range(ACTIVE_L1, 3 << 16, 8);
        o.add_cluster(ACTIVE_L2, 4 << 16);
        o.add_cluster(REFCOUNT_BLOCK, 2 << 16);
        assert_eq!(o.check(5 << 16, 65536), None);
        assert_eq!(o.check(100, 10), Some(HEADER));
        assert_eq!(
            o.check((3 << 16) + 4096, 4096),
            Some(ACTIVE_L1),
            "same cluster"
        );
        assert_eq!(o.check(3 << 16, 4096), Some(ACTIVE_L1));
        assert_eq!(o.check((2 << 16) + 10, 3 << 16), Some(ACTIVE_L1));
        assert_eq!(o.check((4 << 16) + 10, 1), Some(ACTIVE_L2));
        o.remove_cluster(4 << 16);
        assert_eq!(o.check((4 << 16) + 10, 1), None);
        o.set_range(ACTIVE_L1, 9 << 16, 8);
        assert_eq!(o.check(3 << 16, 4096), None);
        o.add_cluster(ACTIVE_L2, 4 << 16);
        assert_eq!(o.check_ignoring(4 << 16, 8, Some(ACTIVE_L2)), None);
        assert_eq!(
            o.check_ignoring(2 << 16, 8, Some(ACTIVE_L2)),
            Some(REFCOUNT_BLOCK)
        );
    }
}
