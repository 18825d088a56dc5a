//! The mirror job against qemu-storage-daemon (transcripts: replies,
//! events and their order, queries, errors) and under a live NBD client
//! (the data, checked with qemu-img).
use std::time::{Duration, Instant};

use crate::common::*;
use crate::jobs::{count, same_transcripts};

/// src.qcow2 (16 MiB, 4 MiB of 0x11 data) and an empty tgt.qcow2.
fn images(d: &TempDir) {
    for n in ["src", "tgt", "small"] {
        let size = if n == "small" { "8M" } else { "16M" };
        let st = std::process::Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                &d.s(&format!("{n}.qcow2")),
                size,
            ])
            .status()
            .expect("qemu-img");
        assert!(st.success());
    }
    ok(&run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 4M", &d.s("src.qcow2")],
    ));
}

const ADD: [&str; 4] = [
    r#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"srcfile","filename":"$D/src.qcow2"}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"src","file":"srcfile"}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"tgtfile","filename":"$D/tgt.qcow2"}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"tgt","file":"tgtfile"}}"#,
];

fn with_nodes(steps: &[&'static str]) -> Vec<&'static str> {
    ADD.iter().copied().chain(steps.iter().copied()).collect()
}

#[test]
fn mirror_to_ready_verbs_and_complete_match_qsd() {
    let steps = with_nodes(&[
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"m1","device":"src","target":"tgt","sync":"full"}}"#,
        "until BLOCK_JOB_READY",
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"query-jobs"}"#,
        r#"{"execute":"query-named-block-nodes"}"#,
        r#"{"execute":"job-dismiss","arguments":{"id":"m1"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"tgt"}}"#,
        r#"{"execute":"block-job-set-speed","arguments":{"device":"m1","speed":-1}}"#,
        r#"{"execute":"block-job-change","arguments":{"id":"m1","type":"mirror","copy-mode":"background"}}"#,
        r#"{"execute":"block-job-change","arguments":{"id":"m1","type":"stream"}}"#,
        r#"{"execute":"job-pause","arguments":{"id":"m1"}}"#,
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"block-job-resume","arguments":{"device":"m1"}}"#,
        r#"{"execute":"job-finalize","arguments":{"id":"m1"}}"#,
        r#"{"execute":"block-job-pause","arguments":{"device":"nope"}}"#,
        r#"{"execute":"block-job-cancel","arguments":{"device":"nope"}}"#,
        r#"{"execute":"job-complete","arguments":{"id":"m1"}}"#,
        r#"until "null""#,
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    let out = same_transcripts(&images, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_READY""#), 1);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_COMPLETED""#), 1);
    assert_eq!(
        count(&out, "mirror_top"),
        1,
        "the filter while it runs only"
    );
}

#[test]
fn mirror_errors_match_qsd() {
    let steps = with_nodes(&[
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"small","file":{"driver":"file","filename":"$D/small.qcow2"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"ro","read-only":true,"file":{"driver":"file","filename":"$D/small.qcow2","read-only":true}}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"device":"src","target":"tgt","sync":"full"}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"nosuch","target":"tgt","sync":"full"}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"src","target":"nosuch","sync":"full"}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"src","target":"src","sync":"full"}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"src","target":"tgt","sync":"incremental"}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"src","target":"tgt","sync":"full","granularity":3000}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"src","target":"tgt","sync":"full","granularity":256}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"src","target":"tgt","sync":"full","buf-size":-1}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"src","target":"tgt","sync":"full","speed":-1}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"src","target":"tgt","sync":"full","replaces":"nosuch"}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"src","target":"tgt","sync":"full","replaces":"tgtfile"}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"srcfile","target":"tgt","sync":"full"}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"src","target":"ro","sync":"full"}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"j","device":"src","target":"small","sync":"full"}}"#,
        r#"{"execute":"query-jobs"}"#,
    ]);
    let out = same_transcripts(&images, &steps);
    assert_eq!(count(&out, "Invalid job ID ''"), 1);
    assert_eq!(
        count(&out, "Source and target image have different sizes"),
        1
    );
}

#[test]
fn ready_mirror_soft_cancel_and_quit_match_qsd() {
    let steps = with_nodes(&[
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"m1","device":"src","target":"tgt","sync":"full","auto-dismiss":false}}"#,
        "until BLOCK_JOB_READY",
        r#"{"execute":"block-job-cancel","arguments":{"device":"m1"}}"#,
        r#"until "concluded""#,
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"job-dismiss","arguments":{"id":"m1"}}"#,
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"m2","device":"src","target":"tgt","sync":"full"}}"#,
        "until BLOCK_JOB_READY",
        r#"{"execute":"quit"}"#,
    ]);
    let out = same_transcripts(&images, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_CANCELLED""#), 1);
}

#[test]
fn running_mirror_with_a_speed_limit_matches_qsd() {
    let steps = with_nodes(&[
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"m2","device":"src","target":"tgt","sync":"full","speed":65536}}"#,
        r#"{"execute":"job-pause","arguments":{"id":"m2"}}"#,
        r#"{"execute":"job-pause","arguments":{"id":"m2"}}"#,
        r#"{"execute":"job-resume","arguments":{"id":"m2"}}"#,
        r#"{"execute":"block-job-set-speed","arguments":{"device":"m2","speed":131072}}"#,
        r#"{"execute":"job-complete","arguments":{"id":"m2"}}"#,
        r#"{"execute":"block-job-change","arguments":{"id":"m2","type":"mirror","copy-mode":"write-blocking"}}"#,
        r#"{"execute":"block-job-cancel","arguments":{"device":"m2"}}"#,
        r#"until "null""#,
    ]);
    let out = same_transcripts(&images, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_CANCELLED""#), 1);
}

