//! Opening a qcow2 node in the graph (the registry's open function):
//! its file, then the data file and backing node (given, or named by
//! the image's header), then the image itself.
use serde_json::{json, Map, Value};

use super::{metadata_perms, probe, read_header, Qcow2, Qcow2Options};
use crate::block::drivers::{edge, opt_bool as b, opt_str as s, opt_u64 as u, OpenCtx, Opened};
use crate::block::perm::Perm;
use crate::block::wait::wait;

pub fn open_node(ctx: &mut OpenCtx<'_>, opts: &Map<String, Value>) -> Result<Opened, String> {
    let read_only = ctx.common.read_only;
    let file = ctx.child(opts, "file", read_only)?;
    let (perm, mut shared) = metadata_perms(read_only);
    if ctx.common.force_share {
        shared = Perm::ALL;
    }
    ctx.check_file_locks(&file, perm, shared)?;
    let file_node = ctx.node(&file)?;
    let file_entry = ctx.entry(&file);
    let file_json = file_entry.map(|e| e.json.clone()).unwrap_or(Value::Null);
    let file_plain = file_entry.and_then(|e| e.plain_filename.clone());
    let header = wait(read_header(&file_node)).map_err(|e| e.msg)?;
    let password = super::crypt::options(&header, opts, &|id| ctx.secret(id))?;
    let mut edges = vec![edge("file", &file)];
    // Names in the header are relative to the image's directory.
    let dir = file_plain
        .as_deref()
        .and_then(|f| std::path::Path::new(f).parent())
        .map(|d| d.to_path_buf())
        .unwrap_or_default();
    let resolve = |name: &str| -> String {
        if name.starts_with('/') || dir.as_os_str().is_empty() {
            name.to_string()
        } else {
            dir.join(name).to_string_lossy().into_owned()
        }
    };
    // Named now: the data file and backing are opened by the driver.
    let node_name = ctx.name_now();
    let data = match opts.get("data-file") {
        Some(_) => Some(ctx.child(opts, "data-file", read_only)?),
        None if header.has_data_file() => {
            let Some(name) = &header.data_file else {
                return Err(
                    "Could not open data file: 'data-file' is required for this image".into(),
                );
            };
            let mut o = Map::new();
            o.insert("driver".into(), json!("file"));
            o.insert("filename".into(), json!(resolve(name)));
            Some(ctx.open_implicit(&o, read_only)?)
        }
        None => None,
    };
    if let Some(d) = &data {
        edges.push(edge("data-file", d));
    }
    let backing = match opts.get("backing") {
        Some(Value::Null) => None,
        Some(_) => Some(
            ctx.child(opts, "backing", true)
                .map_err(|e| format!("Could not open backing file: {e}"))?,
        ),
        None => match &header.backing_file {
            Some(name) => {
                let path = resolve(name);
                if ctx.on_chain(&path) || Some(&path) == file_plain.as_ref() {
                    return Err(format!(
                        "Could not open backing file: Backing file '{path}' creates an infinite loop."
                    ));
                }
                if ctx.chain_depth() >= 64 {
                    return Err("Backing chain too deep".into());
                }
                let fmt = match &header.backing_format {
                    Some(f) => f.clone(),
                    None => probe(&path),
                };
                let mut o = Map::new();
                o.insert("driver".into(), json!(fmt));
                o.insert("file".into(), json!({"driver": "file", "filename": path}));
                let r = ctx.in_chain(file_plain.as_deref(), |ctx| ctx.open_implicit(&o, true));
                Some(r.map_err(|e| format!("Could not open backing file: {e}"))?)
            }
            None => None,
        },
    };
    if let Some(bk) = &backing {
        edges.push(edge("backing", bk));
    }
    let data_node = data.as_deref().map(|d| ctx.node(d)).transpose()?;
    let backing_node = backing.as_deref().map(|bk| ctx.node(bk)).transpose()?;
    let crypt = match &password {
        Some(pw) => Some(std::sync::Arc::new(
            wait(super::crypt::Crypt::open(&file_node, &header, pw)).map_err(|e| e.msg)?,
        )),
        None => None,
    };
    let q_opts = Qcow2Options {
        node_name,
        events: ctx.events(),
        l2_cache_size: u(opts, "l2-cache-size"),
        l2_cache_entry_size: u(opts, "l2-cache-entry-size"),
        refcount_cache_size: u(opts, "refcount-cache-size"),
        cache_size: u(opts, "cache-size"),
        cache_clean_interval: u(opts, "cache-clean-interval"),
        lazy_refcounts: b(opts, "lazy-refcounts"),
        backing_full: header.backing_file.as_deref().map(resolve),
        // QEMU's default: on when the node itself unmaps.
        pass_discard: b(opts, "pass-discard-request")
            .unwrap_or(s(opts, "discard") == Some("unmap")),
        crypt,
    };
    let drv = wait(Qcow2::open(
        file_node,
        header.clone(),
        data_node,
        backing_node,
        read_only,
        &q_opts,
    ))
    .map_err(|e| e.msg)?;
    let mut j = Map::new();
    j.insert("driver".into(), json!("qcow2"));
    j.insert("file".into(), file_json);
    // The key secret is part of the node's identity (QEMU's filename
    // becomes json:{...}); the format is not.
    if let Some(pw) = &password {
        j.insert("encrypt.key-secret".into(), json!(pw.id));
    }
    // A backing node other than the one the header names is part of
    // the node's identity, so its filename becomes json:{...} (QEMU's
    // "backing overridden"); so is an explicit "backing": null.
    let plain = match (opts.get("backing"), &backing) {
        (Some(Value::Null), _) => {
            j.insert("backing".into(), Value::Null);
            None
        }
        (Some(_), Some(bk)) => {
            let be = ctx.entry(bk);
            let same = be.and_then(|e| e.plain_filename.clone()) == header.backing_file;
            if same {
                file_plain
            } else {
                let bj = be.map(|e| e.json.clone()).unwrap_or(Value::Null);
                j.insert("backing".into(), bj);
                None
            }
        }
        _ => file_plain,
    };
    let plain = plain.filter(|_| password.is_none());
    Ok(Opened {
        driver: Box::new(drv),
        json: Value::Object(j),
        plain,
        children: edges,
    })
}
