//! Block nodes: blockdev-add/del, the queries, block_resize and image
//! locking, compared with qemu-storage-daemon on the same scenarios.
use std::process::Command;

use crate::common::*;

/// The images every scenario here starts with.
fn images(dir: &TempDir) {
    qemu_img_create(&dir.path("disk.img"), "16M");
    qemu_img_create(&dir.path("small.img"), "1M");
    std::fs::create_dir(dir.path("dir")).expect("dir");
}

fn same(extra: &[&str], steps: &[&str]) -> Result<Vec<String>, String> {
    same_on_both(&images, extra, steps)
}

const QUERIES: &[&str] = &[
    r#"{"execute": "query-named-block-nodes"}"#,
    r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#,
    r#"{"execute": "query-block"}"#,
    r#"{"execute": "x-debug-query-block-graph"}"#,
    r#"{"execute": "query-blockstats"}"#,
];

#[test]
fn node_queries_match_qsd_for_each_driver_and_option() {
    let setups: &[&[&str]] = &[
        &["--blockdev", "driver=file,node-name=disk,filename=$D/disk.img"],
        &["--blockdev", "driver=file,node-name=disk,filename=$D/disk.img", "--blockdev", "driver=raw,node-name=fmt,file=disk"],
        &["--blockdev", "driver=raw,node-name=fmt,file.driver=file,file.filename=$D/disk.img"],
        &["--blockdev", r#"{"driver":"raw","node-name":"fmt","file":{"driver":"file","filename":"$D/disk.img"}}"#],
        &["--blockdev", "driver=null-co,node-name=n0", "--blockdev", "driver=null-co,node-name=n1,size=1048576,read-zeroes=on", "--blockdev", "driver=null-aio,node-name=n2,latency-ns=1000"],
        &["--blockdev", "driver=file,node-name=disk,filename=$D/disk.img,read-only=on"],
        &["--blockdev", "driver=file,node-name=disk,filename=$D/disk.img,cache.direct=on,cache.no-flush=on"],
        &["--blockdev", "driver=file,node-name=disk,filename=$D/disk.img,discard=unmap,detect-zeroes=unmap"],
        &["--blockdev", "driver=file,node-name=disk,filename=$D/disk.img,detect-zeroes=on,locking=off,aio=io_uring"],
        &["--blockdev", "driver=file,node-name=disk,filename=$D/disk.img,force-share=on,read-only=on,auto-read-only=on"],
        &["--blockdev", "driver=file,node-name=disk,filename=$D/disk.img", "--blockdev", "driver=raw,node-name=fmt,file=disk,offset=4096,size=1048576"],
        &["--blockdev", "driver=file,node-name=disk,filename=$D/disk.img", "--blockdev", "driver=raw,node-name=fmt,file=disk,offset=4096"],
        &["--blockdev", "driver=host_device,node-name=disk,filename=/dev/null"],
    ];
    for s in setups {
        let r = same(s, QUERIES).expect("starts");
        assert_eq!(r[2], "{\"return\": []}\r\n");
        assert!(r[0].contains("\"node-name\": "), "{}", r[0]);
    }
    let r = same(setups[1], QUERIES).expect("file+raw");
    assert!(r[3].contains(r#""perm": [], "child": 1"#), "{}", r[3]);
}

#[test]
fn open_errors_match_qsd() {
    let cases: &[&[&str]] = &[
        &[
            "--blockdev",
            "driver=file,node-name=f,filename=$D/nonexist.img",
        ],
        &["--blockdev", "driver=file,node-name=f,filename=$D/dir"],
        &["--blockdev", "driver=file,node-name=f,filename=/dev/null"],
        &[
            "--blockdev",
            "driver=host_device,node-name=f,filename=$D/disk.img",
        ],
        &[
            "--blockdev",
            "driver=file,node-name=f,filename=$D/disk.img,aio=native",
        ],
        &[
            "--blockdev",
            "driver=file,node-name=f,filename=$D/disk.img,force-share=on",
        ],
        &[
            "--blockdev",
            "driver=file,node-name=f,filename=$D/disk.img,detect-zeroes=unmap",
        ],
        &[
            "--blockdev",
            "driver=file,node-name=1bad!,filename=$D/disk.img",
        ],
        &[
            "--blockdev",
            "driver=null-co,node-name=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ],
        &[
            "--blockdev",
            "driver=null-co,node-name=n",
            "--blockdev",
            "driver=null-co,node-name=n",
        ],
        &["--blockdev", "driver=raw,node-name=r,file=nonode"],
        &[
            "--blockdev",
            "driver=file,node-name=f,filename=$D/small.img",
            "--blockdev",
            "driver=raw,node-name=r,file=f,offset=2097152",
        ],
        &[
            "--blockdev",
            "driver=file,node-name=f,filename=$D/small.img",
            "--blockdev",
            "driver=raw,node-name=r,file=f,size=1000",
        ],
        &[
            "--blockdev",
            "driver=file,node-name=f,filename=$D/small.img",
            "--blockdev",
            "driver=raw,node-name=r,file=f,offset=524288,size=1048576",
        ],
    ];
    for c in cases {
        let r = same(c, &[]);
        let err = r.expect_err("must fail");
        assert!(err.starts_with("exit 1: : --blockdev "), "{c:?}: {err}");
    }
}

#[test]
fn blockdev_add_del_over_qmp_match_qsd() {
    let steps = [
        r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "disk", "filename": "$D/disk.img"}}"#,
        r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "disk", "filename": "$D/disk.img"}}"#,
        r##"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "#x"}}"##,
        r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": ""}}"#,
        r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co"}}"#,
        r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": "nosuch"}}"#,
        r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r"}}"#,
        r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r1", "file": "disk"}}"#,
        r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r2", "file": "disk"}}"#,
        r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r3", "file": {"driver": "file", "filename": "$D/small.img", "node-name": "inl"}}}"#,
        r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r4", "file": {"driver": "file", "filename": "$D/nonexist.img"}}}"#,
        r#"{"execute": "x-debug-query-block-graph"}"#,
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "disk"}}"#,
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "inl"}}"#,
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "nope"}}"#,
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "r3"}}"#,
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "r1"}}"#,
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "r2"}}"#,
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "disk"}}"#,
        r#"{"execute": "query-named-block-nodes"}"#,
        r#"{"execute": "x-debug-query-block-graph"}"#,
    ];
    let r = same(&[], &steps).expect("runs");
    assert_eq!(r[0], "{\"return\": {}}\r\n");
    assert!(r[1].contains("Duplicate nodes with node-name='disk'"));
    assert!(r[12].contains("Block device disk is in use"), "{}", r[12]);
    assert!(
        r[13].contains("Node inl is not owned by the monitor"),
        "{}",
        r[13]
    );
    assert_eq!(r[19], "{\"return\": []}\r\n", "nothing left behind");
}

