//! The job actor through every state a job can be in, with a job whose
//! work has pause points and can stop at `pending` (auto-finalize off):
//! each verb in each state, the errors, and the events in order.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorRef};

use super::*;

struct Rig {
    actor: ActorRef<JobMsg>,
    shared: Arc<Shared>,
    events: Arc<Mutex<Vec<String>>>,
    go: Arc<tokio::sync::Notify>,
}

/// A job that loops over pause points until `go` is notified, then ends
/// with `result`.
async fn rig(auto_finalize: bool, auto_dismiss: bool, result: Result<(), String>) -> Rig {
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let sink: crate::events::EventSink = Arc::new(move |_, d| {
        if let Some(s) = d.get("status").and_then(|v| v.as_str()) {
            ev.lock().expect("events").push(s.to_string());
        }
    });
    let shared = Shared::new("j", "backup", auto_finalize, auto_dismiss, sink);
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
    let args = JobArgs::new(shared.clone(), start, jobs, None, Box::new(|_| {}), None);
    let (actor, _) = Actor::spawn(None, JobActor, args).await.expect("spawn");
    ractor::call!(actor, JobMsg::Start).expect("start");
    Rig {
        actor,
        shared,
        events,
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
    fn events(&self) -> Vec<String> {
        self.events.lock().expect("events").clone()
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
