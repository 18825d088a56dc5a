//! The loop stream and intermediate commit share: walk the disk in
//! chunks, at the job's speed, with its pause points and error policy;
//! progress is the offset reached.
use std::future::Future;

use super::pace::Pace;
use super::{ErrorAction, OnError, Shared};
use crate::block::error::BlockError;

/// The text QEMU gives a job's error: the errno's strerror.
pub fn strerror(e: &BlockError) -> String {
    crate::util::os_msg(&std::io::Error::from_raw_os_error(e.errno))
}

/// What an ignored error does to the walk, as each QEMU job has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// The chunk is tried again at once (commit).
    Retry,
    /// The chunk is skipped, and the job fails at the end with the first
    /// such error, so nothing is switched over a chunk never copied
    /// (stream).
    SkipThenFail,
}

/// Calls `copy(offset, len)` for each chunk of `0..size`; it returns
/// the bytes it copied (which the speed counts) or which side failed.
/// A reported error ends the walk; an ignored one does what `ignored`
/// says; a stop tries the chunk again after the resume.
pub async fn chunks<F, Fut>(
    sh: &Shared,
    size: u64,
    chunk: u64,
    on_error: OnError,
    ignored: Ignored,
    mut copy: F,
) -> Result<(), String>
where
    F: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = Result<u64, (&'static str, BlockError)>>,
{
    sh.set_progress(0, size);
    let mut pace = Pace::new(chunk);
    let mut off = 0;
    let mut first_ignored = None;
    while off < size {
        let verb = sh.verb_arrived();
        tokio::pin!(verb);
        sh.pause_point().await?;
        sh.crash_point();
        if let Some(d) = pace.delay(sh.speed()) {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = &mut verb => {}
            }
            continue;
        }
        let len = chunk.min(size - off);
        sh.set_busy(true);
        let r = copy(off, len).await;
        sh.set_busy(false);
        match r {
            Ok(copied) => {
                pace.account(copied);
                off += len;
                sh.set_progress(off, size);
            }
            Err((op, e)) => match sh.io_error(op, on_error, e.errno) {
                ErrorAction::Report => return Err(strerror(&e)),
                ErrorAction::Ignore if ignored == Ignored::SkipThenFail => {
                    first_ignored.get_or_insert_with(|| strerror(&e));
                    off += len;
                }
                ErrorAction::Ignore | ErrorAction::Stop => {}
            },
        }
    }
    first_ignored.map_or(Ok(()), Err)
}
