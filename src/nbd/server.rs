//! The NBD server actor: accepts clients on its listening socket (at most
//! `max-connections` at once) and serves each on its own task.
use std::os::fd::AsRawFd;
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
    /// Clients are accepted once this is true (the daemon has started).
    pub started: tokio::sync::watch::Receiver<bool>,
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

/// An accepted client, detached from the runtime that accepted it.
enum Client {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

/// Lets a UNIX socket hold several large replies (the default holds
/// about 200 KiB): a 1 MiB read is then sent in one go instead of in
/// steps paced by the client's reads, each a wake-up on both sides
/// (1M reads at QD8 went from 1.0-1.1 to 1.4-1.5 of nbdkit). TCP keeps
/// the kernel's autotuning. The kernel caps the size at `wmem_max`
/// unless rsd may force it (CAP_NET_ADMIN); either way is fine.
fn widen_send_buffer(s: &tokio::net::UnixStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    const SIZE: usize = 4 << 20;
    if setsockopt(s, sockopt::SndBufForce, &SIZE).is_err() {
        let _ = setsockopt(s, sockopt::SndBuf, &SIZE);
    }
}

async fn accept(listener: &Listener) -> std::io::Result<Client> {
    match listener {
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            widen_send_buffer(&s);
            Ok(Client::Unix(s.into_std()?))
        }
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok(Client::Tcp(s.into_std()?))
        }
    }
}

/// Serves one client on a thread of its own with a single-threaded
/// runtime: the thread sleeps in its own epoll and wakes straight into
/// the connection, with no hand-off between worker threads (as nbdkit's
/// thread per connection, and measurably faster at queue depth 1).
fn serve_on_own_thread(
    client: Client,
    exports: Exports,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let spawned = std::thread::Builder::new()
        .name("nbd-client".into())
        .stack_size(8 << 20)
        .spawn(move || {
            let _permit = permit;
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let fd = match &client {
                    Client::Unix(s) => s.as_raw_fd(),
                    Client::Tcp(s) => s.as_raw_fd(),
                };
                let halves: std::io::Result<(super::conn::Reader, super::conn::Writer)> =
                    match client {
                        Client::Unix(s) => tokio::net::UnixStream::from_std(s).map(|s| {
                            let (r, w) = s.into_split();
                            (Box::pin(r) as _, Box::pin(w) as _)
                        }),
                        Client::Tcp(s) => tokio::net::TcpStream::from_std(s).map(|s| {
                            let (r, w) = s.into_split();
                            (Box::pin(r) as _, Box::pin(w) as _)
                        }),
                    };
                let halves = halves.map(|(r, w)| (super::spin::SpinReader::new(r, fd), w));
                if let Ok((r, w)) = halves {
                    let may_spin = r.allow();
                    super::conn::serve(Box::pin(r), w, exports, may_spin).await;
                }
            });
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start an NBD client thread");
    }
}

async fn accept_loop(server: Arc<Server>) {
    let limit = if server.max_connections == 0 {
        Semaphore::MAX_PERMITS
    } else {
        server.max_connections as usize
    };
    let slots = Arc::new(Semaphore::new(limit));
    let mut started = server.started.clone();
    if started.wait_for(|s| *s).await.is_err() {
        return;
    }
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match accept(&server.listener).await {
            Ok(client) => {
                tracing::trace!(target: "nbd_accept", "client accepted");
                serve_on_own_thread(client, server.exports.clone(), permit);
            }
            Err(e) => {
                tracing::warn!(error = %e, "NBD accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
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
