//! The driver registry: each block driver registers the function that
//! opens a node of its kind. The function gets an open context, through
//! which it opens or finds its children, names its node, and reaches the
//! user-creatable objects (secrets, throttle groups, TLS credentials)
//! and the event sink; it returns the driver with its children's edges
//! and the node's identity (its `json:{...}` options, a plain filename).
use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::driver::Driver;
use super::graph::{Edge, Entry, Graph};
use super::node::{CommonOptions, Node};
use super::perm::Perm;
use crate::events::EventSink;
use crate::objects::Object;

/// The object registry as drivers see it (read only).
pub type Objects = BTreeMap<String, Object>;

/// What opening a node produced.
pub struct Opened {
    pub driver: Box<dyn Driver>,
    /// The options QEMU shows in `json:{...}` filenames.
    pub json: Value,
    /// The plain filename, when the node has one.
    pub plain: Option<String>,
    pub children: Vec<Edge>,
}

pub type OpenFn = fn(&mut OpenCtx<'_>, &Map<String, Value>) -> Result<Opened, String>;

pub struct DriverSpec {
    /// The driver names QAPI has for it.
    pub names: &'static [&'static str],
    pub open: OpenFn,
}

static REGISTRY: &[DriverSpec] = &[
    DriverSpec {
        names: &["file", "host_device", "host_cdrom"],
        open: super::file::open_node,
    },
    DriverSpec {
        names: &["raw"],
        open: super::raw::open_node,
    },
    DriverSpec {
        names: &["qcow2"],
        open: super::qcow2::open_node,
    },
    DriverSpec {
        names: &["luks"],
        open: super::luks::open_node,
    },
    DriverSpec {
        names: &["null-co", "null-aio"],
        open: super::null::open_node,
    },
    DriverSpec {
        names: &["blkdebug"],
        open: super::blkdebug::open_node,
    },
    DriverSpec {
        names: &["copy-before-write"],
        open: super::cbw::open_node,
    },
    DriverSpec {
        names: &["snapshot-access"],
        open: super::cbw::open_snapshot_access,
    },
    DriverSpec {
        names: &["throttle"],
        open: super::throttle::open_node,
    },
    DriverSpec {
        names: &["nbd"],
        open: super::nbd_client::open_node,
    },
    DriverSpec {
        names: &["compress"],
        open: super::compress::open_node,
    },
    DriverSpec {
        names: &["quorum"],
        open: super::quorum::open_node,
    },
    DriverSpec {
        names: &["copy-on-read"],
        open: super::cor::open_node,
    },
    DriverSpec {
        names: &["preallocate"],
        open: super::preallocate::open_node,
    },
    DriverSpec {
        names: &["blklogwrites"],
        open: super::blklogwrites::open_node,
    },
    DriverSpec {
        names: &["blkverify"],
        open: super::blkverify::open_node,
    },
];

pub fn lookup(driver: &str) -> Option<&'static DriverSpec> {
    REGISTRY.iter().find(|d| d.names.contains(&driver))
}

/// Everything a driver's open function may use.
pub struct OpenCtx<'g> {
    pub(super) graph: &'g mut Graph,
    objects: &'g Objects,
    /// The driver name as the options give it.
    pub driver: String,
    /// The options every node shares; a driver may change them (a file
    /// opened read-only by auto-read-only).
    pub common: CommonOptions,
    /// The node-name the options give, if any.
    explicit: Option<String>,
    /// The node's name and naming-order place, once given.
    pub(super) named: Option<(String, u64)>,
}

