//! OpenTelemetry traces and the operator's log (beyond QSD). An OTLP/HTTP
//! receiver in the test decodes what rsd exports: a QMP command's span
//! under the client's traceparent, a job's span under its command with
//! its state changes as events, an NBD connection's span with its
//! handshake, bytes and slow requests. Without OTEL_* nothing starts.
//! The log: quiet by default, JSON lines on request.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;

use crate::common::*;

/// One exported span, flattened for assertions.
#[derive(Clone, Debug)]
struct SpanRec {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: BTreeMap<String, String>,
    /// (name, attributes) in order.
    events: Vec<(String, BTreeMap<String, String>)>,
    /// 0 unset, 1 ok, 2 error.
    status: i32,
    status_message: String,
    service: String,
    start_ns: u64,
    end_ns: u64,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

/// An OTLP/HTTP receiver on a loopback port: every POST body is decoded
/// as an ExportTraceServiceRequest and its spans kept.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<SpanRec>>>,
    posts: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start() -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        l.set_nonblocking(true).expect("nonblocking");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let posts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, p2, st2) = (spans.clone(), posts.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                        serve(c, &s2, &p2);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Receiver {
            port,
            spans,
            posts,
            stop,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spans(&self) -> Vec<SpanRec> {
        self.spans.lock().expect("spans").clone()
    }

    /// Polls until `f` finds what it wants among the spans (20 s).
    fn wait<T>(&self, what: &str, f: impl Fn(&[SpanRec]) -> Option<T>) -> T {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(t) = f(&self.spans()) {
                return t;
            }
            assert!(
                Instant::now() < until,
                "no {what} among {:#?}",
                self.spans()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(c: TcpStream, spans: &Mutex<Vec<SpanRec>>, posts: &Mutex<Vec<String>>) {
    let mut r = BufReader::new(match c.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if r.read_line(&mut request_line).is_err() {
        return;
    }
    let mut len = 0usize;
    let mut ctype = String::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).is_err() || l == "\r\n" || l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
            if k.eq_ignore_ascii_case("content-type") {
                ctype = v.trim().to_string();
            }
        }
    }
    let mut body = vec![0u8; len];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    posts
        .lock()
        .expect("posts")
        .push(format!("{} {ctype}", request_line.trim()));
    if let Ok(req) = ExportTraceServiceRequest::decode(&body[..]) {
        let mut out = spans.lock().expect("spans");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .map(|r| attrs(&r.attributes))
                .and_then(|a| a.get("service.name").cloned())
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(SpanRec {
                        name: s.name.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attrs: attrs(&s.attributes),
                        events: s
                            .events
                            .iter()
                            .map(|e| (e.name.clone(), attrs(&e.attributes)))
                            .collect(),
                        status: s.status.as_ref().map_or(0, |st| st.code),
                        status_message: s
                            .status
                            .as_ref()
                            .map(|st| st.message.clone())
                            .unwrap_or_default(),
                        service: service.clone(),
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                    });
                }
            }
        }
    }
    let mut w = c;
    let _ = w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
    );
}

/// rsd with exactly these environment variables of the OTEL_*/RSD_LOG*
/// kind (the test runner's own are removed).
fn spawn_rsd(args: &[String], env: &[(&str, &str)]) -> Daemon {
    let mut cmd = Command::new(rsd_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") || k.starts_with("RSD_LOG") || k == "RSD_SLOW_REQUEST_MS" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    Daemon {
        child: cmd.spawn().expect("spawn rsd"),
        which: Which::Rsd,
    }
}

/// The names of the daemon's threads.
fn threads(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in dir.flatten() {
            if let Ok(n) = std::fs::read_to_string(t.path().join("comm")) {
                names.push(n.trim().to_string());
            }
        }
    }
    names
}

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

fn daemon_args(dir: &TempDir) -> Vec<String> {
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        "driver=null-co,node-name=slow,size=1048576,read-zeroes=off,latency-ns=40000000",
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
        "--export",
        "type=nbd,id=exp,node-name=slow,name=exp,writable=on",
    ]));
    a
}

