//! `blkdebug`, the error-injecting filter QEMU's tests use: requests
//! pass to `image` unless an `inject-error` rule matches, which fails
//! them with its errno. rsd has no format-internal debug events, so a
//! rule's event names the kind of request it fails (differences entry
//! 41): read_aio and the other read events fail reads, write_aio,
//! pwritev and the other write events fail writes and write-zeroes,
//! flush_to_os/flush_to_disk fail flushes; `iotype` picks the kind
//! directly.
//!
//! States, as QEMU keeps them: the node starts in state 1; a rule with
//! `state` applies only in that state; a `set-state` rule moves the node
//! to `new_state` when its event happens in its `state` (any state when
//! unset). A request is checked against the error rules in the state it
//! found, and then moves the state, as QEMU applies an event's new state
//! after all of the event's rules.
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use super::child::{Child, Entered};
use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::drivers::{edge, opt_u64, OpenCtx, Opened};
use super::error::{BlockError, BlockResult};
use super::perm::Perm;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Zero,
    Discard,
    Flush,
}

#[derive(Debug)]
struct Rule {
    kinds: Vec<Kind>,
    errno: i32,
    /// The 512-byte sector a request must cover (None: any).
    sector: Option<u64>,
    once: bool,
    /// The state the node must be in (None: any).
    state: Option<i64>,
}

#[derive(Debug)]
struct SetState {
    kinds: Vec<Kind>,
    state: Option<i64>,
    new_state: i64,
}

#[derive(Debug)]
struct Rules {
    inject: Vec<Rule>,
    set: Vec<SetState>,
    state: i64,
}

pub struct Blkdebug {
    child: Arc<Child>,
    rules: Mutex<Rules>,
}

fn kinds_of(event: &str, iotype: Option<&str>) -> Vec<Kind> {
    match iotype {
        Some("read") => return vec![Kind::Read],
        Some("write") => return vec![Kind::Write],
        Some("write-zeroes") => return vec![Kind::Zero],
        Some("discard") => return vec![Kind::Discard],
        Some("flush") => return vec![Kind::Flush],
        Some(_) => return Vec::new(),
        None => {}
    }
    match event {
        "read_aio" | "read_backing_aio" | "read_compressed" | "cow_read" | "l2_load"
        | "l2_alloc_cow_read" | "reftable_load" | "refblock_load" | "vmstate_load" => {
            vec![Kind::Read]
        }
        // QEMU raises these before a data write only: raw's and qcow2's
        // write-zeroes raise neither, and the block layer raises
        // `pwritev_zero` instead of `pwritev` for them.
        "write_aio" | "pwritev" => vec![Kind::Write],
        "pwritev_zero" => vec![Kind::Zero],
        "write_compressed" | "cow_write" | "pwritev_rmw_head" | "pwritev_rmw_tail"
        | "l2_update" | "l1_update" | "refblock_update" | "cluster_alloc" | "vmstate_save"
        | "cor_write" => vec![Kind::Write, Kind::Zero],
        "flush_to_os" | "flush_to_disk" => vec![Kind::Flush],
        _ => Vec::new(),
    }
}

impl Blkdebug {
    /// The error for a request of this kind over `offset..offset+len`,
    /// if a rule matches (a `once` rule is used up).
    fn injected(&self, kind: Kind, offset: u64, len: u64) -> BlockResult<()> {
        let Ok(mut rules) = self.rules.lock() else {
            return Ok(());
        };
        let now = rules.state;
        let hit = rules.inject.iter().position(|r| {
            r.kinds.contains(&kind)
                && r.state.is_none_or(|s| s == now)
                // A request without bytes (a flush) covers no sector.
                && r.sector.is_none_or(|s| {
                    let at = s.saturating_mul(512);
                    len > 0 && offset <= at && at < offset.saturating_add(len)
                })
        });
        if let Some(to) = rules
            .set
            .iter()
            .rev()
            .find(|r| r.kinds.contains(&kind) && r.state.is_none_or(|s| s == now))
            .map(|r| r.new_state)
        {
            rules.state = to;
        }
        match hit {
            Some(i) => {
                let errno = rules.inject[i].errno;
                if rules.inject[i].once {
                    rules.inject.remove(i);
                }
                Err(BlockError::new(
                    errno,
                    crate::util::os_msg(&std::io::Error::from_raw_os_error(errno)),
                ))
            }
            None => Ok(()),
        }
    }

