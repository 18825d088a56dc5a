//! The file driver's thread pool (aio=threads): blocking file calls run
//! on its threads and wake the request's task when done.
//!
//! Made for one syscall per job: an idle worker is handed its job
//! directly and unparked (one futex wake, and none when it has not gone
//! to sleep yet); a busy one takes the next queued job without sleeping.
//! Tokio's blocking pool, used before, makes every job and every
//! finishing worker meet on one mutex and condition variable: ten futex
//! calls per 4 KiB request at queue depth 32, and more CPU per request
//! than QSD (docs/benchmarks.md).
//!
//! A job may work on memory its caller only lends it (guest memory, a
//! caller's buffer; `run_lending`): its `Job`, dropped before the work
//! has ended, waits for it, so the memory outlives the syscall. Other
//! jobs (flush, fallocate) finish on their own.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::thread::Thread;
use std::time::Duration;

/// At most this many workers (QEMU's thread pool has 64 too).
const MAX_WORKERS: usize = 64;
/// A worker idle this long ends.
const IDLE: Duration = Duration::from_secs(10);

type Work = Box<dyn FnOnce() + Send>;

struct Worker {
    thread: Thread,
    /// The job a submitter handed this idle worker.
    handed: Mutex<Option<Work>>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Work>,
    /// Idle workers, the most recently idle last (its cache is warm).
    idle: Vec<Arc<Worker>>,
    workers: usize,
}

struct Pool {
    state: Mutex<State>,
    max_workers: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(MAX_WORKERS))
}

/// A poisoned lock only means a job panicked elsewhere: the data (a
/// queue, a slot) is still whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    fn new(max_workers: usize) -> Pool {
        Pool {
            state: Mutex::new(State::default()),
            max_workers,
        }
    }

    fn submit(&'static self, work: Work) {
        let mut st = lock(&self.state);
        if let Some(w) = st.idle.pop() {
            drop(st);
            *lock(&w.handed) = Some(work);
            w.thread.unpark();
            return;
        }
        if st.workers >= self.max_workers {
            st.queue.push_back(work);
            return;
        }
        // The new worker takes the job from the queue (or an idle
        // worker gets there first).
        st.workers += 1;
        st.queue.push_back(work);
        drop(st);
        let spawned = std::thread::Builder::new()
            .name("rsd-io".into())
            .spawn(move || self.work());
        if let Err(e) = spawned {
            // Out of threads: the job waits for a worker that exists;
            // with none at all it runs here rather than never.
            tracing::warn!(error = %e, "cannot start an I/O thread");
            let mut st = lock(&self.state);
            st.workers -= 1;
            if st.workers == 0 {
                let queued: Vec<Work> = st.queue.drain(..).collect();
                drop(st);
                for w in queued {
                    w();
                }
            }
        }
    }

    /// A worker's life: queued or handed jobs, until it has been idle
    /// for `IDLE`.
    fn work(&'static self) {
        let me = Arc::new(Worker {
            thread: std::thread::current(),
            handed: Mutex::new(None),
        });
        loop {
            let mut st = lock(&self.state);
            let queued = st.queue.pop_front();
            if queued.is_none() {
                st.idle.push(me.clone());
            }
            drop(st);
            let job = match queued {
                Some(j) => j,
                None => match self.wait_for_job(&me) {
                    Some(j) => j,
                    None => return,
                },
            };
            job();
        }
    }

    /// Sleeps until a job is handed over; None when idle too long.
    fn wait_for_job(&'static self, me: &Arc<Worker>) -> Option<Work> {
        loop {
            if let Some(j) = lock(&me.handed).take() {
                return Some(j);
            }
            let t = std::time::Instant::now();
            std::thread::park_timeout(IDLE);
            if t.elapsed() < IDLE {
                continue;
            }
            let mut st = lock(&self.state);
            if let Some(i) = st.idle.iter().position(|w| Arc::ptr_eq(w, me)) {
                st.idle.remove(i);
                st.workers -= 1;
                return None;
            }
            // A submitter took this worker off the idle list: its job
            // is on the way.
        }
    }
}

