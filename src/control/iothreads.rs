//! IOThreads in the graph, as QEMU's AioContexts: each node belongs to
//! an iothread or to the main loop, connected nodes move together, and
//! an export follows its node unless it was added with
//! `fixed-iothread`. x-blockdev-set-iothread and block-export-add's
//! `iothread` move nodes here; object-del refuses an iothread in use.
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::{arg_str, ControlState};
use crate::exports::BlockExport;
use crate::iothread::{IoThread, Placement};
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

/// QEMU's words when a fixed export would have to move.
const FIXED: &str = "Cannot change iothread of active block backend";

impl ControlState {
    /// The iothread object with this id.
    pub(super) fn iothread(&self, id: &str) -> Option<Arc<IoThread>> {
        self.objects.get(id).and_then(|o| o.iothread().cloned())
    }

    /// The node an export's graph user sits on.
    fn export_node(&self, e: &dyn BlockExport) -> Option<&str> {
        let user = e.user();
        self.block
            .entries
            .iter()
            .find(|n| n.users.iter().any(|u| u.id == user))
            .map(|n| n.name.as_str())
    }

    /// QEMU's bdrv_try_change_aio_context: moves `node` and every node
    /// connected to it to `to` (None: the main loop), with the exports
    /// that follow them; refused when an export fixed elsewhere would
    /// have to move.
    pub(super) fn move_to_iothread(&mut self, node: &str, to: Option<&str>) -> Result<(), String> {
        let here = self.block.find(node).and_then(|e| e.iothread.clone());
        if here.as_deref() == to {
            return Ok(());
        }
        let nodes = self.block.connected(node);
        let exports: Vec<Arc<dyn BlockExport>> = self
            .exports
            .list()
            .into_iter()
            .filter(|e| {
                self.export_node(e.as_ref())
                    .is_some_and(|n| nodes.iter().any(|m| m == n))
            })
            .collect();
        let stuck = exports.iter().any(|e| {
            let p = e.placement();
            p.fixed && p.iothread_id().as_deref() != to
        });
        if stuck {
            return Err(FIXED.into());
        }
        let thread = to.and_then(|id| self.iothread(id));
        self.block.set_iothread(&nodes, to);
        for e in exports {
            if !e.placement().fixed {
                e.placement().set(thread.clone());
            }
        }
        Ok(())
    }

    /// block-export-add's `iothread` and `fixed-iothread`, after its
    /// other common checks, as QEMU's blk_exp_add: the node moves to the
    /// iothread (a failure to move is the export's error only when
    /// fixed), and the export serves where its node is.
    pub(super) fn export_placement(
        &mut self,
        node: &str,
        args: &Map<String, Value>,
    ) -> Result<Arc<Placement>, String> {
        let fixed = args.get("fixed-iothread").and_then(Value::as_bool) == Some(true);
        if let Some(io) = args.get("iothread").and_then(Value::as_str) {
            if self.iothread(io).is_none() {
                return Err(format!("iothread \"{io}\" not found"));
            }
            let moved = self.move_to_iothread(node, Some(io));
            if fixed {
                moved?;
            }
        }
        let at = self
            .block
            .find(node)
            .and_then(|e| e.iothread.clone())
            .and_then(|id| self.iothread(&id));
        Ok(Placement::new(fixed, at))
    }

    /// x-blockdev-set-iothread, with QEMU's checks in its order.
    pub(super) fn x_blockdev_set_iothread(
        &mut self,
        args: &Map<String, Value>,
    ) -> QmpResult<Value> {
        let node = arg_str(args, "node-name");
        let Some(entry) = self.block.find(node) else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{node}'"
            )));
        };
        let force = args.get("force").and_then(Value::as_bool) == Some(true);
        // QEMU's guard against accidents: a node with a BlockBackend (an
        // export's or a job's) may be in use.
        if !entry.users.is_empty() && !force {
            return Err(QmpError::generic(format!(
                "Node {node} is associated with a BlockBackend and could be in use (use force=true to override this check)"
            )));
        }
        let to = match args.get("iothread") {
            Some(Value::String(id)) => {
                if self.iothread(id).is_none() {
                    return Err(QmpError::generic(format!("Cannot find iothread {id}")));
                }
                Some(id.clone())
            }
            _ => None,
        };
        self.move_to_iothread(node, to.as_deref())
            .map_err(QmpError::generic)?;
        Ok(json!({}))
    }

    /// __org.rsd_query-iothreads: QEMU's query-iothreads (which QSD does
    /// not have), with each thread's real kernel id, for pinning.
    pub(super) fn query_iothreads(&self) -> Value {
        let prop = |o: &crate::objects::Object, p: &str| o.get(p).unwrap_or(json!(0));
        Value::Array(
            self.objects
                .iter()
                .filter_map(|(id, o)| {
                    let t = o.iothread()?;
                    Some(json!({
                        "id": id,
                        "thread-id": t.thread_id,
                        "poll-max-ns": prop(o, "poll-max-ns"),
                        "poll-grow": prop(o, "poll-grow"),
                        "poll-shrink": prop(o, "poll-shrink"),
                        "aio-max-batch": prop(o, "aio-max-batch"),
                    }))
                })
                .collect(),
        )
    }

    /// Whether a node or an export is in the iothread (object-del then
    /// refuses it, where QSD lets it go and then crashes: differences
    /// entry 55).
    pub(super) fn iothread_in_use(&self, id: &str) -> bool {
        self.block
            .entries
            .iter()
            .any(|e| e.iothread.as_deref() == Some(id))
            || self
                .exports
                .list()
                .iter()
                .any(|e| e.placement().iothread_id().as_deref() == Some(id))
    }
}
