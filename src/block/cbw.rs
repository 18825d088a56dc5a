//! The `copy-before-write` filter (image fleecing): requests pass to
//! `file`, and before a request changes a cluster for the first time,
//! the cluster's old contents are copied to `target` (the block layer's
//! `Copier`, which the backup job uses too). `snapshot-access` above it
//! reads the point-in-time view.
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::child::{Child, Entered};
use super::copier::{Copier, DEFAULT_CHUNK};
use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::drivers::{edge, opt_str, opt_u64, OpenCtx, Opened};
use super::error::{BlockError, BlockResult};
use super::perm::Perm;

pub struct Cbw {
    child: Arc<Child>,
    copier: Arc<Copier>,
    /// on-cbw-error=break-snapshot: a failed copy lets the guest write
    /// through and breaks the view instead.
    break_snapshot: bool,
    /// cbw-timeout: a copy taking longer fails (0: no limit).
    timeout: Option<Duration>,
}

impl Cbw {
    async fn enter(&self) -> BlockResult<Entered<'_>> {
        self.child
            .enter()
            .await
            .ok_or_else(|| BlockError::new(nix::libc::ENOMEDIUM, "No medium found"))
    }

    /// Copy-before-write for `off..off+len`, with the filter's timeout
    /// and error policy.
    async fn before_write(&self, off: u64, len: u64) -> BlockResult<()> {
        let r = match self.timeout {
            // The copy goes on after a timeout (as QEMU's does): a
            // request is never dropped halfway.
            Some(t) => {
                let copier = self.copier.clone();
                let copy = tokio::spawn(async move { copier.before_write(off, len).await });
                match tokio::time::timeout(t, copy).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => Err(BlockError::new(
                        nix::libc::EIO,
                        format!("internal error: {e}"),
                    )),
                    Err(_) => Err(BlockError::new(
                        nix::libc::ETIMEDOUT,
                        "Connection timed out",
                    )),
                }
            }
            None => self.copier.before_write(off, len).await,
        };
        match r {
            Err(e) if self.break_snapshot => {
                self.copier.break_view(e.errno);
                Ok(())
            }
            r => r,
        }
    }
}

impl Driver for Cbw {
    fn name(&self) -> &'static str {
        "copy-before-write"
    }
    fn size(&self) -> u64 {
        self.child.get().map_or(0, |n| n.size())
    }
    fn limits(&self) -> Limits {
        self.child.get().map(|n| n.limits()).unwrap_or_default()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move { self.enter().await?.read(offset, buf).await })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let n = self.enter().await?;
            self.before_write(offset, buf.len() as u64).await?;
            n.write(offset, buf, flags).await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.enter().await?.flush().await })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let n = self.enter().await?;
            self.before_write(offset, len).await?;
            n.discard(offset, len).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let n = self.enter().await?;
            self.before_write(offset, len).await?;
            n.write_zeroes(offset, len, flags).await
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        Box::pin(async move { self.enter().await?.block_status(offset, len).await })
    }
    fn truncate(&self, _size: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(BlockError::unsupported("Operation not supported")) })
    }
    fn allocated_size(&self) -> Option<u64> {
        self.child.get()?.allocated_size()
    }
    /// The source passes its parents' needs on; once the filter has
    /// parents it also reads the source and lets nobody else write it or
    /// resize it, as QEMU's filter does. The target is written and
    /// shared with everything but a resize.
    fn child_perms(&self, role: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        if role == "target" {
            return (Perm::WRITE, Perm::ALL.without(Perm::RESIZE));
        }
        if perm == Perm::NONE && shared == Perm::ALL {
            return (perm, shared);
        }
        (
            perm.union(Perm::CONSISTENT_READ),
            shared.without(Perm::WRITE.union(Perm::RESIZE)),
        )
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.copier.cluster())
    }
    /// A filter of its `file`, as in QEMU (shown nested below it).
    fn is_filter(&self) -> bool {
        true
    }
    fn dirty_bitmaps(&self) -> Vec<Value> {
        self.copier.bitmaps_info(self.size())
    }
    fn copier(&self) -> Option<Arc<Copier>> {
        Some(self.copier.clone())
    }
}

/// The options checked once the children are open, as QEMU does; the
/// `bitmap`, if given.
fn check_options(
    ctx: &OpenCtx<'_>,
    opts: &Map<String, Value>,
) -> Result<Option<Arc<crate::block::dirty::NamedBitmap>>, String> {
    let mut bitmap = None;
    if let Some(b) = opts.get("bitmap").and_then(Value::as_object) {
        let node = b.get("node").and_then(Value::as_str).unwrap_or_default();
        let name = b.get("name").and_then(Value::as_str).unwrap_or_default();
        let Some(e) = ctx.entry(node) else {
            return Err(format!("Node '{node}' not found"));
        };
        let Some(found) = e.node.bitmaps.find(name) else {
            return Err(format!("Dirty bitmap '{name}' not found"));
        };
        bitmap = Some(found);
    }
    let min_cluster = opt_u64(opts, "min-cluster-size").unwrap_or(0);
    if min_cluster != 0 && !min_cluster.is_power_of_two() {
        return Err(
            "Cannot create block-copy-state: min-cluster-size needs to be a power of 2".into(),
        );
    }
    if min_cluster > 64 << 20 {
        return Err("rsd limits min-cluster-size to 64 MiB".into());
    }
    Ok(bitmap)
}

pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    let file = ctx.child(opts, "file", ctx.common.read_only)?;
    let target = match ctx.child(opts, "target", false) {
        Ok(t) => t,
        Err(e) => {
            ctx.drop_inline(&file);
            return Err(e);
        }
    };
    let bitmap = match check_options(ctx, opts) {
        Ok(b) => b,
        Err(e) => {
            ctx.drop_inline(&target);
            ctx.drop_inline(&file);
            return Err(e);
        }
    };
    let min_cluster = opt_u64(opts, "min-cluster-size").unwrap_or(0);
    let source = ctx.node(&file)?;
    let target_node = ctx.node(&target)?;
    let cluster = target_node
        .driver
        .cluster_size()
        .map_or(65536, |c| c.clamp(65536, 1 << 20))
        .max(min_cluster);
    let copier = Copier::new(&source, target_node, cluster, DEFAULT_CHUNK);
    match &bitmap {
        // Only what the bitmap marks (as it is now) is copied, and only
        // that is readable through snapshot-access, as in QEMU.
        Some(b) => {
            copier.gone.set_all();
            let mut at = 0;
            while let Some((off, len)) = b.bits.next_run(at, 1 << 30) {
                if off < at {
                    break;
                }
                // Whole clusters, as the copier tracks them.
                let (start, end) = (
                    off / cluster * cluster,
                    (off + len).div_ceil(cluster) * cluster,
                );
                copier.todo.set(start, end - start);
                copier.gone.clear(start, end - start);
                at = off + len;
            }
        }
        None => copier.todo.set_all(),
    }
    let timeout = opt_u64(opts, "cbw-timeout")
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let break_snapshot = opt_str(opts, "on-cbw-error") == Some("break-snapshot");
    let json_of = |name: &str| {
        ctx.entry(name)
            .map(|e| e.json.clone())
            .unwrap_or(Value::Null)
    };
    let mut j = Map::new();
    j.insert("driver".into(), json!("copy-before-write"));
    j.insert("file".into(), json_of(&file));
    j.insert("target".into(), json_of(&target));
    let plain = ctx.entry(&file).and_then(|e| e.plain_filename.clone());
    Ok(Opened {
        driver: Box::new(Cbw {
            child: Child::new(source),
            copier: Arc::new(copier),
            break_snapshot,
            timeout,
        }),
        json: Value::Object(j),
        plain,
        children: vec![edge("file", &file), edge("target", &target)],
    })
}

/// `snapshot-access`: reads the point-in-time view of the
/// copy-before-write node below it (its `file`). Discarding frees the
/// view's clusters (they read as errors afterwards); writes are refused.
pub struct SnapshotAccess {
    child: Arc<Child>,
    copier: Option<Arc<Copier>>,
}

impl SnapshotAccess {
    fn copier(&self) -> BlockResult<&Arc<Copier>> {
        self.copier
            .as_ref()
            .ok_or_else(|| BlockError::unsupported("Operation not supported"))
    }
}

impl Driver for SnapshotAccess {
    fn name(&self) -> &'static str {
        "snapshot-access"
    }
    fn size(&self) -> u64 {
        self.child.get().map_or(0, |n| n.size())
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move { self.copier()?.read_view(offset, buf).await })
    }
    fn write<'a>(&'a self, _offset: u64, _buf: &'a [u8], _flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async { Err(BlockError::unsupported("Operation not supported")) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.copier()?.discard_view(offset, len).await })
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async { Err(BlockError::unsupported("Operation not supported")) })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        // What the view can read is data, as QSD reports it; what it
        // cannot (discarded, or a broken view) fails.
        let len = len.min(self.size().saturating_sub(offset)).max(1);
        Box::pin(async move {
            Ok(Extent {
                len: self.copier()?.view_extent(offset, len)?,
                data: true,
                zero: false,
                depth: 1,
            })
        })
    }
    fn truncate(&self, _size: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(BlockError::unsupported("Operation not supported")) })
    }
    fn allocated_size(&self) -> Option<u64> {
        self.child.get()?.allocated_size()
    }
    fn has_image_info(&self) -> bool {
        false
    }
    /// It only reads through the filter's view (QEMU takes nothing).
    fn child_perms(&self, _role: &str, _perm: Perm, _shared: Perm) -> (Perm, Perm) {
        (Perm::NONE, Perm::ALL)
    }
}

pub fn open_snapshot_access(
    ctx: &mut OpenCtx<'_>,
    opts: &Map<String, Value>,
) -> Result<Opened, String> {
    let file = ctx.child(opts, "file", true)?;
    let node = ctx.node(&file)?;
    let copier = node.driver.copier();
    let mut j = Map::new();
    j.insert("driver".into(), json!("snapshot-access"));
    j.insert(
        "file".into(),
        ctx.entry(&file)
            .map(|e| e.json.clone())
            .unwrap_or(Value::Null),
    );
    let plain = ctx.entry(&file).and_then(|e| e.plain_filename.clone());
    Ok(Opened {
        driver: Box::new(SnapshotAccess {
            child: Child::new(node),
            copier,
        }),
        json: Value::Object(j),
        plain,
        children: vec![edge("file", &file)],
    })
}
