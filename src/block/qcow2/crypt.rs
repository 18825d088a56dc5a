//! Encrypted qcow2 images: guest data is encrypted sector by sector on
//! its way to the data file. LUKS (crypt_method 2) keeps a LUKS header
//! in clusters the crypto header extension names, and each sector's IV
//! comes from its HOST offset; legacy AES (crypt_method 1) is AES-128-CBC
//! under the password's first 16 bytes, each IV from the GUEST offset.
//! Metadata, zero and unallocated clusters are never encrypted.
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::header::{Header, CRYPT_AES, CRYPT_LUKS};
use super::{Image, Qcow2};
use crate::block::driver::{WriteFlags, ZeroFlags};
use crate::block::error::{BlockError, BlockResult};
use crate::block::luks::volume::Region;
use crate::block::node::Node;
use diskcrypt::cipher::{self, CipherAlg, Mode};
use diskcrypt::ivgen::{IvGen, IvGenAlg};
use diskcrypt::luks::{self, Key, Params};
use diskcrypt::{SectorCrypto, SECTOR};

/// The key secret an encrypted image is opened with: its id and value.
pub struct Password {
    pub id: String,
    pub value: Key,
}

/// The `encrypt` open options against the header's crypt_method, with
/// QEMU's checks and messages. `lookup` finds a secret's value. None:
/// the image is not encrypted.
pub fn options(
    h: &Header,
    opts: &Map<String, Value>,
    lookup: &dyn Fn(&str) -> Result<Key, String>,
) -> Result<Option<Password>, String> {
    let enc = opts.get("encrypt").and_then(Value::as_object);
    let fmt = enc.and_then(|e| e.get("format")).and_then(Value::as_str);
    let want = match h.crypt_method {
        CRYPT_AES => "aes",
        CRYPT_LUKS => "luks",
        _ => {
            return match fmt {
                Some(f) => Err(format!(
                    "No encryption in image header, but options specified format '{f}'"
                )),
                None => Ok(None),
            }
        }
    };
    if let Some(f) = fmt.filter(|f| *f != want) {
        return Err(format!(
            "Header reported '{want}' encryption format but options specify '{f}'"
        ));
    }
    let Some(id) = enc
        .and_then(|e| e.get("key-secret"))
        .and_then(Value::as_str)
    else {
        return Err("Parameter 'encrypt.key-secret' is required for cipher".into());
    };
    Ok(Some(Password {
        id: id.to_string(),
        value: lookup(id)?,
    }))
}

/// A LUKS volume inside the image: its header (for queries and amend).
pub struct Volume {
    pub region: Region,
    pub header: tokio::sync::Mutex<luks::Header>,
    pub params: Params,
}

pub struct Crypt {
    crypto: SectorCrypto,
    /// LUKS: the volume; None for legacy AES.
    pub volume: Option<Volume>,
    /// The key-secret the image was opened with (amend's default).
    pub secret_id: String,
}

/// QEMU's qcow key: the password's first 16 bytes, zero-padded.
fn aes_crypto(password: &[u8]) -> Result<SectorCrypto, String> {
    let mut key = Key(vec![0u8; 16]);
    let n = password.len().min(16);
    key.0[..n].copy_from_slice(&password[..n]);
    let c = cipher::new(CipherAlg::Aes128, Mode::Cbc, &key.0)?;
    let iv = IvGen::new(IvGenAlg::Plain64, CipherAlg::Aes128, None, &key.0)?;
    Ok(SectorCrypto::new(c, iv, 16))
}

