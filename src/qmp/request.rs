//! The per-connection QMP request rules: negotiation mode, the checks of
//! the request object, OOB, command lookup and argument validation. Pure
//! logic; the monitor session does the I/O and runs what this accepts.
use serde_json::{Map, Value};

use super::json::qdict_order;
use crate::qapi::validate::Input;
use crate::qapi::{ErrorClass, QmpError, Schema};

#[derive(Default)]
pub struct SessionState {
    pub negotiated: bool,
    pub oob: bool,
}

#[derive(Debug, PartialEq)]
pub enum Action {
    /// Send this message (an error, or the reply of qmp_capabilities).
    Reply(Value),
    /// qmp_capabilities succeeded: send the reply, then deliver events.
    Negotiated(Value),
    /// A validated command for the dispatcher.
    Execute {
        name: String,
        args: Map<String, Value>,
        id: Option<Value>,
        /// The client's W3C trace context for the command's span.
        traceparent: Option<String>,
    },
}

/// The request member that carries a W3C `traceparent` (rsd only, named
/// by QAPI's rule for downstream extensions; differences entry 54). It
/// is accepted whether or not traces are on, so a client never needs to
/// know.
pub const TRACEPARENT: &str = "__org.rsd_traceparent";

pub fn reply_ok(ret: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), ret);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

pub fn reply_err(e: &QmpError, id: Option<Value>) -> Value {
    let mut err = Map::new();
    err.insert("class".into(), Value::String(e.class.as_str().into()));
    err.insert("desc".into(), Value::String(e.desc.clone()));
    let mut m = Map::new();
    m.insert("error".into(), Value::Object(err));
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// Checks the members of a request object in QEMU's (hash) order and
/// returns the command name and whether it came as exec-oob.
fn check_obj(obj: &Map<String, Value>, allow_oob: bool) -> Result<(String, bool), QmpError> {
    let mut exec: Option<(&str, &str)> = None;
    for key in qdict_order(obj.keys().map(String::as_str)) {
        let val = &obj[key];
        match key {
            "execute" | "exec-oob" if key == "execute" || allow_oob => {
                let Some(name) = val.as_str() else {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' must be a string"
                    )));
                };
                if let Some((prev, _)) = exec {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' clashes with '{prev}'"
                    )));
                }
                exec = Some((key, name));
            }
            "arguments" => {
                if !val.is_object() {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ));
                }
            }
            "id" => {}
            TRACEPARENT => {
                if !val.is_string() {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{TRACEPARENT}' must be a string"
                    )));
                }
            }
            other => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{other}' is unexpected"
                )))
            }
        }
    }
    match exec {
        Some((key, name)) => Ok((name.to_string(), key == "exec-oob")),
        None => Err(QmpError::generic("QMP input lacks member 'execute'")),
    }
}

