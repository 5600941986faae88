"""One connection to the sidecar: framing, operation ids, writes, and the dispatch of every
frame the sidecar sends.

The connection is an :class:`asyncio.Protocol`, so frames are cut out of the bytes as they
arrive, with no task switch per frame: replies resolve the operation's future (or its sink) by
id, ``MESSAGE`` goes to its channel's queue, ``INCOMING`` to the accept queue, ``NOTIFICATION`` to
the notification queue, and ``TOOL_CALL`` starts the handler's task.

Backpressure, inbound: messages, incoming channels and notifications that the application has
not taken yet are counted; past :data:`MAX_QUEUED_BYTES` or :data:`MAX_QUEUED_FRAMES` the
connection stops reading the socket (``pause_reading``), so the sidecar queues, and then holds
back, the traffic addressed to this client (its channels stop granting credit; remote senders
wait). Reading resumes once half has been taken. While reading is paused *nothing* arrives, not
even replies: an application that leaves a busy channel unread stalls its other operations on
the connection too, so read every channel (or close it).

Backpressure, outbound: frames go to the transport with one ``write`` each; an operation awaits
the transport's drain only while its buffer is above the high-water mark (:data:`WRITE_HIGH`).
"""

from __future__ import annotations

import array
import asyncio
import collections
import socket
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from . import _wire as w
from .errors import (
    Closed,
    ConnectionLost,
    FabricError,
    InternalError,
    Malformed,
    TooBig,
    error_from_code,
)

#: Inbound bytes (message bodies) queued for the application before the socket is not read.
MAX_QUEUED_BYTES = 64 * 1024 * 1024
#: Inbound items (messages, channels, notifications) queued before the socket is not read.
MAX_QUEUED_FRAMES = 4096
#: The transport's write buffer above which operations await its drain.
WRITE_HIGH = 1024 * 1024

_DONE = w.Done()

_ANC_LEVEL = socket.SOL_SOCKET
_ANC_TYPE = socket.SCM_RIGHTS


class Sink:
    """A reply target that is not a plain future: ``op_reply`` gets the reply message, or
    ``None`` and the error."""

    def op_reply(self, msg: Any, exc: Optional[FabricError], op: int = 0) -> None:  # pragma: no cover
        """Take the reply of operation ``op`` (``msg``) or its failure (``exc``)."""
        raise NotImplementedError


class _Ignore(Sink):
    """The target of operations whose reply nobody awaits (``TOOL_REPLY``, ``CANCEL``, …)."""

    def op_reply(self, msg: Any, exc: Optional[FabricError], op: int = 0) -> None:
        pass


IGNORE = _Ignore()


def expect(msg: Any, cls: type) -> Any:
    """``msg`` if it is a ``cls`` reply, else :class:`InternalError` (a reply of another kind)."""
    if type(msg) is not cls:
        raise InternalError("expected %s, got %s" % (cls.__name__, type(msg).__name__))
    return msg


def again(e: FabricError) -> FabricError:
    """A fresh copy of ``e`` to raise once more (one traceback per raise)."""
    c = type(e)(e.message, e.code)
    c.__cause__ = e.__cause__
    return c


