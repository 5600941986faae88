//! Clients that misbehave — garbage, oversized frames, too many sends, too many descriptors,
//! dying mid-transfer, never reading — and what must hold meanwhile: the offender's connection
//! ends (or its traffic waits), and every other client keeps working.

mod support;

use std::time::{Duration, Instant};

use agentfabric_sidecar::wire::{
    kind, ClientMsg, ErrorCode, FromClient, Header, SidecarMsg, HEADER_LEN,
};
use agentfabric_sidecar::Limits;
use bytes::Bytes;
use support::{fill_pattern, transfer_msg, Client, Memfd, TestSidecar, WAIT};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// A raw header: `len` (bytes after the field), `kind`, `flags`, `id`.
fn header(len: u32, kind: u16, flags: u16, id: u64) -> Vec<u8> {
    Header {
        len,
        kind,
        flags,
        id,
    }
    .to_bytes()
    .to_vec()
}

/// Two well-behaved clients of `sc` with a channel between them, to check after each abuse
/// that the sidecar still serves others: (opener, acceptor, opener's handle, acceptor's).
async fn bystanders(sc: &TestSidecar) -> (Client, Client, u32, u32) {
    let mut x = sc.client("bystander-x").await;
    let mut y = sc.client("bystander-y").await;
    let (xc, _) = x.open("", "bystander-y", "").await;
    let (yc, ..) = y.incoming().await;
    (x, y, xc, yc)
}

/// A ping each, and a message each way.
async fn still_working(x: &mut Client, y: &mut Client, xc: u32, yc: u32, n: u32) {
    x.ping().await;
    y.ping().await;
    let body = Bytes::from(format!("round {n}"));
    x.send(xc, body.clone()).await;
    x.flush_sends().await;
    assert_eq!(y.message().await, (yc, 0, body.clone()));
    y.send(yc, body.clone()).await;
    y.flush_sends().await;
    assert_eq!(x.message().await, (xc, 0, body));
}

/// Malformed frames, before and after `HELLO`, each get a fatal `MALFORMED` (or `TOO_LARGE`
/// for a length beyond `max_frame`) and the end of their connection, while clients already
/// connected keep working after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_fatal_to_its_connection_only() {
    let sc = TestSidecar::start("garbage").await;
    let (mut x, mut y, xc, yc) = bystanders(&sc).await;
    // OPEN: class 0, priority 0, url of 2 bytes that are not UTF-8, empty endpoint and label.
    let invalid_utf8_open = [
        header(12 + 10, kind::OPEN, 0, 1),
        vec![0, 0, 2, 0, 0xff, 0xfe, 0, 0, 0, 0],
    ]
    .concat();
    let cases: Vec<(&str, bool, Vec<u8>, ErrorCode)> = vec![
        // (what, after HELLO, bytes, code)
        (
            "an HTTP request",
            false,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            ErrorCode::TooLarge,
        ),
        (
            "an HTTP request",
            true,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            ErrorCode::TooLarge,
        ),
        (
            "a truncated HELLO",
            false,
            [header(14, kind::HELLO, 0, 0), vec![1, 0]].concat(),
            ErrorCode::Malformed,
        ),
        (
            "an unknown kind",
            true,
            header(12, 0x7777, 0, 1),
            ErrorCode::Malformed,
        ),
        (
            "a sidecar kind",
            true,
            header(12, kind::DONE, 0, 1),
            ErrorCode::Malformed,
        ),
        (
            "nonzero flags",
            true,
            header(12, kind::PING, 1, 1),
            ErrorCode::Malformed,
        ),
        (
            "len below 12",
            true,
            header(3, kind::PING, 0, 1),
            ErrorCode::Malformed,
        ),
        (
            "a PING with a body",
            true,
            [header(13, kind::PING, 0, 1), vec![0]].concat(),
            ErrorCode::Malformed,
        ),
        (
            "operation id 0",
            true,
            header(12, kind::PING, 0, 0),
            ErrorCode::Malformed,
        ),
        (
            "a string that is not UTF-8",
            true,
            invalid_utf8_open,
            ErrorCode::Malformed,
        ),
        ("bytes of 0xff", true, vec![0xff; 64], ErrorCode::TooLarge),
    ];
    for (n, (what, hello, bytes, code)) in cases.into_iter().enumerate() {
        let mut c = if hello {
            sc.client(&format!("bad-{n}")).await
        } else {
            Client::connect(&sc.socket()).await
        };
        c.write_raw(&bytes).await.unwrap();
        let m = c.expect_fatal(code).await;
        assert!(!m.is_empty(), "{what}: the error names the problem");
        still_working(&mut x, &mut y, xc, yc, n as u32).await;
    }
    // The names of the refused connections are free again.
    sc.client("bad-3").await.ping().await;
    drop((x, y));
    sc.stop().await;
}

