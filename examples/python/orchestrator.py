"""The orchestrator (sidecar A): hands out tasks on coordination channels to three subagents,
calls the retriever's tool, has prefill push a KV cache into decode's region (decode is told by
the region's notification), pulls the cache itself with a region read, and checks every byte."""

import argparse
import asyncio
import json
import sys
import time

import agentfabric as af

from common import (BLOCK, KV_BYTES, LAYERS, decode_layout, expected, prefill_layout, say,
                    sha256)

DOCS = [
    "paged attention keeps the kv cache in fixed size blocks",
    "a prefill worker builds the kv cache and a decode worker consumes it",
    "shared memory regions move bytes without a copy through the sidecar",
]
TAG = 7


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"orchestrator: FAILED: {what}")
    print(f"ok: {what}", flush=True)


async def ask(ch, task: dict, deadline: float = 30.0) -> dict:
    """A task as a request on a coordination channel; the subagent's answer as JSON."""
    resp = await ch.request(json.dumps(task).encode(), deadline=deadline)
    return json.loads(bytes(getattr(resp, "body", resp)))


async def main(a: argparse.Namespace) -> None:
    client = await af.connect(a.socket, endpoint="orchestrator")
    coord = dict(label="task", klass=af.Class.COORDINATION, priority=6)
    retriever = await client.open(a.b_url, "retriever", **coord)
    prefill = await client.open(a.b_url, "prefill", **coord)
    decode = await client.open("", "decode", **coord)  # "": this sidecar's own node
    say("orchestrator", f"task channels: retriever and prefill on {prefill.node}, decode here")

    # 1. The retriever indexes documents (a task), then answers a tool call over them.
    r = await ask(retriever, {"op": "index", "docs": DOCS})
    check(r["indexed"] == len(DOCS), f"retriever indexed {r['indexed']} documents")
    result = await client.call("search", b"kv cache decode", url=a.b_url, endpoint="retriever",
                               deadline=5.0)
    hits = json.loads(bytes(getattr(result, "body", result)))
    check(len(hits) == 2, f"tool call search found {len(hits)} documents")
    prompt = "question: how does decode get the kv cache?\n" + "\n".join(hits)

    # 2. decode registers a region for the cache; prefill builds the cache and writes it there.
    r = await ask(decode, {"op": "prepare", "bytes": KV_BYTES})
    job = {"op": "prefill", "prompt": prompt,
           "push": {"url": a.a_url, "endpoint": "decode", "descriptor": r["descriptor"],
                    "tag": TAG}}
    t0 = time.perf_counter()
    done = await ask(prefill, job)
    check(done["bytes"] == KV_BYTES and done["blocks"] == 2 * LAYERS,
          f"prefill pushed {done['bytes']} B in {done['blocks']} blocks ({done['ms']} ms)")

    # 3. decode's notification: it reports what landed in its region.
    event = json.loads((await asyncio.wait_for(decode.recv(), 30.0)).body)
    check(event["event"] == "kv_received" and event["tag"] == TAG and event["node"] == prefill.node,
          f"decode notified (tag {event['tag']} from {event['node']}) "
          f"{(time.perf_counter() - t0) * 1e3:.1f} ms after the task")
    check(event["sha256"] == done["pushed_sha256"] == sha256(expected(prompt, decode_layout)),
          "decode's region holds the KV cache, reordered K-then-V (sha256 "
          f"{event['sha256'][:16]}...)")

    # 4. The orchestrator pulls prefill's cache into its own region and checks every byte.
    mine = await client.region(KV_BYTES)
    pull = await client.open(a.b_url, "prefill", label="kv-pull", klass=af.Class.BULK,
                             priority=2)
    blocks = [(off, off, BLOCK) for off in range(0, KV_BYTES, BLOCK)]
    report = await pull.read(mine, bytes.fromhex(done["descriptor"]), blocks)
    check(report.bytes == KV_BYTES, f"pulled {report.bytes} B in {report.blocks} blocks "
          f"({report.elapsed * 1e3:.1f} ms in the sidecar)")
    want = expected(prompt, prefill_layout)
    check(bytes(mine.buf[:KV_BYTES]) == want and sha256(want) == done["sha256"],
          "the pulled KV cache is byte for byte prefill's")

    # 5. decode answers from its copy; then every subagent is told to exit.
    r = await ask(decode, {"op": "decode"})
    check(len(r["k_crc32"]) == LAYERS, f"decode answered ({LAYERS} K-block checksums)")
    for ch in (retriever, prefill, decode):
        await ask(ch, {"op": "exit"})
    await pull.close()
    await client.close()
    print("orchestrator: all checks passed", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True, help="sidecar A's socket")
    ap.add_argument("--a-url", required=True, help="sidecar A's listen URL (for prefill's push)")
    ap.add_argument("--b-url", required=True, help="sidecar B's listen URL")
    try:
        asyncio.run(main(ap.parse_args()))
    except SystemExit:
        raise
    except Exception as e:
        print(f"orchestrator: FAILED: {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
