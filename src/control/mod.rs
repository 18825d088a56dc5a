//! The control actor: QSD's single dispatcher. It runs commands one at a
//! time, owns the registries (chardevs, monitors, objects) and starts and
//! stops the supervised actors that do the work.
mod active;
mod backup;
mod bitmaps;
mod block;
mod block_jobs;
mod blockdev_change;
mod chardevs;
mod commit;
mod exports;
mod iothreads;
mod jobs;
mod metrics;
mod mirror;
mod nbd;
mod qom;
mod qom_types;
mod reopen;
mod snapshot;
mod stream;
mod transaction;
mod vhost_user;

use std::collections::BTreeMap;
use std::sync::Arc;

use actors::{ChildSpec, Restart};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::{json, Map, Value};
use tracing::Instrument;

use crate::chardev::Backend;
use crate::context::Ctx;
use crate::objects::{self, Object};
use crate::qapi::error::QmpResult;
use crate::qapi::{introspect, QmpError};
use crate::qmp::monitor::{self, MonitorActor, MonitorConfig, MonitorMsg};

pub use chardevs::chardev_name;

pub enum ControlMsg {
    /// A job ended: drop its users of block nodes.
    RemoveUsers(Vec<u64>),
    /// Run a QMP command with validated arguments; the reply carries the
    /// command's sequence number (see `Ctx::replied`).
    Execute(
        String,
        Map<String, Value>,
        tracing::Span,
        RpcReplyPort<(QmpResult<Value>, u64)>,
    ),
    /// `--chardev`: like chardev-add, with the command line's id rules;
    /// the string is the prefix for a `wait=on` notice on stderr.
    AddChardevCli(
        String,
        Map<String, Value>,
        String,
        RpcReplyPort<Result<(), String>>,
    ),
    /// `--object`: like object-add, with the command line's messages.
    AddObjectCli(Map<String, Value>, RpcReplyPort<Result<(), String>>),
    /// `--nbd-server`: like nbd-server-start, with a flat address.
    NbdServerCli(Map<String, Value>, RpcReplyPort<Result<(), String>>),
    /// `--export`: like block-export-add.
    ExportCli(Map<String, Value>, RpcReplyPort<Result<(), String>>),
    /// `--blockdev`: like blockdev-add.
    AddBlockdevCli(Map<String, Value>, RpcReplyPort<Result<(), String>>),
    /// `--monitor`: attach a QMP monitor to a chardev.
    AddMonitor(String, bool, RpcReplyPort<Result<(), String>>),
    /// A backup job ended: its hook and users go.
    BackupEnded(Box<backup::BackupEnd>),

    /// A stream or intermediate commit ended (true: it succeeded).
    ChainJobEnded(Box<stream::ChainEnd>, bool),
    /// A mirror job ended: tidy the graph (its filter, its users).
    MirrorEnded(Box<mirror::MirrorEnd>),
    /// The exit path run before the supervisor stops everything.
    Shutdown(RpcReplyPort<()>),
    /// `--metrics-server`: like __org.rsd_metrics-server-start.
    MetricsServerCli(Map<String, Value>, RpcReplyPort<Result<(), String>>),
    /// /healthz: the control actor answers.
    Ping(RpcReplyPort<()>),
}

pub struct ChardevEntry {
    pub backend: Arc<Backend>,
    pub qom_type: &'static str,
    pub addr: Option<Value>,
    pub has_monitor: bool,
}

pub struct ControlState {
    ctx: Arc<Ctx>,
    /// This actor, for work that reports back to it (monitors' commands,
    /// a job's end).
    myself: ActorRef<ControlMsg>,
    /// Chardevs in creation order.
    chardevs: Vec<(String, ChardevEntry)>,
    objects: BTreeMap<String, Object>,
    /// Every object id, with the authz objects, for the NBD server to
    /// look tls-authz up when a client connects.
    authz: Arc<crate::objects::authz::AuthzIndex>,
    block: crate::block::graph::Graph,
    jobs: crate::jobs::Jobs,
    /// The number of the command being run.
    seq: u64,
    nbd: Option<Arc<crate::nbd::server::Server>>,
    exports: crate::exports::Registry,
    /// The metrics listener, when one runs.
    metrics_server: Option<Arc<crate::metrics::server::MetricsServer>>,
}

pub struct ControlActor;

