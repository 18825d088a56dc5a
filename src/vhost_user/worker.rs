//! A started queue's worker: a thread of its own with a single-threaded
//! tokio runtime, or, for an export on an iothread, a task on the
//! iothread's runtime (all the export's queues then share that thread,
//! as QSD serves them in the export's AioContext). It takes the requests a kick finds, runs them together
//! on that runtime with guest memory read and written in place, and puts
//! each one in the used ring as soon as it is done, with no hand-off to
//! another thread. While requests are in flight it still watches the
//! kick eventfd, so a slow request never holds back the ones behind it.
//!
//! With an inflight region, each request is marked when taken and
//! unmarked once in the used ring; a worker starting on a region that a
//! previous device used first runs again the requests still marked.
//!
//! Stopping (GET_VRING_BASE, a disable, the connection's end) stops
//! taking requests and waits for those in flight, then hands the queue
//! back: that is the drain of block-export-del and quit.
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};

use super::dirty::{self, DirtyLog};
use super::inflight::{QueueLog, Recovery};
use super::request::{self, Desc};
use super::Shared;

pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The call eventfd, which the frontend may change while the queue runs.
pub type Call = Arc<Mutex<Option<File>>>;

/// What a worker needs to start.
pub struct Start {
    pub index: u16,
    pub shared: Arc<Shared>,
    pub mem: Memory,
    pub queue: Queue,
    pub kick: OwnedFd,
    pub call: Call,
    pub log: Option<QueueLog>,
    /// Dirty-page logging (live migration).
    pub dirty: dirty::Switch,
}

/// A running worker, as the connection holds it.
pub struct Worker {
    stop: Arc<Notify>,
    stopping: Arc<AtomicBool>,
    done: Done,
}

/// Where the queue comes back from when the worker ends.
enum Done {
    Thread(JoinHandle<Queue>),
    Task(std::sync::mpsc::Receiver<Queue>),
}

impl Worker {
    pub fn spawn(s: Start) -> std::io::Result<Worker> {
        let stop = Arc::new(Notify::new());
        let stopping = Arc::new(AtomicBool::new(false));
        let (stop2, stopping2) = (stop.clone(), stopping.clone());
        let done = match s.shared.placement.current() {
            Some(io) => {
                let (tx, rx) = std::sync::mpsc::channel();
                let started = io.spawn_with(move || async move {
                    let _ = tx.send(serve(s, stop2, stopping2).await);
                });
                if !started {
                    return Err(std::io::Error::other(format!(
                        "iothread {} has stopped",
                        io.id
                    )));
                }
                Done::Task(rx)
            }
            None => {
                let name = format!("vhost-user/q{}", s.index);
                Done::Thread(
                    std::thread::Builder::new()
                        .name(name)
                        .spawn(move || run(s, stop2, stopping2))?,
                )
            }
        };
        Ok(Worker {
            stop,
            stopping,
            done,
        })
    }

    /// Stops taking requests, waits for those in flight, and gives the
    /// queue back (None if the worker panicked or its iothread ended).
    pub fn stop(self) -> Option<Queue> {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.notify_one();
        match self.done {
            Done::Thread(t) => t.join().ok(),
            Done::Task(rx) => rx.recv().ok(),
        }
    }
}

/// A worker on a thread of its own.
fn run(s: Start, stop: Arc<Notify>, stopping: Arc<AtomicBool>) -> Queue {
    // Reads land in guest memory: a large one may copy on another core.
    // (Not on an iothread, whose NBD clients keep their reads inline.)
    crate::block::file::copy_large_reads_elsewhere();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!("vhost-user queue {}: no runtime: {e}", s.index);
            return s.queue;
        }
    };
    rt.block_on(serve(s, stop, stopping))
}

/// Serves the queue on the runtime that polls this future, until told
/// to stop; gives the queue back.
async fn serve(s: Start, stop: Arc<Notify>, stopping: Arc<AtomicBool>) -> Queue {
    let Start {
        index: _,
        shared,
        mem,
        queue,
        kick,
        call,
        log,
        dirty,
    } = s;
    let mut q = Served {
        shared,
        mem,
        queue,
        call,
        log,
        dirty,
        event_idx: false,
    };
    q.event_idx = q.queue.event_idx_enabled();
    q.serve(kick, stop, stopping).await;
    q.queue
}

/// A queue being served: its ring, its memory and its inflight log.
struct Served {
    shared: Arc<Shared>,
    mem: Memory,
    queue: Queue,
    call: Call,
    log: Option<QueueLog>,
    dirty: dirty::Switch,
    event_idx: bool,
}

/// A finished request: its head, the bytes it wrote, its descriptors
/// (whose writable ones the dirty log marks).
type Finished = (u16, u32, Vec<Desc>);
type Running = JoinSet<Finished>;

