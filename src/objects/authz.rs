//! Authorization objects: `authz-simple` (one identity), `authz-list`
//! (rules matched in order, exact or glob, then a default policy) and
//! `authz-list-file` (an authz-list read from a JSON file, read again
//! when the file changes). The NBD server asks them about a TLS client's
//! distinguished name.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use serde_json::{json, Map, Value};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    Deny,
    Allow,
}

impl Policy {
    fn parse(s: &str) -> Policy {
        if s == "allow" {
            Policy::Allow
        } else {
            Policy::Deny
        }
    }
    fn name(self) -> &'static str {
        match self {
            Policy::Deny => "deny",
            Policy::Allow => "allow",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Rule {
    pattern: String,
    policy: Policy,
    /// None: not given (exact); Some(true): glob.
    glob: Option<bool>,
}

/// An authz-list's rules and default policy.
#[derive(Clone, Debug)]
pub struct List {
    policy: Policy,
    rules: Vec<Rule>,
}

impl List {
    /// From validated AuthZListProperties.
    fn from_props(props: &Map<String, Value>) -> List {
        let policy = Policy::parse(
            props
                .get("policy")
                .and_then(Value::as_str)
                .unwrap_or("deny"),
        );
        List {
            policy,
            rules: props
                .get("rules")
                .and_then(Value::as_array)
                .map(|r| r.iter().map(rule_from).collect())
                .unwrap_or_default(),
        }
    }

    /// The first rule that matches decides; else the default policy.
    fn allows(&self, identity: &str) -> bool {
        let hit = self.rules.iter().find(|r| match r.glob {
            Some(true) => glob_match(&r.pattern, identity),
            _ => r.pattern == identity,
        });
        hit.map_or(self.policy, |r| r.policy) == Policy::Allow
    }

    fn rules_json(&self) -> Value {
        Value::Array(
            self.rules
                .iter()
                .map(|r| {
                    let mut m = Map::new();
                    m.insert("match".into(), json!(r.pattern));
                    m.insert("policy".into(), json!(r.policy.name()));
                    if let Some(g) = r.glob {
                        m.insert("format".into(), json!(if g { "glob" } else { "exact" }));
                    }
                    Value::Object(m)
                })
                .collect(),
        )
    }
}

fn rule_from(v: &Value) -> Rule {
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    Rule {
        pattern: s("match").unwrap_or_default().to_string(),
        policy: Policy::parse(s("policy").unwrap_or("deny")),
        glob: s("format").map(|f| f == "glob"),
    }
}

/// GLib's g_pattern_match_simple: `*` matches any run, `?` any one
/// character, nothing is escaped.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// An authz-list-file's file and what was last read from it.
pub struct ListFile {
    filename: String,
    refresh: bool,
    /// The list, None after a failed reload (everyone is denied, as in
    /// QEMU), and the file's identity when it was read.
    state: Mutex<(Option<List>, Option<FileStamp>)>,
}

/// What tells that a file changed: inode, size and modification time.
#[derive(Clone, Copy, PartialEq, Debug)]
struct FileStamp(u64, u64, i64, i64);

fn stamp(path: &str) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp(m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

impl ListFile {
    fn load(path: &str) -> Result<List, String> {
        let text = std::fs::read(path).map_err(|e| {
            let why = crate::util::os_msg(&e);
            let what = match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    "Failed to open file"
                }
                _ => "Error reading file",
            };
            format!("Unable to read '{path}': {what} \u{201C}{path}\u{201D}: {why}")
        })?;
        let v: Value =
            serde_json::from_slice(&text).map_err(|e| format!("JSON parse error, {e}"))?;
        let Value::Object(m) = v else {
            return Err(format!("File '{path}' must contain a JSON object"));
        };
        let schema = crate::qapi::Schema::rsd(false);
        let m = schema
            .validate_args(
                "AuthZListProperties",
                &m,
                crate::qapi::validate::Input::Json,
            )
            .map_err(|e| e.desc)?;
        Ok(List::from_props(&m))
    }

    /// The list as the file says now: with `refresh`, a changed file is
    /// read again at this check (rsd looks at the file when it is asked,
    /// where QEMU watches it with inotify).
    fn allows(&self, identity: &str) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        if self.refresh {
            let now = stamp(&self.filename);
            if now != st.1 {
                st.1 = now;
                st.0 = match Self::load(&self.filename) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        eprintln!("rsd: {e}");
                        None
                    }
                };
            }
        }
        st.0.as_ref().is_some_and(|l| l.allows(identity))
    }
}

pub enum Kind {
    Simple(Mutex<String>),
    List(Mutex<List>),
    ListFile(ListFile),
}

/// An authorization object, shared with the servers that ask it.
pub struct Authz {
    pub kind: Kind,
}