/// Where a job is, shared by the job and its `Job` handle.
struct Slot<R> {
    /// Err when the job panicked.
    result: Option<std::io::Result<R>>,
    waker: Option<Waker>,
    started: bool,
    finished: bool,
    /// The handle was dropped before the job started: skip it.
    cancelled: bool,
    /// A dropped handle waiting for the job to finish.
    waiter: Option<Thread>,
}

/// A job on the pool: resolves to what it returned (an error if it
/// panicked).
pub struct Job<R> {
    slot: Arc<Mutex<Slot<R>>>,
    /// Dropped while the job runs: wait for it (it uses lent memory).
    wait_on_drop: bool,
}

/// Runs `f` on a pool thread. Dropping the `Job` leaves a job that
/// has started to finish on its own.
pub fn run<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Job<R> {
    #[cfg(test)]
    SUBMITTED.with(|c| c.set(c.get() + 1));
    pool().run(f)
}

/// Runs `f`, which uses memory its caller lends it (through `SendPtr`),
/// on a pool thread. Dropping the `Job` while `f` runs waits for it.
///
/// # Safety
/// The lent memory must stay valid (and, where `f` writes it, unused
/// otherwise) while the `Job` lives, and the `Job` must not be leaked
/// (`mem::forget`): its drop is what waits.
pub unsafe fn run_lending<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Job<R> {
    let mut job = run(f);
    job.wait_on_drop = true;
    job
}

