//! The block layer's error: an errno-like kind for the data plane (mapped
//! to NBD errors, virtio status, FUSE errno later) plus a message with
//! context for QMP.
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockError {
    /// A positive errno value (EIO, EINVAL, EPERM, ENOSPC, ENOTSUP, ...).
    pub errno: i32,
    pub msg: String,
}

pub type BlockResult<T> = Result<T, BlockError>;

impl BlockError {
    pub fn new(errno: i32, msg: impl Into<String>) -> Self {
        BlockError {
            errno,
            msg: msg.into(),
        }
    }
    pub fn io(e: &std::io::Error, what: &str) -> Self {
        BlockError {
            errno: e.raw_os_error().unwrap_or(nix::libc::EIO),
            msg: format!("{what}: {}", crate::util::os_msg(e)),
        }
    }
    pub fn errno(errno: nix::errno::Errno, what: &str) -> Self {
        BlockError::io(&std::io::Error::from_raw_os_error(errno as i32), what)
    }
    pub fn inval(msg: impl Into<String>) -> Self {
        BlockError::new(nix::libc::EINVAL, msg)
    }
    pub fn perm(msg: impl Into<String>) -> Self {
        BlockError::new(nix::libc::EPERM, msg)
    }
    pub fn unsupported(msg: impl Into<String>) -> Self {
        BlockError::new(nix::libc::ENOTSUP, msg)
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for BlockError {}
