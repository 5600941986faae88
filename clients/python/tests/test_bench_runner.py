"""Tests of the benchmark's command line, reports and process helpers (no sidecar needed)."""

import asyncio
import json
import os
import stat
import sys
import threading
import time

import pytest

from agentfabric.bench import procs, runner
from agentfabric.bench._agent import FairLock, pattern
from agentfabric.bench.hdr import Histogram


def test_defaults():
    a = runner.parse_args([])
    assert a.workload == "all" and a.transport == "tcp" and not a.json
    assert a.duration is None and a.warmup == 0.5 and a.size == 64
    assert a.block_bytes == 1 << 20
    r = runner.Run(a, "/bin/true")
    assert [r.duration(w) for w in runner.WORKLOADS] == [3.0, 2.0, 3.0]
    a = runner.parse_args(["--duration", "0.7", "--workload", "bulk", "--json"])
    assert runner.Run(a, "x").duration("mixed") == 0.7


@pytest.mark.parametrize(
    "argv",
    [["--duration", "0"], ["--warmup", "-1"], ["--size", "0"], ["--block-bytes", str(65 << 20)],
     ["--transport", "mem"], ["--workload", "frames"]],
)
def test_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        runner.parse_args(argv)
    assert e.value.code == 2


def test_listen_urls(monkeypatch):
    assert runner.listen_url(runner.parse_args([])) == "tcp://127.0.0.1:0"
    assert runner.listen_url(runner.parse_args(["--transport", "quic"])) == "quic://127.0.0.1:0"
    monkeypatch.delenv("AGENTFABRIC_LAB_ADDR_A", raising=False)
    with pytest.raises(procs.BenchError, match="AGENTFABRIC_LAB_ADDR_A"):
        runner.listen_url(runner.parse_args(["--transport", "verbs"]))
    monkeypatch.setenv("AGENTFABRIC_LAB_ADDR_A", "10.77.0.1")
    assert runner.listen_url(runner.parse_args(["--transport", "verbs"])) == "verbs://10.77.0.1:0"
    a = runner.parse_args(["--transport", "verbs", "--listen-addr", "10.0.0.2"])
    assert runner.listen_url(a) == "verbs://10.0.0.2:0"


def test_ratio_and_rounding():
    assert runner.ratio(3.0, 2.0) == 1.5
    assert runner.ratio(1.0, 3.0) == 0.333
    assert runner.ratio(2.0, 3.0) == 0.667
    assert runner.ratio(1.0, 0.0) is None
    assert runner.ratio(None, 1.0) is None
    assert runner.ratio(1.0, None) is None
    assert runner.round3(0.0005) == 0.001


def test_find_binary(tmp_path, monkeypatch):
    exe = tmp_path / "agentfabric"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    assert procs.find_binary(str(exe)) == str(exe)
    with pytest.raises(procs.BenchError):
        procs.find_binary(str(tmp_path / "missing"))
    monkeypatch.setenv("AGENTFABRIC_BIN", str(exe))
    assert procs.find_binary() == str(exe)
    monkeypatch.setenv("AGENTFABRIC_BIN", str(tmp_path / "missing"))
    with pytest.raises(procs.BenchError, match="AGENTFABRIC_BIN"):
        procs.find_binary()


def test_fair_lock_alternates():
    lock = FairLock()
    order = []
    stop = threading.Event()

    def worker(name):
        while not stop.is_set():
            with lock:
                order.append(name)
                time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    # Once both wait, they take turns: no name twice in a row after the start.
    tail = order[4:]
    assert len(tail) > 10
    assert all(x != y for x, y in zip(tail, tail[1:]))


def test_pattern_is_deterministic():
    assert pattern(1000) == pattern(1000)
    assert pattern(1000) != pattern(1000, seed=2)
    assert len(pattern(3 << 20)) == 3 << 20


def _hist(values):
    h = Histogram()
    for v in values:
        h.record(v)
    return h.to_dict()


