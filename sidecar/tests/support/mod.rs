//! What the sidecar's integration tests share: sidecars started in-process (each in a private
//! temporary socket directory, listening on TCP loopback), a small protocol client that speaks
//! PROTOCOL.md with the crate's own wire codec, and sealed `memfd`s for regions.
//!
//! The client is deliberately simple and strict: it reads frames only when a test asks for one,
//! so a test can also play a client that does not read. Every wait is bounded by [`WAIT`] and
//! panics with what it waited for, so a broken sidecar fails a test instead of hanging it.

// Each test binary (`channels`, `hostile`, `regions`, `tools`) includes this module and uses a
// different part of it; what one binary leaves unused is not dead code.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agentfabric_sidecar::wire::{
    decode_to_client, kind, ClientMsg, ErrorCode, FromClient, Header, SidecarMsg, ToClient,
    TransferRequest, WireBlock, HEADER_LEN, VERSION,
};
use agentfabric_sidecar::{Limits, Sidecar, SidecarConfig};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// How long any single wait of a test may take before the test fails. Generous against a
/// loaded machine (debug build, two cores, tests in parallel), yet every test stays bounded.
pub const WAIT: Duration = Duration::from_secs(10);

/// A directory under the system's temporary directory, unique to this process and call, removed
/// (with everything in it) when dropped — also when a test panics.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, not yet created, path: `$TMPDIR/af-sidecar-<pid>-<n>-<tag>`.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("af-sidecar-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sidecar started in this test's runtime, with its own socket directory.
pub struct TestSidecar {
    sidecar: Option<Sidecar>,
    /// The temporary directory holding the socket directory (removed on drop).
    pub dir: TempDir,
}

impl TestSidecar {
    /// A sidecar named `node` with the default limits.
    pub async fn start(node: &str) -> TestSidecar {
        TestSidecar::start_with(node, Limits::default()).await
    }

    /// A sidecar named `node` with `limits`, listening on a free TCP port of the loopback.
    pub async fn start_with(node: &str, limits: Limits) -> TestSidecar {
        let dir = TempDir::new(node);
        let config = SidecarConfig {
            node: node.into(),
            listen: vec!["tcp://127.0.0.1:0".into()],
            socket_dir: dir.path().join("sock"),
            allow_uids: Vec::new(),
            quic_pem: None,
            verbs: false,
            limits,
        };
        TestSidecar::start_config(config, dir).await
    }

    /// A sidecar with an explicit configuration; `dir` is removed with it.
    pub async fn start_config(config: SidecarConfig, dir: TempDir) -> TestSidecar {
        let sidecar = tokio::time::timeout(WAIT, Sidecar::start(config))
            .await
            .expect("the sidecar did not start in time")
            .expect("the sidecar failed to start");
        TestSidecar {
            sidecar: Some(sidecar),
            dir,
        }
    }

    fn get(&self) -> &Sidecar {
        self.sidecar.as_ref().expect("the sidecar is running")
    }

    /// The socket clients connect to.
    pub fn socket(&self) -> PathBuf {
        self.get().socket()
    }

    /// The node's TCP address, for clients of other sidecars to open channels to.
    pub fn url(&self) -> String {
        self.get().listening()[0].clone()
    }

    /// The node's name.
    pub fn node(&self) -> String {
        self.get().node().to_owned()
    }

    /// A client connected to this sidecar that said `HELLO` as `endpoint`.
    pub async fn client(&self, endpoint: &str) -> Client {
        Client::hello(&self.socket(), endpoint).await
    }

    /// Stops the sidecar (bounded), then removes its directory.
    pub async fn stop(mut self) {
        if let Some(s) = self.sidecar.take() {
            tokio::time::timeout(WAIT, s.stop())
                .await
                .expect("the sidecar did not stop in time");
        }
    }
}

