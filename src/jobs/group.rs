//! A transaction group: the jobs one `transaction` with
//! `completion-mode: grouped` started (QEMU's JobTxn). They end together:
//!
//! - a job whose work succeeds waits (`waiting`) until every job of the
//!   group has finished its work; then all go to `pending`, and they
//!   conclude together, at once unless one of them has auto-finalize
//!   off, in which case job-finalize on any of them concludes them all;
//! - a job that fails or is cancelled makes the group abort: every
//!   other job is cancelled, and once the work of all has stopped they
//!   conclude (the one that failed with its error, the others
//!   cancelled); jobs that had already finished their work go to
//!   `aborting` only then.
//!
//! Pending and concluding go through the jobs newest first, as QEMU
//! walks its list. What a job gives back at its end (`on_end`: a
//! backup's bitmap, its hooks and users) waits for the group's outcome.
//!
//! Every step runs under the group's lock, from whichever job's actor
//! (or verb) caused it, and acts on the jobs' `JobArgs` directly.
use std::sync::{Arc, Mutex, MutexGuard};

use super::{JobArgs, Status, CANCELED};

#[derive(Default)]
pub struct Group {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Newest first; emptied once the group has concluded.
    jobs: Vec<Arc<JobArgs>>,
    /// A job failed or was cancelled: the group is aborting.
    aborting: bool,
}

/// The work of a job in this state is over (QEMU's job_is_completed).
fn work_over(s: Status) -> bool {
    matches!(
        s,
        Status::Waiting | Status::Pending | Status::Aborting | Status::Concluded | Status::Null
    )
}

impl Group {
    pub fn new() -> Arc<Group> {
        Arc::new(Group::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A new job joins (at its creation).
    pub fn add(&self, job: Arc<JobArgs>) {
        self.lock().jobs.insert(0, job);
    }

    /// `me`'s work is over with `result`.
    pub(super) fn work_ended(&self, me: &JobArgs, result: Result<(), String>) {
        let mut g = self.lock();
        let sh = &me.shared;
        if work_over(sh.status()) {
            return;
        }
        match result {
            Ok(()) if !sh.cancelled() && !g.aborting => {
                sh.set_busy(false);
                sh.set(Status::Waiting);
            }
            r => {
                let e = match r {
                    Err(e) if !sh.cancelled() => e,
                    _ => CANCELED.to_string(),
                };
                me.abort(&e);
                start_abort(&mut g, me);
            }
        }
        settle(&mut g);
    }

    /// job-cancel of `me` after its work was over (waiting or pending):
    /// the group aborts.
    pub(super) fn cancelled_after_work(&self, me: &JobArgs) {
        let mut g = self.lock();
        start_abort(&mut g, me);
        settle(&mut g);
    }

    /// job-finalize of a pending job: the whole group concludes.
    pub(super) fn finalize(&self) {
        let mut g = self.lock();
        if !g.aborting && g.jobs.iter().all(|j| j.shared.status() == Status::Pending) {
            conclude_all(&mut g, true);
        }
    }
}

/// The group aborts (once): every other job is cancelled for good; one
/// that never started, or only waits for its cancel, has stopped now.
fn start_abort(g: &mut Inner, me: &JobArgs) {
    if g.aborting {
        return;
    }
    g.aborting = true;
    for j in &g.jobs {
        if std::ptr::eq(Arc::as_ptr(j), me) {
            continue;
        }
        // A job whose work is over goes to aborting only as it
        // concludes.
        let status = j.shared.status();
        j.request_cancel(false);
        if status == Status::Created || j.idle(status) {
            j.abort(CANCELED);
        }
    }
}

/// Moves the group on once the work of every job is over: an aborting
/// group concludes; a successful one goes to pending, and concludes
/// unless a job waits for job-finalize.
fn settle(g: &mut Inner) {
    if g.jobs.is_empty() || !g.jobs.iter().all(|j| work_over(j.shared.status())) {
        return;
    }
    if g.aborting {
        conclude_all(g, false);
        return;
    }
    if g.jobs.iter().all(|j| j.shared.status() != Status::Waiting) {
        return;
    }
    for j in &g.jobs {
        j.to_pending();
    }
    if g.jobs.iter().all(|j| j.shared.auto_finalize) {
        conclude_all(g, true);
    }
}

/// Every job gives back what it held, told the group's outcome, and
/// concludes, newest first.
fn conclude_all(g: &mut Inner, ok: bool) {
    for j in std::mem::take(&mut g.jobs) {
        if ok {
            j.give_back(true);
            j.conclude();
            continue;
        }
        if j.shared.status() != Status::Aborting {
            j.abort(CANCELED);
        }
        j.give_back(false);
        j.conclude_aborted();
    }
}
