//! Encrypted qcow2 (LUKS and legacy AES) and the secret_keyring object,
//! against QEMU's tools: images qemu-img made (and qemu-io wrote) read
//! and written through an rsd NBD export; images rsd made open in
//! qemu-img with the same secret; replies and errors equal QSD's;
//! secrets never reach the logs.
use crate::common::*;
use crate::jobs::{count, same_transcripts};
use crate::luks::{empty, job_ok, qemu_io_luks, quit, secret_obj, start_rsd, NEW_PW, PW};

/// A legacy AES password longer than the 16 bytes QEMU keeps of it.
const AES_PW: &str = "aes-Jd5RcX9mLp3QzT";

fn qcow2_opts(file: &str) -> String {
    format!("driver=qcow2,encrypt.key-secret=s,file.filename={file}")
}

/// qemu-io on an encrypted qcow2 image opened with `pw`; fails on any
/// error or miscompare.
fn qemu_io_enc(file: &str, pw: &str, cmds: &[&str]) -> String {
    qemu_io_luks(&qcow2_opts(file), pw, cmds)
}

fn make_enc(path: &str, pw: &str, o: &str, size: &str) {
    let obj = secret_obj("s", pw);
    ok(&run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "--object", &obj, "-o", o, path, size,
        ],
    ));
}

const LUKS_O: &str = "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10";
const AES_O: &str = "encrypt.format=aes,encrypt.key-secret=s";

