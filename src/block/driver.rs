//! The data-plane contract every block driver implements. Exports and
//! jobs call these methods directly on an `Arc<Node>`: no actor hop per
//! request. Buffers are borrowed; the file driver reads and writes them in
//! place (see file.rs for how it stays off the reactor).
use std::future::Future;
use std::pin::Pin;

use super::error::BlockResult;
use super::perm::Perm;

pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = BlockResult<T>> + Send + 'a>>;
/// x-blockdev-amend's work on a driver; the error is the job's.
pub type AmendFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Request limits a caller must respect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths must be multiples of this (1 unless O_DIRECT).
    pub request_alignment: u32,
    /// Largest single request in bytes.
    pub max_transfer: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_alignment: 1,
            max_transfer: 32 << 20,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is stable when the call returns.
    pub fua: bool,
    /// Write whole clusters compressed (QEMU's BDRV_REQ_WRITE_COMPRESSED:
    /// the compress filter and backup's `compress`). Only drivers whose
    /// `can_compress` says so act on it; filters pass it down.
    pub compressed: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    pub fua: bool,
    /// The range may be deallocated instead of written.
    pub may_unmap: bool,
    /// Fail with ENOTSUP rather than write zeroes slowly.
    pub no_fallback: bool,
}

/// Why a persistent bitmap cannot be stored.
#[derive(Debug, PartialEq, Eq)]
pub enum BitmapStoreError {
    /// The driver stores no bitmaps (ENOTSUP).
    Unsupported,
    /// The image's limits refuse it (the message says which).
    Invalid(String),
}

/// What block status says about the start of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes from the queried offset with this status (at least 1).
    pub len: u64,
    /// The range holds data (not a hole).
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// Where the range is allocated, as qemu:allocation-depth counts it:
    /// 1 in this node, 2 in its backing node and so on; 0 nowhere.
    pub depth: u32,
}

