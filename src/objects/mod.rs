//! User-creatable objects (`--object`, object-add): secrets, iothreads,
//! throttle groups, TLS credentials and authorization objects. They are
//! owned by the control actor; a throttle group is shared with the
//! throttle nodes that are its members, an authz object with the NBD
//! server (through `authz::AuthzIndex`).
pub mod authz;
mod keyring;
pub mod secret;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::block::throttle::{algorithm::Config, limits, ThrottleGroup};
use crate::iothread::{IoThread, PollParams};
use crate::tls::TlsCreds;
use authz::Authz;

use serde_json::{json, Map, Value};

pub use secret::Secret;

/// Types `--object help` lists: QSD's user-creatable types.
pub const CREATABLE_TYPES: &[&str] = &[
    "authz-list",
    "authz-list-file",
    "authz-simple",
    "iothread",
    "main-loop",
    "pr-manager-helper",
    "secret",
    "secret_keyring",
    "thread-context",
    "throttle-group",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
];

/// Properties `--object TYPE,help` prints, for the types rsd implements.
pub fn help_properties(qom_type: &str) -> Option<&'static [&'static str]> {
    match qom_type {
        "secret" => Some(&[
            "data=<string>",
            "file=<string>",
            "format=<QCryptoSecretFormat>",
            "iv=<string>",
            "keyid=<string>",
        ]),
        "secret_keyring" => Some(&[
            "format=<QCryptoSecretFormat>",
            "iv=<string>",
            "keyid=<string>",
            "serial=<int32_t>",
        ]),
        "iothread" => Some(&[
            "aio-max-batch=<int>",
            "poll-grow=<int>",
            "poll-max-ns=<int>",
            "poll-shrink=<int>",
            "thread-pool-max=<int>",
            "thread-pool-min=<int>",
        ]),
        "main-loop" => Some(&[
            "aio-max-batch=<int>",
            "thread-pool-max=<int>",
            "thread-pool-min=<int>",
        ]),
        "throttle-group" => Some(limits::HELP),
        "tls-creds-x509" => Some(&[
            "dir=<string>",
            "endpoint=<QCryptoTLSCredsEndpoint>",
            "passwordid=<string>",
            "priority=<string>",
            "sanity-check=<bool>",
            "verify-peer=<bool>",
        ]),
        "authz-simple" => Some(&["identity=<string>"]),
        "authz-list" => Some(&["policy=<QAuthZListPolicy>", "rules=<QAuthZListRule>"]),
        "authz-list-file" => Some(&["filename=<string>", "refresh=<bool>"]),
        _ => None,
    }
}

/// An event-loop object (iothread, main-loop): integer properties.
#[derive(Clone, Debug)]
pub struct EventLoop {
    pub props: BTreeMap<&'static str, i64>,
}

const IOTHREAD_PROPS: &[(&str, i64)] = &[
    ("poll-max-ns", 32768),
    ("poll-grow", 0),
    ("poll-shrink", 0),
    ("aio-max-batch", 0),
    ("thread-pool-min", 0),
    ("thread-pool-max", 64),
];

impl EventLoop {
    fn new(qom_type: &str, props: &Map<String, Value>) -> Result<Self, String> {
        let mut el = EventLoop {
            props: BTreeMap::new(),
        };
        for (name, default) in IOTHREAD_PROPS {
            if qom_type == "main-loop" && name.starts_with("poll-") {
                continue;
            }
            el.props.insert(name, *default);
        }
        for (k, v) in props {
            if let Some(n) = v.as_i64() {
                el.set(k, n)?;
            }
        }
        Ok(el)
    }

    /// Sets one property with QEMU's range check.
    pub fn set(&mut self, name: &str, value: i64) -> Result<(), String> {
        let Some(slot) = self.props.iter_mut().find(|(k, _)| **k == name) else {
            return Err(format!("Property '{name}' not found"));
        };
        if value < 0 {
            return Err(format!("{name} value must be in range [0, {}]", i64::MAX));
        }
        *slot.1 = value;
        Ok(())
    }
}

pub enum Object {
    Secret(Secret),
    EventLoop {
        qom_type: &'static str,
        el: EventLoop,
        /// An iothread's thread (None for main-loop).
        thread: Option<Arc<IoThread>>,
    },
    ThrottleGroup(Arc<ThrottleGroup>),
    TlsCreds(TlsCreds),
    Authz(Arc<Authz>),
}

