"""Agents in their own processes, for the tests that stop, kill or run them as another user:
``python agent_proc.py ROLE JSON`` (conftest.py's ``agents`` fixture starts them).

Each prints one JSON object per line on stdout (``{"event": NAME, ...}``: ``ready`` once
connected, then as the role says; ``error`` with the exception if the role fails, exit 1) and
reads commands, one per line, on stdin. Roles:

- ``bystander``: clients ``NAME-src`` (on ``sock_a``) and ``NAME-dst`` (on ``sock_b``), a
  channel src -> dst; src sends numbered messages every ``interval`` seconds, dst acknowledges
  each on the same channel. ``progress`` every 0.25 s; on ``stop``: the last acknowledgements
  awaited, then ``result`` (counts, order errors, the longest gaps between arrivals).
- ``connect``: ``probe``: whether this user can stat the socket directory's parent, the
  directory, list it, stat the socket; then connects to ``sock`` as ``endpoint`` and pings;
  ``result`` says what happened (``ok``, or the exception's class, text and cause), exit 0
  either way.
- ``echo``: client ``endpoint`` on ``sock``; takes one incoming channel and answers every
  message with ``re:`` + its body, in order; ``got`` for each (``body``, ``n`` so far,
  ``closed``: whether the connection had ended). At the channel's end: ``end`` (``error``: how
  the channel ended, None for a normal close).
- ``flood``: client ``endpoint`` on ``sock`` opens a channel (``klass``) to ``to`` at ``url``
  and sends ``size``-byte messages numbered from 0 (the number in the first 8 bytes) as fast
  as the channel takes them, ``count`` of them (0: without end), from the start or, with
  ``wait``, from a ``go`` on stdin; ``progress`` (``sent``: sends returned) every 0.2 s;
  ``done`` after the last was flushed.
- ``sink``: client ``endpoint`` on ``sock`` takes one incoming channel and reads it to its end;
  ``progress`` (``received`` messages, ``bytes``) every 0.2 s.
- ``writer``: client ``endpoint`` on ``sock`` opens a bulk channel to ``to`` at ``url``, takes
  a region descriptor from the first message the peer sends on it, fills a ``size``-byte region
  (each 4 KiB block stamped with its index) and writes it all there with ``notify`` n (the
  write's number, from 1), ``repeat`` times back to back: ``writing`` (``n``) before each,
  ``written`` after each.
- ``tool``: client ``endpoint`` on ``sock`` serves ``tool``: each call prints ``exec`` (its
  key and args) and returns ``b"done:" + args`` after ``delay`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, Dict

import agentfabric as af

BLOCK = 4096


def emit(event: str, **kw: Any) -> None:
    kw["event"] = event
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def stdin_lines(loop: asyncio.AbstractEventLoop) -> "asyncio.Queue[str]":
    """stdin's lines as they come ("" at its end), read by a thread."""
    q: "asyncio.Queue[str]" = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(q.put_nowait, line.strip())
        loop.call_soon_threadsafe(q.put_nowait, "")

    threading.Thread(target=read, daemon=True).start()
    return q


