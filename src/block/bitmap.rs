//! A dirty bitmap: which granules of a node were written since a point
//! in time. Mirror and commit track guest writes with one; the named
//! bitmaps of QMP (`block/dirty.rs`) hold one each.
//!
//! The bits are kept as QEMU's HBitmap keeps its last level: 64-bit
//! words, granule `g` at bit `g % 64` of word `g / 64`. Serialized
//! little-endian, that is both what `x-debug-block-dirty-bitmap-sha256`
//! hashes and the qcow2 bitmaps extension's on-disk layout.
use std::sync::Mutex;

pub struct DirtyBitmap {
    granularity: u64,
    inner: Mutex<Bits>,
    /// Woken when bits are set (a job waiting for new writes).
    pub changed: tokio::sync::Notify,
}

struct Bits {
    words: Vec<u64>,
    /// Granules set.
    count: u64,
    granules: u64,
    /// The size in bytes the bitmap covers.
    size: u64,
}

impl Bits {
    /// The first set granule at or after `from`, a word at a time.
    fn first_set(&self, from: u64) -> Option<u64> {
        let mut w = (from / 64) as usize;
        let mut mask = !0u64 << (from % 64);
        while w < self.words.len() {
            let bits = self.words[w] & mask;
            if bits != 0 {
                let g = w as u64 * 64 + bits.trailing_zeros() as u64;
                return (g < self.granules).then_some(g);
            }
            w += 1;
            mask = !0;
        }
        None
    }
}