impl Actor for ControlActor {
    type Msg = ControlMsg;
    type State = ControlState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        myself: ActorRef<ControlMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<ControlState, ActorProcessingErr> {
        let mut block = crate::block::graph::Graph::default();
        let c = ctx.clone();
        block.events = Some(Arc::new(move |name, data| c.events.emit(name, Some(data))));
        Ok(ControlState {
            myself,
            chardevs: Vec::new(),
            objects: BTreeMap::new(),
            authz: Default::default(),
            block,
            // Shared with the metrics collector, which reads them at
            // scrape time.
            jobs: ctx.metrics.sources.jobs.clone(),
            exports: ctx.metrics.sources.exports.clone(),
            seq: 0,
            nbd: None,
            metrics_server: None,
            ctx,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ControlMsg>,
        msg: ControlMsg,
        st: &mut ControlState,
    ) -> Result<(), ActorProcessingErr> {
        let handled = crate::util::CatchUnwind(Box::pin(st.handle_msg(msg))).await;
        if let Err(panic) = handled {
            // The registries may be half changed, so the control actor
            // cannot go on and the daemon stops (daemon.rs); but what
            // it owns still ends as on quit: exports closed (FUSE
            // unmounted), jobs cancelled, nodes flushed and closed,
            // sockets removed.
            let why = crate::util::panic_text(panic.as_ref());
            st.shutdown().await;
            return Err(format!("control actor failed: {why}").into());
        }
        // Every graph change happens in a handler: the collector sees
        // the nodes as they are after each one.
        st.ctx.metrics.publish_nodes(
            st.block
                .in_name_order()
                .into_iter()
                .map(|e| e.node.clone())
                .collect(),
        );
        Ok(())
    }
}

impl ControlState {
    async fn handle_msg(&mut self, msg: ControlMsg) {
        let st = self;
        match msg {
            ControlMsg::RemoveUsers(ids) => {
                for id in ids {
                    st.block.remove_user(id);
                }
            }
            ControlMsg::Execute(name, args, span, reply) => {
                st.seq += 1;
                // Inside the command's span: a job it creates is a child.
                let r = st.execute(&name, args).instrument(span).await;
                let _ = reply.send((r, st.seq));
            }
            ControlMsg::AddChardevCli(id, backend, prefix, reply) => {
                let r = st.add_chardev_cli(id, backend, prefix).await;
                let _ = reply.send(r);
            }
            ControlMsg::NbdServerCli(args, reply) => {
                let _ = reply.send(st.nbd_server_start(&args).await);
            }
            ControlMsg::ExportCli(args, reply) => {
                let _ = reply.send(st.block_export_add(&args, false).await);
            }
            ControlMsg::AddBlockdevCli(args, reply) => {
                let _ = reply.send(st.blockdev_add(&args).await);
            }
            ControlMsg::AddObjectCli(args, reply) => {
                let _ = reply.send(st.object_add(&args));
            }
            ControlMsg::AddMonitor(chardev, pretty, reply) => {
                let r = st.add_monitor(chardev, pretty).await;
                let _ = reply.send(r);
            }
            ControlMsg::MirrorEnded(end) => st.mirror_ended(*end).await,
            ControlMsg::ChainJobEnded(end, ok) => st.chain_job_ended(*end, ok).await,
            ControlMsg::BackupEnded(end) => st.backup_ended(*end),
            ControlMsg::Shutdown(reply) => {
                st.shutdown().await;
                let _ = reply.send(());
            }
            ControlMsg::MetricsServerCli(args, reply) => {
                let _ = reply.send(st.metrics_server_start(&args).await);
            }
            ControlMsg::Ping(reply) => {
                let _ = reply.send(());
            }
        }
    }

    /// The exit path: exports deleted (with their events), jobs
    /// cancelled, the NBD server stopped, nodes closed newest first,
    /// chardev sockets removed.
    async fn shutdown(&mut self) {
        self.delete_exports(None).await;
        self.cancel_all_jobs().await;
        if self.nbd.take().is_some() {
            actors::supervisor::stop_child_by_id(
                &self.ctx.supervisor,
                crate::nbd::server::REGISTRY_NAME,
            )
            .await;
        }
        // Newest first: parents before their children.
        for e in self.block.entries.iter().rev() {
            let _ = e.node.close().await;
        }
        self.block = Default::default();
        for (_, c) in &self.chardevs {
            c.backend.cleanup();
        }
        // The metrics server keeps answering (readyz: 503) until the
        // supervisor stops it last; its socket goes with it.
        self.metrics_server = None;
    }
}

fn arg_str<'a>(args: &'a Map<String, Value>, k: &str) -> &'a str {
    args.get(k).and_then(Value::as_str).unwrap_or_default()
}

