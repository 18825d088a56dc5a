//! Tests of the io_uring engine: the file driver's requests through it,
//! O_DIRECT, and requests dropped while the kernel holds their buffers.
use std::fs::File;
use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd};
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
    d.write(
        200_000,
        &[0x3c; 512],
        WriteFlags {
            fua: true,
            ..Default::default()
        },
    )
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

/// A request dropped while the kernel still holds its memory waits for
/// the completion in its drop: the data lands in the memory while it is
/// still the request's, and the ring and the file driver go on working.
#[tokio::test]
async fn dropped_request_waits_for_its_completion() {
    if skip() {
        return;
    }
    let Some(ring) = uring::local() else {
        eprintln!("skipping: no ring on this runtime");
        return;
    };
    let (rd, mut wr) = pipe();
    let mut buf = AlignedBuf::new(65536);
    // SAFETY: `buf` outlives the op, which is dropped (and so waited
    // for) below, never leaked.
    let op = unsafe { ring.rw(&rd, buf.ptr(), 65536, 0, false, 0) }.expect("submit");
    let mut op = Box::pin(op);
    // Polled once, then dropped in flight (as a cancelled request).
    assert!(
        tokio::time::timeout(Duration::from_millis(20), op.as_mut())
            .await
            .is_err(),
        "a pipe read with no writer data completed"
    );
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        std::io::Write::write_all(&mut wr, &[0x99; 65536]).expect("pipe write");
        wr
    });
    let t0 = std::time::Instant::now();
    drop(op);
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "the drop returned while the kernel held the memory"
    );
    assert!(
        buf.as_mut_slice().iter().all(|x| *x == 0x99),
        "the completion did not land in the request's memory"
    );
    let _wr = writer.join().expect("writer");
    // The file driver keeps working on the same ring.
    let t = Tmp::new("after-cancel", 1 << 20);
    let Some(d) = t.open(false) else { return };
    d.write(0, &[0x42; 65536], WriteFlags::default())
        .await
        .expect("write after a cancelled request");
    let mut b = vec![0u8; 65536];
    d.read(0, &mut b).await.expect("read");
    assert!(b.iter().all(|x| *x == 0x42));
    assert!(t.bytes()[..65536].iter().all(|x| *x == 0x42));
    assert_eq!(t.bytes()[65536], pattern(65536));
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

/// A runtime that ends with a request in flight (its task dropped)
/// waits for the completion before its thread goes on.
#[test]
fn runtime_ending_with_a_request_in_flight_waits_for_it() {
    if skip() {
        return;
    }
    let (rd, mut wr) = pipe();
    let th = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut buf = AlignedBuf::new(4096);
        let ptr = buf.ptr();
        rt.block_on(async {
            let Some(ring) = uring::local() else {
                return;
            };
            // SAFETY: `buf` outlives the runtime, whose drop drops (and
            // so waits for) the op.
            let op = unsafe { ring.rw(&rd, ptr, 4096, 0, false, 0) }.expect("submit");
            // Never polled to completion: dropped with the runtime.
            tokio::spawn(op);
            tokio::task::yield_now().await;
        });
        drop(rt);
        buf.as_mut_slice().iter().all(|x| *x == 1)
    });
    let (jtx, jrx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = jtx.send(th.join());
    });
    assert!(
        jrx.recv_timeout(Duration::from_millis(100)).is_err(),
        "the runtime ended with a read in flight"
    );
    std::io::Write::write_all(&mut wr, &[1; 4096]).expect("pipe write");
    let landed = jrx
        .recv_timeout(Duration::from_secs(5))
        .expect("thread ended")
        .expect("thread");
    assert!(landed, "the read's data is not in its memory");
}
