//! Supervised recovery (issue 22 item 3): each actor kind is crashed
//! with the test hooks while clients do verified I/O. The crashed part
//! is restarted (or removed) as its policy says, the others do not
//! notice, nothing acknowledged is lost, and failing more often than
//! the restart intensity allows escalates as documented, never hangs.
//! docs/reliability.md has the table of kinds.
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::nbd_wire::Nbd;
use crate::common::*;
use crate::vhost_user::{Guest, T_FLUSH, T_IN, T_OUT};

/// The longest a client of another export may wait for one request
/// while something else is crashed and restarted.
const MAX_GAP: Duration = Duration::from_secs(1);

/// The data written at `seed`: 8-byte words that name the seed and
/// their place, so a block from another write or offset is caught.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| (seed << 32 | i as u64).to_le_bytes())
        .collect()
}

/// What a client doing verified I/O saw.
#[derive(Default)]
struct Report {
    ops: u64,
    errors: Vec<String>,
    /// The longest time between two requests' completions.
    max_gap: Duration,
    /// Per block, the seed of the last acknowledged write.
    acked: Vec<Option<u64>>,
}

/// A client on one NBD export writing a pattern to a block, reading it
/// back and comparing, block after block, flushing now and then, until
/// stopped.
struct Verifier {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    thread: Option<JoinHandle<Report>>,
}

impl Verifier {
    fn start(sock: &Path, export: &str, block: usize, blocks: usize, seed0: u64) -> Verifier {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let (sock, export) = (sock.to_path_buf(), export.to_string());
        let (stop2, ops2) = (stop.clone(), ops.clone());
        let thread = std::thread::spawn(move || {
            let mut r = Report {
                acked: vec![None; blocks],
                ..Report::default()
            };
            // Errors are recorded, not panicked on; 10 s is the longest a
            // request may take.
            let c = Nbd::connect(&sock, &export)
                .and_then(|c| c.set_timeout(Duration::from_secs(10)).map(|()| c));
            let mut c = match c {
                Ok(c) => c,
                Err(e) => {
                    r.errors.push(format!("connect: {e}"));
                    return r;
                }
            };
            let mut last = Instant::now();
            let mut i = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let b = (i % blocks as u64) as usize;
                let seed = seed0 + i;
                let off = (b * block) as u64;
                let data = pattern(seed, block);
                let step = c.write(off, &data).and_then(|()| {
                    r.acked[b] = Some(seed);
                    let back = c.read(off, block as u32)?;
                    if back != data {
                        return Err(std::io::Error::other(format!(
                            "block {b} read back wrong after write {seed}"
                        )));
                    }
                    if i % 16 == 15 {
                        c.flush()?;
                    }
                    Ok(())
                });
                if let Err(e) = step {
                    r.errors.push(e.to_string());
                    break;
                }
                r.max_gap = r.max_gap.max(last.elapsed());
                last = Instant::now();
                r.ops += 1;
                ops2.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            r
        });
        Verifier {
            stop,
            ops,
            thread: Some(thread),
        }
    }

    /// Waits until the client has done `n` more requests (at most 10 s).
    fn advances(&mut self, n: u64, what: &str) {
        let from = self.ops.load(Ordering::Relaxed);
        let end = Instant::now() + Duration::from_secs(10);
        while self.ops.load(Ordering::Relaxed) < from + n {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                let r = self.thread.take().map(|t| t.join().expect("client"));
                panic!("{what}: the client stopped: {:?}", r.map(|r| r.errors));
            }
            assert!(Instant::now() < end, "{what}: the client made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().expect("running");
        t.join().expect("client thread")
    }
}

/// Checks that every acknowledged write of `r` is in the raw bytes.
fn acked_writes_in(raw: &[u8], r: &Report, block: usize, what: &str) {
    for (b, seed) in r.acked.iter().enumerate() {
        if let Some(seed) = seed {
            let at = &raw[b * block..(b + 1) * block];
            assert!(
                at == pattern(*seed, block).as_slice(),
                "{what}: block {b} lost acknowledged write {seed}"
            );
        }
    }
}

/// The guest-visible bytes of an image after the daemon has exited.
fn image_bytes(dir: &TempDir, img: &str, fmt: &str) -> Vec<u8> {
    if fmt == "qcow2" {
        let out = run("qemu-img", &["check", &dir.s(img)]);
        let text = ok(&out);
        assert!(text.contains("No errors were found"), "{img}: {text}");
    }
    let raw = dir.s(&format!("{img}.raw"));
    ok(&run(
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", &dir.s(img), &raw],
    ));
    std::fs::read(&raw).expect("converted image")
}

/// The daemon's stderr as it comes, read by a thread of its own.
struct Stderr(Arc<std::sync::Mutex<String>>, Option<JoinHandle<()>>);

impl Stderr {
    fn of(d: &mut Daemon) -> Stderr {
        let mut err = d.child.stderr.take().expect("stderr");
        let text = Arc::new(std::sync::Mutex::new(String::new()));
        let t2 = text.clone();
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = err.read(&mut b) {
                if n == 0 {
                    break;
                }
                if let Ok(mut t) = t2.lock() {
                    t.push_str(&String::from_utf8_lossy(&b[..n]));
                }
            }
        });
        Stderr(text, Some(reader))
    }
    /// All of it, once the daemon has exited.
    fn all(mut self) -> String {
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
        self.text()
    }
    fn text(&self) -> String {
        self.0.lock().map(|t| t.clone()).unwrap_or_default()
    }
    fn has(&self, s: &str) -> bool {
        self.text().contains(s)
    }
}

