"""The benchmark's processes: the sidecars it starts, and its agents (``_agent``).

Everything here runs in the coordinating process (``python -m agentfabric.bench``). A sidecar
is ``agentfabric sidecar --name NODE --listen URL --socket-dir DIR``, ready once it printed its
one JSON line; an agent is ``python -m agentfabric.bench._agent ROLE PARAMS``, which prints
JSON lines (``{"ready": ...}``, ``{"result": ...}``, ``{"error": ...}``) on standard output and
exits when its standard input closes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

_START = time.monotonic()

# clients/python: the directory holding the `agentfabric` package, put on the agents'
# PYTHONPATH so that they import the same code as this process.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# The repository root (clients/python/agentfabric/bench -> the root), for target/release.
REPO_ROOT = Path(__file__).resolve().parents[4]


def progress(msg: str, who: str = "bench") -> None:
    """A progress line on standard error (standard output holds results only)."""
    t = time.monotonic() - _START
    print(f"[agentfabric.{who} +{t:.2f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A failure that ends the run with its message."""


def find_binary(explicit: Optional[str] = None) -> str:
    """The ``agentfabric`` binary: ``explicit`` (``--sidecar-bin``), else ``$AGENTFABRIC_BIN``,
    else ``target/release/agentfabric`` at the repository root (the package's, else the working
    directory's: an installed package lives outside the checkout), else ``agentfabric`` on
    PATH."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise BenchError(f"--sidecar-bin {explicit}: not an executable file")
        return explicit
    env = os.environ.get("AGENTFABRIC_BIN")
    if env:
        if not os.access(env, os.X_OK):
            raise BenchError(f"AGENTFABRIC_BIN={env}: not an executable file")
        return env
    built = REPO_ROOT / "target" / "release" / "agentfabric"
    for candidate in (built, Path.cwd() / "target" / "release" / "agentfabric"):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("agentfabric")
    if on_path:
        return on_path
    raise BenchError(
        "no agentfabric binary: build it (cargo build --release -p agentfabric-cli, giving "
        f"{built}), or pass --sidecar-bin PATH, or set AGENTFABRIC_BIN, or put agentfabric on PATH"
    )


async def _forward(stream: Optional[asyncio.StreamReader], prefix: str) -> None:
    """Copies every line of ``stream`` to standard error (after a sidecar's ready line)."""
    if stream is None:
        return
    while True:
        line = await stream.readline()
        if not line:
            return
        sys.stderr.write(f"{prefix}{line.decode(errors='replace')}")
        sys.stderr.flush()


async def _stop_process(proc: asyncio.subprocess.Process, grace: float) -> Optional[int]:
    """Waits up to ``grace`` seconds for ``proc`` to exit, then terminates, then kills it."""
    for step in ("wait", "terminate", "kill"):
        if proc.returncode is not None:
            return proc.returncode
        if step == "terminate":
            proc.terminate()
        elif step == "kill":
            proc.kill()
        try:
            return await asyncio.wait_for(proc.wait(), grace)
        except asyncio.TimeoutError:
            continue
    return proc.returncode


class Sidecar:
    """A running ``agentfabric sidecar`` and what its ready line said."""

    def __init__(self, proc: asyncio.subprocess.Process, info: Dict[str, object], name: str):
        self.proc = proc
        self.info = info
        self.name = name
        self.node: str = str(info.get("node", name))
        self.socket: str = str(info["socket"])
        self.listen: List[str] = [str(u) for u in info.get("listen", [])]  # type: ignore[union-attr]
        self._drain: Optional[asyncio.Task] = None

    @classmethod
    async def start(
        cls,
        binary: str,
        name: str,
        listen: str,
        socket_dir: str,
        extra: Sequence[str] = (),
        timeout: float = 20.0,
    ) -> "Sidecar":
        """Starts a sidecar and waits for its ready line."""
        argv = [binary, "sidecar", "--name", name, "--listen", listen, "--socket-dir", socket_dir]
        argv += list(extra)
        progress(f"starting sidecar {name}: {' '.join(argv)}")
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            await _stop_process(proc, 0.5)
            raise BenchError(f"sidecar {name} printed no ready line within {timeout:.0f} s")
        if not line:
            code = await _stop_process(proc, 2.0)
            raise BenchError(f"sidecar {name} exited (status {code}) before it was ready")
        try:
            info = json.loads(line)
            if not isinstance(info, dict) or "socket" not in info:
                raise ValueError("no socket key")
        except ValueError as e:
            await _stop_process(proc, 0.5)
            raise BenchError(f"sidecar {name}'s ready line is not what was expected ({e}): {line!r}")
        s = cls(proc, info, name)
        s._drain = asyncio.ensure_future(_forward(proc.stdout, f"[sidecar {name} stdout] "))
        progress(f"sidecar {name} ready: node {s.node}, socket {s.socket}, listen {s.listen}")
        return s

    def url(self, scheme: str) -> str:
        """The first listen URL of ``scheme`` (``tcp``, ``quic``, ``verbs``)."""
        for u in self.listen:
            if u.startswith(scheme + "://"):
                return u
        raise BenchError(f"sidecar {self.name} listens on {self.listen}, none of them {scheme}://")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
        await _stop_process(self.proc, 5.0)
        if self._drain is not None:
            try:
                await asyncio.wait_for(self._drain, 1.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._drain.cancel()


class Agent:
    """A benchmark agent: ``python -m agentfabric.bench._agent ROLE PARAMS``."""

    def __init__(self, role: str, proc: asyncio.subprocess.Process):
        self.role = role
        self.proc = proc

    @classmethod
    async def start(cls, role: str, params: Dict[str, object]) -> "Agent":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentfabric.bench._agent",
            role,
            json.dumps(params),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=64 << 20,
        )
        return cls(role, proc)

    async def expect(self, key: str, timeout: float) -> object:
        """The value of the next JSON line of standard output that has ``key``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"agent {self.role}: no {key!r} within {timeout:.0f} s")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except asyncio.TimeoutError:
                continue
            if not line:
                code = await _stop_process(self.proc, 2.0)
                raise BenchError(f"agent {self.role} exited (status {code}) before its {key!r}")
            try:
                obj = json.loads(line)
            except ValueError:
                sys.stderr.write(f"[agent {self.role} stdout] {line.decode(errors='replace')}")
                continue
            if isinstance(obj, dict) and "error" in obj:
                raise BenchError(f"agent {self.role}: {obj['error']}")
            if isinstance(obj, dict) and key in obj:
                return obj[key]

    async def stop(self) -> None:
        """Closes the agent's standard input (its signal to exit) and waits for it."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        await _stop_process(self.proc, 5.0)


async def run_command(argv: Sequence[str], timeout: float) -> str:
    """Runs ``argv`` (standard error passed through) and returns its standard output."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        await _stop_process(proc, 0.1)
        raise BenchError(f"{' '.join(argv)} did not finish within {timeout:.0f} s")
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed (status {proc.returncode})")
    return out.decode(errors="replace")
