#!/usr/bin/env bash
# Every test of the project, from a fresh clone on a Debian machine with a Rust toolchain:
#   0. the Debian packages the build needs (rdma-core headers, libclang), if missing;
#   1. the workspace's tests: unit and property tests of the protocol core, the simulated-network
#      tests, the transport conformance suite over mem, tcp and quic (verbs runs in the lab),
#      the CLI, example and doc tests;
#   2. the Python client's tests (pytest, in a virtual environment under target/) against real
#      sidecar processes: tests/python.sh;
#   3. the Soft-RoCE lab tests: the lab installs what it needs (apt packages, a Debian kernel
#      cached outside the repo), boots a VM with an rxe device when the host kernel has none,
#      and runs every test that needs an RDMA device.
# A lab that cannot start is a failure here, never a silent pass; set AGENTFABRIC_LAB=skip to run
# only the first part (the output then says plainly that the lab tests did not run).
set -euo pipefail
cd "$(dirname "$0")/.."

tests/install-build-deps.sh
cargo test --workspace
tests/python.sh

if [ "${AGENTFABRIC_LAB:-}" = "skip" ]; then
  echo "lab tests: did not run (AGENTFABRIC_LAB=skip)"
  exit 0
fi
soft-roce/lab install
soft-roce/lab test
