//! In-flight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), the
//! split-ring layout of the vhost-user spec ("Inflight I/O tracking").
//! The frontend keeps the region (a memfd the device made on
//! GET_INFLIGHT_FD) across a restart of the device and hands it back
//! with SET_INFLIGHT_FD; the device marks each request it takes from
//! the ring and clears the mark when the request is in the used ring,
//! so a new device resubmits exactly the requests that were taken and
//! never completed.
//!
//! One queue's region: a 16-byte header (features u64, version u16,
//! desc_num u16, last_batch_head u16, used_idx u16), then one 16-byte
//! entry per descriptor (inflight u8, 5 bytes of padding, next u16,
//! counter u64). Queue regions follow each other, each `stride` bytes.
//! Requests complete one at a time here (a batch of one), so the last
//! batch the recovery may have to fix is one entry.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

const HEADER: usize = 16;
const ENTRY: usize = 16;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const ENTRY_NEXT: usize = 6;
const ENTRY_COUNTER: usize = 8;
/// The layout version the spec defines; 0 marks a region never used.
const VERSION: u16 = 1;
/// Queue regions start on this boundary (as libvhost-user aligns them).
const ALIGN: usize = 64;
/// The largest region a frontend may hand over: 64 queues of 32768
/// descriptors, far more than any device here serves.
const MAX_REGION: u64 = 64 * (HEADER as u64 + 32768 * ENTRY as u64 + ALIGN as u64);

/// The bytes one queue of `queue_size` descriptors needs.
pub fn queue_stride(queue_size: u16) -> usize {
    (HEADER + ENTRY * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// A mapped inflight region, shared with the frontend.
pub struct Region {
    map: MmapRegion,
    num_queues: u16,
    stride: usize,
}

impl Region {
    /// A new region for GET_INFLIGHT_FD: a zeroed memfd, each queue's
    /// desc_num set and its version 0 (not used yet).
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Region, File), String> {
        if num_queues == 0 || queue_size == 0 {
            return Err("no queues to track".into());
        }
        let stride = queue_stride(queue_size);
        let size = stride * usize::from(num_queues);
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(
            c"rsd-vhost-inflight",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(|e| e.desc().to_string())?;
        let file = File::from(fd);
        file.set_len(size as u64).map_err(|e| e.to_string())?;
        // Its size is fixed for good: no one holding it (the frontend, a
        // later device) can shrink it under a mapping.
        let seals = SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL;
        fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(|e| e.desc().to_string())?;
        let region = Region::map(&file, 0, size as u64, num_queues)?;
        for q in 0..num_queues {
            region.put_u16(region.base(q) + OFF_DESC_NUM, queue_size);
        }
        Ok((region, file))
    }

    /// The region SET_INFLIGHT_FD names: `size` bytes at `offset` in
    /// the frontend's file, split evenly between `num_queues` queues.
    /// The file must hold the whole region: touching a page past its
    /// end would kill the process.
    pub fn open(file: File, offset: u64, size: u64, num_queues: u16) -> Result<Region, String> {
        if num_queues == 0 || size == 0 || size > MAX_REGION {
            return Err("inflight region size out of range".into());
        }
        let len = nix::sys::stat::fstat(file.as_raw_fd())
            .map_err(|e| e.desc().to_string())?
            .st_size;
        let end = offset
            .checked_add(size)
            .ok_or("inflight region overflows")?;
        if u64::try_from(len).unwrap_or(0) < end {
            return Err("inflight region past the end of its file".into());
        }
        Region::map(&file, offset, size, num_queues)
    }

    fn map(file: &File, offset: u64, size: u64, num_queues: u16) -> Result<Region, String> {
        let stride = usize::try_from(size / u64::from(num_queues)).map_err(|e| e.to_string())?;
        if stride < HEADER + ENTRY {
            return Err("inflight region too small".into());
        }
        let file = file.try_clone().map_err(|e| e.to_string())?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), size as usize)
            .map_err(|e| e.to_string())?;
        Ok(Region {
            map,
            num_queues,
            stride,
        })
    }

    fn base(&self, q: u16) -> usize {
        usize::from(q) * self.stride
    }

    /// The descriptors queue q's region can track.
    fn capacity(&self) -> u16 {
        u16::try_from((self.stride - HEADER) / ENTRY).unwrap_or(u16::MAX)
    }

    // Accesses are bounds-checked by vm-memory; a region whose size was
    // checked when it was mapped never fails them, so failures are
    // ignored (reads give 0).
    fn get_u8(&self, at: usize) -> u8 {
        self.map.as_volatile_slice().read_obj(at).unwrap_or(0)
    }
    fn get_u16(&self, at: usize) -> u16 {
        self.map.as_volatile_slice().read_obj(at).unwrap_or(0)
    }
    fn get_u64(&self, at: usize) -> u64 {
        self.map.as_volatile_slice().read_obj(at).unwrap_or(0)
    }
    fn put_u8(&self, at: usize, v: u8) {
        let _ = self.map.as_volatile_slice().write_obj(v, at);
    }
    fn put_u16(&self, at: usize, v: u16) {
        let _ = self.map.as_volatile_slice().write_obj(v, at);
    }
    fn put_u64(&self, at: usize, v: u64) {
        let _ = self.map.as_volatile_slice().write_obj(v, at);
    }
}

