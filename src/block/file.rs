//! The `file` and `host_device` protocol drivers: a regular file or a
//! block device, read and written in place.
//!
//! Buffered reads and writes first try the syscall with RWF_NOWAIT on the
//! calling task's thread: when the data is in the page cache (always on
//! tmpfs) the request completes with no thread hand-off. When the kernel
//! would block, and always with O_DIRECT (cache.direct=on), the request
//! goes to the calling thread's io_uring (src/block/uring.rs), or to
//! the I/O pool (src/block/iopool.rs) without io_uring or with
//! aio=threads. Either works on the caller's memory in place (O_DIRECT
//! requests that are not aligned go through an aligned copy); a request
//! dropped while the kernel or a pool thread still uses that memory
//! waits for it in its drop. bench/fileio, bench/disk.py and
//! bench/vhost.py measured this: see docs/benchmarks.md.
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::libc;

use serde_json::{Map, Value};

use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::drivers::{opt_str, OpenCtx, Opened};
use super::error::{BlockError, BlockResult};
use super::iopool::SendPtr;
use super::lock;
use super::perm::Perm;
use super::serial::Tracker;

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
    /// The `aio` option: how requests that have to wait are done.
    pub aio: Aio,
}

/// How the file driver does the requests that have to wait for the
/// device or the filesystem (page-cache hits and tmpfs are always
/// completed inline).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Aio {
    /// Not given: the pool, as `aio=threads` (QSD's default too).
    #[default]
    Auto,
    /// `aio=threads`: tokio's blocking pool.
    Threads,
    /// `aio=io_uring`: io_uring, or an error at open without it (QEMU).
    IoUring,
    /// `aio=native` (Linux AIO in QEMU): io_uring, or the pool without it.
    Native,
}

pub struct FileDriver {
    driver: &'static str,
    file: Arc<File>,
    /// On tmpfs or ramfs: I/O is a memory copy.
    memory_backed: bool,
    /// RWF_NOWAIT works for reads / writes here (each cleared at its
    /// first EOPNOTSUPP: filesystems support the two separately).
    nowait: [std::sync::atomic::AtomicBool; 2],
    size: AtomicU64,
    direct: bool,
    /// O_DIRECT requests in flight: an unaligned write is a
    /// read-modify-write of whole blocks and must not overlap others.
    serial: Tracker,
    /// Requests that have to wait go to this thread's io_uring
    /// (else to the blocking pool).
    uring: bool,
    read_only: std::sync::atomic::AtomicBool,
    block_device: bool,
    locking: bool,
    /// As given: QEMU names it in the hint of a lock conflict.
    filename: String,
    /// The perm/shared pair the lock bytes currently express.
    held: Mutex<(Perm, Perm)>,
    /// Cleared for good once the file is seen holding data, so reads of
    /// a written file never pay for an fstat in `known_zero`.
    maybe_empty: std::sync::atomic::AtomicBool,
}

fn os_err(e: &std::io::Error) -> String {
    crate::util::os_msg(e)
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
        let memory_backed = nix::sys::statfs::fstatfs(&file)
            .map(|st| {
                let t = st.filesystem_type();
                t == nix::sys::statfs::TMPFS_MAGIC
                    || t == nix::sys::statfs::FsType(0x8584_58f6_i64 as _) // ramfs
            })
            .unwrap_or(false);
        // Unset means threads, as in QSD: a ring keeps the file open in
        // the kernel for a moment after the process is killed, which
        // holds its image locks beyond the process (difference 38).
        let uring = match (o.aio, super::uring::probe()) {
            (Aio::Threads | Aio::Auto, _) => false,
            (_, Ok(())) => true,
            (Aio::IoUring, Err(why)) => {
                return Err(format!(
                    "Unable to use io_uring: failed to init linux io_uring ring: {why}"
                ))
            }
            (_, Err(why)) => {
                super::uring::warn_unavailable(why);
                false
            }
        };
        let d = FileDriver {
            uring,
            filename: o.filename.clone(),
            maybe_empty: std::sync::atomic::AtomicBool::new(true),
            driver,
            memory_backed,
            nowait: [
                std::sync::atomic::AtomicBool::new(true),
                std::sync::atomic::AtomicBool::new(true),
            ],
            file: Arc::new(file),
            size: AtomicU64::new(size),
            direct: o.direct,
            serial: Tracker::default(),
            read_only: std::sync::atomic::AtomicBool::new(read_only),
            block_device,
            locking: o.locking,
            held: Mutex::new((Perm::NONE, Perm::ALL)),
        };
        Ok(d)
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed)
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
            // The second line is a hint: printed on the command line,
            // left out of QMP errors (as QEMU's error_append_hint).
            return Err(format!(
                "{e}\nIs another process using the image [{}]?",
                self.filename
            ));
        }
        lock::apply(self.fd(), perm, shared)?;
        *held = (perm, shared);
        Ok(())
    }
}

