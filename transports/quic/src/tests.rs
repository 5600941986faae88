//! Transport-level tests: frames across streams, and refused handshakes with clear errors.

use std::future::poll_fn;
use std::time::Duration;

use agentfabric::frame::{Header, Kind, OutFrame, FLAG_FIRST, FLAG_LAST};
use agentfabric::transport::{Connection, RecvError, Transport};
use agentfabric::Class;
use bytes::Bytes;

use crate::{DevCa, QuicConfig, QuicTransport};

fn frame(kind: Kind, channel: u32, class: Class, seq: u64, payload: &[u8]) -> OutFrame {
    let mut h = Header::new(kind);
    h.channel = channel;
    h.class = class;
    h.seq = seq;
    h.flags = FLAG_FIRST | FLAG_LAST;
    h.len = payload.len() as u32;
    OutFrame {
        header: h.encode(),
        payload: Bytes::copy_from_slice(payload),
    }
}

async fn flush(c: &mut Connection) {
    poll_fn(|cx| c.sink.poll_flush(cx)).await.unwrap();
}

async fn recv(c: &mut Connection) -> Result<Vec<agentfabric::frame::Frame>, RecvError> {
    let mut out = Vec::new();
    poll_fn(|cx| c.stream.poll_recv(cx, &mut out)).await?;
    Ok(out)
}

/// Connects `client` to a server with `server_cfg`; returns both ends or the client's error.
fn io(e: RecvError) -> std::io::Error {
    match e {
        RecvError::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

async fn connect(
    server_cfg: QuicConfig,
    client_cfg: QuicConfig,
) -> (std::io::Result<(Connection, Connection)>, String) {
    let server = QuicTransport::new(server_cfg).unwrap();
    let mut listener = server.listen("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr();
    let client = QuicTransport::new(client_cfg).unwrap();
    let addr2 = addr.clone();
    let accept = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(3), listener.accept()).await
    });
    let res = async {
        let mut c = client
            .connect(addr2.strip_prefix("quic://").unwrap())
            .await?;
        // With TLS 1.3 the client finishes its handshake before the server has checked the
        // client's certificate: a refusal shows on the first read.
        c.sink
            .push(frame(Kind::Ping, 0, Class::Coordination, 1, b""));
        flush(&mut c).await;
        // Whichever comes first: the server's connection, or the client's refusal.
        let mut accept = accept;
        let accepted = tokio::select! {
            r = recv(&mut c) => Err(r),
            a = &mut accept => Ok(a.unwrap()),
        };
        let s = match accepted {
            Ok(Ok(Ok(s))) => s,
            Ok(_) => {
                return Err(io(recv(&mut c)
                    .await
                    .expect_err("refused connection reads")))
            }
            Err(r) => return Err(io(r.expect_err("the server sends nothing first"))),
        };
        Ok((c, s))
    }
    .await;
    (res, addr)
}

#[tokio::test]
async fn frames_cross_on_their_channels_streams() {
    let ca = DevCa::new("ca").unwrap();
    let (res, _) = connect(
        ca.node_config("server").unwrap(),
        ca.node_config("client").unwrap(),
    )
    .await;
    let (mut c, mut s) = res.unwrap();
    // The Ping pushed by `connect` arrives first.
    let first = recv(&mut s).await.unwrap();
    assert_eq!(first[0].header.kind, Kind::Ping);
    // Interleaved channels, small and large payloads, in order per channel.
    let big = vec![7u8; 300_000];
    for seq in 0..50u64 {
        for ch in 1..4u32 {
            let payload: &[u8] = if seq % 10 == 0 { &big } else { b"hello" };
            c.sink.push(frame(
                Kind::Data,
                ch,
                Class::ALL[ch as usize - 1],
                seq,
                payload,
            ));
        }
    }
    flush(&mut c).await;
    let mut next = [0u64; 4];
    let mut n = 0;
    while n < 150 {
        for f in recv(&mut s).await.unwrap() {
            let ch = f.header.channel as usize;
            assert_eq!(f.header.seq, next[ch], "channel {ch} out of order");
            next[ch] += 1;
            let want = if f.header.seq % 10 == 0 { 300_000 } else { 5 };
            assert_eq!(f.payload.len(), want);
            n += 1;
        }
    }
    // A graceful close reads as end of stream on the other side.
    poll_fn(|cx| c.sink.poll_close(cx)).await.unwrap();
    let e = recv(&mut s).await.unwrap_err();
    assert!(matches!(e, RecvError::Eof), "got {e}");
}

