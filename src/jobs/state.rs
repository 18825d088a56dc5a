//! QAPI's job state machine (qapi/job.json, QEMU's job.c): the states,
//! the transitions allowed between them, and which verbs each state
//! accepts.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Change,
    Complete,
    Finalize,
    Dismiss,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Undefined => "undefined",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Ready => "ready",
            Status::Standby => "standby",
            Status::Waiting => "waiting",
            Status::Pending => "pending",
            Status::Aborting => "aborting",
            Status::Concluded => "concluded",
            Status::Null => "null",
        }
    }

    /// QEMU's JobSTT: may a job go from `self` to `to`?
    pub fn can_become(self, to: Status) -> bool {
        use Status::*;
        match self {
            Undefined => to == Created,
            Created => matches!(to, Running | Aborting | Null),
            Running => matches!(to, Paused | Ready | Waiting | Aborting),
            Paused => to == Running,
            Ready => matches!(to, Standby | Waiting | Aborting),
            Standby => to == Ready,
            Waiting => matches!(to, Pending | Aborting),
            Pending => matches!(to, Aborting | Concluded),
            Aborting => matches!(to, Aborting | Concluded),
            Concluded => to == Null,
            Null => false,
        }
    }

    /// QEMU's JobVerbTable.
    pub fn accepts(self, verb: Verb) -> bool {
        use Status::*;
        match verb {
            Verb::Cancel => matches!(
                self,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            Verb::Pause | Verb::Resume | Verb::SetSpeed | Verb::Change => {
                matches!(self, Created | Running | Paused | Ready | Standby)
            }
            Verb::Complete => matches!(self, Ready | Standby),
            Verb::Finalize => self == Pending,
            Verb::Dismiss => self == Concluded,
        }
    }
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Change => "change",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
        }
    }
}

/// The error QEMU gives for a verb a state does not accept.
pub fn refused(id: &str, status: Status, verb: Verb) -> String {
    format!(
        "Job '{id}' in state '{}' cannot accept command verb '{}'",
        status.as_str(),
        verb.as_str()
    )
}

impl Status {
    /// Every state, in QAPI's order.
    pub const ALL: [Status; 11] = [
        Status::Undefined,
        Status::Created,
        Status::Running,
        Status::Paused,
        Status::Ready,
        Status::Standby,
        Status::Waiting,
        Status::Pending,
        Status::Aborting,
        Status::Concluded,
        Status::Null,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Status; 11] = Status::ALL;

    #[test]
    fn verb_table_matches_qemu() {
        // (verb, states that accept it), as in QEMU's JobVerbTable.
        let table: [(Verb, &[&str]); 8] = [
            (
                Verb::Cancel,
                &[
                    "created", "running", "paused", "ready", "standby", "waiting", "pending",
                ],
            ),
            (
                Verb::Pause,
                &["created", "running", "paused", "ready", "standby"],
            ),
            (
                Verb::Resume,
                &["created", "running", "paused", "ready", "standby"],
            ),
            (
                Verb::SetSpeed,
                &["created", "running", "paused", "ready", "standby"],
            ),
            (
                Verb::Change,
                &["created", "running", "paused", "ready", "standby"],
            ),
            (Verb::Complete, &["ready", "standby"]),
            (Verb::Finalize, &["pending"]),
            (Verb::Dismiss, &["concluded"]),
        ];
        for (verb, ok) in table {
            for s in ALL {
                assert_eq!(
                    s.accepts(verb),
                    ok.contains(&s.as_str()),
                    "{verb:?} in {s:?}"
                );
            }
        }
        assert_eq!(
            refused("j", Status::Concluded, Verb::Complete),
            "Job 'j' in state 'concluded' cannot accept command verb 'complete'"
        );
    }

    #[test]
    fn transitions_match_qemu() {
        let allowed = [
            ("undefined", "created"),
            ("created", "running"),
            ("created", "aborting"),
            ("created", "null"),
            ("running", "paused"),
            ("running", "ready"),
            ("running", "waiting"),
            ("running", "aborting"),
            ("paused", "running"),
            ("ready", "standby"),
            ("ready", "waiting"),
            ("ready", "aborting"),
            ("standby", "ready"),
            ("waiting", "pending"),
            ("waiting", "aborting"),
            ("pending", "aborting"),
            ("pending", "concluded"),
            ("aborting", "aborting"),
            ("aborting", "concluded"),
            ("concluded", "null"),
        ];
        for a in ALL {
            for b in ALL {
                let want = allowed.contains(&(a.as_str(), b.as_str()));
                assert_eq!(a.can_become(b), want, "{a:?} -> {b:?}");
            }
        }
    }
}
