//! Application handles: [`Peer`] (a session with another node) and [`Channel`] (an ordered
//! stream of messages inside it).

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::oneshot;

use super::peer_state::{PeerShared, PeerState};
use super::rx::ReaderSlot;
use crate::class::{Class, Priority};
use crate::core::{ChannelStats, SessionStats};
use crate::error::{Error, Result};
use crate::frame::{MSG_ERROR, MSG_REQUEST, MSG_RESPONSE};
use crate::sliced_copy::{CopyPacer, SLICE_ONE_WORKER};

/// A session with another node. Cheap to clone; all clones are the same session.
///
/// The session survives transport reconnections: ordered channels resume with nothing lost and
/// nothing repeated. It dies when nothing is heard from the peer for `Config::peer_timeout`
/// (default 1 s), when either side closes it (or the peer's node closes: [`Node::close`]), or on
/// a protocol violation; every pending and later operation then fails with that cause.
///
/// Dropping every `Peer` handle of a session (and every [`Channel`] of it, which hold one) does
/// not end the session, but nobody can take the channels the peer opens any more: from then on
/// they are refused as they arrive, and the peer's operations on them fail at once with
/// [`Error::ChannelRefused`] instead of waiting for their deadlines. A handle the application
/// gets again ([`Node::peers`]) takes new channels again.
///
/// [`Node::close`]: crate::Node::close
/// [`Node::peers`]: crate::Node::peers
pub struct Peer {
    pub(crate) shared: Arc<PeerShared>,
    /// Whether this is an application handle (counted by the session; see `PeerShared`), not
    /// one of the node's own tasks'.
    app: bool,
}

impl Clone for Peer {
    fn clone(&self) -> Self {
        if self.app {
            self.shared.app_handle_added();
        }
        Peer {
            shared: self.shared.clone(),
            app: self.app,
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.app {
            self.shared.app_handle_dropped();
        }
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("name", &self.shared.remote_name)
            .field("session", &self.shared.session_id)
            .finish()
    }
}

/// Counters and gauges of a peer session.
#[derive(Debug, Clone)]
pub struct PeerStats {
    /// The peer's node name.
    pub name: String,
    /// Address of the current or last connection.
    pub address: String,
    /// Whether a transport connection carries the session now.
    pub connected: bool,
    /// The session's error, if it is dead.
    pub error: Option<Error>,
    /// Protocol counters: RTT, congestion window, queue depth, credit stalls, retransmits…
    pub session: SessionStats,
}

impl Peer {
    /// An application handle of the session (it counts: see [`Peer`]'s drop semantics).
    pub(crate) fn app(shared: Arc<PeerShared>) -> Peer {
        shared.app_handle_added();
        Peer { shared, app: true }
    }

    /// A handle for the node's own tasks (it does not count as the application's).
    pub(crate) fn internal(shared: Arc<PeerShared>) -> Peer {
        Peer { shared, app: false }
    }

    /// The peer's node name.
    pub fn name(&self) -> &str {
        &self.shared.remote_name
    }

    /// The session id (random, chosen by the side that connected).
    pub fn session_id(&self) -> u64 {
        self.shared.session_id
    }

    /// Opens a channel of `class` with `priority` 0 (lowest) to 7. The peer sees it (through
    /// [`Peer::accept_channel`]) when the first message arrives.
    pub fn channel(&self, class: Class, priority: u8) -> Result<Channel> {
        let prio = Priority::new(priority).ok_or(Error::InvalidPriority(priority))?;
        let id = self.shared.state().session.open_channel(class, prio)?;
        Ok(Channel::new(self.clone(), id, class, prio, None, false))
    }

