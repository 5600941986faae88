//! The session's timers: [`Session::handle_timeout`] and [`Session::poll_timeout`].
//!
//! Peer timeout (the session dies after [`Config::peer_timeout`] of silence), keepalive pings,
//! the ack deadline (set by `recv.rs`), and on transports that may lose frames the
//! retransmission timeout, backed off while nothing progresses, with zero-window probes for
//! channels stalled on credit.
//!
//! Imports: the session (`super::`) and the frame format; calls `send.rs`'s helpers to stamp
//! probes and queue chunks again (never the other way round).
//!
//! [`Config::peer_timeout`]: crate::config::Config::peer_timeout

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Session;
use crate::error::Error;
use crate::frame::{Header, Kind, OutFrame, FLAG_RETRANSMIT};

impl Session {
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
}
