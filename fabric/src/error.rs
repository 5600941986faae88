//! Error types. Every failure is explicit and typed; errors are `Clone` so one session failure can
//! fail every pending operation with the same cause.

use std::time::Duration;

use crate::frame::FrameError;

/// A violation of the protocol by the peer (or by corrupted bytes). The session is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Bytes that are not a valid frame.
    Frame(FrameError),
    /// A frame kind that is not allowed at this point (e.g. a second Hello).
    UnexpectedFrame(&'static str),
    /// A sequence number beyond what the channel's window allows, or a gap on a transport that
    /// never loses or reorders frames.
    SequenceFromFuture {
        /// Channel id.
        channel: u32,
        /// Sequence received.
        seq: u64,
        /// Sequence expected.
        expected: u64,
    },
    /// A chunk whose byte offset does not follow the previous one.
    OffsetMismatch {
        /// Channel id.
        channel: u32,
        /// Offset expected.
        expected: u64,
        /// Offset received.
        got: u64,
    },
    /// The peer sent beyond the credit it was granted.
    CreditExceeded {
        /// Channel id.
        channel: u32,
        /// End offset of the chunk.
        end: u64,
        /// Credit granted.
        credit: u64,
    },
    /// The peer acknowledged chunks that were never sent.
    AckBeyondSent {
        /// Channel id.
        channel: u32,
        /// Ack received.
        ack: u64,
        /// Next sequence to be sent.
        sent: u64,
    },
    /// A message larger than this node accepts.
    MessageTooLarge {
        /// Channel id.
        channel: u32,
        /// Bytes so far.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Chunks out of message order (a continuation with no first chunk, or a first chunk inside
    /// a message).
    BadFragment {
        /// Channel id.
        channel: u32,
    },
    /// A frame on a channel that this side should have opened but did not, or whose class
    /// changed.
    UnknownChannel {
        /// Channel id.
        channel: u32,
    },
    /// The peer opened more channels than allowed.
    TooManyChannels {
        /// Limit.
        max: usize,
    },
    /// The handshake was malformed.
    BadHandshake(String),
    /// A channel name (`MSG_NAMED`) that is truncated, empty, longer than
    /// [`MAX_CHANNEL_NAME`](crate::frame::MAX_CHANNEL_NAME) bytes or not UTF-8, or a name on a
    /// chunk other than the first of the channel's first message.
    BadChannelName {
        /// Channel id.
        channel: u32,
    },
    /// A refusal (`MSG_REFUSE`) from the side that opened the channel, with other message flags,
    /// with a reason longer than [`MAX_REFUSAL_REASON`](crate::frame::MAX_REFUSAL_REASON) bytes
    /// or not UTF-8, or a message after the refusal.
    BadRefusal {
        /// Channel id.
        channel: u32,
    },
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtocolError::Frame(e) => write!(f, "malformed frame: {e}"),
            ProtocolError::UnexpectedFrame(k) => write!(f, "unexpected {k} frame"),
            ProtocolError::SequenceFromFuture {
                channel,
                seq,
                expected,
            } => write!(
                f,
                "channel {channel}: sequence {seq} from the future (expected {expected})"
            ),
            ProtocolError::OffsetMismatch {
                channel,
                expected,
                got,
            } => write!(f, "channel {channel}: offset {got}, expected {expected}"),
            ProtocolError::CreditExceeded {
                channel,
                end,
                credit,
            } => write!(
                f,
                "channel {channel}: peer sent up to byte {end} with credit for {credit}"
            ),
            ProtocolError::AckBeyondSent { channel, ack, sent } => write!(
                f,
                "channel {channel}: ack {ack} for chunks never sent (next is {sent})"
            ),
            ProtocolError::MessageTooLarge { channel, len, max } => write!(
                f,
                "channel {channel}: message of at least {len} bytes exceeds the {max}-byte limit"
            ),
            ProtocolError::BadFragment { channel } => {
                write!(f, "channel {channel}: chunks out of message order")
            }
            ProtocolError::UnknownChannel { channel } => {
                write!(f, "frame on unknown or inconsistent channel {channel}")
            }
            ProtocolError::TooManyChannels { max } => {
                write!(f, "peer opened more than {max} channels")
            }
            ProtocolError::BadHandshake(m) => write!(f, "bad handshake: {m}"),
            ProtocolError::BadChannelName { channel } => {
                write!(f, "channel {channel}: malformed or misplaced channel name")
            }
            ProtocolError::BadRefusal { channel } => {
                write!(f, "channel {channel}: malformed or misplaced refusal")
            }
        }
    }
}

