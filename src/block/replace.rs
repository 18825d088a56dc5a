//! Replacing a node under its parents (QEMU's bdrv_replace_node): every
//! user and parent edge of the old node is moved to the new one, the
//! permissions are checked before anything moves, and the I/O switches
//! over atomically: the parents' edges are quiesced (requests in flight
//! finish on the old node, new ones wait), re-pointed, and released.
use std::sync::Arc;

use super::child::Child;
use super::graph::Graph;

/// What a replacement changed in the graph, to undo it on a conflict.
struct Moved {
    order: Vec<String>,
    users: Vec<u64>,
    /// (parent, index of the edge in its children).
    edges: Vec<(String, usize)>,
}

impl Graph {
    /// Moves every parent of `old` (except `new` itself, which may keep
    /// `old` as its backing) to `new`. On a permission conflict, or a
    /// parent that cannot be re-pointed, nothing changes.
    pub async fn replace_node(&mut self, old: &str, new: &str) -> Result<(), String> {
        let new_node = self
            .find(new)
            .map(|e| e.node.clone())
            .ok_or_else(|| format!("Cannot find device='{new}' nor node-name='{new}'"))?;
        if self.find(old).is_none() {
            return Err(format!("Cannot find device='{old}' nor node-name='{old}'"));
        }
        let handles = self.parent_handles(old, new)?;
        let moved = self.move_parents(old, new);
        if let Err(e) = self.refresh_perms() {
            self.undo(old, new, moved);
            let _ = self.refresh_perms();
            return Err(e);
        }
        // Quiesce every edge first, so the switch is one step for all.
        let mut held = Vec::new();
        for h in &handles {
            held.push(h.quiesce().await);
        }
        for h in &handles {
            h.set(Some(new_node.clone()));
        }
        drop(held);
        Ok(())
    }

    /// The re-pointable edges of every parent of `old` but `new`.
    fn parent_handles(&self, old: &str, new: &str) -> Result<Vec<Arc<Child>>, String> {
        let mut out = Vec::new();
        let Some(entry) = self.find(old) else {
            return Ok(out);
        };
        for u in &entry.users {
            match &u.handle {
                Some(h) => out.push(h.clone()),
                None => return Err(format!("Node '{old}' is busy: it is used by {}", u.desc)),
            }
        }
        for (parent, edge) in self.parents(old) {
            if parent == new {
                continue;
            }
            let slot = self
                .find(parent)
                .and_then(|p| p.node.driver.child_slot(&edge.role));
            match slot {
                Some(h) => out.push(h),
                None => {
                    return Err(format!(
                        "Cannot change the '{}' child of '{parent}'",
                        edge.role
                    ))
                }
            }
        }
        Ok(out)
    }

    fn move_parents(&mut self, old: &str, new: &str) -> Moved {
        let order = self.entries.iter().map(|e| e.name.clone()).collect();
        let mut moved = Moved {
            order,
            users: Vec::new(),
            edges: Vec::new(),
        };
        let users = self
            .entries
            .iter_mut()
            .find(|e| e.name == old)
            .map(|e| std::mem::take(&mut e.users))
            .unwrap_or_default();
        moved.users = users.iter().map(|u| u.id).collect();
        if let Some(e) = self.entries.iter_mut().find(|e| e.name == new) {
            let mut all = users;
            all.append(&mut e.users);
            e.users = all;
        }
        for e in self.entries.iter_mut().filter(|e| e.name != new) {
            for (k, c) in e.children.iter_mut().enumerate() {
                if c.child == old {
                    c.child = new.to_string();
                    moved.edges.push((e.name.clone(), k));
                }
            }
        }
        self.sort_children_first();
        moved
    }

    fn undo(&mut self, old: &str, new: &str, moved: Moved) {
        let users = self
            .entries
            .iter_mut()
            .find(|e| e.name == new)
            .map(|e| {
                let (back, keep) = std::mem::take(&mut e.users)
                    .into_iter()
                    .partition(|u| moved.users.contains(&u.id));
                e.users = keep;
                back
            })
            .unwrap_or_default();
        if let Some(e) = self.entries.iter_mut().find(|e| e.name == old) {
            e.users = users;
        }
        for (parent, k) in &moved.edges {
            if let Some(c) = self
                .entries
                .iter_mut()
                .find(|e| &e.name == parent)
                .and_then(|e| e.children.get_mut(*k))
            {
                c.child = old.to_string();
            }
        }
        let pos = |n: &str| moved.order.iter().position(|o| o == n);
        self.entries.sort_by_key(|e| pos(&e.name));
    }