/// qemu-io through rsd's NBD export `name`.
fn nbd_io(dir: &TempDir, name: &str, cmds: &[&str]) {
    let url = format!("nbd+unix:///{name}?socket={}", dir.s("nbd.sock"));
    let mut a = vec!["-f", "raw"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(&url);
    let o = ok(&run("qemu-io", &a));
    assert!(!o.contains("fail") && !o.contains("Pattern"), "{o}");
}

/// `qemu-img check` of an encrypted image finds nothing wrong.
fn check_clean(file: &str, pw: &str) {
    let o = run(
        "qemu-img",
        &[
            "check",
            "--object",
            &secret_obj("s", pw),
            "--image-opts",
            &qcow2_opts(file),
        ],
    );
    let out = ok(&o);
    assert!(out.contains("No errors were found"), "{out}");
}

/// What qemu-io wrote, rsd reads; what rsd writes (whole sectors,
/// partial sectors, part of a new cluster, zeroes), qemu-io reads:
/// LUKS (IVs from host offsets) and legacy AES (IVs from guest offsets,
/// a password longer than its 16-byte key).
#[test]
fn qemu_img_encrypted_qcow2_reads_and_writes_through_rsd() {
    let dir = TempDir::new();
    let (l, a) = (dir.s("l.qcow2"), dir.s("a.qcow2"));
    make_enc(&l, PW, LUKS_O, "4M");
    make_enc(&a, AES_PW, AES_O, "4M");
    let first = [
        "write -P 0x5a 0 64k",
        "write -P 0x33 100k 3k",
        "write -P 0x44 2M 4k",
    ];
    qemu_io_enc(&l, PW, &first);
    qemu_io_enc(&a, AES_PW, &first);
    let nbd = format!("addr.type=unix,addr.path={}", dir.s("nbd.sock"));
    let (d, mut q) = start_rsd(
        &dir,
        &[
            "--object",
            &secret_obj("t", AES_PW),
            "--blockdev",
            &format!("driver=qcow2,node-name=l,encrypt.format=luks,encrypt.key-secret=s,file.driver=file,file.filename={l}"),
            "--blockdev",
            &format!("driver=qcow2,node-name=a,encrypt.format=aes,encrypt.key-secret=t,file.driver=file,file.filename={a}"),
            "--nbd-server",
            &nbd,
            "--export",
            "type=nbd,id=e1,node-name=l,writable=on",
            "--export",
            "type=nbd,id=e2,node-name=a,writable=on",
        ],
    );
    let second = [
        "read -P 0x5a 0 64k",
        "read -P 0x33 100k 3k",
        "read -P 0 103k 1k",
        "read -P 0x44 2M 4k",
        "read -P 0 3M 64k",
        "write -P 0x77 65536 1000",
        "write -P 0x78 3M 200k",
        "write -P 0x79 1M 700",
        "write -P 0x7a 130k 64k",
        "write -z 3100k 100k",
    ];
    nbd_io(&dir, "l", &second);
    nbd_io(&dir, "a", &second);
    let r = q.cmd(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#);
    let nodes = r["return"].as_array().cloned().unwrap_or_default();
    let node = |n: &str| nodes.iter().find(|x| x["node-name"] == n).cloned();
    let ln = node("l").expect("node l");
    assert_eq!(ln["encrypted"], true);
    let enc = &ln["image"]["format-specific"]["data"]["encrypt"];
    assert_eq!(enc["format"], "luks");
    assert_eq!(enc["cipher-alg"], "aes-256");
    let an = node("a").expect("node a");
    assert_eq!(
        an["image"]["format-specific"]["data"]["encrypt"],
        serde_json::json!({"format": "aes"})
    );
    quit(d, q);
    let third = [
        "read -P 0x5a 0 64k",
        "read -P 0x77 65536 1000",
        "read -P 0 66536 536",
        "read -P 0x33 100k 3k",
        "read -P 0x7a 130k 64k",
        "read -P 0x79 1M 700",
        "read -P 0 1049276 324",
        "read -P 0x44 2M 4k",
        "read -P 0x78 3M 28k",
        "read -P 0 3100k 100k",
        "read -P 0x78 3200k 72k",
    ];
    qemu_io_enc(&l, PW, &third);
    qemu_io_enc(&a, AES_PW, &third);
    check_clean(&l, PW);
    check_clean(&a, AES_PW);
}

/// The header cluster (extensions, crypt_method) and the file's length.
fn layout(path: &str) -> (Vec<u8>, u64) {
    let b = std::fs::read(path).expect("read image");
    (b[..512.min(b.len())].to_vec(), b.len() as u64)
}

/// blockdev-create of encrypted qcow2 lays the image out as qemu-img
/// does (the LUKS header in clusters after the L1 table, named by the
/// crypto extension); what rsd wrote there, qemu-img reads; amend adds
/// a key slot and erases the old one.
#[test]
fn rsd_created_encrypted_qcow2_opens_in_qemu_img_and_amends() {
    let dir = TempDir::new();
    for f in ["r.qcow2", "q.qcow2"] {
        empty(&dir.path(f));
    }
    let (d, mut q) = start_rsd(&dir, &["--object", &secret_obj("n", NEW_PW)]);
    for (n, f) in [("f", "r.qcow2"), ("g", "q.qcow2")] {
        let r = q.cmd(&format!(
            r#"{{"execute":"blockdev-add","arguments":{{"driver":"file","node-name":"{n}","filename":"{}"}}}}"#,
            dir.s(f)
        ));
        assert_eq!(r["return"], serde_json::json!({}), "{r}");
    }
    q.cmd(r#"{"execute":"blockdev-create","arguments":{"job-id":"j0","options":{"driver":"qcow2","file":"f","size":4194304,"encrypt":{"format":"luks","key-secret":"s","iter-time":10}}}}"#);
    q.cmd(r#"{"execute":"blockdev-create","arguments":{"job-id":"j1","options":{"driver":"qcow2","file":"g","size":4194304,"encrypt":{"format":"qcow","key-secret":"s"}}}}"#);
    assert_eq!(job_ok(&mut q, "j0"), Ok(()));
    assert_eq!(job_ok(&mut q, "j1"), Ok(()));
    q.cmd(r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"l","file":"f","encrypt":{"format":"luks","key-secret":"s"}}}"#);
    let sock = dir.s("nbd.sock");
    q.cmd(&format!(r#"{{"execute":"nbd-server-start","arguments":{{"addr":{{"type":"unix","data":{{"path":"{sock}"}}}}}}}}"#));
    q.cmd(r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"l","writable":true}}"#);
    nbd_io(
        &dir,
        "l",
        &["write -P 0x61 1M 512k", "write -P 0x62 3000 5000"],
    );
    // A new key slot, then the old password's slot erased.
    q.cmd(r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"a0","node-name":"l","options":{"driver":"qcow2","encrypt":{"format":"luks","state":"active","new-secret":"n","iter-time":10}}}}"#);
    assert_eq!(job_ok(&mut q, "a0"), Ok(()));
    q.cmd(r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"a1","node-name":"l","options":{"driver":"qcow2","encrypt":{"format":"luks","state":"inactive","old-secret":"s"}}}}"#);
    assert_eq!(job_ok(&mut q, "a1"), Ok(()));
    quit(d, q);
    // qemu-img's images with the same options: the same layout.
    let (ql, qa) = (dir.s("ql.qcow2"), dir.s("qa.qcow2"));
    make_enc(&ql, PW, LUKS_O, "4M");
    make_enc(&qa, PW, AES_O, "4M");
    assert_eq!(layout(&dir.s("q.qcow2")), layout(&qa));
    // (rsd's image has data written since: its length differs.)
    let (rh, _) = layout(&dir.s("r.qcow2"));
    let (qh, _) = layout(&ql);
    assert_eq!(rh, qh, "header cluster differs from qemu-img's");
    // The new password opens it, the old one no longer does.
    let r = dir.s("r.qcow2");
    qemu_io_enc(
        &r,
        NEW_PW,
        &[
            "read -P 0x61 1M 512k",
            "read -P 0x62 3000 5000",
            "read -P 0 0 3000",
        ],
    );
    check_clean(&r, NEW_PW);
    let o = run(
        "qemu-io",
        &[
            "--object",
            &secret_obj("s", PW),
            "--image-opts",
            &qcow2_opts(&r),
            "-c",
            "read 0 512",
        ],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Invalid password, cannot unlock any keyslot"),
        "{o:?}"
    );
    // The image rsd made compares equal to one qemu-io wrote alike.
    qemu_io_enc(
        &ql,
        PW,
        &["write -P 0x61 1M 512k", "write -P 0x62 3000 5000"],
    );
    let objs = format!("secret,id=s,data={NEW_PW}");
    let objq = format!("secret,id=t,data={PW}");
    let o = run(
        "qemu-img",
        &[
            "compare",
            "--object",
            &objs,
            "--object",
            &objq,
            "--image-opts",
            &qcow2_opts(&r),
            &format!("driver=qcow2,encrypt.key-secret=t,file.filename={ql}"),
        ],
    );
    assert!(ok(&o).contains("Images are identical"), "{o:?}");
}

/// One LUKS and one AES image for both daemons (the LUKS UUID and
/// iteration counts are in the query output).
fn shared_images() -> (TempDir, String, String) {
    let keep = TempDir::new();
    let (l, a) = (keep.s("l.qcow2"), keep.s("a.qcow2"));
    make_enc(&l, PW, LUKS_O, "4M");
    make_enc(&a, PW, AES_O, "4M");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &keep.s("p.qcow2"), "4M"],
    ));
    (keep, l, a)
}

