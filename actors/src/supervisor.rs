//! A supervisor actor holding an ordered list of children.
//!
//! Children are started in the order they are added and stopped in reverse
//! order. When a child fails (panics or returns an error from a handler) the
//! supervisor applies the child's [`Restart`] policy; a child that fails more
//! than `max_restarts` times within `window` is removed and the supervisor
//! reports the escalation through the callback given at construction.
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

/// Starts (or restarts) a child linked to the given supervisor cell.
pub type StartFn = Arc<
    dyn Fn(ActorCell) -> Pin<Box<dyn Future<Output = Result<ActorCell, String>> + Send>>
        + Send
        + Sync,
>;

/// What to do when a child stops without being asked to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Restart after a failure or an unexpected normal stop.
    Permanent,
    /// Restart after a failure; a normal stop removes it.
    Transient,
    /// Never restart; the child is removed.
    Temporary,
}

#[derive(Clone)]
pub struct ChildSpec {
    pub id: String,
    pub start: StartFn,
    pub restart: Restart,
    pub max_restarts: usize,
    pub window: Duration,
}

impl ChildSpec {
    pub fn new(id: impl Into<String>, restart: Restart, start: StartFn) -> Self {
        ChildSpec {
            id: id.into(),
            start,
            restart,
            max_restarts: 5,
            window: Duration::from_secs(10),
        }
    }
}

impl ChildSpec {
    /// A child that is the actor `handler` spawned with `args`, registered
    /// under the child's id (so a restarted child is found by the same name).
    pub fn actor<A>(id: impl Into<String>, restart: Restart, handler: A, args: A::Arguments) -> Self
    where
        A: Actor + Clone,
        A::Arguments: Clone + Sync,
    {
        let id = id.into();
        let name = id.clone();
        ChildSpec::new(
            id,
            restart,
            Arc::new(move |sup| {
                let (name, handler, args) = (name.clone(), handler.clone(), args.clone());
                Box::pin(async move {
                    let (r, _) = Actor::spawn_linked(Some(name), handler, args, sup)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(r.get_cell())
                })
            }),
        )
    }
}

/// A snapshot of one child, for queries and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildStatus {
    pub id: String,
    pub restarts: usize,
}

pub enum SupervisorMsg {
    /// Start a child and append it to the ordered list.
    Start(ChildSpec, RpcReplyPort<Result<(), String>>),
    /// Stop a child (no restart) and remove it.
    Stop(String, RpcReplyPort<bool>),
    /// Stop every child in reverse start order.
    StopAll(RpcReplyPort<()>),
    Children(RpcReplyPort<Vec<ChildStatus>>),
}

struct Child {
    spec: ChildSpec,
    cell: ActorCell,
    restarts: usize,
    recent_failures: VecDeque<Instant>,
}

pub struct SupervisorState {
    children: Vec<Child>,
}