#[tokio::test]
async fn garbage_header_reaches_the_peer_as_a_frame_error() {
    let ca = DevCa::new("ca").unwrap();
    let (res, _) = connect(
        ca.node_config("server").unwrap(),
        ca.node_config("client").unwrap(),
    )
    .await;
    let (mut c, mut s) = res.unwrap();
    recv(&mut s).await.unwrap();
    let mut f = frame(Kind::Data, 3, Class::Bulk, 0, b"x");
    f.header[0] = b'X';
    c.sink.push(f);
    flush(&mut c).await;
    let e = recv(&mut s).await.unwrap_err();
    assert!(
        matches!(
            e,
            RecvError::Frame(agentfabric::frame::FrameError::BadMagic(_))
        ),
        "got {e}"
    );
}

fn assert_refused(res: std::io::Result<(Connection, Connection)>, needles: &[&str]) -> String {
    let e = match res {
        Ok(_) => panic!("connection should have been refused"),
        Err(e) => e,
    };
    let text = e.to_string();
    assert!(
        needles.iter().any(|n| text.contains(n)),
        "error {text:?} does not say why (expected one of {needles:?})"
    );
    text
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let ca = DevCa::new("ca").unwrap();
    let mut client = ca.node_config("client").unwrap();
    client.cert_chain.clear();
    client.key = None;
    let (res, _) = connect(ca.node_config("server").unwrap(), client).await;
    let text = assert_refused(res, &["certificate required"]);
    assert!(text.contains("client certificate"), "{text}");
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let ca = DevCa::new("ca").unwrap();
    let other = DevCa::new("other").unwrap();
    // The client trusts the right CA but its certificate is signed by another one.
    let issued = other.issue("client").unwrap();
    let client = QuicConfig::new(vec![ca.cert()], issued.chain, issued.key);
    let (res, _) = connect(ca.node_config("server").unwrap(), client).await;
    let text = assert_refused(res, &["unknown ca"]);
    assert!(
        text.contains("not signed by a CA the peer trusts"),
        "{text}"
    );
}

