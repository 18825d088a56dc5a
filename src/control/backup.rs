//! blockdev-backup and drive-backup: checks in QEMU's order, the job's
//! users, the copy-before-write hook on the source (and the read hook on
//! a fleecing target), and their removal at the end.
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::jobs::{JobSpec, Launch};
use super::mirror::JOB_USER;
use super::{arg_str, ControlMsg, ControlState};
use crate::block::bitmap::DirtyBitmap;
use crate::block::copier::{Copier, DEFAULT_CHUNK};
use crate::block::dirty::{Check, NamedBitmap, NodeBitmaps};
use crate::block::node::Node;
use crate::block::perm::Perm;
use crate::jobs::backup::{self, Backup, CbwHook, ViewReadHook, WORKERS};
use crate::jobs::OnError;
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

/// What the control actor undoes when a backup job ends.
pub struct BackupEnd {
    /// (node, hook name) pairs to remove.
    pub hooks: Vec<(Arc<Node>, String)>,
    pub users: Vec<u64>,
    /// A target drive-backup opened: it goes once nothing uses it.
    pub implicit_target: Option<String>,
}

/// x-perf, checked as QEMU checks it.
struct PerfOpts {
    workers: usize,
    /// 0: no limit.
    max_chunk: u64,
    min_cluster: u64,
}

/// rsd's bound on min-cluster-size: every copy buffers a cluster.
const MAX_MIN_CLUSTER: u64 = 64 << 20;
/// rsd's bound on max-workers: each worker buffers a chunk.
const MAX_WORKERS: usize = 64;

fn perf(args: &Map<String, Value>) -> Result<PerfOpts, String> {
    let p = args.get("x-perf").and_then(Value::as_object);
    let get = |k: &str| p.and_then(|p| p.get(k));
    // use-copy-range is accepted and ignored: rsd always copies through
    // a buffer (differences entry).
    let workers = get("max-workers").and_then(Value::as_i64).unwrap_or(64);
    if !(1..=i64::from(i32::MAX)).contains(&workers) {
        return Err(format!("max-workers must be between 1 and {}", i32::MAX));
    }
    let max_chunk = get("max-chunk").and_then(Value::as_i64).unwrap_or(0);
    if max_chunk < 0 {
        return Err("max-chunk must be zero (which means no limit) or positive".into());
    }
    let min_cluster = get("min-cluster-size").and_then(Value::as_u64).unwrap_or(0);
    Ok(PerfOpts {
        // Unset: rsd's own default; set: honoured up to rsd's bound.
        workers: if get("max-workers").is_some() {
            (workers as usize).min(MAX_WORKERS)
        } else {
            WORKERS
        },
        max_chunk: max_chunk as u64,
        min_cluster,
    })
}

/// A backup's bitmap and what happens to it at the end (bitmap-mode).
pub struct BackupBitmap {
    pub bitmap: Arc<NamedBitmap>,
    /// on-success, never or always.
    pub mode: String,
    /// The bitmap's bits when the job started; from then on the bitmap
    /// records only new writes (QEMU's successor).
    pub before: Vec<u64>,
    /// The source's bitmaps, and the one first among them when the job
    /// started: QEMU puts the successor there, and a synced bitmap is
    /// the successor under the old name, so it takes that place.
    pub list: Arc<NodeBitmaps>,
    pub first: String,
}

impl BackupBitmap {
    /// The job ended (`ok`: successfully): QEMU's bitmap-mode. The
    /// bitmap keeps the writes since the start; on-success (on success)
    /// and always drop what the job copied, never and a failed
    /// on-success take the old bits back, and a failed always takes
    /// back what was not copied (`left`).
    pub fn finish(&self, ok: bool, left: &DirtyBitmap) {
        let b = &self.bitmap;
        match (self.mode.as_str(), ok) {
            ("on-success", true) | ("always", true) => self.list.move_before(&b.name, &self.first),
            ("always", false) => {
                for (off, len) in runs(left) {
                    b.bits.set(off, len);
                }
                self.list.move_before(&b.name, &self.first);
            }
            _ => {
                let g = b.bits.granularity();
                for (i, w) in self.before.iter().enumerate() {
                    let mut w = *w;
                    while w != 0 {
                        let bit = w.trailing_zeros() as u64;
                        b.bits.set((i as u64 * 64 + bit) * g, g);
                        w &= w - 1;
                    }
                }
            }
        }
        b.set_busy(false);
    }
}