/// A header announcing a frame longer than `max_frame` is refused on the header alone — the
/// body is never sent here, so a sidecar that waited for it would time the test out — while a
/// frame of exactly `max_frame` bytes is an ordinary operation. Before `HELLO_OK` the limit is
/// 64 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_is_refused_before_the_body() {
    let max = MIB as u32;
    let limits = Limits {
        max_frame: max,
        ..Limits::default()
    };
    let sc = TestSidecar::start_with("big", limits).await;
    let (mut x, mut y, xc, yc) = bystanders(&sc).await;

    let mut c = sc.client("big-1").await;
    c.write_raw(&header(max - 4 + 1, kind::SEND, 0, 1))
        .await
        .unwrap();
    c.expect_fatal(ErrorCode::TooLarge).await;

    let mut c = Client::connect(&sc.socket()).await;
    c.write_raw(&header(64 * 1024 - 4 + 1, kind::HELLO, 0, 0))
        .await
        .unwrap();
    c.expect_fatal(ErrorCode::TooLarge).await;

    // Exactly max_frame: a SEND whose body fills it (16 header bytes, 4 for the channel) is an
    // ordinary operation, refused with the non-fatal TOO_BIG (its MESSAGE would not fit); the
    // largest body that fits a MESSAGE (8 more bytes of fields) arrives.
    let body = Bytes::from(vec![0x5a; max as usize - HEADER_LEN - 4]);
    x.send_op(xc, body).await;
    assert_eq!(x.flush(xc).await, SidecarMsg::Done);
    assert!(
        matches!(x.send_errors.as_slice(), [(_, _, ErrorCode::TooBig, _)]),
        "{:?}",
        x.send_errors
    );
    x.send_errors.clear();
    let body = Bytes::from(vec![0x5b; max as usize - HEADER_LEN - 4 - 8]);
    x.send(xc, body.clone()).await;
    x.flush_sends().await;
    let (ch, _, got) = y.message().await;
    assert_eq!(ch, yc);
    assert!(got == body, "the largest SEND arrived altered");
    still_working(&mut x, &mut y, xc, yc, 0).await;
    drop((x, y));
    sc.stop().await;
}

/// A `SEND` as large as `max_frame` allows is accepted, so its `MESSAGE` (8 bytes more of
/// fields: `request`) must still fit the receiver's `max_frame` — or the send must be refused
/// with `TOO_BIG`. Clients check incoming frames against `max_frame` (the Python client raises
/// `TooLarge` and drops the connection), so a frame beyond it breaks the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_send_is_delivered_within_max_frame() {
    let max = MIB as u32;
    let limits = Limits {
        max_frame: max,
        ..Limits::default()
    };
    let sc = TestSidecar::start_with("edge", limits).await;
    let (mut x, mut y, xc, yc) = bystanders(&sc).await;
    let body = Bytes::from(vec![0x5a; max as usize - HEADER_LEN - 4]);
    x.send_op(xc, body).await;
    assert_eq!(x.flush(xc).await, SidecarMsg::Done);
    match x.send_errors.first() {
        // Refused: fine, as long as the receiver sees nothing too large.
        Some((_, _, ErrorCode::TooBig, _)) => {}
        Some(e) => panic!("the largest SEND failed: {e:?}"),
        None => {
            let (ch, _, got) = y.message().await;
            assert_eq!(ch, yc);
            let frame = HEADER_LEN + 4 + 8 + got.len();
            assert!(
                frame <= max as usize,
                "a MESSAGE frame of {frame} bytes, max_frame is {max}"
            );
        }
    }
    drop((x, y));
    sc.stop().await;
}

