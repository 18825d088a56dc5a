//! The `blklogwrites` filter (QEMU's): every write, write-zeroes,
//! discard and flush that reaches `file` is also recorded in `log`, in
//! the format of Linux's dm-log-writes target, so a replay tool can
//! rebuild the disk at any point.
//!
//! The log, all little-endian: sector 0 is the superblock (magic,
//! version 1, the number of entries, the log's sector size), rewritten
//! on each flush and every `log-super-update-interval` entries. Each
//! entry is one sector (its disk sector and sector count in the node's
//! log sectors, flags FLUSH/FUA/DISCARD/MARK, data_len, which QEMU
//! leaves 0) followed by the written data (zeroes for write-zeroes,
//! none for discards and flushes).
//!
//! As QEMU: requests are whole log sectors (the node's request
//! alignment); a flush is logged only when something was written since
//! the last one, and a FUA write is a write and then such a flush (the
//! filter has no FUA of its own), so the flush it adds records the
//! writes before it.
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::child::{Child, Entered};
use super::driver::{Driver, Extent, IoFuture, Limits, WriteFlags, ZeroFlags};
use super::drivers::{edge, opt_bool, opt_u64, OpenCtx, Opened};
use super::error::{BlockError, BlockResult};
use super::perm::Perm;

const MAGIC: u64 = 0x006a_7366_7773_6872;
const VERSION: u64 = 1;
const FLUSH: u64 = 1;
const DISCARD: u64 = 1 << 2;
const FLAG_MASK: u64 = 0xf;
/// The size of an entry's header (and the superblock fits in it).
const ENTRY_LEN: usize = 32;

struct LogState {
    /// The log sector the next entry goes to.
    cur_sector: u64,
    entries: u64,
    /// Writes done, and how many of them the last logged flush covered.
    write_gen: u64,
    flushed_gen: u64,
}

pub struct LogWrites {
    file: Arc<Child>,
    log: Arc<Child>,
    sector: u64,
    bits: u32,
    interval: u64,
    /// One request at a time: a request's file I/O and its entry.
    state: tokio::sync::Mutex<LogState>,
}

enum Op<'a> {
    Write(&'a [u8], bool),
    Zero(u64, ZeroFlags),
    Discard(u64),
    Flush,
}

fn sector_size_valid(s: u64) -> bool {
    s.is_power_of_two() && s >= ENTRY_LEN as u64 && s < (1 << 24)
}

pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    let ro = ctx.common.read_only;
    let file = ctx.child(opts, "file", ro)?;
    // QEMU names the node after its file and before its log.
    ctx.name_now();
    let log = match ctx.child(opts, "log", ro) {
        Ok(l) => l,
        Err(e) => {
            ctx.drop_inline(&file);
            return Err(e);
        }
    };
    let opened = open_log(ctx, opts, &file, &log);
    if opened.is_err() {
        ctx.drop_inline(&log);
        ctx.drop_inline(&file);
    }
    opened
}

