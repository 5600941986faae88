//! Registered regions and batched transfers, on every transport.

use std::time::Duration;

use agentfabric::bulk::RegionError;
use agentfabric::{Block, Class, Config, Error, RegionDescriptor};
use agentfabric_tests::{
    assert_blocks_landed, describe_difference, pair, reversed_blocks, within, Kind,
};

const LIMIT: Duration = Duration::from_secs(30);

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// 1,000 blocks of 16 KiB scattered over a region, pushed then pulled back, byte for byte, with
/// a notification at the target.
async fn thousand_block_batches_write_and_read(kind: Kind) {
    let p = pair(kind, Config::default()).await;
    const BLOCK: u64 = 16 << 10;
    const N: u64 = 1000;
    let src = p.client.register((BLOCK * N) as usize).unwrap();
    let mut data = vec![0u8; (BLOCK * N) as usize];
    for (i, b) in data.iter_mut().enumerate() {
        *b = pattern(i as u64);
    }
    src.write_at(0, &data).await.unwrap();
    let dst = p.server.register((BLOCK * N * 2) as usize).unwrap();
    // Block i lands at slot (i * 7) % (2N): scattered, not contiguous.
    let blocks: Vec<Block> = (0..N)
        .map(|i| Block {
            local: i * BLOCK,
            remote: ((i * 7) % (2 * N)) * BLOCK,
            len: BLOCK,
        })
        .collect();
    let report = within(
        LIMIT,
        p.client_peer
            .write(&src, &dst.descriptor(), &blocks, Some(42)),
    )
    .await
    .unwrap();
    assert_eq!(report.blocks, N as usize);
    assert_eq!(report.bytes, BLOCK * N);
    let note = within(LIMIT, p.server.notification()).await.unwrap();
    assert_eq!(
        (note.peer.as_str(), note.region, note.tag),
        ("client", dst.descriptor().region, 42)
    );
    assert_blocks_landed(&dst, &blocks, &data).await;
    // Pull everything back into a fresh region.
    let back = p.client.register((BLOCK * N) as usize).unwrap();
    within(
        LIMIT,
        p.client_peer.read(&back, &dst.descriptor(), &blocks, None),
    )
    .await
    .unwrap();
    let mut all = vec![0u8; (BLOCK * N) as usize];
    back.read_at(0, &mut all).await.unwrap();
    if let Some(how) = describe_difference(&all, &data) {
        panic!("data read back differs: {how}");
    }
}

/// Ranges outside either region fail with the failing block's index, before anything moves.
async fn out_of_bounds_ranges_are_refused(kind: Kind) {
    let p = pair(kind, Config::default()).await;
    let src = p.client.register(1 << 20).unwrap();
    let dst = p.server.register(64 << 10).unwrap();
    let ok = Block {
        local: 0,
        remote: 0,
        len: 4096,
    };
    let bad_remote = Block {
        local: 0,
        remote: 60 << 10,
        len: 8192,
    };
    let e = p
        .client_peer
        .write(&src, &dst.descriptor(), &[ok, bad_remote], None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Transfer { block: 1, cause } if matches!(**cause, Error::Region(RegionError::OutOfBounds { .. }))),
        "{e}"
    );
    let bad_local = Block {
        local: (1 << 20) - 10,
        remote: 0,
        len: 20,
    };
    let e = p
        .client_peer
        .write(&src, &dst.descriptor(), &[bad_local], None)
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::Transfer { block: 0, .. }), "{e}");
    // A descriptor that lies about its length is caught by the target's own check.
    let mut forged = dst.descriptor();
    forged.len = 1 << 30;
    let e = p
        .client_peer
        .write(
            &src,
            &forged,
            &[Block {
                local: 0,
                remote: 1 << 20,
                len: 4096,
            }],
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Transfer { block: 0, cause } if matches!(**cause, Error::Region(RegionError::OutOfBounds { .. }))),
        "{e}"
    );
}

