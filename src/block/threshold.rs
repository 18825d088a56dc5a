//! block-set-write-threshold: a one-shot BLOCK_WRITE_THRESHOLD when a
//! write first reaches past the offset, as QEMU checks it before the
//! write; then the threshold is off. A hook watches the node only while
//! a threshold is set.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::json;

use super::driver::IoFuture;
use super::hooks::{Guard, Hook, Op, Request, Stage};
use crate::events::EventSink;

pub const HOOK: &str = "write-threshold";

pub struct Threshold {
    pub node: String,
    pub offset: Arc<AtomicU64>,
    pub events: EventSink,
}

impl Hook for Threshold {
    fn name(&self) -> &str {
        HOOK
    }
    fn stage(&self) -> Stage {
        Stage::Observe
    }
    fn before<'a>(&'a self, req: &'a Request) -> Option<IoFuture<'a, Option<Guard>>> {
        if !matches!(req.op, Op::Write | Op::Zero) {
            return None;
        }
        let end = req.offset.saturating_add(req.len);
        let at = self.offset.load(Ordering::Acquire);
        if at > 0
            && end > at
            && self
                .offset
                .compare_exchange(at, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let mut d = serde_json::Map::new();
            d.insert("node-name".into(), json!(self.node));
            d.insert("amount-exceeded".into(), json!(end - at));
            d.insert("write-threshold".into(), json!(at));
            (self.events)("BLOCK_WRITE_THRESHOLD", d);
        }
        None
    }
}
