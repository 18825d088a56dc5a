//! query-qmp-schema: rsd's schema in QEMU's introspection format, with
//! non-builtin type names masked as numbers the way QEMU does it.
use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Map, Value};

use super::schema::{Member, Schema, TypeDef, TypeRef, EMPTY};

struct Masker<'a> {
    schema: &'a Schema,
    names: BTreeMap<String, String>,
    queue: VecDeque<TypeRef>,
    next: usize,
}

impl Masker<'_> {
    fn mask(&mut self, t: &TypeRef) -> String {
        match t {
            TypeRef::Array(e) => {
                let inner = self.mask(e);
                let n = format!("[{inner}]");
                if !self.names.contains_key(&n) {
                    self.names.insert(n.clone(), n.clone());
                    self.queue.push_back(t.clone());
                }
                n
            }
            TypeRef::Named(n) => {
                if let Some(m) = self.names.get(n) {
                    return m.clone();
                }
                let m = match self.schema.types.get(n) {
                    Some(TypeDef::Builtin(_)) => n.clone(),
                    _ => {
                        self.next += 1;
                        (self.next - 1).to_string()
                    }
                };
                self.names.insert(n.clone(), m.clone());
                self.queue.push_back(t.clone());
                m
            }
        }
    }

    fn members(&mut self, members: &[Member]) -> Value {
        Value::Array(
            members
                .iter()
                .map(|m| {
                    let mut o = Map::new();
                    o.insert("name".into(), json!(m.name));
                    o.insert("type".into(), json!(self.mask(&m.ty)));
                    if m.optional {
                        o.insert("default".into(), Value::Null);
                    }
                    if !m.features.is_empty() {
                        o.insert("features".into(), json!(m.features));
                    }
                    Value::Object(o)
                })
                .collect(),
        )
    }

    fn entry(&mut self, t: &TypeRef) -> Value {
        let name = self.mask(t);
        match t {
            TypeRef::Array(e) => {
                let elem = self.mask(e);
                json!({"name": name, "element-type": elem, "meta-type": "array"})
            }
            TypeRef::Named(n) => match self.schema.types.get(n) {
                Some(TypeDef::Builtin(j)) => {
                    json!({"name": name, "json-type": j, "meta-type": "builtin"})
                }
                Some(TypeDef::Enum(values)) => {
                    let members: Vec<Value> = values.iter().map(|v| json!({"name": v})).collect();
                    json!({"name": name, "members": members, "meta-type": "enum", "values": values})
                }
                Some(TypeDef::Struct(m)) => {
                    let members = self.members(m);
                    json!({"name": name, "members": members, "meta-type": "object"})
                }
                Some(TypeDef::Union {
                    members,
                    tag,
                    variants,
                }) => {
                    let members = self.members(members);
                    let variants: Vec<Value> = variants
                        .iter()
                        .map(|(case, ty)| {
                            json!({"case": case, "type": self.mask(&TypeRef::Named(ty.clone()))})
                        })
                        .collect();
                    json!({"name": name, "members": members, "meta-type": "object",
                           "tag": tag, "variants": variants})
                }
                Some(TypeDef::Alternate(alts)) => {
                    let members: Vec<Value> =
                        alts.iter().map(|a| json!({"type": self.mask(a)})).collect();
                    json!({"name": name, "members": members, "meta-type": "alternate"})
                }
                None => json!({"name": name, "meta-type": "builtin", "json-type": "value"}),
            },
        }
    }
}

/// The full answer of query-qmp-schema.
pub fn schema_info(schema: &Schema) -> Value {
    let mut m = Masker {
        schema,
        names: BTreeMap::new(),
        queue: VecDeque::new(),
        next: 0,
    };
    let mut out = Vec::new();
    for c in &schema.commands {
        let arg = m.mask(&TypeRef::Named(c.args.clone()));
        let ret = m.mask(
            c.returns
                .as_ref()
                .unwrap_or(&TypeRef::Named(EMPTY.to_string())),
        );
        let mut cmd =
            json!({"name": c.name, "ret-type": ret, "meta-type": "command", "arg-type": arg});
        if !c.features.is_empty() {
            cmd["features"] = json!(c.features);
        }
        out.push(cmd);
    }
    for e in &schema.events {
        let arg = m.mask(&TypeRef::Named(e.args.clone()));
        out.push(json!({"name": e.name, "meta-type": "event", "arg-type": arg}));
    }
    while let Some(t) = m.queue.pop_front() {
        out.push(m.entry(&t));
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_referenced_name_is_defined_once() {
        let s = Schema::rsd(true);
        let Value::Array(list) = schema_info(&s) else {
            panic!("not a list")
        };
        let mut defined = std::collections::BTreeSet::new();
        for e in &list {
            let n = e["name"].as_str().expect("name").to_string();
            assert!(defined.insert(n.clone()), "{n} defined twice");
        }
        let refs = |v: &Value| -> Vec<String> {
            let mut r = vec![];
            for k in ["arg-type", "ret-type", "element-type"] {
                if let Some(s) = v.get(k).and_then(Value::as_str) {
                    r.push(s.to_string());
                }
            }
            for k in ["members", "variants"] {
                if let Some(a) = v.get(k).and_then(Value::as_array) {
                    for m in a {
                        if let Some(t) = m.get("type").and_then(Value::as_str) {
                            r.push(t.to_string());
                        }
                    }
                }
            }
            r
        };
        for e in &list {
            for r in refs(e) {
                assert!(defined.contains(&r), "{r} referenced but not defined");
            }
        }
        let cmds = list.iter().filter(|e| e["meta-type"] == "command").count();
        assert_eq!(cmds, s.commands.len());
    }
}
