//! The FUSE export against QSD's: the mounted file's attributes, reads,
//! writes at and past the end, truncate, fallocate, SEEK_DATA/SEEK_HOLE,
//! chmod, the mountpoint checks, and the unmount on every stop path.
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;

use crate::common::*;

/// FUSE needs /dev/fuse (a device: without it the tests skip).
pub(crate) fn fuse_missing() -> bool {
    let missing = !std::path::Path::new("/dev/fuse").exists();
    if missing {
        eprintln!("skipped: /dev/fuse is missing");
    }
    missing
}

pub(crate) fn mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(path)))
        .unwrap_or(false)
}

pub(crate) fn wait_mount(path: &str, want: bool) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while mounted(path) != want {
        assert!(
            std::time::Instant::now() < until,
            "{path}: mounted should be {want}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn image(dir: &TempDir) -> String {
    let img = dir.s("disk.qcow2");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img, "4M"],
    ));
    ok(&run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0x33 2M 64k",
            &img,
        ],
    ));
    img
}

fn serve(which: Which, dir: &TempDir, img: &str, mp: &str, extra: &str) -> (Daemon, Qmp) {
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=qcow2,node-name=disk,file.driver=file,file.filename={img}"),
        "--export",
        &format!("type=fuse,id=e,node-name=disk,mountpoint={mp}{extra}"),
    ]));
    let d = Daemon::spawn(which, &a);
    let q = Qmp::ready(&dir.path("q.sock"));
    wait_mount(mp, true);
    (d, q)
}

fn errno_of<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(0)),
    }
}

/// One daemon's answers to the same file operations, as text.
fn file_ops(which: Which) -> Vec<String> {
    let dir = TempDir::new();
    let img = image(&dir);
    let mp = dir.s("mnt");
    std::fs::write(&mp, b"").expect("mountpoint");
    let (mut d, mut q) = serve(which, &dir, &img, &mp, ",writable=on");
    let mut out = Vec::new();
    let opts = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(mp.as_str()))
        .map(|l| l.split(' ').skip(2).take(2).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    out.push(format!("mount: {opts}"));
    let md = std::fs::metadata(&mp).expect("stat");
    out.push(format!(
        "mode {:o} size {} nlink {}",
        md.mode(),
        md.len(),
        md.nlink()
    ));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mp)
        .expect("open");
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact_at(&mut buf, 0).expect("read");
    out.push(format!("read 0x5a: {}", buf.iter().all(|b| *b == 0x5a)));
    // In the middle, at the end, across the end.
    out.push(errno_of(f.write_at(&[0x77; 65536], 1 << 20)));
    out.push(format!(
        "{:?}",
        f.write_at(&[0x78; 8192], (4 << 20) - 4096)
            .map_err(|e| e.raw_os_error())
    ));
    out.push(errno_of(f.write_at(&[0x79; 4096], 4 << 20)));
    // fallocate: a hole punched, a range zeroed, plain allocation inside.
    let fd = f.as_raw_fd();
    use nix::fcntl::{fallocate, FallocateFlags as F};
    out.push(errno_of(
        fallocate(
            fd,
            F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
            0,
            65536,
        )
        .map_err(std::io::Error::from),
    ));
    out.push(errno_of(
        fallocate(fd, F::FALLOC_FL_PUNCH_HOLE, 0, 65536).map_err(std::io::Error::from),
    ));
    out.push(errno_of(
        fallocate(
            fd,
            F::FALLOC_FL_ZERO_RANGE | F::FALLOC_FL_KEEP_SIZE,
            131072,
            65536,
        )
        .map_err(std::io::Error::from),
    ));
    out.push(errno_of(
        fallocate(fd, F::empty(), 0, 4096).map_err(std::io::Error::from),
    ));
    let mut b = vec![1u8; 65536];
    f.read_exact_at(&mut b, 0).expect("read");
    out.push(format!("punched reads zero: {}", b.iter().all(|x| *x == 0)));
    f.read_exact_at(&mut b, 131072).expect("read");
    out.push(format!("zeroed reads zero: {}", b.iter().all(|x| *x == 0)));
    // SEEK_DATA / SEEK_HOLE.
    use nix::unistd::{lseek, Whence};
    for (off, w) in [
        (0, Whence::SeekData),
        (0, Whence::SeekHole),
        (1 << 20, Whence::SeekHole),
        ((1 << 20) + 65536, Whence::SeekData),
        ((2 << 20) + 65536, Whence::SeekData),
    ] {
        out.push(format!(
            "{w:?} {off}: {:?}",
            lseek(fd, off, w).map_err(|e| e as i32)
        ));
    }
    // Truncate: grow, then shrink back.
    out.push(errno_of(f.set_len(6 << 20)));
    out.push(format!(
        "size {}",
        std::fs::metadata(&mp).expect("stat").len()
    ));
    out.push(errno_of(f.set_len(4 << 20)));
    out.push(errno_of(f.sync_all()));
    // chmod: group and other bits are allowed with allow_other (root's
    // auto), the file type is kept.
    out.push(errno_of(std::fs::set_permissions(
        &mp,
        std::fs::Permissions::from_mode(0o640),
    )));
    out.push(format!(
        "mode {:o}",
        std::fs::metadata(&mp).expect("stat").mode()
    ));
    drop(f);
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0));
    wait_mount(&mp, false);
    let check = ok(&run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0 0 64k",
            "-c",
            "read -P 0x5a 64k 64k",
            "-c",
            "read -P 0 128k 64k",
            "-c",
            "read -P 0x77 1M 64k",
            "-c",
            "read -P 0x78 4092k 4k",
            &img,
        ],
    ));
    out.push(format!("image as written: {}", !check.contains("fail")));
    out.push(format!(
        "size after {}",
        ok(&run("qemu-img", &["info", "--output=json", &img]))
            .contains("\"virtual-size\": 4194304")
    ));
    out
}

