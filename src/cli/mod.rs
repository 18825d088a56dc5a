//! Command line: argv scanning, QEMU keyval/QemuOpts parsing, and turning
//! option values into validated arguments.
pub mod args;
pub mod keyval;
pub mod options;
