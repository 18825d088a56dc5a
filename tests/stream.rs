//! block-stream against qemu-storage-daemon (transcripts, the header it
//! writes) and under a live NBD client (no guest write lost, the data
//! the chain held kept).

use crate::common::*;
use crate::jobs::{count, same_transcripts};

/// base.qcow2 (0x11 at 0-4M) <- mid.qcow2 (0x22 at 2M-6M) <- top.qcow2
/// (0x33 at 5M-7M), 16 MiB each, with relative backing names.
pub fn chain(d: &TempDir) {
    let img = |args: &[&str]| ok(&run("qemu-img", args));
    img(&["create", "-q", "-f", "qcow2", &d.s("base.qcow2"), "16M"]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &d.s("mid.qcow2"),
    ]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &d.s("top.qcow2"),
    ]);
    for (f, p, off, len) in [
        ("base", "0x11", "0", "4M"),
        ("mid", "0x22", "2M", "4M"),
        ("top", "0x33", "5M", "2M"),
    ] {
        let c = format!("write -P {p} {off} {len}");
        ok(&run(
            "qemu-io",
            &["-f", "qcow2", "-c", &c, &d.s(&format!("{f}.qcow2"))],
        ));
    }
}

const EXPLICIT: [&str; 3] = [
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"base","file":{"driver":"file","filename":"$D/base.qcow2"}}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"mid","backing":"base","file":{"driver":"file","filename":"$D/mid.qcow2"}}}"#,
    r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"top","backing":"mid","file":{"driver":"file","filename":"$D/top.qcow2"}}}"#,
];

#[test]
fn stream_to_a_base_and_errors_match_qsd() {
    let mut steps: Vec<&str> = EXPLICIT.to_vec();
    steps.extend([
        r#"{"execute":"block-stream","arguments":{"device":"top"}}"#,
        r#"{"execute":"block-stream","arguments":{"job-id":"s","device":"nosuch"}}"#,
        r#"{"execute":"block-stream","arguments":{"job-id":"s","device":"top","base":"x","base-node":"base"}}"#,
        r#"{"execute":"block-stream","arguments":{"job-id":"s","device":"top","base-node":"nosuch"}}"#,
        r#"{"execute":"block-stream","arguments":{"job-id":"s","device":"top","base-node":"top"}}"#,
        r#"{"execute":"block-stream","arguments":{"job-id":"s","device":"top","speed":-1}}"#,
        r#"{"execute":"block-stream","arguments":{"job-id":"s1","device":"top","base-node":"base"}}"#,
        r#"until "null""#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    let out = same_transcripts(&chain, &steps);
    assert_eq!(count(&out, r#""event":"BLOCK_JOB_COMPLETED""#), 1);
}

#[test]
fn full_stream_of_an_implicit_chain_matches_qsd() {
    let steps = [
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"top","file":{"driver":"file","filename":"$D/top.qcow2"}}}"#,
        r#"{"execute":"block-stream","arguments":{"job-id":"s1","device":"top"}}"#,
        r#"until "null""#,
        r#"{"execute":"query-named-block-nodes"}"#,
    ];
    let out = same_transcripts(&chain, &steps);
    assert_eq!(count(&out, "mid.qcow2"), 0, "mid is gone: {out:#?}");
}

/// Streams (slowly) while a client writes each 64 KiB block of 1M-7M
/// once with its own pattern: afterwards every written block holds its
/// pattern, every other block what the chain held, and the top stands
/// alone (its header names no backing file).
#[test]
fn stream_under_live_writes_loses_nothing() {
    let dir = TempDir::new();
    chain(&dir);
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!(
            "driver=qcow2,node-name=top,file.driver=file,file.filename={}",
            dir.s("top.qcow2")
        ),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
        "--export",
        "type=nbd,id=e,node-name=top,writable=on",
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let url = format!("nbd+unix:///top?socket={}", dir.s("n.sock"));
    let r = q.cmd(
        r#"{"execute":"block-stream","arguments":{"job-id":"s","device":"top","speed":4194304}}"#,
    );
    assert!(r.get("return").is_some(), "{r}");
    // Every other 64 KiB block of 1M-7M, in an order that crosses the
    // stream's progress.
    let blocks: Vec<u64> = (0..48u64).map(|i| 16 + (i * 29 % 48) * 2).collect();
    for chunk in blocks.chunks(8) {
        let cmds: Vec<String> = chunk
            .iter()
            .map(|b| format!("write -P {} {} 64k", 0x80 + b % 100, b * 65536))
            .collect();
        let mut argv = vec!["-f", "raw"];
        for c in &cmds {
            argv.extend(["-c", c.as_str()]);
        }
        argv.push(&url);
        ok(&run("qemu-io", &argv));
    }
    wait_no_jobs(&mut q);
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0));
    let info = ok(&run(
        "qemu-img",
        &["info", "--output=json", &dir.s("top.qcow2")],
    ));
    assert!(!info.contains("backing-filename"), "{info}");
    ok(&run("qemu-img", &["check", &dir.s("top.qcow2")]));
    // What every 64 KiB block must read as.
    let expect = |b: u64| -> u8 {
        if blocks.contains(&b) {
            return (0x80 + b % 100) as u8;
        }
        let off = b * 65536;
        match off {
            o if (5 << 20..7 << 20).contains(&o) => 0x33,
            o if (2 << 20..6 << 20).contains(&o) => 0x22,
            o if o < 4 << 20 => 0x11,
            _ => 0,
        }
    };
    let cmds: Vec<String> = (0..256u64)
        .map(|b| format!("read -P {} {} 64k", expect(b), b * 65536))
        .collect();
    let mut argv = vec!["-f", "qcow2"];
    for c in &cmds {
        argv.extend(["-c", c.as_str()]);
    }
    let top = dir.s("top.qcow2");
    argv.push(&top);
    let out = run("qemu-io", &argv);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("fail"), "{text}");
}