    /// As [`Peer::channel`], with a name: free-form UTF-8 of 1 to
    /// [`MAX_CHANNEL_NAME`](crate::frame::MAX_CHANNEL_NAME) (64) bytes, which the peer sees in
    /// [`Channel::name`] when it accepts the channel (it travels with the first message). An
    /// empty or longer name fails with [`Error::InvalidChannelName`], which says the limit.
    pub fn channel_named(&self, name: &str, class: Class, priority: u8) -> Result<Channel> {
        let prio = Priority::new(priority).ok_or(Error::InvalidPriority(priority))?;
        let id = self
            .shared
            .state()
            .session
            .open_named_channel(class, prio, name)?;
        Ok(Channel::new(
            self.clone(),
            id,
            class,
            prio,
            Some(name.into()),
            false,
        ))
    }

    /// Waits for the next channel the peer opened (with its name, if it has one: see
    /// [`Channel::name`]). Fails with the session's error once it dies.
    ///
    /// The channel returned is this side's to serve: when every handle of it is dropped (or
    /// [`Channel::refuse`] is called), the peer is told, and its pending and later operations
    /// on the channel fail at once with [`Error::ChannelRefused`] rather than at their
    /// deadlines. A channel not taken yet is refused the same way once the application holds
    /// no handle of the session (see [`Peer`]) or calls [`Peer::refuse_channels`].
    pub async fn accept_channel(&self) -> Result<Channel> {
        self.accept_with(false).await
    }

    /// Refuses every channel the peer opens from now on, and those not taken yet with
    /// [`Peer::accept_channel`], with `reason` (cut to
    /// [`MAX_REFUSAL_REASON`](crate::frame::MAX_REFUSAL_REASON) bytes): for a side that uses
    /// the session for its own channels and serves none, so that the peer's operations on the
    /// channels it opens fail at once with [`Error::ChannelRefused`] instead of waiting for
    /// their deadlines. [`Peer::accept_channel`] then only ends with the session.
    pub fn refuse_channels(&self, reason: &str) {
        self.shared.state().refuse_channels = Some(crate::frame::refusal_reason(reason).to_owned());
        self.shared.update_refusing();
    }

    /// Waits for the next system channel the peer opened (served by the node, not the
    /// application).
    pub(crate) async fn accept_system_channel(&self) -> Result<Channel> {
        self.accept_with(true).await
    }

    async fn accept_with(&self, system: bool) -> Result<Channel> {
        poll_fn(|cx| {
            let mut st = self.shared.state();
            let next = if system {
                st.session.accept_system_channel()
            } else {
                st.session.accept_channel()
            };
            if let Some(id) = next {
                let (class, priority) = st
                    .session
                    .channel_class(id)
                    .expect("accepted channel exists");
                let name = st.session.channel_name(id).map(Arc::from);
                drop(st);
                // An application's channel is its to serve: refused when its last handle is
                // dropped.
                let ch = Channel::new(self.clone(), id, class, priority, name, !system);
                return Poll::Ready(Ok(ch));
            }
            if let Some(e) = st.session.dead() {
                return Poll::Ready(Err(e.clone()));
            }
            let slot = if system {
                &mut st.system_accept_waker
            } else {
                &mut st.accept_waker
            };
            *slot = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// This side's system channel for bulk transfers (a bulk-class channel, opened on first use).
    pub(crate) fn transfer_channel(&self) -> Result<Channel> {
        let mut st = self.shared.state();
        let id = match st.transfer_channel {
            Some(id) => id,
            None => {
                let id = st
                    .session
                    .open_system_channel(Class::Bulk, Priority::DEFAULT)?;
                st.transfer_channel = Some(id);
                id
            }
        };
        drop(st);
        Ok(Channel::new(
            self.clone(),
            id,
            Class::Bulk,
            Priority::DEFAULT,
            None,
            false,
        ))
    }

    /// Counters and gauges (RTT, window, queue depth, credit stalls, retransmits).
    pub fn stats(&self) -> PeerStats {
        let st = self.shared.state();
        PeerStats {
            name: self.shared.remote_name.clone(),
            address: st.connected_to.clone(),
            connected: st.session.is_connected(),
            error: st.session.dead().cloned(),
            session: st.session.stats(),
        }
    }

    /// The session's error if it is dead, `None` while it lives.
    pub fn error(&self) -> Option<Error> {
        self.shared.state().session.dead().cloned()
    }

    /// Closes the session: the peer is told (with `reason`), and every pending operation on both
    /// sides fails ([`Error::Closed`] here, [`Error::ClosedByPeer`] there). Messages still queued
    /// are not sent; use [`Channel::flush`] first to be sure they arrived.
    pub fn close(&self, reason: &str) {
        let mut st = self.shared.state();
        st.session.close(reason);
        st.kick();
    }

    /// Breaks the current transport connection, as a network failure would. The session then
    /// resumes on a new connection with nothing lost or repeated (the side that connected
    /// reconnects). Meant for tests and failure drills.
    pub fn drop_connection(&self) {
        let mut st = self.shared.state();
        st.kill_connection = true;
        st.wake_driver();
    }
}

/// A received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The body (zero-copy for messages that fit one chunk).
    pub body: Bytes,
    /// `Some(id)` when the message is a request to answer with [`Channel::respond`].
    pub request_id: Option<u64>,
}

/// A received message left in the chunks it travelled in ([`Channel::recv_parts`]): no copy is
/// made to join them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageParts {
    /// The body's chunks, in order: one for a message that fit one chunk, several for a
    /// fragmented one. Their concatenation is the body [`Channel::recv`] would have returned.
    pub parts: Vec<Bytes>,
    /// `Some(id)` when the message is a request to answer with [`Channel::respond`].
    pub request_id: Option<u64>,
}

impl MessageParts {
    /// The body's length in bytes.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.parts.iter().all(Bytes::is_empty)
    }

