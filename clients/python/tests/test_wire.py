"""The frame codec (agentfabric._wire): every message round-trips, and any bytes decode to a
message or raise a typed error (Malformed / TooLarge), never another exception. Fuzzing uses
random with fixed seeds, so every run checks the same inputs."""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any, List, Tuple

import pytest

import agentfabric as af
from agentfabric import _wire as w
from agentfabric._conn import Connection

CLIENT_SAMPLES: List[Tuple[int, Any]] = [
    (0, w.Hello(1, 1, "agent")),
    (0, w.Hello(0, 0xFFFF, "")),
    (1, w.Ping()),
    (2, w.Open(0, 4, "tcp://127.0.0.1:7000", "worker", "plan")),
    (3, w.Open(2, 7, "", "bulk", "é" * 100)),
    (4, w.Close(1, "")),
    (5, w.Close(0xFFFFFFFF, "done ✓")),
    (6, w.Send(7, b"")),
    (7, w.Send(7, bytes(range(256)) * 3)),
    (8, w.Request(3, 1, b"q")),
    (9, w.Request(3, 3_600_000, b"")),
    (10, w.Respond(3, 1, b"a")),
    (11, w.Respond(3, 2**64 - 1, b"")),
    (12, w.RespondError(3, 5, "no")),
    (13, w.Serve("search")),
    (14, w.Unserve("search")),
    (15, w.Call(1000, False, 0, "t", (("", "e"),), None, b"")),
    (16, w.Call(5, True, 8, "t", (("tcp://a:1", "e"), ("quic://b:2", "f")), b"key", b"args")),
    (17, w.Call(5, False, 0, "", (), None, b"x")),
    (18, w.Cancel(16)),
    (19, w.ToolReply(99, True, b"result")),
    (20, w.ToolReply(99, False, b"it broke")),
    (21, w.RegionAdd(4096)),
    (22, w.RegionDrop(1)),
    (23, w.Write(1, 2, 0, None, b"desc", ((0, 0, 10), (10, 20, 30)))),
    (24, w.Write(1, 2, 100, 0, b"", ())),
    (25, w.Read(1, 2, 100, 2**64 - 1, b"\x00" * 40, ((2**64 - 1, 0, 1),))),
    (26, w.Flush(7)),
    (2**64 - 1, w.Ping()),
]

SIDECAR_SAMPLES: List[Tuple[int, Any]] = [
    (0, w.HelloOk(1, "node-a", "agent", 1000, 4242, w.DEFAULT_MAX_FRAME, 1024, 64)),
    (1, w.Done()),
    (2, w.Error(14, "no such endpoint")),
    (0, w.Error(1, "fatal")),
    (3, w.Error(999, "a code from the future")),
    (4, w.Opened(5, "node-b")),
    (5, w.Response(b"")),
    (6, w.Response(b"answer" * 1000)),
    (7, w.Result(b"r")),
    (8, w.Region(1, 4096, b"opaque descriptor")),
    (9, w.Transferred(1 << 40, 3, 123456789)),
    (0, w.Incoming(9, 1, 0, "node-b", "caller", "")),
    (0, w.Incoming(9, 2, 7, "n", "e", "label ✓")),
    (0, w.Message(9, 0, b"hello")),
    (0, w.Message(9, 77, b"")),
    (0, w.ChannelClosed(9, 16, "bye")),
    (0, w.ChannelClosed(9, 13, "")),
    (10, w.ToolCall("search", "node-b", 2500, True, b"", b"args")),
    (11, w.ToolCall("", "", 0, False, b"k" * 300, b"")),
    (12, w.ToolCancelled()),
    (0, w.Notification(3, 42, "node-b")),
]


def test_samples_cover_every_kind() -> None:
    kinds = {w.kind_of(m) for _, m in CLIENT_SAMPLES + SIDECAR_SAMPLES}
    assert kinds == set(w._FROM_CLIENT) | set(w._TO_CLIENT)
    assert len(kinds) == 18 + 14


@pytest.mark.parametrize("op,msg", CLIENT_SAMPLES)
def test_client_round_trip(op: int, msg: Any) -> None:
    frame = w.encode(op, msg)
    got_op, got = w.decode_frame_from_client(frame)
    assert (got_op, type(got), got) == (op, type(msg), msg)
    # The header counts itself and the body.
    ln, kind, flags, fid = w.HEADER.unpack_from(frame)
    assert (ln + 4, kind, flags, fid) == (len(frame), w.kind_of(msg), 0, op)


