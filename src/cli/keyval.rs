//! QEMU command-line option syntaxes, reproduced byte for byte from the
//! behaviour of qemu-storage-daemon 10.0:
//!
//! * the *keyval* syntax (`--blockdev`, `--object`, `--monitor`,
//!   `--nbd-server`, `--export`): `[implied=]value,key=value,a.b.c=value`;
//! * the legacy *QemuOpts* syntax (`--chardev`): `backend,id=x,key=val,flag`;
//! * the scalar parsers QEMU applies to option values (booleans, integers,
//!   sizes).
//!
//! Error strings are exactly what QEMU stores in its `Error`: the caller
//! prints them as `qemu-storage-daemon: --OPTION ARG: MESSAGE`.  Some
//! messages carry a hint on further lines (e.g. the `id` check of QemuOpts);
//! those are returned as `"message\nhint"` so that printing the string
//! followed by a newline reproduces QEMU's output.
//!
//! Keyval grammar (see QEMU's `util/keyval.c`):
//!
//! ```text
//! key-vals     = [ key-val { ',' key-val } [ ',' ] ]
//! key-val      = key '=' val | help
//! key          = key-fragment { '.' key-fragment }
//! key-fragment = qapi-name | index
//! qapi-name    = [ '__' rfqdn '_' ] [A-Za-z][A-Za-z0-9_-]*
//! index        = [0-9]+
//! val          = { [^,] | ',,' }
//! help         = 'help' | '?'
//! implied form = val-no-key [ ',' key-vals ]   with val-no-key = [^=,]+
//! ```

use serde_json::{Map, Value};
use std::collections::HashMap;

// ---------------------------------------------------------------------------
// Keyval
// ---------------------------------------------------------------------------

/// Result of [`parse_keyval`].
#[derive(Debug, Clone, PartialEq)]
pub struct KeyvalParsed {
    /// The parsed tree.  Leaves are always `Value::String`; inner nodes are
    /// objects, or arrays when all their keys are list indices.
    pub value: Map<String, Value>,
    /// `help` or `?` appeared as a bare item (e.g. `help`, `secret,help`).
    pub help: bool,
}

/// Message QEMU reports when help is requested for an option that has none
/// (`--blockdev help`, `--monitor help`, `--export help`, `--nbd-server help`).
pub const HELP_NOT_AVAILABLE: &str = "Help is not available for this option";

/// Longest key fragment QEMU accepts (its buffer is 128 bytes incl. NUL).
const MAX_FRAGMENT_LEN: usize = 127;

/// Parse QEMU keyval syntax, accepting help requests (like QEMU's
/// `keyval_parse()` with a non-null `help` argument, as `--object` uses it).
///
/// `implied_key` is the key a leading bare value is assigned to (e.g.
/// `Some("driver")` for `--blockdev`, `Some("qom-type")` for `--object`,
/// `Some("chardev")` for `--monitor`, `Some("type")` for `--export`, `None`
/// for `--nbd-server`).  A bare `help` or `?` item (anywhere) sets
/// [`KeyvalParsed::help`]; the rest of the text is still parsed and checked.
pub fn parse_keyval(text: &str, implied_key: Option<&str>) -> Result<KeyvalParsed, String> {
    keyval_parse_impl(text, implied_key, true)
}

/// Parse QEMU keyval syntax for an option without help support (QEMU passes a
/// null `help` pointer: `--blockdev`, `--monitor`, `--nbd-server`,
/// `--export`).  A help request fails with [`HELP_NOT_AVAILABLE`]; that error
/// takes precedence over list errors (`Parameter 'a.0' missing`, ...), exactly
/// like in QEMU, but not over syntax errors anywhere in the text.
pub fn parse_keyval_no_help(
    text: &str,
    implied_key: Option<&str>,
) -> Result<Map<String, Value>, String> {
    keyval_parse_impl(text, implied_key, false).map(|p| p.value)
}

/// True if QEMU would parse the option argument as JSON rather than keyval
/// syntax: its first character is `{` (no leading whitespace allowed).
pub fn looks_like_json(text: &str) -> bool {
    text.starts_with('{')
}

fn keyval_parse_impl(
    text: &str,
    implied_key: Option<&str>,
    help_allowed: bool,
) -> Result<KeyvalParsed, String> {
    let bytes = text.as_bytes();
    let mut root = Dict::default();
    let mut help = false;
    let mut pos = 0;
    let mut implied = implied_key;
    while pos < bytes.len() {
        pos = keyval_parse_one(&mut root, bytes, pos, implied, &mut help)?;
        implied = None;
    }
    if help && !help_allowed {
        return Err(HELP_NOT_AVAILABLE.to_string());
    }
    let value = listify_root(root)?;
    Ok(KeyvalParsed { value, help })
}

/// A leaf or an inner node of the tree being built.
#[derive(Debug)]
enum Node {
    Str(String),
    Dict(Dict),
}

/// An object under construction.  Keeps insertion order (for output) and can
/// reproduce QEMU's QDict iteration order (which decides which of several
/// errors is reported and which duplicate list index wins).
#[derive(Debug, Default)]
struct Dict {
    entries: Vec<(String, Node)>,
    index: HashMap<String, usize>,
}

impl Dict {
    /// Ensure `key` maps to an object and return it (QEMU's
    /// `keyval_parse_put()` with a null value).
    fn put_dict(&mut self, key: &str, full_key_prefix: &str) -> Result<&mut Dict, String> {
        let idx = match self.index.get(key) {
            Some(&i) => i,
            None => {
                self.entries
                    .push((key.to_string(), Node::Dict(Dict::default())));
                let i = self.entries.len() - 1;
                self.index.insert(key.to_string(), i);
                i
            }
        };
        match self.entries.get_mut(idx) {
            Some((_, Node::Dict(d))) => Ok(d),
            _ => Err(inconsistent(full_key_prefix)),
        }
    }

    /// Map `key` to the string `value`, replacing an earlier string (QEMU's
    /// `keyval_parse_put()` with a value).
    fn put_str(&mut self, key: &str, value: String, full_key: &str) -> Result<(), String> {
        match self.index.get(key) {
            Some(&i) => match self.entries.get_mut(i) {
                Some((_, node @ Node::Str(_))) => {
                    *node = Node::Str(value);
                    Ok(())
                }
                _ => Err(inconsistent(full_key)),
            },
            None => {
                self.entries.push((key.to_string(), Node::Str(value)));
                self.index.insert(key.to_string(), self.entries.len() - 1);
                Ok(())
            }
        }
    }

    /// Entry positions in the order QEMU's `qdict_first()/qdict_next()` visit
    /// them: by hash bucket, and within a bucket most recently inserted first.
    fn qemu_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.entries.len()).collect();
        order.sort_by_key(|&i| (qdict_bucket(&self.entries[i].0), std::cmp::Reverse(i)));
        order
    }
}

fn inconsistent(key: &str) -> String {
    format!("Parameters '{key}.*' used inconsistently")
}

