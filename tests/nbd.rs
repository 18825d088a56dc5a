//! NBD exports against real clients (qemu-img, qemu-io, qemu-nbd,
//! nbdinfo, qemu-storage-daemon's nbd driver) and a raw-socket client for
//! pipelining and hostile requests.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use crate::common::nbd_wire::{self, Nbd, CMD_BLOCK_STATUS, CMD_READ, CMD_WRITE, OPT_GO};
use crate::common::*;

/// rsd (or QSD) serving disk.img as export `fmt` (writable) and, read-only,
/// `ro`, on a UNIX socket and a TCP port.
struct Served {
    dir: TempDir,
    daemon: Daemon,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn serve(which: Which, file_opts: &str, tcp: bool) -> Served {
    let dir = TempDir::new();
    qemu_img_create(&dir.path("disk.img"), "16M");
    let port = free_port();
    let server = if tcp {
        format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}")
    } else {
        format!("addr.type=unix,addr.path={}", dir.s("nbd.sock"))
    };
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!(
            "driver=file,node-name=disk,filename={}{file_opts}",
            dir.s("disk.img")
        ),
        "--blockdev",
        &format!("driver=raw,node-name=fmt,file=disk{file_opts}"),
        "--nbd-server",
        &server,
        "--export",
        "type=nbd,id=e,node-name=fmt,writable=on",
        "--export",
        "type=nbd,id=e2,node-name=fmt,name=ro,allocation-depth=on",
        "--pidfile",
        &dir.s("p.pid"),
    ]));
    let daemon = Daemon::spawn(which, &a);
    assert!(wait_for_path(&dir.path("p.pid"), 10), "{which:?} start-up");
    Served { dir, daemon, port }
}

impl Served {
    fn url(&self, export: &str, tcp: bool) -> String {
        if tcp {
            format!("nbd://127.0.0.1:{}/{export}", self.port)
        } else {
            format!("nbd+unix:///{export}?socket={}", self.dir.s("nbd.sock"))
        }
    }
    fn quit(&mut self) {
        let mut q = Qmp::ready(&self.dir.path("q.sock"));
        q.send(br#"{"execute":"quit"}"#);
        let _ = q.line();
        assert_eq!(self.daemon.wait_exit(10), Some(0));
    }
}

#[test]
fn qemu_clients_over_unix_and_tcp() {
    for tcp in [false, true] {
        let mut s = serve(Which::Rsd, ",discard=unmap", tcp);
        let url = s.url("fmt", tcp);
        let info = ok(&run("qemu-img", &["info", "--output=json", &url]));
        assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
        let io = ok(&run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xab 0 1M",
                "-c",
                "read -P 0xab 0 1M",
                "-c",
                "write -P 0x11 100 1000",
                "-c",
                "read -P 0x11 100 1000",
                "-c",
                "write -P 0x22 4194304 65536",
                "-c",
                "write -z 4194304 4096",
                "-c",
                "read -P 0 4194304 4096",
                "-c",
                "read -P 0x22 4198400 61440",
                "-c",
                "write -P 0x33 8388608 1M",
                "-c",
                "discard 8388608 1M",
                "-c",
                "read -P 0 8388608 1M",
                "-c",
                "flush",
                &url,
            ],
        ));
        assert!(!io.contains("Pattern verification failed"), "{io}");
        // Read-only export: reads work, writes fail.
        let ro = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-r",
                "-c",
                "read -P 0xab 4096 4096",
                &s.url("ro", tcp),
            ],
        );
        assert!(
            !String::from_utf8_lossy(&ro.stdout).contains("failed"),
            "{ro:?}"
        );
        let copy = s.dir.path("copy.img");
        ok(&run(
            "qemu-img",
            &["convert", "-O", "raw", &url, &copy.display().to_string()],
        ));
        ok(&run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &url,
                &copy.display().to_string(),
            ],
        ));
        s.quit();
        // The image itself, byte for byte.
        let d = std::fs::read(s.dir.path("disk.img")).expect("image");
        assert!(d[..100].iter().all(|b| *b == 0xab));
        assert!(d[100..1100].iter().all(|b| *b == 0x11));
        assert!(d[1100..1 << 20].iter().all(|b| *b == 0xab));
        assert!(d[4194304..4198400].iter().all(|b| *b == 0));
        assert!(d[4198400..4194304 + 65536].iter().all(|b| *b == 0x22));
        assert!(d[8388608..8388608 + (1 << 20)].iter().all(|b| *b == 0));
        assert_eq!(
            d,
            std::fs::read(&copy).expect("copy"),
            "convert produced the same bytes"
        );
        assert!(
            !s.dir.path("nbd.sock").exists(),
            "rsd removes its NBD socket"
        );
    }
}

#[test]
fn discard_ignore_keeps_data() {
    let mut s = serve(Which::Rsd, "", false);
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "discard 0 64k",
            &s.url("fmt", false),
        ],
    ));
    s.quit();
    let d = std::fs::read(s.dir.path("disk.img")).expect("image");
    assert!(
        d[..65536].iter().all(|b| *b == 0x5a),
        "discard=ignore keeps data"
    );
}

#[test]
fn qemu_nbd_list_and_qsd_as_client() {
    let mut s = serve(Which::Rsd, "", false);
    let list = ok(&run("qemu-nbd", &["-L", "-k", &s.dir.s("nbd.sock")]));
    assert!(list.contains("exports available: 2"), "{list}");
    assert!(
        list.contains("export: 'fmt'") && list.contains("export: 'ro'"),
        "{list}"
    );
    assert!(
        list.contains(
            "flags: 0x1ded ( flush fua trim zeroes df multi cache fast-zero block-status-payload )"
        ),
        "{list}"
    );
    assert!(
        list.contains("flags: 0x158f ( readonly flush fua df multi cache block-status-payload )"),
        "{list}"
    );
    assert!(list.contains("qemu:allocation-depth"), "{list}");
    assert!(
        list.contains("transaction size: 64-bit"),
        "extended headers: {list}"
    );
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 4096",
            &s.url("fmt", false),
        ],
    ));
    // qemu-storage-daemon's own nbd driver reads rsd's export.
    if std::path::Path::new(QSD).exists() {
        let dir = TempDir::new();
        let mut a = monitor_args(&dir.s("q.sock"));
        a.extend(args(&[
            "--blockdev",
            &format!(
                "driver=nbd,node-name=n,server.type=unix,server.path={},export=fmt",
                s.dir.s("nbd.sock")
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", dir.s("re.sock")),
            "--export",
            "type=nbd,id=re,node-name=n,name=re",
            "--pidfile",
            &dir.s("p.pid"),
        ]));
        let _qsd = Daemon::spawn(Which::Qsd, &a);
        assert!(
            wait_for_path(&dir.path("p.pid"), 10),
            "QSD connected to rsd"
        );
        let out = ok(&run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-r",
                "-c",
                "read -P 0x77 0 4096",
                &format!("nbd+unix:///re?socket={}", dir.s("re.sock")),
            ],
        ));
        assert!(!out.contains("failed"), "{out}");
    }
    s.quit();
}

