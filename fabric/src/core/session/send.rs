//! The send side of the session: frames to the peer ([`Session::poll_transmit`]).
//!
//! In order: control frames (pings, pongs, handshake repeats, close), retransmissions (bulk
//! ones only while bulk may go), new chunks of the channel the scheduler picks within the
//! congestion window and the peer's credit, then acknowledgements that could not ride on data.
//! Every frame carries the reverse direction's ack, credit and timestamps (`fill_ack`).
//!
//! Imports: the session (`super::`), `core`'s channel state and the frame format. It calls
//! nothing in `recv.rs` or `timers.rs`; they call its helpers.

use std::time::Instant;

use bytes::Bytes;

use super::{Event, Session, State};
use crate::class::Class;
use crate::core::channel_state::{concat, new_histogram, Sent};
use crate::error::Error;
use crate::frame::{
    Header, Kind, OutFrame, FLAG_FIRST, FLAG_LAST, FLAG_RETRANSMIT, HEADER_LEN, MSG_NAMED,
};

impl Session {
    /// This end's timestamp at `now`: microseconds since the session began, never 0 (0 means
    /// "none" on the wire).
    pub(super) fn now_ts(&self, now: Instant) -> u32 {
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
    pub(super) fn fill_ack(&mut self, now: Instant, id: u32, h: &mut Header) {
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
        // A named channel's very first chunk carries the name in front of the message's bytes.
        let prefix = if c.next_seq == 0 {
            c.name_prefix.take()
        } else {
            None
        };
        let plen = prefix.as_ref().map_or(0, Bytes::len);
        let msg = c.queue.front().expect("can_send implies a message");
        let remaining = msg.body.len() - c.front_pos;
        let avail = (c.peer_credit - c.next_offset) as usize;
        let len = remaining
            .min(chunk_size.saturating_sub(plen))
            .min(avail.saturating_sub(plen));
        let first = c.front_pos == 0;
        let last = c.front_pos + len == msg.body.len();
        let body = msg.body.slice(c.front_pos..c.front_pos + len);
        let (payload, msg_flags) = match prefix {
            // One copy of one chunk, once per channel.
            Some(p) => (concat(vec![p, body]), msg.msg_flags | MSG_NAMED),
            None => (body, msg.msg_flags),
        };
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
            msg_flags,
            tag: msg.tag,
            payload,
        };
        c.next_seq += 1;
        c.next_offset += (plen + len) as u64;
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
        self.inflight += (HEADER_LEN + plen + len) as u64;
        self.sched.after_send(id, class, still, last);
        Some(self.data_frame(now, id, &sent, false))
    }

    /// Queues every unacknowledged chunk to be sent again, in channel order and each channel's
    /// in sequence order; what was queued before is dropped (it is in this again).
    pub(super) fn queue_unacked_again(&mut self) {
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

    /// Puts channel `id` on the scheduler's ready list if it can send now; otherwise, with data
    /// queued and no credit on a lossy transport, arms the credit probe.
    pub(super) fn update_ready(&mut self, id: u32) {
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
}