#[test]
fn fuse_file_operations_match_qsd() {
    if fuse_missing() {
        return;
    }
    let all: Vec<Vec<String>> = Which::all().into_iter().map(file_ops).collect();
    let rsd = &all[0];
    assert!(rsd.iter().all(|l| !l.contains("false")), "{rsd:#?}");
    assert_eq!(rsd[1], "mode 100600 size 4194304 nlink 1", "{rsd:#?}");
    assert_eq!(rsd[5], "errno 5", "a write at the end: {rsd:#?}");
    if all.len() == 2 {
        for (i, (a, b)) in all[0].iter().zip(&all[1]).enumerate() {
            assert_eq!(
                a, b,
                "step {i} (rsd, then QSD)\nrsd: {:#?}\nqsd: {:#?}",
                all[0], all[1]
            );
        }
    }
}

/// The mountpoint checks, in QSD's words.
#[test]
fn fuse_mountpoint_errors_match_qsd() {
    if fuse_missing() {
        return;
    }
    let setup = |d: &TempDir| {
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &d.s("a.qcow2"), "1M"],
        ));
        std::fs::write(d.path("mp"), b"").expect("mp");
        std::fs::create_dir(d.path("dir")).expect("dir");
    };
    let add = |extra: &str| {
        format!(
            r#"{{"execute":"block-export-add","arguments":{{"type":"fuse","id":"e{}","node-name":"a"{extra}}}}}"#,
            extra.len()
        )
    };
    let steps = [
        add(r#","mountpoint":"$D/mp""#),
        add(r#","mountpoint":"$D/mp","writable":true"#),
        add(r#","mountpoint":"$D/dir""#),
        add(r#","mountpoint":"$D/none""#),
        r#"{"execute":"query-block-exports"}"#.to_string(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = same_on_both(
        &setup,
        &[
            "--blockdev",
            "driver=qcow2,node-name=a,file.driver=file,file.filename=$D/a.qcow2",
        ],
        &steps,
    )
    .expect("daemons start");
    assert!(
        out[1].contains("There already is a FUSE export on"),
        "{out:#?}"
    );
    assert!(out[2].contains("is not a regular file"), "{out:#?}");
    assert!(out[3].contains("No such file or directory"), "{out:#?}");
}

/// The mount goes on block-export-del, quit, SIGTERM, SIGINT and SIGHUP;
/// a killed daemon leaves a dead mount, and the next one says how to
/// remove it.
#[test]
fn fuse_unmounts_on_every_stop_path() {
    if fuse_missing() {
        return;
    }
    for how in ["del", "quit", "15", "2", "1", "kill"] {
        let dir = TempDir::new();
        let img = image(&dir);
        let mp = dir.s("mnt");
        std::fs::write(&mp, b"").expect("mountpoint");
        let (mut d, mut q) = serve(Which::Rsd, &dir, &img, &mp, "");
        match how {
            "del" => {
                let r = q.cmd(r#"{"execute":"block-export-del","arguments":{"id":"e"}}"#);
                assert!(r.get("return").is_some(), "{r}");
                wait_mount(&mp, false);
                q.send(br#"{"execute":"quit"}"#);
                assert_eq!(d.wait_exit(20), Some(0));
            }
            "quit" => {
                q.send(br#"{"execute":"quit"}"#);
                assert_eq!(d.wait_exit(20), Some(0), "{how}");
            }
            "kill" => {
                let _ = d.child.kill();
                let _ = d.child.wait();
                let e = std::fs::metadata(&mp).expect_err("a dead mount");
                assert_eq!(e.raw_os_error(), Some(nix::libc::ENOTCONN), "{e}");
                let mut a = monitor_args(&dir.s("q2.sock"));
                a.extend(args(&[
                    "--blockdev",
                    &format!("driver=qcow2,node-name=disk,file.driver=file,file.filename={img}"),
                    "--export",
                    &format!("type=fuse,id=e,node-name=disk,mountpoint={mp}"),
                ]));
                let out = run(rsd_bin(), &a.iter().map(String::as_str).collect::<Vec<_>>());
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success(), "{err}");
                assert!(err.contains(&format!("umount -l {mp}")), "{err}");
                ok(&run("umount", &["-l", &mp]));
            }
            sig => {
                d.signal(sig.parse().expect("signal"));
                assert_eq!(d.wait_exit(20), Some(0), "signal {sig}");
            }
        }
        wait_mount(&mp, false);
        let check = run("qemu-img", &["check", &img]);
        assert!(
            check.status.success(),
            "{how}: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
}

/// What another user sees, growable exports, and O_DIRECT, for one
/// daemon, as text.
fn access_ops(which: Which) -> Vec<String> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let mut out = Vec::new();
    for (extra, mode) in [
        (",allow-other=off,writable=on", 0o640),
        (",allow-other=on,writable=on,growable=on", 0o666),
    ] {
        let dir = TempDir::new();
        // The nobody user must reach the mountpoint's directory.
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let img = image(&dir);
        let mp = dir.s("mnt");
        std::fs::write(&mp, b"").expect("mountpoint");
        let (mut d, mut q) = serve(which, &dir, &img, &mp, extra);
        out.push(format!(
            "{extra}: mode {:o}",
            std::fs::metadata(&mp).expect("stat").mode()
        ));
        out.push(errno_of(std::fs::set_permissions(
            &mp,
            std::fs::Permissions::from_mode(mode),
        )));
        let nobody = std::process::Command::new("head")
            .args(["-c", "4", &mp])
            .uid(65534)
            .gid(65534)
            .output()
            .expect("head");
        out.push(format!(
            "nobody reads: {} {:?}",
            nobody.status.success(),
            nobody.stdout
        ));
        // O_DIRECT reads and writes of aligned blocks.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&mp);
        match f {
            Ok(f) => {
                let layout = std::alloc::Layout::from_size_align(4096, 4096).expect("layout");
                // SAFETY: a 4 KiB buffer with the layout just made, freed below.
                let p = unsafe { std::alloc::alloc_zeroed(layout) };
                // SAFETY: p points to 4096 bytes.
                let b = unsafe { std::slice::from_raw_parts_mut(p, 4096) };
                out.push(format!(
                    "direct read: {:?} {:x}",
                    f.read_at(b, 8192).map_err(|e| e.raw_os_error()),
                    b[0]
                ));
                b.fill(0x42);
                out.push(format!(
                    "direct write: {:?}",
                    f.write_at(b, 12288).map_err(|e| e.raw_os_error())
                ));
                // SAFETY: allocated above with this layout.
                unsafe { std::alloc::dealloc(p, layout) };
                // Past the end: growable exports grow.
                out.push(format!(
                    "past the end: {:?}",
                    f.write_at(&[1u8; 4096], 5 << 20)
                        .map_err(|e| e.raw_os_error())
                ));
            }
            Err(e) => out.push(format!("O_DIRECT open: {:?}", e.raw_os_error())),
        }
        out.push(format!(
            "size {}",
            std::fs::metadata(&mp).expect("stat").len()
        ));
        q.send(br#"{"execute":"quit"}"#);
        assert_eq!(d.wait_exit(20), Some(0));
        wait_mount(&mp, false);
    }
    out
}

#[test]
fn fuse_access_growable_and_direct_match_qsd() {
    if fuse_missing() {
        return;
    }
    let all: Vec<Vec<String>> = Which::all().into_iter().map(access_ops).collect();
    let rsd = &all[0];
    assert!(
        rsd[1].starts_with("errno 1"),
        "chmod g+r without allow-other: {rsd:#?}"
    );
    assert!(rsd[2].starts_with("nobody reads: false"), "{rsd:#?}");
    assert!(
        rsd.iter()
            .any(|l| l.starts_with("nobody reads: true [90, 90, 90, 90]")),
        "{rsd:#?}"
    );
    assert_eq!(
        rsd.last().map(String::as_str),
        Some("size 5246976"),
        "{rsd:#?}"
    );
    if all.len() == 2 {
        for (i, (a, b)) in all[0].iter().zip(&all[1]).enumerate() {
            assert_eq!(
                a, b,
                "step {i} (rsd, then QSD)\nrsd: {:#?}\nqsd: {:#?}",
                all[0], all[1]
            );
        }
    }
}

/// A page-aligned buffer for O_DIRECT.
pub(crate) struct Aligned {
    p: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    pub(crate) fn new(len: usize, fill: u8) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: a non-zero size with the layout just made, freed on drop.
        let p = unsafe { std::alloc::alloc(layout) };
        assert!(!p.is_null());
        let mut a = Aligned { p, layout };
        a.buf().fill(fill);
        a
    }
    pub(crate) fn buf(&mut self) -> &mut [u8] {
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

/// Many requests in flight at once (1 MiB and 4 KiB O_DIRECT writes and
/// reads from 40 threads): each lands where it was sent, as the same
/// writes to a plain file leave it, and each read sees its own data.
#[test]
fn fuse_concurrent_requests_keep_their_data() {
    use std::os::unix::fs::OpenOptionsExt;
    if fuse_missing() {
        return;
    }
    let dir = TempDir::new();
    let img = dir.s("disk.qcow2");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img, "16M"],
    ));
    let mp = dir.s("mnt");
    std::fs::write(&mp, b"").expect("mountpoint");
    let (mut d, mut q) = serve(Which::Rsd, &dir, &img, &mp, ",writable=on");
    // Threads 0..8 write 1 MiB each at 8 MiB + i MiB; threads 8..40 write
    // 4 KiB blocks into the first 8 MiB, thread t every 32nd block.
    let job = |t: usize| -> Vec<(u64, usize, u8)> {
        if t < 8 {
            vec![((8 + t as u64) << 20, 1 << 20, 0x80 + t as u8)]
        } else {
            let k = t - 8;
            (0..64)
                .map(|j| (((j * 32 + k) as u64) * 4096, 4096, 1 + k as u8))
                .collect()
        }
    };
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&mp)
            .expect("O_DIRECT open")
    };
    std::thread::scope(|s| {
        for t in 0..40 {
            let (f, writes) = (open(), job(t));
            s.spawn(move || {
                for (off, len, byte) in writes {
                    let mut b = Aligned::new(len, byte);
                    assert_eq!(f.write_at(b.buf(), off).expect("write"), len);
                }
            });
        }
    });
    let bad: Vec<String> = std::thread::scope(|s| {
        let readers: Vec<_> = (0..40)
            .map(|t| {
                let (f, reads) = (open(), job(t));
                s.spawn(move || {
                    let mut bad = Vec::new();
                    for (off, len, byte) in reads {
                        let mut b = Aligned::new(len, 0);
                        let n = f.read_at(b.buf(), off).expect("read");
                        if n != len || b.buf().iter().any(|x| *x != byte) {
                            bad.push(format!("thread {t} at {off}: {n} bytes"));
                        }
                    }
                    bad
                })
            })
            .collect();
        readers
            .into_iter()
            .flat_map(|r| r.join().expect("reader"))
            .collect()
    });
    assert!(bad.is_empty(), "reads back: {bad:?}");
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(20), Some(0));
    wait_mount(&mp, false);
    // The same writes to a plain file.
    let reference = dir.s("ref.raw");
    let r = std::fs::File::create(&reference).expect("reference");
    r.set_len(16 << 20).expect("size");
    for t in 0..40 {
        for (off, len, byte) in job(t) {
            r.write_all_at(&vec![byte; len], off).expect("write");
        }
    }
    drop(r);
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", &reference, &img],
    );
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    ok(&run("qemu-img", &["check", "-q", &img]));
}

/// With `iothread`, the FUSE session runs on the iothread's thread
/// instead of a thread of its own, and serves the file the same.
#[test]
fn fuse_session_runs_on_the_export_iothread() {
    if fuse_missing() {
        return;
    }
    let dir = TempDir::new();
    let img = image(&dir);
    for iothread in [true, false] {
        let mp = dir.s(&format!("mnt-{iothread}"));
        std::fs::write(&mp, b"").expect("mountpoint");
        let sock = dir.s(&format!("q-{iothread}.sock"));
        let mut a = monitor_args(&sock);
        let extra = if iothread { ",iothread=io0" } else { "" };
        a.extend(args(&[
            "--object",
            "iothread,id=io0",
            "--blockdev",
            &format!("driver=qcow2,node-name=disk,file.driver=file,file.filename={img}"),
            "--export",
            &format!("type=fuse,id=e,node-name=disk,mountpoint={mp}{extra}"),
        ]));
        let mut d = Daemon::spawn(Which::Rsd, &a);
        let mut q = Qmp::ready(std::path::Path::new(&sock));
        wait_mount(&mp, true);
        let data = std::fs::read(&mp).expect("read the export");
        assert!(data[..1 << 20].iter().all(|b| *b == 0x5a), "{iothread}");
        assert!(data[2 << 20..(2 << 20) + 65536].iter().all(|b| *b == 0x33));
        let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", d.child.id()))
            .expect("tasks")
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .collect();
        let own = names.iter().any(|n| n == "fuse/e");
        assert_eq!(own, !iothread, "{names:?}");
        assert_eq!(
            q.cmd(r#"{"execute": "quit"}"#)["return"],
            serde_json::json!({})
        );
        assert!(d.wait_exit(10).is_some());
        wait_mount(&mp, false);
    }
}

/// Per-client memory (docs/reliability.md): 300 threads each reading
/// 1 MiB with O_DIRECT from a slow node (each read a request of its own,
/// which the kernel's background limit does not count): rsd serves 128
/// at once and leaves the rest queued in the kernel, so it holds at most
/// 128 reply buffers, not one per thread.
#[test]
fn fuse_requests_in_flight_are_bounded() {
    use std::os::unix::fs::OpenOptionsExt;
    if fuse_missing() {
        return;
    }
    let dir = TempDir::new();
    let mp = dir.s("mnt");
    std::fs::write(&mp, b"").expect("mountpoint");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        "driver=null-co,node-name=slow,size=67108864,read-zeroes=on,latency-ns=300000000",
        "--export",
        &format!("type=fuse,id=e,node-name=slow,mountpoint={mp},writable=on"),
    ]));
    let d = Daemon::spawn(Which::Rsd, &a);
    let _q = Qmp::ready(&dir.path("q.sock"));
    wait_mount(&mp, true);
    let pid = d.child.id();
    let base = crate::bounds::status_kib(pid, "VmRSS");
    std::thread::scope(|s| {
        for t in 0..300u64 {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_DIRECT)
                .open(&mp)
                .expect("O_DIRECT open");
            s.spawn(move || {
                let mut b = Aligned::new(1 << 20, 1);
                assert_eq!(f.read_at(b.buf(), (t % 64) << 20).expect("read"), 1 << 20);
            });
        }
    });
    let peak = crate::bounds::status_kib(pid, "VmHWM");
    eprintln!("VmRSS {base} KiB, peak {peak} KiB");
    assert!(
        peak < base + (180 << 10),
        "300 readers made rsd hold {} MiB",
        (peak - base) >> 10
    );
}