fn open_error(path: &str, e: &std::io::Error) -> String {
    format!("Could not open '{path}': {}", os_err(e))
}

/// Runs blocking work (flush, fallocate, resize) on the I/O pool.
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> std::io::Result<R> {
    super::iopool::run(f).await
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

/// Outcome of the non-blocking attempt.
enum Nowait {
    /// All of it done.
    Done,
    /// This many bytes done; the kernel would block for the rest.
    Partial(usize),
    /// This many bytes done; the filesystem does not support RWF_NOWAIT.
    Unsupported(usize),
}

/// Reads or writes `len` bytes at `buf` (only written through for reads),
/// with RWF_NOWAIT when `nowait`: then it stops where the kernel would
/// block. Reads past the end of the file fill with zeroes.
fn rw_loop(
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    off: u64,
    write: bool,
    extra: i32,
    nowait: bool,
) -> std::io::Result<Nowait> {
    let flags = extra | if nowait { libc::RWF_NOWAIT } else { 0 };
    let mut done = 0usize;
    while done < len {
        // SAFETY: done < len keeps the pointer inside the caller's buffer.
        let p = unsafe { buf.add(done) };
        match rw_once(fd, p, len - done, off + done as u64, write, flags) {
            Ok(0) if !write => {
                // SAFETY: [done, len) is inside the (read) buffer.
                unsafe { std::ptr::write_bytes(p, 0, len - done) };
                return Ok(Nowait::Done);
            }
            Ok(0) => return Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
            Ok(n) => done += n,
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) if nowait => return Ok(Nowait::Partial(done)),
                Some(libc::EOPNOTSUPP) if nowait => return Ok(Nowait::Unsupported(done)),
                Some(libc::EINTR) => {}
                _ => return Err(e),
            },
        }
    }
    Ok(Nowait::Done)
}

/// Reads or writes all of `len` bytes, blocking.
fn rw_sync(
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    off: u64,
    write: bool,
    extra: i32,
) -> std::io::Result<()> {
    rw_loop(fd, buf, len, off, write, extra, false).map(|_| ())
}

/// The caller's buffer: filled by reads, only read by writes.
enum IoBuf<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl FileDriver {
    /// Reads or writes at `offset`: inline when the page cache allows,
    /// else on this thread's io_uring or the I/O pool, in the caller's
    /// memory (through an aligned bounce buffer only for O_DIRECT
    /// requests that are not aligned).
    async fn rw(&self, offset: u64, mut io: IoBuf<'_>, extra: i32) -> std::io::Result<()> {
        let (ptr, total, write) = match &mut io {
            IoBuf::Read(b) => (b.as_mut_ptr(), b.len(), false),
            // pwritev2 only reads through this pointer.
            IoBuf::Write(b) => (b.as_ptr() as *mut u8, b.len(), true),
        };
        let mut done = 0;
        // A large read this thread lets go (see `copy_large_reads_elsewhere`)
        // skips the inline paths.
        let inline = write || total < PARALLEL_READ || !LARGE_READS_ELSEWHERE.with(|c| c.get());
        if !self.direct && self.memory_backed && inline {
            // tmpfs/ramfs: the data is in memory, the call never waits
            // for a device, and these filesystems refuse RWF_NOWAIT.
            return rw_sync(self.fd(), ptr, total, offset, write, extra);
        }
        let nowait = &self.nowait[write as usize];
        if !self.direct && inline && nowait.load(Ordering::Relaxed) {
            match rw_loop(self.fd(), ptr, total, offset, write, extra, true)? {
                Nowait::Done => return Ok(()),
                Nowait::Partial(n) => done = n,
                Nowait::Unsupported(n) => {
                    nowait.store(false, Ordering::Relaxed);
                    done = n;
                }
            }
        }
        let off = offset + done as u64;
        let len = total - done;
        // SAFETY: done <= total keeps the pointer inside the buffer.
        let at = SendPtr(unsafe { ptr.add(done) });
        if !self.direct {
            // SAFETY: the caller's buffer is borrowed for this whole call.
            return unsafe { self.io_in_place(at, len, off, write, extra) }.await;
        }
        // O_DIRECT needs aligned offsets, lengths and memory.
        let a = DIRECT_ALIGN as u64;
        let start = off / a * a;
        let end = (off + len as u64).div_ceil(a) * a;
        let aligned = start == off && end == off + len as u64;
        let rmw = write && !aligned;
        let _tracked = self.serial.enter(start, end, rmw).await;
        if aligned && (at.get() as usize).is_multiple_of(DIRECT_ALIGN) {
            // SAFETY: as above.
            return unsafe { self.io_in_place(at, len, off, write, extra) }.await;
        }
        // Through an aligned copy of the window around the request.
        #[cfg(test)]
        BOUNCES.with(|c| c.set(c.get() + 1));
        let mut bounce = AlignedBuf::take((end - start) as usize);
        let skip = (off - start) as usize;
        if write {
            if rmw {
                // Read-modify-write of the partial blocks at the edges.
                // SAFETY: `bounce` lives until after the call.
                unsafe { self.io_in_place(SendPtr(bounce.ptr()), bounce.len(), start, false, 0) }
                    .await?;
            }
            if let IoBuf::Write(b) = &io {
                bounce.as_mut_slice()[skip..skip + len].copy_from_slice(&b[done..]);
            }
        }
        // SAFETY: as above.
        unsafe { self.io_in_place(SendPtr(bounce.ptr()), bounce.len(), start, write, extra) }
            .await?;
        if let IoBuf::Read(b) = io {
            b[done..].copy_from_slice(&bounce.as_slice()[skip..skip + len]);
        }
        bounce.give();
        if write && end > off + len as u64 {
            // The aligned write may have extended the file past the data.
            let want = self.size.load(Ordering::Acquire).max(off + len as u64);
            let f = self.file.clone();
            blocking(move || f.set_len(want)).await??;
        }
        Ok(())
    }

