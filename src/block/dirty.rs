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

type List = Arc<Vec<Arc<NamedBitmap>>>;

/// A node's named bitmaps, newest first (the order QEMU lists them).
/// The list is replaced, never changed in place, so a write's hook
/// takes it with one reference count.
#[derive(Default)]
pub struct NodeBitmaps {
    list: RwLock<List>,
}

impl NodeBitmaps {
    fn current(&self) -> List {
        self.list.read().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn all(&self) -> Vec<Arc<NamedBitmap>> {
        self.current().to_vec()
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
        let mut v = Vec::with_capacity(l.len() + 1);
        v.push(b);
        v.extend(l.iter().cloned());
        *l = Arc::new(v);
        true
    }

    pub fn remove(&self, name: &str) -> Option<Arc<NamedBitmap>> {
        let mut l = self.list.write().ok()?;
        let at = l.iter().position(|b| b.name == name)?;
        let mut v = l.to_vec();
        let gone = v.remove(at);
        *l = Arc::new(v);
        Some(gone)
    }

    /// Moves bitmap `name` to just before bitmap `before` (to the front
    /// when `before` is gone).
    pub fn move_before(&self, name: &str, before: &str) {
        if name == before {
            return;
        }
        let Ok(mut l) = self.list.write() else {
            return;
        };
        let Some(at) = l.iter().position(|b| b.name == name) else {
            return;
        };
        let mut v = l.to_vec();
        let b = v.remove(at);
        let to = v.iter().position(|x| x.name == before).unwrap_or(0);
        v.insert(to, b);
        *l = Arc::new(v);
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
        for b in self.0.current().iter() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(name: &str, size: u64, g: u64) -> Arc<NamedBitmap> {
        Arc::new(NamedBitmap::new(name, Arc::new(DirtyBitmap::new(size, g))))
    }

    #[test]
    fn recorder_marks_enabled_bitmaps_newest_first() {
        let list = Arc::new(NodeBitmaps::default());
        let (a, b) = (bitmap("a", 1 << 20, 65536), bitmap("b", 1 << 20, 512));
        assert!(list.insert(a.clone()));
        assert!(list.insert(b.clone()));
        assert!(!list.insert(bitmap("a", 1 << 20, 65536)));
        let names: Vec<String> = list.all().iter().map(|x| x.name.clone()).collect();
        assert_eq!(names, ["b", "a"]);
        b.set_enabled(false);
        let hook = Recorder(list.clone());
        for op in [Op::Write, Op::Read, Op::Flush, Op::Zero] {
            let off = if op == Op::Zero { 200_000 } else { 0 };
            hook.after(
                &Request {
                    op,
                    offset: off,
                    len: 1,
                },
                false,
            );
        }
        assert_eq!(a.bits.dirty_bytes(), 2 * 65536);
        assert_eq!(b.bits.dirty_bytes(), 0);
        assert!(list.remove("a").is_some());
        assert!(list.remove("a").is_none());
    }

    #[test]
    fn checks_and_merge_are_all_or_nothing() {
        let t = bitmap("t", 1 << 20, 65536);
        let s = bitmap("s", 1 << 20, 512);
        s.bits.set(70_000, 1);
        let other = bitmap("o", 2 << 20, 65536);
        other.bits.set(0, 1);
        let busy = bitmap("busy", 1 << 20, 65536);
        busy.set_busy(true);
        assert_eq!(
            merge(&t, &[s.clone(), busy.clone()]).unwrap_err(),
            "Bitmap 'busy' is currently in use by another operation and cannot be used"
        );
        assert!(merge(&t, &[s.clone(), other])
            .unwrap_err()
            .starts_with("Bitmaps are of different sizes"));
        assert_eq!(t.bits.dirty_bytes(), 0, "nothing merged on failure");
        merge(&t, &[s, t.clone()]).expect("merge");
        assert_eq!(t.bits.dirty_bytes(), 65536);
        let ro = NamedBitmap::loaded(
            "ro",
            Arc::new(DirtyBitmap::new(1 << 20, 65536)),
            true,
            false,
            true,
        );
        assert!(ro.check(Check::AllowRo).is_ok());
        assert_eq!(
            ro.check(Check::Default).unwrap_err(),
            "Bitmap 'ro' is readonly and cannot be modified"
        );
        let bad = NamedBitmap::loaded(
            "bad",
            Arc::new(DirtyBitmap::new(1 << 20, 65536)),
            true,
            true,
            false,
        );
        assert!(!bad.enabled());
        assert!(bad.check(Check::BusyRo).is_ok());
        assert_eq!(
            bad.check(Check::AllowRo).unwrap_err(),
            "Bitmap 'bad' is inconsistent and cannot be used"
        );
        assert_eq!(bad.info()["inconsistent"], serde_json::json!(true));
    }
}
