//! vhost-user-blk load generator: a frontend (the `vhost` crate's) that
//! drives a vhost-user-blk socket with N queues, each kept at a given
//! depth by a thread of its own, as a guest with one vCPU per queue.
//!
//! Guest memory is a memfd shared with the server; each queue is a split
//! virtqueue with event-idx (as Linux guests use it): the thread sleeps
//! on its call eventfd, reaps what completed, puts a new request in each
//! freed slot and kicks only when the server asks for kicks.
//!
//! Prints one JSON line on stdout: I/Os, bytes, seconds, IOPS, MiB/s and,
//! with --pid, the server's CPU time (utime+stime of /proc/PID/stat) per
//! I/O in microseconds. bench/vhost.py runs it against rsd and QSD.
//!
//! `--rw verify` checks data instead: each slot owns the blocks whose
//! number is its own modulo the slots of all queues, writes a pattern
//! naming the block and a generation to one of them, reads it back and
//! compares; a difference counts as a failed request (bench/soak.py).
//!
//! Build: cargo build --release --example vhost-bench
//! Run:   target/release/examples/vhost-bench --socket PATH
//!            [--queues 1] [--depth 32] [--rw randread|randwrite|read|write|verify]
//!            [--bs 4096] [--runtime 5] [--size BYTES] [--pid SERVER_PID]
use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const F_EVENT_IDX: u64 = 1 << 29;
const F_LOG_ALL: u64 = 1 << 26;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
/// Guest-physical base of the memory (not 0, as a real guest's RAM).
const MEM_BASE: u64 = 1 << 20;
const PAGE: u64 = 4096;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, PartialEq)]
enum Rw {
    RandRead,
    RandWrite,
    Read,
    Write,
    /// Write a block, read it back, compare.
    Verify,
}

impl Rw {
    fn parse(s: &str) -> Result<Rw, Error> {
        Ok(match s {
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            "read" => Rw::Read,
            "write" => Rw::Write,
            "verify" => Rw::Verify,
            _ => return Err(format!("unknown --rw {s}").into()),
        })
    }
    fn writes(self) -> bool {
        matches!(self, Rw::RandWrite | Rw::Write)
    }
    fn random(self) -> bool {
        matches!(self, Rw::RandRead | Rw::RandWrite)
    }
}

struct Opts {
    socket: PathBuf,
    queues: usize,
    depth: usize,
    rw: Rw,
    bs: u64,
    runtime: Duration,
    size: Option<u64>,
    pid: Option<u32>,
}

fn parse_args() -> Result<Opts, Error> {
    let mut o = Opts {
        socket: PathBuf::new(),
        queues: 1,
        depth: 32,
        rw: Rw::RandRead,
        bs: 4096,
        runtime: Duration::from_secs(5),
        size: None,
        pid: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        // `cargo bench`-style runners may pass --bench; ignore it.
        if k == "--bench" {
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--socket" => o.socket = PathBuf::from(v),
            "--queues" => o.queues = v.parse()?,
            "--depth" => o.depth = v.parse()?,
            "--rw" => o.rw = Rw::parse(v)?,
            "--bs" => o.bs = v.parse()?,
            "--runtime" => o.runtime = Duration::from_secs_f64(v.parse()?),
            "--size" => o.size = Some(v.parse()?),
            "--pid" => o.pid = Some(v.parse()?),
            _ => return Err(format!("unknown option {k}").into()),
        }
    }
    if o.socket.as_os_str().is_empty() {
        return Err("--socket is required".into());
    }
    if o.queues == 0 || o.depth == 0 || o.bs == 0 || !o.bs.is_multiple_of(512) {
        return Err("--queues, --depth and --bs must be positive (--bs in sectors)".into());
    }
    // Three descriptors a request; the ring holds at most 1024.
    if o.depth * 3 > 1024 {
        return Err("--depth is at most 341".into());
    }
    Ok(o)
}

