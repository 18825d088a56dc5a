//! Compressed clusters: raw deflate (zlib type, QEMU writes it with a
//! 4 KiB window and no zlib header) or zstd. On reading, the input may
//! carry trailing bytes of the last sector; decoding stops once a whole
//! cluster came out. On writing, a cluster whose compressed form is not
//! smaller than the cluster is written as plain data (QEMU's rule).
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

/// QEMU's deflate window for compressed clusters (its inflate uses the
/// same -12 window bits, so a longer distance could not be read back).
const ZLIB_WINDOW_BITS: u8 = 12;

/// Compresses one cluster with the image's compression type (0 zlib,
/// 1 zstd). None when the result would not fit in `max` bytes.
pub fn compress(kind: u8, src: &[u8], max: usize) -> BlockResult<Option<Vec<u8>>> {
    match kind {
        0 => {
            let mut c = flate2::Compress::new_with_window_bits(
                flate2::Compression::default(),
                false,
                ZLIB_WINDOW_BITS,
            );
            let mut out = Vec::with_capacity(max);
            match c.compress_vec(src, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => Ok(Some(out)),
                // The output ran out of room: it does not fit.
                Ok(_) => Ok(None),
                Err(_) => Err(BlockError::new(
                    nix::libc::EINVAL,
                    "qcow2: cannot compress a cluster",
                )),
            }
        }
        1 => {
            let out =
                ruzstd::encoding::compress_to_vec(src, ruzstd::encoding::CompressionLevel::Fastest);
            Ok((out.len() <= max).then_some(out))
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

    /// Data with repeats farther apart than 4 KiB, which a 32 KiB window
    /// would reach back for.
    fn far_repeats(len: usize) -> Vec<u8> {
        let block: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        block.iter().copied().cycle().take(len).collect()
    }

    #[test]
    fn compressed_clusters_read_back() {
        for kind in [0u8, 1] {
            for data in [vec![0u8; 65536], vec![0x5a; 512], far_repeats(65536)] {
                let z = compress(kind, &data, data.len() - 1).ok().flatten();
                let z = z.unwrap_or_else(|| panic!("type {kind} did not compress"));
                assert!(z.len() < data.len());
                assert_eq!(decompress(kind, &z, data.len()).ok(), Some(data));
            }
        }
    }

    #[test]
    fn zlib_output_stays_within_a_4k_window() {
        let data = far_repeats(65536);
        let z = compress(0, &data, 65535).ok().flatten().unwrap_or_default();
        // An inflater with a 4 KiB window (QEMU's) reads it back.
        let mut d = flate2::Decompress::new_with_window_bits(false, 12);
        let mut out = vec![0u8; 65536];
        let r = d.decompress(&z, &mut out, flate2::FlushDecompress::Finish);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(out, data);
    }

    #[test]
    fn incompressible_clusters_do_not_fit() {
        // A xorshift stream: no compressor makes it smaller.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for kind in [0u8, 1] {
            assert_eq!(compress(kind, &data, 4095).ok(), Some(None));
        }
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
