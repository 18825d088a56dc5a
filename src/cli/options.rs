//! Turning option values into validated arguments: `--chardev` (QemuOpts)
//! into a `ChardevBackend`, `--monitor` and `--object` (keyval or JSON)
//! through the QAPI schema, as QSD does.
use serde_json::{json, Map, Value};

use super::keyval::{
    format_opts_help, looks_like_json, parse_bool, parse_keyval, parse_keyval_no_help,
    parse_qemu_opts, parse_qemu_opts_full, parse_size, qemu_opt_get, CHARDEV_OPTS,
};
use crate::qapi::validate::Input;
use crate::qapi::Schema;

/// What a `--chardev` asks for.
pub enum ChardevCli {
    /// `--chardev help`: list the backends, exit 0.
    Help,
    /// `--chardev TYPE,help`: list the options, exit 1 (as QSD does).
    OptionsHelp(String),
    Add {
        id: String,
        backend: Map<String, Value>,
    },
}

fn opt_bool(opts: &[(String, String)], key: &str) -> Result<Option<bool>, String> {
    match qemu_opt_get(opts, key) {
        None => Ok(None),
        Some(v) => parse_bool(v)
            .map(Some)
            .ok_or_else(|| format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

fn opt<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    qemu_opt_get(opts, key)
}

/// `--chardev` value to a ChardevBackend, plus QemuOpts' deprecation
/// warnings (printed before the outcome). `daemonize` forbids stdio.
pub fn chardev(text: &str, daemonize: bool) -> (Vec<String>, Result<ChardevCli, String>) {
    let outcome = parse_qemu_opts_full(text, Some("backend"), Some(CHARDEV_OPTS));
    let result = outcome.result.and_then(|p| {
        if qemu_opt_get(&p.opts, "backend") == Some("help") {
            return Ok(ChardevCli::Help);
        }
        if p.help {
            return Ok(ChardevCli::OptionsHelp(format_opts_help(
                None,
                CHARDEV_OPTS,
            )));
        }
        let mut opts = p.opts;
        if let Some(id) = p.id {
            opts.push(("id".into(), id));
        }
        chardev_backend(&opts, daemonize)
    });
    (outcome.warnings, result)
}

fn chardev_backend(opts: &[(String, String)], daemonize: bool) -> Result<ChardevCli, String> {
    let Some(id) = opt(opts, "id") else {
        return Err("chardev: no id specified".into());
    };
    let Some(kind) = opt(opts, "backend") else {
        return Err(format!("chardev: \"{id}\" missing backend"));
    };
    let mut common = Map::new();
    if let Some(l) = opt(opts, "logfile") {
        common.insert("logfile".into(), json!(l));
    }
    if let Some(b) = opt_bool(opts, "logappend")? {
        common.insert("logappend".into(), json!(b));
    }
    let mut data = common;
    match kind {
        "socket" => {
            let server = opt_bool(opts, "server")?.unwrap_or(false);
            let wait = opt_bool(opts, "wait")?.unwrap_or(true);
            let (path, host, fd) = (opt(opts, "path"), opt(opts, "host"), opt(opts, "fd"));
            let given = [path, host, fd].iter().filter(|x| x.is_some()).count();
            if given > 1 {
                return Err("None or one of 'path', 'fd' or 'host' option required.".into());
            }
            let addr = if let Some(p) = path {
                json!({"type": "unix", "data": {"path": p}})
            } else if let Some(h) = host {
                let Some(port) = opt(opts, "port") else {
                    return Err("chardev: socket: no port given".into());
                };
                json!({"type": "inet", "data": {"host": h, "port": port}})
            } else {
                json!({"type": "fd", "data": {"str": fd.unwrap_or("")}})
            };
            data.insert("addr".into(), addr);
            data.insert("server".into(), json!(server));
            if server {
                data.insert("wait".into(), json!(wait));
            }
            for key in ["nodelay", "telnet", "tn3270", "websocket"] {
                if let Some(b) = opt_bool(opts, key)? {
                    data.insert(key.into(), json!(b));
                }
            }
        }
        "null" => {}
        "stdio" => {
            if daemonize {
                return Err("cannot use stdio with -daemonize".into());
            }
            if let Some(b) = opt_bool(opts, "signal")? {
                data.insert("signal".into(), json!(b));
            }
        }
        "file" => {
            let Some(p) = opt(opts, "path") else {
                return Err("chardev: file: no filename given".into());
            };
            data.insert("out".into(), json!(p));
            if let Some(input) = opt(opts, "input-path") {
                data.insert("in".into(), json!(input));
            }
            if let Some(b) = opt_bool(opts, "append")? {
                data.insert("append".into(), json!(b));
            }
        }
        "ringbuf" | "memory" => {
            if let Some(s) = opt(opts, "size") {
                let n = parse_size(s).ok_or_else(|| {
                    "Parameter 'size' expects a non-negative number below 2^64".to_string()
                })?;
                data.insert("size".into(), json!(n));
            }
        }
        other => return Err(format!("'{other}' is not a valid char driver name")),
    }
    let mut backend = Map::new();
    backend.insert("type".into(), json!(kind));
    backend.insert("data".into(), Value::Object(data));
    Ok(ChardevCli::Add {
        id: id.to_string(),
        backend,
    })
}

/// Parses a keyval-or-JSON option value and validates it as `type_name`.
pub fn keyval_or_json(
    schema: &Schema,
    text: &str,
    implied: Option<&str>,
    type_name: &str,
) -> Result<(Map<String, Value>, bool), String> {
    let (raw, input, help) = if looks_like_json(text) {
        match crate::qmp::parse_whole(text)? {
            Value::Object(m) => (m, Input::Json, false),
            _ => return Err("Invalid parameter type, expected: object".into()),
        }
    } else {
        let p = parse_keyval_no_help(text, implied)?;
        (p, Input::Keyval, false)
    };
    if help {
        return Ok((raw, true));
    }
    schema
        .validate_args(type_name, &raw, input)
        .map(|v| (v, false))
        .map_err(|e| e.desc)
}

/// `--monitor`: returns (chardev, pretty).
pub fn monitor(schema: &Schema, text: &str) -> Result<(String, bool), String> {
    let (m, _) = keyval_or_json(schema, text, Some("chardev"), "MonitorOptions")?;
    if m.get("mode").and_then(Value::as_str) == Some("readline") {
        return Err("Only QMP is supported".into());
    }
    let chardev = m.get("chardev").and_then(Value::as_str).unwrap_or_default();
    let pretty = m.get("pretty").and_then(Value::as_bool).unwrap_or(false);
    Ok((chardev.to_string(), pretty))
}

/// What an `--object` asks for.
pub enum ObjectCli {
    /// Help text to print (then exit 0).
    Help(String),
    Add(Map<String, Value>),
}

pub fn object(schema: &Schema, text: &str) -> Result<ObjectCli, String> {
    if !looks_like_json(text) {
        let p = parse_keyval(text, Some("qom-type"))?;
        let ty = p.value.get("qom-type").and_then(Value::as_str);
        if p.help || ty == Some("help") {
            let props = ty.and_then(crate::objects::help_properties);
            let text = match (ty, props) {
                (Some(t), Some(props)) => {
                    let mut s = format!("{t} options:\n");
                    for p in props {
                        s.push_str(&format!("  {p}\n"));
                    }
                    s
                }
                _ => {
                    let mut s = "List of user creatable objects:\n".to_string();
                    for t in crate::objects::CREATABLE_TYPES {
                        s.push_str(&format!("  {t}\n"));
                    }
                    s
                }
            };
            return Ok(ObjectCli::Help(text));
        }
    }
    let (m, _) = keyval_or_json(schema, text, Some("qom-type"), "ObjectOptions")?;
    Ok(ObjectCli::Add(m))
}

/// `--blockdev`: validated BlockdevOptions with a root node name.
pub fn blockdev(schema: &Schema, text: &str) -> Result<Map<String, Value>, String> {
    let (m, _) = keyval_or_json(schema, text, Some("driver"), "BlockdevOptions")?;
    if m.get("node-name").is_none() {
        return Err("'node-name' must be specified for the root node".into());
    }
    Ok(m)
}

/// `--export`: validated BlockExportOptions.
pub fn export(schema: &Schema, text: &str) -> Result<Map<String, Value>, String> {
    keyval_or_json(schema, text, Some("type"), "BlockExportOptions").map(|(m, _)| m)
}

/// `--nbd-server`: validated NbdServerOptions.
pub fn nbd_server(schema: &Schema, text: &str) -> Result<Map<String, Value>, String> {
    keyval_or_json(schema, text, None, "NbdServerOptions").map(|(m, _)| m)
}

/// `--metrics-server`: validated MetricsServerOptions (rsd's own).
pub fn metrics_server(schema: &Schema, text: &str) -> Result<Map<String, Value>, String> {
    keyval_or_json(schema, text, None, "__org.rsd_MetricsServerOptions").map(|(m, _)| m)
}

/// `-T/--trace`: `[enable=]PATTERN[,events=FILE][,file=FILE]`. Returns
/// None for `help`.
pub fn trace(text: &str) -> Result<Option<observability::TraceOpt>, String> {
    let opts = parse_qemu_opts(text, "enable")?;
    let mut t = observability::TraceOpt::default();
    for (k, v) in opts {
        match k.as_str() {
            "enable" if v == "help" => return Ok(None),
            "enable" => t.patterns.push(v),
            "events" => {
                let list = std::fs::read_to_string(&v)
                    .map_err(|e| format!("{v}: {}", crate::util::os_msg(&e)))?;
                t.patterns.extend(
                    list.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_string),
                );
            }
            "file" => t.file = Some(v),
            other => return Err(format!("Invalid parameter '{other}'")),
        }
    }
    Ok(Some(t))
}
