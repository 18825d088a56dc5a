//! io_uring for the file driver: one ring per thread, created when a
//! request on that thread first needs one, so a request is submitted and
//! completed by the thread that runs it, with no hand-off.
//!
//! The ring's completions signal an eventfd that the thread's tokio
//! reactor watches (`AsyncFd`); a small reaper task drains the completion
//! queue and wakes the requests. A request also looks at the completion
//! queue itself right after submitting and whenever it is polled, so what
//! the kernel completes inline (a page-cache hit) needs no wake-up.
//!
//! Requests work on their callers' memory in place (guest memory, a
//! caller's buffer). The kernel may use it until the completion arrives,
//! so a request's future that is dropped before then (a cancelled
//! request) waits for the completion in its drop.
use std::cell::RefCell;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, types, IoUring};
use nix::libc;
use tokio::io::unix::AsyncFd;

/// Submission queue entries per ring (the completion queue has twice as
/// many). An NBD connection has at most 64 requests in flight.
const ENTRIES: u32 = 128;

enum Slot {
    Free,
    /// Submitted; the future waits.
    Waiting(Option<Waker>),
    /// Completed, the future has not looked yet.
    Done(i32),
}

struct Inner {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<u32>,
}

pub struct Ring {
    inner: Mutex<Inner>,
    event: AsyncFd<OwnedFd>,
    /// Cleared when the reaper task ends (its runtime shut down).
    reaper: AtomicBool,
}

/// Requests submitted to any ring (tests check the engine was used).
#[cfg(test)]
pub static SUBMITTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether io_uring can be used here; the reason when not.
pub fn probe() -> Result<(), &'static str> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if std::env::var_os("RSD_NO_IO_URING").is_some() {
                return Err("disabled by RSD_NO_IO_URING".into());
            }
            IoUring::new(2)
                .map(|_| ())
                .map_err(|e| crate::util::os_msg(&e))
        })
        .as_ref()
        .map(|_| ())
        .map_err(|e| e.as_str())
}

/// Says once per process that the blocking pool replaces io_uring.
pub fn warn_unavailable(why: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::warn!(
            reason = why,
            "io_uring unavailable: file I/O uses a thread pool"
        );
    });
}

enum Local {
    Unset,
    /// This thread's runtime cannot watch a descriptor (no I/O driver).
    Unusable,
    Ring(Arc<Ring>),
}

thread_local! {
    static LOCAL: RefCell<Local> = const { RefCell::new(Local::Unset) };
}

/// This thread's ring, created on first use; None outside a tokio
/// runtime with an I/O driver, or when io_uring is unavailable.
pub fn local() -> Option<Arc<Ring>> {
    probe().ok()?;
    let handle = tokio::runtime::Handle::try_current().ok()?;
    LOCAL
        .try_with(|l| {
            let mut l = l.borrow_mut();
            match &*l {
                Local::Unusable => return None,
                Local::Ring(r) if r.reaper.load(Ordering::Acquire) => return Some(r.clone()),
                _ => {}
            }
            // A ring whose runtime is gone is dropped here (it waits for
            // its requests), and a new one made for this runtime.
            *l = Local::Unset;
            match Ring::new() {
                Ok(Some(r)) => {
                    let r = Arc::new(r);
                    handle.spawn(reap(r.clone()));
                    *l = Local::Ring(r.clone());
                    Some(r)
                }
                Ok(None) => {
                    *l = Local::Unusable;
                    None
                }
                Err(e) => {
                    warn_unavailable(&crate::util::os_msg(&e));
                    *l = Local::Unusable;
                    None
                }
            }
        })
        .ok()
        .flatten()
}

