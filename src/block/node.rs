//! A block node as the data plane sees it: a driver plus the options
//! every driver shares (read-only, discard, detect-zeroes, cache.no-flush)
//! and its I/O counters. Exports and jobs hold an `Arc<Node>`.
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;

use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::error::{BlockError, BlockResult};
use super::hooks::{self, Hooks, Op, Request};
use super::stats::{Counter, Stats};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    #[default]
    Off,
    On,
    Unmap,
}

impl DetectZeroes {
    pub fn as_str(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct CommonOptions {
    pub read_only: bool,
    pub auto_read_only: bool,
    pub force_share: bool,
    /// discard=unmap: pass discards down; discard=ignore drops them.
    pub discard_unmap: bool,
    pub detect_zeroes: DetectZeroes,
    pub cache_direct: bool,
    pub cache_no_flush: bool,
}

pub struct Node {
    pub name: String,
    pub driver: Box<dyn Driver>,
    /// The options as opened; those blockdev-reopen changes are `live`.
    pub opts: CommonOptions,
    live: Live,
    pub stats: Stats,
    /// Hooks every request passes (throttling, write notifiers, metrics).
    pub hooks: Hooks,
    /// block-set-write-threshold's offset (0: none); the hook that
    /// watches it shares it.
    pub write_threshold: Arc<std::sync::atomic::AtomicU64>,
    /// The named dirty bitmaps (block-dirty-bitmap-add, or loaded from
    /// the image).
    pub bitmaps: Arc<super::dirty::NodeBitmaps>,
    drain: Drain,
}

/// Requests in flight on the node, so a graph change can wait for them.
#[derive(Default)]
struct Drain {
    inflight: AtomicUsize,
    /// Callers waiting in [`Node::drained`].
    waiters: AtomicUsize,
    idle: Notify,
}

/// A request in flight on a node; leaves when dropped.
struct InFlight<'a>(&'a Drain);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let d = self.0;
        if d.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && d.waiters.load(Ordering::SeqCst) > 0 {
            d.idle.notify_waiters();
        }
    }
}

/// The options blockdev-reopen can change, read on every request.
struct Live {
    read_only: AtomicBool,
    discard_unmap: AtomicBool,
    /// DetectZeroes as 0 off, 1 on, 2 unmap.
    detect_zeroes: AtomicU8,
    /// blockdev-set-active: an inactive node has handed its image to
    /// another process (migration): it refuses changes and holds only
    /// the locks of a reader.
    inactive: AtomicBool,
}

fn dz_code(d: DetectZeroes) -> u8 {
    match d {
        DetectZeroes::Off => 0,
        DetectZeroes::On => 1,
        DetectZeroes::Unmap => 2,
    }
}

fn out_of_range(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_none_or(|end| end > size)
}

impl Node {
    /// Counts a completed request; one slower than RSD_SLOW_REQUEST_MS
    /// becomes a span while traces are on (off, the threshold is
    /// u64::MAX and this is one relaxed load).
    #[inline]
    fn finished(
        &self,
        counter: &Counter,
        op: &'static str,
        offset: u64,
        len: u64,
        started: Instant,
        ok: bool,
    ) {
        let ns = counter.done(len, started, ok);
        if ns > observability::traces::slow_ns() {
            observability::traces::slow_request(&self.name, op, offset, len, ns, ok);
        }
    }

    /// The checks every request makes: read-only nodes refuse changes,
    /// and the range must lie inside the node (counted as invalid if not).
    fn check(
        &self,
        counter: &Counter,
        offset: u64,
        len: u64,
        changes: bool,
        what: &str,
    ) -> Result<(), BlockError> {
        if changes && self.read_only() {
            return Err(BlockError::perm("Block node is read-only"));
        }
        if changes && !self.is_active() {
            return Err(BlockError::perm("Operation not permitted"));
        }
        // Writes may go past the end: a format grows its file that way
        // (QEMU's node layer allows it too; exports check their own size).
        let grows = changes && what != "discard" && self.driver.grows_on_write();
        if (grows && offset.checked_add(len).is_none())
            || (!grows && out_of_range(offset, len, self.size()))
        {
            counter
                .invalid
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(BlockError::inval(format!(
                "{what} beyond the end of the node"
            )));
        }
        Ok(())
    }
}

impl Node {
    pub fn new(name: String, driver: Box<dyn Driver>, opts: CommonOptions) -> Arc<Node> {
        let live = Live {
            read_only: AtomicBool::new(opts.read_only),
            discard_unmap: AtomicBool::new(opts.discard_unmap),
            detect_zeroes: AtomicU8::new(dz_code(opts.detect_zeroes)),
            inactive: AtomicBool::new(false),
        };
        let loaded = driver.take_bitmaps();
        let node = Arc::new(Node {
            name,
            driver,
            opts,
            live,
            stats: Stats::default(),
            hooks: Hooks::default(),
            write_threshold: Default::default(),
            bitmaps: Default::default(),
            drain: Drain::default(),
        });
        for b in loaded {
            node.add_bitmap(Arc::new(b));
        }
        node
    }

