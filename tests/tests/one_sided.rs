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

struct FakeDomain {
    regs: Registry,
    next: AtomicU32,
}

struct FakeRegistration {
    key: u32,
    regs: Registry,
}

impl MemoryRegistration for FakeRegistration {
    fn local_key(&self) -> u32 {
        self.key
    }
    fn remote_key(&self) -> u32 {
        self.key
    }
}

impl Drop for FakeRegistration {
    fn drop(&mut self) {
        self.regs.lock().unwrap().remove(&self.key);
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
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.regs.lock().unwrap().insert(key, (addr as usize, len));
        Ok(Box::new(FakeRegistration {
            key,
            regs: self.regs.clone(),
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
    let net = MemNetwork::new();
    let regs: Registry = Arc::default();
    let domain = Arc::new(FakeDomain {
        regs: regs.clone(),
        next: AtomicU32::new(1),
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
    (server, client, peer, immediates)
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
