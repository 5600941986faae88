"""The Python example (examples/python/: an orchestrator and three subagents on two sidecars,
with a KV-cache hand-off between memfd regions) runs to its end and says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TIME_SCALE, find_binary

RUN = REPO_ROOT / "examples" / "python" / "run.py"


def test_example_runs_to_result_ok() -> None:
    binary = find_binary()
    if binary is None:
        pytest.fail("no agentfabric binary (cargo build -p agentfabric-cli)", pytrace=False)
    r = subprocess.run([sys.executable, str(RUN), "--sidecar-bin", binary],
                       capture_output=True, text=True, timeout=120 * TIME_SCALE,
                       env=dict(os.environ))
    print(r.stdout[-4000:])
    print(r.stderr[-4000:], file=sys.stderr)
    assert r.returncode == 0, "the example failed (exit %d)" % r.returncode
    assert r.stdout.rstrip().splitlines()[-1] == "result: OK"