def test_reports_and_tables():
    a = runner.parse_args(["--json"])
    r = runner.Run(a, "x")
    r.sidecar_version = "0.1.0"
    out = r.bulk_report(
        {"bytes": 10 * (64 << 20), "elapsed": 1.0, "sidecar_elapsed": 0.5, "batches": 10,
         "blocks_per_batch": 64},
        {"mb_s": 1342.18, "debug_build": False, "error": None},
    )
    assert list(out)[:3] == ["transport", "workload", "client"]
    assert out["fabric_mb_s"] == 671.09 and out["sidecar_mb_s"] == 1342.18
    assert out["rust_mb_s"] == 1342.18 and out["ratio_rust"] == 0.5
    assert out["blocks_per_batch"] == 64 and out["direction"] == "push"
    json.dumps(out)
    assert "python/rust" in runner.table(out)
    missing = r.bulk_report(
        {"bytes": 1, "elapsed": 1.0, "sidecar_elapsed": 0.0, "batches": 1, "blocks_per_batch": 64},
        {"mb_s": None, "debug_build": None, "error": "not run"},
    )
    assert missing["ratio_rust"] is None and missing["sidecar_mb_s"] is None
    assert "not run" in runner.table(missing)


def test_pingpong_and_mixed_reports(monkeypatch):
    a = runner.parse_args(["--duration", "1"])
    r = runner.Run(a, "x")

    async def fake_agents(workload, params, zmq, timeout):
        assert zmq
        if workload == "pingpong":
            return {"fabric": _hist([20_000] * 99 + [40_000]), "zmq": _hist([100_000] * 100)}
        return {"f_idle": _hist([20_000] * 100), "f_loaded": _hist([30_000] * 100),
                "z_idle": _hist([100_000] * 100), "z_loaded": _hist([50_000_000] * 10),
                "f_bytes": 2_000_000_000, "f_time": 1.0, "z_bytes": 1_000_000_000, "z_time": 1.0}

    monkeypatch.setattr(r, "agents", fake_agents)
    p = asyncio.run(r.pingpong())
    assert p["workload"] == "pingpong" and p["size_bytes"] == 64 and p["duration_s"] == 1.0
    assert list(p["fabric"]) == ["count", "p50_us", "p99_us", "p999_us", "max_us"]
    assert p["baseline"]["name"] == "pyzmq REQ/REP"
    assert p["fabric"]["p50_us"] == 20.02 and p["baseline"]["p50_us"] == 100.03
    assert p["ratio_p50"] == 0.2
    keys = list(p)
    assert keys.index("fabric") < keys.index("baseline") < keys.index("ratio_p50")
    assert "fabric/pyzmq" in runner.table(p)
    m = asyncio.run(r.mixed())
    assert m["bulk_mb_s"] == 2000.0 and m["baseline"]["bulk_mb_s"] == 1000.0
    assert m["ratio_loaded_idle_p99"] == 1.5
    assert m["baseline"]["ratio_loaded_idle_p99"] > 400
    assert m["idle"]["count"] == 100 and m["baseline"]["loaded"]["count"] == 10
    assert m["rounds"] == 4 and m["block_bytes"] == 1 << 20 and m["transfer_bytes"] == 64 << 20
    json.dumps(m)
    assert "pyzmq loaded" in runner.table(m)


def test_missing_pyzmq_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "zmq", None)  # import zmq raises ImportError
    code = asyncio.run(runner.run(runner.parse_args(["--workload", "pingpong"])))
    assert code == 2
    err = capsys.readouterr().err
    assert "pip install 'agentfabric[bench]'" in err and "pip install pyzmq" in err


def test_no_binary_is_an_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AGENTFABRIC_BIN", str(tmp_path / "nothing"))
    assert runner.main(["--workload", "bulk"]) == 1
    assert "AGENTFABRIC_BIN" in capsys.readouterr().err


def test_sidecar_ready_line_and_failures(tmp_path):
    fake = tmp_path / "fake-agentfabric"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  sidecar) shift; echo \'{"node": "n1", "socket": "/tmp/x.sock", '
        '"listen": ["tcp://127.0.0.1:4567"]}\'; exec sleep 30;;\n'
        "  *) exit 3;;\n"
        "esac\n"
    )
    fake.chmod(0o755)
    dead = tmp_path / "dead"
    dead.write_text("#!/bin/sh\necho oops >&2\nexit 4\n")
    dead.chmod(0o755)

    async def go():
        s = await procs.Sidecar.start(str(fake), "n1", "tcp://127.0.0.1:0", str(tmp_path / "d"))
        assert s.node == "n1" and s.socket == "/tmp/x.sock"
        assert s.url("tcp") == "tcp://127.0.0.1:4567"
        with pytest.raises(procs.BenchError):
            s.url("quic")
        await s.stop()
        assert s.proc.returncode is not None
        with pytest.raises(procs.BenchError, match="exited"):
            await procs.Sidecar.start(str(dead), "n2", "tcp://127.0.0.1:0", str(tmp_path / "e"))

    asyncio.run(go())
