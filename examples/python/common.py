"""What the example's agents share: the KV cache they agree on, and how an agent tells run.py
it is ready (one JSON line on standard output) and stops when run.py goes away."""

import hashlib
import json
import os
import random
import sys
import threading

# The "KV cache" of one prompt: LAYERS layers, each a K block and a V block of BLOCK bytes.
LAYERS = 16
BLOCK = 256 << 10
KV_BYTES = 2 * LAYERS * BLOCK  # 8 MiB


def kv_block(prompt: str, layer: int, kind: str) -> bytes:
    """The K or V block of one layer: deterministic bytes from the prompt (a stand-in for the
    model's tensors), so any agent can say what a block must hold."""
    return random.Random(f"{prompt}|{layer}|{kind}").randbytes(BLOCK)


def prefill_layout(layer: int, kind: str) -> int:
    """Offset of a block in the prefill agent's region: layer-major, K then V of each layer."""
    return (2 * layer + (kind == "V")) * BLOCK


def decode_layout(layer: int, kind: str) -> int:
    """Offset of a block in the decode agent's region: every K block, then every V block (the
    layout its attention kernel wants), so the transfer reorders as it moves."""
    return ((kind == "V") * LAYERS + layer) * BLOCK


def expected(prompt: str, layout) -> bytes:
    """The whole region a layout gives for a prompt."""
    out = bytearray(KV_BYTES)
    for layer in range(LAYERS):
        for kind in "KV":
            off = layout(layer, kind)
            out[off:off + BLOCK] = kv_block(prompt, layer, kind)
    return bytes(out)


def sha256(buf) -> str:
    return hashlib.sha256(buf).hexdigest()


def say(who: str, text: str) -> None:
    """A log line on standard error."""
    print(f"[{who}] {text}", file=sys.stderr, flush=True)


def ready(**info) -> None:
    """Tells run.py that the agent is connected and serving."""
    print(json.dumps({"ready": info}), flush=True)


def exit_with_parent() -> None:
    """Ends the process when standard input closes (run.py stopped or died)."""

    def watch():
        try:
            while os.read(0, 4096):  # the raw descriptor: no lock for interpreter shutdown
                pass
        finally:
            os._exit(0)

    if not sys.stdin.isatty():
        threading.Thread(target=watch, daemon=True).start()
