//! Loads schema.json (QAPI's schema language, JSON form) into typed
//! definitions. The schema is part of the binary; a malformed schema is a
//! build-time bug caught by the unit tests.
use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// A reference to a type: a named type or an array of one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TypeRef {
    Named(String),
    Array(Box<TypeRef>),
}

#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    pub ty: TypeRef,
    pub optional: bool,
    pub features: Vec<String>,
}

#[derive(Clone, Debug)]
pub enum TypeDef {
    /// A builtin scalar; the string is its JSON type for introspection.
    Builtin(&'static str),
    Enum(Vec<String>),
    /// A struct with its base's members first.
    Struct(Vec<Member>),
    /// A flat union: common members, discriminator, branch struct per tag value.
    Union {
        members: Vec<Member>,
        tag: String,
        variants: BTreeMap<String, String>,
    },
    Alternate(Vec<TypeRef>),
}

#[derive(Clone, Debug)]
pub struct Command {
    pub name: String,
    /// Name of the argument struct (an implicit one for inline data).
    pub args: String,
    pub returns: Option<TypeRef>,
    /// QAPI features ("deprecated", "unstable").
    pub features: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Event {
    pub name: String,
    pub args: String,
}

#[derive(Clone, Debug, Default)]
pub struct Schema {
    pub types: BTreeMap<String, TypeDef>,
    pub commands: Vec<Command>,
    pub events: Vec<Event>,
}

pub const EMPTY: &str = "q_empty";

/// The schema's files, in order (a file may use types of earlier ones).
const SCHEMA_FILES: &[&str] = &[
    include_str!("schema.json"),
    include_str!("block.json"),
    include_str!("jobs.json"),
    // rsd's own commands, named by QAPI's rule for downstream
    // extensions (`__org.rsd_`).
    include_str!("metrics.json"),
    include_str!("iothreads.json"),
];
const BUILTINS: &[(&str, &str)] = &[
    ("str", "string"),
    ("int", "int"),
    ("int8", "int"),
    ("int16", "int"),
    ("int32", "int"),
    ("int64", "int"),
    ("uint8", "int"),
    ("uint16", "int"),
    ("uint32", "int"),
    ("uint64", "int"),
    ("size", "int"),
    ("number", "number"),
    ("bool", "boolean"),
    ("null", "null"),
    ("any", "value"),
];

impl Schema {
    /// rsd's schema; entries marked `"if": "test-hooks"` only when asked.
    pub fn rsd(test_hooks: bool) -> Schema {
        let conds: &[&str] = if test_hooks { &["test-hooks"] } else { &[] };
        let mut all = Vec::new();
        for text in SCHEMA_FILES {
            if let Ok(Value::Array(entries)) = serde_json::from_str::<Value>(text) {
                all.extend(entries);
            }
        }
        Schema::from_value(&Value::Array(all), conds).unwrap_or_default()
    }

