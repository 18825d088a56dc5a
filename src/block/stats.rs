//! Per-node I/O counters, updated lock-free on the data path. Both
//! query-blockstats and the Prometheus collector (src/metrics) read
//! these same atomics.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

#[derive(Default)]
pub struct Counter {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    pub failed: AtomicU64,
    pub invalid: AtomicU64,
    pub total_ns: AtomicU64,
    /// Every completed request's latency (succeeded or failed: its sum
    /// is `total_ns`).
    pub latency: observability::metrics::Histogram,
}

impl Counter {
    /// Counts a completed request; returns how long it took (ns).
    pub fn done(&self, bytes: u64, started: Instant, ok: bool) -> u64 {
        if ok {
            self.ops.fetch_add(1, Relaxed);
            self.bytes.fetch_add(bytes, Relaxed);
        } else {
            self.failed.fetch_add(1, Relaxed);
        }
        let ns = started.elapsed().as_nanos() as u64;
        self.total_ns.fetch_add(ns, Relaxed);
        self.latency.observe_ns(ns);
        ns
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
    /// When the last request completed, in nanoseconds after `epoch()`
    /// plus one (0: never), for `idle_time_ns`: an atomic, not a lock
    /// taken per request.
    last_io: AtomicU64,
}

/// A fixed instant the request times count from.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Stats {
    pub fn touch(&self) {
        let at = epoch().elapsed().as_nanos() as u64 + 1;
        self.last_io.store(at, Relaxed);
    }
    /// Nanoseconds since the last request completed, if there was one.
    pub fn idle_ns(&self) -> Option<u64> {
        match self.last_io.load(Relaxed) {
            0 => None,
            at => Some((epoch().elapsed().as_nanos() as u64 + 1).saturating_sub(at)),
        }
    }
    pub fn note_write_end(&self, end: u64) {
        self.wr_highest_offset.fetch_max(end, Relaxed);
    }
}
