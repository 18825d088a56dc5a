//! The block layer: the data-plane driver contract, the drivers, image
//! locking and the node graph.
pub mod actor;
pub mod bitmap;
pub mod blkdebug;
pub mod blklogwrites;
pub mod blkverify;
pub mod buffers;
pub mod cancel;
pub mod cbw;
pub mod child;
pub mod compress;
pub mod copier;
pub mod cor;
pub mod dirty;
pub mod driver;
pub mod drivers;
pub mod error;
pub mod file;
pub mod graph;
#[cfg(test)]
mod hook_tests;
pub mod hooks;
pub mod iopool;
pub mod lock;
pub mod luks;
pub mod mirror_top;
pub mod nbd_client;
pub mod node;
pub mod null;
pub mod perm;
pub mod preallocate;
pub mod progress;
pub mod qcow2;
pub mod quorum;
pub mod raw;
pub mod replace;
pub mod serial;
pub mod stats;
#[cfg(test)]
mod tests;
pub mod threshold;
pub mod throttle;
pub mod uring;
#[cfg(test)]
mod uring_tests;
pub mod wait;
