//! Cancelling requests whose client has gone. A front end (an NBD
//! connection) runs each request inside [`Cancel::scope`]; a driver calls
//! [`before_start`] where a request waits before it has changed anything
//! (qcow2's metadata lock, behind which allocating writes queue). A
//! cancelled request stops there with ECANCELED; one past that point
//! always finishes, so cancelling never leaves half a metadata update.
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::error::{BlockError, BlockResult};

tokio::task_local! {
    static CURRENT: Cancel;
}

#[derive(Clone, Default)]
pub struct Cancel(Arc<Inner>);

#[derive(Default)]
struct Inner {
    cancelled: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Cancel {
    /// Cancels every request in this token's scope that has not started.
    pub fn cancel(&self) {
        if !self.0.cancelled.swap(true, Ordering::AcqRel) {
            self.0.notify.notify_waiters();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::Acquire)
    }

    /// Resolves once the token is cancelled.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// Runs `f` with this token as the current request's.
    pub fn scope<F: Future>(&self, f: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self.clone(), f)
    }
}

fn cancelled_error() -> BlockError {
    BlockError::new(
        nix::libc::ECANCELED,
        "request cancelled: its client has gone",
    )
}

/// Waits for `f` (which must change nothing until it resolves, such as
/// taking a lock) unless the current request is cancelled first. Outside
/// a scope it is just `f`.
pub async fn before_start<F: Future>(f: F) -> BlockResult<F::Output> {
    let Ok(token) = CURRENT.try_with(Cancel::clone) else {
        return Ok(f.await);
    };
    if token.is_cancelled() {
        return Err(cancelled_error());
    }
    tokio::select! {
        biased;
        out = f => Ok(out),
        _ = token.cancelled() => Err(cancelled_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiting_request_stops_when_cancelled_and_a_started_one_finishes() {
        let lock = Arc::new(tokio::sync::Mutex::new(0u32));
        let held = lock.clone().lock_owned().await;
        let c = Cancel::default();
        let l2 = lock.clone();
        let waiting = tokio::spawn(c.scope(async move {
            let mut g = before_start(l2.lock()).await?;
            *g += 1;
            Ok::<_, BlockError>(())
        }));
        tokio::task::yield_now().await;
        c.cancel();
        let r = waiting.await.expect("task");
        assert_eq!(r.map_err(|e| e.errno), Err(nix::libc::ECANCELED));
        drop(held);
        assert_eq!(
            *lock.lock().await,
            0,
            "the cancelled request changed nothing"
        );
        // Outside a scope, and in an uncancelled one, it just waits.
        assert!(before_start(async { 7 }).await.is_ok());
        let fresh = Cancel::default();
        assert_eq!(fresh.scope(before_start(async { 7 })).await, Ok(7));
        let late = c.scope(before_start(async { 7 })).await;
        assert_eq!(late.map_err(|e| e.errno), Err(nix::libc::ECANCELED));
    }
}
