//! blockdev-backup against qemu-storage-daemon (the transcript with
//! auto-finalize and auto-dismiss off), and under a live NBD client: the
//! target holds the source as it was when the job started.

use crate::common::*;
use crate::jobs::{count, same_transcripts};

fn images(d: &TempDir) {
    make_image(&d.s("src.qcow2"), "qcow2", "16M", Some((0x11, "4M")));
    make_image(&d.s("bk.qcow2"), "qcow2", "16M", None);
}

#[test]
fn backup_with_manual_finalize_matches_qsd() {
    let steps = [
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"src","file":{"driver":"file","filename":"$D/src.qcow2"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"bk","file":{"driver":"file","filename":"$D/bk.qcow2"}}}"#,
        r#"{"execute":"blockdev-backup","arguments":{"device":"src","target":"bk","sync":"full"}}"#,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"b1","device":"src","target":"bk","sync":"full","auto-finalize":false,"auto-dismiss":false}}"#,
        "until BLOCK_JOB_PENDING",
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"job-finalize","arguments":{"id":"b1"}}"#,
        r#"{"execute":"job-dismiss","arguments":{"id":"b1"}}"#,
    ];
    let out = same_transcripts(&images, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_COMPLETED""#), 1);
}

/// A slow backup while a client overwrites the whole disk: the target
/// reads as the source did at the start (0x11 over 4 MiB, zeroes after),
/// the source has the new data.
#[test]
fn backup_keeps_the_point_in_time_under_live_writes() {
    let dir = TempDir::new();
    images(&dir);
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!(
            "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
            dir.s("src.qcow2")
        ),
        "--blockdev",
        &format!(
            "driver=qcow2,node-name=bk,file.driver=file,file.filename={}",
            dir.s("bk.qcow2")
        ),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
        "--export",
        "type=nbd,id=e,node-name=src,writable=on",
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let r = q.cmd(
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"b","device":"src","target":"bk","sync":"full","speed":4194304}}"#,
    );
    assert!(r.get("return").is_some(), "{r}");
    let url = format!("nbd+unix:///src?socket={}", dir.s("n.sock"));
    let cmds: Vec<String> = (0..16u64)
        .map(|m| format!("write -P 0x77 {}M 1M", (m * 7) % 16))
        .collect();
    let mut argv = vec!["-f", "raw"];
    for c in &cmds {
        argv.extend(["-c", c.as_str()]);
    }
    argv.push(&url);
    ok(&run("qemu-io", &argv));
    wait_no_jobs(&mut q);
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0));
    let check = |img: &str, cmds: &[String]| {
        let mut argv = vec!["-f", "qcow2"];
        for c in cmds {
            argv.extend(["-c", c.as_str()]);
        }
        argv.push(img);
        let out = run("qemu-io", &argv);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(!text.contains("fail"), "{img}: {text}");
    };
    check(
        &dir.s("bk.qcow2"),
        &["read -P 0x11 0 4M".into(), "read -P 0 4M 12M".into()],
    );
    check(&dir.s("src.qcow2"), &["read -P 0x77 0 16M".into()]);
    for img in ["src.qcow2", "bk.qcow2"] {
        ok(&run("qemu-img", &["check", &dir.s(img)]));
    }
}

/// A chain: base (0x11 over 8 MiB) under top (0x22 at 2 MiB, zeroes at
/// 5 MiB), and a target full of 0x33.
fn chain(d: &TempDir) {
    let img = |n: &str| d.s(&format!("{n}.qcow2"));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img("base"), "16M"],
    ));
    ok(&run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 8M", &img("base")],
    ));
    ok(&run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &img("base"),
            "-F",
            "qcow2",
            &img("top"),
        ],
    ));
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 2M 1M",
            "-c",
            "write -z 5M 1M",
            &img("top"),
        ],
    ));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img("bk"), "16M"],
    ));
    ok(&run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x33 0 16M", &img("bk")],
    ));
}

const ADD_TOP: &str = r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"src","file":{"driver":"file","filename":"$D/top.qcow2"}}}"#;
const ADD_BK: &str = r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"bk","file":{"driver":"file","filename":"$D/bk.qcow2"}}}"#;

/// qemu-io commands against an image or URL; every read must verify.
fn verify(fmt: &str, target: &str, cmds: &[&str]) {
    let mut argv = vec!["-f", fmt];
    if target.starts_with("nbd") {
        argv.push("-r");
    }
    for c in cmds {
        argv.extend(["-c", c]);
    }
    argv.push(target);
    let out = ok(&run("qemu-io", &argv));
    assert!(
        !out.contains("fail") && out.matches("read ").count() == cmds.len(),
        "{target}: {out}"
    );
}

