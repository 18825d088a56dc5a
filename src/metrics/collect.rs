//! The collector: at scrape time it reads the counters of every node,
//! export and job that exists now and builds their metric families.
//! Label values are the things' names (node-name, export id, job id),
//! fixed when each thing was created.
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use observability::metrics::prometheus::core::{Collector as PromCollector, Desc};
use observability::metrics::prometheus::proto::MetricFamily;
use observability::metrics::Family;

use super::Sources;
use crate::block::stats::Counter;

/// Every family the collector makes: (name, help, labels).
pub const FAMILIES: &[(&str, &str, &[&str])] = &[
    ("rsd_ready", "1 when /readyz answers 200: the command line is applied and every export serves.", &[]),
    ("rsd_node_info", "A block node and its driver; always 1.", &["node", "driver"]),
    ("rsd_node_requests_total", "Requests a node completed successfully (query-blockstats' *_operations).", &["node", "op"]),
    ("rsd_node_bytes_total", "Bytes a node read, wrote (write-zeroes included) or discarded (query-blockstats' *_bytes).", &["node", "op"]),
    ("rsd_node_request_errors_total", "Requests a node refused (invalid: out of range) or that failed.", &["node", "op", "reason"]),
    ("rsd_node_request_duration_seconds", "Latency of a node's completed requests, failed ones included.", &["node", "op"]),
    ("rsd_node_requests_in_flight", "Requests running on a node now.", &["node"]),
    ("rsd_node_write_highest_offset_bytes", "The end of the highest write to a node (query-blockstats' wr_highest_offset).", &["node"]),
    ("rsd_export_info", "A block export, its type and the node it serves now; always 1.", &["export", "type", "node"]),
    ("rsd_export_clients", "Clients connected to an export now (NBD connections, a vhost-user frontend, the kernel for FUSE).", &["export", "type"]),
    ("rsd_export_connections_total", "Clients that connected to an export.", &["export", "type"]),
    ("rsd_export_reconnects_total", "Clients that connected to an export after its first one (a vhost-user-blk frontend coming back).", &["export", "type"]),
    ("rsd_export_requests_total", "Requests clients sent to an export, by operation.", &["export", "type", "op"]),
    ("rsd_export_bytes_total", "Payload bytes an export's clients read and wrote.", &["export", "type", "op"]),
    ("rsd_export_request_errors_total", "Requests an export answered with an error, by operation.", &["export", "type", "op"]),
    ("rsd_throttle_throttled_requests_total", "Requests a throttle node's group made wait, per member node.", &["group", "node"]),
    ("rsd_throttle_throttled_seconds_total", "Time requests waited in a throttle group, per member node.", &["group", "node"]),
    ("rsd_throttle_queued_requests", "Requests waiting in a throttle group now, per member node.", &["group", "node"]),
    ("rsd_job_state", "A job's state (QAPI JobStatus): 1 for the current one, 0 for the others.", &["job", "type", "state"]),
    ("rsd_job_progress_done_bytes", "A job's progress so far (query-jobs' current-progress; bytes for block jobs).", &["job", "type"]),
    ("rsd_job_progress_total_bytes", "A job's estimated total work (query-jobs' total-progress).", &["job", "type"]),
    ("rsd_job_speed_limit_bytes_per_second", "A block job's speed limit (query-block-jobs' speed; 0: none).", &["job", "type"]),
];

pub struct Collector {
    sources: Arc<Sources>,
    descs: Vec<Desc>,
}

impl Collector {
    pub fn new(sources: Arc<Sources>) -> Collector {
        let descs = FAMILIES
            .iter()
            .filter_map(|(name, help, labels)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    labels.iter().map(|l| l.to_string()).collect(),
                    Default::default(),
                )
                .ok()
            })
            .collect();
        Collector { sources, descs }
    }
}

fn help(name: &str) -> &'static str {
    FAMILIES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map_or("", |(_, h, _)| h)
}

fn counter(name: &str) -> Family {
    Family::counter(name, help(name))
}

fn gauge(name: &str) -> Family {
    Family::gauge(name, help(name))
}

