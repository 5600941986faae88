"""The command line of ``python -m agentfabric.bench``: starts two sidecars, runs each workload's
agents as separate processes, and prints the results (``JSON.md`` in this directory)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

from .hdr import Histogram, round2, summary
from .procs import Agent, BenchError, Sidecar, find_binary, progress, run_command

WORKLOADS = ("pingpong", "mixed", "bulk")
TRANSPORTS = ("tcp", "quic", "verbs")
# Per-measurement defaults of the Rust bench (bench/src/settings.rs): pingpong and bulk 3 s,
# mixed 2 s per phase; warm-up 0.5 s.
DEFAULT_DURATION = {"pingpong": 3.0, "mixed": 2.0, "bulk": 3.0}
DEFAULT_WARMUP = 0.5
# A transfer (mixed's load, bulk's batch) moves 64 MiB, as the Rust bench's BATCH_BYTES.
TRANSFER_BYTES = 64 << 20
# Block size of the transfers: the Rust bench's bulk default (`--block-bytes`, 1 MiB).
DEFAULT_BLOCK = 1 << 20
BASELINE_NAME = "pyzmq REQ/REP"
PYZMQ_MISSING = (
    "error: the benchmark's baseline needs pyzmq, which is not installed for {python}.\n"
    "Install the benchmark extra:   pip install 'agentfabric[bench]'\n"
    "  (from a checkout:          pip install -e './clients/python[bench]')\n"
    "or pyzmq alone:               pip install pyzmq\n"
    "(--workload bulk runs without it.)"
)


def round3(x: float) -> float:
    r = math.floor(abs(x) * 1000.0 + 0.5) / 1000.0
    return r if x >= 0 else -r


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a / b`` rounded to 3 decimals; None when either is missing or ``b`` is not positive."""
    if a is None or b is None or not b > 0 or not math.isfinite(a):
        return None
    return round3(a / b)


def client_version() -> str:
    try:
        from agentfabric import __version__  # type: ignore[attr-defined]

        return str(__version__)
    except Exception:
        pass
    try:
        from importlib.metadata import version

        return version("agentfabric")
    except Exception:
        return "unknown"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m agentfabric.bench",
        description="The agentfabric Python client measured end to end: two sidecars, agents as "
        "separate processes, pyzmq REQ/REP and the Rust library's bulk rate as baselines.",
    )
    ap.add_argument("--json", action="store_true", help="one JSON object per workload per line")
    ap.add_argument("--workload", choices=WORKLOADS + ("all",), default="all")
    ap.add_argument("--transport", choices=TRANSPORTS, default="tcp",
                    help="between the two sidecars (pyzmq is always loopback tcp)")
    ap.add_argument("--duration", type=float, metavar="S",
                    help="measured seconds per measurement (default: pingpong 3, mixed 2 per "
                    "phase, bulk 3, as the Rust bench)")
    ap.add_argument("--warmup", type=float, default=DEFAULT_WARMUP, metavar="S",
                    help="warm-up seconds before each measurement (default 0.5)")
    ap.add_argument("--size", type=int, default=64, metavar="BYTES",
                    help="pingpong payload (default 64; mixed's pings are 64 B)")
    ap.add_argument("--block-bytes", type=int, default=DEFAULT_BLOCK, metavar="BYTES",
                    help="block size of the 64 MiB region writes of mixed and bulk (default "
                    "1048576, the Rust bench's bulk default)")
    ap.add_argument("--sidecar-bin", metavar="PATH",
                    help="the agentfabric binary (default: $AGENTFABRIC_BIN, else "
                    "target/release/agentfabric, else agentfabric on PATH)")
    ap.add_argument("--sidecar-arg", action="append", default=[], metavar="ARG",
                    help="an extra argument for both sidecars (repeatable); quic without "
                    "--quic-ca among them gets development certificates made for the run")
    ap.add_argument("--listen-addr", metavar="IP",
                    help="verbs: the RDMA netdev's address (default $AGENTFABRIC_LAB_ADDR_A)")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                    help="the event loop of the fabric's agents: asyncio's own (what an "
                         "application gets without installing anything, the default) or uvloop "
                         "(pip install uvloop)")
    ap.add_argument("--no-rust", action="store_true",
                    help="bulk: do not run the Rust bench for rust_mb_s (then null)")
    a = ap.parse_args(argv)
    if a.duration is not None and not 0 < a.duration <= 3600:
        ap.error("--duration must be above 0 and at most 3600 seconds")
    if not 0 <= a.warmup <= 3600:
        ap.error("--warmup must be 0 to 3600 seconds")
    if not 1 <= a.size <= 16 << 20:
        ap.error("--size must be 1 to 16777216 bytes")
    if not 1 <= a.block_bytes <= TRANSFER_BYTES:
        ap.error(f"--block-bytes must be 1 to {TRANSFER_BYTES} bytes")
    return a


