#!/usr/bin/env bash
# The Python client's tests against real sidecars: makes a virtual environment in
# target/python (once), installs pytest, pyzmq and the client (`pip install ./clients/python`, as a user
# would) into it, builds the `agentfabric` binary the tests start sidecars from, and runs pytest.
# Extra arguments go to pytest. AGENTFABRIC_PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${AGENTFABRIC_VENV:-target/python}
py=${AGENTFABRIC_PYTHON:-python3}
if [[ ! -x $venv/bin/python ]]; then
  "$py" -m venv "$venv"
fi
# pytest, and pyzmq for the benchmark's tests (the benchmark's baseline; never a dependency of
# the client itself).
"$venv/bin/python" -m pip install -q --disable-pip-version-check pytest pyzmq
# Reinstalled every run: the tests must exercise the client as this checkout has it.
"$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps ./clients/python
cargo build -q -p agentfabric-cli
export AGENTFABRIC_BIN=${AGENTFABRIC_BIN:-$PWD/target/debug/agentfabric}
# From the tests' folder, so that `import agentfabric` is the installed package, not the source.
cd clients/python/tests
exec "../../../$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
