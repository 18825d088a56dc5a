//! QEMU-compatible image locking: open file description (OFD) locks on
//! single bytes. Byte 100+b is read-locked for each permission b held;
//! byte 200+b for each permission b not shared with others. Before
//! taking them, conflicts are probed with F_OFD_GETLK, so QEMU's tools
//! and rsd refuse each other's conflicting opens both ways.
use std::os::fd::RawFd;

use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;

use super::perm::{Perm, PERM_COUNT};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

fn flock(kind: i32, start: i64) -> libc::flock {
    libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    }
}

/// True if another open file description holds any lock on `byte`.
fn byte_taken(fd: RawFd, byte: i64) -> Result<bool, nix::Error> {
    let mut fl = flock(libc::F_WRLCK, byte);
    fcntl(fd, FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

fn set_byte(fd: RawFd, byte: i64, locked: bool) -> Result<(), nix::Error> {
    let kind = if locked { libc::F_RDLCK } else { libc::F_UNLCK };
    fcntl(fd, FcntlArg::F_OFD_SETLK(&flock(kind, byte)))?;
    Ok(())
}

/// Checks that `perm`/`shared` do not conflict with other holders.
/// The message is QEMU's.
pub fn check(fd: RawFd, perm: Perm, shared: Perm) -> Result<(), String> {
    let err = |e: nix::Error| format!("Failed to lock byte: {}", e.desc());
    for b in 0..PERM_COUNT {
        let p = Perm::bit(b);
        if perm.contains(p) && byte_taken(fd, SHARED_BASE + b as i64).map_err(err)? {
            return Err(format!("Failed to get \"{}\" lock", p.human_names()));
        }
    }
    for b in 0..PERM_COUNT {
        let p = Perm::bit(b);
        if !shared.contains(p) && byte_taken(fd, PERM_BASE + b as i64).map_err(err)? {
            return Err(format!("Failed to get shared \"{}\" lock", p.human_names()));
        }
    }
    Ok(())
}

/// Makes the held lock bytes match `perm`/`shared` exactly.
pub fn apply(fd: RawFd, perm: Perm, shared: Perm) -> Result<(), String> {
    for b in 0..PERM_COUNT {
        let p = Perm::bit(b);
        set_byte(fd, PERM_BASE + b as i64, perm.contains(p))
            .and_then(|()| set_byte(fd, SHARED_BASE + b as i64, !shared.contains(p)))
            .map_err(|e| format!("Failed to lock byte {}: {}", PERM_BASE + b as i64, e.desc()))?;
    }
    Ok(())
}
