//! The session state machine: everything between two nodes, with no sockets, threads or clock.
//!
//! Drive it with `handle_frame(now, …)`, `handle_timeout(now)`, `connected` and
//! `connection_lost`; drain it with [`Session::poll_transmit`], [`Session::poll_event`] and
//! [`Session::poll_timeout`]. The application side calls [`Session::open_channel`],
//! [`Session::send`] and [`Session::recv`].
//!
//! Guarantees, per channel and direction: messages are delivered in the order they were sent,
//! each exactly once, while the session lives — across reconnections too, because every chunk
//! is kept until the peer acknowledges it and is sent again on the new connection, and the
//! receiver drops sequence numbers it already has. A session that dies fails every pending
//! operation with the cause.
//!
//! # Layout
//!
//! This file holds the public types, the [`Session`] struct and its constructor, and the
//! application side: channels, sending and receiving messages, closing, connection events,
//! events and counters. The protocol engine is split by concern, each file an `impl Session`
//! block on the same struct:
//!
//! - `recv.rs`: frames from the peer ([`Session::handle_frame`]): acknowledgements and credit,
//!   data, reordering and reassembly, and the acks they make owed;
//! - `send.rs`: frames to the peer ([`Session::poll_transmit`]): control frames,
//!   retransmissions, new chunks by priority within the congestion window, acks, and the
//!   timestamps every frame carries;
//! - `timers.rs`: [`Session::handle_timeout`] and [`Session::poll_timeout`]: peer timeout,
//!   keepalive, retransmission timeout with backoff, and credit probes;
//! - `refusal.rs`: refusing a channel the peer opened ([`Session::refuse_channel`],
//!   [`Session::refuse_new_channels`]), and what a refusal from the peer tears down.
//!
//! Imports: the children use this file (`super::`) and the rest of the crate's sans-IO
//! layers (`core`, `frame`, `class`, `config`, `error`); `recv.rs` and `timers.rs` also call
//! helpers of `send.rs` (timestamps, acks on outgoing frames, the ready list, queueing chunks
//! again), while `send.rs` calls neither; `recv.rs` calls `refusal.rs` (a channel is refused as
//! it arrives, a refusal arrives), which calls only `send.rs`'s ready list.
//!
//! # Names and refusals on the wire
//!
//! A named channel's name rides in front of its first chunk ([`crate::frame::MSG_NAMED`]); the
//! receiver offers a channel to the application once that chunk is in, in order, so the name is
//! known when the channel is accepted. A refusal is a message ([`crate::frame::MSG_REFUSE`],
//! the reason as its body) that the refusing side queues behind what it already queued on the
//! channel: it travels in the channel's order, on its lane and stream, and is retransmitted
//! and resumed like any chunk, so responses sent before it arrive before it, and a lost
//! refusal is sent again by the retransmission timer with no timer of its own. The refusing
//! side acknowledges and discards what still arrives on the channel. This file imports nothing from its children (it only
//! calls their methods). Nothing here touches a socket, a thread or a clock: time is an argument.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::channel_state::{Chan, Delivered, OutMsg};
use super::congestion::{CongestionWindow, RttEstimator};
use super::id_map::{id_map, IdMap};
use super::scheduler::Scheduler;
use crate::class::{Class, Priority};
use crate::config::{Config, PerClass};
use crate::error::Error;
use crate::frame::{check_channel_name, name_prefix, Header, Kind, OutFrame};

mod recv;
mod refusal;
mod send;
mod timers;

/// Which end of the session this is. Channel ids opened by the initiator are even, by the
/// acceptor odd, so both sides can open channels without coordination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that connected.
    Initiator,
    /// The side that accepted.
    Acceptor,
}

/// What the peer told us in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerParams {
    /// The peer's receive window per class: our initial credit on each channel.
    pub recv_window: PerClass<u32>,
}

