//! The LUKS1 format as QEMU writes it (cryptsetup's on-disk format
//! 1.2.1): the 592-byte header with eight key slots, each slot holding
//! the master key AF-split into 4000 stripes and encrypted with a key
//! PBKDF2 derives from a password; the master key's PBKDF2 digest tells
//! a right password from a wrong one. All integers are big-endian.
use serde_json::{json, Value};

use super::cipher::{self, CipherAlg, Mode};
use super::hash::HashAlg;
use super::ivgen::{self, IvGen, IvGenAlg};
use super::{afsplit, random, SectorCrypto, SECTOR};

pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
pub const HEADER_LEN: usize = 592;
pub const NUM_SLOTS: usize = 8;
pub const STRIPES: u32 = 4000;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// The key material starts after the first 4 KiB, and each slot's
/// area is a multiple of that.
const KEY_SLOT_OFFSET: u64 = 4096;
const HEADER_SECTORS: u64 = KEY_SLOT_OFFSET / SECTOR;
const MIN_ITERS: u64 = 1000;
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;
/// Erased key material is overwritten this many times.
const ERASE_PASSES: usize = 40;
/// Key material larger than this is refused rather than read.
const MAX_MATERIAL: u64 = 64 << 20;

#[derive(Clone)]
pub struct Slot {
    pub active: u32,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    pub key_offset: u32,
    pub stripes: u32,
}

#[derive(Clone)]
pub struct Header {
    pub version: u16,
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash_spec: String,
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_salt: [u8; SALT_LEN],
    pub mk_iterations: u32,
    pub uuid: [u8; 40],
    pub slots: Vec<Slot>,
}

/// What the header's strings name.
#[derive(Clone, Copy)]
pub struct Params {
    pub cipher: CipherAlg,
    pub mode: Mode,
    pub ivgen: IvGenAlg,
    pub ivgen_hash: Option<HashAlg>,
    pub hash: HashAlg,
    pub ivgen_cipher: CipherAlg,
}

