//! The FUSE export: the node appears as one regular file, mounted over a
//! regular file (often the image file itself), as QSD does it.
//!
//! `session.rs` mounts and speaks the kernel protocol (`abi.rs`) on a
//! thread of its own; `fs.rs` answers the file operations. The mount
//! goes on block-export-del, quit and the stop signals (lazily, as
//! QEMU's unmount: open files keep working until closed).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::libc;

use super::{BlockExport, BoxFuture};
use crate::block::child::Child;
use crate::exports::stats::ExportStats;
use crate::iothread::Placement;

mod abi;
mod fs;
mod pool;
mod session;

use fs::{Attrs, Fs};
use pool::Pool;

/// QEMU's limit on one read (FUSE_MAX_BOUNCE_BYTES): 64 MiB.
const MAX_READ: u32 = 64 << 20;
/// One write: QEMU takes up to BDRV_REQUEST_MAX_BYTES; the kernel asks
/// for at most this much.
const MAX_WRITE: u32 = 1 << 20;
/// A request buffer: the largest write with its headers, with room to spare.
const REQUEST_BUF: usize = MAX_WRITE as usize + 4096;
/// Request buffers kept for reuse (a queue of large writes or reads).
const KEEP_BUFS: usize = 16;

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
    pub placement: Arc<Placement>,
}

pub struct FuseExport {
    id: String,
    pub mountpoint: String,
    edge: Arc<Child>,
    user: u64,
    /// A session (re)mounted on an iothread runs there.
    placement: Arc<Placement>,
    cfg: Arc<FsShared>,
    /// Turns true when the session ends. The session outlives the
    /// export's actor: a restarted actor watches the same one.
    ended: tokio::sync::watch::Receiver<bool>,
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
    stats: Arc<ExportStats>,
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
            pool: Arc::new(Pool::new(REQUEST_BUF, KEEP_BUFS)),
            stats: self.stats.clone(),
        }
    }
}

/// Mounts and serves the session on the export's iothread, or on a
/// thread of its own with a single-threaded runtime, as each NBD client
/// is served: a request's task, its node I/O and its reply stay on that
/// thread. `allow_other` None is QEMU's auto (with it if the mount takes
/// it). Returns whether allow_other is on and a receiver that turns true
/// when the session ends.
async fn start_session(
    cfg: Arc<FsShared>,
    mountpoint: String,
    allow_other: Option<bool>,
    id: &str,
    placement: &Placement,
) -> Result<(bool, tokio::sync::watch::Receiver<bool>), String> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<bool, String>>();
    let (end_tx, end_rx) = tokio::sync::watch::channel(false);
    let session = async move {
        let tries: Vec<bool> = match allow_other {
            None => vec![true, false],
            Some(a) => vec![a],
        };
        for a in tries {
            if let Ok(dev) = session::mount(&mountpoint, a) {
                let _ = ready_tx.send(Ok(a));
                // The kernel is the export's one client while mounted.
                let _counted = cfg.stats.connect();
                // An unmount ends the session cleanly; anything
                // else leaves the file unserved, which the
                // operator must hear about.
                if let Err(e) = session::run(dev, cfg.fs(a)).await {
                    eprintln!("rsd: FUSE export on {mountpoint}: the session failed: {e}");
                }
                let _ = end_tx.send(true);
                return;
            }
        }
        let _ = ready_tx.send(Err("Failed to mount FUSE session to export".into()));
        let _ = end_tx.send(true);
    };
    if let Some(io) = placement.current() {
        if !io.spawn_with(move || session) {
            return Err(format!("iothread {} has stopped", io.id));
        }
    } else {
        let name = format!("fuse/{id}");
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                // Without a runtime the session is dropped, and so is
                // its ready sender: the mount is reported failed.
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(session),
                    Err(e) => eprintln!("rsd: {name}: no runtime: {e}"),
                }
            })
            .map_err(|e| format!("Failed to start the FUSE thread: {e}"))?;
    }
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
            stats: Default::default(),
        });
        let (_, ended) = start_session(
            cfg.clone(),
            c.mountpoint.clone(),
            c.allow_other,
            &c.id,
            &c.placement,
        )
        .await?;
        Ok(Arc::new(FuseExport {
            id: c.id,
            mountpoint: c.mountpoint,
            edge: c.edge,
            user: c.user,
            placement: c.placement,
            cfg,
            ended,
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
    fn placement(&self) -> &Arc<Placement> {
        &self.placement
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
    /// Waits for the session's end. A restarted actor finds the same
    /// session still serving (it runs on a thread of its own) and
    /// watches it: mounting again would leave the file below the
    /// mountpoint in view for a moment and split open files across two
    /// sessions.
    fn serve(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut ended = self.ended.clone();
            // An error: the session's sender is gone, so is the session.
            let _ = ended.wait_for(|e| *e).await;
            self.gone.store(true, Ordering::Release);
            self.unmounted.notify_waiters();
            if !self.closed.load(Ordering::Acquire) {
                // Unmounted from outside: the export stays until deleted.
                std::future::pending::<()>().await;
            }
        })
    }
    fn stats(&self) -> &Arc<ExportStats> {
        &self.cfg.stats
    }
    /// Serving while mounted.
    fn serving(&self) -> bool {
        !self.gone.load(Ordering::Acquire) && !self.closed.load(Ordering::Acquire)
    }
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}
