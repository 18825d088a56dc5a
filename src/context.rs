//! What every actor of the daemon shares: the schema, the event bus, the
//! root supervisor and the shutdown trigger.

use actors::SupervisorMsg;
use ractor::ActorRef;
use tokio::sync::watch;

use crate::events::EventBus;
use crate::qapi::Schema;

/// rsd's version and the QEMU version whose QMP and command line it follows.
pub const RSD_VERSION: &str = env!("CARGO_PKG_VERSION");
pub const QEMU_COMPAT: (i64, i64, i64) = (10, 0, 2);

pub struct Ctx {
    pub schema: Schema,
    pub events: EventBus,
    pub supervisor: ActorRef<SupervisorMsg>,
    /// Set to true to stop the daemon (quit).
    pub shutdown: watch::Sender<bool>,
    /// The sequence number of the newest command whose reply a monitor
    /// has queued. Work a command starts in the background (a job's
    /// rest) waits for its reply first, so its events follow the reply
    /// as in QEMU.
    pub replied: watch::Sender<u64>,
    pub test_hooks: bool,
    /// Turns true once the command line is fully applied. NBD clients
    /// are accepted from then on (until then they wait in the listen
    /// backlog, as with QSD, whose main loop starts after the options),
    /// so a client never sees the server before its exports.
    pub started: watch::Sender<bool>,
    /// The metrics registry and what it reads (served only when a
    /// metrics server is started).
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Ctx {
    pub fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}
