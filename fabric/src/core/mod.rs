//! The protocol core, sans-IO: framing is in [`crate::frame`]; here are the session state
//! machine (`session/`, split by concern), its channels (`channel_state.rs`), the scheduler,
//! congestion control, the handshake and the channel-id map. Nothing here touches a socket, a
//! thread or a clock: time is an argument.
//!
//! Imports: `crate::frame`, `crate::class`, `crate::config` and `crate::error` only (and the
//! `bytes` and `hdrhistogram` crates): nothing of the layers above (`api`, `bulk`, `transport`),
//! no tokio, no sockets, threads or clocks (outside tests).

mod channel_state;
mod congestion;
pub mod handshake;
pub(crate) mod id_map;
mod scheduler;
pub mod session;

pub(crate) use channel_state::concat;
pub use channel_state::Delivered;
pub use handshake::{Handshake, HelloStatus};
pub use session::{ChannelStats, Event, PeerParams, Role, Session, SessionStats, SYSTEM_CHANNEL};