/// Something the application should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer opened a channel; [`Session::accept_channel`] returns it.
    ChannelOpened(u32),
    /// The peer opened a system channel; [`Session::accept_system_channel`] returns it.
    SystemChannelOpened(u32),
    /// A channel that had nothing to read now has a message.
    Readable(u32),
    /// A channel whose send queue was full has room again.
    Writable(u32),
    /// Everything sent on the channel was acknowledged (after [`Session::want_flush`]).
    Flushed(u32),
    /// The channel was refused, by the peer (a refusal arrived, after every message sent
    /// before it) or by this side ([`Session::refuse_channel`]): pending operations on it fail
    /// with [`Error::ChannelRefused`] (see [`Session::channel_error`]).
    ChannelRefused {
        /// The channel.
        channel: u32,
        /// The reason.
        reason: String,
    },
    /// A response to the request with this tag arrived.
    Response {
        /// Channel it arrived on.
        channel: u32,
        /// Request id.
        tag: u64,
        /// Body, or the handler's failure reason.
        result: Result<Bytes, String>,
    },
    /// The session is dead; every pending operation should fail with this error.
    Dead(Error),
}

/// Counters and gauges of a session.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionStats {
    /// Smoothed round-trip time.
    pub srtt: Option<Duration>,
    /// Smallest round-trip time seen recently.
    pub min_rtt: Option<Duration>,
    /// Congestion window in bytes.
    pub cwnd: u64,
    /// Bytes sent and not yet acknowledged.
    pub inflight: u64,
    /// Bytes queued in send queues and not yet sent.
    pub queued_bytes: u64,
    /// Times a channel had data but no credit from the peer.
    pub credit_stalls: u64,
    /// Chunks sent again (after a timeout or a reconnection).
    pub retransmits: u64,
    /// Frames sent.
    pub frames_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Bytes sent (headers included).
    pub bytes_sent: u64,
    /// Bytes received (headers included).
    pub bytes_received: u64,
    /// Open channels.
    pub channels: usize,
    /// Times the session resumed on a new connection.
    pub resumes: u64,
}

/// A snapshot of one channel.
#[derive(Debug, Clone)]
pub struct ChannelStats {
    /// Class.
    pub class: Class,
    /// Priority.
    pub priority: Priority,
    /// Messages sent (fully handed to the transport).
    pub messages_sent: u64,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Messages received.
    pub messages_received: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Messages waiting in the send queue.
    pub queued_messages: usize,
    /// Bytes waiting in the send queue.
    pub queued_bytes: usize,
    /// Messages received and not yet read.
    pub unread_messages: usize,
    /// Times the channel had data but no credit.
    pub credit_stalls: u64,
    /// Queueing delay (send to first chunk on the wire), microseconds, if recorded.
    pub queue_delay_us: Option<hdrhistogram::Histogram<u64>>,
}

#[derive(Debug)]
enum State {
    Open,
    /// A Close frame is queued; the session dies once it is sent.
    Closing,
    Dead(Error),
}

/// The error of an operation on channel `ch`, refused with `reason`.
fn refused(ch: u32, reason: &str) -> Error {
    Error::ChannelRefused {
        channel: ch,
        reason: reason.to_owned(),
    }
}

/// Channel ids with this bit set are system channels: opened by the fabric itself (bulk
/// transfers between regions), served by the node, never offered to the application.
pub const SYSTEM_CHANNEL: u32 = 1 << 31;

