//! The little of X.509 that rsd reads itself: a certificate's validity,
//! subject, issuer and the extensions QEMU's sanity check looks at, and
//! the subject as GnuTLS prints it (the identity authz objects match).
//! rustls verifies chains and signatures; this only reads fields.

/// One DER element: its tag, its contents and what follows it.
struct Tlv<'a> {
    tag: u8,
    body: &'a [u8],
    /// The whole element, header included.
    raw: &'a [u8],
}

/// Splits the first element off `input`.
fn next(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    let (body, after) = rest.split_at(len);
    Some((
        Tlv {
            tag,
            body,
            raw: &input[..header + len],
        },
        after,
    ))
}

/// The elements of a constructed value, in order.
fn children(body: &[u8]) -> Option<Vec<Tlv<'_>>> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (t, r) = next(rest)?;
        out.push(t);
        rest = r;
    }
    Some(out)
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;

/// An OID's dotted text.
fn oid_text(body: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut acc: u64 = 0;
    for &b in body {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first);
                arcs.push(acc - first * 40);
            } else {
                arcs.push(acc);
            }
            acc = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// What a certificate says about itself, for the sanity check.
pub struct CertFacts {
    /// Seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// The subject and issuer Names, DER-encoded whole.
    pub subject: Vec<u8>,
    pub issuer: Vec<u8>,
    /// basicConstraints: None when absent, else its cA flag.
    pub ca: Option<bool>,
    /// keyUsage bits (bit 0 = digitalSignature as in the DER bit
    /// string, first bit most significant) and criticality.
    pub key_usage: Option<(u16, bool)>,
    /// extendedKeyUsage purposes (dotted OIDs) and criticality.
    pub purposes: Option<(Vec<String>, bool)>,
}

pub const KU_DIGITAL_SIGNATURE: u16 = 1 << 0;
pub const KU_KEY_ENCIPHERMENT: u16 = 1 << 2;
pub const KU_KEY_CERT_SIGN: u16 = 1 << 5;

pub const KP_SERVER: &str = "1.3.6.1.5.5.7.3.1";
pub const KP_CLIENT: &str = "1.3.6.1.5.5.7.3.2";
pub const KP_ANY: &str = "2.5.29.37.0";

impl CertFacts {
    /// Parses a DER certificate; None if it is not one.
    pub fn parse(der: &[u8]) -> Option<CertFacts> {
        let (cert, _) = next(der)?;
        let parts = children(cert.body)?;
        let tbs = parts.first().filter(|t| t.tag == SEQUENCE)?;
        let mut fields = children(tbs.body)?.into_iter().peekable();
        // [0] version, optional.
        if fields.peek().is_some_and(|t| t.tag == 0xa0) {
            fields.next();
        }
        let _serial = fields.next()?;
        let _sig = fields.next()?;
        let issuer = fields.next()?;
        let validity = children(fields.next()?.body)?;
        let subject = fields.next()?;
        let _spki = fields.next()?;
        let mut facts = CertFacts {
            not_before: time(validity.first()?)?,
            not_after: time(validity.get(1)?)?,
            subject: subject.raw.to_vec(),
            issuer: issuer.raw.to_vec(),
            ca: None,
            key_usage: None,
            purposes: None,
        };
        for f in fields {
            if f.tag != 0xa3 {
                continue;
            }
            let (seq, _) = next(f.body)?;
            for ext in children(seq.body)? {
                facts.extension(&children(ext.body)?)?;
            }
        }
        Some(facts)
    }

