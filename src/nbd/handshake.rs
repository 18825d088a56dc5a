//! The NBD handshake: the fixed-newstyle greeting and option haggling
//! (STARTTLS, GO, INFO, LIST, STRUCTURED_REPLY, EXTENDED_HEADERS,
//! LIST/SET_META_CONTEXT, ABORT, EXPORT_NAME), up to the export the
//! client chose. It owns the whole connection while it runs (STARTTLS
//! replaces the socket with a TLS session over it) and reads exactly
//! what the client sent, so the connection can move to the thread that
//! serves transmission.
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::drain;
use super::export::{Export, Exports};
use super::link::Link;
use super::proto::*;
use crate::tls::session::ServerTls;

/// Option payloads beyond this end the connection (QEMU's limit).
const MAX_OPTION_LEN: u32 = 32 << 20;
/// Option payloads beyond this are read and dropped, not kept: no valid
/// option of rsd's is this long.
const KEPT_OPTION_LEN: u32 = 64 << 10;
/// The longest export name (the spec's, and QEMU's, string limit).
const MAX_NAME_LEN: usize = 4096;

pub const CTX_BASE: u32 = 1;
pub const CTX_DEPTH: u32 = 2;
/// `qemu:dirty-bitmap:NAME` of the export's bitmap `i` is CTX_BITMAP + i.
pub const CTX_BITMAP: u32 = 3;
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// Why a handshake ended without a session: QEMU's words, which the
/// server prints as `option negotiation failed: ...` (as QSD does), or
/// None for a client that left quietly (before sending its flags, with
/// NBD_OPT_ABORT, or while the server was writing to it).
pub type Failure = Option<String>;

/// The handshake: greeting, client flags and option haggling, up to the
/// export the client chose. It reads exactly what the client sent for
/// it, so the connection can then move to the thread that serves
/// transmission. With `tls`, the client must upgrade with STARTTLS
/// before anything else.
pub async fn handshake(
    io: &mut Link,
    exports: &Exports,
    tls: Option<&ServerTls>,
) -> Result<Session, Failure> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&hello).await.map_err(|_| None)?;
    let client_flags = io.read_u32().await.map_err(|_| None)?;
    let known = u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    if client_flags & !known != 0 {
        let unknown = client_flags & !known;
        return Err(Some(format!("Unknown client flags {unknown:#x} received")));
    }
    let flags = ClientFlags {
        fixed: client_flags & u32::from(FLAG_FIXED_NEWSTYLE) != 0,
        no_zeroes: client_flags & u32::from(FLAG_NO_ZEROES) != 0,
    };
    negotiate(io, exports, flags, tls).await
}

struct ClientFlags {
    /// Fixed newstyle: an option the server does not serve gets an
    /// error reply; otherwise it ends the connection.
    fixed: bool,
    no_zeroes: bool,
}

/// A read failure in QEMU's words: `what` names the field being read
/// (None for an option's payload, which QEMU does not name).
fn read_failed(what: Option<&str>, e: &std::io::Error, tls: bool) -> Failure {
    let why = if tls {
        crate::tls::session::io_failure(e, true)
    } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "Unexpected end-of-file before all data were read".to_string()
    } else {
        format!("Unable to read from socket: {}", crate::util::os_msg(e))
    };
    Some(match what {
        Some(w) => format!("Failed to read {w}: {why}"),
        None => why,
    })
}

/// A write failure: the client is gone, nothing to say.
fn gone(_: std::io::Error) -> Failure {
    None
}

/// What option haggling settled.
pub struct Session {
    pub(super) export: Arc<Export>,
    pub(super) structured: bool,
    /// Extended headers: 64-bit lengths, 32-byte requests and replies.
    pub(super) extended: bool,
    pub(super) contexts: Vec<u32>,
    /// Counts this client on its export, from before the handshake's
    /// last reply (so a client that finished haggling is always "in use").
    pub(super) _client: super::export::ClientGuard,
    /// Requests the node failed (the first is printed, the total when
    /// the client leaves).
    pub(super) node_errors: std::sync::atomic::AtomicU64,
    /// The connection's span and byte counts, while traces are on.
    pub(super) trace: Option<super::trace::ConnTrace>,
}

