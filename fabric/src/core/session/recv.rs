//! The receive side of the session: frames from the peer ([`Session::handle_frame`]).
//!
//! Timestamps feed the RTT estimate; acknowledgement and credit fields release sent chunks and
//! reopen channels; data chunks are checked (channel, class, credit, sequence, offset, size),
//! held in the reorder buffer on lossy transports, reassembled into messages and delivered, and
//! leave an ack owed (queued here, sent by `send.rs`, timed by the ack deadline).
//!
//! Imports: the session (`super::`), `core`'s channel state, and the frame format; calls
//! `send.rs`'s timestamp and ready-list helpers (never the other way round).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Event, Role, Session, SYSTEM_CHANNEL};
use crate::core::channel_state::{Chan, Delivered, Partial};
use crate::error::{Error, ProtocolError};
use crate::frame::{
    split_name, Frame, Header, Kind, OutFrame, FLAG_FIRST, FLAG_LAST, HEADER_LEN,
    MAX_REFUSAL_REASON, MSG_ERROR, MSG_NAMED, MSG_REFUSE, MSG_RESPONSE,
};

/// Largest gap tolerated in a channel's sequence on a lossy transport before it is a violation.
const MAX_REORDER: u64 = 4096;

impl Session {
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
                // Offered to the application once its first chunk is in (`announce`).
                self.channels.insert(id, chan);
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
        let local = self.is_local(id);
        let h = frame.header;
        let mut payload = frame.payload;
        let mut msg_flags = h.msg_flags;
        let c = self.channels.get_mut(&id).expect("caller checked");
        if h.offset != c.expected_offset {
            return Err(ProtocolError::OffsetMismatch {
                channel: id,
                expected: c.expected_offset,
                got: h.offset,
            });
        }
        if c.refused_by_peer.is_some() {
            // The refusal is the last message of the peer's direction.
            return Err(ProtocolError::BadRefusal { channel: id });
        }
        c.expected_seq += 1;
        c.expected_offset += u64::from(h.len);
        c.rx_since_ack += (HEADER_LEN + payload.len()) as u64;
        c.ack_pending = true;
        let first = h.flags & FLAG_FIRST != 0;
        let last = h.flags & FLAG_LAST != 0;
        if msg_flags & MSG_NAMED != 0 {
            // Only the opener names a channel, in front of its very first chunk.
            if local || h.offset != 0 || !first {
                return Err(ProtocolError::BadChannelName { channel: id });
            }
            let (name, rest) =
                split_name(&payload).ok_or(ProtocolError::BadChannelName { channel: id })?;
            // The prefix's bytes go back as credit at once: they are never read.
            c.released += (payload.len() - rest.len()) as u64;
            c.name = Some(name);
            payload = rest;
            msg_flags &= !MSG_NAMED;
        }
        if first && msg_flags & MSG_REFUSE != 0 && (!local || msg_flags != MSG_REFUSE) {
            // Only the side that accepted a channel refuses it, with a plain message.
            return Err(ProtocolError::BadRefusal { channel: id });
        }
        let c = if !local && !c.announced {
            // The channel's first chunk is in: offer the channel, named, to the application
            // (the map is looked up again only then, not for every chunk).
            c.announced = true;
            self.announce(now, id);
            self.channels.get_mut(&id).expect("caller checked")
        } else {
            c
        };
        let len = payload.len();
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
                body: payload,
                tag: h.tag,
                msg_flags,
                credit: len as u64,
                parts: Vec::new(),
            }),
            (true, None) => {
                c.partial = Some(Partial {
                    tag: h.tag,
                    msg_flags,
                    chunks: vec![payload],
                    len,
                    prereleased: 0,
                });
                None
            }
            (false, Some(mut p)) => {
                p.len += len;
                p.chunks.push(payload);
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
        if c.partial
            .as_ref()
            .is_some_and(|p| p.msg_flags & MSG_REFUSE != 0 && p.len > MAX_REFUSAL_REASON)
        {
            return Err(ProtocolError::BadRefusal { channel: id });
        }
        let mut refusal = None;
        if c.refused_here.is_some() {
            // Refused here: acknowledged and discarded, the bytes given back at once.
            if let Some(p) = c.partial.as_mut() {
                c.released += p.release_rest();
                p.chunks.clear();
            }
            if let Some(msg) = delivered {
                c.released += msg.credit;
            }
        } else {
            // Let a message larger than the window complete when the application keeps up.
            if let Some(p) = c.partial.as_mut() {
                if c.delivered.is_empty() {
                    c.released += p.release_rest();
                }
            }
            if let Some(mut msg) = delivered {
                c.counters.messages_received += 1;
                c.counters.bytes_received += msg.len() as u64;
                if msg.msg_flags & MSG_REFUSE != 0 {
                    msg.assemble();
                    c.released += msg.credit;
                    let reason = (msg.body.len() <= MAX_REFUSAL_REASON)
                        .then(|| std::str::from_utf8(&msg.body).ok())
                        .flatten()
                        .ok_or(ProtocolError::BadRefusal { channel: id })?;
                    refusal = Some(reason.to_owned());
                } else if msg.msg_flags & MSG_RESPONSE != 0 {
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
        if let Some(reason) = refusal {
            self.on_refused_by_peer(id, reason);
        }
        Ok(())
    }

    /// The first chunk of channel `id`, opened by the peer, came in order: queue the channel
    /// for the application, or refuse it when the application takes no more channels.
    fn announce(&mut self, now: Instant, id: u32) {
        if id & SYSTEM_CHANNEL != 0 {
            self.system_accept_queue.push_back(id);
            self.events.push_back(Event::SystemChannelOpened(id));
        } else if let Some(reason) = self.refuse_new.clone() {
            self.refuse(now, id, &reason);
        } else {
            self.accept_queue.push_back(id);
            self.events.push_back(Event::ChannelOpened(id));
        }
    }

    /// Marks `c` (channel `id`) as owing the peer an ack, and queues it for `send.rs` once.
    pub(super) fn queue_ack(queue: &mut VecDeque<u32>, owed: &mut usize, id: u32, c: &mut Chan) {
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
}
