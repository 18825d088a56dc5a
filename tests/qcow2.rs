//! qcow2 through rsd against QEMU's own tools: images made by qemu-img
//! read through an rsd NBD export exactly as `qemu-img convert` reads
//! them; writes, zeroes and discards through rsd leave images that
//! `qemu-img check` finds clean and that equal a raw file given the same
//! operations; snapshots stay intact; SIGKILL never corrupts.
use std::process::Command;

use crate::common::nbd_wire::{self, Nbd};
use crate::common::*;

/// qemu-io with a list of commands; fails on any error or miscompare.
fn qemu_io(fmt: &str, target: &str, cmds: &[String]) {
    let mut a = vec!["-f".to_string(), fmt.to_string()];
    for c in cmds {
        a.push("-c".into());
        a.push(c.clone());
    }
    a.push(target.to_string());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = ok(&run("qemu-io", &a));
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io on {target}: {out}"
    );
}

fn img(dir: &TempDir, argv: &[&str]) {
    ok(&run("qemu-img", argv));
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
    exercise_with(make, cluster, discards, seed, "");
}

/// `exercise` with extra options for the qcow2 node.
fn exercise_with(make: impl Fn(&TempDir), cluster: u64, discards: bool, seed: u64, extra: &str) {
    let dir = TempDir::new();
    make(&dir);
    let image = dir.s("img.qcow2");
    let reference = dir.s("ref.raw");
    ok(&run(
        "qemu-img",
        &["convert", "-O", "raw", &image, &reference],
    ));
    let s = serve(&dir, extra);
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
        let map = ok(&run(
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
    ok(&run("qemu-img", &["snapshot", "-c", "snap1", &image]));
    let before = dir.s("before.raw");
    ok(&run(
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
    ok(&run(
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
    ok(&run(
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
    ok(&run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &before, &after],
    ));
    ok(&run(
        "qemu-img",
        &["compare", "-F", "raw", &image, &reference],
    ));
}

/// base.qcow2 (data and zero clusters) under top.qcow2, which names its
/// backing file relatively.
fn chain(d: &TempDir) {
    let base = d.s("base.qcow2");
    let top = d.s("top.qcow2");
    img(d, &["create", "-q", "-f", "qcow2", &base, "16M"]);
    qemu_io(
        "qcow2",
        &base,
        &["write -P 1 0 4M".into(), "write -z 6M 1M".into()],
    );
    img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &top,
            "16M",
        ],
    );
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 2 1M 1M".into(),
            "write -z 2M 64k".into(),
            "write -P 3 10M 64k".into(),
        ],
    );
    // More kinds, for format-specific info.
    for (name, o) in [
        ("v2.qcow2", "compat=0.10"),
        ("ext.qcow2", "extended_l2=on,cluster_size=128k"),
        ("lazy.qcow2", "refcount_bits=1,lazy_refcounts=on"),
        ("zstd.qcow2", "compression_type=zstd"),
    ] {
        img(
            d,
            &["create", "-q", "-f", "qcow2", "-o", o, &d.s(name), "1M"],
        );
    }
    qemu_img_create(&d.path("junk.raw"), "1M");
    let o = format!("data_file={},data_file_raw=on", d.s("df.raw"));
    img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            &d.s("df.qcow2"),
            "1M",
        ],
    );
}

