//! The `quorum` driver (QEMU's block/quorum.c): the same data on every
//! child. Writes go to all children and succeed when `vote-threshold` of
//! them do; reads (read-pattern `quorum`) read all children and the
//! content most of them agree on wins, or (`fifo`) read the first child
//! that answers. Children that fail or disagree are reported with
//! QUORUM_REPORT_BAD, a vote that fails with QUORUM_FAILURE, exactly as
//! QSD emits them; `rewrite-corrupted` writes the winning data back to
//! the children that lost. `blkverify` compares two children and stops
//! the daemon on a mismatch, as QEMU does.
//!
//! x-blockdev-change adds and removes children at run time
//! (`change.rs`); `vote.rs` is the counting.
mod change;
mod vote;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::Poll;

use serde_json::{json, Map, Value};

use super::child::{Child, Entered};
use super::driver::{Driver, Extent, IoFuture, WriteFlags, ZeroFlags};
use super::drivers::{named_edge, opt_bool, opt_str, OpenCtx, Opened};
use super::error::{BlockError, BlockResult};
use super::perm::Perm;
use crate::events::EventSink;
pub use change::{add_child, remove_child};
use vote::Verdict;

/// One child: its edge name ("children.N") and the edge.
#[derive(Clone)]
struct Member {
    role: String,
    edge: Arc<Child>,
}

struct Members {
    list: Vec<Member>,
    /// The N of the next "children.N" (QEMU's next_child_index).
    next: u32,
}

pub struct Quorum {
    node_name: String,
    threshold: usize,
    blkverify: bool,
    rewrite: bool,
    fifo: bool,
    /// Fixed at open, as QEMU's cached total_sectors.
    size: u64,
    members: RwLock<Members>,
    events: Option<EventSink>,
}

/// QEMU's operation types in QUORUM_REPORT_BAD.
#[derive(Clone, Copy)]
enum OpType {
    Read,
    Write,
    Flush,
}

impl OpType {
    fn as_str(self) -> &'static str {
        match self {
            OpType::Read => "read",
            OpType::Write => "write",
            OpType::Flush => "flush",
        }
    }
}

/// The sectors a request covers, as QEMU reports them.
fn sectors(offset: u64, len: u64) -> (u64, u64) {
    let start = offset / 512;
    (start, (offset + len).div_ceil(512) - start)
}

fn strerror(errno: i32) -> String {
    crate::util::os_msg(&std::io::Error::from_raw_os_error(errno))
}

fn no_medium() -> BlockError {
    BlockError::new(nix::libc::ENOMEDIUM, "No medium found")
}

/// Runs the futures together and returns their results in order.
async fn join_all<'a, T>(futs: Vec<Pin<Box<dyn Future<Output = T> + Send + 'a>>>) -> Vec<T> {
    let mut futs: Vec<Option<Pin<Box<dyn Future<Output = T> + Send + 'a>>>> =
        futs.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *o = Some(v);
                        *f = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// Enters a child's edge for one request.
async fn enter(edge: &Child) -> BlockResult<Entered<'_>> {
    edge.enter().await.ok_or_else(no_medium)
}

impl Quorum {
    fn members(&self) -> Vec<Member> {
        match self.members.read() {
            Ok(m) => m.list.clone(),
            Err(p) => p.into_inner().list.clone(),
        }
    }

    fn child_name(m: &Member) -> String {
        m.edge.get().map(|n| n.name.clone()).unwrap_or_default()
    }

    fn report_bad(&self, op: OpType, offset: u64, len: u64, node: &str, errno: Option<i32>) {
        let Some(ev) = &self.events else {
            return;
        };
        let (start, count) = sectors(offset, len);
        let mut d = Map::new();
        d.insert("type".into(), json!(op.as_str()));
        if let Some(e) = errno {
            d.insert("error".into(), json!(strerror(e)));
        }
        d.insert("node-name".into(), json!(node));
        d.insert("sector-num".into(), json!(start));
        d.insert("sectors-count".into(), json!(count));
        ev("QUORUM_REPORT_BAD", d);
    }

