//! The kernel keyring, for the `secret_keyring` object: a key's payload
//! read with keyctl(KEYCTL_READ).
use nix::libc;

const KEYCTL_READ: libc::c_long = 11;

/// The payload of key `serial`, or QEMU's message.
pub fn read(serial: i32) -> Result<Vec<u8>, String> {
    let fail = || {
        let e = std::io::Error::last_os_error();
        format!(
            "Unable to read serial key {:08x}: {}",
            serial as u32,
            crate::util::os_msg(&e)
        )
    };
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // SAFETY: keyctl writes at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                KEYCTL_READ,
                libc::c_long::from(serial),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(fail());
        }
        let n = n as usize;
        // The key may have grown since the size was asked: ask again.
        if n <= buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        buf.resize(n, 0);
    }
}
