//! Channels between clients: across two sidecars (two fabric nodes over TCP on the loopback)
//! and between endpoints of one sidecar; ordering, introductions, requests, closing, errors.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentfabric_sidecar::wire::{ClientMsg, ErrorCode, SidecarMsg};
use agentfabric_sidecar::Limits;
use bytes::{BufMut, Bytes, BytesMut};
use support::{expect_error, fill_pattern, open_msg, Client, TestSidecar};

/// Message `i` of channel `c`: its coordinates, then a filler whose length and bytes both
/// depend on them. Every fifth message is 128 KiB, the others a few bytes: when the fabric's
/// send queue of the channel (256 KiB for coordination) is backed up, a large message does not
/// fit while the small one after it does — exactly when the sidecar must queue the small one
/// behind the large one instead of sending it at once. Ordering must hold across that switch.
fn numbered(c: u8, i: u32) -> Bytes {
    let filler = if i % 5 == 3 {
        128 << 10
    } else {
        (i % 50) as usize
    };
    let mut b = BytesMut::with_capacity(5 + filler);
    b.put_u8(c);
    b.put_u32_le(i);
    let mut f = vec![0u8; filler];
    fill_pattern(&mut f, u64::from(c) << 32 | u64::from(i));
    b.put_slice(&f);
    b.freeze()
}

/// Checks a body is `numbered(c, i)` for some `(c, i)` and returns them.
fn check_numbered(body: &[u8]) -> (u8, u32) {
    assert!(body.len() >= 5, "a body of {} bytes", body.len());
    let c = body[0];
    let i = u32::from_le_bytes(body[1..5].try_into().unwrap());
    assert!(
        numbered(c, i) == body,
        "message {i} of channel {c} arrived altered"
    );
    (c, i)
}

/// Sends `n` numbered messages on each of `chans`, interleaved, within the send window.
async fn send_interleaved(a: &mut Client, chans: &[u32], n: u32) {
    for i in 0..n {
        for (c, &ch) in chans.iter().enumerate() {
            a.send(ch, numbered(c as u8, i)).await;
        }
    }
    a.flush_sends().await;
}

/// Receives `n` messages per channel; `by_handle` maps the receiver's handles to the sender's
/// channel numbers. Each channel's messages must come in order, none lost, none twice.
///
/// Reading starts only after a pause, so that the whole path backs up first (the receiver's
/// queue in its sidecar, the fabric's window and send queues) and the sender's sidecar has to
/// hold sends back: the case where ordering is at stake.
async fn receive_in_order(b: &mut Client, by_handle: &HashMap<u32, u8>, n: u32) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut next: HashMap<u8, u32> = by_handle.values().map(|&c| (c, 0)).collect();
    let total = n as usize * by_handle.len();
    for _ in 0..total {
        let (handle, request, body) = b.message().await;
        assert_eq!(request, 0, "a plain SEND arrives with request 0");
        let (c, i) = check_numbered(&body);
        assert_eq!(
            by_handle.get(&handle),
            Some(&c),
            "message of channel {c} arrived on handle {handle}"
        );
        let want = next.get_mut(&c).unwrap();
        assert_eq!(
            i, *want,
            "channel {c}: message {i} arrived when {want} was due"
        );
        *want += 1;
    }
    // Nothing more: no duplicate is still on its way once the sidecar answered a later PING.
    b.ping().await;
    let extra: Vec<_> = b
        .take_events()
        .into_iter()
        .filter(|e| matches!(e.msg, SidecarMsg::Message { .. }))
        .collect();
    assert!(extra.is_empty(), "messages beyond those sent: {extra:?}");
}

