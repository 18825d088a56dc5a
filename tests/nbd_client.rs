//! The `nbd` block driver against real servers (rsd's own, QSD's,
//! qemu-nbd), and a mirror from one rsd to another over TCP.
use std::process::{Child, Command, Stdio};

use crate::common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// A server exporting `img` (qcow2) as "disk" on `sock`.
fn server(kind: &str, dir: &TempDir, img: &str, sock: &str) -> Option<Child> {
    let blockdev = format!("driver=qcow2,node-name=disk,file.driver=file,file.filename={img}");
    let nbd = format!("addr.type=unix,addr.path={sock}");
    let child = match kind {
        "qemu-nbd" => Command::new("qemu-nbd")
            .args(["-f", "qcow2", "-x", "disk", "-k", sock, "--persistent", img])
            .stderr(Stdio::null())
            .spawn()
            .ok()?,
        _ => {
            let bin = if kind == "rsd" {
                rsd_bin()
            } else {
                "qemu-storage-daemon"
            };
            Command::new(bin)
                .args(["--blockdev", &blockdev, "--nbd-server", &nbd])
                .args(["--export", "type=nbd,id=e,node-name=disk,writable=on"])
                .args(["--pidfile", &dir.s(&format!("{kind}.pid"))])
                .stderr(Stdio::null())
                .spawn()
                .ok()?
        }
    };
    assert!(
        wait_for_path(std::path::Path::new(sock), 10),
        "{kind}: no socket"
    );
    Some(child)
}

/// rsd reads and writes another server's export through its nbd node,
/// served again on its own NBD export: the data lands in the image
/// behind the other server.
#[test]
fn nbd_node_reads_and_writes_other_servers() {
    for kind in ["rsd", "qsd", "qemu-nbd"] {
        let dir = TempDir::new();
        let img = dir.s("back.qcow2");
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &img, "8M"],
        ));
        ok(&run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x21 0 1M", &img],
        ));
        let mut srv = server(kind, &dir, &img, &dir.s("back.sock")).expect("server");
        let mut a = monitor_args(&dir.s("q.sock"));
        a.extend(args(&[
            "--blockdev",
            &format!(
                "driver=nbd,node-name=remote,server.type=unix,server.path={},export=disk",
                dir.s("back.sock")
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", dir.s("front.sock")),
            "--export",
            "type=nbd,id=f,node-name=remote,writable=on",
        ]));
        let mut d = Daemon::spawn(Which::Rsd, &a);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let url = format!("nbd+unix:///remote?socket={}", dir.s("front.sock"));
        let out = ok(&run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0x21 0 1M",
                "-c",
                "write -P 0x42 2M 1M",
                "-c",
                "write -z 4M 1M",
                "-c",
                "flush",
                &url,
            ],
        ));
        assert!(!out.contains("fail"), "{kind}: {out}");
        let r = q.cmd(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#);
        assert_eq!(
            r["return"][0]["image"]["virtual-size"], 8388608,
            "{kind}: {r}"
        );
        q.send(br#"{"execute":"quit"}"#);
        assert_eq!(d.wait_exit(20), Some(0));
        let _ = srv.kill();
        let _ = srv.wait();
        let check = run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0x21 0 1M",
                "-c",
                "read -P 0x42 2M 1M",
                "-c",
                "read -P 0 4M 1M",
                &img,
            ],
        );
        let text = String::from_utf8_lossy(&check.stdout);
        assert!(!text.contains("fail"), "{kind}: {text}");
    }
}

/// blockdev-mirror from one rsd to another's export over TCP: READY,
/// complete, and the target image equals the source.
#[test]
fn mirror_between_two_daemons_over_tcp() {
    let dir = TempDir::new();
    let (src, tgt) = (dir.s("src.qcow2"), dir.s("tgt.qcow2"));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &src, "32M"],
    ));
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 8M",
            "-c",
            "write -P 0xa5 20M 3M",
            &src,
        ],
    ));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &tgt, "32M"],
    ));
    let port = free_port().to_string();
    let mut b = monitor_args(&dir.s("b.sock"));
    b.extend(args(&[
        "--blockdev",
        &format!("driver=qcow2,node-name=tgt,file.driver=file,file.filename={tgt}"),
        "--nbd-server",
        &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        "--export",
        "type=nbd,id=t,node-name=tgt,writable=on",
    ]));
    let mut db = Daemon::spawn(Which::Rsd, &b);
    let mut qb = Qmp::ready(&dir.path("b.sock"));
    let mut a = monitor_args(&dir.s("a.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=qcow2,node-name=src,file.driver=file,file.filename={src}"),
        "--blockdev",
        &format!("driver=nbd,node-name=remote,server.type=inet,server.host=127.0.0.1,server.port={port},export=tgt"),
    ]));
    let mut da = Daemon::spawn(Which::Rsd, &a);
    let mut qa = Qmp::ready(&dir.path("a.sock"));
    let r = qa.cmd(r#"{"execute":"blockdev-mirror","arguments":{"job-id":"m","device":"src","target":"remote","sync":"full"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    wait_ready(&mut qa);
    let r = qa.cmd(r#"{"execute":"job-complete","arguments":{"id":"m"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    wait_no_jobs(&mut qa);
    qa.send(br#"{"execute":"quit"}"#);
    assert_eq!(da.wait_exit(20), Some(0));
    qb.send(br#"{"execute":"quit"}"#);
    assert_eq!(db.wait_exit(20), Some(0));
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", &src, &tgt],
    );
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    ok(&run("qemu-img", &["check", &tgt]));
}

/// With reconnect-delay, the nbd node survives its server restarting:
/// the next request connects again and succeeds.
#[test]
fn nbd_node_reconnects_within_the_delay() {
    let dir = TempDir::new();
    let img = dir.s("back.qcow2");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img, "8M"],
    ));
    let sock = dir.s("back.sock");
    let mut srv = server("rsd", &dir, &img, &sock).expect("server");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=nbd,node-name=remote,server.type=unix,server.path={sock},export=disk,reconnect-delay=20"),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("front.sock")),
        "--export",
        "type=nbd,id=f,node-name=remote,writable=on",
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let _q = Qmp::ready(&dir.path("q.sock"));
    let url = format!("nbd+unix:///remote?socket={}", dir.s("front.sock"));
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 64k", &url],
    ));
    let _ = srv.kill();
    let _ = srv.wait();
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(dir.path("rsd.pid"));
    // The client's next requests start while the server is down and
    // wait for it (reconnect-delay); the server comes back on the same
    // socket.
    let client = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x22 64k 64k",
            "-c",
            "read -P 0x11 0 64k",
            &url,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut srv = server("rsd", &dir, &img, &sock).expect("restart");
    let out = client.wait_with_output().expect("qemu-io");
    let text = ok(&out);
    assert!(!text.contains("fail"), "{text}");
    let _ = d.wait_exit(0);
    let _ = srv.kill();
    let _ = srv.wait();
}

