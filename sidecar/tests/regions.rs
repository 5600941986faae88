//! Regions: clients' sealed memfds registered with `REGION_ADD`, and `WRITE`/`READ` between
//! clients of two sidecars. Every check of the bytes is made through the *target client's own*
//! mapping of its memfd: the bytes being there proves the sidecar moved them into the client's
//! pages, with no copy of its own in between that the client would have to fetch.

mod support;

use std::time::Duration;

use agentfabric_sidecar::wire::{kind, ClientMsg, ErrorCode, FromClient, SidecarMsg};
use bytes::Bytes;
use support::{
    assert_all, assert_same, expect_error, fill_pattern, transfer_msg, Client, Memfd, TestSidecar,
};

const MIB: usize = 1 << 20;

/// Two sidecars, `writer` on "ra" and `target` on "rb", a channel from the writer to the
/// target, and a sealed memfd of `len` bytes registered by each: (sidecars, clients, the
/// writer's channel, the target's channel, memfds, handles, descriptors).
struct Pair {
    sa: TestSidecar,
    sb: TestSidecar,
    w: Client,
    t: Client,
    wch: u32,
    tch: u32,
    wmem: Memfd,
    tmem: Memfd,
    wreg: u32,
    treg: u32,
    wdesc: Bytes,
    tdesc: Bytes,
}

async fn pair(len: usize) -> Pair {
    let sa = TestSidecar::start("ra").await;
    let sb = TestSidecar::start("rb").await;
    let mut w = sa.client("writer").await;
    let mut t = sb.client("target").await;
    let (wch, node) = w.open(&sb.url(), "target", "kv").await;
    assert_eq!(node, "rb");
    let (tch, ..) = t.incoming().await;
    let wmem = Memfd::sealed(len);
    let tmem = Memfd::sealed(len);
    let (wreg, wdesc) = w.region_add(&wmem).await;
    let (treg, tdesc) = t.region_add(&tmem).await;
    // The target hands its descriptor to the writer the way agents would: in a message.
    t.send(tch, tdesc.clone()).await;
    t.flush_sends().await;
    let (c, _, got) = w.message().await;
    assert_eq!((c, &got), (wch, &tdesc));
    Pair {
        sa,
        sb,
        w,
        t,
        wch,
        tch,
        wmem,
        tmem,
        wreg,
        treg,
        wdesc,
        tdesc,
    }
}

impl Pair {
    async fn stop(self) {
        drop((self.w, self.t));
        self.sa.stop().await;
        self.sb.stop().await;
    }
}