    fn report_failure(&self, offset: u64, len: u64) {
        let Some(ev) = &self.events else {
            return;
        };
        let (start, count) = sectors(offset, len);
        let mut d = Map::new();
        d.insert("reference".into(), json!(self.node_name));
        d.insert("sector-num".into(), json!(start));
        d.insert("sectors-count".into(), json!(count));
        ev("QUORUM_FAILURE", d);
    }

    /// Reports each failed child; when fewer than the threshold
    /// succeeded, the quorum fails with the most common error.
    fn tally(
        &self,
        op: OpType,
        offset: u64,
        len: u64,
        members: &[Member],
        results: &[Result<(), i32>],
    ) -> BlockResult<()> {
        let mut errors = Vec::new();
        for (i, (m, r)) in members.iter().zip(results).enumerate() {
            if let Err(e) = r {
                self.report_bad(op, offset, len, &Self::child_name(m), Some(*e));
                errors.push((i, *e));
            }
        }
        if results.len() - errors.len() < self.threshold {
            let errno = vote::vote_error(&errors).unwrap_or(nix::libc::EIO);
            self.report_failure(offset, len);
            return Err(BlockError::new(errno, strerror(errno)));
        }
        Ok(())
    }

    async fn read_quorum(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        let members = self.members();
        let len = buf.len();
        let reads = members
            .iter()
            .map(|m| {
                let edge = m.edge.clone();
                Box::pin(async move {
                    let mut b = vec![0u8; len];
                    let r = match enter(&edge).await {
                        Ok(n) => n.read(offset, &mut b).await,
                        Err(e) => Err(e),
                    };
                    (r.map_err(|e| e.errno), b)
                }) as Pin<Box<dyn Future<Output = _> + Send>>
            })
            .collect();
        let done: Vec<(Result<(), i32>, Vec<u8>)> = join_all(reads).await;
        let results: Vec<Result<(), i32>> = done.iter().map(|(r, _)| *r).collect();
        self.tally(OpType::Read, offset, len as u64, &members, &results)?;
        let good: Vec<(usize, &[u8])> = done
            .iter()
            .enumerate()
            .filter(|(_, (r, _))| r.is_ok())
            .map(|(i, (_, b))| (i, &b[..]))
            .collect();
        if self.blkverify {
            self.verify(offset, &good);
        }
        match vote::vote(&good, self.threshold) {
            Verdict::NoQuorum => {
                self.report_failure(offset, len as u64);
                Err(BlockError::new(nix::libc::EIO, strerror(nix::libc::EIO)))
            }
            Verdict::Winner { from, bad } => {
                buf.copy_from_slice(&done[from].1);
                for &i in &bad {
                    self.report_bad(
                        OpType::Read,
                        offset,
                        len as u64,
                        &Self::child_name(&members[i]),
                        None,
                    );
                }
                if self.rewrite && !bad.is_empty() {
                    self.rewrite(offset, buf, &members, &bad).await;
                }
                Ok(())
            }
        }
    }

    /// blkverify: the two children must agree, or the daemon stops with
    /// QEMU's message.
    fn verify(&self, offset: u64, good: &[(usize, &[u8])]) {
        let Some((_, first)) = good.first() else {
            return;
        };
        for (_, other) in &good[1..] {
            if let Some(at) = vote::first_difference(first, other) {
                eprintln!(
                    "quorum: offset={offset} bytes={} contents mismatch at offset {}",
                    first.len(),
                    offset + at as u64
                );
                std::process::exit(1);
            }
        }
    }

    /// rewrite-corrupted: the winning data goes to the children that
    /// lost; their errors are ignored (it is only a repair attempt).
    async fn rewrite(&self, offset: u64, data: &[u8], members: &[Member], bad: &[usize]) {
        let writes = bad
            .iter()
            .map(|&i| {
                let edge = members[i].edge.clone();
                Box::pin(async move {
                    if let Ok(n) = enter(&edge).await {
                        let _ = n.write(offset, data, WriteFlags::default()).await;
                    }
                }) as Pin<Box<dyn Future<Output = ()> + Send + '_>>
            })
            .collect();
        join_all(writes).await;
    }

