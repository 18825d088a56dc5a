//! The last of QSD's QMP commands (issue 23): ringbuf-read/-write,
//! chardev-change, chardev-send-break, qom-list-types,
//! qom-list-properties, blockdev-set-active, x-blockdev-set-iothread
//! and x-blockdev-amend, each compared with QSD; and query-commands
//! listing every command QSD 10.0.2 has.
use std::collections::BTreeSet;

use crate::common::*;
use crate::jobs::{count, same_transcripts};

fn no_setup(_: &TempDir) {}

fn qcow2_image(dir: &TempDir) {
    make_image(&dir.s("a.qcow2"), "qcow2", "1M", None);
}

#[test]
fn ringbuf_read_and_write_match_qsd() {
    let out = same_on_both(
        &no_setup,
        &["--chardev", "ringbuf,id=r,size=16", "--chardev", "memory,id=mm,size=4"],
        &[
            r#"{"execute":"ringbuf-write","arguments":{"device":"r","data":"hello"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":3}}"#,
            // More than there is: what there is.
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":100}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":100}}"#,
            // Overflow keeps the newest 16 bytes.
            r#"{"execute":"ringbuf-write","arguments":{"device":"r","data":"0123456789abcdefXYZ"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":100}}"#,
            r#"{"execute":"ringbuf-write","arguments":{"device":"r","data":"\u00e9\u20ac\ud83d\ude00"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":100}}"#,
            // A read that splits a character: U+FFFD, then the rest.
            r#"{"execute":"ringbuf-write","arguments":{"device":"r","data":"\u00e9\u20ac"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":1}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":1,"format":"base64"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":100}}"#,
            // U+0000 is stored as C0 80; a NUL byte ends a utf8 read.
            r#"{"execute":"ringbuf-write","arguments":{"device":"r","data":"a\u0000b"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":100,"format":"base64"}}"#,
            r#"{"execute":"ringbuf-write","arguments":{"device":"r","data":"YQBi","format":"base64"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":100}}"#,
            // Invalid UTF-8 of every kind.
            r#"{"execute":"ringbuf-write","arguments":{"device":"r","data":"9/j5+vv8/f7/","format":"base64"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":100}}"#,
            r#"{"execute":"ringbuf-write","arguments":{"device":"r","data":"4ICA77+/7aCAwIA=","format":"base64"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":100}}"#,
            // glib's lenient base64.
            r#"{"execute":"ringbuf-write","arguments":{"device":"r","data":"aG=Vs","format":"base64"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":100}}"#,
            r#"{"execute":"ringbuf-write","arguments":{"device":"r","data":"aGV\nsbG8","format":"base64"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":100}}"#,
            r#"{"execute":"ringbuf-write","arguments":{"device":"r","data":"aGV sbG8=","format":"base64"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":0}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"r","size":-1}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"nope","size":1}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"mon0","size":1}}"#,
            r#"{"execute":"ringbuf-write","arguments":{"device":"mon0","data":"x"}}"#,
            r#"{"execute":"ringbuf-write","arguments":{"device":"mm","data":"abcdef"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"mm","size":10}}"#,
            r#"{"execute":"chardev-add","arguments":{"id":"a","backend":{"type":"ringbuf","data":{"size":3}}}}"#,
            r#"{"execute":"chardev-add","arguments":{"id":"a","backend":{"type":"ringbuf","data":{"size":-8}}}}"#,
            r#"{"execute":"chardev-add","arguments":{"id":"a","backend":{"type":"ringbuf","data":{"size":2}}}}"#,
            r#"{"execute":"ringbuf-write","arguments":{"device":"a","data":"xyz"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"a","size":3}}"#,
        ],
    )
    .expect("both start");
    assert_eq!(out[2].trim(), r#"{"return": "lo"}"#);
    assert_eq!(out[5].trim(), r#"{"return": "3456789abcdefXYZ"}"#);
    assert_eq!(out[9].trim(), r#"{"return": "\uFFFD"}"#);
    assert_eq!(out[13].trim(), r#"{"return": "YcCAYg=="}"#);
    assert_eq!(out[15].trim(), r#"{"return": "a"}"#);
    assert_eq!(out[31].trim(), r#"{"return": "cdef"}"#);
    assert_eq!(out[36].trim(), r#"{"return": "yz"}"#);
    assert!(out[24].contains("Base64 data contains invalid characters"));
}

#[test]
fn chardev_change_and_send_break_match_qsd() {
    let out = same_on_both(
        &no_setup,
        &["--chardev", "ringbuf,id=r,size=16", "--chardev", "null,id=n"],
        &[
            r#"{"execute":"chardev-send-break","arguments":{"id":"r"}}"#,
            r#"{"execute":"chardev-send-break","arguments":{"id":"mon0"}}"#,
            r#"{"execute":"chardev-send-break","arguments":{"id":"nope"}}"#,
            r#"{"execute":"chardev-change","arguments":{"id":"nope","backend":{"type":"null","data":{}}}}"#,
            // A monitor cannot follow a swap.
            r#"{"execute":"chardev-change","arguments":{"id":"mon0","backend":{"type":"null","data":{}}}}"#,
            r#"{"execute":"chardev-change","arguments":{"id":"n","backend":{"type":"ringbuf","data":{"size":4}}}}"#,
            r#"{"execute":"ringbuf-write","arguments":{"device":"n","data":"abcdef"}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"n","size":10}}"#,
            r#"{"execute":"chardev-change","arguments":{"id":"r","backend":{"type":"socket","data":{"addr":{"type":"unix","data":{"path":"$D/s.sock"}},"server":true,"wait":false}}}}"#,
            r#"{"execute":"qom-get","arguments":{"path":"/chardevs/r","property":"type"}}"#,
            r#"{"execute":"qom-get","arguments":{"path":"/chardevs/r","property":"addr"}}"#,
            // A failed change leaves the chardev removed, as in QSD.
            r#"{"execute":"chardev-change","arguments":{"id":"n","backend":{"type":"ringbuf","data":{"size":3}}}}"#,
            r#"{"execute":"ringbuf-read","arguments":{"device":"n","size":1}}"#,
            r#"{"execute":"chardev-change","arguments":{"id":"n","backend":{"type":"null","data":{}}}}"#,
        ],
    )
    .expect("both start");
    assert_eq!(
        out[4].trim(),
        r#"{"error": {"class": "GenericError", "desc": "Chardev user does not support chardev hotswap"}}"#
    );
    assert_eq!(out[7].trim(), r#"{"return": "cdef"}"#);
    assert_eq!(out[9].trim(), r#"{"return": "chardev-socket"}"#);
    assert!(out[12].contains("Device 'n' not found"), "{}", out[12]);
}

fn reply(line: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(line).expect("json");
    v.get("return").cloned().unwrap_or(v)
}

const RSD_TYPES: &[&str] = &[
    "authz",
    "authz-list",
    "authz-list-file",
    "authz-simple",
    "chardev",
    "chardev-fd",
    "chardev-file",
    "chardev-memory",
    "chardev-null",
    "chardev-ringbuf",
    "chardev-socket",
    "chardev-stdio",
    "container",
    "event-loop-base",
    "interface",
    "iothread",
    "main-loop",
    "object",
    "secret",
    "secret_common",
    "secret_keyring",
    "throttle-group",
    "tls-creds",
    "tls-creds-x509",
    "user-creatable",
];

/// QSD's listings with the types rsd lacks left out equal rsd's, and
/// rsd lists exactly its own types.
#[test]
fn qom_list_types_and_properties_match_qsd() {
    let mut steps: Vec<String> = [
        r#"{}"#,
        r#"{"abstract":true}"#,
        r#"{"implements":"chardev"}"#,
        r#"{"implements":"chardev","abstract":true}"#,
        r#"{"implements":"user-creatable"}"#,
        r#"{"implements":"interface","abstract":true}"#,
        r#"{"implements":"event-loop-base","abstract":true}"#,
        r#"{"implements":"chardev-ringbuf"}"#,
        r#"{"implements":"authz"}"#,
        r#"{"implements":"tls-creds","abstract":true}"#,
        r#"{"implements":"nope"}"#,
    ]
    .iter()
    .map(|a| format!(r#"{{"execute":"qom-list-types","arguments":{a}}}"#))
    .collect();
    let props_from = steps.len();
    for t in RSD_TYPES.iter().chain(&["nope"]) {
        steps.push(format!(
            r#"{{"execute":"qom-list-properties","arguments":{{"typename":"{t}"}}}}"#
        ));
    }
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let rsd = scenario(Which::Rsd, &no_setup, &[], &steps).expect("rsd starts");
    let names = |v: &serde_json::Value| -> BTreeSet<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect()
    };
    let all = names(&reply(&rsd[1]));
    let want: BTreeSet<String> = RSD_TYPES.iter().map(|s| s.to_string()).collect();
    assert_eq!(all, want);
    assert!(rsd[props_from + RSD_TYPES.len()].contains("Class 'nope' not found"));
    if !Which::all().contains(&Which::Qsd) {
        return;
    }
    let qsd = scenario(Which::Qsd, &no_setup, &[], &steps).expect("qsd starts");
    for (i, (r, q)) in rsd.iter().zip(&qsd).enumerate() {
        let (r, mut q) = (reply(r), reply(q));
        if i < props_from {
            if let Some(list) = q.as_array_mut() {
                list.retain(|t| t["name"].as_str().is_some_and(|n| all.contains(n)));
            }
        }
        assert_eq!(r, q, "{}", steps[i]);
    }
}

/// query-commands lists every command QSD 10.0.2 has, and beyond them
/// only rsd's own (named by QAPI's rule for extensions).
#[test]
fn query_commands_lists_every_qsd_command() {
    let steps = [r#"{"execute":"query-commands"}"#];
    let set = |which| -> BTreeSet<String> {
        let out = scenario(which, &no_setup, &[], &steps).expect("starts");
        reply(&out[0])
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    };
    let rsd = set(Which::Rsd);
    let own = rsd.iter().filter(|c| c.starts_with("__org.rsd_")).count();
    assert!(own >= 2, "{rsd:?}");
    assert_eq!(rsd.len(), 76 + own);
    if Which::all().contains(&Which::Qsd) {
        let qsd = set(Which::Qsd);
        assert_eq!(qsd.len(), 76);
        let missing: Vec<&String> = qsd.difference(&rsd).collect();
        assert!(missing.is_empty(), "rsd lacks {missing:?}");
    }
}

#[test]
fn blockdev_set_active_matches_qsd() {
    let out = same_transcripts(
        &qcow2_image,
        &[
            r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q","file":{"driver":"file","node-name":"f","filename":"$D/a.qcow2"}}}"#,
            r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/nbd.sock"}}}}"#,
            r#"{"execute":"blockdev-set-active","arguments":{"node-name":"nope","active":false}}"#,
            r#"{"execute":"blockdev-set-active","arguments":{"node-name":"f","active":false}}"#,
            r#"{"execute":"blockdev-set-active","arguments":{"node-name":"q","active":false}}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            r#"{"execute":"blockdev-set-active","arguments":{"node-name":"f","active":false}}"#,
            r#"{"execute":"block-export-add","arguments":{"type":"vhost-user-blk","id":"v","node-name":"q","allow-inactive":true,"addr":{"type":"unix","path":"$D/vu.sock"}}}"#,
            r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"q","writable":true,"allow-inactive":true}}"#,
            // Inactive: reads work, writes are refused.
            "sh qemu-io -f raw -c 'read -P 0 0 4k' 'nbd+unix:///q?socket=$D/nbd.sock' | head -1",
            "sh qemu-io -f raw -c 'write -P 0x11 0 4k' 'nbd+unix:///q?socket=$D/nbd.sock' 2>&1 | head -1",
            r#"{"execute":"blockdev-set-active","arguments":{"active":true}}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            "sh qemu-io -f raw -c 'write -P 0x11 0 4k' 'nbd+unix:///q?socket=$D/nbd.sock' | head -1",
            r#"{"execute":"blockdev-set-active","arguments":{"active":false}}"#,
            r#"{"execute":"blockdev-set-active","arguments":{"node-name":"f","active":true}}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            r#"{"execute":"block-export-del","arguments":{"id":"e"}}"#,
            "until BLOCK_EXPORT_DELETED",
            // An export that does not allow it activates the node.
            r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e2","node-name":"q"}}"#,
            r#"{"execute":"blockdev-set-active","arguments":{"active":false}}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        ],
    );
    assert_eq!(
        count(&out, "write failed: Operation not permitted"),
        1,
        "{out:#?}"
    );
    assert!(count(&out, r#""active":false"#) >= 2, "{out:#?}");
}

/// The migration hand-over between two rsd daemons, with locking on: the
/// second opens the image only once the first inactivated it, writes,
/// and hands it back; the first reads the second's data (its qcow2
/// metadata read again on activation).
#[test]
fn blockdev_set_active_hands_an_image_between_two_daemons() {
    let dir = TempDir::new();
    qcow2_image(&dir);
    let add = format!(
        r#"{{"execute":"blockdev-add","arguments":{{"driver":"qcow2","node-name":"q","file":{{"driver":"file","filename":"{}","locking":"on"}}}}}}"#,
        dir.s("a.qcow2")
    );
    let start = |tag: &str| {
        let sock = dir.path(&format!("{tag}.sock"));
        let d = Daemon::spawn(Which::Rsd, &monitor_args(&sock.display().to_string()));
        assert!(wait_for_path(&sock, 10));
        (d, Qmp::ready(&sock))
    };
    let (_a, mut qa) = start("a");
    let (_b, mut qb) = start("b");
    assert!(qa.cmd(&add).get("return").is_some());
    let refused = qb.cmd(&add);
    assert!(refused.to_string().contains("Failed to get"), "{refused}");
    let set = |q: &mut Qmp, active: bool| {
        q.cmd(&format!(
            r#"{{"execute":"blockdev-set-active","arguments":{{"active":{active}}}}}"#
        ))
    };
    assert!(set(&mut qa, false).get("return").is_some());
    assert!(qb.cmd(&add).get("return").is_some(), "B opens it now");
    // A cannot take it back while B has it.
    let busy = set(&mut qa, true);
    assert!(busy.to_string().contains("Failed to get"), "{busy}");
    let export = |q: &mut Qmp, tag: &str| {
        let nbd = dir.s(&format!("{tag}-nbd.sock"));
        let r = q.cmd(&format!(
            r#"{{"execute":"nbd-server-start","arguments":{{"addr":{{"type":"unix","data":{{"path":"{nbd}"}}}}}}}}"#
        ));
        assert!(r.get("return").is_some(), "{r}");
        let r = q.cmd(
            r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"q","writable":true}}"#,
        );
        assert!(r.get("return").is_some(), "{r}");
        format!("nbd+unix:///q?socket={nbd}")
    };
    let url_b = export(&mut qb, "b");
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 64k 128k", &url_b],
    ));
    let r = qb.cmd(r#"{"execute":"block-export-del","arguments":{"id":"e","mode":"hard"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    for _ in 0..100 {
        if set(&mut qb, false).get("return").is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        set(&mut qa, true).get("return").is_some(),
        "A takes it back"
    );
    let url_a = export(&mut qa, "a");
    let read = ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 64k 128k",
            "-c",
            "read -P 0 0 64k",
            &url_a,
        ],
    ));
    assert!(!read.contains("Pattern verification failed"), "{read}");
    qa.send(br#"{"execute":"quit"}"#);
    qb.send(br#"{"execute":"quit"}"#);
    let _ = (_a, _b);
}

#[test]
fn set_iothread_and_amend_match_qsd() {
    same_transcripts(
        &qcow2_image,
        &[
            r#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io1"}}"#,
            r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q","file":{"driver":"file","node-name":"f","filename":"$D/a.qcow2"}}}"#,
            // Amend first: in an iothread QSD ends the job after its reply.
            r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"j","node-name":"nope","options":{"driver":"qcow2"}}}"#,
            r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"j","node-name":"f","options":{"driver":"file"}}}"#,
            r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"j","node-name":"q","options":{"driver":"raw"}}}"#,
            r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"j","node-name":"q","options":{"driver":"qcow2"}}}"#,
            r#"{"execute":"query-jobs"}"#,
            r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"j","node-name":"q","options":{"driver":"qcow2"}}}"#,
            r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"j2","node-name":"q","options":{"driver":"qcow2","encrypt":{"format":"luks","state":"active","new-secret":"s"}}}}"#,
            r#"{"execute":"query-jobs"}"#,
            r#"{"execute":"job-dismiss","arguments":{"id":"j"}}"#,
            r#"{"execute":"job-dismiss","arguments":{"id":"j2"}}"#,
            r#"{"execute":"x-blockdev-set-iothread","arguments":{"node-name":"nope","iothread":"io1"}}"#,
            r#"{"execute":"x-blockdev-set-iothread","arguments":{"node-name":"q","iothread":"io2"}}"#,
            r#"{"execute":"x-blockdev-set-iothread","arguments":{"node-name":"q","iothread":"io1"}}"#,
            r#"{"execute":"x-blockdev-set-iothread","arguments":{"node-name":"q","iothread":null}}"#,
            r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/nbd.sock"}}}}"#,
            r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"q"}}"#,
            r#"{"execute":"x-blockdev-set-iothread","arguments":{"node-name":"q","iothread":"io1"}}"#,
            r#"{"execute":"x-blockdev-set-iothread","arguments":{"node-name":"q","iothread":"io1","force":true}}"#,
        ],
    );
}
