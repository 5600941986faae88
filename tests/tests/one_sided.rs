//! The fabric's one-sided transfer path (route, target check, fallback to the session) without
//! an RDMA device: the in-process transport wrapped with a stand-in memory domain whose
//! "device" copies between registered ranges (checking both against their registrations) and
//! fails the operation a test names, and hands a write's immediate data to the other node's end
//! (the notification that rides on a transfer's last write). Over verbs the same path runs in
//! the lab (`tests/tests/bulk.rs`, `verbs_rdma`).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentfabric::mem::MemNetwork;
use agentfabric::transport::{
    BoxFuture, Connection, ImmediateHandler, Listener, MemoryDomain, MemoryRegistration, OneSided,
    OneSidedDone, OneSidedKind, OneSidedOp, OneSidedSink, Transport,
};
use agentfabric::{Block, Config, Node};
use agentfabric_tests::{assert_blocks_landed, reversed_blocks, within};

const LIMIT: Duration = Duration::from_secs(30);
const DOMAIN: u64 = 7;

/// Registered ranges by key (local and remote keys are the same here).
type Registry = Arc<Mutex<HashMap<u32, (usize, usize)>>>;

/// The stand-in device's memory domain. Its registrations can withdraw their key and take a
/// new one, as memory windows do on verbs.
struct FakeDomain {
    regs: Registry,
    next: Arc<AtomicU32>,
    /// Registrations made (memory "pinned"), not counting new keys for kept ones.
    registered: AtomicUsize,
    /// Registrations dropped.
    deregistered: Arc<AtomicUsize>,
}

struct FakeRegistration {
    key: u32,
    range: (usize, usize),
    regs: Registry,
    next: Arc<AtomicU32>,
    deregistered: Arc<AtomicUsize>,
}

impl MemoryRegistration for FakeRegistration {
    fn local_key(&self) -> u32 {
        self.key
    }
    fn remote_key(&self) -> u32 {
        self.key
    }
    fn withdraw(&mut self) -> io::Result<()> {
        self.regs.lock().unwrap().remove(&self.key);
        Ok(())
    }
    fn grant(&mut self) -> io::Result<()> {
        self.key = self.next.fetch_add(1, Ordering::Relaxed);
        self.regs.lock().unwrap().insert(self.key, self.range);
        Ok(())
    }
}

impl Drop for FakeRegistration {
    fn drop(&mut self) {
        self.regs.lock().unwrap().remove(&self.key);
        self.deregistered.fetch_add(1, Ordering::Relaxed);
    }
}

impl MemoryDomain for FakeDomain {
    fn id(&self) -> u64 {
        DOMAIN
    }

    unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
    ) -> io::Result<Box<dyn MemoryRegistration>> {
        self.registered.fetch_add(1, Ordering::Relaxed);
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let range = (addr as usize, len);
        self.regs.lock().unwrap().insert(key, range);
        Ok(Box::new(FakeRegistration {
            key,
            range,
            regs: self.regs.clone(),
            next: self.next.clone(),
            deregistered: self.deregistered.clone(),
        }))
    }
}

/// How the stand-in device fails operation number `at` (0-based, counted over both nodes).
#[derive(Clone, Copy)]
enum Failure {
    /// Refused before it moves anything.
    Refused { at: usize },
    /// Moves its bytes (and immediate) but reports a failure, as when the peer's
    /// acknowledgement is lost.
    AfterLanding { at: usize },
}

/// The immediate handlers the two nodes' ends installed, by side.
type Handlers = Arc<Mutex<[Option<ImmediateHandler>; 2]>>;

/// The stand-in device of one node (`side` 0 or 1): copies under the registry's lock (so a
/// registration cannot go away mid-copy), after checking both ranges; hands a write's immediate
/// to the other node's handler; fails the operation `failure` names.
struct FakeOneSided {
    regs: Registry,
    posted: Arc<AtomicUsize>,
    failure: Option<Failure>,
    side: usize,
    handlers: Handlers,
    /// Immediates this node's end received.
    immediates: Arc<AtomicUsize>,
}

