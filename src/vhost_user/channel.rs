//! The backend request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): the
//! socket the frontend hands over with SET_BACKEND_REQ_FD, on which the
//! device sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG after a resize.
//!
//! The `vhost` crate turns that socket into its `Backend`, which can
//! neither send this message nor give its socket out. So the connection
//! loop peeks at each message before the crate reads it: a peek of a
//! message with descriptors gets duplicates of them, and the duplicate
//! of SET_BACKEND_REQ_FD's socket is what this channel writes to.
use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// VHOST_USER_SET_BACKEND_REQ_FD's request code.
const SET_BACKEND_REQ_FD: u32 = 21;
/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG's request code.
const CONFIG_CHANGE_MSG: u32 = 2;
const VERSION: u32 = 1;
/// How long a frontend may leave a message unread.
const SEND_WAIT: Duration = Duration::from_secs(5);

/// Waits for the next message on the frontend's socket without taking
/// it, and returns a duplicate of its socket if it is SET_BACKEND_REQ_FD
/// (None for any other message, or at the end of the connection).
pub fn peek_backend_fd(sock: &UnixStream) -> Option<OwnedFd> {
    let mut hdr = [0u8; 12];
    let mut fds = Vec::new();
    let got = {
        let mut iov = [IoSliceMut::new(&mut hdr)];
        let mut space = nix::cmsg_space!([RawFd; 8]);
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_PEEK | MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_WAITALL,
        )
        .ok()?;
        for c in msg.cmsgs().into_iter().flatten() {
            if let ControlMessageOwned::ScmRights(list) = c {
                // SAFETY: the kernel installed these descriptors for us
                // with this receive; nothing else owns them.
                fds.extend(
                    list.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        msg.bytes
    };
    if got < hdr.len() {
        return None;
    }
    let code = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    if code != SET_BACKEND_REQ_FD || fds.len() != 1 {
        return None;
    }
    fds.pop()
}

/// The channel to the frontend, once it gave one.
#[derive(Default)]
pub struct Channel {
    /// The socket of the last SET_BACKEND_REQ_FD seen (not yet accepted).
    pending: Mutex<Option<OwnedFd>>,
    sock: Mutex<Option<UnixStream>>,
}

impl Channel {
    /// Keeps the socket peeked from a SET_BACKEND_REQ_FD message until
    /// the message is handled.
    pub fn stash(&self, fd: OwnedFd) {
        if let Ok(mut p) = self.pending.lock() {
            *p = Some(fd);
        }
    }

    /// SET_BACKEND_REQ_FD was accepted: its socket becomes the channel.
    pub fn accept(&self) {
        let fd = self.pending.lock().ok().and_then(|mut p| p.take());
        if let (Some(fd), Ok(mut s)) = (fd, self.sock.lock()) {
            *s = Some(UnixStream::from(fd));
        }
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (no payload). QSD asks
    /// for no reply, even with REPLY_ACK negotiated, and neither does
    /// rsd, so nothing here waits for the frontend. Nothing to do
    /// without a channel.
    pub fn config_changed(&self) -> std::io::Result<()> {
        let Ok(guard) = self.sock.lock() else {
            return Ok(());
        };
        let Some(mut s) = guard.as_ref() else {
            return Ok(());
        };
        // A frontend that stops reading must not hold the caller.
        s.set_write_timeout(Some(SEND_WAIT))?;
        let mut msg = Vec::with_capacity(12);
        for v in [CONFIG_CHANGE_MSG, VERSION, 0] {
            msg.extend_from_slice(&v.to_ne_bytes());
        }
        s.write_all(&msg)
    }
}
