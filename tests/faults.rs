//! Fault injection (issue 22): blkdebug's `inject-error` fails reads,
//! writes, write-zeroes, discards and flushes under every export and
//! every block job, and the NBD client driver loses its server. Each
//! case checks the documented answer and, where QSD can run the same
//! case, that QSD gives the same one:
//! - exports: the request gets the error (NBD: the errno's NBD error;
//!   vhost-user-blk: VIRTIO_BLK_S_IOERR; FUSE: the errno), nothing of a
//!   failed write lands, and the same connection serves the next
//!   request with the right data;
//! - jobs: each on-error policy's BLOCK_JOB_ERROR, the job's status and
//!   io-status, and after a stop the resumed job's data;
//! - nbd driver: past reconnect-delay a request fails with EIO and the
//!   job's policy applies.
//!
//! The tables below are the cases (docs/reliability.md counts them).
//! Rules use `iotype` with an event QEMU raises before that request (or
//! `once`), so rsd and QSD fail the same requests (differences entry 41).
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::nbd_wire::{self, Nbd};
use crate::common::*;
use crate::fuse::Aligned;
use crate::vhost_user::{Guest, T_DISCARD, T_FLUSH, T_IN, T_OUT, T_WRITE_ZEROES};
use std::os::unix::fs::OpenOptionsExt;

const EIO: i32 = 5;
const ENOSPC: i32 = 28;
/// Every case's image: 2 MiB of 0x11.
const IMG: u64 = 2 << 20;
/// Where the failing request goes: the rules name its first sector.
const BAD: u64 = 1 << 20;
const BAD_SECTOR: u64 = BAD / 512;
/// Where the request that must succeed afterwards goes.
const GOOD: u64 = 512 << 10;
const LEN: u32 = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Zero,
    Discard,
    Flush,
}

impl Op {
    const ALL: [Op; 5] = [Op::Read, Op::Write, Op::Zero, Op::Discard, Op::Flush];

    /// The rule failing this kind of request at BAD: the iotype and an
    /// event QEMU raises before it (a discard raises none, so QSD needs
    /// an earlier write's `write_aio`; a flush needs a write before it
    /// anyway, or QEMU skips it), with no sector for a flush.
    fn rule(self, errno: i32) -> String {
        let (event, iotype) = match self {
            Op::Read => ("read_aio", "read"),
            Op::Write => ("write_aio", "write"),
            Op::Zero => ("pwritev_zero", "write-zeroes"),
            Op::Discard => ("write_aio", "discard"),
            Op::Flush => ("flush_to_os", "flush"),
        };
        let sector = if self == Op::Flush {
            String::new()
        } else {
            format!(",\"sector\":{BAD_SECTOR}")
        };
        format!(r#"{{"event":"{event}","iotype":"{iotype}","errno":{errno}{sector}}}"#)
    }
}

/// One export case: the kind of request that fails, and its errno.
#[derive(Clone, Copy, Debug)]
struct Case {
    op: Op,
    errno: i32,
}

fn export_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for errno in [EIO, ENOSPC] {
        for op in Op::ALL {
            v.push(Case { op, errno });
        }
    }
    v
}

/// `raw` over `blkdebug` over `file` on `img`, named `name`, discards
/// passed down (QEMU drops them at a node without discard=unmap).
fn debug_node(name: &str, img: &str, rules: &str) -> String {
    format!(
        r#"{{"driver":"raw","node-name":"{name}","discard":"unmap","file":{{"driver":"blkdebug","node-name":"{name}-dbg","discard":"unmap","image":{{"driver":"file","filename":"{img}","discard":"unmap"}},"inject-error":[{rules}]}}}}"#
    )
}

fn filled_image(path: &str) {
    make_image(path, "raw", &IMG.to_string(), Some((0x11, "2M")));
}

/// A daemon's monitor, once it serves.
fn start(which: Which, dir: &TempDir, extra: Vec<String>) -> (Daemon, Qmp) {
    let mut a = monitor_args(&dir.s("q.sock"));
    a.extend(extra);
    let d = Daemon::spawn(which, &a);
    let q = Qmp::ready(&dir.path("q.sock"));
    (d, q)
}