    /// This thread's io_uring, when this file uses io_uring.
    fn ring(&self) -> Option<Arc<super::uring::Ring>> {
        if self.uring {
            super::uring::local()
        } else {
            None
        }
    }

    /// Reads or writes all of `len` bytes at `ptr` at `off`, on this
    /// thread's io_uring or else on the I/O pool. Reads past the end of
    /// the file fill with zeroes.
    ///
    /// # Safety
    /// The memory must stay valid (and, for a read, not be used
    /// otherwise) while the returned future lives, and the future must
    /// not be leaked: dropped early, it waits until the kernel is done
    /// with the memory.
    async unsafe fn io_in_place(
        &self,
        ptr: SendPtr,
        len: usize,
        off: u64,
        write: bool,
        extra: i32,
    ) -> std::io::Result<()> {
        let mut done = 0usize;
        if let Some(ring) = self.ring() {
            while done < len {
                // SAFETY: done < len keeps the pointer inside the memory,
                // which the caller keeps as long as this future.
                let p = unsafe { ptr.get().add(done) };
                let Some(op) = (unsafe {
                    ring.rw(&self.file, p, len - done, off + done as u64, write, extra)
                }) else {
                    // The ring is full: the rest goes to the pool.
                    break;
                };
                match op.await {
                    0 if write => return Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
                    0 => {
                        // SAFETY: [done, len) is inside the (read) memory.
                        unsafe { std::ptr::write_bytes(ptr.get().add(done), 0, len - done) };
                        return Ok(());
                    }
                    n if n > 0 => done += n as usize,
                    e if e == -libc::EINTR || e == -libc::EAGAIN => {}
                    e => return Err(std::io::Error::from_raw_os_error(-e)),
                }
            }
            if done == len {
                return Ok(());
            }
        }
        let file = self.file.clone();
        // SAFETY: as above.
        let p = SendPtr(unsafe { ptr.get().add(done) });
        let (rest, at) = (len - done, off + done as u64);
        // SAFETY: the caller keeps the memory for this future's life, and
        // the `Job` lives inside it.
        unsafe {
            super::iopool::run_lending(move || {
                rw_sync(file.as_raw_fd(), p.get(), rest, at, write, extra)
            })
        }
        .await?
    }

    /// A request without data (fsync, fallocate) on this thread's
    /// io_uring, if it has one; None means do it another way.
    async fn on_ring(
        &self,
        submit: impl FnOnce(&Arc<super::uring::Ring>) -> Option<super::uring::Op>,
    ) -> Option<std::io::Result<()>> {
        let op = submit(&self.ring()?)?;
        let res = op.await;
        Some(if res < 0 {
            Err(std::io::Error::from_raw_os_error(-res))
        } else {
            Ok(())
        })
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64, what: &str) -> BlockResult<()> {
        // Tracked like a write, so a read-modify-write around it waits.
        let _tracked = if self.direct {
            Some(
                self.serial
                    .enter(offset, offset.saturating_add(len), false)
                    .await,
            )
        } else {
            None
        };
        if let Some(r) = self
            .on_ring(|ring| ring.fallocate(&self.file, mode, offset, len))
            .await
        {
            return r.map_err(|e| BlockError::io(&e, what));
        }
        let fd = self.fd();
        let file = self.file.clone();
        let r = blocking(move || {
            let _keep_open = file;
            // SAFETY: fallocate on a descriptor kept open by `_keep_open`.
            let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
            if r < 0 {
                Err(last_err())
            } else {
                Ok(())
            }
        })
        .await;
        r.and_then(|r| r).map_err(|e| BlockError::io(&e, what))
    }
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

