//! The qcow2 format driver (docs/interop/qcow2.txt in QEMU).
//!
//! - Reads walk L1 -> L2 (cached, see l2.rs) and go to the data file, the
//!   backing node, zeroes or the decompressor, one run of like clusters
//!   at a time; contiguous host data is read in one request.
//! - Writes to clusters that are allocated and not shared go straight to
//!   the data file with no lock but a shared "nothing is being freed"
//!   guard. Everything else (allocation, copy-on-write of shared or
//!   compressed clusters, zeroing, discard) runs under the metadata lock.
//! - An allocating write takes the metadata lock only to plan (allocate
//!   host clusters, in the caches) and to link (set the L2 entries); its
//!   data goes to the file outside the lock, with the guest clusters
//!   marked in flight so that overlapping requests wait for it.
//! - L2 tables and refcount blocks are cached write-back (QEMU's qcow2
//!   caches). Write-back order: dirty refcount blocks, a sync, then the
//!   dirty L2 tables (with lazy refcounts: the dirty bit instead of the
//!   sync). A sync also goes before L2 tables whenever data they will
//!   point at (copy-on-write content, reused clusters) is not yet stable.
//!   L1 entries are written through, after their new L2 table and its
//!   refcount are synced. Old clusters are released only after a sync
//!   that made the new pointers stable. One sync serves every allocation
//!   made since the last write-back, and a crash can leak clusters, never
//!   corrupt the image.
//! - Write-back happens on flush and FUA, when the L2 cache is over its
//!   size, before clusters are released, on the cache-clean-interval
//!   tick and when the node is closed (`Driver::close`).
mod attach;
pub mod bitmaps;
pub mod compress;
mod compressed_write;
pub mod create;
pub mod crypt;
pub mod header;
mod internal;
pub mod l2;
mod map;
pub mod overlap;
pub mod refcount;
mod reload;
mod repair;
mod snapshot;
mod write;
mod writeback;
mod zero;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};

use serde_json::{json, Value};

use super::child::Child;
use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::error::{BlockError, BlockResult};
use super::node::Node;
use super::perm::Perm;
use header::Header;
use l2::{Map, OFFSET_MASK};
use refcount::Refcounts;

pub use attach::open_node;

/// QCOW_MAX_L1_SIZE (32 MiB) in entries.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

/// QMP events a block driver raises: (name, data).
pub type BlockEvents = crate::events::EventSink;

/// Options of the qcow2 driver that change behaviour, and what it needs
/// to report corruption.
#[derive(Clone, Default)]
pub struct Qcow2Options {
    pub node_name: String,
    pub events: Option<BlockEvents>,
    /// QEMU's cache options (qapi BlockdevOptionsQcow2), in bytes.
    pub l2_cache_size: Option<u64>,
    pub l2_cache_entry_size: Option<u64>,
    pub refcount_cache_size: Option<u64>,
    pub cache_size: Option<u64>,
    /// Seconds between cache-clean ticks (QEMU's default 600; 0: none).
    pub cache_clean_interval: Option<u64>,
    /// lazy-refcounts; the image's compatible bit when absent.
    pub lazy_refcounts: Option<bool>,
    /// The header's backing file name resolved against the image's
    /// directory (full-backing-filename).
    pub backing_full: Option<String>,
    /// pass-discard-request: clusters freed by guest discards and
    /// unmapping zeroes are discarded in the file too.
    pub pass_discard: bool,
    /// The unlocked encryption of an encrypted image.
    pub crypt: Option<Arc<crypt::Crypt>>,
}

/// The driver: the image's state, shared with its cache-clean timer.
pub struct Qcow2 {
    img: Arc<Image>,
    _timer: Option<crate::util::AbortOnDrop>,
}

impl std::ops::Deref for Qcow2 {
    type Target = Image;
    fn deref(&self) -> &Image {
        &self.img
    }
}

