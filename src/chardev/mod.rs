//! Character devices. A chardev owns its endpoint (a listening or
//! connected socket, stdio, a file, nothing) and hands byte-stream
//! connections to one frontend (a monitor), one connection at a time.
//!
//! The endpoint is opened by [`open`] when the chardev is created, so
//! errors reach the user synchronously; the [`actor::ChardevActor`] that
//! serves it can be restarted without reopening it.
pub mod actor;
pub mod backend;
pub mod ringbuf;

pub use actor::{ChardevActor, ChardevMsg};
pub use backend::{open, Backend, Conn};

/// Backends `--chardev help` and query-chardev-backends list, as QSD does.
pub const BACKEND_NAMES: &[&str] = &[
    "pty", "file", "udp", "memory", "stdio", "socket", "ringbuf", "null", "parallel", "pipe",
    "mux", "serial", "hub",
];