fn crash(q: &mut Qmp, id: &str) {
    let r = q.cmd(&format!(
        r#"{{"execute":"x-rsd-test-crash","arguments":{{"id":"{id}"}}}}"#
    ));
    assert_eq!(r, json!({"return": {}}), "crash {id}");
}

/// Polls `f` every 20 ms until it returns Some, at most `secs`.
fn poll<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 4 KiB-aligned memory for O_DIRECT.
struct Aligned {
    p: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: a non-zero size; freed in drop with the same layout.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null(), "alloc");
        Aligned { p, layout }
    }
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: p points to layout.size() bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.p, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in new with this layout.
        unsafe { std::alloc::dealloc(self.p, self.layout) };
    }
}

fn fuse_usable() -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing".into());
    }
    if !nix::unistd::geteuid().is_root() && run("which", &["fusermount3"]).status.code() != Some(0)
    {
        return Err("neither root nor fusermount3".into());
    }
    Ok(())
}

/// Detaches a FUSE mount a failed test left behind (a killed daemon
/// leaves its mount in place).
struct Unmount(String);

impl Drop for Unmount {
    fn drop(&mut self) {
        if mounted(&self.0) {
            let _ = nix::mount::umount2(self.0.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(path))
}

/// A FUSE client: O_DIRECT reads and writes of 64 KiB blocks on the
/// exported file, so each reaches the daemon.
fn fuse_write(f: &File, off: u64, seed: u64) {
    let mut b = Aligned::new(64 << 10);
    b.buf().copy_from_slice(&pattern(seed, 64 << 10));
    f.write_all_at(b.buf(), off).expect("FUSE write");
}

fn fuse_read_is(f: &File, off: u64, seed: u64) -> bool {
    let mut b = Aligned::new(64 << 10);
    f.read_exact_at(b.buf(), off).expect("FUSE read");
    b.buf() == pattern(seed, 64 << 10).as_slice()
}

fn open_direct(path: &str) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .expect("open the FUSE export")
}

/// vhost-user-blk: writes 64 KiB at `sector` and reads it back.
fn vu_write_read(g: &mut Guest, sector: u64, seed: u64) {
    let data = pattern(seed, 64 << 10);
    let w = g.req(T_OUT, sector, &[&data], &[]);
    let f = g.req(T_FLUSH, 0, &[], &[]);
    let got = g.submit(0, vec![w, f]);
    assert!(got.iter().all(|a| a.status == Some(0)), "vhost-user write");
    assert!(vu_read_is(g, sector, seed), "vhost-user read back");
}

fn vu_read_is(g: &mut Guest, sector: u64, seed: u64) -> bool {
    let r = g.req(T_IN, sector, &[], &[64 << 10]);
    let got = g.submit(0, vec![r]);
    got[0].status == Some(0) && got[0].data == pattern(seed, 64 << 10)
}

fn http_get(sock: &Path, path: &str) -> Option<u16> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: rsd\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split(' ').nth(1)?.parse().ok()
}

