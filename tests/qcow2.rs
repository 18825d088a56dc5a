//! qcow2 through rsd against QEMU's own tools: images made by qemu-img
//! read through an rsd NBD export exactly as `qemu-img convert` reads
//! them; writes, zeroes and discards through rsd leave images that
//! `qemu-img check` finds clean and that equal a raw file given the same
//! operations; snapshots stay intact; SIGKILL never corrupts.
use std::process::{Command, Output};

use crate::common::*;

fn run(cmd: &str, argv: &[&str]) -> Output {
    Command::new(cmd).args(argv).output().expect(cmd)
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// qemu-io with a list of commands; fails on any error or miscompare.
fn qemu_io(fmt: &str, target: &str, cmds: &[String]) {
    let mut a = vec!["-f".to_string(), fmt.to_string()];
    for c in cmds {
        a.push("-c".into());
        a.push(c.clone());
    }
    a.push(target.to_string());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = ok(run("qemu-io", &a));
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io on {target}: {out}"
    );
}

fn img(dir: &TempDir, argv: &[&str]) {
    ok(run("qemu-img", argv));
    let _ = dir;
}

/// rsd serving `img.qcow2` of `dir` as NBD export `q` (writable, with
/// discard=unmap) on `nbd.sock`.
struct Served {
    daemon: Daemon,
    url: String,
    qmp: std::path::PathBuf,
}

fn serve(dir: &TempDir, extra: &str) -> Served {
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!(
            "driver=qcow2,node-name=q,discard=unmap,file.driver=file,file.filename={}{extra}",
            dir.s("img.qcow2")
        ),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("nbd.sock")),
        "--export",
        "type=nbd,id=e,node-name=q,writable=on",
        "--pidfile",
        &dir.s("p.pid"),
    ]));
    let mut daemon = Daemon::spawn(Which::Rsd, &a);
    if !wait_for_path(&dir.path("p.pid"), 10) {
        daemon.signal(9);
        panic!("rsd did not start: {}", daemon.stderr_text());
    }
    Served {
        daemon,
        url: format!("nbd+unix:///q?socket={}", dir.s("nbd.sock")),
        qmp: dir.path("q.sock"),
    }
}

