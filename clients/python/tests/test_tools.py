"""Tools against real sidecars: serve, call (local and remote), failures, cancellation,
deadlines, idempotency keys, hedged calls."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable, List

import pytest

import agentfabric as af

if TYPE_CHECKING:
    from conftest import Sidecar


def test_serve_and_call(two_sidecars: List[Sidecar], arun: Callable[..., Any]) -> None:
    sa, sb = two_sidecars

    async def main() -> None:
        server = await af.connect(sb.socket, endpoint="tools")
        caller = await af.connect(sa.socket, endpoint="caller")
        local = await af.connect(sb.socket, endpoint="neighbour")
        seen: List[af.ToolCall] = []

        async def upper(call: af.ToolCall) -> bytes:
            seen.append(call)
            return call.args.upper()

        def plain(call: af.ToolCall) -> str:  # a plain function, a str result
            return "plain:" + call.args.decode()

        async def broken(call: af.ToolCall) -> bytes:
            raise ValueError("no good: " + call.args.decode())

        await server.serve("upper", upper)
        await server.serve("plain", plain)
        await server.serve("broken", broken)

        assert await caller.call("upper", b"abc", url=sb.url, endpoint="tools",
                                 deadline=10) == b"ABC"
        assert await local.call("upper", b"xyz", endpoint="tools", deadline=10) == b"XYZ"
        assert await caller.call("plain", b"q", url=sb.url, endpoint="tools") == b"plain:q"
        call = seen[0]
        assert (call.tool, call.node, call.args, call.key) == ("upper", sa.node, b"abc", b"")
        assert 0 < call.deadline <= 10

        results = await asyncio.gather(*(caller.call("upper", b"m%d" % i, url=sb.url,
                                                     endpoint="tools", deadline=10)
                                         for i in range(100)))
        assert results == [b"M%d" % i for i in range(100)]

        with pytest.raises(af.ToolFailed, match="no good: x"):
            await caller.call("broken", b"x", url=sb.url, endpoint="tools", deadline=10)
        with pytest.raises(af.NoSuchTool):
            await caller.call("absent", b"", url=sb.url, endpoint="tools", deadline=10)
        with pytest.raises(af.InvalidArgument):
            await caller.call("upper", b"", deadline=10)  # no endpoint, no targets

        await server.unserve("upper")
        with pytest.raises(af.NoSuchTool):
            await caller.call("upper", b"x", url=sb.url, endpoint="tools", deadline=10)
        for c in (server, caller, local):
            await c.close()

    arun(main())


def test_cancel_and_deadline(two_sidecars: List[Sidecar], arun: Callable[..., Any]) -> None:
    sa, sb = two_sidecars

    async def main() -> None:
        server = await af.connect(sb.socket, endpoint="slow")
        caller = await af.connect(sa.socket, endpoint="impatient")
        started = asyncio.Event()
        cancelled: List[af.ToolCall] = []
        task_cancelled = asyncio.Event()

        async def slow(call: af.ToolCall) -> bytes:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(call)
                task_cancelled.set()
                raise
            return b"late"

        await server.serve("slow", slow)

        pending = caller.start_call("slow", b"", url=sb.url, endpoint="slow", deadline=30)
        await asyncio.wait_for(started.wait(), 10)
        pending.cancel()
        with pytest.raises(af.Cancelled):
            await pending
        await asyncio.wait_for(task_cancelled.wait(), 10)
        assert cancelled[0].cancelled.is_set()

        started.clear()
        task_cancelled.clear()
        with pytest.raises(af.DeadlineExceeded):
            await caller.call("slow", b"", url=sb.url, endpoint="slow", deadline=0.3)
        await asyncio.wait_for(task_cancelled.wait(), 10)

        # Cancelling the awaiting task cancels the call too.
        started.clear()
        task_cancelled.clear()
        t = asyncio.ensure_future(caller.call("slow", b"", url=sb.url, endpoint="slow",
                                              deadline=30))
        await asyncio.wait_for(started.wait(), 10)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        await asyncio.wait_for(task_cancelled.wait(), 10)
        await caller.ping()
        await server.close()
        await caller.close()

    arun(main())


def test_keys_and_hedging(two_sidecars: List[Sidecar], arun: Callable[..., Any]) -> None:
    sa, sb = two_sidecars

    async def main() -> None:
        r1 = await af.connect(sb.socket, endpoint="replica1")
        r2 = await af.connect(sb.socket, endpoint="replica2")
        caller = await af.connect(sa.socket, endpoint="hedger")
        keys: List[bytes] = []

        async def answer(call: af.ToolCall) -> bytes:
            keys.append(call.key)
            return b"from " + call.tool.encode()

        await r1.serve("work", answer)
        await r2.serve("work", answer)
        got = await caller.call("work", b"", url=sb.url, endpoint="replica1", key=b"k-1",
                                retries=2, deadline=10)
        assert got == b"from work" and keys == [b"k-1"]
        targets = [(sb.url, "replica1"), (sb.url, "replica2")]
        for _ in range(5):
            assert await caller.call("work", b"", targets=targets, hedged=True,
                                     deadline=10) == b"from work"
        with pytest.raises(af.InvalidArgument):
            await caller.call("work", b"", url=sb.url, endpoint="replica1", key=b"")
        with pytest.raises(af.InvalidArgument):
            await caller.call("work", b"", url=sb.url, endpoint="replica1", retries=9)
        for c in (r1, r2, caller):
            await c.close()

    arun(main())
