//! Strict argument validation with QEMU's input-visitor messages.
//!
//! Input is either JSON (QMP, JSON command-line options) or keyval (all
//! scalars are strings, converted here). The result is the normalized value
//! (typed scalars, members in schema order) that handlers deserialize.
use serde_json::{Map, Number, Value};

use super::error::QmpError;
use super::schema::{Member, Schema, TypeDef, TypeRef};
use crate::qmp::json::qdict_order;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Json,
    Keyval,
}

#[derive(Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

/// The path from the top-level arguments to the value being visited.
#[derive(Clone, Default)]
struct Path {
    segs: Vec<Seg>,
    /// Keyval input names list elements `a.0`; JSON input `a[0]`.
    keyval: bool,
}

impl Path {
    fn key(&self, k: &str) -> Path {
        let mut p = self.clone();
        p.segs.push(Seg::Key(k.to_string()));
        p
    }
    fn index(&self, i: usize) -> Path {
        let mut p = self.clone();
        p.segs.push(Seg::Index(i));
        p
    }
    /// QEMU's full_name(): `a.b[0].c`.
    fn full(&self) -> String {
        let mut s = String::new();
        for seg in &self.segs {
            match seg {
                Seg::Key(k) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Seg::Index(i) if self.keyval => s.push_str(&format!(".{i}")),
                Seg::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        s
    }
    /// The visitor's own `name` argument: the member name, or "null" for
    /// list elements (QEMU prints a NULL name that way).
    fn bare(&self) -> String {
        match self.segs.last() {
            Some(Seg::Key(k)) => k.clone(),
            _ => "null".into(),
        }
    }
}

fn type_err(path: &Path, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{}', expected: {expected}",
        path.full()
    ))
}

fn value_err(name: String, expected: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' expects {expected}"))
}

impl Schema {
    /// Validates the arguments object of a command or any struct type.
    pub fn validate_args(
        &self,
        type_name: &str,
        args: &Map<String, Value>,
        input: Input,
    ) -> Result<Map<String, Value>, QmpError> {
        let v = Validator {
            schema: self,
            input,
        };
        let path = Path {
            segs: Vec::new(),
            keyval: input == Input::Keyval,
        };
        v.visit_object_type(type_name, args, &path)
    }
}

struct Validator<'a> {
    schema: &'a Schema,
    input: Input,
}

