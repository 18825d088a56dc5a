//! Opening a luks node (the registry's open function): its file, the
//! detached header if given, then the volume unlocked with key-secret.
use std::sync::atomic::{AtomicBool, AtomicU64};

use serde_json::{json, Map, Value};

use super::volume::Region;
use super::Luks;
use crate::block::drivers::{edge, opt_str, OpenCtx, Opened};
use crate::block::perm::Perm;
use crate::block::wait::wait;

pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    let read_only = ctx.common.read_only;
    let file = ctx.child(opts, "file", read_only)?;
    let (perm, mut shared) = crate::block::qcow2::metadata_perms(read_only);
    if ctx.common.force_share {
        shared = Perm::ALL;
    }
    ctx.check_file_locks(&file, perm, shared)?;
    let header = match opts.get("header") {
        Some(_) => {
            let h = ctx.child(opts, "header", read_only)?;
            ctx.check_file_locks(&h, perm, shared)?;
            Some(h)
        }
        None => None,
    };
    let Some(secret_id) = opt_str(opts, "key-secret") else {
        return Err("Parameter 'key-secret' is required for cipher".into());
    };
    let password = ctx.secret(secret_id)?;
    let file_node = ctx.node(&file)?;
    let header_node = header.as_deref().map(|h| ctx.node(h)).transpose()?;
    let detached = header_node.is_some();
    let region = Region {
        node: header_node.unwrap_or_else(|| file_node.clone()),
        base: 0,
    };
    let (hdr, params, crypto) = wait(region.unlock(&password.0, detached)).map_err(|e| e.msg)?;
    // A detached header says 0: the whole file is payload.
    let payload = hdr.payload_bytes();
    let size = Luks::payload_size(file_node.size(), payload);
    let drv = Luks {
        file: file_node,
        region,
        detached,
        payload,
        size: AtomicU64::new(size),
        crypto,
        header: tokio::sync::Mutex::new(hdr),
        params,
        rmw: tokio::sync::RwLock::new(()),
        read_only: AtomicBool::new(read_only),
        secret_id: secret_id.to_string(),
    };
    let mut j = Map::new();
    j.insert("driver".into(), json!("luks"));
    j.insert(
        "file".into(),
        ctx.entry(&file)
            .map(|e| e.json.clone())
            .unwrap_or(Value::Null),
    );
    let mut edges = vec![edge("file", &file)];
    if let Some(h) = &header {
        j.insert(
            "header".into(),
            ctx.entry(h).map(|e| e.json.clone()).unwrap_or(Value::Null),
        );
        edges.push(edge("header", h));
    }
    j.insert("key-secret".into(), json!(secret_id));
    Ok(Opened {
        driver: Box::new(drv),
        json: Value::Object(j),
        plain: None,
        children: edges,
    })
}
