//! blockdev-mirror: QEMU's checks in its order, the mirror_top filter put
//! above the source (its parents move onto it), the job's users of the
//! nodes, and the graph's tidying when the job ends (the filter's
//! parents move to the target after a pivot, back to the source after
//! anything else, and the filter goes).
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::{arg_str, ControlMsg, ControlState};
use crate::block::bitmap::DirtyBitmap;
use crate::block::mirror_top::MirrorTop;
use crate::block::node::Node;
use crate::block::perm::Perm;
use crate::jobs::mirror::{self, DirtyHook, Mirror, SyncMode};
use crate::jobs::OnError;
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

/// How a job's users of nodes are described (QEMU's op blocker reason).
pub const JOB_USER: &str = "block device is in use by block job: ";

/// QEMU's DEFAULT_MIRROR_BUF_SIZE.
const DEFAULT_BUF_SIZE: u64 = 16 << 20;

/// A mirror job to start (blockdev-mirror, active commit).
pub struct MirrorPlan {
    pub job_id: String,
    pub kind: &'static str,
    pub device: String,
    pub target_name: String,
    pub sync: SyncMode,
    pub granularity: u64,
    pub buf_size: u64,
    pub unmap: bool,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    pub filter_name: Option<String>,
    pub speed: u64,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    pub write_blocking: bool,
    /// The target reads as zeroes already: only allocated data is copied.
    pub new_target: bool,
    /// The target was made writable for the job (an active commit's
    /// base): read-only again unless the job pivots onto it.
    pub restore_read_only: bool,
}

/// What the control actor tidies when a mirror job ends.
pub struct MirrorEnd {
    pub filter: String,
    pub filter_edge: Arc<crate::block::child::Child>,
    pub source: String,
    pub target: String,
    pub target_node: Arc<Node>,
    pub source_node: Arc<Node>,
    pub hook: String,
    pub users: Vec<u64>,
    pub restore_read_only: bool,
}