async fn opt_reply(
    wr: &mut (impl AsyncWrite + Unpin),
    opt: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), Failure> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    wr.write_all(&b).await.map_err(gone)?;
    // A TLS session holds records until flushed; a socket has none.
    wr.flush().await.map_err(gone)
}

fn transmission_flags(e: &Export, extended: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_DF | FLAG_SEND_CACHE;
    if e.multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    if e.writable {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    } else {
        f |= FLAG_READ_ONLY;
    }
    if extended {
        // BLOCK_STATUS may carry a payload (a length and context ids).
        f |= FLAG_BLOCK_STAT_PAYLOAD;
    }
    f
}

/// A cursor over an option's payload.
struct Payload<'a>(&'a [u8]);
impl<'a> Payload<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_first_chunk::<2>()?;
        self.0 = t;
        Some(u16::from_be_bytes(*h))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_first_chunk::<4>()?;
        self.0 = t;
        Some(u32::from_be_bytes(*h))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        self.bytes(n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

/// The export an option's payload names. Replies ERR_INVALID to a
/// malformed payload and ERR_UNKNOWN to an unknown name, then gives None.
async fn named_export<T>(
    wr: &mut (impl AsyncWrite + Unpin),
    opt: u32,
    exports: &Exports,
    parsed: Option<(String, T)>,
) -> Result<Option<(Arc<Export>, String, T)>, Failure> {
    let Some((name, rest)) = parsed else {
        opt_reply(wr, opt, REP_ERR_INVALID, &[]).await?;
        return Ok(None);
    };
    if name.len() > MAX_NAME_LEN {
        let msg = format!("Invalid name length: {}", name.len());
        opt_reply(wr, opt, REP_ERR_INVALID, msg.as_bytes()).await?;
        return Ok(None);
    }
    match exports.find(&name) {
        Some(e) => Ok(Some((e, name, rest))),
        None => {
            // As QEMU: a long name is cut to 80 characters in the message.
            let shown = match name.char_indices().nth(80) {
                Some((at, _)) => format!("{}...", &name[..at]),
                None => name,
            };
            let msg = format!("export '{shown}' not present");
            opt_reply(wr, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
            Ok(None)
        }
    }
}

/// The meta contexts an export offers that match `query`.
fn match_contexts(e: &Export, query: &str) -> Vec<(u32, String)> {
    let mut all = vec![(CTX_BASE, "base:allocation".to_string())];
    if e.allocation_depth {
        all.push((CTX_DEPTH, "qemu:allocation-depth".to_string()));
    }
    for (i, b) in e.bitmaps.iter().enumerate() {
        all.push((
            CTX_BITMAP + i as u32,
            format!("{DIRTY_BITMAP_PREFIX}{}", b.name),
        ));
    }
    all.into_iter()
        .filter(|(_, name)| match query {
            "" => true,
            "base:" | "qemu:" | DIRTY_BITMAP_PREFIX => name.starts_with(query),
            q => name == q,
        })
        .collect()
}

/// The options a TLS server takes before STARTTLS: STARTTLS itself,
/// and an error (ERR_TLS_REQD, or the end for EXPORT_NAME) for any
/// other, as QEMU does. Ok(true) when the session is now TLS.
async fn before_tls(
    io: &mut Link,
    tls: &ServerTls,
    client: &ClientFlags,
    opt: u32,
    len: u32,
) -> Result<bool, Failure> {
    if !client.fixed {
        return Err(Some(format!("Unsupported option {opt:#x}")));
    }
    match opt {
        OPT_STARTTLS if len != 0 => {
            let msg = "option 'starttls' has unexpected length";
            drain(io, u64::from(len))
                .await
                .map_err(|e| read_failed(None, &e, false))?;
            opt_reply(io, opt, REP_ERR_INVALID, msg.as_bytes()).await?;
            Err(Some(msg.into()))
        }
        OPT_STARTTLS => {
            opt_reply(io, opt, REP_ACK, &[]).await?;
            io.start_tls(tls).await.map_err(Some)?;
            Ok(true)
        }
        OPT_EXPORT_NAME => Err(Some(format!("Option {opt:#x} not permitted before TLS"))),
        _ => {
            drain(io, u64::from(len))
                .await
                .map_err(|e| read_failed(None, &e, false))?;
            let msg = format!("Option {opt:#x} not permitted before TLS");
            let sent = opt_reply(io, opt, REP_ERR_TLS_REQD, msg.as_bytes()).await;
            if opt == OPT_ABORT {
                // The client may hang up before reading the error.
                return Err(None);
            }
            sent.map(|()| false)
        }
    }
}

async fn negotiate(
    io: &mut Link,
    exports: &Exports,
    client: ClientFlags,
    tls: Option<&ServerTls>,
) -> Result<Session, Failure> {
    let mut structured = false;
    let mut extended = false;
    let mut contexts: Vec<u32> = Vec::new();
    let mut ctx_export: Option<String> = None;
    loop {
        let tls_now = io.is_tls();
        let magic = io
            .read_u64()
            .await
            .map_err(|e| read_failed(Some("opts magic"), &e, tls_now))?;
        if magic != IHAVEOPT {
            return Err(Some("Bad magic received".into()));
        }
        let opt = io
            .read_u32()
            .await
            .map_err(|e| read_failed(Some("option"), &e, tls_now))?;
        let len = io
            .read_u32()
            .await
            .map_err(|e| read_failed(Some("option length"), &e, tls_now))?;
        if len > MAX_OPTION_LEN {
            return Err(Some(format!(
                "len ({len}) is larger than max len ({MAX_OPTION_LEN})"
            )));
        }
        if let Some(tls) = tls.filter(|_| !io.is_tls()) {
            before_tls(io, tls, &client, opt, len).await?;
            continue;
        }
        if !client.fixed && opt != OPT_EXPORT_NAME {
            return Err(Some(unsupported(opt)));
        }
        if len > KEPT_OPTION_LEN {
            drain(io, u64::from(len))
                .await
                .map_err(|e| read_failed(None, &e, tls_now))?;
            if opt == OPT_EXPORT_NAME {
                return Err(Some("Bad length received".into()));
            }
            let kind = match opt {
                OPT_ABORT
                | OPT_LIST
                | OPT_STRUCTURED_REPLY
                | OPT_EXTENDED_HEADERS
                | OPT_INFO
                | OPT_GO
                | OPT_LIST_META_CONTEXT
                | OPT_SET_META_CONTEXT => REP_ERR_INVALID,
                _ => REP_ERR_UNSUP,
            };
            let msg = if kind == REP_ERR_UNSUP {
                unsupported(opt)
            } else {
                String::new()
            };
            opt_reply(io, opt, kind, msg.as_bytes()).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        io.read_exact(&mut data)
            .await
            .map_err(|e| read_failed(None, &e, tls_now))?;
        match opt {
            OPT_EXPORT_NAME if data.len() > MAX_NAME_LEN => {
                return Err(Some("Bad length received".into()))
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some((export, node)) = exports
                    .find(&name)
                    .and_then(|e| e.node.get().map(|n| (e, n)))
                else {
                    return Err(Some("export not found".into()));
                };
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&node.size().to_be_bytes());
                b.extend_from_slice(&transmission_flags(&export, extended).to_be_bytes());
                if !client.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                let attached = export.attach(io.fd());
                io.write_all(&b).await.map_err(gone)?;
                io.flush().await.map_err(gone)?;
                return Ok(Session {
                    _client: attached,
                    node_errors: Default::default(),
                    trace: None,
                    export,
                    structured,
                    extended,
                    contexts: if ctx_export.as_deref() == Some(&name) {
                        contexts
                    } else {
                        vec![]
                    },
                });
            }
            OPT_ABORT => {
                let _ = opt_reply(io, opt, REP_ACK, &[]).await;
                return Err(None);
            }
            OPT_STARTTLS => {
                let (kind, msg) = if len != 0 {
                    (REP_ERR_INVALID, "option 'starttls' has unexpected length")
                } else if io.is_tls() {
                    (REP_ERR_INVALID, "TLS already enabled")
                } else {
                    (REP_ERR_POLICY, "TLS not configured")
                };
                opt_reply(io, opt, kind, msg.as_bytes()).await?;
            }
            OPT_LIST => {
                if len != 0 {
                    opt_reply(io, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                for e in exports.list() {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    if let Some(desc) = &e.description {
                        d.extend_from_slice(desc.as_bytes());
                    }
                    opt_reply(io, opt, REP_SERVER, &d).await?;
                }
                opt_reply(io, opt, REP_ACK, &[]).await?;
            }
            OPT_EXTENDED_HEADERS => {
                if len != 0 {
                    opt_reply(io, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                extended = true;
                structured = true;
                opt_reply(io, opt, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    opt_reply(io, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                structured = true;
                opt_reply(io, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let mut p = Payload(&data);
                let parsed = (|| {
                    let name = p.string()?;
                    let n = p.u16()? as usize;
                    let reqs: Option<Vec<u16>> = (0..n).map(|_| p.u16()).collect();
                    p.0.is_empty().then_some((name, reqs?))
                })();
                let Some((export, name, reqs)) = named_export(io, opt, exports, parsed).await?
                else {
                    continue;
                };
                if reqs.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    opt_reply(io, opt, REP_INFO, &d).await?;
                }
                if reqs.contains(&INFO_DESCRIPTION) {
                    if let Some(desc) = &export.description {
                        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        d.extend_from_slice(desc.as_bytes());
                        opt_reply(io, opt, REP_INFO, &d).await?;
                    }
                }
                let Some(node) = export.node.get() else {
                    opt_reply(io, opt, REP_ERR_UNKNOWN, &[]).await?;
                    continue;
                };
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                let min = node.limits().request_alignment;
                d.extend_from_slice(&min.to_be_bytes());
                d.extend_from_slice(&4096u32.max(min).to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                opt_reply(io, opt, REP_INFO, &d).await?;
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&node.size().to_be_bytes());
                d.extend_from_slice(&transmission_flags(&export, extended).to_be_bytes());
                opt_reply(io, opt, REP_INFO, &d).await?;
                let attached = (opt == OPT_GO).then(|| export.attach(io.fd()));
                opt_reply(io, opt, REP_ACK, &[]).await?;
                if let Some(attached) = attached {
                    return Ok(Session {
                        _client: attached,
                        node_errors: Default::default(),
                        trace: None,
                        contexts: if ctx_export.as_deref() == Some(&name) {
                            contexts
                        } else {
                            vec![]
                        },
                        export,
                        structured,
                        extended,
                    });
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set && !structured {
                    opt_reply(io, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                let mut p = Payload(&data);
                let parsed = (|| {
                    let name = p.string()?;
                    let n = p.u32()? as usize;
                    let qs: Option<Vec<String>> = (0..n).map(|_| p.string()).collect();
                    p.0.is_empty().then_some((name, qs?))
                })();
                let Some((export, name, queries)) = named_export(io, opt, exports, parsed).await?
                else {
                    continue;
                };
                let mut found: Vec<(u32, String)> = Vec::new();
                let queries = if queries.is_empty() && !set {
                    vec![String::new()]
                } else {
                    queries
                };
                for q in &queries {
                    for c in match_contexts(&export, q) {
                        if !found.contains(&c) {
                            found.push(c);
                        }
                    }
                }
                for (id, cname) in &found {
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(cname.as_bytes());
                    opt_reply(io, opt, REP_META_CONTEXT, &d).await?;
                }
                if set {
                    contexts = found.iter().map(|(id, _)| *id).collect();
                    ctx_export = Some(name);
                }
                opt_reply(io, opt, REP_ACK, &[]).await?;
            }
            _ => {
                opt_reply(io, opt, REP_ERR_UNSUP, unsupported(opt).as_bytes()).await?;
            }
        }
    }
}

/// QEMU's words for an option it does not serve.
fn unsupported(opt: u32) -> String {
    let name = match opt {
        1 => "export name",
        2 => "abort",
        3 => "list",
        4 => "peek export",
        5 => "starttls",
        6 => "info",
        7 => "go",
        8 => "structured reply",
        9 => "list meta context",
        10 => "set meta context",
        11 => "extended headers",
        _ => "<unknown>",
    };
    format!("Unsupported option {opt} ({name})")
}