#[test]
fn sync_top_over_a_backing_chain_matches_qsd() {
    let steps = [
        ADD_TOP,
        ADD_BK,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"b1","device":"src","target":"bk","sync":"top","auto-finalize":false,"auto-dismiss":false}}"#,
        "until BLOCK_JOB_PENDING",
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"job-finalize","arguments":{"id":"b1"}}"#,
        r#"{"execute":"job-dismiss","arguments":{"id":"b1"}}"#,
    ];
    let out = same_transcripts(&chain, &steps);
    // Only what the top allocates: 1 MiB of data and 1 MiB of zeroes.
    assert_eq!(count(&out, r#""len":2097152,"offset":2097152"#), 2);
}

/// sync=top leaves the target's other clusters as they were.
#[test]
fn sync_top_copies_only_the_top_layer() {
    for which in Which::all() {
        let dir = TempDir::new();
        chain(&dir);
        let mut a = monitor_args(&dir.s("q.sock"));
        a.extend(args(&[
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
                dir.s("top.qcow2")
            ),
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=bk,file.driver=file,file.filename={}",
                dir.s("bk.qcow2")
            ),
        ]));
        let mut d = Daemon::spawn(which, &a);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let r = q.cmd(
            r#"{"execute":"blockdev-backup","arguments":{"job-id":"b","device":"src","target":"bk","sync":"top"}}"#,
        );
        assert!(r.get("return").is_some(), "{which:?}: {r}");
        wait_no_jobs(&mut q);
        q.send(br#"{"execute":"quit"}"#);
        assert_eq!(d.wait_exit(20), Some(0));
        verify(
            "qcow2",
            &dir.s("bk.qcow2"),
            &[
                "read -P 0x33 0 2M",
                "read -P 0x22 2M 1M",
                "read -P 0x33 3M 2M",
                "read -P 0 5M 1M",
                "read -P 0x33 6M 10M",
            ],
        );
        ok(&run("qemu-img", &["check", &dir.s("bk.qcow2")]));
    }
}

