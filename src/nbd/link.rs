//! A client's connection during the handshake: the accepted socket, and
//! after STARTTLS the TLS session over it. The socket can be taken out
//! of the session and put back, so that a TLS client's connection moves
//! to its own thread (and that thread's reactor) as a plain one does.
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::tls::session::{accept, ServerTls};

/// An accepted socket, registered with the current runtime's reactor.
pub enum Sock {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
    /// Taken out while the connection moves between threads.
    Detached,
}

/// A socket between two reactors.
pub enum StdSock {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl StdSock {
    pub fn fd(&self) -> RawFd {
        match self {
            StdSock::Unix(s) => s.as_raw_fd(),
            StdSock::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Sock {
    pub fn fd(&self) -> Option<RawFd> {
        match self {
            Sock::Unix(s) => Some(s.as_raw_fd()),
            Sock::Tcp(s) => Some(s.as_raw_fd()),
            Sock::Detached => None,
        }
    }

    /// Leaves this runtime's reactor.
    pub fn into_std(self) -> std::io::Result<StdSock> {
        match self {
            Sock::Unix(s) => s.into_std().map(StdSock::Unix),
            Sock::Tcp(s) => s.into_std().map(StdSock::Tcp),
            Sock::Detached => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// Joins the current runtime's reactor.
    pub fn from_std(s: StdSock) -> std::io::Result<Sock> {
        match s {
            StdSock::Unix(s) => tokio::net::UnixStream::from_std(s).map(Sock::Unix),
            StdSock::Tcp(s) => tokio::net::TcpStream::from_std(s).map(Sock::Tcp),
        }
    }
}

fn detached<T>() -> Poll<std::io::Result<T>> {
    Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()))
}

impl AsyncRead for Sock {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Sock::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Sock::Detached => detached(),
        }
    }
}

impl AsyncWrite for Sock {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Sock::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Sock::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Sock::Detached => detached(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Unix(s) => Pin::new(s).poll_flush(cx),
            Sock::Tcp(s) => Pin::new(s).poll_flush(cx),
            Sock::Detached => detached(),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Sock::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Sock::Detached => detached(),
        }
    }
}

pub type TlsSock = tokio_rustls::server::TlsStream<Sock>;

/// The connection as the handshake sees it.
pub enum Link {
    Plain(Sock),
    Tls(Box<TlsSock>),
}

impl Link {
    pub fn is_tls(&self) -> bool {
        matches!(self, Link::Tls(_))
    }

    /// The socket's descriptor (for a shutdown at the handshake's limit).
    pub fn fd(&self) -> Option<RawFd> {
        match self {
            Link::Plain(s) => s.fd(),
            Link::Tls(t) => t.get_ref().0.fd(),
        }
    }

    /// STARTTLS: the server's side of the TLS handshake, then QEMU's
    /// checks of the client. On failure the connection is over.
    pub async fn start_tls(&mut self, tls: &ServerTls) -> Result<(), String> {
        let Link::Plain(sock) = std::mem::replace(self, Link::Plain(Sock::Detached)) else {
            return Err("TLS already enabled".into());
        };
        let stream = accept(tls, sock).await?;
        *self = Link::Tls(Box::new(stream));
        Ok(())
    }
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Link::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Link::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_flush(cx),
            Link::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Link::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}