#[test]
fn nbdinfo_list_map_can() {
    if Command::new("nbdinfo").arg("--version").output().is_err() {
        eprintln!("skipping: nbdinfo not installed (libnbd-bin)");
        return;
    }
    let mut s = serve(Which::Rsd, "", false);
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 1M", &s.url("fmt", false)],
    ));
    let list = ok(&run("nbdinfo", &["--list", &s.url("", false)]));
    assert!(
        list.contains("export=\"fmt\"") && list.contains("export=\"ro\""),
        "{list}"
    );
    let map = ok(&run("nbdinfo", &["--map", &s.url("fmt", false)]));
    let first = map.lines().next().unwrap_or_default().to_string();
    assert!(
        first.split_whitespace().collect::<Vec<_>>()[..3] == ["0", "1048576", "0"],
        "{map}"
    );
    for (flag, want) in [
        ("--can=write", true),
        ("--can=flush", true),
        ("--can=trim", true),
        ("--can=zero", true),
        ("--can=multi-conn", true),
    ] {
        let st = Command::new("nbdinfo")
            .args([flag, &s.url("fmt", false)])
            .status()
            .expect("nbdinfo");
        assert_eq!(st.success(), want, "{flag}");
    }
    let st = Command::new("nbdinfo")
        .args(["--can=write", &s.url("ro", false)])
        .status()
        .expect("nbdinfo");
    assert!(!st.success(), "ro export cannot write");
    s.quit();
}

#[test]
fn parallel_writers_on_disjoint_ranges() {
    let mut s = serve(Which::Rsd, "", false);
    let url = s.url("fmt", false);
    let kids: Vec<_> = (0..4u8)
        .map(|i| {
            let off = (i as usize * 4) << 20;
            Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    &format!("write -P {} {off} 4M", 0x10 + i),
                    &url,
                ])
                .output()
        })
        .collect();
    for k in kids {
        ok(&k.expect("qemu-io"));
    }
    for i in 0..4u8 {
        let off = (i as usize * 4) << 20;
        let out = ok(&run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-r",
                "-c",
                &format!("read -P {} {off} 4M", 0x10 + i),
                &url,
            ],
        ));
        assert!(!out.contains("failed"), "{out}");
    }
    s.quit();
}

/// Connects to export `name` (simple replies).
fn connect(path: &std::path::Path, name: &str) -> Nbd {
    Nbd::connect(path, name).expect("NBD connect")
}

/// Reads one simple reply: (error, cookie), a good read's `data` bytes
/// skipped.
fn simple(r: &mut Nbd, data: u32) -> (u32, u64) {
    let (err, cookie, _) = r.reply(data).expect("reply");
    (err, cookie)
}

#[test]
fn pipelined_requests_each_answered_once() {
    let mut s = serve(Which::Rsd, "", false);
    let mut r = connect(&s.dir.path("nbd.sock"), "fmt");
    assert_eq!(r.size, 16 << 20);
    let mut burst = Vec::new();
    for i in 0..64u64 {
        if i % 2 == 0 {
            burst.extend(nbd_wire::request(CMD_READ, 0, 1000 + i, i * 4096, 4096));
        } else {
            let data = vec![i as u8; 512];
            burst.extend(nbd_wire::write_request(0, 1000 + i, i * 4096, &data));
        }
    }
    r.s.write_all(&burst).expect("burst");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        // Reads carry 4096 bytes; writes none. Peek the cookie first.
        let (err, cookie) = nbd_wire::simple_reply(&mut r.s).expect("reply");
        assert_eq!(err, 0);
        if (cookie - 1000) % 2 == 0 {
            let mut d = vec![0u8; 4096];
            r.s.read_exact(&mut d).expect("data");
        }
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
    }
    assert_eq!(seen.len(), 64);
    assert_eq!(seen, (1000..1064).collect());
    s.quit();
}

#[test]
fn bad_requests_get_errors_and_the_connection_survives() {
    let mut s = serve(Which::Rsd, "", false);
    let mut r = connect(&s.dir.path("nbd.sock"), "fmt");
    let good = |r: &mut Nbd, cookie| {
        r.s.write_all(&nbd_wire::request(CMD_READ, 0, cookie, 0, 512))
            .expect("good");
        assert_eq!(simple(r, 512), (0, cookie), "good request after a bad one");
    };
    let cases: Vec<(Vec<u8>, u32)> = vec![
        (nbd_wire::request(42, 0, 1, 0, 512), 22), // unknown command
        (nbd_wire::request(CMD_READ, 0x80, 2, 0, 512), 22), // unknown flag
        (nbd_wire::request(CMD_READ, 1, 3, 0, 512), 22), // FUA on read
        (nbd_wire::request(CMD_READ, 0, 4, 16 << 20, 512), 22), // past the end
        (nbd_wire::request(CMD_READ, 0, 5, u64::MAX - 10, 512), 22), // offset overflow
        (nbd_wire::request(CMD_READ, 0, 6, 0, 64 << 20), 22), // oversized read
        (nbd_wire::request(CMD_BLOCK_STATUS, 0, 7, 0, 512), 22), // block status unnegotiated
    ];
    for (req, want) in cases {
        let cookie = u64::from_be_bytes(req[8..16].try_into().expect("c"));
        r.s.write_all(&req).expect("bad");
        assert_eq!(simple(&mut r, 0), (want, cookie));
        good(&mut r, 100 + cookie);
    }
    // An oversized write: its payload is drained, then EINVAL.
    let mut w = nbd_wire::request(CMD_WRITE, 0, 8, 0, (33 << 20) as u32);
    w.extend(vec![0u8; 33 << 20]);
    r.s.write_all(&w).expect("big write");
    assert_eq!(simple(&mut r, 0), (22, 8));
    good(&mut r, 108);
    // A write to a read-only export: EPERM.
    let mut ro = connect(&s.dir.path("nbd.sock"), "ro");
    assert_ne!(ro.flags & nbd_wire::FLAG_READ_ONLY, 0, "read-only flag");
    let w = nbd_wire::write_request(0, 9, 0, &[1u8; 512]);
    ro.s.write_all(&w).expect("ro write");
    assert_eq!(simple(&mut ro, 0), (1, 9));
    // A bad magic closes that connection only.
    r.s.write_all(&[0u8; 28]).expect("garbage");
    let mut b = [0u8; 1];
    assert_eq!(r.s.read(&mut b).unwrap_or(0), 0, "closed after a bad magic");
    good(&mut ro, 110);
    s.quit();
}

#[test]
fn writable_export_holds_the_image_against_qemu_tools() {
    let mut s = serve(Which::Rsd, "", false);
    let img = s.dir.s("disk.img");
    let out = run("qemu-img", &["resize", "-f", "raw", &img, "32M"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get \"resize\" lock"),
        "{out:?}"
    );
    // raw shares write, as in QEMU: another writer is allowed.
    ok(&run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &img]));
    s.quit();
    ok(&run("qemu-img", &["resize", "-f", "raw", &img, "32M"]));
}

