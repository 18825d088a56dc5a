//! The `mirror_top` filter a mirror job puts above its source, as QEMU
//! does: every parent of the source moves onto it, so the job sees the
//! guest's I/O in one place. It passes requests to its child (the source,
//! then the target once the job pivots) and, in write-blocking mode,
//! copies each guest write to the target before completing it.
use std::sync::{Arc, RwLock};

use super::bitmap::DirtyBitmap;
use super::child::{Child, Entered};
use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::error::{BlockError, BlockResult};
use super::node::Node;
use super::perm::Perm;

/// Cheap to clone: the node holds one, the job another.
#[derive(Clone)]
pub struct MirrorTop {
    child: Arc<Child>,
    /// Set in write-blocking mode: the node guest writes are copied to.
    active: Arc<RwLock<Option<Arc<Node>>>>,
    /// The job's dirty bitmap, shown on this node as QEMU shows it.
    dirty: Arc<RwLock<Option<Arc<DirtyBitmap>>>>,
}

impl MirrorTop {
    pub fn new(source: Arc<Node>) -> MirrorTop {
        MirrorTop {
            child: Child::new(source),
            active: Arc::new(RwLock::new(None)),
            dirty: Arc::new(RwLock::new(None)),
        }
    }

    pub fn show_bitmap(&self, b: Arc<DirtyBitmap>) {
        if let Ok(mut d) = self.dirty.write() {
            *d = Some(b);
        }
    }

    /// The edge to the source, which the job quiesces and re-points at
    /// the target when it pivots.
    pub fn edge(&self) -> Arc<Child> {
        self.child.clone()
    }

    /// Starts (Some) or stops (None) copying guest writes synchronously.
    pub fn set_active(&self, target: Option<Arc<Node>>) {
        if let Ok(mut a) = self.active.write() {
            *a = target;
        }
    }

    fn active(&self) -> Option<Arc<Node>> {
        self.active.read().ok().and_then(|a| a.clone())
    }

    async fn enter(&self) -> BlockResult<Entered<'_>> {
        self.child
            .enter()
            .await
            .ok_or_else(|| BlockError::new(nix::libc::ENOMEDIUM, "No medium found"))
    }

    fn now(&self) -> Option<Arc<Node>> {
        self.child.get()
    }
}

impl Driver for MirrorTop {
    fn name(&self) -> &'static str {
        "mirror_top"
    }
    fn size(&self) -> u64 {
        self.now().map_or(0, |n| n.size())
    }
    fn limits(&self) -> Limits {
        self.now().map(|n| n.limits()).unwrap_or_default()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move { self.enter().await?.read(offset, buf).await })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let n = self.enter().await?;
            n.write(offset, buf, flags).await?;
            if let Some(t) = self.active() {
                // The source's dirty tracking already saw the write; a
                // failure here only leaves the copy to the background.
                let _ = t.write(offset, buf, flags).await;
            }
            Ok(())
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.enter().await?.flush().await })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let n = self.enter().await?;
            n.discard(offset, len).await?;
            if let Some(t) = self.active() {
                let _ = t.discard(offset, len).await;
            }
            Ok(())
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let n = self.enter().await?;
            n.write_zeroes(offset, len, flags).await?;
            if let Some(t) = self.active() {
                let _ = t.write_zeroes(offset, len, flags).await;
            }
            Ok(())
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        Box::pin(async move { self.enter().await?.block_status(offset, len).await })
    }
    fn truncate(&self, _size: u64) -> IoFuture<'_, ()> {
        Box::pin(async {
            Err(BlockError::unsupported(
                "Cannot resize a node while a mirror job runs on it",
            ))
        })
    }
    fn child_perms(&self, _role: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        (perm, shared)
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn cluster_size(&self) -> Option<u64> {
        self.now()?.driver.cluster_size()
    }
    fn dirty_bitmaps(&self) -> Vec<serde_json::Value> {
        let d = self.dirty.read().ok().and_then(|d| d.clone());
        d.map(|b| {
            serde_json::json!({"recording": false, "persistent": false, "busy": false,
                "granularity": b.granularity(), "count": b.dirty_bytes()})
        })
        .into_iter()
        .collect()
    }
    fn allocated_size(&self) -> Option<u64> {
        self.now()?.allocated_size()
    }
    fn child_slot(&self, role: &str) -> Option<Arc<Child>> {
        (role == "backing").then(|| self.child.clone())
    }
}
