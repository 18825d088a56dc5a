//! External snapshots under live NBD I/O (blockdev-snapshot-sync and
//! blockdev-snapshot), checked with qemu-img, and their errors against
//! qemu-storage-daemon.
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::nbd_wire::Nbd;
use crate::common::*;

const BLOCK: u64 = 64 << 10;
const BLOCKS: u64 = 256;

/// An NBD client that writes block i with byte (i % 250) + 1
/// at i * BLOCK, one at a time, until told to stop; returns how many
/// writes were acknowledged.
fn writer(sock: std::path::PathBuf, stop: Arc<AtomicUsize>, acked: Arc<AtomicUsize>) -> u64 {
    let mut c = Nbd::connect(&sock, "base").expect("connect");
    let mut i = 0u64;
    while i < BLOCKS && stop.load(Ordering::SeqCst) == 0 {
        let data = vec![(i % 250) as u8 + 1; BLOCK as usize];
        if let Err(e) = c.write(i * BLOCK, &data) {
            panic!("write {i} failed: {e}");
        }
        i += 1;
        acked.store(i as usize, Ordering::SeqCst);
    }
    i
}

/// Starts `writer` on a thread and waits (up to 20 s) until it has 20
/// writes acknowledged: (stop flag, acknowledged count, the thread).
fn start_writer(
    sock: std::path::PathBuf,
) -> (
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    std::thread::JoinHandle<u64>,
) {
    let (stop, acked) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let w = {
        let (stop, acked) = (stop.clone(), acked.clone());
        std::thread::spawn(move || writer(sock, stop, acked))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while acked.load(Ordering::SeqCst) < 20 {
        assert!(std::time::Instant::now() < deadline, "writer stalled");
        std::thread::yield_now();
    }
    (stop, acked, w)
}

/// Reads `image` (with its backing chain) into memory with qemu-img.
fn contents(dir: &TempDir, image: &str) -> Vec<u8> {
    let out = dir.s("flat.raw");
    ok(&run(
        "qemu-img",
        &["convert", "-U", "-O", "raw", image, &out],
    ));
    std::fs::read(&out).expect("read")
}

fn block_byte(data: &[u8], i: u64) -> Option<u8> {
    let b = &data[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
    b.iter().all(|x| *x == b[0]).then_some(b[0])
}

/// blockdev-snapshot-sync while an NBD client keeps writing: every
/// acknowledged write is in the overlay's view, the base holds exactly a
/// prefix of the writes (none after the switch), both images check
/// clean, and the overlay's header names the base as it was given.
#[test]
fn snapshot_sync_under_live_writes_loses_nothing() {
    let dir = TempDir::new();
    let base = dir.s("base.qcow2");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &base, "16M"],
    ));
    // Given with a detour: the header must keep the name as given.
    let given = format!("{}/sub/../base.qcow2", dir.0.display());
    std::fs::create_dir(dir.path("sub")).expect("mkdir");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=qcow2,node-name=base,file.driver=file,file.filename={given}"),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
        "--export",
        "type=nbd,id=e,node-name=base,writable=on",
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let (stop, acked, w) = start_writer(dir.path("n.sock"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ov = dir.s("ov.qcow2");
    let before = acked.load(Ordering::SeqCst) as u64;
    let r = q.cmd(&format!(
        r#"{{"execute":"blockdev-snapshot-sync","arguments":{{"node-name":"base","snapshot-file":"{ov}","snapshot-node-name":"ov"}}}}"#
    ));
    assert_eq!(r, serde_json::json!({"return": {}}));
    let after = acked.load(Ordering::SeqCst) as u64;
    while acked.load(Ordering::SeqCst) < (after + 20).min(BLOCKS as usize as u64) as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "writer stalled after the switch"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(1, Ordering::SeqCst);
    let written = w.join().expect("writer");
    let exports = q.cmd(r#"{"execute":"query-block-exports"}"#);
    assert_eq!(exports["return"][0]["node-name"], "ov", "{exports}");
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(10), Some(0));
    for img in [&base, &ov] {
        ok(&run("qemu-img", &["check", img]));
    }
    let info = ok(&run("qemu-img", &["info", "--output=json", &ov]));
    let info: serde_json::Value = serde_json::from_str(&info).expect("json");
    assert_eq!(info["backing-filename"], given.as_str(), "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    // The overlay's view: every acknowledged write, zeroes after.
    let view = contents(&dir, &ov);
    for i in 0..BLOCKS {
        let want = if i < written { (i % 250) as u8 + 1 } else { 0 };
        assert_eq!(block_byte(&view, i), Some(want), "overlay view, block {i}");
    }
    // The base: a prefix of the writes, including all acknowledged
    // before the command and none started after its reply (the one
    // write in flight during the switch finishes on the base).
    let old = contents(&dir, &base);
    let k = (0..BLOCKS)
        .take_while(|i| block_byte(&old, *i) == Some((*i % 250) as u8 + 1))
        .count() as u64;
    assert!(
        k >= before && k <= after,
        "base holds {k} writes ({before}..={after})"
    );
    for i in k..BLOCKS {
        assert_eq!(
            block_byte(&old, i),
            Some(0),
            "base block {i} written after the switch"
        );
    }
}

/// blockdev-snapshot with an overlay added beforehand (backing: null):
/// the export moves to it, reads see the base's data, writes land in the
/// overlay, and its header is left as it was.
#[test]
fn blockdev_snapshot_puts_an_added_overlay_in_place() {
    let dir = TempDir::new();
    let base = dir.s("base.qcow2");
    let ov = dir.s("ov.qcow2");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &base, "4M"],
    ));
    ok(&run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 1M", &base],
    ));
    for which in Which::all() {
        ok(&run(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &ov,
            ],
        ));
        let mut a = monitor_args(&dir.s("q.sock"));
        a.extend(args(&[
            "--blockdev",
            &format!("driver=qcow2,node-name=base,file.driver=file,file.filename={base}"),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
            "--export",
            "type=nbd,id=e,node-name=base,name=disk,writable=on",
        ]));
        let mut d = Daemon::spawn(which, &a);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let r = q.cmd(&format!(
            r#"{{"execute":"blockdev-add","arguments":{{"driver":"qcow2","node-name":"ov","file":{{"driver":"file","filename":"{ov}"}},"backing":null}}}}"#
        ));
        assert_eq!(r, serde_json::json!({"return": {}}), "{which:?}");
        let r =
            q.cmd(r#"{"execute":"blockdev-snapshot","arguments":{"node":"base","overlay":"ov"}}"#);
        assert_eq!(r, serde_json::json!({"return": {}}), "{which:?}");
        let url = format!("nbd+unix:///disk?socket={}", dir.s("n.sock"));
        let out = ok(&run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0x11 0 1M",
                "-c",
                "write -P 0x22 1M 64k",
                &url,
            ],
        ));
        assert!(!out.contains("failed"), "{which:?}: {out}");
        let exports = q.cmd(r#"{"execute":"query-block-exports"}"#);
        assert_eq!(exports["return"][0]["node-name"], "ov", "{which:?}");
        // The base is left read-only, its file too.
        let nodes = q.cmd(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#);
        let ro: Vec<(String, bool)> = nodes["return"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| {
                (
                    n["file"].as_str().unwrap_or_default().to_string(),
                    n["ro"] == true,
                )
            })
            .collect();
        for (file, ro) in &ro {
            assert_eq!(*ro, file.ends_with("base.qcow2"), "{which:?}: {ro:?}");
        }
        let info = run("qemu-img", &["info", &base]);
        assert!(info.status.success(), "{which:?}: base locked for readers");
        q.send(br#"{"execute":"quit"}"#);
        assert_eq!(d.wait_exit(10), Some(0), "{which:?}");
        let out = ok(&run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0x22 1M 64k",
                "-c",
                "read -P 0x11 0 1M",
                &ov,
            ],
        ));
        assert!(!out.contains("failed"), "{which:?}: {out}");
        let out = ok(&run(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0 1M 64k", &base],
        ));
        assert!(
            !out.contains("failed"),
            "{which:?}: base was written: {out}"
        );
    }
}

