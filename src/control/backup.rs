//! blockdev-backup (sync=full): checks, the job's users, the
//! copy-before-write hook on the source, and its removal at the end.
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::mirror::JOB_USER;
use super::{arg_str, ControlMsg, ControlState};
use crate::block::bitmap::DirtyBitmap;
use crate::block::node::Node;
use crate::block::perm::Perm;
use crate::block::serial::Tracker;
use crate::jobs::backup::{self, Backup, CbwHook, Copier};
use crate::jobs::OnError;
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

/// What the control actor undoes when a backup job ends.
pub struct BackupEnd {
    pub source: Arc<Node>,
    pub hook: String,
    pub users: Vec<u64>,
}

impl ControlState {
    pub(super) async fn blockdev_backup(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let err = |m: String| Err(QmpError::generic(m));
        let device = arg_str(args, "device").to_string();
        let Some(source) = self.block.find(&device).map(|e| e.node.clone()) else {
            return err(format!(
                "Cannot find device='{device}' nor node-name='{device}'"
            ));
        };
        let target_name = arg_str(args, "target").to_string();
        let Some(target) = self.block.find(&target_name).map(|e| e.node.clone()) else {
            return err(format!(
                "Cannot find device='{target_name}' nor node-name='{target_name}'"
            ));
        };
        let sync = arg_str(args, "sync");
        if sync != "full" {
            return err(format!(
                "rsd cannot run a backup with sync mode '{sync}' yet"
            ));
        }
        if let Some(m) = self.busy(&target_name) {
            return err(m);
        }
        let (job_id, speed) = self.job_id_and_speed(args)?;
        if source.size() != target.size() {
            self.stillborn_job(&job_id);
            return err("Source and target image have different sizes".into());
        }
        let desc = format!("{JOB_USER}backup");
        let t = self
            .block
            .add_user(
                &target_name,
                &desc,
                Perm::WRITE,
                Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED),
            )
            .map_err(QmpError::generic)?;
        let s = match self
            .block
            .add_user(&device, &desc, Perm::CONSISTENT_READ, Perm::ALL)
        {
            Ok(s) => s,
            Err(e) => {
                self.block.remove_user(t);
                return err(e);
            }
        };
        let cluster = target
            .driver
            .cluster_size()
            .map_or(65536, |c| c.clamp(65536, 1 << 20));
        let todo = Arc::new(DirtyBitmap::new(source.size(), cluster));
        todo.set_all();
        let copier = Arc::new(Copier {
            source: Arc::downgrade(&source),
            target,
            todo,
            tracker: Arc::new(Tracker::default()),
            done: AtomicU64::new(0),
        });
        // From here on the source's old contents are kept.
        let hook = format!("backup/{job_id}");
        source.hooks.add(Arc::new(CbwHook {
            name: hook.clone(),
            copier: copier.clone(),
        }));
        let b = Backup {
            copier,
            size: source.size(),
            on_source_error: OnError::parse(args.get("on-source-error").and_then(Value::as_str)),
            on_target_error: OnError::parse(args.get("on-target-error").and_then(Value::as_str)),
        };
        let end = BackupEnd {
            source,
            hook,
            users: vec![t, s],
        };
        let control = self.myself.clone();
        let on_end: crate::jobs::OnEnd = Box::new(move |_ok| {
            let _ = control.cast(ControlMsg::BackupEnded(Box::new(end)));
        });
        let flag = |k: &str| args.get(k).and_then(Value::as_bool).unwrap_or(true);
        self.start_job(
            &job_id,
            "backup",
            flag("auto-finalize"),
            flag("auto-dismiss"),
            Some((false, speed)),
            backup::start(b),
            on_end,
        )
        .await?;
        Ok(json!({}))
    }

    pub(super) fn backup_ended(&mut self, end: BackupEnd) {
        end.source.hooks.remove(&end.hook);
        for u in &end.users {
            self.block.remove_user(*u);
        }
    }
}
