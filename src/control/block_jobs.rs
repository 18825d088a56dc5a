//! The block-job commands: query-block-jobs and the legacy block-job-*
//! verbs (which find only block jobs, by `device` = job id), and the
//! commands that start block jobs.
use serde_json::{json, Map, Value};

use super::{arg_str, ControlState};
use crate::jobs::{JobMsg, Verb};
use crate::qapi::error::QmpResult;
use crate::qapi::{ErrorClass, QmpError};

impl ControlState {
    pub(super) fn query_block_jobs(&self) -> Value {
        let list = self
            .jobs
            .lock()
            .map(|j| j.iter().filter_map(|s| s.block_info()).collect())
            .unwrap_or_default();
        Value::Array(list)
    }

    /// The block job with this id, or QEMU's DeviceNotActive error.
    fn block_job_actor(&mut self, id: &str) -> QmpResult<ractor::ActorRef<JobMsg>> {
        let found = self.job(id).filter(|s| s.block.is_some());
        let Some(sh) = found else {
            return Err(QmpError::with_class(
                ErrorClass::DeviceNotActive,
                format!("Block job '{id}' not found"),
            ));
        };
        sh.gate
            .store(self.seq, std::sync::atomic::Ordering::Release);
        super::jobs::job_actor(id).ok_or_else(|| {
            QmpError::with_class(
                ErrorClass::DeviceNotActive,
                format!("Block job '{id}' not found"),
            )
        })
    }

    fn reply(r: Result<Result<(), String>, ractor::RactorErr<JobMsg>>) -> QmpResult<Value> {
        match r {
            Ok(Ok(())) => Ok(json!({})),
            Ok(Err(e)) => Err(QmpError::generic(e)),
            Err(e) => Err(QmpError::generic(format!("internal error: {e}"))),
        }
    }

    pub(super) async fn block_job_command(
        &mut self,
        name: &str,
        args: &Map<String, Value>,
    ) -> QmpResult<Value> {
        let id = match name {
            "block-job-dismiss" | "block-job-finalize" | "block-job-change" => arg_str(args, "id"),
            _ => arg_str(args, "device"),
        }
        .to_string();
        let a = self.block_job_actor(&id)?;
        let simple = match name {
            "block-job-pause" => Some(Verb::Pause),
            "block-job-resume" => Some(Verb::Resume),
            "block-job-complete" => Some(Verb::Complete),
            "block-job-finalize" => Some(Verb::Finalize),
            "block-job-dismiss" => Some(Verb::Dismiss),
            _ => None,
        };
        if let Some(v) = simple {
            return Self::reply(ractor::call!(a, JobMsg::Verb, v));
        }
        let r = match name {
            "block-job-cancel" => {
                let force = args.get("force").and_then(Value::as_bool).unwrap_or(false);
                ractor::call!(a, JobMsg::Cancel, force)
            }
            "block-job-set-speed" => {
                let speed = args.get("speed").and_then(Value::as_i64).unwrap_or(0);
                ractor::call!(a, JobMsg::SetSpeed, speed)
            }
            "block-job-change" => {
                // QEMU hands the options to the job whatever `type` says;
                // a mirror reads the copy mode (background if absent).
                let wb = arg_str(args, "copy-mode") == "write-blocking";
                ractor::call!(a, JobMsg::ChangeCopyMode, wb)
            }
            _ => return Err(QmpError::generic(format!("internal error: {name}"))),
        };
        Self::reply(r)
    }

    /// The checks every job-starting command makes once its nodes are
    /// found, in QEMU's order: the job id, then the speed (checked once
    /// QEMU has created the job, which it then drops again).
    pub(super) fn job_id_and_speed(&self, args: &Map<String, Value>) -> QmpResult<(String, u64)> {
        let job_id = arg_str(args, "job-id").to_string();
        crate::jobs::check_id(&job_id).map_err(QmpError::generic)?;
        if self.job(&job_id).is_some() {
            return Err(QmpError::generic(format!(
                "Job ID '{job_id}' already in use"
            )));
        }
        let speed = args.get("speed").and_then(Value::as_i64).unwrap_or(0);
        if speed < 0 {
            self.stillborn_job(&job_id);
            return Err(QmpError::generic(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        Ok((job_id, speed as u64))
    }
}
