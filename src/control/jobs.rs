//! Job commands: blockdev-create, query-jobs and the job-* verbs. Jobs are
//! supervised actors (temporary: a job is never restarted); the control
//! actor starts them and routes the verbs.
use std::sync::Arc;

use actors::{ChildSpec, Restart};
use ractor::ActorRef;
use serde_json::{json, Map, Value};

use super::{arg_str, ControlMsg, ControlState};
use crate::jobs::create::{self, Targets};
use crate::jobs::group::Group;
use crate::jobs::{self, JobActor, JobArgs, JobMsg, Shared, Status, Verb};
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

/// What kind of job to create.
pub(super) struct JobSpec {
    pub kind: &'static str,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// (completable, speed) for a block job.
    pub block: Option<(bool, u64)>,
}

/// How a command's job starts.
pub(super) enum Launch {
    /// At once, by the command itself.
    Now,
    /// Created only: a transaction starts it at commit, in the group
    /// when it is grouped.
    Held(Option<Arc<Group>>),
}

impl ControlState {
    pub(super) fn job(&self, id: &str) -> Option<Arc<Shared>> {
        self.jobs
            .lock()
            .ok()
            .and_then(|j| j.iter().find(|s| s.id == id).cloned())
    }

    /// The node a BlockdevRef names, or QEMU's error for it.
    fn target(&self, r: Option<&Value>) -> Result<Arc<crate::block::node::Node>, String> {
        match r {
            Some(Value::String(name)) => self
                .block
                .find(name)
                .map(|e| e.node.clone())
                .ok_or_else(|| format!("Cannot find device='{name}' nor node-name='{name}'")),
            Some(_) => {
                Err("rsd does not support inline node definitions in blockdev-create yet".into())
            }
            None => Err("Parameter 'file' is missing".into()),
        }
    }

    pub(super) async fn blockdev_create(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let id = arg_str(args, "job-id");
        let opts = args
            .get("options")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        // A format writes its nodes through a user holding write and
        // resize (QEMU's blk_co_new_open), for the whole job.
        let mut users = Vec::new();
        let format = opts.get("driver").and_then(Value::as_str) != Some("file");
        let mut hold = |st: &mut Self, r: Result<Arc<crate::block::node::Node>, String>| {
            let node = r?;
            if format {
                let all = crate::block::perm::Perm::ALL;
                let rw = crate::block::perm::Perm::WRITE.union(crate::block::perm::Perm::RESIZE);
                users.push(
                    st.block
                        .add_user(&node.name, "an unnamed block device", rw, all)?,
                );
            }
            Ok(node)
        };
        let file = self.target(opts.get("file"));
        let file = hold(self, file);
        let data_file = match opts.get("data-file") {
            Some(d) => {
                let node = self.target(Some(d));
                let node = hold(self, node);
                Some(node.map(|n| {
                    let name = self
                        .block
                        .find(&n.name)
                        .map(|e| self.block.filename(e))
                        .unwrap_or_default();
                    (n, name)
                }))
            }
            None => None,
        };
        let header = match opts.get("header") {
            Some(h) => {
                let node = self.target(Some(h));
                Some(hold(self, node))
            }
            None => None,
        };
        // The secrets the job will need, looked up now: the job cannot
        // reach the object registry.
        let mut ids = Vec::new();
        for o in [Some(&opts), opts.get("encrypt").and_then(Value::as_object)]
            .into_iter()
            .flatten()
        {
            if let Some(id) = o.get("key-secret").and_then(Value::as_str) {
                ids.push(id.to_string());
            }
        }
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let secrets = crate::objects::Secrets::collect(&self.objects, &ids);
        let targets = Targets {
            file,
            data_file,
            header,
            secrets,
        };
        let control = self.myself.clone();
        let on_end: crate::jobs::OnEnd = Box::new(move |_ok| {
            if !users.is_empty() {
                let _ = control.cast(ControlMsg::RemoveUsers(users));
            }
        });
        self.start_job(
            id,
            "create",
            true,
            false,
            None,
            create::start(opts, targets),
            on_end,
        )
        .await
        .map(|()| json!({}))
    }

