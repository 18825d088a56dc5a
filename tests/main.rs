//! Integration tests: the real `rsd` binary through real sockets, with
//! /usr/bin/qemu-storage-daemon as the oracle where both can run.
mod common;

mod backup;
mod bitmaps;

mod commit;
mod container;

mod block;
mod bounds;
mod cli;
mod fuse;
mod fuzz_replay;
mod job_errors;
mod job_speed;
mod jobs;
mod metrics;
mod mirror;
mod nbd;
mod nbd_client;
mod process;
mod qcow2;
mod qmp_wire;
mod quickstart;
mod snapshot;
mod stream;
mod supervision;
mod throttle;
mod traces;
mod transaction;
mod transports;
mod vhost_guest;
mod vhost_user;