impl ControlState {
    async fn execute(&mut self, name: &str, args: Map<String, Value>) -> QmpResult<Value> {
        let ctx = self.ctx.clone();
        match name {
            "query-version" => Ok(monitor::version_info()),
            "query-commands" => Ok(Value::Array(
                ctx.schema
                    .commands
                    .iter()
                    .map(|c| json!({"name": c.name}))
                    .collect(),
            )),
            "query-qmp-schema" => Ok(introspect::schema_info(&ctx.schema)),
            // The exit path (jobs, exports) runs in Shutdown; the monitor
            // session sends the reply and then asks the daemon to stop.
            "quit" => {
                // QSD's exit path runs before the reply: exports go
                // first, then the jobs are cancelled (after the drain's
                // pause of each block job).
                ctx.metrics.set_phase(crate::metrics::Phase::Stopping);
                self.delete_exports(None).await;
                self.cancel_all_jobs().await;
                Ok(json!({}))
            }
            "nbd-server-start" => self.nbd_server_start_legacy(&args).await,
            "nbd-server-stop" => self.nbd_server_stop().await,
            "__org.rsd_metrics-server-start" => self
                .metrics_server_start(&args)
                .await
                .map(|()| json!({}))
                .map_err(QmpError::generic),
            "__org.rsd_metrics-server-stop" => self.metrics_server_stop().await,
            "block-export-add" => self
                .block_export_add(&args, true)
                .await
                .map(|()| json!({}))
                .map_err(QmpError::hinted),
            "block-export-del" => {
                let hard = args.get("mode").and_then(Value::as_str) == Some("hard");
                self.block_export_del(arg_str(&args, "id"), hard).await
            }
            "query-block-exports" => Ok(self.query_block_exports()),
            // Deprecated forms: the export's id is its name.
            "nbd-server-add" => {
                let mut e = Map::new();
                let device = arg_str(&args, "device").to_string();
                let name = args
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or(&device)
                    .to_string();
                e.insert("type".into(), json!("nbd"));
                e.insert("id".into(), json!(name));
                e.insert("node-name".into(), json!(device));
                e.insert("name".into(), json!(name));
                for k in ["description", "writable"] {
                    if let Some(v) = args.get(k) {
                        e.insert(k.into(), v.clone());
                    }
                }
                if let Some(b) = args.get("bitmap") {
                    e.insert("bitmaps".into(), json!([b]));
                }
                self.block_export_add(&e, true)
                    .await
                    .map(|()| json!({}))
                    .map_err(QmpError::hinted)
            }
            "nbd-server-remove" => {
                let hard = args.get("mode").and_then(Value::as_str) == Some("hard");
                self.block_export_del(arg_str(&args, "name"), hard).await
            }
            "chardev-add" => self.chardev_add(&args).await,
            "chardev-remove" => self.chardev_remove(arg_str(&args, "id")).await,
            "chardev-change" => self.chardev_change(&args).await,
            "chardev-send-break" => self.chardev_send_break(arg_str(&args, "id")),
            "ringbuf-write" => self.ringbuf_write(&args),
            "ringbuf-read" => self.ringbuf_read(&args),
            "query-chardev" => self.query_chardev().await,
            "query-chardev-backends" => Ok(Value::Array(
                crate::chardev::BACKEND_NAMES
                    .iter()
                    .rev()
                    .map(|n| json!({"name": n}))
                    .collect(),
            )),
            "object-add" => self
                .object_add(&args)
                .map(|()| json!({}))
                .map_err(QmpError::hinted),
            "object-del" => self.object_del(arg_str(&args, "id")).map(|()| json!({})),
            "qom-list" => self.qom_list(arg_str(&args, "path")).await,
            "qom-get" => {
                self.qom_get(arg_str(&args, "path"), arg_str(&args, "property"))
                    .await
            }
            "qom-list-types" => Ok(qom_types::list_types(&args)),
            "qom-list-properties" => qom_types::list_properties(arg_str(&args, "typename")),
            "qom-set" => self
                .qom_set(
                    arg_str(&args, "path"),
                    arg_str(&args, "property"),
                    args.get("value").unwrap_or(&Value::Null),
                )
                .map(|()| json!({})),
            "blockdev-add" => self
                .blockdev_add(&args)
                .await
                .map(|()| json!({}))
                .map_err(QmpError::hinted),
            "blockdev-del" => self.blockdev_del(arg_str(&args, "node-name")).await,
            "block_resize" => self.block_resize(&args).await,
            "blockdev-snapshot-sync" => self.blockdev_snapshot_sync(&args).await,
            "blockdev-snapshot" => self.blockdev_snapshot(&args).await,
            "blockdev-snapshot-internal-sync" => self.blockdev_snapshot_internal_sync(&args).await,
            "transaction" => self.transaction(&args).await,
            "blockdev-snapshot-delete-internal-sync" => {
                self.blockdev_snapshot_delete_internal_sync(&args).await
            }
            "x-blockdev-change" => self.x_blockdev_change(&args).await,
            "x-blockdev-set-iothread" => self.x_blockdev_set_iothread(&args),
            "__org.rsd_query-iothreads" => Ok(self.query_iothreads()),
            "blockdev-reopen" => self.blockdev_reopen(&args).await,
            "blockdev-set-active" => self.blockdev_set_active(&args).await,
            "change-backing-file" => self.change_backing_file(&args).await,
            "query-named-block-nodes" => Ok(self.query_named_block_nodes(
                args.get("flat").and_then(Value::as_bool).unwrap_or(false),
            )),
            "query-block" => Ok(json!([])),
            "x-debug-query-block-graph" => Ok(self.query_block_graph()),
            "query-blockstats" => Ok(self.query_blockstats(
                args.get("query-nodes")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            )),
            "blockdev-create" => self.blockdev_create(&args).await,
            "x-blockdev-amend" => self.blockdev_amend(&args).await,
            "query-jobs" => Ok(self.query_jobs()),
            "job-pause" => {
                self.job_verb(arg_str(&args, "id"), crate::jobs::Verb::Pause)
                    .await
            }
            "job-resume" => {
                self.job_verb(arg_str(&args, "id"), crate::jobs::Verb::Resume)
                    .await
            }
            "job-cancel" => {
                self.job_verb(arg_str(&args, "id"), crate::jobs::Verb::Cancel)
                    .await
            }
            "job-complete" => {
                self.job_verb(arg_str(&args, "id"), crate::jobs::Verb::Complete)
                    .await
            }
            "job-finalize" => {
                self.job_verb(arg_str(&args, "id"), crate::jobs::Verb::Finalize)
                    .await
            }
            "job-dismiss" => {
                self.job_verb(arg_str(&args, "id"), crate::jobs::Verb::Dismiss)
                    .await
            }
            "query-block-jobs" => Ok(self.query_block_jobs()),
            "block-job-pause"
            | "block-job-resume"
            | "block-job-complete"
            | "block-job-finalize"
            | "block-job-dismiss"
            | "block-job-cancel"
            | "block-job-set-speed"
            | "block-job-change" => self.block_job_command(name, &args).await,
            "blockdev-mirror" => self.blockdev_mirror(&args).await,
            "block-stream" => self.block_stream(&args).await,
            "blockdev-backup" => self.blockdev_backup(&args, &jobs::Launch::Now).await,
            "drive-backup" => self.drive_backup(&args, &jobs::Launch::Now).await,
            "block-set-write-threshold" => self.set_write_threshold(&args),
            "block-dirty-bitmap-add"
            | "block-dirty-bitmap-remove"
            | "block-dirty-bitmap-clear"
            | "block-dirty-bitmap-enable"
            | "block-dirty-bitmap-disable"
            | "block-dirty-bitmap-merge"
            | "x-debug-block-dirty-bitmap-sha256" => self.bitmap_command(name, &args).await,
            "block-commit" => self.block_commit(&args).await,
            "drive-mirror" => self.drive_mirror(&args).await,
            "x-rsd-test-event" => {
                let mut data = Map::new();
                data.insert("message".into(), json!(arg_str(&args, "message")));
                ctx.events.emit("X_RSD_TEST_EVENT", Some(data));
                Ok(json!({}))
            }
            "x-rsd-test-crash" => self.test_crash(arg_str(&args, "id")),
            other => Err(QmpError::with_class(
                crate::qapi::ErrorClass::CommandNotFound,
                format!("The command {other} has not been found"),
            )),
        }
    }

