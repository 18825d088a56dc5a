//! qom-list, qom-get and qom-set over rsd's object tree:
//! `/` with the containers `objects`, `chardevs` and `backend`.
use serde_json::{json, Value};

use super::ControlState;
use crate::qapi::error::QmpResult;
use crate::qapi::{ErrorClass, QmpError};

/// A resolved QOM path.
enum Node {
    Root,
    Container(&'static str),
    Object(String),
    Chardev(String),
}

fn not_found(path: &str) -> QmpError {
    QmpError::with_class(
        ErrorClass::DeviceNotFound,
        format!("Device '{path}' not found"),
    )
}

fn prop_list(props: Vec<(String, String)>) -> Value {
    Value::Array(
        props
            .into_iter()
            .map(|(name, ty)| json!({"name": name, "type": ty}))
            .collect(),
    )
}

impl ControlState {
    fn resolve(&self, path: &str) -> QmpResult<Node> {
        if path.is_empty() {
            return Err(QmpError::generic("Path '' is ambiguous"));
        }
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let node = match parts.as_slice() {
            [] => Some(Node::Root),
            ["objects"] => Some(Node::Container("objects")),
            ["chardevs"] => Some(Node::Container("chardevs")),
            ["backend"] => Some(Node::Container("backend")),
            ["objects", id] if self.objects.contains_key(*id) => Some(Node::Object(id.to_string())),
            ["chardevs", id] if self.chardevs.iter().any(|(i, _)| i == id) => {
                Some(Node::Chardev(id.to_string()))
            }
            _ => None,
        };
        node.ok_or_else(|| not_found(path))
    }

    pub(super) async fn qom_list(&self, path: &str) -> QmpResult<Value> {
        let ty = ("type".to_string(), "string".to_string());
        Ok(match self.resolve(path)? {
            Node::Root => prop_list(vec![
                ty,
                ("backend".into(), "child<container>".into()),
                ("objects".into(), "child<container>".into()),
                ("chardevs".into(), "child<container>".into()),
            ]),
            Node::Container(which) => {
                let mut props = vec![ty];
                match which {
                    "objects" => props.extend(
                        self.objects
                            .iter()
                            .map(|(id, o)| (id.clone(), format!("child<{}>", o.qom_type()))),
                    ),
                    "chardevs" => props.extend(self.chardev_children()),
                    _ => {}
                }
                prop_list(props)
            }
            Node::Object(id) => prop_list(self.objects[&id].properties()),
            Node::Chardev(id) => prop_list(
                self.chardev_props(&id)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(n, t, _)| (n, t))
                    .collect(),
            ),
        })
    }

    pub(super) async fn qom_get(&self, path: &str, prop: &str) -> QmpResult<Value> {
        let missing = |ty: &str| QmpError::generic(format!("Property '{ty}.{prop}' not found"));
        match self.resolve(path)? {
            Node::Root | Node::Container(_) => match prop {
                "type" => Ok(json!("container")),
                _ => Err(missing("container")),
            },
            Node::Object(id) => {
                let o = &self.objects[&id];
                o.get(prop).ok_or_else(|| missing(o.qom_type()))
            }
            Node::Chardev(id) => {
                let props = self.chardev_props(&id).await.unwrap_or_default();
                let ty = props
                    .first()
                    .and_then(|(_, _, v)| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                props
                    .into_iter()
                    .find(|(n, _, _)| n == prop)
                    .map(|(_, _, v)| v)
                    .ok_or_else(|| missing(&ty))
            }
        }
    }

    pub(super) fn qom_set(&mut self, path: &str, prop: &str, value: &Value) -> QmpResult<()> {
        match self.resolve(path)? {
            Node::Object(id) => match self.objects.get_mut(&id) {
                Some(o) => o.set(prop, value).map_err(QmpError::generic),
                None => Err(not_found(path)),
            },
            Node::Root | Node::Container(_) => Err(QmpError::generic(if prop == "type" {
                "Property 'container.type' is not writable".to_string()
            } else {
                format!("Property 'container.{prop}' not found")
            })),
            Node::Chardev(_) => Err(QmpError::generic(format!(
                "Property '{prop}' is not writable"
            ))),
        }
    }
}
