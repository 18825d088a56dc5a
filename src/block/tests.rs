//! Data-plane tests of each driver, checked against the file contents.
use std::sync::Arc;

use super::driver::{WriteFlags, ZeroFlags};
use super::file::{FileDriver, FileOptions};
use super::node::{CommonOptions, DetectZeroes, Node};
use super::null::NullDriver;
use super::perm::Perm;
use super::raw::RawDriver;

struct Tmp(std::path::PathBuf);
impl Tmp {
    fn new(name: &str, len: usize, dir: &str) -> Tmp {
        let p = std::path::PathBuf::from(format!("{dir}/rsd-unit-{}-{name}", std::process::id()));
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, data).expect("write image");
        Tmp(p)
    }
    fn s(&self) -> String {
        self.0.display().to_string()
    }
    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).expect("read image")
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn file_opts(path: &str) -> FileOptions {
    FileOptions {
        filename: path.into(),
        read_only: false,
        auto_read_only: false,
        direct: false,
        locking: true,
        driver: "file".into(),
        aio: Default::default(),
    }
}

fn file_node(path: &str, common: CommonOptions) -> Arc<Node> {
    let d = FileDriver::open(&FileOptions {
        direct: common.cache_direct,
        read_only: common.read_only,
        ..file_opts(path)
    })
    .expect("open");
    Node::new("f".into(), Box::new(d), common)
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_read_write_flush() {
    // /dev/shm takes the in-memory path, /var/tmp the RWF_NOWAIT path.
    for dir in ["/dev/shm", "/var/tmp"] {
        if std::path::Path::new(dir).is_dir() {
            read_write_flush_in(dir).await;
        } else {
            eprintln!("skipping {dir}: not present");
        }
    }
}

async fn read_write_flush_in(dir: &str) {
    let t = Tmp::new("rw", 1 << 20, dir);
    let n = file_node(&t.s(), CommonOptions::default());
    assert_eq!(n.size(), 1 << 20);
    let mut buf = vec![0u8; 4096];
    n.read(8192, &mut buf).await.expect("read");
    assert!(buf.iter().enumerate().all(|(i, b)| *b == pattern(8192 + i)));
    n.write(
        100,
        &[0xab; 1000],
        WriteFlags {
            fua: true,
            ..Default::default()
        },
    )
    .await
    .expect("write");
    n.flush().await.expect("flush");
    let data = t.bytes();
    assert!(data[100..1100].iter().all(|b| *b == 0xab));
    assert_eq!(data[99], pattern(99));
    assert_eq!(data[1100], pattern(1100));
    // A file reads as zeroes past its end, as in QEMU's block layer
    // (a format whose clusters lie past a truncated end reads zeroes).
    let mut big = vec![0xffu8; 4096];
    n.read((1 << 20) - 100, &mut big)
        .await
        .expect("past the end");
    let at = (1 << 20) - 100;
    assert!(big[..100]
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(at + i)));
    assert!(big[100..].iter().all(|b| *b == 0));
    n.read(2 << 20, &mut big)
        .await
        .expect("wholly past the end");
    assert!(big.iter().all(|b| *b == 0));
    assert_eq!(n.stats.rd.ops.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert_eq!(
        n.stats.wr.bytes.load(std::sync::atomic::Ordering::Relaxed),
        1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_discard_and_write_zeroes() {
    let t = Tmp::new("dz", 1 << 20, "/tmp");
    // discard=ignore keeps the data.
    let n = file_node(&t.s(), CommonOptions::default());
    n.discard(0, 65536).await.expect("discard");
    assert_eq!(t.bytes()[10], pattern(10));
    drop(n);
    let n = file_node(
        &t.s(),
        CommonOptions {
            discard_unmap: true,
            ..Default::default()
        },
    );
    n.discard(0, 65536).await.expect("discard");
    assert!(t.bytes()[..65536].iter().all(|b| *b == 0));
    let e = n.block_status(0, 1 << 20).await.expect("status");
    assert!(!e.data && e.zero && e.len == 65536, "{e:?}");
    let e = n.block_status(65536, 4096).await.expect("status");
    assert!(e.data && !e.zero);
    n.write_zeroes(131072, 8192, ZeroFlags::default())
        .await
        .expect("zeroes");
    n.write_zeroes(
        200000,
        5000,
        ZeroFlags {
            may_unmap: true,
            ..Default::default()
        },
    )
    .await
    .expect("zeroes unmap");
    let d = t.bytes();
    assert!(d[131072..139264].iter().all(|b| *b == 0));
    assert!(d[200000..205000].iter().all(|b| *b == 0));
    assert_eq!(d[205000], pattern(205000));
    assert_eq!(d.len(), 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detect_zeroes_unmap_punches_holes() {
    let t = Tmp::new("detz", 1 << 20, "/tmp");
    let n = file_node(
        &t.s(),
        CommonOptions {
            discard_unmap: true,
            detect_zeroes: DetectZeroes::Unmap,
            ..Default::default()
        },
    );
    n.write(65536, &[0u8; 65536], WriteFlags::default())
        .await
        .expect("write");
    let e = n.block_status(65536, 65536).await.expect("status");
    assert!(!e.data, "zero write became a hole: {e:?}");
    assert!(t.bytes()[65536..131072].iter().all(|b| *b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_resize() {
    let t = Tmp::new("rs", 1 << 20, "/tmp");
    let n = file_node(&t.s(), CommonOptions::default());
    n.truncate(2 << 20).await.expect("grow");
    assert_eq!(n.size(), 2 << 20);
    assert_eq!(std::fs::metadata(&t.0).expect("meta").len(), 2 << 20);
    let mut b = vec![1u8; 512];
    n.read((2 << 20) - 512, &mut b).await.expect("read grown");
    assert!(b.iter().all(|x| *x == 0));
    n.truncate(1000001).await.expect("shrink");
    assert_eq!(std::fs::metadata(&t.0).expect("meta").len(), 1000001);
    assert_eq!(n.size(), 1000448, "sizes count whole sectors as in QEMU");
    let mut tail = vec![9u8; 447];
    n.read(1000001, &mut tail)
        .await
        .expect("read the sector tail");
    assert!(tail.iter().all(|x| *x == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_io_handles_unaligned_requests() {
    // O_DIRECT needs a real filesystem: /tmp, not tmpfs.
    let t = Tmp::new("direct", 1 << 20, "/var/tmp");
    let n = match FileDriver::open(&FileOptions {
        direct: true,
        ..file_opts(&t.s())
    }) {
        Ok(d) => Node::new("d".into(), Box::new(d), CommonOptions::default()),
        Err(e) => {
            eprintln!("skipping: O_DIRECT not supported here: {e}");
            return;
        }
    };
    assert_eq!(n.limits().request_alignment, 4096);
    n.write(100, &[0x5a; 1000], WriteFlags::default())
        .await
        .expect("unaligned write");
    let mut b = vec![0u8; 1200];
    n.read(50, &mut b).await.expect("unaligned read");
    assert_eq!(b[0], pattern(50));
    assert!(b[50..1050].iter().all(|x| *x == 0x5a));
    assert_eq!(b[1050], pattern(1100));
    let d = t.bytes();
    assert_eq!(d.len(), 1 << 20, "size unchanged");
    assert!(d[100..1100].iter().all(|x| *x == 0x5a));
    // An aligned request goes straight through.
    let mut aligned = vec![0u8; 8192];
    n.read(4096, &mut aligned).await.expect("aligned read");
    assert_eq!(aligned[0], pattern(4096));
}

/// Unaligned O_DIRECT writes are read-modify-writes of whole blocks;
/// overlapping ones must be serialised or one undoes the other. Many
/// 512-byte writes into the same few 4 KiB blocks at once must all land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_unaligned_direct_writes_all_land() {
    let t = Tmp::new("rmw", 64 << 10, "/var/tmp");
    let n = match FileDriver::open(&FileOptions {
        direct: true,
        ..file_opts(&t.s())
    }) {
        Ok(d) => Node::new("d".into(), Box::new(d), CommonOptions::default()),
        Err(e) => {
            eprintln!("skipping: O_DIRECT not supported here: {e}");
            return;
        }
    };
    for round in 0..4u8 {
        let mut tasks = Vec::new();
        // 4 blocks x 8 sectors, every sector written by its own request.
        for i in 0..32u64 {
            let n = n.clone();
            let fill = round.wrapping_mul(64).wrapping_add(i as u8) | 1;
            tasks.push(tokio::spawn(async move {
                n.write(i * 512, &[fill; 512], WriteFlags::default()).await
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("write");
        }
        let d = t.bytes();
        for i in 0..32usize {
            let fill = round.wrapping_mul(64).wrapping_add(i as u8) | 1;
            assert!(
                d[i * 512..(i + 1) * 512].iter().all(|x| *x == fill),
                "round {round}: sector {i} lost its write"
            );
        }
    }
}

/// Aligned O_DIRECT requests work on the caller's memory (no bounce
/// copy); unaligned memory still goes through one. On the default
/// engine both take the I/O pool. Current-thread runtime: the counters
/// are this thread's.
#[tokio::test(flavor = "current_thread")]
async fn aligned_direct_requests_use_the_callers_memory() {
    use super::file::{AlignedBuf, BOUNCES};
    use super::iopool::SUBMITTED;
    let t = Tmp::new("inplace", 1 << 20, "/var/tmp");
    let d = match FileDriver::open(&FileOptions {
        direct: true,
        locking: false,
        ..file_opts(&t.s())
    }) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping: O_DIRECT not supported here: {e}");
            return;
        }
    };
    use super::driver::Driver;
    let count = || (BOUNCES.with(|c| c.get()), SUBMITTED.with(|c| c.get()));
    let mut buf = AlignedBuf::new(64 << 10);
    buf.as_mut_slice().fill(0x5a);
    let before = count();
    d.write(128 << 10, buf.as_slice(), WriteFlags::default())
        .await
        .expect("write");
    buf.as_mut_slice().fill(0);
    d.read(128 << 10, buf.as_mut_slice()).await.expect("read");
    let after = count();
    assert!(buf.as_slice().iter().all(|x| *x == 0x5a));
    assert_eq!(after.0, before.0, "an aligned request was bounced");
    assert_eq!(after.1, before.1 + 2, "the requests did not take the pool");
    // The same request from memory that is not aligned: bounced.
    let mut v = vec![0u8; (64 << 10) + 1];
    d.read(128 << 10, &mut v[1..]).await.expect("read");
    assert!(v[1..].iter().all(|x| *x == 0x5a));
    assert_eq!(
        count().0,
        after.0 + 1,
        "an unaligned buffer was not bounced"
    );
    let f = t.bytes();
    assert!(f[128 << 10..192 << 10].iter().all(|x| *x == 0x5a));
    assert_eq!(f[(128 << 10) - 1], pattern((128 << 10) - 1));
    assert_eq!(f[192 << 10], pattern(192 << 10));
}

/// On tmpfs every request is done inline, large ones too (a front end
/// that wants large copies on another core moves the request there).
#[tokio::test(flavor = "current_thread")]
async fn tmpfs_requests_stay_on_the_thread() {
    use super::iopool::SUBMITTED;
    let t = Tmp::new("large", 4 << 20, "/dev/shm");
    let n = file_node(&t.s(), CommonOptions::default());
    let jobs = || SUBMITTED.with(|c| c.get());
    let j0 = jobs();
    let mut big = vec![0u8; 1 << 20];
    n.read(1 << 20, &mut big).await.expect("read");
    assert!(big
        .iter()
        .enumerate()
        .all(|(i, x)| *x == pattern((1 << 20) + i)));
    n.write(0, &[7; 1 << 20], WriteFlags::default())
        .await
        .expect("write");
    let mut small = vec![0u8; 4096];
    n.read(4096, &mut small).await.expect("read");
    assert!(small.iter().all(|x| *x == 7));
    assert_eq!(jobs(), j0, "a tmpfs request left the thread");
    assert!(t.bytes()[..1 << 20].iter().all(|x| *x == 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_window_maps_onto_the_child() {
    let t = Tmp::new("raw", 1 << 20, "/tmp");
    let f = file_node(&t.s(), CommonOptions::default());
    assert!(RawDriver::new(f.clone(), 1 << 21, None).is_err());
    assert!(RawDriver::new(f.clone(), 4096, Some(1 << 20)).is_err());
    let raw = RawDriver::new(f.clone(), 4096, Some(8192)).expect("window");
    let r = Node::new("r".into(), Box::new(raw), CommonOptions::default());
    assert_eq!(r.size(), 8192);
    r.write(0, &[0xcd; 512], WriteFlags::default())
        .await
        .expect("write");
    let e = r
        .write(8000, &[1u8; 512], WriteFlags::default())
        .await
        .expect_err("past window");
    assert_eq!(e.errno, nix::libc::EINVAL);
    let d = t.bytes();
    assert!(d[4096..4608].iter().all(|b| *b == 0xcd));
    assert_eq!(d[4095], pattern(4095));
    assert!(
        r.truncate(4096).await.is_err(),
        "a window cannot be resized"
    );
    // Without a window, raw follows and resizes its child.
    let plain = Node::new(
        "p".into(),
        Box::new(RawDriver::new(f.clone(), 0, None).expect("raw")),
        CommonOptions::default(),
    );
    plain.truncate(3 << 20).await.expect("resize through raw");
    assert_eq!(f.size(), 3 << 20);
    assert_eq!(plain.size(), 3 << 20);
    // Like QEMU, raw keeps its own size when the child changes under it.
    f.truncate(4 << 20).await.expect("resize the file itself");
    assert_eq!(plain.size(), 3 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_driver() {
    let n = Node::new(
        "n".into(),
        Box::new(NullDriver::new("null-co", 1 << 20, true, 0)),
        CommonOptions::default(),
    );
    let mut b = vec![7u8; 4096];
    n.read(0, &mut b).await.expect("read");
    assert!(b.iter().all(|x| *x == 0));
    n.write(0, &b, WriteFlags::default()).await.expect("write");
    let n2 = Node::new(
        "n2".into(),
        Box::new(NullDriver::new("null-aio", 1 << 20, false, 2_000_000)),
        CommonOptions::default(),
    );
    let mut b = vec![7u8; 16];
    let t = std::time::Instant::now();
    n2.read(0, &mut b).await.expect("read");
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(2),
        "latency-ns applied"
    );
    assert_eq!(b, vec![7u8; 16], "read-zeroes=off leaves the buffer");
}

#[test]
fn read_only_node_refuses_writes() {
    let t = Tmp::new("ro", 65536, "/tmp");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    rt.block_on(async {
        let n = file_node(
            &t.s(),
            CommonOptions {
                read_only: true,
                ..Default::default()
            },
        );
        let e = n
            .write(0, &[1], WriteFlags::default())
            .await
            .expect_err("ro");
        assert_eq!(e.errno, nix::libc::EPERM);
        let mut b = [0u8; 4];
        n.read(0, &mut b)
            .await
            .expect("read works on current-thread runtime too");
    });
}

#[test]
fn image_locks_conflict_like_qemu() {
    let t = Tmp::new("lock", 65536, "/tmp");
    let a = FileDriver::open(&file_opts(&t.s())).expect("open a");
    let b = FileDriver::open(&file_opts(&t.s())).expect("open b");
    let writer = Perm::CONSISTENT_READ.union(Perm::WRITE);
    let shared = Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED);
    a.lock_perms(writer, shared).expect("first writer");
    let hint = format!("\nIs another process using the image [{}]?", t.s());
    assert_eq!(
        b.lock_perms(writer, shared),
        Err(format!("Failed to get \"write\" lock{hint}"))
    );
    assert_eq!(
        b.lock_perms(Perm::CONSISTENT_READ, Perm::ALL.without(Perm::WRITE)),
        Err(format!("Failed to get shared \"write\" lock{hint}"))
    );
    b.lock_perms(Perm::CONSISTENT_READ, Perm::ALL)
        .expect("reader sharing writes");
    drop(a);
    b.lock_perms(writer, shared).expect("lock free after close");
    let c = FileDriver::open(&FileOptions {
        locking: false,
        ..file_opts(&t.s())
    })
    .expect("open c");
    c.lock_perms(writer, shared)
        .expect("locking=off ignores locks");
}