/// QEMU's `tdb_hash()` modulo `QDICT_BUCKET_MAX`.
fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// Length of the QAPI name at the start of `s` (QEMU's `parse_qapi_name()`
/// with `complete == false`), or `None` if there is none.
fn qapi_name_len(s: &[u8]) -> Option<usize> {
    let mut p = 0;
    if s.first() == Some(&b'_') {
        // Downstream extension prefix "__RFQDN_".
        if s.get(1) != Some(&b'_') {
            return None;
        }
        p = 2;
        while s
            .get(p)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
        {
            p += 1;
        }
        if s.get(p) != Some(&b'_') {
            return None;
        }
        p += 1;
    }
    if !s.get(p).is_some_and(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    p += 1;
    while s
        .get(p)
        .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        p += 1;
    }
    Some(p)
}

/// QEMU's `key_to_index()` with an end pointer: leading decimal digits as a
/// list index capped at `i32::MAX`, plus the number of digits.
fn key_prefix_index(s: &[u8]) -> Option<(i64, usize)> {
    let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    let mut v: i64 = 0;
    for &c in &s[..n] {
        v = v.saturating_mul(10).saturating_add(i64::from(c - b'0'));
    }
    Some((v.min(i64::from(i32::MAX)), n))
}

/// QEMU's `key_to_index()` without an end pointer: the whole key must be
/// decimal digits.
fn key_index(key: &str) -> Option<i64> {
    match key_prefix_index(key.as_bytes()) {
        Some((v, n)) if n == key.len() => Some(v),
        _ => None,
    }
}

/// Length of the help option `s` starts with (QEMU's
/// `starts_with_help_option()`).
fn help_prefix_len(s: &[u8]) -> usize {
    if s.first() == Some(&b'?') {
        1
    } else if s.starts_with(b"help") {
        4
    } else {
        0
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Parse one `key=value` (or implied value, or help item) starting at
/// `start`; return the position of the next item.
fn keyval_parse_one(
    root: &mut Dict,
    params: &[u8],
    start: usize,
    implied_key: Option<&str>,
    help: &mut bool,
) -> Result<usize, String> {
    let rest = &params[start..];
    let len = rest
        .iter()
        .position(|&c| c == b'=' || c == b',')
        .unwrap_or(rest.len());

    // The key being parsed: either a slice of `params` or the implied key.
    let mut key: &[u8] = &rest[..len];
    let mut implied_val_end = None;
    if len > 0 && rest.get(len) != Some(&b'=') {
        if help_prefix_len(rest) == len {
            *help = true;
            let mut next = start + len;
            if params.get(next) == Some(&b',') {
                next += 1;
            }
            return Ok(next);
        }
        if let Some(ik) = implied_key {
            key = ik.as_bytes();
            implied_val_end = Some(start + len);
        }
    }
    let key_end = key.len();

    // Walk the key fragments; `cur` is the object the current fragment
    // applies to, `key_in_cur` the previous fragment.
    let mut cur: &mut Dict = root;
    let mut key_in_cur = String::new();
    let mut s = 0;
    loop {
        let frag = &key[s..];
        let flen = if s != 0 {
            match key_prefix_index(frag) {
                Some((_, n)) => n,
                None => qapi_name_len(frag).unwrap_or(0),
            }
        } else {
            qapi_name_len(frag).unwrap_or(0)
        };
        if flen == 0 || (s + flen < key_end && key.get(s + flen) != Some(&b'.')) {
            return Err(format!("Invalid parameter '{}'", lossy(key)));
        }
        if flen > MAX_FRAGMENT_LEN {
            let is_fragment = s != 0 || s + flen != key_end;
            return Err(format!(
                "Parameter{} '{}' is too long",
                if is_fragment { " fragment" } else { "" },
                lossy(&frag[..flen])
            ));
        }
        if s != 0 {
            cur = cur.put_dict(&key_in_cur, &lossy(&key[..s - 1]))?;
        }
        key_in_cur = lossy(&frag[..flen]);
        s += flen;
        if key.get(s) != Some(&b'.') {
            break;
        }
        s += 1;
    }

    let (value, next) = match implied_val_end {
        Some(end) => {
            let mut next = end;
            if params.get(next) == Some(&b',') {
                next += 1;
            }
            (lossy(&params[start..end]), next)
        }
        None => {
            // `s` is the end of the key inside `rest`.
            if rest.get(s) != Some(&b'=') {
                return Err(format!(
                    "Expected '=' after parameter '{}'",
                    lossy(&key[..s])
                ));
            }
            let (val, consumed) = read_comma_escaped(&rest[s + 1..]);
            let mut next = start + s + 1 + consumed;
            if params.get(next) == Some(&b',') {
                next += 1;
            }
            (val, next)
        }
    };
    cur.put_str(&key_in_cur, value, &lossy(key))?;
    Ok(next)
}

/// Read a value up to the first single `,` (`,,` stands for a literal comma).
/// Returns the value and the number of bytes consumed (excluding the
/// terminating comma).
fn read_comma_escaped(s: &[u8]) -> (String, usize) {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        if s[i] == b',' {
            if s.get(i + 1) == Some(&b',') {
                out.push(b',');
                i += 2;
                continue;
            }
            break;
        }
        out.push(s[i]);
        i += 1;
    }
    (lossy(&out), i)
}

fn listify_root(root: Dict) -> Result<Map<String, Value>, String> {
    match listify(root, &mut Vec::new())? {
        Value::Object(m) => Ok(m),
        // Top-level keys are QAPI names, never indices: cannot happen.
        _ => Err("Parameters '*' used inconsistently".to_string()),
    }
}

/// QEMU's `keyval_listify()`: turn objects whose keys are all list indices
/// into arrays, recursively, reporting the same first error QEMU reports.
fn listify(dict: Dict, path: &mut Vec<String>) -> Result<Value, String> {
    let order = dict.qemu_order();
    let mut converted: Vec<Option<(String, Value)>> = Vec::with_capacity(dict.entries.len());
    let mut slots: Vec<Option<(String, Node)>> = dict.entries.into_iter().map(Some).collect();
    converted.resize_with(slots.len(), || None);

    let mut has_index = false;
    let mut has_member = false;
    for &i in &order {
        let Some((key, node)) = slots.get_mut(i).and_then(Option::take) else {
            continue;
        };
        if key_index(&key).is_some() {
            has_index = true;
        } else {
            has_member = true;
        }
        let value = match node {
            Node::Str(s) => Value::String(s),
            Node::Dict(d) => {
                path.push(key.clone());
                let v = listify(d, path);
                path.pop();
                v?
            }
        };
        converted[i] = Some((key, value));
    }

    let prefix: String = path.iter().map(|k| format!("{k}.")).collect();
    if has_index && has_member {
        return Err(format!("Parameters '{prefix}*' used inconsistently"));
    }
    if !has_index {
        let map: Map<String, Value> = converted.into_iter().flatten().collect();
        return Ok(Value::Object(map));
    }

    // One extra slot as a sentinel, like QEMU: an index beyond the number of
    // entries necessarily leaves a gap, reported at the first missing index.
    let nelt = converted.len() + 1;
    let mut elt: Vec<Option<Value>> = vec![None; nelt];
    let mut max_index: i64 = -1;
    for &i in &order {
        let Some((key, value)) = converted.get(i).and_then(|c| c.as_ref()) else {
            continue;
        };
        let index = key_index(key).unwrap_or(0);
        max_index = max_index.max(index);
        if index >= (nelt - 1) as i64 {
            continue;
        }
        // Distinct keys can share an index ("0" and "00"): last visited wins.
        elt[index as usize] = Some(value.clone());
    }
    let count = (nelt as i64).min(max_index + 1).max(0) as usize;
    let mut list = Vec::with_capacity(count);
    for (i, slot) in elt.into_iter().take(count).enumerate() {
        match slot {
            Some(v) => list.push(v),
            None => return Err(format!("Parameter '{prefix}{i}' missing")),
        }
    }
    Ok(Value::Array(list))
}

// ---------------------------------------------------------------------------
// QemuOpts
// ---------------------------------------------------------------------------

/// Value type of a QemuOpts option (QEMU's `enum QemuOptType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptType {
    Str,
    Bool,
    Number,
    Size,
}

