//! LUKS through rsd against QEMU's own tools: images qemu-img made (and
//! qemu-io wrote) read back through an rsd NBD export; images rsd made
//! (blockdev-create, x-blockdev-amend) open in qemu-img with the same
//! secret; rsd's replies and errors equal QSD's; secrets never reach the
//! logs or query output.
use std::path::Path;

use crate::common::*;
use crate::jobs::same_transcripts;

/// Passwords distinctive enough to grep for.
pub(crate) const PW: &str = "pw-Kq7ZrT2x";
pub(crate) const NEW_PW: &str = "new-Wm4VbN8c";

pub(crate) fn secret_obj(id: &str, pw: &str) -> String {
    format!("secret,id={id},data={pw}")
}

/// qemu-img/qemu-io's --image-opts for a LUKS file (and detached header).
fn luks_opts(file: &str, header: Option<&str>) -> String {
    let mut o = format!("driver=luks,key-secret=s,file.filename={file}");
    if let Some(h) = header {
        o.push_str(&format!(",header.driver=file,header.filename={h}"));
    }
    o
}

/// qemu-io on a LUKS image opened with `pw`; fails on any error or
/// miscompare.
pub(crate) fn qemu_io_luks(opts: &str, pw: &str, cmds: &[&str]) -> String {
    let obj = secret_obj("s", pw);
    let mut a = vec!["--object", &obj, "--image-opts", opts];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    let out = ok(&run("qemu-io", &a));
    assert!(
        !out.contains("fail") && !out.contains("rror") && !out.contains("Pattern verification"),
        "qemu-io {opts}: {out}"
    );
    out
}

fn make_luks(path: &str, size: &str, extra: &str) {
    let obj = secret_obj("s", PW);
    let o = format!("key-secret=s,iter-time=10{extra}");
    ok(&run(
        "qemu-img",
        &[
            "create", "-q", "-f", "luks", "--object", &obj, "-o", &o, path, size,
        ],
    ));
}

/// rsd with the secret and a monitor, started and ready.
pub(crate) fn start_rsd(dir: &TempDir, extra: &[&str]) -> (Daemon, Qmp) {
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&["--object", &secret_obj("s", PW)]));
    a.extend(args(extra));
    a.extend(args(&["--pidfile", &dir.s("p.pid")]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    if !wait_for_path(&dir.path("p.pid"), 30) {
        d.signal(9);
        panic!("rsd did not start: {}", d.stderr_text());
    }
    let q = Qmp::ready(&dir.path("q.sock"));
    (d, q)
}

pub(crate) fn quit(mut d: Daemon, mut q: Qmp) -> String {
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(30), Some(0));
    d.stderr_text()
}

fn nbd_url(dir: &TempDir) -> String {
    format!("nbd+unix:///l?socket={}", dir.s("nbd.sock"))
}

#[test]
fn qemu_img_luks_image_reads_and_writes_through_rsd() {
    let dir = TempDir::new();
    let img = dir.s("a.luks");
    make_luks(&img, "8M", "");
    let opts = luks_opts(&img, None);
    qemu_io_luks(
        &opts,
        PW,
        &["write -P 0x5a 0 1M", "write -P 0x3c 1049088 65536"],
    );
    let (d, mut q) = start_rsd(
        &dir,
        &[
            "--blockdev",
            &format!("driver=luks,node-name=l,key-secret=s,file.driver=file,file.filename={img}"),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", dir.s("nbd.sock")),
            "--export",
            "type=nbd,id=e,node-name=l,writable=on",
        ],
    );
    let url = nbd_url(&dir);
    // What qemu-io wrote, read through rsd.
    let o = ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "read -P 0x3c 1049088 65536",
            &url,
        ],
    ));
    assert!(!o.contains("fail") && !o.contains("Pattern"), "{o}");
    // Writes through rsd: aligned, and unaligned (read-modify-write of
    // partial sectors, which rsd does itself).
    let o = ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 4M 128k",
            "-c",
            "write -P 0x11 5243000 300",
            &url,
        ],
    ));
    assert!(!o.contains("fail"), "{o}");
    let r = q.cmd(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#);
    let l = &r["return"][0];
    assert_eq!(l["node-name"], "l");
    assert_eq!(l["encrypted"], true);
    assert_eq!(
        l["image"]["format-specific"]["data"]["cipher-alg"],
        "aes-256"
    );
    assert_eq!(l["image"]["virtual-size"], 8 << 20);
    quit(d, q);
    qemu_io_luks(
        &opts,
        PW,
        &[
            "read -P 0x5a 0 1M",
            "read -P 0x77 4M 128k",
            "read -P 0x11 5243000 300",
        ],
    );
}

