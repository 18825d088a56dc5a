//! blockdev-reopen: new options for open nodes, as QSD allows them:
//! read-only on and off (the image's descriptor and locks follow),
//! discard, detect-zeroes, the backing node (another, or none), the
//! `file` child of a node that holds it on a re-pointable edge (raw and
//! the throttle filter: inserting or removing a filter) and a throttle
//! node's group. Every
//! listed node is checked before any changes, and a failure while
//! applying puts back what was changed: all or nothing.
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::ControlState;
use crate::block::node::{DetectZeroes, Node};
use crate::block::throttle::ThrottleGroup;
use crate::objects::Object;
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

/// Options blockdev-reopen may change (or that only tune caches).
const CHANGEABLE: &[&str] = &[
    "node-name",
    "driver",
    "read-only",
    "discard",
    "detect-zeroes",
    "backing",
    "file",
    "throttle-group",
    "cache",
    "auto-read-only",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-size",
    "cache-clean-interval",
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "overlap-check",
];

/// What one entry asks for, checked.
struct Plan {
    name: String,
    node: Arc<Node>,
    read_only: bool,
    discard_unmap: bool,
    detect_zeroes: DetectZeroes,
    /// The file and data-file children, which follow read-only.
    children: Vec<Arc<Node>>,
    /// Some(new backing node name or none) for a node that has one.
    backing: Option<Option<String>>,
    /// A new `file` child, for a node whose file edge can be re-pointed.
    file: Option<String>,
    /// A throttle node's new group.
    group: Option<Arc<ThrottleGroup>>,
}

fn changed(opt: &str) -> QmpError {
    QmpError::generic(format!("Cannot change the option '{opt}'"))
}

impl ControlState {
    fn plan_reopen(&self, o: &Map<String, Value>) -> QmpResult<Plan> {
        let Some(name) = o.get("node-name").and_then(Value::as_str) else {
            return Err(QmpError::generic("node-name not specified"));
        };
        let Some(e) = self.block.find(name) else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        let backing = match (o.get("backing"), e.node.driver.child_slot("backing")) {
            (_, None) => None,
            (None, Some(slot)) => {
                if slot.get().is_some() {
                    return Err(QmpError::generic(format!(
                        "backing is missing for '{name}'"
                    )));
                }
                None
            }
            (Some(Value::Null), Some(_)) => Some(None),
            (Some(Value::String(b)), Some(_)) => {
                if b == name {
                    return Err(QmpError::generic(format!(
                        "Making '{name}' a backing child of '{name}' would create a cycle"
                    )));
                }
                if self.block.find(b).is_none() {
                    return Err(QmpError::generic(format!(
                        "Cannot find device='' nor node-name='{b}'"
                    )));
                }
                Some(Some(b.clone()))
            }
            (Some(_), Some(_)) => return Err(changed("backing.driver")),
        };
        if o.get("driver") != e.options.get("driver") {
            return Err(changed("driver"));
        }
        let mut keys: Vec<&String> = o.keys().chain(e.options.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            if !CHANGEABLE.contains(&k.as_str()) && o.get(k) != e.options.get(k) {
                return Err(changed(k));
            }
        }
        // The file child: the same node, by name or by its options, or
        // another node where the driver's edge can be re-pointed.
        let file = e.children.iter().find(|c| c.role == "file");
        let mut new_file = None;
        match (o.get("file"), file) {
            (Some(Value::String(r)), Some(f)) if *r != f.child => {
                let Some(target) = self.block.find(r) else {
                    return Err(QmpError::generic(format!(
                        "Cannot find device='' nor node-name='{r}'"
                    )));
                };
                if e.node.driver.child_slot("file").is_none() {
                    return Err(changed("file"));
                }
                if self.block.reaches(r, name) {
                    return Err(QmpError::generic(format!(
                        "Making '{r}' a file child of '{name}' would create a cycle"
                    )));
                }
                let old_size = self.block.find(&f.child).map(|c| c.node.size());
                if old_size != Some(target.node.size()) {
                    // rsd's drivers size themselves at open.
                    return Err(QmpError::generic(format!(
                        "rsd can only swap '{name}''s file for a node of the same size"
                    )));
                }
                new_file = Some(r.clone());
            }
            (Some(Value::Object(fo)), Some(f)) => {
                let cur = self.block.find(&f.child).map(|c| &c.options);
                for k in ["driver", "filename"] {
                    if fo.get(k) != cur.and_then(|c| c.get(k)) {
                        return Err(changed(k));
                    }
                }
                if let Some(n) = fo.get("node-name") {
                    if n.as_str() != Some(f.child.as_str()) {
                        return Err(changed("node-name"));
                    }
                }
            }
            _ => {}
        }
        let read_only = o.get("read-only").and_then(Value::as_bool).unwrap_or(false);
        let discard_unmap = o.get("discard").and_then(Value::as_str) == Some("unmap");
        let detect_zeroes = match o.get("detect-zeroes").and_then(Value::as_str) {
            Some("on") => DetectZeroes::On,
            Some("unmap") => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        };
        if detect_zeroes == DetectZeroes::Unmap && !discard_unmap {
            return Err(QmpError::generic(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
            ));
        }
        if read_only && (e.perm.contains(crate::block::perm::Perm::WRITE)) {
            return Err(QmpError::generic(format!(
                "Read-only block node '{name}' cannot support read-write users"
            )));
        }
        let group = match (e.node.driver.throttle(), o.get("throttle-group")) {
            (Some(_), Some(Value::String(g))) => match self.objects.get(g) {
                Some(Object::ThrottleGroup(tg)) => Some(tg.clone()),
                _ => {
                    return Err(QmpError::generic(format!(
                        "Throttle group '{g}' does not exist"
                    )))
                }
            },
            _ => None,
        };
        let children = e
            .children
            .iter()
            .filter(|c| c.role == "file" || c.role == "data-file")
            .filter(|c| new_file.is_none() || c.role != "file")
            .filter_map(|c| self.block.find(&c.child).map(|x| x.node.clone()))
            .collect();
        Ok(Plan {
            name: name.to_string(),
            node: e.node.clone(),
            read_only,
            discard_unmap,
            detect_zeroes,
            children,
            backing,
            file: new_file,
            group,
        })
    }