/// Quits and waits for the daemon to exit (FUSE mounts go with it).
fn quit(mut d: Daemon, mut q: Qmp) {
    q.send(br#"{"execute":"quit"}"#);
    assert_eq!(d.wait_exit(30), Some(0), "{:?} did not quit", d.which);
}

// ---------------------------------------------------------------- NBD

/// What a run of requests gave, one line per request.
fn summary(what: &str, result: Result<Vec<u8>, String>) -> String {
    match result {
        Ok(d) if d.is_empty() => format!("{what}: ok"),
        Ok(d) => {
            let first = d[0];
            let same = d.iter().all(|b| *b == first);
            format!(
                "{what}: ok, {} bytes of {first:#x}{}",
                d.len(),
                if same { "" } else { " and others" }
            )
        }
        Err(e) => format!("{what}: {e}"),
    }
}

/// The requests every export case makes, as the case's transcript: the
/// failing request at BAD, the same kind elsewhere, and a read of BAD
/// (for a failed write, zeroing or discard: the old data is still there).
/// `io` runs one request; an error is its error code as text.
fn case_steps(
    c: Case,
    io: &mut dyn FnMut(Op, u64, u32, u8) -> Result<Vec<u8>, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    if matches!(c.op, Op::Discard | Op::Flush) {
        out.push(summary("write 0", io(Op::Write, 0, 4096, 0x22)));
    }
    out.push(summary(
        &format!("{:?} at BAD", c.op),
        io(c.op, BAD, LEN, 0x33),
    ));
    if c.op != Op::Flush {
        out.push(summary(
            &format!("{:?} at GOOD", c.op),
            io(c.op, GOOD, LEN, 0x44),
        ));
    }
    let read_at = if c.op == Op::Read {
        GOOD + u64::from(LEN)
    } else {
        BAD
    };
    out.push(summary("read after", io(Op::Read, read_at, LEN, 0)));
    out
}

/// What each case must give, whatever the export: the failing request's
/// error, then success, and the image's old data at BAD.
fn check_case(c: Case, lines: &[String], err_text: &str) {
    let text = lines.join("\n");
    let at_bad = lines
        .iter()
        .find(|l| l.contains("at BAD"))
        .expect("the failing request");
    assert!(at_bad.ends_with(err_text), "{c:?}: {text}");
    for l in lines.iter().filter(|l| !l.contains("at BAD")) {
        assert!(l.contains(": ok"), "{c:?}: {text}");
    }
    let last = lines.last().expect("the read after");
    assert!(
        last.ends_with(&format!("ok, {LEN} bytes of 0x11")),
        "{c:?}: {text}"
    );
}

/// One request on a client with simple replies (QSD drops a client
/// whose read fails when structured replies are on, differences entry
/// 51); an error is the server's NBD error as text.
fn nbd_io(n: &mut Nbd, op: Op, off: u64, len: u32, fill: u8) -> Result<Vec<u8>, String> {
    let done = match op {
        Op::Read => n.read(off, len),
        Op::Write => n.write(off, &vec![fill; len as usize]).map(|()| Vec::new()),
        Op::Zero => n.write_zeroes(off, len).map(|()| Vec::new()),
        Op::Discard => n.trim(off, len).map(|()| Vec::new()),
        Op::Flush => n.flush().map(|()| Vec::new()),
    };
    // The server's error is the answer; anything else fails the test.
    done.map_err(|e| match nbd_wire::nbd_errno(&e) {
        Some(errno) => format!("NBD error {errno}"),
        None => panic!("{op:?} at {off}: {e}"),
    })
}

fn nbd_transcripts(which: Which) -> Vec<Vec<String>> {
    let dir = TempDir::new();
    let cases = export_cases();
    let mut a = args(&[
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
    ]);
    for (i, c) in cases.iter().enumerate() {
        let img = dir.s(&format!("{i}.raw"));
        filled_image(&img);
        a.push("--blockdev".into());
        a.push(debug_node(&format!("n{i}"), &img, &c.op.rule(c.errno)));
        a.push("--export".into());
        a.push(format!("type=nbd,id=e{i},node-name=n{i},writable=on"));
    }
    let (d, q) = start(which, &dir, a);
    let mut out = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let mut n = Nbd::connect(&dir.path("n.sock"), &format!("n{i}")).expect("connect");
        out.push(case_steps(*c, &mut |op, off, len, fill| {
            nbd_io(&mut n, op, off, len, fill)
        }));
    }
    quit(d, q);
    out
}

/// NBD: each kind of request failed with EIO and ENOSPC gets NBD_EIO and
/// NBD_ENOSPC (the errno values), the connection serves the next request,
/// and QSD answers every request the same.
#[test]
fn nbd_export_answers_injected_errors_as_qsd() {
    let cases = export_cases();
    let all: Vec<Vec<Vec<String>>> = Which::all().into_iter().map(nbd_transcripts).collect();
    for (i, c) in cases.iter().enumerate() {
        check_case(*c, &all[0][i], &format!("NBD error {}", c.errno));
        if all.len() == 2 {
            assert_eq!(all[0][i], all[1][i], "{c:?}: rsd, then QSD");
        }
    }
}