/// A client writes through the NBD export while the mirror copies, goes
/// READY and pivots: the target then equals the source as it was at the
/// switch, the export serves the target, and writes after the switch
/// land in the target only.
#[test]
fn mirror_under_live_writes_pivots_the_export() {
    let dir = TempDir::new();
    images(&dir);
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!(
            "driver=file,node-name=srcfile,filename={}",
            dir.s("src.qcow2")
        ),
        "--blockdev",
        "driver=qcow2,node-name=src,file=srcfile",
        "--blockdev",
        &format!(
            "driver=file,node-name=tgtfile,filename={}",
            dir.s("tgt.qcow2")
        ),
        "--blockdev",
        "driver=qcow2,node-name=tgt,file=tgtfile",
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
        "--export",
        "type=nbd,id=e,node-name=src,writable=on",
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let url = format!("nbd+unix:///src?socket={}", dir.s("n.sock"));
    // A writer in the background: 4 KiB writes all over the disk.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (s2, d2, url2) = (stop.clone(), done.clone(), url.clone());
    let writer = std::thread::spawn(move || {
        let mut rounds = 0u64;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let cmds: Vec<String> = (0..64u64)
                .map(|i| {
                    let off = ((rounds * 64 + i) * 37 % 4096) * 4096;
                    format!("write -P {} {off} 4k", 0x40 + (rounds % 32))
                })
                .collect();
            let mut argv = vec!["-f", "raw"];
            for c in &cmds {
                argv.extend(["-c", c.as_str()]);
            }
            argv.push(&url2);
            let o = run("qemu-io", &argv);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            rounds += 1;
            d2.store(rounds, std::sync::atomic::Ordering::Relaxed);
        }
        rounds
    });
    let r = q.cmd(
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"m","device":"src","target":"tgt","sync":"full","buf-size":1048576}}"#,
    );
    assert!(r.get("return").is_some(), "{r}");
    // Ready while the writer writes.
    wait_ready(&mut q);
    // Two more rounds of writes land while the job is READY.
    let at_ready = done.load(std::sync::atomic::Ordering::Relaxed);
    let until = Instant::now() + Duration::from_secs(30);
    while done.load(std::sync::atomic::Ordering::Relaxed) < at_ready + 2 {
        assert!(Instant::now() < until, "the writer stalled while READY");
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer.join().expect("writer");
    assert!(rounds > 0);
    let r = q.cmd(r#"{"execute":"job-complete","arguments":{"id":"m"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = q.cmd(r#"{"execute":"query-block-exports"}"#);
        if r["return"][0]["node-name"] == "tgt" {
            break;
        }
        assert!(Instant::now() < until, "export never moved: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The switch happened with nothing in flight: the two images agree.
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            &dir.s("src.qcow2"),
            &dir.s("tgt.qcow2"),
        ],
    );
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    // After it, the export writes the target.
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x99 8M 64k", &url],
    ));
    let r = q.cmd(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#);
    assert!(!r.to_string().contains("mirror_top"), "{r}");
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0));
    let tgt = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x99 8M 64k",
            &dir.s("tgt.qcow2"),
        ],
    );
    let tgt = String::from_utf8_lossy(&tgt.stdout);
    assert!(
        !tgt.contains("fail"),
        "the target lacks the write after the switch: {tgt}"
    );
    // The source never saw the write after the switch.
    let src = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x99 8M 64k",
            &dir.s("src.qcow2"),
        ],
    );
    let src = String::from_utf8_lossy(&src.stdout);
    assert!(src.contains("Pattern verification failed"), "{src}");
    for img in ["src.qcow2", "tgt.qcow2"] {
        ok(&run("qemu-img", &["check", &dir.s(img)]));
    }
}

/// drive-mirror creates the target (absolute-paths), mirrors into it and
/// drops its nodes once the job ends, as QSD; the image is a copy.
#[test]
fn drive_mirror_matches_qsd() {
    let steps = with_nodes(&[
        r#"{"execute":"drive-mirror","arguments":{"device":"src","target":"$D/x.qcow2","sync":"full"}}"#,
        r#"{"execute":"drive-mirror","arguments":{"job-id":"d","device":"src","target":"$D/nonexist.qcow2","sync":"full","mode":"existing"}}"#,
        r#"{"execute":"drive-mirror","arguments":{"job-id":"d","device":"src","target":"$D/dm.qcow2","format":"qcow2","node-name":"dmnode","sync":"full"}}"#,
        "until BLOCK_JOB_READY",
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"job-complete","arguments":{"id":"d"}}"#,
        r#"until "null""#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    let out = same_transcripts(&images, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_COMPLETED""#), 1);
}

#[test]
fn drive_mirror_copies_the_data() {
    let dir = TempDir::new();
    images(&dir);
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!(
            "driver=qcow2,node-name=src,file.driver=file,file.filename={}",
            dir.s("src.qcow2")
        ),
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let cmd = format!(
        r#"{{"execute":"drive-mirror","arguments":{{"job-id":"d","device":"src","target":"{}","sync":"full"}}}}"#,
        dir.s("dm.qcow2")
    );
    let r = q.cmd(&cmd);
    assert!(r.get("return").is_some(), "{r}");
    wait_ready(&mut q);
    let r = q.cmd(r#"{"execute":"block-job-cancel","arguments":{"device":"d"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0));
    let cmp = run(
        "qemu-img",
        &["compare", &dir.s("src.qcow2"), &dir.s("dm.qcow2")],
    );
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    ok(&run("qemu-img", &["check", &dir.s("dm.qcow2")]));
}
