//! Tests. Those that need an RDMA device are `#[ignore]`d with the reason, so they never pass
//! silently on a machine without one; `soft-roce/tests.d/10-verbs-transport` runs them in the
//! lab with `--ignored`.

use std::future::poll_fn;
use std::io;
use std::time::Duration;

use agentfabric::frame::{Frame, Header, Kind, OutFrame, FLAG_FIRST, FLAG_LAST};
use agentfabric::transport::{Connection, RecvError, Transport};
use bytes::Bytes;

use super::thread_count::{threads_named, threads_named_become};
use super::*;

const NEEDS_DEVICE: &str = "needs an RDMA device: run with soft-roce/lab test";

fn lab_addr() -> String {
    std::env::var("AGENTFABRIC_LAB_ADDR_A").unwrap_or_else(|_| "10.77.0.1".into())
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test did not finish within 60 s")
}

fn frame(seq: u64, len: usize) -> OutFrame {
    let mut h = Header::new(Kind::Data);
    h.flags = FLAG_FIRST | FLAG_LAST;
    h.seq = seq;
    h.len = len as u32;
    let payload: Vec<u8> = (0..len).map(|i| (i as u64 ^ seq) as u8).collect();
    OutFrame {
        header: h.encode(),
        payload: Bytes::from(payload),
    }
}

fn check(f: &Frame, seq: u64, len: usize) {
    assert_eq!(f.header.seq, seq, "out of order");
    assert_eq!(f.payload.len(), len, "frame {seq} has the wrong length");
    assert!(
        f.payload
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i as u64 ^ seq) as u8),
        "frame {seq} corrupted"
    );
}

async fn recv_n(c: &mut Connection, n: usize) -> Result<Vec<Frame>, RecvError> {
    let mut out = Vec::new();
    while out.len() < n {
        poll_fn(|cx| c.stream.poll_recv(cx, &mut out)).await?;
    }
    Ok(out)
}

async fn flush(c: &mut Connection) -> io::Result<()> {
    poll_fn(|cx| c.sink.poll_flush(cx)).await
}

// ---------------------------------------------------------------- no device needed

#[test]
fn default_config_is_valid_and_sets_frame_size() {
    let c = VerbsConfig::default();
    c.validate().unwrap();
    let t = VerbsTransport::with_config(c);
    assert_eq!(t.max_frame_payload(), 64 * 1024 - 64);
    assert_eq!(t.scheme(), "verbs");
    assert!(t.reliable());
}

#[test]
fn one_sided_posting_gets_a_thread_on_software_devices_only_unless_told() {
    use ThreadPriority::*;
    assert_eq!(Posting::default(), Posting::Auto);
    assert_eq!(Posting::Auto.thread(true), Some(Nice(10)));
    assert_eq!(Posting::Auto.thread(false), None);
    assert_eq!(Posting::Caller.thread(true), None);
    assert_eq!(Posting::Thread(Idle).thread(false), Some(Idle));
    assert_eq!(Posting::Thread(Nice(-20)).thread(true), Some(Nice(-20)));
    let ok = VerbsConfig {
        posting: Posting::Thread(Nice(19)),
        ..Default::default()
    };
    ok.validate().unwrap();
}

#[test]
#[allow(deprecated)]
fn the_old_name_of_posting_still_names_it() {
    let old: RmaPosting = RmaPosting::Caller;
    assert_eq!(old, Posting::Caller);
}

