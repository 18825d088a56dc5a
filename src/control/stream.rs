//! block-stream: QEMU's checks in its order, the job's users of the
//! chain, and, when the job succeeds, the top image pointed at the base
//! (its header first, then the graph; the layers in between go if
//! nothing else holds them).
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::mirror::JOB_USER;
use super::{arg_str, ControlMsg, ControlState};
use crate::block::perm::Perm;
use crate::block::serial::Tracker;
use crate::jobs::stream::{self, GuestWrites, Stream};
use crate::jobs::OnError;
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

/// What the control actor does when a stream or intermediate commit
/// ends: the job's users (and hook) go, and on success `node` names
/// `base` as its backing.
pub struct ChainEnd {
    /// The node whose backing changes: the streamed top, the committed
    /// top's overlay.
    pub node: String,
    pub base: Option<String>,
    /// The name to write in the header instead of the base's filename.
    pub backing_file: Option<String>,
    /// backing-mask-protocol: a protocol base is recorded as format raw.
    pub mask_protocol: bool,
    /// The guest-write hook the job put on `node`, if any.
    pub hook: Option<String>,
    pub users: Vec<u64>,
}

/// Drivers QEMU counts as protocols (they name a `protocol_name`).
const PROTOCOLS: [&str; 6] = [
    "file",
    "host_device",
    "nbd",
    "null-co",
    "null-aio",
    "blkdebug",
];

impl ControlState {
    /// The backing chain below `name`, nearest first.
    pub(super) fn chain_below(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = self.block.find(name);
        while let Some(e) = at {
            match self.block.child_of(e, "backing") {
                Some(b) if out.len() < 256 => {
                    out.push(b.name.clone());
                    at = Some(b);
                }
                _ => break,
            }
        }
        out
    }

    /// QEMU's op blocker: a node a block job holds.
    pub(super) fn busy(&self, name: &str) -> Option<String> {
        let e = self.block.find(name)?;
        e.users
            .iter()
            .find(|u| u.desc.starts_with(JOB_USER))
            .map(|u| format!("Node '{name}' is busy: {}", u.desc))
    }