/// Where one queue's rings and buffers are in guest memory.
#[derive(Clone, Copy)]
struct Layout {
    qsize: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Per slot: a 16-byte header, then the status byte.
    hdrs: u64,
    data: u64,
    end: u64,
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl Layout {
    fn new(base: u64, depth: usize, bs: u64) -> Layout {
        let qsize = (depth as u64 * 3).next_power_of_two().max(16);
        let desc = base;
        let avail = desc + 16 * qsize;
        let used = align(avail + 6 + 2 * qsize, PAGE);
        let hdrs = align(used + 6 + 8 * qsize, PAGE);
        let data = align(hdrs + 32 * depth as u64, PAGE);
        let end = data + align(bs, PAGE) * depth as u64;
        Layout {
            qsize: qsize as u16,
            desc,
            avail,
            used,
            hdrs,
            data,
            end,
        }
    }
    fn hdr(&self, slot: usize) -> u64 {
        self.hdrs + 32 * slot as u64
    }
    fn buf(&self, slot: usize, bs: u64) -> u64 {
        self.data + align(bs, PAGE) * slot as u64
    }
    /// used_event: the avail ring's last field.
    fn used_event(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.qsize)
    }
    /// avail_event: the used ring's last field.
    fn avail_event(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.qsize)
    }
}

/// The device's answer to "kick now?" (virtio's vring_need_event).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// What every queue thread shares.
struct Shared {
    mem: GuestMemoryMmap,
    running: AtomicBool,
    ios: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    /// The next offset of a sequential workload (all queues share it).
    seq: AtomicU64,
    event_idx: bool,
    rw: Rw,
    bs: u64,
    /// Requests land in [0, span).
    span: u64,
    queues: usize,
}

impl Shared {
    fn next_offset(&self, rng: &mut u64) -> u64 {
        let blocks = self.span / self.bs;
        let n = if self.rw.random() {
            // xorshift64*
            *rng ^= *rng >> 12;
            *rng ^= *rng << 25;
            *rng ^= *rng >> 27;
            rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks
        } else {
            self.seq.fetch_add(1, Ordering::Relaxed) % blocks
        };
        n * self.bs
    }
}

struct Queue {
    lay: Layout,
    kick: EventFd,
    call: EventFd,
    depth: usize,
}

fn ga(a: u64) -> GuestAddress {
    GuestAddress(a)
}

/// Writes slot `slot`'s three descriptors (header, data, status); they
/// never change, only the header's contents do.
fn write_chain(mem: &GuestMemoryMmap, q: &Queue, slot: usize, sh: &Shared) -> Result<(), Error> {
    let head = 3 * slot as u64;
    let data_flags = if sh.rw.writes() {
        0
    } else {
        VIRTQ_DESC_F_WRITE
    };
    let descs = [
        (q.lay.hdr(slot), 16u32, VIRTQ_DESC_F_NEXT),
        (
            q.lay.buf(slot, sh.bs),
            sh.bs as u32,
            data_flags | VIRTQ_DESC_F_NEXT,
        ),
        (q.lay.hdr(slot) + 16, 1, VIRTQ_DESC_F_WRITE),
    ];
    for (i, (addr, len, flags)) in descs.iter().enumerate() {
        let at = q.lay.desc + 16 * (head + i as u64);
        let next = if i < 2 { head as u16 + i as u16 + 1 } else { 0 };
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, ga(at))?;
    }
    Ok(())
}

/// Sets the direction of slot `slot`'s data descriptor.
fn set_data_flags(mem: &GuestMemoryMmap, q: &Queue, slot: usize, dir: u16) -> Result<(), Error> {
    let at = q.lay.desc + 16 * (3 * slot as u64 + 1) + 12;
    mem.write_obj(dir | VIRTQ_DESC_F_NEXT, ga(at))?;
    Ok(())
}

