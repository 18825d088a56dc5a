//! The job actor through every state a job can be in, with a job whose
//! work has pause points and can stop at `pending` (auto-finalize off):
//! each verb in each state, the errors, and the events in order.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorRef};

use super::*;

/// Events as "id status" (JOB_STATUS_CHANGE) or "id EVENT" (the
/// BLOCK_JOB_* ones), in order.
type Log = Arc<Mutex<Vec<String>>>;

struct Rig {
    actor: ActorRef<JobMsg>,
    shared: Arc<Shared>,
    events: Log,
    go: Arc<tokio::sync::Notify>,
}

/// A job that loops over pause points until `go` is notified, then ends
/// with `result`.
async fn rig(auto_finalize: bool, auto_dismiss: bool, result: Result<(), String>) -> Rig {
    let log = Arc::new(Mutex::new(Vec::new()));
    let flags = (auto_finalize, auto_dismiss);
    rig_in("j", flags, result, None, log).await
}

/// The same, as job `id` of `group`, logging to `log`.
async fn rig_in(
    id: &str,
    (auto_finalize, auto_dismiss): (bool, bool),
    result: Result<(), String>,
    group: Option<Arc<group::Group>>,
    log: Log,
) -> Rig {
    let ev = log.clone();
    let sink: crate::events::EventSink = Arc::new(move |name, d| {
        let who = d
            .get("id")
            .or_else(|| d.get("device"))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let what = d
            .get("status")
            .and_then(|v| v.as_str())
            .unwrap_or(name)
            .to_string();
        ev.lock().expect("events").push(format!("{who} {what}"));
    });
    let shared = Shared::new_block(id, "backup", auto_finalize, auto_dismiss, sink, false, 0);
    let go = Arc::new(tokio::sync::Notify::new());
    let g = go.clone();
    let start: Start = Box::new(move |sh: Arc<Shared>| {
        Box::pin(async move {
            let rest: JobFuture = Box::pin(async move {
                loop {
                    sh.pause_point().await?;
                    tokio::select! {
                        _ = g.notified() => return result,
                        _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    }
                }
            });
            Ok(rest)
        })
    });
    let jobs: Jobs = Arc::new(Mutex::new(vec![shared.clone()]));
    let args = JobArgs::new(
        shared.clone(),
        start,
        jobs,
        None,
        Box::new(|_| {}),
        group.clone(),
    );
    let (actor, _) = Actor::spawn(None, JobActor, args.clone())
        .await
        .expect("spawn");
    if let Some(g) = &group {
        g.add(args);
    }
    ractor::call!(actor, JobMsg::Start).expect("start");
    Rig {
        actor,
        shared,
        events: log,
        go,
    }
}

