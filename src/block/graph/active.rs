//! blockdev-set-active: inactivating a node hands its image to another
//! process (QEMU's migration hand-over). An inactive node writes its
//! caches back, refuses changes and keeps only a reader's lock on its
//! files; activating it takes its locks again.
use super::Graph;
use crate::block::perm::Perm;

impl Graph {
    fn has_active_parent(&self, name: &str) -> bool {
        self.parents(name)
            .iter()
            .any(|(p, _)| self.find(p).is_some_and(|e| e.node.is_active()))
    }

    /// QEMU's bdrv_inactivate: refused while a parent node is active.
    pub async fn inactivate(&mut self, name: &str) -> Result<(), String> {
        if self.has_active_parent(name) {
            return Err("Node has active parent node".into());
        }
        self.inactivate_tree(name)
            .await
            .map_err(|e| format!("Failed to inactivate node: {e}"))
    }

    /// QEMU's bdrv_inactivate_all: every node, parents first.
    pub async fn inactivate_all(&mut self) -> Result<(), String> {
        let names: Vec<String> = self.entries.iter().rev().map(|e| e.name.clone()).collect();
        for n in names {
            self.inactivate_tree(&n)
                .await
                .map_err(|e| format!("Failed to inactivate all nodes: {e}"))?;
        }
        Ok(())
    }

    /// The node and, below it, each child whose parents are all
    /// inactive by then (a child shared with an active parent stays).
    async fn inactivate_tree(&mut self, root: &str) -> Result<(), String> {
        let mut todo = vec![root.to_string()];
        while let Some(name) = todo.pop() {
            let Some(e) = self.find(&name) else {
                continue;
            };
            if !e.node.is_active() || self.has_active_parent(&name) {
                continue;
            }
            // Its users must be able to do without it: exports that
            // allow inactive nodes, and users that do not write (QEMU's
            // blk_can_inactivate).
            let writer = Perm::WRITE.union(Perm::WRITE_UNCHANGED);
            if e.users
                .iter()
                .any(|u| !u.allow_inactive && u.perm.intersect(writer) != Perm::NONE)
            {
                return Err("Operation not permitted".into());
            }
            let node = e.node.clone();
            let children: Vec<String> = e.children.iter().rev().map(|c| c.child.clone()).collect();
            if !node.read_only() {
                node.close().await.map_err(|e| e.msg)?;
            }
            node.set_active(false);
            // Only loosens: the locks a reader needs stay.
            let _ = self.refresh_perms();
            todo.extend(children);
        }
        Ok(())
    }

    /// QEMU's bdrv_activate: the children first, then the node, which
    /// reads its image again and takes its locks back.
    pub async fn activate(&mut self, name: &str) -> Result<(), String> {
        let mut order = Vec::new();
        self.post_order(name, &mut order);
        for n in order {
            let Some(e) = self.find(&n) else {
                continue;
            };
            if e.node.is_active() {
                continue;
            }
            let node = e.node.clone();
            node.set_active(true);
            if let Err(err) = self.refresh_perms() {
                node.set_active(false);
                let _ = self.refresh_perms();
                return Err(err);
            }
            if let Err(err) = node.driver.invalidate_cache().await {
                node.set_active(false);
                let _ = self.refresh_perms();
                return Err(err.msg);
            }
        }
        Ok(())
    }

    pub async fn activate_all(&mut self) -> Result<(), String> {
        let names: Vec<String> = self.entries.iter().rev().map(|e| e.name.clone()).collect();
        for n in names {
            self.activate(&n).await?;
        }
        Ok(())
    }

    fn post_order(&self, name: &str, out: &mut Vec<String>) {
        if out.iter().any(|n| n == name) || out.len() > 4096 {
            return;
        }
        if let Some(e) = self.find(name) {
            for c in &e.children {
                self.post_order(&c.child, out);
            }
        }
        out.push(name.to_string());
    }

    /// An export that allows an inactive node.
    pub fn set_user_allow_inactive(&mut self, id: u64) {
        for e in &mut self.entries {
            for u in &mut e.users {
                if u.id == id {
                    u.allow_inactive = true;
                }
            }
        }
    }
}