impl Validator<'_> {
    fn visit(&self, ty: &TypeRef, v: &Value, path: &Path) -> Result<Value, QmpError> {
        match ty {
            TypeRef::Array(elem) => {
                let Value::Array(items) = v else {
                    return Err(type_err(path, "array"));
                };
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.visit(elem, item, &path.index(i)))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Value::Array)
            }
            TypeRef::Named(name) => self.visit_named(name, v, path),
        }
    }

    fn visit_named(&self, name: &str, v: &Value, path: &Path) -> Result<Value, QmpError> {
        let Some(def) = self.schema.types.get(name) else {
            return Err(QmpError::generic(format!(
                "internal error: unknown type {name}"
            )));
        };
        match def {
            TypeDef::Builtin(_) => self.visit_builtin(name, v, path),
            TypeDef::Enum(values) => {
                let s = self.scalar_str(v, path)?;
                if values.iter().any(|x| x == s) {
                    Ok(Value::String(s.to_string()))
                } else {
                    Err(QmpError::generic(format!(
                        "Parameter '{}' does not accept value '{s}'",
                        path.bare()
                    )))
                }
            }
            TypeDef::Struct(_) | TypeDef::Union { .. } => {
                let Value::Object(obj) = v else {
                    return Err(type_err(path, "object"));
                };
                self.visit_object_type(name, obj, path).map(Value::Object)
            }
            TypeDef::Alternate(alts) => self.visit_alternate(name, alts, v, path),
        }
    }

    fn scalar_str<'v>(&self, v: &'v Value, path: &Path) -> Result<&'v str, QmpError> {
        if self.input == Input::Keyval && (v.is_object() || v.is_array()) {
            // `a.b=1` where `a` is a scalar.
            return Err(QmpError::generic(format!(
                "Parameters '{}.*' are unexpected",
                path.full()
            )));
        }
        v.as_str().ok_or_else(|| type_err(path, "string"))
    }

    fn visit_builtin(&self, name: &str, v: &Value, path: &Path) -> Result<Value, QmpError> {
        if name == "any" {
            return Ok(v.clone());
        }
        if self.input == Input::Keyval {
            return self.visit_keyval_scalar(name, v, path);
        }
        match name {
            "str" => Ok(Value::String(self.scalar_str(v, path)?.to_string())),
            "bool" => v
                .as_bool()
                .map(Value::Bool)
                .ok_or_else(|| type_err(path, "boolean")),
            "number" => match v {
                Value::Number(n) => Ok(Value::Number(n.clone())),
                _ => Err(type_err(path, "number")),
            },
            "null" => match v {
                Value::Null => Ok(Value::Null),
                _ => Err(type_err(path, "null")),
            },
            "uint64" | "size" | "uint8" | "uint16" | "uint32" => {
                let n = match v {
                    Value::Number(n) => n.as_u64().or_else(|| n.as_i64().map(|i| i as u64)),
                    _ => None,
                };
                let n = n.ok_or_else(|| value_err(path.full(), "uint64"))?;
                self.check_unsigned(name, n, path)
            }
            _ => {
                let n = match v {
                    Value::Number(n) => n.as_i64(),
                    _ => None,
                };
                let n = n.ok_or_else(|| type_err(path, "integer"))?;
                self.check_signed(name, n, path)
            }
        }
    }

    fn check_signed(&self, name: &str, n: i64, path: &Path) -> Result<Value, QmpError> {
        let (lo, hi, c) = match name {
            "int8" => (i8::MIN as i64, i8::MAX as i64, "int8_t"),
            "int16" => (i16::MIN as i64, i16::MAX as i64, "int16_t"),
            "int32" => (i32::MIN as i64, i32::MAX as i64, "int32_t"),
            _ => (i64::MIN, i64::MAX, ""),
        };
        if n < lo || n > hi {
            return Err(value_err(path.bare(), c));
        }
        Ok(Value::Number(n.into()))
    }

    fn check_unsigned(&self, name: &str, n: u64, path: &Path) -> Result<Value, QmpError> {
        let (hi, c) = match name {
            "uint8" => (u8::MAX as u64, "uint8_t"),
            "uint16" => (u16::MAX as u64, "uint16_t"),
            "uint32" => (u32::MAX as u64, "uint32_t"),
            _ => (u64::MAX, ""),
        };
        if n > hi {
            return Err(value_err(path.bare(), c));
        }
        Ok(Value::Number(n.into()))
    }

    /// Keyval input: every scalar arrives as a string.
    fn visit_keyval_scalar(&self, name: &str, v: &Value, path: &Path) -> Result<Value, QmpError> {
        use crate::numbers::{parse_bool, parse_i64, parse_size, parse_u64};
        let s = self.scalar_str(v, path)?;
        match name {
            "str" => Ok(Value::String(s.to_string())),
            "bool" => parse_bool(s)
                .map(Value::Bool)
                .ok_or_else(|| value_err(path.full(), "'on' or 'off'")),
            "number" => s
                .parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| value_err(path.full(), "number")),
            "null" if s.is_empty() => Ok(Value::Null),
            "null" => Err(value_err(path.full(), "null")),
            "size" => parse_size(s)
                .map(|n| Value::Number(n.into()))
                .ok_or_else(|| value_err(path.full(), "size")),
            "uint64" | "uint8" | "uint16" | "uint32" => {
                let n = parse_u64(s).ok_or_else(|| value_err(path.full(), "integer"))?;
                self.check_unsigned(name, n, path)
            }
            _ => {
                let n = parse_i64(s).ok_or_else(|| value_err(path.full(), "integer"))?;
                self.check_signed(name, n, path)
            }
        }
    }

    fn visit_alternate(
        &self,
        name: &str,
        alts: &[TypeRef],
        v: &Value,
        path: &Path,
    ) -> Result<Value, QmpError> {
        let is_object_type = |t: &TypeRef| {
            matches!(t, TypeRef::Named(n) if matches!(self.schema.types.get(n),
                Some(TypeDef::Struct(_)) | Some(TypeDef::Union { .. })))
        };
        // Keyval: an empty value means null where null is an option
        // (`backing=`), as in QEMU.
        let keyval_null = self.input == Input::Keyval
            && v.as_str() == Some("")
            && alts
                .iter()
                .any(|t| matches!(t, TypeRef::Named(n) if n == "null"));
        let pick = alts.iter().find(|t| match v {
            _ if keyval_null => matches!(t, TypeRef::Named(n) if n == "null"),
            Value::Object(_) => is_object_type(t),
            Value::Array(_) => matches!(t, TypeRef::Array(_)),
            _ if self.input == Input::Keyval => !is_object_type(t),
            Value::String(_) => matches!(t, TypeRef::Named(n)
                if n == "str" || matches!(self.schema.types.get(n), Some(TypeDef::Enum(_)))),
            Value::Bool(_) => matches!(t, TypeRef::Named(n) if n == "bool"),
            Value::Null => matches!(t, TypeRef::Named(n) if n == "null"),
            Value::Number(_) => {
                matches!(t, TypeRef::Named(n) if n != "str" && n != "bool" && n != "null"
                    && matches!(self.schema.types.get(n), Some(TypeDef::Builtin(_))))
            }
        });
        match pick {
            Some(t) => self.visit(t, v, path),
            // QEMU names only the member here ('null' in a list).
            None => Err(QmpError::generic(format!(
                "Invalid parameter type for '{}', expected: {name}",
                path.bare()
            ))),
        }
    }

    /// A struct or flat union given as an object: members in schema order,
    /// then variant members, then the check for unexpected keys.
    fn visit_object_type(
        &self,
        name: &str,
        obj: &Map<String, Value>,
        path: &Path,
    ) -> Result<Map<String, Value>, QmpError> {
        let mut out = Map::new();
        match self.schema.types.get(name) {
            Some(TypeDef::Struct(members)) => self.visit_members(members, obj, path, &mut out)?,
            Some(TypeDef::Union {
                members,
                tag,
                variants,
            }) => {
                self.visit_members(members, obj, path, &mut out)?;
                let tag_value = out.get(tag).and_then(Value::as_str).unwrap_or_default();
                if let Some(branch) = variants.get(tag_value) {
                    match self.schema.types.get(branch) {
                        Some(TypeDef::Struct(m)) => self.visit_members(m, obj, path, &mut out)?,
                        _ => {
                            return Err(QmpError::generic(format!(
                                "internal error: bad union branch {branch}"
                            )))
                        }
                    }
                } else {
                    // A variant rsd does not implement (an object type or
                    // driver it lacks): its members are not checked, so
                    // the command says what is missing rather than
                    // calling the user's properties unexpected.
                    for (k, v) in obj {
                        out.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
            }
            _ => {
                return Err(QmpError::generic(format!(
                    "internal error: {name} is not an object type"
                )))
            }
        }
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        let keys = ghash_order(&qdict_order(keys));
        if let Some(extra) = keys.into_iter().find(|k| !out.contains_key(*k)) {
            return Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                path.key(extra).full()
            )));
        }
        Ok(out)
    }

    fn visit_members(
        &self,
        members: &[Member],
        obj: &Map<String, Value>,
        path: &Path,
        out: &mut Map<String, Value>,
    ) -> Result<(), QmpError> {
        for m in members {
            let p = path.key(&m.name);
            match obj.get(&m.name) {
                Some(v) => {
                    let nv = self.visit(&m.ty, v, &p)?;
                    out.insert(m.name.clone(), nv);
                }
                None if m.optional => {}
                None => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{}' is missing",
                        p.full()
                    )))
                }
            }
        }
        Ok(())
    }
}