class Connection(asyncio.Protocol):
    """The protocol state of one client connection (internal: the public face is
    :class:`~agentfabric.client.Client`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.transport: Optional[asyncio.Transport] = None
        self.max_frame = w.HELLO_MAX_FRAME
        self.max_ops = 1024
        self.send_window = 64
        self.hello: "asyncio.Future[w.HelloOk]" = loop.create_future()
        self.closed: "asyncio.Future[None]" = loop.create_future()
        self.ops: Dict[int, Any] = {}
        self._last_op = 0
        # Set by Client: channels by handle, regions by handle, tools by name.
        self.channels: Dict[int, Any] = {}
        self.regions: Dict[int, Any] = {}
        self.tools: Dict[str, Callable[..., Any]] = {}
        self.tool_tasks: Dict[int, Tuple[Any, "asyncio.Task[None]"]] = {}
        self.incoming: Deque[Any] = collections.deque()
        self.incoming_waiters: Deque["asyncio.Future[None]"] = collections.deque()
        self.notes: Deque[Any] = collections.deque()
        self.note_waiters: List[Tuple[Optional[int], "asyncio.Future[None]"]] = []
        self.on_incoming: Optional[Callable[[w.Incoming], Any]] = None
        self.on_tool_call: Optional[Callable[[int, w.ToolCall], None]] = None
        self.on_notification: Optional[Callable[[w.Notification], Any]] = None
        # Inbound.
        self._buf = bytearray()
        self._need = 0
        self.queued_bytes = 0
        self.queued_frames = 0
        self.reading_paused = False
        # Outbound.
        self.write_paused = False
        self._drain_waiters: List["asyncio.Future[None]"] = []
        self._held: Optional[List[bytes]] = None
        self._fd_lock: Optional[asyncio.Lock] = None  # made on the loop (Python 3.9)
        # The end.
        self.lost: Optional[str] = None
        self.fatal: Optional[FabricError] = None
        self._handlers: Dict[int, Callable[[int, Any], None]] = {
            w.HELLO_OK: self._on_hello_ok,
            w.DONE: self._on_reply,
            w.ERROR: self._on_error,
            w.OPENED: self._on_reply,
            w.RESPONSE: self._on_reply,
            w.RESULT: self._on_reply,
            w.REGION: self._on_reply,
            w.TRANSFERRED: self._on_reply,
            w.INCOMING: self._on_incoming,
            w.MESSAGE: self._on_message,
            w.CHANNEL_CLOSED: self._on_channel_closed,
            w.TOOL_CALL: self._on_tool_call,
            w.TOOL_CANCELLED: self._on_tool_cancelled,
            w.NOTIFICATION: self._on_notification,
        }

    # ---------------------------------------------------------------------------------------
    # Operations and writes

    def next_id(self) -> int:
        """A fresh operation id (an incrementing counter from 1)."""
        self._last_op += 1
        return self._last_op

    def check(self) -> None:
        """Raise :class:`ConnectionLost` if the connection has ended."""
        if self.lost is not None:
            raise self.lost_error()

    def lost_error(self) -> ConnectionLost:
        """A :class:`ConnectionLost` for the end of this connection (the fatal error, if any,
        as its cause)."""
        e = ConnectionLost(self.lost or "the connection to the sidecar ended")
        e.__cause__ = self.fatal
        return e

    def write(self, frame: bytes) -> None:
        """Write one frame (held back, in order, while a file descriptor is being sent)."""
        if self._held is not None:
            self._held.append(frame)
        else:
            self.transport.write(frame)  # type: ignore[union-attr]

    def start(self, msg: Any, target: Any = None) -> "asyncio.Future[Any]":
        """Encode ``msg`` under a fresh id, register a future (or ``target``) for its reply,
        write it, and return the future (``target``'s future is the caller's)."""
        self.check()
        op = self.next_id()
        frame = w.encode(op, msg)
        if len(frame) > self.max_frame:
            raise TooBig("a %s frame of %d bytes (max_frame %d)"
                         % (type(msg).__name__, len(frame), self.max_frame))
        fut: "asyncio.Future[Any]" = self.loop.create_future() if target is None else target
        self.ops[op] = fut
        self.write(frame)
        return fut

    async def run(self, msg: Any, cls: type) -> Any:
        """Start ``msg`` and await its reply, which must be a ``cls``."""
        fut = self.start(msg)
        if self.write_paused:
            await self.drain()
        return expect(await fut, cls)

    def fire(self, msg: Any) -> None:
        """Start ``msg`` without awaiting its reply (nothing if the connection has ended)."""
        if self.lost is None:
            self.start(msg, IGNORE)

    async def drain(self) -> None:
        """Wait while the transport's buffer is above the high-water mark."""
        while self.write_paused and self.lost is None:
            fut = self.loop.create_future()
            self._drain_waiters.append(fut)
            await fut

    def pause_writing(self) -> None:  # asyncio.Protocol
        self.write_paused = True

    def resume_writing(self) -> None:  # asyncio.Protocol
        self.write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def start_with_fd(self, msg: Any, fd: int, target: Any) -> None:
        """Write ``msg`` (registered to ``target``) with ``fd`` in ``SCM_RIGHTS``.

        Frames of other operations are held back meanwhile; the transport's buffer is let
        drain first, so the frame goes out by ``sendmsg`` on the socket itself in its place in
        the byte stream."""
        if self._fd_lock is None:
            self._fd_lock = asyncio.Lock()
        async with self._fd_lock:
            self.check()
            self._held = []
            try:
                while self.transport.get_write_buffer_size() > 0:  # type: ignore[union-attr]
                    self.check()
                    await asyncio.sleep(0.0005)
                self.check()
                op = self.next_id()
                frame = w.encode(op, msg)
                anc = [(_ANC_LEVEL, _ANC_TYPE, array.array("i", [fd]).tobytes())]
                while True:
                    try:
                        sent = self.sock.sendmsg([frame], anc)
                        break
                    except (BlockingIOError, InterruptedError):
                        await asyncio.sleep(0.0005)
                        self.check()
                    except OSError as e:
                        raise ConnectionLost("sending a file descriptor: %s" % e) from e
                self.ops[op] = target
                if sent < len(frame):
                    self.transport.write(frame[sent:])  # type: ignore[union-attr]
            finally:
                held, self._held = self._held, None
                if self.lost is None:
                    for f in held:
                        self.transport.write(f)  # type: ignore[union-attr]

    # ---------------------------------------------------------------------------------------
    # Inbound

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # asyncio.Protocol
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:  # asyncio.Protocol
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return
            data = bytes(self._buf)
            self._buf = bytearray()
        try:
            pos = self._frames(data)
        except FabricError as e:
            self.protocol_error(e)
            return
        rest = len(data) - pos
        if rest:
            self._buf = bytearray(memoryview(data)[pos:])
            if rest >= 4:
                self._need = max(w.HEADER_LEN, 4 + w._U32.unpack_from(data, pos)[0])
            else:
                self._need = w.HEADER_LEN

    def _frames(self, data: bytes) -> int:
        """Dispatch every whole frame of ``data``; return the offset after the last."""
        n = len(data)
        pos = 0
        mv = memoryview(data)
        unpack_header = w.HEADER.unpack_from
        handlers = self._handlers
        channels = self.channels
        while n - pos >= w.HEADER_LEN:
            ln, kind, flags, op = unpack_header(data, pos)
            if ln < 12 or ln + 4 > self.max_frame or flags:
                w.parse_header(data, self.max_frame, pos)  # raises the precise error
            end = pos + 4 + ln
            if end > n:
                break
            if kind == w.MESSAGE and op == 0 and ln >= 24:
                # The hot path: w.decode_to_client's MESSAGE, without the intermediate tuple.
                ch, req = w._MESSAGE_HEAD.unpack_from(data, pos + 16)
                c = channels.get(ch)
                if c is not None:
                    c.push(data[pos + 28:end], req)
            elif kind == w.DONE and ln == 12 and op:
                # The other hot path: a SEND's DONE (w.decode_to_client's, shared instance).
                target = self.ops.pop(op, None)
                if target is not None:
                    self._target_reply(target, _DONE, op)
            else:
                handler = handlers.get(kind)
                msg = w.decode_to_client(kind, op, mv[pos + 16:end])
                if handler is not None:
                    handler(op, msg)
            pos = end
        return pos

    def queue_add(self, nbytes: int) -> None:
        """Count one item of ``nbytes`` queued for the application (may pause reading)."""
        self.queued_bytes += nbytes
        self.queued_frames += 1
        if not self.reading_paused and (self.queued_bytes > MAX_QUEUED_BYTES
                                        or self.queued_frames > MAX_QUEUED_FRAMES):
            self.reading_paused = True
            if self.lost is None:
                self.transport.pause_reading()  # type: ignore[union-attr]

    def queue_sub(self, nbytes: int) -> None:
        """Count one queued item of ``nbytes`` taken (may resume reading)."""
        self.queued_bytes -= nbytes
        self.queued_frames -= 1
        if self.reading_paused and (self.queued_bytes <= MAX_QUEUED_BYTES // 2
                                    and self.queued_frames <= MAX_QUEUED_FRAMES // 2):
            self.reading_paused = False
            if self.lost is None:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def _on_hello_ok(self, op: int, msg: w.HelloOk) -> None:
        if self.hello.done():
            raise Malformed("a second HELLO_OK")
        if msg.version != w.VERSION:
            raise Malformed("HELLO_OK with version %d (asked for %d)" % (msg.version, w.VERSION))
        self.max_frame = msg.max_frame
        self.max_ops = msg.max_ops
        self.send_window = max(1, msg.send_window)
        self.hello.set_result(msg)

    def _on_reply(self, op: int, msg: Any) -> None:
        target = self.ops.pop(op, None)
        if target is not None:
            self._target_reply(target, msg, op)

    @staticmethod
    def _target_reply(target: Any, msg: Any, op: int) -> None:
        if isinstance(target, asyncio.Future):
            if not target.done():
                target.set_result(msg)
        else:
            target.op_reply(msg, None, op)

    def _on_error(self, op: int, msg: w.Error) -> None:
        err = error_from_code(msg.code, msg.message)
        if op == 0:
            self.fatal = err
            if not self.hello.done():
                self.hello.set_exception(err)
            return
        target = self.ops.pop(op, None)
        if target is None:
            return
        if isinstance(target, asyncio.Future):
            if not target.done():
                target.set_exception(err)
        else:
            target.op_reply(None, err, op)

    def _on_message(self, op: int, msg: w.Message) -> None:
        c = self.channels.get(msg.channel)
        if c is not None:
            c.push(msg.body, msg.request)

    def _on_incoming(self, op: int, msg: w.Incoming) -> None:
        if self.on_incoming is None:
            return
        ch = self.on_incoming(msg)
        self.incoming.append(ch)
        self.queue_add(0)
        self._wake_first(self.incoming_waiters)

    def _on_channel_closed(self, op: int, msg: w.ChannelClosed) -> None:
        c = self.channels.pop(msg.channel, None)
        if c is not None:
            c.peer_closed(msg.code, msg.reason)

    def _on_tool_call(self, op: int, msg: w.ToolCall) -> None:
        if self.on_tool_call is not None:
            self.on_tool_call(op, msg)

    def _on_tool_cancelled(self, op: int, msg: w.ToolCancelled) -> None:
        entry = self.tool_tasks.get(op)
        if entry is not None:
            call, task = entry
            call.cancelled.set()
            task.cancel()

    def _on_notification(self, op: int, msg: w.Notification) -> None:
        if self.on_notification is None:
            return
        self.notes.append(self.on_notification(msg))
        self.queue_add(0)
        for i, (region, fut) in enumerate(self.note_waiters):
            if not fut.done() and (region is None or region == msg.region):
                del self.note_waiters[i]
                fut.set_result(None)
                break

    @staticmethod
    def _wake_first(waiters: Deque["asyncio.Future[None]"]) -> None:
        while waiters:
            f = waiters.popleft()
            if not f.done():
                f.set_result(None)
                return

    async def wait_incoming(self) -> Any:
        """The next incoming channel (waits for one)."""
        while True:
            if self.incoming:
                ch = self.incoming.popleft()
                self.queue_sub(0)
                return ch
            self.check()
            fut = self.loop.create_future()
            self.incoming_waiters.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()

    async def wait_note(self, region: Optional[int]) -> Any:
        """The next notification for ``region``'s handle (any region's for ``None``)."""
        while True:
            for i, note in enumerate(self.notes):
                handle = note.region if isinstance(note.region, int) else note.region.handle
                if region is None or handle == region:
                    del self.notes[i]
                    self.queue_sub(0)
                    return note
            self.check()
            fut = self.loop.create_future()
            self.note_waiters.append((region, fut))
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()
                    self.note_waiters = [x for x in self.note_waiters if x[1] is not fut]

    # ---------------------------------------------------------------------------------------
    # The end

    def protocol_error(self, e: FabricError) -> None:
        """The sidecar sent a frame this client cannot take: end the connection."""
        if self.fatal is None:
            self.fatal = e
        self.lost = "the sidecar sent a bad frame: %s" % e
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Optional[Exception]) -> None:  # asyncio.Protocol
        if self.lost is None:
            if self.fatal is not None:
                self.lost = "the sidecar closed the connection: %s %s" % (
                    self.fatal.NAME, self.fatal.message)
            else:
                self.lost = "the sidecar closed the connection" + (
                    ": %s" % exc if exc is not None else "")
        if not self.hello.done():
            self.hello.set_exception(self.fatal if self.fatal is not None
                                     else self.lost_error())
        ops, self.ops = self.ops, {}
        for op, target in ops.items():
            if isinstance(target, asyncio.Future):
                if not target.done():
                    target.set_exception(self.lost_error())
            else:
                target.op_reply(None, self.lost_error(), op)
        for c in list(self.channels.values()):
            c.conn_lost()
        for _call, task in list(self.tool_tasks.values()):
            task.cancel()
        for f in list(self.incoming_waiters) + [f for _r, f in self.note_waiters]:
            if not f.done():
                f.set_result(None)
        self._wake_drain()
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self, why: str) -> None:
        """End the connection from this side: the write side is shut, so the sidecar sees the
        end, lets go of everything the client held (its endpoint name first), and then closes
        its side, which ends the connection here (``closed``)."""
        if self.lost is None:
            self.lost = why
        if self.transport is not None:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.transport.close()


def closed_error(reason: str) -> Closed:
    """The :class:`Closed` of a channel this client closed."""
    return Closed(reason or "the channel was closed")
