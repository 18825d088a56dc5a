//! The block-export layer, across export types: the trait every export
//! type implements (NBD, vhost-user-blk; FUSE next), one registry
//! keyed by export id, and the actor that owns each export.
pub mod actor;
pub mod fuse;
pub mod stats;

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::block::child::Child;
use crate::iothread::Placement;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait BlockExport: Send + Sync + 'static {
    fn id(&self) -> &str;
    /// QAPI's BlockExportType ("nbd", "vhost-user-blk", "fuse").
    fn kind(&self) -> &'static str;
    /// The exported node's edge, which the graph re-points (a snapshot)
    /// and drains.
    fn node(&self) -> &Arc<Child>;
    /// The graph user holding the export's permissions.
    fn user(&self) -> u64;
    /// The iothread the export serves on (docs/iothreads.md), which
    /// follows its node unless the export is fixed there.
    fn placement(&self) -> &Arc<Placement>;
    /// What a safe block-export-del refuses to cut: connected clients
    /// for NBD, requests in flight for vhost-user-blk (as QSD counts).
    fn clients(&self) -> usize;
    /// Clients that are not on their way out (a client whose socket is
    /// closed is leaving); all of them where the export cannot tell.
    fn clients_staying(&self) -> usize {
        self.clients()
    }
    /// Stops serving and drops the connected clients.
    fn close(&self);
    /// Waits until no client remains, at most `limit`.
    fn no_clients(&self, limit: Duration) -> BoxFuture<'_, ()>;
    /// The export's own work, run and watched by its actor until the
    /// export closes (a protocol server's loop). Exports whose clients
    /// another component serves (NBD's server) wait for the close.
    fn serve(self: Arc<Self>) -> BoxFuture<'static, ()>;
    /// The export's counters (clients, requests, bytes, errors), which
    /// the metrics collector reads.
    fn stats(&self) -> &Arc<stats::ExportStats>;
    /// Whether the export serves now (for /readyz): its protocol's loop
    /// runs. An NBD export serves while the NBD server does.
    fn serving(&self) -> bool {
        true
    }
    /// For a protocol's own lookups (NBD finds its exports by name).
    fn as_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

/// The exports, by id, in creation order.
#[derive(Clone, Default)]
pub struct Registry(Arc<RwLock<Vec<Arc<dyn BlockExport>>>>);

impl Registry {
    pub fn find(&self, id: &str) -> Option<Arc<dyn BlockExport>> {
        self.list().into_iter().find(|e| e.id() == id)
    }

    pub fn list(&self) -> Vec<Arc<dyn BlockExport>> {
        self.0.read().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn add(&self, e: Arc<dyn BlockExport>) {
        if let Ok(mut l) = self.0.write() {
            l.push(e);
        }
    }

    pub fn remove(&self, id: &str) -> Option<Arc<dyn BlockExport>> {
        let mut l = self.0.write().ok()?;
        let pos = l.iter().position(|e| e.id() == id)?;
        Some(l.remove(pos))
    }

    /// The exports of one type, as that type.
    pub fn of_type<T: Send + Sync + 'static>(&self) -> Vec<Arc<T>> {
        self.list()
            .into_iter()
            .filter_map(|e| e.as_any().downcast::<T>().ok())
            .collect()
    }
}

/// Ends an export's service: drops its clients, waits for them (bounded:
/// a hung client must not hang the monitor), then drains its edge so no
/// request is in flight when the node is released.
pub async fn shut_down(export: &dyn BlockExport) {
    let limit = Duration::from_secs(5);
    export.close();
    // Requests a throttle filter holds back go now, at full speed: they
    // finish instead of being dropped or outliving the wait below.
    let node = export.node().get();
    let section = node.as_ref().map(|n| n.drain_section());
    export.no_clients(limit).await;
    let held = tokio::time::timeout(limit, export.node().quiesce()).await;
    export.node().set(None);
    drop(held);
    drop(section);
}