/// The events a rule without `iotype` names, with `once`: which request
/// of a mixed run each fails (QEMU raises `read_aio`/`write_aio` in the
/// raw node above blkdebug, `pwritev`/`pwritev_zero` in the block layer
/// on blkdebug's own writes, `flush_to_os` on a flush of the raw node).
const EVENTS: [(&str, Op); 5] = [
    ("read_aio", Op::Read),
    ("write_aio", Op::Write),
    ("pwritev", Op::Write),
    ("pwritev_zero", Op::Zero),
    ("flush_to_os", Op::Flush),
];

fn event_transcripts(which: Which) -> Vec<Vec<String>> {
    let dir = TempDir::new();
    let mut a = args(&[
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
    ]);
    for (i, (event, _)) in EVENTS.iter().enumerate() {
        let img = dir.s(&format!("{i}.raw"));
        filled_image(&img);
        let rule = format!(r#"{{"event":"{event}","once":true,"errno":{EIO}}}"#);
        a.push("--blockdev".into());
        a.push(debug_node(&format!("n{i}"), &img, &rule));
        a.push("--export".into());
        a.push(format!("type=nbd,id=e{i},node-name=n{i},writable=on"));
    }
    let (d, q) = start(which, &dir, a);
    let mut out = Vec::new();
    for i in 0..EVENTS.len() {
        let mut n = Nbd::connect(&dir.path("n.sock"), &format!("n{i}")).expect("connect");
        let mut lines = Vec::new();
        // Each kind twice: `once` fails only the first of its kind.
        for round in 0..2u64 {
            let base = round * (512 << 10);
            for (op, off) in [
                (Op::Zero, base),
                (Op::Write, base + 64 * 1024),
                (Op::Read, base + 128 * 1024),
                (Op::Flush, 0),
                (Op::Discard, base + 192 * 1024),
            ] {
                let r = nbd_io(&mut n, op, off, LEN, 0x44);
                lines.push(summary(&format!("{op:?} {off}"), r));
            }
        }
        out.push(lines);
    }
    quit(d, q);
    out
}

/// Each event fails the first request of its kind, once, and nothing
/// else, in rsd as in QSD.
#[test]
fn blkdebug_events_fail_the_requests_qsd_fails() {
    let all: Vec<Vec<Vec<String>>> = Which::all().into_iter().map(event_transcripts).collect();
    for (i, (event, op)) in EVENTS.iter().enumerate() {
        let lines = &all[0][i];
        let failed: Vec<&String> = lines.iter().filter(|l| l.contains("error")).collect();
        assert_eq!(failed.len(), 1, "{event}: {lines:#?}");
        assert!(
            failed[0].starts_with(&format!("{op:?} ")),
            "{event}: {lines:#?}"
        );
        if all.len() == 2 {
            assert_eq!(all[0][i], all[1][i], "{event}: rsd, then QSD");
        }
    }
}

// ------------------------------------------------------ vhost-user-blk

fn vhost_io(g: &mut Guest, op: Op, off: u64, len: u32, fill: u8) -> Result<Vec<u8>, String> {
    let sector = off / 512;
    let data = vec![fill; len as usize];
    let seg = |s, n| Guest::discard_seg(s, n, 0);
    let req = match op {
        Op::Read => g.req(T_IN, sector, &[], &[len]),
        Op::Write => g.req(T_OUT, sector, &[&data], &[]),
        Op::Zero => g.req(T_WRITE_ZEROES, 0, &[&seg(sector, len / 512)], &[]),
        Op::Discard => g.req(T_DISCARD, 0, &[&seg(sector, len / 512)], &[]),
        Op::Flush => g.req(T_FLUSH, 0, &[], &[]),
    };
    let a = g.submit(0, vec![req]).pop().expect("an answer");
    match a.status {
        Some(0) => Ok(a.data),
        other => Err(format!("status {other:?}")),
    }
}

fn vhost_transcripts(which: Which) -> Vec<Vec<String>> {
    let dir = TempDir::new();
    let cases = export_cases();
    let mut a = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let img = dir.s(&format!("{i}.raw"));
        filled_image(&img);
        a.push("--blockdev".into());
        a.push(debug_node(&format!("v{i}"), &img, &c.op.rule(c.errno)));
        a.push("--export".into());
        a.push(format!(
            "type=vhost-user-blk,id=e{i},node-name=v{i},writable=on,addr.type=unix,addr.path={}",
            dir.s(&format!("v{i}.sock"))
        ));
    }
    let (d, q) = start(which, &dir, a);
    let mut out = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let mut g = Guest::connect(&dir.path(&format!("v{i}.sock")), 1);
        out.push(case_steps(*c, &mut |op, off, len, fill| {
            vhost_io(&mut g, op, off, len, fill)
        }));
    }
    quit(d, q);
    out
}

