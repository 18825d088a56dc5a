//! The backup job (blockdev-backup, drive-backup): the target becomes
//! the source as it was when the job started, while the guest keeps
//! writing.
//!
//! The copying is the block layer's `Copier`: a hook on the source
//! copies a cluster's old contents to the target before a guest write
//! changes it (copy-before-write), and this job copies the other
//! clusters in the background (sync=full, and sync=top for what the top
//! layer allocates). With sync=none there is no background copy: the job
//! only keeps copy-before-write running until it is cancelled, which is
//! how image fleecing used it.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::task::JoinSet;

use super::pace::Pace;
use super::{ErrorAction, JobFuture, OnError, Shared, Start};
use crate::block::copier::Copier;
use crate::block::driver::IoFuture;
use crate::block::error::BlockError;
use crate::block::hooks::{Guard, Hook, Request, Stage};

/// Copy-before-write on the source.
pub struct CbwHook {
    pub name: String,
    pub copier: Arc<Copier>,
}

impl Hook for CbwHook {
    fn name(&self) -> &str {
        &self.name
    }
    fn stage(&self) -> Stage {
        Stage::Intercept
    }
    fn before<'a>(&'a self, req: &'a Request) -> Option<IoFuture<'a, Option<Guard>>> {
        if !req.op.changes() {
            return None;
        }
        Some(Box::pin(async move {
            // The guest's write fails rather than spoil the backup.
            self.copier.before_write(req.offset, req.len).await?;
            Ok(None)
        }))
    }
}

/// On a target whose backing chain holds the source (fleecing): a read
/// of the target may go through to the source, so it holds its clusters
/// in the copier's tracker and a copy-before-write (with the guest write
/// behind it) waits until the read is done.
pub struct ViewReadHook {
    pub name: String,
    pub copier: Arc<Copier>,
}

impl Hook for ViewReadHook {
    fn name(&self) -> &str {
        &self.name
    }
    fn stage(&self) -> Stage {
        Stage::Intercept
    }
    fn before<'a>(&'a self, req: &'a Request) -> Option<IoFuture<'a, Option<Guard>>> {
        if req.op != crate::block::hooks::Op::Read {
            return None;
        }
        Some(Box::pin(async move {
            let (start, end) = self.copier.aligned(req.offset, req.len);
            let g = self.copier.tracker.enter_owned(start, end, false).await;
            Ok(Some(Box::new(g) as Guard))
        }))
    }
}

pub struct Backup {
    pub copier: Arc<Copier>,
    pub size: u64,
    /// sync=full or top: copy what `copier.todo` marks in the background.
    /// sync=none: only copy-before-write, until cancelled.
    pub background: bool,
    /// Background copies in flight at once.
    pub workers: usize,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
}

pub fn start(b: Backup) -> Start {
    Box::new(move |sh: Arc<Shared>| {
        Box::pin(async move {
            // QEMU drains the source while it inserts its filter, which
            // pauses the new job once (before the command replies).
            sh.start_drained();
            let total = if b.background {
                b.copier.todo.dirty_bytes().min(b.size)
            } else {
                b.size
            };
            sh.set_progress(0, total);
            sh.ends_on_cancel.store(!b.background, Ordering::Release);
            let rest: JobFuture = if b.background {
                Box::pin(run(sh, b, total))
            } else {
                Box::pin(until_cancelled(sh, b))
            };
            Ok(rest)
        })
    })
}

/// Background copies in flight at once unless x-perf says otherwise
/// (QEMU's backup runs up to 64 workers).
pub const WORKERS: usize = 8;

type Done = (u64, u64, Result<(), (&'static str, BlockError)>);

/// sync=none: copy-before-write runs in the hook; the job waits for its
/// cancel, showing the bytes copied so far.
async fn until_cancelled(sh: Arc<Shared>, b: Backup) -> Result<(), String> {
    loop {
        let verb = sh.verb_arrived();
        let copied = b.copier.copied.notified();
        sh.set_progress(b.copier.done.load(Ordering::Relaxed), b.size);
        sh.pause_point().await?;
        tokio::select! {
            _ = verb => {}
            _ = copied => {}
        }
    }
}

async fn run(sh: Arc<Shared>, b: Backup, total: u64) -> Result<(), String> {
    let mut copies: JoinSet<Done> = JoinSet::new();
    let r = copy_all(&sh, &b, total, &mut copies).await;
    // The copies in flight finish even when the job fails or is
    // cancelled, as QEMU's block-copy waits for its tasks: what they
    // copied counts (a bitmap-mode=always bitmap drops it).
    while copies.join_next().await.is_some() {}
    let c = &b.copier;
    sh.set_busy(false);
    sh.set_progress(c.done.load(Ordering::Relaxed).min(total), total);
    r?;
    sh.set_progress(total, total);
    c.target.flush().await.map_err(|e| strerror(&e))
}

/// The background copy, `workers` chunks in flight at once.
async fn copy_all(
    sh: &Shared,
    b: &Backup,
    total: u64,
    copies: &mut JoinSet<Done>,
) -> Result<(), String> {
    let c = &b.copier;
    // No burst: a chunk goes, and the next once its time is paid, as
    // QSD's backup does (it copies one chunk, then sleeps).
    let mut pace = Pace::new(1);
    let mut cursor = 0;
    let mut inflight: Vec<u64> = Vec::new();
    let workers = b.workers.max(1);
    loop {
        let verb = sh.verb_arrived();
        tokio::pin!(verb);
        sh.set_progress(c.done.load(Ordering::Relaxed).min(total), total);
        sh.pause_point().await?;
        sh.crash_point();
        let mut delay = None;
        if copies.len() < workers {
            match c.todo.next_run(cursor, c.chunk) {
                Some((off, len)) if !inflight.contains(&off) => match pace.delay(sh.speed()) {
                    Some(d) => delay = Some(d),
                    None => {
                        let end = (off + len).min(b.size);
                        let c2 = c.clone();
                        copies.spawn(async move {
                            let held = c2.tracker.enter_owned(off, end, true).await;
                            let r = c2.copy(off, end).await;
                            drop(held);
                            (off, end, r)
                        });
                        inflight.push(off);
                        pace.account(end - off);
                        cursor = end;
                        sh.set_busy(true);
                        continue;
                    }
                },
                None if copies.is_empty() => break,
                // What is left is in flight already.
                _ => {}
            }
        }
        let pause = async {
            match delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        // Only waiting (its rate limit, or a verb): a cancel may end the
        // job at once, before its reply, as QEMU's sleeping job ends.
        sh.ends_on_cancel
            .store(copies.is_empty(), Ordering::Release);
        let woken = tokio::select! {
            Some(done) = copies.join_next(), if !copies.is_empty() => Some(done),
            _ = &mut verb => None,
            _ = pause => None,
        };
        sh.ends_on_cancel.store(false, Ordering::Release);
        if let Some(done) = woken {
            let (off, _end, r) = done.map_err(|e| format!("internal error: {e}"))?;
            inflight.retain(|o| *o != off);
            if copies.is_empty() {
                sh.set_busy(false);
            }
            if let Err((op, e)) = r {
                let policy = if op == "read" {
                    b.on_source_error
                } else {
                    b.on_target_error
                };
                match sh.io_error(op, policy, e.errno) {
                    ErrorAction::Report => return Err(strerror(&e)),
                    // Copied again: at once when ignored (QEMU's backup
                    // retries the chunk), after the resume when stopped.
                    ErrorAction::Ignore | ErrorAction::Stop => cursor = cursor.min(off),
                }
            }
        }
    }
    Ok(())
}

use super::walk::strerror;