#[test]
fn every_cipher_qemu_img_offers_reads_in_rsd() {
    let dir = TempDir::new();
    let combos = [
        ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
        ",cipher-alg=aes-192,cipher-mode=xts,hash-alg=sha1",
        ",cipher-alg=serpent-256,cipher-mode=ctr,ivgen-alg=plain",
        ",cipher-alg=twofish-128,cipher-mode=ecb,hash-alg=sha512",
        ",cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5",
        ",cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sm3,hash-alg=ripemd160",
    ];
    let mut blockdevs = Vec::new();
    for (i, c) in combos.iter().enumerate() {
        let img = dir.s(&format!("c{i}.luks"));
        make_luks(&img, "1M", c);
        qemu_io_luks(
            &luks_opts(&img, None),
            PW,
            &[&format!("write -P {} 4096 65536", 0x40 + i)],
        );
        blockdevs.push("--blockdev".to_string());
        blockdevs.push(format!(
            "driver=luks,node-name=l{i},key-secret=s,file.driver=file,file.filename={img}"
        ));
    }
    let extra: Vec<&str> = blockdevs.iter().map(String::as_str).collect();
    let mut extra = extra;
    let sock = format!("addr.type=unix,addr.path={}", dir.s("nbd.sock"));
    extra.extend(["--nbd-server", &sock]);
    let exports: Vec<String> = (0..combos.len())
        .map(|i| format!("type=nbd,id=e{i},node-name=l{i}"))
        .collect();
    for e in &exports {
        extra.extend(["--export", e]);
    }
    let (d, q) = start_rsd(&dir, &extra);
    for (i, combo) in combos.iter().enumerate() {
        let url = format!("nbd+unix:///l{i}?socket={}", dir.s("nbd.sock"));
        let cmd = format!("read -P {} 4096 65536", 0x40 + i);
        let o = ok(&run("qemu-io", &["-r", "-f", "raw", "-c", &cmd, &url]));
        assert!(
            !o.contains("fail") && !o.contains("Pattern"),
            "{combo}: {o}"
        );
    }
    quit(d, q);
}

