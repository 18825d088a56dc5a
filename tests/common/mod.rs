//! Test harness: start rsd or qemu-storage-daemon, talk raw QMP over a
//! socket, and normalize what legitimately differs between the two.
#![allow(dead_code)]

pub mod nbd_wire;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const QSD: &str = "/usr/bin/qemu-storage-daemon";

pub fn rsd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rsd")
}

/// Which daemon a scenario runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Rsd,
    Qsd,
}

impl Which {
    pub fn bin(self) -> &'static str {
        match self {
            Which::Rsd => rsd_bin(),
            Which::Qsd => QSD,
        }
    }
    pub fn prog(self) -> &'static str {
        match self {
            Which::Rsd => "rsd",
            Which::Qsd => "qemu-storage-daemon",
        }
    }
    /// Both, or only rsd when QSD is not installed (printed, not silent).
    pub fn all() -> Vec<Which> {
        if Path::new(QSD).exists() {
            vec![Which::Rsd, Which::Qsd]
        } else {
            eprintln!("note: {QSD} missing; comparing against rsd only");
            vec![Which::Rsd]
        }
    }
}

/// A short temporary directory (UNIX socket paths are limited to 107 bytes).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = PathBuf::from(format!(
            "/tmp/rsdt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running daemon, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub which: Which,
}

