//! Jobs: QAPI's job state machine (state.rs), each job a supervised actor.
//!
//! A job's work runs in two parts, as a QEMU job coroutine does: `start`
//! runs before the command that created the job replies (so a job that
//! fails straight away reports `aborting` and `concluded` before the
//! reply, as QSD does), and returns the rest, which runs on a task of its
//! own. State lives in `Shared`, which query-jobs reads without an actor
//! hop; the actor applies the verbs and the end of the job.
pub mod backup;
pub mod commit;
pub mod create;
mod end;
pub mod group;
pub mod mirror;
pub mod pace;
pub mod state;
pub mod stream;
#[cfg(test)]
mod tests;
pub mod walk;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::{json, Map, Value};
use tracing::Instrument;

use crate::events::EventSink;
pub use state::{Status, Verb};

pub type JobFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
/// The part of a job that runs before the reply; it returns the rest.
pub type Start = Box<
    dyn FnOnce(Arc<Shared>) -> Pin<Box<dyn Future<Output = Result<JobFuture, String>> + Send>>
        + Send,
>;

/// Runs when a job's work is over, told whether it succeeded.
pub type OnEnd = Box<dyn FnOnce(bool) + Send>;

/// Every job, newest first (query-jobs order).
pub type Jobs = Arc<Mutex<Vec<Arc<Shared>>>>;

pub use crate::block::progress::CANCELED;

struct Flags {
    status: Status,
    error: Option<String>,
    user_paused: bool,
    /// Cancelled for good (QEMU's force cancel): the job aborts.
    cancelled: bool,
    /// block-job-cancel without force on a ready job that can complete:
    /// it ends successfully, without its final switch (a mirror's pivot).
    soft_cancelled: bool,
    /// job-complete was accepted.
    complete: bool,
    /// The io-status a stopping I/O error left ("failed", or "nospace"
    /// for ENOSPC, as QEMU's block_job_iostatus_set_err); None: "ok".
    io_failed: Option<&'static str>,
    /// It has run (QEMU announces the end only of a job that started).
    started: bool,
}

/// BlockdevOnError: what a block job does on an I/O error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    Report,
    Ignore,
    Enospc,
    Stop,
    Auto,
}

impl OnError {
    pub fn parse(s: Option<&str>) -> OnError {
        match s {
            Some("ignore") => OnError::Ignore,
            Some("enospc") => OnError::Enospc,
            Some("stop") => OnError::Stop,
            Some("auto") => OnError::Auto,
            _ => OnError::Report,
        }
    }
}

/// BlockErrorAction: what was done about one error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorAction {
    Ignore,
    Report,
    Stop,
}

impl ErrorAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Ignore => "ignore",
            ErrorAction::Report => "report",
            ErrorAction::Stop => "stop",
        }
    }
}

