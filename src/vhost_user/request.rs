//! One virtio-blk request: its descriptors split into the header, the
//! data and the status byte, checked as QSD checks them, and run on the
//! export's node with the data read and written in guest memory in
//! place. Nothing the frontend puts in a descriptor can make this panic:
//! a request whose parts cannot be found or reached gets IOERR, or no
//! status at all when there is no writable byte to put it in.
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::config::{MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, SECTOR_BITS};
use super::Shared;
use crate::block::driver::{WriteFlags, ZeroFlags};
use crate::exports::stats::Op as ExportOp;

/// Request types (virtio spec 5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
/// A legacy flag QSD ignores in the type.
const T_BARRIER: u32 = 0x8000_0000;
/// Status values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Write-zeroes flag: the range may be deallocated.
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// The serial GET_ID answers, as QSD answers it.
const SERIAL: &[u8] = b"vhost_user_blk";
const ID_BYTES: usize = 20;
/// Out header: type, reserved, sector.
const OUT_HDR_LEN: u64 = 16;
/// QEMU's BDRV_REQUEST_MAX_SECTORS: INT_MAX bytes, rounded down.
const MAX_REQUEST_SECTORS: u64 = (i32::MAX as u64) >> SECTOR_BITS;

/// A descriptor as the chain gave it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A run of guest memory (part of a descriptor).
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: u64,
    len: u64,
}

/// A request's parts, found in its descriptors.
struct Parts {
    kind: u32,
    sector: u64,
    /// Driver-readable data after the header.
    out: Vec<Seg>,
    /// Device-writable data before the status byte.
    inn: Vec<Seg>,
}

/// Runs one request; returns the used length to report (every
/// writable byte, the status included, as QSD reports it), 0 when the
/// request had no status byte to write.
pub async fn run(dev: &Shared, mem: &GuestMemoryMmap, descs: &[Desc]) -> u32 {
    let in_len: u64 = descs
        .iter()
        .filter(|d| d.writable)
        .map(|d| u64::from(d.len))
        .sum();
    let Some(status_at) = descs
        .iter()
        .rev()
        .find(|d| d.writable)
        .filter(|d| d.len > 0)
        .map(|d| d.addr.wrapping_add(u64::from(d.len) - 1))
    else {
        // No writable byte: no status can be given (QSD drops these).
        return 0;
    };
    let status = match split(mem, descs) {
        Some(p) => {
            let status = execute(dev, mem, &p).await;
            count(dev, &p, status);
            status
        }
        None => {
            dev.stats.request(ExportOp::Other, 0, false);
            S_IOERR
        }
    };
    if mem.write_obj(status, GuestAddress(status_at)).is_err() {
        return 0;
    }
    u32::try_from(in_len).unwrap_or(u32::MAX)
}

/// Finds the header, data and status; None when the header is short.
fn split(mem: &GuestMemoryMmap, descs: &[Desc]) -> Option<Parts> {
    let readable = descs.iter().filter(|d| !d.writable);
    let mut header = [0u8; OUT_HDR_LEN as usize];
    let mut got = 0u64;
    let mut out = Vec::new();
    for d in readable {
        let len = u64::from(d.len);
        let take = (OUT_HDR_LEN - got).min(len);
        if take > 0 {
            let dst = &mut header[got as usize..(got + take) as usize];
            mem.read_slice(dst, GuestAddress(d.addr)).ok()?;
            got += take;
        }
        if len > take {
            out.push(Seg {
                addr: d.addr.checked_add(take)?,
                len: len - take,
            });
        }
    }
    if got < OUT_HDR_LEN {
        return None;
    }
    let mut inn: Vec<Seg> = descs
        .iter()
        .filter(|d| d.writable)
        .map(|d| Seg {
            addr: d.addr,
            len: u64::from(d.len),
        })
        .collect();
    // The status byte is the last writable byte.
    if let Some(last) = inn.last_mut() {
        last.len -= 1;
        if last.len == 0 {
            inn.pop();
        }
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().ok()?);
    let sector = u64::from_le_bytes(header[8..16].try_into().ok()?);
    Some(Parts {
        kind,
        sector,
        out,
        inn,
    })
}