pub trait Driver: Send + Sync + 'static {
    /// The driver's name as QAPI spells it ("file", "raw", ...).
    fn name(&self) -> &'static str;
    fn size(&self) -> u64;
    fn limits(&self) -> Limits {
        Limits::default()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()>;
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()>;
    fn flush(&self) -> IoFuture<'_, ()>;
    /// The node is going away or its file becomes read-only: write back
    /// what the driver caches and mark the image clean (QEMU's
    /// bdrv_close / inactivate). Called after a flush.
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()>;
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent>;
    /// Grow or shrink to `size` bytes.
    fn truncate(&self, size: u64) -> IoFuture<'_, ()>;
    /// Bytes allocated on the host, for `actual-size`; None if unknown.
    fn allocated_size(&self) -> Option<u64> {
        None
    }
    /// The permissions this node needs on its children given what its own
    /// parents need (`perm`) and share (`shared`). Filters pass them on.
    fn child_perms(&self, _role: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        (perm, shared)
    }
    /// Takes the host-level locks for this node's cumulative permissions
    /// (only the file driver has any).
    fn set_perms(&self, _perm: Perm, _shared: Perm) -> Result<(), String> {
        Ok(())
    }
    /// True when the range is known to read as zeroes without asking the
    /// host (which can cost more than the read: SEEK_HOLE on tmpfs scans
    /// the whole file). Used to send holes instead of data.
    fn known_zero(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// True for drivers QEMU reports `dirty-flag`/`format-specific` for.
    fn has_image_info(&self) -> bool {
        true
    }
    /// A filter: it shows its child (role "backing") as its backing
    /// image, as QEMU's filters do.
    fn is_filter(&self) -> bool {
        false
    }
    /// BlockDirtyInfo of the bitmaps the node holds (a mirror's).
    fn dirty_bitmaps(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }
    /// Whether the image can store a new persistent bitmap `name`
    /// (QEMU's bdrv_can_store_new_dirty_bitmap); `stored` are the
    /// node's persistent bitmaps now. Only qcow2 stores bitmaps.
    fn can_store_bitmap(
        &self,
        _name: &str,
        _granularity: u64,
        _stored: &[String],
    ) -> Result<(), BitmapStoreError> {
        Err(BitmapStoreError::Unsupported)
    }
    /// The bitmaps the image holds, loaded on open (taken once, by the
    /// node).
    fn take_bitmaps(&self) -> Vec<super::dirty::NamedBitmap> {
        Vec::new()
    }
    /// Writes the node's persistent bitmaps into the image (on close,
    /// before `close`); `list` is all of the node's bitmaps.
    fn store_bitmaps<'a>(
        &'a self,
        _list: &'a [std::sync::Arc<super::dirty::NamedBitmap>],
    ) -> IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    /// The node became writable: mark the image's bitmaps in use again.
    fn reopen_bitmaps_rw(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Takes a persistent bitmap out of the image (block-dirty-bitmap-remove).
    fn remove_persistent_bitmap<'a>(&'a self, _name: &'a str) -> IoFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Internal snapshots (SnapshotInfo each), or None for a format
    /// that has none.
    fn snapshots(&self) -> Option<Vec<serde_json::Value>> {
        None
    }
    /// Makes an internal snapshot named `name` (formats with snapshots).
    fn snapshot_create<'a>(&'a self, _name: &'a str) -> IoFuture<'a, ()> {
        Box::pin(async {
            Err(super::error::BlockError::new(
                nix::libc::ENOTSUP,
                "Operation not supported",
            ))
        })
    }
    /// Deletes the internal snapshot with this id and/or name; returns
    /// its SnapshotInfo.
    fn snapshot_delete<'a>(
        &'a self,
        _id: Option<&'a str>,
        _name: Option<&'a str>,
    ) -> IoFuture<'a, serde_json::Value> {
        Box::pin(async {
            Err(super::error::BlockError::new(
                nix::libc::ENOTSUP,
                "Operation not supported",
            ))
        })
    }
    /// QAPI ImageInfoSpecific for query-named-block-nodes, if any.
    fn format_specific(&self) -> Option<serde_json::Value> {
        None
    }
    /// The backing file as the image names it: (name, format, the name
    /// resolved against the image's directory).
    fn backing_file(&self) -> Option<(String, Option<String>, String)> {
        None
    }
    /// Writes past the end grow the node (a protocol over a regular file).
    fn grows_on_write(&self) -> bool {
        false
    }
    /// The cluster size, for drivers that have one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// Writes a new backing file name (and format) into the image's
    /// header, leaving the open chain as it is (change-backing-file).
    /// `full` is `name` resolved against the image's directory.
    fn change_backing_file<'a>(
        &'a self,
        _name: &'a str,
        _fmt: Option<&'a str>,
        _full: String,
    ) -> IoFuture<'a, ()> {
        Box::pin(async {
            Err(super::error::BlockError::unsupported(
                "Operation not supported",
            ))
        })
    }
    /// blockdev-reopen switched the node's read-only state; the driver
    /// reopens what it must (a file's descriptor) or refuses.
    fn set_read_only(&self, _read_only: bool) -> Result<(), String> {
        Ok(())
    }
    /// The re-pointable edge this driver holds for a child role (a
    /// qcow2 image's "backing"), present even while it points nowhere.
    fn child_slot(&self, _role: &str) -> Option<std::sync::Arc<super::child::Child>> {
        None
    }
    /// The point-in-time view a copy-before-write node keeps, for
    /// snapshot-access above it.
    fn copier(&self) -> Option<std::sync::Arc<super::copier::Copier>> {
        None
    }
    /// The node is active again after blockdev-set-active inactivated
    /// it: another process may have changed the image meanwhile, so a
    /// driver that caches metadata reads it again.
    fn invalidate_cache(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// A drained section begins on this node (QEMU's bdrv_drain_begin):
    /// a throttle filter lifts its limits so its queued requests go.
    fn drain_begin(&self) {}
    /// The drained section ends.
    fn drain_end(&self) {}
    /// The image is encrypted (query output's `encrypted`).
    fn encrypted(&self) -> bool {
        false
    }
    /// The id of the secret an encrypted image was opened with.
    fn key_secret(&self) -> Option<String> {
        None
    }
    /// The driver has x-blockdev-amend.
    fn can_amend(&self) -> bool {
        false
    }
    /// x-blockdev-amend with the options of the driver's branch;
    /// `secrets` holds the secrets they name.
    fn amend<'a>(
        &'a self,
        _opts: &'a serde_json::Map<String, serde_json::Value>,
        _secrets: &'a crate::objects::Secrets,
        _force: bool,
    ) -> AmendFuture<'a> {
        let name = self.name();
        Box::pin(async move {
            Err(format!(
                "Block driver '{name}' does not support option amendment"
            ))
        })
    }
    /// The throttle filter behind this driver, if it is one.
    fn throttle(&self) -> Option<&super::throttle::Throttle> {
        None
    }
    /// The driver writes compressed clusters (QEMU's
    /// block_driver_can_compress): only qcow2.
    fn can_compress(&self) -> bool {
        false
    }
    /// The quorum driver behind this node, if it is one
    /// (x-blockdev-change adds and removes its children).
    fn quorum(&self) -> Option<&super::quorum::Quorum> {
        None
    }
}
