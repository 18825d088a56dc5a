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
