//! A QMP monitor: an actor attached to one chardev, serving each of its
//! client connections in turn with a QMP session.
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::frame;
use super::json::JsonStreamer;
use super::outbox::Outbox;
use super::request::{self, reply_err, reply_ok, Action, SessionState};
use crate::chardev::{ChardevMsg, Conn};
use crate::context::{Ctx, QEMU_COMPAT, RSD_VERSION};
use crate::util::{watched, Watched};

#[derive(Clone)]
pub struct MonitorConfig {
    pub chardev: String,
    pub pretty: bool,
    pub ctx: Arc<Ctx>,
    /// Runs the commands this monitor's clients send.
    pub dispatch: super::Dispatch,
}

pub enum MonitorMsg {
    /// The serving task ended (it never should): fail so we get restarted.
    ServeEnded(String),
    /// Test hook: fail inside the handler.
    Crash,
}

#[derive(Clone)]
pub struct MonitorActor;

pub struct MonitorState {
    _sessions: Watched,
}

pub fn registry_name(chardev: &str) -> String {
    format!("monitor/{chardev}")
}

pub fn version_info() -> Value {
    let (major, minor, micro) = QEMU_COMPAT;
    json!({"qemu": {"major": major, "minor": minor, "micro": micro},
           "package": format!("rsd {RSD_VERSION}")})
}

impl Actor for MonitorActor {
    type Msg = MonitorMsg;
    type State = MonitorState;
    type Arguments = MonitorConfig;