/// The dirty runs of a bitmap, from its start to its end once
/// (`next_run` wraps around to the start).
fn runs(b: &DirtyBitmap) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((off, len)) = b.next_run(at, 1 << 30) {
        if off < at {
            break;
        }
        out.push((off, len));
        at = off + len;
    }
    out
}

/// QEMU's checks of the sync mode against the bitmap options; the
/// bitmap to use and its mode, if one is given.
fn check_bitmap_args(
    args: &Map<String, Value>,
    source: &Node,
) -> Result<Option<(Arc<NamedBitmap>, String)>, String> {
    let sync = arg_str(args, "sync");
    let bitmap = args.get("bitmap").and_then(Value::as_str);
    let mode = args.get("bitmap-mode").and_then(Value::as_str);
    if matches!(sync, "bitmap" | "incremental") && bitmap.is_none() {
        return Err(format!(
            "must provide a valid bitmap name for '{sync}' sync mode"
        ));
    }
    if sync == "incremental" && mode.is_some_and(|m| m != "on-success") {
        return Err(format!(
            "Bitmap sync mode must be 'on-success' when using sync mode '{sync}'"
        ));
    }
    let Some(name) = bitmap else {
        if mode.is_some() {
            return Err("Cannot specify bitmap sync mode without a bitmap".into());
        }
        return Ok(None);
    };
    let Some(b) = source.bitmaps.find(name) else {
        return Err(format!("Bitmap '{name}' could not be found"));
    };
    let mode = match (mode, sync) {
        (Some(m), _) => m,
        (None, "incremental") => "on-success",
        (None, _) => return Err("Bitmap sync mode must be given when providing a bitmap".into()),
    };
    b.check(Check::AllowRo)?;
    if sync == "none" {
        return Err(format!(
            "sync mode '{sync}' does not produce meaningful bitmap outputs"
        ));
    }
    let sync = if sync == "incremental" {
        "bitmap"
    } else {
        sync
    };
    if mode == "never" && sync != "bitmap" {
        return Err(format!(
            "Bitmap sync mode '{mode}' has no meaningful effect when combined with sync mode '{sync}'"
        ));
    }
    Ok(Some((b, mode.to_string())))
}

impl ControlState {
    pub(super) async fn blockdev_backup(
        &mut self,
        args: &Map<String, Value>,
        launch: &Launch,
    ) -> QmpResult<Value> {
        let device = arg_str(args, "device").to_string();
        if self.block.find(&device).is_none() {
            return Err(not_found(&device));
        }
        let target = arg_str(args, "target").to_string();
        if self.block.find(&target).is_none() {
            return Err(not_found(&target));
        }
        self.start_backup(args, &device, &target, None, launch)
            .await
    }

    /// drive-backup: the target image is created (mode absolute-paths,
    /// the default: with the source's backing for sync=top, the source
    /// itself for sync=none) or opened (existing), as an implicit node
    /// with discard and detect-zeroes set to unmap, then backed up to
    /// like blockdev-backup; it goes when the job has ended.
    pub(super) async fn drive_backup(
        &mut self,
        args: &Map<String, Value>,
        launch: &Launch,
    ) -> QmpResult<Value> {
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
        let mut sync = arg_str(args, "sync").to_string();
        let src_backing = self
            .block
            .child_of(src, "backing")
            .map(|b| (b.name.clone(), self.block.filename(b), b.node.driver.name()));
        // With nothing below the source, top is full (as in QEMU).
        if sync == "top" && src_backing.is_none() {
            sync = "full".into();
        }
        // The image the target's header names as its backing file, and
        // the node the target opens as its backing.
        let backing = match sync.as_str() {
            "top" => src_backing,
            "none" => Some((
                src.name.clone(),
                self.block.filename(src),
                src.node.driver.name(),
            )),
            _ => None,
        };
        let existing = args.get("mode").and_then(Value::as_str) == Some("existing");
        if !existing {
            match format.as_str() {
                "qcow2" => {
                    let (name, fmt) = match &backing {
                        Some((_, f, d)) => (f.clone(), *d),
                        None => (String::new(), ""),
                    };
                    super::snapshot::create_overlay_file(&file, size, &name, fmt)
                        .await
                        .map_err(QmpError::generic)?;
                }
                "raw" => create_raw(&file, size)?,
                other => {
                    return Err(QmpError::generic(format!(
                        "rsd cannot create '{other}' images for drive-backup yet"
                    )))
                }
            }
        }
        let mut opts = Map::new();
        opts.insert("driver".into(), json!(format));
        opts.insert("discard".into(), json!("unmap"));
        opts.insert("detect-zeroes".into(), json!("unmap"));
        opts.insert("file".into(), json!({"driver": "file", "filename": file}));
        if format == "qcow2" {
            match &backing {
                Some((name, _, _)) => {
                    opts.insert("backing".into(), json!(name));
                }
                None if existing => {
                    opts.insert("backing".into(), Value::Null);
                }
                None => {}
            }
        }
        let target = self
            .block
            .add_implicit(&self.objects, &opts)
            .map_err(QmpError::generic)?;
        let mut args = args.clone();
        args.insert("sync".into(), json!(sync));
        let r = self
            .start_backup(&args, &device, &target, Some(target.clone()), launch)
            .await;
        if r.is_err() {
            self.block.release_unused(&target);
        }
        r
    }

