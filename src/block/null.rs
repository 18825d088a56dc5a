//! `null-co` and `null-aio`: a device of a given size that discards
//! writes; reads return zeroes when `read-zeroes` is on (otherwise the
//! buffer is left as it is, as in QEMU), after an optional latency.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::driver::{Driver, Extent, IoFuture, WriteFlags, ZeroFlags};
use super::error::BlockError;

pub struct NullDriver {
    name: &'static str,
    size: AtomicU64,
    read_zeroes: bool,
    latency: Duration,
}

/// QEMU's default size for null drivers: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

impl NullDriver {
    pub fn new(name: &'static str, size: u64, read_zeroes: bool, latency_ns: u64) -> NullDriver {
        NullDriver {
            name,
            size: AtomicU64::new(size),
            read_zeroes,
            latency: Duration::from_nanos(latency_ns),
        }
    }

    async fn delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

impl Driver for NullDriver {
    fn name(&self) -> &'static str {
        self.name
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn read<'a>(&'a self, _offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.delay().await;
            if self.read_zeroes {
                buf.fill(0);
            }
            Ok(())
        })
    }
    fn write<'a>(&'a self, _offset: u64, _buf: &'a [u8], _flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { Ok(()) })
    }
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }
    fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, Extent> {
        Box::pin(async move {
            Ok(Extent {
                len: len.max(1),
                data: !self.read_zeroes,
                zero: self.read_zeroes,
                depth: 1,
            })
        })
    }
    fn truncate(&self, _size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            Err(BlockError::unsupported(
                "Image format driver does not support resize",
            ))
        })
    }
    fn known_zero(&self, _offset: u64, _len: u64) -> bool {
        self.read_zeroes
    }
    fn has_image_info(&self) -> bool {
        false
    }
}

/// BlockdevOptionsNull, parsed.
pub struct NullOptions {
    pub size: u64,
    pub read_zeroes: bool,
    pub latency_ns: u64,
}

impl NullOptions {
    pub fn parse(opts: &serde_json::Map<String, serde_json::Value>) -> NullOptions {
        use crate::block::drivers::{opt_bool, opt_u64};
        NullOptions {
            size: opt_u64(opts, "size").unwrap_or(DEFAULT_SIZE),
            read_zeroes: opt_bool(opts, "read-zeroes").unwrap_or(false),
            latency_ns: opt_u64(opts, "latency-ns").unwrap_or(0),
        }
    }
}

/// The registry's open function for null-co and null-aio.
pub fn open_node(
    ctx: &mut crate::block::drivers::OpenCtx<'_>,
    opts: &serde_json::Map<String, serde_json::Value>,
) -> Result<crate::block::drivers::Opened, String> {
    let o = NullOptions::parse(opts);
    let name: &'static str = if ctx.driver == "null-co" {
        "null-co"
    } else {
        "null-aio"
    };
    let mut j = serde_json::Map::new();
    // Only these count for the `json:{}` filename, as in QEMU.
    for k in ["read-zeroes", "size"] {
        if let Some(v) = opts.get(k) {
            j.insert(k.into(), v.clone());
        }
    }
    let plain = j.is_empty().then(|| format!("{name}://"));
    j.insert("driver".into(), serde_json::json!(name));
    Ok(crate::block::drivers::Opened {
        driver: Box::new(NullDriver::new(name, o.size, o.read_zeroes, o.latency_ns)),
        json: serde_json::Value::Object(j),
        plain,
        children: Vec::new(),
    })
}
