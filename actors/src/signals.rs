//! Shutdown signals: SIGINT, SIGHUP and SIGTERM all ask for an orderly stop.
use tokio::signal::unix::{signal, Signal, SignalKind};

/// The shutdown signals, caught from the moment this is made (so one
/// that arrives during start-up still means an orderly stop, not the
/// default action's sudden death). Must be made inside a runtime.
pub struct ShutdownSignals(Option<[Signal; 3]>);

impl ShutdownSignals {
    pub fn catch() -> ShutdownSignals {
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(int), Ok(hup), Ok(term)) => ShutdownSignals(Some([int, hup, term])),
            // Without handlers the default action (terminate) stays in force.
            _ => ShutdownSignals(None),
        }
    }

    /// Resolves with the signal's name when one of them arrives.
    pub async fn recv(&mut self) -> &'static str {
        let Some([int, hup, term]) = &mut self.0 else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => "SIGHUP",
            _ = term.recv() => "SIGTERM",
        }
    }
}
