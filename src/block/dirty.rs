//! The named dirty bitmaps of a node (QMP's block-dirty-bitmap-*): each
//! records the granules written while it is enabled. A node's bitmaps
//! live in `Node::bitmaps`; one Observe-stage hook on the node marks
//! writes, write-zeroes and discards in the enabled ones (also when the
//! request failed, as QEMU does), and is there only while the node has
//! bitmaps.
//!
//! The operations are plain functions over the bitmaps with QEMU's
//! checks and messages, so QMP handlers and transactions share them.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use serde_json::{json, Value};

use super::bitmap::DirtyBitmap;
use super::hooks::{Hook, Op, Request, Stage};

pub const HOOK: &str = "dirty-bitmaps";
/// QEMU's limit on a bitmap's name (BDRV_BITMAP_MAX_NAME_SIZE).
pub const MAX_NAME: usize = 1023;

pub struct NamedBitmap {
    pub name: String,
    pub bits: Arc<DirtyBitmap>,
    /// Recording writes (QEMU's "recording"; qcow2's `auto` flag).
    enabled: AtomicBool,
    persistent: AtomicBool,
    /// Held by an operation (an NBD export, a job).
    busy: AtomicBool,
    /// Loaded marked in-use: its contents cannot be trusted.
    pub inconsistent: bool,
    /// Stored in an image open read-only: it cannot be changed.
    readonly: AtomicBool,
}

/// What a check allows (QEMU's BDRV_BITMAP_* flags).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Busy, read-only and inconsistent bitmaps are refused.
    Default,
    /// Busy and inconsistent are refused; read-only is fine.
    AllowRo,
    /// Busy and read-only are refused (remove).
    BusyRo,
}

impl NamedBitmap {
    pub fn new(name: &str, bits: Arc<DirtyBitmap>) -> NamedBitmap {
        NamedBitmap {
            name: name.to_string(),
            bits,
            enabled: AtomicBool::new(true),
            persistent: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            inconsistent: false,
            readonly: AtomicBool::new(false),
        }
    }

    /// A bitmap as an image stored it.
    pub fn loaded(
        name: &str,
        bits: Arc<DirtyBitmap>,
        enabled: bool,
        inconsistent: bool,
        readonly: bool,
    ) -> NamedBitmap {
        let b = NamedBitmap {
            inconsistent,
            ..NamedBitmap::new(name, bits)
        };
        b.set_readonly(readonly);
        b.enabled.store(enabled && !inconsistent, Ordering::Release);
        b.persistent.store(true, Ordering::Release);
        b
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release)
    }
    pub fn persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }
    pub fn set_persistent(&self, on: bool) {
        self.persistent.store(on, Ordering::Release)
    }
    pub fn readonly(&self) -> bool {
        self.readonly.load(Ordering::Acquire)
    }
    pub fn set_readonly(&self, on: bool) {
        self.readonly.store(on, Ordering::Release)
    }
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }
    pub fn set_busy(&self, on: bool) {
        self.busy.store(on, Ordering::Release)
    }

    /// QEMU's bdrv_dirty_bitmap_check, with its messages.
    pub fn check(&self, what: Check) -> Result<(), String> {
        let name = &self.name;
        if self.busy() {
            return Err(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            ));
        }
        if what != Check::AllowRo && self.readonly() {
            return Err(format!(
                "Bitmap '{name}' is readonly and cannot be modified"
            ));
        }
        if what != Check::BusyRo && self.inconsistent {
            return Err(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            ));
        }
        Ok(())
    }

    /// BlockDirtyInfo as query-named-block-nodes shows it.
    pub fn info(&self) -> Value {
        let mut v = json!({
            "name": self.name, "recording": self.enabled(), "persistent": self.persistent(),
            "busy": self.busy(), "granularity": self.bits.granularity(),
            "count": self.bits.dirty_bytes(),
        });
        if self.inconsistent {
            v["inconsistent"] = json!(true);
        }
        v
    }
}

/// A node's named bitmaps, newest first (the order QEMU lists them).
#[derive(Default)]
pub struct NodeBitmaps {
    list: RwLock<Vec<Arc<NamedBitmap>>>,
}

impl NodeBitmaps {
    pub fn all(&self) -> Vec<Arc<NamedBitmap>> {
        self.list.read().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn find(&self, name: &str) -> Option<Arc<NamedBitmap>> {
        self.all().into_iter().find(|b| b.name == name)
    }

    pub fn is_empty(&self) -> bool {
        self.list.read().map(|l| l.is_empty()).unwrap_or(true)
    }

    /// Puts a bitmap first; false if the name is taken.
    pub fn insert(&self, b: Arc<NamedBitmap>) -> bool {
        let Ok(mut l) = self.list.write() else {
            return false;
        };
        if l.iter().any(|x| x.name == b.name) {
            return false;
        }
        l.insert(0, b);
        true
    }

    pub fn remove(&self, name: &str) -> Option<Arc<NamedBitmap>> {
        let mut l = self.list.write().ok()?;
        let at = l.iter().position(|b| b.name == name)?;
        Some(l.remove(at))
    }

    /// Follows a resize of the node.
    pub fn resize(&self, size: u64) {
        for b in self.all() {
            b.bits.resize(size);
        }
    }

    pub fn infos(&self) -> Vec<Value> {
        self.all().iter().map(|b| b.info()).collect()
    }
}

/// The hook that marks a node's writes in its enabled bitmaps.
pub struct Recorder(pub Arc<NodeBitmaps>);

impl Hook for Recorder {
    fn name(&self) -> &str {
        HOOK
    }
    fn stage(&self) -> Stage {
        Stage::Observe
    }
    fn after(&self, req: &Request, _ok: bool) {
        if !matches!(req.op, Op::Write | Op::Zero | Op::Discard) || req.len == 0 {
            return;
        }
        for b in self.0.all() {
            if b.enabled() {
                b.bits.set(req.offset, req.len);
            }
        }
    }
}

/// QEMU's default granularity for a node: its cluster size within
/// 4 KiB..64 KiB, or 64 KiB.
pub fn default_granularity(cluster_size: Option<u64>) -> u64 {
    match cluster_size {
        Some(c) if c > 0 => c.clamp(4096, 65536),
        _ => 65536,
    }
}

/// Checks a new bitmap's granularity (block-dirty-bitmap-add).
pub fn check_granularity(g: u64) -> Result<(), String> {
    if g < 512 || !g.is_power_of_two() {
        return Err("Granularity must be power of 2 and at least 512".into());
    }
    Ok(())
}

/// Checks a merge source against its target (busy, inconsistent,
/// size), as QEMU checks each one in turn.
pub fn check_merge_source(target: &NamedBitmap, s: &NamedBitmap) -> Result<(), String> {
    s.check(Check::AllowRo)?;
    let (size, ssize) = (target.bits.size(), s.bits.size());
    if ssize != size {
        return Err(format!(
            "Bitmaps are of different sizes (destination size is {size}, source size is {ssize}) and can't be merged"
        ));
    }
    Ok(())
}

/// Merges `sources` into `target` all or nothing: everything is checked
/// before the target changes.
pub fn merge(target: &NamedBitmap, sources: &[Arc<NamedBitmap>]) -> Result<(), String> {
    target.check(Check::Default)?;
    for s in sources {
        check_merge_source(target, s)?;
    }
    // Gathered first: a source may be the target itself.
    let acc = DirtyBitmap::new(target.bits.size(), target.bits.granularity());
    for s in sources {
        acc.merge_from(&s.bits);
    }
    target.bits.merge_from(&acc);
    Ok(())
}