#[test]
fn blockstats_counters_move_with_nbd_io() {
    let mut s = serve(Which::Rsd, ",discard=unmap", false);
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read 0 4k",
            "-c",
            "flush",
            "-c",
            "discard 0 4k",
            &s.url("fmt", false),
        ],
    ));
    let mut q = Qmp::ready(&s.dir.path("q.sock"));
    let r = q.cmd(r#"{"execute":"query-blockstats","arguments":{"query-nodes":true}}"#);
    let fmt = r["return"]
        .as_array()
        .and_then(|l| l.iter().find(|n| n["node-name"] == "fmt").cloned())
        .expect("fmt stats");
    let st = &fmt["stats"];
    assert_eq!(st["wr_bytes"], 65536, "{st}");
    assert_eq!(st["wr_highest_offset"], 65536);
    assert!(st["rd_bytes"].as_u64().unwrap_or(0) >= 4096, "{st}");
    assert!(st["flush_operations"].as_u64().unwrap_or(0) >= 1, "{st}");
    assert_eq!(st["unmap_operations"], 1, "{st}");
    assert_eq!(
        fmt["parent"]["driver-specific"]["discard-nb-ok"], 1,
        "{fmt}"
    );
    drop(q);
    s.quit();
}

/// Replaces event timestamps and the temp dir so transcripts compare.
fn mask_line(l: &str, dir: &TempDir) -> String {
    let l = l.replace(&dir.0.display().to_string(), "$D");
    match (l.find("{\"seconds\": "), l.find("}, \"event\"")) {
        (Some(a), Some(b)) if a < b => format!("{}T{}", &l[..a], &l[b + 1..]),
        _ => l,
    }
}

/// Runs QMP steps against a daemon with a file+raw node pair on a fresh
/// image; each step's lines are its events followed by its reply.
fn export_transcript(
    which: Which,
    steps: &[&str],
    connect_before: Option<usize>,
) -> Vec<Vec<String>> {
    let dir = TempDir::new();
    qemu_img_create(&dir.path("disk.img"), "16M");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=file,node-name=disk,filename={}", dir.s("disk.img")),
        "--blockdev",
        "driver=raw,node-name=fmt,file=disk",
        "--blockdev",
        "driver=raw,node-name=ro,file=disk,read-only=on",
        "--pidfile",
        &dir.s("p.pid"),
    ]));
    let mut daemon = Daemon::spawn(which, &a);
    assert!(wait_for_path(&dir.path("p.pid"), 10));
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let d = dir.0.display().to_string();
    let mut out = Vec::new();
    let mut client = None;
    for (i, step) in steps.iter().enumerate() {
        if connect_before == Some(i) {
            let r = connect(&dir.path("nbd.sock"), "fmt");
            client = Some(r);
        }
        q.send(step.replace("$D", &d).as_bytes());
        let mut lines = Vec::new();
        loop {
            let l = q.line();
            assert!(!l.is_empty(), "{which:?}: EOF after {step}");
            let is_event = l.contains("\"event\"");
            lines.push(mask_line(&l, &dir));
            if !is_event {
                break;
            }
        }
        out.push(lines);
    }
    drop(client);
    q.send(br#"{"execute": "quit"}"#);
    let mut tail = Vec::new();
    loop {
        let l = q.line();
        if l.is_empty() {
            break;
        }
        tail.push(mask_line(&l, &dir));
    }
    out.push(tail);
    assert_eq!(daemon.wait_exit(10), Some(0));
    out
}

#[test]
fn export_commands_and_events_match_qsd() {
    let steps = [
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "fmt"}}"#,
        r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "$D/nbd.sock"}}}}"#,
        r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "$D/nbd2.sock"}}}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "nope"}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "fmt", "writable": true}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "fmt"}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "fmt"}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e2", "node-name": "ro", "writable": true}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e3", "node-name": "disk", "name": "d", "bitmaps": ["nope"]}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e4", "node-name": "disk", "name": "d"}}"#,
        r#"{"execute": "query-block-exports"}"#,
        r#"{"execute": "x-debug-query-block-graph"}"#,
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "fmt"}}"#,
        r#"{"execute": "block-export-del", "arguments": {"id": "nope"}}"#,
        r#"{"execute": "block-export-del", "arguments": {"id": "e4"}}"#,
        r#"{"execute": "query-block-exports"}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e5", "node-name": "disk", "name": "d2"}}"#,
        r#"{"execute": "nbd-server-stop"}"#,
        r#"{"execute": "nbd-server-stop"}"#,
        r#"{"execute": "query-block-exports"}"#,
        r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "$D/nbd.sock"}}}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e6", "node-name": "fmt", "writable": true}}"#,
        r#"{"execute": "nbd-server-add", "arguments": {"device": "disk", "name": "legacy"}}"#,
        r#"{"execute": "nbd-server-add", "arguments": {"device": "disk", "name": "legacy"}}"#,
        r#"{"execute": "query-block-exports"}"#,
        r#"{"execute": "nbd-server-remove", "arguments": {"name": "legacy"}}"#,
        r#"{"execute": "nbd-server-remove", "arguments": {"name": "legacy"}}"#,
    ];
    let mut all = Vec::new();
    for which in Which::all() {
        all.push((which, export_transcript(which, &steps, None)));
    }
    let (_, t) = &all[0];
    assert!(t[0][0].contains("NBD server not running"), "{:?}", t[0]);
    assert!(
        t[5][0].contains("Block export id 'e0' is already in use"),
        "{:?}",
        t[5]
    );
    assert!(
        t[14][0].contains("BLOCK_EXPORT_DELETED"),
        "event before the reply: {:?}",
        t[14]
    );
    assert!(t[17].len() == 3, "two events then the reply: {:?}", t[17]);
    assert!(
        t[27].iter().any(|l| l.contains("BLOCK_EXPORT_DELETED")),
        "quit deletes exports first: {:?}",
        t[27]
    );
    for (which, o) in &all[1..] {
        for (i, (a, b)) in t.iter().zip(o.iter()).enumerate() {
            assert_eq!(
                a,
                b,
                "{which:?} step {i}: {}",
                steps.get(i).unwrap_or(&"quit")
            );
        }
    }
}

#[test]
fn export_del_safe_refuses_while_a_client_is_connected() {
    let steps = [
        r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "$D/nbd.sock"}}}}"#,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "fmt"}}"#,
        r#"{"execute": "block-export-del", "arguments": {"id": "e"}}"#,
        r#"{"execute": "block-export-del", "arguments": {"id": "e", "mode": "hard"}}"#,
        r#"{"execute": "query-block-exports"}"#,
    ];
    let t = export_transcript(Which::Rsd, &steps, Some(2));
    assert_eq!(
        t[2],
        ["{\"error\": {\"class\": \"GenericError\", \"desc\": \"export 'e' still in use\"}}\r\n"]
    );
    assert_eq!(t[3].len(), 2, "event, then reply: {:?}", t[3]);
    assert_eq!(t[4], ["{\"return\": []}\r\n"]);
}

/// A client that has hung up is gone: block-export-del right after it
/// closed its socket goes through (rsd waits for the connection's end
/// instead of losing a race with it), while one still connected keeps
/// the export in use.
#[test]
fn export_del_right_after_a_client_left_goes_through() {
    let mut s = serve(Which::Rsd, "", false);
    let mut q = Qmp::ready(&s.dir.path("q.sock"));
    let add = r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"fmt","writable":true}}"#;
    let del = r#"{"execute":"block-export-del","arguments":{"id":"e"}}"#;
    for round in 0..20 {
        if round > 0 {
            let r = q.cmd(add);
            assert!(r.get("return").is_some(), "round {round}: {r}");
        }
        let c = connect(&s.dir.path("nbd.sock"), "fmt");
        if round == 0 {
            let r = q.cmd(del);
            assert_eq!(r["error"]["desc"], "export 'e' still in use", "{r}");
        }
        drop(c);
        let r = q.cmd(del);
        assert!(r.get("return").is_some(), "round {round}: {r}");
        let r = q.cmd(r#"{"execute":"query-block-exports"}"#);
        assert!(
            r["return"]
                .as_array()
                .is_some_and(|a| a.iter().all(|e| e["id"] != "e")),
            "{r}"
        );
    }
    drop(q);
    s.quit();
}