/// The node operations as query-blockstats names them (rd, wr, flush,
/// unmap).
fn node_ops(st: &crate::block::stats::Stats) -> [(&'static str, &Counter); 4] {
    [
        ("read", &st.rd),
        ("write", &st.wr),
        ("flush", &st.flush),
        ("discard", &st.unmap),
    ]
}

impl Collector {
    fn nodes(&self, out: &mut Vec<MetricFamily>) {
        let mut info = gauge("rsd_node_info");
        let mut reqs = counter("rsd_node_requests_total");
        let mut bytes = counter("rsd_node_bytes_total");
        let mut errors = counter("rsd_node_request_errors_total");
        let mut latency = Family::histogram(
            "rsd_node_request_duration_seconds",
            help("rsd_node_request_duration_seconds"),
        );
        let mut inflight = gauge("rsd_node_requests_in_flight");
        let mut highest = gauge("rsd_node_write_highest_offset_bytes");
        for n in self.sources.nodes() {
            let node = n.name.as_str();
            info.add(&[("node", node), ("driver", n.driver.name())], 1.0);
            for (op, c) in node_ops(&n.stats) {
                let l = [("node", node), ("op", op)];
                reqs.add(&l, c.ops.load(Relaxed) as f64);
                if op != "flush" {
                    bytes.add(&l, c.bytes.load(Relaxed) as f64);
                }
                for (reason, v) in [("failed", &c.failed), ("invalid", &c.invalid)] {
                    errors.add(
                        &[("node", node), ("op", op), ("reason", reason)],
                        v.load(Relaxed) as f64,
                    );
                }
                latency.add_histogram(&l, &c.latency, c.total_ns.load(Relaxed) as f64 / 1e9);
            }
            inflight.add(&[("node", node)], n.inflight() as f64);
            highest.add(
                &[("node", node)],
                n.stats.wr_highest_offset.load(Relaxed) as f64,
            );
        }
        out.extend([info, reqs, bytes, errors, latency, inflight, highest].map(Family::finish));
    }

    /// Throttle groups' members: the throttle nodes that exist now.
    fn throttles(&self, out: &mut Vec<MetricFamily>) {
        let mut throttled = counter("rsd_throttle_throttled_requests_total");
        let mut seconds = counter("rsd_throttle_throttled_seconds_total");
        let mut queued = gauge("rsd_throttle_queued_requests");
        for n in self.sources.nodes() {
            let Some(t) = n.driver.throttle() else {
                continue;
            };
            let (group, st) = t.stats();
            let l = [("group", group.as_str()), ("node", n.name.as_str())];
            throttled.add(&l, st.throttled.load(Relaxed) as f64);
            seconds.add(&l, st.throttled_ns.load(Relaxed) as f64 / 1e9);
            queued.add(&l, st.queued.load(Relaxed) as f64);
        }
        out.extend([throttled, seconds, queued].map(Family::finish));
    }

    fn exports(&self, out: &mut Vec<MetricFamily>) {
        let mut info = gauge("rsd_export_info");
        let mut clients = gauge("rsd_export_clients");
        let mut conns = counter("rsd_export_connections_total");
        let mut reconnects = counter("rsd_export_reconnects_total");
        let mut reqs = counter("rsd_export_requests_total");
        let mut bytes = counter("rsd_export_bytes_total");
        let mut errors = counter("rsd_export_request_errors_total");
        for e in self.sources.exports.list() {
            let (id, kind) = (e.id(), e.kind());
            let node = e.node().get().map(|n| n.name.clone()).unwrap_or_default();
            info.add(&[("export", id), ("type", kind), ("node", &node)], 1.0);
            let s = e.stats().snapshot();
            let l = [("export", id), ("type", kind)];
            clients.add(&l, s.connected as f64);
            conns.add(&l, s.connections as f64);
            reconnects.add(&l, s.reconnects as f64);
            for (op, n, b, err) in s.ops {
                let l = [("export", id), ("type", kind), ("op", op.as_str())];
                reqs.add(&l, n as f64);
                if matches!(
                    op,
                    crate::exports::stats::Op::Read | crate::exports::stats::Op::Write
                ) {
                    bytes.add(&l, b as f64);
                }
                errors.add(&l, err as f64);
            }
        }
        out.extend([info, clients, conns, reconnects, reqs, bytes, errors].map(Family::finish));
    }

    fn jobs(&self, out: &mut Vec<MetricFamily>) {
        let mut state = gauge("rsd_job_state");
        let mut done = gauge("rsd_job_progress_done_bytes");
        let mut total = gauge("rsd_job_progress_total_bytes");
        let mut speed = gauge("rsd_job_speed_limit_bytes_per_second");
        let jobs: Vec<_> = self
            .sources
            .jobs
            .lock()
            .map(|j| j.clone())
            .unwrap_or_default();
        for j in jobs {
            let (id, kind) = (j.id.as_str(), j.kind);
            let now = j.status();
            for s in crate::jobs::Status::ALL {
                state.add(
                    &[("job", id), ("type", kind), ("state", s.as_str())],
                    f64::from(u8::from(s == now)),
                );
            }
            let l = [("job", id), ("type", kind)];
            done.add(&l, j.current.load(Relaxed) as f64);
            total.add(&l, j.total.load(Relaxed) as f64);
            if j.block.is_some() {
                speed.add(&l, j.speed() as f64);
            }
        }
        out.extend([state, done, total, speed].map(Family::finish));
    }
}

impl PromCollector for Collector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let mut ready = gauge("rsd_ready");
        ready.add(&[], f64::from(u8::from(self.sources.readiness().ok)));
        out.push(ready.finish());
        self.nodes(&mut out);
        self.throttles(&mut out);
        self.exports(&mut out);
        self.jobs(&mut out);
        out
    }
}
