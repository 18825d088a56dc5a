//! The `luks` format driver: a LUKS1 volume on its `file` (header and
//! payload) or with the header on a separate `header` node. Reads are
//! decrypted in place in the caller's buffer, sector by sector; writes
//! are encrypted into a bounce buffer (the caller's data is borrowed
//! read-only), at most 1 MiB at a time.
mod attach;
pub mod create;
pub mod volume;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::error::{BlockError, BlockResult};
use super::node::Node;
use super::perm::Perm;
pub use attach::open_node;
use diskcrypt::luks::{Header, Params};
use diskcrypt::{SectorCrypto, SECTOR};
use volume::Region;

/// Bounce buffers for writes are at most this large (QEMU's
/// BLOCK_CRYPTO_MAX_IO_SIZE).
const MAX_BOUNCE: usize = 1 << 20;

pub struct Luks {
    file: Arc<Node>,
    /// The header's node: `file`, or the detached header.
    region: Region,
    detached: bool,
    /// Where the payload starts in `file`.
    payload: u64,
    size: AtomicU64,
    crypto: SectorCrypto,
    header: tokio::sync::Mutex<Header>,
    params: Params,
    /// Writes of whole sectors hold it shared; a read-modify-write of a
    /// partial sector holds it alone, so no write to that sector races it.
    rmw: tokio::sync::RwLock<()>,
    read_only: AtomicBool,
    /// The key-secret the volume was opened with (amend's default).
    secret_id: String,
}

fn aligned(offset: u64, len: u64) -> bool {
    offset.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR)
}

impl Luks {
    /// The payload length the file holds: whole sectors after the
    /// payload offset.
    fn payload_size(file_size: u64, payload: u64) -> u64 {
        file_size.saturating_sub(payload) & !(SECTOR - 1)
    }

    async fn read_impl(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        if aligned(offset, buf.len() as u64) {
            self.file.read(self.payload + offset, buf).await?;
            self.crypto.decrypt(offset, buf);
            return Ok(());
        }
        let start = offset & !(SECTOR - 1);
        let end = (offset + buf.len() as u64).next_multiple_of(SECTOR);
        let mut b = vec![0u8; (end - start) as usize];
        self.file.read(self.payload + start, &mut b).await?;
        self.crypto.decrypt(start, &mut b);
        let at = (offset - start) as usize;
        buf.copy_from_slice(&b[at..at + buf.len()]);
        Ok(())
    }

    /// Encrypts and writes whole sectors, 1 MiB at a time.
    async fn write_sectors(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> BlockResult<()> {
        let mut bounce = vec![0u8; buf.len().min(MAX_BOUNCE)];
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_BOUNCE);
            let b = &mut bounce[..n];
            b.copy_from_slice(&buf[done..done + n]);
            let at = offset + done as u64;
            self.crypto.encrypt(at, b);
            self.file.write(self.payload + at, b, flags).await?;
            done += n;
        }
        Ok(())
    }

    async fn write_impl(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> BlockResult<()> {
        if aligned(offset, buf.len() as u64) {
            let _shared = self.rmw.read().await;
            return self.write_sectors(offset, buf, flags).await;
        }
        let _alone = self.rmw.write().await;
        let start = offset & !(SECTOR - 1);
        let end = (offset + buf.len() as u64).next_multiple_of(SECTOR);
        let mut b = vec![0u8; (end - start) as usize];
        self.file.read(self.payload + start, &mut b).await?;
        self.crypto.decrypt(start, &mut b);
        let at = (offset - start) as usize;
        b[at..at + buf.len()].copy_from_slice(buf);
        self.crypto.encrypt(start, &mut b);
        self.file.write(self.payload + start, &b, flags).await
    }

    /// x-blockdev-amend on this volume's key slots.
    async fn amend_impl(
        &self,
        o: &Map<String, Value>,
        secrets: &crate::objects::Secrets,
        force: bool,
    ) -> Result<(), String> {
        let mut h = self.header.lock().await;
        let r = self
            .region
            .amend(
                &mut h,
                &self.params,
                o,
                secrets,
                Some(&self.secret_id),
                force,
            )
            .await;
        self.region.node.flush().await.map_err(|e| e.msg)?;
        r
    }
}

impl Driver for Luks {
    fn name(&self) -> &'static str {
        "luks"
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn limits(&self) -> Limits {
        Limits {
            request_alignment: SECTOR as u32,
            max_transfer: self.file.limits().max_transfer,
        }
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(self.read_impl(offset, buf))
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(self.write_impl(offset, buf, flags))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.file.flush().await?;
            if self.detached {
                self.region.node.flush().await?;
            }
            Ok(())
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.file.discard(self.payload + offset, len).await })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        // Zeroes must be encrypted like any data: written out.
        Box::pin(async move {
            if flags.no_fallback {
                return Err(BlockError::unsupported("write zeroes needs a data write"));
            }
            let zeros = vec![0u8; (len as usize).min(MAX_BOUNCE)];
            let mut g = offset;
            while g < offset + len {
                let n = ((offset + len - g) as usize).min(zeros.len());
                let wf = WriteFlags {
                    fua: flags.fua,
                    ..WriteFlags::default()
                };
                self.write_impl(g, &zeros[..n], wf).await?;
                g += n as u64;
            }
            Ok(())
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        // No block status of its own: everything is data, as in QEMU.
        let _ = offset;
        Box::pin(async move {
            Ok(Extent {
                len,
                data: true,
                zero: false,
                depth: 1,
            })
        })
    }
    fn truncate(&self, size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.file.truncate(self.payload + size).await?;
            self.size.store(size, Ordering::Release);
            Ok(())
        })
    }
    fn allocated_size(&self) -> Option<u64> {
        let f = self.file.allocated_size()?;
        if self.detached {
            return Some(f + self.region.node.allocated_size()?);
        }
        Some(f)
    }
    fn child_perms(&self, role: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        format_child_perms(role, perm, shared, self.read_only.load(Ordering::Relaxed))
    }
    fn format_specific(&self) -> Option<Value> {
        let h = self.header.try_lock().ok()?;
        Some(json!({"type": "luks", "data": h.info(&self.params, self.detached)}))
    }
    fn encrypted(&self) -> bool {
        true
    }
    fn set_read_only(&self, read_only: bool) -> Result<(), String> {
        self.read_only.store(read_only, Ordering::Relaxed);
        Ok(())
    }
    fn can_amend(&self) -> bool {
        true
    }
    fn key_secret(&self) -> Option<String> {
        Some(self.secret_id.clone())
    }
    fn amend<'a>(
        &'a self,
        opts: &'a Map<String, Value>,
        secrets: &'a crate::objects::Secrets,
        force: bool,
    ) -> super::driver::AmendFuture<'a> {
        Box::pin(self.amend_impl(opts, secrets, force))
    }
}

/// QEMU's permissions for a format's storage child: it reads the
/// metadata consistently and, writable, writes and resizes it; nobody
/// else may write or resize under it.
pub fn format_child_perms(_role: &str, perm: Perm, shared: Perm, read_only: bool) -> (Perm, Perm) {
    let (mp, msh) = super::qcow2::metadata_perms(read_only);
    let mut p = perm.union(mp);
    let sh = shared.intersect(msh);
    if p.contains(Perm::WRITE_UNCHANGED) {
        p = p.union(Perm::WRITE);
    }
    if p.contains(Perm::WRITE) {
        p = p.union(Perm::RESIZE);
    }
    (p, sh)
}