#[test]
fn sync_none_runs_until_cancelled_as_in_qsd() {
    let steps = [
        ADD_TOP,
        ADD_BK,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"b1","device":"src","target":"bk","sync":"none"}}"#,
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"query-jobs"}"#,
        r#"{"execute":"block-job-cancel","arguments":{"device":"b1"}}"#,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"b2","device":"src","target":"bk","sync":"none","auto-finalize":false,"auto-dismiss":false}}"#,
        r#"{"execute":"job-pause","arguments":{"id":"b2"}}"#,
        r#"{"execute":"job-resume","arguments":{"id":"b2"}}"#,
        r#"{"execute":"job-cancel","arguments":{"id":"b2"}}"#,
        r#"{"execute":"query-jobs"}"#,
        r#"{"execute":"job-dismiss","arguments":{"id":"b2"}}"#,
        // quit cancels a running one.
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"b3","device":"src","target":"bk","sync":"none"}}"#,
        r#"{"execute":"quit"}"#,
    ];
    let out = same_transcripts(&chain, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_CANCELLED""#), 3);
    assert_eq!(count(&out, r#""error":"Operation canceled""#), 1);
}

#[test]
fn bad_backup_option_combinations_match_qsd() {
    let images = |d: &TempDir| {
        chain(d);
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "raw", &d.s("r.raw"), "16M"],
        ));
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &d.s("small.qcow2"), "8M"],
        ));
    };
    let b = |rest: &str| {
        format!(
            r#"{{"execute":"blockdev-backup","arguments":{{"job-id":"j","device":"src",{rest}}}}}"#
        )
    };
    let steps: Vec<String> = [
        ADD_TOP.to_string(),
        ADD_BK.to_string(),
        r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r","file":{"driver":"file","filename":"$D/r.raw"}}}"#.into(),
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"small","file":{"driver":"file","filename":"$D/small.qcow2"}}}"#.into(),
        b(r#""target":"r","sync":"full","compress":true"#),
        b(r#""target":"bk","sync":"bitmap""#),
        b(r#""target":"bk","sync":"incremental""#),
        b(r#""target":"bk","sync":"incremental","bitmap":"x","bitmap-mode":"never""#),
        b(r#""target":"bk","sync":"full","bitmap-mode":"always""#),
        b(r#""target":"bk","sync":"none","bitmap":"nope""#),
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"src","name":"b0"}}"#.into(),
        b(r#""target":"bk","sync":"full","bitmap":"b0""#),
        b(r#""target":"bk","sync":"none","bitmap":"b0","bitmap-mode":"always""#),
        b(r#""target":"bk","sync":"full","bitmap":"b0","bitmap-mode":"never""#),
        b(r#""target":"bk","sync":"incremental","bitmap":"b0","bitmap-mode":"always""#),
        b(r#""target":"small","sync":"full""#),
        b(r#""target":"src","sync":"full""#),
        b(r#""target":"nope","sync":"full""#),
        b(r#""target":"bk","sync":"full","x-perf":{"max-workers":0}"#),
        b(r#""target":"bk","sync":"full","x-perf":{"max-chunk":-1}"#),
        b(r#""target":"bk","sync":"full","x-perf":{"max-chunk":1000}"#),
        b(r#""target":"bk","sync":"full","x-perf":{"min-cluster-size":1000}"#),
        b(r#""target":"bk","sync":"top","speed":-1"#),
        b(r#""target":"bk","sync":"full","filter-node-name":"src""#),
        b(r#""target":"bk","sync":"full","filter-node-name":"9x""#),
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"ro","read-only":true,"file":{"driver":"file","filename":"$D/base.qcow2"}}}"#.into(),
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"j","device":"ro","target":"bk","sync":"full","discard-source":true}}"#.into(),
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"j","device":"src","target":"ro","sync":"full"}}"#.into(),
        r#"{"execute":"blockdev-backup","arguments":{"device":"src","target":"bk","sync":"full"}}"#.into(),
        b(r#""target":"bk","sync":"full","x-perf":{"max-chunk":65536,"max-workers":1,"use-copy-range":true,"min-cluster-size":4096}"#),
        "until \"null\"".into(),
    ]
    .into();
    let refs: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = same_transcripts(&images, &refs);
    assert_eq!(
        count(&out, "Compression is not supported for this drive "),
        1
    );
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_COMPLETED""#), 1);
}

/// A source full of 0x11 and an empty fleecing image of the same size.
fn fleecing_images(d: &TempDir) {
    for n in ["src", "tmp"] {
        ok(&run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                &d.s(&format!("{n}.qcow2")),
                "16M",
            ],
        ));
    }
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 16M",
            &d.s("src.qcow2"),
        ],
    ));
}

/// Starts a daemon with the source and an NBD server; `setup` are the
/// QMP commands that build the fleecing.
fn fleecing_daemon(which: Which, dir: &TempDir, setup: &[&str]) -> (Daemon, Qmp) {
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!(
            "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
            dir.s("src.qcow2")
        ),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
    ]));
    let d = Daemon::spawn(which, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    for s in setup {
        let r = q.cmd(&s.replace("$D", &dir.0.display().to_string()));
        assert!(r.get("return").is_some(), "{which:?}: {s}: {r}");
    }
    (d, q)
}

/// While a client overwrites the whole source through `live`, readers of
/// the `view` export see the source as it was (0x11), before, during and
/// after the writes.
fn check_view(dir: &TempDir, live: &str, view: &str) {
    let url = |e: &str| format!("nbd+unix:///{e}?socket={}", dir.s("n.sock"));
    verify("raw", &url(view), &["read -P 0x11 0 16M"]);
    let reads: Vec<String> = (0..8).map(|_| "read -P 0x11 0 16M".to_string()).collect();
    let mut argv: Vec<String> = vec!["-f".into(), "raw".into(), "-r".into()];
    for r in &reads {
        argv.extend(["-c".to_string(), r.clone()]);
    }
    argv.push(url(view));
    let reader = std::process::Command::new("qemu-io")
        .args(&argv)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let writes: Vec<String> = (0..16u64)
        .map(|m| format!("write -P 0x77 {}M 1M", (m * 7) % 16))
        .collect();
    let mut wargv = vec!["-f", "raw"];
    for w in &writes {
        wargv.extend(["-c", w.as_str()]);
    }
    let live_url = url(live);
    wargv.push(&live_url);
    ok(&run("qemu-io", &wargv));
    let out = reader.wait_with_output().expect("reader");
    let text = ok(&out);
    assert!(
        !text.contains("fail") && text.matches("read ").count() == reads.len(),
        "{text}"
    );
    verify("raw", &url(view), &["read -P 0x11 0 16M"]);
    verify("raw", &url(live), &["read -P 0x77 0 16M"]);
}

/// Fleecing the old way: a qcow2 image whose backing is the live source,
/// a sync=none backup into it, and an NBD export of it.
#[test]
fn fleecing_with_a_backup_job_keeps_the_point_in_time() {
    for which in Which::all() {
        let dir = TempDir::new();
        fleecing_images(&dir);
        let (mut d, mut q) = fleecing_daemon(
            which,
            &dir,
            &[
                r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"live","node-name":"src","writable":true}}"#,
                r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"tmp","file":{"driver":"file","filename":"$D/tmp.qcow2"},"backing":"src"}}"#,
                r#"{"execute":"blockdev-backup","arguments":{"job-id":"fl","device":"src","target":"tmp","sync":"none"}}"#,
                r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"fl","node-name":"tmp"}}"#,
            ],
        );
        check_view(&dir, "src", "tmp");
        let r = q.cmd(r#"{"execute":"query-block-jobs"}"#);
        assert_eq!(r["return"][0]["offset"], 16 << 20, "{which:?}: {r}");
        for s in [
            r#"{"execute":"block-export-del","arguments":{"id":"fl"}}"#,
            r#"{"execute":"block-job-cancel","arguments":{"device":"fl"}}"#,
        ] {
            let r = q.cmd(s);
            assert!(r.get("return").is_some(), "{which:?}: {s}: {r}");
        }
        wait_no_jobs(&mut q);
        let r = q.cmd(r#"{"execute":"blockdev-del","arguments":{"node-name":"tmp"}}"#);
        assert!(r.get("return").is_some(), "{which:?}: {r}");
        q.send(br#"{"execute":"quit"}"#);
        assert_eq!(d.wait_exit(20), Some(0));
        // The fleecing image holds the old contents of every cluster.
        verify("qcow2", &dir.s("tmp.qcow2"), &["read -P 0x11 0 16M"]);
        for img in ["src.qcow2", "tmp.qcow2"] {
            ok(&run("qemu-img", &["check", &dir.s(img)]));
        }
    }
}

const CBW_SETUP: [&str; 5] = [
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"tmp","file":{"driver":"file","filename":"$D/tmp.qcow2"}}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"copy-before-write","node-name":"cbw","file":"src","target":"tmp"}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"snapshot-access","node-name":"acc","discard":"unmap","file":"cbw"}}"#,
    r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"live","node-name":"cbw","writable":true}}"#,
    r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"fl","node-name":"acc","writable":true}}"#,
];

