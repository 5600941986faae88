"""Channels: ordered messages, requests and region transfers between two endpoints."""

from __future__ import annotations

import asyncio
import collections
import math
from typing import TYPE_CHECKING, Any, Callable, Deque, Iterable, List, Optional, Sequence, Tuple, Union

from . import _wire as w
from ._conn import Connection, again, closed_error, expect
from .errors import (
    Closed,
    FabricError,
    InvalidArgument,
    TooBig,
    error_from_code,
)
from .values import Class, Message, TransferReport

if TYPE_CHECKING:  # pragma: no cover
    from .region import Region

__all__ = ["Channel", "deadline_ms"]

BytesLike = Union[bytes, bytearray, memoryview, Any]

#: The longest deadline the protocol allows, in seconds.
MAX_DEADLINE = 3600.0


def deadline_ms(deadline: float, what: str = "deadline") -> int:
    """``deadline`` (seconds, > 0 and at most an hour) in whole milliseconds (at least 1)."""
    if not (0 < deadline <= MAX_DEADLINE):
        raise InvalidArgument("%s %r: more than 0 and at most %d seconds"
                              % (what, deadline, MAX_DEADLINE))
    return max(1, min(3_600_000, int(math.ceil(deadline * 1000))))


def _nbytes(data: Any) -> int:
    return len(data) if type(data) is bytes else memoryview(data).nbytes


