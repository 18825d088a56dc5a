//! QEMU's throttling algorithm as a pure state machine: one leaky bucket
//! per limit (bytes and operations; total, read and write), each with an
//! optional burst rate (`max`) allowed for `burst_length` seconds. It
//! decides how long the next request must wait; it does no I/O and
//! reads no clock (callers pass the time in nanoseconds).
//!
//! The semantics follow QEMU's documentation of `ThrottleLimits`:
//! - a bucket fills with each request's bytes (or operations) and leaks
//!   at `avg` per second;
//! - without `max`, a tenth of a second's worth may pile up before
//!   requests wait (short bursts pass);
//! - with `max`, `max * burst_length` may pile up, and a second bucket
//!   leaking at `max` keeps the burst itself to `max` per second.

/// The limits, in QEMU's bucket order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    BpsTotal = 0,
    BpsRead = 1,
    BpsWrite = 2,
    OpsTotal = 3,
    OpsRead = 4,
    OpsWrite = 5,
}

pub const BUCKETS: [Bucket; 6] = [
    Bucket::BpsTotal,
    Bucket::BpsRead,
    Bucket::BpsWrite,
    Bucket::OpsTotal,
    Bucket::OpsRead,
    Bucket::OpsWrite,
];

/// Which way a request goes: reads, and everything that writes (writes,
/// write-zeroes, discards).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read = 0,
    Write = 1,
}

/// QEMU's bound on every rate (THROTTLE_VALUE_MAX).
pub const VALUE_MAX: u64 = 1_000_000_000_000_000;

const NS_PER_SEC: f64 = 1e9;

/// One limit's settings. Values are unsigned as in QEMU: a negative
/// QMP value arrives here as a huge one and fails the range check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub avg: u64,
    pub max: u64,
    pub burst_length: u64,
}

impl Default for Limit {
    fn default() -> Self {
        Limit {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// A group's whole configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub buckets: [Limit; 6],
    /// iops-size: a request larger than this counts as several
    /// operations (0: every request is one).
    pub op_size: u64,
}

impl Config {
    pub fn get(&self, b: Bucket) -> &Limit {
        &self.buckets[b as usize]
    }
    pub fn get_mut(&mut self, b: Bucket) -> &mut Limit {
        &mut self.buckets[b as usize]
    }

    /// Any limit set at all.
    pub fn enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg > 0)
    }

    /// QEMU's validity checks, in its order, with its messages.
    pub fn check(&self) -> Result<(), String> {
        let b = |x: Bucket| self.get(x);
        let conflict = |t: Bucket, r: Bucket, w: Bucket, f: fn(&Limit) -> u64| {
            f(b(t)) != 0 && (f(b(r)) != 0 || f(b(w)) != 0)
        };
        let (bt, br, bw) = (Bucket::BpsTotal, Bucket::BpsRead, Bucket::BpsWrite);
        let (ot, or, ow) = (Bucket::OpsTotal, Bucket::OpsRead, Bucket::OpsWrite);
        if conflict(bt, br, bw, |l| l.avg)
            || conflict(ot, or, ow, |l| l.avg)
            || conflict(bt, br, bw, |l| l.max)
            || conflict(ot, or, ow, |l| l.max)
        {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into(),
            );
        }
        if self.op_size != 0 && b(ot).avg == 0 && b(or).avg == 0 && b(ow).avg == 0 {
            return Err("iops size requires an iops value to be set".into());
        }
        for l in &self.buckets {
            if l.avg > VALUE_MAX || l.max > VALUE_MAX {
                return Err(format!(
                    "bps/iops/max values must be within [0, {VALUE_MAX}]"
                ));
            }
            if l.burst_length == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if l.burst_length > 1 && l.max == 0 {
                return Err("burst length set without burst rate".into());
            }
            if l.max != 0 && l.burst_length > VALUE_MAX / l.max {
                return Err("burst length too high for this burst rate".into());
            }
            if l.max != 0 && l.avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if l.max != 0 && l.max < l.avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }
}

/// The buckets' levels and the time they last leaked.
#[derive(Clone, Debug)]
pub struct State {
    cfg: Config,
    level: [f64; 6],
    burst_level: [f64; 6],
    previous_leak: i64,
}

/// The buckets a request of each direction fills and waits on.
fn buckets_of(dir: Direction) -> [Bucket; 4] {
    match dir {
        Direction::Read => [
            Bucket::BpsTotal,
            Bucket::OpsTotal,
            Bucket::BpsRead,
            Bucket::OpsRead,
        ],
        Direction::Write => [
            Bucket::BpsTotal,
            Bucket::OpsTotal,
            Bucket::BpsWrite,
            Bucket::OpsWrite,
        ],
    }
}