    /// x-blockdev-amend: QEMU's checks before the job, then the driver's
    /// amend as the job's work.
    pub(super) async fn blockdev_amend(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let id = arg_str(args, "job-id");
        let name = arg_str(args, "node-name");
        let opts = args
            .get("options")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let force = args.get("force").and_then(Value::as_bool).unwrap_or(false);
        let node = self
            .block
            .find(name)
            .map(|e| e.node.clone())
            .ok_or_else(|| {
                QmpError::generic(format!("Cannot find device='' nor node-name='{name}'"))
            })?;
        // QEMU's order: the options' driver must be the node's, then
        // that driver must amend (qcow2 and luks do).
        if opts.get("driver").and_then(Value::as_str) != Some(node.driver.name()) {
            return Err(QmpError::generic(
                "x-blockdev-amend doesn't support changing the block driver",
            ));
        }
        if !matches!(node.driver.name(), "qcow2" | "luks") {
            return Err(QmpError::generic(
                "Driver does not support x-blockdev-amend",
            ));
        }
        if !node.driver.can_amend() {
            // An unencrypted qcow2 image: its only amendable options are
            // encryption key slots, so the job has nothing to do, or
            // fails as QSD's does when asked to change them.
            let encrypt = opts.contains_key("encrypt");
            let start: crate::jobs::Start = Box::new(move |sh| {
                Box::pin(async move {
                    sh.set_progress(1, 1);
                    if encrypt {
                        return Err("image is not encrypted, can't amend".to_string());
                    }
                    let done: crate::jobs::JobFuture = Box::pin(async { Ok(()) });
                    Ok(done)
                })
            });
            return self
                .start_job(id, "amend", true, false, None, start, Box::new(|_| {}))
                .await
                .map(|()| json!({}));
        }
        // The secrets the options name, looked up now (the job cannot
        // reach the object registry): the LUKS ones, inside qcow2's
        // `encrypt` too, and the secret the node was opened with.
        let luks = match opts.get("encrypt").and_then(Value::as_object) {
            Some(e) => e.clone(),
            None => opts.clone(),
        };
        let mut ids: Vec<String> = ["secret", "new-secret", "old-secret"]
            .iter()
            .filter_map(|k| luks.get(*k).and_then(Value::as_str).map(String::from))
            .collect();
        if let Some(current) = node.driver.key_secret() {
            ids.push(current);
        }
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let secrets = crate::objects::Secrets::collect(&self.objects, &ids);
        let start: crate::jobs::Start = Box::new(move |sh: Arc<Shared>| {
            Box::pin(async move {
                sh.set_progress(0, 1);
                let rest: crate::jobs::JobFuture = Box::pin(async move {
                    let r = node.driver.amend(&opts, &secrets, force).await;
                    sh.set_progress(1, 1);
                    r
                });
                Ok(rest)
            })
        });
        let on_end: crate::jobs::OnEnd = Box::new(|_ok| {});
        self.start_job(id, "amend", true, false, None, start, on_end)
            .await
            .map(|()| json!({}))
    }

