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

/// Why a path named no single node.
enum Unresolved {
    NotFound,
    /// A partial path that more than one node ends with.
    Ambiguous,
}

impl ControlState {
    /// Every node below the root, as its path components.
    fn qom_paths(&self) -> Vec<Vec<String>> {
        let mut all: Vec<Vec<String>> = ["objects", "chardevs", "backend"]
            .iter()
            .map(|c| vec![c.to_string()])
            .collect();
        all.extend(
            self.objects
                .keys()
                .map(|id| vec!["objects".into(), id.clone()]),
        );
        all.extend(
            self.chardevs
                .iter()
                .map(|(id, _)| vec!["chardevs".into(), id.clone()]),
        );
        all
    }

    /// QOM's path resolution: an absolute path (`/objects/io1`) names a
    /// node from the root; a partial one (`io1`, `objects/io1`) names the
    /// one node whose path ends with it.
    fn resolve_path(&self, path: &str) -> Result<Node, Unresolved> {
        if path.is_empty() {
            // "" ends every path.
            return Err(Unresolved::Ambiguous);
        }
        // Empty components are skipped, as QEMU does.
        let absolute = path.starts_with('/');
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return Ok(Node::Root);
        }
        let found: Vec<Vec<String>> = self
            .qom_paths()
            .into_iter()
            .filter(|p| {
                let tail = if absolute {
                    (p.len() == parts.len()).then_some(&p[..])
                } else {
                    p.get(p.len().saturating_sub(parts.len())..)
                        .filter(|t| t.len() == parts.len())
                };
                tail.is_some_and(|t| t.iter().zip(&parts).all(|(a, b)| a == b))
            })
            .collect();
        match found.as_slice() {
            [] => Err(Unresolved::NotFound),
            [one] => Ok(match one.as_slice() {
                [c] if c == "objects" => Node::Container("objects"),
                [c] if c == "chardevs" => Node::Container("chardevs"),
                [_] => Node::Container("backend"),
                [c, id] if c == "objects" => Node::Object(id.clone()),
                [_, id] => Node::Chardev(id.clone()),
                _ => return Err(Unresolved::NotFound),
            }),
            _ => Err(Unresolved::Ambiguous),
        }
    }

    /// qom-get and qom-set report an ambiguous path as not found (QEMU's
    /// words); qom-list says it is ambiguous.
    fn resolve(&self, path: &str) -> QmpResult<Node> {
        self.resolve_path(path).map_err(|_| not_found(path))
    }

    pub(super) async fn qom_list(&self, path: &str) -> QmpResult<Value> {
        let ty = ("type".to_string(), "string".to_string());
        let node = self.resolve_path(path).map_err(|e| match e {
            Unresolved::NotFound => not_found(path),
            Unresolved::Ambiguous => QmpError::generic(format!("Path '{path}' is ambiguous")),
        })?;
        Ok(match node {
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