impl<'g> OpenCtx<'g> {
    pub(super) fn new(
        graph: &'g mut Graph,
        objects: &'g Objects,
        driver: String,
        common: CommonOptions,
        explicit: Option<String>,
    ) -> OpenCtx<'g> {
        OpenCtx {
            graph,
            objects,
            driver,
            common,
            explicit,
            named: None,
        }
    }

    /// The child in `opts[role]`, given by node name or inline (opened
    /// now, inheriting `parent_ro`).
    pub fn child(
        &mut self,
        opts: &Map<String, Value>,
        role: &str,
        parent_ro: bool,
    ) -> Result<String, String> {
        match opts.get(role) {
            Some(Value::String(r)) => match self.graph.find(r) {
                Some(e) => Ok(e.name.clone()),
                None => Err(format!("Cannot find device='{r}' nor node-name='{r}'")),
            },
            Some(Value::Object(inline)) => self.graph.open(self.objects, inline, Some(parent_ro)),
            _ => Err(format!("Parameter '{role}' is missing")),
        }
    }

    /// Opens a node the image itself names (a backing or data file).
    pub fn open_implicit(
        &mut self,
        opts: &Map<String, Value>,
        read_only: bool,
    ) -> Result<String, String> {
        self.graph.open(self.objects, opts, Some(read_only))
    }

    /// The node-name the options give, if any.
    pub fn explicit_name(&self) -> Option<&str> {
        self.explicit.as_deref()
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.graph.find(name)
    }

    pub fn node(&self, name: &str) -> Result<Arc<Node>, String> {
        self.graph
            .find(name)
            .map(|e| e.node.clone())
            .ok_or_else(|| "lost child".to_string())
    }

    /// Removes an inline child opened for this node when its open fails.
    pub fn drop_inline(&mut self, name: &str) {
        self.graph.drop_inline(name);
    }

    /// Names the node now: QEMU names a format node after its file and
    /// before the children it opens itself. Returns the name.
    pub fn name_now(&mut self) -> String {
        if self.named.is_none() {
            self.named = Some(self.graph.name_now(&self.explicit));
        }
        self.named.as_ref().map(|n| n.0.clone()).unwrap_or_default()
    }

    /// Runs `f` with `path` on the chain of images whose backing files
    /// are being opened; an image already on it is a loop.
    pub fn in_chain<T>(&mut self, path: Option<&str>, f: impl FnOnce(&mut Self) -> T) -> T {
        if let Some(p) = path {
            self.graph.chain.push(p.to_string());
        }
        let r = f(self);
        if path.is_some() {
            self.graph.chain.pop();
        }
        r
    }

    pub fn on_chain(&self, path: &str) -> bool {
        self.graph.chain.iter().any(|p| p == path)
    }

    pub fn chain_depth(&self) -> usize {
        self.graph.chain.len()
    }

    /// Tries the locks a parent will take on `file` (see
    /// `Graph::check_file_locks`).
    pub fn check_file_locks(&self, file: &str, perm: Perm, shared: Perm) -> Result<(), String> {
        self.graph.check_file_locks(file, perm, shared)
    }

    pub fn object(&self, id: &str) -> Option<&Object> {
        self.objects.get(id)
    }

    /// A secret as a password, with QEMU's messages.
    pub fn secret(&self, id: &str) -> Result<diskcrypt::luks::Key, String> {
        crate::objects::secret_utf8(self.objects, id)
    }

    /// Where drivers raise QMP events (BLOCK_IMAGE_CORRUPTED).
    pub fn events(&self) -> Option<EventSink> {
        self.graph.events.clone()
    }
}

/// A child edge as a driver declares it; the graph computes its
/// permissions.
pub fn edge(role: &'static str, child: &str) -> Edge {
    named_edge(std::borrow::Cow::Borrowed(role), child)
}

/// An edge whose role is named at run time (a quorum's "children.N").
pub fn named_edge(role: std::borrow::Cow<'static, str>, child: &str) -> Edge {
    Edge {
        role,
        child: child.to_string(),
        perm: Perm::NONE,
        shared: Perm::ALL,
    }
}

/// Typed accessors for the validated options map.
pub fn opt_str<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}
pub fn opt_bool(m: &Map<String, Value>, k: &str) -> Option<bool> {
    m.get(k).and_then(Value::as_bool)
}
pub fn opt_u64(m: &Map<String, Value>, k: &str) -> Option<u64> {
    m.get(k).and_then(Value::as_u64)
}
