//! Per-node I/O counters for query-blockstats, updated lock-free on the
//! data path.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

#[derive(Default)]
pub struct Counter {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    pub failed: AtomicU64,
    pub invalid: AtomicU64,
    pub total_ns: AtomicU64,
}

impl Counter {
    pub fn done(&self, bytes: u64, started: Instant, ok: bool) {
        if ok {
            self.ops.fetch_add(1, Relaxed);
            self.bytes.fetch_add(bytes, Relaxed);
        } else {
            self.failed.fetch_add(1, Relaxed);
        }
        self.total_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
    }
}

#[derive(Default)]
pub struct Stats {
    pub rd: Counter,
    pub wr: Counter,
    pub flush: Counter,
    pub unmap: Counter,
    /// Sectors are not tracked; QEMU reports merged requests as 0 too.
    pub wr_highest_offset: AtomicU64,
    /// Time of the last completed request, for `idle_time_ns`.
    pub last_io: std::sync::Mutex<Option<Instant>>,
}

impl Stats {
    pub fn touch(&self) {
        if let Ok(mut t) = self.last_io.lock() {
            *t = Some(Instant::now());
        }
    }
    pub fn note_write_end(&self, end: u64) {
        self.wr_highest_offset.fetch_max(end, Relaxed);
    }
}