/// Fleecing with the copy-before-write filter and snapshot-access.
#[test]
fn fleecing_with_copy_before_write_keeps_the_point_in_time() {
    for which in Which::all() {
        let dir = TempDir::new();
        fleecing_images(&dir);
        let (mut d, mut q) = fleecing_daemon(which, &dir, &CBW_SETUP);
        check_view(&dir, "cbw", "acc");
        // A discarded range of the view is gone (reads fail: EACCES,
        // which NBD carries as EINVAL); the rest still reads.
        let url = format!("nbd+unix:///acc?socket={}", dir.s("n.sock"));
        let out = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "discard 0 1M",
                "-c",
                "read 0 64k",
                "-c",
                "read 960k 64k",
                "-c",
                "write 2M 64k",
                &url,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            text.matches("read failed: Invalid argument").count(),
            2,
            "{which:?}: {text}"
        );
        assert!(
            text.contains("write failed: Operation not supported"),
            "{which:?}: {text}"
        );
        verify("raw", &url, &["read -P 0x11 1M 15M"]);
        for s in [
            r#"{"execute":"block-export-del","arguments":{"id":"fl"}}"#,
            r#"{"execute":"block-export-del","arguments":{"id":"live"}}"#,
        ] {
            let r = q.cmd(s);
            assert!(r.get("return").is_some(), "{which:?}: {s}: {r}");
        }
        q.send(br#"{"execute":"quit"}"#);
        assert_eq!(d.wait_exit(20), Some(0));
        verify("qcow2", &dir.s("src.qcow2"), &["read -P 0x77 0 16M"]);
        for img in ["src.qcow2", "tmp.qcow2"] {
            ok(&run("qemu-img", &["check", &dir.s(img)]));
        }
    }
}

