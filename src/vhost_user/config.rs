//! What the device offers: its virtio feature bits, its vhost-user
//! protocol features and its virtio-blk config space, laid out as QSD
//! lays them out (the bytes are compared with QSD's in the tests).
use vhost::vhost_user::message::VhostUserProtocolFeatures;

/// virtio-blk feature bits (virtio spec 5.2.3).
pub const BLK_F_SIZE_MAX: u64 = 1 << 1;
pub const BLK_F_SEG_MAX: u64 = 1 << 2;
pub const BLK_F_RO: u64 = 1 << 5;
pub const BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const BLK_F_FLUSH: u64 = 1 << 9;
pub const BLK_F_TOPOLOGY: u64 = 1 << 10;
pub const BLK_F_CONFIG_WCE: u64 = 1 << 11;
pub const BLK_F_MQ: u64 = 1 << 12;
pub const BLK_F_DISCARD: u64 = 1 << 13;
pub const BLK_F_WRITE_ZEROES: u64 = 1 << 14;
/// Transport bits.
pub const F_NOTIFY_ON_EMPTY: u64 = 1 << 24;
pub const F_LOG_ALL: u64 = 1 << 26;
pub const RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const RING_F_EVENT_IDX: u64 = 1 << 29;
pub const USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;

/// Sectors are 512 bytes whatever the logical block size.
pub const SECTOR_BITS: u32 = 9;
/// QSD's limits for one discard or write-zeroes segment, in sectors.
pub const MAX_DISCARD_SECTORS: u32 = 32768;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 32768;
/// QSD's seg_max (128 less the header and status descriptors).
pub const SEG_MAX: u32 = 126;
/// The size of struct virtio_blk_config as QEMU knows it (with the
/// secure-erase and zoned fields): a frontend may read no more.
pub const CONFIG_LEN: usize = 96;
/// Offset of the wce byte, the only field a frontend may write.
pub const CONFIG_WCE_OFFSET: usize = 32;

/// The virtio feature bits QSD offers (0x175007e46 for a writable
/// export): libvhost-user adds NOTIFY_ON_EMPTY and LOG_ALL to the
/// device's own; RO marks a read-only export.
pub fn features(writable: bool) -> u64 {
    let mut f = BLK_F_SIZE_MAX
        | BLK_F_SEG_MAX
        | BLK_F_TOPOLOGY
        | BLK_F_BLK_SIZE
        | BLK_F_FLUSH
        | BLK_F_DISCARD
        | BLK_F_WRITE_ZEROES
        | BLK_F_CONFIG_WCE
        | BLK_F_MQ
        | F_VERSION_1
        | RING_F_INDIRECT_DESC
        | RING_F_EVENT_IDX
        | USER_F_PROTOCOL_FEATURES
        | F_NOTIFY_ON_EMPTY
        | F_LOG_ALL;
    if !writable {
        f |= BLK_F_RO;
    }
    f
}

/// The protocol features rsd offers: QSD's, less the ones that need
/// what rsd does not do (postcopy page faults, host notifiers):
/// differences entry 48; and in-flight tracking, which QSD does not
/// offer.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_SEND_FD
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// The config space's values that change: the rest is fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub blk_size: u32,
    pub num_queues: u16,
    pub wce: u8,
}

impl BlkConfig {
    /// The config space bytes (little-endian, virtio spec 5.2.4).
    pub fn bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &self.capacity.to_le_bytes());
        put(8, &0u32.to_le_bytes()); // size_max
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &self.blk_size.to_le_bytes());
        put(26, &1u16.to_le_bytes()); // min_io_size
        put(28, &1u32.to_le_bytes()); // opt_io_size
        put(CONFIG_WCE_OFFSET, &[self.wce]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &(self.blk_size >> SECTOR_BITS).to_le_bytes());
        put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        b
    }

    /// What a GET_CONFIG of `size` bytes at `offset` answers: nothing
    /// (the frontend sees an error) past the structure, as in QSD.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let (off, len) = (offset as usize, size as usize);
        match off.checked_add(len) {
            Some(end) if end <= CONFIG_LEN => self.bytes()[off..end].to_vec(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qsd_feature_bits() {
        assert_eq!(features(true), 0x1_7500_7e46);
        assert_eq!(features(false), features(true) | BLK_F_RO);
    }

    #[test]
    fn config_layout() {
        let c = BlkConfig {
            capacity: 2048,
            blk_size: 4096,
            num_queues: 2,
            wce: 0,
        };
        let b = c.bytes();
        assert_eq!(&b[0..8], &2048u64.to_le_bytes());
        assert_eq!(&b[12..16], &126u32.to_le_bytes());
        assert_eq!(&b[44..48], &8u32.to_le_bytes());
        assert_eq!(c.read(90, 10), Vec::<u8>::new());
        assert_eq!(c.read(32, 1), vec![0]);
    }
}