#[test]
fn block_resize_matches_qsd_in_queries_and_on_disk() {
    let steps = [
        r#"{"execute": "block_resize", "arguments": {"node-name": "f1", "size": 33554432}}"#,
        r#"{"execute": "block_resize", "arguments": {"node-name": "raw2", "size": 1000001}}"#,
        r#"{"execute": "query-named-block-nodes"}"#,
        r#"{"execute": "block_resize", "arguments": {"node-name": "f2", "size": 2097152}}"#,
        r#"{"execute": "query-named-block-nodes"}"#,
        r#"{"execute": "block_resize", "arguments": {"node-name": "raw3", "size": 2097152}}"#,
        r#"{"execute": "block_resize", "arguments": {"node-name": "raw3o", "size": 33554432}}"#,
        r#"{"execute": "block_resize", "arguments": {"node-name": "n0", "size": 2097152}}"#,
        r#"{"execute": "block_resize", "arguments": {"node-name": "nosuch", "size": 1048576}}"#,
        r#"{"execute": "block_resize", "arguments": {"node-name": "f1", "size": -1}}"#,
        r#"{"execute": "block_resize", "arguments": {"device": "f1", "size": 1048576}}"#,
        r#"{"execute": "block_resize", "arguments": {"node-name": "ro", "size": 2097152}}"#,
        r#"{"execute": "block_resize", "arguments": {"node-name": "f1", "size": 0}}"#,
    ];
    let extra = [
        "--blockdev",
        "driver=file,node-name=f1,filename=$D/disk.img",
        "--blockdev",
        "driver=file,node-name=f2,filename=$D/small.img",
        "--blockdev",
        "driver=raw,node-name=raw2,file=f2",
        "--blockdev",
        "driver=file,node-name=f3,filename=$D/r3.img",
        "--blockdev",
        "driver=raw,node-name=raw3,file=f3,size=1048576",
        "--blockdev",
        "driver=raw,node-name=raw3o,file=f3,offset=4096",
        "--blockdev",
        "driver=null-co,node-name=n0",
        "--blockdev",
        "driver=file,node-name=ro,filename=$D/ro.img,read-only=on",
    ];
    let steps_all = steps;
    let mut results = Vec::new();
    for which in Which::all() {
        let dir = TempDir::new();
        qemu_img_create(&dir.path("disk.img"), "16M");
        qemu_img_create(&dir.path("small.img"), "1M");
        qemu_img_create(&dir.path("r3.img"), "16M");
        qemu_img_create(&dir.path("ro.img"), "1M");
        let d = dir.0.display().to_string();
        let mut a = monitor_args(&dir.s("q.sock"));
        a.extend(extra.iter().map(|s| s.replace("$D", &d)));
        a.extend(args(&["--pidfile", &dir.s("p.pid")]));
        let _daemon = Daemon::spawn(which, &a);
        assert!(wait_for_path(&dir.path("p.pid"), 10), "{which:?} start-up");
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let mut out = Vec::new();
        for s in &steps_all {
            q.send(s.as_bytes());
            out.push(mask(&q.line(), &dir));
        }
        let disk_len = std::fs::metadata(dir.path("disk.img")).expect("disk").len();
        let small_len = std::fs::metadata(dir.path("small.img"))
            .expect("small")
            .len();
        q.send(br#"{"execute": "quit"}"#);
        results.push((which, out, disk_len, small_len));
    }
    let (_, r, disk_len, small_len) = &results[0];
    assert_eq!(*disk_len, 0, "resized to 0 at the end");
    assert_eq!(*small_len, 2097152);
    assert!(r[2].contains(r#""virtual-size": 1000448"#), "{}", r[2]);
    assert!(r[5].contains("Permission conflict on node"), "{}", r[5]);
    assert!(
        r[7].contains("Image format driver does not support resize"),
        "{}",
        r[7]
    );
    assert!(r[11].contains("Image is read-only"), "{}", r[11]);
    for (which, o, dl, sl) in &results[1..] {
        assert_eq!((dl, sl), (disk_len, small_len), "{which:?} file sizes");
        for (i, (a, b)) in r.iter().zip(o.iter()).enumerate() {
            assert_eq!(a, b, "{which:?} step {i}: {}", steps_all[i]);
        }
    }
}

/// Runs `block_resize` on a fresh daemon's file node over `image`.
fn resize_over(which: Which, image: &std::path::Path, locking: &str) -> String {
    let dir = TempDir::new();
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!(
            "driver=file,node-name=f,filename={},locking={locking}",
            image.display()
        ),
        "--pidfile",
        &dir.s("p.pid"),
    ]));
    let _d = Daemon::spawn(which, &a);
    assert!(wait_for_path(&dir.path("p.pid"), 10), "{which:?} start-up");
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let r =
        q.cmd(r#"{"execute": "block_resize", "arguments": {"node-name": "f", "size": 33554432}}"#);
    q.send(br#"{"execute": "quit"}"#);
    r.to_string()
}

#[test]
fn locks_interoperate_with_qemu_processes() {
    if !std::path::Path::new(QSD).exists() {
        eprintln!("skipping: {QSD} missing");
        return;
    }
    let dir = TempDir::new();
    let img = dir.path("held.img");
    qemu_img_create(&img, "16M");
    // QSD holds the image with a writable export: it uses write and
    // refuses to share resize (lock bytes 100-101 and 203).
    let holder = args(&[
        "--blockdev",
        &format!("driver=file,node-name=disk,filename={}", img.display()),
        "--blockdev",
        "driver=raw,node-name=fmt,file=disk",
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("nbd.sock")),
        "--export",
        "type=nbd,id=e,node-name=fmt,writable=on",
        "--pidfile",
        &dir.s("holder.pid"),
    ]);
    let _qsd = Daemon::spawn(Which::Qsd, &holder);
    assert!(wait_for_path(&dir.path("holder.pid"), 10));
    let refused = r#"{"error":{"class":"GenericError","desc":"Failed to get \"resize\" lock"}}"#;
    assert_eq!(resize_over(Which::Qsd, &img, "auto"), refused);
    assert_eq!(resize_over(Which::Rsd, &img, "auto"), refused);
    // Opening the held (raw) image as qcow2 reports the lock, not the
    // format: QEMU takes the file's locks before it reads the header.
    for ro in ["off", "on"] {
        let opt = format!(
            "driver=qcow2,node-name=q,read-only={ro},file.driver=file,file.filename={}",
            img.display()
        );
        let stderr = |which: Which| {
            let out = run_to_end(which, &["--blockdev", &opt], 10);
            assert!(!out.status.success(), "{which:?} opened a held image");
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            err.replacen(which.prog(), "PROG", 1)
        };
        // The message, then QEMU's hint line naming the image.
        let qsd = stderr(Which::Qsd);
        assert!(
            qsd.contains("lock\nIs another process using the image"),
            "{qsd}"
        );
        assert_eq!(stderr(Which::Rsd), qsd);
    }
    // locking=off skips the locks in both.
    assert_eq!(resize_over(Which::Rsd, &img, "off"), r#"{"return":{}}"#);
    assert_eq!(std::fs::metadata(&img).expect("img").len(), 33554432);

    // A qemu-io writer on a raw image shares everything: both daemons may
    // open and resize it, as QEMU allows.
    let img2 = dir.path("io.img");
    qemu_img_create(&img2, "16M");
    let mut io = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(&img2)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(resize_over(Which::Rsd, &img2, "auto"), r#"{"return":{}}"#);
    let _ = io.kill();
    let _ = io.wait();
}

#[test]
fn rsd_respects_a_qemu_io_qcow2_holder() {
    // qemu-io holding a qcow2 image unshares write and resize on the file
    // (lock bytes 201 and 203): resizing it from rsd must fail as in QSD.
    let dir = TempDir::new();
    let img = dir.path("q.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let mut io = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let refused = r#"{"error":{"class":"GenericError","desc":"Failed to get \"resize\" lock"}}"#;
    assert_eq!(resize_over(Which::Rsd, &img, "auto"), refused);
    if std::path::Path::new(QSD).exists() {
        assert_eq!(resize_over(Which::Qsd, &img, "auto"), refused);
    }
    let _ = io.kill();
    let _ = io.wait();
}

/// Error precedence and wording that QSD users see first: block_resize
/// looks the node up before checking the size, a missing backing node is
/// reported as a backing file that could not be opened, nbd-server-start
/// over inet reports resolution and port-in-use failures in QEMU's
/// words, and block-export-add checks the export id before anything.
#[test]
fn first_errors_match_qsd() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let start_on = format!(
        r#"{{"execute":"nbd-server-start","arguments":{{"addr":{{"type":"inet","data":{{"host":"127.0.0.1","port":"{port}"}}}}}}}}"#
    );
    let steps = [
        r#"{"execute":"block_resize","arguments":{"node-name":"x","size":-1}}"#,
        r#"{"execute":"block_resize","arguments":{"device":"x","size":-5}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q","file":"f","backing":"nosuch"}}"#,
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"inet","data":{"host":"nosuch.invalid","port":"10809"}}}}"#,
        &start_on,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"","node-name":"f"}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"1bad","node-name":"f"}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"a b","node-name":"nosuch"}}"#,
    ];
    let setup = |d: &TempDir| {
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &d.s("b.qcow2"), "1M"],
        ));
    };
    let out = same_on_both(
        &setup,
        &["--blockdev", "driver=file,node-name=f,filename=$D/b.qcow2"],
        &steps,
    )
    .expect("daemons start");
    assert!(
        out[0].contains("Cannot find device='' nor node-name='x'"),
        "{out:?}"
    );
    assert!(
        out[2].contains("Could not open backing file: Cannot find device='nosuch'"),
        "{out:?}"
    );
    assert!(
        out[3].contains("address resolution failed for nosuch.invalid:10809: "),
        "{out:?}"
    );
    assert!(
        out[4].contains("Failed to find an available port: Address already in use"),
        "{out:?}"
    );
    assert!(
        out[5..]
            .iter()
            .all(|l| l.contains("Invalid block export id")),
        "{out:?}"
    );
    drop(busy);
}

