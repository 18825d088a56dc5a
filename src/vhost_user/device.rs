//! The vhost-user-blk device one frontend connection talks to: rsd's
//! answer to each frontend message, on the `vhost` crate's
//! `VhostUserBackendReqHandler` (the vhost-user-backend crate answers
//! GET/SET_INFLIGHT_FD "unsupported" and keeps its rings to itself).
//! It holds the connection's guest memory, its rings' settings and the
//! inflight region, and starts a worker (`worker.rs`) for each ring
//! that is set up, kicked and enabled.
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandler,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestRegionMmap,
};

use super::channel::Channel;
use super::config::{self, CONFIG_WCE_OFFSET};
use super::dirty::{self, DirtyLog};
use super::inflight::{self, QueueLog, Region};
pub use super::worker::Memory;
use super::worker::{Call, Start, Worker};
use super::Shared;

/// A queue holds at most this many descriptors (libvhost-user's limit).
const MAX_QUEUE_SIZE: u16 = 1024;
/// The most queues an export serves.
pub const MAX_QUEUES: u16 = 64;
/// Memory slots offered with CONFIGURE_MEM_SLOTS.
const MAX_MEM_SLOTS: u64 = 509;
/// The largest queue an inflight region may describe (virtio's limit).
const MAX_INFLIGHT_QUEUE_SIZE: u16 = 32768;

/// A region of the frontend's address space (SET_VRING_ADDR gives ring
/// addresses there).
struct Mapping {
    user: u64,
    size: u64,
    gpa: u64,
}

/// One ring's settings, and its worker while it runs.
#[derive(Default)]
struct Ring {
    size: u16,
    /// Descriptor table, avail ring, used ring (guest addresses).
    addrs: Option<(u64, u64, u64)>,
    next_avail: u16,
    kick: Option<File>,
    call: Call,
    err: Option<File>,
    enabled: bool,
    worker: Option<Worker>,
}

#[derive(Default)]
struct State {
    owned: bool,
    acked_features: u64,
    mappings: Vec<Mapping>,
    rings: Vec<Ring>,
    inflight: Option<Arc<Region>>,
    /// The dirty-page bitmap of SET_LOG_BASE (marked while LOG_ALL is acked).
    log_base: Option<Arc<DirtyLog>>,
    /// The crate's handle of the backend channel (kept so it stays open).
    backend: Option<Backend>,
}

pub struct Device {
    shared: Arc<Shared>,
    mem: Memory,
    st: Mutex<State>,
    channel: Channel,
    /// What the workers mark: the log while logging is on.
    dirty: dirty::Switch,
}

fn invalid(what: &'static str) -> VuError {
    VuError::InvalidOperation(what)
}

fn internal(e: impl std::fmt::Display) -> VuError {
    VuError::ReqHandlerError(io::Error::other(e.to_string()))
}

impl Device {
    pub fn new(shared: Arc<Shared>) -> Arc<Device> {
        let rings = (0..shared.num_queues).map(|_| Ring::default()).collect();
        Arc::new(Device {
            shared,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            st: Mutex::new(State {
                rings,
                ..State::default()
            }),
            channel: Channel::default(),
            dirty: dirty::Switch::default(),
        })
    }

    /// Logging is on while LOG_ALL is acked and a log base is given.
    fn update_logging(&self, st: &State) {
        let on = st.acked_features & config::F_LOG_ALL != 0;
        self.dirty.set(st.log_base.clone().filter(|_| on));
    }

