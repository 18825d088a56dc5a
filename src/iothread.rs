//! An IOThread: one OS thread (named `iothread/ID`) running a
//! single-threaded tokio runtime, to which exports bound to the iothread
//! hand their work (an NBD client's transmission, a vhost-user-blk
//! queue, a FUSE session). Work arrives as a closure run on the thread,
//! which may spawn futures that are not `Send`; everything it spawns is
//! polled on that one thread. docs/iothreads.md says what runs where.
//!
//! `Placement` is where an export serves: an iothread, or (None) the
//! default, where each client or queue gets a thread of its own.
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// QEMU's adaptive polling parameters, which the NBD connections served
/// on the iothread read before each wait (qom-set takes effect at once).
#[derive(Debug)]
pub struct PollParams {
    max_ns: AtomicU64,
    /// Growth factor of the window (0: QEMU's default, 2).
    grow: AtomicU64,
    /// Divisor shrinking the window (0: QEMU's default, which closes
    /// the window at once).
    shrink: AtomicU64,
    /// Connections served on the thread now: polling one connection's
    /// socket holds the others up, so it polls only while it is alone.
    serving: AtomicUsize,
}

impl PollParams {
    pub fn new(max_ns: u64, grow: u64, shrink: u64) -> PollParams {
        PollParams {
            max_ns: AtomicU64::new(max_ns),
            grow: AtomicU64::new(grow),
            shrink: AtomicU64::new(shrink),
            serving: AtomicUsize::new(0),
        }
    }

    pub fn set(&self, name: &str, value: u64) {
        let slot = match name {
            "poll-max-ns" => &self.max_ns,
            "poll-grow" => &self.grow,
            "poll-shrink" => &self.shrink,
            _ => return,
        };
        slot.store(value, Ordering::Relaxed);
    }

    /// The longest poll allowed now: poll-max-ns, or nothing while the
    /// thread serves more than one connection.
    pub fn max_window(&self) -> Duration {
        if self.serving.load(Ordering::Relaxed) > 1 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.max_ns.load(Ordering::Relaxed))
    }

    pub fn grow_factor(&self) -> u32 {
        factor(self.grow.load(Ordering::Relaxed))
    }

    /// 0: the window closes at once.
    pub fn shrink_factor(&self) -> u32 {
        u32::try_from(self.shrink.load(Ordering::Relaxed)).unwrap_or(u32::MAX)
    }

    /// Counts a connection served on the thread while the guard lives.
    pub fn serving(self: &Arc<Self>) -> ServingGuard {
        self.serving.fetch_add(1, Ordering::Relaxed);
        ServingGuard(self.clone())
    }
}

/// poll-grow: 0 means QEMU's default, 2.
fn factor(v: u64) -> u32 {
    match v {
        0 => 2,
        n => u32::try_from(n).unwrap_or(u32::MAX),
    }
}

pub struct ServingGuard(Arc<PollParams>);

impl Drop for ServingGuard {
    fn drop(&mut self) {
        self.0.serving.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct IoThread {
    pub id: String,
    /// The thread's kernel id (what /proc/PID/task lists), for
    /// __org.rsd_query-iothreads and CPU pinning.
    pub thread_id: i32,
    pub poll: Arc<PollParams>,
    jobs: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The thread name the kernel shows (`comm` keeps 15 bytes of it).
pub fn thread_name(id: &str) -> String {
    format!("iothread/{id}")
}

impl IoThread {
    /// Starts the thread and its runtime.
    pub fn start(id: &str, poll: PollParams) -> Result<Arc<IoThread>, String> {
        let (jobs_tx, mut jobs_rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(thread_name(id))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(nix::unistd::gettid().as_raw()));
                let local = tokio::task::LocalSet::new();
                // Runs until the object goes (its sender is dropped);
                // the tasks still on the thread then end with it.
                local.block_on(&rt, async move {
                    while let Some(job) = jobs_rx.recv().await {
                        job();
                    }
                });
            })
            .map_err(|e| format!("Failed to create iothread: {e}"))?;
        let thread_id = match ready_rx.recv() {
            Ok(Ok(tid)) => tid,
            Ok(Err(e)) => return Err(format!("Failed to create iothread: {e}")),
            Err(_) => return Err("Failed to create iothread".into()),
        };
        Ok(Arc::new(IoThread {
            id: id.to_string(),
            thread_id,
            poll: Arc::new(poll),
            jobs: Mutex::new(Some(jobs_tx)),
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Runs `make` on the thread and spawns the future it returns there
    /// (the future need not be `Send`). False if the thread has stopped.
    pub fn spawn_with<F, Fut>(&self, make: F) -> bool
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let job: Job = Box::new(move || {
            tokio::task::spawn_local(make());
        });
        match self.jobs.lock() {
            Ok(g) => g.as_ref().is_some_and(|tx| tx.send(job).is_ok()),
            Err(_) => false,
        }
    }

    /// Stops the thread once its queued work is taken; tasks still
    /// running on it are dropped. Waits for it unless called from it.
    pub fn stop(&self) {
        if let Ok(mut g) = self.jobs.lock() {
            g.take();
        }
        let handle = self.thread.lock().ok().and_then(|mut g| g.take());
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where an export serves, changed when its node moves to another
/// iothread (x-blockdev-set-iothread, another export's `iothread`)
/// unless the export was added with `fixed-iothread`.
#[derive(Default)]
pub struct Placement {
    pub fixed: bool,
    current: RwLock<Option<Arc<IoThread>>>,
}

impl Placement {
    pub fn new(fixed: bool, at: Option<Arc<IoThread>>) -> Arc<Placement> {
        Arc::new(Placement {
            fixed,
            current: RwLock::new(at),
        })
    }

    /// The iothread serving now (None: a thread per client or queue).
    pub fn current(&self) -> Option<Arc<IoThread>> {
        self.current.read().ok().and_then(|g| g.clone())
    }

    pub fn iothread_id(&self) -> Option<String> {
        self.current().map(|t| t.id.clone())
    }

    pub fn set(&self, at: Option<Arc<IoThread>>) {
        if let Ok(mut g) = self.current.write() {
            *g = at;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_the_named_thread() {
        let t = IoThread::start("t0", PollParams::new(32768, 0, 0)).expect("start");
        let (tx, rx) = std::sync::mpsc::channel();
        assert!(t.spawn_with(move || async move {
            // A !Send value held across an await is fine on the thread.
            let local = std::rc::Rc::new(nix::unistd::gettid().as_raw());
            tokio::task::yield_now().await;
            let name = std::thread::current().name().map(str::to_string);
            let _ = tx.send((*local, name));
        }));
        let (tid, name) = rx.recv_timeout(Duration::from_secs(10)).expect("ran");
        assert_eq!(tid, t.thread_id);
        assert_eq!(name.as_deref(), Some("iothread/t0"));
        t.stop();
        assert!(!t.spawn_with(|| async {}), "a stopped thread takes no work");
    }

    #[test]
    fn polling_stops_while_connections_share_the_thread() {
        let p = Arc::new(PollParams::new(20_000, 0, 4));
        assert_eq!(p.max_window(), Duration::from_micros(20));
        let a = p.serving();
        assert_eq!(p.max_window(), Duration::from_micros(20));
        let b = p.serving();
        assert_eq!(p.max_window(), Duration::ZERO);
        drop(b);
        drop(a);
        p.set("poll-max-ns", 0);
        assert_eq!(p.max_window(), Duration::ZERO);
        assert_eq!((p.grow_factor(), p.shrink_factor()), (2, 4));
    }
}
