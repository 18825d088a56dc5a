//! The `tls-creds-x509` object: a directory of PEM files loaded once at
//! object-add, in QEMU's order and with its messages, into a rustls
//! configuration for one endpoint (a server or a client).
//!
//! Server: ca-cert.pem, server-cert.pem and server-key.pem, ca-crl.pem
//! if present. Client: ca-cert.pem, and client-cert.pem with
//! client-key.pem if present. dh-params.pem is not read: rustls has no
//! finite-field Diffie-Hellman (its key exchanges are ECDHE).
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Map, Value};

use super::pem;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Endpoint {
    Client,
    Server,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Client => "client",
            Endpoint::Server => "server",
        }
    }
}

/// What a loaded object gives its users.
#[derive(Clone)]
pub enum Loaded {
    Server(Arc<rustls::ServerConfig>),
    Client(Arc<rustls::ClientConfig>),
}

pub struct TlsCreds {
    /// As loaded; later qom-sets change only what qom-get shows, as in
    /// QEMU (which reads the directory once).
    pub endpoint: Endpoint,
    pub verify_peer: bool,
    pub loaded: Loaded,
    /// The properties as given (qom-get reads them).
    props: Map<String, Value>,
}

/// Properties qom-list shows, in QSD's order.
pub const QOM_PROPERTIES: &[(&str, &str)] = &[
    ("endpoint", "QCryptoTLSCredsEndpoint"),
    ("dir", "string"),
    ("verify-peer", "bool"),
    ("priority", "string"),
    ("sanity-check", "bool"),
    ("passwordid", "string"),
];

/// `dir/name`, checked as QEMU's qcrypto_tls_creds_get_path: a missing
/// optional file is None; any other failure to stat is an error.
fn cred_path(dir: Option<&str>, name: &str, required: bool) -> Result<Option<String>, String> {
    let Some(dir) = dir else {
        return if required {
            Err("Missing 'dir' property value".into())
        } else {
            Ok(None)
        };
    };
    let path = format!("{dir}/{name}");
    match std::fs::metadata(&path) {
        Ok(_) => Ok(Some(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
        Err(e) => Err(format!(
            "Unable to access credentials {path}: {}",
            crate::util::os_msg(&e)
        )),
    }
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("Unable to read {path}: {}", crate::util::os_msg(&e)))
}

/// The certificate chain and key of an endpoint, in QEMU's words when
/// they cannot be used. The key's bytes never reach a message.
fn cert_and_key(
    cert: &str,
    key: &str,
    password: bool,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let fail = |why: &str| format!("Cannot load certificate '{cert}' & key '{key}': {why}");
    let chain = pem::chain(&read(cert)?).map_err(|e| fail(&e))?;
    let key_text = read(key)?;
    if pem::is_encrypted_key(&key_text) {
        let why = if password {
            "rsd cannot decrypt private keys (passwordid); give the key unencrypted"
        } else {
            "The key is encrypted and no password was given (passwordid)"
        };
        return Err(fail(why));
    }
    let key_der = pem::key(&key_text).map_err(|e| fail(&e))?;
    // A key that does not belong to the certificate is refused here,
    // not at the first client.
    rustls::sign::CertifiedKey::from_der(chain.clone(), key_der.clone_key(), &super::provider())
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                fail("The certificate and the given key do not match.")
            }
            _ => fail("The requested data were not available."),
        })?;
    Ok((chain, key_der))
}

