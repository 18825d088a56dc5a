//! The /dev/fuse session: the mount, and the loop that reads requests
//! and answers them.
//!
//! rsd speaks the kernel protocol itself rather than through the fuse3
//! crate: for a mount made as root that crate reads /dev/fuse in tokio's
//! blocking pool (a thread hop per request), and with the kernel's
//! default of 12 background requests the block layer never saw more
//! than 12 of fio's 32. Here the descriptor is non-blocking and
//! registered with the session thread's reactor: the loop reads every
//! request that is ready, runs each as a task of its own (so the node
//! sees the whole queue depth), and each task writes its reply with one
//! writev. INIT asks for up to `MAX_BACKGROUND` requests in flight.
use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use nix::libc;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::abi::{self, Header, InitReply, Op};
use super::fs::{Fs, Reply, WriteData};
use super::{MAX_READ, MAX_WRITE};

/// Requests the kernel lets be in flight at once (its default is 12).
const MAX_BACKGROUND: u16 = 128;
/// A write's data up to this size is copied out of the read buffer;
/// a larger one takes the buffer with it.
const COPY_WRITE: usize = 64 << 10;
/// Requests read before the loop lets the tasks run.
const BATCH: usize = 64;
/// Requests served at once; the kernel keeps the rest queued (on the
/// processes that made them). Each may hold a buffer of up to 1 MiB,
/// so this bounds the session's memory (docs/reliability.md): the
/// kernel's background limit alone does not, as each thread doing
/// direct or synchronous I/O adds a request of its own.
const MAX_IN_FLIGHT: usize = MAX_BACKGROUND as usize;

/// Opens /dev/fuse and mounts it on `mountpoint` as a regular file with
/// the options libfuse uses for QEMU: nosuid, nodev, default_permissions,
/// allow_other when asked, QEMU's max_read.
pub fn mount(mountpoint: &str, allow_other: bool) -> std::io::Result<File> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/fuse")?;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions",
        dev.as_raw_fd(),
        libc::S_IFREG,
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    if allow_other {
        data.push_str(",allow_other");
    }
    data.push_str(&format!(",max_read={MAX_READ}"));
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some("rsd"),
        mountpoint,
        Some("fuse"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )?;
    Ok(dev)
}

/// Writes one reply (a failed write means the request is gone:
/// interrupted, or the connection aborted).
fn send(dev: &File, unique: u64, reply: Reply, fs: &Fs) {
    let r = match reply {
        Reply::None => return,
        Reply::Err(e) => (&*dev).write(&abi::out_header(unique, -e, 0)),
        Reply::Ok(body) => {
            let h = abi::out_header(unique, 0, body.len());
            (&*dev).write_vectored(&[IoSlice::new(&h), IoSlice::new(&body)])
        }
        Reply::Data { buf, len } => {
            let h = abi::out_header(unique, 0, len);
            let r = (&*dev).write_vectored(&[IoSlice::new(&h), IoSlice::new(&buf[..len])]);
            fs.pool.give(buf);
            r
        }
    };
    if let Err(e) = r {
        tracing::debug!(unique, error = %e, "FUSE reply not taken");
    }
}

/// Answers INIT: protocol 7.31, the export's write size and background
/// limit. A kernel speaking another major version is refused.
fn init(dev: &File, unique: u64, op: Op) {
    let Op::Init {
        major,
        minor,
        max_readahead,
        flags,
    } = op
    else {
        return;
    };
    let r = if major != abi::KERNEL_MAJOR {
        (&*dev).write(&abi::out_header(unique, -libc::EPROTO, 0))
    } else {
        let body = abi::init_out(&InitReply {
            max_readahead,
            offered: flags,
            kernel_minor: minor,
            max_background: MAX_BACKGROUND,
            max_write: MAX_WRITE,
        });
        let h = abi::out_header(unique, 0, body.len());
        (&*dev).write_vectored(&[IoSlice::new(&h), IoSlice::new(&body)])
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "FUSE INIT reply not taken");
    }
}

/// Serves the mount until the kernel ends the connection (unmounted, or
/// aborted). Runs on the session's thread and runtime.
pub async fn run(dev: File, fs: Fs) -> std::io::Result<()> {
    // SAFETY: the File owns its descriptor, which stays open and the same
    // while the AsyncFd holds it.
    let dev = unsafe { AsyncFd::register_with_interest(dev, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    let dev = Arc::new(dev);
    let fs = Arc::new(fs);
    let mut buf = fs.pool.take();
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        // Wait for a free slot before reading a request.
        let mut slot = Some(
            slots
                .clone()
                .acquire_owned()
                .await
                .map_err(std::io::Error::other)?,
        );
        // ERROR too: a disconnected /dev/fuse polls as EPOLLERR only.
        let mut ready = dev.ready(Interest::READABLE | Interest::ERROR).await?;
        let mut drained = false;
        for _ in 0..BATCH {
            let Some(permit) = slot
                .take()
                .or_else(|| slots.clone().try_acquire_owned().ok())
            else {
                break;
            };
            let n = match ready.try_io(|d| d.get_ref().read(&mut buf)) {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => match e.raw_os_error() {
                    // The connection is gone: the session ends.
                    Some(libc::ENODEV) => return Ok(()),
                    // A request interrupted before it was read.
                    Some(libc::ENOENT) | Some(libc::EINTR) => {
                        slot = Some(permit);
                        continue;
                    }
                    _ => return Err(e),
                },
                // Nothing more for now: the tasks run while the loop
                // waits for the reactor.
                Err(_) => {
                    drained = true;
                    break;
                }
            };
            if !dispatch(&dev, &fs, &mut buf, n, permit) {
                return Ok(());
            }
        }
        if !drained {
            // A full batch (or every slot busy): let the tasks run
            // before reading more.
            tokio::task::yield_now().await;
        }
    }
}

/// Decodes one request of `n` bytes in `buf` and answers it, inline for
/// INIT and the malformed, in a task of its own otherwise. False when the
/// kernel ends the session (DESTROY).
fn dispatch(
    dev: &Arc<AsyncFd<File>>,
    fs: &Arc<Fs>,
    buf: &mut Vec<u8>,
    n: usize,
    slot: OwnedSemaphorePermit,
) -> bool {
    let req = &buf[..n];
    let Some(h) = Header::parse(req) else {
        // Not even a header: nothing to answer to.
        tracing::debug!(n, "FUSE request shorter than its header");
        return true;
    };
    let op = match abi::decode(&h, req) {
        Ok(op) => op,
        Err(e) => {
            send(dev.get_ref(), h.unique, Reply::Err(e), fs);
            return true;
        }
    };
    let data = match op {
        Op::Init { .. } => {
            init(dev.get_ref(), h.unique, op);
            return true;
        }
        Op::Destroy => return false,
        Op::NoReply => return true,
        Op::Write { len, at, .. } if len <= COPY_WRITE => Some(WriteData {
            buf: buf[at..at + len].to_vec(),
            at: 0,
            len,
        }),
        // A large write takes the buffer; the loop reads on into another.
        Op::Write { len, at, .. } => Some(WriteData {
            buf: std::mem::replace(buf, fs.pool.take()),
            at,
            len,
        }),
        _ => None,
    };
    let (dev, fs) = (dev.clone(), fs.clone());
    tokio::spawn(async move {
        let reply = fs.serve(op, data).await;
        send(dev.get_ref(), h.unique, reply, &fs);
        drop(slot);
    });
    true
}
