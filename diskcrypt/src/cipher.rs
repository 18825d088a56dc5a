//! Block ciphers and modes as QEMU's LUKS driver uses them: each sector
//! is encrypted on its own, in place, with the IV its generator gives.
//! Whole runs of blocks go to the cipher at once, so AES-NI (which the
//! `aes` crate detects at run time) works on several blocks in parallel.
use aes::cipher::generic_array::GenericArray;
use aes::cipher::inout::InOutBuf;
use aes::cipher::{BlockCipher, BlockDecrypt, BlockEncrypt, KeyInit};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherAlg {
    Aes128,
    Aes192,
    Aes256,
    Cast5_128,
    Serpent128,
    Serpent192,
    Serpent256,
    Twofish128,
    Twofish192,
    Twofish256,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ecb,
    Cbc,
    Xts,
    Ctr,
}

const ALGS: &[(CipherAlg, &str)] = &[
    (CipherAlg::Aes128, "aes-128"),
    (CipherAlg::Aes192, "aes-192"),
    (CipherAlg::Aes256, "aes-256"),
    (CipherAlg::Cast5_128, "cast5-128"),
    (CipherAlg::Serpent128, "serpent-128"),
    (CipherAlg::Serpent192, "serpent-192"),
    (CipherAlg::Serpent256, "serpent-256"),
    (CipherAlg::Twofish128, "twofish-128"),
    (CipherAlg::Twofish192, "twofish-192"),
    (CipherAlg::Twofish256, "twofish-256"),
];

/// The QAPI names QEMU's build knows but offers no LUKS cipher for
/// (nettle has no SM4 here; DES is never allowed for LUKS).
pub const UNAVAILABLE: &[&str] = &["des", "3des", "sm4"];

impl CipherAlg {
    pub fn from_name(name: &str) -> Option<CipherAlg> {
        ALGS.iter().find(|(_, n)| *n == name).map(|(a, _)| *a)
    }

    pub fn name(self) -> &'static str {
        ALGS.iter()
            .find(|(a, _)| *a == self)
            .map(|(_, n)| *n)
            .unwrap_or("")
    }

    /// The family name LUKS headers carry ("aes", "serpent", ...).
    pub fn family(self) -> &'static str {
        match self {
            CipherAlg::Aes128 | CipherAlg::Aes192 | CipherAlg::Aes256 => "aes",
            CipherAlg::Cast5_128 => "cast5",
            CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => "serpent",
            CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => "twofish",
        }
    }

    /// The algorithm of `family` with a `key_len`-byte key.
    pub fn from_family(family: &str, key_len: usize) -> Option<CipherAlg> {
        ALGS.iter()
            .map(|(a, _)| *a)
            .find(|a| a.family() == family && a.key_len() == key_len)
    }

    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128
            | CipherAlg::Cast5_128
            | CipherAlg::Serpent128
            | CipherAlg::Twofish128 => 16,
            CipherAlg::Aes192 | CipherAlg::Serpent192 | CipherAlg::Twofish192 => 24,
            CipherAlg::Aes256 | CipherAlg::Serpent256 | CipherAlg::Twofish256 => 32,
        }
    }

    pub fn block_len(self) -> usize {
        if self == CipherAlg::Cast5_128 {
            8
        } else {
            16
        }
    }
}

impl Mode {
    pub fn from_name(name: &str) -> Option<Mode> {
        match name {
            "ecb" => Some(Mode::Ecb),
            "cbc" => Some(Mode::Cbc),
            "xts" => Some(Mode::Xts),
            "ctr" => Some(Mode::Ctr),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Ecb => "ecb",
            Mode::Cbc => "cbc",
            Mode::Xts => "xts",
            Mode::Ctr => "ctr",
        }
    }
}

/// A keyed cipher in a mode, working on one sector (or any whole number
/// of blocks) with a given IV.
pub trait SectorCipher: Send + Sync {
    fn encrypt(&self, iv: &[u8], data: &mut [u8]);
    fn decrypt(&self, iv: &[u8], data: &mut [u8]);
}

/// What every cipher the modes run on provides.
pub trait Blocks:
    BlockEncrypt + BlockDecrypt + BlockCipher + Clone + Send + Sync + 'static
{
}
impl<T: BlockEncrypt + BlockDecrypt + BlockCipher + Clone + Send + Sync + 'static> Blocks for T {}

