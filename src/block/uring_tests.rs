//! Tests of the io_uring engine: the file driver's requests through it,
//! O_DIRECT, and requests dropped while the kernel holds their buffers.
use std::fs::File;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::libc;

use super::driver::{Driver, WriteFlags, ZeroFlags};
use super::file::{Aio, AlignedBuf, FileDriver, FileOptions};
use super::uring;

/// A file on a disk filesystem (io_uring is not used on tmpfs).
struct Tmp(std::path::PathBuf);
impl Tmp {
    fn new(name: &str, len: usize) -> Tmp {
        let p =
            std::path::PathBuf::from(format!("/var/tmp/rsd-uring-{}-{name}", std::process::id()));
        let data: Vec<u8> = (0..len).map(pattern).collect();
        std::fs::write(&p, data).expect("write image");
        Tmp(p)
    }
    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).expect("read image")
    }
    fn open(&self, direct: bool) -> Option<FileDriver> {
        FileDriver::open(&FileOptions {
            filename: self.0.display().to_string(),
            read_only: false,
            auto_read_only: false,
            direct,
            locking: false,
            driver: "file".into(),
            aio: Aio::IoUring,
        })
        .map_err(|e| eprintln!("skipping: {e}"))
        .ok()
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn skip() -> bool {
    match uring::probe() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipping: io_uring unavailable: {why}");
            true
        }
    }
}

fn submitted() -> u64 {
    uring::SUBMITTED.load(Ordering::Relaxed)
}

