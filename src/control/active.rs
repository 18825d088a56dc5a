//! blockdev-set-active and x-blockdev-amend.
use serde_json::{json, Map, Value};

use super::ControlState;
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

impl ControlState {
    pub(super) async fn blockdev_set_active(
        &mut self,
        args: &Map<String, Value>,
    ) -> QmpResult<Value> {
        let active = args.get("active").and_then(Value::as_bool) == Some(true);
        let r = match args.get("node-name").and_then(Value::as_str) {
            None if active => self.block.activate_all().await,
            None => self.block.inactivate_all().await,
            Some(name) => {
                if self.block.find(name).is_none() {
                    return Err(QmpError::generic(format!(
                        "Failed to find node with node-name='{name}'"
                    )));
                }
                if active {
                    self.block.activate(name).await
                } else {
                    self.block.inactivate(name).await
                }
            }
        };
        r.map(|()| json!({})).map_err(QmpError::hinted)
    }
}