impl Served {
    fn quit(mut self) {
        let mut q = Qmp::ready(&self.qmp);
        q.send(br#"{"execute":"quit"}"#);
        let _ = q.line();
        assert_eq!(self.daemon.wait_exit(10), Some(0));
    }
}

/// A deterministic pseudo-random sequence.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SIZE: u64 = 16 << 20;

/// Writes (aligned, unaligned, crossing clusters), zeroes and (cluster
/// aligned) discards; the commands for rsd's export and for the raw
/// reference, where a discard reads back as zeroes.
fn workload(seed: u64, cluster: u64, discards: bool) -> (Vec<String>, Vec<String>) {
    let mut r = Rng(seed);
    let (mut on_rsd, mut on_ref) = (Vec::new(), Vec::new());
    for _ in 0..60 {
        let kind = r.below(10);
        if kind < 6 {
            let len = match r.below(3) {
                0 => 1 + r.below(4096),
                1 => 4096 * (1 + r.below(32)),
                _ => 1 + r.below(3 * cluster.min(1 << 20)),
            };
            let off = if r.below(2) == 0 {
                r.below(SIZE - len) & !4095
            } else {
                r.below(SIZE - len)
            };
            let c = format!("write -P {} {off} {len}", 1 + r.below(254));
            on_rsd.push(c.clone());
            on_ref.push(c);
        } else if kind < 8 || !discards {
            let len = 1 + r.below(2 * cluster.min(1 << 20));
            let off = r.below(SIZE - len);
            let c = format!("write -z {off} {len}");
            on_rsd.push(c.clone());
            on_ref.push(c);
        } else {
            let n = 1 + r.below(3);
            let off = r.below(SIZE / cluster - n) * cluster;
            on_rsd.push(format!("discard {off} {}", n * cluster));
            on_ref.push(format!("write -z {off} {}", n * cluster));
        }
    }
    (on_rsd, on_ref)
}

/// Makes an image, checks rsd reads it as qemu-img does, applies a
/// workload through rsd and to a raw copy, then checks both agree and the
/// image is clean.
fn exercise(make: impl Fn(&TempDir), cluster: u64, discards: bool, seed: u64) {
    let dir = TempDir::new();
    make(&dir);
    let image = dir.s("img.qcow2");
    let reference = dir.s("ref.raw");
    ok(run(
        "qemu-img",
        &["convert", "-O", "raw", &image, &reference],
    ));
    let s = serve(&dir, "");
    let same = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &s.url, &reference],
    );
    assert!(
        same.status.success(),
        "rsd reads the image differently: {}",
        String::from_utf8_lossy(&same.stdout)
    );
    let (on_rsd, on_ref) = workload(seed, cluster, discards);
    qemu_io("raw", &s.url, &on_rsd);
    let same = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &s.url, &reference],
    );
    assert!(
        !same.status.success() || on_rsd.is_empty(),
        "the workload changed nothing?"
    );
    s.quit();
    qemu_io("raw", &reference, &on_ref);
    let check = run("qemu-img", &["check", &image]);
    let text = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(
        check.status.success() && text.contains("No errors were found"),
        "qemu-img check: {text}"
    );
    assert!(!text.contains("leaked"), "qemu-img check: {text}");
    let same = run("qemu-img", &["compare", "-F", "raw", &image, &reference]);
    assert!(
        same.status.success(),
        "image and reference differ: {}{}",
        String::from_utf8_lossy(&same.stdout),
        String::from_utf8_lossy(&same.stderr)
    );
}

/// qemu-img create plus some data written by qemu-io.
fn made(opts: &'static str) -> impl Fn(&TempDir) {
    move |d: &TempDir| {
        let image = d.s("img.qcow2");
        let mut a = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend([image.as_str(), "16M"]);
        img(d, &a);
        let cmds: Vec<String> = vec![
            "write -P 0x11 0 1M".into(),
            "write -P 0x22 3000000 70000".into(),
            "write -z 8M 2M".into(),
            "write -P 0x33 12M 4k".into(),
        ];
        qemu_io("qcow2", &image, &cmds);
    }
}

#[test]
fn v2_64k() {
    exercise(made("compat=0.10"), 65536, true, 1);
}

#[test]
fn v3_4k() {
    exercise(made("cluster_size=4096"), 4096, true, 2);
}

#[test]
fn v3_64k() {
    exercise(made(""), 65536, true, 3);
}

#[test]
fn v3_2m() {
    exercise(made("cluster_size=2M"), 2 << 20, true, 4);
}

#[test]
fn extended_l2() {
    exercise(made("extended_l2=on,cluster_size=64k"), 65536, true, 5);
}

#[test]
fn refcount_bits_1() {
    exercise(made("refcount_bits=1"), 65536, true, 6);
}

#[test]
fn refcount_bits_64_small_clusters_grow_the_refcount_table() {
    exercise(made("refcount_bits=64,cluster_size=512"), 512, true, 7);
}

#[test]
fn lazy_refcounts_image() {
    exercise(made("lazy_refcounts=on"), 65536, true, 8);
}

fn with_backing(base_fmt: &'static str, opts: &'static str) -> impl Fn(&TempDir) {
    move |d: &TempDir| {
        let base = d.s(&format!("base.{base_fmt}"));
        img(d, &["create", "-q", "-f", base_fmt, &base, "12M"]);
        qemu_io(
            base_fmt,
            &base,
            &["write -P 0x5a 0 12M".into(), "write -P 0x6b 1M 100k".into()],
        );
        let mut a = vec!["create", "-q", "-f", "qcow2", "-F", base_fmt, "-b"];
        // A relative name: resolved against the image's directory.
        let rel = format!("base.{base_fmt}");
        a.push(&rel);
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        let image = d.s("img.qcow2");
        a.extend([image.as_str(), "16M"]);
        img(d, &a);
        qemu_io(
            "qcow2",
            &image,
            &["write -P 0x77 2M 100k".into(), "write -z 5M 64k".into()],
        );
    }
}