/// Key bytes that are wiped when dropped.
#[derive(Clone)]
pub struct Key(pub Vec<u8>);
impl Drop for Key {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: a valid, exclusive reference to one byte.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A NUL-padded string field.
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn put_str(out: &mut [u8], s: &str) {
    let n = s.len().min(out.len() - 1);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Sectors a slot's key material takes, rounded up to 4 KiB (cryptsetup's
/// layout, which QEMU follows).
fn material_sectors(key_bytes: u32, stripes: u32) -> u64 {
    let len = u64::from(key_bytes) * u64::from(stripes);
    len.div_ceil(SECTOR).next_multiple_of(HEADER_SECTORS)
}

impl Header {
    /// Parses and checks a header (QEMU's messages). A detached header
    /// has no payload after its key slots (its payload offset is 0).
    pub fn parse(b: &[u8], detached: bool) -> Result<Header, String> {
        if b.len() < HEADER_LEN || b[..6] != MAGIC {
            return Err("Volume is not in LUKS format".into());
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(format!("LUKS version {version} is not supported"));
        }
        let mut slots = Vec::with_capacity(NUM_SLOTS);
        for i in 0..NUM_SLOTS {
            let at = 208 + i * 48;
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&b[at + 8..at + 40]);
            slots.push(Slot {
                active: be32(b, at),
                iterations: be32(b, at + 4),
                salt,
                key_offset: be32(b, at + 40),
                stripes: be32(b, at + 44),
            });
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_salt = [0u8; SALT_LEN];
        mk_salt.copy_from_slice(&b[132..164]);
        let mut uuid = [0u8; 40];
        uuid.copy_from_slice(&b[168..208]);
        let h = Header {
            version,
            cipher_name: cstr(&b[8..40]),
            cipher_mode: cstr(&b[40..72]),
            hash_spec: cstr(&b[72..104]),
            payload_offset: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest,
            mk_salt,
            mk_iterations: be32(b, 164),
            uuid,
            slots,
        };
        h.check(detached)?;
        Ok(h)
    }

    /// The key slots' sanity, as QEMU checks them on open.
    fn check(&self, detached: bool) -> Result<(), String> {
        let area = |s: &Slot| {
            let start = u64::from(s.key_offset);
            (start, start + material_sectors(self.key_bytes, s.stripes))
        };
        for (i, s) in self.slots.iter().enumerate() {
            if s.stripes == 0 {
                return Err(format!("Keyslot {i} is corrupted (stripes == 0)"));
            }
            if s.active != SLOT_DISABLED && s.active != SLOT_ENABLED {
                return Err(format!("Keyslot {i} state (active/disable) is corrupted"));
            }
            let (a0, a1) = area(s);
            if !detached && a1 > u64::from(self.payload_offset) {
                return Err(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                ));
            }
            for (j, t) in self.slots.iter().enumerate().skip(i + 1) {
                let (b0, b1) = area(t);
                if a1 > b0 && b1 > a0 {
                    return Err(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&self.version.to_be_bytes());
        put_str(&mut b[8..40], &self.cipher_name);
        put_str(&mut b[40..72], &self.cipher_mode);
        put_str(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        b[168..208].copy_from_slice(&self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let at = 208 + i * 48;
            b[at..at + 4].copy_from_slice(&s.active.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[at + 8..at + 40].copy_from_slice(&s.salt);
            b[at + 40..at + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            b[at + 44..at + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// The algorithms the header's strings name (QEMU's messages).
    pub fn params(&self) -> Result<Params, String> {
        // "<mode>-<ivgen>[:<ivhash>]", such as "xts-plain64".
        let (mode_name, rest) = self
            .cipher_mode
            .split_once('-')
            .ok_or_else(|| format!("Unexpected cipher mode string format {}", self.cipher_mode))?;
        let (ivgen_name, ivhash_name) = match rest.split_once(':') {
            Some((g, h)) => (g, Some(h)),
            None => (rest, None),
        };
        let hash_named = |n: &str| {
            HashAlg::from_name(n).ok_or_else(|| format!("Hash algorithm {n} not supported"))
        };
        let ivgen_hash = ivhash_name.map(hash_named).transpose()?;
        let mode = Mode::from_name(mode_name)
            .ok_or_else(|| format!("Cipher mode {mode_name} not supported"))?;
        let per_key = if mode == Mode::Xts {
            self.key_bytes / 2
        } else {
            self.key_bytes
        };
        let cipher =
            CipherAlg::from_family(&self.cipher_name, per_key as usize).ok_or_else(|| {
                format!(
                    "Algorithm {} with key size {per_key} bytes not supported",
                    self.cipher_name
                )
            })?;
        let hash = hash_named(&self.hash_spec)?;
        let ivgen = IvGenAlg::from_name(ivgen_name)
            .ok_or_else(|| format!("IV generator {ivgen_name} not supported"))?;
        let ivgen_cipher = if ivgen == IvGenAlg::Essiv {
            let h = ivgen_hash.ok_or("Missing IV generator hash specification")?;
            ivgen::essiv_cipher(cipher, h)?
        } else {
            cipher
        };
        Ok(Params {
            cipher,
            mode,
            ivgen,
            ivgen_hash,
            hash,
            ivgen_cipher,
        })
    }

    pub fn payload_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR
    }

    /// The end of the last key slot's area: what a header needs.
    pub fn area_bytes(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| {
                (u64::from(s.key_offset) + material_sectors(self.key_bytes, s.stripes)) * SECTOR
            })
            .max()
            .unwrap_or(0)
    }

    /// Where slot `i`'s key material lies: (byte offset, length).
    pub fn material_range(&self, i: usize) -> Result<(u64, usize), String> {
        let s = &self.slots[i];
        let len = u64::from(self.key_bytes) * u64::from(s.stripes);
        if len > MAX_MATERIAL {
            return Err(format!(
                "Keyslot {i} has too much key material ({len} bytes)"
            ));
        }
        Ok((u64::from(s.key_offset) * SECTOR, len as usize))
    }

    pub fn slot_active(&self, i: usize) -> bool {
        self.slots[i].active == SLOT_ENABLED
    }

    pub fn active_slots(&self) -> usize {
        (0..NUM_SLOTS).filter(|&i| self.slot_active(i)).count()
    }

    /// The master key if `password` opens slot `i` (whose encrypted key
    /// material is `material`), None if it does not.
    pub fn try_slot(
        &self,
        p: &Params,
        i: usize,
        password: &[u8],
        material: &[u8],
    ) -> Result<Option<Key>, String> {
        if !self.slot_active(i) {
            return Ok(None);
        }
        let s = &self.slots[i];
        let n = self.key_bytes as usize;
        let mut slot_key = Key(vec![0u8; n]);
        p.hash
            .pbkdf2(password, &s.salt, s.iterations, &mut slot_key.0);
        let mut split = Key(material.to_vec());
        p.crypto(&slot_key.0)?.decrypt(0, &mut split.0);
        let master = Key(afsplit::merge(p.hash, &split.0, n, s.stripes as usize));
        Ok((self.digest(p, &master.0) == self.mk_digest).then_some(master))
    }

    fn digest(&self, p: &Params, master: &[u8]) -> [u8; DIGEST_LEN] {
        let mut d = [0u8; DIGEST_LEN];
        p.hash
            .pbkdf2(master, &self.mk_salt, self.mk_iterations, &mut d);
        d
    }

    /// Puts `master` in slot `i` behind `password` (PBKDF2 iterations for
    /// `iter_time_ms`); returns the encrypted key material to write at
    /// the slot's offset. The header must be written after it.
    pub fn store_slot(
        &mut self,
        p: &Params,
        i: usize,
        password: &[u8],
        master: &[u8],
        iter_time_ms: u64,
    ) -> Result<Vec<u8>, String> {
        let n = self.key_bytes as usize;
        let mut salt = [0u8; SALT_LEN];
        random(&mut salt)?;
        let per_sec = p.hash.pbkdf2_iters_per_second(password.len(), SALT_LEN, n);
        let iters = scale_iters(per_sec, iter_time_ms)?;
        if iters > u64::from(u32::MAX) {
            return Err(format!(
                "PBKDF iterations {iters} larger than {}: {}",
                u32::MAX,
                erange()
            ));
        }
        let iters = iters.max(MIN_ITERS) as u32;
        let mut slot_key = Key(vec![0u8; n]);
        p.hash.pbkdf2(password, &salt, iters, &mut slot_key.0);
        let stripes = self.slots[i].stripes as usize;
        let mut rnd_err = None;
        let mut material = afsplit::split(p.hash, master, stripes, &mut |b| {
            if let Err(e) = random(b) {
                rnd_err = Some(e);
            }
        });
        if let Some(e) = rnd_err {
            return Err(e);
        }
        p.crypto(&slot_key.0)?.encrypt(0, &mut material);
        let s = &mut self.slots[i];
        s.salt = salt;
        s.iterations = iters;
        s.active = SLOT_ENABLED;
        Ok(material)
    }

    /// Disables slot `i`; returns its length of key material, which the
    /// caller overwrites with random data (`erase_passes` times).
    pub fn erase_slot(&mut self, i: usize) -> usize {
        let s = &mut self.slots[i];
        s.salt = [0u8; SALT_LEN];
        s.iterations = 0;
        s.active = SLOT_DISABLED;
        (self.key_bytes as usize) * (s.stripes as usize)
    }

    /// QCryptoBlockInfoLUKS for query output (no key material).
    pub fn info(&self, p: &Params, detached: bool) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("cipher-alg".into(), json!(p.cipher.name()));
        m.insert("cipher-mode".into(), json!(p.mode.name()));
        m.insert("ivgen-alg".into(), json!(p.ivgen.name()));
        if p.ivgen == IvGenAlg::Essiv {
            if let Some(h) = p.ivgen_hash {
                m.insert("ivgen-hash-alg".into(), json!(h.name()));
            }
        }
        m.insert("hash-alg".into(), json!(p.hash.name()));
        m.insert("detached-header".into(), json!(detached));
        m.insert("payload-offset".into(), json!(self.payload_bytes()));
        m.insert("master-key-iters".into(), json!(self.mk_iterations));
        m.insert("uuid".into(), json!(cstr(&self.uuid)));
        let slots: Vec<Value> = self
            .slots
            .iter()
            .map(|s| {
                let mut o = serde_json::Map::new();
                let active = s.active == SLOT_ENABLED;
                o.insert("active".into(), json!(active));
                if active {
                    o.insert("iters".into(), json!(s.iterations));
                    o.insert("stripes".into(), json!(s.stripes));
                }
                o.insert("key-offset".into(), json!(u64::from(s.key_offset) * SECTOR));
                Value::Object(o)
            })
            .collect();
        m.insert("slots".into(), Value::Array(slots));
        Value::Object(m)
    }
}

/// ERANGE's text, as QEMU appends it to these messages.
fn erange() -> String {
    let t = std::io::Error::from_raw_os_error(nix::libc::ERANGE).to_string();
    match t.rfind(" (os error ") {
        Some(p) => t[..p].to_string(),
        None => t,
    }
}

/// Iterations for `iter_time_ms` at `per_sec` (QEMU's overflow check).
fn scale_iters(per_sec: u64, iter_time_ms: u64) -> Result<u64, String> {
    if iter_time_ms > 0 && per_sec > u64::MAX / iter_time_ms {
        return Err(format!(
            "PBKDF iterations {per_sec} too large to scale: {}",
            erange()
        ));
    }
    Ok(per_sec * iter_time_ms / 1000)
}

impl Params {
    /// The payload's (or a key slot's) cipher under `key`.
    pub fn crypto(&self, key: &[u8]) -> Result<SectorCrypto, String> {
        let c = cipher::new(self.cipher, self.mode, key)?;
        let iv = IvGen::new(self.ivgen, self.ivgen_cipher, self.ivgen_hash, key)?;
        let niv = if self.mode == Mode::Ecb {
            0
        } else {
            self.cipher.block_len()
        };
        Ok(SectorCrypto::new(c, iv, niv))
    }
}

/// What blockdev-create's LUKS options ask for (QEMU's defaults filled).
#[derive(Clone, Copy)]
pub struct CreateOpts {
    pub cipher: CipherAlg,
    pub mode: Mode,
    pub ivgen: IvGenAlg,
    pub ivgen_hash: Option<HashAlg>,
    pub hash: HashAlg,
    pub iter_time_ms: u64,
}

/// A new header with slot 0 holding a fresh master key behind
/// `password`. Returns the header, slot 0's key material and the master
/// key (for the caller's payload cipher).
/// A detached header's payload starts at 0 of its data file; the
/// header node still holds the whole key slot area (`area_bytes`).
pub fn create(o: &CreateOpts, password: &[u8]) -> Result<(Header, Vec<u8>, Key), String> {
    let mode_spec = match o.ivgen_hash {
        Some(h) => format!("{}-{}:{}", o.mode.name(), o.ivgen.name(), h.name()),
        None => format!("{}-{}", o.mode.name(), o.ivgen.name()),
    };
    if mode_spec.len() >= 32 {
        return Err(format!(
            "Cipher mode '{mode_spec}' is too long for LUKS header"
        ));
    }
    let ivgen_cipher = if o.ivgen == IvGenAlg::Essiv {
        ivgen::essiv_cipher(o.cipher, o.ivgen_hash.unwrap_or(HashAlg::Sha256))?
    } else {
        o.cipher
    };
    let p = Params {
        cipher: o.cipher,
        mode: o.mode,
        ivgen: o.ivgen,
        ivgen_hash: o.ivgen_hash,
        hash: o.hash,
        ivgen_cipher,
    };
    if o.mode == Mode::Xts && o.cipher.block_len() != 16 {
        return Err(format!("Unsupported cipher mode {}", o.mode.name()));
    }
    let key_bytes = o.cipher.key_len() * if o.mode == Mode::Xts { 2 } else { 1 };
    // QEMU cannot use a slot whose material is not whole sectors (its
    // qemu-img aborts making one: aes-192 outside XTS).
    if !(key_bytes as u64 * u64::from(STRIPES)).is_multiple_of(SECTOR) {
        return Err(format!(
            "Cipher {} in mode {} gives key material that is not a whole number of sectors",
            o.cipher.name(),
            o.mode.name()
        ));
    }
    let mut mk_salt = [0u8; SALT_LEN];
    random(&mut mk_salt)?;
    let mut master = Key(vec![0u8; key_bytes]);
    random(&mut master.0)?;
    // Checks the payload cipher before the slow part, as QEMU does.
    p.crypto(&master.0)?;
    let per_sec = o
        .hash
        .pbkdf2_iters_per_second(key_bytes, SALT_LEN, DIGEST_LEN);
    let iters = scale_iters(per_sec, o.iter_time_ms)? / 8;
    if iters > u64::from(u32::MAX) {
        return Err(format!(
            "PBKDF iterations {iters} larger than {}: {}",
            u32::MAX,
            erange()
        ));
    }
    let split_sectors = material_sectors(key_bytes as u32, STRIPES);
    let slots = (0..NUM_SLOTS as u64)
        .map(|i| Slot {
            active: SLOT_DISABLED,
            iterations: 0,
            salt: [0u8; SALT_LEN],
            key_offset: (HEADER_SECTORS + i * split_sectors) as u32,
            stripes: STRIPES,
        })
        .collect();
    let mut h = Header {
        version: 1,
        cipher_name: o.cipher.family().to_string(),
        cipher_mode: mode_spec,
        hash_spec: o.hash.name().to_string(),
        payload_offset: (HEADER_SECTORS + NUM_SLOTS as u64 * split_sectors) as u32,
        key_bytes: key_bytes as u32,
        mk_digest: [0u8; DIGEST_LEN],
        mk_salt,
        mk_iterations: iters.max(MIN_ITERS) as u32,
        uuid: new_uuid()?,
        slots,
    };
    h.mk_digest = h.digest(&p, &master.0);
    let material = h.store_slot(&p, 0, password, &master.0, o.iter_time_ms)?;
    Ok((h, material, master))
}

/// A random (version 4) UUID in its text form, NUL-padded.
fn new_uuid() -> Result<[u8; 40], String> {
    let mut r = [0u8; 16];
    random(&mut r)?;
    r[6] = (r[6] & 0x0f) | 0x40;
    r[8] = (r[8] & 0x3f) | 0x80;
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let text = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    let mut out = [0u8; 40];
    out[..36].copy_from_slice(text.as_bytes());
    Ok(out)
}

/// Random bytes to overwrite erased key material with, one pass.
pub fn garbage(len: usize) -> Vec<u8> {
    let mut g = vec![0u8; len];
    // Zeroes at worst, as QEMU writes when randomness fails.
    let _ = random(&mut g);
    g
}

pub const ERASE_PASS_COUNT: usize = ERASE_PASSES;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_unlock() {
        let o = CreateOpts {
            cipher: CipherAlg::Aes256,
            mode: Mode::Xts,
            ivgen: IvGenAlg::Plain64,
            ivgen_hash: None,
            hash: HashAlg::Sha256,
            iter_time_ms: 1,
        };
        let (h, material, master) = create(&o, b"pw").expect("create");
        let h2 = Header::parse(&h.to_bytes(), false).expect("parse");
        let p = h2.params().expect("params");
        assert_eq!(h2.payload_offset, 4040);
        let got = h2.try_slot(&p, 0, b"pw", &material).expect("try");
        assert_eq!(got.map(|k| k.0.clone()), Some(master.0.clone()));
        assert!(h2
            .try_slot(&p, 0, b"nope", &material)
            .expect("try")
            .is_none());
    }
}
