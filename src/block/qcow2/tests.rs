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
        aio: Default::default(),
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

// Hostile metadata that made loops run (nearly) forever, allocate without
// bound or overwrite metadata. Each case runs on a thread of its own with
// a deadline: a loop that never yields fails the test instead of hanging
// it, and so does a panic.

fn run_ok(prog: &str, args: &[&str]) -> bool {
    Command::new(prog)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn create(path: &str, opts: &str, size: &str) {
    let _ = std::fs::remove_file(path);
    assert!(
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, path, size]
        ),
        "qemu-img/qemu-io are needed to make test images"
    );
}

fn qemu_io(path: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(path);
    // "abort" makes qemu-io fail on purpose.
    let _ = run_ok("qemu-io", &args);
}

fn be64_at(path: &str, at: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    let f = std::fs::File::open(path).expect("test image");
    f.read_exact_at(&mut b, at).expect("read test image");
    u64::from_be_bytes(b)
}

fn patch(path: &str, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("test image");
    f.write_all_at(bytes, at).expect("patch test image");
}

fn set_len(path: &str, len: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("test image");
    f.set_len(len).expect("sparse test image");
}

/// A lazy-refcounts image left dirty by a crash: opening it read-write
/// runs the repair.
fn dirty(path: &str, opts: &str, snapshot: bool) {
    create(path, &format!("lazy_refcounts=on,{opts}"), "4M");
    qemu_io(path, &["write -P 1 0 64k"]);
    if snapshot {
        assert!(run_ok("qemu-img", &["snapshot", "-c", "s1", path]));
    }
    qemu_io(path, &["write -P 2 1M 64k", "abort"]);
    let incompat = be64_at(path, 72);
    assert!(incompat & 1 != 0, "the image was left dirty");
}

/// Runs `f` on a runtime on a thread of its own; its result, or an error
/// if it did not finish within `secs` (a hang, or a panic).
fn within<T: Send + 'static, F>(
    secs: u64,
    f: impl FnOnce() -> F + Send + 'static,
) -> Result<T, String>
where
    F: std::future::Future<Output = T>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            let _ = tx.send(rt.block_on(f()));
        }
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .map_err(|_| format!("did not finish in {secs} s (hung or panicked)"))
}

async fn open_image(path: &str, read_only: bool) -> Result<Qcow2, String> {
    let file = open_file(path).ok_or("cannot open the file")?;
    let h = super::read_header(&file).await.map_err(|e| e.msg)?;
    Qcow2::open(file, h, None, None, read_only, &Qcow2Options::default())
        .await
        .map_err(|e| e.msg)
}

fn tmp(name: &str) -> String {
    format!(
        "{}/rsd-qcow2-{name}-{}.qcow2",
        std::env::temp_dir().display(),
        std::process::id()
    )
}

/// Repair of a dirty image on a huge sparse file: it visited every
/// cluster up to the end of the file (2^30 here) without yielding.
#[test]
fn dirty_image_on_a_huge_sparse_file_is_repaired_quickly() {
    let path = tmp("dirty-sparse");
    dirty(&path, "cluster_size=4k", false);
    set_len(&path, 4 << 40);
    let p = path.clone();
    let r = within(20, move || async move {
        let q = open_image(&p, false).await?;
        let mut b = vec![0u8; 4096];
        q.read(1 << 20, &mut b).await.map_err(|e| e.msg)?;
        Ok::<_, String>(b.iter().all(|x| *x == 2))
    });
    let _ = std::fs::remove_file(&path);
    assert_eq!(r, Ok(Ok(true)));
}

