//! vhost-user-blk export: an in-process frontend (the `vhost` crate's
//! frontend, memfd guest memory, split virtqueues built by hand) drives
//! rsd and qemu-storage-daemon with the same requests; their answers
//! (status, used length, data read) and the images they leave must be
//! the same, and the data is checked with qemu-io.
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::common::{args, monitor_args, ok, run, Daemon, Qmp, TempDir, Which};

/// Guest memory: 16 MiB at guest-physical 1 MiB (not 0, so a backend
/// that mixes up addresses fails).
const MEM_BASE: u64 = 0x10_0000;
const MEM_SIZE: u64 = 16 << 20;
const QSIZE: u16 = 128;
/// Queue q's rings start at RINGS + q * 0x10000.
const RINGS: u64 = MEM_BASE;
/// Buffers start here.
const DATA: u64 = MEM_BASE + (1 << 20);

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

pub(crate) const T_IN: u32 = 0;
pub(crate) const T_OUT: u32 = 1;
pub(crate) const T_FLUSH: u32 = 4;
pub(crate) const T_GET_ID: u32 = 8;
pub(crate) const T_DISCARD: u32 = 11;
pub(crate) const T_WRITE_ZEROES: u32 = 13;

/// One descriptor: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub(crate) struct D(u64, u32, bool);

/// A request as built: its descriptors, where its status byte is, and
/// its device-writable data (to read back), unless it goes through an
/// indirect table.
pub(crate) struct Req {
    descs: Vec<D>,
    indirect: bool,
    status: Option<u64>,
    data_in: Vec<D>,
}

/// What a request came back with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) status: Option<u8>,
    pub(crate) used_len: u32,
    pub(crate) data: Vec<u8>,
}

pub(crate) struct Guest {
    fe: Frontend,
    mem: GuestMemoryMmap,
    queues: usize,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
    kicks: Vec<EventFd>,
    _calls: Vec<EventFd>,
    /// Bump allocator for buffers (reset per batch).
    next: u64,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    /// The inflight region the device gave (INFLIGHT_SHMFD acked), kept
    /// across reconnects as QEMU keeps it.
    inflight: Option<(VhostUserInflight, File)>,
}

fn host_addr(mem: &GuestMemoryMmap, gpa: u64) -> u64 {
    mem.get_host_address(GuestAddress(gpa)).expect("host addr") as u64
}

impl Guest {
    /// Connects and sets the device up with `queues` queues, acking
    /// every feature offered.
    pub(crate) fn connect(sock: &Path, queues: usize) -> Guest {
        Guest::connect_with(sock, queues, VhostUserProtocolFeatures::empty())
    }

    /// Connects, acking also the protocol features `extra`.
    fn connect_with(sock: &Path, queues: usize, extra: VhostUserProtocolFeatures) -> Guest {
        let fe = connect_retry(sock, queues as u64);
        let memfd =
            nix::sys::memfd::memfd_create(c"guest", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .expect("memfd");
        let file = File::from(memfd);
        file.set_len(MEM_SIZE).expect("size memfd");
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(MEM_BASE),
            MEM_SIZE as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("guest memory");
        let mut g = Guest {
            fe,
            mem,
            queues,
            avail_idx: vec![0; queues],
            used_seen: vec![0; queues],
            kicks: Vec::new(),
            _calls: Vec::new(),
            next: DATA,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            inflight: None,
        };
        g.setup(extra, false);
        g
    }

    /// Connects again after the device went away (a new process, or
    /// the export deleted and added), as QEMU does: the rings are left
    /// as they are and start from the used index (the device cannot be
    /// asked where it stopped), the inflight region is handed back.
    fn reconnect(&mut self, sock: &Path, extra: VhostUserProtocolFeatures) {
        self.fe = connect_retry(sock, self.queues as u64);
        self.kicks.clear();
        self._calls.clear();
        self.setup(extra, true);
    }

    fn setup(&mut self, extra: VhostUserProtocolFeatures, resume: bool) {
        // GET_FEATURES first: the crate checks its cached bits later.
        self.features = self.fe.get_features().expect("get features");
        self.fe.set_owner().expect("set owner");
        self.protocol = self
            .fe
            .get_protocol_features()
            .expect("get protocol features");
        let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG | extra;
        self.fe
            .set_protocol_features(self.protocol & wanted)
            .expect("set protocol features");
        // Everything but the dirty log.
        self.fe
            .set_features(self.features & !(1 << 26))
            .expect("set features");
        let region = self
            .mem
            .find_region(GuestAddress(MEM_BASE))
            .expect("region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
        self.fe.set_mem_table(&[info]).expect("set mem table");
        if extra.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if self.inflight.is_none() {
                let ask = VhostUserInflight::new(0, 0, self.queues as u16, QSIZE);
                self.inflight = Some(self.fe.get_inflight_fd(&ask).expect("get inflight fd"));
            }
            let (info, file) = self.inflight.as_ref().expect("inflight region");
            self.fe
                .set_inflight_fd(info, file.as_raw_fd())
                .expect("set inflight fd");
        }
        for q in 0..self.queues {
            let base = RINGS + q as u64 * 0x10000;
            // Zero the rings (a new frontend reuses the memory).
            if !resume {
                self.mem
                    .write_slice(&[0u8; 0x3000], GuestAddress(base))
                    .expect("zero rings");
            }
            self.fe.set_vring_num(q, QSIZE).expect("vring num");
            // SET_VRING_ADDR takes the frontend's own addresses.
            let cfg = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host_addr(&self.mem, base),
                avail_ring_addr: host_addr(&self.mem, base + 0x1000),
                used_ring_addr: host_addr(&self.mem, base + 0x2000),
                log_addr: None,
            };
            self.fe.set_vring_addr(q, &cfg).expect("vring addr");
            let start = if resume { self.used_idx(q) } else { 0 };
            self.fe.set_vring_base(q, start).expect("vring base");
            let call = EventFd::new(0).expect("eventfd");
            let kick = EventFd::new(0).expect("eventfd");
            self.fe.set_vring_call(q, &call).expect("vring call");
            self.fe.set_vring_kick(q, &kick).expect("vring kick");
            // With PROTOCOL_FEATURES acked, rings start disabled.
            self.fe.set_vring_enable(q, true).expect("vring enable");
            self.kicks.push(kick);
            self._calls.push(call);
        }
    }