#[cfg(test)]
thread_local! {
    /// Jobs this thread gave the pool (tests check which path ran).
    pub static SUBMITTED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl Pool {
    fn run<R: Send + 'static>(&'static self, f: impl FnOnce() -> R + Send + 'static) -> Job<R> {
        let slot = Arc::new(Mutex::new(Slot {
            result: None,
            waker: None,
            started: false,
            finished: false,
            cancelled: false,
            waiter: None,
        }));
        let s = slot.clone();
        self.submit(Box::new(move || {
            {
                let mut g = lock(&s);
                if g.cancelled {
                    return;
                }
                g.started = true;
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .map_err(|_| std::io::Error::other("an I/O thread's job panicked"));
            let (waker, waiter) = {
                let mut g = lock(&s);
                g.result = Some(r);
                g.finished = true;
                (g.waker.take(), g.waiter.take())
            };
            if let Some(w) = waker {
                w.wake();
            }
            if let Some(t) = waiter {
                t.unpark();
            }
        }));
        Job {
            slot,
            wait_on_drop: false,
        }
    }
}

impl<R> std::future::Future for Job<R> {
    type Output = std::io::Result<R>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut g = lock(&self.slot);
        if let Some(r) = g.result.take() {
            return Poll::Ready(r);
        }
        match &g.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => g.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<R> Drop for Job<R> {
    /// A job that has not started never will. One that has started and
    /// uses memory its caller lent it is waited for.
    fn drop(&mut self) {
        let mut g = lock(&self.slot);
        if g.finished {
            return;
        }
        if !g.started {
            g.cancelled = true;
            return;
        }
        if !self.wait_on_drop {
            return;
        }
        g.waiter = Some(std::thread::current());
        while !g.finished {
            drop(g);
            std::thread::park();
            g = lock(&self.slot);
        }
    }
}

/// A pointer a job may carry to another thread: the job's caller keeps
/// the memory alive and untouched until the job has finished.
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut u8);

impl SendPtr {
    /// The pointer (a method, so a closure captures the whole `SendPtr`).
    pub fn get(self) -> *mut u8 {
        self.0
    }
}

// SAFETY: see the type's contract; the pointer is only used by the one
// job it was made for, while its `Job` handle lives.
unsafe impl Send for SendPtr {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Condvar;

    /// A pool of its own, so tests that fill one do not slow others.
    fn own_pool(max: usize) -> &'static Pool {
        Box::leak(Box::new(Pool::new(max)))
    }

    /// Waits until `n` callers are in, for at most 10 s; false on time out.
    struct Meet(Mutex<usize>, Condvar, usize);
    impl Meet {
        fn wait(&self) -> bool {
            let mut g = lock(&self.0);
            *g += 1;
            self.1.notify_all();
            let (g, t) = self
                .1
                .wait_timeout_while(g, Duration::from_secs(10), |c| *c < self.2)
                .unwrap_or_else(|e| e.into_inner());
            drop(g);
            !t.timed_out()
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn jobs_run_and_return_their_results() {
        let jobs: Vec<_> = (0..200u64).map(|i| run(move || i * 2)).collect();
        let mut sum = 0;
        for j in jobs {
            sum += j.await.expect("job");
        }
        assert_eq!(sum, (0..200u64).map(|i| i * 2).sum::<u64>());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_job_is_an_error_and_its_worker_lives_on() {
        let p = own_pool(1);
        assert!(p.run(|| panic!("boom")).await.is_err());
        assert_eq!(p.run(|| 7).await.expect("job"), 7);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn up_to_the_limit_of_jobs_run_at_once_and_the_rest_queue() {
        let p = own_pool(8);
        // 8 jobs that each wait for all 8: only a pool that runs them
        // concurrently gets them all in.
        let meet = Arc::new(Meet(Mutex::new(0), Condvar::new(), 8));
        let jobs: Vec<_> = (0..8)
            .map(|_| {
                let m = meet.clone();
                p.run(move || m.wait())
            })
            .collect();
        // Queued behind them, and run once they are done.
        let later: Vec<_> = (0..20).map(|i| p.run(move || i)).collect();
        for j in jobs {
            assert!(j.await.expect("job"), "the jobs did not run at once");
        }
        let mut sum = 0;
        for j in later {
            sum += j.await.expect("job");
        }
        assert_eq!(sum, (0..20).sum::<i32>());
        assert!(lock(&p.state).workers <= 8);
    }

    #[test]
    fn a_dropped_job_that_started_is_waited_for() {
        let p = own_pool(2);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let done = Arc::new(AtomicUsize::new(0));
        let d2 = done.clone();
        let mut job = p.run(move || {
            let _ = started_tx.send(());
            std::thread::sleep(Duration::from_millis(100));
            d2.store(1, Ordering::SeqCst);
        });
        job.wait_on_drop = true;
        started_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("job started");
        drop(job);
        assert_eq!(done.load(Ordering::SeqCst), 1, "drop returned early");
    }

    #[test]
    fn a_dropped_job_that_lends_nothing_is_not_waited_for() {
        let p = own_pool(2);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let job = p.run(move || {
            let _ = started_tx.send(());
            let _ = go_rx.recv_timeout(Duration::from_secs(10));
        });
        started_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("job started");
        let t0 = std::time::Instant::now();
        drop(job);
        assert!(t0.elapsed() < Duration::from_secs(5), "drop waited");
        let _ = go_tx.send(());
    }

    #[test]
    fn a_dropped_job_that_has_not_started_never_runs() {
        let p = own_pool(1);
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let busy = p.run(move || {
            let _ = go_rx.recv_timeout(Duration::from_secs(10));
        });
        let ran = Arc::new(AtomicUsize::new(0));
        let r2 = ran.clone();
        let queued = p.run(move || {
            r2.store(1, Ordering::SeqCst);
        });
        assert!(!lock(&queued.slot).started);
        drop(queued);
        let _ = go_tx.send(());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(busy).expect("job");
        // The one worker reaches the cancelled job before this one.
        rt.block_on(p.run(|| ())).expect("job");
        assert_eq!(ran.load(Ordering::SeqCst), 0, "a cancelled job ran");
    }
}