/// Refcount table entries that alias one block are corruption (they let
/// the repair and the allocator walk the same block for every entry).
#[test]
fn aliased_refcount_blocks_are_refused_for_writing() {
    let path = tmp("alias");
    dirty(&path, "cluster_size=4k", false);
    let rt = be64_at(&path, 48);
    let rb = be64_at(&path, rt);
    for i in 1..512 {
        patch(&path, rt + 8 * i, &rb.to_be_bytes());
    }
    let p = path.clone();
    let r = within(20, move || async move {
        let rw = open_image(&p, false).await.err();
        let ro = open_image(&p, true).await.is_ok();
        (rw, ro)
    });
    let _ = std::fs::remove_file(&path);
    let (rw, ro) = r.expect("open");
    assert_eq!(
        rw.as_deref(),
        Some(format!("Refblock offset {rb:#x} used twice (reftable indexes 0x0 and 0x1)").as_str())
    );
    assert!(ro, "read-only opens do not need the refcounts");
}

/// All entries of a large L1 table naming one L2 table: the repair read
/// and walked that table once per entry (2^20 times here).
#[test]
fn dirty_repair_reads_a_shared_l2_table_once() {
    let path = tmp("shared-l2");
    dirty(&path, "cluster_size=4k", false);
    let l1 = be64_at(&path, 40);
    let l2 = be64_at(&path, l1);
    let n = 1u64 << 20;
    let at = std::fs::metadata(&path)
        .map(|m| m.len())
        .unwrap_or(0)
        .next_multiple_of(4096);
    let table: Vec<u8> = (0..n).flat_map(|_| l2.to_be_bytes()).collect();
    patch(&path, at, &table);
    patch(&path, 36, &(n as u32).to_be_bytes());
    patch(&path, 40, &at.to_be_bytes());
    let p = path.clone();
    let r = within(20, move || async move { open_image(&p, false).await.err() });
    let _ = std::fs::remove_file(&path);
    // Refused (refcounts that overflow, or blocks missing), but quickly.
    assert!(r.expect("repair").is_some());
}

/// QEMU's limits on the snapshot table, and snapshot L1 tables the repair
/// must not trust (an offset near 2^64 overflowed its arithmetic).
#[test]
fn snapshot_table_limits() {
    let path = tmp("snap");
    // (what, field offset in the entry, its bytes, file length, error)
    type Case = (&'static str, u64, Vec<u8>, Option<u64>, &'static str);
    let cases: [Case; 4] = [
        (
            "extra data",
            36,
            2000u32.to_be_bytes().to_vec(),
            None,
            "Too much extra metadata in snapshot table entry 0\nYou can force-remove this extra metadata with qemu-img check -r all",
        ),
        (
            "L1 offset near 2^64",
            0,
            (!4095u64).to_be_bytes().to_vec(),
            None,
            "Snapshot L1 table offset invalid",
        ),
        (
            "L1 too large",
            8,
            0x0100_0000u32.to_be_bytes().to_vec(),
            Some(256 << 20),
            "Snapshot L1 table too large",
        ),
        (
            "L1 past the end",
            0,
            (1u64 << 40).to_be_bytes().to_vec(),
            None,
            "Snapshot L1 table lies beyond the end of the image file",
        ),
    ];
    for (what, field, bytes, len, want) in cases {
        dirty(&path, "cluster_size=4k", true);
        let snaps = be64_at(&path, 64);
        patch(&path, snaps + field, &bytes);
        if let Some(len) = len {
            set_len(&path, len);
        }
        let p = path.clone();
        let r = within(20, move || async move { open_image(&p, false).await.err() });
        assert_eq!(r, Ok(Some(want.to_string())), "{what}");
    }
    // The table as a whole: at most 64 MiB.
    create(&path, "cluster_size=4k", "4M");
    assert!(run_ok("qemu-img", &["snapshot", "-c", "s1", &path]));
    let snaps = be64_at(&path, 64);
    let mut e = vec![0u8; 40];
    e[8..12].copy_from_slice(&0u32.to_be_bytes());
    e[12..16].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]); // id, name: 64 KiB each
    let step = (40 + 2 * 65535u64).next_multiple_of(8);
    let n = 520u32;
    for i in 0..u64::from(n) {
        patch(&path, snaps + i * step, &e);
    }
    patch(&path, 60, &n.to_be_bytes());
    let p = path.clone();
    let r = within(20, move || async move { open_image(&p, true).await.err() });
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        r,
        Ok(Some(
            "Snapshot table is too big\nYou can force-remove all 9 overhanging snapshots with qemu-img check -r all"
                .to_string()
        ))
    );
}