class Channel:
    """One channel of this client: opened by :meth:`Client.open` or taken by
    :meth:`Client.accept`.

    Attributes:
        handle: the channel's handle on the connection.
        node: the peer node's name.
        endpoint: the peer endpoint's name (for an opened channel, the one asked for).
        label: the label the opener gave.
        klass: the traffic :class:`Class`.
        priority: 0-7 (7 highest).
        url: the url it was opened with ("" for incoming channels and the sidecar's own node).
        incoming: whether the peer opened it.

    Sends are windowed: :meth:`send` returns as soon as the frame is written unless
    ``send_window`` sends of this channel are unanswered (the sidecar answers them together,
    one ``DONE`` for every ``send_window / 2``); a send the sidecar failed raises on the next
    :meth:`send` or :meth:`flush` (and once on :meth:`recv`).
    """

    __slots__ = (
        "_conn", "handle", "node", "endpoint", "label", "klass", "priority", "url", "incoming",
        "_queue", "_waiters", "_end", "_inflight", "_sent", "_slot_waiters",
        "_send_error", "_send_error_seen", "_closing",
    )

    def __init__(self, conn: Connection, handle: int, node: str, endpoint: str, label: str,
                 klass: Class, priority: int, url: str = "", incoming: bool = False) -> None:
        self._conn = conn
        self.handle = handle
        self.node = node
        self.endpoint = endpoint
        self.label = label
        self.klass = klass
        self.priority = priority
        self.url = url
        self.incoming = incoming
        self._queue: Deque[Message] = collections.deque()
        self._waiters: Deque["asyncio.Future[None]"] = collections.deque()
        self._end: Optional[Callable[[], FabricError]] = None
        self._inflight = 0
        # Ids of the sends not answered yet, oldest first (one DONE answers every send up to it).
        self._sent: Deque[int] = collections.deque()
        self._slot_waiters: Deque["asyncio.Future[None]"] = collections.deque()
        self._send_error: Optional[FabricError] = None
        self._send_error_seen = False
        self._closing = False

    def __repr__(self) -> str:
        return "<Channel %d %s/%s %s label=%r>" % (
            self.handle, self.node, self.endpoint, self.klass.name, self.label)

    @property
    def closed(self) -> bool:
        """Whether the channel has ended (closed here or by the peer, or the connection ended)."""
        return self._end is not None

    # ---------------------------------------------------------------------------------------
    # Receiving

    def push(self, body: bytes, request: int) -> None:
        """Queue one arrived message (called by the connection)."""
        self._queue.append(Message(body, request))
        self._conn.queue_add(len(body))
        waiters = self._waiters
        while waiters:
            f = waiters.popleft()
            if not f.done():
                f.set_result(None)
                break

    async def recv(self) -> Message:
        """The next message, in the order sent.

        Raises:
            Closed: the channel was closed normally, once every queued message was taken.
            FabricError: the close code's error (e.g. :class:`PeerDead`), an earlier send's
                failure (once), or :class:`ConnectionLost`.
        """
        q = self._queue
        while True:
            if q:
                m = q.popleft()
                self._conn.queue_sub(len(m.body))
                return m
            if self._send_error is not None and not self._send_error_seen:
                self._send_error_seen = True
                raise again(self._send_error)
            if self._end is not None:
                raise self._end()
            fut = self._conn.loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()

    def __aiter__(self) -> "Channel":
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except Closed:
            raise StopAsyncIteration from None

    def peer_closed(self, code: int, reason: str) -> None:
        """The sidecar's ``CHANNEL_CLOSED`` (called by the connection)."""
        if self._end is None:
            if code in (0, Closed.CODE):
                self._end = lambda: Closed(reason or "the channel was closed")
            else:
                self._end = lambda: error_from_code(code, reason)
        self._wake_all()

    def conn_lost(self) -> None:
        """The connection ended (called by the connection)."""
        if self._end is None:
            self._end = self._conn.lost_error
        self._wake_all()

    def _wake_all(self) -> None:
        for waiters in (self._waiters, self._slot_waiters):
            for f in waiters:
                if not f.done():
                    f.set_result(None)
            waiters.clear()

    # ---------------------------------------------------------------------------------------
    # Sending

    def _check_send(self) -> None:
        if self._send_error is not None:
            self._send_error_seen = True
            raise again(self._send_error)
        if self._end is not None:
            raise self._end()

    async def send(self, data: BytesLike) -> None:
        """Send ``data`` (any bytes-like object; it is copied before this returns).

        Returns at once unless ``send_window`` sends are unanswered; then waits for a slot.
        Raises an earlier send's failure, the channel's end, or :class:`TooBig`."""
        if self._send_error is not None or self._end is not None:
            self._check_send()
        conn = self._conn
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        # The MESSAGE it becomes at the other client: header, channel, request.
        if n + 28 > conn.max_frame:
            raise TooBig("a message of %d bytes (at most %d)" % (n, conn.max_frame - 28))
        while self._inflight >= conn.send_window:
            fut = conn.loop.create_future()
            self._slot_waiters.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()
            if self._send_error is not None or self._end is not None:
                self._check_send()
        conn.check()
        op = conn.next_id()
        conn.ops[op] = self
        self._inflight += 1
        self._sent.append(op)
        conn.write(w.send_frame(op, self.handle, data, n))
        if conn.write_paused:
            await conn.drain()

    def op_reply(self, msg: Any, exc: Optional[FabricError], op: int = 0) -> None:
        """A ``SEND``'s ``DONE``, which answers every earlier send of the channel too, or one
        send's error (called by the connection)."""
        sent = self._sent
        if exc is not None:
            try:
                sent.remove(op)
                self._inflight -= 1
            except ValueError:
                pass
            if self._send_error is None:
                self._send_error = exc
            self._wake_all()
            return
        ops = self._conn.ops
        n = 0
        while sent:
            o = sent.popleft()
            n += 1
            if o == op:
                break
            ops.pop(o, None)
        self._inflight -= n
        waiters = self._slot_waiters
        while waiters:
            f = waiters.popleft()
            if not f.done():
                f.set_result(None)
                break

    async def flush(self) -> None:
        """Wait until every send so far is answered; raise the first failure among them."""
        if self._inflight > 0 and self._send_error is None and self._end is None:
            # The sidecar answers the sends before the FLUSH first.
            await self._conn.run(w.Flush(self.handle), w.Done)
        if self._send_error is not None:
            self._send_error_seen = True
            raise again(self._send_error)

    async def request(self, data: BytesLike, deadline: float = 30.0) -> bytes:
        """Send ``data`` as a request and return the response's body.

        Raises:
            DeadlineExceeded: no answer within ``deadline`` seconds.
            RemoteError: the responder answered with an error (its reason is the message).
        """
        if self._end is not None:
            raise self._end()
        conn = self._conn
        ms = deadline_ms(deadline)
        n = _nbytes(data)
        # The MESSAGE it becomes, and the sidecars' one-byte tag of a request.
        if n + 29 > conn.max_frame:
            raise TooBig("a request of %d bytes (at most %d)" % (n, conn.max_frame - 29))
        conn.check()
        op = conn.next_id()
        fut = conn.loop.create_future()
        conn.ops[op] = fut
        conn.write(w.request_frame(op, self.handle, ms, data, n))
        if conn.write_paused:
            await conn.drain()
        body: bytes = expect(await fut, w.Response).body
        return body

    async def respond(self, msg: Union[Message, int], data: BytesLike) -> None:
        """Answer the request ``msg`` (a :class:`Message` or its ``request`` number)."""
        request = msg if isinstance(msg, int) else msg.request
        if request == 0:
            raise InvalidArgument("the message is not a request")
        conn = self._conn
        n = _nbytes(data)
        if n + 28 > conn.max_frame:
            raise TooBig("a response of %d bytes (at most %d)" % (n, conn.max_frame - 28))
        conn.check()
        op = conn.next_id()
        fut = conn.loop.create_future()
        conn.ops[op] = fut
        conn.write(w.respond_frame(op, self.handle, request, data, n))
        if conn.write_paused:
            await conn.drain()
        expect(await fut, w.Done)

    async def respond_error(self, msg: Union[Message, int], reason: str) -> None:
        """Answer the request ``msg`` with a failure: the requester gets
        :class:`RemoteError` with ``reason``."""
        request = msg if isinstance(msg, int) else msg.request
        if request == 0:
            raise InvalidArgument("the message is not a request")
        await self._conn.run(w.RespondError(self.handle, request, reason), w.Done)

    async def close(self, reason: str = "") -> None:
        """Close the channel (refuse it, if it was incoming and never used); the peer sees the
        close after every message already sent. Unread messages are dropped. Idempotent."""
        if self._closing:
            return
        self._closing = True
        conn = self._conn
        was_open = self._end is None
        if was_open:
            self._end = lambda: closed_error(reason)
        while self._queue:
            conn.queue_sub(len(self._queue.popleft().body))
        if conn.channels.get(self.handle) is self:
            del conn.channels[self.handle]
        self._wake_all()
        if was_open and conn.lost is None:
            try:
                await conn.run(w.Close(self.handle, reason), w.Done)
            except FabricError as e:
                if e.code not in (Closed.CODE, 7):  # already closed, or an unknown channel
                    raise

    # ---------------------------------------------------------------------------------------
    # Region transfers

    async def write(self, region: Union["Region", int], descriptor: bytes,
                    blocks: Iterable[Tuple[int, int, int]], notify: Optional[int] = None,
                    deadline: Optional[float] = None) -> TransferReport:
        """Move ``blocks`` (``(local, remote, len)``) from ``region`` to the peer's region that
        ``descriptor`` names; with ``notify``, its owner gets a notification with that tag."""
        return await self._transfer(w.Write, region, descriptor, blocks, notify, deadline)

    async def read(self, region: Union["Region", int], descriptor: bytes,
                   blocks: Iterable[Tuple[int, int, int]], notify: Optional[int] = None,
                   deadline: Optional[float] = None) -> TransferReport:
        """Move ``blocks`` (``(local, remote, len)``) from the peer's region that
        ``descriptor`` names into ``region``."""
        return await self._transfer(w.Read, region, descriptor, blocks, notify, deadline)

    async def _transfer(self, cls: type, region: Any, descriptor: bytes,
                        blocks: Iterable[Tuple[int, int, int]], notify: Optional[int],
                        deadline: Optional[float]) -> TransferReport:
        if self._end is not None:
            raise self._end()
        handle = region if isinstance(region, int) else region.handle
        ms = 0 if deadline is None else deadline_ms(deadline)
        blks: Sequence[Tuple[int, int, int]] = tuple(
            (int(a), int(b), int(c)) for a, b, c in blocks)
        r = await self._conn.run(
            cls(self.handle, handle, ms, notify, bytes(descriptor), blks), w.Transferred)
        return TransferReport(r.bytes, r.blocks, r.elapsed_ns / 1e9)