    fn config(&mut self, size: u32) -> Option<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        self.fe
            .get_config(0, size, VhostUserConfigFlags::WRITABLE, &buf)
            .ok()
            .map(|(_, data)| data.to_vec())
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next;
        self.next = (self.next + len + 15) & !15;
        assert!(self.next < MEM_BASE + MEM_SIZE, "test buffers overflow");
        at
    }

    fn header(&mut self, kind: u32, sector: u64) -> D {
        let at = self.alloc(16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).expect("header");
        D(at, 16, false)
    }

    fn status(&mut self) -> D {
        let at = self.alloc(1);
        // A value no answer has, to see that the device wrote it.
        self.mem
            .write_obj(0xeeu8, GuestAddress(at))
            .expect("status");
        D(at, 1, true)
    }

    fn buffer(&mut self, data: &[u8], writable: bool) -> D {
        let at = self.alloc(data.len() as u64);
        self.mem
            .write_slice(data, GuestAddress(at))
            .expect("buffer");
        D(at, data.len() as u32, writable)
    }

    /// A request: header, data segments, status.
    pub(crate) fn req(&mut self, kind: u32, sector: u64, out: &[&[u8]], inn: &[u32]) -> Req {
        let mut descs = vec![self.header(kind, sector)];
        for o in out {
            descs.push(self.buffer(o, false));
        }
        let mut data_in = Vec::new();
        for &n in inn {
            let d = self.buffer(&vec![0xaa; n as usize], true);
            data_in.push(d);
            descs.push(d);
        }
        let st = self.status();
        descs.push(st);
        Req {
            descs,
            indirect: false,
            status: Some(st.0),
            data_in,
        }
    }

    pub(crate) fn discard_seg(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
        let mut s = sector.to_le_bytes().to_vec();
        s.extend_from_slice(&sectors.to_le_bytes());
        s.extend_from_slice(&flags.to_le_bytes());
        s
    }

    /// Puts the requests on queue q, kicks, and waits for all of them.
    pub(crate) fn submit(&mut self, q: usize, reqs: Vec<Req>) -> Vec<Answer> {
        let heads = self.post(q, &reqs);
        self.answers(q, &heads, &reqs)
    }

    /// Puts the requests on queue q and kicks; returns their heads.
    fn post(&mut self, q: usize, reqs: &[Req]) -> Vec<u16> {
        self.post_from(q, reqs, 0)
    }

    /// As `post`, with the descriptors from table slot `slot` on (to
    /// leave those of requests in flight alone).
    fn post_from(&mut self, q: usize, reqs: &[Req], mut slot: u16) -> Vec<u16> {
        let base = RINGS + q as u64 * 0x10000;
        let mut heads = Vec::new();
        for r in reqs {
            let head = slot;
            let list: Vec<D> = if r.indirect {
                // One descriptor pointing at a table of the chain.
                let table = self.alloc(16 * r.descs.len() as u64);
                for (i, d) in r.descs.iter().enumerate() {
                    let last = i + 1 == r.descs.len();
                    self.write_desc(table + 16 * i as u64, *d, !last, i as u16 + 1);
                }
                self.write_raw_desc(
                    base + 16 * u64::from(slot),
                    table,
                    16 * r.descs.len() as u32,
                    VIRTQ_DESC_F_INDIRECT,
                    0,
                );
                slot += 1;
                Vec::new()
            } else {
                r.descs.clone()
            };
            for (i, d) in list.iter().enumerate() {
                let last = i + 1 == list.len();
                self.write_desc(base + 16 * u64::from(slot), *d, !last, slot + 1);
                slot += 1;
            }
            assert!(slot <= QSIZE, "too many descriptors in one batch");
            heads.push(head);
        }
        self.make_available(q, &heads);
        heads
    }

    /// Waits for the requests posted and reads their answers.
    fn answers(&mut self, q: usize, heads: &[u16], reqs: &[Req]) -> Vec<Answer> {
        let used = self.wait_used(q, heads.len());
        let answers = self.answers_from(heads, reqs, &used);
        self.next = DATA;
        answers
    }

    /// The answers of the requests, from the used entries given.
    fn answers_from(&self, heads: &[u16], reqs: &[Req], used: &[(u32, u32)]) -> Vec<Answer> {
        heads
            .iter()
            .zip(reqs)
            .map(|(head, r)| {
                let used_len = used
                    .iter()
                    .find(|(id, _)| *id == u32::from(*head))
                    .map(|(_, l)| *l)
                    .expect("request completed");
                let status = r.status.map(|a| {
                    self.mem
                        .read_obj::<u8>(GuestAddress(a))
                        .expect("status read")
                });
                let mut data = Vec::new();
                for d in &r.data_in {
                    let mut b = vec![0u8; d.1 as usize];
                    self.mem
                        .read_slice(&mut b, GuestAddress(d.0))
                        .expect("data");
                    data.extend_from_slice(&b);
                }
                Answer {
                    status,
                    used_len,
                    data,
                }
            })
            .collect()
    }

    /// Makes chains the test wrote itself available and waits for them.
    fn submit_raw(&mut self, q: usize, heads: &[u16]) -> Vec<(u32, u32)> {
        self.make_available(q, heads);
        let used = self.wait_used(q, heads.len());
        self.next = DATA;
        used
    }

    /// Puts chains already in the descriptor table on the avail ring and
    /// kicks.
    fn make_available(&mut self, q: usize, heads: &[u16]) {
        let base = RINGS + q as u64 * 0x10000;
        for head in heads {
            let idx = self.avail_idx[q];
            let entry = base + 0x1000 + 4 + 2 * u64::from(idx % QSIZE);
            self.mem
                .write_obj(*head, GuestAddress(entry))
                .expect("avail");
            self.avail_idx[q] = idx.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(base + 0x1000 + 2))
            .expect("avail idx");
        self.kicks[q].write(1).expect("kick");
    }

    /// The used entries added since the last look, without waiting.
    fn reap(&mut self, q: usize) -> Vec<(u32, u32)> {
        let base = RINGS + q as u64 * 0x10000 + 0x2000;
        let target = self.used_idx(q);
        let mut out = Vec::new();
        while self.used_seen[q] != target {
            let e = base + 4 + 8 * u64::from(self.used_seen[q] % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).expect("used id");
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).expect("used len");
            out.push((id, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    fn write_desc(&mut self, at: u64, d: D, has_next: bool, next: u16) {
        let mut flags = if d.2 { VIRTQ_DESC_F_WRITE } else { 0 };
        if has_next {
            flags |= VIRTQ_DESC_F_NEXT;
        }
        self.write_raw_desc(at, d.0, d.1, flags, if has_next { next } else { 0 });
    }

    fn write_raw_desc(&mut self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = addr.to_le_bytes().to_vec();
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&b, GuestAddress(at)).expect("desc");
    }

    /// The used ring's index now.
    fn used_idx(&self, q: usize) -> u16 {
        let base = RINGS + q as u64 * 0x10000 + 0x2000;
        self.mem.read_obj(GuestAddress(base + 2)).expect("used idx")
    }

    /// Waits (with a deadline) until n more used entries are there.
    fn wait_used(&mut self, q: usize, n: usize) -> Vec<(u32, u32)> {
        let base = RINGS + q as u64 * 0x10000 + 0x2000;
        let end = Instant::now() + Duration::from_secs(10);
        let target = self.used_seen[q].wrapping_add(n as u16);
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(base + 2)).expect("used idx");
            if idx == target {
                break;
            }
            assert!(Instant::now() < end, "requests not completed on queue {q}");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut out = Vec::new();
        let mut i = self.used_seen[q];
        while i != target {
            let e = base + 4 + 8 * u64::from(i % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).expect("used id");
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).expect("used len");
            out.push((id, len));
            i = i.wrapping_add(1);
        }
        self.used_seen[q] = target;
        out
    }
}

/// Keeps `depth` requests of `bs` bytes (reads, or writes when `write`)
/// in flight on queue 0 of the vhost-user-blk export at `sock`, each one
/// put back as soon as it completes, and returns the requests completed
/// per second over `window`, counted from `warmup` on. Every request
/// must succeed. Used to measure limits (tests/throttle.rs).
pub(crate) fn rate(
    sock: &Path,
    write: bool,
    bs: u32,
    depth: u16,
    warmup: Duration,
    window: Duration,
) -> f64 {
    let mut g = Guest::connect(sock, 1);
    let data = pattern(7, bs as usize);
    let sectors = u64::from(bs / 512);
    let reqs: Vec<Req> = (0..u64::from(depth))
        .map(|i| {
            if write {
                g.req(T_OUT, i * sectors, &[&data], &[])
            } else {
                g.req(T_IN, i * sectors, &[], &[bs])
            }
        })
        .collect();
    // Request i's chain sits at descriptors 3i..3i+2 for the whole run.
    let heads = g.post_from(0, &reqs, 0);
    let t0 = Instant::now();
    let (from, to) = (t0 + warmup, t0 + warmup + window);
    let mut counted = 0u64;
    let mut in_flight = heads.len();
    let deadline = to + Duration::from_secs(20);
    while in_flight > 0 {
        assert!(Instant::now() < deadline, "requests stopped completing");
        let used = g.reap(0);
        if used.is_empty() {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let now = Instant::now();
        let mut again = Vec::new();
        for (id, _) in used {
            let i = heads
                .iter()
                .position(|h| u32::from(*h) == id)
                .expect("a head the test posted");
            let st = reqs[i].status.expect("status byte");
            let status: u8 = g.mem.read_obj(GuestAddress(st)).expect("status read");
            assert_eq!(status, 0, "request {i} failed");
            if now >= from && now < to {
                counted += 1;
            }
            if now < to {
                g.mem
                    .write_obj(0xeeu8, GuestAddress(st))
                    .expect("status reset");
                again.push(heads[i]);
            } else {
                in_flight -= 1;
            }
        }
        if !again.is_empty() {
            g.make_available(0, &again);
        }
    }
    counted as f64 / window.as_secs_f64()
}

fn connect_retry(sock: &Path, queues: u64) -> Frontend {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
    use nix::sys::time::TimeVal;
    use std::os::fd::{AsRawFd, BorrowedFd};
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match Frontend::connect(sock, queues) {
            Ok(f) => {
                // A reply that never comes fails the test, not hangs it.
                // SAFETY: the frontend owns the socket while it is used.
                let fd = unsafe { BorrowedFd::borrow_raw(f.as_raw_fd()) };
                setsockopt(&fd, ReceiveTimeout, &TimeVal::new(10, 0)).expect("SO_RCVTIMEO");
                return f;
            }
            Err(e) => {
                assert!(Instant::now() < end, "connect {}: {e}", sock.display());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

pub(crate) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 7) as u8)).collect()
}

