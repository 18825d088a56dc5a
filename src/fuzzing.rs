//! Entry points for the fuzz targets (`fuzz/`) and their stable replay
//! test (`tests/fuzz_replay.rs`): each takes arbitrary bytes, drives one
//! parser of untrusted input the way the daemon does, and panics only on
//! a defect (a panic inside rsd, a hang past its deadline, or a broken
//! invariant checked here). Not an API: the names may change at will.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;

use crate::qapi::Schema;

/// How long one input may run before it counts as a hang.
const DEADLINE: Duration = Duration::from_secs(10);

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| Schema::rsd(true))
}

/// A single-threaded runtime per fuzzing thread, as the export threads
/// run theirs. A future that outlives `DEADLINE` is a hang.
fn run<F: std::future::Future>(what: &str, f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime for fuzzing");
    }
    RT.with(|rt| {
        rt.block_on(async {
            match tokio::time::timeout(DEADLINE, f).await {
                Ok(v) => v,
                Err(_) => panic!("{what}: no progress within {DEADLINE:?}"),
            }
        })
    })
}

/// Split points for feeding a stream in pieces, taken from the input
/// itself, so the fuzzer controls how reads fall.
fn pieces(data: &[u8]) -> Vec<&[u8]> {
    let Some((&seed, rest)) = data.split_first() else {
        return vec![];
    };
    if seed == 0 {
        return vec![rest];
    }
    let step = usize::from(seed);
    rest.chunks(step).collect()
}

// ---------------------------------------------------------------------------
// QMP
// ---------------------------------------------------------------------------

