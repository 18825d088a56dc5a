//! The block-export commands across export types: block-export-add
//! (and `--export`), block-export-del, query-block-exports. The checks
//! every type shares run here in QEMU's order; each type then adds its
//! own (`nbd_export_create`). Every export gets a supervised actor.
use std::sync::Arc;

use actors::{ChildSpec, Restart};
use serde_json::{json, Map, Value};

use super::{arg_str, ControlState};
use crate::block::child::Child;
use crate::block::perm::Perm;
use crate::exports::actor::{registry_name, ExportActor, ExportMsg};
use crate::exports::BlockExport;
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

/// The export types rsd serves.
const EXPORT_TYPES: &[&str] = &["nbd", "vhost-user-blk", "fuse"];

/// What block-export-add decided for every export type.
pub(super) struct ExportCommon {
    pub id: String,
    pub node_name: String,
    pub writable: bool,
    /// The export's edge to its node (re-pointed by a snapshot).
    pub edge: Arc<Child>,
    /// The graph user holding the export's permissions.
    pub user: u64,
    /// Where the export serves (docs/iothreads.md).
    pub placement: Arc<crate::iothread::Placement>,
}

/// The FUSE export's own options (QEMU's fuse_export_create).
async fn fuse_export_create(
    c: &ExportCommon,
    args: &Map<String, Value>,
) -> Result<Arc<dyn BlockExport>, String> {
    let allow_other = match args.get("allow-other").and_then(Value::as_str) {
        Some("on") => Some(true),
        Some("off") => Some(false),
        _ => None,
    };
    let e = crate::exports::fuse::FuseExport::create(crate::exports::fuse::FuseConfig {
        id: c.id.clone(),
        mountpoint: arg_str(args, "mountpoint").to_string(),
        writable: c.writable,
        growable: args.get("growable").and_then(Value::as_bool) == Some(true),
        allow_other,
        edge: c.edge.clone(),
        user: c.user,
        placement: c.placement.clone(),
    })
    .await?;
    Ok(e)
}

impl ControlState {
    /// block-export-add (`monitor`) and `--export`, with QEMU's checks in
    /// its order.
    pub(super) async fn block_export_add(
        &mut self,
        args: &Map<String, Value>,
        monitor: bool,
    ) -> Result<(), String> {
        let id = arg_str(args, "id").to_string();
        if crate::objects::check_id(&id).is_err() {
            return Err("Invalid block export id".into());
        }
        if self.exports.find(&id).is_some() {
            return Err(format!("Block export id '{id}' is already in use"));
        }
        let kind = arg_str(args, "type");
        if !EXPORT_TYPES.contains(&kind) {
            return Err(format!("rsd does not support '{kind}' exports yet"));
        }
        let node_name = arg_str(args, "node-name").to_string();
        let Some(entry) = self.block.find(&node_name) else {
            return Err(format!("Cannot find device='' nor node-name='{node_name}'"));
        };
        let node = entry.node.clone();
        // QEMU activates the node of an export that does not allow an
        // inactive one, before its other checks (an error there leaves
        // the node active).
        let allow_inactive = args.get("allow-inactive").and_then(Value::as_bool) == Some(true);
        if allow_inactive {
            if kind != "nbd" {
                return Err("Export type does not support inactive exports".into());
            }
        } else {
            let _ = self.block.activate(&node_name).await;
        }
        let writable = args
            .get("writable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if writable && node.read_only() {
            return Err("Cannot export read-only node as writable".into());
        }
        // The node may move to the export's iothread now (QEMU does not
        // move it back if a later check fails).
        let placement = self.export_placement(&node_name, args)?;
        let mut perm = if writable {
            Perm::CONSISTENT_READ.union(Perm::WRITE)
        } else {
            Perm::CONSISTENT_READ
        };
        let growable = args.get("growable").and_then(Value::as_bool) == Some(true);
        if kind == "fuse" && (writable || growable) {
            // Truncate and growing writes resize the node (QEMU takes the
            // permission for good).
            perm = perm.union(Perm::RESIZE);
        }
        if kind == "fuse" {
            let mp = arg_str(args, "mountpoint");
            let taken = self
                .exports
                .of_type::<crate::exports::fuse::FuseExport>()
                .iter()
                .any(|e| e.mountpoint == mp);
            if taken {
                return Err(format!("There already is a FUSE export on '{mp}'"));
            }
        }
        // NBD does not let the node be resized under its clients;
        // vhost-user-blk (which tells its frontend) and FUSE do, as QEMU.
        let shared = if kind == "vhost-user-blk" || kind == "fuse" {
            Perm::ALL
        } else {
            Perm::ALL.without(Perm::RESIZE)
        };
        let edge = Child::new(node);
        let user = self.block.add_user_on(
            &node_name,
            "an unnamed block device",
            perm,
            shared,
            Some(edge.clone()),
        )?;
        if allow_inactive {
            self.block.set_user_allow_inactive(user);
        }
        let common = ExportCommon {
            id,
            node_name,
            writable,
            edge,
            user,
            placement,
        };
        let created = match kind {
            "nbd" => self.nbd_export_create(&common, args),
            "fuse" => fuse_export_create(&common, args).await,
            "vhost-user-blk" => self.vhost_user_export_create(&common, args, monitor).await,
            other => Err(format!("rsd does not support '{other}' exports yet")),
        };
        let export = match created {
            Ok(e) => e,
            Err(e) => {
                self.block.remove_user(user);
                return Err(e);
            }
        };
        let spec = ChildSpec::actor(
            registry_name(export.id()),
            Restart::Transient,
            ExportActor,
            export.clone(),
        );
        if let Err(e) = actors::supervisor::start_child(&self.ctx.supervisor, spec).await {
            export.close();
            self.block.remove_user(user);
            return Err(e);
        }
        tracing::info!(
            target: "export_add",
            id = %export.id(),
            export_type = kind,
            node = %arg_str(args, "node-name"),
            "export added"
        );
        self.exports.add(export);
        Ok(())
    }

