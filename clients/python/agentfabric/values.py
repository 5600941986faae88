"""The small value types the client hands out: channel classes, messages, notifications and
transfer reports."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

__all__ = ["Class", "Message", "Notification", "TransferReport", "DEFAULT_DEADLINE"]

#: The deadline (seconds) of requests and tool calls that give none.
DEFAULT_DEADLINE = 30.0


class Class(enum.IntEnum):
    """A channel's traffic class: scheduling on the shared sessions keys on it."""

    COORDINATION = 0
    TOOL_CALL = 1
    BULK = 2


class Message(NamedTuple):
    """One message received on a channel.

    Attributes:
        body: the message's bytes.
        request: nonzero when the message is a request: answer it with
            :meth:`Channel.respond` or :meth:`Channel.respond_error`.
    """

    body: bytes
    request: int = 0


class Notification(NamedTuple):
    """A peer's transfer into one of this client's regions completed.

    Attributes:
        region: the :class:`~agentfabric.region.Region` (a ``SyncRegion`` from
            :mod:`agentfabric.sync`; the handle, an ``int``, if the client no longer knows it).
        tag: the tag the peer's transfer gave.
        node: the peer node's name.
    """

    region: Any
    tag: int
    node: str


class TransferReport(NamedTuple):
    """What a region ``write``/``read`` moved.

    Attributes:
        bytes: bytes moved.
        blocks: blocks moved.
        elapsed: seconds the transfer took, as the sidecar measured it.
    """

    bytes: int
    blocks: int
    elapsed: float
