//! The copy-on-read, preallocate, blklogwrites and blkverify drivers
//! against QSD: blockdev-add with its errors, the nodes as queries show
//! them, and the data each leaves behind (the overlay's map, the file's
//! size and allocation, the log's bytes, the exit on a mismatch).
use crate::common::{args, make_image, ok, run, Daemon, TempDir, Which};
use crate::jobs::{count, same_transcripts};

const NBD: &str = r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/n.sock"}}}}"#;

fn steps(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn both(setup: &dyn Fn(&TempDir), steps: &[String]) -> Vec<String> {
    let refs: Vec<&str> = steps.iter().map(String::as_str).collect();
    same_transcripts(setup, &refs)
}

fn sh(dir: &TempDir, cmd: &str) {
    let o = run("sh", &["-c", &cmd.replace("$D", &dir.s(""))]);
    ok(&o);
}

/// base.raw (0x11) <- mid.qcow2 (0x22 in 1M..2M) <- top.qcow2 (empty).
fn chain(d: &TempDir) {
    sh(d, "cd $D && qemu-img create -q -f raw base.raw 4M && qemu-io -f raw -c 'write -q -P 0x11 0 4M' base.raw \
        && qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 && qemu-io -c 'write -q -P 0x22 1M 1M' mid.qcow2 \
        && qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2");
}

fn copy_on_read(bottom: Option<&str>) -> Vec<String> {
    let cor = match bottom {
        Some(b) => format!(
            r#"{{"execute":"blockdev-add","arguments":{{"driver":"copy-on-read","node-name":"c0","file":"top","bottom":"{b}"}}}}"#
        ),
        None => r#"{"execute":"blockdev-add","arguments":{"driver":"copy-on-read","node-name":"c0","file":"top"}}"#.into(),
    };
    let mut s = steps(&[
        r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"base","file":{"driver":"file","filename":"$D/base.raw"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"mid","file":{"driver":"file","filename":"$D/mid.qcow2"},"backing":"base"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":"$D/top.qcow2"},"backing":"mid"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"copy-on-read","node-name":"c0","file":"top","bottom":"c0"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"copy-on-read","node-name":"c0","file":"top","bottom":"nope"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"copy-on-read","node-name":"c0","file":"nope"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"copy-on-read","node-name":"c0"}}"#,
    ]);
    s.push(cor);
    s.extend(steps(&[
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"query-named-block-nodes"}"#,
        r#"{"execute":"x-debug-query-block-graph"}"#,
        NBD,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"c0","writable":true}}"#,
        // From base, from mid, across both, and a write.
        "sh qemu-io -f raw -c 'read -q -P 0x11 4096 8192' -c 'read -q -P 0x22 1200k 8k' -c 'read -q 960k 128k' -c 'write -q -P 0x33 2M 4k' 'nbd+unix:///c0?socket=$D/n.sock'",
        r#"{"execute":"block-export-del","arguments":{"id":"e","mode":"hard"}}"#,
        "until BLOCK_EXPORT_DELETED",
        r#"{"execute":"blockdev-del","arguments":{"node-name":"c0"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"top"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"mid"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"base"}}"#,
        "sh qemu-img map --output=json $D/top.qcow2",
        "sh qemu-img check -q $D/top.qcow2 && qemu-img compare -q $D/top.qcow2 $D/base.raw || echo differs",
    ]));
    both(&chain, &s)
}

/// The map line of the cluster at `start`, as qemu-img prints it.
fn map_has(out: &[String], start: u64, depth: u32) -> bool {
    let want = format!("\"start\": {start}, ");
    out.iter()
        .any(|l| l.contains(&want) && l.contains(&format!("\"depth\": {depth},")))
}

#[test]
fn copy_on_read_copies_the_chain_into_the_overlay_as_qsd() {
    let out = copy_on_read(None);
    assert_eq!(count(&out, "Bottom node 'c0' is a filter"), 1, "{out:#?}");
    assert_eq!(count(&out, "Bottom node 'nope' not found"), 1, "{out:#?}");
    assert_eq!(count(&out, "Parameter 'file' is missing"), 1, "{out:#?}");
    // Every cluster the reads touched is now in top (depth 0).
    assert!(map_has(&out, 0, 0), "{out:#?}");
    assert!(map_has(&out, 983040, 0), "{out:#?}");
    assert!(map_has(&out, 1179648, 0), "{out:#?}");
    assert_eq!(count(&out, "| differs"), 1, "{out:#?}");
}

