//! blockdev-set-active and x-blockdev-amend.
use serde_json::{json, Map, Value};

use super::{arg_str, ControlState};
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

    /// x-blockdev-amend: qcow2's only amendable options are its
    /// encryption's key slots, and rsd opens no encrypted image, so an
    /// amend job either has nothing to do or fails as QSD's does on an
    /// unencrypted image.
    pub(super) async fn x_blockdev_amend(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let name = arg_str(args, "node-name");
        let Some(e) = self.block.find(name) else {
            return Err(QmpError::generic(format!(
                "Cannot find device='' nor node-name='{name}'"
            )));
        };
        let driver = e.node.driver.name();
        let empty = Map::new();
        let opts = args
            .get("options")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        if driver != "qcow2" {
            return Err(QmpError::generic(
                "Driver does not support x-blockdev-amend",
            ));
        }
        if arg_str(opts, "driver") != driver {
            return Err(QmpError::generic(
                "x-blockdev-amend doesn't support changing the block driver",
            ));
        }
        let encrypt = opts.contains_key("encrypt");
        let start: crate::jobs::Start = Box::new(move |sh| {
            Box::pin(async move {
                sh.set_progress(1, 1);
                if encrypt {
                    return Err("image is not encrypted, can't amend".to_string());
                }
                let done: crate::jobs::JobFuture = Box::pin(async { Ok(()) });
                Ok(done)
            })
        });
        self.start_job(
            arg_str(args, "job-id"),
            "amend",
            true,
            false,
            None,
            start,
            Box::new(|_| {}),
        )
        .await
        .map(|()| json!({}))
    }
}