/// What a block job adds to a job (query-block-jobs, BLOCK_JOB_* events).
pub struct BlockJob {
    /// The job can be completed (mirror, active commit): READY, then
    /// job-complete or a soft cancel.
    pub completable: bool,
    /// Bytes per second; 0 is unlimited.
    pub speed: AtomicU64,
    /// Between requests of its own (QEMU's `busy`).
    pub busy: std::sync::atomic::AtomicBool,
    /// A mirror's copy mode: false background, true write-blocking.
    pub write_blocking: std::sync::atomic::AtomicBool,
    /// A write-blocking mirror has reached the point where every guest
    /// write is copied at once.
    pub actively_synced: std::sync::atomic::AtomicBool,
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
    /// Present for block jobs.
    pub block: Option<BlockJob>,
    /// The job's work only waits for its cancel (a sync=none backup): a
    /// cancel ends the job before its reply, as QEMU's idle job does.
    pub ends_on_cancel: std::sync::atomic::AtomicBool,
    /// A transaction holds the job's node drained until every action is
    /// committed (see `start_drained`).
    held: std::sync::atomic::AtomicBool,
    /// The job's span while traces are on, from its creation (a child of
    /// the command that created it) until it concludes.
    span: Mutex<Option<tracing::Span>>,
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
        Self::build(id, kind, auto_finalize, auto_dismiss, events, None)
    }

    /// A block job: listed by query-block-jobs, with BLOCK_JOB_* events.
    pub fn new_block(
        id: &str,
        kind: &'static str,
        auto_finalize: bool,
        auto_dismiss: bool,
        events: EventSink,
        completable: bool,
        speed: u64,
    ) -> Arc<Shared> {
        let b = BlockJob {
            completable,
            speed: AtomicU64::new(speed),
            busy: Default::default(),
            write_blocking: Default::default(),
            actively_synced: Default::default(),
        };
        Self::build(id, kind, auto_finalize, auto_dismiss, events, Some(b))
    }

    fn build(
        id: &str,
        kind: &'static str,
        auto_finalize: bool,
        auto_dismiss: bool,
        events: EventSink,
        block: Option<BlockJob>,
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
                soft_cancelled: false,
                complete: false,
                io_failed: None,
                started: false,
            }),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            events,
            wake: tokio::sync::Notify::new(),
            crash: std::sync::atomic::AtomicBool::new(false),
            gate: AtomicU64::new(0),
            block,
            ends_on_cancel: std::sync::atomic::AtomicBool::new(false),
            held: std::sync::atomic::AtomicBool::new(false),
            span: Mutex::new(job_span(id, kind)),
        })
    }

    /// The job's span (a disabled one once it has ended or while traces
    /// are off): its work runs inside it, so slow requests it makes are
    /// its children.
    pub fn span(&self) -> tracing::Span {
        self.span
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .unwrap_or_else(tracing::Span::none)
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
                f.started |= to == Status::Running;
            }
            ok
        });
        if !ok {
            tracing::warn!(job = %self.id, to = to.as_str(), "job transition refused");
            return;
        }
        self.traced(to);
        if to == Status::Concluded {
            // Its copy buffers are gone.
            crate::util::trim_memory_soon();
        }
        let mut d = Map::new();
        d.insert("id".into(), json!(self.id));
        d.insert("status".into(), json!(to.as_str()));
        (self.events)("JOB_STATUS_CHANGE", d);
    }

    /// The operator's log line for a transition, which is also the
    /// event on the job's span; the span ends when the job concludes,
    /// with the error if it failed.
    fn traced(&self, to: Status) {
        let span = self.span();
        tracing::info!(
            target: "job_status_change",
            parent: &span,
            job = %self.id,
            job_type = self.kind,
            status = to.as_str(),
            "job status change"
        );
        if to == Status::Concluded {
            if let Some(e) = self.flags(|f| f.error.clone()) {
                span.record("job.error", e.as_str());
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", e.as_str());
            }
            if let Ok(mut s) = self.span.lock() {
                s.take();
            }
        }
    }

    pub fn cancelled(&self) -> bool {
        self.flags(|f| f.cancelled)
    }

    /// The job has run (it was not cancelled while only created).
    pub fn started(&self) -> bool {
        self.flags(|f| f.started)
    }

    /// QEMU drains a new job's node while it starts, which pauses the
    /// job once before the command replies: running -> paused -> running.
    /// A transaction keeps the drain until every action is committed, so
    /// a held job stays paused until `release`.
    pub fn start_drained(&self) {
        if self.status() == Status::Running {
            self.set(Status::Paused);
            if !self.held.load(Ordering::Acquire) {
                self.set(Status::Running);
            }
        }
    }

    /// A transaction will start this job inside its drain.
    pub fn hold(&self) {
        self.held.store(true, Ordering::Release);
    }

    /// The transaction's drain ends: a held job runs again.
    pub fn release(&self) {
        if self.held.swap(false, Ordering::AcqRel) && self.status() == Status::Paused {
            self.set(Status::Running);
        }
    }

    /// The job should finish its work now: job-complete, or a soft
    /// cancel (which finishes without the final switch).
    pub fn should_finish(&self) -> bool {
        self.flags(|f| f.complete || f.soft_cancelled)
    }

    /// job-complete was given (not a soft cancel).
    pub fn completing(&self) -> bool {
        self.flags(|f| f.complete && !f.soft_cancelled && !f.cancelled)
    }

    /// Woken by every verb: a job waiting for something else (new guest
    /// writes, its rate limit) also waits for this.
    pub fn verb_arrived(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    /// Bytes per second, 0 for none.
    pub fn speed(&self) -> u64 {
        self.block
            .as_ref()
            .map_or(0, |b| b.speed.load(Ordering::Relaxed))
    }

    pub fn set_busy(&self, busy: bool) {
        if let Some(b) = &self.block {
            b.busy.store(busy, Ordering::Relaxed);
        }
    }

    /// QEMU drains every node when it quits, and a block job pauses and
    /// resumes around that drain: running -> paused -> running, ready ->
    /// standby -> ready, as QSD's events show.
    pub fn drain_blip(&self) {
        if self.block.is_none() {
            return;
        }
        match self.status() {
            Status::Running => {
                self.set(Status::Paused);
                self.set(Status::Running);
            }
            Status::Ready => {
                self.set(Status::Standby);
                self.set(Status::Ready);
            }
            _ => {}
        }
    }

    /// A block job pauses at once (QEMU enters an idle job, which pauses
    /// before the command replies): running -> paused, ready -> standby.
    fn pause_now(&self) {
        match self.status() {
            Status::Running => self.set(Status::Paused),
            Status::Ready => self.set(Status::Standby),
            _ => {}
        }
    }

    /// And resumes at once: paused -> running, standby -> ready.
    fn resume_now(&self) {
        match self.status() {
            Status::Paused => self.set(Status::Running),
            Status::Standby => self.set(Status::Ready),
            _ => {}
        }
    }

    /// running -> ready, with BLOCK_JOB_READY.
    pub fn set_ready(&self) {
        if self.status() == Status::Running {
            self.set(Status::Ready);
            self.block_event("BLOCK_JOB_READY", None);
        }
    }

    /// An I/O error under the job's `on-*-error` policy (QEMU's
    /// block_job_error_action): BLOCK_JOB_ERROR, and for `stop` the job
    /// pauses with io-status "failed" ("nospace" for ENOSPC) until
    /// resumed. Returns the action.
    pub fn io_error(&self, op: &str, policy: OnError, errno: i32) -> ErrorAction {
        let action = match policy {
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Report => ErrorAction::Report,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto if errno == nix::libc::ENOSPC => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto => ErrorAction::Report,
        };
        let mut d = Map::new();
        d.insert("device".into(), json!(self.id));
        d.insert("operation".into(), json!(op));
        d.insert("action".into(), json!(action.as_str()));
        (self.events)("BLOCK_JOB_ERROR", d);
        if action == ErrorAction::Stop {
            self.flags(|f| {
                f.io_failed = Some(if errno == nix::libc::ENOSPC {
                    "nospace"
                } else {
                    "failed"
                });
                f.user_paused = true;
            });
            self.pause_now();
        }
        action
    }

    /// A BLOCK_JOB_* event with the job's progress and speed.
    fn block_event(&self, name: &str, error: Option<&str>) {
        if self.block.is_none() {
            return;
        }
        let mut d = Map::new();
        d.insert("device".into(), json!(self.id));
        d.insert("len".into(), json!(self.total.load(Ordering::Relaxed)));
        d.insert("offset".into(), json!(self.current.load(Ordering::Relaxed)));
        d.insert("speed".into(), json!(self.speed()));
        d.insert("type".into(), json!(self.kind));
        if let Some(e) = error {
            d.insert("error".into(), json!(e));
        }
        (self.events)(name, d);
    }

    /// BlockJobInfo for query-block-jobs (None for other jobs).
    pub fn block_info(&self) -> Option<Value> {
        let b = self.block.as_ref()?;
        let (status, paused, io_failed, error) =
            self.flags(|f| (f.status, f.user_paused, f.io_failed, f.error.clone()));
        let mut m = Map::new();
        m.insert("auto-finalize".into(), json!(self.auto_finalize));
        m.insert("io-status".into(), json!(io_failed.unwrap_or("ok")));
        m.insert("device".into(), json!(self.id));
        m.insert("auto-dismiss".into(), json!(self.auto_dismiss));
        // A paused job waits at its pause point, between requests of its
        // own, as QEMU's paused coroutine does.
        let waiting = matches!(status, Status::Paused | Status::Standby);
        m.insert(
            "busy".into(),
            json!(b.busy.load(Ordering::Relaxed) && !waiting),
        );
        m.insert("len".into(), json!(self.total.load(Ordering::Relaxed)));
        m.insert("offset".into(), json!(self.current.load(Ordering::Relaxed)));
        m.insert("status".into(), json!(status.as_str()));
        m.insert("paused".into(), json!(paused));
        m.insert("speed".into(), json!(self.speed()));
        m.insert(
            "ready".into(),
            json!(matches!(status, Status::Ready | Status::Standby)),
        );
        m.insert("type".into(), json!(self.kind));
        if self.kind == "mirror" {
            m.insert(
                "actively-synced".into(),
                json!(b.actively_synced.load(Ordering::Relaxed)),
            );
        }
        if let Some(e) = error {
            m.insert("error".into(), json!(e));
        }
        Some(Value::Object(m))
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
            self.crash_point();
            let (cancelled, paused) = self.flags(|f| (f.cancelled, f.user_paused));
            if cancelled {
                return Err(CANCELED.into());
            }
            if !paused {
                return Ok(());
            }
            if self.block.is_some() {
                // A block job changed state with the verb already.
                woken.await;
                continue;
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
    /// The job is created (`created`), to be started by `Start`.
    Create(RpcReplyPort<()>),
    /// Run the start part; reply when it is done (before the command's
    /// reply).
    Start(RpcReplyPort<()>),
    Verb(Verb, RpcReplyPort<Result<(), String>>),
    /// block-job-cancel: `force` false lets a ready job finish instead.
    Cancel(bool, RpcReplyPort<Result<(), String>>),
    /// block-job-set-speed, in bytes per second.
    SetSpeed(i64, RpcReplyPort<Result<(), String>>),
    /// block-job-change of a mirror's copy mode (true: write-blocking).
    ChangeCopyMode(bool, RpcReplyPort<Result<(), String>>),
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
    /// Runs once the job ends, told whether it succeeded: gives back
    /// what the job held (its users of block nodes) and makes its graph
    /// changes. A job alone runs it when its work is over, a job of a
    /// group when the group concludes.
    pub on_end: Mutex<Option<OnEnd>>,
    /// The transaction group the job belongs to (completion-mode
    /// grouped).
    pub group: Option<Arc<group::Group>>,
    /// The job's actor, set as it starts (dismiss stops it).
    pub actor: OnceLock<ActorRef<JobMsg>>,
}

impl JobArgs {
    pub fn new(
        shared: Arc<Shared>,
        start: Start,
        jobs: Jobs,
        replied: Option<tokio::sync::watch::Receiver<u64>>,
        on_end: OnEnd,
        group: Option<Arc<group::Group>>,
    ) -> Arc<JobArgs> {
        Arc::new(JobArgs {
            shared,
            start: Mutex::new(Some(start)),
            jobs,
            replied,
            on_end: Mutex::new(Some(on_end)),
            group,
            actor: OnceLock::new(),
        })
    }
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
    fn verb(&self, a: &JobArgs, verb: Verb) -> Result<(), String> {
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
                })?;
                if sh.block.is_some() {
                    sh.pause_now();
                }
                Ok(())
            }
            Verb::Resume => {
                if !sh.flags(|f| f.user_paused) {
                    return Err("Can't resume a job that was not paused".into());
                }
                if !status.accepts(verb) {
                    return Err(refused());
                }
                sh.flags(|f| {
                    f.user_paused = false;
                    f.io_failed = None;
                });
                if sh.block.is_some() {
                    sh.resume_now();
                }
                sh.wake.notify_waiters();
                Ok(())
            }
            Verb::Cancel => a.cancel(true),
            Verb::Finalize => a.finalize(),
            Verb::Dismiss => {
                if !status.accepts(verb) {
                    return Err(refused());
                }
                a.dismiss();
                Ok(())
            }
            Verb::Complete => {
                if !status.accepts(verb) {
                    return Err(refused());
                }
                let completable = sh.block.as_ref().is_some_and(|b| b.completable);
                let ok = sh.flags(|f| {
                    let ok = completable && !f.cancelled && !f.soft_cancelled;
                    if ok {
                        f.complete = true;
                    }
                    ok
                });
                if !ok {
                    return Err(format!(
                        "The active block job '{}' cannot be completed",
                        sh.id
                    ));
                }
                sh.wake.notify_waiters();
                Ok(())
            }
            Verb::SetSpeed | Verb::Change => {
                if !status.accepts(verb) {
                    return Err(refused());
                }
                Err(format!(
                    "Job '{}' does not support command verb '{}'",
                    sh.id,
                    verb.as_str()
                ))
            }
        }
    }

    fn set_speed(&self, a: &JobArgs, speed: i64) -> Result<(), String> {
        let sh = &a.shared;
        let status = sh.status();
        if !status.accepts(Verb::SetSpeed) {
            return Err(state::refused(&sh.id, status, Verb::SetSpeed));
        }
        let Some(b) = &sh.block else {
            return Err(format!(
                "Job '{}' does not support command verb 'set-speed'",
                sh.id
            ));
        };
        if speed < 0 {
            return Err("Parameter 'speed' expects a non-negative value".into());
        }
        b.speed.store(speed as u64, Ordering::Relaxed);
        sh.wake.notify_waiters();
        Ok(())
    }

    fn change_copy_mode(&self, a: &JobArgs, write_blocking: bool) -> Result<(), String> {
        let sh = &a.shared;
        let status = sh.status();
        if !status.accepts(Verb::Change) {
            return Err(state::refused(&sh.id, status, Verb::Change));
        }
        let Some(b) = sh.block.as_ref().filter(|_| sh.kind == "mirror") else {
            return Err("Job type does not support change".into());
        };
        if b.write_blocking.load(Ordering::Acquire) == write_blocking {
            return Ok(());
        }
        if !write_blocking {
            return Err("Change to copy mode 'background' is not implemented".into());
        }
        b.write_blocking.store(true, Ordering::Release);
        sh.wake.notify_waiters();
        Ok(())
    }
}