impl Daemon {
    pub fn spawn(which: Which, args: &[String]) -> Daemon {
        Daemon::spawn_env(which, args, &[])
    }
    pub fn spawn_env(which: Which, args: &[String], env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(which.bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if env.iter().any(|(k, _)| *k == "RSD_TEST_HOOKS") {
            // A daemon made to panic on purpose: a backtrace for each
            // panic (RUST_BACKTRACE=1 in a developer's shell) holds a
            // worker thread for a long while in a debug build.
            cmd.env("RUST_BACKTRACE", "0");
        }
        let child = cmd.spawn().expect("spawn daemon");
        Daemon { child, which }
    }
    /// Waits for exit up to `secs`; returns the exit code.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    pub fn signal(&self, sig: i32) {
        unsafe_kill(self.child.id() as i32, sig);
    }
    pub fn stderr_text(&mut self) -> String {
        let mut s = String::new();
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn unsafe_kill(pid: i32, sig: i32) {
    if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

pub fn wait_for_path(p: &Path, secs: u64) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Runs a daemon binary to completion with a timeout (for CLI errors).
pub fn run_to_end(which: Which, args: &[&str], secs: u64) -> Output {
    let out = Command::new("timeout")
        .arg(secs.to_string())
        .arg(which.bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run daemon");
    out
}

/// Raw QMP client on a UNIX socket: lines end in CRLF.
pub struct Qmp {
    pub reader: BufReader<UnixStream>,
    pub stream: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        assert!(
            wait_for_path(path, 10),
            "socket {} never appeared",
            path.display()
        );
        let mut last = None;
        for _ in 0..200 {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    let reader = BufReader::new(s.try_clone().expect("clone"));
                    return Qmp { reader, stream: s };
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("connect {}: {last:?}", path.display());
    }
    /// Connects, reads the greeting and negotiates.
    pub fn ready(path: &Path) -> Qmp {
        let mut q = Qmp::connect(path);
        q.line();
        q.send(br#"{"execute": "qmp_capabilities"}"#);
        let mut reply = q.line();
        // QSD 10.0.2 greets twice, now and then, a client that connects
        // while it starts (seen under CI load); the transcript tests,
        // which read the greeting themselves, still catch it in rsd.
        if reply.starts_with("{\"QMP\"") {
            reply = q.line();
        }
        assert_eq!(reply, "{\"return\": {}}\r\n");
        q
    }
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }
    /// One raw line including its CRLF ("" at EOF).
    pub fn line(&mut self) -> String {
        let mut s = String::new();
        let _ = self.reader.read_line(&mut s);
        s
    }
    /// One complete message in pretty mode (lines until a top-level `}`).
    pub fn pretty_message(&mut self) -> String {
        let mut all = String::new();
        loop {
            let l = self.line();
            if l.is_empty() {
                return all;
            }
            all.push_str(&l);
            if l == "}\r\n" {
                return all;
            }
        }
    }
    /// Sends a command and returns the parsed reply, skipping events.
    pub fn cmd(&mut self, text: &str) -> serde_json::Value {
        self.send(text.as_bytes());
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "EOF waiting for reply to {text}");
            let v: serde_json::Value = serde_json::from_str(&l).expect("reply is JSON");
            if v.get("event").is_none() {
                return v;
            }
        }
    }
    /// Set a read timeout; returns whether anything arrived within it.
    pub fn readable_within(&mut self, ms: u64) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .expect("timeout");
        let r = !self.reader.fill_buf().map(|b| b.is_empty()).unwrap_or(true);
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        r
    }
}

/// The standard monitor command line of the reference probes.
pub fn monitor_args(sock: &str) -> Vec<String> {
    vec![
        "--chardev".into(),
        format!("socket,path={sock},server=on,wait=off,id=mon0"),
        "--monitor".into(),
        "chardev=mon0".into(),
    ]
}

/// Replaces what may differ between rsd and QSD in a reply line: the
/// greeting/query-version `package` string and the version micro number.
pub fn normalize(line: &str) -> String {
    let mut v: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(_) => return line.to_string(),
    };
    for ver in [v.pointer_mut("/QMP/version")].into_iter().flatten() {
        ver["package"] = "PKG".into();
    }
    if let Some(r) = v.get_mut("return") {
        if r.get("package").is_some() && r.get("qemu").is_some() {
            r["package"] = "PKG".into();
        }
    }
    v.to_string()
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A raw image made by qemu-img.
pub fn qemu_img_create(path: &Path, size: &str) {
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(size)
        .status()
        .expect("qemu-img");
    assert!(st.success());
}

/// An image of `fmt` made by qemu-img, its first `filled` bytes (a
/// qemu-io length such as "4M"; None: none) written with `pattern`.
pub fn make_image(path: &str, fmt: &str, size: &str, fill: Option<(u8, &str)>) {
    ok(&run("qemu-img", &["create", "-q", "-f", fmt, path, size]));
    if let Some((pattern, filled)) = fill {
        let cmd = format!("write -q -P {pattern:#x} 0 {filled}");
        ok(&run("qemu-io", &["-f", fmt, "-c", &cmd, path]));
    }
}

/// Masks what legitimately differs between runs: the temp dir, the
/// random digits of automatic node names, and host allocation
/// ("actual-size", which depends on where the filesystem puts blocks).
pub fn mask(line: &str, dir: &TempDir) -> String {
    let line = line.replace(&dir.0.display().to_string(), "$D");
    let line = mask_digits_after(&line, "#block");
    mask_digits_after(&line, "\"actual-size\": ")
}

/// Replaces the digits after each `key` with N.
pub fn mask_digits_after(line: &str, key: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(p) = rest.find(key) {
        out.push_str(&rest[..p + key.len()]);
        rest = &rest[p + key.len()..];
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        out.push('N');
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

/// Runs a daemon with `extra` options in a fresh dir prepared by
/// `setup`, sends each request (`$D` = the dir) and returns the masked
/// replies, or the masked start-up error.
pub fn scenario(
    which: Which,
    setup: &dyn Fn(&TempDir),
    extra: &[&str],
    steps: &[&str],
) -> Result<Vec<String>, String> {
    let dir = TempDir::new();
    setup(&dir);
    let d = dir.0.display().to_string();
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(extra.iter().map(|s| s.replace("$D", &d)));
    a.extend(args(&["--pidfile", &dir.s("p.pid")]));
    let mut daemon = Daemon::spawn(which, &a);
    for _ in 0..500 {
        if dir.path("p.pid").exists() {
            break;
        }
        if let Some(code) = daemon.wait_exit(0) {
            let err = daemon.stderr_text();
            let err = err.strip_prefix(which.prog()).unwrap_or(&err).to_string();
            return Err(format!("exit {code}: {}", mask(&err, &dir)));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut q = Qmp::ready(&dir.path("q.sock"));
    let mut out = Vec::new();
    for s in steps {
        q.send(s.replace("$D", &d).as_bytes());
        let l = q.line();
        assert!(!l.is_empty(), "{which:?}: EOF after {s}");
        out.push(mask(&l, &dir));
    }
    q.send(br#"{"execute": "quit"}"#);
    Ok(out)
}

/// The same scenario on rsd and QSD: the replies must be identical.
pub fn same_on_both(
    setup: &dyn Fn(&TempDir),
    extra: &[&str],
    steps: &[&str],
) -> Result<Vec<String>, String> {
    let mut first: Option<Result<Vec<String>, String>> = None;
    for which in Which::all() {
        let r = scenario(which, setup, extra, steps);
        match &first {
            None => first = Some(r),
            Some(f) => {
                if let (Ok(a), Ok(b)) = (f, &r) {
                    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                        if x != y {
                            // Where they part, with some context.
                            let at = x.bytes().zip(y.bytes()).take_while(|(p, q)| p == q).count();
                            let from = at.saturating_sub(200);
                            let ctx = |t: &str| {
                                t.get(from..(at + 200).min(t.len()))
                                    .unwrap_or(t)
                                    .to_string()
                            };
                            panic!(
                                "step {i} ({}) differs at byte {at}, extra {extra:?}\n rsd: ...{}\n qsd: ...{}",
                                steps[i],
                                ctx(x),
                                ctx(y)
                            );
                        }
                    }
                }
                assert_eq!(f, &r, "extra {extra:?}");
            }
        }
    }
    first.unwrap_or_else(|| Err("no daemon".into()))
}

/// Runs a tool to its end.
pub fn run(cmd: &str, argv: &[&str]) -> Output {
    Command::new(cmd).args(argv).output().expect(cmd)
}

/// The tool's stdout; fails the test (showing both outputs) unless it
/// succeeded.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The daemon's user+system CPU time so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("comm")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // Linux reports these in USER_HZ, 100 per second.
    Duration::from_millis(ticks * 10)
}

/// Polls query-jobs until no job is left (at most 60 s).
pub fn wait_no_jobs(q: &mut Qmp) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let r = q.cmd(r#"{"execute":"query-jobs"}"#);
        if r["return"].as_array().is_some_and(|a| a.is_empty()) {
            return;
        }
        assert!(Instant::now() < until, "jobs never ended: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls query-block-jobs until the first block job is ready (60 s).
pub fn wait_ready(q: &mut Qmp) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let r = q.cmd(r#"{"execute":"query-block-jobs"}"#);
        if r["return"][0]["ready"] == true {
            return;
        }
        assert!(Instant::now() < until, "never ready: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
