#!/usr/bin/env python3
"""Runs the example: two sidecars (A and B, tcp on loopback), the subagents retriever and
prefill on B and decode on A, then the orchestrator on A; prints `result: OK` when the
orchestrator's checks passed and every agent exited cleanly.

The `agentfabric` binary: --sidecar-bin PATH, else $AGENTFABRIC_BIN, else target/release/agentfabric
at the repository root, else agentfabric on PATH."""

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def find_binary(explicit):
    given = explicit or os.environ.get("AGENTFABRIC_BIN")
    if given and not os.access(given, os.X_OK):
        sys.exit(f"run.py: {given} is not an executable agentfabric binary")
    for path in (given,
                 REPO / "target" / "release" / "agentfabric", shutil.which("agentfabric")):
        if path and os.access(path, os.X_OK):
            return str(path)
    sys.exit("run.py: no agentfabric binary: cargo build --release -p agentfabric-cli, or pass "
             "--sidecar-bin PATH, or set AGENTFABRIC_BIN")


def first_json_line(proc, what, timeout=30.0):
    """The first line the process prints, as JSON (its ready line)."""
    q = queue.Queue()
    threading.Thread(target=lambda: q.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = q.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"{what} printed nothing within {timeout:.0f} s")
    if not line:
        raise RuntimeError(f"{what} exited (status {proc.wait()}) before it was ready")
    return json.loads(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sidecar-bin", help="the agentfabric binary")
    a = ap.parse_args()
    binary = find_binary(a.sidecar_bin)
    env = dict(os.environ)
    # The client from this checkout, whether or not it is installed.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "clients" / "python"), env.get("PYTHONPATH")) if p)
    tmp = tempfile.mkdtemp(prefix="agentfabric-example-")
    procs, sidecars, agents = [], {}, {}
    ok = False
    try:
        for name in ("a", "b"):
            p = subprocess.Popen(
                [binary, "sidecar", "--name", f"example-{name}", "--listen", "tcp://127.0.0.1:0",
                 "--socket-dir", os.path.join(tmp, name)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            procs.append(p)
            sidecars[name] = first_json_line(p, f"sidecar {name}")
            print(f"sidecar {name}: node {sidecars[name]['node']}, {sidecars[name]['listen'][0]}",
                  flush=True)
        for script, side in (("retriever", "b"), ("prefill", "b"), ("decode", "a")):
            p = subprocess.Popen(
                [sys.executable, str(HERE / f"{script}.py"), "--socket", sidecars[side]["socket"]],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            procs.append(p)
            agents[script] = p
            first_json_line(p, script)
            print(f"{script}: ready on sidecar {side.upper()}", flush=True)
        orch = subprocess.run(
            [sys.executable, str(HERE / "orchestrator.py"), "--socket", sidecars["a"]["socket"],
             "--a-url", sidecars["a"]["listen"][0], "--b-url", sidecars["b"]["listen"][0]],
            stdin=subprocess.DEVNULL, env=env, timeout=120)
        codes = {name: p.wait(timeout=15) for name, p in agents.items()}
        bad = {n: c for n, c in codes.items() if c != 0}
        if bad:
            print(f"subagents exited with {bad}", flush=True)
        ok = orch.returncode == 0 and not bad
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
        print(f"run.py: {e}", file=sys.stderr, flush=True)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print("result: OK" if ok else "result: FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
