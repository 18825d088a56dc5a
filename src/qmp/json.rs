//! QMP wire JSON, byte-compatible with QEMU's `qobject` JSON code.
//!
//! Input: [`JsonStreamer`] splits a raw byte stream into top-level JSON
//! values with the semantics of QEMU's lexer (json-lexer.c), streamer
//! (json-streamer.c) and parser (json-parser.c), including their exact
//! error texts and error recovery.
//!
//! Output: [`to_qmp_string`] renders a value like QEMU's JSON writer:
//! pure ASCII, `%.17g` doubles, QDict key order, optional pretty layout.

use std::cmp::Reverse;
use std::fmt::Write as _;

pub use serde_json::{Map, Number, Value};

/// Longest token / total token text of one message (QEMU: 64 MiB).
const MAX_TOKEN_SIZE: usize = 64 << 20;
/// Most tokens in one message (QEMU: 2 Mi).
const MAX_TOKEN_COUNT: usize = 2 << 20;
/// Deepest nesting of `{` plus `[` in one message.
const MAX_NESTING: i64 = 1 << 10;
/// Buffer capacity kept between messages.
const KEEP_CAPACITY: usize = 64 << 10;
/// Number of hash buckets of a QEMU QDict.
const QDICT_BUCKETS: u32 = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    Str,
}

/// Lexer states; `bool` fields mean "single-quoted string".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lex {
    Start,
    Recovery,
    Str(bool),
    StrEscape(bool),
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// What the lexer does with one input byte.
enum Step {
    /// Consume the byte and go to the state.
    Next(Lex),
    /// Consume the byte; it completes a token.
    Emit(Kind),
    /// The token ended before this byte; re-examine the byte in `Start`.
    EmitBefore(Kind),
    /// Consume insignificant whitespace.
    Whitespace,
    /// Leave error recovery; re-examine the byte in `Start`.
    Resync,
    /// Consume the byte; the token is invalid.
    Error,
}