#[test]
fn junk_from_clients_never_disturbs_the_daemon() {
    let mut s = serve(Which::Rsd, "", false);
    // A good client stays connected through the whole storm.
    let mut good = connect(&s.dir.path("nbd.sock"), "fmt");
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..40 {
        let Ok(mut c) = UnixStream::connect(s.dir.path("nbd.sock")) else {
            panic!("server stopped accepting in round {round}");
        };
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut hello = [0u8; 18];
        let _ = c.read_exact(&mut hello);
        if round % 2 == 1 {
            // Past the handshake, into transmission, then junk.
            let _ = c.write_all(&3u32.to_be_bytes());
            let go = nbd_wire::option(OPT_GO, &nbd_wire::go_data("fmt"));
            let _ = c.write_all(&go);
        }
        let len = (next() % 4096) as usize;
        let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = c.write_all(&junk);
        let mut sink = [0u8; 4096];
        let _ = c.read(&mut sink);
    }
    good.s
        .write_all(&nbd_wire::request(CMD_READ, 0, 77, 0, 512))
        .expect("good request");
    assert_eq!(
        simple(&mut good, 512),
        (0, 77),
        "the good client is still served"
    );
    let out = ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 9 0 4k",
            "-c",
            "read -P 9 0 4k",
            &s.url("fmt", false),
        ],
    ));
    assert!(!out.contains("failed"), "{out}");
    s.quit();
}

#[test]
fn force_share_lets_others_resize_as_in_qemu() {
    for (opts, resize_ok) in [
        ("read-only=on", false),
        ("read-only=on,force-share=on", true),
    ] {
        let mut results = Vec::new();
        for which in Which::all() {
            let dir = TempDir::new();
            qemu_img_create(&dir.path("disk.img"), "16M");
            let mut a = monitor_args(&dir.s("q.sock"));
            a.extend(args(&[
                "--blockdev",
                &format!(
                    "driver=file,node-name=disk,filename={},{opts}",
                    dir.s("disk.img")
                ),
                "--blockdev",
                &format!("driver=raw,node-name=fmt,file=disk,{opts}"),
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", dir.s("nbd.sock")),
                "--export",
                "type=nbd,id=e,node-name=fmt",
                "--pidfile",
                &dir.s("p.pid"),
            ]));
            let _d = Daemon::spawn(which, &a);
            assert!(wait_for_path(&dir.path("p.pid"), 10), "{which:?} {opts}");
            let mut q = Qmp::ready(&dir.path("q.sock"));
            let graph = q.cmd(r#"{"execute":"x-debug-query-block-graph"}"#);
            let resized = run(
                "qemu-img",
                &["resize", "-f", "raw", &dir.s("disk.img"), "32M"],
            )
            .status
            .success();
            q.send(br#"{"execute":"quit"}"#);
            let _ = q.line();
            assert_eq!(resized, resize_ok, "{which:?} {opts}");
            results.push(graph.to_string());
        }
        for r in &results[1..] {
            assert_eq!(&results[0], r, "{opts}: same graph and permissions as QSD");
        }
    }
}

#[test]
fn block_status_maps_match_qsd() {
    let mut maps = Vec::new();
    for which in Which::all() {
        let mut s = serve(which, ",discard=unmap", false);
        let url = s.url("fmt", false);
        ok(&run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 1 1M 1M",
                "-c",
                "write -P 2 8M 64k",
                "-c",
                "discard 1M 64k",
                &url,
            ],
        ));
        let map = ok(&run("qemu-img", &["map", "--output=json", &url]));
        s.quit();
        maps.push((which, map));
    }
    let (_, first) = &maps[0];
    assert!(
        first.contains("\"start\": 1114112, \"length\": 983040"),
        "{first}"
    );
    for (which, m) in &maps[1..] {
        assert_eq!(first, m, "{which:?}: qemu-img map differs");
    }
}

#[test]
fn extended_headers_and_block_status_payload() {
    let mut s = serve(Which::Rsd, ",discard=unmap", false);
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 64k", &s.url("fmt", false)],
    ));
    let mut r = UnixStream::connect(s.dir.path("nbd.sock")).expect("connect");
    r.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    nbd_wire::greet(&mut r).expect("greeting");
    let opt_reply = |r: &mut UnixStream| nbd_wire::option_reply(r).expect("option reply");
    r.write_all(&nbd_wire::option(11, &[])).expect("option");
    assert_eq!(opt_reply(&mut r).0, 1, "EXTENDED_HEADERS acknowledged");
    // SET_META_CONTEXT base:allocation on "fmt".
    let mut d = 3u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"fmt");
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&15u32.to_be_bytes());
    d.extend_from_slice(b"base:allocation");
    r.write_all(&nbd_wire::option(10, &d)).expect("option");
    let (kind, ctx) = opt_reply(&mut r);
    assert_eq!(kind, 4, "META_CONTEXT");
    let ctx_id = u32::from_be_bytes(ctx[..4].try_into().expect("id"));
    assert_eq!(opt_reply(&mut r).0, 1);
    let (_, flags) = nbd_wire::go(&mut r, "fmt").expect("GO");
    assert_eq!(flags, 0x1ded, "QSD's flags, block-status payload included");
    let ext = |kind: u16, flags: u16, cookie: u64, offset: u64, len: u64| {
        let mut b = 0x21e4_1c71u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    };
    let reply = |r: &mut UnixStream| -> (u16, u64, u64, Vec<u8>) {
        let mut h = [0u8; 32];
        r.read_exact(&mut h).expect("reply header");
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().expect("m")),
            0x6e8a_278c,
            "extended reply"
        );
        let kind = u16::from_be_bytes(h[6..8].try_into().expect("t"));
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("c"));
        let offset = u64::from_be_bytes(h[16..24].try_into().expect("o"));
        let len = u64::from_be_bytes(h[24..32].try_into().expect("l"));
        let mut p = vec![0u8; len as usize];
        r.read_exact(&mut p).expect("payload");
        (kind, cookie, offset, p)
    };
    // READ: one OFFSET_DATA chunk with the data.
    r.write_all(&ext(0, 0, 1, 4096, 4096)).expect("read");
    let (kind, cookie, offset, p) = reply(&mut r);
    assert_eq!((kind, cookie, offset, p.len()), (1, 1, 4096, 8 + 4096));
    assert!(p[8..].iter().all(|b| *b == 1));
    // BLOCK_STATUS with a payload naming the context and 1 MiB of interest.
    let mut bs = ext(7, 1 << 5, 2, 0, 12);
    bs.extend_from_slice(&(1u64 << 20).to_be_bytes());
    bs.extend_from_slice(&ctx_id.to_be_bytes());
    r.write_all(&bs).expect("block status");
    let (kind, cookie, _, p) = reply(&mut r);
    assert_eq!((kind, cookie), (6, 2), "BLOCK_STATUS_EXT");
    assert_eq!(u32::from_be_bytes(p[..4].try_into().expect("id")), ctx_id);
    let n = u32::from_be_bytes(p[4..8].try_into().expect("n")) as usize;
    assert_eq!(p.len(), 8 + 16 * n);
    let first_len = u64::from_be_bytes(p[8..16].try_into().expect("len"));
    let first_flags = u64::from_be_bytes(p[16..24].try_into().expect("flags"));
    assert_eq!((first_len, first_flags), (65536, 0), "data first");
    // A payload naming an unknown context: EINVAL as an error chunk.
    let mut bad = ext(7, 1 << 5, 3, 0, 12);
    bad.extend_from_slice(&4096u64.to_be_bytes());
    bad.extend_from_slice(&999u32.to_be_bytes());
    r.write_all(&bad).expect("bad block status");
    let (kind, cookie, _, p) = reply(&mut r);
    assert_eq!((kind, cookie), (32769, 3));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().expect("err")), 22);
    // A classic 28-byte request is a protocol violation once extended.
    let mut old = nbd_wire::request(CMD_READ, 0, 4, 0, 512);
    old.extend_from_slice(&[0u8; 4]);
    r.write_all(&old).expect("old header");
    let mut b = [0u8; 1];
    let t = std::time::Instant::now();
    assert_eq!(r.read(&mut b).expect("EOF, not a timeout"), 0, "closed");
    assert!(t.elapsed() < Duration::from_secs(5));
    s.quit();
}