    /// Keeps the graph's invariant that children come before their
    /// parents (permissions are computed parents first), after edges
    /// moved; otherwise the order stays as it was.
    pub(super) fn sort_children_first(&mut self) {
        let names: Vec<String> = self.entries.iter().map(|e| e.name.clone()).collect();
        let mut placed: Vec<String> = Vec::new();
        fn visit(g: &Graph, name: &str, placed: &mut Vec<String>, depth: usize) {
            if placed.iter().any(|p| p == name) || depth > 256 {
                return;
            }
            if let Some(e) = g.find(name) {
                for c in &e.children {
                    visit(g, &c.child, placed, depth + 1);
                }
            }
            placed.push(name.to_string());
        }
        for n in &names {
            visit(self, n, &mut placed, 0);
        }
        let pos = |n: &str| placed.iter().position(|p| p == n);
        self.entries.sort_by_key(|e| pos(&e.name));
    }
}

impl Graph {
    /// Records `base` as `overlay`'s backing node (blockdev-snapshot: the
    /// driver's edge is pointed by the caller). Permissions are applied
    /// by the replacement that follows.
    pub fn attach_backing(&mut self, overlay: &str, base: &str) -> Result<(), String> {
        for n in [base, overlay] {
            if self.find(n).is_none() {
                return Err(format!("Cannot find device='{n}' nor node-name='{n}'"));
            }
        }
        self.set_backing_edge(overlay, Some(base));
        Ok(())
    }

    /// Undoes [`Graph::attach_backing`].
    pub fn detach_backing(&mut self, overlay: &str) {
        self.set_backing_edge(overlay, None);
        let _ = self.refresh_perms();
    }
}

impl Graph {
    /// `name` (a file an image's header names) resolved against the
    /// directory of the image's file, as QEMU resolves backing names.
    pub fn resolve_in_image_dir(&self, image: &str, name: &str) -> String {
        let dir = self
            .find(image)
            .and_then(|e| e.children.iter().find(|c| c.role == "file"))
            .and_then(|c| self.find(&c.child))
            .and_then(|f| f.plain_filename.clone())
            .and_then(|f| std::path::Path::new(&f).parent().map(|d| d.to_path_buf()));
        match dir {
            Some(d) if !name.starts_with('/') && !d.as_os_str().is_empty() => {
                d.join(name).to_string_lossy().into_owned()
            }
            _ => name.to_string(),
        }
    }

    /// Recomputes a format node's filename after its backing changed: as
    /// QEMU, a backing node other than the one its header names (or none
    /// where it names one) is part of its identity, so its filename
    /// becomes `json:{...}` with the backing node's options.
    pub fn refresh_backing_identity(&mut self, name: &str) {
        let Some(e) = self.find(name) else {
            return;
        };
        let header = e.node.driver.backing_file().map(|b| b.0);
        let file = e
            .children
            .iter()
            .find(|c| c.role == "file")
            .map(|c| c.child.clone());
        let backing = e
            .children
            .iter()
            .find(|c| c.role == "backing")
            .map(|c| c.child.clone());
        let file_plain = file
            .and_then(|f| self.find(&f))
            .and_then(|f| f.plain_filename.clone());
        let (bplain, bjson) = match backing.as_deref().and_then(|b| self.find(b)) {
            Some(b) => (b.plain_filename.clone(), b.json.clone()),
            None => (None, serde_json::Value::Null),
        };
        // No backing where the header names none is the plain identity too.
        let same = header == bplain && (backing.is_some() || header.is_none());
        let Some(e) = self.entries.iter_mut().find(|e| e.name == name) else {
            return;
        };
        if let Some(j) = e.json.as_object_mut() {
            if same {
                j.remove("backing");
            } else {
                j.insert("backing".into(), bjson);
            }
        }
        e.plain_filename = if same { file_plain } else { None };
    }
}

impl Graph {
    /// Removes `name` if it was opened inline (not by blockdev-add) and
    /// nothing uses it any more, then its children the same way (a
    /// backing chain dropped by blockdev-reopen goes with it, as in QEMU).
    pub fn release_unused(&mut self, name: &str) {
        let Some(e) = self.find(name) else {
            return;
        };
        if e.monitor_owned || !e.users.is_empty() || !self.parents(name).is_empty() {
            return;
        }
        let children: Vec<String> = e.children.iter().map(|c| c.child.clone()).collect();
        self.entries.retain(|e| e.name != name);
        for c in children {
            self.release_unused(&c);
        }
    }

