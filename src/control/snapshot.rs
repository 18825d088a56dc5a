//! External snapshots: blockdev-snapshot-sync (create an overlay image
//! over a node and put it in the node's place) and blockdev-snapshot (put
//! an overlay node added beforehand in its place), with QSD's checks and
//! messages. The switch is the graph's replace_node: the node's users
//! and parents move to the overlay while their I/O is held, and the
//! overlay's backing edge keeps the old node.
use serde_json::{json, Map, Value};

use super::{arg_str, ControlState};
use crate::block::file::{FileDriver, FileOptions};
use crate::block::node::{CommonOptions, Node};
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

fn not_found(device: &str, node: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{device}' nor node-name='{node}'"
    ))
}

impl ControlState {
    /// QEMU's op blocker: a node that is another node's backing file
    /// cannot be snapshotted.
    fn backing_busy(&self, name: &str) -> Result<(), String> {
        match self
            .block
            .parents(name)
            .into_iter()
            .find(|(_, e)| e.role == "backing")
        {
            Some((parent, _)) => Err(format!(
                "Node '{name}' is busy: node is used as backing hd of '{parent}'"
            )),
            None => Ok(()),
        }
    }

    pub(super) async fn blockdev_snapshot_sync(
        &mut self,
        args: &Map<String, Value>,
    ) -> QmpResult<Value> {
        let (base, opts) = self.snapshot_sync_prepare(args).await?;
        self.put_overlay(&base, &opts, false).await
    }

    /// blockdev-snapshot-sync up to the switch: the checks, the overlay
    /// file created (unless mode=existing); returns the base's name and
    /// the overlay's options.
    pub(super) async fn snapshot_sync_prepare(
        &mut self,
        args: &Map<String, Value>,
    ) -> QmpResult<(String, Map<String, Value>)> {
        // QSD has no named devices: only node-name finds a node.
        let device = arg_str(args, "device");
        let node_name = arg_str(args, "node-name");
        let Some(base) = self.block.find(node_name) else {
            return Err(not_found(device, node_name));
        };
        let base_name = base.name.clone();
        let base_filename = self.block.filename(base);
        let base_fmt = base.node.driver.name();
        let base_ro = base.node.read_only();
        let size = base.node.size();
        let Some(overlay) = args.get("snapshot-node-name").and_then(Value::as_str) else {
            return Err(QmpError::generic("New overlay node-name missing"));
        };
        if self.block.find(overlay).is_some() {
            return Err(QmpError::generic("New overlay node-name already in use"));
        }
        self.backing_busy(&base_name).map_err(QmpError::generic)?;
        let file = arg_str(args, "snapshot-file");
        let format = args
            .get("format")
            .and_then(Value::as_str)
            .unwrap_or("qcow2");
        if args.get("mode").and_then(Value::as_str) != Some("existing") {
            match format {
                "qcow2" => {}
                "raw" => {
                    return Err(QmpError::generic(
                        "Backing file not supported for file format 'raw'",
                    ))
                }
                other => return Err(QmpError::generic(format!("Unknown file format '{other}'"))),
            }
            if file == base_filename {
                return Err(QmpError::generic(
                    "Error: Trying to create an image with the same filename as the backing file",
                ));
            }
            create_overlay_file(file, size, &base_filename, base_fmt)
                .await
                .map_err(QmpError::generic)?;
        }
        let mut opts = Map::new();
        opts.insert("driver".into(), json!(format));
        opts.insert("node-name".into(), json!(overlay));
        opts.insert("file".into(), json!({"driver": "file", "filename": file}));
        opts.insert("backing".into(), json!(base_name));
        if base_ro {
            opts.insert("read-only".into(), json!(true));
        }
        Ok((base_name, opts))
    }

    pub(super) async fn blockdev_snapshot(
        &mut self,
        args: &Map<String, Value>,
    ) -> QmpResult<Value> {
        self.blockdev_snapshot_checks(args)?;
        let node = arg_str(args, "node");
        let overlay = arg_str(args, "overlay");
        let Some(slot) = self
            .block
            .find(overlay)
            .and_then(|ov| ov.node.driver.child_slot("backing"))
        else {
            return Err(not_found(overlay, overlay));
        };
        let base = self.block.find(node).map(|e| e.node.clone());
        let (node, overlay) = (node.to_string(), overlay.to_string());
        // The overlay's backing edge, then its parents' edges move.
        self.block
            .attach_backing(&overlay, &node)
            .map_err(QmpError::generic)?;
        slot.set(base);
        if let Err(e) = self.block.replace_node(&node, &overlay).await {
            slot.set(None);
            self.block.detach_backing(&overlay);
            return Err(QmpError::generic(e));
        }
        self.block.refresh_backing_identity(&overlay);
        self.make_read_only(&node).await;
        Ok(json!({}))
    }

