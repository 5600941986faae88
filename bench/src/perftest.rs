//! perftest's figures from the same lab boot: the baseline of the verbs runs.
//!
//! The bench does not start perftest itself: `soft-roce/bench.d/20-agentfabric-verbs` runs
//! `ib_send_lat` and `ib_write_bw` right before (with the lab's retries for perftest's clock
//! calibration under emulation) and passes their figures with `--perftest FILE`:
//!
//! ```json
//! {"ib_send_lat": {"64": {"iters": 1000, "t_min_us": 1.0, "t_max_us": 9.0, "t_typical_us": 2.0,
//!                         "p99_us": 5.0, "p999_us": 8.0}},
//!  "ib_write_bw": {"1048576": {"mb_s": 3000.0}}}
//! ```
//!
//! `ib_send_lat` reports one-way latency; a round trip is taken as twice its figures (as
//! `bench/JSON.md` says). Without the file the baseline is `null`, and the output says
//! so.

use std::path::PathBuf;

use serde_json::Value;

use crate::error::BenchResult;
use crate::report::Summary;

/// perftest's figures from the same lab boot (see the module docs).
pub struct Perftest {
    doc: Value,
}

impl Perftest {
    /// Reads the file given with `--perftest`; `None` without one.
    pub fn load(path: Option<&PathBuf>) -> BenchResult<Option<Perftest>> {
        let Some(path) = path else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the perftest figures {}: {e}", path.display()))?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "the perftest figures {} are not valid JSON: {e}",
                path.display()
            )
        })?;
        Ok(Some(Perftest { doc }))
    }

    fn row(&self, tool: &str, size: usize) -> Option<&Value> {
        self.doc.get(tool)?.get(size.to_string())
    }

    /// `ib_send_lat` at `size` as round trips (twice the one-way figures).
    pub fn send_lat_round_trip(&self, size: usize) -> Option<Summary> {
        let row = self.row("ib_send_lat", size)?;
        let f = |k: &str| row.get(k).and_then(Value::as_f64).filter(|x| x.is_finite());
        Some(Summary {
            count: row.get("iters").and_then(Value::as_u64).unwrap_or(0),
            p50_us: 2.0 * f("t_typical_us")?,
            p99_us: 2.0 * f("p99_us")?,
            p999_us: 2.0 * f("p999_us")?,
            max_us: 2.0 * f("t_max_us")?,
        })
    }

    /// `ib_write_bw`'s (or with `read`, `ib_read_bw`'s) average bandwidth at `size`, MB/s.
    pub fn bw_mb_s(&self, read: bool, size: usize) -> Option<f64> {
        let tool = if read { "ib_read_bw" } else { "ib_write_bw" };
        self.row(tool, size)?
            .get("mb_s")
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite() && *x > 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perftest_rows_become_round_trips_and_bandwidth() {
        let p = Perftest {
            doc: serde_json::json!({
                "ib_send_lat": {"64": {"iters": 1000, "t_min_us": 1.0, "t_max_us": 9.0,
                    "t_typical_us": 2.0, "p99_us": 5.0, "p999_us": 8.0}},
                "ib_write_bw": {"1048576": {"mb_s": 3000.0}},
                "ib_read_bw": {"1048576": {"mb_s": 2500.0}}
            }),
        };
        let s = p.send_lat_round_trip(64).unwrap();
        assert_eq!(
            (s.count, s.p50_us, s.p99_us, s.p999_us, s.max_us),
            (1000, 4.0, 10.0, 16.0, 18.0)
        );
        assert_eq!(p.bw_mb_s(false, 1 << 20), Some(3000.0));
        assert_eq!(p.bw_mb_s(true, 1 << 20), Some(2500.0));
        assert!(p.send_lat_round_trip(4096).is_none());
        assert!(p.bw_mb_s(false, 65536).is_none());
    }
}
