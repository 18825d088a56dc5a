//! rsd's Prometheus metrics and health checks (an extension beyond QSD).
//!
//! The counters stay where the work is counted: the block layer's
//! per-node stats (`block/stats.rs`, also read by query-blockstats), the
//! exports' counters (`exports/stats.rs`), the jobs' shared state. This
//! module only knows where to find those things: `Sources` holds the
//! nodes the control actor publishes after each message, the export
//! registry and the job list (shared with the control actor), and the
//! supervision counters. `collect.rs` turns them into metric families when
//! Prometheus scrapes, so a series exists exactly while its thing does
//! and nothing is done per request beyond the atomic adds the data path
//! already makes. `server.rs` is the metrics-server actor (the listener
//! of `--metrics-server` and `__org.rsd_metrics-server-start`), which
//! serves /metrics, /healthz and /readyz with observability's responder.
pub mod collect;
pub mod server;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use observability::http::{BoxFuture, Endpoints, Health};
use observability::metrics::prometheus;
use ractor::ActorRef;

use crate::block::node::Node;
use crate::control::ControlMsg;

/// Where the daemon is in its life, for /readyz and /healthz.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// The command line is being applied.
    Starting = 0,
    Serving = 1,
    /// quit, a signal or a failure: the exit path runs.
    Stopping = 2,
}

/// What the collector reads at scrape time.
pub struct Sources {
    /// The graph's nodes in QEMU's naming order, as the control actor
    /// last published them.
    nodes: RwLock<Vec<Arc<Node>>>,
    /// The export registry, shared with the control actor.
    pub exports: crate::exports::Registry,
    /// The job list, shared with the control actor.
    pub jobs: crate::jobs::Jobs,
    phase: AtomicU8,
}

impl Sources {
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.read().map(|n| n.clone()).unwrap_or_default()
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Stopping,
        }
    }

    /// Readiness: the command line is applied, the exit path has not
    /// begun, and every export serves.
    pub fn readiness(&self) -> Health {
        let not = |detail: String| Health { ok: false, detail };
        match self.phase() {
            Phase::Starting => return not("starting: the command line is being applied".into()),
            Phase::Stopping => return not("stopping".into()),
            Phase::Serving => {}
        }
        for e in self.exports.list() {
            if !e.serving() {
                return not(format!("export '{}' is not serving", e.id()));
            }
        }
        Health {
            ok: true,
            detail: "ready".into(),
        }
    }
}

/// The metrics registry and what it reads.
pub struct Metrics {
    pub sources: Arc<Sources>,
    registry: prometheus::Registry,
    restarts: prometheus::IntCounterVec,
    escalations: prometheus::IntCounterVec,
    /// For /healthz: the control actor must answer.
    control: OnceLock<ActorRef<ControlMsg>>,
}

/// How long /healthz waits for the control actor.
const CONTROL_PING: Duration = Duration::from_secs(2);

/// The kinds of supervised actors (see ARCHITECTURE.md's actor tree).
pub const ACTOR_KINDS: [&str; 7] = [
    "chardev",
    "monitor",
    "node",
    "nbd-server",
    "export",
    "job",
    "metrics-server",
];

/// The kind of a supervised child: its id up to the first `/`
/// (`monitor/c1` is a monitor, `nbd-server` the NBD server).
pub fn actor_kind(child: &str) -> &str {
    child.split_once('/').map_or(child, |(k, _)| k)
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let sources = Arc::new(Sources {
            nodes: RwLock::default(),
            exports: Default::default(),
            jobs: Default::default(),
            phase: AtomicU8::new(Phase::Starting as u8),
        });
        let registry = prometheus::Registry::new();
        let restarts = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "rsd_supervisor_restarts_total",
                "Restarts of supervised actors after a failure, by actor kind.",
            ),
            &["kind"],
        );
        let escalations = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "rsd_supervisor_escalations_total",
                "Actors that failed more often than their restart policy allows, by actor kind.",
            ),
            &["kind"],
        );
        let build = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "rsd_build_info",
                "rsd's version and the qemu-storage-daemon version it follows; always 1.",
            ),
            &["version", "qemu_version"],
        );
        // These names are fixed and valid: the constructors cannot fail.
        let (Ok(restarts), Ok(escalations), Ok(build)) = (restarts, escalations, build) else {
            unreachable!("static metric options are valid");
        };
        // Every kind from the start at 0, so rate() and alerts see the
        // first restart as a change.
        for kind in ACTOR_KINDS {
            restarts.with_label_values(&[kind]);
            escalations.with_label_values(&[kind]);
        }
        let (ma, mi, mc) = crate::context::QEMU_COMPAT;
        build
            .with_label_values(&[crate::context::RSD_VERSION, &format!("{ma}.{mi}.{mc}")])
            .set(1);
        for c in [
            Box::new(restarts.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(escalations.clone()),
            Box::new(build),
            Box::new(collect::Collector::new(sources.clone())),
            #[cfg(target_os = "linux")]
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            if let Err(e) = registry.register(c) {
                tracing::warn!("metrics: {e}");
            }
        }
        Arc::new(Metrics {
            sources,
            registry,
            restarts,
            escalations,
            control: OnceLock::new(),
        })
    }

    pub fn set_control(&self, control: ActorRef<ControlMsg>) {
        let _ = self.control.set(control);
    }

    pub fn set_phase(&self, p: Phase) {
        // Stopping is final.
        let _ = self
            .sources
            .phase
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                (now != Phase::Stopping as u8).then_some(p as u8)
            });
    }

    /// The control actor publishes the graph's nodes after each message.
    pub fn publish_nodes(&self, nodes: Vec<Arc<Node>>) {
        if let Ok(mut n) = self.sources.nodes.write() {
            let same =
                n.len() == nodes.len() && n.iter().zip(&nodes).all(|(a, b)| Arc::ptr_eq(a, b));
            if !same {
                *n = nodes;
            }
        }
    }

    pub fn restarted(&self, child: &str) {
        self.restarts.with_label_values(&[actor_kind(child)]).inc();
    }

    pub fn escalated(&self, child: &str) {
        self.escalations
            .with_label_values(&[actor_kind(child)])
            .inc();
    }

    /// Every series now, in the text format.
    pub fn render(&self) -> Result<String, String> {
        observability::metrics::encode_text(&self.registry.gather())
    }

    /// Liveness: not stopping, and the control actor answers.
    pub async fn health(&self) -> Health {
        let not = |detail: &str| Health {
            ok: false,
            detail: detail.into(),
        };
        if self.sources.phase() == Phase::Stopping {
            return not("stopping");
        }
        let Some(control) = self.control.get() else {
            return not("the control actor is not running");
        };
        let ping = async { ractor::call!(control, ControlMsg::Ping) };
        match tokio::time::timeout(CONTROL_PING, ping).await {
            Ok(Ok(())) => Health {
                ok: true,
                detail: "ok".into(),
            },
            Ok(Err(_)) => not("the control actor is not running"),
            Err(_) => not("the control actor does not answer (a command is still running)"),
        }
    }
}

/// The listener's endpoints.
pub struct Served(pub Arc<Metrics>);

impl Endpoints for Served {
    fn metrics(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move { self.0.render() })
    }
    fn healthz(&self) -> BoxFuture<'_, Health> {
        Box::pin(self.0.health())
    }
    fn readyz(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move { self.0.sources.readiness() })
    }
}
