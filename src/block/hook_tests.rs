//! Tests of the request path above drivers: hooks, in-flight counting,
//! draining, and re-pointing a format's file edge under I/O.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::driver::{IoFuture, WriteFlags};
use super::error::BlockError;
use super::graph::Graph;
use super::hooks::{Guard, Hook, Op, Request, Stage};
use super::node::{CommonOptions, Node};
use super::null::NullDriver;

fn null(name: &str, latency_ns: u64) -> Arc<Node> {
    Node::new(
        name.into(),
        Box::new(NullDriver::new("null-co", 1 << 20, true, latency_ns)),
        CommonOptions::default(),
    )
}

/// Records what it sees; refuses writes at `refuse_at`.
struct Recorder {
    name: &'static str,
    stage: Stage,
    log: Arc<Mutex<Vec<String>>>,
    refuse_at: Option<u64>,
}

impl Hook for Recorder {
    fn name(&self) -> &str {
        self.name
    }
    fn stage(&self) -> Stage {
        self.stage
    }
    fn before<'a>(&'a self, req: &'a Request) -> Option<IoFuture<'a, Option<Guard>>> {
        if let Ok(mut l) = self.log.lock() {
            l.push(format!("{} before {:?}@{}", self.name, req.op, req.offset));
        }
        if req.op == Op::Write && Some(req.offset) == self.refuse_at {
            return Some(Box::pin(async { Err(BlockError::perm("refused by hook")) }));
        }
        None
    }
    fn after(&self, req: &Request, ok: bool) {
        if let Ok(mut l) = self.log.lock() {
            l.push(format!("{} after {:?} ok={ok}", self.name, req.op));
        }
    }
}

