//! The qcow2 header and its extensions (docs/interop/qcow2.txt), parsed
//! from the first cluster. Everything here comes from the file, so every
//! field is checked before use and nothing panics on hostile input.
use super::super::error::BlockError;

pub const MAGIC: u32 = 0x5146_49fb;
pub const MAX_CLUSTER_BITS: u32 = 21;
pub const MIN_CLUSTER_BITS: u32 = 9;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 = 0x1f;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Byte offsets of the header fields rsd rewrites in place (the rest of
/// the first cluster, extensions included, is never touched).
pub const OFF_SIZE: u64 = 24;
pub const OFF_L1_SIZE: u64 = 36;
pub const OFF_REFCOUNT_TABLE: u64 = 48;
/// nb_snapshots, then snapshots_offset.
pub const OFF_NB_SNAPSHOTS: u64 = 60;
pub const OFF_INCOMPAT: u64 = 72;
pub const OFF_AUTOCLEAR: u64 = 88;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// QEMU's limits on the bitmaps extension (QCOW2_MAX_BITMAPS and
/// QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;

/// The bitmaps extension: where the bitmap directory is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub dir_size: u64,
    pub dir_offset: u64,
}

impl BitmapsExt {
    pub fn to_bytes(self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&self.nb_bitmaps.to_be_bytes());
        b[8..16].copy_from_slice(&self.dir_size.to_be_bytes());
        b[16..24].copy_from_slice(&self.dir_offset.to_be_bytes());
        b
    }
}
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// crypt_method: none, legacy AES, LUKS.
pub const CRYPT_AES: u32 = 1;
/// Where crypt_method is in the header.
const OFF_CRYPT: usize = 32;
pub const CRYPT_LUKS: u32 = 2;
const EXT_DATA_FILE: u32 = 0x4441_5441;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    /// (type, bit, name) from the feature name table.
    pub feature_names: Vec<(u8, u8, String)>,
    /// A bitmaps extension is there (trusted or not).
    pub has_bitmaps: bool,
    /// The bitmaps extension, when the autoclear bit says a program
    /// that knows bitmaps wrote the image last (QEMU ignores it
    /// otherwise: the bitmaps are then lost, their clusters leaked).
    pub bitmaps: Option<BitmapsExt>,
    /// The full-disk-encryption extension: where the LUKS header lives
    /// in the file, and its length.
    pub crypto_ext: Option<(u64, u64)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn bad(msg: impl Into<String>) -> BlockError {
    BlockError::new(nix::libc::EINVAL, msg)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses the header from the start of the file (`b` holds at least
    /// the first cluster, or the whole file if it is shorter).
    pub fn parse(b: &[u8]) -> Result<Header, BlockError> {
        if b.len() < 72 || be32(b, 0) != MAGIC {
            return Err(bad("Image is not in qcow2 format"));
        }
        let mut h = Header {
            version: be32(b, 4),
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits: be32(b, 20),
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            refcount_order: 4,
            header_length: 72,
            ..Header::default()
        };
        if h.version != 2 && h.version != 3 {
            return Err(BlockError::unsupported(format!(
                "Unsupported qcow2 version {}",
                h.version
            )));
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(bad(format!(
                "Unsupported cluster size: 2^{}",
                h.cluster_bits as i32
            )));
        }
        let cs = h.cluster_size();
        if h.version == 3 {
            if b.len() < 104 {
                return Err(bad("qcow2 header too short"));
            }
            h.incompatible = be64(b, 72);
            h.compatible = be64(b, 80);
            h.autoclear = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) {
                return Err(bad("qcow2 header too short"));
            }
            if u64::from(h.header_length) > cs {
                return Err(bad("qcow2 header exceeds cluster size"));
            }
            if h.header_length > 104 {
                h.compression_type = b.get(104).copied().unwrap_or(0);
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(BlockError::unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                unknown_names(b, &h, unknown)
            )));
        }
        if h.incompatible & INCOMPAT_COMPRESSION != 0 {
            if h.compression_type == 0 {
                return Err(bad(
                    "qcow2: Compression type incompatible feature bit must not be set when compression type is zlib",
                ));
            }
        } else if h.compression_type != 0 {
            return Err(bad(
                "qcow2: Compression type incompatible feature bit must be set when compression type is not zlib",
            ));
        }
        if h.compression_type > 1 {
            return Err(BlockError::unsupported(format!(
                "qcow2: unknown compression type: {}",
                h.compression_type
            )));
        }
        if h.incompatible & INCOMPAT_EXTL2 != 0 && h.cluster_bits < 14 {
            return Err(bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if h.crypt_method > 2 {
            return Err(bad(format!(
                "Unsupported encryption method {}",
                h.crypt_method
            )));
        }
        let aligned = |o: u64| o.is_multiple_of(cs);
        if u64::from(h.refcount_table_clusters) * cs > (8 << 20) {
            return Err(bad("Reference count table too large"));
        }
        if h.refcount_table_clusters == 0
            || h.refcount_table_offset == 0
            || !aligned(h.refcount_table_offset)
        {
            return Err(bad("Reference count table offset invalid"));
        }
        if u64::from(h.l1_size) * 8 > (32 << 20) {
            return Err(bad("Active L1 table too large"));
        }
        // The L1 table must be able to map the whole disk.
        let l2_bits = h.cluster_bits - 3 - u32::from(h.extended_l2());
        let per_l1 = 1u128 << (h.cluster_bits + l2_bits);
        if u128::from(h.l1_size) * per_l1 < u128::from(h.size) {
            return Err(bad("L1 table is too small"));
        }
        if (h.l1_size > 0 && h.l1_table_offset == 0) || !aligned(h.l1_table_offset) {
            return Err(bad("Active L1 table offset invalid"));
        }
        if h.nb_snapshots > 65536 {
            return Err(bad("Snapshot table too large"));
        }
        if h.nb_snapshots > 0 && !aligned(h.snapshots_offset) {
            return Err(bad("Snapshot table offset invalid"));
        }
        h.parse_extensions(b)?;
        if h.backing_file_offset != 0 {
            let start = h.backing_file_offset;
            let len = u64::from(h.backing_file_size);
            if len > 1023 || start.saturating_add(len) > cs.min(b.len() as u64) {
                return Err(bad("Backing file name too long"));
            }
            let name = &b[start as usize..(start + len) as usize];
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        if h.incompatible & INCOMPAT_DATA_FILE == 0 && h.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 {
            // QEMU clears the bit silently when there is no data file.
            h.autoclear &= !AUTOCLEAR_DATA_FILE_RAW;
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, b: &[u8]) -> Result<(), BlockError> {
        let cs = self.cluster_size() as usize;
        let end = if self.backing_file_offset != 0 {
            (self.backing_file_offset as usize).min(cs)
        } else {
            cs
        }
        .min(b.len());
        let mut at = self.header_length as usize;
        while at + 8 <= end {
            let kind = be32(b, at);
            let len = be32(b, at + 4) as usize;
            let data_at = at + 8;
            if len > end - data_at {
                return Err(bad("Header extension too large"));
            }
            let data = &b[data_at..data_at + len];
            let text = || String::from_utf8_lossy(data).into_owned();
            match kind {
                EXT_END => return Ok(()),
                EXT_BACKING_FORMAT => self.backing_format = Some(text()),
                EXT_DATA_FILE => self.data_file = Some(text()),
                EXT_BITMAPS => {
                    self.has_bitmaps = true;
                    self.bitmaps = self.parse_bitmaps_ext(data)?;
                }
                EXT_CRYPTO => {
                    if self.crypt_method != CRYPT_LUKS {
                        return Err(bad(
                            "CRYPTO header extension only expected with LUKS encryption method",
                        ));
                    }
                    if len != 16 {
                        return Err(bad(format!(
                            "CRYPTO header extension size {len}, but expected size 16"
                        )));
                    }
                    let (off, n) = (be64(data, 0), be64(data, 8));
                    if !off.is_multiple_of(cs as u64) {
                        return Err(bad(format!(
                            "Encryption header offset '{off}' is not a multiple of cluster size '{cs}'"
                        )));
                    }
                    self.crypto_ext = Some((off, n));
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name = e[2..].split(|c| *c == 0).next().unwrap_or(&[]);
                        self.feature_names.push((
                            e[0],
                            e[1],
                            String::from_utf8_lossy(name).into_owned(),
                        ));
                    }
                }
                _ => {}
            }
            at = data_at + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// QEMU's checks of the bitmaps extension; None when the autoclear
    /// bit is clear (the extension is stale).
    fn parse_bitmaps_ext(&self, d: &[u8]) -> Result<Option<BitmapsExt>, BlockError> {
        if d.len() != 24 {
            return Err(bad("bitmaps_ext: Invalid extension length"));
        }
        if self.autoclear & AUTOCLEAR_BITMAPS == 0 {
            return Ok(None);
        }
        let e = BitmapsExt {
            nb_bitmaps: be32(d, 0),
            dir_size: be64(d, 8),
            dir_offset: be64(d, 16),
        };
        if be32(d, 4) != 0 {
            return Err(bad("bitmaps_ext: Reserved field is not zero"));
        }
        if e.nb_bitmaps > MAX_BITMAPS {
            return Err(bad(format!(
                "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
                e.nb_bitmaps
            )));
        }
        if e.nb_bitmaps == 0 {
            return Err(bad("found bitmaps extension with zero bitmaps"));
        }
        if !e.dir_offset.is_multiple_of(self.cluster_size()) {
            return Err(bad("bitmaps_ext: invalid bitmap directory offset"));
        }
        if e.dir_size > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(bad(format!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({MAX_BITMAP_DIRECTORY_SIZE})",
                e.dir_size
            )));
        }
        Ok(Some(e))
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }
    pub fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
}

/// The first cluster `b` with its backing file name (and format) made
/// `name`/`fmt` (an empty name: none), as QEMU's change-backing-file
/// rewrites it: the fixed fields as they are, the extensions in QEMU's
/// order (backing format first), the name after them.
pub fn with_backing(
    b: &[u8],
    h: &Header,
    name: &str,
    fmt: Option<&str>,
) -> Result<Vec<u8>, String> {
    let exts: Vec<(u32, Vec<u8>)> = extensions(b, h)
        .into_iter()
        .filter(|(k, _)| *k != EXT_BACKING_FORMAT)
        .collect();
    let fmt = fmt.filter(|_| !name.is_empty());
    assemble(b, h, fmt, exts, name)
        .map_err(|()| "Could not update the backing file name: header too large".into())
}

/// The first cluster `b` with its bitmaps extension made `ext` (None:
/// no extension), the rest as it is.
pub fn with_bitmaps(b: &[u8], h: &Header, ext: Option<BitmapsExt>) -> Result<Vec<u8>, String> {
    let mut exts: Vec<(u32, Vec<u8>)> = extensions(b, h)
        .into_iter()
        .filter(|(k, _)| *k != EXT_BACKING_FORMAT && *k != EXT_BITMAPS)
        .collect();
    if let Some(e) = ext {
        // After the extensions QEMU knows, before unknown ones.
        let at = exts
            .iter()
            .position(|(k, _)| ![EXT_DATA_FILE, EXT_CRYPTO, EXT_FEATURE_TABLE].contains(k))
            .unwrap_or(exts.len());
        exts.insert(at, (EXT_BITMAPS, e.to_bytes().to_vec()));
    }
    let name = h.backing_file.clone().unwrap_or_default();
    assemble(b, h, h.backing_format.as_deref(), exts, &name)
        .map_err(|()| "Could not update the header: header too large".into())
}

/// The first cluster `b` of a new image made encrypted: crypt_method
/// `method` and, for LUKS, the crypto header extension (where QEMU puts
/// it: after the data file's, before the feature table).
pub fn with_crypto(
    b: &[u8],
    h: &Header,
    method: u32,
    ext: Option<(u64, u64)>,
) -> Result<Vec<u8>, String> {
    let mut exts: Vec<(u32, Vec<u8>)> = extensions(b, h)
        .into_iter()
        .filter(|(k, _)| *k != EXT_BACKING_FORMAT && *k != EXT_CRYPTO)
        .collect();
    if let Some((off, len)) = ext {
        let at = exts
            .iter()
            .position(|(k, _)| *k != EXT_DATA_FILE)
            .unwrap_or(exts.len());
        let mut data = off.to_be_bytes().to_vec();
        data.extend_from_slice(&len.to_be_bytes());
        exts.insert(at, (EXT_CRYPTO, data));
    }
    let name = h.backing_file.clone().unwrap_or_default();
    let mut out = assemble(b, h, h.backing_format.as_deref(), exts, &name)
        .map_err(|()| "Could not update qcow2 header: header too large".to_string())?;
    out[OFF_CRYPT..OFF_CRYPT + 4].copy_from_slice(&method.to_be_bytes());
    Ok(out)
}

/// The header extensions of the first cluster `b`, in order.
fn extensions(b: &[u8], h: &Header) -> Vec<(u32, Vec<u8>)> {
    let cs = h.cluster_size() as usize;
    let fixed = (h.header_length as usize).min(b.len());
    let end = if h.backing_file_offset != 0 {
        (h.backing_file_offset as usize).min(cs)
    } else {
        cs
    }
    .min(b.len());
    let mut exts = Vec::new();
    let mut at = fixed;
    while at + 8 <= end {
        let kind = be32(b, at);
        let len = be32(b, at + 4) as usize;
        if kind == EXT_END || len > end - (at + 8) {
            break;
        }
        exts.push((kind, b[at + 8..at + 8 + len].to_vec()));
        at += 8 + len.div_ceil(8) * 8;
    }
    exts
}

/// A first cluster: the fixed fields of `b`, the backing format
/// extension, `exts`, the end mark, then the backing file name.
fn assemble(
    b: &[u8],
    h: &Header,
    fmt: Option<&str>,
    exts: Vec<(u32, Vec<u8>)>,
    name: &str,
) -> Result<Vec<u8>, ()> {
    let cs = h.cluster_size() as usize;
    let fixed = (h.header_length as usize).min(b.len());
    let mut out = b[..fixed].to_vec();
    let push = |kind: u32, data: &[u8], out: &mut Vec<u8>| {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(8), 0);
    };
    if let (false, Some(f)) = (name.is_empty(), fmt) {
        push(EXT_BACKING_FORMAT, f.as_bytes(), &mut out);
    }
    for (kind, data) in exts {
        push(kind, &data, &mut out);
    }
    out.extend_from_slice(&[0u8; 8]);
    let (off, len) = if name.is_empty() {
        (0u64, 0u32)
    } else {
        let off = out.len() as u64;
        out.extend_from_slice(name.as_bytes());
        (off, name.len() as u32)
    };
    if out.len() > cs || name.len() > 1023 || out.len() < 20 {
        return Err(());
    }
    out[8..16].copy_from_slice(&off.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out.resize(cs, 0);
    Ok(out)
}

/// Names unknown incompatible features as QEMU does: from the feature
/// name table where it has them, else "Unknown incompatible feature: X".
fn unknown_names(b: &[u8], h: &Header, mask: u64) -> String {
    let mut tmp = h.clone();
    tmp.feature_names.clear();
    let _ = tmp.parse_extensions(b);
    let mut parts = Vec::new();
    for bit in 0..64u8 {
        if mask & (1 << bit) == 0 {
            continue;
        }
        match tmp
            .feature_names
            .iter()
            .find(|(t, n, _)| *t == 0 && *n == bit)
        {
            Some((_, _, name)) => parts.push(name.clone()),
            None => parts.push(format!("Unknown incompatible feature: {:x}", 1u64 << bit)),
        }
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid v3 header for a 1 MiB image with 64 KiB clusters.
    pub fn sample() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        let put32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 3);
        put32(&mut b, 20, 16);
        put64(&mut b, 24, 1 << 20);
        put32(&mut b, 36, 1);
        put64(&mut b, 40, 3 << 16);
        put64(&mut b, 48, 1 << 16);
        put32(&mut b, 56, 1);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 112);
        // Feature name table with one entry, then the backing format.
        put32(&mut b, 112, EXT_FEATURE_TABLE);
        put32(&mut b, 116, 48);
        b[120] = 0;
        b[121] = 0;
        b[122..127].copy_from_slice(b"dirty");
        put32(&mut b, 168, EXT_BACKING_FORMAT);
        put32(&mut b, 172, 3);
        b[176..179].copy_from_slice(b"raw");
        put64(&mut b, 8, 512);
        put32(&mut b, 16, 8);
        b[512..520].copy_from_slice(b"base.img");
        b
    }

    #[test]
    fn parses_a_valid_header() {
        let h = Header::parse(&sample()).expect("valid");
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 20);
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(h.feature_names, vec![(0, 0, "dirty".to_string())]);
        assert_eq!(h.refcount_bits(), 16);
    }

    #[test]
    fn rejects_bad_headers_with_clear_errors() {
        let mut b = sample();
        b[0] = 0;
        assert_eq!(
            Header::parse(&b).unwrap_err().msg,
            "Image is not in qcow2 format"
        );
        let mut b = sample();
        b[7] = 4;
        assert_eq!(
            Header::parse(&b).unwrap_err().msg,
            "Unsupported qcow2 version 4"
        );
        let mut b = sample();
        b[23] = 22;
        assert_eq!(
            Header::parse(&b).unwrap_err().msg,
            "Unsupported cluster size: 2^22"
        );
        let mut b = sample();
        b[72] = 0x80;
        assert_eq!(
            Header::parse(&b).unwrap_err().msg,
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000000"
        );
        let mut b = sample();
        b[79] = 0x20;
        b[120] = 0;
        b[121] = 5;
        assert_eq!(
            Header::parse(&b).unwrap_err().msg,
            "Unsupported qcow2 feature(s): dirty"
        );
        assert!(Header::parse(&sample()[..50]).is_err());
    }

    /// Property test: random mutations of a valid header (bytes flipped,
    /// fields set to extremes, truncation) never panic, and whatever
    /// parses satisfies the invariants the driver relies on.
    #[test]
    fn mutated_headers_never_panic() {
        let base = sample();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20000 {
            let mut b = base.clone();
            for _ in 0..(next() % 8 + 1) {
                let at = (next() % 600) as usize;
                b[at] = match next() % 4 {
                    0 => 0,
                    1 => 0xff,
                    _ => next() as u8,
                };
            }
            let cut = if next() % 8 == 0 {
                (next() % 700) as usize
            } else {
                b.len()
            };
            if let Ok(h) = Header::parse(&b[..cut]) {
                assert!((9..=21).contains(&h.cluster_bits));
                assert!(h.refcount_order <= 6);
                assert_eq!(h.l1_table_offset % h.cluster_size(), 0);
                assert_eq!(h.refcount_table_offset % h.cluster_size(), 0);
                assert!(h.incompatible & !INCOMPAT_KNOWN == 0);
            }
        }
    }
}