#[test]
fn qemu_nbd_listing_equals_qsd() {
    let mut lists = Vec::new();
    for which in Which::all() {
        let mut s = serve(which, "", false);
        lists.push(ok(&run("qemu-nbd", &["-L", "-k", &s.dir.s("nbd.sock")])));
        s.quit();
    }
    assert!(
        lists[0].contains("transaction size: 64-bit"),
        "{}",
        lists[0]
    );
    for l in &lists[1..] {
        assert_eq!(&lists[0], l);
    }
}

#[test]
fn max_connections_holds_back_extra_clients() {
    let dir = TempDir::new();
    qemu_img_create(&dir.path("disk.img"), "1M");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=file,node-name=disk,filename={}", dir.s("disk.img")),
        "--nbd-server",
        &format!(
            "addr.type=unix,addr.path={},max-connections=1",
            dir.s("nbd.sock")
        ),
        "--export",
        "type=nbd,id=e,node-name=disk,writable=on,writethrough=on",
        "--pidfile",
        &dir.s("p.pid"),
    ]));
    let _d = Daemon::spawn(Which::Rsd, &a);
    assert!(wait_for_path(&dir.path("p.pid"), 10));
    let first = connect(&dir.path("nbd.sock"), "disk");
    let mut second = UnixStream::connect(dir.path("nbd.sock")).expect("connect");
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut hello = [0u8; 18];
    assert!(
        second.read_exact(&mut hello).is_err(),
        "no greeting while the first is connected"
    );
    drop(first);
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    second
        .read_exact(&mut hello)
        .expect("greeting once the first left");
    assert_eq!(&hello[..8], b"NBDMAGIC");
}

/// Structured READ replies of a qcow2 export: an unallocated range goes
/// out as a hole chunk (as QSD sends it), allocated data as a data chunk
/// with the right bytes.
#[test]
fn qcow2_holes_are_sent_as_hole_chunks() {
    let dir = TempDir::new();
    let image = dir.s("img.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", &image, "16M"])
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let io = run("qemu-io", &["-c", "write -P 0x7e 1M 64k", &image]);
    ok(&io);
    let sock = dir.s("nbd.sock");
    let a = args(&[
        "--blockdev",
        &format!("driver=qcow2,node-name=q,file.driver=file,file.filename={image}"),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={sock}"),
        "--export",
        "type=nbd,id=e,node-name=q",
    ]);
    let _d = Daemon::spawn(Which::Rsd, &a);
    assert!(wait_for_path(&dir.path("nbd.sock"), 10));
    let mut r = Nbd::connect_structured(&dir.path("nbd.sock"), "q").expect("connect");
    assert_eq!(r.size, 16 << 20);
    // (offset, expected chunk type: 1 data, 2 hole). Holes are told from
    // cached metadata only, so the data read (which loads the L2 table)
    // comes first.
    for (cookie, (off, want)) in [(1 << 20, 1u16), (4 << 20, 2), (8 << 20, 2)]
        .into_iter()
        .enumerate()
    {
        r.s.write_all(&nbd_wire::request(CMD_READ, 0, cookie as u64, off, 65536))
            .expect("read");
        let c = nbd_wire::chunk(&mut r.s).expect("chunk");
        let (kind, body) = (c.kind, c.data);
        assert_eq!(kind, want, "read at {off}");
        if kind == 1 {
            assert!(body[8..].iter().all(|b| *b == 0x7e), "data at {off}");
        } else {
            assert_eq!(
                &body[8..12],
                &65536u32.to_be_bytes(),
                "hole length at {off}"
            );
        }
    }
}

#[test]
fn queue_depth_1_then_idle_then_a_slow_client() {
    // Back-to-back writes at queue depth 1 (where the reader polls the
    // socket between requests), then a second of idling: the daemon's CPU
    // time over it stays near zero (a reader stuck polling would burn the
    // whole second). Then a slow client, verified read by read. The
    // polling itself is unit-tested in src/nbd/spin.rs.
    let mut s = serve(Which::Rsd, "", false);
    let mut r = connect(&s.dir.path("nbd.sock"), "fmt");
    let write = |r: &mut Nbd, cookie: u64, offset: u64, byte: u8| {
        let req = nbd_wire::write_request(0, cookie, offset, &[byte; 4096]);
        r.s.write_all(&req).expect("write");
        assert_eq!(simple(r, 0), (0, cookie));
    };
    for i in 0..2000u64 {
        write(&mut r, i, (i % 64) * 4096, i as u8);
    }
    let pid = s.daemon.child.id();
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(1));
    let idle = cpu_time(pid) - before;
    assert!(
        idle < Duration::from_millis(150),
        "idle connection used {idle:?} of CPU"
    );
    // A slow client (one request every 2 ms) is served and verified.
    for i in 0..50u64 {
        std::thread::sleep(Duration::from_millis(2));
        write(&mut r, 5000 + i, 1 << 20, i as u8);
        r.s.write_all(&nbd_wire::request(CMD_READ, 0, 9000 + i, 1 << 20, 4096))
            .expect("read");
        let (err, _, d) = r.reply(4096).expect("reply");
        assert_eq!(err, 0);
        assert!(d.iter().all(|&b| b == i as u8), "read {i} saw other data");
    }
    s.quit();
}

