"""python -m agentfabric.bench end to end, briefly, against real sidecars: one JSON line per
workload with the documented keys. Without an agentfabric binary these tests fail with how to
build one, unless AGENTFABRIC_ALLOW_SKIP=1 (then they skip), as the client's integration tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import find_binary

ROOT = Path(__file__).resolve().parents[1]  # clients/python


def _unavailable(why):
    if os.environ.get("AGENTFABRIC_ALLOW_SKIP") == "1":
        pytest.skip(why)
    pytest.fail(why + " (AGENTFABRIC_ALLOW_SKIP=1 skips this test)")


def _binary():
    # The client's tests' lookup (this checkout's target/), which holds wherever the package
    # is installed; the bench's own looks beside the package.
    b = find_binary()
    if b is None:
        _unavailable("no agentfabric binary (cargo build -p agentfabric-cli)")
    r = subprocess.run([b, "sidecar", "--help"], capture_output=True)
    if r.returncode != 0:
        _unavailable(f"{b} has no working sidecar subcommand")
    return b


def _run(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run([sys.executable, "-m", "agentfabric.bench", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


SUMMARY = ["count", "p50_us", "p99_us", "p999_us", "max_us"]


def test_all_workloads_json():
    pytest.importorskip("zmq")
    binary = _binary()
    r = _run(["--json", "--duration", "0.4", "--warmup", "0.1", "--sidecar-bin", binary])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3, r.stdout
    objs = [json.loads(line) for line in lines]
    assert [o["workload"] for o in objs] == ["pingpong", "mixed", "bulk"]
    for o in objs:
        assert o["transport"] == "tcp" and o["client"] == "python"
        assert o["duration_s"] == 0.4 and o["warmup_s"] == 0.1 and o["version"]
    pp, mx, bk = objs
    assert list(pp["fabric"]) == SUMMARY and pp["fabric"]["count"] > 0
    assert pp["baseline"]["name"] == "pyzmq REQ/REP" and pp["baseline"]["count"] > 0
    assert pp["ratio_p50"] > 0 and pp["ratio_p99"] > 0 and pp["ratio_p999"] > 0
    for k in ("idle", "loaded"):
        assert list(mx[k]) == SUMMARY and mx[k]["count"] > 0
        assert mx["baseline"][k]["count"] > 0
    assert mx["bulk_mb_s"] > 0 and mx["baseline"]["bulk_mb_s"] > 0
    assert mx["ratio_loaded_idle_p99"] > 0 and mx["baseline"]["ratio_loaded_idle_p99"] > 0
    assert bk["fabric_mb_s"] > 0 and bk["blocks_per_batch"] == 64 and bk["batches"] >= 1
    assert bk["rust_mb_s"] > 0 and bk["ratio_rust"] > 0 and bk["rust_error"] is None


def test_bulk_table_without_rust():
    binary = _binary()
    r = _run(["--workload", "bulk", "--duration", "0.3", "--warmup", "0", "--no-rust",
              "--block-bytes", str(4 << 20), "--sidecar-bin", binary])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "python fabric" in r.stdout and "not run (--no-rust)" in r.stdout
    assert "16 blocks" in r.stdout
