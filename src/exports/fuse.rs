//! The FUSE export: the node appears as one regular file, mounted over a
//! regular file (often the image file itself), as QSD does it.
//!
//! The mount's root inode is the file. Reads and writes go to the node
//! through the export's edge; a write past the end fails unless the
//! export is growable (one crossing the end is cut short); truncate
//! resizes the node through its actor; fallocate allocates at the end,
//! punches holes and zeroes ranges; SEEK_DATA/SEEK_HOLE come from block
//! status. The mount goes on block-export-del, quit and the stop signals
//! (lazily, as QEMU's unmount: open files keep working until closed).
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fuse3::raw::prelude::*;
use fuse3::{MountOptions, Result as FuseResult, SetAttr, Timestamp};
use nix::libc;

use super::{BlockExport, BoxFuture};
use crate::block::actor::NodeMsg;
use crate::block::child::Child;
use crate::block::driver::{WriteFlags, ZeroFlags};
use crate::block::error::BlockError;

/// QEMU's limit on one read (FUSE_MAX_BOUNCE_BYTES): 64 MiB.
const MAX_READ: u32 = 64 << 20;
/// One write: QEMU takes up to BDRV_REQUEST_MAX_BYTES; the kernel asks
/// for at most this much.
const MAX_WRITE: u32 = 1 << 20;

/// What block-export-add decided for a FUSE export.
pub struct FuseConfig {
    pub id: String,
    pub mountpoint: String,
    pub writable: bool,
    pub growable: bool,
    /// None: auto (allow_other if the mount takes it).
    pub allow_other: Option<bool>,
    pub edge: Arc<Child>,
    pub user: u64,
}

/// The file's owner and mode, which chmod and chown change.
struct Attrs {
    mode: u32,
    uid: u32,
    gid: u32,
}

/// The filesystem the kernel talks to.
struct Fs {
    edge: Arc<Child>,
    writable: bool,
    growable: bool,
    allow_other: bool,
    attrs: Mutex<Attrs>,
}

pub struct FuseExport {
    id: String,
    pub mountpoint: String,
    edge: Arc<Child>,
    user: u64,
    cfg: Arc<FsShared>,
    /// Resolves when the session's thread ends (taken by `serve`).
    ended: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    closed: AtomicBool,
    unmounted: tokio::sync::Notify,
    gone: AtomicBool,
}

/// What a (re)mount needs to build the filesystem.
struct FsShared {
    edge: Arc<Child>,
    writable: bool,
    growable: bool,
    mode: u32,
}

impl FsShared {
    fn fs(&self, allow_other: bool) -> Fs {
        Fs {
            edge: self.edge.clone(),
            writable: self.writable,
            growable: self.growable,
            allow_other,
            attrs: Mutex::new(Attrs {
                mode: self.mode,
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
            }),
        }
    }
}

fn errno(e: BlockError) -> fuse3::Errno {
    fuse3::Errno::from(if e.errno > 0 { e.errno } else { libc::EIO })
}

fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::new(d.as_secs() as i64, d.subsec_nanos())
}

/// The mount options QSD uses: default_permissions, allow_other when
/// asked, and the root as a regular file (the fuse3 crate writes
/// `rootmode` in decimal and the kernel reads it in octal: 100000 is
/// S_IFREG).
fn options(allow_other: bool) -> MountOptions {
    let mut o = MountOptions::default();
    o.fs_name("rsd")
        .nonempty(true)
        .rootmode(100000)
        .default_permissions(true)
        .allow_other(allow_other)
        .custom_options(format!("max_read={MAX_READ}"));
    o
}

async fn mount(
    fs: Fs,
    mountpoint: &str,
    allow_other: bool,
) -> std::io::Result<fuse3::raw::MountHandle> {
    let h = Session::new(options(allow_other))
        .mount(fs, mountpoint)
        .await?;
    // nosuid and nodev, as libfuse mounts for QEMU (the crate has no
    // option for them): a bind remount changes only these flags.
    use nix::mount::MsFlags;
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if let Err(e) = nix::mount::mount(None::<&str>, mountpoint, None::<&str>, flags, None::<&str>) {
        tracing::debug!(mountpoint, error = %e, "FUSE mount keeps suid and dev");
    }
    Ok(h)
}

