//! The container image and the Kubernetes manifest, run for real: the
//! image that scripts/container-image.sh builds (a static rsd FROM
//! scratch) runs under podman with runc, and is driven from the host
//! through bind-mounted sockets; deploy/kubernetes/ is played with
//! `podman kube play`. Skipped, with the reason, where podman cannot
//! run; under CI=true a missing podman fails (scripts/test.sh installs
//! it).
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::*;

/// The tag the tests build; each run builds it anew.
const IMAGE: &str = "localhost/rsd:test";

/// The flags that make podman work on these machines: runc (crun fails
/// on setrlimit and the cgroup layout here) and explicit limits.
const RUNC: [&str; 2] = ["--runtime", "runc"];

fn podman(argv: &[&str]) -> Output {
    Command::new("podman")
        .args(RUNC)
        .args(argv)
        .output()
        .expect("podman")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Whether podman can run here; prints why not. A missing podman fails
/// under CI=true, where the test command installs it.
fn podman_usable() -> bool {
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    match Command::new("podman").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            assert!(
                !ci,
                "podman is missing (scripts/test.sh installs podman and runc)"
            );
            eprintln!("skipped: podman is missing (apt-get install podman runc)");
            return false;
        }
    }
    let info = podman(&["info"]);
    if !info.status.success() {
        eprintln!("skipped: podman cannot run here:\n{}", text(&info));
        return false;
    }
    true
}

/// Builds the image once per test process, the documented way.
fn image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let o = Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/container-image.sh"
            ))
            .arg(IMAGE)
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(())
        } else {
            Err(text(&o))
        }
    });
    if let Err(e) = built {
        panic!("scripts/container-image.sh failed:\n{e}");
    }
    IMAGE
}

/// A unique name for a container or pod of this run.
fn unique(what: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "rsd-test-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A container, removed when dropped (whatever the test's outcome).
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.0]);
    }
}

fn inspect(name: &str, format: &str) -> String {
    ok(&podman(&["inspect", "--format", format, name]))
        .trim()
        .to_string()
}

/// A raw image of `size` bytes: a pattern in the first MiBs, then zeros.
fn pattern_file(path: &Path, size: usize) {
    let mut data = vec![0u8; size];
    for (i, b) in data.iter_mut().take(4 << 20).enumerate() {
        *b = (i % 251) as u8 ^ 0xa5;
    }
    std::fs::write(path, data).expect("pattern");
}