fn not_found(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

impl ControlState {
    pub(super) async fn blockdev_mirror(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        self.mirror_into(args, false).await
    }

    /// blockdev-mirror's work; `new_target`: the target was just created
    /// (it reads as zeroes), so only what the source holds is copied.
    async fn mirror_into(
        &mut self,
        args: &Map<String, Value>,
        new_target: bool,
    ) -> QmpResult<Value> {
        let device = arg_str(args, "device").to_string();
        let Some(src) = self.block.find(&device) else {
            return Err(not_found(&device));
        };
        let source = src.node.clone();
        let target_name = arg_str(args, "target").to_string();
        let Some(tgt) = self.block.find(&target_name) else {
            return Err(not_found(&target_name));
        };
        let target = tgt.node.clone();
        // No default id: nodes from --blockdev have no device name.
        // Busy nodes (QEMU's op blockers).
        if let Some(u) = tgt.users.iter().find(|u| u.desc.starts_with(JOB_USER)) {
            return Err(QmpError::generic(format!(
                "Node '{target_name}' is busy: {}",
                u.desc
            )));
        }
        if let Some((parent, _)) = self
            .block
            .parents(&target_name)
            .into_iter()
            .find(|(_, c)| c.role == "backing")
        {
            return Err(QmpError::generic(format!(
                "Node '{target_name}' is busy: node is used as backing hd of '{parent}'"
            )));
        }
        if let Some(r) = args.get("replaces").and_then(Value::as_str) {
            if self.block.find(r).is_none() {
                return Err(QmpError::generic(format!(
                    "Failed to find node with node-name='{r}'"
                )));
            }
            if r != device {
                return Err(QmpError::generic(format!(
                    "Cannot replace '{r}' by a node mirrored from '{device}', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data"
                )));
            }
        }
        let granularity = args.get("granularity").and_then(Value::as_i64).unwrap_or(0);
        if granularity != 0 && !(512..=64 << 20).contains(&granularity) {
            return Err(QmpError::generic(
                "Parameter 'granularity' expects a value in range [512B, 64MB]",
            ));
        }
        if granularity & (granularity - 1).max(0) != 0 {
            return Err(QmpError::generic(
                "Parameter 'granularity' expects a power of 2",
            ));
        }
        let sync = match arg_str(args, "sync") {
            "full" => SyncMode::Full,
            "top" => SyncMode::Top,
            "none" => SyncMode::None,
            other => {
                return Err(QmpError::generic(format!(
                    "Sync mode '{other}' not supported"
                )))
            }
        };
        let buf_size = match args.get("buf-size").and_then(Value::as_i64) {
            Some(b) if b < 0 => return Err(QmpError::generic("Invalid parameter 'buf-size'")),
            Some(b) if b > 0 => b as u64,
            _ => DEFAULT_BUF_SIZE,
        };
        if Arc::ptr_eq(&source, &target) {
            return Err(QmpError::generic("Can't mirror node into itself"));
        }
        if !self.block.parents(&device).is_empty() || source.driver.is_filter() {
            return Err(QmpError::generic("Need a root block node"));
        }
        let (job_id, speed) = self.job_id_and_speed(args)?;
        if target.read_only() {
            self.stillborn_job(&job_id);
            return Err(QmpError::generic("Block node is read-only"));
        }
        let granularity = match granularity {
            0 => target
                .driver
                .cluster_size()
                .map_or(65536, |c| c.clamp(4096, 65536)),
            g => g as u64,
        };
        let flag = |k: &str| args.get(k).and_then(Value::as_bool).unwrap_or(true);
        let plan = MirrorPlan {
            job_id,
            kind: "mirror",
            device,
            target_name,
            sync,
            granularity,
            buf_size,
            unmap: args.get("unmap").and_then(Value::as_bool).unwrap_or(true),
            on_source_error: OnError::parse(args.get("on-source-error").and_then(Value::as_str)),
            on_target_error: OnError::parse(args.get("on-target-error").and_then(Value::as_str)),
            filter_name: args
                .get("filter-node-name")
                .and_then(Value::as_str)
                .map(str::to_string),
            speed,
            auto_finalize: flag("auto-finalize"),
            auto_dismiss: flag("auto-dismiss"),
            write_blocking: arg_str(args, "copy-mode") == "write-blocking",
            new_target,
            restore_read_only: false,
        };
        self.start_mirror(plan).await?;
        Ok(json!({}))
    }

    /// Puts the mirror_top filter above the source (its parents move
    /// onto it), takes the job's users of the nodes, hooks the source's
    /// writes and starts the job.
    pub(super) async fn start_mirror(&mut self, p: MirrorPlan) -> QmpResult<()> {
        let (source, target) = match (self.block.find(&p.device), self.block.find(&p.target_name)) {
            (Some(s), Some(t)) => (s.node.clone(), t.node.clone()),
            _ => return Err(not_found(&p.device)),
        };
        let (device, target_name, job_id) =
            (p.device.clone(), p.target_name.clone(), p.job_id.clone());
        let filter = MirrorTop::new(source.clone());
        let filter_name = self
            .block
            .add_filter(
                p.filter_name.as_deref(),
                Box::new(filter.clone()),
                "backing",
                &device,
            )
            .map_err(QmpError::generic)?;
        if let Err(e) = self.block.replace_node(&device, &filter_name).await {
            self.block.remove_unused(&filter_name);
            return Err(QmpError::generic(e));
        }
        let desc = format!("{JOB_USER}{}", p.kind);
        // The job writes the target; nobody else may (QEMU's perms).
        let users = (|| -> Result<Vec<u64>, String> {
            // A commit's target is a backing node its overlay reads.
            let shared = if p.kind == "commit" {
                Perm::WRITE_UNCHANGED.union(Perm::CONSISTENT_READ)
            } else {
                Perm::WRITE_UNCHANGED
            };
            let t = self
                .block
                .add_user(&target_name, &desc, Perm::WRITE, shared)?;
            match self
                .block
                .add_user(&device, &desc, Perm::CONSISTENT_READ, Perm::ALL)
            {
                Ok(s) => Ok(vec![t, s]),
                Err(e) => {
                    self.block.remove_user(t);
                    Err(e)
                }
            }
        })();
        let users = match users {
            Ok(u) => u,
            Err(e) => {
                let _ = self.block.replace_node(&filter_name, &device).await;
                self.block.remove_unused(&filter_name);
                return Err(QmpError::generic(e));
            }
        };
        let dirty = Arc::new(DirtyBitmap::new(source.size(), p.granularity));
        filter.show_bitmap(dirty.clone());
        let hook = format!("mirror/{job_id}");
        source.hooks.add(Arc::new(DirtyHook {
            name: hook.clone(),
            bitmap: dirty.clone(),
        }));
        let end = MirrorEnd {
            filter: filter_name,
            filter_edge: filter.edge(),
            source: device.clone(),
            target: target_name,
            target_node: target.clone(),
            source_node: source.clone(),
            hook,
            users,
            restore_read_only: p.restore_read_only,
        };
        let m = Mirror {
            source,
            target,
            filter,
            sync: p.sync,
            granularity: p.granularity,
            buf_size: p.buf_size,
            unmap: p.unmap,
            on_source_error: p.on_source_error,
            on_target_error: p.on_target_error,
            dirty,
            target_is_zero: p.new_target,
        };
        let control = self.myself.clone();
        let on_end: crate::jobs::OnEnd = Box::new(move |_ok| {
            let _ = control.cast(ControlMsg::MirrorEnded(Box::new(end)));
        });
        self.start_job(
            &job_id,
            p.kind,
            p.auto_finalize,
            p.auto_dismiss,
            Some((true, p.speed)),
            mirror::start(m),
            on_end,
        )
        .await?;
        if let Some(sh) = self.job(&job_id) {
            if let Some(b) = &sh.block {
                b.write_blocking
                    .store(p.write_blocking, std::sync::atomic::Ordering::Release);
            }
        }
        Ok(())
    }

    /// drive-mirror: the target image is created (mode absolute-paths,
    /// the default) or opened (existing), as an implicit node, then
    /// mirrored to like blockdev-mirror; it goes when nothing uses it.
    pub(super) async fn drive_mirror(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let device = arg_str(args, "device").to_string();
        let Some(src) = self.block.find(&device) else {
            return Err(not_found(&device));
        };
        let format = args
            .get("format")
            .and_then(Value::as_str)
            .unwrap_or(src.node.driver.name())
            .to_string();
        let size = src.node.size();
        let file = arg_str(args, "target").to_string();
        let top = arg_str(args, "sync") == "top";
        let backing = self
            .block
            .child_of(src, "backing")
            .map(|b| (b.name.clone(), self.block.filename(b), b.node.driver.name()));
        if args.get("mode").and_then(Value::as_str) != Some("existing") {
            match format.as_str() {
                "qcow2" => {
                    let (name, fmt) = match (&backing, top) {
                        (Some((_, f, d)), true) => (f.clone(), *d),
                        _ => (String::new(), ""),
                    };
                    super::snapshot::create_overlay_file(&file, size, &name, fmt)
                        .await
                        .map_err(QmpError::generic)?;
                }
                "raw" => {
                    let f = std::fs::File::create(&file).map_err(|e| {
                        QmpError::generic(format!(
                            "Could not create '{file}': {}",
                            crate::util::os_msg(&e)
                        ))
                    })?;
                    f.set_len(size).map_err(|e| {
                        QmpError::generic(format!(
                            "Could not resize file: {}",
                            crate::util::os_msg(&e)
                        ))
                    })?;
                }
                other => {
                    return Err(QmpError::generic(format!(
                        "rsd cannot create '{other}' images for drive-mirror yet"
                    )))
                }
            }
        }
        let mut opts = Map::new();
        opts.insert("driver".into(), json!(format));
        if let Some(n) = args.get("node-name") {
            opts.insert("node-name".into(), n.clone());
        }
        opts.insert("file".into(), json!({"driver": "file", "filename": file}));
        // The source's backing for a top sync; otherwise none (an
        // existing image's header may name one: QEMU opens it without).
        let existing = args.get("mode").and_then(Value::as_str) == Some("existing");
        if format == "qcow2" {
            match (&backing, top) {
                (Some((name, _, _)), true) => {
                    opts.insert("backing".into(), json!(name));
                }
                _ if existing => {
                    opts.insert("backing".into(), Value::Null);
                }
                _ => {}
            }
        }
        let target = self
            .block
            .add_implicit(&self.objects, &opts)
            .map_err(QmpError::generic)?;
        let mut m = args.clone();
        for k in ["format", "node-name", "mode"] {
            m.remove(k);
        }
        m.insert("target".into(), json!(target));
        let created = args.get("mode").and_then(Value::as_str) != Some("existing");
        let r = self.mirror_into(&m, created).await;
        if r.is_err() {
            self.block.release_unused(&target);
        }
        r
    }

    /// A job QEMU creates and drops again when a later check fails: its
    /// `created` and `null` events.
    pub(super) fn stillborn_job(&self, id: &str) {
        for status in ["created", "null"] {
            let mut d = Map::new();
            d.insert("status".into(), json!(status));
            d.insert("id".into(), json!(id));
            self.ctx.events.emit("JOB_STATUS_CHANGE", Some(d));
        }
    }

    /// The graph after a mirror job: the filter's parents go to the
    /// target if the job pivoted (the filter's edge points there now),
    /// else back to the source; the filter, the hook and the job's users
    /// go.
    pub(super) async fn mirror_ended(&mut self, end: MirrorEnd) {
        end.source_node.hooks.remove(&end.hook);
        for u in &end.users {
            self.block.remove_user(*u);
        }
        let pivoted = end
            .filter_edge
            .get()
            .is_some_and(|n| Arc::ptr_eq(&n, &end.target_node));
        let to = if pivoted { &end.target } else { &end.source };
        if let Err(e) = self.block.replace_node(&end.filter, to).await {
            tracing::warn!(filter = %end.filter, error = %e, "mirror filter left in place");
            return;
        }
        self.block.remove_unused(&end.filter);
        // A target drive-mirror made goes once nothing uses it.
        self.block.release_unused(&end.target);
        if !pivoted && end.restore_read_only {
            self.make_read_only(&end.target).await;
        }
        if pivoted {
            // The source leaves with nothing using it, as after QEMU's
            // bdrv_replace_node (inline children of it go too).
            self.block.release_unused(&end.source);
        }
    }
}
