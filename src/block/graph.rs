//! The node graph: named nodes, the edges between them, the permissions
//! each edge asks for, and users (exports, jobs) on top. It opens nodes
//! from validated `BlockdevOptions`, keeps QEMU's naming and deletion
//! rules, and turns permissions into image locks.
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::child::Child;
use super::file::{FileDriver, FileOptions};
use super::node::{CommonOptions, DetectZeroes, Node};
use super::null::{NullDriver, DEFAULT_SIZE};
use super::perm::Perm;
use super::qcow2::{self, Qcow2};
use super::raw::RawDriver;
use super::wait::wait;

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
}

#[derive(Clone, Debug)]
pub struct Edge {
    pub role: &'static str,
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
}

#[derive(Default)]
pub struct Graph {
    /// Creation order: children always come before their parents.
    pub entries: Vec<Entry>,
    auto_counter: u32,
    next_user: u64,
    /// Images whose backing files are being opened (loop detection).
    chain: Vec<String>,
    next_seq: u64,
    /// Where drivers raise QMP events (BLOCK_IMAGE_CORRUPTED).
    pub events: Option<qcow2::BlockEvents>,
}

fn s<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}
fn b(m: &Map<String, Value>, k: &str) -> Option<bool> {
    m.get(k).and_then(Value::as_bool)
}
fn u(m: &Map<String, Value>, k: &str) -> Option<u64> {
    m.get(k).and_then(Value::as_u64)
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
    fn name_now(&mut self, explicit: &Option<String>) -> (String, u64) {
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

    /// blockdev-add: opens the node (and inline children). On failure
    /// nothing new stays in the graph.
    pub fn add(&mut self, opts: &Map<String, Value>) -> Result<String, String> {
        let before = self.entries.len();
        let result = self
            .add_unchecked(opts, true)
            .and_then(|name| self.refresh_perms().map(|()| name));
        if result.is_err() {
            self.entries.truncate(before);
        }
        result
    }

    /// Opens a root node (and inline children) without applying
    /// permissions yet: the caller rewires the graph first (a snapshot
    /// moves the base's users to the overlay) and then applies them, or
    /// calls [`Graph::forget_since`]. On failure nothing new stays.
    pub fn add_unchecked(
        &mut self,
        opts: &Map<String, Value>,
        monitor_owned: bool,
    ) -> Result<String, String> {
        if s(opts, "node-name").is_none() {
            return Err("'node-name' must be specified for the root node".into());
        }
        let before = self.entries.len();
        let result = self.open(opts, None);
        match &result {
            Ok(name) => {
                if let Some(e) = self.entries.iter_mut().find(|e| &e.name == name) {
                    e.monitor_owned = monitor_owned;
                }
            }
            Err(_) => self.entries.truncate(before),
        }
        result
    }

    /// Drops the nodes opened since the graph had `len` of them (nothing
    /// may use them yet) and re-applies permissions.
    pub fn forget_since(&mut self, len: usize) {
        self.entries.truncate(len);
        let _ = self.refresh_perms();
    }

    /// Opens one node; `inherit_ro` is the parent's read-only flag for an
    /// inline child.
    fn open(
        &mut self,
        opts: &Map<String, Value>,
        inherit_ro: Option<bool>,
    ) -> Result<String, String> {
        let driver = s(opts, "driver").unwrap_or_default().to_string();
        // An unnamed node gets its name once its file is open (QEMU names
        // a format node after its file and before its backing node).
        let explicit = match s(opts, "node-name") {
            Some(n) => {
                check_node_name(n)?;
                if self.find(n).is_some() {
                    return Err(format!("Duplicate nodes with node-name='{n}'"));
                }
                Some(n.to_string())
            }
            None => None,
        };
        let mut named: Option<(String, u64)> = None;
        let read_only = b(opts, "read-only").or(inherit_ro).unwrap_or(false);
        let force_share = b(opts, "force-share").unwrap_or(false);
        if force_share && !read_only {
            return Err("force-share=on can only be used with read-only images".into());
        }
        let discard_unmap = s(opts, "discard") == Some("unmap");
        let detect_zeroes = match s(opts, "detect-zeroes") {
            Some("on") => DetectZeroes::On,
            Some("unmap") => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        };
        if detect_zeroes == DetectZeroes::Unmap && !discard_unmap {
            return Err(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
                    .into(),
            );
        }
        let cache = opts.get("cache").and_then(Value::as_object);
        let mut common = CommonOptions {
            read_only,
            auto_read_only: b(opts, "auto-read-only").unwrap_or(false),
            force_share,
            discard_unmap,
            detect_zeroes,
            cache_direct: cache.and_then(|c| b(c, "direct")).unwrap_or(false),
            cache_no_flush: cache.and_then(|c| b(c, "no-flush")).unwrap_or(false),
        };
        let mut children = Vec::new();
        let (drv, json, plain): (Box<dyn super::driver::Driver>, Value, Option<String>) =
            match driver.as_str() {
                "file" | "host_device" | "host_cdrom" => {
                    let filename = s(opts, "filename").unwrap_or_default().to_string();
                    if s(opts, "aio") == Some("native") && !common.cache_direct {
                        return Err("aio=native was specified, but it requires cache.direct=on, which was not specified.".into());
                    }
                    let fo = FileOptions {
                        filename: filename.clone(),
                        read_only,
                        auto_read_only: common.auto_read_only,
                        direct: common.cache_direct,
                        locking: s(opts, "locking") != Some("off"),
                        driver: driver.clone(),
                    };
                    let d = FileDriver::open(&fo)?;
                    common.read_only = d.is_read_only();
                    (
                        Box::new(d),
                        json!({"driver": driver, "filename": filename}),
                        Some(filename),
                    )
                }
                "raw" => {
                    let child = self.child(opts, "file", read_only)?;
                    let child_node = self
                        .find(&child)
                        .map(|e| e.node.clone())
                        .ok_or("lost child")?;
                    let offset = u(opts, "offset").unwrap_or(0);
                    let size = u(opts, "size");
                    let raw = RawDriver::new(child_node, offset, size);
                    let raw = match raw {
                        Ok(r) => r,
                        Err(e) => {
                            self.drop_inline(&child);
                            return Err(e);
                        }
                    };
                    let child_entry = self.find(&child);
                    let child_json = child_entry.map(|e| e.json.clone()).unwrap_or(Value::Null);
                    let child_plain = child_entry.and_then(|e| e.plain_filename.clone());
                    let mut j = Map::new();
                    j.insert("driver".into(), json!("raw"));
                    if opts.contains_key("offset") {
                        j.insert("offset".into(), json!(offset));
                    }
                    if let Some(sz) = size {
                        j.insert("size".into(), json!(sz));
                    }
                    j.insert("file".into(), child_json);
                    let plain = if raw.has_window() { None } else { child_plain };
                    children.push(Edge {
                        role: "file",
                        child,
                        perm: Perm::NONE,
                        shared: Perm::ALL,
                    });
                    (Box::new(raw), Value::Object(j), plain)
                }
                "qcow2" => {
                    let (drv, j, plain, edges) =
                        self.open_qcow2(opts, read_only, &mut named, &explicit)?;
                    children.extend(edges);
                    (Box::new(drv), j, plain)
                }
                "null-co" | "null-aio" => {
                    let size = u(opts, "size").unwrap_or(DEFAULT_SIZE);
                    let zeroes = b(opts, "read-zeroes").unwrap_or(false);
                    let latency = u(opts, "latency-ns").unwrap_or(0);
                    let name: &'static str = if driver == "null-co" {
                        "null-co"
                    } else {
                        "null-aio"
                    };
                    let mut j = Map::new();
                    // Only these count for the `json:{}` filename, as in QEMU.
                    for k in ["read-zeroes", "size"] {
                        if let Some(v) = opts.get(k) {
                            j.insert(k.into(), v.clone());
                        }
                    }
                    let plain = j.is_empty().then(|| format!("{name}://"));
                    j.insert("driver".into(), json!(name));
                    (
                        Box::new(NullDriver::new(name, size, zeroes, latency)),
                        Value::Object(j),
                        plain,
                    )
                }
                other => return Err(format!("Driver '{other}' is not supported by rsd yet")),
            };
        let (name, seq) = match named {
            Some(n) => n,
            None => self.name_now(&explicit),
        };
        let node = Node::new(name.clone(), drv, common);
        self.entries.push(Entry {
            seq,
            name: name.clone(),
            node,
            monitor_owned: false,
            children,
            users: Vec::new(),
            json,
            options: opts.clone(),
            plain_filename: plain,
            perm: Perm::NONE,
            shared: Perm::ALL,
        });
        Ok(name)
    }

    fn node_of(&self, name: &str) -> Result<Arc<Node>, String> {
        self.find(name)
            .map(|e| e.node.clone())
            .ok_or_else(|| "lost child".to_string())
    }

    /// QEMU takes a format node's locks on its file when it attaches the
    /// file, before it reads the header, so an image another process
    /// holds reports the lock rather than its format. This tries those
    /// locks (on top of the file's own) and puts the file's back; the
    /// final `refresh_perms` takes what the graph needs.
    fn check_file_locks(
        &self,
        file: &str,
        read_only: bool,
        force_share: bool,
    ) -> Result<(), String> {
        let Some(e) = self.find(file) else {
            return Ok(());
        };
        let (perm, mut shared) = qcow2::metadata_perms(read_only);
        if force_share {
            shared = Perm::ALL;
        }
        let tried = e
            .node
            .driver
            .set_perms(e.perm.union(perm), e.shared.intersect(shared));
        let _ = e.node.driver.set_perms(e.perm, e.shared);
        tried
    }

    /// Opens a qcow2 node: its file, then the data file and backing
    /// node (given, or named by the image's header), then the image.
    #[allow(clippy::type_complexity)]
    fn open_qcow2(
        &mut self,
        opts: &Map<String, Value>,
        read_only: bool,
        named: &mut Option<(String, u64)>,
        explicit: &Option<String>,
    ) -> Result<(Qcow2, Value, Option<String>, Vec<Edge>), String> {
        let edge = |role: &'static str, child: &str| Edge {
            role,
            child: child.to_string(),
            perm: Perm::NONE,
            shared: Perm::ALL,
        };
        let file = self.child(opts, "file", read_only)?;
        self.check_file_locks(&file, read_only, b(opts, "force-share").unwrap_or(false))?;
        let file_node = self.node_of(&file)?;
        let file_entry = self.find(&file);
        let file_json = file_entry.map(|e| e.json.clone()).unwrap_or(Value::Null);
        let file_plain = file_entry.and_then(|e| e.plain_filename.clone());
        let header = wait(qcow2::read_header(&file_node)).map_err(|e| e.msg)?;
        let mut edges = vec![edge("file", &file)];
        // Names in the header are relative to the image's directory.
        let dir = file_plain
            .as_deref()
            .and_then(|f| std::path::Path::new(f).parent())
            .map(|d| d.to_path_buf())
            .unwrap_or_default();
        let resolve = |name: &str| -> String {
            if name.starts_with('/') || dir.as_os_str().is_empty() {
                name.to_string()
            } else {
                dir.join(name).to_string_lossy().into_owned()
            }
        };
        // Named now: the data file and backing are opened by the driver.
        *named = Some(self.name_now(explicit));
        let data = match opts.get("data-file") {
            Some(_) => Some(self.child(opts, "data-file", read_only)?),
            None if header.has_data_file() => {
                let Some(name) = &header.data_file else {
                    return Err(
                        "Could not open data file: 'data-file' is required for this image".into(),
                    );
                };
                let mut o = Map::new();
                o.insert("driver".into(), json!("file"));
                o.insert("filename".into(), json!(resolve(name)));
                Some(self.open(&o, Some(read_only))?)
            }
            None => None,
        };
        if let Some(d) = &data {
            edges.push(edge("data-file", d));
        }
        let backing = match opts.get("backing") {
            Some(Value::Null) => None,
            Some(_) => Some(
                self.child(opts, "backing", true)
                    .map_err(|e| format!("Could not open backing file: {e}"))?,
            ),
            None => match &header.backing_file {
                Some(name) => {
                    let path = resolve(name);
                    if self.chain.contains(&path) || Some(&path) == file_plain.as_ref() {
                        return Err(format!(
                            "Could not open backing file: Backing file '{path}' creates an infinite loop."
                        ));
                    }
                    if self.chain.len() >= 64 {
                        return Err("Backing chain too deep".into());
                    }
                    let fmt = match &header.backing_format {
                        Some(f) => f.clone(),
                        None => qcow2::probe(&path),
                    };
                    let mut o = Map::new();
                    o.insert("driver".into(), json!(fmt));
                    o.insert("file".into(), json!({"driver": "file", "filename": path}));
                    if let Some(f) = &file_plain {
                        self.chain.push(f.clone());
                    }
                    let r = self.open(&o, Some(true));
                    if file_plain.is_some() {
                        self.chain.pop();
                    }
                    Some(r.map_err(|e| format!("Could not open backing file: {e}"))?)
                }
                None => None,
            },
        };
        if let Some(b) = &backing {
            edges.push(edge("backing", b));
        }
        let data_node = data.as_deref().map(|d| self.node_of(d)).transpose()?;
        let backing_node = backing.as_deref().map(|b| self.node_of(b)).transpose()?;
        let q_opts = qcow2::Qcow2Options {
            node_name: named.as_ref().map(|n| n.0.clone()).unwrap_or_default(),
            events: self.events.clone(),
            l2_cache_size: u(opts, "l2-cache-size"),
            l2_cache_entry_size: u(opts, "l2-cache-entry-size"),
            refcount_cache_size: u(opts, "refcount-cache-size"),
            cache_size: u(opts, "cache-size"),
            cache_clean_interval: u(opts, "cache-clean-interval"),
            lazy_refcounts: b(opts, "lazy-refcounts"),
            backing_full: header.backing_file.as_deref().map(resolve),
            // QEMU's default: on when the node itself unmaps.
            pass_discard: b(opts, "pass-discard-request")
                .unwrap_or(s(opts, "discard") == Some("unmap")),
        };
        let drv = wait(qcow2::Qcow2::open(
            file_node,
            header.clone(),
            data_node,
            backing_node,
            read_only,
            &q_opts,
        ))
        .map_err(|e| e.msg)?;
        let mut j = Map::new();
        j.insert("driver".into(), json!("qcow2"));
        j.insert("file".into(), file_json);
        // A backing node other than the one the header names is part of
        // the node's identity, so its filename becomes json:{...} (QEMU's
        // "backing overridden"); so is an explicit "backing": null.
        let plain = match (opts.get("backing"), &backing) {
            (Some(Value::Null), _) => {
                j.insert("backing".into(), Value::Null);
                None
            }
            (Some(_), Some(b)) => {
                let be = self.find(b);
                let same = be.and_then(|e| e.plain_filename.clone()) == header.backing_file;
                if same {
                    file_plain
                } else {
                    let bj = be.map(|e| e.json.clone()).unwrap_or(Value::Null);
                    j.insert("backing".into(), bj);
                    None
                }
            }
            _ => file_plain,
        };
        Ok((drv, Value::Object(j), plain, edges))
    }

    /// Resolves a child given by reference (a node name) or inline.
    fn child(
        &mut self,
        opts: &Map<String, Value>,
        role: &str,
        parent_ro: bool,
    ) -> Result<String, String> {
        match opts.get(role) {
            Some(Value::String(r)) => match self.find(r) {
                Some(e) => Ok(e.name.clone()),
                None => Err(format!("Cannot find device='{r}' nor node-name='{r}'")),
            },
            Some(Value::Object(inline)) => self.open(inline, Some(parent_ro)),
            _ => Err(format!("Parameter '{role}' is missing")),
        }
    }

    /// Removes an inline child opened for a parent that then failed.
    fn drop_inline(&mut self, name: &str) {
        if let Some(i) = self.index(name) {
            if !self.entries[i].monitor_owned && self.parents(name).is_empty() {
                self.entries.remove(i);
            }
        }
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

    /// Recomputes every node's cumulative permissions from its users and
    /// parents (newest first, so parents are done before children), checks
    /// conflicts and read-only nodes, then applies image locks. On any
    /// error the previous locks stay in force.
    pub fn refresh_perms(&mut self) -> Result<(), String> {
        let n = self.entries.len();
        let mut cum: Vec<(Perm, Perm)> = vec![(Perm::NONE, Perm::ALL); n];
        let mut edges: Vec<Vec<(Perm, Perm)>> = self
            .entries
            .iter()
            .map(|e| vec![(Perm::NONE, Perm::ALL); e.children.len()])
            .collect();
        for i in (0..n).rev() {
            let name = self.entries[i].name.clone();
            // (description, perm, shared) of every parent, newest first.
            let mut holders: Vec<(String, Perm, Perm)> = self.entries[i]
                .users
                .iter()
                .map(|u| {
                    (
                        format!("{} (uses node '{name}' as 'root' child)", u.desc),
                        u.perm,
                        u.shared,
                    )
                })
                .collect();
            for j in (i + 1..n).rev() {
                for (k, c) in self.entries[j].children.iter().enumerate() {
                    if c.child == name {
                        let (p, sh) = edges[j][k];
                        holders.push((
                            format!(
                                "node '{}' (uses node '{name}' as '{}' child)",
                                self.entries[j].name, c.role
                            ),
                            p,
                            sh,
                        ));
                    }
                }
            }
            for (a, ap, _) in &holders {
                for (bdesc, _, bsh) in &holders {
                    if std::ptr::eq(a, bdesc) {
                        continue;
                    }
                    let clash = ap.without(*bsh);
                    if clash != Perm::NONE {
                        return Err(format!(
                            "Permission conflict on node '{name}': permissions '{}' are both required by {a} and unshared by {bdesc}.",
                            clash.human_names()
                        ));
                    }
                }
            }
            let perm = holders.iter().fold(Perm::NONE, |p, h| p.union(h.1));
            let shared = holders.iter().fold(Perm::ALL, |s, h| s.intersect(h.2));
            let node = &self.entries[i].node;
            if node.read_only() && (perm.contains(Perm::WRITE) || perm.contains(Perm::RESIZE)) {
                return Err("Block node is read-only".into());
            }
            cum[i] = (perm, shared);
            for (e, c) in edges[i].iter_mut().zip(&self.entries[i].children) {
                let (cp, mut cs) = node.driver.child_perms(c.role, perm, shared);
                if node.opts.force_share {
                    cs = Perm::ALL;
                }
                *e = (cp, cs);
            }
        }
        // Apply locks; undo the ones already changed if one fails.
        for (i, (p, sh)) in cum.iter().enumerate() {
            if let Err(e) = self.entries[i].node.driver.set_perms(*p, *sh) {
                for old in &self.entries[..i] {
                    let _ = old.node.driver.set_perms(old.perm, old.shared);
                }
                return Err(e);
            }
        }
        for ((entry, (p, sh)), edge_perms) in self.entries.iter_mut().zip(cum).zip(edges) {
            entry.perm = p;
            entry.shared = sh;
            for (c, (ep, es)) in entry.children.iter_mut().zip(edge_perms) {
                c.perm = ep;
                c.shared = es;
            }
        }
        Ok(())
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

    /// The filename QEMU shows: the plain one, or `json:{...}` options.
    pub fn filename(&self, e: &Entry) -> String {
        match &e.plain_filename {
            Some(f) => f.clone(),
            None => format!("json:{}", crate::qmp::json::to_qmp_string(&e.json, false)),
        }
    }
}
