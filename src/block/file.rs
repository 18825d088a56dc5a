//! The `file` and `host_device` protocol drivers: a regular file or a
//! block device, read and written in place.
//!
//! Reads and writes first try the syscall with RWF_NOWAIT on the calling
//! task's thread: when the data is in the page cache (always on tmpfs)
//! the request completes with no thread hand-off. Only when the kernel
//! would block does the call move to `block_in_place`, which lets the
//! runtime shift other tasks away while this thread waits. bench/fileio
//! compares this with a blocking pool and io_uring.
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nix::libc;

use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::error::{BlockError, BlockResult};
use super::lock;
use super::perm::Perm;

#[derive(Clone, Debug)]
pub struct FileOptions {
    pub filename: String,
    pub read_only: bool,
    /// Open read-write, but fall back to read-only if that is refused.
    pub auto_read_only: bool,
    pub direct: bool,
    /// Take QEMU's image locks (locking=auto|on).
    pub locking: bool,
    /// "file", or "host_device"/"host_cdrom" (a block or character device).
    pub driver: String,
}

pub struct FileDriver {
    driver: &'static str,
    file: File,
    size: AtomicU64,
    direct: bool,
    read_only: bool,
    block_device: bool,
    locking: bool,
    /// The perm/shared pair the lock bytes currently express.
    held: Mutex<(Perm, Perm)>,
}

fn os_err(e: &std::io::Error) -> String {
    actors::pidfile::os_msg(e)
}

impl FileDriver {
    pub fn open(o: &FileOptions) -> Result<FileDriver, String> {
        let open = |write: bool| {
            let mut oo = OpenOptions::new();
            oo.read(true).write(write);
            let mut flags = libc::O_CLOEXEC;
            if o.direct {
                flags |= libc::O_DIRECT;
            }
            oo.custom_flags(flags);
            oo.open(&o.filename)
        };
        let (file, read_only) = match open(!o.read_only) {
            Ok(f) => (f, o.read_only),
            Err(e)
                if !o.read_only
                    && o.auto_read_only
                    && matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EROFS)) =>
            {
                (open(false).map_err(|e| open_error(&o.filename, &e))?, true)
            }
            Err(e) => return Err(open_error(&o.filename, &e)),
        };
        let meta = file.metadata().map_err(|e| open_error(&o.filename, &e))?;
        let ft = meta.file_type();
        let block_device = ft.is_block_device();
        if o.driver != "file" {
            if !block_device && !ft.is_char_device() {
                return Err(format!(
                    "'{}' driver requires '{}' to be either a character or block device",
                    o.driver, o.filename
                ));
            }
        } else if !ft.is_file() {
            return Err(format!(
                "'file' driver requires '{}' to be a regular file",
                o.filename
            ));
        }
        let size = if block_device {
            let mut f = &file;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).unwrap_or(0)
        } else {
            meta.len()
        };
        let driver = match o.driver.as_str() {
            "host_device" => "host_device",
            "host_cdrom" => "host_cdrom",
            _ => "file",
        };
        let d = FileDriver {
            driver,
            file,
            size: AtomicU64::new(size),
            direct: o.direct,
            read_only,
            block_device,
            locking: o.locking,
            held: Mutex::new((Perm::NONE, Perm::ALL)),
        };
        Ok(d)
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Checks and takes the lock bytes for a new permission pair; on a
    /// conflict nothing changes. A no-op with locking=off.
    pub fn lock_perms(&self, perm: Perm, shared: Perm) -> Result<(), String> {
        if !self.locking {
            return Ok(());
        }
        let mut held = self
            .held
            .lock()
            .map_err(|_| "lock state poisoned".to_string())?;
        // Take the new bytes first (as QEMU does), then probe; undo on conflict.
        let old = *held;
        lock::apply(self.fd(), perm.union(old.0), shared.intersect(old.1))?;
        if let Err(e) = lock::check(self.fd(), perm, shared) {
            let _ = lock::apply(self.fd(), old.0, old.1);
            return Err(e);
        }
        lock::apply(self.fd(), perm, shared)?;
        *held = (perm, shared);
        Ok(())
    }
}

fn open_error(path: &str, e: &std::io::Error) -> String {
    format!("Could not open '{path}': {}", os_err(e))
}