impl From<FrameError> for ProtocolError {
    fn from(e: FrameError) -> Self {
        ProtocolError::Frame(e)
    }
}

/// Why access to a region was refused. Reported on both sides of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionError {
    /// No region with this id is registered (never was, or was revoked and forgotten).
    Unknown {
        /// Region id.
        region: u64,
    },
    /// The descriptor's key does not match the region's: a forged or stale descriptor.
    BadKey {
        /// Region id.
        region: u64,
    },
    /// The region was revoked.
    Revoked {
        /// Region id.
        region: u64,
    },
    /// The range does not fit in the region.
    OutOfBounds {
        /// Region id.
        region: u64,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Length of the region.
        region_len: u64,
    },
}

impl std::fmt::Display for RegionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegionError::Unknown { region } => write!(f, "region {region} is not registered"),
            RegionError::BadKey { region } => write!(f, "wrong key for region {region}"),
            RegionError::Revoked { region } => write!(f, "region {region} was revoked"),
            RegionError::OutOfBounds {
                region,
                offset,
                len,
                region_len,
            } => write!(
                f,
                "range {offset}..{} is outside region {region} of {region_len} bytes",
                offset.saturating_add(*len)
            ),
        }
    }
}

/// Errors of the fabric's operations.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// `try_send`: the channel's send queue is full. Nothing was queued; try again later or use
    /// `send`, which waits.
    WouldBlock,
    /// A message larger than the configured maximum. Nothing was sent.
    MessageTooLarge {
        /// Length of the message.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// Nothing was received from the peer within the configured bound; the session is dead and
    /// every pending operation failed.
    PeerDead {
        /// How long the peer had been silent.
        silent_for: Duration,
    },
    /// The peer no longer knows the session (it restarted); messages not acknowledged are lost
    /// and were failed.
    PeerRestarted,
    /// The session was closed by this side.
    Closed,
    /// The peer closed the session, with its reason.
    ClosedByPeer(String),
    /// The peer violated the protocol; the session was closed.
    Protocol(ProtocolError),
    /// The transport failed, or an I/O error reached the fabric's `Result` through `?` (a
    /// transport's set-up: certificates, sockets).
    Transport {
        /// The I/O error kind.
        kind: std::io::ErrorKind,
        /// What happened.
        message: String,
    },
    /// A request's deadline passed before its response arrived.
    DeadlineExceeded,
    /// The request's handler on the peer failed; its reason.
    Remote(String),
    /// No transport registered for the address's scheme.
    UnknownTransport(String),
    /// The address is not valid for its transport.
    InvalidAddress(String),
    /// The session has as many channels as `Config::max_channels` allows.
    TooManyChannels {
        /// The limit.
        max: usize,
    },
    /// The channel id is not open in this session.
    UnknownChannel(u32),
    /// The configuration is invalid.
    Config(String),
    /// A channel priority outside 0..=7.
    InvalidPriority(u8),
    /// `respond` was given a message that is not a request.
    NotARequest,
    /// Access to a region was refused (here or at the peer).
    Region(RegionError),
    /// A transfer failed: the index of the block that failed (the number of blocks for the
    /// notification), and why.
    Transfer {
        /// Index of the failed block.
        block: usize,
        /// The cause.
        cause: Box<Error>,
    },
    /// The operation was cancelled.
    Cancelled,
    /// A channel name that cannot be used: empty, or longer than
    /// [`MAX_CHANNEL_NAME`](crate::frame::MAX_CHANNEL_NAME) bytes (64). The text says which.
    InvalidChannelName(String),
    /// The channel was refused. By the peer: its application dropped every handle of the
    /// channel, never took it (it dropped every handle of the session, or refused the session's
    /// channels), or refused it with `Channel::refuse`; every pending and later operation on the
    /// channel then fails with this, within about a round trip, while the session and its other
    /// channels go on. Or by this side (`Channel::refuse`): later operations on the channel's
    /// other handles fail with it.
    ChannelRefused {
        /// The channel id.
        channel: u32,
        /// The peer's reason.
        reason: String,
    },
    /// A tool call's server answered that the tool failed (a `tools::ToolError` taken through
    /// `?`; its deadline, cancellation and session errors are the variants above).
    Tool(ToolFailure),
}

