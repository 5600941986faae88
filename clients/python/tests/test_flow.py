"""Flow control against a real sidecar: the send window, and a receiver that does not read
(the client stops reading the socket, the sidecar holds the traffic back, nothing is lost)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable

import agentfabric as af
from agentfabric import _conn

if TYPE_CHECKING:
    from conftest import Sidecar


def test_send_window_is_respected(sidecar: Sidecar, arun: Callable[..., Any]) -> None:
    async def main() -> None:
        a = await af.connect(sidecar.socket, endpoint="fast")
        b = await af.connect(sidecar.socket, endpoint="slow")
        ch = await a.open("", "slow")
        peer = await b.accept()
        most = 0
        for i in range(5000):
            await ch.send(b"m")
            most = max(most, ch._inflight)
        assert most <= a.send_window
        await ch.flush()
        assert ch._inflight == 0
        for _ in range(5000):
            await peer.recv()
        await a.close()
        await b.close()

    arun(main(), 120)


def test_unread_channel_pauses_the_socket(sidecar: Sidecar, arun: Callable[..., Any],
                                          monkeypatch: Any) -> None:
    # Small bounds so the test moves little data.
    monkeypatch.setattr(_conn, "MAX_QUEUED_BYTES", 2 << 20)
    monkeypatch.setattr(_conn, "MAX_QUEUED_FRAMES", 256)

    async def main() -> None:
        a = await af.connect(sidecar.socket, endpoint="producer")
        b = await af.connect(sidecar.socket, endpoint="consumer")
        ch = await a.open("", "consumer")
        peer = await b.accept()
        n, size = 2000, 16 * 1024  # 32 MiB in all, far past the client's bound

        async def produce() -> None:
            for i in range(n):
                await ch.send(i.to_bytes(4, "little") * (size // 4))
            await ch.flush()

        producer = asyncio.ensure_future(produce())
        paused = False
        for _ in range(200):
            await asyncio.sleep(0.02)
            paused = paused or b._conn.reading_paused
            if paused:
                break
        assert paused, "the client never stopped reading"
        assert b._conn.queued_frames <= 256 + 64 and b._conn.queued_bytes <= (2 << 20) + 512 * 1024
        for i in range(n):
            m = await peer.recv()
            assert m.body[:4] == i.to_bytes(4, "little")
        await asyncio.wait_for(producer, 30)
        assert not b._conn.reading_paused and b._conn.queued_frames == 0
        await a.close()
        await b.close()

    arun(main(), 120)


def test_last_large_message_arrives(sidecar: Sidecar, arun: Callable[..., Any]) -> None:
    """A burst of small messages read as they come, then 1 MiB, 0 B and 5 MiB: the last one
    must arrive too (its SEND was answered), trial after trial."""
    sizes = [i % 7 * 100 for i in range(1000)] + [1 << 20, 0, 5 << 20]

    async def trial(k: int) -> None:
        a = await af.connect(sidecar.socket, endpoint="s%d" % k)
        b = await af.connect(sidecar.socket, endpoint="r%d" % k)
        ch = await a.open("", "r%d" % k)
        peer = await b.accept()

        async def send() -> None:
            for s in sizes:
                await ch.send(bytes(s))
            await ch.flush()

        async def recv() -> None:
            for i, s in enumerate(sizes):
                try:
                    m = await asyncio.wait_for(peer.recv(), 10)
                except asyncio.TimeoutError:
                    raise AssertionError("trial %d: message %d of %d (%d B) never arrived; "
                                         "every send was answered" % (k, i, len(sizes), s))
                assert len(m.body) == s

        await asyncio.gather(send(), recv())
        await a.close()
        await b.close()

    async def main() -> None:
        for k in range(60):
            await trial(k)

    arun(main(), 300)