/// block-set-write-threshold on both daemons: the one-shot event when an
/// NBD client's write first reaches past the offset, the threshold then
/// off, and the errors.
#[test]
fn write_threshold_event_matches_qsd() {
    let mut seen = Vec::new();
    for which in Which::all() {
        let dir = TempDir::new();
        qemu_img_create(&dir.path("img"), "4M");
        let mut a = monitor_args(&dir.s("q.sock"));
        a.extend(args(&[
            "--blockdev",
            &format!("driver=file,node-name=disk,filename={}", dir.s("img")),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
            "--export",
            "type=nbd,id=e,node-name=disk,writable=on",
        ]));
        let _d = Daemon::spawn(which, &a);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let mut out = Vec::new();
        for c in [
            r#"{"execute":"block-set-write-threshold","arguments":{"node-name":"nosuch","write-threshold":1}}"#,
            r#"{"execute":"block-set-write-threshold","arguments":{"node-name":"disk","write-threshold":1048576}}"#,
        ] {
            out.push(q.cmd(c).to_string());
        }
        let url = format!("nbd+unix:///disk?socket={}", dir.s("n.sock"));
        ok(&run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write 0 64k",
                "-c",
                "write 1M 64k",
                "-c",
                "write 2M 64k",
                &url,
            ],
        ));
        let mut ev: serde_json::Value = serde_json::from_str(&q.line()).expect("event");
        if let Some(o) = ev.as_object_mut() {
            o.remove("timestamp");
        }
        out.push(ev.to_string());
        let r = q.cmd(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#);
        out.push(r["return"][0]["write_threshold"].to_string());
        q.send(br#"{"execute":"quit"}"#);
        seen.push(out);
    }
    assert_eq!(
        seen[0][2],
        r#"{"data":{"node-name":"disk","write-threshold":1048576,"amount-exceeded":65536},"event":"BLOCK_WRITE_THRESHOLD"}"#
    );
    assert_eq!(seen[0][3], "0");
    if seen.len() == 2 {
        assert_eq!(seen[0], seen[1]);
    }
}