/// A protocol client on one Unix socket connection. Replies are kept by operation id; events
/// (id-0 frames, `TOOL_CALL`, `TOOL_CANCELLED`) in a queue of their own, in arrival order.
///
/// `SEND`s made with [`Client::send_op`] (and [`Client::send`]) are tracked per channel as
/// PROTOCOL.md answers them — cumulatively: a `DONE` answers its send and every earlier one of
/// the channel, an `ERROR` only its own (and every earlier send must have been answered before
/// it). Their replies are checked against those rules as they arrive, not filed.
pub struct Client {
    stream: UnixStream,
    rbuf: BytesMut,
    next_id: u64,
    events: VecDeque<ToClient>,
    replies: HashMap<u64, SidecarMsg>,
    /// Tracked `SEND`s per channel not yet answered, oldest first.
    sends: HashMap<u32, VecDeque<u64>>,
    /// The channel of each tracked, unanswered `SEND`.
    send_channel: HashMap<u64, u32>,
    /// Tracked `SEND`s answered so far, per channel (by `DONE` or `ERROR`).
    answered: HashMap<u32, usize>,
    /// Tracked `SEND`s that failed: (channel, id, code, message), in arrival order.
    pub send_errors: Vec<(u32, u64, ErrorCode, String)>,
    /// Reply frames received for tracked `SEND`s (each answers one or more).
    pub send_replies: usize,
    /// The sidecar's `HELLO_OK`, once received.
    pub hello_ok: Option<SidecarMsg>,
    /// `send_window` from `HELLO_OK` (1 until then).
    pub send_window: u32,
    eof: bool,
}

/// Whether a frame is an event rather than the reply to an operation.
fn is_event(f: &ToClient) -> bool {
    f.id == 0 || matches!(f.msg.kind(), kind::TOOL_CALL | kind::TOOL_CANCELLED)
}

