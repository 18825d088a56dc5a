//! Block-job error policies, with blkdebug failing the source's reads:
//! report ends the job with the error; stop pauses it with io-status
//! "failed" until it is resumed or cancelled (as QSD's transcripts show).
use std::time::{Duration, Instant};

use crate::common::*;

fn daemon(dir: &TempDir) -> (Daemon, Qmp) {
    for n in ["src", "tgt"] {
        ok(&run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                &dir.s(&format!("{n}.qcow2")),
                "4M",
            ],
        ));
    }
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            &dir.s("src.qcow2"),
        ],
    ));
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=qcow2,node-name=img,file.driver=file,file.filename={}", dir.s("src.qcow2")),
        "--blockdev",
        "driver=blkdebug,node-name=src,image=img,inject-error.0.event=read_aio,inject-error.0.errno=5",
        "--blockdev",
        &format!("driver=qcow2,node-name=tgt,file.driver=file,file.filename={}", dir.s("tgt.qcow2")),
    ]));
    let d = Daemon::spawn(Which::Rsd, &a);
    let q = Qmp::ready(&dir.path("q.sock"));
    (d, q)
}

/// Lines (events and replies) until one contains `want`.
fn until(q: &mut Qmp, want: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "never saw {want}: {seen:#?}");
        if !q.readable_within(200) {
            continue;
        }
        let l = q.line();
        assert!(!l.is_empty(), "EOF waiting for {want}");
        let done = l.contains(want);
        seen.push(l);
        if done {
            return seen;
        }
    }
}

#[test]
fn on_source_error_report_ends_the_mirror_with_the_error() {
    let dir = TempDir::new();
    let (_d, mut q) = daemon(&dir);
    q.send(br#"{"execute":"blockdev-mirror","arguments":{"job-id":"m","device":"src","target":"tgt","sync":"full","on-source-error":"report"}}"#);
    let seen = until(&mut q, r#""null""#);
    let text = seen.join("\n");
    assert!(
        text.contains(r#""event": "BLOCK_JOB_ERROR", "data": {"device": "m", "operation": "read", "action": "report"}"#),
        "{text}"
    );
    assert!(text.contains(r#""error": "Input/output error""#), "{text}");
    assert!(text.contains(r#""status": "aborting""#), "{text}");
    // The graph is as before: no filter left.
    let r = q.cmd(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#);
    assert!(!r.to_string().contains("mirror_top"), "{r}");
}

#[test]
fn on_source_error_stop_pauses_the_backup_until_cancelled() {
    let dir = TempDir::new();
    let (_d, mut q) = daemon(&dir);
    q.send(br#"{"execute":"blockdev-backup","arguments":{"job-id":"b","device":"src","target":"tgt","sync":"full","on-source-error":"stop"}}"#);
    let seen = until(&mut q, r#""paused""#);
    let text = seen.join("\n");
    // The start's own pause comes first; the error's pause after it.
    let text = if text.contains("BLOCK_JOB_ERROR") {
        text
    } else {
        until(&mut q, r#""paused""#).join("\n")
    };
    assert!(
        text.contains(r#""data": {"device": "b", "operation": "read", "action": "stop"}"#),
        "{text}"
    );
    let r = q.cmd(r#"{"execute":"query-block-jobs"}"#);
    assert_eq!(r["return"][0]["io-status"], "failed", "{r}");
    assert_eq!(r["return"][0]["status"], "paused", "{r}");
    assert_eq!(r["return"][0]["paused"], true, "{r}");
    let r = q.cmd(r#"{"execute":"job-cancel","arguments":{"id":"b"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    let text = until(&mut q, r#""null""#).join("\n");
    assert!(text.contains("BLOCK_JOB_CANCELLED"), "{text}");
}