impl Rig {
    async fn verb(&self, v: Verb) -> Result<(), String> {
        ractor::call!(self.actor, JobMsg::Verb, v).unwrap_or_else(|e| Err(e.to_string()))
    }
    async fn until(&self, s: Status) {
        for _ in 0..400 {
            if self.shared.status() == s {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("never reached {s:?}; at {:?}", self.shared.status());
    }
    /// This job's state changes.
    fn events(&self) -> Vec<String> {
        let me = format!("{} ", self.shared.id);
        self.events
            .lock()
            .expect("events")
            .iter()
            .filter_map(|e| e.strip_prefix(&me))
            .filter(|s| s.chars().all(|c| c.is_ascii_lowercase()))
            .map(String::from)
            .collect()
    }
}

fn refused(s: &str, v: &str) -> Result<(), String> {
    Err(format!(
        "Job 'j' in state '{s}' cannot accept command verb '{v}'"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_paused_pending_concluded_null() {
    let r = rig(false, false, Ok(())).await;
    assert_eq!(r.shared.status(), Status::Running);
    assert_eq!(r.verb(Verb::Complete).await, refused("running", "complete"));
    assert_eq!(r.verb(Verb::Finalize).await, refused("running", "finalize"));
    assert_eq!(r.verb(Verb::Dismiss).await, refused("running", "dismiss"));
    assert_eq!(
        r.verb(Verb::Resume).await,
        Err("Can't resume a job that was not paused".into())
    );
    assert_eq!(r.verb(Verb::Pause).await, Ok(()));
    r.until(Status::Paused).await;
    assert_eq!(
        r.verb(Verb::Pause).await,
        Err("Job is already paused".into())
    );
    assert_eq!(r.verb(Verb::Complete).await, refused("paused", "complete"));
    assert_eq!(r.verb(Verb::Finalize).await, refused("paused", "finalize"));
    assert_eq!(r.verb(Verb::Dismiss).await, refused("paused", "dismiss"));
    assert_eq!(r.verb(Verb::Resume).await, Ok(()));
    r.until(Status::Running).await;
    r.go.notify_one();
    r.until(Status::Pending).await;
    assert_eq!(r.verb(Verb::Pause).await, refused("pending", "pause"));
    assert_eq!(r.verb(Verb::Complete).await, refused("pending", "complete"));
    assert_eq!(r.verb(Verb::Dismiss).await, refused("pending", "dismiss"));
    assert_eq!(r.verb(Verb::Finalize).await, Ok(()));
    assert_eq!(r.shared.status(), Status::Concluded);
    assert_eq!(r.verb(Verb::Cancel).await, refused("concluded", "cancel"));
    assert_eq!(r.verb(Verb::Pause).await, refused("concluded", "pause"));
    assert_eq!(
        r.verb(Verb::Finalize).await,
        refused("concluded", "finalize")
    );
    assert_eq!(r.verb(Verb::Dismiss).await, Ok(()));
    assert_eq!(
        r.events(),
        [
            "created",
            "running",
            "paused",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );
    assert_eq!(r.shared.info()["status"], "null");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_paused_aborts_with_the_error() {
    let r = rig(true, false, Ok(())).await;
    r.verb(Verb::Pause).await.expect("pause");
    r.until(Status::Paused).await;
    assert_eq!(r.verb(Verb::Cancel).await, Ok(()));
    r.until(Status::Concluded).await;
    assert_eq!(
        r.events(),
        [
            "created",
            "running",
            "paused",
            "running",
            "aborting",
            "concluded"
        ]
    );
    assert_eq!(r.shared.info()["error"], "Operation canceled");
    // A cancel lifts the user's pause (QEMU's job_cancel_async), so a
    // resume finds nothing to resume.
    assert_eq!(
        r.verb(Verb::Resume).await,
        Err("Can't resume a job that was not paused".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_in_pending_and_failure_with_auto_dismiss() {
    let r = rig(false, false, Ok(())).await;
    r.go.notify_one();
    r.until(Status::Pending).await;
    assert_eq!(r.verb(Verb::Cancel).await, Ok(()));
    assert_eq!(r.shared.status(), Status::Concluded);
    assert_eq!(
        r.events(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "aborting",
            "concluded"
        ]
    );

    let f = rig(true, true, Err("Input/output error".into())).await;
    f.go.notify_one();
    f.until(Status::Null).await;
    assert_eq!(
        f.events(),
        ["created", "running", "aborting", "concluded", "null"]
    );
}

/// Two jobs of a group: the first done waits for the other; then both go
/// to pending and conclude, newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_concludes_together() {
    let g = group::Group::new();
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let a = rig_in("a", (true, true), Ok(()), Some(g.clone()), log.clone()).await;
    let b = rig_in("b", (true, true), Ok(()), Some(g.clone()), log.clone()).await;
    a.go.notify_one();
    a.until(Status::Waiting).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(a.shared.status(), Status::Waiting);
    b.go.notify_one();
    a.until(Status::Null).await;
    b.until(Status::Null).await;
    let all = log.lock().expect("log").clone();
    let at = all
        .iter()
        .position(|e| e == "a waiting")
        .expect("a waiting");
    assert_eq!(
        all[at..],
        [
            "a waiting",
            "b waiting",
            "b pending",
            "a pending",
            "b BLOCK_JOB_COMPLETED",
            "b concluded",
            "b null",
            "a BLOCK_JOB_COMPLETED",
            "a concluded",
            "a null"
        ]
    );
}

/// With auto-finalize off on one job, both wait in pending; finalizing
/// either concludes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_finalize_of_one_member_finalizes_the_group() {
    let g = group::Group::new();
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let a = rig_in("a", (false, false), Ok(()), Some(g.clone()), log.clone()).await;
    let b = rig_in("b", (true, false), Ok(()), Some(g.clone()), log.clone()).await;
    a.go.notify_one();
    b.go.notify_one();
    a.until(Status::Pending).await;
    b.until(Status::Pending).await;
    assert!(log
        .lock()
        .expect("log")
        .contains(&"a BLOCK_JOB_PENDING".to_string()));
    assert!(!log
        .lock()
        .expect("log")
        .contains(&"b BLOCK_JOB_PENDING".to_string()));
    assert_eq!(b.verb(Verb::Finalize).await, Ok(()));
    assert_eq!(a.shared.status(), Status::Concluded);
    assert_eq!(b.shared.status(), Status::Concluded);
}

/// A member that fails cancels the other, which is still running; the
/// failed one concludes with its error, the other as cancelled; a member
/// already waiting goes to aborting only as it concludes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_cancels_the_group() {
    let g = group::Group::new();
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let err = Err("Input/output error".to_string());
    let a = rig_in("a", (true, true), err, Some(g.clone()), log.clone()).await;
    let b = rig_in("b", (true, false), Ok(()), Some(g.clone()), log.clone()).await;
    a.go.notify_one();
    b.until(Status::Concluded).await;
    assert_eq!(b.shared.info()["error"], "Operation canceled");
    let all = log.lock().expect("log").clone();
    let at = all
        .iter()
        .position(|e| e == "a aborting")
        .expect("a aborting");
    assert_eq!(
        all[at..],
        [
            "a aborting",
            "b aborting",
            "b BLOCK_JOB_CANCELLED",
            "b concluded",
            "a BLOCK_JOB_COMPLETED",
            "a concluded",
            "a null"
        ]
    );

    let g = group::Group::new();
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let c = rig_in("c", (true, true), Ok(()), Some(g.clone()), log.clone()).await;
    let d = rig_in("d", (true, true), Ok(()), Some(g.clone()), log.clone()).await;
    c.go.notify_one();
    c.until(Status::Waiting).await;
    assert_eq!(d.verb(Verb::Cancel).await, Ok(()));
    c.until(Status::Null).await;
    d.until(Status::Null).await;
    let all = log.lock().expect("log").clone();
    let at = all
        .iter()
        .position(|e| e == "d aborting")
        .expect("d aborting");
    assert_eq!(
        all[at..],
        [
            "d aborting",
            "d BLOCK_JOB_CANCELLED",
            "d concluded",
            "d null",
            "c aborting",
            "c BLOCK_JOB_CANCELLED",
            "c concluded",
            "c null"
        ]
    );
}
