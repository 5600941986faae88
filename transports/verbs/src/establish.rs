//! Setting a connection up over its TCP side channel, apart from the data path it hands over:
//! making the verbs objects, exchanging and checking the QP parameters (QPN, PSN, GID, MTU,
//! timers, depths: [`crate::params::negotiate`]), moving the QPs to RTS, the rails' exchange and
//! path check, the bulk lane's agreement and exchange, starting the completion-draining tasks
//! and the posting threads, and a probe message each way on each lane, before the lanes are
//! handed out as one [`Connection`].

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use agentfabric::transport::{Connection, Immediates, MAX_RAILS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::VerbsConfig;
use crate::datapath::{drain_rma, probe, Inner, Shared};
use crate::device::{Context, LocalPort};
use crate::one_sided::{probe_rails, Rail, RailQp, Rma, RmaCq, RmaShared};
use crate::params::{self, negotiate, Negotiated, QpParams, PARAMS_LEN};
use crate::posting::{post_thread, spawn_poster, start_posting, ONE_SIDED_POSTER};
use crate::qp::PathSpec;
use crate::resources::Resources;

/// Which end of the side channel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Initiator,
    Acceptor,
}

/// Immediates kept for a handler not installed yet (see
/// [`OneSided::on_immediate`](agentfabric::transport::OneSided::on_immediate)).
const EARLY_IMMEDIATES: usize = 1024;