    /// Points `parent`'s backing edge at `backing` (None: no backing),
    /// replacing the one it had. The caller re-points the driver's edge
    /// and re-applies permissions.
    pub fn set_backing_edge(&mut self, parent: &str, backing: Option<&str>) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.name == parent) {
            e.children.retain(|c| c.role != "backing");
            if let Some(b) = backing {
                e.children.push(super::graph::Edge {
                    role: "backing".into(),
                    child: b.to_string(),
                    perm: super::perm::Perm::NONE,
                    shared: super::perm::Perm::ALL,
                });
            }
        }
        self.sort_children_first();
    }
}

impl Graph {
    /// Points `parent`'s `file` edge at `file` in the graph's records
    /// (blockdev-reopen swapping a filter's or raw's child), and gives
    /// the parent its new identity: `file` in its json, and the child's
    /// plain filename if the parent had one from its old child.
    pub fn set_file_edge(&mut self, parent: &str, file: &str) {
        let (fjson, fplain) = match self.find(file) {
            Some(f) => (f.json.clone(), f.plain_filename.clone()),
            None => return,
        };
        let old_plain = self
            .find(parent)
            .and_then(|e| e.children.iter().find(|c| c.role == "file"))
            .and_then(|c| self.find(&c.child))
            .and_then(|c| c.plain_filename.clone());
        if let Some(e) = self.entries.iter_mut().find(|e| e.name == parent) {
            for c in e.children.iter_mut().filter(|c| c.role == "file") {
                c.child = file.to_string();
            }
            if let Some(j) = e.json.as_object_mut() {
                j.insert("file".into(), fjson);
            }
            if e.plain_filename.is_some() && e.plain_filename == old_plain {
                e.plain_filename = fplain.clone();
            } else if e.plain_filename.is_none() && e.node.driver.name() == "raw" {
                // raw without a window shows its file's plain name.
                if e.json.get("offset").is_none() && e.json.get("size").is_none() {
                    e.plain_filename = fplain.clone();
                }
            }
        }
        self.sort_children_first();
    }

    /// Records a changed option (blockdev-reopen) in the node's options
    /// and its json identity.
    pub fn set_option(&mut self, name: &str, key: &str, v: serde_json::Value) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.name == name) {
            e.options.insert(key.to_string(), v.clone());
            if let Some(j) = e.json.as_object_mut() {
                j.insert(key.to_string(), v);
            }
        }
    }

    /// Whether `name` is `from` or below it.
    pub fn reaches(&self, from: &str, name: &str) -> bool {
        let mut todo = vec![from.to_string()];
        let mut seen: Vec<String> = Vec::new();
        while let Some(n) = todo.pop() {
            if n == name {
                return true;
            }
            if seen.contains(&n) {
                continue;
            }
            if let Some(e) = self.find(&n) {
                todo.extend(e.children.iter().map(|c| c.child.clone()));
            }
            seen.push(n);
        }
        false
    }
}

/// A drained node: its parents' edges are quiesced (no new request
/// reaches it) and nothing is in flight on it, until this is dropped.
pub struct Drained {
    _held: Vec<super::child::Quiesced>,
}

impl Graph {
    /// Drains `name` (QEMU's bdrv_drained_begin): quiesces every edge
    /// that leads requests into it, through parents that cannot hold
    /// requests themselves (a qcow2 image's file), then waits for the
    /// requests in flight on the node and those parents.
    pub async fn drain(&self, name: &str) -> Drained {
        let mut edges: Vec<Arc<Child>> = Vec::new();
        let mut nodes = Vec::new();
        let mut todo = vec![name.to_string()];
        while let Some(n) = todo.pop() {
            let Some(e) = self.find(&n) else {
                continue;
            };
            if nodes.iter().any(|x: &Arc<super::node::Node>| x.name == n) {
                continue;
            }
            nodes.push(e.node.clone());
            edges.extend(e.users.iter().filter_map(|u| u.handle.clone()));
            for (parent, edge) in self.parents(&n) {
                match self
                    .find(parent)
                    .and_then(|p| p.node.driver.child_slot(&edge.role))
                {
                    Some(slot) => edges.push(slot),
                    None => todo.push(parent.to_string()),
                }
            }
        }
        let mut held = Vec::new();
        for e in &edges {
            held.push(e.quiesce().await);
        }
        // Parents first: their requests are what reach the node.
        for n in nodes.iter().rev() {
            n.drained().await;
        }
        Drained { _held: held }
    }
}
