"""The pyzmq baseline's agents against each other (no sidecar needed)."""

import asyncio

import pytest

pytest.importorskip("zmq")

from agentfabric.bench import procs  # noqa: E402
from agentfabric.bench._agent import ZmqSide  # noqa: E402
from agentfabric.bench.hdr import Histogram  # noqa: E402


def test_zmq_echo_agent_round_trips_and_load():
    async def go():
        echo = await procs.Agent.start("zmq-echo", {})
        try:
            ready = await echo.expect("ready", 30)
            side = ZmqSide(ready["endpoint"], 64)
            h = Histogram()
            n = await asyncio.to_thread(side.ping, 0.2, h)
            assert n == h.count and n > 10
            loaded = Histogram()
            big = bytes(4 << 20)
            moved, seconds = await asyncio.to_thread(side.loaded, big, 0.05, 0.3, loaded)
            assert loaded.count >= 1
            assert moved % len(big) == 0 and moved > 0
            assert 0.3 <= seconds < 5
            # A ping waits behind a bulk exchange: slower than idle.
            assert loaded.value_at_quantile(0.5) > h.value_at_quantile(0.5)
        finally:
            await echo.stop()
        assert echo.proc.returncode == 0

    asyncio.run(go())


def test_unknown_role_reports_an_error():
    async def go():
        a = await procs.Agent.start("nonsense", {})
        with pytest.raises(procs.BenchError, match="unknown role"):
            await a.expect("ready", 30)
        await a.stop()

    asyncio.run(go())
