//! x-blockdev-change: adding a child to a node or removing one. QEMU
//! implements it for quorum only; the checks run in QEMU's order, so a
//! node of any other driver gets QSD's errors.
use serde_json::{json, Map, Value};

use super::{arg_str, ControlState};
use crate::block::actor as node_actor;
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

impl ControlState {
    pub(super) async fn x_blockdev_change(
        &mut self,
        args: &Map<String, Value>,
    ) -> QmpResult<Value> {
        let parent = arg_str(args, "parent");
        let (child, node) = (
            args.get("child").and_then(Value::as_str),
            args.get("node").and_then(Value::as_str),
        );
        if self.block.find(parent).is_none() {
            return Err(QmpError::generic(format!(
                "Cannot find device='{parent}' nor node-name='{parent}'"
            )));
        }
        match (child, node) {
            (Some(_), Some(_)) => Err(QmpError::generic(
                "The parameters child and node are in conflict",
            )),
            (None, None) => Err(QmpError::generic("Either child or node must be specified")),
            (Some(c), None) => {
                let has = self
                    .block
                    .find(parent)
                    .is_some_and(|p| p.children.iter().any(|e| e.role == c));
                if !has {
                    return Err(QmpError::generic(format!(
                        "Node '{parent}' does not have child '{c}'"
                    )));
                }
                let gone = crate::block::quorum::remove_child(&mut self.block, parent, c)
                    .await
                    .map_err(QmpError::generic)?;
                if let Some(node) = gone {
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
            (None, Some(n)) => {
                if self.block.find(n).is_none() {
                    return Err(QmpError::generic(format!("Node '{n}' not found")));
                }
                crate::block::quorum::add_child(&mut self.block, parent, n)
                    .await
                    .map_err(QmpError::generic)?;
                Ok(json!({}))
            }
        }
    }
}
