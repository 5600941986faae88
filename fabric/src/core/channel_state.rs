//! Per-channel protocol state: the send side (queue, sequence, credit, retransmission buffer) and
//! the receive side (expected sequence, reorder buffer, reassembly, delivered messages, credit).

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;

use crate::class::{Class, Priority};
use crate::frame::Frame;

/// A message queued for sending.
#[derive(Debug)]
pub(crate) struct OutMsg {
    pub(crate) body: Bytes,
    pub(crate) tag: u64,
    pub(crate) msg_flags: u8,
    pub(crate) enqueued: Instant,
}

/// A chunk sent and not yet acknowledged, kept for retransmission (a refcount, not a copy).
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) seq: u64,
    pub(crate) offset: u64,
    pub(crate) flags: u16,
    pub(crate) msg_flags: u8,
    pub(crate) tag: u64,
    pub(crate) payload: Bytes,
}

/// The concatenation of `parts`: no copy for none or one, one copy for more.
pub(crate) fn concat(mut parts: Vec<Bytes>) -> Bytes {
    match parts.len() {
        0 => Bytes::new(),
        1 => parts.pop().unwrap_or_default(),
        _ => {
            let mut buf = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
            for p in &parts {
                buf.extend_from_slice(p);
            }
            buf.freeze()
        }
    }
}

/// A message received whole and ready for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The message body (empty until [`Delivered::assemble`] for a fragmented message taken
    /// with [`Session::recv_unassembled`](super::Session::recv_unassembled)).
    pub body: Bytes,
    /// The message tag (request id for requests).
    pub tag: u64,
    /// `MSG_*` flags.
    pub msg_flags: u8,
    /// Receive-window bytes given back to the peer when the application takes the message.
    pub(crate) credit: u64,
    /// The chunks of a fragmented message, not yet joined.
    pub(crate) parts: Vec<Bytes>,
}

impl Delivered {
    /// Joins a fragmented message's chunks into `body`: the one copy such a message costs. Done
    /// by the application task, outside any lock, so a large message does not hold up the
    /// session. A no-op for a message that came in one chunk.
    pub fn assemble(&mut self) {
        if self.parts.is_empty() {
            return;
        }
        self.body = concat(std::mem::take(&mut self.parts));
    }

    /// The body's pieces in order, without joining them (a single piece when it came whole or
    /// was already joined).
    pub fn pieces(&self) -> impl Iterator<Item = &Bytes> + Clone {
        std::iter::once(&self.body)
            .filter(|b| !b.is_empty())
            .chain(self.parts.iter())
    }

    /// Length of the message body in bytes.
    pub fn len(&self) -> usize {
        self.body.len() + self.parts.iter().map(Bytes::len).sum::<usize>()
    }

    /// Whether the message body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
pub(crate) struct Partial {
    pub(crate) tag: u64,
    pub(crate) msg_flags: u8,
    pub(crate) chunks: Vec<Bytes>,
    pub(crate) len: usize,
    /// Bytes already given back as credit while reassembling (allowed when the application had
    /// read everything, so a message larger than the window can complete).
    pub(crate) prereleased: u64,
}

impl Partial {
    /// Gives back as credit every byte of the message not given back yet; returns how many.
    pub(crate) fn release_rest(&mut self) -> u64 {
        let give = self.len as u64 - self.prereleased;
        self.prereleased += give;
        give
    }
}

/// Counters and histograms of one channel.
#[derive(Debug, Default, Clone)]
pub(crate) struct ChanCounters {
    pub(crate) messages_sent: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) messages_received: u64,
    pub(crate) bytes_received: u64,
    pub(crate) credit_stalls: u64,
    /// Time from `send` to the first chunk on the wire, in microseconds (allocated on first use).
    pub(crate) queue_delay: Option<Box<Histogram<u64>>>,
}

pub(crate) fn new_histogram() -> Box<Histogram<u64>> {
    // 1 µs to 100 s with two significant digits: about 20 KiB per histogram.
    Box::new(
        Histogram::new_with_bounds(1, 100_000_000, 2).expect("static histogram bounds are valid"),
    )
}