#[test]
fn spans_for_a_command_a_job_and_an_nbd_connection() {
    let rx = Receiver::start();
    let dir = TempDir::new();
    let endpoint = rx.endpoint();
    let mut d = spawn_rsd(
        &daemon_args(&dir),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", "rsd-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("RSD_SLOW_REQUEST_MS", "20"),
        ],
    );
    let mut q = Qmp::ready(&dir.path("q.sock"));
    assert!(
        threads(d.child.id())
            .iter()
            .any(|t| t.starts_with("OpenTelemetry")),
        "no exporter thread: {:?}",
        threads(d.child.id())
    );

    // A command under the client's trace, and one that fails.
    let tp = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let r = q.cmd(&format!(
        r#"{{"execute":"query-version","id":"v1","__org.rsd_traceparent":"{tp}"}}"#
    ));
    assert!(r["return"]["qemu"].is_object(), "{r}");
    let r = q.cmd(r#"{"execute":"blockdev-del","arguments":{"node-name":"nope"},"id":7}"#);
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    // A secret never reaches a span.
    let r = q.cmd(
        r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"sec0","data":"hush-hush-7731"}}"#,
    );
    assert_eq!(r["return"], serde_json::json!({}), "{r}");

    // A job created by a traced command: its span is the command's child.
    let img = dir.s("new.img");
    let r = q.cmd(&format!(
        r#"{{"execute":"blockdev-create","id":"c1","__org.rsd_traceparent":"{tp}","arguments":{{"job-id":"j1","options":{{"driver":"file","filename":"{img}","size":1048576}}}}}}"#
    ));
    assert_eq!(r["return"], serde_json::json!({}), "{r}");
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let r = q.cmd(r#"{"execute":"query-jobs"}"#);
        if r["return"][0]["status"] == "concluded" {
            break;
        }
        assert!(Instant::now() < until, "job never concluded: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    q.cmd(r#"{"execute":"job-dismiss","arguments":{"id":"j1"}}"#);
    // A job that fails: its span carries the error.
    let bad = dir.s("no-such-dir/x.img");
    let r = q.cmd(&format!(
        r#"{{"execute":"blockdev-create","arguments":{{"job-id":"j2","options":{{"driver":"file","filename":"{bad}","size":1048576}}}}}}"#
    ));
    assert_eq!(r["return"], serde_json::json!({}), "{r}");
    let until = Instant::now() + Duration::from_secs(20);
    let job_error = loop {
        let r = q.cmd(r#"{"execute":"query-jobs"}"#);
        if r["return"][0]["status"] == "concluded" {
            break r["return"][0]["error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
        }
        assert!(Instant::now() < until, "job never concluded: {r}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!job_error.is_empty());

    // An NBD client: a slow read and a write.
    let uri = format!("nbd+unix:///exp?socket={}", dir.s("n.sock"));
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read 0 64k",
            "-c",
            "write -P 7 4096 8k",
            &uri,
        ],
    ));

    let cmd = rx.wait("query-version span", |s| {
        s.iter().find(|s| s.name == "qmp query-version").cloned()
    });
    assert_eq!(cmd.service, "rsd-under-test");
    assert_eq!(cmd.trace_id, TRACE_ID, "{cmd:#?}");
    assert_eq!(cmd.parent, CLIENT_SPAN, "{cmd:#?}");
    assert_eq!(cmd.attrs["qmp.command"], "query-version");
    assert_eq!(cmd.attrs["qmp.id"], "\"v1\"");
    assert_eq!(cmd.attrs["qmp.monitor"], "mon0");
    assert!(!cmd.attrs.contains_key("qmp.error_class"), "{cmd:#?}");
    assert_ne!(cmd.status, 2);

    let failed = rx.wait("blockdev-del span", |s| {
        s.iter().find(|s| s.name == "qmp blockdev-del").cloned()
    });
    assert_eq!(failed.attrs["qmp.error_class"], "GenericError");
    assert_eq!(failed.attrs["qmp.id"], "7");
    assert_eq!(failed.status, 2, "{failed:#?}");
    assert_eq!(failed.status_message, "GenericError");
    // Without a traceparent the command starts a trace of its own.
    assert_eq!(failed.parent, "");
    assert_ne!(failed.trace_id, TRACE_ID);

    let create = rx.wait("blockdev-create span", |s| {
        s.iter().find(|s| s.name == "qmp blockdev-create").cloned()
    });
    assert_eq!(create.trace_id, TRACE_ID);
    assert_eq!(create.parent, CLIENT_SPAN);
    let job = rx.wait("job span", |s| {
        s.iter().find(|s| s.name == "job create").cloned()
    });
    assert_eq!(job.trace_id, TRACE_ID, "{job:#?}");
    assert_eq!(job.parent, create.span_id, "{job:#?}");
    assert_eq!(job.attrs["job.id"], "j1");
    assert_eq!(job.attrs["job.type"], "create");
    let states: Vec<&str> = job
        .events
        .iter()
        .filter(|(n, _)| n == "job status change")
        .map(|(_, a)| a.get("status").map(String::as_str).unwrap_or(""))
        .collect();
    assert_eq!(
        states,
        ["created", "running", "waiting", "pending", "concluded"],
        "{job:#?}"
    );
    assert_ne!(job.status, 2);
    // The job outlives its command: it ends after it.
    assert!(job.end_ns >= create.end_ns, "{job:#?} {create:#?}");
    let failed_job = rx.wait("failed job span", |s| {
        s.iter()
            .find(|s| s.name == "job create" && s.attrs["job.id"] == "j2")
            .cloned()
    });
    assert_eq!(failed_job.status, 2, "{failed_job:#?}");
    assert_eq!(failed_job.status_message, job_error);
    assert_eq!(failed_job.attrs["job.error"], job_error);
    let last = failed_job.events.last().map(|(_, a)| a["status"].clone());
    assert_eq!(last.as_deref(), Some("concluded"), "{failed_job:#?}");

    let conn = rx.wait("NBD connection span", |s| {
        s.iter().find(|s| s.name == "nbd connection").cloned()
    });
    assert_eq!(conn.parent, "");
    assert_eq!(conn.attrs["nbd.export"], "exp");
    assert_eq!(conn.attrs["nbd.bytes_read"], "65536", "{conn:#?}");
    assert_eq!(conn.attrs["nbd.bytes_written"], "8192", "{conn:#?}");
    assert_eq!(conn.attrs["nbd.structured_replies"], "true");
    assert_eq!(conn.attrs["network.peer.address"], "unix");
    let hs = rx.wait("NBD handshake span", |s| {
        s.iter().find(|s| s.name == "nbd handshake").cloned()
    });
    assert_eq!((&hs.trace_id, &hs.parent), (&conn.trace_id, &conn.span_id));
    assert!(hs.end_ns <= conn.end_ns);
    // The 40 ms read is over the 20 ms threshold: a span under the
    // connection, with where it was.
    let slow = rx.wait("slow read span", |s| {
        s.iter().find(|s| s.name == "slow read").cloned()
    });
    assert_eq!(
        (&slow.trace_id, &slow.parent),
        (&conn.trace_id, &conn.span_id)
    );
    assert_eq!(slow.attrs["rsd.node"], "slow");
    assert_eq!(slow.attrs["rsd.operation"], "read");
    assert_eq!(slow.attrs["rsd.offset"], "0");
    assert_eq!(slow.attrs["rsd.length"], "65536");
    assert!(slow.end_ns - slow.start_ns >= 40_000_000, "{slow:#?}");

    q.send(b"{\"execute\":\"quit\"}\n");
    assert_eq!(d.wait_exit(20), Some(0));
    let err = d.stderr_text();
    assert_eq!(err, "", "stderr");
    let all = format!("{:?}", rx.spans());
    assert!(!all.contains("hush-hush"), "a secret in a span: {all}");
    let posts = rx.posts.lock().expect("posts").clone();
    assert!(
        posts
            .iter()
            .all(|p| p == "POST /v1/traces HTTP/1.1 application/x-protobuf"),
        "{posts:?}"
    );
}

#[test]
fn no_exporter_without_otel_variables() {
    let rx = Receiver::start();
    for env in [
        vec![("OTEL_SERVICE_NAME", "x".to_string())],
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint()),
            ("OTEL_SDK_DISABLED", "true".to_string()),
        ],
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint()),
            ("OTEL_TRACES_EXPORTER", "none".to_string()),
        ],
    ] {
        let dir = TempDir::new();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut d = spawn_rsd(&daemon_args(&dir), &env);
        let mut q = Qmp::ready(&dir.path("q.sock"));
        let names = threads(d.child.id());
        assert!(
            !names.iter().any(|t| t.starts_with("OpenTelemetry")),
            "{env:?}: {names:?}"
        );
        // Accepted (and ignored) with traces off too: a client need not
        // know whether they are on.
        let r = q.cmd(&format!(
            r#"{{"execute":"query-version","__org.rsd_traceparent":"00-{TRACE_ID}-{CLIENT_SPAN}-01"}}"#
        ));
        assert!(r["return"].is_object(), "{r}");
        let uri = format!("nbd+unix:///exp?socket={}", dir.s("n.sock"));
        ok(&run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &uri]));
        q.send(b"{\"execute\":\"quit\"}\n");
        assert_eq!(d.wait_exit(20), Some(0));
        assert_eq!(d.stderr_text(), "", "{env:?}");
    }
    assert!(rx.spans().is_empty(), "{:#?}", rx.spans());
    assert!(rx.posts.lock().expect("posts").is_empty());
}

