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
        text.contains(
            "this node's certificate is signed by a different CA than the one the peer trusts"
        ),
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
    // rustls's own reason, on the side that verified, and what it usually means.
    let text = assert_refused(res, &["UnknownIssuer"]);
    assert!(text.contains(OTHER_CA_HERE), "{text}");
}

const OTHER_CA_HERE: &str =
    "the peer's certificate is signed by a different CA than the one this node trusts";

/// Two CAs of one name (as every development CA had): the verifier takes the other CA for the
/// issuer and finds the signature wrong. Both sides still say it is another CA.
#[tokio::test]
async fn a_ca_of_the_same_name_is_reported_as_another_ca() {
    let key = || rcgen::KeyPair::generate().unwrap();
    let ca = DevCa::with_key("same name", key()).unwrap();
    let other = DevCa::with_key("same name", key()).unwrap();
    // The client refuses the server's certificate.
    let (res, _) = connect(
        other.node_config("server").unwrap(),
        ca.node_config("client").unwrap(),
    )
    .await;
    let text = assert_refused(res, &["BadSignature"]);
    assert!(text.contains(OTHER_CA_HERE), "{text}");
    // The server refuses the client's.
    let issued = other.issue("client").unwrap();
    let client = QuicConfig::new(vec![ca.cert()], issued.chain, issued.key);
    let (res, _) = connect(ca.node_config("server").unwrap(), client).await;
    let text = assert_refused(res, &["decrypt error"]);
    assert!(
        text.contains("this node's certificate is signed by a different CA"),
        "{text}"
    );
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

/// A fresh directory for one test's certificates (removed by `Drop`).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("af-quic-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The node's configuration from the files `write_dev_certs` wrote to `dir`.
fn node_files(dir: &std::path::Path, node: &str) -> QuicConfig {
    QuicConfig::from_pem_files(
        &dir.join("ca.pem"),
        &dir.join(format!("{node}.pem")),
        &dir.join(format!("{node}.key")),
    )
    .unwrap()
}

#[test]
fn dev_certs_are_written_and_load() {
    let tmp = TempDir::new("certs");
    let dir = tmp.0.clone();
    let files = crate::write_dev_certs(&dir, &["alpha", "beta"]).unwrap();
    assert!(files.ca_created);
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
}

/// A second run on the same directory keeps its CA and issues from it: a node certificate of
/// each run, each node trusting the directory's ca.pem, connect with mutual TLS.
#[tokio::test]
async fn dev_certs_keep_the_directory_ca_and_nodes_of_both_runs_connect() {
    let tmp = TempDir::new("certs-twice");
    let dir = &tmp.0;
    crate::write_dev_certs(dir, &["alpha"]).unwrap();
    let ca_pem = std::fs::read(dir.join("ca.pem")).unwrap();
    let ca_key = std::fs::read(dir.join("ca.key")).unwrap();
    let second = crate::write_dev_certs(dir, &["beta"]).unwrap();
    assert!(!second.ca_created);
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca_pem);
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), ca_key);
    let (res, _) = connect(node_files(dir, "alpha"), node_files(dir, "beta")).await;
    res.expect("nodes of two runs on one directory connect");
    let (res, _) = connect(node_files(dir, "beta"), node_files(dir, "alpha")).await;
    res.expect("and the other way round");
}

/// A node certificate from another directory's CA is refused, and each side says it is signed
/// by another CA (rustls: an unknown issuer, since each CA has a name of its own).
#[tokio::test]
async fn dev_certs_of_another_directory_are_refused_as_another_ca() {
    let (ours, theirs) = (TempDir::new("certs-ours"), TempDir::new("certs-theirs"));
    crate::write_dev_certs(&ours.0, &["server", "client"]).unwrap();
    crate::write_dev_certs(&theirs.0, &["server", "client"]).unwrap();
    // Their server, our client: our client refuses it.
    let (res, _) = connect(
        node_files(&theirs.0, "server"),
        node_files(&ours.0, "client"),
    )
    .await;
    let text = assert_refused(res, &["UnknownIssuer"]);
    assert!(text.contains(OTHER_CA_HERE), "{text}");
    // Their client certificate, trusting our CA: our server refuses it.
    let mut client = node_files(&theirs.0, "client");
    client.ca_cert = node_files(&ours.0, "client").ca_cert;
    let (res, _) = connect(node_files(&ours.0, "server"), client).await;
    let text = assert_refused(res, &["unknown ca"]);
    assert!(
        text.contains("this node's certificate is signed by a different CA"),
        "{text}"
    );
}

