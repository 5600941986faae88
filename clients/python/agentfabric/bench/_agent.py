"""The benchmark's agent processes: ``python -m agentfabric.bench._agent ROLE PARAMS``.

``PARAMS`` is a JSON object. An agent prints JSON lines on standard output for the coordinator
(``{"ready": ...}`` once it serves, ``{"result": ...}`` when measured, ``{"error": "..."}`` when
it failed), progress on standard error, and exits when its standard input reaches end of file
(the coordinator closed it, or died).

Roles:

- ``echo`` (fabric, the far sidecar): accepts channels. On a channel labelled ``ping`` it sends
  every message back. On a channel labelled ``bulk`` it answers requests: ``region N`` makes a
  memfd region of N bytes and answers its descriptor; ``check`` answers the CRC-32 of the
  region's bytes (after the writes, to verify them).
- ``zmq-echo``: a pyzmq REP socket bound to a random loopback tcp port; answers a message of at
  most 64 KiB with the same bytes and a larger one (a bulk message) with one byte.
- ``pinger`` (fabric, the near sidecar, and the pyzmq REQ side): measures one workload
  (``pingpong``, ``mixed`` or ``bulk``) and prints histograms and counts as its result.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import threading
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

from .hdr import Histogram

# Messages up to this size are pings for zmq-echo (echoed); larger ones are bulk (acknowledged).
ZMQ_ECHO_LIMIT = 64 << 10
# Length of one pingpong slice: fabric and pyzmq take turns in slices of about this long.
SLICE_S = 0.5
# Rounds of mixed: idle and loaded slices of both sides, taking turns.
MIXED_ROUNDS = 4

_role = "agent"
_START = time.monotonic()


def progress(msg: str) -> None:
    t = time.monotonic() - _START
    print(f"[agentfabric.bench {_role} +{t:.2f}s] {msg}", file=sys.stderr, flush=True)


def emit(obj: Dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _exit_on_stdin_eof() -> None:
    """Ends the process when standard input closes: the coordinator's signal, or its death."""

    def watch() -> None:
        try:
            while os.read(0, 65536):  # the raw descriptor: no lock for interpreter shutdown
                pass
        except Exception:
            pass
        os._exit(0)

    threading.Thread(target=watch, name="stdin-eof", daemon=True).start()


def _body(x: object) -> bytes:
    """The bytes of a message or response (a message object's ``body``, or bytes)."""
    b = getattr(x, "body", x)
    return bytes(b)  # type: ignore[arg-type]


def pattern(n: int, seed: int = 1) -> bytes:
    """``n`` pseudo-random bytes (so that a misplaced block changes the checksum)."""
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------------------------
# echo (fabric)


async def run_echo(p: Dict[str, object]) -> None:
    import agentfabric as af

    client = await af.connect(str(p["socket"]), endpoint=str(p["endpoint"]))
    regions: List[object] = []  # kept alive while the agent runs
    tasks = set()

    async def ping(ch) -> None:
        async for msg in ch:
            await ch.send(msg.body)

    async def bulk(ch) -> None:
        region = None
        async for msg in ch:
            cmd = _body(msg)
            if cmd.startswith(b"region "):
                n = int(cmd.split()[1])
                region = await client.region(n)
                regions.append(region)
                progress(f"region of {n} B for {ch.node}/{ch.endpoint}")
                await ch.respond(msg, bytes(region.descriptor))
            elif cmd == b"check" and region is not None:
                crc = zlib.crc32(region.buf)
                await ch.respond(msg, str(crc).encode())
            else:
                await ch.respond(msg, b"?")

    async def serve(ch) -> None:
        try:
            if str(ch.label).startswith("bulk"):
                await bulk(ch)
            else:
                await ping(ch)
        except Exception as e:  # a closed channel ends its loop; anything else is reported
            progress(f"channel {ch.label!r} from {ch.node}/{ch.endpoint} ended: {e!r}")

    emit({"ready": {"endpoint": p["endpoint"]}})
    while True:
        ch = await client.accept()
        t = asyncio.ensure_future(serve(ch))
        tasks.add(t)
        t.add_done_callback(tasks.discard)


