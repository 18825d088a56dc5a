//! The pidfile: a POSIX (fcntl) write lock on the whole file held for the
//! daemon's life, as QEMU does, so a second daemon on the same path fails and
//! QEMU's tools see the same lock. Unlinked when dropped.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg};

pub struct Pidfile {
    path: PathBuf,
    _file: File,
}

impl Pidfile {
    /// Creates (or takes over a stale) pidfile and writes our pid into it.
    /// The error text is QEMU's, without the program prefix.
    pub fn acquire(path: &Path) -> Result<Pidfile, String> {
        // Keep an absolute path: --daemonize changes the directory to /.
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        loop {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&abs)
                .map_err(|e| format!("Could not create '{}': {}", path.display(), os_msg(&e)))?;
            let lock = nix::libc::flock {
                l_type: nix::libc::F_WRLCK as i16,
                l_whence: nix::libc::SEEK_SET as i16,
                l_start: 0,
                l_len: 0,
                l_pid: 0,
            };
            fcntl(file.as_raw_fd(), FcntlArg::F_SETLK(&lock)).map_err(|e| {
                format!("Cannot lock pid file: {}", os_msg(&std::io::Error::from(e)))
            })?;
            // The file may have been unlinked (by an exiting daemon) between
            // open and lock: then retry on the new file.
            let ours = file.metadata().map_err(|e| os_msg(&e))?;
            match std::fs::metadata(&abs) {
                Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {}
                _ => continue,
            }
            file.set_len(0)
                .map_err(|_| "Failed to truncate pid file".to_string())?;
            file.write_all(format!("{}\n", std::process::id()).as_bytes())
                .map_err(|_| "Failed to write pid file".to_string())?;
            return Ok(Pidfile {
                path: abs,
                _file: file,
            });
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The strerror text of an I/O error, without Rust's " (os error N)".
pub fn os_msg(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(pos) => text[..pos].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_conflict_content_and_cleanup() {
        let dir = std::env::temp_dir().join(format!("rsd-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("p.pid");
        std::fs::write(&path, "99999\nstale\n").expect("stale");
        let p = Pidfile::acquire(&path).expect("acquire over stale file");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!("{}\n", std::process::id())
        );
        drop(p);
        assert!(!path.exists());
        let err = Pidfile::acquire(&dir.join("no/such/dir.pid")).err();
        assert_eq!(
            err.as_deref(),
            Some(
                format!(
                    "Could not create '{}': No such file or directory",
                    dir.join("no/such/dir.pid").display()
                )
                .as_str()
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
