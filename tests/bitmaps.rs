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
    let long = format!(
        r#"{{"execute":"block-dirty-bitmap-add","arguments":{{"node":"q","name":"{}","persistent":true}}}}"#,
        "x".repeat(1024)
    );
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
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"p","persistent":true}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"ro","name":"rp","persistent":true,"disabled":true}}"#,
        &long,
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
        "Name length exceeds maximum (1023 characters)",
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
    let write = "sh qemu-io -f raw -c 'write 0 1' -c 'write 70000 5000' -c 'write -z 300k 64k' -c 'discard 900k 10k' -c 'write 1048000 576' 'nbd+unix:///q?socket=$D/nbd.sock' >/dev/null";
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
        "sh qemu-io -f raw -c 'write 600k 1' 'nbd+unix:///q?socket=$D/nbd.sock' >/dev/null",
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

/// A daemon on `dir` with a qcow2 node `q` over `dir/i.qcow2` and a
/// writable NBD export of it at `dir/nbd.sock`.
fn open_image(which: Which, dir: &TempDir, tag: &str) -> (Daemon, Qmp) {
    let sock = dir.s(&format!("{tag}.sock"));
    let mut a = monitor_args(&sock);
    a.extend(args(&["--pidfile", &dir.s(&format!("{tag}.pid"))]));
    let d = Daemon::spawn(which, &a);
    let mut q = Qmp::ready(&dir.path(&format!("{tag}.sock")));
    let add = format!(
        r#"{{"execute":"blockdev-add","arguments":{{"driver":"qcow2","node-name":"q","file":{{"driver":"file","filename":"{}"}}}}}}"#,
        dir.s("i.qcow2")
    );
    assert_eq!(q.cmd(&add)["return"], serde_json::json!({}), "{which:?}");
    let srv = format!(
        r#"{{"execute":"nbd-server-start","arguments":{{"addr":{{"type":"unix","data":{{"path":"{}"}}}}}}}}"#,
        dir.s("nbd.sock")
    );
    assert_eq!(q.cmd(&srv)["return"], serde_json::json!({}));
    let exp = r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"q","writable":true}}"#;
    assert_eq!(q.cmd(exp)["return"], serde_json::json!({}));
    (d, q)
}