    pub fn object_add(&mut self, args: &Map<String, Value>) -> Result<(), String> {
        let id = arg_str(args, "id").to_string();
        objects::check_id(&id)?;
        if self.objects.contains_key(&id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        let lookup = |kid: &str| match self.objects.get(kid) {
            Some(Object::Secret(s)) => Some(s.value.clone()),
            _ => None,
        };
        let obj = objects::create(args, &lookup)?;
        self.authz.insert(&id, obj.authz().cloned());
        self.objects.insert(id, obj);
        Ok(())
    }

    fn object_del(&mut self, id: &str) -> QmpResult<()> {
        // QEMU's can_be_deleted: a throttle group is not while a node of
        // the graph is its member. Nor, in rsd, an iothread that a node
        // or an export is in.
        let in_use = |o: &Object| {
            o.throttle_group().is_some_and(|g| {
                self.block.entries.iter().any(|e| {
                    e.node
                        .driver
                        .throttle()
                        .is_some_and(|t| Arc::ptr_eq(&t.group(), g))
                })
            })
        };
        match self.objects.get(id) {
            Some(o) if in_use(o) || (o.iothread().is_some() && self.iothread_in_use(id)) => Err(
                QmpError::generic(format!("object '{id}' is in use, can not be deleted")),
            ),
            Some(_) => {
                if let Some(t) = self.objects.remove(id).as_ref().and_then(Object::iothread) {
                    t.stop();
                }
                self.authz.remove(id);
                Ok(())
            }
            None => Err(QmpError::generic(format!("object '{id}' not found"))),
        }
    }

    async fn add_monitor(&mut self, chardev: String, pretty: bool) -> Result<(), String> {
        let Some((_, entry)) = self.chardevs.iter_mut().find(|(id, _)| *id == chardev) else {
            return Err(format!("chardev \"{chardev}\" not found"));
        };
        if entry.has_monitor {
            return Err(format!("chardev '{chardev}' is already in use"));
        }
        entry.has_monitor = true;
        let control = self.myself.clone();
        let dispatch: crate::qmp::Dispatch = Arc::new(move |name, args, span| {
            let control = control.clone();
            Box::pin(async move {
                match ractor::call!(control, ControlMsg::Execute, name, args, span) {
                    Ok(r) => r,
                    Err(e) => (Err(QmpError::generic(format!("internal error: {e}"))), 0),
                }
            })
        });
        let cfg = MonitorConfig {
            chardev: chardev.clone(),
            pretty,
            ctx: self.ctx.clone(),
            dispatch,
        };
        let spec = ChildSpec::actor(
            monitor::registry_name(&chardev),
            Restart::Permanent,
            MonitorActor,
            cfg,
        );
        actors::supervisor::start_child(&self.ctx.supervisor, spec).await
    }
}

/// Test hook: make a supervised actor fail inside its handler, or a
/// throttle group's timer fail under the group's lock (groups are not
/// actors: `throttle-group/<id>`).
fn test_crash(id: &str) -> QmpResult<Value> {
    if id == "control" {
        // Runs inside the control actor's handler: fail it right here.
        panic!("test hook: control crash requested");
    }
    let Some(cell) = ractor::registry::where_is(id) else {
        return Err(QmpError::generic(format!("no actor named '{id}'")));
    };
    let sent = if id.starts_with("monitor/") {
        ActorRef::<MonitorMsg>::from(cell)
            .cast(MonitorMsg::Crash)
            .is_ok()
    } else if id.starts_with("node/") {
        ActorRef::<crate::block::actor::NodeMsg>::from(cell)
            .cast(crate::block::actor::NodeMsg::Crash)
            .is_ok()
    } else if id.starts_with("job/") {
        ActorRef::<crate::jobs::JobMsg>::from(cell)
            .cast(crate::jobs::JobMsg::Crash)
            .is_ok()
    } else if id.starts_with("chardev/") {
        ActorRef::<crate::chardev::ChardevMsg>::from(cell)
            .cast(crate::chardev::ChardevMsg::Crash)
            .is_ok()
    } else if id.starts_with("export/") {
        ActorRef::<crate::exports::actor::ExportMsg>::from(cell)
            .cast(crate::exports::actor::ExportMsg::Crash)
            .is_ok()
    } else if id == crate::nbd::server::REGISTRY_NAME {
        ActorRef::<crate::nbd::server::ServerMsg>::from(cell)
            .cast(crate::nbd::server::ServerMsg::Crash)
            .is_ok()
    } else if id == crate::metrics::server::REGISTRY_NAME {
        ActorRef::<crate::metrics::server::MetricsServerMsg>::from(cell)
            .cast(crate::metrics::server::MetricsServerMsg::Crash)
            .is_ok()
    } else {
        false
    };
    if sent {
        Ok(json!({}))
    } else {
        Err(QmpError::generic(format!("cannot crash '{id}'")))
    }
}

impl ControlState {
    fn test_crash(&self, id: &str) -> QmpResult<Value> {
        let Some(group) = id.strip_prefix("throttle-group/") else {
            return test_crash(id);
        };
        match self.objects.get(group).and_then(Object::throttle_group) {
            Some(g) => {
                g.crash_timer();
                Ok(json!({}))
            }
            None => Err(QmpError::generic(format!("no throttle group '{group}'"))),
        }
    }
}
