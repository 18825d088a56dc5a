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