    async fn enter(&self) -> BlockResult<Entered<'_>> {
        self.child
            .enter()
            .await
            .ok_or_else(|| BlockError::new(nix::libc::ENOMEDIUM, "No medium found"))
    }
}

impl Driver for Blkdebug {
    fn name(&self) -> &'static str {
        "blkdebug"
    }
    fn size(&self) -> u64 {
        self.child.get().map_or(0, |n| n.size())
    }
    fn limits(&self) -> Limits {
        self.child.get().map(|n| n.limits()).unwrap_or_default()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.injected(Kind::Read, offset, buf.len() as u64)?;
            self.enter().await?.read(offset, buf).await
        })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.injected(Kind::Write, offset, buf.len() as u64)?;
            self.enter().await?.write(offset, buf, flags).await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.injected(Kind::Flush, 0, 0)?;
            self.enter().await?.flush().await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.injected(Kind::Discard, offset, len)?;
            self.enter().await?.discard(offset, len).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.injected(Kind::Zero, offset, len)?;
            self.enter().await?.write_zeroes(offset, len, flags).await
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        Box::pin(async move { self.enter().await?.block_status(offset, len).await })
    }
    fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.enter().await?.truncate(size).await })
    }
    /// A format above grows its file through the filter, as in QEMU.
    fn grows_on_write(&self) -> bool {
        self.child.get().is_some_and(|n| n.driver.grows_on_write())
    }
    fn child_perms(&self, _role: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        (perm, shared)
    }
    fn has_image_info(&self) -> bool {
        false
    }
    fn allocated_size(&self) -> Option<u64> {
        self.child.get()?.allocated_size()
    }
    fn child_slot(&self, role: &str) -> Option<Arc<Child>> {
        (role == "image").then(|| self.child.clone())
    }
}

/// The registry's open function.
pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    if opts.contains_key("config") {
        return Err("rsd's blkdebug takes its rules as options, not a config file".into());
    }
    let image = ctx.child(opts, "image", ctx.common.read_only)?;
    let node = ctx.node(&image)?;
    let mut inject = Vec::new();
    for r in opts
        .get("inject-error")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
    {
        let event = r.get("event").and_then(Value::as_str).unwrap_or_default();
        let iotype = r.get("iotype").and_then(Value::as_str);
        inject.push(Rule {
            kinds: kinds_of(event, iotype),
            state: r.get("state").and_then(Value::as_i64),
            errno: r.get("errno").and_then(Value::as_i64).unwrap_or(5) as i32,
            sector: r
                .get("sector")
                .and_then(Value::as_i64)
                .filter(|s| *s >= 0)
                .map(|s| s as u64),
            once: r.get("once").and_then(Value::as_bool).unwrap_or(false),
        });
    }
    let set = opts
        .get("set-state")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .map(|r| SetState {
            kinds: kinds_of(
                r.get("event").and_then(Value::as_str).unwrap_or_default(),
                None,
            ),
            state: r.get("state").and_then(Value::as_i64),
            new_state: r.get("new_state").and_then(Value::as_i64).unwrap_or(1),
        })
        .collect();
    let _ = opt_u64(opts, "align");
    let child = ctx.entry(&image);
    let mut j = Map::new();
    j.insert("driver".into(), json!("blkdebug"));
    j.insert(
        "image".into(),
        child.map(|e| e.json.clone()).unwrap_or(Value::Null),
    );
    Ok(Opened {
        driver: Box::new(Blkdebug {
            child: Child::new(node),
            rules: Mutex::new(Rules {
                inject,
                set,
                state: 1,
            }),
        }),
        json: Value::Object(j),
        plain: None,
        children: vec![edge("image", &image)],
    })
}
