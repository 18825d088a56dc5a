//! Jobs: QAPI's job state machine (state.rs), each job a supervised actor.
//!
//! A job's work runs in two parts, as a QEMU job coroutine does: `start`
//! runs before the command that created the job replies (so a job that
//! fails straight away reports `aborting` and `concluded` before the
//! reply, as QSD does), and returns the rest, which runs on a task of its
//! own. State lives in `Shared`, which query-jobs reads without an actor
//! hop; the actor applies the verbs and the end of the job.
pub mod create;
pub mod state;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::{json, Map, Value};

use crate::events::EventSink;
pub use state::{Status, Verb};

pub type JobFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
/// The part of a job that runs before the reply; it returns the rest.
pub type Start = Box<
    dyn FnOnce(Arc<Shared>) -> Pin<Box<dyn Future<Output = Result<JobFuture, String>> + Send>>
        + Send,
>;

/// Every job, newest first (query-jobs order).
pub type Jobs = Arc<Mutex<Vec<Arc<Shared>>>>;

pub use crate::block::progress::CANCELED;

struct Flags {
    status: Status,
    error: Option<String>,
    user_paused: bool,
    cancelled: bool,
}

/// What a job shares with its actor, its work and query-jobs.
pub struct Shared {
    pub id: String,
    pub kind: &'static str,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    flags: Mutex<Flags>,
    pub current: AtomicU64,
    pub total: AtomicU64,
    events: EventSink,
    wake: tokio::sync::Notify,
    /// Test hook: the job's work panics at its next crash point.
    crash: std::sync::atomic::AtomicBool,
    /// The newest command that started or steered this job; what the
    /// job's work does next waits until that command's reply is queued.
    pub gate: AtomicU64,
}

/// Jobs drive long block work through the block layer's progress trait.
impl crate::block::progress::Progress for Shared {
    fn cancelled(&self) -> bool {
        Shared::cancelled(self)
    }
    fn set_progress(&self, done: u64, total: u64) {
        Shared::set_progress(self, done, total)
    }
}

impl Shared {
    pub fn new(
        id: &str,
        kind: &'static str,
        auto_finalize: bool,
        auto_dismiss: bool,
        events: EventSink,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            id: id.to_string(),
            kind,
            auto_finalize,
            auto_dismiss,
            flags: Mutex::new(Flags {
                status: Status::Undefined,
                error: None,
                user_paused: false,
                cancelled: false,
            }),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            events,
            wake: tokio::sync::Notify::new(),
            crash: std::sync::atomic::AtomicBool::new(false),
            gate: AtomicU64::new(0),
        })
    }

    fn flags<R>(&self, f: impl FnOnce(&mut Flags) -> R) -> R {
        match self.flags.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    pub fn status(&self) -> Status {
        self.flags(|f| f.status)
    }

    /// Moves to `to` (QEMU's transition table must allow it) and emits
    /// JOB_STATUS_CHANGE.
    fn set(&self, to: Status) {
        let ok = self.flags(|f| {
            let ok = f.status.can_become(to);
            if ok {
                f.status = to;
            }
            ok
        });
        if !ok {
            tracing::warn!(job = %self.id, to = to.as_str(), "job transition refused");
            return;
        }
        let mut d = Map::new();
        d.insert("id".into(), json!(self.id));
        d.insert("status".into(), json!(to.as_str()));
        (self.events)("JOB_STATUS_CHANGE", d);
    }

    pub fn cancelled(&self) -> bool {
        self.flags(|f| f.cancelled)
    }

    /// Test hook (x-rsd-test-crash): panics here once a crash was asked.
    pub fn crash_point(&self) {
        if self.crash.load(Ordering::Relaxed) {
            panic!("test hook: job crash requested");
        }
    }

    pub fn set_progress(&self, current: u64, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.current.store(current, Ordering::Relaxed);
    }

    /// Where a job's work may pause: waits while the user paused it
    /// (running -> paused -> running) and fails once it is cancelled.
    pub async fn pause_point(&self) -> Result<(), String> {
        loop {
            // Registered before the flags are read: a resume or cancel
            // that comes in between still wakes it.
            let woken = self.wake.notified();
            let (cancelled, paused) = self.flags(|f| (f.cancelled, f.user_paused));
            if cancelled {
                return Err(CANCELED.into());
            }
            if !paused {
                return Ok(());
            }
            let back = self.status();
            let rest = if back == Status::Ready {
                Status::Standby
            } else {
                Status::Paused
            };
            self.set(rest);
            woken.await;
            self.set(back);
        }
    }

    /// JobInfo, with keys in QAPI order.
    pub fn info(&self) -> Value {
        let (status, error) = self.flags(|f| (f.status, f.error.clone()));
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("type".into(), json!(self.kind));
        m.insert("status".into(), json!(status.as_str()));
        m.insert(
            "current-progress".into(),
            json!(self.current.load(Ordering::Relaxed)),
        );
        m.insert(
            "total-progress".into(),
            json!(self.total.load(Ordering::Relaxed)),
        );
        if let Some(e) = error {
            m.insert("error".into(), json!(e));
        }
        Value::Object(m)
    }
}