impl Actor for JobActor {
    type Msg = JobMsg;
    type State = Arc<JobArgs>;
    type Arguments = Arc<JobArgs>;

    async fn pre_start(
        &self,
        myself: ActorRef<JobMsg>,
        args: Arc<JobArgs>,
    ) -> Result<Arc<JobArgs>, ActorProcessingErr> {
        let _ = args.actor.set(myself);
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<JobMsg>,
        msg: JobMsg,
        a: &mut Arc<JobArgs>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            JobMsg::Create(reply) => {
                a.shared.set(Status::Created);
                let _ = reply.send(());
            }
            JobMsg::Start(reply) => {
                let sh = a.shared.clone();
                if sh.status() == Status::Undefined {
                    sh.set(Status::Created);
                }
                // Cancelled before it started: it has ended already.
                if sh.status() != Status::Created {
                    let _ = reply.send(());
                    return Ok(());
                }
                sh.set(Status::Running);
                let start = a.start.lock().ok().and_then(|mut s| s.take());
                let first = match start {
                    // Its own task, so a panic is a failed job, not a lost one.
                    Some(start) => tokio::spawn(start(sh.clone()).instrument(sh.span()))
                        .await
                        .map_err(panic_text),
                    None => Err("internal error: job started twice".into()),
                };
                match first.and_then(|r| r) {
                    // An amend job ends within the command, as QEMU's
                    // does (its work, key derivation included, holds
                    // QEMU's main loop too).
                    Ok(rest) if sh.kind == "amend" => {
                        let r = tokio::spawn(rest.instrument(sh.span()))
                            .await
                            .map_err(panic_text)
                            .and_then(|r| r);
                        a.finish(r)
                    }
                    Ok(rest) => {
                        let me = myself.clone();
                        let (replied, sh) = (a.replied.clone(), a.shared.clone());
                        tokio::spawn(async move {
                            after_reply(&replied, &sh).await;
                            let r = tokio::spawn(rest.instrument(sh.span()))
                                .await
                                .map_err(panic_text)
                                .and_then(|r| r);
                            // Its end follows the reply of a cancel too.
                            after_reply(&replied, &sh).await;
                            let _ = me.cast(JobMsg::Finished(r));
                        });
                    }
                    Err(e) => a.finish(Err(e)),
                }
                let _ = reply.send(());
            }
            JobMsg::Verb(verb, reply) => {
                let _ = reply.send(self.verb(a, verb));
            }
            JobMsg::Cancel(force, reply) => {
                let _ = reply.send(a.cancel(force));
            }
            JobMsg::SetSpeed(speed, reply) => {
                let _ = reply.send(self.set_speed(a, speed));
            }
            JobMsg::ChangeCopyMode(wb, reply) => {
                let _ = reply.send(self.change_copy_mode(a, wb));
            }
            JobMsg::Finished(r) => {
                // A cancel may have ended the job already.
                if !matches!(a.shared.status(), Status::Concluded | Status::Null) {
                    a.finish(r)
                }
            }
            JobMsg::Crash => {
                // Woken, so an idle job (a ready mirror, a paced or
                // paused one) fails now rather than at its next chunk.
                a.shared.crash.store(true, Ordering::Relaxed);
                a.shared.wake.notify_waiters();
            }
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

/// A new job's span, a child of the current one (the command creating
/// the job); none while traces are off.
fn job_span(id: &str, kind: &str) -> Option<tracing::Span> {
    if !observability::traces::enabled() {
        return None;
    }
    Some(tracing::info_span!(
        "job",
        otel.name = %format_args!("job {kind}"),
        job.id = %id,
        job.type = %kind,
        job.error = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    ))
}

/// QEMU's rule for job ids: a letter, then letters, digits, '-', '.', '_'.
pub fn check_id(id: &str) -> Result<(), String> {
    crate::objects::check_id(id).map_err(|_| format!("Invalid job ID '{id}'"))
}
