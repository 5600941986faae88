"""A blocking wrapper of the asyncio client, for scripts.

:func:`connect` starts a private event loop in a background thread and returns a
:class:`SyncClient` whose methods are :class:`~agentfabric.client.Client`'s, blocking until the
operation completes; channels, regions and pending calls are wrapped likewise. The blocking
waits (``recv``, ``accept``, ``notification``, ``PendingCall.result``) take an optional
``timeout`` in seconds, past which they raise :class:`~agentfabric.errors.DeadlineExceeded`
(a :class:`TimeoutError`) and leave nothing taken.

Do not call these methods from a coroutine running on the client's own loop (an ``async`` tool
handler): use the asyncio objects there (``SyncClient.aio``, ``SyncChannel.aio``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from typing import Any, Awaitable, Callable, Dict, Iterable, Iterator, Optional, Tuple, TypeVar, Union

from . import client as _client
from .channel import Channel
from .errors import Closed, DeadlineExceeded
from .region import Region
from .tools import PendingCall, ToolCall
from .values import DEFAULT_DEADLINE, Class, Message, Notification, TransferReport

__all__ = ["connect", "SyncClient", "SyncChannel", "SyncRegion", "SyncPendingCall"]

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="agentfabric-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Awaitable[T], timeout: Optional[float] = None,
            what: str = "the operation") -> T:
        """Run ``coro`` on the loop and wait for it (cancelling it after ``timeout``)."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("a blocking agentfabric call on the client's own event loop")
        fut: "concurrent.futures.Future[T]" = asyncio.run_coroutine_threadsafe(
            coro, self.loop)  # type: ignore[arg-type]
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            if not fut.done():
                fut.cancel()
                raise DeadlineExceeded("%s took over %ss" % (what, timeout)) from None
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop and join the thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def _call(fn: Callable[[], T]) -> T:
    return fn()


class SyncRegion:
    """A blocking :class:`~agentfabric.region.Region` (``aio`` is the asyncio one)."""

    def __init__(self, lt: _LoopThread, region: Region) -> None:
        self._lt = lt
        self.aio = region

    @property
    def handle(self) -> int:
        """The region's handle."""
        return self.aio.handle

    @property
    def length(self) -> int:
        """Its length in bytes."""
        return self.aio.length

    @property
    def descriptor(self) -> bytes:
        """The value peers address it by."""
        return self.aio.descriptor

    @property
    def buf(self) -> Optional[memoryview]:
        """A writable view of the shared mapping."""
        return self.aio.buf

    def notification(self, timeout: Optional[float] = None) -> Notification:
        """The next notification of a transfer into this region."""
        note = self._lt.run(self.aio.notification(), timeout, "waiting for a notification")
        return note._replace(region=self)

    def drop(self) -> None:
        """Revoke and unmap the region."""
        self._lt.run(self.aio.drop())

    def __repr__(self) -> str:
        return "<SyncRegion %d, %d bytes>" % (self.handle, self.length)


def _unwrap(region: Union[SyncRegion, Region, int]) -> Union[Region, int]:
    return region.aio if isinstance(region, SyncRegion) else region


