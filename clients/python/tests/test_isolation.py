"""One client's bad behaviour is that client's problem: another user knocking, garbage on the
socket, a reader that stops reading, a client killed mid-transfer, a client stopped for 30 s.
Each gets an error and a disconnect (or, for a reader that does not read, backpressure on what
is sent to it), and the sidecars and every other client carry on with nothing lost: in each
test a pair of bystanders (conftest.py's ``Bystanders``) exchanges numbered messages across the
same two sidecars the whole time, and checks at the end that every one arrived, in order.

Raw-socket clients speak the protocol with ``agentfabric._wire``; processes that must be
stopped, killed or run as another user are ``agent_proc.py`` agents.
"""

from __future__ import annotations

import array
import asyncio
import os
import random
import signal
import socket
import stat
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import pytest

import agentfabric as af
from agentfabric import _wire as w
from conftest import NOBODY, TIME_SCALE

if TYPE_CHECKING:
    from conftest import Agent, Bystanders, Sidecar

KIB = 1 << 10
MIB = 1 << 20

MALFORMED, TOO_LARGE, UNSUPPORTED_VERSION, PERMISSION_DENIED = 1, 2, 3, 4
INVALID_ARGUMENT = 6


# --------------------------------------------------------------------------------------------
# A client on a raw socket


def raw_connect(path: str, timeout: float = 10.0) -> socket.socket:
    """A blocking Unix socket connected to ``path``; every call on it times out."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout * TIME_SCALE)
    s.connect(path)
    return s


def recv_exact(s: socket.socket, n: int) -> Optional[bytes]:
    """``n`` bytes, or None at the end of the stream (its end or a reset) before them."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = s.recv(min(n - len(buf), 1 << 20))
        except ConnectionResetError:  # the sidecar closed with our bytes unread: also the end
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(s: socket.socket) -> Optional[Tuple[int, Any]]:
    """The next frame from the sidecar as ``(id, message)``; None at the end of the stream."""
    head = recv_exact(s, w.HEADER_LEN)
    if head is None:
        return None
    total, kind, _flags, op = w.parse_header(head, w.DEFAULT_MAX_FRAME)
    body = recv_exact(s, total - w.HEADER_LEN)
    assert body is not None, "the stream ended inside a frame"
    return op, w.decode_to_client(kind, op, body)


def frames_to_the_end(s: socket.socket) -> List[Tuple[int, Any]]:
    """Every frame until the sidecar ends the stream (a read that times out fails the test)."""
    frames: List[Tuple[int, Any]] = []
    while True:
        f = read_frame(s)
        if f is None:
            return frames
        frames.append(f)


def raw_hello(s: socket.socket, endpoint: str) -> w.HelloOk:
    s.sendall(w.encode(0, w.Hello(1, 1, endpoint)))
    f = read_frame(s)
    assert f is not None and isinstance(f[1], w.HelloOk), f
    return f[1]


def send_regardless(s: socket.socket, data: bytes, fds: Optional[List[int]] = None) -> None:
    """Send ``data`` (with ``fds``); the sidecar may close before taking it all."""
    try:
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = s.sendmsg([data], anc)
            s.sendall(data[sent:])
        else:
            s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def assert_fatal(frames: List[Tuple[int, Any]], codes: Tuple[int, ...], what: str,
                 replies: bool = False) -> w.Error:
    """``frames`` are exactly one fatal ``ERROR`` (id 0) with one of ``codes`` (after the
    replies to valid operations, if ``replies``)."""
    if replies:
        assert frames and all(op != 0 or isinstance(m, w.HelloOk) for op, m in frames[:-1]), (
            "%s: replies then one fatal ERROR expected, got %r" % (what, frames))
        frames = frames[-1:]
    assert len(frames) == 1, "%s: expected one fatal ERROR then the end, got %r" % (what, frames)
    op, msg = frames[0]
    assert op == 0 and isinstance(msg, w.Error), "%s: %r" % (what, frames)
    assert msg.code in codes, "%s: error code %d (%s), expected one of %s" % (
        what, msg.code, msg.message, codes)
    return msg


def frame(kind: int, op: int, body: bytes = b"", flags: int = 0,
          length: Optional[int] = None) -> bytes:
    """A frame as given, right or wrong (``length``: the header's ``len``, default right)."""
    return w.HEADER.pack(12 + len(body) if length is None else length, kind, flags, op) + body