#[test]
fn clients_are_served_only_after_the_command_line_is_applied() {
    // The socket exists from `--nbd-server` on, but a client that
    // connects at once must still find the export named later on the
    // command line (QSD starts serving only after all options).
    let dir = TempDir::new();
    qemu_img_create(&dir.path("disk.img"), "1M");
    let sock = dir.s("nbd.sock");
    let mut a = args(&["--nbd-server", &format!("addr.type=unix,addr.path={sock}")]);
    for i in 0..300 {
        a.extend(args(&[
            "--blockdev",
            &format!("driver=null-co,node-name=n{i},size=4096"),
        ]));
    }
    a.extend(args(&[
        "--blockdev",
        &format!("driver=file,node-name=fmt,filename={}", dir.s("disk.img")),
        "--export",
        "type=nbd,id=e,node-name=fmt",
    ]));
    let _d = Daemon::spawn(Which::Rsd, &a);
    assert!(wait_for_path(&dir.path("nbd.sock"), 10));
    assert_eq!(connect(&dir.path("nbd.sock"), "fmt").size, 1 << 20);
}

/// A daemon serving `img` (a qcow2 when `qcow2`) over `nbd.sock` in
/// `dir`, with `server_opts` added to `--nbd-server`.
fn serve_image(which: Which, dir: &TempDir, qcow2: bool, server_opts: &str) -> Daemon {
    let node = if qcow2 {
        format!(
            "driver=qcow2,node-name=disk,file.driver=file,file.filename={}",
            dir.s("img")
        )
    } else {
        format!("driver=file,node-name=disk,filename={}", dir.s("img"))
    };
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &node,
        "--nbd-server",
        &format!(
            "addr.type=unix,addr.path={}{server_opts}",
            dir.s("nbd.sock")
        ),
        "--export",
        "type=nbd,id=e,node-name=disk,writable=on",
        "--pidfile",
        &dir.s("p.pid"),
    ]));
    let d = Daemon::spawn(which, &a);
    assert!(wait_for_path(&dir.path("p.pid"), 10), "{which:?} start-up");
    d
}

/// Waits until the server closes `s` (EOF or reset); how long after
/// `since` that was.
fn closed_within(s: &mut UnixStream, since: std::time::Instant, secs: u64) -> Option<Duration> {
    s.set_read_timeout(Some(Duration::from_secs(secs)))
        .expect("timeout");
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Some(since.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(since.elapsed())
            }
            Err(_) => return None,
        }
    }
}

/// `handshake-max-seconds`: a client that stalls in the handshake (at
/// the greeting, or in the middle of option haggling) is dropped after
/// the limit, one that finished it is kept, and the default is QEMU's
/// 10 s: on both daemons.
#[test]
fn stalled_handshakes_are_dropped_as_in_qsd() {
    let runs: Vec<_> = Which::all()
        .into_iter()
        .map(|which| {
            std::thread::spawn(move || {
                let dir = TempDir::new();
                qemu_img_create(&dir.path("img"), "1M");
                let mut d = serve_image(which, &dir, false, ",handshake-max-seconds=1");
                let sock = dir.path("nbd.sock");
                let since = std::time::Instant::now();
                let mut silent = UnixStream::connect(&sock).expect("connect");
                let mut haggling = UnixStream::connect(&sock).expect("connect");
                nbd_wire::greet(&mut haggling).expect("greeting");
                let mut done = connect(&sock, "disk");
                let t1 = closed_within(&mut silent, since, 8).expect("silent client dropped");
                let t2 = closed_within(&mut haggling, since, 8).expect("haggling client dropped");
                for t in [t1, t2] {
                    assert!(
                        t >= Duration::from_millis(800) && t < Duration::from_secs(4),
                        "{which:?}: {t:?}"
                    );
                }
                // The finished one is served well past the limit.
                done.s
                    .write_all(&nbd_wire::request(CMD_READ, 0, 1, 0, 512))
                    .expect("read");
                assert_eq!(simple(&mut done, 512), (0, 1), "{which:?}");
                let _ = d.child.kill();
                // The default limit.
                let dir = TempDir::new();
                qemu_img_create(&dir.path("img"), "1M");
                let _d = serve_image(which, &dir, false, "");
                let since = std::time::Instant::now();
                let mut silent = UnixStream::connect(dir.path("nbd.sock")).expect("connect");
                let t = closed_within(&mut silent, since, 20).expect("dropped by default");
                assert!(
                    t >= Duration::from_secs(9) && t < Duration::from_secs(13),
                    "{which:?}: default {t:?}"
                );
            })
        })
        .collect();
    for r in runs {
        r.join().expect("run");
    }
}

fn count_dir(path: String) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

/// The connection bounds with the defaults: stalled clients cost no
/// thread; at most 100 clients are served (QEMU's default
/// max-connections), the next waits in the backlog and is served when
/// one leaves; the refusal is logged once; and 100 clients fit well
/// within a 1024-descriptor limit.
#[test]
fn default_connection_bounds_fit_a_small_fd_limit() {
    let dir = TempDir::new();
    qemu_img_create(&dir.path("img"), "1M");
    let mut d = serve_image(Which::Rsd, &dir, false, "");
    // The same under a 1024-descriptor limit, the common default.
    let _ = d.child.kill();
    let _ = d.child.wait();
    let _ = std::fs::remove_file(dir.path("p.pid"));
    let a: Vec<String> = std::iter::once(rsd_bin().to_string())
        .chain(args(&[
            "--blockdev",
            &format!("driver=file,node-name=disk,filename={}", dir.s("img")),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", dir.s("nbd.sock")),
            "--export",
            "type=nbd,id=e,node-name=disk,writable=on",
            "--pidfile",
            &dir.s("p.pid"),
        ]))
        .collect();
    let child = Command::new("prlimit")
        .arg("--nofile=1024:1024")
        .args(&a)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("prlimit");
    let mut d = Daemon {
        child,
        which: Which::Rsd,
    };
    assert!(wait_for_path(&dir.path("p.pid"), 10));
    let pid = d.child.id();
    let sock = dir.path("nbd.sock");
    let (fds0, threads0) = (
        count_dir(format!("/proc/{pid}/fd")),
        count_dir(format!("/proc/{pid}/task")),
    );
    // 60 clients that never speak: a descriptor each, no thread.
    let silent: Vec<UnixStream> = (0..60)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).expect("connect");
            let mut hello = [0u8; 18];
            s.read_exact(&mut hello).expect("hello");
            s
        })
        .collect();
    assert!(
        count_dir(format!("/proc/{pid}/task")) < threads0 + 10,
        "threads for clients in the handshake"
    );
    drop(silent);
    // 100 served clients.
    let mut served: Vec<Nbd> = (0..100).map(|_| connect(&sock, "disk")).collect();
    for (i, r) in served.iter_mut().enumerate() {
        r.s.write_all(&nbd_wire::request(CMD_READ, 0, i as u64, 0, 512))
            .expect("read");
        assert_eq!(simple(r, 512), (0, i as u64));
    }
    let fds = count_dir(format!("/proc/{pid}/fd")) - fds0;
    let threads = count_dir(format!("/proc/{pid}/task")) - threads0;
    // About five each (the socket and the thread's runtime): half the
    // limit, with room for images, monitors and a second export.
    assert!(fds <= 600, "100 clients hold {fds} descriptors");
    assert!(threads <= 110, "100 clients hold {threads} threads");
    let mut extra = UnixStream::connect(&sock).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut hello = [0u8; 18];
    assert!(
        extra.read_exact(&mut hello).is_err(),
        "a 101st client was served"
    );
    let _another = UnixStream::connect(&sock).expect("connect");
    drop(served);
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    extra
        .read_exact(&mut hello)
        .expect("served once others left");
    d.signal(15);
    assert_eq!(d.wait_exit(10), Some(0));
    let err = d.stderr_text();
    assert_eq!(
        err.matches("max-connections").count(),
        1,
        "one line about the limit: {err}"
    );
    assert!(
        err.contains("100 clients connected (max-connections)"),
        "{err}"
    );
}