/// Waits for every job, then says whether `id` ended without an error.
pub(crate) fn job_ok(q: &mut Qmp, id: &str) -> Result<(), String> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let r = q.cmd(r#"{"execute":"query-jobs"}"#);
        let jobs = r["return"].as_array().cloned().unwrap_or_default();
        let j = jobs.iter().find(|j| j["id"] == id).cloned();
        if let Some(j) = j.filter(|j| j["status"] == "concluded") {
            q.cmd(&format!(
                r#"{{"execute":"job-dismiss","arguments":{{"id":"{id}"}}}}"#
            ));
            return match j.get("error") {
                Some(e) => Err(e.as_str().unwrap_or_default().to_string()),
                None => Ok(()),
            };
        }
        assert!(
            std::time::Instant::now() < until,
            "job {id} never ended: {r}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub(crate) fn empty(path: &Path) {
    std::fs::write(path, b"").expect("touch");
}

#[test]
fn rsd_created_luks_images_open_in_qemu_img() {
    let dir = TempDir::new();
    for f in ["r.luks", "h.luks", "d.raw"] {
        empty(&dir.path(f));
    }
    let (d, mut q) = start_rsd(&dir, &[]);
    for (n, f) in [("f", "r.luks"), ("h", "h.luks"), ("d", "d.raw")] {
        let r = q.cmd(&format!(
            r#"{{"execute":"blockdev-add","arguments":{{"driver":"file","node-name":"{n}","filename":"{}"}}}}"#,
            dir.s(f)
        ));
        assert_eq!(r["return"], serde_json::json!({}), "{r}");
    }
    q.cmd(r#"{"execute":"blockdev-create","arguments":{"job-id":"j0","options":{"driver":"luks","file":"f","size":4194304,"key-secret":"s","iter-time":10,"cipher-alg":"twofish-256","cipher-mode":"cbc","ivgen-alg":"essiv","hash-alg":"sha1"}}}"#);
    q.cmd(r#"{"execute":"blockdev-create","arguments":{"job-id":"j1","options":{"driver":"luks","file":"d","header":"h","size":2097152,"key-secret":"s","iter-time":10}}}"#);
    assert_eq!(job_ok(&mut q, "j0"), Ok(()));
    assert_eq!(job_ok(&mut q, "j1"), Ok(()));
    // Written through rsd, then read by qemu-io (what nobody wrote reads
    // as whatever the file's zeroes decrypt to, in QEMU too).
    q.cmd(r#"{"execute":"blockdev-add","arguments":{"driver":"luks","node-name":"l","file":"f","key-secret":"s"}}"#);
    let sock = dir.s("nbd.sock");
    q.cmd(&format!(r#"{{"execute":"nbd-server-start","arguments":{{"addr":{{"type":"unix","data":{{"path":"{sock}"}}}}}}}}"#));
    q.cmd(r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"l","writable":true}}"#);
    let o = ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x61 1M 512k", &nbd_url(&dir)],
    ));
    assert!(!o.contains("fail"), "{o}");
    quit(d, q);
    let r = run(
        "qemu-img",
        &[
            "info",
            "--object",
            &secret_obj("s", PW),
            "--image-opts",
            &luks_opts(&dir.s("r.luks"), None),
        ],
    );
    let info = ok(&r);
    assert!(
        info.contains("cipher alg: twofish-256") && info.contains("ivgen alg: essiv"),
        "{info}"
    );
    assert!(info.contains("virtual size: 4 MiB"), "{info}");
    qemu_io_luks(
        &luks_opts(&dir.s("r.luks"), None),
        PW,
        &["read -P 0x61 1M 512k"],
    );
    // The detached header's volume: payload from offset 0 of d.raw.
    assert_eq!(
        std::fs::metadata(dir.path("d.raw")).map(|m| m.len()).ok(),
        Some(2 << 20)
    );
    qemu_io_luks(
        &luks_opts(&dir.s("d.raw"), Some(&dir.s("h.luks"))),
        PW,
        &["write -P 0x22 0 64k", "read -P 0x22 0 64k"],
    );
    // And the other way: what qemu-io wrote there, rsd reads.
    let (d, mut q) = start_rsd(
        &dir,
        &[
            "--blockdev",
            &format!(
                "driver=luks,node-name=l,key-secret=s,file.driver=file,file.filename={},header.driver=file,header.filename={}",
                dir.s("d.raw"),
                dir.s("h.luks")
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", dir.s("nbd.sock")),
            "--export",
            "type=nbd,id=e,node-name=l",
        ],
    );
    let o = ok(&run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x22 0 64k",
            &nbd_url(&dir),
        ],
    ));
    assert!(!o.contains("fail") && !o.contains("Pattern"), "{o}");
    let r = q.cmd(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#);
    let l = r["return"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "l").cloned())
        .expect("node l");
    assert_eq!(
        l["image"]["format-specific"]["data"]["detached-header"],
        true
    );
    assert_eq!(l["image"]["virtual-size"], 2 << 20);
    quit(d, q);
}

#[test]
fn amend_adds_and_erases_key_slots() {
    let dir = TempDir::new();
    let img = dir.s("a.luks");
    make_luks(&img, "1M", "");
    qemu_io_luks(&luks_opts(&img, None), PW, &["write -P 0x42 0 4k"]);
    let (d, mut q) = start_rsd(
        &dir,
        &[
            "--object",
            &secret_obj("n", NEW_PW),
            "--blockdev",
            &format!("driver=luks,node-name=l,key-secret=s,file.driver=file,file.filename={img}"),
        ],
    );
    q.cmd(r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"a","node-name":"l","options":{"driver":"luks","state":"active","new-secret":"n","iter-time":10}}}"#);
    assert_eq!(job_ok(&mut q, "a"), Ok(()));
    // Slot 0 is the only one the old password opens; erasing it leaves
    // the new one.
    q.cmd(r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"b","node-name":"l","options":{"driver":"luks","state":"inactive","old-secret":"s"}}}"#);
    assert_eq!(job_ok(&mut q, "b"), Ok(()));
    q.cmd(r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"c","node-name":"l","options":{"driver":"luks","state":"inactive","keyslot":1}}}"#);
    assert_eq!(
        job_ok(&mut q, "c"),
        Err("Attempt to erase the only active keyslot 1 which will erase all the data in the image irreversibly - refusing operation".into())
    );
    quit(d, q);
    qemu_io_luks(&luks_opts(&img, None), NEW_PW, &["read -P 0x42 0 4k"]);
    let o = run(
        "qemu-io",
        &[
            "--object",
            &secret_obj("s", PW),
            "--image-opts",
            &luks_opts(&img, None),
            "-c",
            "read 0 512",
        ],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Invalid password, cannot unlock any keyslot"),
        "{o:?}"
    );
}

