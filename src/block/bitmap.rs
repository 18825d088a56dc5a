//! A dirty bitmap: which granules of a node were written since a point
//! in time. Mirror and commit track guest writes with one; the dirty
//! bitmaps of QMP build on it later.
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
}