    pub(super) async fn blockdev_reopen(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let list = args
            .get("options")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if list.is_empty() {
            // QSD aborts here (an assertion); rsd refuses.
            return Err(QmpError::generic("No node to reopen"));
        }
        let mut plans: Vec<Plan> = Vec::new();
        for o in list.iter().filter_map(Value::as_object) {
            let p = self.plan_reopen(o)?;
            // The same node twice: the last entry wins.
            plans.retain(|q| q.name != p.name);
            plans.push(p);
        }
        // Drain every listed node for the switch, as QEMU drains its
        // reopen queue: requests in flight finish with the old options.
        let mut drained = Vec::new();
        for p in &plans {
            drained.push(self.block.drain(&p.name).await);
        }
        // Apply, remembering how to undo.
        type Undo = (Arc<Node>, bool, bool, DetectZeroes);
        let mut undo: Vec<Undo> = Vec::new();
        let mut failed = None;
        // Nodes whose read-only state changed: their bitmaps follow once
        // every node (the files too) has switched.
        let mut switched: Vec<(Arc<Node>, bool)> = Vec::new();
        for p in &plans {
            let mut nodes = vec![p.node.clone()];
            nodes.extend(p.children.iter().cloned());
            for n in nodes {
                undo.push((
                    n.clone(),
                    n.read_only(),
                    n.discard_unmap(),
                    n.detect_zeroes(),
                ));
                // Cached metadata reaches the file while it is writable.
                if p.read_only && !n.read_only() {
                    let _ = n.close().await;
                }
                let was_ro = n.read_only();
                if let Err(e) = n.driver.set_read_only(p.read_only) {
                    failed = Some(e);
                    break;
                }
                if was_ro != p.read_only {
                    switched.push((n.clone(), p.read_only));
                }
                let (discard, dz) = if Arc::ptr_eq(&n, &p.node) {
                    (p.discard_unmap, p.detect_zeroes)
                } else {
                    (n.discard_unmap(), n.detect_zeroes())
                };
                n.set_live(p.read_only, discard, dz);
            }
            if failed.is_some() {
                break;
            }
        }
        let failed = match failed {
            Some(e) => Some(e),
            None => self.block.refresh_perms().err(),
        };
        if let Some(e) = failed {
            for (n, ro, discard, dz) in undo.into_iter().rev() {
                let _ = n.driver.set_read_only(ro);
                n.set_live(ro, discard, dz);
            }
            let _ = self.block.refresh_perms();
            return Err(QmpError::hinted(e));
        }
        for (n, ro) in switched {
            // Best effort: the switch itself is done.
            let _ = n.bitmaps_follow_read_only(ro).await;
        }
        // Backing changes last: they cannot fail once checked.
        for p in &plans {
            let Some(new) = &p.backing else {
                continue;
            };
            let Some(slot) = p.node.driver.child_slot("backing") else {
                continue;
            };
            let old = self
                .block
                .find(&p.name)
                .and_then(|e| e.children.iter().find(|c| c.role == "backing"))
                .map(|c| c.child.clone());
            if old.as_deref() == new.as_deref() {
                continue;
            }
            let node = new
                .as_deref()
                .and_then(|b| self.block.find(b))
                .map(|e| e.node.clone());
            {
                let _q = slot.quiesce().await;
                slot.set(node);
            }
            self.block.set_backing_edge(&p.name, new.as_deref());
            if let Some(o) = old {
                self.block.release_unused(&o);
            }
            self.block.refresh_backing_identity(&p.name);
        }
        if let Err(e) = self.swap_files(&plans).await {
            drop(drained);
            return Err(e);
        }
        for p in &plans {
            if let (Some(g), Some(t)) = (&p.group, p.node.driver.throttle()) {
                t.set_group(g, &p.name);
                self.block
                    .set_option(&p.name, "throttle-group", json!(g.name));
            }
        }
        let _ = self.block.refresh_perms();
        drop(drained);
        Ok(json!({}))
    }

