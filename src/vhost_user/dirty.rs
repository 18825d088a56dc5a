//! Dirty-page logging for live migration (VHOST_F_LOG_ALL with
//! VHOST_USER_PROTOCOL_F_LOG_SHMFD), as the vhost-user spec defines it:
//! the frontend shares a bitmap with one bit per 4 KiB page of guest
//! physical memory, and while LOG_ALL is acked the backend sets the bit
//! of every page it writes (request data, status bytes, the used ring),
//! so QEMU can copy those pages again before the VM moves.
//!
//! rsd marks every writable descriptor of a finished request whole and
//! the whole used ring of a queue after each batch: never less than was
//! written (a page missed is guest data lost on the destination), at
//! worst a page or two more than libvhost-user would mark.
use std::fs::File;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use vm_memory::{FileOffset, MmapRegion};

/// VHOST_LOG_PAGE: the guest memory one bit stands for.
const LOG_PAGE: u64 = 4096;

/// The frontend's bitmap, mapped.
pub struct DirtyLog {
    /// A shared mapping, only touched through atomic byte operations
    /// (the frontend clears bits concurrently with its own atomics).
    map: MmapRegion,
    len: usize,
}

impl DirtyLog {
    /// Maps `size` bytes at `offset` of the frontend's descriptor.
    /// Refuses a region that does not lie inside the file: touching a
    /// page past its end would kill the daemon with SIGBUS.
    pub fn map(file: &File, size: u64, offset: u64) -> std::io::Result<DirtyLog> {
        let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
        let file_len = file.metadata()?.len();
        let end = offset
            .checked_add(size)
            .ok_or_else(|| invalid("log region overflows"))?;
        if end > file_len {
            return Err(invalid("log region past the end of its file"));
        }
        let len = usize::try_from(size).map_err(|_| invalid("log region too large"))?;
        if len == 0 {
            return Err(invalid("empty log region"));
        }
        let map = MmapRegion::from_file(FileOffset::new(file.try_clone()?, offset), len)
            .map_err(std::io::Error::other)?;
        Ok(DirtyLog { map, len })
    }

    /// Marks the pages of guest physical range [gpa, gpa+len) dirty.
    /// Bits past the end of the bitmap (memory the frontend did not
    /// cover) are skipped.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let Ok(byte) = usize::try_from(page / 8) else {
                return;
            };
            if byte >= self.len {
                return;
            }
            // SAFETY: byte < len, inside the mapping; u8 needs no
            // alignment; every access to the bitmap is atomic.
            let cell = unsafe { AtomicU8::from_ptr(self.map.as_ptr().add(byte)) };
            cell.fetch_or(1 << (page % 8), Ordering::SeqCst);
        }
    }
}

/// The log a connection's queue workers write to: set while LOG_ALL is
/// acked and a log base has been given, None otherwise.
#[derive(Clone, Default)]
pub struct Switch(Arc<RwLock<Option<Arc<DirtyLog>>>>);

impl Switch {
    pub fn set(&self, log: Option<Arc<DirtyLog>>) {
        match self.0.write() {
            Ok(mut g) => *g = log,
            Err(e) => *e.into_inner() = log,
        }
    }

    /// The log to mark now (read once per batch of completions).
    pub fn current(&self) -> Option<Arc<DirtyLog>> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_file(len: u64) -> File {
        let fd = nix::sys::memfd::memfd_create(c"log", nix::sys::memfd::MemFdCreateFlag::empty())
            .expect("memfd");
        let f = File::from(fd);
        f.set_len(len).expect("size");
        f
    }

    fn bits(f: &File) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; f.metadata().expect("meta").len() as usize];
        f.read_exact_at(&mut b, 0).expect("read");
        b
    }

    #[test]
    fn marks_every_page_a_range_touches_and_nothing_else() {
        let f = log_file(4);
        let log = DirtyLog::map(&f, 4, 0).expect("map");
        // Pages 1 and 2 (a range crossing one page boundary).
        log.mark(4096 + 4000, 200);
        // Page 9: byte 1, bit 1.
        log.mark(9 * 4096, 1);
        // Past the bitmap (page 32 and on): ignored, no crash.
        log.mark(32 * 4096, 1 << 30);
        log.mark(u64::MAX - 10, 100);
        log.mark(0, 0);
        assert_eq!(bits(&f), vec![0b0000_0110, 0b0000_0010, 0, 0]);
    }

    #[test]
    fn a_region_past_the_file_is_refused() {
        let f = log_file(4096);
        assert!(DirtyLog::map(&f, 8192, 0).is_err());
        assert!(DirtyLog::map(&f, 4096, 4096).is_err());
        assert!(DirtyLog::map(&f, 0, 0).is_err());
        assert!(DirtyLog::map(&f, u64::MAX, 4096).is_err());
        assert!(DirtyLog::map(&f, 4096, 0).is_ok());
    }
}
