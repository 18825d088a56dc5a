//! IV generators (plain, plain64, essiv): the IV of a sector from its
//! number.
use super::cipher::{self, CipherAlg};
use super::hash::HashAlg;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGenAlg {
    Plain,
    Plain64,
    Essiv,
}

impl IvGenAlg {
    pub fn from_name(name: &str) -> Option<IvGenAlg> {
        match name {
            "plain" => Some(IvGenAlg::Plain),
            "plain64" => Some(IvGenAlg::Plain64),
            "essiv" => Some(IvGenAlg::Essiv),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }
}

pub enum IvGen {
    Plain,
    Plain64,
    /// The sector number encrypted with the hash of the key.
    Essiv {
        cipher: Box<dyn cipher::SectorCipher>,
        block_len: usize,
    },
}

/// The cipher ESSIV uses: the same family with a key as long as the
/// hash's digest (dm-crypt's rule), or QEMU's error.
pub fn essiv_cipher(alg: CipherAlg, hash: HashAlg) -> Result<CipherAlg, String> {
    let n = hash.digest_len();
    if alg.key_len() == n {
        return Ok(alg);
    }
    let family = match alg.family() {
        "aes" => "AES",
        "serpent" => "Serpent",
        "twofish" => "Twofish",
        _ => return Err(format!("Cipher {} not supported with essiv", alg.name())),
    };
    CipherAlg::from_family(alg.family(), n)
        .ok_or_else(|| format!("No {family} cipher with key size {n} available"))
}

impl IvGen {
    pub fn new(
        alg: IvGenAlg,
        iv_cipher: CipherAlg,
        hash: Option<HashAlg>,
        key: &[u8],
    ) -> Result<IvGen, String> {
        Ok(match alg {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv => {
                let hash = hash.ok_or("Missing IV generator hash specification")?;
                let salt = hash.digest(&[key]);
                IvGen::Essiv {
                    cipher: cipher::new(iv_cipher, cipher::Mode::Ecb, &salt)?,
                    block_len: iv_cipher.block_len(),
                }
            }
        })
    }

    /// Writes the IV of `sector` into `iv` (its length is the data
    /// cipher's IV length).
    pub fn fill(&self, sector: u64, iv: &mut [u8]) {
        iv.fill(0);
        match self {
            IvGen::Plain => {
                let b = (sector as u32).to_le_bytes();
                let n = iv.len().min(4);
                iv[..n].copy_from_slice(&b[..n]);
            }
            IvGen::Plain64 => {
                let b = sector.to_le_bytes();
                let n = iv.len().min(8);
                iv[..n].copy_from_slice(&b[..n]);
            }
            IvGen::Essiv { cipher, block_len } => {
                let mut data = vec![0u8; *block_len];
                let b = sector.to_le_bytes();
                let n = data.len().min(8);
                data[..n].copy_from_slice(&b[..n]);
                cipher.encrypt(&[], &mut data);
                let n = iv.len().min(data.len());
                iv[..n].copy_from_slice(&data[..n]);
            }
        }
    }
}