/// Three channels from a client of sidecar `a` to a client of sidecar `b`, 500 messages each,
/// interleaved: each channel's messages arrive in order, none lost or duplicated. `INCOMING`
/// names the opener's node, endpoint and label, and `OPENED` the peer's node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_across_two_sidecars() {
    let sa = TestSidecar::start("node-a").await;
    // A small queue to the receiving client, so that the path backs up while it does not read.
    let small_queue = Limits {
        queued_bytes: 256 << 10,
        ..Limits::default()
    };
    let sb = TestSidecar::start_with("node-b", small_queue).await;
    let mut a = sa.client("alice").await;
    let mut b = sb.client("bob").await;
    let mut chans = Vec::new();
    let mut by_handle = HashMap::new();
    for c in 0..3u8 {
        let (ch, node) = a.open(&sb.url(), "bob", &format!("lane {c} ✓")).await;
        assert_eq!(node, "node-b", "OPENED names the peer's node");
        chans.push(ch);
        let (handle, node, endpoint, label) = b.incoming().await;
        assert_eq!(
            (node.as_str(), endpoint.as_str()),
            ("node-a", "alice"),
            "INCOMING names the opener"
        );
        assert_eq!(label, format!("lane {c} ✓"));
        by_handle.insert(handle, c);
    }
    let distinct: std::collections::HashSet<_> = chans.iter().collect();
    assert_eq!(distinct.len(), 3, "channel handles are distinct: {chans:?}");
    let run = async {
        tokio::join!(
            send_interleaved(&mut a, &chans, 500),
            receive_in_order(&mut b, &by_handle, 500)
        )
    };
    tokio::time::timeout(Duration::from_secs(40), run)
        .await
        .expect("3 x 500 messages within 40 s");
    drop((a, b));
    sa.stop().await;
    sb.stop().await;
}

/// Endpoints of one sidecar reach each other with the empty url, and behave the same: the
/// introduction (the sidecar's own node), ordering, and both directions of a channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_endpoints() {
    let small_queue = Limits {
        queued_bytes: 256 << 10,
        ..Limits::default()
    };
    let sc = TestSidecar::start_with("solo", small_queue).await;
    let mut a = sc.client("left").await;
    let mut b = sc.client("right").await;
    let mut chans = Vec::new();
    let mut by_handle = HashMap::new();
    for c in 0..2u8 {
        let (ch, node) = a.open("", "right", &format!("local {c}")).await;
        assert_eq!(node, "solo");
        chans.push(ch);
        let (handle, node, endpoint, label) = b.incoming().await;
        assert_eq!(
            (node.as_str(), endpoint.as_str(), label.as_str()),
            ("solo", "left", format!("local {c}").as_str())
        );
        by_handle.insert(handle, c);
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(
            send_interleaved(&mut a, &chans, 300),
            receive_in_order(&mut b, &by_handle, 300)
        )
    })
    .await
    .expect("2 x 300 local messages within 30 s");
    // The acceptor sends back on its handle.
    let (&back, _) = by_handle.iter().find(|(_, &c)| c == 1).unwrap();
    b.send(back, Bytes::from_static(b"back")).await;
    b.flush_sends().await;
    let (ch, _, body) = a.message().await;
    assert_eq!((ch, &body[..]), (chans[1], &b"back"[..]));
    drop((a, b));
    sc.stop().await;
}

/// `OPEN`'s refusals: a missing endpoint (remote or local) is `REFUSED`; a bad class, priority,
/// endpoint name or label is `INVALID_ARGUMENT`; an unreachable node is `CONNECT_FAILED`. And
/// operations on a channel handle that does not exist are `UNKNOWN_CHANNEL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_errors() {
    let sa = TestSidecar::start("oa").await;
    let sb = TestSidecar::start("ob").await;
    let mut a = sa.client("a").await;
    let _b = sb.client("b").await;
    let m = a
        .fails(open_msg(0, 0, &sb.url(), "ghost", ""), ErrorCode::Refused)
        .await;
    assert!(m.contains("ghost"), "the refusal names the endpoint: {m}");
    a.fails(open_msg(0, 0, "", "ghost", ""), ErrorCode::Refused)
        .await;
    for (class, prio, ep) in [(3u8, 0u8, "b"), (255, 0, "b"), (0, 8, "b"), (2, 255, "b")] {
        a.fails(
            open_msg(class, prio, &sb.url(), ep, ""),
            ErrorCode::InvalidArgument,
        )
        .await;
    }
    for ep in ["", "a/b", "with space", &"x".repeat(33)] {
        a.fails(
            open_msg(0, 0, &sb.url(), ep, ""),
            ErrorCode::InvalidArgument,
        )
        .await;
    }
    a.fails(
        open_msg(0, 0, &sb.url(), "b", &"l".repeat(257)),
        ErrorCode::InvalidArgument,
    )
    .await;
    // Every valid class and priority opens (bulk, priority 7; tool call, priority 0).
    for (class, prio) in [(1u8, 0u8), (2, 7)] {
        match a.call(open_msg(class, prio, &sb.url(), "b", "")).await {
            SidecarMsg::Opened { .. } => {}
            other => panic!("OPEN class {class} priority {prio}: {other:?}"),
        }
    }
    // Port 1 of the loopback: nobody listens.
    a.fails(
        open_msg(0, 0, "tcp://127.0.0.1:1", "b", ""),
        ErrorCode::ConnectFailed,
    )
    .await;
    a.fails(
        ClientMsg::Send {
            channel: 999,
            body: Bytes::from_static(b"x"),
        },
        ErrorCode::UnknownChannel,
    )
    .await;
    a.fails(
        ClientMsg::Close {
            channel: 999,
            reason: String::new(),
        },
        ErrorCode::UnknownChannel,
    )
    .await;
    a.ping().await;
    drop(a);
    sa.stop().await;
    sb.stop().await;
}