/// Sets up one connection over an established side channel: resources, parameter exchange and
/// checks, QP transitions, then a probe message each way proving the RDMA path works.
pub(crate) async fn establish(
    mut side: TcpStream,
    role: Role,
    main: LocalPort,
    rails: Vec<LocalPort>,
    cfg: &VerbsConfig,
    remote_name: String,
) -> io::Result<Connection> {
    side.set_nodelay(true)?;
    let t0 = std::time::Instant::now();
    // Created first, dropped last: the one-sided QP in `res` completes on it.
    let LocalPort {
        dev,
        port,
        gid_index,
    } = main;
    let rma = Arc::new(RmaCq::new(&dev, cfg.send_depth)?);
    let mut res = Resources::new(dev, port, gid_index, cfg, Some(rma.cq))?;
    let domain = {
        let devs: Vec<Arc<Context>> = rails.iter().map(|r| r.dev.clone()).collect();
        crate::memory::domain_id(res.dev(), &devs)
    };
    // Each rail's QP goes before its CQ (the pair's order).
    let mut rail_qps = Vec::with_capacity(rails.len());
    for rail in rails {
        let cq = Arc::new(RmaCq::new(&rail.dev, cfg.send_depth)?);
        rail_qps.push((RailQp::new(rail, &cq, cfg.send_depth)?, cq));
    }
    let t_resources = t0.elapsed();
    res.post_all_recvs(cfg)?;
    let local = res.local_params(cfg)?;
    let limit = cfg.connect_timeout;
    let (n, remote) = match tokio::time::timeout(limit, async {
        let mut buf = [0u8; PARAMS_LEN];
        let bad = |m: params::Mismatch| {
            io::Error::new(io::ErrorKind::InvalidData, format!("verbs connection to {remote_name}: {m}"))
        };
        let closed = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("verbs connection to {remote_name}: the peer closed the side channel during set-up: {e}"),
            )
        };
        match role {
            Role::Initiator => {
                side.write_all(&local.encode()).await?;
                side.read_exact(&mut buf).await.map_err(closed)?;
                let remote = QpParams::decode(&buf).map_err(bad)?;
                let n = negotiate(&local, &remote).map_err(bad)?;
                Ok((n, remote))
            }
            Role::Acceptor => {
                // Our parameters go back whatever we think of theirs, so the initiator checks
                // them itself and its error speaks from its own side; only what cannot be
                // decoded at all is answered with a refusal.
                side.read_exact(&mut buf).await.map_err(closed)?;
                let remote = match QpParams::decode(&buf) {
                    Ok(r) => r,
                    Err(m) => {
                        let _ = side.write_all(&params::encode_refusal(&m.to_string())).await;
                        return Err(bad(m));
                    }
                };
                side.write_all(&local.encode()).await?;
                let n = negotiate(&local, &remote).map_err(bad)?;
                Ok((n, remote))
            }
        }
    })
    .await
    {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("verbs connection to {remote_name}: no parameter exchange within {limit:?}"),
            ))
        }
    };
    let t_exchanged = t0.elapsed();
    res.connect_qp(&local, &remote, &n)?;
    let rails = connect_rails(
        &mut side,
        rail_qps,
        &res.path(&local, &remote, &n),
        cfg,
        &remote_name,
    )
    .await?;
    // Made before the agreement, so that an end that cannot have one says so.
    let sibling = cfg.bulk_lane.then(|| res.sibling(cfg));
    let bulk_lane = set_up_bulk_lane(&mut side, sibling, cfg, &remote_name).await?;
    let t_rts = t0.elapsed();

    let local_inline = res.max_inline();
    let mut rma_rails = vec![Rail::main(res.rma_qp(), rma)];
    rma_rails.extend(rails.into_iter().map(|(qp, cq)| Rail::extra(qp, cq)));
    let (rma_stop, rma_stopped): (Vec<_>, Vec<_>) = rma_rails
        .iter()
        .map(|_| tokio::sync::oneshot::channel())
        .unzip();
    let rail_cqs: Vec<Arc<RmaCq>> = rma_rails.iter().map(|r| r.cq.clone()).collect();
    let software = res.dev().software;
    let poster = cfg.posting.thread(software);
    let (kick, kicks) = match poster {
        // One pending wake-up is enough: the thread posts all that fits when it runs.
        Some(_) => {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let rma = Arc::new(RmaShared::new(
        Rma::new(
            rma_rails,
            cfg.rma_inflight_bytes,
            cfg.send_depth,
            remote_name.clone(),
            Immediates::new(EARLY_IMMEDIATES),
        ),
        kick,
    ));
    let lane = |res: Resources, side: Option<TcpStream>, credits: u32, stop: Vec<_>, spin| {
        Inner::new(
            res,
            side,
            rma.clone(),
            stop,
            domain,
            credits,
            spin,
            cfg,
            &remote_name,
        )
    };
    let shared = Shared::new(lane(
        res,
        Some(side),
        n.send_credits,
        rma_stop,
        cfg.spin_before_sleep,
    )?);
    // The bulk lane fails with the connection's one-sided operations (it shares them), and the
    // latency lane with its frames: either lane's failure is the connection's.
    let bulk = match bulk_lane {
        // Bulk completions come in streams that a spinning worker would only take CPU from.
        Some((res, n)) => Some(Shared::new(lane(
            res,
            None,
            n.send_credits,
            Vec::new(),
            Duration::ZERO,
        )?)),
        None => None,
    };
    let ops = Arc::downgrade(&rma);
    if let (Some(priority), Some(kicks)) = (poster, kicks) {
        let (conn, ops) = (shared.downgrade(), ops.clone());
        spawn_poster(ONE_SIDED_POSTER, &remote_name, move || {
            post_thread(conn, ops, kicks, priority)
        })?;
    }
    for (k, (cq, stopped)) in rail_cqs.into_iter().zip(rma_stopped).enumerate() {
        tokio::spawn(drain_rma(shared.downgrade(), ops.clone(), k, cq, stopped));
    }
    // The probe: one zero-length message each way on each lane, so a wrong GID or an
    // unreachable peer fails here, with a clear error, rather than as a dead session later.
    let wait = limit.max(Duration::from_millis(500));
    let describe = |why: String| {
        io::Error::new(
            io::ErrorKind::HostUnreachable,
            format!(
                "verbs connection to {remote_name}: the side channel works but the RDMA path \
                 does not ({why}): local {} port {port} GID index {gid_index} ({}) -> peer {} \
                 GID index {} ({}); check the GID index on both ends (AGENTFABRIC_LAB_GID_INDEX / \
                 VerbsConfig::gid_index: a RoCE v2 IPv4 GID on the interface that routes to the \
                 peer) and that the link is up",
                local.device, local.gid, remote.device, remote.gid_index, remote.gid
            ),
        )
    };
    let probes = std::iter::once((&shared, None)).chain(bulk.iter().map(|b| (b, Some(&shared))));
    for (lane, side) in probes {
        match tokio::time::timeout(wait, probe(lane, side)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(describe(e.to_string())),
            Err(_) => return Err(describe(format!("no RDMA message within {wait:?}"))),
        }
    }
    if let Some(bulk) = &bulk {
        start_posting(bulk, poster, &remote_name)?;
    }
    tracing::debug!(remote = %remote_name, local_qpn = local.qpn, remote_qpn = remote.qpn,
        path_mtu = params::mtu_bytes(n.path_mtu), credits = n.send_credits,
        max_inline = local_inline, bulk_lane = bulk.is_some(), ?t_resources, ?t_exchanged,
        ?t_rts, t_probed = ?t0.elapsed(), "verbs connection up");
    Ok(crate::lanes::connection(shared, bulk, remote_name))
}

/// Exchanges the rails' parameters over the side channel, pairs rail *k* here with rail *k* on
/// the peer (as many as both have; the others are dropped), connects each pair with the
/// connection's timers `timers`, and proves each pair's path. Returns the connected rails.
async fn connect_rails(
    side: &mut TcpStream,
    rails: Vec<(RailQp, Arc<RmaCq>)>,
    timers: &PathSpec,
    cfg: &VerbsConfig,
    remote_name: &str,
) -> io::Result<Vec<(RailQp, Arc<RmaCq>)>> {
    let limit = cfg.connect_timeout;
    let bad = |m: params::Mismatch| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("verbs connection to {remote_name}: {m}"),
        )
    };
    let mine = rails
        .iter()
        .map(|(qp, _)| qp.params())
        .collect::<io::Result<Vec<_>>>()?;
    let theirs = tokio::time::timeout(limit, async {
        side.write_all(&params::encode_rails(&mine)).await?;
        let mut head = [0u8; 1];
        side.read_exact(&mut head).await?;
        if usize::from(head[0]) > MAX_RAILS {
            return Err(bad(params::decode_rails(&head, MAX_RAILS).unwrap_err()));
        }
        let mut b = vec![0u8; params::rails_len(head[0])];
        b[0] = head[0];
        side.read_exact(&mut b[1..]).await?;
        params::decode_rails(&b, MAX_RAILS).map_err(bad)
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("verbs connection to {remote_name}: no rails exchange within {limit:?}"),
        )
    })??;
    let required = cfg.mtu.and_then(params::mtu_code).unwrap_or(0);
    let mut paired = Vec::new();
    for ((qp, cq), (local, remote)) in rails.into_iter().zip(mine.iter().zip(&theirs)) {
        let mtu = params::rail_path_mtu(local, remote, required).map_err(bad)?;
        qp.connect(local, remote, mtu, timers)?;
        paired.push((qp, cq));
    }
    if paired.len() < mine.len().max(theirs.len()) {
        tracing::info!(remote = %remote_name, here = mine.len(), there = theirs.len(),
            "the two ends have different numbers of rails: using {}", paired.len());
    }
    let probing: Vec<(&RailQp, &RmaCq)> = paired.iter().map(|(q, c)| (q, &**c)).collect();
    probe_rails(&probing, limit.max(Duration::from_millis(500)), remote_name).await?;
    Ok(paired)
}