/// Mounts and serves the session on a thread of its own with a
/// single-threaded runtime, as each NBD client is served: a request's
/// task, its node I/O and its reply stay on that thread. `allow_other`
/// None is QEMU's auto (with it if the mount takes it). Returns whether
/// allow_other is on and a receiver that resolves when the session ends.
async fn start_session(
    cfg: Arc<FsShared>,
    mountpoint: String,
    allow_other: Option<bool>,
    id: &str,
) -> Result<(bool, tokio::sync::oneshot::Receiver<()>), String> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (end_tx, end_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("fuse/{id}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let tries: Vec<bool> = match allow_other {
                    None => vec![true, false],
                    Some(a) => vec![a],
                };
                for a in tries {
                    if let Ok(h) = mount(cfg.fs(a), &mountpoint, a).await {
                        let _ = ready_tx.send(Ok(a));
                        if let Err(e) = h.await {
                            tracing::debug!(mountpoint, error = %e, "FUSE session ended");
                        }
                        return;
                    }
                }
                let _ = ready_tx.send(Err("Failed to mount FUSE session to export".into()));
            });
            let _ = end_tx.send(());
        })
        .map_err(|e| format!("Failed to start the FUSE thread: {e}"))?;
    let allow = ready_rx
        .await
        .map_err(|_| "Failed to mount FUSE session to export".to_string())??;
    Ok((allow, end_rx))
}

impl FuseExport {
    /// Checks the mountpoint and mounts, as QEMU's fuse_export_create.
    pub async fn create(c: FuseConfig) -> Result<Arc<FuseExport>, String> {
        match std::fs::metadata(&c.mountpoint) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                // What a killed daemon leaves behind (differences entry 44).
                return Err(format!(
                    "Failed to stat '{mp}': {}; a FUSE export whose daemon died is still mounted there: 'umount -l {mp}' removes it",
                    crate::util::os_msg(&e),
                    mp = c.mountpoint,
                ));
            }
            Err(e) => {
                return Err(format!(
                    "Failed to stat '{}': {}",
                    c.mountpoint,
                    crate::util::os_msg(&e)
                ))
            }
            Ok(m) if !m.is_file() => {
                return Err(format!("'{}' is not a regular file", c.mountpoint))
            }
            Ok(_) => {}
        }
        let mode = libc::S_IFREG | libc::S_IRUSR | if c.writable { libc::S_IWUSR } else { 0 };
        let cfg = Arc::new(FsShared {
            edge: c.edge.clone(),
            writable: c.writable,
            growable: c.growable,
            mode,
        });
        let (_, ended) =
            start_session(cfg.clone(), c.mountpoint.clone(), c.allow_other, &c.id).await?;
        Ok(Arc::new(FuseExport {
            id: c.id,
            mountpoint: c.mountpoint,
            edge: c.edge,
            user: c.user,
            cfg,
            ended: Mutex::new(Some(ended)),
            closed: AtomicBool::new(false),
            unmounted: tokio::sync::Notify::new(),
            gone: AtomicBool::new(false),
        }))
    }

    /// Detaches the mount (MNT_DETACH, as QEMU's unmount), which ends the
    /// session.
    fn unmount(&self) {
        let _ = nix::mount::umount2(self.mountpoint.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

impl BlockExport for FuseExport {
    fn id(&self) -> &str {
        &self.id
    }
    fn kind(&self) -> &'static str {
        "fuse"
    }
    fn node(&self) -> &Arc<Child> {
        &self.edge
    }
    fn user(&self) -> u64 {
        self.user
    }
    fn clients(&self) -> usize {
        // The kernel is the one client; open files do not hold the export.
        0
    }
    fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.unmount();
        }
    }
    fn no_clients(&self, limit: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let ended = self.unmounted.notified();
            if !self.gone.load(Ordering::Acquire) {
                let _ = tokio::time::timeout(limit, ended).await;
            }
        })
    }
    fn serve(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let ended = self.ended.lock().ok().and_then(|mut m| m.take());
            let ended = match ended {
                Some(e) => Some(e),
                // A restart by the supervisor: the old session is gone;
                // mount again where it was.
                None if !self.closed.load(Ordering::Acquire) => {
                    self.unmount();
                    match start_session(self.cfg.clone(), self.mountpoint.clone(), None, &self.id)
                        .await
                    {
                        Ok((_, e)) => Some(e),
                        Err(e) => {
                            tracing::warn!(export = %self.id, error = %e, "FUSE remount failed");
                            None
                        }
                    }
                }
                None => None,
            };
            if let Some(e) = ended {
                let _ = e.await;
            }
            self.gone.store(true, Ordering::Release);
            self.unmounted.notify_waiters();
            if !self.closed.load(Ordering::Acquire) {
                // Unmounted from outside: the export stays until deleted.
                std::future::pending::<()>().await;
            }
        })
    }
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

impl Fs {
    async fn size(&self) -> FuseResult<u64> {
        let n = self
            .edge
            .enter()
            .await
            .ok_or(fuse3::Errno::from(libc::ENOMEDIUM))?;
        Ok(n.size())
    }

