//! The FUSE kernel protocol (linux/fuse.h, protocol 7.31) as far as the
//! export needs it: a request's header and arguments decoded from the
//! bytes read from /dev/fuse, and the replies' bytes. Everything is
//! little-endian native layout, read field by field with bounds checks:
//! a request too short for its opcode decodes to EINVAL.
use nix::libc;

pub const KERNEL_MAJOR: u32 = 7;
pub const KERNEL_MINOR: u32 = 31;

/// fuse_in_header and fuse_out_header.
pub const IN_HEADER: usize = 40;
pub const OUT_HEADER: usize = 16;

pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const DESTROY: u32 = 38;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const LSEEK: u32 = 46;
}

/// INIT flags answered when the kernel offers them: the set the fuse3
/// crate answered before this module replaced it, so the kernel treats
/// the mount as it did (no POSIX locks: the kernel keeps them locally).
const INIT_FLAGS: u32 = (1 << 0) // ASYNC_READ
    | (1 << 2) // FILE_OPS
    | (1 << 3) // ATOMIC_O_TRUNC
    | (1 << 4) // EXPORT_SUPPORT
    | (1 << 5) // BIG_WRITES
    | (1 << 7) // SPLICE_WRITE
    | (1 << 8) // SPLICE_MOVE
    | (1 << 9) // SPLICE_READ
    | (1 << 12) // AUTO_INVAL_DATA
    | (1 << 13) // DO_READDIRPLUS
    | (1 << 14) // READDIRPLUS_AUTO
    | (1 << 15) // ASYNC_DIO
    | (1 << 18) // PARALLEL_DIROPS
    | (1 << 20) // POSIX_ACL (with default_permissions)
    | (1 << 22) // MAX_PAGES
    | (1 << 23); // CACHE_SYMLINKS

// fuse_setattr_in.valid
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;

/// Little-endian fields of a request body, bounds-checked.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn u32(&self, at: usize) -> Option<u32> {
        let b = self.0.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&self, at: usize) -> Option<u64> {
        let b = self.0.get(at..at + 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }
}

/// fuse_in_header: what every request starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
}

impl Header {
    pub fn parse(b: &[u8]) -> Option<Header> {
        let f = Fields(b.get(..IN_HEADER)?);
        Some(Header {
            len: f.u32(0)?,
            opcode: f.u32(4)?,
            unique: f.u64(8)?,
        })
    }
}

/// The fields of fuse_setattr_in the export looks at.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
}

/// A request, decoded. Write data stays in the read buffer: `at` is
/// where it starts there (from the start of the request), `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u32,
    },
    Lookup,
    GetAttr,
    SetAttr(SetAttr),
    Open,
    Read {
        offset: u64,
        size: u32,
    },
    Write {
        offset: u64,
        at: usize,
        len: usize,
    },
    Statfs,
    Release,
    Fsync,
    Flush,
    Fallocate {
        offset: u64,
        length: u64,
        mode: u32,
    },
    Lseek {
        offset: u64,
        whence: u32,
    },
    /// Ends the session (sent for fuseblk mounts only).
    Destroy,
    /// FORGET, BATCH_FORGET, NOTIFY_REPLY: the kernel expects no reply.
    NoReply,
    /// Anything else: ENOSYS, after which the kernel stops asking for
    /// most of them (INTERRUPT, GETXATTR, ACCESS, ...).
    Unsupported,
}

