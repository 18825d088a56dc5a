//! The NBD server commands (nbd-server-start/stop and `--nbd-server`)
//! and the NBD half of block-export-add.
use std::sync::Arc;

use actors::{ChildSpec, Restart};
use serde_json::{json, Map, Value};

use super::exports::ExportCommon;
use super::{arg_str, ControlState};
use crate::exports::BlockExport;
use crate::nbd::export::{Export, ExportConfig, Exports};
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
            exports: self.nbd_exports(),
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
        // Only NBD exports go, as QEMU closes the exports of one type.
        self.delete_exports(Some("nbd")).await;
        actors::supervisor::stop_child_by_id(&self.ctx.supervisor, REGISTRY_NAME).await;
        self.nbd = None;
        Ok(json!({}))
    }

    /// The NBD half of block-export-add: the server must run, and the
    /// export's name must be new and its bitmaps known.
    pub(super) fn nbd_export_create(
        &self,
        c: &ExportCommon,
        args: &Map<String, Value>,
    ) -> Result<Arc<dyn BlockExport>, String> {
        let Some(server) = &self.nbd else {
            return Err("NBD server not running".to_string());
        };
        let name = args
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(&c.node_name)
            .to_string();
        if name.len() > 4096 {
            return Err(format!("export name '{name}' too long"));
        }
        if self.nbd_exports().find(&name).is_some() {
            return Err(format!("NBD server already has export named '{name}'"));
        }
        let bitmaps = self.export_bitmaps(c, args)?;
        let flag = |k: &str| args.get(k).and_then(Value::as_bool).unwrap_or(false);
        Ok(Export::new(ExportConfig {
            id: c.id.clone(),
            name,
            description: args
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
            node: c.edge.clone(),
            writable: c.writable,
            writethrough: flag("writethrough"),
            allocation_depth: flag("allocation-depth"),
            bitmaps,
            multi_conn: server.max_connections != 1,
            user: c.user,
            placement: c.placement.clone(),
        }))
    }

    /// The export's `bitmaps`, with QEMU's checks: a name is looked up on
    /// the node and down its backing chain, {node, name} exactly; a
    /// bitmap must not be busy or inconsistent, and a read-only export
    /// of a writable node takes only disabled bitmaps.
    fn export_bitmaps(
        &self,
        c: &ExportCommon,
        args: &Map<String, Value>,
    ) -> Result<Vec<Arc<crate::block::dirty::NamedBitmap>>, String> {
        let mut out: Vec<Arc<crate::block::dirty::NamedBitmap>> = Vec::new();
        let list = args.get("bitmaps").and_then(Value::as_array);
        for r in list.into_iter().flatten() {
            let Some(mut e) = self.block.find(&c.node_name) else {
                return Err(format!("Node '{}' not found", c.node_name));
            };
            let b = match r.as_str() {
                Some(name) => loop {
                    if let Some(b) = e.node.bitmaps.find(name) {
                        break b;
                    }
                    match self.block.child_of(e, "backing") {
                        Some(next) => e = next,
                        None => return Err(format!("Bitmap '{name}' is not found")),
                    }
                },
                None => {
                    let node = r.get("node").and_then(Value::as_str).unwrap_or_default();
                    let name = r.get("name").and_then(Value::as_str).unwrap_or_default();
                    super::bitmaps::lookup(&self.block, node, name)?.1
                }
            };
            b.check(crate::block::dirty::Check::AllowRo)?;
            if !c.writable && !e.node.read_only() && b.enabled() {
                return Err(format!(
                    "Enabled bitmap '{}' incompatible with readonly export",
                    b.name
                ));
            }
            if !out.iter().any(|x| Arc::ptr_eq(x, &b)) {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// The NBD exports, as the server finds them by name.
    pub(super) fn nbd_exports(&self) -> Exports {
        Exports(self.exports.clone())
    }
}
