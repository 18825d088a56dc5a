//! Throttle groups and the throttle filter: QMP transcripts against
//! QSD's (objects, nodes, reopen), and the limits measured with fio
//! over NBD (each run a few seconds; bench/throttle.py runs rsd and QSD
//! side by side for 20 s per limit).
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

fn image(dir: &TempDir, name: &str) {
    qemu_img_create(&dir.path(name), "64M");
}

fn setup_image(dir: &TempDir) {
    image(dir, "a.img");
}

#[test]
fn throttle_group_objects_match_qsd() {
    let steps = [
        // Every check of the limits, with QSD's words.
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"bps-total":100,"bps-read":5}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"iops-total-max":100}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"bps-total":100,"bps-total-max-length":5}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"bps-write":100,"bps-write-max":50}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"bps-total":1000000000000001}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"iops-read":-1}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"bps-total":100,"bps-total-max":200,"bps-total-max-length":0}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"bps-total":100,"bps-total-max":200,"bps-total-max-length":4294967296}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"bps-total":100,"bps-total-max":200,"bps-total-max-length":-1}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"iops-size":4096}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"iops-total":"5"}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"nope":5}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","x-iops-total":-5}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","x-iops-total-max-length":4294967296}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","x-iops-read":5,"limits":{"iops-total":7}}}"#,
        // The legacy properties and limits together: limits wins where
        // QEMU applies it last.
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","x-iops-total":5,"x-bps-write":9,"limits":{"iops-total":7,"iops-total-max":70,"iops-total-max-length":3,"iops-size":4096}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/tg0","property":"limits"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/tg0","property":"x-iops-total-max-length"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/tg0","property":"x-bps-write"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/tg0","property":"nosuch"}}"#,
        r#"{"execute":"qom-list","arguments":{"path":"/objects/tg0"}}"#,
        r#"{"execute":"qom-list","arguments":{"path":"/objects"}}"#,
        // qom-set merges into the limits, checked whole.
        r#"{"execute":"qom-set","arguments":{"path":"/objects/tg0","property":"limits","value":{"iops-total":100}}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/tg0","property":"limits","value":{"bps-read":9}}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/tg0","property":"limits","value":{"bps-read":9,"bps-write":0}}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/tg0","property":"limits"}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/tg0","property":"limits","value":{"iops-read-max-length":4294967296}}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/tg0","property":"limits","value":5}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/tg0","property":"limits","value":{"x":1}}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/tg0","property":"limits","value":{"bps-read":"1"}}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/tg0","property":"limits","value":{}}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/tg0","property":"x-iops-total","value":9}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/tg0","property":"type","value":"x"}}"#,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/tg0","property":"nosuch","value":1}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/tg0","property":"limits"}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0"}}"#,
        r#"{"execute":"object-del","arguments":{"id":"tg0"}}"#,
        r#"{"execute":"object-del","arguments":{"id":"tg0"}}"#,
    ];
    let out = same_on_both(&|_| {}, &[], &steps).expect("both started");
    assert!(
        out[0].contains("cannot be used at the same time"),
        "{}",
        out[0]
    );
    assert!(out[15].contains("\"return\""), "{}", out[15]);
    assert!(out[17].contains("\"iops-total\": 7"), "{}", out[17]);
}

#[test]
fn throttle_groups_on_the_command_line_match_qsd() {
    let steps = [
        r#"{"execute":"qom-get","arguments":{"path":"/objects/tg0","property":"limits"}}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/objects/tg0","property":"x-iops-total"}}"#,
    ];
    let out = same_on_both(
        &|_| {},
        &[
            "--object",
            "throttle-group,id=tg0,x-iops-total=5,limits.bps-read=1000,limits.bps-read-max=2000,limits.bps-read-max-length=4",
        ],
        &steps,
    )
    .expect("both started");
    assert!(out[0].contains("\"bps-read-max-length\": 4"), "{}", out[0]);
    // A start-up failure reads the same too.
    let e = same_on_both(
        &|_| {},
        &[
            "--object",
            "throttle-group,id=tg0,limits.iops-total=5,limits.iops-write=2",
        ],
        &steps,
    )
    .expect_err("refused");
    assert!(e.contains("cannot be used at the same time"), "{e}");
    let help = run(rsd_bin(), &["--object", "throttle-group,help"]);
    let qsd = run(QSD, &["--object", "throttle-group,help"]);
    assert_eq!(help.stdout, qsd.stdout);
    assert!(String::from_utf8_lossy(&help.stdout).contains("limits=<ThrottleLimits>"));
}