#[test]
fn image_serves_qmp_and_nbd_and_stops_cleanly() {
    if !podman_usable() {
        return;
    }
    let image = image();
    let dir = TempDir::new();
    let run_dir = dir.path("run");
    let images = dir.path("images");
    std::fs::create_dir_all(&run_dir).expect("run dir");
    std::fs::create_dir_all(&images).expect("images dir");
    ok(&run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            &dir.s("images/disk.qcow2"),
            "64M",
        ],
    ));

    let name = unique("run");
    let c = Container(name.clone());
    let sockets = format!("{}:/run/rsd", run_dir.display());
    let volumes = format!("{}:/var/lib/rsd", images.display());
    // The image's default command: QMP, the NBD server and metrics.
    ok(&podman(&[
        "run",
        "-d",
        "--name",
        &c.0,
        "--network",
        "none",
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=4096:4096",
        "-v",
        &sockets,
        "-v",
        &volumes,
        image,
    ]));

    let mut q = Qmp::ready(&run_dir.join("qmp.sock"));
    // rsd is the container's PID 1 (no init in between).
    let host_pid = inspect(&name, "{{.State.Pid}}");
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).expect("status");
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("NSpid");
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "{status}");

    let v = q.cmd(r#"{"execute":"query-version"}"#);
    assert!(
        v["return"]["package"]
            .as_str()
            .is_some_and(|p| p.starts_with("rsd ")),
        "{v}"
    );
    let r = q.cmd(
        r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"disk",
            "file":{"driver":"file","filename":"/var/lib/rsd/disk.qcow2"}}}"#,
    );
    assert_eq!(r["return"], serde_json::json!({}), "{r}");
    let r = q.cmd(
        r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"disk",
            "node-name":"disk","writable":true}}"#,
    );
    assert_eq!(r["return"], serde_json::json!({}), "{r}");

    // Write a pattern through NBD from the host, then read it back.
    let pattern = dir.path("pattern.raw");
    pattern_file(&pattern, 64 << 20);
    let uri = format!(
        "nbd+unix:///disk?socket={}",
        run_dir.join("nbd.sock").display()
    );
    let pattern_s = pattern.display().to_string();
    ok(&run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &pattern_s, &uri],
    ));
    ok(&run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &pattern_s, &uri],
    ));

    // podman stop sends SIGTERM to PID 1 and kills it after 10 s.
    let started = Instant::now();
    ok(&podman(&["stop", &name]));
    let took = started.elapsed();
    let logs = text(&podman(&["logs", &name]));
    assert_eq!(
        inspect(&name, "{{.State.ExitCode}}"),
        "0",
        "rsd exits 0 on SIGTERM; its output:\n{logs}"
    );
    assert!(took < Duration::from_secs(9), "stopped in {took:?}: {logs}");
    let events = events_to_eof(&mut q);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "BLOCK_EXPORT_DELETED" && e["data"]["id"] == "disk"),
        "the export was stopped before the monitor: {events:?}"
    );
    for sock in ["qmp.sock", "nbd.sock"] {
        assert!(
            !run_dir.join(sock).exists(),
            "{sock} is removed at exit: {logs}"
        );
    }

    // The data reached the image file on the host, which is consistent.
    let disk = dir.s("images/disk.qcow2");
    ok(&run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &pattern_s, &disk],
    ));
    ok(&run("qemu-img", &["check", "-q", &disk]));
}

/// What the monitor still sends as the daemon stops: events only, then
/// the end of the session.
fn events_to_eof(q: &mut Qmp) -> Vec<serde_json::Value> {
    let mut events = vec![];
    loop {
        let l = q.line();
        if l.is_empty() {
            return events;
        }
        let v: serde_json::Value = serde_json::from_str(&l).expect("JSON");
        assert!(v.get("event").is_some(), "only events after a stop: {l}");
        events.push(v);
    }
}

/// A free TCP port on the host (the pod uses the host's network).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// HTTP GET on 127.0.0.1:port: the status, None if nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: rsd\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split(' ').nth(1)?.parse().ok()
}