#[test]
fn raw_backing() {
    exercise(with_backing("raw", ""), 65536, true, 9);
}

#[test]
fn qcow2_backing() {
    exercise(with_backing("qcow2", ""), 65536, true, 10);
}

#[test]
fn extended_l2_over_backing() {
    exercise(with_backing("qcow2", "extended_l2=on"), 65536, true, 11);
}

#[test]
fn v2_over_backing_without_discards() {
    // v2 has no zero flag: a discard exposes the backing file (as in QEMU).
    exercise(with_backing("raw", "compat=0.10"), 65536, false, 12);
}

#[test]
fn external_data_file() {
    exercise(
        move |d: &TempDir| {
            let image = d.s("img.qcow2");
            let o = format!("data_file={}", d.s("data.raw"));
            img(d, &["create", "-q", "-f", "qcow2", "-o", &o, &image, "16M"]);
            qemu_io("qcow2", &image, &["write -P 0x42 1M 300k".into()]);
        },
        65536,
        true,
        13,
    );
}

fn compressed(kind: &'static str) -> impl Fn(&TempDir) {
    move |d: &TempDir| {
        let src = d.s("src.raw");
        img(d, &["create", "-q", "-f", "raw", &src, "16M"]);
        // Compressible and incompressible-ish data, and a hole.
        qemu_io(
            "raw",
            &src,
            &[
                "write -P 0x61 0 4M".into(),
                "write -P 0x62 100000 300000".into(),
                "write -P 0x63 9M 3M".into(),
            ],
        );
        let t = format!("compression_type={kind}");
        img(
            d,
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &t,
                &src,
                &d.s("img.qcow2"),
            ],
        );
        let map = ok(run(
            "qemu-img",
            &["map", "--output=json", &d.s("img.qcow2")],
        ));
        assert!(
            map.contains("\"compressed\": true"),
            "no compressed clusters: {map}"
        );
    }
}

#[test]
fn compressed_zlib() {
    exercise(compressed("zlib"), 65536, true, 14);
}

#[test]
fn compressed_zstd() {
    exercise(compressed("zstd"), 65536, true, 15);
}

#[test]
fn internal_snapshot_stays_intact() {
    let dir = TempDir::new();
    made("")(&dir);
    let image = dir.s("img.qcow2");
    ok(run("qemu-img", &["snapshot", "-c", "snap1", &image]));
    let before = dir.s("before.raw");
    ok(run(
        "qemu-img",
        &[
            "convert",
            "-l",
            "snapshot.name=snap1",
            "-O",
            "raw",
            &image,
            &before,
        ],
    ));
    let reference = dir.s("ref.raw");
    ok(run(
        "qemu-img",
        &["convert", "-O", "raw", &image, &reference],
    ));
    let s = serve(&dir, "");
    let (on_rsd, on_ref) = workload(99, 65536, true);
    qemu_io("raw", &s.url, &on_rsd);
    s.quit();
    qemu_io("raw", &reference, &on_ref);
    let check = run("qemu-img", &["check", &image]);
    let text = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.status.success() && text.contains("No errors were found"),
        "{text}"
    );
    let after = dir.s("after.raw");
    ok(run(
        "qemu-img",
        &[
            "convert",
            "-l",
            "snapshot.name=snap1",
            "-O",
            "raw",
            &image,
            &after,
        ],
    ));
    ok(run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &before, &after],
    ));
    ok(run(
        "qemu-img",
        &["compare", "-F", "raw", &image, &reference],
    ));
}
