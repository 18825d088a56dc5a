//! Runs a block-layer future to completion from synchronous code (opening
//! an image reads its metadata, and the graph opens nodes synchronously,
//! as QEMU does).
use std::future::Future;

use super::error::{BlockError, BlockResult};

pub fn wait<T: Send>(f: impl Future<Output = BlockResult<T>> + Send) -> BlockResult<T> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(f))
        }
        // Elsewhere (unit tests, a current-thread runtime): a private
        // runtime on a scoped thread, so no caller's runtime is blocked
        // from inside.
        _ => std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| BlockError::io(&e, "cannot start a runtime"))
                    .and_then(|rt| rt.block_on(f))
            })
            .join()
            .unwrap_or_else(|_| Err(BlockError::new(nix::libc::EIO, "block I/O thread failed")))
        }),
    }
}
