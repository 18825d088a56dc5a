//! block-export-add for vhost-user-blk: QSD's checks of its own options
//! in QSD's order (logical-block-size, num-queues, then the address),
//! then the socket.
use std::sync::Arc;

use serde_json::{Map, Value};

use super::exports::ExportCommon;
use super::ControlState;
use crate::exports::BlockExport;
use crate::sockets::{self, Listener};
use crate::vhost_user::device::MAX_QUEUES;
use crate::vhost_user::export::{VhostUserBlkConfig, VhostUserBlkExport};

/// QEMU's bounds for a logical block size.
const MIN_BLOCK_SIZE: u64 = 512;
const MAX_BLOCK_SIZE: u64 = 2 << 20;

impl ControlState {
    pub(super) async fn vhost_user_export_create(
        &self,
        c: &ExportCommon,
        args: &Map<String, Value>,
        monitor: bool,
    ) -> Result<Arc<dyn BlockExport>, String> {
        let lbs = args
            .get("logical-block-size")
            .and_then(Value::as_u64)
            .unwrap_or(MIN_BLOCK_SIZE);
        // 0 passes QEMU's check (it means "unset" there).
        if lbs != 0 && (!lbs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&lbs))
        {
            return Err(format!(
                "parameter logical-block-size must be a power of 2 between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
            ));
        }
        let num_queues = args.get("num-queues").and_then(Value::as_u64).unwrap_or(1);
        if num_queues == 0 {
            return Err("num-queues must be greater than 0".into());
        }
        if num_queues > u64::from(MAX_QUEUES) {
            return Err(format!(
                "rsd serves at most {MAX_QUEUES} queues per vhost-user-blk export"
            ));
        }
        let empty = Map::new();
        let addr = args
            .get("addr")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let atype = addr.get("type").and_then(Value::as_str).unwrap_or_default();
        if atype != "unix" && atype != "fd" {
            return Err("Only socket address types 'unix' and 'fd' are supported".into());
        }
        // A command names a descriptor passed to the monitor (getfd),
        // which QSD does not support; the command line a number.
        if atype == "fd" && monitor {
            return Err("only QEMU supports file descriptor passing".into());
        }
        let (listener, path, _) = sockets::listen(atype, addr).await?;
        let Listener::Unix(listener) = listener else {
            return Err("Only socket address types 'unix' and 'fd' are supported".into());
        };
        let listener = listener.into_std().map_err(|e| crate::util::os_msg(&e))?;
        let flag = |k: &str| args.get(k).and_then(Value::as_bool).unwrap_or(false);
        let export = VhostUserBlkExport::new(VhostUserBlkConfig {
            id: c.id.clone(),
            user: c.user,
            node: c.edge.clone(),
            writable: c.writable,
            writethrough: flag("writethrough"),
            logical_block_size: lbs as u32,
            num_queues: num_queues as u16,
            listener,
            path: path.clone(),
            placement: c.placement.clone(),
        });
        if export.is_err() {
            if let Some(p) = &path {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(export?)
    }
}
