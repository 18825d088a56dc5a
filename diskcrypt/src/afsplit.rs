//! The LUKS anti-forensic splitter: a key spread over `stripes` blocks,
//! all of which are needed to get it back (cryptsetup's AF-splitter).
use super::hash::HashAlg;

/// Hashes `block` in digest-sized pieces, each with its index before it.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dl = hash.digest_len();
    for (i, piece) in block.chunks_mut(dl).enumerate() {
        let d = hash.digest(&[&(i as u32).to_be_bytes(), piece]);
        let n = piece.len();
        piece.copy_from_slice(&d[..n]);
    }
}

fn xor_into(d: &mut [u8], s: &[u8]) {
    for (a, b) in d.iter_mut().zip(s) {
        *a ^= b;
    }
}

/// Splits `key` into `stripes` blocks; `random` fills the first ones.
pub fn split(
    hash: HashAlg,
    key: &[u8],
    stripes: usize,
    random: &mut dyn FnMut(&mut [u8]),
) -> Vec<u8> {
    let n = key.len();
    let mut out = vec![0u8; n * stripes];
    random(&mut out[..n * (stripes - 1)]);
    let mut d = vec![0u8; n];
    for s in out[..n * (stripes - 1)].chunks_exact(n) {
        xor_into(&mut d, s);
        diffuse(hash, &mut d);
    }
    xor_into(&mut d, key);
    out[n * (stripes - 1)..].copy_from_slice(&d);
    out
}

/// Joins the `stripes` blocks of `material` back into a key of
/// `key_len` bytes.
pub fn merge(hash: HashAlg, material: &[u8], key_len: usize, stripes: usize) -> Vec<u8> {
    let mut d = vec![0u8; key_len];
    for s in material[..key_len * (stripes - 1)].chunks_exact(key_len) {
        xor_into(&mut d, s);
        diffuse(hash, &mut d);
    }
    xor_into(
        &mut d,
        &material[key_len * (stripes - 1)..key_len * stripes],
    );
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_merge() {
        let key: Vec<u8> = (0..64).collect();
        let mut seed = 1u8;
        let mut rnd = |b: &mut [u8]| {
            for x in b {
                seed = seed.wrapping_mul(13).wrapping_add(7);
                *x = seed;
            }
        };
        let m = split(HashAlg::Sha1, &key, 40, &mut rnd);
        assert_eq!(m.len(), 64 * 40);
        assert_eq!(merge(HashAlg::Sha1, &m, 64, 40), key);
        let mut bad = m.clone();
        bad[5] ^= 1;
        assert_ne!(merge(HashAlg::Sha1, &bad, 64, 40), key);
    }
}
