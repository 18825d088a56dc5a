//! PEM files as QEMU's credentials directory holds them, with GnuTLS's
//! words for what cannot be read. Key material is never printed.
use rustls::pki_types::pem::{Error as PemError, PemObject};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

fn reason(e: &PemError) -> String {
    match e {
        PemError::Base64Decode(_) => "Base64 decoding error.".into(),
        _ => "Base64 unexpected header error.".into(),
    }
}

/// Every CERTIFICATE block, in order.
pub fn certs(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| reason(&e))
}

/// The certificate chain of a cert file: at least one certificate.
pub fn chain(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    match certs(text) {
        Ok(v) if !v.is_empty() => Ok(v),
        Ok(_) => Err("Base64 decoding error.".into()),
        Err(e) => Err(e),
    }
}

/// Whether a key file holds an encrypted private key.
pub fn is_encrypted_key(text: &[u8]) -> bool {
    let t = String::from_utf8_lossy(text);
    t.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") || t.contains("Proc-Type: 4,ENCRYPTED")
}

/// The first private key (PKCS#1, PKCS#8 or SEC1).
pub fn key(text: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(text).map_err(|_| "The requested data were not available.".into())
}

/// Every X509 CRL block.
pub fn crls(text: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    CertificateRevocationListDer::pem_slice_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| reason(&e))
}
