//! Waits for a client's next request by polling its socket for a few
//! microseconds (yielding the CPU between tries) before going to sleep
//! in the reactor.
//!
//! At low queue depth a client sends its next request a few tens of
//! microseconds after it gets a reply. If the connection thread sleeps in
//! the meantime, every request pays for two cross-CPU wake-ups (the
//! client waking rsd, and rsd's CPU leaving idle); on a virtual machine
//! each one is an exit to the host. Polling instead costs about as much
//! CPU as the sleep and wake-up it saves, and halves the round trip
//! (measured in docs/benchmarks.md).
//!
//! The window adapts the way the kernel's haltpoll governor does: it
//! grows while requests arrive soon after the wait starts and shrinks to
//! nothing while the client is slow or idle, so an idle connection costs
//! no CPU. Polling happens only when nothing else is in flight on the
//! connection (the owner says so through [`SpinReader::allow`]), so it
//! never delays a request being served.
//!
//! A connection served on an IOThread takes its limits from the
//! iothread's poll-max-ns, poll-grow and poll-shrink (QEMU's adaptive
//! polling parameters, read before each wait so qom-set acts at once),
//! and polls only while it is the thread's one connection.
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, MsgFlags};
use tokio::io::{AsyncRead, ReadBuf};

use crate::iothread::PollParams;

/// The longest poll; a client slower than this is left to wake rsd.
const MAX_WINDOW: Duration = Duration::from_micros(50);
/// Where a window that had shrunk to nothing starts growing again.
const START_WINDOW: Duration = Duration::from_micros(10);

/// Polls a socket briefly before `inner` (the same socket, through the
/// reactor) is asked to wait.
pub struct SpinReader {
    inner: super::conn::Reader,
    /// The socket's descriptor, owned by `inner` and open as long as it.
    fd: RawFd,
    allowed: Arc<AtomicBool>,
    window: Duration,
    /// When the current wait for data began.
    waiting_since: Option<Instant>,
    /// The iothread's polling parameters (None: rsd's own).
    params: Option<Arc<PollParams>>,
}

/// How far the window may open and how fast it moves.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Tuning {
    max: Duration,
    grow: u32,
    /// 0: a wait too long for the window closes it at once (QEMU's
    /// poll-shrink=0).
    shrink: u32,
}

const OWN: Tuning = Tuning {
    max: MAX_WINDOW,
    grow: 2,
    shrink: 2,
};

impl SpinReader {
    /// `fd` must be the descriptor `inner` reads from.
    pub fn new(inner: super::conn::Reader, fd: RawFd) -> SpinReader {
        SpinReader {
            inner,
            fd,
            allowed: Arc::new(AtomicBool::new(false)),
            window: MAX_WINDOW,
            waiting_since: None,
            params: None,
        }
    }

    /// Polls within an iothread's parameters instead of rsd's own.
    pub fn with_params(mut self, params: Arc<PollParams>) -> SpinReader {
        self.window = params.max_window();
        self.params = Some(params);
        self
    }

    fn tuning(&self) -> Tuning {
        match &self.params {
            None => OWN,
            Some(p) => Tuning {
                max: p.max_window(),
                grow: p.grow_factor(),
                shrink: p.shrink_factor(),
            },
        }
    }

    /// A switch the owner turns on while nothing else is in flight.
    pub fn allow(&self) -> Arc<AtomicBool> {
        self.allowed.clone()
    }

    /// Polls the socket until data comes or the window (counted from
    /// the start of the wait) closes; tries at least once.
    fn spin(
        &self,
        buf: &mut ReadBuf<'_>,
        since: Instant,
        max: Duration,
    ) -> Option<std::io::Result<()>> {
        let window = self.window.min(max);
        loop {
            let unfilled = buf.initialize_unfilled();
            match recv(self.fd, unfilled, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    buf.advance(n);
                    return Some(Ok(()));
                }
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Some(Err(e.into())),
            }
            if since.elapsed() >= window {
                return None;
            }
            // Yield rather than spin: if the client shares this CPU, it
            // gets to run and send (measured: pure spinning cost 14% of
            // the rate when both were pinned to one CPU).
            std::thread::yield_now();
        }
    }
}

/// The window after a wait that lasted `waited`.
fn next_window(window: Duration, waited: Duration, t: Tuning) -> Duration {
    if waited <= window {
        window.min(t.max)
    } else if waited <= t.max {
        // A longer poll would have caught it.
        window
            .saturating_mul(t.grow)
            .clamp(START_WINDOW.min(t.max), t.max)
    } else if window >= START_WINDOW && t.shrink > 0 {
        window / t.shrink
    } else {
        Duration::ZERO
    }
}