def listen_url(a: argparse.Namespace) -> str:
    if a.transport == "verbs":
        addr = a.listen_addr or os.environ.get("AGENTFABRIC_LAB_ADDR_A")
        if not addr:
            raise BenchError(
                "--transport verbs needs the RDMA netdev's address: --listen-addr IP or "
                "AGENTFABRIC_LAB_ADDR_A (soft-roce/lab sets it)"
            )
        return f"verbs://{addr}:0"
    return f"{a.transport}://127.0.0.1:0"


class Run:
    """One invocation: its settings, sidecars and the keys every object starts with."""

    def __init__(self, a: argparse.Namespace, binary: str):
        self.a = a
        self.binary = binary
        self.near: Optional[Sidecar] = None  # sidecar A: the measuring agents
        self.far: Optional[Sidecar] = None  # sidecar B: the echo agent
        self.far_url = ""
        self.version = client_version()
        self.sidecar_version: Optional[str] = None

    def duration(self, workload: str) -> float:
        return self.a.duration if self.a.duration is not None else DEFAULT_DURATION[workload]

    def head(self, workload: str) -> Dict[str, object]:
        return {
            "transport": self.a.transport,
            "workload": workload,
            "client": "python",
            "event_loop": self.a.loop,
        }

    def tail(self) -> Dict[str, object]:
        return {
            "version": self.version,
            "sidecar_version": self.sidecar_version,
            "python": platform.python_version(),
        }

    async def agents(self, workload: str, params: Dict[str, object], zmq: bool,
                     timeout: float) -> Dict[str, object]:
        """Runs the echo agent (far sidecar), the pyzmq echo if ``zmq``, and the pinger (near
        sidecar) measuring ``workload``; returns the pinger's result."""
        assert self.near is not None and self.far is not None
        started: List[Agent] = []
        try:
            echo_ep = f"echo-{workload}"
            echo = await Agent.start("echo", {"socket": self.far.socket, "endpoint": echo_ep,
                                              "loop": self.a.loop})
            started.append(echo)
            await echo.expect("ready", 30)
            params = dict(params, socket=self.near.socket, endpoint=f"pinger-{workload}",
                          url=self.far_url, peer=echo_ep, workload=workload, loop=self.a.loop)
            if zmq:
                z = await Agent.start("zmq-echo", {})
                started.append(z)
                params["zmq"] = (await z.expect("ready", 30))["endpoint"]  # type: ignore[index]
            pinger = await Agent.start("pinger", params)
            started.append(pinger)
            return await pinger.expect("result", timeout)  # type: ignore[return-value]
        finally:
            for ag in reversed(started):
                await ag.stop()

    async def pingpong(self) -> Dict[str, object]:
        d, w, size = self.duration("pingpong"), self.a.warmup, self.a.size
        progress(f"pingpong: {size} B round trips, fabric and {BASELINE_NAME} taking turns, "
                 f"{d:.2f} s each")
        r = await self.agents("pingpong", {"size": size, "duration": d, "warmup": w}, True,
                              2 * (d + w) + 60)
        f = summary(Histogram.from_dict(r["fabric"]))  # type: ignore[arg-type]
        b = summary(Histogram.from_dict(r["zmq"]), BASELINE_NAME)  # type: ignore[arg-type]
        out = self.head("pingpong")
        out.update(size_bytes=size, duration_s=d, warmup_s=w, **self.tail())
        out.update(fabric=f, baseline=b)
        for k in ("p50", "p99", "p999"):
            out[f"ratio_{k}"] = ratio(f[f"{k}_us"], b[f"{k}_us"])  # type: ignore[arg-type]
        return out

    async def mixed(self) -> Dict[str, object]:
        d, w, block = self.duration("mixed"), self.a.warmup, self.a.block_bytes
        progress(f"mixed: 64 B round trips idle and behind 64 MiB transfers, {d:.2f} s per phase")
        params = {"duration": d, "warmup": w, "block": block, "transfer": TRANSFER_BYTES}
        r = await self.agents("mixed", params, True, 4 * (d + w) + 90)
        s = {k: summary(Histogram.from_dict(r[k])) for k in  # type: ignore[arg-type]
             ("f_idle", "f_loaded", "z_idle", "z_loaded")}

        def mb_s(b: object, t: object) -> Optional[float]:
            return round2(float(b) / float(t) / 1e6) if float(t) > 0 else None  # type: ignore

        out = self.head("mixed")
        out.update(size_bytes=64, block_bytes=block, transfer_bytes=TRANSFER_BYTES,
                   bulk_api="transfer", duration_s=d, warmup_s=w, rounds=4, **self.tail())
        out.update(
            idle=s["f_idle"],
            loaded=s["f_loaded"],
            bulk_mb_s=mb_s(r["f_bytes"], r["f_time"]),
            ratio_loaded_idle_p99=ratio(s["f_loaded"]["p99_us"], s["f_idle"]["p99_us"]),
            baseline={
                "name": BASELINE_NAME,
                "idle": s["z_idle"],
                "loaded": s["z_loaded"],
                "bulk_mb_s": mb_s(r["z_bytes"], r["z_time"]),
                "ratio_loaded_idle_p99": ratio(s["z_loaded"]["p99_us"], s["z_idle"]["p99_us"]),
            },
            ratio_idle_p99=ratio(s["f_idle"]["p99_us"], s["z_idle"]["p99_us"]),
            ratio_loaded_p99=ratio(s["f_loaded"]["p99_us"], s["z_loaded"]["p99_us"]),
        )
        return out

    async def bulk_python(self) -> Dict[str, object]:
        d, w, block = self.duration("bulk"), self.a.warmup, self.a.block_bytes
        progress(f"bulk: 64 MiB region writes in blocks of {block} B, {d:.2f} s")
        params = {"duration": d, "warmup": w, "block": block, "transfer": TRANSFER_BYTES}
        return await self.agents("bulk", params, False, d + w + 90)

    async def bulk_rust(self) -> Dict[str, object]:
        """``agentfabric bench --workload bulk --json`` on the same transport and block size:
        ``{"mb_s", "debug_build", "error"}``."""
        if self.a.no_rust:
            return {"mb_s": None, "debug_build": None, "error": "not run (--no-rust)"}
        if self.a.transport == "quic":
            return {"mb_s": None, "debug_build": None,
                    "error": "the Rust bench runs bulk over mem, tcp and verbs only"}
        d, w = self.duration("bulk"), self.a.warmup
        argv = [self.binary, "bench", "--transport", self.a.transport, "--workload", "bulk",
                "--json", "--duration", repr(d), "--warmup", repr(w),
                "--block-bytes", str(self.a.block_bytes)]
        progress(f"bulk: the Rust library's rate: {' '.join(argv)}")
        try:
            # Its fabric and its two raw TCP baselines each run `d` after warm-ups.
            obj = json.loads(await run_command(argv, 3 * d + 4 * w + 120))
            return {"mb_s": obj.get("fabric_mb_s"), "debug_build": obj.get("debug_build"),
                    "error": None}
        except (BenchError, ValueError, AttributeError) as e:
            progress(f"bulk: the Rust bench failed: {e}")
            return {"mb_s": None, "debug_build": None, "error": str(e)}

    def bulk_report(self, r: Dict[str, object], rust: Dict[str, object]) -> Dict[str, object]:
        d, w = self.duration("bulk"), self.a.warmup
        py = float(r["bytes"]) / float(r["elapsed"]) / 1e6  # type: ignore[arg-type]
        inside = float(r["sidecar_elapsed"])  # type: ignore[arg-type]
        out = self.head("bulk")
        out.update(block_bytes=self.a.block_bytes, blocks_per_batch=r["blocks_per_batch"],
                   direction="push", batches=r["batches"], duration_s=d, warmup_s=w,
                   **self.tail())
        out.update(
            fabric_mb_s=round2(py),
            sidecar_mb_s=round2(float(r["bytes"]) / inside / 1e6) if inside > 0 else None,  # type: ignore[arg-type]
            rust_mb_s=rust["mb_s"],
            ratio_rust=ratio(py, rust["mb_s"]),  # type: ignore[arg-type]
            rust_debug_build=rust["debug_build"],
            rust_error=rust["error"],
        )
        return out