fn step(state: Lex, b: u8) -> Step {
    use Step::*;
    let digit = b.is_ascii_digit();
    match state {
        Lex::Start => match b {
            b'"' => Next(Lex::Str(false)),
            b'\'' => Next(Lex::Str(true)),
            b'0' => Next(Lex::Zero),
            b'1'..=b'9' => Next(Lex::Digits),
            b'-' => Next(Lex::Sign),
            b'{' => Emit(Kind::LCurly),
            b'}' => Emit(Kind::RCurly),
            b'[' => Emit(Kind::LSquare),
            b']' => Emit(Kind::RSquare),
            b':' => Emit(Kind::Colon),
            b',' => Emit(Kind::Comma),
            b'a'..=b'z' => Next(Lex::Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Whitespace,
            _ => Error,
        },
        // Skip until a structural character, a control character other
        // than tab, or one of the impossible UTF-8 bytes 0xFE / 0xFF.
        Lex::Recovery => match b {
            b'\t' => Next(Lex::Recovery),
            0..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' | b':' | b',' => Resync,
            _ => Next(Lex::Recovery),
        },
        Lex::Str(sq) => match b {
            b'\\' => Next(Lex::StrEscape(sq)),
            b'"' if !sq => Emit(Kind::Str),
            b'\'' if sq => Emit(Kind::Str),
            0x20..=0xfd => Next(Lex::Str(sq)),
            _ => Error,
        },
        Lex::StrEscape(sq) => match b {
            0x20..=0xfd => Next(Lex::Str(sq)),
            _ => Error,
        },
        Lex::Zero => match b {
            b'.' => Next(Lex::Mantissa),
            _ if digit => Error,
            _ => EmitBefore(Kind::Integer),
        },
        Lex::Sign => match b {
            b'0' => Next(Lex::Zero),
            b'1'..=b'9' => Next(Lex::Digits),
            _ => Error,
        },
        Lex::Digits => match b {
            b'e' | b'E' => Next(Lex::ExpE),
            b'.' => Next(Lex::Mantissa),
            _ if digit => Next(Lex::Digits),
            _ => EmitBefore(Kind::Integer),
        },
        Lex::Mantissa if digit => Next(Lex::MantissaDigits),
        Lex::MantissaDigits => match b {
            b'e' | b'E' => Next(Lex::ExpE),
            _ if digit => Next(Lex::MantissaDigits),
            _ => EmitBefore(Kind::Float),
        },
        Lex::ExpE if b == b'+' || b == b'-' => Next(Lex::ExpSign),
        Lex::ExpE | Lex::ExpSign if digit => Next(Lex::ExpDigits),
        Lex::ExpDigits if digit => Next(Lex::ExpDigits),
        Lex::ExpDigits => EmitBefore(Kind::Float),
        Lex::Keyword if b.is_ascii_lowercase() => Next(Lex::Keyword),
        Lex::Keyword => EmitBefore(Kind::Keyword),
        Lex::Mantissa | Lex::ExpE | Lex::ExpSign => Error,
    }
}

#[derive(Clone, Copy, Debug)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// Incremental QMP input parser with QEMU's json-streamer semantics.
#[derive(Debug)]
pub struct JsonStreamer {
    lex: Lex,
    /// Text of the token being lexed.
    token: Vec<u8>,
    /// Tokens of the message being accumulated; their text is in `text`.
    tokens: Vec<Token>,
    text: Vec<u8>,
    braces: i64,
    brackets: i64,
    /// MAX_TOKEN_SIZE, lowered by tests.
    max_token_size: usize,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStreamer {
    pub fn new() -> Self {
        JsonStreamer {
            lex: Lex::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            text: Vec::new(),
            braces: 0,
            brackets: 0,
            max_token_size: MAX_TOKEN_SIZE,
        }
    }

    /// Feed raw bytes (any split). Returns every completed top-level message, in order:
    /// Ok(value) or Err(desc) where desc is QEMU's exact error text, e.g. "JSON parse error, expecting value".
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Value, String>> {
        let mut out = Vec::new();
        for &b in bytes {
            self.feed_byte(b, &mut out);
        }
        out
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<Result<Value, String>>) {
        loop {
            match step(self.lex, b) {
                Step::Next(state) => {
                    if state != Lex::Recovery {
                        self.token.push(b);
                    }
                    self.lex = state;
                    break;
                }
                Step::Emit(kind) => {
                    self.token.push(b);
                    self.lex = Lex::Start;
                    self.token_done(kind, out);
                    break;
                }
                Step::EmitBefore(kind) => {
                    self.lex = Lex::Start;
                    self.token_done(kind, out);
                }
                Step::Whitespace => {
                    self.lex = Lex::Start;
                    break;
                }
                Step::Resync => self.lex = Lex::Start,
                Step::Error => {
                    self.token.push(b);
                    let msg = format!("JSON parse error, stray '{}'", c_str_lossy(&self.token));
                    self.token.clear();
                    self.lex = Lex::Recovery;
                    self.emit(Err(msg), out);
                    break;
                }
            }
        }
        if self.token.len() > self.max_token_size {
            self.token.clear();
            self.lex = Lex::Start;
            self.emit(Err("JSON token size limit exceeded".into()), out);
        }
    }

    /// The streamer: account for a completed token, and parse the
    /// accumulated tokens once the brackets balance (or go negative).
    fn token_done(&mut self, kind: Kind, out: &mut Vec<Result<Value, String>>) {
        match kind {
            Kind::LCurly => self.braces += 1,
            Kind::RCurly => self.braces -= 1,
            Kind::LSquare => self.brackets += 1,
            Kind::RSquare => self.brackets -= 1,
            _ => {}
        }
        let limit = if self.text.len() + self.token.len() + 1 > self.max_token_size {
            Some("JSON token size limit exceeded")
        } else if self.tokens.len() + 1 > MAX_TOKEN_COUNT {
            Some("JSON token count limit exceeded")
        } else if self.braces + self.brackets > MAX_NESTING {
            Some("JSON nesting depth limit exceeded")
        } else {
            None
        };
        if let Some(msg) = limit {
            self.token.clear();
            return self.emit(Err(msg.into()), out);
        }
        let start = self.text.len();
        self.text.append(&mut self.token);
        self.tokens.push(Token {
            kind,
            start,
            end: self.text.len(),
        });
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let result = parse(&self.tokens, &self.text);
        self.emit(result, out);
    }

    /// Emit a message and start accumulating the next one.
    fn emit(&mut self, msg: Result<Value, String>, out: &mut Vec<Result<Value, String>>) {
        self.braces = 0;
        self.brackets = 0;
        self.tokens.clear();
        self.text.clear();
        // Don't keep the memory of a huge message around.
        self.tokens.shrink_to(KEEP_CAPACITY);
        self.text.shrink_to(KEEP_CAPACITY);
        self.token.shrink_to(KEEP_CAPACITY);
        out.push(msg);
    }
}

fn parse_error(msg: impl std::fmt::Display) -> String {
    format!("JSON parse error, {msg}")
}

fn premature_eoi() -> String {
    parse_error("premature EOI")
}

/// A container being parsed; an object remembers the key whose value
/// comes next, if any.
enum Frame {
    Array(Vec<Value>),
    Object(Map<String, Value>, Option<String>),
}

/// Parse one message's tokens into a value, with json-parser.c's grammar
/// and error texts.  Iterative, so deep nesting needs no stack.
fn parse(tokens: &[Token], text: &[u8]) -> Result<Value, String> {
    let mut tokens = tokens
        .iter()
        .map(|t| (t.kind, text.get(t.start..t.end).unwrap_or_default()));
    let mut next_kind = move || tokens.next().ok_or_else(premature_eoi);
    let mut stack: Vec<Frame> = Vec::new();
    let mut pending = None;
    loop {
        // Parse a value, or open a container.
        let (kind, text) = match pending.take() {
            Some(token) => token,
            None => next_kind()?,
        };
        let mut value = match kind {
            Kind::LCurly | Kind::LSquare => {
                let (next, next_text) = next_kind()?;
                let empty = match kind {
                    Kind::LCurly => (next == Kind::RCurly).then(|| Value::Object(Map::new())),
                    _ => (next == Kind::RSquare).then(|| Value::Array(Vec::new())),
                };
                match empty {
                    Some(value) => value,
                    None => {
                        stack.push(match kind {
                            Kind::LCurly => Frame::Object(Map::new(), None),
                            _ => Frame::Array(Vec::new()),
                        });
                        pending = Some((next, next_text));
                        continue;
                    }
                }
            }
            Kind::Integer | Kind::Float | Kind::Str | Kind::Keyword => literal(kind, text)?,
            _ => return Err(parse_error("expecting value")),
        };
        // Hand the value to the enclosing containers, closing those that end.
        loop {
            match stack.last_mut() {
                None => return Ok(value),
                Some(Frame::Array(list)) => {
                    list.push(value);
                    match next_kind()?.0 {
                        Kind::Comma => break,
                        Kind::RSquare => value = Value::Array(std::mem::take(list)),
                        _ => return Err(parse_error("expected separator in list")),
                    }
                }
                Some(Frame::Object(_, key @ None)) => {
                    let Value::String(name) = value else {
                        return Err(parse_error("key is not a string in object"));
                    };
                    if next_kind()?.0 != Kind::Colon {
                        return Err(parse_error("missing : in object pair"));
                    }
                    *key = Some(name);
                    break;
                }
                Some(Frame::Object(map, key)) => {
                    let name = key.take().unwrap_or_default();
                    if map.contains_key(&name) {
                        return Err(parse_error("duplicate key"));
                    }
                    map.insert(name, value);
                    match next_kind()?.0 {
                        Kind::Comma => break,
                        Kind::RCurly => value = Value::Object(std::mem::take(map)),
                        _ => return Err(parse_error("expected separator in dict")),
                    }
                }
            }
            stack.pop();
        }
    }
}

fn literal(kind: Kind, text: &[u8]) -> Result<Value, String> {
    match kind {
        Kind::Str => parse_string(text).map(Value::String),
        Kind::Keyword => match text {
            b"true" => Ok(Value::Bool(true)),
            b"false" => Ok(Value::Bool(false)),
            b"null" => Ok(Value::Null),
            _ => Err(parse_error(format_args!(
                "invalid keyword '{}'",
                c_str_lossy(text)
            ))),
        },
        _ => Ok(parse_number(text, kind == Kind::Integer)),
    }
}

/// Integers become i64 if they fit, else u64, else double; everything
/// else is a double.
fn parse_number(text: &[u8], integer: bool) -> Value {
    let s = std::str::from_utf8(text).unwrap_or_default();
    if integer {
        if let Ok(i) = s.parse::<i64>() {
            return Value::from(i);
        }
        if let Ok(u) = s.parse::<u64>() {
            return Value::from(u);
        }
    }
    let d = s.parse::<f64>().unwrap_or_default();
    // QEMU keeps an overflowing literal as infinity (and prints "inf");
    // serde_json cannot hold that, so use the largest finite double.
    let d = if d.is_finite() {
        d
    } else {
        f64::MAX.copysign(d)
    };
    Number::from_f64(d).map_or(Value::Null, Value::Number)
}

/// Value of a 4-digit hex escape at `pos`, or None.
fn hex4(text: &[u8], pos: usize) -> Option<u32> {
    let digits = text.get(pos..pos + 4)?;
    let s = std::str::from_utf8(digits).ok()?;
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// Unicode scalar values QEMU accepts: no surrogates, no noncharacters.
fn valid_char(cp: u32) -> Option<char> {
    if (0xfdd0..=0xfdef).contains(&cp) || cp & 0xfffe == 0xfffe {
        return None;
    }
    char::from_u32(cp)
}

/// Decode a string token (with its quotes) the way json-parser.c does.
fn parse_string(text: &[u8]) -> Result<String, String> {
    let quote = text.first().copied().unwrap_or(b'"');
    let mut out = String::new();
    let mut i = 1;
    while let Some(&b) = text.get(i) {
        if b == quote {
            break;
        }
        if b != b'\\' {
            match mod_utf8_decode(&text[i..]) {
                (Some(c), len) => {
                    out.push(c);
                    i += len;
                }
                (None, _) => return Err(parse_error("invalid UTF-8 sequence in string")),
            }
            continue;
        }
        let escape = i;
        let c = text.get(i + 1).copied().unwrap_or(0);
        i += 2;
        out.push(match c {
            b'"' | b'\'' | b'\\' | b'/' => char::from(c),
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let mut cp = hex4(text, i);
                i += 4;
                if let Some(lead @ 0xd800..=0xdbff) = cp {
                    if text.get(i..i + 2) == Some(b"\\u") {
                        cp = match hex4(text, i + 2) {
                            Some(trail @ 0xdc00..=0xdfff) => {
                                i += 6;
                                Some(0x10000 + ((lead & 0x3ff) << 10) + (trail & 0x3ff))
                            }
                            _ => None,
                        };
                    }
                }
                match cp.and_then(valid_char) {
                    Some(c) => c,
                    None => {
                        let seq = &text[escape..i.min(text.len())];
                        return Err(parse_error(format_args!(
                            "{} is not a valid Unicode character",
                            c_str_lossy(seq)
                        )));
                    }
                }
            }
            _ => return Err(parse_error("invalid escape sequence in string")),
        });
    }
    Ok(out)
}

/// Decode one modified-UTF-8 sequence (like QEMU's mod_utf8_codepoint):
/// returns the character, or None if invalid, and the bytes it spans.
/// "\xC0\x80" encodes U+0000; noncharacters and surrogates are invalid.
fn mod_utf8_decode(s: &[u8]) -> (Option<char>, usize) {
    let Some(&first) = s.first() else {
        return (None, 0);
    };
    if first < 0x80 {
        return (Some(char::from(first)), 1);
    }
    if first >= 0xfe || first & 0x40 == 0 {
        return (None, 1);
    }
    let len = first.leading_ones() as usize;
    let mut cp = u32::from(first) & (0x7f >> len);
    for i in 1..len {
        match s.get(i) {
            Some(&b) if b & 0xc0 == 0x80 => cp = cp << 6 | u32::from(b & 0x3f),
            _ => return (None, i),
        }
    }
    const MIN: [u32; 5] = [0x80, 0x800, 0x10000, 0x20_0000, 0x400_0000];
    let overlong = cp < MIN[len - 2] && !(cp == 0 && len == 2);
    (if overlong { None } else { valid_char(cp) }, len)
}

/// Bytes as QEMU would print them through `%s` and its JSON writer: cut
/// at the first NUL, invalid sequences become U+FFFD.
fn c_str_lossy(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let mut rest = &bytes[..end];
    let mut out = String::new();
    while !rest.is_empty() {
        let (c, len) = mod_utf8_decode(rest);
        out.push(c.unwrap_or('\u{fffd}'));
        rest = rest.get(len.max(1)..).unwrap_or_default();
    }
    out
}

/// QEMU's tdb_hash over the key as QEMU stores it (modified UTF-8).
fn tdb_hash(key: &str) -> u32 {
    let mut bytes = Vec::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            0 => bytes.extend([0xc0, 0x80]),
            _ => bytes.push(b),
        }
    }
    let mut v = 0x238f_13afu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        v = v.wrapping_add(u32::from(b) << (i * 5 % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345)
}

/// QEMU QDict iteration order of keys given in insertion order: by hash
/// bucket, and within a bucket newest-inserted first.
pub fn qdict_order<'a>(keys: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut keyed: Vec<_> = keys
        .into_iter()
        .enumerate()
        .map(|(i, k)| (tdb_hash(k) % QDICT_BUCKETS, Reverse(i), k))
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, _, k)| k).collect()
}

