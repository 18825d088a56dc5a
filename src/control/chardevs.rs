//! chardev-add, chardev-remove, query-chardev and their command-line form.
use std::sync::Arc;

use actors::{ChildSpec, Restart};
use ractor::ActorRef;
use serde_json::{json, Map, Value};

use super::{arg_str, ChardevEntry, ControlState};
use crate::chardev::{self, Backend, ChardevActor, ChardevMsg};
use crate::qapi::error::QmpResult;
use crate::qapi::QmpError;

/// The registry name (and supervisor child id) of a chardev's actor.
pub use crate::chardev::actor::registry_name as chardev_name;

/// QOM type and `addr` property of a chardev, from its backend arguments.
fn describe(backend: &Map<String, Value>) -> (&'static str, Option<Value>) {
    let kind = arg_str(backend, "type");
    let qom_type = match kind {
        "socket" => "chardev-socket",
        "null" => "chardev-null",
        "stdio" => "chardev-stdio",
        "file" => "chardev-file",
        "ringbuf" => "chardev-ringbuf",
        "memory" => "chardev-memory",
        _ => "chardev",
    };
    let addr = backend
        .get("data")
        .and_then(|d| d.get("addr"))
        .and_then(|a| {
            // SocketAddressLegacy {type, data:{..}} -> flat SocketAddress.
            let mut flat = a.get("data")?.as_object()?.clone();
            flat.insert("type".into(), a.get("type")?.clone());
            Some(Value::Object(flat))
        });
    (qom_type, addr)
}

impl ControlState {
    fn has_chardev(&self, id: &str) -> bool {
        self.chardevs.iter().any(|(i, _)| i == id)
    }

    async fn open_and_start(
        &mut self,
        id: String,
        backend: &Map<String, Value>,
        notice_prefix: Option<String>,
    ) -> Result<(), String> {
        let notice = move |msg: &str| {
            if let Some(p) = &notice_prefix {
                eprintln!("{p}: {msg}");
            }
        };
        let opened = Arc::new(chardev::open(backend, &notice).await?);
        let spec = ChildSpec::actor(
            chardev_name(&id),
            Restart::Permanent,
            ChardevActor,
            opened.clone(),
        );
        if let Err(e) = actors::supervisor::start_child(&self.ctx.supervisor, spec).await {
            opened.cleanup();
            return Err(e);
        }
        let (qom_type, addr) = describe(backend);
        self.chardevs.push((
            id,
            ChardevEntry {
                backend: opened,
                qom_type,
                addr,
                has_monitor: false,
            },
        ));
        Ok(())
    }

    pub(super) async fn chardev_add(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let id = arg_str(args, "id").to_string();
        if self.has_chardev(&id) {
            return Err(QmpError::generic(format!(
                "Chardev with id '{id}' already exists"
            )));
        }
        let empty = Map::new();
        let backend = args
            .get("backend")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        self.open_and_start(id.clone(), backend, None)
            .await
            .map_err(|e| QmpError::generic(format!("Failed to add chardev '{id}': {e}")))?;
        Ok(json!({}))
    }

