//! `transaction` with backup jobs against qemu-storage-daemon: jobs
//! created as the actions are prepared and started at commit, and
//! `completion-mode: grouped`, where the jobs end together (all
//! succeed, or all are cancelled when one fails or is cancelled), with
//! their bitmaps following the group's outcome.
use crate::common::*;
use crate::jobs::{count, transcript};

fn images(d: &TempDir) {
    make_image(&d.s("src.qcow2"), "qcow2", "4M", Some((0x11, "4M")));
    for n in ["t1", "t2"] {
        make_image(&d.s(&format!("{n}.qcow2")), "qcow2", "4M", None);
    }
    // A raw image whose reads fail through blkdebug (every 1M is data,
    // so no chunk is skipped as zeroes).
    make_image(&d.s("bad.raw"), "raw", "4M", Some((0x22, "4M")));
}

const NODES: [&str; 3] = [
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"src","file":{"driver":"file","filename":"$D/src.qcow2"}}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"t1","file":{"driver":"file","filename":"$D/t1.qcow2"}}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"t2","file":{"driver":"file","filename":"$D/t2.qcow2"}}}"#,
];
const BAD: &str = r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"bad","file":{"driver":"blkdebug","image":{"driver":"file","filename":"$D/bad.raw"},"inject-error":[{"event":"read_aio","errno":5}]}}}"#;
/// Dirty bitmap b0 on src, marking 1M+64k and 3M+128k (written over NBD).
const DIRTY_B0: [&str; 4] = [
    r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/n.sock"}}}}"#,
    r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"src","writable":true}}"#,
    r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"src","name":"b0"}}"#,
    "sh qemu-io -f raw -c 'write -q -P 0x22 1M 64k' -c 'write -q -P 0x33 3M 128k' nbd+unix:///src?socket=$D/n.sock",
];
const B0_SHA: &str =
    r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"src","name":"b0"}}"#;

/// A transaction of `actions` (JSON objects), grouped or not.
fn tx(actions: &[String], grouped: bool) -> String {
    let props = if grouped {
        r#","properties":{"completion-mode":"grouped"}"#
    } else {
        ""
    };
    format!(
        r#"{{"execute":"transaction","arguments":{{"actions":[{}]{props}}}}}"#,
        actions.join(",")
    )
}

/// A blockdev-backup action; `extra` is more of its arguments.
fn backup(id: &str, device: &str, target: &str, extra: &str) -> String {
    format!(
        r#"{{"type":"blockdev-backup","data":{{"job-id":"{id}","device":"{device}","target":"{target}","sync":"full"{extra}}}}}"#
    )
}

/// Both daemons' transcripts, each passed through `norm`, must be the
/// same; rsd's is returned.
fn same_after(
    norm: &dyn Fn(Vec<String>) -> Vec<String>,
    setup: &dyn Fn(&TempDir),
    steps: &[&str],
) -> Vec<String> {
    let all: Vec<Vec<String>> = Which::all()
        .into_iter()
        .map(|w| norm(transcript(w, setup, steps)))
        .collect();
    if all.len() == 2 {
        assert_eq!(all[0], all[1], "rsd: {:#?}\nqsd: {:#?}", all[0], all[1]);
    }
    all.into_iter().next().expect("a daemon")
}

fn as_is(t: Vec<String>) -> Vec<String> {
    t
}

/// The masks of differences entry 42: progress offsets, and a
/// BLOCK_JOB_ERROR that QSD may send before the reply of the command
/// that started the job (rsd's jobs start after it).
fn error_masks(t: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in t {
        let l = crate::job_errors::mask_offsets(&l);
        if l == r#"{"return":{}}"# && out.last().is_some_and(|p| p.contains("BLOCK_JOB_ERROR")) {
            let ev = out.pop().expect("the event");
            out.push(l);
            out.push(ev);
        } else {
            out.push(l);
        }
    }
    out
}