/// The per-peer protocol state machine. See the module docs.
#[derive(Debug)]
pub struct Session {
    cfg: Config,
    role: Role,
    reliable: bool,
    peer: PeerParams,
    epoch: Instant,
    channels: IdMap<Chan>,
    next_local: u32,
    next_system: u32,
    accept_queue: VecDeque<u32>,
    system_accept_queue: VecDeque<u32>,
    /// Channels the peer opens are refused as they arrive, with this reason (see
    /// [`Session::refuse_new_channels`]).
    refuse_new: Option<String>,
    sched: Scheduler,
    /// Chunks to send again (channel, sequence), each channel's in order: of channels of every
    /// class but bulk, which go first...
    retx: VecDeque<(u32, u64)>,
    /// ...and of bulk channels, which wait, as new bulk chunks do, while bulk may not go.
    retx_bulk: VecDeque<(u32, u64)>,
    ack_queue: VecDeque<u32>,
    ack_deadline: Option<Instant>,
    /// Channels owing the peer an ack; when the last one's ack rides on data, the ack timer
    /// is disarmed (an armed timer would wake the driver for nothing).
    acks_owed: usize,
    ack_urgent: bool,
    control: VecDeque<OutFrame>,
    events: VecDeque<Event>,
    rtt: RttEstimator,
    cwnd: CongestionWindow,
    inflight: u64,
    queued_bytes: u64,
    last_rx: Instant,
    last_ping: Instant,
    last_rx_ts: u32,
    last_rx_at: Instant,
    progress_at: Instant,
    /// A channel ran out of credit with data queued (unreliable transports only: a credit
    /// update can be lost, so a stalled sender probes the receiver on the retransmission timer).
    credit_probe: bool,
    /// Retransmission timeouts in a row without progress: each doubles the next timeout.
    rto_backoff: u32,
    connected: bool,
    state: State,
    ping_seq: u64,
    stats: SessionStats,
    /// Acceptor: the HelloAck last sent, repeated if the Hello arrives again.
    handshake_reply: Option<OutFrame>,
}

impl Session {
    /// A new session, connected, after a handshake that told us `peer`.
    pub fn new(role: Role, cfg: Config, peer: PeerParams, reliable: bool, now: Instant) -> Session {
        let sched = Scheduler::new(cfg.priorities, cfg.starvation_bound);
        let cwnd = CongestionWindow::new(cfg.congestion.clone());
        Session {
            role,
            reliable,
            peer,
            epoch: now,
            channels: id_map(),
            next_local: match role {
                Role::Initiator => 0,
                Role::Acceptor => 1,
            },
            next_system: SYSTEM_CHANNEL
                | match role {
                    Role::Initiator => 0,
                    Role::Acceptor => 1,
                },
            accept_queue: VecDeque::new(),
            system_accept_queue: VecDeque::new(),
            refuse_new: None,
            sched,
            retx: VecDeque::new(),
            retx_bulk: VecDeque::new(),
            ack_queue: VecDeque::new(),
            ack_deadline: None,
            acks_owed: 0,
            ack_urgent: false,
            control: VecDeque::new(),
            events: VecDeque::new(),
            rtt: RttEstimator::new(),
            cwnd,
            inflight: 0,
            queued_bytes: 0,
            last_rx: now,
            last_ping: now,
            last_rx_ts: 0,
            last_rx_at: now,
            progress_at: now,
            credit_probe: false,
            rto_backoff: 0,
            connected: true,
            state: State::Open,
            ping_seq: 0,
            stats: SessionStats::default(),
            handshake_reply: None,
            cfg,
        }
    }

    /// This session's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The error the session died of, if it is dead.
    pub fn dead(&self) -> Option<&Error> {
        match &self.state {
            State::Dead(e) => Some(e),
            _ => None,
        }
    }

    fn check_open(&self) -> Result<(), Error> {
        match &self.state {
            State::Open => Ok(()),
            State::Closing => Err(Error::Closed),
            State::Dead(e) => Err(e.clone()),
        }
    }

    fn is_local(&self, id: u32) -> bool {
        let parity = match self.role {
            Role::Initiator => 0,
            Role::Acceptor => 1,
        };
        id % 2 == parity
    }

    // ----------------------------------------------------------------- application side

    /// Opens a channel of `class` and `priority`. The peer learns of it with its first message.
    pub fn open_channel(&mut self, class: Class, priority: Priority) -> Result<u32, Error> {
        self.open(class, priority, false)
    }

    /// As [`Session::open_channel`], with a name the peer sees when it accepts the channel
    /// ([`Session::channel_name`]): 1 to [`MAX_CHANNEL_NAME`](crate::frame::MAX_CHANNEL_NAME)
    /// bytes, else [`Error::InvalidChannelName`]. It travels in front of the channel's first
    /// chunk.
    pub fn open_named_channel(
        &mut self,
        class: Class,
        priority: Priority,
        name: &str,
    ) -> Result<u32, Error> {
        check_channel_name(name).map_err(Error::InvalidChannelName)?;
        let id = self.open(class, priority, false)?;
        let c = self.channels.get_mut(&id).expect("just opened");
        c.name = Some(name.to_owned());
        c.name_prefix = Some(name_prefix(name));
        Ok(id)
    }