#[test]
fn encrypted_blockdev_add_replies_and_errors_match_qsd() {
    let (keep, l, a) = shared_images();
    let p = keep.s("p.qcow2");
    let setup = move |dir: &TempDir| {
        for (src, name) in [(&l, "l.qcow2"), (&a, "a.qcow2"), (&p, "p.qcow2")] {
            std::fs::copy(src, dir.path(name)).expect("copy");
        }
    };
    let add = |n: &str, f: &str, enc: &str| {
        format!(
            r#"{{"execute":"blockdev-add","arguments":{{"driver":"qcow2","node-name":"{n}","file":{{"driver":"file","filename":"$D/{f}"}}{enc}}}}}"#
        )
    };
    let steps = [
        format!(
            r#"{{"execute":"object-add","arguments":{{"qom-type":"secret","id":"s","data":"{PW}"}}}}"#
        ),
        r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"bad","data":"wrong"}}"#.to_string(),
        add("x0", "l.qcow2", ""),
        add("x1", "l.qcow2", r#","encrypt":{"format":"luks","key-secret":"bad"}"#),
        add("x2", "l.qcow2", r#","encrypt":{"format":"aes","key-secret":"s"}"#),
        add("x3", "l.qcow2", r#","encrypt":{"format":"luks"}"#),
        add("x4", "l.qcow2", r#","encrypt":{"format":"luks","key-secret":"nosuch"}"#),
        add("x5", "p.qcow2", r#","encrypt":{"format":"luks","key-secret":"s"}"#),
        add("x6", "a.qcow2", r#","encrypt":{"format":"luks","key-secret":"s"}"#),
        add("x7", "a.qcow2", r#","encrypt":{"key-secret":"s"}"#),
        add("x8", "a.qcow2", ""),
        add("l", "l.qcow2", r#","encrypt":{"format":"luks","key-secret":"s"}"#),
        add("a", "a.qcow2", r#","encrypt":{"format":"aes","key-secret":"s"}"#),
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.to_string(),
        r#"{"execute":"query-block"}"#.to_string(),
        r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"m0","node-name":"l","options":{"driver":"qcow2","encrypt":{"format":"qcow"}}}}"#.to_string(),
        "until \"concluded\"".to_string(),
        r#"{"execute":"query-jobs"}"#.to_string(),
        r#"{"execute":"job-dismiss","arguments":{"id":"m0"}}"#.to_string(),
        r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"m1","node-name":"a","options":{"driver":"qcow2","encrypt":{"format":"luks","state":"inactive","keyslot":0}}}}"#.to_string(),
        "until \"concluded\"".to_string(),
        r#"{"execute":"query-jobs"}"#.to_string(),
        r#"{"execute":"job-dismiss","arguments":{"id":"m1"}}"#.to_string(),
        r#"{"execute":"blockdev-del","arguments":{"node-name":"l"}}"#.to_string(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = same_transcripts(&setup, &steps);
    for e in [
        "Invalid password, cannot unlock any keyslot",
        "Header reported 'luks' encryption format but options specify 'aes'",
        "Parameter 'encrypt.key-secret' is required for cipher",
        "No secret with id 'nosuch'",
        "No encryption in image header, but options specified format 'luks'",
        "Header reported 'aes' encryption format but options specify 'luks'",
        "Parameter 'encrypt.format' is missing",
        "Amend can't be used to change the qcow2 encryption format",
        "Only LUKS encryption options can be amended for qcow2 with blockdev-amend",
    ] {
        assert!(count(&out, e) >= 1, "{e}: {out:#?}");
    }
    assert!(count(&out, "\"encrypted\":true") >= 1, "{out:#?}");
}

#[test]
fn encrypted_blockdev_create_matches_qsd() {
    let setup = |dir: &TempDir| {
        for f in ["c0.qcow2", "c1.qcow2", "c2.qcow2", "c3.qcow2"] {
            empty(&dir.path(f));
        }
    };
    let mut steps = vec![format!(
        r#"{{"execute":"object-add","arguments":{{"qom-type":"secret","id":"s","data":"{PW}"}}}}"#
    )];
    let jobs = [
        r#""encrypt":{"format":"qcow","key-secret":"s"}"#,
        r#""encrypt":{"format":"luks","key-secret":"nosuch"}"#,
        r#""encrypt":{"format":"luks","key-secret":"s","cipher-alg":"sm4"}"#,
        r#""encrypt":{"format":"qcow"}"#,
    ];
    for (i, enc) in jobs.iter().enumerate() {
        steps.push(format!(
            r#"{{"execute":"blockdev-add","arguments":{{"driver":"file","node-name":"f{i}","filename":"$D/c{i}.qcow2"}}}}"#
        ));
        steps.push(format!(
            r#"{{"execute":"blockdev-create","arguments":{{"job-id":"j{i}","options":{{"driver":"qcow2","file":"f{i}","size":1048576,{enc}}}}}}}"#
        ));
        steps.push("until \"concluded\"".to_string());
        steps.push(r#"{"execute":"query-jobs"}"#.to_string());
        steps.push(format!(
            r#"{{"execute":"job-dismiss","arguments":{{"id":"j{i}"}}}}"#
        ));
    }
    steps.push(r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"q","file":"f0","encrypt":{"format":"aes","key-secret":"s"}}}"#.to_string());
    steps.push(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.to_string());
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = same_transcripts(&setup, &steps);
    for e in [
        "No secret with id 'nosuch'",
        "Algorithm 'sm4' not supported",
        "Parameter 'encrypt.key-secret' is required for cipher",
        "\"encrypt\":{\"format\":\"aes\"}",
    ] {
        assert!(count(&out, e) >= 1, "{e}: {out:#?}");
    }
}

/// Adds a key to the user keyring for the test's user (add_key(2)),
/// or None when the kernel refuses keyrings here.
fn add_user_key(desc: &str, payload: &[u8]) -> Option<i32> {
    use nix::libc;
    const KEY_SPEC_USER_KEYRING: libc::c_long = -4;
    let ty = c"user";
    let desc = std::ffi::CString::new(desc).ok()?;
    // SAFETY: every pointer is valid for the call; the kernel copies.
    let r = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            ty.as_ptr(),
            desc.as_ptr(),
            payload.as_ptr(),
            payload.len(),
            KEY_SPEC_USER_KEYRING,
        )
    };
    if r < 0 {
        eprintln!(
            "skipping: add_key refused: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    Some(r as i32)
}

/// A secret_keyring opens an encrypted image; its replies and errors
/// are QSD's.
#[test]
fn secret_keyring_matches_qsd_and_unlocks_images() {
    let Some(serial) = add_user_key("rsd-test-qcow2-crypt", PW.as_bytes()) else {
        return;
    };
    let (keep, l, _a) = shared_images();
    let _keep = keep;
    let setup = move |dir: &TempDir| {
        std::fs::copy(&l, dir.path("l.qcow2")).expect("copy");
    };
    let steps = [
        format!(
            r#"{{"execute":"object-add","arguments":{{"qom-type":"secret_keyring","id":"k","serial":{serial}}}}}"#
        ),
        r#"{"execute":"object-add","arguments":{"qom-type":"secret_keyring","id":"k1"}}"#.to_string(),
        r#"{"execute":"object-add","arguments":{"qom-type":"secret_keyring","id":"k2","serial":-1}}"#.to_string(),
        r#"{"execute":"object-add","arguments":{"qom-type":"secret_keyring","id":"k3","serial":"x"}}"#.to_string(),
        r#"{"execute":"qom-list","arguments":{"path":"/objects/k"}}"#.to_string(),
        r#"{"execute":"qom-get","arguments":{"path":"/objects/k","property":"format"}}"#.to_string(),
        r#"{"execute":"qom-list-types","arguments":{"implements":"secret_common"}}"#.to_string(),
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"l","file":{"driver":"file","filename":"$D/l.qcow2"},"encrypt":{"format":"luks","key-secret":"k"}}}"#.to_string(),
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#.to_string(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = same_transcripts(&setup, &steps);
    assert!(
        count(&out, "Parameter 'serial' is missing") == 1,
        "{out:#?}"
    );
    assert!(
        count(&out, "Unable to read serial key ffffffff") == 1,
        "{out:#?}"
    );
    assert!(count(&out, "\"encrypted\":true") >= 1, "{out:#?}");
    assert!(!out.iter().any(|l| l.contains(PW)), "{out:#?}");
}

#[test]
fn encrypted_qcow2_secrets_never_reach_logs() {
    let dir = TempDir::new();
    let img = dir.s("l.qcow2");
    make_enc(&img, PW, LUKS_O, "1M");
    empty(&dir.path("c.qcow2"));
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "-T",
        "*",
        "--object",
        &secret_obj("s", PW),
        "--object",
        &secret_obj("n", NEW_PW),
        "--blockdev",
        &format!(
            "driver=qcow2,node-name=l,encrypt.format=luks,encrypt.key-secret=s,file.driver=file,file.filename={img}"
        ),
        "--blockdev",
        &format!("driver=file,node-name=c,filename={}", dir.s("c.qcow2")),
        "--pidfile",
        &dir.s("p.pid"),
    ]));
    let mut d = Daemon::spawn_env(Which::Rsd, &a, &[("RSD_LOG", "trace")]);
    assert!(wait_for_path(&dir.path("p.pid"), 30), "{}", d.stderr_text());
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let mut replies = String::new();
    for c in [
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"query-block"}"#,
        r#"{"execute":"x-debug-query-block-graph"}"#,
        r#"{"execute":"blockdev-create","arguments":{"job-id":"j","options":{"driver":"qcow2","file":"c","size":1048576,"encrypt":{"format":"luks","key-secret":"n","iter-time":10}}}}"#,
        r#"{"execute":"x-blockdev-amend","arguments":{"job-id":"a","node-name":"l","options":{"driver":"qcow2","encrypt":{"format":"luks","state":"active","new-secret":"n","iter-time":10}}}}"#,
    ] {
        replies.push_str(&q.cmd(c).to_string());
    }
    assert_eq!(job_ok(&mut q, "j"), Ok(()));
    assert_eq!(job_ok(&mut q, "a"), Ok(()));
    replies.push_str(&q.cmd(r#"{"execute":"query-jobs"}"#).to_string());
    let log = quit(d, q);
    assert!(log.len() > 100, "the trace log is empty: {log}");
    for s in [PW, NEW_PW] {
        assert!(!log.contains(s), "secret in the log");
        assert!(!replies.contains(s), "secret in a reply: {replies}");
    }
}