/// Decides what to do with one parsed input message.
pub fn handle(schema: &Schema, st: &mut SessionState, msg: Result<Value, String>) -> Action {
    let obj = match msg {
        Err(desc) => return Action::Reply(reply_err(&QmpError::generic(desc), None)),
        Ok(Value::Object(o)) => o,
        Ok(_) => {
            return Action::Reply(reply_err(
                &QmpError::generic("QMP input must be a JSON object"),
                None,
            ))
        }
    };
    let id = obj.get("id").cloned();
    let fail = |e: QmpError, st: &SessionState| {
        let e = if !st.negotiated && e.class == ErrorClass::CommandNotFound {
            QmpError::with_class(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            )
        } else {
            e
        };
        Action::Reply(reply_err(&e, id.clone()))
    };
    let (name, is_oob) = match check_obj(&obj, st.oob) {
        Ok(x) => x,
        Err(e) => return fail(e, st),
    };
    let known = schema
        .command(&name)
        .filter(|_| st.negotiated || name == "qmp_capabilities");
    let Some(cmd) = known else {
        return fail(
            QmpError::with_class(
                ErrorClass::CommandNotFound,
                format!("The command {name} has not been found"),
            ),
            st,
        );
    };
    if is_oob {
        // No rsd command is OOB-capable, as in QSD.
        return fail(
            QmpError::generic(format!("The command {name} does not support OOB")),
            st,
        );
    }
    let empty = Map::new();
    let raw_args = obj
        .get("arguments")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let args = match schema.validate_args(&cmd.args, raw_args, Input::Json) {
        Ok(a) => a,
        Err(e) => return fail(e, st),
    };
    if name == "qmp_capabilities" {
        if st.negotiated {
            return fail(
                QmpError::with_class(
                    ErrorClass::CommandNotFound,
                    "Capabilities negotiation is already complete, command ignored",
                ),
                st,
            );
        }
        st.negotiated = true;
        st.oob = args
            .get("enable")
            .and_then(Value::as_array)
            .is_some_and(|caps| caps.iter().any(|c| c == "oob"));
        return Action::Negotiated(reply_ok(Value::Object(Map::new()), id));
    }
    let traceparent = obj
        .get(TRACEPARENT)
        .and_then(Value::as_str)
        .map(str::to_string);
    Action::Execute {
        name,
        args,
        id,
        traceparent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::json::{to_qmp_string, JsonStreamer};

    /// Feeds raw bytes and returns the compact text of every immediate reply
    /// ("EXEC name" for commands that would be dispatched).
    fn run(st: &mut SessionState, input: &[u8]) -> Vec<String> {
        let schema = Schema::rsd(false);
        let mut js = JsonStreamer::new();
        js.feed(input)
            .into_iter()
            .map(|m| match handle(&schema, st, m) {
                Action::Reply(v) | Action::Negotiated(v) => to_qmp_string(&v, false),
                Action::Execute { name, .. } => format!("EXEC {name}"),
            })
            .collect()
    }

    #[test]
    fn negotiation_table() {
        let mut st = SessionState::default();
        let neg = r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#;
        assert_eq!(
            run(&mut st, br#"{"execute": "query-version", "id": 1}"#),
            [
                r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
            ]
        );
        assert_eq!(run(&mut st, br#"{"execute": "no-such-cmd"}"#), [neg]);
        assert_eq!(
            run(&mut st, br#"{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}, "id": "c1"}"#),
            [r#"{"id": "c1", "error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'bogus'"}}"#]
        );
        assert_eq!(
            run(
                &mut st,
                br#"{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}, "id": "c2"}"#
            ),
            [
                r#"{"id": "c2", "error": {"class": "GenericError", "desc": "Invalid parameter type for 'enable', expected: array"}}"#
            ]
        );
        assert_eq!(
            run(
                &mut st,
                br#"{"execute": "qmp_capabilities", "arguments": {"foo": 1}, "id": "c3"}"#
            ),
            [
                r#"{"id": "c3", "error": {"class": "GenericError", "desc": "Parameter 'foo' is unexpected"}}"#
            ]
        );
        assert_eq!(
            run(&mut st, br#"{"exec-oob": "query-version", "id": "o"}"#),
            [
                r#"{"id": "o", "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#
            ]
        );
        assert_eq!(
            run(&mut st, br#"{"execute": "qmp_capabilities", "id": "caps"}"#),
            [r#"{"return": {}, "id": "caps"}"#]
        );
        assert_eq!(
            run(
                &mut st,
                br#"{"execute": "qmp_capabilities", "id": "again"}"#
            ),
            [
                r#"{"id": "again", "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#
            ]
        );
    }

    #[test]
    fn request_validation_table() {
        let mut st = SessionState {
            negotiated: true,
            oob: false,
        };
        let g = |d: &str| format!(r#"{{"error": {{"class": "GenericError", "desc": "{d}"}}}}"#);
        let cases: &[(&[u8], String)] = &[
            (br#"{"execute": "no-such-cmd", "id": 7}"#,
             r#"{"id": 7, "error": {"class": "CommandNotFound", "desc": "The command no-such-cmd has not been found"}}"#.into()),
            (br#"{"arguments": {}, "id": 8}"#,
             r#"{"id": 8, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#.into()),
            (b"{}", g("QMP input lacks member 'execute'")),
            (br#"{"execute": 1}"#, g("QMP input member 'execute' must be a string")),
            (br#"{"execute": "query-version", "foo": 1}"#, g("QMP input member 'foo' is unexpected")),
            (br#"{"execute": "query-version", "arguments": [1]}"#, g("QMP input member 'arguments' must be an object")),
            (br#"{"execute": "query-version", "arguments": null}"#, g("QMP input member 'arguments' must be an object")),
            (br#"{"execute": "query-version", "arguments": {}}"#, "EXEC query-version".into()),
            (br#"{"execute": "query-version", "arguments": {"x": 1}}"#, g("Parameter 'x' is unexpected")),
            (br#"[1, 2]"#, g("QMP input must be a JSON object")),
            (br#""query-version""#, g("QMP input must be a JSON object")),
            (b"123\n", g("QMP input must be a JSON object")),
            (br#"{"execute": }"#, g("JSON parse error, expecting value")),
            (br#"{"execute": "query-version", "id": 1, "id": 2}"#, g("JSON parse error, duplicate key")),
            (b"{'execute': 'query-version'}", "EXEC query-version".into()),
            (br#"{"execute": "query-version", "__org.rsd_traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#,
             "EXEC query-version".into()),
            (br#"{"execute": "query-version", "__org.rsd_traceparent": "junk"}"#, "EXEC query-version".into()),
            (br#"{"execute": "query-version", "__org.rsd_traceparent": 1}"#,
             g("QMP input member '__org.rsd_traceparent' must be a string")),
            (br#"{"execute": "query-version", "__org.rsd_traceparentx": "x"}"#,
             g("QMP input member '__org.rsd_traceparentx' is unexpected")),
            (br#"{"execute": "qom-get", "arguments": {"path": 1, "property": "x"}}"#,
             g("Invalid parameter type for 'path', expected: string")),
            (br#"{"execute": "object-del", "id": "m"}"#,
             r#"{"id": "m", "error": {"class": "GenericError", "desc": "Parameter 'id' is missing"}}"#.into()),
        ];
        for (input, want) in cases {
            assert_eq!(
                run(&mut st, input),
                std::slice::from_ref(want),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn oob_rules() {
        let mut st = SessionState::default();
        run(
            &mut st,
            br#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#,
        );
        assert!(st.oob);
        assert_eq!(
            run(&mut st, br#"{"exec-oob": "query-version", "id": "o1"}"#),
            [
                r#"{"id": "o1", "error": {"class": "GenericError", "desc": "The command query-version does not support OOB"}}"#
            ]
        );
        assert_eq!(
            run(&mut st, br#"{"exec-oob": "nope", "id": "o3"}"#),
            [
                r#"{"id": "o3", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#
            ]
        );
        assert_eq!(
            run(
                &mut st,
                br#"{"execute": "query-version", "exec-oob": "query-version", "id": "o2"}"#
            ),
            [
                r#"{"id": "o2", "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#
            ]
        );
    }
}
