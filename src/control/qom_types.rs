//! qom-list-types and qom-list-properties over the QOM types rsd has:
//! the object and container types, its chardev types and its
//! user-creatable objects (TLS credentials and authz included). QSD's
//! other types (tls-creds-psk and -anon, its I/O channels, ...) are
//! absent, as rsd does not have them.
use serde_json::{json, Map, Value};

use crate::qapi::error::QmpResult;
use crate::qapi::{ErrorClass, QmpError};

struct QomType {
    name: &'static str,
    parent: Option<&'static str>,
    is_abstract: bool,
    /// The interface it declares (its subtypes inherit it).
    interface: Option<&'static str>,
    /// (name, type) of the properties qom-list-properties shows, in QSD's
    /// order.
    props: &'static [(&'static str, &'static str)],
}

const TYPE: (&str, &str) = ("type", "string");
const TLS_CREDS: &[(&str, &str)] = &[
    TYPE,
    ("endpoint", "QCryptoTLSCredsEndpoint"),
    ("dir", "string"),
    ("verify-peer", "bool"),
    ("priority", "string"),
];
const EVENT_LOOP: &[(&str, &str)] = &[
    TYPE,
    ("thread-pool-min", "int"),
    ("aio-max-batch", "int"),
    ("thread-pool-max", "int"),
];
const SECRET_COMMON: &[(&str, &str)] = &[
    TYPE,
    ("iv", "string"),
    ("keyid", "string"),
    ("format", "QCryptoSecretFormat"),
];

const fn t(
    name: &'static str,
    parent: Option<&'static str>,
    is_abstract: bool,
    props: &'static [(&'static str, &'static str)],
) -> QomType {
    QomType {
        name,
        parent,
        is_abstract,
        interface: None,
        props,
    }
}

/// In QSD's listing order (its type table's hash order), so a listing
/// equals QSD's with the types rsd lacks left out.
static TYPES: &[QomType] = &[
    QomType {
        interface: Some("user-creatable"),
        ..t(
            "authz-simple",
            Some("authz"),
            false,
            &[TYPE, ("identity", "string")],
        )
    },
    QomType {
        interface: Some("user-creatable"),
        ..t("secret_common", Some("object"), true, SECRET_COMMON)
    },
    t("container", Some("object"), false, &[TYPE]),
    t("interface", None, true, &[]),
    t(
        "iothread",
        Some("event-loop-base"),
        false,
        &[
            TYPE,
            ("thread-pool-min", "int"),
            ("aio-max-batch", "int"),
            ("thread-pool-max", "int"),
            ("poll-max-ns", "int"),
            ("poll-grow", "int"),
            ("poll-shrink", "int"),
        ],
    ),
    t(
        "secret",
        Some("secret_common"),
        false,
        &[
            TYPE,
            ("iv", "string"),
            ("keyid", "string"),
            ("format", "QCryptoSecretFormat"),
            ("file", "string"),
            ("data", "string"),
        ],
    ),
    // The concrete TLS and authz types declare user-creatable, not
    // their abstract parents (which then do not cast to it).
    t("authz", Some("object"), true, &[TYPE]),
    t("tls-creds", Some("object"), true, TLS_CREDS),
    t("main-loop", Some("event-loop-base"), false, EVENT_LOOP),
    QomType {
        interface: Some("user-creatable"),
        ..t(
            "authz-list-file",
            Some("authz"),
            false,
            &[TYPE, ("filename", "string"), ("refresh", "bool")],
        )
    },
    t("chardev-null", Some("chardev"), false, &[TYPE]),
    t("chardev-ringbuf", Some("chardev"), false, &[TYPE]),
    QomType {
        interface: Some("user-creatable"),
        ..t(
            "authz-list",
            Some("authz"),
            false,
            &[
                TYPE,
                ("policy", "QAuthZListPolicy"),
                ("rules", "QAuthZListRule"),
            ],
        )
    },
    QomType {
        interface: Some("user-creatable"),
        ..t("event-loop-base", Some("object"), true, EVENT_LOOP)
    },
    t("chardev-fd", Some("chardev"), true, &[TYPE]),
    t("chardev", Some("object"), true, &[TYPE]),
    t("user-creatable", Some("interface"), true, &[]),
    t(
        "chardev-socket",
        Some("chardev"),
        false,
        &[TYPE, ("connected", "bool"), ("addr", "SocketAddress")],
    ),
    t("chardev-stdio", Some("chardev-fd"), false, &[TYPE]),
    t("chardev-memory", Some("chardev-ringbuf"), false, &[TYPE]),
    t("object", None, true, &[TYPE]),
    QomType {
        interface: Some("user-creatable"),
        ..t(
            "tls-creds-x509",
            Some("tls-creds"),
            false,
            &[
                TYPE,
                ("endpoint", "QCryptoTLSCredsEndpoint"),
                ("dir", "string"),
                ("verify-peer", "bool"),
                ("priority", "string"),
                ("sanity-check", "bool"),
                ("passwordid", "string"),
            ],
        )
    },
    t("chardev-file", Some("chardev-fd"), false, &[TYPE]),
    t(
        "secret_keyring",
        Some("secret_common"),
        false,
        &[
            TYPE,
            ("iv", "string"),
            ("keyid", "string"),
            ("format", "QCryptoSecretFormat"),
            ("serial", "int32_t"),
        ],
    ),
    QomType {
        interface: Some("user-creatable"),
        ..t(
            "throttle-group",
            Some("object"),
            false,
            &[
                TYPE,
                ("x-bps-write-max-length", "int"),
                ("x-iops-total-max-length", "int"),
                ("x-iops-size", "int"),
                ("limits", "ThrottleLimits"),
                ("x-bps-total", "int"),
                ("x-iops-read-max-length", "int"),
                ("x-bps-write", "int"),
                ("x-iops-write-max-length", "int"),
                ("x-bps-read-max", "int"),
                ("x-iops-read-max", "int"),
                ("x-bps-total-max", "int"),
                ("x-bps-read-max-length", "int"),
                ("x-iops-read", "int"),
                ("x-bps-read", "int"),
                ("x-bps-write-max", "int"),
                ("x-iops-total-max", "int"),
                ("x-iops-total", "int"),
                ("x-iops-write", "int"),
                ("x-bps-total-max-length", "int"),
                ("x-iops-write-max", "int"),
            ],
        )
    },
];