fn within_reg(regs: &HashMap<u32, (usize, usize)>, key: u32, addr: u64, len: u32) -> bool {
    regs.get(&key).is_some_and(|&(base, n)| {
        let (addr, end) = (addr as usize, addr as usize + len as usize);
        addr >= base && end <= base + n
    })
}

impl OneSided for FakeOneSided {
    fn domain(&self) -> u64 {
        DOMAIN
    }

    fn post(&self, op: OneSidedOp, done: OneSidedDone) {
        let n = self.posted.fetch_add(1, Ordering::Relaxed);
        let injected = || io::Error::new(io::ErrorKind::PermissionDenied, "injected failure");
        if matches!(self.failure, Some(Failure::Refused { at }) if at == n) {
            done(Err(injected()));
            return;
        }
        let regs = self.regs.lock().unwrap();
        if !within_reg(&regs, op.local_key, op.local_addr, op.len)
            || !within_reg(&regs, op.remote_key, op.remote_addr, op.len)
        {
            done(Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "outside the registration",
            )));
            return;
        }
        let (from, to) = match op.kind {
            OneSidedKind::Write => (op.local_addr, op.remote_addr),
            OneSidedKind::Read => (op.remote_addr, op.local_addr),
        };
        // SAFETY: both ranges lie in live registrations (checked above, under the lock that
        // deregistration takes), and the test touches neither region while transfers run.
        unsafe { std::ptr::copy(from as *const u8, to as *mut u8, op.len as usize) };
        drop(regs);
        if let Some(imm) = op.imm {
            let other = self.handlers.lock().unwrap()[1 - self.side].clone();
            other.expect("the target installed a handler")(imm);
        }
        if matches!(self.failure, Some(Failure::AfterLanding { at }) if at == n) {
            done(Err(injected()));
            return;
        }
        done(Ok(()));
    }

    fn on_immediate(&self, handler: ImmediateHandler) {
        let count = self.immediates.clone();
        self.handlers.lock().unwrap()[self.side] = Some(Arc::new(move |imm| {
            count.fetch_add(1, Ordering::Relaxed);
            handler(imm)
        }));
    }
}

/// The in-process transport with the stand-in domain and one-sided operations.
struct FakeRdma {
    inner: agentfabric::mem::MemTransport,
    domain: Arc<FakeDomain>,
    ops: Arc<FakeOneSided>,
}

fn wrap(c: Connection, ops: &Arc<FakeOneSided>) -> Connection {
    Connection {
        sink: Box::new(OneSidedSink::new(c.sink, ops.clone(), None)),
        stream: c.stream,
        remote: c.remote,
    }
}

struct WrapListener {
    inner: Box<dyn Listener>,
    ops: Arc<FakeOneSided>,
}

impl Listener for WrapListener {
    fn local_addr(&self) -> String {
        self.inner.local_addr()
    }
    fn accept(&mut self) -> BoxFuture<'_, io::Result<Connection>> {
        Box::pin(async move { Ok(wrap(self.inner.accept().await?, &self.ops)) })
    }
}

impl Transport for FakeRdma {
    fn scheme(&self) -> &'static str {
        self.inner.scheme()
    }
    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Connection>> {
        Box::pin(async move { Ok(wrap(self.inner.connect(addr).await?, &self.ops)) })
    }
    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>> {
        Box::pin(async move {
            let inner = self.inner.listen(addr).await?;
            Ok(Box::new(WrapListener {
                inner,
                ops: self.ops.clone(),
            }) as Box<dyn Listener>)
        })
    }
    fn memory_domain(&self) -> Option<Arc<dyn MemoryDomain>> {
        Some(self.domain.clone())
    }
}

/// Two nodes on one in-process network sharing the stand-in device, which fails as `failure`
/// says; with the count of immediates the server's end received.
async fn pair(failure: Option<Failure>) -> (Node, Node, agentfabric::Peer, Arc<AtomicUsize>) {
    let (server, client, peer, immediates, _) = pair_on(failure).await;
    (server, client, peer, immediates)
}