impl Error {
    /// Wraps an I/O error.
    pub fn transport(e: &std::io::Error) -> Error {
        Error::Transport {
            kind: e.kind(),
            message: e.to_string(),
        }
    }

    /// True for errors after which the session is gone.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::PeerDead { .. }
                | Error::PeerRestarted
                | Error::Closed
                | Error::ClosedByPeer(_)
                | Error::Protocol(_)
        )
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::WouldBlock => f.write_str("send queue full (would block)"),
            Error::MessageTooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds the {max}-byte limit")
            }
            Error::PeerDead { silent_for } => {
                write!(f, "peer dead: nothing received for {silent_for:?}")
            }
            Error::PeerRestarted => f.write_str("peer restarted: session unknown to the peer"),
            Error::Closed => f.write_str("session closed"),
            Error::ClosedByPeer(r) => write!(f, "session closed by peer: {r}"),
            Error::Protocol(e) => write!(f, "protocol violation: {e}"),
            Error::Transport { kind, message } => {
                write!(f, "transport error ({kind:?}): {message}")
            }
            Error::DeadlineExceeded => f.write_str("deadline exceeded"),
            Error::Remote(r) => write!(f, "remote handler failed: {r}"),
            Error::UnknownTransport(s) => write!(f, "no transport for scheme {s:?}"),
            Error::InvalidAddress(a) => write!(f, "invalid address: {a}"),
            Error::TooManyChannels { max } => write!(f, "session already has {max} channels"),
            Error::UnknownChannel(c) => write!(f, "channel {c} is not open"),
            Error::Config(m) => write!(f, "invalid configuration: {m}"),
            Error::InvalidPriority(p) => write!(f, "priority {p} is outside 0..=7"),
            Error::NotARequest => {
                f.write_str("the message is not a request: there is nothing to respond to")
            }
            Error::Region(e) => write!(f, "region access refused: {e}"),
            Error::Transfer { block, cause } => {
                write!(f, "transfer failed at block {block}: {cause}")
            }
            Error::Cancelled => f.write_str("cancelled"),
            Error::InvalidChannelName(m) => write!(f, "invalid channel name: {m}"),
            Error::ChannelRefused { channel, reason } => {
                write!(f, "channel {channel} refused: {reason}")
            }
            Error::Tool(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Self {
        Error::Protocol(e)
    }
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Self {
        Error::Protocol(ProtocolError::Frame(e))
    }
}

/// An I/O error as [`Error::Transport`], with its kind and message.
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::transport(&e)
    }
}

/// How a tool failed, as its server answered ([`Error::Tool`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolFailure {
    /// The tool ran and failed; the reason is the handler's.
    Failed(String),
    /// The server has no tool of that name.
    UnknownTool(String),
    /// The server refused the call (malformed request, overloaded…).
    Refused(String),
}

impl std::fmt::Display for ToolFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ToolFailure::Failed(r) => write!(f, "tool failed: {r}"),
            ToolFailure::UnknownTool(t) => write!(f, "unknown tool {t:?}"),
            ToolFailure::Refused(r) => write!(f, "tool call refused: {r}"),
        }
    }
}

/// Result with the fabric's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