#[test]
fn throttle_nodes_and_reopen_match_qsd() {
    let steps = [
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg0","limits":{"iops-total":5}}}"#,
        r#"{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"tg1"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"f0","filename":"$D/a.img"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"throttle","node-name":"t0","file":"f0"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"throttle","node-name":"t0","file":"f0","throttle-group":"nope"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"throttle","node-name":"t0","throttle-group":"tg0"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"throttle","node-name":"t0","file":"f0","throttle-group":"tg0"}}"#,
        r#"{"execute":"object-del","arguments":{"id":"tg0"}}"#,
        r#"{"execute":"query-named-block-nodes"}"#,
        r#"{"execute":"x-debug-query-block-graph"}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"throttle","node-name":"t1","file":{"driver":"file","filename":"$D/a.img"},"throttle-group":"tg0"}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        // A throttle node changes group with blockdev-reopen.
        r#"{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"throttle","node-name":"t0","file":"f0","throttle-group":"tg1"}]}}"#,
        r#"{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"throttle","node-name":"t0","file":"f0","throttle-group":"nope"}]}}"#,
        r#"{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"throttle","node-name":"t0","file":"f0"}]}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"object-del","arguments":{"id":"tg1"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"t0"}}"#,
        r#"{"execute":"object-del","arguments":{"id":"tg1"}}"#,
        // Inserted under a raw node, and taken out again.
        r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r0","file":"f0"}}"#,
        r#"{"execute":"blockdev-add","arguments":{"driver":"throttle","node-name":"t0","file":"f0","throttle-group":"tg0"}}"#,
        r#"{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"r0","file":"t0"}]}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"x-debug-query-block-graph"}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"t0"}}"#,
        r#"{"execute":"blockdev-reopen","arguments":{"options":[{"driver":"raw","node-name":"r0","file":"f0"}]}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"t0"}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"t1"}}"#,
        r#"{"execute":"object-del","arguments":{"id":"tg0"}}"#,
    ];
    let out = same_on_both(&setup_image, &[], &steps).expect("both started");
    assert!(
        out[7].contains("is in use, can not be deleted"),
        "{}",
        out[7]
    );
    assert!(out[21] == "{\"return\": {}}\r\n", "{}", out[21]);
    assert!(
        out[22].contains("\\\"driver\\\": \\\"raw\\\", \\\"file\\\": {\\\"throttle-group\\\""),
        "{}",
        out[22]
    );
    assert!(out[29] == "{\"return\": {}}\r\n", "{}", out[29]);
}

/// A directory for a test's images on tmpfs (/dev/shm) when there is
/// one, else `dir` itself (removed with `dir`).
fn image_dir(dir: &TempDir) -> TempDir {
    let name = dir.0.file_name().map(|n| n.to_string_lossy().into_owned());
    match name {
        Some(n) if Path::new("/dev/shm").is_dir() => {
            let p = Path::new("/dev/shm").join(n);
            if std::fs::create_dir_all(&p).is_ok() {
                return TempDir(p);
            }
        }
        _ => {}
    }
    let p = dir.path("images");
    std::fs::create_dir_all(&p).expect("image directory");
    TempDir(p)
}

/// An rsd serving throttle node(s) over NBD, with a QMP monitor and a
/// metrics socket.
struct Served {
    dir: TempDir,
    /// Where the images are: tmpfs when there is one, so no test waits
    /// for the page cache's writeback of other tests' data.
    images: TempDir,
    daemon: Daemon,
    qmp: Qmp,
}

