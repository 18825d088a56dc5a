//! The `preallocate` filter (QEMU's): a write past the end of its
//! `file` first grows the file with write-zeroes (fallocate) up to
//! `prealloc-size` bytes beyond the write, aligned to `prealloc-align`,
//! so a growing image (qcow2 above it) extends its file in large steps.
//! The node's size is the data's end; when the filter no longer has
//! write and resize on its file (its parent went) or closes, the file
//! is truncated back to that end.
//!
//! As in QEMU, it tracks the ends only while its parents take both
//! write and resize (a format node above it) and then shares neither;
//! with any other parent it passes requests through.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use super::child::{Child, Entered};
use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::drivers::{edge, OpenCtx, Opened};
use super::error::{BlockError, BlockResult};
use super::node::Node;
use super::perm::Perm;

/// The ends QEMU tracks (None: unknown).
#[derive(Clone, Copy, Default)]
struct Ends {
    /// Where the data ends: the file's size when tracking began, then
    /// the end of every write past it.
    data_end: Option<u64>,
    /// Where the preallocated zeroes begin.
    zero_start: Option<u64>,
    /// The file's real end (a cache of its size).
    file_end: Option<u64>,
}

pub struct Preallocate {
    child: Arc<Child>,
    align: u64,
    size: u64,
    ends: Mutex<Ends>,
    /// The parents take write and resize, so the ends are tracked.
    tracking: AtomicBool,
    /// Writes past the end grow the file one at a time.
    growing: tokio::sync::Mutex<()>,
}

fn size_opt(opts: &Map<String, Value>, key: &str, default: u64) -> Result<u64, String> {
    match opts.get(key).and_then(Value::as_i64) {
        None => Ok(default),
        Some(v) if v < 0 => Err(format!("Value '{v}' is out of range for parameter '{key}'")),
        Some(v) => Ok(v as u64),
    }
}

pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    let file = ctx.child(opts, "file", ctx.common.read_only)?;
    let node = ctx.node(&file)?;
    let checked = (|| {
        let align = size_opt(opts, "prealloc-align", 1 << 20)?;
        let size = size_opt(opts, "prealloc-size", 128 << 20)?;
        if align % 512 != 0 {
            return Err(
                "prealloc-align parameter of preallocate filter is not aligned to 512".to_string(),
            );
        }
        let file_align = node.limits().request_alignment as u64;
        if align % file_align != 0 {
            return Err(format!(
                "prealloc-align parameter of preallocate filter is not aligned to underlying node request alignment ({file_align})"
            ));
        }
        Ok((align, size))
    })();
    let (align, size) = match checked {
        Ok(v) => v,
        Err(e) => {
            ctx.drop_inline(&file);
            return Err(e);
        }
    };
    let mut j = Map::new();
    j.insert("driver".into(), json!("preallocate"));
    j.insert(
        "file".into(),
        ctx.entry(&file)
            .map(|e| e.json.clone())
            .unwrap_or(Value::Null),
    );
    Ok(Opened {
        driver: Box::new(Preallocate {
            child: Child::new(node),
            align,
            size,
            ends: Mutex::new(Ends::default()),
            tracking: AtomicBool::new(false),
            growing: tokio::sync::Mutex::new(()),
        }),
        json: Value::Object(j),
        plain: None,
        children: vec![edge("file", &file)],
    })
}

fn write_and_resize(perm: Perm) -> bool {
    perm.contains(Perm::WRITE) && perm.contains(Perm::RESIZE)
}