/// Serialize the way QEMU's monitor does: compact = `{"a": 1, "b": [1, 2]}`; pretty = QEMU's pretty layout.
/// Newlines are "\n" (the monitor turns them into CRLF). No trailing newline.
pub fn to_qmp_string(v: &Value, pretty: bool) -> String {
    /// The members of a container being written, and how many are done.
    enum Members<'a> {
        Array(std::slice::Iter<'a, Value>),
        Object(&'a Map<String, Value>, std::vec::IntoIter<&'a str>),
    }
    let mut out = String::new();
    let mut stack: Vec<(Members, usize)> = Vec::new();
    let mut next = Some(v);
    loop {
        match next.take() {
            Some(Value::Array(list)) => {
                out.push('[');
                stack.push((Members::Array(list.iter()), 0));
            }
            Some(Value::Object(map)) => {
                out.push('{');
                let keys = qdict_order(map.keys().map(String::as_str));
                stack.push((Members::Object(map, keys.into_iter()), 0));
            }
            Some(scalar) => write_scalar(&mut out, scalar),
            None => {}
        }
        let depth = stack.len();
        let Some((members, done)) = stack.last_mut() else {
            return out;
        };
        let member = match members {
            Members::Array(items) => items.next().map(|item| (None, item)),
            Members::Object(map, keys) => keys.find_map(|k| Some((Some(k), map.get(k)?))),
        };
        match member {
            Some((key, item)) => {
                write_separator(&mut out, *done, pretty, depth);
                *done += 1;
                if let Some(key) = key {
                    write_str(&mut out, key);
                    out.push_str(": ");
                }
                next = Some(item);
            }
            None => {
                write_newline(&mut out, pretty, depth - 1);
                out.push(match members {
                    Members::Array(_) => ']',
                    Members::Object(..) => '}',
                });
                stack.pop();
            }
        }
    }
}

