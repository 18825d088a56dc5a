//! Decompression of compressed clusters: raw deflate (zlib type, QEMU
//! writes it with a 4 KiB window and no zlib header) or zstd. The input
//! may carry trailing bytes of the last sector; decoding stops once a
//! whole cluster came out.
use std::io::Read;

use super::super::error::{BlockError, BlockResult};

fn bad(what: &str) -> BlockError {
    BlockError::new(
        nix::libc::EIO,
        format!("qcow2: cannot decompress a cluster: {what}"),
    )
}

pub fn decompress(kind: u8, src: &[u8], cluster: usize) -> BlockResult<Vec<u8>> {
    let mut out = vec![0u8; cluster];
    match kind {
        0 => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(src, &mut out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() == cluster as u64 => Ok(out),
                Ok(_) => Err(bad("short zlib data")),
                Err(_) => Err(bad("bad zlib data")),
            }
        }
        1 => {
            let mut src = src;
            let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
                .map_err(|_| bad("bad zstd frame header"))?;
            dec.read_exact(&mut out)
                .map_err(|_| bad("bad or short zstd data"))?;
            Ok(out)
        }
        _ => Err(bad("unknown compression type")),
    }
}
