//! The quorum driver against QSD: blockdev-add and its errors, reads
//! that outvote a corrupted child (with QSD's QUORUM_REPORT_BAD and
//! QUORUM_FAILURE events), rewrite-corrupted repairing the child, writes
//! that need the threshold, fifo reads, and x-blockdev-change.
use crate::common::TempDir;
use crate::jobs::{count, same_transcripts};

const MIB: usize = 1 << 20;

/// Three 1 MiB children full of 0x5a; `corrupt` names the ones to
/// damage: (file index, byte offset, length, byte).
fn children(dir: &TempDir, corrupt: &[(usize, usize, usize, u8)]) {
    for i in 0..3 {
        let mut data = vec![0x5au8; MIB];
        for &(c, off, len, b) in corrupt {
            if c == i {
                data[off..off + len].fill(b);
            }
        }
        std::fs::write(dir.path(&format!("c{i}.raw")), data).expect("child");
    }
    std::fs::write(dir.path("small.raw"), vec![0u8; MIB / 2]).expect("small");
}

fn file_nodes() -> Vec<String> {
    (0..3)
        .map(|i| {
            format!(
                r#"{{"execute":"blockdev-add","arguments":{{"driver":"file","filename":"$D/c{i}.raw","node-name":"f{i}"}}}}"#
            )
        })
        .collect()
}

const NBD: &str = r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/n.sock"}}}}"#;
const EXPORT: &str = r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"qu","writable":true}}"#;

/// qemu-io on the export; a failed command still lets the step go on
/// (its message is in the transcript).
fn io(cmd: &str) -> String {
    format!("sh qemu-io -f raw -c '{cmd}' 'nbd+unix:///qu?socket=$D/n.sock' || true")
}

/// A command after a client's request: the events that request raised
/// come before its reply (both daemons queue them before the request
/// completes), so the transcript holds them in order.
const SYNC: &str = r#"{"execute":"query-jobs"}"#;

/// A client's request that raises `event`. QEMU sends a quorum event at
/// most once a second (per node for QUORUM_REPORT_BAD): one in the same
/// period comes at the period's end, after the command that follows.
/// Either way the transcript shows it after that command's reply.
fn expect(cmd: &str, event: &str) -> Vec<String> {
    vec![io(cmd), SYNC.into(), format!("until {event}")]
}

