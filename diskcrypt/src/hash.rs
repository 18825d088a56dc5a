//! The hash algorithms QEMU's LUKS driver names (QCryptoHashAlgo), their
//! digests and PBKDF2 over them.
use sha2::Digest;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
    Ripemd160,
    Sm3,
}

const NAMES: &[(HashAlg, &str)] = &[
    (HashAlg::Md5, "md5"),
    (HashAlg::Sha1, "sha1"),
    (HashAlg::Sha224, "sha224"),
    (HashAlg::Sha256, "sha256"),
    (HashAlg::Sha384, "sha384"),
    (HashAlg::Sha512, "sha512"),
    (HashAlg::Ripemd160, "ripemd160"),
    (HashAlg::Sm3, "sm3"),
];

impl HashAlg {
    /// From the QAPI name (which is also the LUKS header's spelling).
    pub fn from_name(name: &str) -> Option<HashAlg> {
        NAMES.iter().find(|(_, n)| *n == name).map(|(a, _)| *a)
    }

    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(a, _)| *a == self)
            .map(|(_, n)| *n)
            .unwrap_or("")
    }

    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Md5 => 16,
            HashAlg::Sha1 | HashAlg::Ripemd160 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 | HashAlg::Sm3 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenated parts.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            HashAlg::Md5 => run::<md5::Md5>(parts),
            HashAlg::Sha1 => run::<sha1::Sha1>(parts),
            HashAlg::Sha224 => run::<sha2::Sha224>(parts),
            HashAlg::Sha256 => run::<sha2::Sha256>(parts),
            HashAlg::Sha384 => run::<sha2::Sha384>(parts),
            HashAlg::Sha512 => run::<sha2::Sha512>(parts),
            HashAlg::Ripemd160 => run::<ripemd::Ripemd160>(parts),
            HashAlg::Sm3 => run::<sm3::Sm3>(parts),
        }
    }

    /// PBKDF2 with HMAC over this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac as p;
        match self {
            HashAlg::Md5 => p::<md5::Md5>(password, salt, iterations, out),
            HashAlg::Sha1 => p::<sha1::Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => p::<sha2::Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => p::<sha2::Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => p::<sha2::Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => p::<sha2::Sha512>(password, salt, iterations, out),
            HashAlg::Ripemd160 => p::<ripemd::Ripemd160>(password, salt, iterations, out),
            HashAlg::Sm3 => p::<sm3::Sm3>(password, salt, iterations, out),
        }
    }

    /// PBKDF2 iterations this machine runs in one second for these
    /// lengths, measured in this thread's CPU time (as QEMU's
    /// qcrypto_pbkdf2_count_iters), from a run of at least a quarter
    /// second: the count grows tenfold while runs are very short, then
    /// straight to the size that should take 300 ms.
    pub fn pbkdf2_iters_per_second(self, key_len: usize, salt_len: usize, out_len: usize) -> u64 {
        let key = vec![0u8; key_len];
        let salt = vec![0u8; salt_len];
        let mut out = vec![0u8; out_len];
        let mut iters: u32 = 1 << 15;
        loop {
            let start = thread_cpu_ns();
            self.pbkdf2(&key, &salt, iters, &mut out);
            let ns = thread_cpu_ns().saturating_sub(start);
            if ns >= 250_000_000 || iters >= 1 << 31 {
                return (u64::from(iters) * 1_000_000_000) / ns.max(1);
            }
            let next = if ns < 25_000_000 {
                u64::from(iters) * 10
            } else {
                u64::from(iters) * 300_000_000 / ns
            };
            iters = next.clamp(u64::from(iters) + 1, 1 << 31) as u32;
        }
    }
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut t = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, nothing else.
    let r = unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if r != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_sha256_vector() {
        // RFC 7914 section 11's PBKDF2-HMAC-SHA256 vector.
        let mut out = [0u8; 64];
        HashAlg::Sha256.pbkdf2(b"passwd", b"salt", 1, &mut out);
        assert_eq!(&out[..8], &[0x55, 0xac, 0x04, 0x6e, 0x56, 0xe3, 0x08, 0x9f]);
    }

    #[test]
    fn names_round_trip() {
        for (a, n) in NAMES {
            assert_eq!(HashAlg::from_name(n), Some(*a));
            assert_eq!(a.name(), *n);
            assert_eq!(a.digest(&[b"x"]).len(), a.digest_len());
        }
    }
}