@pytest.mark.parametrize("op,msg", SIDECAR_SAMPLES)
def test_sidecar_round_trip(op: int, msg: Any) -> None:
    frame = w.encode(op, msg)
    got_op, got = w.decode_frame_to_client(frame)
    assert (got_op, type(got), got) == (op, type(msg), msg)


def test_body_layouts_are_the_protocols() -> None:
    # A few frames written out by hand from PROTOCOL.md's tables.
    assert w.encode(0, w.Hello(1, 1, "ab")) == (
        struct.pack("<IHHQ", 12 + 8, 0x0001, 0, 0) + b"\x01\x00\x01\x00\x02\x00ab")
    assert w.encode(7, w.Send(3, b"xy")) == (
        struct.pack("<IHHQ", 12 + 6, 0x0005, 0, 7) + b"\x03\x00\x00\x00xy")
    assert w.encode(0, w.Message(3, 9, b"z")) == (
        struct.pack("<IHHQ", 12 + 13, 0x8102, 0, 0) + struct.pack("<IQ", 3, 9) + b"z")
    call = w.encode(5, w.Call(100, True, 2, "t", (("u", "e"),), b"k", b"A"))
    assert call[16:] == (struct.pack("<IBB", 100, 3, 2) + b"\x01\x00t" + b"\x01\x00"
                         + b"\x01\x00u\x01\x00e" + b"\x01\x00\x00\x00k" + b"A")
    xfer = w.encode(5, w.Write(1, 2, 3, 4, b"d", ((5, 6, 7),)))
    assert xfer[16:] == (struct.pack("<IIIBQ", 1, 2, 3, 1, 4) + b"\x01\x00\x00\x00d"
                         + struct.pack("<IQQQ", 1, 5, 6, 7))


def test_hot_path_encoders_match_encode() -> None:
    for body in (b"", b"x", bytes(1000)):
        for data in (body, bytearray(body), memoryview(body)):
            n = len(body)
            assert w.send_frame(5, 3, data, n) == w.encode(5, w.Send(3, body))
            assert w.request_frame(5, 3, 77, data, n) == w.encode(5, w.Request(3, 77, body))
            assert w.respond_frame(5, 3, 9, data, n) == w.encode(5, w.Respond(3, 9, body))


def test_header_errors() -> None:
    good = w.encode(1, w.Ping())
    with pytest.raises(af.Malformed):  # flags
        w.decode_frame_from_client(good[:6] + b"\x01\x00" + good[8:])
    with pytest.raises(af.Malformed):  # len < 12
        w.decode_frame_from_client(struct.pack("<IHHQ", 11, 2, 0, 1))
    with pytest.raises(af.TooLarge):
        w.decode_frame_from_client(struct.pack("<IHHQ", 70000, 5, 0, 1), max_frame=65536)
    with pytest.raises(af.Malformed):  # trailing bytes after the frame
        w.decode_frame_from_client(good + b"\x00")
    with pytest.raises(af.Malformed):  # unknown kind
        w.decode_frame_from_client(struct.pack("<IHHQ", 12, 0x0013, 0, 1))
    with pytest.raises(af.Malformed):  # a sidecar kind sent by a client
        w.decode_frame_from_client(struct.pack("<IHHQ", 12, w.DONE, 0, 1))
    with pytest.raises(af.Malformed):  # bytes left after the last field
        w.decode_frame_from_client(struct.pack("<IHHQ", 13, w.PING, 0, 1) + b"\x00")
    # A frame of exactly max_frame bytes is allowed; one more is TooLarge.
    big = w.encode(1, w.Send(1, bytes(100)))
    assert w.decode_frame_from_client(big, max_frame=len(big))[1] == w.Send(1, bytes(100))
    with pytest.raises(af.TooLarge):
        w.decode_frame_from_client(big, max_frame=len(big) - 1)


