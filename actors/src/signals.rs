//! Shutdown signals: SIGINT, SIGHUP and SIGTERM all ask for an orderly stop.
use tokio::signal::unix::{signal, SignalKind};

/// Resolves with the signal's name when one of the shutdown signals arrives.
pub async fn shutdown_signal() -> &'static str {
    let (Ok(mut int), Ok(mut hup), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
    ) else {
        // Without handlers the default action (terminate) stays in force.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = hup.recv() => "SIGHUP",
        _ = term.recv() => "SIGTERM",
    }
}
