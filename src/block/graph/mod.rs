//! The node graph: named nodes, the edges between them and users
//! (exports, jobs) on top, with QEMU's naming and deletion rules.
//! Opening nodes is in `open.rs` (through the driver registry), and
//! permissions and image locks in `perms.rs`.
mod active;
mod open;
mod perms;

use std::sync::Arc;

use serde_json::{Map, Value};

use super::child::Child;
use super::node::Node;
use super::perm::Perm;

/// Something using a node from outside the graph (an export, a job, the
/// transient user of block_resize).
#[derive(Clone, Debug)]
pub struct User {
    pub id: u64,
    /// How QEMU names it in permission errors ("an unnamed block device").
    pub desc: String,
    pub perm: Perm,
    pub shared: Perm,
    /// The edge the user does I/O through, re-pointed when its node is
    /// replaced (None: the user holds the node itself and pins it).
    pub handle: Option<Arc<Child>>,
    /// An export with allow-inactive: it stays while the node is
    /// inactive, holding no permissions then.
    pub allow_inactive: bool,
}

#[derive(Clone, Debug)]
pub struct Edge {
    /// "file", "backing", or a name made at run time (a quorum's
    /// "children.N").
    pub role: std::borrow::Cow<'static, str>,
    pub child: String,
    pub perm: Perm,
    pub shared: Perm,
}

pub struct Entry {
    /// When the node got its name: QEMU lists nodes in this order (it
    /// creates and names a format node after its file and before its
    /// data file and backing node).
    pub seq: u64,
    pub name: String,
    pub node: Arc<Node>,
    /// Added by blockdev-add (not an inline child).
    pub monitor_owned: bool,
    pub children: Vec<Edge>,
    pub users: Vec<User>,
    /// The options QEMU shows in `json:{...}` filenames.
    pub json: Value,
    /// The options the node was opened with (blockdev-reopen compares
    /// against them).
    pub options: Map<String, Value>,
    /// The plain filename, when the node has one.
    pub plain_filename: Option<String>,
    /// Cumulative permissions currently applied.
    pub perm: Perm,
    pub shared: Perm,
    /// The iothread the node belongs to (QEMU's AioContext; None: the
    /// main loop). Connected nodes share one; the exports that follow
    /// their node serve there (docs/iothreads.md).
    pub iothread: Option<String>,
}

#[derive(Default)]
pub struct Graph {
    /// Creation order: children always come before their parents.
    pub entries: Vec<Entry>,
    auto_counter: u32,
    next_user: u64,
    /// Images whose backing files are being opened (loop detection).
    pub(in crate::block) chain: Vec<String>,
    next_seq: u64,
    /// Where drivers raise QMP events (BLOCK_IMAGE_CORRUPTED).
    pub events: Option<crate::events::EventSink>,
}

/// QEMU's node-name rule.
pub fn check_node_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !ok {
        return Err(format!("Invalid node-name: '{name}'"));
    }
    if name.len() >= 32 {
        return Err("Node name too long".into());
    }
    Ok(())
}