class SyncChannel:
    """A blocking :class:`~agentfabric.channel.Channel` (``aio`` is the asyncio one)."""

    def __init__(self, lt: _LoopThread, channel: Channel) -> None:
        self._lt = lt
        self.aio = channel

    def __getattr__(self, name: str) -> Any:
        if name in ("handle", "node", "endpoint", "label", "klass", "priority", "url",
                    "incoming", "closed"):
            return getattr(self.aio, name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        return "<SyncChannel %r>" % (self.aio,)

    def send(self, data: Any) -> None:
        """Send ``data`` (windowed, as :meth:`Channel.send`)."""
        self._lt.run(self.aio.send(data))

    def flush(self) -> None:
        """Wait until every send is answered."""
        self._lt.run(self.aio.flush())

    def recv(self, timeout: Optional[float] = None) -> Message:
        """The next message; raises :class:`Closed` at the channel's normal end."""
        return self._lt.run(self.aio.recv(), timeout, "waiting for a message")

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.recv()
            except Closed:
                return

    def request(self, data: Any, deadline: float = DEFAULT_DEADLINE) -> bytes:
        """Send a request and return the response's body."""
        return self._lt.run(self.aio.request(data, deadline))

    def respond(self, msg: Union[Message, int], data: Any) -> None:
        """Answer the request ``msg``."""
        self._lt.run(self.aio.respond(msg, data))

    def respond_error(self, msg: Union[Message, int], reason: str) -> None:
        """Answer the request ``msg`` with a failure."""
        self._lt.run(self.aio.respond_error(msg, reason))

    def close(self, reason: str = "") -> None:
        """Close the channel."""
        self._lt.run(self.aio.close(reason))

    def write(self, region: Union[SyncRegion, Region, int], descriptor: bytes,
              blocks: Iterable[Tuple[int, int, int]], notify: Optional[int] = None,
              deadline: Optional[float] = None) -> TransferReport:
        """Move blocks from ``region`` to the peer's region ``descriptor``."""
        return self._lt.run(self.aio.write(_unwrap(region), descriptor, list(blocks), notify,
                                           deadline))

    def read(self, region: Union[SyncRegion, Region, int], descriptor: bytes,
             blocks: Iterable[Tuple[int, int, int]], notify: Optional[int] = None,
             deadline: Optional[float] = None) -> TransferReport:
        """Move blocks from the peer's region ``descriptor`` into ``region``."""
        return self._lt.run(self.aio.read(_unwrap(region), descriptor, list(blocks), notify,
                                          deadline))

    def __enter__(self) -> "SyncChannel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SyncPendingCall:
    """A tool call in flight (blocking :class:`~agentfabric.tools.PendingCall`)."""

    def __init__(self, lt: _LoopThread, pending: PendingCall) -> None:
        self._lt = lt
        self.aio = pending

    def result(self, timeout: Optional[float] = None) -> bytes:
        """Wait for the result (``timeout`` leaves the call running)."""

        async def result() -> bytes:
            return await self.aio

        async def wait() -> bytes:
            # The shield keeps a timeout here from cancelling the call itself.
            return await asyncio.shield(asyncio.ensure_future(result()))

        return self._lt.run(wait(), timeout, "waiting for the call")

    def cancel(self) -> None:
        """Cancel the call (it then fails with :class:`Cancelled`)."""
        self._lt.run(_call(self.aio.cancel))

    def done(self) -> bool:
        """Whether the call completed."""
        return self.aio.done()


class SyncClient:
    """A blocking :class:`~agentfabric.client.Client` (``aio`` is the asyncio one, living on
    the private loop)."""

    def __init__(self, lt: _LoopThread, aio: _client.Client) -> None:
        self._lt = lt
        self.aio = aio
        self._regions: Dict[int, SyncRegion] = {}

    def __getattr__(self, name: str) -> Any:
        if name in ("node", "endpoint", "uid", "pid", "version", "max_frame", "max_ops",
                    "send_window", "closed"):
            return getattr(self.aio, name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        return "<SyncClient %s/%s>" % (self.aio.node, self.aio.endpoint)

    def open(self, url: str, endpoint: str, label: str = "", klass: Class = Class.COORDINATION,
             priority: int = 4) -> SyncChannel:
        """Open a channel (see :meth:`Client.open`)."""
        return SyncChannel(self._lt, self._lt.run(self.aio.open(url, endpoint, label, klass,
                                                                priority)))

    def accept(self, timeout: Optional[float] = None) -> SyncChannel:
        """The next incoming channel."""
        return SyncChannel(self._lt, self._lt.run(self.aio.accept(), timeout,
                                                  "waiting for a channel"))

    def serve(self, tool: str, handler: Callable[[ToolCall], Any]) -> None:
        """Serve ``tool`` with ``handler``: an ``async`` function runs on the client's loop, a
        plain one in a worker thread (so it may block, and use this client)."""
        if inspect.iscoroutinefunction(handler):
            h = handler
        else:
            loop = self._lt.loop

            async def h(call: ToolCall) -> Any:
                r = await loop.run_in_executor(None, handler, call)
                if inspect.isawaitable(r):
                    r = await r
                return r

        self._lt.run(self.aio.serve(tool, h))

    def unserve(self, tool: str) -> None:
        """Stop serving ``tool``."""
        self._lt.run(self.aio.unserve(tool))

    def start_call(self, tool: str, args: Any = b"", **kw: Any) -> SyncPendingCall:
        """Start a tool call (see :meth:`Client.call` for the keywords)."""
        return SyncPendingCall(self._lt, self._lt.run(_call(
            lambda: self.aio.start_call(tool, args, **kw))))

    def call(self, tool: str, args: Any = b"", *, url: str = "", endpoint: Optional[str] = None,
             targets: Optional[Iterable[Tuple[str, str]]] = None,
             deadline: float = DEFAULT_DEADLINE, key: Optional[Any] = None, retries: int = 0,
             hedged: bool = False) -> bytes:
        """Call a tool and return its result (see :meth:`Client.call`)."""
        return self._lt.run(self.aio.call(
            tool, args, url=url, endpoint=endpoint, targets=targets, deadline=deadline, key=key,
            retries=retries, hedged=hedged))

    def region(self, length: int) -> SyncRegion:
        """A new shared-memory region (see :meth:`Client.region`)."""
        r = SyncRegion(self._lt, self._lt.run(self.aio.region(length)))
        self._regions[r.handle] = r
        return r

    def register_fd(self, fd: int, length: int) -> SyncRegion:
        """Register the caller's ``fd`` as a region (see :meth:`Client.register_fd`)."""
        r = SyncRegion(self._lt, self._lt.run(self.aio.register_fd(fd, length)))
        self._regions[r.handle] = r
        return r

    def notification(self, timeout: Optional[float] = None) -> Notification:
        """The next notification of any region."""
        note = self._lt.run(self.aio.notification(), timeout, "waiting for a notification")
        if isinstance(note.region, Region):
            return note._replace(region=self._regions.get(note.region.handle, note.region))
        return note

    def ping(self) -> None:
        """A round trip to the sidecar."""
        self._lt.run(self.aio.ping())

    def close(self) -> None:
        """Close the connection and stop the private loop. Idempotent."""
        if self._lt.loop.is_closed():
            return
        try:
            self._lt.run(self.aio.close())
        finally:
            self._lt.stop()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(socket_path: Optional[str] = None, endpoint: Optional[str] = None, *,
            timeout: float = 10.0) -> SyncClient:
    """Connect as :func:`agentfabric.connect` does, with a private loop in a background
    thread; returns a :class:`SyncClient`."""
    lt = _LoopThread()
    try:
        aio = lt.run(_client.connect(socket_path, endpoint, timeout=timeout))
    except BaseException:
        lt.stop()
        raise
    return SyncClient(lt, aio)
