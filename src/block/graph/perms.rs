//! Permissions: each edge's and user's, accumulated per node, checked for
//! conflicts and read-only nodes, and turned into image locks.
use super::Graph;
use crate::block::perm::Perm;

impl Graph {
    /// QEMU takes a format node's locks on its file when it attaches the
    /// file, before it reads the header, so an image another process
    /// holds reports the lock rather than its format. This tries those
    /// locks (on top of the file's own) and puts the file's back; the
    /// final `refresh_perms` takes what the graph needs.
    pub(in crate::block) fn check_file_locks(
        &self,
        file: &str,
        perm: Perm,
        shared: Perm,
    ) -> Result<(), String> {
        let Some(e) = self.find(file) else {
            return Ok(());
        };
        let tried = e
            .node
            .driver
            .set_perms(e.perm.union(perm), e.shared.intersect(shared));
        let _ = e.node.driver.set_perms(e.perm, e.shared);
        tried
    }

    /// Recomputes every node's cumulative permissions from its users and
    /// parents (newest first, so parents are done before children), checks
    /// conflicts and read-only nodes, then applies image locks. On any
    /// error the previous locks stay in force.
    pub fn refresh_perms(&mut self) -> Result<(), String> {
        let n = self.entries.len();
        let mut cum: Vec<(Perm, Perm)> = vec![(Perm::NONE, Perm::ALL); n];
        let mut edges: Vec<Vec<(Perm, Perm)>> = self
            .entries
            .iter()
            .map(|e| vec![(Perm::NONE, Perm::ALL); e.children.len()])
            .collect();
        for i in (0..n).rev() {
            let name = self.entries[i].name.clone();
            // (description, perm, shared) of every parent, newest first.
            // The users of an inactive node hold nothing (QEMU's
            // blk_root_inactivate).
            let active = self.entries[i].node.is_active();
            let mut holders: Vec<(String, Perm, Perm)> = self.entries[i]
                .users
                .iter()
                .map(|u| {
                    let (p, sh) = if active {
                        (u.perm, u.shared)
                    } else {
                        (Perm::NONE, Perm::ALL)
                    };
                    (
                        format!("{} (uses node '{name}' as 'root' child)", u.desc),
                        p,
                        sh,
                    )
                })
                .collect();
            for j in (i + 1..n).rev() {
                for (k, c) in self.entries[j].children.iter().enumerate() {
                    if c.child == name {
                        let (p, sh) = edges[j][k];
                        holders.push((
                            format!(
                                "node '{}' (uses node '{name}' as '{}' child)",
                                self.entries[j].name, c.role
                            ),
                            p,
                            sh,
                        ));
                    }
                }
            }
            for (a, ap, _) in &holders {
                for (bdesc, _, bsh) in &holders {
                    if std::ptr::eq(a, bdesc) {
                        continue;
                    }
                    let clash = ap.without(*bsh);
                    if clash != Perm::NONE {
                        return Err(format!(
                            "Permission conflict on node '{name}': permissions '{}' are both required by {a} and unshared by {bdesc}.",
                            clash.human_names()
                        ));
                    }
                }
            }
            let perm = holders.iter().fold(Perm::NONE, |p, h| p.union(h.1));
            let shared = holders.iter().fold(Perm::ALL, |s, h| s.intersect(h.2));
            let node = &self.entries[i].node;
            if node.read_only() && (perm.contains(Perm::WRITE) || perm.contains(Perm::RESIZE)) {
                return Err("Block node is read-only".into());
            }
            cum[i] = (perm, shared);
            for (e, c) in edges[i].iter_mut().zip(&self.entries[i].children) {
                let (mut cp, mut cs) = node.driver.child_perms(&c.role, perm, shared);
                if node.opts.force_share {
                    cs = Perm::ALL;
                }
                // An inactive node only reads its children and lets
                // another process have them.
                if !active {
                    cp = cp.intersect(Perm::CONSISTENT_READ);
                    cs = Perm::ALL;
                }
                *e = (cp, cs);
            }
        }
        // Apply locks; undo the ones already changed if one fails.
        for (i, (p, sh)) in cum.iter().enumerate() {
            if let Err(e) = self.entries[i].node.driver.set_perms(*p, *sh) {
                for old in &self.entries[..i] {
                    let _ = old.node.driver.set_perms(old.perm, old.shared);
                }
                return Err(e);
            }
        }
        for ((entry, (p, sh)), edge_perms) in self.entries.iter_mut().zip(cum).zip(edges) {
            entry.perm = p;
            entry.shared = sh;
            for (c, (ep, es)) in entry.children.iter_mut().zip(edge_perms) {
                c.perm = ep;
                c.shared = es;
            }
        }
        Ok(())
    }
}