impl Crypt {
    /// Unlocks the image's encryption with `pw` (from [`options`]).
    pub async fn open(file: &Arc<Node>, h: &Header, pw: &Password) -> BlockResult<Crypt> {
        if h.crypt_method == CRYPT_AES {
            return Ok(Crypt {
                crypto: aes_crypto(&pw.value.0).map_err(BlockError::unsupported)?,
                volume: None,
                secret_id: pw.id.clone(),
            });
        }
        let Some((base, _)) = h.crypto_ext.filter(|(_, l)| *l >= luks::HEADER_LEN as u64) else {
            return Err(BlockError::inval(
                "Request for data outside of extension header",
            ));
        };
        let region = Region {
            node: file.clone(),
            base,
        };
        let (hdr, params, crypto) = region.unlock(&pw.value.0, false).await?;
        Ok(Crypt {
            crypto,
            volume: Some(Volume {
                region,
                header: tokio::sync::Mutex::new(hdr),
                params,
            }),
            secret_id: pw.id.clone(),
        })
    }

    /// LUKS's IVs count host sectors, legacy AES's guest sectors.
    fn at(&self, host: u64, guest: u64) -> u64 {
        if self.volume.is_some() {
            host
        } else {
            guest
        }
    }

    /// `buf` holds whole sectors read from `host`, guest data at `guest`.
    pub fn decrypt(&self, host: u64, guest: u64, buf: &mut [u8]) {
        self.crypto.decrypt(self.at(host, guest), buf);
    }

    pub fn encrypt(&self, host: u64, guest: u64, buf: &mut [u8]) {
        self.crypto.encrypt(self.at(host, guest), buf);
    }

    /// format-specific's `encrypt` member, as QEMU shows it.
    pub fn info(&self) -> Option<Value> {
        let Some(v) = &self.volume else {
            return Some(json!({"format": "aes"}));
        };
        let h = v.header.try_lock().ok()?;
        let mut data = h.info(&v.params, false);
        if let Value::Object(m) = &mut data {
            m.insert("format".into(), json!("luks"));
        }
        Some(data)
    }
}

fn aligned(offset: u64, len: u64) -> bool {
    offset.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR)
}

/// The whole sectors around `offset..offset + len`.
fn widen(offset: u64, len: u64) -> (u64, u64) {
    let start = offset & !(SECTOR - 1);
    (start, (offset + len).next_multiple_of(SECTOR) - start)
}

impl Image {
    /// Reads guest data; in an encrypted image a request that is not
    /// whole sectors reads the sectors around it.
    pub(super) async fn read_any(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        if self.crypt.is_none() || aligned(offset, buf.len() as u64) {
            return self.read_runs(offset, buf).await;
        }
        let (start, n) = widen(offset, buf.len() as u64);
        let mut b = vec![0u8; n as usize];
        self.read_runs(start, &mut b).await?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&b[at..at + buf.len()]);
        Ok(())
    }

    /// Writes guest data; in an encrypted image a request that is not
    /// whole sectors is a read-modify-write of the sectors around it,
    /// which no other write of the image runs beside.
    pub(super) async fn write_any(
        &self,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> BlockResult<()> {
        if self.crypt.is_none() {
            return self.write_impl(offset, buf, flags).await;
        }
        if aligned(offset, buf.len() as u64) {
            let _shared = self.rmw.read().await;
            return self.write_impl(offset, buf, flags).await;
        }
        let _alone = self.rmw.write().await;
        let (start, n) = widen(offset, buf.len() as u64);
        let mut b = vec![0u8; n as usize];
        self.read_runs(start, &mut b).await?;
        let at = (offset - start) as usize;
        b[at..at + buf.len()].copy_from_slice(buf);
        self.write_impl(start, &b, flags).await
    }

    /// x-blockdev-amend's `encrypt` options: LUKS key slots, with QEMU's
    /// checks and messages.
    pub(super) async fn amend_crypt(
        &self,
        o: &Map<String, Value>,
        secrets: &crate::objects::Secrets,
        force: bool,
    ) -> Result<(), String> {
        let Some(enc) = o.get("encrypt").and_then(Value::as_object) else {
            return Ok(());
        };
        let Some(c) = &self.crypt else {
            return Err("image is not encrypted, can't amend".into());
        };
        if enc.get("format").and_then(Value::as_str) != Some("luks") {
            return Err("Amend can't be used to change the qcow2 encryption format".into());
        }
        let Some(v) = &c.volume else {
            return Err(
                "Only LUKS encryption options can be amended for qcow2 with blockdev-amend".into(),
            );
        };
        let mut h = v.header.lock().await;
        let r = v
            .region
            .amend(&mut h, &v.params, enc, secrets, Some(&c.secret_id), force)
            .await;
        self.file.flush().await.map_err(|e| e.msg)?;
        r
    }
}