impl TlsCreds {
    /// Loads the object from validated object-add properties.
    /// `secret_exists` answers whether a secret object has that id.
    pub fn load(
        props: &Map<String, Value>,
        secret_exists: &dyn Fn(&str) -> bool,
    ) -> Result<TlsCreds, String> {
        let s = |k: &str| props.get(k).and_then(Value::as_str);
        let b = |k: &str, d: bool| props.get(k).and_then(Value::as_bool).unwrap_or(d);
        let endpoint = if s("endpoint") == Some("server") {
            Endpoint::Server
        } else {
            Endpoint::Client
        };
        let verify_peer = b("verify-peer", true);
        let dir = s("dir");
        let server = endpoint == Endpoint::Server;
        let ca = cred_path(dir, "ca-cert.pem", true)?.unwrap_or_default();
        let (crl, cert, key) = if server {
            let crl = cred_path(dir, "ca-crl.pem", false)?;
            let cert = cred_path(dir, "server-cert.pem", true)?;
            let key = cred_path(dir, "server-key.pem", true)?;
            cred_path(dir, "dh-params.pem", false)?;
            (crl, cert, key)
        } else {
            let cert = cred_path(dir, "client-cert.pem", false)?;
            let key = cred_path(dir, "client-key.pem", false)?;
            (None, cert, key)
        };
        if b("sanity-check", true) {
            super::sanity::check(server, &ca, cert.as_deref())?;
        }
        let mut roots = rustls::RootCertStore::empty();
        let ca_certs = pem::certs(&read(&ca)?)
            .map_err(|why| format!("Cannot load CA certificate '{ca}': {why}"))?;
        for c in ca_certs {
            roots
                .add(c)
                .map_err(|e| format!("Cannot load CA certificate '{ca}': {e}"))?;
        }
        let password = s("passwordid");
        let identity = match (cert.as_deref(), key.as_deref()) {
            (Some(c), Some(k)) => {
                // As QEMU: the password's secret is looked up only when
                // there is a key to use it on.
                if let Some(id) = password.filter(|id| !secret_exists(id)) {
                    return Err(format!("No secret with id '{id}'"));
                }
                Some(cert_and_key(c, k, password.is_some())?)
            }
            _ => None,
        };
        let crls = match crl {
            Some(p) => {
                pem::crls(&read(&p)?).map_err(|why| format!("Cannot load CRL '{p}': {why}"))?
            }
            None => Vec::new(),
        };
        let loaded = if server {
            let (chain, key) = identity.ok_or("Missing 'dir' property value")?;
            Loaded::Server(super::session::server_config(
                roots,
                crls,
                verify_peer,
                chain,
                key,
                &ca,
            )?)
        } else {
            Loaded::Client(super::session::client_config(
                roots,
                verify_peer,
                identity,
                &ca,
            )?)
        };
        Ok(TlsCreds {
            endpoint,
            verify_peer,
            loaded,
            props: props.clone(),
        })
    }

    pub fn get(&self, prop: &str) -> Option<Value> {
        let s = |k: &str| json!(self.props.get(k).and_then(Value::as_str).unwrap_or(""));
        let b = |k: &str, d: bool| json!(self.props.get(k).and_then(Value::as_bool).unwrap_or(d));
        Some(match prop {
            "endpoint" => json!(self
                .props
                .get("endpoint")
                .and_then(Value::as_str)
                .unwrap_or("client")),
            "dir" | "priority" | "passwordid" => s(prop),
            "verify-peer" => b(prop, true),
            "sanity-check" => b(prop, true),
            _ => return None,
        })
    }

    /// qom-set: kept for qom-get; the loaded files do not change.
    pub fn set(&mut self, prop: &str, value: &Value) -> Result<(), String> {
        let type_err = |t: &str| format!("Invalid parameter type for '{prop}', expected: {t}");
        match prop {
            "dir" | "priority" | "passwordid" => {
                value.as_str().ok_or_else(|| type_err("string"))?;
            }
            "verify-peer" | "sanity-check" => {
                value.as_bool().ok_or_else(|| type_err("boolean"))?;
            }
            "endpoint" => match value.as_str() {
                Some("client" | "server") => {}
                Some(v) => return Err(format!("Parameter 'endpoint' does not accept value '{v}'")),
                None => return Err(type_err("string")),
            },
            _ => return Err(format!("Property 'tls-creds-x509.{prop}' not found")),
        }
        self.props.insert(prop.to_string(), value.clone());
        Ok(())
    }
}