/// One image for both daemons (its UUID and iteration counts are in the
/// query output).
fn shared_image() -> (TempDir, String) {
    let keep = TempDir::new();
    let img = keep.s("master.luks");
    make_luks(&img, "4M", "");
    (keep, img)
}

#[test]
fn blockdev_add_replies_and_wrong_password_match_qsd() {
    let (_keep, master) = shared_image();
    let setup = move |dir: &TempDir| {
        std::fs::copy(&master, dir.path("a.luks")).expect("copy");
    };
    let out = same_transcripts(
        &setup,
        &[
            &format!(
                r#"{{"execute":"object-add","arguments":{{"qom-type":"secret","id":"s","data":"{PW}"}}}}"#
            ),
            r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"bad","data":"wrong"}}"#,
            r#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io"}}"#,
            r#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"f","filename":"$D/a.luks"}}"#,
            r#"{"execute":"blockdev-add","arguments":{"driver":"luks","node-name":"l0","file":"f"}}"#,
            r#"{"execute":"blockdev-add","arguments":{"driver":"luks","node-name":"l1","file":"f","key-secret":"nosuch"}}"#,
            r#"{"execute":"blockdev-add","arguments":{"driver":"luks","node-name":"l2","file":"f","key-secret":"io"}}"#,
            r#"{"execute":"blockdev-add","arguments":{"driver":"luks","node-name":"l3","file":"f","key-secret":"bad"}}"#,
            r#"{"execute":"blockdev-add","arguments":{"driver":"luks","node-name":"l4","file":"f","key-secret":"s"}}"#,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            r#"{"execute":"blockdev-add","arguments":{"driver":"luks","node-name":"l5","file":{"driver":"file","filename":"$D/a.luks","locking":"off"},"key-secret":"s","read-only":true,"force-share":true}}"#,
            r#"{"execute":"blockdev-del","arguments":{"node-name":"l4"}}"#,
        ],
    );
    assert!(
        count(&out, "Invalid password, cannot unlock any keyslot") == 1,
        "{out:#?}"
    );
    assert!(count(&out, "\"encrypted\":true") >= 1, "{out:#?}");
}

use crate::jobs::count;