impl Served {
    /// `nodes` throttle nodes t0.. in group tg over images i0.., each
    /// exported as t0.. ; `limits` is the group's starting limits.
    fn start(which: Which, nodes: usize, limits: &str) -> Served {
        let dir = TempDir::new();
        let images = image_dir(&dir);
        let mut a = monitor_args(&dir.s("q.sock"));
        a.extend(args(&[
            "--object",
            &format!("throttle-group,id=tg,{limits}"),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", dir.s("nbd.sock")),
        ]));
        for i in 0..nodes {
            let img = images.path(&format!("i{i}.img"));
            // Data, so reads are not answered as holes.
            let o = run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "raw",
                    &img.display().to_string(),
                    "64M",
                ],
            );
            ok(&o);
            let io = run(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0x5a 0 64M",
                    &img.display().to_string(),
                ],
            );
            ok(&io);
            a.extend(args(&[
                "--blockdev",
                &format!("file,node-name=f{i},filename={}", img.display()),
                "--blockdev",
                &format!("throttle,node-name=t{i},file=f{i},throttle-group=tg"),
                "--export",
                &format!("type=nbd,id=t{i},node-name=t{i},writable=on"),
            ]));
        }
        if which == Which::Rsd {
            a.extend(args(&[
                "--metrics-server",
                &format!("addr.type=unix,addr.path={}", dir.s("m.sock")),
            ]));
        }
        let daemon = Daemon::spawn(which, &a);
        let qmp = Qmp::ready(&dir.path("q.sock"));
        assert!(wait_for_path(&dir.path("nbd.sock"), 10));
        Served {
            dir,
            images,
            daemon,
            qmp,
        }
    }

    fn uri(&self, i: usize) -> String {
        format!("nbd+unix:///t{i}?socket={}", self.dir.s("nbd.sock"))
    }

    fn set_limits(&mut self, limits: Value) {
        let r = self.qmp.cmd(
            &json!({"execute":"qom-set","arguments":{"path":"/objects/tg","property":"limits","value":limits}})
                .to_string(),
        );
        assert_eq!(r, json!({"return": {}}), "{limits}");
    }

    /// The metrics text (rsd).
    fn metrics(&self) -> String {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(self.dir.path("m.sock")) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: rsd\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }
}

/// Every throttled direction's avg limit at 0 except the ones given.
fn only(set: &[(&str, u64)]) -> Value {
    let mut m = serde_json::Map::new();
    for k in ["iops", "bps"] {
        for d in ["total", "read", "write"] {
            m.insert(format!("{k}-{d}"), json!(0));
            m.insert(format!("{k}-{d}-max"), json!(0));
            m.insert(format!("{k}-{d}-max-length"), json!(1));
        }
    }
    m.insert("iops-size".into(), json!(0));
    for (k, v) in set {
        m.insert(k.to_string(), json!(v));
    }
    Value::Object(m)
}

/// fio over NBD: one job per URI, together, for `secs` seconds, in the
/// background; the limits are measured on the daemon's side (`Passed`).
///
/// QD64: the throttle, not the client, must be what holds requests
/// back. At QD16 a 400 IOPS limit is met only while a request's round
/// trip outside the throttle (fio, the socket, the file) stays under
/// 40 ms, which a busy 2-core machine does not promise to fio or to
/// QSD either; at QD64 it has 160 ms. The tests' rates are low (at
/// most 400 requests a second) for the same reason: a debug build
/// spends about 0.3 ms of CPU per request, and a starved process misses
/// any limit (bench/throttle.py measures release builds at 2000 IOPS).
fn fio(uris: &[String], rw: &str, bs: &str, secs: u32) -> std::thread::JoinHandle<()> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--ioengine=nbd",
        &format!("--rw={rw}"),
        &format!("--bs={bs}"),
        "--iodepth=64",
        &format!("--runtime={secs}"),
        "--time_based",
        "--size=64M",
        "--output-format=json",
    ]);
    for (i, u) in uris.iter().enumerate() {
        cmd.arg(format!("--name=j{i}")).arg(format!("--uri={u}"));
    }
    std::thread::spawn(move || {
        let out = cmd
            .output()
            .expect("fio is installed (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "fio: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    })
}

/// What went through each node so far (query-blockstats, reads and
/// writes together), and when. Measured on the daemon's side: fio's own
/// figures over a few seconds leave out the requests still queued at
/// the end (QD / limit seconds' worth, 8% of 4 s at QD64 and 200 IOPS).
#[derive(Clone, Debug)]
struct Passed {
    at: Instant,
    /// (operations, bytes) per node, in the order asked.
    nodes: Vec<(f64, f64)>,
}