def test_id_rules() -> None:
    with pytest.raises(af.Malformed):
        w.decode_frame_from_client(w.encode(3, w.Hello(1, 1, "a")))
    with pytest.raises(af.Malformed):
        w.decode_frame_from_client(w.encode(0, w.Ping()))
    with pytest.raises(af.Malformed):
        w.decode_frame_to_client(w.encode(5, w.Message(1, 0, b"")))
    with pytest.raises(af.Malformed):
        w.decode_frame_to_client(w.encode(0, w.Done()))
    assert w.decode_frame_to_client(w.encode(0, w.Error(1, "x")))[0] == 0
    assert w.decode_frame_to_client(w.encode(9, w.Error(1, "x")))[0] == 9


def _body_frame(kind: int, op: int, body: bytes) -> bytes:
    return w.HEADER.pack(12 + len(body), kind, 0, op) + body


def test_values_out_of_range_are_malformed() -> None:
    bad_client = [
        (w.OPEN, struct.pack("<BB", 3, 0) + b"\x00\x00" * 3),  # class
        (w.OPEN, struct.pack("<BB", 0, 8) + b"\x00\x00" * 3),  # priority
        (w.CLOSE, struct.pack("<I", 0) + b"\x00\x00"),  # channel 0
        (w.TOOL_REPLY, struct.pack("<QB", 1, 2)),  # ok not a bool
        (w.SERVE, b"\x02\x00\xff\xfe"),  # not UTF-8
        (w.CALL, struct.pack("<IBB", 1, 4, 0) + b"\x00\x00\x00\x00" + b"\x00" * 4),  # flags
        (w.CALL, struct.pack("<IBB", 1, 2, 0) + b"\x00\x00\x00\x00" + b"\x00" * 4),  # empty key
        (w.CALL, struct.pack("<IBB", 1, 0, 0) + b"\x00\x00\x00\x00" + b"\x01\x00\x00\x00k"),
        (w.WRITE, struct.pack("<IIIBQ", 1, 1, 0, 2, 0) + b"\x00" * 8),  # notify
        (w.WRITE, struct.pack("<IIIBQ", 1, 1, 0, 0, 5) + b"\x00" * 8),  # tag without notify
        (w.READ, struct.pack("<IIIBQ", 1, 1, 0, 0, 0) + b"\x00" * 4 + struct.pack("<I", 2)
         + b"\x00" * 24),  # two blocks announced, one present
        (w.READ, struct.pack("<IIIBQ", 1, 1, 0, 0, 0) + b"\x00" * 4 + struct.pack("<I", 2**32 - 1)),
    ]
    for kind, body in bad_client:
        with pytest.raises(af.Malformed):
            w.decode_frame_from_client(_body_frame(kind, 1, body))
    bad_sidecar = [
        (w.INCOMING, 0, struct.pack("<IBB", 1, 3, 0) + b"\x00\x00" * 3),
        (w.INCOMING, 0, struct.pack("<IBB", 0, 0, 0) + b"\x00\x00" * 3),
        (w.MESSAGE, 0, struct.pack("<IQ", 0, 0)),
        (w.TOOL_CALL, 1, b"\x00\x00\x00\x00" + struct.pack("<IB", 1, 9) + b"\x00" * 4),
        (w.OPENED, 1, struct.pack("<I", 1) + b"\x05\x00abc"),  # string past the end
        (w.HELLO_OK, 0, b"\x01\x00"),  # truncated
    ]
    for kind, op, body in bad_sidecar:
        with pytest.raises(af.Malformed):
            w.decode_frame_to_client(_body_frame(kind, op, body))


def test_encode_rejects_what_the_wire_cannot_carry() -> None:
    with pytest.raises(af.InvalidArgument):
        w.encode(1, w.Serve("x" * 70000))
    with pytest.raises(af.InvalidArgument):
        w.encode(1, w.Close(2**32, ""))
    with pytest.raises(af.InvalidArgument):
        w.encode(1, w.Open(256, 0, "", "e", ""))
    with pytest.raises(af.InvalidArgument):
        w.encode(2**64, w.Ping())
    with pytest.raises(af.InvalidArgument):
        w.encode(1, w.Call(1, False, 0, "t", (), b"", b""))


