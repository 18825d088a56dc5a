//! blockdev-backup against qemu-storage-daemon (the transcript with
//! auto-finalize and auto-dismiss off), and under a live NBD client: the
//! target holds the source as it was when the job started.

use crate::common::*;
use crate::jobs::{count, same_transcripts};

fn images(d: &TempDir) {
    for n in ["src", "bk"] {
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
        &["-f", "qcow2", "-c", "write -P 0x11 0 4M", &d.s("src.qcow2")],
    ));
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