# --------------------------------------------------------------------------------------------
# zmq-echo


def run_zmq_echo(p: Dict[str, object]) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    emit({"ready": {"endpoint": f"tcp://127.0.0.1:{port}"}})
    while True:
        # Taken without a copy: a bulk message is only measured, a ping's bytes are sent back.
        frame = sock.recv(copy=False)
        if len(frame.buffer) > ZMQ_ECHO_LIMIT:
            sock.send(b"k")
        else:
            sock.send(frame.bytes)


# --------------------------------------------------------------------------------------------
# pinger: the measuring side


class FairLock:
    """A first-come first-served lock: the ping thread and the bulk thread of pyzmq's loaded
    phase take the one REQ socket in turns (``threading.Lock`` promises no order)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._next = 0
        self._serving = 0

    def __enter__(self) -> "FairLock":
        with self._cv:
            ticket = self._next
            self._next += 1
            while self._serving != ticket:
                self._cv.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            self._serving += 1
            self._cv.notify_all()


class ZmqSide:
    """The pyzmq REQ side: round trips, and 64 MiB messages on the same socket."""

    def __init__(self, endpoint: str, size: int):
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.payload = bytes(size)
        self.size = size
        self.lock = FairLock()

    def ping(self, seconds: float, hist: Optional[Histogram]) -> int:
        """Round trips back to back for ``seconds`` (at least one); returns how many."""
        sock, payload, lock, pc = self.sock, self.payload, self.lock, time.perf_counter_ns
        end = pc() + int(seconds * 1e9)
        n = 0
        while True:
            t0 = pc()
            with lock:
                sock.send(payload)
                reply = sock.recv()
            t1 = pc()
            if hist is not None:
                hist.record_clamped(t1 - t0)
            n += 1
            if t1 >= end:
                break
        if len(reply) != self.size:
            raise RuntimeError(f"pyzmq echo of {len(reply)} B, expected {self.size}")
        return n

    def loaded(
        self, big: bytes, warmup: float, seconds: float, hist: Histogram
    ) -> Tuple[int, float]:
        """Round trips while ``big`` goes back to back on the same socket (each exchange holds
        the socket, so a ping waits behind it); returns (bulk bytes acknowledged during the
        measured part, its length in seconds)."""
        stop = threading.Event()
        counted: List[int] = []
        window = [0, 0]  # measured part: start, end (ns); 0 = not yet
        failure: List[BaseException] = []

        def bulk() -> None:
            sock, lock, pc = self.sock, self.lock, time.perf_counter_ns
            try:
                while not stop.is_set():
                    with lock:
                        sock.send(big, copy=False)
                        sock.recv()
                    t = pc()
                    if window[0] and t >= window[0] and (not window[1] or t <= window[1]):
                        counted.append(len(big))
            except BaseException as e:  # reported by the caller
                failure.append(e)

        th = threading.Thread(target=bulk, name="zmq-bulk", daemon=True)
        th.start()
        try:
            self.ping(warmup, None)
            window[0] = time.perf_counter_ns()
            self.ping(seconds, hist)
            window[1] = time.perf_counter_ns()
        finally:
            stop.set()
            th.join()
        if failure:
            raise failure[0]
        return sum(counted), (window[1] - window[0]) / 1e9


class FabricPing:
    """Round trips on a coordination channel: ``send`` then ``recv`` of the echo."""

    def __init__(self, ch, size: int):
        self.ch = ch
        self.payload = bytes(size)
        self.size = size

    async def ping(self, seconds: float, hist: Optional[Histogram]) -> int:
        ch, payload, pc = self.ch, self.payload, time.perf_counter_ns
        end = pc() + int(seconds * 1e9)
        n = 0
        while True:
            t0 = pc()
            await ch.send(payload)
            msg = await ch.recv()
            t1 = pc()
            if hist is not None:
                hist.record_clamped(t1 - t0)
            n += 1
            if t1 >= end:
                break
        if len(msg.body) != self.size:
            raise RuntimeError(f"fabric echo of {len(msg.body)} B, expected {self.size}")
        return n


class FabricBulk:
    """Region writes of one memfd region into the echo agent's, over a bulk channel's peer."""

    def __init__(self, client, ch, region, descriptor: bytes, block: int, total: int):
        self.client = client
        self.ch = ch
        self.region = region
        self.descriptor = descriptor
        self.total = total
        self.blocks = [(off, off, min(block, total - off)) for off in range(0, total, block)]
        self.crc = 0

    @classmethod
    async def open(cls, client, af, url: str, endpoint: str, block: int, total: int, label: str):
        ch = await client.open(url, endpoint, label=label, klass=af.Class.BULK, priority=3)
        region = await client.region(total)
        data = pattern(total)
        region.buf[:total] = data
        resp = await ch.request(f"region {total}".encode(), deadline=30.0)
        b = cls(client, ch, region, _body(resp), block, total)
        b.crc = zlib.crc32(data)
        return b

    async def write(self):
        return await self.ch.write(self.region, self.descriptor, self.blocks)

    async def verify(self) -> None:
        resp = _body(await self.ch.request(b"check", deadline=30.0))
        if int(resp) != self.crc:
            raise RuntimeError(
                f"the peer's region holds other bytes than were written (CRC-32 {int(resp):#x}, "
                f"expected {self.crc:#x})"
            )


async def pingpong(client, af, p: Dict[str, object]) -> Dict[str, object]:
    size, duration, warmup = int(p["size"]), float(p["duration"]), float(p["warmup"])
    ch = await client.open(
        str(p["url"]), str(p["peer"]), label="ping", klass=af.Class.COORDINATION, priority=7
    )
    fabric = FabricPing(ch, size)
    zq = ZmqSide(str(p["zmq"]), size)
    progress(f"warm-up {warmup:.2f} s each")
    await fabric.ping(warmup, None)
    await asyncio.to_thread(zq.ping, warmup, None)
    hf, hz = Histogram(), Histogram()
    slices = max(1, round(duration / SLICE_S))
    each = duration / slices
    progress(f"measuring {slices} slices of {each:.2f} s each, taking turns")
    for i in range(slices):
        # F Z, Z F, F Z ...: neither side always follows the other.
        order = ("f", "z") if i % 2 == 0 else ("z", "f")
        for side in order:
            if side == "f":
                await fabric.ping(each, hf)
            else:
                await asyncio.to_thread(zq.ping, each, hz)
    await ch.close()
    return {"fabric": hf.to_dict(), "zmq": hz.to_dict()}


async def mixed(client, af, p: Dict[str, object]) -> Dict[str, object]:
    duration, warmup = float(p["duration"]), float(p["warmup"])
    block, total = int(p["block"]), int(p["transfer"])
    url, peer = str(p["url"]), str(p["peer"])
    ch = await client.open(url, peer, label="ping", klass=af.Class.COORDINATION, priority=7)
    fabric = FabricPing(ch, 64)
    bulk = await FabricBulk.open(client, af, url, peer, block, total, "bulk")
    zq = ZmqSide(str(p["zmq"]), 64)
    big = pattern(total, seed=2)
    h = {k: Histogram() for k in ("f_idle", "f_loaded", "z_idle", "z_loaded")}
    f_bytes = z_bytes = 0
    f_time = z_time = 0.0
    rw, rd = warmup / MIXED_ROUNDS, duration / MIXED_ROUNDS

    async def fabric_loaded() -> Tuple[int, float]:
        stop = asyncio.Event()
        window = [0, 0]
        counted = [0]

        async def load() -> None:
            while not stop.is_set():
                report = await bulk.write()
                t = time.perf_counter_ns()
                if window[0] and t >= window[0] and (not window[1] or t <= window[1]):
                    counted[0] += int(report.bytes)

        task = asyncio.ensure_future(load())
        try:
            await asyncio.sleep(0)  # the first write is on its way
            await fabric.ping(rw, None)
            window[0] = time.perf_counter_ns()
            await fabric.ping(rd, h["f_loaded"])
            window[1] = time.perf_counter_ns()
        finally:
            stop.set()
            await task
        return counted[0], (window[1] - window[0]) / 1e9

    for r in range(MIXED_ROUNDS):
        progress(f"round {r + 1}/{MIXED_ROUNDS}: fabric idle")
        await fabric.ping(rw, None)
        await fabric.ping(rd, h["f_idle"])
        progress(f"round {r + 1}/{MIXED_ROUNDS}: fabric loaded (64 MiB region writes)")
        b, t = await fabric_loaded()
        f_bytes, f_time = f_bytes + b, f_time + t
        progress(f"round {r + 1}/{MIXED_ROUNDS}: pyzmq idle")
        await asyncio.to_thread(zq.ping, rw, None)
        await asyncio.to_thread(zq.ping, rd, h["z_idle"])
        progress(f"round {r + 1}/{MIXED_ROUNDS}: pyzmq loaded (64 MiB messages, same socket)")
        b, t = await asyncio.to_thread(zq.loaded, big, rw, rd, h["z_loaded"])
        z_bytes, z_time = z_bytes + b, z_time + t
    await bulk.verify()
    await ch.close()
    out: Dict[str, object] = {k: v.to_dict() for k, v in h.items()}
    out.update(f_bytes=f_bytes, f_time=f_time, z_bytes=z_bytes, z_time=z_time)
    return out


async def bulk(client, af, p: Dict[str, object]) -> Dict[str, object]:
    duration, warmup = float(p["duration"]), float(p["warmup"])
    block, total = int(p["block"]), int(p["transfer"])
    b = await FabricBulk.open(client, af, str(p["url"]), str(p["peer"]), block, total, "bulk")

    async def batches(seconds: float) -> Tuple[int, int, float, float]:
        start = time.perf_counter()
        moved = count = 0
        inside = 0.0
        while count == 0 or time.perf_counter() - start < seconds:
            report = await b.write()
            moved += int(report.bytes)
            inside += float(report.elapsed)
            count += 1
        return moved, count, time.perf_counter() - start, inside

    progress(f"warm-up {warmup:.2f} s")
    await batches(warmup)
    progress(f"measuring {duration:.2f} s of {total} B writes in {len(b.blocks)} blocks")
    moved, count, elapsed, inside = await batches(duration)
    await b.verify()
    return {
        "bytes": moved,
        "batches": count,
        "elapsed": elapsed,
        "sidecar_elapsed": inside,
        "blocks_per_batch": len(b.blocks),
    }


async def run_pinger(p: Dict[str, object]) -> None:
    import agentfabric as af

    client = await af.connect(str(p["socket"]), endpoint=str(p["endpoint"]))
    try:
        work: Callable = {"pingpong": pingpong, "mixed": mixed, "bulk": bulk}[str(p["workload"])]
        result = await work(client, af, p)
    finally:
        try:
            await client.close()
        except Exception as e:
            progress(f"close: {e!r}")
    emit({"result": result})


def run_on_loop(coro: Any, loop: str) -> None:
    """Runs ``coro`` on asyncio's own event loop, or on uvloop's (``loop == "uvloop"``)."""
    if loop == "uvloop":
        try:
            import uvloop  # type: ignore[import-not-found]
        except ImportError:
            coro.close()
            raise RuntimeError("--loop uvloop: uvloop is not installed (pip install uvloop)")
        uvloop.install()
    asyncio.run(coro)


def main(argv: List[str]) -> int:
    global _role
    if len(argv) != 2:
        print("usage: python -m agentfabric.bench._agent ROLE PARAMS_JSON", file=sys.stderr)
        return 2
    _role, params = argv[0], json.loads(argv[1])
    _exit_on_stdin_eof()
    try:
        if _role == "echo":
            run_on_loop(run_echo(params), str(params.get("loop", "asyncio")))
        elif _role == "zmq-echo":
            run_zmq_echo(params)
        elif _role == "pinger":
            run_on_loop(run_pinger(params), str(params.get("loop", "asyncio")))
        else:
            raise ValueError(f"unknown role {_role!r}")
    except KeyboardInterrupt:
        return 130
    except BaseException as e:
        emit({"error": f"{type(e).__name__}: {e}"})
        progress(f"failed: {e!r}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
