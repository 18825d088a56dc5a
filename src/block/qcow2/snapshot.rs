//! The internal snapshot table: rsd keeps snapshots intact (their
//! clusters are refcounted, so writes copy them), and needs only where
//! the table and each snapshot's L1 table lie.
use super::super::error::{BlockError, BlockResult};
use super::super::node::Node;
use super::header::Header;
use super::refcount::corrupt;

/// QEMU's limits: QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS_SIZE
/// and QCOW_MAX_L1_SIZE.
const MAX_EXTRA_DATA: u64 = 1024;
const MAX_TABLE_BYTES: u64 = 64 << 20;
const MAX_L1_BYTES: u64 = 32 << 20;

pub struct Snapshots {
    /// (L1 table offset, L1 entries) of each snapshot.
    pub l1_tables: Vec<(u64, u64)>,
    /// Bytes the table occupies.
    pub table_len: u64,
    /// The first snapshot L1 table out of bounds (too large, unaligned or
    /// not inside the file), as QEMU reports it when it uses the table.
    /// QEMU opens such images, so rsd does too; what must read the
    /// tables (the repair) refuses.
    pub bad_l1: Option<String>,
}

impl Snapshots {
    /// Fails if a snapshot's L1 table cannot be read safely.
    pub fn check_l1(&self) -> BlockResult<()> {
        match &self.bad_l1 {
            Some(msg) => Err(corrupt(msg.clone())),
            None => Ok(()),
        }
    }
}

/// What is wrong with a snapshot L1 table at `off` of `n` entries, if
/// anything (QEMU's qcow2_validate_table checks, and the file's end).
fn l1_problem(off: u64, n: u64, cs: u64, fsize: u64) -> Option<String> {
    let bytes = n * 8;
    if bytes > MAX_L1_BYTES {
        return Some("Snapshot L1 table too large".into());
    }
    if !off.is_multiple_of(cs) || off.checked_add(bytes).is_none_or(|e| e > i64::MAX as u64) {
        return Some("Snapshot L1 table offset invalid".into());
    }
    if n > 0 && off.saturating_add(bytes) > fsize {
        return Some("Snapshot L1 table lies beyond the end of the image file".into());
    }
    None
}

pub async fn read(file: &Node, h: &Header) -> BlockResult<Snapshots> {
    let mut at = h.snapshots_offset;
    let fsize = file.size();
    let mut s = Snapshots {
        l1_tables: Vec::new(),
        table_len: 0,
        bad_l1: None,
    };
    for i in 0..h.nb_snapshots {
        let mut e = [0u8; 40];
        if at.checked_add(40).is_none_or(|end| end > fsize) {
            return Err(corrupt(
                "Snapshot table lies beyond the end of the image file",
            ));
        }
        file.read(at, &mut e).await?;
        let be32 = |i: usize| u32::from_be_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
        let l1_off = u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
        let l1_size = u64::from(be32(8));
        let id = u64::from(u16::from_be_bytes([e[12], e[13]]));
        let name = u64::from(u16::from_be_bytes([e[14], e[15]]));
        let extra = u64::from(be32(36));
        if extra > MAX_EXTRA_DATA {
            return Err(BlockError::new(
                nix::libc::EFBIG,
                format!(
                    "Too much extra metadata in snapshot table entry {i}\nYou can force-remove this extra metadata with qemu-img check -r all"
                ),
            ));
        }
        let raw = 40 + extra + id + name;
        if s.table_len + raw > MAX_TABLE_BYTES {
            return Err(BlockError::new(
                nix::libc::EFBIG,
                format!(
                    "Snapshot table is too big\nYou can force-remove all {} overhanging snapshots with qemu-img check -r all",
                    h.nb_snapshots - i
                ),
            ));
        }
        if s.bad_l1.is_none() {
            s.bad_l1 = l1_problem(l1_off, l1_size, h.cluster_size(), fsize);
        }
        s.l1_tables.push((l1_off, l1_size));
        let len = raw.div_ceil(8) * 8;
        at = at.saturating_add(len);
        s.table_len += len;
    }
    Ok(s)
}