pub struct Image {
    file: Arc<Node>,
    /// Where guest data lives: `file`, or the external data file.
    data: Arc<Node>,
    external: bool,
    /// The backing node's edge: the graph re-points it (snapshots,
    /// reopen), reads go through it counted.
    backing: Arc<Child>,
    header: std::sync::Mutex<Header>,
    bits: u32,
    /// log2 of the entries per L2 table.
    l2_bits: u32,
    ext: bool,
    /// log2 of the subcluster size (the cluster size without extended L2).
    sc_bits: u32,
    size: AtomicU64,
    l1: RwLock<Vec<u64>>,
    l1_offset: AtomicU64,
    cache: l2::Cache,
    meta: tokio::sync::Mutex<Refcounts>,
    /// Guest clusters whose allocation is in flight: planned, their data
    /// being written outside the metadata lock, not linked yet. Whoever
    /// would change their L2 entries waits for `alloc_done`.
    inflight: std::sync::Mutex<HashSet<u64>>,
    alloc_done: tokio::sync::Notify,
    /// lazy-refcounts: L2 tables may reach the file before the refcounts
    /// of their clusters, with the dirty bit set meanwhile.
    lazy: bool,
    /// The file was grown ahead of allocations (see write.rs): cut what
    /// is left unused on close.
    grown: AtomicBool,
    /// Counts mapping changes (L1 and L2 entries); `synced_gen` is the
    /// count a completed flush made stable. A FUA write in place whose
    /// mapping is older than that needs no flush of its own.
    meta_gen: AtomicU64,
    synced_gen: AtomicU64,
    /// Writes in place hold it shared; releasing clusters holds it alone,
    /// so no in-place write can land in a cluster after it is freed.
    free_guard: tokio::sync::RwLock<()>,
    read_only: AtomicBool,
    corrupt: AtomicBool,
    /// The header's backing name resolved against the image's directory.
    backing_full: std::sync::Mutex<Option<String>>,
    pass_discard: bool,
    overlap: Arc<overlap::Overlap>,
    node_name: String,
    events: Option<BlockEvents>,
    /// The bitmap directory as on disk now.
    bitmap_dir: std::sync::Mutex<Vec<bitmaps::DirEntry>>,
    /// Bitmaps loaded on open, until the node takes them.
    loaded: std::sync::Mutex<Vec<crate::block::dirty::NamedBitmap>>,
    /// The internal snapshot table as it is on disk.
    snaps: std::sync::Mutex<Vec<snapshot::Entry>>,
    /// An encrypted image's cipher (data in whole 512-byte sectors).
    crypt: Option<Arc<crypt::Crypt>>,
    /// Encrypted images: writes of whole sectors hold it shared, a
    /// read-modify-write of a partial sector alone.
    rmw: tokio::sync::RwLock<()>,
}

/// One piece of a request: the L2 entry of its cluster, what its first
/// byte maps to and for how long (`len`), within `room` bytes.
pub(super) struct Piece {
    entry: u64,
    map: Map,
    len: u64,
    room: u64,
}

fn be64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

/// The header of the image on `file`.
pub async fn read_header(file: &Node) -> BlockResult<Header> {
    let fsize = file.size();
    let mut first = vec![0u8; fsize.min(104) as usize];
    file.read(0, &mut first).await?;
    if first.len() < 24 || first[..4] != header::MAGIC.to_be_bytes() {
        return Err(BlockError::inval("Image is not in qcow2 format"));
    }
    let bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
        return Header::parse(&first);
    }
    let mut cluster = vec![0u8; fsize.min(1 << bits) as usize];
    file.read(0, &mut cluster).await?;
    Header::parse(&cluster)
}

/// The format of a backing file named without one: qcow2 by its magic,
/// raw otherwise (QEMU probes the same way for these two).
pub fn probe(path: &str) -> String {
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == header::MAGIC.to_be_bytes();
    if is_qcow2 { "qcow2" } else { "raw" }.to_string()
}