impl OptType {
    /// Type name as printed by QEMU's option help.
    pub fn help_name(self) -> &'static str {
        match self {
            OptType::Str => "str",
            OptType::Bool => "bool (on/off)",
            OptType::Number => "num",
            OptType::Size => "size",
        }
    }
}

/// One accepted QemuOpts option (QEMU's `QemuOptDesc`, without help text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptDesc {
    pub name: &'static str,
    pub kind: OptType,
}

const fn od(name: &'static str, kind: OptType) -> OptDesc {
    OptDesc { name, kind }
}

/// The options `--chardev` accepts in qemu-storage-daemon 10.0 (as listed by
/// `qemu-storage-daemon --chardev socket,help`, in that order).
pub const CHARDEV_OPTS: &[OptDesc] = &[
    od("abstract", OptType::Bool),
    od("append", OptType::Bool),
    od("backend", OptType::Str),
    od("chardev", OptType::Str),
    od("chardevs.0", OptType::Str),
    od("chardevs.1", OptType::Str),
    od("chardevs.2", OptType::Str),
    od("chardevs.3", OptType::Str),
    od("clipboard", OptType::Bool),
    od("cols", OptType::Number),
    od("debug", OptType::Number),
    od("delay", OptType::Bool),
    od("fd", OptType::Str),
    od("height", OptType::Number),
    od("host", OptType::Str),
    od("input-path", OptType::Str),
    od("ipv4", OptType::Bool),
    od("ipv6", OptType::Bool),
    od("localaddr", OptType::Str),
    od("localport", OptType::Str),
    od("logappend", OptType::Bool),
    od("logfile", OptType::Str),
    od("mouse", OptType::Bool),
    od("mux", OptType::Bool),
    od("name", OptType::Str),
    od("nodelay", OptType::Bool),
    od("path", OptType::Str),
    od("port", OptType::Str),
    od("reconnect-ms", OptType::Number),
    od("reconnect", OptType::Number),
    od("rows", OptType::Number),
    od("server", OptType::Bool),
    od("signal", OptType::Bool),
    od("size", OptType::Size),
    od("telnet", OptType::Bool),
    od("tight", OptType::Bool),
    od("tls-authz", OptType::Str),
    od("tls-creds", OptType::Str),
    od("tn3270", OptType::Bool),
    od("to", OptType::Number),
    od("wait", OptType::Bool),
    od("websocket", OptType::Bool),
    od("width", OptType::Number),
];

/// QEMU's `qemu_opts_print_help(list, true)` output (what `--chardev
/// socket,help` prints to stdout before exiting with status 1).
pub fn format_opts_help(list_name: Option<&str>, descs: &[OptDesc]) -> String {
    let mut lines: Vec<String> = descs
        .iter()
        .map(|d| format!("  {}=<{}>", d.name, d.kind.help_name()))
        .collect();
    lines.sort();
    let mut out = String::new();
    if lines.is_empty() {
        match list_name {
            Some(n) => out.push_str(&format!("There are no options for {n}.\n")),
            None => out.push_str("No options available.\n"),
        }
    } else {
        match list_name {
            Some(n) => out.push_str(&format!("{n} options:\n")),
            None => out.push_str("Options:\n"),
        }
    }
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// Successful result of [`parse_qemu_opts_full`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QemuOptsParsed {
    /// The `id` (QEMU uses the *first* `id=`; later ones are ignored).
    pub id: Option<String>,
    /// All other options in command-line order, duplicates kept (QEMU's
    /// `qemu_opt_get()` returns the last one: use [`qemu_opt_get`]).
    pub opts: Vec<(String, String)>,
    /// A bare `help` or `?` was found; parsing stopped there.  QSD then
    /// prints [`format_opts_help`] to stdout and exits with status 1.
    pub help: bool,
}

/// Outcome of [`parse_qemu_opts_full`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuOptsOutcome {
    /// Deprecation warnings, to be printed before the result is acted upon
    /// (also before the error), each as
    /// `qemu-storage-daemon: --chardev ARG: warning: WARNING` + newline.
    /// A warning has two lines, e.g.
    /// `short-form boolean option 'path' deprecated\nPlease use path=on instead`.
    pub warnings: Vec<String>,
    pub result: Result<QemuOptsParsed, String>,
}

/// Last value of option `name` (QEMU's `qemu_opt_get()`).
pub fn qemu_opt_get<'a>(opts: &'a [(String, String)], name: &str) -> Option<&'a str> {
    opts.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Parse QemuOpts syntax (`--chardev`): `backend,id=x,key=val,flag`.
///
/// Simplified interface over [`parse_qemu_opts_full`] without option
/// validation; deprecation warnings are dropped.  The `id` (first one wins),
/// if any, comes first as `("id", value)`; then all other options in order,
/// duplicates kept (the last one is the effective one).  A bare `flag` yields
/// `(flag, "on")`, `noflag` yields `(flag, "off")`.  If a bare `help`/`?` is
/// found, parsing stops and the vector ends with `("help", "on")`.
pub fn parse_qemu_opts(text: &str, implied_key: &str) -> Result<Vec<(String, String)>, String> {
    let parsed = parse_qemu_opts_full(text, Some(implied_key), None).result?;
    let mut out = Vec::with_capacity(parsed.opts.len() + 2);
    if let Some(id) = parsed.id {
        out.push(("id".to_string(), id));
    }
    out.extend(parsed.opts);
    if parsed.help {
        out.push(("help".to_string(), "on".to_string()));
    }
    Ok(out)
}

/// One item of QemuOpts syntax (QEMU's `get_opt_name_value()`).
struct OptItem {
    name: String,
    value: String,
    /// Bare `help`/`?` flag.
    is_help: bool,
    /// Deprecation warning for a short-form boolean.
    warning: Option<String>,
    next: usize,
}

