//! Every message of the sidecar protocol, as Rust values. The kinds, field order and encodings
//! are `sidecar/PROTOCOL.md`'s; `codec` turns these into bytes and back.

use bytes::Bytes;

/// The protocol version this sidecar speaks.
pub const VERSION: u16 = 1;

/// Longest frame before `HELLO_OK` gives the negotiated one.
pub const HELLO_MAX_FRAME: u32 = 64 * 1024;

/// Frame kinds, client to sidecar.
pub mod kind {
    #![allow(missing_docs)]
    pub const HELLO: u16 = 0x0001;
    pub const PING: u16 = 0x0002;
    pub const OPEN: u16 = 0x0003;
    pub const CLOSE: u16 = 0x0004;
    pub const SEND: u16 = 0x0005;
    pub const REQUEST: u16 = 0x0006;
    pub const RESPOND: u16 = 0x0007;
    pub const RESPOND_ERROR: u16 = 0x0008;
    pub const SERVE: u16 = 0x0009;
    pub const UNSERVE: u16 = 0x000A;
    pub const CALL: u16 = 0x000B;
    pub const CANCEL: u16 = 0x000C;
    pub const TOOL_REPLY: u16 = 0x000D;
    pub const REGION_ADD: u16 = 0x000E;
    pub const REGION_DROP: u16 = 0x000F;
    pub const WRITE: u16 = 0x0010;
    pub const READ: u16 = 0x0011;
    pub const FLUSH: u16 = 0x0012;

    pub const HELLO_OK: u16 = 0x8001;
    pub const DONE: u16 = 0x8002;
    pub const ERROR: u16 = 0x8003;
    pub const OPENED: u16 = 0x8004;
    pub const RESPONSE: u16 = 0x8005;
    pub const RESULT: u16 = 0x8006;
    pub const REGION: u16 = 0x8007;
    pub const TRANSFERRED: u16 = 0x8008;
    pub const INCOMING: u16 = 0x8101;
    pub const MESSAGE: u16 = 0x8102;
    pub const CHANNEL_CLOSED: u16 = 0x8103;
    pub const TOOL_CALL: u16 = 0x8104;
    pub const TOOL_CANCELLED: u16 = 0x8105;
    pub const NOTIFICATION: u16 = 0x8106;
}

/// One tool-call target: an endpoint on the node at `url` (empty: this sidecar's node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The node's address, or empty for the sidecar's own node.
    pub url: String,
    /// The endpoint's name on that node.
    pub endpoint: String,
}

/// One block of a transfer (`WRITE`/`READ`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireBlock {
    /// Offset in the client's region.
    pub local: u64,
    /// Offset in the remote region.
    pub remote: u64,
    /// Bytes.
    pub len: u64,
}

/// The body of `WRITE` and `READ`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRequest {
    /// The channel whose peer holds the remote region.
    pub channel: u32,
    /// The client's region handle.
    pub region: u32,
    /// Milliseconds; 0 for the sidecar's default.
    pub deadline_ms: u32,
    /// `Some(tag)`: notify the region's owner with `tag`.
    pub notify: Option<u64>,
    /// The remote region's descriptor, as its owner's `REGION` gave it.
    pub descriptor: Bytes,
    /// The blocks.
    pub blocks: Vec<WireBlock>,
}

/// A frame from a client: the operation id and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromClient {
    /// The operation id (0 only for `HELLO`).
    pub id: u64,
    /// The message.
    pub msg: ClientMsg,
}

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // the fields are PROTOCOL.md's, named as there
pub enum ClientMsg {
    Hello {
        min_version: u16,
        max_version: u16,
        endpoint: String,
    },
    Ping,
    Open {
        class: u8,
        priority: u8,
        url: String,
        endpoint: String,
        label: String,
    },
    Close {
        channel: u32,
        reason: String,
    },
    Send {
        channel: u32,
        body: Bytes,
    },
    Request {
        channel: u32,
        deadline_ms: u32,
        body: Bytes,
    },
    Respond {
        channel: u32,
        request: u64,
        body: Bytes,
    },
    RespondError {
        channel: u32,
        request: u64,
        reason: String,
    },
    Serve {
        tool: String,
    },
    Unserve {
        tool: String,
    },
    Call {
        deadline_ms: u32,
        hedged: bool,
        retries: u8,
        tool: String,
        targets: Vec<Target>,
        /// `Some` when flags bit 1 is set (never empty then).
        key: Option<Bytes>,
        args: Bytes,
    },
    Cancel {
        call: u64,
    },
    ToolReply {
        call: u64,
        ok: bool,
        body: Bytes,
    },
    /// The file descriptor travels beside the frame (`SCM_RIGHTS`), not in it.
    RegionAdd {
        len: u64,
    },
    RegionDrop {
        region: u32,
    },
    Write(TransferRequest),
    Read(TransferRequest),
    Flush {
        channel: u32,
    },
}

