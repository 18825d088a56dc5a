//! The vhost-user-blk device one frontend connection talks to: the
//! vhost-user-backend crate's backend trait, answered with QSD's
//! features and config, and the queues' work. Each queue has a worker
//! thread of its own (the crate's epoll loop); the requests a kick
//! finds run together on that thread's own tokio runtime, and each one
//! is completed in the used ring as soon as it is done, with no hand-off
//! to another thread.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::{self, CONFIG_WCE_OFFSET};
use super::request::{self, Desc};
use super::Shared;

pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;
pub type Vring = VringRwLock<Memory>;

/// A queue holds at most this many descriptors (libvhost-user's limit).
const MAX_QUEUE_SIZE: usize = 1024;
/// The most queues an export serves: the crate maps queues to worker
/// threads with a 64-bit mask.
pub const MAX_QUEUES: u16 = 64;

pub struct Device {
    shared: Arc<Shared>,
    mem: Mutex<Option<Memory>>,
    event_idx: AtomicBool,
    /// The channel for the backend's own messages (config change).
    backend_req: Mutex<Option<Backend>>,
}

impl Device {
    pub fn new(shared: Arc<Shared>) -> Arc<Device> {
        Arc::new(Device {
            shared,
            mem: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            backend_req: Mutex::new(None),
        })
    }

    /// Tells the frontend that the config space changed (a resize).
    /// The vhost crate's `Backend` (0.18) does not implement this message
    /// (it answers ENOSYS) and gives no access to its socket, so today
    /// nothing reaches the frontend; a frontend re-reading the config
    /// sees the new capacity. Sending it needs a request handler on the
    /// lower `vhost` crate (which in-flight tracking needs as well).
    pub fn config_changed(&self) {
        if let Ok(guard) = self.backend_req.lock() {
            if let Some(b) = guard.as_ref() {
                use vhost::vhost_user::VhostUserFrontendReqHandler;
                let _ = b.handle_config_change();
            }
        }
    }

    fn memory(&self) -> Option<Arc<GuestMemoryMmap>> {
        let guard = self.mem.lock().ok()?;
        Some(guard.as_ref()?.memory().into_inner())
    }

    /// Serves the queue until it is empty and no request is in flight.
    /// While requests are in flight the thread stays here and also takes
    /// the requests that new kicks bring (each write to the eventfd wakes
    /// its edge-triggered watch), so a slow request never holds back the
    /// ones behind it.
    fn drain_queue(&self, vring: &Vring) -> io::Result<()> {
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        // Our own handle on the kick eventfd, watched while requests run.
        let kick = vring.get_ref().get_kick().as_ref().and_then(|k| {
            // SAFETY: the vring's lock is held, so its eventfd stays open
            // while it is duplicated.
            let fd = unsafe { BorrowedFd::borrow_raw(k.as_raw_fd()) };
            fd.try_clone_to_owned().ok()
        });
        with_runtime(|rt| {
            rt.block_on(async {
                let kick = kick.and_then(|fd| {
                    // SAFETY: the OwnedFd stays open and the same while
                    // the AsyncFd owns it.
                    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok()
                });
                let mut running = tokio::task::JoinSet::new();
                loop {
                    self.take_available(vring, &mem, &mut running);
                    if running.is_empty() {
                        return;
                    }
                    match &kick {
                        Some(kick) => {
                            tokio::select! {
                                _ = running.join_next() => {}
                                ready = kick.readable() => {
                                    // The counter is left for the crate's
                                    // loop, which reads it (blocking) when
                                    // its epoll reports it: reading it
                                    // here could leave that read waiting.
                                    if let Ok(mut guard) = ready {
                                        guard.clear_ready();
                                    }
                                }
                            }
                        }
                        None => {
                            running.join_next().await;
                        }
                    }
                }
            })
        })
    }

    /// Starts every request the ring holds (with event-idx: until no
    /// request came while notifications were off).
    fn take_available(
        &self,
        vring: &Vring,
        mem: &Arc<GuestMemoryMmap>,
        running: &mut tokio::task::JoinSet<()>,
    ) {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            for (head, descs) in pop_chains(vring, mem) {
                let (shared, mem, vring) = (self.shared.clone(), mem.clone(), vring.clone());
                running.spawn(async move {
                    let used = request::run(&shared, &mem, &descs).await;
                    complete(&vring, head, used);
                });
            }
            if !event_idx {
                return;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                _ => return,
            }
        }
    }
}

/// The chains the ring holds now, as descriptor lists.
fn pop_chains(vring: &Vring, mem: &Arc<GuestMemoryMmap>) -> Vec<(u16, Vec<Desc>)> {
    let mut state = vring.get_mut();
    let Ok(iter) = state.get_queue_mut().iter(mem.clone()) else {
        // A ring index the frontend made up: nothing to serve.
        return Vec::new();
    };
    iter.map(|chain| {
        let head = chain.head_index();
        let descs = chain
            .map(|d| Desc {
                addr: d.addr().0,
                len: d.len(),
                writable: d.is_write_only(),
            })
            .collect();
        (head, descs)
    })
    .collect()
}

/// Puts a request in the used ring and signals the frontend if it
/// wants to hear about it.
fn complete(vring: &Vring, head: u16, used: u32) {
    if vring.add_used(head, used).is_err() {
        return;
    }
    if vring.needs_notification().unwrap_or(true) {
        let _ = vring.signal_used_queue();
    }
}

thread_local! {
    /// The worker thread's runtime, made on its first request.
    static RUNTIME: std::cell::OnceCell<Option<tokio::runtime::Runtime>> =
        const { std::cell::OnceCell::new() };
}

fn with_runtime<T>(f: impl FnOnce(&tokio::runtime::Runtime) -> T) -> io::Result<T> {
    RUNTIME.with(|cell| {
        let rt = cell.get_or_init(|| {
            // Reads land in guest memory: a large one may copy elsewhere.
            crate::block::file::copy_large_reads_elsewhere();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()
        });
        match rt {
            Some(rt) => Ok(f(rt)),
            None => Err(io::Error::other("cannot start a runtime")),
        }
    })
}

impl VhostUserBackend for Device {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        config::features(self.shared.writable)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        config::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.shared.config().read(offset, size)
    }

    /// Only wce may be written, as in QSD: it turns the write cache on
    /// or off (off: every write is made stable before it completes).
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match buf {
            [wce] if offset as usize == CONFIG_WCE_OFFSET => {
                self.shared.wce.store(*wce, Ordering::Relaxed);
                self.shared.write_cache.store(*wce != 0, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(nix::libc::EINVAL)),
        }
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        if let Ok(mut guard) = self.mem.lock() {
            *guard = Some(mem);
        }
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        if let Ok(mut guard) = self.backend_req.lock() {
            *guard = Some(backend);
        }
    }

    /// One worker thread per queue.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.drain_queue(vring),
            None => Ok(()),
        }
    }
}
