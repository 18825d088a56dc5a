//! A real Linux guest on the vhost-user-blk export: QEMU's x86 emulator
//! under TCG, a Debian cloud kernel and a busybox initramfs (the kit
//! tests/guest/fetch.sh builds from Debian's packages), booted against
//! rsd's socket with two queues on a qcow2 image. The guest's /init
//! (tests/guest/init) runs the steps named on its command line and
//! prints one line per step on the serial console.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::{args, monitor_args, ok, run, Daemon, Qmp, TempDir, Which};

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 64 * MIB;
/// Written on the host before the boot: a pattern the guest checks...
const HOST_AT: u64 = MIB;
const HOST_LEN: u64 = MIB;
/// ...and copies here with O_DIRECT, for the host to find after.
const COPY_AT: u64 = 4 * MIB;
/// Filled on the host, discarded by the guest.
const DISCARD_AT: u64 = 8 * MIB;
const DISCARD_LEN: u64 = 4 * MIB;
/// A boot, bounded: about 5 s here, far more under CI's load.
const BOOT_SECS: u64 = 60;

/// The guest kit's folder, or None (with the reason printed) when it
/// cannot be downloaded outside CI. Under CI a missing kit fails.
fn kit() -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/fetch.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run tests/guest/fetch.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = stdout.lines().last().unwrap_or("").trim().to_string();
        assert!(!dir.is_empty(), "fetch.sh named no kit folder\n{stderr}");
        return Some(PathBuf::from(dir));
    }
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    if out.status.code() == Some(3) && !ci {
        eprintln!("skipped: no guest kit (the packages could not be downloaded):\n{stderr}");
        return None;
    }
    panic!(
        "the guest kit could not be built ({}):\n{stderr}",
        out.status
    );
}

/// A pattern no two sectors of which are alike.
fn pattern(len: u64) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            // xorshift32
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The qcow2 image the guest boots on: the pattern at HOST_AT, 0x33 over
/// the range the guest discards, zeroes elsewhere.
fn make_image(dir: &TempDir, name: &str) -> String {
    let raw = dir.path(&format!("{name}.raw"));
    let mut data = vec![0u8; IMAGE_SIZE as usize];
    data[HOST_AT as usize..(HOST_AT + HOST_LEN) as usize].copy_from_slice(&pattern(HOST_LEN));
    data[DISCARD_AT as usize..(DISCARD_AT + DISCARD_LEN) as usize].fill(0x33);
    std::fs::write(&raw, &data).expect("write raw image");
    let image = dir.s(&format!("{name}.qcow2"));
    ok(&run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &raw.display().to_string(),
            &image,
        ],
    ));
    let _ = std::fs::remove_file(&raw);
    image
}

/// A daemon serving the qcow2 image (discards reach the image) as a
/// vhost-user-blk export with two queues.
fn serve(which: Which, dir: &TempDir, image: &str, sock: &str) -> (Daemon, Qmp) {
    let mon = dir.s(&format!("{}-qmp.sock", which.prog()));
    let mut a = monitor_args(&mon);
    a.extend(args(&[
        "--blockdev",
        &format!("driver=file,node-name=file,filename={image},discard=unmap"),
        "--blockdev",
        "driver=qcow2,node-name=disk,file=file,discard=unmap",
        "--export",
        &format!(
            "type=vhost-user-blk,id=vu,node-name=disk,writable=on,num-queues=2,addr.type=unix,addr.path={sock}"
        ),
    ]));
    let d = Daemon::spawn(which, &a);
    let q = Qmp::ready(Path::new(&mon));
    (d, q)
}

