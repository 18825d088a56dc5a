//! The NBD server actor: accepts clients on its listening socket (at most
//! `max-connections` at once) and serves each on its own task.
use std::path::PathBuf;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Semaphore;

use super::export::Exports;
use crate::chardev::actor::AbortOnDrop;
use crate::chardev::backend::Listener;

pub const REGISTRY_NAME: &str = "nbd-server";

/// An opened server socket and what it serves. Shared with restarts.
pub struct Server {
    pub listener: Listener,
    /// Unlinked when the server stops (QSD leaves it behind).
    pub path: Option<PathBuf>,
    pub exports: Exports,
    /// 0 = unlimited.
    pub max_connections: u32,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub enum ServerMsg {
    /// Test hook: fail inside the handler.
    Crash,
}

#[derive(Clone)]
pub struct ServerActor;

async fn accept_loop(server: Arc<Server>) {
    let limit = if server.max_connections == 0 {
        Semaphore::MAX_PERMITS
    } else {
        server.max_connections as usize
    };
    let slots = Arc::new(Semaphore::new(limit));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let conn = match server.listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "NBD accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        tracing::trace!(target: "nbd_accept", peer = ?conn.peer);
        let exports = server.exports.clone();
        tokio::spawn(async move {
            super::conn::serve(conn.read, conn.write, exports).await;
            drop(permit);
        });
    }
}

impl Actor for ServerActor {
    type Msg = ServerMsg;
    type State = AbortOnDrop;
    type Arguments = Arc<Server>;

    async fn pre_start(
        &self,
        _myself: ActorRef<ServerMsg>,
        server: Arc<Server>,
    ) -> Result<AbortOnDrop, ActorProcessingErr> {
        Ok(AbortOnDrop(tokio::spawn(accept_loop(server))))
    }

    async fn handle(
        &self,
        _myself: ActorRef<ServerMsg>,
        msg: ServerMsg,
        _state: &mut AbortOnDrop,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServerMsg::Crash => Err("test hook: NBD server crash requested".into()),
        }
    }
}