fn node_drivers(q: &mut Qmp) -> Vec<String> {
    q.cmd(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#)["return"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["drv"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn export_ids(q: &mut Qmp) -> Vec<String> {
    let mut ids: Vec<String> = q.cmd(r#"{"execute":"query-block-exports"}"#)["return"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    ids
}

/// The images of the big daemon, their nodes and exports on its
/// command line.
fn recovery_daemon(dir: &TempDir, fuse: bool) -> Vec<String> {
    let mk = |name: &str, fmt: &str, size: &str, backing: Option<&str>| {
        let mut a = vec!["create", "-q", "-f", fmt];
        let b;
        if let Some(back) = backing {
            b = dir.s(back);
            a.extend(["-b", &b, "-F", "qcow2"]);
        }
        let p = dir.s(name);
        a.extend([p.as_str(), size]);
        ok(&run("qemu-img", &a));
    };
    for (name, fmt) in [("bg.qcow2", "qcow2"), ("e2.qcow2", "qcow2")] {
        mk(name, fmt, "16M", None);
    }
    for name in ["vu.raw", "fu.raw", "t.raw", "spare.raw"] {
        mk(name, "raw", "4M", None);
    }
    for name in [
        "ms.qcow2", "mt.qcow2", "bs.qcow2", "bt.qcow2", "sb.qcow2", "cb.qcow2",
    ] {
        mk(name, "qcow2", "4M", None);
    }
    mk("st.qcow2", "qcow2", "4M", Some("sb.qcow2"));
    mk("cm.qcow2", "qcow2", "4M", Some("cb.qcow2"));
    mk("ct.qcow2", "qcow2", "4M", Some("cm.qcow2"));
    for (img, p) in [
        ("ms.qcow2", 1),
        ("bs.qcow2", 2),
        ("sb.qcow2", 3),
        ("cm.qcow2", 4),
    ] {
        let cmd = format!("write -P {p} 0 4M");
        ok(&run("qemu-io", &["-f", "qcow2", "-c", &cmd, &dir.s(img)]));
    }
    std::fs::write(dir.path("fu.mnt"), b"").expect("mountpoint");
    let qcow2 = |node: &str, img: &str| {
        format!(
            "driver=qcow2,node-name={node},file.driver=file,file.filename={}",
            dir.s(img)
        )
    };
    let file =
        |node: &str, img: &str| format!("driver=file,node-name={node},filename={}", dir.s(img));
    let mut a = args(&[
        "--chardev",
        &format!("socket,path={},server=on,wait=off,id=c1", dir.s("a.sock")),
        "--monitor",
        "chardev=c1",
        "--chardev",
        &format!("socket,path={},server=on,wait=off,id=c2", dir.s("b.sock")),
        "--monitor",
        "chardev=c2",
        "--object",
        "throttle-group,id=tg,x-iops-total=50",
        "--blockdev",
        &qcow2("bg", "bg.qcow2"),
        "--blockdev",
        &qcow2("n2", "e2.qcow2"),
        "--blockdev",
        &file("vn", "vu.raw"),
        "--blockdev",
        &file("fn", "fu.raw"),
        "--blockdev",
        &file("tf", "t.raw"),
        "--blockdev",
        "driver=throttle,node-name=thr,throttle-group=tg,file=tf",
        "--blockdev",
        &file("spare", "spare.raw"),
        "--blockdev",
        &qcow2("ms", "ms.qcow2"),
        "--blockdev",
        &qcow2("mt", "mt.qcow2"),
        "--blockdev",
        &qcow2("bs", "bs.qcow2"),
        "--blockdev",
        &qcow2("bt", "bt.qcow2"),
        "--blockdev",
        &file("sbf", "sb.qcow2"),
        "--blockdev",
        "driver=qcow2,node-name=sb,file=sbf",
        "--blockdev",
        &file("stf", "st.qcow2"),
        "--blockdev",
        "driver=qcow2,node-name=st,file=stf,backing=sb",
        "--blockdev",
        &file("cbf", "cb.qcow2"),
        "--blockdev",
        "driver=qcow2,node-name=cb,file=cbf",
        "--blockdev",
        &file("cmf", "cm.qcow2"),
        "--blockdev",
        "driver=qcow2,node-name=cm,file=cmf,backing=cb",
        "--blockdev",
        &file("ctf", "ct.qcow2"),
        "--blockdev",
        "driver=qcow2,node-name=ct,file=ctf,backing=cm",
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("nbd.sock")),
        "--export",
        "type=nbd,id=bg,node-name=bg,writable=on",
        "--export",
        "type=nbd,id=e2,node-name=n2,name=e2,writable=on",
        "--export",
        "type=nbd,id=te,node-name=thr,name=te,writable=on",
        "--export",
        &format!(
            "type=vhost-user-blk,id=vu,node-name=vn,writable=on,addr.type=unix,addr.path={}",
            dir.s("vu.sock")
        ),
        "--metrics-server",
        &format!("addr.type=unix,addr.path={}", dir.s("metrics.sock")),
    ]);
    if fuse {
        a.extend(args(&[
            "--export",
            &format!(
                "type=fuse,id=fu,node-name=fn,writable=on,mountpoint={}",
                dir.s("fu.mnt")
            ),
        ]));
    }
    a
}

/// The job of `id` once concluded.
fn concluded(q: &mut Qmp, id: &str) -> Value {
    poll(20, &format!("job {id} concluded"), || {
        let r = q.cmd(r#"{"execute":"query-jobs"}"#);
        r["return"]
            .as_array()
            .and_then(|l| l.iter().find(|j| j["id"] == id).cloned())
            .filter(|j| j["status"] == "concluded")
    })
}

/// One daemon with every actor kind: NBD exports on qcow2 (one carries
/// the background client), vhost-user-blk, FUSE, a throttled NBD export
/// with its own client, a mirror, a backup, a stream and a commit job,
/// two monitors and the metrics server. Each kind is crashed in turn;
/// the background client must see no error and no gap over a second,
/// the crashed part must come back (or, for jobs, end as failed, with
/// the graph as before the job), its own clients must recover, and
/// every acknowledged write must be in the images after the daemon has
/// quit.
#[test]
fn every_actor_kind_recovers_under_io() {
    let dir = TempDir::new();
    let fuse = match fuse_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("FUSE part skipped: {why}");
            false
        }
    };
    let a = recovery_daemon(&dir, fuse);
    let _unmount = Unmount(dir.s("fu.mnt"));
    let mut d = Daemon::spawn_env(Which::Rsd, &a, &[("RSD_TEST_HOOKS", "1")]);
    let stderr = Stderr::of(&mut d);
    let mut q = Qmp::ready(&dir.path("a.sock"));
    let nbd = dir.path("nbd.sock");
    let mut bg = Verifier::start(&nbd, "bg", 64 << 10, 32, 1 << 20);
    let mut te = Verifier::start(&nbd, "te", 4096, 16, 2 << 20);
    bg.advances(20, "start");
    te.advances(5, "start (throttled)");

    // The clients of the parts that will be crashed.
    let mut e2 = Nbd::connect(&nbd, "e2").expect("e2");
    e2.write(0, &pattern(1000, 64 << 10)).expect("e2 write");
    let mut g = Guest::connect(&dir.path("vu.sock"), 1);
    vu_write_read(&mut g, 0, 2000);
    let mp = dir.s("fu.mnt");
    let fu = fuse.then(|| {
        let f = open_direct(&mp);
        fuse_write(&f, 0, 3000);
        f
    });

    // The jobs: a ready mirror, and a backup, a stream and a commit held
    // back by their speed.
    for cmd in [
        r#"{"execute":"blockdev-mirror","arguments":{"job-id":"jm","device":"ms","target":"mt","sync":"full","auto-dismiss":false}}"#,
        r#"{"execute":"blockdev-backup","arguments":{"job-id":"jb","device":"bs","target":"bt","sync":"full","speed":8192,"auto-dismiss":false}}"#,
        r#"{"execute":"block-stream","arguments":{"job-id":"js","device":"st","speed":8192,"auto-dismiss":false}}"#,
        r#"{"execute":"block-commit","arguments":{"job-id":"jc","device":"ct","top-node":"cm","base-node":"cb","speed":8192,"auto-dismiss":false}}"#,
    ] {
        let r = q.cmd(cmd);
        assert_eq!(r, json!({"return": {}}), "{cmd}");
    }
    poll(30, "mirror ready", || {
        let r = q.cmd(r#"{"execute":"query-jobs"}"#);
        let l = r["return"].as_array().cloned().unwrap_or_default();
        l.iter()
            .any(|j| j["id"] == "jm" && j["status"] == "ready")
            .then_some(())
    });
    let r = q.cmd(r#"{"execute":"query-jobs"}"#);
    for id in ["jb", "js", "jc"] {
        let running = r["return"]
            .as_array()
            .is_some_and(|l| l.iter().any(|j| j["id"] == id && j["status"] == "running"));
        assert!(running, "{id}: {r}");
    }
    let drivers_before = {
        let mut d = node_drivers(&mut q);
        d.sort();
        d
    };

    // Monitor: its client is cut off; the next one is served.
    let mut b = Qmp::ready(&dir.path("b.sock"));
    crash(&mut q, "monitor/c2");
    assert_eq!(b.line(), "", "the crashed monitor's client is disconnected");
    let mut b = poll(10, "monitor/c2 back", || {
        let r = std::panic::catch_unwind(|| Qmp::ready(&dir.path("b.sock")));
        r.ok()
    });
    assert_eq!(
        b.cmd(r#"{"execute":"query-version"}"#)["return"]["qemu"]["major"],
        10
    );
    drop(b);
    bg.advances(5, "monitor");

    // Chardev: its socket serves its monitor again.
    crash(&mut q, "chardev/c2");
    let mut b = poll(10, "chardev/c2 back", || {
        std::panic::catch_unwind(|| Qmp::ready(&dir.path("b.sock"))).ok()
    });
    assert_eq!(
        b.cmd(r#"{"execute":"query-version"}"#)["return"]["qemu"]["major"],
        10
    );
    drop(b);
    bg.advances(5, "chardev");

    // Node: the node's exports do not notice, and a resize sent right
    // behind the crash (it reaches the failing actor's mailbox) waits for
    // the restarted actor instead of failing.
    crash(&mut q, "node/n2");
    q.send(
        br#"{"execute":"x-rsd-test-crash","arguments":{"id":"node/spare"}}{"execute":"block_resize","arguments":{"node-name":"spare","size":8388608}}"#,
    );
    for what in ["crash", "resize"] {
        let r: Value = serde_json::from_str(&q.line()).expect("reply");
        assert_eq!(r, json!({"return": {}}), "{what} of node/spare");
    }
    let r = q.cmd(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#);
    let spare = r["return"]
        .as_array()
        .and_then(|l| l.iter().find(|n| n["node-name"] == "spare").cloned())
        .unwrap_or_default();
    assert_eq!(spare["image"]["virtual-size"], 8 << 20, "{spare}");
    e2.write(64 << 10, &pattern(1001, 64 << 10))
        .expect("e2 after node crash");
    assert_eq!(
        e2.read(0, 64 << 10).expect("e2 read"),
        pattern(1000, 64 << 10)
    );
    bg.advances(5, "node");

    // NBD export: its connected client and a new one are served.
    crash(&mut q, "export/e2");
    e2.write(128 << 10, &pattern(1002, 64 << 10))
        .expect("e2 after export crash");
    let mut e2b = Nbd::connect(&nbd, "e2").expect("a new e2 client");
    assert_eq!(
        e2b.read(64 << 10, 64 << 10).expect("read"),
        pattern(1001, 64 << 10)
    );
    drop(e2b);
    bg.advances(5, "NBD export");

    // vhost-user-blk export: the frontend connected goes on, a new one
    // is served.
    crash(&mut q, "export/vu");
    assert!(
        vu_read_is(&mut g, 0, 2000),
        "vhost-user data after the crash"
    );
    vu_write_read(&mut g, 128, 2001);
    drop(g);
    let mut g = Guest::connect(&dir.path("vu.sock"), 1);
    assert!(vu_read_is(&mut g, 0, 2000) && vu_read_is(&mut g, 128, 2001));
    bg.advances(5, "vhost-user-blk export");

    // FUSE export: the same mount goes on serving (a new mount would
    // show the file below for a moment).
    if let Some(f) = &fu {
        let dev = std::fs::metadata(&mp).expect("stat").dev();
        crash(&mut q, "export/fu");
        poll(10, "export/fu restarted", || {
            stderr
                .has("export/fu failed and was restarted")
                .then_some(())
        });
        assert_eq!(
            std::fs::metadata(&mp).expect("stat").dev(),
            dev,
            "mounted anew"
        );
        assert!(fuse_read_is(f, 0, 3000), "FUSE data after the crash");
        fuse_write(f, 64 << 10, 3001);
        let f2 = open_direct(&mp);
        assert!(fuse_read_is(&f2, 0, 3000) && fuse_read_is(&f2, 64 << 10, 3001));
        bg.advances(5, "FUSE export");
    }

    // NBD server: connections go on; new clients are accepted.
    crash(&mut q, "nbd-server");
    e2.write(192 << 10, &pattern(1003, 64 << 10))
        .expect("e2 after server crash");
    let mut e2c = Nbd::connect(&nbd, "e2").expect("a client after the server crash");
    assert_eq!(
        e2c.read(128 << 10, 64 << 10).expect("read"),
        pattern(1002, 64 << 10)
    );
    e2.flush().expect("flush");
    drop(e2c);
    bg.advances(5, "NBD server");

    // Throttle group (not an actor): its timer fails under the group's
    // lock; throttled requests still go, the limits are unchanged.
    crash(&mut q, "throttle-group/tg");
    te.advances(10, "throttle group");
    let r = q.cmd(r#"{"execute":"qom-get","arguments":{"path":"tg","property":"limits"}}"#);
    assert_eq!(r["return"]["iops-total"], 50, "{r}");
    bg.advances(5, "throttle group");

    // Jobs: temporary, so a crashed job is a failed job, never run
    // again; the graph is as it was before each job.
    for id in ["jm", "jb", "js", "jc"] {
        crash(&mut q, &format!("job/{id}"));
        let j = concluded(&mut q, id);
        assert!(
            j["error"]
                .as_str()
                .unwrap_or_default()
                .contains("job crash requested"),
            "{id}: {j}"
        );
        let r = q.cmd(&format!(
            r#"{{"execute":"job-dismiss","arguments":{{"id":"{id}"}}}}"#
        ));
        assert_eq!(r, json!({"return": {}}), "{id}");
    }
    let mut drivers = node_drivers(&mut q);
    drivers.sort();
    for filter in ["mirror_top", "copy-before-write", "commit_top"] {
        assert!(
            !drivers.iter().any(|d| d == filter),
            "{filter} left: {drivers:?}"
        );
    }
    assert!(
        drivers.len() < drivers_before.len(),
        "{drivers_before:?} -> {drivers:?}"
    );
    bg.advances(5, "jobs");

    // Metrics server: serves again on the same socket.
    crash(&mut q, "metrics-server");
    poll(10, "metrics served again", || {
        (http_get(&dir.path("metrics.sock"), "/metrics") == Some(200)).then_some(())
    });
    bg.advances(5, "metrics server");

    // Every export is still there; the clients saw nothing.
    let mut want = vec!["bg", "e2", "te", "vu"];
    if fuse {
        want.push("fu");
    }
    want.sort();
    assert_eq!(export_ids(&mut q), want);
    let bg = bg.finish();
    let te = te.finish();
    for (what, r) in [("bg", &bg), ("te", &te)] {
        assert!(r.errors.is_empty(), "{what}: {:?}", r.errors);
        eprintln!("{what}: {} requests, longest gap {:?}", r.ops, r.max_gap);
    }
    assert!(bg.max_gap < MAX_GAP, "bg waited {:?}", bg.max_gap);
    drop((e2, g, fu));

    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0), "quit");
    let err = stderr.all();
    let mut restarted = vec![
        "monitor/c2",
        "chardev/c2",
        "node/n2",
        "node/spare",
        "export/e2",
        "export/vu",
        "nbd-server",
        "metrics-server",
    ];
    if fuse {
        restarted.push("export/fu");
    }
    for id in restarted {
        assert!(
            err.contains(&format!("rsd: {id} failed and was restarted (")),
            "{id}: {err}"
        );
    }
    assert!(!err.contains("kept failing"), "{err}");
    if fuse {
        assert!(!mounted(&mp), "FUSE mount left");
    }
    assert!(!dir.path("vu.sock").exists() && !dir.path("nbd.sock").exists());

    // Every acknowledged write is in the images.
    acked_writes_in(&image_bytes(&dir, "bg.qcow2", "qcow2"), &bg, 64 << 10, "bg");
    acked_writes_in(&image_bytes(&dir, "t.raw", "raw"), &te, 4096, "te");
    let e2_bytes = image_bytes(&dir, "e2.qcow2", "qcow2");
    for (i, seed) in (1000..1004).enumerate() {
        let at = &e2_bytes[i * (64 << 10)..(i + 1) * (64 << 10)];
        assert!(at == pattern(seed, 64 << 10).as_slice(), "e2 block {i}");
    }
    let vu = std::fs::read(dir.path("vu.raw")).expect("vu.raw");
    assert!(
        vu[..64 << 10] == pattern(2000, 64 << 10)
            && vu[64 << 10..128 << 10] == pattern(2001, 64 << 10)
    );
    if fuse {
        let fu = std::fs::read(dir.path("fu.raw")).expect("fu.raw");
        assert!(
            fu[..64 << 10] == pattern(3000, 64 << 10)
                && fu[64 << 10..128 << 10] == pattern(3001, 64 << 10)
        );
    }
    assert_eq!(
        std::fs::metadata(dir.path("spare.raw"))
            .expect("spare")
            .len(),
        8 << 20
    );
}

/// What a part does once it fails more often than its restart
/// intensity allows (5 restarts in 10 s).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Policy {
    /// The daemon stops: exit code 1, the reason on stderr.
    StopsDaemon,
    /// Given up on with a line on stderr; the daemon serves on.
    Dropped,
    /// Restarted however often it fails.
    NeverGivenUp,
}

/// A small daemon for one kind: monitors c1 (a.sock) and c2 (b.sock),
/// an NBD export `bg` on qcow2 with a background client, and the part
/// `id` names on node n2.
fn escalation(id: &str, policy: Policy) {
    let dir = TempDir::new();
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &dir.s("bg.qcow2"), "16M"],
    ));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &dir.s("n2.raw"), "4M"],
    ));
    std::fs::write(dir.path("fu.mnt"), b"").expect("mountpoint");
    let mut a = args(&[
        "--chardev",
        &format!("socket,path={},server=on,wait=off,id=c1", dir.s("a.sock")),
        "--monitor",
        "chardev=c1",
        "--chardev",
        &format!("socket,path={},server=on,wait=off,id=c2", dir.s("b.sock")),
        "--monitor",
        "chardev=c2",
        "--pidfile",
        &dir.s("pid"),
        "--blockdev",
        &format!(
            "driver=qcow2,node-name=bg,file.driver=file,file.filename={}",
            dir.s("bg.qcow2")
        ),
        "--blockdev",
        &format!("driver=file,node-name=n2,filename={}", dir.s("n2.raw")),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("nbd.sock")),
        "--export",
        "type=nbd,id=bg,node-name=bg,writable=on",
    ]);
    let extra = match id {
        "export/e2" => vec![
            "--export".into(),
            "type=nbd,id=e2,node-name=n2,writable=on".into(),
        ],
        "export/vu" => args(&[
            "--export",
            &format!(
                "type=vhost-user-blk,id=vu,node-name=n2,writable=on,addr.type=unix,addr.path={}",
                dir.s("vu.sock")
            ),
        ]),
        "export/fu" => args(&[
            "--export",
            &format!(
                "type=fuse,id=fu,node-name=n2,writable=on,mountpoint={}",
                dir.s("fu.mnt")
            ),
        ]),
        // The control actor owns every export: a FUSE mount and a
        // vhost-user socket must go with it too.
        "control" => {
            let mut v = args(&[
                "--export",
                &format!(
                    "type=vhost-user-blk,id=vu,node-name=n2,writable=on,addr.type=unix,addr.path={}",
                    dir.s("vu.sock")
                ),
            ]);
            if fuse_usable().is_ok() {
                v.extend(args(&[
                    "--export",
                    &format!(
                        "type=fuse,id=fu,node-name=n2,mountpoint={}",
                        dir.s("fu.mnt")
                    ),
                ]));
            }
            v
        }
        "metrics-server" => args(&[
            "--metrics-server",
            &format!("addr.type=unix,addr.path={}", dir.s("metrics.sock")),
        ]),
        _ => vec![],
    };
    a.extend(extra);
    let _unmount = Unmount(dir.s("fu.mnt"));
    let mut d = Daemon::spawn_env(Which::Rsd, &a, &[("RSD_TEST_HOOKS", "1")]);
    let stderr = Stderr::of(&mut d);
    let mut q = Qmp::ready(&dir.path("a.sock"));
    let mut bg = Verifier::start(&dir.path("nbd.sock"), "bg", 64 << 10, 32, 1 << 20);
    bg.advances(10, "start");

    // Crash the part whenever it is up, until the daemon stops (or, for
    // a part that does not stop it, it has failed eight times: three
    // past the intensity), keeping the events.
    let mut crashes = 0;
    let mut event = Value::Null;
    let end = Instant::now() + Duration::from_secs(30);
    // A crash sent while the part is restarting may be answered and
    // lost, so a part that is given up is crashed until it is gone.
    'crashing: while crashes < 8 || policy != Policy::NeverGivenUp {
        assert!(
            Instant::now() < end,
            "{id}: neither restarted nor escalated: a hang"
        );
        let cmd = format!(r#"{{"execute":"x-rsd-test-crash","arguments":{{"id":"{id}"}}}}"#);
        if q.stream.write_all(cmd.as_bytes()).is_err() {
            break;
        }
        loop {
            let l = q.line();
            if l.is_empty() {
                break 'crashing;
            }
            let v: Value = serde_json::from_str(&l).expect("json");
            if v["event"] == "X_RSD_COMPONENT_FAILED" {
                event = v;
            } else if v.get("event").is_none() {
                if v.get("return").is_some() {
                    crashes += 1;
                } else if policy == Policy::Dropped
                    && v["error"]["desc"] == format!("no actor named '{id}'")
                    && stderr.has("kept failing and was stopped")
                {
                    break 'crashing;
                } else {
                    // Not back yet.
                    std::thread::sleep(Duration::from_millis(20));
                }
                break;
            }
        }
    }
    if policy == Policy::StopsDaemon {
        // What the monitor said before it closed (a failed write above
        // leaves it unread).
        loop {
            let l = q.line();
            if l.is_empty() {
                break;
            }
            let v: Value = serde_json::from_str(&l).expect("json");
            if v["event"] == "X_RSD_COMPONENT_FAILED" {
                event = v;
            }
        }
        assert_eq!(d.wait_exit(20), Some(1), "{id}: the daemon did not stop");
        let bg = bg.finish();
        let err = stderr.all();
        if id != "control" {
            assert_eq!(event["data"]["component"], id, "{id}: {event} {err}");
            // Only the part itself failed (a monitor re-attaches to its
            // restarted chardev without failing).
            let others = err
                .lines()
                .filter(|l| l.contains(" failed and was restarted") && !l.contains(id))
                .count();
            assert_eq!(others, 0, "{id}: {err}");
        }
        let said = if id == "control" {
            "rsd: the control actor failed; stopping".to_string()
        } else {
            format!("rsd: {id} kept failing and could not be restarted (")
        };
        assert!(err.contains(&said), "{id}: {err}");
        acked_writes_in(&image_bytes(&dir, "bg.qcow2", "qcow2"), &bg, 64 << 10, id);
        for f in ["a.sock", "b.sock", "nbd.sock", "vu.sock", "pid"] {
            assert!(!dir.path(f).exists(), "{id}: {f} left behind");
        }
        assert!(!mounted(&dir.s("fu.mnt")), "{id}: FUSE mount left");
        acked_writes_in(&image_bytes(&dir, "bg.qcow2", "qcow2"), &bg, 64 << 10, id);
        return;
    }
    // The daemon goes on: the background client too, and the part is
    // gone (dropped) or serves (never given up).
    bg.advances(10, id);
    match id {
        "metrics-server" => {
            assert!(stderr.has("rsd: the metrics server kept failing and was stopped"));
            assert_eq!(http_get(&dir.path("metrics.sock"), "/metrics"), None);
        }
        "node/n2" => {
            assert_eq!(crashes, 8);
            let r = q
                .cmd(r#"{"execute":"block_resize","arguments":{"node-name":"n2","size":8388608}}"#);
            assert_eq!(r, json!({"return": {}}), "{id}");
        }
        _ => {}
    }
    let r = q.cmd(r#"{"execute":"query-block-exports"}"#);
    assert_eq!(r["return"][0]["id"], "bg", "{r}");
    let bg = bg.finish();
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0), "{id}: quit");
    assert!(bg.errors.is_empty(), "{id}: {:?}", bg.errors);
    assert!(
        bg.max_gap < MAX_GAP,
        "{id}: the client waited {:?}",
        bg.max_gap
    );
    acked_writes_in(&image_bytes(&dir, "bg.qcow2", "qcow2"), &bg, 64 << 10, id);
    assert!(!stderr.all().contains("kept failing and could not"), "{id}");
}

