"""agentfabric: the Python client of the agentfabric sidecar.

The sidecar (``agentfabric sidecar``) holds one fabric node per host and serves local agents on
a Unix socket (``sidecar/PROTOCOL.md``). This package speaks that protocol, with no
dependencies::

    import agentfabric as af

    async with await af.connect("/run/agentfabric/sidecar.sock", "planner") as client:
        ch = await client.open("tcp://10.0.0.2:7000", "worker", label="plan")
        await ch.send(b"hello")
        reply = await ch.request(b"status?", deadline=5.0)

:mod:`agentfabric.sync` wraps the same API in blocking calls for scripts.
"""

from __future__ import annotations

from . import errors, sync
from .channel import Channel
from .client import SOCKET_ENV, Client, connect
from .errors import (
    BadFd,
    Cancelled,
    Closed,
    ConnectFailed,
    ConnectionLost,
    DeadlineExceeded,
    EndpointTaken,
    FabricError,
    InternalError,
    InvalidArgument,
    LimitReached,
    Malformed,
    NoSuchTool,
    PeerDead,
    PermissionDenied,
    Refused,
    RemoteError,
    TooBig,
    TooLarge,
    ToolFailed,
    TransferFailed,
    UnknownChannel,
    UnknownRegion,
    UnsupportedVersion,
    WindowExceeded,
)
from .region import Region
from .tools import PendingCall, ToolCall
from .values import DEFAULT_DEADLINE, Class, Message, Notification, TransferReport

__version__ = "0.1.0"

__all__ = [
    "connect",
    "Client",
    "Channel",
    "Region",
    "PendingCall",
    "ToolCall",
    "Class",
    "Message",
    "Notification",
    "TransferReport",
    "DEFAULT_DEADLINE",
    "SOCKET_ENV",
    "errors",
    "sync",
    "FabricError",
    "Malformed",
    "TooLarge",
    "UnsupportedVersion",
    "PermissionDenied",
    "EndpointTaken",
    "InvalidArgument",
    "UnknownChannel",
    "UnknownRegion",
    "WindowExceeded",
    "LimitReached",
    "DeadlineExceeded",
    "Cancelled",
    "PeerDead",
    "Refused",
    "ConnectFailed",
    "Closed",
    "TransferFailed",
    "ToolFailed",
    "NoSuchTool",
    "RemoteError",
    "BadFd",
    "TooBig",
    "InternalError",
    "ConnectionLost",
]
