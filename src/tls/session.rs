//! TLS sessions on rustls (the ring provider): the configurations a
//! credentials object builds, the server's accept with QEMU's checks
//! after the handshake (a client certificate when verify-peer is on, its
//! distinguished name against the authz object), the client's connect
//! with the hostname check, and failures in QEMU's words.
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::objects::authz::AuthzIndex;

/// The one crypto provider rsd uses: ring, which builds with no system
/// packages (rustls marks it deprecated for lacking post-quantum key
/// exchange, which QEMU's GnuTLS peers do not offer by default either).
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static P: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> = std::sync::OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A certificate verification failure as GnuTLS words it in QEMU.
pub fn cert_reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            // GnuTLS says so too when a CA of the issuer's name did not
            // sign it.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "The certificate hasn't got a known issuer"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "The certificate has expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "The certificate is not yet activated"
            }
            CertificateError::Revoked => "The certificate has been revoked",
            CertificateError::UnsupportedSignatureAlgorithmContext { .. } => {
                "The certificate uses an insecure algorithm"
            }
            _ => "The certificate is not trusted",
        }
        .to_string(),
        other => other.to_string(),
    }
}

fn is_name_mismatch(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    )
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// A failed handshake in QEMU's words: certificate problems as its
/// checks say them, the rest as "TLS handshake failed".
fn handshake_failure(e: &std::io::Error, hostname: Option<&str>) -> String {
    match tls_error(e) {
        Some(t) if is_name_mismatch(t) => format!(
            "Certificate does not match the hostname {}",
            hostname.unwrap_or_default()
        ),
        Some(t @ rustls::Error::InvalidCertificate(_)) => cert_reason(t),
        Some(t) => format!("TLS handshake failed: {t}"),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "TLS handshake failed: The TLS connection was non-properly terminated.".into()
        }
        None => format!("TLS handshake failed: {}", crate::util::os_msg(e)),
    }
}

/// A read or write failure on a TLS channel, as QEMU's channel says it.
pub fn io_failure(e: &std::io::Error, reading: bool) -> String {
    let what = if reading {
        "Cannot read from TLS channel"
    } else {
        "Cannot write to TLS channel"
    };
    match tls_error(e) {
        Some(t) => format!("{what}: {t}"),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("{what}: The TLS connection was non-properly terminated.")
        }
        None => format!("{what}: {}", crate::util::os_msg(e)),
    }
}

pub fn server_config(
    roots: rustls::RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
    verify_peer: bool,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca_file: &str,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if verify_peer {
        // A client certificate is asked for but not required during the
        // handshake, as QEMU does; its absence is refused after it, with
        // QEMU's message.
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("Cannot load CA certificate '{ca_file}': {e}"))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    // NBD clients connect once: no resumption tickets to send.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

pub fn client_config(
    roots: rustls::RootCertStore,
    verify_peer: bool,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ca_file: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = if verify_peer {
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| format!("Cannot load CA certificate '{ca_file}': {e}"))?
    } else {
        Arc::new(AnyServer)
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let cfg = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// verify-peer=off on a client: any server certificate is taken, but
/// the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A server's TLS: its configuration and who may connect.
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub verify_peer: bool,
    /// The authz object's id (tls-authz), looked up at each client.
    pub authz: Option<String>,
    pub index: Arc<AuthzIndex>,
}

/// The server side of a handshake, then QEMU's checks of the client.
pub async fn accept<IO>(
    tls: &ServerTls,
    io: IO,
) -> Result<tokio_rustls::server::TlsStream<IO>, String>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let stream = tokio_rustls::TlsAcceptor::from(tls.config.clone())
        .accept(io)
        .await
        .map_err(|e| handshake_failure(&e, None))?;
    if tls.verify_peer {
        let (_, conn) = stream.get_ref();
        let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
            return Err("Verify failed: No certificate was found.".into());
        };
        let dn = super::der::subject_text(cert).ok_or(
            "Cannot get client distinguished name: The requested data were not available.",
        )?;
        if let Some(id) = &tls.authz {
            if !tls.index.check(id, &dn)? {
                return Err(format!("TLS x509 authz check for {dn} is denied"));
            }
        }
    }
    Ok(stream)
}

/// The client side: `hostname` is checked against the server's
/// certificate (QEMU's tls-hostname, or the host connected to).
pub async fn connect<IO>(
    config: &Arc<rustls::ClientConfig>,
    verify_peer: bool,
    hostname: Option<&str>,
    io: IO,
) -> Result<tokio_rustls::client::TlsStream<IO>, String>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    if verify_peer && hostname.is_none() {
        return Err("No hostname for certificate validation".into());
    }
    let host = hostname.unwrap_or("localhost");
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| format!("Certificate does not match the hostname {host}"))?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, io)
        .await
        .map_err(|e| handshake_failure(&e, hostname))
}

/// A writer whose writes are on the wire when they complete: rustls
/// keeps records it could not send yet, and the NBD reply path never
/// flushes (plain sockets need no flush), so each write flushes.
pub struct FlushingWriter<W> {
    inner: W,
    /// Bytes taken by the inner writer whose flush is still under way.
    taken: Option<usize>,
}

impl<W> FlushingWriter<W> {
    pub fn new(inner: W) -> Self {
        FlushingWriter { inner, taken: None }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for FlushingWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = &mut *self;
        if me.taken.is_none() {
            match Pin::new(&mut me.inner).poll_write(cx, buf) {
                Poll::Ready(Ok(n)) => me.taken = Some(n),
                other => return other,
            }
        }
        // The caller polls again with the same bytes until this is
        // ready; they were taken already, so only the flush goes on.
        match Pin::new(&mut me.inner).poll_flush(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(me.taken.take().unwrap_or(0))),
            Poll::Ready(Err(e)) => {
                me.taken = None;
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
