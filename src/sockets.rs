//! Listening sockets for every server of the daemon (QMP chardevs and
//! the NBD server): UNIX, TCP or an inherited descriptor, opened with
//! QEMU's checks and messages.
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use serde_json::{Map, Value};
use tokio::net::{TcpListener, UnixListener};

use crate::util::os_msg;

fn get_str<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Opens a listening socket for a SocketAddress (`type` plus its
/// members): returns it, the path to unlink later, and its address text.
pub async fn listen(
    atype: &str,
    a: &Map<String, Value>,
) -> Result<(Listener, Option<PathBuf>, String), String> {
    let r = match atype {
        "unix" => {
            let path = get_str(a, "path").unwrap_or_default().to_string();
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {
                    return Err(format!("Failed to unlink socket {path}: Is a directory"))
                }
                Ok(_) => {
                    std::fs::remove_file(&path)
                        .map_err(|e| format!("Failed to unlink socket {path}: {}", os_msg(&e)))?;
                }
                Err(_) => {}
            }
            let l = UnixListener::bind(&path)
                .map_err(|e| format!("Failed to bind socket to {path}: {}", os_msg(&e)))?;
            let abs = std::path::absolute(&path).unwrap_or_else(|_| PathBuf::from(&path));
            (Listener::Unix(l), Some(abs), format!("unix:{path}"))
        }
        "inet" => {
            let host = get_str(a, "host").unwrap_or_default();
            let port = get_str(a, "port").unwrap_or_default();
            // QEMU's inet_listen_saddr: resolve, then try each address.
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host(format!("{host}:{port}"))
                    .await
                    .map_err(|e| {
                        let text = e.to_string();
                        let why = text.rsplit_once(": ").map_or(text.as_str(), |(_, w)| w);
                        format!("address resolution failed for {host}:{port}: {why}")
                    })?
                    .collect();
            let mut last = std::io::Error::from_raw_os_error(nix::libc::EADDRNOTAVAIL);
            let mut bound = None;
            for addr in addrs {
                match TcpListener::bind(addr).await {
                    Ok(l) => {
                        bound = Some(l);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let l = bound
                .ok_or_else(|| format!("Failed to find an available port: {}", os_msg(&last)))?;
            let local = l
                .local_addr()
                .map(|a| format!("tcp:{}:{}", a.ip(), a.port()))
                .unwrap_or_default();
            (Listener::Tcp(l), None, local)
        }
        "fd" => {
            let text = get_str(a, "str").unwrap_or_default();
            listener_from_fd(text)?
        }
        other => return Err(format!("socket address type '{other}' is not supported")),
    };
    Ok(r)
}

/// Adopts an inherited listening socket (`fd=N`).
fn listener_from_fd(text: &str) -> Result<(Listener, Option<PathBuf>, String), String> {
    use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
    let fd: i32 = text
        .parse()
        .map_err(|_| format!("Unable to parse FD number {text}"))?;
    let addr: SockaddrStorage =
        getsockname(fd).map_err(|_| format!("File descriptor '{text}' is not a socket"))?;
    // SAFETY: the descriptor was handed to us on the command line to own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match addr.family() {
        Some(AddressFamily::Unix) => {
            let std_l = std::os::unix::net::UnixListener::from(owned);
            let bound = addr.as_unix_addr().and_then(|u| u.path());
            let path = bound.map(|p| p.display().to_string()).unwrap_or_default();
            std_l.set_nonblocking(true).map_err(|e| os_msg(&e))?;
            let l = UnixListener::from_std(std_l).map_err(|e| os_msg(&e))?;
            // As QEMU does when it closes a listening socket, whoever
            // made it: the path it is bound to goes too, so a launcher
            // that passes a fresh socket each run can bind it again.
            let unlink = bound.map(std::path::Path::to_path_buf);
            Ok((Listener::Unix(l), unlink, format!("unix:{path}")))
        }
        Some(AddressFamily::Inet) | Some(AddressFamily::Inet6) => {
            let std_l = std::net::TcpListener::from(owned);
            std_l.set_nonblocking(true).map_err(|e| os_msg(&e))?;
            let local = std_l
                .local_addr()
                .map(|a| format!("tcp:{}:{}", a.ip(), a.port()))
                .unwrap_or_default();
            let l = TcpListener::from_std(std_l).map_err(|e| os_msg(&e))?;
            Ok((Listener::Tcp(l), None, local))
        }
        _ => Err(format!("File descriptor '{text}' is not a socket")),
    }
}