/// Revoked regions and forged keys are refused by the target with a typed error.
async fn revoked_and_forged_regions_are_refused(kind: Kind) {
    let p = pair(kind, Config::default()).await;
    let src = p.client.register(64 << 10).unwrap();
    let dst = p.server.register(64 << 10).unwrap();
    let b = [Block {
        local: 0,
        remote: 0,
        len: 1024,
    }];
    let mut forged = dst.descriptor();
    forged.key ^= 1;
    let e = p
        .client_peer
        .write(&src, &forged, &b, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Transfer { cause, .. } if matches!(**cause, Error::Region(RegionError::BadKey { .. }))),
        "{e}"
    );
    let d = dst.descriptor();
    p.client_peer.write(&src, &d, &b, None).await.unwrap();
    dst.revoke().await;
    assert!(dst.is_revoked());
    let e = p.client_peer.write(&src, &d, &b, None).await.unwrap_err();
    assert!(
        matches!(&e, Error::Transfer { cause, .. } if matches!(**cause, Error::Region(RegionError::Revoked { .. } | RegionError::Unknown { .. }))),
        "{e}"
    );
    let mut buf = [0u8; 4];
    assert!(matches!(
        dst.read_at(0, &mut buf).await,
        Err(Error::Region(RegionError::Revoked { .. }))
    ));
    let unknown = RegionDescriptor {
        region: 12345,
        len: 1 << 20,
        key: 0,
        rdma: None,
    };
    let e = p
        .client_peer
        .read(&src, &unknown, &b, None)
        .await
        .unwrap_err();
    assert_unknown_region(&e);
}

