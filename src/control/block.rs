//! The block-node commands: blockdev-add/del, block_resize and the
//! queries, over the node graph the control actor owns.
use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use actors::{ChildSpec, Restart};
use serde_json::{json, Map, Value};

use super::{arg_str, ControlState};
use crate::block::actor::{self as node_actor, NodeActor};
use crate::block::graph::Entry;
use crate::block::perm::Perm;
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

impl ControlState {
    /// blockdev-add and --blockdev: open the nodes, then give each new
    /// node its supervised actor.
    pub(super) async fn blockdev_add(&mut self, opts: &Map<String, Value>) -> Result<(), String> {
        let before = self.node_names();
        self.block.add(&self.objects, opts)?;
        self.start_node_actors(&before).await
    }

    pub(super) fn node_names(&self) -> BTreeSet<String> {
        self.block.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// Gives every node not in `before` its supervised actor.
    pub(super) async fn start_node_actors(
        &mut self,
        before: &BTreeSet<String>,
    ) -> Result<(), String> {
        let new: Vec<(String, std::sync::Arc<crate::block::node::Node>)> = self
            .block
            .entries
            .iter()
            .filter(|e| !before.contains(&e.name))
            .map(|e| (e.name.clone(), e.node.clone()))
            .collect();
        for (name, node) in new {
            let mut spec = ChildSpec::actor(
                node_actor::registry_name(&name),
                Restart::Permanent,
                NodeActor,
                node,
            );
            // A node actor's state is its open node, which outlives a
            // failed handler: restarting is always safe and always
            // restores it, so it is never given up (only a command makes
            // it fail, so this cannot spin).
            spec.max_restarts = usize::MAX;
            actors::supervisor::start_child(&self.ctx.supervisor, spec).await?;
        }
        Ok(())
    }

    pub(super) async fn blockdev_del(&mut self, name: &str) -> QmpResult<Value> {
        let gone = self.block.del(name).map_err(QmpError::generic)?;
        for node in gone {
            // Nothing reaches it any more; let what runs finish first.
            node.drained().await;
            let _ = node.close().await;
            actors::supervisor::stop_child_by_id(
                &self.ctx.supervisor,
                &node_actor::registry_name(&node.name),
            )
            .await;
        }
        Ok(json!({}))
    }

    pub(super) async fn block_resize(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let device = arg_str(args, "device");
        let name = arg_str(args, "node-name");
        // As QEMU: the node is looked up before the size is checked.
        let Some(entry) = self.block.find(name) else {
            return Err(QmpError::generic(format!(
                "Cannot find device='{device}' nor node-name='{name}'"
            )));
        };
        let size = args.get("size").and_then(Value::as_i64).unwrap_or(0);
        if size < 0 {
            return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
        }
        if entry.node.read_only() {
            return Err(QmpError::generic("Image is read-only"));
        }
        let name = entry.name.clone();
        let node = entry.node.clone();
        // A transient user holding the resize permission, as QEMU does.
        let user = self
            .block
            .add_user(&name, "an unnamed block device", Perm::RESIZE, Perm::ALL)
            .map_err(QmpError::hinted)?;
        let result = match node_actor::resize(&name, size as u64).await {
            Ok(r) => r.map_err(|e| QmpError::generic(e.msg)),
            Err(e) => Err(QmpError::generic(e)),
        };
        self.block.remove_user(user);
        if result.is_ok() {
            self.resized(&node);
        }
        result.map(|()| json!({}))
    }

    /// Tells the exports of a resized node: vhost-user-blk frontends get
    /// a config-change message.
    fn resized(&self, node: &Arc<crate::block::node::Node>) {
        use crate::exports::BlockExport;
        use crate::vhost_user::export::VhostUserBlkExport;
        for e in self.exports.of_type::<VhostUserBlkExport>() {
            if e.node().get().is_some_and(|n| Arc::ptr_eq(&n, node)) {
                e.config_changed();
            }
        }
    }

    /// block-set-write-threshold (0 turns it off).
    pub(super) fn set_write_threshold(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let name = arg_str(args, "node-name");
        let Some(e) = self.block.find(name) else {
            return Err(QmpError::generic(format!("Device '{name}' not found")));
        };
        let node = e.node.clone();
        let at = args
            .get("write-threshold")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        node.write_threshold
            .store(at, std::sync::atomic::Ordering::Release);
        node.hooks.remove(crate::block::threshold::HOOK);
        if at > 0 {
            let ctx = self.ctx.clone();
            node.hooks.add(Arc::new(crate::block::threshold::Threshold {
                node: name.to_string(),
                offset: node.write_threshold.clone(),
                events: Arc::new(move |n, d| ctx.events.emit(n, Some(d))),
            }));
        }
        Ok(json!({}))
    }

    /// The node below `e` that QEMU nests in its ImageInfo: the backing
    /// node, or the child a filter passes requests to.
    fn filtered<'a>(&'a self, e: &'a Entry) -> Option<&'a Entry> {
        self.block.child_of(e, "backing").or_else(|| {
            e.node
                .driver
                .is_filter()
                .then(|| {
                    // blkverify filters its `raw` child.
                    self.block
                        .child_of(e, "file")
                        .or_else(|| self.block.child_of(e, "raw"))
                })
                .flatten()
        })
    }

    /// ImageInfo of a node, with its backing chain nested as QEMU shows it.
    fn image_info(&self, e: &Entry, flat: bool) -> Map<String, Value> {
        let node = &e.node;
        let drv = node.driver.name();
        let filename = self.block.filename(e);
        let mut image = Map::new();
        image.insert("virtual-size".into(), json!(node.size()));
        image.insert("filename".into(), json!(filename));
        image.insert("format".into(), json!(drv));
        // QEMU has no allocated size for blkverify (two images).
        if drv != "blkverify" {
            image.insert(
                "actual-size".into(),
                json!(node.allocated_size().unwrap_or(0)),
            );
        }
        if node.driver.has_image_info() {
            if matches!(drv, "file" | "host_device" | "host_cdrom") {
                image.insert(
                    "format-specific".into(),
                    json!({"type": "file", "data": {}}),
                );
            }
            if let Some(fs) = node.driver.format_specific() {
                image.insert("format-specific".into(), fs);
            }
            if let Some(list) = node.driver.snapshots().filter(|l| !l.is_empty()) {
                image.insert("snapshots".into(), Value::Array(list));
            }
            if let Some(cs) = node.driver.cluster_size() {
                image.insert("cluster-size".into(), json!(cs));
            }
            image.insert("dirty-flag".into(), json!(false));
        }
        if node.driver.encrypted() {
            image.insert("encrypted".into(), json!(true));
        }
        if node.driver.is_filter() && !flat {
            if let Some(b) = self.filtered(e) {
                image.insert(
                    "backing-image".into(),
                    Value::Object(self.image_info(b, flat)),
                );
            }
        }
        if let Some((name, fmt, full)) = node.driver.backing_file() {
            image.insert("backing-filename".into(), json!(name));
            if let Some(f) = fmt {
                image.insert("backing-filename-format".into(), json!(f));
            }
            image.insert("full-backing-filename".into(), json!(full));
            match self.block.child_of(e, "backing") {
                Some(b) if !flat => {
                    image.insert(
                        "backing-image".into(),
                        Value::Object(self.image_info(b, flat)),
                    );
                }
                _ => {}
            }
        }
        image
    }

    fn device_info(&self, e: &Entry, flat: bool) -> Value {
        let node = &e.node;
        let drv = node.driver.name();
        let filename = self.block.filename(e);
        let image = self.image_info(e, flat);
        // QEMU counts the depth through the nested images, so a flat
        // query says 0.
        let mut depth = 0;
        let mut at = e;
        while let Some(b) = self.filtered(at).filter(|_| !flat) {
            depth += 1;
            at = b;
        }
        let mut info = json!({
            "iops_rd": 0, "detect_zeroes": node.detect_zeroes().as_str(), "active": node.is_active(),
            "image": image, "iops_wr": 0, "ro": node.read_only(), "node-name": e.name,
            "backing_file_depth": depth, "drv": drv, "backing_file": Value::Null, "iops": 0, "bps_wr": 0, "write_threshold": node.write_threshold.load(std::sync::atomic::Ordering::Acquire),
            "encrypted": node.driver.encrypted(), "bps": 0, "bps_rd": 0,
            "cache": {"no-flush": node.opts.cache_no_flush, "direct": node.opts.cache_direct, "writeback": true},
            "file": filename,
        });
        let mut bitmaps = node.bitmaps.infos();
        bitmaps.extend(node.driver.dirty_bitmaps());
        if !bitmaps.is_empty() {
            info["dirty-bitmaps"] = Value::Array(bitmaps);
        }
        // The backing node's own filename (QEMU refreshes it so). Its
        // place among the keys matters: QMP output follows QDict order.
        match (
            node.driver.backing_file(),
            self.block.child_of(e, "backing"),
        ) {
            (Some(_), Some(b)) => info["backing_file"] = json!(self.block.filename(b)),
            _ => {
                if let Value::Object(m) = &mut info {
                    m.shift_remove("backing_file");
                }
            }
        }
        info
    }

    /// `flat`: without the nested backing images.
    pub(super) fn query_named_block_nodes(&self, flat: bool) -> Value {
        Value::Array(
            self.block
                .in_name_order()
                .into_iter()
                .rev()
                .map(|e| self.device_info(e, flat))
                .collect(),
        )
    }

    /// QEMU numbers graph members as it first meets them: block backends
    /// (users) oldest first with their root edges, then nodes oldest
    /// first with their child edges; both lists come out newest first.
    pub(super) fn query_block_graph(&self) -> Value {
        let mut ids: Vec<String> = Vec::new();
        let mut id = |key: String| -> usize {
            match ids.iter().position(|k| *k == key) {
                Some(i) => i + 1,
                None => {
                    ids.push(key);
                    ids.len()
                }
            }
        };
        let mut nodes = Vec::new();
        let mut edges = Vec::new();
        let mut users: Vec<(&crate::block::graph::User, &str)> = self
            .block
            .entries
            .iter()
            .flat_map(|e| e.users.iter().map(move |u| (u, e.name.as_str())))
            .collect();
        users.sort_by_key(|(u, _)| u.id);
        for (u, node) in users {
            let uid = id(format!("user:{}", u.id));
            nodes.push(json!({"name": "", "type": "block-backend", "id": uid}));
            let child = id(format!("node:{node}"));
            edges.push(
                json!({"name": "root", "parent": uid, "shared-perm": u.shared.qapi_list(),
                              "perm": u.perm.qapi_list(), "child": child}),
            );
        }
        for e in self.block.in_name_order() {
            let nid = id(format!("node:{}", e.name));
            nodes.push(json!({"name": e.name, "type": "block-driver", "id": nid}));
            // QEMU keeps a node's children newest first.
            for c in e.children.iter().rev() {
                let child = id(format!("node:{}", c.child));
                edges.push(
                    json!({"name": c.role, "parent": nid, "shared-perm": c.shared.qapi_list(),
                                  "perm": c.perm.qapi_list(), "child": child}),
                );
            }
        }
        nodes.reverse();
        edges.reverse();
        json!({"edges": edges, "nodes": nodes})
    }

    fn node_stats(&self, e: &Entry) -> Value {
        let st = &e.node.stats;
        let idle = st.idle_ns();
        let mut stats = json!({
            "unmap_operations": st.unmap.ops.load(Relaxed), "unmap_merged": 0,
            "failed_zone_append_operations": 0, "flush_total_time_ns": st.flush.total_ns.load(Relaxed),
            "wr_highest_offset": st.wr_highest_offset.load(Relaxed),
            "wr_total_time_ns": st.wr.total_ns.load(Relaxed), "failed_wr_operations": st.wr.failed.load(Relaxed),
            "failed_rd_operations": st.rd.failed.load(Relaxed), "wr_merged": 0,
            "wr_bytes": st.wr.bytes.load(Relaxed), "timed_stats": [],
            "failed_unmap_operations": st.unmap.failed.load(Relaxed), "zone_append_merged": 0,
            "failed_flush_operations": st.flush.failed.load(Relaxed), "account_invalid": true,
            "rd_total_time_ns": st.rd.total_ns.load(Relaxed),
            "invalid_unmap_operations": st.unmap.invalid.load(Relaxed),
            "flush_operations": st.flush.ops.load(Relaxed), "wr_operations": st.wr.ops.load(Relaxed),
            "unmap_bytes": st.unmap.bytes.load(Relaxed), "rd_merged": 0, "rd_bytes": st.rd.bytes.load(Relaxed),
            "unmap_total_time_ns": st.unmap.total_ns.load(Relaxed), "invalid_flush_operations": 0,
            "account_failed": true, "zone_append_total_time_ns": 0, "zone_append_operations": 0,
            "rd_operations": st.rd.ops.load(Relaxed), "zone_append_bytes": 0,
            "invalid_zone_append_operations": 0, "invalid_wr_operations": st.wr.invalid.load(Relaxed),
            "invalid_rd_operations": st.rd.invalid.load(Relaxed),
        });
        if let (Some(ns), Value::Object(m)) = (idle, &mut stats) {
            m.insert("idle_time_ns".into(), json!(ns));
        }
        let mut out = Map::new();
        out.insert("stats".into(), stats);
        out.insert("node-name".into(), json!(e.name));
        if matches!(e.node.driver.name(), "file" | "host_device") {
            out.insert(
                "driver-specific".into(),
                json!({"discard-bytes-ok": st.unmap.bytes.load(Relaxed) * e.node.discard_unmap() as u64,
                       "discard-nb-ok": st.unmap.ops.load(Relaxed) * e.node.discard_unmap() as u64,
                       "driver": e.node.driver.name(), "discard-nb-failed": st.unmap.failed.load(Relaxed)}),
            );
        }
        if let Some(c) = e.children.iter().find(|c| c.role == "file") {
            if let Some(child) = self.block.find(&c.child) {
                out.insert("parent".into(), self.node_stats(child));
            }
        }
        Value::Object(out)
    }

    pub(super) fn query_blockstats(&self, query_nodes: bool) -> Value {
        if !query_nodes {
            return json!([]);
        }
        Value::Array(
            self.block
                .in_name_order()
                .into_iter()
                .map(|e| self.node_stats(e))
                .collect(),
        )
    }
}
