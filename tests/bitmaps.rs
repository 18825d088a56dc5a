//! Dirty bitmaps: the block-dirty-bitmap-* commands, their errors, the
//! counts query-named-block-nodes shows and the sha256 of their bits,
//! compared with QSD's transcripts.
use crate::common::*;
use crate::jobs::{count, same_transcripts};

fn images(dir: &TempDir) {
    ok(&run(
        "qemu-img",
        &["create", "-f", "qcow2", &dir.s("a.qcow2"), "1M"],
    ));
    ok(&run(
        "qemu-img",
        &["create", "-f", "raw", &dir.s("r.raw"), "1M"],
    ));
}

const ADD_NODES: [&str; 4] = [
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q","file":{"driver":"file","filename":"$D/a.qcow2"}}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r","file":{"driver":"file","filename":"$D/r.raw"}}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"ro","read-only":true,"file":{"driver":"file","filename":"$D/a.qcow2","locking":"off"}}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n","size":2097152}}"#,
];

#[test]
fn bitmap_commands_and_errors_match_qsd() {
    let mut steps: Vec<&str> = ADD_NODES.to_vec();
    steps.extend([
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"b0"}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"b0"}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"nope","name":"b0"}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"nope","name":""}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"nope","name":"x","granularity":3}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"g1","granularity":256}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"g1","granularity":0}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"g1","granularity":4294967296}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"g1","granularity":512}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"g2","granularity":2147483648,"disabled":true}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"r","name":"p","persistent":true}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"n","name":"p","persistent":true}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"r","name":"np","disabled":true}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"ro","name":"rob"}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"n","name":"nb"}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"query-block"}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"b0"}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"g1"}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"nope"}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"nope","name":"b0"}}"#,
        r#"{"execute":"block-dirty-bitmap-remove","arguments":{"node":"q","name":"nope"}}"#,
        r#"{"execute":"block-dirty-bitmap-remove","arguments":{"node":"nope","name":"b0"}}"#,
        r#"{"execute":"block-dirty-bitmap-clear","arguments":{"node":"q","name":"nope"}}"#,
        r#"{"execute":"block-dirty-bitmap-clear","arguments":{"node":"ro","name":"rob"}}"#,
        r#"{"execute":"block-dirty-bitmap-enable","arguments":{"node":"q","name":"nope"}}"#,
        r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"q","name":"b0"}}"#,
        r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"q","name":"b0"}}"#,
        r#"{"execute":"block-dirty-bitmap-enable","arguments":{"node":"q","name":"g2"}}"#,
        r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"q","target":"b0","bitmaps":["g1"]}}"#,
        r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"q","target":"b0","bitmaps":["g1","nope"]}}"#,
        r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"q","target":"nope","bitmaps":["g1"]}}"#,
        r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"nope","target":"b0","bitmaps":["g1"]}}"#,
        r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"q","target":"b0","bitmaps":[{"node":"r","name":"np"},"b0"]}}"#,
        r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"q","target":"b0","bitmaps":[{"node":"zz","name":"np"}]}}"#,
        r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"q","target":"b0","bitmaps":[{"node":"r","name":"zz"}]}}"#,
        r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"q","target":"b0","bitmaps":[{"node":"n","name":"nb"}]}}"#,
        r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"q","target":"b0","bitmaps":[{"node":"q"}]}}"#,
        r#"{"execute":"block-dirty-bitmap-remove","arguments":{"node":"q","name":"g1"}}"#,
        r#"{"execute":"block-dirty-bitmap-remove","arguments":{"node":"ro","name":"rob"}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    let out = same_transcripts(&images, &steps);
    assert!(out.iter().any(|l| l.contains("Bitmap already exists: b0")));
    for want in [
        "Granularity must be power of 2 and at least 512",
        "Can't store persistent bitmaps to r: Operation not supported",
        "Bitmaps are of different sizes (destination size is 1048576, source size is 2097152)",
    ] {
        assert_eq!(
            count(&out, want),
            1 + (want.starts_with("Gran") as usize),
            "{want}"
        );
    }
}

#[test]
fn bitmap_counts_and_sha256_after_writes_match_qsd() {
    let write = "sh qemu-io -f raw -c 'write 0 1' -c 'write 70000 5000' -c 'write -z 300k 64k' -c 'discard 900k 10k' -c 'write 1048000 576' 'nbd+unix:///q?socket=$D/nbd.sock'";
    let mut steps: Vec<&str> = ADD_NODES.to_vec();
    steps.extend([
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/nbd.sock"}}}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e1","node-name":"q","writable":true}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"b0"}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"g","granularity":512}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"big","granularity":2097152}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"off","disabled":true}}"#,
        write,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"b0"}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"g"}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"big"}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"off"}}"#,
        r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"q","target":"off","bitmaps":["g"]}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"off"}}"#,
        r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"q","target":"g","bitmaps":["big"]}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"g"}}"#,
        r#"{"execute":"block-dirty-bitmap-clear","arguments":{"node":"q","name":"b0"}}"#,
        r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"q","name":"big"}}"#,
        r#"{"execute":"block-dirty-bitmap-enable","arguments":{"node":"q","name":"off"}}"#,
        "sh qemu-io -f raw -c 'write 600k 1' 'nbd+unix:///q?socket=$D/nbd.sock'",
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"b0"}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"off"}}"#,
        r#"{"execute":"block-export-del","arguments":{"id":"e1"}}"#,
        r#"{"execute":"block_resize","arguments":{"node-name":"q","size":3000000}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"g"}}"#,
        r#"{"execute":"block_resize","arguments":{"node-name":"q","size":524288}}"#,
        r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"g"}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    let out = same_transcripts(&images, &steps);
    // The writes left marks: 64 KiB granules 0, 1, 4, 5, 14 and 15.
    assert!(out
        .iter()
        .any(|l| l.contains(r#""count":393216"#) && l.contains(r#""name":"b0""#)));
}