    async fn pre_start(
        &self,
        myself: ActorRef<MonitorMsg>,
        cfg: MonitorConfig,
    ) -> Result<MonitorState, ActorProcessingErr> {
        // Attached now if the chardev is up, so that clients reach a
        // monitor as soon as it is added; else (the chardev is being
        // restarted too) by the session loop once it is back. Failing
        // here would make the supervisor give the monitor up at once.
        let first = attach(&cfg.chardev).await.ok();
        // If the session loop ends (a panic, no chardev to attach to),
        // fail so the supervisor restarts this monitor.
        let sessions = watched(
            "session loop",
            async move {
                let mut next = first;
                loop {
                    let mut rx = match next.take() {
                        Some(rx) => rx,
                        None => match attach_when_up(&cfg.chardev).await {
                            Some(rx) => rx,
                            None => return,
                        },
                    };
                    while let Some(conn) = rx.recv().await {
                        run_session(conn, &cfg).await;
                    }
                    // The chardev went away (its supervisor restarts
                    // it): serve the new one, without failing.
                }
            },
            move |why| {
                let _ = myself.cast(MonitorMsg::ServeEnded(why));
            },
        );
        Ok(MonitorState {
            _sessions: sessions,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<MonitorMsg>,
        msg: MonitorMsg,
        _state: &mut MonitorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MonitorMsg::ServeEnded(why) => Err(format!("monitor session loop ended: {why}").into()),
            MonitorMsg::Crash => Err("test hook: monitor crash requested".into()),
        }
    }
}

/// Attaches a new frontend to chardev `id`; its connections come out of
/// the receiver, which ends when the chardev goes away.
async fn attach(id: &str) -> Result<mpsc::UnboundedReceiver<Conn>, String> {
    let chardev: ActorRef<ChardevMsg> =
        ractor::registry::where_is(crate::chardev::actor::registry_name(id))
            .ok_or_else(|| format!("chardev \"{id}\" not found"))?
            .into();
    let (tx, rx) = mpsc::unbounded_channel::<Conn>();
    ractor::call!(chardev, ChardevMsg::Attach, tx).map_err(|e| e.to_string())?;
    Ok(rx)
}

/// Attaches once chardev `id` is (back) up, trying for a few seconds.
async fn attach_when_up(id: &str) -> Option<mpsc::UnboundedReceiver<Conn>> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Ok(rx) = attach(id).await {
            return Some(rx);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// How much of a request's id a command's span keeps.
const MAX_TRACED_ID: usize = 256;

/// A command's span while traces are on (else a disabled one, which
/// costs nothing): the command and its id, a child of the client's
/// `traceparent` if it sent one. Never the arguments, which may hold
/// secrets. The error description stays out too, for the same reason:
/// the class says what kind of failure it was.
fn command_span(
    chardev: &str,
    name: &str,
    id: Option<&Value>,
    traceparent: Option<String>,
) -> tracing::Span {
    if !observability::traces::enabled() {
        return tracing::Span::none();
    }
    // The id is the client's JSON, of any size: a span keeps its start.
    let id = id.map(|v| {
        let mut t = crate::qmp::json::to_qmp_string(v, false);
        if t.len() > MAX_TRACED_ID {
            let mut cut = MAX_TRACED_ID;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
            t.push_str("...");
        }
        t
    });
    let span = tracing::info_span!(
        "qmp command",
        otel.name = %format_args!("qmp {name}"),
        otel.kind = "server",
        rpc.system = "qmp",
        qmp.command = %name,
        qmp.id = id.as_deref(),
        qmp.monitor = %chardev,
        qmp.error_class = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    if let Some(tp) = traceparent {
        observability::traces::set_remote_parent(&span, &tp);
    }
    span
}

/// One QMP client from greeting to disconnect.
async fn run_session(conn: Conn, cfg: &MonitorConfig) {
    let Conn {
        mut read,
        write,
        done,
        fd,
        ..
    } = conn;
    // `read` lives as long as the session, so `fd` stays open.
    let gone = move || crate::chardev::backend::hung_up(fd);
    let ctx = cfg.ctx.clone();
    let pretty = cfg.pretty;
    tracing::info!(target: "monitor_session_open", chardev = %cfg.chardev, "QMP client connected");
    let (out, writer) = Outbox::new(write);
    // As QSD, whose main loop (and so every monitor) starts after the
    // command line: a client that connects early gets its greeting then.
    let mut started = ctx.started.subscribe();
    if started.wait_for(|s| *s).await.is_err() {
        return;
    }
    let greeting = json!({"QMP": {"version": version_info(), "capabilities": ["oob"]}});
    out.send(frame(&greeting, pretty));

    let mut st = SessionState::default();
    let mut streamer = JsonStreamer::new();
    let mut subscription = None;
    let mut quit = false;
    let mut buf = vec![0u8; 64 * 1024];
    'read: loop {
        let n = match read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for msg in streamer.feed(&buf[..n]) {
            // Flow control: no more work while the client leaves its
            // replies unread (see `outbox`).
            out.room().await;
            if out.broken() {
                break 'read;
            }
            match request::handle(&ctx.schema, &mut st, msg) {
                Action::Reply(v) => {
                    out.send(frame(&v, pretty));
                }
                Action::Negotiated(v) => {
                    out.send(frame(&v, pretty));
                    subscription = Some(ctx.events.subscribe(pretty, out.clone()));
                }
                Action::Execute {
                    name,
                    args,
                    id,
                    traceparent,
                } => {
                    // A client that has gone takes its queued commands
                    // with it (as QSD drops a closed monitor's queue).
                    if gone() {
                        break 'read;
                    }
                    tracing::trace!(target: "qmp_command", chardev = %cfg.chardev, command = %name);
                    quit = name == "quit";
                    let span = command_span(&cfg.chardev, &name, id.as_ref(), traceparent);
                    let (result, seq) = (cfg.dispatch)(name, args, span.clone())
                        .instrument(span.clone())
                        .await;
                    if let Err(e) = &result {
                        span.record("qmp.error_class", e.class.as_str());
                        span.record("otel.status_code", "ERROR");
                        span.record("otel.status_description", e.class.as_str());
                    }
                    drop(span);
                    let v = match result {
                        Ok(ret) => reply_ok(ret, id),
                        Err(e) => reply_err(&e, id),
                    };
                    out.send(frame(&v, pretty));
                    ctx.replied.send_if_modified(|r| {
                        let newer = seq > *r;
                        if newer {
                            *r = seq;
                        }
                        newer
                    });
                    if quit {
                        break 'read;
                    }
                }
            }
        }
    }
    tracing::info!(target: "monitor_session_close", chardev = %cfg.chardev, "QMP client gone");
    drop(subscription);
    drop(out);
    // Let the writer drain what is queued (the quit reply) before going on.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
    if quit {
        // The daemon now stops; stopping this monitor closes the connection.
        ctx.request_shutdown();
        std::future::pending::<()>().await;
    }
    drop(done);
}