/// Decodes a whole request (header included). Err is the errno to reply
/// with when the request is malformed.
pub fn decode(h: &Header, req: &[u8]) -> Result<Op, i32> {
    if h.len as usize != req.len() {
        return Err(libc::EINVAL);
    }
    let body = Fields(&req[IN_HEADER.min(req.len())..]);
    let bad = libc::EINVAL;
    Ok(match h.opcode {
        opcode::INIT => Op::Init {
            major: body.u32(0).ok_or(bad)?,
            minor: body.u32(4).ok_or(bad)?,
            max_readahead: body.u32(8).ok_or(bad)?,
            flags: body.u32(12).ok_or(bad)?,
        },
        opcode::LOOKUP => Op::Lookup,
        opcode::GETATTR => Op::GetAttr,
        opcode::SETATTR => {
            // fuse_setattr_in: valid, padding, fh, size, lock_owner,
            // atime, mtime, ctime, 3 nsecs, mode, unused, uid, gid, unused.
            let valid = body.u32(0).ok_or(bad)?;
            body.u32(84).ok_or(bad)?;
            let pick32 = |bit: u32, at: usize| (valid & bit != 0).then(|| body.u32(at)).flatten();
            Op::SetAttr(SetAttr {
                mode: pick32(FATTR_MODE, 68),
                uid: pick32(FATTR_UID, 76),
                gid: pick32(FATTR_GID, 80),
                size: (valid & FATTR_SIZE != 0).then(|| body.u64(16)).flatten(),
            })
        }
        opcode::OPEN => Op::Open,
        opcode::READ => {
            // fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding.
            body.u32(36).ok_or(bad)?;
            Op::Read {
                offset: body.u64(8).ok_or(bad)?,
                size: body.u32(16).ok_or(bad)?,
            }
        }
        opcode::WRITE => {
            // fuse_write_in (40 bytes), then the data.
            body.u32(36).ok_or(bad)?;
            let len = body.u32(16).ok_or(bad)? as usize;
            let at = IN_HEADER + 40;
            if req.len() - at != len {
                return Err(bad);
            }
            Op::Write {
                offset: body.u64(8).ok_or(bad)?,
                at,
                len,
            }
        }
        opcode::STATFS => Op::Statfs,
        opcode::RELEASE => Op::Release,
        opcode::FSYNC => Op::Fsync,
        opcode::FLUSH => Op::Flush,
        opcode::FALLOCATE => {
            // fuse_fallocate_in: fh, offset, length, mode, padding.
            body.u32(28).ok_or(bad)?;
            Op::Fallocate {
                offset: body.u64(8).ok_or(bad)?,
                length: body.u64(16).ok_or(bad)?,
                mode: body.u32(24).ok_or(bad)?,
            }
        }
        opcode::LSEEK => {
            // fuse_lseek_in: fh, offset, whence, padding.
            body.u32(20).ok_or(bad)?;
            Op::Lseek {
                offset: body.u64(8).ok_or(bad)?,
                whence: body.u32(16).ok_or(bad)?,
            }
        }
        opcode::DESTROY => Op::Destroy,
        opcode::FORGET | opcode::BATCH_FORGET | opcode::NOTIFY_REPLY => Op::NoReply,
        _ => Op::Unsupported,
    })
}

/// Appends little-endian fields to a reply body.
#[derive(Default)]
pub struct Out(pub Vec<u8>);