/// A peer whose node goes away mid-transfer (dropped: it tells its peers) fails the transfer
/// with a typed error; nothing hangs.
async fn peer_killed_mid_transfer_fails_it(kind: Kind) {
    let cfg = Config {
        peer_timeout: Duration::from_millis(800),
        ..Config::default()
    };
    let p = pair(kind, cfg).await;
    // 128 MiB: far more than can move in the few milliseconds before the peer dies.
    let src = p.client.register(128 << 20).unwrap();
    let dst = p.server.register(128 << 20).unwrap();
    let blocks: Vec<Block> = (0..2048)
        .map(|i| Block {
            local: i * (64 << 10),
            remote: i * (64 << 10),
            len: 64 << 10,
        })
        .collect();
    let d = dst.descriptor();
    let peer = p.client_peer.clone();
    let t = tokio::spawn(async move { peer.write(&src, &d, &blocks, None).await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    drop((p.server, p.server_peer, dst));
    if let Some(net) = &p.net {
        net.unlisten("server");
    }
    let r = within(Duration::from_secs(10), t).await.unwrap();
    match r {
        Err(Error::Transfer { cause, .. }) => assert!(
            matches!(
                *cause,
                Error::ClosedByPeer(_) | Error::PeerDead { .. } | Error::Cancelled
            ),
            "unexpected cause {cause}"
        ),
        Ok(r) => panic!("the transfer cannot have finished: {r:?}"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// A cancelled (dropped) transfer stops; the session and later transfers are unaffected, and
/// coordination flows meanwhile.
async fn cancelled_transfer_stops(kind: Kind) {
    let p = pair(kind, Config::default()).await;
    let src = p.client.register(32 << 20).unwrap();
    let dst = p.server.register(32 << 20).unwrap();
    let blocks: Vec<Block> = (0..512)
        .map(|i| Block {
            local: i * (64 << 10),
            remote: i * (64 << 10),
            len: 64 << 10,
        })
        .collect();
    let d = dst.descriptor();
    let r = tokio::time::timeout(
        Duration::from_millis(2),
        p.client_peer.write(&src, &d, &blocks, None),
    )
    .await;
    drop(r);
    let coord = p.client_peer.channel(Class::Coordination, 7).unwrap();
    coord.send("still here").await.unwrap();
    let rx = within(LIMIT, p.server_peer.accept_channel()).await.unwrap();
    assert_eq!(
        &within(LIMIT, rx.recv()).await.unwrap().body[..],
        b"still here"
    );
    src.write_at(0, &[9u8; 100]).await.unwrap();
    within(
        LIMIT,
        p.client_peer.write(
            &src,
            &d,
            &[Block {
                local: 0,
                remote: 0,
                len: 100,
            }],
            None,
        ),
    )
    .await
    .unwrap();
    let mut got = [0u8; 100];
    dst.read_at(0, &mut got).await.unwrap();
    assert_eq!(got, [9u8; 100]);
}

/// Over verbs, transfers between regions registered with the device move one-sided (RDMA WRITE
/// and READ): the session carries only the check (and a read's notification), not the blocks.
async fn one_sided_transfers_bypass_the_session(kind: Kind) {
    let p = pair(kind, Config::default()).await;
    const BLOCK: u64 = 64 << 10;
    const N: u64 = 256;
    let src = p.client.register((BLOCK * N) as usize).unwrap();
    let dst = p.server.register((BLOCK * N) as usize).unwrap();
    let d = dst.descriptor();
    assert!(
        d.rdma.is_some(),
        "the server's region is not registered with its device"
    );
    assert!(src.descriptor().rdma.is_some());
    let data: Vec<u8> = (0..BLOCK * N).map(|i| pattern(i ^ 0x55)).collect();
    src.write_at(0, &data).await.unwrap();
    let blocks = reversed_blocks(N, BLOCK);
    let before = p.client_peer.stats().session.bytes_sent;
    within(LIMIT, p.client_peer.write(&src, &d, &blocks, Some(5)))
        .await
        .unwrap();
    let sent = p.client_peer.stats().session.bytes_sent - before;
    assert!(
        sent < BLOCK,
        "{sent} bytes went through the session for a {} B one-sided transfer",
        BLOCK * N
    );
    // The notification rode on the last RDMA WRITE (with immediate), once.
    assert_eq!(within(LIMIT, p.server.notification()).await.unwrap().tag, 5);
    let again = tokio::time::timeout(Duration::from_millis(300), p.server.notification()).await;
    assert!(again.is_err(), "a second notification: {again:?}");
    assert_blocks_landed(&dst, &blocks, &data).await;
    // And back by RDMA READ into a fresh region.
    let back = p.client.register((BLOCK * N) as usize).unwrap();
    let before = p.client_peer.stats().session.bytes_sent;
    within(LIMIT, p.client_peer.read(&back, &d, &blocks, None))
        .await
        .unwrap();
    let sent = p.client_peer.stats().session.bytes_sent - before;
    assert!(
        sent < BLOCK,
        "{sent} bytes went through the session for a read"
    );
    let mut all = vec![0u8; (BLOCK * N) as usize];
    back.read_at(0, &mut all).await.unwrap();
    if let Some(how) = describe_difference(&all, &data) {
        panic!("data read back differs: {how}");
    }
    // Coordination still flows on the same session.
    let coord = p.client_peer.channel(Class::Coordination, 3).unwrap();
    coord.send("after").await.unwrap();
    let rx = within(LIMIT, p.server_peer.accept_channel()).await.unwrap();
    assert_eq!(&within(LIMIT, rx.recv()).await.unwrap().body[..], b"after");
}

/// A region reclaimed and registered again: the old descriptor is refused, the new one moves
/// blocks one-sided, and over verbs the buffer kept its device registration (a memory window
/// gives it a new remote key instead of pinning it again).
async fn a_reclaimed_region_is_shared_again_under_a_new_key(kind: Kind) {
    let p = pair(kind, Config::default()).await;
    const BLOCK: u64 = 64 << 10;
    const N: u64 = 64;
    let src = p.client.register((BLOCK * N) as usize).unwrap();
    let dst = p.server.register((BLOCK * N) as usize).unwrap();
    let blocks = reversed_blocks(N, BLOCK);
    let data: Vec<u8> = (0..BLOCK * N).map(|i| pattern(i ^ 0x33)).collect();
    src.write_at(0, &data).await.unwrap();
    let old = dst.descriptor();
    within(LIMIT, p.client_peer.write(&src, &old, &blocks, None))
        .await
        .unwrap();
    assert_blocks_landed(&dst, &blocks, &data).await;

    let buf = within(LIMIT, dst.reclaim())
        .await
        .expect("the region's only handle");
    assert_eq!(buf.keeps_registration(), kind == Kind::Verbs);
    let again = p.server.register_buf(buf);
    let new = again.descriptor();
    assert_ne!(new.region, old.region);
    assert_ne!(new.rdma.unwrap().rkey, old.rdma.unwrap().rkey);
    let e = within(LIMIT, p.client_peer.write(&src, &old, &blocks, None))
        .await
        .unwrap_err();
    assert_unknown_region(&e);

    let data: Vec<u8> = data.iter().map(|b| b ^ 0xff).collect();
    src.write_at(0, &data).await.unwrap();
    let before = p.client_peer.stats().session.bytes_sent;
    within(LIMIT, p.client_peer.write(&src, &new, &blocks, None))
        .await
        .unwrap();
    let sent = p.client_peer.stats().session.bytes_sent - before;
    assert!(sent < BLOCK, "{sent} bytes went through the session");
    assert_blocks_landed(&again, &blocks, &data).await;
}

/// Asserts that `e` is a transfer refused because the target knows no such region (an old
/// descriptor after the region was reclaimed).
fn assert_unknown_region(e: &Error) {
    assert!(
        matches!(e, Error::Transfer { cause, .. } if matches!(**cause, Error::Region(RegionError::Unknown { .. }))),
        "{e}"
    );
}

/// A region revoked while one-sided writes into it are in flight: the device refuses the rest
/// (the queue pair breaks), the transfer fails with a typed region error, and the session
/// resumes on a new connection with coordination intact.
async fn revoked_during_a_one_sided_transfer(kind: Kind) {
    let p = pair(kind, Config::default()).await;
    const BLOCK: u64 = 64 << 10;
    const N: u64 = 1024;
    let src = p.client.register((BLOCK * N) as usize).unwrap();
    src.write_at(0, &vec![0xA5; (BLOCK * N) as usize])
        .await
        .unwrap();
    let dst = p.server.register((BLOCK * N) as usize).unwrap();
    let d = dst.descriptor();
    assert!(d.rdma.is_some());
    let blocks: Vec<Block> = (0..N)
        .map(|i| Block {
            local: i * BLOCK,
            remote: i * BLOCK,
            len: BLOCK,
        })
        .collect();
    let peer = p.client_peer.clone();
    let t = tokio::spawn(async move { peer.write(&src, &d, &blocks, None).await });
    // Let the first block land, then revoke under the rest (64 MiB take tens of milliseconds
    // over tcp on loopback, seconds under emulation).
    within(LIMIT, async {
        let mut first = [0u8; 1];
        loop {
            dst.read_at(0, &mut first).await.unwrap();
            if first[0] == 0xA5 {
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    })
    .await;
    dst.revoke().await;
    match within(LIMIT, t).await.unwrap() {
        Err(Error::Transfer { cause, .. }) => assert!(
            matches!(
                *cause,
                Error::Region(RegionError::Revoked { .. } | RegionError::Unknown { .. })
            ),
            "unexpected cause {cause}"
        ),
        Ok(r) => panic!("the transfer finished before the revocation: {r:?}; make it longer"),
        Err(e) => panic!("unexpected error {e}"),
    }
    let coord = p.client_peer.channel(Class::Coordination, 4).unwrap();
    coord.send("still here").await.unwrap();
    let rx = within(LIMIT, p.server_peer.accept_channel()).await.unwrap();
    assert_eq!(
        &within(LIMIT, rx.recv()).await.unwrap().body[..],
        b"still here"
    );
}

macro_rules! suite {
    ($module:ident, $kind:ident, $attr:meta: $($case:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[$attr]
                async fn $case() {
                    super::$case(agentfabric_tests::Kind::$kind).await
                }
            )*
        }
    };
}

macro_rules! all_cases {
    ($module:ident, $kind:ident) => {
        // `cfg_attr(any(), …)` never applies: the cases run everywhere.
        all_cases!($module, $kind, cfg_attr(any(), ignore));
    };
    ($module:ident, $kind:ident, $attr:meta) => {
        suite!($module, $kind, $attr:
            thousand_block_batches_write_and_read,
            out_of_bounds_ranges_are_refused,
            revoked_and_forged_regions_are_refused,
            peer_killed_mid_transfer_fails_it,
            cancelled_transfer_stops,
        );
    };
}

all_cases!(mem, Mem);
all_cases!(tcp, Tcp);
all_cases!(quic, Quic);
// Over tcp the transfers move one-sided too, on the connection's one-sided lane.
suite!(
    tcp_one_sided,
    Tcp,
    cfg_attr(any(), ignore):
    one_sided_transfers_bypass_the_session,
    revoked_during_a_one_sided_transfer,
    a_reclaimed_region_is_shared_again_under_a_new_key,
);
// Needs an RDMA device: soft-roce/tests.d/25-verbs-bulk runs these in the lab with --ignored.
// Over verbs the transfers move one-sided (RDMA WRITE and READ).
all_cases!(
    verbs,
    Verbs,
    ignore = "needs an RDMA device: run with soft-roce/lab test"
);
suite!(
    verbs_rdma,
    Verbs,
    ignore = "needs an RDMA device: run with soft-roce/lab test":
    one_sided_transfers_bypass_the_session,
    revoked_during_a_one_sided_transfer,
    a_reclaimed_region_is_shared_again_under_a_new_key,
);

/// Bytes sent so far by lab netdev `var` (`AGENTFABRIC_LAB_NETDEV_A` or `_B`).
fn tx_bytes(var: &str) -> u64 {
    let dev = std::env::var(var).unwrap_or_else(|_| panic!("{var} is unset: not in the lab"));
    let path = format!("/sys/class/net/{dev}/statistics/tx_bytes");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What each end of the lab's veth wire sent while `fut` ran: (veth A, veth B).
async fn wire_bytes<T>(fut: impl std::future::Future<Output = T>) -> (T, u64, u64) {
    let (a, b) = (
        tx_bytes("AGENTFABRIC_LAB_NETDEV_A"),
        tx_bytes("AGENTFABRIC_LAB_NETDEV_B"),
    );
    let out = fut.await;
    let (a2, b2) = (
        tx_bytes("AGENTFABRIC_LAB_NETDEV_A"),
        tx_bytes("AGENTFABRIC_LAB_NETDEV_B"),
    );
    (out, a2 - a, b2 - b)
}

/// Over verbs with a rail on each end (`VerbsConfig::rails`), the blocks of one transfer spread
/// over both devices: each end of the veth wire carries at least a quarter of the bytes, both
/// pushed (RDMA WRITE, the client's two devices sending) and pulled (RDMA READ, the server's
/// responding). Without the rail one end carries them all and the other only acknowledgements.
/// The data lands byte for byte, the notification rides on the last write once every byte
/// before it on either rail has landed, and a reclaimed region is shared again with new keys on
/// both devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs two RDMA devices: run with soft-roce/lab test"]
async fn verbs_rails_transfers_spread_over_both_devices() {
    let p = agentfabric_tests::pair_built(Kind::Verbs, Config::default(), |name, cfg, _| {
        agentfabric::Node::builder(name)
            .config(cfg)
            .transport(agentfabric_tests::verbs_rails_transport(name))
            .build()
            .expect("valid node")
    })
    .await;
    const BLOCK: u64 = 256 << 10;
    const N: u64 = 64;
    const TOTAL: u64 = BLOCK * N;
    let src = p.client.register(TOTAL as usize).unwrap();
    let dst = p.server.register(TOTAL as usize).unwrap();
    let d = dst.descriptor();
    let rails = d.rdma.expect("registered with the device").rails;
    assert_eq!(rails.len(), 1, "the server's region spans its rail: {d:?}");
    let data: Vec<u8> = (0..TOTAL).map(|i| pattern(i ^ 0x5a)).collect();
    src.write_at(0, &data).await.unwrap();
    let blocks = reversed_blocks(N, BLOCK);

    let before = p.client_peer.stats().session.bytes_sent;
    let (r, a, b) = wire_bytes(within(
        LIMIT,
        p.client_peer.write(&src, &d, &blocks, Some(9)),
    ))
    .await;
    r.unwrap();
    eprintln!("rails write of {TOTAL} B: veth A sent {a} B, veth B {b} B");
    let sent = p.client_peer.stats().session.bytes_sent - before;
    assert!(sent < BLOCK, "{sent} bytes went through the session");
    assert!(
        a >= TOTAL / 4 && b >= TOTAL / 4,
        "a {TOTAL} B write did not spread over both devices: the wire's ends sent {a} and {b} B"
    );
    assert_eq!(within(LIMIT, p.server.notification()).await.unwrap().tag, 9);
    assert_blocks_landed(&dst, &blocks, &data).await;

    let back = p.client.register(TOTAL as usize).unwrap();
    let (r, a, b) = wire_bytes(within(LIMIT, p.client_peer.read(&back, &d, &blocks, None))).await;
    r.unwrap();
    eprintln!("rails read of {TOTAL} B: veth A sent {a} B, veth B {b} B");
    assert!(
        a >= TOTAL / 4 && b >= TOTAL / 4,
        "a {TOTAL} B read did not spread over both devices: the wire's ends sent {a} and {b} B"
    );
    let mut all = vec![0u8; TOTAL as usize];
    back.read_at(0, &mut all).await.unwrap();
    if let Some(how) = describe_difference(&all, &data) {
        panic!("data read back differs: {how}");
    }

    // Reclaimed and shared again: new keys on both devices, the old descriptor refused.
    drop(back);
    let buf = within(LIMIT, dst.reclaim())
        .await
        .expect("the region's only handle");
    assert!(buf.keeps_registration());
    let again = p.server.register_buf(buf);
    let new = again.descriptor();
    let (old_rdma, new_rdma) = (d.rdma.unwrap(), new.rdma.unwrap());
    assert_ne!(new_rdma.rkey, old_rdma.rkey);
    assert_eq!(new_rdma.rails.len(), 1);
    assert_ne!(new_rdma.rails, old_rdma.rails);
    let e = within(LIMIT, p.client_peer.write(&src, &d, &blocks, None))
        .await
        .unwrap_err();
    assert_unknown_region(&e);
    let data: Vec<u8> = data.iter().map(|b| b ^ 0xff).collect();
    src.write_at(0, &data).await.unwrap();
    let (r, a, b) = wire_bytes(within(
        LIMIT,
        p.client_peer.write(&src, &new, &blocks, None),
    ))
    .await;
    r.unwrap();
    assert!(
        a >= TOTAL / 4 && b >= TOTAL / 4,
        "after reclaim: {a} and {b} B"
    );
    assert_blocks_landed(&again, &blocks, &data).await;
}