fn open_log(
    ctx: &mut OpenCtx<'_>,
    opts: &Map<String, Value>,
    file: &str,
    log: &str,
) -> Result<Opened, String> {
    let log_node = ctx.node(log)?;
    let append = opt_bool(opts, "log-append").unwrap_or(false);
    let (sector, cur_sector, entries) = if append {
        if opts.contains_key("log-sector-size") {
            return Err("log-append and log-sector-size are mutually exclusive".into());
        }
        let n = log_node.clone();
        super::wait::wait(async move { find_log_end(&n).await }).map_err(|e| e.msg)??
    } else {
        (opt_u64(opts, "log-sector-size").unwrap_or(512), 1, 0)
    };
    if !sector_size_valid(sector) {
        return Err(format!("Invalid log sector size {sector}"));
    }
    let interval = opt_u64(opts, "log-super-update-interval").unwrap_or(4096);
    if interval == 0 {
        return Err(format!("Invalid log superblock update interval {interval}"));
    }
    let mut j = Map::new();
    j.insert("driver".into(), json!("blklogwrites"));
    for role in ["file", "log"] {
        let child = if role == "file" { file } else { log };
        j.insert(
            role.into(),
            ctx.entry(child)
                .map(|e| e.json.clone())
                .unwrap_or(Value::Null),
        );
    }
    for k in ["log-append", "log-sector-size"] {
        if let Some(v) = opts.get(k) {
            j.insert(k.into(), v.clone());
        }
    }
    Ok(Opened {
        driver: Box::new(LogWrites {
            file: Child::new(ctx.node(file)?),
            log: Child::new(log_node),
            sector,
            bits: sector.trailing_zeros(),
            interval,
            state: tokio::sync::Mutex::new(LogState {
                cur_sector,
                entries,
                write_gen: 0,
                flushed_gen: 0,
            }),
        }),
        json: Value::Object(j),
        plain: None,
        children: vec![edge("file", file), edge("log", log)],
    })
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// log-append: the existing log's sector size, where its next entry
/// goes and how many it has (an empty log is a new one of 512-byte
/// sectors). The outer error is I/O, the inner one QEMU's message.
async fn find_log_end(log: &super::node::Node) -> BlockResult<Result<(u64, u64, u64), String>> {
    let mut sb = [0u8; 28];
    if log.size() > 0 {
        if let Err(e) = log.read(0, &mut sb).await {
            return Ok(Err(format!("Could not read log superblock: {}", e.msg)));
        }
    } else {
        sb[..8].copy_from_slice(&MAGIC.to_le_bytes());
        sb[8..16].copy_from_slice(&VERSION.to_le_bytes());
        sb[24..28].copy_from_slice(&512u32.to_le_bytes());
    }
    if le64(&sb, 0) != MAGIC {
        return Ok(Err("Invalid log superblock magic".into()));
    }
    let version = le64(&sb, 8);
    if version != VERSION {
        return Ok(Err(format!("Unsupported log version {version}")));
    }
    let mut w = [0u8; 4];
    w.copy_from_slice(&sb[24..28]);
    let sector = u32::from_le_bytes(w) as u64;
    if !sector_size_valid(sector) {
        // QEMU then reports the size as invalid.
        return Ok(Ok((sector, 1, 0)));
    }
    let entries = le64(&sb, 16);
    let mut cur = 1u64;
    for i in 0..entries {
        let mut e = [0u8; ENTRY_LEN];
        if let Err(err) = log.read(cur * sector, &mut e).await {
            return Ok(Err(format!("Failed to read log entry {i}: {}", err.msg)));
        }
        let flags = le64(&e, 16);
        if flags & !FLAG_MASK != 0 {
            return Ok(Err(format!("Invalid flags 0x{flags:x} in log entry {i}")));
        }
        cur += 1;
        if flags & DISCARD == 0 {
            cur += le64(&e, 8);
        }
    }
    Ok(Ok((sector, cur, entries)))
}

impl LogWrites {
    async fn enter(child: &Child) -> BlockResult<Entered<'_>> {
        child
            .enter()
            .await
            .ok_or_else(|| BlockError::new(nix::libc::ENOMEDIUM, "No medium found"))
    }

    /// One request: its file I/O, then its entry (logged even when the
    /// file failed, as QEMU); a log failure wins.
    async fn logged(&self, st: &mut LogState, offset: u64, op: Op<'_>) -> BlockResult<()> {
        let f = Self::enter(&self.file).await?;
        let is_zero = matches!(&op, Op::Zero(..));
        let (len, flags, data) = match &op {
            Op::Write(b, _) => (b.len() as u64, 0, Some(*b)),
            Op::Zero(len, _) => (*len, 0, None),
            Op::Discard(len) => (*len, DISCARD, None),
            Op::Flush => (0, FLUSH, None),
        };
        let file_result = match op {
            Op::Write(b, _) => f.write(offset, b, WriteFlags::default()).await,
            Op::Zero(len, zf) => {
                f.write_zeroes(offset, len, ZeroFlags { fua: false, ..zf })
                    .await
            }
            Op::Discard(len) => f.discard(offset, len).await,
            Op::Flush => f.flush().await,
        };
        drop(f);
        let log = Self::enter(&self.log).await?;
        let ss = self.sector as usize;
        let mut rec = vec![0u8; ss + data.map_or(0, |d| d.len())];
        rec[..8].copy_from_slice(&(offset >> self.bits).to_le_bytes());
        rec[8..16].copy_from_slice(&(len >> self.bits).to_le_bytes());
        rec[16..24].copy_from_slice(&flags.to_le_bytes());
        if let Some(d) = data {
            rec[ss..].copy_from_slice(d);
        }
        st.entries += 1;
        let at = st.cur_sector << self.bits;
        st.cur_sector += (rec.len() as u64).div_ceil(self.sector);
        log.write(at, &rec, WriteFlags::default()).await?;
        if is_zero {
            let at = st.cur_sector << self.bits;
            st.cur_sector += len.div_ceil(self.sector);
            log.write_zeroes(at, len, ZeroFlags::default()).await?;
        }
        if flags & FLUSH != 0 || st.entries.is_multiple_of(self.interval) {
            let mut sb = vec![0u8; ss];
            sb[..8].copy_from_slice(&MAGIC.to_le_bytes());
            sb[8..16].copy_from_slice(&VERSION.to_le_bytes());
            sb[16..24].copy_from_slice(&st.entries.to_le_bytes());
            sb[24..28].copy_from_slice(&(self.sector as u32).to_le_bytes());
            log.write(0, &sb, WriteFlags::default()).await?;
            log.flush().await?;
        }
        file_result
    }

    /// A flush: logged only if something was written since the last
    /// logged one; the children are flushed either way.
    async fn flush_locked(&self, st: &mut LogState) -> BlockResult<()> {
        if st.write_gen == st.flushed_gen {
            Self::enter(&self.file).await?.flush().await?;
            return Self::enter(&self.log).await?.flush().await;
        }
        let gen = st.write_gen;
        self.logged(st, 0, Op::Flush).await?;
        st.flushed_gen = gen;
        Ok(())
    }

    /// A write-like request: logged, then QEMU's emulated FUA (a flush
    /// before the write counts as written), then counted.
    async fn change(&self, offset: u64, op: Op<'_>) -> BlockResult<()> {
        let mut st = self.state.lock().await;
        let fua = match &op {
            Op::Write(_, fua) => *fua,
            Op::Zero(_, zf) => zf.fua,
            _ => false,
        };
        let r = self.logged(&mut st, offset, op).await;
        let r = match r {
            Ok(()) if fua => self.flush_locked(&mut st).await,
            r => r,
        };
        st.write_gen += 1;
        r
    }

    /// A write that is not whole log sectors: its head and tail sectors
    /// are read and the whole sectors written (QEMU's block layer pads
    /// to the request alignment).
    async fn padded_write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> BlockResult<()> {
        let ss = self.sector;
        let start = offset / ss * ss;
        let end = offset + buf.len() as u64;
        let stop = end.div_ceil(ss) * ss;
        let mut whole = vec![0u8; (stop - start) as usize];
        {
            let f = Self::enter(&self.file).await?;
            let size = f.size();
            let head = ss.min(stop - start).min(size.saturating_sub(start)) as usize;
            f.read(start, &mut whole[..head]).await?;
            let tail = stop - ss;
            if tail > start && tail < size {
                let n = ss.min(size - tail) as usize;
                let at = (tail - start) as usize;
                f.read(tail, &mut whole[at..at + n]).await?;
            }
        }
        let at = (offset - start) as usize;
        whole[at..at + buf.len()].copy_from_slice(buf);
        self.change(start, Op::Write(&whole, flags.fua)).await
    }
}

