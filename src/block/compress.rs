//! The `compress` filter: every write through it becomes a compressed
//! cluster write in the image below (QEMU's filter-compress), which must
//! be a format that writes compressed clusters (qcow2). Reads, zeroes,
//! discards and flushes pass through.
//!
//! QEMU gives the filter its image's cluster size as request alignment,
//! so its block layer pads an unaligned write to whole clusters (reading
//! the rest from below). rsd does the same here: the NBD export
//! advertises the cluster as minimum block size, and a client that sends
//! less anyway gets the read-modify-write.
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::child::{Child, Entered};
use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::drivers::{edge, OpenCtx, Opened};
use super::error::{BlockError, BlockResult};

pub struct Compress {
    child: Arc<Child>,
    /// The image's cluster size: the unit of a compressed write.
    cluster: u64,
    /// Read-modify-write cycles run one at a time, so two padded writes
    /// into one cluster cannot lose each other's bytes.
    rmw: tokio::sync::Mutex<()>,
}

pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    let file = ctx.child(opts, "file", ctx.common.read_only)?;
    let node = ctx.node(&file)?;
    if !node.driver.can_compress() {
        ctx.drop_inline(&file);
        return Err(format!(
            "Compression is not supported for underlying format: {}",
            node.driver.name()
        ));
    }
    let cluster = node.driver.cluster_size().unwrap_or(512).max(512);
    let mut j = Map::new();
    j.insert("driver".into(), json!("compress"));
    j.insert(
        "file".into(),
        ctx.entry(&file)
            .map(|e| e.json.clone())
            .unwrap_or(Value::Null),
    );
    Ok(Opened {
        driver: Box::new(Compress {
            child: Child::new(node),
            cluster,
            rmw: tokio::sync::Mutex::new(()),
        }),
        json: Value::Object(j),
        plain: None,
        children: vec![edge("file", &file)],
    })
}

impl Compress {
    async fn enter(&self) -> BlockResult<Entered<'_>> {
        self.child
            .enter()
            .await
            .ok_or_else(|| BlockError::new(nix::libc::ENOMEDIUM, "No medium found"))
    }

    /// A write that does not cover whole clusters: the clusters it
    /// touches are read, patched and written compressed.
    async fn padded_write(
        &self,
        n: &Entered<'_>,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> BlockResult<()> {
        let _one = self.rmw.lock().await;
        let cs = self.cluster;
        let size = n.size();
        let end = offset + buf.len() as u64;
        let start = offset & !(cs - 1);
        // The image's last cluster may be partial.
        let stop = end.next_multiple_of(cs).min(size.max(end));
        let mut whole = vec![0u8; (stop - start) as usize];
        let head_read = offset > start;
        if head_read {
            let head = cs.min(stop - start) as usize;
            n.read(start, &mut whole[..head]).await?;
        }
        let tail = end & !(cs - 1);
        if end < stop && !(head_read && tail == start) {
            let at = (tail - start) as usize;
            n.read(tail, &mut whole[at..]).await?;
        }
        let at = (offset - start) as usize;
        whole[at..at + buf.len()].copy_from_slice(buf);
        n.write(start, &whole, flags).await
    }
}

impl Driver for Compress {
    fn name(&self) -> &'static str {
        "compress"
    }
    fn size(&self) -> u64 {
        self.child.get().map_or(0, |n| n.size())
    }
    fn limits(&self) -> Limits {
        let below = self.child.get().map(|n| n.limits()).unwrap_or_default();
        Limits {
            request_alignment: (self.cluster as u32).max(below.request_alignment),
            ..below
        }
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move { self.enter().await?.read(offset, buf).await })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let n = self.enter().await?;
            let flags = WriteFlags {
                compressed: true,
                ..flags
            };
            let cs = self.cluster;
            let end = offset + buf.len() as u64;
            if offset & (cs - 1) == 0 && (end & (cs - 1) == 0 || end == n.size()) {
                return n.write(offset, buf, flags).await;
            }
            self.padded_write(&n, offset, buf, flags).await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.enter().await?.flush().await })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.enter().await?.discard(offset, len).await })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move { self.enter().await?.write_zeroes(offset, len, flags).await })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        Box::pin(async move { self.enter().await?.block_status(offset, len).await })
    }
    fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.enter().await?.truncate(size).await })
    }
    fn allocated_size(&self) -> Option<u64> {
        self.child.get()?.allocated_size()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.child.get()?.driver.cluster_size()
    }
    fn known_zero(&self, offset: u64, len: u64) -> bool {
        self.child
            .get()
            .is_some_and(|n| n.driver.known_zero(offset, len))
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn child_slot(&self, role: &str) -> Option<Arc<Child>> {
        (role == "file").then(|| self.child.clone())
    }
}