/// A disconnect storm on a qcow2 with 4 KiB clusters: clients pipeline
/// allocating writes and leave (half of them with a reset). The writes
/// they left queued are dropped before they start, so a new client is
/// served at once, and the image stays consistent (`qemu-img check`)
/// with every acknowledged write readable.
#[test]
fn departed_clients_leave_no_queued_work() {
    let dir = TempDir::new();
    let ok_run = |argv: &[&str]| ok(&run("qemu-img", argv));
    ok_run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &dir.s("img"),
        "256M",
    ]);
    let mut d = serve_image(Which::Rsd, &dir, true, "");
    let sock = dir.path("nbd.sock");
    let (clients, depth) = (60u64, 64u64);
    let storm: Vec<_> = (0..clients)
        .map(|c| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut r = connect(&sock, "disk");
                let mut burst = Vec::new();
                for i in 0..depth {
                    let off = (c * depth + i) * 4096;
                    burst.extend(nbd_wire::write_request(0, i, off, &[0x77u8; 4096]));
                }
                r.s.write_all(&burst).expect("burst");
                if c % 2 == 0 {
                    let linger = nix::sys::socket::sockopt::Linger;
                    let l = nix::libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    let _ = nix::sys::socket::setsockopt(&r.s, linger, &l);
                }
            })
        })
        .collect();
    for t in storm {
        t.join().expect("client");
    }
    // A new client is served while (or right after) the storm ends.
    let start = std::time::Instant::now();
    let mut r = connect(&sock, "disk");
    let req = nbd_wire::write_request(0, 7, 255 << 20, &[0x42u8; 4096]);
    r.s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    r.s.write_all(&req).expect("write");
    assert_eq!(simple(&mut r, 0), (0, 7));
    let waited = start.elapsed();
    drop(r);
    d.signal(15);
    assert_eq!(d.wait_exit(20), Some(0));
    let check = run("qemu-img", &["check", "--output=json", &dir.s("img")]);
    let report: serde_json::Value =
        serde_json::from_slice(&check.stdout).expect("qemu-img check json");
    assert_eq!(report["check-errors"], 0, "{report}");
    assert!(report.get("corruptions").is_none_or(|c| c == 0), "{report}");
    // With write-back metadata the whole storm may be written before
    // the departures are seen; what must hold is that the new client
    // does not wait behind the departed clients' work.
    let written = report["allocated-clusters"].as_u64().unwrap_or(u64::MAX);
    let sent = clients * depth;
    assert!(written <= sent + 1, "{written} clusters for {sent} writes");
    assert!(
        waited < Duration::from_secs(5),
        "the new client waited {waited:?} ({written} of {sent} departed writes done)"
    );
    let io = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x42 255M 4k", &dir.s("img")],
    );
    let out = ok(&io);
    assert!(!out.contains("failed"), "{out}");
}

/// A qcow2 whose data clusters lie past the end of its truncated file:
/// they read as zeroes and can be written again, as in QSD (rsd once
/// failed such reads with EINVAL).
#[test]
fn clusters_past_the_end_of_the_file_read_as_zeroes_as_in_qsd() {
    let mut seen = Vec::new();
    for which in Which::all() {
        let dir = TempDir::new();
        let img = dir.s("img");
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &img, "16M"],
        ));
        ok(&run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x11 0 1M", &img],
        ));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .expect("open");
        let len = f.metadata().expect("stat").len();
        f.set_len(len - (512 << 10)).expect("truncate");
        let mut d = serve_image(which, &dir, true, "");
        let url = format!("nbd+unix:///disk?socket={}", dir.s("nbd.sock"));
        let io = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0x11 0 512k",
                "-c",
                "read -P 0 512k 512k",
                "-c",
                "write -P 0x22 768k 64k",
                "-c",
                "read -P 0x22 768k 64k",
                &url,
            ],
        );
        let out =
            String::from_utf8_lossy(&io.stdout).into_owned() + &String::from_utf8_lossy(&io.stderr);
        assert!(
            !out.contains("failed") && !out.contains("error"),
            "{which:?}: {out}"
        );
        d.signal(15);
        assert_eq!(d.wait_exit(10), Some(0));
        let lines: Vec<String> = out
            .lines()
            .filter(|l| !l.contains("ops/sec"))
            .map(String::from)
            .collect();
        seen.push(lines);
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
}

/// Option haggling limits, byte for byte as QSD: an export name over
/// 4096 bytes is refused with ERR_INVALID and the connection goes on; an
/// unknown name is quoted cut to 80 characters; a 10 MB option is read
/// and refused without ending the connection.
#[test]
fn long_names_and_options_get_errors_as_in_qsd() {
    fn opt(s: &mut UnixStream, opt: u32, data: &[u8]) -> (u32, Vec<u8>) {
        s.write_all(&nbd_wire::option(opt, data)).expect("option");
        nbd_wire::option_reply(s).expect("reply")
    }
    let go = nbd_wire::go_data;
    let mut seen = Vec::new();
    for which in Which::all() {
        let dir = TempDir::new();
        qemu_img_create(&dir.path("img"), "1M");
        let _d = serve_image(which, &dir, false, "");
        let mut s = UnixStream::connect(dir.path("nbd.sock")).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        nbd_wire::greet(&mut s).expect("greeting");
        let mut replies = vec![
            opt(&mut s, OPT_GO, &go(&"a".repeat(4097))),
            opt(&mut s, nbd_wire::OPT_INFO, &go(&"b".repeat(5000))),
            opt(&mut s, OPT_GO, &go(&"c".repeat(4096))),
            opt(&mut s, 99, &vec![0u8; 10 << 20]),
        ];
        // Still connected: the export is there.
        let (kind, _) = opt(&mut s, OPT_GO, &go("disk"));
        while replies.len() < 5 && kind == 3 {
            if nbd_wire::option_reply(&mut s).expect("reply").0 == 1 {
                replies.push((1, Vec::new()));
            }
        }
        assert_eq!(replies[0].0, 0x8000_0003, "{which:?}");
        assert_eq!(replies[0].1, b"Invalid name length: 4097", "{which:?}");
        assert_eq!(
            replies[3].1, b"Unsupported option 99 (<unknown>)",
            "{which:?}"
        );
        assert_eq!(replies[4].0, 1, "{which:?}: GO after the errors");
        seen.push(replies);
    }
    if seen.len() == 2 {
        for (a, b) in seen[0].iter().zip(&seen[1]) {
            assert_eq!(a.0, b.0, "reply kinds differ");
            assert_eq!(String::from_utf8_lossy(&a.1), String::from_utf8_lossy(&b.1));
        }
    }
}