fn quit(mut d: Daemon, mut q: Qmp) {
    q.cmd(r#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0), "{:?} did not quit", d.which);
}

fn sha(q: &mut Qmp, name: &str) -> String {
    let r = q.cmd(&format!(
        r#"{{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{{"node":"q","name":"{name}"}}}}"#
    ));
    r["return"]["sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_string()
}

/// The node's bitmaps as query-named-block-nodes shows them.
fn bitmaps_of(q: &mut Qmp) -> serde_json::Value {
    let r = q.cmd(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#);
    let nodes = r["return"].as_array().cloned().unwrap_or_default();
    let n = nodes
        .iter()
        .find(|n| n["node-name"] == "q")
        .expect("node q");
    n["dirty-bitmaps"].clone()
}

fn nbd_write(dir: &TempDir, cmds: &[&str]) {
    let url = format!("nbd+unix:///q?socket={}", dir.s("nbd.sock"));
    let mut a = vec!["-f", "raw"];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(&url);
    ok(&run("qemu-io", &a));
}

/// An image with bitmaps made by qemu-img: b1 (enabled), b2 (512-byte
/// granules, disabled, then enabled), m (b1 merged in), off (disabled).
fn qemu_img_bitmaps(dir: &TempDir) {
    let img = dir.s("i.qcow2");
    ok(&run("qemu-img", &["create", "-f", "qcow2", &img, "4M"]));
    let io = |c: &str| ok(&run("qemu-io", &["-f", "qcow2", "-c", c, &img]));
    io("write 0 64k");
    ok(&run("qemu-img", &["bitmap", "--add", &img, "b1"]));
    ok(&run(
        "qemu-img",
        &["bitmap", "--add", "-g", "512", "--disable", &img, "b2"],
    ));
    ok(&run(
        "qemu-img",
        &["bitmap", "--add", "--disable", &img, "off"],
    ));
    io("write 1M 70000");
    ok(&run("qemu-img", &["bitmap", "--enable", &img, "b2"]));
    io("write 3M 1");
    ok(&run(
        "qemu-img",
        &["bitmap", "--add", "--disable", &img, "m"],
    ));
    ok(&run("qemu-img", &["bitmap", "--merge", "b1", &img, "m"]));
}

#[test]
fn qemu_img_bitmaps_open_in_rsd_as_in_qsd() {
    let add = r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q","file":{"driver":"file","filename":"$D/i.qcow2"}}}"#;
    let mut steps = vec![
        add,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ];
    let shas: Vec<String> = ["b1", "b2", "off", "m"]
        .iter()
        .map(|n| {
            format!(
                r#"{{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{{"node":"q","name":"{n}"}}}}"#
            )
        })
        .collect();
    steps.extend(shas.iter().map(String::as_str));
    steps.extend([
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"p","persistent":true,"granularity":131072}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"long","persistent":true,"granularity":4096}}"#,
        r#"{"execute":"block-dirty-bitmap-remove","arguments":{"node":"q","name":"off"}}"#,
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/nbd.sock"}}}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"q","writable":true}}"#,
        "sh qemu-io -f raw -c 'write 2M 300k' -c 'write -z 3M 4k' 'nbd+unix:///q?socket=$D/nbd.sock' >/dev/null",
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    steps.extend(shas.iter().take(2).map(String::as_str));
    steps.push("sh qemu-img info -U --output=json $D/i.qcow2 | grep -c in-use");
    let out = same_transcripts(&qemu_img_bitmaps, &steps);
    assert!(out
        .iter()
        .any(|l| l.contains(r#""name":"m""#) && l.contains(r#""flags":["in-use"]"#)));
}

#[test]
fn rsd_writes_bitmaps_that_qemu_img_and_qsd_read_back() {
    let dir = TempDir::new();
    ok(&run(
        "qemu-img",
        &["create", "-f", "qcow2", &dir.s("i.qcow2"), "10M"],
    ));
    let (d, mut q) = open_image(Which::Rsd, &dir, "a");
    for add in [
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"on","persistent":true}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"fine","persistent":true,"granularity":512}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"off","persistent":true,"disabled":true}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"gone","persistent":true}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"mem"}}"#,
    ] {
        assert_eq!(q.cmd(add)["return"], serde_json::json!({}), "{add}");
    }
    nbd_write(&dir, &["write 0 1", "write 5M 3M", "write 9M 100k"]);
    q.cmd(r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"q","target":"off","bitmaps":["fine"]}}"#);
    q.cmd(r#"{"execute":"block-dirty-bitmap-remove","arguments":{"node":"q","name":"gone"}}"#);
    let names = ["on", "fine", "off"];
    let want: Vec<String> = names.iter().map(|n| sha(&mut q, n)).collect();
    let shown = bitmaps_of(&mut q);
    quit(d, q);
    ok(&run("qemu-img", &["check", &dir.s("i.qcow2")]));
    let info = ok(&run(
        "qemu-img",
        &["info", "--output=json", &dir.s("i.qcow2")],
    ));
    let info: serde_json::Value = serde_json::from_str(&info).expect("json");
    let list = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(
        list,
        &serde_json::json!([
            {"flags": ["auto"], "name": "on", "granularity": 65536},
            {"flags": ["auto"], "name": "fine", "granularity": 512},
            {"flags": [], "name": "off", "granularity": 65536},
        ])
    );
    // QSD, then rsd again, read the same bits.
    for which in Which::all().into_iter().rev() {
        let (d, mut q) = open_image(which, &dir, "b");
        let got: Vec<String> = names.iter().map(|n| sha(&mut q, n)).collect();
        assert_eq!(got, want, "{which:?}");
        let mut persisted = shown.clone();
        if let Some(a) = persisted.as_array_mut() {
            a.retain(|b| b["name"] != "mem");
        }
        assert_eq!(bitmaps_of(&mut q), persisted, "{which:?}");
        quit(d, q);
        ok(&run("qemu-img", &["check", &dir.s("i.qcow2")]));
    }
}