/// Called with (child id, reason) when a child exceeded its restart intensity.
pub type EscalateFn = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Called with (child id, reason) after each restart (the operator's
/// line on stderr, metrics).
pub type RestartFn = Arc<dyn Fn(&str, &str) + Send + Sync>;

pub struct Supervisor {
    pub on_escalate: EscalateFn,
    pub on_restart: Option<RestartFn>,
}

impl Supervisor {
    async fn restart_or_remove(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        cell: &ActorCell,
        failed: bool,
        reason: String,
        on_escalate: &EscalateFn,
        on_restart: Option<&RestartFn>,
    ) {
        let Some(pos) = state
            .children
            .iter()
            .position(|c| c.cell.get_id() == cell.get_id())
        else {
            return; // already removed (we stopped it)
        };
        let restart = match state.children[pos].spec.restart {
            Restart::Permanent => true,
            Restart::Transient => failed,
            Restart::Temporary => false,
        };
        let id = state.children[pos].spec.id.clone();
        if !restart {
            tracing::info!(target: "supervisor_child_removed", child = %id, %reason);
            state.children.remove(pos);
            return;
        }
        let child = &mut state.children[pos];
        let now = Instant::now();
        child.recent_failures.push_back(now);
        while let Some(t) = child.recent_failures.front() {
            if now.duration_since(*t) > child.spec.window {
                child.recent_failures.pop_front();
            } else {
                break;
            }
        }
        if child.recent_failures.len() > child.spec.max_restarts {
            tracing::info!(target: "supervisor_child_escalate", child = %id, %reason);
            state.children.remove(pos);
            on_escalate(&id, &reason);
            return;
        }
        tracing::info!(target: "supervisor_child_restart", child = %id, %reason);
        match (child.spec.start)(myself.get_cell()).await {
            Ok(cell) => {
                child.cell = cell;
                child.restarts += 1;
                if let Some(f) = on_restart {
                    f(&id, &reason);
                }
            }
            Err(e) => {
                tracing::info!(target: "supervisor_child_escalate", child = %id, error = %e);
                state.children.remove(pos);
                on_escalate(&id, &e);
            }
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        _args: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SupervisorState {
            children: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Start(spec, reply) => {
                let result = if state.children.iter().any(|c| c.spec.id == spec.id) {
                    Err(format!("child '{}' already exists", spec.id))
                } else {
                    match (spec.start)(myself.get_cell()).await {
                        Ok(cell) => {
                            state.children.push(Child {
                                spec,
                                cell,
                                restarts: 0,
                                recent_failures: VecDeque::new(),
                            });
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                };
                let _ = reply.send(result);
            }
            SupervisorMsg::Stop(id, reply) => {
                let found = match state.children.iter().position(|c| c.spec.id == id) {
                    Some(pos) => {
                        let child = state.children.remove(pos);
                        stop_child(&child.cell).await;
                        true
                    }
                    None => false,
                };
                let _ = reply.send(found);
            }
            SupervisorMsg::StopAll(reply) => {
                while let Some(child) = state.children.pop() {
                    stop_child(&child.cell).await;
                }
                let _ = reply.send(());
            }
            SupervisorMsg::Children(reply) => {
                let list = state
                    .children
                    .iter()
                    .map(|c| ChildStatus {
                        id: c.spec.id.clone(),
                        restarts: c.restarts,
                    })
                    .collect();
                let _ = reply.send(list);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                Self::restart_or_remove(
                    &myself,
                    state,
                    &cell,
                    true,
                    err.to_string(),
                    &self.on_escalate,
                    self.on_restart.as_ref(),
                )
                .await;
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                Self::restart_or_remove(
                    &myself,
                    state,
                    &cell,
                    false,
                    reason.unwrap_or_else(|| "stopped".into()),
                    &self.on_escalate,
                    self.on_restart.as_ref(),
                )
                .await;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Stops a child and waits until it has terminated (bounded, so a stuck
/// child cannot hang shutdown).
async fn stop_child(cell: &ActorCell) {
    if cell
        .stop_and_wait(None, Some(Duration::from_secs(10)))
        .await
        .is_err()
    {
        cell.kill();
    }
}

/// Convenience wrappers for callers outside the actor.
pub async fn start_child(sup: &ActorRef<SupervisorMsg>, spec: ChildSpec) -> Result<(), String> {
    ractor::call!(sup, SupervisorMsg::Start, spec).map_err(|e| e.to_string())?
}

pub async fn stop_child_by_id(sup: &ActorRef<SupervisorMsg>, id: &str) -> bool {
    ractor::call!(sup, SupervisorMsg::Stop, id.to_string()).unwrap_or(false)
}

pub async fn stop_all(sup: &ActorRef<SupervisorMsg>) {
    let _ = ractor::call!(sup, SupervisorMsg::StopAll);
}

pub async fn children(sup: &ActorRef<SupervisorMsg>) -> Vec<ChildStatus> {
    ractor::call!(sup, SupervisorMsg::Children).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Crashy;
    enum CrashyMsg {
        Crash,
        Ping(RpcReplyPort<u32>),
    }
    impl Actor for Crashy {
        type Msg = CrashyMsg;
        type State = ();
        type Arguments = ();
        async fn pre_start(&self, _: ActorRef<CrashyMsg>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
        async fn handle(
            &self,
            _: ActorRef<CrashyMsg>,
            msg: CrashyMsg,
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            match msg {
                CrashyMsg::Crash => panic!("test crash"),
                CrashyMsg::Ping(r) => {
                    let _ = r.send(7);
                }
            }
            Ok(())
        }
    }

    fn spec(id: &str, restart: Restart, starts: Arc<AtomicUsize>) -> ChildSpec {
        let name = id.to_string();
        ChildSpec::new(
            id,
            restart,
            Arc::new(move |sup| {
                let name = name.clone();
                let starts = starts.clone();
                Box::pin(async move {
                    starts.fetch_add(1, Ordering::SeqCst);
                    let (r, _) = Actor::spawn_linked(Some(name), Crashy, (), sup)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(r.get_cell())
                })
            }),
        )
    }

    async fn wait_for(name: &str, not: Option<ractor::ActorId>) -> ActorRef<CrashyMsg> {
        for _ in 0..200 {
            if let Some(cell) = ractor::registry::where_is(name) {
                if Some(cell.get_id()) != not {
                    return cell.into();
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("actor {name} did not come back");
    }

    /// A supervisor that counts its escalations.
    async fn counting_supervisor() -> (ActorRef<SupervisorMsg>, Arc<AtomicUsize>) {
        let escalations = Arc::new(AtomicUsize::new(0));
        let e2 = escalations.clone();
        let (sup, _) = Actor::spawn(
            None,
            Supervisor {
                on_escalate: Arc::new(move |_, _| {
                    e2.fetch_add(1, Ordering::SeqCst);
                }),
                on_restart: None,
            },
            (),
        )
        .await
        .expect("spawn supervisor");
        (sup, escalations)
    }

    #[tokio::test]
    async fn permanent_child_restarts_temporary_is_removed() {
        let (sup, escalations) = counting_supervisor().await;
        let starts = Arc::new(AtomicUsize::new(0));
        start_child(&sup, spec("perm", Restart::Permanent, starts.clone()))
            .await
            .expect("start perm");
        start_child(&sup, spec("temp", Restart::Temporary, starts.clone()))
            .await
            .expect("start temp");
        assert!(
            start_child(&sup, spec("temp", Restart::Temporary, starts.clone()))
                .await
                .is_err()
        );

        let perm = wait_for("perm", None).await;
        let old = perm.get_id();
        perm.cast(CrashyMsg::Crash).expect("cast");
        let perm2 = wait_for("perm", Some(old)).await;
        assert_eq!(ractor::call!(perm2, CrashyMsg::Ping).expect("ping"), 7);

        let temp = wait_for("temp", None).await;
        temp.cast(CrashyMsg::Crash).expect("cast");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let kids = children(&sup).await;
        assert_eq!(
            kids,
            vec![ChildStatus {
                id: "perm".into(),
                restarts: 1
            }]
        );
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        assert_eq!(escalations.load(Ordering::SeqCst), 0);
        stop_all(&sup).await;
        assert!(children(&sup).await.is_empty());
    }

    #[tokio::test]
    async fn restart_intensity_escalates() {
        let (sup, escalations) = counting_supervisor().await;
        let starts = Arc::new(AtomicUsize::new(0));
        let mut s = spec("flappy", Restart::Permanent, starts.clone());
        s.max_restarts = 2;
        start_child(&sup, s).await.expect("start");
        let mut last = None;
        for _ in 0..3 {
            let a = wait_for("flappy", last).await;
            last = Some(a.get_id());
            a.cast(CrashyMsg::Crash).expect("cast");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(children(&sup).await.is_empty());
        assert_eq!(escalations.load(Ordering::SeqCst), 1);
    }
}
