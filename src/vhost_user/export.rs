//! A vhost-user-blk export: its listening socket and the loop that
//! serves one frontend at a time on it. Each connection gets a fresh
//! device, so the next frontend starts from a clean one; its messages
//! are handled on the accept loop's thread (the `vhost` crate's
//! `BackendReqHandler` reads them and calls the device). When the
//! connection ends, its rings stop, each after finishing the requests it
//! holds: that is the drain block-export-del and quit wait for.
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::{BackendReqHandler, Listener};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::channel;
use super::device::Device;
use super::Shared;
use crate::block::child::Child;
use crate::exports::{BlockExport, BoxFuture};

pub struct VhostUserBlkExport {
    id: String,
    user: u64,
    shared: Arc<Shared>,
    /// The listening socket; the accept loop holds it while it runs.
    listener: Mutex<Option<Listener>>,
    /// The socket's path, unlinked when the export closes (not when the
    /// last reference goes: a new export may have bound it by then).
    path: Option<PathBuf>,
    /// Wakes the accept loop when the export closes.
    stop: EventFd,
    closing: AtomicBool,
    /// The connected frontend's connection, to cut it on close.
    conn: Mutex<Option<UnixStream>>,
    /// The device of the connected frontend (for config changes).
    device: Mutex<Option<Arc<Device>>>,
    clients: AtomicUsize,
    idle: tokio::sync::Notify,
    /// The accept loop's thread: its end, once it has ended.
    worker: Mutex<Option<tokio::sync::watch::Receiver<Option<String>>>>,
}

/// What block-export-add decided.
pub struct VhostUserBlkConfig {
    pub id: String,
    pub user: u64,
    pub node: Arc<Child>,
    pub writable: bool,
    pub writethrough: bool,
    pub logical_block_size: u32,
    pub num_queues: u16,
    pub listener: std::os::unix::net::UnixListener,
    pub path: Option<PathBuf>,
    pub placement: Arc<crate::iothread::Placement>,
}

impl VhostUserBlkExport {
    pub fn new(c: VhostUserBlkConfig) -> Result<Arc<Self>, String> {
        c.listener
            .set_nonblocking(false)
            .map_err(|e| crate::util::os_msg(&e))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| crate::util::os_msg(&e))?;
        Ok(Arc::new(VhostUserBlkExport {
            id: c.id,
            user: c.user,
            shared: Arc::new(Shared {
                node: c.node,
                writable: c.writable,
                logical_block_size: c.logical_block_size,
                num_queues: c.num_queues,
                write_cache: AtomicBool::new(!c.writethrough),
                wce: 0.into(),
                stats: Default::default(),
                placement: c.placement,
            }),
            listener: Mutex::new(Some(Listener::from(c.listener))),
            path: c.path,
            stop,
            closing: AtomicBool::new(false),
            conn: Mutex::new(None),
            device: Mutex::new(None),
            clients: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            worker: Mutex::new(None),
        }))
    }

    /// Tells the connected frontend, if any, that the config space
    /// changed. On a thread of its own: a frontend slow to read its
    /// backend channel must not hold the caller (the control actor).
    pub fn config_changed(&self) {
        let device = self.device.lock().ok().and_then(|d| d.clone());
        if let Some(d) = device {
            let _ = std::thread::Builder::new()
                .name(format!("vhost-user/{}/config", self.id))
                .spawn(move || d.config_changed());
        }
    }

    /// The accept loop's end (None while it runs), starting it if need be.
    fn worker(self: &Arc<Self>) -> Result<tokio::sync::watch::Receiver<Option<String>>, String> {
        let mut slot = self.worker.lock().map_err(|e| e.to_string())?;
        if let Some(rx) = slot.as_ref() {
            if rx.borrow().is_none() {
                return Ok(rx.clone());
            }
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("vhost-user/{}", self.id))
            .spawn(move || {
                let why = me.accept_loop();
                tx.send_replace(Some(why));
            })
            .map_err(|e| e.to_string())?;
        *slot = Some(rx.clone());
        Ok(rx)
    }

    /// The accept loop, on a thread of its own: the crate's daemon is
    /// blocking code.
    fn accept_loop(self: &Arc<Self>) -> String {
        let Some(mut listener) = self.listener.lock().ok().and_then(|mut l| l.take()) else {
            return "the listening socket is gone".into();
        };
        let why = loop {
            if self.closing.load(Ordering::SeqCst) {
                break String::new();
            }
            match self.wait_for_client(&listener) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => break e,
            }
            if let Err(e) = self.serve_one(&mut listener) {
                break e;
            }
        };
        if let Ok(mut l) = self.listener.lock() {
            *l = Some(listener);
        }
        why
    }

    /// Waits until a frontend connects (true) or the export closes.
    fn wait_for_client(&self, listener: &Listener) -> Result<bool, String> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: both descriptors are owned by `self`/`listener`, which
        // outlive this call.
        let (lfd, sfd) = unsafe {
            (
                BorrowedFd::borrow_raw(listener.as_raw_fd()),
                BorrowedFd::borrow_raw(self.stop.as_raw_fd()),
            )
        };
        let mut fds = [
            PollFd::new(lfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(false),
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        Ok(ready(&fds[0]) && !self.closing.load(Ordering::SeqCst))
    }

    /// Serves one frontend until it goes (or the export closes).
    fn serve_one(self: &Arc<Self>, listener: &mut Listener) -> Result<(), String> {
        // A frontend that vanished between poll and accept: next one.
        // Pausing, so a failing accept (out of descriptors) cannot spin.
        let stream = match listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::debug!("vhost-user-blk export '{}': accept: {e}", self.id);
                std::thread::sleep(Duration::from_millis(20));
                return Ok(());
            }
        };
        let (Ok(cut), Ok(peek)) = (stream.try_clone(), stream.try_clone()) else {
            return Ok(());
        };
        let device = Device::new(self.shared.clone());
        let mut handler = BackendReqHandler::from_stream(stream, device.clone());
        self.clients.fetch_add(1, Ordering::SeqCst);
        let counted = self.shared.stats.connect();
        tracing::info!(target: "vhost_user_connect", export = %self.id, "vhost-user-blk frontend connected");
        if let Ok(mut c) = self.conn.lock() {
            *c = Some(cut);
        }
        if let Ok(mut d) = self.device.lock() {
            *d = Some(device.clone());
        }
        if self.closing.load(Ordering::SeqCst) {
            let _ = peek.shutdown(std::net::Shutdown::Both);
        }
        loop {
            if let Some(fd) = channel::peek_backend_fd(&peek) {
                device.stash_backend_fd(fd);
            }
            if let Err(e) = handler.handle_request() {
                tracing::info!(
                    target: "vhost_user_disconnect",
                    export = %self.id,
                    reason = %e,
                    "vhost-user-blk frontend gone"
                );
                break;
            }
        }
        let _ = peek.shutdown(std::net::Shutdown::Both);
        if let Ok(mut c) = self.conn.lock() {
            *c = None;
        }
        if let Ok(mut d) = self.device.lock() {
            *d = None;
        }
        // Stops the rings: their requests are done after this.
        device.shutdown();
        drop(handler);
        drop(counted);
        if self.clients.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
        Ok(())
    }
}