/// More `SEND`s queued inside the sidecar than `send_window` is the fatal `WINDOW_EXCEEDED`.
/// The sidecar answers a send at once while the fabric has room, so the window only fills when
/// the channel is stuck: here the receiving client never reads (its queue and the channel's
/// credit run out), the window is 1, and the sender sends without waiting for its replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_exceeded() {
    let limits = Limits {
        send_window: 1,
        queued_bytes: 64 * KIB,
        ..Limits::default()
    };
    let sc = TestSidecar::start_with("window", limits).await;
    let _sink = sc.client("sink").await; // never reads
    let mut src = sc.client("src").await;
    let (ch, _) = src.open("", "sink", "").await;
    // 64 x 256 KiB = 16 MiB offered; what the fabric, the queue and the sink's socket can hold
    // is a small part of that.
    let body = Bytes::from(vec![1u8; 256 * KIB]);
    for _ in 0..64 {
        let id = src.id();
        let f = FromClient {
            id,
            msg: ClientMsg::Send {
                channel: ch,
                body: body.clone(),
            },
        };
        // The sidecar closes the connection once the window is exceeded: writing then fails.
        if src.write(&f).await.is_err() {
            break;
        }
    }
    src.expect_fatal(ErrorCode::WindowExceeded).await;
    // The sidecar is fine, and the offender's name is free again.
    let mut other = sc.client("other").await;
    other.ping().await;
    support::eventually("src's name is released", || {
        let sock = sc.socket();
        async move { Client::try_hello(&sock, "src").await.is_ok() }
    })
    .await;
    sc.stop().await;
}

/// At most `max_ops` operations in flight: past that the sidecar stops reading the client's
/// socket (backpressure, not an error) until one completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ops_in_flight_stops_reading() {
    let limits = Limits {
        max_ops: 4,
        ..Limits::default()
    };
    let sc = TestSidecar::start_with("ops", limits).await;
    let mut a = sc.client("asker").await;
    let mut b = sc.client("answerer").await;
    let (ch, _) = a.open("", "answerer", "").await;
    let (bch, ..) = b.incoming().await;
    let mut reqs = Vec::new();
    for i in 0..4u8 {
        reqs.push(
            a.op(ClientMsg::Request {
                channel: ch,
                deadline_ms: 20_000,
                body: Bytes::from(vec![i]),
            })
            .await,
        );
    }
    let mut asked = Vec::new();
    for _ in 0..4 {
        let (_, req, body) = b.message().await;
        asked.push((req, body));
    }
    // The fifth operation is not read while four are in flight.
    let ping = a.op(ClientMsg::Ping).await;
    let early = tokio::time::timeout(Duration::from_millis(300), a.reply(ping)).await;
    assert!(early.is_err(), "PING answered with max_ops in flight");
    // Answer the first request (found by its body: requests need not arrive in order here).
    let first = asked.iter().position(|(_, body)| body[..] == [0]).unwrap();
    let (req, body) = asked.remove(first);
    b.done(ClientMsg::Respond {
        channel: bch,
        request: req,
        body: body.clone(),
    })
    .await;
    assert_eq!(a.reply(ping).await, SidecarMsg::Done);
    assert_eq!(a.reply(reqs[0]).await, SidecarMsg::Response { body });
    for (req, body) in asked {
        b.done(ClientMsg::Respond {
            channel: bch,
            request: req,
            body,
        })
        .await;
    }
    for id in &reqs[1..] {
        assert!(matches!(a.reply(*id).await, SidecarMsg::Response { .. }));
    }
    drop((a, b));
    sc.stop().await;
}

/// Descriptors beyond what frames take are a protocol violation (`MALFORMED`): more than the
/// sidecar holds pending, or more than fit its control buffer (truncated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_descriptors() {
    let sc = TestSidecar::start("fds").await;
    let (mut x, mut y, xc, yc) = bystanders(&sc).await;
    let mem = Memfd::sealed(4096);
    for (n, count) in [(0, 5usize), (1, 20)] {
        let mut c = sc.client(&format!("fds-{n}")).await;
        let fds = vec![mem.fd(); count];
        let f = FromClient {
            id: 1,
            msg: ClientMsg::Ping,
        };
        c.write_with_fds(&f, &fds).await.unwrap();
        c.expect_fatal(ErrorCode::Malformed).await;
        still_working(&mut x, &mut y, xc, yc, n).await;
    }
    drop((x, y));
    sc.stop().await;
}

