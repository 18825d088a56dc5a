//! The block-dirty-bitmap-* commands and x-debug-block-dirty-bitmap-sha256:
//! argument handling and lookups with QEMU's messages, over the
//! bitmap operations of `block/dirty.rs`.
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::{arg_str, ControlState};
use crate::block::bitmap::DirtyBitmap;
use crate::block::dirty::{self, Check, NamedBitmap};
use crate::block::driver::BitmapStoreError;
use crate::block::graph::Graph;
use crate::block::node::Node;
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

/// QEMU's block_dirty_bitmap_lookup: the node, then its bitmap.
pub fn lookup(
    graph: &Graph,
    node: &str,
    name: &str,
) -> Result<(Arc<Node>, Arc<NamedBitmap>), String> {
    let Some(e) = graph.find(node) else {
        return Err(format!("Node '{node}' not found"));
    };
    match e.node.bitmaps.find(name) {
        Some(b) => Ok((e.node.clone(), b)),
        None => Err(format!("Dirty bitmap '{name}' not found")),
    }
}

/// A `BlockDirtyBitmapOrStr`: a name on `default_node`'s node, or
/// {node, name}.
pub fn lookup_ref(
    graph: &Graph,
    default_node: &Arc<Node>,
    r: &Value,
) -> Result<Arc<NamedBitmap>, String> {
    match r {
        Value::String(name) => default_node
            .bitmaps
            .find(name)
            .ok_or_else(|| format!("Dirty bitmap '{name}' not found")),
        _ => lookup(
            graph,
            r.get("node").and_then(Value::as_str).unwrap_or_default(),
            r.get("name").and_then(Value::as_str).unwrap_or_default(),
        )
        .map(|(_, b)| b),
    }
}

/// What block-dirty-bitmap-add asks for.
pub struct AddArgs<'a> {
    pub node: &'a str,
    pub name: &'a str,
    pub granularity: Option<u64>,
    pub persistent: bool,
    pub disabled: bool,
}

/// Checks a new bitmap and builds it, without adding it to its node
/// (a transaction adds it at commit).
pub fn prepare_add(graph: &Graph, a: &AddArgs) -> Result<(Arc<Node>, Arc<NamedBitmap>), String> {
    if a.name.is_empty() {
        return Err("Bitmap name cannot be empty".into());
    }
    let Some(e) = graph.find(a.node) else {
        return Err(format!(
            "Cannot find device='{0}' nor node-name='{0}'",
            a.node
        ));
    };
    let node = e.node.clone();
    let granularity = match a.granularity {
        Some(g) => {
            dirty::check_granularity(g)?;
            g
        }
        None => dirty::default_granularity(node.driver.cluster_size()),
    };
    if a.persistent {
        let stored: Vec<String> = node
            .bitmaps
            .all()
            .iter()
            .filter(|b| b.persistent())
            .map(|b| b.name.clone())
            .collect();
        match node.driver.can_store_bitmap(a.name, granularity, &stored) {
            Ok(()) => {}
            Err(BitmapStoreError::Unsupported) => {
                return Err(format!(
                    "Can't store persistent bitmaps to {}: Operation not supported",
                    e.name
                ))
            }
            Err(BitmapStoreError::Invalid(m)) => {
                return Err(format!(
                    "Can't make bitmap '{}' persistent in '{}': {m}",
                    a.name, e.name
                ))
            }
        }
    }
    if node.bitmaps.find(a.name).is_some() {
        return Err(format!("Bitmap already exists: {}", a.name));
    }
    if a.name.len() > dirty::MAX_NAME {
        return Err(format!("Bitmap name too long: {}", a.name));
    }
    let b = NamedBitmap::new(a.name, Arc::new(DirtyBitmap::new(node.size(), granularity)));
    b.set_enabled(!a.disabled);
    b.set_persistent(a.persistent);
    Ok((node, Arc::new(b)))
}

/// block-dirty-bitmap-remove's checks; the caller then removes it.
pub fn prepare_remove(
    graph: &Graph,
    node: &str,
    name: &str,
) -> Result<(Arc<Node>, Arc<NamedBitmap>), String> {
    let (n, b) = lookup(graph, node, name)?;
    b.check(Check::BusyRo)?;
    Ok((n, b))
}