    fn extension(&mut self, ext: &[Tlv<'_>]) -> Option<()> {
        let oid = oid_text(ext.first()?.body);
        let (critical, value) = match ext {
            [_, c, v] if c.tag == 0x01 => (c.body.first().is_some_and(|b| *b != 0), v),
            [_, v] => (false, v),
            _ => return None,
        };
        let (inner, _) = next(value.body)?;
        match oid.as_str() {
            "2.5.29.19" => {
                let items = children(inner.body)?;
                let ca = items
                    .first()
                    .filter(|t| t.tag == 0x01)
                    .is_some_and(|t| t.body.first().is_some_and(|b| *b != 0));
                self.ca = Some(ca);
            }
            "2.5.29.15" => {
                // A BIT STRING: unused-bit count, then the bits.
                let bits = inner.body.get(1..).unwrap_or_default();
                let mut usage = 0u16;
                for (i, byte) in bits.iter().take(2).enumerate() {
                    for b in 0..8 {
                        if byte & (0x80 >> b) != 0 {
                            usage |= 1 << (i * 8 + b);
                        }
                    }
                }
                self.key_usage = Some((usage, critical));
            }
            "2.5.29.37" => {
                let oids = children(inner.body)?
                    .iter()
                    .map(|t| oid_text(t.body))
                    .collect();
                self.purposes = Some((oids, critical));
            }
            _ => {}
        }
        Some(())
    }
}

/// UTCTime or GeneralizedTime (UTC, "Z") as seconds since the epoch.
fn time(t: &Tlv<'_>) -> Option<i64> {
    let s = std::str::from_utf8(t.body).ok()?;
    let s = s.strip_suffix('Z')?;
    let (year, rest) = match t.tag {
        0x17 => {
            let yy: i64 = s.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| rest.get(r).and_then(|v| v.parse::<i64>().ok());
    let (mo, d, h, mi) = (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?);
    let sec = num(8..10).unwrap_or(0);
    Some(days_from_civil(year, mo, d) * 86400 + h * 3600 + mi * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// The short names GnuTLS prints for attribute types; others print as
/// their dotted OID with the value in hex.
fn attr_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "surName",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.15" => "businessCategory",
        "2.5.4.17" => "postalCode",
        "2.5.4.41" => "name",
        "2.5.4.42" => "givenName",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "EMAIL",
        _ => return None,
    })
}

/// A string value's text, for the string types a Name uses.
fn string_value(t: &Tlv<'_>) -> Option<String> {
    match t.tag {
        // UTF8, Numeric, Printable, Teletex, IA5, Visible.
        0x0c | 0x12 | 0x13 | 0x14 | 0x16 | 0x1a => {
            Some(String::from_utf8_lossy(t.body).into_owned())
        }
        // BMPString: UTF-16BE.
        0x1e => {
            let units: Vec<u16> = t
                .body
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            Some(String::from_utf16_lossy(&units))
        }
        // UniversalString: UTF-32BE.
        0x1c => Some(
            t.body
                .chunks_exact(4)
                .map(|c| {
                    char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                        .unwrap_or('\u{fffd}')
                })
                .collect(),
        ),
        _ => None,
    }
}

/// RFC 4514 escaping as GnuTLS does it.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A DER Name as GnuTLS's gnutls_x509_crt_get_dn prints it: the RDNs in
/// the order they are encoded, joined by ',', the values of a
/// multi-valued RDN joined by '+'.
pub fn dn_text(name: &[u8]) -> Option<String> {
    let (seq, _) = next(name)?;
    let mut rdns = Vec::new();
    for rdn in children(seq.body)? {
        if rdn.tag != SET {
            return None;
        }
        let mut avas = Vec::new();
        for ava in children(rdn.body)? {
            let parts = children(ava.body)?;
            let (oid, value) = (parts.first()?, parts.get(1)?);
            let oid = oid_text(oid.body);
            let text = match (attr_name(&oid), string_value(value)) {
                (Some(n), Some(v)) => format!("{n}={}", escape(&v)),
                (n, _) => {
                    let hex: String = value.raw.iter().map(|b| format!("{b:02x}")).collect();
                    format!("{}=#{hex}", n.unwrap_or(&oid))
                }
            };
            avas.push(text);
        }
        rdns.push(avas.join("+"));
    }
    Some(rdns.join(","))
}

/// A certificate's subject as GnuTLS prints it.
pub fn subject_text(cert_der: &[u8]) -> Option<String> {
    dn_text(&CertFacts::parse(cert_der)?.subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One attribute: (OID body, value tag, value).
    type Ava<'a> = (&'a [u8], u8, &'a [u8]);

    /// A Name with one RDN per slice of attributes.
    fn name(rdns: &[&[Ava<'_>]]) -> Vec<u8> {
        fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
            let mut v = vec![tag, body.len() as u8];
            v.extend_from_slice(body);
            v
        }
        let mut seq = Vec::new();
        for rdn in rdns {
            let mut set = Vec::new();
            for (oid, tag, val) in rdn.iter() {
                let mut ava = tlv(0x06, oid);
                ava.extend(tlv(*tag, val));
                set.extend(tlv(SEQUENCE, &ava));
            }
            seq.extend(tlv(SET, &set));
        }
        tlv(SEQUENCE, &seq)
    }

    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const O: &[u8] = &[0x55, 0x04, 0x0a];
    const OU: &[u8] = &[0x55, 0x04, 0x0b];

    #[test]
    fn dn_in_encoding_order_with_gnutls_escapes() {
        let n = name(&[&[(O, 0x13, b"Acme, Inc.")], &[(CN, 0x0c, b"client1")]]);
        assert_eq!(dn_text(&n).as_deref(), Some("O=Acme\\, Inc.,CN=client1"));
        let n = name(&[
            &[(OU, 0x0c, b"A"), (OU, 0x0c, b"B")],
            &[(CN, 0x0c, "  we\"ird;<> #x ".as_bytes())],
        ]);
        assert_eq!(
            dn_text(&n).as_deref(),
            Some("OU=A+OU=B,CN=\\  we\\\"ird\\;\\<\\> #x\\ ")
        );
        let n = name(&[&[(CN, 0x0c, "#h\u{e9}llo=x".as_bytes())]]);
        assert_eq!(dn_text(&n).as_deref(), Some("CN=\\#h\u{e9}llo=x"));
        // An unknown attribute: its OID and the value's DER in hex.
        let n = name(&[&[(&[0x2a, 0x03, 0x04], 0x0c, b"zz")]]);
        assert_eq!(dn_text(&n).as_deref(), Some("1.2.3.4=#0c027a7a"));
    }

    #[test]
    fn times() {
        let utc = Tlv {
            tag: 0x17,
            body: b"700102000000Z",
            raw: &[],
        };
        assert_eq!(time(&utc), Some(86400));
        let gen = Tlv {
            tag: 0x18,
            body: b"20380119031408Z",
            raw: &[],
        };
        assert_eq!(time(&gen), Some(i64::from(i32::MAX) + 1));
    }
}