/// A frame to a client: the operation id (or the call handle, or 0) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToClient {
    /// As PROTOCOL.md says for the kind.
    pub id: u64,
    /// The message.
    pub msg: SidecarMsg,
}

/// What the sidecar sends.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // the fields are PROTOCOL.md's, named as there
pub enum SidecarMsg {
    HelloOk {
        version: u16,
        node: String,
        endpoint: String,
        uid: u32,
        pid: u32,
        max_frame: u32,
        max_ops: u32,
        send_window: u32,
    },
    Done,
    Error {
        code: ErrorCode,
        message: String,
    },
    Opened {
        channel: u32,
        node: String,
    },
    Response {
        body: Bytes,
    },
    Result {
        body: Bytes,
    },
    Region {
        region: u32,
        len: u64,
        descriptor: Bytes,
    },
    Transferred {
        bytes: u64,
        blocks: u32,
        elapsed_ns: u64,
    },
    Incoming {
        channel: u32,
        class: u8,
        priority: u8,
        node: String,
        endpoint: String,
        label: String,
    },
    Message {
        channel: u32,
        request: u64,
        body: Bytes,
    },
    ChannelClosed {
        channel: u32,
        code: ErrorCode,
        reason: String,
    },
    ToolCall {
        tool: String,
        node: String,
        deadline_ms: u32,
        idempotent: bool,
        key: Bytes,
        args: Bytes,
    },
    ToolCancelled,
    Notification {
        region: u32,
        tag: u64,
        node: String,
    },
}

/// The error codes of PROTOCOL.md. A code this version does not know decodes as `Internal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[allow(missing_docs)] // each is PROTOCOL.md's row of the same name
pub enum ErrorCode {
    Malformed = 1,
    TooLarge = 2,
    UnsupportedVersion = 3,
    PermissionDenied = 4,
    EndpointTaken = 5,
    InvalidArgument = 6,
    UnknownChannel = 7,
    UnknownRegion = 8,
    WindowExceeded = 9,
    Limit = 10,
    DeadlineExceeded = 11,
    Cancelled = 12,
    PeerDead = 13,
    Refused = 14,
    ConnectFailed = 15,
    Closed = 16,
    Transfer = 17,
    ToolFailed = 18,
    NoSuchTool = 19,
    Remote = 20,
    BadFd = 21,
    TooBig = 22,
    Internal = 23,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 23] = [
        ErrorCode::Malformed,
        ErrorCode::TooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::PermissionDenied,
        ErrorCode::EndpointTaken,
        ErrorCode::InvalidArgument,
        ErrorCode::UnknownChannel,
        ErrorCode::UnknownRegion,
        ErrorCode::WindowExceeded,
        ErrorCode::Limit,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Cancelled,
        ErrorCode::PeerDead,
        ErrorCode::Refused,
        ErrorCode::ConnectFailed,
        ErrorCode::Closed,
        ErrorCode::Transfer,
        ErrorCode::ToolFailed,
        ErrorCode::NoSuchTool,
        ErrorCode::Remote,
        ErrorCode::BadFd,
        ErrorCode::TooBig,
        ErrorCode::Internal,
    ];

    /// The code for a number; unknown numbers are `Internal`, as PROTOCOL.md tells clients.
    pub fn from_u16(v: u16) -> ErrorCode {
        ErrorCode::ALL
            .get(usize::from(v).wrapping_sub(1))
            .copied()
            .unwrap_or(ErrorCode::Internal)
    }

    /// Whether an `ERROR` with this code ends the connection.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::Malformed
                | ErrorCode::TooLarge
                | ErrorCode::UnsupportedVersion
                | ErrorCode::PermissionDenied
                | ErrorCode::EndpointTaken
                | ErrorCode::WindowExceeded
        )
    }
}
