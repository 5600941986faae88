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

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::channel_state::{new_histogram, Chan, Delivered, OutMsg, Partial, Sent};
use super::congestion::{CongestionWindow, RttEstimator};
use super::id_map::{id_map, IdMap};
use super::scheduler::Scheduler;
use crate::class::{Class, Priority};
use crate::config::{Config, PerClass};
use crate::error::{Error, ProtocolError};
use crate::frame::{
    Frame, Header, Kind, OutFrame, FLAG_FIRST, FLAG_LAST, FLAG_RETRANSMIT, HEADER_LEN, MSG_ERROR,
    MSG_RESPONSE,
};

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

/// Channel ids with this bit set are system channels: opened by the fabric itself (bulk
/// transfers between regions), served by the node, never offered to the application.
pub const SYSTEM_CHANNEL: u32 = 1 << 31;

/// Largest gap tolerated in a channel's sequence on a lossy transport before it is a violation.
const MAX_REORDER: u64 = 4096;

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
    /// [`Error::MessageTooLarge`] over the limit, or the session's error when it is dead.
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
        let (limit_bytes, limit_msgs) = match self.channels.get(&ch) {
            Some(c) => (
                self.cfg.send_queue_bytes.get(c.class),
                self.cfg.send_queue_messages,
            ),
            None => return Err(Error::UnknownChannel(ch)),
        };
        let c = self.channels.get_mut(&ch).expect("checked");
        let fits = c.queue.is_empty()
            || (c.queued_bytes + len <= limit_bytes && c.queue.len() + count <= limit_msgs);
        if !fits {
            c.send_blocked = true;
        }
        Ok(fits)
    }

    /// Asks for an [`Event::Flushed`] once everything queued on `ch` has been acknowledged.
    /// Returns `true` if that is already the case (no event follows then).
    pub fn want_flush(&mut self, ch: u32) -> Result<bool, Error> {
        self.check_open()?;
        let c = self
            .channels
            .get_mut(&ch)
            .ok_or(Error::UnknownChannel(ch))?;
        if c.is_flushed() {
            return Ok(true);
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

    // ----------------------------------------------------------------- input

    /// Processes one frame from the peer. An error means the peer broke the protocol: the
    /// session is dead (the error is also reported as [`Event::Dead`]).
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) -> Result<(), Error> {
        self.check_open()?;
        self.last_rx = now;
        self.stats.frames_received += 1;
        self.stats.bytes_received += (HEADER_LEN + frame.payload.len()) as u64;
        let h = frame.header;
        if h.ts != 0 {
            self.last_rx_ts = h.ts;
            self.last_rx_at = now;
        }
        if h.ts_echo != 0 {
            let sample = self.now_ts(now).wrapping_sub(h.ts_echo);
            // Ignore nonsense (clock wrap, a peer echoing garbage).
            if sample < 10_000_000 {
                self.rtt
                    .on_sample(now, Duration::from_micros(u64::from(sample.max(1))));
            }
        }
        let res = match h.kind {
            Kind::Data => self.on_data(now, frame),
            Kind::Ack => self.on_ack_fields(now, h.channel, h.ack, h.credit, false),
            Kind::Ping => {
                let mut p = Header::new(Kind::Pong);
                p.seq = h.seq;
                self.control.push_back(OutFrame {
                    header: p.encode(),
                    payload: Bytes::new(),
                });
                Ok(())
            }
            Kind::Pong => Ok(()),
            Kind::Close => {
                let reason = String::from_utf8_lossy(&frame.payload).into_owned();
                self.die(Error::ClosedByPeer(reason));
                return Ok(());
            }
            // On a lossy transport the initiator repeats its Hello until answered: answer a
            // repeat of this session's Hello again, and ignore a repeated answer.
            Kind::Hello => match &self.handshake_reply {
                Some(reply)
                    if self.role == Role::Acceptor
                        && u64::from_le_bytes(
                            reply.header[48..56].try_into().expect("8 bytes"),
                        ) == h.tag =>
                {
                    self.control.push_back(reply.clone());
                    Ok(())
                }
                _ => Err(ProtocolError::UnexpectedFrame("handshake")),
            },
            Kind::HelloAck if self.role == Role::Initiator => Ok(()),
            Kind::HelloAck => Err(ProtocolError::UnexpectedFrame("handshake")),
        };
        if let Err(e) = res {
            let err = Error::Protocol(e);
            self.die(err.clone());
            return Err(err);
        }
        Ok(())
    }

    fn on_ack_fields(
        &mut self,
        now: Instant,
        ch: u32,
        ack: u64,
        credit: u64,
        implicit_open: bool,
    ) -> Result<(), ProtocolError> {
        let Some(c) = self.channels.get_mut(&ch) else {
            // An ack for a channel we never opened and the peer never sent on.
            return if implicit_open {
                Ok(())
            } else {
                Err(ProtocolError::UnknownChannel { channel: ch })
            };
        };
        if ack > c.next_seq {
            return Err(ProtocolError::AckBeyondSent {
                channel: ch,
                ack,
                sent: c.next_seq,
            });
        }
        let mut acked = 0u64;
        while c.unacked.front().is_some_and(|s| s.seq < ack) {
            let s = c.unacked.pop_front().expect("front checked");
            acked += (HEADER_LEN + s.payload.len()) as u64;
        }
        let mut wake_ready = false;
        if credit > c.peer_credit {
            c.peer_credit = credit;
            wake_ready = true;
            self.rto_backoff = 0;
        }
        if c.want_flush && c.is_flushed() {
            c.want_flush = false;
            self.events.push_back(Event::Flushed(ch));
        }
        if acked > 0 {
            self.rto_backoff = 0;
            self.inflight -= acked.min(self.inflight);
            self.progress_at = now;
            let chunk = u64::from(self.cfg.chunk_size.bulk);
            self.cwnd.on_ack(now, acked, &self.rtt, chunk);
        }
        if wake_ready {
            self.update_ready(ch);
        }
        Ok(())
    }

    fn on_data(&mut self, now: Instant, frame: Frame) -> Result<(), ProtocolError> {
        let h = frame.header;
        let id = h.channel;
        match self.channels.get(&id) {
            Some(c) if c.class != h.class => {
                return Err(ProtocolError::UnknownChannel { channel: id });
            }
            Some(_) => {}
            None => {
                if self.is_local(id) {
                    return Err(ProtocolError::UnknownChannel { channel: id });
                }
                if self.channels.len() >= self.cfg.max_channels {
                    return Err(ProtocolError::TooManyChannels {
                        max: self.cfg.max_channels,
                    });
                }
                let chan = Chan::new(
                    h.class,
                    h.priority,
                    u64::from(self.cfg.recv_window.get(h.class)),
                    u64::from(self.peer.recv_window.get(h.class)),
                );
                self.channels.insert(id, chan);
                if id & SYSTEM_CHANNEL != 0 {
                    self.system_accept_queue.push_back(id);
                    self.events.push_back(Event::SystemChannelOpened(id));
                } else {
                    self.accept_queue.push_back(id);
                    self.events.push_back(Event::ChannelOpened(id));
                }
            }
        }
        self.on_ack_fields(now, id, h.ack, h.credit, true)?;

        let c = self.channels.get_mut(&id).expect("inserted above");
        let end = h.offset.saturating_add(u64::from(h.len));
        if h.seq < c.expected_seq {
            // Already have it (a retransmission after resume or timeout): acknowledge again.
            c.ack_pending = true;
            Self::queue_ack(&mut self.ack_queue, &mut self.acks_owed, id, c);
            self.ack_urgent = true;
            return Ok(());
        }
        if end > c.credit_limit() {
            return Err(ProtocolError::CreditExceeded {
                channel: id,
                end,
                credit: c.credit_limit(),
            });
        }
        if h.seq > c.expected_seq {
            if self.reliable || h.seq - c.expected_seq > MAX_REORDER {
                return Err(ProtocolError::SequenceFromFuture {
                    channel: id,
                    seq: h.seq,
                    expected: c.expected_seq,
                });
            }
            c.reorder.entry(h.seq).or_insert(frame);
            c.ack_pending = true;
            Self::queue_ack(&mut self.ack_queue, &mut self.acks_owed, id, c);
            self.ack_urgent = true;
            return Ok(());
        }
        self.accept_in_order(now, id, frame)?;
        // Drain what the reorder buffer now makes contiguous.
        loop {
            let c = self.channels.get_mut(&id).expect("exists");
            let Some(next) = c.reorder.remove(&c.expected_seq) else {
                break;
            };
            self.accept_in_order(now, id, next)?;
        }
        let c = self.channels.get_mut(&id).expect("exists");
        c.reorder.retain(|&s, _| s >= c.expected_seq);
        Ok(())
    }

    fn accept_in_order(
        &mut self,
        now: Instant,
        id: u32,
        frame: Frame,
    ) -> Result<(), ProtocolError> {
        let max_message = self.cfg.max_message;
        let c = self.channels.get_mut(&id).expect("caller checked");
        let h = frame.header;
        if h.offset != c.expected_offset {
            return Err(ProtocolError::OffsetMismatch {
                channel: id,
                expected: c.expected_offset,
                got: h.offset,
            });
        }
        c.expected_seq += 1;
        c.expected_offset += u64::from(h.len);
        c.rx_since_ack += (HEADER_LEN + frame.payload.len()) as u64;
        c.ack_pending = true;
        let first = h.flags & FLAG_FIRST != 0;
        let last = h.flags & FLAG_LAST != 0;
        let len = frame.payload.len();
        if first && len > max_message {
            // (Continuations are checked as they add up, below.)
            return Err(ProtocolError::MessageTooLarge {
                channel: id,
                len,
                max: max_message,
            });
        }
        let delivered = match (first, c.partial.take()) {
            (true, Some(_)) => return Err(ProtocolError::BadFragment { channel: id }),
            (false, None) => return Err(ProtocolError::BadFragment { channel: id }),
            (true, None) if last => Some(Delivered {
                body: frame.payload,
                tag: h.tag,
                msg_flags: h.msg_flags,
                credit: len as u64,
                parts: Vec::new(),
            }),
            (true, None) => {
                c.partial = Some(Partial {
                    tag: h.tag,
                    msg_flags: h.msg_flags,
                    chunks: vec![frame.payload],
                    len,
                    prereleased: 0,
                });
                None
            }
            (false, Some(mut p)) => {
                p.len += len;
                p.chunks.push(frame.payload);
                if p.len > max_message {
                    return Err(ProtocolError::MessageTooLarge {
                        channel: id,
                        len: p.len,
                        max: max_message,
                    });
                }
                if last {
                    let credit = p.len as u64 - p.prereleased;
                    let (tag, msg_flags) = (p.tag, p.msg_flags);
                    Some(Delivered {
                        body: Bytes::new(),
                        tag,
                        msg_flags,
                        credit,
                        parts: p.chunks,
                    })
                } else {
                    c.partial = Some(p);
                    None
                }
            }
        };
        // Let a message larger than the window complete when the application keeps up.
        if let Some(p) = c.partial.as_mut() {
            if c.delivered.is_empty() {
                let give = p.len as u64 - p.prereleased;
                p.prereleased += give;
                c.released += give;
            }
        }
        if let Some(msg) = delivered {
            c.counters.messages_received += 1;
            c.counters.bytes_received += msg.len() as u64;
            if msg.msg_flags & MSG_RESPONSE != 0 {
                let mut msg = msg;
                msg.assemble();
                c.released += msg.credit;
                let result = if msg.msg_flags & MSG_ERROR != 0 {
                    Err(String::from_utf8_lossy(&msg.body).into_owned())
                } else {
                    Ok(msg.body)
                };
                self.events.push_back(Event::Response {
                    channel: id,
                    tag: msg.tag,
                    result,
                });
            } else {
                if c.delivered.is_empty() {
                    self.events.push_back(Event::Readable(id));
                }
                c.delivered.push_back(msg);
            }
        }
        Self::queue_ack(&mut self.ack_queue, &mut self.acks_owed, id, c);
        // Ack at least every half minimum congestion window: a sender whose window is smaller
        // than a quarter of our receive window would otherwise wait for the ack timer each round.
        let ack_every = (c.window / 4).min(self.cfg.congestion.min_window / 2);
        if c.rx_since_ack >= ack_every || c.credit_limit() - c.advertised >= c.window / 4 {
            self.ack_urgent = true;
        } else if self.ack_deadline.is_none() {
            self.ack_deadline = Some(now + self.cfg.ack_delay);
        }
        Ok(())
    }

    fn queue_ack(queue: &mut VecDeque<u32>, owed: &mut usize, id: u32, c: &mut Chan) {
        c.ack_pending = true;
        if !c.ack_owed {
            c.ack_owed = true;
            *owed += 1;
        }
        if !c.ack_queued {
            c.ack_queued = true;
            queue.push_back(id);
        }
    }

    // ----------------------------------------------------------------- timers

    /// Processes timers: peer timeout, keepalive, retransmission.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.dead().is_some() {
            return;
        }
        let silent = now.saturating_duration_since(self.last_rx);
        if silent >= self.cfg.peer_timeout {
            self.die(Error::PeerDead { silent_for: silent });
            return;
        }
        if self.connected
            && silent >= self.cfg.keepalive_interval
            && now.saturating_duration_since(self.last_ping) >= self.cfg.keepalive_interval
        {
            self.last_ping = now;
            self.ping_seq += 1;
            let mut p = Header::new(Kind::Ping);
            p.seq = self.ping_seq;
            self.control.push_back(OutFrame {
                header: p.encode(),
                payload: Bytes::new(),
            });
        }
        if let Some(deadline) = self.rto_deadline() {
            if now >= deadline {
                self.rto_backoff = (self.rto_backoff + 1).min(16);
            }
            if now >= deadline && self.inflight == 0 {
                // Only credit-stalled channels: probe them, without touching the window.
                self.progress_at = now;
                self.probe_credit(now);
            } else if now >= deadline {
                self.probe_credit(now);
                self.cwnd.on_timeout();
                self.progress_at = now;
                self.queue_unacked_again();
            }
        }
    }

    fn rto_deadline(&self) -> Option<Instant> {
        (!self.reliable
            && self.connected
            && (self.inflight > 0 || self.credit_probe)
            && self.retx.is_empty()
            && self.retx_bulk.is_empty())
        .then(|| self.progress_at + self.rto())
    }

    /// The retransmission timeout, doubled for each timeout in a row without progress (as
    /// RFC 6298 requires), up to a quarter of the peer timeout, so a partitioned or overloaded
    /// path is not flooded with retransmissions and a healed one recovers quickly.
    fn rto(&self) -> Duration {
        let base = self.rtt.rto(self.cfg.min_rto);
        let cap = (self.cfg.peer_timeout / 4).max(base);
        base.saturating_mul(1 << self.rto_backoff).min(cap)
    }

    /// Zero-window probe (as TCP's persist timer): a channel with data queued, no credit and
    /// nothing unacknowledged depends on a credit update that may have been lost. Its last chunk
    /// was acknowledged, so sending that sequence number again, with no payload, is a duplicate
    /// the receiver drops and answers with an ack carrying its current credit.
    fn probe_credit(&mut self, now: Instant) {
        let mut ids: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| !c.queue.is_empty() && !c.can_send())
            .map(|(&id, _)| id)
            .collect();
        self.credit_probe = !ids.is_empty();
        ids.sort_unstable();
        for id in ids {
            let c = &self.channels[&id];
            if !c.unacked.is_empty() || c.next_seq == 0 {
                continue; // the retransmission of unacked chunks brings the ack
            }
            let mut h = Header::new(Kind::Data);
            h.flags = FLAG_RETRANSMIT;
            h.class = c.class;
            h.priority = c.prio;
            h.channel = id;
            h.seq = c.next_seq - 1;
            h.offset = c.next_offset;
            self.fill_ack(now, id, &mut h);
            self.control.push_back(OutFrame {
                header: h.encode(),
                payload: Bytes::new(),
            });
        }
    }

    /// When [`Session::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.dead().is_some() {
            return None;
        }
        let mut t = self.last_rx + self.cfg.peer_timeout;
        if self.connected {
            let ka = self.last_rx.max(self.last_ping) + self.cfg.keepalive_interval;
            t = t.min(ka);
        }
        // Acks wait for a connection (`connected` sends them at once), so a passed ack deadline
        // must not hold the timer in the past while disconnected.
        let ack_deadline = self.ack_deadline.filter(|_| self.connected);
        for d in [ack_deadline, self.rto_deadline()].into_iter().flatten() {
            t = t.min(d);
        }
        Some(t)
    }

    // ----------------------------------------------------------------- output

    fn now_ts(&self, now: Instant) -> u32 {
        let us = now.saturating_duration_since(self.epoch).as_micros() as u32;
        us.max(1)
    }

    fn ts_echo(&self, now: Instant) -> u32 {
        if self.last_rx_ts == 0 {
            return 0;
        }
        let held = now.saturating_duration_since(self.last_rx_at).as_micros() as u32;
        self.last_rx_ts.wrapping_add(held).max(1)
    }

    /// The next frame to send, or `None` when there is nothing (or no connection). Order:
    /// control frames, retransmissions, new chunks by priority within the congestion window,
    /// then acknowledgements that could not ride on data.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<OutFrame> {
        self.poll_transmit_lane(now, true)
    }

    /// As [`Session::poll_transmit`], but with `bulk_ok` false no bulk data is taken (control
    /// frames, acks and other classes still are): for a transport whose bulk lane is backed up
    /// while its latency lane has room, so coordination never waits for bulk to drain.
    pub fn poll_transmit_lane(&mut self, now: Instant, bulk_ok: bool) -> Option<OutFrame> {
        if !self.connected || self.dead().is_some() {
            return None;
        }
        let out = self.next_frame(now, bulk_ok)?;
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += out.wire_len() as u64;
        Some(out)
    }

    fn next_frame(&mut self, now: Instant, bulk_ok: bool) -> Option<OutFrame> {
        if let Some(mut f) = self.control.pop_front() {
            if f.header[3] == Kind::Close as u8 {
                self.die(Error::Closed);
            }
            let ts = self.now_ts(now);
            f.header[56..60].copy_from_slice(&ts.to_le_bytes());
            return Some(f);
        }
        if matches!(self.state, State::Closing) {
            return None;
        }
        // Retransmissions (lossy transports and resumes) before new chunks: a channel's chunks
        // must reach the peer in order. Bulk ones wait while bulk may not go, as new bulk
        // chunks do; the others go now, not behind a backed-up bulk lane, and before their
        // channels' new chunks.
        while let Some((id, seq)) = self.retx.pop_front() {
            if let Some(f) = self.retransmit(now, id, seq) {
                return Some(f);
            }
        }
        while let Some((id, seq)) = bulk_ok.then(|| self.retx_bulk.pop_front()).flatten() {
            if let Some(f) = self.retransmit(now, id, seq) {
                return Some(f);
            }
        }
        let (cwnd, inflight) = (&self.cwnd, self.inflight);
        let allowed = |class: Class| {
            (bulk_ok || class != Class::Bulk) && inflight < cwnd.allowance(class == Class::Bulk)
        };
        if let Some(id) = self.sched.pick(now, allowed) {
            // FIFO mode picks without looking at the class: hold a bulk head back then.
            let held = !bulk_ok
                && self
                    .channels
                    .get(&id)
                    .is_some_and(|c| c.class == Class::Bulk);
            if !held {
                if let Some(f) = self.send_chunk(now, id) {
                    return Some(f);
                }
            }
        }
        if self.ack_urgent || self.ack_deadline.is_some_and(|d| now >= d) {
            while let Some(id) = self.ack_queue.pop_front() {
                let Some(c) = self.channels.get_mut(&id) else {
                    continue;
                };
                c.ack_queued = false;
                if !c.ack_pending {
                    continue;
                }
                let mut h = Header::new(Kind::Ack);
                h.channel = id;
                h.class = c.class;
                h.priority = c.prio;
                self.fill_ack(now, id, &mut h);
                return Some(OutFrame {
                    header: h.encode(),
                    payload: Bytes::new(),
                });
            }
            self.ack_urgent = false;
            self.ack_deadline = None;
            // Every queued ack went out (or its channel is gone).
            self.acks_owed = 0;
        }
        None
    }

    /// Fills the reverse-direction ack, credit and timestamps, and marks the ack as sent.
    fn fill_ack(&mut self, now: Instant, id: u32, h: &mut Header) {
        let ts = self.now_ts(now);
        let echo = self.ts_echo(now);
        let c = self.channels.get_mut(&id).expect("caller checked");
        h.ack = c.expected_seq;
        h.credit = c.credit_limit();
        h.ts = ts;
        h.ts_echo = echo;
        c.advertised = h.credit;
        c.ack_pending = false;
        c.rx_since_ack = 0;
        if c.ack_owed {
            c.ack_owed = false;
            self.acks_owed = self.acks_owed.saturating_sub(1);
            if self.acks_owed == 0 {
                self.ack_deadline = None;
                self.ack_urgent = false;
            }
        }
    }

    fn send_chunk(&mut self, now: Instant, id: u32) -> Option<OutFrame> {
        let chunk_size = {
            let c = self.channels.get(&id)?;
            if !c.can_send() {
                // FIFO mode reaches here when the head channel has no credit; in priority mode
                // a channel that cannot send leaves its ring until credit or data returns.
                let class = c.class;
                if !c.queue.is_empty() {
                    self.stats.credit_stalls += 1;
                    self.credit_probe = !self.reliable;
                }
                if self.sched.priorities() {
                    self.sched.remove(id, class);
                    self.channels.get_mut(&id).expect("checked").in_ready = false;
                }
                return None;
            }
            self.cfg.chunk_size.get(c.class) as usize
        };
        let record = self.cfg.channel_histograms;
        let c = self.channels.get_mut(&id).expect("checked");
        let msg = c.queue.front().expect("can_send implies a message");
        let remaining = msg.body.len() - c.front_pos;
        let avail = (c.peer_credit - c.next_offset) as usize;
        let len = remaining.min(chunk_size).min(avail);
        let first = c.front_pos == 0;
        let last = c.front_pos + len == msg.body.len();
        let payload = msg.body.slice(c.front_pos..c.front_pos + len);
        let mut flags = 0;
        if first {
            flags |= FLAG_FIRST;
            if record {
                let waited = now.saturating_duration_since(msg.enqueued).as_micros() as u64;
                c.counters
                    .queue_delay
                    .get_or_insert_with(new_histogram)
                    .saturating_record(waited.max(1));
            }
        }
        if last {
            flags |= FLAG_LAST;
        }
        let sent = Sent {
            seq: c.next_seq,
            offset: c.next_offset,
            flags,
            msg_flags: msg.msg_flags,
            tag: msg.tag,
            payload,
        };
        c.next_seq += 1;
        c.next_offset += len as u64;
        c.front_pos += len;
        let class = c.class;
        if last {
            let m = c.queue.pop_front().expect("front exists");
            c.front_pos = 0;
            c.queued_bytes -= m.body.len();
            self.queued_bytes -= m.body.len() as u64;
            c.counters.messages_sent += 1;
            c.counters.bytes_sent += m.body.len() as u64;
            if c.send_blocked {
                c.send_blocked = false;
                self.events.push_back(Event::Writable(id));
            }
        }
        let still = c.can_send();
        if !still && !c.queue.is_empty() {
            c.counters.credit_stalls += 1;
            self.stats.credit_stalls += 1;
            self.credit_probe = !self.reliable;
        }
        c.in_ready = still;
        c.unacked.push_back(sent.clone());
        if self.inflight == 0 {
            self.progress_at = now;
        }
        self.inflight += (HEADER_LEN + len) as u64;
        self.sched.after_send(id, class, still, last);
        Some(self.data_frame(now, id, &sent, false))
    }

    /// Queues every unacknowledged chunk to be sent again, in channel order and each channel's
    /// in sequence order; what was queued before is dropped (it is in this again).
    fn queue_unacked_again(&mut self) {
        self.retx.clear();
        self.retx_bulk.clear();
        let mut ids: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| !c.unacked.is_empty())
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        for id in ids {
            let c = &self.channels[&id];
            let queue = if c.class == Class::Bulk {
                &mut self.retx_bulk
            } else {
                &mut self.retx
            };
            queue.extend(c.unacked.iter().map(|s| (id, s.seq)));
        }
    }

    fn retransmit(&mut self, now: Instant, id: u32, seq: u64) -> Option<OutFrame> {
        let sent = self.channels.get(&id)?.unacked_chunk(seq)?.clone();
        self.stats.retransmits += 1;
        Some(self.data_frame(now, id, &sent, true))
    }

    fn data_frame(&mut self, now: Instant, id: u32, s: &Sent, retransmit: bool) -> OutFrame {
        let c = &self.channels[&id];
        let mut h = Header::new(Kind::Data);
        h.flags = s.flags | if retransmit { FLAG_RETRANSMIT } else { 0 };
        h.class = c.class;
        h.priority = c.prio;
        h.msg_flags = s.msg_flags;
        h.channel = id;
        h.len = s.payload.len() as u32;
        h.seq = s.seq;
        h.offset = s.offset;
        h.tag = s.tag;
        self.fill_ack(now, id, &mut h);
        OutFrame {
            header: h.encode(),
            payload: s.payload.clone(),
        }
    }

    fn update_ready(&mut self, id: u32) {
        let Some(c) = self.channels.get_mut(&id) else {
            return;
        };
        if !c.in_ready && c.can_send() {
            c.in_ready = true;
            self.sched.mark_ready(id, c.class, c.prio);
        } else if !c.queue.is_empty() && !c.can_send() {
            self.credit_probe = !self.reliable;
        }
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
                + c.partial.as_ref().map_or(0, |p| p.len)
                + c.reorder.values().map(|f| f.payload.len()).sum::<usize>()
        })
    }
}
