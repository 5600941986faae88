//! The sidecar's wire protocol (`sidecar/PROTOCOL.md`): message types, the frame header, and a
//! total encoder and decoder for both directions (the sidecar decodes what clients send; the
//! tests' Rust client decodes what the sidecar sends).

mod codec;
mod messages;

pub use codec::{decode_from_client, decode_to_client, Header, WireError, HEADER_LEN};
pub use messages::*;
