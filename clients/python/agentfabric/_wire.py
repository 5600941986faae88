"""The sidecar protocol's frames (``sidecar/PROTOCOL.md``, version 1) as Python values.

Every frame is a 16-byte header (``u32 len``, ``u16 kind``, ``u16 flags``, ``u64 id``; ``len``
counts the 12 header bytes after it plus the body) and a body. Each message is a
:class:`typing.NamedTuple` whose fields are the protocol's, named as there; :func:`kind_of` gives its frame
kind. :func:`encode` turns ``(id, message)`` into a frame, and the decoders are *total*: any
bytes give a message or raise :class:`~agentfabric.errors.Malformed` (or
:class:`~agentfabric.errors.TooLarge` for a frame longer than ``max_frame``), never another
exception. Encoding a value the wire cannot carry raises
:class:`~agentfabric.errors.InvalidArgument`.

Decoding is also exact, as the sidecar's: a body decodes only if encoding the message gives it
back byte for byte (so a ``CALL`` key without flags bit 1, or a ``WRITE`` tag with ``notify`` 0,
is malformed rather than dropped).

Both directions are here: the client encodes client frames and decodes sidecar frames; the other
two halves serve tests and fake sidecars.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

from .errors import FabricError, InvalidArgument, Malformed, TooLarge

#: The protocol version this client speaks.
VERSION = 1
#: Length of the frame header.
HEADER_LEN = 16
#: The longest frame before ``HELLO_OK`` gives the sidecar's ``max_frame``.
HELLO_MAX_FRAME = 64 * 1024
#: The sidecar's default ``max_frame``.
DEFAULT_MAX_FRAME = 16 * 1024 * 1024 + 64 * 1024

# Client -> sidecar kinds.
HELLO = 0x0001
PING = 0x0002
OPEN = 0x0003
CLOSE = 0x0004
SEND = 0x0005
REQUEST = 0x0006
RESPOND = 0x0007
RESPOND_ERROR = 0x0008
SERVE = 0x0009
UNSERVE = 0x000A
CALL = 0x000B
CANCEL = 0x000C
TOOL_REPLY = 0x000D
REGION_ADD = 0x000E
REGION_DROP = 0x000F
WRITE = 0x0010
READ = 0x0011
FLUSH = 0x0012
# Sidecar -> client kinds.
HELLO_OK = 0x8001
DONE = 0x8002
ERROR = 0x8003
OPENED = 0x8004
RESPONSE = 0x8005
RESULT = 0x8006
REGION = 0x8007
TRANSFERRED = 0x8008
INCOMING = 0x8101
MESSAGE = 0x8102
CHANNEL_CLOSED = 0x8103
TOOL_CALL = 0x8104
TOOL_CANCELLED = 0x8105
NOTIFICATION = 0x8106

#: ``CALL`` flags.
CALL_HEDGED = 0x01
CALL_KEYED = 0x02

# Prebuilt structs; the ``_HDR_*`` ones are a header and a kind's leading fields in one pack.
HEADER = struct.Struct("<IHHQ")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HDR_SEND = struct.Struct("<IHHQI")
_HDR_REQUEST = struct.Struct("<IHHQII")
_HDR_RESPOND = struct.Struct("<IHHQIQ")
_MESSAGE_HEAD = struct.Struct("<IQ")
_BLOCK = struct.Struct("<QQQ")
_S_HH = struct.Struct("<HH")
_S_BB = struct.Struct("<BB")
_S_IH = struct.Struct("<IH")
_S_II = struct.Struct("<II")
_S_IQ = struct.Struct("<IQ")
_S_IIIBQ = struct.Struct("<IIIBQ")
_S_IBB = struct.Struct("<IBB")
_S_QIQ = struct.Struct("<QIQ")
_S_IIIII = struct.Struct("<IIIII")

Buffer = Union[bytes, bytearray, memoryview]


# --------------------------------------------------------------------------------------------
# Messages, client -> sidecar


class Hello(NamedTuple):
    """``HELLO``: the first frame; asks for a version in ``[min_version, max_version]``."""

    min_version: int
    max_version: int
    endpoint: str


class Ping(NamedTuple):
    """``PING``: answered with ``DONE``."""



class Open(NamedTuple):
    """``OPEN``: a channel to ``endpoint`` on the node at ``url`` ("" is the sidecar's node)."""

    klass: int
    priority: int
    url: str
    endpoint: str
    label: str


class Close(NamedTuple):
    """``CLOSE``: closes (or refuses) a channel."""

    channel: int
    reason: str


class Send(NamedTuple):
    """``SEND``: ``body`` in order on the channel."""

    channel: int
    body: bytes


class Request(NamedTuple):
    """``REQUEST``: ``body`` as a request, answered within ``deadline_ms``."""

    channel: int
    deadline_ms: int
    body: bytes


class Respond(NamedTuple):
    """``RESPOND``: answers the ``MESSAGE`` whose ``request`` this is."""

    channel: int
    request: int
    body: bytes


class RespondError(NamedTuple):
    """``RESPOND_ERROR``: answers a request with a failure ``reason``."""

    channel: int
    request: int
    reason: str


class Serve(NamedTuple):
    """``SERVE``: this endpoint serves ``tool``."""

    tool: str


class Unserve(NamedTuple):
    """``UNSERVE``: stops serving ``tool``."""

    tool: str


class Call(NamedTuple):
    """``CALL``: calls ``tool`` on ``targets`` (``(url, endpoint)`` pairs).

    ``key`` is ``None`` without an idempotency key (flags bit 1 clear), else non-empty bytes.
    """

    deadline_ms: int
    hedged: bool
    retries: int
    tool: str
    targets: Tuple[Tuple[str, str], ...]
    key: Optional[bytes]
    args: bytes


class Cancel(NamedTuple):
    """``CANCEL``: cancels the ``CALL`` whose operation id is ``call``."""

    call: int


class ToolReply(NamedTuple):
    """``TOOL_REPLY``: the answer to ``TOOL_CALL`` ``call`` (``ok`` False: body is the reason)."""

    call: int
    ok: bool
    body: bytes


class RegionAdd(NamedTuple):
    """``REGION_ADD``: registers ``len`` bytes of the file descriptor sent beside the frame."""

    len: int


class RegionDrop(NamedTuple):
    """``REGION_DROP``: revokes and unmaps a region."""

    region: int


class Write(NamedTuple):
    """``WRITE``: moves ``blocks`` (``(local, remote, len)``) from ``region`` to the peer's.

    ``notify`` is ``None`` for no notification, else the tag the peer is notified with.
    """

    channel: int
    region: int
    deadline_ms: int
    notify: Optional[int]
    descriptor: bytes
    blocks: Tuple[Tuple[int, int, int], ...]


class Read(NamedTuple):
    """``READ``: moves ``blocks`` from the peer's region into ``region``; fields as :class:`Write`."""

    channel: int
    region: int
    deadline_ms: int
    notify: Optional[int]
    descriptor: bytes
    blocks: Tuple[Tuple[int, int, int], ...]


class Flush(NamedTuple):
    """``FLUSH``: answered once every earlier ``SEND`` of ``channel`` is."""

    channel: int


# --------------------------------------------------------------------------------------------
# Messages, sidecar -> client


class HelloOk(NamedTuple):
    """``HELLO_OK``: the agreed version, the client's identity and the limits."""

    version: int
    node: str
    endpoint: str
    uid: int
    pid: int
    max_frame: int
    max_ops: int
    send_window: int


class Done(NamedTuple):
    """``DONE``: an operation succeeded."""



class Error(NamedTuple):
    """``ERROR``: an operation failed (``id`` 0: fatal)."""

    code: int
    message: str


class Opened(NamedTuple):
    """``OPENED``: the channel handle and the peer node's name."""

    channel: int
    node: str


class Response(NamedTuple):
    """``RESPONSE``: the answer to a ``REQUEST``."""

    body: bytes


class Result(NamedTuple):
    """``RESULT``: the answer to a ``CALL``."""

    body: bytes


class Region(NamedTuple):
    """``REGION``: a registered region's handle, length and descriptor."""

    region: int
    len: int
    descriptor: bytes


class Transferred(NamedTuple):
    """``TRANSFERRED``: a ``WRITE``/``READ`` completed."""

    bytes: int
    blocks: int
    elapsed_ns: int


class Incoming(NamedTuple):
    """``INCOMING``: a peer opened a channel to this endpoint."""

    channel: int
    klass: int
    priority: int
    node: str
    endpoint: str
    label: str


class Message(NamedTuple):
    """``MESSAGE``: one message of a channel (``request`` 0: not a request)."""

    channel: int
    request: int
    body: bytes


class ChannelClosed(NamedTuple):
    """``CHANNEL_CLOSED``: the channel ended, with an error code and a reason."""

    channel: int
    code: int
    reason: str


class ToolCall(NamedTuple):
    """``TOOL_CALL``: a call of a tool this endpoint serves (the frame id is the call)."""

    tool: str
    node: str
    deadline_ms: int
    idempotent: bool
    key: bytes
    args: bytes


class ToolCancelled(NamedTuple):
    """``TOOL_CANCELLED``: the call (the frame id) was cancelled or timed out."""



class Notification(NamedTuple):
    """``NOTIFICATION``: a peer's transfer into ``region`` completed with ``tag``."""

    region: int
    tag: int
    node: str


ClientMsg = Union[
    Hello, Ping, Open, Close, Send, Request, Respond, RespondError, Serve, Unserve, Call,
    Cancel, ToolReply, RegionAdd, RegionDrop, Write, Read, Flush,
]
SidecarMsg = Union[
    HelloOk, Done, Error, Opened, Response, Result, Region, Transferred, Incoming, Message,
    ChannelClosed, ToolCall, ToolCancelled, Notification,
]


# --------------------------------------------------------------------------------------------
# Encoding


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > 0xFFFF:
        raise InvalidArgument("a string of %d bytes (at most 65535)" % len(b))
    return _U16.pack(len(b)) + b


def _blob(b: Buffer) -> bytes:
    b = bytes(b)
    if len(b) > 0xFFFFFFFF:
        raise InvalidArgument("a blob of %d bytes (at most 2^32 - 1)" % len(b))
    return _U32.pack(len(b)) + b


def _transfer_body(m: Union[Write, Read]) -> bytes:
    notify = m.notify is not None
    parts = [
        _S_IIIBQ.pack(m.channel, m.region, m.deadline_ms, int(notify),
                      m.notify if notify else 0),
        _blob(m.descriptor),
        _U32.pack(len(m.blocks)),
    ]
    parts.extend(_BLOCK.pack(*blk) for blk in m.blocks)
    return b"".join(parts)


def _call_body(m: Call) -> bytes:
    flags = (CALL_HEDGED if m.hedged else 0) | (CALL_KEYED if m.key is not None else 0)
    if m.key is not None and len(m.key) == 0:
        raise InvalidArgument("an idempotency key must not be empty")
    parts = [struct.pack("<IBB", m.deadline_ms, flags, m.retries), _str(m.tool),
             _U16.pack(len(m.targets))]
    for url, endpoint in m.targets:
        parts.append(_str(url))
        parts.append(_str(endpoint))
    parts.append(_blob(m.key if m.key is not None else b""))
    parts.append(bytes(m.args))
    return b"".join(parts)


def _b_hello(m: Hello) -> bytes:
    return struct.pack("<HH", m.min_version, m.max_version) + _str(m.endpoint)


def _b_open(m: Open) -> bytes:
    return struct.pack("<BB", m.klass, m.priority) + _str(m.url) + _str(m.endpoint) + _str(m.label)


def _b_hello_ok(m: HelloOk) -> bytes:
    return (_U16.pack(m.version) + _str(m.node) + _str(m.endpoint)
            + struct.pack("<IIIII", m.uid, m.pid, m.max_frame, m.max_ops, m.send_window))


def _b_incoming(m: Incoming) -> bytes:
    return (struct.pack("<IBB", m.channel, m.klass, m.priority) + _str(m.node)
            + _str(m.endpoint) + _str(m.label))


def _b_tool_call(m: ToolCall) -> bytes:
    return (_str(m.tool) + _str(m.node)
            + struct.pack("<IB", m.deadline_ms, 1 if m.idempotent else 0) + _blob(m.key)
            + bytes(m.args))


def _empty(m: Any) -> bytes:
    return b""


# type -> (kind, body encoder)
_ENCODERS: Dict[type, Tuple[int, Callable[[Any], bytes]]] = {
    Hello: (HELLO, _b_hello),
    Ping: (PING, _empty),
    Open: (OPEN, _b_open),
    Close: (CLOSE, lambda m: _U32.pack(m.channel) + _str(m.reason)),
    Send: (SEND, lambda m: _U32.pack(m.channel) + bytes(m.body)),
    Request: (REQUEST, lambda m: _S_II.pack(m.channel, m.deadline_ms) + bytes(m.body)),
    Respond: (RESPOND, lambda m: _S_IQ.pack(m.channel, m.request) + bytes(m.body)),
    RespondError: (RESPOND_ERROR, lambda m: _S_IQ.pack(m.channel, m.request) + _str(m.reason)),
    Serve: (SERVE, lambda m: _str(m.tool)),
    Unserve: (UNSERVE, lambda m: _str(m.tool)),
    Call: (CALL, _call_body),
    Cancel: (CANCEL, lambda m: _U64.pack(m.call)),
    ToolReply: (TOOL_REPLY, lambda m: struct.pack("<QB", m.call, 1 if m.ok else 0) + bytes(m.body)),
    RegionAdd: (REGION_ADD, lambda m: _U64.pack(m.len)),
    RegionDrop: (REGION_DROP, lambda m: _U32.pack(m.region)),
    Write: (WRITE, _transfer_body),
    Read: (READ, _transfer_body),
    Flush: (FLUSH, lambda m: _U32.pack(m.channel)),
    HelloOk: (HELLO_OK, _b_hello_ok),
    Done: (DONE, _empty),
    Error: (ERROR, lambda m: _U16.pack(m.code) + _str(m.message)),
    Opened: (OPENED, lambda m: _U32.pack(m.channel) + _str(m.node)),
    Response: (RESPONSE, lambda m: bytes(m.body)),
    Result: (RESULT, lambda m: bytes(m.body)),
    Region: (REGION, lambda m: _S_IQ.pack(m.region, m.len) + _blob(m.descriptor)),
    Transferred: (TRANSFERRED, lambda m: _S_QIQ.pack(m.bytes, m.blocks, m.elapsed_ns)),
    Incoming: (INCOMING, _b_incoming),
    Message: (MESSAGE, lambda m: _MESSAGE_HEAD.pack(m.channel, m.request) + bytes(m.body)),
    ChannelClosed: (CHANNEL_CLOSED, lambda m: _S_IH.pack(m.channel, m.code) + _str(m.reason)),
    ToolCall: (TOOL_CALL, _b_tool_call),
    ToolCancelled: (TOOL_CANCELLED, _empty),
    Notification: (NOTIFICATION, lambda m: _S_IQ.pack(m.region, m.tag) + _str(m.node)),
}


def kind_of(msg: Union[ClientMsg, SidecarMsg]) -> int:
    """The frame kind of a message value."""
    return _ENCODERS[type(msg)][0]




def encode(op: int, msg: Union[ClientMsg, SidecarMsg]) -> bytes:
    """The frame of ``msg`` with id ``op``.

    Raises:
        InvalidArgument: a field the wire cannot carry (an integer out of its range, a string
            longer than 65535 bytes, an empty idempotency key).
    """
    try:
        kind, body_of = _ENCODERS[type(msg)]
        body = body_of(msg)
        return HEADER.pack(12 + len(body), kind, 0, op) + body
    except struct.error as e:
        raise InvalidArgument("%s: %s" % (type(msg).__name__, e)) from None
    except KeyError:
        raise InvalidArgument("not a protocol message: %r" % (msg,)) from None


def send_frame(op: int, channel: int, body: Buffer, nbytes: int) -> bytes:
    """The ``SEND`` frame (the hot path: one pack, one concatenation); ``nbytes`` is the length
    of ``body`` in bytes."""
    return _HDR_SEND.pack(16 + nbytes, SEND, 0, op, channel) + body


def request_frame(op: int, channel: int, deadline_ms: int, body: Buffer, nbytes: int) -> bytes:
    """The ``REQUEST`` frame."""
    return _HDR_REQUEST.pack(20 + nbytes, REQUEST, 0, op, channel, deadline_ms) + body


def respond_frame(op: int, channel: int, request: int, body: Buffer, nbytes: int) -> bytes:
    """The ``RESPOND`` frame."""
    return _HDR_RESPOND.pack(24 + nbytes, RESPOND, 0, op, channel, request) + body


# --------------------------------------------------------------------------------------------
# Decoding


class _Reader:
    """A cursor over a body; every read checks the bounds and raises :class:`Malformed`."""

    __slots__ = ("b", "p", "n", "what")

    def __init__(self, body: Buffer, what: str) -> None:
        self.b = body
        self.p = 0
        self.n = len(body)
        self.what = what

    def _take(self, k: int) -> int:
        p = self.p
        if self.n - p < k:
            raise Malformed("%s: body too short" % self.what)
        self.p = p + k
        return p

    def unpack(self, st: struct.Struct) -> Tuple[int, ...]:
        return st.unpack_from(self.b, self._take(st.size))

    def u8(self) -> int:
        v: int = _U8.unpack_from(self.b, self._take(1))[0]
        return v

    def u16(self) -> int:
        v: int = _U16.unpack_from(self.b, self._take(2))[0]
        return v

    def u32(self) -> int:
        v: int = _U32.unpack_from(self.b, self._take(4))[0]
        return v

    def u64(self) -> int:
        v: int = _U64.unpack_from(self.b, self._take(8))[0]
        return v

    def flag(self, field: str) -> bool:
        v = self.u8()
        if v > 1:
            raise Malformed("%s: %s is %d, not 0 or 1" % (self.what, field, v))
        return v == 1

    def text(self) -> str:
        k = self.u16()
        p = self._take(k)
        try:
            return str(self.b[p:p + k], "utf-8")
        except UnicodeDecodeError:
            raise Malformed("%s: a string that is not UTF-8" % self.what) from None

    def blob(self) -> bytes:
        k = self.u32()
        p = self._take(k)
        return bytes(self.b[p:p + k])

    def rest(self) -> bytes:
        p = self.p
        self.p = self.n
        return bytes(self.b[p:])

    def end(self) -> None:
        if self.p != self.n:
            raise Malformed("%s: %d bytes after the last field" % (self.what, self.n - self.p))



def _channel(r: _Reader, v: int) -> int:
    if v == 0:
        raise Malformed("%s: channel handle 0" % r.what)
    return v


def _klass_priority(r: _Reader, klass: int, priority: int) -> None:
    if klass > 2:
        raise Malformed("%s: class %d (0-2)" % (r.what, klass))
    if priority > 7:
        raise Malformed("%s: priority %d (0-7)" % (r.what, priority))


def _d_hello(r: _Reader) -> Hello:
    lo, hi = r.unpack(_S_HH)
    return Hello(lo, hi, r.text())


def _d_open(r: _Reader) -> Open:
    klass, priority = r.unpack(_S_BB)
    _klass_priority(r, klass, priority)
    return Open(klass, priority, r.text(), r.text(), r.text())


def _d_close(r: _Reader) -> Close:
    return Close(_channel(r, r.u32()), r.text())


def _d_send(r: _Reader) -> Send:
    return Send(_channel(r, r.u32()), r.rest())


def _d_request(r: _Reader) -> Request:
    channel, deadline_ms = r.unpack(_S_II)
    return Request(_channel(r, channel), deadline_ms, r.rest())


def _d_respond(r: _Reader) -> Respond:
    channel, request = r.unpack(_S_IQ)
    return Respond(_channel(r, channel), request, r.rest())


def _d_respond_error(r: _Reader) -> RespondError:
    channel, request = r.unpack(_S_IQ)
    return RespondError(_channel(r, channel), request, r.text())


def _d_call(r: _Reader) -> Call:
    deadline_ms = r.u32()
    flags = r.u8()
    retries = r.u8()
    if flags & ~(CALL_HEDGED | CALL_KEYED):
        raise Malformed("CALL: unknown flags 0x%02x" % flags)
    tool = r.text()
    n = r.u16()
    targets = tuple((r.text(), r.text()) for _ in range(n))
    key = r.blob()
    if flags & CALL_KEYED:
        if not key:
            raise Malformed("CALL: an empty idempotency key")
    elif key:
        raise Malformed("CALL: a key without the key flag")
    return Call(deadline_ms, bool(flags & CALL_HEDGED), retries, tool, targets,
                key if flags & CALL_KEYED else None, r.rest())


def _d_tool_reply(r: _Reader) -> ToolReply:
    call = r.u64()
    return ToolReply(call, r.flag("ok"), r.rest())


def _d_transfer(cls: type) -> Callable[[_Reader], Union[Write, Read]]:
    def dec(r: _Reader) -> Union[Write, Read]:
        channel, region, deadline_ms, notify, tag = r.unpack(_S_IIIBQ)
        if notify > 1:
            raise Malformed("%s: notify is %d, not 0 or 1" % (r.what, notify))
        if not notify and tag:
            raise Malformed("%s: tag %d with notify 0" % (r.what, tag))
        descriptor = r.blob()
        n = r.u32()
        if (r.n - r.p) != n * _BLOCK.size:
            raise Malformed("%s: %d blocks do not fit the body" % (r.what, n))
        blocks = tuple(_BLOCK.unpack_from(r.b, r._take(_BLOCK.size)) for _ in range(n))
        msg: Union[Write, Read] = cls(_channel(r, channel), region, deadline_ms,
                                      tag if notify else None, descriptor, blocks)
        return msg

    return dec


def _d_hello_ok(r: _Reader) -> HelloOk:
    version = r.u16()
    node = r.text()
    endpoint = r.text()
    return HelloOk(version, node, endpoint, *r.unpack(_S_IIIII))


def _d_incoming(r: _Reader) -> Incoming:
    channel, klass, priority = r.unpack(_S_IBB)
    _klass_priority(r, klass, priority)
    return Incoming(_channel(r, channel), klass, priority, r.text(), r.text(), r.text())


def _d_message(r: _Reader) -> Message:
    channel, request = r.unpack(_MESSAGE_HEAD)
    return Message(_channel(r, channel), request, r.rest())


def _d_channel_closed(r: _Reader) -> ChannelClosed:
    channel, code = r.unpack(_S_IH)
    return ChannelClosed(_channel(r, channel), code, r.text())


def _d_region(r: _Reader) -> Region:
    region, length = r.unpack(_S_IQ)
    return Region(region, length, r.blob())


def _d_notification(r: _Reader) -> Notification:
    region, tag = r.unpack(_S_IQ)
    return Notification(region, tag, r.text())


def _d_tool_call(r: _Reader) -> ToolCall:
    tool = r.text()
    node = r.text()
    deadline_ms = r.u32()
    idempotent = r.flag("idempotent")
    return ToolCall(tool, node, deadline_ms, idempotent, r.blob(), r.rest())


# kind -> (decoder, id rule): "0" the id must be 0, "op" nonzero, "any" either.
_FROM_CLIENT: Dict[int, Tuple[str, Callable[[_Reader], Any], str]] = {
    HELLO: ("HELLO", _d_hello, "0"),
    PING: ("PING", lambda r: Ping(), "op"),
    OPEN: ("OPEN", _d_open, "op"),
    CLOSE: ("CLOSE", _d_close, "op"),
    SEND: ("SEND", _d_send, "op"),
    REQUEST: ("REQUEST", _d_request, "op"),
    RESPOND: ("RESPOND", _d_respond, "op"),
    RESPOND_ERROR: ("RESPOND_ERROR", _d_respond_error, "op"),
    SERVE: ("SERVE", lambda r: Serve(r.text()), "op"),
    UNSERVE: ("UNSERVE", lambda r: Unserve(r.text()), "op"),
    CALL: ("CALL", _d_call, "op"),
    CANCEL: ("CANCEL", lambda r: Cancel(r.u64()), "op"),
    TOOL_REPLY: ("TOOL_REPLY", _d_tool_reply, "op"),
    REGION_ADD: ("REGION_ADD", lambda r: RegionAdd(r.u64()), "op"),
    REGION_DROP: ("REGION_DROP", lambda r: RegionDrop(r.u32()), "op"),
    WRITE: ("WRITE", _d_transfer(Write), "op"),
    READ: ("READ", _d_transfer(Read), "op"),
    FLUSH: ("FLUSH", lambda r: Flush(_channel(r, r.u32())), "op"),
}

_TO_CLIENT: Dict[int, Tuple[str, Callable[[_Reader], Any], str]] = {
    HELLO_OK: ("HELLO_OK", _d_hello_ok, "0"),
    DONE: ("DONE", lambda r: Done(), "op"),
    ERROR: ("ERROR", lambda r: Error(r.u16(), r.text()), "any"),
    OPENED: ("OPENED", lambda r: Opened(_channel(r, r.u32()), r.text()), "op"),
    RESPONSE: ("RESPONSE", lambda r: Response(r.rest()), "op"),
    RESULT: ("RESULT", lambda r: Result(r.rest()), "op"),
    REGION: ("REGION", _d_region, "op"),
    TRANSFERRED: ("TRANSFERRED", lambda r: Transferred(*r.unpack(_S_QIQ)), "op"),
    INCOMING: ("INCOMING", _d_incoming, "0"),
    MESSAGE: ("MESSAGE", _d_message, "0"),
    CHANNEL_CLOSED: ("CHANNEL_CLOSED", _d_channel_closed, "0"),
    TOOL_CALL: ("TOOL_CALL", _d_tool_call, "op"),
    TOOL_CANCELLED: ("TOOL_CANCELLED", lambda r: ToolCancelled(), "op"),
    NOTIFICATION: ("NOTIFICATION", _d_notification, "0"),
}


def _decode(table: Dict[int, Tuple[str, Callable[[_Reader], Any], str]], kind: int,
            op: int, body: Buffer) -> Any:
    entry = table.get(kind)
    if entry is None:
        raise Malformed("unknown frame kind 0x%04x" % kind)
    name, dec, rule = entry
    if rule == "0":
        if op != 0:
            raise Malformed("%s with id %d (must be 0)" % (name, op))
    elif rule == "op" and op == 0:
        raise Malformed("%s with id 0" % name)
    r = _Reader(body, name)
    try:
        msg = dec(r)
    except FabricError:
        raise
    except (struct.error, ValueError, TypeError, IndexError, OverflowError) as e:
        raise Malformed("%s: %s" % (name, e)) from None
    r.end()
    return msg


def decode_to_client(kind: int, op: int, body: Buffer) -> SidecarMsg:
    """The sidecar message of a frame's kind, id and body (any bytes-like ``body``).

    Raises:
        Malformed: an unknown kind, an id the kind does not allow, or a body that is not
            exactly the kind's fields with values in range.
    """
    msg: SidecarMsg = _decode(_TO_CLIENT, kind, op, body)
    return msg


def decode_from_client(kind: int, op: int, body: Buffer) -> ClientMsg:
    """The client message of a frame's kind, id and body; raises :class:`Malformed` as
    :func:`decode_to_client` does."""
    msg: ClientMsg = _decode(_FROM_CLIENT, kind, op, body)
    return msg


def parse_header(buf: Buffer, max_frame: int, offset: int = 0) -> Tuple[int, int, int, int]:
    """``(frame_length, kind, flags, id)`` of the header at ``offset`` of ``buf``, where
    ``frame_length`` counts the whole frame (header included).

    Raises:
        Malformed: fewer than 16 bytes, ``len`` < 12, or nonzero flags.
        TooLarge: a frame longer than ``max_frame``.
    """
    if len(buf) - offset < HEADER_LEN:
        raise Malformed("truncated frame header")
    ln, kind, flags, op = HEADER.unpack_from(buf, offset)
    if ln < 12:
        raise Malformed("frame length %d (at least 12)" % ln)
    if ln + 4 > max_frame:
        raise TooLarge("a frame of %d bytes (max_frame %d)" % (ln + 4, max_frame))
    if flags != 0:
        raise Malformed("frame flags 0x%04x (must be 0)" % flags)
    return ln + 4, kind, flags, op


def _decode_frame(data: Buffer, max_frame: int,
                  dec: Callable[[int, int, Buffer], object]) -> Tuple[int, object]:
    mv = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    total, kind, _flags, op = parse_header(mv, max_frame)
    if len(mv) < total:
        raise Malformed("truncated frame: %d of %d bytes" % (len(mv), total))
    if len(mv) > total:
        raise Malformed("%d bytes after the frame" % (len(mv) - total))
    return op, dec(kind, op, mv[HEADER_LEN:total])


def decode_frame_to_client(data: Buffer,
                           max_frame: int = DEFAULT_MAX_FRAME) -> Tuple[int, SidecarMsg]:
    """``(id, message)`` of exactly one whole sidecar frame; raises :class:`Malformed` or
    :class:`TooLarge`, never another exception."""
    return _decode_frame(data, max_frame, decode_to_client)  # type: ignore[return-value]


def decode_frame_from_client(data: Buffer,
                             max_frame: int = DEFAULT_MAX_FRAME) -> Tuple[int, ClientMsg]:
    """``(id, message)`` of exactly one whole client frame; raises as
    :func:`decode_frame_to_client`."""
    return _decode_frame(data, max_frame, decode_from_client)  # type: ignore[return-value]