fn find(name: &str) -> Option<&'static QomType> {
    TYPES.iter().find(|t| t.name == name)
}

/// The type and its ancestors, with the interfaces they declare and
/// those interfaces' ancestors (QOM's dynamic cast).
fn casts_to(ty: &QomType, target: &str) -> bool {
    let mut cur = Some(ty);
    while let Some(c) = cur {
        if c.name == target {
            return true;
        }
        if let Some(i) = c.interface.and_then(find) {
            if casts_to(i, target) {
                return true;
            }
        }
        cur = c.parent.and_then(find);
    }
    false
}

pub fn list_types(args: &Map<String, Value>) -> Value {
    let implements = args.get("implements").and_then(Value::as_str);
    let with_abstract = args.get("abstract").and_then(Value::as_bool) == Some(true);
    let list = TYPES
        .iter()
        .filter(|t| with_abstract || !t.is_abstract)
        .filter(|t| implements.is_none_or(|i| casts_to(t, i)))
        .map(|t| {
            let mut m = Map::new();
            m.insert("name".into(), json!(t.name));
            if t.is_abstract {
                m.insert("abstract".into(), json!(true));
            }
            if let Some(p) = t.parent {
                m.insert("parent".into(), json!(p));
            }
            Value::Object(m)
        })
        .collect();
    Value::Array(list)
}

pub fn list_properties(typename: &str) -> QmpResult<Value> {
    let Some(ty) = find(typename) else {
        return Err(QmpError::with_class(
            ErrorClass::DeviceNotFound,
            format!("Class '{typename}' not found"),
        ));
    };
    if !casts_to(ty, "object") {
        return Err(QmpError::generic("Parameter 'typename' expects a QOM type"));
    }
    Ok(Value::Array(
        ty.props
            .iter()
            .map(|(n, t)| json!({"name": n, "type": t}))
            .collect(),
    ))
}
