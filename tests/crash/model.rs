//! What the crash test may find in each 4 KiB block after a SIGKILL.
//!
//! Every block written holds a pattern naming its generation (a number
//! unique in the whole test) and its own block number, so a block read
//! back says which write it came from, or that it is torn or misplaced.
//! Zero is the generation of zeroes. The log records, per request, when
//! it was sent and when its reply came (one counter for both); a flush
//! makes durable every request whose reply came before the flush was
//! sent. Requests in flight never overlap, so per block the log's order
//! is the order the daemon ran them in.

pub const BLOCK: u64 = 4096;

/// The generation of a block of zeroes.
pub const ZERO: u32 = 0;

/// The bytes of generation `g` (non-zero) at block `block`.
pub fn pattern(g: u32, block: u64, out: &mut [u8]) {
    let head = (u64::from(g) << 32) | (block & 0xffff_ffff);
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = head ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// What a block read back holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    Gen(u32),
    /// Not a whole block of any generation at this block: torn,
    /// misplaced or garbage.
    Garbage,
}

pub fn decode(block: u64, data: &[u8]) -> Found {
    if data.iter().all(|&b| b == 0) {
        return Found::Gen(ZERO);
    }
    let head = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8]));
    let g = (head >> 32) as u32;
    if g == ZERO || head & 0xffff_ffff != block & 0xffff_ffff {
        return Found::Garbage;
    }
    let mut want = vec![0u8; data.len()];
    pattern(g, block, &mut want);
    if want == data {
        Found::Gen(g)
    } else {
        Found::Garbage
    }
}

/// What a block may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// One of these generations.
    OneOf(Vec<u32>),
    /// Anything: nothing is known (a region a crash cut off the image
    /// and a later resize brought back).
    Any,
}

impl Allowed {
    pub fn exactly(g: u32) -> Allowed {
        Allowed::OneOf(vec![g])
    }
    pub fn admits(&self, f: Found) -> bool {
        match (self, f) {
            (Allowed::Any, _) => true,
            (Allowed::OneOf(v), Found::Gen(g)) => v.contains(&g),
            (Allowed::OneOf(_), Found::Garbage) => false,
        }
    }
    fn add(&mut self, g: u32) {
        if let Allowed::OneOf(v) = self {
            if !v.contains(&g) {
                v.push(g);
            }
        }
    }
    /// After `kind` completed.
    pub fn apply(&mut self, kind: Kind) {
        match kind {
            Kind::Write(g) => *self = Allowed::exactly(g),
            Kind::Zero => *self = Allowed::exactly(ZERO),
            // A discard may leave the data (qcow2 keeps a partial
            // cluster's) or read back as zeroes.
            Kind::Discard => self.add(ZERO),
            Kind::Read => {}
        }
    }
    /// As well as what it may hold, what `kind` may have left if it
    /// landed (it was not made durable by a flush).
    pub fn maybe(&mut self, kind: Kind) {
        match kind {
            Kind::Write(g) => self.add(g),
            Kind::Zero | Kind::Discard => self.add(ZERO),
            Kind::Read => {}
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Write(u32),
    Zero,
    Discard,
    Read,
}

#[derive(Clone, Debug)]
pub struct Op {
    pub first: u64,
    pub count: u64,
    pub kind: Kind,
    pub sent: u64,
    pub done: Option<u64>,
}

/// One round's requests and flushes, as the client saw them.
#[derive(Default, Debug)]
pub struct Log {
    pub ops: Vec<Op>,
    /// (sent, done) of each flush.
    pub flushes: Vec<(u64, Option<u64>)>,
    /// (done, new size in bytes) of each block_resize that returned.
    pub resizes: Vec<(u64, u64)>,
    /// The kill came while a snapshot was being made or deleted.
    pub mid_snapshot: bool,
}

impl Log {
    /// When the last flush that completed was sent (0: none completed).
    pub fn durable_mark(&self) -> u64 {
        self.flushes
            .iter()
            .filter(|f| f.1.is_some())
            .map(|f| f.0)
            .max()
            .unwrap_or(0)
    }

    /// What each block may hold after the crash, from what it held at
    /// the round's start.
    pub fn after_crash(&self, start: &[Allowed]) -> Vec<Allowed> {
        let mark = self.durable_mark();
        let mut durable = start.to_vec();
        let mut later: Vec<Vec<Kind>> = vec![Vec::new(); start.len()];
        for op in &self.ops {
            let stable = op.done.is_some_and(|d| d < mark);
            for b in op.first..op.first + op.count {
                let Some(slot) = durable.get_mut(b as usize) else {
                    continue;
                };
                if stable {
                    slot.apply(op.kind);
                } else {
                    later[b as usize].push(op.kind);
                }
            }
        }
        for (slot, kinds) in durable.iter_mut().zip(later) {
            for k in kinds {
                slot.maybe(k);
            }
        }
        durable
    }

    /// The size the image must have at least after the crash: that of
    /// the last resize that returned before the last completed flush.
    pub fn durable_size(&self, start: u64) -> u64 {
        let mark = self.durable_mark();
        self.resizes
            .iter()
            .filter(|r| r.0 < mark)
            .map(|r| r.1)
            .fold(start, u64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_decode_and_catch_torn_blocks() {
        let mut b = vec![0u8; BLOCK as usize];
        pattern(7, 3, &mut b);
        assert_eq!(decode(3, &b), Found::Gen(7));
        assert_eq!(decode(4, &b), Found::Garbage);
        b[4000] ^= 1;
        assert_eq!(decode(3, &b), Found::Garbage);
        assert_eq!(decode(3, &[0; 4096]), Found::Gen(ZERO));
    }

    #[test]
    fn only_flushed_writes_are_required() {
        let op = |first, kind, sent, done| Op {
            first,
            count: 1,
            kind,
            sent,
            done,
        };
        let log = Log {
            ops: vec![
                op(0, Kind::Write(1), 1, Some(2)),
                op(1, Kind::Write(2), 3, Some(6)),
                op(0, Kind::Write(3), 7, None),
                op(2, Kind::Discard, 8, Some(9)),
            ],
            flushes: vec![(5, Some(7))],
            resizes: vec![],
            mid_snapshot: false,
        };
        let start = vec![
            Allowed::exactly(ZERO),
            Allowed::exactly(ZERO),
            Allowed::exactly(5),
        ];
        let a = log.after_crash(&start);
        assert_eq!(a[0], Allowed::OneOf(vec![1, 3]));
        assert_eq!(a[1], Allowed::OneOf(vec![ZERO, 2]));
        assert_eq!(a[2], Allowed::OneOf(vec![5, ZERO]));
    }
}
