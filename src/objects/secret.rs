//! The `secret` object: data inline or from a file, raw or base64, and
//! optionally AES-256-CBC encrypted with another secret as the key.
use aes::cipher::{BlockDecryptMut, KeyIvInit};
use base64::Engine;
use serde_json::{json, Map, Value};

pub struct Secret {
    pub value: Vec<u8>,
    props: Map<String, Value>,
    /// A `secret_keyring`: the key's serial number.
    pub serial: Option<i32>,
}

/// Lenient base64 as QEMU's (GLib) decoder: the alphabet is checked,
/// padding and trailing bits are not.
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let ok = text.bytes().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'\n' | b'\r' | b'\t' | b' ')
    });
    if !ok {
        return Err("Base64 data contains invalid characters".into());
    }
    let cleaned: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '=')
        .collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    // A dangling single character carries no whole byte: drop it as GLib does.
    let usable = if cleaned.len() % 4 == 1 {
        &cleaned[..cleaned.len() - 1]
    } else {
        &cleaned[..]
    };
    engine
        .decode(usable)
        .map_err(|_| "Base64 data contains invalid characters".to_string())
}

type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

impl Secret {
    pub fn load(
        props: &Map<String, Value>,
        lookup: &dyn Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<Secret, String> {
        let s = |k: &str| props.get(k).and_then(Value::as_str);
        let input: Vec<u8> = match (s("data"), s("file")) {
            (Some(_), Some(_)) => return Err("'file' and 'data' are mutually exclusive".into()),
            (Some(d), None) => d.as_bytes().to_vec(),
            (None, Some(f)) => read_file(f)?,
            (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
        };
        Secret::decode(props, input, lookup)
    }

    /// A `secret_keyring`: the kernel key `serial`'s payload.
    pub fn load_keyring(
        props: &Map<String, Value>,
        lookup: &dyn Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<Secret, String> {
        let serial = props.get("serial").and_then(Value::as_i64).unwrap_or(0) as i32;
        let input = super::keyring::read(serial)?;
        let mut sec = Secret::decode(props, input, lookup)?;
        sec.serial = Some(serial);
        Ok(sec)
    }

    /// The value from its input: base64 or raw, decrypted with the
    /// `keyid` secret when there is one (QEMU's secret_common).
    fn decode(
        props: &Map<String, Value>,
        input: Vec<u8>,
        lookup: &dyn Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<Secret, String> {
        let s = |k: &str| props.get(k).and_then(Value::as_str);
        let base64 = s("format") == Some("base64");
        let value = match s("keyid") {
            Some(keyid) => {
                let key = lookup(keyid).ok_or_else(|| format!("No secret with id '{keyid}'"))?;
                if key.len() != 32 {
                    return Err("Key should be 32 bytes in length".into());
                }
                let iv_text = s("iv").ok_or("IV is required to decrypt secret")?;
                let iv = base64_decode(iv_text)?;
                if iv.len() != 16 {
                    return Err(format!("IV should be 16 bytes in length not {}", iv.len()));
                }
                let text = String::from_utf8_lossy(&input);
                let mut data = if base64 { base64_decode(&text)? } else { input };
                if data.is_empty() || data.len() % 16 != 0 {
                    return Err(format!(
                        "Length {} must be a multiple of block size 16",
                        data.len()
                    ));
                }
                let dec = Aes256CbcDec::new_from_slices(&key, &iv).map_err(|e| e.to_string())?;
                let plain = dec
                    .decrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(&mut data)
                    .map_err(|e| e.to_string())?
                    .to_vec();
                let pad = plain.last().copied().unwrap_or(0) as usize;
                if pad > 16 || pad > plain.len() {
                    return Err(format!(
                        "Incorrect number of padding bytes ({pad}) found on decrypted data"
                    ));
                }
                plain[..plain.len() - pad].to_vec()
            }
            None if base64 => base64_decode(&String::from_utf8_lossy(&input))?,
            None => input,
        };
        Ok(Secret {
            value,
            props: props.clone(),
            serial: None,
        })
    }

    pub fn get(&self, prop: &str) -> Option<Value> {
        match prop {
            "format" => Some(self.props.get("format").cloned().unwrap_or(json!("raw"))),
            "serial" => self.serial.map(|n| json!(n)),
            "data" | "file" if self.serial.is_some() => None,
            "keyid" | "iv" | "data" | "file" => {
                Some(self.props.get(prop).cloned().unwrap_or(json!("")))
            }
            _ => None,
        }
    }

    /// QEMU lets a loaded secret's properties be set (the value is kept).
    pub fn set_prop(&mut self, prop: &str, value: &str) {
        self.props.insert(prop.to_string(), json!(value));
    }
}

fn read_file(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        let why = crate::util::os_msg(&e);
        let what = if e.kind() == std::io::ErrorKind::NotFound
            || e.kind() == std::io::ErrorKind::PermissionDenied
        {
            "Failed to open file"
        } else {
            "Error reading file"
        };
        format!("Unable to read {path}: {what} \u{201C}{path}\u{201D}: {why}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::BlockEncryptMut;

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn plain_and_base64() {
        let none = |_: &str| None;
        let s = Secret::load(&props(json!({"data": "abc"})), &none).expect("raw");
        assert_eq!(s.value, b"abc");
        let s = Secret::load(
            &props(json!({"data": "aGVsbG8=", "format": "base64"})),
            &none,
        )
        .expect("b64");
        assert_eq!(s.value, b"hello");
        let e = Secret::load(&props(json!({"data": "!!", "format": "base64"})), &none).err();
        assert_eq!(
            e.as_deref(),
            Some("Base64 data contains invalid characters")
        );
        assert_eq!(
            Secret::load(&props(json!({})), &none).err().as_deref(),
            Some("Either 'file' or 'data' must be provided")
        );
    }

    #[test]
    fn decrypts_with_keyid() {
        type Enc = cbc::Encryptor<aes::Aes256>;
        let key = [7u8; 32];
        let iv = [9u8; 16];
        let mut buf = b"top secret\x06\x06\x06\x06\x06\x06".to_vec();
        let len = buf.len();
        Enc::new_from_slices(&key, &iv)
            .expect("enc")
            .encrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(&mut buf, len)
            .expect("encrypt");
        let b64 = base64::engine::general_purpose::STANDARD;
        let lookup = |id: &str| (id == "k").then(|| key.to_vec());
        let s = Secret::load(
            &props(json!({"data": b64.encode(&buf), "format": "base64", "keyid": "k", "iv": b64.encode(iv)})),
            &lookup,
        )
        .expect("decrypt");
        assert_eq!(s.value, b"top secret");
        let e = Secret::load(
            &props(json!({"data": "abcd", "keyid": "k", "iv": "YWJj"})),
            &lookup,
        )
        .err();
        assert_eq!(e.as_deref(), Some("IV should be 16 bytes in length not 3"));
        let e = Secret::load(
            &props(json!({"data": "abcd", "keyid": "k", "iv": b64.encode(iv)})),
            &lookup,
        )
        .err();
        assert_eq!(
            e.as_deref(),
            Some("Length 4 must be a multiple of block size 16")
        );
        let e = Secret::load(&props(json!({"data": "abcd", "keyid": "nosuch"})), &lookup).err();
        assert_eq!(e.as_deref(), Some("No secret with id 'nosuch'"));
    }
}
