//! The crash test's I/O: one NBD connection with up to `DEPTH` requests
//! in flight (never two on the same block), mixing allocating writes,
//! reads checked against what completed, write-zeroes, discards and
//! flushes, every request logged with when it was sent and answered.
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::nbd_wire::{
    self, Nbd, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
};

use super::model::{decode, pattern, Allowed, Kind, Op, BLOCK};
use super::{Ctx, End, Rng};

const DEPTH: usize = 8;
/// At most this many blocks per request (128 KiB).
const MAX_BLOCKS: u64 = 32;

/// What the control thread asks of the I/O thread around a resize: the
/// export must go (QSD refuses block_resize under a writable NBD
/// export), so the client drains, says goodbye and waits for the new
/// export's name.
pub enum Ctl {
    Pause(Sender<()>),
    Resume(String),
}

struct Done {
    cookie: u64,
    err: u32,
    data: Vec<u8>,
}

const FLUSH_COOKIE: u64 = 1;

struct Client {
    w: UnixStream,
    blocks: u64,
    done: Receiver<Done>,
    /// cookie -> bytes a read's reply carries (0 for other commands).
    pending: Arc<Mutex<HashMap<u64, u32>>>,
    reader: Option<JoinHandle<()>>,
    /// (cookie, first block, blocks) of the requests in flight.
    inflight: Vec<(u64, u64, u64)>,
}

fn died(ctx: &Ctx, what: &str, e: impl std::fmt::Display) -> End {
    if ctx.is_killed() {
        End::Killed
    } else {
        End::Defect(format!("NBD {what}: {e}"))
    }
}

impl Client {
    fn open(ctx: &Arc<Ctx>, name: &str) -> Result<Client, End> {
        let c = Nbd::connect(&ctx.nbd_sock, name).map_err(|e| died(ctx, "connect", e))?;
        // Longer than the default: a reply can wait behind the monitor's
        // snapshots and resizes.
        c.set_timeout(Duration::from_secs(30))
            .map_err(|e| died(ctx, "timeout", e))?;
        let (w, size) = (c.s, c.size);
        let mut r = w.try_clone().map_err(|e| died(ctx, "clone", e))?;
        let pending: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
        let (tx, done) = mpsc::channel();
        let (ctx2, pending2) = (ctx.clone(), pending.clone());
        let reader = std::thread::spawn(move || {
            while let Ok((err, cookie)) = nbd_wire::simple_reply(&mut r) {
                let len = pending2.lock().map_or(None, |mut p| p.remove(&cookie));
                let Some(len) = len else {
                    let _ = tx.send(Done {
                        cookie,
                        err: u32::MAX,
                        data: Vec::new(),
                    });
                    return;
                };
                let mut data = vec![0u8; if err == 0 { len as usize } else { 0 }];
                if r.read_exact(&mut data).is_err() {
                    return;
                }
                let t = ctx2.tick();
                if err == 0 {
                    ctx2.mark_done(cookie, t);
                }
                if tx.send(Done { cookie, err, data }).is_err() {
                    return;
                }
            }
        });
        Ok(Client {
            w,
            blocks: size / BLOCK,
            done,
            pending,
            reader: Some(reader),
            inflight: Vec::new(),
        })
    }

