//! Block permissions, as QEMU defines them: what a parent does to a child
//! (`perm`) and what it lets others do at the same time (`shared`).
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Perm(pub u8);

pub const PERM_COUNT: u8 = 4;

impl Perm {
    pub const NONE: Perm = Perm(0);
    pub const CONSISTENT_READ: Perm = Perm(1);
    pub const WRITE: Perm = Perm(2);
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    pub const RESIZE: Perm = Perm(8);
    pub const ALL: Perm = Perm(15);

    pub fn bit(b: u8) -> Perm {
        Perm(1 << b)
    }
    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn union(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }
    pub fn intersect(self, other: Perm) -> Perm {
        Perm(self.0 & other.0)
    }
    pub fn without(self, other: Perm) -> Perm {
        Perm(self.0 & !other.0)
    }

    const NAMES: [(&'static str, &'static str); 4] = [
        ("consistent-read", "consistent read"),
        ("write", "write"),
        ("write-unchanged", "write unchanged"),
        ("resize", "resize"),
    ];

    /// The names as QEMU prints them in lock errors ("write, resize").
    pub fn human_names(self) -> String {
        let names: Vec<&str> = (0..PERM_COUNT)
            .filter(|b| self.contains(Perm::bit(*b)))
            .map(|b| Self::NAMES[b as usize].1)
            .collect();
        names.join(", ")
    }

    /// The QAPI list of x-debug-query-block-graph, highest bit first as
    /// QEMU lists them.
    pub fn qapi_list(self) -> Value {
        let names: Vec<&str> = (0..PERM_COUNT)
            .rev()
            .filter(|b| self.contains(Perm::bit(*b)))
            .map(|b| Self::NAMES[b as usize].0)
            .collect();
        json!(names)
    }
}
