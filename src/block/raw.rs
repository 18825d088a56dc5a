//! The `raw` format: a window (offset, size) onto its child.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::child::{Child, Entered};
use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::drivers::{edge, opt_u64, OpenCtx, Opened};
use super::error::{BlockError, BlockResult};
use super::node::Node;
use super::perm::Perm;

pub struct RawDriver {
    /// The file edge, which the graph can re-point (a filter inserted
    /// below raw); requests enter it counted.
    child: Arc<Child>,
    offset: u64,
    /// The `size` option was given: the node cannot be resized.
    fixed: bool,
    /// The size as of open or the last resize (QEMU caches it too).
    size: AtomicU64,
}

impl RawDriver {
    /// Checks offset/size against the child as QEMU does.
    pub fn new(child: Arc<Node>, offset: u64, size: Option<u64>) -> Result<RawDriver, String> {
        let child_size = child.size();
        if let Some(s) = size {
            if s % 512 != 0 {
                return Err("Specified size is not multiple of 512".into());
            }
        }
        if offset > child_size {
            return Err(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({child_size})"
            ));
        }
        if let Some(s) = size {
            if offset.checked_add(s).is_none_or(|end| end > child_size) {
                return Err(format!(
                    "The sum of offset ({offset}) and size ({s}) has to be smaller or equal to the  actual size of the containing file ({child_size})"
                ));
            }
        }
        Ok(RawDriver {
            child: Child::new(child),
            offset,
            fixed: size.is_some(),
            size: AtomicU64::new(size.unwrap_or(child_size - offset)),
        })
    }

    /// With an offset or size, raw is a format over its child's data;
    /// without, a pass-through filter.
    pub fn has_window(&self) -> bool {
        self.offset != 0 || self.fixed
    }

    /// The file node now (not counted: for sizes, limits and queries).
    fn now(&self) -> Option<Arc<Node>> {
        self.child.get()
    }

    /// Enters a request on the file edge.
    async fn file(&self) -> BlockResult<Entered<'_>> {
        self.child
            .enter()
            .await
            .ok_or_else(|| BlockError::new(nix::libc::ENOMEDIUM, "No medium found"))
    }
}

impl Driver for RawDriver {
    fn name(&self) -> &'static str {
        "raw"
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn limits(&self) -> Limits {
        self.now().map(|n| n.limits()).unwrap_or_default()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move { self.file().await?.read(self.offset + offset, buf).await })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let f = self.file().await?;
            f.write(self.offset + offset, buf, flags).await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.file().await?.flush().await })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.file().await?.discard(self.offset + offset, len).await })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let f = self.file().await?;
            f.write_zeroes(self.offset + offset, len, flags).await
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        Box::pin(async move {
            let f = self.file().await?;
            f.block_status(self.offset + offset, len).await
        })
    }
    fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.fixed {
                return Err(BlockError::unsupported(
                    "Cannot resize fixed-size raw disks",
                ));
            }
            let f = self.file().await?;
            f.truncate(self.offset + size).await?;
            self.size
                .store(f.size().saturating_sub(self.offset), Ordering::Release);
            Ok(())
        })
    }
    fn child_perms(&self, _role: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        if !self.has_window() {
            return (perm, shared);
        }
        // A data child: nobody else may resize it; writing may grow it.
        let perm = if perm.contains(Perm::WRITE) {
            perm.union(Perm::RESIZE)
        } else {
            perm
        };
        (perm, shared.without(Perm::RESIZE))
    }
    fn allocated_size(&self) -> Option<u64> {
        self.now()?.allocated_size()
    }
    fn known_zero(&self, offset: u64, len: u64) -> bool {
        self.now()
            .is_some_and(|n| n.driver.known_zero(self.offset + offset, len))
    }
    fn child_slot(&self, role: &str) -> Option<Arc<Child>> {
        (role == "file").then(|| self.child.clone())
    }
}

/// BlockdevOptionsRaw's window, parsed.
pub struct RawOptions {
    pub offset: u64,
    pub size: Option<u64>,
}

impl RawOptions {
    pub fn parse(opts: &Map<String, Value>) -> RawOptions {
        RawOptions {
            offset: opt_u64(opts, "offset").unwrap_or(0),
            size: opt_u64(opts, "size"),
        }
    }
}

/// The registry's open function: the file child, then the window.
pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    let child = ctx.child(opts, "file", ctx.common.read_only)?;
    let child_node = ctx.node(&child)?;
    let RawOptions { offset, size } = RawOptions::parse(opts);
    let raw = match RawDriver::new(child_node, offset, size) {
        Ok(r) => r,
        Err(e) => {
            ctx.drop_inline(&child);
            return Err(e);
        }
    };
    let child_entry = ctx.entry(&child);
    let child_json = child_entry.map(|e| e.json.clone()).unwrap_or(Value::Null);
    let child_plain = child_entry.and_then(|e| e.plain_filename.clone());
    let mut j = Map::new();
    j.insert("driver".into(), json!("raw"));
    if opts.contains_key("offset") {
        j.insert("offset".into(), json!(offset));
    }
    if let Some(sz) = size {
        j.insert("size".into(), json!(sz));
    }
    j.insert("file".into(), child_json);
    let plain = if raw.has_window() { None } else { child_plain };
    Ok(Opened {
        driver: Box::new(raw),
        json: Value::Object(j),
        plain,
        children: vec![edge("file", &child)],
    })
}