/// `REQUEST` across sidecars: the far client's `RESPOND` is the `RESPONSE`, its
/// `RESPOND_ERROR` an `ERROR REMOTE` with its reason; unanswered, `DEADLINE_EXCEEDED` comes
/// at the deadline (not before it, and not long after). Requests work from the acceptor too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response() {
    let sa = TestSidecar::start("ra").await;
    let sb = TestSidecar::start("rb").await;
    let mut a = sa.client("asker").await;
    let mut b = sb.client("answerer").await;
    let (ch, _) = a.open(&sb.url(), "answerer", "rpc").await;
    let (bch, ..) = b.incoming().await;

    let id = a
        .op(ClientMsg::Request {
            channel: ch,
            deadline_ms: 5000,
            body: Bytes::from_static(b"what is 6*7?"),
        })
        .await;
    let (c, req, body) = b.message().await;
    assert_eq!((c, &body[..]), (bch, &b"what is 6*7?"[..]));
    assert_ne!(req, 0, "a request arrives with a nonzero request id");
    b.done(ClientMsg::Respond {
        channel: bch,
        request: req,
        body: Bytes::from_static(b"42"),
    })
    .await;
    assert_eq!(
        a.reply(id).await,
        SidecarMsg::Response {
            body: Bytes::from_static(b"42")
        }
    );

    let id = a
        .op(ClientMsg::Request {
            channel: ch,
            deadline_ms: 5000,
            body: Bytes::from_static(b"divide by zero"),
        })
        .await;
    let (_, req, _) = b.message().await;
    b.done(ClientMsg::RespondError {
        channel: bch,
        request: req,
        reason: "cannot divide by zero".into(),
    })
    .await;
    let m = expect_error(a.reply(id).await, ErrorCode::Remote, "RESPOND_ERROR");
    assert_eq!(m, "cannot divide by zero");

    // Nobody answers: the deadline decides.
    let start = Instant::now();
    let m = a
        .fails(
            ClientMsg::Request {
                channel: ch,
                deadline_ms: 300,
                body: Bytes::from_static(b"ignored"),
            },
            ErrorCode::DeadlineExceeded,
        )
        .await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "DEADLINE_EXCEEDED after {took:?} for a 300 ms deadline ({m})"
    );
    let (_, ignored, _) = b.message().await;
    assert_ne!(ignored, 0);

    a.fails(
        ClientMsg::Request {
            channel: ch,
            deadline_ms: 0,
            body: Bytes::new(),
        },
        ErrorCode::InvalidArgument,
    )
    .await;
    a.fails(
        ClientMsg::Request {
            channel: ch,
            deadline_ms: 3_600_001,
            body: Bytes::new(),
        },
        ErrorCode::InvalidArgument,
    )
    .await;
    b.fails(
        ClientMsg::Respond {
            channel: bch,
            request: 0,
            body: Bytes::new(),
        },
        ErrorCode::InvalidArgument,
    )
    .await;

    // The acceptor asks, the opener answers.
    let id = b
        .op(ClientMsg::Request {
            channel: bch,
            deadline_ms: 5000,
            body: Bytes::from_static(b"ping?"),
        })
        .await;
    let (c, req, body) = a.message().await;
    assert_eq!((c, &body[..]), (ch, &b"ping?"[..]));
    a.done(ClientMsg::Respond {
        channel: ch,
        request: req,
        body: Bytes::from_static(b"pong"),
    })
    .await;
    assert_eq!(
        b.reply(id).await,
        SidecarMsg::Response {
            body: Bytes::from_static(b"pong")
        }
    );
    drop((a, b));
    sa.stop().await;
    sb.stop().await;
}

