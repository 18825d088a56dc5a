//! A parent's edge to a child node (an export's node, a qcow2 image's
//! backing node), which the graph can re-point while I/O runs.
//!
//! Requests go through [`Child::enter`], which counts them in flight on
//! this edge. To re-point, the graph quiesces the edge ([`Child::quiesce`]):
//! new requests wait, the ones in flight finish on the old node, and once
//! none is left the node is swapped; when the quiesce ends, the waiting
//! requests go to the new node. This is QEMU's drained section around
//! bdrv_replace_node, scoped to the edges that change.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::Notify;

use super::node::Node;

#[derive(Default)]
pub struct Child {
    node: RwLock<Option<Arc<Node>>>,
    inflight: AtomicUsize,
    /// Quiesces under way (they may nest).
    quiesced: AtomicUsize,
    /// Woken when the last request in flight leaves.
    idle: Notify,
    /// Woken when the last quiesce ends.
    resumed: Notify,
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.get().map(|n| n.name.clone());
        f.debug_struct("Child").field("node", &name).finish()
    }
}

/// A request on the edge's node; leaves the edge when dropped.
pub struct Entered<'a> {
    child: &'a Child,
    node: Arc<Node>,
}

impl std::ops::Deref for Entered<'_> {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.child.leave();
    }
}

/// While held, no request enters the edge; dropping it lets them go on.
pub struct Quiesced {
    child: Arc<Child>,
}

impl Drop for Quiesced {
    fn drop(&mut self) {
        if self.child.quiesced.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.child.resumed.notify_waiters();
        }
    }
}

impl Child {
    pub fn new(node: Arc<Node>) -> Arc<Child> {
        let c = Child::default();
        if let Ok(mut n) = c.node.write() {
            *n = Some(node);
        }
        Arc::new(c)
    }

    pub fn empty() -> Arc<Child> {
        Arc::new(Child::default())
    }

    /// The node now (for sizes, limits and queries; not counted).
    pub fn get(&self) -> Option<Arc<Node>> {
        self.node.read().ok().and_then(|n| n.clone())
    }

    /// Points the edge at `node` (None: detached) and returns the old
    /// one. Callers quiesce the edge first if I/O may be running.
    pub fn set(&self, node: Option<Arc<Node>>) -> Option<Arc<Node>> {
        match self.node.write() {
            Ok(mut n) => std::mem::replace(&mut *n, node),
            Err(_) => None,
        }
    }

    fn leave(&self) {
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.quiesced.load(Ordering::SeqCst) > 0
        {
            self.idle.notify_waiters();
        }
    }

    /// Enters a request on the edge's node, waiting while the edge is
    /// quiesced. None when the edge points nowhere.
    pub async fn enter(&self) -> Option<Entered<'_>> {
        loop {
            if self.quiesced.load(Ordering::SeqCst) > 0 {
                let resumed = self.resumed.notified();
                if self.quiesced.load(Ordering::SeqCst) > 0 {
                    resumed.await;
                }
                continue;
            }
            self.inflight.fetch_add(1, Ordering::SeqCst);
            // A quiesce that began meanwhile wins: step back and wait.
            if self.quiesced.load(Ordering::SeqCst) > 0 {
                self.leave();
                continue;
            }
            let Some(node) = self.get() else {
                self.leave();
                return None;
            };
            return Some(Entered { child: self, node });
        }
    }

    /// Requests in flight on this edge.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Stops new requests and waits for those in flight to finish.
    pub async fn quiesce(self: &Arc<Self>) -> Quiesced {
        self.quiesced.fetch_add(1, Ordering::SeqCst);
        let q = Quiesced {
            child: self.clone(),
        };
        loop {
            let idle = self.idle.notified();
            if self.inflight.load(Ordering::SeqCst) == 0 {
                return q;
            }
            idle.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::node::CommonOptions;
    use crate::block::null::NullDriver;
    use std::time::Duration;

    fn null(name: &str, size: u64) -> Arc<Node> {
        Node::new(
            name.into(),
            Box::new(NullDriver::new("null-co", size, true, 0)),
            CommonOptions::default(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_swap_waits_for_requests_in_flight_and_holds_new_ones() {
        let (a, b) = (null("a", 1 << 20), null("b", 2 << 20));
        let edge = Child::new(a.clone());
        let started = edge.enter().await.expect("entered");
        assert_eq!(started.name, "a");
        assert_eq!(edge.inflight(), 1);
        // The quiesce cannot finish while a request is in flight.
        let e2 = edge.clone();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let swapper = tokio::spawn(async move {
            let q = e2.quiesce().await;
            let _ = tx.send(());
            let old = e2.set(Some(null("b2", 2 << 20)));
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(q);
            old.map(|o| o.name.clone())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "quiesced with a request in flight");
        // A new request waits for the swap, then goes to the new node.
        let e3 = edge.clone();
        let late = tokio::spawn(async move { e3.enter().await.map(|n| n.name.clone()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!late.is_finished(), "entered while quiescing");
        drop(started);
        assert_eq!(swapper.await.expect("swap"), Some("a".into()));
        assert_eq!(late.await.expect("late").as_deref(), Some("b2"));
        assert_eq!(edge.inflight(), 0);
        drop(b);
    }

    #[tokio::test]
    async fn an_empty_edge_enters_nothing_and_nested_quiesces_resume_once() {
        let edge = Child::empty();
        assert!(edge.enter().await.is_none());
        assert_eq!(edge.inflight(), 0);
        edge.set(Some(null("n", 4096)));
        let q1 = edge.quiesce().await;
        let q2 = edge.quiesce().await;
        drop(q1);
        let e = edge.clone();
        let waiting = tokio::spawn(async move { e.enter().await.map(|n| n.name.clone()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "one quiesce still holds the edge");
        drop(q2);
        assert_eq!(waiting.await.expect("enter").as_deref(), Some("n"));
    }
}