impl Preallocate {
    async fn enter(&self) -> BlockResult<Entered<'_>> {
        self.child
            .enter()
            .await
            .ok_or_else(|| BlockError::new(nix::libc::ENOMEDIUM, "No medium found"))
    }

    fn ends(&self) -> Ends {
        self.ends.lock().map(|e| *e).unwrap_or_default()
    }

    fn set_ends(&self, f: impl FnOnce(&mut Ends)) {
        if let Ok(mut e) = self.ends.lock() {
            f(&mut e);
        }
    }

    /// QEMU's handle_write: before a write that ends past the data's
    /// end, grow the file ahead of it. Returns true when
    /// `want_merge_zero` and the range is already known to be zeroes
    /// (a write-zeroes request then has nothing left to do).
    async fn handle_write(&self, n: &Node, offset: u64, len: u64, want_merge_zero: bool) -> bool {
        if !self.tracking.load(Ordering::Acquire) {
            return false;
        }
        let _one = self.growing.lock().await;
        let end = offset + len;
        let mut e = self.ends();
        let data_end = *e.data_end.get_or_insert_with(|| n.size());
        e.file_end.get_or_insert(data_end);
        if end <= data_end {
            self.set_ends(|s| *s = e);
            return false;
        }
        e.data_end = Some(end);
        if e.zero_start.is_none() || !want_merge_zero {
            e.zero_start = Some(end);
        }
        let file_end = *e.file_end.get_or_insert_with(|| n.size());
        if end <= file_end {
            self.set_ends(|s| *s = e);
            return want_merge_zero && e.zero_start.is_some_and(|z| offset >= z);
        }
        let file_align = (n.limits().request_alignment as u64).max(1);
        let align = self.align.max(file_align);
        let from = if want_merge_zero {
            offset.min(file_end)
        } else {
            file_end
        }
        .next_multiple_of(file_align);
        let to = (from.max(end) + self.size).next_multiple_of(align);
        let merged = want_merge_zero && from <= offset;
        let grown = n
            .write_zeroes(
                from,
                to - from,
                ZeroFlags {
                    no_fallback: true,
                    ..ZeroFlags::default()
                },
            )
            .await;
        e.file_end = grown.is_ok().then_some(to);
        self.set_ends(|s| *s = e);
        grown.is_ok() && merged
    }

    /// Truncates the file back to the data's end if it was grown past
    /// it (QEMU's close and its dropped permissions).
    async fn crop(&self) -> BlockResult<()> {
        let e = self.ends();
        let Some(data_end) = e.data_end else {
            return Ok(());
        };
        let n = self.enter().await?;
        let file_end = e.file_end.unwrap_or_else(|| n.size());
        if data_end < file_end {
            let r = n.truncate(data_end).await;
            self.set_ends(|s| s.file_end = r.is_ok().then_some(data_end));
            r?;
        }
        Ok(())
    }
}

impl Driver for Preallocate {
    fn name(&self) -> &'static str {
        "preallocate"
    }
    fn size(&self) -> u64 {
        match self.ends().data_end {
            Some(end) if self.tracking.load(Ordering::Acquire) => end,
            _ => self.child.get().map_or(0, |n| n.size()),
        }
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
            self.handle_write(&n, offset, buf.len() as u64, false).await;
            n.write(offset, buf, flags).await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.enter().await?.flush().await })
    }
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.tracking.load(Ordering::Acquire) {
                self.crop().await?;
            }
            Ok(())
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.enter().await?.discard(offset, len).await })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let n = self.enter().await?;
            // Only a plain write-zeroes may be merged with preallocation.
            let plain = !flags.fua && !flags.may_unmap;
            if self.handle_write(&n, offset, len, plain).await {
                return Ok(());
            }
            n.write_zeroes(offset, len, flags).await
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        Box::pin(async move { self.enter().await?.block_status(offset, len).await })
    }
    fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let n = self.enter().await?;
            let e = self.ends();
            if let Some(data_end) = e.data_end.filter(|d| size > *d) {
                // Drop the preallocation first, so the new size is
                // reached the way the caller asked.
                let file_end = e.file_end.unwrap_or_else(|| n.size());
                if file_end > data_end {
                    n.truncate(data_end).await?;
                }
            }
            let r = n.truncate(size).await;
            let known = (r.is_ok() && self.tracking.load(Ordering::Acquire)).then_some(size);
            self.set_ends(|s| {
                *s = Ends {
                    data_end: known,
                    zero_start: known,
                    file_end: known,
                }
            });
            r
        })
    }
    fn allocated_size(&self) -> Option<u64> {
        self.child.get()?.allocated_size()
    }
    /// QEMU's preallocate_child_perm: with write and resize from above
    /// it keeps both to itself, so the ends it tracks stay true.
    fn child_perms(&self, _role: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        if write_and_resize(perm) {
            (perm, shared.without(Perm::WRITE.union(Perm::RESIZE)))
        } else {
            (perm, shared)
        }
    }
    /// Tracking starts when the parents take write and resize; when they
    /// let go, the file is truncated back to the data's end (QEMU does
    /// it while checking the new permissions, before others may write).
    fn set_perms(&self, perm: Perm, _shared: Perm) -> Result<(), String> {
        let now = write_and_resize(perm);
        let was = self.tracking.swap(now, Ordering::AcqRel);
        if now && !was {
            let size = self.child.get().map(|n| n.size());
            self.set_ends(|s| {
                *s = Ends {
                    data_end: size,
                    zero_start: size,
                    file_end: size,
                }
            });
        } else if !now && was {
            super::wait::wait(self.crop())
                .map_err(|_| "Failed to drop preallocation".to_string())?;
            self.set_ends(|s| *s = Ends::default());
        }
        Ok(())
    }
    fn grows_on_write(&self) -> bool {
        self.child.get().is_some_and(|n| n.driver.grows_on_write())
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn child_slot(&self, role: &str) -> Option<Arc<Child>> {
        (role == "file").then(|| self.child.clone())
    }
}
