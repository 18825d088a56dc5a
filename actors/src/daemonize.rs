//! `--daemonize`: fork before any thread exists, let the parent wait until
//! the child reports that start-up finished, then detach the child.
//!
//! The parent exits 0 only when the child wrote a zero byte to the status
//! pipe; if the child dies first (it prints its own error on the inherited
//! stderr) the parent exits 1.
use std::os::fd::{AsRawFd, OwnedFd};

use nix::unistd::{fork, pipe, read, setsid, write, ForkResult};

pub struct Daemon {
    status: OwnedFd,
}

/// Forks twice (parent waits, intermediate exits) and starts a new session.
/// Must be called while the process has a single thread.
pub fn start() -> Result<Daemon, String> {
    let (rd, wr) = pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the caller guarantees no other thread exists yet.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { .. } => {
            drop(wr);
            let mut byte = [1u8; 1];
            let n = loop {
                match read(rd.as_raw_fd(), &mut byte) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    r => break r,
                }
            };
            let ok = matches!(n, Ok(1)) && byte[0] == 0;
            std::process::exit(if ok { 0 } else { 1 });
        }
        ForkResult::Child => {}
    }
    drop(rd);
    setsid().map_err(|e| format!("setsid: {e}"))?;
    // SAFETY: still single-threaded.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { .. } => std::process::exit(0),
        ForkResult::Child => {}
    }
    Ok(Daemon { status: wr })
}

impl Daemon {
    /// Start-up succeeded: release the parent, detach from the terminal.
    pub fn finish(self) {
        let _ = write(&self.status, &[0u8]);
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            for fd in 0..3 {
                let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
            }
        }
        let _ = std::env::set_current_dir("/");
    }
}