impl Object {
    pub fn qom_type(&self) -> &'static str {
        match self {
            Object::Secret(s) if s.serial.is_some() => "secret_keyring",
            Object::Secret(_) => "secret",
            Object::EventLoop { qom_type, .. } => qom_type,
            Object::ThrottleGroup(_) => "throttle-group",
            Object::TlsCreds(_) => "tls-creds-x509",
            Object::Authz(a) => a.qom_type(),
        }
    }

    pub fn tls_creds(&self) -> Option<&TlsCreds> {
        match self {
            Object::TlsCreds(c) => Some(c),
            _ => None,
        }
    }

    pub fn authz(&self) -> Option<&Arc<Authz>> {
        match self {
            Object::Authz(a) => Some(a),
            _ => None,
        }
    }

    pub fn iothread(&self) -> Option<&Arc<IoThread>> {
        match self {
            Object::EventLoop { thread, .. } => thread.as_ref(),
            _ => None,
        }
    }

    pub fn throttle_group(&self) -> Option<&Arc<ThrottleGroup>> {
        match self {
            Object::ThrottleGroup(g) => Some(g),
            _ => None,
        }
    }

    /// qom-list of this object: (name, type) pairs.
    pub fn properties(&self) -> Vec<(String, String)> {
        // In the order QSD lists them (its property table's hash order).
        let mut out = vec![("type".to_string(), "string".to_string())];
        match self {
            Object::Secret(s) if s.serial.is_some() => {
                for (n, t) in [
                    ("iv", "string"),
                    ("keyid", "string"),
                    ("format", "QCryptoSecretFormat"),
                    ("serial", "int32_t"),
                ] {
                    out.push((n.into(), t.into()));
                }
            }
            Object::Secret(_) => {
                for (n, t) in [
                    ("iv", "string"),
                    ("keyid", "string"),
                    ("format", "QCryptoSecretFormat"),
                    ("file", "string"),
                    ("data", "string"),
                ] {
                    out.push((n.into(), t.into()));
                }
            }
            Object::EventLoop { el, .. } => {
                for n in [
                    "thread-pool-min",
                    "aio-max-batch",
                    "thread-pool-max",
                    "poll-max-ns",
                    "poll-grow",
                    "poll-shrink",
                ] {
                    if el.props.contains_key(n) {
                        out.push((n.to_string(), "int".into()));
                    }
                }
            }
            Object::ThrottleGroup(_) => {
                for (n, t) in limits::QOM_PROPERTIES {
                    out.push((n.to_string(), t.to_string()));
                }
            }
            Object::TlsCreds(_) => {
                for (n, t) in crate::tls::creds::QOM_PROPERTIES {
                    out.push((n.to_string(), t.to_string()));
                }
            }
            Object::Authz(a) => {
                for (n, t) in a.properties() {
                    out.push((n.to_string(), t.to_string()));
                }
            }
        }
        out
    }

    /// qom-set: the value is checked as the property's type, as QEMU's
    /// visitor does, with the property name in the message.
    pub fn set(&mut self, prop: &str, value: &Value) -> Result<(), String> {
        let type_err = |t: &str| format!("Invalid parameter type for '{prop}', expected: {t}");
        match self {
            _ if prop == "type" => Err(format!(
                "Property '{}.type' is not writable",
                self.qom_type()
            )),
            Object::Secret(s) if s.serial.is_some() => match prop {
                "keyid" | "iv" => {
                    let v = value.as_str().ok_or_else(|| type_err("string"))?;
                    s.set_prop(prop, v);
                    Ok(())
                }
                "serial" => {
                    let n = value.as_i64().ok_or_else(|| type_err("integer"))?;
                    s.serial = Some(n as i32);
                    Ok(())
                }
                "format" => Err(format!("Property 'secret_keyring.{prop}' is not writable")),
                _ => Err(format!("Property 'secret_keyring.{prop}' not found")),
            },
            Object::Secret(s) => match prop {
                "data" | "file" | "keyid" | "iv" => {
                    let v = value.as_str().ok_or_else(|| type_err("string"))?;
                    s.set_prop(prop, v);
                    Ok(())
                }
                "format" => Err(format!("Property 'secret.{prop}' is not writable")),
                _ => Err(format!("Property 'secret.{prop}' not found")),
            },
            Object::EventLoop {
                qom_type,
                el,
                thread,
            } => {
                if !el.props.contains_key(prop) {
                    return Err(format!("Property '{qom_type}.{prop}' not found"));
                }
                let n = value.as_i64().ok_or_else(|| type_err("integer"))?;
                el.set(prop, n)?;
                // The polling parameters act at once, as in QEMU.
                if let Some(t) = thread {
                    t.poll.set(prop, n.unsigned_abs());
                }
                Ok(())
            }
            Object::ThrottleGroup(g) => match prop {
                // All limits change together, checked as a whole.
                "limits" => {
                    let m = limits::check_shape(value)?;
                    let mut cfg = g.config();
                    limits::apply_limits(&mut cfg, m)?;
                    g.set_config(cfg);
                    Ok(())
                }
                // QEMU refuses before it reads the value.
                p if limits::get_legacy(&Config::default(), p).is_some() => {
                    Err("Property cannot be set after initialization".into())
                }
                _ => Err(format!("Property 'throttle-group.{prop}' not found")),
            },
            Object::TlsCreds(c) => c.set(prop, value),
            Object::Authz(a) => a.set(prop, value),
        }
    }

    pub fn get(&self, prop: &str) -> Option<Value> {
        match (self, prop) {
            (_, "type") => Some(json!(self.qom_type())),
            (Object::Secret(s), p) => s.get(p),
            (Object::EventLoop { el, .. }, p) => el.props.get(p).map(|v| json!(v)),
            (Object::ThrottleGroup(g), "limits") => Some(limits::to_json(&g.config())),
            (Object::ThrottleGroup(g), p) => limits::get_legacy(&g.config(), p),
            (Object::TlsCreds(c), p) => c.get(p),
            (Object::Authz(a), p) => a.get(p),
        }
    }
}