fn get_opt_name_value(params: &[u8], start: usize, firstname: Option<&str>) -> OptItem {
    let rest = &params[start..];
    let len = rest
        .iter()
        .position(|&c| c == b'=' || c == b',')
        .unwrap_or(rest.len());
    let mut is_help = false;
    let mut warning = None;
    let (name, value, consumed) = if rest.get(len) != Some(&b'=') {
        if let Some(first) = firstname {
            // Implicitly named first option; its value may contain ",,".
            let (v, n) = read_comma_escaped(rest);
            (first.to_string(), v, n)
        } else {
            // Short-form boolean: "flag" = on, "noflag" = off.
            let raw = lossy(&rest[..len]);
            let (name, value, prefix) = match raw.strip_prefix("no") {
                Some(stripped) => (stripped.to_string(), "off", "no"),
                None => (raw.clone(), "on", ""),
            };
            is_help = prefix.is_empty() && (name == "help" || name == "?");
            if !is_help {
                let advice = if name == "delay" {
                    format!(
                        "Please use nodelay={} instead",
                        if prefix.is_empty() { "off" } else { "on" }
                    )
                } else {
                    format!("Please use {name}={value} instead")
                };
                warning = Some(format!(
                    "short-form boolean option '{prefix}{name}' deprecated\n{advice}"
                ));
            }
            (name, value.to_string(), len)
        }
    } else {
        let (v, n) = read_comma_escaped(&rest[len + 1..]);
        (lossy(&rest[..len]), v, len + 1 + n)
    };
    let mut next = start + consumed;
    if params.get(next) == Some(&b',') {
        next += 1;
    }
    OptItem {
        name,
        value,
        is_help,
        warning,
        next,
    }
}

/// QEMU's `id_wellformed()`.
fn id_wellformed(id: &str) -> bool {
    let b = id.as_bytes();
    match b.first() {
        Some(c) if c.is_ascii_alphabetic() => {}
        _ => return false,
    }
    b[1..]
        .iter()
        .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_')
}

/// Error for a malformed `id` (message plus QEMU's hint line).
pub const ID_NOT_WELLFORMED: &str = "Parameter 'id' expects an identifier\n\
Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.";

/// Full QemuOpts parse as done by QEMU's `qemu_opts_parse_noisily()` for a
/// list that does not accept arbitrary options (like `--chardev`).
///
/// * The `id` is looked up first (first `id` item wins, `noid` means
///   `id=off`) and must be well formed ([`ID_NOT_WELLFORMED`]).
/// * Items are then processed in order: warnings for short-form booleans are
///   collected; a bare `help`/`?` stops parsing with `help = true`; every
///   other option except `id` is validated against `descs` when given
///   (`Invalid parameter 'x'`, `Parameter 'x' expects 'on' or 'off'`,
///   `Parameter 'x' expects a number`, `Value 'v' is too large for parameter
///   'x'`, size errors), stopping at the first error.
pub fn parse_qemu_opts_full(
    text: &str,
    implied_key: Option<&str>,
    descs: Option<&[OptDesc]>,
) -> QemuOptsOutcome {
    let params = text.as_bytes();
    let mut warnings = Vec::new();

    // opts_parse_id(): scan without implied key and without warnings.
    let mut id = None;
    let mut p = 0;
    while p < params.len() {
        let item = get_opt_name_value(params, p, None);
        p = item.next;
        if item.name == "id" {
            id = Some(item.value);
            break;
        }
    }
    if let Some(id) = &id {
        if !id_wellformed(id) {
            return QemuOptsOutcome {
                warnings,
                result: Err(ID_NOT_WELLFORMED.to_string()),
            };
        }
    }

    let mut parsed = QemuOptsParsed {
        id,
        opts: Vec::new(),
        help: false,
    };
    let mut firstname = implied_key;
    let mut p = 0;
    while p < params.len() {
        let item = get_opt_name_value(params, p, firstname);
        p = item.next;
        firstname = None;
        if let Some(w) = item.warning {
            warnings.push(w);
        }
        if item.is_help {
            parsed.help = true;
            break;
        }
        if item.name == "id" {
            continue;
        }
        if let Some(descs) = descs {
            if let Err(e) = validate_opt(descs, &item.name, &item.value) {
                return QemuOptsOutcome {
                    warnings,
                    result: Err(e),
                };
            }
        }
        parsed.opts.push((item.name, item.value));
    }
    QemuOptsOutcome {
        warnings,
        result: Ok(parsed),
    }
}

/// Check one option against its description (QEMU's `opt_validate()`).
pub fn validate_opt(descs: &[OptDesc], name: &str, value: &str) -> Result<(), String> {
    let Some(desc) = descs.iter().find(|d| d.name == name) else {
        return Err(format!("Invalid parameter '{name}'"));
    };
    match desc.kind {
        OptType::Str => Ok(()),
        OptType::Bool => parse_bool(value)
            .map(|_| ())
            .ok_or_else(|| format!("Parameter '{name}' expects 'on' or 'off'")),
        OptType::Number => match qemu_strtou64(value) {
            Ok(_) => Ok(()),
            Err(NumError::Range) => Err(format!(
                "Value '{value}' is too large for parameter '{name}'"
            )),
            Err(NumError::Invalid) => Err(format!("Parameter '{name}' expects a number")),
        },
        OptType::Size => match qemu_strtosz(value) {
            Ok(_) => Ok(()),
            Err(NumError::Range) => Err(format!(
                "Value '{value}' is out of range for parameter '{name}'"
            )),
            Err(NumError::Invalid) => Err(format!(
                "Parameter '{name}' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively."
            )),
        },
    }
}