    async fn start_backup(
        &mut self,
        args: &Map<String, Value>,
        device: &str,
        target_name: &str,
        implicit_target: Option<String>,
        launch: &Launch,
    ) -> QmpResult<Value> {
        let err = |m: String| Err(QmpError::generic(m));
        let (Some(source), Some(target)) = (
            self.block.find(device).map(|e| e.node.clone()),
            self.block.find(target_name).map(|e| e.node.clone()),
        ) else {
            return Err(not_found(device));
        };
        let perf = perf(args);
        let bitmap = check_bitmap_args(args, &source).map_err(QmpError::generic)?;
        if Arc::ptr_eq(&source, &target) {
            return err("Source and target cannot be the same".into());
        }
        let compress = args.get("compress").and_then(Value::as_bool) == Some(true);
        if compress && !target.driver.can_compress() {
            // QEMU names the target's device, which a node has none of.
            return err("Compression is not supported for this drive ".into());
        }
        // The source stays free for more backups (QEMU's job sits on its
        // filter above the source); the target is the job's.
        if let Some(m) = self.busy(target_name) {
            return err(m);
        }
        let perf = perf.map_err(QmpError::generic)?;
        if source.size() != target.size() {
            return err("Source and target image have different sizes".into());
        }
        // rsd puts no filter node above the source (differences entry),
        // but the name is checked as QEMU checks the filter's.
        if let Some(f) = args.get("filter-node-name").and_then(Value::as_str) {
            crate::block::graph::check_node_name(f)
                .map_err(|e| QmpError::generic(format!("Could not create node: {e}")))?;
            if self.block.find(f).is_some() {
                return err(format!(
                    "Could not create node: Duplicate nodes with node-name='{f}'"
                ));
            }
        }
        if perf.min_cluster != 0 && !perf.min_cluster.is_power_of_two() {
            return err(
                "Could not create node: Cannot create block-copy-state: min-cluster-size needs to be a power of 2"
                    .into(),
            );
        }
        if perf.min_cluster > MAX_MIN_CLUSTER {
            return err("Could not create node: rsd limits min-cluster-size to 64 MiB".into());
        }
        let cluster = target
            .driver
            .cluster_size()
            .map_or(65536, |c| c.clamp(65536, 1 << 20))
            .max(perf.min_cluster);
        let desc = format!("{JOB_USER}backup");
        // Where QEMU creates its filter: the target is taken for writes
        // and shared for them, as QEMU's copy-before-write shares it (a
        // fleecing image's backing is the source, written by the guest).
        let t = self
            .block
            .add_user(
                target_name,
                &desc,
                Perm::WRITE,
                Perm::ALL.without(Perm::RESIZE),
            )
            .map_err(|e| QmpError::generic(format!("Could not create node: {e}")))?;
        if perf.max_chunk != 0 && perf.max_chunk < cluster {
            self.block.remove_user(t);
            return err(format!(
                "Required max-chunk ({}) is less than backup cluster size ({cluster})",
                perf.max_chunk
            ));
        }
        let (job_id, speed) = match self.job_id_and_speed(args) {
            Ok(j) => j,
            Err(e) => {
                self.block.remove_user(t);
                return Err(e);
            }
        };
        let discard_source = args.get("discard-source").and_then(Value::as_bool) == Some(true);
        // discard-source writes the source: QEMU's job takes that once
        // it exists.
        let src_perm = if discard_source {
            Perm::CONSISTENT_READ.union(Perm::WRITE)
        } else {
            Perm::CONSISTENT_READ
        };
        let s = match self.block.add_user(device, &desc, src_perm, Perm::ALL) {
            Ok(s) => s,
            Err(e) => {
                self.block.remove_user(t);
                self.stillborn_job(&job_id);
                return err(e);
            }
        };
        let chunk = match perf.max_chunk {
            0 => DEFAULT_CHUNK,
            c => c.min(DEFAULT_CHUNK),
        };
        let mut copier = Copier::new(&source, target.clone(), cluster, chunk.max(cluster));
        copier.discard_source = discard_source;
        copier.compress = compress;
        let sync = arg_str(args, "sync");
        match sync {
            // What the bitmap marks.
            "bitmap" | "incremental" => {
                if let Some((b, _)) = &bitmap {
                    for (off, len) in runs(&b.bits) {
                        copier.todo.set(off, len);
                    }
                }
            }
            // Only what the top layer allocates; the rest of the target
            // is left as it is.
            "top" => {
                if let Err(e) = mark_allocated(&source, &copier).await {
                    self.block.remove_user(t);
                    self.block.remove_user(s);
                    return err(e);
                }
            }
            // Full, and none (copy-before-write may copy any cluster).
            _ => copier.todo.set_all(),
        }
        let copier = Arc::new(copier);
        // The bitmap records only new writes from here on; its old bits
        // come back at the end as bitmap-mode says.
        let bitmap = bitmap.map(|(b, mode)| {
            let before = b.bits.words();
            b.bits.clear_all();
            b.set_busy(true);
            let first = source
                .bitmaps
                .all()
                .first()
                .map_or_else(|| b.name.clone(), |f| f.name.clone());
            BackupBitmap {
                bitmap: b,
                mode,
                before,
                list: source.bitmaps.clone(),
                first,
            }
        });
        // From here on the source's old contents are kept.
        let hook = format!("backup/{job_id}");
        let mut hooks = vec![(source.clone(), hook.clone())];
        source.hooks.add(Arc::new(CbwHook {
            name: hook.clone(),
            copier: copier.clone(),
        }));
        if self.chain_holds(target_name, device) {
            target.hooks.add(Arc::new(ViewReadHook {
                name: hook.clone(),
                copier: copier.clone(),
            }));
            hooks.push((target.clone(), hook));
        }
        let b = Backup {
            copier,
            size: source.size(),
            background: sync != "none",
            workers: perf.workers,
            on_source_error: OnError::parse(args.get("on-source-error").and_then(Value::as_str)),
            on_target_error: OnError::parse(args.get("on-target-error").and_then(Value::as_str)),
        };
        let end = BackupEnd {
            hooks,
            users: vec![t, s],
            implicit_target,
        };
        let control = self.myself.clone();
        let left = b.copier.todo.clone();
        let on_end: crate::jobs::OnEnd = Box::new(move |ok| {
            if let Some(bm) = &bitmap {
                bm.finish(ok, &left);
            }
            let _ = control.cast(ControlMsg::BackupEnded(Box::new(end)));
        });
        let flag = |k: &str| args.get(k).and_then(Value::as_bool).unwrap_or(true);
        let spec = JobSpec {
            kind: "backup",
            auto_finalize: flag("auto-finalize"),
            auto_dismiss: flag("auto-dismiss"),
            block: Some((false, speed)),
        };
        self.launch_job(&job_id, spec, backup::start(b), on_end, launch)
            .await?;
        Ok(json!({}))
    }

