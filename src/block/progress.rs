//! Long block work (creating and preallocating an image) reports its
//! progress and notices a cancel through this trait, so the block layer
//! needs nothing of the job machinery that drives it.
use std::sync::Arc;

use super::node::Node;

/// The error text of work stopped by a cancel, as QEMU words it.
pub const CANCELED: &str = "Operation canceled";

pub trait Progress: Send + Sync {
    /// The work should stop (with ECANCELED and [`CANCELED`]).
    fn cancelled(&self) -> bool;
    fn set_progress(&self, done: u64, total: u64);
}

/// Nodes an image creation writes to, looked up before it starts (the
/// lookup's error is the creation's, as in QEMU).
pub struct Targets {
    pub file: Result<Arc<Node>, String>,
    /// The data file's node and the filename the image will name.
    pub data_file: Option<Result<(Arc<Node>, String), String>>,
    /// A LUKS volume's detached header node.
    pub header: Option<Result<Arc<Node>, String>>,
    /// The secrets the options name (key-secret, encrypt.key-secret).
    pub secrets: crate::objects::Secrets,
}