#[test]
fn copy_on_read_with_bottom_copies_only_above_it_as_qsd() {
    let out = copy_on_read(Some("mid"));
    // Base's data stays in base (depth 2); mid's cluster came up.
    assert!(map_has(&out, 0, 2), "{out:#?}");
    assert!(map_has(&out, 1048576, 0), "{out:#?}");
    assert!(map_has(&out, 1179648, 0), "{out:#?}");
}

#[test]
fn copy_on_read_refuses_a_bottom_outside_the_chain() {
    // QSD 10.0.2 spins forever on this (differences entry 65): rsd only.
    let dir = TempDir::new();
    chain(&dir);
    make_image(&dir.s("other.raw"), "raw", "1M", None);
    let sock = dir.s("q.sock");
    let _d = Daemon::spawn(Which::Rsd, &crate::common::monitor_args(&sock));
    let mut q = crate::common::Qmp::ready(&dir.path("q.sock"));
    for c in [
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":"$D/top.qcow2"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"other","file":{"driver":"file","filename":"$D/other.raw"}}}"#,
    ] {
        let r = q.cmd(&c.replace("$D/", &dir.s("")));
        assert!(r.get("return").is_some(), "{r}");
    }
    let r = q.cmd(r#"{"execute":"blockdev-add","arguments":{"driver":"copy-on-read","node-name":"c0","file":"top","bottom":"other"}}"#);
    assert_eq!(
        r["error"]["desc"], "Bottom node 'other' is not in the backing chain of node 'top'",
        "{r}"
    );
}

fn empty_qcow2(d: &TempDir) {
    sh(d, "qemu-img create -q -f qcow2 $D/z.qcow2 64M");
}

#[test]
fn preallocate_grows_and_crops_the_file_as_qsd() {
    let s = steps(&[
        r#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"f","filename":"$D/z.qcow2"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"preallocate","node-name":"p","file":"f","prealloc-align":1000}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"preallocate","node-name":"p","file":"f","prealloc-align":-512}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"preallocate","node-name":"p","file":"f","prealloc-size":-5}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"preallocate","node-name":"p","file":"nope"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"preallocate","node-name":"p","file":"f","prealloc-size":1048576,"prealloc-align":65536}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q","file":"p"}}"#,
        r#"{"execute":"x-debug-query-block-graph"}"#,
        "sh stat -c '%s' $D/z.qcow2",
        NBD,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"q","writable":true}}"#,
        "sh qemu-io -f raw -c 'write -q -P 0x11 0 64k' 'nbd+unix:///q?socket=$D/n.sock'",
        "sh stat -c '%s %b' $D/z.qcow2",
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        "sh qemu-io -f raw -c 'write -q -P 0x22 1M 1M' 'nbd+unix:///q?socket=$D/n.sock'",
        "sh stat -c '%s %b' $D/z.qcow2",
        r#"{"execute":"block-export-del","arguments":{"id":"e","mode":"hard"}}"#,
        "until BLOCK_EXPORT_DELETED",
        r#"{"execute":"blockdev-del","arguments":{"node-name":"q"}}"#,
        "sh stat -c '%s %b' $D/z.qcow2",
        r#"{"execute":"blockdev-del","arguments":{"node-name":"p"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"f"}}"#,
        "sh stat -c '%s %b' $D/z.qcow2",
        "sh qemu-img check $D/z.qcow2 | head -1",
        "sh qemu-io -c 'read -q -P 0x11 0 64k' -c 'read -q -P 0x22 1M 1M' $D/z.qcow2 && echo data",
    ]);
    let out = both(&empty_qcow2, &s);
    assert_eq!(count(&out, "is not aligned to 512"), 1, "{out:#?}");
    assert_eq!(count(&out, "Value '-512' is out of range"), 1, "{out:#?}");
    // Grown ahead: 1 MiB past the write, 64 KiB aligned, then cropped.
    assert_eq!(count(&out, "| 1376256 "), 1, "{out:#?}");
    assert_eq!(count(&out, "| 1441792 "), 2, "{out:#?}");
    assert_eq!(count(&out, "| No errors were found on the image."), 1);
    assert_eq!(count(&out, "| data"), 1, "{out:#?}");
}