/// A client whose socket goes while its 64 MiB `WRITE` is in flight: the sidecars carry on, the
/// target can still ping and be reached, the dropped client's channel closes at the target, and
/// its endpoint name is free again within a bound — and a new client of that name transfers
/// into the same target region over the same session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_transfer() {
    let sa = TestSidecar::start("ka").await;
    let sb = TestSidecar::start("kb").await;
    let mut w = sa.client("writer").await;
    let mut t = sb.client("target").await;
    let (wch, _) = w.open(&sb.url(), "target", "").await;
    let (tch, ..) = t.incoming().await;
    let len = 64 * MIB;
    let mut wmem = Memfd::sealed(len);
    let tmem = Memfd::sealed(len);
    let (wreg, _) = w.region_add(&wmem).await;
    let (_treg, tdesc) = t.region_add(&tmem).await;
    fill_pattern(wmem.bytes_mut(), 5);
    let msg = transfer_msg(true, wch, wreg, &tdesc, Some(1), &[(0, 0, len as u64)]);
    let id = w.op(msg).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let finished_early = w.reply_ready(id).is_some();
    drop(w);
    drop(wmem);

    t.ping().await;
    match t.channel_event(tch).await {
        SidecarMsg::ChannelClosed { .. } => {}
        other => panic!("CHANNEL_CLOSED due, got {other:?}"),
    }
    let sock = sa.socket();
    let start = Instant::now();
    let mut w2 = loop {
        match Client::try_hello(&sock, "writer").await {
            Ok(c) => break c,
            Err((ErrorCode::EndpointTaken, _)) if start.elapsed() < WAIT => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the dropped client's name is not free again: {e:?}"),
        }
    };
    let (wch2, _) = w2.open(&sb.url(), "target", "again").await;
    t.incoming().await;
    let mut small = Memfd::sealed(MIB);
    fill_pattern(small.bytes_mut(), 77);
    let (sreg, _) = w2.region_add(&small).await;
    let msg = transfer_msg(true, wch2, sreg, &tdesc, Some(2), &[(0, 0, MIB as u64)]);
    assert!(matches!(w2.call(msg).await, SidecarMsg::Transferred { .. }));
    t.event_where("NOTIFICATION 2", |f| {
        matches!(f.msg, SidecarMsg::Notification { tag: 2, .. })
    })
    .await;
    support::assert_same(
        &tmem.bytes()[..MIB],
        small.bytes(),
        "the new client's WRITE",
    );
    eprintln!("the 64 MiB WRITE had finished before the drop: {finished_early}");
    drop((w2, t));
    sa.stop().await;
    sb.stop().await;
}

/// Sends 64 KiB messages on `ch`, keeping a full send window unanswered, until no send has
/// been answered for 500 ms: the channel is stalled. How many sends were answered by then (the
/// sidecar answers them cumulatively, half a window at a time).
async fn fill_until_stalled(s: &mut Client, ch: u32) -> usize {
    let body = Bytes::from(vec![7u8; 64 * KIB]);
    let window = s.send_window as usize;
    loop {
        while s.unanswered(ch) < window {
            s.send_op(ch, body.clone()).await;
        }
        let wait = s.await_send_reply(ch);
        if tokio::time::timeout(Duration::from_millis(500), wait)
            .await
            .is_err()
        {
            return s.answered(ch);
        }
        assert!(s.send_errors.is_empty(), "{:?}", s.send_errors);
        assert!(
            s.answered(ch) * 64 * KIB < 64 * MIB,
            "64 MiB accepted for a client that reads nothing: no backpressure"
        );
    }
}

/// Waits (at most 3 s) until every tracked send of `ch` is answered; how many are left.
async fn left_unanswered(s: &mut Client, ch: u32) -> usize {
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while s.unanswered(ch) > 0 {
        if tokio::time::timeout_at(until, s.await_send_reply(ch))
            .await
            .is_err()
        {
            break;
        }
    }
    s.unanswered(ch)
}