pub enum JobMsg {
    /// Run the start part; reply when it is done (before the command's
    /// reply).
    Start(RpcReplyPort<()>),
    Verb(Verb, RpcReplyPort<Result<(), String>>),
    /// The rest of the job ended.
    Finished(Result<(), String>),
    /// Test hook: make the job's work panic.
    Crash,
}

pub struct JobArgs {
    pub shared: Arc<Shared>,
    pub start: Mutex<Option<Start>>,
    pub jobs: Jobs,
    /// Replies queued so far (see `Shared::gate`); None in unit tests.
    pub replied: Option<tokio::sync::watch::Receiver<u64>>,
    /// Runs once the work is over: gives back what the job held (its
    /// users of block nodes).
    pub on_end: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

#[derive(Clone)]
pub struct JobActor;

pub fn registry_name(id: &str) -> String {
    format!("job/{id}")
}

fn panic_text(e: tokio::task::JoinError) -> String {
    if e.is_cancelled() {
        return CANCELED.into();
    }
    let p = e.into_panic();
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    format!("internal error: the job failed unexpectedly ({what})")
}

impl JobActor {
    /// The end of a job: success goes waiting -> pending (-> concluded),
    /// failure or cancel aborting -> concluded with the error.
    fn finish(&self, myself: &ActorRef<JobMsg>, a: &JobArgs, result: Result<(), String>) {
        if let Some(end) = a.on_end.lock().ok().and_then(|mut e| e.take()) {
            end();
        }
        let sh = &a.shared;
        let result = if sh.cancelled() {
            Err(CANCELED.to_string())
        } else {
            result
        };
        match result {
            Ok(()) => {
                sh.set(Status::Waiting);
                sh.set(Status::Pending);
                if sh.auto_finalize {
                    self.conclude(myself, a);
                }
            }
            Err(e) => {
                let msg = crate::qapi::error::without_hints(&e).to_string();
                sh.flags(|f| f.error = Some(msg));
                sh.set(Status::Aborting);
                self.conclude(myself, a);
            }
        }
    }

    fn conclude(&self, myself: &ActorRef<JobMsg>, a: &JobArgs) {
        a.shared.set(Status::Concluded);
        if a.shared.auto_dismiss {
            self.dismiss(myself, a);
        }
    }

    fn dismiss(&self, myself: &ActorRef<JobMsg>, a: &JobArgs) {
        a.shared.set(Status::Null);
        if let Ok(mut j) = a.jobs.lock() {
            j.retain(|s| !Arc::ptr_eq(s, &a.shared));
        }
        myself.stop(None);
    }

