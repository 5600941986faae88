"""``python -m agentfabric.bench``: the Python client measured end to end.

Two sidecars (two fabric nodes over loopback tcp, quic or verbs) are started by the benchmark
itself; the agents are separate Python processes (``python -m agentfabric.bench._agent``). Each
workload prints one JSON object on one line of standard output (progress goes to standard
error), with the conventions of the Rust ``agentfabric bench --json`` (``bench/JSON.md``):

- ``pingpong``: 64 B round trips Python -> sidecar -> fabric -> sidecar -> Python echo and
  back, against pyzmq REQ/REP between two Python processes over loopback tcp;
- ``mixed``: the same round trips idle and while 64 MiB region writes run back to back, against
  pyzmq REQ/REP with 64 MiB messages on the same socket pair;
- ``bulk``: 64 MiB region writes (64 blocks of 1 MiB, as the Rust bench's bulk) from a memfd
  region, against the Rust library's own rate (``agentfabric bench --workload bulk``).

The keys of each object: ``JSON.md`` in this directory. Percentiles come from ``hdr`` (an
HdrHistogram-style log-linear histogram, 3 significant digits, standard library only).
"""
