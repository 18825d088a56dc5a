//! The `blkverify` driver (QEMU's test aid): every request goes to both
//! `test` and `raw` (a plain copy of what `test` should read as); reads
//! compare the two, and a difference ends the daemon with QEMU's line
//! on stderr and exit code 1, as QSD does (the point of the driver is
//! to stop at the first divergence). Flushes reach only `test`.
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::child::{Child, Entered};
use super::driver::{Driver, Extent, IoFuture, WriteFlags, ZeroFlags};
use super::drivers::{edge, OpenCtx, Opened};
use super::error::{BlockError, BlockResult};
use super::perm::Perm;

pub struct Blkverify {
    test: Arc<Child>,
    raw: Arc<Child>,
}

pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    let ro = ctx.common.read_only;
    // QEMU names the node before its children, and opens `raw` (its
    // file) first.
    ctx.name_now();
    let raw = ctx.child(opts, "raw", ro)?;
    let test = match ctx.child(opts, "test", ro) {
        Ok(t) => t,
        Err(e) => {
            ctx.drop_inline(&raw);
            return Err(e);
        }
    };
    let (rj, rp) = ctx
        .entry(&raw)
        .map(|e| (e.json.clone(), e.plain_filename.clone()))
        .unwrap_or((Value::Null, None));
    let (tj, tp) = ctx
        .entry(&test)
        .map(|e| (e.json.clone(), e.plain_filename.clone()))
        .unwrap_or((Value::Null, None));
    // QEMU's filename when both children have plain ones.
    let plain = match (rp, tp) {
        (Some(r), Some(t)) => Some(format!("blkverify:{r}:{t}")),
        _ => None,
    };
    let mut j = Map::new();
    j.insert("driver".into(), json!("blkverify"));
    j.insert("raw".into(), rj);
    j.insert("test".into(), tj);
    Ok(Opened {
        driver: Box::new(Blkverify {
            test: Child::new(ctx.node(&test)?),
            raw: Child::new(ctx.node(&raw)?),
        }),
        json: Value::Object(j),
        plain,
        children: vec![edge("raw", &raw), edge("test", &test)],
    })
}

async fn enter(c: &Child) -> BlockResult<Entered<'_>> {
    c.enter()
        .await
        .ok_or_else(|| BlockError::new(nix::libc::ENOMEDIUM, "No medium found"))
}

/// QEMU's blkverify_err: the line, then the process ends.
fn fail(what: &str, offset: u64, len: u64, msg: String) -> ! {
    eprintln!("blkverify: {what} offset={offset} bytes={len} {msg}");
    std::process::exit(1);
}

fn code(r: &BlockResult<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => -e.errno,
    }
}

impl Blkverify {
    /// Both results must agree, as QEMU checks them.
    fn agree(what: &str, offset: u64, len: u64, test: &BlockResult<()>, raw: &BlockResult<()>) {
        if code(test) != code(raw) {
            fail(
                what,
                offset,
                len,
                format!(
                    "return value mismatch (test={}, raw={})",
                    code(test),
                    code(raw)
                ),
            );
        }
    }
}

impl Driver for Blkverify {
    fn name(&self) -> &'static str {
        "blkverify"
    }
    fn size(&self) -> u64 {
        self.test.get().map_or(0, |n| n.size())
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let len = buf.len() as u64;
            let mut copy = vec![0u8; buf.len()];
            let (t, r) = (enter(&self.test).await?, enter(&self.raw).await?);
            let (tr, rr) = tokio::join!(t.read(offset, buf), r.read(offset, &mut copy));
            Self::agree("read", offset, len, &tr, &rr);
            tr?;
            if let Some(i) = buf.iter().zip(&copy).position(|(a, b)| a != b) {
                fail(
                    "read",
                    offset,
                    len,
                    format!("contents mismatch at offset {}", offset + i as u64),
                );
            }
            Ok(())
        })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let (t, r) = (enter(&self.test).await?, enter(&self.raw).await?);
            let (tr, rr) = tokio::join!(t.write(offset, buf, flags), r.write(offset, buf, flags));
            Self::agree("write", offset, buf.len() as u64, &tr, &rr);
            tr
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { enter(&self.test).await?.flush().await })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let (t, r) = (enter(&self.test).await?, enter(&self.raw).await?);
            let (tr, rr) = tokio::join!(t.discard(offset, len), r.discard(offset, len));
            Self::agree("discard", offset, len, &tr, &rr);
            tr
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let (t, r) = (enter(&self.test).await?, enter(&self.raw).await?);
            let (tr, rr) = tokio::join!(
                t.write_zeroes(offset, len, flags),
                r.write_zeroes(offset, len, flags)
            );
            Self::agree("write", offset, len, &tr, &rr);
            tr
        })
    }
    fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, Extent> {
        // QEMU reports every range as data, read from the node itself.
        Box::pin(async move {
            Ok(Extent {
                len,
                data: true,
                zero: false,
                depth: 1,
            })
        })
    }
    fn truncate(&self, _size: u64) -> IoFuture<'_, ()> {
        Box::pin(async {
            Err(BlockError::unsupported(
                "Image format driver does not support resize",
            ))
        })
    }
    /// `raw` passes its parents' needs through; `test` is a data child
    /// (QEMU's default permissions for storage: no resize shared).
    fn child_perms(&self, role: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        if role == "test" {
            let mut p = perm;
            if p.contains(Perm::WRITE_UNCHANGED) {
                p = p.union(Perm::WRITE);
            }
            if p.contains(Perm::WRITE) {
                p = p.union(Perm::RESIZE);
            }
            return (p, shared.without(Perm::RESIZE));
        }
        (perm, shared)
    }
    /// A filter of `raw`, as QEMU shows it.
    fn is_filter(&self) -> bool {
        true
    }
    fn child_slot(&self, role: &str) -> Option<Arc<Child>> {
        match role {
            "test" => Some(self.test.clone()),
            "raw" => Some(self.raw.clone()),
            _ => None,
        }
    }
}
