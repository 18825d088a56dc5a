//! QEMU's scalar parsers (booleans, integers, sizes with suffixes), as
//! its keyval visitor and QemuOpts use them; a leaf both the command
//! line and QAPI validation use.

/// QEMU's `qapi_bool_parse()`: exactly `on`/`yes`/`true`/`y` and
/// `off`/`no`/`false`/`n`, case-sensitive.  Used by both the keyval visitor
/// (`Parameter 'x' expects 'on' or 'off'`) and QemuOpts.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Why a number failed to parse (QEMU distinguishes `-EINVAL`/`-ERANGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumError {
    Invalid,
    Range,
}

/// QEMU's `qemu_strtosz()` (size with optional binary suffix).  Rules:
/// decimal integer with optional fraction (`1.5G`, `.5k`; a fraction needs a
/// suffix other than `B`), or `0x` hex without fraction or suffix; suffixes
/// `B K M G T P E` in either case; leading whitespace and `+` accepted;
/// negative numbers and values ≥ 2^64 are `Range` errors.
pub fn parse_size(s: &str) -> Option<u64> {
    qemu_strtosz(s).ok()
}

/// QEMU's `qemu_strtoi64(s, NULL, 0, ...)` as used by the keyval visitor for
/// signed integers: C `strtoll` with base 0 (decimal, `0x` hex, leading-`0`
/// octal, optional leading whitespace and sign), whole string consumed.
pub fn parse_i64(s: &str) -> Option<i64> {
    qemu_strtoi64(s).ok()
}

/// QEMU's `qemu_strtou64(s, NULL, 0, ...)` as used by the keyval visitor for
/// unsigned integers: like [`parse_i64`] but a leading `-` negates modulo
/// 2^64 (`-1` is `u64::MAX`), like C `strtoull`.
pub fn parse_u64(s: &str) -> Option<u64> {
    qemu_strtou64(s).ok()
}

