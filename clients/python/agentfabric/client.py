"""The asyncio client: :func:`connect` and :class:`Client`."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from typing import Any, Iterable, Optional, Tuple

from . import _wire as w
from ._conn import Connection, Sink
from .channel import Channel
from .errors import (
    ConnectFailed,
    DeadlineExceeded,
    FabricError,
    InvalidArgument,
)
from .region import Region, create_region, register_fd
from .tools import Handler, PendingCall, on_tool_call, start_call
from .values import DEFAULT_DEADLINE, Class, Notification

__all__ = ["connect", "Client", "SOCKET_ENV"]

#: The environment variable naming the sidecar's socket when ``connect`` is given none.
SOCKET_ENV = "AGENTFABRIC_SOCKET"

_ENDPOINT_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_connections = itertools.count(1)


def _check_endpoint(name: str) -> None:
    if not (1 <= len(name) <= 32) or not set(name) <= _ENDPOINT_CHARS:
        raise InvalidArgument("endpoint %r: 1-32 characters of A-Z a-z 0-9 . _ -" % name)


class _OpenSink(Sink):
    """Makes the :class:`Channel` when ``OPENED`` arrives, before any of its messages."""

    def __init__(self, conn: Connection, fut: "asyncio.Future[Channel]", url: str,
                 endpoint: str, label: str, klass: Class, priority: int) -> None:
        self.conn = conn
        self.fut = fut
        self.args = (url, endpoint, label, klass, priority)

    def op_reply(self, msg: Any, exc: Optional[FabricError], op: int = 0) -> None:
        if exc is not None or type(msg) is not w.Opened:
            if not self.fut.done():
                self.fut.set_exception(exc if exc is not None else InvalidArgument(
                    "OPEN answered with %s" % type(msg).__name__))
            return
        if self.fut.done():  # the caller is gone: close the channel
            self.conn.fire(w.Close(msg.channel, "abandoned"))
            return
        url, endpoint, label, klass, priority = self.args
        ch = Channel(self.conn, msg.channel, msg.node, endpoint, label, klass, priority, url)
        self.conn.channels[msg.channel] = ch
        self.fut.set_result(ch)


class Client:
    """A connection to the sidecar, as one endpoint of its node.

    Attributes (from ``HELLO_OK``):
        node: the sidecar's node name (remote agents reach this client as ``node/endpoint``).
        endpoint: this client's endpoint name.
        uid: the uid the kernel reported for this process.
        pid: the pid the kernel reported for this process.
        version: the agreed protocol version.
        max_frame: the longest frame, in bytes.
        max_ops: operations in flight before the sidecar stops reading.
        send_window: unanswered sends per channel before :meth:`Channel.send` waits.
    """

    def __init__(self, conn: Connection, hello: w.HelloOk) -> None:
        self._conn = conn
        self.node: str = hello.node
        self.endpoint: str = hello.endpoint
        self.uid: int = hello.uid
        self.pid: int = hello.pid
        self.version: int = hello.version
        self.max_frame: int = hello.max_frame
        self.max_ops: int = hello.max_ops
        self.send_window: int = hello.send_window
        conn.on_incoming = self._incoming
        conn.on_tool_call = lambda op, msg: on_tool_call(conn, op, msg)
        conn.on_notification = self._notification

    def __repr__(self) -> str:
        return "<Client %s/%s%s>" % (self.node, self.endpoint, " closed" if self.closed else "")

    @property
    def closed(self) -> bool:
        """Whether the connection has ended."""
        return self._conn.lost is not None

    def _incoming(self, msg: w.Incoming) -> Channel:
        ch = Channel(self._conn, msg.channel, msg.node, msg.endpoint, msg.label,
                     Class(msg.klass), msg.priority, "", True)
        self._conn.channels[msg.channel] = ch
        return ch

    def _notification(self, msg: w.Notification) -> Notification:
        region = self._conn.regions.get(msg.region)
        return Notification(region if region is not None else msg.region, msg.tag, msg.node)

    # ---------------------------------------------------------------------------------------
    # Channels

    async def open(self, url: str, endpoint: str, label: str = "",
                   klass: Class = Class.COORDINATION, priority: int = 4) -> Channel:
        """Open a channel to ``endpoint`` on the node at ``url`` (``""``: the sidecar's own
        node). Returns once the peer's sidecar found the endpoint.

        Raises:
            Refused: no such endpoint, or it refused the channel.
            ConnectFailed: the node could not be reached.
        """
        if int(klass) not in (0, 1, 2):
            raise InvalidArgument("class %r (0-2)" % (klass,))
        if not 0 <= priority <= 7:
            raise InvalidArgument("priority %d (0-7)" % priority)
        if len(label.encode("utf-8")) > 256:
            raise InvalidArgument("a label longer than 256 bytes")
        conn = self._conn
        fut: "asyncio.Future[Channel]" = conn.loop.create_future()
        sink = _OpenSink(conn, fut, url, endpoint, label, Class(int(klass)), priority)
        conn.start(w.Open(int(klass), priority, url, endpoint, label), sink)
        if conn.write_paused:
            await conn.drain()
        return await fut

    async def accept(self) -> Channel:
        """The next channel a peer opened to this endpoint."""
        return await self._conn.wait_incoming()  # type: ignore[no-any-return]

    # ---------------------------------------------------------------------------------------
    # Tools

    async def serve(self, tool: str, handler: Handler) -> None:
        """Serve ``tool``: each call runs ``handler(call)`` (an ``async`` function, or a plain
        one, run on the event loop) in its own task; its return value (bytes-like, ``str`` or
        ``None``) is the result, and an exception it raises fails the call with ``str(exc)``.
        """
        self._conn.tools[tool] = handler
        try:
            await self._conn.run(w.Serve(tool), w.Done)
        except BaseException:
            if self._conn.tools.get(tool) is handler:
                del self._conn.tools[tool]
            raise

    async def unserve(self, tool: str) -> None:
        """Stop serving ``tool`` (calls already running go on)."""
        await self._conn.run(w.Unserve(tool), w.Done)
        self._conn.tools.pop(tool, None)

    def start_call(self, tool: str, args: Any = b"", *, url: str = "",
                   endpoint: Optional[str] = None,
                   targets: Optional[Iterable[Tuple[str, str]]] = None,
                   deadline: float = DEFAULT_DEADLINE, key: Optional[Any] = None,
                   retries: int = 0, hedged: bool = False) -> PendingCall:
        """Start a tool call (see :meth:`call`) and return it in flight, to await or cancel."""
        return start_call(self._conn, tool, args, url, endpoint, targets, deadline, key,
                          retries, hedged)

    async def call(self, tool: str, args: Any = b"", *, url: str = "",
                   endpoint: Optional[str] = None,
                   targets: Optional[Iterable[Tuple[str, str]]] = None,
                   deadline: float = DEFAULT_DEADLINE, key: Optional[Any] = None,
                   retries: int = 0, hedged: bool = False) -> bytes:
        """Call ``tool`` with ``args`` on ``endpoint`` at ``url`` (``""``: this sidecar's node),
        or on ``targets`` (``(url, endpoint)`` replicas), and return its result.

        Args:
            deadline: seconds for the whole call.
            key: an idempotency key (the call runs at most once per key).
            retries: attempts (0-8) after a failure of the session, with the same key.
            hedged: the call is idempotent: a second replica is asked after the observed p95.

        Raises:
            ToolFailed: the tool failed (its reason is the message).
            NoSuchTool, DeadlineExceeded, Cancelled, PeerDead, ...
        """
        pending = self.start_call(tool, args, url=url, endpoint=endpoint, targets=targets,
                                  deadline=deadline, key=key, retries=retries, hedged=hedged)
        if self._conn.write_paused:
            await self._conn.drain()
        return await pending

    # ---------------------------------------------------------------------------------------
    # Regions

    async def region(self, length: int) -> Region:
        """A new shared-memory region of ``length`` bytes (a ``memfd``), registered with the
        sidecar; write into :attr:`Region.buf` and give :attr:`Region.descriptor` to peers."""
        return await create_region(self._conn, length)

    async def register_fd(self, fd: int, length: int) -> Region:
        """Register ``length`` bytes of a file descriptor the caller made (a ``memfd`` or any
        file that can be mapped shared); the caller keeps and closes ``fd``."""
        return await register_fd(self._conn, fd, length)

    async def notification(self) -> Notification:
        """The next notification of any region (one a :meth:`Region.notification` waits for
        goes there instead)."""
        return await self._conn.wait_note(None)  # type: ignore[no-any-return]

    # ---------------------------------------------------------------------------------------
    # The connection

    async def ping(self) -> None:
        """A round trip to the sidecar."""
        await self._conn.run(w.Ping(), w.Done)

    async def close(self) -> None:
        """Close the connection: the sidecar closes its channels, cancels its calls and drops
        its regions; pending operations here fail with :class:`ConnectionLost`."""
        conn = self._conn
        for _call, task in list(conn.tool_tasks.values()):
            task.cancel()
        conn.close("the client closed the connection")
        try:
            await asyncio.wait_for(asyncio.shield(conn.closed), 5.0)
        except asyncio.TimeoutError:  # the sidecar does not take what is buffered: drop it
            if conn.transport is not None:
                conn.transport.abort()
            await asyncio.shield(conn.closed)
        for region in list(conn.regions.values()):
            region._unmap()
        conn.regions.clear()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def connect(socket_path: Optional[str] = None, endpoint: Optional[str] = None, *,
                  timeout: float = 10.0) -> Client:
    """Connect to the sidecar's socket and say ``HELLO`` as ``endpoint``.

    Args:
        socket_path: the sidecar's socket; default: the environment's ``AGENTFABRIC_SOCKET``.
        endpoint: this client's name on the node (1-32 of ``A-Z a-z 0-9 . _ -``); default
            ``py-<pid>-<n>``.
        timeout: seconds for the connection and the handshake.

    Raises:
        InvalidArgument: no socket path, or a bad endpoint name.
        ConnectFailed: the socket could not be connected.
        EndpointTaken, PermissionDenied, UnsupportedVersion: the sidecar's refusal.
    """
    path = socket_path if socket_path is not None else os.environ.get(SOCKET_ENV)
    if not path:
        raise InvalidArgument("no sidecar socket: pass socket_path= or set %s" % SOCKET_ENV)
    if endpoint is None:
        endpoint = "py-%d-%d" % (os.getpid(), next(_connections))
    _check_endpoint(endpoint)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    conn = Connection(loop, sock)
    try:
        try:
            await asyncio.wait_for(loop.sock_connect(sock, path), timeout)
        except OSError as e:
            raise ConnectFailed("cannot connect to the sidecar at %s: %s"
                                % (path, e.strerror or e)) from e
        await loop.create_connection(lambda: conn, sock=sock)
    except asyncio.TimeoutError:
        sock.close()
        raise DeadlineExceeded("connecting to the sidecar at %s took over %ss"
                               % (path, timeout)) from None
    except BaseException:
        sock.close()
        raise
    conn.write(w.encode(0, w.Hello(w.VERSION, w.VERSION, endpoint)))
    try:
        hello = await asyncio.wait_for(asyncio.shield(conn.hello), timeout)
    except asyncio.TimeoutError:
        conn.close("no HELLO_OK")
        raise DeadlineExceeded("the sidecar at %s did not answer HELLO within %ss"
                               % (path, timeout)) from None
    except BaseException:
        conn.close("the handshake failed")
        raise
    return Client(conn, hello)