/// `CLOSE` by the opener: the acceptor gets every message sent before it — also those the
/// sidecar still had queued when the `CLOSE` came — and then `CHANNEL_CLOSED` with the reason.
/// Both handles are gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_by_opener_after_messages() {
    let sa = TestSidecar::start("ca").await;
    // A small queue to the acceptor, which reads late: the opener's sends back up in its
    // sidecar, so some are still held there when CLOSE comes and must go out before it.
    let small_queue = Limits {
        queued_bytes: 256 << 10,
        ..Limits::default()
    };
    let sb = TestSidecar::start_with("cb", small_queue).await;
    let mut a = sa.client("opener").await;
    let mut b = sb.client("acceptor").await;
    let (ch, _) = a.open(&sb.url(), "acceptor", "").await;
    let (bch, ..) = b.incoming().await;
    let opener = async {
        // 40 x 128 KiB (within the window of 64), not awaited, then CLOSE.
        for i in 0..40u32 {
            a.send_op(ch, numbered(0, i * 5 + 3)).await;
        }
        a.done(ClientMsg::Close {
            channel: ch,
            reason: "all sent".into(),
        })
        .await;
        // Every send was taken and answered (a DONE) before the CLOSE was.
        assert_eq!(a.unanswered(ch), 0, "sends unanswered when CLOSE was");
        assert_eq!(a.answered(ch), 40);
        assert!(a.send_errors.is_empty(), "{:?}", a.send_errors);
    };
    let acceptor = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in 0..40u32 {
            match b.channel_event(bch).await {
                SidecarMsg::Message { body, .. } => {
                    assert_eq!(check_numbered(&body), (0, i * 5 + 3));
                }
                other => panic!("message {i} due, got {other:?}"),
            }
        }
        match b.channel_event(bch).await {
            SidecarMsg::ChannelClosed { code, reason, .. } => {
                assert_eq!(code, ErrorCode::Closed);
                assert_eq!(reason, "all sent");
            }
            other => panic!("CHANNEL_CLOSED due, got {other:?}"),
        }
    };
    tokio::join!(opener, acceptor);
    a.fails(
        ClientMsg::Send {
            channel: ch,
            body: Bytes::new(),
        },
        ErrorCode::UnknownChannel,
    )
    .await;
    b.fails(
        ClientMsg::Send {
            channel: bch,
            body: Bytes::new(),
        },
        ErrorCode::UnknownChannel,
    )
    .await;
    // A new channel gets a new handle: handles are not reused.
    let (ch2, _) = a.open(&sb.url(), "acceptor", "").await;
    assert_ne!(ch2, ch);
    let (bch2, ..) = b.incoming().await;
    assert_ne!(bch2, bch);
    drop((a, b));
    sa.stop().await;
    sb.stop().await;
}

/// `CLOSE` by the acceptor: the opener gets `CHANNEL_CLOSED` (after what the acceptor sent
/// before), and its handle is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_by_acceptor() {
    let sa = TestSidecar::start("xa").await;
    let sb = TestSidecar::start("xb").await;
    let mut a = sa.client("opener").await;
    let mut b = sb.client("acceptor").await;
    let (ch, _) = a.open(&sb.url(), "acceptor", "").await;
    let (bch, ..) = b.incoming().await;
    b.send(bch, Bytes::from_static(b"last words")).await;
    b.flush_sends().await;
    b.done(ClientMsg::Close {
        channel: bch,
        reason: "go away".into(),
    })
    .await;
    match a.channel_event(ch).await {
        SidecarMsg::Message { body, .. } => assert_eq!(&body[..], b"last words"),
        other => panic!("the message due, got {other:?}"),
    }
    match a.channel_event(ch).await {
        SidecarMsg::ChannelClosed { code, reason, .. } => {
            assert_eq!(code, ErrorCode::Closed);
            assert_eq!(reason, "go away");
        }
        other => panic!("CHANNEL_CLOSED due, got {other:?}"),
    }
    a.fails(
        ClientMsg::Send {
            channel: ch,
            body: Bytes::new(),
        },
        ErrorCode::UnknownChannel,
    )
    .await;
    drop((a, b));
    sa.stop().await;
    sb.stop().await;
}