/// Drains completions whenever the eventfd fires, until the runtime ends.
async fn reap(ring: Arc<Ring>) {
    struct Ended(Arc<Ring>);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.reaper.store(false, Ordering::Release);
        }
    }
    let ended = Ended(ring);
    loop {
        let Ok(mut guard) = ended.0.event.readable().await else {
            return;
        };
        // Edge-triggered: clear first, so a completion posted while we
        // drain is seen at the next turn of the reactor.
        guard.clear_ready();
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a local buffer (non-blocking fd).
        unsafe { libc::read(ended.0.event.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        let woken = match ended.0.inner.lock() {
            Ok(mut inner) => inner.drain(),
            Err(_) => return,
        };
        wake(woken);
    }
}

/// Wakes the futures whose requests completed (outside the ring's lock,
/// so a waker that polls at once cannot deadlock).
fn wake(woken: Vec<Waker>) {
    for w in woken {
        w.wake();
    }
}

impl Inner {
    /// Moves every completion into its slot; returns the futures to wake.
    #[must_use]
    fn drain(&mut self) -> Vec<Waker> {
        let mut woken = Vec::new();
        let Inner { ring, slots, .. } = self;
        for cqe in ring.completion() {
            let i = cqe.user_data() as usize;
            let Some(slot) = slots.get_mut(i) else {
                continue;
            };
            if let Slot::Waiting(w) = slot {
                woken.extend(w.take());
                *slot = Slot::Done(cqe.result());
            }
        }
        woken
    }
}

impl Ring {
    /// Ok(None) when this runtime has no I/O driver to watch the eventfd.
    fn new() -> std::io::Result<Option<Ring>> {
        let ring = IoUring::new(ENTRIES)?;
        // SAFETY: eventfd returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        // AsyncFd panics in a runtime built without its I/O driver.
        let event = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: the OwnedFd stays open and the same while the
            // AsyncFd owns it.
            unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }
        })) {
            Ok(r) => r.map_err(std::io::Error::from)?,
            Err(_) => return Ok(None),
        };
        Ok(Some(Ring {
            inner: Mutex::new(Inner {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
            }),
            event,
            reaper: AtomicBool::new(true),
        }))
    }

    /// Submits one entry (built with the slot's user data), whose
    /// memory and file the caller keeps until the `Op` is done or
    /// dropped. None when the ring cannot take it (full, or the kernel
    /// refused to submit).
    fn submit(self: &Arc<Self>, entry: io_uring::squeue::Entry, file: &Arc<File>) -> Option<Op> {
        let mut inner = self.inner.lock().ok()?;
        let i = match inner.free.pop() {
            Some(i) => i as usize,
            None if inner.slots.len() < (2 * ENTRIES) as usize => {
                inner.slots.push(Slot::Free);
                inner.slots.len() - 1
            }
            None => return None,
        };
        let entry = entry.user_data(i as u64);
        // SAFETY: the entry's memory and file outlive its completion: the
        // Op holds the file, and waits for the completion if dropped.
        let pushed = unsafe { inner.ring.submission().push(&entry) }.is_ok()
            || (inner.ring.submit().is_ok()
                && unsafe { inner.ring.submission().push(&entry) }.is_ok());
        if !pushed {
            inner.free.push(i as u32);
            return None;
        }
        inner.slots[i] = Slot::Waiting(None);
        #[cfg(test)]
        SUBMITTED.fetch_add(1, Ordering::Relaxed);
        // On an error other than EINTR (EAGAIN: the kernel is short of
        // memory) the entry stays queued and goes with the next submit,
        // so the slot stays. The slots never outnumber the completion
        // queue, so EBUSY (completions not reaped) cannot happen.
        while matches!(inner.ring.submit(), Err(e) if e.raw_os_error() == Some(libc::EINTR)) {}
        let woken = inner.drain();
        drop(inner);
        wake(woken);
        Some(Op {
            ring: self.clone(),
            slot: i,
            done: false,
            _file: file.clone(),
        })
    }

    /// Reads or writes `len` bytes at `ptr` at file offset `off` (the
    /// kernel may do less: the result is the byte count).
    ///
    /// # Safety
    /// The memory must stay valid, and not be used otherwise for a read,
    /// until the `Op` has completed or been dropped; the `Op` must not be
    /// leaked (`mem::forget`), since its drop is what waits.
    pub unsafe fn rw(
        self: &Arc<Self>,
        file: &Arc<File>,
        ptr: *mut u8,
        len: usize,
        off: u64,
        write: bool,
        rw_flags: i32,
    ) -> Option<Op> {
        let len = len.min(u32::MAX as usize) as u32;
        let fd = types::Fd(file.as_raw_fd());
        let entry = if write {
            opcode::Write::new(fd, ptr, len)
                .offset(off)
                .rw_flags(rw_flags)
                .build()
        } else {
            opcode::Read::new(fd, ptr, len)
                .offset(off)
                .rw_flags(rw_flags)
                .build()
        };
        self.submit(entry, file)
    }

    /// fdatasync (or fsync).
    pub fn fsync(self: &Arc<Self>, file: &Arc<File>, datasync: bool) -> Option<Op> {
        let mut e = opcode::Fsync::new(types::Fd(file.as_raw_fd()));
        if datasync {
            e = e.flags(types::FsyncFlags::DATASYNC);
        }
        self.submit(e.build(), file)
    }

    pub fn fallocate(
        self: &Arc<Self>,
        file: &Arc<File>,
        mode: i32,
        off: u64,
        len: u64,
    ) -> Option<Op> {
        let e = opcode::Fallocate::new(types::Fd(file.as_raw_fd()), len)
            .offset(off)
            .mode(mode)
            .build();
        self.submit(e, file)
    }
}

/// One submitted request: resolves to the kernel's result (a byte count
/// or a negative errno).
pub struct Op {
    ring: Arc<Ring>,
    slot: usize,
    done: bool,
    /// The kernel uses the file until the completion.
    _file: Arc<File>,
}

impl std::future::Future for Op {
    type Output = i32;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let this = self.get_mut();
        let Ok(mut inner) = this.ring.inner.lock() else {
            return Poll::Pending;
        };
        let i = this.slot;
        let woken = if matches!(inner.slots[i], Slot::Waiting(..)) {
            inner.drain()
        } else {
            Vec::new()
        };
        let r = match &mut inner.slots[i] {
            Slot::Done(res) => {
                let res = *res;
                inner.slots[i] = Slot::Free;
                inner.free.push(i as u32);
                this.done = true;
                Poll::Ready(res)
            }
            Slot::Waiting(w) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Slot::Free => Poll::Pending,
        };
        drop(inner);
        wake(woken);
        r
    }
}

impl Drop for Op {
    /// The kernel may still be using the request's memory: a request
    /// dropped in flight waits here for its completion.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = match self.ring.inner.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        let i = self.slot;
        let mut woken = Vec::new();
        while matches!(inner.slots[i], Slot::Waiting(_)) {
            if let Err(e) = inner.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    // Cannot wait in the kernel: look again shortly.
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            woken.extend(inner.drain());
        }
        inner.slots[i] = Slot::Free;
        inner.free.push(i as u32);
        drop(inner);
        wake(woken);
    }
}
