//! An NBD export: a node served under a name, and the live state its
//! connections share (client count, the hard-delete signal).
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::block::child::Child;

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
    /// Clients may open several connections (not when the server takes
    /// only one, as QEMU decides).
    pub multi_conn: bool,
    /// The graph user holding this export's permissions.
    pub user: u64,
    clients: AtomicUsize,
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
    pub multi_conn: bool,
    /// The graph user holding the export's permissions.
    pub user: u64,
}

impl Export {
    pub fn new(c: ExportConfig) -> Arc<Export> {
        Arc::new(Export {
            id: c.id,
            name: c.name,
            description: c.description,
            node: c.node,
            writable: c.writable,
            writethrough: c.writethrough,
            allocation_depth: c.allocation_depth,
            multi_conn: c.multi_conn,
            user: c.user,
            clients: AtomicUsize::new(0),
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
    pub fn attach(self: &Arc<Self>) -> ClientGuard {
        self.clients.fetch_add(1, Ordering::SeqCst);
        ClientGuard(self.clone())
    }
}

pub struct ClientGuard(Arc<Export>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if self.0.clients.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The exports the NBD server serves, by name, in creation order.
#[derive(Clone, Default)]
pub struct Exports(Arc<RwLock<Vec<Arc<Export>>>>);

impl Exports {
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.0
            .read()
            .ok()
            .and_then(|l| l.iter().find(|e| e.name == name).cloned())
    }
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.0.read().map(|l| l.clone()).unwrap_or_default()
    }
    pub fn add(&self, e: Arc<Export>) {
        if let Ok(mut l) = self.0.write() {
            l.push(e);
        }
    }
    pub fn remove(&self, id: &str) -> Option<Arc<Export>> {
        let mut l = self.0.write().ok()?;
        let pos = l.iter().position(|e| e.id == id)?;
        Some(l.remove(pos))
    }
}
