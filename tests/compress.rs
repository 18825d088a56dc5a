//! The compress filter and compressed cluster writes in qcow2, against
//! QSD: blockdev-add and its errors, writes through the filter (whole
//! clusters, padded ones, refused overwrites) into zlib and zstd images
//! that `qemu-img check` accepts and whose data and map are QSD's, and
//! backup's `compress`.
use crate::common::{make_image, TempDir};
use crate::jobs::{count, same_transcripts};

const NBD: &str = r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/n.sock"}}}}"#;

/// The lines of `qemu-img check` that do not depend on how small the
/// compressor made each cluster (QEMU's zlib and zstd are not rsd's).
const CHECK: &str = "qemu-img check $D/z.qcow2 | grep -o 'No errors were found on the image.\\|[0-9]*/[0-9]* = [0-9.]*% allocated\\|[0-9.]*% compressed clusters'";

fn run(setup: &dyn Fn(&TempDir), steps: &[String]) -> Vec<String> {
    let refs: Vec<&str> = steps.iter().map(String::as_str).collect();
    same_transcripts(setup, &refs)
}

fn qcow2(dir: &TempDir, opts: &str) {
    let o = crate::common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            &dir.s("z.qcow2"),
            "1M",
        ],
    );
    crate::common::ok(&o);
}

#[test]
fn blockdev_add_and_its_errors_match_qsd() {
    let setup = |d: &TempDir| {
        qcow2(d, "cluster_size=65536");
        make_image(&d.s("f.raw"), "raw", "1M", None);
    };
    let s: Vec<String> = [
        r#"{"execute":"blockdev-add","arguments":{"driver":"file","filename":"$D/f.raw","node-name":"f0"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"compress","node-name":"x0","file":"f0"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r0","file":"f0"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"compress","node-name":"x0","file":"r0"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"compress","node-name":"x0","file":{"driver":"null-co"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"compress","node-name":"x0","file":"nope"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"compress","node-name":"x0"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"z","file":{"driver":"file","filename":"$D/z.qcow2"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"compress","node-name":"cz","file":"z"}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"query-named-block-nodes"}"#,
        r#"{"execute":"x-debug-query-block-graph"}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"z"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"cz"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"compress","node-name":"cz","file":{"driver":"qcow2","file":{"driver":"file","filename":"$D/z.qcow2"}}}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run(&setup, &s);
    assert_eq!(
        count(&out, "Compression is not supported for underlying format"),
        3,
        "{out:#?}"
    );
}

/// Writes through the filter over NBD, then the image is closed and
/// checked with QEMU's tools.
fn writes_through_the_filter(opts: &str) -> Vec<String> {
    let io = |cmd: &str| {
        format!("sh qemu-io -f raw -c '{cmd}' 'nbd+unix:///cz?socket=$D/n.sock' || true")
    };
    let mut s: Vec<String> = [
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"z","file":{"driver":"file","filename":"$D/z.qcow2"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"compress","node-name":"cz","file":"z"}}"#,
        NBD,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"cz","writable":true}}"#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // A whole cluster, a padded one, an overwrite (refused: compression
    // never overwrites), two clusters at once, zeroes (not compressed).
    for cmd in [
        "write -q -P 0x11 0 64k",
        "write -q -P 0x22 65536 1k",
        "write -q -P 0x33 0 64k",
        "write -q -P 0x44 131072 128k",
        "write -q -z 262144 64k",
        "write -q -P 0x55 1044480 4k",
    ] {
        s.push(io(cmd));
    }
    s.push(r#"{"execute":"block-export-del","arguments":{"id":"e"}}"#.into());
    s.push("until BLOCK_EXPORT_DELETED".into());
    s.push(r#"{"execute":"blockdev-del","arguments":{"node-name":"cz"}}"#.into());
    s.push(r#"{"execute":"blockdev-del","arguments":{"node-name":"z"}}"#.into());
    s.push(format!("sh {CHECK}"));
    s.push("sh qemu-img map --output=json $D/z.qcow2".into());
    s.push("sh qemu-img info $D/z.qcow2 | grep -i compression".into());
    s.push("sh qemu-io -f qcow2 -c 'read -q -P 0x11 0 64k' -c 'read -q -P 0x22 65536 1k' -c 'read -q -P 0 66560 63k' -c 'read -q -P 0x44 131072 128k' -c 'read -q -P 0 262144 64k' -c 'read -q -P 0x55 1044480 4k' $D/z.qcow2 && echo data".into());
    let out = run(&|d| qcow2(d, opts), &s);
    assert_eq!(
        count(&out, "| No errors were found on the image."),
        1,
        "{out:#?}"
    );
    assert_eq!(count(&out, "| 100.00% compressed clusters"), 1, "{out:#?}");
    assert_eq!(
        count(&out, "write failed: Input/output error"),
        1,
        "{out:#?}"
    );
    assert_eq!(count(&out, "| data"), 1, "{out:#?}");
    out
}

#[test]
fn writes_through_the_filter_are_zlib_clusters() {
    let out = writes_through_the_filter("cluster_size=65536");
    assert_eq!(count(&out, "compression type: zlib"), 1, "{out:#?}");
}

#[test]
fn writes_through_the_filter_are_zstd_clusters() {
    let out = writes_through_the_filter("cluster_size=65536,compression_type=zstd");
    assert_eq!(count(&out, "compression type: zstd"), 1, "{out:#?}");
}

/// 2 MiB of a pattern that compresses well, with one cluster of
/// xorshift noise that does not (it is written as plain data).
fn backup_source(dir: &TempDir) {
    let mut d = vec![0u8; 2 << 20];
    for (k, chunk) in d.chunks_mut(4096).enumerate() {
        chunk[..100].fill(k as u8);
    }
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in &mut d[1 << 20..(1 << 20) + 65536] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(dir.path("src.raw"), d).expect("source");
    std::fs::write(dir.path("rt.raw"), vec![0u8; 2 << 20]).expect("raw target");
    let o = crate::common::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &dir.s("z.qcow2"), "2M"],
    );
    crate::common::ok(&o);
}

#[test]
fn backup_compress_matches_qsd() {
    let s: Vec<String> = [
        r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"src","file":{"driver":"file","filename":"$D/src.raw"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"rt","file":{"driver":"file","filename":"$D/rt.raw"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"tgt","file":{"driver":"file","filename":"$D/z.qcow2"}}}"#,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"j0","device":"src","target":"rt","sync":"full","compress":true}}"#,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"j1","device":"src","target":"tgt","sync":"full","compress":true}}"#,
        r#"until "status": "null""#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"tgt"}}"#,
        "sh qemu-img compare -f raw -F qcow2 $D/src.raw $D/z.qcow2",
        "sh qemu-img map --output=json $D/z.qcow2 | sed 's/, \"offset\": [0-9]*//'",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut s = s;
    s.insert(8, format!("sh {CHECK}"));
    let out = run(&backup_source, &s);
    assert_eq!(
        count(&out, "Compression is not supported for this drive"),
        1
    );
    assert_eq!(count(&out, "| Images are identical."), 1, "{out:#?}");
    assert_eq!(
        count(&out, "| No errors were found on the image."),
        1,
        "{out:#?}"
    );
    assert_eq!(count(&out, r#""compressed": true"#), 2, "{out:#?}");
}