/// [`pair`], and the stand-in device's domain.
async fn pair_on(
    failure: Option<Failure>,
) -> (
    Node,
    Node,
    agentfabric::Peer,
    Arc<AtomicUsize>,
    Arc<FakeDomain>,
) {
    let net = MemNetwork::new();
    let regs: Registry = Arc::default();
    let domain = Arc::new(FakeDomain {
        regs: regs.clone(),
        next: Arc::new(AtomicU32::new(1)),
        registered: AtomicUsize::new(0),
        deregistered: Arc::default(),
    });
    let (posted, handlers) = (Arc::new(AtomicUsize::new(0)), Handlers::default());
    let node = |name: &str, side: usize| {
        let ops = Arc::new(FakeOneSided {
            regs: regs.clone(),
            posted: posted.clone(),
            failure,
            side,
            handlers: handlers.clone(),
            immediates: Arc::default(),
        });
        let immediates = ops.immediates.clone();
        let node = Node::builder(name)
            .config(Config::default())
            .transport(FakeRdma {
                inner: net.transport(),
                domain: domain.clone(),
                ops,
            })
            .build()
            .unwrap();
        (node, immediates)
    };
    let ((server, immediates), (client, _)) = (node("server", 0), node("client", 1));
    let addr = server.listen("mem://server").await.unwrap();
    let peer = client.connect(&addr).await.unwrap();
    (server, client, peer, immediates, domain)
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 11) as u8
}

/// What a 64-block write did: bytes the session carried, immediates the target received.
struct Moved {
    through_session: u64,
    immediates: usize,
}

