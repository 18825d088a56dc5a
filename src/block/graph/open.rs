//! Opening nodes: blockdev-add's entry points, the options every node
//! shares, and the hand-over to the driver registry.
use serde_json::{Map, Value};

use super::{check_node_name, Entry, Graph};
use crate::block::drivers::{self, opt_bool as b, opt_str as s, Objects, OpenCtx};
use crate::block::node::{CommonOptions, DetectZeroes, Node};
use crate::block::perm::Perm;

impl Graph {
    /// blockdev-add: opens the node (and inline children). On failure
    /// nothing new stays in the graph.
    pub fn add(&mut self, objects: &Objects, opts: &Map<String, Value>) -> Result<String, String> {
        let before = self.entries.len();
        let result = self
            .add_unchecked(objects, opts, true)
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
        objects: &Objects,
        opts: &Map<String, Value>,
        monitor_owned: bool,
    ) -> Result<String, String> {
        if s(opts, "node-name").is_none() {
            return Err("'node-name' must be specified for the root node".into());
        }
        let before = self.entries.len();
        let result = self.open(objects, opts, None);
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

    /// Opens a node the daemon makes for a command (drive-mirror's
    /// target): named as given or automatically, not owned by the
    /// monitor, so it goes once nothing uses it.
    pub fn add_implicit(
        &mut self,
        objects: &Objects,
        opts: &Map<String, Value>,
    ) -> Result<String, String> {
        let before = self.entries.len();
        let result = self
            .open(objects, opts, None)
            .and_then(|name| self.refresh_perms().map(|()| name));
        if result.is_err() {
            self.entries.truncate(before);
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
    /// inline or implicit child.
    pub(in crate::block) fn open(
        &mut self,
        objects: &Objects,
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
        let common = common_options(opts, inherit_ro)?;
        let Some(spec) = drivers::lookup(&driver) else {
            return Err(format!("Driver '{driver}' is not supported by rsd yet"));
        };
        let mut ctx = OpenCtx::new(self, objects, driver, common, explicit);
        let opened = (spec.open)(&mut ctx, opts)?;
        ctx.name_now();
        let (common, named) = (ctx.common, ctx.named);
        let (name, seq) = named.unwrap_or_default();
        let node = Node::new(name.clone(), opened.driver, common);
        let iothread = self.iothread_of_children(&opened.children);
        self.entries.push(Entry {
            seq,
            name: name.clone(),
            node,
            monitor_owned: false,
            children: opened.children,
            users: Vec::new(),
            json: opened.json,
            options: opts.clone(),
            plain_filename: opened.plain,
            perm: Perm::NONE,
            shared: Perm::ALL,
            iothread,
        });
        Ok(name)
    }

    /// Removes an inline child opened for a parent that then failed.
    pub(in crate::block) fn drop_inline(&mut self, name: &str) {
        if let Some(i) = self.index(name) {
            if !self.entries[i].monitor_owned && self.parents(name).is_empty() {
                self.entries.remove(i);
            }
        }
    }
}

/// The options every node shares, with QEMU's checks.
fn common_options(
    opts: &Map<String, Value>,
    inherit_ro: Option<bool>,
) -> Result<CommonOptions, String> {
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
    Ok(CommonOptions {
        read_only,
        auto_read_only: b(opts, "auto-read-only").unwrap_or(false),
        force_share,
        discard_unmap,
        detect_zeroes,
        cache_direct: cache.and_then(|c| b(c, "direct")).unwrap_or(false),
        cache_no_flush: cache.and_then(|c| b(c, "no-flush")).unwrap_or(false),
    })
}

impl Graph {
    /// Adds a filter node the daemon makes itself (a job's mirror_top),
    /// named `name` or automatically, above `child` in role `role`. It
    /// takes its child's identity (QEMU's filters show their child's
    /// filename). The caller moves the child's parents onto it.
    pub fn add_filter(
        &mut self,
        name: Option<&str>,
        driver: Box<dyn crate::block::driver::Driver>,
        role: &'static str,
        child: &str,
    ) -> Result<String, String> {
        let explicit = match name {
            Some(n) => {
                check_node_name(n)?;
                if self.find(n).is_some() {
                    return Err(format!("Duplicate nodes with node-name='{n}'"));
                }
                Some(n.to_string())
            }
            None => None,
        };
        let (json, plain, read_only) = match self.find(child) {
            Some(e) => (e.json.clone(), e.plain_filename.clone(), e.node.read_only()),
            None => {
                return Err(format!(
                    "Cannot find device='{child}' nor node-name='{child}'"
                ))
            }
        };
        let (name, seq) = self.name_now(&explicit);
        let common = CommonOptions {
            read_only,
            ..CommonOptions::default()
        };
        let node = Node::new(name.clone(), driver, common);
        let children = vec![drivers::edge(role, child)];
        let iothread = self.iothread_of_children(&children);
        self.entries.push(Entry {
            seq,
            name: name.clone(),
            node,
            monitor_owned: false,
            children,
            users: Vec::new(),
            json,
            options: Map::new(),
            plain_filename: plain,
            perm: Perm::NONE,
            shared: Perm::ALL,
            iothread,
        });
        Ok(name)
    }

    /// Removes a node nothing uses any more (a job's filter at its end).
    pub fn remove_unused(&mut self, name: &str) {
        let unused = self
            .find(name)
            .is_some_and(|e| e.users.is_empty() && self.parents(name).is_empty());
        if unused {
            self.entries.retain(|e| e.name != name);
            let _ = self.refresh_perms();
        }
    }
}