impl Qcow2 {
    /// Opens the image on `file`, whose header the caller has read (it
    /// needed it to open the children). `data` is the external data file
    /// node when the image has one; `backing` the backing node if any.
    pub async fn open(
        file: Arc<Node>,
        mut h: Header,
        data: Option<Arc<Node>>,
        backing: Option<Arc<Node>>,
        read_only: bool,
        opts: &Qcow2Options,
    ) -> BlockResult<Qcow2> {
        if h.incompatible & header::INCOMPAT_CORRUPT != 0 && !read_only {
            return Err(BlockError::new(
                nix::libc::EACCES,
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        if h.crypt_method != 0 && opts.crypt.is_none() {
            return Err(BlockError::inval(
                "Parameter 'encrypt.key-secret' is required for cipher",
            ));
        }
        if h.has_data_file() && data.is_none() {
            return Err(BlockError::inval("'data-file' is required for this image"));
        }
        let bits = h.cluster_bits;
        let ext = h.extended_l2();
        let l2_bits = bits - 3 - u32::from(ext);
        let l1_bytes = u64::from(h.l1_size) * 8;
        // An L1 table past the end of the file reads as zeroes (the
        // file does), as in QSD.
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read(h.l1_table_offset, &mut raw).await?;
        let l1 = be64s(&raw);
        let ov = Arc::new(overlap::Overlap::new(bits));
        let mut refs = Refcounts::load(
            ov.clone(),
            file.clone(),
            bits,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )
        .await?;
        if !read_only {
            // Writes trust the refcount table: it must be sane.
            refs.validate()?;
        }
        if h.incompatible & header::INCOMPAT_DIRTY != 0 && !read_only {
            // Lazy refcounts left unfinished by a crash: count again.
            repair::repair(&file, &mut h, &mut refs).await?;
        }
        // What data writes must never touch.
        ov.add_range(overlap::HEADER, 0, 1 << bits);
        ov.set_range(overlap::ACTIVE_L1, h.l1_table_offset, l1_bytes);
        for e in &l1 {
            if e & OFFSET_MASK != 0 {
                ov.add_cluster(overlap::ACTIVE_L2, e & OFFSET_MASK);
            }
        }
        let snaps = snapshot::read(&file, &h).await?;
        ov.add_range(overlap::SNAPSHOT_TABLE, h.snapshots_offset, snaps.table_len);
        for (off, n) in snaps.l1_tables {
            ov.add_range(overlap::INACTIVE_L1, off, n * 8);
        }
        let (l2_bytes, rc_bytes) = cache_sizes(&h, l2_bits, opts)?;
        let cache = l2::Cache::new((l2_bytes >> bits) as usize);
        refs.set_capacity((rc_bytes >> bits) as usize);
        let interval = opts.cache_clean_interval.unwrap_or(600);
        if interval > u64::from(u32::MAX) {
            return Err(BlockError::inval("Cache clean interval too big"));
        }
        let lazy = opts
            .lazy_refcounts
            .unwrap_or(h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0);
        if lazy && h.version < 3 {
            return Err(BlockError::inval(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
            ));
        }
        // Clear the auto-clear bits rsd does not know before writing, as
        // the spec asks; it knows bitmaps.
        let keep = header::AUTOCLEAR_DATA_FILE_RAW | header::AUTOCLEAR_BITMAPS;
        if !read_only && h.autoclear & !keep != 0 {
            h.autoclear &= keep;
            file.write(
                header::OFF_AUTOCLEAR,
                &h.autoclear.to_be_bytes(),
                WriteFlags::default(),
            )
            .await?;
            file.flush().await?;
        }
        let loaded = bitmaps::load(&file, &h, h.size & !511, read_only).await?;
        if let Some(e) = h.bitmaps {
            ov.set_range(overlap::BITMAP_DIRECTORY, e.dir_offset, e.dir_size);
        }
        // A bitmaps extension a program without bitmaps left behind is
        // dropped on a read-write open, as QEMU does (its clusters leak).
        if h.has_bitmaps && h.bitmaps.is_none() {
            eprintln!(
                "rsd: warning: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent\nSome clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
            );
        }
        let stale_bitmaps = !read_only && h.has_bitmaps && h.bitmaps.is_none();
        let img = Arc::new(Image {
            external: data.is_some(),
            data: data.unwrap_or_else(|| file.clone()),
            file,
            backing: backing.map_or_else(Child::empty, Child::new),
            bits,
            l2_bits,
            ext,
            sc_bits: if ext { bits - 5 } else { bits },
            // Whole sectors, as QEMU: a 513-byte image is 512 bytes long.
            size: AtomicU64::new(h.size & !511),
            l1_offset: AtomicU64::new(h.l1_table_offset),
            l1: RwLock::new(l1),
            header: std::sync::Mutex::new(h),
            cache,
            meta: tokio::sync::Mutex::new(refs),
            inflight: std::sync::Mutex::new(HashSet::new()),
            alloc_done: tokio::sync::Notify::new(),
            lazy,
            grown: AtomicBool::new(false),
            meta_gen: AtomicU64::new(0),
            synced_gen: AtomicU64::new(0),
            free_guard: tokio::sync::RwLock::new(()),
            read_only: AtomicBool::new(read_only),
            corrupt: AtomicBool::new(false),
            backing_full: std::sync::Mutex::new(opts.backing_full.clone()),
            pass_discard: opts.pass_discard,
            overlap: ov,
            node_name: opts.node_name.clone(),
            events: opts.events.clone(),
            bitmap_dir: std::sync::Mutex::new(loaded.dir),
            loaded: std::sync::Mutex::new(loaded.bitmaps),
            snaps: std::sync::Mutex::new(snaps.entries),
            crypt: opts.crypt.clone(),
            rmw: tokio::sync::RwLock::new(()),
        });
        if stale_bitmaps {
            img.set_bitmaps_ext(None).await?;
        }
        let timer = (interval > 0)
            .then(|| tokio::runtime::Handle::try_current().ok())
            .flatten()
            .map(|rt| {
                let weak = Arc::downgrade(&img);
                crate::util::AbortOnDrop(rt.spawn(clean_timer(weak, interval)))
            });
        Ok(Qcow2 { img, _timer: timer })
    }
}

/// The L2 and refcount cache sizes in bytes from QEMU's options (its
/// read_cache_sizes): by default L2 tables for the whole disk up to
/// 32 MiB, and 4 refcount blocks; `cache-size` gives the L2 cache what
/// it can use and the refcount cache the rest.
fn cache_sizes(h: &Header, l2_bits: u32, o: &Qcow2Options) -> BlockResult<(u64, u64)> {
    let cs = h.cluster_size();
    let min_rc = refcount::MIN_CACHED_BLOCKS as u64 * cs;
    let max_l2 = h.size.div_ceil(1 << (h.cluster_bits + l2_bits)) * cs;
    let l2_setting = o.l2_cache_size.unwrap_or(32 << 20);
    let mut l2 = max_l2.min(l2_setting);
    let mut rc = o.refcount_cache_size.unwrap_or(0);
    if let Some(all) = o.cache_size {
        if o.l2_cache_size.is_some() && o.refcount_cache_size.is_some() {
            return Err(BlockError::inval(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
            ));
        } else if o.l2_cache_size.is_some() && l2_setting > all {
            return Err(BlockError::inval("l2-cache-size may not exceed cache-size"));
        } else if rc > all {
            return Err(BlockError::inval(
                "refcount-cache-size may not exceed cache-size",
            ));
        }
        if o.l2_cache_size.is_some() {
            rc = all - l2;
        } else if o.refcount_cache_size.is_some() {
            l2 = all - rc;
        } else if all >= max_l2 + min_rc {
            l2 = max_l2;
            rc = all - l2;
        } else {
            rc = all.min(min_rc);
            l2 = all - rc;
        }
    }
    if let Some(e) = o.l2_cache_entry_size {
        if e < 512 || e > cs || !e.is_power_of_two() {
            return Err(BlockError::inval(format!(
                "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
            )));
        }
    }
    Ok((l2, rc))
}

/// cache-clean-interval: every `secs` seconds the dirty tables are
/// written back and the tables nobody used since the last tick dropped.
async fn clean_timer(img: Weak<Image>, secs: u64) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        let Some(img) = img.upgrade() else {
            return;
        };
        img.clean_tick().await;
    }
}

impl Drop for Qcow2 {
    /// A node dropped without `close` (the daemon closes every node it
    /// drops; this is a safety net): its dirty metadata is written back
    /// on a task of its own.
    fn drop(&mut self) {
        if !self.maybe_dirty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let img = self.img.clone();
            rt.spawn(async move {
                let _ = img.close_image().await;
            });
        }
    }
}

