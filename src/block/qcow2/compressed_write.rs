//! Compressed cluster writes (QEMU's BDRV_REQ_WRITE_COMPRESSED, from the
//! compress filter and backup's `compress`). As in QEMU: whole clusters
//! only (the image's last, partial cluster too), each compressed into
//! bytes packed after the previous compressed cluster; a cluster already
//! allocated cannot be overwritten this way (EIO), and one that does not
//! compress is written as plain data.
use super::l2::{compressed_entry, OFFSET_MASK};
use super::writeback::InFlight;
use super::{compress, Image};
use crate::block::driver::WriteFlags;
use crate::block::error::{BlockError, BlockResult};

impl Image {
    pub(super) async fn write_compressed(
        &self,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> BlockResult<()> {
        self.check_usable()?;
        if self.external {
            return Err(BlockError::unsupported("Operation not supported"));
        }
        let cs = self.cs();
        let len = buf.len() as u64;
        if offset & (cs - 1) != 0 || (len & (cs - 1) != 0 && offset + len != self.disk_size()) {
            return Err(BlockError::inval("Invalid argument"));
        }
        let kind = self.header().compression_type;
        let plain = WriteFlags {
            compressed: false,
            ..flags
        };
        for (k, chunk) in buf.chunks(cs as usize).enumerate() {
            let g = offset + k as u64 * cs;
            // The image's last cluster is padded with zeroes.
            let mut cluster = vec![0u8; cs as usize];
            cluster[..chunk.len()].copy_from_slice(chunk);
            // Compressing a cluster takes a while: off the request's thread.
            let z = match tokio::runtime::Handle::try_current() {
                Ok(rt) => rt
                    .spawn_blocking(move || compress::compress(kind, &cluster, cluster.len() - 1))
                    .await
                    .map_err(|_| BlockError::new(nix::libc::EIO, "Input/output error"))?,
                Err(_) => compress::compress(kind, &cluster, cluster.len() - 1),
            }?;
            match z {
                Some(z) => self.write_compressed_cluster(g, &z).await?,
                // It does not get smaller: plain data, as QEMU writes it.
                None => self.write_impl(g, chunk, plain).await?,
            }
        }
        if flags.fua {
            self.flush_all().await?;
        }
        Ok(())
    }

    /// Places one compressed cluster for guest offset `g`.
    async fn write_compressed_cluster(&self, g: u64, z: &[u8]) -> BlockResult<()> {
        let ci = g >> self.bits;
        let mut meta = crate::block::cancel::before_start(self.meta.lock()).await?;
        loop {
            let done = self.alloc_done();
            if !self.in_flight(ci) {
                break;
            }
            drop(meta);
            done.await;
            meta = self.meta.lock().await;
        }
        let mut released = Vec::new();
        let (t, _, i) = self.writable_table(&mut meta, g, &mut released).await?;
        // Compression never overwrites: an allocated cluster (data,
        // compressed, or preallocated zeroes) refuses it.
        if t.get(i).0 & OFFSET_MASK != 0 {
            self.release(&mut meta, released, false).await?;
            return Err(BlockError::new(nix::libc::EIO, "Input/output error"));
        }
        let host = meta.alloc_bytes(z.len() as u64).await?;
        let entry = compressed_entry(host, z.len() as u64, self.bits);
        // The bytes go to the file without the lock; the guest cluster is
        // in flight meanwhile, so nobody else changes its entry.
        let mut inflight = InFlight::new(self);
        inflight.add(ci);
        drop(meta);
        let r = self.write_host(host, z, WriteFlags::default()).await;
        let mut meta = self.meta.lock().await;
        if let Err(e) = r {
            for c in self.held_clusters(entry) {
                let _ = meta.change(c >> self.bits, -1).await;
            }
            return Err(e);
        }
        let (t, t_off, i) = self.writable_table(&mut meta, g, &mut released).await?;
        self.set_entry(&t, t_off, i, entry, 0).await?;
        // The bytes are stable before the entry that points at them.
        meta.data_unsynced = true;
        drop(inflight);
        self.release(&mut meta, released, false).await?;
        self.after_change(&mut meta).await?;
        Ok(())
    }
}