/// A daemon killed while it has the image open leaves its bitmaps
/// marked in use: both daemons then show them inconsistent.
#[test]
fn a_killed_rsd_leaves_bitmaps_inconsistent() {
    let setup = |dir: &TempDir| {
        qemu_img_bitmaps(dir);
        let (d, q) = open_image(Which::Rsd, dir, "k");
        d.signal(9);
        drop(q);
        let mut d = d;
        let st = d.child.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
        let info = ok(&run("qemu-img", &["info", "-U", &dir.s("i.qcow2")]));
        assert_eq!(info.matches("in-use").count(), 4, "{info}");
    };
    let out = same_transcripts(
        &setup,
        &[
            r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q","file":{"driver":"file","filename":"$D/i.qcow2"}}}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"q","name":"b1"}}"#,
            r#"{"execute":"block-dirty-bitmap-clear","arguments":{"node":"q","name":"b1"}}"#,
            r#"{"execute":"block-dirty-bitmap-enable","arguments":{"node":"q","name":"off"}}"#,
            r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"q","target":"b2","bitmaps":["m"]}}"#,
            r#"{"execute":"block-dirty-bitmap-remove","arguments":{"node":"q","name":"b2"}}"#,
            r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"b2","persistent":true}}"#,
            r#"{"execute":"quit"}"#,
        ],
    );
    assert_eq!(count(&out, r#""inconsistent":true"#), 1);
    assert_eq!(count(&out, "is inconsistent and cannot be used"), 3);
}

/// The `qemu:dirty-bitmap:NAME` meta context: what nbdinfo and
/// qemu-img map see of an exported bitmap, which is busy meanwhile.
#[test]
fn exported_bitmaps_show_dirty_ranges_as_in_qsd() {
    let url = "'nbd+unix:///q?socket=$D/nbd.sock'";
    let map = |ctx: &str| format!("sh nbdinfo --map=qemu:dirty-bitmap:{ctx} {url}");
    let m_frozen = "sh nbdinfo --map=qemu:dirty-bitmap:frozen 'nbd+unix:///ro?socket=$D/nbd.sock'";
    let img_map = |ctx: &str| {
        format!("sh qemu-img map --output=json --image-opts driver=nbd,server.type=unix,server.path=$D/nbd.sock,export=q,x-dirty-bitmap=qemu:dirty-bitmap:{ctx}")
    };
    let write = format!("sh qemu-io -f raw -c 'write 0 1' -c 'write 70000 5000' -c 'write -z 300k 64k' -c 'write 1048000 576' {url} >/dev/null");
    // After `frozen` is disabled: b0 and fine see this write, frozen not.
    let later = format!("sh qemu-io -f raw -c 'write 600k 4k' {url} >/dev/null");
    let list =
        "sh nbdinfo --list 'nbd+unix:///?socket=$D/nbd.sock' | grep -A5 contexts | grep -v is_";
    let (m_b0, m_fine) = (map("b0"), map("fine"));
    let (i_b0, i_fine) = (img_map("b0"), img_map("fine"));
    let mut steps: Vec<&str> = ADD_NODES.to_vec();
    steps.extend([
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/nbd.sock"}}}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"b0"}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"fine","granularity":512}}"#,
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"frozen"}}"#,
        // Errors: unknown, enabled on a read-only export, busy.
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"x","node-name":"q","bitmaps":["zz"]}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"x","node-name":"q","bitmaps":[{"node":"zz","name":"b0"}]}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"x","node-name":"q","bitmaps":[{"node":"r","name":"b0"}]}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"x","node-name":"q","bitmaps":["b0"]}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e1","node-name":"q","writable":true,"bitmaps":["b0",{"node":"q","name":"fine"}]}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"x","node-name":"q","name":"x","writable":true,"bitmaps":["fine"]}}"#,
        r#"{"execute":"block-dirty-bitmap-clear","arguments":{"node":"q","name":"b0"}}"#,
        r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"q","name":"fine"}}"#,
        r#"{"execute":"block-dirty-bitmap-remove","arguments":{"node":"q","name":"fine"}}"#,
        &write,
        r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"q","name":"frozen"}}"#,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e2","node-name":"q","name":"ro","bitmaps":["frozen"]}}"#,
        &later,
        list,
        &m_b0,
        &m_fine,
        &i_b0,
        &i_fine,
        m_frozen,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"block-export-del","arguments":{"id":"e1"}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"block-dirty-bitmap-remove","arguments":{"node":"q","name":"fine"}}"#,
    ]);
    let out = same_transcripts(&images, &steps);
    // b0 (64 KiB granules): 0-128K, 256K-384K, 960K-1M dirty.
    for want in [
        "|          0      131072    1  dirty",
        "|     262144      131072    1  dirty",
        "|     983040       65536    1  dirty",
        "|     589824       65536    1  dirty",
        "|      69632        5632    1  dirty",
        "qemu:dirty-bitmap:frozen",
    ] {
        assert!(out.iter().any(|l| l.contains(want)), "{want}: {out:#?}");
    }
    assert_eq!(count(&out, "is currently in use by another operation"), 4);
}