impl Image {
    /// The guest disk's size.
    pub fn disk_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
}

/// What a qcow2 node takes on its file whatever its users ask: its
/// metadata is read, and written even when the guest does not write,
/// and nobody else may write or resize it.
pub fn metadata_perms(read_only: bool) -> (Perm, Perm) {
    let mut perm = Perm::CONSISTENT_READ;
    if !read_only {
        perm = perm.union(Perm::WRITE).union(Perm::RESIZE);
    }
    (perm, Perm::ALL.without(Perm::WRITE).without(Perm::RESIZE))
}

impl Qcow2 {
    /// write-zeroes: zero clusters (or subclusters) where whole ones are
    /// covered in a v3 image, zeroes written as data around them.
    async fn zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        let unit = 1u64 << self.sc_bits;
        let size = self.size();
        let start = offset.next_multiple_of(unit).min(offset + len);
        let mut end = (offset + len) & !(unit - 1);
        if offset + len == size {
            end = offset + len; // the image's last, partial unit
        }
        let end = end.max(start);
        // v2 has no zero flag: zeroes are written as data.
        let meta_ok = self.header().version >= 3;
        if !meta_ok || (start == end) {
            if flags.no_fallback {
                return Err(BlockError::unsupported("write zeroes needs a data write"));
            }
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut g = offset;
            while g < offset + len {
                let n = ((offset + len - g) as usize).min(zeros.len());
                self.write_impl(g, &zeros[..n], WriteFlags::default())
                    .await?;
                g += n as u64;
            }
        } else {
            if flags.no_fallback && (start > offset || end < offset + len) {
                return Err(BlockError::unsupported("write zeroes needs a data write"));
            }
            let zeros = vec![0u8; unit as usize];
            if start > offset {
                self.write_impl(
                    offset,
                    &zeros[..(start - offset) as usize],
                    WriteFlags::default(),
                )
                .await?;
            }
            self.zero_clusters(start, end - start, flags.may_unmap, false, false)
                .await?;
            if offset + len > end {
                self.write_impl(
                    end,
                    &zeros[..(offset + len - end) as usize],
                    WriteFlags::default(),
                )
                .await?;
            }
        }
        if flags.fua {
            self.flush_all().await?;
        }
        Ok(())
    }
}

