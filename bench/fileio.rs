//! File-I/O micro-benchmark: how should the file driver do I/O?
//!
//! Compares, on the same files and in one run:
//! - `inline`: rsd's file driver (preadv2/pwritev2 with RWF_NOWAIT on the
//!   calling task, `block_in_place` only when the kernel would block);
//! - `pool`: a blocking thread pool (tokio's spawn_blocking with an owned
//!   buffer), which is what QEMU's aio=threads does;
//! - `uring`: io_uring driven by one submission thread, requests handed to
//!   it over a channel and completions sent back.
//!
//! Workloads: 4k random read at QD1 and QD32, 4k random write at QD32, 1M
//! sequential read at QD8, each on tmpfs (/dev/shm) and on disk
//! (/var/tmp), on a 2-worker tokio runtime as rsd uses. Prints medians of
//! RUNS runs of SECS seconds each, and the ratios to `pool`.
//!
//! Run: cargo bench --bench fileio [-- SECS RUNS]
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rsd::block::driver::{Driver, WriteFlags};
use rsd::block::file::{FileDriver, FileOptions};

const FILE_SIZE: u64 = 256 << 20;

/// A 4096-aligned buffer, usable with O_DIRECT by every engine.
struct ABuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain owned memory.
unsafe impl Send for ABuf {}

impl ABuf {
    fn new(len: usize) -> ABuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        ABuf { ptr, len }
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: valid for len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: valid for len bytes, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for ABuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Engine {
    Inline,
    Pool,
    Uring,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Inline => "inline",
            Engine::Pool => "pool",
            Engine::Uring => "uring",
        }
    }
}

#[derive(Clone, Copy)]
struct Work {
    name: &'static str,
    bs: usize,
    qd: usize,
    write: bool,
    random: bool,
}

const WORK: &[Work] = &[
    Work {
        name: "4k randread QD1",
        bs: 4096,
        qd: 1,
        write: false,
        random: true,
    },
    Work {
        name: "4k randread QD32",
        bs: 4096,
        qd: 32,
        write: false,
        random: true,
    },
    Work {
        name: "4k randwrite QD32",
        bs: 4096,
        qd: 32,
        write: true,
        random: true,
    },
    Work {
        name: "1M seqread QD8",
        bs: 1 << 20,
        qd: 8,
        write: false,
        random: false,
    },
];

/// io_uring on a dedicated thread.
struct Uring {
    tx: std::sync::mpsc::Sender<UringReq>,
}

struct UringReq {
    write: bool,
    fd: i32,
    buf: ABuf,
    off: u64,
    done: tokio::sync::oneshot::Sender<(ABuf, i32)>,
}

impl Uring {
    fn new() -> Uring {
        let (tx, rx) = std::sync::mpsc::channel::<UringReq>();
        std::thread::spawn(move || {
            let mut ring = io_uring::IoUring::new(256).expect("io_uring");
            let mut slots: Vec<Option<UringReq>> = (0..256).map(|_| None).collect();
            let mut inflight = 0usize;
            loop {
                // Take every queued request (block only when idle).
                let mut next = if inflight == 0 {
                    match rx.recv() {
                        Ok(r) => Some(r),
                        Err(_) => return,
                    }
                } else {
                    rx.try_recv().ok()
                };
                while let Some(req) = next.take() {
                    // At most 32 requests are in flight: a slot is always free.
                    let slot = slots.iter().position(Option::is_none).expect("free slot");
                    let len = req.buf.len as u32;
                    let ptr = req.buf.ptr;
                    let entry = if req.write {
                        io_uring::opcode::Write::new(io_uring::types::Fd(req.fd), ptr, len)
                            .offset(req.off)
                            .build()
                    } else {
                        io_uring::opcode::Read::new(io_uring::types::Fd(req.fd), ptr, len)
                            .offset(req.off)
                            .build()
                    }
                    .user_data(slot as u64);
                    slots[slot] = Some(req);
                    // SAFETY: the buffer lives in `slots` until completion.
                    unsafe { ring.submission().push(&entry).expect("sq full") };
                    inflight += 1;
                    next = rx.try_recv().ok();
                }
                ring.submit_and_wait(1).expect("submit");
                for cqe in ring.completion() {
                    let slot = cqe.user_data() as usize;
                    if let Some(req) = slots[slot].take() {
                        let _ = req.done.send((req.buf, cqe.result()));
                    }
                    inflight -= 1;
                }
            }
        });
        Uring { tx }
    }
}

fn make_file(dir: &str) -> Option<String> {
    let path = format!("{dir}/rsd-fileio-bench-{}", std::process::id());
    let f = File::create(&path).ok()?;
    let chunk = vec![0x5au8; 1 << 20];
    use std::io::Write;
    let mut w = std::io::BufWriter::new(f);
    for _ in 0..(FILE_SIZE >> 20) {
        w.write_all(&chunk).ok()?;
    }
    w.flush().ok()?;
    Some(path)
}

