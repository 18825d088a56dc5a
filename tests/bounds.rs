//! Resource bounds (docs/reliability.md, docs/limits.md): what one
//! client can make rsd hold, measured from /proc/PID/status while the
//! client does its worst. Each test waits, with a deadline, until the
//! daemon has stopped taking input and gone idle, then checks the peak.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::nbd_wire::{self, Nbd, CMD_READ};
use crate::common::*;

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM, RssAnon...).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Waits (at most `secs`) until the daemon uses no more than 5% of a
/// CPU over a second: it has done all the work the client gave it.
fn wait_idle(pid: u32, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let before = cpu_time(pid);
        std::thread::sleep(Duration::from_secs(1));
        if cpu_time(pid) - before <= Duration::from_millis(50) {
            return;
        }
        assert!(Instant::now() < deadline, "the daemon never went idle");
    }
}

/// Writes `payload` from a thread and never reads; returns once the
/// daemon stopped taking it (no progress for 2 s) or all of it went,
/// with the number of bytes sent.
fn send_unread(stream: &UnixStream, payload: Vec<u8>) -> usize {
    let sent = Arc::new(AtomicUsize::new(0));
    let (s2, mut w) = (sent.clone(), stream.try_clone().expect("clone"));
    let total = payload.len();
    std::thread::spawn(move || {
        for chunk in payload.chunks(64 << 10) {
            if w.write_all(chunk).is_err() {
                return;
            }
            s2.fetch_add(chunk.len(), Ordering::SeqCst);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut last, mut since) = (0, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = sent.load(Ordering::SeqCst);
        if now == total {
            return now;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > Duration::from_secs(2) {
            return now;
        }
        assert!(Instant::now() < deadline, "the daemon kept reading");
    }
}

/// A client that pipelines 100k reads and never reads a reply: rsd
/// stops reading its requests once 64 are in flight or their replies
/// reach 64 MiB, so its memory stays bounded. The worst case is reads
/// that complete out of line (O_DIRECT, on the I/O threads) of 32 MiB
/// each: each completed reply waits for the socket. rsd once held 64 of
/// them (2 GiB) per client. The daemon serves another client meanwhile.
#[test]
fn nbd_replies_nobody_reads_hold_bounded_memory() {
    let dir = TempDir::new();
    let img = dir.s("img");
    run("qemu-img", &["create", "-q", "-f", "raw", &img, "64M"]);
    let sock = dir.path("nbd.sock");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        &format!("driver=file,node-name=disk,filename={img},cache.direct=on"),
        "--blockdev",
        "driver=null-co,node-name=zero,size=67108864,read-zeroes=on",
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", sock.display()),
        "--export",
        "type=nbd,id=e,node-name=disk,name=disk",
        "--export",
        "type=nbd,id=z,node-name=zero,name=zero",
    ]));
    let d = Daemon::spawn(Which::Rsd, &a);
    let _q = Qmp::ready(&dir.path("q.sock"));
    let pid = d.child.id();
    let base = status_kib(pid, "VmRSS");
    for (export, len) in [("zero", 1u32 << 20), ("disk", 32 << 20)] {
        let s = Nbd::connect(&sock, export).expect("connect");
        let mut flood = Vec::with_capacity(100_000 * 28);
        for i in 0..100_000u64 {
            flood.extend(nbd_wire::request(
                CMD_READ,
                0,
                i,
                (i * 4096) % (32 << 20),
                len,
            ));
        }
        let sent = send_unread(&s.s, flood);
        assert!(
            sent < 100_000 * 28,
            "{export}: the daemon read all 100k requests unanswered"
        );
        wait_idle(pid, 60);
        let peak = status_kib(pid, "VmHWM");
        eprintln!(
            "{export}: {} requests taken, RSS {base} KiB, peak {peak} KiB, now {} KiB",
            sent / 28,
            status_kib(pid, "VmRSS")
        );
        // 64 MiB of replies, the O_DIRECT bounce buffers of the two
        // reads in flight, the socket's and the reader's buffers.
        assert!(
            peak < base + (200 << 10),
            "{export}: peak RSS {peak} KiB from {base} KiB"
        );
        // Another client is served meanwhile.
        let mut other = Nbd::connect(&sock, export).expect("connect");
        other.read(0, 512).expect("another client's read");
        let _ = s.s.shutdown(std::net::Shutdown::Both);
    }
}

