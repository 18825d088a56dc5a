//! A QMP client that returns errors instead of panicking: the crash
//! test kills the daemon under it.
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Mon {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

/// A command's outcome while the daemon lives: its return, or the
/// error's description.
pub type Reply = Result<Value, String>;

impl Mon {
    /// Connects (the socket exists), reads the greeting and negotiates.
    pub fn ready(path: &Path) -> io::Result<Mon> {
        // The socket's file exists a moment before it listens.
        let deadline = Instant::now() + Duration::from_secs(20);
        let w = loop {
            match UnixStream::connect(path) {
                Ok(w) => break w,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        w.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut m = Mon {
            r: BufReader::new(w.try_clone()?),
            w,
        };
        m.line()?;
        m.cmd("qmp_capabilities", serde_json::json!({}))?
            .map_err(io::Error::other)?;
        Ok(m)
    }

    fn line(&mut self) -> io::Result<Value> {
        let mut s = String::new();
        if self.r.read_line(&mut s)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&s).map_err(io::Error::other)
    }

    /// Runs a command; events are skipped.
    pub fn cmd(&mut self, name: &str, args: Value) -> io::Result<Reply> {
        let req = serde_json::json!({"execute": name, "arguments": args});
        self.w.write_all(format!("{req}\n").as_bytes())?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(Ok(r.clone()));
            }
            if let Some(e) = v.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("?");
                return Ok(Err(desc.to_string()));
            }
        }
    }
}