    fn state(&self) -> VuResult<MutexGuard<'_, State>> {
        self.st
            .lock()
            .map_err(|_| internal("device state poisoned"))
    }

    /// The socket peeked from a SET_BACKEND_REQ_FD about to be handled.
    pub fn stash_backend_fd(&self, fd: OwnedFd) {
        self.channel.stash(fd);
    }

    /// Tells the frontend that the config space changed (a resize), if
    /// it gave a backend channel.
    pub fn config_changed(&self) {
        if let Err(e) = self.channel.config_changed() {
            tracing::debug!("vhost-user-blk: config change message: {e}");
        }
    }

    /// The connection is over: every ring stops, after the requests in
    /// flight are done (the drain of block-export-del and quit).
    pub fn shutdown(&self) {
        if let Ok(mut st) = self.st.lock() {
            for ring in st.rings.iter_mut() {
                stop(ring);
            }
        }
    }

    fn va_to_gpa(st: &State, va: u64) -> VuResult<u64> {
        st.mappings
            .iter()
            .find(|m| va >= m.user && va - m.user < m.size)
            .map(|m| va - m.user + m.gpa)
            .ok_or(VuError::InvalidParam)
    }

    /// Starts or stops ring i's worker to match its settings: it runs
    /// while it has addresses, a kick descriptor, memory and is enabled.
    fn refresh(&self, st: &mut State, i: usize) -> VuResult<()> {
        let event_idx = st.acked_features & config::RING_F_EVENT_IDX != 0;
        let inflight = st.inflight.clone();
        let mem_ready = self.mem.memory().num_regions() > 0;
        let Some(ring) = st.rings.get_mut(i) else {
            return Err(VuError::InvalidParam);
        };
        let wanted = ring.enabled && ring.kick.is_some() && ring.addrs.is_some() && mem_ready;
        if !wanted {
            stop(ring);
            return Ok(());
        }
        if ring.worker.is_some() {
            return Ok(());
        }
        let (Some((desc, avail, used)), Some(kick)) = (ring.addrs, ring.kick.as_ref()) else {
            return Ok(());
        };
        let mut queue = Queue::new(MAX_QUEUE_SIZE).map_err(internal)?;
        queue.try_set_size(ring.size).map_err(internal)?;
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .map_err(internal)?;
        queue
            .try_set_avail_ring_address(GuestAddress(avail))
            .map_err(internal)?;
        queue
            .try_set_used_ring_address(GuestAddress(used))
            .map_err(internal)?;
        queue.set_event_idx(event_idx);
        queue.set_next_avail(ring.next_avail);
        queue.set_ready(true);
        if !queue.is_valid(&*self.mem.memory()) {
            return Err(invalid("ring outside guest memory"));
        }
        let kick = OwnedFd::from(kick.try_clone().map_err(VuError::ReqHandlerError)?);
        let index = u16::try_from(i).map_err(|_| VuError::InvalidParam)?;
        let log = inflight.and_then(|r| QueueLog::new(r, index, ring.size));
        let worker = Worker::spawn(Start {
            index,
            shared: self.shared.clone(),
            mem: self.mem.clone(),
            queue,
            kick,
            call: ring.call.clone(),
            log,
            dirty: self.dirty.clone(),
        })
        .map_err(VuError::ReqHandlerError)?;
        ring.worker = Some(worker);
        Ok(())
    }

    fn refresh_all(&self, st: &mut State) -> VuResult<()> {
        for i in 0..st.rings.len() {
            self.refresh(st, i)?;
        }
        Ok(())
    }

    /// Guest memory changed: the new map replaces the old one for the
    /// requests that start from now on (those in flight keep theirs).
    fn set_memory(&self, st: &mut State, mem: GuestMemoryMmap) -> VuResult<()> {
        self.mem
            .lock()
            .map_err(|_| internal("guest memory lock poisoned"))?
            .replace(mem);
        self.refresh_all(st)
    }
}

/// Stops a ring's worker (waiting for its requests) and keeps where the
/// avail ring stands.
fn stop(ring: &mut Ring) {
    if let Some(w) = ring.worker.take() {
        if let Some(q) = w.stop() {
            ring.next_avail = q.next_avail();
        }
    }
}

fn ring_of(st: &mut State, index: u32) -> VuResult<&mut Ring> {
    st.rings
        .get_mut(index as usize)
        .ok_or(VuError::InvalidParam)
}

fn guest_region(region: &VhostUserMemoryRegion, file: File) -> VuResult<GuestRegionMmap> {
    GuestRegionMmap::new(
        region.mmap_region(file)?,
        GuestAddress(region.guest_phys_addr),
    )
    .ok_or(VuError::InvalidParam)
}

