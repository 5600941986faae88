"""The blocking wrapper (agentfabric.sync) against a real sidecar."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, List

import pytest

import agentfabric as af

if TYPE_CHECKING:
    from conftest import Sidecar


def test_sync_round_trip(sidecar: Sidecar) -> None:
    with af.sync.connect(sidecar.socket, endpoint="s1") as a, \
            af.sync.connect(sidecar.socket, endpoint="s2") as b:
        assert (a.node, a.endpoint, a.version) == (sidecar.node, "s1", 1)
        a.ping()
        ch = a.open("", "s2", label="sync")
        peer = b.accept(timeout=10)
        assert (peer.endpoint, peer.label) == ("s1", "sync")
        for i in range(100):
            ch.send(b"%d" % i)
        ch.flush()
        assert [peer.recv(timeout=10).body for _ in range(100)] == [b"%d" % i
                                                                    for i in range(100)]
        with pytest.raises(af.DeadlineExceeded):
            peer.recv(timeout=0.1)

        def answer() -> None:
            for m in peer:
                peer.respond(m, b"re:" + m.body)

        t = threading.Thread(target=answer)
        t.start()
        assert ch.request(b"q", deadline=10) == b"re:q"
        ch.close()
        t.join(10)
        assert not t.is_alive()


def test_sync_tools_and_regions(sidecar: Sidecar) -> None:
    with af.sync.connect(sidecar.socket, endpoint="server") as s, \
            af.sync.connect(sidecar.socket, endpoint="client") as c:
        threads: List[str] = []

        def blocking(call: af.ToolCall) -> bytes:
            threads.append(threading.current_thread().name)
            time.sleep(0.05)  # a plain handler may block: it runs in a worker thread
            return b"ok:" + call.args

        async def coro(call: af.ToolCall) -> bytes:
            return b"async:" + call.args

        s.serve("blocking", blocking)
        s.serve("coro", coro)
        assert c.call("blocking", b"1", endpoint="server", deadline=10) == b"ok:1"
        assert c.call("coro", b"2", endpoint="server", deadline=10) == b"async:2"
        assert threads and threads[0] != "agentfabric-loop"
        pending = c.start_call("blocking", b"3", endpoint="server", deadline=10)
        assert pending.result(timeout=10) == b"ok:3" and pending.done()

        def fails(call: af.ToolCall) -> bytes:
            raise RuntimeError("sync boom")

        s.serve("fails", fails)
        with pytest.raises(af.ToolFailed, match="sync boom"):
            c.call("fails", b"", endpoint="server", deadline=10)

        ch = c.open("", "server", klass=af.Class.BULK)
        s.accept(timeout=10)
        mine = c.region(65536)
        theirs = s.region(65536)
        mine.buf[:4] = b"sync"
        report = ch.write(mine, theirs.descriptor, [(0, 100, 4)], notify=1)
        assert report.bytes == 4
        note = theirs.notification(timeout=10)
        assert note.region is theirs and note.tag == 1
        assert bytes(theirs.buf[100:104]) == b"sync"
        mine.drop()
        theirs.drop()
