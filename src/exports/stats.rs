//! Per-export counters every export type keeps the same way: clients
//! connected now, connections ever, and requests, bytes and errors by
//! operation. Relaxed atomics only, so counting costs a request two or
//! three uncontended adds; the metrics collector reads them at scrape
//! time, while the export exists.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// What an export's client asked for, across protocols.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    BlockStatus,
    /// Anything else (NBD CACHE, virtio GET_ID, FUSE attributes...).
    Other,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Discard,
        Op::WriteZeroes,
        Op::BlockStatus,
        Op::Other,
    ];

    /// The `op` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
            Op::BlockStatus => "block_status",
            Op::Other => "other",
        }
    }
}

const OPS: usize = Op::ALL.len();

#[derive(Default)]
pub struct ExportStats {
    connected: AtomicU64,
    connections: AtomicU64,
    /// Clients that came after the first one (for vhost-user-blk, a
    /// frontend coming back).
    reconnects: AtomicU64,
    requests: [AtomicU64; OPS],
    /// Data moved by reads and writes (payload bytes).
    bytes: [AtomicU64; OPS],
    errors: [AtomicU64; OPS],
}

/// A client counted as connected until dropped.
pub struct Connection(Arc<ExportStats>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Relaxed);
    }
}

/// A snapshot of the counters, for the collector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub connected: u64,
    pub connections: u64,
    pub reconnects: u64,
    /// (op, requests, bytes, errors), for every op.
    pub ops: Vec<(Op, u64, u64, u64)>,
}

impl ExportStats {
    /// A client connected; it counts until the guard is dropped.
    pub fn connect(self: &Arc<Self>) -> Connection {
        if self.connections.fetch_add(1, Relaxed) > 0 {
            self.reconnects.fetch_add(1, Relaxed);
        }
        self.connected.fetch_add(1, Relaxed);
        Connection(self.clone())
    }

    /// One request done; `bytes` is its payload (0 for requests that
    /// move no data).
    pub fn request(&self, op: Op, bytes: u64, ok: bool) {
        let i = op as usize;
        self.requests[i].fetch_add(1, Relaxed);
        if ok {
            if bytes > 0 {
                self.bytes[i].fetch_add(bytes, Relaxed);
            }
        } else {
            self.errors[i].fetch_add(1, Relaxed);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connected: self.connected.load(Relaxed),
            connections: self.connections.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            ops: Op::ALL
                .iter()
                .map(|op| {
                    let i = *op as usize;
                    (
                        *op,
                        self.requests[i].load(Relaxed),
                        self.bytes[i].load(Relaxed),
                        self.errors[i].load(Relaxed),
                    )
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        let s = Arc::new(ExportStats::default());
        let a = s.connect();
        let b = s.connect();
        drop(a);
        s.request(Op::Write, 4096, true);
        s.request(Op::Write, 4096, false);
        s.request(Op::Flush, 0, true);
        let snap = s.snapshot();
        assert_eq!(
            (snap.connected, snap.connections, snap.reconnects),
            (1, 2, 1)
        );
        assert_eq!(snap.ops[Op::Write as usize], (Op::Write, 2, 4096, 1));
        assert_eq!(snap.ops[Op::Flush as usize], (Op::Flush, 1, 0, 0));
        drop(b);
        assert_eq!(s.snapshot().connected, 0);
    }
}
