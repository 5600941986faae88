//! The fabric's errors as the protocol's error codes: what a client is told when an operation
//! fails.

use agentfabric::error::ToolFailure;
use agentfabric::tools::ToolError;
use agentfabric::Error;

use crate::wire::{ErrorCode, SidecarMsg};

/// An operation's failure: the code and the message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// The protocol's code.
    pub code: ErrorCode,
    /// What happened, for a person.
    pub message: String,
}

impl OpError {
    /// An error with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> OpError {
        OpError {
            code,
            message: message.into(),
        }
    }

    /// The `ERROR` message.
    pub fn into_msg(self) -> SidecarMsg {
        SidecarMsg::Error {
            code: self.code,
            message: self.message,
        }
    }
}

impl From<Error> for OpError {
    fn from(e: Error) -> OpError {
        let code = code_of(&e);
        let message = match &e {
            Error::Remote(reason) => reason.clone(),
            Error::ChannelRefused { reason, .. } => reason.clone(),
            _ => e.to_string(),
        };
        OpError { code, message }
    }
}

fn code_of(e: &Error) -> ErrorCode {
    match e {
        Error::MessageTooLarge { .. } => ErrorCode::TooBig,
        Error::PeerDead { .. } | Error::PeerRestarted => ErrorCode::PeerDead,
        Error::Closed | Error::ClosedByPeer(_) => ErrorCode::Closed,
        Error::Transport { .. } | Error::UnknownTransport(_) | Error::InvalidAddress(_) => {
            ErrorCode::ConnectFailed
        }
        Error::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        Error::Remote(_) => ErrorCode::Remote,
        Error::TooManyChannels { .. } => ErrorCode::Limit,
        Error::UnknownChannel(_) => ErrorCode::UnknownChannel,
        Error::InvalidPriority(_) | Error::InvalidChannelName(_) | Error::NotARequest => {
            ErrorCode::InvalidArgument
        }
        Error::Region(_) | Error::Transfer { .. } => ErrorCode::Transfer,
        Error::Cancelled => ErrorCode::Cancelled,
        Error::ChannelRefused { .. } => ErrorCode::Refused,
        Error::Tool(ToolFailure::Failed(_)) => ErrorCode::ToolFailed,
        Error::Tool(ToolFailure::UnknownTool(_)) => ErrorCode::NoSuchTool,
        Error::Tool(ToolFailure::Refused(_)) => ErrorCode::Refused,
        _ => ErrorCode::Internal,
    }
}

impl From<ToolError> for OpError {
    fn from(e: ToolError) -> OpError {
        match e {
            ToolError::DeadlineExceeded => {
                OpError::new(ErrorCode::DeadlineExceeded, "the call's deadline passed")
            }
            ToolError::Cancelled => OpError::new(ErrorCode::Cancelled, "the call was cancelled"),
            ToolError::Failed(reason) => OpError::new(ErrorCode::ToolFailed, reason),
            ToolError::UnknownTool(tool) => OpError::new(
                ErrorCode::NoSuchTool,
                format!("no endpoint serves tool {tool}"),
            ),
            ToolError::Refused(reason) => OpError::new(ErrorCode::Refused, reason),
            ToolError::PeerGone(e) | ToolError::Fabric(e) => OpError::from(e),
        }
    }
}

/// The code a channel's end is reported with (`CHANNEL_CLOSED`): a refusal by the other side is
/// its close.
pub fn close_code(e: &Error) -> ErrorCode {
    match e {
        Error::ChannelRefused { .. } => ErrorCode::Closed,
        other => code_of(other),
    }
}