/// A QMP session that adds and deletes an export and runs a job, then
/// quits: what the operator's log is tested on.
fn busy_session(dir: &TempDir, env: &[(&str, &str)], extra: &[&str]) -> String {
    let mut a = daemon_args(dir);
    a.extend(args(extra));
    let mut d = spawn_rsd(&a, env);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let r = q.cmd(
        r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"sec0","data":"hush-hush-7731"}}"#,
    );
    assert_eq!(r["return"], serde_json::json!({}), "{r}");
    let r = q.cmd(
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"e2","node-name":"slow","name":"e2"}}"#,
    );
    assert_eq!(r["return"], serde_json::json!({}), "{r}");
    let uri = format!("nbd+unix:///e2?socket={}", dir.s("n.sock"));
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read 0 4k", &uri],
    ));
    // The client's leaving reaches the export a moment after qemu-io exits.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let r = q.cmd(r#"{"execute":"block-export-del","arguments":{"id":"e2"}}"#);
        if r["return"] == serde_json::json!({}) {
            break;
        }
        assert!(Instant::now() < until, "{r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let img = dir.s("new.img");
    let r = q.cmd(&format!(
        r#"{{"execute":"blockdev-create","arguments":{{"job-id":"j1","options":{{"driver":"file","filename":"{img}","size":1048576}}}}}}"#
    ));
    assert_eq!(r["return"], serde_json::json!({}), "{r}");
    let until = Instant::now() + Duration::from_secs(20);
    while q.cmd(r#"{"execute":"query-jobs"}"#)["return"][0]["status"] != "concluded" {
        assert!(Instant::now() < until, "job never concluded");
        std::thread::sleep(Duration::from_millis(20));
    }
    q.cmd(r#"{"execute":"job-dismiss","arguments":{"id":"j1"}}"#);
    q.send(b"{\"execute\":\"quit\"}\n");
    assert_eq!(d.wait_exit(20), Some(0));
    d.stderr_text()
}

#[test]
fn log_is_quiet_by_default_and_json_lines_on_request() {
    let dir = TempDir::new();
    // QSD prints nothing on this path, and neither does rsd.
    assert_eq!(busy_session(&dir, &[], &[]), "");

    let dir = TempDir::new();
    let err = busy_session(
        &dir,
        &[("RSD_LOG", "info"), ("RSD_LOG_FORMAT", "json")],
        &[],
    );
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let find = |target: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["target"] == target).collect()
    };
    for target in [
        "daemon_start",
        "monitor_session_open",
        "export_add",
        "nbd_client_connect",
        "nbd_client_disconnect",
        "export_del",
        "job_status_change",
        "daemon_stop",
    ] {
        let found = find(target);
        assert!(!found.is_empty(), "no {target} in {err}");
        assert_eq!(found[0]["level"], "INFO", "{target}: {err}");
    }
    let added: Vec<&str> = find("export_add")
        .iter()
        .filter_map(|l| l["fields"]["id"].as_str())
        .collect();
    assert_eq!(added, ["exp", "e2"], "{err}");
    assert_eq!(find("export_add")[1]["fields"]["node"], "slow");
    assert_eq!(find("export_del")[0]["fields"]["id"], "e2");
    assert_eq!(find("nbd_client_connect")[0]["fields"]["export"], "e2");
    let states: Vec<&str> = find("job_status_change")
        .iter()
        .filter_map(|l| l["fields"]["status"].as_str())
        .collect();
    assert_eq!(
        states,
        [
            "created",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null"
        ],
        "{err}"
    );
    assert!(!err.contains("hush-hush"), "a secret in the log: {err}");

    // -T names trace points: only those print, as text.
    let dir = TempDir::new();
    let err = busy_session(&dir, &[], &["-T", "export_*"]);
    let lines: Vec<&str> = err.lines().collect();
    // exp from the command line, e2 added and deleted, exp at quit.
    assert_eq!(lines.len(), 4, "{err}");
    assert!(lines.iter().all(|l| l.contains(" export_")), "{err}");
    assert!(
        lines[1].contains("export added") && lines[1].contains("id=e2"),
        "{err}"
    );
    assert!(
        lines[2].contains("export deleted") && lines[2].contains("id=e2"),
        "{err}"
    );
    assert!(
        lines[3].contains("export deleted") && lines[3].contains("id=exp"),
        "{err}"
    );
}