def emit(obj: Dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj), flush=True)
        return
    print(table(obj), flush=True)


def table(o: Dict[str, object]) -> str:
    """A readable rendering of one workload's object."""

    def row(name: str, s: Dict[str, object], note: str = "") -> str:
        return (f"{name:<26} {s['count']:>9} {s['p50_us']:>10.2f} {s['p99_us']:>10.2f} "
                f"{s['p999_us']:>10.2f} {s['max_us']:>10.2f}  {note}")

    head = (f"{'measurement':<26} {'count':>9} {'p50_us':>10} {'p99_us':>10} {'p99.9_us':>10} "
            f"{'max_us':>10}")
    w = o["workload"]
    lines = [f"agentfabric python bench {o['version']}: transport={o['transport']} workload={w}"]
    fr = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    if w == "pingpong":
        lines += [head, row("fabric", o["fabric"],  # type: ignore[arg-type]
                            f"fabric/pyzmq: p50 {fr(o['ratio_p50'])} p99 {fr(o['ratio_p99'])} "
                            f"p99.9 {fr(o['ratio_p999'])}"),
                  row(BASELINE_NAME, o["baseline"])]  # type: ignore[arg-type]
    elif w == "mixed":
        b = o["baseline"]
        lines += [head,
                  row("fabric idle", o["idle"]),  # type: ignore[arg-type]
                  row("fabric loaded", o["loaded"],  # type: ignore[arg-type]
                      f"loaded/idle p99 {fr(o['ratio_loaded_idle_p99'])}, bulk "
                      f"{o['bulk_mb_s']} MB/s"),
                  row("pyzmq idle", b["idle"]),  # type: ignore[index]
                  row("pyzmq loaded", b["loaded"],  # type: ignore[index]
                      f"loaded/idle p99 {fr(b['ratio_loaded_idle_p99'])}, bulk "  # type: ignore[index]
                      f"{b['bulk_mb_s']} MB/s")]  # type: ignore[index]
    else:
        lines += [f"python fabric  {str(o['fabric_mb_s']):>10} MB/s ({o['batches']} writes of "
                  f"64 MiB in {o['blocks_per_batch']} blocks; sidecar-timed {o['sidecar_mb_s']} "
                  "MB/s)",
                  f"rust fabric    {'-' if o['rust_mb_s'] is None else o['rust_mb_s']:>10} MB/s"
                  + (f" ({o['rust_error']})" if o["rust_error"] else ""),
                  f"python/rust    {fr(o['ratio_rust']):>10}"]
    return "\n".join(lines) + "\n"


