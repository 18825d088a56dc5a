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
        let mut desc = desc.into();
        if let Some(end) = desc.find('\n') {
            desc.truncate(end);
        }
        QmpError::generic(desc)
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