/// The example manifest with this test's names, directories and port.
/// podman 4.3 plays Pods and Deployments, not DaemonSets: the manifest
/// keeps to the fields a DaemonSet and a Deployment share, so its kind
/// is the one change that makes it playable.
fn playable_manifest(pod: &str, run_dir: &Path, images: &Path, port: u16) -> String {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/rsd-daemonset.yaml"
    ))
    .expect("manifest");
    let mut out = String::new();
    for line in manifest.lines() {
        let indent = &line[..line.len() - line.trim_start().len()];
        let line = match line.trim() {
            "kind: DaemonSet" => "kind: Deployment".to_string(),
            "name: rsd" if indent.len() == 2 => format!("{indent}name: {pod}"),
            "path: /run/rsd" => format!("{indent}path: {}", run_dir.display()),
            "path: /var/lib/rsd" => format!("{indent}path: {}", images.display()),
            t if t.starts_with("image: ") => format!("{indent}image: {IMAGE}"),
            _ => line.replace("9850", &port.to_string()),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The httpGet probes of a manifest: (probe, path, port), in order.
fn http_probes(manifest: &str) -> Vec<(String, String, u16)> {
    let mut probes: Vec<(String, String, u16)> = vec![];
    for line in manifest.lines().map(str::trim) {
        if let Some(name) = line.strip_suffix("Probe:") {
            probes.push((format!("{name}Probe"), String::new(), 0));
        } else if let Some(last) = probes.last_mut() {
            if let Some(path) = line.strip_prefix("path: ").filter(|_| last.1.is_empty()) {
                last.1 = path.to_string();
            } else if let Some(port) = line.strip_prefix("port: ").filter(|_| last.2 == 0) {
                last.2 = port.parse().expect("probe port");
            }
        }
    }
    probes
}

#[test]
fn kube_play_of_the_manifest_passes_its_probes() {
    if !podman_usable() {
        return;
    }
    image();
    let dir = TempDir::new();
    let run_dir = dir.path("run");
    let images = dir.path("images");
    let port = free_port();
    let pod = unique("kube");
    let manifest = playable_manifest(&pod, &run_dir, &images, port);
    assert!(manifest.contains("kind: Deployment"), "{manifest}");
    assert!(manifest.contains(&format!("path: {}", run_dir.display())));
    let file = dir.path("rsd.yaml");
    std::fs::write(&file, &manifest).expect("write manifest");
    let file_s = file.display().to_string();

    /// `podman kube down` whatever the outcome.
    struct Down<'a>(&'a str);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = podman(&["kube", "down", self.0]);
        }
    }
    // podman's default limit on open files (1048576) is above the hard
    // limit here, which `podman run` overrides with --ulimit; kube play
    // takes it from containers.conf.
    let conf = dir.path("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\n",
    )
    .expect("containers.conf");
    let played = Command::new("podman")
        .args(RUNC)
        .args(["kube", "play", &file_s])
        .env("CONTAINERS_CONF", &conf)
        .output()
        .expect("podman");
    let _down = Down(&file_s);
    assert!(played.status.success(), "{}\n{manifest}", text(&played));
    let pod_name = format!("{pod}-pod-0");
    let container = format!("{pod_name}-rsd");

    // The manifest's probes, called as the kubelet calls them (podman
    // turns the liveness probe into a curl inside the container, which
    // an image without curl cannot run).
    let probes = http_probes(&manifest);
    let names: Vec<&str> = probes.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["livenessProbe", "readinessProbe"], "{manifest}");
    for (probe, path, probe_port) in &probes {
        assert_eq!(*probe_port, port, "{probe} asks the metrics port");
        let until = Instant::now() + Duration::from_secs(60);
        while http_status(port, path) != Some(200) {
            assert!(
                Instant::now() < until,
                "{probe} on {path} never passed; pod logs:\n{}",
                text(&podman(&["logs", &container]))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(
        probes.iter().map(|p| p.1.as_str()).collect::<Vec<_>>(),
        ["/healthz", "/readyz"]
    );
    // Prometheus finds the same port through the annotations.
    assert!(manifest.contains(&format!("prometheus.io/port: \"{port}\"")));
    assert!(manifest.contains("prometheus.io/path: /metrics"));
    assert_eq!(http_status(port, "/metrics"), Some(200));
    // The hostPath directories hold the sockets a controller uses.
    let mut q = Qmp::ready(&run_dir.join("qmp.sock"));
    let r = q.cmd(r#"{"execute":"query-block-exports"}"#);
    assert_eq!(r["return"], serde_json::json!([]), "{r}");
    assert!(run_dir.join("nbd.sock").exists());
    assert!(images.is_dir(), "hostPath DirectoryOrCreate made it");
    guide_volume_lifecycle(&mut q, &run_dir, &images);

    // As the kubelet stops a pod: SIGTERM, then a grace period. (podman
    // 4.3's `kube down` gives none: rsd is killed and its sockets stay.)
    ok(&podman(&["pod", "stop", &pod_name]));
    let logs = text(&podman(&["logs", &container]));
    assert_eq!(
        inspect(&container, "{{.State.ExitCode}}"),
        "0",
        "rsd exits 0 on SIGTERM; its output:\n{logs}"
    );
    events_to_eof(&mut q);
    for sock in ["qmp.sock", "nbd.sock"] {
        assert!(!run_dir.join(sock).exists(), "{sock} is removed at exit");
    }
    assert_eq!(http_status(port, "/healthz"), None, "nothing listens after");
    let down = podman(&["kube", "down", &file_s]);
    assert!(down.status.success(), "{}", text(&down));
}

/// A QMP connection that keeps the events it reads.
struct Controller<'a> {
    q: &'a mut Qmp,
    events: Vec<serde_json::Value>,
}

impl Controller<'_> {
    /// Sends a command: its return value or its error. Events read on
    /// the way are kept.
    fn call(&mut self, text: &str) -> Result<serde_json::Value, serde_json::Value> {
        self.q.send(text.as_bytes());
        loop {
            let l = self.q.line();
            assert!(!l.is_empty(), "EOF waiting for reply to {text}");
            let v: serde_json::Value = serde_json::from_str(&l).expect("reply is JSON");
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            } else {
                return Err(v);
            }
        }
    }
    /// A command that must succeed.
    fn ok(&mut self, text: &str) -> serde_json::Value {
        self.call(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }
    /// Waits (60 s at most) for an event whose data holds `field: value`.
    fn event(&mut self, name: &str, field: &str, value: &str) {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["event"] == name && e["data"][field] == value)
            {
                self.events.drain(..=i);
                return;
            }
            assert!(Instant::now() < until, "no {name} {field}={value}");
            let l = self.q.line();
            assert!(!l.is_empty(), "EOF waiting for {name}");
            self.events
                .push(serde_json::from_str(&l).expect("event is JSON"));
        }
    }
    /// Runs blockdev-create and dismisses its job (docs/kubernetes.md).
    fn create(&mut self, options: &str) {
        self.ok(&format!(
            r#"{{"execute":"blockdev-create","arguments":{{"job-id":"create-pvc-1","options":{options}}}}}"#
        ));
        self.event("JOB_STATUS_CHANGE", "status", "concluded");
        let jobs = self.ok(r#"{"execute":"query-jobs"}"#);
        assert!(jobs[0].get("error").is_none(), "{jobs}");
        self.ok(r#"{"execute":"job-dismiss","arguments":{"id":"create-pvc-1"}}"#);
    }
}

/// docs/kubernetes.md's create, export and delete steps, as written there.
fn guide_volume_lifecycle(q: &mut Qmp, run_dir: &Path, images: &Path) {
    let mut c = Controller { q, events: vec![] };
    c.create(r#"{"driver":"file","filename":"/var/lib/rsd/pvc-1.qcow2","size":0}"#);
    c.ok(r#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"pvc-1-file","filename":"/var/lib/rsd/pvc-1.qcow2"}}"#);
    c.create(r#"{"driver":"qcow2","file":"pvc-1-file","size":10737418240}"#);
    c.ok(r#"{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"pvc-1","file":"pvc-1-file"}}"#);
    c.ok(r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"pvc-1","node-name":"pvc-1","writable":true}}"#);

    let uri = format!(
        "nbd+unix:///pvc-1?socket={}",
        run_dir.join("nbd.sock").display()
    );
    let info = ok(&run("qemu-img", &["info", "-f", "raw", &uri]));
    assert!(info.contains("virtual size: 10 GiB"), "{info}");

    // qemu-img has gone, but rsd may not have seen its connection close
    // yet: "still in use" until it has (docs/kubernetes.md).
    let until = Instant::now() + Duration::from_secs(30);
    while let Err(e) = c.call(r#"{"execute":"block-export-del","arguments":{"id":"pvc-1"}}"#) {
        assert!(
            Instant::now() < until && e.to_string().contains("still in use"),
            "{e}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.event("BLOCK_EXPORT_DELETED", "id", "pvc-1");
    c.ok(r#"{"execute":"blockdev-del","arguments":{"node-name":"pvc-1"}}"#);
    c.ok(r#"{"execute":"blockdev-del","arguments":{"node-name":"pvc-1-file"}}"#);
    let nodes = c.ok(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#);
    assert_eq!(nodes, serde_json::json!([]));
    // The image stays on the host for the controller to remove.
    let image = images.join("pvc-1.qcow2").display().to_string();
    ok(&run("qemu-img", &["check", "-q", &image]));
}
