//! The backup job (blockdev-backup, sync=full): the target becomes the
//! source as it was when the job started, while the guest keeps writing.
//!
//! A bitmap marks the clusters still to copy. Copy-before-write: a hook
//! on the source stops each guest write until the old contents of the
//! clusters it touches are in the target. The job copies the other
//! clusters in the background. Both enter the clusters in a range
//! tracker (the job's copies serialising), so a background copy that
//! read a cluster writes it before a guest write can change it, and a
//! cluster is copied once.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use tokio::task::JoinSet;

use super::pace::Pace;
use super::{ErrorAction, JobFuture, OnError, Shared, Start, Status};
use crate::block::bitmap::DirtyBitmap;
use crate::block::driver::{IoFuture, WriteFlags, ZeroFlags};
use crate::block::error::BlockError;
use crate::block::hooks::{Guard, Hook, Request, Stage};
use crate::block::node::Node;
use crate::block::serial::Tracker;

const MAX_CHUNK: u64 = 1 << 20;

/// What the job and its hook share.
pub struct Copier {
    pub source: Weak<Node>,
    pub target: Arc<Node>,
    /// Clusters not yet in the target.
    pub todo: Arc<DirtyBitmap>,
    pub tracker: Arc<Tracker>,
    /// Bytes copied, by the job and the hook.
    pub done: AtomicU64,
}

use super::walk::strerror;

impl Copier {
    /// Copies the clusters of `off..end` still to copy; the caller holds
    /// the range in the tracker.
    async fn copy(&self, off: u64, end: u64) -> Result<(), (&'static str, BlockError)> {
        let Some(src) = self.source.upgrade() else {
            return Ok(());
        };
        let mut pos = off;
        while pos < end {
            let Some((run, len)) = self.todo.next_run(pos, MAX_CHUNK) else {
                return Ok(());
            };
            if run < pos || run >= end {
                return Ok(());
            }
            let len = len.min(end - run).min(src.size().saturating_sub(run));
            if len == 0 {
                return Ok(());
            }
            let mut buf = vec![0u8; len as usize];
            src.read(run, &mut buf).await.map_err(|e| ("read", e))?;
            let w = if buf.iter().all(|b| *b == 0) {
                self.target
                    .write_zeroes(run, len, ZeroFlags::default())
                    .await
            } else {
                self.target.write(run, &buf, WriteFlags::default()).await
            };
            w.map_err(|e| ("write", e))?;
            self.todo.clear(run, len);
            self.done.fetch_add(len, Ordering::Relaxed);
            pos = run + len;
        }
        Ok(())
    }

    /// The cluster-aligned range around `off..off+len`.
    fn aligned(&self, off: u64, len: u64) -> (u64, u64) {
        let g = self.todo.granularity();
        (off / g * g, off.saturating_add(len).div_ceil(g) * g)
    }
}

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
            let (start, end) = self.copier.aligned(req.offset, req.len);
            let g = self.copier.tracker.enter_owned(start, end, false).await;
            // The guest's write fails rather than spoil the backup.
            self.copier.copy(start, end).await.map_err(|(_, e)| e)?;
            Ok(Some(Box::new(g) as Guard))
        }))
    }
}

pub struct Backup {
    pub copier: Arc<Copier>,
    pub size: u64,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
}

pub fn start(b: Backup) -> Start {
    Box::new(move |sh: Arc<Shared>| {
        Box::pin(async move {
            // QEMU drains the source while it inserts its filter, which
            // pauses the new job once (before the command replies).
            if sh.status() == Status::Running {
                sh.set(Status::Paused);
                sh.set(Status::Running);
            }
            let rest: JobFuture = Box::pin(run(sh, b));
            Ok(rest)
        })
    })
}

/// Background copies in flight at once (QEMU's backup runs up to 64
/// workers).
const WORKERS: usize = 8;

type Done = (u64, u64, Result<(), (&'static str, BlockError)>);

async fn run(sh: Arc<Shared>, b: Backup) -> Result<(), String> {
    let c = &b.copier;
    let mut pace = Pace::new(MAX_CHUNK);
    let mut cursor = 0;
    let mut copies: JoinSet<Done> = JoinSet::new();
    let mut inflight: Vec<u64> = Vec::new();
    loop {
        let verb = sh.verb_arrived();
        tokio::pin!(verb);
        sh.set_progress(c.done.load(Ordering::Relaxed), b.size);
        sh.pause_point().await?;
        sh.crash_point();
        let mut delay = None;
        if copies.len() < WORKERS {
            match c.todo.next_run(cursor, MAX_CHUNK) {
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
        tokio::select! {
            Some(done) = copies.join_next(), if !copies.is_empty() => {
                let (off, end, r) = done.map_err(|e| format!("internal error: {e}"))?;
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
                        ErrorAction::Ignore => c.todo.clear(off, end - off),
                        // Copied again after the resume.
                        ErrorAction::Stop => cursor = cursor.min(off),
                    }
                }
            }
            _ = &mut verb => {}
            _ = pause => {}
        }
    }
    sh.set_busy(false);
    sh.set_progress(b.size, b.size);
    c.target.flush().await.map_err(|e| strerror(&e))
}
