//! x-blockdev-change on a quorum: a child added as "children.N" (N
//! counts up, and comes back down only when the newest child goes, as in
//! QEMU) or removed, with QEMU's checks and messages in QEMU's order.
//! The graph's edge decides permissions first; the driver's list then
//! changes with the quorum drained, so no request sees half a change.
use std::borrow::Cow;
use std::sync::Arc;

use serde_json::Value;

use super::{Member, Quorum};
use crate::block::child::Child;
use crate::block::drivers::named_edge;
use crate::block::graph::Graph;
use crate::block::node::Node;

impl Quorum {
    /// The name the next child gets, or why none can be added.
    fn next_role(&self) -> Result<String, String> {
        if self.blkverify {
            return Err("Cannot add a child to a quorum in blkverify mode".into());
        }
        let next = match self.members.read() {
            Ok(m) => m.next,
            Err(p) => p.into_inner().next,
        };
        Ok(format!("children.{next}"))
    }

    fn push(&self, m: Member) {
        let mut g = match self.members.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.list.push(m);
        g.next += 1;
    }

    fn check_remove(&self) -> Result<(), String> {
        if self.members().len() <= self.threshold {
            return Err(format!(
                "The number of children cannot be lower than the vote threshold {}",
                self.threshold
            ));
        }
        Ok(())
    }

    fn take(&self, role: &str) {
        let mut g = match self.members.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.list.retain(|m| m.role != role);
        if g.next > 0 && role == format!("children.{}", g.next - 1) {
            g.next -= 1;
        }
    }

    /// The roles of the children, in the quorum's order.
    fn roles(&self) -> Vec<String> {
        self.members().into_iter().map(|m| m.role).collect()
    }
}

/// Adds node `child` to the quorum `parent` (both exist).
pub async fn add_child(g: &mut Graph, parent: &str, child: &str) -> Result<(), String> {
    let (Some(p), Some(c)) = (g.find(parent), g.find(child)) else {
        return Err(format!("Node '{child}' not found"));
    };
    let (pnode, cnode) = (p.node.clone(), c.node.clone());
    let Some(q) = pnode.driver.quorum() else {
        return Err(format!("The node {parent} does not support adding a child"));
    };
    if !c.users.is_empty() || !g.parents(child).is_empty() {
        return Err(format!("The node {child} already has a parent"));
    }
    let role = q.next_role()?;
    if g.reaches(child, parent) {
        return Err(format!(
            "Making '{child}' a {role} child of '{parent}' would create a cycle"
        ));
    }
    set_edge(g, parent, Some((&role, child)), None);
    if let Err(e) = g.refresh_perms() {
        set_edge(g, parent, None, Some(&role));
        let _ = g.refresh_perms();
        return Err(e);
    }
    let drained = g.drain(parent).await;
    q.push(Member {
        role,
        edge: Child::new(cnode),
    });
    drop(drained);
    refresh_json(g, parent, q);
    Ok(())
}

/// Removes the quorum `parent`'s child edge `role` (it exists). Returns
/// the child when it left the graph with it (it was opened inline), for
/// the caller to close.
pub async fn remove_child(
    g: &mut Graph,
    parent: &str,
    role: &str,
) -> Result<Option<Arc<Node>>, String> {
    let Some(pnode) = g.find(parent).map(|p| p.node.clone()) else {
        return Err(format!("Node '{parent}' not found"));
    };
    let Some(q) = pnode.driver.quorum() else {
        return Err(format!(
            "The node {parent} does not support removing a child"
        ));
    };
    q.check_remove()?;
    let child = g
        .find(parent)
        .and_then(|p| p.children.iter().find(|c| c.role == role))
        .map(|c| c.child.clone());
    let drained = g.drain(parent).await;
    q.take(role);
    drop(drained);
    set_edge(g, parent, None, Some(role));
    let _ = g.refresh_perms();
    refresh_json(g, parent, q);
    // A child opened inline goes once nothing uses it (QEMU unrefs it).
    let Some(c) = child else {
        return Ok(None);
    };
    let node = g.find(&c).map(|e| e.node.clone());
    g.release_unused(&c);
    Ok(node.filter(|_| g.find(&c).is_none()))
}

/// Adds the edge `add` (role, child) to `parent` and/or removes the edge
/// named `remove`, keeping the graph's children-first order.
fn set_edge(g: &mut Graph, parent: &str, add: Option<(&str, &str)>, remove: Option<&str>) {
    if let Some(e) = g.entries.iter_mut().find(|e| e.name == parent) {
        if let Some(r) = remove {
            e.children.retain(|c| c.role != r);
        }
        if let Some((role, child)) = add {
            e.children
                .push(named_edge(Cow::Owned(role.to_string()), child));
        }
    }
    g.sort_children_first();
}

/// The quorum's `children` in its json identity follow its list, with
/// no gaps (QEMU rebuilds them the same way).
fn refresh_json(g: &mut Graph, parent: &str, q: &Quorum) {
    let Some(p) = g.find(parent) else {
        return;
    };
    let list: Vec<Value> = q
        .roles()
        .iter()
        .filter_map(|r| p.children.iter().find(|c| c.role == *r))
        .map(|c| {
            g.find(&c.child)
                .map(|e| e.json.clone())
                .unwrap_or(Value::Null)
        })
        .collect();
    if let Some(e) = g.entries.iter_mut().find(|e| e.name == parent) {
        if let Some(j) = e.json.as_object_mut() {
            j.insert("children".into(), Value::Array(list));
        }
    }
}