/// The modern fleecing set-up's replies and node list, against QSD.
#[test]
fn copy_before_write_setup_matches_qsd() {
    let mut steps = vec![
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"src","file":{"driver":"file","filename":"$D/src.qcow2"}}}"#,
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/n.sock"}}}}"#,
    ];
    steps.extend(CBW_SETUP);
    steps.extend([
        r#"{"execute":"blockdev-add","arguments":{"driver":"copy-before-write","node-name":"c2","file":"src","target":"tmp","bitmap":{"node":"src","name":"b0"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"copy-before-write","node-name":"c2","file":"src","target":"tmp","bitmap":{"node":"nope","name":"b0"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"copy-before-write","node-name":"c3","file":"src","target":"tmp","min-cluster-size":1000}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"copy-before-write","node-name":"c4","file":"src","target":"nope"}}"#,
    ]);
    steps.extend([
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"query-named-block-nodes"}"#,
        r#"{"execute":"x-debug-query-block-graph"}"#,
        r#"{"execute":"block_resize","arguments":{"node-name":"src","size":33554432}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"cbw"}}"#,
        r#"{"execute":"block-export-del","arguments":{"id":"fl"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"acc"}}"#,
        r#"{"execute":"block-export-del","arguments":{"id":"live"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"cbw"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"tmp"}}"#,
    ]);
    let out = same_transcripts(&fleecing_images, &steps);
    assert_eq!(count(&out, r#""drv":"copy-before-write""#), 2);
    assert_eq!(count(&out, "Dirty bitmap 'b0' not found"), 1);
}

/// drive-backup creates its target (qcow2 by default, with the
/// source's backing for sync=top and the source itself for sync=none),
/// opens it as an implicit node and drops it when the job is gone.
#[test]
fn drive_backup_to_new_images_matches_qsd() {
    let steps = [
        ADD_TOP,
        r#"{"execute":"drive-backup","arguments":{"job-id":"d1","device":"src","target":"$D/new1.qcow2","sync":"full","auto-finalize":false,"auto-dismiss":false}}"#,
        "until BLOCK_JOB_PENDING",
        r#"{"execute":"job-finalize","arguments":{"id":"d1"}}"#,
        r#"{"execute":"job-dismiss","arguments":{"id":"d1"}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"drive-backup","arguments":{"job-id":"d2","device":"src","target":"$D/new2.qcow2","sync":"top","auto-finalize":false}}"#,
        "until BLOCK_JOB_PENDING",
        r#"{"execute":"job-finalize","arguments":{"id":"d2"}}"#,
        r#"{"execute":"drive-backup","arguments":{"job-id":"d3","device":"src","target":"$D/new3.raw","sync":"full","format":"raw","auto-finalize":false}}"#,
        "until BLOCK_JOB_PENDING",
        r#"{"execute":"job-finalize","arguments":{"id":"d3"}}"#,
        r#"{"execute":"drive-backup","arguments":{"job-id":"d4","device":"src","target":"$D/new4.qcow2","sync":"none"}}"#,
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"job-cancel","arguments":{"id":"d4"}}"#,
        r#"{"execute":"drive-backup","arguments":{"job-id":"d5","device":"src","target":"$D/nonexist.qcow2","sync":"full","mode":"existing"}}"#,
        r#"{"execute":"drive-backup","arguments":{"job-id":"d6","device":"nope","target":"$D/new6.qcow2","sync":"full"}}"#,
        r#"{"execute":"drive-backup","arguments":{"device":"src","target":"$D/new7.qcow2","sync":"full"}}"#,
        r#"{"execute":"drive-backup","arguments":{"job-id":"d8","device":"src","target":"$D/new8.qcow2","sync":"incremental"}}"#,
        r#"{"execute":"drive-backup","arguments":{"job-id":"d9","device":"src","target":"$D/new1.qcow2","sync":"full","mode":"existing","x-perf":{"max-workers":2,"max-chunk":131072},"auto-finalize":false}}"#,
        "until BLOCK_JOB_PENDING",
        r#"{"execute":"job-finalize","arguments":{"id":"d9"}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        // Nothing below the source: sync=top copies everything.
        ADD_BK,
        r#"{"execute":"drive-backup","arguments":{"job-id":"d10","device":"bk","target":"$D/new10.qcow2","sync":"top","auto-finalize":false}}"#,
        "until BLOCK_JOB_PENDING",
        r#"{"execute":"job-finalize","arguments":{"id":"d10"}}"#,
    ];
    let out = same_transcripts(&chain, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_COMPLETED""#), 5);
}

/// The images drive-backup made hold what they should.
#[test]
fn drive_backup_images_hold_the_source() {
    let dir = TempDir::new();
    chain(&dir);
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!(
            "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
            dir.s("top.qcow2")
        ),
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    for (t, sync, fmt) in [
        ("full.qcow2", "full", "qcow2"),
        ("top.raw", "top", "raw"),
        ("full.raw", "full", "raw"),
    ] {
        let r = q.cmd(&format!(
            r#"{{"execute":"drive-backup","arguments":{{"job-id":"d","device":"src","target":"{}","sync":"{sync}","format":"{fmt}","x-perf":{{"max-workers":1,"max-chunk":65536}}}}}}"#,
            dir.s(t)
        ));
        assert!(r.get("return").is_some(), "{r}");
        wait_no_jobs(&mut q);
    }
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0));
    let src = dir.s("top.qcow2");
    ok(&run("qemu-img", &["compare", &src, &dir.s("full.qcow2")]));
    ok(&run(
        "qemu-img",
        &["compare", "-F", "raw", &src, &dir.s("full.raw")],
    ));
    ok(&run("qemu-img", &["check", &dir.s("full.qcow2")]));
    // sync=top into a raw image: only the top's clusters, zeroes elsewhere.
    verify(
        "raw",
        &dir.s("top.raw"),
        &["read -P 0 0 2M", "read -P 0x22 2M 1M", "read -P 0 3M 13M"],
    );
}