#[test]
fn bad_settings_are_refused_with_the_setting_named() {
    for (cfg, what) in [
        (
            VerbsConfig {
                posting: Posting::Thread(ThreadPriority::Nice(20)),
                ..Default::default()
            },
            "posting Thread(Nice(20))",
        ),
        (
            VerbsConfig {
                recv_depth: 1,
                ..Default::default()
            },
            "recv_depth",
        ),
        (
            VerbsConfig {
                mtu: Some(1500),
                ..Default::default()
            },
            "mtu 1500",
        ),
        (
            VerbsConfig {
                min_rnr_timer: 0,
                ..Default::default()
            },
            "655 ms",
        ),
        (
            VerbsConfig {
                recv_buffer_size: 10,
                ..Default::default()
            },
            "recv_buffer_size",
        ),
        (
            VerbsConfig {
                retry_count: 9,
                ..Default::default()
            },
            "retry_count",
        ),
        (
            VerbsConfig {
                rails: ["a", "b", "c", "d", "e"].map(String::from).to_vec(),
                ..Default::default()
            },
            "at most 4",
        ),
        (
            VerbsConfig {
                rails: vec!["rxe1".into(), "rxe1".into()],
                ..Default::default()
            },
            "each rail must name a different device",
        ),
        (
            VerbsConfig {
                spin_before_sleep: Duration::from_millis(1500),
                ..Default::default()
            },
            "spin_before_sleep 1.5s is over 1 s",
        ),
    ] {
        let e = cfg.validate().unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
    }
}

#[test]
fn addresses() {
    assert_eq!(parse("10.77.0.1:7000", false).unwrap().port(), 7000);
    assert_eq!(parse("verbs://10.77.0.1:7000", false).unwrap().port(), 7000);
    for bad in ["", "10.77.0.1", "host:7", "10.77.0.1:x"] {
        let e = parse(bad, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("10.77.0.1:7000"), "{e}");
    }
    assert!(parse("10.77.0.1:0", false).is_err());
    assert!(parse("10.77.0.1:0", true).is_ok());
}

#[tokio::test]
async fn unreachable_peer_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = VerbsTransport::new();
    let e = t.connect(&format!("127.0.0.1:{port}")).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    assert!(e.to_string().contains("cannot reach the verbs peer"), "{e}");
}

#[tokio::test]
async fn without_a_device_listen_says_so() {
    if std::env::var_os("AGENTFABRIC_LAB").is_some() {
        return; // the lab has a device; the device tests cover it
    }
    match VerbsTransport::new().listen("127.0.0.1:0").await {
        Ok(_) => {
            // A machine with a real device: nothing to check here.
        }
        Err(e) => assert!(
            e.to_string().contains("RDMA") || e.to_string().contains("lab"),
            "{e}"
        ),
    }
}

// ---------------------------------------------------------------- device tests

async fn pair_with(
    server: VerbsConfig,
    client: VerbsConfig,
) -> io::Result<(Connection, Connection)> {
    let s = VerbsTransport::with_config(server);
    let c = VerbsTransport::with_config(client);
    let mut l = s.listen(&format!("{}:0", lab_addr())).await?;
    let url = l.local_addr();
    let addr = url.strip_prefix("verbs://").unwrap().to_owned();
    let accept = tokio::spawn(async move {
        let r = tokio::time::timeout(Duration::from_secs(10), l.accept()).await;
        (r, l)
    });
    let a = c.connect(&addr).await;
    match a {
        Ok(a) => {
            let (b, _l) = accept.await.unwrap();
            Ok((a, b.expect("accept timed out")?))
        }
        Err(e) => {
            accept.abort();
            Err(e)
        }
    }
}

fn client_cfg() -> VerbsConfig {
    // Across the veth wire when the lab has a second device.
    VerbsConfig {
        device: std::env::var("AGENTFABRIC_LAB_DEVICE_B").ok(),
        ..Default::default()
    }
}

