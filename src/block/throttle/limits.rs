//! A throttle group's QOM face: the `limits` property (QAPI's
//! ThrottleLimits) and the legacy `x-` properties, turned into the
//! algorithm's `Config` and back, with QEMU's checks and messages.
use serde_json::{Map, Value};

use super::algorithm::{Bucket, Config};

/// Which field of a bucket a property sets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Avg,
    Max,
    Length,
}

/// ThrottleLimits' members (without the `x-` prefix): the bucket and
/// field each sets; None for iops-size.
const PROPS: &[(&str, Option<(Bucket, Field)>)] = &[
    ("iops-total", Some((Bucket::OpsTotal, Field::Avg))),
    ("iops-total-max", Some((Bucket::OpsTotal, Field::Max))),
    (
        "iops-total-max-length",
        Some((Bucket::OpsTotal, Field::Length)),
    ),
    ("iops-read", Some((Bucket::OpsRead, Field::Avg))),
    ("iops-read-max", Some((Bucket::OpsRead, Field::Max))),
    (
        "iops-read-max-length",
        Some((Bucket::OpsRead, Field::Length)),
    ),
    ("iops-write", Some((Bucket::OpsWrite, Field::Avg))),
    ("iops-write-max", Some((Bucket::OpsWrite, Field::Max))),
    (
        "iops-write-max-length",
        Some((Bucket::OpsWrite, Field::Length)),
    ),
    ("bps-total", Some((Bucket::BpsTotal, Field::Avg))),
    ("bps-total-max", Some((Bucket::BpsTotal, Field::Max))),
    (
        "bps-total-max-length",
        Some((Bucket::BpsTotal, Field::Length)),
    ),
    ("bps-read", Some((Bucket::BpsRead, Field::Avg))),
    ("bps-read-max", Some((Bucket::BpsRead, Field::Max))),
    (
        "bps-read-max-length",
        Some((Bucket::BpsRead, Field::Length)),
    ),
    ("bps-write", Some((Bucket::BpsWrite, Field::Avg))),
    ("bps-write-max", Some((Bucket::BpsWrite, Field::Max))),
    (
        "bps-write-max-length",
        Some((Bucket::BpsWrite, Field::Length)),
    ),
    ("iops-size", None),
];

/// The order QEMU copies ThrottleLimits into its config: averages, then
/// maxima, then lengths (each bps before iops), then iops-size.
const APPLY_ORDER: &[&str] = &[
    "bps-total",
    "bps-read",
    "bps-write",
    "iops-total",
    "iops-read",
    "iops-write",
    "bps-total-max",
    "bps-read-max",
    "bps-write-max",
    "iops-total-max",
    "iops-read-max",
    "iops-write-max",
    "bps-total-max-length",
    "bps-read-max-length",
    "bps-write-max-length",
    "iops-total-max-length",
    "iops-read-max-length",
    "iops-write-max-length",
    "iops-size",
];

/// qom-list of a throttle group after `type`, in QSD's order.
pub const QOM_PROPERTIES: &[(&str, &str)] = &[
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
];

/// `--object throttle-group,help`.
pub const HELP: &[&str] = &[
    "limits=<ThrottleLimits>",
    "x-bps-read-max-length=<int>",
    "x-bps-read-max=<int>",
    "x-bps-read=<int>",
    "x-bps-total-max-length=<int>",
    "x-bps-total-max=<int>",
    "x-bps-total=<int>",
    "x-bps-write-max-length=<int>",
    "x-bps-write-max=<int>",
    "x-bps-write=<int>",
    "x-iops-read-max-length=<int>",
    "x-iops-read-max=<int>",
    "x-iops-read=<int>",
    "x-iops-size=<int>",
    "x-iops-total-max-length=<int>",
    "x-iops-total-max=<int>",
    "x-iops-total=<int>",
    "x-iops-write-max-length=<int>",
    "x-iops-write-max=<int>",
    "x-iops-write=<int>",
];

