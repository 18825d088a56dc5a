//! The ringbuf (and memory) chardev: a byte ring of a power-of-two size
//! that keeps the newest bytes written, and the encodings ringbuf-read
//! and ringbuf-write use (QEMU's: its modified UTF-8 strings, glib's
//! lenient base64).
use std::collections::VecDeque;
use std::sync::Mutex;

/// QEMU's default ring size.
pub const DEFAULT_SIZE: u64 = 65536;

pub struct Ringbuf {
    size: u64,
    /// The bytes held, oldest first. Memory grows with what is written,
    /// never to `size` up front (QSD allocates it all and aborts when it
    /// cannot).
    data: Mutex<VecDeque<u8>>,
}

impl Ringbuf {
    /// A ring of `size` bytes: QEMU accepts 0 and every power of two.
    pub fn new(size: u64) -> Result<Ringbuf, String> {
        if size & size.wrapping_sub(1) != 0 {
            return Err("size of ringbuf chardev must be power of two".into());
        }
        Ok(Ringbuf {
            size,
            data: Mutex::new(VecDeque::new()),
        })
    }

    /// Appends `buf`; the oldest bytes go when the ring is full.
    pub fn write(&self, buf: &[u8]) {
        let Ok(mut d) = self.data.lock() else {
            return;
        };
        let cap = usize::try_from(self.size).unwrap_or(usize::MAX);
        let tail = &buf[buf.len().saturating_sub(cap)..];
        d.extend(tail);
        let excess = d.len().saturating_sub(cap);
        d.drain(..excess);
    }

    /// Takes up to `n` of the oldest bytes.
    pub fn read(&self, n: u64) -> Vec<u8> {
        let Ok(mut d) = self.data.lock() else {
            return Vec::new();
        };
        let n = usize::try_from(n).unwrap_or(usize::MAX).min(d.len());
        d.drain(..n).collect()
    }
}

/// The bytes QEMU's JSON parser hands ringbuf-write for a string: UTF-8,
/// with U+0000 as the two bytes C0 80 (modified UTF-8).
pub fn utf8_bytes(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        if c == '\0' {
            out.extend([0xC0, 0x80]);
        } else {
            let mut b = [0u8; 4];
            out.extend(c.encode_utf8(&mut b).as_bytes());
        }
    }
    out
}

/// The string ringbuf-read returns for `bytes` in utf8 format: QEMU ends
/// it at the first NUL byte and its JSON writer shows each invalid
/// sequence as U+FFFD and C0 80 as U+0000.
pub fn utf8_text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let mut s = &bytes[..end];
    let mut out = String::with_capacity(s.len());
    while !s.is_empty() {
        let (cp, used) = codepoint(s);
        out.push(cp.and_then(char::from_u32).unwrap_or('\u{FFFD}'));
        s = &s[used..];
    }
    out
}

fn valid_codepoint(cp: u32) -> bool {
    cp <= 0x10FFFF
        && !(0xD800..=0xDFFF).contains(&cp)
        && (cp & 0xFFFE) != 0xFFFE
        && !(0xFDD0..=0xFDEF).contains(&cp)
}

/// One code point from the start of `s` as QEMU's mod_utf8_codepoint
/// decodes it: (None for an invalid sequence, bytes consumed). A
/// sequence cut short consumes the bytes that fit it.
fn codepoint(s: &[u8]) -> (Option<u32>, usize) {
    let b0 = s[0];
    if b0 < 0x80 {
        return (Some(u32::from(b0)), 1);
    }
    if b0 >= 0xFE || b0 & 0x40 == 0 {
        return (None, 1);
    }
    let len = b0.leading_ones() as usize;
    let mut cp = u32::from(b0) & ((0x80u32 >> len) - 1);
    for i in 1..len {
        match s.get(i) {
            Some(&b) if b & 0xC0 == 0x80 => cp = (cp << 6) | u32::from(b & 0x3F),
            _ => return (None, i),
        }
    }
    const MIN: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let overlong = cp < MIN[len - 2] && !(cp == 0 && len == 2);
    if !valid_codepoint(cp) || overlong {
        return (None, len);
    }
    (Some(cp), len)
}

/// QEMU's qbase64_decode: only the base64 alphabet, `=` and newlines are
/// allowed; then glib decodes leniently (whole quads only, `=` as zero
/// bits that drop the bytes they pad).
pub fn base64_decode(input: &str) -> Result<Vec<u8>, String> {
    let rank = |c: u8| -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            b'=' => Some(0),
            _ => None,
        }
    };
    if input.bytes().any(|c| rank(c).is_none() && c != b'\n') {
        return Err("Base64 data contains invalid characters".into());
    }
    let mut out = Vec::new();
    let (mut v, mut n) = (0u32, 0);
    let mut last = [0u8; 2];
    for c in input.bytes() {
        let Some(r) = rank(c) else {
            continue;
        };
        last = [c, last[0]];
        v = (v << 6) | r;
        n += 1;
        if n == 4 {
            out.push((v >> 16) as u8);
            if last[1] != b'=' {
                out.push((v >> 8) as u8);
            }
            if last[0] != b'=' {
                out.push(v as u8);
            }
            n = 0;
        }
    }
    Ok(out)
}

pub fn base64_encode(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_bytes() {
        let r = Ringbuf::new(4).unwrap();
        r.write(b"abcdef");
        assert_eq!(r.read(10), b"cdef");
        r.write(b"xy");
        r.write(b"z");
        assert_eq!(r.read(2), b"xy");
        assert_eq!(r.read(2), b"z");
        assert!(Ringbuf::new(3).is_err());
        let empty = Ringbuf::new(0).unwrap();
        empty.write(b"abc");
        assert_eq!(empty.read(1), b"");
    }

    #[test]
    fn decodes_as_qemu() {
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hel");
        assert_eq!(base64_decode("aGVsbG8===").unwrap(), b"hello");
        assert_eq!(base64_decode("aG=Vs").unwrap(), b"h\x15");
        assert_eq!(base64_decode("aGV\nsbG8=").unwrap(), b"hello");
        assert!(base64_decode("aGV sbG8=").is_err());
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert_eq!(base64_encode(&[0xA9]), "qQ==");
        assert_eq!(utf8_text(&[0xF7, 0xF8, 0xFE]), "\u{FFFD}\u{FFFD}\u{FFFD}");
        assert_eq!(utf8_text(&[0xE2, 0x82]), "\u{FFFD}");
        assert_eq!(utf8_text(&[0xC0, 0x80, b'a']), "\0a");
        assert_eq!(utf8_text(&[0xE0, 0x80, 0x80]), "\u{FFFD}");
        assert_eq!(utf8_text(&[0xEF, 0xBF, 0xBF]), "\u{FFFD}");
        assert_eq!(utf8_text(b"a\0b"), "a");
        assert_eq!(utf8_bytes("a\0b"), b"a\xC0\x80b");
    }
}