/// vhost-user-blk: every injected error is VIRTIO_BLK_S_IOERR (1) and
/// the queue serves the next request, as in QSD.
#[test]
fn vhost_user_export_answers_injected_errors_as_qsd() {
    let cases = export_cases();
    let all: Vec<Vec<Vec<String>>> = Which::all().into_iter().map(vhost_transcripts).collect();
    for (i, c) in cases.iter().enumerate() {
        check_case(*c, &all[0][i], "status Some(1)");
        if all.len() == 2 {
            assert_eq!(all[0][i], all[1][i], "{c:?}: rsd, then QSD");
        }
    }
}

// ---------------------------------------------------------------- FUSE

fn fuse_io(f: &std::fs::File, op: Op, off: u64, len: u32, fill: u8) -> Result<Vec<u8>, String> {
    use nix::fcntl::{fallocate, FallocateFlags as F};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let mut buf = Aligned::new(len as usize, fill);
    let errno = |e: std::io::Error| format!("errno {}", e.raw_os_error().unwrap_or(0));
    let keep = F::FALLOC_FL_KEEP_SIZE;
    let (off_t, len_t) = (off as i64, i64::from(len));
    match op {
        Op::Read => {
            let n = f.read_at(buf.buf(), off).map_err(errno)?;
            Ok(buf.buf()[..n].to_vec())
        }
        Op::Write => f
            .write_at(buf.buf(), off)
            .map(|_| Vec::new())
            .map_err(errno),
        Op::Zero => fallocate(f.as_raw_fd(), F::FALLOC_FL_ZERO_RANGE | keep, off_t, len_t)
            .map(|_| Vec::new())
            .map_err(|e| errno(e.into())),
        Op::Discard => fallocate(f.as_raw_fd(), F::FALLOC_FL_PUNCH_HOLE | keep, off_t, len_t)
            .map(|_| Vec::new())
            .map_err(|e| errno(e.into())),
        Op::Flush => f.sync_all().map(|_| Vec::new()).map_err(errno),
    }
}

fn fuse_transcripts(which: Which) -> Vec<Vec<String>> {
    let dir = TempDir::new();
    let cases = export_cases();
    let mut a = Vec::new();
    let mounts: Vec<String> = (0..cases.len()).map(|i| dir.s(&format!("m{i}"))).collect();
    for (i, c) in cases.iter().enumerate() {
        let img = dir.s(&format!("{i}.raw"));
        filled_image(&img);
        std::fs::write(&mounts[i], b"").expect("mount point");
        a.push("--blockdev".into());
        // A punched hole is a write-zeroes that may unmap, in QSD as in
        // rsd (FUSE has no discard), so the zeroes' rule fails it.
        let rule_op = if c.op == Op::Discard { Op::Zero } else { c.op };
        a.push(debug_node(&format!("f{i}"), &img, &rule_op.rule(c.errno)));
        a.push("--export".into());
        a.push(format!(
            "type=fuse,id=e{i},node-name=f{i},writable=on,mountpoint={}",
            mounts[i]
        ));
    }
    let (d, q) = start(which, &dir, a);
    let mut out = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        crate::fuse::wait_mount(&mounts[i], true);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&mounts[i])
            .expect("open the mount with O_DIRECT");
        out.push(case_steps(*c, &mut |op, off, len, fill| {
            fuse_io(&f, op, off, len, fill)
        }));
    }
    quit(d, q);
    for m in &mounts {
        crate::fuse::wait_mount(m, false);
    }
    out
}

/// FUSE: the system call fails with the injected errno and the mount
/// serves the next one, as in QSD.
#[test]
fn fuse_export_answers_injected_errors_as_qsd() {
    if crate::fuse::fuse_missing() {
        return;
    }
    let cases = export_cases();
    let all: Vec<Vec<Vec<String>>> = Which::all().into_iter().map(fuse_transcripts).collect();
    for (i, c) in cases.iter().enumerate() {
        check_case(*c, &all[0][i], &format!("errno {}", c.errno));
        if all.len() == 2 {
            assert_eq!(all[0][i], all[1][i], "{c:?}: rsd, then QSD");
        }
    }
}

// ---------------------------------------------------------------- jobs

/// The block jobs and where their error comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JobKind {
    /// blockdev-mirror, the source failing a read / the target a write.
    MirrorSource,
    MirrorTarget,
    /// blockdev-backup, likewise.
    BackupSource,
    BackupTarget,
    /// block-stream, the backing node failing a read.
    Stream,
    /// block-commit of an intermediate layer, the base failing a write.
    Commit,
    /// block-commit of the active layer (a mirror), the base failing a write.
    ActiveCommit,
}

