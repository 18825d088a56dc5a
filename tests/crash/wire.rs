//! A minimal NBD client for the crash test: fixed newstyle, NBD_OPT_GO,
//! simple replies. Every failure is an `io::Error`, since the daemon
//! dies under it on purpose.
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

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Connects to export `name`; returns the socket and the export's size.
pub fn connect(sock: &Path, name: &str) -> io::Result<(UnixStream, u64)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)?;
    if &hello[..8] != b"NBDMAGIC" {
        return Err(bad("no NBDMAGIC".into()));
    }
    s.write_all(&3u32.to_be_bytes())?;
    let mut go = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&go)?;
    let mut size = None;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d)?;
        match kind {
            // NBD_REP_ACK
            1 => break,
            // NBD_REP_INFO: NBD_INFO_EXPORT carries the size.
            3 if d.len() >= 12 && d[..2] == [0, 0] => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&d[2..10]);
                size = Some(u64::from_be_bytes(b));
            }
            3 => {}
            _ => return Err(bad(format!("GO answered {kind:#x}"))),
        }
    }
    let size = size.ok_or_else(|| bad("no NBD_INFO_EXPORT".into()))?;
    Ok((s, size))
}

/// A request header.
pub fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// A simple reply's header: (error, cookie).
pub fn reply(r: &mut impl Read) -> io::Result<(u32, u64)> {
    let mut h = [0u8; 16];
    r.read_exact(&mut h)?;
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if magic != 0x6744_6698 {
        return Err(bad(format!("reply magic {magic:#x}")));
    }
    let err = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&h[8..]);
    Ok((err, u64::from_be_bytes(c)))
}
