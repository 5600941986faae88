"""Shared-memory regions against real sidecars: memfd regions passed by SCM_RIGHTS, writes
and reads between nodes, notifications, dropping."""

from __future__ import annotations

import asyncio
import fcntl
import os
from typing import TYPE_CHECKING, Any, Callable, List

import pytest

import agentfabric as af

if TYPE_CHECKING:
    from conftest import Sidecar

MIB = 1 << 20


def test_write_read_and_notify(two_sidecars: List[Sidecar], arun: Callable[..., Any]) -> None:
    sa, sb = two_sidecars

    async def main() -> None:
        a = await af.connect(sa.socket, endpoint="writer")
        b = await af.connect(sb.socket, endpoint="owner")
        ch = await a.open(sb.url, "owner", label="bulk", klass=af.Class.BULK, priority=2)
        await b.accept()
        src = await a.region(4 * MIB)
        dst = await b.region(4 * MIB)
        assert (src.length, dst.length) == (4 * MIB, 4 * MIB) and dst.descriptor
        assert src.buf is not None and dst.buf is not None and len(src.buf) == 4 * MIB

        data = os.urandom(3 * MIB)
        src.buf[:len(data)] = data
        blocks = [(0, MIB, MIB), (MIB, 0, MIB), (2 * MIB, 2 * MIB, MIB)]
        report = await ch.write(src, dst.descriptor, blocks, notify=77, deadline=30)
        assert (report.bytes, report.blocks) == (3 * MIB, 3) and report.elapsed >= 0
        note = await asyncio.wait_for(dst.notification(), 10)
        assert (note.region, note.tag, note.node) == (dst, 77, sa.node)
        assert bytes(dst.buf[MIB:2 * MIB]) == data[:MIB]
        assert bytes(dst.buf[:MIB]) == data[MIB:2 * MIB]
        assert bytes(dst.buf[2 * MIB:3 * MIB]) == data[2 * MIB:]

        # Read it back into another place of the writer's region; no notification asked.
        report = await ch.read(src, dst.descriptor, [(3 * MIB, 0, MIB)])
        assert report.bytes == MIB
        assert bytes(src.buf[3 * MIB:]) == data[MIB:2 * MIB]

        # A notification nobody waits on by region goes to client.notification().
        await ch.write(src, dst.descriptor, [(0, 0, 16)], notify=5)
        note = await asyncio.wait_for(b.notification(), 10)
        assert (note.region, note.tag) == (dst, 5)

        with pytest.raises(af.FabricError):  # out of the remote region's bounds
            await ch.write(src, dst.descriptor, [(0, 4 * MIB - 8, 16)])
        with pytest.raises(af.FabricError):
            await ch.write(src, b"not a descriptor", [(0, 0, 16)])

        await dst.drop()
        assert dst.buf is None
        with pytest.raises(af.FabricError):  # revoked
            await ch.write(src, dst.descriptor, [(0, 0, 16)])
        await src.drop()
        await a.close()
        await b.close()

    arun(main())


def test_register_fd(sidecar: Sidecar, arun: Callable[..., Any]) -> None:
    async def main() -> None:
        c = await af.connect(sidecar.socket, endpoint="fds")
        fd = os.memfd_create("mine", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, MIB)
            region = await c.register_fd(fd, MIB)
            assert region.length == MIB and region.buf is not None
            region.buf[:3] = b"abc"
            assert os.pread(fd, 3, 0) == b"abc"  # the same pages
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
            await region.drop()
        finally:
            os.close(fd)
        # A file that cannot be sealed is refused, and the connection goes on.
        plain = os.open("/dev/zero", os.O_RDWR)
        try:
            with pytest.raises(af.FabricError):
                await c.register_fd(plain, MIB)
        finally:
            os.close(plain)
        await c.ping()
        await c.close()

    arun(main())


def test_many_regions_concurrently(sidecar: Sidecar, arun: Callable[..., Any]) -> None:
    """Regions added while other frames flow: the fd frames keep their place in the stream."""

    async def main() -> None:
        c = await af.connect(sidecar.socket, endpoint="busy")
        d = await af.connect(sidecar.socket, endpoint="sink")
        ch = await c.open("", "sink")
        peer = await d.accept()

        async def chatter() -> None:
            for i in range(2000):
                await ch.send(b"x" * (i % 300))
            await ch.flush()

        async def drain() -> None:
            for i in range(2000):
                assert len((await peer.recv()).body) == i % 300

        regions = await asyncio.gather(chatter(), drain(),
                                       *(c.region(64 * 1024) for _ in range(20)))
        handles = {r.handle for r in regions[2:]}
        assert len(handles) == 20
        for r in regions[2:]:
            await r.drop()
        await c.close()
        await d.close()

    arun(main())