#[tokio::test]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn device_list_shows_ports_and_gids() {
    let _ = NEEDS_DEVICE;
    let d = devices().expect("no RDMA support here");
    assert!(!d.is_empty(), "no RDMA device");
    for dev in &d {
        print!("{dev}");
    }
    let name = std::env::var("AGENTFABRIC_LAB_DEVICE").unwrap_or_else(|_| d[0].name.clone());
    let dev = d
        .iter()
        .find(|x| x.name == name)
        .expect("lab device listed");
    let p = &dev.ports[0];
    assert!(p.active, "{name} port 1 is {}", p.state);
    assert!(p
        .gids
        .iter()
        .any(|g| g.gid_type == params::GidType::RoceV2 && g.gid.ipv4().is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn frames_of_every_size_both_ways_in_order() {
    bounded(async {
        let (mut a, mut b) = pair_with(VerbsConfig::default(), client_cfg())
            .await
            .unwrap();
        let max = VerbsTransport::new().max_frame_payload();
        let sizes: Vec<usize> = (0..600)
            .map(|i| [0, 1, 100, 190, 193, 4000, 20_000, max][i % 8])
            .collect();
        let n = sizes.len();
        let sizes2 = sizes.clone();
        let sender = tokio::spawn(async move {
            for (i, &len) in sizes2.iter().enumerate() {
                a.sink.push(frame(i as u64, len));
                if i % 7 == 0 {
                    flush(&mut a).await.unwrap();
                }
            }
            flush(&mut a).await.unwrap();
            a
        });
        let got = recv_n(&mut b, n).await.unwrap();
        for (i, f) in got.iter().enumerate() {
            check(f, i as u64, sizes[i]);
        }
        let mut a = sender.await.unwrap();
        // And back, many more frames than credits, while the other side reads slowly.
        for i in 0..200u64 {
            b.sink.push(frame(i, 300));
        }
        let back = tokio::spawn(async move {
            flush(&mut b).await.unwrap();
            b
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let got = recv_n(&mut a, 200).await.unwrap();
        for (i, f) in got.iter().enumerate() {
            check(f, i as u64, 300);
        }
        let mut b = back.await.unwrap();
        // A clean close is EOF after everything.
        a.sink.push(frame(1000, 10));
        poll_fn(|cx| a.sink.poll_close(cx)).await.unwrap();
        let got = recv_n(&mut b, 1).await.unwrap();
        check(&got[0], 1000, 10);
        let mut out = Vec::new();
        let e = poll_fn(|cx| b.stream.poll_recv(cx, &mut out))
            .await
            .unwrap_err();
        assert!(matches!(e, RecvError::Eof), "{e}");
    })
    .await
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid place for the result.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Waits `wait` in a receive that nothing answers, and returns the share of that time this
/// thread was on a CPU: on a current-thread runtime, 1 when the receive spins, 0 when it sleeps.
async fn busy_share_while_receiving(c: &mut Connection, wait: Duration) -> f64 {
    let (wall, cpu) = (std::time::Instant::now(), thread_cpu());
    let mut out = Vec::new();
    let r = tokio::time::timeout(wait, poll_fn(|cx| c.stream.poll_recv(cx, &mut out))).await;
    assert!(r.is_err(), "nothing was sent, yet the receive ended: {r:?}");
    (thread_cpu() - cpu).as_secs_f64() / wall.elapsed().as_secs_f64()
}

// One thread runs both ends, so its CPU time says whether a waiting receive spins or sleeps.
#[tokio::test(flavor = "current_thread")]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn the_coordination_lane_spins_after_a_completion_then_sleeps() {
    bounded(async {
        for spin in [Duration::from_millis(300), Duration::ZERO] {
            let server = VerbsConfig {
                spin_before_sleep: spin,
                ..Default::default()
            };
            let client = VerbsConfig {
                spin_before_sleep: spin,
                ..client_cfg()
            };
            let (mut a, mut b) = pair_with(server, client).await.unwrap();
            // A round trip: the client's last completion is the reply's arrival.
            a.sink.push(frame(0, 64));
            flush(&mut a).await.unwrap();
            check(&recv_n(&mut b, 1).await.unwrap()[0], 0, 64);
            b.sink.push(frame(1, 64));
            flush(&mut b).await.unwrap();
            check(&recv_n(&mut a, 1).await.unwrap()[0], 1, 64);
            let early = busy_share_while_receiving(&mut a, Duration::from_millis(150)).await;
            // Nothing polls the connection here, so nothing spins.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let late = busy_share_while_receiving(&mut a, Duration::from_millis(300)).await;
            println!("spin {spin:?}: busy {early:.2} within it, {late:.2} after it");
            if spin.is_zero() {
                assert!(
                    early < 0.2,
                    "no spin configured, yet the receive spun: {early:.2}"
                );
            } else {
                assert!(early > 0.5, "the receive slept within the spin: {early:.2}");
            }
            assert!(late < 0.2, "the receive spun past its spin: {late:.2}");
            // Asleep, the receive still wakes for a frame.
            let wait = tokio::spawn(async move {
                let got = recv_n(&mut a, 1).await.unwrap();
                check(&got[0], 2, 64);
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            b.sink.push(frame(2, 64));
            flush(&mut b).await.unwrap();
            wait.await.unwrap();
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn dropped_peer_is_an_error_not_a_hang() {
    bounded(async {
        let (a, mut b) = pair_with(VerbsConfig::default(), client_cfg())
            .await
            .unwrap();
        drop(a);
        let mut out = Vec::new();
        let t = std::time::Instant::now();
        let e = poll_fn(|cx| b.stream.poll_recv(cx, &mut out))
            .await
            .unwrap_err();
        println!("after {:?}: {e}", t.elapsed());
        assert!(matches!(e, RecvError::Io(_)), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn wrong_gid_index_is_named() {
    bounded(async {
        // Index 0 is the IPv6 link-local GID in the lab; the server uses the IPv4 one.
        let client = VerbsConfig {
            gid_index: Some(0),
            ..client_cfg()
        };
        let e = pair_with(VerbsConfig::default(), client).await.unwrap_err();
        println!("{e}");
        assert!(e.to_string().contains("GID index"), "{e}");
        // An index past the table.
        let client = VerbsConfig {
            gid_index: Some(200),
            ..client_cfg()
        };
        let e = pair_with(VerbsConfig::default(), client).await.unwrap_err();
        println!("{e}");
        assert!(e.to_string().contains("GID index"), "{e}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn bad_rails_are_named() {
    bounded(async {
        // A rail that is the connection's own device would give a second queue pair on the same
        // device, not a second path: refused, naming the device.
        let own = client_cfg()
            .device
            .or_else(|| std::env::var("AGENTFABRIC_LAB_DEVICE").ok())
            .expect("the lab sets AGENTFABRIC_LAB_DEVICE");
        let client = VerbsConfig {
            rails: vec![own.clone()],
            ..client_cfg()
        };
        let e = pair_with(VerbsConfig::default(), client).await.unwrap_err();
        println!("{e}");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(
            e.to_string()
                .contains(&format!("names {own}, the connection's own device")),
            "{e}"
        );
        // A rail that is no device here.
        let client = VerbsConfig {
            rails: vec!["norxe9".into()],
            ..client_cfg()
        };
        let e = pair_with(VerbsConfig::default(), client).await.unwrap_err();
        println!("{e}");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(
            e.to_string().contains("RDMA device \"norxe9\" not found")
                && e.to_string()
                    .contains("set VerbsConfig::rails (or AGENTFABRIC_RAILS) to one of them"),
            "{e}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn mtu_and_buffer_mismatches_are_named() {
    bounded(async {
        let client = VerbsConfig {
            mtu: Some(4096),
            ..client_cfg()
        };
        let e = pair_with(VerbsConfig::default(), client).await.unwrap_err();
        println!("{e}");
        assert!(e.to_string().contains("path MTU mismatch"), "{e}");
        let client = VerbsConfig {
            recv_buffer_size: 4096,
            ..client_cfg()
        };
        let e = pair_with(VerbsConfig::default(), client).await.unwrap_err();
        println!("{e}");
        assert!(
            e.to_string().contains("receive buffer size mismatch"),
            "{e}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn unreachable_lab_peer_is_named() {
    bounded(async {
        let port = std::net::TcpListener::bind(format!("{}:0", lab_addr()))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = VerbsTransport::with_config(client_cfg())
            .connect(&format!("{}:{port}", lab_addr()))
            .await
            .unwrap_err();
        println!("{e}");
        assert!(e.to_string().contains("cannot reach the verbs peer"), "{e}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn connection_set_up_time() {
    bounded(async {
        let s = VerbsTransport::new();
        let mut l = s.listen(&format!("{}:0", lab_addr())).await.unwrap();
        let addr = l.local_addr().strip_prefix("verbs://").unwrap().to_owned();
        let server = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(5), l.accept()).await {
                conns.push(c);
            }
            conns.len()
        });
        let c = VerbsTransport::with_config(client_cfg());
        let mut times = Vec::new();
        let mut keep = Vec::new();
        for _ in 0..10 {
            let t = std::time::Instant::now();
            keep.push(c.connect(&addr).await.unwrap());
            times.push(t.elapsed());
        }
        println!("sequential connects: {times:?}");
        let t = std::time::Instant::now();
        let mut js = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (c, addr) = (c.clone(), addr.clone());
            js.spawn(async move {
                let t = std::time::Instant::now();
                let conn = c.connect(&addr).await.unwrap();
                (t.elapsed(), conn)
            });
        }
        let mut worst = Duration::ZERO;
        while let Some(r) = js.join_next().await {
            let (d, conn) = r.unwrap();
            worst = worst.max(d);
            keep.push(conn);
        }
        println!(
            "20 concurrent connects: all in {:?}, slowest {worst:?}",
            t.elapsed()
        );
        drop(keep);
        assert_eq!(server.await.unwrap(), 30);
    })
    .await
}

/// A server transport listening on the lab's address and a client transport (across the veth
/// wire when the lab has a second device), with their memory domains, for one-sided tests.
struct OneSidedLab {
    _server: VerbsTransport,
    client: VerbsTransport,
    /// The server's and the client's memory domains.
    sd: Arc<dyn agentfabric::transport::MemoryDomain>,
    cd: Arc<dyn agentfabric::transport::MemoryDomain>,
    listener: Box<dyn agentfabric::transport::Listener>,
    addr: String,
}

impl OneSidedLab {
    async fn new() -> OneSidedLab {
        let s = VerbsTransport::new();
        let c = VerbsTransport::with_config(client_cfg());
        let (sd, cd) = (s.memory_domain().unwrap(), c.memory_domain().unwrap());
        let listener = s.listen(&format!("{}:0", lab_addr())).await.unwrap();
        let addr = listener
            .local_addr()
            .strip_prefix("verbs://")
            .unwrap()
            .to_owned();
        OneSidedLab {
            _server: s,
            client: c,
            sd,
            cd,
            listener,
            addr,
        }
    }

    /// A new connection: the client's end, then the server's.
    async fn connect(&mut self) -> (Connection, Connection) {
        let (a, b) = tokio::join!(self.client.connect(&self.addr), self.listener.accept());
        (a.unwrap(), b.unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn writes_with_immediate_reach_the_peer_after_their_bytes() {
    use agentfabric::transport::{OneSidedKind, OneSidedOp, RailKeys};
    use std::sync::Mutex;
    bounded(async {
        let mut lab = OneSidedLab::new().await;
        let (sd, cd) = (lab.sd.clone(), lab.cd.clone());
        let (a, b) = lab.connect().await;
        let (ops, peer_ops) = (a.sink.one_sided().unwrap(), b.sink.one_sided().unwrap());
        assert_eq!(ops.domain(), cd.id());
        // What the peer's end hears, with what its memory held at that moment.
        const LEN: usize = 300 << 10; // several pieces
        let mut src: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; LEN];
        let dst_addr = dst.as_mut_ptr() as usize;
        let heard: Arc<Mutex<Vec<(u32, bool)>>> = Arc::default();
        let h = heard.clone();
        peer_ops.on_immediate(Arc::new(move |imm| {
            // SAFETY: `dst` outlives the connections (dropped at the end of the test) and
            // nothing else writes it while this runs.
            let landed = unsafe { std::slice::from_raw_parts(dst_addr as *const u8, LEN) };
            let whole = landed
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8);
            h.lock().unwrap().push((imm, whole));
        }));
        // SAFETY: both buffers outlive their registrations (dropped before them below).
        let (sreg, dreg) = unsafe {
            (
                cd.register(src.as_mut_ptr(), LEN).unwrap(),
                sd.register(dst.as_mut_ptr(), LEN).unwrap(),
            )
        };
        let op = |local: usize, len: usize, imm: Option<u32>| OneSidedOp {
            kind: OneSidedKind::Write,
            local_addr: src.as_ptr() as u64 + local as u64,
            local_key: sreg.local_key(),
            len: len as u32,
            remote_addr: dst_addr as u64 + local as u64,
            remote_key: dreg.remote_key(),
            local_rails: RailKeys::EMPTY,
            remote_rails: RailKeys::EMPTY,
            imm,
        };
        // A plain write, a zero-length write that only notifies, and a write of the rest whose
        // immediate must come after all of its bytes (and the first write's) have landed.
        let half = LEN / 2;
        let mut done = Vec::new();
        for o in [
            op(0, half, None),
            op(0, 0, Some(7)),
            op(half, LEN - half, Some(8)),
        ] {
            let (tx, rx) = tokio::sync::oneshot::channel();
            ops.post(
                o,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
            done.push(rx);
        }
        for rx in done {
            rx.await.unwrap().unwrap();
        }
        let t = std::time::Instant::now();
        while heard.lock().unwrap().len() < 2 && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let heard = heard.lock().unwrap().clone();
        assert_eq!(heard.len(), 2, "immediates heard: {heard:?}");
        assert_eq!(heard[0].0, 7);
        assert_eq!(
            heard[1],
            (8, true),
            "the last immediate came before its bytes"
        );
        assert!(dst == src, "written bytes differ");
        drop((a, b, sreg, dreg));
    })
    .await
}

/// One one-sided operation on `ops`, awaited.
async fn post_one(
    ops: &Arc<dyn agentfabric::transport::OneSided>,
    op: agentfabric::transport::OneSidedOp,
) -> io::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    ops.post(
        op,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.await.expect("the operation's callback ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn a_withdrawn_remote_key_is_refused_by_the_device_and_a_granted_one_works() {
    use agentfabric::transport::{OneSidedKind, OneSidedOp, RailKeys};
    bounded(async {
        let mut lab = OneSidedLab::new().await;
        let (sd, cd) = (lab.sd.clone(), lab.cd.clone());
        // A refused operation fails its connection's one-sided QP: each step gets its own
        // connection.
        const LEN: usize = 128 << 10;
        let mut src: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; LEN];
        // SAFETY: both buffers outlive their registrations (dropped before them below).
        let (sreg, mut dreg) = unsafe {
            (
                cd.register(src.as_mut_ptr(), LEN).unwrap(),
                sd.register(dst.as_mut_ptr(), LEN).unwrap(),
            )
        };
        let (src_addr, dst_addr, lkey) =
            (src.as_ptr() as u64, dst.as_ptr() as u64, sreg.local_key());
        let write = |rkey: u32| OneSidedOp {
            kind: OneSidedKind::Write,
            local_addr: src_addr,
            local_key: lkey,
            len: LEN as u32,
            remote_addr: dst_addr,
            remote_key: rkey,
            local_rails: RailKeys::EMPTY,
            remote_rails: RailKeys::EMPTY,
            imm: None,
        };

        let (a, b) = lab.connect().await;
        let ops = a.sink.one_sided().unwrap();
        let first = dreg.remote_key();
        post_one(&ops, write(first))
            .await
            .expect("a write with the granted key");
        drop((a, b));

        dreg.withdraw()
            .expect("rxe has memory windows: the key can be withdrawn");
        let (a, b) = lab.connect().await;
        let e = post_one(&a.sink.one_sided().unwrap(), write(first))
            .await
            .expect_err("a write with a withdrawn key landed");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        drop((a, b));

        dreg.grant().expect("a new key for the same registration");
        let second = dreg.remote_key();
        assert_ne!(second, first);
        src.iter_mut().for_each(|b| *b ^= 0xa5);
        let (a, b) = lab.connect().await;
        post_one(&a.sink.one_sided().unwrap(), write(second))
            .await
            .expect("a write with the new key");
        drop((a, b));
        let (a, b) = lab.connect().await;
        let e = post_one(&a.sink.one_sided().unwrap(), write(first))
            .await
            .expect_err("the first key works again after a new grant");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        drop((a, b, sreg, dreg));
        assert!(dst == src, "the write with the new key did not land whole");

        // Without windows the registration carries its key: only deregistering withdraws it.
        let plain = VerbsTransport::with_config(VerbsConfig {
            memory_windows: false,
            ..client_cfg()
        });
        let pd = plain.memory_domain().unwrap();
        // SAFETY: `src` outlives the registration, dropped at once.
        let mut reg = unsafe { pd.register(src.as_mut_ptr(), LEN).unwrap() };
        let e = reg.withdraw().expect_err("withdrew a key without a window");
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        drop(reg);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn software_devices_post_one_sided_work_on_a_thread_that_ends_with_the_connection() {
    use agentfabric::transport::{OneSidedKind, OneSidedOp, RailKeys};
    const POSTER: &str = "af-verbs-post";
    bounded(async {
        assert_eq!(
            threads_named(POSTER),
            0,
            "a posting thread outlived its test"
        );
        for (posting, threads) in [(Posting::Auto, 2), (Posting::Caller, 0)] {
            let server = VerbsConfig {
                posting,
                ..Default::default()
            };
            let client = VerbsConfig {
                posting,
                ..client_cfg()
            };
            let (s, c) = (
                VerbsTransport::with_config(server),
                VerbsTransport::with_config(client),
            );
            let (sd, cd) = (s.memory_domain().unwrap(), c.memory_domain().unwrap());
            let mut l = s.listen(&format!("{}:0", lab_addr())).await.unwrap();
            let addr = l.local_addr().strip_prefix("verbs://").unwrap().to_owned();
            let (a, b) = tokio::join!(c.connect(&addr), l.accept());
            let (a, b) = (a.unwrap(), b.unwrap());
            // rxe is a software device: Auto gives each end a posting thread, Caller none.
            assert_eq!(
                threads_named_become(POSTER, threads).await,
                threads,
                "{posting:?}"
            );
            // Pieces go out and complete either way (several pieces, more than the budget).
            const LEN: usize = 1 << 20;
            let mut src: Vec<u8> = (0..LEN).map(|i| (i % 253) as u8).collect();
            let mut dst = vec![0u8; LEN];
            // SAFETY: both buffers outlive their registrations (dropped before them below).
            let (sreg, dreg) = unsafe {
                (
                    cd.register(src.as_mut_ptr(), LEN).unwrap(),
                    sd.register(dst.as_mut_ptr(), LEN).unwrap(),
                )
            };
            let ops = a.sink.one_sided().unwrap();
            let op = OneSidedOp {
                kind: OneSidedKind::Write,
                local_addr: src.as_ptr() as u64,
                local_key: sreg.local_key(),
                len: LEN as u32,
                remote_addr: dst.as_mut_ptr() as u64,
                remote_key: dreg.remote_key(),
                local_rails: RailKeys::EMPTY,
                remote_rails: RailKeys::EMPTY,
                imm: None,
            };
            post_one(&ops, op).await.unwrap();
            assert!(dst == src, "{posting:?}: written bytes differ");
            drop((ops, a, b, sreg, dreg));
            // The threads end with their connections (each wakes on its sender's drop).
            assert_eq!(
                threads_named_become(POSTER, 0).await,
                0,
                "{posting:?}: posting threads left"
            );
        }
    })
    .await
}

/// A data frame of `class` on channel `channel` (its lane follows the class), `len` bytes of
/// a pattern `check_on` verifies.
fn frame_on(class: agentfabric::Class, channel: u32, seq: u64, len: usize) -> OutFrame {
    let mut f = frame(seq, len);
    let mut h = Header::decode(&f.header).unwrap();
    h.class = class;
    h.channel = channel;
    f.header = h.encode();
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run with soft-roce/lab test"]
async fn bulk_frames_take_a_lane_of_their_own_in_order_and_both_lanes_close_cleanly() {
    use agentfabric::frame::Lane;
    use agentfabric::Class;
    const POSTER: &str = "af-verbs-bulk";
    bounded(async {
        assert_eq!(
            threads_named(POSTER),
            0,
            "a bulk posting thread outlived its test"
        );
        let max = VerbsTransport::new().max_frame_payload();
        // Both ends want the lane (rxe is a software device: each posts it from a thread), or
        // one does not and bulk frames share the latency lane's QP.
        for (server_lane, lanes) in [(true, 2), (false, 0)] {
            let server = VerbsConfig {
                bulk_lane: server_lane,
                ..Default::default()
            };
            let (mut a, mut b) = pair_with(server, client_cfg()).await.unwrap();
            assert_eq!(
                threads_named_become(POSTER, lanes).await,
                lanes,
                "bulk_lane {server_lane}"
            );
            // Interleaved: full-size bulk frames, and coordination frames between them.
            const BULK: u64 = 120;
            const COORD: u64 = 300;
            let sender = tokio::spawn(async move {
                let (mut bulk, mut coord) = (0u64, 0u64);
                while bulk < BULK || coord < COORD {
                    if bulk < BULK {
                        a.sink.push(frame_on(Class::Bulk, 7, bulk, max));
                        bulk += 1;
                    }
                    for _ in 0..3 {
                        if coord < COORD {
                            a.sink.push(frame_on(Class::Coordination, 3, coord, 100));
                            coord += 1;
                        }
                    }
                    flush(&mut a).await.unwrap();
                }
                // Closing ends both lanes: the peer sees everything, then EOF.
                poll_fn(|cx| a.sink.poll_close(cx)).await.unwrap();
                a
            });
            let mut got = Vec::new();
            let eof = loop {
                match poll_fn(|cx| b.stream.poll_recv(cx, &mut got)).await {
                    Ok(()) => continue,
                    Err(e) => break e,
                }
            };
            assert!(
                matches!(eof, RecvError::Eof),
                "bulk_lane {server_lane}: {eof}"
            );
            let (mut bulk, mut coord) = (0u64, 0u64);
            for f in &got {
                let h = &f.header;
                if Lane::of(&h.encode()) == Lane::Bulk {
                    assert_eq!(h.channel, 7);
                    check(f, bulk, max);
                    bulk += 1;
                } else {
                    assert_eq!(h.channel, 3);
                    check(f, coord, 100);
                    coord += 1;
                }
            }
            assert_eq!(
                (bulk, coord),
                (BULK, COORD),
                "bulk_lane {server_lane}: frames lost"
            );
            drop((sender.await.unwrap(), b));
            // The posting threads end with their connections.
            assert_eq!(
                threads_named_become(POSTER, 0).await,
                0,
                "bulk posting threads left"
            );
        }
    })
    .await
}
