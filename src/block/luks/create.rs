//! blockdev-create for luks, and the LUKS options qcow2's create shares:
//! QEMU's checks and defaults, then the header (on `file`, or on a
//! detached `header` node) and the payload's size.
use std::sync::Arc;

use serde_json::{Map, Value};

use super::volume::Region;
use crate::block::driver::ZeroFlags;
use crate::block::node::Node;
use crate::block::progress::Targets;
use crate::objects::Secrets;
use diskcrypt::cipher::{CipherAlg, Mode};
use diskcrypt::hash::HashAlg;
use diskcrypt::ivgen::IvGenAlg;
use diskcrypt::luks::{self, CreateOpts, Header, Key};
use diskcrypt::SectorCrypto;

fn s<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

/// QCryptoBlockCreateOptionsLUKS with QEMU's defaults (aes-256,
/// xts-plain64, sha256; essiv's hash sha256; 2 s of PBKDF2). `prefix`
/// names the options in messages ("encrypt." inside qcow2).
pub fn options(
    o: &Map<String, Value>,
    secrets: &Secrets,
    prefix: &str,
) -> Result<(CreateOpts, Key), String> {
    let Some(id) = s(o, "key-secret") else {
        return Err(format!(
            "Parameter '{prefix}key-secret' is required for cipher"
        ));
    };
    let password = secrets.get(id)?;
    let cipher_name = s(o, "cipher-alg").unwrap_or("aes-256");
    let cipher = CipherAlg::from_name(cipher_name)
        .ok_or_else(|| format!("Algorithm '{cipher_name}' not supported"))?;
    let mode = Mode::from_name(s(o, "cipher-mode").unwrap_or("xts")).unwrap_or(Mode::Xts);
    let ivgen =
        IvGenAlg::from_name(s(o, "ivgen-alg").unwrap_or("plain64")).unwrap_or(IvGenAlg::Plain64);
    let named_hash = |k: &str| s(o, k).and_then(HashAlg::from_name);
    let ivgen_hash = match named_hash("ivgen-hash-alg") {
        Some(h) => Some(h),
        None if ivgen == IvGenAlg::Essiv => Some(HashAlg::Sha256),
        None => None,
    };
    let hash = named_hash("hash-alg").unwrap_or(HashAlg::Sha256);
    let iter_time_ms = o
        .get("iter-time")
        .and_then(Value::as_i64)
        .map_or(luks::DEFAULT_ITER_TIME_MS, |t| t.max(0) as u64);
    Ok((
        CreateOpts {
            cipher,
            mode,
            ivgen,
            ivgen_hash,
            hash,
            iter_time_ms,
        },
        password,
    ))
}

/// Grows `node` from `from` to `to` bytes with the preallocation asked
/// for (the payload's zeroes are written before any encryption, as
/// QEMU's truncate does).
async fn grow(node: &Node, to: u64, prealloc: &str) -> Result<(), String> {
    let from = node.size();
    let e = |e: crate::block::error::BlockError| format!("Could not resize image: {}", e.msg);
    node.truncate(to).await.map_err(e)?;
    if to <= from {
        return Ok(());
    }
    match prealloc {
        "falloc" => node
            .write_zeroes(from, to - from, ZeroFlags::default())
            .await
            .map_err(e),
        "full" => {
            let zeros = vec![0u8; 1 << 20];
            let mut at = from;
            while at < to {
                let n = ((to - at) as usize).min(zeros.len());
                node.write(at, &zeros[..n], Default::default())
                    .await
                    .map_err(e)?;
                at += n as u64;
            }
            node.flush().await.map_err(e)
        }
        _ => Ok(()),
    }
}

/// Formats `region` as a LUKS volume and sizes its payload: the header
/// area and `size` bytes after it on `file`, or (detached) the header
/// area alone on the header node and `size` bytes on `file` if given.
pub async fn format_volume(
    region: &Region,
    data: Option<&Arc<Node>>,
    detached: bool,
    size: u64,
    prealloc: &str,
    o: &CreateOpts,
    password: &Key,
) -> Result<(Header, SectorCrypto), String> {
    let (mut h, material, c) = super::volume::new_header(o, password).await?;
    let payload = h.payload_bytes();
    if detached {
        h.payload_offset = 0;
        grow(&region.node, h.area_bytes(), "off").await?;
        if let Some(f) = data {
            grow(f, size, prealloc).await?;
        }
    } else {
        grow(&region.node, payload + size, prealloc).await?;
    }
    region.write_new(&h, &material).await?;
    Ok((h, c))
}

fn prealloc(o: &Map<String, Value>) -> &str {
    match s(o, "preallocation").unwrap_or("off") {
        "metadata" => "off",
        p => p,
    }
}

/// The checks QEMU makes before the job first yields (so their errors
/// come before the command's reply).
pub fn check(o: &Map<String, Value>) -> Result<(), String> {
    let has_file = o.contains_key("file");
    if !o.contains_key("header") && !has_file {
        return Err("Either the parameter 'header' or 'file' must be specified".into());
    }
    if prealloc(o) != "off" && !has_file {
        return Err(
            "Parameter 'preallocation' requires 'file' to be specified for formatting LUKS disk"
                .into(),
        );
    }
    Ok(())
}

/// blockdev-create for luks: everything after the command's reply.
pub async fn create(o: &Map<String, Value>, targets: Targets) -> Result<(), String> {
    let prealloc = prealloc(o);
    let has_file = o.contains_key("file");
    let header = targets.header.transpose()?;
    let file = if has_file { Some(targets.file?) } else { None };
    let size = o.get("size").and_then(Value::as_i64).unwrap_or(0).max(0) as u64;
    let (opts, password) = options(o, &targets.secrets, "")?;
    let detached = header.is_some();
    let node = match (&header, &file) {
        (Some(h), _) => h.clone(),
        (None, Some(f)) => f.clone(),
        (None, None) => {
            return Err("Either the parameter 'header' or 'file' must be specified".into())
        }
    };
    let region = Region { node, base: 0 };
    format_volume(
        &region,
        file.as_ref(),
        detached,
        size,
        prealloc,
        &opts,
        &password,
    )
    .await?;
    region
        .node
        .flush()
        .await
        .map_err(|e| format!("Could not flush: {}", e.msg))?;
    if let (true, Some(f)) = (detached, &file) {
        f.flush()
            .await
            .map_err(|e| format!("Could not flush: {}", e.msg))?;
    }
    Ok(())
}