/// A mirror from one rsd to another over TCP survives the target daemon
/// being killed mid-copy and started again within reconnect-delay: the
/// job waits, goes on, reaches READY, and the target equals the source,
/// including what a client wrote to the source while the target was down.
/// (The target image is raw: what the killed daemon had acknowledged is
/// in the page cache, so the kill loses nothing the mirror counted.)
#[test]
fn mirror_survives_target_restart() {
    let dir = TempDir::new();
    let (src, tgt) = (dir.s("src.qcow2"), dir.s("tgt.raw"));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &src, "32M"],
    ));
    ok(&run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 24M", &src],
    ));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &tgt, "32M"],
    ));
    let port = free_port().to_string();
    let target_args = |name: &str| {
        let mut b = monitor_args(&dir.s(name));
        b.extend(args(&[
            "--blockdev",
            &format!("driver=raw,node-name=tgt,file.driver=file,file.filename={tgt}"),
            "--nbd-server",
            &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            "--export",
            "type=nbd,id=t,node-name=tgt,writable=on",
        ]));
        b
    };
    let mut db = Daemon::spawn(Which::Rsd, &target_args("b.sock"));
    let _qb = Qmp::ready(&dir.path("b.sock"));
    let mut a = monitor_args(&dir.s("a.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=qcow2,node-name=src,file.driver=file,file.filename={src}"),
        "--blockdev",
        &format!("driver=nbd,node-name=remote,server.type=inet,server.host=127.0.0.1,server.port={port},export=tgt,reconnect-delay=60"),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("front.sock")),
        "--export",
        "type=nbd,id=s,node-name=src,writable=on",
    ]));
    let mut da = Daemon::spawn(Which::Rsd, &a);
    let mut qa = Qmp::ready(&dir.path("a.sock"));
    // Slow enough that the kill lands mid-copy.
    let r = qa.cmd(r#"{"execute":"blockdev-mirror","arguments":{"job-id":"m","device":"src","target":"remote","sync":"full","speed":4194304}}"#);
    assert!(r.get("return").is_some(), "{r}");
    let offset = |q: &mut Qmp| {
        let r = q.cmd(r#"{"execute":"query-block-jobs"}"#);
        r["return"][0]["offset"].as_u64().unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while offset(&mut qa) < 2 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the mirror made no progress"
        );
        std::thread::yield_now();
    }
    let _ = db.child.kill();
    let _ = db.child.wait();
    let at_kill = offset(&mut qa);
    assert!(
        at_kill < 24 << 20,
        "the copy ended before the kill: {at_kill}"
    );
    // The source changes while the target is away.
    let url = format!("nbd+unix:///src?socket={}", dir.s("front.sock"));
    let out = ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 1M 1M", &url],
    ));
    assert!(!out.contains("fail"), "{out}");
    // Full speed while the target is away: the job's next writes find
    // the connection gone and wait for it (without reconnect-delay they
    // would fail the job at once).
    let r = qa.cmd(r#"{"execute":"block-job-set-speed","arguments":{"device":"m","speed":0}}"#);
    assert!(r.get("return").is_some(), "{r}");
    let until = std::time::Instant::now() + std::time::Duration::from_millis(700);
    while std::time::Instant::now() < until {
        let r = qa.cmd(r#"{"execute":"query-block-jobs"}"#);
        assert_eq!(r["return"][0]["status"], "running", "{r}");
        assert!(r["return"][0]["offset"].as_u64() < Some(24 << 20), "{r}");
        std::thread::yield_now();
    }
    let _ = std::fs::remove_file(dir.path("b.sock"));
    let mut db = Daemon::spawn(Which::Rsd, &target_args("b.sock"));
    let _qb = Qmp::ready(&dir.path("b.sock"));
    wait_ready(&mut qa);
    let r = qa.cmd(r#"{"execute":"job-complete","arguments":{"id":"m"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    wait_no_jobs(&mut qa);
    qa.send(br#"{"execute":"quit"}"#);
    assert_eq!(da.wait_exit(20), Some(0));
    db.signal(15);
    assert_eq!(db.wait_exit(20), Some(0));
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", &src, &tgt],
    );
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}
