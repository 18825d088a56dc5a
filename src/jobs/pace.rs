//! Rate limiting of block jobs (`speed`).
use std::time::{Duration, Instant};

/// A timer fires up to a millisecond late (and a wait is padded by one
/// so it never ends early); up to this much time earned beyond the debt
/// is kept, so the lateness does not slow a job with small bursts.
const SLACK: f64 = 0.003;

/// Spaces the copies to `speed` bytes per second: a job issues up to
/// `burst` bytes at once and then owes the time they take at that speed
/// (a paced job is not ready while it owes time, as QEMU sleeps it off
/// before looking again).
pub struct Pace {
    /// Bytes sent beyond what the speed allowed so far (< 0), or the
    /// little a late timer earned over it (> 0, at most `SLACK` worth).
    credit: f64,
    burst: f64,
    at: Instant,
}

impl Pace {
    pub fn new(burst: u64) -> Pace {
        Pace {
            credit: 0.0,
            burst: burst as f64,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, speed: u64) {
        let now = Instant::now();
        if speed == 0 {
            self.credit = 0.0;
        } else {
            let earned = now.duration_since(self.at).as_secs_f64() * speed as f64;
            self.credit = (self.credit + earned).min(SLACK * speed as f64);
        }
        self.at = now;
    }

    /// How long to wait before issuing more, if at all.
    pub fn delay(&mut self, speed: u64) -> Option<Duration> {
        self.refill(speed);
        let over = -self.credit - self.burst;
        (speed > 0 && over >= 0.0).then(|| Duration::from_secs_f64(over / speed as f64 + 0.001))
    }

    /// The time still owed for what was sent, if any.
    pub fn owed(&mut self, speed: u64) -> Option<Duration> {
        self.refill(speed);
        (speed > 0 && self.credit < 0.0)
            .then(|| Duration::from_secs_f64(-self.credit / speed as f64 + 0.001))
    }

    pub fn account(&mut self, bytes: u64) {
        self.credit -= bytes as f64;
    }
}
