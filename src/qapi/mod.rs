//! QAPI: rsd's schema (schema.json), the argument validator that gives
//! QEMU's exact messages, introspection for query-qmp-schema, and the QMP
//! error type.
#[cfg(test)]
mod block_tests;
pub mod error;
pub mod introspect;
pub mod schema;
pub mod validate;

pub use error::{ErrorClass, QmpError};
pub use schema::Schema;