/// Bitmaps of an image opened read-only can be read, exported,
/// enabled or disabled, but not changed.
#[test]
fn bitmaps_of_a_read_only_image_are_readonly_as_in_qsd() {
    let out = same_transcripts(
        &qemu_img_bitmaps,
        &[
            r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"base","read-only":true,"file":{"driver":"file","filename":"$D/i.qcow2"}}}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            r#"{"execute":"block-dirty-bitmap-clear","arguments":{"node":"base","name":"b1"}}"#,
            r#"{"execute":"block-dirty-bitmap-remove","arguments":{"node":"base","name":"b1"}}"#,
            r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"base","name":"b1"}}"#,
            r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"base","name":"x"}}"#,
            r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"base","target":"x","bitmaps":["b1","m"]}}"#,
            r#"{"execute":"block-dirty-bitmap-merge","arguments":{"node":"base","target":"b1","bitmaps":["x"]}}"#,
            r#"{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{"node":"base","name":"x"}}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            // A read-only open leaves the image's flags alone.
            "sh qemu-img info -U $D/i.qcow2 | grep -c in-use || true",
        ],
    );
    assert_eq!(count(&out, "is readonly and cannot be modified"), 3);
    assert_eq!(out.last().map(String::as_str), Some("| 0"));
}

/// A bitmaps extension without its autoclear bit (a program without
/// bitmap support wrote the image) is dropped on a read-write open.
#[test]
fn a_stale_bitmaps_extension_is_dropped_as_in_qsd() {
    let setup = |dir: &TempDir| {
        qemu_img_bitmaps(dir);
        let path = dir.path("i.qcow2");
        let mut b = std::fs::read(&path).expect("image");
        b[95] &= !1; // autoclear bit 0, big-endian at offset 88
        std::fs::write(&path, b).expect("image");
    };
    let out = same_transcripts(
        &setup,
        &[
            r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q","file":{"driver":"file","filename":"$D/i.qcow2"}}}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            "sh qemu-img info -U $D/i.qcow2 | grep -c granularity || true",
        ],
    );
    assert_eq!(out.last().map(String::as_str), Some("| 0"));
}

/// blockdev-reopen: going read-write marks the image's bitmaps in use
/// and lets them change; going read-only stores them (a new persistent
/// one too) and makes them read-only, as in QSD.
#[test]
fn reopen_moves_bitmaps_between_read_only_and_read_write_as_in_qsd() {
    let reopen = |ro: bool| {
        format!(
            r#"{{"execute":"blockdev-reopen","arguments":{{"options":[{{"driver":"qcow2","node-name":"q","read-only":{ro},"file":"f"}}]}}}}"#
        )
    };
    let (rw, ro) = (reopen(false), reopen(true));
    let out = same_transcripts(
        &qemu_img_bitmaps,
        &[
            r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q","read-only":true,"file":{"driver":"file","node-name":"f","filename":"$D/i.qcow2"}}}"#,
            r#"{"execute":"block-dirty-bitmap-clear","arguments":{"node":"q","name":"b1"}}"#,
            "sh qemu-img info -U $D/i.qcow2 | grep -c in-use || true",
            &rw,
            "sh qemu-img info -U $D/i.qcow2 | grep -c in-use",
            r#"{"execute":"block-dirty-bitmap-clear","arguments":{"node":"q","name":"b1"}}"#,
            r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"n","persistent":true}}"#,
            &ro,
            "sh qemu-img info -U $D/i.qcow2 | grep -c 'in-use\\|name: n'",
            r#"{"execute":"block-dirty-bitmap-clear","arguments":{"node":"q","name":"b2"}}"#,
            r#"{"execute":"block-dirty-bitmap-clear","arguments":{"node":"q","name":"n"}}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        ],
    );
    assert_eq!(count(&out, "is readonly and cannot be modified"), 3);
    assert!(out.contains(&"| 4".to_string()), "{out:#?}");
}