/// One queue's thread: keeps `depth` requests in flight until the run
/// ends, then waits for the last ones.
/// The bytes `--rw verify` writes at block `block`, generation `gen`.
fn verify_pattern(block: u64, gen: u64, out: &mut [u8]) {
    let head = (gen << 32) ^ block;
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = head ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// `--rw verify`: what a slot does next.
#[derive(Clone, Copy)]
struct Check {
    block: u64,
    gen: u64,
    reading: bool,
}

fn run_queue(sh: &Shared, q: &Queue, qi: usize, seed: u64) -> Result<(), Error> {
    let mem = &sh.mem;
    let lay = q.lay;
    let qsize = lay.qsize;
    let kind = if sh.rw.writes() { T_OUT } else { T_IN };
    let mut rng = seed | 1;
    let mut avail_idx: u16 = 0;
    let mut last_used: u16 = 0;
    let mut inflight = 0usize;
    let verify = sh.rw == Rw::Verify;
    let checks = vec![
        Cell::new(Check {
            block: 0,
            gen: 0,
            reading: true,
        });
        q.depth
    ];
    let slots = (sh.queues * q.depth) as u64;
    let per_slot = (sh.span / sh.bs / slots).max(1);
    let buf = RefCell::new(vec![0u8; sh.bs as usize]);

    // `--rw verify`: the slot's next request, its data descriptor's
    // direction and, for a write, its data.
    let next_check = |slot: usize, rng: &mut u64| -> Result<(u64, u32), Error> {
        let mut c = checks[slot].get();
        let mut buf = buf.borrow_mut();
        let r = if c.reading {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            c.block = (qi * q.depth + slot) as u64 + slots * (*rng % per_slot);
            c.gen += 1;
            c.reading = false;
            verify_pattern(c.block, c.gen, &mut buf);
            mem.write_slice(&buf, ga(lay.buf(slot, sh.bs)))?;
            set_data_flags(mem, q, slot, 0)?;
            Ok((c.block * sh.bs / 512, T_OUT))
        } else {
            c.reading = true;
            buf.fill(0xa5);
            mem.write_slice(&buf, ga(lay.buf(slot, sh.bs)))?;
            set_data_flags(mem, q, slot, VIRTQ_DESC_F_WRITE)?;
            Ok((c.block * sh.bs / 512, T_IN))
        };
        checks[slot].set(c);
        r
    };
    // Compares what a verify read found with what the slot wrote.
    let check_read = |slot: usize, check: Check| -> Result<bool, Error> {
        let mut got = vec![0u8; sh.bs as usize];
        let mut want = vec![0u8; sh.bs as usize];
        mem.read_slice(&mut got, ga(lay.buf(slot, sh.bs)))?;
        verify_pattern(check.block, check.gen, &mut want);
        if got != want {
            eprintln!(
                "vhost-bench: queue {qi} block {} is not generation {}",
                check.block, check.gen
            );
        }
        Ok(got == want)
    };

    // Fills slot `slot`'s header and puts its chain on the avail ring.
    let post = |slot: usize, avail_idx: &mut u16, rng: &mut u64| -> Result<(), Error> {
        let (sector, kind) = if verify {
            next_check(slot, rng)?
        } else {
            (sh.next_offset(rng) / 512, kind)
        };
        let mut h = [0u8; 17];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h[16] = 0xff;
        mem.write_slice(&h, ga(lay.hdr(slot)))?;
        let entry = lay.avail + 4 + 2 * u64::from(*avail_idx % qsize);
        mem.write_obj(3 * slot as u16, ga(entry))?;
        *avail_idx = avail_idx.wrapping_add(1);
        Ok(())
    };
    let publish = |old: u16, new: u16| -> Result<(), Error> {
        mem.store(new, ga(lay.avail + 2), Ordering::Release)?;
        fence(Ordering::SeqCst);
        let kick = if sh.event_idx {
            let event: u16 = mem.load(ga(lay.avail_event()), Ordering::Acquire)?;
            need_event(event, new, old)
        } else {
            let flags: u16 = mem.load(ga(lay.used), Ordering::Acquire)?;
            flags & 1 == 0
        };
        if kick {
            q.kick.write(1)?;
        }
        Ok(())
    };

    for slot in 0..q.depth {
        write_chain(mem, q, slot, sh)?;
        post(slot, &mut avail_idx, &mut rng)?;
        inflight += 1;
    }
    publish(0, avail_idx)?;

    let mut idle_since = Instant::now();
    loop {
        let used: u16 = mem.load(ga(lay.used + 2), Ordering::Acquire)?;
        let old = avail_idx;
        let running = sh.running.load(Ordering::Relaxed);
        while last_used != used {
            let e = lay.used + 4 + 8 * u64::from(last_used % qsize);
            let id: u32 = mem.read_obj(ga(e))?;
            last_used = last_used.wrapping_add(1);
            inflight -= 1;
            let slot = (id / 3) as usize;
            if !id.is_multiple_of(3) || slot >= q.depth {
                return Err(format!("the server returned descriptor {id}").into());
            }
            let status: u8 = mem.read_obj(ga(lay.hdr(slot) + 16))?;
            let c = checks[slot].get();
            if status != 0 || (verify && c.reading && !check_read(slot, c)?) {
                sh.errors.fetch_add(1, Ordering::Relaxed);
            }
            if running {
                sh.ios.fetch_add(1, Ordering::Relaxed);
                sh.bytes.fetch_add(sh.bs, Ordering::Relaxed);
                post(slot, &mut avail_idx, &mut rng)?;
                inflight += 1;
            }
        }
        if avail_idx != old {
            publish(old, avail_idx)?;
            idle_since = Instant::now();
        }
        if inflight == 0 {
            return Ok(());
        }
        // Ask for a signal at the next completion, then look once more
        // before sleeping (a completion may have slipped in between).
        if sh.event_idx {
            mem.store(last_used, ga(lay.used_event()), Ordering::Release)?;
        }
        fence(Ordering::SeqCst);
        let now: u16 = mem.load(ga(lay.used + 2), Ordering::Acquire)?;
        if now != last_used {
            continue;
        }
        if !wait_readable(&q.call, 100)? {
            if idle_since.elapsed() > Duration::from_secs(10) {
                return Err(format!("{inflight} requests stuck for 10 s").into());
            }
            continue;
        }
        // Reset the counter; the ring says what completed.
        let _ = q.call.read();
    }
}

/// Waits up to `ms` for the eventfd to be readable.
fn wait_readable(fd: &EventFd, ms: u16) -> Result<bool, Error> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // SAFETY: the eventfd outlives this call.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    let mut fds = [PollFd::new(bfd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The server's user+system CPU seconds so far.
fn cpu_seconds(pid: u32) -> Result<f64, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').ok_or("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).ok_or("stat")?.parse::<u64>()? + f.get(12).ok_or("stat")?.parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

fn connect(o: &Opts) -> Result<Frontend, Error> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match Frontend::connect(&o.socket, o.queues as u64) {
            Ok(f) => return Ok(f),
            Err(e) if Instant::now() > end => return Err(format!("connect: {e}").into()),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("vhost-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Error> {
    let o = parse_args()?;
    let mut fe = connect(&o)?;
    // GET_FEATURES first: the crate checks its cached bits later.
    let features = fe.get_features()?;
    fe.set_owner()?;
    let protocol = fe.get_protocol_features()?;
    let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG;
    fe.set_protocol_features(protocol & wanted)?;
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let max = fe.get_queue_num()?;
        if o.queues as u64 > max {
            return Err(format!("the server offers {max} queues").into());
        }
    } else if o.queues > 1 {
        return Err("the server offers one queue".into());
    }
    let acked = features & !F_LOG_ALL;
    fe.set_features(acked)?;
    let capacity = {
        let buf = [0u8; 8];
        let (_, data) = fe.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &buf)?;
        let b: [u8; 8] = data
            .get(0..8)
            .and_then(|s| s.try_into().ok())
            .ok_or("config")?;
        u64::from_le_bytes(b) * 512
    };
    let span = o.size.unwrap_or(capacity).min(capacity);
    if span < o.bs {
        return Err(format!("the disk ({capacity} bytes) is smaller than --bs").into());
    }

    // Guest memory: every queue's rings and buffers, one after another.
    let mut lays = Vec::new();
    let mut at = MEM_BASE;
    for _ in 0..o.queues {
        let l = Layout::new(at, o.depth, o.bs);
        at = l.end;
        lays.push(l);
    }
    let size = at - MEM_BASE;
    let memfd = nix::sys::memfd::memfd_create(
        c"vhost-bench",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )?;
    let file = File::from(memfd);
    file.set_len(size)?;
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(MEM_BASE),
        size as usize,
        Some(FileOffset::new(file, 0)),
    )])?;
    // Something other than zeroes to write.
    for l in &lays {
        let fill: Vec<u8> = (0..l.end - l.data).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&fill, ga(l.data))?;
    }
    let region = mem.find_region(GuestAddress(MEM_BASE)).ok_or("region")?;
    let info = VhostUserMemoryRegionInfo::from_guest_region(region)?;
    fe.set_mem_table(&[info])?;

    let mut queues = Vec::new();
    for (i, l) in lays.iter().enumerate() {
        fe.set_vring_num(i, l.qsize)?;
        // SET_VRING_ADDR takes the frontend's own addresses.
        let host = |gpa: u64| -> Result<u64, Error> { Ok(mem.get_host_address(ga(gpa))? as u64) };
        let cfg = VringConfigData {
            queue_max_size: l.qsize,
            queue_size: l.qsize,
            flags: 0,
            desc_table_addr: host(l.desc)?,
            avail_ring_addr: host(l.avail)?,
            used_ring_addr: host(l.used)?,
            log_addr: None,
        };
        fe.set_vring_addr(i, &cfg)?;
        fe.set_vring_base(i, 0)?;
        let call = EventFd::new(nix::libc::EFD_NONBLOCK)?;
        let kick = EventFd::new(0)?;
        fe.set_vring_call(i, &call)?;
        fe.set_vring_kick(i, &kick)?;
        queues.push(Queue {
            lay: *l,
            kick,
            call,
            depth: o.depth,
        });
    }
    // With PROTOCOL_FEATURES acked, rings start disabled.
    for i in 0..o.queues {
        fe.set_vring_enable(i, true)?;
    }

    let sh = Arc::new(Shared {
        mem,
        running: AtomicBool::new(true),
        ios: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        seq: AtomicU64::new(0),
        event_idx: acked & F_EVENT_IDX != 0,
        rw: o.rw,
        bs: o.bs,
        span,
        queues: o.queues,
    });
    let cpu0 = o.pid.map(cpu_seconds).transpose()?;
    let t0 = Instant::now();
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let sh = sh.clone();
            std::thread::spawn(move || {
                run_queue(&sh, &q, i, 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1))
            })
        })
        .collect();
    std::thread::sleep(o.runtime);
    sh.running.store(false, Ordering::Relaxed);
    let ios = sh.ios.load(Ordering::Relaxed);
    let bytes = sh.bytes.load(Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = o.pid.map(cpu_seconds).transpose()?;
    for t in threads {
        t.join().map_err(|_| "a queue thread panicked")??;
    }
    let errors = sh.errors.load(Ordering::Relaxed);
    if errors > 0 {
        return Err(format!("{errors} requests failed").into());
    }
    let cpu_us = match (cpu0, cpu1) {
        (Some(a), Some(b)) => format!("{:.3}", (b - a) * 1e6 / ios.max(1) as f64),
        _ => "null".into(),
    };
    println!(
        "{{\"ios\": {ios}, \"bytes\": {bytes}, \"secs\": {secs:.3}, \"iops\": {:.1}, \"mibs\": {:.2}, \"cpu_us_per_io\": {cpu_us}, \"queues\": {}, \"depth\": {}, \"bs\": {}, \"event_idx\": {}}}",
        ios as f64 / secs,
        bytes as f64 / secs / (1 << 20) as f64,
        o.queues,
        o.depth,
        o.bs,
        sh.event_idx
    );
    // Hang up before the memory goes: the server ends the queues.
    drop(fe);
    drop(sh);
    Ok(())
}
