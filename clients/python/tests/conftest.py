"""Fixtures that start real sidecars (``agentfabric sidecar``) for the integration tests.

The binary is ``$AGENTFABRIC_BIN``, else ``target/release/agentfabric`` under the repository
root, else ``target/debug/agentfabric``, else ``agentfabric`` on ``PATH``. Without one the tests
that need it fail with a message saying how to build it, unless ``AGENTFABRIC_ALLOW_SKIP=1``,
which makes them skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, List, Optional, TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
READY_TIMEOUT = 30.0
T = TypeVar("T")


def find_binary() -> Optional[str]:
    """The sidecar binary, by the order in this module's docstring (None: not found)."""
    env = os.environ.get("AGENTFABRIC_BIN")
    if env:
        return env
    for profile in ("release", "debug"):
        p = REPO_ROOT / "target" / profile / "agentfabric"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return shutil.which("agentfabric")


class Sidecar:
    """One running sidecar.

    Attributes:
        node: its node name.
        socket: its Unix socket's path.
        listen: the addresses it listens on for other nodes (ports resolved).
        proc: the process.
        log: the file its stderr goes to.
    """

    def __init__(self, node: str, socket: str, listen: List[str], proc: "subprocess.Popen[bytes]",
                 log: Path) -> None:
        self.node = node
        self.socket = socket
        self.listen = listen
        self.proc = proc
        self.log = log

    @property
    def url(self) -> str:
        """The first listen address (what other nodes open channels to)."""
        return self.listen[0]

    def log_tail(self, lines: int = 40) -> str:
        """The end of its stderr."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __repr__(self) -> str:
        return "<Sidecar %s %s %s>" % (self.node, self.socket, self.listen)


def _read_ready_line(proc: "subprocess.Popen[bytes]", timeout: float) -> Optional[bytes]:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buf += chunk
    finally:
        sel.close()
    return buf.split(b"\n", 1)[0]


def _drain(stream: Any) -> None:
    try:
        while stream.read(65536):
            pass
    except (OSError, ValueError):
        pass


def start_sidecar(binary: str, name: str, workdir: Path, *extra: str,
                  listen: str = "tcp://127.0.0.1:0") -> Sidecar:
    """Start ``agentfabric sidecar --name NAME`` and wait for its ready line."""
    log = workdir / ("%s.log" % name)
    cmd = [binary, "sidecar", "--name", name, "--listen", listen,
           "--socket-dir", str(workdir / name), *extra]
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, env=env)
    line = _read_ready_line(proc, READY_TIMEOUT)
    if line is None:
        proc.kill()
        proc.wait()
        pytest.fail("sidecar %s gave no ready line within %ss (exit %s); %s:\n%s" % (
            name, READY_TIMEOUT, proc.returncode, log,
            log.read_text(errors="replace")[-4000:]))
    try:
        info = json.loads(line)
        sc = Sidecar(str(info["node"]), str(info["socket"]), list(info["listen"]), proc, log)
    except (ValueError, KeyError, TypeError) as e:
        proc.kill()
        proc.wait()
        pytest.fail("sidecar %s's ready line is not the expected JSON (%s): %r" % (name, e, line))
    threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
    return sc


@pytest.fixture(scope="session")
def sidecar_binary() -> str:
    """The sidecar binary (fails, or skips with AGENTFABRIC_ALLOW_SKIP=1, without one)."""
    b = find_binary()
    if b is None:
        msg = ("no agentfabric binary: build it with `cargo build -p agentfabric-cli` (or "
               "--release), or set AGENTFABRIC_BIN; AGENTFABRIC_ALLOW_SKIP=1 skips these tests")
        if os.environ.get("AGENTFABRIC_ALLOW_SKIP") == "1":
            pytest.skip(msg)
        pytest.fail(msg, pytrace=False)
    return b


@pytest.fixture
def sidecars(sidecar_binary: str) -> Iterator[Callable[..., Sidecar]]:
    """A factory: ``sidecars("a", *extra_args)`` starts a sidecar named "a"; every one started
    is killed at the end of the test."""
    workdir = Path(tempfile.mkdtemp(prefix="af-"))  # short: a socket path has 107 bytes
    started: List[Sidecar] = []

    def start(name: str, *extra: str, listen: str = "tcp://127.0.0.1:0") -> Sidecar:
        sc = start_sidecar(sidecar_binary, name, workdir, *extra, listen=listen)
        started.append(sc)
        return sc

    yield start
    for sc in started:
        sc.kill()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def sidecar(sidecars: Callable[..., Sidecar]) -> Sidecar:
    """One sidecar, node "a"."""
    return sidecars("a")


@pytest.fixture
def two_sidecars(sidecars: Callable[..., Sidecar]) -> List[Sidecar]:
    """Two sidecars, nodes "a" and "b"."""
    return [sidecars("a"), sidecars("b")]


@pytest.fixture
def arun() -> Callable[..., Any]:
    """``arun(coro, timeout=60)``: run a coroutine on a fresh event loop, failing the test if it
    takes longer than ``timeout`` seconds."""

    def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(coro, timeout)

        return asyncio.run(bounded())

    return run