impl Authz {
    pub fn qom_type(&self) -> &'static str {
        match self.kind {
            Kind::Simple(_) => "authz-simple",
            Kind::List(_) => "authz-list",
            Kind::ListFile(_) => "authz-list-file",
        }
    }

    /// Creates one from validated object-add properties.
    pub fn create(qom_type: &str, props: &Map<String, Value>) -> Result<Authz, String> {
        let s = |k: &str| props.get(k).and_then(Value::as_str);
        let kind = match qom_type {
            "authz-simple" => Kind::Simple(Mutex::new(s("identity").unwrap_or_default().into())),
            "authz-list" => Kind::List(Mutex::new(List::from_props(props))),
            _ => {
                let Some(filename) = s("filename") else {
                    return Err("filename not provided".into());
                };
                let list = ListFile::load(filename)?;
                let refresh = props
                    .get("refresh")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                if refresh && !filename.contains('/') {
                    return Err("Filename must be an absolute path".into());
                }
                Kind::ListFile(ListFile {
                    filename: filename.to_string(),
                    refresh,
                    state: Mutex::new((Some(list), stamp(filename))),
                })
            }
        };
        Ok(Authz { kind })
    }

    /// Whether `identity` (a client's distinguished name) is allowed.
    pub fn allows(&self, identity: &str) -> bool {
        match &self.kind {
            Kind::Simple(id) => id.lock().is_ok_and(|id| *id == identity),
            Kind::List(l) => l.lock().is_ok_and(|l| l.allows(identity)),
            Kind::ListFile(f) => f.allows(identity),
        }
    }

    /// qom-list: (name, type) in QSD's order.
    pub fn properties(&self) -> Vec<(&'static str, &'static str)> {
        match self.kind {
            Kind::Simple(_) => vec![("identity", "string")],
            Kind::List(_) => vec![("policy", "QAuthZListPolicy"), ("rules", "QAuthZListRule")],
            Kind::ListFile(_) => vec![("filename", "string"), ("refresh", "bool")],
        }
    }

    pub fn get(&self, prop: &str) -> Option<Value> {
        match (&self.kind, prop) {
            (Kind::Simple(id), "identity") => id.lock().ok().map(|id| json!(*id)),
            (Kind::List(l), "policy") => l.lock().ok().map(|l| json!(l.policy.name())),
            (Kind::List(l), "rules") => l.lock().ok().map(|l| l.rules_json()),
            (Kind::ListFile(f), "filename") => Some(json!(f.filename)),
            (Kind::ListFile(f), "refresh") => Some(json!(f.refresh)),
            _ => None,
        }
    }

    /// qom-set, with the value checked as the property's type.
    pub fn set(&self, prop: &str, value: &Value) -> Result<(), String> {
        let type_err = |t: &str| format!("Invalid parameter type for '{prop}', expected: {t}");
        let not_found = || format!("Property '{}.{prop}' not found", self.qom_type());
        match (&self.kind, prop) {
            (Kind::Simple(id), "identity") => {
                let v = value.as_str().ok_or_else(|| type_err("string"))?;
                if let Ok(mut id) = id.lock() {
                    *id = v.to_string();
                }
                Ok(())
            }
            (Kind::List(l), "policy" | "rules") => {
                let mut m = Map::new();
                m.insert(prop.to_string(), value.clone());
                let schema = crate::qapi::Schema::rsd(false);
                let m = schema
                    .validate_args(
                        "AuthZListProperties",
                        &m,
                        crate::qapi::validate::Input::Json,
                    )
                    .map_err(|e| e.desc)?;
                let new = List::from_props(&m);
                if let Ok(mut l) = l.lock() {
                    if prop == "policy" {
                        l.policy = new.policy;
                    } else {
                        l.rules = new.rules;
                    }
                }
                Ok(())
            }
            // Read at creation only, as QEMU uses them.
            (Kind::ListFile(_), "filename") => {
                value.as_str().map(|_| ()).ok_or_else(|| type_err("string"))
            }
            (Kind::ListFile(_), "refresh") => value
                .as_bool()
                .map(|_| ())
                .ok_or_else(|| type_err("boolean")),
            _ => Err(not_found()),
        }
    }
}

/// Every object's id, for the servers that look authz objects up by id
/// when a client connects (QEMU's qauthz_is_allowed_by_id): the control
/// actor keeps it in step with object-add and object-del.
#[derive(Default)]
pub struct AuthzIndex(RwLock<HashMap<String, Option<Arc<Authz>>>>);

impl AuthzIndex {
    /// Records an object: Some for an authz object, None for another.
    pub fn insert(&self, id: &str, authz: Option<Arc<Authz>>) {
        if let Ok(mut m) = self.0.write() {
            m.insert(id.to_string(), authz);
        }
    }

    pub fn remove(&self, id: &str) {
        if let Ok(mut m) = self.0.write() {
            m.remove(id);
        }
    }

    /// Asks object `id` about `identity`, in QEMU's words when it cannot.
    pub fn check(&self, id: &str, identity: &str) -> Result<bool, String> {
        let found = self.0.read().ok().and_then(|m| m.get(id).cloned());
        match found {
            None => Err(format!("Cannot find QAuthZ object ID {id}")),
            Some(None) => Err(format!("Object '{id}' is not a QAuthZ subclass")),
            Some(Some(a)) => Ok(a.allows(identity)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_is_glibs_simple_pattern() {
        assert!(glob_match("CN=*", "CN=client1"));
        assert!(glob_match("O=Test Org,CN=client?", "O=Test Org,CN=client1"));
        assert!(!glob_match(
            "O=Test Org,CN=client?",
            "O=Test Org,CN=client12"
        ));
        assert!(glob_match("*a*b*", "xxaxxbxx"));
        assert!(!glob_match("*a*b", "xxaxxbxx"));
        assert!(glob_match("", ""));
        assert!(!glob_match("[a]", "a"));
    }

    #[test]
    fn first_matching_rule_decides() {
        let props = json!({"policy": "deny", "rules": [
            {"match": "CN=bad", "policy": "deny"},
            {"match": "CN=*", "policy": "allow", "format": "glob"}]});
        let a = Authz::create("authz-list", props.as_object().expect("obj")).expect("list");
        assert!(a.allows("CN=good"));
        assert!(!a.allows("CN=bad"));
        assert!(!a.allows("O=x"));
        assert_eq!(
            a.get("rules"),
            Some(json!([{"match": "CN=bad", "policy": "deny"},
                        {"match": "CN=*", "policy": "allow", "format": "glob"}]))
        );
    }
}
