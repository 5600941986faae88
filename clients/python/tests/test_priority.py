"""Priorities under a bulk load: while a bulk-class channel carries 4 MiB messages back to back
between two sidecars, round trips on a priority-7 coordination channel between the same two
sidecars still complete, promptly.

The figures (idle and loaded round-trip percentiles, the bulk throughput) are printed; the
test asserts only what is robust on a slow shared machine: every round trip completes, the
bulk kept flowing meanwhile, and the loaded p99 stays below a generous absolute bound.
Performance is measured by the benchmarks, not here.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable, List

import agentfabric as af
from conftest import TIME_SCALE

if TYPE_CHECKING:
    from conftest import Agent, Sidecar

MIB = 1 << 20
ROUND_TRIPS = 300
#: The loaded round trips go on at least this long (seconds).
SECONDS = 2.0
#: The loaded p99 must stay below this (seconds, times AGENTFABRIC_TEST_TIME_SCALE).
P99_BOUND = 0.2


def percentile(xs: List[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


def summary(xs: List[float]) -> str:
    return "p50 %.2f ms, p99 %.2f ms, max %.2f ms" % (
        percentile(xs, 50) * 1e3, percentile(xs, 99) * 1e3, max(xs) * 1e3)


def test_coordination_round_trips_under_bulk_load(sidecars: Callable[..., Sidecar],
                                                  agents: Callable[..., Agent],
                                                  arun: Callable[..., Any]) -> None:
    sa, sb = sidecars("a"), sidecars("b")
    sink = agents("sink", sock=sb.socket, endpoint="bulk-sink")
    sink.expect("ready")
    source = agents("flood", sock=sa.socket, endpoint="bulk-source", url=sb.url, to="bulk-sink",
                    size=4 * MIB, klass=int(af.Class.BULK), priority=0, wait=True)
    source.expect("ready")

    def bulk_bytes() -> int:
        return int((sink.latest.get("progress") or {}).get("bytes", 0))

    async def main() -> None:
        a = await af.connect(sa.socket, endpoint="coord-a")
        b = await af.connect(sb.socket, endpoint="coord-b")
        ch = await a.open(sb.url, "coord-b", label="coordination",
                          klass=af.Class.COORDINATION, priority=7)
        peer = await b.accept()

        async def respond() -> None:
            async for m in peer:
                await peer.respond(m, m.body)

        responder = asyncio.ensure_future(respond())

        async def round_trips(n: int, seconds: float) -> List[float]:
            """At least ``n``, for at least ``seconds``."""
            rtts: List[float] = []
            t0 = time.monotonic()
            while len(rtts) < n or time.monotonic() - t0 < seconds:
                body = b"%d" % len(rtts)
                t = time.perf_counter()
                assert await ch.request(body, deadline=10 * TIME_SCALE) == body
                rtts.append(time.perf_counter() - t)
            return rtts

        await round_trips(100, 0)  # warm-up
        idle = await round_trips(ROUND_TRIPS, 1.0)

        source.command("go")
        t0 = time.monotonic()
        while bulk_bytes() < 8 * MIB:  # the bulk is flowing
            assert time.monotonic() - t0 < 30 * TIME_SCALE, "the bulk channel never got going"
            await asyncio.sleep(0.05)
        b0, t1 = bulk_bytes(), time.monotonic()
        loaded = await round_trips(ROUND_TRIPS, SECONDS)
        await asyncio.sleep(0.3)  # the sink's next progress report
        b1, t2 = bulk_bytes(), time.monotonic()

        print("coordination round trips, idle:   %s" % summary(idle))
        print("coordination round trips, loaded: %s" % summary(loaded))
        print("bulk meanwhile: %.0f MiB in %.2fs (%.0f MiB/s) in 4 MiB messages"
              % ((b1 - b0) / MIB, t2 - t1, (b1 - b0) / MIB / (t2 - t1)))
        print("%d round trips idle, %d loaded" % (len(idle), len(loaded)))
        assert len(loaded) >= ROUND_TRIPS
        assert b1 - b0 >= 4 * 4 * MIB, "the bulk stalled while the round trips ran"
        assert percentile(loaded, 99) < P99_BOUND * TIME_SCALE, summary(loaded)

        await ch.close()
        await asyncio.wait_for(responder, 10 * TIME_SCALE)
        await a.close()
        await b.close()

    arun(main(), 120 * TIME_SCALE)
    source.kill()