/// What a bitmap command changed, so that a transaction can take it back.
pub enum Changed {
    /// A bitmap added to a node.
    Added(Arc<Node>, String),
    /// A bitmap's bits before a clear or merge.
    Bits(Arc<NamedBitmap>, Vec<u64>),
    /// A bitmap's recording state before enable or disable.
    Enabled(Arc<NamedBitmap>, bool),
}

impl Changed {
    /// Takes the change back.
    pub fn undo(self) {
        match self {
            Changed::Added(n, name) => {
                n.remove_bitmap(&name);
            }
            Changed::Bits(b, words) => b.bits.restore_words(&words),
            Changed::Enabled(b, on) => b.set_enabled(on),
        }
    }
}

/// block-dirty-bitmap-add, -clear, -enable, -disable and -merge, with
/// QEMU's checks: done at once (remove has its own path: a stored
/// bitmap leaves the image first).
pub fn change(g: &Graph, cmd: &str, args: &Map<String, Value>) -> Result<Changed, String> {
    let node = arg_str(args, "node");
    let name = arg_str(args, "name");
    match cmd {
        "block-dirty-bitmap-add" => {
            let a = AddArgs {
                node,
                name,
                granularity: args.get("granularity").and_then(Value::as_u64),
                persistent: args.get("persistent").and_then(Value::as_bool) == Some(true),
                disabled: args.get("disabled").and_then(Value::as_bool) == Some(true),
            };
            let (n, b) = prepare_add(g, &a)?;
            n.add_bitmap(b);
            Ok(Changed::Added(n, name.to_string()))
        }
        "block-dirty-bitmap-clear" => {
            let (_, b) = lookup(g, node, name)?;
            b.check(Check::Default)?;
            let before = b.bits.words();
            b.bits.clear_all();
            Ok(Changed::Bits(b, before))
        }
        "block-dirty-bitmap-enable" | "block-dirty-bitmap-disable" => {
            let (_, b) = lookup(g, node, name)?;
            b.check(Check::AllowRo)?;
            let before = b.enabled();
            b.set_enabled(cmd.ends_with("enable"));
            Ok(Changed::Enabled(b, before))
        }
        "block-dirty-bitmap-merge" => {
            let (n, target) = lookup(g, node, arg_str(args, "target"))?;
            target.check(Check::Default)?;
            let mut sources = Vec::new();
            for r in args
                .get("bitmaps")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let s = lookup_ref(g, &n, r)?;
                dirty::check_merge_source(&target, &s)?;
                sources.push(s);
            }
            let before = target.bits.words();
            dirty::merge(&target, &sources)?;
            Ok(Changed::Bits(target, before))
        }
        _ => Err(format!("The command {cmd} has not been found")),
    }
}

impl ControlState {
    pub(super) async fn bitmap_command(
        &mut self,
        cmd: &str,
        args: &Map<String, Value>,
    ) -> QmpResult<Value> {
        if cmd == "block-dirty-bitmap-remove" {
            return self
                .bitmap_remove(arg_str(args, "node"), arg_str(args, "name"))
                .await
                .map(|()| json!({}))
                .map_err(QmpError::generic);
        }
        self.bitmap_op(cmd, args).map_err(QmpError::generic)
    }

    /// block-dirty-bitmap-remove: a persistent bitmap leaves the image
    /// first, as in QEMU.
    pub(super) async fn bitmap_remove(&mut self, node: &str, name: &str) -> Result<(), String> {
        let (n, b) = prepare_remove(&self.block, node, name)?;
        if b.persistent() {
            n.driver
                .remove_persistent_bitmap(&b.name)
                .await
                .map_err(|e| {
                    format!(
                        "Failed to remove bitmap '{}' from the image: {}",
                        b.name, e.msg
                    )
                })?;
        }
        n.remove_bitmap(&b.name);
        Ok(())
    }

    fn bitmap_op(&mut self, cmd: &str, args: &Map<String, Value>) -> Result<Value, String> {
        if cmd == "x-debug-block-dirty-bitmap-sha256" {
            let (_, b) = lookup(&self.block, arg_str(args, "node"), arg_str(args, "name"))?;
            return Ok(json!({"sha256": b.bits.sha256_hex()}));
        }
        change(&self.block, cmd, args)?;
        Ok(json!({}))
    }
}
