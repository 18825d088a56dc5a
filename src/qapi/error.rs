//! The error every QMP command returns: a QAPI error class and a one-line
//! description, serialized as `{"class": ..., "desc": ...}`.
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

/// A message without the hint lines that follow its first line (shown
/// on the command line only, as with QEMU's `error_append_hint`).
pub fn without_hints(msg: &str) -> &str {
    msg.split('\n').next().unwrap_or_default()
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
    /// An error from an operation whose message may carry hint lines
    /// for the command line (an image lock's "Is another process using
    /// the image"): QMP shows only the first line, as QEMU does.
    pub fn hinted(desc: impl Into<String>) -> Self {
        QmpError::generic(without_hints(&desc.into()))
    }
    pub fn with_class(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for QmpError {}

pub type QmpResult<T> = Result<T, QmpError>;