    /// Joins the chunks into one [`Message`] (one copy, none for a single chunk).
    pub fn into_message(self) -> Message {
        Message {
            body: crate::core::concat(self.parts),
            request_id: self.request_id,
        }
    }
}

/// An ordered, reliable stream of messages with a class and a priority (and, if its opener gave
/// one, a name), inside a peer session. Cheap to clone; clones share the channel.
///
/// Guarantees: messages sent on a channel are delivered to the peer's channel in the order sent,
/// exactly once, while the session lives (across reconnections). Channels are independent: a
/// slow reader on one never blocks another. Every queue is bounded: [`Channel::send`] waits when
/// the send queue is full, [`Channel::try_send`] fails with [`Error::WouldBlock`].
///
/// Dropping: a channel this side accepted ([`Peer::accept_channel`]) is refused when its last
/// handle here is dropped: messages queued here before (responses included) still go, then
/// the peer's pending and later operations on the channel fail with [`Error::ChannelRefused`]
/// within about a round trip, and what it still sends is acknowledged and discarded. Dropping
/// the handles of a channel this side opened changes nothing on the wire.
#[derive(Clone)]
pub struct Channel {
    /// Shared by the clones, so that a clone costs one reference count (a tool call, a
    /// transfer's block clones its channel) and the last one's drop is known.
    inner: Arc<ChannelInner>,
}

/// What a [`Channel`]'s handles share.
struct ChannelInner {
    peer: Peer,
    id: u32,
    class: Class,
    priority: Priority,
    name: Option<Arc<str>>,
    /// The application accepted it: refused when its last handle is dropped.
    accepted: bool,
}

/// Why a channel is refused when the application drops it.
const DROPPED: &str = "the application dropped the channel";

impl Drop for ChannelInner {
    fn drop(&mut self) {
        if !self.accepted {
            return;
        }
        let mut st = self.peer.shared.state();
        if st
            .session
            .refuse_channel(Instant::now(), self.id, DROPPED)
            .is_ok()
        {
            st.dispatch();
            st.kick();
        }
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.inner.id)
            .field("name", &self.inner.name)
            .field("class", &self.inner.class)
            .field("priority", &self.inner.priority)
            .finish()
    }
}

impl Channel {
    fn new(
        peer: Peer,
        id: u32,
        class: Class,
        priority: Priority,
        name: Option<Arc<str>>,
        accepted: bool,
    ) -> Channel {
        Channel {
            inner: Arc::new(ChannelInner {
                peer,
                id,
                class,
                priority,
                name,
                accepted,
            }),
        }
    }

