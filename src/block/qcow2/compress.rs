//! Decompression of compressed clusters: raw deflate (zlib type, QEMU
//! writes it with a 4 KiB window and no zlib header) or zstd. The input
//! may carry trailing bytes of the last sector; decoding stops once a
//! whole cluster came out.
use std::io::Read;

use super::super::error::{BlockError, BlockResult};

/// The smallest window limit: zstd's default window at its default
/// level, for frames written without the content size.
const MIN_WINDOW: u64 = 2 << 20;

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
            // ruzstd accepts windows up to 128 MiB by default; a cluster
            // needs no more than its own size (QEMU's frames give the
            // content size), so a hostile frame header gets little.
            let window = (cluster as u64 * 4).max(MIN_WINDOW);
            let mut dec =
                ruzstd::decoding::StreamingDecoder::new_with_max_window_size(&mut src, window)
                    .map_err(|_| bad("bad zstd frame header"))?;
            dec.read_exact(&mut out)
                .map_err(|_| bad("bad or short zstd data"))?;
            Ok(out)
        }
        _ => Err(bad("unknown compression type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zstd frame with one raw block of `data`, declaring a window of
    /// 2^`log` bytes and no content size.
    fn frame(log: u8, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (log - 10) << 3];
        let hdr = ((data.len() as u32) << 3) | 1; // last block, raw
        f.extend_from_slice(&hdr.to_le_bytes()[..3]);
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn zstd_window_is_bounded_by_the_cluster_size() {
        let data = vec![7u8; 4096];
        assert_eq!(
            decompress(1, &frame(12, &data), 4096).ok(),
            Some(data.clone())
        );
        assert_eq!(
            decompress(1, &frame(21, &data), 4096).ok(),
            Some(data.clone())
        );
        // 128 MiB: ruzstd's default limit would take it.
        assert!(decompress(1, &frame(27, &data), 4096).is_err());
        let big = vec![7u8; 65536];
        assert!(decompress(1, &frame(23, &big), 65536).is_err());
        assert_eq!(decompress(1, &frame(17, &big), 65536).ok(), Some(big));
    }
}
