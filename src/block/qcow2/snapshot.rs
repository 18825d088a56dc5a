//! The internal snapshot table: its entries as the qcow2 spec lays them
//! out (read on open, written whole when a snapshot is made or deleted;
//! see internal.rs), and the checks QEMU makes of them.
use super::super::error::{BlockError, BlockResult};
use super::super::node::Node;
use super::header::Header;
use super::refcount::corrupt;

/// QEMU's limits: QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS_SIZE
/// and QCOW_MAX_L1_SIZE.
const MAX_EXTRA_DATA: u64 = 1024;
const MAX_TABLE_BYTES: u64 = 64 << 20;
const MAX_L1_BYTES: u64 = 32 << 20;

/// One snapshot table entry.
#[derive(Clone, Debug, Default)]
pub struct Entry {
    pub l1_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u32,
    /// The extra data as found (kept when the table is written again).
    pub extra: Vec<u8>,
}

/// The extra data QEMU writes: vm_state_size_large, disk_size, icount.
pub const EXTRA_LEN: usize = 24;

impl Entry {
    /// The entry's bytes, padded to a multiple of 8.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(40 + self.extra.len() + self.id.len() + self.name.len() + 8);
        b.extend(self.l1_offset.to_be_bytes());
        b.extend(self.l1_size.to_be_bytes());
        b.extend((self.id.len() as u16).to_be_bytes());
        b.extend((self.name.len() as u16).to_be_bytes());
        b.extend(self.date_sec.to_be_bytes());
        b.extend(self.date_nsec.to_be_bytes());
        b.extend(self.vm_clock_nsec.to_be_bytes());
        b.extend(self.vm_state_size.to_be_bytes());
        b.extend((self.extra.len() as u32).to_be_bytes());
        b.extend(&self.extra);
        b.extend(self.id.as_bytes());
        b.extend(self.name.as_bytes());
        b.resize(b.len().next_multiple_of(8), 0);
        b
    }

    fn extra_u64(&self, at: usize) -> Option<u64> {
        let b = self.extra.get(at..at + 8)?;
        Some(u64::from_be_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    /// QAPI SnapshotInfo, as query-named-block-nodes and
    /// blockdev-snapshot-delete-internal-sync show it.
    pub fn info(&self) -> serde_json::Value {
        let vm_state = self.extra_u64(0).unwrap_or(u64::from(self.vm_state_size));
        let mut m = serde_json::Map::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert("name".into(), self.name.clone().into());
        m.insert("vm-state-size".into(), vm_state.into());
        m.insert("date-sec".into(), self.date_sec.into());
        m.insert("date-nsec".into(), self.date_nsec.into());
        m.insert(
            "vm-clock-sec".into(),
            (self.vm_clock_nsec / 1_000_000_000).into(),
        );
        m.insert(
            "vm-clock-nsec".into(),
            (self.vm_clock_nsec % 1_000_000_000).into(),
        );
        if let Some(icount) = self.extra_u64(16).filter(|i| *i != u64::MAX) {
            m.insert("icount".into(), icount.into());
        }
        serde_json::Value::Object(m)
    }
}

pub struct Snapshots {
    /// (L1 table offset, L1 entries) of each snapshot.
    pub l1_tables: Vec<(u64, u64)>,
    pub entries: Vec<Entry>,
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
        entries: Vec::new(),
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
        let id_len = u16::from_be_bytes([e[12], e[13]]);
        let id = u64::from(id_len);
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
        if at.checked_add(raw).is_none_or(|end| end > fsize) {
            return Err(corrupt(
                "Snapshot table lies beyond the end of the image file",
            ));
        }
        let mut rest = vec![0u8; (raw - 40) as usize];
        file.read(at + 40, &mut rest).await?;
        let (extra, strings) = rest.split_at(extra as usize);
        let (idb, nameb) = strings.split_at(id_len as usize);
        s.entries.push(Entry {
            l1_offset: l1_off,
            l1_size: l1_size as u32,
            id: String::from_utf8_lossy(idb).into_owned(),
            name: String::from_utf8_lossy(nameb).into_owned(),
            date_sec: be32(16),
            date_nsec: be32(20),
            vm_clock_nsec: u64::from_be_bytes([
                e[24], e[25], e[26], e[27], e[28], e[29], e[30], e[31],
            ]),
            vm_state_size: be32(32),
            extra: extra.to_vec(),
        });
        s.l1_tables.push((l1_off, l1_size));
        let len = raw.div_ceil(8) * 8;
        at = at.saturating_add(len);
        s.table_len += len;
    }
    Ok(s)
}