fn run_once(
    rt: &tokio::runtime::Runtime,
    path: &str,
    direct: bool,
    engine: Engine,
    w: Work,
    secs: f64,
) -> f64 {
    let driver = Arc::new(
        FileDriver::open(&FileOptions {
            filename: path.into(),
            read_only: false,
            auto_read_only: false,
            direct,
            locking: false,
            driver: "file".into(),
            aio: Default::default(),
        })
        .expect("open"),
    );
    let raw = {
        use std::os::unix::fs::OpenOptionsExt;
        let flags = if direct { 0o40000 } else { 0 }; // O_DIRECT
        Arc::new(
            File::options()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
                .expect("open"),
        )
    };
    let uring = Arc::new(Uring::new());
    let ops = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..w.qd {
            let (driver, raw, uring, ops) =
                (driver.clone(), raw.clone(), uring.clone(), ops.clone());
            tasks.push(tokio::spawn(async move {
                let blocks = FILE_SIZE / w.bs as u64;
                let mut seed = 0x9e3779b97f4a7c15u64 ^ (t as u64 + 1);
                let mut seq = (t as u64 * blocks / w.qd as u64) % blocks;
                let mut buf = ABuf::new(w.bs);
                while Instant::now() < deadline {
                    let block = if w.random {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed % blocks
                    } else {
                        seq = (seq + 1) % blocks;
                        seq
                    };
                    let off = block * w.bs as u64;
                    match engine {
                        Engine::Inline => {
                            if w.write {
                                driver
                                    .write(off, buf.as_slice(), WriteFlags::default())
                                    .await
                                    .expect("write");
                            } else {
                                driver.read(off, buf.as_mut_slice()).await.expect("read");
                            }
                        }
                        Engine::Pool => {
                            let raw = raw.clone();
                            let b = std::mem::replace(&mut buf, ABuf::new(4096));
                            buf = tokio::task::spawn_blocking(move || {
                                use std::os::unix::fs::FileExt;
                                let mut b = b;
                                if w.write {
                                    raw.write_all_at(b.as_slice(), off).expect("pwrite");
                                } else {
                                    raw.read_exact_at(b.as_mut_slice(), off).expect("pread");
                                }
                                b
                            })
                            .await
                            .expect("join");
                        }
                        Engine::Uring => {
                            let (tx, rx) = tokio::sync::oneshot::channel();
                            let req = UringReq {
                                write: w.write,
                                fd: raw.as_raw_fd(),
                                buf: std::mem::replace(&mut buf, ABuf::new(4096)),
                                off,
                                done: tx,
                            };
                            uring.tx.send(req).expect("uring thread");
                            let (b, res) = rx.await.expect("uring reply");
                            assert_eq!(res, w.bs as i32, "uring result");
                            buf = b;
                        }
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
    ops.load(Ordering::Relaxed) as f64 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let secs: f64 = argv.get(1).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let runs: usize = argv.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("file-I/O engines, {runs} runs x {secs}s, medians; ratio = engine / pool");
    let names: Vec<&str> = [Engine::Inline, Engine::Pool, Engine::Uring]
        .iter()
        .map(|e| e.name())
        .collect();
    println!(
        "{:<12} {:<18} {:>12} {:>12} {:>12} {:>8} {:>8}",
        "fs", "workload", names[0], names[1], names[2], "in/pool", "ur/pool"
    );
    // "disk" goes through the page cache (warm after creation);
    // "disk-direct" opens with O_DIRECT, so every request reaches the disk.
    for (fs, dir, direct) in [
        ("tmpfs", "/dev/shm", false),
        ("disk", "/var/tmp", false),
        ("disk-direct", "/var/tmp", true),
    ] {
        let Some(path) = make_file(dir) else {
            println!("{fs}: cannot create a file in {dir}; skipped");
            continue;
        };
        for w in WORK {
            let mut res = [Vec::new(), Vec::new(), Vec::new()];
            // Interleave engines so machine noise hits them alike.
            for _ in 0..runs {
                for (i, e) in [Engine::Inline, Engine::Pool, Engine::Uring]
                    .into_iter()
                    .enumerate()
                {
                    res[i].push(run_once(&rt, &path, direct, e, *w, secs));
                }
            }
            let m: Vec<f64> = res.into_iter().map(median).collect();
            let unit = |v: f64| {
                if w.bs >= 1 << 20 {
                    format!("{:.0} MiB/s", v * w.bs as f64 / (1 << 20) as f64)
                } else {
                    format!("{:.0} IOPS", v)
                }
            };
            println!(
                "{:<12} {:<18} {:>12} {:>12} {:>12} {:>8.2} {:>8.2}",
                fs,
                w.name,
                unit(m[0]),
                unit(m[1]),
                unit(m[2]),
                m[0] / m[1],
                m[2] / m[1]
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}