    /// blockdev-snapshot's checks, in QSD's order (a transaction makes
    /// them before it changes anything).
    pub(super) fn blockdev_snapshot_checks(&self, args: &Map<String, Value>) -> QmpResult<()> {
        let node = arg_str(args, "node");
        let overlay = arg_str(args, "overlay");
        if self.block.find(node).is_none() {
            return Err(not_found(node, node));
        }
        let Some(ov) = self.block.find(overlay) else {
            return Err(not_found(overlay, overlay));
        };
        self.backing_busy(node).map_err(QmpError::generic)?;
        if !ov.users.is_empty()
            || self
                .block
                .parents(overlay)
                .iter()
                .any(|(_, e)| e.role != "backing")
        {
            return Err(QmpError::generic("The overlay is already in use"));
        }
        let Some(slot) = ov.node.driver.child_slot("backing") else {
            return Err(QmpError::generic(
                "The overlay does not support backing images",
            ));
        };
        if slot.get().is_some() {
            return Err(QmpError::generic("The overlay already has a backing image"));
        }
        if node == overlay {
            return Err(QmpError::generic(format!(
                "Making '{node}' a backing child of '{node}' would create a cycle"
            )));
        }
        if ov.node.read_only() {
            return Err(QmpError::generic("Block node is read-only"));
        }
        Ok(())
    }

    /// Opens the overlay over `base` (its options name `base` as the
    /// backing node) and puts it in `base`'s place; on any failure the
    /// overlay is gone again.
    pub(super) async fn put_overlay(
        &mut self,
        base: &str,
        opts: &Map<String, Value>,
        monitor_owned: bool,
    ) -> QmpResult<Value> {
        let names = self.node_names();
        let len = self.block.entries.len();
        let overlay = self
            .block
            .add_unchecked(&self.objects, opts, monitor_owned)
            .map_err(QmpError::generic)?;
        let has_parents = !self.block.find(base).is_some_and(|e| e.users.is_empty())
            || self.block.parents(base).len() > 1;
        if let Err(e) = self.block.replace_node(base, &overlay).await {
            self.block.forget_since(len);
            return Err(QmpError::generic(e));
        }
        if !has_parents {
            // Nothing uses the overlay: QEMU frees it at once (and the
            // base is left read-only).
            self.block.forget_since(len);
            self.make_read_only(base).await;
            return Ok(json!({}));
        }
        self.make_read_only(base).await;
        self.start_node_actors(&names)
            .await
            .map_err(QmpError::generic)?;
        Ok(json!({}))
    }
}

impl ControlState {
    /// The backing node of `name`, if it has one.
    fn backing_of(&self, name: &str) -> Option<String> {
        self.block
            .find(name)?
            .children
            .iter()
            .find(|e| e.role == "backing")
            .map(|e| e.child.clone())
    }

    /// change-backing-file: writes a new backing file name into the
    /// header of an image in a root node's chain; the open chain stays.
    pub(super) async fn change_backing_file(
        &mut self,
        args: &Map<String, Value>,
    ) -> QmpResult<Value> {
        let device = arg_str(args, "device");
        let image = arg_str(args, "image-node-name");
        let name = arg_str(args, "backing-file");
        if self.block.find(device).is_none() {
            return Err(not_found(device, device));
        }
        if !self.block.parents(device).is_empty() {
            return Err(QmpError::generic("Need a root block node"));
        }
        let Some(img) = self.block.find(image) else {
            return Err(not_found("", image));
        };
        let node = img.node.clone();
        let Some(backing) = self.backing_of(image) else {
            return Err(QmpError::generic(
                "not allowing backing file change on an image without a backing file",
            ));
        };
        // Walk the device's chain down to the image (bounded: the
        // graph caps chains, this is a guard).
        let mut at = Some(device.to_string());
        for _ in 0..256 {
            match &at {
                Some(n) if n != image => at = self.backing_of(n),
                _ => break,
            }
        }
        if at.as_deref() != Some(image) {
            return Err(QmpError::generic(format!(
                "'{device}' and image file are not in the same chain"
            )));
        }
        let fmt = self
            .block
            .find(&backing)
            .map(|e| e.node.driver.name().to_string());
        let full = self.block.resolve_in_image_dir(image, name);
        node.change_backing(name, fmt.as_deref(), full)
            .await
            .map_err(|e| {
                QmpError::generic(format!(
                    "Could not change backing file to '{name}': {}",
                    e.msg
                ))
            })?;
        self.block.refresh_backing_identity(image);
        Ok(json!({}))
    }
}

