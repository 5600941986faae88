"""Fixtures that start real sidecars (``agentfabric sidecar``) for the integration tests.

The binary is ``$AGENTFABRIC_BIN``, else ``target/release/agentfabric`` under the repository
root, else ``target/debug/agentfabric``, else ``agentfabric`` on ``PATH``. Without one the tests
that need it fail with a message saying how to build it, unless ``AGENTFABRIC_ALLOW_SKIP=1``,
which makes them skip.

Environment:

- ``AGENTFABRIC_TEST_TRANSPORT``: what the sidecars listen on for each other. ``tcp`` (the
  default): ``tcp://127.0.0.1:0``. ``verbs`` (the Soft-RoCE lab, ``soft-roce/tests.d``): the
  first sidecar a test starts listens on ``verbs://$AGENTFABRIC_LAB_ADDR_A:0`` (device
  ``$AGENTFABRIC_LAB_DEVICE``, GID index ``$AGENTFABRIC_LAB_GID_INDEX``), the second on
  ``verbs://$AGENTFABRIC_LAB_ADDR_B:0`` (``$AGENTFABRIC_LAB_DEVICE_B`` and
  ``$AGENTFABRIC_LAB_GID_INDEX_B`` when the lab has a second device, else the first's), and so
  on alternately.
- ``AGENTFABRIC_TEST_TIME_SCALE`` (default 1): a factor for the time bounds and latency limits
  of the tests that use :data:`TIME_SCALE` (the lab runs under emulation, many times slower).

Markers: ``slow`` (a test of a minute or so; the default suite runs it), ``uid`` (runs
processes as another user, uid 65534: needs root).

Beside the sidecars: :class:`Agent` processes (``agent_proc.py``: an agent in its own process,
to be stopped, killed or run as another user) and :class:`Bystanders` (two clients exchanging
messages across two sidecars while a test misbehaves elsewhere, checked at the end).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Optional, TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
READY_TIMEOUT = 30.0
T = TypeVar("T")

#: What the sidecars listen on for each other (see the module's docstring).
TRANSPORT = os.environ.get("AGENTFABRIC_TEST_TRANSPORT", "tcp") or "tcp"
#: The factor for time bounds (see the module's docstring).
TIME_SCALE = float(os.environ.get("AGENTFABRIC_TEST_TIME_SCALE", "1") or "1")
#: The user the ``uid`` tests run processes as.
NOBODY = 65534
#: The helper processes' script.
AGENT_PY = Path(__file__).resolve().parent / "agent_proc.py"


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "slow: a long test (a minute or so); still in the "
                            "default suite")
    config.addinivalue_line("markers", "uid: runs processes as uid 65534 (needs root)")


def default_env(index: int) -> Dict[str, str]:
    """Environment settings of the ``index``-th sidecar (from 0) a test starts: under verbs,
    its device and GID index, the lab's second device for every other sidecar."""
    if TRANSPORT != "verbs" or index % 2 == 0:
        return {}
    env = {}
    for var in ("AGENTFABRIC_LAB_DEVICE", "AGENTFABRIC_LAB_GID_INDEX"):
        second = os.environ.get(var + "_B")
        if second:
            env[var] = second
    return env


def default_listen(index: int) -> str:
    """The listen address of the ``index``-th sidecar (from 0) a test starts, as
    ``AGENTFABRIC_TEST_TRANSPORT`` says."""
    if TRANSPORT == "tcp":
        return "tcp://127.0.0.1:0"
    if TRANSPORT == "verbs":
        var = "AGENTFABRIC_LAB_ADDR_A" if index % 2 == 0 else "AGENTFABRIC_LAB_ADDR_B"
        addr = os.environ.get(var)
        if not addr:
            pytest.fail("AGENTFABRIC_TEST_TRANSPORT=verbs needs %s (the Soft-RoCE lab sets it)"
                        % var, pytrace=False)
        return "verbs://%s:0" % addr
    pytest.fail("AGENTFABRIC_TEST_TRANSPORT=%r: tcp or verbs" % TRANSPORT, pytrace=False)
    raise AssertionError  # unreachable


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

    def rss(self) -> int:
        """Its resident set size in bytes (``VmRSS`` of ``/proc/PID/status``)."""
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS for pid %d" % self.proc.pid)

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
                  listen: str = "tcp://127.0.0.1:0", socket_dir: Optional[Path] = None,
                  prefix: Optional[List[str]] = None,
                  env: Optional[Dict[str, str]] = None) -> Sidecar:
    """Start ``agentfabric sidecar --name NAME`` and wait for its ready line (its socket
    directory: ``socket_dir``, default ``workdir/NAME``; ``prefix``: a command it runs under,
    such as ``setpriv``; ``env``: settings added to the environment)."""
    log = workdir / ("%s.log" % name)
    cmd = [*(prefix or []), binary, "sidecar", "--name", name, "--listen", listen,
           "--socket-dir", str(socket_dir or workdir / name), *extra]
    environ = dict(os.environ, **(env or {}))
    environ.setdefault("RUST_LOG", "info")
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, env=environ)
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