impl Client {
    /// Connects without saying anything.
    pub async fn connect(socket: &Path) -> Client {
        let stream = tokio::time::timeout(WAIT, UnixStream::connect(socket))
            .await
            .expect("connecting timed out")
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));
        Client {
            stream,
            rbuf: BytesMut::with_capacity(64 << 10),
            next_id: 1,
            events: VecDeque::new(),
            replies: HashMap::new(),
            sends: HashMap::new(),
            send_channel: HashMap::new(),
            answered: HashMap::new(),
            send_errors: Vec::new(),
            send_replies: 0,
            hello_ok: None,
            send_window: 1,
            eof: false,
        }
    }

    /// Connects and says `HELLO` as `endpoint`; panics unless the answer is `HELLO_OK`.
    pub async fn hello(socket: &Path, endpoint: &str) -> Client {
        match Client::try_hello(socket, endpoint).await {
            Ok(c) => c,
            Err((code, m)) => panic!("HELLO as {endpoint} refused: {code:?} {m}"),
        }
    }

    /// Connects and says `HELLO` as `endpoint`: the client, or the `ERROR` it got.
    pub async fn try_hello(socket: &Path, endpoint: &str) -> Result<Client, (ErrorCode, String)> {
        let mut c = Client::connect(socket).await;
        c.write(&FromClient {
            id: 0,
            msg: ClientMsg::Hello {
                min_version: VERSION,
                max_version: VERSION,
                endpoint: endpoint.into(),
            },
        })
        .await
        .expect("writing HELLO");
        let f = c
            .read_frame()
            .await
            .expect("reading the answer to HELLO")
            .expect("the socket ended before the answer to HELLO");
        match f.msg {
            SidecarMsg::HelloOk { send_window, .. } => {
                c.send_window = send_window;
                c.hello_ok = Some(f.msg);
                Ok(c)
            }
            SidecarMsg::Error { code, message } => Err((code, message)),
            other => panic!("unexpected answer to HELLO: {other:?}"),
        }
    }

    /// The raw socket (to pass descriptors, or to drop it abruptly).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// A fresh operation id.
    pub fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Writes one frame (bounded by [`WAIT`]); the socket's error if it failed.
    pub async fn write(&mut self, f: &FromClient) -> std::io::Result<()> {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        self.write_raw(&b).await
    }

    /// Writes raw bytes (bounded by [`WAIT`]).
    pub async fn write_raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        tokio::time::timeout(WAIT, self.stream.write_all(b))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
    }

    /// Writes one frame with `fd` beside it (`SCM_RIGHTS`), as `REGION_ADD` wants it.
    pub async fn write_with_fds(&mut self, f: &FromClient, fds: &[RawFd]) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        let mut b = BytesMut::new();
        f.encode(&mut b);
        let raw = self.stream.as_raw_fd();
        let sent = tokio::time::timeout(WAIT, async {
            loop {
                self.stream.writable().await?;
                let r = self.stream.try_io(Interest::WRITABLE, || {
                    let iov = [IoSlice::new(&b)];
                    let cmsg = [ControlMessage::ScmRights(fds)];
                    sendmsg::<UnixAddr>(raw, &iov, &cmsg, MsgFlags::MSG_DONTWAIT, None)
                        .map_err(std::io::Error::from)
                });
                match r {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "sendmsg timed out"))??;
        // The descriptors went with the first byte; the rest of a partly sent frame follows.
        if sent < b.len() {
            self.write_raw(&b[sent..]).await?;
        }
        Ok(())
    }

    /// Sends `msg` as a new operation; its id.
    pub async fn op(&mut self, msg: ClientMsg) -> u64 {
        let id = self.id();
        self.write(&FromClient { id, msg })
            .await
            .expect("writing an operation");
        id
    }

    /// The next frame from the socket (`None` at its end), waiting at most [`WAIT`]. Panics
    /// on a frame the codec cannot decode: the sidecar must only send valid frames.
    pub async fn read_frame(&mut self) -> std::io::Result<Option<ToClient>> {
        tokio::time::timeout(WAIT, self.read_frame_unbounded())
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no frame in time"))?
    }

    async fn read_frame_unbounded(&mut self) -> std::io::Result<Option<ToClient>> {
        loop {
            if self.rbuf.len() >= HEADER_LEN {
                let head: [u8; HEADER_LEN] = self.rbuf[..HEADER_LEN].try_into().unwrap();
                let h = Header::parse(&head, u32::MAX)
                    .unwrap_or_else(|e| panic!("the sidecar sent a bad header: {e}"));
                let total = HEADER_LEN + h.body_len();
                if self.rbuf.len() >= total {
                    let mut frame = self.rbuf.split_to(total);
                    let body = frame.split_off(HEADER_LEN).freeze();
                    let f = decode_to_client(&h, body)
                        .unwrap_or_else(|e| panic!("the sidecar sent a bad frame: {e}"));
                    return Ok(Some(f));
                }
                self.rbuf.reserve(total - self.rbuf.len());
            } else {
                self.rbuf.reserve(64 << 10);
            }
            if self.eof {
                return Ok(None);
            }
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => {
                    self.eof = true;
                    if !self.rbuf.is_empty() {
                        panic!("the socket ended inside a frame");
                    }
                    return Ok(None);
                }
                Ok(_) => {}
                // The sidecar shut the socket with our data unread: the end, for us.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    self.eof = true;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one frame and files it (event queue or replies); `false` at the socket's end.
    async fn pump(&mut self, waiting_for: &str) -> bool {
        match self.read_frame().await {
            Ok(Some(f)) if is_event(&f) => {
                self.events.push_back(f);
                true
            }
            Ok(Some(f)) => {
                if let Some(channel) = self.send_channel.remove(&f.id) {
                    self.send_answered(channel, f);
                } else if let Some(old) = self.replies.insert(f.id, f.msg) {
                    panic!("two replies to operation {}: {old:?}", f.id);
                }
                true
            }
            Ok(None) => false,
            Err(e) => panic!("while waiting for {waiting_for}: {e}"),
        }
    }

    /// The reply to operation `id`.
    pub async fn reply(&mut self, id: u64) -> SidecarMsg {
        loop {
            if let Some(m) = self.replies.remove(&id) {
                return m;
            }
            if !self.pump(&format!("the reply to operation {id}")).await {
                panic!(
                    "the socket ended before the reply to operation {id}; events: {:?}",
                    self.events
                );
            }
        }
    }

    /// The reply to `id` if it has arrived already (reads nothing).
    pub fn reply_ready(&mut self, id: u64) -> Option<SidecarMsg> {
        self.replies.remove(&id)
    }

    /// Sends `msg` and waits for its reply.
    pub async fn call(&mut self, msg: ClientMsg) -> SidecarMsg {
        let id = self.op(msg).await;
        self.reply(id).await
    }

    /// Sends `msg` and asserts the reply is `DONE`.
    pub async fn done(&mut self, msg: ClientMsg) {
        let what = format!("{msg:?}");
        match self.call(msg).await {
            SidecarMsg::Done => {}
            other => panic!("{what} answered {other:?}, not DONE"),
        }
    }

    /// Sends `msg` and asserts the reply is `ERROR` with `code`; the error's message.
    pub async fn fails(&mut self, msg: ClientMsg, code: ErrorCode) -> String {
        let what = format!("{msg:?}");
        expect_error(self.call(msg).await, code, &what)
    }

    /// `PING` → `DONE`.
    pub async fn ping(&mut self) {
        self.done(ClientMsg::Ping).await;
    }

    /// The next event, waiting for one.
    pub async fn event(&mut self) -> ToClient {
        loop {
            if let Some(e) = self.events.pop_front() {
                return e;
            }
            if !self.pump("an event").await {
                panic!("the socket ended while waiting for an event");
            }
        }
    }

    /// The first event `pred` accepts (events before it stay queued, in order).
    pub async fn event_where(&mut self, what: &str, pred: impl Fn(&ToClient) -> bool) -> ToClient {
        let mut seen = 0;
        loop {
            if let Some(i) = self.events.iter().skip(seen).position(&pred) {
                return self
                    .events
                    .remove(seen + i)
                    .expect("the index is in the queue");
            }
            seen = self.events.len();
            if !self.pump(what).await {
                panic!(
                    "the socket ended while waiting for {what}; events: {:?}",
                    self.events
                );
            }
        }
    }

    /// Events received so far and not taken (reads nothing).
    pub fn queued_events(&self) -> &VecDeque<ToClient> {
        &self.events
    }

    /// Takes every event received so far (reads nothing).
    pub fn take_events(&mut self) -> Vec<ToClient> {
        self.events.drain(..).collect()
    }

    /// Reads what the sidecar sends until the socket ends (at most [`WAIT`]): whatever was
    /// filed on the way stays filed. Panics if it does not end.
    pub async fn expect_eof(&mut self) {
        let r = tokio::time::timeout(WAIT, async { while self.pump("the socket's end").await {} })
            .await;
        assert!(r.is_ok(), "the socket did not end within {WAIT:?}");
    }

    /// Expects a fatal `ERROR` (id 0) with `code`, and then the socket's end. Its message.
    pub async fn expect_fatal(&mut self, code: ErrorCode) -> String {
        let e = self
            .event_where(&format!("a fatal ERROR {code:?}"), |f| {
                f.id == 0 && f.msg.kind() == kind::ERROR
            })
            .await;
        let m = expect_error(e.msg, code, "the fatal error");
        self.expect_eof().await;
        m
    }

    /// `OPEN` of a coordination channel to `endpoint` at `url`: its handle and the peer's node.
    pub async fn open(&mut self, url: &str, endpoint: &str, label: &str) -> (u32, String) {
        match self.call(open_msg(0, 0, url, endpoint, label)).await {
            SidecarMsg::Opened { channel, node } => (channel, node),
            other => panic!("OPEN {url}/{endpoint} answered {other:?}"),
        }
    }

    /// The next `INCOMING`: (channel, node, endpoint, label).
    pub async fn incoming(&mut self) -> (u32, String, String, String) {
        let e = self
            .event_where("INCOMING", |f| f.msg.kind() == kind::INCOMING)
            .await;
        match e.msg {
            SidecarMsg::Incoming {
                channel,
                node,
                endpoint,
                label,
                ..
            } => (channel, node, endpoint, label),
            _ => unreachable!(),
        }
    }

    /// The next `MESSAGE`: (channel, request, body).
    pub async fn message(&mut self) -> (u32, u64, Bytes) {
        let e = self
            .event_where("MESSAGE", |f| f.msg.kind() == kind::MESSAGE)
            .await;
        match e.msg {
            SidecarMsg::Message {
                channel,
                request,
                body,
            } => (channel, request, body),
            _ => unreachable!(),
        }
    }

    /// The next `MESSAGE` or `CHANNEL_CLOSED` of `channel`.
    pub async fn channel_event(&mut self, channel: u32) -> SidecarMsg {
        self.event_where(&format!("an event of channel {channel}"), |f| {
            matches!(f.msg, SidecarMsg::Message { channel: c, .. } | SidecarMsg::ChannelClosed { channel: c, .. } if c == channel)
        })
        .await
        .msg
    }

    /// Applies the reply `f` to tracked send `f.id` of `channel`, checking PROTOCOL.md's rules.
    fn send_answered(&mut self, channel: u32, f: ToClient) {
        let q = self.sends.get_mut(&channel).expect("a tracked channel");
        let at = q
            .iter()
            .position(|&id| id == f.id)
            .expect("a tracked send is in its channel's queue");
        self.send_replies += 1;
        match f.msg {
            // A DONE answers its send and every earlier one.
            SidecarMsg::Done => {
                for id in q.drain(..=at) {
                    self.send_channel.remove(&id);
                }
                *self.answered.entry(channel).or_default() += at + 1;
            }
            // An ERROR answers its own send only; the ones before it were answered first.
            SidecarMsg::Error { code, message } => {
                assert_eq!(
                    at, 0,
                    "ERROR for SEND {} of channel {channel} while earlier sends are unanswered \
                     ({:?}): the DONE for them must come first",
                    f.id, q
                );
                q.pop_front();
                *self.answered.entry(channel).or_default() += 1;
                self.send_errors.push((channel, f.id, code, message));
            }
            other => panic!("SEND {} answered {other:?}", f.id),
        }
    }

    /// Sends a tracked `SEND` on `channel` without waiting for anything; its id.
    pub async fn send_op(&mut self, channel: u32, body: impl Into<Bytes>) -> u64 {
        let id = self
            .op(ClientMsg::Send {
                channel,
                body: body.into(),
            })
            .await;
        self.sends.entry(channel).or_default().push_back(id);
        self.send_channel.insert(id, channel);
        id
    }

    /// Tracked sends of `channel` not answered so far (reads nothing).
    pub fn unanswered(&self, channel: u32) -> usize {
        self.sends.get(&channel).map_or(0, VecDeque::len)
    }

    /// The oldest tracked, unanswered send of `channel`.
    pub fn oldest_unanswered(&self, channel: u32) -> Option<u64> {
        self.sends.get(&channel).and_then(|q| q.front().copied())
    }

    /// Tracked sends of `channel` answered so far (reads nothing).
    pub fn answered(&self, channel: u32) -> usize {
        self.answered.get(&channel).copied().unwrap_or(0)
    }

    /// Reads until some tracked send of `channel` is answered.
    pub async fn await_send_reply(&mut self, channel: u32) {
        let before = self.answered(channel);
        while self.answered(channel) == before {
            if !self
                .pump(&format!("a reply to a SEND of channel {channel}"))
                .await
            {
                panic!("the socket ended with sends of channel {channel} unanswered");
            }
        }
    }

    /// `SEND` on `channel`, as a client keeps within `send_window`: when the window is full, a
    /// reply is awaited first. Panics if a send of the client failed.
    pub async fn send(&mut self, channel: u32, body: impl Into<Bytes>) {
        while self.unanswered(channel) >= self.send_window as usize {
            self.await_send_reply(channel).await;
        }
        assert!(
            self.send_errors.is_empty(),
            "sends failed: {:?}",
            self.send_errors
        );
        self.send_op(channel, body).await;
    }

    /// `FLUSH` of `channel`: its reply, after which (PROTOCOL.md) every earlier send of the
    /// channel must have been answered — which is asserted.
    pub async fn flush(&mut self, channel: u32) -> SidecarMsg {
        let r = self.call(ClientMsg::Flush { channel }).await;
        assert_eq!(
            self.unanswered(channel),
            0,
            "FLUSH of channel {channel} answered ({r:?}) before the sends before it: {:?}",
            self.sends.get(&channel)
        );
        r
    }

    /// `FLUSH`es every channel with unanswered sends; asserts each is `DONE` and no send failed.
    pub async fn flush_sends(&mut self) {
        let chans: Vec<u32> = self
            .sends
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(c, _)| *c)
            .collect();
        for channel in chans {
            let r = self.flush(channel).await;
            assert_eq!(r, SidecarMsg::Done, "FLUSH of channel {channel}");
        }
        assert!(
            self.send_errors.is_empty(),
            "sends failed: {:?}",
            self.send_errors
        );
    }

    /// `REGION_ADD` of `mem` (its whole length): the region's handle and descriptor.
    pub async fn region_add(&mut self, mem: &Memfd) -> (u32, Bytes) {
        let id = self.id();
        let f = FromClient {
            id,
            msg: ClientMsg::RegionAdd {
                len: mem.len() as u64,
            },
        };
        self.write_with_fds(&f, &[mem.fd()])
            .await
            .expect("sending REGION_ADD");
        match self.reply(id).await {
            SidecarMsg::Region {
                region,
                len,
                descriptor,
            } => {
                assert_eq!(len, mem.len() as u64, "REGION's len");
                (region, descriptor)
            }
            other => panic!("REGION_ADD answered {other:?}"),
        }
    }
}

/// Asserts `m` is `ERROR` with `code`; its message.
pub fn expect_error(m: SidecarMsg, code: ErrorCode, what: &str) -> String {
    match m {
        SidecarMsg::Error { code: c, message } if c == code => message,
        other => panic!("{what}: expected ERROR {code:?}, got {other:?}"),
    }
}

/// An `OPEN` message.
pub fn open_msg(class: u8, priority: u8, url: &str, endpoint: &str, label: &str) -> ClientMsg {
    ClientMsg::Open {
        class,
        priority,
        url: url.into(),
        endpoint: endpoint.into(),
        label: label.into(),
    }
}

/// A `WRITE` (or, with `write` false, `READ`) of `blocks` as (local, remote, len).
pub fn transfer_msg(
    write: bool,
    channel: u32,
    region: u32,
    descriptor: &Bytes,
    notify: Option<u64>,
    blocks: &[(u64, u64, u64)],
) -> ClientMsg {
    let t = TransferRequest {
        channel,
        region,
        deadline_ms: 0,
        notify,
        descriptor: descriptor.clone(),
        blocks: blocks
            .iter()
            .map(|&(local, remote, len)| WireBlock { local, remote, len })
            .collect(),
    };
    if write {
        ClientMsg::Write(t)
    } else {
        ClientMsg::Read(t)
    }
}

/// A shared-memory file as clients register it: a `memfd` created with `MFD_ALLOW_SEALING`,
/// sized, (optionally) sealed against shrinking, and mapped shared in this process — the
/// client's own view of the pages the sidecar maps too.
pub struct Memfd {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; moving it between threads is
// as safe as moving a Vec (the tests never touch it from two threads at once).
unsafe impl Send for Memfd {}

impl Memfd {
    /// A sealed (`F_SEAL_SHRINK`) memfd of `len` bytes, zeroed.
    pub fn sealed(len: usize) -> Memfd {
        Memfd::new(len, true)
    }

    /// A memfd of `len` bytes, sealed against shrinking if `seal`.
    pub fn new(len: usize, seal: bool) -> Memfd {
        let name = c"agentfabric-test";
        // SAFETY: plain system calls on a descriptor this function owns; results checked.
        unsafe {
            let fd = libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC);
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            assert_eq!(
                libc::ftruncate(fd.as_raw_fd(), len as libc::off_t),
                0,
                "ftruncate: {}",
                std::io::Error::last_os_error()
            );
            if seal {
                assert_eq!(
                    libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK),
                    0,
                    "F_ADD_SEALS: {}",
                    std::io::Error::last_os_error()
                );
            }
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            );
            assert_ne!(
                ptr,
                libc::MAP_FAILED,
                "mmap: {}",
                std::io::Error::last_os_error()
            );
            Memfd {
                fd,
                ptr: ptr.cast(),
                len,
            }
        }
    }

    /// The descriptor, to pass.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The client's view of the bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` bytes until drop. The sidecar may write them concurrently
        // only during a transfer, which the tests wait for before reading.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The client's view of the bytes, to write.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`; `&mut self` makes this the only view in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Memfd {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Fills `buf` with a pattern that depends on `seed` and on the position of every 8-byte word,
/// so that bytes landing at the wrong offset (or a page of another transfer) are caught.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let w = (i as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(seed.wrapping_mul(0xD1B5_4A32_D192_ED03))
            .rotate_left(17)
            ^ seed;
        let b = w.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Asserts `got == want` byte for byte, naming the first difference (not dumping megabytes).
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} of {}: got {:#04x}, want {:#04x}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// Asserts every byte of `buf` is `v`.
pub fn assert_all(buf: &[u8], v: u8, what: &str) {
    if let Some(i) = buf.iter().position(|&b| b != v) {
        panic!("{what}: byte {i} is {:#04x}, not {v:#04x}", buf[i]);
    }
}

/// Runs `f` until it is true, polling every 20 ms for at most [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