impl Passed {
    fn now(q: &mut Qmp, nodes: &[&str]) -> Passed {
        let before = Instant::now();
        let r = q.cmd(r#"{"execute":"query-blockstats","arguments":{"query-nodes":true}}"#);
        // The moment the daemon answered, as near as can be told.
        let at = before + before.elapsed() / 2;
        let list = r["return"].as_array().cloned().unwrap_or_default();
        let nodes = nodes
            .iter()
            .map(|n| {
                let s = list
                    .iter()
                    .find(|e| e["node-name"] == *n)
                    .map(|e| e["stats"].clone())
                    .unwrap_or_else(|| panic!("no blockstats for {n}: {r}"));
                let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
                (
                    f("rd_operations") + f("wr_operations"),
                    f("rd_bytes") + f("wr_bytes"),
                )
            })
            .collect();
        Passed { at, nodes }
    }

    /// Node i's operations and bytes per second from `earlier` to self.
    fn rate(&self, earlier: &Passed, i: usize) -> (f64, f64) {
        let secs = self.at.duration_since(earlier.at).as_secs_f64();
        (
            (self.nodes[i].0 - earlier.nodes[i].0) / secs,
            (self.nodes[i].1 - earlier.nodes[i].1) / secs,
        )
    }

    /// Polls until every node has had a request since `base`; returns
    /// the first sample that shows it (the load's start, within ~10 ms).
    fn started(q: &mut Qmp, nodes: &[&str], base: &Passed) -> Passed {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let p = Passed::now(q, nodes);
            if p.nodes.iter().zip(&base.nodes).all(|(a, b)| a.0 > b.0) {
                return p;
            }
            assert!(Instant::now() < deadline, "the load never started");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Sleeps until `from + secs`.
fn until(from: Instant, secs: f64) {
    let t = from + Duration::from_secs_f64(secs);
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn within(got: f64, want: f64, tol: f64, what: &str) {
    let err = (got - want).abs() / want;
    assert!(
        err <= tol,
        "{what}: {got:.1} vs limit {want} ({:.1}%)",
        err * 100.0
    );
}

/// Runs fio on node t0 with `rw` and `bs` and returns what went through
/// per second (operations, bytes) over 3 s from the first second on.
fn measure(s: &mut Served, rw: &str, bs: &str) -> (f64, f64) {
    let base = Passed::now(&mut s.qmp, &["t0"]);
    let load = fio(&[s.uri(0)], rw, bs, 5);
    let t0 = Passed::started(&mut s.qmp, &["t0"], &base);
    until(t0.at, 1.0);
    let a = Passed::now(&mut s.qmp, &["t0"]);
    until(a.at, 3.0);
    let b = Passed::now(&mut s.qmp, &["t0"]);
    load.join().expect("fio");
    b.rate(&a, 0)
}

#[test]
fn limits_hold_within_five_percent() {
    let mut s = Served::start(Which::Rsd, 1, "limits.iops-total=200");
    // IOPS: read, write, total (reads and writes together).
    for (limit, rw) in [
        ("iops-read", "randread"),
        ("iops-write", "randwrite"),
        ("iops-total", "randrw"),
    ] {
        s.set_limits(only(&[(limit, 200)]));
        let (ops, _) = measure(&mut s, rw, "4k");
        within(ops, 200.0, 0.05, limit);
    }
    // Bandwidth: 4 MiB/s in 32 KiB requests.
    for (limit, rw) in [
        ("bps-read", "randread"),
        ("bps-write", "randwrite"),
        ("bps-total", "randrw"),
    ] {
        s.set_limits(only(&[(limit, 4 << 20)]));
        let (_, bytes) = measure(&mut s, rw, "32k");
        within(bytes, (4 << 20) as f64, 0.05, limit);
    }
    // iops-size: 16 KiB requests count as four 4 KiB operations.
    s.set_limits(only(&[("iops-total", 200), ("iops-size", 4096)]));
    let (ops, _) = measure(&mut s, "randread", "16k");
    within(ops, 50.0, 0.05, "iops-size");
    // The requests waited in the filter.
    let m = s.metrics();
    assert!(
        m.contains("rsd_throttle_throttled_requests_total{group=\"tg\",node=\"t0\"}"),
        "{m}"
    );
}

#[test]
fn bursts_allow_max_for_max_length_then_fall_back() {
    // 40 IOPS, bursts of 400 IOPS for 2 s.
    let mut s = Served::start(
        Which::Rsd,
        1,
        "limits.iops-write=40,limits.iops-write-max=400,limits.iops-write-max-length=2",
    );
    let base = Passed::now(&mut s.qmp, &["t0"]);
    let load = fio(&[s.uri(0)], "randwrite", "4k", 7);
    let t0 = Passed::started(&mut s.qmp, &["t0"], &base);
    until(t0.at, 0.5);
    let a = Passed::now(&mut s.qmp, &["t0"]);
    until(t0.at, 1.5);
    let b = Passed::now(&mut s.qmp, &["t0"]);
    until(t0.at, 3.0);
    let c = Passed::now(&mut s.qmp, &["t0"]);
    until(t0.at, 6.0);
    let d = Passed::now(&mut s.qmp, &["t0"]);
    load.join().expect("fio");
    // The burst runs at max.
    within(b.rate(&a, 0).0, 400.0, 0.05, "during the burst");
    // It lasts until max * max-length (800) units are in the bucket
    // beyond what leaked at 40/s: 2.1 s, 884 writes (with the tenth of a
    // second's worth that goes at once), then 40/s: 920 by 3 s.
    let by_3s = c.nodes[0].0 - base.nodes[0].0;
    within(by_3s, 920.0, 0.05, "writes in the first 3 s");
    // Then the average.
    within(d.rate(&c, 0).0, 40.0, 0.05, "after the burst");
}

#[test]
fn a_new_limit_holds_within_a_second() {
    let mut s = Served::start(Which::Rsd, 1, "limits.iops-total=100");
    let base = Passed::now(&mut s.qmp, &["t0"]);
    let load = fio(&[s.uri(0)], "randread", "4k", 7);
    let t0 = Passed::started(&mut s.qmp, &["t0"], &base);
    until(t0.at, 0.5);
    let a = Passed::now(&mut s.qmp, &["t0"]);
    until(t0.at, 2.0);
    let b = Passed::now(&mut s.qmp, &["t0"]);
    s.set_limits(only(&[("iops-total", 300)]));
    let changed = Instant::now();
    until(changed, 1.0);
    let c = Passed::now(&mut s.qmp, &["t0"]);
    until(changed, 4.0);
    let d = Passed::now(&mut s.qmp, &["t0"]);
    load.join().expect("fio");
    within(b.rate(&a, 0).0, 100.0, 0.05, "before");
    within(d.rate(&c, 0).0, 300.0, 0.05, "a second after qom-set");
}

#[test]
fn two_nodes_in_one_group_share_it_evenly() {
    let mut s = Served::start(Which::Rsd, 2, "limits.iops-total=200");
    let nodes = ["t0", "t1"];
    let base = Passed::now(&mut s.qmp, &nodes);
    let load = fio(&[s.uri(0), s.uri(1)], "randread", "4k", 5);
    let t0 = Passed::started(&mut s.qmp, &nodes, &base);
    until(t0.at, 1.0);
    let a = Passed::now(&mut s.qmp, &nodes);
    until(a.at, 3.0);
    let b = Passed::now(&mut s.qmp, &nodes);
    load.join().expect("fio");
    let (x, y) = (b.rate(&a, 0).0, b.rate(&a, 1).0);
    within(x, 100.0, 0.1, "t0");
    within(y, 100.0, 0.1, "t1");
    within(x + y, 200.0, 0.05, "the group");
}

/// Queued writes through qemu-io: 8 writes at 1 IOPS.
fn queued_writes(s: &Served) -> Child {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for i in 0..8 {
        cmd.arg("-c")
            .arg(format!("aio_write -P 0xab {} 4k", i * 4096));
    }
    cmd.arg("-c").arg("aio_flush").arg(s.uri(0));
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    cmd.spawn().expect("qemu-io")
}

fn queued_now(s: &Served) -> u64 {
    let m = s.metrics();
    m.lines()
        .find(|l| l.starts_with("rsd_throttle_queued_requests{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn queued_requests_are_drained_on_export_deletion_and_quit() {
    for how in ["block-export-del", "quit"] {
        let mut s = Served::start(Which::Rsd, 1, "limits.iops-total=1");
        let mut io = queued_writes(&s);
        let deadline = Instant::now() + Duration::from_secs(20);
        while queued_now(&s) < 6 {
            assert!(Instant::now() < deadline, "{how}: writes never queued");
            std::thread::sleep(Duration::from_millis(20));
        }
        let t0 = Instant::now();
        if how == "quit" {
            s.qmp.send(br#"{"execute":"quit"}"#);
            assert!(s.daemon.wait_exit(10).is_some(), "rsd did not exit");
        } else {
            let r = s
                .qmp
                .cmd(r#"{"execute":"block-export-del","arguments":{"id":"t0","mode":"hard"}}"#);
            assert_eq!(r, json!({"return": {}}));
            loop {
                let r = s.qmp.cmd(r#"{"execute":"query-block-exports"}"#);
                if r["return"].as_array().is_some_and(|a| a.is_empty()) {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "{how}: export stayed"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // At 1 IOPS the queue would take 7 s; drained, it goes at once.
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{how}: {:?}",
            t0.elapsed()
        );
        let _ = io.wait();
        if how != "quit" {
            s.qmp.send(br#"{"execute":"quit"}"#);
            assert!(s.daemon.wait_exit(10).is_some());
        }
        // Every queued write reached the image: none was dropped.
        let data = std::fs::read(s.images.path("i0.img")).expect("image");
        assert!(
            data[..8 * 4096].iter().all(|b| *b == 0xab),
            "{how}: a queued write was dropped"
        );
    }
}

/// A daemon serving throttle node `t` (group `tg` with `limits`) over
/// vhost-user-blk on `<prog>-vu.sock`, on a 64 MiB image in `images`.
fn serve_vhost(which: Which, dir: &TempDir, images: &TempDir, limits: &str) -> (Daemon, Qmp) {
    let img = images.path(&format!("{}.img", which.prog()));
    qemu_img_create(&img, "64M");
    let mon = dir.s(&format!("{}-qmp.sock", which.prog()));
    let mut a = monitor_args(&mon);
    a.extend(args(&[
        "--object",
        &format!("throttle-group,id=tg,{limits}"),
        "--blockdev",
        &format!("file,node-name=f,filename={}", img.display()),
        "--blockdev",
        "throttle,node-name=t,file=f,throttle-group=tg",
        "--export",
        &format!(
            "type=vhost-user-blk,id=vu,node-name=t,writable=on,addr.type=unix,addr.path={}",
            dir.s(&format!("{}-vu.sock", which.prog()))
        ),
    ]));
    let d = Daemon::spawn(which, &a);
    let q = Qmp::ready(Path::new(&mon));
    (d, q)
}

#[test]
fn limits_hold_over_vhost_user_blk() {
    // One group, an IOPS and a bandwidth limit: 4 KiB reads meet the
    // first (0.8 MB/s is far below the second), 32 KiB writes the second
    // (128 requests a second, below the first).
    const IOPS: f64 = 200.0;
    const BPS: u64 = 4 << 20;
    let limits = format!("limits.iops-total={IOPS},limits.bps-total={BPS}");
    let dir = TempDir::new();
    let images = image_dir(&dir);
    let (warmup, window) = (Duration::from_millis(500), Duration::from_secs(3));
    let mut got = Vec::new();
    for which in Which::all() {
        let (mut d, mut q) = serve_vhost(which, &dir, &images, &limits);
        let sock = dir.path(&format!("{}-vu.sock", which.prog()));
        let iops = crate::vhost_user::rate(&sock, false, 4096, 16, warmup, window);
        let bps = crate::vhost_user::rate(&sock, true, 32 << 10, 16, warmup, window) * 32768.0;
        eprintln!("{which:?}: {iops:.1} IOPS (limit {IOPS}), {bps:.0} B/s (limit {BPS})");
        q.send(br#"{"execute":"quit"}"#);
        assert!(d.wait_exit(10).is_some(), "{which:?} did not exit");
        got.push((which, iops, bps));
    }
    for (which, iops, bps) in &got {
        // rsd holds the issue's 5%; QSD beside it shows the measure is
        // sound (it is not held to a bound on a loaded machine).
        let tol = if *which == Which::Rsd { 0.05 } else { 0.25 };
        within(*iops, IOPS, tol, &format!("{which:?} iops-total"));
        within(*bps, BPS as f64, tol, &format!("{which:?} bps-total"));
    }
    let data = std::fs::read(images.path("rsd.img")).expect("image");
    assert!(
        data[..16 << 15].iter().any(|b| *b != 0),
        "the writes never landed"
    );
    // Both wrote the same data to the same places.
    if got.len() == 2 {
        let o = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &images.s("rsd.img"),
                &images.s("qemu-storage-daemon.img"),
            ],
        );
        ok(&o);
    }
}