impl VhostUserBackendReqHandler for Device {
    fn set_owner(&self) -> VuResult<()> {
        let mut st = self.state()?;
        if st.owned {
            return Err(invalid("already claimed"));
        }
        st.owned = true;
        Ok(())
    }

    fn reset_owner(&self) -> VuResult<()> {
        let mut st = self.state()?;
        for ring in st.rings.iter_mut() {
            stop(ring);
        }
        st.owned = false;
        st.acked_features = 0;
        Ok(())
    }

    fn reset_device(&self) -> VuResult<()> {
        let mut st = self.state()?;
        for ring in st.rings.iter_mut() {
            ring.enabled = false;
            stop(ring);
        }
        st.acked_features = 0;
        Ok(())
    }

    fn get_features(&self) -> VuResult<u64> {
        Ok(config::features(self.shared.writable))
    }

    fn set_features(&self, features: u64) -> VuResult<()> {
        if features & !config::features(self.shared.writable) != 0 {
            return Err(VuError::InvalidParam);
        }
        let mut st = self.state()?;
        st.acked_features = features;
        self.update_logging(&st);
        // Without protocol features, rings start enabled.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for ring in st.rings.iter_mut() {
                ring.enabled = true;
            }
        }
        self.refresh_all(&mut st)
    }

    fn set_mem_table(
        &self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy.is_some() {
            return Err(invalid("postcopy is not supported"));
        }
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        for (region, file) in ctx.iter().zip(files) {
            regions.push(guest_region(region, file)?);
            mappings.push(Mapping {
                user: region.user_addr,
                size: region.memory_size,
                gpa: region.guest_phys_addr,
            });
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(internal)?;
        let mut st = self.state()?;
        st.mappings = mappings;
        self.set_memory(&mut st, mem)?;
        Ok(None)
    }

    fn set_vring_num(&self, index: u32, num: u32) -> VuResult<()> {
        let mut st = self.state()?;
        let ring = ring_of(&mut st, index)?;
        // Split rings have a power-of-two size.
        match u16::try_from(num) {
            Ok(n) if n.is_power_of_two() && n <= MAX_QUEUE_SIZE => {
                ring.size = n;
                Ok(())
            }
            _ => Err(VuError::InvalidParam),
        }
    }

    fn set_vring_addr(
        &self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let mut st = self.state()?;
        let addrs = (
            Device::va_to_gpa(&st, descriptor)?,
            Device::va_to_gpa(&st, available)?,
            Device::va_to_gpa(&st, used)?,
        );
        let ring = ring_of(&mut st, index)?;
        // New addresses: the worker serving the old ones ends first.
        stop(ring);
        ring.addrs = Some(addrs);
        self.refresh(&mut st, index as usize)
    }

    fn set_vring_base(&self, index: u32, base: u32) -> VuResult<()> {
        let mut st = self.state()?;
        let ring = ring_of(&mut st, index)?;
        ring.next_avail = base as u16;
        Ok(())
    }

    /// Stops the ring: its requests in flight finish first, so the used
    /// ring is complete when the frontend gets the answer.
    fn get_vring_base(&self, index: u32) -> VuResult<VhostUserVringState> {
        let mut st = self.state()?;
        let ring = ring_of(&mut st, index)?;
        stop(ring);
        ring.kick = None;
        if let Ok(mut c) = ring.call.lock() {
            *c = None;
        }
        Ok(VhostUserVringState::new(index, u32::from(ring.next_avail)))
    }

    fn set_vring_kick(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        let mut st = self.state()?;
        let ring = ring_of(&mut st, u32::from(index))?;
        // A new kick descriptor: the worker watching the old one ends.
        stop(ring);
        ring.kick = fd;
        self.refresh(&mut st, usize::from(index))
    }

    fn set_vring_call(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        let mut st = self.state()?;
        let ring = ring_of(&mut st, u32::from(index))?;
        if let Ok(mut c) = ring.call.lock() {
            *c = fd;
        }
        Ok(())
    }

    fn set_vring_err(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        let mut st = self.state()?;
        ring_of(&mut st, u32::from(index))?.err = fd;
        Ok(())
    }

    fn get_protocol_features(&self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(config::protocol_features())
    }

    /// The crate checks each message against the acknowledged bits.
    fn set_protocol_features(&self, _features: u64) -> VuResult<()> {
        Ok(())
    }

    fn get_queue_num(&self) -> VuResult<u64> {
        Ok(u64::from(self.shared.num_queues))
    }

    fn set_vring_enable(&self, index: u32, enable: bool) -> VuResult<()> {
        let mut st = self.state()?;
        ring_of(&mut st, index)?.enabled = enable;
        self.refresh(&mut st, index as usize)
    }

    fn get_config(
        &self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        Ok(self.shared.config().read(offset, size))
    }

    /// Only wce may be written, as in QSD: it turns the write cache on
    /// or off (off: every write is made stable before it completes).
    fn set_config(&self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        match buf {
            [wce] if offset as usize == CONFIG_WCE_OFFSET => {
                self.shared.wce.store(*wce, Ordering::Relaxed);
                self.shared.write_cache.store(*wce != 0, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(VuError::InvalidParam),
        }
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        self.channel.accept();
        if let Ok(mut st) = self.st.lock() {
            st.backend = Some(backend);
        }
    }

    fn set_gpu_socket(&self, _gpu: GpuBackend) -> VuResult<()> {
        Err(invalid("not a GPU"))
    }

    fn get_shared_object(&self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(invalid("no shared objects"))
    }

    /// A new region for the frontend to keep: zeroed, each queue's part
    /// marked unused until its ring starts.
    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        if msg.num_queues > MAX_QUEUES || msg.queue_size > MAX_INFLIGHT_QUEUE_SIZE {
            return Err(VuError::InvalidParam);
        }
        let (region, file) = Region::create(msg.num_queues, msg.queue_size).map_err(internal)?;
        drop(region);
        let size = inflight::queue_stride(msg.queue_size) as u64 * u64::from(msg.num_queues);
        Ok((
            VhostUserInflight::new(size, 0, msg.num_queues, msg.queue_size),
            file,
        ))
    }

    /// The region to track requests in from now on: the one this device
    /// made, or one a previous device made and the frontend kept, whose
    /// requests in flight run again when their ring starts.
    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> VuResult<()> {
        if msg.num_queues > MAX_QUEUES {
            return Err(VuError::InvalidParam);
        }
        let region =
            Region::open(file, msg.mmap_offset, msg.mmap_size, msg.num_queues).map_err(internal)?;
        self.state()?.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy.is_some() {
            return Err(invalid("postcopy is not supported"));
        }
        let added = Arc::new(guest_region(region, fd)?);
        let mem = self.mem.memory().insert_region(added).map_err(internal)?;
        let mut st = self.state()?;
        st.mappings.push(Mapping {
            user: region.user_addr,
            size: region.memory_size,
            gpa: region.guest_phys_addr,
        });
        self.set_memory(&mut st, mem)?;
        Ok(None)
    }

    fn remove_mem_region(&self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(internal)?;
        let mut st = self.state()?;
        st.mappings.retain(|m| m.gpa != region.guest_phys_addr);
        self.set_memory(&mut st, mem)
    }

    fn set_device_state_fd(
        &self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(invalid("no device state transfer"))
    }

    fn check_device_state(&self) -> VuResult<()> {
        Err(invalid("no device state transfer"))
    }

    fn get_shmem_config(&self) -> VuResult<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }

    fn set_log_base(&self, log: &VhostUserLog, file: File) -> VuResult<()> {
        let map = DirtyLog::map(&file, log.mmap_size, log.mmap_offset)
            .map_err(VuError::ReqHandlerError)?;
        let mut st = self.state()?;
        st.log_base = Some(Arc::new(map));
        self.update_logging(&st);
        Ok(())
    }
}
