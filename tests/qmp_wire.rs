//! QMP wire behaviour, byte for byte against qemu-storage-daemon.
use crate::common::*;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

const SENTINEL: &[u8] = br#"{"execute": "query-version", "id": "SENTINEL"}"#;

/// Runs `steps` on a fresh daemon; after each step sends a sentinel
/// request and collects every line up to its reply. Returns the
/// normalized lines per step (sentinel reply included).
fn transcript(which: Which, negotiate: bool, gap_ms: u64, steps: &[&[u8]]) -> Vec<Vec<String>> {
    let dir = TempDir::new();
    let sock = dir.s("qmp.sock");
    let _d = Daemon::spawn(which, &monitor_args(&sock));
    let mut q = Qmp::connect(&dir.path("qmp.sock"));
    let greeting = q.line();
    let mut out = vec![vec![mask_package(&greeting)]];
    if negotiate {
        q.send(br#"{"execute": "qmp_capabilities"}"#);
        out.push(vec![q.line()]);
    }
    for step in steps {
        q.send(step);
        // QSD's lexer recovery after a broken token depends on read
        // boundaries; a gap keeps the step and the sentinel apart.
        std::thread::sleep(std::time::Duration::from_millis(gap_ms));
        q.send(SENTINEL);
        let mut lines = Vec::new();
        loop {
            let l = q.line();
            assert!(
                !l.is_empty(),
                "{which:?}: EOF after {:?}",
                String::from_utf8_lossy(step)
            );
            let done = l.contains("SENTINEL");
            lines.push(mask_package(&l.replace(&dir.0.display().to_string(), "$D")));
            if done {
                break;
            }
        }
        out.push(lines);
    }
    q.send(br#"{"execute": "quit"}"#);
    out
}

/// Replaces the free-form `package` string, keeping every other byte.
fn mask_package(line: &str) -> String {
    const KEY: &str = "\"package\": \"";
    match line.find(KEY) {
        Some(start) => {
            let from = start + KEY.len();
            let end = line[from..]
                .find('"')
                .map(|e| from + e)
                .unwrap_or(line.len());
            format!("{}PKG{}", &line[..from], &line[end..])
        }
        None => line.to_string(),
    }
}

/// The same scenario on rsd and QSD must give the same bytes.
fn compare(negotiate: bool, steps: &[&[u8]]) -> Vec<Vec<String>> {
    compare_gap(negotiate, 0, steps)
}

fn compare_gap(negotiate: bool, gap_ms: u64, steps: &[&[u8]]) -> Vec<Vec<String>> {
    let mut results = Vec::new();
    for which in Which::all() {
        results.push((which, transcript(which, negotiate, gap_ms, steps)));
    }
    let (_, first) = &results[0];
    for (which, t) in &results[1..] {
        for (i, (a, b)) in first.iter().zip(t.iter()).enumerate() {
            assert_eq!(a, b, "step {i} differs between rsd and {which:?}");
        }
        assert_eq!(first.len(), t.len());
    }
    results.swap_remove(0).1
}

fn err(id: Option<&str>, class: &str, desc: &str) -> String {
    match id {
        Some(id) => format!(
            "{{\"id\": {id}, \"error\": {{\"class\": \"{class}\", \"desc\": \"{desc}\"}}}}\r\n"
        ),
        None => format!("{{\"error\": {{\"class\": \"{class}\", \"desc\": \"{desc}\"}}}}\r\n"),
    }
}

#[test]
fn greeting_and_negotiation_mode() {
    let t = compare(
        false,
        &[
            br#"{"execute": "query-version", "id": 1}"#,
            br#"{"execute": "no-such-cmd"}"#,
            br#"{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}, "id": "c1"}"#,
            br#"{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}, "id": "c2"}"#,
            br#"{"execute": "qmp_capabilities", "arguments": {"foo": 1}, "id": "c3"}"#,
            br#"{"exec-oob": "query-version", "id": "o"}"#,
            br#"{"execute": "qmp_capabilities", "id": "caps"}"#,
            br#"{"execute": "qmp_capabilities", "id": "again"}"#,
        ],
    );
    assert_eq!(
        t[0][0],
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"PKG\"}, \"capabilities\": [\"oob\"]}}\r\n"
    );
    let greeting: serde_json::Value = serde_json::from_str(&t[0][0]).expect("greeting");
    assert_eq!(greeting["QMP"]["capabilities"], serde_json::json!(["oob"]));
    assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], 10);
    let neg = "Expecting capabilities negotiation with 'qmp_capabilities'";
    assert_eq!(t[1][0], err(Some("1"), "CommandNotFound", neg));
    assert_eq!(t[2][0], err(None, "CommandNotFound", neg));
    assert_eq!(
        t[3][0],
        err(
            Some("\"c1\""),
            "GenericError",
            "Parameter 'null' does not accept value 'bogus'"
        )
    );
    assert_eq!(t[7][0], "{\"return\": {}, \"id\": \"caps\"}\r\n");
    assert_eq!(
        t[8][0],
        err(
            Some("\"again\""),
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
}

#[test]
fn request_validation_table() {
    let t = compare(
        true,
        &[
            br#"{"execute": "no-such-cmd", "id": 7}"#,
            br#"{"arguments": {}, "id": 8}"#,
            b"{}",
            br#"{"execute": 1}"#,
            br#"{"execute": "query-version", "foo": 1}"#,
            br#"{"execute": "query-version", "arguments": [1]}"#,
            br#"{"execute": "query-version", "arguments": null}"#,
            br#"{"execute": "query-version", "arguments": {"x": 1}}"#,
            br#"{"execute": "object-del", "id": "m"}"#,
            br#"{"execute": "object-del", "arguments": {"id": 1}}"#,
            br#"{"exec-oob": "query-version", "id": "o"}"#,
            br#"{"execute": "query-version", "exec-oob": "x", "id": "o2"}"#,
            b"[1, 2]",
            br#""query-version""#,
            b"123\n",
            br#"{"execute": }"#,
            b"}",
            br#"{"execute": "query-version",}"#,
            br#"{"execute": "query-version", "id": 1, "id": 2}"#,
            b"\xff\xfe{\"execute\": \"query-version\", \"id\": \"after-ff\"}",
            b"\x00{\"execute\": \"query-version\", \"id\": \"after-nul\"}",
            b"{'execute': 'query-version', 'id': 'single'}",
            br#"{"execute": "chardev-add", "arguments": {"id": "x", "backend": {"type": "socket", "data": {"addr": {"type": "inet", "data": {"host": "h", "port": 1}}}}}}"#,
            br#"{"execute": "chardev-add", "arguments": {"id": "x", "backend": {"type": "null", "data": {}}, "a": 1, "b": 2, "zz": 3}}"#,
        ],
    );
    assert_eq!(
        t[2][0],
        err(
            Some("7"),
            "CommandNotFound",
            "The command no-such-cmd has not been found"
        )
    );
    assert_eq!(
        t[4][0],
        err(None, "GenericError", "QMP input lacks member 'execute'")
    );
    assert_eq!(
        t[10][0],
        err(Some("\"m\""), "GenericError", "Parameter 'id' is missing")
    );
    assert_eq!(
        t[16][0],
        err(None, "GenericError", "QMP input must be a JSON object")
    );
    assert_eq!(
        t[20][0],
        err(None, "GenericError", "JSON parse error, duplicate key")
    );
    assert_eq!(t[21].len(), 4, "two stray bytes, the command, the sentinel");
    assert!(
        t[23][0].starts_with("{\"return\": {\"qemu\""),
        "single quotes accepted: {}",
        t[23][0]
    );
    assert_eq!(
        t[25][0],
        err(None, "GenericError", "Parameter 'b' is unexpected")
    );
}

#[test]
fn id_echo_of_every_json_type_and_numbers() {
    let t = compare(
        true,
        &[
            br#"{"execute": "query-version", "id": 1.0}"#,
            br#"{"execute": "query-version", "id": 1e3}"#,
            br#"{"execute": "query-version", "id": 0.1}"#,
            br#"{"execute": "query-version", "id": -0.0}"#,
            br#"{"execute": "query-version", "id": 18446744073709551615}"#,
            br#"{"execute": "query-version", "id": 18446744073709551616}"#,
            br#"{"execute": "query-version", "id": -9223372036854775808}"#,
            br#"{"execute": "query-version", "id": null}"#,
            br#"{"execute": "query-version", "id": true}"#,
            br#"{"execute": "query-version", "id": [1, "a", {"b": []}]}"#,
            br#"{"execute": "query-version", "id": {"z": 1, "a": {}}}"#,
            b"{\"execute\": \"query-version\", \"id\": \"a/b\\\\c\\\"d\\u00e9\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\\t\\u0001\\u007f\"}",
        ],
    );
    let ids: Vec<String> = t[2..]
        .iter()
        .map(|s| {
            let v: serde_json::Value = serde_json::from_str(&s[0]).expect("json");
            v["id"].to_string()
        })
        .collect();
    assert_eq!(ids[0], "1", "1.0 is echoed as 1");
    assert!(
        t[4][0].contains("\"id\": 0.10000000000000001"),
        "{}",
        t[4][0]
    );
    assert!(t[5][0].contains("\"id\": -0}"), "{}", t[5][0]);
    assert!(t[7][0].contains("1.8446744073709552e+19"), "{}", t[7][0]);
    assert!(
        t[13][0].contains(r#""a/b\\c\"d\u00E9\u00E9\u20AC\uD83D\uDE00\t\u0001\u007F""#),
        "{}",
        t[13][0]
    );
}

#[test]
fn pipelined_split_and_nested_input() {
    // Several requests in one write, one request byte by byte.
    for which in Which::all() {
        let dir = TempDir::new();
        let _d = Daemon::spawn(which, &monitor_args(&dir.s("q.sock")));
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let mut burst = Vec::new();
        for i in 0..12 {
            burst.extend_from_slice(
                format!(r#"{{"execute": "query-version", "id": {i}}}"#).as_bytes(),
            );
        }
        q.send(&burst);
        for i in 0..12 {
            let l = q.line();
            assert!(
                l.ends_with(&format!(", \"id\": {i}}}\r\n")),
                "{which:?} reply {i}: {l}"
            );
        }
        for b in br#"{"execute": "query-version", "id": "split"}"# {
            q.send(&[*b]);
        }
        assert!(q.line().ends_with("\"id\": \"split\"}\r\n"));
    }
    let deep_ok = format!(
        r#"{{"execute": "query-version", "id": {}{}}}"#,
        "[".repeat(1000),
        "]".repeat(1000)
    );
    let too_deep = format!("{}{}", "[".repeat(1100), "]".repeat(1100));
    let deep_any = format!(
        r#"{{"execute": "qom-set", "arguments": {{"path": "/nope", "property": "p", "value": {}{}}}}}"#,
        "[".repeat(1020),
        "]".repeat(1020)
    );
    let t = compare(
        true,
        &[deep_ok.as_bytes(), too_deep.as_bytes(), deep_any.as_bytes()],
    );
    assert_eq!(
        t[4][0],
        err(None, "DeviceNotFound", "Device '/nope' not found")
    );
    assert_eq!(t[2].len(), 2, "1000 levels accepted, then the sentinel");
    assert!(t[2][0].starts_with("{\"return\": {"), "{}", &t[2][0][..40]);
    assert_eq!(
        t[3][0],
        err(None, "GenericError", "JSON nesting depth limit exceeded")
    );
    assert_eq!(
        t[3][1],
        err(None, "GenericError", "QMP input must be a JSON object")
    );
    assert_eq!(t[3].len(), 1 + 1 + 1025 + 1);
}

#[test]
fn raw_control_character_in_string_recovers() {
    let t = compare_gap(
        true,
        200,
        &[
            b"{\"execute\": \"query-version\", \"id\": \"abc\n",
            b"\"}\"",
        ],
    );
    assert_eq!(
        t[2][0],
        err(None, "GenericError", "JSON parse error, stray '\\\"abc\\n'")
    );
    assert!(t[2][1].contains("SENTINEL"), "recovered: {:?}", t[2]);
    assert_eq!(
        t[3][0],
        err(None, "GenericError", "QMP input must be a JSON object")
    );
}

#[test]
fn pretty_layout_byte_for_byte() {
    let mut outs = Vec::new();
    for which in Which::all() {
        let dir = TempDir::new();
        let sock = dir.s("q.sock");
        let a = args(&[
            "--chardev",
            &format!("socket,path={sock},server=on,wait=off,id=c"),
            "--monitor",
            "chardev=c,pretty=on",
        ]);
        let _d = Daemon::spawn(which, &a);
        let mut q = Qmp::connect(&dir.path("q.sock"));
        let greeting = q.pretty_message();
        assert!(
            greeting.starts_with("{\r\n    \"QMP\": {\r\n        \"version\": {\r\n"),
            "{greeting:?}"
        );
        let mut got = Vec::new();
        for cmd in [
            r#"{"execute":"qmp_capabilities"}"#,
            r#"{"execute":"nosuch"}"#,
            r#"{"execute":"query-chardev-backends"}"#,
            r#"{"execute":"qom-list","arguments":{"path":"/backend"}}"#,
        ] {
            q.send(cmd.as_bytes());
            got.push(q.pretty_message());
        }
        assert_eq!(got[0], "{\r\n    \"return\": {\r\n    }\r\n}\r\n");
        assert_eq!(
            got[1],
            "{\r\n    \"error\": {\r\n        \"class\": \"CommandNotFound\",\r\n        \"desc\": \"The command nosuch has not been found\"\r\n    }\r\n}\r\n"
        );
        outs.push(got);
    }
    for o in &outs[1..] {
        assert_eq!(&outs[0], o);
    }
}

#[test]
fn chardev_and_object_commands_match_qsd() {
    let dir = TempDir::new();
    let u1 = dir.s("u1.sock");
    let steps: Vec<String> = vec![
        format!(r#"{{"execute":"chardev-add","arguments":{{"id":"u1","backend":{{"type":"socket","data":{{"addr":{{"type":"unix","data":{{"path":"{u1}"}}}},"server":true,"wait":false}}}}}}}}"#),
        r#"{"execute":"chardev-add","arguments":{"id":"n1","backend":{"type":"null","data":{}}}}"#.into(),
        r#"{"execute":"chardev-add","arguments":{"id":"n1","backend":{"type":"null","data":{}}}}"#.into(),
        r#"{"execute":"chardev-add","arguments":{"id":"r2","backend":{"type":"ringbuf","data":{"size":1000}}}}"#.into(),
        r#"{"execute":"chardev-add","arguments":{"id":"x5","backend":{"type":"file","data":{"out":"/nonexistent/x"}}}}"#.into(),
        r#"{"execute":"chardev-add","arguments":{"id":"x3","backend":{"type":"socket","data":{}}}}"#.into(),
        r#"{"execute":"chardev-remove","arguments":{"id":"nosuch"}}"#.into(),
        r#"{"execute":"chardev-remove","arguments":{"id":"mon0"}}"#.into(),
        r#"{"execute":"chardev-remove","arguments":{"id":"n1"}}"#.into(),
        r#"{"execute":"chardev-remove","arguments":{"id":"u1"}}"#.into(),
        r#"{"execute":"query-chardev"}"#.into(),
        r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s2","data":"xyz"}}"#.into(),
        r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s2","data":"xyz"}}"#.into(),
        r#"{"execute":"object-add","arguments":{"qom-type":"nosuch","id":"x"}}"#.into(),
        r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s3"}}"#.into(),
        r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"1bad","data":"x"}}"#.into(),
        r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s3","file":"/nonexistent"}}"#.into(),
        r#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io1","poll-max-ns":-1}}"#.into(),
        r#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io1"}}"#.into(),
        r#"{"execute":"qom-get","arguments":{"path":"/objects/io1","property":"poll-max-ns"}}"#.into(),
        r#"{"execute":"qom-set","arguments":{"path":"/objects/io1","property":"poll-max-ns","value":12345}}"#.into(),
        r#"{"execute":"qom-get","arguments":{"path":"/objects/io1","property":"poll-max-ns"}}"#.into(),
        r#"{"execute":"qom-set","arguments":{"path":"/objects/io1","property":"poll-max-ns","value":"12"}}"#.into(),
        r#"{"execute":"qom-set","arguments":{"path":"/objects/io1","property":"type","value":"x"}}"#.into(),
        r#"{"execute":"qom-get","arguments":{"path":"/objects/io1","property":"bogus"}}"#.into(),
        r#"{"execute":"qom-get","arguments":{"path":"/objects/s2","property":"data"}}"#.into(),
        r#"{"execute":"qom-get","arguments":{"path":"/objects/s2","property":"iv"}}"#.into(),
        r#"{"execute":"qom-get","arguments":{"path":"/nosuch","property":"type"}}"#.into(),
        r#"{"execute":"qom-list","arguments":{"path":""}}"#.into(),
        r#"{"execute":"qom-list","arguments":{"path":"/objects/io1"}}"#.into(),
        r#"{"execute":"qom-list","arguments":{"path":"/objects/s2"}}"#.into(),
        r#"{"execute":"qom-list","arguments":{"path":"/"}}"#.into(),
        r#"{"execute":"qom-get","arguments":{"path":"/chardevs/mon0","property":"type"}}"#.into(),
        r#"{"execute":"object-del","arguments":{"id":"s2"}}"#.into(),
        r#"{"execute":"object-del","arguments":{"id":"s2"}}"#.into(),
        r#"{"execute":"query-chardev-backends"}"#.into(),
    ];
    let steps: Vec<&[u8]> = steps.iter().map(|s| s.as_bytes()).collect();
    let t = compare(true, &steps);
    assert_eq!(
        t[4][0],
        err(None, "GenericError", "Chardev with id 'n1' already exists")
    );
    assert_eq!(t[9][0], err(None, "GenericError", "Chardev 'mon0' is busy"));
    assert!(
        !std::path::Path::new(&u1).exists(),
        "chardev-remove unlinks the socket"
    );
    assert_eq!(t[21][0], "{\"return\": 32768}\r\n");
    assert_eq!(t[23][0], "{\"return\": 12345}\r\n");
}

/// The daemon's peak resident memory, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Sends `payload` from a thread without reading anything, until the
/// daemon stops taking input (no progress for a second) or all is sent;
/// returns whether it all went.
fn send_unread(stream: &UnixStream, payload: Vec<u8>) -> bool {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let sent = std::sync::Arc::new(AtomicUsize::new(0));
    let (s2, mut w) = (sent.clone(), stream.try_clone().expect("clone"));
    let total = payload.len();
    let sender = std::thread::spawn(move || {
        for chunk in payload.chunks(16 << 10) {
            if w.write_all(chunk).is_err() {
                return;
            }
            s2.fetch_add(chunk.len(), Ordering::SeqCst);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (0, std::time::Instant::now());
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = sent.load(Ordering::SeqCst);
        if now == total {
            let _ = sender.join();
            return true;
        }
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        } else if since.elapsed() > Duration::from_secs(1) {
            return false;
        }
    }
    panic!("the daemon neither stopped reading nor took everything");
}

/// Once the client stopped reading, the daemon has stopped working on
/// its requests (not merely fallen behind) and holds little memory.
fn assert_idle_and_small(pid: u32) {
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_millis(1000));
    let busy = cpu_time(pid) - before;
    assert!(
        busy < Duration::from_millis(400),
        "still working: {busy:?} of CPU in 1 s"
    );
    let peak = peak_rss_kib(pid);
    assert!(peak < 100 << 10, "peak RSS {peak} KiB");
}

/// A client that pipelines requests and never reads the replies: the
/// daemon stops reading once a bounded amount of output is queued,
/// instead of buffering every reply (rsd once grew past 1 GB), and every
/// reply still arrives, in order, once the client reads.
#[test]
fn unread_replies_stop_the_daemon_reading() {
    let dir = TempDir::new();
    let d = Daemon::spawn(Which::Rsd, &monitor_args(&dir.s("q.sock")));
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let n = 30_000;
    let mut payload = Vec::new();
    for i in 0..n {
        payload.extend(format!(r#"{{"execute":"query-qmp-schema","id":{i}}}"#).bytes());
    }
    let all_sent = send_unread(&q.stream, payload);
    assert!(
        !all_sent,
        "the daemon read every request while none was answered"
    );
    assert_idle_and_small(d.child.id());
    // What was sent is answered in order once the client reads.
    for i in 0..100 {
        let l = q.line();
        assert!(l.starts_with(r#"{"return": ["#), "reply {i}: {:.80}", l);
        assert!(
            l.ends_with(&format!(r#""id": {i}}}{}"#, "\r\n")),
            "reply {i} id: {}",
            &l[l.len().saturating_sub(40)..]
        );
    }
    // One 8 MB line of nested brackets (an error reply per bracket past
    // the nesting limit): bounded too, and the daemon serves the next
    // client. (Shut down: the sender thread's copy of the socket would
    // keep it open.)
    let _ = q.stream.shutdown(std::net::Shutdown::Both);
    let q = Qmp::ready(&dir.path("q.sock"));
    let mut payload = vec![b'['; 4 << 20];
    payload.extend(vec![b']'; 4 << 20]);
    let all_sent = send_unread(&q.stream, payload);
    assert!(
        !all_sent,
        "the daemon read the whole flood while none was answered"
    );
    assert_idle_and_small(d.child.id());
    let _ = q.stream.shutdown(std::net::Shutdown::Both);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    assert!(q.cmd(r#"{"execute":"query-version"}"#)["return"]["qemu"].is_object());
}

/// A client that pipelines many commands and an `object-add`, then
/// disconnects without reading: its queued commands are dropped with it,
/// so the object is never created and the next client is served at once
/// (as QSD drops a closed monitor's queue).
#[test]
fn a_departed_clients_queue_is_dropped() {
    for which in Which::all() {
        let dir = TempDir::new();
        let _d = Daemon::spawn(which, &monitor_args(&dir.s("q.sock")));
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let mut payload = Vec::new();
        for _ in 0..2000 {
            payload.extend(br#"{"execute":"query-version"}"#);
        }
        payload
            .extend(br#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"late"}}"#);
        q.send(&payload);
        drop(q);
        let start = std::time::Instant::now();
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let waited = start.elapsed();
        let list = q.cmd(r#"{"execute":"qom-list","arguments":{"path":"/objects"}}"#);
        assert!(!list.to_string().contains("late"), "{which:?}: {list}");
        assert!(
            waited < Duration::from_secs(3),
            "{which:?}: the next client waited {waited:?}"
        );
    }
}

/// QOM partial paths, as QSD resolves them: an id alone or with its
/// container, a trailing slash, ambiguity between an object and a
/// chardev of the same id (qom-list says so, qom-get reports the device
/// as not found), and empty components (skipped).
#[test]
fn qom_partial_paths_match_qsd() {
    let list = |p: &str| format!(r#"{{"execute":"qom-list","arguments":{{"path":"{p}"}}}}"#);
    let get = |p: &str, prop: &str| {
        format!(r#"{{"execute":"qom-get","arguments":{{"path":"{p}","property":"{prop}"}}}}"#)
    };
    let steps: Vec<String> = vec![
        r#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io1"}}"#.into(),
        r#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"x"}}"#.into(),
        r#"{"execute":"chardev-add","arguments":{"id":"x","backend":{"type":"null","data":{}}}}"#
            .into(),
        list("io1"),
        list("objects/io1"),
        list("io1/"),
        list("/objects/io1/"),
        list("/objects//io1"),
        list("io"),
        list("x"),
        list(""),
        list("chardevs/x"),
        get("x", "type"),
        get("io1", "poll-max-ns"),
        get("objects", "type"),
        get("io1", "nope"),
        r#"{"execute":"qom-set","arguments":{"path":"io1","property":"poll-max-ns","value":123}}"#
            .into(),
        get("/objects/io1", "poll-max-ns"),
    ];
    let steps: Vec<&[u8]> = steps.iter().map(|s| s.as_bytes()).collect();
    let t = compare(true, &steps);
    let text = t.concat().concat();
    assert!(
        text.contains(r#""desc": "Path 'x' is ambiguous""#),
        "{text}"
    );
    assert!(
        text.contains(r#""desc": "Device 'io' not found""#),
        "{text}"
    );
    assert!(
        text.contains(r#"{"return": 123,"#) || text.contains(r#"{"return": 123}"#),
        "{text}"
    );
}

/// An object type rsd lacks is refused by name whatever properties come
/// with it (differences entry 5), on QMP and on the command line; the
/// properties of a type rsd has are still checked.
#[test]
fn missing_object_types_are_named_whatever_their_properties() {
    let steps: Vec<&[u8]> = vec![
        br#"{"execute":"object-add","arguments":{"qom-type":"authz-pam","id":"t","service":"x"}}"#,
        br#"{"execute":"object-add","arguments":{"qom-type":"pr-manager-helper","id":"t2","path":"/tmp/x"}}"#,
        br#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"i","dir":"/tmp"}}"#,
    ];
    let t = transcript(Which::Rsd, true, 0, &steps);
    let lacks = [
        (2, "invalid object type: authz-pam"),
        (3, "invalid object type: pr-manager-helper"),
        (4, "Parameter 'dir' is unexpected"),
    ];
    for (i, want) in lacks {
        assert_eq!(t[i][0], err(None, "GenericError", want));
    }
    let o = run_to_end(
        Which::Rsd,
        &["--object", "pr-manager-helper,id=t,path=/tmp/x"],
        10,
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "rsd: --object pr-manager-helper,id=t,path=/tmp/x: invalid object type: pr-manager-helper\n"
    );
}