impl State {
    /// A new configuration: empty buckets, leaking from `now`.
    pub fn new(cfg: Config, now: i64) -> State {
        State {
            cfg,
            level: [0.0; 6],
            burst_level: [0.0; 6],
            previous_leak: now,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Leaks every bucket for the time since the last leak.
    fn leak(&mut self, now: i64) {
        let delta = now - self.previous_leak;
        self.previous_leak = now;
        if delta <= 0 {
            return;
        }
        let secs = delta as f64 / NS_PER_SEC;
        for (i, l) in self.cfg.buckets.iter().enumerate() {
            self.level[i] = (self.level[i] - l.avg as f64 * secs).max(0.0);
            if l.burst_length > 1 {
                self.burst_level[i] = (self.burst_level[i] - l.max as f64 * secs).max(0.0);
            }
        }
    }

    /// Nanoseconds one bucket makes the next request wait.
    fn bucket_wait(&self, i: usize) -> i64 {
        let l = &self.cfg.buckets[i];
        if l.avg == 0 {
            return 0;
        }
        // Without a burst rate a tenth of a second's worth may pass at
        // once; with one, the whole burst.
        let (size, burst_size) = if l.max == 0 {
            (l.avg as f64 / 10.0, 0.0)
        } else {
            (l.max as f64 * l.burst_length as f64, l.max as f64 / 10.0)
        };
        let extra = self.level[i] - size;
        if extra > 0.0 {
            return (extra * NS_PER_SEC / l.avg as f64) as i64;
        }
        if l.burst_length > 1 {
            let extra = self.burst_level[i] - burst_size;
            if extra > 0.0 {
                return (extra * NS_PER_SEC / l.max as f64) as i64;
            }
        }
        0
    }

    /// How long (ns) a request in `dir` must wait at `now`; 0 if it may
    /// go. Leaks the buckets first.
    pub fn wait(&mut self, dir: Direction, now: i64) -> i64 {
        self.leak(now);
        buckets_of(dir)
            .iter()
            .map(|b| self.bucket_wait(*b as usize))
            .max()
            .unwrap_or(0)
    }

    /// Counts a request that goes now.
    pub fn account(&mut self, dir: Direction, bytes: u64) {
        let units = if self.cfg.op_size != 0 && bytes > self.cfg.op_size {
            bytes as f64 / self.cfg.op_size as f64
        } else {
            1.0
        };
        let [bt, ot, bd, od] = buckets_of(dir);
        for (b, amount) in [
            (bt, bytes as f64),
            (bd, bytes as f64),
            (ot, units),
            (od, units),
        ] {
            let i = b as usize;
            self.level[i] += amount;
            if self.cfg.buckets[i].burst_length > 1 {
                self.burst_level[i] += amount;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000_000;

    fn cfg(b: Bucket, avg: u64, max: u64, len: u64) -> Config {
        let mut c = Config::default();
        *c.get_mut(b) = Limit {
            avg,
            max,
            burst_length: len,
        };
        c
    }

    /// Runs a saturating client: each request goes as soon as the
    /// state allows; returns the times (ns) requests went until `until`.
    fn saturate(st: &mut State, dir: Direction, bytes: u64, until: i64) -> Vec<i64> {
        let mut now = 0;
        let mut went = Vec::new();
        while now < until {
            let w = st.wait(dir, now);
            if w > 0 {
                now += w;
                continue;
            }
            st.account(dir, bytes);
            went.push(now);
        }
        went
    }

    #[test]
    fn no_limit_never_waits() {
        let mut st = State::new(Config::default(), 0);
        for _ in 0..1000 {
            st.account(Direction::Write, 1 << 20);
        }
        assert_eq!(st.wait(Direction::Write, 0), 0);
        assert!(!Config::default().enabled());
    }

    #[test]
    fn iops_average_holds_over_time() {
        let mut st = State::new(cfg(Bucket::OpsTotal, 100, 0, 1), 0);
        let went = saturate(&mut st, Direction::Read, 4096, 10 * SEC);
        // A tenth of a second's worth at once, then 100 per second.
        let n = went.len() as i64;
        assert!((1000..=1012).contains(&n), "{n}");
        // The first 10 go at once (the bucket holds avg/10 = 10).
        assert!(went[..10].iter().all(|t| *t == 0), "{:?}", &went[..12]);
        assert!(went[11] > 0);
    }

    #[test]
    fn bps_limit_counts_bytes_and_read_limit_ignores_writes() {
        let mut st = State::new(cfg(Bucket::BpsRead, 1 << 20, 0, 1), 0);
        let went = saturate(&mut st, Direction::Read, 64 << 10, 5 * SEC);
        let bytes = went.len() as u64 * (64 << 10);
        assert!(
            ((5 << 20)..(5 << 20) + (256 << 10)).contains(&bytes),
            "{bytes}"
        );
        // Writes are not limited by a read limit.
        for _ in 0..100 {
            st.account(Direction::Write, 1 << 20);
        }
        assert_eq!(st.wait(Direction::Write, 5 * SEC), 0);
    }

    #[test]
    fn bursts_run_at_max_for_burst_length_then_fall_back() {
        // avg 100, max 1000 for 2 s: 2000 operations at up to 1000/s
        // (the burst bucket), then 100/s.
        let mut st = State::new(cfg(Bucket::OpsWrite, 100, 1000, 2), 0);
        let went = saturate(&mut st, Direction::Write, 512, 12 * SEC);
        let in_first = went.iter().filter(|t| **t < SEC).count();
        assert!((1000..=1110).contains(&in_first), "{in_first}");
        // Two seconds of burst at 1000/s, minus what leaked at 100/s
        // meanwhile: the burst ends a little after 2 s.
        let at_3s = went.iter().filter(|t| **t < 3 * SEC).count();
        let in_last_5 = went
            .iter()
            .filter(|t| **t >= 7 * SEC && **t < 12 * SEC)
            .count();
        assert!((495..=505).contains(&in_last_5), "{in_last_5}");
        assert!(at_3s >= 2000, "{at_3s}");
    }

    #[test]
    fn iops_size_counts_large_requests_as_several() {
        let mut c = cfg(Bucket::OpsTotal, 100, 0, 1);
        c.op_size = 4096;
        let mut st = State::new(c, 0);
        let went = saturate(&mut st, Direction::Read, 16384, 10 * SEC);
        // Each request is 4 operations: 25 per second.
        assert!((250..=255).contains(&went.len()), "{}", went.len());
    }

    #[test]
    fn waits_are_the_time_to_leak_the_excess() {
        let mut st = State::new(cfg(Bucket::OpsTotal, 10, 0, 1), 0);
        st.account(Direction::Read, 1);
        st.account(Direction::Read, 1);
        // Level 2, allowed 1 (avg/10): 1 extra at 10/s is 100 ms.
        assert_eq!(st.wait(Direction::Write, 0), SEC / 10);
        assert_eq!(st.wait(Direction::Write, SEC / 10), 0);
    }

    #[test]
    fn checks_match_qemu_messages_in_order() {
        let mut c = cfg(Bucket::BpsTotal, 100, 0, 1);
        c.get_mut(Bucket::BpsRead).avg = 5;
        assert!(c
            .check()
            .unwrap_err()
            .contains("cannot be used at the same time"));
        let c = cfg(Bucket::BpsTotal, 0, 100, 1);
        assert_eq!(
            c.check().unwrap_err(),
            "bps_max/iops_max require corresponding bps/iops values"
        );
        let c = cfg(Bucket::BpsTotal, 100, 0, 5);
        assert_eq!(
            c.check().unwrap_err(),
            "burst length set without burst rate"
        );
        let c = cfg(Bucket::BpsTotal, 100, 50, 1);
        assert_eq!(
            c.check().unwrap_err(),
            "bps_max/iops_max cannot be lower than bps/iops"
        );
        let c = cfg(Bucket::BpsTotal, VALUE_MAX + 1, 0, 1);
        assert_eq!(
            c.check().unwrap_err(),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        let c = cfg(Bucket::BpsTotal, 100, 200, 0);
        assert_eq!(c.check().unwrap_err(), "the burst length cannot be 0");
        let c = cfg(Bucket::BpsTotal, 100, 200, u64::MAX);
        assert_eq!(
            c.check().unwrap_err(),
            "burst length too high for this burst rate"
        );
        let c = Config {
            op_size: 4096,
            ..Default::default()
        };
        assert_eq!(
            c.check().unwrap_err(),
            "iops size requires an iops value to be set"
        );
        assert!(cfg(Bucket::OpsTotal, 5, 10, 3).check().is_ok());
    }
}
