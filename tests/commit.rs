//! block-commit against qemu-storage-daemon: intermediate commit (the
//! header the overlay gets, the nodes left), active commit to READY and
//! complete (the export moves to the base), and the errors; the data
//! checked with qemu-io afterwards.
use crate::common::*;
use crate::jobs::{count, same_transcripts};
use crate::stream::chain;

const EXPLICIT: [&str; 3] = [
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"base","file":{"driver":"file","filename":"$D/base.qcow2"}}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"mid","backing":"base","file":{"driver":"file","filename":"$D/mid.qcow2"}}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"top","backing":"mid","file":{"driver":"file","filename":"$D/top.qcow2"}}}"#,
];

/// What every 1 MiB of the chain reads as (see `chain`).
fn expected(mib: u64) -> u8 {
    match mib {
        5 | 6 => 0x33,
        2..=4 => 0x22,
        0 | 1 => 0x11,
        _ => 0,
    }
}

fn reads_as_chain(img: &str) {
    let cmds: Vec<String> = (0..16u64)
        .map(|m| format!("read -P {} {}M 1M", expected(m), m))
        .collect();
    let mut argv = vec!["-f", "qcow2"];
    for c in &cmds {
        argv.extend(["-c", c.as_str()]);
    }
    argv.push(img);
    let out = run("qemu-io", &argv);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("fail"), "{img}: {text}");
}

#[test]
fn intermediate_commit_and_errors_match_qsd() {
    let mut steps: Vec<&str> = EXPLICIT.to_vec();
    steps.extend([
        r#"{"execute":"block-commit","arguments":{"device":"top","top-node":"mid"}}"#,
        r#"{"execute":"block-commit","arguments":{"job-id":"c","device":"nosuch"}}"#,
        r#"{"execute":"block-commit","arguments":{"job-id":"c","device":"top","base":"x","base-node":"base"}}"#,
        r#"{"execute":"block-commit","arguments":{"job-id":"c","device":"top","base-node":"nosuch"}}"#,
        r#"{"execute":"block-commit","arguments":{"job-id":"c","device":"top","top-node":"mid","base-node":"mid"}}"#,
        r#"{"execute":"block-commit","arguments":{"job-id":"c","device":"mid","top-node":"top"}}"#,
        r#"{"execute":"block-commit","arguments":{"job-id":"c1","device":"top","top-node":"mid","base-node":"base"}}"#,
        r#"until "null""#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    let out = same_transcripts(&chain, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_COMPLETED""#), 1);
}

#[test]
fn active_commit_to_ready_and_complete_matches_qsd() {
    let steps = [
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":"$D/top.qcow2"}}}"#,
        r#"{"execute":"block-commit","arguments":{"job-id":"c1","device":"top"}}"#,
        "until BLOCK_JOB_READY",
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"job-complete","arguments":{"id":"c1"}}"#,
        r#"until "null""#,
        r#"{"execute":"query-block-jobs"}"#,
    ];
    let out = same_transcripts(&chain, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_READY""#), 1);
}

/// The data after each kind of commit: the chain reads the same through
/// the top, and after an active commit the base alone holds everything.
#[test]
fn committed_data_reads_the_same() {
    for (name, steps) in [
        (
            "intermediate",
            &[
                r#"{"execute":"block-commit","arguments":{"job-id":"c1","device":"top","top-node":"mid","base-node":"base"}}"#,
            ][..],
        ),
        (
            "active",
            &[
                r#"{"execute":"block-commit","arguments":{"job-id":"c1","device":"top"}}"#,
                "until BLOCK_JOB_READY",
                r#"{"execute":"job-complete","arguments":{"id":"c1"}}"#,
            ][..],
        ),
    ] {
        let dir = TempDir::new();
        chain(&dir);
        let mut a = monitor_args(&dir.s("q.sock"));
        for (n, b) in [
            ("base", ""),
            ("mid", ",backing=base"),
            ("top", ",backing=mid"),
        ] {
            a.extend(args(&[
                "--blockdev",
                &format!(
                    "driver=qcow2,node-name={n}{b},file.driver=file,file.filename={}",
                    dir.s(&format!("{n}.qcow2"))
                ),
            ]));
        }
        let mut d = Daemon::spawn(Which::Rsd, &a);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        for s in steps {
            if let Some(want) = s.strip_prefix("until ") {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while !q.line().contains(want) {
                    assert!(std::time::Instant::now() < deadline, "{name}: no {want}");
                }
                continue;
            }
            let r = q.cmd(s);
            assert!(r.get("return").is_some(), "{name}: {r}");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let r = q.cmd(r#"{"execute":"query-jobs"}"#);
            if r["return"].as_array().is_some_and(|a| a.is_empty()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: job never ended: {r}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        q.send(br#"{"execute":"quit"}"#);
        assert_eq!(d.wait_exit(20), Some(0));
        reads_as_chain(&dir.s("top.qcow2"));
        for img in ["top.qcow2", "mid.qcow2", "base.qcow2"] {
            ok(&run("qemu-img", &["check", &dir.s(img)]));
        }
        let info = ok(&run(
            "qemu-img",
            &["info", "--output=json", &dir.s("top.qcow2")],
        ));
        if name == "intermediate" {
            assert!(
                info.contains(&format!(
                    "\"backing-filename\": \"{}\"",
                    dir.s("base.qcow2")
                )),
                "{info}"
            );
        } else {
            reads_as_chain(&dir.s("base.qcow2"));
        }
    }
}

/// A cancelled active commit leaves the base read-only again, as QSD.
#[test]
fn cancelled_active_commit_matches_qsd() {
    let steps = [
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":"$D/top.qcow2"}}}"#,
        r#"{"execute":"block-commit","arguments":{"job-id":"c1","device":"top"}}"#,
        "until BLOCK_JOB_READY",
        r#"{"execute":"job-cancel","arguments":{"id":"c1"}}"#,
        r#"until "null""#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ];
    let out = same_transcripts(&chain, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_CANCELLED""#), 1);
}