/// The errors of both commands, byte for byte as QSD's.
#[test]
fn snapshot_errors_match_qsd() {
    let setup = |d: &TempDir| {
        for f in ["base.qcow2", "o2.qcow2"] {
            ok(&run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", &d.s(f), "1M"],
            ));
        }
    };
    let sync =
        |args: &str| format!(r#"{{"execute":"blockdev-snapshot-sync","arguments":{{{args}}}}}"#);
    let steps = [
        sync(r#""node-name":"nope","snapshot-file":"$D/x.qcow2","snapshot-node-name":"x""#),
        sync(r#""device":"base","snapshot-file":"$D/x.qcow2","snapshot-node-name":"x""#),
        sync(r#""node-name":"base","snapshot-file":"$D/x.qcow2""#),
        sync(r#""node-name":"base","snapshot-file":"$D/x.qcow2","snapshot-node-name":"base""#),
        sync(
            r#""node-name":"base","snapshot-file":"$D/x.qcow2","snapshot-node-name":"x","format":"raw""#,
        ),
        sync(
            r#""node-name":"base","snapshot-file":"/nonexistent/dir/x.qcow2","snapshot-node-name":"x""#,
        ),
        sync(
            r#""node-name":"base","snapshot-file":"$D/missing.qcow2","snapshot-node-name":"x","mode":"existing""#,
        ),
        sync(r#""node-name":"base","snapshot-file":"$D/base.qcow2","snapshot-node-name":"x""#),
        r#"{"execute":"blockdev-snapshot","arguments":{"node":"nope","overlay":"o2"}}"#.into(),
        r#"{"execute":"blockdev-snapshot","arguments":{"node":"base","overlay":"nope"}}"#.into(),
        r#"{"execute":"blockdev-snapshot","arguments":{"node":"base","overlay":"base"}}"#.into(),
        r#"{"execute":"blockdev-snapshot","arguments":{"node":"base","overlay":"o2file"}}"#.into(),
        r#"{"execute":"blockdev-snapshot","arguments":{"node":"base","overlay":"o2"}}"#.into(),
        r#"{"execute":"blockdev-snapshot","arguments":{"node":"base","overlay":"o2"}}"#.into(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = same_on_both(
        &setup,
        &[
            "--blockdev",
            "driver=qcow2,node-name=base,file.driver=file,file.filename=$D/base.qcow2",
            "--blockdev",
            "driver=file,node-name=o2file,filename=$D/o2.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=o2,file=o2file,backing=",
        ],
        &steps,
    )
    .expect("daemons start");
    assert!(
        out[0].contains("Cannot find device='' nor node-name='nope'"),
        "{out:?}"
    );
    assert!(out[2].contains("New overlay node-name missing"), "{out:?}");
    assert!(out[12].contains(r#"{"return": {}}"#), "{out:?}");
    assert!(
        out[13].contains("is busy: node is used as backing hd of 'o2'"),
        "{out:?}"
    );
}

/// A relative base filename goes into the overlay header as given.
#[test]
fn a_relative_base_name_is_written_as_given() {
    let dir = TempDir::new();
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &dir.s("base.qcow2"), "1M"],
    ));
    let child = Command::new(rsd_bin())
        .current_dir(&dir.0)
        .args([
            "--blockdev",
            "driver=qcow2,node-name=base,file.driver=file,file.filename=base.qcow2",
            "--chardev",
            "socket,path=q.sock,server=on,wait=off,id=c",
            "--monitor",
            "chardev=c",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut d = Daemon {
        child,
        which: Which::Rsd,
    };
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let r = q.cmd(r#"{"execute":"blockdev-snapshot-sync","arguments":{"node-name":"base","snapshot-file":"ov.qcow2","snapshot-node-name":"ov"}}"#);
    assert_eq!(r, serde_json::json!({"return": {}}));
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(10), Some(0));
    let info = ok(&run(
        "qemu-img",
        &["info", "--output=json", &dir.s("ov.qcow2")],
    ));
    let info: serde_json::Value = serde_json::from_str(&info).expect("json");
    assert_eq!(info["backing-filename"], "base.qcow2", "{info}");
}

/// x-blockdev-change, which QEMU implements for quorum only: its errors
/// for the drivers rsd has, byte for byte as QSD's.
#[test]
fn x_blockdev_change_errors_match_qsd() {
    let setup = |d: &TempDir| {
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &d.s("base.qcow2"), "1M"],
        ));
    };
    let change =
        |args: &str| format!(r#"{{"execute":"x-blockdev-change","arguments":{{{args}}}}}"#);
    let steps = [
        change(r#""parent":"nope","node":"bf""#),
        change(r#""parent":"base","child":"file","node":"bf""#),
        change(r#""parent":"base""#),
        change(r#""parent":"base","child":"bogus""#),
        change(r#""parent":"base","child":"file""#),
        change(r#""parent":"base","node":"nope""#),
        change(r#""parent":"base","node":"bf""#),
        change(r#""parent":"bf","child":"file""#),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = same_on_both(
        &setup,
        &[
            "--blockdev",
            "driver=file,node-name=bf,filename=$D/base.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=base,file=bf",
        ],
        &steps,
    )
    .expect("daemons start");
    assert!(
        out[4].contains("The node base does not support removing a child"),
        "{out:?}"
    );
}

/// base.qcow2 (1M) and ov.qcow2 over it, in `d`.
fn make_chain(d: &TempDir) {
    let base = d.s("base.qcow2");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &base, "1M"],
    ));
    ok(&run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            &base,
            &d.s("ov.qcow2"),
        ],
    ));
}

/// change-backing-file: QSD's errors, and the header it writes (the new
/// name with the backing node's format; "" removes both) while the open
/// chain keeps serving.
#[test]
fn change_backing_file_as_qsd() {
    let setup = |d: &TempDir| {
        make_chain(d);
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &d.s("lone.qcow2"), "1M"],
        ));
    };
    let change =
        |args: &str| format!(r#"{{"execute":"change-backing-file","arguments":{{{args}}}}}"#);
    let steps = [
        change(r#""device":"nope","image-node-name":"ov","backing-file":"x""#),
        change(r#""device":"base","image-node-name":"ov","backing-file":"x""#),
        change(r#""device":"ov","image-node-name":"nope","backing-file":"x""#),
        change(r#""device":"ov","image-node-name":"base","backing-file":"x""#),
        change(r#""device":"lone","image-node-name":"ov","backing-file":"x""#),
        change(r#""device":"ov","image-node-name":"ov","backing-file":"renamed.qcow2""#),
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.into(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let extra = [
        "--blockdev",
        "driver=qcow2,node-name=base,file.driver=file,file.filename=$D/base.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=ov,file.driver=file,file.filename=$D/ov.qcow2,backing=base",
        "--blockdev",
        "driver=qcow2,node-name=lone,file.driver=file,file.filename=$D/lone.qcow2",
    ];
    let out = same_on_both(&setup, &extra, &steps).expect("daemons start");
    assert!(out[1].contains("Need a root block node"), "{out:?}");
    assert!(out[5].contains(r#"{"return": {}}"#), "{out:?}");
    // The header each daemon wrote, and the removal.
    for which in Which::all() {
        let dir = TempDir::new();
        setup(&dir);
        let d = dir.0.display().to_string();
        let mut a = monitor_args(&dir.s("q.sock"));
        a.extend(extra.iter().map(|s| s.replace("$D", &d)));
        let mut dmn = Daemon::spawn(which, &a);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let r = q.cmd(&change(
            r#""device":"ov","image-node-name":"ov","backing-file":"renamed.qcow2""#,
        ));
        assert_eq!(r, serde_json::json!({"return": {}}), "{which:?}");
        let info = ok(&run(
            "qemu-img",
            &["info", "-U", "--output=json", &dir.s("ov.qcow2")],
        ));
        let info: serde_json::Value = serde_json::from_str(&info).expect("json");
        assert_eq!(
            info["backing-filename"], "renamed.qcow2",
            "{which:?}: {info}"
        );
        assert_eq!(
            info["backing-filename-format"], "qcow2",
            "{which:?}: {info}"
        );
        let r = q.cmd(&change(
            r#""device":"ov","image-node-name":"ov","backing-file":"""#,
        ));
        assert_eq!(r, serde_json::json!({"return": {}}), "{which:?}");
        q.send(br#"{"execute":"quit"}"#);
        assert_eq!(dmn.wait_exit(10), Some(0), "{which:?}");
        let info = ok(&run(
            "qemu-img",
            &["info", "--output=json", &dir.s("ov.qcow2")],
        ));
        let info: serde_json::Value = serde_json::from_str(&info).expect("json");
        assert!(info.get("backing-filename").is_none(), "{which:?}: {info}");
        ok(&run("qemu-img", &["check", &dir.s("ov.qcow2")]));
    }
}

/// blockdev-reopen as QSD does it: read-only on and off, discard and
/// detect-zeroes, the backing node dropped and set again, its errors in
/// QSD's words, and all or nothing across the listed nodes.
#[test]
fn blockdev_reopen_matches_qsd() {
    let setup = |d: &TempDir| {
        make_chain(d);
    };
    let ov = |extra: &str| {
        format!(
            r#"{{"execute":"blockdev-reopen","arguments":{{"options":[{{"driver":"qcow2","node-name":"ov","file":{{"driver":"file","filename":"$D/ov.qcow2"}}{extra}}}]}}}}"#
        )
    };
    let base_ro = r#"{"driver":"qcow2","node-name":"base","file":{"driver":"file","filename":"$D/base.qcow2"},"read-only":true}"#;
    let nodes = r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.to_string();
    let steps = [
        ov(r#","backing":"base","read-only":true"#),
        nodes.clone(),
        ov(r#","backing":"base""#),
        ov(r#","backing":"base","discard":"unmap","detect-zeroes":"unmap""#),
        nodes.clone(),
        ov(""),
        ov(r#","backing":"base","driver":"raw""#).replace(r#""driver":"qcow2","#, ""),
        r#"{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"qcow2","node-name":"ov","file":{"driver":"file","filename":"$D/base.qcow2"},"backing":"base"}]}}"#.into(),
        r#"{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"qcow2","node-name":"nope","file":"x"}]}}"#.into(),
        ov(r#","backing":"ov""#),
        ov(r#","backing":"base","force-share":true,"read-only":true"#),
        format!(
            r#"{{"execute":"blockdev-reopen","arguments":{{"options":[{base_ro},{{"driver":"raw","node-name":"ov","file":"x"}}]}}}}"#
        ),
        nodes.clone(),
        ov(r#","backing":null"#),
        nodes.clone(),
        ov(r#","backing":"base""#),
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"ov","writable":true}}"#.into(),
        ov(r#","backing":"base","read-only":true"#),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let extra = [
        "--blockdev",
        "driver=qcow2,node-name=base,file.driver=file,file.filename=$D/base.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=ov,file.driver=file,file.filename=$D/ov.qcow2,backing=base",
        "--nbd-server",
        "addr.type=unix,addr.path=$D/n.sock",
    ];
    let out = same_on_both(&setup, &extra, &steps).expect("daemons start");
    assert!(out[0].contains(r#"{"return": {}}"#), "{out:?}");
    assert!(out[5].contains("backing is missing for 'ov'"), "{out:?}");
    assert!(
        out[17].contains("cannot support read-write users"),
        "{out:?}"
    );
}

/// Reopening read-only and back moves the image locks as in QSD: while
/// read-write, `qemu-img info` cannot open the image; read-only, it can,
/// and a writer still cannot; read-write again, writes through NBD land.
#[test]
fn reopen_read_only_moves_the_image_locks_as_in_qsd() {
    for which in Which::all() {
        let dir = TempDir::new();
        let img = dir.s("img.qcow2");
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &img, "1M"],
        ));
        let mut a = monitor_args(&dir.s("q.sock"));
        a.extend(args(&[
            "--blockdev",
            &format!("driver=qcow2,node-name=n,file.driver=file,file.filename={img}"),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
        ]));
        let mut d = Daemon::spawn(which, &a);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let reopen = |ro: bool| {
            format!(
                r#"{{"execute":"blockdev-reopen","arguments":{{"options":[{{"driver":"qcow2","node-name":"n","file":{{"driver":"file","filename":"{img}"}},"read-only":{ro}}}]}}}}"#
            )
        };
        let info_ok = || run("qemu-img", &["info", &img]).status.success();
        let write_ok = || {
            run("qemu-io", &["-f", "qcow2", "-c", "write 0 4k", &img])
                .status
                .success()
        };
        assert!(!info_ok(), "{which:?}: info while read-write");
        assert_eq!(
            q.cmd(&reopen(true)),
            serde_json::json!({"return": {}}),
            "{which:?}"
        );
        assert!(info_ok(), "{which:?}: info while read-only");
        assert!(!write_ok(), "{which:?}: a writer while read-only");
        assert_eq!(
            q.cmd(&reopen(false)),
            serde_json::json!({"return": {}}),
            "{which:?}"
        );
        assert!(!info_ok(), "{which:?}: info after read-write again");
        let r = q.cmd(r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"n","writable":true}}"#);
        assert_eq!(r, serde_json::json!({"return": {}}), "{which:?}");
        let url = format!("nbd+unix:///n?socket={}", dir.s("n.sock"));
        let out = ok(&run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x44 64k 64k", &url],
        ));
        assert!(!out.contains("failed"), "{which:?}: {out}");
        q.send(br#"{"execute":"quit"}"#);
        assert_eq!(d.wait_exit(10), Some(0), "{which:?}");
        ok(&run("qemu-img", &["check", &img]));
        let out = ok(&run(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x44 64k 64k", &img],
        ));
        assert!(!out.contains("failed"), "{which:?}: {out}");
    }
}

/// The times in SnapshotInfo (date and VM clock) differ from run to run.
fn mask_times(line: &str) -> String {
    [
        "\"date-sec\": ",
        "\"date-nsec\": ",
        "\"vm-clock-sec\": ",
        "\"vm-clock-nsec\": ",
    ]
    .iter()
    .fold(line.to_string(), |l, key| mask_digits_after(&l, key))
}

/// blockdev-snapshot-internal-sync and -delete-internal-sync: replies,
/// errors and the snapshot list in query-named-block-nodes as QSD gives
/// them.
#[test]
fn internal_snapshots_match_qsd() {
    let setup = |d: &TempDir| {
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &d.s("a.qcow2"), "4M"],
        ));
        ok(&run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x11 0 1M", &d.s("a.qcow2")],
        ));
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "raw", &d.s("b.raw"), "4M"],
        ));
    };
    let make = |dev: &str, name: &str| {
        format!(
            r#"{{"execute":"blockdev-snapshot-internal-sync","arguments":{{"device":"{dev}","name":"{name}"}}}}"#
        )
    };
    let del = |args: &str| {
        format!(r#"{{"execute":"blockdev-snapshot-delete-internal-sync","arguments":{{{args}}}}}"#)
    };
    let steps = [
        make("a", "s1"),
        make("a", "s1"),
        make("a", ""),
        make("nope", "s2"),
        make("b", "s2"),
        make("braw", "s2"),
        make("ro", "s2"),
        make("a", "s2"),
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.to_string(),
        del(r#""device":"a","name":"zz""#),
        del(r#""device":"a""#),
        del(r#""device":"braw","name":"s1""#),
        del(r#""device":"b","name":"s1""#),
        del(r#""device":"a","id":"1","name":"s2""#),
        del(r#""device":"a","id":"1""#),
        del(r#""device":"a","name":"s1""#),
        make("a", "s3"),
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.to_string(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let extra = [
        "--blockdev",
        "driver=qcow2,node-name=a,file.driver=file,file.filename=$D/a.qcow2",
        "--blockdev",
        "driver=file,node-name=b,filename=$D/b.raw",
        "--blockdev",
        "driver=raw,node-name=braw,file=b",
        "--blockdev",
        "driver=qcow2,node-name=ro,read-only=on,file.driver=file,file.filename=$D/a.qcow2,file.locking=off",
    ];
    let mut all = Vec::new();
    for which in Which::all() {
        let out = scenario(which, &setup, &extra, &steps).expect("daemon starts");
        all.push(out.iter().map(|l| mask_times(l)).collect::<Vec<_>>());
    }
    let rsd = &all[0];
    assert!(
        rsd[1].contains("Snapshot with name 's1' already exists on device 'a'"),
        "{rsd:#?}"
    );
    assert!(
        rsd[8].contains(r#""name": "s2""#) && rsd[8].contains(r#""id": "2""#),
        "{rsd:#?}"
    );
    assert!(rsd[14].contains(r#""id": "1""#), "{rsd:#?}");
    assert!(rsd[17].contains(r#""id": "3""#), "{rsd:#?}");
    if all.len() == 2 {
        for (i, (a, b)) in all[0].iter().zip(&all[1]).enumerate() {
            assert_eq!(a, b, "step {i}: {}", steps[i]);
        }
    }
}

/// Internal snapshots made and deleted by rsd while a client writes over
/// NBD: `qemu-img check` finds the image clean (nothing leaked), and
/// `qemu-img snapshot` lists and restores what rsd wrote; a snapshot
/// qemu-img made is deleted cleanly too.
#[test]
fn internal_snapshots_are_what_qemu_img_reads() {
    let dir = TempDir::new();
    let img = dir.s("a.qcow2");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img, "8M"],
    ));
    ok(&run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 4M", &img],
    ));
    ok(&run("qemu-img", &["snapshot", "-c", "s0", &img]));
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=qcow2,node-name=a,file.driver=file,file.filename={img}"),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
        "--export",
        "type=nbd,id=e,node-name=a,writable=on",
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let url = format!("nbd+unix:///a?socket={}", dir.s("n.sock"));
    let io = |cmds: &[&str]| {
        let mut argv = vec!["-f", "raw"];
        for c in cmds {
            argv.extend(["-c", c]);
        }
        argv.push(&url);
        let out = ok(&run("qemu-io", &argv));
        assert!(!out.contains("fail"), "{out}");
    };
    let cmd = |q: &mut Qmp, s: &str| {
        let r = q.cmd(s);
        assert!(r.get("return").is_some(), "{s}: {r}");
        r
    };
    cmd(
        &mut q,
        r#"{"execute":"blockdev-snapshot-internal-sync","arguments":{"device":"a","name":"s1"}}"#,
    );
    io(&["write -P 0x22 0 2M", "write -P 0x33 6M 1M"]);
    cmd(
        &mut q,
        r#"{"execute":"blockdev-snapshot-internal-sync","arguments":{"device":"a","name":"s2"}}"#,
    );
    io(&[
        "write -P 0x44 1M 1M",
        "read -P 0x22 0 1M",
        "read -P 0x11 2M 2M",
    ]);
    let r = cmd(
        &mut q,
        r#"{"execute":"blockdev-snapshot-delete-internal-sync","arguments":{"device":"a","name":"s1"}}"#,
    );
    assert_eq!(r["return"]["name"], "s1", "{r}");
    let r = cmd(
        &mut q,
        r#"{"execute":"blockdev-snapshot-delete-internal-sync","arguments":{"device":"a","name":"s0"}}"#,
    );
    assert_eq!(r["return"]["id"], "1", "{r}");
    io(&[
        "write -P 0x55 7M 64k",
        "read -P 0x44 1M 1M",
        "read -P 0x33 6M 1M",
    ]);
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0));
    let check = run("qemu-img", &["check", &img]);
    let text = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(check.status.success(), "{text}");
    assert!(text.contains("No errors were found"), "{text}");
    assert!(!text.contains("leaked"), "{text}");
    let list = ok(&run("qemu-img", &["snapshot", "-l", &img]));
    assert!(list.contains("s2"), "{list}");
    assert!(!list.contains("s1") && !list.contains("s0"), "{list}");
    let now = ok(&run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x22 0 1M",
            "-c",
            "read -P 0x44 1M 1M",
            "-c",
            "read -P 0x11 2M 2M",
            "-c",
            "read -P 0x33 6M 1M",
            "-c",
            "read -P 0x55 7M 64k",
            &img,
        ],
    ));
    assert!(!now.contains("fail"), "{now}");
    ok(&run("qemu-img", &["snapshot", "-a", "s2", &img]));
    let then = ok(&run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x22 0 2M",
            "-c",
            "read -P 0x11 2M 2M",
            "-c",
            "read -P 0x33 6M 1M",
            "-c",
            "read -P 0 7M 64k",
            &img,
        ],
    ));
    assert!(!then.contains("fail"), "{then}");
    let check = run("qemu-img", &["check", &img]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// `transaction` with snapshot actions: all or nothing (an abort or a
/// failing action takes back the internal snapshots before it), its
/// errors, and the result, as QSD gives them.
#[test]
fn snapshot_transactions_match_qsd() {
    let setup = |d: &TempDir| {
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &d.s("s.qcow2"), "4M"],
        ));
    };
    let tx = |actions: &str, props: &str| {
        format!(r#"{{"execute":"transaction","arguments":{{"actions":[{actions}]{props}}}}}"#)
    };
    let internal = |name: &str| {
        format!(
            r#"{{"type":"blockdev-snapshot-internal-sync","data":{{"device":"s","name":"{name}"}}}}"#
        )
    };
    let steps = [
        tx(
            &format!(r#"{},{{"type":"abort","data":{{}}}}"#, internal("a")),
            "",
        ),
        tx(&format!("{},{}", internal("a"), internal("a")), ""),
        tx("", ""),
        tx(
            &internal("b"),
            r#","properties":{"completion-mode":"grouped"}"#,
        ),
        tx(
            &format!(
                r#"{},{{"type":"blockdev-snapshot-sync","data":{{"node-name":"s","snapshot-file":"$D/ov.qcow2","snapshot-node-name":"ov"}}}}"#,
                internal("c")
            ),
            "",
        ),
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.to_string(),
        tx(r#"{"type":"nope","data":{}}"#, ""),
        tx(r#"{"type":"abort"}"#, ""),
        tx(
            r#"{"type":"blockdev-snapshot-sync","data":{"node-name":"ov","snapshot-file":"$D/ov2.qcow2","snapshot-node-name":"ov2"}},{"type":"abort","data":{}}"#,
            "",
        ),
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.to_string(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let extra = [
        "--blockdev",
        "driver=qcow2,node-name=s,file.driver=file,file.filename=$D/s.qcow2",
        "--nbd-server",
        "addr.type=unix,addr.path=$D/n.sock",
        "--export",
        "type=nbd,id=e,node-name=s",
    ];
    let mut all = Vec::new();
    for which in Which::all() {
        let out = scenario(which, &setup, &extra, &steps).expect("daemon starts");
        all.push(out.iter().map(|l| mask_times(l)).collect::<Vec<_>>());
    }
    let rsd = &all[0];
    assert!(
        rsd[0].contains("Transaction aborted using Abort action"),
        "{rsd:#?}"
    );
    assert!(
        rsd[5].contains(r#""name": "c""#) && !rsd[5].contains(r#""name": "a""#),
        "{rsd:#?}"
    );
    assert!(rsd[5].contains(r#""node-name": "ov""#), "{rsd:#?}");
    assert!(!rsd[9].contains(r#""node-name": "ov2""#), "{rsd:#?}");
    if all.len() == 2 {
        for (i, (a, b)) in all[0].iter().zip(&all[1]).enumerate() {
            assert_eq!(a, b, "step {i}: {}", steps[i]);
        }
    }
}

/// blockdev-snapshot-internal-sync while an NBD client keeps writing:
/// the image checks clean, the active view has every acknowledged
/// write, and the snapshot holds exactly a prefix of them (all
/// acknowledged before the command, none started after its reply).
#[test]
fn internal_snapshot_under_live_writes_loses_nothing() {
    let dir = TempDir::new();
    let img = dir.s("base.qcow2");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img, "16M"],
    ));
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=qcow2,node-name=base,file.driver=file,file.filename={img}"),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
        "--export",
        "type=nbd,id=e,node-name=base,writable=on",
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let (stop, acked, w) = start_writer(dir.path("n.sock"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let before = acked.load(Ordering::SeqCst) as u64;
    let r = q.cmd(r#"{"execute":"blockdev-snapshot-internal-sync","arguments":{"device":"base","name":"s1"}}"#);
    assert_eq!(r, serde_json::json!({"return": {}}));
    let after = acked.load(Ordering::SeqCst) as u64;
    while acked.load(Ordering::SeqCst) < (after + 20).min(BLOCKS) as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "writer stalled after the snapshot"
        );
        std::thread::yield_now();
    }
    stop.store(1, Ordering::SeqCst);
    let written = w.join().expect("writer");
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(10), Some(0));
    let check = ok(&run("qemu-img", &["check", &img]));
    assert!(check.contains("No errors were found"), "{check}");
    let view = contents(&dir, &img);
    for i in 0..BLOCKS {
        let want = if i < written { (i % 250) as u8 + 1 } else { 0 };
        assert_eq!(block_byte(&view, i), Some(want), "active view, block {i}");
    }
    let snap = dir.s("snap.raw");
    ok(&run(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-l",
            "snapshot.name=s1",
            "-O",
            "raw",
            &img,
            &snap,
        ],
    ));
    let old = std::fs::read(&snap).expect("read");
    let k = (0..BLOCKS)
        .take_while(|i| block_byte(&old, *i) == Some((*i % 250) as u8 + 1))
        .count() as u64;
    assert!(
        k >= before && k <= after,
        "snapshot holds {k} writes ({before}..={after})"
    );
    for i in k..BLOCKS {
        assert_eq!(
            block_byte(&old, i),
            Some(0),
            "snapshot block {i} written after it"
        );
    }
}