/// Where `a` and then `b` occur in `lines` (each must be there).
fn before(lines: &[String], a: &str, b: &str) -> bool {
    let at = |s: &str| {
        lines
            .iter()
            .position(|l| l.contains(s))
            .unwrap_or_else(|| panic!("no {s} in {lines:#?}"))
    };
    at(a) < at(b)
}

/// A BLOCK_JOB_* `event` of job `id` is in `lines`.
fn has_event(lines: &[String], event: &str, id: &str) -> bool {
    lines.iter().any(|l| {
        l.contains(&format!(r#""event":"{event}""#)) && l.contains(&format!(r#""device":"{id}""#))
    })
}

fn status(id: &str, s: &str) -> String {
    format!(r#""data":{{"status":"{s}","id":"{id}"}}"#)
}

/// Two backups in one grouped transaction: the one that finishes first
/// waits (`waiting`) for the other, then both go to pending and conclude
/// together, newest first; the events and query-jobs as QSD's. j2 is
/// held at its speed limit until j1 is waiting.
#[test]
fn grouped_backups_conclude_together_as_in_qsd() {
    let actions = [
        backup("j1", "src", "t1", ""),
        backup("j2", "src", "t2", r#","speed":1"#),
    ];
    let grouped = tx(&actions, true);
    let mut steps = NODES.to_vec();
    steps.extend([
        grouped.as_str(),
        r#"until "waiting", "id": "j1""#,
        r#"{"execute":"query-jobs"}"#,
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"block-job-set-speed","arguments":{"device":"j2","speed":0}}"#,
        r#"until "null", "id": "j1""#,
        r#"{"execute":"query-jobs"}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"t1"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"t2"}}"#,
        "sh qemu-img compare -U -f qcow2 -F qcow2 $D/src.qcow2 $D/t1.qcow2",
        "sh qemu-img compare -U -f qcow2 -F qcow2 $D/src.qcow2 $D/t2.qcow2",
    ]);
    let out = same_after(&as_is, &images, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_COMPLETED""#), 2);
    assert_eq!(count(&out, "Images are identical."), 2);
    // Created at prepare, started at commit newest first.
    assert!(before(
        &out,
        &status("j2", "created"),
        &status("j1", "running")
    ));
    assert!(before(
        &out,
        &status("j2", "running"),
        &status("j1", "running")
    ));
    // j1 waited for j2; both pending before either concludes.
    assert!(before(
        &out,
        &status("j2", "waiting"),
        &status("j1", "pending")
    ));
    assert!(before(
        &out,
        &status("j1", "pending"),
        &status("j2", "concluded")
    ));
}

/// A backup that fails cancels the rest of its group: the failed one
/// concludes with its error, the other as cancelled, as in QSD. Then a
/// job-cancel of a running member cancels one that already finished
/// its work (`waiting`), which goes to aborting only as it concludes.
/// Progress offsets at the failure are masked (differences entry 42).
#[test]
fn a_failed_or_cancelled_member_cancels_the_group_as_in_qsd() {
    let failing = tx(
        &[
            backup("j1", "src", "t1", r#","speed":1"#),
            backup("j2", "bad", "t2", ""),
        ],
        true,
    );
    let cancelled = tx(
        &[
            backup("k1", "src", "t1", ""),
            backup("k2", "src", "t2", r#","speed":1"#),
        ],
        true,
    );
    let mut steps = NODES.to_vec();
    steps.extend([
        BAD,
        failing.as_str(),
        r#"until "null", "id": "j1""#,
        r#"{"execute":"query-jobs"}"#,
        cancelled.as_str(),
        r#"until "waiting", "id": "k1""#,
        r#"{"execute":"job-cancel","arguments":{"id":"k2"}}"#,
        r#"{"execute":"query-jobs"}"#,
    ]);
    let out = same_after(&error_masks, &images, &steps);
    let text = out.join("\n");
    assert!(
        text.contains(r#""device":"j2","len":4194304,"offset":N,"speed":0,"type":"backup","error":"Input/output error""#),
        "{text}"
    );
    assert!(has_event(&out, "BLOCK_JOB_CANCELLED", "j1"), "{text}");
    assert!(has_event(&out, "BLOCK_JOB_CANCELLED", "k1"), "{text}");
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_COMPLETED""#), 1);
    // Both ended within the cancel, before its reply.
    let cancel = out
        .iter()
        .position(|l| l.contains("job-cancel"))
        .expect("the cancel");
    let reply = cancel
        + out[cancel..]
            .iter()
            .position(|l| l.starts_with(r#"{"return""#))
            .expect("its reply");
    assert!(out[cancel..reply]
        .iter()
        .any(|l| l.contains(&status("k1", "null"))));
}

/// Grouped backups with auto-finalize off wait in pending
/// (BLOCK_JOB_PENDING for each, newest first); job-finalize of either
/// concludes both, and the incremental backup's bitmap is synced (only
/// the new writes are left). In a second group the full backup is
/// cancelled in pending: the incremental one, though its own work
/// succeeded, is cancelled with it and its bitmap keeps what it marked,
/// as in QSD.
#[test]
fn grouped_manual_finalize_and_bitmaps_as_in_qsd() {
    let manual = r#","auto-finalize":false,"auto-dismiss":false"#;
    let incremental = |id: &str, t: &str, extra: &str| {
        format!(
            r#"{{"type":"blockdev-backup","data":{{"job-id":"{id}","device":"src","target":"{t}","sync":"incremental","bitmap":"b0"{extra}}}}}"#
        )
    };
    let first = tx(
        &[
            incremental("j1", "t1", manual),
            backup("j2", "src", "t2", &format!(r#"{manual},"speed":1"#)),
        ],
        true,
    );
    let second = tx(
        &[
            incremental("k1", "t1", r#","auto-finalize":false"#),
            backup("k2", "src", "t2", r#","auto-finalize":false,"speed":1"#),
        ],
        true,
    );
    let mut steps = NODES.to_vec();
    steps.extend(DIRTY_B0);
    steps.extend([
        B0_SHA,
        first.as_str(),
        r#"until "waiting", "id": "j1""#,
        r#"{"execute":"block-job-set-speed","arguments":{"device":"j2","speed":0}}"#,
        r#"until "type": "backup", "id": "j1"}"#,
        r#"{"execute":"query-jobs"}"#,
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"job-finalize","arguments":{"id":"j2"}}"#,
        r#"{"execute":"query-jobs"}"#,
        r#"{"execute":"job-dismiss","arguments":{"id":"j1"}}"#,
        r#"{"execute":"job-dismiss","arguments":{"id":"j2"}}"#,
        B0_SHA,
        "sh qemu-io -f raw -c 'write -q -P 0x44 2M 64k' nbd+unix:///src?socket=$D/n.sock",
        B0_SHA,
        second.as_str(),
        r#"until "waiting", "id": "k1""#,
        r#"{"execute":"block-job-set-speed","arguments":{"device":"k2","speed":0}}"#,
        r#"until "type": "backup", "id": "k1"}"#,
        r#"{"execute":"job-cancel","arguments":{"id":"k2"}}"#,
        r#"{"execute":"query-jobs"}"#,
        B0_SHA,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    let out = same_after(&as_is, &images, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_PENDING""#), 4);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_COMPLETED""#), 2);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_CANCELLED""#), 2);
    // The bitmap after each group: emptied by the successful one, then
    // the new write kept by the cancelled one.
    let shas: Vec<&String> = out
        .iter()
        .filter(|l| l.starts_with(r#"{"return":{"sha256""#))
        .collect();
    assert_eq!(shas.len(), 4, "{out:#?}");
    assert_ne!(shas[0], shas[1]);
    assert_eq!(shas[2], shas[3]);
    assert!(out
        .iter()
        .any(|l| l.contains(r#""name":"b0""#) && l.contains(r#""count":65536"#)));
}

/// completion-mode grouped takes only job actions (QSD's message, before
/// anything is prepared); a failed grouped or individual transaction
/// takes its created job back (aborting, concluded, null, with no
/// BLOCK_JOB_* event: it never ran); bad properties are refused.
#[test]
fn grouped_refusals_and_roll_back_match_qsd() {
    let j1 = backup("j1", "src", "t1", "");
    let other = |t: &str, data: &str| format!(r#"{{"type":"{t}","data":{data}}}"#);
    let not_jobs = [
        other("block-dirty-bitmap-add", r#"{"node":"src","name":"b0"}"#),
        other("abort", "{}"),
        other(
            "blockdev-snapshot-internal-sync",
            r#"{"device":"src","name":"s"}"#,
        ),
        other(
            "blockdev-snapshot-sync",
            r#"{"device":"src","snapshot-file":"$D/o.qcow2"}"#,
        ),
        other("blockdev-snapshot", r#"{"node":"src","overlay":"t2"}"#),
    ];
    let mut txs: Vec<String> = not_jobs
        .iter()
        .map(|a| tx(&[j1.clone(), a.clone()], true))
        .collect();
    txs.push(tx(&[], true));
    txs.push(tx(&[j1.clone(), backup("j1", "src", "t2", "")], true));
    txs.push(tx(&[j1.clone(), other("abort", "{}")], false));
    txs.push(format!(
        r#"{{"execute":"transaction","arguments":{{"actions":[{j1}],"properties":{{"completion-mode":"grouped","allow-partial":true}}}}}}"#
    ));
    txs.push(format!(
        r#"{{"execute":"transaction","arguments":{{"actions":[{j1}],"properties":{{"completion-mode":"bogus"}}}}}}"#
    ));
    let mut steps = NODES.to_vec();
    steps.extend(txs.iter().map(String::as_str));
    steps.push(r#"{"execute":"query-jobs"}"#);
    let out = same_after(&as_is, &images, &steps);
    assert_eq!(
        count(
            &out,
            "does not support transaction property completion-mode = grouped"
        ),
        5
    );
    assert_eq!(count(&out, &status("j1", "aborting")), 2);
    assert_eq!(count(&out, "BLOCK_JOB_"), 0);
    assert!(out.iter().any(|l| l.contains("Job ID 'j1' already in use")));
}

/// A grouped transaction that fails after creating two jobs takes both
/// back and replies with the error. (QSD 10.0.2 hangs here, waiting
/// for a job that never started: differences entry 50.)
#[test]
fn a_failed_grouped_transaction_takes_all_its_jobs_back() {
    let dir = TempDir::new();
    images(&dir);
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&["--pidfile", &dir.s("p.pid")]));
    let _d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let d = dir.0.display().to_string();
    for s in NODES {
        let r = q.cmd(&s.replace("$D", &d));
        assert!(r.get("return").is_some(), "{r}");
    }
    let t = tx(
        &[
            backup("j1", "src", "t1", ""),
            backup("j2", "src", "t2", ""),
            backup("j3", "src", "nope", ""),
        ],
        true,
    );
    q.send(t.as_bytes());
    let mut lines = Vec::new();
    loop {
        let l = q.line();
        assert!(!l.is_empty(), "EOF after {lines:#?}");
        let done = l.contains("\"error\"") || l.contains("\"return\"");
        lines.push(l);
        if done {
            break;
        }
    }
    let text = lines.join("\n");
    assert!(
        text.contains("Cannot find device='nope' nor node-name='nope'"),
        "{text}"
    );
    for id in ["j1", "j2"] {
        for s in ["created", "aborting", "concluded", "null"] {
            assert!(
                text.contains(&format!(r#""status": "{s}", "id": "{id}""#)),
                "{id} {s}: {text}"
            );
        }
    }
    assert!(!text.contains("running"), "{text}");
    let r = q.cmd(r#"{"execute":"query-jobs"}"#);
    assert_eq!(r["return"], serde_json::json!([]), "{r}");
    // The nodes are free again: the targets can go.
    for t in ["t1", "t2"] {
        let r = q.cmd(&format!(
            r#"{{"execute":"blockdev-del","arguments":{{"node-name":"{t}"}}}}"#
        ));
        assert!(r.get("return").is_some(), "{t}: {r}");
    }
}
