//! Small helpers every layer uses, with no dependencies of their own.
use tokio::task::JoinHandle;

/// The strerror text of an I/O error, without Rust's " (os error N)",
/// as QEMU prints it.
pub fn os_msg(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(pos) => text[..pos].to_string(),
        None => text,
    }
}

/// Aborts a task when dropped: the tasks an actor spawns die with its
/// state, also when the actor fails (ractor then skips post_stop).
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A task an actor owns and watches: `work` runs on its own task and,
/// when it ends for any reason (a panic included), `ended` is called
/// with `what` (the actor then fails, to be restarted). Both tasks stop
/// when the returned guard is dropped with the actor's state.
pub fn watched<F>(
    what: &'static str,
    work: F,
    ended: impl FnOnce(String) + Send + 'static,
) -> Watched
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<String>();
    let task = tokio::spawn(async move {
        // Dropped when the work ends, unwinding too.
        struct Report(Option<tokio::sync::oneshot::Sender<String>>, &'static str);
        impl Drop for Report {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(format!("{} ended", self.1));
                }
            }
        }
        let _report = Report(Some(done_tx), what);
        work.await;
    });
    let watch = tokio::spawn(async move {
        if let Ok(why) = done_rx.await {
            ended(why);
        }
    });
    Watched {
        _task: AbortOnDrop(task),
        _watch: AbortOnDrop(watch),
    }
}

/// The guard of [`watched`].
pub struct Watched {
    _task: AbortOnDrop,
    _watch: AbortOnDrop,
}

/// Polls a future and turns a panic inside it into an error, so the
/// caller can still clean up what it owns (the control actor).
pub struct CatchUnwind<F>(pub F);

impl<F: std::future::Future + Unpin> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = std::pin::Pin::new(&mut self.0);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

/// The message a panic was raised with.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Hands memory that large requests left free back to the system, at
/// most once a second, a second after the first call. glibc keeps what
/// a burst of mid-sized buffers freed in its arenas: after 8 NBD clients
/// of mixed 4 KiB-4 MiB I/O left, rsd stayed at 30 MiB against 10 MiB
/// before them (QEMU trims its heap the same way and went back to 14).
/// Called when an NBD client leaves and when a job concludes.
pub fn trim_memory_soon() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static PENDING: AtomicBool = AtomicBool::new(false);
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    rt.spawn(async {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        PENDING.store(false, Ordering::Release);
        let _ = tokio::task::spawn_blocking(trim_memory).await;
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_memory() {
    // SAFETY: malloc_trim only walks and releases the allocator's own
    // free lists; it takes no pointers.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_memory() {}