/// Writes 64 blocks of 4 KiB in reverse order, with a notification; checks that the blocks and
/// exactly one notification arrived.
async fn write_and_check(failure: Option<Failure>) -> Moved {
    const BLOCK: u64 = 4096;
    const N: u64 = 64;
    let (server, client, peer, immediates) = pair(failure).await;
    let src = client.register((BLOCK * N) as usize).unwrap();
    let dst = server.register((BLOCK * N) as usize).unwrap();
    assert!(dst.descriptor().rdma.is_some());
    let data: Vec<u8> = (0..(BLOCK * N) as usize).map(pattern).collect();
    src.write_at(0, &data).await.unwrap();
    let blocks = reversed_blocks(N, BLOCK);
    let before = peer.stats().session.bytes_sent;
    let report = within(LIMIT, peer.write(&src, &dst.descriptor(), &blocks, Some(3)))
        .await
        .unwrap();
    assert_eq!(report.bytes, BLOCK * N);
    let n = within(LIMIT, server.notification()).await.unwrap();
    assert_eq!(
        (n.tag, n.region, n.peer.as_str()),
        (3, dst.descriptor().region, "client")
    );
    let again = tokio::time::timeout(Duration::from_millis(300), server.notification()).await;
    assert!(again.is_err(), "a second notification: {again:?}");
    assert_blocks_landed(&dst, &blocks, &data).await;
    Moved {
        through_session: peer.stats().session.bytes_sent - before,
        immediates: immediates.load(Ordering::Relaxed),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_move_one_sided_when_both_regions_are_registered() {
    let moved = write_and_check(None).await;
    assert!(
        moved.through_session < 4096,
        "{} bytes went through the session",
        moved.through_session
    );
    // The notification rode on the last write.
    assert_eq!(moved.immediates, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_after_a_failed_operation_go_through_the_session() {
    // Operation 20 fails: blocks 0..20 moved one-sided, blocks 20..64 (and the notification)
    // through the session.
    let moved = write_and_check(Some(Failure::Refused { at: 20 })).await;
    assert!(
        moved.through_session > 44 * 4096 && moved.through_session < 50 * 4096,
        "{} bytes went through the session",
        moved.through_session
    );
    assert_eq!(moved.immediates, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_that_landed_with_a_failed_last_write_is_delivered_once() {
    // The last write lands with its immediate but reports a failure: the initiator resends
    // that block and notifies through the session, and the target delivers only the first.
    let moved = write_and_check(Some(Failure::AfterLanding { at: 63 })).await;
    assert_eq!(moved.immediates, 1);
    assert!(
        moved.through_session >= 4096 && moved.through_session < 3 * 4096,
        "{} bytes went through the session",
        moved.through_session
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_notifies_through_the_session() {
    // RDMA READ carries no immediate: the notification is a session message.
    let (server, client, peer, immediates) = pair(None).await;
    let dst = client.register(8192).unwrap();
    let src = server.register(8192).unwrap();
    src.write_at(0, &[7u8; 8192]).await.unwrap();
    let blocks = [Block {
        local: 0,
        remote: 0,
        len: 8192,
    }];
    within(LIMIT, peer.read(&dst, &src.descriptor(), &blocks, Some(9)))
        .await
        .unwrap();
    assert_eq!(within(LIMIT, server.notification()).await.unwrap().tag, 9);
    assert_eq!(immediates.load(Ordering::Relaxed), 0);
    let mut back = [0u8; 8192];
    dst.read_at(0, &mut back).await.unwrap();
    assert!(back.iter().all(|&b| b == 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaimed_buffer_takes_a_new_key_without_registering_again() {
    const LEN: u64 = 64 * 1024;
    let (server, client, peer, _, domain) = pair_on(None).await;
    let src = client.register(LEN as usize).unwrap();
    let dst = server.register(LEN as usize).unwrap();
    let data: Vec<u8> = (0..LEN as usize).map(pattern).collect();
    src.write_at(0, &data).await.unwrap();
    let blocks = reversed_blocks(16, LEN / 16);
    let old = dst.descriptor();
    within(LIMIT, peer.write(&src, &old, &blocks, None))
        .await
        .unwrap();

    // A second handle keeps the region: reclaiming it hands the region back, revoked.
    let other = dst.clone();
    let dst = dst.reclaim().await.expect_err("another handle is alive");
    assert!(dst.is_revoked());
    drop(other);
    let buf = dst.reclaim().await.expect("the only handle");
    assert!(buf.keeps_registration());
    let mut landed = vec![0u8; LEN as usize];
    for b in &blocks {
        let (from, to, n) = (b.local as usize, b.remote as usize, b.len as usize);
        landed[to..to + n].copy_from_slice(&data[from..from + n]);
    }
    assert!(
        buf[..] == landed[..],
        "the written bytes came back with the buffer"
    );
    let old_rkey = old.rdma.unwrap().rkey;
    assert!(
        !domain.regs.lock().unwrap().contains_key(&old_rkey),
        "the device still honours the revoked region's key"
    );

    let pinned = domain.registered.load(Ordering::Relaxed);
    let again = server.register_buf(buf);
    assert_eq!(
        domain.registered.load(Ordering::Relaxed),
        pinned,
        "the kept registration was not reused"
    );
    let new = again.descriptor();
    assert_ne!(new.rdma.unwrap().rkey, old_rkey);
    assert_ne!(new.region, old.region);
    // The old descriptor is refused; the new one moves blocks one-sided.
    let refused = within(LIMIT, peer.write(&src, &old, &blocks, None)).await;
    assert!(
        refused.is_err(),
        "a write through the revoked descriptor: {refused:?}"
    );
    let data2: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
    src.write_at(0, &data2).await.unwrap();
    let before = peer.stats().session.bytes_sent;
    within(LIMIT, peer.write(&src, &new, &blocks, None))
        .await
        .unwrap();
    assert!(peer.stats().session.bytes_sent - before < LEN / 4);
    assert_blocks_landed(&again, &blocks, &data2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_registration_goes_when_its_buffer_leaves_the_domain_or_is_dropped() {
    let (server, _client, _peer, _, domain) = pair_on(None).await;
    let region = server.register(8192).unwrap();
    let buf = region.reclaim().await.unwrap();
    assert!(buf.keeps_registration());
    let gone = domain.deregistered.load(Ordering::Relaxed);

    // A node without the stand-in's domain cannot use the registration: it goes.
    let plain = Node::builder("plain")
        .transport(MemNetwork::new().transport())
        .build()
        .unwrap();
    let region = plain.register_buf(buf);
    assert!(region.descriptor().rdma.is_none());
    assert_eq!(domain.deregistered.load(Ordering::Relaxed), gone + 1);
    let buf = region.reclaim().await.unwrap();
    assert!(!buf.keeps_registration());

    // Dropping a buffer that keeps one deregisters it (before the memory is freed).
    let buf = server.register_buf(buf).reclaim().await.unwrap();
    assert!(buf.keeps_registration());
    drop(buf);
    assert_eq!(domain.deregistered.load(Ordering::Relaxed), gone + 2);
}