async def connect_when_free(sock: str, endpoint: str, within: float = 5.0) -> af.Client:
    """Connect as ``endpoint`` once its previous holder is gone (at most ``within`` s)."""
    deadline = time.monotonic() + within * TIME_SCALE
    while True:
        try:
            return await af.connect(sock, endpoint=endpoint)
        except af.EndpointTaken:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def in_thread(f: Callable[..., Any], *args: Any) -> Any:
    """``f(*args)`` in a thread (blocking checks from inside a test's event loop)."""
    return await asyncio.get_running_loop().run_in_executor(None, f, *args)


def check_private(sc: Sidecar, uid: int) -> None:
    """The socket's directory is ``uid``'s, mode 0700; the socket is ``uid``'s, mode 0600."""
    d = os.stat(os.path.dirname(sc.socket))
    assert (d.st_uid, stat.S_IMODE(d.st_mode)) == (uid, 0o700), (
        "socket directory: uid %d mode %o" % (d.st_uid, stat.S_IMODE(d.st_mode)))
    st = os.stat(sc.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o600), (
        "socket: uid %d mode %o" % (st.st_uid, stat.S_IMODE(st.st_mode)))


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("runs processes as uid %d: needs root" % NOBODY)


# --------------------------------------------------------------------------------------------
# Another uid


@pytest.mark.uid
def test_other_uid_cannot_reach_a_root_sidecar(sidecars: Callable[..., Sidecar],
                                               bystanders: Callable[..., Bystanders],
                                               agents: Callable[..., Agent],
                                               arun: Callable[..., Any]) -> None:
    """Sidecars run by root; a process of uid nobody cannot even reach the socket: its
    directory (0700) stops it, the directories above do not."""
    need_root()
    sa, sb = sidecars("a"), sidecars("b")
    for sc in (sa, sb):
        check_private(sc, 0)
    bys = bystanders(sa, sb)
    for sc in (sa, sb):
        intruder = agents("connect", user=NOBODY, sock=sc.socket, endpoint="intruder")
        probe = intruder.expect("probe")
        assert probe["stat_parent"] == "ok", probe  # the way to the directory is open
        assert probe["list_dir"] == "PermissionError", probe
        assert probe["stat_socket"] == "PermissionError", probe
        r = intruder.expect("result")
        assert r["uid"] == NOBODY and not r["ok"], r
        assert r["error"] == "ConnectFailed" and r["cause"] == "PermissionError", r
        assert intruder.wait() == 0
    bys.advancing()

    async def main() -> None:  # root still gets in, under the intruder's name too
        c = await af.connect(sa.socket, endpoint="intruder")
        assert c.uid == 0
        await c.ping()
        await c.close()

    arun(main(), 30 * TIME_SCALE)
    bys.finish()


@pytest.mark.uid
def test_peer_credentials_refuse_a_uid_not_allowed(sidecars: Callable[..., Sidecar],
                                                    bystanders: Callable[..., Bystanders],
                                                    agents: Callable[..., Agent],
                                                    arun: Callable[..., Any]) -> None:
    """Sidecars run by nobody; root passes every file permission, so only SO_PEERCRED stands
    between it and the sidecar: uid 0 is refused (PERMISSION_DENIED, fatal) by the sidecar
    with the default allowed uids, and let in by the one started with --allow-uid 0."""
    need_root()
    sa = sidecars("a", user=NOBODY)
    sb = sidecars("b", "--allow-uid", "0", user=NOBODY)
    for sc in (sa, sb):
        check_private(sc, NOBODY)
    bys = bystanders(sa, sb, user=NOBODY)
    echo = agents("echo", user=NOBODY, sock=sa.socket, endpoint="nobodys")
    echo.expect("ready")

    # The sidecar refuses at once, before HELLO: one fatal ERROR, then the end.
    for _ in range(3):
        s = raw_connect(sa.socket)
        err = assert_fatal(frames_to_the_end(s), (PERMISSION_DENIED,), "root at a")
        assert "uid 0" in err.message, err
        s.close()
    # Even with a HELLO sent first.
    s = raw_connect(sa.socket)
    send_regardless(s, w.encode(0, w.Hello(1, 1, "root")))
    assert_fatal(frames_to_the_end(s), (PERMISSION_DENIED,), "root at a, with HELLO")
    s.close()
    bys.advancing()

    async def main() -> None:
        # The client: refused (see test_client_reports_permission_denied for how).
        with pytest.raises((af.PermissionDenied, af.ConnectionLost)):
            await af.connect(sa.socket, endpoint="root")
        # The sidecar that allows uid 0 lets root in, and root talks to nobody's client.
        c = await af.connect(sb.socket, endpoint="root")
        assert c.uid == 0 and c.pid == os.getpid()
        ch = await c.open(sa.url, "nobodys")
        await ch.send(b"hello from root")
        assert (await asyncio.wait_for(ch.recv(), 10 * TIME_SCALE)).body == b"re:hello from root"
        await ch.close()
        await c.close()

    arun(main(), 30 * TIME_SCALE)
    bys.advancing()
    bys.finish()

    # And the refusing sidecar, started again with --allow-uid 0 on the same socket, lets
    # root in.
    sa.kill()
    sa2 = sidecars("a", "--allow-uid", "0", user=NOBODY)
    assert sa2.socket == sa.socket
    check_private(sa2, NOBODY)

    async def again() -> None:
        c = await af.connect(sa2.socket, endpoint="root")
        assert c.uid == 0
        await c.ping()
        await c.close()

    arun(again(), 30 * TIME_SCALE)