    fn verb(&self, myself: &ActorRef<JobMsg>, a: &JobArgs, verb: Verb) -> Result<(), String> {
        let sh = &a.shared;
        let status = sh.status();
        let refused = || state::refused(&sh.id, status, verb);
        match verb {
            Verb::Pause => {
                if !status.accepts(verb) {
                    return Err(refused());
                }
                sh.flags(|f| {
                    if f.user_paused {
                        Err("Job is already paused".to_string())
                    } else {
                        f.user_paused = true;
                        Ok(())
                    }
                })
            }
            Verb::Resume => {
                if !sh.flags(|f| f.user_paused) {
                    return Err("Can't resume a job that was not paused".into());
                }
                if !status.accepts(verb) {
                    return Err(refused());
                }
                sh.flags(|f| f.user_paused = false);
                sh.wake.notify_waiters();
                Ok(())
            }
            Verb::Cancel => {
                if !status.accepts(verb) {
                    return Err(refused());
                }
                sh.flags(|f| f.cancelled = true);
                sh.wake.notify_waiters();
                if status == Status::Pending {
                    // Waiting for job-finalize: cancel ends it now.
                    self.finish(myself, a, Err(CANCELED.into()));
                }
                Ok(())
            }
            Verb::Finalize => {
                if !status.accepts(verb) {
                    return Err(refused());
                }
                self.conclude(myself, a);
                Ok(())
            }
            Verb::Dismiss => {
                if !status.accepts(verb) {
                    return Err(refused());
                }
                self.dismiss(myself, a);
                Ok(())
            }
            Verb::Complete | Verb::SetSpeed | Verb::Change => {
                if !status.accepts(verb) {
                    return Err(refused());
                }
                // No job type rsd runs so far can be completed or tuned.
                Err(match verb {
                    Verb::Complete => {
                        format!("The active block job '{}' cannot be completed", sh.id)
                    }
                    _ => format!(
                        "Job '{}' does not support command verb '{}'",
                        sh.id,
                        verb.as_str()
                    ),
                })
            }
        }
    }
}

impl Actor for JobActor {
    type Msg = JobMsg;
    type State = Arc<JobArgs>;
    type Arguments = Arc<JobArgs>;

    async fn pre_start(
        &self,
        _myself: ActorRef<JobMsg>,
        args: Arc<JobArgs>,
    ) -> Result<Arc<JobArgs>, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<JobMsg>,
        msg: JobMsg,
        a: &mut Arc<JobArgs>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            JobMsg::Start(reply) => {
                let sh = a.shared.clone();
                sh.set(Status::Created);
                sh.set(Status::Running);
                let start = a.start.lock().ok().and_then(|mut s| s.take());
                let first = match start {
                    // Its own task, so a panic is a failed job, not a lost one.
                    Some(start) => tokio::spawn(start(sh.clone())).await.map_err(panic_text),
                    None => Err("internal error: job started twice".into()),
                };
                match first.and_then(|r| r) {
                    Ok(rest) => {
                        let me = myself.clone();
                        let (replied, sh) = (a.replied.clone(), a.shared.clone());
                        tokio::spawn(async move {
                            after_reply(&replied, &sh).await;
                            let r = tokio::spawn(rest).await.map_err(panic_text).and_then(|r| r);
                            // Its end follows the reply of a cancel too.
                            after_reply(&replied, &sh).await;
                            let _ = me.cast(JobMsg::Finished(r));
                        });
                    }
                    Err(e) => self.finish(&myself, a, Err(e)),
                }
                let _ = reply.send(());
            }
            JobMsg::Verb(verb, reply) => {
                let _ = reply.send(self.verb(&myself, a, verb));
            }
            JobMsg::Finished(r) => self.finish(&myself, a, r),
            JobMsg::Crash => a.shared.crash.store(true, Ordering::Relaxed),
        }
        Ok(())
    }
}

/// Waits (bounded, in case a client went away) until the reply of the
/// last command that touched the job is queued: in QEMU a job's work runs
/// after the command's reply, and so do its events.
async fn after_reply(replied: &Option<tokio::sync::watch::Receiver<u64>>, sh: &Shared) {
    if let Some(mut r) = replied.clone() {
        let seq = sh.gate.load(Ordering::Acquire);
        let wait = r.wait_for(|v| *v >= seq);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), wait).await;
    }
}

/// QEMU's rule for job ids: a letter, then letters, digits, '-', '.', '_'.
pub fn check_id(id: &str) -> Result<(), String> {
    crate::objects::check_id(id).map_err(|_| format!("Invalid job ID '{id}'"))
}
