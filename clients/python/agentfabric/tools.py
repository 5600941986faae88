"""Tools: serving them (:class:`ToolCall` and the handler tasks) and calling them
(:class:`PendingCall`)."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Awaitable, Callable, Generator, Iterable, Optional, Tuple, Union

from . import _wire as w
from ._conn import Connection, expect
from .channel import deadline_ms
from .errors import InvalidArgument

__all__ = ["ToolCall", "PendingCall", "Handler", "start_call"]

#: A tool handler: takes the :class:`ToolCall`, returns (or resolves to) the result's bytes.
Handler = Callable[["ToolCall"], Union[Any, Awaitable[Any]]]


class ToolCall:
    """One call of a tool this client serves, as its handler gets it.

    Attributes:
        id: the call's handle on the connection.
        tool: the tool's name.
        node: the calling node's name.
        idempotent: whether the caller said the call may run more than once (hedged calls).
        key: the caller's idempotency key (``b""`` for none).
        args: the arguments.
        cancelled: set when the caller cancelled or the deadline passed (the handler task is
            cancelled then too, and its result ignored).
    """

    __slots__ = ("id", "tool", "node", "idempotent", "key", "args", "cancelled", "_deadline_at")

    def __init__(self, op: int, msg: w.ToolCall) -> None:
        self.id = op
        self.tool = msg.tool
        self.node = msg.node
        self.idempotent = msg.idempotent
        self.key = msg.key
        self.args = msg.args
        self.cancelled = asyncio.Event()
        self._deadline_at = time.monotonic() + msg.deadline_ms / 1000.0

    @property
    def deadline(self) -> float:
        """Seconds left before the caller's deadline (0 once passed)."""
        return max(0.0, self._deadline_at - time.monotonic())

    def __repr__(self) -> str:
        return "<ToolCall %d %s from %s, %d bytes>" % (self.id, self.tool, self.node,
                                                       len(self.args))


def _result_bytes(r: Any) -> bytes:
    if r is None:
        return b""
    if isinstance(r, str):
        return r.encode("utf-8")
    return bytes(memoryview(r))


async def run_tool(conn: Connection, call: ToolCall, handler: Handler) -> None:
    """Run ``handler`` for ``call`` and send its ``TOOL_REPLY`` (``ok`` 0 with ``str(exc)``
    when it raises; none when the call was cancelled)."""
    try:
        r = handler(call)
        if inspect.isawaitable(r):
            r = await r
        ok, body = True, _result_bytes(r)
    except asyncio.CancelledError:
        if call.cancelled.is_set() or conn.lost is not None:
            return
        raise
    except Exception as e:  # the handler's failure is the caller's ToolFailed
        ok, body = False, (str(e) or type(e).__name__).encode("utf-8", "replace")
    if call.cancelled.is_set() or conn.lost is not None:
        return
    if len(body) + 25 > conn.max_frame:  # header 16, call 8, ok 1
        ok, body = False, b"the tool's result (%d bytes) is larger than a frame" % len(body)
    conn.fire(w.ToolReply(call.id, ok, body))
    if conn.write_paused:
        await conn.drain()


def on_tool_call(conn: Connection, op: int, msg: w.ToolCall) -> None:
    """Start the handler's task for a ``TOOL_CALL`` (the connection's hook)."""
    handler = conn.tools.get(msg.tool)
    if handler is None:
        conn.fire(w.ToolReply(op, False, b"this endpoint does not serve " + msg.tool.encode()))
        return
    call = ToolCall(op, msg)
    task = conn.loop.create_task(run_tool(conn, call, handler))
    conn.tool_tasks[op] = (call, task)
    task.add_done_callback(lambda _t: conn.tool_tasks.pop(op, None))


class PendingCall:
    """A tool call in flight: ``await`` it for the result's bytes; :meth:`cancel` cancels it
    (the call then fails with :class:`~agentfabric.errors.Cancelled`). A task awaiting it that
    is cancelled cancels the call too."""

    __slots__ = ("_conn", "id", "_fut", "_cancel_sent")

    def __init__(self, conn: Connection, op: int, fut: "asyncio.Future[Any]") -> None:
        self._conn = conn
        self.id = op
        self._fut = fut
        self._cancel_sent = False
        fut.add_done_callback(self._done)

    def _done(self, fut: "asyncio.Future[Any]") -> None:
        if fut.cancelled():
            self.cancel()

    def cancel(self) -> None:
        """Send ``CANCEL`` for the call (nothing once it completed)."""
        if self._cancel_sent or (self._fut.done() and not self._fut.cancelled()):
            return
        self._cancel_sent = True
        if self._conn.lost is None:
            self._conn.fire(w.Cancel(self.id))

    def done(self) -> bool:
        """Whether the call has completed (or failed)."""
        return self._fut.done()

    def __await__(self) -> Generator[Any, None, bytes]:
        msg = yield from self._fut.__await__()
        return expect(msg, w.Result).body  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return "<PendingCall %d%s>" % (self.id, " done" if self._fut.done() else "")


def start_call(conn: Connection, tool: str, args: Any, url: str, endpoint: Optional[str],
               targets: Optional[Iterable[Tuple[str, str]]], deadline: float,
               key: Optional[Any], retries: int, hedged: bool) -> PendingCall:
    """Write a ``CALL`` and return its :class:`PendingCall` (see :meth:`Client.call`)."""
    if targets is None:
        if endpoint is None:
            raise InvalidArgument("a call needs endpoint= (with url=) or targets=")
        tgts: Tuple[Tuple[str, str], ...] = ((url, endpoint),)
    else:
        tgts = tuple((str(u), str(e)) for u, e in targets)
        if not tgts:
            raise InvalidArgument("targets is empty")
    k = None if key is None else bytes(memoryview(key))
    if k is not None and not k:
        raise InvalidArgument("an idempotency key must not be empty")
    if not 0 <= retries <= 8:
        raise InvalidArgument("retries %d (0-8)" % retries)
    msg = w.Call(deadline_ms(deadline), bool(hedged), retries, tool, tgts, k,
                 bytes(memoryview(args)))
    fut = conn.start(msg)
    return PendingCall(conn, conn._last_op, fut)  # start() took the last id
