//! Pidfile, --daemonize, quit and signals: exit codes and cleanup.
use std::time::Duration;

use crate::common::*;

fn start_with_pidfile(which: Which, dir: &TempDir) -> Daemon {
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&["--pidfile", &dir.s("p.pid")]));
    let d = Daemon::spawn(which, &a);
    assert!(
        wait_for_path(&dir.path("p.pid"), 10),
        "{which:?}: no pidfile"
    );
    d
}

#[test]
fn pidfile_lock_content_and_cleanup() {
    for which in Which::all() {
        let dir = TempDir::new();
        let mut first = start_with_pidfile(which, &dir);
        // The file exists a moment before its content does (both
        // daemons create, lock, then write it): wait for the line.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let content = loop {
            let c = std::fs::read_to_string(dir.path("p.pid")).expect("pidfile");
            if c.ends_with('\n') || std::time::Instant::now() > deadline {
                break c;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(content, format!("{}\n", first.child.id()));
        // The socket exists by the time the pidfile does.
        assert!(dir.path("q.sock").exists());
        let out = run_to_end(which, &["--pidfile", &dir.s("p.pid")], 5);
        assert_eq!(out.status.code(), Some(1), "{which:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("{}: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable\n", which.prog())
        );
        assert_eq!(
            std::fs::read_to_string(dir.path("p.pid")).expect("kept"),
            content
        );
        let mut q = Qmp::ready(&dir.path("q.sock"));
        assert_eq!(q.line(), "");
        drop(q);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        q.send(br#"{"execute": "quit", "id": "q"}"#);
        assert_eq!(q.line(), "{\"return\": {}, \"id\": \"q\"}\r\n");
        assert_eq!(q.line(), "", "connection closed after quit");
        assert_eq!(first.wait_exit(10), Some(0), "{which:?}");
        assert!(!dir.path("p.pid").exists(), "{which:?}: pidfile removed");
        assert!(!dir.path("q.sock").exists(), "{which:?}: socket removed");
    }
}

#[test]
fn stale_pidfile_is_taken_over() {
    let dir = TempDir::new();
    std::fs::write(dir.path("p.pid"), "99999\nstale garbage longer text\n").expect("stale");
    let d = Daemon::spawn(Which::Rsd, &args(&["--pidfile", &dir.s("p.pid")]));
    for _ in 0..500 {
        if std::fs::read_to_string(dir.path("p.pid")).unwrap_or_default()
            == format!("{}\n", d.child.id())
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("stale pidfile was not rewritten");
}

#[test]
fn pidfile_in_missing_directory() {
    for which in Which::all() {
        let out = run_to_end(which, &["--pidfile", "/nonexistent/dir/p.pid"], 5);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("{}: cannot create PID file: Could not create '/nonexistent/dir/p.pid': No such file or directory\n", which.prog())
        );
    }
}

#[test]
fn each_signal_exits_zero_and_cleans_up() {
    for which in Which::all() {
        for sig in [2, 1, 15] {
            let dir = TempDir::new();
            let mut d = start_with_pidfile(which, &dir);
            let _q = Qmp::ready(&dir.path("q.sock"));
            d.signal(sig);
            assert_eq!(d.wait_exit(10), Some(0), "{which:?} signal {sig}");
            assert!(
                !dir.path("p.pid").exists(),
                "{which:?} signal {sig}: pidfile left"
            );
            assert!(
                !dir.path("q.sock").exists(),
                "{which:?} signal {sig}: socket left"
            );
        }
    }
}

#[test]
fn daemonize_success_and_failure() {
    for which in Which::all() {
        let dir = TempDir::new();
        let mut a = vec![
            "--daemonize".to_string(),
            "--pidfile".into(),
            dir.s("p.pid"),
        ];
        a.extend(monitor_args(&dir.s("q.sock")));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = run_to_end(which, &refs, 10);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{which:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Start-up finished before the parent exited.
        assert!(dir.path("p.pid").exists() && dir.path("q.sock").exists());
        let pid: i32 = std::fs::read_to_string(dir.path("p.pid"))
            .expect("pid")
            .trim()
            .parse()
            .expect("number");
        let mut q = Qmp::ready(&dir.path("q.sock"));
        q.send(br#"{"execute": "quit"}"#);
        assert_eq!(q.line(), "{\"return\": {}}\r\n");
        for _ in 0..500 {
            if !dir.path("p.pid").exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !dir.path("p.pid").exists(),
            "{which:?} pid {pid}: pidfile left"
        );

        let out = run_to_end(
            which,
            &[
                "--daemonize",
                "--pidfile",
                &dir.s("f.pid"),
                "--object",
                "nosuch,id=x",
            ],
            10,
        );
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "{}: --object nosuch,id=x: Parameter 'qom-type' does not accept value 'nosuch'\n",
                which.prog()
            )
        );
        assert!(!dir.path("f.pid").exists());
        let out = run_to_end(which, &["--daemonize", "--chardev", "stdio,id=s"], 10);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr)
            .ends_with(": --chardev stdio,id=s: cannot use stdio with -daemonize\n"));
    }
}

#[test]
fn monitors_greet_only_after_the_command_line_is_applied() {
    // A QMP client that connects as soon as the socket appears, while
    // the rest of the command line is still being applied, sees every
    // node in its first query (the greeting waits, as in QSD).
    for which in Which::all() {
        let dir = TempDir::new();
        let mut a = monitor_args(&dir.s("q.sock"));
        for i in 0..300 {
            a.extend(args(&[
                "--blockdev",
                &format!("driver=null-co,node-name=n{i}"),
            ]));
        }
        let _d = Daemon::spawn(which, &a);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let nodes = q.cmd(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#);
        let n = nodes["return"].as_array().map_or(0, Vec::len);
        assert_eq!(n, 300, "{which:?}");
    }
}
