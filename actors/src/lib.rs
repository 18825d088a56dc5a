//! rsd's supervision kernel. It knows nothing about storage: it starts
//! children in order, restarts or removes them per policy when they fail,
//! stops them in reverse order, and owns the process-level duties of a root
//! supervisor (pidfile, `--daemonize`, shutdown signals).
pub mod daemonize;
pub mod pidfile;
pub mod signals;
pub mod supervisor;

pub use supervisor::{
    ChildSpec, ChildStatus, Restart, RestartFn, StartFn, Supervisor, SupervisorMsg,
};