    /// The channel's name: the one given to [`Session::open_named_channel`] on the side that
    /// opened it, the one it carried on the side that accepted it; `None` for an unnamed
    /// channel.
    pub fn channel_name(&self, ch: u32) -> Option<&str> {
        self.channels.get(&ch)?.name.as_deref()
    }

    /// Opens a system channel (see [`SYSTEM_CHANNEL`]); the peer's node takes it with
    /// [`Session::accept_system_channel`].
    pub fn open_system_channel(&mut self, class: Class, priority: Priority) -> Result<u32, Error> {
        self.open(class, priority, true)
    }

    fn open(&mut self, class: Class, priority: Priority, system: bool) -> Result<u32, Error> {
        self.check_open()?;
        let full = Error::TooManyChannels {
            max: self.cfg.max_channels,
        };
        if self.channels.len() >= self.cfg.max_channels {
            return Err(full);
        }
        let counter = if system {
            &mut self.next_system
        } else {
            &mut self.next_local
        };
        let id = *counter;
        let next = counter.checked_add(2).ok_or(full.clone())?;
        if (next & SYSTEM_CHANNEL != 0) != system {
            return Err(full);
        }
        *counter = next;
        let chan = Chan::new(
            class,
            priority,
            u64::from(self.cfg.recv_window.get(class)),
            u64::from(self.peer.recv_window.get(class)),
        );
        self.channels.insert(id, chan);
        Ok(id)
    }

    /// The next channel the peer opened that the application has not taken yet.
    pub fn accept_channel(&mut self) -> Option<u32> {
        self.accept_queue.pop_front()
    }

    /// The next system channel the peer opened.
    pub fn accept_system_channel(&mut self) -> Option<u32> {
        self.system_accept_queue.pop_front()
    }

    /// Class and priority of an open channel.
    pub fn channel_class(&self, ch: u32) -> Option<(Class, Priority)> {
        self.channels.get(&ch).map(|c| (c.class, c.prio))
    }

    /// Queues a message. Ordering: after every message queued earlier on this channel.
    /// Fails with [`Error::WouldBlock`] when the channel's send queue is full (nothing queued),
    /// [`Error::MessageTooLarge`] over the limit, [`Error::ChannelRefused`] once the channel was
    /// refused (by either side), or the session's error when it is dead.
    pub fn send(
        &mut self,
        now: Instant,
        ch: u32,
        body: Bytes,
        msg_flags: u8,
        tag: u64,
    ) -> Result<(), Error> {
        self.check_open()?;
        if body.len() > self.cfg.max_message {
            return Err(Error::MessageTooLarge {
                len: body.len(),
                max: self.cfg.max_message,
            });
        }
        let limit_msgs = self.cfg.send_queue_messages;
        let c = self
            .channels
            .get_mut(&ch)
            .ok_or(Error::UnknownChannel(ch))?;
        if let Some(reason) = c.refusal() {
            return Err(refused(ch, reason));
        }
        let limit_bytes = self.cfg.send_queue_bytes.get(c.class);
        if !c.queue.is_empty()
            && (c.queued_bytes + body.len() > limit_bytes || c.queue.len() >= limit_msgs)
        {
            c.send_blocked = true;
            return Err(Error::WouldBlock);
        }
        c.queued_bytes += body.len();
        self.queued_bytes += body.len() as u64;
        c.queue.push_back(OutMsg {
            body,
            tag,
            msg_flags,
            enqueued: now,
        });
        self.sched.on_message_queued(ch);
        self.update_ready(ch);
        Ok(())
    }

    /// Whether a message of `len` bytes would be accepted by [`Session::send`] now. When it
    /// would not, an [`Event::Writable`] follows once the queue has room.
    pub fn poll_capacity(&mut self, ch: u32, len: usize) -> Result<bool, Error> {
        self.poll_capacity_for(ch, len, 1)
    }

