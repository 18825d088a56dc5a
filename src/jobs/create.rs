//! blockdev-create: the `create` job. The file driver creates and sizes
//! (and preallocates) a host file; qcow2 formats an existing node (see
//! block/qcow2/create.rs). Each splits into the part QEMU runs before the
//! command replies and the rest, so errors come in QSD's order.
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{JobFuture, Shared, Start, CANCELED};

fn s<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

fn os_msg(e: &std::io::Error) -> String {
    crate::util::os_msg(e)
}

pub use crate::block::progress::Targets;

/// The job's work for validated BlockdevCreateOptions.
pub fn start(opts: Map<String, Value>, targets: Targets) -> Start {
    Box::new(move |sh: Arc<Shared>| {
        Box::pin(async move {
            sh.set_progress(0, 1);
            let first = match s(&opts, "driver").unwrap_or_default() {
                "file" => create_file(sh.clone(), opts).await,
                "qcow2" => {
                    let sh2 = sh.clone();
                    let rest: JobFuture = Box::pin(async move {
                        crate::block::qcow2::create::create(sh2.as_ref(), &opts, targets).await
                    });
                    Ok(rest)
                }
                "luks" => crate::block::luks::create::check(&opts).map(|()| {
                    let rest: JobFuture = Box::pin(async move {
                        crate::block::luks::create::create(&opts, targets).await
                    });
                    rest
                }),
                other => {
                    // After the first yield in QEMU: an error of the job.
                    let msg = match &targets.file {
                        Err(e) => e.clone(),
                        Ok(_) => format!("rsd cannot create '{other}' images yet"),
                    };
                    let rest: JobFuture = Box::pin(async move { Err(msg) });
                    Ok(rest)
                }
            };
            // Done, failed or not, QEMU reports the whole work as done (1
            // of 1); only a full preallocation counts bytes while it runs.
            match first {
                Err(e) => {
                    sh.set_progress(1, 1);
                    Err(e)
                }
                Ok(rest) => {
                    let rest: JobFuture = Box::pin(async move {
                        let r = rest.await;
                        sh.set_progress(1, 1);
                        r
                    });
                    Ok(rest)
                }
            }
        })
    })
}

/// Runs blocking file work off the runtime's threads.
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("internal error: {e}"))
}

async fn create_file(sh: Arc<Shared>, opts: Map<String, Value>) -> Result<JobFuture, String> {
    let filename = s(&opts, "filename").unwrap_or_default().to_string();
    let size = opts.get("size").and_then(Value::as_i64).unwrap_or(0);
    let prealloc = s(&opts, "preallocation").unwrap_or("off").to_string();
    let nocow = opts.get("nocow").and_then(Value::as_bool).unwrap_or(false);
    let name = filename.clone();
    // Before the reply, as QEMU opens the file synchronously.
    let file = blocking(move || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&name)
    })
    .await?
    .map_err(|e| format!("Could not create '{filename}': {}", os_msg(&e)))?;
    if nocow {
        set_nocow(&file);
    }
    let rest: JobFuture = Box::pin(async move { size_file(&sh, file, size, &prealloc).await });
    Ok(rest)
}

/// chattr +C where the filesystem has it (btrfs); ignored elsewhere, as
/// in QEMU.
fn set_nocow(file: &std::fs::File) {
    const FS_IOC_GETFLAGS: nix::libc::c_ulong = 0x8008_6601;
    const FS_IOC_SETFLAGS: nix::libc::c_ulong = 0x4008_6602;
    const FS_NOCOW_FL: nix::libc::c_int = 0x0080_0000;
    let mut flags: nix::libc::c_int = 0;
    // SAFETY: both ioctls take a pointer to an int that lives across the call.
    unsafe {
        if nix::libc::ioctl(file.as_raw_fd(), FS_IOC_GETFLAGS, &mut flags) == 0 {
            flags |= FS_NOCOW_FL;
            nix::libc::ioctl(file.as_raw_fd(), FS_IOC_SETFLAGS, &flags);
        }
    }
}

/// Sizes the new file: empty it, then grow it to `size` with the
/// preallocation asked for. A full preallocation reports progress in
/// bytes and stops early when the job is cancelled.
async fn size_file(
    sh: &Arc<Shared>,
    file: std::fs::File,
    size: i64,
    prealloc: &str,
) -> Result<(), String> {
    if !matches!(prealloc, "off" | "falloc" | "full") {
        return Err(format!("Unsupported preallocation mode: {prealloc}"));
    }
    let file = Arc::new(file);
    let f = file.clone();
    blocking(move || f.set_len(0))
        .await?
        .map_err(|e| format!("Could not resize file: {}", os_msg(&e)))?;
    if size < 0 {
        return Err(format!(
            "Could not resize file: {}",
            os_msg(&std::io::Error::from_raw_os_error(nix::libc::EINVAL))
        ));
    }
    let size = size as u64;
    match prealloc {
        "falloc" => {
            let f = file.clone();
            blocking(move || {
                // SAFETY: a valid fd for the duration of the call.
                let r = unsafe {
                    nix::libc::posix_fallocate(f.as_raw_fd(), 0, size as nix::libc::off_t)
                };
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::from_raw_os_error(r))
                }
            })
            .await?
            .map_err(|e| format!("Could not preallocate new data: {}", os_msg(&e)))
        }
        "full" => {
            sh.set_progress(0, size);
            let zeros = Arc::new(vec![0u8; 1 << 20]);
            let mut done = 0u64;
            while done < size {
                sh.crash_point();
                if sh.cancelled() {
                    return Err(CANCELED.into());
                }
                let n = (size - done).min(zeros.len() as u64) as usize;
                let (f, z) = (file.clone(), zeros.clone());
                let at = done;
                blocking(move || std::os::unix::fs::FileExt::write_all_at(&*f, &z[..n], at))
                    .await?
                    .map_err(|e| {
                        format!("Could not write zeros for preallocation: {}", os_msg(&e))
                    })?;
                done += n as u64;
                sh.set_progress(done, size);
            }
            let f = file.clone();
            blocking(move || f.sync_data())
                .await?
                .map_err(|e| format!("Could not flush: {}", os_msg(&e)))
        }
        _ => {
            let f = file.clone();
            blocking(move || f.set_len(size))
                .await?
                .map_err(|e| format!("Could not resize file: {}", os_msg(&e)))
        }
    }
}