pub use crate::numbers::*;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kv(text: &str, implied: Option<&str>) -> Value {
        let p = parse_keyval(text, implied).expect("parse failed");
        assert!(!p.help);
        Value::Object(p.value)
    }

    fn kv_err(text: &str, implied: Option<&str>) -> String {
        parse_keyval(text, implied).expect_err("parse unexpectedly succeeded")
    }

    // --- keyval: syntax -------------------------------------------------

    #[test]
    fn keyval_empty_and_trailing_comma() {
        assert_eq!(kv("", Some("driver")), json!({}));
        assert_eq!(kv("", None), json!({}));
        assert_eq!(
            kv("null-co,node-name=x,", Some("driver")),
            json!({"driver": "null-co", "node-name": "x"})
        );
    }

    #[test]
    fn keyval_implied_key() {
        assert_eq!(
            kv("file,filename=/tmp/a", Some("driver")),
            json!({"driver": "file", "filename": "/tmp/a"})
        );
        // Explicit key in first position: no implied key.
        assert_eq!(
            kv("driver=file,filename=a", Some("driver")),
            json!({"driver": "file", "filename": "a"})
        );
        // Only the first item may be implied.
        assert_eq!(
            kv_err("null-co,x", Some("driver")),
            "Expected '=' after parameter 'x'"
        );
        // Implied value ends at the first comma: ",," does not escape there.
        assert_eq!(
            kv_err("null,,co,node-name=x", Some("driver")),
            "Invalid parameter ''"
        );
        // "null-co=1" is a key, so the implied key is missing (visitor-level).
        assert_eq!(kv("null-co=1", Some("driver")), json!({"null-co": "1"}));
        // Explicit value of the implied key is allowed later and replaces it.
        assert_eq!(
            kv("file,driver=null-co", Some("driver")),
            json!({"driver": "null-co"})
        );
    }

    #[test]
    fn keyval_comma_escape() {
        assert_eq!(
            kv("secret,id=s,data=x,,y=1", Some("qom-type")),
            json!({"qom-type": "secret", "id": "s", "data": "x,y=1"})
        );
        assert_eq!(
            kv("driver=null-co,node-name=x,,", Some("driver")),
            json!({"driver": "null-co", "node-name": "x,"})
        );
        assert_eq!(
            kv("driver=file,,filename=x", Some("driver")),
            json!({"driver": "file,filename=x"})
        );
        assert_eq!(kv("a=,b=", None), json!({"a": "", "b": ""}));
        assert_eq!(kv("a=x=y", None), json!({"a": "x=y"}));
        assert_eq!(kv("a=ä,,ö", None), json!({"a": "ä,ö"}));
    }

    #[test]
    fn keyval_dotted_keys_and_lists() {
        assert_eq!(
            kv("a.b.c=1,a.b.d=2,a.e=3", None),
            json!({"a": {"b": {"c": "1", "d": "2"}, "e": "3"}})
        );
        assert_eq!(
            kv("a.1=y,a.0=x,a.2.k=z", None),
            json!({"a": ["x", "y", {"k": "z"}]})
        );
        assert_eq!(
            kv("addr.type=inet,addr.host=h,addr.port=1", None),
            json!({"addr": {"type": "inet", "host": "h", "port": "1"}})
        );
        // Duplicate keys: last one wins.
        assert_eq!(
            kv("file,node-name=a,node-name=b", Some("driver")),
            json!({"driver": "file", "node-name": "b"})
        );
        // Distinct keys with the same index: QEMU builds a one-element list.
        assert_eq!(
            kv("a.0=1,a.00=2", None)["a"].as_array().map(Vec::len),
            Some(1)
        );
        // Downstream-extension names.
        assert_eq!(
            kv("__com.redhat_x=1,a.___y=2", None),
            json!({"__com.redhat_x": "1", "a": {"___y": "2"}})
        );
        assert_eq!(kv("a-b_c=1", None), json!({"a-b_c": "1"}));
    }

    #[test]
    fn keyval_errors() {
        let d = Some("driver");
        assert_eq!(kv_err("driver=file,a..b=1", d), "Invalid parameter 'a..b'");
        assert_eq!(
            kv_err("driver=file,x", d),
            "Expected '=' after parameter 'x'"
        );
        assert_eq!(
            kv_err("driver=file,a=1,a.b=2", d),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            kv_err("driver=file,a.b=1,a=2", d),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            kv_err("null-co,a.b=1,a.b.c=2", d),
            "Parameters 'a.b.*' used inconsistently"
        );
        assert_eq!(
            kv_err("driver=file,a.0=x,a.2=y", d),
            "Parameter 'a.1' missing"
        );
        assert_eq!(
            kv_err("driver=file,a.0=x,a.b=y", d),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            kv_err("null-co,a.b.0=1,a.b.x=2", d),
            "Parameters 'a.b.*' used inconsistently"
        );
        assert_eq!(kv_err("null-co,a.1=1", d), "Parameter 'a.0' missing");
        assert_eq!(
            kv_err("null-co,a.99999999999=1", d),
            "Parameter 'a.0' missing"
        );
        assert_eq!(kv_err("driver=file,a!=1", d), "Invalid parameter 'a!'");
        assert_eq!(kv_err("driver=file,=1", d), "Invalid parameter ''");
        assert_eq!(kv_err(",driver=file", d), "Invalid parameter ''");
        assert_eq!(kv_err("=x", d), "Invalid parameter ''");
        assert_eq!(kv_err(",", d), "Invalid parameter ''");
        assert_eq!(kv_err("null-co,,", d), "Invalid parameter ''");
        assert_eq!(kv_err("null-co,a.-1=1", d), "Invalid parameter 'a.-1'");
        assert_eq!(kv_err("null-co,a.1b=1", d), "Invalid parameter 'a.1b'");
        assert_eq!(kv_err("null-co,a.=1", d), "Invalid parameter 'a.'");
        assert_eq!(kv_err("null-co,.a=1", d), "Invalid parameter '.a'");
        assert_eq!(kv_err("null-co,1a=1", d), "Invalid parameter '1a'");
        assert_eq!(kv_err("null-co,-a=1", d), "Invalid parameter '-a'");
        assert_eq!(kv_err("null-co,0=1", d), "Invalid parameter '0'");
        assert_eq!(kv_err("null-co,ä=1", d), "Invalid parameter 'ä'");
        assert_eq!(kv_err("null-co,aä=1", d), "Invalid parameter 'aä'");
        assert_eq!(kv_err("null-co,a b=1", d), "Invalid parameter 'a b'");
        assert_eq!(kv_err("null-co,a.b c=1", d), "Invalid parameter 'a.b c'");
        assert_eq!(kv_err("null-co,_a=1", d), "Invalid parameter '_a'");
        assert_eq!(kv_err("null-co,__a=1", d), "Invalid parameter '__a'");
    }

    #[test]
    fn keyval_error_order() {
        let d = Some("driver");
        // Errors are reported in text order ...
        assert_eq!(
            kv_err("null-co,a.b=1,a=2,c..d=1", d),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            kv_err("null-co,x,a.1=3", d),
            "Expected '=' after parameter 'x'"
        );
        // ... list errors only after the whole text is parsed ...
        assert_eq!(
            kv_err("null-co,a.1=3,x", d),
            "Expected '=' after parameter 'x'"
        );
        // ... a fragment is validated before its parent is used as object ...
        assert_eq!(kv_err("a=1,a.b!=2", None), "Invalid parameter 'a.b!'");
        assert_eq!(
            kv_err("a=1,a.b.c!=2", None),
            "Parameters 'a.*' used inconsistently"
        );
        // ... and list errors follow QEMU's hash-table order ("b" first).
        assert_eq!(
            kv_err("null-co,a.c.1=1,a.b.1=2", d),
            "Parameter 'a.b.0' missing"
        );
        assert_eq!(
            kv_err("null-co,a.b.1=1,a.c.1=2", d),
            "Parameter 'a.b.0' missing"
        );
        // Mixed list members are fine at this level.
        assert_eq!(
            kv("null-co,a.0.b=1,a.1=2", d),
            json!({"driver": "null-co", "a": [{"b": "1"}, "2"]})
        );
    }

    #[test]
    fn keyval_too_long() {
        let d = Some("driver");
        let a127 = "a".repeat(127);
        let a128 = "a".repeat(128);
        let ones128 = "1".repeat(128);
        assert!(parse_keyval(&format!("driver=file,{a127}=1"), d).is_ok());
        assert_eq!(
            kv_err(&format!("driver=file,{a128}=1"), d),
            format!("Parameter '{a128}' is too long")
        );
        assert_eq!(
            kv_err(&format!("driver=file,x.{a128}=1"), d),
            format!("Parameter fragment '{a128}' is too long")
        );
        assert_eq!(
            kv_err(&format!("driver=file,{a128}.x=1"), d),
            format!("Parameter fragment '{a128}' is too long")
        );
        assert_eq!(
            kv_err(&format!("driver=file,x.{ones128}=1"), d),
            format!("Parameter fragment '{ones128}' is too long")
        );
        // Invalid characters are reported before the length.
        assert_eq!(
            kv_err(&format!("driver=file,{a128}!=1"), d),
            format!("Invalid parameter '{a128}!'")
        );
    }

    #[test]
    fn keyval_help() {
        let q = Some("qom-type");
        let h = |t: &str| parse_keyval(t, q).expect("help parse");
        assert!(h("help").help);
        assert!(h("?").help);
        assert!(h("help,").help);
        assert!(h("help,id=x").help);
        assert!(h("help,help").help);
        let p = h("secret,help");
        assert!(p.help);
        assert_eq!(Value::Object(p.value), json!({"qom-type": "secret"}));
        assert!(h("secret,?").help);
        assert!(h("secret,id=x,help").help);
        assert!(h("qom-type=secret,help").help);
        // Not help requests:
        assert_eq!(kv("helpx", q), json!({"qom-type": "helpx"}));
        assert_eq!(kv("?x", q), json!({"qom-type": "?x"}));
        assert_eq!(
            kv("secret,help=x", q),
            json!({"qom-type": "secret", "help": "x"})
        );
        assert_eq!(kv("help=x", q), json!({"help": "x"}));
        assert_eq!(kv_err("?=x", q), "Invalid parameter '?'");
        assert_eq!(kv_err("secret,?x", q), "Invalid parameter '?x'");
        assert_eq!(
            kv_err("secret,helpx", q),
            "Expected '=' after parameter 'helpx'"
        );
        // The implied key is only available in the very first item.
        assert_eq!(
            kv_err("help,secret", q),
            "Expected '=' after parameter 'secret'"
        );
        assert_eq!(kv_err(",help", q), "Invalid parameter ''");
        // Errors after a help request are still reported.
        assert_eq!(kv_err("secret,help,a.1=x", q), "Parameter 'a.0' missing");
        assert_eq!(
            kv_err("secret,help,x", q),
            "Expected '=' after parameter 'x'"
        );
        assert_eq!(
            kv_err("secret,id=x,data=1,help,a=1,a.b=2", q),
            "Parameters 'a.*' used inconsistently"
        );
    }

    #[test]
    fn keyval_no_help() {
        let d = Some("driver");
        assert_eq!(
            parse_keyval_no_help("help", d).unwrap_err(),
            HELP_NOT_AVAILABLE
        );
        assert_eq!(
            parse_keyval_no_help("?", d).unwrap_err(),
            "Help is not available for this option"
        );
        assert_eq!(
            parse_keyval_no_help("null-co,help", d).unwrap_err(),
            HELP_NOT_AVAILABLE
        );
        assert_eq!(
            parse_keyval_no_help("help", None).unwrap_err(),
            HELP_NOT_AVAILABLE
        );
        // The help error precedes list errors but not syntax errors.
        assert_eq!(
            parse_keyval_no_help("null-co,help,a.1=x", d).unwrap_err(),
            HELP_NOT_AVAILABLE
        );
        assert_eq!(
            parse_keyval_no_help("null-co,help,x=1,x.y=2", d).unwrap_err(),
            "Parameters 'x.*' used inconsistently"
        );
        assert_eq!(
            Value::Object(parse_keyval_no_help("null-co,size=1", d).unwrap()),
            json!({"driver": "null-co", "size": "1"})
        );
    }

    #[test]
    fn qdict_order_matches_qemu() {
        // tdb_hash(key) % 512, as in QEMU's qdict.c.
        assert_eq!(qdict_bucket("b"), 340);
        assert_eq!(qdict_bucket("c"), 447);
        assert_eq!(qdict_bucket("x"), 134);
        assert_eq!(qdict_bucket("aa"), 110);
        assert_eq!(qdict_bucket("aq"), 110);
        let d = Some("driver");
        // Buckets ascending: x (134) < bar (254) < foo (490).
        assert_eq!(
            kv_err("null-co,m.foo.1=1,m.bar.1=2,m.x.1=3", d),
            "Parameter 'm.x.0' missing"
        );
        // Same bucket: most recently inserted first.
        assert_eq!(
            kv_err("null-co,m.aa.1=1,m.aq.1=2", d),
            "Parameter 'm.aq.0' missing"
        );
        assert_eq!(
            kv_err("null-co,m.aq.1=1,m.aa.1=2", d),
            "Parameter 'm.aa.0' missing"
        );
        // Children are listified before the parent's own check.
        assert_eq!(
            kv_err("null-co,m.zz.1=1,m.z.0=1,m.z.x=2", d),
            "Parameter 'm.zz.0' missing"
        );
        // Output objects keep command-line order.
        let v = kv("z=1,a=2,m=3", None);
        let keys: Vec<&String> = v
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        assert_eq!(keys, ["z", "a", "m"]);
    }

    #[test]
    fn json_detection() {
        assert!(looks_like_json("{\"driver\":\"null-co\"}"));
        assert!(looks_like_json("{"));
        assert!(!looks_like_json(" {\"driver\":\"null-co\"}"));
        // QSD then treats it as an implied value.
        assert_eq!(
            kv(" {\"driver\":\"null-co\"}", Some("driver")),
            json!({"driver": " {\"driver\":\"null-co\"}"})
        );
        assert!(!looks_like_json("driver=file"));
        assert!(!looks_like_json(""));
    }

    #[test]
    fn keyval_never_panics_on_odd_input() {
        for t in [
            ",",
            ",,",
            "=",
            "==",
            ".",
            "..",
            "a.",
            "a..",
            "a.0",
            "a.0=",
            "a.0.=",
            "\u{0}",
            "é",
            "é=é",
            "a.é=1",
            "?",
            "??",
            "help?",
            "a=1,,",
            "a.0=1,a=2",
            "a=1,a.0=2",
            "a.0.0.0=1",
            "a.1.0=1",
        ] {
            let _ = parse_keyval(t, Some("driver"));
            let _ = parse_keyval(t, None);
            let _ = parse_keyval_no_help(t, Some("x.y"));
            let _ = parse_qemu_opts(t, "backend");
            let _ = parse_qemu_opts_full(t, None, Some(CHARDEV_OPTS));
            let _ = parse_size(t);
            let _ = parse_i64(t);
            let _ = parse_u64(t);
        }
    }

    // --- QemuOpts ---------------------------------------------------------

    fn qo(text: &str) -> QemuOptsOutcome {
        parse_qemu_opts_full(text, Some("backend"), Some(CHARDEV_OPTS))
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn qemu_opts_basic() {
        assert_eq!(
            parse_qemu_opts("socket,id=c,path=/tmp/s,server=on,wait=off", "backend").unwrap(),
            pairs(&[
                ("id", "c"),
                ("backend", "socket"),
                ("path", "/tmp/s"),
                ("server", "on"),
                ("wait", "off"),
            ])
        );
        assert_eq!(parse_qemu_opts("", "backend").unwrap(), vec![]);
        // ",," escapes a comma in values, including the implied one.
        assert_eq!(
            parse_qemu_opts("backend=socket,id=c,path=/a,,b", "backend").unwrap(),
            pairs(&[("id", "c"), ("backend", "socket"), ("path", "/a,b")])
        );
        assert_eq!(
            parse_qemu_opts("socket,,x,id=c", "backend").unwrap(),
            pairs(&[("id", "c"), ("backend", "socket,x")])
        );
        assert_eq!(
            parse_qemu_opts(",id=c", "backend").unwrap(),
            pairs(&[("id", "c"), ("backend", "")])
        );
        // Duplicates are kept; the last one is effective.
        let v = parse_qemu_opts("socket,id=c,path=/a,path=/b", "backend").unwrap();
        assert_eq!(qemu_opt_get(&v, "path"), Some("/b"));
        // The first id wins, later ones are ignored.
        assert_eq!(
            parse_qemu_opts("socket,id=c,id=d", "backend").unwrap(),
            pairs(&[("id", "c"), ("backend", "socket")])
        );
        // "id=c,socket": socket is a flag, not the backend.
        assert_eq!(
            parse_qemu_opts("id=c,socket", "backend").unwrap(),
            pairs(&[("id", "c"), ("socket", "on")])
        );
    }

    #[test]
    fn qemu_opts_short_form_booleans() {
        let o = qo("socket,id=c,path");
        assert_eq!(
            o.warnings,
            vec!["short-form boolean option 'path' deprecated\nPlease use path=on instead"]
        );
        assert_eq!(
            o.result.unwrap().opts,
            pairs(&[("backend", "socket"), ("path", "on")])
        );
        let o = qo("socket,id=c,nopath");
        assert_eq!(
            o.warnings,
            vec!["short-form boolean option 'nopath' deprecated\nPlease use path=off instead"]
        );
        assert_eq!(o.result.unwrap().opts[1], ("path".into(), "off".into()));
        let o = qo("socket,id=c,nodelay");
        assert_eq!(
            o.warnings,
            vec!["short-form boolean option 'nodelay' deprecated\nPlease use nodelay=on instead"]
        );
        assert_eq!(o.result.unwrap().opts[1], ("delay".into(), "off".into()));
        let o = qo("socket,id=c,delay");
        assert_eq!(
            o.warnings,
            vec!["short-form boolean option 'delay' deprecated\nPlease use nodelay=off instead"]
        );
        let o = qo("socket,id=c,nowait,noserver");
        assert_eq!(
            o.warnings,
            vec![
                "short-form boolean option 'nowait' deprecated\nPlease use wait=off instead",
                "short-form boolean option 'noserver' deprecated\nPlease use server=off instead",
            ]
        );
        // "noid" sets id=off.
        let o = qo("socket,noid");
        assert_eq!(
            o.warnings,
            vec!["short-form boolean option 'noid' deprecated\nPlease use id=off instead"]
        );
        assert_eq!(o.result.unwrap().id.as_deref(), Some("off"));
        let o = qo("x,id");
        assert_eq!(
            o.warnings,
            vec!["short-form boolean option 'id' deprecated\nPlease use id=on instead"]
        );
        assert_eq!(o.result.unwrap().id.as_deref(), Some("on"));
        // Bare "id" as first word is the backend, but still found as id.
        let o = qo("id");
        assert!(o.warnings.is_empty());
        let r = o.result.unwrap();
        assert_eq!(r.id.as_deref(), Some("on"));
        assert_eq!(r.opts, pairs(&[("backend", "id")]));
    }

    #[test]
    fn qemu_opts_errors() {
        let id_err = "Parameter 'id' expects an identifier\n\
                      Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.";
        assert_eq!(qo("socket,id=1c").result.unwrap_err(), id_err);
        assert_eq!(qo("socket,id=").result.unwrap_err(), id_err);
        assert_eq!(qo("socket,id=c,,").result.unwrap_err(), id_err);
        assert_eq!(qo("socket,id=1,help").result.unwrap_err(), id_err);
        assert_eq!(
            parse_qemu_opts("socket,id=a b", "backend").unwrap_err(),
            id_err
        );
        assert!(parse_qemu_opts("socket,id=a-b.c_d9", "backend").is_ok());

        assert_eq!(
            qo("socket,id=c,bogus=1").result.unwrap_err(),
            "Invalid parameter 'bogus'"
        );
        let o = qo("socket,id=c,bogus,path");
        assert_eq!(
            o.warnings,
            vec!["short-form boolean option 'bogus' deprecated\nPlease use bogus=on instead"]
        );
        assert_eq!(o.result.unwrap_err(), "Invalid parameter 'bogus'");
        assert_eq!(
            qo("socket,id=c,server=maybe").result.unwrap_err(),
            "Parameter 'server' expects 'on' or 'off'"
        );
        assert_eq!(
            qo("stdio,id=c,mux=maybe").result.unwrap_err(),
            "Parameter 'mux' expects 'on' or 'off'"
        );
        assert_eq!(
            qo("socket,id=c,=x").result.unwrap_err(),
            "Invalid parameter ''"
        );
        assert_eq!(
            qo("socket,id=c,x=1=2").result.unwrap_err(),
            "Invalid parameter 'x'"
        );
        let o = qo("socket,id=c,no");
        assert_eq!(
            o.warnings,
            vec!["short-form boolean option 'no' deprecated\nPlease use =off instead"]
        );
        assert_eq!(o.result.unwrap_err(), "Invalid parameter ''");
        let o = qo("socket,id=c,nohelp");
        assert_eq!(
            o.warnings,
            vec!["short-form boolean option 'nohelp' deprecated\nPlease use help=off instead"]
        );
        assert_eq!(o.result.unwrap_err(), "Invalid parameter 'help'");
        assert_eq!(
            qo("socket,id=c,help=1").result.unwrap_err(),
            "Invalid parameter 'help'"
        );
        assert_eq!(
            qo("socket,id=c,reconnect=x").result.unwrap_err(),
            "Parameter 'reconnect' expects a number"
        );
        assert_eq!(
            qo("socket,id=c,reconnect=").result.unwrap_err(),
            "Parameter 'reconnect' expects a number"
        );
        assert_eq!(
            qo("socket,id=c,reconnect=1x").result.unwrap_err(),
            "Parameter 'reconnect' expects a number"
        );
        assert_eq!(
            qo("socket,id=c,reconnect=99999999999999999999")
                .result
                .unwrap_err(),
            "Value '99999999999999999999' is too large for parameter 'reconnect'"
        );
        assert!(qo("socket,id=c,reconnect=-1").result.is_ok());
        let size_hint = "Parameter 'size' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                         and exabytes, respectively.";
        assert_eq!(qo("ringbuf,id=c,size=1.5").result.unwrap_err(), size_hint);
        assert_eq!(qo("ringbuf,id=c,size=-1x").result.unwrap_err(), size_hint);
        assert_eq!(qo("ringbuf,id=c,size=-.5k").result.unwrap_err(), size_hint);
        assert_eq!(qo("ringbuf,id=c,size=-0x5").result.unwrap_err(), size_hint);
        for v in [
            "-1",
            "-.5",
            "16E",
            "99999999999999999999",
            "0x10000000000000000",
        ] {
            assert_eq!(
                qo(&format!("ringbuf,id=c,size={v}")).result.unwrap_err(),
                format!("Value '{v}' is out of range for parameter 'size'")
            );
        }
        assert!(qo("ringbuf,id=c,size=1.5k").result.is_ok());
    }

    #[test]
    fn qemu_opts_help() {
        let r = qo("socket,help").result.unwrap();
        assert!(r.help);
        assert!(qo("socket,?").result.unwrap().help);
        assert!(qo("socket,id=c,help").result.unwrap().help);
        // Parsing stops at help: later errors are not reported.
        assert!(qo("socket,id=c,help,bogus=1").result.unwrap().help);
        // Earlier errors are.
        assert_eq!(
            qo("socket,id=c,bogus=1,help").result.unwrap_err(),
            "Invalid parameter 'bogus'"
        );
        // Warnings before help are kept, help itself has none.
        let o = qo("socket,id=c,path,help");
        assert_eq!(o.warnings.len(), 1);
        assert!(o.result.unwrap().help);
        // First word "help" is the backend value (QSD lists backends, exit 0).
        let r = qo("help").result.unwrap();
        assert!(!r.help);
        assert_eq!(r.opts, pairs(&[("backend", "help")]));
        assert_eq!(
            parse_qemu_opts("socket,id=c,help,x=1", "backend").unwrap(),
            pairs(&[("id", "c"), ("backend", "socket"), ("help", "on")])
        );
    }

    #[test]
    fn qemu_opts_help_text() {
        let h = format_opts_help(Some("chardev"), CHARDEV_OPTS);
        assert!(h.starts_with(
            "chardev options:\n  abstract=<bool (on/off)>\n  append=<bool (on/off)>\n  backend=<str>\n"
        ));
        assert!(h.contains("\n  reconnect-ms=<num>\n  reconnect=<num>\n  rows=<num>\n"));
        assert!(h.contains("\n  size=<size>\n"));
        assert!(h.ends_with("  websocket=<bool (on/off)>\n  width=<num>\n"));
        assert_eq!(h.lines().count(), CHARDEV_OPTS.len() + 1);
        assert_eq!(
            format_opts_help(Some("x"), &[]),
            "There are no options for x.\n"
        );
    }

    // --- scalars ------------------------------------------------------------

    #[test]
    fn bools() {
        for t in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool(t), Some(true), "{t}");
        }
        for f in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool(f), Some(false), "{f}");
        }
        for bad in ["YES", "On", "1", "0", "", " on", "on "] {
            assert_eq!(parse_bool(bad), None, "{bad}");
        }
    }

    #[test]
    fn ints() {
        assert_eq!(parse_i64("010"), Some(8));
        assert_eq!(parse_i64("0x10"), Some(16));
        assert_eq!(parse_i64("0X1f"), Some(31));
        assert_eq!(parse_i64(" 12"), Some(12));
        assert_eq!(parse_i64("+12"), Some(12));
        assert_eq!(parse_i64("-12"), Some(-12));
        assert_eq!(parse_i64("-0x10"), Some(-16));
        assert_eq!(parse_i64("0"), Some(0));
        assert_eq!(parse_i64("9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(qemu_strtoi64("9223372036854775808"), Err(NumError::Range));
        assert_eq!(qemu_strtoi64("-9223372036854775809"), Err(NumError::Range));
        for bad in [
            "", "0x", "08", "1k", "12 ", "1 2", "x", "-", "+", " ", "0b1", "1.0",
        ] {
            assert_eq!(parse_i64(bad), None, "{bad:?}");
        }
        assert_eq!(
            qemu_strtoi64("99999999999999999999x"),
            Err(NumError::Invalid)
        );

        assert_eq!(parse_u64("1"), Some(1));
        assert_eq!(parse_u64("010"), Some(8));
        assert_eq!(parse_u64("0x10"), Some(16));
        assert_eq!(parse_u64(" 7"), Some(7));
        assert_eq!(parse_u64("-1"), Some(u64::MAX));
        assert_eq!(parse_u64("-18446744073709551615"), Some(1));
        assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(qemu_strtou64("18446744073709551616"), Err(NumError::Range));
        assert_eq!(qemu_strtou64("-18446744073709551616"), Err(NumError::Range));
        assert_eq!(qemu_strtou64("1 "), Err(NumError::Invalid));
        assert_eq!(qemu_strtou64(""), Err(NumError::Invalid));
        assert_eq!(qemu_strtou64("0x"), Err(NumError::Invalid));
    }

    #[test]
    fn sizes() {
        let ok = |s: &str, v: u64| assert_eq!(qemu_strtosz(s), Ok(v), "{s:?}");
        ok("0", 0);
        ok("1", 1);
        ok("64k", 65536);
        ok("64K", 65536);
        ok(" 64k", 65536);
        ok("+64k", 65536);
        ok("64b", 64);
        ok("65536B", 65536);
        ok("1M", 1 << 20);
        ok("1g", 1 << 30);
        ok("1T", 1 << 40);
        ok("1P", 1 << 50);
        ok("1E", 1 << 60);
        ok("0.5k", 512);
        ok(".5k", 512);
        ok("+.5k", 512);
        ok("1.k", 1024);
        ok("1.", 1);
        ok("1.0", 1);
        ok("1.5k", 1536);
        ok("1.5M", 1536 * 1024);
        ok("1.5e", 3 << 59);
        ok("0x10000", 65536);
        ok("0X1E", 30);
        ok("0x1b", 27);
        ok("0.00000000000000000000001k", 0);
        ok("0.0000000001E", 115_292_150);
        ok("1.99999999999999999999999k", 2048);
        // Verified against QSD (copy-before-write min-cluster-size error).
        ok("15.9999999E", 18_446_743_958_417_401_216);
        ok("18446744073709551615", u64::MAX);

        let bad = |s: &str, e: NumError| assert_eq!(qemu_strtosz(s), Err(e), "{s:?}");
        bad("", NumError::Invalid);
        bad("1.5", NumError::Invalid);
        bad("1.5b", NumError::Invalid);
        bad("64KiB", NumError::Invalid);
        bad("64kB", NumError::Invalid);
        bad("1e3", NumError::Invalid);
        bad("0x", NumError::Invalid);
        bad("0x10k", NumError::Invalid);
        bad("0x1.5", NumError::Invalid);
        bad("-1x", NumError::Invalid);
        bad("-.5k", NumError::Invalid);
        bad("-0x5", NumError::Invalid);
        bad("1 k", NumError::Invalid);
        bad("k", NumError::Invalid);
        bad(".", NumError::Invalid);
        bad("inf", NumError::Invalid);
        bad(".inf", NumError::Invalid);
        bad("1.5.5k", NumError::Invalid);
        bad("-1", NumError::Range);
        bad("-.5", NumError::Range);
        bad("16E", NumError::Range);
        bad("99999999999999999999", NumError::Range);
        bad("0x10000000000000000", NumError::Range);
        bad("16384P", NumError::Range);
        // The fraction rounds to 1.0 in double precision: 16E overflows.
        bad("15.99999999999999999999E", NumError::Range);
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("x"), None);
    }
}