impl Driver for Qcow2 {
    fn name(&self) -> &'static str {
        "qcow2"
    }
    fn size(&self) -> u64 {
        self.disk_size()
    }
    fn limits(&self) -> Limits {
        Limits {
            // Encrypted data is whole sectors, as in QEMU.
            request_alignment: if self.crypt.is_some() { 512 } else { 1 },
            max_transfer: 32 << 20,
        }
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        self.boundary(self.read_any(offset, buf))
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        if flags.compressed {
            return self.boundary(self.write_compressed(offset, buf, flags));
        }
        self.boundary(self.write_any(offset, buf, flags))
    }
    fn can_compress(&self) -> bool {
        true
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.boundary(self.flush_all())
    }
    fn close(&self) -> IoFuture<'_, ()> {
        self.boundary(self.close_image())
    }
    fn invalidate_cache(&self) -> IoFuture<'_, ()> {
        self.boundary(self.reload())
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.boundary(async move {
            self.check_usable()?;
            // Only whole clusters are discarded; the rest is advisory.
            let start = offset.next_multiple_of(self.cs());
            let end = ((offset + len) & !(self.cs() - 1)).max(start);
            let end = if offset + len == self.size() {
                offset + len
            } else {
                end
            };
            if end > start {
                self.zero_clusters(start, end - start, true, true, false)
                    .await?;
            }
            Ok(())
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        self.boundary(async move {
            self.check_usable()?;
            if self.crypt.is_some() {
                return self.write_zeroes_encrypted(offset, len, flags).await;
            }
            self.zeroes(offset, len, flags).await
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        self.boundary(async move {
            let len = len.min(1 << 30);
            let mut run = 0u64;
            let mut kind = None;
            while run < len {
                let p = self.piece(offset + run, offset + len).await?;
                let (m, n) = (p.map, p.len);
                let k = match m {
                    Map::Data(_) | Map::Compressed(_) => 0,
                    Map::Zero => 1,
                    Map::Unalloc => 2,
                };
                if kind.is_some_and(|k0| k0 != k) {
                    break;
                }
                kind = Some(k);
                run += n;
            }
            match kind {
                Some(0) => Ok(Extent {
                    len: run,
                    data: true,
                    zero: false,
                    depth: 1,
                }),
                Some(1) => Ok(Extent {
                    len: run,
                    data: false,
                    zero: true,
                    depth: 1,
                }),
                _ => {
                    let Some(b) = self.backing.enter().await else {
                        return Ok(Extent {
                            len: run,
                            data: false,
                            zero: true,
                            depth: 0,
                        });
                    };
                    if offset >= b.size() {
                        return Ok(Extent {
                            len: run,
                            data: false,
                            zero: true,
                            depth: 0,
                        });
                    }
                    let mut x = b.block_status(offset, run.min(b.size() - offset)).await?;
                    x.depth = if x.depth == 0 { 0 } else { x.depth + 1 };
                    Ok(x)
                }
            }
        })
    }
    fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        self.boundary(async move {
            self.check_usable()?;
            let old = self.size();
            if !size.is_multiple_of(512) {
                return Err(BlockError::inval("The new size must be a multiple of 512"));
            }
            if size < old {
                return self.shrink(size).await;
            }
            let mut meta = self.meta.lock().await;
            let need = size.div_ceil(1 << (self.bits + self.l2_bits));
            if need > MAX_L1_ENTRIES {
                // QEMU's qcow2_grow_l1_table: the L1 table is limited.
                return Err(BlockError::new(
                    nix::libc::EFBIG,
                    "Failed to grow the L1 table: File too large",
                ));
            }
            let have = self.l1.read().map(|l| l.len() as u64).unwrap_or(0);
            if need > have {
                let mut l1 = self.l1.read().map(|l| l.clone()).unwrap_or_default();
                l1.resize(need as usize, 0);
                let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
                let n = (bytes.len() as u64).div_ceil(self.cs());
                let new = meta.alloc(n).await?;
                // Only the table's bytes, as QEMU writes it (the rest of
                // its clusters reads as zeroes).
                self.file.write(new, &bytes, WriteFlags::default()).await?;
                // Its refcount is stable before the header names it.
                meta.write_dirty().await?;
                self.file.flush().await?;
                let mut hdr = (need as u32).to_be_bytes().to_vec();
                hdr.extend_from_slice(&new.to_be_bytes());
                self.file
                    .write(header::OFF_L1_SIZE, &hdr, WriteFlags::default())
                    .await?;
                self.file.flush().await?;
                let old_off = self.l1_offset.swap(new, Ordering::AcqRel);
                let old_n = (have * 8).div_ceil(self.cs());
                if let Ok(mut l) = self.l1.write() {
                    *l = l1;
                }
                if let Ok(mut h) = self.header.lock() {
                    h.l1_size = need as u32;
                    h.l1_table_offset = new;
                }
                self.overlap.set_range(overlap::ACTIVE_L1, new, need * 8);
                if old_off != 0 {
                    let _g = self.free_guard.write().await;
                    for k in 0..old_n {
                        meta.change((old_off >> self.bits) + k, -1).await?;
                    }
                }
            }
            self.set_size(size).await
        })
    }
    /// From cached metadata only (no I/O): the range is unallocated or
    /// zero clusters and there is no backing file to read instead.
    fn known_zero(&self, offset: u64, len: u64) -> bool {
        if self.backing.get().is_some() || self.corrupt.load(Ordering::Acquire) {
            return false;
        }
        let end = offset.saturating_add(len);
        let mut g = offset;
        while g < end {
            let ci = g >> self.bits;
            let l2 = self.l1_entry(ci >> self.l2_bits) & OFFSET_MASK;
            if l2 == 0 {
                // The whole range of a missing L2 table reads as zeroes.
                let span = 1u64 << (self.bits + self.l2_bits);
                g = (g / span + 1) * span;
                continue;
            }
            let Some(t) = self.cache.get(l2) else {
                return false;
            };
            let (e, bm) = t.get((ci & ((1 << self.l2_bits) - 1)) as usize);
            let in_off = g & (self.cs() - 1);
            let room = (self.cs() - in_off).min(end - g);
            match self.classify(e, bm, in_off, room) {
                Ok((Map::Zero | Map::Unalloc, n)) => g += n,
                _ => return false,
            }
        }
        true
    }
    fn allocated_size(&self) -> Option<u64> {
        // QEMU sums the storage children: the file and a data file.
        let data = if self.external {
            self.data.allocated_size()?
        } else {
            0
        };
        Some(self.file.allocated_size()? + data)
    }
    /// QEMU's default permissions for a format's children.
    fn child_perms(&self, role: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        if role == "backing" {
            // Only read, and only consistently if the parent needs it.
            let sh = if shared.contains(Perm::WRITE) {
                Perm::WRITE.union(Perm::RESIZE)
            } else {
                Perm::NONE
            };
            let sh = sh.union(Perm::CONSISTENT_READ).union(Perm::WRITE_UNCHANGED);
            return (perm.intersect(Perm::CONSISTENT_READ), sh);
        }
        let (mut p, mut sh) = (perm, shared);
        if role == "file" {
            let (mp, msh) = metadata_perms(self.read_only.load(Ordering::Relaxed));
            p = p.union(mp);
            sh = sh.intersect(msh);
        }
        if role == "data-file" || (role == "file" && !self.external) {
            sh = sh.without(Perm::RESIZE);
            if p.contains(Perm::WRITE_UNCHANGED) {
                p = p.union(Perm::WRITE);
            }
            if p.contains(Perm::WRITE) {
                p = p.union(Perm::RESIZE);
            }
        }
        (p, sh)
    }
    fn format_specific(&self) -> Option<Value> {
        Some(format_specific(self))
    }
    fn take_bitmaps(&self) -> Vec<crate::block::dirty::NamedBitmap> {
        self.loaded
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    }
    fn store_bitmaps<'a>(
        &'a self,
        list: &'a [Arc<crate::block::dirty::NamedBitmap>],
    ) -> IoFuture<'a, ()> {
        self.boundary(self.img.store_bitmaps(list))
    }
    fn reopen_bitmaps_rw(&self) -> IoFuture<'_, ()> {
        self.boundary(self.img.mark_bitmaps_in_use())
    }
    fn remove_persistent_bitmap<'a>(&'a self, name: &'a str) -> IoFuture<'a, ()> {
        self.boundary(self.img.remove_stored_bitmap(name))
    }
    fn can_store_bitmap(
        &self,
        name: &str,
        granularity: u64,
        stored: &[String],
    ) -> Result<(), crate::block::driver::BitmapStoreError> {
        bitmaps::can_store(&self.header(), self.disk_size(), name, granularity, stored)
    }
    fn snapshots(&self) -> Option<Vec<Value>> {
        Some(self.snapshot_list())
    }
    fn snapshot_create<'a>(&'a self, name: &'a str) -> IoFuture<'a, ()> {
        self.boundary(self.img.snapshot_create(name))
    }
    fn snapshot_delete<'a>(
        &'a self,
        id: Option<&'a str>,
        name: Option<&'a str>,
    ) -> IoFuture<'a, Value> {
        self.boundary(self.img.snapshot_delete(id, name))
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.cs())
    }
    fn set_read_only(&self, read_only: bool) -> Result<(), String> {
        if !read_only && self.corrupt.load(Ordering::Acquire) {
            return Err("qcow2: Image is corrupt; cannot be opened read/write".into());
        }
        self.read_only.store(read_only, Ordering::Relaxed);
        Ok(())
    }
    fn child_slot(&self, role: &str) -> Option<Arc<Child>> {
        (role == "backing").then(|| self.backing.clone())
    }
    fn change_backing_file<'a>(
        &'a self,
        name: &'a str,
        fmt: Option<&'a str>,
        full: String,
    ) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let _meta = self.meta.lock().await;
            let h = self.header();
            let mut first = vec![0u8; h.cluster_size() as usize];
            self.file.read(0, &mut first).await?;
            let new = header::with_backing(&first, &h, name, fmt).map_err(BlockError::inval)?;
            self.file.write(0, &new, WriteFlags::default()).await?;
            self.file.flush().await?;
            if let Ok(mut hh) = self.header.lock() {
                hh.backing_file = (!name.is_empty()).then(|| name.to_string());
                hh.backing_format = fmt.filter(|_| !name.is_empty()).map(str::to_string);
                let off = u64::from_be_bytes(new[8..16].try_into().unwrap_or([0; 8]));
                hh.backing_file_offset = off;
                hh.backing_file_size = name.len() as u32;
            }
            if let Ok(mut f) = self.backing_full.lock() {
                *f = (!name.is_empty()).then_some(full);
            }
            Ok(())
        })
    }
    fn encrypted(&self) -> bool {
        self.crypt.is_some()
    }
    fn can_amend(&self) -> bool {
        self.crypt.is_some()
    }
    fn key_secret(&self) -> Option<String> {
        self.crypt.as_ref().map(|c| c.secret_id.clone())
    }
    fn amend<'a>(
        &'a self,
        opts: &'a serde_json::Map<String, Value>,
        secrets: &'a crate::objects::Secrets,
        force: bool,
    ) -> super::driver::AmendFuture<'a> {
        Box::pin(self.img.amend_crypt(opts, secrets, force))
    }
    fn backing_file(&self) -> Option<(String, Option<String>, String)> {
        let h = self.header();
        let name = h.backing_file?;
        let full = self
            .backing_full
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_else(|| name.clone());
        Some((name, h.backing_format, full))
    }
}