fn lookup(name: &str) -> Option<Option<(Bucket, Field)>> {
    PROPS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// Stores `v` (as C stores an int64 into its unsigned fields).
fn store(cfg: &mut Config, target: Option<(Bucket, Field)>, v: i64) {
    let u = v as u64;
    match target {
        None => cfg.op_size = u,
        Some((b, Field::Avg)) => cfg.get_mut(b).avg = u,
        Some((b, Field::Max)) => cfg.get_mut(b).max = u,
        Some((b, Field::Length)) => cfg.get_mut(b).burst_length = u,
    }
}

fn read(cfg: &Config, target: Option<(Bucket, Field)>) -> u64 {
    match target {
        None => cfg.op_size,
        Some((b, Field::Avg)) => cfg.get(b).avg,
        Some((b, Field::Max)) => cfg.get(b).max,
        Some((b, Field::Length)) => cfg.get(b).burst_length,
    }
}

/// Checks a `limits` value the way QEMU's input visitor does (for
/// qom-set, which the schema does not type): an object of integers.
pub fn check_shape(v: &Value) -> Result<&Map<String, Value>, String> {
    let Some(m) = v.as_object() else {
        return Err("Invalid parameter type for 'limits', expected: object".into());
    };
    for (k, x) in m {
        if lookup(k).is_none() {
            return Err(format!("Parameter 'limits.{k}' is unexpected"));
        }
        if x.as_i64().is_none() {
            return Err(format!(
                "Invalid parameter type for 'limits.{k}', expected: integer"
            ));
        }
    }
    Ok(m)
}

/// Applies the members a ThrottleLimits gives over `cfg` and checks the
/// result (QEMU's throttle_limits_to_config).
pub fn apply_limits(cfg: &mut Config, limits: &Map<String, Value>) -> Result<(), String> {
    for name in APPLY_ORDER {
        let Some(v) = limits.get(*name).and_then(Value::as_i64) else {
            continue;
        };
        let target = lookup(name).flatten();
        if matches!(target, Some((_, Field::Length))) && v > u32::MAX as i64 {
            return Err(format!(
                "{name} value must be in the range [0, {}]",
                u32::MAX
            ));
        }
        store(cfg, target, v);
    }
    cfg.check()
}

/// Sets one `x-` property while the object is being created.
pub fn set_legacy(cfg: &mut Config, prop: &str, v: i64) -> Result<(), String> {
    let Some(target) = prop.strip_prefix("x-").and_then(lookup) else {
        return Err(format!("Property '{prop}' not found"));
    };
    if v < 0 {
        return Err("Property values cannot be negative".into());
    }
    if matches!(target, Some((_, Field::Length))) && v > u32::MAX as i64 {
        // QEMU's message lacks a space here.
        return Err(format!(
            "{prop} value must be in therange [0, {}]",
            u32::MAX
        ));
    }
    store(cfg, target, v);
    Ok(())
}

/// qom-get of an `x-` property.
pub fn get_legacy(cfg: &Config, prop: &str) -> Option<Value> {
    let target = prop.strip_prefix("x-").and_then(lookup)?;
    Some(Value::from(read(cfg, target) as i64))
}

/// The `limits` property as qom-get shows it: every member.
pub fn to_json(cfg: &Config) -> Value {
    let mut m = Map::new();
    for (name, target) in PROPS {
        m.insert((*name).to_string(), Value::from(read(cfg, *target) as i64));
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn limits_merge_over_the_current_config_and_check() {
        let mut cfg = Config::default();
        apply_limits(
            &mut cfg,
            &obj(json!({"iops-total": 7, "iops-total-max": 8})),
        )
        .expect("ok");
        let before = cfg;
        let e = apply_limits(&mut cfg, &obj(json!({"iops-total": 9}))).unwrap_err();
        assert_eq!(e, "bps_max/iops_max cannot be lower than bps/iops");
        // The caller keeps its copy on failure.
        assert_eq!(before.get(Bucket::OpsTotal).avg, 7);
        let e = apply_limits(
            &mut Config::default(),
            &obj(
                json!({"bps-total": 1, "bps-total-max": 2, "bps-total-max-length": 4294967296u64}),
            ),
        )
        .unwrap_err();
        assert_eq!(
            e,
            "bps-total-max-length value must be in the range [0, 4294967295]"
        );
        // -1 is stored as C stores it: a huge length.
        let e = apply_limits(
            &mut Config::default(),
            &obj(json!({"bps-total": 100, "bps-total-max": 200, "bps-total-max-length": -1})),
        )
        .unwrap_err();
        assert_eq!(e, "burst length too high for this burst rate");
    }

    #[test]
    fn legacy_properties_and_shape_checks() {
        let mut cfg = Config::default();
        assert_eq!(
            set_legacy(&mut cfg, "x-iops-total", -5).unwrap_err(),
            "Property values cannot be negative"
        );
        assert_eq!(
            set_legacy(&mut cfg, "x-iops-total-max-length", 1 << 32).unwrap_err(),
            "x-iops-total-max-length value must be in therange [0, 4294967295]"
        );
        set_legacy(&mut cfg, "x-iops-size", 4096).expect("set");
        assert_eq!(get_legacy(&cfg, "x-iops-size"), Some(json!(4096)));
        assert_eq!(get_legacy(&cfg, "x-bps-read-max-length"), Some(json!(1)));
        assert_eq!(
            check_shape(&json!(5)).unwrap_err(),
            "Invalid parameter type for 'limits', expected: object"
        );
        assert_eq!(
            check_shape(&json!({"x": 1})).unwrap_err(),
            "Parameter 'limits.x' is unexpected"
        );
        assert_eq!(
            check_shape(&json!({"bps-read": "1"})).unwrap_err(),
            "Invalid parameter type for 'limits.bps-read', expected: integer"
        );
        assert_eq!(to_json(&cfg)["iops-size"], json!(4096));
        assert_eq!(QOM_PROPERTIES.len(), 20);
    }
}
