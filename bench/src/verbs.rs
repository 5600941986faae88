//! Verbs in the bench: both nodes on one RDMA device by default (as perftest runs in the lab:
//! server and client on the same device, the server reached at one address), or each on the
//! device and rails `--devices` gives; the baseline is perftest's figures from the same lab
//! boot ([`crate::perftest`]). Built with the crate's `verbs` feature only (without it,
//! `--transport verbs` is refused with [`crate::VERBS_NOT_BUILT`]).
//!
//! Where the device is chosen: `--devices`, else `AGENTFABRIC_LAB_DEVICE` (read by the
//! verbs transport); the GID index: `AGENTFABRIC_LAB_GID_INDEX` if set, for whichever device a
//! node is on (in the lab both devices' RoCE v2 IPv4 GID is index 1), else the device's GID of
//! the side channel's address; the address: `AGENTFABRIC_LAB_ADDR_A`.

use std::time::Duration;

use agentfabric::{Config, Node};
use agentfabric_verbs::{VerbsConfig, VerbsTransport};

use crate::error::BenchResult;
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