fn write_scalar(out: &mut String, v: &Value) {
    match v {
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        _ => out.push_str("null"),
    }
}

fn write_separator(out: &mut String, index: usize, pretty: bool, depth: usize) {
    if index > 0 {
        out.push(',');
        if !pretty {
            out.push(' ');
        }
    }
    write_newline(out, pretty, depth);
}

fn write_newline(out: &mut String, pretty: bool, depth: usize) {
    if pretty {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', depth * 4));
    }
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else {
        out.push_str(&format_g17(n.as_f64().unwrap_or_default()));
    }
}

/// C's `printf("%.17g", d)` for finite `d`.
fn format_g17(d: f64) -> String {
    if !d.is_finite() {
        return if d.is_nan() {
            "nan".into()
        } else if d > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    // 17 significant digits, correctly rounded: "[-]D.DDDDDDDDDDDDDDDDeX".
    let sci = format!("{d:.16e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let digits = digits.trim_end_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    if !(-4..17).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() { "" } else { "." };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{dot}{rest}e{exp_sign}{:02}", exp.abs())
    } else if exp < 0 {
        let zeros = "0".repeat((-exp - 1) as usize);
        format!("{sign}0.{zeros}{digits}")
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            let zeros = "0".repeat(int_len - digits.len());
            format!("{sign}{digits}{zeros}")
        } else {
            let (int, frac) = digits.split_at(int_len);
            format!("{sign}{int}.{frac}")
        }
    }
}

