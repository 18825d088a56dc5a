//! Start-up and shutdown: the root supervisor's duties in order. Options
//! are applied left to right; the pidfile is written once everything
//! listens; a quit or a signal stops children in reverse order.
use std::sync::Arc;

use actors::daemonize::Daemon;
use actors::pidfile::Pidfile;
use actors::Supervisor;
use ractor::{Actor, ActorRef};
use tokio::sync::watch;

use crate::cli::args::Arg;
use crate::cli::options::{self, ChardevCli, ObjectCli};
use crate::context::Ctx;
use crate::control::{ControlActor, ControlMsg};
use crate::events::EventBus;
use crate::metrics::{Metrics, Phase};
use crate::qapi::Schema;

/// How start-up ended when it did not reach the serving state.
pub enum Exit {
    /// Print to stdout and exit 0 (help texts).
    Print(String),
    /// Print `rsd: MESSAGE` to stderr and exit 1.
    Fail(String),
    /// Print to stdout and exit 1 (`--chardev TYPE,help`, as QSD does).
    PrintFail(String),
}

pub struct Options {
    pub args: Vec<Arg>,
    pub daemonize: bool,
    pub pidfile: Option<String>,
}

/// Runs the daemon to completion; returns the process exit code.
pub async fn run(opts: Options, daemon: Option<Daemon>) -> i32 {
    let mut signals = actors::signals::ShutdownSignals::catch();
    let test_hooks = std::env::var_os("RSD_TEST_HOOKS").is_some_and(|v| v == "1");
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    // A child that failed more often than its restart policy allows (a
    // monitor, chardev or the NBD server) takes the daemon down cleanly:
    // a daemon missing part of its control plane cannot be steered.
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let metrics = Metrics::new();
    let (m1, m2) = (metrics.clone(), metrics.clone());
    let supervisor = match Actor::spawn(
        Some("root".into()),
        Supervisor {
            on_escalate: Arc::new(move |child, reason| {
                m1.escalated(child);
                if child == crate::metrics::server::REGISTRY_NAME {
                    // Metrics are not part of the control or data plane:
                    // losing them must not stop the storage.
                    eprintln!("rsd: the metrics server kept failing and was stopped ({reason})");
                    return;
                }
                let _ = failed_tx.send((child.to_string(), reason.to_string()));
            }),
            on_restart: Some(Arc::new(move |child, reason| {
                // Always said: a restart means something failed, even
                // though the daemon goes on serving.
                eprintln!("rsd: {child} failed and was restarted ({reason})");
                m2.restarted(child);
            })),
        },
        (),
    )
    .await
    {
        Ok((s, _)) => s,
        Err(e) => {
            eprintln!("rsd: cannot start the supervisor: {e}");
            return 1;
        }
    };
    let ctx = Arc::new(Ctx {
        schema: Schema::rsd(test_hooks),
        events: EventBus::default(),
        supervisor: supervisor.clone(),
        shutdown: shutdown_tx,
        replied: tokio::sync::watch::channel(0).0,
        test_hooks,
        started: tokio::sync::watch::channel(false).0,
        metrics: metrics.clone(),
    });
    let (control, mut control_ended) =
        match Actor::spawn(Some("control".into()), ControlActor, ctx.clone()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("rsd: cannot start the control actor: {e}");
                return 1;
            }
        };
    metrics.set_control(control.clone());

    let mut pidfile = None;
    let started = apply_all(&ctx, &control, &opts).await.and_then(|()| {
        if let Some(path) = &opts.pidfile {
            pidfile = Some(
                Pidfile::acquire(std::path::Path::new(path))
                    .map_err(|e| Exit::Fail(format!("cannot create PID file: {e}")))?,
            );
        }
        Ok(())
    });
    if let Err(exit) = started {
        metrics.set_phase(Phase::Stopping);
        stop(&ctx, &control, &supervisor).await;
        return match exit {
            Exit::Print(text) => {
                print!("{text}");
                0
            }
            Exit::Fail(msg) => {
                eprintln!("rsd: {msg}");
                1
            }
            Exit::PrintFail(text) => {
                print!("{text}");
                1
            }
        };
    }
    if let Some(d) = daemon {
        d.finish();
    }
    ctx.started.send_replace(true);
    metrics.set_phase(Phase::Serving);
    tracing::info!(
        target: "daemon_start",
        version = crate::context::RSD_VERSION,
        pid = std::process::id(),
        "rsd started"
    );
    let code = tokio::select! {
        sig = signals.recv() => {
            tracing::info!(target: "daemon_stop", signal = sig, "shutting down");
            0
        }
        _ = shutdown_rx.wait_for(|quit| *quit) => {
            tracing::info!(target: "daemon_stop", "quit requested");
            0
        }
        Some((component, reason)) = failed_rx.recv() => {
            eprintln!(
                "rsd: {component} kept failing and could not be restarted ({reason}); stopping"
            );
            let mut data = serde_json::Map::new();
            data.insert("component".into(), component.into());
            data.insert("reason".into(), reason.into());
            ctx.events.emit("X_RSD_COMPONENT_FAILED", Some(data));
            1
        }
        _ = &mut control_ended => {
            // The control actor owns every registry; without it no
            // command can run.
            eprintln!("rsd: the control actor failed; stopping");
            1
        }
    };
    metrics.set_phase(Phase::Stopping);
    stop(&ctx, &control, &supervisor).await;
    drop(pidfile);
    code
}