impl JobKind {
    fn operation(self) -> &'static str {
        match self {
            JobKind::MirrorSource | JobKind::BackupSource | JobKind::Stream => "read",
            _ => "write",
        }
    }
}

/// The policies, each with the errno injected: enospc stops on ENOSPC
/// and reports anything else.
const POLICIES: [(&str, i32); 5] = [
    ("report", EIO),
    ("ignore", EIO),
    ("stop", EIO),
    ("enospc", ENOSPC),
    ("enospc", EIO),
];

/// The action a policy takes for an errno.
fn action(policy: &str, errno: i32) -> &'static str {
    match (policy, errno) {
        ("ignore", _) => "ignore",
        ("stop", _) | ("enospc", ENOSPC) => "stop",
        _ => "report",
    }
}

/// A rule failing one request (`once`) of the job's at BAD.
fn once_rule(op: &str, errno: i32) -> String {
    let (event, iotype) = if op == "read" {
        ("read_aio", "read")
    } else {
        ("write_aio", "write")
    };
    format!(
        r#"{{"event":"{event}","iotype":"{iotype}","errno":{errno},"sector":{BAD_SECTOR},"once":true}}"#
    )
}

fn raw_node(name: &str, img: &str) -> String {
    format!(
        r#"{{"driver":"raw","node-name":"{name}","file":{{"driver":"file","filename":"{img}"}}}}"#
    )
}

fn qcow2_node(name: &str, img: &str, backing: &str) -> String {
    format!(
        r#"{{"driver":"qcow2","node-name":"{name}","file":{{"driver":"file","filename":"{img}"}},"backing":"{backing}"}}"#
    )
}

/// Images and nodes of case `i` of `kind`, and the command starting
/// its job `j{i}`.
fn job_setup(
    kind: JobKind,
    dir: &TempDir,
    i: usize,
    policy: &str,
    errno: i32,
) -> (Vec<String>, String) {
    let f = |n: &str| {
        dir.s(&format!(
            "{n}{i}.{}",
            if n == "s" || n == "t" || n == "b" {
                "raw"
            } else {
                "qcow2"
            }
        ))
    };
    let rule = once_rule(kind.operation(), errno);
    let id = format!("j{i}");
    match kind {
        JobKind::MirrorSource
        | JobKind::MirrorTarget
        | JobKind::BackupSource
        | JobKind::BackupTarget => {
            filled_image(&f("s"));
            make_image(&f("t"), "raw", &IMG.to_string(), None);
            let source_fails = matches!(kind, JobKind::MirrorSource | JobKind::BackupSource);
            let (src, tgt) = if source_fails {
                (
                    debug_node(&format!("src{i}"), &f("s"), &rule),
                    raw_node(&format!("tgt{i}"), &f("t")),
                )
            } else {
                (
                    raw_node(&format!("src{i}"), &f("s")),
                    debug_node(&format!("tgt{i}"), &f("t"), &rule),
                )
            };
            let side = if source_fails {
                "on-source-error"
            } else {
                "on-target-error"
            };
            let verb = if matches!(kind, JobKind::MirrorSource | JobKind::MirrorTarget) {
                "blockdev-mirror"
            } else {
                "blockdev-backup"
            };
            // QEMU's backup may offload a copy (copy_range), which raises
            // no read or write event: off, as rsd always reads and writes.
            let perf = if verb == "blockdev-backup" {
                r#","x-perf":{"use-copy-range":false}"#
            } else {
                ""
            };
            let cmd = format!(
                r#"{{"execute":"{verb}","arguments":{{"job-id":"{id}","device":"src{i}","target":"tgt{i}","sync":"full","{side}":"{policy}"{perf}}}}}"#
            );
            (vec![src, tgt], cmd)
        }
        JobKind::Stream => {
            filled_image(&f("b"));
            let top = f("top");
            ok(&run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "raw",
                    "-b",
                    &f("b"),
                    &top,
                ],
            ));
            let cmd = format!(
                r#"{{"execute":"block-stream","arguments":{{"job-id":"{id}","device":"top{i}","on-error":"{policy}"}}}}"#
            );
            (
                vec![
                    debug_node(&format!("base{i}"), &f("b"), &rule),
                    qcow2_node(&format!("top{i}"), &top, &format!("base{i}")),
                ],
                cmd,
            )
        }
        JobKind::Commit | JobKind::ActiveCommit => {
            make_image(&f("b"), "raw", &IMG.to_string(), None);
            let (mid, top) = (f("mid"), f("top"));
            let mut nodes = vec![debug_node(&format!("base{i}"), &f("b"), &rule)];
            // The data to commit is 0x22 over all of the layer committed.
            let layer = if kind == JobKind::Commit { &mid } else { &top };
            ok(&run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "raw",
                    "-b",
                    &f("b"),
                    layer,
                ],
            ));
            ok(&run(
                "qemu-io",
                &["-f", "qcow2", "-c", "write -q -P 0x22 0 2M", layer],
            ));
            let cmd = if kind == JobKind::Commit {
                ok(&run(
                    "qemu-img",
                    &[
                        "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &mid, &top,
                    ],
                ));
                nodes.push(qcow2_node(&format!("mid{i}"), &mid, &format!("base{i}")));
                nodes.push(qcow2_node(&format!("top{i}"), &top, &format!("mid{i}")));
                format!(
                    r#"{{"execute":"block-commit","arguments":{{"job-id":"{id}","device":"top{i}","top-node":"mid{i}","base-node":"base{i}","on-error":"{policy}"}}}}"#
                )
            } else {
                nodes.push(qcow2_node(&format!("top{i}"), &top, &format!("base{i}")));
                format!(
                    r#"{{"execute":"block-commit","arguments":{{"job-id":"{id}","device":"top{i}","on-error":"{policy}"}}}}"#
                )
            };
            (nodes, cmd)
        }
    }
}