#[test]
fn escalation_monitor_stops_the_daemon() {
    escalation("monitor/c2", Policy::StopsDaemon);
}

#[test]
fn escalation_chardev_stops_the_daemon() {
    escalation("chardev/c2", Policy::StopsDaemon);
}

#[test]
fn escalation_nbd_server_stops_the_daemon() {
    escalation("nbd-server", Policy::StopsDaemon);
}

#[test]
fn escalation_nbd_export_stops_the_daemon() {
    escalation("export/e2", Policy::StopsDaemon);
}

#[test]
fn escalation_vhost_user_blk_export_stops_the_daemon() {
    escalation("export/vu", Policy::StopsDaemon);
}

#[test]
fn escalation_fuse_export_stops_the_daemon() {
    if let Err(why) = fuse_usable() {
        eprintln!("skipped: {why}");
        return;
    }
    escalation("export/fu", Policy::StopsDaemon);
}

#[test]
fn escalation_control_stops_the_daemon() {
    escalation("control", Policy::StopsDaemon);
}

#[test]
fn escalation_metrics_server_is_dropped() {
    escalation("metrics-server", Policy::Dropped);
}

#[test]
fn escalation_node_is_never_given_up() {
    escalation("node/n2", Policy::NeverGivenUp);
}

/// A chardev crashed twice in a row: its monitor attaches to the
/// restarted chardev. It once tried to attach while the chardev was
/// still down, failed to start and was given up at once, which stopped
/// the daemon.
#[test]
fn a_chardev_crashed_twice_keeps_its_monitor() {
    let dir = TempDir::new();
    let a = args(&[
        "--chardev",
        &format!("socket,path={},server=on,wait=off,id=c1", dir.s("a.sock")),
        "--monitor",
        "chardev=c1",
        "--chardev",
        &format!("socket,path={},server=on,wait=off,id=c2", dir.s("b.sock")),
        "--monitor",
        "chardev=c2",
    ]);
    let mut d = Daemon::spawn_env(Which::Rsd, &a, &[("RSD_TEST_HOOKS", "1")]);
    let stderr = Stderr::of(&mut d);
    let mut q = Qmp::ready(&dir.path("a.sock"));
    let crash_when_up = |q: &mut Qmp| {
        poll(10, "chardev/c2 up", || {
            let r = q.cmd(r#"{"execute":"x-rsd-test-crash","arguments":{"id":"chardev/c2"}}"#);
            r.get("return").map(drop)
        })
    };
    for i in 1..=4 {
        // Each crash as soon as the chardev is back, while its monitor
        // may still be attaching.
        crash_when_up(&mut q);
        poll(10, "chardev/c2 restarted", || {
            let n = stderr
                .text()
                .matches("rsd: chardev/c2 failed and was restarted")
                .count();
            (n == i).then_some(())
        });
    }
    let mut b = poll(10, "c2 serves its monitor", || {
        std::panic::catch_unwind(|| Qmp::ready(&dir.path("b.sock"))).ok()
    });
    assert_eq!(
        b.cmd(r#"{"execute":"query-version"}"#)["return"]["qemu"]["major"],
        10
    );
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(10), Some(0));
    let err = stderr.all();
    assert!(!err.contains("monitor/c2"), "{err}");
    assert_eq!(
        err.matches("rsd: chardev/c2 failed and was restarted")
            .count(),
        4,
        "{err}"
    );
}
