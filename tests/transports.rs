//! QMP over every transport: TCP, an inherited listening socket (fd=N),
//! stdio, and a wait=on server that holds start-up for its first client.
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn qmp_over_tcp() {
    for which in Which::all() {
        let port = free_port();
        let a = args(&[
            "--chardev",
            &format!("socket,host=127.0.0.1,port={port},server=on,wait=off,id=t"),
            "--monitor",
            "chardev=t",
        ]);
        let _d = Daemon::spawn(which, &a);
        let mut s = None;
        for _ in 0..500 {
            if let Ok(c) = TcpStream::connect(("127.0.0.1", port)) {
                s = Some(c);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut s = s.expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut line = String::new();
        r.read_line(&mut line).expect("greeting");
        assert!(
            line.starts_with("{\"QMP\": {\"version\""),
            "{which:?}: {line}"
        );
        s.write_all(br#"{"execute":"qmp_capabilities"}{"execute":"query-chardev"}"#)
            .expect("send");
        line.clear();
        r.read_line(&mut line).expect("caps");
        assert_eq!(line, "{\"return\": {}}\r\n");
        line.clear();
        r.read_line(&mut line).expect("chardev");
        let me = s.local_addr().expect("local addr");
        assert_eq!(
            line,
            format!("{{\"return\": [{{\"frontend-open\": true, \"filename\": \"tcp:127.0.0.1:{port},server=on <-> 127.0.0.1:{}\", \"label\": \"t\"}}]}}\r\n", me.port()),
            "{which:?}"
        );
    }
}

#[test]
fn qmp_over_inherited_listening_socket() {
    for which in Which::all() {
        let dir = TempDir::new();
        let listener = std::os::unix::net::UnixListener::bind(dir.path("fd.sock")).expect("bind");
        let fd = listener.as_raw_fd();
        // Let the child inherit it.
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .expect("clear cloexec");
        let mut mon = monitor_args(&dir.s("q.sock"));
        mon.extend(args(&[
            "--chardev",
            &format!("socket,id=fdc,fd={fd},server=on,wait=off"),
            "--monitor",
            "chardev=fdc",
            "--pidfile",
            &dir.s("p.pid"),
        ]));
        let _d = Daemon::spawn(which, &mon);
        // The pidfile marks the end of start-up (all options applied).
        assert!(wait_for_path(&dir.path("p.pid"), 10));
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let r = q.cmd(r#"{"execute":"query-chardev"}"#);
        let fdc = r["return"]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["label"] == "fdc").cloned())
            .unwrap_or_else(|| panic!("{which:?}: fdc not listed: {r}"));
        assert_eq!(
            fdc["filename"],
            format!("disconnected:unix:{},server=on", dir.s("fd.sock"))
        );
        drop(listener);
        let mut f = Qmp::ready(&dir.path("fd.sock"));
        assert_eq!(
            f.cmd(r#"{"execute":"query-version"}"#)["return"]["qemu"]["major"],
            10
        );
    }
}

#[test]
fn qmp_over_stdio() {
    for which in Which::all() {
        let mut child = Command::new(which.bin())
            .args(["--chardev", "stdio,id=s", "--monitor", "chardev=s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut input = child.stdin.take().expect("stdin");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("greeting");
        assert!(line.starts_with("{\"QMP\""), "{which:?}: {line}");
        input
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-chardev\"}\n{\"execute\":\"quit\"}\n")
            .expect("send");
        let mut lines = Vec::new();
        for _ in 0..3 {
            line.clear();
            out.read_line(&mut line).expect("reply");
            lines.push(line.clone());
        }
        assert_eq!(lines[0], "{\"return\": {}}\r\n");
        assert_eq!(
            lines[1],
            "{\"return\": [{\"frontend-open\": true, \"filename\": \"stdio\", \"label\": \"s\"}]}\r\n",
            "{which:?}"
        );
        assert_eq!(lines[2], "{\"return\": {}}\r\n");
        assert_eq!(child.wait().expect("exit").code(), Some(0), "{which:?}");
    }
}

#[test]
fn wait_on_holds_startup_until_a_client_connects() {
    for which in Which::all() {
        let dir = TempDir::new();
        let a = args(&[
            "--chardev",
            &format!("socket,path={},server=on,id=c", dir.s("w.sock")),
            "--monitor",
            "chardev=c",
            "--pidfile",
            &dir.s("p.pid"),
        ]);
        let mut d = Daemon::spawn(which, &a);
        assert!(wait_for_path(&dir.path("w.sock"), 10));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !dir.path("p.pid").exists(),
            "{which:?}: pidfile before the first client"
        );
        let mut q = Qmp::connect(&dir.path("w.sock"));
        assert!(q.line().starts_with("{\"QMP\""));
        assert!(
            wait_for_path(&dir.path("p.pid"), 10),
            "{which:?}: pidfile after connect"
        );
        q.send(br#"{"execute":"qmp_capabilities"}{"execute":"quit"}"#);
        assert_eq!(q.line(), "{\"return\": {}}\r\n");
        assert_eq!(q.line(), "{\"return\": {}}\r\n");
        assert_eq!(d.wait_exit(10), Some(0));
        let err = d.stderr_text();
        assert_eq!(
            err.strip_prefix(which.prog()).unwrap_or(&err),
            format!(
                ": --chardev socket,path={},server=on,id=c: info: QEMU waiting for connection on: disconnected:unix:{},server=on\n",
                dir.s("w.sock"),
                dir.s("w.sock")
            )
        );
    }
}

/// A listening UNIX socket the child inherits (cloexec cleared).
fn inheritable_listener(path: &std::path::Path) -> std::os::unix::net::UnixListener {
    let l = std::os::unix::net::UnixListener::bind(path).expect("bind");
    nix::fcntl::fcntl(
        l.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .expect("clear cloexec");
    l
}

/// The QSD manual's launcher binds the sockets itself and passes their
/// descriptors. QSD unlinks the paths of a monitor chardev's and a
/// vhost-user-blk export's sockets when it closes them, so the launcher
/// can run again; so must rsd.
#[test]
fn fd_passing_launcher_runs_twice() {
    for which in Which::all() {
        let dir = TempDir::new();
        for round in 0..2 {
            let mon = inheritable_listener(&dir.path("qmp.sock"));
            let vu = inheritable_listener(&dir.path("vu.sock"));
            let a = args(&[
                "--chardev",
                &format!("socket,id=m,fd={},server=on,wait=off", mon.as_raw_fd()),
                "--monitor",
                "chardev=m",
                "--blockdev",
                "null-co,node-name=n",
                "--export",
                &format!(
                    "type=vhost-user-blk,id=e,node-name=n,addr.type=fd,addr.str={}",
                    vu.as_raw_fd()
                ),
            ]);
            let mut d = Daemon::spawn(which, &a);
            drop((mon, vu));
            let mut q = Qmp::ready(&dir.path("qmp.sock"));
            let r = q.cmd(r#"{"execute":"query-block-exports"}"#);
            assert_eq!(r["return"][0]["id"], "e", "{which:?} round {round}: {r}");
            q.send(b"{\"execute\":\"quit\"}\n");
            assert_eq!(d.wait_exit(10), Some(0), "{which:?} round {round}");
            for s in ["qmp.sock", "vu.sock"] {
                assert!(
                    !dir.path(s).exists(),
                    "{which:?} round {round}: {s} left behind"
                );
            }
        }
    }
}