/// Runs `f`, a step of the bulk lane's set-up, within `limit`; its errors say which step.
async fn bounded<T>(
    limit: Duration,
    remote_name: &str,
    what: &str,
    f: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!(
                "verbs connection to {remote_name}: the peer closed the side channel during \
                 set-up ({what}): {e}"
            ),
        )),
        Ok(Err(e)) => Err(io::Error::new(
            e.kind(),
            format!("verbs connection to {remote_name}: {what}: {e}"),
        )),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("verbs connection to {remote_name}: no {what} within {limit:?}"),
        )),
    }
}

/// Sets up the bulk lane (see [`crate::lanes`]) when both ends want one: `sibling` is this
/// end's bulk lane QP ([`Resources::sibling`]) when it wants one. An end that wanted one and
/// could not make it (out of locked memory, say) goes on without, and so does the connection:
/// bulk frames then share the latency lane's QP.
async fn set_up_bulk_lane(
    side: &mut TcpStream,
    sibling: Option<io::Result<Resources>>,
    cfg: &VerbsConfig,
    remote_name: &str,
) -> io::Result<Option<(Resources, Negotiated)>> {
    let sibling = match sibling {
        Some(Ok(res)) => Some(res),
        Some(Err(e)) => {
            tracing::warn!(remote = %remote_name, error = %e,
                "cannot set up a bulk lane: bulk frames share the latency lane's queue pair");
            None
        }
        None => None,
    };
    let want = sibling.is_some();
    let both = agree_bulk_lane(side, want, cfg.connect_timeout, remote_name).await?;
    match sibling {
        Some(res) if both => connect_bulk_lane(side, res, cfg, remote_name)
            .await
            .map(Some),
        _ => Ok(None),
    }
}

/// Tells the peer whether this end wants a bulk lane and learns whether it does: `true` when
/// both do.
async fn agree_bulk_lane(
    side: &mut TcpStream,
    want: bool,
    limit: Duration,
    remote_name: &str,
) -> io::Result<bool> {
    bounded(limit, remote_name, "bulk lane agreement", async {
        side.write_all(&[u8::from(want)]).await?;
        let mut theirs = [0u8; 1];
        side.read_exact(&mut theirs).await?;
        match theirs[0] {
            0 | 1 => Ok(want && theirs[0] == 1),
            b => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the peer answered {b} (0 or 1 expected)"),
            )),
        }
    })
    .await
}

/// Connects the bulk lane's QP, `res` (made with [`Resources::sibling`]), to the peer's: the
/// parameters of each end's bulk lane QP cross the side channel and are checked like the first
/// QP's.
async fn connect_bulk_lane(
    side: &mut TcpStream,
    mut res: Resources,
    cfg: &VerbsConfig,
    remote_name: &str,
) -> io::Result<(Resources, Negotiated)> {
    let local = res.local_params(cfg)?;
    let remote = bounded(
        cfg.connect_timeout,
        remote_name,
        "bulk lane parameter exchange",
        async {
            // Both ends write first: the messages are small enough for any socket buffer.
            side.write_all(&local.encode()).await?;
            let mut buf = [0u8; PARAMS_LEN];
            side.read_exact(&mut buf).await?;
            Ok(buf)
        },
    )
    .await?;
    let bad = |m: params::Mismatch| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("verbs connection to {remote_name}, bulk lane: {m}"),
        )
    };
    let remote = QpParams::decode(&remote).map_err(bad)?;
    let n = negotiate(&local, &remote).map_err(bad)?;
    res.connect_qp(&local, &remote, &n).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("verbs connection to {remote_name}, bulk lane: {e}"),
        )
    })?;
    Ok((res, n))
}
