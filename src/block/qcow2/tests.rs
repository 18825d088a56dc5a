//! Property test of metadata parsing at run time: images made by
//! qemu-img, with random bytes of their metadata (header fields, L1, L2,
//! refcount table and blocks) overwritten, opened and driven through
//! reads, writes, zeroes, discards, block status and resize. Anything may
//! fail with an error; nothing may panic or hang.
use std::process::Command;
use std::sync::Arc;

use super::{Qcow2, Qcow2Options};
use crate::block::driver::{Driver, WriteFlags, ZeroFlags};
use crate::block::file::{FileDriver, FileOptions};
use crate::block::node::{CommonOptions, Node};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn make(path: &str, opts: &str) -> Option<Vec<u8>> {
    let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    if !ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", opts, path, "4M"])) {
        return None;
    }
    let io = [
        "write -P 1 0 200k",
        "write -z 1M 128k",
        "write -P 2 2M 70k",
        "write -c -P 3 3M 64k",
    ];
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in io {
        c.args(["-c", cmd]);
    }
    c.arg(path).stdout(std::process::Stdio::null());
    if !ok(&mut c) {
        return None;
    }
    std::fs::read(path).ok()
}

fn open_file(path: &str) -> Option<Arc<Node>> {
    let d = FileDriver::open(&FileOptions {
        filename: path.into(),
        read_only: false,
        auto_read_only: false,
        direct: false,
        locking: false,
        driver: "file".into(),
    })
    .ok()?;
    Some(Node::new("f".into(), Box::new(d), CommonOptions::default()))
}

async fn exercise(q: &Qcow2, rng: &mut Rng) {
    let size = q.size();
    let mut buf = vec![0u8; 300 << 10];
    for _ in 0..12 {
        let off = rng.below(size);
        let len = (rng.below(buf.len() as u64) + 1).min(size - off) as usize;
        match rng.below(6) {
            0 | 1 => {
                let _ = q.read(off, &mut buf[..len]).await;
            }
            2 => {
                let _ = q.write(off, &buf[..len], WriteFlags::default()).await;
            }
            3 => {
                let flags = ZeroFlags {
                    may_unmap: rng.below(2) == 0,
                    ..Default::default()
                };
                let _ = q.write_zeroes(off, len as u64, flags).await;
            }
            4 => {
                let _ = q.discard(off, len as u64).await;
            }
            _ => {
                let _ = q.block_status(off, size - off).await;
            }
        }
    }
    let _ = q.truncate(size + (1 << 20)).await;
    let _ = q.truncate(size / 2).await;
    let _ = q.flush().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_metadata_never_panics() {
    let dir = std::env::temp_dir();
    let base = format!("{}/rsd-qcow2-fuzz-{}", dir.display(), std::process::id());
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut cases, mut opened_ok) = (0, 0);
    for (k, opts) in [
        "cluster_size=4k",
        "extended_l2=on,cluster_size=16k",
        "refcount_bits=1,cluster_size=4k",
    ]
    .iter()
    .enumerate()
    {
        let path = format!("{base}-{k}.qcow2");
        let Some(good) = make(&path, opts) else {
            eprintln!("skipped: qemu-img/qemu-io not available to make test images");
            return;
        };
        let cs = 1usize << u32::from_be_bytes([good[20], good[21], good[22], good[23]]);
        // Metadata sits in the first clusters qemu-img allocates.
        let meta_end = (cs * 8).min(good.len());
        for _ in 0..60 {
            let mut b = good.clone();
            for _ in 0..(1 + rng.below(6)) {
                let at = if rng.below(3) == 0 {
                    rng.below(112) as usize
                } else {
                    rng.below(meta_end as u64) as usize
                };
                b[at] = match rng.below(4) {
                    0 => 0,
                    1 => 0xff,
                    _ => rng.next() as u8,
                };
            }
            if std::fs::write(&path, &b).is_err() {
                continue;
            }
            let Some(file) = open_file(&path) else {
                continue;
            };
            let opened = match super::read_header(&file).await {
                Ok(h) => Qcow2::open(file, h, None, None, false, &Qcow2Options::default()).await,
                Err(e) => Err(e),
            };
            if let Ok(q) = opened {
                opened_ok += 1;
                let run = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    exercise(&q, &mut rng),
                );
                assert!(run.await.is_ok(), "I/O on a corrupted image hung ({opts})");
            }
            cases += 1;
        }
        let _ = std::fs::remove_file(&path);
    }
    assert!(cases >= 150, "only {cases} cases ran");
    // Most mutations hit data the open does not check: the I/O must run.
    assert!(
        opened_ok >= cases / 4,
        "only {opened_ok} of {cases} corrupted images opened"
    );
    eprintln!("{cases} corrupted images, {opened_ok} opened and driven");
}

