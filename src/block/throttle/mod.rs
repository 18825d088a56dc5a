//! Throttling: QEMU's algorithm (`algorithm.rs`, pure), throttle groups
//! (`group.rs`, the `throttle-group` object's state and scheduling),
//! their QOM properties (`limits.rs`) and the `throttle` filter driver
//! (this file), whose requests wait in their group before they pass to
//! `file`.
pub mod algorithm;
pub mod group;
pub mod limits;

use std::sync::{Arc, RwLock};

use serde_json::{json, Map, Value};

use super::child::{Child, Entered};
use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::drivers::{edge, opt_str, OpenCtx, Opened};
use super::error::{BlockError, BlockResult};
use algorithm::Direction;
pub use group::{Member, MemberStats, ThrottleGroup};

pub struct Throttle {
    child: Arc<Child>,
    /// The group membership; blockdev-reopen may move it to another group.
    member: RwLock<Arc<Member>>,
}

impl Throttle {
    fn member(&self) -> Arc<Member> {
        match self.member.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The group this node is in.
    pub fn group(&self) -> Arc<ThrottleGroup> {
        self.member().group().clone()
    }

    /// The group's name and this member's counters (for metrics).
    pub fn stats(&self) -> (String, Arc<MemberStats>) {
        let m = self.member();
        (m.group().name.clone(), m.stats().clone())
    }

    /// Moves the node to `group` (blockdev-reopen); the caller drains it.
    pub fn set_group(&self, group: &Arc<ThrottleGroup>, node: &str) {
        if Arc::ptr_eq(self.member().group(), group) {
            return;
        }
        let m = Arc::new(group.register(node));
        match self.member.write() {
            Ok(mut w) => *w = m,
            Err(p) => *p.into_inner() = m,
        }
    }

    async fn enter(&self) -> BlockResult<Entered<'_>> {
        self.child
            .enter()
            .await
            .ok_or_else(|| BlockError::new(nix::libc::ENOMEDIUM, "No medium found"))
    }

    /// Waits for the group, then enters the child: a request held back
    /// here is not yet on the edge below, so draining the child does not
    /// wait for the throttle.
    async fn pass(&self, bytes: u64, dir: Direction) -> BlockResult<Entered<'_>> {
        self.member().intercept(bytes, dir).await;
        self.enter().await
    }
}

impl Driver for Throttle {
    fn name(&self) -> &'static str {
        "throttle"
    }
    fn size(&self) -> u64 {
        self.child.get().map_or(0, |n| n.size())
    }
    fn limits(&self) -> Limits {
        self.child.get().map(|n| n.limits()).unwrap_or_default()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let n = self.pass(buf.len() as u64, Direction::Read).await?;
            n.read(offset, buf).await
        })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let n = self.pass(buf.len() as u64, Direction::Write).await?;
            n.write(offset, buf, flags).await
        })
    }
    /// Flushes are not throttled, as in QEMU.
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.enter().await?.flush().await })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let n = self.pass(len, Direction::Write).await?;
            n.discard(offset, len).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let n = self.pass(len, Direction::Write).await?;
            n.write_zeroes(offset, len, flags).await
        })
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
    fn grows_on_write(&self) -> bool {
        self.child.get().is_some_and(|n| n.driver.grows_on_write())
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
    fn drain_begin(&self) {
        self.member().drain_begin();
    }
    fn drain_end(&self) {
        self.member().drain_end();
    }
    fn throttle(&self) -> Option<&Throttle> {
        Some(self)
    }
}

/// The group `opts` names, with QEMU's messages.
pub fn find_group(
    ctx: &OpenCtx<'_>,
    opts: &Map<String, Value>,
) -> Result<Arc<ThrottleGroup>, String> {
    let Some(name) = opt_str(opts, "throttle-group") else {
        return Err("Parameter 'throttle-group' is missing".into());
    };
    match ctx.object(name) {
        Some(crate::objects::Object::ThrottleGroup(g)) => Ok(g.clone()),
        _ => Err(format!("Throttle group '{name}' does not exist")),
    }
}

/// The registry's open function: `file`, then the group, as QEMU opens
/// them.
pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    let file = ctx.child(opts, "file", ctx.common.read_only)?;
    let group = match find_group(ctx, opts) {
        Ok(g) => g,
        Err(e) => {
            ctx.drop_inline(&file);
            return Err(e);
        }
    };
    let node = ctx.node(&file)?;
    let name = ctx.name_now();
    let member = Arc::new(group.register(&name));
    let mut j = Map::new();
    j.insert("throttle-group".into(), json!(group.name));
    j.insert("driver".into(), json!("throttle"));
    j.insert(
        "file".into(),
        ctx.entry(&file)
            .map(|e| e.json.clone())
            .unwrap_or(Value::Null),
    );
    Ok(Opened {
        driver: Box::new(Throttle {
            child: Child::new(node),
            member: RwLock::new(member),
        }),
        json: Value::Object(j),
        plain: None,
        children: vec![edge("file", &file)],
    })
}