    /// As [`Session::poll_capacity`], for `count` messages of `len` bytes in all, to be queued
    /// together.
    pub fn poll_capacity_for(&mut self, ch: u32, len: usize, count: usize) -> Result<bool, Error> {
        self.check_open()?;
        let limit_bytes = &self.cfg.send_queue_bytes;
        let limit_msgs = self.cfg.send_queue_messages;
        let Some(c) = self.channels.get_mut(&ch) else {
            return Err(Error::UnknownChannel(ch));
        };
        if let Some(reason) = c.refusal() {
            return Err(refused(ch, reason));
        }
        let limit_bytes = limit_bytes.get(c.class);
        let fits = c.queue.is_empty()
            || (c.queued_bytes + len <= limit_bytes && c.queue.len() + count <= limit_msgs);
        if !fits {
            c.send_blocked = true;
        }
        Ok(fits)
    }

    /// Asks for an [`Event::Flushed`] once everything queued on `ch` has been acknowledged.
    /// Returns `true` if that is already the case (no event follows then). Fails with
    /// [`Error::ChannelRefused`] once the peer refused the channel with messages of this side
    /// not taken (queued or unacknowledged: they were dropped).
    pub fn want_flush(&mut self, ch: u32) -> Result<bool, Error> {
        self.check_open()?;
        let c = self
            .channels
            .get_mut(&ch)
            .ok_or(Error::UnknownChannel(ch))?;
        if c.is_flushed() && !c.refusal_dropped {
            // (Also after a refusal that dropped nothing: everything arrived before it.)
            return Ok(true);
        }
        if let Some(reason) = c.refusal() {
            return Err(refused(ch, reason));
        }
        c.want_flush = true;
        Ok(false)
    }

    /// Takes the next message received on `ch`, in order, with its body joined. Taking it gives
    /// its bytes back to the peer as credit.
    pub fn recv(&mut self, ch: u32) -> Option<Delivered> {
        let mut m = self.recv_unassembled(ch)?;
        m.assemble();
        Some(m)
    }

    /// As [`Session::recv`], but a fragmented message's chunks are left for the caller to join
    /// with [`Delivered::assemble`] (after releasing any lock around the session).
    pub fn recv_unassembled(&mut self, ch: u32) -> Option<Delivered> {
        let c = self.channels.get_mut(&ch)?;
        let msg = c.delivered.pop_front()?;
        c.released += msg.credit;
        // The application has caught up: a message still arriving may take its bytes as credit
        // now (as `recv.rs` lets it when its chunks come to an empty queue). Without this, a
        // sender that ran out of credit mid-message while earlier messages waited unread
        // sends nothing more, so no chunk comes to release the credit: it waits for ever.
        if c.delivered.is_empty() {
            if let Some(p) = c.partial.as_mut() {
                c.released += p.release_rest();
            }
        }
        // Tell a sender that may be waiting for credit, without waiting for the ack timer.
        if c.credit_limit() - c.advertised >= c.window / 4 {
            Self::queue_ack(&mut self.ack_queue, &mut self.acks_owed, ch, c);
            self.ack_urgent = true;
        }
        Some(msg)
    }

    /// Whether a channel other than `ch` owes the peer an ack (a reply on `ch` would carry only
    /// `ch`'s).
    pub fn acks_owed_beyond(&self, ch: u32) -> bool {
        let own = self.channels.get(&ch).is_some_and(|c| c.ack_owed);
        self.acks_owed > usize::from(own)
    }

    /// Whether taking a message made something to send at once (a credit update the sender
    /// may be waiting for); when not, the caller need not look for frames to send.
    pub fn has_urgent_output(&self) -> bool {
        self.ack_urgent || !self.control.is_empty()
    }

    /// Whether `ch` has a message to read.
    pub fn readable(&self, ch: u32) -> bool {
        self.channels
            .get(&ch)
            .is_some_and(|c| !c.delivered.is_empty())
    }

