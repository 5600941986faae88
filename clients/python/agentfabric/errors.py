"""The errors of the agentfabric client.

Every error is a :class:`FabricError` with ``.code`` (the protocol's error code, or 0 for
:class:`ConnectionLost`, which no frame carries) and ``.message``. There is one subclass per
error code of ``sidecar/PROTOCOL.md``; :func:`error_from_code` maps a code to its class, and a
code this version does not know maps to :class:`InternalError`, as the protocol tells clients.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

__all__ = [
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
    "error_from_code",
    "FATAL_CODES",
]


class FabricError(Exception):
    """Base of every agentfabric error.

    Attributes:
        code: the protocol error code (``CODE`` of the subclass unless given), 0 for errors that
            no frame carries (:class:`ConnectionLost`).
        message: the human-readable text (the sidecar's message, or the client's).
    """

    #: The protocol error code of this class.
    CODE: int = 23
    #: The protocol's name for the code.
    NAME: str = "INTERNAL"

    def __init__(self, message: str = "", code: Optional[int] = None) -> None:
        super().__init__(message)
        self.message: str = message
        self.code: int = self.CODE if code is None else code

    def __str__(self) -> str:
        return self.message or self.NAME

    def __repr__(self) -> str:
        return "%s(%r, code=%d)" % (type(self).__name__, self.message, self.code)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.message, self.code))


class Malformed(FabricError):
    """A frame the protocol does not allow (fatal for the connection)."""

    CODE = 1
    NAME = "MALFORMED"


class TooLarge(FabricError):
    """A frame longer than ``max_frame`` (fatal for the connection)."""

    CODE = 2
    NAME = "TOO_LARGE"


class UnsupportedVersion(FabricError):
    """The client and the sidecar have no protocol version in common (fatal)."""

    CODE = 3
    NAME = "UNSUPPORTED_VERSION"


class PermissionDenied(FabricError):
    """The client's uid is not allowed by the sidecar (fatal)."""

    CODE = 4
    NAME = "PERMISSION_DENIED"


class EndpointTaken(FabricError):
    """Another client of the sidecar holds the endpoint name (fatal)."""

    CODE = 5
    NAME = "ENDPOINT_TAKEN"


class InvalidArgument(FabricError):
    """A value out of range: a name, class, priority, deadline or block range."""

    CODE = 6
    NAME = "INVALID_ARGUMENT"


class UnknownChannel(FabricError):
    """No such channel handle on this connection."""

    CODE = 7
    NAME = "UNKNOWN_CHANNEL"


class UnknownRegion(FabricError):
    """No such region handle on this connection."""

    CODE = 8
    NAME = "UNKNOWN_REGION"


class WindowExceeded(FabricError):
    """More sends in flight on a channel than ``send_window`` (fatal)."""

    CODE = 9
    NAME = "WINDOW_EXCEEDED"


class LimitReached(FabricError):
    """A per-client limit (channels, regions, served tools) is reached."""

    CODE = 10
    NAME = "LIMIT"


class DeadlineExceeded(FabricError, TimeoutError):
    """The deadline passed. Also a :class:`TimeoutError`."""

    CODE = 11
    NAME = "DEADLINE_EXCEEDED"


class Cancelled(FabricError):
    """The operation was cancelled (not an :class:`asyncio.CancelledError`: it cancels no task)."""

    CODE = 12
    NAME = "CANCELLED"


class PeerDead(FabricError):
    """The peer node stopped answering, or restarted."""

    CODE = 13
    NAME = "PEER_DEAD"


class Refused(FabricError):
    """The peer refused: no such endpoint, or the channel was refused."""

    CODE = 14
    NAME = "REFUSED"


class ConnectFailed(FabricError):
    """The peer (or the sidecar's socket) could not be reached, or the address is invalid."""

    CODE = 15
    NAME = "CONNECT_FAILED"


class Closed(FabricError):
    """The channel, the session or the sidecar was closed (a channel's normal end)."""

    CODE = 16
    NAME = "CLOSED"


class TransferFailed(FabricError):
    """A transfer failed: a range out of bounds, a revoked region, a bad descriptor."""

    CODE = 17
    NAME = "TRANSFER"


class ToolFailed(FabricError):
    """The tool ran and failed; the message is its reason."""

    CODE = 18
    NAME = "TOOL_FAILED"


class NoSuchTool(FabricError):
    """No endpoint serves the tool."""

    CODE = 19
    NAME = "NO_SUCH_TOOL"


class RemoteError(FabricError):
    """The responder answered a request with an error; the message is its reason."""

    CODE = 20
    NAME = "REMOTE"


class BadFd(FabricError):
    """A region's file descriptor was missing or cannot be mapped for its length."""

    CODE = 21
    NAME = "BAD_FD"


class TooBig(FabricError):
    """A message or argument larger than the fabric or the frame allows."""

    CODE = 22
    NAME = "TOO_BIG"


class InternalError(FabricError):
    """Anything else (the message says what); also every code this client does not know."""

    CODE = 23
    NAME = "INTERNAL"


class ConnectionLost(FabricError):
    """The connection to the sidecar ended; every pending operation fails with this.

    When the sidecar ended it with a fatal ``ERROR``, that error is ``__cause__``.
    """

    CODE = 0
    NAME = "CONNECTION_LOST"


_BY_CODE: Dict[int, Type[FabricError]] = {
    cls.CODE: cls
    for cls in (
        Malformed,
        TooLarge,
        UnsupportedVersion,
        PermissionDenied,
        EndpointTaken,
        InvalidArgument,
        UnknownChannel,
        UnknownRegion,
        WindowExceeded,
        LimitReached,
        DeadlineExceeded,
        Cancelled,
        PeerDead,
        Refused,
        ConnectFailed,
        Closed,
        TransferFailed,
        ToolFailed,
        NoSuchTool,
        RemoteError,
        BadFd,
        TooBig,
        InternalError,
    )
}

#: The codes after which the sidecar closes the connection.
FATAL_CODES = frozenset(
    (
        Malformed.CODE,
        TooLarge.CODE,
        UnsupportedVersion.CODE,
        PermissionDenied.CODE,
        EndpointTaken.CODE,
        WindowExceeded.CODE,
    )
)


def error_from_code(code: int, message: str) -> FabricError:
    """The exception for a protocol error ``code`` (unknown codes: :class:`InternalError`,
    keeping the number in ``.code``)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return InternalError(message, code)
    return cls(message)