#[tokio::test]
async fn hooks_run_in_stage_order_and_can_refuse_a_request() {
    let n = null("n", 0);
    let log = Arc::new(Mutex::new(Vec::new()));
    let hook = |name, stage, refuse_at| {
        Arc::new(Recorder {
            name,
            stage,
            log: log.clone(),
            refuse_at,
        })
    };
    // Added out of order: the stage decides where each one runs.
    n.hooks.add(hook("observe", Stage::Observe, None));
    n.hooks.add(hook("throttle", Stage::Throttle, Some(4096)));
    n.hooks.add(hook("cbw", Stage::Intercept, None));
    assert_eq!(n.hooks.names(), ["throttle", "cbw", "observe"]);

    n.write(0, &[1; 512], WriteFlags::default())
        .await
        .expect("write passes the hooks");
    let err = n
        .write(4096, &[1; 512], WriteFlags::default())
        .await
        .expect_err("the throttle hook refuses it");
    assert_eq!(err.msg, "refused by hook");
    let seen = log.lock().map(|l| l.clone()).unwrap_or_default();
    assert_eq!(
        seen,
        [
            "throttle before Write@0",
            "cbw before Write@0",
            "observe before Write@0",
            "throttle after Write ok=true",
            "cbw after Write ok=true",
            "observe after Write ok=true",
            // The refused request reaches neither later hooks nor the driver.
            "throttle before Write@4096",
        ]
    );
    assert_eq!(n.stats.wr.ops.load(Ordering::Relaxed), 1);
    assert_eq!(n.stats.wr.failed.load(Ordering::Relaxed), 1);

    assert!(n.hooks.remove("throttle"));
    assert!(!n.hooks.remove("throttle"));
    n.write(4096, &[1; 512], WriteFlags::default())
        .await
        .expect("no hook refuses it now");
    for h in ["cbw", "observe"] {
        assert!(n.hooks.remove(h));
    }
    assert!(n.hooks.active().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_waits_for_its_requests_in_flight() {
    let n = null("slow", 100_000_000);
    let n2 = n.clone();
    let running = tokio::spawn(async move {
        let mut buf = vec![0u8; 512];
        n2.read(0, &mut buf).await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while n.inflight() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the read never started"
        );
        tokio::task::yield_now().await;
    }
    let done = Arc::new(AtomicUsize::new(0));
    let d2 = done.clone();
    let n3 = n.clone();
    let drainer = tokio::spawn(async move {
        n3.drained().await;
        d2.store(1, Ordering::SeqCst);
    });
    // Let the drainer run; it cannot finish while the read is in flight
    // (`done` is read first: the read was still in flight after that).
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "drained with a read in flight"
    );
    assert!(n.inflight() > 0, "the read ended too soon to tell");
    running.await.expect("join").expect("read");
    drainer.await.expect("drained");
    assert_eq!(n.inflight(), 0);
}

fn opts(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// A raw node's file edge is re-pointed under I/O: requests in flight
/// finish on the old file, the next ones go to the new one, and the
/// graph's drain of the file waits for raw's requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_file_edge_is_replaced_and_drained_under_io() {
    let mut g = Graph::default();
    let add = |g: &mut Graph, v| g.add(&Default::default(), &opts(v)).expect("add");
    add(
        &mut g,
        json!({"driver": "null-co", "node-name": "a", "size": 1048576, "read-zeroes": true, "latency-ns": 50000000}),
    );
    add(
        &mut g,
        json!({"driver": "null-co", "node-name": "b", "size": 1048576, "read-zeroes": true}),
    );
    add(
        &mut g,
        json!({"driver": "raw", "node-name": "r", "file": "a"}),
    );
    let r = g.find("r").map(|e| e.node.clone()).expect("raw");
    let a = g.find("a").map(|e| e.node.clone()).expect("a");
    let b = g.find("b").map(|e| e.node.clone()).expect("b");

    let log = Arc::new(Mutex::new(Vec::new()));
    a.hooks.add(Arc::new(Recorder {
        name: "a",
        stage: Stage::Observe,
        log: log.clone(),
        refuse_at: None,
    }));
    let r2 = r.clone();
    let slow = tokio::spawn(async move {
        let mut buf = vec![1u8; 512];
        r2.read(0, &mut buf).await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while a.inflight() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the read never reached a"
        );
        tokio::task::yield_now().await;
    }
    // Draining a waits for raw's request, which is in flight on it.
    let drained = g.drain("a").await;
    let seen = log.lock().map(|l| l.clone()).unwrap_or_default();
    assert_eq!(seen, ["a before Read@0", "a after Read ok=true"]);
    assert_eq!(a.inflight(), 0);
    drop(drained);
    slow.await.expect("join").expect("read on a");

    g.replace_node("a", "b").await.expect("replace");
    assert_eq!(
        g.find("r").map(|e| e.children[0].child.clone()).as_deref(),
        Some("b")
    );
    let before = b.stats.rd.ops.load(Ordering::Relaxed);
    let mut buf = vec![1u8; 512];
    r.read(0, &mut buf).await.expect("read through b");
    assert_eq!(b.stats.rd.ops.load(Ordering::Relaxed), before + 1);
    assert_eq!(a.stats.rd.ops.load(Ordering::Relaxed), 1);
    // a is free again: nothing uses it.
    g.del("a").expect("a can go");
}

/// replace_node checks permissions before anything moves: a writer
/// cannot be moved onto a read-only node, and after the refusal every
/// user and edge is where it was, still doing I/O on the old node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_node_puts_everything_back_on_a_permission_conflict() {
    use super::child::Child;
    use super::perm::Perm;
    let mut g = Graph::default();
    let objects = Default::default();
    for v in [
        json!({"driver": "null-co", "node-name": "a", "size": 1048576, "read-zeroes": true}),
        json!({"driver": "null-co", "node-name": "ro", "size": 1048576, "read-zeroes": true, "read-only": true}),
        json!({"driver": "raw", "node-name": "r", "file": "a"}),
    ] {
        g.add(&objects, &opts(v)).expect("add");
    }
    let a = g.find("a").map(|e| e.node.clone()).expect("a");
    let edge = Child::new(a.clone());
    let writer = g
        .add_user_on(
            "a",
            "an unnamed block device",
            Perm::CONSISTENT_READ.union(Perm::WRITE),
            Perm::ALL,
            Some(edge.clone()),
        )
        .expect("writer");
    let err = g.replace_node("a", "ro").await.expect_err("conflict");
    assert_eq!(err, "Block node is read-only");
    let users: Vec<u64> = g
        .find("a")
        .map(|e| e.users.iter().map(|u| u.id).collect())
        .unwrap_or_default();
    assert_eq!(users, [writer]);
    assert!(g.find("ro").is_some_and(|e| e.users.is_empty()));
    assert_eq!(
        g.find("r").map(|e| e.children[0].child.clone()).as_deref(),
        Some("a")
    );
    assert_eq!(edge.get().map(|n| n.name.clone()).as_deref(), Some("a"));
    edge.enter()
        .await
        .expect("edge")
        .write(0, &[7; 512], WriteFlags::default())
        .await
        .expect("the writer still writes to a");

    // A user that holds the node itself (no edge) cannot be moved.
    g.remove_user(writer);
    let pinned = g
        .add_user("a", "a job", Perm::CONSISTENT_READ, Perm::ALL)
        .expect("pinned user");
    let err = g.replace_node("a", "ro").await.expect_err("pinned");
    assert_eq!(err, "Node 'a' is busy: it is used by a job");
    assert_eq!(
        g.find("r").map(|e| e.children[0].child.clone()).as_deref(),
        Some("a")
    );
    g.remove_user(pinned);
}