/// A client that goes away closes its channels: the far side gets `CHANNEL_CLOSED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_channels() {
    let sa = TestSidecar::start("da").await;
    let sb = TestSidecar::start("db").await;
    let mut a = sa.client("opener").await;
    let mut b = sb.client("acceptor").await;
    let (ch, _) = a.open(&sb.url(), "acceptor", "").await;
    b.incoming().await;
    drop(b);
    match a.channel_event(ch).await {
        SidecarMsg::ChannelClosed { .. } => {}
        other => panic!("CHANNEL_CLOSED due, got {other:?}"),
    }
    // And the other way round.
    let mut b = sb.client("acceptor").await;
    a.open(&sb.url(), "acceptor", "").await;
    let (bch, ..) = b.incoming().await;
    drop(a);
    match b.channel_event(bch).await {
        SidecarMsg::ChannelClosed { .. } => {}
        other => panic!("CHANNEL_CLOSED due, got {other:?}"),
    }
    drop(b);
    sa.stop().await;
    sb.stop().await;
}

/// `SEND`s are answered cumulatively (PROTOCOL.md): a `DONE` comes at the latest once half the
/// window is unanswered, without the client asking, and one `DONE` answers many sends (the
/// client's reply checks that a `DONE` answers only sends that were made, in order); `FLUSH`
/// answers every earlier send before itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_answered_cumulatively() {
    let sc = TestSidecar::start("cumul").await;
    let mut a = sc.client("a").await;
    let mut b = sc.client("b").await;
    let (ch, _) = a.open("", "b", "").await;
    b.incoming().await;
    let half = (a.send_window / 2) as usize;
    // Half a window of sends: a DONE must come on its own.
    for i in 0..half {
        a.send_op(ch, Bytes::from(vec![i as u8])).await;
    }
    a.await_send_reply(ch).await;
    // A few more, then FLUSH: answered after them.
    for i in 0..5u8 {
        a.send_op(ch, Bytes::from(vec![i])).await;
    }
    assert_eq!(a.flush(ch).await, SidecarMsg::Done);
    assert_eq!(a.answered(ch), half + 5);
    // FLUSH with nothing unanswered, and of a channel that does not exist.
    assert_eq!(a.flush(ch).await, SidecarMsg::Done);
    a.fails(ClientMsg::Flush { channel: 999 }, ErrorCode::UnknownChannel)
        .await;
    // Many sends cost far fewer replies than sends: that is the point of answering cumulatively.
    let before = a.send_replies;
    for i in 0..640u32 {
        a.send(ch, Bytes::from(i.to_le_bytes().to_vec())).await;
    }
    a.flush_sends().await;
    let replies = a.send_replies - before;
    assert!(replies <= 640 / 16, "{replies} replies for 640 sends");
    for _ in 0..half + 5 {
        b.message().await;
    }
    for i in 0..640u32 {
        let (_, _, body) = b.message().await;
        assert_eq!(&body[..], &i.to_le_bytes()[..]);
    }
    drop((a, b));
    sc.stop().await;
}

/// `REQUEST`s are messages of their channel too: sent without waiting, interleaved with
/// `SEND`s, they arrive in the order the client sent them (PROTOCOL.md: "`MESSAGE`s of one
/// channel arrive in the order they were sent").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_keep_their_order_among_sends() {
    let sc = TestSidecar::start("rq").await;
    let mut a = sc.client("asker").await;
    let mut b = sc.client("answerer").await;
    let (ch, _) = a.open("", "answerer", "").await;
    b.incoming().await;
    let n = 300u32;
    let mut reqs = Vec::new();
    for i in 0..n {
        let body = Bytes::from(i.to_le_bytes().to_vec());
        if i % 3 == 0 {
            a.send(ch, body).await;
        } else {
            reqs.push(
                a.op(ClientMsg::Request {
                    channel: ch,
                    deadline_ms: 20_000,
                    body,
                })
                .await,
            );
        }
    }
    a.flush_sends().await;
    let mut order = Vec::new();
    for _ in 0..n {
        let (c, req, body) = b.message().await;
        order.push(u32::from_le_bytes(body[..4].try_into().unwrap()));
        if req != 0 {
            b.op(ClientMsg::Respond {
                channel: c,
                request: req,
                body,
            })
            .await;
        }
    }
    for id in reqs {
        assert!(matches!(a.reply(id).await, SidecarMsg::Response { .. }));
    }
    let first_out_of_place = order.iter().enumerate().find(|(i, &v)| *i as u32 != v);
    assert!(
        first_out_of_place.is_none(),
        "arrival order differs from sending order at {first_out_of_place:?}: {order:?}"
    );
    drop((a, b));
    sc.stop().await;
}