    /// Closes the session: a Close frame with `reason` goes to the peer, then the session dies
    /// with [`Error::Closed`].
    pub fn close(&mut self, reason: &str) {
        if !matches!(self.state, State::Open) {
            return;
        }
        let mut h = Header::new(Kind::Close);
        let payload = Bytes::copy_from_slice(&reason.as_bytes()[..reason.len().min(1024)]);
        h.len = payload.len() as u32;
        self.control.push_back(OutFrame {
            header: h.encode(),
            payload,
        });
        self.state = State::Closing;
        if !self.connected {
            self.die(Error::Closed);
        }
    }

    /// Acceptor: the handshake answer sent on the current connection, repeated if the
    /// initiator's Hello arrives again (it repeats it on transports that may lose frames).
    pub fn set_handshake_reply(&mut self, reply: OutFrame) {
        self.handshake_reply = Some(reply);
    }

    /// Kills the session at once with `err` (the node shut down, the transport failed beyond
    /// repair, the peer refused to resume). Nothing more is sent.
    pub fn abort(&mut self, err: Error) {
        self.die(err);
    }

    // ----------------------------------------------------------------- connection events

    /// The transport connection broke. The session lives on until the peer timeout, waiting for
    /// [`Session::connected`].
    pub fn connection_lost(&mut self, _now: Instant) {
        self.connected = false;
        if matches!(self.state, State::Closing) {
            self.die(Error::Closed);
        }
    }

    /// A new connection carries the session (after a resume handshake). Every unacknowledged
    /// chunk is sent again; the peer drops what it already has.
    pub fn connected(&mut self, now: Instant) {
        if self.dead().is_some() {
            return;
        }
        self.connected = true;
        self.last_rx = now;
        self.stats.resumes += 1;
        self.rto_backoff = 0;
        self.queue_unacked_again();
        let mut ids: Vec<u32> = self.channels.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let c = self.channels.get_mut(&id).expect("id from keys");
            if c.expected_seq > 0 || c.released > 0 {
                c.ack_pending = true;
                Self::queue_ack(&mut self.ack_queue, &mut self.acks_owed, id, c);
            }
        }
        self.ack_urgent = true;
        self.progress_at = now;
    }

    /// Whether a transport connection currently carries the session.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn die(&mut self, err: Error) {
        if self.dead().is_some() {
            return;
        }
        self.state = State::Dead(err.clone());
        self.sched.clear();
        self.retx.clear();
        self.retx_bulk.clear();
        self.control.clear();
        self.ack_queue.clear();
        self.events.push_back(Event::Dead(err));
    }

    // ----------------------------------------------------------------- observation

    /// Counters and gauges.
    pub fn stats(&self) -> SessionStats {
        SessionStats {
            srtt: self.rtt.srtt(),
            min_rtt: self.rtt.min(),
            cwnd: self.cwnd.window(),
            inflight: self.inflight,
            queued_bytes: self.queued_bytes,
            channels: self.channels.len(),
            ..self.stats.clone()
        }
    }

    /// A snapshot of channel `ch`.
    pub fn channel_stats(&self, ch: u32) -> Option<ChannelStats> {
        let c = self.channels.get(&ch)?;
        Some(ChannelStats {
            class: c.class,
            priority: c.prio,
            messages_sent: c.counters.messages_sent,
            bytes_sent: c.counters.bytes_sent,
            messages_received: c.counters.messages_received,
            bytes_received: c.counters.bytes_received,
            queued_messages: c.queue.len(),
            queued_bytes: c.queued_bytes,
            unread_messages: c.delivered.len(),
            credit_stalls: c.counters.credit_stalls,
            queue_delay_us: c.counters.queue_delay.as_deref().cloned(),
        })
    }

    /// Bytes held for channel `ch` on the receive side (reorder buffer, partial message and
    /// unread messages): bounded by the window plus one message.
    pub fn buffered_bytes(&self, ch: u32) -> usize {
        self.channels.get(&ch).map_or(0, |c| {
            c.delivered.iter().map(Delivered::len).sum::<usize>()
                + c.partial
                    .as_ref()
                    .map_or(0, |p| p.chunks.iter().map(Bytes::len).sum())
                + c.reorder.values().map(|f| f.payload.len()).sum::<usize>()
        })
    }
}