/// Creates the overlay image file as QEMU's bdrv_img_create does,
/// printing the same `Formatting ...` line.
pub(super) async fn create_overlay_file(
    file: &str,
    size: u64,
    backing: &str,
    backing_fmt: &str,
) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(file)
        .map_err(|e| format!("Could not create '{file}': {}", crate::util::os_msg(&e)))?;
    let named = if backing.is_empty() {
        String::new()
    } else {
        format!(" backing_file={backing} backing_fmt={backing_fmt}")
    };
    println!(
        "Formatting '{file}', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size={size}{named} lazy_refcounts=off refcount_bits=16"
    );
    let d = FileDriver::open(&FileOptions {
        filename: file.into(),
        read_only: false,
        auto_read_only: false,
        direct: false,
        locking: true,
        driver: "file".into(),
        aio: Default::default(),
    })?;
    let node = Node::new(String::new(), Box::new(d), CommonOptions::default());
    crate::block::qcow2::create::create_overlay(&node, size, backing, backing_fmt).await
}

/// Internal snapshots (qcow2): blockdev-snapshot-internal-sync and
/// blockdev-snapshot-delete-internal-sync, with QSD's checks in QSD's
/// order.
impl ControlState {
    /// QEMU's qmp_get_root_bs: these commands take a node no other node
    /// has as a child.
    fn root_node(&self, name: &str) -> QmpResult<()> {
        if self.block.parents(name).is_empty() {
            Ok(())
        } else {
            Err(QmpError::generic("Need a root block node"))
        }
    }

    pub(super) async fn blockdev_snapshot_internal_sync(
        &mut self,
        args: &Map<String, Value>,
    ) -> QmpResult<Value> {
        let device = arg_str(args, "device");
        let name = arg_str(args, "name");
        let Some(node) = self.block.find(device).map(|e| e.node.clone()) else {
            return Err(not_found(device, device));
        };
        self.root_node(device)?;
        if let Some(m) = self.busy(device) {
            return Err(QmpError::generic(m));
        }
        if node.read_only() {
            return Err(QmpError::generic(format!("Device '{device}' is read only")));
        }
        let Some(list) = node.driver.snapshots() else {
            return Err(QmpError::generic(format!(
                "Block format '{}' used by device '{device}' does not support internal snapshots",
                node.driver.name()
            )));
        };
        if name.is_empty() {
            return Err(QmpError::generic("Name is empty"));
        }
        if list.iter().any(|s| s["name"] == name) {
            return Err(QmpError::generic(format!(
                "Snapshot with name '{name}' already exists on device '{device}'"
            )));
        }
        node.driver.snapshot_create(name).await.map_err(|e| {
            QmpError::generic(format!(
                "Failed to create snapshot '{name}' on device '{device}': {}",
                e.msg
            ))
        })?;
        Ok(json!({}))
    }

    pub(super) async fn blockdev_snapshot_delete_internal_sync(
        &mut self,
        args: &Map<String, Value>,
    ) -> QmpResult<Value> {
        let device = arg_str(args, "device");
        let id = args.get("id").and_then(Value::as_str);
        let name = args.get("name").and_then(Value::as_str);
        let Some(node) = self.block.find(device).map(|e| e.node.clone()) else {
            return Err(not_found(device, device));
        };
        self.root_node(device)?;
        if id.is_none() && name.is_none() {
            return Err(QmpError::generic("Name or id must be provided"));
        }
        if let Some(m) = self.busy(device) {
            return Err(QmpError::generic(m));
        }
        let Some(list) = node.driver.snapshots() else {
            return Err(QmpError::generic(
                "Failed to get a snapshot list: Operation not supported",
            ));
        };
        let found = list
            .iter()
            .any(|s| id.is_none_or(|v| s["id"] == v) && name.is_none_or(|v| s["name"] == v));
        if !found {
            return Err(QmpError::generic(format!(
                "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
                id.unwrap_or("null"),
                name.unwrap_or("null")
            )));
        }
        node.driver
            .snapshot_delete(id, name)
            .await
            .map_err(|e| QmpError::generic(format!("Failed to delete snapshot: {}", e.msg)))
    }
}
