"""Subagent `prefill` (sidecar B): on a `prefill` task it builds the prompt's KV cache in a memfd
region and pushes it, reordered block by block, into the decode agent's region with one region
write that notifies decode when every block has landed. Its region stays registered so that the
orchestrator can pull the cache too."""

import argparse
import asyncio
import json
import time

import agentfabric as af

from common import (BLOCK, KV_BYTES, LAYERS, decode_layout, exit_with_parent, expected,
                    kv_block, prefill_layout, ready, say, sha256)


async def main(socket: str) -> None:
    client = await af.connect(socket, endpoint="prefill")
    region = await client.region(KV_BYTES)
    ready(endpoint="prefill")
    tasks = None
    while tasks is None:
        ch = await client.accept()
        if ch.label == "task":
            tasks = ch
        # Other channels (the orchestrator's bulk channel for its pull) carry no messages:
        # the transfers run in the sidecars.
    async for msg in tasks:
        task = json.loads(msg.body)
        if task["op"] == "prefill":
            prompt = task["prompt"]
            for layer in range(LAYERS):
                for kind in "KV":
                    off = prefill_layout(layer, kind)
                    region.buf[off:off + BLOCK] = kv_block(prompt, layer, kind)
            push = task["push"]
            kv = await client.open(push["url"], push["endpoint"], label="kv-push",
                                   klass=af.Class.BULK, priority=2)
            blocks = [(prefill_layout(layer, kind), decode_layout(layer, kind), BLOCK)
                      for layer in range(LAYERS) for kind in "KV"]
            t0 = time.perf_counter()
            report = await kv.write(region, bytes.fromhex(push["descriptor"]), blocks,
                                    notify=push["tag"])
            wall = time.perf_counter() - t0
            say("prefill", f"pushed {report.bytes} B in {report.blocks} blocks to "
                f"{kv.node}/{push['endpoint']} in {wall * 1e3:.1f} ms")
            await ch_respond(tasks, msg, {
                "bytes": report.bytes,
                "blocks": report.blocks,
                "ms": round(wall * 1e3, 2),
                "sha256": sha256(region.buf),
                "pushed_sha256": sha256(expected(prompt, decode_layout)),
                "descriptor": bytes(region.descriptor).hex(),
            })
            await kv.close()
        elif task["op"] == "exit":
            await ch_respond(tasks, msg, {})
            break
    await client.close()


async def ch_respond(ch, msg, obj) -> None:
    await ch.respond(msg, json.dumps(obj).encode())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    exit_with_parent()
    asyncio.run(main(ap.parse_args().socket))