    /// Starts a job; `block` is (completable, speed) for a block job.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn start_job(
        &mut self,
        id: &str,
        kind: &'static str,
        auto_finalize: bool,
        auto_dismiss: bool,
        block: Option<(bool, u64)>,
        start: jobs::Start,
        on_end: crate::jobs::OnEnd,
    ) -> QmpResult<()> {
        let spec = JobSpec {
            kind,
            auto_finalize,
            auto_dismiss,
            block,
        };
        self.create_job(id, spec, start, on_end, None).await?;
        self.begin_job(id).await;
        Ok(())
    }

    /// Creates a job and starts it as `launch` says.
    pub(super) async fn launch_job(
        &mut self,
        id: &str,
        spec: JobSpec,
        start: jobs::Start,
        on_end: crate::jobs::OnEnd,
        launch: &Launch,
    ) -> QmpResult<()> {
        match launch {
            Launch::Now => {
                self.create_job(id, spec, start, on_end, None).await?;
                self.begin_job(id).await;
            }
            Launch::Held(group) => {
                self.create_job(id, spec, start, on_end, group.clone())
                    .await?
            }
        }
        Ok(())
    }

    /// Starts a job created by `create_job`.
    pub(super) async fn begin_job(&self, id: &str) {
        if let Some(a) = job_actor(id) {
            let _ = ractor::call!(a, JobMsg::Start);
        }
    }

    /// Creates a job (`created`) without starting it: a transaction
    /// creates its jobs as it prepares and starts them at commit, each in
    /// `group` when it is grouped.
    pub(super) async fn create_job(
        &mut self,
        id: &str,
        spec: JobSpec,
        start: jobs::Start,
        on_end: crate::jobs::OnEnd,
        group: Option<Arc<Group>>,
    ) -> QmpResult<()> {
        let JobSpec {
            kind,
            auto_finalize,
            auto_dismiss,
            block,
        } = spec;
        if let Err(e) = jobs::check_id(id) {
            on_end(false);
            return Err(QmpError::generic(e));
        }
        if self.job(id).is_some() {
            on_end(false);
            return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
        }
        let ctx = self.ctx.clone();
        let sink: crate::events::EventSink = Arc::new(move |n, d| ctx.events.emit(n, Some(d)));
        let shared = match block {
            Some((completable, speed)) => Shared::new_block(
                id,
                kind,
                auto_finalize,
                auto_dismiss,
                sink,
                completable,
                speed,
            ),
            None => Shared::new(id, kind, auto_finalize, auto_dismiss, sink),
        };
        shared
            .gate
            .store(self.seq, std::sync::atomic::Ordering::Release);
        if let Ok(mut j) = self.jobs.lock() {
            j.insert(0, shared.clone());
        }
        let args = JobArgs::new(
            shared,
            start,
            self.jobs.clone(),
            Some(self.ctx.replied.subscribe()),
            on_end,
            group.clone(),
        );
        let member = args.clone();
        let spec = ChildSpec::actor(jobs::registry_name(id), Restart::Temporary, JobActor, args);
        actors::supervisor::start_child(&self.ctx.supervisor, spec)
            .await
            .map_err(QmpError::generic)?;
        if let Some(g) = &group {
            g.add(member);
        }
        if let Some(a) = job_actor(id) {
            let _ = ractor::call!(a, JobMsg::Create);
        }
        Ok(())
    }

    pub(super) fn query_jobs(&self) -> Value {
        let list = self
            .jobs
            .lock()
            .map(|j| j.iter().map(|s| s.info()).collect())
            .unwrap_or_default();
        Value::Array(list)
    }

    /// The ids of the jobs there are now.
    pub(super) fn job_ids(&self) -> Vec<String> {
        self.jobs
            .lock()
            .map(|j| j.iter().map(|s| s.id.clone()).collect())
            .unwrap_or_default()
    }

    pub(super) async fn job_verb(&mut self, id: &str, verb: Verb) -> QmpResult<Value> {
        let Some(sh) = self.job(id) else {
            return Err(QmpError::generic("Job not found"));
        };
        sh.gate
            .store(self.seq, std::sync::atomic::Ordering::Release);
        let Some(a) = job_actor(id) else {
            return Err(QmpError::generic("Job not found"));
        };
        match ractor::call!(a, JobMsg::Verb, verb) {
            Ok(Ok(())) => Ok(json!({})),
            Ok(Err(e)) => Err(QmpError::generic(e)),
            Err(e) => Err(QmpError::generic(format!("internal error: {e}"))),
        }
    }

    /// quit and signals: cancel what still runs and wait (bounded) for
    /// every job to end, as QSD waits for its jobs.
    pub(super) async fn cancel_all_jobs(&mut self) {
        let all: Vec<Arc<Shared>> = self.jobs.lock().map(|j| j.clone()).unwrap_or_default();
        for sh in &all {
            sh.drain_blip();
            if let Some(a) = job_actor(&sh.id) {
                let _ = ractor::call!(a, JobMsg::Verb, Verb::Cancel);
            }
        }
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while all
            .iter()
            .any(|s| !matches!(s.status(), Status::Concluded | Status::Null))
            && std::time::Instant::now() < until
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        for sh in &all {
            if sh.status() == Status::Concluded {
                if let Some(a) = job_actor(&sh.id) {
                    let _ = ractor::call!(a, JobMsg::Verb, Verb::Dismiss);
                }
            }
        }
    }
}

pub(super) fn job_actor(id: &str) -> Option<ActorRef<JobMsg>> {
    ractor::registry::where_is(jobs::registry_name(id)).map(Into::into)
}