    pub(super) async fn block_stream(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let err = |m: String| Err(QmpError::generic(m));
        let device = arg_str(args, "device").to_string();
        let Some(top) = self.block.find(&device).map(|e| e.node.clone()) else {
            return err(format!(
                "Cannot find device='{device}' nor node-name='{device}'"
            ));
        };
        let base_arg = args.get("base").and_then(Value::as_str);
        let base_node = args.get("base-node").and_then(Value::as_str);
        let bottom = args.get("bottom").and_then(Value::as_str);
        if base_arg.is_some() && base_node.is_some() {
            return err("'base' and 'base-node' cannot be specified at the same time".into());
        }
        if bottom.is_some() && (base_arg.is_some() || base_node.is_some()) {
            return err(
                "'bottom' and 'base' or 'base-node' cannot be specified at the same time".into(),
            );
        }
        let chain = self.chain_below(&device);
        let base: Option<String> = if let Some(b) = base_node {
            if self.block.find(b).is_none() {
                return err(format!("Cannot find device='' nor node-name='{b}'"));
            }
            if !chain.iter().any(|c| c == b) {
                return err(format!("Node '{b}' is not a backing image of '{device}'"));
            }
            Some(b.to_string())
        } else if let Some(f) = base_arg {
            let found = chain.iter().find(|c| {
                self.block
                    .find(c)
                    .is_some_and(|e| self.block.filename(e) == f)
            });
            match found {
                Some(c) => Some(c.clone()),
                None => return err(format!("Can't find '{f}' in the backing chain")),
            }
        } else if let Some(b) = bottom {
            if self.block.find(b).is_none() {
                return err(format!("Cannot find device='' nor node-name='{b}'"));
            }
            if !chain.iter().any(|c| c == b) {
                return err(format!("Node '{b}' is not a backing image of '{device}'"));
            }
            self.block
                .find(b)
                .and_then(|e| self.block.child_of(e, "backing"))
                .map(|e| e.name.clone())
        } else {
            None
        };
        // The nodes the job copies from, and the top: none may be busy.
        let mut held: Vec<String> = vec![device.clone()];
        held.extend(
            chain
                .iter()
                .take_while(|c| Some(*c) != base.as_ref())
                .cloned(),
        );
        if let Some(m) = held.iter().find_map(|n| self.busy(n)) {
            return err(m);
        }
        let (job_id, speed) = self.job_id_and_speed(args)?;
        if top.read_only() {
            self.stillborn_job(&job_id);
            return err("Block node is read-only".into());
        }
        // The base's depth as block status counts it (the top is 1).
        let base_depth = base
            .as_ref()
            .and_then(|b| chain.iter().position(|c| c == b))
            .map(|i| i as u32 + 2);
        let desc = format!("{JOB_USER}stream");
        let mut users = Vec::new();
        for (i, n) in held.iter().enumerate() {
            let perm = if i == 0 {
                Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED)
            } else {
                Perm::NONE
            };
            match self.block.add_user(n, &desc, perm, Perm::ALL) {
                Ok(u) => users.push(u),
                Err(e) => {
                    for u in users {
                        self.block.remove_user(u);
                    }
                    return err(e);
                }
            }
        }
        let tracker = Arc::new(Tracker::default());
        let hook = format!("stream/{job_id}");
        top.hooks.add(Arc::new(GuestWrites {
            name: hook.clone(),
            tracker: tracker.clone(),
        }));
        let s = Stream {
            top,
            base_depth,
            tracker,
            on_error: OnError::parse(args.get("on-error").and_then(Value::as_str)),
            bufs: crate::block::buffers::Buffers::new(crate::jobs::stream::CHUNK as usize),
        };
        let end = ChainEnd {
            node: device,
            base,
            backing_file: args
                .get("backing-file")
                .and_then(Value::as_str)
                .map(str::to_string),
            mask_protocol: args
                .get("backing-mask-protocol")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            hook: Some(hook),
            users,
        };
        let control = self.myself.clone();
        let on_end: crate::jobs::OnEnd = Box::new(move |ok| {
            let _ = control.cast(ControlMsg::ChainJobEnded(Box::new(end), ok));
        });
        let flag = |k: &str| args.get(k).and_then(Value::as_bool).unwrap_or(true);
        self.start_job(
            &job_id,
            "stream",
            flag("auto-finalize"),
            flag("auto-dismiss"),
            Some((false, speed)),
            stream::start(s),
            on_end,
        )
        .await?;
        Ok(json!({}))
    }

    /// After a stream or intermediate commit: the hook and users go; on
    /// success the node names the base (header, edge, graph).
    pub(super) async fn chain_job_ended(&mut self, end: ChainEnd, ok: bool) {
        if let (Some(h), Some(e)) = (&end.hook, self.block.find(&end.node)) {
            e.node.hooks.remove(h);
        }
        for u in &end.users {
            self.block.remove_user(*u);
        }
        if !ok {
            return;
        }
        let r = self
            .set_backing(
                &end.node,
                end.base.as_deref(),
                end.backing_file.as_deref(),
                end.mask_protocol,
            )
            .await;
        if let Err(e) = r {
            tracing::warn!(node = %end.node, error = %e, "backing not changed after the job");
        }
    }

    /// Points `top` at `base` (None: no backing): the header first (the
    /// base's filename, or `name` as given; its driver as the backing
    /// format, "raw" for a protocol driver when `mask_protocol`), then the
    /// driver's edge and the graph; the old backing chain goes if nothing
    /// holds it.
    pub(super) async fn set_backing(
        &mut self,
        top: &str,
        base: Option<&str>,
        name: Option<&str>,
        mask_protocol: bool,
    ) -> Result<(), String> {
        let Some(te) = self.block.find(top) else {
            return Err(format!("Cannot find node '{top}'"));
        };
        let node = te.node.clone();
        let old = self.block.child_of(te, "backing").map(|e| e.name.clone());
        let (hdr, fmt, base_node) = match base.and_then(|b| self.block.find(b)) {
            Some(b) => (
                name.map(str::to_string)
                    .unwrap_or_else(|| self.block.filename(b)),
                Some(match b.node.driver.name() {
                    p if mask_protocol && PROTOCOLS.contains(&p) => "raw".to_string(),
                    f => f.to_string(),
                }),
                Some(b.node.clone()),
            ),
            None => (String::new(), None, None),
        };
        let full = self.block.resolve_in_image_dir(top, &hdr);
        node.change_backing(&hdr, fmt.as_deref(), full)
            .await
            .map_err(|e| e.msg)?;
        if let Some(slot) = node.driver.child_slot("backing") {
            let held = slot.quiesce().await;
            slot.set(base_node);
            drop(held);
        }
        self.block.set_backing_edge(top, base);
        if let Some(o) = old {
            self.block.release_unused(&o);
        }
        self.block.refresh_backing_identity(top);
        let _ = self.block.refresh_perms();
        Ok(())
    }
}