/// What a queue's worker finds when it starts with a region.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// A region never used: nothing was in flight.
    Fresh,
    /// The heads to run again, oldest first, and where the avail ring
    /// continues (the used index plus the requests still in flight).
    Resubmit { heads: Vec<u16>, next_avail: u16 },
}

/// One queue's part of a region, as its worker uses it (the worker is
/// its only writer while it runs).
pub struct QueueLog {
    region: Arc<Region>,
    base: usize,
    /// Entries tracked: the queue's size, at most what the region holds.
    desc_num: u16,
    counter: u64,
}

impl QueueLog {
    /// Queue q's log for a ring of `queue_size` descriptors; None when
    /// the region has no room for queue q.
    pub fn new(region: Arc<Region>, q: u16, queue_size: u16) -> Option<QueueLog> {
        if q >= region.num_queues {
            return None;
        }
        let desc_num = queue_size.min(region.capacity());
        Some(QueueLog {
            base: region.base(q),
            region,
            desc_num,
            counter: 0,
        })
    }

    fn entry(&self, head: u16) -> Option<usize> {
        (head < self.desc_num).then(|| self.base + HEADER + ENTRY * usize::from(head))
    }

    /// Starts the queue on the region, `used_idx` being the used ring's
    /// index now: a fresh region is initialised; a used one is repaired
    /// (a completion whose used index reached the ring but whose mark
    /// was not cleared yet) and its marked requests are listed, ordered
    /// by the counter they were taken with.
    pub fn start(&mut self, used_idx: u16) -> Recovery {
        let r = &*self.region;
        if r.get_u16(self.base + OFF_VERSION) == 0 {
            r.put_u16(self.base + OFF_DESC_NUM, self.desc_num);
            r.put_u16(self.base + OFF_LAST_BATCH_HEAD, 0);
            r.put_u16(self.base + OFF_USED_IDX, used_idx);
            fence(Ordering::SeqCst);
            r.put_u16(self.base + OFF_VERSION, VERSION);
            return Recovery::Fresh;
        }
        let logged = r.get_u16(self.base + OFF_USED_IDX);
        if logged != used_idx {
            // The last batch reached the used ring: its marks are stale.
            let batch = used_idx.wrapping_sub(logged).min(self.desc_num);
            let mut head = r.get_u16(self.base + OFF_LAST_BATCH_HEAD);
            for _ in 0..batch {
                let Some(at) = self.entry(head) else { break };
                r.put_u8(at, 0);
                head = r.get_u16(at + ENTRY_NEXT);
            }
            fence(Ordering::SeqCst);
            r.put_u16(self.base + OFF_USED_IDX, used_idx);
        }
        let mut marked: Vec<(u64, u16)> = (0..self.desc_num)
            .filter_map(|h| {
                let at = self.entry(h)?;
                (r.get_u8(at) == 1).then(|| (r.get_u64(at + ENTRY_COUNTER), h))
            })
            .collect();
        marked.sort_unstable();
        self.counter = marked.last().map_or(0, |(c, _)| c.wrapping_add(1));
        let inuse = u16::try_from(marked.len()).unwrap_or(u16::MAX);
        Recovery::Resubmit {
            heads: marked.into_iter().map(|(_, h)| h).collect(),
            next_avail: used_idx.wrapping_add(inuse),
        }
    }

