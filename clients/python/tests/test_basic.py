"""The client against real sidecars: hello, ping, channels within a node and between two,
ordered sends, requests and responses, closing."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, List

import pytest

import agentfabric as af
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Sidecar


def test_hello_and_ping(sidecar: Sidecar, arun: Callable[..., Any]) -> None:
    async def main() -> None:
        async with await af.connect(sidecar.socket, endpoint="hello") as c:
            assert (c.node, c.endpoint, c.version) == (sidecar.node, "hello", 1)
            assert (c.uid, c.pid) == (os.getuid(), os.getpid())
            assert c.send_window >= 1 and c.max_frame > 65536 and c.max_ops >= 1
            for _ in range(10):
                await c.ping()
            await asyncio.gather(*(c.ping() for _ in range(200)))
        assert c.closed
        with pytest.raises(af.ConnectionLost):
            await c.ping()

    arun(main())


def test_socket_from_the_environment(sidecar: Sidecar, arun: Callable[..., Any],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFABRIC_SOCKET", sidecar.socket)

    async def main() -> None:
        c = await af.connect()
        assert c.endpoint.startswith("py-%d-" % os.getpid())
        await c.ping()
        await c.close()

    arun(main())


def test_connect_errors(sidecar: Sidecar, arun: Callable[..., Any],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTFABRIC_SOCKET", raising=False)

    async def main() -> None:
        with pytest.raises(af.InvalidArgument, match="AGENTFABRIC_SOCKET"):
            await af.connect()
        with pytest.raises(af.ConnectFailed):
            await af.connect(sidecar.socket + ".nope", endpoint="x")
        with pytest.raises(af.InvalidArgument):
            await af.connect(sidecar.socket, endpoint="bad name!")
        first = await af.connect(sidecar.socket, endpoint="taken")
        with pytest.raises(af.EndpointTaken):
            await af.connect(sidecar.socket, endpoint="taken")
        await first.ping()  # the refusal did not disturb the holder
        await first.close()
        again = await af.connect(sidecar.socket, endpoint="taken")  # free once closed
        await again.close()

    arun(main())


async def _pair(url: str, a: af.Client, b: af.Client, **kw: Any) -> List[af.Channel]:
    ch = await a.open(url, b.endpoint, **kw)
    peer = await b.accept()
    return [ch, peer]


@pytest.mark.parametrize("remote", [False, True], ids=["same-node", "two-nodes"])
def test_ordered_messages(two_sidecars: List[Sidecar], remote: bool,
                          arun: Callable[..., Any]) -> None:
    sa, sb = two_sidecars
    n = 3000

    async def main() -> None:
        a = await af.connect(sa.socket, endpoint="sender")
        b = await af.connect((sb if remote else sa).socket, endpoint="receiver")
        url = sb.url if remote else ""
        ch, peer = await _pair(url, a, b, label="ordered", klass=af.Class.COORDINATION,
                               priority=6)
        assert (ch.node, ch.endpoint, ch.label, ch.klass, ch.priority) == (
            b.node, "receiver", "ordered", af.Class.COORDINATION, 6)
        assert (peer.node, peer.endpoint, peer.label, peer.klass, peer.priority) == (
            a.node, "sender", "ordered", af.Class.COORDINATION, 6)
        assert peer.incoming and not ch.incoming

        # Large ones amid small ones (a large one last: test_flow.py's own test).
        sizes = [i % 7 * 100 for i in range(n)]
        sizes[n // 2:n // 2] = [1 << 20, 0, 5 << 20]

        async def send() -> None:
            for i, size in enumerate(sizes):
                body = (i.to_bytes(4, "little") * (size // 4 + 1))[:max(size, 4)]
                # bytes, bytearray and memoryview are all taken
                await ch.send([bytes, bytearray, memoryview][i % 3](body))
            await ch.flush()

        async def recv() -> None:
            for i, size in enumerate(sizes):
                m = await peer.recv()
                assert m.request == 0
                assert len(m.body) == max(size, 4) and m.body[:4] == i.to_bytes(4, "little")

        await asyncio.gather(send(), recv())
        await a.close()
        await b.close()

    arun(main(), 120)


def test_request_response(two_sidecars: List[Sidecar], arun: Callable[..., Any]) -> None:
    sa, sb = two_sidecars

    async def main() -> None:
        a = await af.connect(sa.socket, endpoint="asker")
        b = await af.connect(sb.socket, endpoint="answerer")
        ch, peer = await _pair(sb.url, a, b)

        async def answer() -> None:
            async for m in peer:
                assert m.request != 0
                if m.body == b"fail":
                    await peer.respond_error(m, "asked to fail")
                elif m.body == b"ignore":
                    pass
                else:
                    await peer.respond(m, m.body[::-1])

        server = asyncio.ensure_future(answer())
        assert await ch.request(b"hello", deadline=10) == b"olleh"
        got = await asyncio.gather(*(ch.request(b"%d" % i, deadline=10) for i in range(100)))
        assert got == [(b"%d" % i)[::-1] for i in range(100)]
        big = os.urandom(2 << 20)
        assert await ch.request(big, deadline=20) == big[::-1]
        with pytest.raises(af.RemoteError, match="asked to fail"):
            await ch.request(b"fail", deadline=10)
        with pytest.raises(af.DeadlineExceeded):
            await ch.request(b"ignore", deadline=0.2)
        with pytest.raises(TimeoutError):  # DeadlineExceeded is a TimeoutError
            await ch.request(b"ignore", deadline=0.05)
        await ch.close()
        await asyncio.wait_for(server, 10)  # `async for` ended at the close
        await a.close()
        await b.close()

    arun(main())


def test_close_drains_then_ends(two_sidecars: List[Sidecar], arun: Callable[..., Any]) -> None:
    sa, sb = two_sidecars

    async def main() -> None:
        a = await af.connect(sa.socket, endpoint="closer")
        b = await af.connect(sb.socket, endpoint="reader")
        ch, peer = await _pair(sb.url, a, b)
        for i in range(50):
            await ch.send(b"%d" % i)
        await ch.close("finished")
        with pytest.raises(af.Closed):
            await ch.send(b"after close")
        got = [m.body async for m in peer]  # every message, then the normal end
        assert got == [b"%d" % i for i in range(50)]
        with pytest.raises(af.Closed):
            await peer.recv()
        assert peer.closed
        await peer.close()  # closing an ended channel is fine
        await a.close()
        await b.close()

    arun(main())


def test_open_errors(two_sidecars: List[Sidecar], arun: Callable[..., Any]) -> None:
    sa, sb = two_sidecars

    async def main() -> None:
        a = await af.connect(sa.socket, endpoint="opener")
        with pytest.raises(af.Refused):
            await a.open(sb.url, "nobody")
        with pytest.raises(af.Refused):
            await a.open("", "nobody")
        with pytest.raises(af.InvalidArgument):
            await a.open("", "x", priority=8)
        with pytest.raises((af.ConnectFailed, af.InvalidArgument)):
            await a.open("nonsense://x", "nobody")
        await a.ping()  # none of these ended the connection
        await a.close()

    arun(main())


def test_refused_incoming_channel(sidecar: Sidecar, arun: Callable[..., Any]) -> None:
    async def main() -> None:
        a = await af.connect(sidecar.socket, endpoint="eager")
        b = await af.connect(sidecar.socket, endpoint="picky")
        ch = await a.open("", "picky", label="unwanted")
        peer = await b.accept()
        await peer.close("not today")
        with pytest.raises(af.FabricError):
            await ch.recv()
        await a.close()
        await b.close()

    arun(main())


def test_connection_lost_fails_pending(sidecar: Sidecar, arun: Callable[..., Any]) -> None:
    async def main() -> None:
        a = await af.connect(sidecar.socket, endpoint="left")
        b = await af.connect(sidecar.socket, endpoint="right")
        ch, peer = await _pair("", a, b)
        await ch.send(b"queued")
        await ch.flush()
        await asyncio.sleep(0.2)
        pending = asyncio.ensure_future(b.accept())
        await asyncio.sleep(0.05)
        sidecar.proc.kill()  # abrupt: no goodbye on any channel
        with pytest.raises(af.ConnectionLost):
            await asyncio.wait_for(pending, 10)
        assert (await peer.recv()).body == b"queued"  # what arrived is still read
        with pytest.raises(af.ConnectionLost):
            await peer.recv()
        with pytest.raises(af.ConnectionLost):
            await a.ping()
        with pytest.raises(af.ConnectionLost):
            await ch.send(b"x")
        await a.close()
        await b.close()

    arun(main())


def test_sidecar_stopping_closes_channels(sidecar: Sidecar, arun: Callable[..., Any]) -> None:
    async def main() -> None:
        a = await af.connect(sidecar.socket, endpoint="left")
        b = await af.connect(sidecar.socket, endpoint="right")
        ch, peer = await _pair("", a, b)
        await ch.send(b"queued")
        await ch.flush()
        sidecar.kill()  # SIGTERM: the sidecar closes its channels, then the connections
        got = [m.body async for m in peer]
        assert got == [b"queued"]
        with pytest.raises(af.ConnectionLost):
            for _ in range(200):  # the connections end right after the channels
                await a.ping()
                await asyncio.sleep(0.05)
        await a.close()
        await b.close()

    arun(main())