/// The QMP input path: the stream parser fed in pieces, each message
/// through the request checks and argument validation (before and after
/// negotiation, as a session sees them), and every accepted value
/// written back and parsed again unchanged.
pub fn qmp(data: &[u8]) {
    use crate::qmp::json::{to_qmp_string, JsonStreamer};
    use crate::qmp::request::{handle, Action, SessionState};
    let mut streamer = JsonStreamer::new();
    let mut st = SessionState::default();
    for piece in pieces(data) {
        for msg in streamer.feed(piece) {
            if let Ok(v) = &msg {
                // The pretty layout of deep nesting grows as the square
                // of the depth: checked on shallow values only.
                let layouts: &[bool] = if depth(v) <= 32 {
                    &[false, true]
                } else {
                    &[false]
                };
                for &pretty in layouts {
                    let text = to_qmp_string(v, pretty);
                    assert!(text.is_ascii(), "QMP output is ASCII: {text:.200}");
                    let back = crate::qmp::parse_whole(&text);
                    if !has_float(v) {
                        assert_eq!(back.as_ref(), Ok(v), "round trip of {text:.200}");
                    } else {
                        assert!(back.is_ok(), "re-parse of {text:.200}: {back:?}");
                    }
                }
            }
            match handle(schema(), &mut st, msg) {
                Action::Negotiated(_) => st.negotiated = true,
                Action::Reply(r) => assert!(r.get("error").is_some(), "{r}"),
                Action::Execute { .. } => {}
            }
        }
    }
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Doubles are written as `%.17g`, which parses back to the same double
/// but not always the same JSON number (1e999 comes back finite).
fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(m) => m.values().any(has_float),
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// The keyval and QemuOpts parsers and every option that uses them
/// (`--blockdev`, `--export`, `--object`, `--monitor`, `--nbd-server`,
/// `--metrics-server`, `--chardev`), with QAPI validation behind them.
pub fn keyval(data: &[u8]) {
    use crate::cli::{keyval as kv, options};
    // argv is bytes; rsd takes it as UTF-8 with replacement (as
    // `std::env::args_os().to_string_lossy()`).
    let text = String::from_utf8_lossy(data);
    let s = schema();
    for implied in [None, Some("driver"), Some("qom-type")] {
        if let Ok(p) = kv::parse_keyval(&text, implied) {
            // The tree holds strings, objects and arrays only.
            assert!(only_keyval_leaves(&Value::Object(p.value)));
        }
        let _ = kv::parse_keyval_no_help(&text, implied);
    }
    let _ = kv::parse_qemu_opts(&text, "enable");
    let _ = options::chardev(&text, false);
    let _ = options::monitor(s, &text);
    let _ = options::object(s, &text);
    let _ = options::blockdev(s, &text);
    let _ = options::export(s, &text);
    let _ = options::nbd_server(s, &text);
    let _ = options::metrics_server(s, &text);
}

fn only_keyval_leaves(v: &Value) -> bool {
    match v {
        Value::String(_) => true,
        Value::Array(a) => a.iter().all(only_keyval_leaves),
        Value::Object(m) => m.values().all(only_keyval_leaves),
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// NBD
// ---------------------------------------------------------------------------

/// The NBD server's side of one connection: the bytes are everything
/// the client sends (the handshake, then requests), fed through an
/// in-memory stream to the real handshake and transmission code over a
/// 1 MiB writable `null-co` node (reads give zeroes). Whatever the
/// server writes back is read and dropped. A handshake or transmission
/// that does not end once the client's bytes are used up is a hang.
pub fn nbd(data: &[u8]) {
    use crate::block::child::Child;
    use crate::block::node::{CommonOptions, Node};
    use crate::block::null::NullDriver;
    use crate::nbd::export::{Export, ExportConfig, Exports};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let node = Node::new(
        "n".into(),
        Box::new(NullDriver::new("null-co", 1 << 20, true, 0)),
        CommonOptions::default(),
    );
    let export = Export::new(ExportConfig {
        id: "e".into(),
        name: "e".into(),
        description: Some("fuzz".into()),
        node: Child::new(node),
        writable: true,
        writethrough: false,
        allocation_depth: true,
        bitmaps: vec![],
        multi_conn: true,
        user: 0,
        placement: crate::iothread::Placement::new(false, None),
    });
    let exports = Exports::default();
    exports.0.add(export);
    let input = data.to_vec();
    let served = exports.clone();
    run("nbd", async move {
        // A socket pair: the handshake takes the server's real socket type.
        let Ok((client, server)) = tokio::net::UnixStream::pair() else {
            return;
        };
        let (mut c_rd, mut c_wr) = client.into_split();
        let sender = tokio::spawn(async move {
            let _ = c_wr.write_all(&input).await;
            let _ = c_wr.shutdown().await;
        });
        let sink = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            while matches!(c_rd.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        use crate::nbd::link::{Link, Sock};
        let mut link = Link::Plain(Sock::Unix(server));
        let shaken = crate::nbd::handshake::handshake(&mut link, &served, None).await;
        match (shaken, link) {
            (Ok(session), Link::Plain(Sock::Unix(s))) => {
                let (s_rd, s_wr) = s.into_split();
                let spin = Arc::new(std::sync::atomic::AtomicBool::new(false));
                crate::nbd::conn::transmission(Box::pin(s_rd), Box::pin(s_wr), session, spin).await;
            }
            // The server's end closes, so the client's reader ends.
            (_, link) => drop(link),
        }
        let _ = sender.await;
        let _ = sink.await;
    });
    exports.0.remove("e");
}

// ---------------------------------------------------------------------------
// qcow2
// ---------------------------------------------------------------------------

/// A qcow2 image file: the bytes are written to a file on tmpfs (or the
/// temporary directory), opened through the driver read-only and then
/// read-write (which repairs, drops stale bitmaps and writes back), and
/// read, mapped, written and closed at offsets chosen from the input.
pub fn qcow2(data: &[u8]) {
    use crate::block::file::{FileDriver, FileOptions};
    use crate::block::node::{CommonOptions, Node};
    use crate::block::qcow2::{read_header, Qcow2, Qcow2Options};

    let path = scratch_path("qcow2");
    for read_only in [true, false] {
        if std::fs::write(&path, data).is_err() {
            return;
        }
        let file = FileDriver::open(&FileOptions {
            filename: path.clone(),
            read_only,
            auto_read_only: false,
            direct: false,
            locking: false,
            driver: "file".into(),
            aio: Default::default(),
        });
        let Ok(file) = file else { continue };
        let file = Node::new("f".into(), Box::new(file), CommonOptions::default());
        let seed = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        run("qcow2", async move {
            let Ok(h) = read_header(&file).await else {
                return;
            };
            let opts = Qcow2Options {
                cache_clean_interval: Some(0),
                ..Default::default()
            };
            let Ok(q) = Qcow2::open(file, h, None, None, read_only, &opts).await else {
                return;
            };
            drive_qcow2(&q, seed, read_only).await;
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn drive_qcow2(q: &crate::block::qcow2::Qcow2, mut seed: u64, read_only: bool) {
    use crate::block::driver::{Driver, WriteFlags, ZeroFlags};
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let _ = crate::block::qcow2::format_specific(q);
    let _ = q.snapshots();
    let _ = q.dirty_bitmaps();
    let size = q.size();
    // Reads of a huge virtual disk stay small: at most 256 KiB each.
    let mut buf = vec![0u8; 256 << 10];
    let mut offsets = vec![0, size.saturating_sub(1) & !511];
    offsets.extend((0..6).map(|_| next() % size.max(1)));
    for off in offsets {
        let len = ((next() % (buf.len() as u64)) + 1).min(size - off.min(size)) as usize;
        let _ = q.read(off, &mut buf[..len]).await;
        // Mapping is bounded by the request, as in QEMU: 256 MiB at a
        // time keeps an input from walking a huge disk's whole metadata.
        let _ = q
            .block_status(off, (size - off.min(size)).min(256 << 20))
            .await;
        if read_only {
            continue;
        }
        match next() % 4 {
            0 => {
                let _ = q.write(off, &buf[..len], WriteFlags::default()).await;
            }
            1 => {
                let flags = ZeroFlags {
                    may_unmap: next() % 2 == 0,
                    ..Default::default()
                };
                let _ = q.write_zeroes(off, len as u64, flags).await;
            }
            2 => {
                let _ = q.discard(off, len as u64).await;
            }
            _ => {}
        }
    }
    if !read_only {
        let _ = q.flush().await;
    }
    let _ = q.close().await;
}

/// A file name of this process and thread for inputs written to disk,
/// on tmpfs when there is one.
fn scratch_path(what: &str) -> String {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm".to_string()
    } else {
        std::env::temp_dir().display().to_string()
    };
    let tid = nix::unistd::gettid();
    format!("{dir}/rsd-fuzz-{what}-{}-{tid}", std::process::id())
}

// ---------------------------------------------------------------------------
// vhost-user-blk
// ---------------------------------------------------------------------------

/// The vhost-user-blk data path on a guest memory the input fills: a
/// split virtqueue (descriptor table, avail and used rings at fixed
/// places), the chains it holds walked and each request parsed and run
/// on a 1 MiB `null-co` node, completions put in the used ring, and an
/// inflight region (also from the input) recovered first. Layout of the
/// input: byte 0 picks the queue size (a power of two up to 256) and
/// byte 1 the options (event-idx, an inflight region, read-only); then
/// the inflight region's bytes (when chosen, as long as one queue's
/// region), then guest memory from address 0.
pub fn vhost_user(data: &[u8]) {
    use crate::block::child::Child;
    use crate::block::node::{CommonOptions, Node};
    use crate::block::null::NullDriver;
    use crate::vhost_user::inflight::{queue_stride, QueueLog, Region};
    use crate::vhost_user::Shared;
    use std::sync::atomic::{AtomicBool, AtomicU8};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

    let [size_sel, opts, rest @ ..] = data else {
        return;
    };
    let size = 1u16 << (size_sel % 9);
    let (event_idx, inflight, read_only) = (opts & 1 != 0, opts & 2 != 0, opts & 4 != 0);
    let mut rest = rest;
    let log = if inflight {
        let Ok((region, file)) = Region::create(1, size) else {
            return;
        };
        let n = queue_stride(size).min(rest.len());
        let (mine, after) = rest.split_at(n);
        rest = after;
        if std::os::unix::fs::FileExt::write_all_at(&file, mine, 0).is_err() {
            return;
        }
        QueueLog::new(Arc::new(region), 0, size)
    } else {
        None
    };
    // Two adjacent regions (a buffer across them is refused) and one
    // far away.
    let ranges = [
        (GuestAddress(0), 64 << 10),
        (GuestAddress(64 << 10), 64 << 10),
        (GuestAddress(1 << 20), 4 << 10),
    ];
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&ranges) else {
        return;
    };
    let mut at = 0usize;
    for (start, len) in ranges {
        let n = len.min(rest.len().saturating_sub(at));
        if n > 0 && mem.write_slice(&rest[at..at + n], start).is_err() {
            return;
        }
        at += n;
    }
    let mut queue = match Queue::new(size) {
        Ok(q) => q,
        Err(_) => return,
    };
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x1000), Some(0));
    queue.set_used_ring_address(Some(0x2000), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    let mem = GuestMemoryAtomic::new(mem);
    if !queue.is_valid(&*mem.memory()) {
        return;
    }
    let node = Node::new(
        "n".into(),
        Box::new(NullDriver::new("null-co", 1 << 20, true, 0)),
        CommonOptions::default(),
    );
    let shared = Arc::new(Shared {
        node: Child::new(node),
        writable: !read_only,
        logical_block_size: if opts & 8 != 0 { 4096 } else { 512 },
        num_queues: 1,
        write_cache: AtomicBool::new(opts & 16 != 0),
        wce: AtomicU8::new(0),
        stats: Default::default(),
        placement: crate::iothread::Placement::new(false, None),
    });
    run(
        "vhost-user",
        crate::vhost_user::worker::fuzz_pass(shared, mem, queue, log),
    );
}