/// A crash with lazy refcounts leaves the image dirty; rsd's repair on
/// the next open counts the bitmaps' clusters too, so they survive and
/// `qemu-img check` finds nothing.
#[test]
fn repairing_a_dirty_image_keeps_its_bitmaps() {
    let dir = TempDir::new();
    let img = dir.s("i.qcow2");
    ok(&run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            &img,
            "4M",
        ],
    ));
    ok(&run("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", &img]));
    ok(&run("qemu-img", &["bitmap", "--add", &img, "b1"]));
    ok(&run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write 1M 64k", &img],
    ));
    ok(&run("qemu-img", &["bitmap", "--add", &img, "b2"]));
    let (mut d, q) = open_image(Which::Rsd, &dir, "a");
    nbd_write(&dir, &["write 2M 64k", "write 3M 64k", "flush"]);
    d.signal(9);
    drop(q);
    let _ = d.child.wait();
    let header = std::fs::read(&img).expect("image");
    assert_eq!(header[79] & 1, 1, "the dirty bit is set");
    let (d, mut q) = open_image(Which::Rsd, &dir, "b");
    let shown = bitmaps_of(&mut q);
    assert_eq!(shown.as_array().map(Vec::len), Some(2), "{shown}");
    quit(d, q);
    ok(&run("qemu-img", &["check", &img]));
    let info = ok(&run("qemu-img", &["info", &img]));
    assert!(
        info.contains("name: b1") && info.contains("name: b2"),
        "{info}"
    );
}

/// The part of a backup tool's cycle this covers: a persistent bitmap
/// records writes, survives a restart of rsd, and its changed ranges are
/// read over NBD afterwards, the same as QSD shows them for that image.
#[test]
fn a_persistent_bitmap_survives_a_restart_and_exports_its_ranges() {
    let dir = TempDir::new();
    ok(&run(
        "qemu-img",
        &["create", "-f", "qcow2", &dir.s("i.qcow2"), "8M"],
    ));
    let (d, mut q) = open_image(Which::Rsd, &dir, "a");
    let add = r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"q","name":"inc","persistent":true}}"#;
    assert_eq!(q.cmd(add)["return"], serde_json::json!({}));
    nbd_write(&dir, &["write 1M 100k", "write 5M 1", "write -z 7M 64k"]);
    quit(d, q);
    let mut maps = Vec::new();
    for which in Which::all() {
        let (d, mut q) = open_image(which, &dir, "b");
        // Frozen for the read, then exported on its own export.
        q.cmd(r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"q","name":"inc"}}"#);
        let exp = r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"inc","node-name":"q","name":"inc","bitmaps":["inc"]}}"#;
        assert_eq!(q.cmd(exp)["return"], serde_json::json!({}), "{which:?}");
        let url = format!("nbd+unix:///inc?socket={}", dir.s("nbd.sock"));
        maps.push(ok(&run("nbdinfo", &["--map=qemu:dirty-bitmap:inc", &url])));
        q.cmd(r#"{"execute":"block-export-del","arguments":{"id":"inc"}}"#);
        q.cmd(r#"{"execute":"block-dirty-bitmap-enable","arguments":{"node":"q","name":"inc"}}"#);
        quit(d, q);
    }
    let dirty: Vec<&str> = maps[0].lines().filter(|l| l.ends_with("dirty")).collect();
    assert_eq!(
        dirty,
        [
            "   1048576      131072    1  dirty",
            "   5242880       65536    1  dirty",
            "   7340032       65536    1  dirty",
        ]
    );
    if maps.len() == 2 {
        assert_eq!(maps[0], maps[1]);
    }
    ok(&run("qemu-img", &["check", &dir.s("i.qcow2")]));
}

