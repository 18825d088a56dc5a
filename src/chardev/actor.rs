//! The chardev actor: serves its endpoint's connections to the attached
//! frontend one at a time. A second client of a socket waits in the listen
//! backlog until the first one leaves, as with QSD.
use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{oneshot, watch};

use super::backend::{Backend, Conn};
use crate::util::AbortOnDrop;

/// The name a chardev's actor registers under.
pub fn registry_name(id: &str) -> String {
    format!("chardev/{id}")
}

pub enum ChardevMsg {
    /// Attach a frontend that receives connections.
    Attach(UnboundedSender<Conn>, RpcReplyPort<()>),
    /// (filename, frontend-open) for query-chardev.
    Info(RpcReplyPort<(String, bool)>),
    /// Test hook: fail inside the handler.
    Crash,
}

#[derive(Clone)]
pub struct ChardevActor;

pub struct ChardevState {
    backend: Arc<Backend>,
    frontend: watch::Sender<Option<UnboundedSender<Conn>>>,
    /// The connected client's peer text ("" for UNIX), None when idle.
    connected: Arc<Mutex<Option<String>>>,
    _serve: AbortOnDrop,
}

async fn next_conn(backend: &Backend) -> Option<Conn> {
    match backend {
        Backend::Server {
            listener, first, ..
        } => {
            if let Some(c) = first.lock().await.take() {
                return Some(c);
            }
            loop {
                match listener.accept().await {
                    Ok(c) => return Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }
        Backend::Client { conn, .. } => conn.lock().await.take(),
        Backend::Stdio(conn) => conn.lock().await.take(),
        _ => None,
    }
}

fn set(slot: &Mutex<Option<String>>, v: Option<String>) {
    if let Ok(mut s) = slot.lock() {
        *s = v;
    }
}

/// The attached frontend, once there is a live one (None: the chardev
/// is going away).
async fn live_frontend(
    frontend: &mut watch::Receiver<Option<UnboundedSender<Conn>>>,
) -> Option<UnboundedSender<Conn>> {
    loop {
        let current = frontend.borrow_and_update().clone();
        match current {
            Some(tx) if !tx.is_closed() => return Some(tx),
            _ => frontend.changed().await.ok()?,
        }
    }
}

async fn serve(
    backend: Arc<Backend>,
    mut frontend: watch::Receiver<Option<UnboundedSender<Conn>>>,
    connected: Arc<Mutex<Option<String>>>,
) {
    loop {
        // Accept only while a frontend is attached.
        if live_frontend(&mut frontend).await.is_none() {
            return;
        }
        let Some(mut conn) = next_conn(&backend).await else {
            // One-shot endpoints (stdio, client sockets) are used up.
            return std::future::pending().await;
        };
        tracing::trace!(target: "chardev_accept", peer = ?conn.peer);
        let (done_tx, done_rx) = oneshot::channel();
        conn.done = done_tx;
        set(&connected, Some(conn.peer.clone().unwrap_or_default()));
        // The frontend may have been replaced while the client was
        // awaited (a restarted monitor): the client goes to the current
        // one, never to the one that died.
        loop {
            let Some(tx) = live_frontend(&mut frontend).await else {
                return;
            };
            match tx.send(conn) {
                Ok(()) => break,
                Err(back) => conn = back.0,
            }
        }
        let _ = done_rx.await;
        set(&connected, None);
    }
}

impl Actor for ChardevActor {
    type Msg = ChardevMsg;
    type State = ChardevState;
    type Arguments = Arc<Backend>;

    async fn pre_start(
        &self,
        _myself: ActorRef<ChardevMsg>,
        backend: Arc<Backend>,
    ) -> Result<ChardevState, ActorProcessingErr> {
        let (frontend, rx) = watch::channel(None);
        let connected = Arc::new(Mutex::new(None));
        let serve = tokio::spawn(serve(backend.clone(), rx, connected.clone()));
        Ok(ChardevState {
            backend,
            frontend,
            connected,
            _serve: AbortOnDrop(serve),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ChardevMsg>,
        msg: ChardevMsg,
        state: &mut ChardevState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ChardevMsg::Attach(tx, reply) => {
                state.frontend.send_replace(Some(tx));
                let _ = reply.send(());
            }
            ChardevMsg::Info(reply) => {
                let open = state
                    .frontend
                    .borrow()
                    .as_ref()
                    .is_some_and(|tx| !tx.is_closed());
                let peer = state.connected.lock().ok().and_then(|p| p.clone());
                let _ = reply.send((state.backend.filename(peer.as_deref()), open));
            }
            ChardevMsg::Crash => return Err("test hook: chardev crash requested".into()),
        }
        Ok(())
    }
}