impl BlockExport for VhostUserBlkExport {
    fn id(&self) -> &str {
        &self.id
    }
    fn kind(&self) -> &'static str {
        "vhost-user-blk"
    }
    fn node(&self) -> &Arc<Child> {
        &self.shared.node
    }
    fn user(&self) -> u64 {
        self.user
    }
    fn placement(&self) -> &Arc<crate::iothread::Placement> {
        &self.shared.placement
    }
    /// QSD counts a vhost-user-blk export in use only while requests
    /// are in flight, not for a connected frontend: a safe delete drops
    /// an idle frontend.
    fn clients(&self) -> usize {
        self.shared.node.inflight()
    }
    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = self.stop.write(1);
        if let Ok(c) = self.conn.lock() {
            if let Some(conn) = c.as_ref() {
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        }
        // The socket goes with the export, as QSD removes it.
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
    fn no_clients(&self, limit: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let wait = async {
                loop {
                    let idle = self.idle.notified();
                    if self.clients.load(Ordering::SeqCst) == 0 {
                        return;
                    }
                    idle.await;
                }
            };
            let _ = tokio::time::timeout(limit, wait).await;
        })
    }
    /// Waits for the accept loop (on a thread of its own, started here
    /// unless it runs already: a restarted actor finds it still serving).
    fn serve(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut done = match self.worker() {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::warn!("vhost-user-blk export '{}': {e}", self.id);
                    return;
                }
            };
            let _ = done.wait_for(|d| d.is_some()).await;
            let why = done.borrow().clone().unwrap_or_default();
            if !why.is_empty() {
                tracing::warn!("vhost-user-blk export '{}': {why}", self.id);
            }
        })
    }
    fn stats(&self) -> &Arc<crate::exports::stats::ExportStats> {
        &self.shared.stats
    }
    /// Serving while the accept loop runs.
    fn serving(&self) -> bool {
        !self.closing.load(Ordering::SeqCst)
            && self
                .worker
                .lock()
                .ok()
                .and_then(|w| w.as_ref().map(|rx| rx.borrow().is_none()))
                .unwrap_or(false)
    }
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}