/// A daemon serving `image` as a vhost-user-blk export on `sock`.
fn start(which: Which, dir: &TempDir, image: &str, sock: &str, extra: &str) -> (Daemon, Qmp) {
    let mon = dir.s(&format!("{}-qmp.sock", which.prog()));
    let mut a = monitor_args(&mon);
    a.extend(args(&[
        "--blockdev",
        &format!("driver=file,node-name=file,filename={image}"),
        "--export",
        &format!("type=vhost-user-blk,id=vu,node-name=file,addr.type=unix,addr.path={sock}{extra}"),
    ]));
    let d = Daemon::spawn(which, &a);
    let q = Qmp::ready(Path::new(&mon));
    (d, q)
}

const IMAGE_SIZE: u64 = 4 << 20;
const SECTORS: u64 = IMAGE_SIZE / 512;

/// Every request type, the answers QSD gives, in one transcript.
fn scenario(g: &mut Guest) -> Vec<Answer> {
    let a = pattern(1, 4096);
    let mut out = Vec::new();
    let r = vec![
        g.req(T_GET_ID, 0, &[], &[20]),
        // A write split over two descriptors.
        g.req(T_OUT, 8, &[&a[..2048], &a[2048..]], &[]),
    ];
    out.extend(g.submit(0, r));
    let mut ind = g.req(T_IN, 8, &[], &[512]);
    ind.indirect = true;
    let r = vec![
        // A read into three descriptors.
        g.req(T_IN, 8, &[], &[1024, 1024, 2048]),
        ind,
        g.req(T_FLUSH, 0, &[], &[]),
        g.req(T_WRITE_ZEROES, 0, &[&Guest::discard_seg(16, 8, 0)], &[]),
        g.req(T_WRITE_ZEROES, 0, &[&Guest::discard_seg(24, 8, 1)], &[]),
        g.req(T_DISCARD, 0, &[&Guest::discard_seg(32, 8, 0)], &[]),
        g.req(T_DISCARD, 0, &[&Guest::discard_seg(32, 8, 1)], &[]),
        g.req(T_WRITE_ZEROES, 0, &[&Guest::discard_seg(32, 8, 2)], &[]),
        g.req(T_DISCARD, 0, &[&Guest::discard_seg(32, 40000, 0)], &[]),
        // Past the end, and straddling it.
        g.req(T_IN, SECTORS, &[], &[512]),
        g.req(T_IN, SECTORS - 1, &[], &[1024]),
        g.req(T_OUT, SECTORS - 1, &[&a[..1024]], &[]),
        // Not whole sectors.
        g.req(T_OUT, 0, &[&a[..100]], &[]),
        // Unknown types.
        g.req(99, 0, &[], &[512]),
        g.req(T_FLUSH | 0x8000_0000, 0, &[], &[]),
    ];
    out.extend(g.submit(0, r));
    out
}

#[test]
fn every_request_type_answers_as_qsd_and_lands_in_the_image() {
    let dir = TempDir::new();
    let mut transcripts = Vec::new();
    let mut configs = Vec::new();
    let mut features = Vec::new();
    for which in Which::all() {
        let image = dir.s(&format!("{}.img", which.prog()));
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "raw", &image, "4M"],
        ));
        ok(&run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x5a 0 4M", &image],
        ));
        let sock = dir.s(&format!("{}-vu.sock", which.prog()));
        let (mut d, mut q) = start(which, &dir, &image, &sock, ",writable=on");
        let mut g = Guest::connect(Path::new(&sock), 1);
        features.push((g.features, g.protocol));
        configs.push((g.config(60), g.config(96)));
        let t = scenario(&mut g);
        drop(g);
        let r = q.cmd(r#"{"execute": "quit"}"#);
        assert_eq!(r["return"], serde_json::json!({}), "{which:?}");
        assert!(d.wait_exit(10).is_some(), "{which:?} did not quit");
        transcripts.push((which, t, image));
    }
    let (_, rsd, rsd_image) = &transcripts[0];
    // What the scenario must give, whatever QSD does.
    let s = |i: usize| rsd[i].status;
    assert_eq!(&rsd[0].data[..15], b"vhost_user_blk\0");
    assert_eq!(s(0), Some(0));
    assert_eq!(s(1), Some(0));
    assert_eq!(rsd[2].data, pattern(1, 4096));
    assert_eq!(s(2), Some(0));
    assert_eq!(s(4), Some(0), "flush");
    assert_eq!((s(5), s(6), s(7)), (Some(0), Some(0), Some(0)));
    assert_eq!(s(8), Some(2), "discard with unmap is UNSUPP");
    assert_eq!(s(9), Some(2), "unknown flags are UNSUPP");
    assert_eq!(s(10), Some(1), "discard past its limit is IOERR");
    assert_eq!((s(11), s(12), s(13)), (Some(1), Some(1), Some(1)));
    assert_eq!(s(14), Some(1), "partial sectors are IOERR");
    assert_eq!(s(15), Some(2), "unknown type is UNSUPP");
    assert_eq!(s(16), Some(0), "the barrier bit is ignored");
    let cfg = &configs[0];
    let c60 = cfg.0.as_ref().expect("config of 60 bytes");
    assert_eq!(&c60[0..8], &SECTORS.to_le_bytes(), "capacity");
    assert_eq!(features[0].0, 0x1_7500_7e46, "rsd's feature bits");
    assert!(features[0]
        .1
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    // The data, through qemu-io.
    for (cmd, what) in [
        ("read -P 0x5a 0 4096", "before the write"),
        ("read -P 0 8192 8192", "zeroed"),
        ("read -P 0x5a 20480 4096", "after the discard"),
    ] {
        ok(&run("qemu-io", &["-f", "raw", "-c", cmd, rsd_image]));
        let _ = what;
    }
    let written = std::fs::read(rsd_image).expect("image");
    assert_eq!(&written[4096..8192], &pattern(1, 4096)[..]);
    // The same as QSD, answer by answer, and the same image.
    if let Some((_, qsd, qsd_image)) = transcripts.get(1) {
        for (i, (r, q)) in rsd.iter().zip(qsd).enumerate() {
            assert_eq!(r, q, "request {i}");
        }
        assert_eq!(configs[0], configs[1], "config space");
        assert_eq!(features[0].0, features[1].0, "feature bits");
        // In-flight tracking is the one protocol feature QSD lacks.
        assert!(
            features[1]
                .1
                .contains(features[0].1 - VhostUserProtocolFeatures::INFLIGHT_SHMFD),
            "protocol features beyond QSD's: {:?} vs {:?}",
            features[0].1,
            features[1].1
        );
        ok(&run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", rsd_image, qsd_image],
        ));
    }
}

