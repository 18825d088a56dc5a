//! The metrics-server actor: the listening socket of `--metrics-server`
//! (or `__org.rsd_metrics-server-start`) and its accept loop. Each
//! connection is served on a task of its own, at most `MAX_CLIENTS` at
//! once (more wait in the listen backlog), so a slow client never holds
//! up a scrape or a health probe. Unlike the NBD server it answers from
//! the moment it listens: /readyz says 503 until start-up is done.
use std::path::PathBuf;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Semaphore;

use super::{Metrics, Served};
use crate::sockets::Listener;
use crate::util::{watched, Watched};

pub const REGISTRY_NAME: &str = "metrics-server";

/// Connections served at once.
const MAX_CLIENTS: usize = 32;

/// An opened listener and what it serves; shared with restarts.
pub struct MetricsServer {
    pub listener: Listener,
    /// The UNIX socket's path and its inode, to unlink it when the
    /// server stops, unless another socket has taken the path by then.
    socket: Option<(PathBuf, (u64, u64))>,
    pub metrics: Arc<Metrics>,
}

fn inode(p: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl MetricsServer {
    pub fn new(listener: Listener, path: Option<PathBuf>, metrics: Arc<Metrics>) -> MetricsServer {
        let socket = path.and_then(|p| inode(&p).map(|i| (p, i)));
        MetricsServer {
            listener,
            socket,
            metrics,
        }
    }

    /// Removes the socket file if it is still this server's.
    pub fn unlink(&self) {
        if let Some((p, ino)) = &self.socket {
            if inode(p) == Some(*ino) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.unlink();
    }
}

pub enum MetricsServerMsg {
    /// The accept loop ended (it never should): fail, to be restarted.
    LoopEnded(String),
    /// Test hook: fail inside the handler.
    Crash,
}

pub struct State {
    _accept: Watched,
}

#[derive(Clone)]
pub struct MetricsServerActor;

async fn accept_loop(server: Arc<MetricsServer>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let served: Arc<Served> = Arc::new(Served(server.metrics.clone()));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let served = served.clone();
        match &server.listener {
            Listener::Unix(l) => match l.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(async move {
                        observability::http::serve_connection(s, &*served).await;
                        drop(permit);
                    });
                }
                Err(e) => pause_after(e).await,
            },
            Listener::Tcp(l) => match l.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(async move {
                        observability::http::serve_connection(s, &*served).await;
                        drop(permit);
                    });
                }
                Err(e) => pause_after(e).await,
            },
        }
    }
}

/// A failed accept (out of descriptors): wait a little, then retry.
async fn pause_after(e: std::io::Error) {
    tracing::debug!("metrics server: cannot accept: {e}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

impl Actor for MetricsServerActor {
    type Msg = MetricsServerMsg;
    type State = State;
    type Arguments = Arc<MetricsServer>;

    async fn pre_start(
        &self,
        myself: ActorRef<MetricsServerMsg>,
        server: Arc<MetricsServer>,
    ) -> Result<State, ActorProcessingErr> {
        Ok(State {
            _accept: watched("accept loop", accept_loop(server), move |why| {
                let _ = myself.cast(MetricsServerMsg::LoopEnded(why));
            }),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<MetricsServerMsg>,
        msg: MetricsServerMsg,
        _state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MetricsServerMsg::LoopEnded(why) => Err(format!("metrics server: {why}").into()),
            MetricsServerMsg::Crash => Err("test hook: metrics server crash requested".into()),
        }
    }
}