    /// fifo: the children in order until one reads.
    async fn read_fifo(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        let mut last = Err(no_medium());
        for m in self.members() {
            last = match enter(&m.edge).await {
                Ok(n) => n.read(offset, buf).await,
                Err(e) => Err(e),
            };
            match &last {
                Ok(()) => return Ok(()),
                Err(e) => self.report_bad(
                    OpType::Read,
                    offset,
                    buf.len() as u64,
                    &Self::child_name(&m),
                    Some(e.errno),
                ),
            }
        }
        last
    }

    /// A write (data or zeroes) to every child at once.
    async fn write_all(
        &self,
        offset: u64,
        len: u64,
        op: impl Fn(Arc<Child>) -> Pin<Box<dyn Future<Output = BlockResult<()>> + Send + 'static>>,
        fua: bool,
    ) -> BlockResult<()> {
        let members = self.members();
        let writes = members.iter().map(|m| op(m.edge.clone())).collect();
        let results: Vec<Result<(), i32>> = join_all(writes)
            .await
            .into_iter()
            .map(|r| r.map_err(|e| e.errno))
            .collect();
        self.tally(OpType::Write, offset, len, &members, &results)?;
        if fua {
            // The quorum has no FUA of its own: QEMU flushes after.
            self.flush_children().await?;
        }
        Ok(())
    }

    /// Flushes each child in turn; failures are reported (sector 0,
    /// count 0), and the flush fails when fewer than the threshold
    /// succeed.
    async fn flush_children(&self) -> BlockResult<()> {
        let members = self.members();
        let mut errors = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let r = match enter(&m.edge).await {
                Ok(n) => n.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                self.report_bad(OpType::Flush, 0, 0, &Self::child_name(m), Some(e.errno));
                errors.push((i, e.errno));
            }
        }
        if members.len() - errors.len() >= self.threshold {
            return Ok(());
        }
        let errno = vote::vote_error(&errors).unwrap_or(nix::libc::EIO);
        Err(BlockError::new(errno, strerror(errno)))
    }
}