/// Writes on one queue, reads on the other; a second frontend after the
/// first goes; block-export-del refused while a frontend is connected
/// and forced with mode=hard; the export re-added serves a new frontend.
#[test]
fn two_queues_reconnect_and_delete_as_qsd() {
    let dir = TempDir::new();
    let mut replies = Vec::new();
    for which in Which::all() {
        let image = dir.s(&format!("{}.img", which.prog()));
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "raw", &image, "4M"],
        ));
        let sock = dir.s(&format!("{}-vu.sock", which.prog()));
        let (mut d, mut q) = start(which, &dir, &image, &sock, ",writable=on,num-queues=2");
        let b = pattern(7, 8192);
        let mut g = Guest::connect(Path::new(&sock), 2);
        let cfg = g.config(60).expect("config");
        assert_eq!(&cfg[34..36], &2u16.to_le_bytes(), "{which:?} num_queues");
        let w = vec![g.req(T_OUT, 0, &[&b], &[]), g.req(T_FLUSH, 0, &[], &[])];
        let got = g.submit(1, w);
        assert_eq!(got[0].status, Some(0), "{which:?}");
        let r = vec![g.req(T_IN, 0, &[], &[8192])];
        let got = g.submit(0, r);
        assert_eq!(got[0].status, Some(0), "{which:?}");
        assert_eq!(
            got[0].data, b,
            "{which:?}: queue 0 reads what queue 1 wrote"
        );
        drop(g);
        // The next frontend is served.
        let mut g = Guest::connect(Path::new(&sock), 2);
        let r = g_read(&mut g, 0, 8192);
        let got = g.submit(1, vec![r]);
        assert_eq!(got[0].data, b, "{which:?} after a reconnect");
        // Connected but idle: a safe delete goes (QSD counts requests in
        // flight, not frontends), and drops the frontend.
        let safe = q.cmd(r#"{"execute": "block-export-del", "arguments": {"id": "vu"}}"#);
        let hard =
            q.cmd(r#"{"execute": "block-export-del", "arguments": {"id": "vu", "mode": "hard"}}"#);
        let listed = wait_exports_gone(&mut q);
        replies.push((safe, hard, listed));
        drop(g);
        let add = format!(
            r#"{{"execute": "block-export-add", "arguments": {{"type": "vhost-user-blk", "id": "vu2", "node-name": "file", "writable": true, "addr": {{"type": "unix", "path": "{sock}"}}}}}}"#
        );
        assert_eq!(q.cmd(&add)["return"], serde_json::json!({}), "{which:?}");
        let mut g = Guest::connect(Path::new(&sock), 1);
        let r = g_read(&mut g, 0, 8192);
        let got = g.submit(0, vec![r]);
        assert_eq!(got[0].data, b, "{which:?} after del and add");
        drop(g);
        let r = q.cmd(r#"{"execute": "quit"}"#);
        assert_eq!(r["return"], serde_json::json!({}));
        assert!(d.wait_exit(10).is_some(), "{which:?} did not quit");
        assert!(!Path::new(&sock).exists(), "{which:?} left its socket");
    }
    assert_eq!(replies[0].0, serde_json::json!({"return": {}}));
    if replies.len() == 2 {
        assert_eq!(replies[0], replies[1]);
    }
}

fn g_read(g: &mut Guest, sector: u64, len: u32) -> Req {
    g.req(T_IN, sector, &[], &[len])
}

/// Polls query-block-exports until it lists nothing (the hard delete
/// ends the export once its frontend is gone).
fn wait_exports_gone(q: &mut Qmp) -> serde_json::Value {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let r = q.cmd(r#"{"execute": "query-block-exports"}"#);
        if r["return"] == serde_json::json!([]) || Instant::now() > end {
            return r;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A read-only export: the RO feature bit, and writes refused with
/// IOERR, as QSD does.
#[test]
fn read_only_export_as_qsd() {
    let dir = TempDir::new();
    let mut all = Vec::new();
    for which in Which::all() {
        let image = dir.s(&format!("{}.img", which.prog()));
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "raw", &image, "1M"],
        ));
        let sock = dir.s(&format!("{}-vu.sock", which.prog()));
        let (_d, _q) = start(which, &dir, &image, &sock, ",logical-block-size=4096");
        let mut g = Guest::connect(Path::new(&sock), 1);
        let a = pattern(3, 4096);
        let r = vec![
            g.req(T_OUT, 8, &[&a], &[]),
            g.req(T_DISCARD, 0, &[&Guest::discard_seg(8, 8, 0)], &[]),
            g.req(T_WRITE_ZEROES, 0, &[&Guest::discard_seg(8, 8, 0)], &[]),
            // Not aligned to the 4k logical block size.
            g.req(T_IN, 1, &[], &[4096]),
            g.req(T_IN, 8, &[], &[4096]),
            g.req(T_FLUSH, 0, &[], &[]),
        ];
        let got = g.submit(0, r);
        all.push((g.features, g.config(60), got));
    }
    let (features, _, got) = &all[0];
    assert_eq!(features & (1 << 5), 1 << 5, "RO bit");
    let st: Vec<_> = got.iter().map(|a| a.status).collect();
    assert_eq!(
        st,
        [Some(1), Some(1), Some(1), Some(1), Some(0), Some(0)].to_vec()
    );
    if all.len() == 2 {
        assert_eq!(all[0], all[1]);
    }
}

/// What a frontend must not do gets IOERR (or no status where there is
/// no writable byte for it), and the device serves the next request.
#[test]
fn hostile_descriptors_get_ioerr_and_the_device_goes_on() {
    let dir = TempDir::new();
    let image = dir.s("rsd.img");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &image, "1M"],
    ));
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x33 0 1M", &image],
    ));
    let sock = dir.s("vu.sock");
    let (_d, _q) = start(Which::Rsd, &dir, &image, &sock, ",writable=on");
    let mut g = Guest::connect(Path::new(&sock), 1);
    // Data outside guest memory.
    let mut outside = g.req(T_IN, 0, &[], &[512]);
    outside.descs[1] = D(0xdead_0000_0000, 512, true);
    outside.data_in.clear();
    // A write whose data runs past the end of guest memory.
    let mut past = g.req(T_OUT, 0, &[&[0u8; 512]], &[]);
    past.descs[1] = D(MEM_BASE + MEM_SIZE - 256, 512, false);
    // A status byte in a read-only descriptor.
    let mut ro_status = g.req(T_IN, 0, &[], &[]);
    let st = ro_status.descs[1];
    ro_status.descs[1] = D(st.0, 1, false);
    // A short header.
    let mut short = g.req(T_IN, 0, &[], &[512]);
    short.descs[0].1 = 8;
    short.data_in.clear();
    let got = g.submit(0, vec![outside, past, ro_status, short]);
    assert_eq!(got[0].status, Some(1), "outside guest memory");
    assert_eq!(got[1].status, Some(1), "past guest memory");
    assert_eq!(got[2].status, Some(0xee), "no status written");
    assert_eq!(got[2].used_len, 0);
    assert_eq!(got[3].status, Some(1), "short header");
    // A chain that loops, and an indirect table outside memory.
    let base = RINGS;
    let h = g.header(T_IN, 0);
    let s = g.status();
    g.write_raw_desc(base, h.0, h.1, VIRTQ_DESC_F_NEXT, 1);
    g.write_raw_desc(base + 16, s.0, 1, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0);
    g.write_raw_desc(base + 32, 0xdead_0000_0000, 64, VIRTQ_DESC_F_INDIRECT, 0);
    let used = g.submit_raw(0, &[0, 2]);
    assert_eq!(used.len(), 2, "both completed: {used:?}");
    // A chain far longer than seg_max (and than the ring), through an
    // indirect table: served.
    let mut long = g.req(T_IN, 0, &[], &[512; 998]);
    long.indirect = true;
    let got = g.submit(0, vec![long]);
    assert_eq!(got[0].status, Some(0), "a long chain");
    assert_eq!(got[0].data, vec![0x33; 998 * 512]);
    // The device still serves, and the image is untouched.
    let r = g_read(&mut g, 0, 4096);
    let got = g.submit(0, vec![r]);
    assert_eq!(got[0].status, Some(0));
    assert_eq!(got[0].data, vec![0x33; 4096]);
    drop(g);
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x33 0 1M", &image],
    ));
}

