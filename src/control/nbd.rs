//! The NBD server and export commands: nbd-server-start/stop,
//! block-export-add/del, query-block-exports, and their command-line forms.
use std::sync::Arc;

use actors::{ChildSpec, Restart};
use serde_json::{json, Map, Value};

use super::{arg_str, ControlState};
use crate::block::child::Child;
use crate::block::perm::Perm;
use crate::nbd::export::{Export, ExportConfig};
use crate::nbd::server::{Server, ServerActor, REGISTRY_NAME};
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

/// QEMU's defaults (since the fix for CVE-2024-7409): a server holds at
/// most 100 clients, and drops one that has not finished its handshake
/// within 10 seconds.
const DEFAULT_MAX_CONNECTIONS: u32 = 100;
const DEFAULT_HANDSHAKE_MAX_SECONDS: u32 = 10;

impl ControlState {
    /// nbd-server-start's legacy address `{type, data: {...}}` made flat.
    pub(super) async fn nbd_server_start_legacy(
        &mut self,
        args: &Map<String, Value>,
    ) -> QmpResult<Value> {
        let mut flat = args.clone();
        if let Some(Value::Object(addr)) = args.get("addr") {
            let mut a = addr
                .get("data")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            a.insert(
                "type".into(),
                addr.get("type").cloned().unwrap_or(Value::Null),
            );
            flat.insert("addr".into(), Value::Object(a));
        }
        self.nbd_server_start(&flat)
            .await
            .map(|()| json!({}))
            .map_err(QmpError::generic)
    }

    /// `--nbd-server` and nbd-server-start with a flat SocketAddress.
    pub(super) async fn nbd_server_start(
        &mut self,
        opts: &Map<String, Value>,
    ) -> Result<(), String> {
        if self.nbd.is_some() {
            return Err("NBD server already running".into());
        }
        if let Some(creds) = opts.get("tls-creds").and_then(Value::as_str) {
            return Err(format!("No TLS credentials with id '{creds}'"));
        }
        let empty = Map::new();
        let addr = opts
            .get("addr")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let atype = arg_str(addr, "type");
        let (listener, path, _) = crate::sockets::listen(atype, addr).await?;
        let server = Arc::new(Server {
            listener,
            path,
            exports: self.exports.clone(),
            max_connections: opts
                .get("max-connections")
                .and_then(Value::as_u64)
                .map_or(DEFAULT_MAX_CONNECTIONS, |n| n as u32),
            handshake_max_seconds: opts
                .get("handshake-max-seconds")
                .and_then(Value::as_u64)
                .map_or(DEFAULT_HANDSHAKE_MAX_SECONDS, |n| n as u32),
            started: self.ctx.started.subscribe(),
        });
        let spec = ChildSpec::actor(
            REGISTRY_NAME,
            Restart::Permanent,
            ServerActor,
            server.clone(),
        );
        actors::supervisor::start_child(&self.ctx.supervisor, spec).await?;
        self.nbd = Some(server);
        Ok(())
    }

    pub(super) async fn nbd_server_stop(&mut self) -> QmpResult<Value> {
        if self.nbd.is_none() {
            return Err(QmpError::generic("NBD server not running"));
        }
        self.delete_all_exports().await;
        actors::supervisor::stop_child_by_id(&self.ctx.supervisor, REGISTRY_NAME).await;
        self.nbd = None;
        Ok(json!({}))
    }