/// `transaction` with bitmap actions: each one undone when a later
/// action fails (add, clear, enable/disable, merge), remove done only
/// when all succeed; replies and the bitmaps afterwards as QSD's.
#[test]
fn bitmap_transactions_match_qsd() {
    let setup = |d: &TempDir| {
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &d.s("a.qcow2"), "4M"],
        ));
    };
    let tx = |actions: &str| {
        format!(r#"{{"execute":"transaction","arguments":{{"actions":[{actions}]}}}}"#)
    };
    let abort = r#"{"type":"abort","data":{}}"#;
    let bm = |kind: &str, name: &str| {
        format!(r#"{{"type":"block-dirty-bitmap-{kind}","data":{{"node":"a","name":"{name}"}}}}"#)
    };
    let merge =
        r#"{"type":"block-dirty-bitmap-merge","data":{"node":"a","target":"b2","bitmaps":["b0"]}}"#;
    let sha = |name: &str| {
        format!(
            r#"{{"execute":"x-debug-block-dirty-bitmap-sha256","arguments":{{"node":"a","name":"{name}"}}}}"#
        )
    };
    let query = r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.to_string();
    let steps = [
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"a","name":"b0"}}"#.to_string(),
        r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"a","name":"b2"}}"#.to_string(),
        "sh qemu-io -f raw -c 'write -q -P 0x11 0 64k' -c 'write -q -P 0x22 1M 128k' nbd+unix:///a?socket=$D/n.sock".to_string(),
        sha("b0"),
        tx(&format!("{},{abort}", bm("add", "b1"))),
        tx(&format!("{},{abort}", bm("clear", "b0"))),
        sha("b0"),
        tx(&format!("{},{}", bm("disable", "b0"), bm("add", "b0"))),
        tx(&format!("{merge},{abort}")),
        sha("b2"),
        tx(&format!("{},{abort}", bm("remove", "b0"))),
        query.clone(),
        tx(&format!("{},{}", bm("disable", "b2"), bm("add", "b3"))),
        tx(&format!("{merge},{}", bm("remove", "b0"))),
        sha("b2"),
        query,
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let setup_steps = |d: &TempDir| setup(d);
    let out = crate::jobs::same_transcripts(
        &setup_steps,
        &[
            &[
                r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"a","file":{"driver":"file","filename":"$D/a.qcow2"}}}"#,
                r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"$D/n.sock"}}}}"#,
                r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"a","writable":true}}"#,
            ][..],
            &steps[..],
        ]
        .concat(),
    );
    let text = out.join("\n");
    assert!(
        text.contains("Transaction aborted using Abort action"),
        "{text}"
    );
    assert!(text.contains("Bitmap already exists: b0"), "{text}");
}