    pub fn from_value(v: &Value, conds: &[&str]) -> Result<Schema, String> {
        let mut s = Schema::default();
        for (name, json) in BUILTINS {
            s.types.insert(name.to_string(), TypeDef::Builtin(json));
        }
        s.types.insert(EMPTY.into(), TypeDef::Struct(vec![]));
        let entries = v.as_array().ok_or("schema is not an array")?;
        for e in entries {
            let e = e.as_object().ok_or("entry is not an object")?;
            if let Some(c) = e.get("if").and_then(Value::as_str) {
                if !conds.contains(&c) {
                    continue;
                }
            }
            let name = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
            if let Some(n) = name("enum") {
                let vals = e
                    .get("data")
                    .and_then(Value::as_array)
                    .ok_or("enum data")?
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect();
                s.types.insert(n, TypeDef::Enum(vals));
            } else if let Some(n) = name("struct") {
                let mut members = match e.get("base").and_then(Value::as_str) {
                    Some(b) => s.struct_members(b)?,
                    None => vec![],
                };
                members.extend(parse_members(e.get("data"))?);
                s.types.insert(n, TypeDef::Struct(members));
            } else if let Some(n) = name("union") {
                let members = parse_members(e.get("base"))?;
                let tag = name("discriminator").ok_or("union discriminator")?;
                let variants = e
                    .get("data")
                    .and_then(Value::as_object)
                    .ok_or("union data")?
                    .iter()
                    .filter_map(|(k, v)| v.as_str().map(|t| (k.clone(), t.to_string())))
                    .collect();
                s.types.insert(
                    n,
                    TypeDef::Union {
                        members,
                        tag,
                        variants,
                    },
                );
            } else if let Some(n) = name("alternate") {
                let alts = e
                    .get("data")
                    .and_then(Value::as_object)
                    .ok_or("alternate data")?
                    .values()
                    .map(parse_typeref)
                    .collect::<Result<_, _>>()?;
                s.types.insert(n, TypeDef::Alternate(alts));
            } else if let Some(n) = name("command") {
                let args = s.implicit_args(&n, e.get("data"), "arg")?;
                let returns = e.get("returns").map(parse_typeref).transpose()?;
                let features = e
                    .get("features")
                    .and_then(Value::as_array)
                    .map(|f| {
                        f.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                s.commands.push(Command {
                    name: n,
                    args,
                    returns,
                    features,
                });
            } else if let Some(n) = name("event") {
                let args = s.implicit_args(&n, e.get("data"), "arg")?;
                s.events.push(Event { name: n, args });
            }
        }
        Ok(s)
    }

    fn implicit_args(
        &mut self,
        owner: &str,
        data: Option<&Value>,
        what: &str,
    ) -> Result<String, String> {
        match data {
            None => Ok(EMPTY.into()),
            Some(Value::String(t)) => Ok(t.clone()),
            Some(d) => {
                let n = format!("q_obj_{owner}-{what}");
                let members = parse_members(Some(d))?;
                self.types.insert(n.clone(), TypeDef::Struct(members));
                Ok(n)
            }
        }
    }

    fn struct_members(&self, name: &str) -> Result<Vec<Member>, String> {
        match self.types.get(name) {
            Some(TypeDef::Struct(m)) => Ok(m.clone()),
            _ => Err(format!("base {name} is not a known struct")),
        }
    }

    pub fn command(&self, name: &str) -> Option<&Command> {
        self.commands.iter().find(|c| c.name == name)
    }

    pub fn event(&self, name: &str) -> Option<&Event> {
        self.events.iter().find(|c| c.name == name)
    }

    /// Every type reference resolves (checked by a unit test).
    pub fn check(&self) -> Result<(), String> {
        let known = |t: &TypeRef| -> Result<(), String> {
            let mut t = t;
            while let TypeRef::Array(e) = t {
                t = e;
            }
            match t {
                TypeRef::Named(n) if self.types.contains_key(n) => Ok(()),
                other => Err(format!("unknown type {other:?}")),
            }
        };
        for def in self.types.values() {
            match def {
                TypeDef::Struct(m) => m.iter().try_for_each(|m| known(&m.ty))?,
                TypeDef::Union {
                    members, variants, ..
                } => {
                    members.iter().try_for_each(|m| known(&m.ty))?;
                    variants
                        .values()
                        .try_for_each(|v| known(&TypeRef::Named(v.clone())))?;
                }
                TypeDef::Alternate(a) => a.iter().try_for_each(known)?,
                _ => {}
            }
        }
        for c in &self.commands {
            known(&TypeRef::Named(c.args.clone()))?;
            if let Some(r) = &c.returns {
                known(r)?;
            }
        }
        for e in &self.events {
            known(&TypeRef::Named(e.args.clone()))?;
        }
        Ok(())
    }
}

fn parse_typeref(v: &Value) -> Result<TypeRef, String> {
    match v {
        Value::String(s) => Ok(TypeRef::Named(s.clone())),
        Value::Array(a) if a.len() == 1 => Ok(TypeRef::Array(Box::new(parse_typeref(&a[0])?))),
        Value::Object(o) => o
            .get("type")
            .map(parse_typeref)
            .unwrap_or_else(|| Err("member without type".into())),
        other => Err(format!("bad type reference {other}")),
    }
}

fn parse_members(v: Option<&Value>) -> Result<Vec<Member>, String> {
    let Some(v) = v else { return Ok(vec![]) };
    let obj: &Map<String, Value> = v.as_object().ok_or("members must be an object")?;
    obj.iter()
        .map(|(k, t)| {
            let (name, optional) = match k.strip_prefix('*') {
                Some(n) => (n.to_string(), true),
                None => (k.clone(), false),
            };
            let features = t
                .get("features")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            Ok(Member {
                name,
                ty: parse_typeref(t)?,
                optional,
                features,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_loads_and_is_closed() {
        for hooks in [false, true] {
            let s = Schema::rsd(hooks);
            assert!(s.command("query-version").is_some());
            assert_eq!(s.command("x-rsd-test-crash").is_some(), hooks);
            s.check().expect("every type reference resolves");
        }
        // Every file must parse: a broken one would silently vanish.
        let mut all = Vec::new();
        for text in SCHEMA_FILES {
            let v: Value = serde_json::from_str(text).expect("valid JSON");
            all.extend(v.as_array().expect("a list").clone());
        }
        Schema::from_value(&Value::Array(all), &[]).expect("valid schema");
    }

    #[test]
    fn bases_flatten_in_order() {
        let s = Schema::rsd(false);
        let Some(TypeDef::Struct(m)) = s.types.get("SecretProperties") else {
            panic!("SecretProperties missing")
        };
        let names: Vec<_> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["format", "keyid", "iv", "data", "file"]);
    }
}
