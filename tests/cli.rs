//! Command-line errors and help, compared with qemu-storage-daemon.
use crate::common::*;

/// Runs both daemons with the same arguments (expected to exit) and
/// compares exit code and stderr with the program name set aside.
fn same_exit(args_: &[&str]) -> (i32, String) {
    let mut seen: Option<(i32, String)> = None;
    for which in Which::all() {
        let out = run_to_end(which, args_, 5);
        let code = out.status.code().unwrap_or(-1);
        assert_ne!(code, 124, "{which:?} did not exit for {args_:?}");
        let err: String = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(|l| {
                let rest = l
                    .strip_prefix(which.bin())
                    .or_else(|| l.strip_prefix(which.prog()))
                    .map(|r| format!("PROG{r}"));
                rest.unwrap_or_else(|| l.to_string()) + "\n"
            })
            .collect();
        match &seen {
            None => seen = Some((code, err)),
            Some((c, e)) => {
                assert_eq!((code, &err), (*c, e), "{which:?} differs for {args_:?}");
            }
        }
    }
    seen.unwrap_or_default()
}

#[test]
fn option_scanning_errors() {
    assert_eq!(
        same_exit(&["--bogus"]),
        (1, "PROG: unrecognized option '--bogus'\n".into())
    );
    assert_eq!(
        same_exit(&["-x"]),
        (1, "PROG: invalid option -- 'x'\n".into())
    );
    assert_eq!(
        same_exit(&["--blockdev"]),
        (1, "PROG: option '--blockdev' requires an argument\n".into())
    );
    assert_eq!(
        same_exit(&["-T"]),
        (1, "PROG: option requires an argument -- 'T'\n".into())
    );
    assert_eq!(
        same_exit(&["extra"]),
        (1, "PROG: extra: Unexpected argument\n".into())
    );
    same_exit(&["--pidfile"]);
    same_exit(&["--chardev"]);
    same_exit(&["--pid", "/tmp/x", "--mon"]);
}