impl Served {
    async fn serve(&mut self, kick: OwnedFd, stop: Arc<Notify>, stopping: Arc<AtomicBool>) {
        let _ = nix::fcntl::fcntl(
            kick.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        // SAFETY: the worker owns this duplicate of the kick descriptor;
        // it stays open and the same while the AsyncFd holds it.
        let kick = unsafe { AsyncFd::register_with_interest(kick, Interest::READABLE) }.ok();
        let mut running = Running::new();
        self.recover(&mut running);
        loop {
            let halted = stopping.load(Ordering::SeqCst);
            if !halted {
                self.take_available(&mut running);
            } else if running.is_empty() {
                return;
            }
            tokio::select! {
                Some(done) = running.join_next(), if !running.is_empty() => {
                    let log = self.dirty.current();
                    self.finish(done, log.as_deref());
                    // Whatever else is done goes in with it, one signal.
                    while let Some(done) = running.try_join_next() {
                        self.finish(done, log.as_deref());
                    }
                    if let Some(log) = &log {
                        // flags, idx, the ring and avail_event.
                        let len = 6 + 8 * u64::from(self.queue.size());
                        log.mark(self.queue.used_ring(), len);
                    }
                    self.signal();
                }
                _ = stop.notified(), if !halted => {}
                ready = readable(kick.as_ref()), if !halted => {
                    if let Ok(fd) = ready {
                        clear_kick(fd);
                    }
                }
            }
        }
    }

    /// Runs again what a previous device left in flight (oldest first),
    /// and starts the avail ring after the last request it took.
    fn recover(&mut self, running: &mut Running) {
        let mem = self.mem.memory().into_inner();
        // The used ring goes on from where it is (the frontend's view).
        let Ok(used) = self.queue.used_idx(&*mem, Ordering::Acquire) else {
            return;
        };
        let used = used.0;
        self.queue.set_next_used(used);
        let Some(log) = self.log.as_mut() else { return };
        let Recovery::Resubmit { heads, next_avail } = log.start(used) else {
            return;
        };
        if !heads.is_empty() {
            tracing::debug!("vhost-user: resubmitting {} requests", heads.len());
        }
        self.queue.set_next_avail(next_avail);
        for head in heads {
            match chain_at(&mem, &self.queue, head) {
                Some(descs) => self.spawn(running, &mem, head, descs),
                // The chain no longer reads: give the buffer back empty.
                None => {
                    running.spawn(async move { (head, 0, Vec::new()) });
                }
            }
        }
    }

    /// Starts every request the ring holds (with event-idx: until no
    /// request came while notifications were off).
    fn take_available(&mut self, running: &mut Running) {
        let mem = self.mem.memory().into_inner();
        loop {
            if self.event_idx {
                let _ = self.queue.disable_notification(&*mem);
            }
            let mut taken = Vec::new();
            // An avail index more than a ring ahead (the frontend made
            // it up) cannot be iterated: it gives nothing to serve.
            if let Ok(iter) = self.queue.iter(&*mem) {
                for chain in iter {
                    let head = chain.head_index();
                    if let Some(log) = self.log.as_mut() {
                        log.taken(head);
                    }
                    let descs = chain
                        .map(|d| Desc {
                            addr: d.addr().0,
                            len: d.len(),
                            writable: d.is_write_only(),
                        })
                        .collect();
                    taken.push((head, descs));
                }
            }
            let progress = !taken.is_empty();
            for (head, descs) in taken {
                self.spawn(running, &mem, head, descs);
            }
            if !self.event_idx {
                return;
            }
            // Notifications on again; go round only if this pass took
            // something: a ring that says "more" but gives nothing
            // (a made-up index) would spin this thread for ever, and
            // libvhost-user stops on it too. The next kick tries again.
            match self.queue.enable_notification(&*mem) {
                Ok(true) if progress => continue,
                _ => return,
            }
        }
    }

    fn spawn(
        &self,
        running: &mut Running,
        mem: &Arc<GuestMemoryMmap>,
        head: u16,
        descs: Vec<Desc>,
    ) {
        let (shared, mem) = (self.shared.clone(), mem.clone());
        running.spawn(async move {
            let used = request::run(&shared, &mem, &descs).await;
            (head, used, descs)
        });
    }

    /// Puts a finished request in the used ring, its inflight mark
    /// cleared around it as the spec orders.
    fn finish(&mut self, done: Result<Finished, tokio::task::JoinError>, log: Option<&DirtyLog>) {
        let Ok((head, used, descs)) = done else {
            tracing::warn!("vhost-user: a request's task failed");
            return;
        };
        if let Some(log) = log {
            for d in descs.iter().filter(|d| d.writable) {
                log.mark(d.addr, u64::from(d.len));
            }
        }
        let mem = self.mem.memory();
        if let Some(log) = self.log.as_mut() {
            log.completing(head);
        }
        if self.queue.add_used(&*mem, head, used).is_err() {
            return;
        }
        if let Some(log) = self.log.as_mut() {
            log.completed(head, self.queue.next_used());
        }
    }

    /// Tells the frontend about new used entries, if it wants to hear.
    fn signal(&mut self) {
        let mem = self.mem.memory();
        if !self.queue.needs_notification(&*mem).unwrap_or(true) {
            return;
        }
        if let Ok(call) = self.call.lock() {
            if let Some(mut f) = call.as_ref() {
                let _ = f.write(&1u64.to_ne_bytes());
            }
        }
    }
}

async fn readable(kick: Option<&AsyncFd<OwnedFd>>) -> std::io::Result<&AsyncFd<OwnedFd>> {
    match kick {
        Some(k) => k.readable().await.map(|mut g| {
            g.clear_ready();
            k
        }),
        // No kick descriptor to watch: only completions and stop wake us.
        None => std::future::pending().await,
    }
}

/// Reads the kick counter back to 0 (it is non-blocking).
fn clear_kick(fd: &AsyncFd<OwnedFd>) {
    let mut buf = [0u8; 8];
    let _ = nix::unistd::read(fd.get_ref().as_raw_fd(), &mut buf);
}

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

/// The chain starting at `head`, read again from the descriptor table
/// (a resubmitted request: its avail ring entry may be gone), with the
/// checks virtio-queue makes: bounded length, indexes inside the table,
/// no indirect table inside an indirect table.
fn chain_at(mem: &GuestMemoryMmap, queue: &Queue, head: u16) -> Option<Vec<Desc>> {
    let mut table = GuestAddress(queue.desc_table());
    let mut size = queue.size();
    let mut ttl = size;
    let mut next = head;
    let mut indirect = false;
    let mut descs = Vec::new();
    while ttl > 0 && next < size {
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, table.checked_add(16 * u64::from(next))?)
            .ok()?;
        let addr = u64::from_le_bytes(raw[0..8].try_into().ok()?);
        let len = u32::from_le_bytes(raw[8..12].try_into().ok()?);
        let flags = u16::from_le_bytes(raw[12..14].try_into().ok()?);
        let link = u16::from_le_bytes(raw[14..16].try_into().ok()?);
        if flags & DESC_F_INDIRECT != 0 {
            if indirect || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
                return None;
            }
            table = GuestAddress(addr);
            size = u16::try_from(len / 16).ok()?;
            ttl = size;
            next = 0;
            indirect = true;
            continue;
        }
        descs.push(Desc {
            addr,
            len,
            writable: flags & DESC_F_WRITE != 0,
        });
        if flags & DESC_F_NEXT == 0 {
            return Some(descs);
        }
        next = link;
        ttl -= 1;
    }
    // Ran out of table or length: what was read is the chain, as
    // virtio-queue's iterator ends it.
    (!descs.is_empty()).then_some(descs)
}