    fn attr(&self, size: u64, allocated: Option<u64>, blksize: u32) -> ReplyAttr {
        let (mode, uid, gid) = self
            .attrs
            .lock()
            .map(|a| (a.mode, a.uid, a.gid))
            .unwrap_or((libc::S_IFREG | libc::S_IRUSR, 0, 0));
        let blocks = match allocated {
            Some(a) if a > 0 => a.div_ceil(512),
            _ => size.div_ceil(512),
        };
        let t = now();
        ReplyAttr {
            ttl: Duration::from_secs(1),
            attr: FileAttr {
                ino: 1,
                size,
                blocks,
                atime: t,
                mtime: t,
                ctime: t,
                kind: FileType::RegularFile,
                perm: (mode & 0o7777) as u16,
                nlink: 1,
                uid,
                gid,
                rdev: 0,
                blksize,
            },
        }
    }

    async fn stat(&self) -> FuseResult<ReplyAttr> {
        let n = self
            .edge
            .enter()
            .await
            .ok_or(fuse3::Errno::from(libc::ENOMEDIUM))?;
        let blksize = n.limits().request_alignment.max(1) as u32;
        Ok(self.attr(n.size(), n.allocated_size(), blksize))
    }

    /// Resizes the node through its actor (resizes of a node run one at
    /// a time there).
    async fn resize(&self, size: u64) -> FuseResult<()> {
        let Some(name) = self.edge.get().map(|n| n.name.clone()) else {
            return Err(libc::ENOMEDIUM.into());
        };
        let actor: Option<ractor::ActorRef<NodeMsg>> =
            ractor::registry::where_is(crate::block::actor::registry_name(&name)).map(Into::into);
        let Some(a) = actor else {
            return Err(libc::EIO.into());
        };
        match ractor::call!(a, NodeMsg::Resize, size) {
            Ok(r) => r.map_err(errno),
            Err(_) => Err(libc::EIO.into()),
        }
    }

    async fn zero(&self, mut offset: u64, mut len: u64, flags: ZeroFlags) -> FuseResult<()> {
        let n = self
            .edge
            .enter()
            .await
            .ok_or(fuse3::Errno::from(libc::ENOMEDIUM))?;
        while len > 0 {
            let step = len.min(1 << 30);
            n.write_zeroes(offset, step, flags).await.map_err(|e| {
                if e.errno == libc::ENOTSUP {
                    fuse3::Errno::from(libc::EOPNOTSUPP)
                } else {
                    errno(e)
                }
            })?;
            offset += step;
            len -= step;
        }
        Ok(())
    }
}

impl Filesystem for Fs {
    async fn init(&self, _req: Request) -> FuseResult<ReplyInit> {
        Ok(ReplyInit::new(
            NonZeroU32::new(MAX_WRITE).unwrap_or(NonZeroU32::MIN),
        ))
    }

    async fn destroy(&self, _req: Request) {}

    async fn lookup(
        &self,
        _req: Request,
        _parent: u64,
        _name: &std::ffi::OsStr,
    ) -> FuseResult<ReplyEntry> {
        Err(libc::ENOENT.into())
    }

    async fn getattr(
        &self,
        _req: Request,
        _inode: u64,
        _fh: Option<u64>,
        _flags: u32,
    ) -> FuseResult<ReplyAttr> {
        self.stat().await
    }

    async fn setattr(
        &self,
        _req: Request,
        _inode: u64,
        _fh: Option<u64>,
        set: SetAttr,
    ) -> FuseResult<ReplyAttr> {
        // Only size, mode and (with allow_other) owner, as QEMU; the
        // kernel's own time updates are taken and ignored.
        if !self.allow_other && (set.uid.is_some() || set.gid.is_some()) {
            return Err(libc::ENOTSUP.into());
        }
        if let Some(mode) = set.mode {
            if !self.allow_other && mode & (libc::S_IRWXG | libc::S_IRWXO) != 0 {
                return Err(libc::EPERM.into());
            }
            if !self.writable && mode & (libc::S_IWUSR | libc::S_IWGRP | libc::S_IWOTH) != 0 {
                return Err(libc::EROFS.into());
            }
        }
        if let Some(size) = set.size {
            if !self.writable {
                return Err(libc::EACCES.into());
            }
            self.resize(size).await?;
        }
        if let Ok(mut a) = self.attrs.lock() {
            if let Some(mode) = set.mode {
                a.mode = (mode & 0o7777) | libc::S_IFREG;
            }
            if let Some(uid) = set.uid {
                a.uid = uid;
            }
            if let Some(gid) = set.gid {
                a.gid = gid;
            }
        }
        self.stat().await
    }

    async fn open(&self, _req: Request, _inode: u64, _flags: u32) -> FuseResult<ReplyOpen> {
        Ok(ReplyOpen { fh: 0, flags: 0 })
    }

