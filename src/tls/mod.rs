//! TLS for NBD: `tls-creds-x509` objects (`creds`, checked as QEMU's
//! sanity check does in `sanity`), sessions on rustls (`session`), and
//! the X.509 fields rsd reads itself (`der`: validity, extensions and
//! the subject as GnuTLS prints it, which authz objects match).
//! `tls-creds-psk` and `tls-creds-anon` are refused: rustls has neither
//! pre-shared keys nor anonymous TLS.
pub mod creds;
pub mod der;
pub mod pem;
pub mod sanity;
pub mod session;

pub use creds::{Endpoint, Loaded, TlsCreds};
pub use session::provider;