#[test]
fn preallocate_crops_the_file_on_quit() {
    let dir = TempDir::new();
    empty_qcow2(&dir);
    let sock = dir.s("q.sock");
    let mut a = crate::common::monitor_args(&sock);
    a.extend(args(&[
        "--blockdev",
        &format!(
            r#"{{"driver":"qcow2","node-name":"q","file":{{"driver":"preallocate","file":{{"driver":"file","filename":"{}"}}}}}}"#,
            dir.s("z.qcow2")
        ),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
        "--export",
        "nbd,id=e,node-name=q,writable=on",
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = crate::common::Qmp::ready(&dir.path("q.sock"));
    sh(
        &dir,
        "qemu-io -f raw -c 'write -q -P 0x11 0 64k' 'nbd+unix:///q?socket=$D/n.sock'",
    );
    let grown = std::fs::metadata(dir.path("z.qcow2"))
        .map(|m| m.len())
        .unwrap_or(0);
    // The default prealloc-size: 128 MiB past the data.
    assert!(grown > 128 << 20, "{grown}");
    q.cmd(r#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(10), Some(0));
    let cropped = std::fs::metadata(dir.path("z.qcow2"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert_eq!(cropped, 393216);
    ok(&run("qemu-img", &["check", "-q", &dir.s("z.qcow2")]));
}

fn data_and_log(d: &TempDir) {
    make_image(&d.s("d.raw"), "raw", "1M", None);
    make_image(&d.s("log.raw"), "raw", "0", None);
}

#[test]
fn blklogwrites_logs_as_qsd_byte_for_byte() {
    let io = |flags: &str, cmds: &str| {
        format!("sh qemu-io {flags} -f raw {cmds} 'nbd+unix:///b?socket=$D/n.sock'")
    };
    let mut s = steps(&[
        r#"{"execute":"blockdev-add","arguments":{"driver":"blklogwrites","node-name":"b","file":{"driver":"file","filename":"$D/d.raw"},"log":{"driver":"file","filename":"$D/log.raw"},"log-sector-size":100}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"blklogwrites","node-name":"b","file":{"driver":"file","filename":"$D/d.raw"},"log":{"driver":"file","filename":"$D/log.raw"},"log-super-update-interval":0}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"blklogwrites","node-name":"b","file":{"driver":"file","filename":"$D/d.raw"},"log":{"driver":"file","filename":"$D/log.raw"},"log-append":true,"log-sector-size":512}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"blklogwrites","node-name":"b","file":{"driver":"file","filename":"$D/d.raw"},"log":{"driver":"file","filename":"$D/d.raw"},"log-append":true}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"blklogwrites","node-name":"b","file":{"driver":"file","filename":"$D/d.raw"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"blklogwrites","node-name":"b","file":{"driver":"file","filename":"$D/d.raw"},"log":{"driver":"file","filename":"$D/log.raw"},"log-sector-size":4096,"log-super-update-interval":3}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"query-named-block-nodes"}"#,
        r#"{"execute":"x-debug-query-block-graph"}"#,
        NBD,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"b","writable":true}}"#,
    ]);
    // Writes, zeroes, a dropped discard (discard=ignore), a padded
    // write; FUA writes (qemu-io's default), then writeback ones.
    s.push(io("", "-c 'write -q -P 0x11 0 8k' -c 'write -q -z 64k 8k' -c 'discard -q 128k 4k' -c 'write -q -P 0x22 1000 100'"));
    s.push(io(
        "",
        "-c 'write -q -P 0x11 0 8k' -c 'write -q -P 0x11 0 8k' -c 'write -q -P 0x11 0 8k'",
    ));
    s.push(io(
        "-t writeback",
        "-c 'write -q -P 0x33 0 8k' -c 'write -q -P 0x44 8k 8k'",
    ));
    s.extend(steps(&[
        r#"{"execute":"block-export-del","arguments":{"id":"e","mode":"hard"}}"#,
        "until BLOCK_EXPORT_DELETED",
        r#"{"execute":"blockdev-del","arguments":{"node-name":"b"}}"#,
        "sh md5sum $D/log.raw $D/d.raw | cut -c1-32",
        "sh od -A d -t x8 -N 32 $D/log.raw",
        // Appending, with discards passed down this time.
        r#"{"execute":"blockdev-add","arguments":{"driver":"blklogwrites","node-name":"b","file":{"driver":"file","filename":"$D/d.raw"},"log":{"driver":"file","filename":"$D/log.raw"},"log-append":true,"discard":"unmap"}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"b","writable":true}}"#,
    ]));
    s.push(io(
        "",
        "-c 'write -q -P 0x55 4k 4k' -c 'discard -q 128k 4k'",
    ));
    s.extend(steps(&[
        r#"{"execute":"block-export-del","arguments":{"id":"e","mode":"hard"}}"#,
        "until BLOCK_EXPORT_DELETED",
        r#"{"execute":"blockdev-del","arguments":{"node-name":"b"}}"#,
        "sh md5sum $D/log.raw $D/d.raw | cut -c1-32",
        "sh od -A d -t x8 -N 32 $D/log.raw",
    ]));
    let out = both(&data_and_log, &s);
    assert_eq!(count(&out, "Invalid log sector size 100"), 1, "{out:#?}");
    assert_eq!(count(&out, "Invalid log superblock update interval 0"), 1);
    assert_eq!(count(&out, "are mutually exclusive"), 1);
    assert_eq!(count(&out, "Invalid log superblock magic"), 1);
    // The superblock: magic, version 1, then 15 and 18 entries.
    assert_eq!(
        count(&out, "| 0000000 006a736677736872 0000000000000001"),
        2,
        "{out:#?}"
    );
    assert_eq!(count(&out, "| 0000016 000000000000000f"), 1, "{out:#?}");
    assert_eq!(count(&out, "| 0000016 0000000000000012"), 1, "{out:#?}");
}

fn test_and_raw(d: &TempDir) {
    sh(d, "cd $D && qemu-img create -q -f raw t.raw 1M && qemu-io -f raw -c 'write -q -P 0x5 0 1M' t.raw \
        && cp t.raw r.raw && qemu-io -f raw -c 'write -q -P 0x6 8k 512' r.raw");
}

#[test]
fn blkverify_nodes_and_matching_reads_as_qsd() {
    let s = steps(&[
        r#"{"execute":"blockdev-add","arguments":{"driver":"blkverify","node-name":"v","test":{"driver":"file","filename":"$D/t.raw"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"blkverify","node-name":"v","raw":{"driver":"file","filename":"$D/r.raw"}}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"blkverify","node-name":"v","test":{"driver":"file","filename":"$D/t.raw"},"raw":{"driver":"file","filename":"$D/r.raw"}}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"query-named-block-nodes"}"#,
        r#"{"execute":"x-debug-query-block-graph"}"#,
        NBD,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"v","writable":true}}"#,
        "sh qemu-io -f raw -c 'read -q -P 5 0 4k' -c 'write -q -P 7 4k 4k' -c 'read -q -P 7 4k 4k' 'nbd+unix:///v?socket=$D/n.sock' && echo read",
        "sh qemu-io -f raw -c 'read -q -P 7 4k 4k' $D/r.raw && echo both",
    ]);
    let out = both(&test_and_raw, &s);
    assert_eq!(count(&out, "Parameter 'raw' is missing"), 1, "{out:#?}");
    assert_eq!(count(&out, "Parameter 'test' is missing"), 1, "{out:#?}");
    assert_eq!(count(&out, "| read"), 1, "{out:#?}");
    assert_eq!(count(&out, "| both"), 1, "{out:#?}");
}

#[test]
fn blkverify_mismatch_ends_the_daemon_as_qsd() {
    let mut ends = Vec::new();
    for which in Which::all() {
        let dir = TempDir::new();
        test_and_raw(&dir);
        let a = args(&[
            "--blockdev",
            &format!(
                r#"{{"driver":"blkverify","node-name":"v","test":{{"driver":"file","filename":"{}"}},"raw":{{"driver":"file","filename":"{}"}}}}"#,
                dir.s("t.raw"),
                dir.s("r.raw")
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
            "--export",
            "nbd,id=e,node-name=v,writable=on",
        ]);
        let mut d = Daemon::spawn(which, &a);
        assert!(crate::common::wait_for_path(&dir.path("n.sock"), 10));
        let o = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -q -P 5 8k 4k",
                &format!("nbd+unix:///v?socket={}", dir.s("n.sock")),
            ],
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Input/output error"),
            "{o:?}"
        );
        let code = d.wait_exit(10);
        ends.push((code, d.stderr_text()));
    }
    for (code, err) in &ends {
        assert_eq!(*code, Some(1), "{ends:?}");
        assert!(
            err.contains("blkverify: read offset=8192 bytes=4096 contents mismatch at offset 8192"),
            "{ends:?}"
        );
    }
}
