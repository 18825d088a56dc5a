//! A QMP session's output queue, bounded in bytes. A client that sends
//! requests without reading the replies makes the session wait before
//! the next request once `LIMIT` bytes are queued, and while it waits it
//! reads no more input: memory stays bounded whatever the client sends
//! (QEMU's monitor likewise stops reading while requests are pending).
//! Events are queued whatever the fill: they come from the daemon, not
//! from the client, and are few.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

/// Queued bytes past which the session stops taking requests.
pub const LIMIT: usize = 1 << 20;

#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<String>,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    queued: AtomicUsize,
    /// The client cannot be written to any more.
    broken: AtomicBool,
    drained: Notify,
}

impl Outbox {
    /// The outbox and the task that writes it to `write`, in order.
    pub fn new(
        mut write: std::pin::Pin<Box<dyn AsyncWrite + Send>>,
    ) -> (Outbox, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let state = Arc::new(State::default());
        let st = state.clone();
        let writer = tokio::spawn(async move {
            while let Some(text) = rx.recv().await {
                let ok =
                    write.write_all(text.as_bytes()).await.is_ok() && write.flush().await.is_ok();
                st.queued.fetch_sub(text.len(), Ordering::AcqRel);
                if !ok {
                    st.broken.store(true, Ordering::Release);
                }
                st.drained.notify_waiters();
                if !ok {
                    break;
                }
            }
        });
        (Outbox { tx, state }, writer)
    }

    /// Queues one message; false once the writer has stopped.
    pub fn send(&self, text: String) -> bool {
        self.state.queued.fetch_add(text.len(), Ordering::AcqRel);
        let len = text.len();
        if self.tx.send(text).is_err() {
            self.state.queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// The client can no longer be written to.
    pub fn broken(&self) -> bool {
        self.state.broken.load(Ordering::Acquire)
    }

    pub fn queued(&self) -> usize {
        self.state.queued.load(Ordering::Acquire)
    }

    /// Waits until everything queued is written (or the client is gone).
    pub async fn drained(&self) {
        loop {
            let drained = self.state.drained.notified();
            if self.queued() == 0 || self.broken() {
                return;
            }
            drained.await;
        }
    }

    /// Waits until at most `LIMIT` bytes are queued (or the client is
    /// gone, which the caller checks next).
    pub async fn room(&self) {
        loop {
            let drained = self.state.drained.notified();
            if self.queued() <= LIMIT || self.broken() {
                return;
            }
            drained.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_a_slow_reader_and_reports_a_gone_one() {
        let (client, server) = tokio::io::duplex(4096);
        let (out, _writer) = Outbox::new(Box::pin(server));
        for _ in 0..3 {
            assert!(out.send("x".repeat(LIMIT / 2)));
        }
        // Nothing reads: over the limit, room() waits.
        let blocked = tokio::time::timeout(std::time::Duration::from_millis(100), out.room()).await;
        assert!(
            blocked.is_err(),
            "room while {} bytes are queued",
            out.queued()
        );
        assert!(!out.broken());
        // The reader leaves: room() returns, the outbox is broken.
        drop(client);
        tokio::time::timeout(std::time::Duration::from_secs(5), out.room())
            .await
            .expect("room once the client left");
        assert!(out.broken());
    }
}