/// A qcow2 whose header says 513 bytes is 512 bytes long, in whole
/// sectors as QSD counts it (rsd once exported all 513).
#[test]
fn a_513_byte_qcow2_is_exported_as_512_as_in_qsd() {
    for which in Which::all() {
        let dir = TempDir::new();
        let img = dir.s("img");
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &img, "1024"],
        ));
        let mut b = std::fs::read(&img).expect("read");
        b[24..32].copy_from_slice(&513u64.to_be_bytes());
        std::fs::write(&img, b).expect("write");
        let _d = serve_image(which, &dir, true, "");
        let size = connect(&dir.path("nbd.sock"), "disk").size;
        assert_eq!(size, 512, "{which:?}");
    }
}

/// block-export-add checks its `iothread` as QSD does (it was once
/// ignored, whatever it named).
#[test]
fn export_iothread_is_checked_as_in_qsd() {
    let setup = |d: &TempDir| qemu_img_create(&d.path("r.img"), "1M");
    let out = same_on_both(
        &setup,
        &[
            "--blockdev",
            "driver=file,node-name=f,filename=$D/r.img",
            "--object",
            "iothread,id=io1",
            "--nbd-server",
            "addr.type=unix,addr.path=$D/n.sock",
        ],
        &[
            r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e1","node-name":"f","iothread":"nope"}}"#,
            r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e2","node-name":"f","iothread":"io1"}}"#,
            r#"{"execute":"query-block-exports"}"#,
        ],
    )
    .expect("daemons start");
    assert!(out[0].contains(r#"iothread \"nope\" not found"#), "{out:?}");
    assert!(out[2].contains(r#""id": "e2""#), "{out:?}");
}

/// A server that takes one connection does not offer multi-conn, as in
/// QSD; the default server does.
#[test]
fn multi_conn_follows_max_connections_as_in_qsd() {
    for which in Which::all() {
        for (opts, multi) in [("", true), (",max-connections=1", false)] {
            let dir = TempDir::new();
            qemu_img_create(&dir.path("img"), "1M");
            let _d = serve_image(which, &dir, false, opts);
            let flags = connect(&dir.path("nbd.sock"), "disk").flags;
            assert_eq!(
                flags & nbd_wire::FLAG_CAN_MULTI_CONN != 0,
                multi,
                "{which:?} {opts}: flags {flags:#x}"
            );
        }
    }
}

/// One bad client per case: what it sends after reading the greeting
/// (None: it closes at once), and whether it then waits for the server
/// to hang up (the handshake time limit) rather than closing itself.
fn bad_handshakes() -> Vec<(Vec<u8>, bool)> {
    let opt = nbd_wire::option;
    let fixed = 3u32.to_be_bytes().to_vec();
    let with = |head: &[u8], tail: Vec<u8>| [head.to_vec(), tail].concat();
    vec![
        (b"xxxxxxxxxxxxxxxx".to_vec(), false),
        (Vec::new(), false),
        (with(&fixed, opt(1, b"nosuch")), false),
        (with(&fixed, b"x".repeat(16)), false),
        (with(&fixed, opt(2, b"")), false),
        (with(&fixed, opt(7, b"")[..12].to_vec()), false),
        (with(&fixed, opt(7, b"ab")[..16].to_vec()), false),
        (
            with(&fixed, opt(7, &vec![0; 64 << 20])[..16].to_vec()),
            false,
        ),
        (with(&fixed, opt(1, &[b'a'; 5000])), false),
        (with(&0u32.to_be_bytes(), opt(7, b"")), false),
        (fixed.clone(), true),
    ]
}

/// Clients that fail the handshake are named on stderr in QSD's words,
/// one line each; one that leaves quietly (before its flags, or with
/// NBD_OPT_ABORT) is not; the handshake time limit ends a client as if
/// it had left at that point.
#[test]
fn failed_handshakes_are_reported_as_qsd_does() {
    let want = [
        "option negotiation failed: Bad length received",
        "option negotiation failed: Bad magic received",
        "option negotiation failed: Failed to read opts magic: Unexpected end-of-file before all data were read",
        "option negotiation failed: Failed to read option length: Unexpected end-of-file before all data were read",
        "option negotiation failed: Unexpected end-of-file before all data were read",
        "option negotiation failed: Unknown client flags 0x78787878 received",
        "option negotiation failed: Unsupported option 7 (go)",
        "option negotiation failed: export not found",
        "option negotiation failed: len (67108864) is larger than max len (33554432)",
    ];
    for which in Which::all() {
        let dir = TempDir::new();
        let mut a = monitor_args(&dir.s("q.sock"));
        a.extend(args(&[
            "--nbd-server",
            &format!(
                "addr.type=unix,addr.path={},handshake-max-seconds=1",
                dir.s("n.sock")
            ),
            "--blockdev",
            "null-co,node-name=n",
            "--export",
            "nbd,id=e,node-name=n",
        ]));
        let mut d = Daemon::spawn(which, &a);
        let lines = stderr_lines(&mut d);
        let _q = Qmp::ready(&dir.path("q.sock"));
        for (send, wait_for_hangup) in bad_handshakes() {
            let mut s = UnixStream::connect(dir.path("n.sock")).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut greeting = [0u8; 18];
            s.read_exact(&mut greeting).expect("greeting");
            let _ = s.write_all(&send);
            if wait_for_hangup {
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let got = loop {
            let mut got: Vec<String> = lines
                .lock()
                .expect("lines")
                .iter()
                .map(|l| l.split_once(": ").map_or(l.clone(), |(_, m)| m.to_string()))
                .collect();
            got.sort();
            if got.len() >= want.len() || std::time::Instant::now() > deadline {
                break got;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut want = want.to_vec();
        want.sort();
        assert_eq!(got, want, "{which:?}");
    }
}

/// A request the node fails is printed once per connection (with the
/// export, the operation, the offset and the error), the total when the
/// client leaves; the client stays connected and later requests work.
#[test]
fn failed_requests_are_reported_once_per_connection() {
    let dir = TempDir::new();
    let img = dir.path("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("image");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
        "--blockdev",
        &format!(
            "driver=blkdebug,node-name=b,image.driver=file,image.filename={},inject-error.0.event=read_aio,inject-error.0.errno=5",
            img.display()
        ),
        "--blockdev",
        "raw,node-name=r,file=b",
        "--export",
        "nbd,id=e,node-name=r,writable=on",
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let lines = stderr_lines(&mut d);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let url = format!("nbd+unix:///r?socket={}", dir.s("n.sock"));
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read 0 4k",
            "-c",
            "read 4k 4k",
            "-c",
            "read 8k 4k",
            "-c",
            "write -P 7 0 4k",
            &url,
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.matches("read failed: Input/output error").count(),
        3,
        "{out}"
    );
    assert!(out.contains("wrote 4096/4096 bytes at offset 0"), "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lines.lock().expect("lines").len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    q.send(b"{\"execute\":\"quit\"}\n");
    assert_eq!(d.wait_exit(10), Some(0));
    assert_eq!(
        lines.lock().expect("lines").join("\n"),
        "rsd: NBD export 'r': read at offset 0 failed: Input/output error\n\
         rsd: NBD export 'r': a client left after 3 failed requests"
    );
}

/// The daemon's stderr lines as they come, read by a thread of their own.
fn stderr_lines(d: &mut Daemon) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let err = d.child.stderr.take().expect("stderr");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let l2 = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            l2.lock().expect("lines").push(l);
        }
    });
    lines
}