fn steps(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn run(setup: &dyn Fn(&TempDir), steps: &[String]) -> Vec<String> {
    let refs: Vec<&str> = steps.iter().map(String::as_str).collect();
    same_transcripts(setup, &refs)
}

#[test]
fn blockdev_add_and_its_errors_match_qsd() {
    let mut s = file_nodes();
    s.push(r#"{"execute":"blockdev-add","arguments":{"driver":"file","filename":"$D/small.raw","node-name":"sm"}}"#.into());
    let q = |args: &str| {
        format!(
            r#"{{"execute":"blockdev-add","arguments":{{"driver":"quorum","node-name":"a",{args}}}}}"#
        )
    };
    for args in [
        r#""vote-threshold":0,"children":["f0"]"#,
        r#""vote-threshold":2,"children":["f0"]"#,
        r#""vote-threshold":1,"children":[]"#,
        r#""vote-threshold":3,"children":["f0","f1","f2"],"blkverify":true"#,
        r#""vote-threshold":2,"children":["f0","f1"],"blkverify":true,"rewrite-corrupted":true"#,
        r#""vote-threshold":1,"children":["f0","nope"]"#,
        r#""vote-threshold":1,"children":["f0",{"driver":"file","filename":"$D/none.raw"}]"#,
        r#""vote-threshold":1,"children":["f0","sm"]"#,
        r#""children":["f0"]"#,
        // fifo ignores blkverify and rewrite-corrupted, but shows them.
        r#""vote-threshold":2,"children":["f0","f1"],"blkverify":true,"read-pattern":"fifo","rewrite-corrupted":true"#,
    ] {
        s.push(q(args));
    }
    s.push(r#"{"execute":"blockdev-del","arguments":{"node-name":"a"}}"#.into());
    s.push(q(
        r#""vote-threshold":2,"rewrite-corrupted":true,"children":["f0",{"driver":"file","filename":"$D/c2.raw"}]"#,
    ));
    s.push(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.into());
    s.push(r#"{"execute":"x-debug-query-block-graph"}"#.into());
    // Another quorum over a child of the first: nobody may resize it.
    s.push(r#"{"execute":"blockdev-add","arguments":{"driver":"quorum","node-name":"b","vote-threshold":1,"children":["f0"]}}"#.into());
    s.push(r#"{"execute":"block_resize","arguments":{"node-name":"b","size":2097152}}"#.into());
    s.push(r#"{"execute":"blockdev-del","arguments":{"node-name":"f0"}}"#.into());
    let out = run(&|d| children(d, &[]), &s);
    assert_eq!(count(&out, "threshold may not exceed children count"), 1);
    assert!(count(&out, r#"\"driver\": \"quorum\""#) >= 1, "{out:#?}");
}

#[test]
fn a_corrupted_child_is_outvoted_and_reported() {
    let mut s = file_nodes();
    s.extend(steps(&[
        r#"{"execute":"blockdev-add","arguments":{"driver":"quorum","node-name":"qu","vote-threshold":2,"children":["f0","f1","f2"]}}"#,
        NBD,
        EXPORT,
    ]));
    s.extend(expect("read -q -P 0x5a 0 64k", "QUORUM_REPORT_BAD"));
    s.extend(expect("read -q -P 0x5a 1024 2048", "QUORUM_REPORT_BAD"));
    // Without rewrite-corrupted the child stays as it was.
    s.push("sh cmp -s $D/c0.raw $D/c1.raw || echo differs".into());
    let out = run(&|d| children(d, &[(1, 1536, 1024, 0)]), &s);
    assert_eq!(count(&out, "QUORUM_REPORT_BAD"), 2, "{out:#?}");
    assert_eq!(count(&out, r#""node-name":"f1","sectors"#), 2, "{out:#?}");
    assert_eq!(count(&out, "Pattern verification failed"), 0);
    assert_eq!(count(&out, "| differs"), 1);
}

#[test]
fn rewrite_corrupted_repairs_the_child() {
    let mut s = file_nodes();
    s.extend(steps(&[
        r#"{"execute":"blockdev-add","arguments":{"driver":"quorum","node-name":"qu","vote-threshold":2,"rewrite-corrupted":true,"children":["f0","f1","f2"]}}"#,
        NBD,
        EXPORT,
    ]));
    s.extend(expect("read -q -P 0x5a 0 8k", "QUORUM_REPORT_BAD"));
    // Repaired: the same read finds nothing to report.
    s.push(io("read -q -P 0x5a 0 8k"));
    s.push(SYNC.into());
    s.push("sh cmp $D/c0.raw $D/c1.raw && cmp $D/c0.raw $D/c2.raw && echo repaired".into());
    let out = run(&|d| children(d, &[(1, 4096, 512, 0x11)]), &s);
    assert_eq!(count(&out, "QUORUM_REPORT_BAD"), 1, "{out:#?}");
    assert_eq!(count(&out, "| repaired"), 1, "{out:#?}");
}

#[test]
fn no_majority_fails_the_read() {
    let mut s = file_nodes();
    s.extend(steps(&[
        r#"{"execute":"blockdev-add","arguments":{"driver":"quorum","node-name":"qu","vote-threshold":2,"children":["f0","f1","f2"]}}"#,
        NBD,
        EXPORT,
    ]));
    s.extend(expect("read -q -P 0x5a 0 4k", "QUORUM_FAILURE"));
    let out = run(&|d| children(d, &[(1, 512, 512, 0), (2, 512, 512, 1)]), &s);
    assert_eq!(count(&out, "QUORUM_FAILURE"), 1, "{out:#?}");
    assert_eq!(count(&out, "QUORUM_REPORT_BAD"), 0, "{out:#?}");
    assert_eq!(
        count(&out, "read failed: Input/output error"),
        1,
        "{out:#?}"
    );
}

/// Child 2 is a raw node over blkdebug that fails reads at sector 64
/// and writes at sector 128.
fn failing_child(threshold: u32, pattern: &str) -> Vec<String> {
    let mut s = file_nodes();
    s.push(r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"d2","file":{"driver":"blkdebug","node-name":"dbg","image":"f2","inject-error":[{"event":"read_aio","errno":5,"sector":64},{"event":"pwritev","errno":28,"sector":128}]}}}"#.into());
    s.push(format!(
        r#"{{"execute":"blockdev-add","arguments":{{"driver":"quorum","node-name":"qu","vote-threshold":{threshold},"read-pattern":"{pattern}","children":["f0","f1","d2"]}}}}"#
    ));
    s.push(NBD.into());
    s.push(EXPORT.into());
    s
}

#[test]
fn failed_children_are_reported_and_two_of_three_suffice() {
    let mut s = failing_child(2, "quorum");
    s.extend(expect("read -q -P 0x5a 32768 4k", "QUORUM_REPORT_BAD"));
    s.extend(expect("write -q -P 0x11 65536 4k", "QUORUM_REPORT_BAD"));
    // The write missed d2: the next read outvotes it.
    s.extend(expect("read -q -P 0x11 65536 4k", "QUORUM_REPORT_BAD"));
    let out = run(&|d| children(d, &[]), &s);
    assert_eq!(
        count(&out, r#""error":"Input/output error""#),
        1,
        "{out:#?}"
    );
    assert_eq!(count(&out, r#""error":"No space left on device""#), 1);
    assert_eq!(count(&out, "QUORUM_REPORT_BAD"), 3);
    assert_eq!(count(&out, "QUORUM_FAILURE"), 0);
    assert_eq!(count(&out, "failed"), 0, "{out:#?}");
}

#[test]
fn a_read_below_the_threshold_fails() {
    let mut s = failing_child(3, "quorum");
    s.extend(expect("read -q 32768 4k", "QUORUM_FAILURE"));
    let out = run(&|d| children(d, &[]), &s);
    assert_eq!(count(&out, "QUORUM_REPORT_BAD"), 1, "{out:#?}");
    assert_eq!(count(&out, "QUORUM_FAILURE"), 1, "{out:#?}");
    assert_eq!(count(&out, "read failed: Input/output error"), 1);
}

#[test]
fn a_write_below_the_threshold_fails() {
    let mut s = failing_child(3, "quorum");
    s.extend(expect("write -q -P 0x11 65536 4k", "QUORUM_FAILURE"));
    let out = run(&|d| children(d, &[]), &s);
    assert_eq!(count(&out, r#""type":"write""#), 1, "{out:#?}");
    assert_eq!(count(&out, "QUORUM_FAILURE"), 1, "{out:#?}");
    assert_eq!(count(&out, "write failed: No space left on device"), 1);
}

#[test]
fn reports_of_one_child_go_out_once_a_second() {
    let mut s = file_nodes();
    s.extend(steps(&[
        r#"{"execute":"blockdev-add","arguments":{"driver":"quorum","node-name":"qu","vote-threshold":2,"children":["f0","f1","f2"]}}"#,
        NBD,
        EXPORT,
    ]));
    // Three bad reads at once: the first is reported now, the second is
    // dropped, the third comes at the end of the second.
    s.extend(expect(
        "read -q 0 512' -c 'read -q 512 512' -c 'read -q 1024 512",
        "QUORUM_REPORT_BAD",
    ));
    s.push(SYNC.into());
    s.push("until QUORUM_REPORT_BAD".into());
    let out = run(&|d| children(d, &[(1, 0, 1536, 0)]), &s);
    assert_eq!(count(&out, "QUORUM_REPORT_BAD"), 2, "{out:#?}");
    assert_eq!(count(&out, r#""sector-num":1,"#), 0, "{out:#?}");
    assert_eq!(count(&out, r#""sector-num":2,"#), 1, "{out:#?}");
}

#[test]
fn fifo_reads_the_first_child_that_answers() {
    let mut s = file_nodes();
    s.push(r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"d0","file":{"driver":"blkdebug","image":"f0","inject-error":[{"event":"read_aio","errno":5}]}}}"#.into());
    s.push(r#"{"execute":"blockdev-add","arguments":{"driver":"quorum","node-name":"qu","vote-threshold":1,"read-pattern":"fifo","children":["d0","f1","f2"]}}"#.into());
    s.push(NBD.into());
    s.push(EXPORT.into());
    s.extend(expect("read -q -P 0x22 0 4k", "QUORUM_REPORT_BAD"));
    // f1 differs from f2 there; fifo does not vote.
    let out = run(&|d| children(d, &[(1, 0, 4096, 0x22)]), &s);
    assert_eq!(count(&out, "QUORUM_REPORT_BAD"), 1, "{out:#?}");
    assert_eq!(
        count(&out, r#""error":"Input/output error""#),
        1,
        "{out:#?}"
    );
    assert_eq!(count(&out, "Pattern verification failed"), 0);
}

#[test]
fn x_blockdev_change_matches_qsd() {
    let mut s = file_nodes();
    s.push(r#"{"execute":"blockdev-add","arguments":{"driver":"file","filename":"$D/small.raw","node-name":"sm"}}"#.into());
    s.push(r#"{"execute":"blockdev-add","arguments":{"driver":"quorum","node-name":"a","vote-threshold":2,"children":["f0","f1"]}}"#.into());
    let change = |args: &str| {
        format!(r#"{{"execute":"x-blockdev-change","arguments":{{"parent":"a"{args}}}}}"#)
    };
    for args in [
        "",
        r#","child":"children.0","node":"f2""#,
        r#","child":"children.5""#,
        r#","child":"children.0""#,
        r#","node":"nope""#,
        r#","node":"f1""#,
        r#","node":"a""#,
        r#","node":"f2""#,
        r#","node":"sm""#,
    ] {
        s.push(change(args));
    }
    s.push(r#"{"execute":"x-debug-query-block-graph"}"#.into());
    s.push(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.into());
    for args in [
        r#","child":"children.2""#,
        r#","child":"children.0""#,
        r#","child":"children.1""#,
        r#","node":"f0""#,
        r#","node":"f2""#,
    ] {
        s.push(change(args));
    }
    s.push(r#"{"execute":"x-debug-query-block-graph"}"#.into());
    s.push(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.into());
    s.push(r#"{"execute":"blockdev-del","arguments":{"node-name":"f0"}}"#.into());
    s.push(r#"{"execute":"blockdev-del","arguments":{"node-name":"a"}}"#.into());
    s.push(r#"{"execute":"x-blockdev-change","arguments":{"parent":"f0","node":"f2"}}"#.into());
    s.push(r#"{"execute":"x-blockdev-change","arguments":{"parent":"f0","child":"x"}}"#.into());
    s.push(r#"{"execute":"x-blockdev-change","arguments":{"parent":"nope","child":"x"}}"#.into());
    let out = run(&|d| children(d, &[]), &s);
    assert!(count(&out, r#""name":"children.5""#) >= 1, "{out:#?}");
    assert_eq!(
        count(
            &out,
            "The number of children cannot be lower than the vote threshold 2"
        ),
        2
    );
}

#[test]
fn writes_reach_every_child() {
    let mut s = file_nodes();
    s.extend(steps(&[
        r#"{"execute":"blockdev-add","arguments":{"driver":"quorum","node-name":"qu","vote-threshold":3,"children":["f0","f1","f2"]}}"#,
        NBD,
        EXPORT,
    ]));
    s.push(io("write -q -P 0x33 4096 12k"));
    s.push(SYNC.into());
    s.push(io("write -q -z 65536 64k"));
    s.push(SYNC.into());
    s.push(io("flush"));
    s.push(SYNC.into());
    s.push("sh cmp $D/c0.raw $D/c1.raw && cmp $D/c0.raw $D/c2.raw && echo same".into());
    s.push("sh qemu-io -r -U -f raw -c 'read -q -P 0x33 4096 12k' -c 'read -q -P 0 65536 64k' $D/c1.raw && echo data".into());
    let out = run(&|d| children(d, &[]), &s);
    assert_eq!(count(&out, "| same"), 1, "{out:#?}");
    assert_eq!(count(&out, "| data"), 1, "{out:#?}");
    assert_eq!(count(&out, "QUORUM"), 0);
}
