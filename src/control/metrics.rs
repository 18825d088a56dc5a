//! rsd's metrics listener commands: `--metrics-server` and
//! `__org.rsd_metrics-server-start`/`-stop` (QAPI's naming rule for
//! downstream extensions), on the same socket addresses as the NBD
//! server.
use std::sync::Arc;

use actors::{ChildSpec, Restart};
use serde_json::{json, Map, Value};

use super::{arg_str, ControlState};
use crate::metrics::server::{MetricsServer, MetricsServerActor, REGISTRY_NAME};
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

impl ControlState {
    /// Opens the listener and starts the server actor; the address is a
    /// flat SocketAddress (`addr.type=inet,addr.host=...`).
    pub(super) async fn metrics_server_start(
        &mut self,
        opts: &Map<String, Value>,
    ) -> Result<(), String> {
        if self.metrics_server.is_some() {
            return Err("Metrics server already running".into());
        }
        let empty = Map::new();
        let addr = opts
            .get("addr")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let (listener, path, _) = crate::sockets::listen(arg_str(addr, "type"), addr).await?;
        let server = Arc::new(MetricsServer::new(listener, path, self.ctx.metrics.clone()));
        let spec = ChildSpec::actor(
            REGISTRY_NAME,
            Restart::Permanent,
            MetricsServerActor,
            server.clone(),
        );
        actors::supervisor::start_child(&self.ctx.supervisor, spec).await?;
        self.metrics_server = Some(server);
        Ok(())
    }

    pub(super) async fn metrics_server_stop(&mut self) -> QmpResult<Value> {
        let Some(server) = self.metrics_server.take() else {
            return Err(QmpError::generic("Metrics server not running"));
        };
        actors::supervisor::stop_child_by_id(&self.ctx.supervisor, REGISTRY_NAME).await;
        // Gone when the command returns, whoever still holds the server.
        server.unlink();
        Ok(json!({}))
    }
}