    pub(super) async fn block_export_del(&mut self, id: &str, hard: bool) -> QmpResult<Value> {
        let Some(export) = self.exports.find(id) else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        if !hard && export.clients() > 0 {
            // Clients that have hung up are gone for the user (qemu-img
            // has exited); wait for their connections to end instead of
            // losing a race with their teardown.
            if export.clients_staying() == 0 {
                export.no_clients(std::time::Duration::from_secs(5)).await;
            }
            if export.clients() > 0 {
                return Err(QmpError::generic(format!("export '{id}' still in use")));
            }
        }
        self.delete_export(&export).await;
        Ok(json!({}))
    }

    /// Ends the export's service (its actor drops the clients and drains
    /// the edge), releases its node and announces it.
    async fn delete_export(&mut self, export: &Arc<dyn BlockExport>) {
        self.exports.remove(export.id());
        let actor = ractor::registry::where_is(registry_name(export.id()))
            .map(ractor::ActorRef::<ExportMsg>::from);
        let done = match actor {
            Some(a) => ractor::call!(a, ExportMsg::Shutdown).is_ok(),
            None => false,
        };
        if !done {
            // No actor (it failed for good): end the service here.
            crate::exports::shut_down(export.as_ref()).await;
        }
        self.block.remove_user(export.user());
        tracing::info!(target: "export_del", id = %export.id(), "export deleted");
        let mut data = Map::new();
        data.insert("id".into(), json!(export.id()));
        self.ctx.events.emit("BLOCK_EXPORT_DELETED", Some(data));
    }

    /// The exit path (every type) and nbd-server-stop (one type): the
    /// exports go newest first, as QEMU walks its list.
    pub(super) async fn delete_exports(&mut self, kind: Option<&str>) {
        for e in self.exports.list().into_iter().rev() {
            if kind.is_none_or(|k| k == e.kind()) {
                self.delete_export(&e).await;
            }
        }
    }

    pub(super) fn query_block_exports(&self) -> Value {
        Value::Array(
            self.exports
                .list()
                .iter()
                .rev()
                .map(|e| {
                    let node = e.node().get().map(|n| n.name.clone()).unwrap_or_default();
                    json!({"node-name": node, "shutting-down": false, "type": e.kind(), "id": e.id()})
                })
                .collect(),
        )
    }
}