/// `WRITE` with a notification moves the writer's bytes into the target client's memfd (blocks
/// at other offsets than they came from), `TRANSFERRED` counts them, and the target gets
/// `NOTIFICATION` with the tag, its own region handle and the writer's node. Bytes outside the
/// blocks are untouched. Then `READ` pulls bytes the target wrote back into the writer's memfd.
async fn write_then_read(len: usize) {
    let mut p = pair(len).await;
    fill_pattern(p.wmem.bytes_mut(), 7);
    let half = (len / 2) as u64;
    let quarter = (len / 4) as u64;
    // Block 1: the writer's first half to the target's second half; block 2: a quarter of the
    // writer's second half to the start of the target's region; an odd-sized tail block.
    let blocks = [
        (0, half, half),
        (half, 0, quarter),
        (half + quarter + 1, quarter + 5, 4093),
    ];
    let moved: u64 = blocks.iter().map(|b| b.2).sum();
    let msg = transfer_msg(true, p.wch, p.wreg, &p.tdesc, Some(0xC0FFEE), &blocks);
    match p.w.call(msg).await {
        SidecarMsg::Transferred { bytes, blocks, .. } => {
            assert_eq!(bytes, moved, "TRANSFERRED's bytes");
            assert_eq!(blocks, 3);
        }
        other => panic!("WRITE answered {other:?}"),
    }
    let n =
        p.t.event_where("NOTIFICATION", |f| f.msg.kind() == kind::NOTIFICATION)
            .await;
    assert_eq!(
        n.msg,
        SidecarMsg::Notification {
            region: p.treg,
            tag: 0xC0FFEE,
            node: "ra".into()
        }
    );
    let (w, t) = (p.wmem.bytes(), p.tmem.bytes());
    let (h, q) = (half as usize, quarter as usize);
    assert_same(&t[h..], &w[..h], "block 1 in the target's mapping");
    assert_same(&t[..q], &w[h..h + q], "block 2 in the target's mapping");
    assert_same(
        &t[q + 5..q + 5 + 4093],
        &w[h + q + 1..h + q + 1 + 4093],
        "block 3 in the target's mapping",
    );
    assert_all(&t[q..q + 5], 0, "the gap before block 3");
    assert_all(&t[q + 5 + 4093..h], 0, "the gap after block 3");

    // READ the other way: the target writes into its own pages, the writer pulls them.
    fill_pattern(&mut p.tmem.bytes_mut()[..q], 99);
    let msg = transfer_msg(false, p.wch, p.wreg, &p.tdesc, None, &[(0, 0, quarter)]);
    match p.w.call(msg).await {
        SidecarMsg::Transferred { bytes, blocks, .. } => {
            assert_eq!((bytes, blocks), (quarter, 1));
        }
        other => panic!("READ answered {other:?}"),
    }
    // Compared with the pattern computed afresh: a READ done as a WRITE would make the two
    // mappings equal too, but with the writer's bytes.
    let mut want = vec![0u8; q];
    fill_pattern(&mut want, 99);
    assert_same(
        &p.wmem.bytes()[..q],
        &want,
        "READ into the writer's mapping",
    );
    assert_same(&p.tmem.bytes()[..q], &want, "the READ's source, unchanged");
    // And the acceptor can address the opener's region over its own handle of the channel.
    fill_pattern(&mut p.tmem.bytes_mut()[..4096], 1234);
    let msg = transfer_msg(true, p.tch, p.treg, &p.wdesc, Some(5), &[(0, 8192, 4096)]);
    assert!(matches!(
        p.t.call(msg).await,
        SidecarMsg::Transferred { bytes: 4096, .. }
    ));
    let n =
        p.w.event_where("NOTIFICATION", |f| f.msg.kind() == kind::NOTIFICATION)
            .await;
    assert_eq!(
        n.msg,
        SidecarMsg::Notification {
            region: p.wreg,
            tag: 5,
            node: "rb".into()
        }
    );
    assert_same(
        &p.wmem.bytes()[8192..8192 + 4096],
        &p.tmem.bytes()[..4096],
        "the acceptor's WRITE in the opener's mapping",
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_and_read_8_mib() {
    tokio::time::timeout(Duration::from_secs(30), write_then_read(8 * MIB))
        .await
        .expect("within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_and_read_64_mib() {
    tokio::time::timeout(Duration::from_secs(40), write_then_read(64 * MIB))
        .await
        .expect("within 40 s");
}

/// Two endpoints of one sidecar move bytes through its in-process transport the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_write() {
    let sc = TestSidecar::start("rl").await;
    let mut w = sc.client("w").await;
    let mut t = sc.client("t").await;
    let (ch, _) = w.open("", "t", "").await;
    t.incoming().await;
    let mut wmem = Memfd::sealed(MIB);
    let tmem = Memfd::sealed(MIB);
    let (wreg, _) = w.region_add(&wmem).await;
    let (treg, tdesc) = t.region_add(&tmem).await;
    fill_pattern(wmem.bytes_mut(), 3);
    let msg = transfer_msg(true, ch, wreg, &tdesc, Some(1), &[(0, 0, MIB as u64)]);
    assert!(matches!(
        w.call(msg).await,
        SidecarMsg::Transferred { bytes, .. } if bytes == MIB as u64
    ));
    let n = t
        .event_where("NOTIFICATION", |f| f.msg.kind() == kind::NOTIFICATION)
        .await;
    assert!(matches!(n.msg, SidecarMsg::Notification { region, tag: 1, .. } if region == treg));
    assert_same(tmem.bytes(), wmem.bytes(), "the local WRITE");
    drop((w, t));
    sc.stop().await;
}

/// `REGION_ADD` is refused with `BAD_FD` for a memfd not sealed against shrinking (the sidecar
/// would fault if it shrank under its mapping), without a descriptor, shorter than `len`, and
/// for a descriptor that is not a memfd; the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_add_refusals() {
    let sc = TestSidecar::start("rf").await;
    let mut c = sc.client("c").await;
    let add = |id, len| FromClient {
        id,
        msg: ClientMsg::RegionAdd { len },
    };

    let unsealed = Memfd::new(MIB, false);
    let id = c.id();
    c.write_with_fds(&add(id, MIB as u64), &[unsealed.fd()])
        .await
        .unwrap();
    let m = expect_error(c.reply(id).await, ErrorCode::BadFd, "an unsealed memfd");
    assert!(m.contains("seal"), "the message says why: {m}");

    let id = c.op(ClientMsg::RegionAdd { len: MIB as u64 }).await;
    expect_error(c.reply(id).await, ErrorCode::BadFd, "no descriptor");

    let short = Memfd::sealed(MIB);
    let id = c.id();
    c.write_with_fds(&add(id, 2 * MIB as u64), &[short.fd()])
        .await
        .unwrap();
    expect_error(c.reply(id).await, ErrorCode::BadFd, "len beyond the memfd");

    let id = c.id();
    c.write_with_fds(&add(id, 0), &[short.fd()]).await.unwrap();
    expect_error(c.reply(id).await, ErrorCode::BadFd, "len 0");

    // A pipe is not a memfd: it has no seals.
    let (r, _w) = nix::unistd::pipe().unwrap();
    let id = c.id();
    c.write_with_fds(&add(id, 4096), &[std::os::fd::AsRawFd::as_raw_fd(&r)])
        .await
        .unwrap();
    expect_error(c.reply(id).await, ErrorCode::BadFd, "a pipe");

    // The same memfd, sealed, is accepted: the refusals above were about the descriptors.
    let good = Memfd::sealed(MIB);
    let (h, desc) = c.region_add(&good).await;
    assert_ne!(h, 0);
    assert!(!desc.is_empty());
    c.done(ClientMsg::RegionDrop { region: h }).await;
    c.fails(
        ClientMsg::RegionDrop { region: h },
        ErrorCode::UnknownRegion,
    )
    .await;
    drop(c);
    sc.stop().await;
}

/// Transfers that cannot be done fail with `TRANSFER` and move nothing: a block past the end of
/// the remote region or of the local one, and a region its owner dropped. Unknown handles are
/// `UNKNOWN_CHANNEL` / `UNKNOWN_REGION`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_refusals() {
    let mut p = pair(MIB).await;
    fill_pattern(p.wmem.bytes_mut(), 11);
    let m = MIB as u64;
    // The first block is fine, the second ends one byte past the target's region.
    let msg = transfer_msg(
        true,
        p.wch,
        p.wreg,
        &p.tdesc,
        Some(1),
        &[(0, 0, 4096), (0, m - 4095, 4096)],
    );
    expect_error(p.w.call(msg).await, ErrorCode::Transfer, "remote bounds");
    let msg = transfer_msg(true, p.wch, p.wreg, &p.tdesc, None, &[(m - 10, 0, 11)]);
    expect_error(p.w.call(msg).await, ErrorCode::Transfer, "local bounds");
    let msg = transfer_msg(true, p.wch, p.wreg, &p.tdesc, None, &[(0, u64::MAX, 2)]);
    expect_error(p.w.call(msg).await, ErrorCode::Transfer, "offset overflow");
    assert_all(p.tmem.bytes(), 0, "the target after refused transfers");

    let msg = transfer_msg(true, 999, p.wreg, &p.tdesc, None, &[(0, 0, 1)]);
    expect_error(p.w.call(msg).await, ErrorCode::UnknownChannel, "channel");
    let msg = transfer_msg(true, p.wch, 999, &p.tdesc, None, &[(0, 0, 1)]);
    expect_error(p.w.call(msg).await, ErrorCode::UnknownRegion, "region");
    let msg = transfer_msg(true, p.wch, p.wreg, &p.tdesc, None, &[]);
    expect_error(p.w.call(msg).await, ErrorCode::InvalidArgument, "no blocks");
    let bogus = Bytes::from_static(b"not a descriptor");
    let msg = transfer_msg(true, p.wch, p.wreg, &bogus, None, &[(0, 0, 1)]);
    expect_error(
        p.w.call(msg).await,
        ErrorCode::InvalidArgument,
        "descriptor",
    );

    // The target drops its region: the writer's transfers into it fail.
    p.t.done(ClientMsg::RegionDrop { region: p.treg }).await;
    let msg = transfer_msg(true, p.wch, p.wreg, &p.tdesc, Some(2), &[(0, 0, 4096)]);
    expect_error(p.w.call(msg).await, ErrorCode::Transfer, "a dropped region");
    let msg = transfer_msg(false, p.wch, p.wreg, &p.tdesc, None, &[(0, 0, 4096)]);
    expect_error(
        p.w.call(msg).await,
        ErrorCode::Transfer,
        "READ of a dropped region",
    );
    assert_all(p.tmem.bytes(), 0, "the dropped region");
    p.t.ping().await;
    assert!(
        p.t.queued_events()
            .iter()
            .all(|e| e.msg.kind() != kind::NOTIFICATION),
        "no NOTIFICATION for failed transfers: {:?}",
        p.t.queued_events()
    );
    p.stop().await;
}

/// `REGION_DROP` fences transfers: once it is answered, no peer's transfer touches the client's
/// memory any more (the client may reuse or unmap it). A 64 MiB `WRITE` into the target is in
/// flight when the target drops the region; the target then zeroes its memfd, and after the
/// writer's transfer has ended (failed or not), the memfd must still be all zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_drop_fences_transfers() {
    let len = 64 * MIB;
    let mut p = pair(len).await;
    fill_pattern(p.wmem.bytes_mut(), 21);
    let msg = transfer_msg(true, p.wch, p.wreg, &p.tdesc, None, &[(0, 0, len as u64)]);
    let id = p.w.op(msg).await;
    // Let the transfer start landing.
    tokio::time::sleep(Duration::from_millis(5)).await;
    p.t.done(ClientMsg::RegionDrop { region: p.treg }).await;
    p.tmem.bytes_mut().fill(0);
    match p.w.reply(id).await {
        SidecarMsg::Transferred { .. } => {}
        SidecarMsg::Error {
            code: ErrorCode::Transfer,
            ..
        } => {}
        other => panic!("the WRITE into a region being dropped: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_all(p.tmem.bytes(), 0, "the memfd after REGION_DROP's DONE");
    p.stop().await;
}