/// The cycle a backup tool runs: a full backup and a new persistent
/// bitmap in one transaction; writes over NBD; rsd restarted (the bitmap
/// persists); the changed ranges read over NBD with the dirty-bitmap
/// context; an incremental backup into an image backed by the full one;
/// the restore (full + incremental) equals the source.
#[test]
fn full_and_incremental_backup_cycle() {
    let dir = TempDir::new();
    let (src, full, inc) = (dir.s("src.qcow2"), dir.s("full.qcow2"), dir.s("inc.qcow2"));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &src, "8M"],
    ));
    ok(&run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 4M", &src],
    ));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &full, "8M"],
    ));
    let start = |tag: &str, extra: &[&str]| {
        let mut a = monitor_args(&dir.s(&format!("q{tag}.sock")));
        a.extend(args(&[
            "--blockdev",
            &format!("driver=qcow2,node-name=src,file.driver=file,file.filename={src}"),
            "--nbd-server",
            &format!(
                "addr.type=unix,addr.path={}",
                dir.s(&format!("n{tag}.sock"))
            ),
        ]));
        a.extend(args(extra));
        let d = Daemon::spawn(Which::Rsd, &a);
        let q = Qmp::ready(&dir.path(&format!("q{tag}.sock")));
        (d, q)
    };
    let cmd = |q: &mut Qmp, s: &str| {
        let r = q.cmd(s);
        assert!(r.get("return").is_some(), "{s}: {r}");
        r
    };
    // 1. Full backup and the bitmap, at the same point in time.
    let (mut d, mut q) = start(
        "1",
        &[
            "--blockdev",
            &format!("driver=qcow2,node-name=full,file.driver=file,file.filename={full}"),
            "--export",
            "type=nbd,id=e,node-name=src,writable=on",
        ],
    );
    cmd(
        &mut q,
        r#"{"execute":"transaction","arguments":{"actions":[
            {"type":"block-dirty-bitmap-add","data":{"node":"src","name":"b0","persistent":true}},
            {"type":"blockdev-backup","data":{"job-id":"f","device":"src","target":"full","sync":"full"}}]}}"#,
    );
    // Writes while the backup may still run: they are the bitmap's, not
    // the full backup's.
    let url = format!("nbd+unix:///src?socket={}", dir.s("n1.sock"));
    let out = ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x22 1M 64k",
            "-c",
            "write -P 0x33 6M 128k",
            &url,
        ],
    ));
    assert!(!out.contains("fail"), "{out}");
    wait_no_jobs(&mut q);
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0));
    // The full backup is the source as it was at the transaction.
    let check = ok(&run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 0 4M",
            "-c",
            "read -P 0 4M 4M",
            &full,
        ],
    ));
    assert!(!check.contains("fail"), "{check}");
    // 2. After a restart: the bitmap is there, its ranges over NBD.
    let (mut d, mut q) = start("2", &[]);
    let r = cmd(
        &mut q,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    );
    let bm = &r["return"][0]["dirty-bitmaps"][0];
    assert_eq!(bm["name"], "b0", "{r}");
    assert_eq!(bm["count"], 196608, "{r}");
    // Frozen while it is read (QEMU exports only disabled bitmaps on a
    // read-only export).
    cmd(
        &mut q,
        r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"src","name":"b0"}}"#,
    );
    cmd(
        &mut q,
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"m","node-name":"src","name":"m","bitmaps":["b0"]}}"#,
    );
    let map = ok(&run(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "--image-opts",
            &format!(
                "driver=nbd,export=m,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:b0",
                dir.s("n2.sock")
            ),
        ],
    ));
    // With x-dirty-bitmap, "data": false marks the dirty ranges.
    let v: serde_json::Value = serde_json::from_str(&map).expect("map json");
    let dirty: Vec<(u64, u64)> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["data"] == false)
        .map(|e| {
            (
                e["start"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(dirty, [(1 << 20, 65536), (6 << 20, 131072)], "{map}");
    cmd(
        &mut q,
        r#"{"execute":"block-export-del","arguments":{"id":"m"}}"#,
    );
    cmd(
        &mut q,
        r#"{"execute":"block-dirty-bitmap-enable","arguments":{"node":"src","name":"b0"}}"#,
    );
    // 3. The incremental backup, into an image backed by the full one.
    ok(&run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &full, "-F", "qcow2", &inc,
        ],
    ));
    cmd(
        &mut q,
        &format!(
            r#"{{"execute":"blockdev-add","arguments":{{"driver":"qcow2","node-name":"inc","file":{{"driver":"file","filename":"{inc}"}}}}}}"#
        ),
    );
    cmd(
        &mut q,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"i","device":"src","target":"inc","sync":"incremental","bitmap":"b0"}}"#,
    );
    wait_no_jobs(&mut q);
    let r = cmd(
        &mut q,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    );
    let src_node = r["return"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "src"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(src_node["dirty-bitmaps"][0]["count"], 0, "{src_node}");
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0));
    // The incremental image holds only the changed clusters.
    let map = ok(&run(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", &inc],
    ));
    let v: serde_json::Value = serde_json::from_str(&map).expect("map json");
    let own: u64 = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(own, 196608, "{map}");
    // 4. Restore: full + incremental is the source.
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", &src, &inc],
    );
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    for img in [&src, &full, &inc] {
        ok(&run("qemu-img", &["check", img]));
    }
}