async fn execute(dev: &Shared, mem: &GuestMemoryMmap, p: &Parts) -> u8 {
    match p.kind & !T_BARRIER {
        T_IN => read(dev, mem, p).await,
        T_OUT if !dev.writable => S_IOERR,
        T_OUT => write(dev, mem, p).await,
        T_FLUSH => {
            let Some(node) = dev.node.enter().await else {
                return S_IOERR;
            };
            ok(node.flush().await.is_ok())
        }
        T_GET_ID => {
            let room = total(&p.inn).min(ID_BYTES as u64) as usize;
            let mut id = SERIAL.to_vec();
            id.push(0);
            id.truncate(room);
            ok(copy_to(mem, &p.inn, &id))
        }
        T_DISCARD | T_WRITE_ZEROES if !dev.writable => S_IOERR,
        t @ (T_DISCARD | T_WRITE_ZEROES) => discard_or_zero(dev, mem, p, t).await,
        _ => S_UNSUPP,
    }
}

/// Counts a request on the export (payload bytes for reads and writes).
fn count(dev: &Shared, p: &Parts, status: u8) {
    let (op, bytes) = match p.kind & !T_BARRIER {
        T_IN => (ExportOp::Read, total(&p.inn)),
        T_OUT => (ExportOp::Write, total(&p.out)),
        T_FLUSH => (ExportOp::Flush, 0),
        T_DISCARD => (ExportOp::Discard, 0),
        T_WRITE_ZEROES => (ExportOp::WriteZeroes, 0),
        _ => (ExportOp::Other, 0),
    };
    dev.stats.request(op, bytes, status == S_OK);
}

fn ok(good: bool) -> u8 {
    if good {
        S_OK
    } else {
        S_IOERR
    }
}

fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// QSD's range check: whole sectors, aligned to the logical block
/// size, within the capacity.
fn range_ok(dev: &Shared, capacity_bytes: u64, sector: u64, size: u64) -> bool {
    if !size.is_multiple_of(1 << SECTOR_BITS) {
        return false;
    }
    let nb = size >> SECTOR_BITS;
    if nb > MAX_REQUEST_SECTORS {
        return false;
    }
    // A logical block size of 0 (which QSD accepts) counts as 512.
    let bs = u64::from(dev.logical_block_size.max(1 << SECTOR_BITS));
    match sector.checked_mul(1 << SECTOR_BITS) {
        Some(off) if off % bs == 0 => {}
        _ => return false,
    }
    let total = capacity_bytes >> SECTOR_BITS;
    sector <= total && nb <= total - sector
}

/// Where a segment is in this process: a pointer and a length inside
/// one mapped region of guest memory.
fn guest_ptr(mem: &GuestMemoryMmap, s: Seg) -> Option<(*mut u8, usize)> {
    let len = usize::try_from(s.len).ok()?;
    let slice = mem.get_slice(GuestAddress(s.addr), len).ok()?;
    let ptr = slice.ptr_guard_mut().as_ptr();
    Some((ptr, len))
}

/// Guest memory as a byte slice for the driver to read.
fn guest_bytes(mem: &GuestMemoryMmap, s: Seg) -> Option<&[u8]> {
    let (ptr, len) = guest_ptr(mem, s)?;
    // SAFETY: get_slice checked that [ptr, ptr+len) lies inside one
    // mapped region, which `mem` keeps mapped for the borrow's life.
    Some(unsafe { std::slice::from_raw_parts(ptr, len) })
}