    /// A request taken from the avail ring (before it runs).
    pub fn taken(&mut self, head: u16) {
        let Some(at) = self.entry(head) else { return };
        let r = &*self.region;
        r.put_u64(at + ENTRY_COUNTER, self.counter);
        self.counter = self.counter.wrapping_add(1);
        fence(Ordering::SeqCst);
        r.put_u8(at, 1);
    }

    /// A request about to go into the used ring (a batch of one).
    pub fn completing(&mut self, head: u16) {
        let Some(at) = self.entry(head) else { return };
        let r = &*self.region;
        let last = r.get_u16(self.base + OFF_LAST_BATCH_HEAD);
        r.put_u16(at + ENTRY_NEXT, last);
        r.put_u16(self.base + OFF_LAST_BATCH_HEAD, head);
        fence(Ordering::SeqCst);
    }

    /// The request is in the used ring, whose index is now `used_idx`.
    pub fn completed(&mut self, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        let r = &*self.region;
        if let Some(at) = self.entry(head) {
            r.put_u8(at, 0);
        }
        fence(Ordering::SeqCst);
        r.put_u16(self.base + OFF_USED_IDX, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(q: u16) -> (Arc<Region>, QueueLog) {
        let (r, _file) = Region::create(2, 8).expect("region");
        let r = Arc::new(r);
        let l = QueueLog::new(r.clone(), q, 8).expect("log");
        (r, l)
    }

    #[test]
    fn stride_holds_header_and_entries() {
        assert_eq!(queue_stride(1), 64);
        assert_eq!(queue_stride(128), 2112);
        assert!(queue_stride(3) >= HEADER + 3 * ENTRY);
    }

    #[test]
    fn fresh_then_nothing_in_flight() {
        let (r, mut l) = log(1);
        assert_eq!(l.start(5), Recovery::Fresh);
        assert_eq!(r.get_u16(r.base(1) + OFF_VERSION), 1);
        assert_eq!(r.get_u16(r.base(1) + OFF_DESC_NUM), 8);
        let mut again = QueueLog::new(r, 1, 8).expect("log");
        assert_eq!(
            again.start(5),
            Recovery::Resubmit {
                heads: vec![],
                next_avail: 5
            }
        );
    }

    #[test]
    fn marked_requests_come_back_in_the_order_taken() {
        let (r, mut l) = log(0);
        assert_eq!(l.start(0), Recovery::Fresh);
        for h in [3, 1, 6, 2] {
            l.taken(h);
        }
        // 1 completes fully; 6 reaches the used ring but the device
        // dies before clearing its mark.
        l.completing(1);
        l.completed(1, 1);
        l.completing(6);
        let mut next = QueueLog::new(r.clone(), 0, 8).expect("log");
        assert_eq!(
            next.start(2),
            Recovery::Resubmit {
                heads: vec![3, 2],
                next_avail: 4
            }
        );
        // The counter goes on after the newest request resubmitted.
        next.taken(5);
        let at = next.entry(5).expect("entry");
        assert_eq!(r.get_u64(at + ENTRY_COUNTER), 4);
    }

    #[test]
    fn a_completion_that_never_reached_the_ring_runs_again() {
        let (r, mut l) = log(0);
        l.start(0);
        l.taken(4);
        l.completing(4);
        let mut next = QueueLog::new(r, 0, 8).expect("log");
        assert_eq!(
            next.start(0),
            Recovery::Resubmit {
                heads: vec![4],
                next_avail: 1
            }
        );
    }

    #[test]
    fn a_region_past_its_file_is_refused() {
        let (_r, file) = Region::create(1, 8).expect("region");
        assert!(Region::open(file.try_clone().expect("dup"), 0, 4096, 1).is_err());
        assert!(Region::open(file, 0, 192, 1).is_ok());
    }
}