fn c_isspace(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Result of scanning an integer the way glibc's `strtoull()`/`strtoll()` do.
struct IntScan {
    /// Index just past the number (0 when nothing was converted).
    end: usize,
    negative: bool,
    /// Magnitude, `None` on overflow of 64 bits.
    magnitude: Option<u64>,
}

fn digit_value(c: u8) -> Option<u32> {
    (c as char).to_digit(36)
}

/// Scan an integer like glibc `strtoull(s, &end, base)` for base 0, 10 or 16.
fn scan_int(s: &[u8], base: u32) -> IntScan {
    let mut i = 0;
    while s.get(i).is_some_and(|&c| c_isspace(c)) {
        i += 1;
    }
    let mut negative = false;
    match s.get(i) {
        Some(b'-') => {
            negative = true;
            i += 1;
        }
        Some(b'+') => i += 1,
        _ => {}
    }
    let mut base = base;
    if s.get(i) == Some(&b'0') {
        if (base == 0 || base == 16) && matches!(s.get(i + 1), Some(b'x' | b'X')) {
            i += 2;
            base = 16;
        } else if base == 0 {
            base = 8;
        }
    } else if base == 0 {
        base = 10;
    }
    let digits_start = i;
    let mut magnitude: Option<u64> = Some(0);
    while let Some(d) = s.get(i).and_then(|&c| digit_value(c)).filter(|&d| d < base) {
        magnitude = magnitude
            .and_then(|m| m.checked_mul(u64::from(base)))
            .and_then(|m| m.checked_add(u64::from(d)));
        i += 1;
    }
    if i == digits_start {
        // No digits.  "0x" followed by a non-hex digit converts the "0".
        if base == 16 && digits_start >= 2 && matches!(s[digits_start - 1], b'x' | b'X') {
            return IntScan {
                end: digits_start - 1,
                negative,
                magnitude: Some(0),
            };
        }
        return IntScan {
            end: 0,
            negative: false,
            magnitude: Some(0),
        };
    }
    IntScan {
        end: i,
        negative,
        magnitude,
    }
}

/// QEMU's `qemu_strtou64(s, NULL, 0, &v)`.
pub fn qemu_strtou64(s: &str) -> Result<u64, NumError> {
    let b = s.as_bytes();
    let sc = scan_int(b, 0);
    if sc.end == 0 || sc.end != b.len() {
        return Err(NumError::Invalid);
    }
    match sc.magnitude {
        None => Err(NumError::Range),
        Some(m) if sc.negative => Ok(m.wrapping_neg()),
        Some(m) => Ok(m),
    }
}

/// QEMU's `qemu_strtoi64(s, NULL, 0, &v)`.
pub fn qemu_strtoi64(s: &str) -> Result<i64, NumError> {
    let b = s.as_bytes();
    let sc = scan_int(b, 0);
    if sc.end == 0 || sc.end != b.len() {
        return Err(NumError::Invalid);
    }
    let m = i128::from(sc.magnitude.ok_or(NumError::Range)?);
    let v = if sc.negative { -m } else { m };
    i64::try_from(v).map_err(|_| NumError::Range)
}

/// QEMU's `parse_uint(s, &end, 10, &v)`: (result, end, value).
fn parse_uint10(s: &[u8]) -> (Result<(), NumError>, usize, u64) {
    let sc = scan_int(s, 10);
    if sc.end == 0 {
        return (Err(NumError::Invalid), 0, 0);
    }
    let Some(m) = sc.magnitude else {
        return (Err(NumError::Range), sc.end, u64::MAX);
    };
    if sc.negative {
        return (Err(NumError::Range), sc.end, 0);
    }
    (Ok(()), sc.end, m)
}

fn suffix_mul(c: Option<u8>) -> Option<u64> {
    let shift = match c?.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// C `strtod()` restricted to what `qemu_strtosz()` can feed it (a copy of
/// the text with exponents cut off, starting at `.` or at the very start when
/// no integer digits were found).  Returns (ok, consumed, value, any nonzero
/// digit).  Infinities and NaNs fail like `qemu_strtod_finite()` does.
fn strtod_fraction(c: &[u8]) -> (bool, usize, f64, bool) {
    let mut i = 0;
    while c.get(i).is_some_and(|&b| c_isspace(b)) {
        i += 1;
    }
    let mut negative = false;
    match c.get(i) {
        Some(b'-') => {
            negative = true;
            i += 1;
        }
        Some(b'+') => i += 1,
        _ => {}
    }
    let int_start = i;
    while c.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    let int_digits = &c[int_start..i];
    let mut frac_digits: &[u8] = &[];
    if c.get(i) == Some(&b'.') {
        let fs = i + 1;
        let mut j = fs;
        while c.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        if j > fs || !int_digits.is_empty() {
            frac_digits = &c[fs..j];
            i = j;
        }
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        return (false, 0, 0.0, false);
    }
    let text = format!(
        "{}.{}",
        if int_digits.is_empty() {
            "0".to_string()
        } else {
            lossy(int_digits)
        },
        if frac_digits.is_empty() {
            "0".to_string()
        } else {
            lossy(frac_digits)
        }
    );
    let mut value: f64 = text.parse().unwrap_or(0.0);
    if !value.is_finite() {
        return (false, 0, 0.0, false);
    }
    let nonzero = int_digits.iter().chain(frac_digits).any(|&d| d != b'0');
    if negative {
        value = -value;
    }
    (true, i, value, nonzero)
}

/// QEMU's `qemu_strtosz(s, NULL, &v)`, distinguishing `-EINVAL` from
/// `-ERANGE` (QemuOpts reports them differently; the keyval visitor reports
/// both as `Parameter 'x' expects size`).
pub fn qemu_strtosz(s: &str) -> Result<u64, NumError> {
    let b = s.as_bytes();
    let (mut retval, mut endptr, mut val) = parse_uint10(b);
    let mut valf: u64 = 0;

    let result = 'out: {
        if retval == Err(NumError::Range) {
            break 'out retval;
        }
        if retval.is_ok() && val == 0 && matches!(b.get(endptr), Some(b'x' | b'X')) {
            // Looks like hex: reparse, and insist on no fraction or suffix.
            let sc = scan_int(b, 16);
            if sc.end == 0 {
                endptr = 0;
                break 'out Err(NumError::Invalid);
            }
            endptr = sc.end;
            let Some(m) = sc.magnitude else {
                break 'out Err(NumError::Range);
            };
            val = if sc.negative { m.wrapping_neg() } else { m };
            if b.get(endptr) == Some(&b'.') || suffix_mul(b.get(endptr).copied()).is_some() {
                endptr = 0;
                break 'out Err(NumError::Invalid);
            }
        } else if b.get(endptr) == Some(&b'.') || (endptr == 0 && b.contains(&b'.')) {
            let mut fraction = 0.0f64;
            let mut nonzero = false;
            if retval.is_ok() && !b.get(endptr + 1).is_some_and(u8::is_ascii_digit) {
                // "1." or "1.k": no fractional digits.
                endptr += 1;
            } else {
                let copy = &b[endptr..];
                let cut = copy
                    .iter()
                    .position(|&c| c == b'e' || c == b'E')
                    .unwrap_or(copy.len());
                let (ok, consumed, f, nz) = strtod_fraction(&copy[..cut]);
                retval = if ok { Ok(()) } else { Err(NumError::Invalid) };
                endptr += consumed;
                fraction = f;
                nonzero = nz;
                if fraction.is_sign_negative() {
                    break 'out Err(NumError::Range);
                }
            }
            if fraction == 1.0 {
                if val == u64::MAX {
                    break 'out Err(NumError::Range);
                }
                val += 1;
            } else if retval.is_ok() {
                // 0.64 fixed point; any nonzero fraction (even one that
                // underflows) must give a nonzero value.
                valf = (fraction * 18_446_744_073_709_551_616.0) as u64;
                if valf == 0 && nonzero {
                    valf = 1;
                }
            }
        }
        if retval.is_err() {
            break 'out retval;
        }
        let mul = match suffix_mul(b.get(endptr).copied()) {
            Some(m) => {
                endptr += 1;
                m
            }
            None => 1,
        };
        if mul == 1 {
            // A fraction requires a scaling suffix.
            if valf != 0 {
                endptr = 0;
                break 'out Err(NumError::Invalid);
            }
        } else {
            let m = u128::from(mul);
            let fracprod = u128::from(valf) * m;
            let total = u128::from(val) * m + (fracprod >> 64) + ((fracprod as u64 >> 63) as u128);
            match u64::try_from(total) {
                Ok(v) => val = v,
                Err(_) => break 'out Err(NumError::Range),
            }
        }
        Ok(())
    };

    if endptr < b.len() {
        return Err(NumError::Invalid);
    }
    result.map(|()| val)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