@pytest.mark.uid
def test_client_reports_permission_denied(sidecars: Callable[..., Sidecar],
                                          arun: Callable[..., Any]) -> None:
    """A client of a uid the sidecar does not allow must learn why: PermissionDenied. The
    client is made to pause 50 ms between connecting and its HELLO, as a busy machine may
    make it; the sidecar has refused it by then."""
    need_root()
    sa = sidecars("a", user=NOBODY)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        connect = loop.sock_connect

        async def slow_connect(sock: socket.socket, address: Any) -> None:
            await connect(sock, address)
            await asyncio.sleep(0.05)

        loop.sock_connect = slow_connect  # type: ignore[method-assign]
        outcomes = []
        for i in range(5):
            try:
                c = await af.connect(sa.socket, endpoint="root%d" % i)
                await c.close()
                outcomes.append("connected")
            except af.FabricError as e:
                outcomes.append("%s: %s" % (type(e).__name__, e))
        print("\n".join(outcomes))
        wrong = [o for o in outcomes if not o.startswith("PermissionDenied")]
        assert not wrong, "%d of 5 connects did not raise PermissionDenied: %s" % (
            len(wrong), wrong[0])

    arun(main(), 60 * TIME_SCALE)


# --------------------------------------------------------------------------------------------
# Garbage