/// GLib's g_str_hash (djb2 over signed chars).
fn g_str_hash(s: &str) -> u32 {
    s.bytes().fold(5381u32, |h, c| {
        h.wrapping_mul(33).wrapping_add(c as i8 as i32 as u32)
    })
}

/// The iteration order of a GLib string hash table filled with `keys` in
/// order. QEMU reports the first unvisited key of such a table as
/// "unexpected", so this decides which of several is named.
fn ghash_order<'a>(keys: &[&'a str]) -> Vec<&'a str> {
    const PRIMES: [u32; 12] = [7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381];
    let mut shift = 3usize;
    let mut table: Vec<Option<&str>> = vec![None; 8];
    let place = |table: &mut Vec<Option<&'a str>>, shift: usize, k: &'a str| {
        let mask = table.len() - 1;
        let hash = g_str_hash(k).max(2);
        let mut i = (hash.wrapping_mul(11) % PRIMES[(shift - 3).min(PRIMES.len() - 1)]) as usize;
        let mut step = 0;
        while table[i].is_some() {
            step += 1;
            i = (i + step) & mask;
        }
        table[i] = Some(k);
    };
    for (n, k) in keys.iter().enumerate() {
        place(&mut table, shift, k);
        let occupied = n + 1;
        if table.len() <= occupied + occupied / 16 {
            // Grow: rebuild from the old table's order, as GLib rehashes.
            let old: Vec<&str> = table.iter().flatten().copied().collect();
            let want = (occupied as f64 * 1.333) as usize;
            shift = (usize::BITS - want.leading_zeros()).max(3) as usize;
            table = vec![None; 1 << shift];
            for k in old {
                place(&mut table, shift, k);
            }
        }
    }
    table.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(cmd: &str, args: Value) -> Result<Value, String> {
        let s = Schema::rsd(false);
        let c = s.command(cmd).expect("command");
        let Value::Object(m) = args else { panic!() };
        s.validate_args(&c.args, &m, Input::Json)
            .map(Value::Object)
            .map_err(|e| e.desc)
    }

    fn sock(inner: Value) -> Value {
        json!({"id": "x", "backend": {"type": "socket", "data": {"addr": {"type": "inet", "data": inner}}}})
    }

    #[test]
    fn messages_match_qsd() {
        // Each expectation was observed on qemu-storage-daemon 10.0.2.
        let cases = [
            (
                sock(json!({"host": "h", "port": "1", "to": "abc"})),
                "Parameter 'backend.data.addr.data.to' expects uint64",
            ),
            (
                sock(json!({"host": "h", "port": "1", "to": 70000})),
                "Parameter 'to' expects uint16_t",
            ),
            (
                sock(json!({"host": "h", "port": "1", "to": -1})),
                "Parameter 'to' expects uint16_t",
            ),
            (
                sock(json!({"host": "h", "port": 1})),
                "Invalid parameter type for 'backend.data.addr.data.port', expected: string",
            ),
            (
                sock(json!({"host": "h"})),
                "Parameter 'backend.data.addr.data.port' is missing",
            ),
            (
                json!({"id": "x", "backend": {"type": "socket"}}),
                "Parameter 'backend.data' is missing",
            ),
            (
                json!({"id": "x", "backend": []}),
                "Invalid parameter type for 'backend', expected: object",
            ),
            (
                json!({"id": "x", "backend": {"type": "null", "data": {}}, "a": 1, "b": 2, "zz": 3}),
                "Parameter 'b' is unexpected",
            ),
            (
                json!({"id": "x", "backend": {"type": "socket", "data": {"addr": {"type": "bogus", "data": {}}}}}),
                "Parameter 'type' does not accept value 'bogus'",
            ),
        ];
        for (args, want) in cases {
            assert_eq!(
                check("chardev-add", args.clone()),
                Err(want.to_string()),
                "{args}"
            );
        }
        assert_eq!(
            check("qmp_capabilities", json!({"enable": [1]})),
            Err("Invalid parameter type for 'enable[0]', expected: string".into())
        );
        assert_eq!(
            check("qmp_capabilities", json!({"enable": ["bogus"]})),
            Err("Parameter 'null' does not accept value 'bogus'".into())
        );
        assert_eq!(
            check(
                "object-add",
                json!({"qom-type": "iothread", "id": "i", "poll-max-ns": 1.5})
            ),
            Err("Invalid parameter type for 'poll-max-ns', expected: integer".into())
        );
        assert_eq!(
            check(
                "object-add",
                json!({"qom-type": "iothread", "id": "i", "poll-max-ns": 18446744073709551615u64})
            ),
            Err("Invalid parameter type for 'poll-max-ns', expected: integer".into())
        );
    }

    #[test]
    fn normalizes_keyval_strings() {
        let s = Schema::rsd(false);
        let c = s.command("object-add").expect("object-add");
        let args = json!({"qom-type": "iothread", "id": "i", "poll-max-ns": "100"});
        let Value::Object(m) = args else { panic!() };
        let out = s.validate_args(&c.args, &m, Input::Keyval).expect("valid");
        assert_eq!(out.get("poll-max-ns"), Some(&json!(100)));
        let bad = json!({"qom-type": "iothread", "id": "i", "poll-max-ns": "x"});
        let Value::Object(m) = bad else { panic!() };
        assert_eq!(
            s.validate_args(&c.args, &m, Input::Keyval)
                .map_err(|e| e.desc),
            Err("Parameter 'poll-max-ns' expects integer".into())
        );
    }
}
