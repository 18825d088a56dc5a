//! The internal snapshot table: rsd keeps snapshots intact (their
//! clusters are refcounted, so writes copy them), and needs only where
//! the table and each snapshot's L1 table lie.
use super::super::error::BlockResult;
use super::super::node::Node;
use super::header::Header;
use super::refcount::corrupt;

pub struct Snapshots {
    /// (L1 table offset, L1 entries) of each snapshot.
    pub l1_tables: Vec<(u64, u64)>,
    /// Bytes the table occupies.
    pub table_len: u64,
}

pub async fn read(file: &Node, h: &Header) -> BlockResult<Snapshots> {
    let mut at = h.snapshots_offset;
    let mut s = Snapshots {
        l1_tables: Vec::new(),
        table_len: 0,
    };
    for _ in 0..h.nb_snapshots {
        let mut e = [0u8; 40];
        if at.saturating_add(40) > file.size() {
            return Err(corrupt(
                "Snapshot table lies beyond the end of the image file",
            ));
        }
        file.read(at, &mut e).await?;
        let be32 = |i: usize| u32::from_be_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
        let l1_off = u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
        let id = u64::from(u16::from_be_bytes([e[12], e[13]]));
        let name = u64::from(u16::from_be_bytes([e[14], e[15]]));
        let extra = u64::from(be32(36));
        s.l1_tables.push((l1_off, u64::from(be32(8))));
        let len = (40 + extra + id + name).div_ceil(8) * 8;
        at += len;
        s.table_len += len;
    }
    Ok(s)
}