async def run(a: argparse.Namespace) -> int:
    workloads = list(WORKLOADS) if a.workload == "all" else [a.workload]
    if any(w in ("pingpong", "mixed") for w in workloads):
        try:
            import zmq  # noqa: F401
        except ImportError:
            print(PYZMQ_MISSING.format(python=sys.executable), file=sys.stderr)
            return 2
    binary = find_binary(a.sidecar_bin)
    r = Run(a, binary)
    try:
        r.sidecar_version = (await run_command([binary, "--version"], 30)).split()[-1]
    except (BenchError, IndexError) as e:
        progress(f"cannot read the binary's version: {e}")
    tmp = tempfile.mkdtemp(prefix="agentfabric-pybench-")
    sidecars: List[Sidecar] = []
    bulk_result = None
    try:
        listen = listen_url(a)
        tag = os.getpid()
        names = (f"pybench-a-{tag}", f"pybench-b-{tag}")
        extra = {n: list(a.sidecar_arg) for n in names}
        if a.transport == "quic" and "--quic-ca" not in a.sidecar_arg:
            # Development certificates for both nodes, from a CA made for this run.
            certs = os.path.join(tmp, "certs")
            await run_command([binary, "certs", "dev", certs, *names], 60)
            for n in names:
                extra[n] += ["--quic-ca", os.path.join(certs, "ca.pem"),
                             "--quic-cert", os.path.join(certs, f"{n}.pem"),
                             "--quic-key", os.path.join(certs, f"{n}.key")]
        r.near = await Sidecar.start(binary, names[0], listen, os.path.join(tmp, "a"),
                                     extra[names[0]])
        sidecars.append(r.near)
        r.far = await Sidecar.start(binary, names[1], listen, os.path.join(tmp, "b"),
                                    extra[names[1]])
        sidecars.append(r.far)
        r.far_url = r.far.url(a.transport)
        for w in workloads:
            if w == "pingpong":
                emit(await r.pingpong(), a.json)
            elif w == "mixed":
                emit(await r.mixed(), a.json)
            else:
                bulk_result = await r.bulk_python()
    finally:
        for s in reversed(sidecars):
            await s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if bulk_result is not None:
        # With the sidecars gone, so that the Rust run has the machine to itself as the
        # Python run had.
        rust = await r.bulk_rust()
        emit(r.bulk_report(bulk_result, rust), a.json)
    progress("done")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    try:
        return asyncio.run(run(a))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
