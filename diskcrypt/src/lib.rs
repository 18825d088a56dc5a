//! Disk encryption as QEMU's crypto layer does it (rsd's own crate, so
//! that debug builds optimize it): hashes and PBKDF2,
//! block ciphers in sector modes, IV generators, the LUKS1 format
//! (`luks.rs`); qcow2's legacy AES is built from these parts in the
//! daemon's qcow2 driver. Keys never leave
//! these types: nothing here implements Debug on key material.
pub mod afsplit;
pub mod cipher;
pub mod hash;
pub mod ivgen;
pub mod luks;

use cipher::SectorCipher;
use ivgen::IvGen;

/// LUKS and qcow's encryption both work in 512-byte sectors.
pub const SECTOR: u64 = 512;

/// A data cipher and its IV generator: encrypts and decrypts whole
/// sectors in place, the IV of each from its sector number.
pub struct SectorCrypto {
    cipher: Box<dyn SectorCipher>,
    ivgen: IvGen,
    /// The IV's length; 0 for ECB (no IV).
    niv: usize,
}

impl SectorCrypto {
    pub fn new(cipher: Box<dyn SectorCipher>, ivgen: IvGen, niv: usize) -> SectorCrypto {
        SectorCrypto { cipher, ivgen, niv }
    }

    /// `buf` holds whole sectors starting at byte `offset` (a multiple
    /// of 512) of the encrypted space.
    pub fn encrypt(&self, offset: u64, buf: &mut [u8]) {
        self.each(offset, buf, |c, iv, s| c.encrypt(iv, s));
    }

    pub fn decrypt(&self, offset: u64, buf: &mut [u8]) {
        self.each(offset, buf, |c, iv, s| c.decrypt(iv, s));
    }

    fn each(&self, offset: u64, buf: &mut [u8], f: impl Fn(&dyn SectorCipher, &[u8], &mut [u8])) {
        let mut iv = [0u8; 16];
        let iv = &mut iv[..self.niv.min(16)];
        let first = offset / SECTOR;
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            if !iv.is_empty() {
                self.ivgen.fill(first + i as u64, iv);
            }
            f(self.cipher.as_ref(), iv, sector);
        }
    }
}

/// Fills `buf` from the system's random source.
pub fn random(buf: &mut [u8]) -> Result<(), String> {
    getrandom::fill(buf).map_err(|e| format!("Unable to read random bytes: {e}"))
}