    fn send(&mut self, ctx: &Ctx, cookie: u64, bytes: &[u8], read_len: u32) -> Result<(), End> {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(cookie, read_len);
        }
        self.w.write_all(bytes).map_err(|e| died(ctx, "send", e))
    }

    /// Handles one reply: applies it to `cur`, or checks a read there.
    fn wait_one(&mut self, ctx: &Ctx, cur: &mut [Allowed]) -> Result<(), End> {
        let d = loop {
            match self.done.recv_timeout(Duration::from_millis(50)) {
                Ok(d) => break d,
                Err(RecvTimeoutError::Timeout) if !ctx.is_killed() => {}
                Err(e) => return Err(died(ctx, "reply", e)),
            }
        };
        if d.err == u32::MAX {
            return Err(End::Defect(format!("reply to unknown cookie {}", d.cookie)));
        }
        self.inflight.retain(|i| i.0 != d.cookie);
        if d.cookie & FLUSH_COOKIE != 0 {
            if d.err != 0 {
                return Err(End::Defect(format!("flush failed: error {}", d.err)));
            }
            return Ok(());
        }
        let op = ctx.op(d.cookie >> 1);
        if d.err != 0 {
            return Err(End::Defect(format!("{op:?} failed: error {}", d.err)));
        }
        if op.kind != Kind::Read {
            for b in op.first..op.first + op.count {
                cur[b as usize].apply(op.kind);
            }
            return Ok(());
        }
        for (i, chunk) in d.data.chunks(BLOCK as usize).enumerate() {
            let b = op.first + i as u64;
            let found = decode(b, chunk);
            if !cur[b as usize].admits(found) {
                return Err(End::Defect(format!(
                    "live read of block {b} found {found:?}, expected {:?}",
                    cur[b as usize]
                )));
            }
        }
        Ok(())
    }

    fn drain(&mut self, ctx: &Ctx, cur: &mut [Allowed]) -> Result<(), End> {
        while !self.inflight.is_empty() {
            self.wait_one(ctx, cur)?;
        }
        Ok(())
    }

    /// NBD_CMD_DISC, then waits until the daemon closed the connection.
    fn close(mut self) {
        let _ = self.w.write_all(&nbd_wire::request(CMD_DISC, 0, 0, 0, 0));
        let _ = self.w.shutdown(std::net::Shutdown::Write);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Client {
    /// The reader goes with the client, so that nothing marks the log
    /// once the round is over.
    fn drop(&mut self) {
        let _ = self.w.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Runs I/O on export `name` until the daemon is killed. `cur` is what
/// each block holds at the start.
pub fn run(
    ctx: Arc<Ctx>,
    mut cur: Vec<Allowed>,
    name: String,
    seed: u64,
    ctl: Receiver<Ctl>,
) -> Result<(), String> {
    match io_loop(&ctx, &mut cur, name, seed, &ctl) {
        Ok(()) | Err(End::Killed) => Ok(()),
        Err(End::Defect(d)) => Err(d),
    }
}

fn io_loop(
    ctx: &Arc<Ctx>,
    cur: &mut [Allowed],
    mut name: String,
    seed: u64,
    ctl: &Receiver<Ctl>,
) -> Result<(), End> {
    let mut rng = Rng(seed);
    let mut c = Client::open(ctx, &name)?;
    while !ctx.is_killed() {
        if let Ok(Ctl::Pause(ack)) = ctl.try_recv() {
            c.drain(ctx, cur)?;
            c.close();
            let _ = ack.send(());
            name = loop {
                match ctl.recv_timeout(Duration::from_millis(50)) {
                    Ok(Ctl::Resume(n)) => break n,
                    Ok(Ctl::Pause(_)) => return Err(End::Defect("paused twice".into())),
                    Err(RecvTimeoutError::Timeout) if !ctx.is_killed() => {}
                    Err(_) => return Err(End::Killed),
                }
            };
            c = Client::open(ctx, &name)?;
            continue;
        }
        if c.inflight.len() >= DEPTH {
            c.wait_one(ctx, cur)?;
            continue;
        }
        let pick = rng.below(100);
        if pick < 8 {
            let cookie = (ctx.flush_sent() << 1) | FLUSH_COOKIE;
            c.inflight.push((cookie, 0, 0));
            c.send(
                ctx,
                cookie,
                &nbd_wire::request(CMD_FLUSH, 0, cookie, 0, 0),
                0,
            )?;
            continue;
        }
        let count = 1 + rng.below(MAX_BLOCKS.min(c.blocks));
        let first = rng.below(c.blocks - count + 1);
        if c.inflight
            .iter()
            .any(|&(_, f, n)| first < f + n && f < first + count)
        {
            c.wait_one(ctx, cur)?;
            continue;
        }
        let kind = match pick {
            8..=59 => Kind::Write(ctx.next_gen()),
            60..=74 => Kind::Read,
            75..=87 => Kind::Zero,
            _ => Kind::Discard,
        };
        let idx = ctx.log_op(Op {
            first,
            count,
            kind,
            sent: 0,
            done: None,
        });
        let cookie = idx << 1;
        let (off, len) = (first * BLOCK, (count * BLOCK) as u32);
        c.inflight.push((cookie, first, count));
        match kind {
            Kind::Write(g) => {
                let mut req = nbd_wire::request(CMD_WRITE, 0, cookie, off, len);
                let head = req.len();
                req.resize(head + len as usize, 0);
                for (i, chunk) in req[head..].chunks_mut(BLOCK as usize).enumerate() {
                    pattern(g, first + i as u64, chunk);
                }
                c.send(ctx, cookie, &req, 0)?;
            }
            Kind::Read => {
                let req = nbd_wire::request(CMD_READ, 0, cookie, off, len);
                c.send(ctx, cookie, &req, len)?;
            }
            Kind::Zero => {
                let req = nbd_wire::request(CMD_WRITE_ZEROES, 0, cookie, off, len);
                c.send(ctx, cookie, &req, 0)?;
            }
            Kind::Discard => {
                let req = nbd_wire::request(CMD_TRIM, 0, cookie, off, len);
                c.send(ctx, cookie, &req, 0)?;
            }
        }
    }
    Ok(())
}