fn enc_all<C: BlockEncrypt>(c: &C, data: &mut [u8]) {
    let (blocks, _) = InOutBuf::from(data).into_chunks::<C::BlockSize>();
    c.encrypt_blocks_inout(blocks);
}

fn dec_all<C: BlockDecrypt>(c: &C, data: &mut [u8]) {
    let (blocks, _) = InOutBuf::from(data).into_chunks::<C::BlockSize>();
    c.decrypt_blocks_inout(blocks);
}

fn xor(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

struct Ecb<C>(C);
impl<C: Blocks> SectorCipher for Ecb<C> {
    fn encrypt(&self, _iv: &[u8], data: &mut [u8]) {
        enc_all(&self.0, data);
    }
    fn decrypt(&self, _iv: &[u8], data: &mut [u8]) {
        dec_all(&self.0, data);
    }
}

struct Cbc<C>(C);
impl<C: Blocks> SectorCipher for Cbc<C> {
    fn encrypt(&self, iv: &[u8], data: &mut [u8]) {
        let bl = iv.len();
        let mut prev = iv.to_vec();
        for block in data.chunks_exact_mut(bl) {
            xor(block, &prev);
            self.0.encrypt_block(GenericArray::from_mut_slice(block));
            prev.copy_from_slice(block);
        }
    }
    fn decrypt(&self, iv: &[u8], data: &mut [u8]) {
        // All blocks at once, then each XORed with the ciphertext
        // before it (kept aside first).
        let bl = iv.len();
        let n = data.len() / bl * bl;
        let mut chain = Vec::with_capacity(n);
        chain.extend_from_slice(iv);
        chain.extend_from_slice(&data[..n.saturating_sub(bl)]);
        dec_all(&self.0, &mut data[..n]);
        xor(&mut data[..n], &chain);
    }
}

struct Ctr<C>(C);
impl<C: Blocks> Ctr<C> {
    fn apply(&self, iv: &[u8], data: &mut [u8]) {
        // The IV is a big-endian counter over the whole block, as
        // nettle's CTR.
        let bl = iv.len();
        let n = data.len() / bl * bl;
        let mut stream = vec![0u8; n];
        let mut ctr = iv.to_vec();
        for block in stream.chunks_exact_mut(bl) {
            block.copy_from_slice(&ctr);
            for b in ctr.iter_mut().rev() {
                *b = b.wrapping_add(1);
                if *b != 0 {
                    break;
                }
            }
        }
        enc_all(&self.0, &mut stream);
        xor(&mut data[..n], &stream);
    }
}
impl<C: Blocks> SectorCipher for Ctr<C> {
    fn encrypt(&self, iv: &[u8], data: &mut [u8]) {
        self.apply(iv, data);
    }
    fn decrypt(&self, iv: &[u8], data: &mut [u8]) {
        self.apply(iv, data);
    }
}

/// XTS (IEEE 1619) with 16-byte blocks: the IV, encrypted with the
/// second key, is the first block's tweak; each next tweak is the
/// previous one times x in GF(2^128), little-endian.
struct Xts<C> {
    data: C,
    tweak: C,
}

fn next_tweak(t: &mut [u8; 16]) {
    let carry = t[15] >> 7;
    for i in (1..16).rev() {
        t[i] = (t[i] << 1) | (t[i - 1] >> 7);
    }
    t[0] = (t[0] << 1) ^ (0x87 * carry);
}

impl<C: Blocks> Xts<C> {
    fn whiten(&self, iv: &[u8], data: &mut [u8]) -> Vec<u8> {
        let mut t = [0u8; 16];
        let k = iv.len().min(16);
        t[..k].copy_from_slice(&iv[..k]);
        self.tweak
            .encrypt_block(GenericArray::from_mut_slice(&mut t));
        let n = data.len() / 16 * 16;
        let mut tweaks = vec![0u8; n];
        for chunk in tweaks.chunks_exact_mut(16) {
            chunk.copy_from_slice(&t);
            next_tweak(&mut t);
        }
        xor(&mut data[..n], &tweaks);
        tweaks
    }
}
impl<C: Blocks> SectorCipher for Xts<C> {
    fn encrypt(&self, iv: &[u8], data: &mut [u8]) {
        let tweaks = self.whiten(iv, data);
        let n = tweaks.len();
        enc_all(&self.data, &mut data[..n]);
        xor(&mut data[..n], &tweaks);
    }
    fn decrypt(&self, iv: &[u8], data: &mut [u8]) {
        let tweaks = self.whiten(iv, data);
        let n = tweaks.len();
        dec_all(&self.data, &mut data[..n]);
        xor(&mut data[..n], &tweaks);
    }
}

fn build<C: Blocks + KeyInit>(mode: Mode, key: &[u8]) -> Result<Box<dyn SectorCipher>, String> {
    let make = |k: &[u8]| C::new_from_slice(k).map_err(|_| "Invalid key length".to_string());
    Ok(match mode {
        Mode::Ecb => Box::new(Ecb(make(key)?)),
        Mode::Cbc => Box::new(Cbc(make(key)?)),
        Mode::Ctr => Box::new(Ctr(make(key)?)),
        Mode::Xts => {
            let half = key.len() / 2;
            Box::new(Xts {
                data: make(&key[..half])?,
                tweak: make(&key[half..])?,
            })
        }
    })
}

/// A keyed cipher for `alg` in `mode`; an XTS key holds both halves.
pub fn new(alg: CipherAlg, mode: Mode, key: &[u8]) -> Result<Box<dyn SectorCipher>, String> {
    let want = alg.key_len() * if mode == Mode::Xts { 2 } else { 1 };
    if key.len() != want {
        return Err(format!(
            "Cipher key length {} should be {}",
            key.len(),
            want
        ));
    }
    if mode == Mode::Xts && alg.block_len() != 16 {
        return Err(format!("Unsupported cipher mode {}", mode.name()));
    }
    match alg {
        CipherAlg::Aes128 => build::<aes::Aes128>(mode, key),
        CipherAlg::Aes192 => build::<aes::Aes192>(mode, key),
        CipherAlg::Aes256 => build::<aes::Aes256>(mode, key),
        CipherAlg::Cast5_128 => build::<cast5::Cast5>(mode, key),
        CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
            build::<serpent::Serpent>(mode, key)
        }
        CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
            build::<twofish::Twofish>(mode, key)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xts_matches_ieee_vector() {
        // IEEE 1619 vector 1: zero keys, zero tweak, zero data.
        let c = new(CipherAlg::Aes128, Mode::Xts, &[0u8; 32]).expect("xts");
        let mut d = [0u8; 32];
        c.encrypt(&[0u8; 16], &mut d);
        assert_eq!(&d[..8], &[0x91, 0x7c, 0xf6, 0x9e, 0xbd, 0x68, 0xb2, 0xec]);
        c.decrypt(&[0u8; 16], &mut d);
        assert_eq!(d, [0u8; 32]);
    }

    #[test]
    fn modes_round_trip() {
        for (alg, _) in ALGS {
            for mode in [Mode::Ecb, Mode::Cbc, Mode::Xts, Mode::Ctr] {
                if mode == Mode::Xts && alg.block_len() != 16 {
                    continue;
                }
                let key: Vec<u8> = (0..alg.key_len() * if mode == Mode::Xts { 2 } else { 1 })
                    .map(|i| i as u8)
                    .collect();
                let c = new(*alg, mode, &key).expect("cipher");
                let iv = vec![3u8; alg.block_len()];
                let plain: Vec<u8> = (0..512).map(|i| (i * 7) as u8).collect();
                let mut d = plain.clone();
                c.encrypt(&iv, &mut d);
                assert_ne!(d, plain, "{alg:?} {mode:?}");
                c.decrypt(&iv, &mut d);
                assert_eq!(d, plain, "{alg:?} {mode:?}");
            }
        }
    }

    #[test]
    fn cbc_matches_the_cbc_crate() {
        use aes::cipher::{BlockEncryptMut, KeyIvInit};
        let key = [5u8; 16];
        let iv = [9u8; 16];
        let plain: Vec<u8> = (0..64).map(|i| i as u8).collect();
        let mut a = plain.clone();
        new(CipherAlg::Aes128, Mode::Cbc, &key)
            .expect("cbc")
            .encrypt(&iv, &mut a);
        let mut b = plain.clone();
        cbc::Encryptor::<aes::Aes128>::new_from_slices(&key, &iv)
            .expect("enc")
            .encrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(&mut b, 64)
            .expect("encrypt");
        assert_eq!(a, b);
    }
}
