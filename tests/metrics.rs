//! rsd's metrics listener (beyond QSD): a real Prometheus server scrapes
//! it during NBD I/O, /healthz and /readyz through start-up, serving and
//! shutdown, the QMP start/stop commands, and the Grafana dashboard's
//! series checked against a live scrape.
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// One HTTP GET over a connected stream; returns (status, body).
fn get_on(mut s: impl Read + Write, path: &str) -> Option<(u16, String)> {
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: rsd\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

fn get_tcp(port: u16, path: &str) -> Option<(u16, String)> {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    get_on(s, path)
}

fn get_unix(sock: &Path, path: &str) -> Option<(u16, String)> {
    let s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    get_on(s, path)
}

/// curl on a UNIX socket: (status, body), or None if it could not
/// connect.
fn curl_unix(sock: &Path, path: &str) -> Option<(u16, String)> {
    let o = Command::new("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(sock)
        .arg(format!("http://rsd{path}"))
        .output()
        .expect("curl");
    if !o.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_string()))
}

/// A sample's value in a text scrape: the line `name{labels} value`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A TCP listener on a free loopback port that a child may inherit.
fn inheritable_listener() -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let fd = l.as_raw_fd();
    nix::fcntl::fcntl(fd, nix::fcntl::F_SETFD(nix::fcntl::FdFlag::empty())).expect("cloexec");
    (l, port)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `f` until it returns Some, at most `secs`.