    /// The channel's name: the one given to [`Peer::channel_named`], on both sides (the side
    /// that accepted the channel sees the name its opener gave); `None` for a channel opened
    /// with [`Peer::channel`].
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }

    /// Refuses this channel, which the peer opened: the peer's pending and later operations on
    /// it fail with [`Error::ChannelRefused`] carrying `reason` (cut to
    /// [`MAX_REFUSAL_REASON`](crate::frame::MAX_REFUSAL_REASON) bytes) within about a round
    /// trip, after the messages queued here before the refusal (responses included) have
    /// arrived. Unread messages here are discarded, later operations on this channel's handles
    /// fail with [`Error::ChannelRefused`] too, and the session and its other channels go on.
    /// Dropping every handle of an accepted channel does the same. Refusing again does
    /// nothing; a channel this side opened cannot be refused ([`Error::Config`]), and a dead
    /// session's error is returned as is.
    pub fn refuse(&self, reason: &str) -> Result<()> {
        let mut st = self.inner.peer.shared.state();
        st.session
            .refuse_channel(Instant::now(), self.inner.id, reason)?;
        st.dispatch();
        st.kick();
        Ok(())
    }
    /// The memory domain the current connection's one-sided operations reach, if it has them.
    pub(crate) fn connection_domain(&self) -> Option<u64> {
        self.inner.peer.shared.tx.one_sided().map(|o| o.domain())
    }

    /// The channel id within its session.
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// The channel's class.
    pub fn class(&self) -> Class {
        self.inner.class
    }

    /// The channel's priority within its class.
    pub fn priority(&self) -> Priority {
        self.inner.priority
    }

    /// The peer this channel leads to.
    pub fn peer(&self) -> &Peer {
        &self.inner.peer
    }

    /// Queues `items` (body, message flags, tag) together, all or none: nothing of another task
    /// lands between them. Without `cx`, a full queue is [`Error::WouldBlock`].
    fn enqueue(
        &self,
        cx: Option<&mut std::task::Context<'_>>,
        items: &[(&Bytes, u8, u64)],
    ) -> Poll<Result<()>> {
        let mut st = self.inner.peer.shared.state();
        let len = items.iter().map(|i| i.0.len()).sum();
        match st
            .session
            .poll_capacity_for(self.inner.id, len, items.len())
        {
            Err(e) => Poll::Ready(Err(e)),
            Ok(true) => {
                let now = Instant::now();
                let mut r = Ok(());
                for (body, flags, tag) in items {
                    r = st
                        .session
                        .send(now, self.inner.id, Bytes::clone(body), *flags, *tag);
                    if r.is_err() {
                        break;
                    }
                }
                st.kick_at(now);
                Poll::Ready(r)
            }
            Ok(false) => match cx {
                Some(cx) => {
                    st.send_wakers.register(self.inner.id, cx.waker());
                    Poll::Pending
                }
                None => Poll::Ready(Err(Error::WouldBlock)),
            },
        }
    }

    async fn send_with(&self, body: Bytes, msg_flags: u8, tag: u64) -> Result<()> {
        poll_fn(|cx| self.enqueue(Some(cx), &[(&body, msg_flags, tag)])).await
    }

    /// Queues `body` for sending, waiting while the channel's send queue is full.
    ///
    /// Returns once the message is queued (not when it arrived: use [`Channel::flush`] for that).
    /// A queued message is delivered unless the session dies, in which case every operation on
    /// the session fails with the cause, or the peer refuses the channel (then this and every
    /// later operation on the channel fails with [`Error::ChannelRefused`]). Fails at once with
    /// [`Error::MessageTooLarge`] above `Config::max_message`.
    pub async fn send(&self, body: impl Into<Bytes>) -> Result<()> {
        self.send_with(body.into(), 0, 0).await
    }

    /// Queues `body` without waiting: [`Error::WouldBlock`] when the send queue is full (nothing
    /// is queued then).
    pub fn try_send(&self, body: impl Into<Bytes>) -> Result<()> {
        match self.enqueue(None, &[(&body.into(), 0, 0)]) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(Error::WouldBlock),
        }
    }

    /// Waits for the next message, in order. Fails with the session's error once it is dead and
    /// nothing is left to read, and with [`Error::ChannelRefused`] once the channel was refused
    /// and the messages that came before the refusal were read.
    ///
    /// While it waits, the task reads the peer's connection itself (the transport wakes it
    /// directly, with no driver task in between), so a message reaches it without a task
    /// switch. Cancel-safe: dropping the future loses no message, and hands any read it was
    /// woken for back to the peer's driver.
    ///
    /// Cooperative: each message taken spends one unit of tokio's task budget, so a task that
    /// drains a busy channel in a loop yields its worker to other tasks regularly, as it would
    /// on tokio's own channels. A fragmented message of more than 1 MiB (32 KiB on a runtime
    /// with one worker) is joined into one buffer that much at a time, yielding between slices:
    /// joining a 64 MiB message in one go would hold the worker, and every coordination message
    /// waiting for it, for milliseconds.
    /// A receive dropped in the middle of a join puts the message back for the next `recv` (or
    /// `try_recv`) on the channel; with several tasks receiving on clones of one channel, that
    /// message may then come after one another task took meanwhile.
    pub async fn recv(&self) -> Result<Message> {
        let m = self.recv_unassembled().await?;
        if m.parts.is_empty() || m.len() <= SLICE_ONE_WORKER {
            // In one piece, or below any slice: joined at once, without the pacer's cost.
            return Ok(message(m));
        }
        let pacer = CopyPacer::new(JOIN_SLICE);
        if m.len() <= pacer.slice() {
            return Ok(message(m));
        }
        let mut keep = KeepUnjoined {
            channel: self,
            msg: Some(m),
        };
        let body = join_yielding(keep.msg.as_ref().expect("held until joined"), pacer).await;
        // Joined: the message is the receiver's now.
        let mut m = keep.msg.take().expect("held until joined");
        m.parts.clear();
        m.body = body;
        Ok(message(m))
    }

    /// As [`Channel::recv`], but a fragmented message comes in the chunks it travelled in, with
    /// no copy to join them: for a consumer that writes the bytes somewhere anyway (a KV-cache
    /// block into its pages, a file, a hash), this saves a copy of every byte, and the time a
    /// worker would spend on it. Ordering, delivery and failure guarantees are those of
    /// [`Channel::recv`]; cancel-safe: dropping the future loses no message.
    pub async fn recv_parts(&self) -> Result<MessageParts> {
        let mut m = self.recv_unassembled().await?;
        let parts = if m.parts.is_empty() {
            vec![std::mem::take(&mut m.body)]
        } else {
            std::mem::take(&mut m.parts)
        };
        Ok(MessageParts {
            parts,
            request_id: request_id(&m),
        })
    }

    /// As [`Channel::recv`], leaving a fragmented message in its pieces (the fabric's own bulk
    /// service copies them straight into a region).
    pub(crate) async fn recv_unassembled(&self) -> Result<crate::core::Delivered> {
        let shared = &*self.inner.peer.shared;
        let take = |st: &mut PeerState| -> Option<Result<crate::core::Delivered>> {
            // A message a dropped `recv` put back comes before the session's next one.
            if let Some(m) = st.take_unjoined(self.inner.id) {
                return Some(Ok(m));
            }
            if let Some(m) = st.session.recv_unassembled(self.inner.id) {
                if st.session.has_urgent_output() {
                    st.kick();
                }
                return Some(Ok(m));
            }
            st.session.channel_error(self.inner.id).map(Err)
        };
        // While it waits, this task reads the connection itself (see `rx.rs`).
        let mut reader = ReaderSlot::new(&shared.rx_wake);
        poll_fn(|cx| {
            // Out of budget: yield (tokio wakes the task at once); the budget is given back
            // unless a message was taken.
            let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
            {
                let mut st = shared.state();
                if let Some(r) = take(&mut st) {
                    coop.made_progress();
                    return Poll::Ready(r);
                }
                st.recv_wakers.unregister(self.inner.id, cx.waker());
            }
            reader.register(self.inner.class as u8, cx.waker());
            shared.read_inline(self.inner.id, self.inner.class);
            let mut st = shared.state();
            if let Some(r) = take(&mut st) {
                coop.made_progress();
                return Poll::Ready(r);
            }
            st.recv_wakers.register(self.inner.id, cx.waker());
            st.idle();
            Poll::Pending
        })
        .await
    }

    /// The next message if one is ready.
    pub fn try_recv(&self) -> Result<Option<Message>> {
        let mut st = self.inner.peer.shared.state();
        if let Some(m) = st.take_unjoined(self.inner.id) {
            drop(st);
            return Ok(Some(message(m)));
        }
        if let Some(m) = st.session.recv_unassembled(self.inner.id) {
            st.kick();
            drop(st);
            return Ok(Some(message(m)));
        }
        match st.session.channel_error(self.inner.id) {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Waits until every message queued so far on this channel has been acknowledged by the peer
    /// (received by its node, in order). Fails with the session's error if it dies first, and
    /// with [`Error::ChannelRefused`] if the peer refused the channel before taking them all
    /// (what it had not taken was dropped).
    pub async fn flush(&self) -> Result<()> {
        poll_fn(|cx| {
            let mut st = self.inner.peer.shared.state();
            match st.session.want_flush(self.inner.id) {
                Ok(true) => Poll::Ready(Ok(())),
                Ok(false) => {
                    st.flush_wakers.register(self.inner.id, cx.waker());
                    Poll::Pending
                }
                Err(e) => Poll::Ready(Err(e)),
            }
        })
        .await
    }

    /// Sends a request and waits for its response, at most `deadline`.
    ///
    /// Fails with [`Error::DeadlineExceeded`] when the deadline passes first (a late response is
    /// discarded), [`Error::Remote`] when the peer's handler reports a failure, or the session's
    /// error if it dies. Dropping the future cancels the wait. Requests on one channel are sent in
    /// order; responses may come back in any order.
    ///
    /// Fails fast when nobody serves the channel: if the peer's application dropped the channel
    /// (or never took it because it dropped every handle of the session, or refused it), the
    /// request fails with [`Error::ChannelRefused`] within about a round trip, not at its
    /// deadline; a response the peer queued before refusing still arrives first. A slow service
    /// is the only thing left that looks like [`Error::DeadlineExceeded`].
    pub async fn request(&self, body: impl Into<Bytes>, deadline: Duration) -> Result<Bytes> {
        let start = Instant::now();
        let result =
            match tokio::time::timeout(deadline, self.request_with_head(None, body.into())).await {
                Ok(r) => r,
                Err(_) => Err(Error::DeadlineExceeded),
            };
        if result.is_ok()
            && self
                .inner
                .peer
                .shared
                .state()
                .session
                .config()
                .channel_histograms
        {
            let us = start.elapsed().as_micros() as u64;
            let mut st = self.inner.peer.shared.state();
            st.request_rtt
                .entry(self.inner.id)
                .or_insert_with(|| {
                    Box::new(
                        Histogram::new_with_bounds(1, 100_000_000, 2)
                            .expect("static histogram bounds are valid"),
                    )
                })
                .saturating_record(us.max(1));
        }
        result
    }

    /// Queues `body` as a request, in order with the channel's messages (waiting for room as
    /// [`Channel::send`] does), and returns its response to await: for a caller that must keep
    /// a request in its place among the sends that follow it without waiting for the answer
    /// first (a proxy such as the sidecar). Fails as `send` does; the response fails as
    /// [`Channel::request`]'s does. Dropping the [`PendingResponse`] forgets the request.
    pub async fn send_request(&self, body: impl Into<Bytes>) -> Result<PendingResponse> {
        let body = body.into();
        let (tag, rx) = self.response_slot();
        let pending = PendingResponse {
            slot: OwnedSlot {
                shared: self.inner.peer.shared.clone(),
                tag,
            },
            rx,
        };
        poll_fn(|cx| self.enqueue(Some(cx), &[(&body, MSG_REQUEST, tag)])).await?;
        Ok(pending)
    }

    /// A new request tag and where its response will come.
    fn response_slot(&self) -> (u64, oneshot::Receiver<Result<Bytes>>) {
        let (tx, rx) = oneshot::channel();
        let mut st = self.inner.peer.shared.state();
        let tag = st.next_tag;
        st.next_tag += 1;
        st.responses.insert(tag, (self.inner.id, tx));
        (tag, rx)
    }

    /// Sends `head` (if any) as a plain message immediately followed by `body` as a request, and
    /// waits for the response with no deadline of its own (the session's failure ends it).
    /// Dropping the future forgets the request.
    pub(crate) async fn request_with_head(
        &self,
        head: Option<Bytes>,
        body: Bytes,
    ) -> Result<Bytes> {
        let (tag, rx) = self.response_slot();
        // Forget the slot if this future is dropped.
        let _guard = SlotGuard {
            shared: &self.inner.peer.shared,
            tag,
        };
        poll_fn(|cx| match &head {
            Some(h) => self.enqueue(Some(cx), &[(h, 0, 0), (&body, MSG_REQUEST, tag)]),
            None => self.enqueue(Some(cx), &[(&body, MSG_REQUEST, tag)]),
        })
        .await?;
        rx.await.unwrap_or(Err(Error::Cancelled))
    }

    /// Answers the request `req` (received on this channel) with `body`.
    pub async fn respond(&self, req: &Message, body: impl Into<Bytes>) -> Result<()> {
        let id = req.request_id.ok_or(Error::NotARequest)?;
        self.send_with(body.into(), MSG_RESPONSE, id).await
    }

    /// Answers the request `req` with a failure; the requester gets [`Error::Remote`] with
    /// `reason`.
    pub async fn respond_error(&self, req: &Message, reason: &str) -> Result<()> {
        let id = req.request_id.ok_or(Error::NotARequest)?;
        self.send_with(
            Bytes::copy_from_slice(reason.as_bytes()),
            MSG_RESPONSE | MSG_ERROR,
            id,
        )
        .await
    }

    /// A snapshot of the channel's counters and latency histograms.
    pub fn stats(&self) -> Option<ChannelSnapshot> {
        let st = self.inner.peer.shared.state();
        let stats = st.session.channel_stats(self.inner.id)?;
        Some(ChannelSnapshot {
            stats,
            request_rtt_us: st.request_rtt.get(&self.inner.id).map(|h| (**h).clone()),
        })
    }
}

/// Counters and latency histograms of one channel.
#[derive(Debug, Clone)]
pub struct ChannelSnapshot {
    /// Protocol counters and the queueing-delay histogram.
    pub stats: ChannelStats,
    /// Request round trips on this channel, microseconds, if any were made.
    pub request_rtt_us: Option<Histogram<u64>>,
}

/// Bytes [`Channel::recv`] copies while joining a fragmented message before it yields the
/// worker, on a runtime with more than one worker: about 100 µs of copying. Measured on `bench
/// --workload mixed` (1 MiB messages, two cores, two workers): 64 KiB slices cost a quarter of
/// the bulk rate; 1 MiB leaves such messages unsliced and bounds what a 64 MiB message holds a
/// worker for. With one worker the join goes 32 KiB at a time (`crate::sliced_copy`): the same bench
/// with its bulk consumer on `recv` gave `ratio_loaded_idle_p99` 1.87–2.01 and bulk 0.71–0.74
/// of solo, against 3.24–3.40 and 0.88–0.98 with 1 MiB messages joined in one go; a consumer
/// that wants the bulk rate takes [`Channel::recv_parts`], which joins nothing.
const JOIN_SLICE: usize = 1 << 20;

/// Joins `m`'s pieces into one buffer, paced by `pacer` (slices with the worker yielded
/// between them). `m` is only read, so a dropped join loses nothing.
async fn join_yielding(m: &crate::core::Delivered, mut pacer: CopyPacer) -> Bytes {
    let mut buf = bytes::BytesMut::with_capacity(m.len());
    for piece in m.pieces() {
        for slice in piece.chunks(pacer.slice()) {
            pacer.before(slice.len()).await;
            buf.extend_from_slice(slice);
        }
    }
    buf.freeze()
}

/// Holds a message while [`Channel::recv`] joins it; if the receive is dropped first, the
/// message goes back to the channel for the next receive.
struct KeepUnjoined<'a> {
    channel: &'a Channel,
    /// `None` once the join is done.
    msg: Option<crate::core::Delivered>,
}