impl AsyncRead for SpinReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let mut result = this.inner.as_mut().poll_read(cx, buf);
        // Only waits that may poll are measured: the handshake's round
        // trips say nothing about how soon requests follow replies.
        let tuning = this.tuning();
        if result.is_pending() && this.allowed.load(Ordering::Relaxed) {
            let since = *this.waiting_since.get_or_insert_with(Instant::now);
            // The reactor has the waker already; data found here just
            // makes its later wake-up a spurious one.
            if let Some(r) = this.spin(buf, since, tuning.max) {
                result = Poll::Ready(r);
            }
        }
        if result.is_ready() && buf.filled().len() > before {
            if let Some(since) = this.waiting_since.take() {
                this.window = next_window(this.window, since.elapsed(), tuning);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::task::Waker;

    /// A SpinReader on one end of a socket pair, polled by hand so the
    /// reactor never runs between polls (its readiness stays stale, as it
    /// does between a reply and the runtime's next turn).
    fn pair(rt: &tokio::runtime::Runtime) -> (SpinReader, std::os::unix::net::UnixStream) {
        let _g = rt.enter();
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        let a = tokio::net::UnixStream::from_std(a).expect("register");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&a);
        (SpinReader::new(Box::pin(a), fd), b)
    }

    fn poll(r: &mut SpinReader, out: &mut [u8]) -> (Poll<usize>, Duration) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut buf = ReadBuf::new(out);
        let t = Instant::now();
        let p = Pin::new(&mut *r).poll_read(&mut cx, &mut buf);
        let took = t.elapsed();
        (p.map(|r| r.map(|()| buf.filled().len()).unwrap_or(0)), took)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn polling_finds_data_the_reactor_has_not_seen_yet() {
        let rt = runtime();
        let (mut r, mut peer) = pair(&rt);
        let _g = rt.enter();
        let mut out = [0u8; 64];
        r.allow().store(true, Ordering::Relaxed);
        // Nothing to read: the poll gives up after its window, not later.
        let (p, took) = poll(&mut r, &mut out);
        assert!(p.is_pending());
        assert!(took < Duration::from_millis(20), "polled for {took:?}");
        // Data arrives; the reactor has not turned, so only polling the
        // socket can see it.
        peer.write_all(b"request").expect("write");
        let (p, _) = poll(&mut r, &mut out);
        assert_eq!(p, Poll::Ready(7));
        assert_eq!(&out[..7], b"request");
    }

    #[test]
    fn no_polling_unless_allowed() {
        let rt = runtime();
        let (mut r, mut peer) = pair(&rt);
        let _g = rt.enter();
        let mut out = [0u8; 64];
        assert!(poll(&mut r, &mut out).0.is_pending());
        peer.write_all(b"request").expect("write");
        // Not allowed: only the reactor may report the data.
        assert!(poll(&mut r, &mut out).0.is_pending());
        rt.block_on(async {
            let mut buf = [0u8; 64];
            let n = tokio::io::AsyncReadExt::read(&mut r, &mut buf)
                .await
                .expect("read");
            assert_eq!(&buf[..n], b"request");
        });
        assert_eq!(
            r.window, MAX_WINDOW,
            "waits that may not poll teach nothing"
        );
    }

    #[test]
    fn a_long_wait_narrows_the_window() {
        let rt = runtime();
        let (mut r, mut peer) = pair(&rt);
        let _g = rt.enter();
        let mut out = [0u8; 64];
        r.allow().store(true, Ordering::Relaxed);
        assert!(poll(&mut r, &mut out).0.is_pending());
        std::thread::sleep(Duration::from_millis(5));
        peer.write_all(b"x").expect("write");
        assert_eq!(poll(&mut r, &mut out).0, Poll::Ready(1));
        assert_eq!(r.window, MAX_WINDOW / 2);
    }

    #[test]
    fn window_shrinks_to_nothing_for_a_slow_client_and_regrows() {
        let mut w = MAX_WINDOW;
        for _ in 0..10 {
            w = next_window(w, Duration::from_millis(5), OWN);
        }
        assert_eq!(w, Duration::ZERO, "an idle client costs no polling");
        w = next_window(w, Duration::from_micros(30), OWN);
        assert_eq!(w, START_WINDOW);
        w = next_window(w, Duration::from_micros(30), OWN);
        w = next_window(w, Duration::from_micros(30), OWN);
        assert_eq!(w, Duration::from_micros(40));
        w = next_window(w, Duration::from_micros(45), OWN);
        assert_eq!(w, MAX_WINDOW, "never beyond the cap");
        // Waits inside the window leave it as it is.
        assert_eq!(next_window(w, Duration::from_micros(1), OWN), w);
    }

    #[test]
    fn an_iothreads_parameters_bound_the_window() {
        let t = Tuning {
            max: Duration::from_micros(100),
            grow: 4,
            shrink: 0,
        };
        let w = next_window(START_WINDOW, Duration::from_micros(30), t);
        assert_eq!(w, Duration::from_micros(40), "poll-grow multiplies");
        let w = next_window(w, Duration::from_micros(90), t);
        assert_eq!(w, t.max, "never beyond poll-max-ns");
        assert_eq!(
            next_window(w, Duration::from_millis(1), t),
            Duration::ZERO,
            "poll-shrink=0 closes the window at once"
        );
        let off = Tuning {
            max: Duration::ZERO,
            ..t
        };
        assert_eq!(
            next_window(MAX_WINDOW, Duration::from_micros(1), off),
            Duration::ZERO
        );
        assert_eq!(
            next_window(Duration::ZERO, Duration::from_micros(1), off),
            Duration::ZERO
        );
    }

    #[test]
    fn qom_set_reaches_a_connection_between_waits() {
        let rt = runtime();
        let (r, _peer) = pair(&rt);
        let p = Arc::new(PollParams::new(20_000, 0, 0));
        let r = r.with_params(p.clone());
        assert_eq!(r.tuning().max, Duration::from_micros(20));
        p.set("poll-max-ns", 0);
        assert_eq!(r.tuning().max, Duration::ZERO, "poll-max-ns=0: no polling");
    }
}