#[derive(Debug)]
pub(crate) struct Chan {
    pub(crate) class: Class,
    pub(crate) prio: Priority,
    // --- send side ---
    pub(crate) queue: VecDeque<OutMsg>,
    pub(crate) queued_bytes: usize,
    /// Bytes of the front message already cut into chunks.
    pub(crate) front_pos: usize,
    pub(crate) next_seq: u64,
    pub(crate) next_offset: u64,
    pub(crate) peer_credit: u64,
    pub(crate) unacked: VecDeque<Sent>,
    pub(crate) in_ready: bool,
    pub(crate) send_blocked: bool,
    pub(crate) want_flush: bool,
    // --- receive side ---
    pub(crate) expected_seq: u64,
    pub(crate) expected_offset: u64,
    pub(crate) reorder: BTreeMap<u64, Frame>,
    pub(crate) partial: Option<Partial>,
    pub(crate) delivered: VecDeque<Delivered>,
    pub(crate) released: u64,
    pub(crate) window: u64,
    pub(crate) advertised: u64,
    pub(crate) ack_pending: bool,
    /// Counted in the session's `acks_owed` (set by `queue_ack`, cleared when an ack is sent).
    pub(crate) ack_owed: bool,
    pub(crate) ack_queued: bool,
    pub(crate) rx_since_ack: u64,
    pub(crate) counters: ChanCounters,
    // --- name and refusal ---
    /// The channel's name (given by its opener), once known.
    pub(crate) name: Option<String>,
    /// Opener of a named channel: the `[len][name]` prefix still to go in front of the
    /// channel's first chunk (taken when that chunk is cut).
    pub(crate) name_prefix: Option<Bytes>,
    /// Receive side: the channel's first chunk came in order, so it was offered to the
    /// application (or refused).
    pub(crate) announced: bool,
    /// This side refused the channel (the peer opened it), with this reason: what arrives is
    /// acknowledged and discarded; the refusal is the last message this side sends on it.
    pub(crate) refused_here: Option<String>,
    /// The peer refused the channel (this side opened it), with this reason: nothing more is
    /// sent, and receives fail once the messages before the refusal are read.
    pub(crate) refused_by_peer: Option<String>,
    /// The refusal dropped messages (or chunks) the peer never took: a flush fails.
    pub(crate) refusal_dropped: bool,
}

impl Chan {
    pub(crate) fn new(class: Class, prio: Priority, recv_window: u64, peer_credit: u64) -> Chan {
        Chan {
            class,
            prio,
            queue: VecDeque::new(),
            queued_bytes: 0,
            front_pos: 0,
            next_seq: 0,
            next_offset: 0,
            peer_credit,
            unacked: VecDeque::new(),
            in_ready: false,
            send_blocked: false,
            want_flush: false,
            expected_seq: 0,
            expected_offset: 0,
            reorder: BTreeMap::new(),
            partial: None,
            delivered: VecDeque::new(),
            released: 0,
            window: recv_window,
            advertised: recv_window,
            ack_pending: false,
            ack_owed: false,
            ack_queued: false,
            rx_since_ack: 0,
            counters: ChanCounters::default(),
            name: None,
            name_prefix: None,
            announced: false,
            refused_here: None,
            refused_by_peer: None,
            refusal_dropped: false,
        }
    }

    /// Bytes the next chunk carries in front of the message's (the name prefix, if still due).
    pub(crate) fn prefix_len(&self) -> u64 {
        self.name_prefix.as_ref().map_or(0, |p| p.len() as u64)
    }

    /// Why operations on this channel fail, if it was refused (by either side).
    pub(crate) fn refusal(&self) -> Option<&str> {
        self.refused_by_peer
            .as_deref()
            .or(self.refused_here.as_deref())
    }

    /// Credit to advertise: the peer may send up to this byte offset.
    pub(crate) fn credit_limit(&self) -> u64 {
        self.released + self.window
    }

    /// Whether the next chunk can go out now (something queued and credit for it).
    pub(crate) fn can_send(&self) -> bool {
        let next = self.next_offset + self.prefix_len();
        match self.queue.front() {
            None => false,
            Some(m) if m.body.len() == self.front_pos => next <= self.peer_credit,
            Some(_) => next < self.peer_credit,
        }
    }

    /// Whether everything sent was acknowledged and nothing is queued.
    pub(crate) fn is_flushed(&self) -> bool {
        self.queue.is_empty() && self.unacked.is_empty()
    }

    /// The unacknowledged chunk with sequence `seq`, if it is still held.
    pub(crate) fn unacked_chunk(&self, seq: u64) -> Option<&Sent> {
        let first = self.unacked.front()?.seq;
        let idx = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.unacked.get(idx)
    }
}