impl Drop for KeepUnjoined<'_> {
    fn drop(&mut self) {
        if let Some(msg) = self.msg.take() {
            self.channel
                .inner
                .peer
                .shared
                .state()
                .put_back_unjoined(self.channel.inner.id, msg);
        }
    }
}

/// Joins a fragmented message (outside the session's lock) and wraps it for the application.
fn message(mut m: crate::core::Delivered) -> Message {
    m.assemble();
    Message {
        request_id: request_id(&m),
        body: m.body,
    }
}

/// `Some(id)` when `m` is a request (its tag is the id to answer with).
fn request_id(m: &crate::core::Delivered) -> Option<u64> {
    (m.msg_flags & MSG_REQUEST != 0).then_some(m.tag)
}

/// The response of a request queued with [`Channel::send_request`].
#[derive(Debug)]
pub struct PendingResponse {
    slot: OwnedSlot,
    rx: oneshot::Receiver<Result<Bytes>>,
}

impl PendingResponse {
    /// Waits up to `deadline` for the response: its body, or the error
    /// [`Channel::request`] would give ([`Error::DeadlineExceeded`], [`Error::Remote`]…).
    pub async fn wait(self, deadline: Duration) -> Result<Bytes> {
        let PendingResponse { slot, rx } = self;
        let r = match tokio::time::timeout(deadline, rx).await {
            Ok(r) => r.unwrap_or(Err(Error::Cancelled)),
            Err(_) => Err(Error::DeadlineExceeded),
        };
        drop(slot);
        r
    }
}

