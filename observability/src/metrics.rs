//! Metric primitives: a latency histogram cheap enough for every block
//! request (fixed buckets, one relaxed atomic add per observation, no
//! lock), and builders that turn values read at scrape time into the
//! `prometheus` crate's metric families.
//!
//! rsd keeps its counters where the data path already counts (the block
//! layer's per-node stats, the exports' counters); a collector reads them
//! when Prometheus scrapes, so the series of a thing exist exactly while
//! the thing does, and query-blockstats and /metrics read the same atoms.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use prometheus;
use prometheus::proto::{self, MetricFamily, MetricType};

/// Upper bounds of the latency buckets, in nanoseconds: 5 µs to 10 s,
/// roughly 1-2.5-5 per decade (a tmpfs read takes a few µs, a flush on a
/// disk tens of ms, a throttled request seconds).
pub const LATENCY_BOUNDS_NS: [u64; 19] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

const SLOTS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// A latency histogram with the fixed bounds above plus an overflow
/// slot. Counts are per bucket (not cumulative), so an observation is
/// one atomic add.
pub struct Histogram {
    counts: [AtomicU64; SLOTS],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Histogram {
    pub fn observe_ns(&self, ns: u64) {
        // Prometheus buckets hold observations <= their bound.
        let i = LATENCY_BOUNDS_NS.partition_point(|b| *b < ns);
        self.counts[i].fetch_add(1, Relaxed);
    }

    /// The per-bucket counts now (the last is the overflow).
    pub fn counts(&self) -> [u64; SLOTS] {
        std::array::from_fn(|i| self.counts[i].load(Relaxed))
    }
}

/// Label pairs as (name, value).
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// One metric family being filled at scrape time.
pub struct Family(MetricFamily);

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Family {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(kind);
        Family(mf)
    }

    pub fn counter(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::COUNTER)
    }

    pub fn gauge(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::GAUGE)
    }

    pub fn histogram(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::HISTOGRAM)
    }

    pub fn name(&self) -> &str {
        self.0.name()
    }

    fn metric(labels: Labels<'_>) -> proto::Metric {
        let pairs = labels
            .iter()
            .map(|(k, v)| {
                let mut p = proto::LabelPair::default();
                p.set_name(k.to_string());
                p.set_value(v.to_string());
                p
            })
            .collect();
        let mut m = proto::Metric::default();
        m.set_label(pairs);
        m
    }

    /// Adds a sample to a counter or gauge family.
    pub fn add(&mut self, labels: Labels<'_>, value: f64) {
        let mut m = Self::metric(labels);
        match self.0.get_field_type() {
            MetricType::COUNTER => {
                let mut c = proto::Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            _ => {
                let mut g = proto::Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        self.0.mut_metric().push(m);
    }

    /// Adds a latency histogram, its sum in seconds.
    pub fn add_histogram(&mut self, labels: Labels<'_>, h: &Histogram, sum_seconds: f64) {
        let counts = h.counts();
        let mut h = proto::Histogram::default();
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(LATENCY_BOUNDS_NS.len());
        for (bound, n) in LATENCY_BOUNDS_NS.iter().zip(counts.iter()) {
            cumulative += n;
            let mut b = proto::Bucket::default();
            b.set_upper_bound(*bound as f64 / 1e9);
            b.set_cumulative_count(cumulative);
            buckets.push(b);
        }
        cumulative += counts[SLOTS - 1];
        h.set_bucket(buckets);
        h.set_sample_count(cumulative);
        h.set_sample_sum(sum_seconds);
        let mut m = Self::metric(labels);
        m.set_histogram(h);
        self.0.mut_metric().push(m);
    }

    pub fn finish(self) -> MetricFamily {
        self.0
    }
}

/// Encodes families in the Prometheus text format (version 0.0.4).
pub fn encode_text(families: &[MetricFamily]) -> Result<String, String> {
    use prometheus::Encoder;
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(families, &mut out)
        .map_err(|e| e.to_string())?;
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// The content type of the text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_what_is_at_most_their_bound() {
        let h = Histogram::default();
        h.observe_ns(0);
        h.observe_ns(5_000);
        h.observe_ns(5_001);
        h.observe_ns(u64::MAX);
        let c = h.counts();
        assert_eq!(c[0], 2);
        assert_eq!(c[1], 1);
        assert_eq!(c[SLOTS - 1], 1);
        assert_eq!(c.iter().sum::<u64>(), 4);
    }

    #[test]
    fn histogram_text_is_cumulative_with_inf() {
        let h = Histogram::default();
        for ns in [1_000, 7_000, 20_000_000_000] {
            h.observe_ns(ns);
        }
        let mut f = Family::histogram("t_seconds", "test");
        f.add_histogram(&[("node", "n1")], &h, 20.000008);
        let text = encode_text(&[f.finish()]).expect("encode");
        assert!(text.contains("t_seconds_bucket{node=\"n1\",le=\"0.000005\"} 1\n"));
        assert!(text.contains("t_seconds_bucket{node=\"n1\",le=\"0.00001\"} 2\n"));
        assert!(text.contains("t_seconds_bucket{node=\"n1\",le=\"10\"} 2\n"));
        assert!(text.contains("t_seconds_bucket{node=\"n1\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("t_seconds_count{node=\"n1\"} 3\n"));
    }

    #[test]
    fn counters_and_gauges() {
        let mut c = Family::counter("x_total", "x");
        c.add(&[("a", "1")], 5.0);
        let mut g = Family::gauge("y", "y");
        g.add(&[], 2.0);
        let text = encode_text(&[c.finish(), g.finish()]).expect("encode");
        assert!(text.contains("# TYPE x_total counter\nx_total{a=\"1\"} 5\n"));
        assert!(text.contains("# TYPE y gauge\ny 2\n"));
    }
}