    /// block-export-add and `--export`, with QEMU's checks in its order.
    pub(super) async fn block_export_add(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<(), String> {
        let id = arg_str(args, "id").to_string();
        if crate::objects::check_id(&id).is_err() {
            return Err("Invalid block export id".into());
        }
        if self.exports.list().iter().any(|e| e.id == id) {
            return Err(format!("Block export id '{id}' is already in use"));
        }
        let kind = arg_str(args, "type");
        if kind != "nbd" {
            return Err(format!("rsd does not support '{kind}' exports yet"));
        }
        let node_name = arg_str(args, "node-name").to_string();
        let Some(entry) = self.block.find(&node_name) else {
            return Err(format!("Cannot find device='' nor node-name='{node_name}'"));
        };
        let node = entry.node.clone();
        // Validated as QEMU does; every NBD client already runs on a
        // thread of its own, so the iothread changes nothing else
        // (differences entry 36).
        if let Some(io) = args.get("iothread").and_then(Value::as_str) {
            let found = self
                .objects
                .get(io)
                .is_some_and(|o| o.qom_type() == "iothread");
            if !found {
                return Err(format!("iothread \"{io}\" not found"));
            }
        }
        let writable = args
            .get("writable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if writable && node.read_only() {
            return Err("Cannot export read-only node as writable".into());
        }
        let perm = if writable {
            Perm::CONSISTENT_READ.union(Perm::WRITE)
        } else {
            Perm::CONSISTENT_READ
        };
        // The export's edge to its node: the graph re-points it when the
        // node is replaced (a snapshot).
        let edge = Child::new(node.clone());
        let user = self.block.add_user_on(
            &node_name,
            "an unnamed block device",
            perm,
            Perm::ALL.without(Perm::RESIZE),
            Some(edge.clone()),
        )?;
        let checked = (|| {
            if self.nbd.is_none() {
                return Err("NBD server not running".to_string());
            }
            let name = args
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or(&node_name)
                .to_string();
            if name.len() > 4096 {
                return Err(format!("export name '{name}' too long"));
            }
            if self.exports.find(&name).is_some() {
                return Err(format!("NBD server already has export named '{name}'"));
            }
            if let Some(Value::Array(bitmaps)) = args.get("bitmaps") {
                if let Some(b) = bitmaps.first() {
                    let bname = b
                        .as_str()
                        .or_else(|| b.get("name").and_then(Value::as_str))
                        .unwrap_or_default();
                    return Err(format!("Bitmap '{bname}' is not found"));
                }
            }
            Ok(name)
        })();
        let name = match checked {
            Ok(n) => n,
            Err(e) => {
                self.block.remove_user(user);
                return Err(e);
            }
        };
        let flag = |k: &str| args.get(k).and_then(Value::as_bool).unwrap_or(false);
        let export = Export::new(ExportConfig {
            id,
            name,
            description: args
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
            node: edge,
            writable,
            writethrough: flag("writethrough"),
            allocation_depth: flag("allocation-depth"),
            multi_conn: self.nbd.as_ref().is_none_or(|s| s.max_connections != 1),
            user,
        });
        self.exports.add(export);
        Ok(())
    }

    pub(super) async fn block_export_del(&mut self, id: &str, hard: bool) -> QmpResult<Value> {
        let Some(export) = self.exports.list().into_iter().find(|e| e.id == id) else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        if !hard && export.clients() > 0 {
            return Err(QmpError::generic(format!("export '{id}' still in use")));
        }
        self.delete_export(&export).await;
        Ok(json!({}))
    }

    /// Drops the export's clients, releases its node and announces it.
    async fn delete_export(&mut self, export: &Arc<Export>) {
        self.exports.remove(&export.id);
        export.close_all();
        export.no_clients(std::time::Duration::from_secs(5)).await;
        // Drain the export's edge: requests in flight finish before the
        // node is released, and none can start after.
        // (Bounded like the wait for clients: a hung request must not
        // hang the monitor.)
        let limit = std::time::Duration::from_secs(5);
        let held = tokio::time::timeout(limit, export.node.quiesce()).await;
        export.node.set(None);
        drop(held);
        self.block.remove_user(export.user);
        let mut data = Map::new();
        data.insert("id".into(), json!(export.id));
        self.ctx.events.emit("BLOCK_EXPORT_DELETED", Some(data));
    }

    /// The exit path and nbd-server-stop: every export goes, newest first
    /// as QEMU walks its list.
    pub(super) async fn delete_all_exports(&mut self) {
        for e in self.exports.list().into_iter().rev() {
            self.delete_export(&e).await;
        }
    }

    pub(super) fn query_block_exports(&self) -> Value {
        Value::Array(
            self.exports
                .list()
                .iter()
                .rev()
                .map(|e| {
                    let node = e.node.get().map(|n| n.name.clone()).unwrap_or_default();
                    json!({"node-name": node, "shutting-down": false, "type": "nbd", "id": e.id})
                })
                .collect(),
        )
    }
}
