//! Integration tests: the real `rsd` binary through real sockets, with
//! /usr/bin/qemu-storage-daemon as the oracle where both can run.
mod common;

mod backup;
mod bitmaps;

mod commit;
mod compress;
mod container;
mod crash;
mod filters;

mod block;
mod bounds;
mod cli;
mod faults;
mod fuse;
mod fuzz_replay;
mod iothreads;
mod job_errors;
mod job_speed;
mod jobs;
mod luks;
mod metrics;
mod mirror;
mod nbd;
mod nbd_client;
mod process;
mod qcow2;
mod qcow2_crypt;
mod qmp_rest;
mod qmp_wire;
mod quickstart;
mod quorum;
mod recovery;
mod snapshot;
mod soak;
mod stream;
mod supervision;
mod throttle;
mod tls;
mod traces;
mod transaction;
mod transports;
mod vhost_guest;
mod vhost_user;