#[test]
fn node_queries_and_graph_match_qsd() {
    let add = |name: &str, file: &str| {
        format!(
            r#"{{"execute":"blockdev-add","arguments":{{"driver":"qcow2","node-name":"{name}","read-only":true,"file":{{"driver":"file","filename":"$D/{file}","locking":"off"}}}}}}"#
        )
    };
    let mut steps = vec![
        r#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"bf","filename":"$D/base.qcow2","read-only":true}}"#.to_string(),
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"b","file":"bf","read-only":true}}"#.into(),
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"t","file":{"driver":"file","filename":"$D/top.qcow2"},"backing":"b"}}"#.into(),
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"t2","file":{"driver":"file","filename":"$D/top.qcow2","locking":"off"},"backing":null,"read-only":true}}"#.into(),
    ];
    for (n, f) in [
        ("v2", "v2.qcow2"),
        ("ext", "ext.qcow2"),
        ("lazy", "lazy.qcow2"),
        ("zstd", "zstd.qcow2"),
        ("df", "df.qcow2"),
    ] {
        steps.push(add(n, f));
    }
    steps.extend([
        r#"{"execute":"query-named-block-nodes"}"#.to_string(),
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.into(),
        r#"{"execute":"x-debug-query-block-graph"}"#.into(),
        r#"{"execute":"query-block"}"#.into(),
        r#"{"execute":"blockdev-del","arguments":{"node-name":"b"}}"#.into(),
        r#"{"execute":"blockdev-del","arguments":{"node-name":"bf"}}"#.into(),
        r#"{"execute":"blockdev-del","arguments":{"node-name":"t"}}"#.into(),
        r#"{"execute":"blockdev-del","arguments":{"node-name":"b"}}"#.into(),
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"x","file":{"driver":"file","filename":"$D/nope.qcow2"}}}"#.into(),
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"x","file":{"driver":"file","filename":"$D/junk.raw"}}}"#.into(),
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"x","file":"bf"}}"#.into(),
        r#"{"execute":"query-named-block-nodes"}"#.into(),
    ]);
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = same_on_both(&chain, &[], &steps).expect("both start");
    assert!(out[9].contains(r#""backing-image""#), "{}", out[9]);
    assert!(out[9].contains(r#""extended-l2": true"#), "{}", out[9]);
    assert!(out[13].contains("used as backing hd"), "{}", out[13]);
}

#[test]
fn implicit_backing_chain_matches_qsd() {
    let out = same_on_both(
        &chain,
        &[
            "--blockdev",
            "driver=qcow2,node-name=q,file.driver=file,file.filename=$D/top.qcow2",
        ],
        &[
            r#"{"execute":"query-named-block-nodes"}"#,
            r#"{"execute":"x-debug-query-block-graph"}"#,
            r#"{"execute":"block_resize","arguments":{"node-name":"q","size":33554432}}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            r#"{"execute":"block_resize","arguments":{"node-name":"q","size":33554433}}"#,
            r#"{"execute":"block_resize","arguments":{"node-name":"q","size":1048576}}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        ],
    )
    .expect("both start");
    assert!(
        out[0].contains(r#""full-backing-filename": "$D/base.qcow2""#),
        "{}",
        out[0]
    );
    assert!(out[3].contains(r#""virtual-size": 33554432"#), "{}", out[3]);
    assert!(out[4].contains("multiple of 512"), "{}", out[4]);
    assert!(out[6].contains(r#""virtual-size": 1048576"#), "{}", out[6]);
}

/// NBD block status through the chain (base:allocation and
/// qemu:allocation-depth) and `qemu-img map` equal QSD's.
#[test]
fn block_status_through_the_chain_matches_qsd() {
    let mut maps = Vec::new();
    for which in Which::all() {
        let dir = TempDir::new();
        chain(&dir);
        let sock = dir.s("nbd.sock");
        let a = args(&[
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=q,file.driver=file,file.filename={}",
                dir.s("top.qcow2")
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={sock}"),
            "--export",
            "type=nbd,id=e,node-name=q,allocation-depth=on",
            "--pidfile",
            &dir.s("p.pid"),
        ]);
        let _d = Daemon::spawn(which, &a);
        assert!(wait_for_path(&dir.path("p.pid"), 10));
        let url = format!("nbd+unix:///q?socket={sock}");
        let mut m = ok(&run(
            "qemu-img",
            &["map", "--output=json", "-f", "raw", &url],
        ));
        if which_nbdinfo() {
            m += &ok(&run("nbdinfo", &["--map", &url]));
            m += &ok(&run("nbdinfo", &["--map=qemu:allocation-depth", &url]));
        }
        maps.push(m);
    }
    assert!(maps[0].contains("\"zero\": true"), "{}", maps[0]);
    if maps.len() == 2 {
        assert_eq!(maps[0], maps[1]);
    }
}

fn which_nbdinfo() -> bool {
    let found = Command::new("nbdinfo").arg("--version").output().is_ok();
    if !found {
        eprintln!("note: nbdinfo missing (libnbd-bin); comparing qemu-img map only");
    }
    found
}

/// Hostile headers: clear errors (QSD's words where QSD refuses them
/// too) and the daemon keeps serving.
#[test]
fn hostile_headers_get_qsd_errors() {
    let cases: &[(&str, usize, &[u8])] = &[
        ("trunc", usize::MAX, &[]),
        ("ver", 4, &[0, 0, 0, 4]),
        ("cbits", 20, &[0, 0, 0, 30]),
        ("l1unaligned", 40, &[0, 0, 0, 0, 0, 0, 0x30, 0x39]),
        ("rtunaligned", 48, &[0, 0, 0, 0, 0, 0, 0, 100]),
        ("rtclusters", 56, &[0, 0x0f, 0x42, 0x40]),
        ("l1size", 36, &[0x10, 0, 0, 0]),
        ("l1small", 24, &[0, 4, 0, 0, 0, 0, 0, 0]),
        ("incompat", 72, &[0, 0, 1, 0, 0, 0, 0, 0]),
        ("corrupt", 72, &[0, 0, 0, 0, 0, 0, 0, 2]),
        ("rorder", 96, &[0, 0, 0, 7]),
        ("hlen", 100, &[0, 0, 0, 100]),
        ("snapshots", 60, &[0, 0x0f, 0x42, 0x40]),
        ("crypt", 32, &[0, 0, 0, 5]),
        ("extlen", 116, &[0xff, 0xff, 0, 0]),
    ];
    let setup = |d: &TempDir| {
        let good = d.s("good.qcow2");
        img(d, &["create", "-q", "-f", "qcow2", &good, "1M"]);
        let bytes = std::fs::read(&good).expect("read");
        for (name, at, patch) in cases {
            let mut b = bytes.clone();
            if *at == usize::MAX {
                b.truncate(50);
            } else {
                b[*at..*at + patch.len()].copy_from_slice(patch);
            }
            std::fs::write(d.path(&format!("{name}.qcow2")), b).expect("write");
        }
    };
    let mut steps: Vec<String> = cases
        .iter()
        .map(|(name, _, _)| {
            format!(r#"{{"execute":"blockdev-add","arguments":{{"driver":"qcow2","node-name":"n","file":{{"driver":"file","filename":"$D/{name}.qcow2"}}}}}}"#)
        })
        .collect();
    steps.push(r#"{"execute":"query-named-block-nodes"}"#.into());
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = same_on_both(&setup, &[], &steps).expect("both start");
    for (l, (name, _, _)) in out.iter().zip(cases) {
        assert!(l.contains("GenericError"), "{name}: {l}");
    }
    assert_eq!(out.last().map(String::as_str), Some("{\"return\": []}\r\n"));
}

/// A lazy-refcounts image left dirty by a crash (qemu-io's abort) is
/// repaired when rsd opens it read-write, as QEMU does.
#[test]
fn dirty_lazy_refcounts_image_is_repaired_on_open() {
    let dir = TempDir::new();
    let image = dir.s("img.qcow2");
    img(
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            &image,
            "16M",
        ],
    );
    let _ = run(
        "qemu-io",
        &[
            "-c",
            "write -P 7 0 1M",
            "-c",
            "write -P 8 5M 300k",
            "-c",
            "abort",
            &image,
        ],
    );
    let check = run("qemu-img", &["check", &image]);
    assert_eq!(
        check.status.code(),
        Some(2),
        "the crash left refcount errors"
    );
    let s = serve(&dir, "");
    qemu_io(
        "raw",
        &s.url,
        &[
            "read -P 7 0 1M".into(),
            "read -P 8 5M 300k".into(),
            "write -P 9 8M 64k".into(),
        ],
    );
    s.quit();
    let check = run("qemu-img", &["check", &image]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    qemu_io(
        "qcow2",
        &image,
        &["read -P 7 0 1M".into(), "read -P 9 8M 64k".into()],
    );
}

/// What a corruption scenario showed: the event (without timestamp), the
/// reply to reopening the image read-write, qemu-io's lines.
type Seen = (serde_json::Value, serde_json::Value, Vec<String>);

/// Makes a 16M image with 128k of data, lets `patch` damage it (given
/// the bytes and the L2 table's offset), serves it and runs `io` on it.
fn corruption(which: Which, patch: &dyn Fn(&mut Vec<u8>, usize), io: &[&str]) -> Seen {
    let dir = TempDir::new();
    let image = dir.s("img.qcow2");
    img(&dir, &["create", "-q", "-f", "qcow2", &image, "16M"]);
    qemu_io("qcow2", &image, &["write -P 1 0 128k".into()]);
    let mut b = std::fs::read(&image).expect("read");
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8"));
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    patch(&mut b, l2);
    std::fs::write(&image, b).expect("write");
    let sock = dir.s("nbd.sock");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=qcow2,node-name=q,file.driver=file,file.filename={image}"),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={sock}"),
        "--export",
        "type=nbd,id=e,node-name=q,writable=on",
    ]));
    let mut d = Daemon::spawn(which, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    assert!(wait_for_path(&dir.path("nbd.sock"), 10));
    let url = format!("nbd+unix:///q?socket={sock}");
    // Bounded: a daemon that hangs on the damage fails the test.
    let mut argv = vec!["20", "qemu-io", "-f", "raw"];
    for c in io {
        argv.extend(["-c", c]);
    }
    argv.push(&url);
    let out = run("timeout", &argv);
    assert_ne!(
        out.status.code(),
        Some(124),
        "{which:?}: qemu-io hung on {io:?}"
    );
    let out =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut event: serde_json::Value = serde_json::from_str(&q.line()).expect("event");
    event.as_object_mut().expect("object").remove("timestamp");
    let reopen = q.cmd(&format!(
        r#"{{"execute":"blockdev-add","arguments":{{"driver":"qcow2","node-name":"q2","file":{{"driver":"file","filename":"{image}","locking":"off"}}}}}}"#
    ));
    let nodes = q.cmd(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#);
    q.send(br#"{"execute":"quit"}"#);
    let _ = d.wait_exit(10);
    let info = ok(&run("qemu-img", &["info", &image]));
    assert!(info.contains("corrupt: true"), "{which:?}: {info}");
    let msg = event["data"]["msg"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let err = d.stderr_text();
    assert!(
        err.contains(&format!(
            "qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed"
        )),
        "{which:?}: {err}"
    );
    if which == Which::Rsd {
        // A deliberate difference: the node stays listed, marked corrupt.
        assert!(nodes.to_string().contains(r#""corrupt":true"#), "{nodes}");
    } else {
        assert_eq!(nodes["error"]["desc"], "Block device q is ejected");
    }
    let io = out
        .lines()
        .filter(|l| !l.contains("ops/sec"))
        .map(String::from)
        .collect();
    (event, reopen, io)
}

fn corruption_on_both(patch: &dyn Fn(&mut Vec<u8>, usize), io: &[&str]) -> Seen {
    let seen: Vec<Seen> = Which::all()
        .into_iter()
        .map(|w| corruption(w, patch, io))
        .collect();
    if seen.len() == 2 {
        assert_eq!(seen[0], seen[1]);
    }
    let first = seen.into_iter().next().expect("one daemon");
    assert_eq!(first.0["event"], "BLOCK_IMAGE_CORRUPTED");
    assert_eq!(first.0["data"]["fatal"], true);
    assert_eq!(
        first.1["error"]["desc"],
        "qcow2: Image is corrupt; cannot be opened read/write"
    );
    first
}

/// An L2 entry pointing at the active L1 table: the write that would
/// overwrite it fails with EIO, BLOCK_IMAGE_CORRUPTED is raised once,
/// the corrupt bit is set, later I/O fails, and the image can no longer
/// be opened read-write: all as in QSD.
#[test]
fn metadata_overlap_marks_the_image_corrupt_as_qsd() {
    let to_l1 = |b: &mut Vec<u8>, l2: usize| {
        let l1 = u64::from_be_bytes(b[40..48].try_into().expect("8"));
        b[l2 + 8..l2 + 16].copy_from_slice(&((1u64 << 63) | l1).to_be_bytes());
    };
    let (event, _, io) = corruption_on_both(
        &to_l1,
        &[
            "read -P 1 0 64k",
            "write -P 2 64k 4k",
            "write -P 2 0 4k",
            "read -P 1 8k 4k",
        ],
    );
    assert_eq!(
        event["data"]["msg"],
        "Preventing invalid write on metadata (overlaps with active L1 table)"
    );
    assert!(event["data"]["offset"].is_u64(), "{event}");
    assert_eq!(
        io[1..],
        [
            "write failed: Input/output error",
            "write failed: Invalid argument",
            "read failed: Invalid argument"
        ],
        "{io:?}"
    );
}

/// A refcount table whose first entry is 0 makes every cluster read as
/// free, the header and tables included: the first allocating write must
/// fail with EIO and mark the image corrupt, not loop or overwrite them
/// (rsd once spun forever here). The structure named differs from QSD's
/// (differences entry 28); everything else is the same.
#[test]
fn zeroed_refcount_table_entry_fails_the_write_as_qsd() {
    let zero_entry = |b: &mut Vec<u8>, _: usize| {
        let rt = u64::from_be_bytes(b[48..56].try_into().expect("8")) as usize;
        b[rt..rt + 8].fill(0);
    };
    let io = ["write -P 0x5a 1M 64k", "read -P 1 0 64k"];
    let seen: Vec<Seen> = Which::all()
        .into_iter()
        .map(|w| corruption(w, &zero_entry, &io))
        .collect();
    for (event, reopen, io) in &seen {
        assert_eq!(event["event"], "BLOCK_IMAGE_CORRUPTED", "{event}");
        let msg = event["data"]["msg"].as_str().unwrap_or_default();
        assert!(
            msg.starts_with("Preventing invalid write on metadata (overlaps with "),
            "{event}"
        );
        assert_eq!(
            reopen["error"]["desc"],
            "qcow2: Image is corrupt; cannot be opened read/write"
        );
        assert_eq!(
            io[..],
            [
                "write failed: Input/output error",
                "read failed: Invalid argument"
            ],
            "{io:?}"
        );
    }
}

/// A data cluster offset that is not cluster-aligned, found by a read.
#[test]
fn unaligned_cluster_offset_found_by_a_read_is_fatal_as_in_qsd() {
    let unalign = |b: &mut Vec<u8>, l2: usize| b[l2 + 14] |= 0x02;
    let (event, _, io) = corruption_on_both(
        &unalign,
        &["read -P 1 0 64k", "read -P 1 64k 4k", "read -P 1 0 4k"],
    );
    let msg = event["data"]["msg"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("Cluster allocation offset 0x") && msg.contains("unaligned (L2 offset: 0x"),
        "{event}"
    );
    assert!(event["data"].get("offset").is_none(), "{event}");
    assert_eq!(
        io[1..],
        [
            "read failed: Input/output error",
            "read failed: Invalid argument"
        ],
        "{io:?}"
    );
}

/// SIGKILL in the middle of writes, allocations, zeroes and discards:
/// `qemu-img check` may find leaked clusters, never corruption. Rounds
/// alternate between a plain image and extended L2 over a backing file.
#[test]
fn sigkill_never_corrupts() {
    let dir = TempDir::new();
    let plain = dir.s("plain.qcow2");
    img(&dir, &["create", "-q", "-f", "qcow2", &plain, "32M"]);
    with_backing("qcow2", "extended_l2=on")(&dir);
    let start = std::time::Instant::now();
    let mut rng = Rng(77);
    for round in 0..12 {
        let image = if round % 2 == 0 {
            plain.clone()
        } else {
            dir.s("img.qcow2")
        };
        let sock = dir.s("nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let a = args(&[
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=q,discard=unmap,file.driver=file,file.filename={image}"
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={sock}"),
            "--export",
            "type=nbd,id=e,node-name=q,writable=on",
        ]);
        let mut d = Daemon::spawn(Which::Rsd, &a);
        assert!(
            wait_for_path(&dir.path("nbd.sock"), 10),
            "round {round}: {}",
            d.stderr_text()
        );
        let (cmds, _) = workload(rng.next(), 65536, true);
        let mut argv = vec!["-f".to_string(), "raw".into()];
        for c in cmds.iter().cycle().take(400) {
            argv.extend(["-c".into(), c.replace("write -P", "aio_write -P")]);
        }
        argv.push(format!("nbd+unix:///q?socket={sock}"));
        let mut io = Command::new("qemu-io")
            .args(&argv)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-io");
        std::thread::sleep(std::time::Duration::from_millis(30 + rng.below(250)));
        d.signal(9);
        let _ = d.wait_exit(10);
        let _ = io.kill();
        let _ = io.wait();
        let check = run("qemu-img", &["check", &image]);
        let text = String::from_utf8_lossy(&check.stdout).into_owned()
            + &String::from_utf8_lossy(&check.stderr);
        assert!(
            matches!(check.status.code(), Some(0) | Some(3)) && !text.contains("ERROR"),
            "round {round}: {text}"
        );
        eprintln!(
            "round {round}: check exit {:?}: {}",
            check.status.code(),
            text.lines().next().unwrap_or("")
        );
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(120));
}

/// A backing chain that loops (directly or through another image) is an
/// error at open, and says so.
#[test]
fn backing_chain_loops_are_errors() {
    let dir = TempDir::new();
    let (a, b, me) = (dir.s("a.qcow2"), dir.s("b.qcow2"), dir.s("self.qcow2"));
    img(&dir, &["create", "-q", "-f", "qcow2", &a, "1M"]);
    img(
        &dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", &a, "-F", "qcow2", &b, "1M",
        ],
    );
    img(&dir, &["rebase", "-u", "-b", &b, "-F", "qcow2", &a]);
    img(&dir, &["create", "-q", "-f", "qcow2", &me, "1M"]);
    img(&dir, &["rebase", "-u", "-b", &me, "-F", "qcow2", &me]);
    for image in [&b, &me] {
        let spec = format!("driver=qcow2,node-name=q,file.driver=file,file.filename={image}");
        let out = run_to_end(Which::Rsd, &["--blockdev", &spec], 10);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("Backing file '{image}' creates an infinite loop.")),
            "{err}"
        );
    }
}

/// Four clients at once (each on its own connection and thread) write
/// interleaved stripes, so they allocate the same clusters and fill the
/// same subclusters concurrently; the image stays clean and holds every
/// stripe.
#[test]
fn concurrent_writers_share_clusters_safely() {
    for (opts, stripe) in [("", 4096u64), ("extended_l2=on", 1024)] {
        let dir = TempDir::new();
        with_backing("qcow2", opts)(&dir);
        let image = dir.s("img.qcow2");
        let reference = dir.s("ref.raw");
        ok(&run(
            "qemu-img",
            &["convert", "-O", "raw", &image, &reference],
        ));
        let s = serve(&dir, "");
        let span = 3u64 << 20;
        // All four started before any is waited for.
        let writers: Vec<std::process::Child> = (0..4u64)
            .map(|w| {
                let mut argv = vec!["-f".to_string(), "raw".to_string()];
                let mut off = w * stripe + (1 << 20);
                while off < (1 << 20) + span {
                    argv.extend(["-c".into(), format!("write -P {} {off} {stripe}", 0x10 + w)]);
                    off += 4 * stripe;
                }
                argv.push(s.url.clone());
                Command::new("qemu-io")
                    .args(&argv)
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .expect("qemu-io")
            })
            .collect();
        for w in writers {
            let out = w.wait_with_output().expect("qemu-io");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && !text.contains("failed"),
                "{opts}: {text}"
            );
        }
        s.quit();
        // The same stripes, one after the other, on the raw reference.
        for w in 0..4u64 {
            let mut cmds = Vec::new();
            let mut off = w * stripe + (1 << 20);
            while off < (1 << 20) + span {
                cmds.push(format!("write -P {} {off} {stripe}", 0x10 + w));
                off += 4 * stripe;
            }
            qemu_io("raw", &reference, &cmds);
        }
        let check = run("qemu-img", &["check", &image]);
        assert!(
            check.status.success(),
            "{opts}: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        ok(&run(
            "qemu-img",
            &["compare", "-F", "raw", &image, &reference],
        ));
    }
}

/// With discard=unmap, clusters freed by discards and unmapping zeroes
/// are punched out of the file (QEMU's pass-discard-request default):
/// the file keeps little more than what is left, with the same map and
/// image end as QSD's.
#[test]
fn discard_gives_the_space_back_as_qsd() {
    let mut seen = Vec::new();
    for which in Which::all() {
        let dir = TempDir::new();
        let image = dir.s("img.qcow2");
        img(&dir, &["create", "-q", "-f", "qcow2", &image, "16M"]);
        let sock = dir.s("nbd.sock");
        let a = args(&[
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=q,discard=unmap,file.driver=file,file.filename={image}"
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={sock}"),
            "--export",
            "type=nbd,id=e,node-name=q,writable=on",
            "--pidfile",
            &dir.s("p.pid"),
        ]);
        let mut d = Daemon::spawn(which, &a);
        assert!(wait_for_path(&dir.path("p.pid"), 10));
        let url = format!("nbd+unix:///q?socket={sock}");
        let before = std::fs::metadata(&image)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
            .unwrap_or(0);
        qemu_io(
            "raw",
            &url,
            &[
                "write -P 1 0 4M".into(),
                "discard 0 2M".into(),
                "write -z -u 2M 1M".into(),
            ],
        );
        d.signal(15);
        assert_eq!(d.wait_exit(10), Some(0));
        let info: serde_json::Value =
            serde_json::from_str(&ok(&run("qemu-img", &["info", "--output=json", &image])))
                .expect("json");
        let map = ok(&run("qemu-img", &["map", "--output=json", &image]));
        let check = ok(&run("qemu-img", &["check", &image]));
        let size = info["actual-size"].as_u64().unwrap_or(0);
        assert!(
            size < 2 << 20,
            "{which:?}: {size} bytes allocated (was {} blocks)",
            before
        );
        // The allocated size itself may differ by a filesystem block.
        seen.push((map, check.lines().last().unwrap_or_default().to_string()));
    }
    if seen.len() == 2 {
        assert_eq!(seen[0], seen[1]);
    }
}

/// An NBD client on export `q` at `path`, which can exist a moment
/// before the server listens on it.
fn nbd_connect(path: &std::path::Path) -> Nbd {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Nbd::connect(path, "q") {
            Ok(c) => return c,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                assert!(std::time::Instant::now() < deadline, "connect: {e}");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
}

/// What the crash test's writer saw: writes known durable (acknowledged
/// before a flush that then completed, or FUA), as (offset, length,
/// pattern byte), and how many flushes completed.
#[derive(Default)]
struct Durable {
    writes: Vec<(u64, usize, u8)>,
    flushes: usize,
}

/// Writes slots of the disk in random order (never one twice), 8 requests
/// in flight, every 11th request a flush and every 13th write with FUA,
/// until the server goes away.
fn crash_writer(
    sock: std::path::PathBuf,
    seed: u64,
    slot: u64,
    slots: u64,
    seen: std::sync::Arc<std::sync::Mutex<Durable>>,
) {
    use std::io::Write;
    let mut c = nbd_connect(&sock);
    let mut rng = Rng(seed);
    let mut order: Vec<u64> = (0..slots).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    // cookie -> (offset, length, pattern, fua) of writes in flight;
    // flushes in flight carry the acknowledged writes they cover.
    let mut writes = std::collections::HashMap::new();
    let mut flushes: std::collections::HashMap<u64, Vec<(u64, usize, u8)>> =
        std::collections::HashMap::new();
    let mut acked: Vec<(u64, usize, u8)> = Vec::new();
    let mut next = 0usize;
    let mut cookie = 0u64;
    loop {
        while writes.len() + flushes.len() < 8 && next < order.len() {
            cookie += 1;
            if cookie.is_multiple_of(11) {
                let flush = nbd_wire::request(nbd_wire::CMD_FLUSH, 0, cookie, 0, 0);
                if c.s.write_all(&flush).is_err() {
                    return;
                }
                flushes.insert(cookie, acked.clone());
                continue;
            }
            let off = order[next] * slot;
            next += 1;
            let len = (slot - rng.below(slot / 2)) as usize & !511;
            let pat = 1 + (cookie % 251) as u8;
            let fua = cookie.is_multiple_of(13);
            let flags = if fua { nbd_wire::FLAG_FUA } else { 0 };
            let write = nbd_wire::write_request(flags, cookie, off, &vec![pat; len]);
            if c.s.write_all(&write).is_err() {
                return;
            }
            writes.insert(cookie, (off, len, pat, fua));
        }
        // Ends once the server is gone; a reply that is not one fails.
        let (err, k) = match nbd_wire::simple_reply(&mut c.s) {
            Ok(r) => r,
            Err(e) => {
                assert_ne!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
                return;
            }
        };
        assert_eq!(err, 0, "request {k} failed");
        if let Some((off, len, pat, fua)) = writes.remove(&k) {
            acked.push((off, len, pat));
            if fua {
                if let Ok(mut d) = seen.lock() {
                    d.writes.push((off, len, pat));
                }
            }
        } else if let Some(covered) = flushes.remove(&k) {
            if let Ok(mut d) = seen.lock() {
                d.writes.extend(covered);
                d.flushes += 1;
            }
        }
        if next == order.len() && writes.is_empty() && flushes.is_empty() {
            return;
        }
    }
}

/// SIGKILL during allocating writes with flushes in between, 50 times:
/// every image is clean or only leaks clusters, and every write
/// acknowledged before the last completed flush (or with FUA) reads back
/// intact. Rounds cycle through 64k clusters, 4k clusters (more metadata:
/// L2 tables and refcount blocks are created as the writes go) and
/// extended L2 entries (writes share subclusters).
#[test]
fn sigkill_after_flushes_keeps_flushed_writes() {
    let dir = TempDir::new();
    let start = std::time::Instant::now();
    let mut rng = Rng(4242);
    let size: u64 = 16 << 20;
    let mut leaked_rounds = 0;
    for round in 0..50u64 {
        let opts =
            ["cluster_size=65536", "cluster_size=4096", "extended_l2=on"][round as usize % 3];
        let image = dir.s("crash.qcow2");
        let _ = std::fs::remove_file(&image);
        img(
            &dir,
            &["create", "-q", "-f", "qcow2", "-o", opts, &image, "16M"],
        );
        let sock = dir.path("crash.sock");
        let _ = std::fs::remove_file(&sock);
        let a = args(&[
            "--blockdev",
            &format!("driver=qcow2,node-name=q,file.driver=file,file.filename={image}"),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            "type=nbd,id=e,node-name=q,writable=on",
        ]);
        let mut d = Daemon::spawn(Which::Rsd, &a);
        assert!(
            wait_for_path(&sock, 10),
            "round {round}: {}",
            d.stderr_text()
        );
        // Slots of 12k (not cluster aligned: writes share and cross
        // clusters); each write fills most of its slot.
        let slot = 12 << 10;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Durable::default()));
        let writer = {
            let (sock, seen, seed) = (sock.clone(), seen.clone(), rng.next());
            std::thread::spawn(move || crash_writer(sock, seed, slot, size / slot, seen))
        };
        // Killed once some flushes completed, while writes go on.
        let want = 1 + rng.below(3) as usize;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while seen.lock().map(|s| s.flushes).unwrap_or(0) < want
            && !writer.is_finished()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        d.signal(9);
        let _ = d.child.wait();
        writer.join().expect("writer");
        let durable = std::mem::take(&mut *seen.lock().expect("seen"));
        assert!(
            durable.flushes >= want,
            "round {round}: only {} flushes completed",
            durable.flushes
        );
        let check = run("qemu-img", &["check", &image]);
        let text = String::from_utf8_lossy(&check.stdout).into_owned()
            + &String::from_utf8_lossy(&check.stderr);
        assert!(
            matches!(check.status.code(), Some(0) | Some(3)) && !text.contains("ERROR"),
            "round {round} ({opts}): {text}"
        );
        if check.status.code() == Some(3) {
            leaked_rounds += 1;
        }
        let raw = dir.s("crash.raw");
        ok(&run("qemu-img", &["convert", "-O", "raw", &image, &raw]));
        let data = std::fs::read(&raw).expect("raw");
        for (off, len, pat) in &durable.writes {
            let got = &data[*off as usize..*off as usize + len];
            assert!(
                got.iter().all(|b| b == pat),
                "round {round} ({opts}): flushed write of {len} bytes at {off} lost"
            );
        }
    }
    eprintln!(
        "50 rounds, {leaked_rounds} with leaked clusters, {:?}",
        start.elapsed()
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(120));
}

/// One write through a fresh NBD connection, acknowledged, with no
/// flush (qemu-io would flush when it closes).
fn write_unflushed(sock: &std::path::Path, offset: u64, data: &[u8]) {
    nbd_connect(sock).write(offset, data).expect("write");
}

/// qemu-io reading the image beside the running daemon (shared, read
/// only): does `off len` hold pattern `pat`?
fn image_holds(image: &str, pat: u8, off: u64, len: u64) -> bool {
    let out = run(
        "qemu-io",
        &[
            "-r",
            "-U",
            "-f",
            "qcow2",
            "-c",
            &format!("read -P {pat} {off} {len}"),
            image,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("fail") && !text.contains("error")
}

/// cache-clean-interval writes dirty metadata back by itself: an
/// acknowledged, unflushed allocating write becomes visible in the file.
#[test]
fn cache_clean_interval_writes_metadata_back() {
    let dir = TempDir::new();
    let image = dir.s("img.qcow2");
    img(&dir, &["create", "-q", "-f", "qcow2", &image, "16M"]);
    let s = serve(&dir, ",cache-clean-interval=1");
    write_unflushed(&dir.path("nbd.sock"), 5 << 20, &[0x5a; 65536]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !image_holds(&image, 0x5a, 5 << 20, 65536) {
        assert!(
            std::time::Instant::now() < deadline,
            "the write never reached the file"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    s.quit();
    let check = run("qemu-img", &["check", &image]);
    assert_eq!(check.status.code(), Some(0));
}

/// blockdev-del writes the node's cached metadata back before it lets
/// the image go: the unflushed write is in the file, which is clean.
#[test]
fn blockdev_del_writes_metadata_back() {
    let dir = TempDir::new();
    let image = dir.s("img.qcow2");
    img(&dir, &["create", "-q", "-f", "qcow2", &image, "16M"]);
    let s = serve(&dir, "");
    write_unflushed(&dir.path("nbd.sock"), 3 << 20, &[0x6b; 70000]);
    let mut q = Qmp::ready(&s.qmp);
    // The export may still see its client for a moment, then it goes
    // away while the node is still in use: both are retried.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for cmd in [
        r#"{"execute": "block-export-del", "arguments": {"id": "e"}}"#,
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "q"}}"#,
    ] {
        loop {
            let r = q.cmd(cmd);
            if r.get("return").is_some() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{r}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let check = run("qemu-img", &["check", &image]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    qemu_io(
        "qcow2",
        &image,
        &["read -P 0x6b 3M 70000".into(), "read -P 0 0 3M".into()],
    );
    drop(q);
    s.quit();
}

/// The header's dirty bit (incompatible bit 0) in the file.
fn dirty_bit(image: &str) -> bool {
    let b = std::fs::read(image).expect("image");
    b[79] & 1 != 0
}

/// lazy-refcounts (the image's bit, or the option on an image without
/// it): the dirty bit is set once metadata is written back and cleared
/// on a clean shutdown; after a SIGKILL the image is left dirty, and rsd
/// repairs it on open with every flushed write intact.
#[test]
fn lazy_refcounts_keep_the_dirty_bit_until_close() {
    for (create, extra) in [("lazy_refcounts=on", ""), ("", ",lazy-refcounts=on")] {
        let dir = TempDir::new();
        let image = dir.s("img.qcow2");
        let mut a = vec!["create", "-q", "-f", "qcow2"];
        if !create.is_empty() {
            a.extend(["-o", create]);
        }
        a.extend([image.as_str(), "16M"]);
        img(&dir, &a);
        let s = serve(&dir, extra);
        qemu_io("raw", &s.url, &["write -P 7 0 1M".into()]);
        assert!(dirty_bit(&image), "{create}{extra}: dirty while open");
        s.quit();
        assert!(!dirty_bit(&image), "{create}{extra}: clean after quit");
        assert_eq!(run("qemu-img", &["check", &image]).status.code(), Some(0));
        // Killed: dirty, then repaired when opened read-write.
        let _ = std::fs::remove_file(dir.path("p.pid"));
        let s = serve(&dir, extra);
        qemu_io("raw", &s.url, &["write -P 8 2M 300k".into()]);
        let mut d = s.daemon;
        d.signal(9);
        let _ = d.child.wait();
        assert!(dirty_bit(&image), "{create}{extra}: dirty after a crash");
        // What the killed daemon left behind.
        let _ = std::fs::remove_file(dir.path("p.pid"));
        let _ = std::fs::remove_file(dir.path("nbd.sock"));
        let _ = std::fs::remove_file(dir.path("q.sock"));
        let s = serve(&dir, extra);
        qemu_io(
            "raw",
            &s.url,
            &["read -P 7 0 1M".into(), "read -P 8 2M 300k".into()],
        );
        s.quit();
        let check = run("qemu-img", &["check", &image]);
        assert_eq!(
            check.status.code(),
            Some(0),
            "{create}{extra}: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
}

/// Small caches (two L2 tables, four refcount blocks, 4k clusters, so
/// hundreds of tables): dirty tables are written back when the cache
/// overflows, and the image still matches the raw reference.
#[test]
fn small_caches_write_back_on_overflow() {
    exercise_with(
        made("cluster_size=4096"),
        4096,
        true,
        23,
        ",l2-cache-size=8192,refcount-cache-size=16384",
    );
}

/// QSD's checks of the cache options, with its messages.
#[test]
fn cache_options_are_checked_as_qsd() {
    let dir = TempDir::new();
    let image = dir.s("img.qcow2");
    img(&dir, &["create", "-q", "-f", "qcow2", &image, "16M"]);
    let v2 = dir.s("v2.qcow2");
    img(
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            &v2,
            "16M",
        ],
    );
    let cases = [
        (&image, "cache-size=1048576,l2-cache-size=2097152"),
        (
            &image,
            "cache-size=1048576,l2-cache-size=65536,refcount-cache-size=65536",
        ),
        (&image, "cache-size=65536,refcount-cache-size=131072"),
        (&image, "l2-cache-entry-size=1000"),
        (&image, "cache-clean-interval=5000000000"),
        (&v2, "lazy-refcounts=on"),
    ];
    for (file, opt) in cases {
        let spec = format!("driver=qcow2,node-name=q,file.driver=file,file.filename={file},{opt}");
        let mut seen = Vec::new();
        for which in Which::all() {
            let out = run_to_end(which, &["--blockdev", &spec], 10);
            let err = String::from_utf8_lossy(&out.stderr).replacen(which.prog(), "PROG", 1);
            assert_eq!(out.status.code(), Some(1), "{which:?} {opt}: {err}");
            seen.push(err);
        }
        if seen.len() == 2 {
            assert_eq!(seen[0], seen[1], "{opt}");
        }
    }
}

/// A FUA write into a cluster that an earlier, unflushed write allocated
/// is stable when acknowledged, mapping included: after a SIGKILL right
/// after its reply both writes read back (the FUA flushed the cached L2
/// entry the earlier write made).
#[test]
fn fua_write_in_place_makes_its_mapping_stable() {
    let dir = TempDir::new();
    let image = dir.s("img.qcow2");
    img(&dir, &["create", "-q", "-f", "qcow2", &image, "16M"]);
    let s = serve(&dir, "");
    let mut c = nbd_connect(&dir.path("nbd.sock"));
    c.write(1 << 20, &[0x11; 4096]).expect("write");
    // NBD_CMD_FLAG_FUA on a write that lands in place.
    let (cmd, fua) = (nbd_wire::CMD_WRITE, nbd_wire::FLAG_FUA);
    c.request(cmd, fua, (1 << 20) + 8192, 4096, &[0x22; 4096])
        .expect("FUA write");
    let mut d = s.daemon;
    d.signal(9);
    let _ = d.child.wait();
    let check = run("qemu-img", &["check", &image]);
    assert!(matches!(check.status.code(), Some(0) | Some(3)));
    qemu_io(
        "qcow2",
        &image,
        &[
            "read -P 0x11 1M 4k".into(),
            "read -P 0x22 1056768 4k".into(),
        ],
    );
}
