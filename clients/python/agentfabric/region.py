"""Regions: shared memory this client registers with the sidecar, so that channel transfers
(:meth:`Channel.write`, :meth:`Channel.read`) move bytes from and to its pages with no copy."""

from __future__ import annotations

import asyncio
import fcntl
import mmap
import os
from typing import Any, Optional

from . import _wire as w
from ._conn import Connection, Sink
from .errors import FabricError, InvalidArgument
from .values import Notification

__all__ = ["Region", "create_region", "register_fd"]


class Region:
    """A registered region.

    Attributes:
        handle: the region's handle on the connection.
        length: its length in bytes.
        descriptor: the opaque value a peer needs to address it (send it over a channel).
        buf: a writable :class:`memoryview` over the shared mapping (``None`` if the file
            descriptor given to :meth:`Client.register_fd` could not be mapped here).

    Do not write a range while a transfer reads it, nor read a range a transfer is writing,
    until the transfer's report or the notification.
    """

    def __init__(self, conn: Connection, handle: int, length: int, descriptor: bytes,
                 mapping: Optional[mmap.mmap]) -> None:
        self._conn = conn
        self.handle = handle
        self.length = length
        self.descriptor = descriptor
        self._mapping = mapping
        self.buf: Optional[memoryview] = memoryview(mapping) if mapping is not None else None
        self._dropped = False

    def __repr__(self) -> str:
        return "<Region %d, %d bytes>" % (self.handle, self.length)

    async def notification(self) -> Notification:
        """The next notification of a peer's transfer into this region."""
        note: Notification = await self._conn.wait_note(self.handle)
        return note

    async def drop(self) -> None:
        """Revoke the region (peers' later transfers fail), wait for transfers in flight on it,
        and unmap it. Idempotent."""
        if self._dropped:
            return
        self._dropped = True
        try:
            if self._conn.lost is None:
                await self._conn.run(w.RegionDrop(self.handle), w.Done)
        finally:
            self._conn.regions.pop(self.handle, None)
            self._unmap()

    def _unmap(self) -> None:
        if self.buf is not None:
            self.buf.release()
            self.buf = None
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                pass  # slices of .buf are still held; the mapping goes with the last one
            self._mapping = None


class _RegionSink(Sink):
    """Makes the :class:`Region` when ``REGION`` arrives, before any notification for it."""

    def __init__(self, conn: Connection, fut: "asyncio.Future[Region]",
                 mapping: Optional[mmap.mmap]) -> None:
        self.conn = conn
        self.fut = fut
        self.mapping = mapping

    def op_reply(self, msg: Any, exc: Optional[FabricError], op: int = 0) -> None:
        if exc is not None or type(msg) is not w.Region:
            if self.mapping is not None:
                self.mapping.close()
            if not self.fut.done():
                self.fut.set_exception(exc if exc is not None else InvalidArgument(
                    "REGION_ADD answered with %s" % type(msg).__name__))
            return
        if self.fut.done():  # the caller is gone: give the region back
            self.conn.fire(w.RegionDrop(msg.region))
            if self.mapping is not None:
                self.mapping.close()
            return
        region = Region(self.conn, msg.region, msg.len, msg.descriptor, self.mapping)
        self.conn.regions[msg.region] = region
        self.fut.set_result(region)


async def _add(conn: Connection, fd: int, length: int, mapping: Optional[mmap.mmap]) -> Region:
    fut: "asyncio.Future[Region]" = conn.loop.create_future()
    await conn.start_with_fd(w.RegionAdd(length), fd, _RegionSink(conn, fut, mapping))
    return await fut


def _map(fd: int, length: int) -> mmap.mmap:
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


async def create_region(conn: Connection, length: int) -> Region:
    """A new ``memfd`` of ``length`` bytes (sealed against shrinking, as the protocol asks),
    mapped shared here and registered."""
    if length <= 0:
        raise InvalidArgument("a region of %d bytes" % length)
    conn.check()
    fd = os.memfd_create("agentfabric-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, length)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        mapping = _map(fd, length)
        try:
            return await _add(conn, fd, length, mapping)
        except BaseException:
            mapping.close()
            raise
    finally:
        os.close(fd)


async def register_fd(conn: Connection, fd: int, length: int) -> Region:
    """Register ``length`` bytes of the caller's ``fd`` (which stays the caller's to close);
    it is also mapped here for :attr:`Region.buf` when it can be.

    The sidecar takes only a ``memfd`` made with ``MFD_ALLOW_SEALING`` and sealed with
    ``F_SEAL_SHRINK`` (else :class:`BadFd`); the seal is added here if it is missing and can be.
    """
    if length <= 0:
        raise InvalidArgument("a region of %d bytes" % length)
    conn.check()
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        pass  # not a sealable memfd: the sidecar says BAD_FD
    try:
        mapping: Optional[mmap.mmap] = _map(fd, length)
    except (OSError, ValueError):
        mapping = None
    try:
        return await _add(conn, fd, length, mapping)
    except BaseException:
        if mapping is not None:
            mapping.close()
        raise
