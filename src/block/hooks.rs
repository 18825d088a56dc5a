//! The request-hook point of a node: an ordered list of hooks that see
//! every request before and after its driver, so that throttling,
//! write notifiers (dirty bitmaps, copy-before-write) and metrics plug
//! in without touching drivers.
//!
//! A node without hooks pays one relaxed atomic load per request; the
//! list itself is read under a lock only when it is not empty.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use super::driver::IoFuture;

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// write-zeroes, and writes detect-zeroes turned into one.
    Zero,
    Discard,
    Flush,
}

impl Op {
    /// The request changes the node's contents.
    pub fn changes(self) -> bool {
        matches!(self, Op::Write | Op::Zero | Op::Discard)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub offset: u64,
    pub len: u64,
}

/// Where a hook runs relative to the others: throttling first (a
/// request held back has done nothing yet), then hooks that act on the
/// request (copy-before-write), then hooks that only observe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Throttle,
    Intercept,
    Observe,
}

/// Something a hook holds while the request runs (a range lock), let go
/// when the request has finished.
pub type Guard = Box<dyn Send>;

pub trait Hook: Send + Sync + 'static {
    /// A name for the hook, to remove it and to show it.
    fn name(&self) -> &str;
    fn stage(&self) -> Stage;
    /// Runs before the driver; it may wait (throttling), do I/O
    /// (copy-before-write), fail the request, or return a guard held
    /// until the request is done. None: nothing to do.
    fn before<'a>(&'a self, _req: &'a Request) -> Option<IoFuture<'a, Option<Guard>>> {
        None
    }
    /// Runs after the driver, with whether the request succeeded.
    fn after(&self, _req: &Request, _ok: bool) {}
}

type List = Arc<Vec<Arc<dyn Hook>>>;

#[derive(Default)]
pub struct Hooks {
    any: AtomicBool,
    list: RwLock<List>,
}

impl Hooks {
    /// The hooks now, or None (the common case, one atomic load).
    pub fn active(&self) -> Option<List> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.list.read().ok().map(|l| l.clone())
    }

    /// Adds a hook after the others of its stage. Requests already
    /// running finish with the hooks they started with.
    pub fn add(&self, hook: Arc<dyn Hook>) {
        if let Ok(mut l) = self.list.write() {
            let mut v: Vec<Arc<dyn Hook>> = l.iter().cloned().collect();
            let at = v
                .iter()
                .position(|h| h.stage() > hook.stage())
                .unwrap_or(v.len());
            v.insert(at, hook);
            *l = Arc::new(v);
            self.any.store(true, Ordering::Release);
        }
    }

    /// Removes the hook with this name; true if there was one.
    pub fn remove(&self, name: &str) -> bool {
        let Ok(mut l) = self.list.write() else {
            return false;
        };
        let v: Vec<Arc<dyn Hook>> = l.iter().filter(|h| h.name() != name).cloned().collect();
        let removed = v.len() != l.len();
        self.any.store(!v.is_empty(), Ordering::Release);
        *l = Arc::new(v);
        removed
    }

    pub fn names(&self) -> Vec<String> {
        self.list
            .read()
            .map(|l| l.iter().map(|h| h.name().to_string()).collect())
            .unwrap_or_default()
    }
}

/// Runs the `before` side of every hook in order; the first error wins.
/// Returns the guards to hold until the request is done.
pub async fn before(
    hooks: &[Arc<dyn Hook>],
    req: &Request,
) -> super::error::BlockResult<Vec<Guard>> {
    let mut guards = Vec::new();
    for h in hooks {
        if let Some(f) = h.before(req) {
            guards.extend(f.await?);
        }
    }
    Ok(guards)
}

pub fn after(hooks: &[Arc<dyn Hook>], req: &Request, ok: bool) {
    for h in hooks {
        h.after(req, ok);
    }
}
