"""Subagent `decode` (sidecar A, beside the orchestrator): on a `prepare` task it registers a
memfd region for a KV cache and answers its descriptor; when the region's notification arrives
(prefill's write landed) it checks the bytes and tells the orchestrator; on `decode` it answers
from the cache."""

import argparse
import asyncio
import json
import zlib

import agentfabric as af

from common import BLOCK, LAYERS, exit_with_parent, ready, say, sha256


async def main(socket: str) -> None:
    client = await af.connect(socket, endpoint="decode")
    ready(endpoint="decode")
    tasks = None
    while tasks is None:
        ch = await client.accept()
        if ch.label == "task":
            tasks = ch
        # prefill's bulk channel (label kv-push) carries no messages: its write moves the bytes.
    region = None
    watcher = None

    async def on_arrival(region) -> None:
        note = await region.notification()
        digest = sha256(region.buf)
        say("decode", f"notification tag {note.tag} from {note.node}: KV cache landed")
        await tasks.send(json.dumps({"event": "kv_received", "tag": note.tag, "node": note.node,
                                     "sha256": digest}).encode())

    async for msg in tasks:
        task = json.loads(msg.body)
        if task["op"] == "prepare":
            region = await client.region(task["bytes"])
            watcher = asyncio.ensure_future(on_arrival(region))  # listening before prefill writes
            await tasks.respond(msg, json.dumps({
                "descriptor": bytes(region.descriptor).hex()}).encode())
        elif task["op"] == "decode":
            # A stand-in for attention: a checksum per K block (the K blocks lead the region).
            keys = [zlib.crc32(region.buf[i * BLOCK:(i + 1) * BLOCK]) for i in range(LAYERS)]
            await tasks.respond(msg, json.dumps({"k_crc32": keys}).encode())
        elif task["op"] == "exit":
            await tasks.respond(msg, b"{}")
            break
    if watcher is not None and not watcher.done():
        watcher.cancel()
    await client.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    exit_with_parent()
    asyncio.run(main(ap.parse_args().socket))