impl Out {
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// fuse_out_header for a reply of `body` bytes (`error` is 0 or -errno).
pub fn out_header(unique: u64, error: i32, body: usize) -> [u8; OUT_HEADER] {
    let mut h = [0u8; OUT_HEADER];
    h[0..4].copy_from_slice(&((OUT_HEADER + body) as u32).to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// What the export answers to INIT.
pub struct InitReply {
    pub max_readahead: u32,
    pub offered: u32,
    pub kernel_minor: u32,
    pub max_background: u16,
    pub max_write: u32,
}

/// fuse_init_out (64 bytes; 24 for a kernel older than 7.23).
pub fn init_out(r: &InitReply) -> Vec<u8> {
    let out = Out::default()
        .u32(KERNEL_MAJOR)
        .u32(KERNEL_MINOR)
        .u32(r.max_readahead)
        .u32(r.offered & INIT_FLAGS)
        .u16(r.max_background)
        .u16(r.max_background / 4 * 3)
        .u32(r.max_write);
    if r.kernel_minor < 23 {
        return out.0;
    }
    let mut out = out.u32(1).u16(u16::MAX).u16(0).0;
    out.resize(64, 0);
    out
}

/// The file's attributes for fuse_attr_out.
pub struct Attr {
    pub size: u64,
    pub blocks: u64,
    pub time: (u64, u32),
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

/// fuse_attr_out: valid for one second, inode 1, one link.
pub fn attr_out(a: &Attr) -> Vec<u8> {
    let (s, ns) = a.time;
    Out::default()
        .u64(1)
        .u32(0)
        .u32(0)
        .u64(1)
        .u64(a.size)
        .u64(a.blocks)
        .u64(s)
        .u64(s)
        .u64(s)
        .u32(ns)
        .u32(ns)
        .u32(ns)
        .u32(a.mode)
        .u32(1)
        .u32(a.uid)
        .u32(a.gid)
        .u32(0)
        .u32(a.blksize)
        .u32(0)
        .0
}

/// fuse_open_out with no handle and no open flags.
pub fn open_out() -> Vec<u8> {
    vec![0u8; 16]
}

/// fuse_write_out.
pub fn write_out(written: u32) -> Vec<u8> {
    Out::default().u32(written).u32(0).0
}

/// fuse_lseek_out.
pub fn lseek_out(offset: u64) -> Vec<u8> {
    Out::default().u64(offset).0
}

/// fuse_statfs_out as libfuse answers for a filesystem without statfs:
/// block size 512, names up to 255, the rest zero.
pub fn statfs_out() -> Vec<u8> {
    let mut out = Out::default()
        .u64(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u32(512)
        .u32(255)
        .0;
    out.resize(80, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
        let mut r = Out::default()
            .u32((IN_HEADER + body.len()) as u32)
            .u32(opcode)
            .u64(unique)
            .u64(1)
            .u32(0)
            .u32(0)
            .u32(0)
            .u32(0)
            .0;
        r.extend_from_slice(body);
        r
    }

    fn decode_all(r: &[u8]) -> Result<Op, i32> {
        let h = Header::parse(r).ok_or(-1)?;
        decode(&h, r)
    }

    #[test]
    fn header_needs_forty_bytes() {
        assert_eq!(Header::parse(&[0u8; 39]), None);
        let r = request(opcode::GETATTR, 7, &[0u8; 16]);
        assert_eq!(
            Header::parse(&r),
            Some(Header {
                len: 56,
                opcode: opcode::GETATTR,
                unique: 7
            })
        );
    }

    #[test]
    fn read_and_write_decode_their_arguments() {
        let body = Out::default()
            .u64(0)
            .u64(4096)
            .u32(512)
            .u32(0)
            .u64(0)
            .u32(0)
            .u32(0)
            .0;
        assert_eq!(
            decode_all(&request(opcode::READ, 1, &body)),
            Ok(Op::Read {
                offset: 4096,
                size: 512
            })
        );
        assert_eq!(
            decode_all(&request(opcode::WRITE, 1, &write_body(8192, 3, b"abc"))),
            Ok(Op::Write {
                offset: 8192,
                at: 80,
                len: 3
            })
        );
    }

    /// A WRITE's arguments (fh, offset, size, write flags, lock owner,
    /// flags, padding) followed by `data`.
    fn write_body(offset: u64, size: u32, data: &[u8]) -> Vec<u8> {
        let mut body = Out::default()
            .u64(0)
            .u64(offset)
            .u32(size)
            .u32(0)
            .u64(0)
            .u32(0)
            .u32(0)
            .0;
        body.extend_from_slice(data);
        body
    }

    #[test]
    fn malformed_requests_are_einval() {
        // Arguments cut short.
        for op in [
            opcode::READ,
            opcode::WRITE,
            opcode::SETATTR,
            opcode::FALLOCATE,
            opcode::LSEEK,
            opcode::INIT,
        ] {
            assert_eq!(
                decode_all(&request(op, 1, &[0u8; 8])),
                Err(libc::EINVAL),
                "opcode {op}"
            );
        }
        // A write whose size is not the data it carries.
        assert_eq!(
            decode_all(&request(opcode::WRITE, 1, &write_body(0, 10, b"abc"))),
            Err(libc::EINVAL)
        );
        // A header whose length is not what was read.
        let mut r = request(opcode::GETATTR, 1, &[0u8; 16]);
        r.truncate(48);
        assert_eq!(decode_all(&r), Err(libc::EINVAL));
    }

    #[test]
    fn setattr_takes_only_valid_fields() {
        let mut body = vec![0u8; 88];
        body[0..4].copy_from_slice(&(FATTR_MODE | FATTR_SIZE).to_le_bytes());
        body[16..24].copy_from_slice(&(1u64 << 20).to_le_bytes());
        body[68..72].copy_from_slice(&0o640u32.to_le_bytes());
        body[76..80].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            decode_all(&request(opcode::SETATTR, 1, &body)),
            Ok(Op::SetAttr(SetAttr {
                mode: Some(0o640),
                uid: None,
                gid: None,
                size: Some(1 << 20)
            }))
        );
    }

    #[test]
    fn unknown_and_silent_opcodes() {
        const INTERRUPT: u32 = 36;
        assert_eq!(
            decode_all(&request(INTERRUPT, 1, &[0u8; 8])),
            Ok(Op::Unsupported)
        );
        assert_eq!(decode_all(&request(9999, 1, &[])), Ok(Op::Unsupported));
        assert_eq!(
            decode_all(&request(opcode::FORGET, 1, &[0u8; 8])),
            Ok(Op::NoReply)
        );
    }

    #[test]
    fn reply_layouts() {
        assert_eq!(
            out_header(5, -libc::EIO, 0)[..8],
            [16, 0, 0, 0, 251, 255, 255, 255]
        );
        let a = Attr {
            size: 1,
            blocks: 1,
            time: (0, 0),
            mode: libc::S_IFREG | 0o600,
            uid: 0,
            gid: 0,
            blksize: 512,
        };
        assert_eq!(attr_out(&a).len(), 104);
        assert_eq!(statfs_out().len(), 80);
        let r = InitReply {
            max_readahead: 0,
            offered: u32::MAX,
            kernel_minor: 40,
            max_background: 64,
            max_write: 1 << 20,
        };
        let init = init_out(&r);
        assert_eq!(init.len(), 64);
        // No POSIX locks, no writeback cache.
        let flags = u32::from_le_bytes([init[12], init[13], init[14], init[15]]);
        assert_eq!(flags & ((1 << 1) | (1 << 16)), 0);
    }
}
