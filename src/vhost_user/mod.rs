//! The vhost-user-blk export: a node offered to a VM's virtio-blk
//! device over a vhost-user socket, built on the rust-vmm crates (the
//! `vhost` crate for the protocol, virtio-queue for the rings, vm-memory
//! for guest memory).
//!
//! - `config.rs`: the feature bits and config space, as QSD offers them.
//! - `request.rs`: one virtio-blk request, run in guest memory in place.
//! - `device.rs`: rsd's answer to each message of one frontend
//!   connection (memory, rings, config, the inflight region).
//! - `worker.rs`: a started ring's worker (a thread of its own, or a
//!   task on the export's iothread), which runs its requests.
//! - `inflight.rs`: in-flight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD),
//!   so a restarted device completes what the previous one had taken.
//! - `dirty.rs`: dirty-page logging for live migration (LOG_SHMFD).
//! - `channel.rs`: the backend request channel (config-change messages).
//! - `export.rs`: the export (`BlockExport`), its socket and its accept
//!   loop, one frontend at a time.
pub mod channel;
pub mod config;
pub mod device;
pub mod dirty;
pub mod export;
pub mod inflight;
pub mod request;
pub mod worker;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use crate::block::child::Child;

/// What every connection of an export shares.
pub struct Shared {
    /// The exported node's edge (re-pointed by a snapshot).
    pub node: Arc<Child>,
    pub writable: bool,
    pub logical_block_size: u32,
    pub num_queues: u16,
    /// Writes are cached (not FUA). Starts as !writethrough and follows
    /// what the frontend writes into wce, as in QSD.
    pub write_cache: AtomicBool,
    /// The wce byte of the config space (QSD starts it at 0).
    pub wce: AtomicU8,
    /// The export's counters (requests by type, frontends).
    pub stats: Arc<crate::exports::stats::ExportStats>,
    /// Where a ring starting now runs: all rings on the export's
    /// iothread, or by default each on a thread of its own.
    pub placement: Arc<crate::iothread::Placement>,
}

impl Shared {
    pub fn config(&self) -> config::BlkConfig {
        let size = self.node.get().map(|n| n.size()).unwrap_or(0);
        config::BlkConfig {
            capacity: size >> config::SECTOR_BITS,
            blk_size: self.logical_block_size,
            num_queues: self.num_queues,
            wce: self.wce.load(Ordering::Relaxed),
        }
    }
}