    /// Adds a named bitmap (first in the list); false if the name is
    /// taken. The recording hook is on while the node has bitmaps.
    pub fn add_bitmap(&self, b: Arc<super::dirty::NamedBitmap>) -> bool {
        if !self.bitmaps.insert(b) {
            return false;
        }
        if !self.hooks.names().iter().any(|n| n == super::dirty::HOOK) {
            self.hooks
                .add(Arc::new(super::dirty::Recorder(self.bitmaps.clone())));
        }
        true
    }

    /// After the node switched between read-only and read-write: the
    /// image's bitmaps follow (QEMU's reopen_bitmaps_ro/rw). Going
    /// read-write marks them in use on disk again; going read-only
    /// (after `close` stored them) makes them read-only.
    pub async fn bitmaps_follow_read_only(&self, read_only: bool) -> BlockResult<()> {
        if !read_only {
            self.driver.reopen_bitmaps_rw().await?;
        }
        for b in self.bitmaps.all() {
            if b.persistent() {
                b.set_readonly(read_only);
            }
        }
        Ok(())
    }

    pub fn remove_bitmap(&self, name: &str) -> Option<Arc<super::dirty::NamedBitmap>> {
        let b = self.bitmaps.remove(name);
        if self.bitmaps.is_empty() {
            self.hooks.remove(super::dirty::HOOK);
        }
        b
    }

    /// False once blockdev-set-active inactivated the node.
    pub fn is_active(&self) -> bool {
        !self.live.inactive.load(Ordering::Acquire)
    }

    pub fn set_active(&self, active: bool) {
        self.live.inactive.store(!active, Ordering::Release);
    }

    /// Requests in flight on this node now.
    pub fn inflight(&self) -> usize {
        self.drain.inflight.load(Ordering::SeqCst)
    }

    /// Waits until no request is in flight on this node. New requests
    /// are not held here: the graph quiesces the parents' edges first
    /// (see `Graph::drain`), so none arrive.
    pub async fn drained(&self) {
        let d = &self.drain;
        d.waiters.fetch_add(1, Ordering::SeqCst);
        // A throttle filter's queued requests go now rather than at its
        // limits' pace (QEMU's drain_begin lifts them).
        let _section = self.drain_section();
        loop {
            let idle = d.idle.notified();
            if d.inflight.load(Ordering::SeqCst) == 0 {
                break;
            }
            idle.await;
        }
        d.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// A drained section on this node and the filters and raw windows
    /// below it (the edges a request goes down): throttle filters among
    /// them lift their limits until the section is dropped.
    pub fn drain_section(&self) -> DrainSection<'_> {
        let mut nodes: Vec<Arc<Node>> = Vec::new();
        self.driver.drain_begin();
        let mut next = ["file", "image"]
            .iter()
            .find_map(|r| self.driver.child_slot(r))
            .and_then(|c| c.get());
        while let Some(n) = next {
            if nodes.len() > 64 || nodes.iter().any(|x| Arc::ptr_eq(x, &n)) {
                break;
            }
            n.driver.drain_begin();
            next = ["file", "image"]
                .iter()
                .find_map(|r| n.driver.child_slot(r))
                .and_then(|c| c.get());
            nodes.push(n);
        }
        DrainSection { top: self, nodes }
    }