def setpriv(uid: int) -> List[str]:
    """The command prefix that runs a program as ``uid`` (its own group, no others)."""
    return ["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups", "--"]


@pytest.fixture(scope="session")
def binary_for_uid(sidecar_binary: str) -> Iterator[Callable[[int], str]]:
    """``binary_for_uid(uid)``: a path of the sidecar binary that ``uid`` can execute: the
    binary itself when it can, else a copy in a temporary directory open to all (removed at
    the end of the session)."""
    copies: Dict[int, str] = {}
    dirs: List[str] = []

    def get(uid: int) -> str:
        if uid in copies:
            return copies[uid]
        ok = subprocess.run([*setpriv(uid), sidecar_binary, "--version"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            timeout=30).returncode == 0
        path = sidecar_binary
        if not ok:  # some directory on the way (or the file) is closed to uid: a copy
            d = tempfile.mkdtemp(prefix="af-bin-")
            dirs.append(d)
            os.chmod(d, 0o755)
            path = os.path.join(d, "agentfabric")
            shutil.copy(sidecar_binary, path)
            os.chmod(path, 0o755)
        copies[uid] = path
        return path

    yield get
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sidecars(sidecar_binary: str,
             request: pytest.FixtureRequest) -> Iterator[Callable[..., Sidecar]]:
    """A factory: ``sidecars("a", *extra_args)`` starts a sidecar named "a"; every one started
    is killed at the end of the test.

    ``listen=`` overrides the address (default: :func:`default_listen`, by the order of
    start). ``user=UID`` runs it as that user (through ``setpriv``; we must be root), with its
    socket directory under a directory that user owns."""
    workdir = Path(tempfile.mkdtemp(prefix="af-"))  # short: a socket path has 107 bytes
    # Other users may pass through (not list): what keeps them from a socket is its own
    # directory (0700), as in a real deployment, and that is what the uid tests check.
    os.chmod(workdir, 0o711)
    started: List[Sidecar] = []

    def start(name: str, *extra: str, listen: Optional[str] = None,
              user: Optional[int] = None) -> Sidecar:
        env = default_env(len(started))
        if listen is None:
            listen = default_listen(len(started))
        if user is None:
            sc = start_sidecar(sidecar_binary, name, workdir, *extra, listen=listen, env=env)
        else:
            home = workdir / ("%s-home" % name)
            home.mkdir(mode=0o755, exist_ok=True)  # exists when a sidecar is restarted
            os.chown(home, user, user)
            binary = request.getfixturevalue("binary_for_uid")(user)
            sc = start_sidecar(binary, name, workdir, *extra, listen=listen,
                               socket_dir=home / name, prefix=setpriv(user), env=env)
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


# --------------------------------------------------------------------------------------------
# Helper processes


class Agent:
    """A helper process (``agent_proc.py ROLE ARGS``): it prints one JSON object per line on
    stdout (``{"event": ..., ...}``), read here by a thread, and takes commands on stdin.

    Attributes:
        role: what it runs.
        proc: the process.
        latest: the latest object of each event name.
    """

    def __init__(self, role: str, proc: Any, log: Path) -> None:
        self.role = role
        self.proc = proc
        self.log = log
        self.latest: Dict[str, Dict[str, Any]] = {}
        self.events: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            self.latest[ev.get("event", "")] = ev
            self.events.put(ev)
        self.events.put(None)

    def stderr_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def expect(self, event: str, timeout: float = 20.0) -> Dict[str, Any]:
        """The next object with ``event`` (earlier others are skipped); fails the test after
        ``timeout`` seconds or if the process ends first."""
        deadline = time.monotonic() + timeout * TIME_SCALE
        while True:
            left = deadline - time.monotonic()
            try:
                ev = self.events.get(timeout=max(0.0, left))
            except queue.Empty:
                pytest.fail("agent %s (pid %d): no %r within %.0fs; stderr:\n%s"
                            % (self.role, self.pid, event, timeout * TIME_SCALE,
                               self.stderr_tail()))
            if ev is None:
                self.events.put(None)
                try:
                    rc = self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    rc = None
                pytest.fail("agent %s (pid %d) ended (exit %s) before %r; stderr:\n%s"
                            % (self.role, self.pid, rc, event, self.stderr_tail()))
            if ev.get("event") == event:
                return ev
            if ev.get("event") == "error":
                pytest.fail("agent %s (pid %d) failed: %s; stderr:\n%s"
                            % (self.role, self.pid, ev.get("error"), self.stderr_tail()))

    def output_ended(self, timeout: float = 20.0) -> None:
        """Wait until its stdout has ended (it exited, or was killed) and all of it is read."""
        self._reader.join(timeout * TIME_SCALE)
        assert not self._reader.is_alive(), "agent %s: stdout still open" % self.role

    def command(self, line: str) -> None:
        """A line on its stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout * TIME_SCALE)

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, for a stopped one) and reap."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


class _Forked:
    """An agent forked from this process that then becomes ``uid`` (no ``exec``: the
    interpreter may live where that user cannot read, as under /root); the little of
    :class:`subprocess.Popen` that :class:`Agent` uses. Fork only outside a running event
    loop."""

    def __init__(self, role: str, args: Dict[str, Any], uid: int, log: Path) -> None:
        import agent_proc  # beside this file

        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.dup2(in_r, 0)
                os.dup2(out_w, 1)
                os.dup2(err, 2)
                os.closerange(3, 65536)
                sys.stdin = open(0, "r", closefd=False)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                os.chdir("/")
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                code = agent_proc.run(role, args)
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(in_r)
        os.close(out_w)
        os.close(err)
        self.pid = pid
        self.returncode: Optional[int] = None
        self.stdin = os.fdopen(in_w, "wb")
        self.stdout = os.fdopen(out_r, "rb")

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def agents() -> Iterator[Callable[..., Agent]]:
    """A factory: ``agents(role, user=None, **args)`` starts ``agent_proc.py role`` (as
    ``user``, a uid, if given) with ``args`` as JSON; every one is killed at the end of the
    test."""
    logdir = Path(tempfile.mkdtemp(prefix="af-agents-"))
    started: List[Agent] = []

    def start(role: str, user: Optional[int] = None, **args: Any) -> Agent:
        log = logdir / ("%d-%s.err" % (len(started), role))
        proc: Any
        if user is None:
            env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
            with open(log, "wb") as err:
                proc = subprocess.Popen([sys.executable, str(AGENT_PY), role, json.dumps(args)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=err, env=env)
        else:
            proc = _Forked(role, args, user, log)
        a = Agent(role, proc, log)
        started.append(a)
        return a

    yield start
    for a in started:
        a.kill()
    shutil.rmtree(logdir, ignore_errors=True)


class Bystanders:
    """Two clients (an agent process) exchanging numbered messages on their own channel
    across two sidecars, both ways, the whole time a test misbehaves elsewhere.

    :meth:`progress` gives how many each has received so far; :meth:`finish` stops them and
    checks that every message arrived, once, in order.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.ready = agent.expect("ready", 30)

    def progress(self) -> int:
        """Messages received so far by the side that receives the fewest."""
        ev = self.agent.latest.get("progress") or {}
        return min(int(ev.get("received", 0)), int(ev.get("acked", 0)))

    def advancing(self, seconds: float = 2.0, at_least: int = 5) -> None:
        """Assert that at least ``at_least`` more messages got through within ``seconds``."""
        start = self.progress()
        deadline = time.monotonic() + seconds * TIME_SCALE
        while time.monotonic() < deadline:
            if self.progress() - start >= at_least:
                return
            time.sleep(0.05)
        pytest.fail("the bystanders stalled: %d messages in %.1fs (at %d); stderr:\n%s"
                    % (self.progress() - start, seconds * TIME_SCALE, self.progress(),
                       self.agent.stderr_tail()))

    def finish(self, timeout: float = 30.0) -> Dict[str, Any]:
        """Stop them; assert every message arrived once and in order both ways; the result."""
        self.agent.command("stop")
        r = self.agent.expect("result", timeout)
        print("bystanders: %s" % json.dumps(r))
        assert not r["errors"], "bystanders: %s" % r["errors"]
        assert r["sent"] == r["received"] == r["acked"] > 0, r
        assert self.agent.wait() == 0
        return r


@pytest.fixture
def bystanders(agents: Callable[..., Agent]) -> Callable[..., Bystanders]:
    """``bystanders(sa, sb, user=None, name="bys")``: :class:`Bystanders` from ``sa`` to
    ``sb`` (clients ``NAME-src`` on ``sa`` and ``NAME-dst`` on ``sb``)."""

    def start(sa: Sidecar, sb: Sidecar, user: Optional[int] = None,
              name: str = "bys", interval: float = 0.005) -> Bystanders:
        return Bystanders(agents("bystander", user=user, sock_a=sa.socket, sock_b=sb.socket,
                                 url_b=sb.url, name=name, interval=interval))

    return start