#[tokio::test]
async fn server_from_another_ca_is_refused_by_the_client() {
    let ca = DevCa::new("ca").unwrap();
    let other = DevCa::new("other").unwrap();
    let (res, _) = connect(
        other.node_config("server").unwrap(),
        ca.node_config("client").unwrap(),
    )
    .await;
    // rustls's own reason, on the side that verified.
    assert_refused(res, &["UnknownIssuer"]);
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca = DevCa::new("ca").unwrap();
    let issued = ca
        .issue_with("client", |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
        .unwrap();
    let client = QuicConfig::new(vec![ca.cert()], issued.chain, issued.key);
    let (res, _) = connect(ca.node_config("server").unwrap(), client).await;
    assert_refused(res, &["certificate expired"]);
}

#[tokio::test]
async fn expired_server_certificate_is_refused_by_the_client() {
    let ca = DevCa::new("ca").unwrap();
    let issued = ca
        .issue_with("server", |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
        .unwrap();
    let server = QuicConfig::new(vec![ca.cert()], issued.chain, issued.key);
    let (res, _) = connect(server, ca.node_config("client").unwrap()).await;
    assert_refused(res, &["certificate expired"]);
}

#[test]
fn the_alpn_names_the_wire_version() {
    assert_eq!(
        crate::ALPN,
        format!("agentfabric/{}", agentfabric::frame::VERSION)
    );
}

#[tokio::test]
async fn wrong_alpn_is_refused() {
    let ca = DevCa::new("ca").unwrap();
    let mut client = ca.node_config("client").unwrap();
    client.alpn = "agentfabric/2".into(); // the previous wire version
    let (res, _) = connect(ca.node_config("server").unwrap(), client).await;
    assert_refused(res, &["no application protocol"]);
}

#[test]
fn dev_certs_are_written_and_load() {
    let dir = std::env::temp_dir().join(format!("af-quic-certs-{}", std::process::id()));
    let files = crate::write_dev_certs(&dir, &["alpha", "beta"]).unwrap();
    assert_eq!(files.nodes.len(), 2);
    let (_, cert, key) = &files.nodes[0];
    let cfg = QuicConfig::from_pem_files(&files.ca_cert, cert, key).unwrap();
    QuicTransport::new(cfg).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A client connection and the server's end of it, through a relay that drops `loss` of the
/// datagrams and delays the rest by `delay` (kept alive by holding the relay).
async fn connect_through_relay(
    loss: f64,
    delay: Duration,
) -> (Connection, Connection, crate::relay::LossyRelay) {
    use crate::relay::{LossyRelay, RelayConfig};
    let ca = DevCa::new("ca").unwrap();
    let server = QuicTransport::new(ca.node_config("server").unwrap()).unwrap();
    let mut listener = server.listen("127.0.0.1:0").await.unwrap();
    let target = listener
        .local_addr()
        .strip_prefix("quic://")
        .unwrap()
        .parse()
        .unwrap();
    let relay = LossyRelay::start(
        target,
        RelayConfig {
            loss,
            delay,
            ..RelayConfig::default()
        },
    )
    .await
    .unwrap();
    let client = QuicTransport::new(ca.node_config("client").unwrap()).unwrap();
    let c = client.connect(&relay.addr().to_string()).await.unwrap();
    let s = listener.accept().await.unwrap();
    (c, s, relay)
}

#[tokio::test]
async fn frames_cross_a_lossy_relay() {
    let (mut c, mut s, _relay) = connect_through_relay(0.05, Duration::from_millis(2)).await;
    for seq in 0..200u64 {
        c.sink.push(frame(
            Kind::Data,
            1 + (seq % 3) as u32,
            Class::Coordination,
            seq / 3,
            &[1u8; 3000],
        ));
    }
    flush(&mut c).await;
    let mut n = 0;
    while n < 200 {
        n += recv(&mut s).await.unwrap().len();
    }
}

/// Loss on one channel's stream does not hold back another channel: over a lossy path, frames of
/// two channels pushed alternately arrive each in order, and some overtake frames of the other
/// channel that were pushed before them (on one ordered byte stream, as TCP, none could).
#[tokio::test]
async fn loss_on_one_channel_does_not_stall_another() {
    let (mut c, mut s, _relay) = connect_through_relay(0.2, Duration::from_millis(1)).await;
    const N: u64 = 200;
    for seq in 0..N {
        for ch in [1u32, 2] {
            c.sink.push(frame(
                Kind::Data,
                ch,
                Class::Coordination,
                seq,
                &[ch as u8; 1000],
            ));
        }
    }
    flush(&mut c).await;
    let mut next = [0u64; 3];
    let mut overtakes = 0;
    let mut n = 0;
    while n < 2 * N {
        for f in tokio::time::timeout(Duration::from_secs(20), recv(&mut s))
            .await
            .expect("frames keep coming")
            .unwrap()
        {
            let (ch, seq) = (f.header.channel as usize, f.header.seq);
            assert_eq!(seq, next[ch], "channel {ch} out of order");
            next[ch] += 1;
            let other = 3 - ch;
            // Pushed before this frame: the other channel's frames up to `seq` (channel 2) or
            // below `seq` (channel 1).
            let pushed_before = if ch == 2 { seq + 1 } else { seq };
            if next[other] < pushed_before {
                overtakes += 1;
            }
            n += 1;
        }
    }
    assert!(overtakes > 0, "no frame overtook the other channel's");
}