    pub(super) async fn add_chardev_cli(
        &mut self,
        id: String,
        backend: Map<String, Value>,
        prefix: String,
    ) -> Result<(), String> {
        if self.has_chardev(&id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        self.open_and_start(id, &backend, Some(prefix)).await
    }

    pub(super) async fn chardev_remove(&mut self, id: &str) -> QmpResult<Value> {
        let Some(pos) = self.chardevs.iter().position(|(i, _)| i == id) else {
            return Err(QmpError::generic(format!("Chardev '{id}' not found")));
        };
        if self.chardevs[pos].1.has_monitor {
            return Err(QmpError::generic(format!("Chardev '{id}' is busy")));
        }
        let (_, entry) = self.chardevs.remove(pos);
        actors::supervisor::stop_child_by_id(&self.ctx.supervisor, &chardev_name(id)).await;
        entry.backend.cleanup();
        Ok(json!({}))
    }

    /// (filename, frontend-open) of one chardev, asked of its actor.
    async fn chardev_info(id: &str, backend: &Backend) -> (String, bool) {
        let actor: Option<ActorRef<ChardevMsg>> =
            ractor::registry::where_is(chardev_name(id)).map(Into::into);
        match actor {
            Some(a) => {
                ractor::call!(a, ChardevMsg::Info).unwrap_or((backend.filename(None), false))
            }
            None => (backend.filename(None), false),
        }
    }

    pub(super) async fn query_chardev(&self) -> QmpResult<Value> {
        let mut out = Vec::new();
        for (id, entry) in &self.chardevs {
            let (filename, open) = Self::chardev_info(id, &entry.backend).await;
            out.push(json!({"label": id, "filename": filename, "frontend-open": open}));
        }
        Ok(Value::Array(out))
    }

    /// For qom: the chardevs' ids and QOM types, and one chardev's props.
    pub(super) fn chardev_children(&self) -> Vec<(String, String)> {
        self.chardevs
            .iter()
            .map(|(id, e)| (id.clone(), format!("child<{}>", e.qom_type)))
            .collect()
    }

    pub(super) async fn chardev_props(&self, id: &str) -> Option<Vec<(String, String, Value)>> {
        let (_, e) = self.chardevs.iter().find(|(i, _)| i == id)?;
        let mut props = vec![("type".to_string(), "string".to_string(), json!(e.qom_type))];
        if let Some(addr) = &e.addr {
            let (filename, _) = Self::chardev_info(id, &e.backend).await;
            let connected = !filename.starts_with("disconnected:");
            props.push(("connected".into(), "bool".into(), json!(connected)));
            props.push(("addr".into(), "SocketAddress".into(), addr.clone()));
        }
        Some(props)
    }
}

/// ringbuf-write, ringbuf-read, chardev-send-break and chardev-change.
impl ControlState {
    fn ringbuf(&self, device: &str) -> QmpResult<&chardev::ringbuf::Ringbuf> {
        match self.chardevs.iter().find(|(i, _)| i == device) {
            None => Err(QmpError::generic(format!("Device '{device}' not found"))),
            Some((_, e)) => match e.backend.as_ref() {
                Backend::Ringbuf(r, _) => Ok(r),
                _ => Err(QmpError::generic(format!(
                    "{device} is not a ringbuf device"
                ))),
            },
        }
    }

    pub(super) fn ringbuf_write(&self, args: &Map<String, Value>) -> QmpResult<Value> {
        let ring = self.ringbuf(arg_str(args, "device"))?;
        let data = arg_str(args, "data");
        let bytes = if arg_str(args, "format") == "base64" {
            chardev::ringbuf::base64_decode(data).map_err(QmpError::generic)?
        } else {
            chardev::ringbuf::utf8_bytes(data)
        };
        ring.write(&bytes);
        Ok(json!({}))
    }

    pub(super) fn ringbuf_read(&self, args: &Map<String, Value>) -> QmpResult<Value> {
        let ring = self.ringbuf(arg_str(args, "device"))?;
        let size = args.get("size").and_then(Value::as_i64).unwrap_or(0);
        if size <= 0 {
            return Err(QmpError::generic("size must be greater than zero"));
        }
        let bytes = ring.read(size as u64);
        Ok(Value::String(if arg_str(args, "format") == "base64" {
            chardev::ringbuf::base64_encode(&bytes)
        } else {
            chardev::ringbuf::utf8_text(&bytes)
        }))
    }

    /// A break means something only to a telnet socket's peer, which rsd
    /// does not speak; QSD answers every chardev the same way.
    pub(super) fn chardev_send_break(&self, id: &str) -> QmpResult<Value> {
        if self.has_chardev(id) {
            Ok(json!({}))
        } else {
            Err(QmpError::generic(format!("Chardev '{id}' not found")))
        }
    }

    /// QSD's chardev-change: a chardev without a frontend is removed and
    /// added again with the new backend (a failure leaves it removed, as
    /// in QSD); a monitor cannot follow a swap.
    pub(super) async fn chardev_change(&mut self, args: &Map<String, Value>) -> QmpResult<Value> {
        let id = arg_str(args, "id");
        let Some((_, entry)) = self.chardevs.iter().find(|(i, _)| i == id) else {
            return Err(QmpError::generic(format!("Chardev '{id}' does not exist")));
        };
        if entry.has_monitor {
            return Err(QmpError::generic(
                "Chardev user does not support chardev hotswap",
            ));
        }
        self.chardev_remove(id).await?;
        self.chardev_add(args).await
    }
}