def test_error_codes() -> None:
    names = ["Malformed", "TooLarge", "UnsupportedVersion", "PermissionDenied", "EndpointTaken",
             "InvalidArgument", "UnknownChannel", "UnknownRegion", "WindowExceeded",
             "LimitReached", "DeadlineExceeded", "Cancelled", "PeerDead", "Refused",
             "ConnectFailed", "Closed", "TransferFailed", "ToolFailed", "NoSuchTool",
             "RemoteError", "BadFd", "TooBig", "InternalError"]
    for code, name in enumerate(names, 1):
        e = af.errors.error_from_code(code, "m")
        assert type(e) is getattr(af, name)
        assert (e.code, e.message, str(e)) == (code, "m", "m")
        assert isinstance(e, af.FabricError)
    unknown = af.errors.error_from_code(500, "later")
    assert type(unknown) is af.InternalError and unknown.code == 500
    assert isinstance(af.DeadlineExceeded("x"), TimeoutError)
    assert not isinstance(af.Cancelled("x"), asyncio.CancelledError)
    assert issubclass(af.ConnectionLost, af.FabricError)


# ---------------------------------------------------------------------------------------------
# Fuzzing: typed errors only


def _check_total(decode: Any, data: bytes) -> Any:
    try:
        return decode(data)
    except (af.Malformed, af.TooLarge):
        return None


def test_every_truncation_is_malformed() -> None:
    for op, msg in CLIENT_SAMPLES:
        frame = w.encode(op, msg)
        for cut in range(len(frame)):
            with pytest.raises(af.Malformed):
                w.decode_frame_from_client(frame[:cut])
    for op, msg in SIDECAR_SAMPLES:
        frame = w.encode(op, msg)
        for cut in range(min(len(frame), 300)):
            with pytest.raises(af.Malformed):
                w.decode_frame_to_client(frame[:cut])


def test_truncated_bodies_in_whole_frames_are_malformed() -> None:
    # A shorter body under a header that says so: the fields run out.
    for op, msg in CLIENT_SAMPLES + SIDECAR_SAMPLES:
        frame = w.encode(op, msg)
        body = frame[16:]
        dec = w.decode_from_client if (op, msg) in CLIENT_SAMPLES else w.decode_to_client
        for cut in range(len(body)):
            try:
                got = dec(w.kind_of(msg), op, body[:cut])
            except af.Malformed:
                continue
            # Only a `rest` field can absorb a shorter body; then re-encoding gives it back.
            assert w.encode(op, got)[16:] == body[:cut]


