//! QEMU's sanity check of a credentials directory (`sanity-check`, on by
//! default): the certificate and the CA certificates must be in their
//! validity period, have the basic constraints, key usage and purpose
//! their role needs, and the certificate must chain to a CA. The
//! messages are QEMU's.
use rustls::pki_types::{CertificateDer, UnixTime};

use super::der::{self, CertFacts};
use super::pem;

/// The most CA certificates QEMU reads from ca-cert.pem.
const MAX_CA_CERTS: usize = 16;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn readable(path: &str) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::R_OK).is_ok()
}

fn role(is_server: bool) -> &'static str {
    if is_server {
        "server"
    } else {
        "client"
    }
}

fn check_times(c: &CertFacts, file: &str, is_server: bool, is_ca: bool) -> Result<(), String> {
    let who = if is_ca { "CA" } else { role(is_server) };
    let t = now();
    if c.not_after < t {
        return Err(format!("The {who} certificate {file} has expired"));
    }
    if c.not_before > t {
        return Err(format!("The {who} certificate {file} is not yet active"));
    }
    Ok(())
}

fn check_constraints(
    c: &CertFacts,
    file: &str,
    is_server: bool,
    is_ca: bool,
) -> Result<(), String> {
    match (c.ca, is_ca) {
        (Some(true), false) => Err(format!(
            "The certificate {file} basic constraints show a CA, but we need one for a {}",
            role(is_server)
        )),
        (Some(false), true) => Err(format!(
            "The certificate {file} basic constraints do not show a CA"
        )),
        (None, true) => Err(format!(
            "The certificate {file} is missing basic constraints for a CA"
        )),
        _ => Ok(()),
    }
}

fn check_usage(c: &CertFacts, file: &str, is_ca: bool) -> Result<(), String> {
    let Some((usage, critical)) = c.key_usage else {
        return Ok(());
    };
    if !critical {
        return Ok(());
    }
    if is_ca {
        if usage & der::KU_KEY_CERT_SIGN == 0 {
            return Err(format!(
                "Certificate {file} usage does not permit certificate signing"
            ));
        }
    } else {
        if usage & der::KU_DIGITAL_SIGNATURE == 0 {
            return Err(format!(
                "Certificate {file} usage does not permit digital signature"
            ));
        }
        if usage & der::KU_KEY_ENCIPHERMENT == 0 {
            return Err(format!(
                "Certificate {file} usage does not permit key encipherment"
            ));
        }
    }
    Ok(())
}

fn check_purpose(c: &CertFacts, file: &str, is_server: bool) -> Result<(), String> {
    let Some((purposes, critical)) = &c.purposes else {
        return Ok(());
    };
    let has = |p: &str| purposes.iter().any(|x| x == p || x == der::KP_ANY);
    let wanted = if is_server {
        der::KP_SERVER
    } else {
        der::KP_CLIENT
    };
    if *critical && !has(wanted) {
        return Err(format!(
            "Certificate {file} purpose does not allow use with a TLS {}",
            role(is_server)
        ));
    }
    Ok(())
}

/// The certificate must be signed by one of the CA certificates.
fn check_pair(
    cert: &CertificateDer<'static>,
    file: &str,
    cas: &[CertificateDer<'static>],
    ca_file: &str,
    is_server: bool,
) -> Result<(), String> {
    let fail = |why: &str| {
        format!("Our own certificate {file} failed validation against {ca_file}: {why}")
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        // A CA webpki cannot take as an anchor is as good as none.
        let _ = roots.add(ca.clone());
    }
    if roots.is_empty() {
        return Err(fail("The certificate hasn't got a known issuer"));
    }
    let provider = super::provider();
    let algs = provider.signature_verification_algorithms;
    let result = if is_server {
        let parsed = rustls::server::ParsedCertificate::try_from(cert)
            .map_err(|e| fail(&super::session::cert_reason(&e)))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            UnixTime::now(),
            algs.all,
        )
    } else {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .map_err(|e| fail(&e.to_string()))?;
        verifier
            .verify_client_cert(cert, &[], UnixTime::now())
            .map(|_| ())
    };
    result.map_err(|e| fail(&super::session::cert_reason(&e)))
}

/// Runs QEMU's checks on the files present.
pub fn check(is_server: bool, ca_file: &str, cert_file: Option<&str>) -> Result<(), String> {
    let mut cert = None;
    if let Some(f) = cert_file.filter(|f| readable(f)) {
        let text = std::fs::read(f)
            .map_err(|e| format!("Cannot load CA cert list {f}: {}", crate::util::os_msg(&e)))?;
        let first = pem::certs(&text)
            .map_err(|why| {
                format!(
                    "Unable to import {} certificate {f}: {why}",
                    role(is_server)
                )
            })?
            .into_iter()
            .next();
        let Some(der) = first else {
            return Err(format!(
                "Unable to import {} certificate {f}: Base64 unexpected header error.",
                role(is_server)
            ));
        };
        let facts = CertFacts::parse(&der).ok_or_else(|| {
            format!(
                "Unable to import {} certificate {f}: ASN1 parser: Error in DER parsing.",
                role(is_server)
            )
        })?;
        cert = Some((der, facts, f));
    }
    let mut cas = Vec::new();
    if readable(ca_file) {
        let bad = || format!("Unable to import CA certificate list {ca_file}");
        let text = std::fs::read(ca_file).map_err(|_| bad())?;
        let list = pem::certs(&text).map_err(|_| bad())?;
        if list.is_empty() || list.len() > MAX_CA_CERTS {
            return Err(bad());
        }
        for der in list {
            let facts = CertFacts::parse(&der).ok_or_else(bad)?;
            cas.push((der, facts));
        }
    }
    if let Some((_, c, f)) = &cert {
        check_times(c, f, is_server, false)?;
        check_constraints(c, f, is_server, false)?;
        check_usage(c, f, false)?;
        check_purpose(c, f, is_server)?;
    }
    for (_, c) in &cas {
        check_times(c, ca_file, is_server, true)?;
        check_constraints(c, ca_file, is_server, true)?;
        check_usage(c, ca_file, true)?;
    }
    if let Some((der, _, f)) = &cert {
        if !cas.is_empty() {
            let ders: Vec<_> = cas.into_iter().map(|(d, _)| d).collect();
            check_pair(der, f, &ders, ca_file, is_server)?;
        }
    }
    Ok(())
}
