//! Serialising requests (QEMU's tracked requests): a read-modify-write
//! of whole blocks must not overlap any other request on those blocks,
//! or one write undoes another. Requests register the byte range they
//! touch; a serialising one waits until nothing overlaps it, and any
//! request waits for overlapping serialising ones.
use std::sync::Mutex;

use tokio::sync::Notify;

/// A request in flight: (id, start, end, serialising).
type Entry = (u64, u64, u64, bool);

#[derive(Default)]
pub struct Tracker {
    /// The last id given, and the requests in flight.
    list: Mutex<(u64, Vec<Entry>)>,
    /// Woken when a request leaves.
    left: Notify,
}

/// A request in the tracker; leaves when dropped.
pub struct Tracked<'a> {
    tracker: &'a Tracker,
    id: u64,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        if let Ok(mut l) = self.tracker.list.lock() {
            l.1.retain(|r| r.0 != self.id);
        }
        self.tracker.left.notify_waiters();
    }
}

/// A request in a shared tracker, owning its place (a hook's guard).
pub struct TrackedOwned {
    tracker: std::sync::Arc<Tracker>,
    id: u64,
}

impl Drop for TrackedOwned {
    fn drop(&mut self) {
        if let Ok(mut l) = self.tracker.list.lock() {
            l.1.retain(|r| r.0 != self.id);
        }
        self.tracker.left.notify_waiters();
    }
}

impl Tracker {
    /// [`Tracker::enter`] for a tracker shared through an Arc, with a
    /// guard that owns its place.
    pub async fn enter_owned(
        self: &std::sync::Arc<Self>,
        start: u64,
        end: u64,
        serialising: bool,
    ) -> TrackedOwned {
        let t = self.enter(start, end, serialising).await;
        let id = t.id;
        std::mem::forget(t);
        TrackedOwned {
            tracker: self.clone(),
            id,
        }
    }

    /// Enters a request on `start..end`, waiting for the requests it may
    /// not overlap.
    pub async fn enter(&self, start: u64, end: u64, serialising: bool) -> Tracked<'_> {
        loop {
            let left = self.left.notified();
            if let Ok(mut l) = self.list.lock() {
                let clash =
                    l.1.iter()
                        .any(|r| r.1 < end && start < r.2 && (serialising || r.3));
                if !clash {
                    l.0 += 1;
                    let id = l.0;
                    l.1.push((id, start, end, serialising));
                    return Tracked { tracker: self, id };
                }
            }
            left.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// On this single-threaded runtime, lets every spawned task run
    /// until it waits.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn serialising_requests_wait_for_overlaps_only() {
        let t = Arc::new(Tracker::default());
        let plain = t.enter(0, 4096, false).await;
        // Plain requests may overlap each other, and a disjoint
        // serialising one goes at once.
        let other = t.enter(0, 4096, false).await;
        let apart = t.enter(8192, 12288, true).await;
        let t2 = t.clone();
        let rmw = tokio::spawn(async move {
            let _g = t2.enter(2048, 6144, true).await;
        });
        settle().await;
        assert!(!rmw.is_finished(), "an RMW ran over requests in flight");
        drop(plain);
        settle().await;
        assert!(!rmw.is_finished(), "an RMW ran over a request in flight");
        drop(other);
        rmw.await.expect("the RMW goes once the overlaps left");
        // A plain request waits for an overlapping serialising one.
        let t3 = t.clone();
        let after = tokio::spawn(async move {
            let _g = t3.enter(9000, 9100, false).await;
        });
        settle().await;
        assert!(!after.is_finished(), "a request ran into an RMW");
        drop(apart);
        after.await.expect("then it goes");
    }
}
