//! What a run reports: progress on standard error, latency summaries from HDR histograms, the
//! readable table, and the JSON object (its format: `bench/JSON.md`).
//!
//! Samples are recorded in nanoseconds (3 significant digits) and reported in microseconds as
//! floats rounded to 2 decimals, so sub-microsecond differences stay visible.

use std::fmt::Write as _;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

/// What a workload produces: the JSON object and the readable table.
pub struct Output {
    /// The JSON object (`bench/JSON.md`).
    pub json: serde_json::Value,
    /// The same, as a table for people.
    pub table: String,
}

/// Prints a progress line on standard error.
pub fn progress(msg: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[agentfabric bench +{t:.2}s] {msg}");
}

/// A histogram of round-trip times in nanoseconds, 1 ns to 100 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static histogram bounds are valid")
}

/// `{"count", "p50_us", "p99_us", "p999_us", "max_us"}` of one measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Samples recorded.
    pub count: u64,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// 99.9th percentile, microseconds.
    pub p999_us: f64,
    /// Largest sample, microseconds.
    pub max_us: f64,
}

impl Summary {
    /// Summarises a histogram of nanosecond samples.
    pub fn from_histogram(h: &Histogram<u64>) -> Summary {
        Summary::with_unit(h, |ns| round2(ns as f64 / 1000.0))
    }

    /// Summarises a histogram of whole-microsecond samples (the fabric's own histograms).
    pub fn from_histogram_us(h: &Histogram<u64>) -> Summary {
        Summary::with_unit(h, |v| v as f64)
    }

    /// The summary of `h`, each recorded value turned into microseconds by `us`.
    fn with_unit(h: &Histogram<u64>, us: impl Fn(u64) -> f64) -> Summary {
        Summary {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }

    /// The summary as a JSON object, with `"name"` first when given.
    pub fn to_json(self, name: Option<&str>) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        if let Some(n) = name {
            m.insert("name".into(), n.into());
        }
        m.insert("count".into(), self.count.into());
        m.insert("p50_us".into(), self.p50_us.into());
        m.insert("p99_us".into(), self.p99_us.into());
        m.insert("p999_us".into(), self.p999_us.into());
        m.insert("max_us".into(), self.max_us.into());
        serde_json::Value::Object(m)
    }
}

/// `x` rounded to 2 decimals.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `x` rounded to 3 decimals.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `a / b` rounded to 3 decimals; `None` (JSON `null`) when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| round3(a / b))
}

/// Formats a byte count for the table: B, KiB or MiB.
pub fn fmt_bytes(n: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    match n {
        n if n >= MIB => format!("{:.1} MiB", n as f64 / MIB as f64),
        n if n >= KIB => format!("{:.1} KiB", n as f64 / KIB as f64),
        n => format!("{n} B"),
    }
}

/// Formats an optional ratio for the table.
pub fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) => format!("{r:.3}"),
        None => "-".into(),
    }
}

/// A readable table: one line per measurement with count, p50, p99, p99.9 and max.
#[derive(Debug, Default)]
pub struct Table {
    out: String,
}

impl Table {
    /// A table whose first line describes the run.
    pub fn new(title: &str) -> Table {
        let mut out = String::new();
        let _ = writeln!(out, "{title}");
        let _ = writeln!(
            out,
            "{:<24} {:>9} {:>10} {:>10} {:>10} {:>10}  note",
            "measurement", "count", "p50_us", "p99_us", "p99.9_us", "max_us"
        );
        Table { out }
    }

    /// A measurement line; `note` follows the numbers (ratios, for instance).
    pub fn row(&mut self, name: &str, s: &Summary, note: &str) {
        let _ = writeln!(
            self.out,
            "{:<24} {:>9} {:>10.2} {:>10.2} {:>10.2} {:>10.2}  {}",
            name, s.count, s.p50_us, s.p99_us, s.p999_us, s.max_us, note
        );
    }

    /// A free-form line.
    pub fn line(&mut self, text: &str) {
        let _ = writeln!(self.out, "{text}");
    }

    /// The finished table.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_microseconds_with_sub_microsecond_precision() {
        let mut h = new_histogram();
        for ns in [1_250u64, 1_250, 1_250, 1_500, 2_000] {
            h.record(ns).unwrap();
        }
        let s = Summary::from_histogram(&h);
        assert_eq!(s.count, 5);
        assert_eq!(s.p50_us, 1.25);
        assert_eq!(s.max_us, 2.0);
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
    }
}