impl Qcow2 {
    /// write-zeroes in an encrypted image: zero clusters where whole
    /// ones are covered (they read as zeroes, never decrypted), encrypted
    /// zeroes elsewhere, partial sectors by read-modify-write.
    pub(super) async fn write_zeroes_encrypted(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> BlockResult<()> {
        let end = offset + len;
        let s0 = offset.next_multiple_of(SECTOR).min(end);
        let s1 = (end & !(SECTOR - 1)).max(s0);
        if flags.no_fallback && (s0 > offset || end > s1) {
            return Err(BlockError::unsupported("write zeroes needs a data write"));
        }
        let zeros = [0u8; SECTOR as usize];
        let wf = WriteFlags {
            fua: flags.fua,
            ..WriteFlags::default()
        };
        if s0 > offset {
            self.write_any(offset, &zeros[..(s0 - offset) as usize], wf)
                .await?;
        }
        if s1 > s0 {
            let _shared = self.rmw.read().await;
            self.zeroes(s0, s1 - s0, flags).await?;
        }
        if end > s1 {
            self.write_any(s1, &zeros[..(end - s1) as usize], wf)
                .await?;
        }
        Ok(())
    }
}

impl Image {
    /// blockdev-create's `encrypt` (QCryptoBlockCreateOptions) on the
    /// new image, after its L1 table, as QEMU sets it up: LUKS gets a
    /// header in clusters of its own, which the crypto header extension
    /// names; qcow (legacy AES) only checks its secret.
    pub(super) async fn set_up_encryption(
        &self,
        enc: &Map<String, Value>,
        secrets: &crate::objects::Secrets,
    ) -> Result<(), String> {
        let (method, ext) = if enc.get("format").and_then(Value::as_str) == Some("luks") {
            let (o, pw) = crate::block::luks::create::options(enc, secrets, "encrypt.")?;
            let (h, material, _) = crate::block::luks::volume::new_header(&o, &pw).await?;
            let len = h.payload_bytes();
            let cs = self.cs();
            let n = len.div_ceil(cs);
            let mut meta = self.meta.lock().await;
            let off = meta.alloc(n).await.map_err(|e| e.msg)?;
            let e = |e: BlockError| format!("Could not write encryption header: {}", e.msg);
            self.file
                .write_zeroes(off, n * cs, ZeroFlags::default())
                .await
                .map_err(e)?;
            let region = Region {
                node: self.file.clone(),
                base: off,
            };
            region.write_new(&h, &material).await?;
            meta.write_dirty().await.map_err(e)?;
            (CRYPT_LUKS, Some((off, len)))
        } else {
            let Some(id) = enc.get("key-secret").and_then(Value::as_str) else {
                return Err("Parameter 'encrypt.key-secret' is required for cipher".into());
            };
            secrets.get(id)?;
            (CRYPT_AES, None)
        };
        let h = self.header();
        let mut first = vec![0u8; h.cluster_size() as usize];
        let e = |e: BlockError| format!("Could not update qcow2 header: {}", e.msg);
        self.file.read(0, &mut first).await.map_err(e)?;
        let new = super::header::with_crypto(&first, &h, method, ext)?;
        self.file.flush().await.map_err(e)?;
        self.file
            .write(0, &new, WriteFlags::default())
            .await
            .map_err(e)?;
        if let Ok(mut hh) = self.header.lock() {
            hh.crypt_method = method;
            hh.crypto_ext = ext;
        }
        Ok(())
    }
}