#[test]
fn blockdev_create_luks_errors_match_qsd() {
    let setup = |dir: &TempDir| empty(&dir.path("c.luks"));
    let out = same_transcripts(
        &setup,
        &[
            &format!(
                r#"{{"execute":"object-add","arguments":{{"qom-type":"secret","id":"s","data":"{PW}"}}}}"#
            ),
            r#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"f","filename":"$D/c.luks"}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j0","options":{"driver":"luks","file":"f","size":1048576}}}"#,
            "until \"concluded\"",
            r#"{"execute":"query-jobs"}"#,
            r#"{"execute":"job-dismiss","arguments":{"id":"j0"}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j1","options":{"driver":"luks","file":"f","size":1048576,"key-secret":"nosuch"}}}"#,
            "until \"concluded\"",
            r#"{"execute":"query-jobs"}"#,
            r#"{"execute":"job-dismiss","arguments":{"id":"j1"}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j2","options":{"driver":"luks","file":"f","size":1048576,"key-secret":"s","cipher-alg":"sm4"}}}"#,
            "until \"concluded\"",
            r#"{"execute":"query-jobs"}"#,
            r#"{"execute":"job-dismiss","arguments":{"id":"j2"}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j3","options":{"driver":"luks","size":1048576,"key-secret":"s"}}}"#,
            "until \"concluded\"",
            r#"{"execute":"query-jobs"}"#,
            r#"{"execute":"job-dismiss","arguments":{"id":"j3"}}"#,
            r#"{"execute":"blockdev-create","arguments":{"job-id":"j4","options":{"driver":"luks","file":"f","size":1048576,"key-secret":"s","cipher-alg":"cast5-128","cipher-mode":"xts"}}}"#,
            "until \"concluded\"",
            r#"{"execute":"query-jobs"}"#,
            r#"{"execute":"job-dismiss","arguments":{"id":"j4"}}"#,
            r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"a0","node-name":"f","options":{"driver":"luks","state":"active"}}}"#,
            r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"a0","node-name":"f","options":{"driver":"file"}}}"#,
            r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"a0","node-name":"nope","options":{"driver":"file"}}}"#,
        ],
    );
    for e in [
        "Parameter 'key-secret' is required for cipher",
        "No secret with id 'nosuch'",
        "Algorithm 'sm4' not supported",
        "Either the parameter 'header' or 'file' must be specified",
        "Unsupported cipher mode xts",
        "Driver does not support x-blockdev-amend",
    ] {
        assert!(count(&out, e) >= 1, "{e}: {out:#?}");
    }
}

#[test]
fn secrets_never_reach_logs_or_query_output() {
    let dir = TempDir::new();
    let img = dir.s("a.luks");
    make_luks(&img, "1M", "");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "-T",
        "*",
        "--object",
        &secret_obj("s", PW),
        "--object",
        &secret_obj("n", NEW_PW),
        "--blockdev",
        &format!("driver=luks,node-name=l,key-secret=s,file.driver=file,file.filename={img}"),
        "--pidfile",
        &dir.s("p.pid"),
    ]));
    let mut d = Daemon::spawn_env(Which::Rsd, &a, &[("RSD_LOG", "trace")]);
    assert!(wait_for_path(&dir.path("p.pid"), 30), "{}", d.stderr_text());
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let mut replies = String::new();
    for c in [
        r#"{"execute":"query-named-block-nodes"}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"x-debug-query-block-graph"}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"luks","node-name":"x","file":"l","key-secret":"n"}}"#,
        r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"a","node-name":"l","options":{"driver":"luks","state":"active","new-secret":"n","iter-time":10}}}"#,
    ] {
        replies.push_str(&q.cmd(c).to_string());
    }
    assert_eq!(job_ok(&mut q, "a"), Ok(()));
    replies.push_str(&q.cmd(r#"{"execute":"query-jobs"}"#).to_string());
    let log = quit(d, q);
    assert!(log.len() > 100, "the trace log is empty: {log}");
    for s in [PW, NEW_PW] {
        assert!(!log.contains(s), "secret in the log");
        assert!(!replies.contains(s), "secret in a reply: {replies}");
    }
}
