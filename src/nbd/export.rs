//! An NBD export: a node served under a name, and the live state its
//! connections share (client count, the hard-delete signal).
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::block::child::Child;
use crate::block::dirty::NamedBitmap;
use crate::exports::stats::{Connection, ExportStats};
use crate::exports::{BlockExport, BoxFuture, Registry};
use crate::iothread::Placement;

pub struct Export {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    /// The exported node's edge (re-pointed by a snapshot).
    pub node: Arc<Child>,
    pub writable: bool,
    /// writethrough=on: every write is made stable before it completes.
    pub writethrough: bool,
    pub allocation_depth: bool,
    /// The dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts,
    /// busy while the export exists.
    pub bitmaps: Vec<Arc<NamedBitmap>>,
    /// Clients may open several connections (not when the server takes
    /// only one, as QEMU decides).
    pub multi_conn: bool,
    /// The graph user holding this export's permissions.
    pub user: u64,
    /// Where new clients are served (an iothread, or a thread each).
    pub placement: Arc<Placement>,
    clients: AtomicUsize,
    /// A duplicate of each attached client's socket, to see whether its
    /// peer has hung up (a client leaving, not yet torn down).
    peers: Mutex<Vec<(u64, OwnedFd)>>,
    next_peer: AtomicU64,
    pub stats: Arc<ExportStats>,
    /// Woken when the last client leaves.
    idle: tokio::sync::Notify,
    /// Set to true to drop every connection (block-export-del mode=hard).
    closing: watch::Sender<bool>,
}

/// What block-export-add asked for.
pub struct ExportConfig {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub node: Arc<Child>,
    pub writable: bool,
    pub writethrough: bool,
    pub allocation_depth: bool,
    pub bitmaps: Vec<Arc<NamedBitmap>>,
    pub multi_conn: bool,
    /// The graph user holding the export's permissions.
    pub user: u64,
    pub placement: Arc<Placement>,
}

impl Export {
    pub fn new(c: ExportConfig) -> Arc<Export> {
        for b in &c.bitmaps {
            b.set_busy(true);
        }
        Arc::new(Export {
            id: c.id,
            name: c.name,
            description: c.description,
            node: c.node,
            writable: c.writable,
            writethrough: c.writethrough,
            allocation_depth: c.allocation_depth,
            bitmaps: c.bitmaps,
            multi_conn: c.multi_conn,
            user: c.user,
            placement: c.placement,
            clients: AtomicUsize::new(0),
            peers: Mutex::new(Vec::new()),
            next_peer: AtomicU64::new(0),
            stats: Default::default(),
            idle: tokio::sync::Notify::new(),
            closing: watch::channel(false).0,
        })
    }

    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::SeqCst)
    }

    /// Waits (at most `limit`) until no client is connected.
    pub async fn no_clients(&self, limit: std::time::Duration) {
        let wait = async {
            loop {
                let idle = self.idle.notified();
                if self.clients() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }

    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }

    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Counts a connection for as long as the guard lives.
    pub fn attach(self: &Arc<Self>, socket: Option<RawFd>) -> ClientGuard {
        self.clients.fetch_add(1, Ordering::SeqCst);
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's socket is open for this call.
        let dup = socket.and_then(|fd| {
            unsafe { BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .ok()
        });
        if let Some(fd) = dup {
            if let Ok(mut p) = self.peers.lock() {
                p.push((id, fd));
            }
        }
        ClientGuard(self.clone(), self.stats.connect(), id)
    }

    /// Clients that are not leaving: those whose peer has not hung up.
    /// A client that closed its socket (qemu-img that has just exited)
    /// still counts in `clients` until its connection has been torn
    /// down, which block-export-del waits for rather than refusing.
    pub fn clients_staying(&self) -> usize {
        let Ok(peers) = self.peers.lock() else {
            return self.clients();
        };
        let leaving = peers.iter().filter(|(_, fd)| hung_up(fd.as_fd())).count();
        self.clients().saturating_sub(leaving)
    }
}

/// The export's bitmaps are free again once nothing holds it (QEMU
/// releases them when its last reference goes).
impl Drop for Export {
    fn drop(&mut self) {
        for b in &self.bitmaps {
            b.set_busy(false);
        }
    }
}

pub struct ClientGuard(Arc<Export>, #[allow(dead_code)] Connection, u64);

/// The socket's peer has closed it (or shut down its writing side).
fn hung_up(fd: BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = nix::libc::pollfd {
        fd: fd.as_raw_fd(),
        events: nix::libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { nix::libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (nix::libc::POLLRDHUP | nix::libc::POLLHUP | nix::libc::POLLERR) != 0
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if let Ok(mut p) = self.0.peers.lock() {
            p.retain(|(id, _)| *id != self.2);
        }
        if self.0.clients.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl BlockExport for Export {
    fn id(&self) -> &str {
        &self.id
    }
    fn kind(&self) -> &'static str {
        "nbd"
    }
    fn node(&self) -> &Arc<Child> {
        &self.node
    }
    fn user(&self) -> u64 {
        self.user
    }
    fn placement(&self) -> &Arc<Placement> {
        &self.placement
    }
    fn clients(&self) -> usize {
        Export::clients(self)
    }
    fn clients_staying(&self) -> usize {
        Export::clients_staying(self)
    }
    fn close(&self) {
        self.close_all();
    }
    fn no_clients(&self, limit: std::time::Duration) -> BoxFuture<'_, ()> {
        Box::pin(Export::no_clients(self, limit))
    }
    /// The NBD server serves the clients; the export waits for its close.
    fn serve(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut closing = self.closing();
            let _ = closing.wait_for(|c| *c).await;
        })
    }
    fn stats(&self) -> &Arc<ExportStats> {
        &self.stats
    }
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

/// The NBD exports as the server sees them: the export registry's NBD
/// exports, found by their NBD name.
#[derive(Clone, Default)]
pub struct Exports(pub Registry);

impl Exports {
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.list().into_iter().find(|e| e.name == name)
    }
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.0.of_type::<Export>()
    }
}