def stamp(buf: memoryview, first_block: int, nblocks: int) -> None:
    """Block i (4 KiB) of ``buf`` holds ``first_block + i`` (8 bytes, little-endian) 512
    times: a block written to the wrong place, or not at all, shows."""
    for i in range(nblocks):
        buf[i * BLOCK:(i + 1) * BLOCK] = (first_block + i).to_bytes(8, "little") * (BLOCK // 8)


async def bystander(a: Dict[str, Any]) -> None:
    name = a["name"]
    interval = float(a.get("interval", 0.005))
    src = await af.connect(a["sock_a"], endpoint=name + "-src")
    dst = await af.connect(a["sock_b"], endpoint=name + "-dst")
    ch = await src.open(a["url_b"], dst.endpoint, label="bystander",
                        klass=af.Class.COORDINATION, priority=4)
    peer = await dst.accept()
    stop = asyncio.Event()
    lines = stdin_lines(asyncio.get_running_loop())
    st = {"sent": 0, "received": 0, "acked": 0, "gap_recv": 0.0, "gap_ack": 0.0}
    errors = []

    async def commands() -> None:
        while (await lines.get()) not in ("stop", ""):
            pass
        stop.set()

    async def send() -> None:
        seq = 0
        while not stop.is_set():
            await ch.send(seq.to_bytes(8, "little") + bytes(seq % 5 * 200))
            seq += 1
            st["sent"] = seq
            await asyncio.sleep(interval)
        await ch.send(b"end")
        await ch.flush()

    async def receive() -> None:
        last = time.monotonic()
        while True:
            m = await peer.recv()
            now = time.monotonic()
            st["gap_recv"] = max(st["gap_recv"], now - last)
            last = now
            if m.body == b"end":
                await peer.send(b"end")
                await peer.flush()
                return
            seq = int.from_bytes(m.body[:8], "little")
            if seq != st["received"] or len(m.body) != 8 + seq % 5 * 200:
                errors.append("dst got #%d (%d B), expected #%d" % (seq, len(m.body),
                                                                     st["received"]))
            st["received"] += 1
            await peer.send(b"ack" + m.body[:8])

    async def acks() -> None:
        last = time.monotonic()
        while True:
            m = await ch.recv()
            now = time.monotonic()
            st["gap_ack"] = max(st["gap_ack"], now - last)
            last = now
            if m.body == b"end":
                return
            seq = int.from_bytes(m.body[3:11], "little")
            if m.body[:3] != b"ack" or seq != st["acked"]:
                errors.append("src got ack #%d, expected #%d" % (seq, st["acked"]))
            st["acked"] += 1

    async def progress() -> None:
        while True:
            emit("progress", **st)
            await asyncio.sleep(0.25)

    emit("ready", src=src.node, dst=dst.node)
    prog = asyncio.ensure_future(progress())
    cmd = asyncio.ensure_future(commands())
    work = asyncio.gather(send(), receive(), acks())
    try:
        await stop.wait()
        # Once stopped, the last acknowledgements have 30 s to come.
        await asyncio.wait_for(work, 30)
    except Exception as e:  # counted below: the result says what went wrong
        errors.append("%s: %s" % (type(e).__name__, e))
        traceback.print_exc()
        work.cancel()
    prog.cancel()
    cmd.cancel()
    st["gap_recv"] = round(st["gap_recv"], 3)
    st["gap_ack"] = round(st["gap_ack"], 3)
    emit("result", errors=errors, **st)
    await ch.close()
    await src.close()
    await dst.close()


async def connect(a: Dict[str, Any]) -> None:
    # What this user may do on the way to the socket: the directory's parent is open to it,
    # the socket's own directory is what must keep it out.
    sockdir = os.path.dirname(a["sock"])
    probe = {}
    for what, f in (("stat_parent", lambda: os.stat(os.path.dirname(sockdir))),
                    ("stat_dir", lambda: os.stat(sockdir)),
                    ("list_dir", lambda: os.listdir(sockdir)),
                    ("stat_socket", lambda: os.stat(a["sock"]))):
        try:
            f()
            probe[what] = "ok"
        except OSError as e:
            probe[what] = type(e).__name__
    emit("probe", **probe)
    try:
        c = await af.connect(a["sock"], endpoint=a["endpoint"], timeout=10)
        await c.ping()
        await c.close()
        emit("result", ok=True, uid=os.getuid())
    except Exception as e:
        cause = e.__cause__
        emit("result", ok=False, uid=os.getuid(), error=type(e).__name__, message=str(e),
             cause=type(cause).__name__ if cause is not None else None)


async def echo(a: Dict[str, Any]) -> None:
    c = await af.connect(a["sock"], endpoint=a["endpoint"])
    emit("ready", pid=os.getpid())
    ch = await c.accept()
    n = 0
    try:
        async for m in ch:
            await ch.send(b"re:" + m.body)
            n += 1
            emit("got", n=n, body=m.body.decode(errors="replace"), closed=c.closed)
    except af.FabricError as e:
        emit("end", n=n, error="%s: %s" % (type(e).__name__, e), closed=c.closed)
        return
    emit("end", n=n, error=None, closed=c.closed)
    await c.close()


async def flood(a: Dict[str, Any]) -> None:
    c = await af.connect(a["sock"], endpoint=a["endpoint"])
    ch = await c.open(a["url"], a["to"], label="flood", klass=af.Class(a.get("klass", 0)),
                      priority=int(a.get("priority", 4)))
    size, count = int(a["size"]), int(a.get("count", 0))
    filler = bytes(max(0, size - 8))
    st = {"sent": 0}

    async def progress() -> None:
        while True:
            emit("progress", **st)
            await asyncio.sleep(0.2)

    emit("ready", pid=os.getpid())
    lines = stdin_lines(asyncio.get_running_loop())
    if a.get("wait"):  # until told to go
        while (await lines.get()) not in ("go", ""):
            pass
    t0 = time.monotonic()
    prog = asyncio.ensure_future(progress())
    i = 0
    while count == 0 or i < count:
        await ch.send(i.to_bytes(8, "little") + filler)
        i += 1
        st["sent"] = i
    await ch.flush()
    prog.cancel()
    emit("done", seconds=time.monotonic() - t0, **st)
    while (await lines.get()) not in ("stop", ""):
        pass
    await c.close()


async def sink(a: Dict[str, Any]) -> None:
    c = await af.connect(a["sock"], endpoint=a["endpoint"])
    emit("ready", pid=os.getpid())
    ch = await c.accept()
    st = {"received": 0, "bytes": 0}

    async def progress() -> None:
        while True:
            emit("progress", **st)
            await asyncio.sleep(0.2)

    prog = asyncio.ensure_future(progress())
    try:
        async for m in ch:
            st["received"] += 1
            st["bytes"] += len(m.body)
    except af.FabricError:
        pass
    prog.cancel()
    emit("end", **st)
    await c.close()


async def writer(a: Dict[str, Any]) -> None:
    c = await af.connect(a["sock"], endpoint=a["endpoint"])
    ch = await c.open(a["url"], a["to"], label="writer", klass=af.Class.BULK, priority=2)
    size = int(a["size"])
    region = await c.region(size)
    assert region.buf is not None
    stamp(region.buf, 0, size // BLOCK)
    emit("ready", pid=os.getpid())
    descriptor = (await ch.recv()).body
    for n in range(1, int(a.get("repeat", 1)) + 1):
        emit("writing", n=n)
        report = await ch.write(region, descriptor, [(0, 0, size)], notify=n, deadline=600)
        emit("written", n=n, bytes=report.bytes, elapsed=report.elapsed)
    lines = stdin_lines(asyncio.get_running_loop())
    while (await lines.get()) not in ("stop", ""):
        pass
    await c.close()


async def tool(a: Dict[str, Any]) -> None:
    c = await af.connect(a["sock"], endpoint=a["endpoint"])
    delay = float(a.get("delay", 0))

    async def handler(call: af.ToolCall) -> bytes:
        emit("exec", key=call.key.decode(errors="replace"),
             args=call.args.decode(errors="replace"))
        await asyncio.sleep(delay)
        return b"done:" + call.args

    await c.serve(a["tool"], handler)
    emit("ready", pid=os.getpid())
    lines = stdin_lines(asyncio.get_running_loop())
    while (await lines.get()) not in ("stop", ""):
        pass
    await c.close()


ROLES = {f.__name__: f for f in (bystander, connect, echo, flood, sink, writer, tool)}


def run(role: str, args: Dict[str, Any]) -> int:
    """Run ``role`` with ``args``; the exit code."""
    try:
        asyncio.run(ROLES[role](args))
    except Exception as e:
        emit("error", error="%s: %s" % (type(e).__name__, e))
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], json.loads(sys.argv[2])))
