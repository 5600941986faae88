//! The protocol core, sans-IO: framing is in [`crate::frame`]; here are the session state
//! machine, its channels, the scheduler, congestion control and the handshake. Nothing here
//! touches a socket, a thread or a clock: time is an argument.

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
