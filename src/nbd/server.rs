//! The NBD server actor: accepts clients on its listening socket (at most
//! `max-connections` at once, QEMU's default 100), runs each handshake on
//! the daemon's runtime within `handshake-max-seconds` (default 10), then
//! serves the client's transmission on a thread of its own, or on the
//! export's iothread.
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::conn::{transmission, Reader, Writer};
use super::export::Exports;
use super::handshake::{handshake, Session};
use crate::iothread::PollParams;
use crate::sockets::Listener;
use crate::util::{watched, Watched};

pub const REGISTRY_NAME: &str = "nbd-server";

/// An opened server socket and what it serves. Shared with restarts.
pub struct Server {
    pub listener: Listener,
    /// Unlinked when the server stops (QSD leaves it behind).
    pub path: Option<PathBuf>,
    pub exports: Exports,
    /// 0 = unlimited.
    pub max_connections: u32,
    /// A client that has not finished the handshake by then is dropped;
    /// 0 = no limit.
    pub handshake_max_seconds: u32,
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
    /// The accept loop ended (it never should): fail, to be restarted.
    LoopEnded(String),
    /// Test hook: fail inside the handler.
    Crash,
}

/// The accept loop, watched; it stops with the actor.
pub struct ServerState {
    _accept: Watched,
}

#[derive(Clone)]
pub struct ServerActor;

/// An accepted client.
enum Client {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
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

/// A client and its address, for the log and the connection's span.
async fn accept(listener: &Listener) -> std::io::Result<(Client, String)> {
    match listener {
        Listener::Unix(l) => {
            let (s, addr) = l.accept().await?;
            widen_send_buffer(&s);
            let peer = addr
                .as_pathname()
                .map_or_else(|| "unix".to_string(), |p| p.display().to_string());
            Ok((Client::Unix(s), peer))
        }
        Listener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Client::Tcp(s), addr.to_string()))
        }
    }
}

/// Runs the handshake on the daemon's runtime, bounded by
/// `handshake-max-seconds` (0: no bound). A client that has not chosen an
/// export costs one descriptor and no thread. Why a client failed is
/// printed on stderr in QSD's words; at the time limit the socket is
/// shut down, as QEMU does, so the handshake ends as for a client that
/// left at that point.
async fn shake(
    client: &mut Client,
    exports: &Exports,
    max_secs: u32,
    conn_span: &tracing::Span,
) -> Option<Session> {
    use std::os::fd::AsRawFd;
    let fd = match client {
        Client::Unix(s) => s.as_raw_fd(),
        Client::Tcp(s) => s.as_raw_fd(),
    };
    let work = async {
        match client {
            Client::Unix(s) => {
                let (mut r, mut w) = s.split();
                handshake(&mut r, &mut w, exports).await
            }
            Client::Tcp(s) => {
                let (mut r, mut w) = s.split();
                handshake(&mut r, &mut w, exports).await
            }
        }
    };
    let span = super::trace::handshake_span(conn_span);
    let work = work.instrument(span.clone());
    tokio::pin!(work);
    let limit = async {
        match max_secs {
            0 => std::future::pending().await,
            n => tokio::time::sleep(std::time::Duration::from_secs(u64::from(n))).await,
        }
    };
    let outcome = tokio::select! {
        r = &mut work => r,
        _ = limit => {
            tracing::trace!(target: "nbd_handshake", "handshake took over {max_secs} s: shutting the socket down");
            // The descriptor is the client's, open while `client` is.
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
            work.await
        }
    };
    match outcome {
        Ok(session) => Some(session),
        Err(Some(why)) => {
            eprintln!("rsd: option negotiation failed: {why}");
            super::trace::failed(&span, &why);
            super::trace::failed(conn_span, &why);
            None
        }
        Err(None) => None,
    }
}