/// format-specific for query-named-block-nodes / query-block, as QEMU
/// reports it for qcow2.
pub fn format_specific(q: &Qcow2) -> Value {
    let h = q.header();
    let mut data = serde_json::Map::new();
    if h.version >= 3 {
        data.insert("compat".into(), json!("1.1"));
        data.insert(
            "compression-type".into(),
            json!(if h.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            }),
        );
        data.insert(
            "lazy-refcounts".into(),
            json!(h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0),
        );
        let bitmaps = q.bitmap_infos();
        if !bitmaps.is_empty() {
            data.insert("bitmaps".into(), Value::Array(bitmaps));
        }
        data.insert("refcount-bits".into(), json!(h.refcount_bits()));
        data.insert(
            "corrupt".into(),
            json!(
                h.incompatible & header::INCOMPAT_CORRUPT != 0 || q.corrupt.load(Ordering::Acquire)
            ),
        );
        data.insert("extended-l2".into(), json!(h.extended_l2()));
        if let Some(f) = &h.data_file {
            data.insert("data-file".into(), json!(f));
        }
        if h.has_data_file() {
            data.insert(
                "data-file-raw".into(),
                json!(h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0),
            );
        }
    } else {
        data.insert("compat".into(), json!("0.10"));
        data.insert("compression-type".into(), json!("zlib"));
        data.insert("refcount-bits".into(), json!(h.refcount_bits()));
    }
    if let Some(e) = q.crypt.as_ref().and_then(|c| c.info()) {
        data.insert("encrypt".into(), e);
    }
    json!({"type": "qcow2", "data": Value::Object(data)})
}

#[cfg(test)]
mod tests;