/// discard-source: each cluster copied is discarded in the source (a
/// source opened with discard=unmap).
#[test]
fn discard_source_empties_the_source() {
    for which in Which::all() {
        let dir = TempDir::new();
        fleecing_images(&dir);
        let mut a = monitor_args(&dir.s("q.sock"));
        a.extend(args(&[
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=src,discard=unmap,file.driver=file,file.filename={}",
                dir.s("src.qcow2")
            ),
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=bk,file.driver=file,file.filename={}",
                dir.s("tmp.qcow2")
            ),
        ]));
        let mut d = Daemon::spawn(which, &a);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let r = q.cmd(
            r#"{"execute":"blockdev-backup","arguments":{"job-id":"b","device":"src","target":"bk","sync":"full","discard-source":true}}"#,
        );
        assert!(r.get("return").is_some(), "{which:?}: {r}");
        wait_no_jobs(&mut q);
        q.send(br#"{"execute":"quit"}"#);
        assert_eq!(d.wait_exit(20), Some(0));
        verify("qcow2", &dir.s("tmp.qcow2"), &["read -P 0x11 0 16M"]);
        let map = ok(&run(
            "qemu-img",
            &["map", "--output=json", &dir.s("src.qcow2")],
        ));
        assert!(!map.contains(r#""data": true"#), "{which:?}: {map}");
        ok(&run("qemu-img", &["check", &dir.s("src.qcow2")]));
    }
}

/// on-cbw-error: when the copy to the target fails, break-guest-write
/// (the default) fails the guest's write and keeps the view whole;
/// break-snapshot lets the write through and the view's reads fail.
#[test]
fn copy_before_write_errors_follow_on_cbw_error() {
    for which in Which::all() {
        for (policy, write_ok) in [("break-guest-write", false), ("break-snapshot", true)] {
            let dir = TempDir::new();
            fleecing_images(&dir);
            let cbw = format!(
                r#"{{"execute":"blockdev-add","arguments":{{"driver":"copy-before-write","node-name":"cbw","file":"src","target":"tmp","on-cbw-error":"{policy}","cbw-timeout":30}}}}"#
            );
            let (mut d, mut q) = fleecing_daemon(
                which,
                &dir,
                &[
                    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"tmp","file":{"driver":"blkdebug","image":{"driver":"file","filename":"$D/tmp.qcow2"},"inject-error":[{"event":"pwritev","errno":5}]}}}"#,
                    &cbw,
                    CBW_SETUP[2],
                    CBW_SETUP[3],
                    CBW_SETUP[4],
                ],
            );
            let url = |e: &str| format!("nbd+unix:///{e}?socket={}", dir.s("n.sock"));
            let out = run(
                "qemu-io",
                &["-f", "raw", "-c", "write -P 0x77 1M 64k", &url("cbw")],
            );
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            if write_ok {
                assert!(text.contains("wrote 65536/65536"), "{which:?}: {text}");
                verify("raw", &url("cbw"), &["read -P 0x77 1M 64k"]);
                let out = run(
                    "qemu-io",
                    &["-r", "-f", "raw", "-c", "read 0 64k", &url("acc")],
                );
                let text = String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr);
                assert!(text.contains("read failed"), "{which:?}: {text}");
            } else {
                assert!(
                    text.contains("write failed: Input/output error"),
                    "{which:?}: {text}"
                );
                verify("raw", &url("acc"), &["read -P 0x11 0 16M"]);
                verify("raw", &url("cbw"), &["read -P 0x11 0 16M"]);
            }
            q.send(br#"{"execute":"quit"}"#);
            assert!(d.wait_exit(20).is_some());
        }
    }
}