impl Graph {
    pub fn find(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.name == name)
    }

    /// Parents of `name`: (parent name, edge), newest parent first.
    pub fn parents(&self, name: &str) -> Vec<(&str, &Edge)> {
        self.entries
            .iter()
            .rev()
            .flat_map(|e| {
                e.children
                    .iter()
                    .filter(move |c| c.child == name)
                    .map(move |c| (e.name.as_str(), c))
            })
            .collect()
    }

    /// The node's name (given or generated now) and its place in QEMU's
    /// naming order, which query-named-block-nodes lists newest first.
    pub(in crate::block) fn name_now(&mut self, explicit: &Option<String>) -> (String, u64) {
        let name = explicit.clone().unwrap_or_else(|| self.auto_name());
        self.next_seq += 1;
        (name, self.next_seq)
    }

    fn auto_name(&mut self) -> String {
        // "#block" + a counter + two random digits, as QEMU names them.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("#block{}{:02}", self.auto_counter, (nanos / 1000) % 100);
        self.auto_counter += 1;
        name
    }

    /// blockdev-del with QEMU's checks, in QEMU's order. Returns the
    /// nodes that left the graph (the node and inline children).
    pub fn del(&mut self, name: &str) -> Result<Vec<Arc<Node>>, String> {
        let Some(i) = self.index(name) else {
            return Err(format!("Failed to find node with node-name='{name}'"));
        };
        if !self.entries[i].users.is_empty() {
            return Err(format!("Node {name} is in use"));
        }
        // A backing node is blocked for deletion (QEMU's op blocker).
        if let Some((parent, _)) = self
            .parents(name)
            .into_iter()
            .find(|(_, c)| c.role == "backing")
        {
            return Err(format!(
                "Node '{name}' is busy: node is used as backing hd of '{parent}'"
            ));
        }
        if !self.entries[i].monitor_owned {
            return Err(format!("Node {name} is not owned by the monitor"));
        }
        if !self.parents(name).is_empty() {
            return Err(format!("Block device {name} is in use"));
        }
        let removed = self.entries.remove(i);
        let mut gone = vec![removed.node.clone()];
        // Inline children go with their parent once nothing else uses them.
        for c in &removed.children {
            if let Some(ci) = self.index(&c.child) {
                let e = &self.entries[ci];
                if !e.monitor_owned && e.users.is_empty() && self.parents(&c.child).is_empty() {
                    self.entries[ci].monitor_owned = true;
                    gone.extend(self.del(&c.child).unwrap_or_default());
                }
            }
        }
        let _ = self.refresh_perms();
        Ok(gone)
    }

    /// Attaches a user (an export, a job) asking for `perm` and sharing
    /// `shared`. Returns its id for [`Graph::remove_user`].
    pub fn add_user(
        &mut self,
        node: &str,
        desc: &str,
        perm: Perm,
        shared: Perm,
    ) -> Result<u64, String> {
        self.add_user_on(node, desc, perm, shared, None)
    }

    /// [`Graph::add_user`] for a user that does I/O through `handle`,
    /// which follows the node when it is replaced.
    pub fn add_user_on(
        &mut self,
        node: &str,
        desc: &str,
        perm: Perm,
        shared: Perm,
        handle: Option<Arc<Child>>,
    ) -> Result<u64, String> {
        let id = self.next_user;
        self.next_user += 1;
        let i = self
            .index(node)
            .ok_or_else(|| format!("Cannot find device='' nor node-name='{node}'"))?;
        self.entries[i].users.insert(
            0,
            User {
                id,
                desc: desc.to_string(),
                perm,
                shared,
                handle,
                allow_inactive: false,
            },
        );
        if let Err(e) = self.refresh_perms() {
            self.entries[i].users.retain(|u| u.id != id);
            let _ = self.refresh_perms();
            return Err(e);
        }
        Ok(id)
    }

    pub fn remove_user(&mut self, id: u64) {
        for e in &mut self.entries {
            e.users.retain(|u| u.id != id);
        }
        let _ = self.refresh_perms();
    }

    /// Nodes in QEMU's naming order, oldest first.
    pub fn in_name_order(&self) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = self.entries.iter().collect();
        v.sort_by_key(|e| e.seq);
        v
    }

    /// The node a child edge of `e` with this role points at.
    pub fn child_of(&self, e: &Entry, role: &str) -> Option<&Entry> {
        e.children
            .iter()
            .find(|c| c.role == role)
            .and_then(|c| self.find(&c.child))
    }

    /// The iothread a node opened above `children` joins: theirs, as
    /// QEMU moves a new parent into its child's AioContext.
    pub(in crate::block) fn iothread_of_children(&self, children: &[Edge]) -> Option<String> {
        children
            .iter()
            .find_map(|c| self.find(&c.child).and_then(|e| e.iothread.clone()))
    }

    /// Every node connected to `name` through edges, either way (the
    /// nodes that share its iothread), `name` first.
    pub fn connected(&self, name: &str) -> Vec<String> {
        let mut seen = vec![name.to_string()];
        let mut i = 0;
        while let Some(n) = seen.get(i).cloned() {
            i += 1;
            let mut next: Vec<String> = self
                .parents(&n)
                .into_iter()
                .map(|(p, _)| p.to_string())
                .collect();
            if let Some(e) = self.find(&n) {
                next.extend(e.children.iter().map(|c| c.child.clone()));
            }
            for m in next {
                if !seen.contains(&m) {
                    seen.push(m);
                }
            }
        }
        seen
    }

    /// Puts every node in `names` in `iothread`.
    pub fn set_iothread(&mut self, names: &[String], iothread: Option<&str>) {
        for e in &mut self.entries {
            if names.contains(&e.name) {
                e.iothread = iothread.map(str::to_string);
            }
        }
    }

    /// The filename QEMU shows: the plain one, or `json:{...}` options.
    pub fn filename(&self, e: &Entry) -> String {
        match &e.plain_filename {
            Some(f) => f.clone(),
            None => format!("json:{}", crate::qmp::json::to_qmp_string(&e.json, false)),
        }
    }
}