/// A QMP request larger than QEMU's 64 MiB token limit, without a
/// newline: refused with QEMU's error as soon as a token passes the
/// limit (the rest is lexed on, as QEMU does), memory bounded by the
/// limit rather than by the request, and the next request served.
#[test]
fn a_huge_qmp_request_is_refused_in_bounded_memory() {
    let dir = TempDir::new();
    let d = Daemon::spawn(Which::Rsd, &monitor_args(&dir.s("q.sock")));
    let q = Qmp::ready(&dir.path("q.sock"));
    let pid = d.child.id();
    let base = status_kib(pid, "VmRSS");
    // 136 MiB in one string: twice the limit and a bit.
    let mut w = q.stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        w.write_all(br#"{"execute": "query-version", "id": ""#)?;
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..136 {
            w.write_all(&chunk)?;
        }
        w.write_all(b"\"}\n{\"execute\": \"query-version\", \"id\": \"after\"}\n")
    });
    let mut r = BufReader::new(q.stream.try_clone().expect("clone"));
    q.stream
        .set_read_timeout(Some(Duration::from_secs(180)))
        .expect("timeout");
    let mut replies = Vec::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).expect("reply");
        assert!(!l.is_empty(), "EOF; replies so far: {replies:?}");
        let after = l.contains(r#""id": "after""#);
        replies.push(l.chars().take(120).collect::<String>());
        if after {
            break;
        }
    }
    assert!(sender.join().is_ok_and(|r| r.is_ok()), "send");
    let limit = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON token size limit exceeded\"}}\r\n";
    assert_eq!(replies[0], limit);
    assert_eq!(replies[1], limit);
    assert!(
        replies
            .last()
            .is_some_and(|l| l.starts_with(r#"{"return": {"qemu""#)),
        "{replies:?}"
    );
    let peak = status_kib(pid, "VmHWM");
    eprintln!("RSS {base} KiB, peak {peak} KiB; replies: {replies:?}");
    assert!(
        peak < base + (192 << 10),
        "peak RSS {peak} KiB from {base} KiB for a 136 MiB request"
    );
}

fn count_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Clients past max-connections wait in the listen backlog: they cost
/// the daemon no descriptor, no thread and no memory until served.
#[test]
fn nbd_clients_past_max_connections_cost_nothing() {
    let dir = TempDir::new();
    let sock = dir.path("nbd.sock");
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(args(&[
        "--blockdev",
        "driver=null-co,node-name=zero,size=1048576",
        "--nbd-server",
        &format!(
            "addr.type=unix,addr.path={},max-connections=4",
            sock.display()
        ),
        "--export",
        "type=nbd,id=z,node-name=zero,name=zero",
    ]));
    let d = Daemon::spawn(Which::Rsd, &a);
    let _q = Qmp::ready(&dir.path("q.sock"));
    let pid = d.child.id();
    let (fds0, rss0) = (count_fds(pid), status_kib(pid, "VmRSS"));
    let served: Vec<Nbd> = (0..4)
        .map(|_| Nbd::connect(&sock, "zero").expect("connect"))
        .collect();
    wait_idle(pid, 30);
    let fds_served = count_fds(pid);
    let waiting: Vec<UnixStream> = (0..100)
        .map(|_| {
            let s = UnixStream::connect(&sock).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            s
        })
        .collect();
    wait_idle(pid, 30);
    for mut s in &waiting {
        let mut hello = [0u8; 18];
        assert!(
            s.read(&mut hello).is_err(),
            "a client past the limit was greeted"
        );
    }
    let fds = count_fds(pid);
    assert_eq!(
        fds, fds_served,
        "descriptors for waiting clients: {fds_served} then {fds}"
    );
    assert!(
        fds_served <= fds0 + 4 * 6,
        "{fds0} then {fds_served} descriptors"
    );
    let rss = status_kib(pid, "VmRSS");
    eprintln!("descriptors {fds0}, {fds_served} served, {fds} with 100 waiting; RSS {rss0} then {rss} KiB");
    assert!(rss < rss0 + (16 << 10), "RSS {rss0} then {rss} KiB");
    // One leaves: a waiting client is served.
    drop(served);
    let mut first = &waiting[0];
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut hello = [0u8; 18];
    first
        .read_exact(&mut hello)
        .expect("served once others left");
    assert_eq!(&hello[..8], b"NBDMAGIC");
}