impl DirtyBitmap {
    /// A clean bitmap over `size` bytes; `granularity` is a power of two.
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        let granules = size.div_ceil(granularity);
        DirtyBitmap {
            granularity,
            inner: Mutex::new(Bits {
                words: vec![0; granules.div_ceil(64) as usize],
                count: 0,
                granules,
                size,
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    fn with<R>(&self, f: impl FnOnce(&mut Bits) -> R) -> R {
        match self.inner.lock() {
            Ok(mut b) => f(&mut b),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// The granules `offset..offset+len` touches, clipped to the bitmap.
    fn span(&self, b: &Bits, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / self.granularity;
        let end = offset.saturating_add(len).div_ceil(self.granularity);
        first.min(b.granules)..end.min(b.granules)
    }

    /// Marks every granule the range touches dirty.
    pub fn set(&self, offset: u64, len: u64) {
        let changed = self.with(|b| {
            let mut n = 0;
            for g in self.span(b, offset, len) {
                let (w, bit) = ((g / 64) as usize, 1u64 << (g % 64));
                if b.words[w] & bit == 0 {
                    b.words[w] |= bit;
                    n += 1;
                }
            }
            b.count += n;
            n > 0
        });
        if changed {
            self.changed.notify_waiters();
        }
    }

    /// Clears the granules wholly or partly inside the range.
    pub fn clear(&self, offset: u64, len: u64) {
        self.with(|b| {
            let mut n = 0;
            for g in self.span(b, offset, len) {
                let (w, bit) = ((g / 64) as usize, 1u64 << (g % 64));
                if b.words[w] & bit != 0 {
                    b.words[w] &= !bit;
                    n += 1;
                }
            }
            b.count -= n;
        })
    }

    pub fn set_all(&self) {
        self.with(|b| {
            for g in 0..b.granules {
                b.words[(g / 64) as usize] |= 1u64 << (g % 64);
            }
            b.count = b.granules;
        });
        self.changed.notify_waiters();
    }

    /// The granule holding `offset` is dirty.
    pub fn is_set(&self, offset: u64) -> bool {
        let g = offset / self.granularity;
        self.with(|b| g < b.granules && b.words[(g / 64) as usize] & (1u64 << (g % 64)) != 0)
    }

    /// Some granule the range touches is dirty.
    pub fn any_set(&self, offset: u64, len: u64) -> bool {
        self.with(|b| {
            self.span(b, offset, len)
                .any(|g| b.words[(g / 64) as usize] & (1u64 << (g % 64)) != 0)
        })
    }

    /// Dirty bytes (whole granules).
    pub fn dirty_bytes(&self) -> u64 {
        self.with(|b| b.count) * self.granularity
    }

    /// The size in bytes the bitmap covers.
    pub fn size(&self) -> u64 {
        self.with(|b| b.size)
    }

    pub fn clear_all(&self) {
        self.with(|b| {
            b.words.iter_mut().for_each(|w| *w = 0);
            b.count = 0;
        })
    }

    /// Follows a resize of the node: granules past the new end go, new
    /// ones are clean (as QEMU's bitmaps after block_resize).
    pub fn resize(&self, size: u64) {
        self.with(|b| {
            let granules = size.div_ceil(self.granularity);
            b.words.resize(granules.div_ceil(64) as usize, 0);
            if !granules.is_multiple_of(64) {
                if let Some(last) = b.words.last_mut() {
                    *last &= (1u64 << (granules % 64)) - 1;
                }
            }
            b.granules = granules;
            b.size = size;
            b.count = b.words.iter().map(|w| w.count_ones() as u64).sum();
        })
    }

    /// The words as HBitmap holds them: at least one, even when empty.
    pub fn words(&self) -> Vec<u64> {
        self.with(|b| {
            let mut w = b.words.clone();
            if w.is_empty() {
                w.push(0);
            }
            w
        })
    }

    /// Puts back bits taken with `words` (a transaction's abort after
    /// clear or merge); words past the bitmap's are ignored.
    pub fn restore_words(&self, words: &[u64]) {
        self.with(|b| {
            let n = b.words.len();
            for (i, w) in b.words.iter_mut().enumerate() {
                *w = words.get(i).copied().unwrap_or(0);
            }
            if !b.granules.is_multiple_of(64) && n > 0 {
                b.words[n - 1] &= (1u64 << (b.granules % 64)) - 1;
            }
            b.count = b.words.iter().map(|w| w.count_ones() as u64).sum();
        })
    }

    /// The bits serialized little-endian, a byte per 8 granules, as
    /// the qcow2 bitmaps extension stores them (at least one word).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.words().iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// QEMU's x-debug-block-dirty-bitmap-sha256: SHA-256 of the words.
    pub fn sha256_hex(&self) -> String {
        use sha2::Digest;
        let d = sha2::Sha256::digest(self.to_le_bytes());
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Sets the granules from `first` on from serialized bits (a qcow2
    /// bitmap cluster); bits past the end are ignored.
    pub fn or_le_bytes(&self, first: u64, bytes: &[u8]) {
        self.with(|b| {
            for (i, &byte) in bytes.iter().enumerate() {
                if byte == 0 {
                    continue;
                }
                for bit in 0..8 {
                    let g = first + i as u64 * 8 + bit;
                    if byte >> bit & 1 != 0 && g < b.granules {
                        let (w, m) = ((g / 64) as usize, 1u64 << (g % 64));
                        if b.words[w] & m == 0 {
                            b.words[w] |= m;
                            b.count += 1;
                        }
                    }
                }
            }
        })
    }

    /// Adds every dirty byte range of `other` (any granularity), as
    /// block-dirty-bitmap-merge does.
    pub fn merge_from(&self, other: &DirtyBitmap) {
        if std::ptr::eq(self, other) {
            return;
        }
        for (off, len) in other.dirty_ranges(0, u64::MAX) {
            self.set(off, len);
        }
        self.changed.notify_waiters();
    }

    /// The dirty ranges (offset, len) in bytes that meet
    /// `offset..offset+len`, whole granules, in order.
    pub fn dirty_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        self.with(|b| {
            let mut out = Vec::new();
            let span = self.span(b, offset, len);
            let mut g = span.start;
            while g < span.end {
                let Some(first) = b.first_set(g).filter(|&f| f < span.end) else {
                    break;
                };
                let mut end = first + 1;
                while end < b.granules && b.words[(end / 64) as usize] & (1u64 << (end % 64)) != 0 {
                    end += 1;
                }
                out.push((first * self.granularity, (end - first) * self.granularity));
                g = end;
            }
            out
        })
    }

    /// The first dirty run at or after `from` (wrapping to the start),
    /// at most `max` bytes: (offset, len). None when all is clean.
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        self.with(|b| {
            if b.count == 0 {
                return None;
            }
            let start = (from / self.granularity).min(b.granules);
            let is = |g: u64| b.words[(g / 64) as usize] & (1u64 << (g % 64)) != 0;
            let first = b.first_set(start).or_else(|| b.first_set(0))?;
            let limit = (max / self.granularity).max(1);
            let mut n = 1;
            while n < limit && first + n < b.granules && is(first + n) {
                n += 1;
            }
            Some((first * self.granularity, n * self.granularity))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_counts_and_wrapping() {
        let b = DirtyBitmap::new(1 << 20, 65536);
        assert_eq!(b.next_run(0, 1 << 20), None);
        b.set(70000, 10); // granule 1
        b.set(65536 * 2, 65536 * 2); // granules 2, 3
        b.set(65536 * 10, 1); // granule 10
        assert_eq!(b.dirty_bytes(), 4 * 65536);
        assert_eq!(b.next_run(0, 1 << 20), Some((65536, 3 * 65536)));
        assert_eq!(b.next_run(0, 2 * 65536), Some((65536, 2 * 65536)));
        assert_eq!(b.next_run(65536 * 5, 1 << 20), Some((65536 * 10, 65536)));
        // Wraps to the start.
        assert_eq!(b.next_run(65536 * 11, 1 << 20), Some((65536, 3 * 65536)));
        b.clear(65536, 3 * 65536);
        assert_eq!(b.dirty_bytes(), 65536);
        b.clear(0, 1 << 20);
        assert_eq!(b.next_run(0, 1 << 20), None);
        // Past the end is clipped; the last granule may be partial.
        let odd = DirtyBitmap::new(100_000, 65536);
        odd.set(90_000, 1 << 30);
        assert_eq!(odd.next_run(0, 1 << 30), Some((65536, 65536)));
        odd.set_all();
        assert_eq!(odd.dirty_bytes(), 2 * 65536);
    }

    #[test]
    fn single_granules_and_ranges() {
        let b = DirtyBitmap::new(1 << 20, 65536);
        b.set(65536 * 3, 1);
        assert!(b.is_set(65536 * 3 + 100));
        assert!(!b.is_set(65536 * 4));
        // Past the end is never set.
        assert!(!b.is_set(1 << 30));
        // A range touching the granule by one byte sees it.
        assert!(b.any_set(65536 * 4 - 1, 2));
        assert!(!b.any_set(0, 65536 * 3));
        assert!(!b.any_set(65536 * 4, 1 << 30));
        assert!(!b.any_set(65536 * 3, 0));
    }

    #[test]
    fn serialization_hash_merge_and_resize() {
        let b = DirtyBitmap::new(1 << 20, 65536);
        // QEMU hashes one zero word for a clean 16-granule bitmap.
        assert_eq!(
            b.sha256_hex(),
            "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
        );
        b.set(0, 1);
        b.set(65536 * 9, 1);
        assert_eq!(b.to_le_bytes(), vec![1, 2, 0, 0, 0, 0, 0, 0]);
        let c = DirtyBitmap::new(1 << 20, 65536);
        c.or_le_bytes(0, &[1, 2]);
        assert_eq!(c.words(), b.words());
        assert_eq!(
            b.dirty_ranges(0, 1 << 20),
            vec![(0, 65536), (65536 * 9, 65536)]
        );
        assert_eq!(b.dirty_ranges(65536, 65536 * 8), vec![]);
        // Merging a finer bitmap sets the coarse granules it touches.
        let fine = DirtyBitmap::new(1 << 20, 512);
        fine.set(65536 * 3 + 512, 512);
        b.merge_from(&fine);
        assert_eq!(b.dirty_bytes(), 3 * 65536);
        // Shrinking drops granules past the end; growing adds clean ones.
        b.resize(65536 * 5);
        assert_eq!(b.dirty_bytes(), 2 * 65536);
        b.resize(1 << 21);
        assert_eq!(
            b.dirty_ranges(0, 1 << 21),
            vec![(0, 65536), (65536 * 3, 65536)]
        );
        assert_eq!(b.size(), 1 << 21);
        let saved = b.words();
        b.clear_all();
        assert_eq!(b.dirty_bytes(), 0);
        b.restore_words(&saved);
        assert_eq!(b.dirty_bytes(), 2 * 65536);
    }
}