fn poll<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server started for a test, stopped when dropped.
struct Prometheus {
    child: std::process::Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Debian's prometheus scraping `target` every second; None
    /// when it is not installed (a failure under CI=true).
    fn start(dir: &TempDir, target: &str) -> Option<Prometheus> {
        let bin = "/usr/bin/prometheus";
        if !Path::new(bin).exists() {
            let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
            assert!(
                !ci,
                "{bin} is missing (scripts/test.sh installs Debian's prometheus)"
            );
            eprintln!("skipped: {bin} is missing (apt-get install prometheus)");
            return None;
        }
        let cfg = dir.path("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: rsd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write config");
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.s("tsdb")))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { child, port };
        poll(60, "prometheus to be ready", || {
            get_tcp(port, "/-/ready").filter(|(c, _)| *c == 200)
        });
        Some(p)
    }

    /// The result vector of an instant query.
    fn query(&self, q: &str) -> Vec<Value> {
        let (code, body) = get_tcp(
            self.port,
            &format!("/api/v1/query?query={}", percent_encode(q)),
        )
        .expect("prometheus answers");
        assert_eq!(code, 200, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["status"], "success", "{q}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of a query, if it has exactly one series.
    fn value(&self, q: &str) -> Option<f64> {
        match self.query(q).as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

fn qemu_io(uri: &str, cmd: &str) {
    ok(&run("qemu-io", &["-f", "raw", "-c", cmd, uri]));
}

#[test]
fn prometheus_scrapes_nbd_io() {
    let dir = TempDir::new();
    let img = dir.path("disk.img");
    qemu_img_create(&img, "64M");
    let (listener, port) = inheritable_listener();
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--metrics-server",
        &format!("addr.type=fd,addr.str={}", listener.as_raw_fd()),
        "--blockdev",
        &format!("driver=file,node-name=disk,filename={}", img.display()),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("nbd.sock")),
        "--export",
        "type=nbd,id=exp0,node-name=disk,name=disk,writable=on",
    ]));
    let _d = Daemon::spawn(Which::Rsd, &a);
    drop(listener);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let Some(prom) = Prometheus::start(&dir, &format!("127.0.0.1:{port}")) else {
        return;
    };
    let uri = format!("nbd+unix:///disk?socket={}", dir.s("nbd.sock"));
    // Writes while Prometheus scrapes, until it has seen some of them:
    // 1 MiB writes of a known pattern, each a separate connection.
    let mut written = 0u64;
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let off = (written >> 20) % 32;
        qemu_io(&uri, &format!("write -P 0x5a {off}M 1M"));
        written += 1 << 20;
        let seen = prom
            .value(r#"rsd_node_bytes_total{job="rsd",node="disk",op="write"}"#)
            .unwrap_or(0.0);
        if seen > 0.0 && written >= 4 << 20 {
            break;
        }
        assert!(Instant::now() < end, "Prometheus never scraped the writes");
    }
    qemu_io(&uri, "read -P 0x5a 0 2M");
    let read = 2u64 << 20;
    let connections = (written >> 20) + 1;

    // The counters Prometheus stores equal the I/O done, once scraped
    // after the last request.
    let node = |name: &str, op: &str| format!(r#"{name}{{job="rsd",node="disk",op="{op}"}}"#);
    poll(30, "the last I/O to be scraped", || {
        let w = prom.value(&node("rsd_node_bytes_total", "write"))?;
        let r = prom.value(&node("rsd_node_bytes_total", "read"))?;
        (w == written as f64 && r == read as f64).then_some(())
    });
    let exp =
        |name: &str, op: &str| format!(r#"{name}{{job="rsd",export="exp0",type="nbd",op="{op}"}}"#);
    assert_eq!(
        prom.value(&exp("rsd_export_bytes_total", "write")),
        Some(written as f64)
    );
    assert_eq!(
        prom.value(&exp("rsd_export_bytes_total", "read")),
        Some(read as f64)
    );
    assert_eq!(
        prom.value(r#"rsd_export_connections_total{export="exp0",type="nbd"}"#),
        Some(connections as f64)
    );
    assert_eq!(
        prom.value(r#"rsd_export_clients{export="exp0",type="nbd"}"#),
        Some(0.0)
    );
    assert_eq!(
        prom.value(r#"rsd_node_info{node="disk"}"#).map(|_| ()),
        Some(())
    );
    let info = prom.query(r#"rsd_node_info{node="disk"}"#);
    assert_eq!(info[0]["metric"]["driver"], "file");
    assert_eq!(
        prom.value(r#"up{job="rsd"}"#),
        Some(1.0),
        "the target is up"
    );

    // And they equal what query-blockstats reads from the same counters.
    let st = q.cmd(r#"{"execute":"query-blockstats","arguments":{"query-nodes":true}}"#);
    let s = &st["return"][0]["stats"];
    assert_eq!(st["return"][0]["node-name"], "disk");
    assert_eq!(s["wr_bytes"].as_u64(), Some(written));
    assert_eq!(s["rd_bytes"].as_u64(), Some(read));
    let ops = |k: &str| s[k].as_f64();
    assert_eq!(
        prom.value(&node("rsd_node_requests_total", "write")),
        ops("wr_operations")
    );
    assert_eq!(
        prom.value(&node("rsd_node_requests_total", "read")),
        ops("rd_operations")
    );
    assert_eq!(
        prom.value(&node("rsd_node_requests_total", "flush")),
        ops("flush_operations")
    );
    // Every completed request is in the latency histogram, and its sum
    // is blockstats' total time.
    assert_eq!(
        prom.value(&node("rsd_node_request_duration_seconds_count", "write")),
        ops("wr_operations")
    );
    let sum = prom
        .value(&node("rsd_node_request_duration_seconds_sum", "write"))
        .expect("sum");
    let ns = s["wr_total_time_ns"].as_f64().expect("time");
    assert!((sum - ns / 1e9).abs() < 1e-6, "{sum} vs {ns} ns");
    let p99 = prom
        .value(r#"histogram_quantile(0.99, rsd_node_request_duration_seconds_bucket{node="disk",op="write"})"#)
        .expect("quantile");
    assert!(p99 > 0.0 && p99 <= 10.0, "p99 {p99}");
    assert_eq!(
        prom.value(r#"rsd_node_request_errors_total{node="disk",op="write",reason="failed"}"#),
        Some(0.0)
    );
    q.send(br#"{"execute":"quit"}"#);
    // The data is what the clients wrote.
    let uri = img.display().to_string();
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0x5a 0 4M", &uri],
    ));
}

#[test]
fn health_through_startup_serving_and_shutdown() {
    let dir = TempDir::new();
    let msock = dir.path("m.sock");
    // wait=on holds start-up until a QMP client connects: the command
    // line is not applied yet.
    let a = args(&[
        "--metrics-server",
        &format!("addr.type=unix,addr.path={}", msock.display()),
        "--chardev",
        &format!("socket,path={},server=on,wait=on,id=c0", dir.s("q.sock")),
        "--monitor",
        "c0",
        "--blockdev",
        "driver=null-co,node-name=slow,size=1048576,latency-ns=3000000000",
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("nbd.sock")),
        "--export",
        "type=nbd,id=e0,node-name=slow",
    ]);
    let mut d = Daemon::spawn(Which::Rsd, &a);
    assert!(wait_for_path(&msock, 10), "metrics socket");
    let (code, body) = curl_unix(&msock, "/readyz").expect("readyz during start-up");
    assert_eq!(
        (code, body.as_str()),
        (503, "starting: the command line is being applied\n")
    );
    // The control actor is busy applying the command line.
    let (code, _) = curl_unix(&msock, "/healthz").expect("healthz during start-up");
    assert_eq!(code, 503);
    let metrics = get_unix(&msock, "/metrics").expect("metrics during start-up");
    assert_eq!(sample(&metrics.1, "rsd_ready"), Some(0.0));

    // Serving.
    let mut q = Qmp::ready(&dir.path("q.sock"));
    poll(10, "readyz 200", || {
        curl_unix(&msock, "/readyz").filter(|(c, _)| *c == 200)
    });
    assert_eq!(curl_unix(&msock, "/healthz"), Some((200, "ok\n".into())));
    assert_eq!(curl_unix(&msock, "/other").map(|r| r.0), Some(404));
    assert_eq!(
        sample(&get_unix(&msock, "/metrics").expect("m").1, "rsd_ready"),
        Some(1.0)
    );

    // Shutdown: quit waits for a slow request in flight, and meanwhile
    // both checks say 503 "stopping".
    let uri = format!("nbd+unix:///slow?socket={}", dir.s("nbd.sock"));
    let mut reader = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read 0 4k", &uri])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    poll(10, "the request in flight", || {
        let (_, m) = get_unix(&msock, "/metrics")?;
        (sample(&m, r#"rsd_node_requests_in_flight{node="slow"}"#)? == 1.0).then_some(())
    });
    q.send(br#"{"execute":"quit"}"#);
    let (code, body) = poll(10, "readyz 503", || {
        curl_unix(&msock, "/readyz").filter(|(c, _)| *c == 503)
    });
    assert_eq!((code, body.as_str()), (503, "stopping\n"));
    let healthz = curl_unix(&msock, "/healthz");
    assert!(
        healthz.is_none() || healthz == Some((503, "stopping\n".into())),
        "{healthz:?}"
    );
    assert_eq!(d.wait_exit(30), Some(0));
    let _ = reader.wait();
    assert!(!msock.exists(), "the metrics socket is removed");
}

#[test]
fn metrics_server_qmp_start_stop() {
    let dir = TempDir::new();
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&["--blockdev", "driver=null-co,node-name=n0"]));
    let _d = Daemon::spawn_env(Which::Rsd, &a, &[("RSD_TEST_HOOKS", "1")]);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let listed = q.cmd(r#"{"execute":"query-commands"}"#).to_string();
    assert!(
        listed.contains(r#""__org.rsd_metrics-server-start""#),
        "{listed}"
    );
    assert!(listed.contains(r#""__org.rsd_metrics-server-stop""#));
    let schema = q.cmd(r#"{"execute":"query-qmp-schema"}"#).to_string();
    assert!(schema.contains(r#""name":"__org.rsd_metrics-server-start""#));

    let m = dir.path("m.sock");
    let start = |p: &Path| {
        format!(
            r#"{{"execute":"__org.rsd_metrics-server-start","arguments":{{"addr":{{"type":"unix","path":"{}"}}}}}}"#,
            p.display()
        )
    };
    assert_eq!(q.cmd(&start(&m)), serde_json::json!({"return": {}}));
    let (code, text) = get_unix(&m, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert_eq!(
        sample(
            &text,
            r#"rsd_build_info{qemu_version="10.0.2",version="0.1.0"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"rsd_node_info{node="n0",driver="null-co"}"#),
        Some(1.0)
    );
    assert!(sample(&text, "process_resident_memory_bytes").is_some_and(|v| v > 0.0));

    // Supervision: a restarted node actor is counted by kind.
    assert_eq!(
        sample(&text, r#"rsd_supervisor_restarts_total{kind="node"}"#),
        Some(0.0)
    );
    let r = q.cmd(r#"{"execute":"x-rsd-test-crash","arguments":{"id":"node/n0"}}"#);
    assert_eq!(r["return"], serde_json::json!({}));
    poll(10, "the restart to be counted", || {
        let (_, t) = get_unix(&m, "/metrics")?;
        (sample(&t, r#"rsd_supervisor_restarts_total{kind="node"}"#)? == 1.0).then_some(())
    });

    // A series goes with its thing.
    let r = q.cmd(r#"{"execute":"blockdev-del","arguments":{"node-name":"n0"}}"#);
    assert_eq!(r["return"], serde_json::json!({}));
    let (_, text) = get_unix(&m, "/metrics").expect("metrics");
    assert!(!text.contains(r#"node="n0""#), "{text}");

    let r = q.cmd(&start(&dir.path("other.sock")));
    assert_eq!(r["error"]["class"], "GenericError");
    assert_eq!(r["error"]["desc"], "Metrics server already running");
    let r = q.cmd(r#"{"execute":"__org.rsd_metrics-server-stop"}"#);
    assert_eq!(r, serde_json::json!({"return": {}}));
    assert!(!m.exists(), "the socket goes with the server");
    assert!(get_unix(&m, "/metrics").is_none());
    let r = q.cmd(r#"{"execute":"__org.rsd_metrics-server-stop"}"#);
    assert_eq!(r["error"]["desc"], "Metrics server not running");

    // Bad addresses.
    let r = q.cmd(&start(Path::new("/nonexistent/dir/m.sock")));
    assert_eq!(
        r["error"]["desc"],
        "Failed to bind socket to /nonexistent/dir/m.sock: No such file or directory"
    );
    let r = q.cmd(
        r#"{"execute":"__org.rsd_metrics-server-start","arguments":{"addr":{"type":"inet","host":"127.0.0.1"}}}"#,
    );
    assert_eq!(
        r["error"]["desc"], "Parameter 'addr.port' is missing",
        "{r}"
    );
    let r = q.cmd(r#"{"execute":"__org.rsd_metrics-server-start"}"#);
    assert_eq!(r["error"]["desc"], "Parameter 'addr' is missing");

    // And a TCP listener after all that.
    let port = free_port();
    let r = q.cmd(&format!(
        r#"{{"execute":"__org.rsd_metrics-server-start","arguments":{{"addr":{{"type":"inet","host":"127.0.0.1","port":"{port}"}}}}}}"#
    ));
    assert_eq!(r, serde_json::json!({"return": {}}));
    assert_eq!(get_tcp(port, "/healthz"), Some((200, "ok\n".into())));
}

#[test]
fn metrics_server_command_line_errors() {
    let o = run_to_end(
        Which::Rsd,
        &[
            "--metrics-server",
            "addr.type=unix,addr.path=/nonexistent/dir/m.sock",
        ],
        10,
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "rsd: --metrics-server addr.type=unix,addr.path=/nonexistent/dir/m.sock: Failed to bind socket to /nonexistent/dir/m.sock: No such file or directory\n"
    );
    let o = run_to_end(Which::Rsd, &["--metrics-server", "addr.type=inet"], 10);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "rsd: --metrics-server addr.type=inet: Parameter 'addr.host' is missing\n"
    );
}

/// The series names a PromQL expression uses: identifiers outside
/// label matchers, ranges, strings and `by (...)` lists that are not
/// function calls, keywords or `$variables`.
fn series_in(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
    ];
    let b = expr.as_bytes();
    let skip_to = |mut i: usize, close: u8| {
        while i < b.len() && b[i] != close {
            i += 1;
        }
        i + 1
    };
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'{' => i = skip_to(i, b'}'),
            b'[' => i = skip_to(i, b']'),
            b'"' => i = skip_to(i + 1, b'"'),
            b'$' => {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let rest = expr[i..].trim_start();
                if KEYWORDS.contains(&word) {
                    if matches!(
                        word,
                        "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                    ) && rest.starts_with('(')
                    {
                        i = skip_to(expr.len() - rest.len(), b')');
                    }
                } else if !rest.starts_with('(') {
                    out.insert(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    out
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "expr" {
                    if let Some(s) = x.as_str() {
                        out.push(s.to_string());
                    }
                } else {
                    collect_exprs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

#[test]
fn dashboard_uses_exported_series() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("observability/grafana/rsd-dashboard.json"))
        .expect("dashboard");
    let dash: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dash["panels"], &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| series_in(e)).collect();

    // A daemon with a node, an export with a client's I/O and a job, so
    // every family is in the scrape.
    let dir = TempDir::new();
    let m = dir.path("m.sock");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--metrics-server",
        &format!("addr.type=unix,addr.path={}", m.display()),
        "--blockdev",
        "driver=null-co,node-name=src,size=1048576",
        "--blockdev",
        "driver=null-co,node-name=tgt,size=1048576",
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("nbd.sock")),
        "--export",
        "type=nbd,id=e0,node-name=src",
    ]));
    let _d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let r = q.cmd(
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"j0","device":"src","target":"tgt","sync":"none"}}"#,
    );
    assert_eq!(r["return"], serde_json::json!({}), "{r}");
    let (code, scrape) = get_unix(&m, "/metrics").expect("scrape");
    assert_eq!(code, 200);
    // Sample names as scraped (histograms as _bucket, _sum, _count).
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses series rsd does not export: {missing:?}\nused: {used:?}"
    );
    // It shows the families that matter.
    for f in [
        "rsd_node_requests_total",
        "rsd_node_bytes_total",
        "rsd_node_request_duration_seconds_bucket",
        "rsd_export_clients",
        "rsd_job_progress_done_bytes",
        "rsd_supervisor_restarts_total",
        "process_resident_memory_bytes",
    ] {
        assert!(used.contains(f), "the dashboard does not show {f}");
    }
    // The example scrape config parses and names a scrape interval.
    let cfg = std::fs::read_to_string(root.join("observability/prometheus.yml")).expect("config");
    assert!(cfg.contains("scrape_configs:") && cfg.contains("job_name: rsd"));
    let _ = q.cmd(r#"{"execute":"quit"}"#);
}

#[test]
fn series_names_from_promql() {
    let s = series_in(
        r#"histogram_quantile(0.99, sum by (le, node) (rate(rsd_node_request_duration_seconds_bucket{node=~"$node",op="read"}[$__rate_interval]))) / on (node) group_left(driver) rsd_x_total"#,
    );
    assert_eq!(
        s,
        ["rsd_node_request_duration_seconds_bucket", "rsd_x_total"]
            .iter()
            .map(|x| x.to_string())
            .collect()
    );
}
