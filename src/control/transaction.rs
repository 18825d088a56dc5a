//! `transaction`: several actions, all or none.
//!
//! Each action is prepared in order; one that fails undoes the ones
//! before it (in reverse) and its error is the reply. An internal
//! snapshot is made at prepare (undone by deleting it, as QEMU's abort
//! does). An external snapshot makes its checks and its overlay file at
//! prepare, and switches the graph at commit, after every action is
//! prepared: the switch is the one step rsd cannot take back (the base is
//! closed and reopened read-only), so nothing may fail after it
//! (differences entry 43).
//!
//! A backup action creates its job at prepare and starts it at commit,
//! newest first, inside the transaction's drain (each new job pauses
//! once, and all run again once every one has started), as QEMU does.
//! With `completion-mode: grouped` the jobs form a group that ends
//! together (jobs/group.rs).
use serde_json::{json, Map, Value};

use super::bitmaps::{change, prepare_remove, Changed};
use super::jobs::Launch;
use super::{arg_str, ControlState};
use crate::jobs::group::Group;
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

/// Actions that take completion-mode=grouped (the job actions).
const GROUPED: [&str; 2] = ["blockdev-backup", "drive-backup"];

/// How to take a prepared action back.
enum Undo {
    InternalSnapshot {
        device: String,
        name: String,
    },
    /// A bitmap command's change.
    Bitmap(Changed),
    /// A backup job created: cancelled again (and started at commit).
    Job(String),
}

/// What a prepared action still does at commit.
enum Commit {
    Snapshot(Map<String, Value>),
    SnapshotSync(String, Map<String, Value>),
    /// block-dirty-bitmap-remove (node, name), checked at prepare.
    BitmapRemove(String, String),
}

impl ControlState {
    pub(super) async fn transaction(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let actions: Vec<Value> = args
            .get("actions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mode = args
            .get("properties")
            .and_then(|p| p.get("completion-mode"))
            .and_then(Value::as_str)
            .unwrap_or("individual");
        let kind = |a: &Value| a["type"].as_str().unwrap_or_default().to_string();
        if mode != "individual" {
            if let Some(t) = actions
                .iter()
                .map(kind)
                .find(|t| !GROUPED.contains(&t.as_str()))
            {
                return Err(QmpError::generic(format!(
                    "Action '{t}' does not support transaction property completion-mode = {mode}"
                )));
            }
        }
        let launch = Launch::Held((mode == "grouped").then(Group::new));
        let mut undo = Vec::new();
        let mut commit = Vec::new();
        for a in &actions {
            let data = a["data"].as_object().cloned().unwrap_or_default();
            if let Err(e) = self
                .prepare(&kind(a), &data, &launch, &mut undo, &mut commit)
                .await
            {
                self.roll_back(undo).await;
                return Err(e);
            }
        }
        let jobs: Vec<String> = undo
            .iter()
            .filter_map(|u| match u {
                Undo::Job(id) => Some(id.clone()),
                _ => None,
            })
            .collect();
        for c in commit {
            let r = match c {
                Commit::Snapshot(data) => self.blockdev_snapshot(&data).await,
                Commit::SnapshotSync(base, opts) => self.put_overlay(&base, &opts, false).await,
                Commit::BitmapRemove(node, name) => self
                    .bitmap_remove(&node, &name)
                    .await
                    .map(|()| json!({}))
                    .map_err(QmpError::generic),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e.desc, "transaction: a snapshot switch failed at commit");
                for id in jobs.iter().rev() {
                    let _ = self.job_verb(id, crate::jobs::Verb::Cancel).await;
                }
                return Err(e);
            }
        }
        self.start_held_jobs(&jobs).await;
        Ok(json!({}))
    }

    /// Starts the transaction's jobs newest first, each held paused by
    /// the drain, then lets them all run, newest first.
    async fn start_held_jobs(&mut self, ids: &[String]) {
        let held: Vec<_> = ids.iter().rev().filter_map(|id| self.job(id)).collect();
        for sh in &held {
            sh.hold();
            self.begin_job(&sh.id).await;
        }
        for sh in &held {
            sh.release();
        }
    }

    async fn prepare(
        &mut self,
        kind: &str,
        data: &Map<String, Value>,
        launch: &Launch,
        undo: &mut Vec<Undo>,
        commit: &mut Vec<Commit>,
    ) -> QmpResult<()> {
        match kind {
            "abort" => Err(QmpError::generic("Transaction aborted using Abort action")),
            "blockdev-snapshot-internal-sync" => {
                self.blockdev_snapshot_internal_sync(data).await?;
                undo.push(Undo::InternalSnapshot {
                    device: arg_str(data, "device").to_string(),
                    name: arg_str(data, "name").to_string(),
                });
                Ok(())
            }
            "blockdev-backup" | "drive-backup" => {
                let before: Vec<String> = self.job_ids();
                let r = if kind == "blockdev-backup" {
                    self.blockdev_backup(data, launch).await
                } else {
                    self.drive_backup(data, launch).await
                };
                r?;
                if let Some(id) = self.job_ids().into_iter().find(|j| !before.contains(j)) {
                    undo.push(Undo::Job(id));
                }
                Ok(())
            }
            k if k.starts_with("block-dirty-bitmap-") => self
                .prepare_bitmap(k, data, undo, commit)
                .map_err(QmpError::generic),
            "blockdev-snapshot" => {
                self.blockdev_snapshot_checks(data)?;
                commit.push(Commit::Snapshot(data.clone()));
                Ok(())
            }
            "blockdev-snapshot-sync" => {
                let (base, opts) = self.snapshot_sync_prepare(data).await?;
                commit.push(Commit::SnapshotSync(base, opts));
                Ok(())
            }
            other => Err(QmpError::generic(format!(
                "rsd cannot run '{other}' in a transaction yet"
            ))),
        }
    }

    /// A bitmap action, done at once (and undoable) except remove,
    /// which is checked here and done at commit.
    fn prepare_bitmap(
        &mut self,
        kind: &str,
        data: &Map<String, Value>,
        undo: &mut Vec<Undo>,
        commit: &mut Vec<Commit>,
    ) -> Result<(), String> {
        if kind == "block-dirty-bitmap-remove" {
            let (node, name) = (arg_str(data, "node"), arg_str(data, "name"));
            prepare_remove(&self.block, node, name)?;
            commit.push(Commit::BitmapRemove(node.to_string(), name.to_string()));
            return Ok(());
        }
        undo.push(Undo::Bitmap(change(&self.block, kind, data)?));
        Ok(())
    }

    async fn roll_back(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            match u {
                Undo::Bitmap(c) => c.undo(),
                Undo::Job(id) => {
                    let _ = self.job_verb(&id, crate::jobs::Verb::Cancel).await;
                }
                Undo::InternalSnapshot { device, name } => {
                    if let Some(n) = self.block.find(&device).map(|e| e.node.clone()) {
                        if let Err(e) = n.driver.snapshot_delete(None, Some(&name)).await {
                            tracing::warn!(node = %device, error = %e.msg, "transaction: snapshot not undone");
                        }
                    }
                }
            }
        }
    }
}