def _mutants(rng: random.Random, frame: bytes, count: int) -> List[bytes]:
    out = []
    for _ in range(count):
        b = bytearray(frame)
        how = rng.randrange(4)
        if how == 0 and len(b) > 16:  # flip bits in the body
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(16, len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif how == 1 and len(b) > 16:  # random bytes in the body, length fixed up
            i = rng.randrange(16, len(b))
            b[i:] = rng.randbytes(rng.randrange(0, 40)) if hasattr(rng, "randbytes") else bytes(
                rng.randrange(256) for _ in range(rng.randrange(0, 40)))
            struct.pack_into("<I", b, 0, len(b) - 4)
        elif how == 2:  # any byte anywhere
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        else:  # insert or delete one byte of the body, length fixed up
            i = rng.randrange(16, len(b) + 1)
            if rng.random() < 0.5 or i == len(b):
                b[i:i] = bytes([rng.randrange(256)])
            else:
                del b[i]
            struct.pack_into("<I", b, 0, len(b) - 4)
        out.append(bytes(b))
    return out


def test_fuzz_mutated_frames() -> None:
    rng = random.Random(0xAF)
    for samples, dec in ((CLIENT_SAMPLES, w.decode_frame_from_client),
                         (SIDECAR_SAMPLES, w.decode_frame_to_client)):
        for op, msg in samples:
            for data in _mutants(rng, w.encode(op, msg), 300):
                got = _check_total(dec, data)
                if got is not None:
                    # Decoding is exact: a decoded frame re-encodes to the same bytes.
                    assert w.encode(got[0], got[1]) == data


def _rand_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def test_fuzz_random_bodies_of_every_kind() -> None:
    rng = random.Random(1234)
    for table, dec in ((w._FROM_CLIENT, w.decode_from_client),
                       (w._TO_CLIENT, w.decode_to_client)):
        for kind in table:
            for _ in range(400):
                body = _rand_bytes(rng, rng.choice((0, 1, 2, 4, 8, 13, 24, 40, 80)))
                op = rng.choice((0, 1, rng.randrange(2**64)))
                try:
                    msg = dec(kind, op, body)
                except af.Malformed:
                    continue
                assert w.encode(op, msg)[16:] == body


def test_fuzz_random_frames() -> None:
    rng = random.Random(99)
    kinds = list(w._FROM_CLIENT) + list(w._TO_CLIENT) + [0, 0x13, 0x8000, 0xFFFF]
    for _ in range(5000):
        if rng.random() < 0.3:
            data = _rand_bytes(rng, rng.randrange(0, 64))
        else:
            body = _rand_bytes(rng, rng.randrange(0, 48))
            data = w.HEADER.pack(12 + len(body) + rng.choice((0, 0, 0, -1, 1)) & 0xFFFFFFFF,
                                 rng.choice(kinds), rng.choice((0, 0, 0, 1)),
                                 rng.choice((0, 1, 2**63))) + body
        for dec in (w.decode_frame_from_client, w.decode_frame_to_client):
            got = _check_total(lambda d: dec(d, 4096), data)
            if got is not None:
                assert w.encode(got[0], got[1]) == data


def test_decoders_take_any_buffer() -> None:
    frame = w.encode(0, w.Message(4, 2, b"abc"))
    for data in (frame, bytearray(frame), memoryview(frame)):
        assert w.decode_frame_to_client(data) == (0, w.Message(4, 2, b"abc"))
        assert type(w.decode_frame_to_client(data)[1].body) is bytes


# ---------------------------------------------------------------------------------------------
# The connection's stream reader: frames cut at any byte boundary, garbage ends the connection


class _Transport:
    """Enough of an asyncio transport for Connection's reader."""

    def __init__(self) -> None:
        self.closed = False
        self.paused = False
        self.written: List[bytes] = []

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


class _Chan:
    def __init__(self) -> None:
        self.got: List[Tuple[bytes, int]] = []

    def push(self, body: bytes, request: int) -> None:
        self.got.append((body, request))

    def conn_lost(self) -> None:
        pass


def _reader(loop: asyncio.AbstractEventLoop) -> Tuple[Connection, _Transport, _Chan]:
    conn = Connection(loop, None)  # type: ignore[arg-type]
    t = _Transport()
    conn.connection_made(t)  # type: ignore[arg-type]
    conn.max_frame = w.DEFAULT_MAX_FRAME
    ch = _Chan()
    conn.channels[7] = ch
    return conn, t, ch


def test_stream_reader_any_split() -> None:
    loop = asyncio.new_event_loop()
    try:
        rng = random.Random(7)
        msgs = [(rng.randrange(2), _rand_bytes(rng, rng.choice((0, 1, 100, 70000))))
                for _ in range(60)]
        stream = b"".join(w.encode(0, w.Message(7, req, body)) for req, body in msgs)
        stream += w.encode(0, w.Message(8, 0, b"for a channel nobody holds"))
        for trial in range(20):
            conn, t, ch = _reader(loop)
            pos = 0
            while pos < len(stream):
                n = rng.choice((1, 2, 15, 16, 17, 100, 4096, 65536, 200000))
                conn.data_received(stream[pos:pos + n])
                pos += n
            assert [(b, r) for b, r in ch.got] == [(b, r) for r, b in msgs]
            assert not t.closed and conn.lost is None
    finally:
        loop.close()


def test_stream_reader_garbage_ends_the_connection() -> None:
    loop = asyncio.new_event_loop()
    try:
        rng = random.Random(11)
        good = w.encode(0, w.Message(7, 0, b"ok"))
        garbage = [
            struct.pack("<IHHQ", 12, 0x7777, 0, 0),  # unknown kind
            struct.pack("<IHHQ", 5, w.DONE, 0, 1),  # len < 12
            struct.pack("<IHHQ", 12, w.DONE, 1, 1),  # flags
            struct.pack("<IHHQ", 2**31, w.MESSAGE, 0, 0),  # too large
            struct.pack("<IHHQ", 14, w.MESSAGE, 0, 0) + b"\x00\x00",  # short MESSAGE
        ] + [_rand_bytes(rng, 40) for _ in range(200)]
        for junk in garbage:
            conn, t, ch = _reader(loop)
            conn.data_received(good + junk + good)
            if t.closed:
                assert conn.lost is not None and isinstance(conn.fatal, (af.Malformed,
                                                                         af.TooLarge))
                assert ch.got[0] == (b"ok", 0)
    finally:
        loop.close()