def _random(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _random_frames(seed: int, n: int) -> bytes:
    """``n`` frames of client kinds (flags 0, so that the sidecar reads each body), random
    ids and random bodies, then one of an unknown kind: whatever the random ones do (most are
    malformed; one may be a valid operation, answered), the connection ends there."""
    r = random.Random(seed)
    out = b"".join(frame(r.randint(w.HELLO, w.FLUSH), r.choice([0, r.getrandbits(64)]),
                         r.randbytes(r.choice([0, 1, 4, 9, r.randrange(300)])))
                   for _ in range(n))
    return out + frame(0x7777, 1)


def const(data: bytes) -> Callable[[Any], bytes]:
    return lambda hello: data


class Garbage:
    """One bad connection: ``hello`` first or not, then ``data`` (with ``fds``); the sidecar
    must answer one fatal ERROR with one of ``codes`` and end the connection."""

    def __init__(self, hello: bool, data: Callable[[w.HelloOk], bytes], codes: Tuple[int, ...],
                 fds: int = 0, replies: bool = False) -> None:
        self.hello, self.data, self.codes, self.fds = hello, data, codes, fds
        self.replies = replies  # valid operations among the garbage may be answered first


ANY_BAD = (MALFORMED, TOO_LARGE)
GARBAGE: Dict[str, List[Garbage]] = {
    # Random bytes, 64 KiB + 16: whatever the first header says, the frame is complete or
    # longer than the pre-HELLO limit.
    "random": [Garbage(False, const(_random(k, 64 * KIB + 16)), ANY_BAD) for k in range(8)],
    "random-frames": [Garbage(False, const(_random_frames(k, 1)), ANY_BAD, replies=True)
                      for k in range(8)],
    "hello-then-random": [Garbage(True, const(_random(100 + k, 4096)), ANY_BAD)
                          for k in range(4)],
    "hello-then-random-frames": [Garbage(True, const(_random_frames(200 + k, 30)), ANY_BAD,
                                         replies=True) for k in range(16)],
    # A header only, announcing one byte more than the limit: before HELLO 65,536 bytes...
    "too-large-before-hello": [Garbage(False, lambda h: frame(w.HELLO, 0, length=65536 - 3),
                                       (TOO_LARGE,))],
    # ... after it, HELLO_OK's max_frame.
    "too-large-after-hello": [Garbage(True, lambda h: frame(w.SEND, 1, length=h.max_frame - 3),
                                      (TOO_LARGE,))],
    "huge-length": [Garbage(True, lambda h: frame(w.SEND, 1, length=0xFFFFFFFF),
                            (TOO_LARGE,))],
    "length-below-12": [Garbage(False, lambda h: frame(w.HELLO, 0, length=5) + bytes(16),
                                (MALFORMED,))],
    "first-frame-not-hello": [Garbage(False, lambda h: frame(w.PING, 1), (MALFORMED,))],
    "unsupported-version": [Garbage(False, lambda h: w.encode(0, w.Hello(2, 9, "future")),
                                    (UNSUPPORTED_VERSION,))],
    "bad-endpoint-name": [Garbage(False, lambda h: frame(w.HELLO, 0, b"\x01\x00\x01\x00"
                                                         + b"\x09\x00bad name!"),
                                  (INVALID_ARGUMENT,))],
    "second-hello": [Garbage(True, lambda h: w.encode(0, w.Hello(1, 1, "again")),
                             (MALFORMED,))],
    "id-zero": [Garbage(True, lambda h: frame(w.PING, 0), (MALFORMED,))],
    "nonzero-flags": [Garbage(True, lambda h: frame(w.PING, 1, flags=1), (MALFORMED,))],
    "unknown-kind": [Garbage(True, lambda h: frame(0x7777, 1), (MALFORMED,))],
    "sidecar-kind": [Garbage(True, lambda h: frame(w.DONE, 1), (MALFORMED,))],
    "trailing-byte": [Garbage(True, lambda h: frame(w.PING, 1, b"x"), (MALFORMED,))],
    "short-body": [Garbage(True, lambda h: frame(w.CLOSE, 1, b"\x01\x00"), (MALFORMED,))],
    "not-utf8": [Garbage(True, lambda h: frame(w.SERVE, 1, b"\x02\x00\xff\xfe"), (MALFORMED,))],
    # Descriptors no frame takes (REGION_ADD takes one): more than the sidecar holds.
    "stray-fds": [Garbage(True, lambda h: frame(w.PING, 1), (MALFORMED,), fds=5)],
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_gets_an_error_and_a_disconnect(case: str, sidecars: Callable[..., Sidecar],
                                               bystanders: Callable[..., Bystanders],
                                               arun: Callable[..., Any]) -> None:
    sa, sb = sidecars("a"), sidecars("b")
    bys = bystanders(sa, sb)
    names = []
    for i, g in enumerate(GARBAGE[case]):
        s = raw_connect(sa.socket)
        hello = raw_hello(s, "garbage%d" % i) if g.hello else None
        if hello is not None:
            names.append("garbage%d" % i)
        fds = [os.memfd_create("stray") for _ in range(g.fds)]
        try:
            send_regardless(s, g.data(hello), fds)  # type: ignore[arg-type]
        finally:
            for fd in fds:
                os.close(fd)
        frames = frames_to_the_end(s)
        err = assert_fatal(frames, g.codes, "%s #%d" % (case, i), g.replies)
        if len(frames) > 1:
            print("%s #%d: answered first: %s" % (case, i, [m for _op, m in frames[:-1]]))
        print("%s #%d: %s %s" % (case, i, err.code, err.message))
        s.close()
    bys.advancing()
    assert sa.proc.poll() is None and sb.proc.poll() is None

    async def main() -> None:
        # The sidecar serves on, and the names the bad clients held are free.
        for name in names + ["fresh"]:
            c = await connect_when_free(sa.socket, name)
            await c.ping()
            await c.close()

    arun(main(), 30 * TIME_SCALE)
    bys.finish()


# --------------------------------------------------------------------------------------------
# A reader that stops reading


def test_stalled_reader_holds_back_only_its_sender(sidecars: Callable[..., Sidecar],
                                                  bystanders: Callable[..., Bystanders],
                                                  arun: Callable[..., Any]) -> None:
    """A raw client says HELLO and then reads nothing while a client on the other sidecar
    sends it 64 KiB messages flat out: the sender's sends stop completing (its window fills:
    backpressure, no error, no disconnect); the bystanders go on. Then the reader reads: every
    message arrives, in order, and the sender finishes."""
    sa, sb = sidecars("a"), sidecars("b")
    bys = bystanders(sa, sb)
    raw = raw_connect(sb.socket, timeout=30)
    raw_hello(raw, "stalled")
    size = 64 * KIB
    filler = bytes(size - 8)

    def drain() -> Tuple[int, int, List[str]]:
        """Reads to the sender's last message: (messages, bytes, problems)."""
        n = nbytes = 0
        problems: List[str] = []
        channel = None
        while True:
            f = read_frame(raw)
            if f is None:
                problems.append("the stream ended after %d messages" % n)
                return n, nbytes, problems
            _op, msg = f
            if isinstance(msg, w.Incoming):
                channel = msg.channel
                continue
            if not isinstance(msg, w.Message):
                problems.append("unexpected %r" % (msg,))
                continue
            if msg.channel != channel:
                problems.append("a message on channel %d" % msg.channel)
            if msg.body == b"last":
                return n, nbytes, problems
            seq = int.from_bytes(msg.body[:8], "little")
            if seq != n and len(problems) < 10:
                problems.append("message #%d where #%d was due" % (seq, n))
            n += 1
            nbytes += len(msg.body)

    async def main() -> None:
        c = await af.connect(sa.socket, endpoint="eager")
        ch = await c.open(sb.url, "stalled", label="into the void")
        state: Dict[str, Any] = {"sent": 0, "at": time.monotonic()}
        stop = asyncio.Event()

        async def send() -> None:
            while not stop.is_set():
                await ch.send(state["sent"].to_bytes(8, "little") + filler)
                state["sent"] += 1
                state["at"] = time.monotonic()
            await ch.send(b"last")
            await ch.flush()

        sender = asyncio.ensure_future(send())
        # Backpressure: no send completes for 2 s (within 30 s).
        t0 = time.monotonic()
        while time.monotonic() - state["at"] < 2.0 * TIME_SCALE:
            assert time.monotonic() - t0 < 30 * TIME_SCALE, (
                "the sender never stopped: %d sends" % state["sent"])
            assert not sender.done(), sender
            await asyncio.sleep(0.1)
        held = state["sent"]
        print("the sender stopped after %d messages (%.1f MiB) in %.1fs"
              % (held, held * size / MIB, state["at"] - t0))
        # What the sidecars hold for the stalled reader is bounded: its queue (64 MiB by
        # default), the sockets' buffers, the fabric's channel window, the send window.
        assert held * size < 160 * MIB, "%d MiB taken for a reader that reads nothing" % (
            held * size // MIB)
        assert not ch.closed and not c.closed
        await in_thread(bys.advancing)  # while the sender is held back
        # Other clients of both sidecars are served meanwhile, over the same session.
        other = await af.connect(sa.socket, endpoint="other")
        peer_side = await af.connect(sb.socket, endpoint="other-peer")
        och = await other.open(sb.url, "other-peer")
        pch = await peer_side.accept()
        await och.send(b"still here")
        assert (await asyncio.wait_for(pch.recv(), 5 * TIME_SCALE)).body == b"still here"
        await other.close()
        await peer_side.close()
        assert state["sent"] == held, "sends completed while nothing was read"

        stop.set()
        n, nbytes, problems = await in_thread(drain)
        await asyncio.wait_for(sender, 30 * TIME_SCALE)
        print("the reader got %d messages (%.1f MiB)" % (n, nbytes / MIB))
        assert not problems, problems
        assert n == state["sent"] and nbytes == n * size
        await c.close()

    arun(main(), 120 * TIME_SCALE)
    raw.close()
    bys.finish()


#: The queue the memory test gives the slow reader's sidecar: the default.
RSS_QUEUE_BYTES = 64 * MIB
RSS_MARGIN = 64 * MIB
RSS_SECONDS = 60
RSS_WARMUP = 5
#: The slow reader takes one message every 100 ms: 640 KiB/s pass through the full queue,
#: which the sender keeps full.
RSS_READ_INTERVAL = 0.1


@pytest.mark.slow
def test_slow_reader_sidecar_memory_stays_flat(sidecars: Callable[..., Sidecar],
                                               bystanders: Callable[..., Bystanders],
                                               agents: Callable[..., Agent]) -> None:
    """60 s of a sender offering 64 KiB messages flat out to a reader that takes one every
    100 ms: both sidecars' RSS (VmRSS), sampled every second, stays within 64 MiB of what it
    was after the warm-up (the first 5 s, in which the reader's 64 MiB queue fills), and
    within the queue plus 64 MiB of what it was before the flood. Every message the reader
    takes is the next one. The bystanders go on throughout."""
    queue = str(RSS_QUEUE_BYTES)
    sa = sidecars("a", "--client-queue-bytes", queue)
    sb = sidecars("b", "--client-queue-bytes", queue)
    bys = bystanders(sa, sb)
    raw = raw_connect(sb.socket, timeout=30)
    raw_hello(raw, "slowpoke")
    size = 64 * KIB
    flood = agents("flood", sock=sa.socket, endpoint="firehose", url=sb.url, to="slowpoke",
                   size=size, wait=True)
    flood.expect("ready")
    f = read_frame(raw)  # the incoming channel first
    assert f is not None and isinstance(f[1], w.Incoming), f
    time.sleep(1.0)
    idle = (sa.rss(), sb.rss())
    flood.command("go")

    samples: List[Tuple[float, int, int, int, int]] = []  # t, rss a, rss b, sent, read
    read = 0
    t0 = time.monotonic()
    next_read = next_sample = t0
    while True:
        now = time.monotonic()
        if now - t0 > RSS_SECONDS:
            break
        if now >= next_read:
            f = read_frame(raw)
            assert f is not None, "the reader's connection ended"
            assert isinstance(f[1], w.Message), f
            seq = int.from_bytes(f[1].body[:8], "little")
            assert seq == read and len(f[1].body) == size, (seq, read, len(f[1].body))
            read += 1
            next_read += RSS_READ_INTERVAL
        if now >= next_sample:
            sent = int((flood.latest.get("progress") or {}).get("sent", 0))
            samples.append((now - t0, sa.rss(), sb.rss(), sent, read))
            next_sample += 1.0
        time.sleep(max(0.0, min(next_read, next_sample) - time.monotonic()))

    print("idle RSS: a %.1f MiB, b %.1f MiB" % (idle[0] / MIB, idle[1] / MIB))
    print("   t   rss a MiB  rss b MiB   sent   read")
    for t, ra, rb, sent, rd in samples:
        print("%4.0f  %9.1f  %9.1f  %5d  %5d" % (t, ra / MIB, rb / MIB, sent, rd))
    warm = [s for s in samples if s[0] >= RSS_WARMUP]
    base_a, base_b = warm[0][1], warm[0][2]
    max_a, max_b = max(s[1] for s in samples), max(s[2] for s in samples)
    print("after the warm-up (%ds): a %.1f -> max %.1f MiB (+%.1f), b %.1f -> max %.1f MiB "
          "(+%.1f)" % (RSS_WARMUP, base_a / MIB, max_a / MIB, (max_a - base_a) / MIB,
                       base_b / MIB, max_b / MIB, (max_b - base_b) / MIB))
    print("over idle: a +%.1f MiB, b +%.1f MiB" % ((max_a - idle[0]) / MIB,
                                                  (max_b - idle[1]) / MIB))
    # The sender offered far more than the reader takes: in its busiest second, 10 times
    # what the reader takes in a second, at least.
    burst = max(b[3] - a[3] for a, b in zip(samples, samples[1:]))
    per_second = 1.0 / RSS_READ_INTERVAL
    print("sent: %d, read: %d; busiest second: %d sent; the reader: %.0f a second"
          % (samples[-1][3], read, burst, per_second))
    assert burst >= 10 * per_second, "the sender is too slow to flood anything"
    assert read >= 0.8 * RSS_SECONDS * per_second  # the reader kept its pace
    # After the warm-up the sender goes at the reader's pace: the queue turns over (the
    # sidecars' memory is exercised, not idle), and no faster than it is read.
    sent_late, read_late = warm[-1][3] - warm[0][3], warm[-1][4] - warm[0][4]
    assert 0 < sent_late <= read_late + RSS_QUEUE_BYTES // size, (sent_late, read_late)
    assert max_a - base_a <= RSS_MARGIN, "sidecar a grew %.1f MiB" % ((max_a - base_a) / MIB)
    assert max_b - base_b <= RSS_MARGIN, "sidecar b grew %.1f MiB" % ((max_b - base_b) / MIB)
    for name, m, i in (("a", max_a, idle[0]), ("b", max_b, idle[1])):
        assert m - i <= RSS_QUEUE_BYTES + RSS_MARGIN, "sidecar %s: %.1f MiB over idle" % (
            name, (m - i) / MIB)
    assert sa.proc.poll() is None and sb.proc.poll() is None
    flood.kill()
    raw.close()
    bys.finish()


def test_slow_reader_lets_its_sender_resume(sidecars: Callable[..., Sidecar],
                                            agents: Callable[..., Agent]) -> None:
    """The sender to a reader that stalled then reads again resumes before the reader has
    emptied its whole queue: after the reader took half of what its sidecar had queued, the
    sender has sent more."""
    queue = 8 * MIB
    size = 64 * KIB
    sa = sidecars("a", "--client-queue-bytes", str(queue))
    sb = sidecars("b", "--client-queue-bytes", str(queue))
    raw = raw_connect(sb.socket, timeout=30)
    raw_hello(raw, "slowpoke")
    flood = agents("flood", sock=sa.socket, endpoint="firehose", url=sb.url, to="slowpoke",
                   size=size)
    f = read_frame(raw)
    assert f is not None and isinstance(f[1], w.Incoming), f

    def sent() -> int:
        return int((flood.latest.get("progress") or {}).get("sent", 0))

    # Stalled until the sender stops.
    last, since = -1, time.monotonic()
    while time.monotonic() - since < 2.0 * TIME_SCALE:
        if sent() != last:
            last, since = sent(), time.monotonic()
        time.sleep(0.1)
    held = last
    # Then half the queue read, slowly, and a second more.
    for i in range(queue // size // 2):
        f = read_frame(raw)
        assert f is not None and isinstance(f[1], w.Message)
        assert f[1].body[:8] == i.to_bytes(8, "little")
        time.sleep(0.005)
    time.sleep(1.0 * TIME_SCALE)
    print("held at %d messages; after %d read: %d sent" % (held, queue // size // 2, sent()))
    assert sent() > held, "the sender is still held after half the queue was read"
    flood.kill()
    raw.close()


# --------------------------------------------------------------------------------------------
# A client killed mid-way


#: The killed writer's region: 256 MiB, or AGENTFABRIC_TEST_REGION_MIB (as test_large_region).
REGION = int(os.environ.get("AGENTFABRIC_TEST_REGION_MIB", "256")) * MIB


@pytest.mark.parametrize("doing", ["region-writes", "sends"])
def test_killed_client(doing: str, sidecars: Callable[..., Sidecar],
                       bystanders: Callable[..., Bystanders], agents: Callable[..., Agent],
                       arun: Callable[..., Any]) -> None:
    """A client process writing 256 MiB regions (REGION) back to back into a peer's region (or
    sending messages flat out) is SIGKILLed mid-way: the peer's channel ends with an error or
    a close (no hang), the peer's region is its own again, the killed client's endpoint name
    is free within a few seconds, and the bystanders carry on."""
    sa, sb = sidecars("a"), sidecars("b")
    bys = bystanders(sa, sb)

    async def main() -> None:
        owner = await af.connect(sb.socket, endpoint="owner")
        if doing == "region-writes":
            victim = agents("writer", sock=sa.socket, endpoint="victim", url=sb.url,
                            to="owner", size=REGION, repeat=1000)
            dst = await owner.region(REGION)
            ch = await asyncio.wait_for(owner.accept(), 30 * TIME_SCALE)
            await ch.send(dst.descriptor)
            for n in (1, 2):  # two whole writes, notified
                await in_thread(victim.expect, "written")
                note = await asyncio.wait_for(dst.notification(), 10 * TIME_SCALE)
                assert note.tag == n
            await in_thread(victim.expect, "writing")
            await asyncio.sleep(0.05)
            victim.signal(signal.SIGKILL)
            await in_thread(victim.output_ended)
            writing = victim.latest["writing"]["n"]
            written = victim.latest["written"]["n"]
            print("killed during write %d (%d written)" % (writing, written))
            assert writing == written + 1, "not killed mid-write: %r" % victim.latest
        else:
            victim = agents("flood", sock=sa.socket, endpoint="victim", url=sb.url, to="owner",
                            size=64 * KIB)
            ch = await asyncio.wait_for(owner.accept(), 30 * TIME_SCALE)
            for i in range(200):
                m = await asyncio.wait_for(ch.recv(), 10 * TIME_SCALE)
                assert m.body[:8] == i.to_bytes(8, "little")
            victim.signal(signal.SIGKILL)
            # What was sent before the end arrives, in order; then the end.
            n = 200
            try:
                while True:
                    m = await asyncio.wait_for(ch.recv(), 10 * TIME_SCALE)
                    assert m.body[:8] == n.to_bytes(8, "little"), "message %d out of order" % n
                    n += 1
            except af.FabricError as e:
                print("got %d messages, then %s: %s" % (n, type(e).__name__, e))
        await in_thread(victim.wait)
        # The channel ends (an error or a close), promptly.
        with pytest.raises(af.FabricError):
            while True:
                await asyncio.wait_for(ch.recv(), 10 * TIME_SCALE)
        if doing == "region-writes":
            # The region is the owner's to use and drop; whatever landed is there.
            assert dst.buf is not None and bytes(dst.buf[:8]) == (0).to_bytes(8, "little")
            block = REGION // 4096 - 1  # the last one
            assert bytes(dst.buf[block * 4096:block * 4096 + 8]) == block.to_bytes(8, "little")
            await dst.drop()
        await owner.ping()
        await in_thread(bys.advancing)
        again = await connect_when_free(sa.socket, "victim")
        ch2 = await again.open(sb.url, "owner", label="reborn")
        peer2 = await owner.accept()
        await ch2.send(b"back")
        assert (await asyncio.wait_for(peer2.recv(), 10 * TIME_SCALE)).body == b"back"
        await again.close()
        await owner.close()

    arun(main(), 120 * TIME_SCALE)
    bys.finish()


# --------------------------------------------------------------------------------------------
# A client stopped for 30 s


STOP_SECONDS = 30


@pytest.mark.slow
def test_stopped_client_is_not_disconnected(sidecars: Callable[..., Sidecar],
                                            bystanders: Callable[..., Bystanders],
                                            agents: Callable[..., Agent],
                                            arun: Callable[..., Any]) -> None:
    """A client process with an open channel is stopped (SIGSTOP) for 30 s while its peer
    sends a message a second; after SIGCONT it is still connected, gets every message sent
    meanwhile, in order, and answers each."""
    sa, sb = sidecars("a"), sidecars("b")
    bys = bystanders(sa, sb)
    sleeper = agents("echo", sock=sb.socket, endpoint="sleeper")
    sleeper.expect("ready")

    async def main() -> None:
        c = await af.connect(sa.socket, endpoint="talker")
        ch = await c.open(sb.url, "sleeper")

        async def exchange(body: bytes) -> None:
            await ch.send(body)
            m = await asyncio.wait_for(ch.recv(), 10 * TIME_SCALE)
            assert m.body == b"re:" + body

        for i in range(3):
            await exchange(b"before %d" % i)
        sleeper.signal(signal.SIGSTOP)
        t0 = time.monotonic()
        sent = 0
        while time.monotonic() - t0 < STOP_SECONDS:
            await ch.send(b"during %d" % sent)
            sent += 1
            if sent == STOP_SECONDS // 2:
                # Half-way: still connected (its name is held), and the others carry on.
                with pytest.raises(af.EndpointTaken):
                    await af.connect(sb.socket, endpoint="sleeper")
                await in_thread(bys.advancing)
            await asyncio.sleep(1.0)
        await ch.flush()  # every send taken, none failed
        assert not ch.closed and not c.closed
        sleeper.signal(signal.SIGCONT)
        for i in range(sent):
            m = await asyncio.wait_for(ch.recv(), 20 * TIME_SCALE)
            assert m.body == b"re:during %d" % i
        await exchange(b"after")
        while True:  # its own account: every message, and never a lost connection
            got = await in_thread(sleeper.expect, "got")
            assert got["closed"] is False, got
            if got["n"] == 3 + sent + 1:
                break
        await ch.close()
        end = await in_thread(sleeper.expect, "end")
        assert end["error"] is None, end  # a normal close: it was connected throughout
        print("the stopped client got %d messages sent during its %ds stop" % (sent,
                                                                              STOP_SECONDS))
        await c.close()

    arun(main(), (STOP_SECONDS + 60) * TIME_SCALE)
    assert sleeper.wait() == 0
    bys.finish()