#[test]
fn chardev_monitor_object_errors() {
    let dir = TempDir::new();
    let sock = dir.s("q.sock");
    let chardev = format!("socket,path={sock},server=on,wait=off,id=c");
    let cases: Vec<Vec<String>> = vec![
        args(&["--chardev", "socket,path=x,server=on"]),
        args(&["--chardev", "null,id=a", "--chardev", "null,id=a"]),
        args(&["--chardev", "nosuch,id=x"]),
        args(&["--chardev", "socket,id=x"]),
        args(&[
            "--chardev",
            &format!(
                "socket,id=x,path={}/nonexist.sock,server=off",
                dir.0.display()
            ),
        ]),
        args(&["--chardev", "null,id=c,bogus=1"]),
        args(&["--chardev", "socket,id=x,host=127.0.0.1,server=on,wait=off"]),
        args(&[
            "--chardev",
            "socket,id=x,path=/tmp/a.sock,host=127.0.0.1,port=0,server=on,wait=off",
        ]),
        args(&["--chardev", "file,id=f"]),
        args(&["--chardev", "file,id=f,path=/nonexistent/dir/x"]),
        args(&["--chardev", "ringbuf,id=r,size=3"]),
        args(&["--chardev", "null"]),
        args(&["--chardev", "id=x"]),
        args(&["--chardev", "null,id=1bad"]),
        args(&[
            "--chardev",
            "socket,id=x,path=/nonexistent/dir/s.sock,server=on,wait=off",
        ]),
        args(&[
            "--chardev",
            &format!("socket,id=x,path={sock},server=on,wait=maybe"),
        ]),
        args(&[
            "--chardev",
            &chardev,
            "--monitor",
            "chardev=c,mode=readline",
        ]),
        args(&["--chardev", &chardev, "--monitor", "chardev=c,mode=bogus"]),
        args(&["--chardev", &chardev, "--monitor", "mode=control"]),
        args(&["--chardev", &chardev, "--monitor", "chardev=c,bogus=1"]),
        args(&[
            "--chardev",
            &chardev,
            "--monitor",
            r#"{"chardev":"c","bogus":1}"#,
        ]),
        args(&["--chardev", &chardev, "--monitor", r#"{"chardev":"c","#]),
        args(&[
            "--chardev",
            &chardev,
            "--monitor",
            "chardev=c",
            "--monitor",
            "chardev=c",
        ]),
        args(&["--chardev", &chardev, "--monitor", "nosuch"]),
        args(&["--chardev", &chardev, "--monitor", "chardev=c,pretty"]),
        args(&["--chardev", &chardev, "--monitor", "chardev=c,pretty=maybe"]),
        args(&["--monitor", "chardev=c"]),
        args(&["--object", "secret,id=s"]),
        args(&["--object", "secret,id=s,data=x,file=/etc/hostname"]),
        args(&["--object", "secret,id=s,file=/nonexistent"]),
        args(&["--object", "secret,id=s,data=!!,format=base64"]),
        args(&["--object", "secret,id=s,format=bogus,data=x"]),
        args(&[
            "--object",
            "secret,id=s2,data=abcd,keyid=nosuch,iv=aWlpaWlpaWlpaWlpaWlpaQ==",
        ]),
        args(&[
            "--object",
            "secret,id=s,data=short",
            "--object",
            "secret,id=s2,data=abcd,keyid=s,iv=aWlpaWlpaWlpaWlpaWlpaQ==",
        ]),
        args(&["--object", "iothread,id=io1,poll-max-ns=abc"]),
        args(&["--object", "iothread,id=io1,poll-max-ns=-1"]),
        args(&["--object", "iothread,id=io1", "--object", "iothread,id=io1"]),
        args(&["--object", "nosuch,id=x"]),
        args(&["--object", "secret,data=x"]),
        args(&["--object", "secret,id=1bad,data=x"]),
        args(&["--object", "secret,id=s,data=x,bogus=1"]),
        args(&["--object", r#"{"qom-type":"secret","id":"s","data":1}"#]),
        args(&["--object", r#"{"qom-type":"secret","id":"s""#]),
        args(&["--object", "id=s"]),
        args(&["--object", "iothread,id=io1,poll-max-ns=1k"]),
        args(&["--object", "secret,id=s,file=/etc"]),
    ];
    for c in &cases {
        let refs: Vec<&str> = c.iter().map(String::as_str).collect();
        let (code, err) = same_exit(&refs);
        assert_eq!(code, 1, "{c:?}: {err}");
        assert!(err.starts_with("PROG: "), "{c:?}: {err}");
    }
    let (_, e) = same_exit(&["--object", "secret,id=s"]);
    assert_eq!(
        e,
        "PROG: --object secret,id=s: Either 'file' or 'data' must be provided\n"
    );
}

#[test]
fn help_listings_match() {
    for a in [
        &["--object", "help"][..],
        &["--object", "secret,help"],
        &["--object", "iothread,help"],
        &["--object", "nosuch,help"],
        &["--chardev", "help"],
    ] {
        let mut outs = Vec::new();
        for which in Which::all() {
            let out = run_to_end(which, a, 5);
            assert_eq!(out.status.code(), Some(0), "{which:?} {a:?}");
            outs.push(String::from_utf8_lossy(&out.stdout).to_string());
        }
        assert!(!outs[0].is_empty());
        for o in &outs[1..] {
            assert_eq!(&outs[0], o, "{a:?}");
        }
    }
    let out = run_to_end(Which::Rsd, &["-V"], 5);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("rsd version ") && text.contains("10.0"),
        "{text}"
    );
    let out = run_to_end(Which::Rsd, &["--he"], 5);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--blockdev"));
}

#[test]
fn trace_patterns_select_trace_points() {
    let dir = TempDir::new();
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&["-T", "qmp_*", "-T", "enable=nosuch_point"]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    q.cmd(r#"{"execute":"query-version"}"#);
    q.send(br#"{"execute":"quit"}"#);
    let _ = q.line();
    assert_eq!(d.wait_exit(10), Some(0));
    let err = d.stderr_text();
    assert!(
        err.contains(
            "rsd: -T enable=nosuch_point: warning: trace event 'nosuch_point' does not exist"
        ),
        "{err}"
    );
    let commands: Vec<&str> = err.lines().filter(|l| l.contains("qmp_command")).collect();
    assert!(
        commands.iter().any(|l| l.contains("command=query-version")),
        "{err}"
    );
    assert!(commands.iter().any(|l| l.contains("command=quit")), "{err}");
    assert!(
        !err.contains("monitor_session_open"),
        "only matching points: {err}"
    );

    let out = run_to_end(Which::Rsd, &["-T", "help"], 5);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.lines().any(|l| l == "qmp_command"), "{listed}");
    // QSD only warns about a pattern that matches nothing, and keeps running.
    if std::path::Path::new(QSD).exists() {
        let out = run_to_end(Which::Qsd, &["-T", "enable=nosuch_point"], 1);
        assert_eq!(out.status.code(), Some(124));
        assert!(String::from_utf8_lossy(&out.stderr).contains(
            ": -T enable=nosuch_point: warning: trace event 'nosuch_point' does not exist"
        ));
    }
}

#[test]
fn block_export_and_nbd_options_are_validated_as_qsd_does() {
    for c in [
        &["--blockdev", "driver=nosuch,node-name=x"][..],
        &["--blockdev", "driver=null-co"],
        &["--blockdev", "null-co,node-name=n,size=abc"],
        &["--blockdev", "null-co,node-name=n,read-only=maybe"],
        &["--blockdev", "file,node-name=f"],
        &["--blockdev", "help"],
        &["--blockdev", "driver=file,a..b=1"],
        &[
            "--blockdev",
            r#"{"driver":"null-co","node-name":"n","size":"1"}"#,
        ],
        &[
            "--blockdev",
            "nbd,node-name=n,server.type=inet,server.host=h",
        ],
        &["--nbd-server", "addr.type=unix"],
        &[
            "--nbd-server",
            "addr.type=inet,addr.host=h,addr.port=1,max-connections=x",
        ],
        &["--nbd-server", "help"],
        &["--export", "type=nbd,id=e,node-name=nope"],
        &["--export", "type=nbd,id=e,node-name=n,writable=maybe"],
        &["--export", "type=bogus,id=e,node-name=n"],
        &["--export", "nbd"],
        &["--export", "fuse,id=e,node-name=n"],
    ] {
        let (code, err) = same_exit(c);
        assert_eq!(code, 1, "{c:?}");
        assert!(err.starts_with(&format!("PROG: {} ", c[0])), "{c:?}: {err}");
    }
    let (_, e) = same_exit(&["--blockdev", "driver=null-co"]);
    assert_eq!(
        e,
        "PROG: --blockdev driver=null-co: 'node-name' must be specified for the root node\n"
    );
}

/// A file chardev's input file must exist (rsd once ignored it), on the
/// command line and through chardev-add, with QSD's messages.
#[test]
fn file_chardev_input_must_exist_as_in_qsd() {
    let dir = TempDir::new();
    let out = dir.s("out");
    let (code, err) = same_exit(&[
        "--chardev",
        &format!("file,id=f,path={out},input-path=/nonexistent/in"),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.ends_with(": Could not open '/nonexistent/in': No such file or directory\n"),
        "{err}"
    );
    for which in Which::all() {
        let _d = Daemon::spawn(which, &monitor_args(&dir.s("q.sock")));
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let r = q.cmd(&format!(
            r#"{{"execute":"chardev-add","arguments":{{"id":"f1","backend":{{"type":"file","data":{{"in":"/nonexistent/in","out":"{out}"}}}}}}}}"#
        ));
        assert_eq!(
            r["error"]["desc"],
            "Failed to add chardev 'f1': Could not open '/nonexistent/in': No such file or directory",
            "{which:?}"
        );
        q.send(br#"{"execute":"quit"}"#);
    }
}

/// `-T help` lists exactly the trace points the sources emit (every
/// `target: "NAME"` in src/, actors/ and observability/), and `-T
/// file=F` writes the matching events to F.
#[test]
fn trace_help_lists_every_trace_point_and_file_gets_events() {
    fn scan(dir: &std::path::Path, found: &mut std::collections::BTreeSet<String>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                scan(&p, found);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).expect("source");
                for part in text.split("target: \"").skip(1) {
                    if let Some((name, _)) = part.split_once('"') {
                        found.insert(name.to_string());
                    }
                }
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut emitted = std::collections::BTreeSet::new();
    for d in ["src", "actors/src", "observability/src"] {
        scan(&root.join(d), &mut emitted);
    }
    let out = run_to_end(Which::Rsd, &["-T", "help"], 5);
    let listed: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(listed, emitted);

    let dir = TempDir::new();
    let trace = dir.s("trace.log");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&["-T", &format!("enable=nbd_*,file={trace}")]));
    a.extend(args(&[
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    for _ in 0..2 {
        let _ = std::os::unix::net::UnixStream::connect(dir.path("n.sock")).expect("connect");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let count = || {
        std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .matches("nbd_accept")
            .count()
    };
    while count() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(count(), 2);
    q.send(b"{\"execute\":\"quit\"}\n");
    assert_eq!(d.wait_exit(10), Some(0));
}