/// A client that never reads its socket: traffic to it stops at a bound (its sender's `SEND`s
/// stop completing), nothing is dropped and nobody is disconnected for it; other traffic —
/// another channel of the same session, clients of the same sidecar — flows meanwhile. When
/// the stalled client's socket finally goes, its sender learns it (`CHANNEL_CLOSED`) instead
/// of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_holds_back_only_its_own_traffic() {
    let sa = TestSidecar::start("sa").await;
    let limits = Limits {
        queued_bytes: MIB,
        ..Limits::default()
    };
    let sb = TestSidecar::start_with("sb", limits).await;
    let mut s = sa.client("sender").await;
    let stalled = sb.client("stalled").await;
    let mut u = sb.client("u").await;
    let mut v = sb.client("v").await;
    let (ch, _) = s.open(&sb.url(), "stalled", "").await;

    let done = fill_until_stalled(&mut s, ch).await;
    // 1 MiB of queue, the fabric's window and queue, the socket's buffers: a few MiB at most.
    assert!(
        done * 64 * KIB <= 16 * MIB,
        "{done} x 64 KiB accepted before sends stopped"
    );

    // Other traffic flows: the sender's sidecar, a second channel over the same session, and
    // clients of the stalled client's sidecar among themselves.
    s.ping().await;
    let (sv, _) = s.open(&sb.url(), "v", "").await;
    let (vc, ..) = v.incoming().await;
    s.send(sv, Bytes::from_static(b"not held up")).await;
    assert_eq!(s.flush(sv).await, SidecarMsg::Done);
    assert_eq!(
        v.message().await,
        (vc, 0, Bytes::from_static(b"not held up"))
    );
    let (uc, _) = u.open("", "v", "").await;
    let (vc2, ..) = v.incoming().await;
    u.send(uc, Bytes::from_static(b"local")).await;
    u.flush_sends().await;
    assert_eq!(v.message().await, (vc2, 0, Bytes::from_static(b"local")));
    // Still stalled: none of the held-back sends has completed meanwhile.
    assert_eq!(s.answered(ch), done, "the stalled channel moved");

    // The stalled client goes: its sender is told, and the sends held back are answered (with
    // the channel's end).
    drop(stalled);
    match s.channel_event(ch).await {
        SidecarMsg::ChannelClosed { .. } => {}
        other => panic!("CHANNEL_CLOSED due, got {other:?}"),
    }
    assert_eq!(left_unanswered(&mut s, ch).await, 0);
    s.send_errors.retain(|e| e.0 != ch);
    s.ping().await;
    s.send(sv, Bytes::from_static(b"after")).await;
    assert_eq!(s.flush(sv).await, SidecarMsg::Done);
    assert_eq!(v.message().await, (vc, 0, Bytes::from_static(b"after")));
    drop((s, u, v));
    sa.stop().await;
    sb.stop().await;
}

/// When the receiver of a stalled channel goes, the `SEND`s still held back in the sender's
/// sidecar must each be answered (PROTOCOL.md: every operation gets exactly one reply), with an
/// `ERROR` or `DONE`, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_exit_answers_held_back_sends() {
    let limits = Limits {
        queued_bytes: 64 * KIB,
        ..Limits::default()
    };
    let sc = TestSidecar::start_with("gone", limits).await;
    let stalled = sc.client("stalled").await; // never reads
    let mut s = sc.client("sender").await;
    let (ch, _) = s.open("", "stalled", "").await;
    fill_until_stalled(&mut s, ch).await;
    drop(stalled);
    match s.channel_event(ch).await {
        SidecarMsg::ChannelClosed { .. } => {}
        other => panic!("CHANNEL_CLOSED due, got {other:?}"),
    }
    let left = left_unanswered(&mut s, ch).await;
    assert_eq!(left, 0, "SENDs never answered (of {})", s.send_window);
    drop(s);
    sc.stop().await;
}

/// `CLOSE` of a channel whose sends are held back (the receiver does not read): the `SEND`s
/// still queued in the sidecar must be answered — with `DONE` or an `ERROR` — rather than left
/// unanswered forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_answers_held_back_sends() {
    let limits = Limits {
        queued_bytes: 64 * KIB,
        ..Limits::default()
    };
    let sc = TestSidecar::start_with("hold", limits).await;
    let _stalled = sc.client("stalled").await; // never reads
    let mut s = sc.client("sender").await;
    let (ch, _) = s.open("", "stalled", "").await;
    fill_until_stalled(&mut s, ch).await;
    let close = s
        .op(ClientMsg::Close {
            channel: ch,
            reason: "giving up".into(),
        })
        .await;
    let r = s.reply(close).await;
    assert!(
        matches!(r, SidecarMsg::Done | SidecarMsg::Error { .. }),
        "CLOSE: {r:?}"
    );
    let left = left_unanswered(&mut s, ch).await;
    assert!(
        left == 0,
        "{left} SENDs (of a window of {}) never answered after CLOSE",
        s.send_window
    );
    s.ping().await;
    drop(s);
    sc.stop().await;
}