/// Runs `exercise` on a thread of its own and waits with a deadline, so a
/// loop that never yields (which a tokio timeout cannot interrupt) fails
/// the test instead of hanging it.
fn exercise_within(path: &str, seed: u64, secs: u64) -> Result<bool, String> {
    let path = path.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(_) => return,
        };
        let opened = rt.block_on(async {
            let file = open_file(&path)?;
            let h = super::read_header(&file).await.ok()?;
            Qcow2::open(file, h, None, None, false, &Qcow2Options::default())
                .await
                .ok()
        });
        if let Some(q) = &opened {
            let mut rng = Rng(seed);
            rt.block_on(async {
                // Allocating writes first: every damaged table is used.
                let size = q.size();
                let buf = vec![0x5au8; 64 << 10];
                for k in 0..8 {
                    let off = (size / 8) * k;
                    let _ = q.write(off, &buf, WriteFlags::default()).await;
                }
                exercise(q, &mut rng).await;
            });
        }
        let _ = tx.send(opened.is_some());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .map_err(|_| format!("I/O on a damaged image did not finish in {secs} s"))
}

/// Structural damage, the kind a byte flip rarely makes: whole refcount
/// table, L1, L2 and refcount block entries set to zero or pointed at
/// other metadata, past the end of the file or off alignment. Opening,
/// allocating writes and the rest must end (with errors or not) within a
/// deadline. This is the class of the hang on a zeroed refcount entry.
#[test]
fn structural_damage_never_hangs_writes() {
    let dir = std::env::temp_dir();
    let base = format!("{}/rsd-qcow2-struct-{}", dir.display(), std::process::id());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut cases, mut opened) = (0, 0);
    for (k, opts) in [
        "cluster_size=4k",
        "refcount_bits=1,cluster_size=4k",
        "cluster_size=64k",
    ]
    .iter()
    .enumerate()
    {
        let path = format!("{base}-{k}.qcow2");
        let Some(good) = make(&path, opts) else {
            panic!("qemu-img/qemu-io are needed to make test images");
        };
        let be64 =
            |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        let mask = 0x00ff_ffff_ffff_fe00u64;
        let l1 = be64(&good, 40) as usize;
        let rt = be64(&good, 48) as usize;
        let rb = (be64(&good, rt) & mask) as usize;
        let l2 = (be64(&good, l1) & mask) as usize;
        let eof = good.len() as u64;
        // Entries in use in these small images: refcount table 0, L1 0,
        // L2 0..4 (data) and refcount block entry 0 (the header).
        let targets = [(rt, 0), (l1, 0), (l2, 0), (l2, 3), (rb, 0)];
        let values = [
            0u64,
            rt as u64,
            l1 as u64,
            l2 as u64,
            rb as u64,
            eof + (1 << 30),
            (l2 as u64) + 512,
            u64::MAX,
            (1 << 63) | rt as u64,
            (1 << 63) | l1 as u64,
        ];
        for &(table, entry) in &targets {
            for &v in &values {
                let mut b = good.clone();
                let at = table + 8 * entry;
                b[at..at + 8].copy_from_slice(&v.to_be_bytes());
                if std::fs::write(&path, &b).is_err() {
                    continue;
                }
                let r = exercise_within(&path, rng.next(), 20);
                match r {
                    Ok(true) => opened += 1,
                    Ok(false) => {}
                    Err(e) => panic!("{e}: {opts}, entry at {at:#x} set to {v:#x}"),
                }
                cases += 1;
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    assert_eq!(cases, 150);
    assert!(
        opened >= cases / 3,
        "only {opened} of {cases} damaged images opened"
    );
    eprintln!("{cases} structurally damaged images, {opened} opened and driven");
}