/// Cancelling a backup that only waits (sync=none, or a full one
/// sleeping off its speed limit), running or paused, ends it before the
/// reply, as in QSD; a speed-limited job copies one chunk, then sleeps.
#[test]
fn cancelling_waiting_backups_matches_qsd() {
    let steps = [
        ADD_TOP,
        ADD_BK,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"j","device":"src","target":"bk","sync":"none"}}"#,
        r#"{"execute":"job-pause","arguments":{"id":"j"}}"#,
        r#"{"execute":"job-cancel","arguments":{"id":"j"}}"#,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"k","device":"src","target":"bk","sync":"full","speed":1}}"#,
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"job-pause","arguments":{"id":"k"}}"#,
        r#"{"execute":"job-cancel","arguments":{"id":"k"}}"#,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"l","device":"src","target":"bk","sync":"full","speed":1}}"#,
        r#"{"execute":"block-job-cancel","arguments":{"device":"l"}}"#,
    ];
    let out = same_transcripts(&chain, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_CANCELLED""#), 3);
    assert_eq!(count(&out, r#""offset":1048576"#), 3);
}

/// cbw-timeout: a copy to a target that stopped answering (a qemu-nbd
/// server under SIGSTOP) fails the guest write after the timeout, or
/// with break-snapshot lets it through and breaks the view.
#[test]
fn copy_before_write_timeout_follows_on_cbw_error() {
    for which in Which::all() {
        for (policy, write_ok) in [("break-guest-write", false), ("break-snapshot", true)] {
            let dir = TempDir::new();
            fleecing_images(&dir);
            let mut server = std::process::Command::new("qemu-nbd")
                .args(["-k", &dir.s("t.sock"), "-f", "qcow2", &dir.s("tmp.qcow2")])
                .spawn()
                .expect("qemu-nbd");
            assert!(wait_for_path(&dir.path("t.sock"), 10));
            let pid = server.id() as i32;
            let target = format!(
                r#"{{"execute":"blockdev-add","arguments":{{"driver":"nbd","node-name":"tmp","server":{{"type":"unix","path":"{}"}}}}}}"#,
                dir.s("t.sock")
            );
            let cbw = format!(
                r#"{{"execute":"blockdev-add","arguments":{{"driver":"copy-before-write","node-name":"cbw","file":"src","target":"tmp","on-cbw-error":"{policy}","cbw-timeout":1}}}}"#
            );
            let (mut d, _q) = fleecing_daemon(
                which,
                &dir,
                &[&target, &cbw, CBW_SETUP[2], CBW_SETUP[3], CBW_SETUP[4]],
            );
            let url = |e: &str| format!("nbd+unix:///{e}?socket={}", dir.s("n.sock"));
            let write = |at: &str| {
                let out = run(
                    "qemu-io",
                    &[
                        "-f",
                        "raw",
                        "-c",
                        &format!("write -P 0x77 {at} 64k"),
                        &url("cbw"),
                    ],
                );
                String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr)
            };
            assert!(write("0").contains("wrote"), "{which:?}");
            unsafe_kill(pid, nix::libc::SIGSTOP);
            let started = std::time::Instant::now();
            let text = write("1M");
            let took = started.elapsed();
            unsafe_kill(pid, nix::libc::SIGCONT);
            assert!(
                took >= std::time::Duration::from_millis(900),
                "{which:?}: {took:?}"
            );
            if write_ok {
                assert!(text.contains("wrote 65536/65536"), "{which:?}: {text}");
                let out = run(
                    "qemu-io",
                    &["-r", "-f", "raw", "-c", "read 0 64k", &url("acc")],
                );
                let t = String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr);
                assert!(t.contains("read failed"), "{which:?}: {t}");
            } else {
                // ETIMEDOUT, which NBD carries as EINVAL.
                assert!(
                    text.contains("write failed: Invalid argument"),
                    "{which:?}: {text}"
                );
                verify("raw", &url("acc"), &["read -P 0x11 0 16M"]);
            }
            d.signal(nix::libc::SIGTERM);
            assert!(d.wait_exit(20).is_some());
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

/// copy-before-write with a `bitmap` (fleecing for an incremental
/// backup): only what the bitmap marks is kept and readable through
/// snapshot-access, as in QSD.
#[test]
fn copy_before_write_with_a_bitmap_matches_qsd() {
    let mut outs = Vec::new();
    for which in Which::all() {
        let dir = TempDir::new();
        fleecing_images(&dir);
        let (mut d, mut q) = fleecing_daemon(
            which,
            &dir,
            &[
                r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"src","name":"b0"}}"#,
                r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"live","node-name":"src","name":"live","writable":true}}"#,
            ],
        );
        let url = |e: &str| format!("nbd+unix:///{e}?socket={}", dir.s("n.sock"));
        // The bitmap marks 1M..1M+64k.
        ok(&run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x22 1M 64k", &url("live")],
        ));
        for s in [
            r#"{"execute":"block-export-del","arguments":{"id":"live"}}"#,
            r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"src","name":"b0"}}"#,
            r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"tmp","file":{"driver":"file","filename":"$D/tmp.qcow2"},"backing":null}}"#,
            r#"{"execute":"blockdev-add","arguments":{"driver":"copy-before-write","node-name":"cbw","file":"src","target":"tmp","bitmap":{"node":"src","name":"b0"}}}"#,
            r#"{"execute":"blockdev-add","arguments":{"driver":"snapshot-access","node-name":"acc","file":"cbw"}}"#,
            r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"w","node-name":"cbw","name":"w","writable":true}}"#,
            r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"acc","node-name":"acc","name":"acc"}}"#,
        ] {
            let r = q.cmd(&s.replace("$D", &dir.0.display().to_string()));
            assert!(r.get("return").is_some(), "{which:?}: {s}: {r}");
        }
        // The guest overwrites the marked range and another one.
        ok(&run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x33 1M 128k", &url("w")],
        ));
        let out = run(
            "qemu-io",
            &[
                "-r",
                "-f",
                "raw",
                "-c",
                "read -P 0x22 1M 64k",
                "-c",
                "read 2M 64k",
                "-c",
                "read -P 0x11 1088k 64k",
                &url("acc"),
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let lines: Vec<String> = text
            .lines()
            .filter(|l| !l.contains("ops/sec"))
            .map(String::from)
            .collect();
        outs.push(lines);
        q.send(br#"{"execute":"quit"}"#);
        assert_eq!(d.wait_exit(20), Some(0));
    }
    let rsd = &outs[0];
    assert!(rsd[0].starts_with("read 65536/65536"), "{rsd:#?}");
    assert!(rsd.iter().any(|l| l.contains("read failed")), "{rsd:#?}");
    if outs.len() == 2 {
        assert_eq!(outs[0], outs[1], "rsd, then QSD");
    }
}

/// Backups driven by a bitmap (sync=bitmap with bitmap-mode never,
/// sync=incremental): what they copy and what is left in the bitmap, as
/// QSD's transcripts show, and the targets' contents.
#[test]
fn bitmap_backups_match_qsd() {
    let setup = |d: &TempDir| {
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &d.s("src.qcow2"), "4M"],
        ));
        ok(&run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x11 0 4M", &d.s("src.qcow2")],
        ));
        for t in ["t1.qcow2", "t2.qcow2"] {
            ok(&run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", &d.s(t), "4M"],
            ));
        }
    };
    let steps = [
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"src","file":{"driver":"file","filename":"$D/src.qcow2"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"t1","file":{"driver":"file","filename":"$D/t1.qcow2"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"t2","file":{"driver":"file","filename":"$D/t2.qcow2"}}}"#,
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/n.sock"}}}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"src","writable":true}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"src","name":"b0"}}"#,
        "sh qemu-io -f raw -c 'write -q -P 0x22 1M 64k' -c 'write -q -P 0x33 3M 128k' nbd+unix:///src?socket=$D/n.sock",
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"j1","device":"src","target":"t1","sync":"bitmap","bitmap":"b0","bitmap-mode":"never"}}"#,
        "until \"null\"",
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"j2","device":"src","target":"t2","sync":"incremental","bitmap":"b0"}}"#,
        "until \"null\"",
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"t1"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"t2"}}"#,
        "sh qemu-io -r -f qcow2 -c map $D/t2.qcow2",
        "sh qemu-io -r -f qcow2 -c 'read -q -P 0x22 1M 64k' -c 'read -q -P 0x33 3M 128k' $D/t1.qcow2",
    ];
    let out = crate::jobs::same_transcripts(&setup, &steps);
    let text = out.join("\n");
    assert!(text.contains(r#""count":196608"#), "{text}");
    assert!(text.contains(r#""count":0"#), "{text}");
}

/// A query-named-block-nodes reply reduced to each node's dirty
/// bitmaps (the rest of a blkdebug node's listing is not the point
/// here); other lines as they are.
fn bitmaps_only(line: &str) -> String {
    // The transcript masks sizes as a bare N.
    let json = line.replace(":N,", ":\"N\",").replace(":N}", ":\"N\"}");
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&json) else {
        return line.to_string();
    };
    let Some(nodes) = v["return"].as_array().filter(|a| {
        a.first()
            .is_some_and(|n| n.get("node-name").is_some() && n.get("drv").is_some())
    }) else {
        return line.to_string();
    };
    let kept: Vec<serde_json::Value> = nodes
        .iter()
        .filter(|n| n.get("dirty-bitmaps").is_some())
        .map(|n| serde_json::json!({"node-name": n["node-name"], "dirty-bitmaps": n["dirty-bitmaps"]}))
        .collect();
    serde_json::json!({ "nodes": kept }).to_string()
}

/// bitmap-mode=always after a failed backup: the bitmap drops what the
/// job copied before the error and keeps what it did not copy; with
/// on-success it keeps everything; a synced bitmap takes the place of
/// QEMU's successor in the node's list. Counts, order and sha256 as
/// QSD's. The source fails reads of its 3 MiB sector, so of the dirty
/// 1M+64k and 3M+128k only the first is copied.
#[test]
fn bitmap_mode_always_after_a_failed_backup_matches_qsd() {
    let setup = |d: &TempDir| {
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "raw", &d.s("src.raw"), "4M"],
        ));
        for t in ["t1.qcow2", "t2.qcow2"] {
            ok(&run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", &d.s(t), "4M"],
            ));
        }
    };
    let sha = |b: &str| {
        format!(
            r#"{{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{{"node":"src","name":"{b}"}}}}"#
        )
    };
    let (sha0, sha1) = (sha("b0"), sha("b1"));
    let steps = [
        r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"src","file":{"driver":"blkdebug","image":{"driver":"file","filename":"$D/src.raw"},"inject-error":[{"event":"read_aio","errno":5,"sector":6144}]}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"t1","file":{"driver":"file","filename":"$D/t1.qcow2"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"t2","file":{"driver":"file","filename":"$D/t2.qcow2"}}}"#,
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/n.sock"}}}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"src","writable":true}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"src","name":"b0"}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"src","name":"b1"}}"#,
        "sh qemu-io -f raw -c 'write -q -P 0x22 1M 64k' -c 'write -q -P 0x33 3M 128k' nbd+unix:///src?socket=$D/n.sock",
        &sha0,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"j1","device":"src","target":"t1","sync":"bitmap","bitmap":"b0","bitmap-mode":"always"}}"#,
        "until \"null\"",
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"j2","device":"src","target":"t2","sync":"bitmap","bitmap":"b1","bitmap-mode":"on-success"}}"#,
        "until \"null\"",
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        &sha0,
        &sha1,
    ];
    let norm = |t: Vec<String>| -> Vec<String> { t.iter().map(|l| bitmaps_only(l)).collect() };
    let all: Vec<Vec<String>> = Which::all()
        .into_iter()
        .map(|w| norm(crate::jobs::transcript(w, &setup, &steps)))
        .collect();
    if all.len() == 2 {
        assert_eq!(all[0], all[1], "rsd: {:#?}\nqsd: {:#?}", all[0], all[1]);
    }
    let text = all[0].join("\n");
    assert_eq!(count(&all[0], "Input/output error"), 2, "{text}");
    assert!(
        text.contains(r#"{"name":"b0","recording":true,"persistent":false,"busy":false,"granularity":65536,"count":131072},{"name":"b1""#),
        "{text}"
    );
    assert!(text.contains(r#""name":"b1","recording":true,"persistent":false,"busy":false,"granularity":65536,"count":196608}"#), "{text}");
    let shas: Vec<&String> = all[0]
        .iter()
        .filter(|l| l.starts_with(r#"{"return":{"sha256""#))
        .collect();
    assert_eq!(shas.len(), 3, "{text}");
    assert_ne!(shas[0], shas[1], "b0 dropped what was copied");
    assert_eq!(shas[0], shas[2], "b1 kept everything");
}
