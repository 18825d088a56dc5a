//! The end of a job: its work is over (success, failure or cancel), it
//! goes to pending or aborting, and it concludes. These act on a job's
//! `JobArgs` rather than through its actor, so a transaction group
//! (group.rs) can end all of its jobs together, in one step and in
//! QEMU's order.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Map};

use super::{state, JobArgs, Status, Verb, CANCELED};

impl JobArgs {
    /// The job's work is over with `result`. A job of a group leaves the
    /// rest to the group; a job alone gives back what it held (`on_end`),
    /// then success goes waiting -> pending (-> concluded), failure or
    /// cancel aborting -> concluded with the error. Block jobs announce
    /// it as QEMU does (BLOCK_JOB_PENDING without auto-finalize;
    /// BLOCK_JOB_COMPLETED, or BLOCK_JOB_CANCELLED for a job cancelled
    /// for good).
    pub(super) fn finish(&self, result: Result<(), String>) {
        if let Some(g) = &self.group {
            g.work_ended(self, result);
            return;
        }
        let sh = &self.shared;
        let cancelled = sh.cancelled();
        self.give_back(result.is_ok() && !cancelled);
        let result = if cancelled {
            Err(CANCELED.to_string())
        } else {
            result
        };
        sh.set_busy(false);
        match result {
            Ok(()) => {
                sh.set(Status::Waiting);
                self.to_pending();
                if sh.auto_finalize {
                    self.conclude();
                }
            }
            Err(e) => {
                self.abort(&e);
                self.conclude_aborted();
            }
        }
    }

    /// Runs `on_end` once, told whether the job (or its group) succeeded.
    pub(super) fn give_back(&self, ok: bool) {
        if let Some(end) = self.on_end.lock().ok().and_then(|mut e| e.take()) {
            end(ok);
        }
    }

    /// waiting -> pending, with BLOCK_JOB_PENDING when the job waits for
    /// job-finalize.
    pub(super) fn to_pending(&self) {
        let sh = &self.shared;
        sh.set(Status::Pending);
        if !sh.auto_finalize && sh.block.is_some() {
            let mut d = Map::new();
            d.insert("type".into(), json!(sh.kind));
            d.insert("id".into(), json!(sh.id));
            (sh.events)("BLOCK_JOB_PENDING", d);
        }
    }

    /// Records the job's error and moves it to aborting (once: QEMU
    /// announces only a change of state).
    pub(super) fn abort(&self, e: &str) {
        let sh = &self.shared;
        let msg = crate::qapi::error::without_hints(e).to_string();
        sh.flags(|f| {
            if f.error.is_none() {
                f.error = Some(msg);
            }
        });
        sh.set_busy(false);
        if sh.status() != Status::Aborting {
            sh.set(Status::Aborting);
        }
    }

    /// An aborting job concludes: BLOCK_JOB_CANCELLED for a job
    /// cancelled for good, else BLOCK_JOB_COMPLETED with its error; a
    /// job that never ran announces neither (QEMU emits them only for
    /// started jobs).
    pub(super) fn conclude_aborted(&self) {
        let sh = &self.shared;
        if sh.started() {
            if sh.cancelled() {
                sh.block_event("BLOCK_JOB_CANCELLED", None);
            } else {
                let e = sh.flags(|f| f.error.clone()).unwrap_or_default();
                sh.block_event("BLOCK_JOB_COMPLETED", Some(&e));
            }
        }
        self.conclude();
    }

    pub(super) fn conclude(&self) {
        if self.shared.status() == Status::Pending {
            self.shared.block_event("BLOCK_JOB_COMPLETED", None);
        }
        self.shared.set(Status::Concluded);
        if self.shared.auto_dismiss {
            self.dismiss();
        }
    }

    pub(super) fn dismiss(&self) {
        self.shared.set(Status::Null);
        if let Ok(mut j) = self.jobs.lock() {
            j.retain(|s| !Arc::ptr_eq(s, &self.shared));
        }
        if let Some(a) = self.actor.get() {
            a.stop(None);
        }
    }

    /// job-finalize: the job (with its whole group) concludes.
    pub(super) fn finalize(&self) -> Result<(), String> {
        let status = self.shared.status();
        if !status.accepts(Verb::Finalize) {
            return Err(state::refused(&self.shared.id, status, Verb::Finalize));
        }
        match &self.group {
            Some(g) => g.finalize(),
            None => self.conclude(),
        }
        Ok(())
    }

    /// A cancel: `force` false on a ready job that can complete lets it
    /// finish without its final switch; otherwise the job aborts. Either
    /// way a user pause is lifted. A job that only waits ends now.
    pub(super) fn cancel(&self, force: bool) -> Result<(), String> {
        let sh = &self.shared;
        let status = sh.status();
        if !status.accepts(Verb::Cancel) {
            return Err(state::refused(&sh.id, status, Verb::Cancel));
        }
        let completable = sh.block.as_ref().is_some_and(|b| b.completable);
        let soft = !force && completable && matches!(status, Status::Ready | Status::Standby);
        self.request_cancel(soft);
        match status {
            // Its work is over already: the job (and its group) aborts.
            Status::Waiting | Status::Pending => match &self.group {
                Some(g) => g.cancelled_after_work(self),
                None => self.finish(Err(CANCELED.into())),
            },
            // Never started, or waiting for nothing but the cancel.
            _ if status == Status::Created || self.idle(status) => {
                self.finish(Err(CANCELED.into()))
            }
            _ => {}
        }
        Ok(())
    }

    /// Marks the job cancelled (or soft-cancelled), lifts a user pause
    /// and wakes its work.
    pub(super) fn request_cancel(&self, soft: bool) {
        let sh = &self.shared;
        sh.flags(|f| {
            if soft {
                f.soft_cancelled = true;
            } else {
                f.cancelled = true;
            }
            f.user_paused = false;
        });
        if sh.block.is_some() {
            sh.resume_now();
        }
        sh.wake.notify_waiters();
    }

    /// The job's work only waits for its cancel (`ends_on_cancel`), so a
    /// cancel ends it at once, as QEMU ends an idle job within the
    /// command.
    pub(super) fn idle(&self, status: Status) -> bool {
        self.shared.ends_on_cancel.load(Ordering::Acquire)
            && matches!(status, Status::Running | Status::Paused)
    }
}
