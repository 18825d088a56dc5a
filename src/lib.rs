//! rsd: a drop-in for qemu-storage-daemon.
pub mod cli;
pub mod qmp;