    /// `node`'s backing chain (below it) holds `other`.
    fn chain_holds(&self, node: &str, other: &str) -> bool {
        let Some(mut at) = self.block.find(node) else {
            return false;
        };
        while let Some(b) = self.block.child_of(at, "backing") {
            if b.name == other {
                return true;
            }
            at = b;
        }
        false
    }

    pub(super) fn backup_ended(&mut self, end: BackupEnd) {
        for (node, hook) in &end.hooks {
            node.hooks.remove(hook);
        }
        for u in &end.users {
            self.block.remove_user(*u);
        }
        if let Some(t) = &end.implicit_target {
            self.block.release_unused(t);
        }
    }
}

fn not_found(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

/// A raw image of `size` bytes, announced as QEMU announces it.
fn create_raw(file: &str, size: u64) -> QmpResult<()> {
    println!("Formatting '{file}', fmt=raw size={size}");
    let f = std::fs::File::create(file).map_err(|e| {
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
    })
}

/// sync=top: marks the clusters the source's own layer allocates.
async fn mark_allocated(source: &Node, copier: &Copier) -> Result<(), String> {
    let size = source.size();
    let mut off = 0;
    while off < size {
        let ext = source
            .block_status(off, size - off)
            .await
            .map_err(|e| e.msg)?;
        let len = ext.len.clamp(1, size - off);
        if ext.depth == 1 {
            copier.todo.set(off, len);
        }
        off += len;
    }
    Ok(())
}