/// block-export-del and quit wait for the requests in flight: they are
/// all in the used ring when the command's reply comes.
#[test]
fn delete_and_quit_drain_requests_in_flight() {
    let dir = TempDir::new();
    let sock = dir.s("vu.sock");
    let mon = dir.s("qmp.sock");
    let mut a = monitor_args(&mon);
    a.extend(args(&[
        "--blockdev",
        "driver=null-co,node-name=slow,size=1048576,read-zeroes=on,latency-ns=300000000",
        "--export",
        &format!("type=vhost-user-blk,id=vu,node-name=slow,addr.type=unix,addr.path={sock}"),
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(Path::new(&mon));
    for verb in ["del", "quit"] {
        let mut g = Guest::connect(Path::new(&sock), 1);
        // GET_ID first: it completes at once, so when it is in the used
        // ring the device has taken the whole batch and holds the reads.
        let mut reqs = vec![g.req(T_GET_ID, 0, &[], &[20])];
        reqs.extend((0..4).map(|i| g_read(&mut g, i * 8, 4096)));
        g.post(0, &reqs);
        let end = Instant::now() + Duration::from_secs(10);
        while g.used_idx(0) == 0 {
            assert!(Instant::now() < end, "GET_ID never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(g.used_idx(0), 1, "{verb}: the reads are still in flight");
        if verb == "del" {
            let r = q.cmd(
                r#"{"execute": "block-export-del", "arguments": {"id": "vu", "mode": "hard"}}"#,
            );
            assert_eq!(r["return"], serde_json::json!({}));
            assert_eq!(
                g.used_idx(0),
                5,
                "del replied before its requests completed"
            );
            let add = format!(
                r#"{{"execute": "block-export-add", "arguments": {{"type": "vhost-user-blk", "id": "vu", "node-name": "slow", "addr": {{"type": "unix", "path": "{sock}"}}}}}}"#
            );
            assert_eq!(q.cmd(&add)["return"], serde_json::json!({}));
        } else {
            q.send(br#"{"execute": "quit"}"#);
            assert!(d.wait_exit(10).is_some(), "rsd did not quit");
            assert_eq!(g.used_idx(0), 5, "quit before its requests completed");
        }
        let got = g.answers(0, &[0, 3, 6, 9, 12], &reqs);
        assert!(got.iter().all(|a| a.status == Some(0)), "{verb}: {got:?}");
    }
}

/// A message the device sent on the backend channel: code, flags, size.
type BackendMsg = (u32, u32, u32);

/// Plays the frontend's side of the backend channel on a thread: reads
/// each message, acknowledges it when it asks for a reply (as QEMU
/// does, or QSD would wait), and hands it over.
fn backend_channel(rx: std::os::unix::net::UnixStream) -> std::sync::mpsc::Receiver<BackendMsg> {
    use std::io::{Read, Write};
    let (tx, got) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rx = rx;
        loop {
            let mut hdr = [0u8; 12];
            if rx.read_exact(&mut hdr).is_err() {
                return;
            }
            let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
            let (code, flags, size) = (word(0), word(4), word(8));
            let mut body = vec![0u8; size.min(4096) as usize];
            if rx.read_exact(&mut body).is_err() {
                return;
            }
            if flags & 8 != 0 {
                // A reply: the same code, REPLY set, a u64 0 (success).
                let mut reply = code.to_le_bytes().to_vec();
                reply.extend_from_slice(&(1u32 | 4).to_le_bytes());
                reply.extend_from_slice(&8u32.to_le_bytes());
                reply.extend_from_slice(&0u64.to_le_bytes());
                if rx.write_all(&reply).is_err() {
                    return;
                }
            }
            if tx.send((code, flags, size)).is_err() {
                return;
            }
        }
    });
    got
}

/// block_resize on an exported node: the node may be resized under a
/// frontend, which gets VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the
/// backend channel (without need_reply, REPLY_ACK negotiated or not), reads
/// the new capacity and can use it, as from QSD. A resize with no
/// frontend connected (QSD dies of it) or with one that gave no channel
/// just changes the capacity.
#[test]
fn resize_sends_config_change_and_shows_the_new_capacity() {
    let dir = TempDir::new();
    let mut seen = Vec::new();
    for which in Which::all() {
        let image = dir.s(&format!("{}.img", which.prog()));
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "raw", &image, "4M"],
        ));
        let sock = dir.s(&format!("{}-vu.sock", which.prog()));
        let (_d, mut q) = start(which, &dir, &image, &sock, ",writable=on");
        let resize = |q: &mut Qmp, size: u64| {
            let r = q.cmd(&format!(
                r#"{{"execute": "block_resize", "arguments": {{"node-name": "file", "size": {size}}}}}"#
            ));
            assert_eq!(r["return"], serde_json::json!({}), "{which:?}: {r}");
        };
        if which == Which::Rsd {
            // No frontend yet; then one without a backend channel.
            resize(&mut q, 5 << 20);
            let mut g = Guest::connect(Path::new(&sock), 1);
            resize(&mut q, 6 << 20);
            let cfg = g.config(60).expect("config");
            assert_eq!(&cfg[0..8], &((6u64 << 20) / 512).to_le_bytes());
            resize(&mut q, 4 << 20);
        }
        let mut g = Guest::connect_with(
            Path::new(&sock),
            1,
            VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::REPLY_ACK,
        );
        let (tx, rx) = std::os::unix::net::UnixStream::pair().expect("pair");
        g.fe.set_backend_request_fd(&tx).expect("backend fd");
        let messages = backend_channel(rx);
        let before = g.config(60).expect("config");
        assert_eq!(&before[0..8], &((4u64 << 20) / 512).to_le_bytes());
        resize(&mut q, 8 << 20);
        let msg = messages
            .recv_timeout(Duration::from_secs(10))
            .expect("a config-change message");
        let cfg = g.config(60).expect("config");
        let capacity = u64::from_le_bytes(cfg[0..8].try_into().expect("8 bytes"));
        // The new end can be read.
        let r = g_read(&mut g, (4 << 20) / 512, 4096);
        let got = g.submit(0, vec![r]);
        seen.push((msg, capacity, got[0].status));
    }
    // VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, version 1, no need_reply,
    // no payload.
    assert_eq!(seen[0], ((2, 1, 0), (8 << 20) / 512, Some(0)));
    if seen.len() == 2 {
        assert_eq!(seen[0], seen[1]);
    }
}

/// Protocol-level abuse: garbage headers, a message claiming a huge
/// payload, SET_MEM_TABLE without its descriptors, a memory table that
/// changes while requests run. Each costs the abuser its connection at
/// most; the next frontend and the other export are served.
#[test]
fn hostile_messages_cost_only_the_connection() {
    use std::io::Write;
    let dir = TempDir::new();
    let image = dir.s("a.img");
    let other = dir.s("b.img");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &image, "1M"],
    ));
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &other, "1M"],
    ));
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x44 0 1M", &image],
    ));
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x55 0 1M", &other],
    ));
    let sock = dir.s("a.sock");
    let sock_b = dir.s("b.sock");
    let mon = dir.s("qmp.sock");
    let mut a = monitor_args(&mon);
    a.extend(args(&[
        "--blockdev",
        &format!("driver=file,node-name=a,filename={image}"),
        "--blockdev",
        &format!("driver=file,node-name=b,filename={other}"),
        "--export",
        &format!("type=vhost-user-blk,id=va,node-name=a,addr.type=unix,addr.path={sock}"),
        "--export",
        &format!("type=vhost-user-blk,id=vb,node-name=b,addr.type=unix,addr.path={sock_b}"),
    ]));
    let mut d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(Path::new(&mon));
    // The other export's frontend stays connected through it all.
    let mut gb = Guest::connect(Path::new(&sock_b), 1);
    let hdr = |req: u32, flags: u32, size: u32| {
        let mut h = req.to_le_bytes().to_vec();
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h
    };
    let abuse: Vec<Vec<u8>> = vec![
        // Not a request at all.
        vec![0xff; 64],
        // GET_FEATURES claiming a 4 GiB payload.
        hdr(1, 1, u32::MAX),
        // SET_MEM_TABLE with one region and no descriptor.
        {
            let mut m = hdr(5, 1, 8 + 32);
            m.extend_from_slice(&1u32.to_le_bytes());
            m.extend_from_slice(&0u32.to_le_bytes());
            m.extend_from_slice(&[0u8; 32]);
            m
        },
        // A header cut short.
        hdr(1, 1, 0)[..6].to_vec(),
    ];
    for bytes in abuse {
        let mut s = connect_stream(Path::new(&sock));
        let _ = s.write_all(&bytes);
        drop(s);
        // The next frontend is served.
        let mut g = Guest::connect(Path::new(&sock), 1);
        let r = g_read(&mut g, 0, 4096);
        let got = g.submit(0, vec![r]);
        assert_eq!(got[0].data, vec![0x44; 4096], "after {bytes:02x?}");
    }
    // A memory table replaced while requests run: each request uses the
    // table it started with, or the new one; none is lost.
    let mut g = Guest::connect(Path::new(&sock), 1);
    let reqs: Vec<Req> = (0..8).map(|i| g_read(&mut g, i * 8, 4096)).collect();
    let heads = g.post(0, &reqs);
    let region = g.mem.find_region(GuestAddress(MEM_BASE)).expect("region");
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
    g.fe.set_mem_table(&[info]).expect("set mem table again");
    let got = g.answers(0, &heads, &reqs);
    assert!(got
        .iter()
        .all(|a| a.status == Some(0) && a.data == vec![0x44; 4096]));
    drop(g);
    let r = g_read(&mut gb, 0, 4096);
    let got = gb.submit(0, vec![r]);
    assert_eq!(got[0].data, vec![0x55; 4096], "the other export");
    drop(gb);
    let r = q.cmd(r#"{"execute": "query-block-exports"}"#);
    assert_eq!(r["return"].as_array().map(Vec::len), Some(2));
    q.send(br#"{"execute": "quit"}"#);
    assert_eq!(d.wait_exit(10), Some(0), "rsd survived");
}

fn connect_stream(sock: &Path) -> std::os::unix::net::UnixStream {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < end, "connect: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// block-export-add's answers for vhost-user-blk, as QSD gives them:
/// the checks of its own options in QSD's order, the address types,
/// the socket and query-block-exports.
#[test]
fn export_add_answers_as_qsd() {
    let setup = |d: &TempDir| {
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "raw", &d.s("d.img"), "1M"],
        ));
        std::fs::write(d.path("stale.sock"), b"").expect("stale file");
    };
    let add = |extra: &str| {
        format!(
            r#"{{"execute": "block-export-add", "arguments": {{"type": "vhost-user-blk", "id": "e", "node-name": "n"{extra}}}}}"#
        )
    };
    let unix = r#", "addr": {"type": "unix", "path": "$D/v.sock"}"#;
    let steps = [
        add(&format!(r#"{unix}, "logical-block-size": 100"#)),
        add(&format!(r#"{unix}, "logical-block-size": 4194304"#)),
        add(&format!(r#"{unix}, "num-queues": 0"#)),
        // Both wrong: the block size is checked first.
        add(
            r#", "addr": {"type": "inet", "host": "localhost", "port": "1"}, "logical-block-size": 3"#,
        ),
        add(r#", "addr": {"type": "inet", "host": "localhost", "port": "1"}"#),
        add(r#", "addr": {"type": "vsock", "cid": "1", "port": "1"}"#),
        add(r#", "addr": {"type": "fd", "str": "77"}"#),
        add(r#", "addr": {"type": "unix", "path": "$D/no/such/v.sock"}"#),
        add(
            r#", "addr": {"type": "unix", "path": "$D/v.sock"}, "writable": true, "iothread": "nope""#,
        ),
        // A stale file where the socket goes is replaced.
        add(
            r#", "addr": {"type": "unix", "path": "$D/stale.sock"}, "logical-block-size": 4096, "num-queues": 4"#,
        ),
        add(unix),
        r#"{"execute": "query-block-exports"}"#.to_string(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = crate::common::same_on_both(
        &setup,
        &["--blockdev", "driver=file,node-name=n,filename=$D/d.img"],
        &steps,
    )
    .expect("both start");
    assert!(out[0].contains("must be a power of 2"), "{}", out[0]);
    assert_eq!(out[9], "{\"return\": {}}\r\n");
    assert!(out[10].contains("is already in use"), "{}", out[10]);
}

/// `addr.type=fd` on the command line: a listening socket inherited
/// from the parent is served, by rsd as by QSD.
#[test]
fn inherited_listening_socket() {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use std::os::fd::AsRawFd;
    let dir = TempDir::new();
    for which in Which::all() {
        let image = dir.s(&format!("{}.img", which.prog()));
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "raw", &image, "1M"],
        ));
        ok(&run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x66 0 4k", &image],
        ));
        let sock = dir.path(&format!("{}-vu.sock", which.prog()));
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        // Inherited by the daemon: clear close-on-exec.
        fcntl(listener.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).expect("fcntl");
        let fd = listener.as_raw_fd();
        let d = Daemon::spawn(
            which,
            &args(&[
                "--blockdev",
                &format!("driver=file,node-name=file,filename={image}"),
                "--export",
                &format!("type=vhost-user-blk,id=vu,node-name=file,addr.type=fd,addr.str={fd}"),
            ]),
        );
        drop(listener);
        let mut g = Guest::connect(&sock, 1);
        let r = g_read(&mut g, 0, 4096);
        let got = g.submit(0, vec![r]);
        assert_eq!(got[0].data, vec![0x66; 4096], "{which:?}");
        drop(g);
        drop(d);
    }
}

/// A request that waits does not hold back the ones kicked after it on
/// the same queue: a flush completes while a slow read is in flight.
#[test]
fn a_slow_request_does_not_hold_back_the_next() {
    let dir = TempDir::new();
    let sock = dir.s("vu.sock");
    let mon = dir.s("qmp.sock");
    let mut a = monitor_args(&mon);
    a.extend(args(&[
        "--blockdev",
        // Reads take 2 s; flushes none.
        "driver=null-co,node-name=slow,size=1048576,read-zeroes=on,latency-ns=2000000000",
        "--export",
        &format!("type=vhost-user-blk,id=vu,node-name=slow,addr.type=unix,addr.path={sock}"),
    ]));
    let _d = Daemon::spawn(Which::Rsd, &a);
    let _q = Qmp::ready(Path::new(&mon));
    let mut g = Guest::connect(Path::new(&sock), 1);
    let mut first = vec![g.req(T_GET_ID, 0, &[], &[20])];
    first.push(g_read(&mut g, 0, 4096));
    g.post(0, &first);
    let end = Instant::now() + Duration::from_secs(10);
    while g.used_idx(0) == 0 {
        assert!(Instant::now() < end, "GET_ID never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The read is in flight; a flush kicked now completes before it.
    let flush = vec![g.req(T_FLUSH, 0, &[], &[])];
    let heads = g.post_from(0, &flush, 6);
    while g.used_idx(0) < 2 {
        assert!(Instant::now() < end, "the flush never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    let used = g.wait_used(0, 2);
    assert_eq!(
        used[1].0,
        u32::from(heads[0]),
        "the flush, not the read: {used:?}"
    );
    let _ = g.wait_used(0, 1);
}

/// The export's actor fails and is restarted: the frontend connected
/// meanwhile is still served, and so is the next one.
#[test]
fn export_actor_restart_keeps_serving() {
    let dir = TempDir::new();
    let image = dir.s("d.img");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &image, "1M"],
    ));
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 0 4k", &image],
    ));
    let sock = dir.s("vu.sock");
    let mon = dir.s("qmp.sock");
    let mut a = monitor_args(&mon);
    a.extend(args(&[
        "--blockdev",
        &format!("driver=file,node-name=file,filename={image}"),
        "--export",
        &format!("type=vhost-user-blk,id=vu,node-name=file,addr.type=unix,addr.path={sock}"),
    ]));
    let _d = Daemon::spawn_env(Which::Rsd, &a, &[("RSD_TEST_HOOKS", "1")]);
    let mut q = Qmp::ready(Path::new(&mon));
    let mut g = Guest::connect(Path::new(&sock), 1);
    for _ in 0..2 {
        let r = q.cmd(r#"{"execute":"x-rsd-test-crash","arguments":{"id":"export/vu"}}"#);
        assert_eq!(r["return"], serde_json::json!({}), "{r}");
        let r = g_read(&mut g, 0, 4096);
        let got = g.submit(0, vec![r]);
        assert_eq!(got[0].data, vec![0x77; 4096]);
    }
    drop(g);
    let mut g = Guest::connect(Path::new(&sock), 1);
    let r = g_read(&mut g, 0, 4096);
    let got = g.submit(0, vec![r]);
    assert_eq!(
        got[0].data,
        vec![0x77; 4096],
        "a frontend after the restarts"
    );
    let r = q.cmd(r#"{"execute": "query-block-exports"}"#);
    assert_eq!(r["return"][0]["id"], "vu");
}

/// A helper process, ended with the test (even a failing one).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the process has ended (a SIGKILL gives no exit code).
fn wait_gone(d: &mut Daemon) {
    let end = Instant::now() + Duration::from_secs(10);
    while d.child.try_wait().ok().flatten().is_none() {
        assert!(Instant::now() < end, "the daemon did not die");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Checks a batch that was in flight across a device restart: its used
/// entries are exactly its heads, each once; the next request, posted
/// after the restart, is the next entry; and once it is done, nothing
/// is left running on the node (a request run twice would be), as a
/// safe block-export-del shows. Returns the batch's answers.
fn completed_once(g: &mut Guest, q: &mut Qmp, heads: &[u16], reqs: &[Req]) -> Vec<Answer> {
    let used = g.wait_used(0, reqs.len());
    let mut ids: Vec<u32> = used.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    let mut want: Vec<u32> = heads.iter().map(|h| u32::from(*h)).collect();
    want.sort_unstable();
    assert_eq!(ids, want, "each request completed once: {used:?}");
    let answers = g.answers_from(heads, reqs, &used);
    // A marker, in descriptors no request of the batch used.
    let marker = vec![g.req(T_GET_ID, 0, &[], &[20])];
    let head = g.post_from(0, &marker, 100);
    let next = g.wait_used(0, 1);
    assert_eq!(next[0].0, u32::from(head[0]), "the marker, not a repeat");
    let r = q.cmd(r#"{"execute": "block-export-del", "arguments": {"id": "vu"}}"#);
    assert_eq!(
        r["return"],
        serde_json::json!({}),
        "something still runs: {r}"
    );
    assert_eq!(
        g.used_idx(0),
        g.used_seen[0],
        "a request completed again after the marker"
    );
    answers
}

/// In-flight tracking across a new rsd process: requests taken by the
/// device are held (the NBD server behind its node is stopped) when rsd
/// is killed; a new rsd on the same socket gets the inflight region
/// back from the reconnecting frontend and runs exactly those requests
/// again: each completes once, the reads return the data, the writes
/// are in the image; a request completed before the kill is not
/// repeated.
#[test]
fn inflight_requests_complete_once_after_sigkill() {
    let dir = TempDir::new();
    let image = dir.s("disk.img");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &image, "4M"],
    ));
    ok(&run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 64k", &image],
    ));
    let nbd_sock = dir.s("nbd.sock");
    let nbd = KillOnDrop(
        std::process::Command::new("qemu-nbd")
            .args(["-f", "raw", "-x", "disk", "-k", &nbd_sock])
            .args(["--persistent", "-e", "4", &image])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd"),
    );
    assert!(crate::common::wait_for_path(Path::new(&nbd_sock), 10));
    let sock = dir.s("vu.sock");
    let rsd = |n: u32| {
        let mon = dir.s(&format!("qmp{n}.sock"));
        let mut a = monitor_args(&mon);
        a.extend(args(&[
            "--blockdev",
            &format!("driver=nbd,node-name=disk,server.type=unix,server.path={nbd_sock},export=disk"),
            "--export",
            &format!("type=vhost-user-blk,id=vu,node-name=disk,writable=on,addr.type=unix,addr.path={sock}"),
        ]));
        let d = Daemon::spawn(Which::Rsd, &a);
        (d, Qmp::ready(Path::new(&mon)))
    };
    let stop_nbd = |sig: nix::sys::signal::Signal| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(nbd.0.id() as i32), sig).expect("signal");
    };
    let (mut d1, _q1) = rsd(1);
    let track = VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    let mut g = Guest::connect_with(Path::new(&sock), 1, track);
    let r = g_read(&mut g, 0, 4096);
    assert_eq!(g.submit(0, vec![r])[0].data, vec![0x11; 4096]);

    stop_nbd(nix::sys::signal::Signal::SIGSTOP);
    let (w1, w2) = (pattern(0x21, 8192), pattern(0x22, 4096));
    // GET_ID first: it needs no I/O, so once it is in the used ring the
    // device has taken (and marked) the whole batch.
    let mut reqs = vec![g.req(T_GET_ID, 0, &[], &[20])];
    reqs.push(g.req(T_OUT, 128, &[&w1], &[]));
    reqs.push(g_read(&mut g, 0, 4096));
    reqs.push(g.req(T_OUT, 256, &[&w2[..2048], &w2[2048..]], &[]));
    // Read again through an indirect table.
    let mut indirect = g_read(&mut g, 16, 8192);
    indirect.indirect = true;
    reqs.push(indirect);
    reqs.push(g.req(T_FLUSH, 0, &[], &[]));
    let heads = g.post(0, &reqs);
    let end = Instant::now() + Duration::from_secs(10);
    while g.used_idx(0) == g.used_seen[0] {
        assert!(Instant::now() < end, "GET_ID never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        g.used_idx(0),
        g.used_seen[0].wrapping_add(1),
        "the rest is held"
    );
    d1.signal(nix::libc::SIGKILL);
    wait_gone(&mut d1);
    stop_nbd(nix::sys::signal::Signal::SIGCONT);

    let (_d2, mut q2) = rsd(2);
    g.reconnect(Path::new(&sock), track);
    let got = completed_once(&mut g, &mut q2, &heads, &reqs);
    let status: Vec<_> = got.iter().map(|a| (a.status, a.used_len)).collect();
    assert!(got.iter().all(|a| a.status == Some(0)), "{status:?}");
    assert!(got[2].data == vec![0x11; 4096], "the read's data");
    assert!(got[4].data == vec![0x11; 8192], "the indirect read's data");
    let data = std::fs::read(&image).expect("image");
    assert_eq!(&data[128 * 512..128 * 512 + 8192], &w1[..]);
    assert_eq!(&data[256 * 512..256 * 512 + 4096], &w2[..]);
}

/// In-flight tracking across block-export-del and add: the delete
/// drains the requests in flight (they complete), so the new export,
/// given the same region back, runs nothing again.
#[test]
fn inflight_region_after_export_del_and_add_repeats_nothing() {
    let dir = TempDir::new();
    let sock = dir.s("vu.sock");
    let mon = dir.s("qmp.sock");
    let mut a = monitor_args(&mon);
    a.extend(args(&[
        "--blockdev",
        "driver=null-co,node-name=slow,size=1048576,read-zeroes=on,latency-ns=300000000",
        "--export",
        &format!("type=vhost-user-blk,id=vu,node-name=slow,addr.type=unix,addr.path={sock}"),
    ]));
    let _d = Daemon::spawn(Which::Rsd, &a);
    let mut q = Qmp::ready(Path::new(&mon));
    let track = VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    let mut g = Guest::connect_with(Path::new(&sock), 1, track);
    let mut reqs = vec![g.req(T_GET_ID, 0, &[], &[20])];
    reqs.extend((0..4).map(|i| g_read(&mut g, i * 8, 4096)));
    let heads = g.post(0, &reqs);
    let end = Instant::now() + Duration::from_secs(10);
    while g.used_idx(0) == 0 {
        assert!(Instant::now() < end, "GET_ID never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(g.used_idx(0), 1, "the reads are still in flight");
    let r = q.cmd(r#"{"execute": "block-export-del", "arguments": {"id": "vu", "mode": "hard"}}"#);
    assert_eq!(r["return"], serde_json::json!({}));
    let add = format!(
        r#"{{"execute": "block-export-add", "arguments": {{"type": "vhost-user-blk", "id": "vu", "node-name": "slow", "addr": {{"type": "unix", "path": "{sock}"}}}}}}"#
    );
    assert_eq!(q.cmd(&add)["return"], serde_json::json!({}));
    g.reconnect(Path::new(&sock), track);
    let got = completed_once(&mut g, &mut q, &heads, &reqs);
    let status: Vec<_> = got.iter().map(|a| (a.status, a.used_len)).collect();
    assert!(got.iter().all(|a| a.status == Some(0)), "{status:?}");
}

/// The pages whose bits are set in a dirty log.
fn dirty_pages(log: &File) -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; log.metadata().expect("log size").len() as usize];
    log.read_exact_at(&mut b, 0).expect("read log");
    let mut pages = std::collections::BTreeSet::new();
    for (i, byte) in b.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                pages.insert(i as u64 * 8 + bit);
            }
        }
    }
    pages
}

/// Sends SET_LOG_BASE with the bitmap `log` by hand and reads the whole
/// reply (header words): libvhost-user answers with 8 bytes where the
/// crate's frontend waits for 16, so the crate cannot talk to QSD here.
/// QEMU takes either.
fn set_log_base(fe: &Frontend, log: &File, len: u64) -> Vec<u32> {
    use nix::sys::socket::{recv, sendmsg, ControlMessage, MsgFlags};
    use std::io::IoSlice;
    let fd = fe.as_raw_fd();
    let mut msg = Vec::new();
    for w in [6u32, 1, 16] {
        msg.extend_from_slice(&w.to_le_bytes());
    }
    msg.extend_from_slice(&len.to_le_bytes());
    msg.extend_from_slice(&0u64.to_le_bytes());
    let fds = [log.as_raw_fd()];
    let sent = sendmsg::<()>(
        fd,
        &[IoSlice::new(&msg)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("send SET_LOG_BASE");
    assert_eq!(sent, msg.len());
    let mut head = [0u8; 12];
    let n = recv(fd, &mut head, MsgFlags::MSG_WAITALL).expect("reply header");
    assert_eq!(n, 12, "short reply");
    let words: Vec<u32> = head
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let mut body = vec![0u8; words[2] as usize];
    if !body.is_empty() {
        let n = recv(fd, &mut body, MsgFlags::MSG_WAITALL).expect("reply body");
        assert_eq!(n, body.len(), "short reply body");
    }
    words
}

/// Dirty-page logging for live migration, as QEMU drives it: SET_LOG_BASE
/// with a shared bitmap, LOG_ALL acked, the rings re-addressed with a
/// log address. Every page the device wrote (read data, GET_ID, status
/// bytes, the used ring) is marked, a page it only read is not, nothing
/// is marked while logging is off, and the pages equal QSD's.
#[test]
fn dirty_pages_are_logged_while_log_all_is_on_as_in_qsd() {
    const LOG_ALL: u64 = 1 << 26;
    let dir = TempDir::new();
    let mut results = Vec::new();
    for which in Which::all() {
        let image = dir.s(&format!("{}.img", which.prog()));
        ok(&run(
            "qemu-img",
            &["create", "-q", "-f", "raw", &image, "4M"],
        ));
        let sock = dir.s(&format!("{}-vu.sock", which.prog()));
        let (mut d, mut q) = start(which, &dir, &image, &sock, ",writable=on");
        let mut g = Guest::connect_with(Path::new(&sock), 1, VhostUserProtocolFeatures::LOG_SHMFD);
        assert!(
            g.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD),
            "{which:?} offers LOG_SHMFD"
        );
        // Pages 4 KiB apart, so each buffer's pages are its own.
        let page = |g: &mut Guest| g.next = (g.next + 4095) & !4095;
        let log = File::from(
            nix::sys::memfd::memfd_create(c"log", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .expect("memfd"),
        );
        let log_len = (MEM_BASE + MEM_SIZE) / 4096 / 8;
        log.set_len(log_len).expect("size log");
        // Before logging: nothing is marked.
        let r = g.req(T_IN, 0, &[], &[4096]);
        g.submit(0, vec![r]);
        // QEMU's order at migration start: the log, LOG_ALL, the rings.
        let reply = set_log_base(&g.fe, &log, log_len);
        assert_eq!(reply[0], 6, "{which:?}: the reply is SET_LOG_BASE's");
        assert!(dirty_pages(&log).is_empty(), "{which:?}: marked while off");
        g.fe.set_features(g.features).expect("LOG_ALL on");
        let used_ring = RINGS + 0x2000;
        let cfg = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 1, // VHOST_VRING_F_LOG
            desc_table_addr: host_addr(&g.mem, RINGS),
            avail_ring_addr: host_addr(&g.mem, RINGS + 0x1000),
            used_ring_addr: host_addr(&g.mem, used_ring),
            log_addr: Some(used_ring),
        };
        g.fe.set_vring_addr(0, &cfg).expect("vring addr with log");
        // A round trip, as QEMU makes after these (they have no reply):
        // the device has taken them before the next kick.
        g.fe.get_features().expect("sync");
        // A read into three pages of its own, GET_ID, and a write whose
        // middle page the device only reads.
        page(&mut g);
        let read = g.req(T_IN, 8, &[], &[3 * 4096]);
        page(&mut g);
        let id = g.req(T_GET_ID, 0, &[], &[20]);
        page(&mut g);
        let data = pattern(3, 3 * 4096);
        let write = g.req(T_OUT, 64, &[&data], &[]);
        let (read_buf, id_buf, write_buf) = (read.data_in[0], id.data_in[0], write.descs[1]);
        let statuses: Vec<u64> = [&read, &id, &write]
            .iter()
            .map(|r| r.status.expect("status"))
            .collect();
        let answers = g.submit(0, vec![read, id, write]);
        assert!(
            answers.iter().all(|a| a.status == Some(0)),
            "{which:?}: {answers:?}"
        );
        let on = dirty_pages(&log);
        // Logging off again: later requests mark nothing more.
        g.fe.set_features(g.features & !LOG_ALL)
            .expect("LOG_ALL off");
        g.fe.get_features().expect("sync");
        // (`submit` started the buffers over: go past those used above.)
        g.next = DATA + (1 << 20);
        let late = g.req(T_IN, 0, &[], &[4096]);
        let late_page = late.data_in[0].0 / 4096;
        g.submit(0, vec![late]);
        let after = dirty_pages(&log);
        drop(g);
        let r = q.cmd(r#"{"execute": "quit"}"#);
        assert_eq!(r["return"], serde_json::json!({}), "{which:?}");
        assert!(d.wait_exit(10).is_some(), "{which:?} did not quit");
        // What must be there, whatever QSD does.
        for p in read_buf.0 / 4096..(read_buf.0 + 3 * 4096) / 4096 {
            assert!(
                on.contains(&p),
                "{which:?}: read page {p} not marked: {on:?}"
            );
        }
        assert!(on.contains(&(id_buf.0 / 4096)), "{which:?}: GET_ID page");
        for s in &statuses {
            assert!(on.contains(&(s / 4096)), "{which:?}: status page");
        }
        assert!(on.contains(&(used_ring / 4096)), "{which:?}: used ring");
        let middle = write_buf.0 / 4096 + 1;
        assert!(
            !on.contains(&middle),
            "{which:?}: a page only read is marked"
        );
        assert!(
            !after.contains(&late_page),
            "{which:?}: marked after LOG_ALL off"
        );
        results.push(on);
    }
    if let [rsd, qsd] = &results[..] {
        assert_eq!(rsd, qsd, "dirty pages: rsd vs QSD");
    }
}

/// The names of the daemon's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|c| c.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// With `iothread`, every queue of the export runs on the iothread's
/// thread (QSD's export AioContext); without it, each queue has a thread
/// of its own.
#[test]
fn queues_run_on_the_export_iothread() {
    let dir = TempDir::new();
    let image = dir.s("disk.img");
    ok(&run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &image, "4M"],
    ));
    for iothread in [true, false] {
        let sock = dir.s(&format!("vu-{iothread}.sock"));
        let mon = dir.s(&format!("q-{iothread}.sock"));
        let mut a = monitor_args(&mon);
        let extra = if iothread { ",iothread=io0" } else { "" };
        a.extend(args(&[
            "--object",
            "iothread,id=io0",
            "--blockdev",
            &format!("driver=file,node-name=file,filename={image}"),
            "--export",
            &format!("type=vhost-user-blk,id=vu,node-name=file,addr.type=unix,addr.path={sock},writable=on,num-queues=2{extra}"),
        ]));
        let d = Daemon::spawn(Which::Rsd, &a);
        let _q = Qmp::ready(Path::new(&mon));
        let mut g = Guest::connect(Path::new(&sock), 2);
        let b = pattern(9, 8192);
        let w = g.req(T_OUT, 0, &[&b], &[]);
        let got = g.submit(1, vec![w]);
        assert_eq!(got[0].status, Some(0));
        let r = g_read(&mut g, 0, 8192);
        let got = g.submit(0, vec![r]);
        assert_eq!(got[0].data, b, "queue 0 reads what queue 1 wrote");
        // Both rings run now.
        let names = thread_names(d.child.id());
        let queue_threads = names
            .iter()
            .filter(|n| n.starts_with("vhost-user/q"))
            .count();
        assert!(names.iter().any(|n| n == "iothread/io0"), "{names:?}");
        if iothread {
            assert_eq!(queue_threads, 0, "no queue thread: {names:?}");
        } else {
            assert_eq!(queue_threads, 2, "a thread per queue: {names:?}");
        }
        drop(g);
    }
}

/// Per-frontend memory (docs/reliability.md): requests run in guest
/// memory in place, so a frontend that keeps its ring full of large
/// reads and writes makes rsd hold no copy of their data. rsd's own
/// memory (RssAnon; the guest memory it maps is the frontend's shared
/// memory) stays flat over 64 MiB of I/O; what a frontend can have in
/// flight is bounded by its rings (64 queues of 1024 descriptors).
#[test]
fn large_requests_hold_no_memory_of_their_own() {
    let dir = TempDir::new();
    let img = dir.s("disk.img");
    ok(&run("qemu-img", &["create", "-q", "-f", "raw", &img, "4M"]));
    let sock = dir.s("vu.sock");
    let (d, _q) = start(Which::Rsd, &dir, &img, &sock, ",writable=on");
    let pid = d.child.id();
    let mut g = Guest::connect(Path::new(&sock), 1);
    // Warm up (the queue's thread and runtime), then measure.
    let warm = vec![g_read(&mut g, 0, 4096)];
    let _ = g.submit(0, warm);
    let base = crate::bounds::status_kib(pid, "RssAnon");
    for round in 0..8u8 {
        let data = pattern(round, 1 << 20);
        let writes = (0..4u64)
            .map(|i| g.req(T_OUT, i * 2048, &[&data], &[]))
            .collect();
        let answers = g.submit(0, writes);
        assert!(answers.iter().all(|a| a.status == Some(0)), "{answers:?}");
        let reads = (0..4u64)
            .map(|i| g_read(&mut g, i * 2048, 1 << 20))
            .collect();
        let answers = g.submit(0, reads);
        assert!(answers
            .iter()
            .all(|a| a.status == Some(0) && a.data == data));
    }
    let anon = crate::bounds::status_kib(pid, "RssAnon");
    eprintln!("RssAnon {base} then {anon} KiB");
    assert!(
        anon < base + (2 << 10),
        "rsd's own memory went from {base} to {anon} KiB over 64 MiB of I/O"
    );
}
