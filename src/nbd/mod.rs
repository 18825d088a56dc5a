//! The NBD server and its exports.
pub mod conn;
pub mod export;
pub mod proto;
pub mod server;
pub mod spin;
