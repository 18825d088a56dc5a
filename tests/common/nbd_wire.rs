//! The tests' one NBD client: the fixed-newstyle handshake ending in
//! NBD_OPT_GO, request headers, simple replies and structured reply
//! chunks. Tests that send odd bytes on purpose build them from the
//! pieces; the others use `Nbd`. Every failure is an `io::Error`, since
//! some callers expect the daemon to die under them.
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
/// NBD_CMD_FLAG_FUA.
pub const FLAG_FUA: u16 = 1;

/// Transmission flags a test checks.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Long enough for a debug daemon under load, short enough that a hung
/// daemon fails the test instead of hanging it.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// An error number the server sent in a reply (the errno's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdError(pub u32);

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NBD error {}", self.0)
    }
}

impl std::error::Error for NbdError {}

/// The server's error number in `e`; None for a socket or protocol error.
pub fn nbd_errno(e: &io::Error) -> Option<u32> {
    e.get_ref()?.downcast_ref::<NbdError>().map(|n| n.0)
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Reads the greeting and answers with FIXED_NEWSTYLE | NO_ZEROES.
pub fn greet(s: &mut (impl Read + Write)) -> io::Result<()> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)?;
    if &hello[..8] != b"NBDMAGIC" || be64(&hello[8..16]) != IHAVEOPT {
        return Err(bad(format!("greeting {hello:02x?}")));
    }
    s.write_all(&3u32.to_be_bytes())
}

/// An option request: IHAVEOPT, the option, its data's length, the data.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// NBD_OPT_GO's (or NBD_OPT_INFO's) data: the name, no info requests.
pub fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// One option reply: (reply type, data).
pub fn option_reply(r: &mut impl Read) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    r.read_exact(&mut h)?;
    let mut data = vec![0u8; be32(&h[16..20]) as usize];
    r.read_exact(&mut data)?;
    Ok((be32(&h[12..16]), data))
}

/// Sends NBD_OPT_GO for `name` and reads its replies up to the ACK:
/// the export's size and transmission flags (from NBD_INFO_EXPORT).
pub fn go(s: &mut (impl Read + Write), name: &str) -> io::Result<(u64, u16)> {
    s.write_all(&option(OPT_GO, &go_data(name)))?;
    let mut export = None;
    loop {
        let (kind, d) = option_reply(s)?;
        match kind {
            REP_ACK => break,
            REP_INFO if d.len() >= 12 && d[..2] == [0, 0] => {
                export = Some((be64(&d[2..10]), u16::from_be_bytes([d[10], d[11]])));
            }
            REP_INFO => {}
            _ => {
                let text = String::from_utf8_lossy(&d);
                return Err(bad(format!("GO {name:?} answered {kind:#x}: {text}")));
            }
        }
    }
    export.ok_or_else(|| bad("no NBD_INFO_EXPORT".into()))
}

/// A request header (a write's data follows it).
pub fn request(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// A whole write request: the header, then `data`.
pub fn write_request(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut b = request(CMD_WRITE, flags, cookie, offset, data.len() as u32);
    b.extend_from_slice(data);
    b
}

/// A simple reply's header: (error, cookie). Its data, if any, follows.
pub fn simple_reply(r: &mut impl Read) -> io::Result<(u32, u64)> {
    let mut h = [0u8; 16];
    r.read_exact(&mut h)?;
    let magic = be32(&h[..4]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(bad(format!("simple reply magic {magic:#x}")));
    }
    Ok((be32(&h[4..8]), be64(&h[8..16])))
}

/// One structured reply chunk.
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub data: Vec<u8>,
}

/// Reads one structured reply chunk, its payload included.
pub fn chunk(r: &mut impl Read) -> io::Result<Chunk> {
    let mut h = [0u8; 20];
    r.read_exact(&mut h)?;
    let magic = be32(&h[..4]);
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(bad(format!("structured reply magic {magic:#x}")));
    }
    let mut data = vec![0u8; be32(&h[16..20]) as usize];
    r.read_exact(&mut data)?;
    Ok(Chunk {
        flags: u16::from_be_bytes([h[4], h[5]]),
        kind: u16::from_be_bytes([h[6], h[7]]),
        cookie: be64(&h[8..16]),
        data,
    })
}

/// A client in transmission on one export.
pub struct Nbd {
    pub s: UnixStream,
    /// The export's size and transmission flags, from NBD_OPT_GO.
    pub size: u64,
    pub flags: u16,
    cookie: u64,
}

impl Nbd {
    /// Connects to export `name` with simple replies.
    pub fn connect(path: &Path, name: &str) -> io::Result<Nbd> {
        Nbd::open(path, name, false)
    }

    /// Connects to export `name` with structured replies negotiated.
    pub fn connect_structured(path: &Path, name: &str) -> io::Result<Nbd> {
        Nbd::open(path, name, true)
    }

    fn open(path: &Path, name: &str, structured: bool) -> io::Result<Nbd> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        greet(&mut s)?;
        if structured {
            s.write_all(&option(OPT_STRUCTURED_REPLY, &[]))?;
            let (kind, _) = option_reply(&mut s)?;
            if kind != REP_ACK {
                return Err(bad(format!("STRUCTURED_REPLY answered {kind:#x}")));
            }
        }
        let (size, flags) = go(&mut s, name)?;
        Ok(Nbd {
            s,
            size,
            flags,
            cookie: 0,
        })
    }

    /// Replaces the read timeout `connect` set.
    pub fn set_timeout(&self, d: Duration) -> io::Result<()> {
        self.s.set_read_timeout(Some(d))
    }

    /// Reads a simple reply: (error, cookie, data), where data is the
    /// `read_len` bytes that follow a successful read's reply.
    pub fn reply(&mut self, read_len: u32) -> io::Result<(u32, u64, Vec<u8>)> {
        let (err, cookie) = simple_reply(&mut self.s)?;
        let mut data = vec![0u8; if err == 0 { read_len as usize } else { 0 }];
        self.s.read_exact(&mut data)?;
        Ok((err, cookie, data))
    }

    /// One request and its simple reply, with the next cookie: a read's
    /// data, or the server's error as an `NbdError`.
    pub fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<Vec<u8>> {
        self.cookie += 1;
        let mut b = request(cmd, flags, self.cookie, offset, len);
        b.extend_from_slice(payload);
        self.s.write_all(&b)?;
        let read_len = if cmd == CMD_READ { len } else { 0 };
        let (err, cookie, data) = self.reply(read_len)?;
        if cookie != self.cookie {
            return Err(bad(format!("reply to {cookie}, not {}", self.cookie)));
        }
        if err != 0 {
            return Err(io::Error::other(NbdError(err)));
        }
        Ok(data)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.request(CMD_READ, 0, offset, len, &[])
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.request(CMD_WRITE, 0, offset, data.len() as u32, data)
            .map(drop)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[]).map(drop)
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.request(CMD_TRIM, 0, offset, len, &[]).map(drop)
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, &[])
            .map(drop)
    }
}