/// The exit path (exports deleted with their events while the monitors
/// still listen), then every child in reverse start order.
async fn stop(
    ctx: &Ctx,
    control: &ActorRef<ControlMsg>,
    supervisor: &ActorRef<actors::SupervisorMsg>,
) {
    let _ = ractor::call!(control, ControlMsg::Shutdown);
    ctx.events.flush(std::time::Duration::from_secs(1)).await;
    actors::supervisor::stop_all(supervisor).await;
}

async fn apply_all(
    ctx: &Arc<Ctx>,
    control: &ActorRef<ControlMsg>,
    opts: &Options,
) -> Result<(), Exit> {
    for arg in &opts.args {
        apply(ctx, control, arg, opts.daemonize)
            .await
            .map_err(|e| match e {
                Exit::Fail(msg) => Exit::Fail(format!("{}: {msg}", arg.location())),
                other => other,
            })?;
    }
    Ok(())
}

fn call_err<T>(r: Result<Result<T, String>, ractor::RactorErr<ControlMsg>>) -> Result<T, Exit> {
    match r {
        Ok(inner) => inner.map_err(Exit::Fail),
        Err(e) => Err(Exit::Fail(format!("internal error: {e}"))),
    }
}

async fn apply(
    ctx: &Arc<Ctx>,
    control: &ActorRef<ControlMsg>,
    arg: &Arg,
    daemonize: bool,
) -> Result<(), Exit> {
    match arg {
        Arg::Help | Arg::Version | Arg::Daemonize | Arg::Pidfile(_) | Arg::Trace(_) => Ok(()),
        Arg::Positional(_) => Err(Exit::Fail("Unexpected argument".into())),
        Arg::Chardev(text) => {
            let (warnings, outcome) = options::chardev(text, daemonize);
            for w in warnings {
                eprintln!("rsd: {}: warning: {w}", arg.location());
            }
            apply_chardev(control, arg, outcome.map_err(Exit::Fail)?).await
        }
        Arg::Monitor(text) => {
            let (chardev, pretty) = options::monitor(&ctx.schema, text).map_err(Exit::Fail)?;
            call_err(ractor::call!(
                control,
                ControlMsg::AddMonitor,
                chardev,
                pretty
            ))
        }
        Arg::Object(text) => match options::object(&ctx.schema, text).map_err(Exit::Fail)? {
            ObjectCli::Help(t) => Err(Exit::Print(t)),
            ObjectCli::Add(args) => {
                call_err(ractor::call!(control, ControlMsg::AddObjectCli, args))
            }
        },
        // Validated now; served once the block layer and NBD server exist.
        Arg::Blockdev(text) => {
            let opts = options::blockdev(&ctx.schema, text).map_err(Exit::Fail)?;
            call_err(ractor::call!(control, ControlMsg::AddBlockdevCli, opts))
        }
        Arg::NbdServer(text) => {
            let opts = options::nbd_server(&ctx.schema, text).map_err(Exit::Fail)?;
            call_err(ractor::call!(control, ControlMsg::NbdServerCli, opts))
        }
        Arg::Export(text) => {
            let opts = options::export(&ctx.schema, text).map_err(Exit::Fail)?;
            call_err(ractor::call!(control, ControlMsg::ExportCli, opts))
        }
        Arg::MetricsServer(text) => {
            let opts = options::metrics_server(&ctx.schema, text).map_err(Exit::Fail)?;
            call_err(ractor::call!(control, ControlMsg::MetricsServerCli, opts))
        }
    }
}

async fn apply_chardev(
    control: &ActorRef<ControlMsg>,
    arg: &Arg,
    c: ChardevCli,
) -> Result<(), Exit> {
    match c {
        ChardevCli::Help => {
            let mut s = "Available chardev backend types: \n".to_string();
            for b in crate::chardev::BACKEND_NAMES {
                s.push_str(&format!("  {b}\n"));
            }
            Err(Exit::Print(s))
        }
        ChardevCli::OptionsHelp(text) => Err(Exit::PrintFail(text)),
        ChardevCli::Add { id, backend } => {
            let prefix = format!("rsd: {}", arg.location());
            call_err(ractor::call!(
                control,
                ControlMsg::AddChardevCli,
                id,
                backend,
                prefix
            ))
        }
    }
}