/// backing-mask-protocol: a stream down to a base that is a protocol
/// node (a bare file) records the base's format as "file", or as "raw"
/// with the mask, in the header, as QSD writes it.
#[test]
fn stream_backing_mask_protocol_matches_qsd() {
    for mask in [false, true] {
        let mut fmts = Vec::new();
        for which in Which::all() {
            let dir = TempDir::new();
            let (base, mid, top) = (dir.s("base.raw"), dir.s("mid.qcow2"), dir.s("top.qcow2"));
            ok(&run(
                "qemu-img",
                &["create", "-q", "-f", "raw", &base, "4M"],
            ));
            ok(&run(
                "qemu-img",
                &[
                    "create", "-q", "-f", "qcow2", "-b", &base, "-F", "raw", &mid,
                ],
            ));
            ok(&run(
                "qemu-io",
                &["-f", "qcow2", "-c", "write -P 0x44 0 64k", &mid],
            ));
            ok(&run(
                "qemu-img",
                &[
                    "create", "-q", "-f", "qcow2", "-b", &mid, "-F", "qcow2", &top,
                ],
            ));
            let mut a = monitor_args(&dir.s("q.sock"));
            a.extend(args(&[
                "--blockdev",
                &format!("driver=file,node-name=base,filename={base}"),
                "--blockdev",
                &format!(
                    "driver=qcow2,node-name=mid,backing=base,file.driver=file,file.filename={mid}"
                ),
                "--blockdev",
                &format!(
                    "driver=qcow2,node-name=top,backing=mid,file.driver=file,file.filename={top}"
                ),
            ]));
            let mut d = Daemon::spawn(which, &a);
            let mut q = Qmp::ready(&dir.path("q.sock"));
            let r = q.cmd(&format!(
                r#"{{"execute":"block-stream","arguments":{{"job-id":"s","device":"top","base-node":"base","backing-mask-protocol":{mask}}}}}"#
            ));
            assert!(r.get("return").is_some(), "{which:?}: {r}");
            wait_no_jobs(&mut q);
            q.send(br#"{"execute":"quit"}"#);
            assert_eq!(d.wait_exit(20), Some(0));
            let info = ok(&run("qemu-img", &["info", "--output=json", "-U", &top]));
            let v: serde_json::Value = serde_json::from_str(&info).expect("json");
            fmts.push(v["backing-filename-format"].clone());
            let data = ok(&run(
                "qemu-io",
                &["-r", "-f", "qcow2", "-c", "read -P 0x44 0 64k", &top],
            ));
            assert!(!data.contains("fail"), "{which:?}: {data}");
        }
        let want = if mask { "raw" } else { "file" };
        assert_eq!(fmts[0], want, "mask {mask}: {fmts:?}");
        if fmts.len() == 2 {
            assert_eq!(fmts[0], fmts[1], "mask {mask}: rsd, then QSD");
        }
    }
}