    /// Re-points the `file` edges the plans change (the node is drained),
    /// checking permissions over the new graph; all are put back if they
    /// conflict.
    async fn swap_files(&mut self, plans: &[Plan]) -> QmpResult<()> {
        let mut undo: Vec<(String, String)> = Vec::new();
        for p in plans {
            let (Some(new), Some(slot)) = (&p.file, p.node.driver.child_slot("file")) else {
                continue;
            };
            let Some(node) = self.block.find(new).map(|e| e.node.clone()) else {
                continue;
            };
            let Some(old) = self
                .block
                .find(&p.name)
                .and_then(|e| e.children.iter().find(|c| c.role == "file"))
                .map(|c| c.child.clone())
            else {
                continue;
            };
            {
                let _q = slot.quiesce().await;
                slot.set(Some(node));
            }
            self.block.set_file_edge(&p.name, new);
            undo.push((p.name.clone(), old));
        }
        if let Err(e) = self.block.refresh_perms() {
            for (parent, old) in undo.into_iter().rev() {
                let node = self.block.find(&old).map(|e| e.node.clone());
                let slot = self
                    .block
                    .find(&parent)
                    .and_then(|e| e.node.driver.child_slot("file"));
                if let (Some(n), Some(slot)) = (node, slot) {
                    let _q = slot.quiesce().await;
                    slot.set(Some(n));
                }
                self.block.set_file_edge(&parent, &old);
            }
            let _ = self.block.refresh_perms();
            return Err(QmpError::hinted(e));
        }
        for (_, old) in undo {
            self.block.release_unused(&old);
        }
        Ok(())
    }

    /// Switches a node and its file children to read-only where the
    /// drivers can (a snapshot's base, as QEMU leaves it); best effort.
    pub(super) async fn make_read_only(&mut self, name: &str) {
        let Some(e) = self.block.find(name) else {
            return;
        };
        let mut nodes = vec![e.node.clone()];
        nodes.extend(
            e.children
                .iter()
                .filter(|c| c.role == "file" || c.role == "data-file")
                .filter_map(|c| self.block.find(&c.child).map(|x| x.node.clone())),
        );
        for n in nodes {
            if !n.read_only() {
                let _ = n.close().await;
            }
            if n.driver.set_read_only(true).is_ok() {
                n.set_live(true, n.discard_unmap(), n.detect_zeroes());
                let _ = n.bitmaps_follow_read_only(true).await;
            }
        }
        let _ = self.block.refresh_perms();
    }
}
