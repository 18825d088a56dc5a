//! Supervision: a failed child actor is restarted while QMP keeps
//! answering; two monitors see the same event; the command sets agree.
use std::collections::BTreeSet;

use crate::common::*;

fn two_monitors(dir: &TempDir) -> Daemon {
    Daemon::spawn_env(
        Which::Rsd,
        &two_monitor_args(dir),
        &[("RSD_TEST_HOOKS", "1")],
    )
}

/// Monitors on c1 (a.sock) and c2 (b.sock, pretty=off).
fn two_monitor_args(dir: &TempDir) -> Vec<String> {
    args(&[
        "--chardev",
        &format!("socket,path={},server=on,wait=off,id=c1", dir.s("a.sock")),
        "--monitor",
        "chardev=c1",
        "--chardev",
        &format!("socket,path={},server=on,wait=off,id=c2", dir.s("b.sock")),
        "--monitor",
        "chardev=c2,pretty=off",
    ])
}

#[test]
fn crashed_monitor_is_restarted_while_qmp_keeps_answering() {
    let dir = TempDir::new();
    let mut d = two_monitors(&dir);
    let mut a = Qmp::ready(&dir.path("a.sock"));
    let mut b = Qmp::ready(&dir.path("b.sock"));
    assert_eq!(
        b.cmd(r#"{"execute":"query-version"}"#)["return"]["qemu"]["major"],
        10
    );
    let r = a.cmd(r#"{"execute":"x-rsd-test-crash","arguments":{"id":"monitor/c2"}}"#);
    assert_eq!(r, serde_json::json!({"return": {}}));
    // b's session died with its actor; a is untouched.
    assert_eq!(b.line(), "", "the crashed monitor's client is disconnected");
    assert_eq!(
        a.cmd(r#"{"execute":"query-version"}"#)["return"]["qemu"]["major"],
        10
    );
    // The restarted monitor serves new clients on the same chardev.
    let mut b2 = Qmp::ready(&dir.path("b.sock"));
    let r = b2.cmd(r#"{"execute":"query-chardev"}"#);
    let labels: BTreeSet<String> = r["return"]
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["label"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(labels, BTreeSet::from(["c1".to_string(), "c2".to_string()]));
    // A crashed chardev comes back too and still serves its monitor.
    drop(b2);
    let r = a.cmd(r#"{"execute":"x-rsd-test-crash","arguments":{"id":"chardev/c2"}}"#);
    assert_eq!(r, serde_json::json!({"return": {}}));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut b3 = Qmp::ready(&dir.path("b.sock"));
    assert_eq!(
        b3.cmd(r#"{"execute":"query-version"}"#)["return"]["qemu"]["minor"],
        0
    );
    let r = a.cmd(r#"{"execute":"x-rsd-test-crash","arguments":{"id":"nope"}}"#);
    assert_eq!(r["error"]["desc"], "no actor named 'nope'");
    // Each restart was said once on stderr, in rsd's words.
    a.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(10), Some(0));
    let err = d.stderr_text();
    for who in ["monitor", "chardev"] {
        let said =
            format!("rsd: {who}/c2 failed and was restarted (test hook: {who} crash requested)");
        assert_eq!(err.matches(&said).count(), 1, "{who}: {err}");
    }
    // The monitor on the crashed chardev lost its session and was
    // restarted too; nothing else was said.
    assert!(
        err.lines()
            .all(|l| l.starts_with("rsd: ") && l.contains(" failed and was restarted (")),
        "{err}"
    );
}

#[test]
fn every_negotiated_monitor_gets_the_same_event() {
    let dir = TempDir::new();
    let _d = two_monitors(&dir);
    let mut a = Qmp::ready(&dir.path("a.sock"));
    let mut b = Qmp::ready(&dir.path("b.sock"));
    a.send(br#"{"execute":"x-rsd-test-event","arguments":{"message":"hello"},"id":1}"#);
    // The event is queued before the reply of the command that raised it.
    let ev_a = a.line();
    assert_eq!(a.line(), "{\"return\": {}, \"id\": 1}\r\n");
    let ev_b = b.line();
    assert_eq!(
        ev_a, ev_b,
        "identical event (same timestamp) on both monitors"
    );
    let v: serde_json::Value = serde_json::from_str(&ev_a).expect("event json");
    assert_eq!(v["event"], "X_RSD_TEST_EVENT");
    assert_eq!(v["data"], serde_json::json!({"message": "hello"}));
    assert!(v["timestamp"]["seconds"].as_i64().unwrap_or(0) > 1_600_000_000);
    assert!(ev_a.starts_with("{\"timestamp\": {\"seconds\": "), "{ev_a}");
}

#[test]
fn a_second_client_waits_for_the_first() {
    for which in Which::all() {
        let dir = TempDir::new();
        let _d = Daemon::spawn(which, &monitor_args(&dir.s("q.sock")));
        let mut first = Qmp::ready(&dir.path("q.sock"));
        let mut second = Qmp::connect(&dir.path("q.sock"));
        assert!(
            !second.readable_within(300),
            "{which:?}: second client greeted too early"
        );
        first.send(br#"{"execute":"query-version"}"#);
        assert!(first.line().starts_with("{\"return\""));
        drop(first);
        let g = second.line();
        assert!(g.starts_with("{\"QMP\""), "{which:?}: {g}");
        second.send(br#"{"execute":"query-version"}"#);
        assert!(second.line().contains("Expecting capabilities negotiation"));
    }
}

#[test]
fn command_sets_agree() {
    let dir = TempDir::new();
    let _d = two_monitors(&dir);
    let mut q = Qmp::ready(&dir.path("a.sock"));
    let listed: BTreeSet<String> = q.cmd(r#"{"execute":"query-commands"}"#)["return"]
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_string())
        .collect();
    let schema = q.cmd(r#"{"execute":"query-qmp-schema"}"#);
    let in_schema: BTreeSet<String> = schema["return"]
        .as_array()
        .expect("schema")
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(listed, in_schema);
    assert!(listed.contains("qom-get") && listed.contains("x-rsd-test-crash"));
    // Every listed command is dispatched (never "has not been found").
    for name in &listed {
        if name == "quit" || name == "x-rsd-test-crash" {
            continue;
        }
        let r = q.cmd(&format!(
            r#"{{"execute":"{name}","arguments":{{"zzz-probe":1}}}}"#
        ));
        assert_eq!(r["error"]["class"], "GenericError", "{name}: {r}");
    }
    let r = q.cmd(r#"{"execute":"query-block-jobs"}"#);
    assert_eq!(r["return"], serde_json::json!([]));
    let r = q.cmd(r#"{"execute":"x-no-such-command"}"#);
    assert_eq!(r["error"]["class"], "CommandNotFound");
}

/// Crashes `id` through monitor `q` once its actor is (back) in place.
fn crash_when_up(q: &mut Qmp, id: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = q.cmd(&format!(
            r#"{{"execute":"x-rsd-test-crash","arguments":{{"id":"{id}"}}}}"#
        ));
        if r.get("return").is_some() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} never came back: {r}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The first client after a monitor restart is served (it was once
/// handed to the monitor that had died).
#[test]
fn the_first_client_after_a_monitor_restart_is_served() {
    let dir = TempDir::new();
    let _d = two_monitors(&dir);
    let mut a = Qmp::ready(&dir.path("a.sock"));
    crash_when_up(&mut a, "monitor/c2");
    // Back once its chardev has a frontend again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = a.cmd(r#"{"execute":"query-chardev"}"#);
        let open = r["return"]
            .as_array()
            .expect("list")
            .iter()
            .any(|c| c["label"] == "c2" && c["frontend-open"] == true);
        if open {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "monitor/c2 never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut b = Qmp::ready(&dir.path("b.sock"));
    assert_eq!(
        b.cmd(r#"{"execute":"query-version"}"#)["return"]["qemu"]["major"],
        10
    );
}

/// A monitor that fails more often than its restart policy allows (5
/// restarts in 10 s) stops the daemon cleanly: the reason on stderr and
/// in an event to the other monitor, exit code 1, sockets and pidfile
/// removed. A node actor, whose state survives its failures, is
/// restarted however often it fails.
#[test]
fn a_monitor_that_keeps_failing_stops_the_daemon_cleanly() {
    let dir = TempDir::new();
    qemu_img_create(&dir.path("img"), "1M");
    let mut a = args(&[
        "--blockdev",
        &format!("driver=file,node-name=n,filename={}", dir.s("img")),
        "--pidfile",
        &dir.s("pid"),
    ]);
    a.extend(two_monitor_args(&dir));
    let mut d = Daemon::spawn_env(Which::Rsd, &a, &[("RSD_TEST_HOOKS", "1")]);
    let mut q = Qmp::ready(&dir.path("a.sock"));
    for _ in 0..8 {
        crash_when_up(&mut q, "node/n");
    }
    let resize = r#"{"execute":"block_resize","arguments":{"node-name":"n","size":2097152}}"#;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = q.cmd(resize);
        if r.get("return").is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "node actor gone: {r}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Crash monitor/c2 whenever it is up, until the daemon gives up on
    // it and closes this monitor too; keep every event seen meanwhile.
    let mut event = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    'daemon: while std::time::Instant::now() < deadline {
        use std::io::Write;
        let crash = br#"{"execute":"x-rsd-test-crash","arguments":{"id":"monitor/c2"}}"#;
        let sent = q.stream.write_all(crash).is_ok();
        loop {
            let l = q.line();
            if l.is_empty() {
                break 'daemon;
            }
            let v: serde_json::Value = serde_json::from_str(&l).expect("json");
            if v["event"] == "X_RSD_COMPONENT_FAILED" {
                event = v;
            } else if v.get("event").is_none() && sent {
                if v.get("error").is_some() {
                    // Not back yet.
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                break;
            }
        }
    }
    assert_eq!(event["data"]["component"], "monitor/c2", "{event}");
    assert_eq!(d.wait_exit(10), Some(1));
    let err = d.stderr_text();
    assert!(
        err.contains("rsd: monitor/c2 kept failing and could not be restarted"),
        "{err}"
    );
    for f in ["a.sock", "b.sock", "pid"] {
        assert!(!dir.path(f).exists(), "{f} left behind");
    }
}

/// The control actor failing stops the daemon with a clear message
/// instead of leaving one that answers every command with an error.
#[test]
fn a_failed_control_actor_stops_the_daemon() {
    let dir = TempDir::new();
    let mut d = two_monitors(&dir);
    let mut a = Qmp::ready(&dir.path("a.sock"));
    a.send(br#"{"execute":"x-rsd-test-crash","arguments":{"id":"control"}}"#);
    assert_eq!(d.wait_exit(10), Some(1));
    assert!(
        d.stderr_text()
            .contains("rsd: the control actor failed; stopping"),
        "stderr"
    );
}

/// The NBD server actor owns its accept loop: after it fails it is
/// restarted on the same listening socket and serves new clients.
#[test]
fn a_failed_nbd_server_serves_again_on_the_same_socket() {
    let dir = TempDir::new();
    qemu_img_create(&dir.path("img"), "1M");
    let mut a = two_monitor_args(&dir);
    a.extend(args(&[
        "--blockdev",
        &format!("driver=file,node-name=n,filename={}", dir.s("img")),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
        "--export",
        "type=nbd,id=e,node-name=n,writable=on",
    ]));
    let _d = Daemon::spawn_env(Which::Rsd, &a, &[("RSD_TEST_HOOKS", "1")]);
    let mut q = Qmp::ready(&dir.path("a.sock"));
    let url = format!("nbd+unix:///n?socket={}", dir.s("n.sock"));
    let io = |cmd: &str| ok(&run("qemu-io", &["-f", "raw", "-c", cmd, &url]));
    assert!(!io("write -P 0x33 0 64k").contains("failed"));
    crash_when_up(&mut q, "nbd-server");
    // Served again (a client may arrive before the restart: it waits in
    // the backlog, since the socket stays open).
    let out = io("read -P 0x33 0 64k");
    assert!(!out.contains("failed"), "{out}");
}

/// An export's actor that fails is started again on the same export:
/// clients are still served, and deleting the export afterwards goes
/// through the new actor (the export is gone, its node free).
#[test]
fn a_failed_export_actor_keeps_its_export() {
    let dir = TempDir::new();
    qemu_img_create(&dir.path("img"), "1M");
    let mut a = two_monitor_args(&dir);
    a.extend(args(&[
        "--blockdev",
        &format!("driver=file,node-name=n,filename={}", dir.s("img")),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
        "--export",
        "type=nbd,id=e,node-name=n,writable=on",
    ]));
    let _d = Daemon::spawn_env(Which::Rsd, &a, &[("RSD_TEST_HOOKS", "1")]);
    let mut q = Qmp::ready(&dir.path("a.sock"));
    let url = format!("nbd+unix:///n?socket={}", dir.s("n.sock"));
    let io = |cmd: &str| ok(&run("qemu-io", &["-f", "raw", "-c", cmd, &url]));
    assert!(!io("write -P 0x44 0 64k").contains("failed"));
    crash_when_up(&mut q, "export/e");
    crash_when_up(&mut q, "export/e");
    let out = io("read -P 0x44 0 64k");
    assert!(!out.contains("failed"), "{out}");
    let r = q.cmd(r#"{"execute":"query-block-exports"}"#);
    assert_eq!(r["return"][0]["id"], "e", "{r}");
    let r = q.cmd(r#"{"execute":"block-export-del","arguments":{"id":"e"}}"#);
    assert!(r.get("return").is_some(), "{r}");
    let r = q.cmd(r#"{"execute":"query-block-exports"}"#);
    assert_eq!(r["return"], serde_json::json!([]), "{r}");
    // The node is free again.
    let r = q.cmd(r#"{"execute":"blockdev-del","arguments":{"node-name":"n"}}"#);
    assert!(r.get("return").is_some(), "{r}");
}