/// Runs a blocking call without stalling the reactor: on a multi-thread
/// runtime worker the runtime moves its other tasks elsewhere first.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// One preadv2/pwritev2 call; Ok(bytes) or the error.
fn rw_once(
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    off: u64,
    write: bool,
    flags: i32,
) -> std::io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `buf` points to `len` bytes owned by the caller for the
    // duration of this synchronous call.
    let n = unsafe {
        if write {
            libc::pwritev2(fd, &iov, 1, off as libc::off_t, flags)
        } else {
            libc::preadv2(fd, &iov, 1, off as libc::off_t, flags)
        }
    };
    if n < 0 {
        Err(last_err())
    } else {
        Ok(n as usize)
    }
}

/// Reads or writes the whole buffer: non-blocking first, then blocking.
/// Reads past the end of the file fill with zeroes.
fn rw_all(
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    off: u64,
    write: bool,
    extra: i32,
) -> std::io::Result<()> {
    let mut done = 0usize;
    let mut nowait = true;
    while done < len {
        // SAFETY: done < len, so the pointer stays inside the buffer.
        let p = unsafe { buf.add(done) };
        let flags = extra | if nowait { libc::RWF_NOWAIT } else { 0 };
        let r = if nowait {
            rw_once(fd, p, len - done, off + done as u64, write, flags)
        } else {
            blocking(|| rw_once(fd, p, len - done, off + done as u64, write, flags))
        };
        match r {
            Ok(0) if !write => {
                // End of file: the rest reads as zeroes.
                // SAFETY: the range [done, len) is inside the buffer.
                unsafe { std::ptr::write_bytes(p, 0, len - done) };
                return Ok(());
            }
            Ok(0) => return Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
            Ok(n) => done += n,
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) if nowait => nowait = false,
                Some(libc::EINTR) => {}
                _ => return Err(e),
            },
        }
    }
    Ok(())
}