/// Discarding and shrinking a huge unallocated disk: one step per L2
/// table span, not per cluster (2^30 of them), and no L2 table made only
/// to be freed.
#[test]
fn huge_unallocated_ranges_are_skipped_not_stepped() {
    let path = tmp("huge");
    create(&path, "cluster_size=4k", "4T");
    qemu_io(&path, &["write -P 1 1G 4k"]);
    let p = path.clone();
    let r = within(20, move || async move {
        let q = open_image(&p, false).await?;
        let size = q.size();
        q.discard(0, size).await.map_err(|e| e.msg)?;
        q.truncate(1 << 20).await.map_err(|e| e.msg)?;
        Ok::<_, String>(q.size())
    });
    let _ = std::fs::remove_file(&path);
    assert_eq!(r, Ok(Ok(1 << 20)));
}

/// Shrinking an image on a huge sparse file: the search for the last used
/// cluster walks refcount blocks backwards, not clusters (2^30 here).
#[test]
fn shrinking_on_a_huge_sparse_file_ends() {
    let path = tmp("huge-file");
    create(&path, "cluster_size=4k", "4M");
    qemu_io(&path, &["write -P 1 0 64k"]);
    set_len(&path, 4 << 40);
    let p = path.clone();
    let r = within(20, move || async move {
        let q = open_image(&p, false).await?;
        q.truncate(2 << 20).await.map_err(|e| e.msg)?;
        Ok::<_, String>(())
    });
    let len = std::fs::metadata(&path)
        .map(|m| m.len())
        .unwrap_or(u64::MAX);
    let _ = std::fs::remove_file(&path);
    assert_eq!(r, Ok(Ok(())));
    assert!(
        len < 1 << 20,
        "the file was cut after its last used cluster: {len}"
    );
}

/// Growing the disk beyond what a 32 MiB L1 table maps fails as in QEMU
/// (it allocated the table in memory first, aborting the process).
#[test]
fn growing_past_the_l1_limit_is_efbig() {
    let path = tmp("grow");
    create(&path, "cluster_size=4k", "4M");
    let p = path.clone();
    let r = within(20, move || async move {
        let q = open_image(&p, false).await?;
        let e = q.truncate(1 << 60).await.err().map(|e| (e.errno, e.msg));
        let ok = q.truncate(8 << 20).await.is_ok() && q.size() == 8 << 20;
        Ok::<_, String>((e, ok))
    });
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        r,
        Ok(Ok((
            Some((
                nix::libc::EFBIG,
                "Failed to grow the L1 table: File too large".to_string()
            )),
            true
        )))
    );
}

/// An L1 entry naming the refcount table as a COPIED L2 table: updating
/// the "L2 entry" wrote into the refcount table. The overlap check stops
/// it and marks the image corrupt.
#[test]
fn l2_updates_cannot_overwrite_other_metadata() {
    let path = tmp("l2-overlap");
    create(&path, "cluster_size=4k", "4M");
    qemu_io(&path, &["write -P 1 1M 4k"]);
    let l1 = be64_at(&path, 40);
    let rt = be64_at(&path, 48);
    patch(&path, l1, &((1u64 << 63) | rt).to_be_bytes());
    let before = std::fs::read(&path).unwrap_or_default();
    let p = path.clone();
    let r = within(20, move || async move {
        let q = open_image(&p, false).await?;
        let buf = vec![9u8; 4096];
        Ok::<_, String>(
            q.write(0, &buf, WriteFlags::default())
                .await
                .err()
                .map(|e| e.msg),
        )
    });
    let after = std::fs::read(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        r,
        Ok(Ok(Some(
            "Preventing invalid write on metadata (overlaps with refcount table)".to_string()
        )))
    );
    let (rt, cs) = (rt as usize, 4096);
    assert_eq!(
        before[rt..rt + cs],
        after[rt..rt + cs],
        "refcount table intact"
    );
    assert!(after.len() > 80 && after[79] & 2 != 0, "marked corrupt");
}