    /// Reopens the file for reading only, or for writing too, in place:
    /// a new descriptor with the new access mode takes the lock bytes the
    /// old one holds and then replaces it under the same number (dup3),
    /// so requests in flight and every holder of the descriptor go on
    /// without a gap in the locks.
    fn set_read_only(&self, read_only: bool) -> Result<(), String> {
        if read_only == self.is_read_only() {
            return Ok(());
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!read_only);
        let mut flags = libc::O_CLOEXEC;
        if self.direct {
            flags |= libc::O_DIRECT;
        }
        oo.custom_flags(flags);
        let new = oo
            .open(&self.filename)
            .map_err(|e| open_error(&self.filename, &e))?;
        if self.locking {
            let held = *self
                .held
                .lock()
                .map_err(|_| "lock state poisoned".to_string())?;
            lock::apply(new.as_raw_fd(), held.0, held.1)?;
        }
        // SAFETY: dup3 on two descriptors this driver owns; the old
        // number keeps being valid (it now names the new description).
        let r = unsafe { libc::dup3(new.as_raw_fd(), self.fd(), libc::O_CLOEXEC) };
        if r < 0 {
            return Err(open_error(&self.filename, &last_err()));
        }
        self.read_only.store(read_only, Ordering::Relaxed);
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            request_alignment: if self.direct { DIRECT_ALIGN as u32 } else { 1 },
            ..Limits::default()
        }
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.rw(offset, IoBuf::Read(buf), 0)
                .await
                .map_err(|e| BlockError::io(&e, "read"))
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.is_read_only() {
                return Err(BlockError::perm("read-only file"));
            }
            let extra = if flags.fua { libc::RWF_DSYNC } else { 0 };
            self.rw(offset, IoBuf::Write(buf), extra)
                .await
                .map_err(|e| BlockError::io(&e, "write"))?;
            self.size
                .fetch_max(offset + buf.len() as u64, Ordering::AcqRel);
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.memory_backed {
                // Nothing to write back on tmpfs or ramfs: no thread hop.
                return self
                    .file
                    .sync_data()
                    .map_err(|e| BlockError::io(&e, "flush"));
            }
            if let Some(r) = self.on_ring(|ring| ring.fsync(&self.file, true)).await {
                return r.map_err(|e| BlockError::io(&e, "flush"));
            }
            let f = self.file.clone();
            blocking(move || f.sync_data())
                .await
                .and_then(|r| r)
                .map_err(|e| BlockError::io(&e, "flush"))
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.block_device {
                let file = self.file.clone();
                let r = blocking(move || {
                    let range = [offset, len];
                    // SAFETY: BLKDISCARD reads two u64 from the pointer.
                    let r = unsafe { libc::ioctl(file.as_raw_fd(), 0x1277, range.as_ptr()) };
                    if r < 0 {
                        Err(last_err())
                    } else {
                        Ok(())
                    }
                })
                .await;
                return r.and_then(|r| r).map_err(|e| BlockError::io(&e, "discard"));
            }
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
                "discard",
            )
            .await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.is_read_only() {
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
                .await
            } else {
                Err(BlockError::unsupported("no unmap"))
            };
            if result.is_err() && !self.block_device {
                result = self
                    .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len, "write zeroes")
                    .await;
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
                depth: 1,
            };
            if self.block_device {
                return Ok(data(true, len));
            }
            // lseek(SEEK_DATA/SEEK_HOLE) does not block on the data itself.
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
            let f = self.file.clone();
            blocking(move || f.set_len(size))
                .await
                .and_then(|r| r)
                .map_err(|e| BlockError::io(&e, "Failed to resize"))?;
            self.size.store(size, Ordering::Release);
            Ok(())
        })
    }

    /// Another process may have grown or shrunk the file while the node
    /// was inactive.
    fn invalidate_cache(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if !self.block_device {
                let meta = self
                    .file
                    .metadata()
                    .map_err(|e| BlockError::io(&e, "Could not stat the file"))?;
                self.size.store(meta.len(), Ordering::Release);
            }
            Ok(())
        })
    }

    fn allocated_size(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    /// Only the cheap case: a file with nothing allocated reads as zeroes.
    fn grows_on_write(&self) -> bool {
        !self.block_device
    }

    fn known_zero(&self, _offset: u64, _len: u64) -> bool {
        if self.block_device || !self.maybe_empty.load(Ordering::Relaxed) {
            return false;
        }
        let empty = self.allocated_size() == Some(0);
        if !empty {
            self.maybe_empty.store(false, Ordering::Relaxed);
        }
        empty
    }
}