    fn enter(&self) -> InFlight<'_> {
        self.drain.inflight.fetch_add(1, Ordering::SeqCst);
        InFlight(&self.drain)
    }

    /// Runs one request: counted in flight, through the hooks, then
    /// the driver.
    async fn run<'a, T>(
        &'a self,
        req: Request,
        call: impl FnOnce() -> IoFuture<'a, T>,
    ) -> BlockResult<T> {
        let _in = self.enter();
        match self.hooks.active() {
            None => call().await,
            Some(list) => {
                let guards = hooks::before(&list, &req).await?;
                let r = call().await;
                hooks::after(&list, &req, r.is_ok());
                drop(guards);
                r
            }
        }
    }

    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    pub fn limits(&self) -> Limits {
        self.driver.limits()
    }

    /// Writes a new backing file name into the image's header.
    pub async fn change_backing(
        &self,
        name: &str,
        fmt: Option<&str>,
        full: String,
    ) -> Result<(), BlockError> {
        if self.read_only() {
            return Err(BlockError::perm("Block node is read-only"));
        }
        self.driver.change_backing_file(name, fmt, full).await
    }

    pub fn discard_unmap(&self) -> bool {
        self.live.discard_unmap.load(Ordering::Relaxed)
    }

    pub fn detect_zeroes(&self) -> DetectZeroes {
        match self.live.detect_zeroes.load(Ordering::Relaxed) {
            1 => DetectZeroes::On,
            2 => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        }
    }

    /// blockdev-reopen: the options it may change, applied at once
    /// (requests that already checked them finish as they started).
    pub fn set_live(&self, read_only: bool, discard_unmap: bool, detect_zeroes: DetectZeroes) {
        self.live.read_only.store(read_only, Ordering::Relaxed);
        self.live
            .discard_unmap
            .store(discard_unmap, Ordering::Relaxed);
        self.live
            .detect_zeroes
            .store(dz_code(detect_zeroes), Ordering::Relaxed);
    }

    pub fn read_only(&self) -> bool {
        self.live.read_only.load(Ordering::Relaxed)
    }

    pub fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let len = buf.len() as u64;
            // A file reads as zeroes past its end, as in QEMU's block
            // layer: a qcow2 whose clusters lie past a truncated end
            // reads them as zeroes instead of failing.
            let past_end = self
                .driver
                .grows_on_write()
                .then(|| self.size())
                .filter(|size| offset.checked_add(len).is_some_and(|end| end > *size));
            let buf = match past_end {
                Some(size) => {
                    let inside = size.saturating_sub(offset).min(len) as usize;
                    buf[inside..].fill(0);
                    &mut buf[..inside]
                }
                None => buf,
            };
            if !buf.is_empty() {
                self.check(&self.stats.rd, offset, buf.len() as u64, false, "read")?;
            }
            let t = Instant::now();
            let r = if buf.is_empty() {
                Ok(())
            } else {
                let req = Request {
                    op: Op::Read,
                    offset,
                    len: buf.len() as u64,
                };
                self.run(req, || self.driver.read(offset, buf)).await
            };
            self.finished(&self.stats.rd, "read", offset, len, t, r.is_ok());
            self.stats.touch();
            r
        })
    }

    pub fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let len = buf.len() as u64;
            self.check(&self.stats.wr, offset, len, true, "write")?;
            let t = Instant::now();
            let dz = self.detect_zeroes();
            let r = if dz != DetectZeroes::Off && crate::block::buffers::all_zero(buf) {
                let zf = ZeroFlags {
                    fua: flags.fua,
                    may_unmap: dz == DetectZeroes::Unmap && self.discard_unmap(),
                    no_fallback: false,
                };
                let req = Request {
                    op: Op::Zero,
                    offset,
                    len,
                };
                self.run(req, || self.driver.write_zeroes(offset, len, zf))
                    .await
            } else {
                let req = Request {
                    op: Op::Write,
                    offset,
                    len,
                };
                self.run(req, || self.driver.write(offset, buf, flags))
                    .await
            };
            self.finished(&self.stats.wr, "write", offset, len, t, r.is_ok());
            if r.is_ok() {
                self.stats.note_write_end(offset + len);
            }
            self.stats.touch();
            r
        })
    }

    pub fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let t = Instant::now();
            let r = if self.opts.cache_no_flush {
                Ok(())
            } else {
                let req = Request {
                    op: Op::Flush,
                    offset: 0,
                    len: 0,
                };
                self.run(req, || self.driver.flush()).await
            };
            self.finished(&self.stats.flush, "flush", 0, 0, t, r.is_ok());
            r
        })
    }

    /// Flush, then the driver's close: for a node that goes away or
    /// becomes read-only. The driver writes back its caches even with
    /// cache.no-flush (as QEMU does).
    pub fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let r = self.flush().await;
            let b = self.driver.store_bitmaps(&self.bitmaps.all()).await;
            let c = self.driver.close().await;
            r.and(b).and(c)
        })
    }

    pub fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check(&self.stats.unmap, offset, len, true, "discard")?;
            let t = Instant::now();
            let r = if self.discard_unmap() {
                let req = Request {
                    op: Op::Discard,
                    offset,
                    len,
                };
                self.run(req, || self.driver.discard(offset, len)).await
            } else {
                Ok(())
            };
            self.finished(&self.stats.unmap, "discard", offset, len, t, r.is_ok());
            r
        })
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check(&self.stats.wr, offset, len, true, "write")?;
            let flags = ZeroFlags {
                may_unmap: flags.may_unmap && self.discard_unmap(),
                ..flags
            };
            let t = Instant::now();
            let req = Request {
                op: Op::Zero,
                offset,
                len,
            };
            let r = self
                .run(req, || self.driver.write_zeroes(offset, len, flags))
                .await;
            self.finished(&self.stats.wr, "write_zeroes", offset, len, t, r.is_ok());
            if r.is_ok() {
                self.stats.note_write_end(offset + len);
            }
            r
        })
    }

    pub fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        Box::pin(async move {
            let size = self.size();
            if offset >= size {
                return Err(BlockError::inval("block status beyond the end of the node"));
            }
            let len = len.min(size - offset);
            let _in = self.enter();
            let mut e = self.driver.block_status(offset, len).await?;
            e.len = e.len.clamp(1, len);
            Ok(e)
        })
    }

    pub fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only() {
                return Err(BlockError::perm("Block node is read-only"));
            }
            let _in = self.enter();
            self.driver.truncate(size).await?;
            self.bitmaps.resize(self.size());
            Ok(())
        })
    }

    pub fn allocated_size(&self) -> Option<u64> {
        self.driver.allocated_size()
    }
}

/// See `Node::drain_section`.
pub struct DrainSection<'a> {
    top: &'a Node,
    nodes: Vec<Arc<Node>>,
}

impl Drop for DrainSection<'_> {
    fn drop(&mut self) {
        self.top.driver.drain_end();
        for n in &self.nodes {
            n.driver.drain_end();
        }
    }
}