#[tokio::test]
async fn buffered_requests_through_the_ring() {
    if skip() {
        return;
    }
    let t = Tmp::new("buffered", 1 << 20);
    let Some(d) = t.open(false) else { return };
    let before = submitted();
    // ext4 refuses RWF_NOWAIT for buffered writes: these take the ring.
    d.write(4095, &[0xa5; 10000], WriteFlags::default())
        .await
        .expect("write");
    d.write(200_000, &[0x3c; 512], WriteFlags { fua: true })
        .await
        .expect("fua write");
    // Past the end: the file grows.
    d.write((1 << 20) + 100, &[7; 100], WriteFlags::default())
        .await
        .expect("write past the end");
    d.flush().await.expect("flush");
    d.discard(65536, 65536).await.expect("discard");
    d.write_zeroes(131072, 8192, ZeroFlags::default())
        .await
        .expect("write zeroes");
    assert!(submitted() > before, "the requests did not use io_uring");
    let mut b = vec![0u8; 12000];
    d.read(4000, &mut b).await.expect("read");
    assert_eq!(b[94], pattern(4094));
    assert!(b[95..10095].iter().all(|x| *x == 0xa5));
    assert_eq!(b[10095], pattern(14095));
    let f = t.bytes();
    assert_eq!(f.len(), (1 << 20) + 200);
    assert!(f[4095..14095].iter().all(|x| *x == 0xa5));
    assert!(f[200_000..200_512].iter().all(|x| *x == 0x3c));
    assert!(f[65536..131072 + 8192].iter().all(|x| *x == 0));
    assert_eq!(f[131072 + 8192], pattern(131072 + 8192));
    assert!(f[(1 << 20) + 100..].iter().all(|x| *x == 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_unaligned_requests_through_the_ring() {
    if skip() {
        return;
    }
    let t = Tmp::new("direct", 1 << 20);
    let Some(d) = t.open(true) else { return };
    let before = submitted();
    d.write(100, &[0x5a; 1000], WriteFlags::default())
        .await
        .expect("unaligned write");
    d.write(8192, &[0x11; 8192], WriteFlags::default())
        .await
        .expect("aligned write");
    let mut b = vec![0u8; 1200];
    d.read(50, &mut b).await.expect("unaligned read");
    assert_eq!(b[0], pattern(50));
    assert!(b[50..1050].iter().all(|x| *x == 0x5a));
    assert_eq!(b[1050], pattern(1100));
    // A read across the end of the file reads zeroes there.
    let mut tail = vec![9u8; 8192];
    d.read((1 << 20) - 4096, &mut tail)
        .await
        .expect("tail read");
    assert_eq!(tail[0], pattern((1 << 20) - 4096));
    assert!(tail[4096..].iter().all(|x| *x == 0));
    d.flush().await.expect("flush");
    assert!(submitted() > before, "O_DIRECT did not use io_uring");
    let f = t.bytes();
    assert_eq!(f.len(), 1 << 20, "size unchanged");
    assert!(f[100..1100].iter().all(|x| *x == 0x5a));
    assert!(f[8192..16384].iter().all(|x| *x == 0x11));
    assert_eq!(f[16384], pattern(16384));
}

/// A pipe: a read from it stays in flight until something is written.
fn pipe() -> (Arc<File>, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two new descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are fresh descriptors owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (Arc::new(File::from(r)), File::from(w))
}

/// A request dropped while the kernel still holds its buffer: the buffer
/// stays alive until the completion, the completion lands there and not
/// in memory reused since, and the next requests and the file are fine.
#[tokio::test]
async fn dropped_request_keeps_its_buffer_until_completion() {
    if skip() {
        return;
    }
    let Some(ring) = uring::local() else {
        eprintln!("skipping: no ring on this runtime");
        return;
    };
    let (rd, mut wr) = pipe();
    let op = ring
        .rw(&rd, AlignedBuf::new(65536), 0..65536, 0, false, 0)
        .unwrap_or_else(|_| panic!("submit"));
    let mut op = Box::pin(op);
    // Polled once, then dropped in flight (as a cancelled request).
    assert!(
        tokio::time::timeout(Duration::from_millis(20), op.as_mut())
            .await
            .is_err(),
        "a pipe read with no writer data completed"
    );
    drop(op);
    // Memory freed now would be reused by these allocations.
    let fill: Vec<Vec<u8>> = (0..64).map(|_| vec![0xee; 65536]).collect();
    // The file driver keeps working meanwhile on the same ring.
    let t = Tmp::new("after-cancel", 1 << 20);
    let Some(d) = t.open(false) else { return };
    d.write(0, &[0x42; 65536], WriteFlags::default())
        .await
        .expect("write after a cancelled request");
    // Now the kernel completes the abandoned read.
    std::io::Write::write_all(&mut wr, &[0x99; 65536]).expect("pipe write");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        fill.iter().all(|v| v.iter().all(|x| *x == 0xee)),
        "the kernel wrote into memory reused after the request was dropped"
    );
    let mut b = vec![0u8; 65536];
    d.read(0, &mut b).await.expect("read");
    assert!(b.iter().all(|x| *x == 0x42));
    assert!(t.bytes()[..65536].iter().all(|x| *x == 0x42));
    assert_eq!(t.bytes()[65536], pattern(65536));
    // The pipe's data went to the abandoned read, not to a later one.
    let mut probe = [0u8; 1];
    // SAFETY: non-blocking read of one byte into a local buffer.
    let n = unsafe {
        libc::fcntl(rd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
        libc::read(rd.as_raw_fd(), probe.as_mut_ptr().cast(), 1)
    };
    assert!(n < 0, "the abandoned read did not consume the pipe's data");
}

/// Many O_DIRECT writes, half of them dropped after their first poll:
/// every block holds either its old or its new contents, and the
/// requests that completed are all there.
#[tokio::test]
async fn cancelled_direct_writes_leave_whole_blocks() {
    if skip() {
        return;
    }
    let t = Tmp::new("cancel-direct", 1 << 20);
    let Some(d) = t.open(true) else { return };
    let d = Arc::new(d);
    for round in 0..4u8 {
        let mut kept = Vec::new();
        for i in 0..64usize {
            let fill = (round * 64 + i as u8) | 1;
            let d2 = d.clone();
            let mut f = Box::pin(async move {
                d2.write((i * 8192) as u64, &[fill; 8192], WriteFlags::default())
                    .await
            });
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let first = f.as_mut().poll(&mut cx);
            if i % 2 == 0 {
                drop(f);
            } else if first.is_pending() {
                kept.push((i, fill, f));
            }
        }
        for (i, fill, f) in kept {
            f.await.expect("write");
            let mut b = vec![0u8; 8192];
            d.read((i * 8192) as u64, &mut b).await.expect("read");
            assert!(b.iter().all(|x| *x == fill), "a completed write is missing");
        }
    }
    d.flush().await.expect("flush");
    let f = t.bytes();
    for (n, blk) in f[..64 * 8192].chunks(4096).enumerate() {
        let old = (0..4096).all(|j| blk[j] == pattern(n * 4096 + j));
        assert!(old || blk.iter().all(|x| *x == blk[0]), "a torn block");
    }
}

/// A ring whose thread ends with a request in flight waits for its
/// completion before the memory goes.
#[test]
fn ring_outliving_its_runtime_waits_for_requests() {
    if skip() {
        return;
    }
    let (rd, mut wr) = pipe();
    let (tx, rx) = std::sync::mpsc::channel();
    let th = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let Some(ring) = uring::local() else {
                return;
            };
            let op = ring
                .rw(&rd, AlignedBuf::new(4096), 0..4096, 0, false, 0)
                .unwrap_or_else(|_| panic!("submit"));
            // Never polled to completion: dropped with the runtime.
            tokio::spawn(op);
            tokio::task::yield_now().await;
        });
        drop(rt);
        let _ = tx.send(());
        // The thread-local ring is dropped as the thread exits.
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("runtime ended");
    // The thread's locals (its ring) go after its closure returned:
    // only join() sees them gone.
    let (jtx, jrx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = jtx.send(th.join().is_ok());
    });
    assert!(
        jrx.recv_timeout(Duration::from_millis(100)).is_err(),
        "the ring went away with a read in flight"
    );
    std::io::Write::write_all(&mut wr, &[1; 4096]).expect("pipe write");
    assert_eq!(jrx.recv_timeout(Duration::from_secs(5)), Ok(true));
}
