"""Subagent `retriever` (sidecar B): takes an `index` task on its coordination channel and serves
the tool `search` over what it indexed."""

import argparse
import asyncio
import json

import agentfabric as af

from common import exit_with_parent, ready, say


async def main(socket: str) -> None:
    client = await af.connect(socket, endpoint="retriever")
    docs = []

    async def search(call) -> bytes:
        words = set(bytes(call.args).decode().lower().split())
        hits = [d for d in docs if words & set(d.lower().split())]
        return json.dumps(hits).encode()

    await client.serve("search", search)
    ready(endpoint="retriever", tools=["search"])
    ch = await client.accept()  # the orchestrator's task channel
    say("retriever", f"task channel from {ch.node}/{ch.endpoint} ({ch.label})")
    async for msg in ch:
        task = json.loads(msg.body)
        if task["op"] == "index":
            docs.extend(task["docs"])
            say("retriever", f"indexed {len(task['docs'])} documents")
            await ch.respond(msg, json.dumps({"indexed": len(docs)}).encode())
        elif task["op"] == "exit":
            await ch.respond(msg, b"{}")
            break
    await client.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    exit_with_parent()
    asyncio.run(main(ap.parse_args().socket))
