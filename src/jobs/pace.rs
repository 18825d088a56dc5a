//! Rate limiting of block jobs (`speed`).
use std::time::{Duration, Instant};

/// A timer fires up to a millisecond late (and a wait is padded by one
/// so it never ends early); up to this much time earned beyond the debt
/// is kept, so the lateness does not slow a job with small bursts.
const SLACK: f64 = 0.003;

/// A burst is what the speed allows in this long (see `Pace::spread`).
const BURST_SECS: f64 = 0.01;

/// Spaces the copies to `speed` bytes per second: a job issues up to
/// `burst` bytes at once and then owes the time they take at that speed
/// (a paced job is not ready while it owes time, as QEMU sleeps it off
/// before looking again).
pub struct Pace {
    /// Bytes sent beyond what the speed allowed so far (< 0), or the
    /// little a late timer earned over it (> 0, at most `SLACK` worth).
    credit: f64,
    burst: f64,
    /// The smallest burst (`spread`); equal to `burst` otherwise.
    least: f64,
    /// Whether the job has waited once (the first burst is whole).
    waited: bool,
    at: Instant,
}

impl Pace {
    pub fn new(burst: u64) -> Pace {
        Pace::spread(burst, burst)
    }

    /// After a first whole burst (as QEMU's mirror starts, which shows
    /// in the offset it reports), bursts of what 10 ms at the speed
    /// allow, between `least` and `burst` bytes: a mirror with a 16 MiB
    /// buffer at 100 MiB/s would otherwise send 16 MiB at once every
    /// 160 ms, and a guest write behind them waits for all of it.
    pub fn spread(burst: u64, least: u64) -> Pace {
        Pace {
            credit: 0.0,
            burst: burst as f64,
            least: (least as f64).min(burst as f64),
            waited: false,
            at: Instant::now(),
        }
    }

    fn burst(&self, speed: u64) -> f64 {
        if !self.waited {
            return self.burst;
        }
        (speed as f64 * BURST_SECS).clamp(self.least, self.burst)
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
        let over = -self.credit - self.burst(speed);
        let wait = speed > 0 && over >= 0.0;
        self.waited |= wait;
        wait.then(|| Duration::from_secs_f64(over / speed as f64 + 0.001))
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_spread_burst_is_ten_milliseconds_of_the_speed() {
        // 100 MiB/s: about 1 MiB at once, not the 16 MiB buffer.
        let mut p = Pace::spread(16 * MIB, MIB);
        p.account(15 * MIB);
        assert_eq!(p.delay(100 * MIB), None, "the first burst is whole");
        p.account(2 * MIB);
        assert!(p.delay(100 * MIB).is_some());
        p.credit = 0.0;
        assert_eq!(p.delay(100 * MIB), None);
        p.account(MIB);
        assert_eq!(p.delay(100 * MIB), None);
        p.account(MIB);
        assert!(p.delay(100 * MIB).is_some());
        // 1 GiB/s: about 10 MiB at once.
        p.credit = 0.0;
        for _ in 0..9 {
            assert_eq!(p.delay(1024 * MIB), None);
            p.account(MIB);
        }
        p.account(2 * MIB);
        assert!(p.delay(1024 * MIB).is_some());
        // Unlimited: never waits.
        p.account(64 * MIB);
        assert_eq!(p.delay(0), None);
    }

    #[test]
    fn a_plain_pace_bursts_its_whole_size() {
        let mut p = Pace::new(16 * MIB);
        p.account(15 * MIB);
        assert_eq!(p.delay(100 * MIB), None);
        p.account(2 * MIB);
        assert!(p.delay(100 * MIB).is_some());
    }
}
