//! blockdev-create for qcow2: QEMU's checks in QEMU's order, then the
//! image QEMU writes: a header (with its extensions and the backing file
//! name), a one-cluster refcount table and block for the first clusters,
//! and then, through the driver itself, the L1 table for the disk size
//! and any preallocation.
use std::sync::Arc;

use serde_json::{Map, Value};

use super::header::{self, MAGIC};
use super::{Qcow2, Qcow2Options};
use crate::block::driver::{Driver, WriteFlags};
use crate::block::node::Node;
use crate::block::progress::{Progress, Targets};

fn s<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

const V3: &str = "(use version=v3 or greater)";

/// What the options ask for, checked.
struct Plan {
    size: u64,
    v3: bool,
    cluster_bits: u32,
    refcount_order: u32,
    lazy: bool,
    ext_l2: bool,
    zstd: bool,
    prealloc: String,
    backing: Option<(String, Option<String>)>,
    data_raw: bool,
}

/// QEMU's qcow2_co_create checks, in its order (the first failing wins).
fn plan(o: &Map<String, Value>, has_data_file: bool) -> Result<Plan, String> {
    let size = o.get("size").and_then(Value::as_i64).unwrap_or(0);
    if size % 512 != 0 {
        return Err("Image size must be a multiple of 512 bytes".into());
    }
    let v3 = s(o, "version") != Some("v2");
    let cluster = o
        .get("cluster-size")
        .and_then(Value::as_i64)
        .unwrap_or(65536);
    let ext_l2 = o
        .get("extended-l2")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if ext_l2 && !v3 {
        return Err(format!(
            "Extended L2 entries are only supported with compatibility level 1.1 and above {V3}"
        ));
    }
    if !(512..=(2 << 20)).contains(&cluster) || cluster & (cluster - 1) != 0 {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    if ext_l2 && cluster < 512 * 32 {
        return Err(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .into(),
        );
    }
    let mut prealloc = s(o, "preallocation").unwrap_or("off").to_string();
    let backing_file = s(o, "backing-file").map(String::from);
    if backing_file.is_some() && prealloc != "off" && !ext_l2 {
        return Err(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
                .into(),
        );
    }
    let backing_fmt = s(o, "backing-fmt").map(String::from);
    if backing_fmt.is_some() && backing_file.is_none() {
        return Err("Backing format cannot be used without backing file".into());
    }
    let lazy = o
        .get("lazy-refcounts")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if lazy && !v3 {
        return Err(format!(
            "Lazy refcounts only supported with compatibility level 1.1 and above {V3}"
        ));
    }
    let bits = o.get("refcount-bits").and_then(Value::as_i64).unwrap_or(16);
    if !(1..=64).contains(&bits) || bits & (bits - 1) != 0 {
        return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
    }
    if !v3 && bits != 16 {
        return Err(format!(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above {V3}"
        ));
    }
    let data_raw = o
        .get("data-file-raw")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if data_raw && !has_data_file {
        return Err("data-file-raw requires data-file".into());
    }
    if data_raw && backing_file.is_some() {
        return Err("Backing file and data-file-raw cannot be used at the same time".into());
    }
    if data_raw && prealloc == "off" {
        prealloc = "metadata".into();
    }
    if has_data_file && !v3 {
        return Err(format!(
            "External data files are only supported with compatibility level 1.1 and above {V3}"
        ));
    }
    let zstd = s(o, "compression-type") == Some("zstd");
    if zstd && !v3 {
        return Err(format!(
            "Non-zlib compression type is only supported with compatibility level 1.1 and above {V3}"
        ));
    }
    Ok(Plan {
        size: size as u64,
        v3,
        cluster_bits: cluster.trailing_zeros(),
        refcount_order: bits.trailing_zeros(),
        lazy,
        ext_l2,
        zstd,
        prealloc,
        backing: backing_file.map(|f| (f, backing_fmt)),
        data_raw,
    })
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Appends one header extension, padded to 8 bytes.
fn extension(b: &mut Vec<u8>, kind: u32, data: &[u8]) {
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b.resize(b.len().next_multiple_of(8), 0);
}

/// QEMU's feature name table: incompatible, compatible and autoclear
/// features it knows.
fn feature_table() -> Vec<u8> {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut t = Vec::new();
    for (kind, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        t.extend_from_slice(&e);
    }
    t
}

/// The first cluster of the new image (empty disk, no L1 table yet).
fn header_cluster(p: &Plan, data_file: Option<&str>) -> Result<Vec<u8>, String> {
    let cs = 1usize << p.cluster_bits;
    let mut b = vec![0u8; if p.v3 { 112 } else { 72 }];
    put32(&mut b, 0, MAGIC);
    put32(&mut b, 4, if p.v3 { 3 } else { 2 });
    put32(&mut b, 20, p.cluster_bits);
    put64(&mut b, 48, cs as u64);
    put32(&mut b, 56, 1);
    if p.v3 {
        let mut incompat = 0;
        if data_file.is_some() {
            incompat |= header::INCOMPAT_DATA_FILE;
        }
        if p.zstd {
            incompat |= header::INCOMPAT_COMPRESSION;
            b[104] = 1;
        }
        if p.ext_l2 {
            incompat |= header::INCOMPAT_EXTL2;
        }
        put64(&mut b, 72, incompat);
        put64(
            &mut b,
            80,
            if p.lazy {
                header::COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
        );
        put64(
            &mut b,
            88,
            if p.data_raw {
                header::AUTOCLEAR_DATA_FILE_RAW
            } else {
                0
            },
        );
        put32(&mut b, 96, p.refcount_order);
        put32(&mut b, 100, 112);
    }
    if let Some((_, Some(fmt))) = &p.backing {
        extension(&mut b, 0xe279_2aca, fmt.as_bytes());
    }
    if let Some(df) = data_file {
        extension(&mut b, 0x4441_5441, df.as_bytes());
    }
    if p.v3 && cs > 4096 {
        extension(&mut b, 0x6803_f857, &feature_table());
    }
    b.extend_from_slice(&[0u8; 8]);
    if let Some((name, _)) = &p.backing {
        if name.len() > 1023 {
            let fmt = p
                .backing
                .as_ref()
                .and_then(|b| b.1.clone())
                .unwrap_or("(null)".into());
            return Err(format!(
                "Could not assign backing file '{name}' with format '{fmt}': Invalid argument"
            ));
        }
        let at = b.len();
        put64(&mut b, 8, at as u64);
        put32(&mut b, 16, name.len() as u32);
        b.extend_from_slice(name.as_bytes());
    }
    if b.len() > cs {
        return Err("Could not write qcow2 header: header too large for a cluster".into());
    }
    b.resize(cs, 0);
    Ok(b)
}

/// blockdev-create for qcow2: everything after the command's reply.
pub async fn create(
    sh: &dyn Progress,
    o: &Map<String, Value>,
    targets: Targets,
) -> Result<(), String> {
    let file = targets.file?;
    if file.read_only() {
        return Err("Block node is read-only".into());
    }
    let p = plan(o, targets.data_file.is_some())?;
    let data = match targets.data_file {
        Some(d) => Some(d?),
        None => None,
    };
    let q = write_image(&p, &file, data).await?;
    if p.prealloc != "off" {
        q.preallocate(&p.prealloc, sh)
            .await
            .map_err(|e| format!("Could not resize image: {}", e.msg))?;
    }
    if let Some(enc) = o.get("encrypt").and_then(Value::as_object) {
        q.set_up_encryption(enc, &targets.secrets).await?;
    }
    q.close()
        .await
        .map_err(|e| format!("Could not flush: {}", e.msg))
}

/// A new qcow2 image over `backing` (its name as the header keeps it and
/// its format), of `size` bytes, with QEMU's defaults: an external
/// snapshot's overlay.
pub async fn create_overlay(
    file: &Arc<Node>,
    size: u64,
    backing: &str,
    backing_fmt: &str,
) -> Result<(), String> {
    let mut o = Map::new();
    o.insert("size".into(), Value::from(size));
    // An empty name: a standalone image (drive-mirror's full copy).
    if !backing.is_empty() {
        o.insert("backing-file".into(), Value::from(backing));
        o.insert("backing-fmt".into(), Value::from(backing_fmt));
    }
    let p = plan(&o, false)?;
    let q = write_image(&p, file, None).await?;
    q.close()
        .await
        .map_err(|e| format!("Could not flush: {}", e.msg))
}

/// Writes the header, the first refcount structures and (through the
/// driver) the L1 table for the disk size; returns the image, open.
async fn write_image(
    p: &Plan,
    file: &Arc<Node>,
    data: Option<(Arc<Node>, String)>,
) -> Result<Qcow2, String> {
    let cs = 1u64 << p.cluster_bits;
    let hdr = header_cluster(p, data.as_ref().map(|(_, name)| name.as_str()))?;
    // Header, refcount table (its entry 0: the block after it), and the
    // refcount block counting these three clusters.
    let wf = WriteFlags::default();
    let e = |e: crate::block::error::BlockError| format!("Could not write qcow2 header: {}", e.msg);
    file.truncate(0).await.map_err(e)?;
    file.write(0, &hdr, wf).await.map_err(e)?;
    let mut table = vec![0u8; cs as usize];
    put64(&mut table, 0, 2 * cs);
    file.write(cs, &table, wf)
        .await
        .map_err(|e| format!("Could not write refcount table: {}", e.msg))?;
    let mut block = vec![0u8; cs as usize];
    let width = 1usize << p.refcount_order;
    for c in 0..3 {
        set_refcount(&mut block, width, c, 1);
    }
    file.write(2 * cs, &block, wf)
        .await
        .map_err(|e| format!("Could not write refcount table: {}", e.msg))?;
    file.flush().await.map_err(e)?;
    // The disk size (and L1 table) through the driver itself.
    let data_node = data.map(|(n, _)| n);
    if let Some(d) = &data_node {
        d.truncate(p.size)
            .await
            .map_err(|e| format!("Could not resize image: {}", e.msg))?;
    }
    let h = super::read_header(file)
        .await
        .map_err(|e| format!("Could not open the new image: {}", e.msg))?;
    let q = Qcow2::open(
        file.clone(),
        h,
        data_node,
        None,
        false,
        &Qcow2Options::default(),
    )
    .await
    .map_err(|e| format!("Could not open the new image: {}", e.msg))?;
    q.truncate(p.size)
        .await
        .map_err(|e| format!("Could not resize image: {}", e.msg))?;
    Ok(q)
}

fn set_refcount(block: &mut [u8], width: usize, i: usize, v: u64) {
    if width < 8 {
        let bit = i * width;
        block[bit / 8] |= (v as u8) << (bit % 8);
    } else {
        let n = width / 8;
        let be = v.to_be_bytes();
        block[i * n..(i + 1) * n].copy_from_slice(&be[8 - n..]);
    }
}