/// Creates an object from validated object-add arguments.
pub fn create(
    args: &Map<String, Value>,
    lookup_secret: &dyn Fn(&str) -> Option<Vec<u8>>,
) -> Result<Object, String> {
    let qom_type = args
        .get("qom-type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut props = args.clone();
    props.remove("qom-type");
    props.remove("id");
    match qom_type {
        "secret" => Secret::load(&props, lookup_secret).map(Object::Secret),
        "secret_keyring" => Secret::load_keyring(&props, lookup_secret).map(Object::Secret),
        "iothread" => {
            let el = EventLoop::new(qom_type, &props)?;
            let prop = |n: &str| el.props.get(n).copied().unwrap_or(0).unsigned_abs();
            let poll = PollParams::new(prop("poll-max-ns"), prop("poll-grow"), prop("poll-shrink"));
            let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
            let thread = IoThread::start(id, poll)?;
            Ok(Object::EventLoop {
                qom_type: "iothread",
                el,
                thread: Some(thread),
            })
        }
        "main-loop" => Ok(Object::EventLoop {
            qom_type: "main-loop",
            el: EventLoop::new(qom_type, &props)?,
            thread: None,
        }),
        "throttle-group" => {
            let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
            throttle_config(&props).map(|cfg| Object::ThrottleGroup(ThrottleGroup::new(id, cfg)))
        }
        "tls-creds-x509" => {
            TlsCreds::load(&props, &|id| lookup_secret(id).is_some()).map(Object::TlsCreds)
        }
        // rustls has neither pre-shared keys nor anonymous TLS.
        "tls-creds-psk" | "tls-creds-anon" => Err(format!(
            "rsd does not support '{qom_type}': its TLS (rustls) has no {}; use tls-creds-x509",
            if qom_type == "tls-creds-psk" {
                "pre-shared keys"
            } else {
                "anonymous credentials"
            }
        )),
        "authz-simple" | "authz-list" => {
            Authz::create(qom_type, &props).map(|a| Object::Authz(Arc::new(a)))
        }
        // QAPI's name for the type QOM calls authz-list-file (QSD 10.0.2
        // can create it under neither name).
        "authz-listfile" => {
            Authz::create("authz-list-file", &props).map(|a| Object::Authz(Arc::new(a)))
        }
        other => Err(format!("invalid object type: {other}")),
    }
}

/// A throttle group's configuration from object-add's properties, set
/// in QEMU's order (the properties' QDict order), then checked whole.
fn throttle_config(props: &Map<String, Value>) -> Result<Config, String> {
    let mut cfg = Config::default();
    for k in crate::qmp::json::qdict_order(props.keys().map(String::as_str)) {
        match (k, props.get(k)) {
            ("limits", Some(Value::Object(m))) => limits::apply_limits(&mut cfg, m)?,
            (p, Some(v)) => limits::set_legacy(&mut cfg, p, v.as_i64().unwrap_or(0))?,
            _ => {}
        }
    }
    cfg.check()?;
    Ok(cfg)
}

/// QEMU's identifier rule for object and chardev ids.
pub fn check_id(id: &str) -> Result<(), String> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err("Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.".into())
    }
}

/// A secret's value as a password (QEMU's qcrypto_secret_lookup_as_utf8):
/// valid UTF-8, up to its first NUL byte, with QEMU's messages.
pub fn secret_utf8(
    objects: &std::collections::BTreeMap<String, Object>,
    id: &str,
) -> Result<diskcrypt::luks::Key, String> {
    let value = match objects.get(id) {
        None => return Err(format!("No secret with id '{id}'")),
        Some(Object::Secret(s)) => &s.value,
        Some(_) => return Err(format!("Object with id '{id}' is not a secret")),
    };
    if std::str::from_utf8(value).is_err() {
        return Err(format!("Data from secret {id} is not valid UTF-8"));
    }
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    Ok(diskcrypt::luks::Key(value[..end].to_vec()))
}

/// The secrets a command names, looked up when it is issued (as QEMU's
/// job would find them), for work that runs later without the object
/// registry.
#[derive(Default)]
pub struct Secrets(std::collections::BTreeMap<String, Result<diskcrypt::luks::Key, String>>);

impl Secrets {
    pub fn collect(objects: &std::collections::BTreeMap<String, Object>, ids: &[&str]) -> Secrets {
        Secrets(
            ids.iter()
                .map(|id| (id.to_string(), secret_utf8(objects, id)))
                .collect(),
        )
    }

    pub fn get(&self, id: &str) -> Result<diskcrypt::luks::Key, String> {
        self.0
            .get(id)
            .cloned()
            .unwrap_or_else(|| Err(format!("No secret with id '{id}'")))
    }
}