#[test]
fn dev_certs_refuse_to_replace_a_node_without_force() {
    use crate::{DevCertError, DevCertOptions};
    let tmp = TempDir::new("certs-force");
    let dir = &tmp.0;
    crate::write_dev_certs(dir, &["alpha"]).unwrap();
    let cert = std::fs::read(dir.join("alpha.pem")).unwrap();
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    // Nothing is written, not even the other node's files.
    let e = crate::write_dev_certs(dir, &["beta", "alpha"]).unwrap_err();
    match &e {
        DevCertError::NodeExists { node, path } => {
            assert_eq!((node.as_str(), path), ("alpha", &dir.join("alpha.pem")));
        }
        other => panic!("unexpected {other:?}"),
    }
    let text = e.to_string();
    assert!(
        text.contains("alpha.pem") && text.contains("--force"),
        "{text}"
    );
    assert!(!dir.join("beta.pem").exists());
    assert_eq!(std::fs::read(dir.join("alpha.pem")).unwrap(), cert);
    // With force: a new certificate, the same CA.
    let files =
        crate::write_dev_certs_with(dir, &["alpha"], DevCertOptions { force: true }).unwrap();
    assert!(!files.ca_created);
    assert_ne!(std::fs::read(dir.join("alpha.pem")).unwrap(), cert);
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);
    // A node named like the CA's files is refused.
    let e = crate::write_dev_certs(dir, &["ca"]).unwrap_err();
    assert!(matches!(e, DevCertError::BadNodeName(_)), "{e:?}");
}

#[test]
fn dev_certs_refuse_half_a_ca_or_a_key_that_is_not_the_cas() {
    use crate::DevCertError;
    let tmp = TempDir::new("certs-half");
    let dir = &tmp.0;
    crate::write_dev_certs(dir, &["alpha"]).unwrap();
    let key = std::fs::read(dir.join("ca.key")).unwrap();
    std::fs::remove_file(dir.join("ca.key")).unwrap();
    let e = crate::write_dev_certs(dir, &["beta"]).unwrap_err();
    match &e {
        DevCertError::IncompleteCa { present, missing } => {
            assert_eq!(
                (present, missing),
                (&dir.join("ca.pem"), &dir.join("ca.key"))
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(e.to_string().contains("ca.key is missing"), "{e}");
    assert!(!dir.join("beta.pem").exists());
    // Another CA's key.
    let other = TempDir::new("certs-half-other");
    crate::write_dev_certs(&other.0, &[]).unwrap();
    std::fs::copy(other.0.join("ca.key"), dir.join("ca.key")).unwrap();
    let e = crate::write_dev_certs(dir, &["beta"]).unwrap_err();
    assert!(matches!(e, DevCertError::BadCa { .. }), "{e:?}");
    assert!(
        e.to_string().contains("is not the key of the certificate"),
        "{e}"
    );
    // Not a key at all.
    std::fs::write(dir.join("ca.key"), "not a key").unwrap();
    let e = crate::write_dev_certs(dir, &["beta"]).unwrap_err();
    assert!(matches!(e, DevCertError::BadCa { .. }), "{e:?}");
    // The right key again: issued from the kept CA.
    std::fs::write(dir.join("ca.key"), key).unwrap();
    crate::write_dev_certs(dir, &["beta"]).unwrap();
    assert!(dir.join("beta.pem").exists());
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
