//! How two sidecars (or one sidecar and itself) carry endpoints over one fabric session.
//!
//! - A channel to endpoint `E` is named `ep:E`; a tool-call channel to `E`'s tools `tool:E`.
//! - On an `ep:` channel, plain messages are the clients' messages, untouched. Requests carry a
//!   one-byte tag first: [`TAG_CLIENT`] (a client's `REQUEST`, the rest is its body),
//!   [`TAG_INTRO`] (the opener's first request: who opens and the label; answered once the
//!   endpoint has the channel) and [`TAG_CLOSE`] (the opener closes; the rest is the reason).
//!   Only requests are tagged, so a message costs no copy.

use bytes::{BufMut, Bytes, BytesMut};

/// Prefix of an endpoint channel's name.
pub const ENDPOINT_PREFIX: &str = "ep:";
/// Prefix of a tool-call channel's name.
pub const TOOL_PREFIX: &str = "tool:";

/// A client's request.
pub const TAG_CLIENT: u8 = 0;
/// The opener introduces itself.
pub const TAG_INTRO: u8 = 1;
/// The opener closes the channel.
pub const TAG_CLOSE: u8 = 2;

/// Longest endpoint name (PROTOCOL.md).
pub const MAX_ENDPOINT: usize = 32;
/// Longest channel label (PROTOCOL.md).
pub const MAX_LABEL: usize = 256;

/// Whether `name` is a valid endpoint name: 1–32 bytes of `A-Z a-z 0-9 . _ -`.
pub fn valid_endpoint(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ENDPOINT
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What an opener says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intro {
    /// The opening endpoint.
    pub endpoint: String,
    /// The label its client gave.
    pub label: String,
}

impl Intro {
    /// The tagged request body.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(3 + self.endpoint.len() + self.label.len());
        b.put_u8(TAG_INTRO);
        b.put_u8(self.endpoint.len() as u8);
        b.put_slice(self.endpoint.as_bytes());
        b.put_slice(self.label.as_bytes());
        b.freeze()
    }

    /// Reads an intro after its tag; `None` for anything malformed (a peer's bytes).
    pub fn decode(rest: &[u8]) -> Option<Intro> {
        let (&n, rest) = rest.split_first()?;
        let n = usize::from(n);
        if rest.len() < n {
            return None;
        }
        let endpoint = std::str::from_utf8(&rest[..n]).ok()?;
        let label = std::str::from_utf8(&rest[n..]).ok()?;
        (valid_endpoint(endpoint) && label.len() <= MAX_LABEL).then(|| Intro {
            endpoint: endpoint.to_owned(),
            label: label.to_owned(),
        })
    }
}

/// `tag` followed by `body` (one copy: requests only).
pub fn tagged(tag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(1 + body.len());
    b.put_u8(tag);
    b.put_slice(body);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intro_round_trip_and_garbage() {
        let i = Intro {
            endpoint: "sub-1".into(),
            label: "plan ✓".into(),
        };
        let b = i.encode();
        assert_eq!(b[0], TAG_INTRO);
        assert_eq!(Intro::decode(&b[1..]), Some(i));
        assert_eq!(Intro::decode(&[]), None);
        assert_eq!(Intro::decode(&[9, b'a']), None);
        assert_eq!(Intro::decode(&[1, b' ']), None);
        assert_eq!(Intro::decode(&[1, b'a', 0xff]), None);
    }

    #[test]
    fn endpoint_names() {
        assert!(valid_endpoint("orch_1.a-b"));
        assert!(!valid_endpoint(""));
        assert!(!valid_endpoint("a/b"));
        assert!(!valid_endpoint(&"x".repeat(33)));
    }
}