/// Quoted string, pure ASCII, like QEMU's JSON writer.
fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                // QEMU's decoder rejects noncharacters; it prints U+FFFD.
                let cp = valid_char(u32::from(c)).map_or(0xfffd, u32::from);
                if cp > 0xffff {
                    let cp = cp - 0x10000;
                    let _ = write!(
                        out,
                        "\\u{:04X}\\u{:04X}",
                        0xd800 + (cp >> 10),
                        0xdc00 + (cp & 0x3ff)
                    );
                } else {
                    let _ = write!(out, "\\u{cp:04X}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn feed_all(input: &[u8]) -> Vec<Result<Value, String>> {
        JsonStreamer::new().feed(input)
    }

    fn err(desc: &str) -> Result<Value, String> {
        Err(desc.to_string())
    }

    fn perr(what: &str) -> Result<Value, String> {
        Err(format!("JSON parse error, {what}"))
    }

    fn compact(v: &Value) -> String {
        to_qmp_string(v, false)
    }

    #[test]
    fn tdb_hash_matches_reference() {
        assert_eq!(tdb_hash("return"), 4214570897);
        assert_eq!(tdb_hash("id"), 1668787174);
        assert_eq!(tdb_hash(""), 12345);
        assert_eq!(tdb_hash("minor") % 512, 225);
        assert_eq!(tdb_hash("micro") % 512, 225);
    }

    #[test]
    fn key_order_examples() {
        assert_eq!(
            compact(&json!({"return": {}, "id": 1})),
            r#"{"return": {}, "id": 1}"#
        );
        assert_eq!(
            compact(&json!({"error": 2, "id": 1})),
            r#"{"id": 1, "error": 2}"#
        );
        assert_eq!(qdict_order(["id", "error"]), ["id", "error"]);
        // Same bucket: newest first.
        assert_eq!(qdict_order(["aa", "aq"]), ["aq", "aa"]);
        assert_eq!(qdict_order(["aq", "aa"]), ["aa", "aq"]);
        let greeting = json!({"QMP": {
            "version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "p"},
            "capabilities": ["oob"]}});
        assert_eq!(
            compact(&greeting),
            r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "p"}, "capabilities": ["oob"]}}"#
        );
        // Parsing keeps insertion order; printing uses QDict order.
        let v = feed_all(br#"{"execute":"x","id":{"aa":1,"aq":2}}"#);
        assert_eq!(
            compact(v[0].as_ref().unwrap()),
            r#"{"execute": "x", "id": {"aq": 2, "aa": 1}}"#
        );
    }

    #[test]
    fn stream_framing() {
        let mut s = JsonStreamer::new();
        assert_eq!(
            s.feed(b"{\"a\": 1}{\"b\":\r\n\t[1, 2]} "),
            [Ok(json!({"a": 1})), Ok(json!({"b": [1, 2]}))]
        );
        // A number ends only at the next byte.
        assert_eq!(s.feed(b"123"), []);
        assert_eq!(s.feed(b"\n"), [Ok(json!(123))]);
        assert_eq!(s.feed(b"true"), []);
        assert_eq!(s.feed(b"\"s\""), [Ok(json!(true)), Ok(json!("s"))]);
        assert_eq!(s.feed(b"}"), [perr("expecting value")]);
        assert_eq!(s.feed(b"]"), [perr("expecting value")]);
        assert_eq!(s.feed(b"[1]]"), [Ok(json!([1])), perr("expecting value")]);
    }

    #[test]
    fn split_feeds() {
        let msg = br#"{"execute": "query-version", "arguments": {"a": [1, -2.5e3, "x\u00e9y", 'q', null]}, "id": "abc"}"#;
        let whole = feed_all(msg);
        assert_eq!(whole.len(), 1);
        assert!(whole[0].is_ok());
        for split in 0..msg.len() {
            let mut s = JsonStreamer::new();
            let mut got = s.feed(&msg[..split]);
            got.extend(s.feed(&msg[split..]));
            assert_eq!(got, whole, "split at {split}");
        }
        let mut s = JsonStreamer::new();
        let mut got = Vec::new();
        for b in msg.iter().chain(msg.iter()) {
            got.extend(s.feed(std::slice::from_ref(b)));
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], whole[0]);
        assert_eq!(got[1], whole[0]);
    }

    #[test]
    fn lexer_errors_and_recovery() {
        let ok = Ok(json!({"execute": "query-version"}));
        assert_eq!(
            feed_all(b"\xff\xfe{\"execute\": \"query-version\"}"),
            [
                perr("stray '\u{fffd}'"),
                perr("stray '\u{fffd}'"),
                ok.clone()
            ]
        );
        assert_eq!(
            feed_all(b"\x00{\"execute\": \"query-version\"}"),
            [perr("stray ''"), ok.clone()]
        );
        let mut s = JsonStreamer::new();
        assert_eq!(
            s.feed(b"{\"execute\": \"query-version\", \"id\": \"abc\n"),
            [perr("stray '\"abc\n'")]
        );
        assert_eq!(s.feed(b"\"}"), [perr("expecting value")]);
        assert_eq!(s.feed(b"{\"execute\": \"query-version\"}"), [ok]);
        // Recovery skips ordinary bytes (but not tab) up to a structural
        // character or control character.
        assert_eq!(
            feed_all(b"T \t\"x\" 1 {}"),
            [perr("stray 'T'"), Ok(json!({}))]
        );
        assert_eq!(feed_all(b"Tx\n1\n"), [perr("stray 'T'"), Ok(json!(1))]);
        assert_eq!(
            feed_all(b"\x01\x01"),
            [perr("stray '\u{1}'"), perr("stray '\u{1}'")]
        );
        // The error discards the partial message.
        assert_eq!(
            feed_all(b"{\"a\": [1, %d]}{}"),
            [
                perr("stray '%'"),
                perr("expecting value"),
                perr("expecting value"),
                Ok(json!({}))
            ]
        );
    }

    #[test]
    fn lexer_error_texts() {
        let cases: &[(&[u8], &str)] = &[
            (b"01", "stray '01'"),
            (b"-a", "stray '-a'"),
            (b"1.x", "stray '1.x'"),
            (b"1e+x", "stray '1e+x'"),
            (b"1ex", "stray '1ex'"),
            (b"Tru", "stray 'T'"),
            (b"%d", "stray '%'"),
            (b"\x7f", "stray '\u{7f}'"),
            (b"\"a\\\x01", "stray '\"a\\\u{1}'"),
            (b"\"a\xff", "stray '\"a\u{fffd}'"),
            (b"\"\xc3\xa9\x00", "stray '\"\u{e9}'"),
        ];
        for (input, desc) in cases {
            assert_eq!(feed_all(input), [perr(desc)], "{input:?}");
        }
    }

    #[test]
    fn parser_error_texts() {
        let cases: &[(&[u8], &str)] = &[
            (b"{\"id\":1,\"id\":2}", "duplicate key"),
            (b"{1:2}", "key is not a string in object"),
            (b"{[1]:2}", "key is not a string in object"),
            (b"{[1 2]:2}", "expected separator in list"),
            (b"{:2}", "expecting value"),
            (b"{\"a\"}", "missing : in object pair"),
            (b"{\"a\" 1}", "missing : in object pair"),
            (b"{\"a\":1 \"b\":2}", "expected separator in dict"),
            (b"[1 2]", "expected separator in list"),
            (b"{\"a\":}", "expecting value"),
            (b"[1,]", "expecting value"),
            (b"[,]", "expecting value"),
            (b"{\"a\":1,}", "expecting value"),
            (b"[}", "expecting value"),
            (b"{\"a\":1]", "expected separator in dict"),
            (b"tru\n", "invalid keyword 'tru'"),
            (b"nul ", "invalid keyword 'nul'"),
            (b"[truex]", "invalid keyword 'truex'"),
            (b"\"\\x\"", "invalid escape sequence in string"),
            (b"\"\\u12\"", "\\u12\" is not a valid Unicode character"),
            (
                b"\"\\u12\xc3\xa9\"",
                "\\u12\u{e9} is not a valid Unicode character",
            ),
            (b"\"\\u12g4\"", "\\u12g4 is not a valid Unicode character"),
            (b"\"\\uD800\"", "\\uD800 is not a valid Unicode character"),
            (b"\"\\uDC00\"", "\\uDC00 is not a valid Unicode character"),
            (
                b"\"\\uD800\\u0041\"",
                "\\uD800 is not a valid Unicode character",
            ),
            (
                b"\"\\uDBFF\\uDFFF\"",
                "\\uDBFF\\uDFFF is not a valid Unicode character",
            ),
            (b"\"\\uFFFF\"", "\\uFFFF is not a valid Unicode character"),
            (b"\"\\uFDD0\"", "\\uFDD0 is not a valid Unicode character"),
            (b"\"\xef\xbf\xbf\"", "invalid UTF-8 sequence in string"),
            (b"\"\xc3\"", "invalid UTF-8 sequence in string"),
            (b"\"\xed\xa0\x80\"", "invalid UTF-8 sequence in string"),
            (b"\"\xe0\x80\xaf\"", "invalid UTF-8 sequence in string"),
            (b"\"\x80\"", "invalid UTF-8 sequence in string"),
            (b"\"\xf4\x90\x80\x80\"", "invalid UTF-8 sequence in string"),
        ];
        for (input, desc) in cases {
            assert_eq!(
                feed_all(input),
                [perr(desc)],
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn strings() {
        let cases: &[(&[u8], &str)] = &[
            (b"'it\\'s \"q\"'", "it's \"q\""),
            (
                b"\"\\\"\\'\\\\\\/\\b\\f\\n\\r\\t\"",
                "\"'\\/\u{8}\u{c}\n\r\t",
            ),
            (
                b"\"\\u00e9\\u20AC\\uD83D\\uDE00\"",
                "\u{e9}\u{20ac}\u{1f600}",
            ),
            (b"\"\\u0000a\"", "\0a"),
            (b"\"\xc0\x80b\"", "\0b"),
            (b"\"a\x7fb\xf0\x9f\x98\x80\"", "a\u{7f}b\u{1f600}"),
        ];
        for (input, want) in cases {
            assert_eq!(
                feed_all(input),
                [Ok(json!(want))],
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(compact(&json!("\0a")), r#""\u0000a""#);
    }

    #[test]
    fn numbers_parse() {
        let v = feed_all(b"[0, -0, 9223372036854775807, -9223372036854775808, 18446744073709551615, 18446744073709551616, -9223372036854775809, 1.0, 1e3, 2E-2, -0.0, 1e999, -1e999]");
        let Ok(Value::Array(list)) = &v[0] else {
            panic!("{v:?}")
        };
        assert_eq!(list[0].as_i64(), Some(0));
        assert_eq!(list[1].as_i64(), Some(0));
        assert_eq!(list[2].as_i64(), Some(i64::MAX));
        assert_eq!(list[3].as_i64(), Some(i64::MIN));
        assert_eq!(list[4].as_u64(), Some(u64::MAX));
        assert_eq!(list[5].as_f64(), Some(18446744073709551616.0));
        assert!(list[5].is_f64());
        assert!(list[6].is_f64());
        assert!(list[7].is_f64());
        assert!(list[8].is_f64());
        assert_eq!(list[9].as_f64(), Some(0.02));
        assert!(list[10]
            .as_f64()
            .is_some_and(|d| d == 0.0 && d.is_sign_negative()));
        assert_eq!(list[11].as_f64(), Some(f64::MAX));
        assert_eq!(list[12].as_f64(), Some(-f64::MAX));
    }

    #[test]
    fn number_formatting() {
        let cases: &[(&[u8], &str)] = &[
            (b"0", "0"),
            (b"-0", "0"),
            (b"18446744073709551615", "18446744073709551615"),
            (b"-9223372036854775808", "-9223372036854775808"),
            (b"-9223372036854775809", "-9.2233720368547758e+18"),
            (b"18446744073709551616", "1.8446744073709552e+19"),
            (b"123456789012345678901234567890", "1.2345678901234568e+29"),
            (b"1.0", "1"),
            (b"1e3", "1000"),
            (b"0.1", "0.10000000000000001"),
            (b"-0.0", "-0"),
            (b"1E-7", "9.9999999999999995e-08"),
            (b"5e-324", "4.9406564584124654e-324"),
            (b"1.5e300", "1.5000000000000001e+300"),
            (b"0.0001", "0.0001"),
            (b"0.00001", "1.0000000000000001e-05"),
            (b"1e16", "10000000000000000"),
            (b"1e17", "1e+17"),
            (b"2.5", "2.5"),
            (b"-123.456", "-123.456"),
            (b"12345.0001220703125", "12345.000122070312"),
        ];
        for (input, want) in cases {
            let mut s = JsonStreamer::new();
            let got = s.feed(&[input, &b" "[..]].concat());
            let Some(Ok(v)) = got.first() else {
                panic!("{got:?}")
            };
            assert_eq!(compact(v), *want, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn escape_example() {
        let v = feed_all("\"a/b\\\\c\\\"d\\u00e9é€😀\\t\\u0001\\u007f\"".as_bytes());
        assert_eq!(
            compact(v[0].as_ref().unwrap()),
            r#""a/b\\c\"d\u00E9\u00E9\u20AC\uD83D\uDE00\t\u0001\u007F""#
        );
        assert_eq!(
            compact(&json!("\u{8}\u{c}\n\r\u{1f}~")),
            r#""\b\f\n\r\u001F~""#
        );
        assert_eq!(compact(&json!("\u{ffff}\u{fdd0}")), r#""\uFFFD\uFFFD""#);
    }

    #[test]
    fn ids_round_trip() {
        let ids = [
            "null",
            "true",
            "false",
            "0",
            "-1",
            "18446744073709551615",
            "0.5",
            "-0",
            r#""s""#,
            "'s'",
            "[]",
            "{}",
            r#"[1, "a", [{}], {"x": null}]"#,
            r#"{"k": [true]}"#,
        ];
        let outs = [
            "null",
            "true",
            "false",
            "0",
            "-1",
            "18446744073709551615",
            "0.5",
            "0",
            r#""s""#,
            r#""s""#,
            "[]",
            "{}",
            r#"[1, "a", [{}], {"x": null}]"#,
            r#"{"k": [true]}"#,
        ];
        for (id, want) in ids.iter().zip(outs) {
            let msg = format!(r#"{{"execute": "x", "id": {id}}}"#);
            let got = feed_all(msg.as_bytes());
            let Some(Ok(Value::Object(map))) = got.first() else {
                panic!("{got:?}")
            };
            assert_eq!(compact(&map["id"]), want);
        }
    }

    #[test]
    fn compact_layout() {
        assert_eq!(
            compact(&json!({"a": 1, "b": [1, 2]})),
            r#"{"a": 1, "b": [1, 2]}"#
        );
        assert_eq!(compact(&json!({})), "{}");
        assert_eq!(compact(&json!([])), "[]");
        assert_eq!(compact(&json!([[], {}])), "[[], {}]");
    }

    #[test]
    fn pretty_layout() {
        // Byte for byte what QSD 10.0.2 prints with pretty=on (CRLF -> LF).
        let v = json!({"id": {"a": {}, "b": [], "c": [1, {"d": []}], "e": null, "f": true},
                       "error": {"class": "CommandNotFound", "desc": "The command x has not been found"}});
        let want = "{\n    \"id\": {\n        \"e\": null,\n        \"a\": {\n        },\n        \"f\": true,\n        \"b\": [\n        ],\n        \"c\": [\n            1,\n            {\n                \"d\": [\n                ]\n            }\n        ]\n    },\n    \"error\": {\n        \"class\": \"CommandNotFound\",\n        \"desc\": \"The command x has not been found\"\n    }\n}";
        assert_eq!(to_qmp_string(&v, true), want);
        assert_eq!(
            to_qmp_string(&json!({"id": {}}), true),
            "{\n    \"id\": {\n    }\n}"
        );
        assert_eq!(to_qmp_string(&json!({}), true), "{\n}");
        assert_eq!(to_qmp_string(&json!([]), true), "[\n]");
        assert_eq!(to_qmp_string(&json!("s"), true), "\"s\"");
        assert_eq!(to_qmp_string(&json!([1, 2]), true), "[\n    1,\n    2\n]");
    }

    #[test]
    fn nesting_limit() {
        let mut input = vec![b'['; 1100];
        input.extend(vec![b']'; 1100]);
        let got = feed_all(&input);
        assert_eq!(got.len(), 1 + 1 + 1025);
        assert_eq!(got[0], err("JSON nesting depth limit exceeded"));
        let mut want = json!([]);
        for _ in 1..75 {
            want = json!([want]);
        }
        assert_eq!(got[1], Ok(want));
        assert!(got[2..].iter().all(|r| *r == perr("expecting value")));

        let mut input = vec![b'['; 1000];
        input.extend(vec![b']'; 1000]);
        let got = feed_all(&input);
        assert_eq!(got.len(), 1);
        assert!(got[0].is_ok());
    }

    #[test]
    fn deepest_objects_fit_small_stack() {
        // 1024 levels (the limit) of objects and arrays, on a 512 KiB stack.
        let mut input = Vec::new();
        for _ in 0..512 {
            input.extend_from_slice(b"{\"a\": [");
        }
        for _ in 0..512 {
            input.extend_from_slice(b"]}");
        }
        let got = std::thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(move || {
                // (Not cloned: serde_json's recursive clone needs more stack.)
                match feed_all(&input).as_slice() {
                    [Ok(v)] => Some(compact(v).len()),
                    _ => None,
                }
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(got, Some(512 * 9));
    }

    #[test]
    fn token_count_limit() {
        let mut input = b"[".to_vec();
        input.extend(b"0,".repeat(1 << 20));
        input.extend(b"0]\n");
        assert_eq!(
            feed_all(&input),
            [
                err("JSON token count limit exceeded"),
                Ok(json!(0)),
                perr("expecting value")
            ]
        );
    }

    #[test]
    fn token_size_limit() {
        // Scaled down from 64 MiB, which is slow in debug builds.
        const MAX_TOKEN_SIZE: usize = 4096;
        let mut s = JsonStreamer {
            max_token_size: MAX_TOKEN_SIZE,
            ..JsonStreamer::new()
        };
        // Total token text of a message.
        let mut input = b"[\"".to_vec();
        input.resize(MAX_TOKEN_SIZE - 8, b'a');
        input.extend(b"\", \"bbbbbbbbbbbbbbbbbbbb\"]\n");
        assert_eq!(
            s.feed(&input),
            [
                err("JSON token size limit exceeded"),
                perr("expecting value")
            ]
        );
        // One token too long: the lexer gives up in mid-string.
        let mut input = b"\"".to_vec();
        input.resize(MAX_TOKEN_SIZE + 1, b'a');
        input.extend(b"\" ]\"\n");
        assert_eq!(
            s.feed(&input),
            [err("JSON token size limit exceeded"), Ok(json!(" ]"))]
        );
        // A complete token of exactly the limit.
        let mut input = b"\"".to_vec();
        input.resize(MAX_TOKEN_SIZE - 1, b'a');
        input.extend(b"\"\n");
        assert_eq!(s.feed(&input), [err("JSON token size limit exceeded")]);
        // One byte less is fine.
        input.remove(1);
        let got = s.feed(&input);
        assert!(matches!(got.as_slice(), [Ok(Value::String(_))]), "{got:?}");
    }

    #[test]
    fn random_input_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const ALPHABET: &[u8] = b"{}[]:,\"'\\ \t\n0123456789-+.eEtrufalsn%uD8Cx\x00\x01\xff\xfe\xc0\x80\xc3\xa9\xed\xf0";
        let mut s = JsonStreamer::new();
        for _ in 0..20000 {
            let len = (next() % 100) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if r % 4 == 0 {
                        (r >> 8) as u8
                    } else {
                        ALPHABET[(r >> 8) as usize % ALPHABET.len()]
                    }
                })
                .collect();
            for value in s.feed(&bytes).into_iter().flatten() {
                for pretty in [false, true] {
                    let text = to_qmp_string(&value, pretty);
                    assert!(text.is_ascii());
                    let again = JsonStreamer::new().feed(format!("{text}\n").as_bytes());
                    assert!(matches!(again.as_slice(), [Ok(_)]), "{text} -> {again:?}");
                }
            }
            // Fresh streamers too, so every input starts in a clean state.
            let _ = JsonStreamer::new().feed(&bytes);
        }
    }
}