/// Boots the guest on `sock` with `steps` and checks that every step
/// passed. Returns the serial console's text.
fn boot(kit: &Path, sock: &str, steps: &[String]) -> String {
    let started = Instant::now();
    let append = format!("console=ttyS0 quiet panic=-1 rsdguest={}", steps.join(","));
    let out = Command::new("timeout")
        .arg(BOOT_SECS.to_string())
        .arg(kit.join("qemu"))
        .args(["-machine", "q35,accel=tcg", "-cpu", "max"])
        // Linux makes no more queues than CPUs.
        .args(["-smp", "2", "-m", "256M"])
        // vhost-user needs guest memory the daemon can map.
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .args(["-chardev", &format!("socket,id=vu,path={sock}")])
        .args(["-device", "vhost-user-blk-pci,chardev=vu,num-queues=2"])
        .arg("-kernel")
        .arg(kit.join("vmlinuz"))
        .arg("-initrd")
        .arg(kit.join("initrd.img"))
        .args(["-append", &append])
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
        .args(["-serial", "stdio"])
        .output()
        .expect("run QEMU");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = format!(
        "after {:?}, {}\nconsole:\n{console}\nstderr:\n{}",
        started.elapsed(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the guest did not power off: {report}"
    );
    assert!(!console.contains("RSD-FAIL"), "a step failed: {report}");
    for step in steps {
        assert!(
            console
                .lines()
                .any(|l| l.trim_end() == format!("RSD-OK {step}")),
            "step {step} did not pass: {report}"
        );
    }
    assert!(console.contains("RSD-DONE"), "{report}");
    console
}

/// A node's counters from query-blockstats (rsd counts per node).
fn node_stats(q: &mut Qmp, node: &str) -> Value {
    let r = q.cmd(r#"{"execute": "query-blockstats", "arguments": {"query-nodes": true}}"#);
    r["return"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["node-name"] == node))
        .map(|s| s["stats"].clone())
        .unwrap_or_else(|| panic!("no stats for {node}: {r}"))
}

fn wait_exports_gone(q: &mut Qmp) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let r = q.cmd(r#"{"execute": "query-block-exports"}"#);
        if r["return"] == json!([]) {
            return;
        }
        assert!(Instant::now() < end, "export still listed: {r}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn quit(which: Which, d: &mut Daemon, q: &mut Qmp) {
    assert_eq!(q.cmd(r#"{"execute": "quit"}"#)["return"], json!({}));
    assert!(d.wait_exit(20).is_some(), "{which:?} did not quit");
}

/// The steps of the first boot: it checks the host's pattern, copies it
/// with O_DIRECT, reads the copy back, flushes with the write cache on
/// and discards.
fn first_steps(host_sha: &str) -> Vec<String> {
    vec![
        "queues:2".into(),
        format!("sha:{HOST_AT}:{HOST_LEN}:{host_sha}"),
        format!("copy:{HOST_AT}:{COPY_AT}:{HOST_LEN}"),
        format!("sha:{COPY_AT}:{HOST_LEN}:{host_sha}"),
        "writeback".into(),
        "flush".into(),
        format!("discard:{DISCARD_AT}:{DISCARD_LEN}"),
    ]
}

/// The image as raw bytes (qemu-img convert).
fn raw_contents(dir: &TempDir, image: &str) -> Vec<u8> {
    let raw = dir.s("check.raw");
    ok(&run(
        "qemu-img",
        &["convert", "-q", "-f", "qcow2", "-O", "raw", image, &raw],
    ));
    let data = std::fs::read(&raw).expect("read converted image");
    let _ = std::fs::remove_file(&raw);
    data
}

/// Reads the host's data, writes with O_DIRECT, flushes and discards on
/// two queues; boots again after the export is deleted and added on the
/// same socket; the image holds what the guest did, as QSD's does.
#[test]
fn linux_guest_reads_writes_flushes_discards_and_reconnects() {
    let Some(kit) = kit() else {
        return;
    };
    let dir = TempDir::new();
    let host = pattern(HOST_LEN);
    let host_sha = sha(&host);
    let zero_sha = sha(&vec![0u8; DISCARD_LEN as usize]);

    let image = make_image(&dir, "rsd");
    let sock = dir.s("rsd-vu.sock");
    let (mut d, mut q) = serve(Which::Rsd, &dir, &image, &sock);
    let console = boot(&kit, &sock, &first_steps(&host_sha));
    assert!(console.contains("RSD-VALUE queues 2"), "{console}");
    // The guest's flush and discard reached the node.
    let st = node_stats(&mut q, "disk");
    assert!(st["flush_operations"].as_u64() >= Some(1), "no flush: {st}");
    assert!(
        st["unmap_operations"].as_u64() >= Some(1),
        "no discard: {st}"
    );
    assert!(st["wr_bytes"].as_u64() >= Some(HOST_LEN), "writes: {st}");

    // Deleted and added again on the same socket: the next guest boots.
    let r = q.cmd(r#"{"execute": "block-export-del", "arguments": {"id": "vu"}}"#);
    assert_eq!(r["return"], json!({}), "{r}");
    wait_exports_gone(&mut q);
    let add = format!(
        r#"{{"execute": "block-export-add", "arguments": {{"type": "vhost-user-blk", "id": "vu", "node-name": "disk", "writable": true, "num-queues": 2, "addr": {{"type": "unix", "path": "{sock}"}}}}}}"#
    );
    let r = q.cmd(&add);
    assert_eq!(r["return"], json!({}), "{r}");
    boot(
        &kit,
        &sock,
        &[
            "queues:2".into(),
            format!("sha:{COPY_AT}:{HOST_LEN}:{host_sha}"),
            format!("sha:{DISCARD_AT}:{DISCARD_LEN}:{zero_sha}"),
        ],
    );
    quit(Which::Rsd, &mut d, &mut q);

    // On the host: the copy is there, the rest as it was, the discarded
    // range is no longer data, and the image is sound.
    ok(&run("qemu-img", &["check", "-q", &image]));
    let data = raw_contents(&dir, &image);
    let at = |off: u64, len: u64| &data[off as usize..(off + len) as usize];
    assert!(
        at(COPY_AT, HOST_LEN) == host.as_slice(),
        "the guest's write"
    );
    assert!(
        at(HOST_AT, HOST_LEN) == host.as_slice(),
        "the host's pattern"
    );
    assert!(at(DISCARD_AT, DISCARD_LEN).iter().all(|&b| b == 0));
    assert!(at(0, HOST_AT).iter().all(|&b| b == 0));
    let map: Value = serde_json::from_str(&ok(&run(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", &image],
    )))
    .expect("map is JSON");
    let mut covered = 0;
    for e in map.as_array().expect("map entries") {
        let (start, len) = (e["start"].as_u64(), e["length"].as_u64());
        let (Some(start), Some(len)) = (start, len) else {
            panic!("map entry {e}");
        };
        let end = (start + len).min(DISCARD_AT + DISCARD_LEN);
        if end <= DISCARD_AT || start >= DISCARD_AT + DISCARD_LEN {
            continue;
        }
        assert_eq!(e["data"], json!(false), "discarded range still data: {map}");
        assert_eq!(e["zero"], json!(true), "discarded range not zero: {map}");
        covered += end - start.max(DISCARD_AT);
    }
    assert_eq!(covered, DISCARD_LEN, "{map}");

    // The same first boot on QSD leaves the same contents.
    if Path::new(crate::common::QSD).exists() {
        let qimage = make_image(&dir, "qsd");
        let qsock = dir.s("qsd-vu.sock");
        let (mut qd, mut qq) = serve(Which::Qsd, &dir, &qimage, &qsock);
        boot(&kit, &qsock, &first_steps(&host_sha));
        quit(Which::Qsd, &mut qd, &mut qq);
        ok(&run(
            "qemu-img",
            &[
                "compare", "-q", "-f", "qcow2", "-F", "qcow2", &image, &qimage,
            ],
        ));
    }
}