/// After the daemon quit: the data a job that succeeded leaves.
fn job_data_ok(kind: JobKind, dir: &TempDir, i: usize) -> Result<(), String> {
    let f = |n: &str, ext: &str| dir.s(&format!("{n}{i}.{ext}"));
    let out = match kind {
        JobKind::MirrorSource
        | JobKind::MirrorTarget
        | JobKind::BackupSource
        | JobKind::BackupTarget => run(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "raw",
                "-F",
                "raw",
                &f("s", "raw"),
                &f("t", "raw"),
            ],
        ),
        // The top holds everything, its backing file gone.
        JobKind::Stream => run(
            "qemu-io",
            &[
                "-c",
                "read -q -P 0x11 0 2M",
                &format!(
                    r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}},"backing":null}}"#,
                    f("top", "qcow2")
                ),
            ],
        ),
        JobKind::Commit | JobKind::ActiveCommit => run(
            "qemu-io",
            &["-f", "raw", "-c", "read -q -P 0x22 0 2M", &f("b", "raw")],
        ),
    };
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && !text.contains("fail") {
        Ok(())
    } else {
        Err(text)
    }
}

/// Runs every policy's job of `kind`, one after the other, in one daemon and returns
/// each job's transcript: its status changes, errors, end, the state a
/// stopped job is in (query-block-jobs) before it is resumed, and
/// whether its data is right afterwards. A READY job is completed.
fn job_transcripts(which: Which, kind: JobKind) -> Vec<Vec<String>> {
    let dir = TempDir::new();
    let mut a = Vec::new();
    let mut cmds = Vec::new();
    for (i, (policy, errno)) in POLICIES.iter().enumerate() {
        let (nodes, cmd) = job_setup(kind, &dir, i, policy, *errno);
        for n in nodes {
            a.push("--blockdev".into());
            a.push(n);
        }
        cmds.push(cmd);
    }
    let (d, mut q) = start(which, &dir, a);
    let n = POLICIES.len();
    let mut log: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut stopped = vec![false; n];
    let mut gone = vec![false; n];
    // Replies come in order: what each one answers (None: nothing kept).
    let mut awaiting: std::collections::VecDeque<Option<usize>> = Default::default();
    // One job at a time: in QSD a job's start drains the graph, which
    // can make another job's blkdebug rule miss its request.
    q.send(cmds[0].as_bytes());
    awaiting.push_back(None);
    let job = |v: &serde_json::Value, key: &str| -> Option<usize> {
        v["data"][key].as_str()?.strip_prefix('j')?.parse().ok()
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while gone.iter().any(|g| !g) {
        assert!(
            Instant::now() < deadline,
            "{which:?} {kind:?}: jobs never ended: {log:#?}"
        );
        if !q.readable_within(200) {
            continue;
        }
        let l = q.line();
        assert!(!l.is_empty(), "{which:?}: EOF");
        let v: serde_json::Value = serde_json::from_str(&l).expect("json");
        if v.get("return").is_some() || v.get("error").is_some() {
            match awaiting.pop_front().flatten() {
                Some(i) => {
                    let jobs = v["return"].as_array().cloned().unwrap_or_default();
                    let me = jobs.iter().find(|j| j["device"] == format!("j{i}"));
                    let me = me.cloned().unwrap_or_default();
                    log[i].push(format!(
                        "query: status {} io-status {}",
                        me["status"], me["io-status"]
                    ));
                    q.send(
                        format!(r#"{{"execute":"job-resume","arguments":{{"id":"j{i}"}}}}"#)
                            .as_bytes(),
                    );
                    awaiting.push_back(None);
                }
                None => assert!(v.get("error").is_none(), "{which:?} {kind:?}: {v} {log:#?}"),
            }
            continue;
        }
        let event = v["event"].as_str().unwrap_or_default();
        match event {
            "JOB_STATUS_CHANGE" => {
                let Some(i) = job(&v, "id") else { continue };
                let status = v["data"]["status"].as_str().unwrap_or_default().to_string();
                // QSD pauses every job while another's command drains the
                // graph (paused/running, standby/ready passes): only the
                // first running and ready are kept; a stop's pause shows in
                // the query below.
                let seen = log[i].contains(&status);
                let transient = matches!(status.as_str(), "paused" | "standby")
                    || (seen && matches!(status.as_str(), "running" | "ready"));
                if !transient {
                    log[i].push(status.clone());
                }
                if status == "ready" && !seen {
                    q.send(
                        format!(r#"{{"execute":"job-complete","arguments":{{"id":"j{i}"}}}}"#)
                            .as_bytes(),
                    );
                    awaiting.push_back(None);
                }
                if status == "paused" && stopped[i] {
                    stopped[i] = false;
                    q.send(br#"{"execute":"query-block-jobs"}"#);
                    awaiting.push_back(Some(i));
                }
                if status == "null" {
                    gone[i] = true;
                    if let Some(c) = cmds.get(i + 1) {
                        q.send(c.as_bytes());
                        awaiting.push_back(None);
                    }
                }
            }
            "BLOCK_JOB_ERROR" => {
                let Some(i) = job(&v, "device") else { continue };
                let d = &v["data"];
                log[i].push(format!(
                    "BLOCK_JOB_ERROR {} {}",
                    d["operation"], d["action"]
                ));
                stopped[i] |= d["action"] == "stop";
            }
            "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => {
                let Some(i) = job(&v, "device") else { continue };
                let d = &v["data"];
                log[i].push(format!("{event} error {}", d["error"]));
            }
            _ => {}
        }
    }
    quit(d, q);
    for (i, l) in log.iter_mut().enumerate() {
        let data = match job_data_ok(kind, &dir, i) {
            Ok(()) => "data right".to_string(),
            Err(_) => "data not copied".to_string(),
        };
        l.push(data);
    }
    log
}

/// Checks one job's transcript against its policy: one BLOCK_JOB_ERROR
/// with the policy's action; report ends the job with the error; stop
/// leaves it paused with io-status failed (nospace for ENOSPC) until
/// resumed, and then it ends well with the right data.
fn check_job(kind: JobKind, policy: &str, errno: i32, log: &[String]) {
    let text = format!("{kind:?} {policy} errno {errno}: {log:#?}");
    let act = action(policy, errno);
    let err_line = format!("BLOCK_JOB_ERROR \"{}\" \"{act}\"", kind.operation());
    assert_eq!(log.iter().filter(|l| **l == err_line).count(), 1, "{text}");
    let end = log
        .iter()
        .find(|l| l.starts_with("BLOCK_JOB_COMPLETED") || l.starts_with("BLOCK_JOB_CANCELLED"))
        .expect("an end event");
    let last = |n: usize| log.iter().rev().nth(n).map(String::as_str);
    assert_eq!(last(1), Some("null"), "{text}");
    match act {
        "report" => {
            let msg = if errno == ENOSPC {
                "No space left on device"
            } else {
                "Input/output error"
            };
            assert!(end.contains(msg), "{text}");
            assert!(log.contains(&"aborting".to_string()), "{text}");
        }
        "stop" => {
            let io = if errno == ENOSPC { "nospace" } else { "failed" };
            let query = format!("query: status \"paused\" io-status \"{io}\"");
            assert!(log.contains(&query), "{text}");
            assert!(end.ends_with("error null"), "{text}");
            assert_eq!(last(0), Some("data right"), "{text}");
        }
        _ => {}
    }
}

fn jobs_as_qsd(kind: JobKind) {
    let all: Vec<Vec<Vec<String>>> = Which::all()
        .into_iter()
        .map(|w| job_transcripts(w, kind))
        .collect();
    for (i, (policy, errno)) in POLICIES.iter().enumerate() {
        check_job(kind, policy, *errno, &all[0][i]);
        if all.len() == 2 {
            assert_eq!(
                all[0][i], all[1][i],
                "{kind:?} {policy} errno {errno}: rsd, then QSD"
            );
        }
    }
}

#[test]
fn mirror_source_errors_follow_each_policy_as_qsd() {
    jobs_as_qsd(JobKind::MirrorSource);
}

#[test]
fn mirror_target_errors_follow_each_policy_as_qsd() {
    jobs_as_qsd(JobKind::MirrorTarget);
}

#[test]
fn backup_source_errors_follow_each_policy_as_qsd() {
    jobs_as_qsd(JobKind::BackupSource);
}

#[test]
fn backup_target_errors_follow_each_policy_as_qsd() {
    jobs_as_qsd(JobKind::BackupTarget);
}

#[test]
fn stream_errors_follow_each_policy_as_qsd() {
    jobs_as_qsd(JobKind::Stream);
}

#[test]
fn commit_errors_follow_each_policy_as_qsd() {
    jobs_as_qsd(JobKind::Commit);
}

#[test]
fn active_commit_errors_follow_each_policy_as_qsd() {
    jobs_as_qsd(JobKind::ActiveCommit);
}

// ------------------------------------------------ nbd driver reconnect

/// qemu-nbd serving `img` as "disk" on `sock`.
fn nbd_server(img: &str, sock: &str) -> std::process::Child {
    let child = std::process::Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "disk", "-k", sock, "--persistent", img])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    assert!(wait_for_path(Path::new(sock), 10), "qemu-nbd: no socket");
    child
}

fn reconnect_transcript(which: Which) -> Vec<String> {
    let dir = TempDir::new();
    let img = dir.s("back.raw");
    filled_image(&img);
    let back = dir.s("back.sock");
    let mut server = nbd_server(&img, &back);
    let a = args(&[
        "--blockdev",
        &format!("driver=nbd,node-name=remote,server.type=unix,server.path={back},export=disk,reconnect-delay=1"),
        "--nbd-server",
        &format!("addr.type=unix,addr.path={}", dir.s("front.sock")),
        "--export",
        "type=nbd,id=e,node-name=remote,writable=on",
    ]);
    let (d, q) = start(which, &dir, a);
    let mut n = Nbd::connect(&dir.path("front.sock"), "remote").expect("connect");
    let mut out = vec![summary("read", nbd_io(&mut n, Op::Read, 0, LEN, 0))];
    // The server goes: past reconnect-delay the request fails with EIO.
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_file(&back);
    let t = Instant::now();
    out.push(summary(
        "read, server gone",
        nbd_io(&mut n, Op::Read, 0, LEN, 0),
    ));
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "{which:?}: waited {:?}",
        t.elapsed()
    );
    // It comes back: the node connects again and the export serves.
    let mut server = nbd_server(&img, &back);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let r = nbd_io(&mut n, Op::Read, GOOD, LEN, 0);
        if r.is_ok() || Instant::now() > until {
            out.push(summary("read, server back", r));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    quit(d, q);
    let _ = server.kill();
    let _ = server.wait();
    out
}

/// An export over the nbd driver whose server goes away: past
/// reconnect-delay the client's request gets NBD_EIO, the connection
/// stays, and once the server is back requests succeed, as in QSD.
/// (Within the delay the request waits and succeeds:
/// nbd_client::nbd_node_reconnects_within_the_delay.)
#[test]
fn nbd_driver_past_reconnect_delay_fails_with_eio_as_qsd() {
    let all: Vec<Vec<String>> = Which::all().into_iter().map(reconnect_transcript).collect();
    let want = [
        format!("read: ok, {LEN} bytes of 0x11"),
        "read, server gone: NBD error 5".to_string(),
        format!("read, server back: ok, {LEN} bytes of 0x11"),
    ];
    assert_eq!(all[0], want, "rsd");
    if all.len() == 2 {
        assert_eq!(all[0], all[1], "rsd, then QSD");
    }
}

/// A rule with a `sector` never fails a flush (a flush covers no
/// sector in QEMU's blkdebug), in rsd as in QSD.
#[test]
fn a_sector_rule_never_fails_a_flush_as_qsd() {
    for which in Which::all() {
        let dir = TempDir::new();
        let img = dir.s("0.raw");
        filled_image(&img);
        let rule =
            format!(r#"{{"event":"flush_to_os","iotype":"flush","errno":{EIO},"sector":0}}"#);
        let a = vec![
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", dir.s("n.sock")),
            "--blockdev".into(),
            debug_node("n0", &img, &rule),
            "--export".into(),
            "type=nbd,id=e0,node-name=n0,writable=on".into(),
        ];
        let (d, q) = start(which, &dir, a);
        let mut n = Nbd::connect(&dir.path("n.sock"), "n0").expect("connect");
        assert_eq!(
            nbd_io(&mut n, Op::Write, 0, 4096, 0x22),
            Ok(Vec::new()),
            "{which:?}"
        );
        assert_eq!(
            nbd_io(&mut n, Op::Flush, 0, 0, 0),
            Ok(Vec::new()),
            "{which:?}"
        );
        quit(d, q);
    }
}