/// A client detached from the accepting runtime's reactor, for the
/// reactor of the thread that serves it.
enum Std {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Std {
    fn detach(client: Client) -> std::io::Result<Std> {
        Ok(match client {
            Client::Unix(s) => Std::Unix(s.into_std()?),
            Client::Tcp(s) => Std::Tcp(s.into_std()?),
        })
    }
}

/// The client's transmission phase, on the runtime of the thread that
/// polls it (registered with that thread's reactor). On an iothread,
/// the socket is polled within the iothread's polling parameters.
async fn serve(client: Std, session: Session, iothread: Option<Arc<PollParams>>) {
    let fd = match &client {
        Std::Unix(s) => s.as_raw_fd(),
        Std::Tcp(s) => s.as_raw_fd(),
    };
    let halves: std::io::Result<(Reader, Writer)> = match client {
        Std::Unix(s) => tokio::net::UnixStream::from_std(s).map(|s| {
            let (r, w) = s.into_split();
            (Box::pin(r) as _, Box::pin(w) as _)
        }),
        Std::Tcp(s) => tokio::net::TcpStream::from_std(s).map(|s| {
            let (r, w) = s.into_split();
            (Box::pin(r) as _, Box::pin(w) as _)
        }),
    };
    let Ok((r, w)) = halves else {
        return;
    };
    let mut r = super::spin::SpinReader::new(r, fd);
    let _serving = iothread.as_ref().map(|p| p.serving());
    if let Some(p) = iothread {
        r = r.with_params(p);
    }
    let may_spin = r.allow();
    let span = session
        .trace
        .as_ref()
        .map_or_else(tracing::Span::none, |t| t.span.clone());
    transmission(Box::pin(r), w, session, may_spin)
        .instrument(span)
        .await;
}

/// Serves a client's transmission phase where its export serves: on the
/// export's iothread, or by default on a thread of its own with a
/// single-threaded runtime: the thread sleeps in its own epoll and wakes
/// straight into the connection, with no hand-off between worker
/// threads (as nbdkit's thread per connection, and measurably faster at
/// queue depth 1).
fn serve_where_placed(
    client: Client,
    session: Session,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> std::io::Result<()> {
    let client = Std::detach(client)?;
    if let Some(io) = session.export.placement.current() {
        let poll = io.poll.clone();
        let served = io.spawn_with(move || async move {
            let _permit = permit;
            serve(client, session, Some(poll)).await;
        });
        return if served {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "iothread {} has stopped",
                io.id
            )))
        };
    }
    std::thread::Builder::new()
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
            rt.block_on(serve(client, session, None));
        })
        .map(|_| ())
}

/// Says once per server that a limit was reached, so an operator sees
/// why clients wait, without a line per client.
#[derive(Default)]
struct Once(std::sync::atomic::AtomicBool);
impl Once {
    fn warn(&self, msg: std::fmt::Arguments<'_>) {
        if !self.0.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("rsd: NBD server: {msg}");
        }
    }
}

async fn accept_loop(server: Arc<Server>) {
    let limit = if server.max_connections == 0 {
        Semaphore::MAX_PERMITS
    } else {
        server.max_connections as usize
    };
    let slots = Arc::new(Semaphore::new(limit));
    let (full, no_fds, no_threads) = (Once::default(), Once::default(), Arc::new(Once::default()));
    let mut started = server.started.clone();
    if started.wait_for(|s| *s).await.is_err() {
        return;
    }
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // As QEMU: stop accepting; new clients wait in the
                // listen backlog until a connection ends.
                full.warn(format_args!(
                    "{limit} clients connected (max-connections); new clients wait until one leaves"
                ));
                let Ok(p) = slots.clone().acquire_owned().await else {
                    return;
                };
                p
            }
        };
        match accept(&server.listener).await {
            Ok((mut client, peer)) => {
                tracing::trace!(target: "nbd_accept", client = %peer, "client accepted");
                let (server, no_threads) = (server.clone(), no_threads.clone());
                tokio::spawn(async move {
                    let span = super::trace::connection_span(&peer);
                    let max = server.handshake_max_seconds;
                    let Some(mut session) = shake(&mut client, &server.exports, max, &span).await
                    else {
                        return;
                    };
                    tracing::info!(
                        target: "nbd_client_connect",
                        parent: &span,
                        export = %session.export.name,
                        client = %peer,
                        "NBD client connected"
                    );
                    if !span.is_none() {
                        session.trace = Some(super::trace::ConnTrace::new(
                            span,
                            &session.export.name,
                            session.structured,
                            session.extended,
                        ));
                    }
                    if let Err(e) = serve_where_placed(client, session, permit) {
                        no_threads.warn(format_args!("cannot serve a client: {e}"));
                    }
                });
            }
            Err(e) => {
                // Out of descriptors (or another passing failure): say so
                // once and retry; clients wait in the backlog meanwhile.
                drop(permit);
                no_fds.warn(format_args!("cannot accept clients: {e}"));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

impl Actor for ServerActor {
    type Msg = ServerMsg;
    type State = ServerState;
    type Arguments = Arc<Server>;

    async fn pre_start(
        &self,
        myself: ActorRef<ServerMsg>,
        server: Arc<Server>,
    ) -> Result<ServerState, ActorProcessingErr> {
        // The actor owns the accept loop and watches it: if the loop ends
        // (a panic), the actor fails and its supervisor starts it again
        // on the same listening socket.
        Ok(ServerState {
            _accept: watched("accept loop", accept_loop(server), move |why| {
                let _ = myself.cast(ServerMsg::LoopEnded(why));
            }),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ServerMsg>,
        msg: ServerMsg,
        _state: &mut ServerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServerMsg::LoopEnded(why) => Err(format!("NBD server: {why}").into()),
            ServerMsg::Crash => Err("test hook: NBD server crash requested".into()),
        }
    }
}
