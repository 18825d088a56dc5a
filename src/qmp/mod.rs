//! QMP: JSON wire format, monitor sessions, dispatch.
pub mod json;
