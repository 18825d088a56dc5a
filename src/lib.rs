//! rsd: a drop-in for qemu-storage-daemon.
pub mod block;
pub mod chardev;
pub mod cli;
pub mod context;
pub mod control;
pub mod daemon;
pub mod event_rate;
pub mod events;
pub mod exports;
#[doc(hidden)]
pub mod fuzzing;
pub mod iothread;
pub mod jobs;
pub mod metrics;
pub mod nbd;
pub mod numbers;
pub mod objects;
pub mod qapi;
pub mod qmp;
pub mod sockets;
pub mod tls;
pub mod util;
pub mod vhost_user;
