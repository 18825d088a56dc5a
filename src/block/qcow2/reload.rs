//! Reading the image's metadata again when a node is activated after
//! blockdev-set-active inactivated it (QEMU's invalidate_cache): another
//! process may have written the image meanwhile. The node wrote its
//! caches back when it was inactivated, so nothing cached is lost.
use std::sync::atomic::Ordering;

use super::l2::OFFSET_MASK;
use super::refcount::Refcounts;
use super::{be64s, overlap, read_header, Image};
use crate::block::error::{BlockError, BlockResult};

impl Image {
    pub(super) async fn reload(&self) -> BlockResult<()> {
        // Holding the metadata lock keeps allocations out meanwhile.
        let mut meta = self.meta.lock().await;
        // The file may have been activated before (an activation that
        // failed at this node): its size is read again here too.
        self.file.driver.invalidate_cache().await?;
        if self.external {
            self.data.driver.invalidate_cache().await?;
        }
        let h = read_header(&self.file).await?;
        if h.cluster_bits != self.bits || h.extended_l2() != self.ext {
            return Err(BlockError::inval(
                "qcow2: the image's cluster layout changed while the node was inactive",
            ));
        }
        let l1_bytes = u64::from(h.l1_size) * 8;
        let mut raw = vec![0u8; l1_bytes as usize];
        self.file.read(h.l1_table_offset, &mut raw).await?;
        let l1 = be64s(&raw);
        let mut refs = Refcounts::load(
            self.overlap.clone(),
            self.file.clone(),
            self.bits,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )
        .await?;
        if !self.read_only.load(Ordering::Acquire) {
            refs.validate()?;
        }
        refs.set_capacity(meta.capacity());
        self.overlap
            .set_range(overlap::ACTIVE_L1, h.l1_table_offset, l1_bytes);
        for e in &l1 {
            if e & OFFSET_MASK != 0 {
                self.overlap
                    .add_cluster(overlap::ACTIVE_L2, e & OFFSET_MASK);
            }
        }
        self.cache.clear();
        if let Ok(mut g) = self.l1.write() {
            *g = l1;
        }
        self.l1_offset.store(h.l1_table_offset, Ordering::Release);
        self.size.store(h.size & !511, Ordering::Release);
        if let Ok(mut g) = self.header.lock() {
            *g = h;
        }
        *meta = refs;
        Ok(())
    }
}