impl Driver for FileDriver {
    fn name(&self) -> &'static str {
        self.driver
    }

    /// QEMU counts sizes in 512-byte sectors: a file of 1000001 bytes is
    /// a node of 1000448 (the tail reads as zeroes).
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire).div_ceil(512) * 512
    }

    fn set_perms(&self, perm: Perm, shared: Perm) -> Result<(), String> {
        self.lock_perms(perm, shared)
    }

    fn limits(&self) -> Limits {
        Limits {
            request_alignment: if self.direct { 4096 } else { 1 },
            ..Limits::default()
        }
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.needs_bounce(offset, buf.as_ptr(), buf.len()) {
                let (start, mut bounce) = self.bounce_for(offset, buf.len());
                rw_all(
                    self.fd(),
                    bounce.as_mut_ptr(),
                    bounce.len(),
                    start,
                    false,
                    0,
                )
                .map_err(|e| BlockError::io(&e, "read"))?;
                let skip = (offset - start) as usize;
                buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
                return Ok(());
            }
            rw_all(self.fd(), buf.as_mut_ptr(), buf.len(), offset, false, 0)
                .map_err(|e| BlockError::io(&e, "read"))
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.read_only {
                return Err(BlockError::perm("read-only file"));
            }
            let extra = if flags.fua { libc::RWF_DSYNC } else { 0 };
            let end = offset + buf.len() as u64;
            if self.needs_bounce(offset, buf.as_ptr(), buf.len()) {
                // Read-modify-write of the aligned blocks around the data.
                let old_size = self.size();
                let (start, mut bounce) = self.bounce_for(offset, buf.len());
                rw_all(
                    self.fd(),
                    bounce.as_mut_ptr(),
                    bounce.len(),
                    start,
                    false,
                    0,
                )
                .map_err(|e| BlockError::io(&e, "write"))?;
                let skip = (offset - start) as usize;
                bounce.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
                rw_all(
                    self.fd(),
                    bounce.as_mut_ptr(),
                    bounce.len(),
                    start,
                    true,
                    extra,
                )
                .map_err(|e| BlockError::io(&e, "write"))?;
                let want = old_size.max(end);
                if start + bounce.len() as u64 > want {
                    blocking(|| self.file.set_len(want))
                        .map_err(|e| BlockError::io(&e, "write"))?;
                }
                self.size.fetch_max(end, Ordering::AcqRel);
                return Ok(());
            }
            // The write path never writes through the pointer.
            rw_all(
                self.fd(),
                buf.as_ptr() as *mut u8,
                buf.len(),
                offset,
                true,
                extra,
            )
            .map_err(|e| BlockError::io(&e, "write"))?;
            self.size.fetch_max(end, Ordering::AcqRel);
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            blocking(|| self.file.sync_data()).map_err(|e| BlockError::io(&e, "flush"))
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.block_device {
                let range = [offset, len];
                // SAFETY: BLKDISCARD reads two u64 from the pointer.
                let r = blocking(|| unsafe { libc::ioctl(self.fd(), 0x1277, range.as_ptr()) });
                return if r < 0 {
                    Err(BlockError::io(&last_err(), "discard"))
                } else {
                    Ok(())
                };
            }
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
                "discard",
            )
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Err(BlockError::perm("read-only file"));
            }
            let end = offset + len;
            let real_size = self.size.load(Ordering::Acquire);
            let mut result = if flags.may_unmap && !self.block_device && end <= real_size {
                self.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                    "write zeroes",
                )
            } else {
                Err(BlockError::unsupported("no unmap"))
            };
            if result.is_err() && !self.block_device {
                result = self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len, "write zeroes");
            }
            if result.is_err() {
                if flags.no_fallback {
                    return Err(BlockError::unsupported(
                        "write zeroes would fall back to writes",
                    ));
                }
                let chunk = vec![0u8; (len.min(1 << 20)) as usize];
                let mut pos = offset;
                while pos < end {
                    let n = (end - pos).min(chunk.len() as u64) as usize;
                    self.write(pos, &chunk[..n], WriteFlags::default()).await?;
                    pos += n as u64;
                }
            }
            self.size.fetch_max(end, Ordering::AcqRel);
            if flags.fua {
                self.flush().await?;
            }
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        Box::pin(async move {
            let fd = self.fd();
            let data = |ok: bool, n: u64| Extent {
                len: n.clamp(1, len.max(1)),
                data: ok,
                zero: !ok,
                allocated: true,
            };
            if self.block_device {
                return Ok(data(true, len));
            }
            // SAFETY: lseek on our own descriptor.
            let next_data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
            if next_data < 0 {
                // ENXIO: only a hole follows up to the end of the file.
                return Ok(data(false, len));
            }
            let next_data = next_data as u64;
            if next_data > offset {
                return Ok(data(false, (next_data - offset).min(len)));
            }
            // SAFETY: as above.
            let next_hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
            let end = if next_hole < 0 {
                offset + len
            } else {
                next_hole as u64
            };
            Ok(data(true, (end.saturating_sub(offset)).min(len)))
        })
    }

    fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.block_device {
                return if size == self.size() {
                    Ok(())
                } else {
                    Err(BlockError::unsupported("Cannot grow device files"))
                };
            }
            blocking(|| self.file.set_len(size))
                .map_err(|e| BlockError::io(&e, "Failed to resize"))?;
            self.size.store(size, Ordering::Release);
            Ok(())
        })
    }

    fn allocated_size(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }
}

/// O_DIRECT needs offset, length and memory aligned to this.
const DIRECT_ALIGN: usize = 4096;

/// A zeroed heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .expect("aligned layout of a bounded request size");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }
    fn len(&self) -> usize {
        self.len
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialized bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .expect("same layout as at allocation");
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

impl FileDriver {
    fn needs_bounce(&self, offset: u64, ptr: *const u8, len: usize) -> bool {
        let a = DIRECT_ALIGN as u64;
        self.direct
            && (!offset.is_multiple_of(a)
                || !(len as u64).is_multiple_of(a)
                || !(ptr as usize).is_multiple_of(DIRECT_ALIGN))
    }

    /// The aligned window covering [offset, offset+len) and a buffer for it.
    fn bounce_for(&self, offset: u64, len: usize) -> (u64, AlignedBuf) {
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        (start, AlignedBuf::new((end - start) as usize))
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64, what: &str) -> BlockResult<()> {
        // SAFETY: fallocate on our own descriptor.
        let r = blocking(|| unsafe {
            libc::fallocate(self.fd(), mode, offset as libc::off_t, len as libc::off_t)
        });
        if r < 0 {
            Err(BlockError::io(&last_err(), what))
        } else {
            Ok(())
        }
    }
}
