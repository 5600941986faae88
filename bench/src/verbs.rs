//! Verbs in the bench: both nodes on one RDMA device by default (as perftest runs in the lab:
//! server and client on the same device, the server reached at one address), or each on the
//! device and rails `--devices` gives, and perftest's figures from the same lab boot as the
//! baseline.
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
//! so. Where the device is chosen: `--devices`, else `AGENTFABRIC_LAB_DEVICE` (read by the
//! verbs transport); the GID index: `AGENTFABRIC_LAB_GID_INDEX` if set, for whichever device a
//! node is on (in the lab both devices' RoCE v2 IPv4 GID is index 1), else the device's GID of
//! the side channel's address; the address: `AGENTFABRIC_LAB_ADDR_A`.

use std::path::PathBuf;
use std::time::Duration;

use agentfabric::{Config, Node};
use agentfabric_verbs::{VerbsConfig, VerbsTransport};
use serde_json::Value;

use crate::error::BenchResult;
use crate::report::Summary;
use crate::settings::Settings;

/// The IP address of the RDMA netdev the server node listens on.
pub fn listen_addr() -> BenchResult<String> {
    std::env::var("AGENTFABRIC_LAB_ADDR_A").map_err(|_| {
        "the verbs bench needs AGENTFABRIC_LAB_ADDR_A: the IP address of the RDMA device's \
         netdev (soft-roce/lab sets it; e.g. 10.77.0.1)"
            .into()
    })
}

/// (server, client, listen URL) for `FabricPair::new`. Under emulation (Soft-RoCE in a TCG VM)
/// rxe can stall for over a second while it retransmits, so a default peer timeout is raised to
/// 10 s, as the conformance suite does for verbs. With `s.busy_poll` both nodes spin on their
/// completion queues, as perftest does; `s.spin` is how long they poll after a completion
/// before sleeping otherwise. `s.devices` chooses each node's device and rails;
/// without it both nodes take the transport's default device (the lab's) and the rails of
/// `AGENTFABRIC_RAILS`, if any.
pub fn nodes(cfg: &Config, tag: &str, s: &Settings) -> BenchResult<(Node, Node, String)> {
    let devices = s.devices.as_ref();
    let url = format!("verbs://{}:0", listen_addr()?);
    let mut cfg = cfg.clone();
    if cfg.peer_timeout == Config::default().peer_timeout {
        cfg.peer_timeout = Duration::from_secs(10);
    }
    if devices.is_some() && std::env::var("AGENTFABRIC_RAILS").is_ok_and(|v| !v.trim().is_empty()) {
        // The transport would add these to a node that --devices gives no rails.
        return Err(
            "--devices names each node's rails, but AGENTFABRIC_RAILS is set too: unset it, \
             so that the rails are the ones --devices gives"
                .into(),
        );
    }
    let mk = |name: String, devices: Option<&Vec<String>>| {
        Node::builder(name)
            .transport(transport(s, devices))
            .config(cfg.clone())
            .build()
    };
    Ok((
        mk(format!("bench-{tag}-server"), devices.map(|d| &d.server))?,
        mk(format!("bench-{tag}-client"), devices.map(|d| &d.client))?,
        url,
    ))
}

/// A verbs transport as the run's settings ask: `--busy-poll`, `--spin-us`, and the device and
/// rails `devices` lists (the transport's default device otherwise).
pub fn transport(s: &Settings, devices: Option<&Vec<String>>) -> VerbsTransport {
    let mut vc = VerbsConfig {
        busy_poll: s.busy_poll,
        ..VerbsConfig::default()
    };
    if let Some(spin) = s.spin {
        vc.spin_before_sleep = spin;
    }
    if let Some((device, rails)) = devices.and_then(|d| d.split_first()) {
        vc.device = Some(device.clone());
        vc.rails = rails.to_vec();
    }
    VerbsTransport::with_config(vc)
}

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