async fn read(dev: &Shared, mem: &GuestMemoryMmap, p: &Parts) -> u8 {
    let Some(node) = dev.node.enter().await else {
        return S_IOERR;
    };
    if !range_ok(dev, node.size(), p.sector, total(&p.inn)) {
        return S_IOERR;
    }
    let mut off = p.sector << SECTOR_BITS;
    for s in &p.inn {
        // The frontend owns this memory and may change it at any time:
        // the driver fills it as plain bytes and never relies on them.
        let buf: &mut [u8] = match guest_ptr(mem, *s) {
            // SAFETY: get_slice checked that the run lies inside one
            // mapped region, which `mem` keeps mapped while it is used.
            Some((ptr, len)) => unsafe { std::slice::from_raw_parts_mut(ptr, len) },
            None => return S_IOERR,
        };
        if node.read(off, buf).await.is_err() {
            return S_IOERR;
        }
        off += s.len;
    }
    S_OK
}

async fn write(dev: &Shared, mem: &GuestMemoryMmap, p: &Parts) -> u8 {
    let Some(node) = dev.node.enter().await else {
        return S_IOERR;
    };
    if !range_ok(dev, node.size(), p.sector, total(&p.out)) {
        return S_IOERR;
    }
    let flags = WriteFlags {
        fua: !dev.write_cache.load(Ordering::Relaxed),
        ..Default::default()
    };
    let mut off = p.sector << SECTOR_BITS;
    for s in &p.out {
        let Some(buf) = guest_bytes(mem, *s) else {
            return S_IOERR;
        };
        if node.write(off, buf, flags).await.is_err() {
            return S_IOERR;
        }
        off += s.len;
    }
    S_OK
}

/// DISCARD and WRITE_ZEROES: one 16-byte segment (sector, sectors,
/// flags), with QSD's answers for more, less and unknown flags.
async fn discard_or_zero(dev: &Shared, mem: &GuestMemoryMmap, p: &Parts, kind: u32) -> u8 {
    let mut seg = [0u8; 16];
    if total(&p.out) > 16 {
        return S_UNSUPP;
    }
    if !copy_from(mem, &p.out, &mut seg) {
        return S_IOERR;
    }
    let word = |a: usize| u32::from_le_bytes([seg[a], seg[a + 1], seg[a + 2], seg[a + 3]]);
    let sector = u64::from_le_bytes([
        seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
    ]);
    let (sectors, flags) = (word(8), word(12));
    let max = if kind == T_WRITE_ZEROES {
        MAX_WRITE_ZEROES_SECTORS
    } else {
        MAX_DISCARD_SECTORS
    };
    if sectors > max {
        return S_IOERR;
    }
    let bytes = u64::from(sectors) << SECTOR_BITS;
    let Some(node) = dev.node.enter().await else {
        return S_IOERR;
    };
    if !range_ok(dev, node.size(), sector, bytes) {
        return S_IOERR;
    }
    if flags & !WRITE_ZEROES_FLAG_UNMAP != 0 {
        return S_UNSUPP;
    }
    let off = sector << SECTOR_BITS;
    if kind == T_WRITE_ZEROES {
        let zf = ZeroFlags {
            fua: !dev.write_cache.load(Ordering::Relaxed),
            may_unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0,
            no_fallback: false,
        };
        ok(node.write_zeroes(off, bytes, zf).await.is_ok())
    } else if flags & WRITE_ZEROES_FLAG_UNMAP != 0 {
        S_UNSUPP
    } else {
        ok(node.discard(off, bytes).await.is_ok())
    }
}

/// Fills `buf` from the segments; false unless it is filled exactly.
fn copy_from(mem: &GuestMemoryMmap, segs: &[Seg], buf: &mut [u8]) -> bool {
    let mut at = 0usize;
    for s in segs {
        let n = (s.len as usize).min(buf.len() - at);
        if mem
            .read_slice(&mut buf[at..at + n], GuestAddress(s.addr))
            .is_err()
        {
            return false;
        }
        at += n;
    }
    at == buf.len()
}

/// Writes `data` into the segments, as far as they reach.
fn copy_to(mem: &GuestMemoryMmap, segs: &[Seg], data: &[u8]) -> bool {
    let mut at = 0usize;
    for s in segs {
        if at == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - at);
        if mem
            .write_slice(&data[at..at + n], GuestAddress(s.addr))
            .is_err()
        {
            return false;
        }
        at += n;
    }
    true
}
