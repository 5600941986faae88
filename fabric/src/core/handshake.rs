//! The handshake that opens or resumes a session: `Hello` from the initiator, `HelloAck` back.
//!
//! Both carry the sender's node name and receive windows; `Hello`'s tag is the session id, chosen
//! at random by the initiator and reused to resume after a reconnection.

use bytes::{BufMut, Bytes, BytesMut};

use super::session::PeerParams;
use crate::config::PerClass;
use crate::error::ProtocolError;
use crate::frame::{
    Frame, Header, Kind, OutFrame, FLAG_RESUME, FLAG_RESUMED, FLAG_UNKNOWN_SESSION,
};

/// Longest node name, in bytes.
pub const MAX_NAME: usize = 255;

/// What the acceptor answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloStatus {
    /// A request (Hello) for a new session.
    New,
    /// A request (Hello) to resume the session named by its id.
    Resume,
    /// Answer: the session was created or resumed.
    Accepted,
    /// Answer: the session to resume is unknown (the acceptor restarted or gave up on it).
    UnknownSession,
}

/// A decoded `Hello` or `HelloAck`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// Session id.
    pub session_id: u64,
    /// Request or answer status.
    pub status: HelloStatus,
    /// Sender's node name.
    pub name: String,
    /// Sender's receive windows.
    pub params: PeerParams,
}

impl Handshake {
    /// Encodes as a `Hello` (status `New`/`Resume`) or `HelloAck` (`Accepted`/`UnknownSession`).
    pub fn encode(&self) -> OutFrame {
        let (kind, flags) = match self.status {
            HelloStatus::New => (Kind::Hello, 0),
            HelloStatus::Resume => (Kind::Hello, FLAG_RESUME),
            HelloStatus::Accepted => (Kind::HelloAck, FLAG_RESUMED),
            HelloStatus::UnknownSession => (Kind::HelloAck, FLAG_UNKNOWN_SESSION),
        };
        let name = &self.name.as_bytes()[..self.name.len().min(MAX_NAME)];
        let mut p = BytesMut::with_capacity(13 + name.len());
        p.put_u32_le(self.params.recv_window.coordination);
        p.put_u32_le(self.params.recv_window.toolcall);
        p.put_u32_le(self.params.recv_window.bulk);
        p.put_u8(name.len() as u8);
        p.put_slice(name);
        let mut h = Header::new(kind);
        h.flags = flags;
        h.tag = self.session_id;
        h.len = p.len() as u32;
        OutFrame {
            header: h.encode(),
            payload: p.freeze(),
        }
    }

    /// Decodes a `Hello` or `HelloAck`; anything else is a [`ProtocolError::BadHandshake`].
    pub fn decode(frame: &Frame) -> Result<Handshake, ProtocolError> {
        let h = &frame.header;
        let status = match (h.kind, h.flags) {
            (Kind::Hello, 0) => HelloStatus::New,
            (Kind::Hello, FLAG_RESUME) => HelloStatus::Resume,
            (Kind::HelloAck, FLAG_RESUMED) => HelloStatus::Accepted,
            (Kind::HelloAck, FLAG_UNKNOWN_SESSION) => HelloStatus::UnknownSession,
            (kind, flags) => {
                return Err(ProtocolError::BadHandshake(format!(
                    "expected a handshake frame, got {kind:?} with flags {flags:#x}"
                )))
            }
        };
        let p: &Bytes = &frame.payload;
        if p.len() < 13 {
            return Err(ProtocolError::BadHandshake(format!(
                "handshake payload of {} bytes is shorter than 13",
                p.len()
            )));
        }
        let word = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        let name_len = p[12] as usize;
        if p.len() != 13 + name_len {
            return Err(ProtocolError::BadHandshake(format!(
                "name length {name_len} does not match the {}-byte payload",
                p.len()
            )));
        }
        let name = std::str::from_utf8(&p[13..])
            .map_err(|_| ProtocolError::BadHandshake("node name is not UTF-8".into()))?
            .to_owned();
        let params = PeerParams {
            recv_window: PerClass {
                coordination: word(0),
                toolcall: word(4),
                bulk: word(8),
            },
        };
        if [
            params.recv_window.coordination,
            params.recv_window.toolcall,
            params.recv_window.bulk,
        ]
        .contains(&0)
        {
            return Err(ProtocolError::BadHandshake("a receive window of 0".into()));
        }
        Ok(Handshake {
            session_id: h.tag,
            status,
            name,
            params,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects() {
        let hs = Handshake {
            session_id: 42,
            status: HelloStatus::Resume,
            name: "orchestrator".into(),
            params: PeerParams {
                recv_window: PerClass {
                    coordination: 1,
                    toolcall: 2,
                    bulk: 3,
                },
            },
        };
        let f = hs.encode().decode().unwrap();
        assert_eq!(Handshake::decode(&f).unwrap(), hs);
        let mut bad = f.clone();
        bad.payload = bad.payload.slice(..5);
        assert!(matches!(
            Handshake::decode(&bad),
            Err(ProtocolError::BadHandshake(_))
        ));
        let mut data = f;
        data.header.kind = Kind::Data;
        assert!(Handshake::decode(&data).is_err());
    }
}