impl Driver for Quorum {
    fn name(&self) -> &'static str {
        "quorum"
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.fifo {
                self.read_fifo(offset, buf).await
            } else {
                self.read_quorum(offset, buf).await
            }
        })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            // The children get the bytes each: one copy shared by all.
            let data: Arc<[u8]> = Arc::from(buf);
            let op = move |edge: Arc<Child>| {
                let data = data.clone();
                Box::pin(async move {
                    enter(&edge)
                        .await?
                        .write(offset, &data, WriteFlags::default())
                        .await
                }) as Pin<Box<dyn Future<Output = BlockResult<()>> + Send>>
            };
            self.write_all(offset, buf.len() as u64, op, flags.fua)
                .await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.flush_children())
    }
    /// QEMU's quorum has no discard: it succeeds and does nothing.
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let child_flags = ZeroFlags {
                fua: false,
                ..flags
            };
            let op = move |edge: Arc<Child>| {
                Box::pin(async move {
                    enter(&edge)
                        .await?
                        .write_zeroes(offset, len, child_flags)
                        .await
                }) as Pin<Box<dyn Future<Output = BlockResult<()>> + Send>>
            };
            self.write_all(offset, len, op, flags.fua).await
        })
    }
    /// Zeroes only where every child says so; data as far as any child
    /// has data (QEMU's rule).
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        Box::pin(async move {
            let (mut zero_len, mut data_len) = (len, 0u64);
            for m in self.members() {
                let r = match enter(&m.edge).await {
                    Ok(n) => n.block_status(offset, len).await,
                    Err(e) => Err(e),
                };
                match r {
                    Err(e) => {
                        self.report_bad(
                            OpType::Read,
                            offset,
                            len,
                            &Self::child_name(&m),
                            Some(e.errno),
                        );
                        data_len = len;
                        break;
                    }
                    Ok(x) if x.zero => zero_len = zero_len.min(x.len),
                    Ok(x) => data_len = data_len.max(x.len),
                }
            }
            let data = data_len > 0;
            Ok(Extent {
                len: if data { data_len } else { zero_len },
                data,
                zero: !data,
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
    fn allocated_size(&self) -> Option<u64> {
        let mut sum = 0;
        for m in self.members() {
            sum += m.edge.get()?.allocated_size()?;
        }
        Some(sum)
    }
    /// Children get what the parents ask for (and write for repairs),
    /// and share only reading: a write or resize by anyone else would
    /// make them differ.
    fn child_perms(&self, _role: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        let mut p = perm;
        if self.rewrite {
            p = p.union(Perm::WRITE);
        }
        (
            p,
            shared.intersect(Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED)),
        )
    }
    fn has_image_info(&self) -> bool {
        false
    }
    fn child_slot(&self, role: &str) -> Option<Arc<Child>> {
        self.members()
            .into_iter()
            .find(|m| m.role == role)
            .map(|m| m.edge)
    }
    fn quorum(&self) -> Option<&Quorum> {
        Some(self)
    }
}

/// The registry's open function, with QEMU's checks in QEMU's order.
pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    let refs = opts
        .get("children")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if refs.is_empty() {
        return Err("Number of provided children must be 1 or more".into());
    }
    let threshold = opts
        .get("vote-threshold")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if threshold < 1 {
        return Err("Parameter 'vote-threshold' expects a value >= 1".into());
    }
    if threshold as usize > refs.len() {
        return Err("threshold may not exceed children count".into());
    }
    let threshold = threshold as usize;
    let fifo = opt_str(opts, "read-pattern") == Some("fifo");
    // fifo ignores blkverify and rewrite-corrupted, as QEMU does.
    let blkverify = !fifo && opt_bool(opts, "blkverify").unwrap_or(false);
    let rewrite = !fifo && opt_bool(opts, "rewrite-corrupted").unwrap_or(false);
    if blkverify && (refs.len() != 2 || threshold != 2) {
        return Err(
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2"
                .into(),
        );
    }
    if rewrite && blkverify {
        return Err("rewrite-corrupted=on cannot be used with blkverify=on".into());
    }
    // The quorum is named before the children it opens.
    let node_name = ctx.name_now();
    let ro = ctx.common.read_only;
    let mut opened: Vec<(String, String)> = Vec::new();
    let fail = |ctx: &mut OpenCtx<'_>, opened: &[(String, String)], e: String| {
        for (_, name) in opened.iter().rev() {
            ctx.drop_inline(name);
        }
        Err(e)
    };
    for (i, r) in refs.iter().enumerate() {
        let role = format!("children.{i}");
        let mut one = Map::new();
        one.insert(role.clone(), r.clone());
        match ctx.child(&one, &role, ro) {
            Ok(name) => opened.push((role, name)),
            Err(e) => return fail(ctx, &opened, e),
        }
    }
    let mut list = Vec::new();
    let mut jsons = Vec::new();
    let mut size = None;
    for (role, name) in &opened {
        let node = ctx.node(name)?;
        if size.is_some_and(|s| s != node.size()) {
            return fail(
                ctx,
                &opened,
                "Could not refresh total sector count: Input/output error".into(),
            );
        }
        size = Some(node.size());
        jsons.push(
            ctx.entry(name)
                .map(|e| e.json.clone())
                .unwrap_or(Value::Null),
        );
        list.push(Member {
            role: role.clone(),
            edge: Child::new(node),
        });
    }
    let mut j = Map::new();
    j.insert("children".into(), Value::Array(jsons));
    j.insert("driver".into(), json!("quorum"));
    for k in [
        "vote-threshold",
        "blkverify",
        "rewrite-corrupted",
        "read-pattern",
    ] {
        if let Some(v) = opts.get(k) {
            j.insert(k.into(), v.clone());
        }
    }
    let children = opened
        .iter()
        .map(|(role, name)| named_edge(Cow::Owned(role.clone()), name))
        .collect();
    let next = list.len() as u32;
    Ok(Opened {
        driver: Box::new(Quorum {
            node_name,
            threshold,
            blkverify,
            rewrite,
            fifo,
            size: size.unwrap_or(0),
            members: RwLock::new(Members { list, next }),
            events: ctx.events(),
        }),
        json: Value::Object(j),
        plain: None,
        children,
    })
}