impl Driver for LogWrites {
    fn name(&self) -> &'static str {
        "blklogwrites"
    }
    fn size(&self) -> u64 {
        self.file.get().map_or(0, |n| n.size())
    }
    fn limits(&self) -> Limits {
        let below = self.file.get().map(|n| n.limits()).unwrap_or_default();
        Limits {
            request_alignment: self.sector as u32,
            ..below
        }
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move { Self::enter(&self.file).await?.read(offset, buf).await })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let ss = self.sector;
            if !offset.is_multiple_of(ss) || !(buf.len() as u64).is_multiple_of(ss) {
                return self.padded_write(offset, buf, flags).await;
            }
            self.change(offset, Op::Write(buf, flags.fua)).await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let mut st = self.state.lock().await;
            self.flush_locked(&mut st).await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            // The block layer drops what is not whole sectors.
            let ss = self.sector;
            let start = offset.div_ceil(ss) * ss;
            let end = (offset + len) / ss * ss;
            if end <= start {
                return Ok(());
            }
            self.change(start, Op::Discard(end - start)).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let ss = self.sector;
            if !offset.is_multiple_of(ss) || !len.is_multiple_of(ss) {
                let zeroes = vec![0u8; len as usize];
                return self
                    .padded_write(
                        offset,
                        &zeroes,
                        WriteFlags {
                            fua: flags.fua,
                            ..WriteFlags::default()
                        },
                    )
                    .await;
            }
            self.change(offset, Op::Zero(len, flags)).await
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Extent> {
        Box::pin(async move {
            Self::enter(&self.file)
                .await?
                .block_status(offset, len)
                .await
        })
    }
    fn truncate(&self, _size: u64) -> IoFuture<'_, ()> {
        Box::pin(async {
            Err(BlockError::unsupported(
                "Image format driver does not support resize",
            ))
        })
    }
    fn allocated_size(&self) -> Option<u64> {
        self.file.get()?.allocated_size()
    }
    /// `file` passes its parents' needs through; `log` is written as
    /// metadata (QEMU's default permissions for such a child).
    fn child_perms(&self, role: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        if role == "log" {
            let ro = self.log.get().is_some_and(|n| n.read_only());
            return super::qcow2::metadata_perms(ro);
        }
        (perm, shared)
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn child_slot(&self, role: &str) -> Option<Arc<Child>> {
        match role {
            "file" => Some(self.file.clone()),
            "log" => Some(self.log.clone()),
            _ => None,
        }
    }
}
