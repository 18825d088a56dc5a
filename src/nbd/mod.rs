//! The NBD server and its exports.
pub mod codec;
pub mod conn;
pub mod export;
pub mod handshake;
pub mod link;
pub mod proto;
pub mod server;
pub mod spin;
pub mod trace;