/// Forgets a response slot when dropped (a [`PendingResponse`] not awaited to the end).
struct OwnedSlot {
    shared: Arc<PeerShared>,
    tag: u64,
}

impl std::fmt::Debug for OwnedSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedSlot").field("tag", &self.tag).finish()
    }
}

impl Drop for OwnedSlot {
    fn drop(&mut self) {
        self.shared.state().responses.remove(&self.tag);
    }
}

struct SlotGuard<'a> {
    shared: &'a PeerShared,
    tag: u64,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.shared.state().responses.remove(&self.tag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_join_lets_other_tasks_run_on_a_one_worker_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let saw = rt.block_on(async {
            // A 1 MiB message in 256 KiB chunks, as it comes off the wire: unsliced with more
            // workers (`JOIN_SLICE`), in 32 KiB slices with one.
            let parts: Vec<Bytes> = (0..4u8).map(|i| Bytes::from(vec![i; 256 << 10])).collect();
            let m = crate::core::Delivered {
                body: Bytes::new(),
                tag: 0,
                msg_flags: 0,
                credit: 0,
                parts: parts.clone(),
            };
            let (body, saw) = crate::sliced_copy::beside_another_task(join_yielding(
                &m,
                CopyPacer::new(JOIN_SLICE),
            ))
            .await;
            assert!(body == parts.concat(), "joined bytes differ");
            saw
        });
        assert!(saw, "the join held the only worker from start to end");
    }
}