#[cfg(test)]
thread_local! {
    /// Requests this thread sent through a bounce buffer (for tests).
    pub static BOUNCES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Reads this large may leave a thread that lets them go, even when they
/// would not wait (tmpfs, a page-cache hit): copying them is the work.
const PARALLEL_READ: usize = 256 << 10;

thread_local! {
    static LARGE_READS_ELSEWHERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// From now on, large reads made on this thread are done on the I/O
/// pool even when they would be memory copies, so several run on several
/// cores where inline they would take turns on this one. For a front
/// end whose threads hand the data straight to its client (vhost-user
/// guest memory); NBD and FUSE send the data on from the thread that
/// read it, and a copy made on another core costs them more than it
/// gains (docs/benchmarks.md).
pub fn copy_large_reads_elsewhere() {
    LARGE_READS_ELSEWHERE.with(|c| c.set(true));
}

/// O_DIRECT needs offset, length and memory aligned to this.
const DIRECT_ALIGN: usize = 4096;

/// A zeroed heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        // Request sizes are bounded by the protocol layers (32 MiB).
        std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .unwrap_or_else(|_| std::alloc::Layout::new::<[u8; DIRECT_ALIGN]>())
    }
    pub fn new(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf {
            ptr,
            len: len.min(layout.size()),
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The start of the memory (stable while the buffer lives, even
    /// when the value moves).
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialized bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Buffers of at least this size are kept for reuse on their thread:
/// a fresh one of 1 MiB costs page faults and zeroing.
const SPARE_MIN: usize = 64 << 10;
/// At most this many, of at most 4 MiB each, per thread.
const SPARE_COUNT: usize = 8;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<AlignedBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl AlignedBuf {
    /// A buffer of `len` bytes whose contents are left from an earlier
    /// use (large ones are reused on their thread), or zeroes.
    pub fn take(len: usize) -> AlignedBuf {
        if len >= SPARE_MIN {
            let spare = SPARE
                .try_with(|s| {
                    let mut s = s.borrow_mut();
                    let i = s.iter().position(|b| b.len == len)?;
                    Some(s.swap_remove(i))
                })
                .ok()
                .flatten();
            if let Some(b) = spare {
                return b;
            }
        }
        AlignedBuf::new(len)
    }

    /// Gives a buffer back for `take` to reuse.
    pub fn give(self) {
        if self.len < SPARE_MIN || self.len > 4 << 20 {
            return;
        }
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() >= SPARE_COUNT {
                // Keep the most recent sizes.
                s.remove(0);
            }
            s.push(self);
        });
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, Self::layout(self.len)) };
    }
}

impl FileOptions {
    /// The file driver's options from validated BlockdevOptionsFile.
    fn parse(ctx: &OpenCtx<'_>, opts: &Map<String, Value>) -> Result<FileOptions, String> {
        if opt_str(opts, "aio") == Some("native") && !ctx.common.cache_direct {
            return Err("aio=native was specified, but it requires cache.direct=on, which was not specified.".into());
        }
        Ok(FileOptions {
            filename: opt_str(opts, "filename").unwrap_or_default().to_string(),
            read_only: ctx.common.read_only,
            auto_read_only: ctx.common.auto_read_only,
            direct: ctx.common.cache_direct,
            locking: opt_str(opts, "locking") != Some("off"),
            driver: ctx.driver.clone(),
            aio: match opt_str(opts, "aio") {
                Some("threads") => Aio::Threads,
                Some("io_uring") => Aio::IoUring,
                Some("native") => Aio::Native,
                _ => Aio::Auto,
            },
        })
    }
}

/// The registry's open function for file, host_device and host_cdrom.
pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    let fo = FileOptions::parse(ctx, opts)?;
    let d = FileDriver::open(&fo)?;
    // auto-read-only may have fallen back to read-only.
    ctx.common.read_only = d.is_read_only();
    Ok(Opened {
        driver: Box::new(d),
        json: serde_json::json!({"driver": ctx.driver, "filename": fo.filename}),
        plain: Some(fo.filename),
        children: Vec::new(),
    })
}