/// One pass of a worker over a queue, without its thread, kick and
/// call: recovery from the inflight log, every request the ring holds,
/// each completion put in the used ring (the fuzz target's body).
#[doc(hidden)]
pub async fn fuzz_pass(shared: Arc<Shared>, mem: Memory, queue: Queue, log: Option<QueueLog>) {
    let mut q = Served {
        shared,
        mem,
        queue,
        call: Arc::new(Mutex::new(None)),
        log,
        dirty: dirty::Switch::default(),
        event_idx: false,
    };
    q.event_idx = q.queue.event_idx_enabled();
    let mut running = Running::new();
    q.recover(&mut running);
    q.take_available(&mut running);
    while let Some(done) = running.join_next().await {
        q.finish(done, None);
    }
    q.signal();
}

#[cfg(test)]
mod tests {
    /// A frontend's avail index more than a ring ahead of the device
    /// (virtio-queue refuses to iterate it) with event-idx on: the
    /// worker once looped on it forever without yielding, so it never
    /// stopped (found by the vhost_user fuzz target).
    #[test]
    fn a_made_up_avail_index_does_not_spin_the_worker() {
        // Queue of 16, event-idx; guest memory all zero but the avail
        // index (the ring is at 0x1000, its index 2 bytes in).
        let mut input = vec![4u8, 1];
        input.resize(2 + 0x1004, 0);
        input[2 + 0x1002..2 + 0x1004].copy_from_slice(&1000u16.to_le_bytes());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            crate::fuzzing::vhost_user(&input);
            let _ = tx.send(());
        });
        let done = rx.recv_timeout(std::time::Duration::from_secs(20));
        assert!(done.is_ok(), "the worker spun on the avail index");
    }
}
