//! The crash test's QMP side, beside the I/O: internal snapshots made
//! and deleted, a persistent dirty bitmap added, cleared and removed,
//! and the image grown (the export removed and added again around it).
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::client::Ctl;
use super::monitor::Mon;
use super::{Ctx, End, Rng, MAX_SIZE};

/// What the control thread knows of the image.
pub struct Image {
    pub snapshots: Vec<String>,
    pub size: u64,
    pub export: u32,
}

fn run_cmd(ctx: &Ctx, mon: &mut Mon, name: &str, args: Value) -> Result<Value, End> {
    match mon.cmd(name, args.clone()) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(desc)) => Err(End::Defect(format!("{name} {args}: {desc}"))),
        Err(_) if ctx.is_killed() => Err(End::Killed),
        Err(e) => Err(End::Defect(format!("{name}: monitor: {e}"))),
    }
}

pub fn run(
    ctx: Arc<Ctx>,
    mut mon: Mon,
    seed: u64,
    img: Image,
    round: usize,
    io: Sender<Ctl>,
) -> Result<(), String> {
    match control_loop(&ctx, &mut mon, seed, img, round, &io) {
        Ok(()) | Err(End::Killed) => Ok(()),
        Err(End::Defect(d)) => Err(d),
    }
}

fn control_loop(
    ctx: &Ctx,
    mon: &mut Mon,
    seed: u64,
    mut img: Image,
    round: usize,
    io: &Sender<Ctl>,
) -> Result<(), End> {
    let mut rng = Rng(seed);
    let mut bitmap = false;
    let mut made = 0;
    while !ctx.is_killed() {
        std::thread::sleep(Duration::from_millis(10 + rng.below(90)));
        match rng.below(8) {
            0 | 1 if img.snapshots.len() < 3 && rng.below(2) == 0 => {
                let name = format!("r{round}s{made}");
                made += 1;
                let args = json!({"device": "q", "name": name});
                ctx.mid_snapshot(true);
                run_cmd(ctx, mon, "blockdev-snapshot-internal-sync", args)?;
                ctx.mid_snapshot(false);
                img.snapshots.push(name);
            }
            0 | 1 if !img.snapshots.is_empty() => {
                let name = img.snapshots.remove(0);
                let args = json!({"device": "q", "name": name});
                ctx.mid_snapshot(true);
                run_cmd(ctx, mon, "blockdev-snapshot-delete-internal-sync", args)?;
                ctx.mid_snapshot(false);
            }
            2..=4 if !bitmap => {
                let gran = 4096u64 << rng.below(5);
                let args =
                    json!({"node": "q", "name": "b", "persistent": true, "granularity": gran});
                run_cmd(ctx, mon, "block-dirty-bitmap-add", args)?;
                bitmap = true;
            }
            2 | 3 => {
                let args = json!({"node": "q", "name": "b"});
                run_cmd(ctx, mon, "block-dirty-bitmap-clear", args)?;
            }
            4 => {
                let args = json!({"node": "q", "name": "b"});
                run_cmd(ctx, mon, "block-dirty-bitmap-remove", args)?;
                bitmap = false;
            }
            5 if img.size < MAX_SIZE => {
                let step = (1 + rng.below(4)) << 20;
                img.size = (img.size + step).min(MAX_SIZE);
                grow(ctx, mon, &mut img, io)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes the export (the client has gone), grows the node and adds
/// the export again under a new name.
fn grow(ctx: &Ctx, mon: &mut Mon, img: &mut Image, io: &Sender<Ctl>) -> Result<(), End> {
    let (ack, paused) = mpsc::channel();
    io.send(Ctl::Pause(ack)).map_err(|_| End::Killed)?;
    loop {
        match paused.recv_timeout(Duration::from_millis(50)) {
            Ok(()) => break,
            Err(RecvTimeoutError::Timeout) if !ctx.is_killed() => {}
            Err(_) => return Err(End::Killed),
        }
    }
    let id = format!("e{}", img.export);
    run_cmd(ctx, mon, "block-export-del", json!({"id": id}))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = run_cmd(ctx, mon, "query-block-exports", json!({}))?;
        if list.as_array().is_some_and(|l| l.is_empty()) {
            break;
        }
        if Instant::now() > deadline {
            return Err(End::Defect(format!("export {id} never went: {list}")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let args = json!({"node-name": "q", "size": img.size});
    run_cmd(ctx, mon, "block_resize", args)?;
    ctx.resized(img.size);
    img.export += 1;
    let (id, name) = (format!("e{}", img.export), format!("x{}", img.export));
    let args = json!({"type": "nbd", "id": id, "node-name": "q", "name": name, "writable": true});
    run_cmd(ctx, mon, "block-export-add", args)?;
    io.send(Ctl::Resume(name)).map_err(|_| End::Killed)
}