    async fn read(
        &self,
        _req: Request,
        _inode: u64,
        _fh: u64,
        offset: u64,
        size: u32,
    ) -> FuseResult<ReplyData> {
        if size > MAX_READ {
            return Err(libc::EINVAL.into());
        }
        let n = self
            .edge
            .enter()
            .await
            .ok_or(fuse3::Errno::from(libc::ENOMEDIUM))?;
        // Short reads at the end, as a file gives them.
        let len = u64::from(size).min(n.size().saturating_sub(offset));
        let mut buf = vec![0u8; len as usize];
        if len > 0 {
            n.read(offset, &mut buf).await.map_err(errno)?;
        }
        Ok(ReplyData {
            data: Bytes::from(buf),
        })
    }

    async fn write(
        &self,
        _req: Request,
        _inode: u64,
        _fh: u64,
        offset: u64,
        data: &[u8],
        _write_flags: u32,
        _flags: u32,
    ) -> FuseResult<ReplyWrite> {
        if !self.writable {
            return Err(libc::EACCES.into());
        }
        let size = self.size().await?;
        let end = offset.saturating_add(data.len() as u64);
        let mut len = data.len() as u64;
        if end > size {
            if self.growable {
                self.resize(end).await?;
            } else {
                // Cut short at the end (nothing at all past it: EIO).
                len = size.saturating_sub(offset);
                if len == 0 {
                    return Err(libc::EIO.into());
                }
            }
        }
        let n = self
            .edge
            .enter()
            .await
            .ok_or(fuse3::Errno::from(libc::ENOMEDIUM))?;
        n.write(offset, &data[..len as usize], WriteFlags::default())
            .await
            .map_err(errno)?;
        Ok(ReplyWrite {
            written: len as u32,
        })
    }

    async fn statfs(&self, _req: Request, _inode: u64) -> FuseResult<ReplyStatFs> {
        // What libfuse answers for a filesystem without statfs.
        Ok(ReplyStatFs {
            blocks: 0,
            bfree: 0,
            bavail: 0,
            files: 0,
            ffree: 0,
            bsize: 512,
            namelen: 255,
            frsize: 0,
        })
    }

    async fn release(
        &self,
        _req: Request,
        _inode: u64,
        _fh: u64,
        _flags: u32,
        _lock_owner: u64,
        _flush: bool,
    ) -> FuseResult<()> {
        Ok(())
    }

    async fn fsync(&self, _req: Request, _inode: u64, _fh: u64, _datasync: bool) -> FuseResult<()> {
        let n = self
            .edge
            .enter()
            .await
            .ok_or(fuse3::Errno::from(libc::ENOMEDIUM))?;
        n.flush().await.map_err(errno)
    }

    async fn flush(&self, req: Request, inode: u64, fh: u64, _lock_owner: u64) -> FuseResult<()> {
        self.fsync(req, inode, fh, true).await
    }

    async fn fallocate(
        &self,
        _req: Request,
        _inode: u64,
        _fh: u64,
        offset: u64,
        length: u64,
        mode: u32,
    ) -> FuseResult<()> {
        if !self.writable {
            return Err(libc::EACCES.into());
        }
        let size = self.size().await?;
        let mode = mode as i32;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let length = if keep {
            length.min(size.saturating_sub(offset))
        } else {
            length
        };
        if mode == 0 {
            // Only at the end, by growing the node.
            if offset < size {
                return Err(libc::EOPNOTSUPP.into());
            }
            return self.resize(offset.saturating_add(length)).await;
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            if !keep {
                return Err(libc::EINVAL.into());
            }
            let flags = ZeroFlags {
                fua: false,
                may_unmap: true,
                no_fallback: true,
            };
            return self.zero(offset, length, flags).await;
        }
        if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            let end = offset.saturating_add(length);
            if !keep && end > size {
                self.resize(end).await?;
            }
            return self.zero(offset, length, ZeroFlags::default()).await;
        }
        Err(libc::EOPNOTSUPP.into())
    }

    async fn lseek(
        &self,
        _req: Request,
        _inode: u64,
        _fh: u64,
        offset: u64,
        whence: u32,
    ) -> FuseResult<ReplyLSeek> {
        let whence = whence as i32;
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Err(libc::EINVAL.into());
        }
        let n = self
            .edge
            .enter()
            .await
            .ok_or(fuse3::Errno::from(libc::ENOMEDIUM))?;
        let size = n.size();
        let mut at = offset;
        loop {
            if at >= size {
                // The end is a hole; there is no data past it.
                return if at > size || whence == libc::SEEK_DATA {
                    Err(libc::ENXIO.into())
                } else {
                    Ok(ReplyLSeek { offset: at })
                };
            }
            let e = n.block_status(at, size - at).await.map_err(errno)?;
            let data = e.data;
            if data == (whence == libc::SEEK_DATA) {
                return Ok(ReplyLSeek { offset: at });
            }
            at += e.len.max(1);
        }
    }
}
