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

/// What each export protocol tells its client for a failed request.
impl BlockError {
    /// The NBD error the spec allows, mapped as QEMU maps it (anything
    /// without an NBD equivalent is EINVAL). NBD's values are Linux's.
    pub fn nbd_error(&self) -> u32 {
        use nix::libc;
        let e = match self.errno {
            libc::EPERM | libc::EROFS => libc::EPERM,
            libc::EIO => libc::EIO,
            libc::ENOMEM => libc::ENOMEM,
            libc::EDQUOT | libc::EFBIG | libc::ENOSPC => libc::ENOSPC,
            libc::EOVERFLOW => libc::EOVERFLOW,
            libc::ENOTSUP => libc::ENOTSUP,
            libc::ESHUTDOWN => libc::ESHUTDOWN,
            _ => libc::EINVAL,
        };
        e as u32
    }

    /// The virtio-blk request status: UNSUPP (2) for an operation the
    /// node cannot do, IOERR (1) for anything else.
    pub fn virtio_blk_status(&self) -> u8 {
        if self.errno == nix::libc::ENOTSUP {
            2
        } else {
            1
        }
    }

    /// The errno a FUSE reply carries (positive; the kernel negates it).
    pub fn fuse_errno(&self) -> i32 {
        if self.errno > 0 {
            self.errno
        } else {
            nix::libc::EIO
        }
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for BlockError {}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::libc;

    #[test]
    fn each_protocol_gets_its_own_error() {
        let e = |n| BlockError::new(n, "x");
        assert_eq!(e(libc::EROFS).nbd_error(), libc::EPERM as u32);
        assert_eq!(e(libc::EFBIG).nbd_error(), libc::ENOSPC as u32);
        assert_eq!(e(libc::ENOENT).nbd_error(), libc::EINVAL as u32);
        assert_eq!(e(libc::EIO).nbd_error(), libc::EIO as u32);
        assert_eq!(e(libc::ENOTSUP).virtio_blk_status(), 2);
        assert_eq!(e(libc::ENOSPC).virtio_blk_status(), 1);
        assert_eq!(e(libc::ENOSPC).fuse_errno(), libc::ENOSPC);
        assert_eq!(e(0).fuse_errno(), libc::EIO);
    }
}
