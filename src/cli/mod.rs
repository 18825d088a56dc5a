//! Command line: option scanning and QEMU keyval/QemuOpts parsing.
pub mod keyval;
