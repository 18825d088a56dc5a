//! block-commit: QEMU's checks in its order, then either an active
//! commit (the top is the device itself: a mirror into the base, READY,
//! and on completion the device's parents move onto the base) or an
//! intermediate one (the layers from the top down are copied into the
//! base, then the top's overlay names the base in its header and graph).
use serde_json::{json, Map, Value};

use super::mirror::{MirrorPlan, JOB_USER};
use super::stream::ChainEnd;
use super::{arg_str, ControlMsg, ControlState};
use crate::block::perm::Perm;
use crate::jobs::commit::{self, Commit};
use crate::jobs::mirror::SyncMode;
use crate::jobs::OnError;
use crate::qapi::error::QmpResult;
use crate::qapi::{ErrorClass, QmpError};

impl ControlState {
    /// Lets a node (and its file children) be written, as QEMU reopens a
    /// commit's base read-write.
    fn make_writable(&mut self, name: &str) -> Result<(), String> {
        let Some(e) = self.block.find(name) else {
            return Ok(());
        };
        let mut nodes = vec![e.node.clone()];
        nodes.extend(
            e.children
                .iter()
                .filter(|c| c.role == "file" || c.role == "data-file")
                .filter_map(|c| self.block.find(&c.child).map(|x| x.node.clone())),
        );
        for n in nodes.iter().rev() {
            if n.read_only() {
                n.driver.set_read_only(false)?;
                n.set_live(false, n.discard_unmap(), n.detect_zeroes());
            }
        }
        self.block.refresh_perms()
    }

    pub(super) async fn block_commit(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let err = |m: String| Err(QmpError::generic(m));
        let device = arg_str(args, "device").to_string();
        if self.block.find(&device).is_none() {
            return Err(QmpError::with_class(
                ErrorClass::DeviceNotFound,
                format!("Device '{device}' not found"),
            ));
        }
        if !self.block.parents(&device).is_empty() {
            return err("Need a root block node".into());
        }
        let opt = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_string);
        if opt("base").is_some() && opt("base-node").is_some() {
            return err("'base-node' and 'base' are mutually exclusive".into());
        }
        if opt("top").is_some() && opt("top-node").is_some() {
            return err("'top-node' and 'top' are mutually exclusive".into());
        }
        // The chain from the device down: [device, backing, ...].
        let mut chain = vec![device.clone()];
        chain.extend(self.chain_below(&device));
        let by_file = |st: &Self, f: &str| {
            chain
                .iter()
                .find(|c| st.block.find(c).is_some_and(|e| st.block.filename(e) == f))
                .cloned()
        };
        let top = match (opt("top-node"), opt("top")) {
            (Some(t), _) => {
                if self.block.find(&t).is_none() {
                    return err(format!("Cannot find device='' nor node-name='{t}'"));
                }
                t
            }
            (None, Some(f)) => match by_file(self, &f) {
                Some(t) => t,
                None => return err(format!("Top image file {f} not found")),
            },
            (None, None) => device.clone(),
        };
        let Some(top_at) = chain.iter().position(|c| *c == top) else {
            return err(format!("'{top}' is not in this backing file chain"));
        };
        let base = match (opt("base-node"), opt("base")) {
            (Some(b), _) => {
                if self.block.find(&b).is_none() {
                    return err(format!("Cannot find device='' nor node-name='{b}'"));
                }
                b
            }
            (None, Some(f)) => match by_file(self, &f) {
                Some(b) => b,
                None => return err(format!("Can't find '{f}' in the backing chain")),
            },
            (None, None) => match chain.last() {
                Some(b) if chain.len() > 1 => b.clone(),
                _ => return err(format!("'{device}' has no backing file")),
            },
        };
        if base == top {
            return err("cannot commit an image into itself".into());
        }
        let Some(base_at) = chain.iter().position(|c| *c == base) else {
            return err(format!("'{base}' is not in this backing file chain"));
        };
        if base_at < top_at {
            return err(format!("'{base}' is not in this backing file chain"));
        }
        if let Some(m) = chain[top_at..=base_at].iter().find_map(|n| self.busy(n)) {
            return err(m);
        }
        let (job_id, speed) = self.job_id_and_speed(args)?;
        let base_was_ro = self.block.find(&base).is_some_and(|e| e.node.read_only());
        self.make_writable(&base).map_err(QmpError::generic)?;
        let on_error = OnError::parse(args.get("on-error").and_then(Value::as_str));
        let flag = |k: &str| args.get(k).and_then(Value::as_bool).unwrap_or(true);
        // Depths as block status counts them from the top (the top is 1).
        let base_depth = (base_at - top_at + 1) as u32;
        if top_at == 0 {
            let granularity = self
                .block
                .find(&base)
                .and_then(|e| e.node.driver.cluster_size())
                .map_or(65536, |c| c.clamp(4096, 65536));
            let plan = MirrorPlan {
                job_id,
                kind: "commit",
                device,
                target_name: base,
                sync: SyncMode::Above(base_depth),
                granularity,
                buf_size: 16 << 20,
                unmap: false,
                on_source_error: on_error,
                on_target_error: on_error,
                filter_name: opt("filter-node-name"),
                speed,
                auto_finalize: flag("auto-finalize"),
                auto_dismiss: flag("auto-dismiss"),
                write_blocking: false,
                new_target: false,
                restore_read_only: base_was_ro,
            };
            self.start_mirror(plan).await?;
            return Ok(json!({}));
        }
        // Intermediate: the overlay of the top keeps reading through the
        // chain while the base fills; the layers are the job's.
        let overlay = chain[top_at - 1].clone();
        let (Some(top_node), Some(base_node)) = (
            self.block.find(&top).map(|e| e.node.clone()),
            self.block.find(&base).map(|e| e.node.clone()),
        ) else {
            return err(format!("Cannot find device='' nor node-name='{top}'"));
        };
        let desc = format!("{JOB_USER}commit");
        let mut users = Vec::new();
        for (i, n) in chain[top_at..=base_at].iter().enumerate() {
            let perm = if top_at + i == base_at {
                Perm::WRITE.union(Perm::CONSISTENT_READ)
            } else {
                Perm::CONSISTENT_READ
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
        let c = Commit {
            top: top_node,
            base: base_node,
            base_depth,
            on_error,
            bufs: crate::block::buffers::Buffers::new(crate::jobs::commit::CHUNK as usize),
        };
        let end = ChainEnd {
            node: overlay,
            base: Some(base),
            backing_file: opt("backing-file"),
            mask_protocol: args
                .get("backing-mask-protocol")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            hook: None,
            users,
        };
        let control = self.myself.clone();
        let on_end: crate::jobs::OnEnd = Box::new(move |ok| {
            let _ = control.cast(ControlMsg::ChainJobEnded(Box::new(end), ok));
        });
        self.start_job(
            &job_id,
            "commit",
            flag("auto-finalize"),
            flag("auto-dismiss"),
            Some((false, speed)),
            commit::start(c),
            on_end,
        )
        .await?;
        Ok(json!({}))
    }
}
